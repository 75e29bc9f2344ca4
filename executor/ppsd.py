"""PPSD: the verify-while-draft pipeline (Li et al. 2025, arXiv 2509.19368), greedy or exact sampling.

The L decoder layers are cut into n stages at boundaries 0 = b_0 < b_1 < .. < b_n = L. The exit head (the model's
own final norm + LM head, LayerSkip's shared exit) sits at layer E inside stage 1 (default E = b_1). One *tick*:

    1. Every stage runs the token it holds through its layers, so n tokens are in flight, one per stage. Stage 1
       also applies the exit head at E and drafts the next token, which enters stage 1 on the next tick.
    2. The token x_p leaving stage n yields the full model's prediction f for position p + 1, which is emitted.
       If f equals the draft already in flight for p + 1, the draft is *confirmed* and nothing was wasted (the
       verify rule at depth 1, `executor.verify.tick_verdict`).
    3. Otherwise the younger tokens in flight (positions p + 1 ..) are *flushed*: every stage drops its output and
       rolls the KV of its own layers back to p + 1, and f enters stage 1 on the next tick.
    4. The other tokens move one stage down.

Every emitted token is the full model's prediction from the committed prefix, so the output equals AR greedy (and,
with exact sampling, where a position's token is a function of the logits, the seed and the position, seeded AR).
With balanced stages, a free head and free links, a confirmed token costs 1 tick and a flushed one n ticks, so at
acceptance alpha the speedup over AR on the same hardware is n / (alpha + (1 - alpha) n) (never below 1).

A batch (every backend) moves in lockstep: every row's token of one position is in the same stage, and a tick's
draft is confirmed only if every row that goes on past it drafted its full model's token; otherwise every row is
flushed and takes its own correction. A row's draft of a position depends only on its committed text, so each row
emits AR's tokens and judges the very drafts it would judge alone; the batch confirms where all of its rows do.

A repetition penalty reads the committed text: every emitted token joins it as it is emitted (in every stage process
of the distributed backend, from the verdict each tick broadcasts), so the last stage predicts from AR's context;
stage 1 drafts from the same committed text, without the drafts in flight.

Backends (one semantics, same ticks, confirms and flushes): `sequential` runs the stages of a tick one after the
other (the reference, any device); `streams` launches each stage on its own CUDA stream so that the stages of a tick
overlap on one GPU; `distributed` runs one process per stage (executor/ppsd_dist.py).

The local backends chain the ticks on the device (`LocalPipeline`): a transition pass after each tick judges and
moves the pipe on, so the host launches `sync_every` ticks and reads their verdicts in one copy instead of
synchronising every tick, and on a GPU it queues the next ticks while the device runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from executor.adapter import ModelAdapter, Step, compile_static, with_layer_run
from executor.decoding import GenerationStats, TokenSink, read_back
from executor.heads import SharedExitHead, head_key, resolve_head
from executor.kv_cache import KVCache
from executor.passes import (
    StaticPass,
    bucketed,
    cached_passes,
    check_sync_every,
    launch_mode,
    on_device,
    prefill_width,
    prefix_capture,
    resolve_capture,
    resolve_sync_every,
    span_bucket,
    upload,
)
from executor.sampling import SamplingConfig, TokenSelector
from executor.verify import TickVerdict, tick_verdict
from sim.contract import AR_HISTORY, balanced_counts, captured_capacity

BACKENDS = ("sequential", "streams", "distributed")
# the distributed backend's stall timeout: a stage process silent this long (no heartbeat) stops the run; its
# heartbeats come from a thread of their own, so slow passes never count against it, only a stopped or hung process
DEFAULT_STALL_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class StagePlan:
    """Where the stages cut the layers and where the exit head sits. Stage s owns layers [bounds[s], bounds[s+1])."""

    bounds: tuple[int, ...]  # b_0 = 0 < b_1 < .. < b_n = L
    exit_layer: int  # E, 1 <= E <= b_1

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_layers(self) -> int:
        return self.bounds[-1]

    def layers(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])


def balanced_bounds(num_layers: int, stages: int) -> tuple[int, ...]:
    """The bounds of `sim.contract.balanced_counts`' stages (the simulator prices the same ones)."""
    return (0, *itertools.accumulate(balanced_counts(num_layers, stages)))


def plan_stages(
    num_layers: int, stages: int, stage_boundaries: Sequence[int] | None = None, exit_layer: int | None = None
) -> StagePlan:
    """Check the arguments and lay the stages out; every mistake is a ValueError saying what is allowed.

    `stage_boundaries` lists the n - 1 cut points (e.g. [3, 6] for 9 layers in 3 stages), or all n + 1 bounds
    including 0 and L. Without them the stages are balanced, unless `exit_layer` (a trained head's, say) lies past
    balanced stage 1: then stage 1 ends there and the later stages share the rest, balanced (as the simulator lays a
    PPSD point out).
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 2:
        raise ValueError(f"stages must be an integer >= 2 (PPSD needs a pipeline), got {stages!r}")
    if stages > num_layers:
        raise ValueError(f"stages ({stages}) must not exceed the model's {num_layers} layers (one layer per stage)")
    bounds = (
        balanced_bounds(num_layers, stages)
        if stage_boundaries is None
        else _check_bounds(num_layers, stages, stage_boundaries)
    )
    movable = stage_boundaries is None and isinstance(exit_layer, int) and not isinstance(exit_layer, bool)
    if movable and bounds[1] < exit_layer < num_layers:
        if num_layers - exit_layer < stages - 1:
            raise ValueError(
                f"exit_layer {exit_layer} leaves {num_layers - exit_layer} of {num_layers} layers for {stages - 1} "
                "later stages (one layer each at least): fewer stages, or an earlier exit layer"
            )
        rest = balanced_bounds(num_layers - exit_layer, stages - 1)
        bounds = (0, *(exit_layer + b for b in rest))
    if exit_layer is None:
        exit_layer = bounds[1]
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer <= bounds[1]:
        if stage_boundaries is None:  # stage 1 moves to an exit past its balanced end, leaving a layer a stage
            raise ValueError(
                f"exit_layer must be an integer in [1, {num_layers - stages + 1}] for {stages} stages of {num_layers} "
                f"layers (past balanced stage 1's end, {bounds[1]}, stage 1 ends at it), got {exit_layer!r}"
            )
        raise ValueError(
            f"exit_layer must lie inside stage 1, i.e. be an integer in [1, {bounds[1]}] for stages {_describe(bounds)}"
            f", got {exit_layer!r}"
        )
    return StagePlan(bounds=bounds, exit_layer=exit_layer)


def _check_bounds(num_layers: int, stages: int, stage_boundaries: Sequence[int]) -> tuple[int, ...]:
    cuts = list(stage_boundaries)
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in cuts):
        raise ValueError(f"stage_boundaries must be integers, got {cuts!r}")
    if len(cuts) == stages + 1:
        if cuts[0] != 0 or cuts[-1] != num_layers:
            raise ValueError(
                f"stage_boundaries with {stages + 1} entries must start at 0 and end at {num_layers}, got {cuts}"
            )
        cuts = cuts[1:-1]
    elif len(cuts) != stages - 1:
        raise ValueError(
            f"stage_boundaries must hold the {stages - 1} cut points between {stages} stages "
            f"(or {stages + 1} bounds including 0 and {num_layers}), got {len(cuts)}: {cuts}"
        )
    bounds = [0, *cuts, num_layers]
    if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(
            f"stage_boundaries must be strictly increasing inside (0, {num_layers}) so that every stage has a layer, "
            f"got {list(stage_boundaries)}"
        )
    return tuple(bounds)


def _describe(bounds: Sequence[int]) -> str:
    return " ".join(f"[{a},{b})" for a, b in zip(bounds, bounds[1:], strict=False))


# ------------------------------------------------------------------------------------------------------ statistics
@dataclass
class StageStats:
    """One stage's time. `idle_s` is its bubble: time in the run's ticks it spent not computing; of it, `link_s` (the
    distributed backend) the time in the tick's messages (sending, and receiving: waiting for the other ranks
    included), the rest the host's own work between them."""

    first_layer: int
    stop_layer: int
    busy_s: float = 0.0
    idle_s: float = 0.0
    link_s: float = 0.0
    work_ticks: int = 0  # ticks in which it held a token
    bubble_ticks: int = 0  # ticks in which it held none (after a flush, or draining at the end)

    def count(self, holds: bool, busy_s: float, idle_s: float = 0.0) -> None:
        """Count one tick of this stage: whether it held a token, and its time computing and waiting in it."""
        self.busy_s += busy_s
        self.idle_s += idle_s
        self.work_ticks += holds
        self.bubble_ticks += not holds


