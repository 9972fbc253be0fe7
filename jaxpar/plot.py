"""`python -m jaxpar.plot`: runs `jaxpar.tools.plot`, where its code lives."""

import sys

from jaxpar.tools.plot import main

if __name__ == "__main__":
    sys.exit(main())
