"""GPU decode benchmark (issues 8 and 24): HF `generate` (its default and its fast path) vs our AR, EESD and PPSD,
batch 1, greedy, on one device, one run, every row over the same `--prompts` prompts and the same `--new-tokens`.

Models:
- SmolLM2-135M-Instruct, real weights (`executor.load_model("smollm2-135m")`), on the first `--prompts` built-in
  prompts (`executor.prompts`): HF `generate` AR as it comes (dynamic cache, eager) and on its documented fast path
  (`cache_implementation="static"`, which `generate` compiles with `torch.compile` on a GPU; the cache sized once for
  the longest prompt, `max_cache_len`, so no prompt recompiles), HF `assistant_early_exit`; our AR, EESD with the
  shared head and with the trained head `heads/smollm2-135m-e15.safetensors` (policies fixed:k and beta-ts), PPSD
  `streams` with n = 2 and 4 stages and the shared head, n = 2 with the trained head, and n = 2 read back every tick
  (elsewhere: the `sequential` backend, for a smoke test).
- The Llama-2-7B shape (hidden 4096, 32 layers, 32 heads, FFN 11008, vocab 32000) with random weights, on
  `--prompts` random prompts of `--prompt-len` ids (seeds 0, 1, ...): the same HF rows, our AR and EESD at forced
  acceptance alpha in {0.5, 0.7, 0.9} (`generate(accept_pattern=alpha)`: the same drafting and verify work as a real
  round with that accepted length, NOT lossless: random weights accept nothing on their own), and PPSD `streams`
  with n = 2 and 4 stages and the shared head (lossless; random weights draft next to nothing right, so its ticks
  are what a pipe of that model costs at alpha ~ 0). Plus our AR step at the prompt's context in caches of two
  capacities (`ours ar step ctx=C cache=N`: the capacity `generate` gives this prompt, and 4096): a static pass
  attends over its whole cache, so a short context in a 4k cache costs what the capacity costs.
  `--small` keeps the 7B layer shape but only 4 layers, so that it fits a CPU run.
Plus the bf16 greedy match rate of EESD / PPSD vs our AR on real prompts (`executor.prompts`, builtin set): in bf16 a
(k+1)-token verify pass and a 1-token step round differently, so near-ties can flip (docs/design.md).

Our passes run as `--captures` says (`generate(capture=...)`): "compile-layers" (the decoder layer compiled once,
passes in CUDA graphs: the default on a GPU), "graph" (CUDA graphs) and "compile" (`torch.compile(mode=
"reduce-overhead")` per pass) for AR and EESD fixed:k, so the fastest can be kept; the other EESD rows and PPSD
(each stage's step captured, one CUDA stream per stage) use the first mode listed. `--only REGEX` keeps the
matching rows. Each row also gives its warm-up runs' seconds (`first_call_s`): the capture and compilation it needed
beyond earlier rows (for HF's fast path: its compilation).

Timing: two warm-up runs (prompts 0 and 1), then `--runs` passes over the prompts, each run timed end to end (prefill
included, EOS ignored on both sides: HF with `min_new_tokens`, ours without an EOS id), the device synchronised
around it. A row gives the median tokens/s and its spread (min, quartiles, max over prompts x runs), the new tokens
every run made (`new_tokens_made`: one value, `--new-tokens`, or the row says so), and `decode tok/s` = (new tokens -
1) / (wall - prefill) for our rows.

Ideal speedups (what the implementation would reach at the measured acceptance if a round cost nothing but its passes;
from the last timed run, the last prompt):
- EESD: the passes are profiled in isolation after the runs (median per-launch time of the captured AR step c_ar,
  draft step c_d and verify pass c_v(q) for every q used, mid-sequence position). Over the run's rounds r with
  d_r drafts and a_r accepted: ideal = sum(a_r + 1) c_ar / sum(d_r c_d + c_v(d_r + 1)), a round of d_r = 0 costing
  what the decoder runs it as, the AR step (c_ar; with a trained head the AR step that also runs the head's layer,
  c_ar_head); realised = the decode tokens/s ratio EESD / our AR (same capture mode); efficiency = realised / ideal
  (target >= 0.9).
- PPSD: every stage's own pass profiled alone the same way (c_s), a tick as long as the slowest: ideal = decoded
  tokens c_ar / (ticks max_s c_s); `formula_ideal` is the paper's n / (alpha + (1 - alpha) n) (balanced stages, free
  head and links; `PPSDStats.ideal_speedup`). On one GPU the stages share the device and overlap only partly, so the
  table also gives the efficiency against ticks as long as the device measured them (CUDA events around each stage
  of every tick; `device per tick`): what the executor itself loses (transition, host, launch gaps).
- AR: the memory floor, (weight bytes + the K/V bytes of the mean context) per token at two bandwidths: the one a
  large copy measures on this device in this run (bytes read + written / time) and the card's datasheet figure
  (`DATASHEET_TBPS`; none for another card). `floors` in the JSON holds bytes and floors; each AR row gives its
  decode tok/s as a fraction of both (`of_floor`).

    python benchmarks/gpu_decode.py                          # on the GPU: benchmarks/results/gpu_decode_<card>.json
    python benchmarks/gpu_decode.py --models smollm2 --out X.json  # one model per call (a call is <= 10 min)
    python benchmarks/gpu_decode.py --device cpu --quick --small --captures none  # CPU smoke test, not a claim

On the lent GPU box (no hub, no `gguf`, 64 MiB per call) `benchmarks/gpu_session.sh` runs it (see that script).
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
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
from executor.heads import draft_cost_ratio, resolve_head
from executor.models import decode_weight_bytes, kv_cache_bytes, resolve_dtype
from executor.passes import Passes
from executor.ppsd import StagePlan, local_pipeline, make_selector
from executor.prompts import encode_prompt, load_prompts, split_prompts
from executor.runtime import check_device, copy_tbps, datasheet_tbps, synchronize
from executor.sampling import SamplingConfig
from sim.contract import captured_capacity
from sim.formats import write_text_atomic
from sim.policy import make_policy, parse_policy_spec

RESULTS = Path(__file__).parent / "results"
HEAD_FILE = Path(__file__).resolve().parent.parent / "heads" / "smollm2-135m-e15.safetensors"
ALPHAS = (0.5, 0.7, 0.9)
PPSD_STAGES = (2, 4)
HF_AR, HF_FAST = "hf generate (AR)", "hf generate static+compile (AR)"
LONG_CAPACITY = 4096  # the step rows' long cache: Llama-2's context
# HBM bandwidth by card (a substring of the device name -> TB/s, the vendor's datasheet): H100 SXM (HBM3), H200


@dataclass
class Row:
    """One table row. tokens_per_s is the median over runs (prompts x passes); speedups are of decode tokens/s over
    our AR (same model, same capture mode) and of end-to-end tokens/s over HF AR (default and fast path)."""

    model: str
    method: str
    capture: str | None
    tokens_per_s: float | None
    decode_tokens_per_s: float | None = None
    runs_tokens_per_s: list[float] = field(default_factory=list)
    prompts: int = 0  # distinct prompts the timed runs decoded
    new_tokens_made: list[int] = field(default_factory=list)  # the distinct new-token counts of the timed runs
    context: float | None = None  # the mean context of the row's decode steps (prompt + half the new tokens)
    spread_tokens_per_s: dict[str, float] | None = None  # min, q1, median, q3, max over the timed runs
    spread_decode_tokens_per_s: dict[str, float] | None = None
    floor_tokens_per_s: dict[str, float | None] = field(default_factory=dict)  # AR rows: per bandwidth (see floors)
    of_floor: dict[str, float] = field(default_factory=dict)  # AR rows: decode tok/s / floor, per bandwidth
    speedup_vs_ar: float | None = None
    speedup_vs_hf: float | None = None
    speedup_vs_hf_fast: float | None = None
    alpha: float | None = None  # measured in the last run, per position: accepted / checked draft positions
    tokens_per_round: float | None = None
    ideal_speedup: float | None = None
    efficiency: float | None = None  # realised speedup / ideal speedup
    formula_ideal: float | None = None  # PPSD: n / (alpha + (1 - alpha) n), the paper's (balanced stages, free head)
    policy_cost: float | None = None  # EESD beta-ts: the draft/verify cost ratio generate gave the policy
    tick_efficiency: float | None = None  # PPSD: realised / the ideal at the measured device time per tick
    first_call_s: float | None = None  # the warm-up run: capture and compilation this row needed beyond earlier rows
    pass_costs_ms: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Case:
    """A method to time: `run(i)` decodes prompt i once and returns (new tokens, executor stats or None for HF)."""

    method: str
    run: Callable[[int], tuple[int, Any]]
    capture: str | None = None
    ideal: Callable[[Any], tuple[float | None, dict[str, float]]] = lambda stats: (None, {})
    skip: str = ""  # why it cannot run here (the row is kept, with this note)
    prompts: int = 1
    new_tokens: int | None = None  # what every run must make (a run that makes another count is noted)
    context: float | None = None  # the mean context of its decode steps
    describe: Callable[[], str] = lambda: ""  # after the runs: how it ran (HF's fast path: compiled or not)
    policy_cost: float | None = None  # a cost-taking policy: the ratio generate gives it (its weights' estimate)


@dataclass
class Timing:
    """A case's timed runs: end-to-end and decode-only tokens/s, new tokens made, the last run's stats, and the
    warm-up's seconds (what capturing and compiling cost on first use)."""

    speeds: list[float]
    decode: list[float]
    tokens: list[int]
    stats: Any
    first_call: float


