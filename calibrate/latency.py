"""`eesd calibrate latency`: device time per component × phase × q × context × batch, as a latency profile.

Each record of the profile (docs/formats.md) is one measurement of one component on the model's own modules, through
the executor's own code (`executor.adapter.decoder_layer`, `ModelAdapter.embed` / `.logits`, the KV cache):

- `embed`: the token embedding of [B, q] ids.
- `layer`: ONE decoder layer over [B, q, d] with `context_len` tokens already in its KV cache: the time of a pass
  over every loaded layer, divided by their number. Timing one layer over and over would keep its weights in the
  CPU caches or the GPU's L2 (a SmolLM2 layer is 9 MB), which a real forward never does: on the 2-core CPU box
  that under-stated the per-layer cost by about 15%. All layers share a shape; layers 0, L/2 and L-1 are also
  timed alone at one point (metadata `layer_spot_check`).
- `exit_head`: a trained exit head (one extra decoder layer + final norm + LM head), draft phase only; a shared exit
  head costs `lm_head`.
- `lm_head`: final norm + LM head over the q positions whose logits a pass needs (prefill: the last one, q = 1).
  On the CPU it (and `exit_head`) is timed after an untimed pass over the layers, as a real pass runs it: timed back
  to back, or after the exit head's own LM head, it finds its weights in a large last-level cache (an Intel Xeon box
  with 480 MB of it: SmolLM2's LM head at batch 1 took 5.4-6.4 ms so, 7.7 ms after the layers; a draft-phase profile
  entry timed after `exit_head` read 1.4-2.1 ms below the identical verify-phase one).
- `overhead`: per-pass host work of the executor: building the step's positions, rotary tables and attention mask,
  the argmax and its `.tolist()` (wall time between device synchronisations).

Phases, as the simulator queries them (sim/engine.py): `draft` at q = 1 over context × batch; `verify` at every q of
the grid (AR decode is verify with q = 1); `prefill` with q = prompt length at context 0 (`lm_head`/`overhead`: q = 1).

Kernels (`--kernels`): `eager` times each layer as `capture="graph"` runs it (the HF modules' own projections);
`compiled` as the GPU default `capture="compile-layers"` runs it: q/k/v and gate/up projections fused
(`executor.fusion`) and one `torch.compile` of the layer (`executor.adapter.compiled_layer`) for every static pass,
`layer` and `exit_head` alike. Prefill stays eager, as in the executor (a prompt's length varies). Each (q, context,
batch) shape compiles once (seconds), so a compiled profile wants a smaller grid (`COMPILED_GPU_GRID`).
`frozen` (CPU) as `capture="freeze"` runs a pass: the projections fused as for `compiled`, and `layer` (the pass
over every layer), `exit_head` and `lm_head` each compiled whole with the weights as constants
(`executor.passes.FREEZE_OPTIONS`: max-autotune may pick its CPU GEMM template, which packs the weights once and
reads them once per call whatever q). `embed`, `overhead` and prefill stay
eager: the frozen pass gathers its embedding rows in the graph (microseconds), and the executor never freezes a
prefill. A frozen (q, context, batch) shape compiles for about a minute on a 2-core CPU and holds a packed copy of the
weights it reads until its last use (`FrozenCalls`): every shape compiles once, later visits reuse it, and it is
released after the last point (of the last visit) that uses it; the grid is smaller (`FROZEN_CPU_GRID`), and the
frozen executor attends over
its whole cache (a scenario replaying the profile says `attention: cache`; its context axis is then the cache's
capacity).

Visits (`--visits N`, default 1): the whole grid is timed N times over, each visit `--repeats` samples per point after
`--warmup`; a point's median is the median of its visits' medians, its p10 / p90 the lowest p10 and highest p90 of
its visits. On a shared box whose speed drifts by tens of percent within seconds, a slow spell then lands on one visit
of many points (outvoted by their other visits) instead of on every sample of a few: one visit at a time, two points
that run the same work (a draft-phase and a verify-phase layer at q = 1) were seen to differ by 45% on the 2-core box.

Resumable: every finished measurement is appended to `<out>.partial.jsonl` (first line: the settings); a rerun with
the same settings continues from it; the profile is written atomically at the end and the partial file removed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from calibrate.common import LoadedModel, OtherWork, config_summary
from calibrate.timing import Summary, TimerSpec, time_call
from executor.adapter import ModelAdapter, Step, allow_recompiles, attention_mask, decoder_layer
from executor.fusion import fuse_projections
from executor.kv_cache import KVCache
from sim.formats import (
    LATENCY_PROFILE,
    LatencyRecord,
    check_record,
    latency_profile_name,
    write_latency_profile,
    write_text_atomic,
)
from sim.progress import progress_bar


@dataclass(frozen=True)
class Grid:
    q: tuple[int, ...]  # tokens per verify pass
    context_len: tuple[int, ...]  # tokens already cached (draft, verify)
    batch: tuple[int, ...]
    prefill_q: tuple[int, ...]  # prompt lengths


# every verify width q = k + 1 the default draft policies use (k <= 8) is measured, not interpolated: on a CPU the GEMM
# kernels change with the row count, so cost is not even monotonic in q (a 3-token pass measured slower than 4)
VERIFY_Q = tuple(range(1, 10))
GPU_GRID = Grid((*VERIFY_Q, 12, 16), (128, 512, 1024, 2048, 4096, 8192), (1, 2, 4, 8), (128, 512, 1024, 2048))
CPU_GRID = Grid(VERIFY_Q, (128, 512, 1024), (1, 2, 4), (64, 256))
# compiled kernels: one compilation per (q, context, batch) shape, 27 here instead of GPU_GRID's 264
COMPILED_GPU_GRID = Grid(VERIFY_Q, (128, 512, 2048), (1,), GPU_GRID.prefill_q)
# frozen passes: about a minute of compilation per shape on a 2-core CPU; the frozen executor's cache holds a multiple
# of 256 slots (`sim.contract.captured_capacity`) and every pass attends over all of them
FROZEN_CPU_GRID = Grid((1, 2, 3, 4, 5), (256, 512), (1,), CPU_GRID.prefill_q)
KERNELS = ("eager", "compiled", "frozen")
FROZEN_COMPONENTS = ("layer", "exit_head", "lm_head")  # the rest of a frozen profile is timed eager (docstring)


@dataclass(frozen=True)
class GridPoint:
    """One measurement of the latency grid: one record of the profile."""

    component: str
    phase: str
    q: int
    context_len: int
    batch: int
    cuda_graphs: bool

    @property
    def shape_key(self) -> tuple[str, int, int, int]:
        return (self.phase, self.q, self.context_len, self.batch)


@dataclass(frozen=True)
class LatencySettings:
    grid: Grid
    graph_modes: tuple[bool, ...]
    timer: TimerSpec
    kernels: str = "eager"  # one of KERNELS
    visits: int = 1  # times the whole grid is timed over (module docstring)

    def __post_init__(self) -> None:
        if isinstance(self.visits, bool) or not isinstance(self.visits, int) or self.visits < 1:
            raise ValueError(f"--visits must be an integer >= 1, got {self.visits!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"--kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.kernels == "compiled" and self.timer.device.type == "cuda" and self.graph_modes != (True,):
            raise ValueError("--kernels compiled: compiled layers run inside CUDA graphs on a GPU; use --graphs on")
        if self.kernels == "frozen" and self.timer.device.type != "cpu":
            raise ValueError(
                f"--kernels frozen: frozen passes are the CPU's (capture='freeze'); on {self.timer.device.type} use "
                "--kernels compiled or eager"
            )


def plan_points(grid: Grid, graph_modes: tuple[bool, ...]) -> list[GridPoint]:
    """Every record of a profile, grouped so consecutive points share their inputs."""
    points: list[GridPoint] = []
    for graphs in graph_modes:
        for batch in grid.batch:
            for context in grid.context_len:
                for component in ("embed", "layer", "exit_head", "lm_head", "overhead"):
                    points.append(GridPoint(component, "draft", 1, context, batch, graphs))
                for q in grid.q:
                    points += [GridPoint(c, "verify", q, context, batch, graphs) for c in ("embed", "layer", "lm_head")]
                points.append(GridPoint("overhead", "verify", 1, context, batch, graphs))
            for q in grid.prefill_q:
                points += [GridPoint(c, "prefill", q, 0, batch, graphs) for c in ("embed", "layer")]
            points += [GridPoint(c, "prefill", 1, 0, batch, graphs) for c in ("lm_head", "overhead")]
    return points


@dataclass(frozen=True)
class Inputs:
    """Tensors of one (phase, q, context, batch) point: ids, hidden states, step, rotary, masks, a 1-layer cache."""

    ids: torch.Tensor  # [B, q]
    hidden: torch.Tensor  # [B, q, d]
    step: Step
    rotary: tuple[torch.Tensor, torch.Tensor]
    masks: dict[int | None, torch.Tensor]
    cache: KVCache
    logits_1: torch.Tensor  # [B, 1, V], what the overhead's argmax reads


def make_inputs(adapter: ModelAdapter, q: int, context_len: int, batch: int) -> Inputs:
    device, dtype = adapter.device, adapter.dtype
    generator = torch.Generator(device="cpu").manual_seed(0)
    vocab = adapter.embed_tokens.num_embeddings
    ids = torch.randint(0, vocab, (batch, q), generator=generator).to(device)
    hidden = torch.randn(batch, q, adapter.config.hidden_size, generator=generator).to(device, dtype)
    positions = torch.arange(context_len, context_len + q, device=device).expand(batch, q)
    step = Step(positions=positions, starts=(context_len,) * batch)
    cache = KVCache(
        num_layers=1,
        batch=batch,
        num_kv_heads=adapter.num_kv_heads,
        max_len=context_len + q,
        head_dim=adapter.head_dim,
        dtype=dtype,
        device=device,
    )
    cache.lengths = [[context_len] * batch]  # the context is "already cached" (its values do not change the time)
    rotary = adapter.rotary(hidden, positions, adapter.rotary_kinds[0])
    masks = {window: attention_mask(step, window, dtype) for window in set(adapter.windows)}
    logits_1 = torch.randn(batch, 1, vocab, generator=generator).to(device, dtype)
    return Inputs(ids, hidden, step, rotary, masks, cache, logits_1)


def component_call(
    adapter: ModelAdapter,
    inputs: Inputs,
    component: str,
    layer: int | None = None,
    run: Callable[..., torch.Tensor] | None = None,
) -> Callable[[], object]:
    """The zero-argument callable whose time is the component's (see module docstring); for `layer`, a pass over all
    loaded layers unless one `layer` index is given; the layers run `run` (a compiled `layer_forward`) if given."""
    x = inputs

    def run_layer(index: int) -> torch.Tensor:
        mask = x.masks[adapter.windows[index]]
        return decoder_layer(adapter.layers[index], 0, x.hidden, x.step, x.cache, x.rotary, mask, run)

    def overhead() -> list[list[int]]:
        starts = x.step.starts
        positions = torch.tensor([list(range(s, s + x.step.q)) for s in starts], device=adapter.device)
        step = Step(positions=positions, starts=starts)
        adapter.rotary(x.hidden, positions, adapter.rotary_kinds[0])
        for window in x.masks:
            attention_mask(step, window, x.hidden.dtype)
        return x.logits_1.argmax(-1).tolist()

    calls: dict[str, Callable[[], object]] = {
        "embed": lambda: adapter.embed(x.ids),
        "layer": (lambda: [run_layer(i) for i in range(adapter.num_layers)])
        if layer is None
        else (lambda: run_layer(layer)),
        "exit_head": lambda: adapter.logits(run_layer(adapter.num_layers - 1)),
        "lm_head": lambda: adapter.logits(x.hidden),
        "overhead": overhead,
    }
    return calls[component]


class PartialResults:
    """The append-only `<profile>.partial.jsonl`: a settings line, then one JSON line per finished measurement.

    Every line is written whole with its newline, so an interruption can only cut the LAST line short (no newline
    after it). Loading drops such a line (its measurement is made again), says so, and rewrites the file atomically
    without it before anything is appended, so the file survives any number of interruptions. A broken line with a
    newline after it was not cut by an interruption: that is an error naming the line.
    """

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.records: dict[tuple[GridPoint, int], LatencyRecord] = {}  # by (point, visit)
        self.spot_check: list[dict[str, Any]] | None = None
        lines = _intact_lines(path) if path.exists() else []
        if lines:
            self._load(lines, settings)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, _json_line({"settings": settings}))

    def _load(self, lines: list[str], settings: dict[str, Any]) -> None:
        found = _parse_json_line(self.path, 1, lines[0]).get("settings")
        if found != settings:
            differing = sorted(k for k in set(settings) | set(found or {}) if (found or {}).get(k) != settings.get(k))
            raise ValueError(
                f"{self.path}: partial results were measured with other settings ({', '.join(differing)} differ); "
                "rerun with the same arguments to continue, or delete the file to start over"
            )
        for number, line in enumerate(lines[1:], start=2):
            entry = _parse_json_line(self.path, number, line)
            if "record" in entry:
                record = _record(self.path, number, entry["record"])
                self.records[(_point_of(record), _visit(self.path, number, entry))] = record
            elif "spot_check" in entry:
                self.spot_check = entry["spot_check"]

    def add(self, record: LatencyRecord, visit: int = 0) -> None:
        self._append({"record": asdict(record), **({"visit": visit} if visit else {})})
        self.records[(_point_of(record), visit)] = record

    def set_spot_check(self, spot_check: list[dict[str, Any]]) -> None:
        self._append({"spot_check": spot_check})
        self.spot_check = spot_check

    def _append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(_json_line(entry))
            handle.flush()
            os.fsync(handle.fileno())


def _json_line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True) + "\n"  # ASCII: a cut never splits a character


def _intact_lines(path: Path) -> list[str]:
    """The file's lines, its last one dropped (with a note) where an interruption cut it short; the file is then
    rewritten without it, atomically, so that the next append starts a line of its own."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if not tail:
        return [_decoded(path, number, line) for number, line in enumerate(lines, start=1)]
    print(
        f"{path}: its last line ({len(tail)} bytes, line {len(lines) + 1}) was cut short by an interruption; "
        "dropped, its measurement is made again",
        file=sys.stderr,
    )
    kept = [_decoded(path, number, line) for number, line in enumerate(lines, start=1)]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return kept


