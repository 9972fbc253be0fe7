"""`python -m jaxpar.play`: runs `jaxpar.tools.play`, where its code lives."""

import sys

from jaxpar.tools.play import main

if __name__ == "__main__":
    sys.exit(main())
