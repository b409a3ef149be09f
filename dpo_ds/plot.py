"""`python -m dpo_ds.plot RUN_DIR...`: dpo_ds.cli.plot."""

import sys

from dpo_ds.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())
