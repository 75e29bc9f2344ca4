"""SimPy engine: pipeline stages, links, and the AR / EESD / PPSD decoding schedules.

What is modelled (times in µs of simulated time, sizes in bytes):
- A *stage* is a SimPy process owning a layer range on one device (or a tensor-parallel group): it takes jobs from
  its inbox (a FIFO store) one at a time and holds the device for the job's duration (`sim.cost`: from the latency
  model, plus two all-reduces per layer when tp > 1).
- A *link* between consecutive stages is a store + delay, as in SimPy's Cable example: a message of nbytes
  (the hidden states, q·batch·hidden·dtype_bytes) reaches the next stage's inbox after `link.time_us(nbytes)`.
  Token ids going back from the last stage to the first cross the link too (8 bytes per sequence).
- AR: every token is one pass through all layers. EESD (draft-then-verify, docs/design.md): a round drafts with
  layers [0, E) + exit head, one pass per draft, then verifies with one pass of layers [0, E) for the last draft
  and [E, L) for all k + 1 tokens (KV reuse); the round emits accepted + 1 tokens. PPSD (verify-while-draft): the
  token stage 1's exit head drafted enters stage 1 after the token it follows, one stage behind it; when a token
  leaves the last stage the next token is final: a correct draft already in flight goes on, a wrong one flushes
  every younger token in flight (an epoch counter; flushed work is counted as wasted) and the correct token
  re-enters stage 1. At most `max_in_flight` tokens (default: the number of stages) are in the pipe. The pipe moves
  in lockstep ticks as the executor's does: every stage runs its token, the passes of one device share it
  (`sim.contention`: together on streams, in turn when sequential; a `processes` profile slows the distributed
  stage processes of one host together, `SimPlan.contention_group`), then the last stage's verdict moves the pipe on
  (a captured one-host tick also launches the transition pass; a distributed tick sends the executor's messages:
  the outcome to every rank, then, unless it flushed or ended the decode, a header and the hidden state to the next,
  `_tick_messages_us`; its ranks read every tick's outcome, so `sync_every` does not apply to them). With
  `ppsd_backend` free (a device per stage) the stages run free instead, each starting its next token as soon as it
  has one: the schedule's bound, which no executor backend runs. `ticks` counts the executor's ticks either way: a
  token that entered an empty pipe leaves it after one tick per stage, one that follows a confirmed draft one tick
  after it.
- Attention: a decode pass is costed at the span bucket of the furthest position it writes (`sim.contract.span_bucket`,
  the executor's default), or at all the plan's `cache_slots` (the executor's static cache, every slot masked and
  read) without buckets, else at the context so far; prefill at its prompt (`SimPlan.attended`). Host reads: see
  `sim.cost.stage_time_us`.
- Batches are static: the requests run in batches of `batch_size`; in PPSD a batch moves in lockstep, so it is
  flushed when any of its rows mispredicted. Prefill (q = prompt_len) precedes each batch's decode and is
  reported separately. Randomness only from the seeded `random.Random` of the plan.

Events (what the speed rests on, `benchmarks/sim_throughput.py`): a hand-off spares an event where that cannot change
a result, i.e. where the event it spares would be the very next one processed, so every other event keeps its time
and its order: a job reaching an idle stage starts at once instead of waking the stage's process first; a link's
delivery to an idle stage with nothing else due before it lands starts the job it carries on landing, without an
event for the landing (hand-offs of a stage process ending a job are settled when it is about to wait again:
`Simulation.settle`); a flush stops the stale jobs at once, where SimPy's interrupts would each be an event. Passes
that do not depend on time (an EESD round's, a block of AR steps up to the host's read, chained zero-draft rounds) go
as one sweep where nothing else is due: each stage's process wakes once, at the end of its last pass, and the main
process with the last stage's where the token ids need not come back (`Simulation._sweep`). A PPSD decode on the
free-running pipe goes as one sweep too (`_FreePipe`: with nothing else due it is a flow shop, its times worked out
token by token; untraced runs), and lockstep ticks with nothing else due run without an event each (`_TickClock`).
Otherwise every stage process wakes at the end of each job it runs.
`Simulation(plan, shortcuts=False)` runs every hand-off as its own event: the tests hold the two to the same results
and traces, to the bit.

The engine runs a `SimPlan` (`sim.plan`, checked when built) and knows nothing of scenario files.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from heapq import heappush
from typing import Any

import simpy
from simpy.events import NORMAL

from sim.acceptance import AcceptanceStream
from sim.contention import PassShare
from sim.contract import ID_BYTES, PPSD_HEADER_VALUES, PPSD_OUTCOME_VALUES, policy_seed
from sim.cost import Pass, PassCost, draft_pass, pass_costs, stage_hbm_us, stage_time_us, verify_pass
from sim.latency import LinkModel, extrapolations_of
from sim.plan import ONE_HOST_BACKENDS, SimPlan, Workload
from sim.policy import DraftPolicy, make_policy, round_budget

TOKEN_ID_BYTES = ID_BYTES
_NEVER = math.inf  # `simpy.Environment.peek()` with no event due
_UNKNOWN = object()  # not cached yet


def trace_tracks(stages: int) -> dict[int, str]:
    """A run's Chrome-trace tracks past its stages' (0 .. stages - 1): each link's messages, the token ids going back
    to stage 1, and a lockstep tick's messages together (after its passes)."""
    links = {stages + i: f"link {i + 1} -> {i + 2}" for i in range(stages - 1)}
    return links | {2 * stages - 1: f"link {stages} -> 1 (token ids)", 2 * stages: "a tick's messages"}


@dataclass(frozen=True)
class SimStageStats:
    busy_us: float
    useful_us: float


@dataclass(frozen=True)
class RunResult:
    method: str
    tokens: int  # generated tokens, the prefill's first token of each request included
    decode_tokens: int  # tokens produced by decode steps (what tokens_per_s and tokens_per_round count)
    decode_time_us: float
    prefill_time_us: float
    rounds: int
    drafted: int
    accepted: int
    flushes: int
    stages: tuple[SimStageStats, ...]
    extrapolated: bool
    ticks: int = 0  # PPSD: the executor's ticks (see the module docstring); 0 for AR and EESD
    extrapolations: tuple[str, ...] = ()  # what the latency profiles were asked outside their grids

    @property
    def ticks_per_token(self) -> float:
        """PPSD: ticks per decoded token (AR through n stages would take n)."""
        return self.ticks / self.decode_tokens if self.decode_tokens else 0.0

    @property
    def total_time_us(self) -> float:
        return self.decode_time_us + self.prefill_time_us

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_time_us * 1e6 if self.decode_time_us > 0 else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.decode_tokens / self.rounds if self.rounds else 0.0


@dataclass(slots=True, eq=False)
class Job:
    epoch: int
    position: int
    durations: tuple[float, ...]
    link_bytes: tuple[int, ...]
    first_stage: int
    last_stage: int
    on_done: Callable[[Job, int], None]
    batch: int = 1
    label: str = ""  # a pass's name; "" for a PPSD token ("token <position>" in a trace)
    done: _Wake | None = None
    next_ok: bool = True
    run_index: int = 0
    returned: bool = False  # `done` fired once the token ids were back at stage 1 (see `Simulation._done`)


class _Swept:
    """A stage's passes in a sweep (`Simulation._sweep`): their µs, booked when the stage's process wakes at the end
    of the last."""

    __slots__ = ("epoch", "parts")

    def __init__(self, epoch: int, parts: list[float]) -> None:
        self.epoch, self.parts = epoch, parts


_Timeline = tuple[tuple[int, float, float], ...]  # a pass in a sweep: (stage, µs, µs after it) per stage


@dataclass
class BatchRow:
    """One request in a batch: its acceptance stream, policy and progress; `length` is the tokens it generates in
    all (the prefill's included: `remaining` when it is made). A row whose text ends at an EOS before the tokens it
    asked for has `past_end` = asked - `length`: the executor learns of the EOS only when it emits it, so its draft
    budgets and blocks of steps still reach for the tokens asked (`room`)."""

    stream: AcceptanceStream
    policy: DraftPolicy
    remaining: int
    generated: int = 0
    limit: int = 0
    drafted: int = 0
    accepted: int = 0
    all_match: bool = True
    drawn: int | None = None  # the next round's budget, drawn ahead while chaining zero-draft rounds
    past_end: int = 0
    length: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.length = self.remaining

    @property
    def room(self) -> int:
        """The tokens the executor still reaches for: those left, and those it asked for past its end."""
        return self.remaining + self.past_end


