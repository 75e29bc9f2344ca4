"""How k PPSD stage processes computing at once on one host's cores slow each other: a `processes` contention profile.

PPSD's distributed backend runs a process per stage; on one CPU host those processes run on their own cores but
share the memory system (caches, memory bandwidth), so a stage's pass takes longer while the others compute. For each
k asked, k processes (`torch.multiprocessing`, one torch thread each unless told otherwise) each load the model and
run its own stage's decode pass, the stages laid out as `executor.ppsd.plan_stages` lays them (stage 1: the embedding,
its layers and the exit head's logits at its end; the last: its layers and the LM head; between: layers only). They
then move in lockstep ticks, as the executor's ranks do: every tick starts at a barrier and each process times its
own pass.
- alone: in turn, one process computes at each tick while the others wait at the barrier (idle, no CPU);
- together: every process computes at each tick; the tick's time is its slowest pass.
The two alternate over `rounds` rounds of `repeats` ticks each, so a drift of the machine reaches both. A row per
(k, batch): the passes' medians alone (their sum and the longest) and the ticks together (median, p10, p90); the
simulator reads it as an overlap factor (`sim.contention`) and applies it to the stage passes of a distributed tick
on that host, at the tick's batch.

    eesd calibrate contention --processes 2 --model smollm2-135m --dtype fp32 --out FILE.csv
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from calibrate.common import base_metadata, check_dtype, load, percentile
from sim.formats import ContentionRecord
from sim.workers import USER_ERRORS

DEFAULT_WARMUP = 5  # untimed passes per process first


@dataclass(frozen=True)
class StageJob:
    """What each process of one measurement runs: the model, the layout, the pass's shape and how often."""

    model: str
    dtype: str
    stages: int
    exit_layer: int | None
    batches: tuple[int, ...]
    context_len: int
    threads: int
    repeats: int
    rounds: int
    warmup: int = DEFAULT_WARMUP


@dataclass(frozen=True)
class StageSamples:
    """One process's pass times at each batch, µs: `alone[b][i]` its ticks at batch b while it alone computed in
    round i, `together[b][i]` the ticks of that round when all computed."""

    layers: tuple[int, int]
    alone: dict[int, list[list[float]]]
    together: dict[int, list[list[float]]]


def check_layout(model: str, dtype: str, processes: Sequence[int], exit_layer: int | None, context_len: int) -> None:
    """Refuse, before any process starts, a dtype, model, layout or context the processes would fail on (a
    ValueError or FileNotFoundError naming the flag or the path)."""
    from calibrate.common import config_of
    from executor.adapter import context_of
    from executor.ppsd import plan_stages

    check_dtype(dtype)
    config = config_of(model)
    for k in processes:
        try:
            plan_stages(config.num_hidden_layers, k, exit_layer=exit_layer)
        except ValueError as err:
            raise ValueError(f"--processes {k} / --exit-layer: {err}") from None
    positions = context_of(config)[0]
    if context_len + 1 > positions:
        raise ValueError(f"--context {context_len}: a pass there writes position {context_len}; {model} has "
                         f"{positions} positions")  # fmt: skip


def stage_pass(adapter: Any, bounds: tuple[int, ...], stage: int, batch: int, context_len: int) -> Callable[[], object]:
    """A decode pass (one token a row at `context_len`) of stage `stage` of the layout `bounds`, as a PPSD stage runs
    it: the first embeds the ids and ends with the exit head's logits, the last ends with the LM head."""
    from calibrate.latency import make_inputs
    from executor.adapter import decoder_layer

    x = make_inputs(adapter, 1, context_len, batch)
    first, last = stage == 0, stage == len(bounds) - 2
    layers = range(bounds[stage], bounds[stage + 1])

    def run() -> object:
        hidden = adapter.embed(x.ids) if first else x.hidden
        for index in layers:
            hidden = decoder_layer(adapter.layers[index], 0, hidden, x.step, x.cache, x.rotary,
                                   x.masks[adapter.windows[index]])  # fmt: skip
        return adapter.logits(hidden).argmax(-1) if first or last else hidden

    return run


