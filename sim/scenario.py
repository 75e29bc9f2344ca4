"""Scenario YAML: schema (pydantic), validation with readable messages and `sweep:` expansion into points.

A scenario names a model, where latencies come from (roofline, profile or constants), how drafts are accepted (α,
per-position α_i or a trace), the topology (GPUs, stages, tensor parallelism, links), the method and policy, and the
workload. Errors name the file, the field path and what was expected (`ScenarioError`, a `ValueError`). Paths inside
a scenario are relative to the scenario file. Times in µs, bandwidths in GB/s, memory in GiB. What a point runs
(models, profiles, devices, stages) is resolved and cross-checked by `sim.plan`; `load_points` asks it for every
point, so that a scenario fails before anything runs.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from sim.formats import COMPONENTS, DataFile, quote, read_text, subset_size
from sim.hardware import GPUS, H100_KERNEL_FLOOR_US, H100_LAUNCH_US, LINKS, GPUSpec
from sim.models import MODELS, ModelConfig, check_claimed_model, check_profiled_layers
from sim.policy import make_policy, parse_policy_spec

Component = Literal["embed", "layer", "exit_head", "lm_head", "overhead"]
assert set(typing.get_args(Component)) == set(COMPONENTS)


class ScenarioError(ValueError):
    """A scenario problem: `FILE: FIELD: what was expected`."""


class Strict(BaseModel):
    """Unknown keys refused; values of the field's type only (`true` is not an integer, "3" not a number, 1 not a
    boolean; an integer is a number); numbers finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _one_of(expected: str, *members: Any) -> Any:
    """A union of `members` (str, int, a list or a model) that validates a value against the member of the value's
    own type only: a mistake inside an inline model is reported once, as that model's field (not first as "Input
    should be a valid string"); a value of no member's type as `expected`."""

    def pick(value: Any) -> str | None:
        return next((_tag(m) for m in members if _is_kind(value, m)), None)

    tagged = tuple(Annotated[m, Tag(_tag(m))] for m in members)
    return Annotated[Union[tagged], Discriminator(pick, custom_error_type="wrong_type", custom_error_message=expected)]  # noqa: UP007


def _origin(member: Any) -> Any:
    """The class of a union member: `list` for `list[X]`, X's for `Annotated[X, ...]`, else the member."""
    if typing.get_origin(member) is Annotated:
        return _origin(typing.get_args(member)[0])
    return typing.get_origin(member) or member


def _tag(member: Any) -> str:
    return _origin(member).__name__


def _is_kind(value: Any, member: Any) -> bool:
    origin = _origin(member)
    if issubclass(origin, BaseModel):
        return isinstance(value, (dict, origin))
    return isinstance(value, origin) and not isinstance(value, bool)


MAX_LAYERS = 1024  # no decoder has more (the largest have ~130); bounds the stages a scenario can ask for
MAX_DIM = 2**31 - 1  # widths and counts of a model shape, and token counts, as the executor's int32 indices hold


class ModelShape(Strict):
    name: str = Field(min_length=1, max_length=200)
    num_layers: int = Field(gt=1, le=MAX_LAYERS)
    hidden_size: int = Field(gt=0, le=MAX_DIM)
    num_heads: int = Field(gt=0, le=MAX_DIM)
    num_kv_heads: int = Field(gt=0, le=MAX_DIM)
    intermediate_size: int = Field(gt=0, le=MAX_DIM)
    vocab_size: int = Field(gt=0, le=MAX_DIM)
    head_size: int | None = Field(None, gt=0, le=MAX_DIM)  # default hidden_size / num_heads
    max_position_embeddings: int | None = Field(None, gt=0, le=MAX_DIM)  # the context; None: not checked

    @model_validator(mode="after")
    def _heads_fit(self) -> ModelShape:
        """Grouped-query attention shares each key/value head among whole query heads, and without `head_size` a
        head is hidden_size / num_heads wide: a shape no model has is refused, not priced."""
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads} "
                             "(each key/value head serves a whole group of query heads)")  # fmt: skip
        if self.head_size is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}: give "
                             "head_size where heads are not hidden_size / num_heads wide")  # fmt: skip
        return self


def _check_path(value: str) -> str:
    """A path a file can have (a file system refuses others with errors that name no field): not empty, no NUL
    character, at most 4096 bytes, each part at most 255."""
    parts = value.encode("utf-8", "surrogateescape").split(b"/")
    if not value or "\x00" in value or len(value.encode("utf-8", "surrogateescape")) > 4096:
        raise ValueError("expected a file's path: 1 to 4096 bytes, no NUL character")
    if any(len(part) > 255 for part in parts):
        raise ValueError("expected a file's path: each folder or file name at most 255 bytes")
    return value


