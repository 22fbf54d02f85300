"""Step-cost ratios of P⁴Inv (same as ``p4opt bench``).

Run ``python benchmarks/step_cost.py --help`` for the options.
"""

import sys

from p4opt.studies.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
