#!/usr/bin/env bash
# Several nodes from a hostfile (DeepSpeed's format: "host slots=N" per line; see launch/hostfile.example).
# Run on the first node; the launcher reaches the others over passwordless ssh (pdsh).
#   bash launch/multi_node.sh HOSTFILE MASTER_ADDR [DS_JSON] [key=value ...]
# One run per call, its keys its own: SFT then DPO is two calls, e.g. loss=sft exp_name=sft lr=1e-5, then
# loss=dpo exp_name=dpo lr=5e-7 model.archive=runs/sft/LATEST (launch/single_node.sh does both in one).
# Without ssh, start it on every node yourself with the same arguments plus
#   --no_ssh --node_rank R   (R = 0 on MASTER_ADDR, 1.. on the others); set NO_SSH=1 NODE_RANK=R here.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=$1; MASTER_ADDR=$2; DS=${3:-ds_configs/zero3.json}; shift $(( $# >= 3 ? 3 : $# ))
MASTER_PORT=${MASTER_PORT:-29500}
# NCCL on clusters: name the fabric interface, keep InfiniBand on, log once when debugging.
# export NCCL_SOCKET_IFNAME=eth0         # interface that reaches the other nodes (not lo/docker0)
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters; NCCL_IB_DISABLE=1 only on Ethernet-only clusters
# export NCCL_DEBUG=INFO                 # once, to see which transport NCCL picked
# Variables named in .deepspeed_env (one KEY=VALUE per line, in $HOME or cwd) reach every node.
export TOKENIZERS_PARALLELISM=false
EXTRA=()
if [ "${NO_SSH:-0}" = 1 ]; then EXTRA=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK}"); fi
deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${EXTRA[@]}" \
    dpo_ds/train.py --ds "$DS" "$@"
