"""Does the simulator predict what the executor measures on this machine? (`eesd validate`)

A scenario whose latencies come from a measured profile (`latency.profile`) and whose acceptance is a replayed trace
(`acceptance.trace`) can be checked against the executor: for every (method, exit layer, draft policy) the scenario
sweeps, plus AR, the executor generates from the same prompts the trace replays (simulated request r replays the
r-th prompt of the trace in sorted id order, cyclically, so the executor runs that prompt for request r), with the
model, dtype and device the calibration files were measured with, and the simulator runs the same point with the same
number of requests and tokens. Both sides count decode only: tokens/s = (new tokens - 1) / (wall time - prefill time)
summed over the prompts, and tokens/round = decode tokens / verify rounds (AR: 1).

Relative error = (predicted - measured) / measured, for tokens/s and for tokens/round; a point passes when both are
within the tolerance. Planning (`plan`) and the comparison are torch-free; `measure` imports torch and the executor.
Every scenario problem is a `ValueError` naming the file, the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.formats import (
    DataFile,
    read_acceptance_trace,
    read_head_metadata,
    read_latency_profile,
    write_text_atomic,
)
from sim.models import ModelConfig
from sim.plan import exit_layer_of, model_config
from sim.runner import simulate_point
from sim.scenario import Point, WorkloadConfig, load_points
from sim.scenario import validate as validate_scenario

# the scenario fields the executor varies between points; every other field must be the same at every point
VARIED_FIELDS = ("method", "exit_layer", "policy")
SCENARIO_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
POINT_CHOICES = "all | quick | comma-separated point indices (the `point` column of `eesd simulate`)"


@dataclass(frozen=True)
class Target:
    """One configuration to compare: `point` is the simulator's (for AR: any point, simulated with method ar)."""

    method: str  # ar | eesd
    exit_layer: int | None
    policy: str | None
    point: Point

    @property
    def label(self) -> str:
        return "ar" if self.method == "ar" else f"{self.method} E={self.exit_layer} {self.policy}"

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
    prompt_set: str  # the trace's prompt set (builtin | humaneval | FILE.jsonl)
    prompt_ids: tuple[str, ...]  # request r runs prompt_ids[r]
    max_prompt_tokens: int | None  # the trace kept the last N prompt tokens
    max_new_tokens: int
    profile_path: Path
    trace_path: Path
    profile_device: str
    targets: tuple[Target, ...]
    capture: str = "none"  # how the executor runs its passes: as the profile timed the layers (`capture_of`)


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
    measured_tokens_per_s: float
    predicted_tokens_per_s: float
    measured_tokens_per_round: float
    predicted_tokens_per_round: float
    extrapolated: bool = False  # the simulator queried latencies outside the profiled grid

    @property
    def label(self) -> str:
        return "ar" if self.method == "ar" else f"{self.method} E={self.exit_layer} {self.policy}"

    @property
    def tokens_per_s_error(self) -> float:
        return relative_error(self.predicted_tokens_per_s, self.measured_tokens_per_s)

    @property
    def tokens_per_round_error(self) -> float:
        return relative_error(self.predicted_tokens_per_round, self.measured_tokens_per_round)

    def within(self, tolerance: float) -> bool:
        return abs(self.tokens_per_s_error) <= tolerance and abs(self.tokens_per_round_error) <= tolerance

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
            "policy": self.policy,
            "tokens_per_s_error": _rounded(self.tokens_per_s_error, 4),
            "tokens_per_round_error": _rounded(self.tokens_per_round_error, 4),
            "extrapolated": self.extrapolated,
            "within_tolerance": self.within(tolerance),
        }


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


