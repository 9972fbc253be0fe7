"""`python -m jaxpar.checkpoint`: runs `jaxpar.run.checkpoint`, where its code lives."""

import sys

from jaxpar.run.checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
