"""Serving with replicas in the executor: N worker processes, each a whole server (`executor.serving.serve`) with its
own copy of the model, slots and KV cache, and a dispatcher that sends each arriving request to one of them.

The schedule is the simulator's (`sim.serving` with `replicas: N`): the dispatcher reads the workload's arrivals (or a
closed loop's) on the wall clock and picks a replica when a request arrives, with the simulator's own rule
(`sim.serving.pick_replica`: `least_loaded`, `least_tokens` or `round_robin`), counting a request against its replica
from dispatch until the worker reports it finished; the request then stays there. A worker runs `serve`'s loop on the
requests it is sent (the same admission, prefills, rounds and departures), timing everything from the dispatcher's
time 0 (`time.perf_counter` is the machine's monotonic clock, the same in every process), and reports each finish as
it happens and its records, logged passes and tokens at the end. The merged run is one `ServeOutcome` whose records
and passes carry their replica; every request's tokens are those it gets alone with AR (the workers are `serve`).

Workers are spawned processes that load the model themselves (`executor.models.load_model`: a packaged name, a local
Hugging Face directory or a .gguf file), each with `threads` torch threads, then serve one warm-up request before
time 0. On one machine the replicas share its memory bandwidth (a CPU's cores, or one GPU): the simulator's replicas
are separate devices, so such a run measures what sharing costs beside what dispatch does.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
import queue
import time
import traceback
from collections.abc import Sequence
from typing import Any

from executor.decoding import GenerationStats
from executor.serving import ServeOutcome, _ServeLoop, arrival_heap, run_end
from sim.serving import DISPATCH, PassLog, ServingResult, method_kv_tokens, pick_replica
from sim.workers import USER_ERRORS, exit_with_parent
from sim.workload import ClosedLoopUsers, Request, ServingWorkload

READY_TIMEOUT_S = 600.0  # a worker loads the model and serves its warm-up request within this


@dataclasses.dataclass
class ReplicaLink:
    """A worker's end: its replica index, its inbox (requests, then "stop") and the dispatcher's outbox."""

    index: int
    inbox: Any
    outbox: Any


class ReplicaLoop(_ServeLoop):
    """`serve`'s host loop in a worker: requests come from the dispatcher (message ("request", request, arrival_s)),
    the run's time 0 too; each finish is reported at once; the loop ends on "stop" once nothing is left."""

    def __init__(self, *args: Any, link: ReplicaLink) -> None:
        super().__init__(*args)
        self.link, self.users, self.stopped, self.served = link, None, False, []

    def _start(self, clock: Any) -> float:
        self.link.outbox.put(("ready", self.link.index))
        kind, begin = self.link.inbox.get()
        if kind != "begin":
            raise RuntimeError(f"replica {self.link.index}: expected the dispatcher's time 0, got {kind!r}")
        return begin

    def _more(self, finished: int) -> bool:
        return not (self.stopped and not self.slots and not self.admission.waiting)

    def _arrivals(self, now_s: float) -> None:
        while True:
            try:
                message = self.link.inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(message)

    def _idle(self, now: Any, sleep: Any) -> None:
        self._handle(self.link.inbox.get())

    def _handle(self, message: tuple) -> None:
        if message[0] == "stop":
            self.stopped = True
            return
        _, request, arrival_s = message
        self.records[request.index].arrival_s = arrival_s
        self.served.append(request.index)
        self.admission.arrive(request)

    def _leave(self, record: Any, request: Request, at_s: float) -> None:
        super()._leave(record, request, at_s)
        self.link.outbox.put(("finished", self.link.index, request.index, at_s))

    def _outcome(self) -> dict[str, Any]:
        index, stats = self.link.index, self.decoder.stats
        return {
            "records": [self.records[i] for i in self.served],
            "outputs": {i: self.sinks[i].tokens for i in self.served},  # type: ignore[union-attr]
            "passes": [dataclasses.replace(log, replica=index) for log in self.result.passes],
            "rounds": [1 if log.kind != "ppsd" else log.tokens for log in self.result.passes],
            "drafted": list(stats.drafted),
            "accepted": list(stats.accepted),
            "host_reads": stats.host_reads,
            "max_batch": self.admission.max_batch,
        }


