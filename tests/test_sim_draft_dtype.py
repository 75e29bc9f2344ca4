"""Narrow drafts in the simulator (`draft_dtype`): draft steps costed on the draft's latency, the verify pass over
every layer, the round costs and cost ratio that follow, the copies' memory, and every refusal."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml

from sim.acceptance import BernoulliAcceptance
from sim.cost import cost_ratio, round_costs, verify_segments
from sim.engine import Simulation
from sim.hardware import LINKS
from sim.models import MODELS, ModelConfig
from sim.plan import SimPlan, SimStage, Workload, build_plan
from sim.scenario import ScenarioError, load_points
from sim.serving import _kv_capacity

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig("toy-12", 12, 64, 4, 4, 128, 100)
EXIT = 4


@dataclass(frozen=True)
class WidthLatency:
    """A layer costs `base + per_token * q` µs, the LM head `head` per token: a pass's time grows with its width."""

    base: float
    per_token: float
    head: float = 0.0
    cuda_graphs: bool = False

    def time_us(self, component: str, phase: str, q: int, context_len: int, batch: int) -> float:
        if component == "layer":
            return self.base + self.per_token * q * batch
        if component == "lm_head":
            return self.head * q * batch
        return 0.0

    @property
    def extrapolated(self) -> bool:
        return False


FULL = WidthLatency(10.0, 2.0, head=3.0)
NARROW = WidthLatency(4.0, 1.0, head=1.0)


def toy_plan(narrow: bool, k: int, alpha: float = 1.0, output_len: int = 60) -> SimPlan:
    stage = SimStage(0, MODEL.num_layers, FULL, draft_latency=NARROW if narrow else None)
    return SimPlan(MODEL, (stage,), LINKS["ideal"], "eesd", BernoulliAcceptance(alpha), Workload(1, 1, 16, output_len),
                   exit_layer=EXIT, policy=f"fixed:{k}", draft_dtype_bytes=2 if narrow else None)  # fmt: skip


def layer(lat: WidthLatency, q: int) -> float:
    return lat.base + lat.per_token * q


def round_us(narrow: bool, k: int) -> float:
    """Closed form of one round of k drafts: k draft steps (layers [0, E) + the shared head on the draft's latency),
    then the verify pass: [0, E) over 1 token and [E, L) over k + 1 (normal), or all L layers over k + 1 (narrow)."""
    lat = NARROW if narrow else FULL
    draft = EXIT * layer(lat, 1) + lat.head
    if narrow:
        verify = MODEL.num_layers * layer(FULL, k + 1)
    else:
        verify = EXIT * layer(FULL, 1) + (MODEL.num_layers - EXIT) * layer(FULL, k + 1)
    return k * draft + verify + FULL.head * (k + 1)


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_fully_accepted_run_costs_its_rounds_in_closed_form(narrow: bool, k: int) -> None:
    """alpha = 1: every round drafts k and emits k + 1 (after the prefill's token); decode time = rounds x the
    closed-form round."""
    result = Simulation(toy_plan(narrow, k, output_len=1 + (k + 1) * 12)).run()
    assert result.rounds == 12 and result.decode_tokens == (k + 1) * 12
    assert result.decode_time_us == pytest.approx(12 * round_us(narrow, k))


def test_the_verify_pass_runs_every_layer_only_for_narrow_drafts() -> None:
    assert verify_segments(toy_plan(False, 3), 3) == ((0, EXIT, 1), (EXIT, 12, 4))
    assert verify_segments(toy_plan(True, 3), 3) == ((0, 12, 4),)
    assert verify_segments(toy_plan(True, 3), 0) == verify_segments(toy_plan(False, 3), 0) == ((0, 12, 1),)