FilePath = Annotated[str, AfterValidator(_check_path)]


class Roofline(Strict):
    cuda_graphs: bool = True
    bandwidth_efficiency: float = Field(0.61, gt=0, le=1)
    flops_efficiency: float = Field(0.6, gt=0, le=1)
    eager_layer_us: float = Field(560.0, ge=0)
    overhead_us: float = Field(20.0, ge=0)


class ProfileRef(Strict):
    path: FilePath
    cuda_graphs: bool = True
    # the host's work around each read in place of the profile's `overhead` rows (µs), every method alike (one
    # method's own with `serving.by_method`)
    overhead_us: float | None = Field(None, ge=0, le=1e9)
    # an `eesd calibrate host` file: AR and EESD decode passes (and PPSD's ticks on one host, where the file times
    # them) pay their own measured host work at the point's batch size in place of the profile's `overhead` rows
    # (`sim.host_work`; prefill, and PPSD otherwise, keep the rows)
    host_work: FilePath | None = None

    @model_validator(mode="after")
    def _one_host_figure(self) -> ProfileRef:
        if self.overhead_us is not None and self.host_work is not None:
            raise ValueError("give overhead_us (one figure) or host_work (each method's measured figures), not both")
        return self


class LatencyConfig(Strict):
    """Exactly one of `roofline`, `profile`, `constant_us`; with `profile`, `draft_profile` costs the draft steps of a
    scenario whose `draft_dtype` is narrower than its `dtype` (a profile measured in that dtype)."""

    roofline: Roofline | None = None
    profile: ProfileRef | None = None
    constant_us: dict[Component, float] | None = None
    draft_profile: ProfileRef | None = None

    @model_validator(mode="after")
    def _one_source(self) -> LatencyConfig:
        given = [k for k in ("roofline", "profile", "constant_us") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of roofline, profile, constant_us (got {given or 'none'})")
        if self.constant_us and any(v < 0 for v in self.constant_us.values()):
            raise ValueError("constant_us values must be >= 0")
        if self.draft_profile is not None and self.profile is None:
            raise ValueError("draft_profile only applies with profile (a roofline derives the draft's times itself)")
        return self


class AcceptanceConfig(Strict):
    """Exactly one of `alpha`, `alphas`, `trace`."""

    alpha: float | None = Field(None, ge=0, le=1)
    alphas: list[float] | None = Field(None, min_length=1, max_length=MAX_LAYERS)  # one per draft of a round
    trace: FilePath | None = None
    confidence_sharpness: float | None = Field(None, gt=0)
    # a trace with fewer tokens or prompts than the workload replays: "none", an error; "cycle", replayed cyclically
    # (its tokens reused, said in the output)
    reuse: Literal["none", "cycle"] = "none"
    # a replayed request whose text reaches an EOS: "stop" there, as the executor stops (fewer tokens than
    # output_len); "continue" into the next prompt's tokens, so that every request generates output_len
    at_eos: Literal["stop", "continue"] = "stop"

    @model_validator(mode="after")
    def _one_source(self) -> AcceptanceConfig:
        given = [k for k in ("alpha", "alphas", "trace") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of alpha, alphas, trace (got {given or 'none'})")
        if self.alphas and not all(0 <= a <= 1 for a in self.alphas):
            raise ValueError("alphas must all be in [0, 1]")
        if self.confidence_sharpness is not None and self.alpha is None:
            raise ValueError("confidence_sharpness only applies with alpha (traces carry their own confidences)")
        if self.reuse != "none" and self.trace is None:
            raise ValueError("reuse only applies with trace (how a trace shorter than the workload is replayed)")
        if self.at_eos != "stop" and self.trace is None:
            raise ValueError("at_eos only applies with trace (whether a replayed request ends at its EOS)")
        return self


class LinkConfig(Strict):
    """A custom link: `latency_us` + `bandwidth_GBps` (omit for infinite), or a measured `profile` CSV."""

    latency_us: float = Field(0.0, ge=0)
    bandwidth_GBps: float | None = Field(None, gt=0)
    profile: FilePath | None = None


def _check_link_name(value: str | LinkConfig) -> str | LinkConfig:
    if isinstance(value, str) and value not in LINKS:
        raise ValueError(
            f"unknown link preset {quote(value)}{_named(value, LINKS)}; known: {sorted(LINKS)} or "
            "{latency_us, bandwidth_GBps}"
        )
    return value


def _named(value: str, names: Iterable[str]) -> str:
    """` (did you mean 'X'?)` for the name `value` likely misspells (case aside first), or nothing."""
    names = list(names)
    same = [name for name in names if name.lower() == value.lower()]
    near = (
        same
        or difflib.get_close_matches(value, names, n=1)
        or difflib.get_close_matches(value.lower(), [name.lower() for name in names], n=1)
    )
    if not near:
        return ""
    meant = next((name for name in names if name.lower() == near[0].lower()), near[0])
    return f" (did you mean {quote(meant)}?)"


class GPUConfig(Strict):
    """A GPU given inline (one not in `sim.hardware.GPUS`), from its datasheet: `source` names it."""

    name: str = Field(min_length=1)
    hbm_bandwidth_GBps: float = Field(gt=0)
    peak_tflops: dict[Literal["bf16", "fp16", "fp32", "fp8"], float] = Field(min_length=1)  # dense, per dtype
    memory_GiB: float = Field(gt=0)
    kernel_floor_us: float = Field(H100_KERNEL_FLOOR_US, ge=0)  # default: measured on an H100 (sim/hardware.py)
    launch_us: float = Field(H100_LAUNCH_US, ge=0)  # default: measured on an H100 (sim/hardware.py)
    source: str = Field(min_length=1)

    @field_validator("peak_tflops")
    @classmethod
    def _peaks(cls, value: dict[str, float]) -> dict[str, float]:
        if not all(v > 0 for v in value.values()):
            raise ValueError("peak_tflops values must be > 0 (dense TFLOP/s per dtype)")
        return value

    def spec(self) -> GPUSpec:
        return GPUSpec(self.name, self.hbm_bandwidth_GBps, dict(self.peak_tflops), self.memory_GiB,
                       self.kernel_floor_us, self.source, self.launch_us)  # fmt: skip


DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}  # torch's


def _short_dtype(value: Any) -> Any:
    """A dtype by torch's name (as calibration files record it) read as the short one."""
    return DTYPE_NAMES.get(value, value) if isinstance(value, str) else value


def _check_gpu_name(value: str | GPUConfig | None) -> str | GPUConfig | None:
    if isinstance(value, str) and value not in GPUS:
        raise ValueError(
            f"unknown GPU {quote(value)}{_named(value, GPUS)}; known: {sorted(GPUS)} or an inline GPU ({_GPU_KEYS})"
        )
    return value


_GPU_KEYS = "{name, hbm_bandwidth_GBps, peak_tflops: {bf16, fp16, fp32[, fp8]}, memory_GiB, source}"
GPUField = _one_of(f"expected a GPU's name ({sorted(GPUS)}) or an inline GPU {_GPU_KEYS}", str, GPUConfig)
LinkField = _one_of(
    f"expected a link preset ({sorted(LINKS)}) or a link {{latency_us, bandwidth_GBps}} or {{profile}}", str, LinkConfig
)


class StageConfig(Strict):
    gpu: GPUField | None = None
    tp: int | None = Field(None, ge=1)
    layers: int | None = Field(None, ge=1)
    device: int | None = Field(None, ge=0)  # stages with the same index share one device
    # the link from this stage to the next (the last stage's: back to stage 1), e.g. between two nodes; default
    # topology.link
    link: LinkField | None = None

    _gpu = field_validator("gpu")(_check_gpu_name)
    _link = field_validator("link")(_check_link_name)


class TopologyConfig(Strict):
    # every stage's GPU (a stage may name its own), `sim.plan.DEFAULT_GPU` where none is named; a stage costed by a
    # latency profile runs on the profile's device, so a GPU named for it must be that device
    gpu: GPUField | None = None
    stages: _one_of(
        "expected an integer >= 1 or a list of stages", int, Annotated[list[StageConfig], Field(max_length=MAX_LAYERS)]
    ) = Field(1)
    # how many devices the stages run on, in contiguous blocks (default: one per stage; ppsd_backend streams or
    # sequential: one); a stage list may instead give each stage's `device` index
    devices: int | None = Field(None, ge=1)
    # how passes that share a device at once share it: a contention profile (docs/formats.md), else sim.contention's
    # fallback from the device's spec; a `processes` profile: how distributed stage processes on one host slow each
    # other
    contention: FilePath | None = None
    tp: int = Field(1, ge=1)
    link: LinkField = "nvlink"
    tp_link: LinkField = "nvlink"

    _gpu = field_validator("gpu")(_check_gpu_name)
    _links = field_validator("link", "tp_link")(_check_link_name)

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: int | list[StageConfig]) -> int | list[StageConfig]:
        if isinstance(value, int) and value < 1 or isinstance(value, list) and not value:
            raise ValueError("stages must be an integer >= 1 or a non-empty list of stages")
        return value

    @model_validator(mode="after")
    def _devices(self) -> TopologyConfig:
        given = [c.device for c in self.stages] if isinstance(self.stages, list) else []
        if any(d is not None for d in given):
            if None in given:
                raise ValueError("give a stage's `device` for every stage or for none")
            if self.devices is not None:
                raise ValueError("give topology.devices or each stage's `device`, not both")
            used = sorted(set(given))
            if used != list(range(len(used))):
                raise ValueError(f"stage device indices must be 0, 1, .. without gaps, got {given}")
        count = len(self.stages) if isinstance(self.stages, list) else self.stages
        if self.devices is not None and self.devices > count:
            raise ValueError(f"devices ({self.devices}) must not exceed the stages ({count})")
        return self