def time_case(case: Case, runs: int, device: torch.device) -> Timing:
    """Warm-up runs on prompts 0 and 1, then `runs` passes over the case's prompts, each run timed alone. Two: a
    compiled prefill meets its second prompt length in the warm-up, where `torch.compile` recompiles it for dynamic
    lengths (one warm-up left that compile in the first timed run of whichever row came first: SmolLM2's AR row on
    the 2026-12-04 H200 lease, 507 tok/s end to end at 898 decode tok/s)."""
    synchronize(device)
    begin = time.perf_counter()
    for prompt in range(min(2, case.prompts)):
        case.run(prompt)
    synchronize(device)
    timing = Timing([], [], [], None, time.perf_counter() - begin)
    for _ in range(runs):
        for prompt in range(case.prompts):
            synchronize(device)
            begin = time.perf_counter()
            new_tokens, timing.stats = case.run(prompt)
            synchronize(device)
            wall = time.perf_counter() - begin
            timing.speeds.append(new_tokens / wall)
            timing.tokens.append(new_tokens)
            if timing.stats is not None:
                timing.decode.append((new_tokens - 1) / (wall - timing.stats.prefill_time_s))
    return timing


def spread(values: list[float]) -> dict[str, float] | None:
    """Min, quartiles (inclusive method) and max of `values`, and how many there are."""
    if not values:
        return None
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"min": min(values), "q1": q1, "median": median, "q3": q3, "max": max(values), "n": len(values)}


def eesd_alpha(stats: Any) -> float | None:
    """Per-position acceptance: a round checks accepted + 1 positions, or all d when all d were accepted."""
    checked = sum(a + (a < d) for a, d in zip(stats.accepted, stats.drafted, strict=True))
    return sum(stats.accepted) / checked if checked else None


# ------------------------------------------------------------------------------------------------------ profiling
REPEATS, WARMUPS, BATCHES = 20, 3, 5
LAUNCHES = REPEATS + WARMUPS  # launches between two resets at most


def launch_time_ms(launch: Callable[[], None], device: torch.device, reset: Callable[[], None]) -> float:
    """Median over BATCHES of the mean time of REPEATS back-to-back launches (`launch_times_ms`)."""
    return statistics.median(launch_times_ms(launch, device, reset))