@pytest.mark.parametrize("narrow", [False, True])
def test_round_costs_and_cost_ratio_follow_the_narrow_passes(narrow: bool) -> None:
    step = MODEL.num_layers * layer(FULL, 1) + FULL.head
    costs = round_costs(toy_plan(narrow, 4), 4)
    assert costs[0] == 1.0
    for k in range(1, 5):
        assert costs[k] == pytest.approx(round_us(narrow, k) / step)
    lat = NARROW if narrow else FULL
    verify = round_us(narrow, 1) - (EXIT * layer(lat, 1) + lat.head)
    assert cost_ratio(toy_plan(narrow, 1)) == pytest.approx((EXIT * layer(lat, 1) + lat.head) / verify)


def test_narrow_drafts_pay_where_drafts_are_cheap_enough() -> None:
    """At alpha 0.8, cheaper drafts beat the wider verify here, and the AR step is unchanged (no drafts)."""
    normal, narrow = (Simulation(toy_plan(n, 2, alpha=0.8, output_len=400)).run() for n in (False, True))
    assert narrow.decode_time_us < normal.decode_time_us
    assert narrow.tokens == normal.tokens and narrow.rounds == normal.rounds  # the same acceptance draws
    ar = (Simulation(replace(toy_plan(n, 2), method="ar", draft_dtype_bytes=None)).run() for n in (False, True))
    assert len({r.decode_time_us for r in ar}) == 1


# ---- scenarios ----------------------------------------------------------------------------------------------------
BASE = {
    "name": "narrow",
    "model": "SmolLM2-135M",
    "dtype": "fp32",
    "draft_dtype": "bf16",
    "method": "eesd",
    "exit_layer": 8,
    "acceptance": {"alpha": 0.7},
    "workload": {"requests": 1, "output_len": 16},
}


def write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def plan_of(tmp_path: Path, data: dict) -> SimPlan:
    return build_plan(load_points(write(tmp_path, data))[0])


def test_a_roofline_drafts_with_narrow_weights_over_the_models_kv(tmp_path: Path) -> None:
    """fp32 model, bf16 drafts on an H100's roofline: a draft layer reads half the weight bytes and fp32 K/V."""
    plan = plan_of(tmp_path, BASE)
    stage, model = plan.stages[0], MODELS["SmolLM2-135M"]
    assert plan.draft_dtype_bytes == 2 and stage.draft_latency is not None
    context = 4096  # where the K/V read shows beside the weights
    bandwidth = stage.latency.gpu.hbm_bandwidth_GBps * 1e3 * stage.latency.bandwidth_efficiency
    kv = (context + 1) * model.kv_bytes_per_token(4)
    full = stage.latency.time_us("layer", "draft", 1, context, 1)
    narrow = stage.draft_latency.time_us("layer", "draft", 1, context, 1)
    floor = 9 * stage.latency.gpu.kernel_floor_us
    assert full == pytest.approx(max((model.layer_params * 4 + kv) / bandwidth, floor))
    assert narrow == pytest.approx(max((model.layer_params * 2 + kv) / bandwidth, floor))


@pytest.mark.parametrize("draft_dtype", [None, "fp32"])
def test_drafts_in_the_models_own_dtype_are_the_normal_path(tmp_path: Path, draft_dtype: str | None) -> None:
    plan = plan_of(tmp_path, {**BASE, "draft_dtype": draft_dtype})
    assert plan.draft_dtype_bytes is None and plan.stages[0].draft_latency is None and plan.draft_copy_bytes == 0


def test_ar_ignores_the_draft_dtype_so_a_method_sweep_runs(tmp_path: Path) -> None:
    points = load_points(write(tmp_path, {**BASE, "sweep": {"method": ["ar", "eesd"]}}))
    ar, eesd = (build_plan(p) for p in points)
    assert ar.draft_dtype_bytes is None and eesd.draft_dtype_bytes == 2


