"""Latency, link and acceptance models: profile interpolation and extrapolation flags, roofline, traces."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import yaml

from sim.acceptance import BernoulliAcceptance, TraceAcceptance
from sim.formats import (
    AcceptanceRecord,
    DataFile,
    LatencyRecord,
    LinkRecord,
    read_acceptance_trace,
    read_latency_profile,
    read_link_profile,
    write_acceptance_trace,
    write_latency_profile,
    write_link_profile,
)
from sim.hardware import GPUS, LINKS, allreduce_us, gpu_named_by
from sim.latency import ProfiledLink, ProfileLatency, RooflineLatency
from sim.models import MODELS
from sim.runner import run_points, write_outputs
from sim.scenario import ScenarioError, load_points

ROOT = Path(__file__).resolve().parents[1]
META = {"device": "test", "dtype": "bf16", "model": "SmolLM2-135M"}


def profile_file(tmp_path: Path, device: str = META["device"], model: str = META["model"]) -> Path:
    records = []
    for component, base in (("layer", 10.0), ("lm_head", 4.0)):
        for q in (1, 4):
            for context in (0, 1000):
                for batch in (1, 2):
                    t = base + q + context / 100 + 3 * (batch - 1)  # linear, so interpolation is exact
                    records.append(LatencyRecord(component, "verify", q, context, batch, True, t, t, t))
    return write_latency_profile(tmp_path / "profile.csv", {**META, "device": device, "model": model}, records)


def test_profile_interpolates_inside_and_flags_extrapolation(tmp_path: Path) -> None:
    latency = ProfileLatency(read_latency_profile(profile_file(tmp_path)))
    assert latency.time_us("layer", "verify", 2, 500, 1) == pytest.approx(10 + 2 + 5)
    assert latency.time_us("layer", "draft", 3, 250, 2) == pytest.approx(10 + 3 + 2.5 + 3)  # falls back to verify
    assert latency.time_us("overhead", "verify", 1, 0, 1) == 0.0
    assert not latency.extrapolated
    assert latency.time_us("lm_head", "verify", 8, 2000, 1) == pytest.approx(4 + 8 + 20)  # linear extrapolation
    assert latency.extrapolated


def test_the_extrapolations_say_what_was_asked_past_the_grid(tmp_path: Path) -> None:
    latency = ProfileLatency(read_latency_profile(profile_file(tmp_path)))
    latency.time_us("layer", "verify", 2, 500, 1)
    assert latency.extrapolations() == ()
    for q, context in ((8, 2000), (6, 500), (2, -10)):
        latency.time_us("lm_head", "verify", q, context, 1)
    latency.time_us("layer", "draft", 1, 0, 3)  # (a draft falls back to the verify rows: named as asked)
    assert latency.extrapolations() == (
        "draft batch 3 (profiled 1-2)", "verify q 8 (profiled 1-4)", "verify context -10 (profiled 0-1000)",
        "verify context 2000 (profiled 0-1000)",
    )  # fmt: skip


def test_an_edge_that_falls_is_held_flat_past_it(tmp_path: Path) -> None:
    """A profile whose batch 4 costs less than its batch 3 (a CPU's kernel switch, or noise) would price a batch of
    16 near nothing if its edge were extrapolated; past a falling edge the edge's cost holds (a rising one is
    still extrapolated). Host work and link profiles follow the same rule."""
    from sim.host_work import HostOverhead

    rows = [
        LatencyRecord(c, "verify", 1, 128, b, False, t * f, t * f, t * f)
        for c, f in (("layer", 1.0), ("lm_head", 3.0))
        for b, t in ((1, 1000), (2, 1500), (3, 2500), (4, 2000))
    ]
    latency = ProfileLatency(read_latency_profile(write_latency_profile(tmp_path / "p.csv", META, rows)), False)
    assert latency.time_us("layer", "verify", 1, 128, 16) == pytest.approx(2000) and latency.batch_edge_falls(True)
    assert latency.time_us("layer", "verify", 1, 128, 0) == pytest.approx(500)  # a rising edge: along it
    assert latency.extrapolated and not latency.batch_edge_falls(False)
    host = HostOverhead("ar", (1, 4), (300.0, 200.0))
    assert host.at(8) == 200.0 and host.at(2) == pytest.approx(266.667, rel=1e-4)
    link = ProfiledLink(read_link_profile(write_link_profile(tmp_path / "l.csv", {"backend": "gloo"}, [
        LinkRecord(1000, 10.0, 10.0, 10.0), LinkRecord(2000, 8.0, 8.0, 8.0)])))  # fmt: skip
    assert link.time_us(100) == 10.0 and not link.extrapolated  # smaller than profiled: the smallest's time
    assert link.time_us(10_000) == 8.0 and link.extrapolated


def test_draft_and_verify_rows_of_the_same_work_are_read_as_their_mean(tmp_path: Path) -> None:
    """A draft-phase and a verify-phase `layer` / `lm_head` row at one (q = 1, context, batch) time the same work:
    both read as their mean; a verify row of another q, an `exit_head` (draft only), the host's `overhead` and
    prefill rows are read as measured."""
    rows = [LatencyRecord("layer", "draft", 1, 128, 1, False, 1000, 1000, 1000),
            LatencyRecord("layer", "verify", 1, 128, 1, False, 1100, 1100, 1100),
            LatencyRecord("layer", "verify", 2, 128, 1, False, 1500, 1500, 1500),
            LatencyRecord("lm_head", "draft", 1, 128, 1, False, 9000, 9000, 9000),
            LatencyRecord("lm_head", "verify", 1, 128, 1, False, 9400, 9400, 9400),
            LatencyRecord("lm_head", "verify", 2, 128, 1, False, 9600, 9600, 9600),
            LatencyRecord("lm_head", "prefill", 1, 0, 1, False, 8000, 8000, 8000),
            LatencyRecord("exit_head", "draft", 1, 128, 1, False, 12000, 12000, 12000),
            LatencyRecord("overhead", "draft", 1, 128, 1, False, 700, 700, 700),
            LatencyRecord("overhead", "verify", 1, 128, 1, False, 400, 400, 400)]  # fmt: skip
    latency = ProfileLatency(read_latency_profile(write_latency_profile(tmp_path / "p.csv", META, rows)), False)
    for phase in ("draft", "verify"):
        assert latency.time_us("layer", phase, 1, 128, 1) == pytest.approx(1050)
        assert latency.time_us("lm_head", phase, 1, 128, 1) == pytest.approx(9200)
    assert latency.time_us("layer", "verify", 2, 128, 1) == pytest.approx(1500)
    assert latency.time_us("lm_head", "prefill", 1, 0, 1) == pytest.approx(8000)
    assert latency.time_us("exit_head", "draft", 1, 128, 1) == pytest.approx(12000)
    assert (latency.time_us("overhead", "draft", 1, 128, 1), latency.time_us("overhead", "verify", 1, 128, 1)) == (
        pytest.approx(700), pytest.approx(400))  # fmt: skip


def test_profile_overhead_override_replaces_the_host_rows_only(tmp_path: Path) -> None:
    """`latency.profile.overhead_us` prices the host's work per read at a constant (a method's own, measured) in place
    of the profile's `overhead` rows; the device's rows stay as profiled, and a scenario's speed moves with it."""
    rows = [LatencyRecord("layer", "verify", 1, 128, 1, True, 30, 30, 30),
            LatencyRecord("lm_head", "verify", 1, 128, 1, True, 40, 40, 40),
            LatencyRecord("overhead", "verify", 1, 128, 1, True, 500, 500, 500)]  # fmt: skip
    profile = read_latency_profile(write_latency_profile(tmp_path / "p.csv", META, rows))
    latency = ProfileLatency(profile, overhead_us=40.0)
    assert latency.time_us("overhead", "verify", 1, 128, 1) == latency.time_us("overhead", "draft", 1, 999, 8) == 40
    assert latency.time_us("layer", "verify", 1, 128, 1) == 30 and ProfileLatency(profile).time_us(
        "overhead", "verify", 1, 128, 1) == 500  # fmt: skip
    scenario = yaml.safe_load((ROOT / "scenarios" / "quickstart.yaml").read_text())
    scenario["latency"]["profile"]["path"] = str(ROOT / "calibration/h100/latency_smollm2-135m_cuda_bf16_compiled.csv")
    scenario["acceptance"] = {"alpha": 0.5}
    scenario["method"], scenario["sweep"] = "eesd", {"latency.profile.overhead_us": [0, 400]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario))
    lean, heavy = (r.result.tokens_per_s for r in run_points(load_points(tmp_path / "s.yaml"), progress=False))
    assert lean > 1.1 * heavy
    scenario["sweep"] = {"latency.profile.overhead_us": [-1]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario))
    with pytest.raises(ScenarioError, match=r"latency\.profile\.overhead_us: .*greater than or equal to 0"):
        load_points(tmp_path / "s.yaml")