def _decoded(path: Path, number: int, line: bytes) -> str:
    try:
        return line.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{number}: not a JSON line (binary data); delete the file to start over") from None


def _record(path: Path, number: int, fields: Any) -> LatencyRecord:
    """A partial file's measurement, checked as the profile's reader will check it, so that a bad one is named here
    (its line in this file) rather than in a profile that is never written, after the rest of the grid."""
    try:
        record = LatencyRecord(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}:{number}: not a measurement ({err}); delete the file to start over") from None
    try:
        check_record(path, number, LATENCY_PROFILE, record)
    except ValueError as err:
        raise ValueError(f"{err}; delete the file to start over") from None
    return record


def _parse_json_line(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f"{path}:{number}: not a JSON line; delete the file to start over") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object; delete the file to start over")
    return entry


def _visit(path: Path, number: int, entry: dict[str, Any]) -> int:
    visit = entry.get("visit", 0)
    if isinstance(visit, bool) or not isinstance(visit, int) or visit < 0:
        raise ValueError(
            f"{path}:{number}: visit must be an integer >= 0, got {visit!r}; delete the file to start over"
        )
    return visit


def _point_of(record: LatencyRecord) -> GridPoint:
    return GridPoint(record.component, record.phase, record.q, record.context_len, record.batch, record.cuda_graphs)


