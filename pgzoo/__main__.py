"""``python -m pgzoo ...`` = ``pgzoo ...`` (so ``torchrun -m pgzoo train RECIPE`` starts one rank per process)."""

import sys

from pgzoo.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
