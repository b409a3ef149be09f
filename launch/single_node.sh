#!/usr/bin/env bash
# One node, all its GPUs (or CPU ranks), SFT then DPO.
#   bash launch/single_node.sh [NUM_GPUS] [DS_JSON] [key=value ...]
# e.g. bash launch/single_node.sh 8 ds_configs/zero3.json model.name_or_path=/models/llama-3-8b datasets=[hh]
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${1:-8}; DS=${2:-ds_configs/zero3.json}; shift $(( $# >= 2 ? 2 : $# ))
EXP=${EXP:-$(date +%Y%m%d-%H%M%S)}
# Single-node NCCL usually needs nothing; on PCIe boxes without NVLink P2P may need disabling:
# export NCCL_P2P_DISABLE=1
export TOKENIZERS_PARALLELISM=false
deepspeed --num_gpus "$NUM_GPUS" dpo_ds/train.py --ds "$DS" loss=sft exp_name="sft-$EXP" "$@"
deepspeed --num_gpus "$NUM_GPUS" dpo_ds/train.py --ds "$DS" loss=dpo loss.beta=0.1 exp_name="dpo-$EXP" \
    model.archive="runs/sft-$EXP/LATEST/policy.pt" "$@"