class FrozenCalls:
    """The frozen compilations, by (component, layer index, q, context, batch): each compiled once and kept, so that a
    grid's later visits reuse its first visit's, until `release` (after its last use). A compilation is of a function
    of its own (`executor.passes.own_function`), as the executor's frozen passes are: Dynamo installs a compiled graph
    in the globals of the function it compiled, which its guards keep alive while the model's weights live, and
    Inductor's code cache holds the wrapper module carrying the packed constants, so a compilation of a shared function
    could never be freed (SmolLM2's LM head: 110 MB more per compilation, dropped or kept; a three-visit Gemma-3 profile
    that recompiled every shape on each visit ran the 24 GB box out of memory in its second visit). With one visit a
    profile holds one shape's compilations at a time; with several, every shape's until the last visit. Dynamo is
    never reset: a validation's probe compiles after the executor's frozen passes, which a reset would throw away."""

    def __init__(self) -> None:
        self.calls: dict[tuple, Callable[[], object]] = {}
        self._held: dict[tuple, tuple[dict, list]] = {}  # by key: what `release` frees

    @staticmethod
    def key(point: GridPoint, layer: int | None) -> tuple:
        return (point.component, layer, point.q, point.context_len, point.batch)

    @staticmethod
    def applies(point: GridPoint) -> bool:
        """Whether a frozen profile times this point frozen (its decode layers and heads; the rest eager)."""
        return point.phase != "prefill" and point.component in FROZEN_COMPONENTS

    def get(self, point: GridPoint, layer: int | None, fn: Callable[[], object]) -> Callable[[], object]:
        key = self.key(point, layer)
        if key not in self.calls:
            self.calls[key], self._held[key] = _freeze(fn)
        return self.calls[key]

    def release(self, key: tuple) -> None:
        """Drop one compilation whose last use is behind and free its packed constants now (the executor's own way,
        `executor.passes.release_compiled`), so that a profile holds one shape's at a time where each is used once."""
        from executor.passes import collect_released, release_compiled

        if self.calls.pop(key, None) is not None:
            release_compiled(*self._held.pop(key))
            collect_released()


