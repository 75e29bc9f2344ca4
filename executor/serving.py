"""Continuous batching in the executor: a workload's requests arrive on the wall clock and share fixed batch slots.

The schedule is the simulator's (`sim.serving`, whose admission and metrics this module uses): first come, first
served admission at round boundaries into `max_batch` slots under a KV budget in tokens; prefill first (an admitted
request's prompt runs as a batch-1 pass of its own, its first token out of it); then one decode round over the
running requests, AR (one step) or EESD (one draft-then-verify round, each request with its own draft policy); a
request that is done (its output length, or an EOS) leaves at the round's end and its slot goes to the next one.

Slots: one KV cache of `max_batch` rows, each row a request's cache by absolute position (as in the batched
decoders). A decode round over n running requests runs the static passes (`executor.passes`) of an n-row view of that
cache, so a pass holds exactly the running requests (as the simulator costs it); a request that leaves hands its row to
the last running one (its valid KV prefix is copied over), so the running requests always hold rows 0 .. n - 1. A new
request's prefill runs on a one-row view of its slot's row. The rounds are the batched decoders' own pieces
(`executor.decoding`: `draft_steps`, `verify_pass`, `RoundVerdicts`, `zero_draft_rounds`), so every request's tokens
are those it gets alone with AR (greedy, or exact sampling for the same seed): positions are the request's own, the
attention mask of a static pass sees only slots up to a query's position, and a slot's stale entries past a new
request's positions are never visible.

PPSD (`method="ppsd"`) serves static batches, as the simulator does: when nothing runs, the requests waiting (up to
`max_batch`, first come first served under the KV budget) are prefilled together through every stage of a local
pipeline (`executor.ppsd`, backend "sequential" or on a GPU "streams"; their first tokens out of that pass), then
decoded together in lockstep until every row is done, each row ending at its own output length or EOS. A row that is
done leaves when the host reads its last token, but its slot is not refilled mid-decode: the pipe takes new requests
when the whole batch is done. The rows run over an n-row view of one cache of `max_batch` rows sized for the
workload's longest request; a batch's decode is logged as one pass of kind "ppsd" with its ticks and the batch's
verdicts. `max_batch` 1 (the default for PPSD) serves one request at a time. With `ppsd_batching="continuous"`,
requests join a running batch at the host's reads of the device instead: at a read that leaves a row going, if a
request waits and admission lets it in, the decode stops, the rows going on move to the first rows (their KV before
their last token copied over), the requests waiting are prefilled together into the rows after them, and the pipe
starts afresh from every row's last token (`PipelineDecoder.join`); each stretch is logged as its own pass
(`stopped` where a join cut it). The cache then holds two output lengths past the longest prompt: a stretch feeds
every row as far as its row asking the most from where it resumed. On backend "distributed" the batches run over a
process per stage (`DistributedDecoder`), started before the run's clock and kept for all of its batches; each row's
tokens reach the host as the last stage's process streams them. Continuous, the host publishes its queue to the
processes whenever it wakes (a token read, or the next arrival due), and the last stage's process asks the join rule
of it at every tick, where the host read would ask it: a stop and a join then happen in every stage process, each
keeping its own layers' KV of the rows going on.

A view's books (`KVCache.lengths`) are set from the running requests' positions before every round. Greedy and exact
sampling only; rejection sampling and repetition penalties keep per-row state the slots do not carry over, and are
refused.

Passes run uncaptured by default (the CPU path). On a GPU, `capture` ("graph", "compile-layers" or "auto") captures
the decode passes of each running-batch size n the first time it occurs (an n-row view of the slot cache is the same
memory every round, so its graphs stay valid while requests come and go); prefills run uncaptured (in prefill
buckets). A captured decoder is kept on the model for the next `serve` call of the same setup (its graphs with it),
so a warm-up call pays for the captures; "graph" captures in milliseconds, "compile-layers" compiles the layer once
per (n, token count).
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from executor.adapter import ModelAdapter
from executor.api import check_arguments, check_policies
from executor.decoding import (
    GenerationStats,
    RoundVerdicts,
    Rows,
    TokenSink,
    chains_zero_rounds,
    draft_steps,
    draw_budgets,
    longest_draft,
    prefill_rows,
    read_back,
    verify_pass,
    zero_draft_rounds,
)
from executor.heads import draft_cost_ratio, head_key, resolve_head
from executor.kv_cache import KVCache, copy_rows, rows_view
from executor.passes import (
    Passes,
    captured_projections,
    kept_on_model,
    on_device,
    resolve_capture,
    resolve_sync_every,
)
from executor.ppsd import (
    LocalPipeline,
    PPSDStats,
    StagePlan,
    decode_local,
    local_pipeline,
    make_selector,
    new_stats,
    plan_stages,
    prefill_local,
)
from executor.sampling import SamplingConfig, TokenSelector
from sim.contract import cache_capacity, default_exit_layer, policy_seed, ppsd_serving_output
from sim.policy import DraftPolicy, make_policy
from sim.serving import PPSD_BATCHING, Admission, PassLog, RequestRecord, ServingResult, kv_tokens, never_admitted
from sim.workload import ClosedLoopUsers, Request, ServingWorkload

SERVE_METHODS = ("ar", "eesd", "ppsd")
DEFAULT_MAX_BATCH = 8
PPSD_BACKENDS = ("sequential", "streams", "distributed")


@dataclass
class ServeOutcome:
    """A served workload: the run's records and totals, each request's tokens (by index) and the decoders' stats;
    with replicas (`executor.replicas`), when the dispatcher sent each request (s from time 0, by index)."""

    result: ServingResult
    outputs: list[list[int]]
    stats: GenerationStats
    dispatched_s: list[float] | None = None


@dataclass
class _Running:
    """A request in a slot: its prompt, sink, policy, last committed token and the position it goes to."""

    request: Request
    prompt: list[int]
    sink: TokenSink
    policy: DraftPolicy | None
    token: int = 0
    position: int = 0


class SlotDecoder:
    """The device side of serving: the slot cache, a one-row prefill into a slot, a decode round over the first n
    rows, and moving a row when a request leaves (see the module docstring)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        method: str,
        max_batch: int,
        capacity: int,
        exit_layer: int | None,
        head: Any,
        max_draft: int,
        confidence: bool,
        config: SamplingConfig,
        eos: list[int],
        capture: str = "none",
    ) -> None:
        self.adapter, self.method, self.config, self.eos = adapter, method, config, eos
        self.capture = capture  # resolved (`resolve_capture`): how the decode passes run
        self.exit_layer, self.head, self.max_draft, self.confidence = exit_layer, head, max_draft, confidence
        self.cache = adapter.new_cache(max_batch, capacity, extra_layers=getattr(head, "extra_layers", 0))
        self._passes: dict[int, Passes] = {}
        self._rows: dict[int, KVCache] = {}
        self.stats = GenerationStats(method=method)

    def prefill(self, slot: int, running: _Running) -> None:
        """The request's prompt through every layer into row `slot`; its first token goes to its sink."""
        cache = self._rows.get(slot)
        if cache is None:
            cache = self._rows[slot] = rows_view(self.cache, slot, slot + 1)
        cache.lengths = [[0] for _ in range(cache.num_layers)]
        rows = Rows(prompts=[running.prompt], sinks=[running.sink])
        selector = TokenSelector(self.config, [len(running.prompt)], 0, self.eos, self.adapter.device)
        prefill_rows(self.adapter, cache, rows, selector, self.exit_layer, self.head)
        running.token, running.position = rows.tokens[0], rows.positions[0]

    def round(self, slots: Sequence[_Running]) -> int:
        """One decode round over the requests in rows 0 .. len(slots) - 1; returns its draft steps (0: an AR step)."""
        passes = self._passes_for(len(slots))
        passes.selector.restart([len(s.prompt) for s in slots], self.config.seed)
        positions = [s.position for s in slots]
        passes.cache.lengths = [positions] * passes.cache.num_layers  # (the books' lists are never changed in place)
        rows = Rows(
            prompts=[s.prompt for s in slots], sinks=[s.sink for s in slots],
            tokens=[s.token for s in slots], positions=[s.position for s in slots],
        )  # fmt: skip
        steps = 0
        if self.method == "ar":
            self._ar_step(passes, rows)
        else:
            steps = self._eesd_round(passes, rows, [s.policy for s in slots])  # type: ignore[misc]
        for running, token, position in zip(slots, rows.tokens, rows.positions, strict=True):
            running.token, running.position = token, position
        return steps

    def move(self, source: int, target: int, length: int) -> None:
        """Row `source`'s valid KV (positions < `length`) into row `target`, in every cache layer."""
        for keys, values in zip(self.cache.keys, self.cache.values, strict=True):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]

    def _passes_for(self, n: int) -> Passes:
        passes = self._passes.get(n)
        if passes is None:
            selector = TokenSelector(self.config, [1] * n, 0, self.eos, self.adapter.device)
            passes = self._passes[n] = Passes(
                self.adapter, rows_view(self.cache, 0, n), selector, exit_layer=self.exit_layer, head=self.head,
                max_draft=self.max_draft, capture=self.capture, confidence=self.confidence,
            )  # fmt: skip
        return passes

    def _ar_step(self, passes: Passes, rows: Rows) -> None:
        passes.start_round(rows.tokens, rows.positions)
        passes.cache.claim(range(self.adapter.num_layers), rows.positions, 1)
        passes.ar(max(rows.positions))
        passes.ar_cursor.zero_()
        read = read_back(passes.tokens[1], self.stats)
        passes.held_inputs([tokens[0] for tokens in read], [p + 1 for p in rows.positions])  # the step chained on
        for row, tokens in enumerate(read):
            rows.commit(row, tokens)
        self.stats.rounds += 1

    def _eesd_round(self, passes: Passes, rows: Rows, policies: list[DraftPolicy]) -> int:
        """`executor.decoding.decode_eesd`'s round, every row active; returns its draft steps."""
        stats = self.stats
        budgets = draw_budgets(rows, policies, 0)
        if chains_zero_rounds(passes) and not any(budgets):
            zero_draft_rounds(passes, rows, policies, stats, 1)
            return 0
        counts = draft_steps(passes, rows, policies, budgets, stats)
        k = max(counts)
        slots = verify_pass(passes, rows, k, counts, longest_draft(policies))
        verdicts = RoundVerdicts.read(passes, k, counts, stats, rows.positions, slots)
        for row, policy in enumerate(policies):
            accepted, token = verdicts.verdict(row)
            policy.update(counts[row], accepted)
            rows.commit(row, verdicts.drafts[row][:accepted] + [token])
            stats.drafted.append(counts[row])
            stats.accepted.append(accepted)
        passes.cache.rollback(rows.positions)
        stats.rounds += 1
        return k


