"""PPSD's `distributed` backend: one process per pipeline stage, joined by torch.distributed point-to-point messages.

Each process holds only its stage's decoder layers (the others are replaced by empty placeholders), plus the
embedding and exit head (stage 1) or the output head (last stage), and a KV cache for its own layers only. The
processes advance in lockstep ticks with exactly the semantics of executor/ppsd.py, so they produce the same ticks,
confirms and flushes as the `sequential` reference, for one row or a batch of B rows in lockstep. One tick on rank r
(stage r + 1 of n):

    1. run the held tokens (one a row) through the stage (stage 1 drafts; the last stage predicts and emits);
    2. the last rank judges (`RowJudge`: each row's verify rule at depth 1, then the batch's verdict as the local
       backends decide it) and sends the tick's report (for each row: the verdict, its token, its position, whether
       it goes on) to every rank;
    3. on a flush every rank rolls its own layers' KV back and drops its output, and the corrections enter stage 1;
       otherwise rank r sends its output (a header of position and draft a row, then the hidden states [B, 1, d]) to
       rank r + 1.

Continuous batching (serving): the last rank also asks a join rule at each tick, of the queue the caller publishes in
shared memory, and may report the tick as stopped; every rank then keeps its rows' KV for the join that follows
(`StageWork`, `JoinJob`): the rows going on move up in each rank's own cache, and the joining prompts are prefilled
through the stages into the rows after them.

Backends: gloo on CPU, NCCL on GPUs (rank r on cuda:LOCAL_RANK).

Local run: `decode_ppsd(..., backend="distributed")` starts the n processes itself (multiprocessing's forkserver
context, a free loopback port; a script calling it needs the `if __name__ == "__main__":` guard). Each gets its pruned
stage model by pickling, so CPU weights travel through shared memory (the parent's parameters are moved into shared
memory once, in place) and are not copied. Each process talks to the caller on a pipe of its own: the emitted tokens
(streamed into the caller's sinks, a row each), a heartbeat from a thread of its own (every `stall_timeout_s` / 5 s,
at most 1 s apart), then its stats or its failure. The caller stops the run with `PPSDWorkerError` naming the
stage at fault when:

- a process raises: its own error, preferred to the errors its neighbours then get from losing it (`PeerLost`,
  raised by `StageLink` around every message); the first by time among the processes' own errors;
- a process dies without a word (killed, or crashed in native code): named with its exit code or signal;
- a process sends no heartbeat for `stall_timeout_s` (stopped with SIGSTOP, or hung holding the interpreter).

A healthy run has no deadline: however long its passes take, its heartbeats keep coming. On a failure every other
process is killed and joined. A rank hung inside a computation while its heartbeat runs on is caught by
torch.distributed's own timeout on its neighbours' messages (torch's default), reported as losing it.

Multi-host run, one process per stage, with torchrun (the model directory must exist on every host):

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank {0|1} --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
        -m executor.ppsd_dist --model /path/to/hf_dir --prompt "def fib(n):" --max-new-tokens 64 --dtype bfloat16

World size = number of stages (here 4); `--stage-boundaries 6,12,18`, `--exit-layer` and `--head FILE` (a trained exit
head for stage 1) as in `decode_ppsd`. The last rank prints the generated token ids and the run's statistics as JSON.
Under torchrun there is no caller watching heartbeats: `--timeout-s` (torch.distributed's timeout for one message)
is what stops a rank whose neighbour is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from executor.adapter import ModelAdapter
from executor.decoding import TokenSink
from executor.heads import SharedExitHead, SubsetExitHead, TrainedExitHead, head_class, head_tensors, resolve_head
from executor.kv_cache import KVCache, copy_rows, rows_view
from executor.passes import resolve_capture
from executor.ppsd import (
    DEFAULT_STALL_TIMEOUT_S,
    Item,
    PPSDStats,
    StageOutput,
    StagePlan,
    StageRunner,
    TickOutcome,
    batch_verdict,
    check_rows,
    check_stall_timeout,
    commit,
    feed_limit,
    first_tokens,
    make_selector,
    new_stats,
    plan_stages,
    resolve_first,
)
from executor.sampling import SamplingConfig, TokenSelector
from executor.verify import TickVerdict, tick_verdict
from sim.contract import MAX_BATCH, PPSD_HEADER_VALUES, PPSD_OUTCOME_VALUES, join_count, may_enter

_POLL_S = 0.05
_KILL_GRACE_S = 5.0
_STARTUP_S = 10.0  # how long a stage process may take to send its first beat (forked, its setup unpickled)
_SETTLE_S = 1.0  # after a first failure, how long the caller waits for its cause (a neighbour's death, own error)


class PPSDWorkerError(RuntimeError):
    """A stage process failed, died or stalled: one line naming its stage and rank; `details` holds the traceback
    a failed process sent, if any."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class PeerLost(RuntimeError):
    """A message to or from rank `peer` (None: any rank, a collective) failed: that process, or the link to it, is
    gone."""

    def __init__(self, peer: int | None, cause: BaseException) -> None:
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"lost {'a rank' if peer is None else f'rank {peer}'}: {first}")
        self.peer = peer


@contextmanager
def _talking_to(peer: int | None) -> Iterator[None]:
    """gloo and NCCL raise a RuntimeError (DistBackendError) when the other side of a message goes away."""
    try:
        yield
    except RuntimeError as err:
        raise PeerLost(peer, err) from err


# ------------------------------------------------------------------------------------------- a stage's own share
class StageKVCache(KVCache):
    """A KV cache for layers [first, stop) only (plus `extra` exit-head layers after the model's, on stage 1),
    addressed by global layer index as the adapter addresses it."""

    def __init__(
        self, adapter: ModelAdapter, first: int, stop: int, max_len: int, extra: int = 0, rows: int = 1
    ) -> None:
        layer_ids = [*range(first, stop), *range(adapter.num_layers, adapter.num_layers + extra)]
        super().__init__(
            num_layers=len(layer_ids),
            batch=rows,
            num_kv_heads=adapter.num_kv_heads,
            max_len=max_len,
            head_dim=adapter.head_dim,
            dtype=adapter.dtype,
            device=adapter.device,
            layer_ids=layer_ids,
        )