class PPSDBatch:
    """A PPSD batch's rows as the pipe sees them: it runs in lockstep to its longest row's end (`longest`); a row whose
    last token comes sooner runs on with the batch, its tokens not counted and its drafts judged by no one. Where
    every row has the same length (every run but a trace replay's with rows ending at their EOS) each count is the
    batch size, without a look at the rows. A row that ends at its EOS before the tokens asked had drafted its EOS's
    position too (the executor's stage 1 does not know it is the end): that draft is judged when the token before
    it leaves (`eos_drafts`), as the executor counts it, and decides nothing."""

    def __init__(self, rows: list[BatchRow]) -> None:
        self.rows, self.size = rows, len(rows)
        lengths = {row.length for row in rows}
        self.longest, self.uniform = max(lengths), len(lengths) == 1
        self.ends_early = [row for row in rows if row.past_end > 0]
        self.asked = max(row.length + row.past_end for row in rows)  # the tokens the pipe is fed for

    def eos_drafts(self, position: int, index: int) -> tuple[int, int]:
        """(judged, confirmed) drafts of the rows whose EOS comes out as the token at `position` leaves: their drafts
        of the EOS's position, made before anyone knew it ends the row."""
        judged = confirmed = 0
        for row in self.ends_early:
            if row.length - 2 == position:
                judged += 1
                confirmed += row.stream.draft(position + 1, index)[0]
        return judged, confirmed

    def verdict(self, position: int, index: int) -> bool:
        """Whether the batch's draft of the token at `position` (the `index`-th since its run began) is confirmed:
        every row that goes on past it drafted the full model's token."""
        rows = self.rows if self.uniform else [row for row in self.rows if position <= row.length - 2]
        return all([row.stream.draft(position, index)[0] for row in rows])

    def emitting(self, position: int) -> int:
        """The rows that emit a token when the token at `position` leaves the pipe (it makes token position + 1)."""
        return self.size if self.uniform else sum(1 for row in self.rows if position + 2 <= row.length)

    def judged(self, position: int) -> int:
        """The rows whose draft of the token at `position` is judged (`verdict`)."""
        return self.size if self.uniform else sum(1 for row in self.rows if position <= row.length - 2)


class _Wake(simpy.Event):
    """What an idle stage process waits on: triggered when a job reaches the stage, or scheduled for the end of the
    job started without waking the process (`at_end`)."""

    def at_end(self, delay_us: float) -> None:
        """Fire after `delay_us`, as a `simpy.Timeout` of that delay created now would (`Environment.schedule`)."""
        self.at(self.env._now + delay_us)

    def at(self, time_us: float) -> None:
        """Fire at `time_us` exactly (not now + a delay, whose sum may round elsewhere), after every event now queued
        for that time."""
        self._ok, self._value = True, None
        env = self.env
        heappush(env._queue, (time_us, NORMAL, next(env._eid), self))


class _Landing(simpy.Event):
    """A link's delivery of `job` to a stage (`Stage.arrive`), triggered when made: what `simpy.Timeout(env, delay,
    job)` is once scheduled, for a delivery whose place in the event queue was taken when it was sent."""

    def __init__(self, env: simpy.Environment, job: Job, arrive: Callable[[simpy.Event], None]) -> None:
        self.env, self.callbacks, self._value, self._ok = env, [arrive], job, True


# A hand-off made while a stage process ends a job, settled when that process is about to wait again
# (`Simulation.settle`): (at µs, eid, stage, job, wake): a link's delivery of `job` to `stage` at `at` (wake None), or
# the wake-up of `stage`, idle, now (job None). `eid` is the place in SimPy's event queue its event takes if it gets
# one, taken when the hand-off is made.
_HandOff = tuple[float, int, "Stage", "Job | None", "_Wake | None"]


class Stage:
    """A device (or tp group) running one layer range; serves its inbox (FIFO) one job at a time.

    A job reaching an idle stage wakes its process, which starts the job at once. Where that wake-up (or a link's
    delivery that would wake it) would be the very next event, the job starts without it: the stage schedules the
    wake for the job's end, the same times and order of events with fewer of them (`put`, `land`)."""

    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim, self.index, self.env = sim, index, sim.env
        self.items: deque[Job] = deque()
        self.busy_us = 0.0
        self.useful_us = 0.0
        self.current: Job | _Swept | None = None
        self.start_us = 0.0
        self.duration_us = 0.0
        self.waiting: _Wake | None = None
        self.process = sim.env.process(self._serve())

    def put(self, job: Job, last_act: bool = False) -> None:
        """Hand `job` to this stage now. `last_act`: the caller schedules nothing more at this instant before the
        event being processed ends (so the stage's wake-up would follow at once when nothing else is due). A stage
        process ending a job hands off without it: the wake-up is settled when that process waits again."""
        wake = self.waiting
        if wake is None:
            self.items.append(job)
            return
        sim, env = self.sim, self.env
        if job.epoch != sim.epoch:  # flushed before it arrived: the stage skips it and waits on
            return
        self.waiting = None
        if last_act and not sim.hand_offs and env.peek() > env._now:
            self.current, self.start_us = job, env._now
            self.duration_us = duration = job.durations[self.index - job.first_stage]
            wake.at_end(duration)
            return
        self.items.append(job)
        if sim.settling:
            sim.hand_offs.append((env._now, next(env._eid), self, None, wake))
        else:
            wake.succeed()

    def arrive(self, event: simpy.Event) -> None:
        """A link's delivery (the only callback of its event, which schedules nothing else)."""
        self.put(event._value, self.sim.shortcuts)

    def land(self, job: Job, at_us: float, eid: int) -> None:
        """A link's delivery of `job` here at `at_us`, settled after the event being processed schedules nothing
        more (but the hand-offs settled after it; `Simulation.settle`). Where its event would be the next one
        processed (the stage idle, nothing due in the queue until then), the job starts without that event, its end
        scheduled as the event would schedule it: at the same time, after every event now queued (nothing else
        happens in between). Otherwise it gets its event, at the place `eid` in the queue taken when it was sent,
        so that events of the same time keep their order."""
        env, wake = self.env, self.waiting
        queue = env._queue
        if wake is not None and job.epoch == self.sim.epoch and (not queue or queue[0][0] > at_us):
            now = env._now
            duration = job.durations[self.index - job.first_stage]
            end = at_us + duration
            delay = end - now
            if now + delay == end:  # else the job's end would not fall at its time
                self.waiting, self.current, self.start_us, self.duration_us = None, job, at_us, duration
                wake.at_end(delay)
                return
        heappush(queue, (at_us, NORMAL, eid, _Landing(env, job, self.arrive)))

    def start_queued(self, wake: _Wake) -> None:
        """What the process woken by `wake` now would do: start the first job queued that is not flushed, or wait
        on (`wake` again, not yet triggered)."""
        items, sim = self.items, self.sim
        while items:
            job = items.popleft()
            if job.epoch == sim.epoch:
                self.current, self.start_us = job, self.env._now
                self.duration_us = duration = job.durations[self.index - job.first_stage]
                wake.at_end(duration)
                return
        self.waiting = wake

    def _serve(self) -> Generator[simpy.Event, Any, None]:
        env, items, sim, index = self.env, self.items, self.sim, self.index
        while True:
            if items:
                job = items.popleft()
                if job.epoch != sim.epoch:  # flushed while queued
                    continue
                self.current, self.start_us = job, env._now
                self.duration_us = duration = job.durations[index - job.first_stage]
                event: simpy.Event = simpy.Timeout(env, duration)
            else:
                event = self.waiting = _Wake(env)
            if sim.settling:
                sim.settling = False
                if sim.hand_offs:
                    sim.settle()
            try:
                yield event
                job, duration = self.current, self.duration_us
                if job is None:  # woken to start the job now queued
                    continue
            except simpy.Interrupt:  # flushed while running: the device stops at once
                job, duration = self.current, env._now - self.start_us
            self.current = None
            if isinstance(job, _Swept):  # a sweep's passes (`Simulation._sweep`, which traced them): all useful
                busy, useful = self.busy_us, self.useful_us
                for duration in job.parts:
                    busy += duration
                    useful += duration
                self.busy_us, self.useful_us = busy, useful
                continue
            self.busy_us += duration
            if sim.trace is not None:
                sim.record(index, self.start_us, duration, job)
            if job.epoch == sim.epoch:
                sim.settling = sim.shortcuts
                job.on_done(job, index)

    def abort_stale(self, at_once: bool) -> None:
        """Stop the stage's job if a flush made it stale: the device stops now. SimPy's interrupt does it in an event
        of its own, processed next; `at_once` (where nothing the flush does could tell) does the same now: the
        process leaves the job's end event, books the time run and waits idle (its queue holds only stale jobs)."""
        job, sim = self.current, self.sim
        if job is None or job.epoch == sim.epoch:
            return
        process, items = self.process, self.items
        if not at_once or any([queued.epoch == sim.epoch for queued in items]):
            process.interrupt()
            return
        process._target.callbacks.remove(process._resume)
        self.current, duration = None, self.env._now - self.start_us
        self.busy_us += duration
        if sim.trace is not None:
            sim.record(self.index, self.start_us, duration, job)
        items.clear()
        wake = self.waiting = _Wake(self.env)
        wake.callbacks.append(process._resume)  # type: ignore[union-attr]
        process._target = wake


