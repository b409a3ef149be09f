#!/usr/bin/env bash
# Quickstart main job: set up, then SFT -> DPO on the bundled demo through the real deepspeed
# launcher (2 ranks; CPU ranks on a machine without GPUs), then the before/after table.
#   bash demo.sh                   # DS=ds_configs/zero2.json bash demo.sh for ZeRO-2
set -euo pipefail
cd "$(dirname "$0")"
t0=$SECONDS
bash scripts/setup.sh
. .venv/bin/activate
setup_s=$((SECONDS - t0))
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
DS=${DS:-ds_configs/zero3.json}
NUM_GPUS=${NUM_GPUS:-2}
RUNS=${RUNS:-runs}
rm -rf "$RUNS/demo-sft" "$RUNS/demo-dpo"  # the demo starts over; dpo_ds itself refuses to reuse a run dir
t1=$SECONDS
deepspeed --num_gpus "$NUM_GPUS" dpo_ds/train.py --ds "$DS" --config configs/demo_sft.yaml run_dir="$RUNS/demo-sft" "$@"
deepspeed --num_gpus "$NUM_GPUS" dpo_ds/train.py --ds "$DS" --config configs/demo_dpo.yaml run_dir="$RUNS/demo-dpo" \
    model.archive="$RUNS/demo-sft/LATEST/policy.pt" "$@"
python -m dpo_ds.demo.evaluate --sft "$RUNS/demo-sft/LATEST" --dpo "$RUNS/demo-dpo/LATEST" --json "$RUNS/demo-table.json" \
    && ok=1 || ok=0
python -m dpo_ds.plot "$RUNS/demo-dpo" >/dev/null && echo "curves: $RUNS/demo-dpo/curves.png"
echo "setup ${setup_s} s; training + evaluation $((SECONDS - t1)) s"
[ "$ok" = 1 ]