def serve_replicas(
    model: str | os.PathLike[str],
    workload: ServingWorkload,
    prompts: Sequence[Sequence[int]],
    *,
    replicas: int,
    dispatch: str = "least_loaded",
    dtype: str = "float32",
    device: str | Sequence[str] = "cpu",
    threads: int = 1,
    **options: Any,
) -> ServeOutcome:
    """Serve `workload` on `replicas` worker processes (module docstring); `device` is every worker's, or one per
    replica (e.g. ["cuda:0", "cuda:1"]: a GPU each, the simulator's replicas); `options` are `serve`'s (method,
    exit_layer, policy, head as "shared" or a file, max_batch, kv_capacity_tokens per replica, eos_token_id,
    sampling, seed, stages, stage_boundaries, backend, capture)."""
    import torch.multiprocessing as mp

    _check(model, workload, prompts, replicas, dispatch, options)
    devices = [device] * replicas if isinstance(device, str) else list(device)
    if len(devices) != replicas:
        raise ValueError(f"device: one for every replica or one for all, got {len(devices)} for {replicas} replicas")
    prompts = [list(p) for p in prompts]
    context = mp.get_context("spawn")
    outbox = context.Queue()
    links = [ReplicaLink(i, context.Queue(), outbox) for i in range(replicas)]
    workers = [
        context.Process(
            target=_worker,
            args=(link, str(model), dtype, devices[link.index], threads, workload, prompts, options, os.getpid()),
            daemon=True,
        )
        for link in links
    ]
    for worker in workers:
        worker.start()
    try:
        _await(outbox, "ready", replicas, workers)
        begin = time.perf_counter()
        for link in links:
            link.inbox.put(("begin", begin))
        dispatcher = _Dispatcher(workload, dispatch, links, options)
        dispatcher.run(begin, outbox, workers)
        for link in links:
            link.inbox.put(("stop",))
        pieces = _await(outbox, "done", replicas, workers)
    except BaseException:
        for worker in workers:  # the others would wait for requests that never come
            worker.terminate()
        raise
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
    outcome = _merged(workload, options.get("method", "ar"), replicas, pieces)
    outcome.dispatched_s = dispatcher.dispatched_s
    return outcome


def _check(
    model: Any, workload: ServingWorkload, prompts: Sequence, replicas: int, dispatch: str, options: dict
) -> None:
    if not isinstance(model, str | os.PathLike):
        raise ValueError(
            "serve_replicas loads the model in each worker: give a packaged model name, a local Hugging Face "
            f"directory or a .gguf file, not a {type(model).__name__}"
        )
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
    if dispatch not in DISPATCH:
        raise ValueError(f"dispatch must be one of {', '.join(DISPATCH)}, got {dispatch!r}")
    if len(prompts) != len(workload.requests):
        raise ValueError(f"got {len(prompts)} prompts for {len(workload.requests)} requests: one prompt per request")
    for name in ("clock", "sleep", "replica"):
        if name in options:
            raise ValueError(f"serve_replicas times every replica on the machine's clock: {name} is not an option")


def _worker(
    link: ReplicaLink, model: str, dtype: str, device: str, threads: int, workload: ServingWorkload,
    prompts: list[list[int]], options: dict[str, Any], parent: int,
) -> None:  # fmt: skip
    """A worker process: load the model, serve one warm-up request, then the dispatcher's requests. It ends with
    `parent` (`sim.workers.exit_with_parent`); a user's mistake (`sim.workers.USER_ERRORS`: a ValueError, a missing
    file) is sent as one line of its class, anything else (and, with EESD_DEBUG set, a mistake too) with its
    traceback."""
    exit_with_parent(parent)
    try:
        import torch
        from transformers.utils import logging as hf_logging

        from executor.adapter import ModelAdapter
        from executor.models import load_model
        from executor.serving import serve

        hf_logging.disable_progress_bar()  # N workers loading at once: the dispatcher's output stays readable
        torch.set_num_threads(threads)
        adapter = ModelAdapter(load_model(model, dtype=dtype, device=device))
        first = workload.requests[0]
        warm = ServingWorkload((Request(0, first.prompt_len, min(4, first.output_len), 0.0),))
        serve(adapter, warm, prompts[:1], **options)
        outcome = serve(adapter, workload, prompts, replica=link, **options)
        link.outbox.put(("done", link.index, outcome))
    except USER_ERRORS as err:  # as `eesd` reports them: one line, as the USER_ERRORS class it is one of
        if os.environ.get("EESD_DEBUG"):
            link.outbox.put(("error", link.index, traceback.format_exc()))
        else:
            kind = next(k for k in USER_ERRORS if isinstance(err, k))
            link.outbox.put(("mistake", link.index, kind.__name__, str(err)))
    except BaseException:  # noqa: BLE001 - the dispatcher reports it with the worker's traceback
        link.outbox.put(("error", link.index, traceback.format_exc()))


def _await(outbox: Any, kind: str, count: int, workers: list) -> dict[int, Any]:
    """`count` messages of `kind` ("ready", "done"), one per replica; a worker's error is raised here with its
    traceback; a worker that dies silently is named."""
    found: dict[int, Any] = {}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(found) < count:
        try:
            message = outbox.get(timeout=1.0)
        except queue.Empty:
            dead = [i for i, w in enumerate(workers) if not w.is_alive() and i not in found]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"replica worker(s) {dead or 'all'} stopped before sending {kind!r}") from None
            continue
        _raise_failure(message)
        if message[0] == kind:
            found[message[1]] = message[2] if len(message) > 2 else None
    return found