class _Ends:
    """When the host learned that each request of a PPSD batch was done: the clock's reading as its sink took its last
    token (`sink` makes the requests' sinks, by request index), told to `on_end` (index, time) as it happens once
    set."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.at: dict[int, float] = {}
        self.on_end: Callable[[int, float], None] | None = None

    def sink(self, index: int, output_len: int, eos: list[int]) -> TokenSink:
        sink = TokenSink(output_len, eos, on_tokens=lambda _: self._seen(index, sink))
        return sink

    def _seen(self, index: int, sink: TokenSink) -> None:
        if sink.done and index not in self.at:
            self.at[index] = self.now()
            if self.on_end is not None:
                self.on_end(index, self.at[index])


class PipelineDecoder:
    """PPSD's device side in serving: batches of up to `rows` requests through a local pipeline (`executor.ppsd`) over
    one cache of `rows` rows and `capacity` positions (a batch of n runs on an n-row view of it; captured, the
    model's kept pipeline of n rows, its cache its own); `prefill` runs a batch's prompts together, `decode` its ticks
    until every row is done or a `stop` at a host read, `join` (continuous batching) moves the rows going on to the
    first rows and prefills new requests into the rows after them."""

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        stages: int,
        stage_boundaries: Sequence[int] | None,
        exit_layer: int | None,
        head: Any,
        backend: str,
        capacity: int,
        config: SamplingConfig,
        eos: list[int],
        capture: str = "none",
        fallback: bool = False,
        rows: int = 1,
        continuous: bool = False,
        join_min: int = 1,
    ) -> None:
        """`capture` resolved (`resolve_capture`); `fallback`: a pass that fails to compile runs uncaptured (as
        `capture="auto"` asks); `rows`: the widest batch; `continuous`: requests join running batches (`join`),
        `join_min` of them at once (or as many as the slots free)."""
        self.adapter, self.config, self.eos, self.backend, self.capture = adapter, config, eos, backend, capture
        self.fallback = fallback
        self.method, self.capacity, self.continuous, self.join_min = "ppsd", capacity, continuous, join_min
        self.plan = plan_stages(adapter.num_layers, stages, stage_boundaries, exit_layer)
        self.head = resolve_head(head, adapter, self.plan.exit_layer)
        extra = getattr(self.head, "extra_layers", 0)
        self.cache = adapter.new_cache(rows, capacity, extra_layers=extra) if capture == "none" else None
        self.sync_every = resolve_sync_every(None, capture)
        self.pipeline: LocalPipeline | None = None
        self.batch: list[_Running] = []  # the pipeline's rows, in order
        self.stats = GenerationStats(method="ppsd")

    def _pipeline(self, rows: int, prompt_lens: list[int], sink: TokenSink) -> LocalPipeline:
        selector = make_selector(self.adapter, prompt_lens, sink, self.config, 0)
        cache = rows_view(self.cache, 0, rows) if self.cache is not None else None
        return local_pipeline(
            self.adapter, cache, self.plan, self.backend, selector, self.capture, self.capacity, self.fallback,
            self.head, rows,
        )  # fmt: skip

    def prefill(self, batch: list[_Running], stop: JoinQuestion | None = None) -> None:
        """The batch's prompts through every stage together; each row's first token goes to its sink (`stop` is
        asked at the decode's host reads only)."""
        prompts, sinks = [r.prompt for r in batch], [r.sink for r in batch]
        self.pipeline, self.batch = self._pipeline(len(batch), [len(p) for p in prompts], sinks[0]), list(batch)
        begin = time.perf_counter()
        prefill_local(self.pipeline, self.plan, self.backend, self.capture, prompts, sinks, begin, None,
                      self.pipeline.selector.config.seed)  # fmt: skip

    def join(self, going: list[_Running], joining: list[_Running], stop: JoinQuestion | None = None) -> None:
        """Continuous batching, after a decode `stop`ped at a host read (or a prefill that some rows ended): the rows
        `going` on (in batch order) move to the first rows (their KV before their last token copied over), the
        `joining` requests' prompts run together through every layer into the rows after them (each one's first
        token into its sink: AR's prefill, `executor.decoding.prefill_rows`, at stage 1's exit its head's KV too), and
        the pipe is ready to `decode` the new batch (`batch`: those rows, less any its prefill ended) from every row's
        last token."""
        assert self.pipeline is not None, "join follows a prefill"
        batch = going + joining
        pipeline = self._moved(going, len(batch))
        if joining:
            view = rows_view(pipeline.cache, len(going), len(batch))
            view.lengths = [[0] * len(joining) for _ in range(view.num_layers)]
            rows = Rows(prompts=[r.prompt for r in joining], sinks=[r.sink for r in joining])
            lens = [len(r.prompt) for r in joining]
            selector = TokenSelector(self.config, lens, 0, self.eos, self.adapter.device)
            first = pipeline.runners[0]
            prefill_rows(first.adapter, view, rows, selector, self.plan.exit_layer, first.head)
        self.pipeline, self.batch = pipeline, batch
        kept = [r for r in batch if not r.sink.done]  # a joining request its prefill ended runs no decode
        if len(kept) < len(batch):
            pipeline = self._moved(kept, len(kept))
        prompt_lens = [len(r.prompt) for r in kept]
        pipeline.stats = new_stats(self.plan, self.backend, sum(prompt_lens), len(kept))
        pipeline.stats.capture = self.capture
        pipeline.selector.restart(prompt_lens, pipeline.selector.config.seed)
        self.pipeline, self.batch = pipeline, kept

    def _moved(self, rows: list[_Running], width: int) -> LocalPipeline:
        """The pipeline of `width` rows with `rows` (of the current batch, in its order) in its first rows: their KV
        before their last token copied from the current pipeline's cache."""
        assert self.pipeline is not None
        sources = [next(i for i, r in enumerate(self.batch) if r is running) for running in rows]
        pipeline = self._pipeline(width, [1] * width, self.batch[0].sink)  # its rows' lengths set by the caller
        lengths = [len(r.prompt) + len(r.sink.tokens) - 1 for r in rows]
        copy_rows(self.pipeline.cache, pipeline.cache, sources, lengths)
        return pipeline

    def decode(
        self, batch: list[_Running], stop: Callable[[], bool] | None = None
    ) -> tuple[int, tuple[bool, ...], bool]:
        """The prefilled (or joined) batch's ticks until every row is done, or `stop` says so at a host read; returns
        (ticks, the batch's verdicts in order, whether every row is done). The decoder's stats count the batch's
        verdicts (a row's own are not what its speed hangs on)."""
        pipeline = self.pipeline
        assert pipeline is not None and pipeline.stats is not None, "decode follows prefill"
        done = decode_local(pipeline, [r.prompt for r in batch], [r.sink for r in batch], self.sync_every, stop)
        return (*count_decode(self.stats, pipeline.stats), done)


def count_decode(books: GenerationStats, stats: PPSDStats) -> tuple[int, tuple[bool, ...]]:
    """A PPSD decode's ticks and batch verdicts into a serving decoder's books (a row's own verdicts are not what
    its speed hangs on); returns (ticks, the verdicts in order)."""
    books.rounds += stats.ticks
    books.drafted += [1] * len(stats.verdicts)
    books.accepted += stats.verdicts
    return stats.ticks, tuple(bool(v) for v in stats.verdicts)


class DistributedDecoder:
    """PPSD's device side in serving on the distributed backend: batches of up to `rows` requests through a process
    per stage, started once for the run (`executor.ppsd_dist.DistributedPipeline`; each process holds its stage's
    layers and KV). `prefill` hands a batch to the processes and returns once the host has read every row's first
    token; `decode` returns once the batch is done, each row's tokens streamed into its sink as the host reads them
    (so a request leaves at its own last token). Continuous (`join_min`: as `PipelineDecoder`'s), the last stage's
    process asks the join rule at every tick of the queue this host publishes (`JoinQuestion.publish_to`), and stops the
    decode there; `join` then sends it the requests admitted, which its processes prefill into the rows after those
    going on (their KV kept in every stage process)."""

    method = "ppsd"

    def __init__(
        self, adapter: ModelAdapter, plan: StagePlan, head: Any, config: SamplingConfig, eos: list[int],
        admission: Admission, threads_per_stage: int | None = None, continuous: bool = False, join_min: int = 1,
    ) -> None:  # fmt: skip
        """`head` resolved for `plan`'s exit layer (`resolve_head`); `admission`: the run's, whose rule (and each
        request's KV tokens) the last stage's process asks when `continuous`."""
        from executor.ppsd_dist import DistributedPipeline, JoinRule

        self.config, self.eos, self.admission = config, eos, admission
        self.continuous, self.join_min = continuous, join_min
        self.rule = JoinRule(admission.max_batch, admission.kv_capacity, join_min) if continuous else None
        self.pipeline = DistributedPipeline(adapter, plan, threads_per_stage=threads_per_stage, head=head)
        self.stats = GenerationStats(method="ppsd")
        self.batch: list[_Running] = []  # the rows, in the stage processes' order

    def warm_up(self, prompts: list[list[int]], rows: int) -> None:
        """Untimed, before the run's clock: a static batch of each width from 1 to `rows` (`prompts` in turn, 4 tokens
        each) through the stage processes, as a server warms up: a process's first pass of a shape costs more (its
        CPU kernels made for the shape, or its graphs captured) and each process pays it itself."""
        for width in range(1, rows + 1):
            chosen = [prompts[i % len(prompts)] for i in range(width)]
            self.pipeline.generate(chosen, [TokenSink(4, self.eos) for _ in chosen], self.config)

    def prefill(self, batch: list[_Running], stop: JoinQuestion | None = None) -> None:
        """A new batch; continuous, the rows its prefill ends leave it in the stage processes (`batch`: the
        others), and the queue is published while it runs (the processes decode on from its end, asking the
        join rule at once)."""
        kv = [self.admission.tokens(r.request) for r in batch] if self.continuous else None
        self.pipeline.publish(self.admission.waiting_tokens())
        self.pipeline.start([r.prompt for r in batch], [r.sink for r in batch], self.config, 0, self.rule, kv)
        self.pipeline.wait_prefill(self._on_wake(stop))
        self.batch = [r for r in batch if not r.sink.done] if self.continuous else list(batch)
        if all(r.sink.done for r in batch):  # no decode follows: the processes report the prefill's stats
            self.pipeline.finish()

    def decode(
        self, batch: list[_Running], stop: JoinQuestion | None = None
    ) -> tuple[int, tuple[bool, ...], bool]:  # fmt: skip
        """The batch's ticks until every row is done, or (continuous) the last stage stops them for a join: (ticks,
        the batch's verdicts in order, whether every row is done)."""
        assert (stop is not None) == self.continuous, "a continuous batch's decode takes its join question"
        stats = self.pipeline.finish(self._on_wake(stop))
        return (*count_decode(self.stats, stats), all(r.sink.done for r in batch))

    def join(self, going: list[_Running], joining: list[_Running], stop: JoinQuestion | None = None) -> None:
        """After a stopped decode, the rows `going` on and the `joining` requests' prefill (as
        `PipelineDecoder.join`, in the stage processes; the queue published while it runs); right after a prefill,
        the rows going on are already the batch (the processes dropped the rows it ended)."""
        if not self.pipeline.stopped:
            assert not joining and [r.sink for r in going] == self.pipeline.rows()[0], "the processes' rows"
            self.batch = list(going)
            return
        rows = self.pipeline.rows()[0]
        keep = [next(i for i, sink in enumerate(rows) if sink is r.sink) for r in going]
        self.pipeline.publish(self.admission.waiting_tokens())  # the queue left once these joined
        kv = [self.admission.tokens(r.request) for r in joining]
        self.pipeline.join(keep, [r.prompt for r in joining], [r.sink for r in joining], kv)
        self.pipeline.wait_prefill(self._on_wake(stop))
        self.batch = [r for r in going + joining if not r.sink.done]

    def _on_wake(self, stop: JoinQuestion | None) -> Callable[[], float] | None:
        """A wait's wake-up, continuous: the host's queue published to the stage processes (`publish_to`)."""
        return stop.publish_to(self.pipeline) if stop is not None else None

    def close(self) -> None:
        self.pipeline.close()


def check_serving(method: str, config: SamplingConfig) -> None:
    if method not in SERVE_METHODS:
        raise ValueError(f"method must be ar, eesd or ppsd for serving, got {method!r}")
    if config.do_sample and config.mode != "exact":
        raise ValueError(
            f"serving samples with sampling 'exact' only (its tokens keyed by position), got {config.mode}"
        )
    if config.penalized:
        raise ValueError("serving does not take a repetition penalty (its per-row context is not carried by a slot)")
    if config.keeps_text:
        raise ValueError(
            "serving does not take no_repeat_ngram_size or prefix processors (bad_words_ids of several tokens, "
            "sequence_bias, forced BOS / EOS, exponential_decay_length_penalty, logits_processor): a slot carries no "
            "row's text"
        )


@torch.inference_mode()
def serve(
    model: torch.nn.Module | ModelAdapter,
    workload: ServingWorkload,
    prompts: Sequence[Sequence[int]],
    *,
    method: str = "ar",
    exit_layer: int | None = None,
    policy: str = "fixed:4",
    head: Any = None,
    max_batch: int | None = None,
    kv_capacity_tokens: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    capture: str = "none",
    stages: int = 2,
    stage_boundaries: Sequence[int] | None = None,
    backend: str = "sequential",
    ppsd_batching: str = "static",
    ppsd_join_min: int = 1,
    threads_per_stage: int | None = None,
    replica: Any = None,
) -> ServeOutcome:
    """Serve `workload` (arrival times in seconds from the call, or a closed loop) with continuous batching; request
    i's prompt is `prompts[i]` and it asks for `output_len` new tokens (fewer after an EOS). Returns every request's
    record (`sim.serving.RequestRecord`: arrival, prefill start, first token, finish, in seconds) and tokens. The
    decode passes run as `capture` says ("none", or on a GPU "graph", "compile-layers" or "auto"; module docstring).
    PPSD takes `stages`, `stage_boundaries` and `backend` as `executor.ppsd.decode_ppsd` does, its exit layer inside
    stage 1 (default: stage 1's end), and serves batches of up to `max_batch` requests, static or, with
    `ppsd_batching="continuous"`, joined by new requests at host reads (`ppsd_join_min` of them at once, or as many
    as the slots free; module docstring). Backend "distributed" serves them over a process per stage, started before
    the clock starts and stopped with the run (`threads_per_stage` torch threads each; default cores // stages).
    `max_batch` defaults to 8 for AR and EESD, 1 for PPSD. `replica` (internal): a replica worker's link to its
    dispatcher (`executor.replicas`): its requests come from there instead of the workload's arrivals."""
    adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
    config = sampling or SamplingConfig(seed=seed)
    check_serving(method, config)
    mode = resolve_capture(capture, adapter.device, config.kind)
    prompts = [list(p) for p in prompts]
    if max_batch is None:
        max_batch = 1 if method == "ppsd" else DEFAULT_MAX_BATCH
    if len(prompts) != len(workload.requests):
        raise ValueError(f"got {len(prompts)} prompts for {len(workload.requests)} requests: one prompt per request")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if method == "ppsd":
        if ppsd_batching not in PPSD_BATCHING:
            raise ValueError(f"ppsd_batching must be one of {', '.join(PPSD_BATCHING)}, got {ppsd_batching!r}")
        if isinstance(ppsd_join_min, bool) or not isinstance(ppsd_join_min, int) or ppsd_join_min < 1:
            raise ValueError(f"ppsd_join_min must be an integer >= 1, got {ppsd_join_min!r}")
        pipeline = dict(stages=stages, stage_boundaries=stage_boundaries, exit_layer=exit_layer, head=head,
                        backend=backend, fallback=capture == "auto",
                        continuous=ppsd_batching == "continuous", join_min=ppsd_join_min,
                        threads_per_stage=threads_per_stage)  # fmt: skip
        return _serve_ppsd(adapter, workload, prompts, config, mode, max_batch, kv_capacity_tokens, eos_token_id,
                           clock, sleep, pipeline, replica)  # fmt: skip
    exit_head = None
    if method == "eesd":
        exit_head, exit_layer = _exit_head(adapter, head, exit_layer)
    else:
        exit_layer = None
    max_output = max(r.output_len for r in workload.requests)
    check_arguments(adapter, prompts, method, exit_layer, max_output)
    shape = make_policy(policy) if method == "eesd" else None
    if shape is not None:
        check_policies(adapter, [shape])
    max_draft = shape.max_draft_len if shape is not None else 0
    tokens_of = kv_tokens(method, max_draft)
    _check_kv_budget(workload, tokens_of, kv_capacity_tokens)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    settings = dict(
        method=method, max_batch=max_batch, exit_layer=exit_layer, head=exit_head, max_draft=max_draft,
        capacity=cache_capacity(method, max(len(p) for p in prompts), max_output, max_draft, captured=mode != "none"),
        confidence=shape is not None and shape.needs_confidence, config=config, eos=eos, capture=mode,
    )  # fmt: skip
    decoder = slot_decoder(adapter, settings)
    cost_ratio = draft_cost_ratio(adapter, exit_layer, exit_head) if exit_head is not None else 1.0

    def policy_of(request: Request) -> DraftPolicy | None:
        """Each request's own policy, seeded by its index (the output never depends on it)."""
        if shape is None:
            return None
        return make_policy(policy, rng=random.Random(policy_seed(seed, request.index)), cost_ratio=cost_ratio)

    loop = _loop(replica, decoder, workload, prompts, Admission(max_batch, kv_capacity_tokens, tokens_of), policy_of)
    with on_device(adapter.device):  # captured graphs replay on the model's device's stream
        return loop.run(clock, sleep)


def _serve_ppsd(
    adapter: ModelAdapter,
    workload: ServingWorkload,
    prompts: list[list[int]],
    config: SamplingConfig,
    capture: str,
    max_batch: int,
    kv_capacity_tokens: int | None,
    eos_token_id: int | Sequence[int] | None,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    pipeline: dict[str, Any],
    replica: Any = None,
) -> ServeOutcome:
    """`serve` with PPSD: static batches through a `PipelineDecoder` (module docstring)."""
    if pipeline["backend"] not in PPSD_BACKENDS:
        raise ValueError(
            f"ppsd serving runs a local pipeline: backend must be one of {', '.join(PPSD_BACKENDS)}, got "
            f"{pipeline['backend']!r}"
        )
    if pipeline["backend"] == "distributed" and replica is not None:
        raise ValueError(
            "ppsd serving on backend 'distributed' runs one pipeline of stage processes from this process: replicas "
            "need backend 'sequential' or 'streams'"
        )
    if pipeline["backend"] == "streams" and adapter.device.type != "cuda":
        raise ValueError(
            f"backend 'streams' needs a GPU (a CUDA stream per stage), but the model is on {adapter.device}: serve "
            "with backend 'sequential' on this machine"
        )
    head, exit_layer = pipeline["head"], pipeline["exit_layer"]
    if head not in (None, "shared") and exit_layer is None:  # a trained head's own exit layer
        head = resolve_head(head, adapter, None)
        exit_layer = getattr(head, "exit_layer", None)
    max_output = max(r.output_len for r in workload.requests)
    check_arguments(adapter, prompts, "ppsd", None, max_output)
    tokens_of = kv_tokens("ppsd", 0)
    _check_kv_budget(workload, tokens_of, kv_capacity_tokens)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    admission = Admission(max_batch, kv_capacity_tokens, tokens_of)
    if pipeline["backend"] == "distributed":
        pipeline = {**pipeline, "head": head, "exit_layer": exit_layer}
        return _serve_distributed(adapter, workload, prompts, config, eos, clock, sleep, pipeline, admission)
    fed = ppsd_serving_output(max_output, pipeline["continuous"])  # continuous: two outputs' room
    capacity = cache_capacity("ppsd", max(len(p) for p in prompts), fed, 0, captured=capture != "none")
    decoder = PipelineDecoder(
        adapter, stages=pipeline["stages"], stage_boundaries=pipeline["stage_boundaries"], exit_layer=exit_layer,
        head=head, backend=pipeline["backend"], capacity=capacity, config=config, eos=eos, capture=capture,
        fallback=pipeline["fallback"], rows=max_batch, continuous=pipeline["continuous"],
        join_min=pipeline["join_min"],
    )  # fmt: skip
    loop = _loop(replica, decoder, workload, prompts, admission, lambda _: None)
    with on_device(adapter.device):
        return loop.run(clock, sleep)


def _serve_distributed(
    adapter: ModelAdapter, workload: ServingWorkload, prompts: list[list[int]], config: SamplingConfig,
    eos: list[int], clock: Callable[[], float], sleep: Callable[[float], None], pipeline: dict[str, Any],
    admission: Admission,
) -> ServeOutcome:  # fmt: skip
    """`serve` with PPSD's distributed backend: its stage processes start (each loading its stage, then warmed up on
    a batch of each width) before the clock does, serve the batches, and stop with the run."""
    plan = plan_stages(adapter.num_layers, pipeline["stages"], pipeline["stage_boundaries"], pipeline["exit_layer"])
    head = resolve_head(pipeline["head"], adapter, plan.exit_layer)
    decoder = DistributedDecoder(adapter, plan, head, config, eos, admission, pipeline["threads_per_stage"],
                                 pipeline["continuous"], pipeline["join_min"])  # fmt: skip
    try:
        decoder.warm_up(prompts, min(admission.max_batch, len(prompts)))
        return _ServeLoop(decoder, workload, prompts, admission, lambda _: None).run(clock, sleep)
    finally:
        decoder.close()


def _loop(replica: Any, *args: Any) -> _ServeLoop:
    """The host loop: a standalone server's, or a replica worker's (`executor.replicas`)."""
    if replica is None:
        return _ServeLoop(*args)
    from executor.replicas import ReplicaLoop

    return ReplicaLoop(*args, link=replica)


MAX_KEPT_DECODERS = 2  # captured slot decoders kept on a model (each holds a slot cache and its graphs)


def slot_decoder(adapter: ModelAdapter, settings: dict[str, Any]) -> SlotDecoder:
    """A fresh decoder for uncaptured serving; a captured one is kept on the model for the next call of the same setup
    (`kept_on_model`, as captured passes are kept), its stats reset."""
    if settings["capture"] == "none":
        return SlotDecoder(adapter, **settings)
    captured_projections(adapter.model)  # before the weights are read: fusing moves them
    key = tuple((name, head_key(value) if name == "head" else repr(value)) for name, value in sorted(settings.items()))
    build = lambda: SlotDecoder(adapter, **settings)  # noqa: E731
    decoder = kept_on_model(adapter.model, "_eesd_serving", key, build, MAX_KEPT_DECODERS)
    decoder.stats = GenerationStats(method=decoder.method)
    return decoder


def run_end(records: Sequence[RequestRecord], passes: Sequence[PassLog]) -> float:
    """When a run ended: its last request's finish, or its last pass's end where later (a decode pass returns after
    the host read its last row's last token), as the simulator's run ends with its last event."""
    return max(max(r.finish_s for r in records), max((log.start_s + log.seconds for log in passes), default=0.0))


def _check_kv_budget(workload: ServingWorkload, tokens_of: Callable[[Request], int], budget: int | None) -> None:
    largest = never_admitted(workload, tokens_of, budget)
    if largest is not None:
        raise ValueError(
            f"kv_capacity_tokens {budget}: request {largest.index} needs {tokens_of(largest)} tokens, so it could "
            "never be admitted"
        )


def _exit_head(adapter: ModelAdapter, head: Any, exit_layer: int | None) -> tuple[Any, int]:
    """EESD's head object and exit layer: a head file's own exit layer where none is given, else the middle layer."""
    if exit_layer is None:
        if head not in (None, "shared"):
            head = resolve_head(head, adapter, None)
        exit_layer = getattr(head, "exit_layer", None) or default_exit_layer(adapter.num_layers)
    return resolve_head(head, adapter, exit_layer), exit_layer


def arrival_heap(workload: ServingWorkload, users: ClosedLoopUsers | None) -> list[tuple[float, int, Request]]:
    """The arrivals ahead as a heap of (time, index, request): the workload's, or a closed loop's first requests."""
    if users is None:
        upcoming = [(r.arrival_s, r.index, r) for r in workload.requests]
    else:
        upcoming = [(at_s, r.index, r) for r, at_s in users.first()]
    heapq.heapify(upcoming)
    return upcoming  # type: ignore[return-value]


class JoinQuestion:
    """Continuous batching's question at each host read: have requests arrived that admission lets in now, as many
    as `join_min` (or the slots free, if fewer)? Asked here (`__call__`: the local backends), or by PPSD's last stage
    process, of the queue this host publishes whenever it wakes (`publish_to`: the distributed backend)."""

    def __init__(self, loop: _ServeLoop, now: Callable[[], float]) -> None:
        self.loop, self.now = loop, now

    def __call__(self) -> bool:
        self.loop._arrivals(self.now())
        return self.loop.admission.joinable(self.loop.decoder.join_min)

    def publish_to(self, pipeline: Any) -> Callable[[], float]:
        """The wake-up of a distributed decode's wait: the arrivals due in the queue, the queue published to the
        stage processes; returns how long the wait may sleep (until the next arrival)."""

        def on_wake() -> float:
            now_s = self.now()
            self.loop._arrivals(now_s)
            pipeline.publish(self.loop.admission.waiting_tokens())
            upcoming = self.loop.upcoming
            return upcoming[0][0] - now_s if upcoming else math.inf

        return on_wake


class _ServeLoop:
    """The host side: arrivals on the wall clock, admission, prefills, rounds, departures and the records."""

    def __init__(
        self,
        decoder: SlotDecoder | PipelineDecoder | DistributedDecoder,
        workload: ServingWorkload,
        prompts: list[list[int]],
        admission: Admission,
        policy_of: Callable[[Request], DraftPolicy | None],
    ) -> None:
        self.decoder, self.workload, self.prompts = decoder, workload, prompts
        self.admission, self.policy_of = admission, policy_of
        self.records = [RequestRecord(r.index, r.prompt_len, r.output_len, math.nan) for r in workload.requests]
        self.result = ServingResult(decoder.method, admission.max_batch, self.records)
        self.users = ClosedLoopUsers(workload) if workload.closed else None
        self.sinks: list[TokenSink | None] = [None] * len(workload.requests)
        self.upcoming: list[tuple[float, int, Request]] = []
        self.slots: list[_Running] = []
        # a PPSD batch's (`_ppsd_batch`): when the host read each request's end, its row, the requests that left
        self.ppsd_ends = _Ends(time.perf_counter)
        self.ppsd_rows: dict[int, _Running] = {}
        self.ppsd_left: set[int] = set()

    def run(self, clock: Callable[[], float], sleep: Callable[[float], None]) -> Any:
        begin = self._start(clock)
        now = lambda: clock() - begin  # noqa: E731
        finished = 0
        while self._more(finished):
            self._arrivals(now())
            if self.decoder.method == "ppsd":
                finished += self._ppsd_step(now, sleep, finished)
                continue
            request = self.admission.next()
            while request is not None:
                finished += self._prefill(request, now)
                self._arrivals(now())
                request = self.admission.next()
            if not self.slots:
                if self._more(finished):
                    self._idle(now, sleep)
                continue
            finished += self._round(now)
        return self._outcome()

    def _start(self, clock: Callable[[], float]) -> float:
        """The arrivals ahead (`arrival_heap`); returns the run's time 0."""
        self.upcoming = arrival_heap(self.workload, self.users)
        return clock()

    def _more(self, finished: int) -> bool:
        return finished < len(self.records)

    def _idle(self, now: Callable[[], float], sleep: Callable[[float], None]) -> None:
        """Nothing runs: wait for the next arrival."""
        if not self.upcoming:
            raise RuntimeError("no request is running or on its way, yet some have not finished")
        sleep(max(0.0, self.upcoming[0][0] - now()))

    def _outcome(self) -> Any:
        result = self.result
        result.time_s = run_end(self.records, result.passes)
        result.in_system_s = sum(r.latency_s for r in self.records)
        result.drafted = sum(self.decoder.stats.drafted)
        result.accepted = sum(self.decoder.stats.accepted)
        outputs = [sink.tokens if sink is not None else [] for sink in self.sinks]
        return ServeOutcome(result, outputs, self.decoder.stats)

    def _arrivals(self, now_s: float) -> None:
        while self.upcoming and self.upcoming[0][0] <= now_s:
            at_s, _, request = heapq.heappop(self.upcoming)
            self.records[request.index].arrival_s = at_s
            self.admission.arrive(request)

    def _prefill(self, request: Request, now: Callable[[], float]) -> int:
        """Prefill an admitted request into the next free row; returns 1 if it is already done (one token, or EOS)."""
        record, decoder = self.records[request.index], self.decoder
        sink = self.sinks[request.index] = TokenSink(request.output_len, decoder.eos)
        running = _Running(request, self.prompts[request.index], sink, self.policy_of(request))
        record.start_s = now()
        decoder.prefill(len(self.slots), running)
        record.first_token_s = now()
        seconds = record.first_token_s - record.start_s
        self.result.book(PassLog("prefill", record.start_s, seconds, 1, len(running.prompt)))
        record.tokens = len(sink.tokens)
        self.result.tokens += record.tokens
        if sink.done:
            self._leave(record, request, record.first_token_s)
            return 1
        self.slots.append(running)
        return 0

    def _ppsd_step(self, now: Callable[[], float], sleep: Callable[[float], None], finished: int) -> int:
        """PPSD's server between batches: the requests waiting (as admission lets them in) as the next batch, or a
        wait for the next arrival; returns the requests finished."""
        admitted = self.admission.admit_all()
        if admitted:
            return self._ppsd_batch(admitted, now)
        if self._more(finished):
            self._idle(now, sleep)
        return 0

    def _ppsd_batch(self, requests: list[Request], now: Callable[[], float]) -> int:
        """A PPSD batch: its prompts prefilled together (one pass, every row's first token), then its decode until
        every row is done (one pass of kind "ppsd"); each request leaves as the host reads its last token, mid-decode
        (a closed loop's user sends its next request then, a replica's dispatcher counts it gone). Static, its slot
        waits for the batch's end; continuous, a host read at which a waiting request may enter stops the decode
        there, the requests waiting join (`_ppsd_join`) and the decode goes on with them (a pass per stretch).
        Returns the requests finished (all of them, and all that joined)."""
        decoder, ends = self.decoder, _Ends(now)
        assert isinstance(decoder, (PipelineDecoder, DistributedDecoder))
        self.ppsd_ends, self.ppsd_rows, self.ppsd_left = ends, {}, set()
        batch = self._ppsd_rows(requests)
        stop = JoinQuestion(self, now) if decoder.continuous else None
        start = now()
        decoder.prefill(batch, stop)
        self._ppsd_prefilled(batch, start, now)
        ends.on_end = self._ppsd_leave  # the others as the host reads their ends
        if stop is not None and any(r.sink.done for r in batch) and not all(r.sink.done for r in batch):
            decoder.join([r for r in batch if not r.sink.done], [])  # the rows its prefill ended run no decode
            batch = decoder.batch
        while not all(r.sink.done for r in batch):
            context = max(len(r.prompt) + len(r.sink.tokens) - 1 for r in batch)
            before = [len(r.sink.tokens) for r in batch]
            begin = now()
            ticks, verdicts, done = decoder.decode(batch, stop)
            end = now()
            made = tuple((len(r.sink.tokens) - count + 1, r.request.output_len - count + 1)
                         for r, count in zip(batch, before, strict=True))  # fmt: skip
            longest, asked = max(count for count, _ in made), max(wanted for _, wanted in made)
            log = PassLog("ppsd", begin, end - begin, len(batch), ticks, context, context + longest - 2, verdicts,
                          asked=asked, stopped=not done, rows=made)  # fmt: skip
            self.result.book(log, rounds=ticks)  # a PPSD run's rounds are its ticks
            self._ppsd_count(batch)
            if not done:
                batch = self._ppsd_join(batch, now, stop)
        for index in list(self.ppsd_rows):  # a row whose sink never took a token (none asked)
            if index not in self.ppsd_left:
                self._ppsd_leave(index, now())
        return len(self.ppsd_rows)

    def _ppsd_rows(self, requests: list[Request]) -> list[_Running]:
        """The admitted requests' rows, their sinks telling `_Ends` when each is done."""
        batch = []
        for request in requests:
            sink = self.sinks[request.index] = self.ppsd_ends.sink(request.index, request.output_len, self.decoder.eos)
            running = self.ppsd_rows[request.index] = _Running(request, self.prompts[request.index], sink, None)
            batch.append(running)
        return batch

    def _ppsd_prefilled(self, batch: list[_Running], start: float, now: Callable[[], float]) -> None:
        """Log a batch prefill that began at `start`; its rows' first tokens counted, the rows done then leave."""
        first_s = now()
        context = max(len(r.prompt) for r in batch)
        self.result.book(PassLog("prefill", start, first_s - start, len(batch), context))
        for running in batch:
            record = self.records[running.request.index]
            record.start_s, record.first_token_s = start, first_s
        self._ppsd_count(batch)
        ends = self.ppsd_ends
        for index in sorted((r.request.index for r in batch if r.request.index in ends.at),
                            key=lambda i: (ends.at[i], i)):  # fmt: skip
            self._ppsd_leave(index, first_s)  # done at the prefill: they leave with its end

    def _ppsd_count(self, batch: list[_Running]) -> None:
        """The rows' tokens so far into their records and the result's count."""
        for running in batch:
            record = self.records[running.request.index]
            self.result.tokens += len(running.sink.tokens) - record.tokens
            record.tokens = len(running.sink.tokens)

    def _ppsd_leave(self, index: int, at_s: float) -> None:
        running, record = self.ppsd_rows[index], self.records[index]
        if index in self.ppsd_left or math.isnan(record.first_token_s):  # done in its prefill: it leaves after it
            return
        self._ppsd_count([running])
        self._leave(record, running.request, max(at_s, record.first_token_s))
        self.ppsd_left.add(index)

    def _ppsd_join(self, batch: list[_Running], now: Callable[[], float], stop: JoinQuestion) -> list[_Running]:
        """The requests waiting (as admission lets them in) join the rows going on (`PipelineDecoder.join`: their
        prompts prefilled together, logged as one prefill pass); returns the new batch (less the rows that prefill
        ended)."""
        going = [r for r in batch if not r.sink.done]
        joining = self._ppsd_rows(self.admission.admit_all())
        start = now()
        self.decoder.join(going, joining, stop)
        self._ppsd_prefilled(joining, start, now)
        return self.decoder.batch

    def _round(self, now: Callable[[], float]) -> int:
        """One decode round over the running requests; the done ones leave (the last rows fill their rows)."""
        slots, result = self.slots, self.result
        start = now()
        before = [len(s.sink.tokens) for s in slots]
        context = round(sum(s.position + 1 for s in slots) / len(slots))  # as the simulator's rows count it
        furthest = max(s.position for s in slots)
        steps = self.decoder.round(slots)
        end = now()
        result.book(PassLog("round", start, end - start, len(slots), steps, context, furthest))
        for running, count in zip(slots, before, strict=True):
            record = self.records[running.request.index]
            record.tokens = len(running.sink.tokens)
            result.tokens += record.tokens - count
        done = [i for i, s in enumerate(slots) if s.sink.done]
        for index in reversed(done):
            running = slots[index]
            last = len(slots) - 1
            if index != last:
                self.decoder.move(last, index, slots[last].position)
                slots[index] = slots[last]
            slots.pop()
            self._leave(self.records[running.request.index], running.request, end)
        return len(done)

    def _leave(self, record: RequestRecord, request: Request, at_s: float) -> None:
        record.finish_s = at_s
        self.admission.release(request)
        if self.users is not None:
            following = self.users.after(at_s)
            if following is not None:
                next_request, send_s = following
                heapq.heappush(self.upcoming, (send_s, next_request.index, next_request))
