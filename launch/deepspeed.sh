#!/usr/bin/env bash
# One node, N GPUs, with the DeepSpeed launcher.
#
#   launch/deepspeed.sh CONFIG [--section.key=value ...]
#   NUM_GPUS=4 launch/deepspeed.sh configs/experiments/paper-160m-sink1.yaml --train.micro_batch_size=8
#
# NUM_GPUS defaults to every visible GPU; MASTER_PORT to 29500. Extra arguments go to `sinklm train`
# unchanged (overrides, --resume, --fresh). Rerunning the same command resumes from the run folder.
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
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
    --module pretrain.train "$CONFIG" "$@"