def _placeholder(module_cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """An empty (zero-row) stand-in for a part this stage does not hold; torch warns that its init is a no-op."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return module_cls(*args, **kwargs)


def stage_model(model: nn.Module, plan: StagePlan, stage: int) -> nn.Module:
    """A structural copy of `model` sharing only stage `stage`'s weights; every other part is an empty placeholder.

    Stage 1 keeps the embedding and the head (its exit head), the last stage keeps the head, all keep the final norm
    (a vector) and the rotary embedding (no weights); none of what the decoders keep on the model (loaded heads,
    captured passes) goes with it. The original model is not modified.
    """
    layers = plan.layers(stage)
    base = copy.copy(model.model)
    base._modules = dict(base._modules)
    base.layers = nn.ModuleList(
        [layer if index in layers else nn.Identity() for index, layer in enumerate(model.model.layers)]
    )
    weight = model.lm_head.weight
    if stage != 0:
        base.embed_tokens = _placeholder(nn.Embedding, 0, weight.shape[1], device=weight.device, dtype=weight.dtype)
    clone = copy.copy(model)
    for name in [name for name in clone.__dict__ if name.startswith("_eesd")]:
        del clone.__dict__[name]  # the decoders' caches on the model (heads, passes): the whole model, pickled
    clone._modules = dict(model._modules)
    clone.model = base
    if stage not in (0, plan.stages - 1):
        clone.lm_head = _placeholder(
            nn.Linear, weight.shape[1], 0, bias=False, device=weight.device, dtype=weight.dtype
        )
    return clone


# ------------------------------------------------------------------------------------------------------ messages
@dataclass(frozen=True)
class TickReport:
    """One tick as the last stage decided it, for every row: the batch's verdict, each row's full-model token and the
    position it takes (-1 where no token left the pipe), and whether each row goes on after it. Sent to every rank
    as `PPSD_OUTCOME_VALUES` values a row (what the simulator prices)."""

    verdict: TickVerdict
    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    going: tuple[bool, ...]
    stopped: bool = False  # continuous batching: the decode ends after this tick, the rows going on wait for a join

    @property
    def done(self) -> bool:
        return not any(self.going)

    @property
    def emitted(self) -> bool:
        return self.verdict != TickVerdict.NONE

    @property
    def partly_done(self) -> bool:
        """Some rows are done and some go on (after a prefill, continuous batching drops the done ones)."""
        return any(self.going) and not all(self.going)

    def outcome(self) -> TickOutcome:
        """Row 0's view, which `PPSDStats.record` counts (the batch's verdict)."""
        return TickOutcome(self.verdict, self.tokens[0], self.positions[0], self.done)

    def values(self) -> list[int]:
        """Each row's (verdict, token, position, going), going 0 for a row done, 1 for one going on, 2 for one going
        on after a stop."""
        rows = zip(self.tokens, self.positions, self.going, strict=True)
        on = 2 if self.stopped else 1
        return [value for token, at, goes in rows for value in (int(self.verdict), token, at, on if goes else 0)]

    @classmethod
    def of_values(cls, values: list[int]) -> TickReport:
        size = PPSD_OUTCOME_VALUES
        _, tokens, positions, going = zip(*(values[i : i + size] for i in range(0, len(values), size)), strict=True)
        return cls(TickVerdict(values[0]), tokens, positions, tuple(map(bool, going)), 2 in going)


class StageLink:
    """Point-to-point messages between neighbouring stages, and the last stage's tick report to all, for `rows` rows
    moving in lockstep."""

    def __init__(
        self, rank: int, world: int, device: torch.device, hidden_size: int, dtype: torch.dtype, rows: int = 1
    ) -> None:
        self.rank, self.world, self.device, self.rows = rank, world, device, rows
        self.hidden_size, self.dtype = hidden_size, dtype
        self.last = world - 1

    def exchange_report(self, report: TickReport | None) -> TickReport:
        """The last rank sends its `report` to every other rank, which receives it (and passes None)."""
        if self.rank == self.last:
            message = torch.tensor(report.values(), dtype=torch.long, device=self.device)
            works = []
            for dst in range(self.last):  # a peer gone is named as it is found, at its send or its wait
                with _talking_to(dst):
                    works.append(dist.isend(message, dst))
            for dst, work in enumerate(works):
                with _talking_to(dst):
                    work.wait()
            return report
        message = torch.empty(PPSD_OUTCOME_VALUES * self.rows, dtype=torch.long, device=self.device)
        with _talking_to(self.last):
            dist.recv(message, src=self.last)
        return TickReport.of_values(message.tolist())

    def pass_on(self, out: StageOutput | None) -> Item | None:
        """Send this stage's output to the next stage (a header of [present, position, draft] a row, then the hidden
        states [B, 1, d] if present); receive the previous stage's."""
        works = []
        if self.rank < self.last:
            meta = [[1, at, draft] for at, draft in zip(out.positions, out.drafts, strict=True)] if out else None
            header = torch.tensor(meta or [[0, -1, -1]] * self.rows, dtype=torch.long, device=self.device)
            assert header.shape[1] == PPSD_HEADER_VALUES  # what the simulator prices (sim.contract)
            with _talking_to(self.rank + 1):
                works.append(dist.isend(header, self.rank + 1))
                if out is not None:
                    works.append(dist.isend(out.hidden.contiguous(), self.rank + 1))
        item = self._receive() if self.rank > 0 else None
        with _talking_to(self.rank + 1):
            for work in works:
                work.wait()
        return item

    def _receive(self) -> Item | None:
        header = torch.empty(self.rows, PPSD_HEADER_VALUES, dtype=torch.long, device=self.device)
        with _talking_to(self.rank - 1):
            dist.recv(header, src=self.rank - 1)
        present, positions, drafts = header.t().tolist()
        if not present[0]:
            return None
        hidden = torch.empty(self.rows, 1, self.hidden_size, dtype=self.dtype, device=self.device)
        with _talking_to(self.rank - 1):
            dist.recv(hidden, src=self.rank - 1)
        return Item(positions, hidden=hidden, drafts=drafts)

    def send_prompt_states(self, hidden: torch.Tensor) -> None:
        with _talking_to(self.rank + 1):
            dist.send(hidden.contiguous(), self.rank + 1)

    def recv_prompt_states(self, width: int) -> torch.Tensor:
        """The previous stage's prefill states [B, width, d] (`StageRunner.prefill_width`)."""
        hidden = torch.empty(self.rows, width, self.hidden_size, dtype=self.dtype, device=self.device)
        with _talking_to(self.rank - 1):
            dist.recv(hidden, src=self.rank - 1)
        return hidden


class RowJudge:
    """The last stage's host side of a tick (steps 2-3 of executor/ppsd.py, for a batch in lockstep): each row's own
    verdict (`executor.verify.tick_verdict`), the batch's (`executor.ppsd.batch_verdict`, as `LocalPipeline`'s
    transition decides it on the device), each going row's token into its sink."""

    def __init__(self, sinks: list[TokenSink], eos_ids: Sequence[int]) -> None:
        self.sinks, self.eos = sinks, torch.tensor(list(eos_ids), dtype=torch.long)
        self.judged: list[int] = []  # the last tick's verdict of each row (NONE for a row already done)
        self.emitted: list[tuple[int, int]] = []  # the last tick's (row, token) put into a sink

    def __call__(self, out: StageOutput | None) -> TickReport:
        sinks, rows = self.sinks, len(self.sinks)
        alive = torch.tensor([not sink.done for sink in sinks])
        if out is None:  # nothing left the pipe
            self.judged, self.emitted = [int(TickVerdict.NONE)] * rows, []
            return TickReport(TickVerdict.NONE, (-1,) * rows, (-1,) * rows, tuple(alive.tolist()))
        predicted = out.predicted_id.cpu()
        own = tick_verdict(torch.ones(rows, dtype=torch.bool), torch.tensor(out.drafts), predicted)
        emitted_at = [at + 1 for at in out.positions]
        last = torch.tensor([len(sink.tokens) + 1 >= sink.max_new_tokens for sink in sinks])  # its last token asked
        ending = (predicted.unsqueeze(1) == self.eos).any(1) | last
        verdict = TickVerdict(int(batch_verdict(own, alive, ending)[0]))
        self.judged = torch.where(alive, own, int(TickVerdict.NONE)).tolist()
        tokens = predicted.tolist()
        self.emitted = [(row, token) for row, (token, goes) in enumerate(zip(tokens, alive.tolist(), strict=True))
                        if goes]  # fmt: skip
        for row, token in self.emitted:
            sinks[row].emit([token])
        return TickReport(verdict, tuple(tokens), tuple(emitted_at), tuple(not sink.done for sink in sinks))


