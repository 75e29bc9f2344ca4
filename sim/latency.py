"""Latency models: the device time of one component of a forward pass, in µs.

Components (`sim.formats.COMPONENTS`): `embed`, `layer` (ONE decoder layer), `exit_head` (a trained head: one extra
decoder layer + shared LM head), `lm_head` (final norm + LM head; also the shared exit head's cost) and `overhead`
(per-pass host work: graph launch, sampling, sync). Phases: `draft`, `verify` (AR decode is verify with q = 1),
`prefill`. A query gives q (tokens per sequence in the pass), context_len (tokens already cached) and batch.

Three models: `ConstantLatency` (for tests), `RooflineLatency` (GPU spec + model shape, no measurements needed) and
`ProfileLatency` (a calibration profile, interpolated; queries outside the grid are extrapolated and flagged); and
`ScaledLatency`, another model's times scaled by phase and batch (a validation's diagnostic).
Tensor-parallel communication is not part of a component; `sim.cost` adds it per stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sim.formats import COMPONENTS, DataFile, LatencyRecord
from sim.hardware import GPUSpec, LinkSpec
from sim.host_work import HostOverhead
from sim.interpolate import along, bracket, span_text
from sim.models import ModelConfig

KERNELS_PER_LAYER = 9  # norm, qkv, rope, attention, o_proj, norm, gate_up, act*mul, down


class LatencyModel(Protocol):
    # captured passes: the host's `overhead` is paid only where it reads the device (sim.cost.stage_time_us)
    cuda_graphs: bool

    def time_us(self, component: str, phase: str, q: int, context_len: int, batch: int) -> float: ...

    @property
    def extrapolated(self) -> bool: ...


def frozen_profile(profile: DataFile) -> bool:
    """Whether a latency profile timed frozen passes (metadata `kernels` "frozen": the executor's CPU
    `capture="freeze"`, each pass compiled with the weights as constants): static passes over a cache of a captured
    capacity, attending over all of it, with the host's work paid on every pass as uncaptured."""
    return profile.metadata.get("kernels") == "frozen"


def static_capacity(latency: LatencyModel) -> bool:
    """Whether the executor that `latency` describes builds its cache at a captured capacity
    (`sim.contract.captured_capacity`): captured passes (CUDA graphs) and frozen ones."""
    return latency.cuda_graphs or bool(getattr(latency, "frozen", False))


@dataclass(frozen=True)
class ConstantLatency:
    """Fixed µs per component, independent of phase, q, context and batch."""

    component_us: Mapping[str, float]
    cuda_graphs: bool = False  # every pass pays `overhead`

    def __post_init__(self) -> None:
        for name, value in self.component_us.items():
            if name not in COMPONENTS or value < 0:
                raise ValueError(f"constant latency {name}={value}: components {COMPONENTS}, values >= 0")

    def time_us(self, component: str, phase: str, q: int, context_len: int, batch: int) -> float:
        return float(self.component_us.get(component, 0.0))

    @property
    def extrapolated(self) -> bool:
        return False


@dataclass(frozen=True)
class RooflineLatency:
    """max(bytes / (HBM bandwidth · efficiency), FLOPs / (peak · efficiency)), floored by the kernel minimum.

    Per decoder layer: weights (layer_params · dtype_bytes / tp) plus the KV cache read for the context, and
    2·params·q·batch + 4·q·context·hidden·batch FLOPs, all divided over `tp` ranks. Without CUDA graphs a layer costs
    at least `eager_layer_us` of host time (an eager layer is bound by its kernel launches, whatever its size). The
    defaults `bandwidth_efficiency` and `eager_layer_us` are fitted to measured layers (docs/design.md, measured
    anchors): the efficiency is a 7B layer's weight traffic at the datasheet bandwidth over its time under CUDA graphs.
    """

    gpu: GPUSpec
    model: ModelConfig
    dtype_bytes: int = 2
    tp: int = 1
    cuda_graphs: bool = True
    bandwidth_efficiency: float = 0.61
    flops_efficiency: float = 0.6
    eager_layer_us: float = 560.0
    overhead_us: float = 20.0  # per pass: graph launch + sampling + host sync (assumed)
    dtype: str = "bf16"  # which of the GPU's peaks bounds the FLOPs
    kv_dtype_bytes: int | None = None  # the K/V cache's bytes per value where not the weights' (narrow drafts)

    def time_us(self, component: str, phase: str, q: int, context_len: int, batch: int) -> float:
        if component == "layer":
            return self._layer_us(q, context_len, batch)
        if component == "lm_head":
            return self._gemm_us(self.model.lm_head_params, q * batch, kernels=3)
        if component == "exit_head":
            return self._layer_us(q, context_len, batch) + self._gemm_us(self.model.lm_head_params, q * batch, 3)
        if component == "embed":
            return self.gpu.kernel_floor_us
        if component == "overhead":
            return self.overhead_us
        raise ValueError(f"unknown component {component!r}; known: {COMPONENTS}")

    @property
    def extrapolated(self) -> bool:
        return False

    def _layer_us(self, q: int, context_len: int, batch: int) -> float:
        m = self.model
        kv_bytes = batch * (context_len + q) * m.kv_bytes_per_token(self.kv_dtype_bytes or self.dtype_bytes)
        attention_flops = 4 * batch * q * (context_len + q) * m.hidden_size
        device_us = self._roofline_us(
            m.layer_params * self.dtype_bytes + kv_bytes, 2 * m.layer_params * q * batch + attention_flops
        )
        device_us = max(device_us, KERNELS_PER_LAYER * self.gpu.kernel_floor_us)
        return device_us if self.cuda_graphs else max(device_us, self.eager_layer_us)

    def _gemm_us(self, params: int, tokens: int, kernels: int) -> float:
        device_us = self._roofline_us(params * self.dtype_bytes, 2 * params * tokens)
        return max(device_us, kernels * self.gpu.kernel_floor_us)

    def _roofline_us(self, nbytes: float, flops: float) -> float:
        memory_us = nbytes / self.tp / (self.gpu.hbm_bandwidth_GBps * 1e3 * self.bandwidth_efficiency)
        compute_us = flops / self.tp / (self.gpu.tflops(self.dtype) * 1e6 * self.flops_efficiency)
        return max(memory_us, compute_us)