@dataclass
class PPSDStats(GenerationStats):
    """GenerationStats plus the pipeline's view. PPSD's unit of work is the tick (every stage runs one token), not the
    round: `rounds` stays 0 and `tokens_per_round` is nan. `drafted` / `accepted` hold one entry per checked draft
    (drafted 1; accepted 1 if confirmed, 0 if flushed), so `acceptance_rate` is `alpha`.

    A batch of `rows` (local backends) moves in lockstep: a tick emits a token in every row still going, and its
    draft is confirmed only if every row that goes on past it drafted its full model's token, else the whole batch
    is flushed. `confirms` and `flushes` count the batch's verdicts (`alpha`); `drafted` / `accepted` hold one entry
    per row's judged draft, so `acceptance_rate` is the rows' own acceptance (equal to `alpha` at batch 1)."""

    backend: str = "sequential"
    rows: int = 1
    stages: int = 0
    stage_boundaries: tuple[int, ...] = ()
    exit_layer: int = 0
    ticks: int = 0
    unread_ticks: int = 0  # of `ticks`: run after the last row's end inside a block of `sync_every`, read by no one
    confirms: int = 0
    flushes: int = 0
    verdicts: list[int] = field(default_factory=list)  # the batch's, in order: 1 confirmed, 0 flushed
    stage_stats: list[StageStats] = field(default_factory=list)
    setup_time_s: float = 0.0  # distributed: starting the processes and handing out the model, not in wall_time_s
    process_cpu_s: float = 0.0  # distributed: CPU seconds the stage processes used, setup included (all ranks)

    @property
    def alpha(self) -> float:
        """Measured acceptance: confirmed drafts / checked drafts (nan if none was checked)."""
        checked = self.confirms + self.flushes
        return self.confirms / checked if checked else float("nan")

    @property
    def decoded_tokens(self) -> int:
        """New tokens after the prefills' (a row's first new token comes from the prefill, not from a tick)."""
        return max(self.new_tokens - self.rows, 0)

    @property
    def tokens_per_tick(self) -> float:
        """Decoded tokens per tick, every row's (AR through the same stages: rows / n; at most rows)."""
        return self.decoded_tokens / self.ticks if self.ticks else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """PPSD has no rounds (see `tokens_per_tick`)."""
        return float("nan")

    @property
    def ideal_speedup(self) -> float:
        """n / (alpha + (1 - alpha) n) at the measured alpha: balanced stages, free head and links."""
        n, alpha = self.stages, self.alpha
        return n / (alpha + (1 - alpha) * n)

    @property
    def tick_speedup(self) -> float:
        """Achieved, in ticks: AR needs n ticks (one pass through all stages) per decoded token of each row, PPSD
        took `ticks` (a mean over the rows: where rows end early at their EOS, AR's batch would still run to the
        longest row's end)."""
        return self.stages * self.tokens_per_tick / self.rows

    def speedup_over(self, ar_tokens_per_s: float) -> float:
        """Achieved, in wall-clock time: this run's tokens/s over an AR run's tokens/s."""
        return self.tokens_per_s / ar_tokens_per_s

    def summary(self) -> str:
        lines = [
            self.totals(f"{self.ticks} ticks"),
            f"ppsd {self.backend}: {self.stages} stages {_describe(self.stage_boundaries)}, "
            f"exit layer {self.exit_layer}" + (f", {self.rows} rows in lockstep" if self.rows > 1 else ""),
            f"{self.confirms + self.flushes} drafts checked: {self.confirms} confirmed, {self.flushes} flushed "
            f"(alpha {self.alpha:.3f}{self._rows_alpha()}); {self.decoded_tokens} tokens after the prefill's in "
            f"{self.ticks} ticks{self._unread()}, {self.tokens_per_tick:.2f} tokens/tick "
            f"(AR: {self.rows}/{self.stages}); "
            f"speedup in ticks {self.tick_speedup:.2f}x (ideal {self.ideal_speedup:.2f}x)"
            if self.ticks and self.confirms + self.flushes
            else f"no draft checked: {self.decoded_tokens} tokens after the prefill's in {self.ticks} ticks (the run "
            "ended before the pipe judged a draft)",
        ]
        for index, stage in enumerate(self.stage_stats):
            layers = f"[{stage.first_layer},{stage.stop_layer})"
            lines.append(f"  stage {index + 1} layers {layers}: {self._stage_times(stage)}")
        return "\n".join(lines)

    def _stage_times(self, stage: StageStats) -> str:
        """A stage's busy and idle time, each also a tick's worth (busy: a working tick's, the pass the simulator
        prices; messages: any tick's), and its work and bubble ticks."""
        busy = f"busy {stage.busy_s:.3f} s" + (
            f" ({1e3 * stage.busy_s / stage.work_ticks:.1f} ms a working tick)" if stage.work_ticks else ""
        )
        messages = f"{stage.link_s:.3f} s in messages" + (
            f", {1e3 * stage.link_s / self.ticks:.2f} ms a tick" if self.ticks else ""
        )
        return (f"{busy}, idle {stage.idle_s:.3f} s" + (f" ({messages})" if stage.link_s else "")
                + f", {stage.work_ticks} work / {stage.bubble_ticks} bubble ticks")  # fmt: skip

    def _unread(self) -> str:
        return f" ({self.unread_ticks} run unread past the end)" if self.unread_ticks else ""

    def _rows_alpha(self) -> str:
        """The rows' own acceptance beside a batch's (its verdicts confirm only where every row's does)."""
        return f", the rows' own {self.acceptance_rate:.3f}" if self.rows > 1 and self.drafted else ""

    def record(self, outcome: TickOutcome, row_verdicts: Sequence[int] | None = None) -> None:
        """Count one tick and its outcome (a confirm or a flush is a checked draft); `row_verdicts`: each row's own
        (`TickVerdict` values; a row not judged NONE), default the batch-1 outcome's."""
        self.ticks += 1
        if outcome.verdict in (TickVerdict.CONFIRM, TickVerdict.FLUSH):
            confirmed = outcome.verdict == TickVerdict.CONFIRM
            self.confirms += confirmed
            self.flushes += not confirmed
            self.verdicts.append(int(confirmed))
        for verdict in (outcome.verdict,) if row_verdicts is None else row_verdicts:
            if verdict in (TickVerdict.CONFIRM, TickVerdict.FLUSH):
                self.drafted.append(1)
                self.accepted.append(int(verdict == TickVerdict.CONFIRM))