# ---- planning (torch-free) ------------------------------------------------------------------------------------------
def plan(
    scenario_path: str | Path,
    prompts: int | None = None,
    max_new_tokens: int | None = None,
    points: str = "all",
) -> Plan:
    """Read and check the scenario and its calibration files; choose the targets. Raises ValueError on mistakes.

    `prompts` and `max_new_tokens` override the scenario's `workload.requests` and `workload.output_len` on both sides.
    """
    path = Path(scenario_path)
    all_points = load_points(path)
    first = all_points[0]
    s = first.scenario
    profile_path, profile = _calibration_file(first, "latency")
    trace_path, trace = _calibration_file(first, "acceptance")
    _check_same_setup(path, all_points)
    _check_single_device(path, first)
    model = _runnable_model(profile_path, profile, trace_path, trace, model_config(s))
    dtype = _check_dtype(path, s.dtype, profile_path, profile)
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
    workload = s.workload.model_copy(update={"requests": requests, "output_len": new_tokens})
    chosen = [_with_workload(p, workload) for p in select_points(path, all_points, points)]
    return Plan(
        scenario_path=path,
        name=s.name,
        model=model,
        device_type=str(profile.metadata.get("device_type") or "cpu"),
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
    )


def capture_of(profile: DataFile, cuda_graphs: bool) -> str:
    """The executor's capture mode that runs the layers as the profile timed them: compiled kernels (its metadata
    `kernels`) -> "compile-layers"; eager ones -> "graph" where the scenario reads the profile's CUDA-graph rows on a
    GPU, else "none" (uncaptured: the CPU path)."""
    if profile.metadata.get("kernels") == "compiled":
        return "compile-layers"
    on_gpu = profile.metadata.get("device_type") == "cuda"
    return "graph" if on_gpu and cuda_graphs else "none"


def select_points(path: Path, points: Sequence[Point], spec: str) -> list[Point]:
    """`all`, `quick` (the point the scenario describes without its sweep, else the first) or indices `0,3`."""
    if spec == "all":
        return list(points)
    if spec == "quick":
        return [_unswept_point(path, points)]
    try:
        indices = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--points: expected {POINT_CHOICES}, got {spec!r}") from None
    bad = [i for i in indices if not 0 <= i < len(points)]
    if not indices or bad:
        raise ValueError(f"--points: {path} has points 0..{len(points) - 1}, got {spec!r}")
    return [points[i] for i in dict.fromkeys(indices)]


def targets(points: Sequence[Point]) -> tuple[Target, ...]:
    """AR first, then one target per distinct (method, exit layer, policy), in point order."""
    found: dict[tuple, Target] = {("ar", None, None): Target("ar", None, None, points[0])}
    for p in points:
        if p.scenario.method == "eesd":
            key = ("eesd", exit_layer_of(p), p.scenario.policy)
            found.setdefault(key, Target(*key, p))
    return tuple(found.values())


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


def _with_workload(point: Point, workload: WorkloadConfig) -> Point:
    return dataclasses.replace(point, scenario=point.scenario.model_copy(update={"workload": workload}))


def _positive(value: int | None, flag: str, default: int, minimum: int = 1) -> int:
    if value is None:
        return default
    if value < minimum:
        raise ValueError(f"{flag} must be an integer >= {minimum}, got {value}")
    return value


def _check_same_setup(path: Path, points: Sequence[Point]) -> None:
    ignore = set(VARIED_FIELDS) | {"name", "description"}
    base = points[0].scenario.model_dump(exclude=ignore)
    for p in points[1:]:
        other = p.scenario.model_dump(exclude=ignore)
        differ = sorted(k for k in base if base[k] != other[k])
        if differ:
            raise ValueError(
                f"{path}: sweep: point {p.values} changes {', '.join(differ)}; the executor can only follow sweeps "
                f"over {', '.join(VARIED_FIELDS)} (one model, profile, trace and workload per scenario)"
            )
    for p in points:
        if p.scenario.method == "ppsd":
            raise ValueError(
                f"{path}: method: validate compares ar and eesd on one device; ppsd (a pipeline over several "
                f"devices) has no measurement on this machine to compare with (point {p.values or 'the scenario'})"
            )