class WorkloadConfig(Strict):
    requests: int = Field(1, ge=1)
    batch_size: int = Field(1, ge=1)
    prompt_len: int = Field(128, ge=1, le=MAX_DIM)  # and prompt_len + output_len within the model's context
    output_len: int = Field(128, ge=1, le=MAX_DIM)


DEFAULT_MAX_TOKENS = 200_000  # about a minute of simulation for a point of PPSD over 8 stages on one core
DEFAULT_MAX_POINTS = 1_000


class Limits(Strict):
    """What a scenario may ask of this machine (docs: scenarios/README.md); raise them to run more, knowingly."""

    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)  # tokens one point simulates per method: requests x output_len
    max_points: int = Field(DEFAULT_MAX_POINTS, ge=1)  # points of a sweep


MAX_NAME_CHARS = 200  # a file name holds 255 bytes


class Scenario(Strict):
    name: str
    description: str = ""
    seed: int = Field(0, ge=0)
    model: _one_of("expected a model's name or an inline shape {name, num_layers, ...}", str, ModelShape)
    dtype: Annotated[Literal["bf16", "fp16", "fp32"], BeforeValidator(_short_dtype)] = "bf16"
    # EESD drafts with copies of layers [0, E) and the exit head in this narrower dtype (the executor's `draft_dtype`);
    # the verify pass then runs every layer over the round's tokens in `dtype`. None or `dtype`: drafts in `dtype`.
    # fp8 (8-bit draft weights) is a roofline what-if: the executor drafts in bf16 / fp16 only
    draft_dtype: Annotated[Literal["bf16", "fp16", "fp32", "fp8"] | None, BeforeValidator(_short_dtype)] = None
    method: Literal["ar", "eesd", "ppsd"]
    exit_layer: int | None = Field(None, ge=1)
    exit_head: str = "shared"  # shared | shared:N (the shared head over N of the V ids) | trained | trained:N
    policy: str = "fixed:4"
    max_in_flight: int | None = Field(None, ge=1)
    # EESD rounds that draft nothing (k = 0): "chained", AR steps chained on the device with one host read per block
    # (as the executor runs them), or "verify", one verify pass and host read per round (an executor that does not
    # chain them)
    zero_draft_rounds: Literal["chained", "verify"] = "chained"
    # chained AR steps, zero-draft rounds or (ppsd_backend streams or sequential) PPSD ticks per host read, as the
    # executor's `generate(sync_every=)`; 1: a host read after every step or tick. Default: the executor's own,
    # SYNC_CAPTURED for captured passes (latency cuda_graphs) and 1 uncaptured or frozen
    sync_every: int | None = Field(None, ge=1)
    # PPSD's backend, as the executor's: "distributed", a process per stage (default: a device each), each host taking
    # part in every tick, the ranks in lockstep: a tick ends when the last rank's outcome has reached every rank and
    # each rank's header and hidden state the next; "free", a process per stage on a device each, every stage starting
    # its next token as soon as it has one (a free-running pipe, the schedule's bound: no executor backend runs it);
    # "streams", one host, the stages of a tick launched together on one GPU (default: one device
    # for all stages), chaining sync_every ticks per host read; "sequential", one host running the stages of a tick
    # one after the other (default: one device)
    ppsd_backend: Literal["distributed", "free", "streams", "sequential"] = "distributed"
    # decode passes attend over: "buckets", the executor's span bucket of its static cache (the power-of-two number
    # of slots, at least 64, holding the furthest position the pass writes, capped at the capacity: prompt + output +
    # max draft + 1, a multiple of 256 with cuda_graphs), as the executor does by default; "cache", every slot of that
    # cache, masked (the executor with span buckets off, or frozen CPU passes); "context", the positions so far (a
    # decoder with dynamic shapes, e.g. HF's)
    attention: Literal["buckets", "cache", "context"] = "buckets"
    # EESD on frozen passes (a latency profile measured with `--kernels frozen`): a round of k drafts runs the verify
    # pass of its bucket (the smallest power of two holding k, at most the policy's longest draft), as the executor
    # does by default; false: a verify pass per draft length (the executor's `verify_buckets=False`). Nothing changes
    # elsewhere: other passes are never padded
    verify_buckets: bool = True
    latency: LatencyConfig = LatencyConfig(roofline=Roofline())
    acceptance: AcceptanceConfig
    topology: TopologyConfig = TopologyConfig()
    workload: WorkloadConfig = WorkloadConfig()
    limits: Limits = Limits()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        """The name is the default output folder's (`runs/<name>`): one folder name, never a path out of it."""
        bad = value in ("", ".", "..") or any(c in value for c in "/\\") or not value.isprintable()
        if bad or len(value) > MAX_NAME_CHARS:
            raise ValueError(
                f"expected a folder name (the default output folder is runs/<name>): 1 to {MAX_NAME_CHARS} printable "
                "characters, no / or \\, not . or .."
            )
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | ModelShape) -> str | ModelShape:
        if isinstance(value, str) and value not in MODELS:
            same = [name for name in MODELS if name.lower() == value.lower()]  # a packaged name: smollm2-135m
            if len(same) == 1:
                return same[0]
            raise ValueError(
                f"unknown model {quote(value)}{_named(value, MODELS)}; known: {sorted(MODELS)} or an inline shape"
            )
        return value

    @field_validator("exit_head")
    @classmethod
    def _exit_head(cls, value: str) -> str:
        if value not in ("shared", "trained") and subset_size(value) is None:
            raise ValueError(
                "expected shared, trained, shared:N or trained:N (the shared or a trained head over N token ids, "
                "N >= 1)"
            )
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
    """Read, expand `sweep:` and validate every point, and check that each makes a plan (`sim.plan.build_plan`:
    layers, memory, devices, files); raises `ScenarioError` before anything runs."""
    from sim.plan import build_plan  # the plan is built from this module's points, so it imports this module

    points = _read_points(path)
    for point in points:
        build_plan(point)
    return points


