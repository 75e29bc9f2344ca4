#!/usr/bin/env bash
# The GPU runbook: each lease's measurements in device calls of <= 450 s (two a lease: the 64 MiB-per-call carry limit).
#
# The box has torch and transformers but no hub, no `gguf`, no `simpy` and no `pydantic` (they travel as wheels);
# SmolLM2-135M's GGUF (92 MiB) travels in two chunks, one per call, and the machine stays warm only 30 s after a call,
# so issue a call 2 right after its call 1 (prepare both calls' arguments beforehand; a call 2 exits with 3 at once if
# the box went back in between). A call 1 does useful work on its own (the 7B shape needs no weights), so a lost box
# between calls still leaves its figures. Everything a call measures is written under $OUT as it goes (a run cut
# short keeps its rows).
#
#   here:    bash benchmarks/gpu_session.sh prepare        # .carry/smollm2-135m/part-00{0,1} + manifest, .carry/wheels,
#                                                          # .carry/corpora (the CPU corpora, where built here)
# The tracked tree travels too and must leave room under 64 MiB: move heads/*.safetensors (164 MB) out of the tree for
# the calls (`mkdir -p /work/heads-stash && mv heads/*.safetensors /work/heads-stash/`) and back after.
#
# The next lease (an H200: the predictions exist for that card only, so name kind nvidia-h200 in the first run call,
# whose default is an H100; issues 22 and 19): call 1 `lease20a` (timeout_s
# 280: the 7B shape in compile-layers at prompts 512 and 1024, as predicted in
# benchmarks/results/predictions_next_lease_2026-12-04.json), then at once call 2 `lease20b T` with T = the budget
# left minus 60 s (timeout_s T + 25; carry part-001, the manifest, the wheels, .carry/corpora): `eesd validate` on
# scenarios/smollm2_h200-compiled_validate.yaml as predicted, head training's phase profile with the causal head path
# and its cached twin (each with its 25 costliest operators; on the answer-opening corpora `prepare` carries: none
# carried, none profiled; build one into /work/corpora first, docs/heads.md's SELF64B command, ~10 min here), SmolLM2's
# end-to-end AR over 8 prompt lengths with prefill buckets on and off and reading every token back (AR's host read in
# compile-layers, which docs/serving.md needs), its compiled latency profile at batch 1 and 8.
# Then: python benchmarks/predictions_check.py --predictions benchmarks/results/predictions_next_lease_2026-12-04.json
# --card h200-compiled --measured <the gpu_decode_*.json and validate_*.json of both calls> (it refuses the others).
#
# Issue 20's GPU side (the serving simulator against the executor's captured serving on the card): any call 1, then
# at once `serving20 T` (T = the budget left minus 60, at least 415; timeout_s T + 25; carry part-001, the manifest and
# the wheels): the card's serving profile, trace and EESD round costs, then the CPU serving cases at 20x the rates, each run's own pass
# costs with them (`DEVICE=cpu bash benchmarks/gpu_session.sh serving20` smokes it here). Then write up
# $OUT/serving_<card>.json as docs/results/serving.md's CPU runs are.
#
# Issue 19's last GPU target (Qwen2.5-Coder-0.5B: a head trained on the GPU, EESD against our compiled AR) fills a
# lease of its own: here `python benchmarks/carry_model.py split qwen2.5-coder-0.5b --chunk-mib 47` (10 chunks in
# .carry/qwen2.5-coder-0.5b/), then 10 calls `stage qwen2.5-coder-0.5b` (timeout_s 30, each carrying one chunk and
# the manifest, each right after the last: the box keeps /tmp only while warm), then `qwen19 T` (T = the budget left
# minus 60, at most 540; carry .carry/wheels, the tree with only the two Qwen head files left in heads/).
#
# The 2026-12-04 evening lease (an H200; issues 22, 24, 19): call 1 `lease19a` (timeout_s 270: predict1's 7B rows at
# prompts 512 and 1024, as predicted on 2026-12-03), then at once call 2 `lease19b T` with T = the budget left minus
# 60 s (timeout_s T + 25; carry part-001, the manifest, the wheels and .carry/corpora): predict2's `eesd validate`,
# a phase profile of head training, SmolLM2's AR against HF's fast path.
#
# A later lease (issues 19 and 22): call 1 `next1` (timeout_s 300: the GPU tests, which now cover per-row seeds in
# captured passes; the 7B shape's compiled latency profile on this card, which no H200 profile has; a kernel profile
# at a 4k context), then at once call 2 `heads19 T` with T = the budget left minus 110 s (timeout_s T + 55; carry
# part-001, the manifest and the wheels; leave INIT_HEADS and the 16k subset file in heads/, 63.3 MiB, so no
# .carry/corpora fits beside them (2026-12-06 sizes: the tree 6.6 MiB, part-001 46.8): two
# corpus builders with captured passes and a seed per row, a phase profile of training steps, the shipped heads
# trained on in the budget, their decode speed against our compiled AR.
#
# The 2026-12-04 H200 lease ran `lease18a` + `heads19 450` (docs/results/h200-lease3.md). Before it, the plan was
# (issue 24: comparisons a skeptic accepts): HF `generate` as it comes and on its fast path (static
# cache, compiled by generate) beside ours in the same process, HF and ours making the same 128 new tokens on the same
# 8 prompts a row (the tokens each run made are recorded), the spread over prompts, the memory floor at the copy
# bandwidth measured in the run and at the datasheet's, our AR step at a short context in a 256- and a 4096-slot cache
# (with the executor's attention span buckets on and off, where it has them). Predictions for every row of ours,
# committed before the lease: benchmarks/results/predictions_issue24_2026-12-03.json (`python
# benchmarks/sim_vs_gpu.py --predict issue24`; each row names its command, and the --only patterns below are its).
# Device time: a start (1-2 min) + issue24a (<= 420 s, ~7 min) + issue24b (<= 230 s, ~4 min) + transfers, about
# 13-14 min of the 15; rows that would start past a step's --time-budget-s are kept as skipped rows.
#   call 1:  bash benchmarks/gpu_session.sh issue24a       # carry: .carry/smollm2-135m/part-000
#                                                          #        .carry/smollm2-135m/manifest.json  .carry/wheels
#            (timeout_s 450; stages part 0; the 7B shape, random weights, 8 random prompts x 128 new tokens:
#            at prompt 32 (~250 s): our AR, HF as it comes (~35 s: host-bound, ~28 ms a token) and on its fast path
#            (the compile dominates: ~60-120 s), our step in the 256 and 4096 caches, EESD E=16 fixed:3 at forced
#            alpha 0.5 / 0.7 / 0.9 (~40 s), PPSD streams n = 2 and 4 (~30 s); at prompt 3840 (~170 s): our AR, HF as
#            it comes and fast (a second compile), our step in the 4096 cache, EESD alpha 0.7, PPSD n = 2)
#   call 2:  bash benchmarks/gpu_session.sh issue24b       # carry: .carry/smollm2-135m/part-001
#                                                          #        .carry/smollm2-135m/manifest.json  .carry/wheels
#            (timeout_s 250; SmolLM2 bf16 on the first 8 built-in prompts x 128 new tokens (~150 s): our AR, HF as
#            it comes (~25 s) and fast (~60 s with its compile), EESD shared E=15 fixed:3 and beta-ts, PPSD streams
#            n = 2; no match rates)
#   Both in the capture mode of the card's profile (compile-layers on an H100, graph on an H200), as predicted.
#
# Earlier plans, for a later lease: the predictions committed before the lease (docs/results/next-lease-predictions.md,
# benchmarks/results/predictions_next_lease_2026-12-03.json), measured with the commands they name, unchanged, on
# whichever card the lease lends (H100 or H200: `card` below picks its rows; another card has none and exits 4):
#   call 1:  bash benchmarks/gpu_session.sh predict1       # carry: .carry/smollm2-135m/part-000
#                                                          #        .carry/smollm2-135m/manifest.json  .carry/wheels
#            (timeout_s 300; stages part 0; the 7B shape, random weights, 128 new tokens, at prompt lengths 512 and
#            1024: our AR, EESD E=16 fixed:3 at forced alpha 0.5 / 0.7 / 0.9, PPSD streams n = 2 and 4, in the
#            capture mode the card's rows name: compile-layers on an H100, graph on an H200)
#   call 2:  bash benchmarks/gpu_session.sh predict2       # carry: .carry/smollm2-135m/part-001
#                                                          #        .carry/smollm2-135m/manifest.json  .carry/wheels
#            (timeout_s 270; SmolLM2 bf16 through `eesd validate scenarios/smollm2_<card>_validate.yaml --prompts 8
#            --max-new-tokens 48 --repeats 3`: AR and EESD at batch 1 and 8, PPSD streams n = 2 and 4)
#
# and issue 8's follow-ups (each pair fills a lease of its own: 15 minutes, starts included):
#   call 1:  bash benchmarks/gpu_session.sh next1          # carry: as predict1
#            (timeout_s 300; stages part 0; the GPU tests, the 7B shape's compiled latency profile at contexts 32
#            to 2048, a kernel profile of its AR step at a 4k context)
#   call 2:  bash benchmarks/gpu_session.sh next2          # carry: as predict2
#            (timeout_s 280; SmolLM2: AR, EESD shared and trained, fixed:3 and beta-ts, PPSD n=2 with the trained
#            head, 8 prompts each, float32 match rates; then its compiled latency profile at contexts 32 to 2048)
#
# What next1/next2 measure that no lease has: EESD beta-ts with a trained head whose zero-draft rounds chain (its
# layer's KV kept in step by the chained AR step), compiled latency profiles past a 256-token context (the simulator
# extrapolates there today), the GPU tests of that chaining. The two H100 leases' steps are in git history.
#
# Then here: copy the files from each call's files_at to benchmarks/results/ (JSON, named by card:
# gpu_decode_nvidia_<card>_llama7b_ctx{32,3840}_issue24.json and gpu_decode_nvidia_<card>_smollm2_issue24.json from
# issue24a/b, compared row by row with predictions_issue24_*.json as committed;
# gpu_decode_nvidia_<card>_llama7b_prompt{512,1024}.json and validate_nvidia_<card>_smollm2.json from predict1/2;
# gpu_decode_nvidia_h100_{llama7b,smollm2}.json from next1/2, the earlier ones renamed with the lease's suffix) and
# calibration/<card>/ (each new profile replaces the file of its name: the same grid and more contexts). Compare the
# predict rows with the committed predictions as they stand (out-of-sample: nothing measured may change the simulator
# before the comparison), run `python benchmarks/sim_vs_gpu.py --card <card>`, and commit them.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=smollm2-135m
PARTS=/tmp/parts
GGUF=/tmp/smollm2-135m.gguf  # its name names the profile: latency_smollm2-135m_cuda_bf16_compiled.csv
SITE=/tmp/site
OUT=${OUT:-/tmp/out}
WHEELS=("gguf==0.19.0" "simpy==4.1.2" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0"
        "typing-inspection==0.4.5" "typing-extensions==4.16.0")  # pydantic's needs (typing-extensions >= 4.16)
