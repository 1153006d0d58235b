#!/usr/bin/env bash
# torchrun: N processes on this node (GPUs, or CPU processes with gloo), or several nodes.
#
#   launch/torchrun.sh CONFIG [--section.key=value ...]
#   NPROC=2 launch/torchrun.sh configs/experiments/quickstart-vanilla.yaml      # 2 CPU processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-001 launch/torchrun.sh CONFIG          # on each node
#
# NPROC defaults to the number of visible GPUs (1 on a CPU-only machine). Extra arguments go to
# `sinklm train` unchanged; rerunning resumes from the run folder. Each rank runs the installed
# `sinklm` entry point (SINKLM, default: the one on PATH), never `python -m`, so a data.py or
# pretrain/ in the working directory cannot shadow the package.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 CONFIG [--section.key=value ...]" >&2
    exit 2
fi
CONFIG="$1"; shift
GPUS="$(nvidia-smi -L 2>/dev/null | wc -l || true)"
NPROC="${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}"
NNODES="${NNODES:-1}"
PYTHON="${PYTHON:-python3}"
SINKLM="${SINKLM:-sinklm}"
if [[ "$NNODES" -gt 1 ]]; then
    RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK on each node}"
          --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first node}" --master_port "${MASTER_PORT:-29500}")
else
    RDZV=(--standalone)
fi
exec "$PYTHON" -m pretrain.torchrun "${RDZV[@]}" --nproc_per_node "$NPROC" --no-python "$SINKLM" train "$CONFIG" "$@"
