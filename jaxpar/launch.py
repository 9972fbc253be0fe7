"""`python -m jaxpar.launch`: runs `jaxpar.tools.launch`, where its code lives."""

import sys

from jaxpar.tools.launch import main

if __name__ == "__main__":
    sys.exit(main())
