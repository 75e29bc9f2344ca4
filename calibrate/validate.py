"""Does the simulator predict what the executor measures on this machine? (`eesd validate`)

A scenario whose latencies come from a measured profile (`latency.profile`) and whose acceptance is a replayed trace
(`acceptance.trace`) can be checked against the executor: for every configuration the scenario sweeps (method, exit
layer, draft policy, batch size; PPSD's backend and stage count), plus AR at each batch size, the executor generates
from the same prompts the trace replays (simulated request r replays the r-th prompt of the trace in sorted id order,
cyclically, so the executor runs that prompt for request r, in static batches of `workload.batch_size` as the
simulator runs them), with the model, dtype and device the calibration files were measured with, and the simulator
runs the same point with the same number of requests and tokens. PPSD runs on the scenario's `ppsd_backend`:
`sequential` (one process, the stages in turn), `distributed` (a process per stage; on a CPU over gloo, the link a
gloo link profile) or `streams` (one GPU), cut where the simulator cuts the layers. A draft policy that takes a cost
(beta-ts) gets the simulated one pinned in its spec on both sides, and the simulator seeds each row's policy as the
executor does, so a replay draws what the run drew.

Both sides count decode only: tokens/s = (new tokens - prompts) / (wall time - prefill time) summed over the batches;
tokens/round = decode tokens / verify rounds (AR: 1; EESD: per row; PPSD: per tick, the executor's unit), which a
trace replay reproduces exactly. Relative error = (predicted - measured) / measured; a point passes when both errors
are within the tolerance. Noise is kept apart from error: the executor runs each configuration `repeats` times,
interleaved (every configuration once, forward, then backward, ...), and the comparison takes the median tokens/s and
reports the run-to-run spread, (max - min) / median; a point whose spread exceeds the tolerance is flagged (its error
cannot be told from the machine's noise). Beside each run (uncaptured or frozen profiles) a probe times the profile's
one-token layer point again: over the profile's value, the slowdown of that run's conditions. Each run's tokens/s
times its slowdown is what it would have been at the profile's conditions; the median of those against the
prediction is the `error now` (the drift since the profile was measured left out, every component assumed to slow
alike), and their spread says how much of the run-to-run spread the probe explains. Planning (`plan`) and the
comparison are torch-free; `measure` imports torch and the executor. Every scenario problem is a `ValueError` naming
the file, the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.cli import load_batch_points
from sim.contract import is_captured
from sim.formats import (
    DataFile,
    quote,
    read_acceptance_trace,
    read_latency_profile,
    read_link_profile,
    trace_exit_head,
    trace_head,
    write_text_atomic,
)
from sim.models import named_model
from sim.plan import build_plan, exit_layer_of
from sim.policy import make_policy, with_cost
from sim.runner import point_notes, simulate_point
from sim.scenario import LinkConfig, Point, StageConfig, claimed_dtype, narrow_draft_dtype
from sim.scenario import validate as validate_scenario

# the scenario fields the executor varies between points; every other field must be the same at every point
VARIED_FIELDS = (
    "method",
    "exit_layer",
    "policy",
    "draft_dtype",
    "verify_buckets",
    "ppsd_backend",
    "topology.stages",
    "workload.batch_size",
)
LINK_BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # the distributed backend's messages on each device type
SCENARIO_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
POINT_CHOICES = "all | quick | point indices and ranges, e.g. 0,3,5-9 (the `point` column of `eesd simulate`)"


@dataclass(frozen=True)
class Target:
    """One configuration to compare: `point` is the simulator's (for AR: one stage, method ar)."""

    method: str  # ar | eesd | ppsd
    exit_layer: int | None
    policy: str | None
    point: Point
    batch_size: int = 1
    backend: str | None = None  # ppsd: sequential | distributed | streams
    stage_bounds: tuple[int, ...] = ()  # ppsd: 0 = b_0 < b_1 < .. < b_n = L, where the simulator cuts the layers
    draft_dtype: str | None = None  # eesd: the scenario's draft_dtype where narrower than its dtype (e.g. bf16)
    verify_buckets: bool = True  # eesd: the scenario's (frozen verify passes at bucket widths, or one per k)
    costs_pinned: bool = False  # eesd: validate pinned the policy's round costs (`_with_pinned_cost`)

    @property
    def label(self) -> str:
        batch = f" b={self.batch_size}" if self.batch_size > 1 else ""
        if self.method == "ppsd":
            inside = f" in [0, {self.stage_bounds[1]})" if self.exit_layer != self.stage_bounds[1] else ""
            return f"ppsd {self.backend} n={len(self.stage_bounds) - 1} E={self.exit_layer}{inside}{batch}"
        narrow = f" {self.draft_dtype} drafts" if self.draft_dtype else ""
        narrow += "" if self.verify_buckets else " unbucketed"
        policy = short_costs(self.policy) if self.costs_pinned else self.policy  # (a user's spec stays whole)
        return ("ar" if self.method == "ar" else f"{self.method} E={self.exit_layer} {policy}{narrow}") + batch

    @property
    def draft_len(self) -> int | None:
        """K of a `fixed:K` policy (the old benchmark's column), else None."""
        if self.policy and self.policy.startswith("fixed:"):
            return int(self.policy.split(":", 1)[1])
        return None


@dataclass(frozen=True)
class Plan:
    """What a scenario asks the executor to run, resolved from the scenario and its calibration files."""

    scenario_path: Path
    name: str
    model: str  # what `executor.models.load_model` gets (from the calibration files' metadata)
    device_type: str  # cpu | cuda, where the latency profile was measured
    dtype: str  # torch dtype name of the profile, e.g. float32
    head: str  # the trace's exit head: shared | a head file
    prompt_set: str  # the trace's prompt set (builtin | requests | humaneval | FILE.jsonl)
    prompt_ids: tuple[str, ...]  # request r runs prompt_ids[r]
    max_prompt_tokens: int | None  # the trace kept the last N prompt tokens
    max_new_tokens: int
    profile_path: Path
    trace_path: Path
    profile_device: str
    targets: tuple[Target, ...]
    capture: str = "none"  # how the executor runs its passes: as the profile timed the layers (`capture_of`)
    profile_conditions: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # when, where, how loaded
    probe_context: int | None = None  # the profile's layer point timed again beside the runs (`_conditions_probe`)
    host_work_path: Path | None = None  # `latency.profile.host_work`: each method's host work, where named


@dataclass(frozen=True)
class Measurement:
    """Decode totals over the prompts (one side of a comparison)."""

    decode_tokens: int
    decode_s: float
    rounds: int

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.decode_tokens / self.rounds if self.rounds else 0.0