class SimLink:
    """Store + delay (SimPy's Cable): `put` hands an item to `target` after the link's transfer time."""

    def __init__(self, sim: Simulation, model: LinkModel, target: Stage, track: int) -> None:
        self.sim, self.env, self.model, self.target = sim, sim.env, model, target
        self.track = track  # its trace track (`trace_tracks`)
        self._arrive = target.arrive
        self._delay_us: dict[int, float] = {}

    def delay_us(self, nbytes: int) -> float:
        delay_us = self._delay_us.get(nbytes)
        if delay_us is None:
            delay_us = self._delay_us[nbytes] = self.model.time_us(nbytes)
        return delay_us

    def put(self, item: Job, nbytes: int, last_act: bool = False) -> None:
        """Send `item`; `last_act` as for `Stage.put`, said by the sender. Sent by a stage process ending a job, the
        delivery is settled as `Simulation.settle` does: at once where it is the last act, else when that process
        waits again."""
        delay_us = self._delay_us.get(nbytes)
        if delay_us is None:
            delay_us = self.delay_us(nbytes)
        if delay_us <= 0.0:
            self.target.put(item, last_act)
            return
        sim, env = self.sim, self.env
        if sim.trace is not None:
            label = f"{item.label or f'token {item.position}'}: hand-off"
            sim.span(self.track, env._now, delay_us, label, item.position, item.batch, item.epoch != sim.epoch)
        if not sim.settling:
            simpy.Timeout(env, delay_us, item).callbacks.append(self._arrive)
            return
        if last_act and not sim.hand_offs:
            self.target.land(item, env._now + delay_us, next(env._eid))
        else:
            sim.hand_offs.append((env._now + delay_us, next(env._eid), self.target, item, None))


