#!/usr/bin/env bash
# GPU check (docs/benchmarks.md, "GPU check"): CTRLGRPOTrainer/GRPOTrainer and CTRLTrainer/RLOOTrainer step-time
# ratios and the reference pass's completions/s on a randomly initialised ~0.5B Llama, bf16, 256-token completions.
# Fits in 8 minutes on one GPU with PyTorch and transformers installed; nothing is fetched. Other Python packages
# (trl, datasets, ...) are installed from wheels in .whl/ when that folder exists (benchmarks/gpu_wheels.sh makes it).
#
#   bash benchmarks/gpu_check.sh                 # writes $OUT/gpu_check.json (OUT defaults to benchmarks/results)
#   bash benchmarks/gpu_check.sh --tiny          # the same logic with a tiny model (CPU is fine)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's trl_infalign, whatever else is installed
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
# the script stops starting runs after --budget-s (400 s); the timeout is the hard stop, under 8 minutes
timeout 470 "$PYTHON" benchmarks/gpu_check.py --output "${OUT:-benchmarks/results}" "$@"