def test_profile_needs_layer_rows_and_a_full_grid(tmp_path: Path) -> None:
    path = write_latency_profile(tmp_path / "p.csv", META, [LatencyRecord("lm_head", "verify", 1, 0, 1, True, 1, 1, 1)])
    with pytest.raises(ValueError, match="no 'layer' rows"):
        ProfileLatency(read_latency_profile(path))
    rows = [LatencyRecord("layer", "verify", q, c, 1, True, 1, 1, 1) for q, c in ((1, 0), (2, 0), (1, 10))]
    path = write_latency_profile(tmp_path / "p.csv", META, rows)
    with pytest.raises(ValueError, match="grid over \\(q, context_len, batch\\) is incomplete"):
        ProfileLatency(read_latency_profile(path))


def test_profiled_link_interpolates(tmp_path: Path) -> None:
    path = write_link_profile(
        tmp_path / "l.csv", {"backend": "gloo"}, [LinkRecord(0, 10.0, 9.0, 11.0), LinkRecord(1000, 20.0, 19.0, 21.0)]
    )
    link = ProfiledLink(read_link_profile(path))
    assert link.time_us(500) == pytest.approx(15.0) and not link.extrapolated
    assert link.time_us(2000) == pytest.approx(30.0) and link.extrapolated


def test_a_message_smaller_than_a_link_profiles_sizes_costs_the_smallest_unflagged(tmp_path: Path) -> None:
    """PPSD's token ids (8 bytes a row) are smaller than a profile of 256 B and up: latency-bound, priced at the
    smallest size's time, not flagged as extrapolated (every distributed PPSD point was)."""
    path = write_link_profile(
        tmp_path / "l.csv", {"backend": "gloo"}, [LinkRecord(256, 30.0, 29.0, 31.0), LinkRecord(1024, 34.0, 33, 35)]
    )
    link = ProfiledLink(read_link_profile(path))
    assert link.time_us(8) == 30.0 and link.time_us(256) == 30.0 and not link.extrapolated
    large = write_link_profile(
        tmp_path / "m.csv", {"backend": "gloo"}, [LinkRecord(2**20, 50.0, 49, 51), LinkRecord(2**24, 650.0, 640, 660)]
    )
    link = ProfiledLink(read_link_profile(large))  # a first size far past latency-bound: extrapolated, and flagged
    assert link.time_us(1152) == pytest.approx(50.0 - 600.0 * (2**20 - 1152) / (2**24 - 2**20)) and link.extrapolated


