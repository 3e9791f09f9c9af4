#!/usr/bin/env bash
# On the GPU machine (no network): install the wheels carried in gpu_payload/wheels, say which
# imports fail, then run benchmarks/gpu_evidence.py with its outputs under $OUT (or gpu_out/).
# Prepared beforehand with: python benchmarks/gpu_data.py --data-dir ~/data --out gpu_payload --wheels
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps --find-links gpu_payload/wheels torchopt optree graphviz \
    2>&1 | tail -2
python - <<'PY'
import importlib.util, sys, torch
need = ("torch", "torchvision", "timm", "torchopt", "optree", "graphviz", "sklearn", "matplotlib", "tqdm")
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "missing:", missing or "none")
PY
PYTHONPATH=. python benchmarks/gpu_evidence.py --data-dir gpu_payload/data \
    --out "$OUT/gpu_evidence.json" --work /tmp/gpu_runs "$@"
