#!/usr/bin/env bash
# accelerate launch: `sinklm train` under accelerate's launcher, with its DeepSpeed plugin config.
#
#   launch/accelerate.sh CONFIG [--section.key=value ...]
#   ACCELERATE_CONFIG=configs/accelerate/zero3.yaml launch/accelerate.sh configs/experiments/quickstart-vanilla.yaml
#   NPROC=2 launch/accelerate.sh CONFIG                                   # override num_processes
#
# ACCELERATE_CONFIG (default configs/accelerate/zero2.yaml) is an `accelerate config` file with
# distributed_type DEEPSPEED; its deepspeed_config_file is handed to `sinklm train` as
# --deepspeed.config, so the engine runs exactly the plugin's DeepSpeed JSON (later overrides win).
# Same processes, ranks and results as launch/torchrun.sh. Each rank runs the installed `sinklm`
# entry point (SINKLM, default: the one on PATH), never `python -m`.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 CONFIG [--section.key=value ...]" >&2
    exit 2
fi
CONFIG="$1"; shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
SINKLM="${SINKLM:-sinklm}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$REPO/configs/accelerate/zero2.yaml}"
if [[ ! -f "$ACCELERATE_CONFIG" ]]; then
    echo "$0: ACCELERATE_CONFIG: expected an accelerate config file, found no file $ACCELERATE_CONFIG" >&2
    exit 2
fi
DS_JSON="$("$PYTHON" -c 'import sys, yaml; print((yaml.safe_load(open(sys.argv[1])).get("deepspeed_config") or {}).get("deepspeed_config_file") or "")' "$ACCELERATE_CONFIG")"
if [[ -z "$DS_JSON" ]]; then
    echo "$0: $ACCELERATE_CONFIG: expected deepspeed_config.deepspeed_config_file (the DeepSpeed plugin), found none" >&2
    exit 2
fi
if [[ "$DS_JSON" != /* && ! -f "$DS_JSON" ]]; then
    DS_JSON="$REPO/$DS_JSON"  # relative to the repository, wherever the run starts
fi
EXTRA=()
if [[ -n "${NPROC:-}" ]]; then EXTRA+=(--num_processes "$NPROC"); fi
exec "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" "${EXTRA[@]}" \
    --main_process_port "${MASTER_PORT:-29500}" --no_python "$SINKLM" train "$CONFIG" --deepspeed.config="$DS_JSON" "$@"