def point_where(source: str, values: dict[str, Any]) -> str:
    """How errors name a point: the file, and the values its sweep fixed (quoted short)."""
    return f"{source}: sweep point {quote(values, 200)}" if values else source


def _read_points(path: str | Path) -> list[Point]:
    """Read, expand `sweep:` and validate every point against the schema (no cross-field checks: `load_points`)."""
    path = Path(path)
    try:
        found = path.is_file()
    except (OSError, ValueError) as err:  # a name too long, a NUL character
        reason = err.strerror if isinstance(err, OSError) else str(err)
        raise FileNotFoundError(f"{quote(str(path))}: not a file's path ({reason})") from None
    if not found:
        what = "a folder, not a scenario file (give a .yaml file in it)" if path.is_dir() else "scenario file not found"
        raise FileNotFoundError(f"{path}: {what}")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: expected a mapping of scenario fields at the top level")
    raw = dict(raw)
    sweep = raw.pop("sweep", None) or {}
    grid = _sweep_grid(path, sweep, _limits(path, raw.get("limits", {})).max_points)
    points = []
    for index, values in enumerate(grid):
        data = copy.deepcopy(raw)
        for key, value in values.items():
            for dotted, item in _assignments(key, value):
                _set_path(data, dotted, item)
        values = {k: _case_label(v) if _is_case(k) else v for k, v in values.items()}
        where = point_where(str(path), values)
        try:
            scenario = validate(data, where)
        except ScenarioError as err:
            raise _scenario_wide(err, raw, where, str(path)) from None
        points.append(Point(index, values, scenario, path.parent, str(path)))
    return points