PREDICTIONS=benchmarks/results/predictions_next_lease_2026-12-03.json
ISSUE24_PREDICTIONS=benchmarks/results/predictions_issue24_2026-12-03.json  # its rows' --only patterns are these:
ONLY_CTX32='^ours ar( buckets off)?$|^ours ar step|^hf generate|forced alpha|^ppsd streams n=[24]$'
ONLY_CTX3840='^ours ar( buckets off)?$|^ours ar step|^hf generate|forced alpha=0.7$|^ppsd streams n=2$'
# This lease's cut (2026-12-04, an H200; issue 19's heads ride in call 2): every row in compile-layers, our fastest
# path on either card, plus our AR in graph (the H200's predicted mode); no HF fast path nor buckets-off twin at 3840
ONLY_CTX3840_CUT='^ours ar$|^ours ar step|^hf generate \(AR\)$|forced alpha=0.7$|^ppsd streams n=2$'
ONLY_HEADS='^ours ar$|^hf generate|^eesd trained E=7 (fixed:1|beta-ts)$'
INIT_HEADS=(heads/smollm2-135m-e7-mix5-v16k.safetensors)  # heads19 trains on from these over the 16k ids of
# heads/smollm2-135m_v16k.safetensors: keep both files in the tree for that call (the E = 15 head too would put the
# call past 64 MiB: the tree 6.6 + part-001 46.8 + wheels 2.9 + 6.9 MiB a head; no room left for .carry/corpora)
CORPUS_SEEDS=(7 8)  # one builder per seed, side by side on the GPU (answers to requests the model writes, to the
                    # `requests` prompt set and to self-written questions); seeds 5, 6, 9 and 10 made the CPU corpora of answer openings carried in
                    # .carry/corpora (smol-self64b, smol-sp64b, smol-req64, smol-req64b; smol-held is the held-out
                    # one): docs/heads.md "Answer openings of the built-in kinds" and "New requests"
