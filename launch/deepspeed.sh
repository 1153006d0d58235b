#!/usr/bin/env bash
# One node, N GPUs, with the DeepSpeed launcher.
#
#   launch/deepspeed.sh CONFIG [--section.key=value ...]
#   NUM_GPUS=4 launch/deepspeed.sh configs/experiments/paper-160m-sink1.yaml --train.micro_batch_size=8
#
# NUM_GPUS defaults to every visible GPU; MASTER_PORT to 29500. Extra arguments go to `sinklm train`
# unchanged (overrides, --resume, --fresh). Rerunning the same command resumes from the run folder.
# Each rank runs the installed `sinklm` entry point (SINKLM, default: the one on PATH), never
# `python -m`, so a data.py or pretrain/ in the working directory cannot shadow the package.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 CONFIG [--section.key=value ...]" >&2
    exit 2
fi
CONFIG="$1"; shift
NUM_GPUS="${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
if [[ "$NUM_GPUS" -lt 1 ]]; then
    echo "$0: no GPU found (set NUM_GPUS, or use launch/torchrun.sh for CPU runs)" >&2
    exit 2
fi
SINKLM="${SINKLM:-sinklm}"
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
    --no_python --no_local_rank "$SINKLM" train "$CONFIG" "$@"
