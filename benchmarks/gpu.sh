#!/usr/bin/env bash
# The paper's stage 2 on a GPU, timed through Ray Train (benchmarks/gpu_stage.py); under 8 minutes.
#
#   bash benchmarks/gpu.sh          # on any machine; PYTHON=/path/to/python to pick the interpreter
#
# 1. CPU-only checks, everywhere: this script's and gpu_stage.py's syntax, the imports it needs
#    (TensorFlow, Ray Train, msbt), and a dry run (the stage-2 ResNet50 built and one train step at
#    32 px, no Ray).
# 2. Does TensorFlow see a GPU? If not: say "no GPU" and exit 0 (nothing to time here).
# 3. With a GPU: time stage 2 (ResNet50 at 200 px, batch 16, 525 images per epoch) in float32 and in
#    mixed precision with 1 Ray Train worker, and with 2 workers on the one GPU as a plumbing check;
#    print s/epoch, images/s and the projected 30-epoch stage time beside the paper's 400 s.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TF_CPP_MIN_LOG_LEVEL=2
started=$SECONDS

echo "== CPU-only checks"
bash -n "$0"
"$PY" -m py_compile benchmarks/gpu_stage.py
# one Python process: the imports, the dry run and TensorFlow's GPU count (each start imports TensorFlow)
dry=$("$PY" benchmarks/gpu_stage.py --dry-run) || { echo "$dry"; exit 1; }
echo "$dry" | grep -v '^gpus: '
gpus=$(echo "$dry" | sed -n 's/^gpus: //p')

echo "== GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
if [ "${gpus:-0}" = "0" ]; then
  echo "no GPU: TensorFlow sees no GPU on this machine; the CPU-only checks passed, nothing was timed."
  exit 0
fi
echo "TensorFlow sees $gpus GPU(s)"

echo "== stage 2 timings"
# The Python side keeps to a 420 s budget (skipping runs that would overrun); the hard stop leaves
# room for Ray to shut down inside 8 minutes.
timeout 450 "$PY" benchmarks/gpu_stage.py --budget 420
echo "gpu.sh finished in $((SECONDS - started)) s"
