#!/usr/bin/env bash
# Quickstart main job: set up, then SFT -> DPO on the bundled demo through the real deepspeed
# launcher (2 ranks; CPU ranks on a machine without GPUs), then the before/after table.
#   bash demo.sh                   # DS=zero2 bash demo.sh for ZeRO-2
#   LORA=1 bash demo.sh            # DPO with LoRA adapters on the same SFT checkpoint (the demo_dpo_lora recipe)
set -euo pipefail
cd "$(dirname "$0")"
t0=$SECONDS
bash scripts/setup.sh
. .venv/bin/activate
setup_s=$((SECONDS - t0))
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
DS=${DS:-zero3}
NUM_GPUS=${NUM_GPUS:-2}
RUNS=${RUNS:-runs}
if [ "${LORA:-0}" = 1 ]; then DPO=demo-dpo-lora; else DPO=demo-dpo; fi
rm -rf "$RUNS/demo-sft" "$RUNS/$DPO"  # the demo starts over; dpo_ds itself refuses to reuse a run dir
t1=$SECONDS
dpo-ds train --gpus "$NUM_GPUS" --ds "$DS" --config demo_sft run_dir="$RUNS/demo-sft" "$@"
dpo-ds train --gpus "$NUM_GPUS" --ds "$DS" --config "${DPO//-/_}" run_dir="$RUNS/$DPO" \
    model.archive="$RUNS/demo-sft/LATEST/policy.pt" "$@"
python -m dpo_ds.demo.evaluate --sft "$RUNS/demo-sft/LATEST" --dpo "$RUNS/$DPO/LATEST" --json "$RUNS/$DPO-table.json" \
    && ok=1 || ok=0
python -m dpo_ds.plot "$RUNS/$DPO" >/dev/null && echo "curves: $RUNS/$DPO/curves.png"
echo "setup ${setup_s} s; training + evaluation $((SECONDS - t1)) s"
[ "$ok" = 1 ]