# ------------------------------------------------------------------------------------------------- one stage's loop
@dataclass(frozen=True)
class JoinRule:
    """Continuous batching's rule, asked by the last rank at every tick that leaves a row going: the decode stops
    there when the requests waiting (as the caller publishes them, `WaitingQueue`) may enter now, `join_min` of them
    (or as many as the slots free, if fewer), into a batch of at most `max_batch` rows under a KV budget of
    `kv_capacity` tokens (None: unlimited) (`sim.serving.Admission.joinable`'s rule, on the rows going on)."""

    max_batch: int
    kv_capacity: int | None
    join_min: int = 1


class WaitingQueue:
    """The requests waiting for a continuous batch, as the caller publishes them to the stage processes: the KV
    tokens each would hold, in queue order (at most `MAX_BATCH`), in shared memory behind a lock."""

    def __init__(self, context: Any) -> None:
        self.values = context.Array("q", 1 + MAX_BATCH)  # [count, tokens of each]

    def publish(self, needs: Sequence[int]) -> None:
        needs = list(needs)[:MAX_BATCH]
        with self.values.get_lock():
            self.values[0] = len(needs)
            self.values[1 : 1 + len(needs)] = needs

    def read(self) -> list[int]:
        with self.values.get_lock():
            return list(self.values[1 : 1 + self.values[0]])


@dataclass
class StageRows:
    """A rank's rows, in row order, between the stretches of a continuous run: their KV in this stage's cache (its
    rows 0 .. n - 1), prompts, sinks (the last rank's hold the tokens), the KV tokens each holds for admission, and
    the tokens each asks from its last token on."""

    cache: KVCache
    prompts: list[list[int]]
    sinks: list[TokenSink]
    kv_tokens: list[int]
    asked: list[int]

    def kept(self, rows: Sequence[int], positions: Sequence[int]) -> StageRows:
        """Rows `rows` (ascending) moved up to the first rows of the same cache, their KV before `positions` kept."""
        copy_rows(self.cache, self.cache, rows, positions)
        cache = rows_view(self.cache, 0, len(rows))
        cache.lengths = [list(positions) for _ in range(cache.num_layers)]
        pick = lambda values: [values[row] for row in rows]  # noqa: E731
        return StageRows(cache, pick(self.prompts), pick(self.sinks), pick(self.kv_tokens), pick(self.asked))


