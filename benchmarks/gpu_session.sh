#!/usr/bin/env bash
# Issue 8's GPU measurements on the lent box in two device calls (the 64 MiB-per-call carry limit).
#
# The box has torch and transformers but no hub, no `gguf` and no `simpy`; SmolLM2-135M's GGUF (92 MiB) travels in
# two chunks, one per call, and the machine stays warm only 30 s after a call, so issue call 2 right after call 1
# (prepare both calls' arguments beforehand; `smollm2` exits with 3 at once if the box went back in between). Call 1
# does useful work on its own (the 7B shape needs no weights), so a lost box between calls still leaves its figures.
# Everything a call measures is written under $OUT as it goes (a run cut short keeps its rows).
#
#   here:    bash benchmarks/gpu_session.sh prepare        # .carry/smollm2-135m/part-00{0,1} + manifest, .carry/wheels
#   call 1:  bash benchmarks/gpu_session.sh llama7b        # carry: .carry/smollm2-135m/part-000
#                                                          #        .carry/smollm2-135m/manifest.json  .carry/wheels
#            (stages part 0; the 7B-shape rows, then a 4-layer 7B-shape latency profile; ~4 min)
#   call 2:  bash benchmarks/gpu_session.sh smollm2        # carry: .carry/smollm2-135m/part-001
#                                                          #        .carry/smollm2-135m/manifest.json  .carry/wheels
#            (SmolLM2 rows + match rates, then its latency profile; ~7 min: timeout_s 600)
#
#   the H100 lease (session 7): final1 (carry as call 1, timeout_s 250), then at once final2 (carry as call 2,
#   timeout_s 260): the GPU tests, every 7B and SmolLM2 row with compiled layers, fused and unfused, a bf16 trace.
#   The next lease (what is still missing): next1 (carry as call 1, timeout_s 330), then at once next2 (carry as
#   call 2, timeout_s 290): EESD beta-ts with its zero-draft rounds chained, PPSD with its transition compiled, H100
#   latency profiles for the simulator, a kernel profile of the 7B shape's AR step.
#
# Then here: copy the files from each call's files_at to benchmarks/results/ (JSON, named by card) and
# calibration/<card>/ (profiles), and commit them.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=smollm2-135m
PARTS=/tmp/parts
GGUF=/tmp/smollm2.gguf
SITE=/tmp/site
OUT=${OUT:-/tmp/out}
SMOLLM2_BUDGET_S=${SMOLLM2_BUDGET_S:-220}  # cases that would start later are kept as skipped rows
LLAMA7B_BUDGET_S=${LLAMA7B_BUDGET_S:-110}