def test_the_copies_take_memory_beside_the_weights(tmp_path: Path) -> None:
    """A card whose memory the fp32 weights fit but not with the bf16 copies of layers [0, E) and the LM head."""
    model = MODELS["SmolLM2-135M"]
    weights = (model.num_layers * model.layer_params + model.lm_head_params) * 4
    copies = (8 * model.layer_params + model.lm_head_params) * 2
    memory_gib = (weights + copies / 2) / 0.95 / 2**30
    card = {"name": "Small card", "hbm_bandwidth_GBps": 500, "peak_tflops": {"bf16": 50, "fp32": 25},
            "memory_GiB": memory_gib, "source": "a test"}  # fmt: skip
    data = {**BASE, "topology": {"gpu": card}}
    assert plan_of(tmp_path, {**data, "draft_dtype": None}).draft_copy_bytes == 0
    with pytest.raises(ScenarioError, match="GiB of weights per GPU do not fit"):
        plan_of(tmp_path, data)
    plan = plan_of(tmp_path, {**data, "topology": {"gpu": {**card, "memory_GiB": 2 * memory_gib}}})
    assert plan.draft_copy_bytes == pytest.approx(copies)
    wide = plan_of(tmp_path, {**data, "draft_dtype": None, "topology": {"gpu": {**card, "memory_GiB": 2 * memory_gib}}})
    per_token = model.num_layers * model.kv_bytes_per_token(4)
    assert _kv_capacity(wide, "auto") - _kv_capacity(plan, "auto") == pytest.approx(copies / per_token, abs=1)


PROFILE = ROOT / "calibration" / "cpu" / "latency_smollm2-135m_cpu_fp32.csv"


def profiled(tmp_path: Path, **latency: object) -> dict:
    return {**BASE, "latency": {"profile": {"path": str(PROFILE), "cuda_graphs": False}, **latency}}


def bf16_profile(tmp_path: Path, **metadata: object) -> Path:
    """The fp32 profile relabelled as a bf16 one with every time halved (a stand-in file for the checks)."""
    import json

    lines = PROFILE.read_text(encoding="utf-8").splitlines()
    meta = json.loads(lines[0].removeprefix("# "))
    meta["metadata"] = {**meta["metadata"], "dtype": "bfloat16", **metadata}
    header = lines[1].split(",")
    columns = [header.index(name) for name in ("median_us", "p10_us", "p90_us")]
    rows = []
    for line in lines[2:]:
        cells = line.split(",")
        for index in columns:
            cells[index] = str(float(cells[index]) / 2)
        rows.append(",".join(cells))
    path = tmp_path / "bf16.csv"
    path.write_text("\n".join(["# " + json.dumps(meta), lines[1], *rows]) + "\n", encoding="utf-8")
    return path


def test_a_measured_profile_costs_drafts_with_the_draft_profile(tmp_path: Path) -> None:
    draft = bf16_profile(tmp_path)
    plan = plan_of(tmp_path, profiled(tmp_path, draft_profile={"path": str(draft), "cuda_graphs": False}))
    stage = plan.stages[0]
    assert stage.draft_latency.time_us("layer", "draft", 1, 128, 1) == pytest.approx(
        stage.latency.time_us("layer", "draft", 1, 128, 1) / 2
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"method": "ppsd"}, "draft_dtype: drafts in another dtype are EESD's"),
        ({"dtype": "bf16", "draft_dtype": "fp32"}, "draft_dtype: fp32 is wider than the model's dtype bf16"),
        ({"draft_dtype": "int8"}, "draft_dtype: Input should be 'bf16', 'fp16', 'fp32' or 'fp8'"),
        (
            {"draft_dtype": "fp8", "topology": {"gpu": "A100"}},
            "draft_dtype: the roofline needs the fp8 peak; NVIDIA A100",
        ),
        ({"latency": {"roofline": {}, "draft_profile": {"path": str(PROFILE)}}}, "draft_profile only applies with"),
    ],
)
def test_bad_narrow_drafts_are_refused_with_the_field_named(tmp_path: Path, edit: dict, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        plan_of(tmp_path, {**BASE, **edit})


def test_a_measured_profile_without_a_draft_profile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="latency.draft_profile: draft_dtype bf16 with a measured profile"):
        plan_of(tmp_path, profiled(tmp_path))