class StageWork:
    """Rank `rank`'s part of the generations it is sent (process group already initialised): `generate` a batch of
    prompts (a row each, in lockstep), or, after a continuous batch's decode stopped, `join` new requests to the rows
    going on. The last rank fills the rows' sinks (and hands each token it emits to `on_tokens` as (row, token));
    rank 0 drafts with `head` (None: the shared exit head). Each returns this rank's count of the run: every rank
    counts the same ticks and outcomes (the last rank's sinks hold the tokens, its stats the rows' own verdicts); its
    own stage's time is its entry in `stage_stats`.

    Continuous batching (a `JoinRule`): after a prefill the rows it ended leave the batch (the others move up, and
    the last rank tells `on_rows` which rows stay, in their new order); at each tick that leaves a row going, the last
    rank asks the rule of the queue in `waiting` and, where it says so, reports the tick as stopped: every rank ends
    the stretch there and keeps its rows' KV for the `join` that follows."""

    def __init__(
        self,
        adapter: ModelAdapter,
        plan: StagePlan,
        rank: int,
        head: Any = None,
        on_tokens: Callable[[list[tuple[int, int]]], None] | None = None,
        on_rows: Callable[[list[int]], None] | None = None,
        waiting: WaitingQueue | None = None,
    ) -> None:
        self.adapter, self.plan, self.rank, self.head = adapter, plan, rank, head
        self.on_tokens, self.on_rows, self.waiting = on_tokens, on_rows, waiting
        self.layers, self.is_last = plan.layers(rank), rank == plan.stages - 1
        self.extra = getattr(head, "extra_layers", 0) if rank == 0 else 0
        self.rule: JoinRule | None = None
        self.rows: StageRows | None = None
        self.config, self.min_new_tokens, self.eos = SamplingConfig(), 0, ()

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], sinks: list[TokenSink], selector: TokenSelector, rule: JoinRule | None = None,
        kv_tokens: Sequence[int] | None = None,
    ) -> PPSDStats:  # fmt: skip
        """A batch from its prompts: prefill, then ticks until every row is done (or, with a `rule`, a stop).
        `selector` picks the tokens (its settings serve a join too); `kv_tokens`: what each row holds for the rule."""
        rows, lengths = len(prompts), [len(prompt) for prompt in prompts]
        most = max(sink.max_new_tokens for sink in sinks)
        self.rule, self.config, self.min_new_tokens = rule, selector.config, selector.min_new_tokens
        self.eos = tuple(sinks[0].eos_token_ids)
        cache = StageKVCache(self.adapter, self.layers.start, self.layers.stop, max(lengths) + most, self.extra, rows)
        runner, link = self._runner(cache, selector, rows), self._link(rows)
        stats = new_stats(self.plan, "distributed", sum(lengths), rows)
        if runner.is_first or runner.is_last:  # the ranks that pick tokens: a repetition penalty's committed text
            selector.track(self.adapter.lm_head.weight.shape[0])
            selector.start(prompts)
        with _talking_to(None):
            dist.barrier()  # every process has its model: time from here
        begin = time.perf_counter()
        report = _prefill(runner, link, prompts, sinks, self.on_tokens)
        commit(selector, report.tokens)
        asked = [sink.max_new_tokens for sink in sinks]
        self.rows = StageRows(cache, list(prompts), list(sinks), list(kv_tokens or [0] * rows), asked)
        if rule is not None and report.partly_done:
            report = self._kept(report)
            runner, link = self._for_rows()
        stats.prefill_time_s = time.perf_counter() - begin
        return self._decode(runner, link, stats, report, begin)

    @torch.inference_mode()
    def join(self, job: JoinJob) -> PPSDStats:
        """After a stopped decode: the rows `job.going` on (their KV before their last token copied into a new cache,
        in that order), then the joining prompts prefilled together into the rows after them (each one's first token
        from the last rank), the rows that prefill ended dropped, and ticks from every row's last token."""
        old = self.rows
        assert old is not None and self.rule is not None, "a join follows a continuous generation"
        going = list(job.going)
        width = len(going) + len(job.prompts)
        if self.is_last:
            assert job.positions == [len(old.prompts[i]) + len(old.sinks[i].tokens) - 1 for i in going], job
        positions = [*job.positions, *(len(prompt) for prompt in job.prompts)]
        asked = [*job.asked, *job.max_new_tokens]
        begin = time.perf_counter()
        cache = StageKVCache(self.adapter, self.layers.start, self.layers.stop, max(positions) + max(asked),
                             self.extra, width)  # fmt: skip
        copy_rows(old.cache, cache, going, job.positions)
        joining = [TokenSink(count, self.eos, None) for count in job.max_new_tokens]
        view = rows_view(cache, len(going), width)
        first = self._prefill_joining(view, job.prompts, joining, len(going)) if job.prompts else []
        cache.lengths = [list(positions) for _ in range(cache.num_layers)]
        sinks = [*(old.sinks[i] for i in going), *joining]
        kv_tokens = [*(old.kv_tokens[i] for i in going), *job.kv_tokens]
        self.rows = StageRows(cache, [*(old.prompts[i] for i in going), *job.prompts], sinks, kv_tokens, asked)
        started = None
        if self.is_last:
            going_on = (True,) * len(going) + tuple(not sink.done for sink in joining)
            started = TickReport(TickVerdict.START, (*job.tokens, *first), tuple(positions), going_on)
        report = self._link(width).exchange_report(started)
        if report.partly_done:
            report = self._kept(report)
        runner, link = self._for_rows()
        stats = new_stats(self.plan, "distributed", sum(map(len, self.rows.prompts)), len(self.rows.prompts))
        stats.prefill_time_s = time.perf_counter() - begin
        return self._decode(runner, link, stats, report, begin)

    def _prefill_joining(
        self, cache: KVCache, prompts: list[list[int]], sinks: list[TokenSink], first_row: int
    ) -> list[int]:  # fmt: skip
        """The joining prompts through this stage into `cache` (their rows); the last rank's first tokens."""
        cache.lengths = [[0] * len(prompts) for _ in range(cache.num_layers)]
        selector = make_selector(self.adapter, [len(p) for p in prompts], sinks[0], self.config, self.min_new_tokens)
        runner, link = self._runner(cache, selector, len(prompts)), self._link(len(prompts))
        return _prefill_rows(runner, link, prompts, sinks, self.on_tokens, first_row)

    def _kept(self, report: TickReport) -> TickReport:
        """The rows a prefill ended leave the batch: the others move up (`StageRows.kept`), the last rank says which
        stay (`on_rows`); returns their START report."""
        assert self.rows is not None
        kept = [row for row, goes in enumerate(report.going) if goes]
        positions = [report.positions[row] for row in kept]
        self.rows = self.rows.kept(kept, positions)
        if self.is_last and self.on_rows is not None:
            self.on_rows(kept)
        return TickReport(report.verdict, tuple(report.tokens[row] for row in kept), tuple(positions),
                          (True,) * len(kept))  # fmt: skip

    def _for_rows(self) -> tuple[StageRunner, StageLink]:
        """A runner and a link for the rows as they are now (`rows`), to decode them."""
        assert self.rows is not None
        prompts, width = self.rows.prompts, len(self.rows.prompts)
        selector = make_selector(self.adapter, [len(p) for p in prompts], self.rows.sinks[0], self.config,
                                 self.min_new_tokens)  # fmt: skip
        return self._runner(self.rows.cache, selector, width), self._link(width)

    def _runner(self, cache: KVCache, selector: TokenSelector, rows: int) -> StageRunner:
        capture = resolve_capture("auto", self.adapter.device, selector.config.kind)  # compiled layers, graphs on GPUs
        return StageRunner(self.adapter, cache, self.plan, self.rank, selector, capture, fallback=True,
                           head=self.head, rows=rows)  # fmt: skip

    def _link(self, rows: int) -> StageLink:
        config = self.adapter.config
        return StageLink(self.rank, self.plan.stages, self.adapter.device, config.hidden_size, self.adapter.dtype, rows)

    def _decode(
        self, runner: StageRunner, link: StageLink, stats: PPSDStats, report: TickReport, begin: float
    ) -> PPSDStats:  # fmt: skip
        """Ticks from each row's last token (`report`: the prefill's or the join's START) until every row is done or
        the last rank reports a stop."""
        rows, rank, selector = self.rows, self.rank, runner.selector
        assert rows is not None
        judge = RowJudge(rows.sinks, selector.eos_ids) if runner.is_last else None
        inbox = Item(list(report.positions), tokens=list(report.tokens)) if rank == 0 else None
        limit = feed_limit(report.positions[0], max(rows.asked))  # row 0's last position fed: as far for every row
        stage = stats.stage_stats[rank]
        while not report.done:
            tick_begin = time.perf_counter()
            out = runner.run(inbox) if inbox is not None else None
            if rank == 0 and out is not None:
                resolve_first(out, limit)
            stage.count(inbox is not None, time.perf_counter() - tick_begin)
            judged = judge(out) if judge else None
            if judged is not None and self._stops(judged):
                judged = dataclasses.replace(judged, stopped=True)
            sent = time.perf_counter()
            report = link.exchange_report(judged)
            stage.link_s += time.perf_counter() - sent
            stats.host_reads += 1  # each rank reads every tick's report (the last rank its verdict) on its host
            if report.emitted:
                commit(selector, report.tokens)
                if judge is not None and self.on_tokens is not None:
                    self.on_tokens(judge.emitted)
            stats.record(report.outcome(), judge.judged if judge else None)
            if report.done or report.stopped:
                break
            if report.verdict == TickVerdict.FLUSH:
                runner.flush(list(report.positions))
                inbox = Item(list(report.positions), tokens=list(report.tokens)) if rank == 0 else None
            else:
                sent = time.perf_counter()
                item = link.pass_on(out)
                stage.link_s += time.perf_counter() - sent
                inbox = _next_draft(out) if rank == 0 else item
        stats.wall_time_s = time.perf_counter() - begin
        stage.idle_s = stats.wall_time_s - stats.prefill_time_s - stage.busy_s
        stats.new_tokens = sum(len(sink.tokens) for sink in rows.sinks)
        return stats

    def _stops(self, judged: TickReport) -> bool:
        """The join rule at a tick that leaves a row going: may the requests waiting enter the rows going on now?"""
        rule, rows = self.rule, self.rows
        if rule is None or self.waiting is None or judged.done or rows is None:
            return False
        going = [row for row, goes in enumerate(judged.going) if goes]
        used = sum(rows.kv_tokens[row] for row in going)
        count = join_count(rule.join_min, rule.max_batch, len(going))
        return may_enter(self.waiting.read(), count, len(going), used, rule.max_batch, rule.kv_capacity)


def run_stage(
    adapter: ModelAdapter,
    plan: StagePlan,
    rank: int,
    prompts: list[list[int]],
    sinks: list[TokenSink],
    selector: TokenSelector,
    on_tokens: Callable[[list[tuple[int, int]]], None] | None = None,
    head: Any = None,
) -> PPSDStats:
    """Rank `rank`'s part of one PPSD generation of `prompts` (a row each, in lockstep; `StageWork.generate`)."""
    return StageWork(adapter, plan, rank, head, on_tokens).generate(prompts, sinks, selector)


def _next_draft(out: StageOutput | None) -> Item | None:
    """Stage 1's next input: the drafts it proposed after `out`, if they enter the pipe (every row's alike)."""
    if out is None or out.drafts[0] < 0:
        return None
    return Item([at + 1 for at in out.positions], tokens=list(out.drafts))


def _prefill_rows(
    runner: StageRunner, link: StageLink, prompts: list[list[int]], sinks: list[TokenSink], on_tokens,
    first_row: int = 0,
) -> list[int]:  # fmt: skip
    """The prompts down the pipe (the first one row `first_row` of the batch); on the last rank each row's first token
    goes into its sink and to `on_tokens`, and the tokens are returned (elsewhere: [])."""
    lengths = [len(prompt) for prompt in prompts]
    hidden = None if runner.is_first else link.recv_prompt_states(runner.prefill_width(max(lengths)))
    hidden = runner.prefill(hidden, prompts)
    if not runner.is_last:
        link.send_prompt_states(hidden)
        return []
    tokens = first_tokens(runner, hidden, lengths)
    for sink, token in zip(sinks, tokens, strict=True):
        sink.emit([token])
    if on_tokens is not None:
        on_tokens([(first_row + row, token) for row, token in enumerate(tokens)])
    return tokens


