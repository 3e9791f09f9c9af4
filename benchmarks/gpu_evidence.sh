#!/usr/bin/env bash
# On the GPU machine (no network): install the wheels carried in gpu_payload/wheels, say which
# imports fail, then run benchmarks/gpu_evidence.py with its outputs under $OUT (or gpu_out/).
# Prepared beforehand with: python benchmarks/gpu_data.py --data-dir ~/data --out gpu_payload --wheels
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
# The machine's interpreter is python3; the wheels go to a folder of their own on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site gpu_payload/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY'
import importlib.util, sys, torch
need = ("torch", "torchvision", "timm", "torchopt", "optree", "graphviz", "sklearn", "matplotlib", "tqdm")
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "missing:", missing or "none")
PY
python3 benchmarks/gpu_evidence.py --data-dir gpu_payload/data \
    --out "$OUT/gpu_evidence.json" --work /tmp/gpu_runs "$@"
