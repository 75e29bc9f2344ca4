"""`eesd calibrate host`: the host's work between passes per method, from the executor's own decodes (`calibrate.host`).
The figures are timings (not asserted beyond their bookkeeping); what is checked is that the split adds up, that the
serving fields take the column the simulator pays (per read for captured passes, per pass uncaptured), the file and
the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from packages import requires_smollm2
from test_passes import EXIT_LAYER, PROMPTS, model

from calibrate.host import FORMAT, PassClock, by_method_snippet, decode, host_rows
from executor.cli import main

ROOT = Path(__file__).resolve().parents[1]
LATENCY = ROOT / "calibration" / "cpu" / "serving" / "latency_smollm2-135m_cpu_fp32.csv"
TRACE = ROOT / "calibration" / "cpu" / "acceptance_smollm2-135m_shared_builtin.csv"


def test_a_decode_splits_into_prefill_passes_and_host_work() -> None:
    """Every pass the decode launched is timed once (AR: one a token after the prefill's; EESD fixed:2: two drafts
    and a verify a round), and the host's work is what is left of the decode's wall time."""
    net, clock = model(epsilon=0.2), PassClock()
    clock.install()
    try:
        ids = torch.tensor([PROMPTS[0]])
        ar = decode(net, ids, "ar", clock, max_new_tokens=12, exit_layer=EXIT_LAYER, policy="fixed:2")
        eesd = decode(net, ids, "eesd", clock, max_new_tokens=12, exit_layer=EXIT_LAYER, policy="fixed:2")
    finally:
        clock.uninstall()
    assert ar["passes"] == ar["tokens"] - 1 == 11 and ar["host_reads"] == 11
    assert {kind for kind, *_ in clock.calls[: ar["passes"]]} == {"ar"}
    kinds = [kind for kind, *_ in clock.calls[ar["passes"] :]]
    assert kinds.count("verify") == eesd["host_reads"] and kinds.count("draft") <= 2 * kinds.count("verify")
    assert all(r["host_ms"] > 0 and r["passes_ms"] > 0 for r in (ar, eesd))
    from executor.passes import Passes

    assert not hasattr(Passes.ar, "__wrapped__")  # uninstalled: the passes are the executor's own again


def test_rows_take_medians_per_read_round_and_pass_and_the_fields_the_right_column() -> None:
    runs = [
        {"method": "ar", "tokens": 9, "rounds": 9, "host_reads": 8, "passes": 8, "passes_ms": 90.0, "host_ms": 0.8},
        {"method": "ar", "tokens": 9, "rounds": 9, "host_reads": 8, "passes": 8, "passes_ms": 90.0, "host_ms": 1.6},
        {"method": "eesd", "tokens": 9, "rounds": 5, "host_reads": 4, "passes": 8, "passes_ms": 80.0, "host_ms": 1.2},
    ]
    ar, eesd = host_rows(runs)
    assert ar["host_ms_per_read"] == pytest.approx(0.15) and ar["host_ms_per_pass"] == pytest.approx(0.15)
    assert eesd["host_ms_per_read"] == pytest.approx(0.3) and eesd["host_ms_per_pass"] == pytest.approx(0.15)
    assert eesd["host_ms_per_round"] == pytest.approx(0.24) and eesd["tokens_per_round"] == pytest.approx(1.8)
    assert by_method_snippet([ar, eesd], captured=True) == (
        "serving.by_method: {ar: {latency.profile.overhead_us: 150}, eesd: {latency.profile.overhead_us: 300}}"
    )
    assert "eesd: {latency.profile.overhead_us: 150}" in by_method_snippet([ar, eesd], captured=False)


def test_decode_breakdown_uses_the_same_measurement() -> None:
    bench = load_benchmark("decode_breakdown")
    assert bench.PassClock is PassClock and bench.host_rows is host_rows


@requires_smollm2
def test_the_cli_writes_the_figures_and_refuses_bad_input(tmp_path, capsys) -> None:
    out = tmp_path / "host.json"
    argv = ["calibrate", "host", "--model", "smollm2-135m", "--exit-layer", "15", "--prompts", "1",
            "--max-new-tokens", "6", "--repeats", "1", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["format"] == FORMAT and data["schema_version"] == 1
    assert [row["method"] for row in data["methods"]] == ["ar", "eesd"]
    assert data["metadata"]["exit_layer"] == 15 and data["metadata"]["capture"] == "none"
    assert data["serving_by_method"] in printed and "paid every pass" in printed
    assert len(data["decodes"]) == 2 and all(d["host_ms"] > 0 for d in data["decodes"])
    assert main(argv) == 2 and "exists; pass --force" in capsys.readouterr().err
    assert main([*argv[:-2], "--out", str(tmp_path / "host.csv")]) == 2
    assert "expected a .json file" in capsys.readouterr().err
    assert main([*argv[:4], "--prompts", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--prompts must be >= 1, got 0" in capsys.readouterr().err


@requires_smollm2
def test_a_serving_scenario_takes_each_methods_host_work(tmp_path, capsys) -> None:
    """`calibrate host` -> `calibrate scenario --serving --host`: each method's plan prices a host read at its own
    measured figure (per pass, the CPU profile being of uncaptured passes)."""
    from calibrate.scaffold import write_scenario
    from sim.serving import load_serving_points

    host = tmp_path / "host.json"
    assert main(["calibrate", "host", "--model", "smollm2-135m", "--exit-layer", "15", "--prompts", "1",
                 "--max-new-tokens", "6", "--repeats", "1", "--threads", "1", "--out", str(host)]) == 0  # fmt: skip
    rows = {row["method"]: row for row in json.loads(host.read_text())["methods"]}
    out = write_scenario(LATENCY, TRACE, tmp_path / "serve.yaml", policies=("fixed:1",), serving=True, host=host)
    assert f"host work per method {host}" in out.read_text() and "per pass" in out.read_text()
    points = load_serving_points(out)
    for point in points:
        want = round(rows[point.method]["host_ms_per_pass"] * 1e3, 1)
        assert point.plan.stages[0].latency.overhead_us == pytest.approx(want)


def _host_file(path, **changes) -> None:
    rows = [{"method": m, "host_ms_per_read": 0.1, "host_ms_per_pass": 0.05} for m in ("ar", "eesd")]
    data = {"format": FORMAT, "schema_version": 1, "metadata": {"model": "smollm2-135m", "device_type": "cpu",
            "capture": "none"}, "methods": rows}  # fmt: skip
    for key, value in changes.items():
        if key in ("model", "device_type", "capture"):
            data["metadata"][key] = value
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "eesd.round_costs"}, "format: expected 'eesd.host_work'"),
        ({"schema_version": 2}, "schema_version: expected 1, got 2"),
        (
            {"methods": [{"method": "ar", "host_ms_per_read": 0.1, "host_ms_per_pass": 0.1}]},
            "methods: expected one row",
        ),
        (
            {"methods": [{"method": m, "host_ms_per_read": -1, "host_ms_per_pass": 0} for m in ("ar", "eesd")]},
            "methods.ar.host_ms_per_read: expected milliseconds >= 0, got -1",
        ),
        ({"device_type": "cuda"}, "metadata.device_type is 'cuda', the latency profile's is 'cpu'"),
        ({"model": "gemma3-270m"}, "metadata.model is 'gemma3-270m'"),
        ({"capture": "graph"}, "measured with capture 'graph', the profile is of uncaptured passes"),
    ],
)
def test_a_host_file_that_does_not_fit_is_refused(tmp_path, changes, message) -> None:
    from calibrate.scaffold import write_scenario

    host = tmp_path / "host.json"
    _host_file(host, **changes)
    with pytest.raises(ValueError, match="") as info:
        write_scenario(LATENCY, TRACE, tmp_path / "s.yaml", policies=("fixed:1",), serving=True, host=host)
    assert message in str(info.value) and str(host) in str(info.value)
    assert not (tmp_path / "s.yaml").exists()


def test_host_work_needs_a_serving_scenario(tmp_path) -> None:
    from calibrate.scaffold import write_scenario

    host = tmp_path / "host.json"
    _host_file(host)
    with pytest.raises(ValueError, match="add --serving"):
        write_scenario(LATENCY, TRACE, tmp_path / "s.yaml", host=host)
    write_scenario(LATENCY, TRACE, tmp_path / "s.yaml", policies=("fixed:1",), serving=True, host=host)
