"""`python -m rm.plan`, the documented command; the tool itself is rm/cli/plan.py."""

import sys

from rm.interrupts import interrupts_in_one_line

if __name__ == "__main__":
    interrupts_in_one_line("rm.plan")  # first: Ctrl-C while the tool imports torch is one line too
    from rm.cli.plan import main

    sys.exit(main())
