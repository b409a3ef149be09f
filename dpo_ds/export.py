"""`python -m dpo_ds.export RUN_DIR/LATEST OUT`: dpo_ds.cli.export."""

import sys

from dpo_ds.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
