"""Scenario YAML: schema (pydantic), validation with readable messages, `sweep:` expansion, and plan building.

A scenario names a model, where latencies come from (roofline, profile or constants), how drafts are accepted (α,
per-position α_i or a trace), the topology (GPUs, stages, tensor parallelism, links), the method and policy, and the
workload. Errors name the file, the field path and what was expected (`ScenarioError`, a `ValueError`). Paths inside
a scenario are relative to the scenario file. Times in µs, bandwidths in GB/s, memory in GiB.
"""

from __future__ import annotations

import copy
import itertools
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sim.acceptance import AcceptanceModel, BernoulliAcceptance, PositionalAcceptance, TraceAcceptance
from sim.engine import CAPACITY_STEP, Pass, SimPlan, StagePlan, Workload, head_vocab_fraction, stage_time_us
from sim.formats import COMPONENTS, read_acceptance_trace, read_latency_profile, read_link_profile, subset_size
from sim.hardware import GPUS, LINKS, LinkSpec, gpu
from sim.latency import ConstantLatency, LatencyModel, LinkModel, ProfiledLink, ProfileLatency, RooflineLatency
from sim.models import DTYPE_BYTES, MODELS, ModelConfig
from sim.policy import make_policy, parse_policy_spec, policy_usage

Component = Literal["embed", "layer", "exit_head", "lm_head", "overhead"]
assert set(typing.get_args(Component)) == set(COMPONENTS)