def _freeze(fn: Callable[[], object]) -> tuple[Callable[[], object], tuple[dict, list]]:
    """`fn` compiled whole with the weights it reads frozen in, as `capture="freeze"` compiles a pass, and run once
    under the same options (the compilation: never timed). `fn` runs eagerly first, as the executor's prefill runs
    before its frozen passes compile: a Gemma-3-270m layer stack frozen before any eager call ran 2.1 ms a layer, after
    one 1.1 ms (our reading: max-autotune timed its kernel choices on weights not yet paged in)."""
    from torch._inductor import config as inductor_config

    from executor.passes import FREEZE_OPTIONS, loaded_modules, own_function

    fn()
    own = own_function(fn)  # compiled on its own, so that its compilation can be released (`FrozenCalls.release`)
    compiled = torch.compile(own, fullgraph=True, dynamic=False)
    with inductor_config.patch(FREEZE_OPTIONS):
        modules = loaded_modules(lambda: _compile(compiled, "frozen"))
    return compiled, (own.__globals__, modules)


def measure(
    adapter: ModelAdapter,
    point: GridPoint,
    inputs: Inputs,
    timer: TimerSpec,
    layer: int | None = None,
    frozen: FrozenCalls | None = None,
) -> Summary:
    """One point's time (`layer` given: that layer alone); with `frozen`, its frozen components compiled frozen."""
    run = adapter.layer_run if point.phase != "prefill" else None  # the executor never compiles a prefill
    fn = component_call(adapter, inputs, point.component, layer, run)
    with torch.inference_mode():
        if frozen is not None and frozen.applies(point):
            fn = frozen.get(point, layer, fn)
        elif run is not None and point.component in ("layer", "exit_head"):
            _compile(fn)  # this shape: never timed, never inside a graph capture
        before = None
        if point.component in ("lm_head", "exit_head"):  # after the layers, as in a pass (CPU; module docstring);
            # frozen too, after the eager layers: any pass over every layer's weights leaves the LM head out of cache
            before = component_call(adapter, inputs, "layer", None, run)
        summary = time_call(fn, timer, point.cuda_graphs, host=point.component == "overhead", before=before)
    if point.component == "layer" and layer is None:  # a pass over all layers: per-layer figures
        n = adapter.num_layers
        summary = Summary(summary.median_us / n, summary.p10_us / n, summary.p90_us / n)
    return summary