def new_stats(plan: StagePlan, backend: str, prompt_tokens: int, rows: int = 1) -> PPSDStats:
    return PPSDStats(
        method="ppsd",
        prompt_tokens=prompt_tokens,
        rows=rows,
        backend=backend,
        stages=plan.stages,
        stage_boundaries=plan.bounds,
        exit_layer=plan.exit_layer,
        stage_stats=[StageStats(r.start, r.stop) for r in map(plan.layers, range(plan.stages))],
    )


# ------------------------------------------------------------------------------------------------- one stage's work
@dataclass
class Item:
    """A tick's tokens in flight, one per row (the rows move in lockstep): their positions, their ids (stage 1's
    input) or hidden states [B, 1, d] (later stages' input), and the drafts stage 1 proposed after them (-1 if none
    enters the pipe: max_new_tokens reached)."""

    positions: list[int]
    tokens: list[int] | None = None
    hidden: torch.Tensor | None = None
    drafts: list[int] | None = None


@dataclass
class StageOutput:
    """What a stage hands on, for every row. Token ids stay on the device until the tick is over (no host sync
    mid-tick)."""

    positions: list[int]
    hidden: torch.Tensor  # [B, 1, d]: the input of the next stage
    draft_id: torch.Tensor | None = None  # stage 1: the exit head's pick, [B]
    predicted_id: torch.Tensor | None = None  # last stage: the full model's token for position + 1, [B]
    drafts: list[int] | None = None  # carried from stage 1 down the pipe (set once resolved on the host)


@dataclass(frozen=True)
class TickOutcome:
    """One tick as the last stage decided it: the verdict, the token it emitted at `position` (none for
    `TickVerdict.NONE`), and whether generation is done."""

    verdict: TickVerdict
    token: int = -1
    position: int = -1
    done: bool = False

    @property
    def emitted(self) -> bool:
        return self.verdict != TickVerdict.NONE


class StageRunner:
    """Runs one stage's layers on one token; stage 1 also drafts at the exit layer, the last stage predicts.

    The per-token work is a static pass (executor/passes.py) over this stage's buffers, one per span bucket (`pass_`):
    `prepare` fills them on the current stream (position, and the token or the previous stage's hidden state) and
    keeps the cache's books, `launch` runs the pass (replays its CUDA graph when captured) and returns outputs that
    live in this stage's buffers until its next launch. Preparing every stage before launching any is what lets the
    streams backend overlap the stages of a tick without a stage overwriting an output its successor has not read
    yet.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        cache: KVCache,
        plan: StagePlan,
        stage: int,
        selector: TokenSelector,
        capture: str = "none",
        fallback: bool = False,
        head: Any = None,
        rows: int = 1,
    ) -> None:
        adapter = adapter.compiled(fallback) if capture == "compile-layers" else adapter
        self.adapter, self.cache, self.plan, self.stage, self.selector = adapter, cache, plan, stage, selector
        self.layers = plan.layers(stage)
        self.is_first, self.is_last = stage == 0, stage == plan.stages - 1
        # stage 1's exit head (shared, or trained with a layer of its own whose KV is this stage's too)
        own = with_layer_run(head, adapter.layer_run)  # compiled layers: a trained head's layer too
        self.head = (own if head is not None else SharedExitHead(adapter)) if self.is_first else None
        extra = getattr(self.head, "extra_layers", 0)
        self.cache_layers = [*self.layers, *range(adapter.num_layers, adapter.num_layers + extra)]
        device, shape = adapter.device, (rows, 1, adapter.config.hidden_size)
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.hidden_in = torch.zeros(shape, dtype=adapter.dtype, device=device)
        self.hidden_out = torch.zeros(shape, dtype=adapter.dtype, device=device)
        self.draft_id = torch.zeros(rows, dtype=torch.long, device=device)
        self.predicted_id = torch.zeros(rows, dtype=torch.long, device=device)
        self.mode, self.fallback = launch_mode(capture, adapter.device), fallback
        self.bucketed = bucketed(capture)
        self.passes: dict[int, StaticPass] = {}  # by span

    def pass_(self, span: int | None = None) -> None:
        """Launch this stage's pass at `position`, attending over the first `span` cache slots (None: all of them);
        one pass (graph, compilation) per span."""
        span = self.cache.max_len if span is None else span
        if span not in self.passes:
            step = Step(positions=self.position, starts=None, span=span)
            self.passes[span] = StaticPass(lambda: self._compute(step), self.mode, self.fallback)
        self.passes[span]()

    def prepare(self, item: Item) -> None:
        """This stage's inputs for `item` (host values copied asynchronously) and the books of its KV write."""
        upload(self.position, [[position] for position in item.positions])
        if self.is_first:
            upload(self.ids, [[token] for token in item.tokens])
        else:
            self.hidden_in.copy_(item.hidden)
        self.cache.claim(self.cache_layers, item.positions, 1)

    def launch(self, item: Item) -> StageOutput:
        """Run the pass on the prepared `item`, over the span bucket of its furthest position (known on the host)."""
        self.pass_(span_bucket(max(item.positions), self.cache.max_len, self.bucketed))
        draft_id = self.draft_id if self.is_first else None
        return StageOutput(item.positions, self.hidden_out, draft_id, self.predicted_id if self.is_last else None,
                           item.drafts)  # fmt: skip

    def run(self, item: Item) -> StageOutput:
        self.prepare(item)
        return self.launch(item)

    def _compute(self, step: Step) -> None:
        adapter = self.adapter
        if self.is_first:
            self.selector.record(self.ids, step.positions)  # the token fed at its position, for prefix processors
            hidden = adapter.forward_layers(adapter.embed(self.ids), step, self.cache, 0, self.plan.exit_layer)
            self.draft_id.copy_(self.selector.select(self.head(hidden, step, self.cache), step.positions + 1)[:, 0])
            hidden = adapter.forward_layers(hidden, step, self.cache, self.plan.exit_layer, self.layers.stop)
        else:
            hidden = adapter.forward_layers(self.hidden_in, step, self.cache, self.layers.start, self.layers.stop)
        self.hidden_out.copy_(hidden)
        if self.is_last:
            self.predicted_id.copy_(self.selector.select(adapter.logits(hidden), step.positions + 1)[:, 0])

    def prefill_width(self, prompt_len: int) -> int:
        """The width this stage's prefill runs at (`executor.passes.prefill_width`: on a GPU a bucket, so that a new
        prompt length reuses a bucket's kernels; every stage computes the same one)."""
        return prefill_width(prompt_len, self.cache.max_len, self.adapter.device)

    def prefill(self, hidden: torch.Tensor | None, prompts: list[list[int]]) -> torch.Tensor:
        """The prompts (a row each) through this stage's layers: ids (stage 1) or hidden [B, W, d] in, hidden
        [B, W, d] out, W the prefill width (the longest prompt's length, or on a GPU its bucket): a row's pads come
        after its last token, where causal attention keeps them out of every real position, and their KV is rolled
        back to the row's length here."""
        adapter, width = self.adapter, self.prefill_width(max(map(len, prompts)))
        step = Step(torch.arange(width, device=adapter.device).expand(len(prompts), width), (0,) * len(prompts))
        if not self.is_first:
            hidden = adapter.forward_layers(hidden, step, self.cache, self.layers.start, self.layers.stop)
        else:
            rows = [prompt + [0] * (width - len(prompt)) for prompt in prompts]
            ids = torch.tensor(rows, dtype=torch.long, device=adapter.device)
            hidden = adapter.forward_layers(adapter.embed(ids), step, self.cache, 0, self.plan.exit_layer)
            self.head.prefill(hidden, step, self.cache)  # a trained head's own KV over the prompt
            hidden = adapter.forward_layers(hidden, step, self.cache, self.plan.exit_layer, self.layers.stop)
        self.flush([len(prompt) for prompt in prompts])
        return hidden

    def flush(self, position: int | list[int]) -> None:
        """Forget this stage's KV (its exit head's too) at positions >= `position` (the flushed tokens'; one per
        row if a list)."""
        self.cache.rollback(position, layers=self.cache_layers)