@dataclass(frozen=True)
class Comparison:
    method: str
    exit_layer: int | None
    policy: str | None
    draft_len: int | None
    measured_tokens_per_s: float  # the median over the repeats
    predicted_tokens_per_s: float
    measured_tokens_per_round: float
    predicted_tokens_per_round: float
    extrapolated: bool = False  # the simulator queried latencies outside the profiled grid
    extrapolations: tuple[str, ...] = ()  # which queries, per phase and axis (`ProfileLatency.extrapolations`)
    name: str = ""  # the target's label
    measured_runs: tuple[float, ...] = ()  # tokens/s of each repeat, in the order they ran
    measured_decode_tokens: int = 0
    predicted_decode_tokens: int = 0
    slowdowns: tuple[float, ...] = ()  # per run: the profile's layer point timed beside it, over the profile's value
    # tokens/s over AR's at the same batch size, measured (medians, the same process) and predicted; None for AR
    measured_speedup: float | None = None
    predicted_speedup: float | None = None

    @property
    def label(self) -> str:
        return self.name or ("ar" if self.method == "ar" else f"{self.method} E={self.exit_layer} {self.policy}")

    @property
    def tokens_per_s_error(self) -> float:
        return relative_error(self.predicted_tokens_per_s, self.measured_tokens_per_s)

    @property
    def tokens_per_round_error(self) -> float:
        return relative_error(self.predicted_tokens_per_round, self.measured_tokens_per_round)

    @property
    def speedup_error(self) -> float | None:
        """The predicted speedup over AR against the measured one: where each run's speed carries a draw of its own
        that AR's runs share (a CPU's frozen compilations, a drifting box), the figure to read."""
        if self.measured_speedup is None or self.predicted_speedup is None:
            return None
        return relative_error(self.predicted_speedup, self.measured_speedup)

    @property
    def slowdown(self) -> float | None:
        """The median slowdown of the runs' conditions against the profile's."""
        return statistics.median(self.slowdowns) if self.slowdowns else None

    @property
    def at_profile_conditions(self) -> tuple[float, ...]:
        """Each run's tokens/s times its own slowdown: what it would have been in the profile's conditions."""
        return tuple(r * s for r, s in zip(self.measured_runs, self.slowdowns, strict=True)) if self.slowdowns else ()

    @property
    def tokens_per_s_error_now(self) -> float | None:
        """The prediction against the runs brought to the profile's conditions (their median): the model's error
        with the machine's drift since the profile left out."""
        adjusted = self.at_profile_conditions
        return relative_error(self.predicted_tokens_per_s, statistics.median(adjusted)) if adjusted else None

    @property
    def spread_now(self) -> float | None:
        """The spread of the runs brought to the profile's conditions: what the probe leaves of the noise."""
        adjusted = self.at_profile_conditions
        return _spread(adjusted) if adjusted else None

    @property
    def spread(self) -> float:
        """Run-to-run spread of the measured tokens/s: (max - min) / median (0 for one run)."""
        return _spread(self.measured_runs)

    @property
    def run_seconds(self) -> float | None:
        """The decode time of one run at the median rate (its decode tokens over the median tokens/s)."""
        if not self.measured_decode_tokens or self.measured_tokens_per_s <= 0:
            return None
        return self.measured_decode_tokens / self.measured_tokens_per_s

    @property
    def short(self) -> bool:
        """A run of under SHORT_RUN_S of decode: a few slow steps move its rate (more prompts make it longer)."""
        seconds = self.run_seconds
        return seconds is not None and seconds < SHORT_RUN_S

    def within(self, tolerance: float) -> bool:
        return abs(self.tokens_per_s_error) <= tolerance and abs(self.tokens_per_round_error) <= tolerance

    def noisy(self, tolerance: float) -> bool:
        """The repeats spread wider than the tolerance: the error cannot be told from the machine's noise."""
        return self.spread > tolerance

    def row(self, tolerance: float) -> dict[str, Any]:
        """The JSON row; the first eight keys are those of benchmarks/results/sim_vs_executor_cpu.json."""
        return {
            "method": self.method,
            "exit_layer": self.exit_layer,
            "draft_len": self.draft_len,
            "sim_tokens_per_s": self.predicted_tokens_per_s,
            "executor_tokens_per_s": self.measured_tokens_per_s,
            "sim_tokens_per_round": self.predicted_tokens_per_round,
            "executor_tokens_per_round": self.measured_tokens_per_round,
            "sim_over_executor": _rounded(self.predicted_tokens_per_s / self.measured_tokens_per_s, 3)
            if self.measured_tokens_per_s > 0
            else None,
            "point": self.label,
            "policy": self.policy,
            "per": "tick" if self.method == "ppsd" else "round",  # the unit of tokens_per_round
            "tokens_per_s_error": _rounded(self.tokens_per_s_error, 4),
            "tokens_per_round_error": _rounded(self.tokens_per_round_error, 4),
            "executor_speedup": _optional(self.measured_speedup),
            "sim_speedup": _optional(self.predicted_speedup),
            "speedup_error": _optional(self.speedup_error),
            "executor_runs_tokens_per_s": [round(r, 3) for r in self.measured_runs],
            "spread": _rounded(self.spread, 4),
            "spread_exceeds_tolerance": self.noisy(tolerance),
            "slowdowns_since_profile": [round(s, 4) for s in self.slowdowns],
            "tokens_per_s_error_now": _optional(self.tokens_per_s_error_now),
            "spread_now": _optional(self.spread_now),
            "executor_decode_tokens": self.measured_decode_tokens,
            "executor_run_decode_s": _optional(self.run_seconds),
            "short_runs": self.short,
            "sim_decode_tokens": self.predicted_decode_tokens,
            "extrapolated": self.extrapolated,
            "extrapolations": list(self.extrapolations),
            "within_tolerance": self.within(tolerance),
        }


SHORT_RUN_S = 0.5  # a run with less decode time than this is flagged (`Comparison.short`)