def _scenario_wide(err: ScenarioError, raw: dict[str, Any], where: str, source: str) -> ScenarioError:
    """A point's error that the scenario's own fields give whatever its sweep sets (a typo outside the sweep), named
    at the scenario rather than at the first sweep point, which had nothing to do with it."""
    if where == source:
        return err
    try:
        validate(copy.deepcopy(raw), source)
    except ScenarioError as base:
        if str(base).removeprefix(source) == str(err).removeprefix(where):
            return base
    return err


MAX_YAML_BYTES = 1 << 20  # a scenario is a few KB
ALIAS_VALUE_BUDGET = 10_000  # values that aliases (*name) may add to a YAML document once expanded


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping and remembers where aliases are."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.alias_lines: list[int] = []

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.alias_lines.append(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        problem = f"key {quote(key)} given twice (first on line {seen[key]})"
                        raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
                    seen[key] = line
                except TypeError:  # an unhashable key: the constructor refuses it with its own message
                    pass
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The data of a YAML file, bounded: at most `MAX_YAML_BYTES` of UTF-8, each key once per mapping, and anchors
    that expand to at most `ALIAS_VALUE_BUDGET` values beyond those written (an alias bomb is refused before it is
    expanded). A `ScenarioError` naming the file (and the line) otherwise."""
    path = Path(path)
    try:
        text = read_text(path, MAX_YAML_BYTES, "YAML file")
    except ValueError as err:
        raise ScenarioError(str(err)) from None
    try:
        return _load_bounded(path, text)
    except ScenarioError:
        raise
    except yaml.reader.ReaderError as err:  # a character YAML does not allow
        line = text.count("\n", 0, err.position) + 1
        code = f"#x{err.character:04x}" if isinstance(err.character, int) else quote(err.character)
        raise ScenarioError(f"{path}: invalid YAML: line {line}: {err.reason} (character {code})") from None
    except yaml.YAMLError as err:
        raise ScenarioError(f"{path}: invalid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        raise ScenarioError(f"{path}: invalid YAML: nested too deeply") from None
    except ValueError as err:  # a scalar the constructor cannot make, e.g. an integer of more than 4,300 digits
        raise ScenarioError(f"{path}: invalid YAML: {_clip(str(err), 300)}") from None


def _load_bounded(path: Path, text: str) -> Any:
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(path, node, loader.alias_lines)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: where (line, column) and what, without its multi-line snippet."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem is None:
        return _clip(" ".join(str(err).split()), 300)
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return _clip(f"{where}{context + ': ' if context else ''}{problem}", 300)


def _check_expansion(path: Path, root: yaml.Node, alias_lines: list[int]) -> None:
    """Count the values of the document with every alias expanded (iteratively, each node once); refuse a cycle
    (an alias inside its own anchor) or more than `ALIAS_VALUE_BUDGET` values added by aliases."""
    if not alias_lines:
        return
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[key] - len(sizes) > ALIAS_VALUE_BUDGET:
                break
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ScenarioError(
                f"{path}: line {alias_lines[0]}: invalid YAML: an alias inside its own anchor (a cycle)"
            )
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    total = max(sizes.values())
    if total - len(sizes) > ALIAS_VALUE_BUDGET:
        raise ScenarioError(
            f"{path}: line {alias_lines[0]}: aliases (*name) expand the document by more than "
            f"{ALIAS_VALUE_BUDGET:,} values; write the values out, or use fewer aliases"
        )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _clip(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters (an error line stays short whatever the input)."""
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text):,} characters)"