class Simulation:
    """One run of a plan; `run()` returns a `RunResult`. Create a new object per run."""

    def __init__(
        self,
        plan: SimPlan,
        trace_limit: int = 0,
        shortcuts: bool = True,
        row: Callable[[int], BatchRow] | None = None,
    ) -> None:
        """`shortcuts`: the hand-offs that spare an event where that cannot change a result (`Stage.put`,
        `Stage.land`, `settle`, `_sweep`, `_done`, a flush at once: see the module docstring); False runs each as its
        own event, the reference the tests hold the shortcuts to. `row(request)`: request `request`'s row (its
        acceptance stream and policy) where the caller owns them (`decode_alone`), instead of drawn from the plan's
        seed."""
        self.plan = plan
        self.make_row = row
        self.shortcuts = shortcuts
        self.env = simpy.Environment()
        self.rng = random.Random(plan.seed)
        self.epoch = 0
        self.stages = [Stage(self, i) for i in range(len(plan.stages))]
        self.settling = False  # a stage process is ending a job: its hand-offs wait for `settle`
        self.hand_offs: list[_HandOff] = []
        n = len(self.stages)
        self.links = [SimLink(self, plan.link_after(i), s, n + i) for i, s in enumerate(self.stages[1:])]
        # token ids back to stage 1 from the stage where a pass ended (`SimPlan.link_back`), on one trace track
        self.links_back = [SimLink(self, plan.link_back(i), self.stages[0], 2 * n - 1) for i in range(n)]
        self.return_link = self.links_back[-1]  # from the last stage: a PPSD token's, a full pass's
        self.trace: list[dict[str, Any]] | None = [] if trace_limit > 0 else None
        self.trace_limit = trace_limit
        self._costs: dict[tuple[str, int, int], PassCost] = {}
        self._timelines: dict[tuple[str, int, int], _Timeline | None] = {}
        self._timelines_at: dict[tuple[str, int, int], _Timeline | None] = {}  # by the context attended, not rounded
        self.counts = {"tokens": 0, "prefill_tokens": 0, "rounds": 0, "drafted": 0, "accepted": 0, "flushes": 0,
                       "ticks": 0}  # fmt: skip
        self._tick_costs: dict[tuple, tuple[float, tuple[float, ...], float, float]] = {}
        self._tick_contexts: dict[int, int] = {}  # a tick's costed context by its furthest token's position
        self._pipe_spans: list[tuple[int, dict[str, Any]]] = []  # traced free pipe: the epoch's token spans
        self._verify_passes: dict[int, Pass] = {}
        self.prefill_us = 0.0
        self.decode_us = 0.0
        self.row_reads_us: list[float] = []  # lockstep PPSD: when the host read each row's last token (`_ppsd_ticks`)
        self.judged_us = 0.0  # lockstep PPSD: when the last tick was read (distributed: judged by the last rank)
        # lockstep PPSD: a process run at each host read but the last (`LockstepDecode`), given (µs since the decode
        # began, tokens emitted since, ticks run)
        self.pause: Callable[[float, int, int], Generator[simpy.Event, Any, None]] | None = None

    # ---- public -------------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        self.env.process(self._main())
        self.env.run()
        return self.result()

    def result(self) -> RunResult:
        """The run's result (after `run`, or once its main process has ended)."""
        plan = self.plan
        return RunResult(
            method=plan.method,
            tokens=self.counts["tokens"] + self.counts["prefill_tokens"],
            decode_tokens=self.counts["tokens"],
            decode_time_us=self.decode_us,
            prefill_time_us=self.prefill_us,
            rounds=self.counts["rounds"],
            drafted=self.counts["drafted"],
            accepted=self.counts["accepted"],
            flushes=self.counts["flushes"],
            stages=tuple(SimStageStats(s.busy_us, s.useful_us) for s in self.stages),
            extrapolated=any(getattr(s.latency, "extrapolated", False) for s in plan.stages)
            or any(getattr(link, "extrapolated", False) for link in plan.links)
            or plan.contention.extrapolated,
            ticks=self.counts["ticks"],
            extrapolations=_extrapolations(plan),
        )

    def settle(self) -> None:
        """Settle the hand-offs a stage process made while ending a job, now that it is about to wait again (the
        event being processed schedules nothing more), in the order their events would be processed: a link's
        delivery as `Stage.land` says; an idle stage's wake-up now, where nothing else is due now, as the woken
        process would act at once (`Stage.start_queued`), else as its event, at the place taken when it was made."""
        hand_offs = self.hand_offs
        if len(hand_offs) > 1:
            hand_offs.sort(key=_hand_off_order)
        queue = self.env._queue
        for at_us, eid, stage, job, wake in hand_offs:
            if wake is None:  # a link's delivery
                stage.land(job, at_us, eid)  # type: ignore[arg-type]
            elif queue and queue[0][0] <= at_us:  # an idle stage's wake-up now, with something else due first
                wake._ok, wake._value = True, None
                heappush(queue, (at_us, NORMAL, eid, wake))
            else:
                stage.start_queued(wake)
        hand_offs.clear()

    def record(self, stage: int, start_us: float, duration_us: float, job: Job) -> None:
        if self.trace is not None and len(self.trace) < self.trace_limit:
            label, stale = job.label or f"token {job.position}", job.epoch != self.epoch
            event = self.span(stage, start_us, duration_us, label, job.position, job.batch, stale)
            if event is not None and not stale and not job.label:  # a PPSD token's: a later flush may throw it away
                self._pipe_spans.append((job.position, event))

    def span(self, stage: int, start_us: float, duration_us: float, label: str, position: int, batch: int,
             flushed: bool) -> dict[str, Any] | None:  # fmt: skip
        """Trace a stage's work (`flushed`: work a flush threw away); the event, for `flushed_span` to mark later."""
        if self.trace is not None and len(self.trace) < self.trace_limit:
            name = label + (" (flushed)" if flushed else "")
            args = {"position": position, "batch": batch, "flushed": flushed}
            event = {"name": name, "ph": "X", "ts": start_us, "dur": duration_us, "pid": 1, "tid": stage, "args": args}
            self.trace.append(event)
            return event
        return None

    @staticmethod
    def flushed_span(event: dict[str, Any]) -> None:
        """Mark a traced span's work as thrown away by a flush that came after it (a lockstep tick's)."""
        if not event["args"]["flushed"]:
            event["name"] += " (flushed)"
            event["args"]["flushed"] = True

    # ---- schedules ----------------------------------------------------------------------------------------------
    def _main(self) -> Generator[simpy.Event, Any, None]:
        plan, w = self.plan, self.plan.workload
        schedule = {"ar": self._ar, "eesd": self._eesd, "ppsd": self._ppsd}[plan.method]
        for first in range(0, w.requests, w.batch_size):
            rows = [self._row(r) for r in range(first, min(first + w.batch_size, w.requests))]
            start = self.env.now
            prefill = prefill_pass(plan, w.prompt_len)
            yield from self._pass(prefill, 0, len(rows))
            for row in rows:
                row.generated, row.remaining = 1, row.remaining - 1
            self.counts["prefill_tokens"] += len(rows)
            decode_start = self.env.now
            self.prefill_us += decode_start - start
            yield from schedule(rows)
            self.decode_us += self.env.now - decode_start

    def _row(self, request: int) -> BatchRow:
        """Request `request`'s acceptance stream and draft policy, the policy seeded as the executor seeds its row
        (`sim.contract.policy_seed`: by its index in the batch)."""
        plan = self.plan
        if self.make_row is not None:
            return self.make_row(request)
        stream = plan.acceptance.stream(random.Random(self.rng.getrandbits(64)), request)
        policy_rng = random.Random(policy_seed(plan.seed, request % plan.workload.batch_size))
        costs = plan.round_costs
        policy = make_policy(plan.policy, rng=policy_rng, cost_ratio=plan.cost_ratio, round_costs=costs)
        asked = plan.workload.output_len
        length = plan.acceptance.output_len(request, asked)
        return BatchRow(stream, policy, length, past_end=asked - length)

    def _ar(self, rows: list[BatchRow]) -> Generator[simpy.Event, Any, None]:
        """AR steps in blocks up to the host's next read, as the executor runs them (`executor.decoding.decode_ar`):
        `sync_every` steps, or fewer to the furthest any row still reaches for (`BatchRow.room`); a row that ends
        inside a block runs on to its end, and one that ended runs every step at the batch's width (the steps of a
        block do not depend on time: they run together, `_passes`)."""
        segments = ((0, self.plan.model.num_layers, 1),)
        step = Pass("decode", "verify", segments, lm_head_q=1)
        chained = Pass("decode chained", "verify", segments, lm_head_q=1, host_sync=False)
        active, sync_every, counts = [r for r in rows if r.remaining > 0], self.plan.sync_every, self.counts
        width = len(rows)
        while active:
            steps = min(sync_every, max([r.room for r in active]))
            context = self._context(active)
            block = [(chained, context + i, width) for i in range(steps - 1)]
            block.append((step, context + steps - 1, width))
            for row in active:
                emitted = min(steps, row.remaining)
                row.generated += emitted
                row.remaining -= emitted
                counts["rounds"] += emitted
                counts["tokens"] += emitted
            active = [r for r in active if r.remaining > 0]
            yield from self._passes(block)

    def _eesd(self, rows: list[BatchRow]) -> Generator[simpy.Event, Any, None]:
        confidence = any(r.policy.needs_confidence for r in rows)  # the host reads every draft step's confidence
        draft = draft_pass(self.plan, host_sync=confidence)
        active = [r for r in rows if r.remaining > 0]
        chain = self.plan.chain_zero_rounds
        while active:
            # 1. Draft: every row drafts until its policy stops; the batch runs while any row drafts.
            for row in active:
                row.limit = row.drawn if row.drawn is not None else round_budget(row.policy, row.room)
                row.drafted, row.accepted, row.all_match, row.drawn = 0, 0, True, None
            if chain and not any([r.limit for r in active]):
                yield from self._zero_draft_rounds(active, len(rows))
                active = [r for r in active if r.remaining > 0]
                continue
            # A row's drafts depend neither on when they run nor on the other rows: each row's are drawn first.
            drafts = max([self._draft_row(row) for row in active])
            # a row that ended runs on at its parked position: the batch keeps its width (as the executor's)
            context, batch = self._context(active), len(rows)
            passes = [(draft, context + step, batch) for step in range(drafts)]
            # 2. Verify the k drafts (layers [0, E) for the last one, [E, L) for all k + 1: `verify_segments`), emit.
            passes.append((self._verify_pass(drafts), context + drafts, batch))
            yield from self._passes(passes)
            counts = self.counts
            for row in active:
                row.policy.update(row.drafted, row.accepted)
                emitted = min(row.accepted + 1, row.remaining)
                row.generated += emitted
                row.remaining -= emitted
                counts["rounds"] += 1
                counts["tokens"] += emitted
                counts["drafted"] += row.drafted
                counts["accepted"] += row.accepted
            active = [r for r in active if r.remaining > 0]

    def _verify_pass(self, k: int) -> Pass:
        """An EESD round's verify pass after k drafts (k = 0: one full-model step)."""
        verify = self._verify_passes.get(k)
        if verify is None:
            verify = verify_pass(self.plan, k)
            self._verify_passes[k] = verify
        return verify

    def _zero_draft_rounds(self, active: list[BatchRow], width: int) -> Generator[simpy.Event, Any, None]:
        """Rounds in which no row drafts, as the executor runs them (`executor.decoding.zero_draft_rounds`): AR steps
        chained on the device, one host read per block, at the batch's `width` (rows that ended run on); the next
        rounds' budgets are drawn ahead while all are 0, up to `sync_every` rounds or the longest row's end. A
        trained head's layer runs in each step too (its KV kept in step, as a verify pass keeps it)."""
        longest, steps = max(r.room for r in active), 1
        while steps < min(self.plan.sync_every, longest):
            budgets = [round_budget(r.policy, r.room, steps) for r in active]
            if any(budgets):
                for row, budget in zip(active, budgets, strict=True):
                    row.drawn = budget
                break
            steps += 1
        segments, passes, counts = ((0, self.plan.model.num_layers, 1),), [], self.counts
        for step in range(steps):  # the steps do not depend on time: drawn first, run together (`_passes`)
            last = step == steps - 1
            name = "decode" if last else "decode chained"
            work = Pass(name, "verify", segments, lm_head_q=1, head_layer_at=self.plan.head_layer_at, host_sync=last)
            passes.append((work, self._context(active), width))
            for row in active:
                if row.remaining > 0:
                    row.policy.update(0, 0)
                    row.generated += 1
                    row.remaining -= 1
                    counts["rounds"] += 1
                    counts["tokens"] += 1
        yield from self._passes(passes)

    @staticmethod
    def _draft_row(row: BatchRow) -> int:
        """Draw the row's drafts of this round, up to its budget or until its policy stops (the round's draft steps
        run while any row drafts); returns how many."""
        if row.limit <= 0:
            return 0
        stream, policy, limit, position = row.stream, row.policy, row.limit, row.generated
        drafted, accepted, all_match = 0, 0, True
        while True:
            match, confidence = stream.draft(position + drafted, drafted)
            drafted += 1
            all_match = all_match and match
            accepted += all_match
            if drafted >= limit or not policy.keep_drafting(drafted, confidence):
                break
        row.drafted, row.accepted, row.all_match = drafted, accepted, all_match
        return drafted

    def _ppsd(self, rows: list[BatchRow]) -> Generator[simpy.Event, Any, None]:
        plan = self.plan
        if plan.ppsd_backend != "free" or plan.shares_devices:
            yield from self._ppsd_ticks(rows)
            return
        token = self._token_pass()  # every rank's host takes part in every tick
        batch = PPSDBatch(rows)
        longest = batch.longest
        if self.shortcuts and self.trace is None and not self.env._queue and longest > 1:
            swept = _FreePipe(self, batch, token).sweep()
            if swept is not None:
                yield swept
                self.epoch += 1
                return
        self._pipe_spans.clear()  # a batch's flushes mark only its own tokens' spans
        self._pipe = _Pipe(
            rows=batch,
            output_len=longest,
            window=plan.max_in_flight or len(plan.stages),
            finished=self.env.event(),
            token_pass=token,
            batch=len(rows),
            prompt_len=plan.workload.prompt_len,
            # static passes over every cache slot: every token's pass costs the same
            cost=self._cost(token, 0, len(rows)) if plan.cache_slots and not plan.span_buckets else None,
        )
        self._count(rounds=len(rows))  # a round per row: its flush-free runs, as EESD counts a row's rounds
        if longest > 1:
            self._ppsd_enter(self._ppsd_job(0, 0), last_act=self.shortcuts)
            yield self._pipe.finished
        self.epoch += 1  # whatever is still in flight is discarded

    def _token_pass(self, host_sync: bool = True) -> Pass:
        """A PPSD token's pass through every stage; with a process per stage (`distributed`, `free`) each stage's host
        handles it."""
        plan, distributed = self.plan, self.plan.ppsd_backend not in ONE_HOST_BACKENDS
        name = "token" if host_sync or distributed else "token chained"
        segments = ((0, plan.model.num_layers, 1),)
        return Pass(name, "draft", segments, exit_at=plan.exit_layer, lm_head_q=1, host_sync=host_sync or distributed,
                    host_per_stage=distributed)  # fmt: skip

    def _ppsd_job(self, position: int, run_index: int) -> Job:
        """The token at `position` entering the pipe: one tick's input to stage 1. The host `overhead`: every stage
        pays it every tick (each rank's host receives the verdict and launches its stage)."""
        pipe = self._pipe
        costs = pipe.cost or self._cost(pipe.token_pass, pipe.prompt_len + position, pipe.batch)
        first, last, durations, link_bytes = costs
        job = Job(self.epoch, position, durations, link_bytes, first, last, self._ppsd_stage_done, pipe.batch)
        job.run_index = run_index
        return job

    def _ppsd_enter(self, job: Job, last_act: bool = False) -> None:
        self._pipe.in_flight += 1
        self.stages[0].put(job, last_act)

    def _ppsd_stage_done(self, job: Job, stage: int) -> None:
        if stage == 0:
            self._ppsd_draft(job)
        if stage < job.last_stage:  # the stage schedules nothing after this hand-off where it has nothing queued
            self.links[stage].put(job, job.link_bytes[stage], self.shortcuts and not self.stages[stage].items)
        else:
            self._ppsd_exit(job)

    def _ppsd_draft(self, job: Job) -> None:
        pipe, position = self._pipe, job.position + 1
        if position > pipe.output_len - 2:  # the last token is produced by the full model, never processed
            return
        run_index = job.run_index
        job.next_ok = pipe.rows.verdict(position, run_index)
        child = self._ppsd_job(position, run_index + 1)
        if pipe.in_flight < pipe.window:
            pipe.in_flight += 1
            self.stages[0].put(child)
        else:
            pipe.pending = child

    def _ppsd_exit(self, job: Job) -> None:
        pipe, counts, batch = self._pipe, self.counts, self._pipe.batch
        pipe.in_flight -= 1
        for stage, duration in zip(self.stages, job.durations, strict=True):  # a token's job visits every stage
            stage.useful_us += duration
        counts["tokens"] += pipe.rows.emitting(job.position)
        counts["ticks"] += len(self.stages) if job.run_index == 0 else 1
        if pipe.rows.ends_early:
            self._count_eos_drafts(pipe.rows, job.position, job.run_index)
        if job.position + 2 >= pipe.output_len:
            pipe.finished.succeed()
            return
        judged = pipe.rows.judged(job.position + 1)
        if job.next_ok:
            counts["accepted"] += judged
            counts["drafted"] += judged
            if pipe.pending is not None:
                pending, pipe.pending = pipe.pending, None
                self._ppsd_enter(pending)
            return
        # Misprediction: flush everything younger, send the correct token back to stage 1.
        for position, event in self._pipe_spans:  # (traced runs) the younger tokens' work done so far is thrown away
            if position > job.position:
                self.flushed_span(event)
        self._pipe_spans.clear()
        self.epoch += 1
        # the flush at once where the correction reaches stage 1 later (the interrupts' events would come first)
        at_once = self.shortcuts and len(self.stages) > 1 and self.return_link.delay_us(TOKEN_ID_BYTES * batch) > 0
        for stage in self.stages:
            stage.abort_stale(at_once)
        counts["flushes"] += 1
        counts["rounds"] += judged  # each row that goes on starts a run
        counts["drafted"] += judged
        pipe.pending = None
        correction = self._ppsd_job(job.position + 1, 0)
        pipe.in_flight = 1
        if len(self.stages) == 1:
            self.stages[0].put(correction)
        else:
            self.return_link.put(correction, TOKEN_ID_BYTES * batch)

    # ---- PPSD in lockstep ticks ----------------------------------------------------------------------------------
    def _ppsd_ticks(self, rows: list[BatchRow]) -> Generator[simpy.Event, Any, None]:
        """PPSD as the executor's pipeline runs it: lockstep ticks (module docstring; `executor.ppsd.LocalPipeline`
        and the distributed ranks' loop). A tick's stage 1 drafts after its token unless the tick flushes. The host
        reads every `sync_every` ticks, or fewer to the tokens asked for (`BatchRow.room`: an EOS is known only when
        read); the ticks after an EOS up to the block's end run unread, each costed as the tick that emitted it. The
        distributed ranks read every tick's outcome (no unread ticks), where the last rank judges it: once its own
        pass is done (`judged_us`), before the tick's messages and the other stages' passes end; a tick that flushes,
        or ends the decode, moves no hidden state on (the executor's ranks send only the outcome then)."""
        plan, batch, n, lockstep = self.plan, len(rows), len(self.stages), PPSDBatch(rows)
        output_len, window = lockstep.longest, plan.max_in_flight or n
        reads, start = _RowReads(rows), self.env.now
        self.row_reads_us = reads.at  # filled in as the host reads them
        self._count(rounds=batch)  # a round per row: its flush-free runs
        held: list[_Token | None] = [_Token(0, 0, n)] + [None] * (n - 1)
        pending: _Token | None = None
        block, emitted = 0, 0  # ticks left before the host reads: blocks of min(sync_every, tokens still to come)
        distributed = plan.ppsd_backend == "distributed"
        clock, every = _TickClock(self), 1 if distributed else plan.sync_every
        while output_len > 1:
            self.counts["ticks"] += 1
            block = block or min(every, reads.asked() - 1 - emitted)
            block -= 1
            ending = held[-1]  # its verdict is known: drawn when stage 1 drafted after it
            moves = ending is None or (ending.next_ok and ending.position + 2 < output_len)
            tick_us, stage_us, passes_us, messages_us = self._tick(held, block == 0, batch, moves)
            self._tick_stats(held, stage_us, batch, passes_us, messages_us)
            tick_start = clock.at
            if not clock.advance(tick_us):
                yield from clock.wait(tick_us)
            self.judged_us = (tick_start + judged_us(stage_us, passes_us) if distributed else clock.at) - start
            leaving = held[-1]
            if leaving is not None:
                reads.leaves(leaving.position)
            if block == 0:
                reads.read(self.judged_us)
            if leaving is not None:
                self._useful_token(leaving)
                self.counts["tokens"] += lockstep.emitting(leaving.position)
                emitted += 1
                if lockstep.ends_early:
                    self._count_eos_drafts(lockstep, leaving.position, leaving.run_index)
                if leaving.position + 2 >= output_len:
                    yield from clock.catch_up()
                    yield from self._unread_ticks(held, block, batch)
                    break
                judged = lockstep.judged(leaving.position + 1)
                if not leaving.next_ok:  # flush: the correction enters stage 1, everything younger is dropped
                    self._count(flushes=1, rounds=judged, drafted=judged)
                    for dropped in (*held[:-1], pending):
                        for event in dropped.spans if dropped is not None else ():
                            self.flushed_span(event)
                    held, pending = [_Token(leaving.position + 1, 0, n)] + [None] * (n - 1), None
                    if block == 0 and self.pause is not None:
                        yield from clock.catch_up()
                        yield from self.pause(self.env.now - start, emitted, self.counts["ticks"])
                    continue
                self._count(accepted=judged, drafted=judged)
            if block == 0 and self.pause is not None:
                yield from clock.catch_up()
                yield from self.pause(self.env.now - start, emitted, self.counts["ticks"])
            draft = self._tick_draft(held[0], lockstep, n)
            held = [None, *held[:-1]]
            pending = draft or pending
            if pending is not None and sum(t is not None for t in held) < window:
                held[0], pending = pending, None
        yield from clock.catch_up()
        reads.read(self.env.now - start)
        self.row_reads_us = reads.at
        self.epoch += 1

    def _count_eos_drafts(self, batch: PPSDBatch, position: int, index: int) -> None:
        judged, confirmed = batch.eos_drafts(position, index)
        self.counts["drafted"] += judged
        self.counts["accepted"] += confirmed

    def _unread_ticks(self, held: list[_Token | None], block: int, batch: int) -> Generator[simpy.Event, Any, None]:
        """The `block` ticks left in the host's block after the last token left (a row ended at its EOS before the
        tokens asked for): they run unread, each costed as the tick before them (the pipe goes on drafting past the
        EOS, which no one reads)."""
        for left in range(block - 1, -1, -1):
            self.counts["ticks"] += 1
            tick_us, stage_us, passes_us, messages_us = self._tick(held, left == 0, batch, True)
            self._tick_stats(held, stage_us, batch, passes_us, messages_us, wasted=True)
            yield self.env.timeout(tick_us)

    def _tick_draft(self, first: _Token | None, batch: PPSDBatch, n: int) -> _Token | None:
        """Stage 1's draft after its token (none past the last position a token is fed for: the tokens asked, as the
        executor, which learns of an EOS only when it reads it, feeds its pipe), its rows' verdicts drawn now (a batch
        moves in lockstep: it confirms only if every row does, `PPSDBatch.verdict`); a draft past the longest row's
        end is judged by no one."""
        if first is None or first.position + 1 > batch.asked - 2:
            return None
        if first.position + 1 <= batch.longest - 2:
            first.next_ok = batch.verdict(first.position + 1, first.run_index)
        return _Token(first.position + 1, first.run_index + 1, n)

    def _tick(
        self, held: list[_Token | None], read: bool, batch: int, moves: bool
    ) -> tuple[float, tuple[float, ...], float, float]:
        """(the tick's µs, each stage's pass alone (0 for one that did not run), the passes' µs together, the
        messages' µs after them) for the tokens `held`; `moves`: the pipe moves on after it (no flush, not the
        decode's last tick), its hidden states handed on."""
        plan = self.plan
        if plan.ppsd_backend in ONE_HOST_BACKENDS and plan.stages[0].latency.cuda_graphs:
            running = (True,) * len(held)  # a captured pass cannot skip
        else:
            running = tuple([t is not None for t in held])
        position = next((t.position for t in held if t is not None), 0)  # the youngest token is the furthest on
        context = self._tick_contexts.get(position)
        if context is None:
            context = self._tick_contexts[position] = self._context_of(plan.workload.prompt_len + position, "draft")
        key = (running, read, context, batch, moves)
        cached = self._tick_costs.get(key)
        if cached is None:
            cached = self._tick_costs[key] = self._tick_cost(running, read, context, batch, moves)
        return cached

    def _tick_cost(
        self, running: tuple[bool, ...], read: bool, context: int, batch: int, moves: bool
    ) -> tuple[float, tuple[float, ...], float, float]:
        plan, work = self.plan, self._token_pass(host_sync=False)
        shares: dict[int | str, list[PassShare]] = {}
        alone = []
        for index, stage in enumerate(plan.stages):
            if not running[index]:
                alone.append(0.0)
                continue
            time_us = stage_time_us(plan, stage, work, context, batch) + stage.launch_us
            hbm_us = stage_hbm_us(plan, stage, work, context, batch)
            share = PassShare(time_us, time_us if hbm_us is None else hbm_us)  # unknown bandwidth: all of it
            shares.setdefault(plan.contention_group(index), []).append(share)
            alone.append(time_us)
        contention = plan.stage_contention()
        passes_us = max(contention.together_us(group, batch) for group in shares.values())
        messages_us = self._tick_messages_us(running, batch, moves)
        tick_us = passes_us + messages_us
        if plan.ppsd_backend == "distributed":  # each rank's host work is in its own stage's pass (host_per_stage)
            return tick_us, tuple(alone), passes_us, messages_us
        if plan.stages[0].latency.cuda_graphs:  # the transition pass, and the host's read every sync_every ticks
            host_at = plan.host_context(context, "draft")
            host_us = plan.stages[-1].latency.time_us("overhead", "draft", 1, host_at, batch) if read else 0.0
            tick_us += plan.stages[0].launch_us + host_us
        elif not running[-1] and getattr(plan.stages[-1].latency, "host", None) is not None:
            # a measured host work (latency.profile.host_work) is every tick's, paid with the last stage's share of
            # the token's pass: here that stage holds no token
            tick_us += plan.stages[-1].latency.time_us(
                "overhead", "draft", 1, plan.host_context(context, "draft"), batch
            )
        return tick_us, tuple(alone), passes_us, messages_us

    def _tick_messages_us(self, running: tuple[bool, ...], batch: int, moves: bool = True) -> float:
        """A tick's messages after its passes. Distributed (`executor.ppsd_dist.StageLink`): the last rank's outcome
        to every rank, then, where the pipe moves on (`moves`: no flush, not the last tick), each rank's header to the
        next, followed by its hidden state where it ran a token: two messages sent back to back, priced as one
        message of their combined bytes (one latency: the receiver, woken by the header, finds the hidden state
        there), the slowest hand-off setting the tick's end. One host: the running stages' hidden states to the next
        every tick, as `executor.ppsd.LocalPipeline` copies them (an ideal link between stages of one device)."""
        plan = self.plan
        hidden_bytes = plan.model.hidden_size * plan.dtype_bytes * batch
        links = [plan.link_after(i) for i in range(len(plan.stages) - 1)]
        if plan.ppsd_backend != "distributed":
            return max((link.time_us(hidden_bytes) for link, ran in zip(links, running, strict=False) if ran),
                       default=0.0)  # fmt: skip
        header = PPSD_HEADER_VALUES * ID_BYTES * batch
        hand_offs = [link.time_us(header + (hidden_bytes if ran else 0))
                     for link, ran in zip(links, running, strict=False)] if moves else []  # fmt: skip
        return plan.return_link.time_us(PPSD_OUTCOME_VALUES * ID_BYTES * batch) + max(hand_offs, default=0.0)

    def _tick_stats(self, held: list[_Token | None], stage_us: tuple[float, ...], batch: int, passes_us: float = 0.0,
                    messages_us: float = 0.0, wasted: bool = False) -> None:  # fmt: skip
        """Book a tick's work on its stages and tokens; traced, each stage's pass and the messages after them (on
        the links' track, after the stages'), the passes marked flushed where the tick is `wasted` (run unread past
        an EOS)."""
        start, stages, traced = self.env.now, self.stages, self.trace is not None
        if traced and messages_us > 0:
            what = "outcome + hand-offs" if self.plan.ppsd_backend == "distributed" else "hand-offs"
            self.span(2 * len(stages), start + passes_us, messages_us, what, -1, batch, False)  # `trace_tracks`
        for index, token in enumerate(held):
            duration = stage_us[index]
            if not duration:
                continue
            stages[index].busy_us += duration
            if token is not None:
                token.spent[index] += duration
            if traced:  # a captured stage holding no token runs all the same: work no token keeps, marked so
                position = token.position if token is not None else -1
                label = f"token {position}" if token is not None else "empty pass (captured: it cannot skip)"
                event = self.span(index, start, duration, label, position, batch, wasted or token is None)
                if event is not None and token is not None:
                    token.spans.append(event)

    def _useful_token(self, token: _Token) -> None:
        for stage, spent in zip(self.stages, token.spent, strict=True):
            stage.useful_us += spent

    # ---- passes and costs ---------------------------------------------------------------------------------------
    def _pass(self, work: Pass, context_len: int, batch: int) -> Generator[simpy.Event, Any, None]:
        first, last, durations, link_bytes = self._cost(work, context_len, batch)
        job = Job(self.epoch, context_len, durations, link_bytes, first, last, self._forward, batch, work.name)
        job.done = _Wake(self.env)
        self.stages[first].put(job, self.shortcuts)
        yield job.done
        if last > 0 and not job.returned:  # the sampled token ids go back to stage 1
            back_us = self.links_back[last].delay_us(TOKEN_ID_BYTES * batch)
            self._trace_return(back_us, context_len, batch)
            yield self.env.timeout(back_us)

    def _passes(self, passes: list[tuple[Pass, int, int]]) -> Generator[simpy.Event, Any, None]:
        """Run `passes` ((work, context_len, batch) each) one after the other, each once the last one's token ids
        are back, as `_pass` one by one would; where nothing else is due (an empty event queue), as one sweep."""
        if self.shortcuts and not self.env._queue:
            done = self._sweep(passes)
            if done is not None:
                yield done
                return
        for work, context_len, batch in passes:
            yield from self._pass(work, context_len, batch)

    def _sweep(self, passes: list[tuple[Pass, int, int]]) -> _Wake | None:
        """Passes from stage 1 one after the other, each through its stages and its token ids back to stage 1 (or
        the main process, after the last), with nothing else due: what each pass does when does not depend on any
        other event, so their times are worked out here as the events one by one would give them, to the bit. Each
        stage taking part starts one job of its passes and its process wakes once, at the end of its last one
        (booking each pass's busy and useful time); the main process wakes when the last pass's token ids are back
        (with the last stage's process, where that is when it ends). Passes are traced here, in the order their
        ends would be. The event for the main process; None (nothing done) where a pass starts past stage 1, takes
        no time (so that ends could tie), or an end would not fall at its time."""
        now, stages, timelines, plan = self.env._now, self.stages, self._timelines_at, self.plan
        slots = plan.cache_slots
        parts: list[list[float]] = [[] for _ in stages]
        ends = [0.0] * len(stages)
        at, index = now, 0
        for work, context, batch in passes:
            attended = plan.attended(context, work.phase) if slots else context  # as `_context_of`, not rounded
            timeline = timelines.get((work.name, attended, batch), _UNKNOWN)
            if timeline is _UNKNOWN:
                timeline = timelines[work.name, attended, batch] = self._timeline(work, context, batch)
            if timeline is None:
                return None
            for index, duration, after in timeline:  # noqa: B007 (index: the last part's stage, below)
                parts[index].append(duration)
                at += duration
                ends[index] = at
                at += after  # exact where 0 (no link, or the last pass of a stage-1 sweep)
        taking_part = [index for index, own in enumerate(parts) if own]
        for stage in taking_part:
            end = ends[stage]
            if now + (end - now) != end or stages[stage].waiting is None:
                return None
        if now + (at - now) != at:
            return None
        if self.trace is not None:
            self._trace_sweep(passes, now)
        for stage in taking_part:
            here = stages[stage]
            wake, here.waiting, here.current = here.waiting, None, _Swept(self.epoch, parts[stage])
            wake.at_end(ends[stage] - now)  # type: ignore[union-attr]
        if at == ends[index]:  # the main process wakes with the last pass's stage, after it
            return wake
        wake = _Wake(self.env)
        wake.at_end(at - now)
        return wake

    def _trace_sweep(self, passes: list[tuple[Pass, int, int]], now: float) -> None:
        """Trace a sweep's passes (`_sweep`, which has their timelines) in the order their ends would be: as run."""
        at, back = now, 2 * len(self.stages) - 1  # the token ids' track (`trace_tracks`)
        for work, context, batch in passes:
            parts = self._timeline(work, context, batch) or ()
            for part, (index, duration, after) in enumerate(parts):
                self.span(index, at, duration, work.name, context, batch, False)
                at += duration
                if after > 0 and part == len(parts) - 1:
                    self.span(back, at, after, "token ids", context, batch, False)
                elif after > 0:
                    self.span(len(self.stages) + index, at, after, f"{work.name}: hand-off", context, batch, False)
                at += after

    def _timeline(self, work: Pass, context_len: int, batch: int) -> _Timeline | None:
        """A pass's stages for a sweep: (stage, µs, µs after it: the link to the next stage, or the token ids back
        to stage 1 after the last), None where it cannot be swept (it starts past stage 1, or a stage takes no
        time). Cached as `_cost`."""
        key = (work.name, self._context_of(context_len, work.phase), batch)
        timeline = self._timelines.get(key, _UNKNOWN)
        if timeline is not _UNKNOWN:
            return timeline  # type: ignore[return-value]
        first, last, durations, link_bytes = self._cost(work, context_len, batch)
        timeline = None
        if first == 0 and all([duration > 0.0 for duration in durations]):
            afters = [self.links[i].delay_us(link_bytes[i]) for i in range(last)]
            afters.append(self.links_back[last].delay_us(TOKEN_ID_BYTES * batch) if last > 0 else 0.0)
            timeline = tuple((i, durations[i], max(afters[i], 0.0)) for i in range(last + 1))
        self._timelines[key] = timeline
        return timeline

    def _trace_return(self, back_us: float, context_len: int, batch: int) -> None:
        """Trace the token ids' way back to stage 1 (traced runs, a link that takes time)."""
        if self.trace is not None and back_us > 0:
            self.span(2 * len(self.stages) - 1, self.env._now, back_us, "token ids", context_len, batch, False)

    def _forward(self, job: Job, stage: int) -> None:
        """A pass's job leaving `stage` (its time there useful: a pass is never flushed): on to the next stage, or
        done."""
        here = self.stages[stage]
        here.useful_us += job.durations[stage - job.first_stage]
        last_act = self.shortcuts and not here.items  # the stage schedules nothing after this hand-off
        if stage < job.last_stage:
            self.links[stage].put(job, job.link_bytes[stage], last_act)
            return
        self._done(job, last_act)

    def _done(self, job: Job, last_act: bool) -> None:
        """Wake the main process waiting on `job`. Where that wake-up would be the next event (nothing else due
        now, the stage idle after this), `done` fires when the token ids are back at stage 1 instead of the main
        process then waiting for them: the same time and order of events, one event fewer."""
        env = self.env
        if job.last_stage > 0 and last_act and not self.hand_offs and env.peek() > env.now:
            job.returned = True
            back_us = self.links_back[job.last_stage].delay_us(TOKEN_ID_BYTES * job.batch)
            self._trace_return(back_us, job.position, job.batch)
            job.done.at_end(back_us)  # type: ignore[union-attr]
        else:
            job.done.succeed()  # type: ignore[union-attr]

    def _count(self, **increments: int) -> None:
        for key, value in increments.items():
            self.counts[key] += value

    def _context(self, rows: list[BatchRow]) -> int:
        return self.plan.workload.prompt_len + max([r.generated for r in rows])

    def _context_of(self, context_len: int, phase: str) -> int:
        """The context a pass is costed at (`SimPlan.attended`: a static decode pass's cache slots or span bucket),
        rounded to `context_step`."""
        return self.plan.rounded(self.plan.attended(context_len, phase))

    def _cost(self, work: Pass, context_len: int, batch: int) -> PassCost:
        context_len = self._context_of(context_len, work.phase)
        key = (work.name, context_len, batch)  # names are unique per pass shape within a plan
        cached = self._costs.get(key)
        if cached is None:
            cached = self._costs[key] = pass_costs(self.plan, work, context_len, batch)
        return cached