def _worker(rank: int, job: StageJob, barrier: Any, folder: str) -> None:
    """A stage process: `_measure`, its error (if any) written to `rank<r>.err` for the parent to name, no traceback;
    a barrier broken by the parent (another process failed) ends it quietly."""
    import sys
    import threading

    try:
        _measure(rank, job, barrier, folder)
    except threading.BrokenBarrierError:
        sys.exit(3)
    except BaseException as err:  # noqa: BLE001 (any failure: the parent names it and stops the others)
        kind = "user" if isinstance(err, USER_ERRORS) else type(err).__name__
        (Path(folder) / f"rank{rank}.err").write_text(f"{kind}\n{err}", encoding="utf-8")
        sys.exit(1)


def _measure(rank: int, job: StageJob, barrier: Any, folder: str) -> None:
    from transformers.utils import logging as hf_logging

    from executor.adapter import ModelAdapter
    from executor.ppsd import plan_stages

    hf_logging.disable_progress_bar()  # k processes loading at once: the parent's lines stay readable
    torch.set_num_threads(job.threads)
    loaded = load(job.model, check_dtype(job.dtype), torch.device("cpu"))
    adapter = ModelAdapter(loaded.model)
    plan = plan_stages(adapter.num_layers, job.stages, exit_layer=job.exit_layer)
    alone: dict[int, list[list[float]]] = {}
    together: dict[int, list[list[float]]] = {}
    with torch.inference_mode():
        for batch in job.batches:
            run = stage_pass(adapter, plan.bounds, rank, batch, job.context_len)
            for _ in range(job.warmup):
                run()
            barrier.wait()  # every process holds its model and has warmed up this pass
            for _ in range(job.rounds):
                alone.setdefault(batch, []).append(
                    _ticks(run, barrier, job.repeats, [r == rank for r in range(job.stages)])
                )
                together.setdefault(batch, []).append(_ticks(run, barrier, job.repeats, [True]))
    samples = StageSamples((plan.bounds[rank], plan.bounds[rank + 1]), alone, together)
    _write_atomic(Path(folder) / f"rank{rank}.pt", samples)


def _ticks(run: Callable[[], object], barrier: Any, repeats: int, turns: Sequence[bool]) -> list[float]:
    """`repeats` ticks for each entry of `turns`, each starting at the barrier; the µs of this process's passes in
    the ticks where its turn is True (it waits idle at the next barrier in the others)."""
    samples = []
    for computes in turns:
        for _ in range(repeats):
            barrier.wait()
            if computes:
                begin = time.perf_counter()
                run()
                samples.append((time.perf_counter() - begin) * 1e6)
    return samples


def _write_atomic(path: Path, samples: StageSamples) -> None:
    temp = path.with_suffix(".tmp")
    torch.save(samples.__dict__, temp)
    os.replace(temp, path)