def launch_times_ms(launch: Callable[[], None], device: torch.device, reset: Callable[[], None]) -> list[float]:
    """The mean time of REPEATS back-to-back launches, in each of BATCHES batches (after WARMUPS warm-up launches).
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
    return times


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
                costs[f"verify q={q}"] = launch_time_ms(
                    lambda q=q: eesd.verify(q - 1), device, self._drafted(eesd, at, q - 1)
                )
        return costs

    @staticmethod
    def _drafted(eesd: Any, at: int, k: int) -> Callable[[], None]:
        """The device's inputs as k draft steps from `at` leave them for a verify pass: positions[1] = at + k and the
        draft cursor at k (mod the longest draft; a verify pass of bucketed width reads its round's count there, and
        resets it to 0, so back-to-back launches need it set again)."""

        def reset() -> None:
            eesd.load([1], [at + k], 1)
            eesd.draft_cursor.fill_(k % eesd.drafts.shape[1])

        return reset

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
        return stats.decoded_tokens * costs["ar"] / (stats.ticks * tick), costs


# ------------------------------------------------------------------------------------------------------ cases
def mean_context(prompts: list[list[int]], new_tokens: int) -> float:
    """The mean context of a decode step over the prompts: prompt length + half the new tokens."""
    return statistics.fmean(len(p) for p in prompts) + new_tokens / 2


def is_hf(case: Case) -> bool:
    return case.method.startswith("hf ")


def hf_case(model, prompts: list[list[int]], new_tokens: int, method: str, **kwargs: Any) -> Case:
    """HF `generate` (greedy, EOS ignored), `new_tokens` new tokens on each prompt, as ours make."""
    ids = [torch.tensor([p], device=model.device) for p in prompts]

    def run(i: int) -> tuple[int, Any]:
        return hf_generate(model, ids[i], new_tokens, **kwargs).shape[1] - ids[i].shape[1], None

    return Case(method, run, prompts=len(prompts), new_tokens=new_tokens, context=mean_context(prompts, new_tokens))


def hf_fast_case(model, prompts: list[list[int]], new_tokens: int) -> Case:
    """HF `generate` on its documented fast path: a static cache (`cache_implementation="static"`), with which
    `generate` compiles the model's forward itself on a GPU (`torch.compile`, its default `CompileConfig`: mode
    "reduce-overhead"). One cache capacity for every prompt (`max_cache_len`, the longest prompt + the new tokens,
    rounded up as our captured caches are), so no prompt recompiles."""
    capacity = captured_capacity(max(map(len, prompts)) + new_tokens)
    case = hf_case(model, prompts, new_tokens, HF_FAST, cache_implementation="static", max_cache_len=capacity)
    return dataclasses.replace(case, describe=lambda: hf_fast_note(model))


def hf_fast_note(model) -> str:
    """How HF's fast path ran: whether `generate` compiled the forward (it does on a GPU only) and its cache size."""
    config = getattr(model, "_last_compile_config", None)
    if getattr(model, "_compiled_call", None) is not None:
        compiled = f"HF compiled its forward (torch.compile mode={getattr(config, 'mode', '?')})"
    else:
        compiled = "HF did not compile (generate compiles on a GPU only)"
    return f"{compiled}; static cache of {getattr(model, '_previous_max_cache_length', '?')} positions"


def hf_generate(model, ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> torch.Tensor:
    """HF `generate`, greedy, exactly `new_tokens` new tokens (EOS ignored)."""
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0, **kwargs,
    )  # fmt: skip


def ours_case(adapter: ModelAdapter, prompts: list[list[int]], new_tokens: int, label: str, **kwargs: Any) -> Case:
    def run(i: int) -> tuple[int, Any]:
        # a forced pattern seeded per prompt: one seed for all repeats one short draw sequence (the 7B rows asked
        # 0.5 / 0.7 / 0.9 accepted 0.38 / 0.62 / 0.86, the rows' `alpha`)
        seeded = {"seed": i} if kwargs.get("accept_pattern") is not None else {}
        result = executor.generate(adapter, [prompts[i]], max_new_tokens=new_tokens, **kwargs, **seeded)
        return result.stats.new_tokens, result.stats

    context = mean_context(prompts, new_tokens)
    return Case(label, run, kwargs.get("capture"), prompts=len(prompts), new_tokens=new_tokens, context=context)


def eesd_case(adapter, prompts, new_tokens: int, label: str, exit_layer: int, head, policy: str, capture, **kw) -> Case:
    case = ours_case(
        adapter, prompts, new_tokens, label, method="eesd", exit_layer=exit_layer, head=head, policy=policy,
        capture=capture, **kw,
    )  # fmt: skip
    profile = PassProfile(adapter, prompts[-1], new_tokens, capture)  # the last timed run's prompt
    ideal = lambda stats: profile.eesd_ideal(stats, exit_layer, head, policy)  # noqa: E731
    takes_cost = parse_policy_spec(policy)[0] in ("beta-ts", "calibration-ts")
    cost = draft_cost_ratio(adapter, exit_layer, resolve_head(head, adapter, exit_layer)) if takes_cost else None
    return dataclasses.replace(case, ideal=ideal, policy_cost=cost)


def ppsd_case(
    adapter, prompts, new_tokens: int, stages: int, device: torch.device, capture: str, head=None,
    name: str = "shared", sync_every: int | None = None,
) -> Case:  # fmt: skip
    """PPSD `streams` with the shared head at the end of stage 1, or a trained `head` at its own exit layer (stage 1
    ending there where it lies past balanced stage 1's end, as `executor.ppsd.plan_stages` lays it out); the pipe
    chained on the device (default: 8 ticks per host read when captured), or read back every `sync_every` ticks."""
    backend = "streams" if device.type == "cuda" else "sequential"  # a CPU smoke run: the reference backend
    label = f"ppsd {backend} n={stages}" + ("" if head is None else f" {name}")
    label += "" if sync_every is None else f" sync_every={sync_every}"
    kwargs = {"method": "ppsd", "stages": stages, "backend": backend, "capture": capture, "head": head,
              "sync_every": sync_every}  # fmt: skip
    case = ours_case(adapter, prompts, new_tokens, label, **kwargs)
    profile = PassProfile(adapter, prompts[-1], new_tokens, capture)
    return dataclasses.replace(case, ideal=lambda stats: profile.ppsd_ideal(stats, backend, head))