def _prefill(
    runner: StageRunner, link: StageLink, prompts: list[list[int]], sinks: list[TokenSink], on_tokens
) -> TickReport:
    """The prompts down the pipe (`_prefill_rows`); the last rank's first tokens are broadcast as the START report."""
    tokens = _prefill_rows(runner, link, prompts, sinks, on_tokens)
    if not runner.is_last:
        return link.exchange_report(None)
    going = tuple(not sink.done for sink in sinks)
    return link.exchange_report(TickReport(TickVerdict.START, tuple(tokens), tuple(map(len, prompts)), going))


# --------------------------------------------------------------------------------------------- local launcher
@dataclass
class StageSetup:
    """What a spawned stage process holds for its life (pickled: the stage model's CPU tensors go by shared memory)."""

    model: nn.Module
    plan: StagePlan
    device_type: str  # "cpu" (gloo) or "cuda" (NCCL, rank r on cuda:r)
    threads: int
    heartbeat_s: float
    head: HeadState | None = None  # stage 1 only: a trained exit head


@dataclass(frozen=True)
class GenerationJob:
    """One generation, sent to every stage process: the rows' prompts, each row's max_new_tokens, and how tokens are
    picked; continuous batching's rule (`JoinRule`) and what each row holds under it, where the decode may stop for
    requests to join."""

    prompts: list[list[int]]
    max_new_tokens: list[int]
    eos_token_ids: tuple[int, ...]
    sampling: SamplingConfig
    min_new_tokens: int
    join: JoinRule | None = None
    kv_tokens: list[int] | None = None


@dataclass(frozen=True)
class JoinJob:
    """Continuous batching's join, sent to every stage process after a decode stopped: the rows going on (their
    indices in the stopped batch, in their new order), each from its last token (its position and id) with the
    tokens it asks from there, and the joining requests' prompts, max_new_tokens and KV tokens."""

    going: list[int]
    positions: list[int]
    tokens: list[int]
    asked: list[int]
    prompts: list[list[int]]
    max_new_tokens: list[int]
    kv_tokens: list[int]


@dataclass
class HeadState:
    """A non-default exit head as plain tensors, rebuilt in stage 1's process on its pruned model: a trained head
    (its layer's and norm's tensors) or a vocabulary-subset head (its token ids)."""

    exit_layer: int = 0
    init_layer: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    token_ids: torch.Tensor | None = None
    kind: str = "layer"  # a trained head's kind (`executor.heads.HEAD_CLASSES`)

    @classmethod
    def of(cls, head: Any) -> HeadState | None:
        if head is None or type(head) is SharedExitHead:
            return None
        if isinstance(head, SubsetExitHead):
            return cls(token_ids=head.token_ids.cpu())
        if not isinstance(head, TrainedExitHead):
            raise ValueError(
                f"the distributed backend sends the exit head to a stage process: it must be 'shared', 'shared:N', "
                f"a head file or a TrainedExitHead, got {type(head).__name__}"
            )
        return cls(head.exit_layer, head.init_layer, head_tensors(head, head.adapter.dtype), kind=head.kind)

    def build(self, adapter: ModelAdapter) -> Any:
        if self.token_ids is not None:
            return SubsetExitHead(adapter, self.token_ids)
        made = head_class(self.kind)(adapter, self.exit_layer, self.init_layer, tensors=self.tensors)
        return made.requires_grad_(False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class WorkerFailure:
    """What a failed stage process reports: its exception's last line, its traceback, and the rank it lost
    (`PeerLost`: then its failure is a consequence of that rank's)."""

    summary: str
    details: str
    peer: int | None = None
    lost: bool = False


class CallerLink:
    """A stage process's pipe to the caller: messages (kind, rank, payload) from any thread, and a heartbeat thread
    that says the process runs. Without a caller to hear it (the pipe closed: the caller is gone) the process ends."""

    def __init__(self, rank: int, connection, heartbeat_s: float) -> None:
        self.rank, self.connection = rank, connection
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.beat = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="ppsd-heartbeat")
        self.beat.start()

    def send(self, kind: str, payload: Any) -> None:
        with self.lock:
            self.connection.send((kind, self.rank, payload))

    def _beat(self, heartbeat_s: float) -> None:
        while True:  # the first beat at once: the caller hears the process run before it loads anything
            try:
                self.send("beat", None)
            except OSError:  # the caller is gone: nobody to report to, and nobody to stop this process
                os._exit(1)
            if self.stopped.wait(heartbeat_s):
                return

    def close(self) -> None:
        self.stopped.set()
        self.beat.join()


def _worker(rank: int, init_method: str, setup: StageSetup, connection, jobs, waiting: WaitingQueue) -> None:
    """A spawned stage process: heartbeats, "ready" once it holds its model, then for each job the caller sends
    (`GenerationJob` or `JoinJob`; None: stop) the tokens as they come (and the rows a continuous batch keeps after a
    prefill) and its stats at the end (`StageWork`), or its failure, which ends the process."""
    link = CallerLink(rank, connection, setup.heartbeat_s)
    try:
        torch.set_num_threads(setup.threads)
        device = torch.device(f"cuda:{rank}") if setup.device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=setup.plan.stages)
        adapter = ModelAdapter(setup.model.to(device))
        head = setup.head.build(adapter) if setup.head is not None else None
        link.send("ready", None)
        reported_cpu_s = 0.0
        send = lambda tokens: link.send("tokens", tokens)  # noqa: E731
        work = StageWork(adapter, setup.plan, rank, head, send, lambda rows: link.send("rows", rows), waiting)
        while (job := _next_job(jobs)) is not None:
            if isinstance(job, JoinJob):
                stats = work.join(job)
            else:
                sinks = [TokenSink(count, job.eos_token_ids, None) for count in job.max_new_tokens]
                lengths = [len(prompt) for prompt in job.prompts]
                selector = make_selector(adapter, lengths, sinks[0], job.sampling, job.min_new_tokens)
                stats = work.generate(job.prompts, sinks, selector, job.join, job.kv_tokens)
            # this rank's CPU since its last report (the first: its setup too), which the caller's times never see
            stats.process_cpu_s, reported_cpu_s = time.process_time() - reported_cpu_s, time.process_time()
            link.send("stats", stats)
        link.close()
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - every failure must reach the caller
        lines = traceback.format_exception_only(type(err), err)
        peer = err.peer if isinstance(err, PeerLost) else None
        failure = WorkerFailure(lines[-1].strip(), traceback.format_exc(), peer, isinstance(err, PeerLost))
        try:
            link.send("error", failure)
        except OSError:  # the caller is gone (killed, interrupted): nobody to report to, and no traceback to print
            os._exit(1)
        link.close()
        sys.exit(1)


def _next_job(jobs) -> GenerationJob | JoinJob | None:
    """The caller's next job; None when it says stop, or when it is gone (its end of the pipe closed)."""
    try:
        return jobs.recv()
    except (EOFError, OSError):
        return None