def _limits(path: Path, data: Any) -> Limits:
    """The scenario's `limits`, read before its sweep is expanded (the sweep's size is one of them)."""
    try:
        return Limits.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(_errors(str(path), err, ("limits",))) from None


def validate(data: dict[str, Any], where: str) -> Scenario:
    """The scenario of `data`, checked against the schema and against the limits its model and `limits` set."""
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(_errors(where, err)) from None
    _check_limits(scenario, where)
    return scenario


def narrow_draft_dtype(scenario: Scenario) -> str | None:
    """The dtype a scenario's EESD drafts run in where it is not the model's own (`draft_dtype`), else None."""
    return scenario.draft_dtype if scenario.draft_dtype not in (None, scenario.dtype) else None


def model_config(scenario: Scenario) -> ModelConfig:
    """The scenario's model: one of `sim.models.MODELS` by name, or its inline shape."""
    if isinstance(scenario.model, str):
        return MODELS[scenario.model]
    return ModelConfig(**scenario.model.model_dump())


_DTYPE_NAMES = {"bf16": ("bf16", "bfloat16"), "fp16": ("fp16", "float16"), "fp32": ("fp32", "float32")}


def claimed_dtype(metadata: Mapping[str, Any]) -> str | None:
    """The scenario dtype (`bf16`, `fp16`, `fp32`) a calibration file's `metadata.dtype` names (`bfloat16`,
    `torch.bfloat16` and `bf16` alike), or None where it names none of them (or none at all)."""
    dtype = str(metadata.get("dtype", "")).removeprefix("torch.")
    return next((name for name, names in _DTYPE_NAMES.items() if dtype in names), None)


def check_file_claims(point: Point, data: DataFile, field: str, dtype_field: str = "dtype") -> None:
    """What a calibration file says it was made with must be the point's: its model (`check_claimed_model`) and, for
    a latency profile, the layers it timed (`check_profiled_layers`) and, for a latency profile or a `processes`
    contention profile (stage passes it timed), its dtype (the scenario's `dtype_field`: `dtype`, or `draft_dtype`
    for the draft profile). A `ScenarioError` naming the scenario's field, the file and its metadata field."""
    s = point.scenario
    try:
        check_claimed_model(model_config(s), data.metadata)
        if data.kind == "latency_profile":
            check_profiled_layers(model_config(s), data.metadata)
        claimed, expected = claimed_dtype(data.metadata), getattr(s, dtype_field)
        timed = data.kind == "latency_profile" or data.metadata.get("backend") == "processes"
        if timed and claimed not in (None, expected):
            dtype = str(data.metadata["dtype"]).removeprefix("torch.")
            raise ValueError(
                f"metadata.dtype: the profile was measured in {dtype}; expected the scenario's {dtype_field} to match, "
                f"got {expected}"
            )
    except ValueError as err:
        raise ScenarioError(f"{point_where(point.source, point.values)}: {field}: {data.path}: {err}") from None