class ScenarioError(ValueError):
    """A scenario problem: `FILE: FIELD: what was expected`."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelShape(Strict):
    name: str
    num_layers: int = Field(gt=1)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    head_size: int | None = Field(None, gt=0)  # default hidden_size / num_heads


class Roofline(Strict):
    cuda_graphs: bool = True
    bandwidth_efficiency: float = Field(0.61, gt=0, le=1)
    flops_efficiency: float = Field(0.6, gt=0, le=1)
    eager_layer_us: float = Field(560.0, ge=0)
    overhead_us: float = Field(20.0, ge=0)


class ProfileRef(Strict):
    path: str
    cuda_graphs: bool = True


class LatencyConfig(Strict):
    """Exactly one of `roofline`, `profile`, `constant_us`."""

    roofline: Roofline | None = None
    profile: ProfileRef | None = None
    constant_us: dict[Component, float] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> LatencyConfig:
        given = [k for k in ("roofline", "profile", "constant_us") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of roofline, profile, constant_us (got {given or 'none'})")
        if self.constant_us and any(v < 0 for v in self.constant_us.values()):
            raise ValueError("constant_us values must be >= 0")
        return self


class AcceptanceConfig(Strict):
    """Exactly one of `alpha`, `alphas`, `trace`."""

    alpha: float | None = Field(None, ge=0, le=1)
    alphas: list[float] | None = Field(None, min_length=1)
    trace: str | None = None
    confidence_sharpness: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> AcceptanceConfig:
        given = [k for k in ("alpha", "alphas", "trace") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of alpha, alphas, trace (got {given or 'none'})")
        if self.alphas and not all(0 <= a <= 1 for a in self.alphas):
            raise ValueError("alphas must all be in [0, 1]")
        if self.confidence_sharpness is not None and self.alpha is None:
            raise ValueError("confidence_sharpness only applies with alpha (traces carry their own confidences)")
        return self


class LinkConfig(Strict):
    """A custom link: `latency_us` + `bandwidth_GBps` (omit for infinite), or a measured `profile` CSV."""

    latency_us: float = Field(0.0, ge=0)
    bandwidth_GBps: float | None = Field(None, gt=0)
    profile: str | None = None


def _check_link_name(value: str | LinkConfig) -> str | LinkConfig:
    if isinstance(value, str) and value not in LINKS:
        raise ValueError(f"unknown link preset {value!r}; known: {sorted(LINKS)} or {{latency_us, bandwidth_GBps}}")
    return value


def _check_gpu_name(value: str | None) -> str | None:
    if value is not None and value not in GPUS:
        raise ValueError(f"unknown GPU {value!r}; known: {sorted(GPUS)}")
    return value


class StageConfig(Strict):
    gpu: str | None = None
    tp: int | None = Field(None, ge=1)
    layers: int | None = Field(None, ge=1)

    _gpu = field_validator("gpu")(_check_gpu_name)


class TopologyConfig(Strict):
    gpu: str = "H100"
    stages: int | list[StageConfig] = Field(1)
    tp: int = Field(1, ge=1)
    link: str | LinkConfig = "nvlink"
    tp_link: str | LinkConfig = "nvlink"

    _gpu = field_validator("gpu")(_check_gpu_name)
    _links = field_validator("link", "tp_link")(_check_link_name)

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: int | list[StageConfig]) -> int | list[StageConfig]:
        if isinstance(value, int) and value < 1 or isinstance(value, list) and not value:
            raise ValueError("stages must be an integer >= 1 or a non-empty list of stages")
        return value


class WorkloadConfig(Strict):
    requests: int = Field(1, ge=1)
    batch_size: int = Field(1, ge=1)
    prompt_len: int = Field(128, ge=1)
    output_len: int = Field(128, ge=1)


class Scenario(Strict):
    name: str
    description: str = ""
    seed: int = 0
    model: str | ModelShape
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    method: Literal["ar", "eesd", "ppsd"]
    exit_layer: int | None = Field(None, ge=1)
    exit_head: str = "shared"  # shared | shared:N (the shared head over N of the V ids) | trained
    policy: str = "fixed:4"
    max_in_flight: int | None = Field(None, ge=1)
    # EESD rounds that draft nothing (k = 0): "chained" AR steps, one host read per block (the executor since
    # 2026-11-26), or "verify": one verify pass and host read each (the executor that the H200 lease measured)
    zero_draft_rounds: Literal["chained", "verify"] = "chained"
    # captured (cuda_graphs): chained AR steps, zero-draft rounds or (ppsd_backend "local") PPSD ticks per host read,
    # as the executor's `generate(sync_every=)` (default 8); 1: a read after every step or tick (the `streams`
    # backend before 2026-11-26, e.g. the H200 lease)
    sync_every: int = Field(8, ge=1)
    # PPSD's host (stages on devices of their own): "distributed", a process per stage, each host taking part in
    # every tick (the executor's backend for a GPU per stage); "local", one host chaining sync_every ticks on the
    # device (the executor's streams backend, whose stages share one GPU: not modelled, a what-if here)
    ppsd_backend: Literal["distributed", "local"] = "distributed"
    # decode passes attend over: "cache", every slot of the executor's static cache (prompt + output + max draft + 1,
    # a multiple of 256 with cuda_graphs), masked, as the executor does; "context", the positions so far (a decoder
    # with dynamic shapes, e.g. HF's)
    attention: Literal["cache", "context"] = "cache"
    latency: LatencyConfig = LatencyConfig(roofline=Roofline())
    acceptance: AcceptanceConfig
    topology: TopologyConfig = TopologyConfig()
    workload: WorkloadConfig = WorkloadConfig()

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | ModelShape) -> str | ModelShape:
        if isinstance(value, str) and value not in MODELS:
            raise ValueError(f"unknown model {value!r}; known: {sorted(MODELS)} or an inline shape")
        return value

    @field_validator("exit_head")
    @classmethod
    def _exit_head(cls, value: str) -> str:
        if value not in ("shared", "trained") and subset_size(value) is None:
            raise ValueError("expected shared, trained or shared:N (the shared head over N token ids, N >= 1)")
        return value

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        parse_policy_spec(value)
        make_policy(value)  # also checks the values
        return value


@dataclass(frozen=True)
class Point:
    """One run of a scenario: the values its sweep fixed (empty without a sweep) and the validated scenario."""

    index: int
    values: dict[str, Any]
    scenario: Scenario
    base_dir: Path
    source: str


def load_points(path: str | Path) -> list[Point]:
    """Read, expand `sweep:` and validate every point; raises `ScenarioError` before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scenario file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ScenarioError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: expected a mapping of scenario fields at the top level")
    raw = dict(raw)
    sweep = raw.pop("sweep", None) or {}
    grid = _sweep_grid(path, sweep)
    points = []
    for index, values in enumerate(grid):
        data = copy.deepcopy(raw)
        for key, value in values.items():
            for dotted, item in _assignments(key, value):
                _set_path(data, dotted, item)
        values = {k: _case_label(v) if _is_case(k) else v for k, v in values.items()}
        where = f"{path}: sweep point {values}" if values else f"{path}"
        scenario = validate(data, where)
        points.append(Point(index, values, scenario, path.parent, str(path)))
        build_plan(points[-1])  # cross-field checks (layers, memory, paths) before anything runs
    return points