def ar_cases(adapter: ModelAdapter, prompts: list[list[int]], n: int, captures: list[str], every_token: bool) -> list:
    """Our AR per capture mode (default `sync_every`: 8 tokens per host read when captured); with `every_token`, the
    first mode once more reading every token back (`sync_every=1`): what running ahead of the host is worth."""
    cases = [ours_case(adapter, prompts, n, "ours ar", method="ar", capture=c) for c in captures]
    if every_token and captures[0] != "none":
        label = "ours ar sync_every=1"
        cases.append(ours_case(adapter, prompts, n, label, method="ar", capture=captures[0], sync_every=1))
        cases.append(unfused(ours_case(adapter, prompts, n, "ours ar unfused", method="ar", capture=captures[0])))
    return cases


@contextmanager
def executor_switch(name: str, value: bool) -> Iterator[None]:
    """`executor.passes.<name>` set to `value` inside, restored after."""
    old = getattr(executor_passes, name)
    setattr(executor_passes, name, value)
    try:
        yield
    finally:
        setattr(executor_passes, name, old)


def switched(case: Case, name: str, value: bool, label: str) -> Case:
    """The case run with `executor.passes.<name>` = `value` (`executor_switch`), as `label`."""

    def run(i: int) -> tuple[int, Any]:
        with executor_switch(name, value):
            return case.run(i)

    return dataclasses.replace(case, method=label, run=run)


def unfused(case: Case) -> Case:
    """The case with captured passes on unfused projections (`executor.passes.FUSE_CAPTURED` off while it runs):
    what fusing q/k/v and gate/up (`executor.fusion`) is worth. Its runs recapture once, then reuse their graphs."""
    return switched(case, "FUSE_CAPTURED", False, case.method)


def span_buckets_known() -> bool:
    """Whether the executor's static passes attend over span buckets that can be switched off
    (`executor.passes.SPAN_BUCKETS`): then the AR rows get an A/B twin with them off."""
    return hasattr(executor_passes, "SPAN_BUCKETS")


def baseline_cases(model, adapter: ModelAdapter, prompts: list[list[int]], n: int, capture: str) -> list[Case]:
    """Our AR in `capture` and HF AR as it comes and on its fast path: the rows every other row is compared with,
    timed first so that a time budget keeps them."""
    ours = ar_cases(adapter, prompts, n, [capture], every_token=False)
    if span_buckets_known():
        ours.append(switched(ours[0], "SPAN_BUCKETS", False, "ours ar buckets off"))
    if hasattr(executor_passes, "PREFILL_BUCKETS") and len({len(p) for p in prompts}) > 1:  # prompts of new lengths
        ours.append(switched(ours[0], "PREFILL_BUCKETS", False, "ours ar prefill buckets off"))
    return ours + [hf_case(model, prompts, n, HF_AR), hf_fast_case(model, prompts, n)]


def trained_head(args, adapter: ModelAdapter):
    """The trained head at --exit-layer, or None (its rows left out, said once) when it is the default SmolLM2 file
    and that is not on this machine (a device call whose carry left `heads/` behind) or the model is another; a
    --trained-head named and missing is an error."""
    default = args.trained_head == str(HEAD_FILE)
    if default and (not HEAD_FILE.is_file() or real_model_name(args.model_path) != "SmolLM2-135M"):
        if not getattr(args, "_said_no_head", False):
            print(f"  no trained head for this model at {HEAD_FILE}: the trained-head rows are left out")
            args._said_no_head = True
        return None
    return resolve_head(args.trained_head, adapter, args.exit_layer)


def smollm2_cases(model, prompts: list[list[int]], args) -> tuple[list[Case], list[Case]]:
    """(The baselines and our rows in the first capture mode, the other modes' AR and EESD fixed:k rows). `main`
    times the second list after the match rates: a compile costs minutes on a slow host, so under a time budget those
    are the rows to lose."""
    adapter, n, E, main = ModelAdapter(model), args.new_tokens, args.exit_layer, args.captures[0]
    trained = trained_head(args, adapter)
    shared = resolve_head("shared", adapter, E)
    k = f"fixed:{args.draft_len}"
    cases = baseline_cases(model, adapter, prompts, n, main)
    for head_name, head in (("shared", shared), ("trained", trained)):
        if head is None:
            continue
        for policy in (k, "beta-ts"):
            label = f"eesd {head_name} E={E} {policy}"
            cases.append(eesd_case(adapter, prompts, n, label, E, head, policy, main))
    cases += [ppsd_case(adapter, prompts, n, stages, model.device, main) for stages in PPSD_STAGES]
    cases.append(ppsd_case(adapter, prompts, n, 2, model.device, main, sync_every=1))  # what chaining ticks is worth
    if trained is not None:  # 2 stages, the trained head at its own exit layer (inside stage 1, or ending it)
        cases.append(ppsd_case(adapter, prompts, n, 2, model.device, main, trained, f"trained E={E}"))
    cases += ar_cases(adapter, prompts, n, [main], every_token=True)[1:]
    cases.append(hf_case(model, prompts, n, f"hf assistant_early_exit={E}", assistant_early_exit=E))
    if args.hf_last:  # HF's rows after ours: a time budget then loses the baselines, not our rows
        cases = [c for c in cases if not is_hf(c)] + [c for c in cases if is_hf(c)]
    others: list[Case] = []
    for capture in args.captures[1:]:
        others += ar_cases(adapter, prompts, n, [capture], False)
        others.append(eesd_case(adapter, prompts, n, f"eesd shared E={E} {k}", E, shared, k, capture))
    return cases, others