def _check_single_device(path: Path, point: Point) -> None:
    s = point.scenario
    stages = s.topology.stages if isinstance(s.topology.stages, int) else len(s.topology.stages)
    if stages != 1 or s.topology.tp != 1:
        raise ValueError(
            f"{path}: topology: validate runs the executor on one device; expected stages: 1 and tp: 1, got "
            f"stages {stages}, tp {s.topology.tp}"
        )
    if s.workload.batch_size != 1:
        raise ValueError(
            f"{path}: workload.batch_size: validate runs one prompt at a time; expected 1, got {s.workload.batch_size}"
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
    profile_path: Path, profile: DataFile, trace_path: Path, trace: DataFile, shape: ModelConfig
) -> str:
    """The model both calibration files name, checked to be one `executor.models.load_model` can load."""
    from executor.models import known_models

    name = str(trace.metadata["model"])
    if str(profile.metadata["model"]) != name:
        raise ValueError(
            f"{profile_path}: metadata.model: expected the trace's model {name!r} ({trace_path}), got "
            f"{profile.metadata['model']!r}"
        )
    local = Path(name).expanduser()
    local_ok = (local / "config.json").is_file() or (local.is_file() and local.suffix == ".gguf")
    if name not in known_models() and not local_ok:
        raise ValueError(
            f"{trace_path}: metadata.model: {name!r} is not a model the executor can load here; expected one of "
            f"{sorted(known_models())}, a local HF directory or a .gguf file"
        )
    config = profile.metadata.get("model_config") or {}
    layers = config.get("num_hidden_layers")
    if layers is not None and layers != shape.num_layers:
        raise ValueError(
            f"{profile_path}: metadata.model_config.num_hidden_layers: expected {shape.num_layers} (the scenario's "
            f"model {shape.name}), got {layers}"
        )
    return name


def _check_dtype(path: Path, scenario_dtype: str, profile_path: Path, profile: DataFile) -> str:
    dtype = str(profile.metadata["dtype"])
    if SCENARIO_DTYPES[scenario_dtype] != dtype:
        raise ValueError(
            f"{path}: dtype: the profile {profile_path} was measured in {dtype}; expected the scenario's dtype to "
            f"match, got {scenario_dtype}"
        )
    return dtype


def _check_head(path: Path, exit_head: str, trace_path: Path, trace: DataFile) -> str:
    """The trace's head, if the scenario's `exit_head` describes it: `shared` and `shared:N` by name, a head file by
    its metadata (a vocabulary-subset file of N ids is `shared:N`, a trained head is `trained`)."""
    head = str(trace.metadata["head"])
    described = head
    if head != "shared" and not head.startswith("shared:"):
        try:
            metadata = read_head_metadata(head)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(
                f"{trace_path}: metadata.head: the head file {head!r} cannot be read from here: {err}"
            ) from None
        subset = metadata.get("head_architecture") == "vocab-subset"
        described = f"shared:{metadata.get('subset_size')}" if subset else "trained"
    if described != exit_head:
        raise ValueError(
            f"{path}: exit_head: the trace {trace_path} was recorded with head {head!r}; expected exit_head "
            f"{described}, got {exit_head}"
        )
    return head


# ---- running --------------------------------------------------------------------------------------------------------
def predict(target: Target) -> tuple[Measurement, bool]:
    """The simulator's decode totals for a target, and whether a latency query left the profiled grid."""
    item = simulate_point(target.point)
    result = item.baseline if target.method == "ar" else item.result
    return Measurement(result.decode_tokens, result.decode_time_us / 1e6, result.rounds), result.extrapolated


def _warm_up(plan_: Plan, target: Target, prompts: list[list[int]], run_one: Callable[..., Any]) -> None:
    """First-call costs are not decode: one short run uncaptured; captured, every prompt in full once, so that each
    pass shape the timed runs use (a cache capacity, a verify width) is compiled and captured before the clock runs
    (a compiled layer takes seconds per shape, on a CPU too)."""
    if plan_.capture == "none":
        run_one(target, prompts[0], min(4, plan_.max_new_tokens))
        return
    for ids in prompts:
        run_one(target, ids, plan_.max_new_tokens)