def first_tokens(runner: StageRunner, hidden: torch.Tensor, prompt_lens: list[int]) -> list[int]:
    """The full model's token after each row's prompt, from the last stage's prefill states [B, W, d] (W >= every
    prompt's length: pads after it)."""
    last = torch.tensor(prompt_lens, device=hidden.device) - 1
    states = hidden[torch.arange(len(prompt_lens), device=hidden.device), last].unsqueeze(1)  # [B, 1, d]
    targets = (last + 1).unsqueeze(1)
    return runner.selector.select(runner.adapter.logits(states), targets)[:, 0].tolist()


def make_selector(
    adapter: ModelAdapter,
    prompt_len: int | list[int],
    sink: TokenSink,
    sampling: SamplingConfig | None,
    min_new_tokens: int,
) -> TokenSelector:
    """Greedy by default; exact sampling picks a position's token by Gumbel-max keyed by (seed, position), so the
    full model's token is a function of its logits and a draft is right iff it equals it (as in greedy).
    `prompt_len`: the prompt's length, or each row's."""
    config = sampling if sampling is not None else SamplingConfig()
    if config.kind == "rejection":
        raise ValueError(
            "PPSD supports greedy and exact sampling (sampling mode 'exact'): its verdict is token equality, which "
            "rejection sampling's accept test is not"
        )
    lengths = [prompt_len] if isinstance(prompt_len, int) else list(prompt_len)
    return TokenSelector(config, lengths, min_new_tokens, sorted(sink.eos_token_ids), adapter.device)


def feed_limit(prompt_len: int, max_new_tokens: int) -> int:
    """The last position whose token must enter the pipe: its prediction is the last token generated."""
    return prompt_len + max_new_tokens - 2


def resolve_first(out: StageOutput, limit: int) -> None:
    """Stage 1's drafts, read on the host: they enter the pipe after `out` unless the generation ends before (row
    0's position past `limit`, `feed_limit` of row 0 and the most tokens a row asks: the rows move in lockstep)."""
    drafts = out.draft_id.tolist()
    out.drafts = drafts if out.positions[0] + 1 <= limit else [-1] * len(drafts)


def commit(selector: TokenSelector, tokens: Sequence[int]) -> None:
    """Emitted tokens, one per row (each >= 0; a -1 is none emitted), join the committed text a repetition penalty
    sees. Every emitted token is committed; the tokens in flight behind it are drafts, which the penalty does not
    count."""
    if selector.seen is not None and min(tokens) >= 0:
        selector.note(torch.tensor([[token] for token in tokens], device=selector.seen.device))


# ------------------------------------------------------------------------------------ single-process pipeline
TICK_LOG = AR_HISTORY  # rows of the device's tick log: the most ticks between two host reads (`sync_every`)