def _spread(values: Sequence[float]) -> float:
    """(max - min) / median; 0 for fewer than two values or a median of 0."""
    middle = statistics.median(values) if len(values) > 1 else 0.0
    return (max(values) - min(values)) / middle if middle > 0 else 0.0


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured; 0 when both are 0, infinite when only the measurement is."""
    if measured == 0:
        return 0.0 if predicted == 0 else math.inf
    return (predicted - measured) / measured


def failures(comparisons: Sequence[Comparison], tolerance: float) -> list[Comparison]:
    """The comparisons whose tokens/s or tokens/round error exceeds `tolerance` (a fraction, 0.25 = 25%)."""
    check_tolerance(tolerance)
    return [c for c in comparisons if not c.within(tolerance)]


def check_tolerance(tolerance: float) -> None:
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"--tolerance must be a fraction > 0 (0.25 = 25%), got {tolerance}")


def _rounded(value: float, digits: int) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def _optional(value: float | None) -> float | None:
    return None if value is None else _rounded(value, 4)


# ---- planning (torch-free) ------------------------------------------------------------------------------------------
def plan(
    scenario_path: str | Path,
    prompts: int | None = None,
    max_new_tokens: int | None = None,
    points: str = "all",
    model: str | None = None,
) -> Plan:
    """Read and check the scenario and its calibration files; choose the targets. Raises ValueError on mistakes.

    `prompts` and `max_new_tokens` override the scenario's `workload.requests` and `workload.output_len` on both sides;
    `model` is where this machine holds the model the calibration files were measured with (default: their path).
    """
    path = Path(scenario_path)
    all_points = load_batch_points(path)  # a serving scenario is told to run eesd serve-sim
    selected = select_points(path, all_points, points)
    first = selected[0]
    s = first.scenario
    profile_path, profile = _calibration_file(first, "latency")
    trace_path, trace = _calibration_file(first, "acceptance")
    _check_same_setup(path, selected, points)
    device_type = str(profile.metadata.get("device_type") or "cpu")
    for point in selected:
        _check_point(path, point, device_type)
    runnable = _runnable_model(profile_path, profile, trace_path, trace, model)
    dtype = _executor_dtype(path, s.dtype, profile_path, profile)
    head = _check_head(path, s.exit_head, trace_path, trace)
    trace_max = int(trace.metadata.get("max_new_tokens") or 0)
    requests = _positive(prompts, "--prompts", default=s.workload.requests)
    new_tokens = _positive(max_new_tokens, "--max-new-tokens", default=s.workload.output_len, minimum=2)
    if trace_max and new_tokens > trace_max:
        field = "--max-new-tokens" if max_new_tokens is not None else f"{path}: workload.output_len"
        raise ValueError(
            f"{field}: {new_tokens} tokens per request, but the trace {trace_path} recorded at most {trace_max} "
            f"(its max_new_tokens): expected <= {trace_max}, the trace cannot predict acceptance past it"
        )
    trace_prompts = sorted({record.prompt_id for record in trace.records})
    prompt_ids = tuple(trace_prompts[r % len(trace_prompts)] for r in range(requests))
    update = {"requests": requests, "output_len": new_tokens}
    chosen = [with_workload(p, update) for p in selected]
    return Plan(
        scenario_path=path,
        name=s.name,
        model=runnable,
        device_type=device_type,
        dtype=dtype,
        head=head,
        prompt_set=str(trace.metadata.get("prompts") or ""),
        prompt_ids=prompt_ids,
        max_prompt_tokens=trace.metadata.get("max_prompt_tokens"),
        max_new_tokens=new_tokens,
        profile_path=profile_path,
        trace_path=trace_path,
        profile_device=str(profile.metadata.get("device")),
        targets=targets(chosen),
        capture=capture_of(profile, s.latency.profile.cuda_graphs),
        profile_conditions={
            k: profile.metadata.get(k) for k in ("date", "host", "load_average_1min", "device", "other_work_cores")
        },  # fmt: skip
        probe_context=_probe_context(profile),
        host_work_path=(path.parent / s.latency.profile.host_work).resolve() if s.latency.profile.host_work else None,
    )


def _probe_context(profile: DataFile) -> int | None:
    """The smallest context of the profile's uncaptured one-token layer rows at batch 1 (None: it has none)."""
    contexts = [
        r.context_len
        for r in profile.records
        if (r.component, r.phase, r.q, r.batch, r.cuda_graphs) == ("layer", "verify", 1, 1, False)
    ]
    return min(contexts, default=None)


def capture_of(profile: DataFile, cuda_graphs: bool) -> str:
    """The executor's capture mode that runs the layers as the profile timed them: compiled kernels (its metadata
    `kernels`) -> "compile-layers"; frozen ones -> "freeze" (CPU); eager ones -> "graph" where the scenario reads the
    profile's CUDA-graph rows on a GPU, else "none" (uncaptured: the CPU path)."""
    if profile.metadata.get("kernels") == "compiled":
        return "compile-layers"
    if profile.metadata.get("kernels") == "frozen":
        return "freeze"
    on_gpu = profile.metadata.get("device_type") == "cuda"
    return "graph" if on_gpu and cuda_graphs else "none"


def select_points(path: Path, points: Sequence[Point], spec: str) -> list[Point]:
    """`all`, `quick` (the point the scenario describes without its sweep, else the first) or indices `0,3`."""
    if spec == "all":
        return list(points)
    if spec == "quick":
        return [_unswept_point(path, points)]
    try:
        indices = [i for part in spec.split(",") if part.strip() for i in _index_range(part)]
    except ValueError:
        raise ValueError(f"--points: expected {POINT_CHOICES}, got {spec!r}") from None
    bad = [i for i in indices if not 0 <= i < len(points)]
    if not indices or bad:
        raise ValueError(f"--points: {path} has points 0..{len(points) - 1}, got {spec!r}")
    return [points[i] for i in dict.fromkeys(indices)]


def _index_range(part: str) -> range:
    """`3` or `0-15` (both ends included)."""
    first, dash, last = part.strip().partition("-")
    return range(int(first), int(last if dash else first) + 1)