def prefill_pass(plan: SimPlan, prompt_len: int) -> Pass:
    """A prefill of `prompt_len` tokens: every layer, the LM head at the last position, and a trained head's layer
    over the prompt where EESD or PPSD drafts with one."""
    return Pass(
        f"prefill q={prompt_len}", "prefill", ((0, plan.model.num_layers, prompt_len),), lm_head_q=1,
        head_layer_at=plan.prefill_head_layer_at, head_layer_q=prompt_len,
    )  # fmt: skip


def decode_alone(
    plan: SimPlan, prompt_len: int, output_len: int, stream: AcceptanceStream, policy: DraftPolicy, past_end: int = 0
) -> RunResult:
    """One request run alone (batch 1) on `plan`'s stages: its prefill of `prompt_len` tokens, then `output_len`
    tokens decoded with the plan's method, drafts judged by `stream` and drafted as `policy` says; `past_end` more
    asked for where it ends at its EOS first (`BatchRow`)."""
    return decode_rows(plan, prompt_len, [BatchRow(stream, policy, output_len, past_end=past_end)])[0]


def decode_rows(plan: SimPlan, prompt_len: int, rows: list[BatchRow]) -> tuple[RunResult, list[float]]:
    """The rows (fresh `BatchRow`s, each its own length, stream and policy) run as one batch on `plan`'s stages
    after a prefill of `prompt_len` tokens (the longest prompt's: the executor's rows move in lockstep over the span
    of the furthest): the run, and for a lockstep PPSD plan when the host read each row's last token (µs after the
    decode began; `sim.serving` runs a static PPSD batch as this, its requests leaving then)."""
    asked = max(row.length + row.past_end for row in rows)
    shape = Workload(requests=len(rows), batch_size=len(rows), prompt_len=prompt_len, output_len=asked)
    simulation = Simulation(replace(plan, workload=shape), row=rows.__getitem__)
    return simulation.run(), simulation.row_reads_us