class LocalPipeline:
    """All stages in one process, `sequential` (one after the other) or `streams` (one CUDA stream each), chained on
    the device so that the host launches `sync_every` ticks and reads their verdicts in one copy.

    The pipe's state lives in device tensors: each stage's input buffers (stage 1's token, the later stages' hidden
    state, every stage's position; a row each), `valid[s]` (stage s holds a token this tick, every row alike),
    `carried[s]` (each row's draft stage 1 proposed after stage s's token, -1 if none entered the pipe) and `alive`
    (the rows still going; a batch's verdict is theirs, `_batch_verdict`). After the stages of a tick, one more pass,
    the *transition* (`_advance`), does on the device what the host's `judge` does: it judges the last stage's
    prediction against the draft carried behind it (`executor.verify.tick_verdict`, the rule `judge` applies too),
    logs the tick's verdict, tokens and valid flags in `log` at `cursor`, commits the tokens to a repetition
    penalty's context, and moves the pipe on: on a flush the prediction enters stage 1 and the younger tokens turn
    invalid; otherwise every token moves one stage down and stage 1 takes its own draft.

    Every stage of a block of ticks attends over the same span bucket, chosen on the host before the block from the
    log it has read (`_cover`): stage 1 holds the pipe's furthest position and moves on at most one position a tick,
    never past the last position fed. A stage with no valid token still runs (a captured pass cannot skip), at the
    scratch position `scratch`, the bucket's last slot, beyond every position a token can reach in the block.
    Garbage KV lands there only while no token has reached that slot, and a stage sees the positions in order (its
    furthest position grows one at a time), so the valid token at that position rewrites the slot in every stage
    before any token beyond it reads it. Buckets never shrink, so an empty stage still at an earlier block's scratch
    slot stays inside the span. Likewise a flushed token's writes at positions > p were made while it was valid;
    the flush's correction rewrites them before any valid token reads them (slots are read at <= the reader's
    position). So every valid token meets the same KV and inputs as in AR, and the output equals AR's.

    On a CPU, where reading `valid` costs no synchronisation, an empty stage is skipped instead
    (`skip_empty_on_cpu`), as a bubble should be: the sequential reference then does no wasted work.
    """

    skip_empty_on_cpu = True

    def __init__(
        self,
        adapter: ModelAdapter,
        cache: KVCache,
        plan: StagePlan,
        selector: TokenSelector,
        streams: bool,
        capture: str = "none",
        fallback: bool = False,
        head: Any = None,
    ) -> None:
        self.cache, self.selector, self.bucketed = cache, selector, bucketed(capture)
        self.skip_empty = self.skip_empty_on_cpu and adapter.device.type == "cpu"
        selector.track(adapter.lm_head.weight.shape[0], cache.max_len)  # a penalty's seen set, a prefix's text
        self.rows = rows = cache.batch
        self.runners = [
            StageRunner(adapter, cache, plan, s, selector, capture, fallback, head, rows) for s in range(plan.stages)
        ]
        n, long = plan.stages, {"dtype": torch.long, "device": adapter.device}
        self.scratch = torch.zeros(1, **long)  # where an empty stage runs: the last slot of the span (`_cover`)
        self.span = cache.max_len  # the span bucket of the ticks being launched
        self.head = self.front = self.feed = 0  # the host's bounds on the pipe's furthest row's positions (`_follow`)
        self.shift = 0  # the furthest row's position less row 0's (the rows move in lockstep)
        self.valid = torch.zeros(n, dtype=torch.bool, device=adapter.device)
        self.carried = torch.full((n, rows), -1, **long)
        self.limit = torch.zeros(1, **long)  # row 0's last position fed (the other rows' lie as far past their prompts)
        self.last_at = torch.zeros(rows, **long)  # each row's last token's position: it ends there (or at its EOS)
        self.alive = torch.ones(rows, dtype=torch.bool, device=adapter.device)  # rows not finished
        self.eos = torch.tensor(selector.eos_ids, **long)
        self.log = torch.zeros(TICK_LOG, LOG_FIELDS + 2 * rows + n, **long)
        self.cursor = torch.zeros(1, **long)
        if capture == "compile":
            for tensor in self._static_tensors():
                torch._dynamo.mark_static_address(tensor)
        self.advance, self.primed = self._advance, True
        if capture == "compile-layers":  # the transition's many small ops, fused by Inductor into a few kernels
            self.advance, self.primed = compile_static(self._advance, fallback, "the PPSD transition"), False
        self.transition = StaticPass(_nothing, launch_mode(capture, adapter.device), fallback, advance=self.advance)
        self.stats: PPSDStats | None = None
        self.launched = 0  # ticks launched since `begin` (the host's copy of the device's cursor)
        self.streams = [torch.cuda.Stream(device=adapter.device) for _ in self.runners] if streams else None
        self.fork = torch.cuda.Event() if streams else None
        self.timers: list[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = []  # [slot][stage]: (start, stop)

    def _static_tensors(self) -> list[torch.Tensor]:
        buffers = [self.valid, self.carried, self.limit, self.last_at, self.alive, self.log, self.cursor, self.scratch]
        for runner in self.runners:
            buffers += [runner.position, runner.ids, runner.hidden_in, runner.hidden_out, runner.draft_id,
                        runner.predicted_id]  # fmt: skip
        buffers += [self.selector.seen] if self.selector.seen is not None else []
        return buffers + ([self.selector.text, self.selector.first] if self.selector.text is not None else [])

    def restart(self, stats: PPSDStats, prompt_lens: list[int], seed: int | tuple[int, ...]) -> None:
        """A new generation on these (possibly captured) stages: empty cache, the call's seed (or a seed per row)."""
        self.stats = stats
        self.selector.restart(prompt_lens, seed)
        self.cache.rollback(0)

    def begin(self, tokens: list[int], positions: list[int], max_new_tokens: int | list[int]) -> None:
        """The pipe after the prefill: each row's token (the prefill's) enters stage 1 at the row's position (its
        prompt's length), the other stages are empty; drafts enter the pipe until the row asking the most has its
        `max_new_tokens` fed (one for all rows, or each row's own: a row ends at its own on the device, as at its
        EOS, and decides no verdict from then on)."""
        asked = [max_new_tokens] * len(tokens) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        most = max(asked)
        first = self.runners[0]
        upload(first.ids, [[token] for token in tokens])
        upload(first.position, [[position] for position in positions])
        self.shift = max(positions) - positions[0]
        self.head = self.front = max(positions)
        self.feed, self.span = feed_limit(max(positions), most), 0
        self._cover(1)
        for runner in self.runners[1:]:
            runner.position.copy_(self.scratch)
        upload(self.valid, [True] + [False] * (len(self.runners) - 1))
        self.carried.fill_(-1)
        self.limit.fill_(feed_limit(positions[0], most))
        upload(self.last_at, [position + count - 1 for position, count in zip(positions, asked, strict=True)])
        self.alive.fill_(True)
        self.cursor.zero_()
        self.launched = 0
        if not self.primed:
            self._prime()

    def _prime(self) -> None:
        """Compile the transition before its first capture (Inductor must not compile inside a CUDA graph capture):
        run it once on the pipe's real state, then put every tensor it writes back as it was."""
        state = self._static_tensors()
        saved = [tensor.clone() for tensor in state]
        self.advance()
        for tensor, before in zip(state, saved, strict=True):
            tensor.copy_(before)
        self.primed = True

    def decode(self, sinks: list[TokenSink], sync_every: int, stop: Callable[[], bool] | None = None) -> bool:
        """Run ticks until every row's sink is done: `sync_every` ticks (fewer near max_new_tokens, as a tick emits at
        most one token a row) between two host reads of the log. After the last row's EOS the rest of a block runs
        unread: counted as ticks (`PPSDStats.unread_ticks`) and in the stages' books, its tokens dropped. A row the
        host found done (its EOS, a stop rule) is out of the verdicts from the next block on; the device drops a row
        at its EOS itself. `stop`, asked after each read that leaves a row going: True ends the decode there (the
        pipe's state is dropped; `begin` may start it afresh from every row's last token). Returns whether every
        row is done."""
        while not all(sink.done for sink in sinks):
            if stop is not None and self.launched and stop():
                return False
            count = min(sync_every, max(sink.remaining for sink in sinks if not sink.done))
            self._cover(count)
            if self.rows > 1:
                upload(self.alive, [not sink.done for sink in sinks])
            busy = [self._launch_tick(slot) for slot in range(count)]
            rows = read_back(self.log, self.stats)
            for slot in range(count):
                row, seconds = rows[(self.launched + slot) % TICK_LOG], busy[slot] or self._elapsed(slot)
                if all(sink.done for sink in sinks):  # past the last row's end: the tick ran, no one reads it
                    self.stats.ticks += 1
                    self.stats.unread_ticks += 1
                    self._count_stages(row, seconds)
                    continue
                self._replay(row, seconds, sinks)
            self.launched += count
        return True

    def _cover(self, ticks: int) -> None:
        """The span bucket of the next `ticks` ticks: it holds every position a stage can reach in them (stage 1's,
        at most one more a tick, never past the last position fed) and one slot more, the scratch slot (uploaded
        when it moves); never smaller than the span before it. Host values only: no device read."""
        furthest = max(self.front, min(self.head + ticks - 1, self.feed))
        span = max(self.span, span_bucket(furthest + 1, self.cache.max_len, self.bucketed))
        if span != self.span:
            self.span = span
            upload(self.scratch, [span - 1])

    def _follow(self, verdict: TickVerdict, emitted_at: int, first_held: bool) -> None:
        """The transition's move of stage 1, replayed on the host from a tick's log row: a flush puts the correction
        at the emitted position; otherwise stage 1's token moves on one position if it held one and that position
        is still fed (else stage 1 runs empty, and `head` stays a bound). `front`: the furthest position so far."""
        if verdict == TickVerdict.FLUSH:
            self.head = emitted_at
        elif first_held and self.head + 1 <= self.feed:
            self.head += 1
        self.front = max(self.front, self.head)

    def _launch_tick(self, slot: int) -> list[float] | None:
        """Queue one tick: every stage's pass, then the transition. Sequential: the stages' host-timed seconds."""
        if self.streams is None:
            busy = []
            held = self.valid.tolist() if self.skip_empty else [True] * len(self.runners)
            for runner, holds in zip(self.runners, held, strict=True):
                begin = time.perf_counter()
                if holds:
                    runner.pass_(self.span)
                busy.append(time.perf_counter() - begin)
            self.transition()
            return busy
        current = torch.cuda.current_stream()
        self.fork.record(current)
        for runner, stream, (start, stop) in zip(self.runners, self.streams, self._timers(slot), strict=True):
            stream.wait_event(self.fork)  # the inputs the last transition wrote
            with torch.cuda.stream(stream):
                start.record(stream)
                runner.pass_(self.span)
                stop.record(stream)
        for _, stop in self.timers[slot]:
            current.wait_event(stop)
        self.transition()
        return None

    def _timers(self, slot: int) -> list[tuple[torch.cuda.Event, torch.cuda.Event]]:
        while len(self.timers) <= slot:
            self.timers.append([(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                                for _ in self.runners])  # fmt: skip
        return self.timers[slot]

    def _elapsed(self, slot: int) -> list[float]:
        return [start.elapsed_time(stop) / 1e3 for start, stop in self.timers[slot]]

    def _replay(self, row: list[int], busy: list[float], sinks: list[TokenSink]) -> None:
        """One tick's log row on the host: emit its tokens, count its outcome and the stages' work."""
        rows = self.rows
        verdict, position = row[:LOG_FIELDS]
        tokens, judged = row[LOG_FIELDS : LOG_FIELDS + rows], row[LOG_FIELDS + rows : LOG_FIELDS + 2 * rows]
        valid = row[LOG_FIELDS + 2 * rows :]
        outcome = TickOutcome(TickVerdict(verdict), tokens[0], position)
        self._follow(outcome.verdict, position + self.shift, bool(valid[0]))
        going = [not sink.done for sink in sinks]  # a row a stop rule ended mid-block runs on unread
        if outcome.emitted:
            for sink, token, goes in zip(sinks, tokens, going, strict=True):
                if goes:
                    sink.emit([token])
        none = int(TickVerdict.NONE)
        self.stats.record(outcome, [v if goes else none for v, goes in zip(judged, going, strict=True)])
        self._count_stages(row, busy)

    def _count_stages(self, row: list[int], busy: list[float]) -> None:
        """A tick's work in each stage's books (whether it held a token, its seconds busy and idle)."""
        valid = row[LOG_FIELDS + 2 * self.rows :]
        tick = max(busy)  # idle: what a stage waits in a lockstep tick as long as the slowest stage's
        for stage, holds, seconds in zip(self.stats.stage_stats, valid, busy, strict=True):
            stage.count(bool(holds), seconds, tick - seconds)

    def _advance(self) -> None:
        """The transition, on the device (see the class docstring); no host value is read or written."""
        runners, valid, carried, rows = self.runners, self.valid, self.carried, self.rows
        first, last = runners[0], runners[-1]
        predicted, held = last.predicted_id, valid[-1:]  # [B], [1]
        own = tick_verdict(held.expand(rows), carried[-1], predicted)  # [B]: each row's own
        emitted_at = last.position.view(rows) + 1
        # [B]: the row emits its EOS or its last token asked for (if a token left)
        ending = (predicted.unsqueeze(1) == self.eos).any(1) | (emitted_at >= self.last_at)
        verdict = batch_verdict(own, self.alive, ending)  # [1]
        flush = verdict == int(TickVerdict.FLUSH)
        judged = torch.where(self.alive, own, int(TickVerdict.NONE))
        row = torch.cat([verdict, emitted_at[:1], predicted, judged, valid.long()])
        self.log.index_copy_(0, self.cursor, row.unsqueeze(0))
        self.cursor.add_(1).remainder_(TICK_LOG)
        self.alive.logical_and_(~(held & ending))  # a row ends at its EOS or its last token
        seen = self.selector.seen
        if seen is not None:  # the emitted token joins the committed text (a penalty's context) iff one was emitted
            index = predicted.view(rows, 1)
            seen.scatter_(1, index, seen.gather(1, index) | held.view(1, 1))
        next_position = first.position.view(rows) + 1
        drafted = valid[:1] & (next_position[:1] <= self.limit)  # stage 1's draft enters the pipe (every row's)
        draft = torch.where(drafted, first.draft_id, -1)
        moved = valid[:-1] & ~flush  # stage s's token moves to stage s + 1 unless flushed
        for stage in range(len(runners) - 1, 0, -1):  # from the last: a stage's old input is read before it changes
            runners[stage].hidden_in.copy_(runners[stage - 1].hidden_out)
            source = runners[stage - 1].position.view(rows)
            runners[stage].position.view(rows).copy_(torch.where(moved[stage - 1 : stage], source, self.scratch))
        target = torch.where(flush, emitted_at, torch.where(drafted, next_position, self.scratch))
        first.position.view(rows).copy_(target)
        first.ids.view(rows).copy_(torch.where(flush, predicted, first.draft_id))
        carried.copy_(torch.cat([carried[:1], draft.unsqueeze(0), carried[1:-1]]))
        valid.copy_(torch.cat([flush | drafted, moved]))


def batch_verdict(own: torch.Tensor, alive: torch.Tensor, ending: torch.Tensor) -> torch.Tensor:
    """A lockstep batch's verdict [1] from its rows' own [B]: a checked draft is confirmed only if every row that
    goes on past this tick (alive, and not emitting its EOS now) drafted its full model's token. A row ending now
    decides nothing (its draft of the EOS's position is judged, `alive`, and counted by the caller), unless no row
    goes on (batch 1: the draft is judged as always). Rows share whether a token left and a draft was in flight,
    so row 0's verdict says whether a draft was checked at all."""
    going = alive & ~ending
    deciding = torch.where(going.any(), going, alive)
    wrong = ((own == int(TickVerdict.FLUSH)) & deciding).any().view(1)
    checked = (own[:1] == int(TickVerdict.CONFIRM)) | (own[:1] == int(TickVerdict.FLUSH))
    batch = torch.where(wrong, int(TickVerdict.FLUSH), int(TickVerdict.CONFIRM))
    return torch.where(checked, batch, own[:1])


# a log row: the batch's verdict, the position row 0's emitted token takes; then each row's emitted token, each row's
# own verdict (NONE for a finished row) and each stage's valid flag
LOG_FIELDS = 2


def _nothing() -> None:
    """The transition's idempotent part: it has none (it is all `advance`, run once per launch)."""


@torch.inference_mode()
def _decode_local(
    adapter: ModelAdapter,
    prompts: list[list[int]],
    sinks: list[TokenSink],
    cache: KVCache,
    plan: StagePlan,
    backend: str,
    selector: TokenSelector,
    capture: str,
    fallback: bool = False,
    head: Any = None,
    sync_every: int = 1,
    given: list[list[int]] | None = None,
) -> PPSDStats:
    begin = time.perf_counter()
    needed = max(map(len, prompts)) + max(sink.max_new_tokens for sink in sinks)
    pipeline = local_pipeline(adapter, cache, plan, backend, selector, capture, needed, fallback, head, len(prompts))
    stats = prefill_local(pipeline, plan, backend, capture, prompts, sinks, begin, given, selector.config.seed)
    decode_local(pipeline, prompts, sinks, sync_every)
    stats.wall_time_s = time.perf_counter() - begin
    return stats


def prefill_local(
    pipeline: LocalPipeline, plan: StagePlan, backend: str, capture: str, prompts: list[list[int]],
    sinks: list[TokenSink], begin: float, given: list[list[int]] | None, seed: int | tuple[int, ...],
) -> PPSDStats:  # fmt: skip
    """A generation's first half on a local pipeline: fresh stats, the prompts (a row each) through every stage and
    each row's first token into its sink (`prefill_time_s` counted from `begin`, a `time.perf_counter()` reading).
    `given`: the rows as the caller gave them (left padding included), what prefix processors see before the new
    tokens (None: `prompts`). `seed`: the call's, one or one per row (its sampling config's; a kept, captured
    pipeline's selector holds the seed of the call that built it)."""
    stats = new_stats(plan, backend, sum(map(len, prompts)), len(prompts))
    stats.capture = capture
    pipeline.restart(stats, [len(prompt) for prompt in prompts], seed)
    pipeline.selector.start(prompts, given)
    hidden = None
    for runner in pipeline.runners:
        hidden = runner.prefill(hidden, prompts)
    tokens = first_tokens(pipeline.runners[-1], hidden, [len(prompt) for prompt in prompts])
    stats.prefill_time_s = time.perf_counter() - begin
    for sink, token in zip(sinks, tokens, strict=True):
        sink.emit([token])
    commit(pipeline.selector, tokens)
    stats.new_tokens = sum(len(sink.tokens) for sink in sinks)
    return stats


def decode_local(
    pipeline: LocalPipeline, prompts: list[list[int]], sinks: list[TokenSink], sync_every: int,
    stop: Callable[[], bool] | None = None,
) -> bool:  # fmt: skip
    """A generation's second half, after `prefill_local`: ticks until every sink is done (`pipeline.stats` counts
    them), the pipe starting from each row's last token (the prefill's, or where an earlier decode of the row was
    stopped: its KV before that token in the cache); `stop` as `LocalPipeline.decode`. Returns whether every row is
    done."""
    stats, done = pipeline.stats, True
    if not all(sink.done for sink in sinks):
        positions = [len(prompt) + len(sink.tokens) - 1 for prompt, sink in zip(prompts, sinks, strict=True)]
        asked = [sink.max_new_tokens - len(sink.tokens) + 1 for sink in sinks]  # from the last token on
        pipeline.begin([sink.tokens[-1] for sink in sinks], positions, asked)
        done = pipeline.decode(sinks, sync_every, stop)
    stats.new_tokens = sum(len(sink.tokens) for sink in sinks)  # type: ignore[union-attr]
    return done


def local_pipeline(
    adapter, cache, plan, backend, selector, capture, needed: int, fallback: bool, head, rows: int = 1
) -> LocalPipeline:  # fmt: skip
    """A fresh pipeline without capture; with capture, the model's cached one for this setup (graphs kept). `head`
    is resolved (`resolve_head`); `needed` is the longest prompt's length + the largest max_new_tokens; `rows` the
    batch."""
    streams, extra = backend == "streams", getattr(head, "extra_layers", 0)
    if capture == "none":
        cache = cache if cache is not None else adapter.new_cache(rows, needed, extra_layers=extra)
        return LocalPipeline(adapter, cache, plan, selector, streams, head=head)
    capacity = captured_capacity(needed)
    config = selector.config
    key = ("ppsd", plan, backend, rows, capacity, capture, fallback, dataclasses.replace(config, seed=0),
           selector.min_new_tokens, tuple(selector.eos_ids), head_key(head))  # fmt: skip

    def build() -> LocalPipeline:
        own = TokenSelector(config, [1] * rows, selector.min_new_tokens, selector.eos_ids, adapter.device)
        cache = adapter.new_cache(rows, capacity, extra_layers=extra)
        return LocalPipeline(adapter, cache, plan, own, streams, capture, fallback, head)

    return cached_passes(adapter.model, key, build)


# ------------------------------------------------------------------------------------------------------ entry point
def check_backend(adapter: ModelAdapter, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "streams" and (adapter.device.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(
            f"backend 'streams' needs a GPU: it runs one CUDA stream per stage, but the model is on "
            f"{adapter.device} (CUDA available: {torch.cuda.is_available()}); use backend 'sequential' or "
            "'distributed' on this machine"
        )


MIN_STALL_TIMEOUT_S = 0.25  # five of the stage processes' most frequent heartbeats (every 0.05 s at most often)


def check_stall_timeout(stall_timeout_s: float) -> None:
    if (
        isinstance(stall_timeout_s, bool)
        or not isinstance(stall_timeout_s, (int, float))
        or not (0 < stall_timeout_s < float("inf"))
    ):
        raise ValueError(f"stall_timeout_s must be a finite number of seconds > 0, got {stall_timeout_s!r}")
    if stall_timeout_s < MIN_STALL_TIMEOUT_S:
        raise ValueError(
            f"stall_timeout_s must be at least {MIN_STALL_TIMEOUT_S} s (stage processes beat every 0.05 s at most "
            f"often, and a healthy run must not look stalled), got {stall_timeout_s!r}"
        )


def decode_ppsd(
    adapter: ModelAdapter,
    prompt: list[int],
    sink: TokenSink,
    cache: KVCache | None,
    *,
    given: list[int] | None = None,
    **options: Any,
) -> PPSDStats:
    """PPSD decoding of one prompt (see the module docstring and `decode_ppsd_rows`, which takes its keyword
    arguments); the emitted tokens equal AR's. `given` is the row as the caller gave it, left padding included
    (default `prompt`): what prefix processors (`SamplingConfig.processors`) see before the new tokens."""
    return decode_ppsd_rows(adapter, [prompt], [sink], cache, given=None if given is None else [given], **options)


def decode_ppsd_rows(
    adapter: ModelAdapter,
    prompts: list[list[int]],
    sinks: list[TokenSink],
    cache: KVCache | None,
    *,
    stages: int,
    stage_boundaries: Sequence[int] | None = None,
    exit_layer: int | None = None,
    backend: str = "sequential",
    sampling: SamplingConfig | None = None,
    min_new_tokens: int = 0,
    threads_per_stage: int | None = None,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    capture: str = "none",
    head: Any = None,
    sync_every: int | None = None,
    given: list[list[int]] | None = None,
) -> PPSDStats:
    """PPSD decoding (see the module docstring) of a batch of prompts, a sink each (the same EOS ids; each its own
    max_new_tokens, a row ending at its own as at its EOS: serving's batches); each row's emitted tokens equal AR's
    on it alone: greedy, or with `sampling` in exact mode (executor/sampling.py) seeded AR sampling's, token for
    token. `min_new_tokens` masks EOS as HF does.

    The rows move through the pipe in lockstep (`LocalPipeline`): a tick's draft is confirmed only if every row that
    goes on drafted its full model's token, else every row is flushed, so a batch's confirms are rarer than its
    rows' (`PPSDStats`). Every backend takes any batch.

    `cache` (batch len(prompts)) must hold the longest prompt's length + the largest max_new_tokens positions (None:
    made here). `capture` ("none", "graph", "compile", "compile-layers", "auto") is how the local backends launch a
    stage's per-token pass (executor/passes.py), a captured pipeline being kept on the model with its own cache for
    the next call. The `distributed` backend ignores both (each stage process allocates its own layers' KV and runs
    its passes uncaptured) and takes `threads_per_stage` (torch threads per process, default cores // stages) and
    `stall_timeout_s` (a process that sends no heartbeat for that long, stopped or hung, stops the run with an error
    naming it; a healthy run has no time limit, executor/ppsd_dist.py).

    `sync_every` (local backends) is how many ticks the device runs between two host reads (`LocalPipeline`): default
    8 when captured, 1 otherwise (`resolve_sync_every`). The output does not depend on it. `given` holds the rows as
    the caller gave them, left padding included (default `prompts`): what prefix processors
    (`SamplingConfig.processors`) see before the new tokens; they need the local backends, uncaptured.
    """
    if head not in (None, "shared") and exit_layer is None:  # a trained head's own exit layer
        head = resolve_head(head, adapter, None)
        exit_layer = getattr(head, "exit_layer", None)
    plan = plan_stages(adapter.num_layers, stages, stage_boundaries, exit_layer)
    check_backend(adapter, backend)
    check_stall_timeout(stall_timeout_s)
    head = resolve_head(head, adapter, plan.exit_layer)
    check_rows(prompts, sinks)
    lengths = [len(prompt) for prompt in prompts]
    selector = make_selector(adapter, lengths, sinks[0], sampling, min_new_tokens)
    capture = prefix_capture(capture, selector.config, "ppsd", backend)
    if all(sink.done for sink in sinks):
        return new_stats(plan, backend, sum(lengths), len(prompts))
    if backend == "distributed":
        from executor.ppsd_dist import decode_distributed

        return decode_distributed(
            adapter,
            prompts,
            sinks,
            plan,
            sampling=selector.config,
            min_new_tokens=min_new_tokens,
            threads_per_stage=threads_per_stage,
            stall_timeout_s=stall_timeout_s,
            head=head,
        )
    _check_cache(adapter, cache, head, len(prompts), max(lengths) + max(sink.max_new_tokens for sink in sinks))
    check_sync_every(sync_every)
    mode = resolve_capture(capture, adapter.device, selector.config.kind)
    every = resolve_sync_every(sync_every, mode)
    with on_device(adapter.device):
        return _decode_local(
            adapter, prompts, sinks, cache, plan, backend, selector, mode, capture == "auto", head, every, given
        )


def check_rows(prompts: list[list[int]], sinks: list[TokenSink]) -> None:
    if not prompts or len(prompts) != len(sinks):
        raise ValueError(f"PPSD takes a sink per prompt and at least one prompt, got {len(prompts)} prompts and "
                         f"{len(sinks)} sinks")  # fmt: skip
    if not all(prompts):
        raise ValueError("empty prompt: PPSD needs at least one prompt token in every row")
    if len({sink.eos_token_ids for sink in sinks}) != 1:
        raise ValueError("PPSD's rows move in lockstep: every row's sink must have the same EOS ids")


def _check_cache(adapter: ModelAdapter, cache: KVCache | None, head: Any, rows: int, needed: int) -> None:
    if cache is None:
        return
    if cache.num_layers < adapter.num_layers + getattr(head, "extra_layers", 0):
        raise ValueError(f"cache holds {cache.num_layers} layers, the model and its exit head need more")
    if cache.batch != rows:
        raise ValueError(f"cache holds {cache.batch} rows, the batch has {rows}")
    if cache.max_len < needed:
        raise ValueError(
            f"cache holds {cache.max_len} positions, PPSD needs the longest prompt's length + the largest "
            f"max_new_tokens = {needed} (the tokens fed, plus the pipe's scratch slot)"
        )