def _compile(fn: Callable[[], object], kernels: str = "compiled") -> None:
    """Run `fn` once to compile its shape; a compiler that fails here (no C++ compiler on a CPU, no Triton on a GPU)
    is the machine's, not a measurement: a one-line error naming the way out."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - torch.compile raises many types
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"--kernels {kernels}: torch.compile of the pass failed here ({type(err).__name__}: {first}); "
            "profile with --kernels eager"
        ) from err


def spot_check_layers(
    adapter: ModelAdapter, settings: LatencySettings, frozen: FrozenCalls | None = None
) -> list[dict[str, Any]]:
    """Layer 0, the middle and the last layer at one verify point: all layers should cost the same."""
    grid = settings.grid
    point = GridPoint("layer", "verify", grid.q[-1], grid.context_len[0], grid.batch[0], settings.graph_modes[0])
    inputs = make_inputs(adapter, point.q, point.context_len, point.batch)
    layers = sorted({0, adapter.num_layers // 2, adapter.num_layers - 1})
    checks = []
    for i in layers:
        checks.append({"layer": i, **asdict(point),
                       "median_us": measure(adapter, point, inputs, settings.timer, i, frozen).median_us})  # fmt: skip
        if frozen is not None:
            frozen.release(frozen.key(point, i))  # one layer's shape: timed once
    return checks


def run_points(
    adapter: ModelAdapter,
    points: list[GridPoint],
    partial: PartialResults,
    timer: TimerSpec,
    max_new_points: int | None,
    progress: bool,
    visits: int = 1,
    frozen: FrozenCalls | None = None,
) -> bool:
    """Measure the (point, visit) pairs not yet in `partial`, visit by visit; False when stopped by `max_new_points`."""
    every = [(point, visit) for visit in range(visits) for point in points]
    todo = [key for key in every if key not in partial.records]
    last_use = {} if frozen is None else {frozen.key(p, None): i for i, (p, _) in enumerate(todo) if frozen.applies(p)}
    bar = progress_bar(len(every), "latency", "pt", progress, initial=len(every) - len(todo))
    cached: tuple[tuple, Inputs] | None = None
    for count, (point, visit) in enumerate(todo):
        if max_new_points is not None and count >= max_new_points:
            bar.close()
            return False
        if cached is None or cached[0] != point.shape_key:
            cached = None  # free the previous point's cache first
            cached = (point.shape_key, make_inputs(adapter, point.q, point.context_len, point.batch))
        summary = measure(adapter, point, cached[1], timer, frozen=frozen)
        partial.add(LatencyRecord(**asdict(point), **asdict(summary)), visit)
        key = None if frozen is None else frozen.key(point, None)
        if key is not None and last_use.get(key) == count:
            frozen.release(key)  # no later point (or visit) uses this shape
        bar.update(1)
    bar.close()
    return True


def combined_records(
    records: dict[tuple[GridPoint, int], LatencyRecord], points: list[GridPoint], visits: int
) -> Iterator[LatencyRecord]:
    """One record per point: the median of its visits' medians, the lowest p10 and the highest p90."""
    for point in points:
        measured = [records[(point, visit)] for visit in range(visits)]
        median = statistics.median(r.median_us for r in measured)
        yield LatencyRecord(**asdict(point), median_us=median, p10_us=min(r.p10_us for r in measured),
                            p90_us=max(r.p90_us for r in measured))  # fmt: skip


