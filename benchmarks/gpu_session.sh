#!/usr/bin/env bash
# Issue 8's GPU measurements on the lent box in as few device calls as the 64 MiB-per-call carry allows.
#
# The box has torch and transformers but no hub, no `gguf` and no `simpy`; SmolLM2-135M's GGUF (92 MiB) travels in
# two chunks, one per call, and the machine stays warm only 30 s after a call, so issue call 2 right after call 1
# (prepare both calls' arguments beforehand; `bench` exits with 3 at once if the box went back in between).
# Everything a call measures is written under $OUT as it goes (a run cut short keeps its rows).
#
#   here:    bash benchmarks/gpu_session.sh prepare        # .carry/smollm2-135m/part-00{0,1} + manifest, .carry/wheels
#   call 1:  bash benchmarks/gpu_session.sh stage          # carry: .carry/smollm2-135m/part-000
#                                                          #        .carry/smollm2-135m/manifest.json
#   call 2:  bash benchmarks/gpu_session.sh bench          # carry: .carry/smollm2-135m/part-001
#                                                          #        .carry/smollm2-135m/manifest.json  .carry/wheels
#            (timeout_s 600: SmolLM2 rows + match rates, then the 7B shape, each under its own time budget)
#   call 3 (optional, warm box, time left):  bash benchmarks/gpu_session.sh calibrate   # no carry: reuses /tmp
#
# Then here: copy the JSON files from the call's files_at to benchmarks/results/ (named by card) and commit them.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=smollm2-135m
PARTS=/tmp/parts
GGUF=/tmp/smollm2.gguf
SITE=/tmp/site
OUT=${OUT:-/tmp/out}
SMOLLM2_BUDGET_S=${SMOLLM2_BUDGET_S:-250}  # cases that would start later are kept as skipped rows
LLAMA7B_BUDGET_S=${LLAMA7B_BUDGET_S:-150}

environment() {
  mkdir -p "$OUT"
  if [ -d .carry/wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .carry/wheels/*.whl
  fi
  export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1 EESD_CACHE_DIR=/tmp/eesd_cache
}

case "${1:-}" in
  prepare)
    python benchmarks/carry_model.py split "$MODEL" --chunk-mib 50
    mkdir -p .carry/wheels
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d .carry/wheels "gguf==0.19.0" "simpy==4.1.2"
    ls -la .carry/"$MODEL" .carry/wheels
    ;;
  stage)
    mkdir -p "$PARTS"
    cp .carry/"$MODEL"/* "$PARTS"/
    ls -la "$PARTS"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    ;;
  bench)
    if [ ! -f "$PARTS/part-000" ]; then
      echo "no $PARTS/part-000: the box went back between calls (idle > 30 s); run 'stage' then 'bench' again" >&2
      exit 3
    fi
    cp .carry/"$MODEL"/* "$PARTS"/
    environment
    python3 benchmarks/carry_model.py join "$PARTS" "$GGUF"
    set +e
    timeout $((SMOLLM2_BUDGET_S + 90)) python3 benchmarks/gpu_decode.py --models smollm2 --model-path "$GGUF" \
      --time-budget-s "$SMOLLM2_BUDGET_S" --out "$OUT/gpu_decode_smollm2.json" 2>&1 | tee "$OUT/bench_smollm2.log"
    timeout $((LLAMA7B_BUDGET_S + 60)) python3 benchmarks/gpu_decode.py --models llama7b \
      --time-budget-s "$LLAMA7B_BUDGET_S" --out "$OUT/gpu_decode_llama7b.json" 2>&1 | tee "$OUT/bench_llama7b.log"
    ;;
  calibrate)
    [ -f "$GGUF" ] || { echo "no $GGUF: run 'stage' and 'bench' first on the same warm box" >&2; exit 3; }
    environment
    timeout "${CALIBRATE_S:-240}" python3 -m executor.cli calibrate latency --model "$GGUF" --device cuda \
      --out "$OUT" --no-progress 2>&1 | tee "$OUT/calibrate.log" || true
    ;;
  *)
    echo "usage: $0 prepare | stage | bench | calibrate" >&2
    exit 2
    ;;
esac