class LockstepDecode:
    """A lockstep PPSD decode of `rows` (as `decode_rows`) run from one host read of the device's log to the next, for
    a caller that decides at each read whether it goes on: `advance()` runs it to its next read (True) or to its end
    (False, `result` then the run's). At a read, `at_us` (µs since the decode began), `emitted` (the tokens each
    row still going has emitted since), `ticks` (run so far), `judged_us` (when the read happened: `at_us`, or on the
    distributed backend where the last rank judged the tick, before its end) and `row_reads_us` (when each row was
    read to its end; nan for the rows still going) say where it stands; a caller that stops it there (a serving loop
    letting waiting requests join the batch, `sim.serving`) simply never advances it again: the rest of it never
    runs."""

    def __init__(self, plan: SimPlan, prompt_len: int, rows: list[BatchRow]) -> None:
        asked = max(row.length + row.past_end for row in rows)
        shape = Workload(requests=len(rows), batch_size=len(rows), prompt_len=prompt_len, output_len=asked)
        self.sim = Simulation(replace(plan, workload=shape), row=rows.__getitem__)
        self.sim.pause = self._pause
        self.at_us, self.emitted, self.ticks = 0.0, 0, 0
        self.result: RunResult | None = None
        self._resume: simpy.Event | None = None
        self.sim.env.process(self.sim._main())

    @property
    def row_reads_us(self) -> list[float]:
        return self.sim.row_reads_us

    @property
    def judged_us(self) -> float:
        return self.sim.judged_us

    def advance(self) -> bool:
        """Run to the next host read (True) or to the decode's end (False)."""
        if self._resume is not None:
            resume, self._resume = self._resume, None
            resume.succeed()
        env = self.sim.env
        while self._resume is None and env.peek() != math.inf:
            env.step()
        if self._resume is not None:
            return True
        self.result = self.sim.result()
        return False

    def _pause(self, at_us: float, emitted: int, ticks: int) -> Generator[simpy.Event, Any, None]:
        self.at_us, self.emitted, self.ticks = at_us, emitted, ticks
        self._resume = self.sim.env.event()
        yield self._resume