def test_a_draft_profile_of_another_dtype_or_device_is_refused(tmp_path: Path) -> None:
    wrong_dtype = profiled(tmp_path, draft_profile={"path": str(PROFILE)})
    with pytest.raises(ScenarioError, match="latency.draft_profile.path: .*expected the scenario's draft_dtype"):
        plan_of(tmp_path, wrong_dtype)
    other = bf16_profile(tmp_path, device="another CPU")
    with pytest.raises(ScenarioError, match="metadata.device: measured on 'another CPU'; expected latency.profile's"):
        plan_of(tmp_path, profiled(tmp_path, draft_profile={"path": str(other)}))


TRACE = ROOT / "calibration" / "cpu" / "acceptance_smollm2-135m_shared_builtin.csv"


@pytest.mark.parametrize(
    ("recorded", "note"), [(None, "the model dtype"), ("bfloat16", None), ("float16", "fp16"), ("bf16", None)]
)
def test_a_trace_of_drafts_in_another_dtype_is_said_in_the_output(tmp_path: Path, recorded, note) -> None:
    from sim.formats import read_acceptance_trace, write_acceptance_trace
    from sim.runner import simulate_point

    trace = read_acceptance_trace(TRACE)
    metadata = {**trace.metadata, **({"draft_dtype": recorded} if recorded else {})}
    path = write_acceptance_trace(tmp_path / "t.csv", metadata, trace.records)
    data = {**BASE, "exit_layer": 15, "acceptance": {"trace": str(path)}, "sweep": {"method": ["ar", "eesd"]}}
    ar, eesd = (simulate_point(p).notes for p in load_points(write(tmp_path, data)))
    said = [n for n in eesd if n.startswith("acceptance.trace recorded drafts in")]
    assert bool(said) == bool(note) and not [n for n in ar if "recorded drafts" in n]
    if note:
        assert said[0].startswith(f"acceptance.trace recorded drafts in {note}; this point drafts in bf16")


def test_a_narrow_draft_pays_the_models_host_overhead() -> None:
    """The narrow head's logits are cast back and sampled as the model's: the host's `overhead` is the model's."""
    from sim.cost import draft_pass, stage_time_us
    from sim.latency import ConstantLatency

    model, narrow = ConstantLatency({"layer": 10, "overhead": 100}), ConstantLatency({"layer": 4, "overhead": 999})
    stage = SimStage(0, MODEL.num_layers, model, draft_latency=narrow)
    plan = replace(toy_plan(True, 2), stages=(stage,))
    assert stage_time_us(plan, stage, draft_pass(plan), 16, 1) == EXIT * 4 + 100


def test_fp8_drafts_are_a_roofline_what_if(tmp_path: Path) -> None:
    """8-bit draft weights (the executor has none): one byte a weight on the roofline, the model's K/V, the card's fp8
    peak; with a measured profile, refused."""
    data = {**BASE, "model": "Llama-2-7B", "dtype": "bf16", "draft_dtype": "fp8", "exit_layer": 8}
    plan = plan_of(tmp_path, data)
    stage, model = plan.stages[0], MODELS["Llama-2-7B"]
    assert plan.draft_dtype_bytes == 1 and stage.draft_latency.dtype == "fp8"
    bandwidth = stage.latency.gpu.hbm_bandwidth_GBps * 1e3 * stage.latency.bandwidth_efficiency
    kv = (512 + 1) * model.kv_bytes_per_token(2)
    assert stage.draft_latency.time_us("layer", "draft", 1, 512, 1) == pytest.approx(
        (model.layer_params + kv) / bandwidth
    )
    assert stage.latency.time_us("layer", "draft", 1, 512, 1) == pytest.approx(
        (2 * model.layer_params + kv) / bandwidth
    )
    assert plan.draft_copy_bytes == pytest.approx(8 * model.layer_params + model.lm_head_params)
    with pytest.raises(ScenarioError, match="draft_dtype: fp8 drafts are a roofline what-if"):
        plan_of(tmp_path, profiled(tmp_path, draft_profile={"path": str(PROFILE)}) | {"draft_dtype": "fp8"})
