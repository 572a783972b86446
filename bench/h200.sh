#!/usr/bin/env bash
# One device call: install, check correctness on the GPU, then time prefill variants.
# Usage (repo root, on the GPU machine): bash bench/h200.sh "<ttft variants>" "<lengths>"
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -c 'import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())' | tee "$OUT/versions.txt"
if [ "${CHECK:-1}" = 1 ]; then
  python3 bench/gpu_check.py 2>&1 | grep -v Warning | tee "$OUT/gpu_check.log"
fi
python3 bench/ttft.py --out "$OUT" --variants "$1" --lengths "$2" 2>&1 | grep -v -i warn | tee "$OUT/ttft.log"
