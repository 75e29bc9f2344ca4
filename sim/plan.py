"""The simulation plan: one scenario point resolved into what the engine runs, and checked.

`build_plan(point)` resolves the point's model, latency source (roofline, profile or constants), devices, pipeline
stages, links, acceptance model and draft policy into a frozen `SimPlan`; a mistake raises `ScenarioError` naming the
scenario file and the field. A `SimPlan` also checks itself when built (a `ValueError`), so a plan built by hand is
checked too.

Devices: a stage whose latencies come from a profile runs on the device the profile was measured on (its `device`
metadata, e.g. a CPU or a GPU's name), so a `gpu` the scenario names for it must be that device; a stage costed by the
roofline or by constants runs on the GPU the scenario names (`DEFAULT_GPU` when it names none; a GPU may be given
inline, from its datasheet). Stages may share a device (`topology.devices`, or each stage's `device` index; PPSD's
one-host backends put every stage on one device unless told otherwise): their passes that run at the same time
share it (`sim.contention`), and no link lies between them. The weights of a device's stages must fit its memory
where the GPU is known. A `processes` contention profile prices instead the stage processes of a distributed PPSD
point on one CPU host, each on its own cores: their passes of a tick slow each other (`SimPlan.contention_group`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from sim.acceptance import (
    AcceptanceModel,
    BernoulliAcceptance,
    PositionalAcceptance,
    TraceAcceptance,
    check_trace_fits,
)
from sim.contention import Contention, ProfiledContention, Serial, SharedBandwidth
from sim.contract import (
    ID_BYTES,
    SYNC_CAPTURED,
    balanced_counts,
    cache_capacity,
    default_exit_layer,
    default_sync_every,
    draft_capacity,
    span_bucket,
    verify_drafts,
)
from sim.cost import cost_ratio, head_vocab_fraction, round_costs
from sim.formats import (
    DataFile,
    is_trained,
    quote,
    read_acceptance_trace,
    read_contention_profile,
    read_latency_profile,
    read_link_profile,
    trace_exit_head,
)
from sim.hardware import GPUS, LINKS, GPUSpec, LinkSpec, gpu_named_by
from sim.host_work import HostOverhead, check_fits, host_overhead, read_host_work
from sim.latency import (
    ConstantLatency,
    LatencyModel,
    LinkModel,
    ProfiledLink,
    ProfileLatency,
    RooflineLatency,
    frozen_profile,
    static_capacity,
)
from sim.models import DTYPE_BYTES, ModelConfig
from sim.policy import make_policy, parse_policy_spec, policy_usage
from sim.scenario import (
    GPUConfig,
    LinkConfig,
    Point,
    Roofline,
    Scenario,
    ScenarioError,
    StageConfig,
    WorkloadConfig,
    check_file_claims,
    model_config,
    narrow_draft_dtype,
    point_where,
)

METHODS = ("ar", "eesd", "ppsd")
PPSD_BACKENDS = ("distributed", "free", "streams", "sequential")
ONE_HOST_BACKENDS = ("streams", "sequential")  # PPSD backends whose stages share one device unless told otherwise
DEFAULT_GPU = "H100"  # the GPU of a stage not costed by a profile, where the scenario names none
MEMORY_HEADROOM = 0.95  # the share of a GPU's memory the weights may take (the rest: KV cache, activations)
IDEAL_LINK = LINKS["ideal"]  # between stages on one device: the next stage reads the hidden states where they are


@dataclass(frozen=True)
class SimStage:
    """One pipeline stage: layers [layer_start, layer_end) on one device (or a tensor-parallel group of `tp`).

    `device_index`: stages with the same index share one device (None: a device of its own). `hbm_GBps` is the
    device's effective HBM bandwidth where known (datasheet x the roofline's efficiency), None where not (a CPU);
    `launch_us` what one captured pass costs the device beyond the kernels the latency model times; `memory_GiB` the
    device's memory where its GPU is known (the table's or an inline GPU's datasheet), None where not."""

    layer_start: int
    layer_end: int
    latency: LatencyModel
    device: str = "device"
    tp: int = 1
    tp_link: LinkModel | None = None  # all-reduce link inside the stage (tp > 1)
    device_index: int | None = None
    hbm_GBps: float | None = None
    launch_us: float = 0.0
    memory_GiB: float | None = None
    draft_latency: LatencyModel | None = None  # a narrow draft step's share on this stage (None: `latency`)
    link: LinkModel | None = None  # to the next stage (the last stage's: back to stage 1); None: the plan's `link`


@dataclass(frozen=True)
class Workload:
    requests: int = 1
    batch_size: int = 1
    prompt_len: int = 128
    output_len: int = 128