def decode_distributed(
    adapter: ModelAdapter,
    prompts: list[list[int]],
    sinks: list[TokenSink],
    plan: StagePlan,
    *,
    sampling: SamplingConfig | None = None,
    min_new_tokens: int = 0,
    threads_per_stage: int | None = None,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    head: Any = None,
) -> PPSDStats:
    """Spawn one process per stage on this host, run PPSD on `prompts` (a row each, in lockstep), stream each row's
    tokens into its sink, stop every process (`DistributedPipeline` for one generation; `setup_time_s` is the rest
    of the call's time). A trained `head` travels to stage 1's process as tensors. A process that sends no heartbeat
    for `stall_timeout_s` seconds stops the run (`PPSDWorkerError` naming it); a healthy run has no time limit."""
    begin = time.perf_counter()
    with DistributedPipeline(adapter, plan, threads_per_stage=threads_per_stage, stall_timeout_s=stall_timeout_s,
                             head=head) as pipeline:  # fmt: skip
        stats = pipeline.generate(prompts, sinks, sampling, min_new_tokens)
    stats.setup_time_s = time.perf_counter() - begin - stats.wall_time_s
    return stats


def heartbeat_interval(stall_timeout_s: float) -> float:
    """Beats 5 to a stall timeout (a late one or two never stop a run), at most a second apart."""
    return min(1.0, max(_POLL_S, stall_timeout_s / 5))


class DistributedPipeline:
    """The distributed backend's stage processes, kept between generations (serving keeps one for its life): started
    once, each with its pruned stage model (and stage 1 the exit head) and its place in the process group (the
    constructor returns once every process holds its model), then one `run_stage` per generation the caller asks
    for. `start` hands a generation to every process, `wait_prefill` returns once every row's first token (the
    prefill's) is in its sink, `finish` once the generation is done, with its stats; `generate` does all three. A
    failed, dead or stalled process raises `PPSDWorkerError` (see the module docstring) and stops every process: the
    pipeline is then closed. `close` (or leaving a `with` block) stops the processes.

    Continuous batching: `start(..., join=JoinRule(...))` lets the last stage stop the decode at a tick where the
    requests waiting, as the caller `publish`es them, may join (`StageWork`); a `finish` that returns with rows going
    on leaves them in the stage processes for `join`, which prefills the new requests into the rows after them and
    decodes on (then `wait_prefill` and `finish` again). A row the prefill ended leaves the batch: the rows' sinks
    and prompts are then the ones going on (`rows`)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        plan: StagePlan,
        *,
        threads_per_stage: int | None = None,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        head: Any = None,
    ) -> None:
        check_stall_timeout(stall_timeout_s)
        device_type = adapter.device.type
        if device_type == "cuda" and torch.cuda.device_count() < plan.stages:
            raise ValueError(
                f"the distributed backend on GPUs needs one GPU per stage: {plan.stages} stages, "
                f"{torch.cuda.device_count()} GPUs visible"
            )
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"the distributed backend runs on cpu (gloo) or cuda (NCCL), not {adapter.device}")
        threads = threads_per_stage or max(1, (os.cpu_count() or 1) // plan.stages)
        head_state = HeadState.of(head)
        setups = [
            StageSetup(stage_model(adapter.model, plan, s), plan, device_type, threads,
                       heartbeat_interval(stall_timeout_s), head_state if s == 0 else None)
            for s in range(plan.stages)
        ]  # fmt: skip
        self.plan, self.closed, self.running = plan, False, False
        self.rule: JoinRule | None = None  # the generation's join rule (continuous batching)
        self.stopped = False  # its decode stopped with rows going on
        self._start(setups, stall_timeout_s)
        self._collect(lambda: len(self.watch.ready) == plan.stages)  # every process holds its model

    def _start(self, setups: list[StageSetup], stall_timeout_s: float) -> None:
        import torch.multiprocessing as mp

        # forkserver: one clean server process imports torch and transformers once per session, and every worker is
        # forked from it (not once per worker); the setups are still pickled, so each gets only its stage's weights
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(["executor.ppsd_dist", type(setups[0].model).__module__])
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.waiting = WaitingQueue(context)
        reports = [context.Pipe(duplex=False) for _ in setups]  # (read end, write end): one per process, no shared lock
        jobs = [context.Pipe(duplex=False) for _ in setups]
        self.processes = [
            context.Process(target=_worker, daemon=True,
                            args=(rank, init_method, setup, reports[rank][1], jobs[rank][0], self.waiting))
            for rank, setup in enumerate(setups)
        ]  # fmt: skip
        self.pipes = [end for pair in reports + jobs for end in pair]
        self.jobs = [writer for _, writer in jobs]
        self.watch = StageWatch(self.processes, [reader for reader, _ in reports], stall_timeout_s)
        try:
            for rank, process in enumerate(self.processes):
                process.start()
                reports[rank][1].close()  # the child holds its own copies now
                jobs[rank][0].close()
                self.watch.seen[rank] = time.monotonic()
        except BaseException:
            self.close(healthy=False)
            raise

    def start(
        self,
        prompts: list[list[int]],
        sinks: list[TokenSink],
        sampling: SamplingConfig | None = None,
        min_new_tokens: int = 0,
        join: JoinRule | None = None,
        kv_tokens: Sequence[int] | None = None,
    ) -> None:
        """Hand every stage process a generation of `prompts` (a row each, in lockstep), each row's tokens streamed
        into its sink (the same EOS ids) as the caller reads them. `join`: continuous batching's rule (the class
        docstring), under which each row holds `kv_tokens`."""
        self._check_idle()
        check_rows(prompts, sinks)
        if any(sink.has_stop_rule for sink in sinks):
            raise ValueError("the distributed backend's stages stop a row at its EOS or its max_new_tokens only: a "
                             "sink's own stop rule is not theirs (decode on a local backend)")  # fmt: skip
        sampling = sampling or SamplingConfig()
        if join is not None and (kv_tokens is None or len(kv_tokens) != len(prompts)):
            given = "none" if kv_tokens is None else len(kv_tokens)
            raise ValueError(f"continuous batching takes a KV token count per row: {len(prompts)} rows, {given} given")
        if join is not None and sampling.penalized:
            raise ValueError("continuous batching keeps no per-row repetition penalty state: serve without one")
        job = GenerationJob([list(p) for p in prompts], [sink.max_new_tokens for sink in sinks],
                            tuple(sinks[0].eos_token_ids), sampling, min_new_tokens, join,
                            None if kv_tokens is None else list(kv_tokens))  # fmt: skip
        self.rule = join
        self._send(job, sinks, prompts)

    def join(
        self, going: list[int], prompts: list[list[int]], sinks: list[TokenSink], kv_tokens: Sequence[int]
    ) -> None:  # fmt: skip
        """After a `finish` that stopped with rows going on: rows `going` of that batch (indices in `rows()`, in their
        new order) go on, from their last tokens, with the requests of `prompts` (their `sinks` and `kv_tokens`)
        prefilled into the rows after them."""
        self._check_idle()
        if not self.stopped:
            raise RuntimeError("this distributed pipeline has no stopped continuous batch to join")
        old_sinks, old_prompts = self.watch.sinks, self.watch.prompts
        if len(set(going)) != len(going) or not all(0 <= i < len(old_sinks) and not old_sinks[i].done
                                                     for i in going):  # fmt: skip
            raise ValueError(f"going must name distinct rows of the stopped batch that are not done, got {going}")
        if not going and not prompts:
            raise ValueError("a join takes rows going on or new prompts, and was given neither")
        if prompts:
            check_rows(prompts, sinks)
        if len(kv_tokens) != len(prompts) or any(s.eos_token_ids != old_sinks[0].eos_token_ids for s in sinks):
            raise ValueError("a joining request takes a sink with the batch's EOS ids and a KV token count")
        assert self.rule is not None  # a stopped batch is a continuous one
        if len(going) + len(prompts) > self.rule.max_batch:
            raise ValueError(f"a join of {len(going)} rows going on and {len(prompts)} new ones passes the join "
                             f"rule's max_batch {self.rule.max_batch}")  # fmt: skip
        rows = [(old_prompts[i], old_sinks[i]) for i in going]
        job = JoinJob(
            list(going), [len(prompt) + len(sink.tokens) - 1 for prompt, sink in rows],
            [sink.tokens[-1] for _, sink in rows], [sink.max_new_tokens - len(sink.tokens) + 1 for _, sink in rows],
            [list(p) for p in prompts], [sink.max_new_tokens for sink in sinks], list(kv_tokens),
        )  # fmt: skip
        self._send(job, [old_sinks[i] for i in going] + sinks, [old_prompts[i] for i in going] + prompts)

    def publish(self, needs: Sequence[int]) -> None:
        """The requests waiting for a continuous batch (the KV tokens each would hold, in queue order), for the last
        stage's join rule."""
        self.waiting.publish(needs)

    def rows(self) -> tuple[list[TokenSink], list[list[int]]]:
        """The batch's rows as the stage processes hold them: their sinks and prompts, in row order."""
        return self.watch.sinks, self.watch.prompts

    def _check_idle(self) -> None:
        if self.closed:
            raise RuntimeError("this distributed pipeline is closed: its stage processes are stopped")
        if self.running:
            raise RuntimeError("this distributed pipeline runs a generation already: finish it before starting another")

    def _send(self, job: GenerationJob | JoinJob, sinks: list[TokenSink], prompts: list[list[int]]) -> None:
        self.running, self.stopped = True, False
        self.watch.begin(sinks, [list(p) for p in prompts])
        for writer in self.jobs:
            try:
                writer.send(job)
            except OSError:  # a process is gone: the watch names it
                break

    def wait_prefill(self, on_wake: Callable[[], float] | None = None) -> None:
        """Return once every row holds its first token (the prefill's), or is done; continuous, once the rows the
        prefill ended have left the batch (`rows`), unless it ended them all. `on_wake` as `finish`'s."""

        def prefilled() -> bool:
            sinks = self.watch.sinks
            if not all(sink.tokens or sink.done for sink in sinks):
                return False
            ended = [sink.done for sink in sinks]
            return self.rule is None or all(ended) or not any(ended)

        self._collect(prefilled, on_wake)

    def finish(self, on_wake: Callable[[], float] | None = None) -> PPSDStats:
        """Return the generation's stats once every stage process has reported them; `on_wake` is called whenever
        the wait wakes (a message, or its poll) and returns how long it may sleep at most (a continuous batch's
        caller publishes its queue there, and wakes for its next arrival)."""
        if self.closed:
            raise RuntimeError("this distributed pipeline is closed: its stage processes are stopped")
        if not self.running:
            raise RuntimeError("this distributed pipeline runs no generation: start one first")
        reports = self._collect(None, on_wake)
        self.running = False
        self.stopped = self.rule is not None and not all(sink.done for sink in self.watch.sinks)
        return _merge(self.plan, self.watch.sinks, reports)

    def generate(
        self, prompts: list[list[int]], sinks: list[TokenSink], sampling: SamplingConfig | None = None,
        min_new_tokens: int = 0,
    ) -> PPSDStats:  # fmt: skip
        self.start(prompts, sinks, sampling, min_new_tokens)
        return self.finish()

    def _collect(
        self, until: Callable[[], bool] | None, on_wake: Callable[[], float] | None = None
    ) -> dict[int, PPSDStats]:  # fmt: skip
        try:
            return self.watch.collect(until, on_wake)
        except BaseException:
            self.close(healthy=False)
            raise

    def close(self, healthy: bool = True) -> None:
        """Stop the stage processes: asked to end (a healthy pipeline's get `_KILL_GRACE_S` to do so), then
        killed."""
        if self.closed:
            return
        self.closed = True
        for writer in self.jobs:
            with contextlib.suppress(OSError):
                writer.send(None)
        try:  # reading what they still send (idle heartbeats fill a pipe in time, and a full one blocks their exit)
            _stop(self.processes, grace_s=_KILL_GRACE_S if healthy else 0.0, waiting=self.watch.drain)
        finally:
            for end in self.pipes:
                end.close()

    def __enter__(self) -> DistributedPipeline:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close(healthy=kind is None)