def index_ranges(indices: Sequence[int]) -> str:
    """Sorted point indices as `--points` takes them, runs written as ranges: `0-15,20`."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def short_costs(policy: str | None) -> str | None:
    """A policy spec (or a point's label) with its pinned round costs (`costs=c1/c2/.../cK`) shown by the first and
    last: a label, not the spec (the JSON's `policy` keeps it whole); older files' whole labels read through it."""
    if policy is None or "costs=" not in policy:
        return policy
    head, _, rest = policy.partition("costs=")
    costs, comma, tail = rest.partition(",")
    values = costs.split("/")
    shown = costs if len(values) <= 2 else f"{values[0]}/…/{values[-1]}"
    return f"{head}costs={shown}{comma}{tail}"


def targets(points: Sequence[Point]) -> tuple[Target, ...]:
    """AR at each batch size first, then one target per distinct configuration, in point order."""
    found: dict[tuple, Target] = {}
    for p in points:
        batch = p.scenario.workload.batch_size
        found.setdefault(("ar", batch), Target("ar", None, None, _as_ar(p), batch))
    for p in points:
        s, batch = p.scenario, p.scenario.workload.batch_size
        if s.method == "eesd":
            pinned = _with_pinned_cost(p)
            narrow = narrow_draft_dtype(s)
            key = ("eesd", exit_layer_of(p), pinned.scenario.policy, batch, narrow, s.verify_buckets)
            found.setdefault(key, Target(*key[:3], pinned, batch, draft_dtype=narrow, verify_buckets=s.verify_buckets,
                                         costs_pinned=pinned.scenario.policy != s.policy))  # fmt: skip
        elif s.method == "ppsd":
            plan_ = build_plan(p)
            bounds = (0, *(stage.layer_end for stage in plan_.stages))
            key = ("ppsd", s.ppsd_backend, bounds, plan_.exit_layer, batch)
            found.setdefault(key, Target("ppsd", plan_.exit_layer, None, p, batch, s.ppsd_backend, bounds))
    return tuple(found.values())


def _as_ar(point: Point) -> Point:
    """The point's AR twin, as the executor runs AR: one process, one device, the same workload."""
    s = point.scenario
    topology = s.topology.model_copy(update={"stages": 1, "devices": None, "contention": None})
    return dataclasses.replace(point, scenario=s.model_copy(update={"method": "ar", "topology": topology}))


def _with_pinned_cost(point: Point) -> Point:
    """The point with its policy's costs pinned to the simulated round costs (`sim.policy.with_cost`), which the
    executor then gets too (left to itself it would estimate a ratio from the weights each pass reads)."""
    plan = build_plan(point)
    spec = with_cost(point.scenario.policy, plan.cost_ratio or 1.0, plan.round_costs)
    return dataclasses.replace(point, scenario=point.scenario.model_copy(update={"policy": spec}))


def _unswept_point(path: Path, points: Sequence[Point]) -> Point:
    import yaml

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw.pop("sweep", None)
    try:
        base = Point(0, {}, validate_scenario(raw, str(path)), path.parent, str(path))
        key = (base.scenario.method, exit_layer_of(base), base.scenario.policy)
    except ValueError:  # the fields outside the sweep do not make a whole scenario
        return points[0]
    matching = [p for p in points if (p.scenario.method, exit_layer_of(p), p.scenario.policy) == key]
    return matching[0] if matching else points[0]


def with_workload(point: Point, update: Mapping[str, int]) -> Point:
    """The point with these workload fields (requests, output_len) changed."""
    workload = point.scenario.workload.model_copy(update=dict(update))
    return dataclasses.replace(point, scenario=point.scenario.model_copy(update={"workload": workload}))


def _positive(value: int | None, flag: str, default: int, minimum: int = 1) -> int:
    if value is None:
        return default
    if value < minimum:
        raise ValueError(f"{flag} must be an integer >= {minimum}, got {value}")
    return value


def _check_same_setup(path: Path, points: Sequence[Point], spec: str = "all") -> None:
    """The points validated together share one model, profile, trace and workload; a scenario that sweeps those
    (two heads' traces, say) is validated a setup at a time with `--points`."""
    base = _setup(points[0])
    for p in points[1:]:
        other = _setup(p)
        differ = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
        if differ:
            same = [i for i, q in enumerate(points) if _setup(q) == base]
            raise ValueError(
                f"{path}: sweep: point {p.values} changes {', '.join(differ)}; the executor can only follow sweeps "
                f"over {', '.join(VARIED_FIELDS)} together (one model, profile, trace and workload a run): validate "
                f"one setup at a time, e.g. --points {index_ranges([points[i].index for i in same])}"
                + (f" (points given: {spec})" if spec != "all" else "")
            )


def _setup(point: Point) -> dict[str, Any]:
    """The point's fields, flattened to dotted paths, without those a sweep may vary."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", point.scenario.model_dump(exclude={"name", "description"}))
    return {k: v for k, v in flat.items() if k not in VARIED_FIELDS}


def _check_point(path: Path, point: Point, device_type: str) -> None:
    """What the executor can run: AR and EESD in one process on one device (any batch size), PPSD on one of its
    backends (a batch in lockstep on each), every stage on one device (tp 1)."""
    s = point.scenario
    where = f"{path} (point {point.values or 'the scenario'})"
    if s.acceptance.at_eos != "stop":
        raise ValueError(
            f"{where}: acceptance.at_eos: the executor ends a prompt at its EOS, so the replay must too; expected "
            f"stop (the default), got {s.acceptance.at_eos}"
        )
    stages = s.topology.stages if isinstance(s.topology.stages, int) else len(s.topology.stages)
    if s.topology.tp != 1:
        raise ValueError(f"{where}: topology.tp: validate runs a stage on one device; expected 1, got {s.topology.tp}")
    if s.method != "ppsd":
        if stages != 1:
            raise ValueError(
                f"{where}: topology: validate runs {s.method} in one process on one device; expected stages: 1 and tp: "
                f"1, got stages {stages}, tp {s.topology.tp}"
            )
        return
    if s.max_in_flight is not None:
        raise ValueError(f"{where}: max_in_flight: the executor's PPSD holds one token per stage; drop the field")
    _check_ppsd_backend(where, point, stages, device_type)


def _check_ppsd_backend(where: str, point: Point, stages: int, device_type: str) -> None:
    backend, topology = point.scenario.ppsd_backend, point.scenario.topology
    if backend == "free":
        raise ValueError(
            f"{where}: ppsd_backend: free is the free-running pipe, the schedule's bound, which no executor backend "
            "runs; expected distributed, sequential or streams"
        )
    per_stage = isinstance(topology.stages, list) and any(c.device is not None for c in topology.stages)
    expected_devices = stages if backend == "distributed" else 1
    if per_stage or topology.devices not in (None, expected_devices):
        raise ValueError(
            f"{where}: topology.devices: the {backend} backend runs the stages on {expected_devices} device(s); drop "
            f"the field (or give {expected_devices})"
        )
    if backend == "streams" and device_type != "cuda":
        raise ValueError(
            f"{where}: ppsd_backend: streams runs one CUDA stream per stage on a GPU, the profile was measured on "
            f"{device_type}; expected sequential or distributed"
        )
    if backend == "distributed":
        wanted = LINK_BACKENDS.get(device_type, "gloo")
        configs = topology.stages if isinstance(topology.stages, list) else [StageConfig()] * stages
        # the link each stage hands on over (the last stage's: back to stage 1), its own or the topology's
        links = [(f"topology.stages[{i}].link", c.link) if c.link else ("topology.link", topology.link)
                 for i, c in enumerate(configs)]  # fmt: skip
        for field, link in links:
            profile = link.profile if isinstance(link, LinkConfig) else None
            measured = read_link_profile(point.base_dir / profile).metadata["backend"] if profile else None
            if measured != wanted:
                got = link.model_dump(exclude_none=True) if isinstance(link, LinkConfig) else link
                raise ValueError(
                    f"{where}: {field}: the distributed backend's stages exchange messages over {wanted} here; "
                    f"expected a {wanted} link profile ({{profile: FILE.csv}}, `eesd calibrate link --backend "
                    f"{wanted}`), got {got}"
                )


def _calibration_file(point: Point, kind: str) -> tuple[Path, DataFile]:
    s, where = point.scenario, point.source
    if kind == "latency":
        if s.latency.profile is None:
            source = "roofline" if s.latency.roofline is not None else "constant_us"
            raise ValueError(
                f"{where}: latency: validate compares with this machine, so it needs a profile measured here "
                f"(latency.profile, from `eesd calibrate latency`), got {source}"
            )
        relative, field, read = s.latency.profile.path, "latency.profile.path", read_latency_profile
    else:
        if s.acceptance.trace is None:
            source = "alpha" if s.acceptance.alpha is not None else "alphas"
            raise ValueError(
                f"{where}: acceptance: validate replays the prompts of an acceptance trace (acceptance.trace, from "
                f"`eesd calibrate acceptance`) through the executor, got {source}"
            )
        relative, field, read = s.acceptance.trace, "acceptance.trace", read_acceptance_trace
    file = (point.base_dir / relative).resolve()
    if not file.is_file():
        raise ValueError(f"{where}: {field}: file not found: {file}")
    return file, read(file)


def _runnable_model(
    profile_path: Path, profile: DataFile, trace_path: Path, trace: DataFile, model: str | None
) -> str:  # fmt: skip
    """The model both calibration files name (or `model`, where the files name the same model at another machine's
    path), checked to be one `executor.models.load_model` can load. That the files are of the scenario's model (its
    shape and layer count) `load_points` has checked already (`sim.scenario.check_file_claims`)."""
    from executor.models import known_models

    name = model or str(trace.metadata["model"])
    if model is None and str(profile.metadata["model"]) != name:
        raise ValueError(
            f"{profile_path}: metadata.model: expected the trace's model {name!r} ({trace_path}), got "
            f"{profile.metadata['model']!r}"
        )
    local = Path(name).expanduser()
    local_ok = (local / "config.json").is_file() or (local.is_file() and local.suffix == ".gguf")
    if name not in known_models() and not local_ok:
        raise ValueError(
            f"{'--model' if model else f'{trace_path}: metadata.model'}: {name!r} is not a model the executor can "
            f"load here (--model names it where the files name another path); expected one of "
            f"{sorted(known_models())}, a local HF directory or a .gguf file"
        )
    if model is not None:
        _check_model_shape(model, profile, trace)
    return name


SHAPE_KEYS = {"layers": "num_hidden_layers", "hidden size": "hidden_size", "type": "model_type"}


def _check_model_shape(model: str, profile: DataFile, trace: DataFile) -> None:
    """`--model` is the files' model at this machine's path: its layer count, width and architecture (HF's
    `model_type`), read from its config without its weights, are those the profile's `model_config` (and the trace's
    `num_layers`) describe. What either side does not say is not compared."""
    given = model_shape(model)
    if given is None:
        return
    config = profile.metadata.get("model_config")
    files = {key: config.get(field) for key, field in SHAPE_KEYS.items()} if isinstance(config, Mapping) else {}
    files["layers"] = profile.metadata.get("total_layers") or files.get("layers") or trace.metadata.get("num_layers")
    if any(given.get(key) is not None and files.get(key) is not None and given[key] != files[key] for key in files):
        raise ValueError(
            f"--model {model}: {_shape_text(given)}; the profile and trace are of {profile.metadata.get('model')} "
            f"({_shape_text(files)})"
        )


def model_shape(model: str) -> dict[str, Any] | None:
    """{layers, hidden size, type} of the model `executor.models.load_model` would load for `model`, from its config
    alone: a HF directory's config.json, a packaged model's converted config in the cache, else the simulator's shape
    of a model it knows by that name (no type); None where none of these tells."""
    from executor.models import default_cache_dir, find_cached, known_models

    folder = Path(model).expanduser()
    spec = known_models().get(model.lower())
    if not (folder / "config.json").is_file() and spec is not None and spec.sha256:
        folder = find_cached(default_cache_dir(), spec.sha256) or folder
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict):
        config = config.get("text_config", config) if "num_hidden_layers" not in config else config
        return {key: config.get(field) for key, field in SHAPE_KEYS.items()}
    known = named_model(model)
    return None if known is None else {"layers": known.num_layers, "hidden size": known.hidden_size, "type": None}


def _shape_text(shape: Mapping[str, Any]) -> str:
    """'18 layers, hidden size 640, gemma3_text': what a shape says."""
    parts = [f"{shape['layers']} layers"] if shape.get("layers") is not None else []
    parts += [f"hidden size {shape['hidden size']}"] if shape.get("hidden size") is not None else []
    return ", ".join(parts + ([str(shape["type"])] if shape.get("type") else []))


def _executor_dtype(path: Path, scenario_dtype: str, profile_path: Path, profile: DataFile) -> str:
    """The torch dtype the executor runs in: the scenario's. `load_points` has refused a profile of another dtype
    (`sim.scenario.check_file_claims`); one whose dtype it cannot tell (`claimed_dtype`: none it knows) is refused
    here, since the executor would be timed in a dtype the profile may not have been."""
    if claimed_dtype(profile.metadata) is None:
        raise ValueError(
            f"{path}: dtype: the profile {profile_path} names no dtype the executor runs (metadata.dtype "
            f"{quote(profile.metadata.get('dtype'))}); expected the scenario's, {SCENARIO_DTYPES[scenario_dtype]}"
        )
    return SCENARIO_DTYPES[scenario_dtype]


def _check_head(path: Path, exit_head: str, trace_path: Path, trace: DataFile) -> str:
    """The trace's head, if the scenario's `exit_head` describes it: `shared` and `shared:N` by name, a head file by
    its metadata (a vocabulary-subset file of N ids is `shared:N`, a trained head is `trained`, or `trained:N` over a
    draft vocabulary of N ids)."""
    head = trace_head(trace_path, trace)
    described = trace_exit_head(trace_path, trace)
    if described != exit_head:
        raise ValueError(
            f"{path}: exit_head: the trace {trace_path} was recorded with head {head!r}; expected exit_head "
            f"{described}, got {exit_head}"
        )
    return head


# ---- running --------------------------------------------------------------------------------------------------------
def predict(target: Target) -> tuple[Measurement, bool]:
    """The simulator's decode totals for a target (rounds: PPSD's ticks), and whether a latency query left the
    profiled grid."""
    measurement, result = _predicted(target)
    return measurement, result.extrapolated


def _predicted(target: Target) -> tuple[Measurement, Any]:
    """`predict`'s totals and the simulator's whole `RunResult` (what it extrapolated, ...)."""
    result = simulate_point(target.point).result
    rounds = result.ticks if target.method == "ppsd" else result.rounds
    return Measurement(result.decode_tokens, result.decode_time_us / 1e6, rounds), result


def other_work_notes(metadata: Mapping[str, Any], targets: int | None = None) -> list[str]:
    """The targets during whose runs other processes (or, in a VM, other guests) kept the machine busy: a measured
    rate that is the shared box's, which the slowdown probe (one pass in this process, before and after) can miss,
    most of all for a process per stage that needs a core of its own. One line where all `targets` were."""
    from calibrate.common import OTHER_WORK_NOTE_CORES

    cores = metadata.get("cores")
    measured = metadata.get("other_work_cores", {})
    busy = {label: used for label, used in measured.items() if used >= OTHER_WORK_NOTE_CORES}
    tail = "(the machine's busy CPU less this run's own): its measured rate is the shared box's"
    if busy and len(busy) == targets:
        low, high = min(busy.values()), max(busy.values())
        used = f"{low:.2f}" if low == high else f"{low:.2f}-{high:.2f}"
        return [f"other work used {used} of {cores} cores during every point's runs {tail}"]
    return [f"other work used {used:.2f} of {cores} cores during {label}'s runs {tail}" for label, used in busy.items()]


def simulator_notes(plan_: Plan) -> list[str]:
    """What the simulator notes of the targets' points (a batch size outside the profile's, requests ending at their
    EOS, ...), each once: what a reader of the comparison should know of the predictions."""
    return list(dict.fromkeys(note for target in plan_.targets for note in point_notes(target.point)))


def batches(prompts: Sequence[list[int]], batch_size: int) -> list[list[list[int]]]:
    """The prompts in static batches of `batch_size`, in order (the last may be smaller), as the simulator runs its
    requests."""
    return [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]


def _warm_up(plan_: Plan, target: Target, groups: list[list[list[int]]], run_one: Callable[..., Any]) -> None:
    """First-call costs are not decode: one short run uncaptured; captured, every batch in full once, so that each
    pass shape the timed runs use (a cache capacity, a verify width) is compiled and captured before the clock runs
    (a compiled layer takes seconds per shape, on a CPU too)."""
    if plan_.capture == "none":
        run_one(target, groups[0], min(4, plan_.max_new_tokens))
        return
    for group in groups:
        run_one(target, group, plan_.max_new_tokens)


def warm_up_order(targets: Sequence[Target]) -> list[Target]:
    """The targets in the order they warm up: EESD's longest drafts first, so that the passes built for them serve
    the policies of shorter drafts (`executor.passes.cached_passes`) instead of each policy building and holding its
    own (a frozen pass holds a packed copy of the weights it reads); otherwise in the plan's order."""
    return sorted(targets, key=lambda t: -make_policy(t.policy).max_draft_len if t.method == "eesd" else 0)


