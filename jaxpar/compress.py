"""`python -m jaxpar.compress`: runs `jaxpar.tools.compress`, where its code lives."""

import sys

from jaxpar.tools.compress import main

if __name__ == "__main__":
    sys.exit(main())
