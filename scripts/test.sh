#!/usr/bin/env bash
# The README's test command: sets up if needed, then unit tests and the 2-rank launcher tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
export TRITON_INTERPRET=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
