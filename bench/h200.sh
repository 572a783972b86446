#!/usr/bin/env bash
# One device call: install, check correctness on the GPU, then time prefill variants.
# Usage (repo root, on the GPU machine): bash bench/h200.sh "<ttft variants>" "<lengths>"
#   CHECK=0            skip bench/gpu_check.py
#   GPU_TESTS=1        run the CUDA-only tests (pytest -k cuda) of the kernels and the KV runtime
#   PROBE=1            run bench/recompile_probe.py (which guard recompiles per prompt length) once per
#                      mode in PROBE_MODES (flatten: default passes; noflatten: option flatten_linear=False)
#   REPS=n             ttft.py repetitions per length (default 3; REPS=1 to only fill the Inductor cache)
#   PROFILE_LENGTH=L   ttft.py also profiles one prefill per variant at length L (kernel time by category)
#   WARM="<variants>"  then time those variants again in a second process at the first length: with the
#                      Inductor cache the first process filled, its "first call s" is the warm-cache compile
#   SWEEP=1            time the decode attention kernel's launch parameters (bench/decode_attn_sweep.py)
#   E2E="<variants>"   afterwards run bench/e2e.py on those variants (E2E_LENGTHS, default 32768;
#                      E2E_ARGS: more bench/e2e.py arguments, e.g. "--static-max 65536"; E2E_TIMEOUT: seconds
#                      after which e2e.py is stopped, so that PACK still runs inside the device call's limit)
#   PACK=1             at the end, pack everything under $OUT into $OUT/all.tgz and delete the rest
#                      (the device returns only a few files per call)
# An empty ttft variant list skips bench/ttft.py.
# Throughout, nvidia-smi samples SM/memory clocks, power, temperature and utilisation twice a second
# into $OUT/smi.csv (UTC timestamps; e2e.py rows carry their start time to line up with it).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
SMI_PID=
if command -v nvidia-smi >/dev/null 2>&1; then
  TZ=UTC nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,memory.used \
    --format=csv,nounits -lms 500 >"$OUT/smi.csv" 2>/dev/null &
  SMI_PID=$!
fi
python3 -c 'import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())' | tee "$OUT/versions.txt"
if [ "${CHECK:-1}" = 1 ]; then
  python3 bench/gpu_check.py 2>&1 | grep -v Warning | tee "$OUT/gpu_check.log"
fi
if [ "${GPU_TESTS:-0}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_decode_attention.py tests/test_kv_runtime.py bench/test_scripts.py --tb=short 2>&1 | grep -v DEBUG | tail -40 | tee "$OUT/gpu_tests.log"
fi
if [ "${SWEEP:-0}" = 1 ]; then
  python3 bench/decode_attn_sweep.py --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/decode_attn_sweep.log"
fi
if [ "${PROBE:-0}" = 1 ]; then
  for mode in ${PROBE_MODES:-flatten}; do
    case $mode in
      noflatten) probe_flag="--no-flatten-linear" ;;
      *) probe_flag="" ;;
    esac
    python3 bench/recompile_probe.py --impl auto $probe_flag --lengths "${PROBE_LENGTHS:-6000,9000,13000}" 2>&1 | grep -v -i warn > "$OUT/probe_$mode.log"
    grep "compilations" "$OUT/probe_$mode.log" | sed "s/^/[$mode] /"
  done
fi
if [ -n "${1:-}" ]; then
  python3 bench/ttft.py --out "$OUT" --variants "$1" --lengths "$2" --reps "${REPS:-3}" ${PROFILE_LENGTH:+--profile-length $PROFILE_LENGTH} 2>&1 \
    | grep -v -i warn | tee "$OUT/ttft.log"
  if [ -n "${WARM:-}" ]; then
    mkdir -p "$OUT/warm"
    python3 bench/ttft.py --out "$OUT/warm" --variants "$WARM" --lengths "${2%%,*}" --reps 1 2>&1 | grep -v -i warn | tee "$OUT/warm/ttft.log"
  fi
  gzip -f "$OUT"/*_trace.json 2>/dev/null
fi
if [ -n "${E2E:-}" ]; then
  timeout "${E2E_TIMEOUT:-86400}" python3 bench/e2e.py --out "$OUT" --variants "$E2E" --lengths "${E2E_LENGTHS:-32768}" ${E2E_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/e2e.log"
  gzip -f "$OUT"/*_trace.json 2>/dev/null
fi
[ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null
if [ "${PACK:-0}" = 1 ]; then
  tar -czf /tmp/h200_all.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/h200_all.tgz "$OUT/all.tgz"
fi