def profile_path(out_dir: Path, model: str, device: torch.device, dtype_name: str, kernels: str = "eager") -> Path:
    from calibrate.common import slug

    return out_dir / latency_profile_name(slug(model), device.type, dtype_name, kernels)


def compiled_shapes(points: list[GridPoint]) -> int:
    """How many compilations a compiled profile makes: one per (q, context, batch) of its static points."""
    return len({(p.q, p.context_len, p.batch) for p in points if p.phase != "prefill" and p.component == "layer"})


def profiling_adapter(model: torch.nn.Module, settings: LatencySettings, points: list[GridPoint]) -> ModelAdapter:
    """The adapter whose layers are timed: as `capture="graph"` runs them, fused and compiled as
    `capture="compile-layers"` does (the fusion makes the weights views of one matrix, no extra memory), or fused as
    `capture="freeze"` runs them (its passes compiled frozen by `FrozenCalls`)."""
    adapter = ModelAdapter(model)
    if settings.kernels == "eager":
        return adapter
    fuse_projections(adapter.layers)  # captured passes, frozen ones too, run fused (`executor.passes.FUSE_CAPTURED`)
    if settings.kernels == "frozen":  # the model's own layers, compiled whole (`FrozenCalls`)
        allow_recompiles()
        return adapter
    allow_recompiles(compiled_shapes(points) + 8)  # + the spot check's shape and a trained head's
    return adapter.compiled()