def test_roofline_matches_the_measured_h100_layers() -> None:
    """docs/design.md (measured anchors): 7B layer 0.198 ms, SmolLM2 layer 0.062 ms (q = 1, CUDA graphs); eager is
    host-bound."""
    h100 = GPUS["H100"]
    seven_b = RooflineLatency(h100, MODELS["Llama-2-7B"])
    assert seven_b.time_us("layer", "verify", 1, 0, 1) == pytest.approx(198, rel=0.05)
    assert RooflineLatency(h100, MODELS["SmolLM2-135M"]).time_us("layer", "verify", 1, 0, 1) == pytest.approx(
        62, rel=0.05
    )
    eager = RooflineLatency(h100, MODELS["Llama-2-7B"], cuda_graphs=False)
    assert eager.time_us("layer", "verify", 1, 0, 1) == pytest.approx(560)
    # a verify of 8 tokens costs about one token's weight traffic; prefill of 4k tokens is compute-bound
    assert seven_b.time_us("layer", "verify", 8, 0, 1) < 1.05 * seven_b.time_us("layer", "verify", 1, 0, 1)
    assert seven_b.time_us("layer", "prefill", 4096, 0, 1) > 10 * seven_b.time_us("layer", "verify", 1, 0, 1)
    assert RooflineLatency(h100, MODELS["Llama-2-7B"], tp=2).time_us("layer", "verify", 1, 0, 1) < 0.6 * 198


