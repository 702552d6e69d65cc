"""`python -m rm.bench`, the documented command; the tool itself is rm/cli/bench.py."""

import sys

from rm.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