def _check_limits(s: Scenario, where: str) -> None:
    """What the model bounds (context, tensor parallelism, stages) and what `limits` bounds (simulated tokens)."""
    model, w = model_config(s), s.workload
    tokens = w.requests * w.output_len
    if tokens > s.limits.max_tokens:
        raise ScenarioError(
            f"{where}: workload: requests x output_len = {tokens:,} tokens, more than limits.max_tokens "
            f"({s.limits.max_tokens:,}); raise limits.max_tokens to simulate that many"
        )
    checks: list[tuple[str, Any]] = [
        ("workload.output_len", lambda: model.check_context(w.prompt_len + w.output_len, "prompt_len + output_len"))
    ]
    if s.method == "eesd":
        draft = make_policy(s.policy).max_draft_len
        checks.append(("policy", lambda: model.check_context(draft, "the policy's longest draft")))
    stages = s.topology.stages if isinstance(s.topology.stages, list) else []
    checks.append(("topology.tp", lambda: model.check_tp(s.topology.tp)))
    for index, stage in enumerate(stages):
        if stage.tp is not None:
            checks.append((f"topology.stages[{index}].tp", lambda tp=stage.tp: model.check_tp(tp)))
    count = len(stages) or s.topology.stages
    if count > model.num_layers:
        raise ScenarioError(f"{where}: topology.stages: {count} stages but {model.name} has {model.num_layers} layers")
    for field, check in checks:
        try:
            check()
        except ValueError as err:
            raise ScenarioError(f"{where}: {field}: {err}") from None


MAX_ERROR_LINES = 10  # a message of a few lines, whatever the number of mistakes


def _errors(where: str, err: ValidationError, prefix: tuple = ()) -> str:
    """pydantic's errors, a line each (`_describe`), at most `MAX_ERROR_LINES` of them."""
    errors = _typos_first([{**e, "loc": (*prefix, *e["loc"])} for e in err.errors()])
    lines = [_describe(where, e) for e in errors[:MAX_ERROR_LINES]]
    if len(errors) > MAX_ERROR_LINES:
        lines.append(f"{where}: and {len(errors) - MAX_ERROR_LINES} more mistakes of this kind or others")
    return "\n".join(lines)