def measure(
    plan_: Plan, threads: int | None = None, progress: Callable[[str], None] | None = None, repeats: int = 1
) -> tuple[list[TargetRuns], dict[str, Any]]:
    """Run the executor for every target over the plan's prompts, `repeats` times interleaved (every target once,
    forward, then backward, ...) after one warm-up each, the conditions probe before and after each run; returns each
    target's runs and probes, and metadata."""
    import torch

    from calibrate.common import OtherWork, base_metadata, check_device
    from executor.adapter import ModelAdapter
    from executor.models import load_model, load_tokenizer

    _positive(repeats, "--repeats", default=1)
    if threads is not None:
        torch.set_num_threads(threads)
    if plan_.device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{plan_.profile_path}: metadata.device_type: measured on cuda; no CUDA device is here")
    device = check_device(plan_.device_type)
    dtype = getattr(torch, plan_.dtype)
    prompts = encoded_prompts(plan_, load_tokenizer(plan_.model))
    adapter = ModelAdapter(load_model(plan_.model, dtype=dtype, device=device))
    run_one, probe = _executor(plan_, adapter), _conditions_probe(plan_, adapter)
    begin = time.perf_counter()
    for target in warm_up_order(plan_.targets):
        _warm_up(plan_, target, batches(prompts, target.batch_size), run_one)
    runs: list[list[Measurement]] = [[] for _ in plan_.targets]
    probes: list[list[float]] = [[] for _ in plan_.targets]
    others: list[list[float]] = [[] for _ in plan_.targets]
    for repeat in range(repeats):
        order = range(len(plan_.targets)) if repeat % 2 == 0 else reversed(range(len(plan_.targets)))
        for index in order:
            target = plan_.targets[index]
            probes[index] += [probe()] if probe is not None else []
            with OtherWork() as other:
                runs[index].append(_measure_target(target, batches(prompts, target.batch_size), run_one, plan_, other))
            others[index] += [other.cores] if other.cores is not None else []
            probes[index] += [probe()] if probe is not None else []
            if progress is not None:
                progress(f"{target.label}: {runs[index][-1].tokens_per_s:.2f} tok/s")
    metadata = {
        **base_metadata(plan_.model, device, dtype),
        "capture": plan_.capture,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "order": "interleaved: every configuration once per repeat, forward then backward, after one warm-up each",
        "prompt_tokens_mean": round(sum(len(p) for p in prompts) / len(prompts), 1),
        "measure_wall_s": round(time.perf_counter() - begin, 1),
        "probe": None
        if probe is None
        else f"one pass over the layers at (verify, q 1, context {plan_.probe_context}, "
        "batch 1), timed before and after each run: that run's slowdown = their mean over the profile's value",
        "cores": os.cpu_count(),
        "other_work_cores": {  # the machine's busy CPU during a target's runs less the run's own, cores (median)
            t.label: round(statistics.median(o), 2) for t, o in zip(plan_.targets, others, strict=True) if o
        },
    }
    return [TargetRuns(tuple(r), tuple(p)) for r, p in zip(runs, probes, strict=True)], metadata