def test_allreduce_alpha_beta() -> None:
    nvlink = LINKS["nvlink"]
    assert allreduce_us(nvlink, 1 << 20, 1) == 0.0
    # ring over 4 ranks: 6 latency steps, 6/4 of the bytes over the link
    assert allreduce_us(nvlink, 4_500_000, 4) == pytest.approx(6 * 5.0 + 1.5 * 4_500_000 / 450e3)


def test_bernoulli_confidence_is_calibrated() -> None:
    stream = BernoulliAcceptance(0.7, confidence_sharpness=5.0).stream(random.Random(1), 0)
    draws = [stream.draft(p, 0) for p in range(20000)]
    assert sum(m for m, _ in draws) / len(draws) == pytest.approx(0.7, abs=0.015)
    assert stream.draft(5, 3) == draws[5]  # a position's draft does not depend on the round


def write_trace(tmp_path: Path) -> Path:
    pattern = [1, 1, 1, 0, 1, 1, 0, 0]  # per prompt, at exit layer 8; never matches at layer 4
    records = [
        AcceptanceRecord(
            f"p{i}", pos, 100 + pos, layer, bool(pattern[pos]) and layer == 8, 0.9 if pattern[pos] else 0.2
        )
        for i in range(2)
        for pos in range(len(pattern))
        for layer in (4, 8)
    ]
    return write_acceptance_trace(tmp_path / "trace.csv", {"model": "SmolLM2-135M", "head": "trained"}, records)


def test_trace_replay_is_exact(tmp_path: Path) -> None:
    trace = TraceAcceptance(read_acceptance_trace(write_trace(tmp_path)), exit_layer=8)
    stream = trace.stream(random.Random(0), request=1)
    assert [stream.draft(p, 0)[0] for p in range(10)] == [True, True, True, False, True, True, False, False, True, True]
    with pytest.raises(ValueError, match="no records for exit_layer 5; it has \\[4, 8\\]"):
        TraceAcceptance(read_acceptance_trace(write_trace(tmp_path)), exit_layer=5)


def test_a_trace_whose_positions_skip_one_is_refused_not_joined() -> None:
    """A replay reads a prompt's tokens in turn: a missing position (here 2 of p0 at layer 8, the rows in any order)
    would join two parts of its text, so it is refused, naming the record (its line where the trace was read)."""
    records = [AcceptanceRecord("p0", pos, 100 + pos, layer, True, 0.9) for pos in (3, 0, 1) for layer in (4, 8)]
    trace = DataFile("acceptance_trace", {"model": "SmolLM2-135M", "head": "shared"}, tuple(records))
    with pytest.raises(ValueError, match="^acceptance trace record 2: column 'position': expected 2, got 3 .prompt"):
        TraceAcceptance(trace, exit_layer=8)
    with pytest.raises(ValueError, match="^t.csv:4: column 'position': expected 2, got 3"):
        TraceAcceptance(dataclasses.replace(trace, path="t.csv"), exit_layer=8)


