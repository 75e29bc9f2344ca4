"""`eesd calibrate host`: the host's work between passes per method and batch size, from the executor's own decodes
(`calibrate.host`), and the simulator's use of its file (`latency.profile.host_work`, `sim.host_work`). The figures
are timings (not asserted beyond their bookkeeping); what is checked is that the split adds up, that the simulator
pays the column it should (per read for captured passes, per pass uncaptured) at the point's batch size for each
method, the file and the refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from benchmark_scripts import load_benchmark
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packages import requires_smollm2
from test_passes import EXIT_LAYER, PROMPTS, model

from calibrate.host import (
    FORMAT,
    PassClock,
    ServeClock,
    batches_of,
    by_method_snippet,
    decode,
    host_rows,
    serve_decode,
    serve_rounds,
)
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


def test_a_ppsd_decode_times_every_stages_pass_and_counts_a_tick_as_one_pass() -> None:
    """PPSD on its sequential backend: each stage's pass timed (a stage holding no token skips it), a tick counted as
    one pass and one round (the simulator's token pass), a host read a tick uncaptured; the transition and the books
    are the host's work."""
    net, clock = model(epsilon=0.2), PassClock()
    clock.install()
    try:
        run = decode(net, torch.tensor([PROMPTS[0]]), "ppsd", clock, max_new_tokens=12, exit_layer=EXIT_LAYER,
                     policy="fixed:2", ppsd_stages=2)  # fmt: skip
    finally:
        clock.uninstall()
    assert run["method"] == "ppsd" and run["tokens"] == 12 and run["rounds"] >= 11
    assert run["passes"] == run["rounds"] == run["host_reads"]
    assert {kind for kind, *_ in clock.calls} == {"stage"} and run["rounds"] < len(clock.calls) <= 2 * run["rounds"]
    assert run["host_ms"] > 0 and run["passes_ms"] == pytest.approx(sum(call[3] for call in clock.calls))
    (row,) = host_rows([run])
    assert row["host_ms_per_pass"] == row["host_ms_per_round"] == row["host_ms_per_read"]
    assert row["tokens_per_round"] == round(11 / run["rounds"], 3)  # tokens a tick, after the prefill's
    from executor.ppsd import StageRunner

    assert not hasattr(StageRunner.pass_, "__wrapped__")


def test_rows_take_medians_per_read_round_and_pass_and_the_fields_the_right_column() -> None:
    runs = [
        {"method": "ar", "decoded": 8, "rounds": 9, "host_reads": 8, "passes": 8, "passes_ms": 90.0, "host_ms": 0.8},
        {"method": "ar", "decoded": 8, "rounds": 9, "host_reads": 8, "passes": 8, "passes_ms": 90.0, "host_ms": 1.6},
        {"method": "eesd", "decoded": 8, "rounds": 5, "host_reads": 4, "passes": 8, "passes_ms": 80.0, "host_ms": 1.2},
    ]
    ar, eesd = host_rows(runs[::-1])  # rows come in method order whatever the decodes' order
    assert ar["method"] == "ar" and ar["batch"] == eesd["batch"] == 1
    assert ar["host_ms_per_read"] == pytest.approx(0.15) and ar["host_ms_per_pass"] == pytest.approx(0.15)
    assert eesd["host_ms_per_read"] == pytest.approx(0.3) and eesd["host_ms_per_pass"] == pytest.approx(0.15)
    assert eesd["host_ms_per_round"] == pytest.approx(0.24) and eesd["tokens_per_round"] == pytest.approx(
        1.6
    )  # the prefill's token aside
    assert by_method_snippet([ar, eesd], captured=True) == (
        "serving.by_method: {ar: {latency.profile.overhead_us: 150}, eesd: {latency.profile.overhead_us: 300}}"
    )
    assert "eesd: {latency.profile.overhead_us: 150}" in by_method_snippet([ar, eesd], captured=False)


def test_decode_breakdown_uses_the_same_measurement() -> None:
    bench = load_benchmark("decode_breakdown")
    assert bench.PassClock is PassClock and bench.host_rows is host_rows


def test_batches_hold_every_prompt_left_padded() -> None:
    (ids, mask), (ids2, mask2) = batches_of([[5, 6, 7], [8], [9, 9]], 2)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids2.tolist() == [[0, 9, 9], [5, 6, 7]] and mask2.tolist() == [[0, 1, 1], [1, 1, 1]]  # filled from the first
    assert [m for _, m in batches_of([[1], [2]], 1)] == [None, None]


@requires_smollm2
def test_the_cli_writes_the_figures_and_refuses_bad_input(tmp_path, capsys) -> None:
    out = tmp_path / "host.json"
    argv = ["calibrate", "host", "--model", "smollm2-135m", "--exit-layer", "15", "--prompts", "2", "--batch", "1,2",
            "--max-new-tokens", "6", "--repeats", "1", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "note: 1 timed decode(s) per method and batch" in captured.err  # batch 2 holds both prompts, once
    data = json.loads(out.read_text())
    assert data["format"] == FORMAT and data["schema_version"] == 3
    methods = [(row["method"], row["batch"]) for row in data["methods"]]
    assert methods == [("ar", 1), ("ar", 2), ("eesd", 1), ("eesd", 2), ("ppsd", 1), ("ppsd", 2)]
    assert data["metadata"]["ppsd_stages"] == 2 and data["metadata"]["ppsd_backend"] == "sequential"
    assert "ppsd batch 1: host work" in printed and "a tick (its every stage's pass)" in printed
    assert data["metadata"]["exit_layer"] == 15 and data["metadata"]["capture"] == "none"
    assert data["metadata"]["batch"] == [1, 2] and data["metadata"]["sync_every"] == 1
    assert data["metadata"]["num_layers"] == 30 and data["metadata"]["model_config"]["hidden_size"] == 576
    assert data["serving_by_method"] in printed and "paid every pass" in printed
    assert f"latency.profile.host_work: {out}" in printed
    assert [(d["method"], d["batch"]) for d in data["decodes"]] == [
        *[("ar", 1), ("eesd", 1), ("ppsd", 1)] * 2,
        ("ar", 2),
        ("eesd", 2),
        ("ppsd", 2),
    ]  # two prompts alone, then together (PPSD's rows in lockstep)
    assert all(d["host_ms"] > 0 for d in data["decodes"])
    assert main(argv) == 2 and "exists; pass --force" in capsys.readouterr().err
    assert main([*argv[:-2], "--out", str(tmp_path / "host.csv")]) == 2
    assert "expected a .json file" in capsys.readouterr().err
    assert main([*argv[:4], "--prompts", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--prompts must be >= 1, got 0" in capsys.readouterr().err
    assert main([*argv[:4], "--batch", "2,0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--batch" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    for flags, message in ((["--sync-every", "0"], "--sync-every must be >= 1, got 0"), (["--policy", "x"], "'x'"),
                           (["--loop", "serve", "--sync-every", "2"], "reads the device after every round"),
                           (["--loop", "serve", "--max-new-tokens", "1"], "runs no decode round"),
                           (["--ppsd-stages", "1"], "--ppsd-stages must be 0 (PPSD not timed) or 2 or more, got 1"),
                           (["--ppsd-stages", "-2"], "or 2 or more, got -2")):  # fmt: skip
        assert main([*argv[:4], *flags, "--out", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr()
        assert message in err.err and "on cpu, capture" not in err.out  # before the model loads


@requires_smollm2
def test_the_serving_loops_file_is_the_one_a_serving_scenario_wants(tmp_path, capsys) -> None:
    """`--loop serve` writes rows timed on serving rounds (metadata.loop); a serving scenario takes it without a note
    and prices each method from it, a batch scenario notes it; a file of generate's decodes is noted in serving."""
    from calibrate.scaffold import write_scenario
    from sim.runner import point_notes
    from sim.scenario import load_points
    from sim.serving import load_serving_points

    files = {}
    for loop in ("serve", "generate"):
        files[loop] = tmp_path / f"host_{loop}.json"
        assert main(["calibrate", "host", "--model", "smollm2-135m", "--exit-layer", "15", "--prompts", "1",
                     "--max-new-tokens", "4", "--repeats", "1", "--threads", "1", "--loop", loop,
                     "--out", str(files[loop])]) == 0  # fmt: skip
    data = json.loads(files["serve"].read_text())
    assert "serve loop" in capsys.readouterr().out and data["metadata"]["loop"] == "serve"
    assert [(d["method"], d["requests"], d["rounds"]) for d in data["decodes"]] == [("ar", 3, 9), ("eesd", 3, 9)]
    per_pass = {row["method"]: row["host_ms_per_pass"] * 1e3 for row in data["methods"]}
    serve = write_scenario(LATENCY, TRACE, tmp_path / "serve.yaml", policies=("fixed:1",), serving=True,
                           host=files["serve"])  # fmt: skip
    for point in load_serving_points(serve):
        assert not any("timed the host's work on" in note for note in point.notes), point.notes
        assert point.plan.stages[0].latency.time_us("overhead", "verify", 1, 256, 1) == pytest.approx(
            per_pass[point.method]
        )
    batch = write_scenario(LATENCY, TRACE, tmp_path / "batch.yaml", policies=("fixed:1",), host=files["serve"])
    notes = point_notes(load_points(batch)[0])
    assert any("timed the host's work on the serving loop's rounds" in n and "--loop generate" in n for n in notes)
    other = write_scenario(LATENCY, TRACE, tmp_path / "other.yaml", policies=("fixed:1",), serving=True,
                           host=files["generate"])  # fmt: skip
    notes = load_serving_points(other)[0].notes
    assert any("on generate's static batches" in n and "eesd calibrate host --loop serve" in n for n in notes)


@requires_smollm2
def test_scenarios_take_each_methods_measured_host_work(tmp_path) -> None:
    """`calibrate host` -> `calibrate scenario --host`, a batch scenario and a serving one: every EESD point, its AR
    baseline and each serving method's plan price a decode pass's host work at that method's own measured figure
    (per pass: the CPU profile is of uncaptured passes) at the plan's batch size; prefill keeps the profile's rows."""
    from calibrate.scaffold import write_scenario
    from sim.plan import build_plan
    from sim.scenario import load_points
    from sim.serving import load_serving_points

    host = tmp_path / "host.json"
    assert main(["calibrate", "host", "--model", "smollm2-135m", "--exit-layer", "15", "--prompts", "1",
                 "--max-new-tokens", "6", "--repeats", "1", "--threads", "1", "--out", str(host)]) == 0  # fmt: skip
    per_pass = {row["method"]: row["host_ms_per_pass"] * 1e3 for row in json.loads(host.read_text())["methods"]}
    batch = write_scenario(LATENCY, TRACE, tmp_path / "batch.yaml", policies=("fixed:1",), host=host)
    assert "host_work: host.json" in batch.read_text() and "paid per pass" in batch.read_text()
    for point in load_points(batch):
        for method in ("ar", "eesd"):
            latency = build_plan(point, method=method).stages[0].latency
            assert latency.time_us("overhead", "verify", 1, 128, 1) == pytest.approx(per_pass[method])
            assert latency.time_us("overhead", "prefill", 64, 0, 1) != pytest.approx(per_pass[method])
    serve = write_scenario(LATENCY, TRACE, tmp_path / "serve.yaml", policies=("fixed:1",), serving=True, host=host)
    for point in load_serving_points(serve):
        assert point.plan.stages[0].latency.time_us("overhead", "draft", 1, 256, 1) == pytest.approx(
            per_pass[point.method]
        )


def test_a_serving_run_splits_its_rounds_into_passes_and_host_work() -> None:
    """`--loop serve`: 3 x batch requests share the slots (three waves of two here, each request 5 tokens: its prefill's
    and 4 rounds'), every round's passes are timed once, and prefills are kept apart; the executor's own methods
    are back after."""
    net, clock = model(epsilon=0.2), ServeClock()
    prompts = [list(p) for p in PROMPTS[:2]]
    clock.install()
    try:
        ar = serve_decode(net, prompts, 2, "ar", clock, max_new_tokens=5, exit_layer=EXIT_LAYER, policy="fixed:2")
        kinds = [e["kind"] for e in clock.events]
        eesd = serve_decode(net, prompts, 2, "eesd", clock, max_new_tokens=5, exit_layer=EXIT_LAYER, policy="fixed:2")
    finally:
        clock.uninstall()
    assert ar["loop"] == "serve" and ar["requests"] == 6 and kinds.count("prefill") == 6
    assert ar["rounds"] == ar["host_reads"] == ar["passes"] == 12 and ar["decoded"] == 12  # 3 waves x 4 rounds
    assert eesd["rounds"] <= 12 and eesd["passes"] <= 3 * eesd["rounds"]  # two drafts and a verify at most
    assert all(r["host_ms"] > 0 and r["passes_ms"] > 0 and r["prefill_ms"] > 0 for r in (ar, eesd))
    ar_row, eesd_row = host_rows([ar, eesd])
    assert ar_row["tokens_per_round"] == 1.0 and eesd_row["tokens_per_round"] >= 1.0
    from executor.serving import SlotDecoder

    assert not hasattr(SlotDecoder.round, "__wrapped__") and not hasattr(SlotDecoder.prefill, "__wrapped__")


def test_a_rounds_host_work_runs_to_the_next_event_less_its_passes() -> None:
    def event(kind, batch, begin, end, passes=(), tokens=0):
        return {"kind": kind, "batch": batch, "begin": begin, "end": end, "tokens": tokens,
                "passes": [("ar", 0, 0, ms) for ms in passes]}  # fmt: skip

    events = [event("prefill", 1, 0.0, 0.010), event("prefill", 1, 0.011, 0.020),
              event("round", 2, 0.021, 0.031, (9.0,), 2),  # to the next round: 10 ms less 9 of passes
              event("round", 2, 0.031, 0.040, (8.0,), 2),  # to the prefill after its departures: 10 - 8
              event("prefill", 1, 0.041, 0.050), event("round", 1, 0.050, 0.055, (4.0,), 1),  # batch 1: not counted
              event("round", 2, 0.060, 0.070, (5.0, 4.0), 2)]  # the last: to its own end  # fmt: skip
    split = serve_rounds(events, 2)
    assert split["rounds"] == split["host_reads"] == 3 and split["passes"] == 4 and split["decoded"] == 3
    assert split["host_ms"] == pytest.approx(1.0 + 2.0 + 1.0) and split["passes_ms"] == pytest.approx(26.0)
    assert split["prefill_ms"] == pytest.approx(10.0 + 9.0 + 9.0)


def _host_file(path, ppsd_stages: int | None = None, **changes) -> None:
    """A host-work file of AR and EESD at batches 1 and 4, and PPSD at batch 1 (3 ms) where `ppsd_stages` is given."""
    rows = [{"method": m, "batch": b, "host_ms_per_read": 0.1 * (b + (m == "eesd")),
             "host_ms_per_pass": 0.05 * b + (m == "eesd")}
            for m in ("ar", "eesd") for b in (1, 4)]  # fmt: skip
    if ppsd_stages is not None:
        rows.append({"method": "ppsd", "batch": 1, "host_ms_per_read": 3.0, "host_ms_per_pass": 3.0})
    data = {"format": FORMAT, "schema_version": 3, "metadata": {"model": "smollm2-135m", "device_type": "cpu",
            "capture": "none", "sync_every": 1, "policy": "fixed:1", "ppsd_stages": ppsd_stages},
            "methods": rows}  # fmt: skip
    for key, value in changes.items():
        if key in ("model", "device_type", "capture", "sync_every", "num_layers", "loop"):
            data["metadata"][key] = value
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "eesd.round_costs"}, "format: expected 'eesd.host_work'"),
        ({"schema_version": 4}, "schema_version: expected 1 to 3, got 4"),
        (
            {"methods": [{"method": "ar", "batch": 1, "host_ms_per_read": 0.1, "host_ms_per_pass": 0.1}]},
            "methods: expected rows for ar, eesd at the same batch sizes",
        ),
        (
            {"methods": [{"method": m, "batch": 1, "host_ms_per_read": 0, "host_ms_per_pass": 0} for m in "ab"]},
            "methods: method 'a': expected one of ar, eesd, ppsd",
        ),
        (
            {"methods": [{"method": m, "batch": 0, "host_ms_per_read": 0, "host_ms_per_pass": 0} for m in ("ar",)]},
            "methods.ar: batch: expected an integer 1..2147483647, got 0",
        ),
        (
            {"methods": [{"method": "ar", "batch": 2**31, "host_ms_per_read": 0, "host_ms_per_pass": 0}]},
            "methods.ar: batch: expected an integer 1..2147483647, got 2147483648",
        ),
        (
            {
                "methods": [
                    {"method": m, "batch": 1, "host_ms_per_read": -1, "host_ms_per_pass": 0} for m in ("ar", "eesd")
                ]
            },  # fmt: skip
            "methods.ar[batch 1].host_ms_per_read: expected milliseconds >= 0, got -1",
        ),
        ({"device_type": "cuda"}, "metadata.device_type is 'cuda', the latency profile's is 'cpu'"),
        ({"model": "gemma3-270m"}, "metadata.model: 'gemma3-270m' is Gemma-3-270M, not the scenario's model SmolLM2"),
        ({"model": "/models/my-finetune", "num_layers": 7}, "metadata.num_layers: 7 layers"),
        ({"capture": "graph"}, "measured with capture 'graph'; the scenario prices uncaptured passes"),
        ({"loop": "server"}, "metadata.loop: expected one of generate, serve, got 'server'"),
    ],
)
def test_a_host_file_that_does_not_fit_is_refused(tmp_path, changes, message) -> None:
    from calibrate.scaffold import write_scenario

    host = tmp_path / "host.json"
    _host_file(host, **changes)
    for serving in (False, True):
        with pytest.raises(ValueError, match="") as info:
            write_scenario(LATENCY, TRACE, tmp_path / "s.yaml", policies=("fixed:1",), serving=serving, host=host)
        assert message in str(info.value) and str(host) in str(info.value) and "--host" in str(info.value)
        assert not (tmp_path / "s.yaml").exists()


def _scenario(tmp_path, host: str | None = "host.json", **fields) -> Path:
    """A SmolLM2 CPU scenario on the serving profile (batches 1, 2, 4), a fixed acceptance."""
    import yaml

    data = {"name": "host", "model": "SmolLM2-135M", "dtype": "fp32", "method": "eesd", "exit_layer": 15,
            "policy": "fixed:1", "latency": {"profile": {"path": str(LATENCY), "cuda_graphs": False}},
            "acceptance": {"alpha": 0.5}, "topology": {"stages": 1},
            "workload": {"requests": 2, "batch_size": 1, "prompt_len": 128, "output_len": 16}} | fields  # fmt: skip
    if host is not None:
        data["latency"]["profile"]["host_work"] = host
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_each_method_pays_its_own_host_work_in_a_decode(tmp_path) -> None:
    """An uncaptured AR decode pays the AR figure on every pass: the decode's time moves by exactly the change of
    the figure times its passes; EESD pays its own at the batch size (interpolated between the batches measured);
    a schema 1 file is batch 1's."""
    from sim.plan import build_plan
    from sim.runner import simulate_point
    from sim.scenario import load_points

    _host_file(tmp_path / "host.json")
    point = load_points(_scenario(tmp_path, method="ar"))[0]
    slow = json.loads((tmp_path / "host.json").read_text())
    for row in slow["methods"]:
        row["host_ms_per_pass"] += 2.0 if row["method"] == "ar" else 0
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    fast = simulate_point(point).result
    slow_point = load_points(_scenario(tmp_path, "slow.json", method="ar"))[0]
    result = simulate_point(slow_point).result
    assert result.decode_time_us - fast.decode_time_us == pytest.approx(2000.0 * result.decode_tokens, rel=1e-9)
    eesd = build_plan(load_points(_scenario(tmp_path))[0]).stages[0].latency
    assert eesd.time_us("overhead", "verify", 2, 128, 2) == pytest.approx((0.05 * 2 + 1) * 1e3)  # between 1 and 4
    assert eesd.time_us("overhead", "draft", 1, 128, 1) == pytest.approx(1050.0)
    rows = [{"method": m, "host_ms_per_read": 0.2, "host_ms_per_pass": 0.3} for m in ("ar", "eesd")]
    v1 = {"format": FORMAT, "schema_version": 1, "metadata": slow["metadata"], "methods": rows}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    old = build_plan(load_points(_scenario(tmp_path, "v1.json"))[0]).stages[0].latency
    assert old.host.batches == (1,) and old.time_us("overhead", "verify", 1, 128, 4) == pytest.approx(300.0)


def test_the_output_says_where_the_file_does_not_simply_apply(tmp_path) -> None:
    from sim.runner import point_notes
    from sim.scenario import load_points

    _host_file(tmp_path / "host.json")
    assert point_notes(load_points(_scenario(tmp_path))[0]) == ()
    beyond = point_notes(load_points(_scenario(tmp_path, workload={"requests": 8, "batch_size": 8, "prompt_len": 128,
                                                                   "output_len": 16}))[0])  # fmt: skip
    assert any("batch_size 8 lies outside the batches [1, 4]" in n and "--batch 1,4,8)" in n for n in beyond)
    other = point_notes(load_points(_scenario(tmp_path, policy="fixed:3"))[0])
    assert other == ("the host's work of an EESD round was measured under 'fixed:1', this point runs 'fixed:3'",)
    ppsd = point_notes(load_points(_scenario(tmp_path, method="ppsd", topology={"stages": 2}))[0])
    assert ppsd[1:] and "a CPU's stage processes hand off over gloo" in ppsd[1]  # (its link is the default nvlink)
    assert ppsd[:1] == ("PPSD's ranks (a process per stage) are hosts of their own, which no host-work file times "
                    "(host.json): PPSD's passes pay the profile's overhead rows",)  # fmt: skip
    ppsd = point_notes(load_points(_scenario(tmp_path, method="ppsd", ppsd_backend="sequential",
                                             topology={"stages": 2}))[0])  # fmt: skip
    assert ppsd == ("host.json has no PPSD rows (eesd calibrate host --ppsd-stages N, generate loop): PPSD's passes "
                    "pay the profile's overhead rows",)  # fmt: skip


def test_ppsd_on_one_host_pays_its_own_measured_host_work_once_a_tick(tmp_path) -> None:
    """A file with PPSD rows: a sequential PPSD point pays PPSD's figure once a tick (its token's pass), so its decode
    moves by exactly the figure's change times its ticks; the distributed backend keeps the profile's rows; another
    stage count than the file's is noted."""
    from sim.plan import build_plan
    from sim.runner import point_notes, simulate_point
    from sim.scenario import load_points

    ppsd = {"method": "ppsd", "ppsd_backend": "sequential", "topology": {"stages": 2}}
    _host_file(tmp_path / "host.json", ppsd_stages=2)
    point = load_points(_scenario(tmp_path, **ppsd))[0]
    assert build_plan(point).stages[0].latency.time_us("overhead", "draft", 1, 128, 1) == pytest.approx(3000.0)
    assert point_notes(point) == ()
    slow = json.loads((tmp_path / "host.json").read_text())
    slow["methods"][-1]["host_ms_per_pass"] = 5.0
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    fast, result = (simulate_point(load_points(_scenario(tmp_path, name, **ppsd))[0]).result
                    for name in ("host.json", "slow.json"))  # fmt: skip
    assert result.ticks == fast.ticks > 0
    assert result.decode_time_us - fast.decode_time_us == pytest.approx(2000.0 * result.ticks, rel=1e-9)
    distributed = load_points(_scenario(tmp_path, **(ppsd | {"ppsd_backend": "distributed"})))[0]
    assert build_plan(distributed).stages[0].latency.host is None
    three = point_notes(load_points(_scenario(tmp_path, **(ppsd | {"topology": {"stages": 3}})))[0])
    wide = {"requests": 4, "batch_size": 4, "prompt_len": 128, "output_len": 16}
    (note,) = point_notes(load_points(_scenario(tmp_path, **ppsd, workload=wide))[0])
    assert note.startswith("workload.batch_size 4 lies outside the batches [1]") and "flat" in note
    assert "eesd calibrate host --batch 1,4" in note
    assert three == (f"{tmp_path / 'host.json'} timed PPSD's host work at 2 stages, this point runs 3 (eesd "
                     "calibrate host --ppsd-stages 3)",)  # fmt: skip


def test_a_scenario_refuses_a_host_file_that_does_not_fit(tmp_path) -> None:
    from sim.scenario import ScenarioError, load_points

    _host_file(tmp_path / "host.json")
    path = _scenario(tmp_path)
    text = path.read_text().replace("cuda_graphs: false", "cuda_graphs: false\n    overhead_us: 50")
    path.write_text(text)
    with pytest.raises(ScenarioError, match="give overhead_us .* or host_work"):
        load_points(path)
    _host_file(tmp_path / "host.json", device_type="cuda")
    with pytest.raises(ScenarioError, match=r"latency.profile.host_work: .*host.json: metadata.device_type is 'cuda'"):
        load_points(_scenario(tmp_path))
    with pytest.raises(ScenarioError, match="latency.profile.host_work: file not found"):
        load_points(_scenario(tmp_path, "missing.json"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ScenarioError, match="latency.profile.host_work: a directory, not a file"):
        load_points(_scenario(tmp_path, "folder"))


def test_captured_passes_need_a_file_of_the_scenarios_host_reads(tmp_path) -> None:
    """A captured scenario pays the file's per-read figure, measured reading every `sync_every` steps as the
    scenario's decode does; a serving loop reads every round."""
    from sim.host_work import host_overhead, read_host_work
    from sim.scenario import ScenarioError

    _host_file(tmp_path / "host.json", capture="graph")
    data = read_host_work(tmp_path / "host.json")
    assert host_overhead(data, "ar", captured=True).us == pytest.approx((100.0, 400.0))
    assert host_overhead(data, "eesd", captured=False).us == pytest.approx((1050.0, 1200.0))
    assert host_overhead(data, "ppsd", captured=True) is None
    with pytest.raises(ScenarioError, match="metadata.sync_every: measured with 1 steps per host read, this point "):
        _captured_plan(tmp_path, sync_every=8)
    assert _captured_plan(tmp_path, sync_every=1).stages[0].latency.host.us == pytest.approx((200.0, 500.0))
    assert _captured_plan(tmp_path, sync_every=8, reads_every=1).stages[0].latency.host.method == "eesd"


def _captured_plan(tmp_path, sync_every: int, reads_every: int | None = None, **fields):
    """The plan of a scenario on a copy of the CPU profile with every row marked captured."""
    import yaml

    from sim.plan import build_plan
    from sim.scenario import Point, validate

    lines = LATENCY.read_text().splitlines()
    captured = [lines[0].replace('"cuda_graphs": [false]', '"cuda_graphs": [true]'), lines[1]]
    captured += [",".join("1" if i == 5 else c for i, c in enumerate(line.split(","))) for line in lines[2:]]
    (tmp_path / "captured.csv").write_text("\n".join(captured) + "\n")
    data = yaml.safe_load(_scenario(tmp_path, sync_every=sync_every, **fields).read_text())
    data["latency"]["profile"] |= {"path": "captured.csv", "cuda_graphs": True}
    return build_plan(Point(0, {}, validate(data, "s.yaml"), tmp_path, "s.yaml"), reads_every=reads_every)


def test_a_batch_scenario_of_captured_passes_reads_as_the_files_decodes_did(tmp_path) -> None:
    """`calibrate scenario --host` on a GPU profile of captured passes: the batch scenario takes the file's
    `sync_every` (its per-read figures hold for that many steps a read) and pays the per-read figures; the serving one
    reads every round."""
    from calibrate.scaffold import write_scenario
    from sim.plan import build_plan
    from sim.scenario import load_points
    from sim.serving import load_serving_points

    latency = ROOT / "calibration" / "h100" / "latency_smollm2-135m_cuda_bf16_compiled.csv"
    trace = ROOT / "calibration" / "h100" / "acceptance_smollm2-135m_shared_builtin_cuda_bf16.csv"
    host = tmp_path / "host.json"
    _host_file(host, device_type="cuda", capture="compile-layers", sync_every=1)
    batch = write_scenario(latency, trace, tmp_path / "batch.yaml", policies=("fixed:1",), host=host)
    assert "sync_every: 1" in batch.read_text() and "paid per host read" in batch.read_text()
    plan = build_plan(load_points(batch)[0])
    assert plan.sync_every == 1 and plan.stages[0].latency.host.us == pytest.approx((200.0, 500.0))
    serve = write_scenario(latency, trace, tmp_path / "serve.yaml", policies=("fixed:1",), serving=True, host=host)
    assert {p.method: p.plan.stages[0].latency.host.us[0] for p in load_serving_points(serve)} == pytest.approx(
        {"ar": 100.0, "eesd": 200.0}
    )
    _host_file(host, device_type="cuda", capture="compile-layers", sync_every=4)
    serving = pytest.raises(ValueError, match="metadata.sync_every: measured with 4 steps per host read, this point ")
    with serving:
        write_scenario(latency, trace, tmp_path / "s4.yaml", policies=("fixed:1",), serving=True, host=host)
    assert not (tmp_path / "s4.yaml").exists()


def _raised(tmp_path, name: str, ar_ms: float = 0.0, eesd_ms: float = 0.0) -> str:
    """host.json with AR's and EESD's per-pass figures raised by these milliseconds, as `name`."""
    data = json.loads((tmp_path / "host.json").read_text())
    for row in data["methods"]:
        row["host_ms_per_pass"] += ar_ms if row["method"] == "ar" else eesd_ms
    (tmp_path / name).write_text(json.dumps(data))
    return name


def test_a_pass_pays_the_host_once_whatever_its_stages_and_the_baseline_pays_ars(tmp_path) -> None:
    """The file times one process's host work between passes: a pass through two or three stages pays it once (not
    once a stage, as a profile's rows are paid uncaptured); `eesd simulate`'s AR baseline of an EESD point pays AR's
    figure, and the EESD decode EESD's."""
    from sim.runner import simulate_point
    from sim.scenario import load_points

    _host_file(tmp_path / "host.json")
    slow = _raised(tmp_path, "slow.json", ar_ms=2.0)
    for stages in (1, 2, 3):
        fields = {"method": "ar", "topology": {"stages": stages}}
        fast = simulate_point(load_points(_scenario(tmp_path, **fields))[0]).result
        result = simulate_point(load_points(_scenario(tmp_path, slow, **fields))[0]).result
        assert result.decode_time_us - fast.decode_time_us == pytest.approx(2000.0 * result.decode_tokens)
    plain = simulate_point(load_points(_scenario(tmp_path))[0])
    raised = simulate_point(load_points(_scenario(tmp_path, slow))[0])
    assert raised.result.decode_time_us == pytest.approx(plain.result.decode_time_us)  # EESD: its own figure
    steps = raised.baseline.decode_tokens
    assert raised.baseline.decode_time_us - plain.baseline.decode_time_us == pytest.approx(2000.0 * steps)
    eesd = simulate_point(load_points(_scenario(tmp_path, _raised(tmp_path, "e.json", eesd_ms=1.0)))[0])
    passes = eesd.result.rounds + eesd.result.drafted  # a pass a draft, and a verify pass (or an AR step) a round
    assert eesd.result.decode_time_us - plain.result.decode_time_us == pytest.approx(1000.0 * passes)
    assert eesd.baseline.decode_time_us == pytest.approx(plain.baseline.decode_time_us)


def test_a_ppsd_scenario_of_captured_passes_is_checked_for_its_ar_baseline(tmp_path) -> None:
    """PPSD pays the profile's rows, but its AR baseline pays the file's AR figure: a file measured reading every
    step is refused for a scenario reading every 8, when it loads (not after its runs)."""
    from sim.scenario import ScenarioError

    _host_file(tmp_path / "host.json", capture="graph")
    with pytest.raises(ScenarioError, match="this point and its AR baseline read every 8"):
        _captured_plan(tmp_path, sync_every=8, method="ppsd", topology={"stages": 2})
    plan = _captured_plan(tmp_path, sync_every=1, method="ppsd", topology={"stages": 2})
    assert plan.stages[0].latency.host is None


def test_notes_name_a_pinned_cost_policy_as_its_own_and_another_machine(tmp_path) -> None:
    from sim.plan import build_plan
    from sim.runner import point_notes
    from sim.scenario import load_points

    _host_file(tmp_path / "host.json")
    data = json.loads((tmp_path / "host.json").read_text())
    data["metadata"]["policy"] = "beta-ts"
    (tmp_path / "host.json").write_text(json.dumps(data))
    pinned = "beta-ts:costs=1.5/2.0/2.5/3.0/3.5/4.0/4.5/5.0"  # as `eesd validate` pins the simulated costs
    assert point_notes(load_points(_scenario(tmp_path, policy=pinned))[0]) == ()
    data["metadata"]["device"] = "CPU: another box"
    (tmp_path / "host.json").write_text(json.dumps(data))
    point = load_points(_scenario(tmp_path, policy="beta-ts"))[0]
    device = build_plan(point).stages[0].device
    note = f"the host's work was measured on 'CPU: another box', the latency profile on {device}"
    assert point_notes(point) == (note,)


def test_a_batch_outside_the_files_is_priced_along_its_edge_and_noted_not_flagged(tmp_path) -> None:
    """Past the file's batch sizes the figure follows its edge; the point's notes say so (the `extrapolated` flag
    stays the latency profile's: the run's generic note speaks of the profile's grid)."""
    from sim.plan import build_plan
    from sim.scenario import load_points

    _host_file(tmp_path / "host.json")
    latency = build_plan(load_points(_scenario(tmp_path))[0]).stages[0].latency
    assert latency.time_us("overhead", "verify", 1, 128, 8) == pytest.approx((0.05 * 8 + 1) * 1e3)  # along the edge
    assert latency.time_us("overhead", "verify", 1, 128, 3) == pytest.approx((0.05 * 3 + 1) * 1e3)
    assert not latency.extrapolated


def test_a_file_of_uncaptured_decodes_reading_in_blocks_is_noted(tmp_path) -> None:
    from sim.runner import point_notes
    from sim.scenario import load_points

    _host_file(tmp_path / "host.json", sync_every=4)
    assert point_notes(load_points(_scenario(tmp_path))[0]) == (
        f"{tmp_path / 'host.json'} timed decodes reading every 4 steps; uncaptured decodes read every step "
        "(eesd calibrate host --sync-every 1)",
    )


SHIPPED_HOST = ROOT / "calibration" / "cpu-xeon" / "host_smollm2-135m_cpu_fp32.json"
ODD = [None, "", 0, -1, 1.5, True, [], {}, "x" * 5000, float("nan"), float("inf"), 10**400, 10**30, "1", "ar", "ppsd"]


def _leaves(node: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [prefix] + [p for k, v in node.items() for p in _leaves(v, (*prefix, k))]
    if isinstance(node, list):
        return [prefix] + [p for i, v in enumerate(node) for p in _leaves(v, (*prefix, i))]
    return [prefix]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_host_file_is_used_or_refused_by_name(tmp_path, data) -> None:
    """The shipped host-work file with one value (anywhere in it: metadata, a row, a figure, a whole list) replaced
    or removed: the scenario naming it either loads and simulates, or is refused with a ScenarioError naming the
    scenario, `latency.profile.host_work` and the file, in a few lines; never another exception."""
    from sim.runner import simulate_point
    from sim.scenario import ScenarioError, load_points

    content = json.loads(SHIPPED_HOST.read_text())
    content["decodes"] = content["decodes"][:2]
    content["metadata"].setdefault("loop", "generate")  # (written since the shipped file was): fuzzed as well
    where = data.draw(st.sampled_from(_leaves(content)[1:]), label="where")
    parent = content
    for key in where[:-1]:
        parent = parent[key]
    if data.draw(st.booleans(), label="remove") and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(st.sampled_from(ODD), label="value")
    host = tmp_path / "mutant.json"
    host.write_text(json.dumps(content))
    scenario = _scenario(tmp_path, "mutant.json", exit_layer=22)
    try:
        point = load_points(scenario)[0]
    except ScenarioError as err:
        message = str(err)
        assert "latency.profile.host_work" in message and "mutant.json" in message, message
        assert message.count("\n") < 4 and len(message) < 2000, message
        return
    result = simulate_point(point).result
    assert result.decode_tokens > 0 and 0 < result.decode_time_us < 1e12  # a used file's figures are real times


def test_serve_sim_says_how_the_host_file_prices_each_method(tmp_path, capsys) -> None:
    """`eesd serve-sim` prints each method's notes once (not once a rate): here a serving batch past the batch sizes
    the file measured, priced along its edge."""
    import yaml

    from calibrate.scaffold import write_scenario
    from executor.cli import main as cli

    host = tmp_path / "host.json"
    _host_file(host)
    data = json.loads(host.read_text())
    data["methods"] = [row for row in data["methods"] if row["batch"] == 1]
    host.write_text(json.dumps(data))
    serve = write_scenario(LATENCY, TRACE, tmp_path / "serve.yaml", policies=("fixed:1",), serving=True, host=host)
    scenario = yaml.safe_load(serve.read_text())
    max_batch = scenario["serving"]["max_batch"]
    assert max_batch > 1
    scenario["serving"]["rates_per_s"] = scenario["serving"]["rates_per_s"][:2]
    serve.write_text(yaml.safe_dump(scenario))
    out = tmp_path / "out.json"
    assert cli(["serve-sim", str(serve), "--out", str(tmp_path / "out"), "--no-progress", "--json", str(out)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    kept = json.loads(out.read_text())["metadata"]["notes"]
    for method in ("ar", "eesd"):
        wanted = f"{method}: serving.max_batch {max_batch} lies outside the batches [1] {host} measured"
        assert sum(line.startswith(f"note: {wanted}") for line in notes) == 1, notes
        assert sum(line.startswith(wanted) for line in kept) == 1, kept


def test_a_host_figure_that_falls_towards_its_edge_is_held_there_and_said_so(tmp_path) -> None:
    from sim.host_work import HostOverhead
    from sim.runner import point_notes
    from sim.scenario import load_points

    host = HostOverhead("eesd", (1, 4), (300.0, 10.0))
    assert host.at(8) == 10.0 and host.edge_falls(8) and not host.edge_falls(2) and host.at(2) < 300.0
    _host_file(tmp_path / "host.json")
    data = json.loads((tmp_path / "host.json").read_text())
    for row in data["methods"]:
        row["host_ms_per_pass"] = 0.137 if row["batch"] == 1 else 0.01
    (tmp_path / "host.json").write_text(json.dumps(data))
    workload = {"requests": 8, "batch_size": 8, "prompt_len": 128, "output_len": 16}
    notes = point_notes(load_points(_scenario(tmp_path, workload=workload))[0])
    assert any("held at its edge's figure (the figure falls towards that edge)" in n for n in notes), notes


def test_a_captured_ppsd_tick_is_timed_whole() -> None:
    """Captured (a GPU's graphs), a PPSD tick's launches are timed whole, its transition included (the simulator
    prices it as a launch beside the stages' passes): the host's work is what lies between ticks. Run here on the
    CPU's uncaptured passes, the bookkeeping is the same: one timed call a tick."""
    net, clock = model(epsilon=0.2), PassClock(captured_ticks=True)
    clock.install()
    try:
        run = decode(net, torch.tensor([PROMPTS[0]]), "ppsd", clock, max_new_tokens=12, exit_layer=EXIT_LAYER,
                     ppsd_stages=2)  # fmt: skip
    finally:
        clock.uninstall()
    assert [kind for kind, *_ in clock.calls] == ["tick"] * run["rounds"] and run["host_ms"] > 0
    from executor.ppsd import LocalPipeline

    assert not hasattr(LocalPipeline._launch_tick, "__wrapped__")