environment() {
  mkdir -p "$OUT"
  if [ -d .carry/wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .carry/wheels/*.whl
  fi
  export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1 EESD_CACHE_DIR=/tmp/eesd_cache
}

first_call() {  # a call 1: keep the carried part 0 in /tmp for call 2
  mkdir -p "$PARTS"
  cp .carry/"$MODEL"/* "$PARTS"/
  environment
}

second_call() {  # a call 2 ($1 names its call 1): part 1 joins part 0 into the GGUF
  if [ ! -f "$PARTS/part-000" ]; then
    echo "no $PARTS/part-000: the box went back between calls (idle > 30 s); run '$1' then '$2' again" >&2
    exit 3
  fi
  cp .carry/"$MODEL"/* "$PARTS"/
  environment
  python3 benchmarks/carry_model.py join "$PARTS" "$GGUF"
}

case "${1:-}" in
  prepare)
    python benchmarks/carry_model.py split "$MODEL" --chunk-mib 50
    mkdir -p .carry/wheels
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d .carry/wheels "gguf==0.19.0" "simpy==4.1.2"
    ls -la .carry/"$MODEL" .carry/wheels
    ;;
  llama7b)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    first_call
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    set +e
    timeout $((LLAMA7B_BUDGET_S + 60)) python3 benchmarks/gpu_decode.py --models llama7b \
      --time-budget-s "$LLAMA7B_BUDGET_S" --out "$OUT/gpu_decode_llama7b.json" 2>&1 | tee "$OUT/bench_llama7b.log"
    timeout "${CALIBRATE_7B_S:-60}" python3 -m executor.cli calibrate latency --model Llama-2-7B --layers 4 \
      --device cuda --graphs on --batch 1 --context 128,512,1024,2048 --out "$OUT" --no-progress \
      2>&1 | tee "$OUT/calibrate_llama7b.log"
    ls -la "$PARTS"
    ;;
  smollm2)
    second_call llama7b smollm2
    set +e
    timeout $((SMOLLM2_BUDGET_S + 80)) python3 benchmarks/gpu_decode.py --models smollm2 --model-path "$GGUF" \
      --time-budget-s "$SMOLLM2_BUDGET_S" --out "$OUT/gpu_decode_smollm2.json" 2>&1 | tee "$OUT/bench_smollm2.log"
    timeout "${CALIBRATE_S:-90}" python3 -m executor.cli calibrate latency --model "$GGUF" --device cuda \
      --graphs on --batch 1 --context 128,512,1024,2048 --out "$OUT" --no-progress 2>&1 | tee "$OUT/calibrate.log"
    ;;
  check)  # a second session's call 1: stage part 0, then the captured decoders against HF on the GPU (float64)
    first_call
    set +e
    timeout "${CHECK_S:-120}" python3 -m pytest -p no:cacheprovider -v -x tests/test_gpu.py \
      --junitxml="$OUT/test_gpu.xml" 2>&1 | tee "$OUT/test_gpu.log"
    ;;
  compile)  # its call 2: SmolLM2 rows with torch.compile, match rates in float32 first
    second_call check compile
    set +e
    timeout $((SMOLLM2_BUDGET_S + 60)) python3 benchmarks/gpu_decode.py --models smollm2 --model-path "$GGUF" \
      --captures compile --match-dtypes float32 --match-first --time-budget-s "$SMOLLM2_BUDGET_S" \
      --out "$OUT/gpu_decode_smollm2_compile.json" 2>&1 | tee "$OUT/bench_smollm2_compile.log"
    ;;
  next1)  # the next lease's call 1 (part 0), <= 320 s: the GPU tests, the 7B shape's latency profile (graphs) for the
          # simulator, its AR and forced-alpha rows with compiled layers (the default), then a kernel profile of its
          # AR step (where the 22% to the HBM floor goes)
    first_call
    set +e
    timeout 120 python3 -m pytest -p no:cacheprovider -q tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/test_gpu.log"
    timeout 60 python3 -m executor.cli calibrate latency --model Llama-2-7B --layers 4 --device cuda --graphs on \
      --batch 1 --context 128,512,1024,2048 --out "$OUT" --no-progress 2>&1 | tee "$OUT/calibrate_llama7b.log"
    timeout 80 python3 benchmarks/gpu_decode.py --models llama7b --captures compile-layers,graph \
      --only '^hf generate|^ours ar$|forced alpha' --time-budget-s 50 \
      --out "$OUT/gpu_decode_llama7b.json" 2>&1 | tee "$OUT/bench_llama7b.log"
    timeout 50 python3 benchmarks/kernel_profile.py --model llama7b --capture compile-layers \
      --out "$OUT/kernel_profile_llama7b.json" 2>&1 | tee "$OUT/kernel_profile_llama7b.log"
    ;;
  next2)  # its call 2 (part 1), <= 280 s: SmolLM2's EESD rows (beta-ts now chains its zero-draft rounds), AR and
          # PPSD n=2, 4 (its transition now compiled) with compiled layers, the graph rows for sim_vs_gpu.py, float32
          # match rates of the default (compiled layers, fused) against HF and uncompiled AR; then its latency profile
    second_call next1 next2
    set +e
    timeout 170 python3 benchmarks/gpu_decode.py --models smollm2 --model-path "$GGUF" --captures compile-layers,graph \
      --match-dtypes float32 --match-prompts 6 --only '^hf generate|^ours ar$|^eesd|^ppsd streams n=[24]$' \
      --time-budget-s 130 \
      --out "$OUT/gpu_decode_smollm2.json" 2>&1 | tee "$OUT/bench_smollm2.log"
    timeout 90 python3 -m executor.cli calibrate latency --model "$GGUF" --device cuda --graphs on --batch 1 \
      --context 128,512,1024,2048 --out "$OUT" --no-progress 2>&1 | tee "$OUT/calibrate.log"
    ;;
  final1)  # session 7's call 1 (part 0), <= 250 s: the GPU tests (captured passes now fuse q/k/v and gate/up), then
           # the 7B shape: HF, our AR with compiled layers (fused and unfused), forced alpha, then graphs and compile
    first_call
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    set +e
    timeout 110 python3 -m pytest -p no:cacheprovider -q -x tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/test_gpu.log"
    timeout 130 python3 benchmarks/gpu_decode.py --models llama7b --captures compile-layers,graph,compile \
      --only '^hf generate|^ours ar$|^ours ar unfused$|forced alpha' --time-budget-s 95 \
      --out "$OUT/gpu_decode_llama7b.json" 2>&1 | tee "$OUT/bench_llama7b.log"
    ;;
  final2)  # its call 2 (part 1), <= 280 s: every SmolLM2 row with compiled layers (HF anchors, fused and unfused AR,
           # EESD, PPSD), bf16 match rates, the graph rows; then a bf16 acceptance trace (its check reported)
    second_call final1 final2
    set +e
    timeout 180 python3 benchmarks/gpu_decode.py --models smollm2 --model-path "$GGUF" \
      --captures compile-layers,graph --match-prompts 8 --only '^(?!.*sync_every)' --time-budget-s 140 \
      --out "$OUT/gpu_decode_smollm2.json" 2>&1 | tee "$OUT/bench_smollm2.log"
    timeout 70 python3 -m executor.cli calibrate acceptance --model "$GGUF" --device cuda --dtype bf16 \
      --exit-layers 8,15,22 --prompts builtin --num-prompts 24 --max-new-tokens 48 --no-progress \
      --out "$OUT/acceptance_smollm2-135m_shared_builtin_cuda_bf16.csv" 2>&1 | tee "$OUT/trace.log"
    ;;
  *)
    echo "usage: $0 prepare | llama7b | smollm2 | check | compile | next1 | next2 | final1 | final2" >&2
    exit 2
    ;;
esac