def test_scenario_with_profile_and_trace_replays_accepted_lengths(tmp_path: Path) -> None:
    profile_file(tmp_path)
    write_trace(tmp_path)
    scenario = {
        "name": "replay",
        "model": "SmolLM2-135M",
        "method": "eesd",
        "exit_layer": 8,
        "policy": "fixed:3",
        "latency": {"profile": {"path": "profile.csv"}},
        "acceptance": {"trace": "trace.csv"},
        "topology": {"stages": 1},
        "workload": {"requests": 1, "prompt_len": 100, "output_len": 9},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario))
    (result,) = run_points(load_points(path), progress=False)
    # token 0 from prefill; drafts at 1,2,3 -> match, match, no -> 2 + 1 tokens; at 4,5,6 -> yes yes no -> 3;
    # at 7 (remaining 2 -> 1 draft) -> no -> 1 token; then one token left at 8 (no draft) -> 8 tokens in 4 rounds.
    assert result.result.decode_tokens == 8 and result.result.rounds == 4 and result.result.accepted == 4
    assert result.result.extrapolated  # the 100-token prefill lies outside the profiled q grid [1, 4]


@pytest.mark.parametrize(
    ("device", "gpu"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("CPU: AMD EPYC (2 cores, 1 torch threads)", None),
        ("NVIDIA A10G", None),
    ],
)
def test_a_device_name_names_its_gpu(device: str, gpu: str | None) -> None:
    assert gpu_named_by(device) == gpu


def profiled_scenario(tmp_path: Path, device: str, topology: dict, model: str = "SmolLM2-135M") -> Path:
    profile_file(tmp_path, device, model)  # a profile of the scenario's model
    scenario = {
        "name": "profiled",
        "model": model,
        "method": "eesd",
        "exit_layer": 8,
        "latency": {"profile": {"path": "profile.csv"}},
        "acceptance": {"alpha": 0.5},
        "topology": topology,
        "workload": {"requests": 1, "prompt_len": 100, "output_len": 9},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario))
    return path


@pytest.mark.parametrize(
    ("device", "topology", "stage_devices"),
    [
        ("CPU: AMD EPYC (2 cores)", {"stages": 1}, ["CPU: AMD EPYC (2 cores)"]),
        ("NVIDIA H200", {"gpu": "H200", "stages": 1}, ["NVIDIA H200"]),
        ("NVIDIA H100 80GB HBM3", {"stages": [{"gpu": "H100"}, {}]}, ["NVIDIA H100 80GB HBM3"] * 2),
    ],
)
def test_a_profiled_stage_runs_on_the_profiles_device(
    tmp_path: Path, device: str, topology: dict, stage_devices: list[str]
) -> None:
    """The trace names each stage after the device its profile was measured on; the scenario need not name a GPU,
    and a GPU it names must be that device."""
    (result,) = run_points(load_points(profiled_scenario(tmp_path, device, topology)), progress=False)
    write_outputs([result], tmp_path / "out")
    events = json.loads((tmp_path / "out" / "trace.json").read_text())["traceEvents"]
    names = [e["args"]["name"] for e in events if e["ph"] == "M" and e["tid"] < len(stage_devices)]  # (then links)
    assert names == [f"stage {i + 1} ({name})" for i, name in enumerate(stage_devices)]


@pytest.mark.parametrize(
    ("device", "topology", "field"),
    [
        ("CPU: AMD EPYC (2 cores)", {"gpu": "H100", "stages": 1}, "topology.gpu"),
        ("NVIDIA H200", {"gpu": "H100", "stages": 1}, "topology.gpu"),
        ("test", {"gpu": "H100", "stages": 1}, "topology.gpu"),
        ("NVIDIA H100 80GB HBM3", {"stages": [{}, {"gpu": "A100"}]}, "topology.stages[1].gpu"),
    ],
)
def test_a_gpu_contradicting_the_profile_is_refused(tmp_path: Path, device: str, topology: dict, field: str) -> None:
    path = profiled_scenario(tmp_path, device, topology)
    with pytest.raises(ScenarioError) as info:
        load_points(path)
    assert str(info.value).startswith(f"{path}: {field}: ")
    assert f"contradicts latency.profile, measured on {device!r}" in str(info.value)


