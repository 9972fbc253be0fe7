"""`python -m jaxpar.predict`: runs `jaxpar.tools.predict`, where its code lives."""

import sys

from jaxpar.tools.predict import main

if __name__ == "__main__":
    sys.exit(main())
