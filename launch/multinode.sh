#!/usr/bin/env bash
# Several nodes with the DeepSpeed launcher and a hostfile (passwordless ssh + pdsh between nodes,
# the same checkout and Python environment at the same path on every node, a shared filesystem
# for train.run_dir and data.path).
#
#   HOSTFILE=launch/hostfile launch/multinode.sh CONFIG [--section.key=value ...]
#
# HOSTFILE (default launch/hostfile) lists "hostname slots=GPUS" per node; see hostfile.example.
# MASTER_ADDR defaults to the first host, MASTER_PORT to 29500. Run it on the first host.
# Each rank runs the installed `sinklm` entry point (SINKLM, default: the one on PATH of every node).
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: HOSTFILE=launch/hostfile $0 CONFIG [--section.key=value ...]" >&2
    exit 2
fi
CONFIG="$1"; shift
HOSTFILE="${HOSTFILE:-$(dirname "$0")/hostfile}"
if [[ ! -f "$HOSTFILE" ]]; then
    echo "$0: hostfile $HOSTFILE not found (copy launch/hostfile.example and edit it)" >&2
    exit 2
fi
FIRST_HOST="$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')"
SINKLM="${SINKLM:-sinklm}"
exec deepspeed --hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$FIRST_HOST}" \
    --master_port "${MASTER_PORT:-29500}" --no_python --no_local_rank "$SINKLM" train "$CONFIG" "$@"