class StageWatch:
    """The caller's side of the stage processes' pipes: tokens into the rows' sinks, the stats of each rank, and the run
    stopped with `PPSDWorkerError` naming the stage at fault (see the module docstring)."""

    def __init__(self, processes: list, readers: list, stall_timeout_s: float) -> None:
        self.processes, self.readers, self.stall_timeout_s = processes, readers, stall_timeout_s
        self.sinks: list[TokenSink] = []  # the batch's rows, in the stage processes' order
        self.prompts: list[list[int]] = []
        self.ready: set[int] = set()  # the ranks that hold their model
        self.heard: set[int] = set()  # the ranks that have sent anything
        now = time.monotonic()
        self.seen = [now] * len(processes)  # when each rank was last heard from
        self.reports: dict[int, PPSDStats] = {}
        self.failures: dict[int, tuple[float, WorkerFailure]] = {}
        self.open = set(range(len(processes)))
        self.trouble_since: float | None = None

    def drain(self) -> None:
        """Read whatever the pipes hold now, without waiting (the processes' beats and reports as they end)."""
        for rank in list(self.open):
            while rank in self.open and self.readers[rank].poll():
                self._read(rank)

    def begin(self, sinks: list[TokenSink], prompts: list[list[int]]) -> None:
        """A new generation (or join): its rows' sinks and prompts, no stats yet (heartbeats read while idle count
        from now)."""
        self.sinks, self.prompts, self.reports = sinks, prompts, {}
        self.seen = [time.monotonic()] * len(self.processes)

    def collect(
        self, until: Callable[[], bool] | None = None, on_wake: Callable[[], float] | None = None
    ) -> dict[int, PPSDStats]:  # fmt: skip
        """Read every pipe until `until()` holds (None: until each rank has reported its stats); raise as soon as the
        run cannot finish. `on_wake()`, called before each wait, says how long it may last at most."""
        from multiprocessing.connection import wait

        while not until() if until is not None else len(self.reports) < len(self.processes):
            timeout = _POLL_S if on_wake is None else max(0.0, min(_POLL_S, on_wake()))
            for reader in wait([self.readers[r] for r in self.open], timeout=timeout):
                self._read(self.readers.index(reader))
            error = self._verdict(time.monotonic())
            if error is not None:
                raise error
        return self.reports

    def _read(self, rank: int) -> None:
        try:
            kind, _, payload = self.readers[rank].recv()
        except (EOFError, OSError):  # the process has closed its end: exited, or died
            self.open.discard(rank)
            return
        self.seen[rank] = time.monotonic()
        self.heard.add(rank)
        if kind == "tokens":  # (row, token) pairs
            for row, token in payload:
                self.sinks[row].emit([token])
        elif kind == "rows":  # the rows a continuous batch keeps after a prefill, in their new order
            self.sinks, self.prompts = [self.sinks[i] for i in payload], [self.prompts[i] for i in payload]
        elif kind == "stats":
            self.reports[rank] = payload
        elif kind == "ready":
            self.ready.add(rank)
        elif kind == "error":
            self.failures[rank] = (time.monotonic(), payload)

    def _gone(self) -> list[int]:
        """Ranks whose process ended without its stats and without a word (its pipe read to the end first)."""
        ended = [rank for rank, process in enumerate(self.processes) if process.exitcode is not None]
        for rank in ended:
            while rank in self.open and self.readers[rank].poll():
                self._read(rank)
        return [rank for rank in ended if rank not in self.reports and rank not in self.failures]

    def _verdict(self, now: float) -> PPSDWorkerError | None:
        """The error that ends the run, once its cause is known; None while the run goes on."""
        gone = self._gone()
        if self.failures or gone:
            self.trouble_since = self.trouble_since or now
            settled = all(
                rank in self.reports or rank in self.failures or rank in gone for rank in range(len(self.processes))
            )
            return self._blame(gone) if settled or now - self.trouble_since >= _SETTLE_S else None
        stalled = [
            rank for rank in range(len(self.processes))
            if rank not in self.reports and now - self.seen[rank] > self._allowed_s(rank)
        ]  # fmt: skip
        if not stalled:
            return None
        rank = stalled[0]
        also = f" (rank(s) {', '.join(map(str, stalled[1:]))} silent too)" if stalled[1:] else ""
        return PPSDWorkerError(
            f"PPSD {_stage(rank)} stalled: no heartbeat for {now - self.seen[rank]:.1f} s (stall_timeout_s="
            f"{self.stall_timeout_s:g}): the process is stopped or hung{also}"
        )

    def _allowed_s(self, rank: int) -> float:
        """How long a rank may be silent: the stall timeout, or, until its first word, at least `_STARTUP_S` (a process
        starting from the fork server and unpickling its stage beats only once it runs)."""
        return self.stall_timeout_s if rank in self.heard else max(self.stall_timeout_s, _STARTUP_S)

    def _blame(self, gone: list[int]) -> PPSDWorkerError:
        """The root cause: a process's own error (the first by time), else a process that died without a word, else
        the rank the others lost."""
        by_time = sorted(self.failures.items(), key=lambda item: (item[1][0], item[0]))
        own = [(rank, failure) for rank, (_, failure) in by_time if not failure.lost]
        if own:
            rank, failure = own[0]
            return PPSDWorkerError(f"PPSD {_stage(rank)} failed: {failure.summary}", failure.details)
        if gone:
            rank = gone[0]
            return PPSDWorkerError(f"PPSD {_stage(rank)} died: {_exit_description(self.processes[rank].exitcode)}")
        rank, failure = next((r, f) for r, (_, f) in by_time)
        lost = "another rank" if failure.peer is None else _stage(failure.peer)
        return PPSDWorkerError(f"PPSD {lost} was lost: {_stage(rank)} reported {failure.summary}", failure.details)


