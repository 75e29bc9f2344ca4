"""Latency, link and acceptance models: profile interpolation and extrapolation flags, roofline, traces."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from sim.acceptance import BernoulliAcceptance, TraceAcceptance
from sim.formats import (
    AcceptanceRecord,
    LatencyRecord,
    LinkRecord,
    read_acceptance_trace,
    read_latency_profile,
    read_link_profile,
    write_acceptance_trace,
    write_latency_profile,
    write_link_profile,
)
from sim.hardware import GPUS, LINKS, allreduce_us
from sim.latency import ProfiledLink, ProfileLatency, RooflineLatency
from sim.models import MODELS
from sim.runner import run_points
from sim.scenario import load_points

META = {"device": "test", "dtype": "bf16", "model": "SmolLM2-135M"}


def profile_file(tmp_path: Path) -> Path:
    records = []
    for component, base in (("layer", 10.0), ("lm_head", 4.0)):
        for q in (1, 4):
            for context in (0, 1000):
                for batch in (1, 2):
                    t = base + q + context / 100 + 3 * (batch - 1)  # linear, so interpolation is exact
                    records.append(LatencyRecord(component, "verify", q, context, batch, True, t, t, t))
    return write_latency_profile(tmp_path / "profile.csv", META, records)


def test_profile_interpolates_inside_and_flags_extrapolation(tmp_path: Path) -> None:
    latency = ProfileLatency(read_latency_profile(profile_file(tmp_path)))
    assert latency.time_us("layer", "verify", 2, 500, 1) == pytest.approx(10 + 2 + 5)
    assert latency.time_us("layer", "draft", 3, 250, 2) == pytest.approx(10 + 3 + 2.5 + 3)  # falls back to verify
    assert latency.time_us("overhead", "verify", 1, 0, 1) == 0.0
    assert not latency.extrapolated
    assert latency.time_us("lm_head", "verify", 8, 2000, 1) == pytest.approx(4 + 8 + 20)  # linear extrapolation
    assert latency.extrapolated


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


def test_roofline_matches_the_measured_h100_layers() -> None:
    """DESIGN.md §4: 7B layer 0.198 ms, SmolLM2 layer 0.062 ms (q = 1, CUDA graphs); eager is host-bound."""
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