def measure_in_processes(
    request: Mapping[str, Any],
    processes: int,
    threads: int,
    progress: Callable[[str], None] | None = None,
    repeats: int = 1,
) -> tuple[list[TargetRuns], dict[str, Any]]:
    """`measure` in `processes` fresh Python processes, one after another, each planning `request` again (`plan`'s
    arguments: the scenario and the flags that shape it) and running every target `repeats` times after its warm-ups;
    every target's runs and probes pooled in process order. Where a pass's speed is drawn once per process (frozen CPU
    passes: where a compilation's packed weights land), one process's runs share one draw, so they spread less than
    the process-to-process difference a profile measured in another process sees; pooled over processes, the median
    and the spread take it in. Each process's median tokens/s per target goes into the metadata."""
    check_processes(processes)
    pooled: list[TargetRuns] | None = None
    medians, wall, first, others = [], 0.0, None, {}
    for index in range(processes):
        runs, metadata = _measure_process(request, threads, repeats, progress, f"process {index + 1}/{processes}")
        first = first or metadata
        for label, cores in metadata.get("other_work_cores", {}).items():  # the busiest process's
            others[label] = max(cores, others.get(label, 0.0))
        wall += metadata["measure_wall_s"]
        medians.append([round(statistics.median(m.tokens_per_s for m in r.runs), 4) for r in runs])
        pooled = runs if pooled is None else pool_runs(pooled, runs)
    assert pooled is not None and first is not None
    return pooled, {
        **first, "processes": processes, "process_medians_tokens_per_s": medians, "measure_wall_s": round(wall, 1),
        "other_work_cores": others,
        "order": f"{first['order']}; in {processes} fresh processes one after another, their runs pooled",
    }  # fmt: skip


def check_processes(processes: int) -> None:
    """--processes: an integer >= 1."""
    _positive(processes, "--processes", default=1)


def pool_runs(earlier: Sequence[TargetRuns], later: Sequence[TargetRuns]) -> list[TargetRuns]:
    """Every target's runs and probes of two measurements, in order."""
    return [TargetRuns(a.runs + b.runs, a.probe_us + b.probe_us) for a, b in zip(earlier, later, strict=True)]


PROGRESS_PREFIX, RESULT_PREFIX = "validate-progress: ", "validate-result: "  # a measuring process's stdout lines