def measure(
    plan_: Plan, threads: int | None = None, progress: Callable[[str], None] | None = None
) -> tuple[list[Measurement], dict[str, Any]]:
    """Run the executor for every target over the plan's prompts; returns one Measurement per target and metadata."""
    import torch

    from calibrate.common import base_metadata, check_device
    from executor.adapter import ModelAdapter
    from executor.api import generate
    from executor.models import load_model, load_tokenizer

    if threads is not None:
        torch.set_num_threads(threads)
    if plan_.device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{plan_.profile_path}: metadata.device_type: measured on cuda; no CUDA device is here")
    device = check_device(plan_.device_type)
    dtype = getattr(torch, plan_.dtype)
    prompts = encoded_prompts(plan_, load_tokenizer(plan_.model))
    adapter = ModelAdapter(load_model(plan_.model, dtype=dtype, device=device))
    eos = adapter.model.generation_config.eos_token_id

    def run_one(target: Target, ids: list[int], max_new_tokens: int):
        eesd = {"exit_layer": target.exit_layer, "policy": target.policy, "head": plan_.head}
        return generate(
            adapter, ids, method=target.method, max_new_tokens=max_new_tokens, eos_token_id=eos, capture=plan_.capture,
            **(eesd if target.method == "eesd" else {}),
        ).stats  # fmt: skip

    begin = time.perf_counter()
    measurements = []
    for target in plan_.targets:
        _warm_up(plan_, target, prompts, run_one)
        tokens, seconds, rounds = 0, 0.0, 0
        for ids in prompts:
            stats = run_one(target, ids, plan_.max_new_tokens)
            decode = stats.new_tokens - 1
            tokens += decode
            seconds += stats.wall_time_s - stats.prefill_time_s
            rounds += len(stats.accepted) if target.method == "eesd" else decode
        measurements.append(Measurement(tokens, seconds, rounds))
        if progress is not None:
            progress(f"{target.label}: {measurements[-1].tokens_per_s:.2f} tok/s")
    metadata = {
        **base_metadata(plan_.model, device, dtype),
        "capture": plan_.capture,
        "prompt_tokens_mean": round(sum(len(p) for p in prompts) / len(prompts), 1),
        "measure_wall_s": round(time.perf_counter() - begin, 1),
    }
    return measurements, metadata


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


def compare(plan_: Plan, measured: Sequence[Measurement]) -> list[Comparison]:
    """Simulate every target and pair it with its measurement."""
    rows = []
    for target, m in zip(plan_.targets, measured, strict=True):
        predicted, extrapolated = predict(target)
        rows.append(
            Comparison(
                method=target.method,
                exit_layer=target.exit_layer,
                policy=target.policy,
                draft_len=target.draft_len,
                measured_tokens_per_s=m.tokens_per_s,
                predicted_tokens_per_s=predicted.tokens_per_s,
                measured_tokens_per_round=m.tokens_per_round,
                predicted_tokens_per_round=predicted.tokens_per_round,
                extrapolated=extrapolated,
            )
        )
    return rows


# ---- output ---------------------------------------------------------------------------------------------------------
def table(comparisons: Sequence[Comparison], tolerance: float) -> str:
    """One line per point: measured and predicted tokens/s and tokens/round, with relative errors."""
    heads = ["point", "measured tok/s", "predicted tok/s", "error", "measured tok/round", "predicted tok/round",
             "error", "ok"]  # fmt: skip
    lines = [heads]
    for c in comparisons:
        lines.append([
            c.label + ("*" if c.extrapolated else ""),
            f"{c.measured_tokens_per_s:.2f}", f"{c.predicted_tokens_per_s:.2f}", _percent(c.tokens_per_s_error),
            f"{c.measured_tokens_per_round:.3f}", f"{c.predicted_tokens_per_round:.3f}",
            _percent(c.tokens_per_round_error), "yes" if c.within(tolerance) else "NO",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(heads))]
    text = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in lines
    ]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def _percent(value: float) -> str:
    return f"{100 * value:+.1f}%" if math.isfinite(value) else "inf"


def report(
    plan_: Plan,
    comparisons: Sequence[Comparison],
    tolerance: float,
    measure_metadata: Mapping[str, Any],
    root: Path | None = None,
) -> dict[str, Any]:
    """The JSON document: metadata (device, versions, date, scenario, calibration files, prompts) and rows."""

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
            "profile_device": plan_.profile_device,
            "head": plan_.head,
            "prompts": list(plan_.prompt_ids),
            "max_new_tokens": plan_.max_new_tokens,
            "tolerance": tolerance,
            "error": "(predicted - measured) / measured",
        },
        "rows": [c.row(tolerance) for c in comparisons],
    }


def write_json(path: str | Path, document: Mapping[str, Any]) -> Path:
    path = Path(path)
    write_text_atomic(path, json.dumps(document, indent=2, allow_nan=False) + "\n")
    return path
