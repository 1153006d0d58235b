#!/usr/bin/env bash
# Issue 16's GPU figures in one run (<= 8 minutes on one H100/H200): installs what the GPU image lacks,
# then the exactness checks, the decode benchmark, the training benchmark and a 50-step `sinklm train`
# per variant, and writes one JSON (with the machine description) under benchmarks/results/.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-smoke  # the same steps at toy sizes on a CPU (minutes; tests the script)
#
# Wheels: the GPU image has torch but not deepspeed, datasets or wandb, and no network. Build the
# folder on a machine that has network (same Python version and platform as the GPU image), then carry
# it (the device tool's `carry: [".whl"]`; /.whl/ is gitignored):
#   pip download --dest .whl --only-binary=:all: deepspeed datasets wandb
#   (deepspeed ships an sdist only: `pip wheel --no-deps --wheel-dir .whl deepspeed` builds its wheel)
# Environment: RESULTS (default benchmarks/results), STEPS (sinklm train steps, default 50).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
RESULTS=${RESULTS:-benchmarks/results}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
NAME=gpu-check-$STAMP
[[ $SMOKE == 1 ]] && NAME=cpu-smoke-$STAMP
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")  # everything is built here, moved at the end
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
began=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - began ))s] $*"; }

# ---- 1. dependencies ------------------------------------------------------------------------
missing=$(python - <<'EOF'
import importlib.util
print(" ".join(m for m in ("deepspeed", "datasets", "wandb") if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n "$missing" ]]; then
  [[ -d .whl ]] || { echo "gpu_check: missing $missing and no .whl folder (see the header)" >&2; exit 2; }
  say "installing $missing from .whl"
  python -m pip install --quiet --no-index --find-links .whl $missing
fi
command -v sinklm >/dev/null || python -m pip install --quiet --no-deps --no-build-isolation -e .

if [[ $SMOKE == 1 ]]; then
  DEVICE=cpu; SHAPES="tiny"; SIZES=64; FLAT=300; FLAT_CACHE=32; DECODE_STEPS=4
  EXACT_ARGS="--device cpu --shape tiny --no-compile --recent 8 --length 20"; STEPS=${STEPS:-3}
  TRAIN_BASE=configs/experiments/quickstart-vanilla.yaml; TRAIN_SINK=configs/experiments/quickstart-sink1.yaml
  TRAIN_ARGS="--data.seq_len=128 --data.text_tokens=126 --train.micro_batch_size=2"
  BENCH_TRAIN_ARGS="--device cpu --shape tiny --seq 128 --batch 2 --steps 2 --rounds 1 --warmup 1 --full-logits"
else
  DEVICE=cuda; SHAPES="pythia-14m pythia-160m"; SIZES=256,512,1024,2048,4096; FLAT=100000; FLAT_CACHE=1024; DECODE_STEPS=64
  EXACT_ARGS="--device cuda"; STEPS=${STEPS:-50}
  TRAIN_BASE=configs/experiments/paper-160m-vanilla.yaml; TRAIN_SINK=configs/experiments/paper-160m-sink1.yaml
  TRAIN_ARGS="--train.micro_batch_size=8 --train.global_batch_size=null --train.grad_accum_steps=1 --train.compile=auto"
  BENCH_TRAIN_ARGS="--device cuda --shape pythia-160m --dtype bf16 --seq 2048 --batch 8 --steps 10 --rounds 2 --compile --full-logits"
fi

# ---- 2. the machine -------------------------------------------------------------------------
python - "$WORK/machine.json" <<'EOF'
import json, os, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
EOF

# ---- 3. exactness ---------------------------------------------------------------------------
say "exactness checks"
python benchmarks/gpu_exactness.py $EXACT_ARGS --json "$WORK/exactness.json" || say "an exactness check FAILED (see exactness.json)"

# ---- 4. decode ------------------------------------------------------------------------------
for shape in $SHAPES; do
  say "decode benchmark $shape"
  dtype=bf16; [[ $SMOKE == 1 ]] && dtype=fp32
  flat=0; [[ $shape == "${SHAPES%% *}" ]] && flat=$FLAT  # the flat-latency run once
  python benchmarks/bench_stream_decode.py --device $DEVICE --shape $shape --dtype $dtype --sizes $SIZES \
    --steps $DECODE_STEPS --rounds 3 --flat-tokens $flat --flat-cache $FLAT_CACHE --json "$WORK/decode-$shape.json" | tail -n 12
done
# the Hugging Face route (inference/hf_cache, issue 17): its streaming benchmark, where the tree has it
if [[ -f benchmarks/bench_hf_stream.py ]]; then
  say "Hugging Face route streaming benchmark"
  hf_tokens=8192; [[ $SMOKE == 1 ]] && hf_tokens=256
  python benchmarks/bench_hf_stream.py --device $DEVICE --tokens $hf_tokens --json "$WORK/hf-stream.json" | tail -n 6 \
    || say "bench_hf_stream.py failed"
  # per-token decode on the HF route (issue 16): HFSinkCache vs the static step (eager/compile/graph) vs recompute
  # vs a dense cache; the 135M shape, and the paper's Llama-2-7B shape at cache 4+4092 in bf16 on the GPU
  if [[ $SMOKE == 1 ]]; then
    python benchmarks/bench_hf_stream.py --decode --baselines --device cpu --recent-size 60 --tokens 200 --decode-tokens 8 \
      --json "$WORK/hf-decode-135m.json" | tail -n 8 || say "bench_hf_stream.py --decode failed"
  else
    python benchmarks/bench_hf_stream.py --decode --baselines --device $DEVICE --dtype bf16 --json "$WORK/hf-decode-135m.json" \
      | tail -n 8 || say "bench_hf_stream.py --decode (135m) failed"
    python benchmarks/bench_hf_stream.py --decode --baselines --shape llama2-7b --device $DEVICE --dtype bf16 --recent-size 4092 \
      --tokens 4400 --decode-tokens 32 --json "$WORK/hf-decode-llama2-7b.json" | tail -n 8 \
      || say "bench_hf_stream.py --decode (llama2-7b) failed"
  fi
fi

# ---- 5. training benchmark ------------------------------------------------------------------
say "training benchmark"
python benchmarks/bench_train.py $BENCH_TRAIN_ARGS --json "$WORK/bench-train.json" | tail -n 10

# ---- 6. sinklm train, 50 steps per variant --------------------------------------------------
DATA=$WORK/data
say "preparing the bundled books"
sinklm data prepare --out "$DATA" --no-progress | tail -n 1
for variant in vanilla softmax1 sink_logit sink1; do
  config=$TRAIN_BASE; extra=""
  case $variant in
    softmax1|sink_logit) extra="--model.attention=$variant" ;;
    sink1) config=$TRAIN_SINK ;;
  esac
  say "sinklm train $variant ($STEPS steps)"
  sinklm train "$config" --data.path="$DATA" --train.run_dir="$WORK/run-$variant" --train.max_steps=$STEPS \
    --train.eval_every=0 --train.eval_batches=1 --checkpoint.every=0 --checkpoint.save_at_end=false \
    --logging.log_every=10 --fresh $TRAIN_ARGS $extra 2>&1 | grep -E "^(step|model|done)" | tail -n 4
done

# ---- 7. one JSON ----------------------------------------------------------------------------
python benchmarks/gpu_check_collect.py "$WORK" "$WORK/$NAME.json" --skip-steps $(( STEPS / 5 ))
mkdir -p "$RESULTS"
mv "$WORK/$NAME.json" "$RESULTS/$NAME.json"
say "wrote $RESULTS/$NAME.json (work files in $WORK)"
