"""dpo_ds's training entry file: `deepspeed --num_gpus 8 dpo_ds/train.py --ds ds_configs/zero3.json key=value...`
and `python -m dpo_ds.train ...` run dpo_ds.cli.train (the run is built and trained there)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make `dpo_ds` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_ds.cli.train import exit_now, main

if __name__ == "__main__":
    exit_now(main())
