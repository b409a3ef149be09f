#!/usr/bin/env bash
# Create .venv and install dpo_ds with what the tests and the demo need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: on a CPU machine `torch==2.13.0` is the local CPU build; on a GPU cluster
# install your CUDA torch before this script (TORCH_SPEC="" skips the pin).
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
if [ -n "$TORCH_SPEC" ]; then python -m pip install -q "$TORCH_SPEC"; fi
python -m pip install -q -c scripts/constraints.txt -e ".[test]"
python -c "import torch, deepspeed, transformers, datasets; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| datasets', datasets.__version__)" 2>&1 | grep -v "^\[20"