def measure_processes(job: StageJob) -> list[StageSamples]:
    """Every process's samples for `job` (`job.stages` processes)."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    barrier = context.Barrier(job.stages)
    with tempfile.TemporaryDirectory() as folder:
        workers = [context.Process(target=_worker, args=(rank, job, barrier, folder)) for rank in range(job.stages)]
        for worker in workers:
            worker.start()
        _join(workers, barrier)
        _raise_failure(workers, Path(folder))
        return [StageSamples(**torch.load(Path(folder) / f"rank{rank}.pt")) for rank in range(job.stages)]


def _join(workers: Sequence[Any], barrier: Any) -> None:
    """Wait for every process; once one has failed, break the barrier so that the others stop waiting for it."""
    while any(w.is_alive() for w in workers):
        for worker in workers:
            worker.join(timeout=0.2)
        if any(w.exitcode not in (None, 0) for w in workers):
            barrier.abort()


def _raise_failure(workers: Sequence[Any], folder: Path) -> None:
    """The first failed process's error, as a ValueError where it was a user's mistake (a model that does not load),
    else a RuntimeError; nothing if every process ended well."""
    for rank in range(len(workers)):
        report = folder / f"rank{rank}.err"
        if report.is_file():
            kind, _, message = report.read_text(encoding="utf-8").partition("\n")
            where = f"stage process {rank + 1} of {len(workers)}"
            if kind == "user":
                raise ValueError(f"{where}: {message}")
            raise RuntimeError(f"{where}: {kind}: {message}")
    codes = [w.exitcode for w in workers]
    if any(code != 0 for code in codes):
        raise RuntimeError(f"stage processes ended with exit codes {codes} (a process killed, or out of memory?)")


def contention_row(samples: Sequence[StageSamples], batch: int) -> ContentionRecord:
    """The row of k = len(samples) processes at `batch`: each pass's median alone (over all its rounds), their sum
    and longest, and the ticks together, a tick lasting its slowest pass (median, p10, p90)."""
    alone = alone_medians_us(samples, batch)
    ticks = sorted(max(passes) for s_round in zip(*(s.together[batch] for s in samples), strict=True)
                   for passes in zip(*s_round, strict=True))  # fmt: skip
    middle, low, high = (percentile(ticks, q) for q in (0.5, 0.1, 0.9))
    return ContentionRecord(len(samples), sum(alone), max(alone), middle, low, high, batch)


def measure_contention(
    model: str,
    dtype: str,
    processes: Sequence[int],
    batches: Sequence[int] = (1,),
    exit_layer: int | None = None,
    context_len: int = 128,
    threads: int = 1,
    repeats: int = 20,
    rounds: int = 5,
    report: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[ContentionRecord]]:
    """(metadata, rows) of a `processes` contention profile: a measurement of k stage processes for each k, a row
    for each (k, batch)."""
    rows, layouts = [], {}
    cores = os.cpu_count() or 1
    for k in processes:
        if k * threads > cores:
            report(f"note: k={k} processes of {threads} thread(s) need {k * threads} cores and this host has {cores}: "
                   "that row times them taking turns on the cores, not only sharing the memory")  # fmt: skip
        begin = time.perf_counter()
        job = StageJob(model, dtype, k, exit_layer, tuple(batches), context_len, threads, repeats, rounds)
        samples = measure_processes(job)
        layouts[str(k)] = [list(s.layers) for s in samples]
        for batch in batches:
            row = contention_row(samples, batch)
            rows.append(row)
            alone_ms = [round(us / 1e3, 2) for us in alone_medians_us(samples, batch)]
            report(f"k={k} batch {batch}: stages {layouts[str(k)]}, alone {alone_ms} ms, together "
                   f"{row.median_us / 1e3:.2f} ms a tick")  # fmt: skip
        report(f"k={k}: {time.perf_counter() - begin:.0f} s")
    own = torch.get_num_threads()
    torch.set_num_threads(threads)  # the device's name says the torch threads each process ran
    measured_on = base_metadata(model, torch.device("cpu"), check_dtype(dtype))
    torch.set_num_threads(own)
    metadata = {
        **measured_on,
        "backend": "processes",
        "stage_layers": layouts,
        "exit_layer": exit_layer,
        "context_len": context_len,
        "threads_per_process": threads,
        "cores": cores,
        "repeats": repeats,
        "rounds": rounds,
        "method": "lockstep ticks at a barrier: alone in turn vs all together, alternating rounds; a tick's time is "
        "its slowest pass",
    }
    metadata.pop("device_type")
    return metadata, rows


def alone_medians_us(samples: Sequence[StageSamples], batch: int) -> list[float]:
    """Each process's median pass alone at `batch`, over all its rounds, µs."""
    return [percentile(sorted(t for r in s.alone[batch] for t in r), 0.5) for s in samples]