def _raise_failure(message: tuple) -> None:
    """A worker's failure, raised here: a user's mistake as its own class in one line naming the replica, anything
    else with the worker's traceback."""
    if message[0] == "error":
        raise RuntimeError(f"replica {message[1]} failed:\n{message[2]}")
    if message[0] == "mistake":
        kind = next((k for k in USER_ERRORS if k.__name__ == message[2]), RuntimeError)
        raise kind(f"replica {message[1]}: {message[3]}")


class _Dispatcher:
    """Arrivals on the wall clock, each to a replica (`pick_replica`), finishes counted as workers report them."""

    def __init__(self, workload: ServingWorkload, dispatch: str, links: list[ReplicaLink], options: dict) -> None:
        self.dispatch, self.links = dispatch, links
        self.kv = method_kv_tokens(options.get("method", "ar"), options.get("policy", "fixed:4"))
        self.loads, self.tokens = [0] * len(links), [0] * len(links)
        self.sent, self.finished, self.total = 0, 0, len(workload.requests)
        self.users = ClosedLoopUsers(workload) if workload.closed else None
        self.in_flight: dict[int, Request] = {}  # dispatched and not finished, by index
        self.dispatched_s = [math.nan] * self.total
        self.begin = 0.0
        self.upcoming = arrival_heap(workload, self.users)

    def run(self, begin: float, outbox: Any, workers: list) -> None:
        self.begin = begin
        while self.finished < self.total:
            now = time.perf_counter() - begin
            if self.upcoming and self.upcoming[0][0] <= now:
                self._send(*heapq.heappop(self.upcoming))
                continue
            wait = self.upcoming[0][0] - now if self.upcoming else 1.0
            try:
                message = outbox.get(timeout=max(wait, 0.0))
            except queue.Empty:
                if not self.upcoming and not all(w.is_alive() for w in workers):
                    raise RuntimeError("a replica worker stopped before its requests finished") from None
                continue
            self._receive(message)

    def _send(self, arrival_s: float, index: int, request: Request) -> None:
        replica = pick_replica(self.dispatch, self.loads, self.tokens, self.sent)
        self.sent += 1
        self.loads[replica] += 1
        self.tokens[replica] += self.kv(request)
        self.in_flight[index] = request
        self.links[replica].inbox.put(("request", request, arrival_s))
        self.dispatched_s[index] = time.perf_counter() - self.begin

    def _receive(self, message: tuple) -> None:
        _raise_failure(message)
        if message[0] != "finished":
            return
        _, replica, index, at_s = message
        self.loads[replica] -= 1
        self.tokens[replica] -= self.kv(self.in_flight.pop(index))
        self.finished += 1
        if self.users is not None:
            following = self.users.after(at_s)
            if following is not None:
                request, send_s = following
                heapq.heappush(self.upcoming, (send_s, request.index, request))


def _merged(workload: ServingWorkload, method: str, replicas: int, pieces: dict[int, dict[str, Any]]) -> ServeOutcome:
    """One outcome from the workers' pieces: every record (with its replica), every logged pass, every output."""
    records: list[Any] = [None] * len(workload.requests)
    outputs: list[list[int]] = [[] for _ in workload.requests]
    max_batch = pieces[0]["max_batch"]  # every worker's `serve` settled the same slots
    result = ServingResult(method, max_batch, records, replicas=replicas)
    stats = GenerationStats(method=method)
    logs: list[tuple[PassLog, int]] = []
    for replica, piece in sorted(pieces.items()):
        for record in piece["records"]:
            record.replica = replica
            records[record.index] = record
        for index, tokens in piece["outputs"].items():
            outputs[index] = tokens
        logs += list(zip(piece["passes"], piece["rounds"], strict=True))
        stats.drafted += piece["drafted"]
        stats.accepted += piece["accepted"]
        stats.host_reads += piece["host_reads"]
    for log, rounds in sorted(logs, key=lambda item: (item[0].start_s, item[0].replica)):
        result.book(log, rounds)
    missing = [i for i, record in enumerate(records) if record is None]
    if missing:
        raise RuntimeError(f"requests {missing[:5]} were not served by any replica")
    result.records = records
    result.tokens = sum(r.tokens for r in records)
    result.time_s = run_end(records, result.passes)
    result.in_system_s = sum(r.latency_s for r in records)
    result.drafted, result.accepted = sum(stats.drafted), sum(stats.accepted)
    stats.rounds = result.rounds
    stats.new_tokens = result.tokens
    return ServeOutcome(result, outputs, stats)
