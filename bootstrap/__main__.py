"""`python -m bootstrap`: the same as the `bootstrap` console script."""

import sys

from bootstrap.main import main

if __name__ == "__main__":
    sys.exit(main())