ONLY_SMOLLM2='^ours ar( buckets off)?$|^hf generate|^eesd shared E=15 (fixed:3|beta-ts)$|^ppsd streams n=2$'

environment() {
  mkdir -p "$OUT"
  if [ -d .carry/wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .carry/wheels/*.whl
  fi
  export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1 EESD_CACHE_DIR=/tmp/eesd_cache
}

first_call() {  # a call 1: keep the carried part 0 in /tmp for call 2; the card in the log
  mkdir -p "$PARTS"
  cp .carry/"$MODEL"/* "$PARTS"/
  environment
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
}

card() {  # h100 | h200: whose rows of $PREDICTIONS (and $ISSUE24_PREDICTIONS) this lease measures; another card has
          # none (status 4)
  local name
  name=$(python3 -c 'import torch; print(torch.cuda.get_device_name())')
  case "$name" in
    *H100*) echo h100 ;;
    *H200*) echo h200 ;;
    *) echo "no predictions for '$name' in $PREDICTIONS (H100 and H200 only)" >&2; return 4 ;;
  esac
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

predicted_7b_rows() {  # $1 capture, $2 timeout and $3 time budget per prompt length, $4 a file-name suffix: the 7B
                      # shape's predicted rows (our AR, EESD at forced alpha, PPSD n = 2 and 4) at prompts 512 and 1024
  local LEN
  for LEN in 512 1024; do
    timeout "$2" python3 benchmarks/gpu_decode.py --models llama7b --prompt-len "$LEN" --captures "$1" \
      --only '^ours ar$|forced alpha|^ppsd streams n=[24]$' --time-budget-s "$3" \
      --out "$OUT/gpu_decode_${CARD}_llama7b${4}_prompt${LEN}.json" 2>&1 | tee "$OUT/bench_llama7b${4}_prompt${LEN}.log"
  done
}

capture_of() {  # the capture mode of the card's profile, as its predicted rows say
  [ "$1" = h100 ] && echo compile-layers || echo graph
}

case "${1:-}" in
  prepare)
    python benchmarks/carry_model.py split "$MODEL" --chunk-mib 47
    mkdir -p .carry/corpora
    for DIR in smol-req64 smol-req64b smol-self64b smol-sp64b smol-held; do  # heads19 mixes in, scores on (if built)
      [ -d "/work/corpora/$DIR" ] && rm -rf ".carry/corpora/$DIR" && cp -r "/work/corpora/$DIR" .carry/corpora/
    done
    mkdir -p .carry/wheels
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .carry/wheels "${WHEELS[@]}"
    ls -la .carry/"$MODEL" .carry/wheels
    ;;
  issue24a)  # call 1 (part 0), <= 420 s: the 7B shape at prompts 32 (<= 250 s) and 3840 (<= 170 s)
    first_call
    CARD=$(card) || exit 4
    CAPTURE=$(capture_of "$CARD")
    set +e
    timeout 250 python3 benchmarks/gpu_decode.py --models llama7b --prompt-len 32 --captures "$CAPTURE" --prompts 8 \
      --only "$ONLY_CTX32" --time-budget-s 190 --out "$OUT/gpu_decode_${CARD}_llama7b_ctx32.json" 2>&1 \
      | tee "$OUT/bench_llama7b_ctx32.log"
    timeout 170 python3 benchmarks/gpu_decode.py --models llama7b --prompt-len 3840 --captures "$CAPTURE" --prompts 8 \
      --only "$ONLY_CTX3840" --time-budget-s 110 --out "$OUT/gpu_decode_${CARD}_llama7b_ctx3840.json" 2>&1 \
      | tee "$OUT/bench_llama7b_ctx3840.log"
    ;;
  issue24b)  # its call 2 (part 1), <= 230 s: SmolLM2 on 8 built-in prompts
    second_call issue24a issue24b
    CARD=$(card) || exit 4
    CAPTURE=$(capture_of "$CARD")
    set +e
    timeout 220 python3 benchmarks/gpu_decode.py --models smollm2 --model-path "$GGUF" --captures "$CAPTURE" \
      --prompts 8 --match-dtypes '' --only "$ONLY_SMOLLM2" --time-budget-s 160 \
      --out "$OUT/gpu_decode_${CARD}_smollm2.json" 2>&1 | tee "$OUT/bench_smollm2.log"
    ;;
  lease18a)  # call 1 (part 0), <= 380 s: the 7B shape at prompts 32 (<= 235 s) and 3840 (<= 140 s), every row in
             # compile-layers and our AR in graph too
    first_call
    CARD=$(card) || exit 4
    set +e
    timeout 235 python3 benchmarks/gpu_decode.py --models llama7b --prompt-len 32 --captures compile-layers,graph \
      --prompts 8 --only "$ONLY_CTX32" --time-budget-s 175 --out "$OUT/gpu_decode_${CARD}_llama7b_ctx32.json" 2>&1 \
      | tee "$OUT/bench_llama7b_ctx32.log"
    timeout 140 python3 benchmarks/gpu_decode.py --models llama7b --prompt-len 3840 --captures compile-layers,graph \
      --prompts 8 --only "$ONLY_CTX3840_CUT" --time-budget-s 85 --out "$OUT/gpu_decode_${CARD}_llama7b_ctx3840.json" \
      2>&1 | tee "$OUT/bench_llama7b_ctx3840.log"
    ;;
  heads19)  # a call 2 (part 1; after lease18a, next1 or any call 1), <= SECONDS ($2, default 300): SmolLM2 exit
            # heads distilled on the GPU from its own answers (two corpus builders side by side, ~25% of the time,
            # passes captured: "auto"; answer openings of N tokens; first to R new requests per kind the model
            # writes itself, then the `requests` set's, then self-written questions, as far as the time goes), a phase profile of 3 + 3 training steps (~40 s),
            # the shipped E = 7 mix5 head trained on over its 16k draft vocabulary
            # (bf16 teacher, ~33%), the heads written to $OUT at once; then their decode speed
            # against our compiled AR and HF (the rest). DEVICE=cpu runs the same steps as a smoke test (tiny sizes
            # via SMOKE=1). The 2026-12-04 H200 lease ran its first version (git b5ff762: three eager builders whose
            # rows shared their sampling noise, no profile): docs/results/h200-lease3.md.
    T=${2:-300}
    DEVICE=${DEVICE:-cuda}
    if [ "$DEVICE" = cuda ]; then second_call "a call 1" heads19; CARD=$(card) || exit 4; else
      mkdir -p "$OUT"; CARD=cpu_smoke; GGUF=${GGUF_SMOKE:-smollm2-135m}; fi  # this venv, not the wheels
    C=$((T * 25 / 100)); H=$((T * 33 / 100)); D=$((T - C - H - 110))
    R=160; Q=96; B=256; N=64; STEPS=800; BATCH=64; DTYPE=bfloat16  # N: answer openings, as HELD scores
    if [ "${SMOKE:-0}" = 1 ]; then R=2; Q=1; B=8; N=8; STEPS=30; BATCH=2; DTYPE=float32; fi
    set +e
    for SEED in "${CORPUS_SEEDS[@]}"; do
      timeout $((C + 45)) python3 -m executor.cli corpus --model "$GGUF" --out "/tmp/corpus-s$SEED" --force \
        --sources self-requests,self,self-prompts --prompts requests --requests-per-kind $R \
        --questions-per-topic $Q --temperatures 0.7,1 --samples 2 \
        --max-new-tokens $N --batch-size $B --seed "$SEED" --device "$DEVICE" --dtype float32 --capture auto \
        --time-budget-s $C --threads 4 --no-progress > "$OUT/corpus_s$SEED.log" 2>&1 &
    done
    wait
    CORPORA=()
    for DIR in /tmp/corpus-s* .carry/corpora/smol-{req64,req64b,self64b,sp64b}; do
      [ -f "$DIR/manifest.json" ] && CORPORA+=("$DIR")
    done
    cat "$OUT"/corpus_s*.log > "$OUT/heads19.log"; rm -f "$OUT"/corpus_s*.log
    mkdir -p /tmp/heads
    timeout 60 python3 benchmarks/train_profile.py --model "$GGUF" --corpus "${CORPORA[@]}" --exit-layer 7,15 \
      --batch-size $BATCH --window 256 --steps 3 --warmup 2 --device "$DEVICE" --dtype $DTYPE --threads 8 \
      --out "$OUT/train_profile_smollm2-135m_$CARD.json" 2>&1 | grep -v "Loading weights" | tee -a "$OUT/heads19.log"
    HELD=.carry/corpora/smol-held
    if [ ! -f "$HELD/manifest.json" ]; then  # not carried (no CPU copy where `prepare` ran): built here, as HELD is
      HELD=/tmp/smol-held
      timeout 120 python3 -m executor.cli corpus --model "$GGUF" --out "$HELD" --force --sources self \
        --split held-out --temperatures 0 --max-new-tokens $N --device "$DEVICE" --dtype float32 --capture auto \
        --threads 4 --no-progress >> "$OUT/heads19.log" 2>&1
    fi
    timeout $((H + 50)) python3 -m executor.cli train-head --model "$GGUF" --init-head "${INIT_HEADS[@]}" \
      --draft-vocab heads/smollm2-135m_v16k.safetensors \
      --corpus "${CORPORA[@]}" --eval-corpus "$HELD" --eval-every 100 --steps $STEPS --lr 5e-4 \
      --warmup-steps 20 --batch-size $BATCH --window 256 --device "$DEVICE" --dtype $DTYPE --time-budget-s $H --force \
      --out '/tmp/heads/smollm2-135m-e{exit_layer}-gpu.safetensors' --no-progress 2>&1 | tee -a "$OUT/heads19.log"
    cp /tmp/heads/*.safetensors "$OUT"/
    (cd /tmp && tar czf "$OUT/heads19_files.tgz" heads/*.eval.csv corpus-s*/{manifest,requests}.json*)  # 8 files at most
    [ "$DEVICE" = cuda ] || exit 0
    timeout $((D + 30)) python3 benchmarks/gpu_decode.py --models smollm2 --model-path "$GGUF" \
      --captures compile-layers,graph --prompts 8 --match-dtypes '' --exit-layer 7 --draft-len 1 --hf-last \
      --trained-head /tmp/heads/smollm2-135m-e7-gpu.safetensors --only "$ONLY_HEADS" --time-budget-s "$D" \
      --out "$OUT/gpu_decode_${CARD}_smollm2_heads.json" 2>&1 | tee "$OUT/bench_smollm2_heads.log"
    ;;
  stage)  # one chunk of a model per call ($2: its name; carry .carry/$2/part-NNN and .carry/$2/manifest.json), kept
          # in /tmp/parts-$2 on the box while it stays warm (30 s: issue the next call at once); `qwen19` joins them
    mkdir -p "/tmp/parts-$2"
    cp .carry/"$2"/* "/tmp/parts-$2"/
    echo "staged on this box: $(ls /tmp/parts-"$2" | grep -c '^part-') chunk(s) of $2"
    ;;
  qwen19)  # after `stage qwen2.5-coder-0.5b` for its 10 chunks (469 MiB; carry no chunk with this call, but
           # heads/qwen2.5-coder-0.5b-e12-v16k.safetensors and _v16k.safetensors in the tree, the other heads moved
           # out, and .carry/wheels), <= SECONDS ($2, default 540): issue 19's Qwen2.5-Coder-0.5B on the GPU. A code
           # corpus (its own completions of HumanEval's training prompts + the box's standard library, ~25% of the
           # time) and the held-out one, an E = 12 head over the 16k draft vocabulary trained in ~35%, then EESD with
           # it and with the shipped CPU-trained head against our compiled AR on 8 held-out HumanEval prompts.
           # DEVICE=cpu SMOKE=1 runs the same steps with tiny sizes on this venv's packaged model (no decode rows).
    T=${2:-540}
    DEVICE=${DEVICE:-cuda}
    QWEN=qwen2.5-coder-0.5b
    if [ "$DEVICE" = cuda ]; then
      [ -d "/tmp/parts-$QWEN" ] || { echo "no /tmp/parts-$QWEN: stage its chunks first (the box went back?)" >&2; exit 3; }
      environment
      python3 benchmarks/carry_model.py join "/tmp/parts-$QWEN" "/tmp/$QWEN.gguf" || exit 3
      MODEL_ARG="/tmp/$QWEN.gguf"; CARD=$(card) || exit 4
    else
      mkdir -p "$OUT"; MODEL_ARG=$QWEN; CARD=cpu_smoke
    fi
    C=$((T * 25 / 100)); H=$((T * 35 / 100)); D=$((T - C - H - 90))
    N=128; SOURCE_TOKENS=300000; HELD_TOKENS=64; STEPS=800; BATCH=32; DTYPE=bfloat16; BATCH_GEN=64; SOME=()
    if [ "${SMOKE:-0}" = 1 ]; then N=8; SOURCE_TOKENS=3000; HELD_TOKENS=8; STEPS=3; BATCH=2; DTYPE=float32; BATCH_GEN=4
      SOME=(--max-prompts 8); fi  # the 41 held-out HumanEval prompts' prefills alone outlast the timeout on 2 cores
    set +e
    timeout $((C + 40)) python3 -m executor.cli corpus --model "$MODEL_ARG" --out /tmp/qwen-corpus --force \
      --sources self,python-env --prompts humaneval --temperatures 0,0.7 --samples 1 --max-new-tokens $N \
      --max-tokens-per-source $SOURCE_TOKENS --batch-size $BATCH_GEN --device "$DEVICE" --capture auto \
      --time-budget-s $C --threads 4 "${SOME[@]}" --no-progress > "$OUT/qwen19.log" 2>&1
    timeout 60 python3 -m executor.cli corpus --model "$MODEL_ARG" --out /tmp/qwen-held --force --sources self \
      --prompts humaneval --split held-out --temperatures 0 --max-new-tokens $HELD_TOKENS --batch-size $BATCH_GEN \
      --device "$DEVICE" --capture auto --threads 4 "${SOME[@]}" --no-progress >> "$OUT/qwen19.log" 2>&1
    mkdir -p /tmp/heads
    timeout $((H + 50)) python3 -m executor.cli train-head --model "$MODEL_ARG" --exit-layer 12 \
      --draft-vocab heads/qwen2.5-coder-0.5b_v16k.safetensors --corpus /tmp/qwen-corpus --eval-corpus /tmp/qwen-held \
      --eval-every 100 --steps $STEPS --warmup-steps 10 --lr 5e-4 --batch-size $BATCH --window 256 --device "$DEVICE" \
      --dtype $DTYPE --time-budget-s $H --force --out /tmp/heads/qwen2.5-coder-0.5b-e12-v16k-gpu.safetensors \
      --no-progress 2>&1 | tee -a "$OUT/qwen19.log"
    cp /tmp/heads/*.safetensors /tmp/heads/*.eval.csv "$OUT"/ 2>/dev/null
    cp /tmp/qwen-corpus/manifest.json "$OUT/qwen_corpus_manifest.json" 2>/dev/null
    [ "$DEVICE" = cuda ] || exit 0
    for HEAD in /tmp/heads/qwen2.5-coder-0.5b-e12-v16k-gpu.safetensors heads/qwen2.5-coder-0.5b-e12-v16k.safetensors; do
      NAME=$(basename "$HEAD" .safetensors)
      timeout $((D / 2 + 20)) python3 benchmarks/gpu_decode.py --models smollm2 --model-path "$MODEL_ARG" \
        --prompt-set humaneval --prompts 8 --captures compile-layers --match-dtypes '' --exit-layer 12 --draft-len 2 \
        --trained-head "$HEAD" --hf-last --only '^ours ar$|^eesd trained E=12 (fixed:2|beta-ts)$|^hf generate \(AR\)$' \
        --time-budget-s $((D / 2)) --out "$OUT/gpu_decode_${CARD}_qwen_${NAME}.json" 2>&1 \
        | tee "$OUT/bench_qwen_${NAME}.log"
    done
    ;;
  predict1 | lease19a | lease20a)  # a call 1 (part 0): the 7B shape's predicted rows (our AR, EESD at forced alpha,
                                   # PPSD n = 2 and 4) at prompts 512 and 1024, unchanged from the command each
                                   # prediction names; the steps differ in capture mode and time budgets
    first_call
    CARD=$(card) || exit 4
    set +e
    case "$1" in
      predict1) predicted_7b_rows "$(capture_of "$CARD")" 135 105 "" ;;  # predicted 2026-12-03, the card's mode
      lease19a) predicted_7b_rows "$(capture_of "$CARD")" 122 92 "" ;;   # the same, as the fourth H200 lease ran it
      lease20a) predicted_7b_rows compile-layers 128 95 _compiled ;;    # predicted 2026-12-04 (card h200-compiled)
    esac
    ;;
  lease20b)  # its call 2 (part 1), <= SECONDS ($2, default 420): `eesd validate` in compile-layers as predicted
             # (issue 22), head training's phase profile on the causal path and on its cached twin with their costliest
             # operators (issue 19), SmolLM2's end-to-end AR with prefill buckets on and off (8 prompt lengths), then its
             # compiled latency profile at batch 1 and 8 with what is left
    T=${2:-420}
    second_call lease20a lease20b
    CARD=$(card) || exit 4
    V=$((T * 45 / 100)); P=$((T - V - 205))  # validate; then 2 x 55 s of profiles, 75 s of prefill A/B, the rest
    set +e
    timeout "$V" python3 -m executor.cli validate "scenarios/smollm2_${CARD}-compiled_validate.yaml" --prompts 8 \
      --max-new-tokens 48 --repeats 3 --model "$GGUF" --json "$OUT/validate_${CARD}_smollm2_compiled.json" \
      2>&1 | tr '\r' '\n' | tee "$OUT/validate_${CARD}_smollm2_compiled.log"
    CORPORA=()  # the CPU corpora `prepare` carries (it no longer carries lease 4's smol-train and smol-train2)
    for DIR in .carry/corpora/smol-{req64,req64b,self64b,sp64b}; do
      [ -f "$DIR/manifest.json" ] && CORPORA+=("$DIR")
    done
    if [ ${#CORPORA[@]} -eq 0 ]; then echo "no CPU corpus carried: no training profile" | tee "$OUT/train_profile.log"
    else for HEAD_PATH in causal cached; do
      timeout 55 python3 benchmarks/train_profile.py --model "$GGUF" --corpus "${CORPORA[@]}" --exit-layer 7,15 \
        --batch-size 64 --window 256 --steps 3 --warmup 2 --device cuda \
        --dtype bfloat16 --threads 8 --head-path "$HEAD_PATH" --ops 25 \
        --out "$OUT/train_profile_smollm2-135m_${CARD}_${HEAD_PATH}.json" 2>&1 | grep -v "Loading weights" \
        | tee -a "$OUT/train_profile.log"
    done; fi
    timeout 75 python3 benchmarks/gpu_decode.py --models smollm2 --model-path "$GGUF" --captures compile-layers \
      --prompts 8 --match-dtypes '' --only '^ours ar( prefill buckets off| sync_every=1)?$' --time-budget-s 50 \
      --out "$OUT/gpu_decode_${CARD}_smollm2_prefill.json" 2>&1 | tee "$OUT/bench_smollm2_prefill.log"
    if [ "$P" -lt 30 ]; then  # too little left for a profile (and `timeout 0` would set no limit at all)
      echo "T = $T leaves no time for the batch-8 profile: skipped" | tee "$OUT/calibrate_smollm2_batch8.log"
    else timeout "$P" python3 -m executor.cli calibrate latency --model "$GGUF" --device cuda \
      --kernels compiled --batch 1,8 --q 1,2,4 --context 32,256,512 --prefill 47 --out "$OUT" --no-progress 2>&1 \
      | tee "$OUT/calibrate_smollm2_batch8.log"; fi
    ;;
  lease19b)  # its call 2 (part 1), <= SECONDS ($2, default 420): predict2's `eesd validate` (issue 22: AR and EESD
             # at batch 1 and 8, PPSD streams n = 2 and 4, as predicted), a phase profile of SmolLM2's head training
             # steps (issue 19), then SmolLM2's AR against HF generate as it comes and on its fast path (issue 24;
             # our AR in compile-layers and in graph, the mode its prediction names) with what time is left
    T=${2:-420}
    second_call lease19a lease19b
    CARD=$(card) || exit 4
    V=$((T * 45 / 100)); D=$((T - V - 75))
    set +e
    timeout "$V" python3 -m executor.cli validate "scenarios/smollm2_${CARD}_validate.yaml" --prompts 8 \
      --max-new-tokens 48 --repeats 3 --model "$GGUF" --json "$OUT/validate_${CARD}_smollm2.json" \
      2>&1 | tr '\r' '\n' | tee "$OUT/validate_${CARD}_smollm2.log"
    CORPORA=()
    for DIR in .carry/corpora/smol-train .carry/corpora/smol-train2; do
      [ -f "$DIR/manifest.json" ] && CORPORA+=("$DIR")
    done
    timeout 55 python3 benchmarks/train_profile.py --model "$GGUF" --corpus "${CORPORA[@]}" --exit-layer 7,15 \
      --batch-size 64 --window 256 --steps 3 --warmup 2 --device cuda --dtype bfloat16 --threads 8 \
      --out "$OUT/train_profile_smollm2-135m_$CARD.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/train_profile.log"
    timeout $((D + 20)) python3 benchmarks/gpu_decode.py --models smollm2 --model-path "$GGUF" \
      --captures compile-layers,graph --prompts 8 --match-dtypes '' --hf-last --only '^ours ar$|^hf generate' \
      --time-budget-s "$D" --out "$OUT/gpu_decode_${CARD}_smollm2_issue24.json" 2>&1 | tee "$OUT/bench_smollm2.log"
    ;;
  predict2)  # its call 2 (part 1), <= 260 s: SmolLM2's predicted rows through `eesd validate` on the card's scenario
    second_call predict1 predict2
    CARD=$(card) || exit 4
    set +e
    timeout 230 python3 -m executor.cli validate "scenarios/smollm2_${CARD}_validate.yaml" --prompts 8 \
      --max-new-tokens 48 --repeats 3 --model "$GGUF" --no-progress --json "$OUT/validate_${CARD}_smollm2.json" \
      2>&1 | tee "$OUT/validate_${CARD}_smollm2.log"
    ;;
  next1)  # call 1 (part 0), <= 290 s: the GPU tests; the 7B shape's compiled profile at contexts 32 to 2048 (12
          # shapes); a kernel profile of its AR step at a 4k context (where the 12% that attention adds there goes)
    first_call
    set +e
    timeout 120 python3 -m pytest -p no:cacheprovider -q tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/test_gpu.log"
    timeout 70 python3 -m executor.cli calibrate latency --model Llama-2-7B --layers 4 --device cuda --kernels compiled \
      --batch 1 --q 1,2,4 --context 32,256,512,2048 --prefill 32 --out "$OUT" --no-progress 2>&1 | tee "$OUT/calibrate_llama7b.log"
    timeout 60 python3 benchmarks/kernel_profile.py --model llama7b --capture compile-layers --prompt-len 3968 \
      --out "$OUT/kernel_profile_llama7b_ctx4k.json" 2>&1 | tee "$OUT/kernel_profile_llama7b_ctx4k.log"
    ;;
  serving20)  # a call 2 (part 1; after any call 1), <= SECONDS ($2, default 420): issue 20's serving validation on
              # the card. SmolLM2's serving latency profile (the CPU serving profile's grid: batch 1-4, q 1-2,
              # contexts 64-512, prefills 32-256; eager kernels in CUDA graphs, as serve(capture="graph") runs), the
              # shared head's trace at exit layers 15 and 22 on the built-in prompts, then benchmarks/serving_cpu.py's
              # nine cases from those files (AR and EESD E = 22 batch <= 4, PPSD two stages; first the round
              # costs of EESD E = 15 on the card, `eesd calibrate rounds`, <= 40 s, and the host's work between
              # passes per AR step and EESD round on serving rounds, `eesd calibrate host --loop serve`, <= 45 s,
              # which then prices each method's host work in the cases), the executor's passes
              # captured in graphs and every workload's arrivals 20x as dense. DEVICE=cpu runs the same steps on this
              # machine as a smoke test (fp32, uncaptured, the first 3 requests of two cases).
    T=${2:-420}
    DEVICE=${DEVICE:-cuda}
    if [ "$DEVICE" = cuda ]; then second_call "a call 1" serving20; CARD=$(card) || exit 4
      GRAPHS=(--graphs on); DTYPE=bf16; TORCH_DTYPE=bfloat16; CAPTURE=graph; SCALE=20; THREADS=4
      TIMING=(--warmup 3 --repeats 10); TRACE_S=80
      # the nine cases this step was sized for (the *-ppsd-batch4 cases, PPSD's static batches, are not in its budget)
      SOME=(--cases rate0.15,rate0.4,rate1.2,rate0.15-ppsd,rate0.4-ppsd,rate1.2-ppsd,rate0.4-2replicas,rate1.2-2replicas,rate0.4-ppsd-2replicas)
    else
      mkdir -p "$OUT"; CARD=cpu_smoke; GGUF=${GGUF_SMOKE:-smollm2-135m}
      GRAPHS=(); DTYPE=fp32; TORCH_DTYPE=float32; CAPTURE=none; SCALE=3; SOME=(--first 3 --cases rate1.2,rate1.2-ppsd)
      THREADS=1; TIMING=(--warmup 1 --repeats 1); TRACE_S=600
    fi
    S="$OUT/serving"
    mkdir -p "$S"
    set +e
    timeout 170 python3 -m executor.cli calibrate latency --model "$GGUF" --device "$DEVICE" --dtype $DTYPE \
      --kernels eager "${GRAPHS[@]}" --batch 1,2,3,4 --q 1,2 --context 64,128,512 --prefill 32,48,64,256 \
      "${TIMING[@]}" --threads $THREADS --out "$S" --force --no-progress 2>&1 | tee "$OUT/serving20.log"
    timeout $TRACE_S python3 -m executor.cli calibrate acceptance --model "$GGUF" --exit-layers 15,22 --prompts builtin \
      --max-new-tokens 48 --max-prompt-tokens 512 --device "$DEVICE" --dtype $DTYPE --threads $THREADS --force \
      --out "$S/acceptance_smollm2-135m_shared_builtin.csv" --no-progress 2>&1 | tee -a "$OUT/serving20.log"
    PROFILE=$(ls "$S"/latency_*.csv | head -1)
    TRACE="$S/acceptance_smollm2-135m_shared_builtin.csv"
    # the round costs a beta-ts policy weighs on this card (shared head, E = 15), as `generate` runs its passes
    timeout 40 python3 -m executor.cli calibrate rounds --model "$GGUF" --device "$DEVICE" --dtype $DTYPE \
      --capture $CAPTURE --repeats 3 --threads $THREADS --force --out "$OUT/round_costs_smollm2_${CARD}.json" 2>&1 \
      | grep -v "Loading weights" | tee -a "$OUT/serving20.log"
    # the host's work between passes on the serving loop's own rounds (requests leaving, others taking their slots),
    # AR and EESD E = 15 fixed:1, each pass bracketed by device synchronisations, at batch 1 and 4: what a serving
    # loop's device waits for per step and per round (docs/serving.md); the serving cases below price each method's
    # host work from it (latency.profile.host_work) in place of the profile's overhead rows
    HOST="$OUT/host_serve_smollm2_${CARD}.json"
    timeout 45 python3 -m executor.cli calibrate host --model "$GGUF" --exit-layer 15 --device "$DEVICE" --dtype $DTYPE \
      --capture $CAPTURE --batch 1,4 --prompts 4 --max-new-tokens 32 --repeats 2 --loop serve --threads $THREADS \
      --force --out "$HOST" 2>&1 | grep -v "Loading weights" | tee -a "$OUT/serving20.log"
    HOSTED=(); [ -f "$HOST" ] && HOSTED=(--host "$HOST")
    timeout $((T - 345)) python3 benchmarks/serving_cpu.py --model "$GGUF" --device "$DEVICE" --dtype $TORCH_DTYPE \
      --capture $CAPTURE --profile "$PROFILE" --trace "$TRACE" "${HOSTED[@]}" --rate-scale $SCALE --threads $THREADS \
      "${SOME[@]}" --out "$OUT/serving_${CARD}.json" 2>&1 | grep -v "Loading weights" | tee -a "$OUT/serving20.log"
    ;;
  next2)  # its call 2 (part 1), <= 270 s: SmolLM2's EESD rows (a trained head's zero-draft rounds now chain) and
          # PPSD n=2 with the trained head, 8 prompts each, float32 match rates; then its compiled profile at contexts 32
          # to 2048 (28 shapes, ~75 s)
    second_call next1 next2
    set +e
    timeout 160 python3 benchmarks/gpu_decode.py --models smollm2 --model-path "$GGUF" --captures compile-layers \
      --match-dtypes float32 --match-prompts 6 --only '^ours ar$|^eesd|^ppsd streams n=2 trained' \
      --time-budget-s 120 --out "$OUT/gpu_decode_smollm2.json" 2>&1 | tee "$OUT/bench_smollm2.log"
    timeout 100 python3 -m executor.cli calibrate latency --model "$GGUF" --device cuda --kernels compiled --batch 1 \
      --q 1,2,3,4,5,7,9 --context 32,256,512,2048 --prefill 47 --out "$OUT" --no-progress 2>&1 | tee "$OUT/calibrate.log"
    ;;
  *)
    echo "usage: $0 prepare | stage MODEL | qwen19 [SECONDS] | serving20 [SECONDS] | lease20a | lease20b [SECONDS] | lease19a | lease19b [SECONDS] | lease18a | heads19 [SECONDS] | issue24a | issue24b | predict1 | predict2 | next1 | next2" >&2
    exit 2
    ;;
esac