@dataclass
class ProfileLatency:
    """A latency profile (`sim.formats`), multilinear interpolation over (q, context_len, batch).

    A `draft` row and a `verify` row of one component at the same (q, context_len, batch) time the same work (a draft
    step's layers and LM head are an AR step's, over fewer layers): both are read as their mean (`pooled_rows`), so
    that one noisy measurement does not set the draft/verify cost ratio a speedup hangs on.

    Outside the profiled grid the edge segment is extrapolated linearly (clamped at 0; an edge segment whose time
    falls with size, as a noisy or kernel-switching profile can have, is held flat at its edge: a pass never gets
    cheaper for being larger than any profiled) and `extrapolated` becomes True, so results can flag it. A component
    missing from a phase falls back to the `verify` then `draft` phase;
    `embed`, `overhead` and `exit_head` may be absent (0 µs; a trained exit head then needs `exit_head`). With
    `overhead_us` the host's `overhead` is that constant instead of the profile's rows; with `host`, a decode pass's
    is that method's measured host work at the pass's batch size (`sim.host_work`; prefill keeps the rows).
    """

    profile: DataFile
    cuda_graphs: bool = True
    overhead_us: float | None = None  # the host's `overhead` in place of the profile's rows (every phase and shape)
    host: HostOverhead | None = None  # a method's measured host work, for its decode passes
    extrapolated: bool = False
    frozen: bool = field(default=False, init=False)  # `frozen_profile`
    # (phase, axis, past the top?) -> (profiled low, profiled high, furthest asked): what was extrapolated
    beyond: dict[tuple[str, int, bool], tuple[int, int, int]] = field(default_factory=dict, repr=False)
    _grids: dict[tuple[str, str], _Grid] = field(default_factory=dict, repr=False)
    _cache: dict[tuple, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        groups: dict[tuple[str, str], list[LatencyRecord]] = {}
        for record in pooled_rows([r for r in self.profile.records if r.cuda_graphs == self.cuda_graphs]):
            groups.setdefault((record.component, record.phase), []).append(record)
        source = self.profile.path or "latency profile"
        self._grids = {key: _Grid.build(source, key, rows) for key, rows in groups.items()}
        self.frozen = frozen_profile(self.profile)
        for required in ("layer", "lm_head"):
            if not any(component == required for component, _ in self._grids):
                raise ValueError(
                    f"{source}: no {required!r} rows with cuda_graphs={int(self.cuda_graphs)} (the scenario's "
                    f"latency.profile.cuda_graphs); it has {_row_kinds(self.profile.records)}"
                )

    def has(self, component: str) -> bool:
        return any(c == component for c, _ in self._grids)

    @property
    def batches(self) -> tuple[int, ...]:
        """The batch sizes the profile's decode layer rows hold (the axis a batch size is interpolated along)."""
        return self._layer_grid().axes[2]

    def _layer_grid(self) -> _Grid:
        """The decode layer rows' grid (verify's, else another phase's)."""
        return self._grids.get(("layer", "verify")) or self._grids[next(k for k in self._grids if k[0] == "layer")]

    def batch_edge_falls(self, top: bool) -> bool:
        """Whether the edge segment of the batch axis past which a batch lies (`top`: its largest two sizes, else
        its smallest two) falls, a decode layer pass at its first q and context costing less at the larger size: a
        batch past it is then held at the edge's cost (`_Grid.at`)."""
        grid = self._layer_grid()
        (q, *_), (context, *_), batches = grid.axes
        if len(batches) < 2:
            return False
        lo, hi = (batches[-2], batches[-1]) if top else (batches[0], batches[1])
        return grid.values[(q, context, hi)] < grid.values[(q, context, lo)]

    def time_us(self, component: str, phase: str, q: int, context_len: int, batch: int) -> float:
        if component == "overhead" and self.overhead_us is not None:
            return self.overhead_us
        if component == "overhead" and self.host is not None and phase != "prefill":
            return self.host.at(batch)  # outside its batch sizes: a note of its own (`sim.runner.plan_notes`)
        key = (component, phase, q, context_len, batch)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        grid = next(
            (self._grids[(component, p)] for p in (phase, "verify", "draft") if (component, p) in self._grids), None
        )
        value = 0.0
        if grid is not None:
            value, outside = grid.at((q, context_len, batch))
            self.extrapolated = self.extrapolated or outside
            if outside:
                self._beyond(phase, grid.axes, (q, context_len, batch))
        self._cache[key] = value
        return value

    def _beyond(self, phase: str, axes: Sequence[Sequence[int]], point: tuple[int, int, int]) -> None:
        for axis, (xs, x) in enumerate(zip(axes, point, strict=True)):
            if xs[0] <= x <= xs[-1]:
                continue
            key = (phase, axis, x > xs[-1])
            far = self.beyond.get(key, (xs[0], xs[-1], x))[2]
            self.beyond[key] = (xs[0], xs[-1], max(far, x) if x > xs[-1] else min(far, x))

    def extrapolations(self) -> tuple[str, ...]:
        """What was asked outside the profiled grid, a phrase per phase and axis: e.g. "verify q 9 (profiled
        1-4)", "prefill tokens 16 (profiled 32-256)"."""
        return tuple(describe_beyond(phase, axis, *span) for (phase, axis, _), span in sorted(self.beyond.items()))


AXES = ("q", "context", "batch")  # a latency grid's axes, in its points' order


def describe_beyond(phase: str, axis: int, low: int, high: int, far: int) -> str:
    """One extrapolation, as `ProfileLatency.extrapolations` phrases it (a prefill's q is its prompt's tokens)."""
    name = "tokens" if phase == "prefill" and axis == 0 else AXES[axis]
    return f"{phase} {name} {far} (profiled {span_text(low, high)})"


POOLED_PHASES = ("draft", "verify")  # phases whose rows at one (component, q, context, batch) time the same work
POOLED_COMPONENTS = ("layer", "lm_head")  # the device work a draft/verify cost ratio is made of


def pooled_rows(records: Sequence[LatencyRecord]) -> list[LatencyRecord]:
    """The rows with each `draft` / `verify` pair of one component at one (q, context_len, batch) read as their mean:
    two measurements of the same work (a shared box drifts by several percent between them: SmolLM2's eager CPU
    profile timed its draft-phase layer 5.2% under the verify-phase one at context 128, which priced a draft step
    5.7% under what it costs in a decode, against the AR step)."""

    def work(r: LatencyRecord) -> tuple | None:
        """The work a row times, where it is one of a pooled pair's; None otherwise."""
        if r.phase not in POOLED_PHASES or r.component not in POOLED_COMPONENTS:
            return None
        return (r.component, r.q, r.context_len, r.batch, r.cuda_graphs)

    pairs: dict[tuple, list[float]] = {}
    for r in records:
        if (key := work(r)) is not None:
            pairs.setdefault(key, []).append(r.median_us)
    pooled = []
    for r in records:
        key = work(r)
        times = pairs.get(key) if key is not None else None
        pooled.append(dataclasses.replace(r, median_us=sum(times) / len(times)) if times and len(times) > 1 else r)
    return pooled


@dataclass(frozen=True)
class ScaledLatency:
    """Another latency model's times multiplied: a prefill's by `prefill`, a draft or verify pass's by `decode[batch]`
    (`decode_default` for a batch without a factor of its own). What a run's own measurements say of the profile it
    is compared with (a shared box running slower than when it was profiled, or a batch size the profile gets wrong),
    applied to that profile: a diagnostic that keeps the box's speed apart from the model's error, not a calibration."""

    inner: LatencyModel
    decode: Mapping[int, float] = field(default_factory=dict)
    prefill: float = 1.0
    decode_default: float = 1.0

    @property
    def cuda_graphs(self) -> bool:
        return self.inner.cuda_graphs

    @property
    def frozen(self) -> bool:
        return bool(getattr(self.inner, "frozen", False))

    @property
    def extrapolated(self) -> bool:
        return self.inner.extrapolated

    def extrapolations(self) -> tuple[str, ...]:
        return extrapolations_of(self.inner)

    def time_us(self, component: str, phase: str, q: int, context_len: int, batch: int) -> float:
        factor = self.prefill if phase == "prefill" else self.decode.get(batch, self.decode_default)
        return factor * self.inner.time_us(component, phase, q, context_len, batch)


@dataclass(frozen=True)
class _Grid:
    axes: tuple[tuple[int, ...], ...]
    values: Mapping[tuple[int, int, int], float]

    @staticmethod
    def build(source: str, key: tuple[str, str], rows: Sequence[LatencyRecord]) -> _Grid:
        """The rows of one (component, phase): every (q, context_len, batch) of the axes they span must be there."""
        values = {(r.q, r.context_len, r.batch): r.median_us for r in rows}
        axes = tuple(tuple(sorted({point[i] for point in values})) for i in range(3))
        size = len(axes[0]) * len(axes[1]) * len(axes[2])
        if size != len(values):
            missing = next((q, c, b) for q in axes[0] for c in axes[1] for b in axes[2] if (q, c, b) not in values)
            raise ValueError(
                f"{source}: rows of component {key[0]!r}, phase {key[1]!r}: the grid over (q, context_len, batch) "
                f"is incomplete: it lacks {size - len(values)} of its {size} points, e.g. q={missing[0]}, "
                f"context_len={missing[1]}, batch={missing[2]} (interpolation needs every point the rows span)"
            )
        return _Grid(axes, values)

    def at(self, point: tuple[int, int, int]) -> tuple[float, bool]:
        brackets = [bracket(xs, x) for xs, x in zip(self.axes, point, strict=True)]
        outside = any(b[3] for b in brackets)

        def corner(dim: int, chosen: tuple[int, ...]) -> float:
            if dim == 3:
                return self.values[chosen]  # type: ignore[index]
            lo, hi, weight, _ = brackets[dim]
            low = corner(dim + 1, (*chosen, lo))
            return low if hi == lo else along(low, corner(dim + 1, (*chosen, hi)), weight)

        return max(0.0, corner(0, ())), outside


def extrapolations_of(latency: Any) -> tuple[str, ...]:
    """A latency model's `extrapolations` (none for a model of no grid: a roofline, a constant)."""
    described = getattr(latency, "extrapolations", None)
    return described() if callable(described) else ()


def _row_kinds(records: Sequence[LatencyRecord]) -> list[str]:
    kinds = {(r.component, r.cuda_graphs) for r in records}
    return [f"{component} (cuda_graphs={int(graphs)})" for component, graphs in sorted(kinds)]


SMALL_MESSAGE_BYTES = 4096  # a message this small costs a link its latency: smaller ones cost no less


@dataclass
class ProfiledLink:
    """A link from a link profile: linear in nbytes between points, edge slope outside (flagged; flat past an edge
    segment that falls). A message smaller than a smallest size of at most `SMALL_MESSAGE_BYTES` costs that size's
    time, unflagged: both are latency-bound (PPSD's token ids and verdicts, a few bytes a row, are smaller than many
    profiles' first size). A size costs its `mean_us` where the profile has it, else its `median_us`."""

    profile: DataFile
    name: str = "profiled"
    extrapolated: bool = False
    _beyond: set[int] = field(default_factory=set, repr=False)  # the sizes asked outside the profile

    def __post_init__(self) -> None:
        # a message's price: its mean where measured (a heavy tail costs a long run its mean), else its median
        points = sorted((r.nbytes, r.median_us if r.mean_us is None else r.mean_us) for r in self.profile.records)
        if not points:
            raise ValueError(f"{self.profile.path or 'link profile'}: no rows")
        self._sizes = [n for n, _ in points]
        self._times = [t for _, t in points]

    def time_us(self, nbytes: int) -> float:
        xs, ys = self._sizes, self._times
        if nbytes <= xs[0] <= SMALL_MESSAGE_BYTES:
            return ys[0]
        if len(xs) == 1:
            self._flag(nbytes, nbytes != xs[0])
            return ys[0]
        lo, hi, weight, outside = bracket(xs, nbytes)
        self._flag(nbytes, outside)
        return max(0.0, along(ys[xs.index(lo)], ys[xs.index(hi)], weight))

    def _flag(self, nbytes: int, outside: bool) -> None:
        if outside:
            self.extrapolated = True
            self._beyond.add(nbytes)

    def extrapolations(self) -> tuple[str, ...]:
        """The message sizes asked outside the profile, one phrase: e.g. "link 33554432 B (profiled 8-16777216 B)"."""
        if not self._beyond:
            return ()
        asked, profiled = span_text(min(self._beyond), max(self._beyond)), span_text(self._sizes[0], self._sizes[-1])
        return (f"link {asked} B (profiled {profiled} B)",)


LinkModel = LinkSpec | ProfiledLink
