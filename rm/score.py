"""`python -m rm.score`, the documented command; the tool itself is rm/cli/score.py."""

import sys

from rm.cli.score import main

if __name__ == "__main__":
    sys.exit(main())