def calibrate_latency(
    loaded: LoadedModel,
    settings: LatencySettings,
    out_path: Path,
    metadata: dict[str, Any],
    max_new_points: int | None = None,
    progress: bool = True,
) -> Path | None:
    """Measure (or continue measuring) a profile; write it to `out_path`. None when stopped by `max_new_points`."""
    points = plan_points(settings.grid, settings.graph_modes)
    adapter = profiling_adapter(loaded.model, settings, points)
    fingerprint = {
        "model": loaded.name,
        "device": metadata["device"],
        "dtype": metadata["dtype"],
        "grid": asdict(settings.grid),
        "graph_modes": list(settings.graph_modes),
        "kernels": settings.kernels,
        "warmup": settings.timer.warmup,
        "repeats": settings.timer.repeats,
        "layers": adapter.num_layers,
        **({"visits": settings.visits} if settings.visits > 1 else {}),  # partial files of one visit stay valid
    }
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as read back from the file
    partial = PartialResults(out_path.with_name(out_path.name + ".partial.jsonl"), fingerprint)
    frozen = FrozenCalls() if settings.kernels == "frozen" else None
    if partial.spot_check is None:
        partial.set_spot_check(spot_check_layers(adapter, settings, frozen))
    with OtherWork() as other:
        finished = run_points(adapter, points, partial, settings.timer, max_new_points, progress, settings.visits,
                              frozen)  # fmt: skip
    if not finished:
        return None
    full = {
        **metadata,
        "model_config": config_summary(loaded.model.config),
        "random_weights": loaded.random_weights,
        "layers_profiled": adapter.num_layers,
        "total_layers": loaded.total_layers,
        "cuda_graphs": list(settings.graph_modes),
        "kernels": settings.kernels,
        "grid": asdict(settings.grid),
        "warmup": settings.timer.warmup,
        "repeats": settings.timer.repeats,
        "visits": settings.visits,
        "timer": "cuda events" if settings.timer.device.type == "cuda" else "time.perf_counter",
        "layer_spot_check": partial.spot_check,
        # cores' worth of other work on the machine while this run measured (its last session's, resumed)
        **({"other_work_cores": round(other.cores, 2)} if other.cores is not None else {}),
    }
    write_latency_profile(out_path, full, combined_records(partial.records, points, settings.visits))
    partial.path.unlink()
    return out_path
