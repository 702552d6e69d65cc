"""`python -m rm.validate`, the documented command; the tool itself is rm/cli/validate.py."""

import sys

from rm.cli.validate import main

if __name__ == "__main__":
    sys.exit(main())