def validate(data: dict[str, Any], where: str) -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError("\n".join(_describe(where, e) for e in err.errors())) from None


def _describe(where: str, error: Any) -> str:
    loc = error["loc"]
    field = ".".join(str(part) for part in loc if not _is_union_tag(part)) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return f"{where}: {field}: unknown key; allowed here: {allowed}"
    if error["type"] == "missing":
        return f"{where}: {field}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {field}: {message} (got {error.get('input')!r})"


def _is_union_tag(part: Any) -> bool:
    """pydantic puts the union member's name into `loc` (`topology.link.LinkConfig.latency_us`); drop it."""
    if not isinstance(part, str):
        return False
    models = {cls.__name__ for cls in Strict.__subclasses__()}
    return "[" in part or part.startswith("function-") or part in models | {"int", "str", "list", "bool", "float"}


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Scenario
    for part in loc:
        if isinstance(part, int) or _is_union_tag(part):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _sweep_grid(path: Path, sweep: Any) -> list[dict[str, Any]]:
    if not isinstance(sweep, dict) or not all(isinstance(k, str) for k in sweep):
        raise ScenarioError(f"{path}: sweep: expected a mapping of dotted field paths to lists of values")
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ScenarioError(f"{path}: sweep.{key}: expected a non-empty list of values (got {values!r})")
        if key == "sweep" or key.startswith("sweep."):
            raise ScenarioError(f"{path}: sweep.{key}: sweeps cannot be nested")
        if _is_case(key) and not all(isinstance(v, dict) and v and all(isinstance(k, str) for k in v) for v in values):
            raise ScenarioError(
                f"{path}: sweep.{key}: {key!r} is not a scenario field, so it must list cases, each a mapping of "
                f"field paths to values (allowed top-level fields: {sorted(Scenario.model_fields)})"
            )
    keys = list(sweep)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(sweep[k] for k in keys))]


def _is_case(key: str) -> bool:
    """A sweep key that is not a scenario field labels zipped cases: each value sets several fields together."""
    return key.split(".")[0] not in Scenario.model_fields


def _assignments(key: str, value: Any) -> list[tuple[str, Any]]:
    return list(value.items()) if _is_case(key) else [(key, value)]


def _case_label(case: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str):  # e.g. sweeping topology.link.latency_us over a preset name
            child = {}
        node[part] = child = dict(child) if isinstance(child, dict) else {}
        node = child
    node[parts[-1]] = value


# ---- plans ----------------------------------------------------------------------------------------------------------
def model_config(scenario: Scenario) -> ModelConfig:
    if isinstance(scenario.model, str):
        return MODELS[scenario.model]
    return ModelConfig(**scenario.model.model_dump())


def build_plan(point: Point, method: str | None = None) -> SimPlan:
    """The engine plan of one point (`method` overrides the scenario's, e.g. `"ar"` for the baseline)."""
    s, where = point.scenario, _where(point)
    model = model_config(s)
    dtype_bytes = DTYPE_BYTES[s.dtype]
    exit_layer = _exit_layer(s, model, where)
    try:
        head_vocab_fraction(s.exit_head, model)
    except ValueError as err:
        raise ScenarioError(f"{where}: exit_head: {err}") from None
    stages = _stages(point, model, dtype_bytes, exit_layer, where)
    plan = SimPlan(
        model=model,
        stages=stages,
        link=_link(s.topology.link, point, "topology.link"),
        method=method or s.method,
        acceptance=_acceptance(point, exit_layer, where),
        workload=Workload(**s.workload.model_dump()),
        exit_layer=exit_layer,
        exit_head=s.exit_head,
        policy=s.policy,
        dtype_bytes=dtype_bytes,
        max_in_flight=s.max_in_flight,
        seed=s.seed,
        chain_zero_rounds=s.zero_draft_rounds == "chained",
        sync_every=s.sync_every,
        ppsd_backend=s.ppsd_backend,
    )
    _check_policy(point, plan, where)
    slots = cache_slots(plan) if s.attention == "cache" else None
    return SimPlan(**{**plan.__dict__, "cost_ratio": cost_ratio(plan), "cache_slots": slots})


