"""`python -m rm.plan`, the documented command; the tool itself is rm/cli/plan.py."""

import sys

from rm.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
