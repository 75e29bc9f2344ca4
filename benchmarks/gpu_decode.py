"""GPU decode benchmark (issue 8): HF anchors vs our AR, EESD and PPSD, batch 1, greedy, on one device, one run.

Models:
- SmolLM2-135M-Instruct, real weights (`executor.load_model("smollm2-135m")`): HF `generate` AR and HF
  `assistant_early_exit` (the anchors), our AR, EESD with the shared head and with the trained head
  `heads/smollm2-135m-e15.safetensors` (policies fixed:k and beta-ts), PPSD `streams` with n = 2 and 4 stages and
  the shared head, n = 2 with the trained head, and n = 2 read back every tick (elsewhere: the `sequential`
  backend, for a smoke test).
- The Llama-2-7B shape (hidden 4096, 32 layers, 32 heads, FFN 11008, vocab 32000) with random weights: HF AR, our AR
  and EESD at forced acceptance alpha in {0.5, 0.7, 0.9} (`generate(accept_pattern=alpha)`: the same drafting and
  verify work as a real round with that accepted length, NOT lossless: random weights accept nothing on their own),
  and PPSD `streams` with n = 2 and 4 stages and the shared head (lossless; random weights draft next to nothing
  right, so its ticks are what a pipe of that model costs at alpha ~ 0).
  `--small` keeps the 7B layer shape but only 4 layers, so that it fits a CPU run.
Plus the bf16 greedy match rate of EESD / PPSD vs our AR on real prompts (`executor.prompts`, builtin set): in bf16 a
(k+1)-token verify pass and a 1-token step round differently, so near-ties can flip (docs/design.md).

Our passes run as `--captures` says (`generate(capture=...)`): "compile-layers" (the decoder layer compiled once,
passes in CUDA graphs: the default on a GPU), "graph" (CUDA graphs) and "compile" (`torch.compile(mode=
"reduce-overhead")` per pass) for AR and EESD fixed:k, so the fastest can be kept; the other EESD rows and PPSD
(each stage's step captured, one CUDA stream per stage) use the first mode listed. `--only REGEX` keeps the
matching rows. Each row also gives its warm-up run's seconds (`first_call_s`): the capture and compilation it needed
beyond earlier rows.

Every speed is the median tokens/s of `--runs` (>= 5) timed runs after one warm-up run (which also captures or
compiles), end to end (prefill included, EOS ignored: every run makes exactly `--new-tokens` tokens), with the device
synchronised around each run; `decode tok/s` is the same runs without the prefill: (new tokens - 1) / (wall - prefill).

Ideal speedups (what the implementation would reach at the measured acceptance if a round cost nothing but its passes):
- EESD: the passes are profiled in isolation after the runs (median per-launch time of the captured AR step c_ar,
  draft step c_d and verify pass c_v(q) for every q used, mid-sequence position). Over the last run's rounds r with
  d_r drafts and a_r accepted: ideal = sum(a_r + 1) c_ar / sum(d_r c_d + c_v(d_r + 1)), a round of d_r = 0 costing
  what the decoder runs it as, the AR step (c_ar; with a trained head the AR step that also runs the head's layer,
  c_ar_head); realised = the decode tokens/s ratio EESD / our AR (same capture mode); efficiency = realised / ideal
  (target >= 0.9).
- PPSD: every stage's own pass profiled alone the same way (c_s), a tick as long as the slowest: ideal = decoded
  tokens c_ar / (ticks max_s c_s); `formula_ideal` is the paper's n / (alpha + (1 - alpha) n) (balanced stages, free
  head and links; `PPSDStats.ideal_speedup`). On one GPU the stages share the device and overlap only partly, so the
  table also gives the efficiency against ticks as long as the device measured them (CUDA events around each stage
  of every tick; `device per tick`): what the executor itself loses (transition, host, launch gaps).
- AR on the 7B shape: the HBM floor, weight bytes / `--hbm-tbps` per token (405 MB per layer at
  about 3.0 TB/s, what a copy measured on an H100: about 222 tok/s), reported as a fraction (target >= 0.75).

    python benchmarks/gpu_decode.py                          # on the GPU: benchmarks/results/gpu_decode_<card>.json
    python benchmarks/gpu_decode.py --models smollm2 --out X.json  # one model per call (a call is <= 10 min)
    python benchmarks/gpu_decode.py --device cpu --quick --small --captures none  # CPU smoke test, not a claim

On the lent GPU box (no hub, no `gguf`, 64 MiB per call) `benchmarks/gpu_session.sh` does it in two calls: the 7B
shape while SmolLM2's GGUF travels in its first chunk, then SmolLM2 with the second (see that script).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import executor
from executor import passes as executor_passes
from executor.adapter import ModelAdapter
from executor.api import PassSetup
from executor.decoding import TokenSink
from executor.heads import resolve_head
from executor.models import decode_weight_bytes, kv_cache_bytes, resolve_dtype
from executor.passes import Passes
from executor.ppsd import StagePlan, local_pipeline, make_selector
from executor.prompts import encode_prompt, load_prompts
from executor.sampling import SamplingConfig
from sim.formats import write_text_atomic
from sim.policy import make_policy

RESULTS = Path(__file__).parent / "results"
HEAD_FILE = Path(__file__).resolve().parent.parent / "heads" / "smollm2-135m-e15.safetensors"
ALPHAS = (0.5, 0.7, 0.9)
PPSD_STAGES = (2, 4)


@dataclass
class Row:
    """One table row. tokens_per_s is the median over runs; speedups are of decode tokens/s over our AR (same model,
    same capture mode) and of end-to-end tokens/s over HF AR."""

    model: str
    method: str
    capture: str | None
    tokens_per_s: float | None
    decode_tokens_per_s: float | None = None
    runs_tokens_per_s: list[float] = field(default_factory=list)
    speedup_vs_ar: float | None = None
    speedup_vs_hf: float | None = None
    alpha: float | None = None  # measured in the last run, per position: accepted / checked draft positions
    tokens_per_round: float | None = None
    ideal_speedup: float | None = None
    efficiency: float | None = None  # realised speedup / ideal speedup
    formula_ideal: float | None = None  # PPSD: n / (alpha + (1 - alpha) n), the paper's (balanced stages, free head)
    tick_efficiency: float | None = None  # PPSD: realised / the ideal at the measured device time per tick
    first_call_s: float | None = None  # the warm-up run: capture and compilation this row needed beyond earlier rows
    pass_costs_ms: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Case:
    """A method to time: `run()` decodes once and returns (new tokens, executor stats or None for HF)."""

    method: str
    run: Callable[[], tuple[int, Any]]
    capture: str | None = None
    ideal: Callable[[Any], tuple[float | None, dict[str, float]]] = lambda stats: (None, {})
    skip: str = ""  # why it cannot run here (the row is kept, with this note)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(case: Case, runs: int, device: torch.device) -> tuple[list[float], list[float], Any, float]:
    """End-to-end and decode-only tokens/s of `runs` timed runs after one warm-up run; the last run's stats; the
    warm-up's seconds (what capturing and compiling cost on first use)."""
    synchronize(device)
    begin = time.perf_counter()
    case.run()
    synchronize(device)
    first_call = time.perf_counter() - begin
    speeds, decode, stats = [], [], None
    for _ in range(runs):
        synchronize(device)
        begin = time.perf_counter()
        new_tokens, stats = case.run()
        synchronize(device)
        wall = time.perf_counter() - begin
        speeds.append(new_tokens / wall)
        if stats is not None:
            decode.append((new_tokens - 1) / (wall - stats.prefill_time_s))
    return speeds, decode, stats, first_call