def test_a_profiled_stage_is_checked_against_the_memory_of_the_profiles_gpu(tmp_path: Path) -> None:
    """Llama-2-70B's weights do not fit one H100: refused where the profile was measured on one, not on a CPU (whose
    memory the simulator does not know)."""
    path = profiled_scenario(tmp_path, "NVIDIA H100 80GB HBM3", {"stages": 1}, model="Llama-2-70B")
    with pytest.raises(ScenarioError, match="do not fit a 80 GiB NVIDIA H100 80GB HBM3"):
        load_points(path)
    assert len(load_points(profiled_scenario(tmp_path, "CPU: AMD EPYC", {"stages": 1}, model="Llama-2-70B"))) == 1


@pytest.mark.parametrize(
    ("batch", "batches", "says"),
    [
        (2, (1, 2), None),
        (4, (1, 2), "workload.batch_size 4 lies outside the batches [1, 2] of {path}: extrapolated linearly from "
                    "batches 1 and 2"),
        (8, (1,), "workload.batch_size 8 lies outside the batches [1] of {path}: costed as batch 1 (a single batch "
                  "profiled: flat, as if rows were free)"),
    ],
)  # fmt: skip
def test_a_batch_the_profile_does_not_span_is_said(tmp_path: Path, batch: int, batches: tuple, says: str | None):
    """The simulator costs it from the profile's edge; the output says so, and how (flat from one batch size: the
    H200's batch-8 predictions were 53-260% fast from a batch-1 profile)."""
    data = yaml.safe_load(profiled_scenario(tmp_path, META["device"], {"stages": 1}).read_text())
    rows = [r for r in read_latency_profile(tmp_path / "profile.csv").records if r.batch in batches]
    path = write_latency_profile(tmp_path / "profile.csv", META, rows)
    data["workload"].update(requests=batch, batch_size=batch)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    (result,) = run_points(load_points(tmp_path / "s.yaml"), progress=False)
    notes = [note for note in result.notes if "batch_size" in note]
    assert notes == (
        [] if says is None else [says.format(path=path) + f"; profile it (eesd calibrate latency --batch 1,{batch})"]
    )


def test_a_replayed_traces_mean_match_is_its_recorded_agreement() -> None:
    """Over the drafted positions (each prompt's token 0 comes from prefill and is never drafted), as the trace's
    own metadata counts it: `--break-even`'s acceptance column and `eesd calibrate acceptance` say the same."""
    for name, layer in (("acceptance_smollm2-135m_e15mix5v16k_builtin_heldout.csv", 15),
                        ("acceptance_smollm2-135m_shared_builtin.csv", 22)):  # fmt: skip
        trace = read_acceptance_trace(ROOT / "calibration" / "cpu" / name)
        recorded = trace.metadata["agreement"][str(layer)]
        assert TraceAcceptance(trace, layer).mean_match == pytest.approx(recorded, abs=5e-5)


def test_a_profile_without_the_scenarios_capture_kind_is_named_with_the_scenario(tmp_path: Path) -> None:
    profile = ROOT / "calibration" / "cpu" / "serving" / "latency_smollm2-135m_cpu_fp32.csv"  # uncaptured rows
    scenario = {"name": "g", "model": "SmolLM2-135M", "dtype": "fp32", "method": "ar",
                "latency": {"profile": {"path": str(profile), "cuda_graphs": True}}, "acceptance": {"alpha": 0.5},
                "topology": {"stages": 1}, "workload": {"requests": 1, "output_len": 8}}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario))
    with pytest.raises(ScenarioError, match=r"s\.yaml: latency\.profile: .*no 'layer' rows with cuda_graphs=1"):
        load_points(tmp_path / "s.yaml")