def judged_us(stage_us: tuple[float, ...], passes_us: float) -> float:
    """When the last rank judges a distributed lockstep tick, µs into it: once its own pass is done (at once where it
    holds no token), its pass stretched as the passes together are (`executor.ppsd_dist.StageWork`: it judges, and
    streams the tick's tokens to the host, before the tick's messages)."""
    last = stage_us[-1]
    return passes_us * last / max(stage_us) if last else 0.0


def _hand_off_order(hand_off: _HandOff) -> tuple[float, int]:
    return hand_off[0], hand_off[1]


def events_per_token(plan: SimPlan, shortcuts: bool = True) -> float:
    """SimPy events processed per simulated token in a run of `plan` (what the engine's speed rests on; the machine's
    load does not change it), with the event-sparing hand-offs or without (`Simulation(shortcuts=False)`)."""
    sim = Simulation(plan, shortcuts=shortcuts)
    step, count = sim.env.step, [0]

    def counted() -> None:
        count[0] += 1
        step()

    sim.env.step = counted  # type: ignore[method-assign]
    tokens = sim.run().tokens
    return count[0] / tokens


@dataclass(eq=False)
class _Token:
    """A token in a lockstep pipe: its position, the drafts since it entered afresh (0: start or correction),
    whether the draft stage 1 made after it matches (set when made), and the µs each stage spent on it."""

    position: int
    run_index: int
    stages: int
    next_ok: bool = True
    spent: list[float] = field(default_factory=list)
    spans: list[dict[str, Any]] = field(default_factory=list)  # its traced work (a flush marks it)

    def __post_init__(self) -> None:
        self.spent = [0.0] * self.stages


class _RowReads:
    """When the host read each row's last token in a lockstep PPSD decode (µs after it began): a row's last token
    leaves the pipe as the token at its length - 2 does, and the host reads it at the end of that tick's block of
    `sync_every` ticks (a row of one token was done at the prefill: 0)."""

    __slots__ = ("at", "ending", "pending", "wanted", "_asked")

    def __init__(self, rows: list[BatchRow]) -> None:
        self.at = [0.0 if row.length <= 1 else math.nan for row in rows]
        self.ending: dict[int, list[int]] = {}
        for index, row in enumerate(rows):
            if row.length > 1:
                self.ending.setdefault(row.length - 2, []).append(index)
        self.pending: list[int] = []
        self.wanted = [row.length + row.past_end for row in rows]  # the tokens each row asked
        self._asked: int | None = None

    def asked(self) -> int:
        """The most tokens a row not yet read to its end asked for: the executor's next block of ticks reaches for
        them (`LocalPipeline.decode`: rows the host found done are out of it)."""
        if self._asked is None:
            going = [wanted for wanted, at in zip(self.wanted, self.at, strict=True) if math.isnan(at)]
            self._asked = max(going, default=max(self.wanted))
        return self._asked

    def leaves(self, position: int) -> None:
        """The token at `position` left the pipe: the rows it ends wait for the host's next read."""
        self.pending += self.ending.get(position, ())

    def read(self, at_us: float) -> None:
        for index in self.pending:
            self.at[index] = at_us
        if self.pending:
            self.pending.clear()
            self._asked = None