def eesd_alpha(stats: Any) -> float | None:
    """Per-position acceptance: a round checks accepted + 1 positions, or all d when all d were accepted."""
    checked = sum(a + (a < d) for a, d in zip(stats.accepted, stats.drafted, strict=True))
    return sum(stats.accepted) / checked if checked else None


# ------------------------------------------------------------------------------------------------------ profiling
REPEATS, WARMUPS, BATCHES = 20, 3, 5
LAUNCHES = REPEATS + WARMUPS  # launches between two resets at most


def launch_time_ms(launch: Callable[[], None], device: torch.device, reset: Callable[[], None]) -> float:
    """Median over BATCHES of the mean time of REPEATS back-to-back launches (after WARMUPS warm-up launches).
    `reset` refills the inputs before each batch: a chained pass moves its own position on at every launch."""
    reset()
    for _ in range(WARMUPS):
        launch()
    times = []
    for _ in range(BATCHES):
        reset()
        synchronize(device)
        begin = time.perf_counter()
        for _ in range(REPEATS):
            launch()
        synchronize(device)
        times.append((time.perf_counter() - begin) / REPEATS * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class PassProfile:
    """Profiles the passes `generate` used (the cached, captured ones when capturing) to give EESD's ideal."""

    adapter: ModelAdapter
    prompt: list[int]
    new_tokens: int
    capture: str

    def setup(self, method: str, exit_layer: int | None, head: Any, policy: str) -> Passes:
        setup = PassSetup(method, SamplingConfig(), 0, [], exit_layer, head, [make_policy(policy)], self.capture)
        return setup.passes(self.adapter, [self.prompt], self.new_tokens)

    @property
    def middle(self) -> int:
        """A mid-sequence position, where the passes are timed."""
        return len(self.prompt) + self.new_tokens // 2

    def ar_cost(self) -> float:
        """c_ar: milliseconds per AR step (early enough that a batch of chained launches, each one position on,
        stays inside the cache)."""
        ar = self.setup("ar", None, None, "fixed:1")
        at = min(self.middle, ar.cache.max_len - LAUNCHES - 1)
        return launch_time_ms(ar.ar, self.adapter.device, lambda: ar.load([1], [at], 1))

    def costs(self, exit_layer: int, head: Any, policy: str, qs: list[int]) -> dict[str, float]:
        """Milliseconds per launch: c_ar, c_draft and c_verify(q) for q in `qs`, at a mid-sequence position; with a
        head of its own layer(s), c_ar_head (the AR step a round that drafts nothing runs as)."""
        device = self.adapter.device
        with torch.inference_mode():
            costs = {"ar": self.ar_cost()}
            eesd = self.setup("eesd", exit_layer, head, policy)
            at = min(self.middle, eesd.cache.max_len - LAUNCHES - 1)
            costs["draft"] = launch_time_ms(eesd.draft, device, lambda: eesd.load([1], [at], 1))
            if eesd.layers_head():
                costs["ar_head"] = launch_time_ms(eesd.ar_head, device, lambda: eesd.load([1], [at], 1))
            for q in sorted(set(qs)):
                reset = lambda q=q: eesd.load(None, [at], q)  # noqa: E731
                costs[f"verify q={q}"] = launch_time_ms(lambda q=q: eesd.verify(q - 1), device, reset)
        return costs

    def eesd_ideal(self, stats: Any, exit_layer: int, head: Any, policy: str) -> tuple[float | None, dict]:
        if not stats.accepted:
            return None, {}
        costs = self.costs(exit_layer, head, policy, [d + 1 for d in stats.drafted if d])
        zero_round = costs.get("ar_head", costs["ar"])  # a round of k = 0 runs as the AR step (greedy rows here)

        def cost(d: int) -> float:
            return zero_round if d == 0 else d * costs["draft"] + costs[f"verify q={d + 1}"]

        return sum(a + 1 for a in stats.accepted) * costs["ar"] / sum(map(cost, stats.drafted)), costs

    def ppsd_ideal(self, stats: Any, backend: str, head: Any) -> tuple[float | None, dict]:
        """PPSD's ideal at the measured ticks and the profiled costs: every stage on a device of its own, a tick as
        long as the slowest stage's pass (each timed alone, the pipeline's own, captured ones), no host time:
        (decoded tokens x c_ar) / (ticks x max_s c_stage). On one GPU the stages share the device, so this is what
        perfect overlap would give."""
        if not stats.ticks:
            return None, {}
        plan = StagePlan(tuple(stats.stage_boundaries), stats.exit_layer)
        head = resolve_head(head, self.adapter, plan.exit_layer)
        needed = len(self.prompt) + self.new_tokens
        selector = make_selector(self.adapter, len(self.prompt), TokenSink(self.new_tokens, []), None, 0)
        with torch.inference_mode():
            costs = {"ar": self.ar_cost()}
            pipeline = local_pipeline(self.adapter, None, plan, backend, selector, self.capture, needed, False, head)
            for stage, runner in enumerate(pipeline.runners):
                runner.position.fill_(self.middle)
                costs[f"stage {stage + 1}"] = launch_time_ms(runner.pass_, self.adapter.device, lambda: None)
        tick = max(cost for name, cost in costs.items() if name.startswith("stage"))
        return (stats.new_tokens - 1) * costs["ar"] / (stats.ticks * tick), costs


# ------------------------------------------------------------------------------------------------------ cases
def hf_case(model, prompt: list[int], new_tokens: int, method: str, **kwargs: Any) -> Case:
    """HF `generate` (greedy, EOS ignored); `new_tokens` is `--hf-new-tokens`: HF's time per token is host-bound and
    flat, so fewer tokens measure the same rate in a fraction of the device time."""
    ids = torch.tensor([prompt], device=model.device)

    def run() -> tuple[int, Any]:
        return hf_generate(model, ids, new_tokens, **kwargs).shape[1] - ids.shape[1], None

    return Case(method, run)


def hf_generate(model, ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> torch.Tensor:
    """HF `generate`, greedy, exactly `new_tokens` new tokens (EOS ignored)."""
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0, **kwargs,
    )  # fmt: skip


def ours_case(adapter: ModelAdapter, prompt: list[int], new_tokens: int, label: str, **kwargs: Any) -> Case:
    def run() -> tuple[int, Any]:
        result = executor.generate(adapter, [prompt], max_new_tokens=new_tokens, **kwargs)
        return result.stats.new_tokens, result.stats

    return Case(label, run, capture=kwargs.get("capture"))


def eesd_case(adapter, prompt, new_tokens: int, label: str, exit_layer: int, head, policy: str, capture, **kw) -> Case:
    case = ours_case(
        adapter, prompt, new_tokens, label, method="eesd", exit_layer=exit_layer, head=head, policy=policy,
        capture=capture, **kw,
    )  # fmt: skip
    profile = PassProfile(adapter, prompt, new_tokens, capture)
    return Case(label, case.run, capture, ideal=lambda stats: profile.eesd_ideal(stats, exit_layer, head, policy))


def ppsd_case(
    adapter, prompt, new_tokens: int, stages: int, device: torch.device, capture: str, head=None, name: str = "shared",
    sync_every: int | None = None,
) -> Case:  # fmt: skip
    """PPSD `streams` with the shared head at the end of stage 1, or a trained `head` at its own exit layer; the pipe
    chained on the device (default: 8 ticks per host read when captured), or read back every `sync_every` ticks."""
    backend = "streams" if device.type == "cuda" else "sequential"  # a CPU smoke run: the reference backend
    label = f"ppsd {backend} n={stages}" + ("" if head is None else f" {name}")
    label += "" if sync_every is None else f" sync_every={sync_every}"
    kwargs = {"method": "ppsd", "stages": stages, "backend": backend, "capture": capture, "head": head,
              "sync_every": sync_every}  # fmt: skip
    case = ours_case(adapter, prompt, new_tokens, label, **kwargs)
    profile = PassProfile(adapter, prompt, new_tokens, capture)
    return Case(label, case.run, capture, ideal=lambda stats: profile.ppsd_ideal(stats, backend, head))


def ar_cases(adapter: ModelAdapter, prompt: list[int], n: int, captures: list[str], every_token: bool) -> list[Case]:
    """Our AR per capture mode (default `sync_every`: 8 tokens per host read when captured); with `every_token`, the
    first mode once more reading every token back (`sync_every=1`): what running ahead of the host is worth."""
    cases = [ours_case(adapter, prompt, n, "ours ar", method="ar", capture=c) for c in captures]
    if every_token and captures[0] != "none":
        label = "ours ar sync_every=1"
        cases.append(ours_case(adapter, prompt, n, label, method="ar", capture=captures[0], sync_every=1))
        cases.append(unfused(ours_case(adapter, prompt, n, "ours ar unfused", method="ar", capture=captures[0])))
    return cases


def unfused(case: Case) -> Case:
    """The case with captured passes on unfused projections (`executor.passes.FUSE_CAPTURED` off while it runs):
    what fusing q/k/v and gate/up (`executor.fusion`) is worth. Its runs recapture once, then reuse their graphs."""

    def run() -> tuple[int, Any]:
        executor_passes.FUSE_CAPTURED = False
        try:
            return case.run()
        finally:
            executor_passes.FUSE_CAPTURED = True

    return dataclasses.replace(case, run=run)


def smollm2_cases(model, prompt: list[int], args) -> tuple[list[Case], list[Case]]:
    """(HF anchors and our rows in the first capture mode, the other modes' AR and EESD fixed:k rows). `main` times
    the second list after the match rates: a compile costs minutes on a slow host, so under a time budget those are
    the rows to lose."""
    adapter, n, E, main = ModelAdapter(model), args.new_tokens, args.exit_layer, args.captures[0]
    trained = resolve_head(str(HEAD_FILE), adapter, E)
    shared = resolve_head("shared", adapter, E)
    k = f"fixed:{args.draft_len}"
    cases = [hf_case(model, prompt, args.hf_new_tokens, "hf generate (AR)")]
    cases += ar_cases(adapter, prompt, n, [main], every_token=True)
    for head_name, head in (("shared", shared), ("trained", trained)):
        for policy in (k, "beta-ts"):
            label = f"eesd {head_name} E={E} {policy}"
            cases.append(eesd_case(adapter, prompt, n, label, E, head, policy, main))
    cases += [ppsd_case(adapter, prompt, n, stages, model.device, main) for stages in PPSD_STAGES]
    cases.append(ppsd_case(adapter, prompt, n, 2, model.device, main, sync_every=1))  # what chaining the ticks is worth
    if adapter.num_layers // 2 == E:  # the trained head's layer ends stage 1 of 2 balanced stages
        cases.append(ppsd_case(adapter, prompt, n, 2, model.device, main, trained, f"trained E={E}"))
    hf_ee = f"hf assistant_early_exit={E}"
    cases.append(hf_case(model, prompt, args.hf_new_tokens, hf_ee, assistant_early_exit=E))
    others: list[Case] = []
    for capture in args.captures[1:]:
        others += ar_cases(adapter, prompt, n, [capture], False)
        others.append(eesd_case(adapter, prompt, n, f"eesd shared E={E} {k}", E, shared, k, capture))
    return cases, others


def llama7b_cases(model, prompt: list[int], args) -> list[Case]:
    """HF AR; our AR, EESD E = L/2 fixed:k at each forced alpha and PPSD n in `PPSD_STAGES` in the first capture
    mode; our AR in the others (the rows `benchmarks/sim_vs_gpu.py --predict` names for the 7B shape)."""
    adapter, n, main = ModelAdapter(model), args.new_tokens, args.captures[0]
    E = max(1, model.config.num_hidden_layers // 2)
    shared = resolve_head("shared", adapter, E)
    k = f"fixed:{args.draft_len}"
    cases = [hf_case(model, prompt, args.hf_new_tokens, "hf generate (AR)")]
    cases += ar_cases(adapter, prompt, n, [main], every_token=True)
    for alpha in ALPHAS:
        label = f"eesd shared E={E} {k} forced alpha={alpha}"
        cases.append(eesd_case(adapter, prompt, n, label, E, shared, k, main, accept_pattern=alpha))
    cases += [ppsd_case(adapter, prompt, n, stages, model.device, main) for stages in PPSD_STAGES]
    return cases + ar_cases(adapter, prompt, n, args.captures[1:], False)


# ------------------------------------------------------------------------------------------------------ models
LLAMA7B_POSITIONS = 4096  # Llama-2's context


def llama2_7b_shape(num_layers: int, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Llama-2-7B's shape with random weights (HF's default init), built directly on `device` in `dtype`."""
    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=LLAMA7B_POSITIONS, rms_norm_eps=1e-5,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


@dataclass
class Budget:
    """Wall-clock budget of the whole script: a case that would start after it is kept as a skipped row."""

    seconds: float | None
    begin: float = field(default_factory=time.perf_counter)

    def spent(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.begin > self.seconds


def bench_model(
    name: str, cases: list[Case], runs: int, device: torch.device, budget: Budget, save, earlier: list[Row] = ()
) -> list[Row]:
    """Time every case; `save(earlier + rows)` after each row, so a run cut short by its time limit keeps what it
    measured (speedups count the same model's `earlier` rows: its HF and AR rows)."""
    rows: list[Row] = list(earlier)
    for case in cases:
        skip = case.skip or ("skipped: time budget spent" if budget.spent() else "")
        if skip:
            rows.append(Row(model=name, method=case.method, capture=case.capture, tokens_per_s=None, note=skip))
            print(f"  {case.method}: {skip}", flush=True)
            continue
        try:
            row = measure(name, case, runs, device)
        except Exception as err:  # one broken case must not cost the others' figures (one GPU call, no rerun)
            traceback.print_exc()
            note = f"error: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            rows.append(Row(model=name, method=case.method, capture=case.capture, tokens_per_s=None, note=note))
            save(rows)
            print(f"  {case.method}: {note}", flush=True)
            continue
        rows.append(row)
        add_speedups(rows)
        save(rows)
        print(f"  {case.method} [{case.capture}]: {row.tokens_per_s:.2f} tok/s", flush=True)
    return rows[len(earlier) :]


def measure(name: str, case: Case, runs: int, device: torch.device) -> Row:
    speeds, decode, stats, first_call = time_case(case, runs, device)
    row = Row(
        model=name, method=case.method, capture=case.capture, tokens_per_s=statistics.median(speeds),
        decode_tokens_per_s=statistics.median(decode) if decode else None, runs_tokens_per_s=speeds,
        first_call_s=first_call,
    )  # fmt: skip
    if stats is not None and stats.accepted:
        row.alpha = getattr(stats, "alpha", None) if hasattr(stats, "confirms") else eesd_alpha(stats)
        row.tokens_per_round = None if hasattr(stats, "confirms") else stats.tokens_per_round
        row.ideal_speedup, row.pass_costs_ms = case.ideal(stats)
    if stats is not None and getattr(stats, "stage_stats", None) and stats.ticks:
        row.pass_costs_ms |= ppsd_tick_costs(stats)
        row.formula_ideal = stats.ideal_speedup
    return row


def ppsd_tick_costs(stats: Any) -> dict[str, float]:
    """Milliseconds per PPSD tick: the stages' (`streams`: each tick's slowest stage, timed with CUDA events, as the
    stages overlap; `sequential`: all stages, one after the other) and the rest of the decode wall time per tick (the
    transition pass, the host's reads and replays, and on a GPU the device's idle time while the host catches up:
    with the pipe chained, the host queues ticks ahead, so this is what it could not hide)."""
    if stats.backend == "streams":  # busy + idle is the same sum of tick lengths for every stage
        device = stats.stage_stats[0].busy_s + stats.stage_stats[0].idle_s
    else:
        device = sum(stage.busy_s for stage in stats.stage_stats)
    wall = stats.wall_time_s - stats.prefill_time_s
    return {"device per tick": device / stats.ticks * 1e3, "host per tick": (wall - device) / stats.ticks * 1e3}


def add_speedups(rows: list[Row]) -> None:
    """Decode speedups over our AR with the same capture mode (PPSD: over the fastest AR); end to end over HF."""
    ars = {r.capture: r.decode_tokens_per_s for r in rows if r.method == "ours ar" and r.decode_tokens_per_s}
    hf = next((r.tokens_per_s for r in rows if r.method == "hf generate (AR)"), None)
    for row in rows:
        if row.tokens_per_s is None:
            continue
        ar = ars.get(row.capture) or max(ars.values(), default=None)
        if row.decode_tokens_per_s and ar:
            row.speedup_vs_ar = row.decode_tokens_per_s / ar
        row.speedup_vs_hf = row.tokens_per_s / hf if hf else None
        if row.ideal_speedup and row.speedup_vs_ar:
            row.efficiency = row.speedup_vs_ar / row.ideal_speedup
            row.tick_efficiency = tick_efficiency(row)


def tick_efficiency(row: Row) -> float | None:
    """PPSD: the efficiency against the ticks as long as the device measured them (`device per tick`, the stages
    running together) instead of as long as the slowest stage alone: what the executor loses beyond the stages'
    imperfect overlap on a shared GPU (the transition, the host, the gaps between launches)."""
    costs = row.pass_costs_ms
    stages = [cost for name, cost in costs.items() if name.startswith("stage")]
    if row.efficiency is None or "device per tick" not in costs or not stages:
        return None
    return row.efficiency * costs["device per tick"] / max(stages)


def copy_tbps(device: torch.device, gib: float = 2.0) -> float | None:
    """The card's device-to-device copy bandwidth (bytes read + written per second, median of 5 copies), in TB/s."""
    if device.type != "cuda":
        return None
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(6):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    del source, target
    return 2 * gib * 2**30 / statistics.median(times[1:]) / 1e12


def hbm_floor(model: torch.nn.Module, tbps: float, context: float = 0.0) -> float:
    """Tokens/s if every decode step only read all weights once at `tbps` TB/s (the embedding row aside), and the
    keys and values of `context` cached positions (the run's mean context; a static pass reads its whole cache
    capacity, which this floor does not count)."""
    return tbps * 1e12 / (decode_weight_bytes(model) + kv_cache_bytes(model, context))


# ------------------------------------------------------------------------------------------------------ match rate
def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def match_rates(model, prompts: list[list[int]], args, device: torch.device, budget: Budget) -> list[dict[str, Any]]:
    """Greedy tokens of EESD / PPSD vs our AR in the benchmark dtype: identical prompts, mean matching prefix. Also
    our AR itself: captured vs uncaptured (on `AR_CHECK_PROMPTS` prompts; the same kernels, so these should agree
    exactly) and vs HF `generate` (first `--hf-new-tokens` tokens of `HF_CHECK_PROMPTS` prompts: other kernels)."""
    if budget.spent():
        print("  match rates: skipped, time budget spent")
        return []
    adapter, E, n = ModelAdapter(model), args.exit_layer, args.new_tokens
    backend = "streams" if device.type == "cuda" else "sequential"
    trained = resolve_head(str(HEAD_FILE), adapter, E)
    methods = {
        f"eesd shared E={E} fixed:{args.draft_len}": {"method": "eesd", "exit_layer": E, "draft_len": args.draft_len},
        f"eesd trained E={E} fixed:{args.draft_len}": {
            "method": "eesd", "exit_layer": E, "draft_len": args.draft_len, "head": trained,
        },
        **{f"ppsd {backend} n={s}": {"method": "ppsd", "stages": s, "backend": backend} for s in PPSD_STAGES},
        f"ppsd {backend} n=2 trained E={E}": {"method": "ppsd", "stages": 2, "backend": backend, "head": trained},
    }  # fmt: skip
    ar = [executor.generate(adapter, [p], method="ar", max_new_tokens=n).sequences[0].tolist() for p in prompts]
    results = []

    def compare(label: str, outs: list[list[int]], refs: list[list[int]], used: list[list[int]], new: int) -> None:
        prefixes = [(first_difference(o, a) - len(p)) / new for o, a, p in zip(outs, refs, used, strict=True)]
        same = sum(o == a for o, a in zip(outs, refs, strict=True))
        results.append(
            {"method": label, "prompts": len(used), "new_tokens": new, "identical": same,
             "identical_rate": same / len(used), "mean_matching_prefix": statistics.fmean(prefixes)}
        )  # fmt: skip
        print(f"  match {label}: {same}/{len(used)} identical, mean prefix {results[-1]['mean_matching_prefix']:.3f}")

    def one(label: str, run: Callable[[], None]) -> None:
        if budget.spent():
            results.append({"method": label, "error": "skipped: time budget spent"})
            return
        try:
            run()
        except Exception as err:  # keep the other methods' rates
            traceback.print_exc()
            results.append({"method": label, "error": f"{type(err).__name__}: {str(err)[:300]}"})

    for label, kwargs in methods.items():
        outs = lambda kw=kwargs: [  # noqa: E731
            executor.generate(adapter, [p], max_new_tokens=n, **kw).sequences[0].tolist() for p in prompts
        ]
        one(label, lambda label=label, outs=outs: compare(label, outs(), ar, prompts, n))
    if device.type == "cuda":
        few = prompts[:AR_CHECK_PROMPTS]
        eager = lambda: [  # noqa: E731
            executor.generate(adapter, [p], method="ar", max_new_tokens=n, capture="none").sequences[0].tolist()
            for p in few
        ]
        label = "ours ar uncaptured (vs captured)"
        one(label, lambda: compare(label, eager(), ar[: len(few)], few, n))
    few, m = prompts[:HF_CHECK_PROMPTS], min(args.hf_new_tokens, n)

    def hf() -> None:
        outs = [hf_generate(model, torch.tensor([p], device=model.device), m)[0].tolist() for p in few]
        compare("hf generate (vs our AR)", outs, [a[: len(p) + m] for a, p in zip(ar, few, strict=False)], few, m)

    one("hf generate (vs our AR)", hf)
    return results


AR_CHECK_PROMPTS, HF_CHECK_PROMPTS = 5, 3


def match_all(model, dtype: torch.dtype, prompts, args, device: torch.device, budget: Budget) -> list[dict[str, Any]]:
    """`match_rates` in each of `--match-dtypes` (another dtype loads its own copy of the model)."""
    results = []
    for name in args.match_dtypes:
        other = resolve_dtype(name)
        subject = model if other == dtype else executor.load_model(args.model_path, dtype=other, device=device)
        print(f"match rate vs our AR ({name})", flush=True)
        results += [{"dtype": name, **r} for r in match_rates(subject, prompts, args, device, budget)]
    return results


# ------------------------------------------------------------------------------------------------------ report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    lines = [
        "| model | method | capture | tok/s (median) | decode tok/s | vs our AR | vs HF AR | alpha | tok/round | ideal "
        "| efficiency | PPSD vs measured tick | PPSD formula ideal | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.method} | {r.capture or '-'} | {fmt(r.tokens_per_s, '.2f')} | "
            f"{fmt(r.decode_tokens_per_s, '.2f')} | {fmt(r.speedup_vs_ar, '.2f')} | "
            f"{fmt(r.speedup_vs_hf, '.2f')} | {fmt(r.alpha, '.3f')} | {fmt(r.tokens_per_round, '.2f')} | "
            f"{fmt(r.ideal_speedup, '.2f')} | {fmt(r.efficiency, '.2f')} | {fmt(r.tick_efficiency, '.2f')} | "
            f"{fmt(r.formula_ideal, '.2f')} | {r.note} |"
        )
    return "\n".join(lines)


def default_output(device: torch.device) -> Path:
    if device.type != "cuda":
        return RESULTS / "gpu_decode_cpu_smoke.json"
    card = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")
    return RESULTS / f"gpu_decode_{card}.json"  # with --models a subset, pass --out per call


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per method (median reported), >= 5")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--no-cudnn-sdpa", action="store_true", help="SDPA without its cuDNN backend (the memory-efficient kernel "
        "then takes our masked attention): the H100 timed both alike",
    )  # fmt: skip
    parser.add_argument(
        "--prompt-len", type=int, default=32, help="the 7B shape's random prompt (its cache holds prompt + new tokens, "
        "rounded up to 256 when captured; at most 4096 in all: e.g. 3840 to time steps at a 4k context)",
    )  # fmt: skip
    parser.add_argument("--draft-len", type=int, default=3, help="k of the fixed:k policy")
    parser.add_argument("--exit-layer", type=int, default=15, help="SmolLM2 exit layer (the trained head's)")
    parser.add_argument("--match-prompts", type=int, default=12, help="real prompts for the match rate")
    parser.add_argument(
        "--match-dtypes", default=None, help="comma-separated dtypes of the match rates (default: --dtype; '' none)"
    )
    parser.add_argument("--match-first", action="store_true", help="match rates before the timed SmolLM2 rows")
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 3 match prompts: a smoke test")
    parser.add_argument("--small", action="store_true", help="the 7B shape with 4 layers (fits a CPU run)")
    parser.add_argument(
        "--models", default="smollm2,llama7b", help="comma-separated subset of smollm2,llama7b (e.g. one per GPU call)"
    )
    parser.add_argument(
        "--captures", default=None, help="comma-separated capture modes of our passes, the first for every EESD row "
        "(default compile-layers,graph,compile on CUDA, none elsewhere)",
    )  # fmt: skip
    parser.add_argument(
        "--hbm-tbps", type=float, default=3.0,
        help="HBM bandwidth of the 7B floor (3.0: what a copy measured on an H100); the floor at the bandwidth a copy "
        "measures on this card is reported too",
    )  # fmt: skip
    parser.add_argument(
        "--model-path", default="smollm2-135m", help="SmolLM2: a name or a local HF directory (carry_model.py)"
    )
    parser.add_argument(
        "--hf-new-tokens", type=int, default=32, help="new tokens of the HF anchor rows (host-bound, flat per token)"
    )
    parser.add_argument(
        "--time-budget-s", type=float, default=None, help="skip (as noted rows) the cases that would start after this"
    )
    parser.add_argument(
        "--only", default=None, help="a regular expression: time only the cases whose label it matches (e.g. "
        "'^ours ar$|^ppsd'; speedups need the 'ours ar' row of the same capture)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.only is not None:
        try:
            args.only = re.compile(args.only)
        except re.error as err:
            parser.error(f"--only is not a regular expression: {err}")
    default_captures = "compile-layers,graph,compile" if args.device.startswith("cuda") else "none"
    args.captures = [c.strip() for c in (args.captures or default_captures).split(",") if c.strip()]
    if not args.captures or set(args.captures) - {"none", "graph", "compile", "compile-layers"}:
        parser.error(f"--captures must name none, graph, compile and/or compile-layers, got {args.captures}")
    if args.runs < 5:
        parser.error("--runs must be >= 5 (medians of at least 5 runs)")
    match_dtypes = args.dtype if args.match_dtypes is None else args.match_dtypes
    args.match_dtypes = [d.strip() for d in match_dtypes.split(",") if d.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or set(args.models) - {"smollm2", "llama7b"}:
        parser.error(f"--models must name smollm2 and/or llama7b, got {args.models}")
    if args.quick:
        args.new_tokens, args.match_prompts, args.hf_new_tokens = 16, 3, 8
    if not 1 <= args.prompt_len <= LLAMA7B_POSITIONS - args.new_tokens - 1:
        parser.error(f"--prompt-len must be in [1, {LLAMA7B_POSITIONS - args.new_tokens - 1}] (the 7B shape's "
                     f"{LLAMA7B_POSITIONS} positions hold the prompt and {args.new_tokens} new tokens), "
                     f"got {args.prompt_len}")  # fmt: skip
    return args


def report(args, device: torch.device, dtype: torch.dtype, rows, matches, floors, done: bool) -> dict[str, Any]:
    smoke = device.type != "cuda"
    return {
        "label": "CPU SMOKE TEST of the script (not a GPU result, not a claim)" if smoke else "GPU benchmark",
        "complete": done, "device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs_per_method": args.runs,
        "new_tokens": args.new_tokens, "hf_new_tokens": args.hf_new_tokens, "llama7b_prompt_len": args.prompt_len,
        "cudnn_sdpa": not args.no_cudnn_sdpa,
        "batch": 1, "decoding": "greedy",
        "quick": args.quick, "small": args.small, "time_budget_s": args.time_budget_s,
        "timing": "median tokens/s over runs after one warm-up, end to end (prefill included), EOS ignored; HF rows "
        "make --hf-new-tokens tokens (their per-token time is host-bound and flat)",
        "ideal": "EESD: profiled pass costs, sum(a+1) c_ar / sum(d c_draft + c_verify(d+1)); PPSD: profiled stage "
        "costs, decoded c_ar / (ticks max_s c_stage), and formula_ideal n / (alpha + (1 - alpha) n); 7B AR: HBM floor "
        "(see module docstring)",
        "captures": args.captures, "only": args.only.pattern if args.only else None, "hbm_tbps": args.hbm_tbps,
        "hbm_floor_tokens_per_s": floors,
        "forced_acceptance": "7B-shape EESD rows use generate(accept_pattern=alpha): same work, NOT lossless",
        "models": args.models, "rows": [asdict(r) for r in rows], "match_rate_vs_our_ar": matches,
    }  # fmt: skip


def selected(cases: list[Case], args) -> list[Case]:
    """The cases `--only` keeps (all without it)."""
    return [case for case in cases if args.only is None or args.only.search(case.method)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    budget = Budget(args.time_budget_s)
    out = args.out or default_output(device)
    smoke = " -- CPU SMOKE TEST, not a GPU result" if device.type != "cuda" else ""
    print(f"device {device_name(device)}, {dtype}{smoke}", flush=True)
    rows: list[Row] = []
    matches: list[dict[str, Any]] = []
    floors: dict[str, float] = {}

    def save(model_rows: list[Row] | None = None, done: bool = False) -> None:
        text = json.dumps(report(args, device, dtype, rows + (model_rows or []), matches, floors, done), indent=2)
        write_text_atomic(out, text + "\n")

    if "smollm2" in args.models:
        tokenizer = executor.load_tokenizer(args.model_path)
        texts = [p.text for p in load_prompts("builtin")[: args.match_prompts]]
        prompts = [encode_prompt(tokenizer, text) for text in texts]
        model = executor.load_model(args.model_path, dtype=dtype, device=device)
        print("SmolLM2-135M (real weights)", flush=True)
        first, others = (selected(cases, args) for cases in smollm2_cases(model, prompts[0], args))
        if args.match_first:
            matches += match_all(model, dtype, prompts, args, device, budget)
        smollm2 = bench_model("SmolLM2-135M", first, args.runs, device, budget, save)
        if not args.match_first:
            matches += match_all(model, dtype, prompts, args, device, budget)
        save(smollm2)
        smollm2 += bench_model("SmolLM2-135M", others, args.runs, device, budget, save, earlier=smollm2)
        rows += smollm2
        save()
        del model
    if "llama7b" in args.models:
        layers = 4 if args.small else 32
        big = llama2_7b_shape(layers, dtype, device)
        name = f"Llama-2-7B shape, random, {layers} layers"
        print(name, flush=True)
        context = args.prompt_len + args.new_tokens / 2  # the mean context of a decode step
        floors[name] = hbm_floor(big, args.hbm_tbps, context)
        measured = copy_tbps(device)
        if measured:
            floors[f"{name} at the measured copy bandwidth {measured:.2f} TB/s"] = hbm_floor(big, measured, context)
        prompt = torch.randint(0, 32000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

        def save_with_floor(model_rows: list[Row]) -> None:
            for row in model_rows:
                if row.method == "ours ar" and row.decode_tokens_per_s:
                    row.note = "; ".join(
                        f"{row.decode_tokens_per_s / floor:.2f} of the floor {floor:.0f} tok/s ({label})"
                        for label, floor in floors.items()
                        if label.startswith(name)
                    )
            save(model_rows)

        cases = selected(llama7b_cases(big, prompt, args), args)
        rows += bench_model(name, cases, args.runs, device, budget, save_with_floor)
        del big
    print(table(rows))
    save(done=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
