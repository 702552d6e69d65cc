"""`python -m rm.bench`, the documented command; the tool itself is rm/cli/bench.py."""

import sys

from rm.interrupts import interrupts_in_one_line

if __name__ == "__main__":
    interrupts_in_one_line("rm.bench")  # first: Ctrl-C while the tool imports torch is one line too
    from rm.cli.bench import main

    sys.exit(main())