class _TickClock:
    """Lockstep ticks with nothing else due, run without an event each: the time a tick's timeout would reach is
    kept here and the main process waits once for the ticks run so (`catch_up`), where SimPy would have processed
    them one by one with nothing in between; the same times to the bit (a tick is deferred only where the wait then
    reaches exactly the time the timeouts one by one would). Untraced runs with `shortcuts` only."""

    def __init__(self, sim: Simulation) -> None:
        self.env = sim.env
        self.enabled = sim.shortcuts and sim.trace is None
        self.at = self.env._now  # where the ticks run so far have brought the time

    def advance(self, tick_us: float) -> bool:
        """Run a tick of `tick_us` without an event where nothing else is due until it ends; False where it must wait
        as its own event (`wait`)."""
        env, end = self.env, self.at + tick_us
        if not self.enabled or env.peek() <= end or env._now + (end - env._now) != end:
            return False
        self.at = end
        return True

    def catch_up(self) -> Generator[simpy.Event, Any, None]:
        """Wait for the ticks run without events (none: nothing to wait for); the time then is the clock's."""
        if self.at > self.env._now:
            yield self.env.timeout(self.at - self.env._now)
        self.at = self.env._now

    def wait(self, tick_us: float) -> Generator[simpy.Event, Any, None]:
        """The tick as its own event, after the ticks deferred before it."""
        yield from self.catch_up()
        yield self.env.timeout(tick_us)
        self.at = self.env._now


@dataclass
class _Pipe:
    rows: PPSDBatch
    output_len: int
    window: int
    finished: simpy.Event
    token_pass: Pass  # a token's pass (every rank's host takes part in every tick)
    batch: int
    prompt_len: int
    in_flight: int = 0
    pending: Job | None = field(default=None)
    cost: PassCost | None = None  # every token's pass, where that does not depend on its position


_Timed = tuple[list[float], list[float], tuple[float, ...]]  # a token in the free pipe: starts, ends, durations


class _FreePipe:
    """A batch's whole PPSD decode on the free-running pipe (a device per stage), worked out as the events one by one
    would give it, to the bit, where nothing else is due: the pipe is then a flow shop whose every time follows from
    the stage and link times and the drafts' verdicts (which depend on the position and the draft's index alone, not
    on when they are drawn; `sim.acceptance`). A token starts a stage when it has arrived and the stage has finished
    the token before it; a draft enters stage 1 when its parent leaves stage 1 and fewer than `window` tokens are in
    flight; the first token leaving the last stage with a wrong draft after it flushes the younger ones (a running
    job stops then, its time so far booked) and its correction enters stage 1 once the token ids are back. Where a
    younger job ends at the very time of a flush and booking it whole or stopped would differ (which one SimPy's
    order of events picks is not known here), or a stage costs nothing, `sweep` declines and the events run."""

    def __init__(self, sim: Simulation, rows: PPSDBatch, token: Pass) -> None:
        plan = sim.plan
        self.sim, self.rows, self.token = sim, rows, token
        self.n, self.batch, self.output_len = len(sim.stages), rows.size, rows.longest
        self.window = plan.max_in_flight or self.n
        self.prompt_len = plan.workload.prompt_len
        self.busy = [stage.busy_us for stage in sim.stages]
        self.useful = [stage.useful_us for stage in sim.stages]
        self.counts = dict.fromkeys(("tokens", "rounds", "accepted", "drafted", "flushes", "ticks"), 0)
        link_bytes = sim._cost(token, self.prompt_len, self.batch)[3]  # the hidden states: the same at every position
        self.links = [link.delay_us(link_bytes[i]) for i, link in enumerate(sim.links)]
        self.durations: dict[int, tuple[float, ...]] = {}  # by position
        self.return_us = sim.return_link.delay_us(TOKEN_ID_BYTES * self.batch) if self.n > 1 else 0.0

    def sweep(self) -> _Wake | None:
        """Book the decode's stage times and counts and return the event that wakes the main process when the last
        token leaves the pipe; None (nothing booked) where the events must run."""
        sim = self.sim
        position, entry = 0, sim.env.now
        self.counts["rounds"] = self.batch  # a round per row: its flush-free runs
        while True:
            left = self.segment(position, entry)
            if left is None:
                return None
            position, at_us, final = left
            if final:
                break
            entry = at_us + self.return_us if self.return_us > 0.0 else at_us
        for stage, busy, useful in zip(sim.stages, self.busy, self.useful, strict=True):
            stage.busy_us, stage.useful_us = busy, useful
        sim._count(**self.counts)
        wake = _Wake(sim.env)
        wake.at(at_us)
        return wake

    def segment(self, position: int, entry: float) -> tuple[int, float, bool] | None:
        """The tokens from `position` (the first, or a correction) entering stage 1 at `entry`, up to the first that
        leaves with a wrong draft after it, or the last: their times and counts booked, then the younger tokens'
        flushed work. (The next correction's position, when the token left, whether it was the last); None where the
        sweep must decline."""
        tokens: list[_Timed] = []
        exits: list[float] = []
        while True:
            index = len(tokens)
            timed = self.token_times(position + index, entry, tokens[-1][1] if tokens else None)
            if timed is None:
                return None
            tokens.append(timed)
            exits.append(timed[1][-1])
            final = position + index + 2 >= self.output_len
            if final or not self.confirmed(position + index + 1, index):
                break
            entry = self.entry(timed[1][0], exits, index + 1)
        self.book_left(position, tokens, final)
        if not final and not self.book_flushed(position, tokens, exits):
            return None
        return position + len(tokens), exits[-1], final

    def token_times(self, position: int, entry: float, before: list[float] | None) -> _Timed | None:
        """The token at `position` entering stage 1 at `entry`, behind the token that left each stage at `before`:
        when it starts and ends on each stage, and its durations; None where the sweep must decline."""
        durations = self.durations.get(position)
        if durations is None:
            first, last, durations, _ = self.sim._cost(self.token, self.prompt_len + position, self.batch)
            if first != 0 or last != self.n - 1 or min(durations) <= 0.0:
                return None
            self.durations[position] = durations
        links = self.links
        starts, end = [entry], entry + durations[0]
        ends = [end]
        for stage in range(1, self.n):
            delay = links[stage - 1]
            arrive = end + delay if delay > 0.0 else end
            if before is not None and arrive < before[stage]:
                arrive = before[stage]
            starts.append(arrive)
            end = arrive + durations[stage]
            ends.append(end)
        return starts, ends, durations

    def entry(self, parent_left_stage_1: float, exits: list[float], index: int) -> float:
        """When the segment's token `index`, drafted as its parent left stage 1, enters: at once, or when the token
        leaving frees a place in the window."""
        freed = index - self.window
        if freed < 0 or exits[freed] <= parent_left_stage_1:
            return parent_left_stage_1
        return exits[freed]

    def confirmed(self, position: int, index: int) -> bool:
        """Whether the batch's draft of `position`, the `index`-th since the segment began, is the full model's."""
        return self.rows.verdict(position, index)

    def book_left(self, position: int, tokens: list[_Timed], final: bool) -> None:
        """Each token of a segment (from `position`) ran every stage whole and left: busy and useful time, tokens,
        ticks, verdicts."""
        busy, useful, counts, rows = self.busy, self.useful, self.counts, self.rows
        for _, _, durations in tokens:
            for stage, duration in enumerate(durations):
                busy[stage] += duration
                useful[stage] += duration
        confirmed = len(tokens) - 1
        if rows.uniform:
            judged, counts["tokens"] = rows.size * confirmed, counts["tokens"] + rows.size * len(tokens)
        else:
            judged = sum(rows.judged(position + i) for i in range(1, len(tokens)))
            counts["tokens"] += sum(rows.emitting(position + i) for i in range(len(tokens)))
        for i in range(len(tokens)) if rows.ends_early else ():  # its index in the segment: its run index
            eos_judged, eos_confirmed = rows.eos_drafts(position + i, i)
            counts["drafted"] += eos_judged
            counts["accepted"] += eos_confirmed
        counts["ticks"] += self.n + confirmed  # its first token entered an empty pipe
        counts["accepted"] += judged
        counts["drafted"] += judged
        if not final:
            flushed = rows.judged(position + len(tokens))  # the rows that go on, each starting a run
            counts["drafted"] += flushed
            counts["flushes"] += 1
            counts["rounds"] += flushed

    def book_flushed(self, position: int, tokens: list[_Timed], exits: list[float]) -> bool:
        """The work of the tokens younger than the segment's last, entered before it left at `at`: a job that ended
        before is booked whole, one running then up to `at`, one not started not at all. False where a job ends at
        `at` itself and the two bookings differ."""
        at, busy = exits[-1], self.busy
        before, index = tokens[-1][1], len(tokens)
        # a younger token is drafted (none past the last position a token is fed for) and enters in flight
        while index - self.window < len(tokens) - 1 and position + index <= self.output_len - 2:
            entry = self.entry(before[0], exits, index)
            if entry >= at:
                break
            timed = self.token_times(position + index, entry, before)
            if timed is None:
                return False
            starts, before, durations = timed
            for stage, (start, end, duration) in enumerate(zip(starts, before, durations, strict=True)):
                if start >= at:
                    break
                if end == at and at - start != duration:
                    return False
                busy[stage] += duration if end <= at else at - start
            index += 1
        return True


def _extrapolations(plan: SimPlan) -> tuple[str, ...]:
    """What the run asked its latency models, link profiles and contention profile outside what they measured."""
    models = [*(s.latency for s in plan.stages), plan.contention, *plan.links]
    return tuple(dict.fromkeys(e for model in models for e in extrapolations_of(model)))
