"""Stages sharing a device: contention models, the contention profile, planning and its refusals, lockstep ticks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sim.acceptance import PositionalAcceptance
from sim.contention import PassShare, ProfiledContention, Serial, SharedBandwidth, overlap_factor
from sim.engine import Simulation
from sim.formats import ContentionRecord, read_contention_profile, write_contention_profile
from sim.hardware import LINKS, LinkSpec
from sim.latency import ConstantLatency
from sim.models import ModelConfig
from sim.plan import SimPlan, SimStage, Workload, build_plan
from sim.scenario import ScenarioError, load_points

MODEL = ModelConfig("toy-24", 24, 64, 4, 4, 128, 100)
ROOT = Path(__file__).resolve().parents[1]
H100_CONTENTION = ROOT / "calibration" / "h100" / "contention_smollm2-135m_cuda_bf16_compiled.csv"


# ---- contention models ----------------------------------------------------------------------------------------------
def test_shared_bandwidth_adds_hbm_reads_and_overlaps_the_rest() -> None:
    bandwidth = SharedBandwidth()
    assert bandwidth.together_us([PassShare(100.0, 100.0), PassShare(80.0, 80.0)]) == 180.0  # bandwidth-bound
    assert bandwidth.together_us([PassShare(100.0, 0.0), PassShare(80.0, 0.0)]) == 100.0  # launch-bound
    assert bandwidth.together_us([PassShare(100.0, 20.0), PassShare(80.0, 30.0)]) == 20.0 + 30.0 + 80.0
    assert bandwidth.together_us([PassShare(70.0, 10.0)]) == 70.0
    assert Serial().together_us([PassShare(100.0, 0.0), PassShare(80.0, 0.0)]) == 180.0


@given(st.lists(st.tuples(st.floats(0.0, 1e4), st.floats(0.0, 1.0)), min_size=1, max_size=8))
def test_passes_together_take_between_the_longest_and_all_in_turn(passes: list[tuple[float, float]]) -> None:
    shares = [PassShare(time, time * share) for time, share in passes]
    longest, total = max(p.time_us for p in shares), sum(p.time_us for p in shares)
    assert longest - 1e-6 <= SharedBandwidth().together_us(shares) <= total + 1e-6


def contention_file(tmp_path: Path, factors: dict[int, float], device: str = "NVIDIA H100 80GB HBM3") -> Path:
    """Rows whose passes alone are 100 µs each and whose together time gives the overlap factor asked for."""
    records = [
        ContentionRecord(k, 100.0 * k, 100.0, 100.0 + f * 100.0 * (k - 1), 100.0, 1e4) for k, f in factors.items()
    ]
    return write_contention_profile(tmp_path / "contention.csv", {"device": device, "backend": "streams"}, records)


def test_a_contention_profile_gives_the_overlap_factor_per_pass_count(tmp_path: Path) -> None:
    profiled = ProfiledContention(read_contention_profile(contention_file(tmp_path, {2: 0.2, 4: 0.1})))
    assert profiled.factor(2) == pytest.approx(0.2) and profiled.factor(3) == pytest.approx(0.15)
    assert not profiled.extrapolated
    shares = [PassShare(50.0, 0.0), PassShare(30.0, 0.0), PassShare(20.0, 0.0)]
    assert profiled.together_us(shares) == pytest.approx(50.0 + 0.15 * 50.0)
    assert profiled.factor(8) == pytest.approx(0.1) and profiled.extrapolated
    assert overlap_factor(200.0, 100.0, 90.0) == 0.0 and overlap_factor(200.0, 100.0, 250.0) == 1.0


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (ContentionRecord(2, 100.0, 150.0, 120.0, 110.0, 130.0), "alone_max_us <= alone_sum_us"),
        (ContentionRecord(1, 100.0, 100.0, 100.0, 100.0, 100.0), "'passes' must be >= 2"),
        (ContentionRecord(2, 200.0, 100.0, 120.0, 130.0, 140.0), "p10_us <= median_us <= p90_us"),
    ],
)
def test_contention_profiles_refuse_impossible_rows(tmp_path: Path, record: ContentionRecord, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_contention_profile(tmp_path / "c.csv", {"device": "x", "backend": "streams"}, [record])


def processes_file(tmp_path: Path, factors: dict[int, float], device: str = "CPU: test host", **meta: str) -> Path:
    """A `processes` profile of two stage processes, a row per batch, 100 µs passes alone, the factor asked for."""
    records = [ContentionRecord(2, 200.0, 100.0, 100.0 + f * 100.0, 100.0, 1e4, b) for b, f in factors.items()]
    metadata = {"device": device, "backend": "processes", **meta}
    return write_contention_profile(tmp_path / "processes.csv", metadata, records)


def test_a_profile_with_batches_reads_the_factor_at_the_ticks_batch(tmp_path: Path) -> None:
    profiled = ProfiledContention(read_contention_profile(processes_file(tmp_path, {1: 0.0, 4: 0.3})))
    assert profiled.scope == "host"
    assert [profiled.factor(2, b) for b in (1, 2, 4)] == pytest.approx([0.0, 0.1, 0.3]) and not profiled.extrapolated
    assert profiled.together_us([PassShare(50.0, 0.0), PassShare(30.0, 0.0)], 2) == pytest.approx(50.0 + 0.1 * 30.0)
    assert profiled.factor(2, 8) == pytest.approx(0.3) and profiled.extrapolated
    no_batches = ProfiledContention(read_contention_profile(contention_file(tmp_path, {2: 0.2})))
    assert no_batches.factor(2, 16) == pytest.approx(0.2) and not no_batches.extrapolated
    assert no_batches.scope == "device"


def test_the_shipped_h100_contention_profile_reads() -> None:
    profile = read_contention_profile(H100_CONTENTION)
    assert [r.passes for r in profile.records] == [2, 4] and profile.metadata["backend"] == "streams"
    factors = ProfiledContention(profile)
    assert 0.0 < factors.factor(4) < factors.factor(2) < 0.5


# ---- planning --------------------------------------------------------------------------------------------------------
BASE = {
    "name": "shared",
    "model": "SmolLM2-135M",
    "method": "ppsd",
    "acceptance": {"alpha": 0.5},
    "topology": {"stages": 4, "link": "nvlink"},
    "workload": {"requests": 1, "output_len": 32},
}


def write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def planned(tmp_path: Path, **fields: object) -> SimPlan:
    data = {**BASE, **fields}
    return build_plan(load_points(write(tmp_path, data))[0])


def devices(plan: SimPlan) -> list[int]:
    return [plan.device_of(i) for i in range(len(plan.stages))]


def test_one_host_backends_share_one_device_and_distributed_gives_each_stage_its_own(tmp_path: Path) -> None:
    for backend in ("streams", "sequential"):
        plan = planned(tmp_path, ppsd_backend=backend)
        assert devices(plan) == [0, 0, 0, 0] and plan.shares_devices
        assert plan.link_after(0) is LINKS["ideal"] and plan.return_link is LINKS["ideal"]
    plan = planned(tmp_path)
    assert devices(plan) == [0, 1, 2, 3] and not plan.shares_devices and plan.link_after(0) is LINKS["nvlink"]


def test_devices_in_blocks_or_per_stage(tmp_path: Path) -> None:
    plan = planned(tmp_path, topology={**BASE["topology"], "devices": 2})
    assert devices(plan) == [0, 0, 1, 1]
    assert plan.link_after(0) is LINKS["ideal"] and plan.link_after(1) is LINKS["nvlink"]
    assert plan.return_link is LINKS["nvlink"]
    stages = [{"device": d} for d in (0, 1, 0, 1)]
    assert devices(planned(tmp_path, topology={"stages": stages})) == [0, 1, 0, 1]
    assert devices(planned(tmp_path, ppsd_backend="streams", topology={"stages": 4, "devices": 4})) == [0, 1, 2, 3]


def test_ppsd_stages_are_laid_out_as_the_executor_lays_them(tmp_path: Path) -> None:
    """Balanced, the later stages taking the extra layers; the exit layer at the end of stage 1 (30 = 7+7+8+8)."""
    plan = planned(tmp_path)
    assert [(s.layer_start, s.layer_end) for s in plan.stages] == [(0, 7), (7, 14), (14, 22), (22, 30)]
    assert plan.exit_layer == 7


@pytest.mark.parametrize(
    ("topology", "message"),
    [
        ({"stages": [{"device": 0}, {}]}, "give a stage's `device` for every stage or for none"),
        ({"stages": [{"device": 0}, {"device": 0}], "devices": 1}, "give topology.devices or each stage's `device`"),
        ({"stages": [{"device": 0}, {"device": 2}]}, "stage device indices must be 0, 1, .. without gaps"),
        ({"stages": 2, "devices": 3}, "devices (3) must not exceed the stages (2)"),
        ({"stages": [{"device": 0, "gpu": "A100"}, {"device": 0}]}, "must be one device (same device name, tp 1)"),
        ({"stages": [{"device": 0, "tp": 3}, {"device": 0}]}, "must be one device (same device name, tp 1)"),
        ({"stages": 2, "devices": 1, "contention": "missing.csv"}, "topology.contention: file not found"),
        ({"stages": 2, "devices": 1, "gpu": "A100", "contention": "contention.csv"}, "was measured on 'NVIDIA H100"),
    ],
)
def test_refusals_name_the_file_and_field(tmp_path: Path, topology: dict, message: str) -> None:
    contention_file(tmp_path, {2: 0.2})
    path = write(tmp_path, {**BASE, "topology": topology})
    with pytest.raises(ScenarioError) as info:
        build_plan(load_points(path)[0])
    assert str(info.value).startswith(str(path)) and message in str(info.value)


def test_a_shared_device_must_hold_all_its_stages_weights(tmp_path: Path) -> None:
    fields = {"model": "Llama-2-70B", "topology": {"stages": 4, "gpu": "H100"}}
    assert len(planned(tmp_path, **fields).stages) == 4  # 35 GB per H100
    fields["topology"] = {"stages": 4, "devices": 1, "gpu": "H100"}
    with pytest.raises(ScenarioError, match=r"topology.stages\[0\], topology.stages\[1\].*do not fit"):
        planned(tmp_path, **fields)


def test_a_contention_profile_of_the_shared_device_is_used(tmp_path: Path) -> None:
    contention_file(tmp_path, {2: 0.25})
    plan = planned(tmp_path, ppsd_backend="streams", topology={"stages": 2, "contention": "contention.csv"})
    assert isinstance(plan.contention, ProfiledContention) and plan.contention.factor(2) == pytest.approx(0.25)
    assert isinstance(planned(tmp_path, ppsd_backend="streams").contention, SharedBandwidth)
    assert isinstance(planned(tmp_path, ppsd_backend="sequential").stage_contention(), Serial)


CPU_PROFILE = ROOT / "calibration" / "cpu" / "latency_smollm2-135m_cpu_fp32.csv"
CPU = "CPU: AMD EPYC (2 cores, 1 torch threads)"  # the device CPU_PROFILE was measured on


def test_a_processes_profile_prices_the_distributed_points_on_its_host(tmp_path: Path) -> None:
    """Distributed PPSD points on the profile's CPU use it; other backends and methods do not; distributed stages on
    another device are refused, naming the field."""
    processes_file(tmp_path, {1: 0.1}, device=CPU)
    fields = {"latency": {"profile": {"path": str(CPU_PROFILE), "cuda_graphs": False}}, "dtype": "fp32",
              "topology": {"stages": 2, "contention": "processes.csv"}}  # fmt: skip
    plan = planned(tmp_path, **fields)
    assert isinstance(plan.contention, ProfiledContention) and plan.contention.scope == "host"
    assert plan.contention_group(0) == plan.contention_group(1) == CPU and plan.device_of(0) != plan.device_of(1)
    assert isinstance(planned(tmp_path, **fields, ppsd_backend="sequential").stage_contention(), Serial)
    assert isinstance(planned(tmp_path, **{**fields, "method": "ar"}).contention, SharedBandwidth)
    path = write(tmp_path, {**BASE, "topology": {"stages": 2, "gpu": "H100", "contention": "processes.csv"}})
    with pytest.raises(ScenarioError, match="topology.contention: .* times stage processes on 'CPU: AMD EPYC"):
        build_plan(load_points(path)[0])
    for meta, message in (({"dtype": "bfloat16"}, "metadata.dtype: the profile was measured in bfloat16"),
                          ({"model": "Llama-2-7B"}, "topology.contention: ")):  # fmt: skip
        processes_file(tmp_path, {1: 0.1}, device=CPU, **meta)
        with pytest.raises(ScenarioError, match=message):
            planned(tmp_path, **fields)
    with pytest.raises(ValueError, match=r"duplicate record for \{'passes': 2\}"):  # no batch column to name
        write_contention_profile(tmp_path / "d.csv", {"device": CPU, "backend": "processes"},
                                 [ContentionRecord(2, 2.0, 1.0, 1.0, 1.0, 1.0)] * 2)  # fmt: skip


# ---- lockstep ticks --------------------------------------------------------------------------------------------------
def toy_plan(n: int, alphas: tuple[float, ...], output_len: int = 41, **fields: object) -> SimPlan:
    bounds = [i * MODEL.num_layers // n for i in range(n + 1)]
    latency = ConstantLatency({"layer": 10.0, "overhead": 5.0})
    stages = tuple(SimStage(bounds[i], bounds[i + 1], latency) for i in range(n))
    base = SimPlan(MODEL, stages, LINKS["ideal"], "ppsd", PositionalAcceptance(alphas), Workload(2, 1, 16, output_len),
                   exit_layer=bounds[1])  # fmt: skip
    return dataclasses.replace(base, **fields)


def on_one_device(plan: SimPlan, **stage_fields: object) -> SimPlan:
    stages = tuple(dataclasses.replace(s, device_index=0, **stage_fields) for s in plan.stages)
    return dataclasses.replace(plan, stages=stages)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize(("alphas", "per_token"), [((1.0,), "one"), ((0.0,), "n"), ((1.0, 0.0), "mixed")])
def test_every_backend_counts_the_executors_ticks(n: int, alphas: tuple[float, ...], per_token: str) -> None:
    """A token entering an empty pipe leaves after n ticks, one following a confirmed draft one tick later: the
    free-running pipe (a device per stage) and the lockstep ones (one host, or one device) count the same ticks."""
    decoded, requests = 40, 2
    runs = [
        toy_plan(n, alphas),
        toy_plan(n, alphas, ppsd_backend="streams"),
        on_one_device(toy_plan(n, alphas, ppsd_backend="sequential")),
        on_one_device(toy_plan(n, alphas, ppsd_backend="distributed")),
    ]
    ticks = {Simulation(plan).run().ticks for plan in runs}
    mixed = n + decoded // 2 + (decoded - 1) // 2 * n  # a confirm (1 tick) and a flush (n ticks) in turn
    expected = {"one": n + decoded - 1, "n": n * decoded, "mixed": mixed}[per_token]
    assert ticks == {requests * expected}


def test_sequential_on_one_device_does_ars_work_in_turn() -> None:
    """Stages in turn on one device: with every draft right PPSD does exactly AR's work (uncaptured, an empty stage
    is skipped and every pass pays its host overhead, as AR's stages do); with drafts flushed it also runs the
    flushed ones, so it is slower."""
    for alphas, same in (((1.0,), True), ((0.5,), False)):
        plan = on_one_device(toy_plan(3, alphas, ppsd_backend="sequential"))
        ppsd = Simulation(plan).run()
        ar = Simulation(dataclasses.replace(plan, method="ar")).run()
        assert (
            ppsd.decode_time_us == pytest.approx(ar.decode_time_us) if same else ppsd.decode_time_us > ar.decode_time_us
        )


def test_streams_overlap_launch_bound_passes_and_serialise_bandwidth_bound_ones() -> None:
    """On one device a tick takes its longest stage when the passes barely read HBM (as on devices of their own),
    and all its stages in turn when they are bandwidth-bound (as sequential)."""
    plan = toy_plan(2, (0.6,), ppsd_backend="streams")
    own = Simulation(plan).run().decode_time_us
    overlapped = Simulation(on_one_device(plan, hbm_GBps=1e12)).run().decode_time_us
    serial = Simulation(on_one_device(plan, hbm_GBps=1e-9)).run().decode_time_us
    sequential = Simulation(on_one_device(dataclasses.replace(plan, ppsd_backend="sequential"))).run()
    assert overlapped == pytest.approx(own)
    assert serial == pytest.approx(sequential.decode_time_us) and serial > 1.2 * own


def test_stages_on_one_device_need_no_link() -> None:
    slow = LinkSpec("slow", 1000.0, None)
    plan = dataclasses.replace(toy_plan(2, (1.0,)), link=slow, method="ar")
    apart, together = Simulation(plan).run(), Simulation(on_one_device(plan)).run()
    assert apart.decode_time_us - together.decode_time_us == pytest.approx(2 * 1000.0 * apart.decode_tokens)


def test_a_processes_profile_slows_a_distributed_ticks_passes_on_one_host(tmp_path: Path) -> None:
    """Stage processes of one host: f = 1 runs a tick's passes in turn (the sequential backend's time, messages being
    free here), f = 0.5 half-way, f = 0 as apart; stages on hosts of their own are not slowed."""
    plan = toy_plan(3, (0.6,), ppsd_backend="distributed")
    apart = Simulation(plan).run()

    def with_factor(f: float, stage_plan: SimPlan = plan) -> float:
        profile = ProfiledContention(read_contention_profile(processes_file(tmp_path, {1: f})))
        return Simulation(dataclasses.replace(stage_plan, contention=profile)).run().decode_time_us

    sequential = Simulation(on_one_device(dataclasses.replace(plan, ppsd_backend="sequential"))).run()
    assert with_factor(1.0) == pytest.approx(sequential.decode_time_us)
    assert with_factor(1.0) > 1.2 * apart.decode_time_us
    assert with_factor(0.5) == pytest.approx((apart.decode_time_us + sequential.decode_time_us) / 2)
    assert with_factor(0.0) == pytest.approx(apart.decode_time_us)
    hosts = tuple(dataclasses.replace(s, device=f"host {i}") for i, s in enumerate(plan.stages))
    assert with_factor(1.0, dataclasses.replace(plan, stages=hosts)) == pytest.approx(apart.decode_time_us)


def test_a_tick_beyond_the_profiles_batches_is_named_in_the_note(tmp_path: Path) -> None:
    """A distributed tick at a batch the processes profile did not measure takes the nearest batch's factor and says
    so: the run is flagged and the note names what was asked, beside any latency extrapolation."""
    from types import SimpleNamespace

    from sim.runner import extrapolation_note

    plan = toy_plan(2, (0.6,), ppsd_backend="distributed", workload=Workload(2, 2, 16, 41))
    profile = ProfiledContention(read_contention_profile(processes_file(tmp_path, {1: 0.5})))
    result = Simulation(dataclasses.replace(plan, contention=profile)).run()
    assert result.extrapolated and result.extrapolations == ("contention batch 2 (profiled 1)",)
    note = extrapolation_note([SimpleNamespace(result=result)])
    assert "contention batch 2 (profiled 1)" in note and "eesd calibrate contention" in note
    both = SimpleNamespace(result=dataclasses.replace(result, extrapolations=("decode q 9 (profiled 1-4)",
                                                                               *result.extrapolations)))  # fmt: skip
    note = extrapolation_note([both])
    assert "decode q 9 (profiled 1-4)" in note and "contention batch 2 (profiled 1)" in note
