"""Timing one callable: warm-up, then one sample per repeat, in µs.

- CPU: `time.perf_counter` around each call (the work is synchronous).
- CUDA, eager: a pair of CUDA events around each call on the current stream. When the host cannot launch kernels as
  fast as the GPU runs them (small models, eager PyTorch), the events are recorded that much further apart, so the
  sample is the time the stream was busy *including* launch gaps: what a decoder running eagerly sees.
- CUDA, graphs: the callable is captured once into a `torch.cuda.CUDAGraph` exactly as the executor captures its
  passes (`executor.passes.capture_graph`: warm-up on a side stream, then capture) and each sample is one `replay()`
  between two events.
- Host work (`host=True`, e.g. sampling + `.tolist()`): wall time between two device synchronisations.

On the CPU, `before` (untimed) runs before every call, warm-up included: what a real pass runs ahead of the timed
work, so that the caches hold what they would hold then (`calibrate.latency`: the LM head after the layers).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from calibrate.common import percentile
from executor.passes import capture_graph


@dataclass(frozen=True)
class Summary:
    median_us: float
    p10_us: float
    p90_us: float

    @classmethod
    def of(cls, samples_us: list[float]) -> Summary:
        values = sorted(samples_us)
        return cls(percentile(values, 0.5), percentile(values, 0.1), percentile(values, 0.9))


@dataclass(frozen=True)
class TimerSpec:
    device: torch.device
    warmup: int
    repeats: int

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"need --warmup >= 0 and --repeats >= 1, got {self.warmup} and {self.repeats}")


def time_call(
    fn: Callable[[], object],
    spec: TimerSpec,
    cuda_graphs: bool,
    host: bool = False,
    before: Callable[[], object] | None = None,
) -> Summary:
    """Median and p10/p90 of `fn`'s time over `spec.repeats` calls after `spec.warmup` calls (see module docstring;
    `before`, untimed before each call, on the CPU only)."""
    if spec.device.type != "cuda" or host:
        return Summary.of(_wall_samples(fn, spec, before if spec.device.type != "cuda" else None))
    if cuda_graphs:
        return Summary.of(_graph_samples(fn, spec))
    return Summary.of(_event_samples(fn, spec))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_samples(fn: Callable[[], object], spec: TimerSpec, before: Callable[[], object] | None = None) -> list[float]:
    for _ in range(spec.warmup):
        if before is not None:
            before()
        fn()
    samples = []
    for _ in range(spec.repeats):
        if before is not None:
            before()
        _sync(spec.device)
        begin = time.perf_counter()
        fn()
        _sync(spec.device)
        samples.append((time.perf_counter() - begin) * 1e6)
    return samples


def _event_samples(fn: Callable[[], object], spec: TimerSpec) -> list[float]:
    for _ in range(spec.warmup):
        fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(spec.repeats)]
    torch.cuda.synchronize(spec.device)
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(spec.device)
    return [start.elapsed_time(end) * 1e3 for start, end in pairs]  # elapsed_time is in ms


def _graph_samples(fn: Callable[[], object], spec: TimerSpec) -> list[float]:
    """Captured as the executor captures its passes (`executor.passes.capture_graph`), then replayed."""
    for _ in range(spec.warmup):
        fn()
    graph = capture_graph(fn)
    try:
        return _event_samples(graph.replay, spec)
    finally:
        del graph