@dataclass(frozen=True)
class SimPlan:
    model: ModelConfig
    stages: tuple[SimStage, ...]
    link: LinkModel
    method: str
    acceptance: AcceptanceModel
    workload: Workload = Workload()
    exit_layer: int = 1
    exit_head: str = "shared"  # shared: final norm + LM head at E | shared:N: over N ids | trained: + one layer
    # | trained:N: a trained head over N ids
    policy: str = "fixed:4"
    dtype_bytes: int = 2
    # EESD drafts on copies of layers [0, E) and the exit head in a narrower dtype of this many bytes (the stages'
    # `draft_latency`); the verify pass then runs every layer over the round's tokens (`sim.cost.verify_segments`)
    draft_dtype_bytes: int | None = None
    max_in_flight: int | None = None
    seed: int = 0
    cost_ratio: float | None = None  # draft step / verify pass, for the Thompson-sampling policies
    round_costs: tuple[float, ...] | None = None  # C_0..C_max, a round of k drafts / an AR step: what they weigh
    context_step: int = 64  # latency is looked up at the context length rounded to a multiple of this
    chain_zero_rounds: bool = True  # EESD rounds that draft nothing run as chained AR steps (as the executor does)
    sync_every: int = SYNC_CAPTURED  # captured: chained AR steps / zero-draft rounds / PPSD ticks per host read
    # PPSD's backend: "distributed", a process per stage whose host handles every tick, the ranks in lockstep ticks
    # joined by the last rank's outcome (the executor's); "free", a process per stage, each starting its next token as
    # soon as it has one (a free-running pipe: no executor backend runs it); "streams", one host that launches the
    # stages of a tick together and chains `sync_every` ticks on the device; "sequential", one host running the
    # stages of a tick in turn
    ppsd_backend: str = "distributed"
    # decode passes attend over this many cache slots (the executor's static cache: every slot, masked), or over the
    # context so far (None)
    cache_slots: int | None = None
    span_buckets: bool = False  # with cache_slots: over the span bucket of the furthest position written instead
    # frozen passes: the draft slots the verify pass after k drafts runs at, for k = 0..max (`verify_plan_widths`,
    # `sim.contract.verify_drafts`); empty: k itself
    verify_widths: tuple[int, ...] = ()
    verify_buckets: bool = True  # the scenario's: frozen verify passes at bucket widths (else `verify_widths` empty)
    # passes at the same time on a shared device (not `sequential`), or, a `processes` profile, a distributed tick's
    # stage processes on one host
    contention: Contention = SharedBandwidth()

    def __post_init__(self) -> None:
        _check_plan(self)

    def verify_slots(self, k: int) -> int:
        """The draft slots of the verify pass that checks k drafts: k, or its bucket on frozen passes."""
        return self.verify_widths[k] if k < len(self.verify_widths) else k

    def attended(self, context_len: int, phase: str) -> int:
        """The context a pass is costed at: for a decode pass whose furthest written position is context_len - 1,
        every cache slot, or that position's span bucket (`sim.contract.span_bucket`); prefill, or no static cache,
        its own context."""
        slots = self.cache_slots
        if not slots or phase == "prefill":
            return context_len
        return span_bucket(context_len - 1, slots) if self.span_buckets else slots

    def host_context(self, context_len: int, phase: str) -> int:
        """The context the host's per-pass `overhead` is looked up at: the host reads no K/V, so a span bucket does not
        change its work; with a static cache, the capacity (rounded to `context_step`, as a pass over every slot
        is), else the pass's own context."""
        if not self.cache_slots or phase == "prefill":
            return context_len
        return self.rounded(self.cache_slots)

    def rounded(self, context_len: int) -> int:
        """`context_len` rounded to the nearest multiple of `context_step`: where latency is looked up."""
        step = self.context_step
        return (context_len + step // 2) // step * step

    def device_of(self, stage: int) -> int:
        """The device stage `stage` runs on: its `device_index`, else one of its own (numbered after the shared)."""
        index = self.stages[stage].device_index
        if index is not None:
            return index
        shared = [s.device_index for s in self.stages if s.device_index is not None]
        return (max(shared) + 1 if shared else 0) + stage

    @property
    def shares_devices(self) -> bool:
        """Whether two stages run on one device."""
        devices = [self.device_of(i) for i in range(len(self.stages))]
        return len(set(devices)) < len(devices)

    def link_after(self, stage: int) -> LinkModel:
        """The link from stage `stage` to the next: the stage's own, else the plan's (none between stages on one
        device)."""
        if self.device_of(stage) == self.device_of(stage + 1):
            return IDEAL_LINK
        return self.stages[stage].link or self.link

    @property
    def return_link(self) -> LinkModel:
        """The link the last stage's token ids take back to stage 1: the last stage's own, else the plan's."""
        return self.link_back(len(self.stages) - 1)

    def link_back(self, stage: int) -> LinkModel:
        """The link token ids take back to stage 1 from `stage`, where a pass ended: none from stage 1's device; the
        last stage's own link (else the plan's) from the last stage; from a stage in between, the slowest hop on the
        way there (the way back crosses what the way there crossed: a node boundary, say)."""
        if self.device_of(stage) == self.device_of(0):
            return IDEAL_LINK
        if stage == len(self.stages) - 1:
            return self.stages[stage].link or self.link
        return max((self.link_after(i) for i in range(stage)), key=lambda link: link.time_us(ID_BYTES))

    @property
    def links(self) -> tuple[LinkModel, ...]:
        """Every link a pass or token can take: the plan's and the stages' own."""
        return (self.link, *(s.link for s in self.stages if s.link is not None))

    def stage_contention(self) -> Contention:
        """How the passes of one tick share a device: in turn with the `sequential` backend, else `contention`."""
        return Serial() if self.ppsd_backend == "sequential" else self.contention

    def contention_group(self, stage: int) -> int | str:
        """Which of a tick's passes slow stage `stage`'s: those on its device, or, under a `processes` profile (a
        distributed tick's stage processes on one host), those on its host (a device name)."""
        if getattr(self.contention, "scope", "device") == "host" and self.ppsd_backend == "distributed":
            return self.stages[stage].device
        return self.device_of(stage)

    @property
    def draft_copy_bytes(self) -> float:
        """The narrow draft copies' bytes on the first stage's device (`draft_copy_bytes`); 0 without."""
        return draft_copy_bytes(self.model, self.exit_layer, self.exit_head, self.draft_dtype_bytes)

    @property
    def head_layer_at(self) -> int:
        """Where a trained head's own layer runs in an EESD verify pass or chained step (its KV follows every
        verified position): after the exit layer; 0 for a head without a layer."""
        return self.exit_layer if is_trained(self.exit_head) else 0

    @property
    def prefill_head_layer_at(self) -> int:
        """Where a trained head's layer runs over the prompt in a prefill (EESD and PPSD fill its KV there, the
        executor's `head.prefill`); 0 for AR, which runs no head."""
        return self.head_layer_at if self.method in ("eesd", "ppsd") else 0


def _check_plan(plan: SimPlan) -> None:
    if plan.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {plan.method!r}")
    if plan.ppsd_backend not in PPSD_BACKENDS:
        raise ValueError(f"ppsd_backend must be one of {PPSD_BACKENDS}, got {plan.ppsd_backend!r}")
    _check_shared_devices(plan.stages)
    if plan.method == "ppsd" and plan.ppsd_backend == "free" and plan.shares_devices:
        raise ValueError("ppsd_backend 'free' runs every stage on a device of its own; stages share one here")
    layers = plan.model.num_layers
    expected = 0
    for stage in plan.stages:
        if stage.layer_start != expected or stage.layer_end <= stage.layer_start:
            raise ValueError(f"stages must cover layers [0, {layers}) in order without gaps; got {plan.stages}")
        expected = stage.layer_end
    if expected != layers:
        raise ValueError(f"stages cover {expected} layers, the model has {layers}")
    if not 1 <= plan.exit_layer < layers and plan.method != "ar":
        raise ValueError(f"exit_layer must be in [1, {layers - 1}], got {plan.exit_layer}")
    head_vocab_fraction(plan.exit_head, plan.model)
    if plan.method == "ppsd" and plan.exit_layer > plan.stages[0].layer_end:
        raise ValueError(f"ppsd drafts inside stage 1: exit_layer must be at most {plan.stages[0].layer_end}")
    if plan.draft_dtype_bytes is not None and plan.method != "eesd":
        raise ValueError(f"narrow drafts (draft_dtype_bytes) are EESD's, got method {plan.method!r}")
    w = plan.workload
    if min(w.requests, w.batch_size, w.output_len) < 1 or w.prompt_len < 1:
        raise ValueError(f"workload values must be >= 1, got {w}")


def _check_shared_devices(stages: tuple[SimStage, ...]) -> None:
    by_index: dict[int, list[SimStage]] = {}
    for stage in stages:
        if stage.device_index is not None:
            by_index.setdefault(stage.device_index, []).append(stage)
    for index, group in by_index.items():
        if len({s.device for s in group}) > 1 or (len(group) > 1 and any(s.tp > 1 for s in group)):
            raise ValueError(
                f"stages on device {index} must be one device (same device name, tp 1), got "
                f"{[(s.device, s.tp) for s in group]}"
            )


# ---- building a plan from a scenario point --------------------------------------------------------------------------
def build_plan(
    point: Point, method: str | None = None, reads_every: int | None = None, stand_in: bool = False
) -> SimPlan:
    """The plan of one point (`method` overrides the scenario's, e.g. `"ar"` for the baseline). `reads_every`: the
    AR steps per host read a host-work file must have been measured with, for captured passes (default: the
    scenario's `sync_every`; a serving loop reads every round). A batch wider than the requests runs as wide as they
    are, and is costed so, unless the workload is a `stand_in` (serving's: one row at the widest batch, never run)."""
    s, where = point.scenario, _where(point)
    model = model_config(s)
    dtype_bytes = DTYPE_BYTES[s.dtype]
    exit_layer = _exit_layer(s, model, where)
    try:
        head_vocab_fraction(s.exit_head, model)
    except ValueError as err:
        raise ScenarioError(f"{where}: exit_head: {err}") from None
    draft_dtype = _draft_dtype(s, method or s.method, where)
    plan = SimPlan(
        model=model,
        stages=_stages(point, model, dtype_bytes, exit_layer, where, draft_dtype, method or s.method, reads_every),
        link=_link(s.topology.link, point, "topology.link"),
        method=method or s.method,
        acceptance=_acceptance(point, exit_layer, where),
        workload=_workload(s.workload, stand_in),
        exit_layer=exit_layer,
        exit_head=s.exit_head,
        policy=s.policy,
        dtype_bytes=dtype_bytes,
        draft_dtype_bytes=DTYPE_BYTES[draft_dtype] if draft_dtype else None,
        max_in_flight=s.max_in_flight,
        seed=s.seed,
        chain_zero_rounds=s.zero_draft_rounds == "chained",
        sync_every=scenario_sync_every(s),
        ppsd_backend=s.ppsd_backend,
        verify_buckets=s.verify_buckets,
    )
    plan = SimPlan(**{**plan.__dict__, "contention": _contention(point, plan, where)})
    _check_policy(plan, where)
    slots = cache_slots(plan) if s.attention != "context" else None
    plan = SimPlan(**{**plan.__dict__, "cache_slots": slots, "span_buckets": s.attention == "buckets"})
    plan = SimPlan(**{**plan.__dict__, "verify_widths": verify_plan_widths(plan)})
    plan = SimPlan(**{**plan.__dict__, "cost_ratio": cost_ratio(plan)})  # at the context passes are costed at
    name, args = parse_policy_spec(plan.policy)
    if plan.method != "eesd" or name not in ("beta-ts", "calibration-ts") or "cost" in args or "costs" in args:
        return plan
    # the round costs the Thompson-sampling policy weighs, up to its max draft length (queries of the profile past
    # its grid flag the results as extrapolated: the policy's choices rest on them)
    costs = round_costs(plan, make_policy(plan.policy).max_draft_len)
    return SimPlan(**{**plan.__dict__, "round_costs": costs})


def scenario_sync_every(s: Scenario) -> int:
    """A scenario's `sync_every`, else the executor's default for its passes (`executor.passes.resolve_sync_every`):
    SYNC_CAPTURED captured (the latency's cuda_graphs), 1 uncaptured or frozen (a host read after every step)."""
    if s.sync_every is not None:
        return s.sync_every
    source = s.latency.roofline or s.latency.profile
    return default_sync_every(source is not None and source.cuda_graphs)


def _workload(config: WorkloadConfig, stand_in: bool) -> Workload:
    """The plan's workload: the scenario's, a batch no wider than the requests (unless a stand-in)."""
    workload = Workload(**config.model_dump())
    if stand_in or workload.batch_size <= workload.requests:
        return workload
    return replace(workload, batch_size=workload.requests)


def exit_layer_of(point: Point) -> int:
    """The exit layer a point runs with (defaults resolved)."""
    return _exit_layer(point.scenario, model_config(point.scenario), _where(point))


def verify_plan_widths(plan: SimPlan) -> tuple[int, ...]:
    """The executor's verify widths for this plan: on frozen passes (a frozen latency profile) with verify buckets,
    each k's bucket up to the longest draft its passes hold (`sim.contract.draft_capacity`); otherwise none (every k
    its own width)."""
    frozen = getattr(plan.stages[0].latency, "frozen", False)
    if plan.method != "eesd" or not frozen or not plan.verify_buckets:
        return ()
    longest = draft_capacity(make_policy(plan.policy).max_draft_len, plan.workload.output_len)
    return tuple(verify_drafts(k, longest, True) for k in range(longest + 1))


def cache_slots(plan: SimPlan) -> int:
    """The executor's cache capacity for this plan (`sim.contract.cache_capacity`), with room for the longest draft a
    round can make (`sim.contract.draft_capacity`: the policy's longest, capped by the output length), as the
    executor sizes it."""
    workload, captured = plan.workload, static_capacity(plan.stages[0].latency)
    longest = make_policy(plan.policy).max_draft_len if plan.method == "eesd" else 0
    max_draft = draft_capacity(longest, workload.output_len) if longest else 0
    return cache_capacity(plan.method, workload.prompt_len, workload.output_len, max_draft, captured)


def _where(point: Point) -> str:
    return point_where(point.source, point.values)


def _exit_layer(s: Scenario, model: ModelConfig, where: str) -> int:
    layers = model.num_layers
    if s.exit_layer is None:
        if s.method == "eesd":
            return default_exit_layer(layers)
        n = s.topology.stages if isinstance(s.topology.stages, int) else len(s.topology.stages)
        first = s.topology.stages[0].layers if isinstance(s.topology.stages, list) else None
        return first or balanced_counts(layers, max(n, 2))[0]
    if not 1 <= s.exit_layer < layers:
        raise ScenarioError(
            f"{where}: exit_layer: expected 1 <= exit_layer < {layers} (model layers), got {s.exit_layer}"
        )
    return s.exit_layer


def _draft_dtype(s: Scenario, method: str, where: str) -> str | None:
    """The dtype EESD drafts in where narrower than the scenario's (None: its own, or a method without drafts); a
    wider one, or narrow drafts for PPSD, refused as the executor refuses them."""
    if narrow_draft_dtype(s) is None or method == "ar":
        return None
    if method != "eesd":
        raise ScenarioError(
            f"{where}: draft_dtype: drafts in another dtype are EESD's (the executor's draft_dtype); expected no "
            f"draft_dtype with method {method}, got {s.draft_dtype}"
        )
    if s.draft_dtype == "fp8" and s.latency.profile is not None:
        raise ScenarioError(
            f"{where}: draft_dtype: fp8 drafts are a roofline what-if (the executor drafts in bf16 / fp16: no profile "
            "can time them); expected latency.roofline, or a draft_dtype the executor runs"
        )
    if DTYPE_BYTES[s.draft_dtype] > DTYPE_BYTES[s.dtype]:
        raise ScenarioError(
            f"{where}: draft_dtype: {s.draft_dtype} is wider than the model's dtype {s.dtype}; expected a dtype no "
            "wider (drafts run narrower or alike)"
        )
    return s.draft_dtype


def _stages(
    point: Point,
    model: ModelConfig,
    dtype_bytes: int,
    exit_layer: int,
    where: str,
    draft_dtype: str | None,
    method: str,
    reads_every: int | None,
) -> tuple[SimStage, ...]:
    """The point's stages, for `method` reading the device every `reads_every` steps (None: the scenario's
    `sync_every`): what a host-work file's figure is taken for (`_host`)."""
    s = point.scenario
    topo = s.topology
    configs = [StageConfig()] * topo.stages if isinstance(topo.stages, int) else list(topo.stages)
    counts = _layer_counts(s, configs, model.num_layers, exit_layer, where)
    indices = _device_indices(s, configs)
    shared = len({i for i in indices if i is not None}) < sum(i is not None for i in indices)
    if method == "ppsd" and s.ppsd_backend == "free" and shared:
        raise ScenarioError(
            f"{where}: ppsd_backend: 'free' runs every stage on a device of its own (stages sharing one move in the "
            "executor's lockstep ticks): give each stage its own device, or ppsd_backend distributed"
        )
    profile = _profile(point)
    if method == "ppsd" and s.ppsd_backend == "streams" and profile and profile.metadata.get("device_type") == "cpu":
        raise ScenarioError(
            f"{where}: ppsd_backend: streams runs one CUDA stream per stage on a GPU (the executor refuses it "
            f"without one); {profile.path} was measured on a CPU: expected sequential or distributed"
        )
    draft_profile = _draft_profile(point, draft_dtype, profile, where)
    host = _host(point, profile, method, reads_every or scenario_sync_every(s), where)
    tp_link = _link(topo.tp_link, point, "topology.tp_link")
    efficiency = (s.latency.roofline or Roofline()).bandwidth_efficiency
    stages, specs, start = [], [], 0
    for index, (config, count) in enumerate(zip(configs, counts, strict=True)):
        field = f"topology.stages[{index}].gpu" if config.gpu else "topology.gpu"
        device, spec = _device(config.gpu or topo.gpu, profile, f"{where}: {field}")
        if spec is not None and s.latency.roofline is not None and s.dtype not in spec.peak_tflops:
            raise ScenarioError(
                f"{where}: {field}.peak_tflops: the roofline needs the {s.dtype} peak (the scenario's dtype); "
                f"{spec.name} gives {sorted(spec.peak_tflops)}"
            )
        specs.append(spec)
        tp = config.tp or topo.tp
        latency = _latency(point, profile, spec, model, dtype_bytes, tp, host)
        draft_latency = None
        if draft_dtype is not None and start < exit_layer:
            draft_latency = _draft_latency(point, draft_profile, spec, model, dtype_bytes, tp, draft_dtype, where)
        hbm_GBps = spec.hbm_bandwidth_GBps * efficiency if spec is not None else None
        launch_us = spec.launch_us if spec is not None and latency.cuda_graphs else 0.0
        memory_GiB = spec.memory_GiB if spec is not None else None
        link = _link(config.link, point, f"topology.stages[{index}].link") if config.link is not None else None
        stages.append(SimStage(start, start + count, latency, device, tp, tp_link, indices[index], hbm_GBps, launch_us,
                               memory_GiB, draft_latency, link))  # fmt: skip
        start += count
    try:
        _check_shared_devices(tuple(stages))
    except ValueError as err:
        raise ScenarioError(f"{where}: topology: {err}") from None
    _check_stage_links(configs, indices, where)
    copies = draft_copy_bytes(model, exit_layer, s.exit_head, DTYPE_BYTES[draft_dtype] if draft_dtype else None)
    _check_memory(stages, specs, model, dtype_bytes, where, copies)
    return tuple(stages)


def _check_stage_links(configs: list[StageConfig], indices: list[int | None], where: str) -> None:
    """A stage's own `link` carries its hand-off to the next stage (the last stage's, its token ids back to stage 1):
    one between stages on one device would never be used, so it is refused rather than ignored."""
    n = len(configs)
    for i, config in enumerate(configs):
        after = (i + 1) % n
        if config.link is not None and (n == 1 or indices[i] is not None and indices[i] == indices[after]):
            to = "stage 1, which it is" if n == 1 else f"stage {after + 1}, which shares its device"
            raise ScenarioError(
                f"{where}: topology.stages[{i}].link: stage {i + 1} hands on to {to}: no link is used there; drop it"
            )


def _draft_profile(point: Point, draft_dtype: str | None, profile: DataFile | None, where: str) -> DataFile | None:
    """The profile narrow drafts are costed by (`latency.draft_profile`), where the scenario drafts narrower and its
    latency is measured: the model's own profile cannot say what its layers take in another dtype."""
    config = point.scenario.latency
    if draft_dtype is None or profile is None:
        return None
    if config.draft_profile is None:
        raise ScenarioError(
            f"{where}: latency.draft_profile: draft_dtype {draft_dtype} with a measured profile needs the draft's "
            f"times: expected a profile measured in {draft_dtype} (eesd calibrate latency --dtype {draft_dtype})"
        )
    draft = read_latency_profile(_resolve(point, config.draft_profile.path, "latency.draft_profile.path"))
    check_file_claims(point, draft, "latency.draft_profile.path", dtype_field="draft_dtype")
    kernels, expected_kernels = draft.metadata.get("kernels", "eager"), profile.metadata.get("kernels", "eager")
    if kernels != expected_kernels:
        raise ScenarioError(
            f"{where}: latency.draft_profile.path: {draft.path}: metadata.kernels: timed {kernels} kernels; expected "
            f"latency.profile's ({expected_kernels}): one decoder runs its drafts and verify passes alike"
        )
    device, expected = draft.metadata.get("device"), profile.metadata.get("device")
    if str(device) != str(expected):
        raise ScenarioError(
            f"{where}: latency.draft_profile.path: {draft.path}: metadata.device: measured on {device!r}; expected "
            f"latency.profile's device {expected!r}"
        )
    return draft


def _draft_latency(
    point: Point,
    draft_profile: DataFile | None,
    spec: GPUSpec | None,
    model: ModelConfig,
    dtype_bytes: int,
    tp: int,
    draft_dtype: str,
    where: str,
) -> LatencyModel:
    """A narrow draft step's latency on one stage: the draft profile's, the same constants, or the roofline in the
    draft's dtype (narrow weights, the model's K/V)."""
    config = point.scenario.latency
    if config.constant_us is not None:
        return ConstantLatency(dict(config.constant_us))
    if draft_profile is not None:
        cuda_graphs = config.draft_profile.cuda_graphs if config.draft_profile else True
        try:
            return ProfileLatency(draft_profile, cuda_graphs=cuda_graphs)
        except ValueError as err:
            raise ScenarioError(f"{where}: latency.draft_profile: {err}") from None
    assert spec is not None
    if draft_dtype not in spec.peak_tflops:
        raise ScenarioError(
            f"{where}: draft_dtype: the roofline needs the {draft_dtype} peak; {spec.name} gives "
            f"{sorted(spec.peak_tflops)}"
        )
    roofline = (config.roofline or Roofline()).model_dump()
    return RooflineLatency(spec, model, DTYPE_BYTES[draft_dtype], tp, dtype=draft_dtype, kv_dtype_bytes=dtype_bytes,
                           **roofline)  # fmt: skip


def draft_copy_bytes(model: ModelConfig, exit_layer: int, exit_head: str, draft_dtype_bytes: int | None) -> float:
    """The bytes of the narrow draft copies (layers [0, E), the exit head's LM head rows and a trained head's layer)
    beside the model's weights; 0 without narrow drafts."""
    if draft_dtype_bytes is None:
        return 0.0
    head = model.lm_head_params * head_vocab_fraction(exit_head, model)
    params = exit_layer * model.layer_params + head + (model.layer_params if is_trained(exit_head) else 0)
    return params * draft_dtype_bytes


def _device_indices(s: Scenario, configs: list[StageConfig]) -> list[int | None]:
    """Each stage's device index (None: a device of its own): the stages' own `device`, else `topology.devices`
    contiguous blocks, else one device for a one-host PPSD backend, else one device per stage."""
    n = len(configs)
    if configs[0].device is not None:
        return [c.device for c in configs]
    devices = s.topology.devices
    if devices is None:
        devices = 1 if s.ppsd_backend in ONE_HOST_BACKENDS else n
    return [None] * n if devices == n else [i * devices // n for i in range(n)]


def _layer_counts(s: Scenario, configs: list[StageConfig], layers: int, exit_layer: int, where: str) -> list[int]:
    """Each stage's layer count: the stages' own `layers`, else balanced; PPSD drafts inside stage 1, so an exit
    layer past balanced stage 1's end ends stage 1 there and balances the rest over the later stages (as the
    executor's `plan_stages` lays them out), and one before it drafts inside a balanced stage 1."""
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
    elif s.method == "ppsd" and s.exit_layer is not None and n > 1 and exit_layer > balanced_counts(layers, n)[0]:
        if layers - exit_layer < n - 1:
            left = layers - exit_layer
            raise ScenarioError(f"{where}: exit_layer: leaves {left} layer{'s' * (left != 1)} for {n - 1} later stages")
        counts = [exit_layer, *balanced_counts(layers - exit_layer, n - 1)]
    else:
        counts = balanced_counts(layers, n)
    if s.method == "ppsd" and exit_layer > counts[0]:
        raise ScenarioError(
            f"{where}: exit_layer: ppsd drafts inside stage 1, so it must be at most {counts[0]} (stage 1's layers), "
            f"got {exit_layer}"
        )
    return counts  # type: ignore[return-value]


def _profile(point: Point) -> DataFile | None:
    config = point.scenario.latency.profile
    if config is None:
        return None
    profile = read_latency_profile(_resolve(point, config.path, "latency.profile.path"))
    check_file_claims(point, profile, "latency.profile.path")
    attention = point.scenario.attention
    if frozen_profile(profile) and attention != "cache":
        raise ScenarioError(
            f"{_where(point)}: attention: {profile.path} times frozen passes (metadata."
            f"kernels frozen: the executor's capture='freeze'), which attend over every slot of their cache; expected "
            f"attention: cache, got {attention}"
        )
    return profile


def _host(point: Point, profile: DataFile | None, method: str, reads_every: int, where: str) -> HostOverhead | None:
    """`latency.profile.host_work`'s figure for `method` (None without the file, for PPSD where it has no PPSD rows, and
    for the distributed backend's PPSD, whose ranks are hosts of their own), checked to be of the profile's model and
    device, of passes captured as the scenario prices them and, captured, of `reads_every` steps per host read
    (`sim.host_work`)."""
    ref = point.scenario.latency.profile
    if ref is None or ref.host_work is None:
        return None
    field = f"{where}: latency.profile.host_work"
    path = _resolve(point, ref.host_work, "latency.profile.host_work")
    try:
        data = read_host_work(path)
        check_fits(data, path, model_config(point.scenario), profile.metadata if profile else {}, ref.cuda_graphs)
    except ValueError as err:
        raise ScenarioError(f"{field}: {err}") from None
    measured = data["metadata"].get("sync_every")
    if ref.cuda_graphs and (isinstance(measured, bool) or measured != reads_every):  # every point's AR baseline too
        raise ScenarioError(
            f"{field}: {path}: metadata.sync_every: measured with {quote(measured)} steps per host read, this point "
            f"and its AR baseline read every {reads_every} (the scenario's sync_every; a serving loop, every round): "
            f"expected a file measured with `eesd calibrate host --sync-every {reads_every}`"
        )
    if method == "ppsd" and point.scenario.ppsd_backend not in ONE_HOST_BACKENDS:
        return None  # checked all the same: the point's AR baseline pays the file's AR figure
    return host_overhead(data, method, ref.cuda_graphs, path)


def _device(named: str | GPUConfig | None, profile: DataFile | None, where: str) -> tuple[str, GPUSpec | None]:
    """(the stage's device name, its GPU's spec where known). `where` is `FILE: FIELD` of the GPU the scenario
    names for the stage (`named`: a table name, an inline GPU, or None where it names none)."""
    if profile is None:
        if isinstance(named, GPUConfig):
            return named.name, named.spec()
        name = named or DEFAULT_GPU
        return name, GPUS[name]
    device = str(profile.metadata["device"])
    profiled_gpu = gpu_named_by(device)
    if isinstance(named, GPUConfig):
        if not _words(named.name) <= _words(device):
            raise ScenarioError(
                f"{where}.name: {named.name!r} contradicts latency.profile, measured on {device!r}: a stage costed by "
                f"a profile runs on the profile's device; name that device (its words) or drop the field"
            )
        return device, named.spec()
    if named is not None and named != profiled_gpu:
        raise ScenarioError(
            f"{where}: {named} contradicts latency.profile, measured on {device!r}: a stage costed by a profile runs "
            f"on the profile's device; drop the field or name that device"
        )
    return device, GPUS[profiled_gpu] if profiled_gpu else None


def same_device(a: str, b: str) -> bool:
    """Whether two device names name one kind of device: equal, or the same card of the GPU table."""
    return a == b or gpu_named_by(a) is not None and gpu_named_by(a) == gpu_named_by(b)


def _words(name: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", name.lower()))


def _check_memory(
    stages: list[SimStage],
    specs: list[GPUSpec | None],
    model: ModelConfig,
    dtype_bytes: int,
    where: str,
    copies: float = 0.0,
) -> None:
    """The weights of each device's stages (their layers, and the embedding / LM head once) fit its memory, with the
    narrow draft copies' bytes (`draft_copy_bytes`) on the device of the first stage."""
    groups: dict[object, list[int]] = {}
    for index, stage in enumerate(stages):
        groups.setdefault(stage.device_index if stage.device_index is not None else ("own", index), []).append(index)
    for indices in groups.values():
        spec, first = specs[indices[0]], stages[indices[0]]
        if spec is None:
            continue
        layers = sum(stages[i].layer_end - stages[i].layer_start for i in indices)
        weights_gib = (layers * model.layer_params + model.lm_head_params) * dtype_bytes / first.tp / 2**30
        if 0 in indices:
            weights_gib += copies / first.tp / 2**30
        if weights_gib > MEMORY_HEADROOM * spec.memory_GiB:
            names = ", ".join(f"topology.stages[{i}]" for i in indices)
            raise ScenarioError(
                f"{where}: {names}: {weights_gib:.1f} GiB of weights per GPU do not fit a {spec.memory_GiB:.0f} GiB "
                f"{first.device}; use more stages or devices, or a larger tp"
            )


def _latency(
    point: Point,
    profile: DataFile | None,
    spec: GPUSpec | None,
    model: ModelConfig,
    dtype_bytes: int,
    tp: int,
    host: HostOverhead | None = None,
) -> LatencyModel:
    config = point.scenario.latency
    if config.constant_us is not None:
        return ConstantLatency(dict(config.constant_us))
    if config.profile is not None and profile is not None:
        ref = config.profile
        try:
            return ProfileLatency(profile, cuda_graphs=ref.cuda_graphs, overhead_us=ref.overhead_us, host=host)
        except ValueError as err:  # rows of the other capture kind, an incomplete grid: named with the scenario
            raise ScenarioError(f"{_where(point)}: latency.profile: {err}") from None
    assert spec is not None  # `_device` gives a GPU to every stage not costed by a profile
    roofline = (config.roofline or Roofline()).model_dump()
    return RooflineLatency(spec, model, dtype_bytes, tp, dtype=point.scenario.dtype, **roofline)


def _contention(point: Point, plan: SimPlan, where: str) -> ProfiledContention | SharedBandwidth:
    """`topology.contention`'s profile, checked to be of the device the stages share (a point whose stages share
    none does not use it: a sweep may hold both); a `processes` profile, checked to be of the host every stage of a
    distributed point runs on (other points do not use it); else the fallback."""
    relative = point.scenario.topology.contention
    if relative is None:
        return SharedBandwidth()
    field = f"{where}: topology.contention"
    path = _resolve(point, relative, "topology.contention")
    try:
        profile = read_contention_profile(path)
    except ValueError as err:
        raise ScenarioError(f"{field}: {err}") from None
    measured = str(profile.metadata["device"])
    if ProfiledContention(profile).scope == "host":
        if plan.method != "ppsd" or plan.ppsd_backend != "distributed":
            return SharedBandwidth()  # stage processes compute at once only in a distributed PPSD tick
        check_file_claims(point, profile, "topology.contention")  # its passes: the scenario's model and dtype
        hosts = sorted({stage.device for stage in plan.stages})
        if not all(same_device(measured, device) for device in hosts):
            raise ScenarioError(
                f"{field}: {path} times stage processes on {measured!r}; this point's stages run on {hosts}: "
                "expected a profile of that host"
            )
        return ProfiledContention(profile)
    shared = sorted({plan.stages[i].device for i in range(len(plan.stages)) if _on_shared_device(plan, i)})
    if not all(same_device(measured, device) for device in shared):
        raise ScenarioError(
            f"{field}: {path} was measured on {measured!r}; the stages that share a device run on {shared}: "
            "expected a profile of that device"
        )
    return ProfiledContention(profile)


def _on_shared_device(plan: SimPlan, stage: int) -> bool:
    devices = [plan.device_of(i) for i in range(len(plan.stages))]
    return devices.count(devices[stage]) > 1


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
    check_file_claims(point, trace, "acceptance.trace")
    try:
        check_trace_fits(trace, model_config(point.scenario))
        replay = TraceAcceptance(trace, exit_layer, stop_at_eos=a.at_eos == "stop")
    except ValueError as err:
        raise ScenarioError(f"{where}: acceptance.trace: {err}") from None
    try:  # (a trained head's file out of reach: the note it feeds is not given)
        replay.head = trace_exit_head(trace.path or "", trace)
    except ValueError:
        replay.head = None
    reuse = replay.reuse(point.scenario.workload.requests, point.scenario.workload.output_len)
    if reuse and a.reuse != "cycle":
        raise ScenarioError(
            f"{where}: acceptance.trace: {trace.path}: {reuse}: a replay would reuse its tokens; replay fewer, use a "
            "longer trace, or set acceptance.reuse: cycle to replay it cyclically"
        )
    return replay


def _check_policy(plan: SimPlan, where: str) -> None:
    policy = make_policy(plan.policy)
    if plan.method == "eesd" and policy.needs_confidence and not plan.acceptance.has_confidence:
        raise ScenarioError(
            f"{where}: policy: {plan.policy!r} needs draft confidences; use acceptance.trace or set "
            f"acceptance.confidence_sharpness (allowed policies: {policy_usage()})"
        )


def _resolve(point: Point, relative: str, field: str) -> Path:
    path = (point.base_dir / relative).resolve()
    if not path.is_file():
        why = "a directory, not a file" if path.is_dir() else "file not found"
        relative_to = "" if Path(relative).is_absolute() else f" ({relative!r} taken from the scenario's folder)"
        raise ScenarioError(f"{_where(point)}: {field}: {why}: {path}{relative_to}")
    return path