def _measure_process(
    request: Mapping[str, Any], threads: int, repeats: int, progress: Callable[[str], None] | None, name: str
) -> tuple[list[TargetRuns], dict[str, Any]]:
    """One fresh process running `measure_worker`: its progress lines passed on as they come, its result parsed; its
    other output (stderr merged in, so that neither pipe can fill while the other is read) kept for an error's tail."""
    import collections
    import os
    import subprocess
    import sys

    spec = json.dumps({"request": dict(request), "threads": threads, "repeats": repeats})
    code = "import sys; from calibrate.validate import measure_worker; measure_worker(sys.argv[1])"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    child = subprocess.Popen(
        [sys.executable, "-c", code, spec], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )  # fmt: skip
    assert child.stdout is not None
    result, other = None, collections.deque(maxlen=3)
    for line in child.stdout:
        if line.startswith(PROGRESS_PREFIX):
            if progress is not None:
                progress(f"{name}: {line.removeprefix(PROGRESS_PREFIX).strip()}")
        elif line.startswith(RESULT_PREFIX):
            result = json.loads(line.removeprefix(RESULT_PREFIX))
        elif line.strip():
            other.append(line.strip())
    if child.wait() != 0 or result is None:
        tail = " | ".join(other) or "no output"
        raise RuntimeError(f"the measuring {name} failed (exit {child.returncode}): {tail[-600:]}")
    runs = [
        TargetRuns(tuple(Measurement(*m) for m in target["runs"]), tuple(target["probe_us"]))
        for target in result["targets"]
    ]
    return runs, result["metadata"]


def measure_worker(spec_json: str) -> None:
    """A measuring process (`measure_in_processes`): plan the request, measure it, print progress and result lines."""
    spec = json.loads(spec_json)
    plan_ = plan(**spec["request"])

    def progress(message: str) -> None:
        print(PROGRESS_PREFIX + message, flush=True)

    runs, metadata = measure(plan_, spec["threads"], progress, spec["repeats"])
    targets = [{"runs": [dataclasses.astuple(m) for m in r.runs], "probe_us": list(r.probe_us)} for r in runs]
    print(RESULT_PREFIX + json.dumps({"targets": targets, "metadata": metadata}), flush=True)


@dataclass(frozen=True)
class TargetRuns:
    """A target's executor runs in the order they ran, and the conditions probe timed before and after each (µs per
    layer; empty without a probe)."""

    runs: tuple[Measurement, ...]
    probe_us: tuple[float, ...] = ()


def _conditions_probe(plan_: Plan, adapter: Any) -> Callable[[], float] | None:
    """Times the profile's one-token layer point again (its context, batch 1; frozen as a frozen profile timed it,
    compiled on the first call, after the warm-ups): the machine's state beside each run, against the profile's.
    None where the profile has no such point or the executor runs compiled or graphed layers (on a GPU)."""
    if is_captured(plan_.capture) or plan_.probe_context is None:
        return None
    from calibrate.latency import FrozenCalls, GridPoint, make_inputs
    from calibrate.latency import measure as time_point
    from calibrate.timing import TimerSpec

    point = GridPoint("layer", "verify", 1, plan_.probe_context, 1, False)
    inputs, timer = make_inputs(adapter, 1, plan_.probe_context, 1), TimerSpec(adapter.device, warmup=1, repeats=5)
    frozen = FrozenCalls() if plan_.capture == "freeze" else None
    return lambda: time_point(adapter, point, inputs, timer, frozen=frozen).median_us


def _executor(plan_: Plan, adapter: Any) -> Callable[..., Any]:
    """`run_one(target, prompts, max_new_tokens)`: one `generate` call over a batch of prompts (left-padded), the
    target's method and settings; returns its stats."""
    import torch

    from executor.api import generate
    from executor.prompts import left_padded

    eos = adapter.model.generation_config.eos_token_id

    def run_one(target: Target, group: list[list[int]], max_new_tokens: int) -> Any:
        rows, padding = left_padded(group)
        ids, mask = torch.tensor(rows), torch.tensor(padding) if padding is not None else None
        extra: dict[str, Any] = {}
        if target.method == "eesd":
            extra = {"exit_layer": target.exit_layer, "policy": target.policy, "head": plan_.head}
            if target.draft_dtype is not None:
                extra["draft_dtype"] = SCENARIO_DTYPES[target.draft_dtype]
            if not target.verify_buckets:
                extra["verify_buckets"] = False
        elif target.method == "ppsd":
            extra = {"exit_layer": target.exit_layer, "stages": len(target.stage_bounds) - 1, "head": plan_.head,
                     "stage_boundaries": list(target.stage_bounds[1:-1]), "backend": target.backend}  # fmt: skip
        seed = target.point.scenario.seed
        return generate(
            adapter, ids, attention_mask=mask, method=target.method, max_new_tokens=max_new_tokens, eos_token_id=eos,
            capture=plan_.capture, seed=seed, **extra,
        ).stats  # fmt: skip

    return run_one


def _measure_target(
    target: Target, groups: list[list[list[int]]], run_one: Callable[..., Any], plan_: Plan, other: Any = None
) -> Measurement:
    """One timed run of a target over every batch: decode tokens, decode seconds, and rounds (AR: its decode steps
    per row; EESD: its rounds per row; PPSD: its ticks). `other` (a `calibrate.common.OtherWork`) is told the CPU of
    the run's stage processes, which this process does not reap."""
    tokens, seconds, rounds = 0, 0.0, 0
    for group in groups:
        stats = run_one(target, group, plan_.max_new_tokens)
        if other is not None:
            other.elsewhere_s += getattr(stats, "process_cpu_s", 0.0)
        decode = stats.new_tokens - len(group)
        tokens += decode
        seconds += stats.wall_time_s - stats.prefill_time_s
        rounds += {"ar": decode, "eesd": len(stats.accepted)}[target.method] if target.method != "ppsd" else stats.ticks
    return Measurement(tokens, seconds, rounds)


def encoded_prompts(plan_: Plan, tokenizer: Any) -> list[list[int]]:
    """The token ids of the plan's prompts, encoded as `eesd calibrate acceptance` encoded them for the trace."""
    from executor.prompts import encode_prompt, load_prompts

    by_id = {p.id: p for p in load_prompts(plan_.prompt_set)}
    missing = sorted(set(plan_.prompt_ids) - set(by_id))
    if missing:
        raise ValueError(
            f"{plan_.trace_path}: metadata.prompts: the prompt set {plan_.prompt_set!r} has no prompt {missing[0]!r} "
            "that the trace recorded; expected the set the trace was made from"
        )
    keep = plan_.max_prompt_tokens
    encoded = [encode_prompt(tokenizer, by_id[i].text) for i in plan_.prompt_ids]
    return [ids[-keep:] if keep else ids for ids in encoded]


def compare(plan_: Plan, measured: Sequence[TargetRuns]) -> list[Comparison]:
    """Simulate every target and pair it with its runs (the median tokens/s of its repeats) and the slowdown the
    probes around each run saw against the profile."""
    profiled = _profiled_probe_us(plan_)
    rows = []
    for target, runs in zip(plan_.targets, measured, strict=True):
        predicted, result = _predicted(target)
        rates = [m.tokens_per_s for m in runs.runs]
        pairs = zip(runs.probe_us[::2], runs.probe_us[1::2], strict=True)  # before and after each run
        slowdowns = tuple((before + after) / 2 / profiled for before, after in pairs) if profiled else ()
        rows.append(
            Comparison(
                method=target.method,
                exit_layer=target.exit_layer,
                policy=target.policy,
                draft_len=target.draft_len,
                measured_tokens_per_s=statistics.median(rates),
                predicted_tokens_per_s=predicted.tokens_per_s,
                measured_tokens_per_round=runs.runs[0].tokens_per_round,
                predicted_tokens_per_round=predicted.tokens_per_round,
                extrapolated=result.extrapolated,
                extrapolations=tuple(result.extrapolations),
                name=target.label,
                measured_runs=tuple(rates),
                measured_decode_tokens=runs.runs[0].decode_tokens,
                predicted_decode_tokens=predicted.decode_tokens,
                slowdowns=slowdowns,
            )
        )
    return with_speedups(rows, [target.batch_size for target in plan_.targets])


