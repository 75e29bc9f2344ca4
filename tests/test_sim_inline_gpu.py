"""A GPU given inline in a scenario (one the table does not hold): planning with its spec, and every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sim.hardware import H100_LAUNCH_US
from sim.models import MODELS
from sim.plan import build_plan
from sim.scenario import ScenarioError, load_points

ROOT = Path(__file__).resolve().parents[1]
CARD = {
    "name": "RTX 4090",
    "hbm_bandwidth_GBps": 1008,
    "peak_tflops": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "memory_GiB": 24,
    "source": "NVIDIA Ada GPU architecture whitepaper",
}
BASE = {
    "name": "inline",
    "model": "Llama-2-7B",
    "method": "ar",
    "acceptance": {"alpha": 0.5},
    "topology": {"gpu": CARD},
    "workload": {"requests": 1, "output_len": 16},
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_the_shipped_inline_gpu_scenario_plans_with_its_datasheet() -> None:
    points = load_points(ROOT / "scenarios" / "rtx4090_one_gpu.yaml")
    plan = build_plan(points[0])
    stage = plan.stages[0]
    assert stage.device == "RTX 4090" and stage.latency.gpu.source.startswith("NVIDIA Ada")
    assert stage.hbm_GBps == pytest.approx(1008 * 0.61) and stage.launch_us == H100_LAUNCH_US
    assert plan.shares_devices  # ppsd_backend streams: both stages on the one GPU


def test_the_roofline_reads_the_inline_bandwidth_and_the_dtypes_peak(tmp_path: Path) -> None:
    plan = build_plan(load_points(write(tmp_path, BASE))[0])
    layer_us = plan.stages[0].latency.time_us("layer", "verify", 1, 0, 1)
    assert layer_us == pytest.approx(MODELS["Llama-2-7B"].layer_params * 2 / (1008e3 * 0.61), rel=0.02)
    small = {**BASE, "model": "SmolLM2-135M"}  # its fp32 weights fit the card too
    bf16 = build_plan(load_points(write(tmp_path, small))[0]).stages[0].latency
    fp32 = build_plan(load_points(write(tmp_path, {**small, "dtype": "fp32"}))[0]).stages[0].latency
    assert fp32.time_us("layer", "prefill", 4096, 0, 1) > 1.9 * bf16.time_us("layer", "prefill", 4096, 0, 1)


def test_a_stage_may_give_its_own_inline_gpu(tmp_path: Path) -> None:
    data = {**BASE, "model": "SmolLM2-135M", "topology": {"stages": [{"gpu": CARD}, {"gpu": "A100"}]}}
    plan = build_plan(load_points(write(tmp_path, data))[0])
    assert [s.device for s in plan.stages] == ["RTX 4090", "A100"]


@pytest.mark.parametrize(
    ("card", "message"),
    [
        ({k: v for k, v in CARD.items() if k != "source"}, "topology.gpu.source: required field is missing"),
        ({**CARD, "source": ""}, "topology.gpu.source: String should have at least 1 character"),
        ({**CARD, "hbm_bandwidth_GBps": 0}, "topology.gpu.hbm_bandwidth_GBps: Input should be greater than 0"),
        ({**CARD, "peak_tflops": {"int8": 660}}, "topology.gpu.peak_tflops.int8"),
        ({**CARD, "peak_tflops": {"bf16": -1}}, "topology.gpu.peak_tflops: peak_tflops values must be > 0"),
        ({**CARD, "memory_GiB": -24}, "topology.gpu.memory_GiB: Input should be greater than 0"),
        ({**CARD, "bus": "pcie"}, "topology.gpu.bus: unknown key; allowed here:"),
        ("RTX 4090", "topology.gpu: unknown GPU 'RTX 4090'; known: ['A100'"),
    ],
)
def test_an_inline_gpu_is_checked_field_by_field(tmp_path: Path, card: object, message: str) -> None:
    path = write(tmp_path, {**BASE, "topology": {"gpu": card}})
    with pytest.raises(ScenarioError) as info:
        load_points(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)


def test_the_roofline_needs_the_peak_of_the_scenarios_dtype(tmp_path: Path) -> None:
    card = {**CARD, "peak_tflops": {"bf16": 165.2}}
    path = write(tmp_path, {**BASE, "dtype": "fp32", "topology": {"gpu": card}})
    with pytest.raises(ScenarioError, match=r"topology.gpu.peak_tflops: the roofline needs the fp32 peak"):
        load_points(path)


def test_an_inline_gpu_must_be_the_profiles_device(tmp_path: Path) -> None:
    profile = ROOT / "calibration" / "h100" / "latency_smollm2-135m_cuda_bf16_compiled.csv"
    data = {**BASE, "model": "SmolLM2-135M", "latency": {"profile": {"path": str(profile)}}}
    path = write(tmp_path, data)
    with pytest.raises(ScenarioError, match=r"topology.gpu.name: 'RTX 4090' contradicts latency.profile"):
        load_points(path)
    data["topology"] = {"gpu": {**CARD, "name": "H100 80GB", "hbm_bandwidth_GBps": 3000}}
    plan = build_plan(load_points(write(tmp_path, data))[0])
    assert plan.stages[0].device == "NVIDIA H100 80GB HBM3" and plan.stages[0].hbm_GBps == pytest.approx(3000 * 0.61)


def test_an_inline_gpu_without_its_kernel_floor_or_launch_cost_says_whose_it_borrows(tmp_path: Path) -> None:
    from sim.runner import point_notes

    card = {k: v for k, v in CARD.items() if k not in ("kernel_floor_us", "launch_us")}
    (point,) = load_points(write(tmp_path, {**BASE, "topology": {**BASE["topology"], "gpu": card}}))
    assert any(
        f"GPU {card['name']!r}: kernel_floor_us and launch_us not given, the H100's" in n for n in point_notes(point)
    )
    own = {**card, "kernel_floor_us": 4.0, "launch_us": 9.0}
    (point,) = load_points(write(tmp_path, {**BASE, "topology": {**BASE["topology"], "gpu": own}}))
    assert not any("not given, the H100's" in n for n in point_notes(point))