def cache_slots(plan: SimPlan) -> int:
    """The executor's cache capacity for this plan: prompt + output, + the largest draft + 1 for AR and EESD
    (`executor.api.PassSetup`; PPSD's pipeline holds prompt + output), rounded up to a multiple of CAPACITY_STEP when
    its passes are captured (CUDA graphs)."""
    slots = plan.workload.prompt_len + plan.workload.output_len
    if plan.method != "ppsd":
        slots += 1 + (make_policy(plan.policy).max_draft_len if plan.method == "eesd" else 0)
    if plan.stages[0].latency.cuda_graphs:
        slots = -(-slots // CAPACITY_STEP) * CAPACITY_STEP
    return slots


def cost_ratio(plan: SimPlan) -> float:
    """c = one draft step / one verify pass of 2 tokens, at the prompt's context and the batch size."""
    context, batch, layers = plan.workload.prompt_len, plan.workload.batch_size, plan.model.num_layers
    draft = Pass("draft", "draft", ((0, plan.exit_layer, 1),), exit_at=plan.exit_layer)
    verify = Pass("verify", "verify", ((0, plan.exit_layer, 1), (plan.exit_layer, layers, 2)), lm_head_q=2)
    draft_us = sum(
        stage_time_us(plan, s, draft, context, batch) for s in plan.stages if s.layer_start < plan.exit_layer
    )
    verify_us = sum(stage_time_us(plan, s, verify, context, batch) for s in plan.stages)
    return max(draft_us / verify_us, 1e-6) if verify_us > 0 else 1.0


def exit_layer_of(point: Point) -> int:
    """The exit layer a point runs with (defaults resolved)."""
    return _exit_layer(point.scenario, model_config(point.scenario), _where(point))


def _where(point: Point) -> str:
    return f"{point.source}: sweep point {point.values}" if point.values else point.source


def _exit_layer(s: Scenario, model: ModelConfig, where: str) -> int:
    layers = model.num_layers
    if s.exit_layer is None:
        if s.method == "eesd":
            return max(1, layers // 4)
        n = s.topology.stages if isinstance(s.topology.stages, int) else len(s.topology.stages)
        first = s.topology.stages[0].layers if isinstance(s.topology.stages, list) else None
        return first or max(1, round(layers / max(n, 2)))
    if not 1 <= s.exit_layer < layers:
        raise ScenarioError(
            f"{where}: exit_layer: expected 1 <= exit_layer < {layers} (model layers), got {s.exit_layer}"
        )
    return s.exit_layer


def _stages(point: Point, model: ModelConfig, dtype_bytes: int, exit_layer: int, where: str) -> tuple[StagePlan, ...]:
    s = point.scenario
    topo = s.topology
    configs = [StageConfig()] * topo.stages if isinstance(topo.stages, int) else list(topo.stages)
    counts = _layer_counts(s, configs, model.num_layers, exit_layer, where)
    stages, start = [], 0
    for index, (config, count) in enumerate(zip(configs, counts, strict=True)):
        gpu_name, tp = config.gpu or topo.gpu, config.tp or topo.tp
        latency = _latency(point, gpu_name, model, dtype_bytes, tp)
        tp_link = _link(topo.tp_link, point, "topology.tp_link")
        stage = StagePlan(start, start + count, latency, gpu_name, tp, tp_link)
        _check_memory(stage, model, dtype_bytes, index, where)
        stages.append(stage)
        start += count
    return tuple(stages)


def _layer_counts(s: Scenario, configs: list[StageConfig], layers: int, exit_layer: int, where: str) -> list[int]:
    n = len(configs)
    if s.method == "ppsd" and n < 2:
        raise ScenarioError(f"{where}: topology.stages: ppsd needs at least 2 stages (got {n})")
    given = [c.layers for c in configs]
    if all(g is not None for g in given):
        if sum(given) != layers:  # type: ignore[arg-type]
            raise ScenarioError(f"{where}: topology.stages: layers add up to {sum(given)}, the model has {layers}")  # type: ignore[arg-type]
        counts = list(given)  # type: ignore[arg-type]
    elif any(g is not None for g in given):
        raise ScenarioError(f"{where}: topology.stages: give 'layers' for every stage or for none")
    elif n > layers:
        raise ScenarioError(f"{where}: topology.stages: {n} stages but only {layers} layers")
    elif s.method == "ppsd" and s.exit_layer is not None and n > 1:
        if layers - exit_layer < n - 1:
            raise ScenarioError(f"{where}: exit_layer: leaves {layers - exit_layer} layers for {n - 1} later stages")
        counts = [exit_layer, *_balanced(layers - exit_layer, n - 1)]
    else:
        counts = _balanced(layers, n)
    if s.method == "ppsd" and counts[0] != exit_layer:
        raise ScenarioError(f"{where}: exit_layer: ppsd drafts at the end of stage 1, so it must be {counts[0]}")
    return counts  # type: ignore[return-value]


def _balanced(layers: int, n: int) -> list[int]:
    bounds = [round(i * layers / n) for i in range(n + 1)]
    return [bounds[i + 1] - bounds[i] for i in range(n)]


def _check_memory(stage: StagePlan, model: ModelConfig, dtype_bytes: int, index: int, where: str) -> None:
    params = (stage.layer_end - stage.layer_start) * model.layer_params + model.lm_head_params
    weights_gib = params * dtype_bytes / stage.tp / 2**30
    capacity = GPUS[stage.device].memory_GiB
    if weights_gib > 0.95 * capacity:
        raise ScenarioError(
            f"{where}: topology.stages[{index}]: {weights_gib:.1f} GiB of weights per GPU do not fit a "
            f"{capacity:.0f} GiB {stage.device}; use more stages or a larger tp"
        )


def _latency(point: Point, gpu_name: str, model: ModelConfig, dtype_bytes: int, tp: int) -> LatencyModel:
    config = point.scenario.latency
    if config.constant_us is not None:
        return ConstantLatency(dict(config.constant_us))
    if config.profile is not None:
        profile = read_latency_profile(_resolve(point, config.profile.path, "latency.profile.path"))
        return ProfileLatency(profile, cuda_graphs=config.profile.cuda_graphs)
    r = config.roofline or Roofline()
    return RooflineLatency(gpu(gpu_name), model, dtype_bytes, tp, **r.model_dump())


def _link(config: str | LinkConfig, point: Point, field: str) -> LinkModel:
    if isinstance(config, str):
        return LINKS[config]
    if config.profile is not None:
        return ProfiledLink(read_link_profile(_resolve(point, config.profile, f"{field}.profile")))
    return LinkSpec("custom", config.latency_us, config.bandwidth_GBps)


def _acceptance(point: Point, exit_layer: int, where: str) -> AcceptanceModel:
    a = point.scenario.acceptance
    if a.alpha is not None:
        return BernoulliAcceptance(a.alpha, a.confidence_sharpness)
    if a.alphas is not None:
        return PositionalAcceptance(tuple(a.alphas))
    trace = read_acceptance_trace(_resolve(point, a.trace or "", "acceptance.trace"))
    try:
        return TraceAcceptance(trace, exit_layer)
    except ValueError as err:
        raise ScenarioError(f"{where}: acceptance.trace: {err}") from None


def _check_policy(point: Point, plan: SimPlan, where: str) -> None:
    policy = make_policy(plan.policy)
    if plan.method == "eesd" and policy.needs_confidence and not plan.acceptance.has_confidence:
        raise ScenarioError(
            f"{where}: policy: {plan.policy!r} needs draft confidences; use acceptance.trace or set "
            f"acceptance.confidence_sharpness (allowed policies: {policy_usage()})"
        )


def _resolve(point: Point, relative: str, field: str) -> Path:
    path = (point.base_dir / relative).resolve()
    if not path.is_file():
        raise ScenarioError(f"{_where(point)}: {field}: file not found: {path}")
    return path