def with_speedups(rows: Sequence[Comparison], batch_sizes: Sequence[int]) -> list[Comparison]:
    """Each non-AR point with its measured and predicted tokens/s over AR's at the same batch size (none where no AR
    ran at that size, or AR's rate is 0)."""
    ar = {b: r for r, b in zip(rows, batch_sizes, strict=True) if r.method == "ar"}
    out = []
    for row, batch in zip(rows, batch_sizes, strict=True):
        base = ar.get(batch)
        if row.method == "ar" or base is None or min(base.measured_tokens_per_s, base.predicted_tokens_per_s) <= 0:
            out.append(row)
            continue
        measured = row.measured_tokens_per_s / base.measured_tokens_per_s
        predicted = row.predicted_tokens_per_s / base.predicted_tokens_per_s
        out.append(dataclasses.replace(row, measured_speedup=measured, predicted_speedup=predicted))
    return out


def _profiled_probe_us(plan_: Plan) -> float | None:
    """The profile's value at the conditions probe's point (µs per layer)."""
    if plan_.probe_context is None:
        return None
    from sim.latency import ProfileLatency

    profile = ProfileLatency(read_latency_profile(plan_.profile_path), cuda_graphs=False)
    return profile.time_us("layer", "verify", 1, plan_.probe_context, 1)


# ---- output ---------------------------------------------------------------------------------------------------------
def table(comparisons: Sequence[Comparison], tolerance: float) -> str:
    """One line per point: measured (median) and predicted tokens/s with the run-to-run spread (`-` for one run) and
    the error, and tokens/round (PPSD: per tick, marked `/tick`) with its error; `!` marks a spread above the
    tolerance, `*` an extrapolation, `~` runs too short to time well (`Comparison.short`)."""
    heads = ["point", "measured tok/s", "spread", "predicted tok/s", "error", "slowdown", "error now", "spread now",
             "speedup meas/pred", "error", "measured tok/round", "predicted tok/round", "error", "ok"]  # fmt: skip
    lines = [heads]
    for c in comparisons:
        now, unit = c.tokens_per_s_error_now, "/tick" if c.method == "ppsd" else ""
        lines.append([
            c.label + ("*" if c.extrapolated else "") + ("~" if c.short else ""),
            f"{c.measured_tokens_per_s:.2f}",
            f"{100 * c.spread:.1f}%" + ("!" if c.noisy(tolerance) else "") if len(c.measured_runs) > 1 else "-",
            f"{c.predicted_tokens_per_s:.2f}", _percent(c.tokens_per_s_error),
            f"{c.slowdown:.2f}x" if c.slowdown else "-", _percent(now) if now is not None else "-",
            f"{100 * c.spread_now:.1f}%" if c.spread_now is not None and len(c.measured_runs) > 1 else "-",
            _speedups(c), _percent(c.speedup_error) if c.speedup_error is not None else "-",
            f"{c.measured_tokens_per_round:.3f}{unit}", f"{c.predicted_tokens_per_round:.3f}{unit}",
            _percent(c.tokens_per_round_error), "yes" if c.within(tolerance) else "NO",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(heads))]
    text = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in lines
    ]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def _speedups(c: Comparison) -> str:
    if c.measured_speedup is None or c.predicted_speedup is None:
        return "-"
    return f"{c.measured_speedup:.3f}x/{c.predicted_speedup:.3f}x"


def _percent(value: float) -> str:
    return f"{100 * value:+.1f}%" if math.isfinite(value) else "inf"


def report(
    plan_: Plan,
    comparisons: Sequence[Comparison],
    tolerance: float,
    measure_metadata: Mapping[str, Any],
    root: Path | None = None,
    notes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The JSON document: metadata (device, versions, date, scenario, calibration files, prompts, the simulator's
    `notes`: `simulator_notes` where not given) and rows."""

    def shown(path: Path) -> str:
        try:
            return str(path.resolve().relative_to((root or Path.cwd()).resolve()))
        except ValueError:
            return str(path)

    return {
        "metadata": {
            **measure_metadata,
            "scenario": shown(plan_.scenario_path),
            "latency_profile": shown(plan_.profile_path),
            "acceptance_trace": shown(plan_.trace_path),
            "host_work": shown(plan_.host_work_path) if plan_.host_work_path else None,
            "profile_device": plan_.profile_device,
            "head": plan_.head,
            "prompts": list(plan_.prompt_ids),
            "max_new_tokens": plan_.max_new_tokens,
            "profile_measured": dict(plan_.profile_conditions),
            "tolerance": tolerance,
            "error": "(predicted - measured) / measured, measured = the median tokens/s over the repeats",
            "spread": "(max - min) / median of the repeats' tokens/s",
            "speedup": "a point's tokens/s over AR's at its batch size, measured (medians) and predicted",
            "summary": summary(comparisons, tolerance),
            "simulator_notes": list(simulator_notes(plan_) if notes is None else notes),
        },
        "rows": [c.row(tolerance) for c in comparisons],
    }


def summary(comparisons: Sequence[Comparison], tolerance: float) -> dict[str, Any]:
    """Median and max |tokens/s error|, the max |speedup error|, whether every tokens/round matched exactly, the
    points whose spread exceeds the tolerance."""
    errors = [abs(c.tokens_per_s_error) for c in comparisons]
    now = [abs(c.tokens_per_s_error_now) for c in comparisons if c.tokens_per_s_error_now is not None]
    speedups = [abs(c.speedup_error) for c in comparisons if c.speedup_error is not None]
    return {
        "points": len(comparisons),
        "median_abs_tokens_per_s_error": _rounded(statistics.median(errors), 4) if errors else None,
        "max_abs_tokens_per_s_error": _rounded(max(errors), 4) if errors else None,
        "median_abs_tokens_per_s_error_now": _rounded(statistics.median(now), 4) if now else None,
        "max_abs_tokens_per_s_error_now": _rounded(max(now), 4) if now else None,
        "max_abs_speedup_error": _rounded(max(speedups), 4) if speedups else None,
        "tokens_per_round_exact": all(c.tokens_per_round_error == 0 for c in comparisons),
        "noisy_points": [c.label for c in comparisons if c.noisy(tolerance)],
    }


def write_json(path: str | Path, document: Mapping[str, Any]) -> Path:
    path = Path(path)
    write_text_atomic(path, json.dumps(document, indent=2, allow_nan=False) + "\n")
    return path