def llama7b_cases(model, prompts: list[list[int]], args) -> tuple[list[Case], list[Case]]:
    """(The baselines, the rest): our AR and HF AR (default, fast path); then EESD E = L/2 fixed:k at each forced
    alpha and PPSD n in `PPSD_STAGES` in the first capture mode, our AR in the others (the rows `benchmarks/
    sim_vs_gpu.py --predict` names for the 7B shape). `main` times the step rows between the two lists."""
    adapter, n, main = ModelAdapter(model), args.new_tokens, args.captures[0]
    E = max(1, model.config.num_hidden_layers // 2)
    shared = resolve_head("shared", adapter, E)
    k = f"fixed:{args.draft_len}"
    cases = []
    for alpha in ALPHAS:
        label = f"eesd shared E={E} {k} forced alpha={alpha}"
        cases.append(eesd_case(adapter, prompts, n, label, E, shared, k, main, accept_pattern=alpha))
    cases += [ppsd_case(adapter, prompts, n, stages, model.device, main) for stages in PPSD_STAGES]
    cases += ar_cases(adapter, prompts, n, [main], every_token=True)[1:]
    cases += ar_cases(adapter, prompts, n, args.captures[1:], False)
    return baseline_cases(model, adapter, prompts, n, main), cases


def step_label(context: int, capacity: int, buckets: bool = True) -> str:
    return f"ours ar step ctx={context} cache={capacity}" + ("" if buckets else " buckets off")


def step_capacities(context: int, new_tokens: int, capture: str) -> list[int]:
    """The caches the step rows time a `context` in: the capacity `generate` gives that prompt and `new_tokens` (at
    least the REPEATS positions a batch of launches writes), and LONG_CAPACITY (one row where they are the same)."""
    own = context + max(new_tokens, REPEATS) + 1
    own = captured_capacity(own) if capture != "none" else own
    return sorted({own, LONG_CAPACITY})


def step_row(name: str, adapter: ModelAdapter, context: int, capacity: int, capture: str, buckets: bool = True) -> Row:
    """Our captured AR step at `context` in a cache of `capacity` positions: back-to-back chained launches
    (`launch_times_ms`, positions context .. context + REPEATS), no host reads. tok/s = 1000 / ms per step. Where
    the executor has span buckets (`span_buckets_known`), each launch attends over the bucket of the batch's furthest
    position, or over the whole cache with `buckets` off."""
    prompt = [1] * context  # sizes the cache; the timed launches start from position `context`
    profile = PassProfile(adapter, prompt, capacity - context - 1, capture)
    label = step_label(context, capacity, buckets)
    with torch.inference_mode():
        ar = profile.setup("ar", None, None, "fixed:1")
        if ar.cache.max_len != capacity:
            raise ValueError(f"{label}: the cache holds {ar.cache.max_len} positions")
        launch = (lambda: ar.ar(furthest=context + REPEATS - 1)) if span_buckets_known() else ar.ar
        with executor_switch("SPAN_BUCKETS", buckets) if span_buckets_known() else nullcontext():
            times = launch_times_ms(launch, adapter.device, lambda: ar.load([1], [context], 1))
    rates = [1e3 / t for t in times]
    return Row(
        model=name, method=label, capture=capture, tokens_per_s=statistics.median(rates),
        decode_tokens_per_s=statistics.median(rates), runs_tokens_per_s=rates, context=context + REPEATS / 2,
        spread_tokens_per_s=spread(rates), spread_decode_tokens_per_s=spread(rates),
        pass_costs_ms={"ar step": statistics.median(times)},
        note=f"{BATCHES} batches of {REPEATS} chained launches, no host reads",
    )  # fmt: skip


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


@dataclass(frozen=True)
class Job:
    """One row to produce: `run()` measures it (a case's runs, or a step row's launches)."""

    method: str
    capture: str | None
    run: Callable[[], Row]
    skip: str = ""


def case_job(name: str, case: Case, runs: int, device: torch.device) -> Job:
    return Job(case.method, case.capture, lambda: measure(name, case, runs, device), case.skip)


def bench_model(
    name: str, cases: list[Case], runs: int, device: torch.device, budget: Budget, save, earlier: list[Row] = ()
) -> list[Row]:
    """Time every case (`run_jobs`)."""
    return run_jobs([case_job(name, case, runs, device) for case in cases], name, budget, save, earlier)


def run_jobs(jobs: list[Job], name: str, budget: Budget, save, earlier: list[Row] = ()) -> list[Row]:
    """Run every job; `save(earlier + rows)` after each row, so a run cut short by its time limit keeps what it
    measured (speedups count the same model's `earlier` rows: its HF and AR rows)."""
    rows: list[Row] = list(earlier)
    for job in jobs:
        skip = job.skip or ("skipped: time budget spent" if budget.spent() else "")
        if skip:
            rows.append(Row(model=name, method=job.method, capture=job.capture, tokens_per_s=None, note=skip))
            print(f"  {job.method}: {skip}", flush=True)
            continue
        try:
            row = job.run()
        except Exception as err:  # one broken case must not cost the others' figures (one GPU call, no rerun)
            traceback.print_exc()
            note = f"error: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            rows.append(Row(model=name, method=job.method, capture=job.capture, tokens_per_s=None, note=note))
            save(rows)
            print(f"  {job.method}: {note}", flush=True)
            continue
        rows.append(row)
        add_speedups(rows)
        save(rows)
        print(f"  {job.method} [{job.capture}]: {row.tokens_per_s:.2f} tok/s", flush=True)
    return rows[len(earlier) :]


def measure(name: str, case: Case, runs: int, device: torch.device) -> Row:
    timing = time_case(case, runs, device)
    speeds, decode, stats = timing.speeds, timing.decode, timing.stats
    row = Row(
        model=name, method=case.method, capture=case.capture, tokens_per_s=statistics.median(speeds),
        decode_tokens_per_s=statistics.median(decode) if decode else None, runs_tokens_per_s=speeds,
        prompts=case.prompts, new_tokens_made=sorted(set(timing.tokens)), context=case.context,
        spread_tokens_per_s=spread(speeds), spread_decode_tokens_per_s=spread(decode), first_call_s=timing.first_call,
        policy_cost=case.policy_cost,
    )  # fmt: skip
    notes = [case.describe()]
    if case.new_tokens is not None and row.new_tokens_made != [case.new_tokens]:
        notes.append(f"made {row.new_tokens_made} new tokens, asked {case.new_tokens}")
    row.note = "; ".join(note for note in notes if note)
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
    """Decode speedups over our AR with the same capture mode (PPSD: over the fastest AR); end to end over HF AR as
    it comes and on its fast path (the step rows, which time no prefill, get none of these)."""
    ars = {r.capture: r.decode_tokens_per_s for r in rows if r.method == "ours ar" and r.decode_tokens_per_s}
    hf = next((r.tokens_per_s for r in rows if r.method == HF_AR), None)
    hf_fast = next((r.tokens_per_s for r in rows if r.method == HF_FAST), None)
    for row in rows:
        if row.tokens_per_s is None or row.method.startswith("ours ar step"):
            continue
        ar = ars.get(row.capture) or max(ars.values(), default=None)
        if row.decode_tokens_per_s and ar:
            row.speedup_vs_ar = row.decode_tokens_per_s / ar
        row.speedup_vs_hf = row.tokens_per_s / hf if hf else None
        row.speedup_vs_hf_fast = row.tokens_per_s / hf_fast if hf_fast else None
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


def bandwidths(device: torch.device) -> dict[str, float | None]:
    """TB/s the floors are taken at: 'copy' (measured now, `copy_tbps`) and 'datasheet' (`datasheet_tbps`)."""
    return {"copy": copy_tbps(device), "datasheet": datasheet_tbps(device)}


def hbm_floor(model: torch.nn.Module, tbps: float, context: float = 0.0) -> float:
    """Tokens/s if every decode step only read all weights once at `tbps` TB/s (the embedding row aside), and the
    keys and values of `context` cached positions (a static pass reads its whole cache capacity, which this floor
    does not count: the step rows show what that costs)."""
    return tbps * 1e12 / (decode_weight_bytes(model) + kv_cache_bytes(model, context))


def floor_entry(name: str, model: torch.nn.Module, context: float, tbps: dict[str, float | None]) -> dict[str, Any]:
    """The memory floor of an AR step of `model` at `context`: the bytes it must read and tokens/s at each
    bandwidth (None where the bandwidth is unknown)."""
    weights, kv = decode_weight_bytes(model), kv_cache_bytes(model, context)
    return {
        "model": name, "context": context, "weight_bytes": weights, "kv_bytes": kv, "bytes_per_token": weights + kv,
        "bandwidth_tbps": dict(tbps),
        "tokens_per_s": {k: None if v is None else hbm_floor(model, v, context) for k, v in tbps.items()},
    }  # fmt: skip


def add_floors(name: str, model: torch.nn.Module, rows: list[Row], tbps, floors: list[dict[str, Any]]) -> None:
    """Our AR rows (end to end and step) get the floor at their context and their decode tok/s as a fraction of it;
    each distinct (model, context) floor is listed once in `floors`."""
    for row in rows:
        if not row.method.startswith("ours ar") or row.context is None or not row.decode_tokens_per_s:
            continue
        entry = next((f for f in floors if f["model"] == name and f["context"] == row.context), None)
        if entry is None:
            entry = floor_entry(name, model, row.context, tbps)
            floors.append(entry)
        row.floor_tokens_per_s = entry["tokens_per_s"]
        row.of_floor = {k: row.decode_tokens_per_s / v for k, v in entry["tokens_per_s"].items() if v}


# ------------------------------------------------------------------------------------------------------ match rate
def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def match_rates(model, prompts: list[list[int]], args, device: torch.device, budget: Budget) -> list[dict[str, Any]]:
    """Greedy tokens of EESD / PPSD vs our AR in the benchmark dtype: identical prompts, mean matching prefix. Also
    our AR itself: captured vs uncaptured (on `AR_CHECK_PROMPTS` prompts; the same kernels, so these should agree
    exactly) and vs HF `generate` (`HF_CHECK_PROMPTS` prompts: other kernels)."""
    if budget.spent():
        print("  match rates: skipped, time budget spent")
        return []
    adapter, E, n = ModelAdapter(model), args.exit_layer, args.new_tokens
    backend = "streams" if device.type == "cuda" else "sequential"
    trained = trained_head(args, adapter)
    methods = {
        f"eesd shared E={E} fixed:{args.draft_len}": {"method": "eesd", "exit_layer": E, "draft_len": args.draft_len},
        f"eesd trained E={E} fixed:{args.draft_len}": {
            "method": "eesd", "exit_layer": E, "draft_len": args.draft_len, "head": trained,
        },
        **{f"ppsd {backend} n={s}": {"method": "ppsd", "stages": s, "backend": backend} for s in PPSD_STAGES},
        f"ppsd {backend} n=2 trained E={E}": {"method": "ppsd", "stages": 2, "backend": backend, "head": trained},
    }  # fmt: skip
    methods = {label: kwargs for label, kwargs in methods.items() if kwargs.get("head", True) is not None}
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
    few, m = prompts[:HF_CHECK_PROMPTS], n

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


def spread_text(values: dict[str, float] | None) -> str:
    return "-" if values is None else f"{values['q1']:.1f}-{values['q3']:.1f} ({values['min']:.1f}-{values['max']:.1f})"


def table(rows: list[Row]) -> str:
    lines = [
        "| model | method | capture | prompts x runs | new tokens | tok/s (median) | IQR (min-max) | decode tok/s "
        "| vs our AR | vs HF AR | vs HF fast | of floor (copy, datasheet) | alpha | tok/round | ideal | efficiency "
        "| PPSD vs measured tick | PPSD formula ideal | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- |",
    ]
    for r in rows:
        floor = ", ".join(fmt(r.of_floor.get(k), ".2f") for k in ("copy", "datasheet")) if r.of_floor else "-"
        runs = f"{r.prompts} x {len(r.runs_tokens_per_s) // r.prompts}" if r.prompts else "-"
        lines.append(
            f"| {r.model} | {r.method} | {r.capture or '-'} | {runs} | "
            f"{'/'.join(map(str, r.new_tokens_made)) or '-'} | {fmt(r.tokens_per_s, '.2f')} | "
            f"{spread_text(r.spread_tokens_per_s)} | {fmt(r.decode_tokens_per_s, '.2f')} | "
            f"{fmt(r.speedup_vs_ar, '.2f')} | {fmt(r.speedup_vs_hf, '.2f')} | {fmt(r.speedup_vs_hf_fast, '.2f')} | "
            f"{floor} | {fmt(r.alpha, '.3f')} | {fmt(r.tokens_per_round, '.2f')} | {fmt(r.ideal_speedup, '.2f')} | "
            f"{fmt(r.efficiency, '.2f')} | {fmt(r.tick_efficiency, '.2f')} | {fmt(r.formula_ideal, '.2f')} | {r.note} |"
        )
    return "\n".join(lines)


def default_output(device: torch.device) -> Path:
    if device.type != "cuda":
        return RESULTS / "gpu_decode_cpu_smoke.json"
    card = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")
    return RESULTS / f"gpu_decode_{card}.json"  # with --models a subset, pass --out per call


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--prompts", type=int, default=8, help="prompts every row decodes: SmolLM2's first built-in prompts, the 7B "
        "shape's random ones",
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int, default=1, help="timed passes over the prompts per row (prompts x runs >= 5 timed runs)"
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens of every run, HF's and ours")
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
    parser.add_argument(
        "--hf-last",
        action="store_true",
        help="SmolLM2: time HF's rows after ours (default: first, as the baselines a time budget keeps)",
    )
    parser.add_argument(
        "--trained-head", default=str(HEAD_FILE), metavar="FILE",
        help=f"SmolLM2's trained head at --exit-layer (default: {HEAD_FILE.relative_to(HEAD_FILE.parents[1])})",
    )  # fmt: skip
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
        "--model-path", default="smollm2-135m",
        help="the real model of the `smollm2` rows: SmolLM2 by default, or another Llama-family model the executor "
        "loads (a packaged name, a GGUF file or a local HF directory; carry_model.py)",
    )  # fmt: skip
    parser.add_argument(
        "--prompt-set", choices=("builtin", "humaneval"), default="builtin",
        help="the real model's prompts: the first --prompts built-in ones, or the held-out HumanEval prompts (a code "
        "model's, never trained on by its heads)",
    )  # fmt: skip
    parser.add_argument(
        "--time-budget-s", type=float, default=None, help="skip (as noted rows) the cases that would start after this"
    )
    parser.add_argument(
        "--only", default=None, help="a regular expression: time only the cases whose label it matches (e.g. "
        "'^ours ar$|^ppsd'; speedups need the 'ours ar' row of the same capture)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from sim.formats import check_benchmark_args

    check_benchmark_args(args, counts=("new_tokens",))
    if args.trained_head != str(HEAD_FILE):  # the default may be left behind by a device call's carry (said later)
        check_benchmark_args(args, inputs=("trained_head",))
    if args.only is not None:
        try:
            args.only = re.compile(args.only)
        except re.error as err:
            parser.error(f"--only is not a regular expression: {err}")
    default_captures = "compile-layers,graph,compile" if args.device.startswith("cuda") else "none"
    args.captures = [c.strip() for c in (args.captures or default_captures).split(",") if c.strip()]
    if not args.captures or set(args.captures) - {"none", "graph", "compile", "compile-layers"}:
        parser.error(f"--captures must name none, graph, compile and/or compile-layers, got {args.captures}")
    available = len(prompt_texts(args.prompt_set))
    if not 1 <= args.prompts <= available:
        parser.error(f"--prompts must be in [1, {available}] (the {args.prompt_set} prompts), got {args.prompts}")
    if args.runs < 1 or args.prompts * args.runs < 5:
        parser.error(f"--runs x --prompts must be >= 5 (medians of at least 5 timed runs), got {args.runs} x "
                     f"{args.prompts}")  # fmt: skip
    match_dtypes = args.dtype if args.match_dtypes is None else args.match_dtypes
    args.match_dtypes = [d.strip() for d in match_dtypes.split(",") if d.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or set(args.models) - {"smollm2", "llama7b"}:
        parser.error(f"--models must name smollm2 and/or llama7b, got {args.models}")
    if args.quick:
        args.new_tokens, args.match_prompts = 16, 3
    if not 1 <= args.prompt_len <= LLAMA7B_POSITIONS - args.new_tokens - 1:
        parser.error(f"--prompt-len must be in [1, {LLAMA7B_POSITIONS - args.new_tokens - 1}] (the 7B shape's "
                     f"{LLAMA7B_POSITIONS} positions hold the prompt and {args.new_tokens} new tokens), "
                     f"got {args.prompt_len}")  # fmt: skip
    return args


def report(args, device: torch.device, dtype: torch.dtype, rows, matches, tbps, floors, done: bool) -> dict[str, Any]:
    smoke = device.type != "cuda"
    return {
        "label": "CPU SMOKE TEST of the script (not a GPU result, not a claim)" if smoke else "GPU benchmark",
        "complete": done, "device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "prompts_per_row": args.prompts,
        "runs_per_prompt": args.runs, "new_tokens": args.new_tokens, "llama7b_prompt_len": args.prompt_len,
        "cudnn_sdpa": not args.no_cudnn_sdpa, "trained_head": str(args.trained_head),
        "batch": 1, "decoding": "greedy",
        "quick": args.quick, "small": args.small, "time_budget_s": args.time_budget_s,
        "timing": "two warm-up runs (prompts 0 and 1), then --runs passes over the --prompts prompts, each run timed "
        "end to end (prefill included), EOS ignored, HF and ours making --new-tokens tokens (new_tokens_made: what "
        "they made); tokens/s: the median and the spread over prompts x runs",
        "hf_rows": f"'{HF_AR}': generate as it comes (dynamic cache, eager); '{HF_FAST}': cache_implementation="
        "'static' (generate compiles the forward on a GPU; the row's note says whether it did)",
        "ideal": "EESD: profiled pass costs, sum(a+1) c_ar / sum(d c_draft + c_verify(d+1)); PPSD: profiled stage "
        "costs, decoded c_ar / (ticks max_s c_stage), and formula_ideal n / (alpha + (1 - alpha) n); AR: the memory "
        "floor (see module docstring)",
        "captures": args.captures, "only": args.only.pattern if args.only else None,
        "bandwidth_tbps": tbps, "floors": floors,
        "forced_acceptance": "7B-shape EESD rows use generate(accept_pattern=alpha): same work, NOT lossless",
        "models": args.models, "rows": [asdict(r) for r in rows], "match_rate_vs_our_ar": matches,
    }  # fmt: skip


def prompt_texts(prompt_set: str) -> list[str]:
    """The real model's prompts: the built-in set in its order, or HumanEval's held-out split (`split_prompts`)."""
    if prompt_set == "builtin":
        return [p.text for p in load_prompts("builtin")]
    return [p.text for p in split_prompts(load_prompts(prompt_set)).held_out]


def real_model_name(model_path: str) -> str:
    """The rows' model name: SmolLM2-135M for SmolLM2 (by its packaged name or a file or folder named after it),
    else the name or the file's stem as given."""
    path = Path(model_path)
    stem = path.stem if path.suffix == ".gguf" else path.name  # a packaged name may hold a dot (qwen2.5-coder-0.5b)
    return "SmolLM2-135M" if stem.lower().startswith("smollm2-135m") else stem


def selected(cases: list[Case], args) -> list[Case]:
    """The cases `--only` keeps (all without it)."""
    return [case for case in cases if args.only is None or args.only.search(case.method)]


def random_prompts(count: int, length: int, vocab_size: int) -> list[list[int]]:
    """`count` prompts of `length` random token ids, prompt i drawn with seed i."""
    return [
        torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(i)).tolist()
        for i in range(count)
    ]


def step_jobs(name: str, model, args) -> list[Job]:
    """The 7B table's step rows (`step_row`) at `--prompt-len` in each of `step_capacities`, as `--only` keeps them."""
    adapter, capture, context = ModelAdapter(model), args.captures[0], args.prompt_len
    jobs = []
    for capacity in step_capacities(context, args.new_tokens, capture):
        for buckets in (True, False) if span_buckets_known() else (True,):
            label = step_label(context, capacity, buckets)
            if args.only is None or args.only.search(label):
                run = lambda c=capacity, b=buckets: step_row(name, adapter, context, c, capture, b)  # noqa: E731
                jobs.append(Job(label, capture, run))
    return jobs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = check_device(args.device), resolve_dtype(args.dtype)
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    budget = Budget(args.time_budget_s)
    out = args.out or default_output(device)
    smoke = " -- CPU SMOKE TEST, not a GPU result" if device.type != "cuda" else ""
    print(f"device {device_name(device)}, {dtype}{smoke}", flush=True)
    tbps = bandwidths(device)
    print(f"bandwidth: copy {tbps['copy']:.3f} TB/s (measured), datasheet {fmt(tbps['datasheet'], '.2f')} TB/s")
    rows: list[Row] = []
    matches: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []

    def save(model_rows: list[Row] | None = None, done: bool = False) -> None:
        document = report(args, device, dtype, rows + (model_rows or []), matches, tbps, floors, done)
        write_text_atomic(out, json.dumps(document, indent=2) + "\n")

    def saver(name: str, model) -> Callable[[list[Row]], None]:
        return lambda model_rows: (add_floors(name, model, model_rows, tbps, floors), save(model_rows))

    if "smollm2" in args.models:
        name = real_model_name(args.model_path)
        tokenizer = executor.load_tokenizer(args.model_path)
        texts = prompt_texts(args.prompt_set)[: max(args.prompts, args.match_prompts)]
        prompts = [encode_prompt(tokenizer, text) for text in texts]
        model = executor.load_model(args.model_path, dtype=dtype, device=device)
        print(f"{name} (real weights), {args.prompt_set} prompts", flush=True)
        first, others = (selected(cases, args) for cases in smollm2_cases(model, prompts[: args.prompts], args))
        if args.match_first:
            matches += match_all(model, dtype, prompts[: args.match_prompts], args, device, budget)
        smollm2 = bench_model(name, first, args.runs, device, budget, saver(name, model))
        if not args.match_first:
            matches += match_all(model, dtype, prompts[: args.match_prompts], args, device, budget)
        saver(name, model)(smollm2)
        smollm2 += bench_model(name, others, args.runs, device, budget, saver(name, model), earlier=smollm2)
        rows += smollm2
        save()
        del model
    if "llama7b" in args.models:
        layers = 4 if args.small else 32
        big = llama2_7b_shape(layers, dtype, device)
        name = f"Llama-2-7B shape, random, {layers} layers"
        print(name, flush=True)
        prompts = random_prompts(args.prompts, args.prompt_len, big.config.vocab_size)
        first, rest = (selected(cases, args) for cases in llama7b_cases(big, prompts, args))
        jobs = [case_job(name, case, args.runs, device) for case in first] + step_jobs(name, big, args)
        big_rows = run_jobs(jobs, name, budget, saver(name, big))
        big_rows += bench_model(name, rest, args.runs, device, budget, saver(name, big), earlier=big_rows)
        rows += big_rows
        del big
    print(table(rows))
    save(done=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