def _stage(rank: int) -> str:
    return f"stage {rank + 1} (rank {rank})"


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "an unknown signal"
        return f"killed by signal {-code} ({name})"
    return f"exited with code {code} without a report"


def _stop(processes, grace_s: float, waiting: Callable[[], None] | None = None) -> None:
    """Join the workers (for up to `grace_s`, calling `waiting` as they end), then kill any still running (SIGKILL: a
    stopped process acts on no other signal) and join it."""
    end = time.monotonic() + grace_s
    while any(p.pid is not None and p.is_alive() for p in processes) and time.monotonic() < end:
        if waiting is not None:
            waiting()
        for process in processes:
            if process.pid is not None:
                process.join(timeout=min(_POLL_S, max(0.0, end - time.monotonic())))
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        if process.pid is not None:
            process.join()


def _merge(plan: StagePlan, sinks: list[TokenSink], reports: dict[int, PPSDStats]) -> PPSDStats:
    """The run's stats: the last rank's count and times, each stage's own time from its rank."""
    stats = reports[plan.stages - 1]
    stats.stage_stats = [reports[rank].stage_stats[rank] for rank in range(plan.stages)]
    stats.process_cpu_s = sum(report.process_cpu_s for report in reports.values())
    stats.new_tokens = sum(len(sink.tokens) for sink in sinks)
    return stats


# ----------------------------------------------------------------------------------------------- torchrun entry
def main(argv: list[str] | None = None) -> int:
    """One stage of a torchrun-launched PPSD run (see the module docstring)."""
    args = _parser().parse_args(argv)
    from executor.models import load_model, load_tokenizer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=args.timeout_s))
    try:
        model = load_model(args.model, dtype=args.dtype, device="cpu")
        trained = resolve_head(args.head, ModelAdapter(model), args.exit_layer)  # checked on the whole model
        exit_layer = args.exit_layer if args.exit_layer is not None else getattr(trained, "exit_layer", None)
        cuts = [int(c) for c in args.stage_boundaries.split(",")] if args.stage_boundaries else None
        plan = plan_stages(len(model.model.layers), world, cuts, exit_layer)
        state = HeadState.of(trained) if rank == 0 else None
        adapter = ModelAdapter(stage_model(model, plan, rank).to(device))
        head = state.build(adapter) if state is not None else None
        del model, trained
        prompt = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
        if prompt is None:
            prompt = load_tokenizer(args.model)(args.prompt)["input_ids"]
        eos = adapter.config.eos_token_id
        sink = TokenSink(args.max_new_tokens, [] if eos is None else [eos] if isinstance(eos, int) else eos, None)
        sampling = SamplingConfig(args.do_sample, "exact", args.temperature, args.top_k, args.top_p, args.seed)
        selector = make_selector(adapter, len(prompt), sink, sampling, 0)
        stats = run_stage(adapter, plan, rank, [prompt], [sink], selector, head=head)
        spent = torch.tensor([time.process_time()], dtype=torch.float64, device=device)
        dist.all_reduce(spent)  # every rank's CPU, as the spawned runs' stats give it
        stats.process_cpu_s = float(spent.item())
        if rank == world - 1:
            print(json.dumps({"tokens": sink.tokens, "stats": asdict(stats)}))
    finally:
        dist.destroy_process_group()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m executor.ppsd_dist", description="one PPSD stage under torchrun")
    parser.add_argument("--model", required=True, help="a Hugging Face directory, .gguf file or packaged model name")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (tokenised with the model's tokenizer)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--stage-boundaries", help="comma-separated cut points, n - 1 of them")
    parser.add_argument("--exit-layer", type=int)
    parser.add_argument("--head", default="shared", help="stage 1's exit head: shared | shared:N | a head file")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--do-sample", action="store_true", help="exact sampling (Gumbel-max keyed by position)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads per process")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even where GPUs are visible")
    parser.add_argument(
        "--timeout-s", type=float, default=600.0, help="torch.distributed's timeout for one message (default: 600)"
    )
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
