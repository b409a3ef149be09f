#!/usr/bin/env bash
# One node, all its GPUs (or CPU ranks), SFT then DPO on the SFT run's LATEST.
#   bash launch/single_node.sh [NUM_GPUS] [DS_JSON] [key=value ...] [--sft key=value ...] [--dpo key=value ...]
# Keys before any marker go to both runs (model, data, lengths, batch sizes); keys after --sft go to the
# SFT run only, keys after --dpo to the DPO run only (the markers may come in either order, and the last
# value of a key wins). SFT and DPO usually want different learning rates: give each its own.
#   bash launch/single_node.sh 8 ds_configs/zero3.json model.name_or_path=/models/llama-3-8b datasets=[hh] \
#       --sft lr=1e-5 --dpo lr=5e-7 loss.beta=0.1
# The runs are runs/sft-$EXP and runs/dpo-$EXP (EXP: now, unless set); DRY_RUN=1 prints the two commands
# instead of running them; MASTER_PORT=N picks the rendezvous port (default 29500: two jobs on one
# machine need two ports).
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${1:-8}; DS=${2:-ds_configs/zero3.json}; shift $(( $# >= 2 ? 2 : $# ))
if ! [[ $NUM_GPUS =~ ^[0-9]+$ ]]; then
    echo "launch/single_node.sh: NUM_GPUS must be a number, got '$NUM_GPUS'" \
        "(usage: bash launch/single_node.sh NUM_GPUS DS_JSON key=value ... --sft ... --dpo ...)" >&2
    exit 2
fi
if [[ $DS == *=* || $DS == --* ]]; then
    echo "launch/single_node.sh: the 2nd argument is the DeepSpeed JSON, got '$DS'" \
        "(usage: bash launch/single_node.sh NUM_GPUS DS_JSON key=value ... --sft ... --dpo ...)" >&2
    exit 2
fi
PORT=${MASTER_PORT:-29500}
COMMON=(); SFT=(); DPO=(); target=COMMON
for arg in "$@"; do
    case $arg in
        --sft) target=SFT ;;
        --dpo) target=DPO ;;
        *) eval "$target+=(\"\$arg\")" ;;
    esac
done
EXP=${EXP:-$(date +%Y%m%d-%H%M%S)}
# Single-node NCCL usually needs nothing; on PCIe boxes without NVLink P2P may need disabling:
# export NCCL_P2P_DISABLE=1
export TOKENIZERS_PARALLELISM=false
run() {
    if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}
# "${A[@]+"${A[@]}"}": an empty array under `set -u` on bash < 4.4
run deepspeed --num_gpus "$NUM_GPUS" --master_port "$PORT" dpo_ds/train.py --ds "$DS" loss=sft exp_name="sft-$EXP" \
    "${COMMON[@]+"${COMMON[@]}"}" "${SFT[@]+"${SFT[@]}"}"
run deepspeed --num_gpus "$NUM_GPUS" --master_port "$PORT" dpo_ds/train.py --ds "$DS" loss=dpo loss.beta=0.1 exp_name="dpo-$EXP" \
    model.archive="runs/sft-$EXP/LATEST" "${COMMON[@]+"${COMMON[@]}"}" "${DPO[@]+"${DPO[@]}"}"
