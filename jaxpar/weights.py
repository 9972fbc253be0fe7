"""`python -m jaxpar.weights`: runs `jaxpar.tools.weights`, where its code lives."""

import sys

from jaxpar.tools.weights import main

if __name__ == "__main__":
    sys.exit(main())