def _typos_first(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unknown keys first (a misspelt key is the likelier mistake), without the "missing" error of the field a
    misspelling stands for (`hbm_bandwith_GBps` given: `hbm_bandwidth_GBps` is not missing, it is misspelt)."""
    meant = set()
    for error in errors:
        if error["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(error["loc"][-1]), _allowed_keys(error["loc"][:-1]), n=1)
            meant.update((*error["loc"][:-1], key) for key in near)
    kept = [e for e in errors if not (e["type"] == "missing" and tuple(e["loc"]) in meant)]
    return sorted(kept, key=lambda e: e["type"] != "extra_forbidden")


def _describe(where: str, error: Any) -> str:
    loc = error["loc"]
    field = _clip(".".join(str(part) for part in loc if not _is_union_tag(part)), 120) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        meant = f" (did you mean {near[0]}?)" if near else ""
        return f"{where}: {field}: unknown key{meant}; allowed here: {allowed}"
    if error["type"] == "missing":
        return f"{where}: {field}: required field is missing"
    message = _clip(error["msg"].removeprefix("Value error, "), 300)
    given = quote(error.get("input"))
    custom = error["type"] == "value_error"  # our own checks' messages (pydantic's own never name the value)
    if "got " in message or (custom and given in message):  # the check said what it was given: once is enough
        return f"{where}: {field}: {message}"
    return f"{where}: {field}: {message} (got {given})"


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


def _sweep_grid(path: Path, sweep: Any, max_points: int) -> list[dict[str, Any]]:
    if not isinstance(sweep, dict) or not all(isinstance(k, str) for k in sweep):
        raise ScenarioError(f"{path}: sweep: expected a mapping of dotted field paths to lists of values")
    for key, values in sweep.items():
        field = f"{path}: sweep.{_clip(key, 80)}"
        if not isinstance(values, list) or not values:
            raise ScenarioError(f"{field}: expected a non-empty list of values (got {quote(values)})")
        if key == "sweep" or key.startswith("sweep."):
            raise ScenarioError(f"{field}: sweeps cannot be nested")
        if key in ("name", "description"):
            raise ScenarioError(f"{field}: the scenario's {key} is one for the whole run (its output folder, its "
                                "heading); a point is named by the values its sweep sets")  # fmt: skip
        if _is_case(key) and not all(isinstance(v, dict) and v and all(isinstance(k, str) for k in v) for v in values):
            raise ScenarioError(
                f"{field}: {quote(key)} is not a scenario field, so it must list cases, each a mapping of "
                f"field paths to values (allowed top-level fields: {sorted(Scenario.model_fields)})"
            )
        if _is_case(key):
            _check_case_labels(field, values)
        repeated = [value for index, value in enumerate(values) if value in values[:index]]
        if repeated:
            raise ScenarioError(f"{field}: each value once (a repeat runs the same points twice), got "
                                f"{quote(repeated[0])} more than once")  # fmt: skip
    keys = list(sweep)
    _check_overlap(path, sweep)
    _check_points(path, sweep, max_points)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(sweep[k] for k in keys))]


def _check_case_labels(field: str, cases: list[dict[str, Any]]) -> None:
    """Each case's `name`, where given, is a non-empty text that no other case of the group has."""
    seen: set[str] = set()
    for index, case in enumerate(cases):
        if CASE_LABEL not in case:
            continue
        label = case[CASE_LABEL]
        if not isinstance(label, str) or not label.strip():
            raise ScenarioError(f"{field}[{index}].{CASE_LABEL}: expected a non-empty text naming the case, got "
                                f"{quote(label)}")  # fmt: skip
        if label in seen:
            raise ScenarioError(f"{field}[{index}].{CASE_LABEL}: {quote(label)} names two cases; expected one name "
                                "per case")  # fmt: skip
        seen.add(label)


def _check_overlap(path: Path, sweep: dict[str, list[Any]]) -> None:
    """No field is set by two sweep keys (a field and a case group, or two case groups): the later would silently
    overwrite the earlier at every point. A field and one inside it (`acceptance`, `acceptance.alpha`) overlap too."""
    owners: dict[str, str] = {}
    for key, values in sweep.items():
        fields = {k for case in values for k in case if k != CASE_LABEL} if _is_case(key) else {key}
        for field in fields:
            for other, owner in owners.items():
                if owner != key and (field == other or field.startswith(f"{other}.") or other.startswith(f"{field}.")):
                    raise ScenarioError(
                        f"{path}: sweep.{_clip(key, 80)}: sets {_clip(field, 80)}, which sweep.{_clip(owner, 80)} "
                        f"also sets ({_clip(other, 80)}): each field in one sweep key (list its values in one place, "
                        "or put them in the same cases)"
                    )
        owners.update(dict.fromkeys(fields, key))


def _check_points(path: Path, sweep: dict[str, list[Any]], max_points: int) -> None:
    if any(key == "limits" or key.startswith("limits.") for key in sweep):
        raise ScenarioError(f"{path}: sweep.limits: limits apply to the whole scenario; set them outside the sweep")
    count = math.prod(len(values) for values in sweep.values())
    if count > max_points:
        sizes = " x ".join(str(len(values)) for values in sweep.values())
        raise ScenarioError(
            f"{path}: sweep: {sizes} = {count:,} points, more than limits.max_points ({max_points:,}); raise "
            "limits.max_points to run that many"
        )


def _is_case(key: str) -> bool:
    """A sweep key that is not a scenario field labels zipped cases: each value sets several fields together."""
    return key.split(".")[0] not in Scenario.model_fields


CASE_LABEL = "name"  # in a sweep case: the case's name in tables, plots and errors (as a serving case's `name`)


def _assignments(key: str, value: Any) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in value.items() if k != CASE_LABEL] if _is_case(key) else [(key, value)]


def _case_label(case: dict[str, Any]) -> str:
    """The case's `name`, else `field=value` for each field it sets; a file by its name (the case's full path stays
    in the point)."""
    if CASE_LABEL in case:
        return str(case[CASE_LABEL])
    return " ".join(f"{k}={_short_file(k, v)}" for k, v in case.items())


def _short_file(key: str, value: Any) -> Any:
    """A file by its name; a list or mapping in YAML's flow style without quotes (`[{layers: 8}, {layers: 22}]`)."""
    is_file = key.endswith((".trace", ".path", ".profile")) and isinstance(value, str) and "/" in value
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(", ", ": "), default=str).replace('"', "")
    return PurePath(value).name if is_file else value


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
