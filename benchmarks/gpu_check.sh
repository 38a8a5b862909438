#!/usr/bin/env bash
# One-GPU check of aipo_mp's GPU path on a machine with CUDA torch and no network:
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]     # e.g. --steps 20 --seq-length 2048
#
# 1. installs the wheels of `make gpu-wheels` (run there beforehand; gpu_wheels/ travels with the
#    working tree) into a folder on PYTHONPATH next to the machine's own CUDA torch;
# 2. runs benchmarks/gpu_check.py on one GPU with NCCL (world size 1): bf16 parity of Megatron vs
#    transformers logits on a tiny model; a checkpoint save and a resume; 20 bf16 training steps of
#    a Mistral-Large-shaped 2-layer slice with tokens/s, model TFLOP/s, MFU and peak GPU memory next
#    to the planner's estimate. Exit code 0 when every check passes; the summary JSON is written to
#    runs/gpu_check/summary.json (and copied to $OUT when that is set).
#
# Environment: PYTHON (python3), GPU_WHEELS (gpu_wheels/), GPU_SITE (/tmp/aipo_gpu_site).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 0
fi
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-$ROOT/gpu_wheels}
SITE=${GPU_SITE:-/tmp/aipo_gpu_site}
if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "error: no wheels in $WHEELS; run 'make gpu-wheels' on a machine with network and carry gpu_wheels/ along" >&2
  exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: $PY has no CUDA torch (or sees no GPU); run this on the GPU machine, or set PYTHON" >&2
  exit 2
fi
# Installed beside the machine's CUDA torch with --target + PYTHONPATH, not into a venv: a GPU
# machine's torch may itself live in a venv, which a --system-site-packages venv does not see
# (measured on the H200 machine: `No module named 'torch'`).
"$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
cd "$ROOT"
status=0
PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/gpu_check.py "$@" || status=$?
if [[ -n "${OUT:-}" && -f runs/gpu_check/summary.json ]]; then cp runs/gpu_check/summary.json "$OUT/"; fi
exit $status
