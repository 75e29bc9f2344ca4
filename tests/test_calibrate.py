"""`eesd calibrate`: latency profiles, acceptance traces and link profiles on tiny models, read back by `sim/`;
contention profiles from a GPU benchmark's rows."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packages import requires_smollm2

from calibrate.acceptance import (
    TraceCheckError,
    check_run,
    check_traces,
    predicted_accepted,
    trace_prompts,
    trace_records,
)
from calibrate.latency import Grid, PartialResults, plan_points
from calibrate.link import measure_link
from executor.adapter import ModelAdapter
from executor.cli import main
from sim.acceptance import TraceAcceptance
from sim.contention import ProfiledContention
from sim.formats import (
    LatencyRecord,
    read_acceptance_trace,
    read_contention_profile,
    read_latency_profile,
    read_link_profile,
    write_acceptance_trace,
)
from sim.latency import ProfileLatency
from tests.tiny_models import TinySpec, scale_late_layers, tiny_model

TINY_GRID = ["--q", "1,3", "--context", "8,24", "--batch", "1,2", "--prefill", "16", "--warmup", "1", "--repeats", "3"]
TINY_GRID += ["--threads", "1"]  # on a shared 2-core runner, 2 OpenMP threads wait on each other for ms per op


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    tiny_model(TinySpec(num_layers=3), dtype=torch.float32).config.to_json_file(path)
    return path


def _latency(config: Path, out: Path, *extra: str) -> int:
    return main(["calibrate", "latency", "--model", str(config), "--out", str(out), *TINY_GRID, *extra])


def test_latency_cpu_tiny_model_gives_a_profile_the_simulator_reads(tiny_config: Path, tmp_path: Path) -> None:
    assert _latency(tiny_config, tmp_path / "out") == 0
    (path,) = (tmp_path / "out").glob("latency_*.csv")
    profile = read_latency_profile(path)
    grid = Grid(q=(1, 3), context_len=(8, 24), batch=(1, 2), prefill_q=(16,))
    assert len(profile.records) == len(plan_points(grid, (False,)))
    assert {r.component for r in profile.records} == {"embed", "layer", "exit_head", "lm_head", "overhead"}
    assert all(r.median_us > 0 and not r.cuda_graphs for r in profile.records)
    meta = profile.metadata
    assert meta["other_work_cores"] >= 0.0  # what else the machine ran meanwhile
    assert meta["random_weights"] and meta["model_config"]["num_hidden_layers"] == 3
    assert meta["device"].startswith("CPU") and meta["torch_version"] == torch.__version__
    assert [s["layer"] for s in meta["layer_spot_check"]] == [0, 1, 2]
    latency = ProfileLatency(profile, cuda_graphs=False)
    assert latency.time_us("layer", "verify", 2, 16, 1) > 0 and not latency.extrapolated
    assert not list((tmp_path / "out").glob("*.partial.jsonl"))


def test_compiled_kernels_time_the_fused_compiled_layer(tiny_config: Path, tmp_path: Path) -> None:
    """--kernels compiled: one compilation per static (q, context, batch) shape (the exit head and the spot check
    reuse them, prefill stays eager), the layers fused as capture="compile-layers" runs them; its own file."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from calibrate.latency import LatencySettings
    from calibrate.timing import TimerSpec
    from executor.adapter import compiled_layer

    torch._dynamo.reset()
    compiled_layer.cache_clear()
    before = counters["stats"]["unique_graphs"]
    assert _latency(tiny_config, tmp_path / "out", "--kernels", "compiled", "--batch", "1") == 0
    assert counters["stats"]["unique_graphs"] - before == 4  # q 1, 3 x context 8, 24 x batch 1
    (path,) = (tmp_path / "out").glob("latency_*.csv")
    assert path.name.endswith("_fp32_compiled.csv")
    profile = read_latency_profile(path)
    assert profile.metadata["kernels"] == "compiled"
    assert len(profile.records) == len(plan_points(Grid((1, 3), (8, 24), (1,), (16,)), (False,)))
    from calibrate.latency import profiling_adapter
    from executor.fusion import GATE_UP, QKV, fused_weights

    settings = LatencySettings(Grid((1,), (8,), (1,), (8,)), (False,), TimerSpec(torch.device("cpu"), 1, 1), "compiled")
    adapter = profiling_adapter(tiny_model(TinySpec(num_layers=2), torch.float32), settings, [])
    assert adapter.layer_run is compiled_layer(False)
    assert all(fused_weights(x.self_attn, QKV[0]) and fused_weights(x.mlp, GATE_UP[0]) for x in adapter.layers)
    with pytest.raises(ValueError, match="--graphs on"):
        LatencySettings(Grid((1,), (8,), (1,), (8,)), (False, True), TimerSpec(torch.device("cuda"), 1, 1), "compiled")
    torch._dynamo.reset()
    compiled_layer.cache_clear()


def test_a_failing_compiler_is_one_line_naming_the_way_out(tiny_config, tmp_path, capsys, monkeypatch) -> None:
    from executor import adapter as adapter_module

    def broken(*args):
        raise RuntimeError("InductorError: no C++ compiler found\nlong trace")

    monkeypatch.setattr(adapter_module, "compiled_layer", lambda fallback=False: broken)
    assert _latency(tiny_config, tmp_path / "out", "--kernels", "compiled", "--batch", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("eesd calibrate: error: --kernels compiled:") and "--kernels eager" in err
    assert "no C++ compiler found" in err and "Traceback" not in err and "long trace" not in err


def test_a_profile_of_some_layers_says_so_in_its_name(tiny_config: Path, tmp_path: Path) -> None:
    assert _latency(tiny_config, tmp_path / "out", "--layers", "2", "--q", "1", "--context", "8", "--batch", "1") == 0
    (path,) = (tmp_path / "out").glob("latency_*.csv")
    assert path.name == "latency_config-2layers_cpu_fp32.csv"
    assert read_latency_profile(path).metadata["layers_profiled"] == 2


def test_an_interrupted_profile_says_where_its_measurements_are_kept(tiny_config, tmp_path, monkeypatch, capsys):
    """Stopped by --max-new-points or by Ctrl-C: the partial file is named, and how to go on."""
    import calibrate.latency_cli as latency_cli

    out = tmp_path / "out"
    assert _latency(tiny_config, out, "--max-new-points", "2") == 3
    (partial,) = out.glob("*.partial.jsonl")
    assert f"kept in {partial}; run the same command again to go on" in capsys.readouterr().out

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(latency_cli, "calibrate_latency", interrupted)
    assert _latency(tiny_config, out) == 130
    err = capsys.readouterr().err
    assert f"interrupted (the measurements so far are kept in {partial}; run the same command again" in err


def test_latency_resumes_from_partial_results(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _latency(tiny_config, out, "--max-new-points", "5") == 3
    (partial,) = out.glob("*.partial.jsonl")
    first = [json.loads(line)["record"] for line in partial.read_text().splitlines() if '"record"' in line]
    assert len(first) == 5
    with open(partial, "a") as handle:
        handle.write('{"record": {"compo')  # a write cut short by the interruption
    assert _latency(tiny_config, out) == 0
    (path,) = out.glob("latency_*.csv")
    records = read_latency_profile(path).records
    assert [r.median_us for r in records[:5]] == [r["median_us"] for r in first]  # kept, not measured again
    assert not partial.exists()


def test_visits_time_the_grid_over_and_take_the_median_of_medians(tiny_config: Path, tmp_path: Path) -> None:
    """--visits 3: every point timed in three visits of the whole grid, visit after visit (resumable across
    interruptions); a point's median is the median of its three, its p10 / p90 the lowest / highest."""
    out = tmp_path / "out"
    grid = ["--q", "1", "--context", "8", "--batch", "1,2", "--visits", "3"]
    points = len(plan_points(Grid(q=(1,), context_len=(8,), batch=(1, 2), prefill_q=(16,)), (False,)))
    assert _latency(tiny_config, out, *grid, "--max-new-points", str(points + 3)) == 3
    assert _latency(tiny_config, out, *grid, "--max-new-points", str(2 * points - 4)) == 3  # all but the last one
    (partial,) = out.glob("*.partial.jsonl")
    entries = [json.loads(line) for line in partial.read_text().splitlines()[1:]]
    entries = [entry for entry in entries if "record" in entry]
    assert [entry.get("visit", 0) for entry in entries] == [0] * points + [1] * points + [2] * (points - 1)
    assert _latency(tiny_config, out, *grid) == 0
    (path,) = out.glob("latency_*.csv")
    profile = read_latency_profile(path)
    assert profile.metadata["visits"] == 3 and len(profile.records) == points
    for index, record in enumerate(profile.records[:-1]):  # the last point's third visit is not in `entries`
        visits = [entries[index + visit * points]["record"] for visit in range(3)]
        assert all(LatencyRecord(**v).component == record.component for v in visits)
        assert record.median_us == statistics.median(v["median_us"] for v in visits)
        assert (record.p10_us, record.p90_us) == (min(v["p10_us"] for v in visits), max(v["p90_us"] for v in visits))


def test_combined_records_take_the_median_of_the_visits() -> None:
    from calibrate.latency import GridPoint, combined_records

    point = GridPoint("layer", "verify", 1, 8, 1, False)
    visits = [LatencyRecord("layer", "verify", 1, 8, 1, False, m, lo, hi) for m, lo, hi in
              [(30.0, 28.0, 31.0), (10.0, 9.0, 45.0), (12.0, 11.5, 12.5)]]  # fmt: skip
    (record,) = combined_records({(point, i): r for i, r in enumerate(visits)}, [point], 3)
    assert (record.median_us, record.p10_us, record.p90_us) == (12.0, 9.0, 45.0)
    assert (record.component, record.batch) == ("layer", 1)


@pytest.mark.parametrize("visit", [-1, "1", True, 1.5])
def test_a_partial_line_with_a_bad_visit_is_an_error_naming_it(tmp_path: Path, visit) -> None:
    path = tmp_path / "p.partial.jsonl"
    PartialResults(path, {"a": 1}).add(_record(0), 2)
    ((point, kept),) = PartialResults(path, {"a": 1}).records
    assert (point.q, kept) == (1, 2)
    with open(path, "a") as handle:
        handle.write(json.dumps({"record": asdict(_record(1)), "visit": visit}) + "\n")
    with pytest.raises(ValueError, match=r"p\.partial\.jsonl:3: visit must be an integer >= 0"):
        PartialResults(path, {"a": 1})


def test_bad_visits_refused(tiny_config: Path, tmp_path: Path, capsys) -> None:
    assert _latency(tiny_config, tmp_path / "out", "--visits", "0") != 0
    assert "--visits must be an integer >= 1, got 0" in capsys.readouterr().err


def _record(index: int) -> LatencyRecord:
    return LatencyRecord("layer", "verify", 1 + index, 8, 1, False, 10.0 + index, 9.0, 11.0 + index)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=st.lists(st.tuples(st.integers(0, 3), st.floats(0, 1, exclude_max=True)), min_size=1, max_size=6))
def test_partial_results_survive_any_number_of_interrupted_appends(tmp_path_factory, runs) -> None:
    """Each run appends whole records, then is interrupted in the middle of the next one (a cut anywhere in its
    line, its newline included): every whole record survives every later run, none is refused."""
    path = tmp_path_factory.mktemp("partial") / "p.csv.partial.jsonl"
    settings_ = {"model": "m", "grid": [1, 2]}
    written: list[LatencyRecord] = []
    for whole, cut in runs:
        partial = PartialResults(path, settings_)
        assert list(partial.records.values()) == written
        for _ in range(whole):
            written.append(_record(len(written)))
            partial.add(written[-1])
        line = (json.dumps({"record": asdict(_record(len(written)))}, sort_keys=True) + "\n").encode()
        with open(path, "ab") as handle:
            handle.write(line[: int(cut * len(line))])  # the interrupted append
    assert list(PartialResults(path, settings_).records.values()) == written
    assert path.read_bytes().endswith(b"\n")  # repaired: the next append starts a line of its own


def test_a_torn_last_line_is_dropped_with_a_note_and_the_file_repaired(tmp_path: Path, capsys) -> None:
    path = tmp_path / "p.partial.jsonl"
    partial = PartialResults(path, {"a": 1})
    partial.add(_record(0))
    with open(path, "a") as handle:
        handle.write('{"record": {"compo')
    assert list(PartialResults(path, {"a": 1}).records.values()) == [_record(0)]
    assert f"{path}: its last line (18 bytes, line 3) was cut short by an interruption; dropped" in (
        capsys.readouterr().err
    )
    assert path.read_text().count("\n") == 2 and path.read_text().endswith("}\n")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"record": {"compo\n', r":3: not a JSON line; delete the file to start over"),
        ("[1, 2]\n", r":3: expected a JSON object"),
        ('{"record": {"component": "layer"}}\n', r":3: not a measurement"),
        ("\xff\xfe\n", r":3: not a JSON line \(binary data\)"),
        (
            json.dumps({"record": {**asdict(_record(1)), "median_us": -1.0}}) + "\n",
            r":3: column 'median_us' must be >=",
        ),
        (json.dumps({"record": {**asdict(_record(1)), "phase": "x"}}) + "\n", r":3: column 'phase' must be one of"),
    ],
)
def test_a_broken_line_in_the_middle_is_an_error_naming_it(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "p.partial.jsonl"
    PartialResults(path, {"a": 1}).add(_record(0))
    with open(path, "ab") as handle:
        handle.write(line.encode("latin-1"))
    with open(path, "a") as handle:
        handle.write(json.dumps({"record": asdict(_record(1))}) + "\n")
    with pytest.raises(ValueError, match=rf"p\.partial\.jsonl{message}"):
        PartialResults(path, {"a": 1})


def test_latency_resumes_after_two_interruptions_in_a_line(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _latency(tiny_config, out, "--max-new-points", "4") == 3
    (partial,) = out.glob("*.partial.jsonl")
    for more in ("3", None):
        with open(partial, "a") as handle:
            handle.write('{"record": {"component": "lay')  # a write cut short by the interruption
        if more is None:
            measured = [LatencyRecord(**json.loads(line)["record"]) for line in partial.read_text().splitlines()[2:-1]]
        assert _latency(tiny_config, out, *(["--max-new-points", more] if more else [])) == (3 if more else 0)
    (path,) = out.glob("latency_*.csv")
    records = read_latency_profile(path).records
    assert len(measured) == 7 and all(record in records for record in measured)  # kept, not measured again
    assert len(records) == len(
        plan_points(Grid(q=(1, 3), context_len=(8, 24), batch=(1, 2), prefill_q=(16,)), (False,))
    )
    assert not partial.exists()


def test_a_grid_beyond_the_machines_memory_is_refused_before_any_weight_is_made(tiny_config, tmp_path, capsys):
    assert _latency(tiny_config, tmp_path / "out", "--batch", str(10**8)) == 2
    err = capsys.readouterr().err
    assert "eesd calibrate: error: --batch/--q/--prefill/--context: the largest point (batch 100000000" in err
    assert "GiB the weights leave free on cpu" in err and not (tmp_path / "out").exists()


def test_latency_partial_results_with_other_settings_are_refused(tiny_config: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert _latency(tiny_config, out, "--max-new-points", "2") == 3
    assert _latency(tiny_config, out, "--repeats", "5") == 2
    assert "repeats" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["latency", "--model", "{cfg}", "--dtype", "int8", "--out", "o"], "--dtype"),
        (["latency", "--model", "{cfg}", "--graphs", "on", "--out", "o"], "--graphs"),
        (["latency", "--model", "{cfg}", "--q", "0,1", "--out", "o"], "--q"),
        (["latency", "--model", "{cfg}", "--context", "4000", "--out", "o"], "positions"),
        (["latency", "--model", "missing/config.json", "--out", "o"], "config.json"),
        (["latency", "--model", "{bad}", "--out", "o"], "model_type"),
        (["acceptance", "--model", "{cfg}", "--exit-layers", "0,2", "--out", "o.csv"], "--exit-layers"),
        (["acceptance", "--model", "{cfg}", "--exit-layers", "1,9", "--out", "o.csv"], "--exit-layers"),
        (["acceptance", "--model", "{cfg}", "--exit-layers", "1", "--max-new-tokens", "1", "--out", "o"], "tokens"),
        (["link", "--backend", "nccl", "--out", "o.csv"], "2 GPUs"),
        (["link", "--sizes", "1,x", "--out", "o.csv"], "--sizes"),
        (["link", "--busy-ms", "-1", "--out", "o.csv"], "--busy-ms must be in [0, 10000]"),
        (["contention", "--out", "o.csv"], "or --model (stage processes here), one of the two"),
        (["contention", "{bad}", "--model", "{cfg}", "--out", "o.csv"], "one of the two"),
        (["contention", "--model", "{cfg}", "--processes", "1", "--out", "o.csv"], "--processes must list integers"),
        (["contention", "--model", "{cfg}", "--processes", "4", "--out", "o.csv"], "--processes 4 / --exit-layer"),
        (["contention", "--model", "{cfg}", "--exit-layer", "3", "--out", "o.csv"], "--exit-layer: exit_layer must be"),
        (["contention", "--model", "{cfg}", "--batch", "0", "--out", "o.csv"], "--batch must list integers >= 1"),
        (["contention", "--model", "{cfg}", "--rounds", "0", "--out", "o.csv"], "--rounds must be >= 1"),
        (["contention", "--model", "{cfg}", "--dtype", "int8", "--out", "o.csv"], "--dtype must be one of"),
        (["contention", "--model", "missing/config.json", "--out", "o.csv"], "config.json"),
        (["contention", "{bad}", "--processes", "3", "--out", "o.csv"], "--processes is for --model: drop it"),
        (["contention", "--model", "{cfg}", "--capture", "graph", "--out", "o.csv"], "--capture is for a benchmarks"),
        (["contention", "--model", "{cfg}", "--context", "100000", "--out", "o.csv"], "--context 100000: a pass"),
    ],
)
def test_bad_inputs_are_rejected_with_the_field_named(tiny_config, tmp_path, capsys, argv, message) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"hidden_size": 8}')
    argv = [a.format(cfg=tiny_config, bad=bad) for a in argv]
    argv = [str(tmp_path / a) if a in ("o", "o.csv") else a for a in argv]
    assert main(["calibrate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eesd calibrate: error:") and message in err


def test_predicted_accepted_is_the_run_of_matches_capped_by_draft_len() -> None:
    matches = [False, True, True, False, True, True, True, True, True, False]
    # rounds start at 1: accept 2 (1, 2), 3 mismatches -> next at 4: 4 of 4 -> next at 9: budget min(4, 10-9-1) = 0
    assert predicted_accepted(matches, draft_len=4, max_new_tokens=10) == [2, 4, 0]
    # draft_len 1: rounds at 1 (accept), 3 (reject), 4, 6, 8 (accept): each accepted round emits 2 tokens
    assert predicted_accepted(matches, draft_len=1, max_new_tokens=10) == [1, 0, 1, 1, 1]


def _tiny_traces(epsilon: float, exit_layers=(1, 2, 3)):
    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=61, seed=3)), 1, epsilon)
    adapter = ModelAdapter(model)
    generator = torch.Generator().manual_seed(0)
    prompts = [(f"p{i}", torch.randint(1, 61, (3 + 2 * i,), generator=generator).tolist()) for i in range(4)]
    return adapter, trace_prompts(adapter, prompts, exit_layers, "shared", 24, eos=[])


def test_acceptance_trace_predicts_real_eesd_runs_exactly() -> None:
    adapter, traces = _tiny_traces(epsilon=0.5)
    matches = [m for t in traces for e in t.matches for m in t.matches[e][1:]]
    assert 0.2 < sum(matches) / len(matches) < 0.95  # a mix of accepted and rejected drafts
    report = check_traces(adapter, traces, "shared", draft_len=3, max_new_tokens=24, eos=[])
    assert report.ok and report.rounds > 0
    assert len(report.runs) == len(traces) * 3
    assert any(max(r.measured) > 0 for r in report.runs) and any(0 in r.measured for r in report.runs)


def test_acceptance_check_fails_loudly_on_a_wrong_trace() -> None:
    adapter, traces = _tiny_traces(epsilon=0.5, exit_layers=(2,))
    trace = traces[0]
    wrong = tuple(not m for m in trace.matches[2])
    corrupted = type(trace)(**{**trace.__dict__, "matches": {2: wrong}})
    with pytest.raises(TraceCheckError, match="disagree with the trace"):
        check_traces(adapter, [corrupted], "shared", draft_len=3, max_new_tokens=24, eos=[])
    # a reporting check (bf16 / fp16) records the disagreement instead of raising
    report = check_traces(adapter, [trace, corrupted], "shared", draft_len=3, max_new_tokens=24, eos=[], strict=False)
    summary = report.summary()
    assert not report.ok and not summary["strict"]
    assert summary["runs_same_rounds"] == 1 and summary["runs_same_tokens"] == 2  # the tokens are the model's own
    assert "1 of 2 real EESD runs" in report.describe()


def test_a_last_round_that_accepts_the_eos_and_drafts_past_it_passes_the_strict_check() -> None:
    """Each generated token in turn made the EOS: the last round may take it as its bonus token or accept it as a
    draft, and with budget left the real run accepts drafts past it (dropped from the output); both pass, and the
    second happens here (a head that agrees often)."""
    adapter, traces = _tiny_traces(epsilon=0.1, exit_layers=(3,))
    past_eos = 0
    for number, trace in enumerate(traces):
        prompt = (f"p{number}", list(trace.prompt))
        for index in range(2, 20):
            eos = [trace.tokens[index]]
            if trace.tokens.index(eos[0]) != index:
                continue  # the token came earlier: the output would stop there
            (cut,) = trace_prompts(adapter, [prompt], (3,), "shared", 24, eos=eos)
            assert cut.tokens == trace.tokens[: index + 1]
            run = check_run(adapter, cut, 3, "shared", 3, 24, eos)
            assert run.ok, (number, index, run)
            past_eos += run.measured != run.predicted and sum(a + 1 for a in run.predicted) == len(cut.tokens)
    assert past_eos >= 3
    report = check_traces(adapter, [cut], "shared", draft_len=3, max_new_tokens=24, eos=eos)
    assert report.ok


@pytest.mark.parametrize(
    ("check", "dtype", "mode"),
    [("auto", torch.float32, "strict"), ("auto", torch.float64, "strict"), ("auto", torch.bfloat16, "report"),
     ("auto", torch.float16, "report"), ("strict", torch.bfloat16, "strict"), ("report", torch.float32, "report")],
)  # fmt: skip
def test_acceptance_check_mode_follows_the_dtype(check: str, dtype: torch.dtype, mode: str) -> None:
    from calibrate.acceptance_cli import check_mode

    assert check_mode(check, dtype) == mode


def test_acceptance_trace_file_replays_in_the_simulator(tmp_path: Path) -> None:
    _, traces = _tiny_traces(epsilon=0.0)
    path = write_acceptance_trace(tmp_path / "trace.csv", {"model": "tiny", "head": "shared"}, trace_records(traces))
    trace = read_acceptance_trace(path)
    assert len(trace.records) == sum(len(t.tokens) for t in traces) * 3
    replay = TraceAcceptance(trace, exit_layer=2)
    assert replay.mean_match == 1.0  # epsilon = 0: layers >= 1 are the identity, every exit agrees


def test_link_profile_from_two_gloo_processes(tmp_path: Path) -> None:
    records = measure_link("gloo", [256, 65536], warmup=1, repeats=5)
    assert [r.nbytes for r in records] == [256, 65536]
    assert all(0 < r.p10_us <= r.median_us <= r.p90_us for r in records)
    out = tmp_path / "link.csv"
    assert main(["calibrate", "link", "--sizes", "1024", "--repeats", "3", "--out", str(out)]) == 0
    profile = read_link_profile(out)
    assert profile.metadata["backend"] == "gloo" and [r.nbytes for r in profile.records] == [1024]
    assert profile.records[0].mean_us > 0 and profile.metadata["busy_ms"] == 0


def test_a_busy_link_times_messages_after_both_ranks_computed(tmp_path: Path) -> None:
    """`--busy-ms`: each message follows that long of computing on both ranks, as a distributed tick's messages follow
    its passes; the file says how it was timed and holds each size's mean."""
    out = tmp_path / "busy.csv"
    argv = ["calibrate", "link", "--sizes", "8,4096", "--repeats", "4", "--busy-ms", "3", "--out", str(out)]
    assert main(argv) == 0
    profile = read_link_profile(out)
    assert profile.metadata["busy_ms"] == 3.0 and "after 3 ms of computing on both ranks" in profile.metadata["method"]
    assert [r.nbytes for r in profile.records] == [8, 4096]
    assert all(r.mean_us is not None and 0 < r.p10_us <= r.median_us <= r.p90_us for r in profile.records)


ROOT = Path(__file__).resolve().parents[1]
H100_BENCH = ROOT / "benchmarks" / "results" / "gpu_decode_nvidia_h100_smollm2_lease1.json"
H100_CONTENTION = ROOT / "calibration" / "h100" / "contention_smollm2-135m_cuda_bf16_compiled.csv"


def test_contention_profile_from_the_h100_benchmark_is_the_shipped_one(tmp_path: Path, capsys) -> None:
    """`eesd calibrate contention` on the first H100 lease's rows writes the profile the repository ships; an
    existing file is kept without --force and replaced with it."""
    out = tmp_path / "contention.csv"
    assert main(["calibrate", "contention", str(H100_BENCH), "--out", str(out)]) == 0
    assert "k=2: f=0.170" in capsys.readouterr().out
    written, shipped = read_contention_profile(out), read_contention_profile(H100_CONTENTION)
    assert written.records == shipped.records and written.metadata["device"] == shipped.metadata["device"]
    out.write_text("kept", encoding="utf-8")
    assert main(["calibrate", "contention", str(H100_BENCH), "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err and out.read_text(encoding="utf-8") == "kept"
    assert main(["calibrate", "contention", str(H100_BENCH), "--out", str(out), "--force"]) == 0
    assert read_contention_profile(out).records == shipped.records
    assert [p.name for p in tmp_path.iterdir()] == ["contention.csv"]  # no temporary file left beside it


STREAMS_COSTS = {"stage 1": 0.5, "stage 2": 0.4, "device per tick": 0.6}


@pytest.mark.parametrize(
    ("bench", "message"),
    [
        (None, "no such file"),
        ("{", "bad.json: not JSON"),
        ("[]", "an object with a 'rows' list"),
        ({"device": "GPU", "rows": [{"method": "ours ar", "capture": "compile-layers"}]}, "no 'ppsd streams n=K'"),
        ({"rows": [{"method": "ppsd streams n=2", "capture": "compile-layers", "pass_costs_ms": STREAMS_COSTS}]},
         "'device' must name the GPU"),
        ({"device": "GPU", "rows": [{"method": "ppsd streams n=2", "capture": "compile-layers",
                                     "pass_costs_ms": {**STREAMS_COSTS, "stage 2": "fast"}}]},
         "row 'ppsd streams n=2': pass_costs_ms['stage 2'] must be a number"),
        ({"device": "GPU", "rows": [{"method": "ppsd streams n=2", "capture": "compile-layers",
                                     "pass_costs_ms": {"stage 1": 0.5, "device per tick": 0.6}}]}, "(n >= 2)"),
    ],
)  # fmt: skip
def test_contention_from_a_wrong_benchmark_is_one_line_naming_it(tmp_path: Path, capsys, bench, message) -> None:
    path = tmp_path / "bad.json"
    if bench is not None:
        path.write_text(bench if isinstance(bench, str) else json.dumps(bench), encoding="utf-8")
    assert main(["calibrate", "contention", str(path), "--out", str(tmp_path / "c.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eesd calibrate: error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c.csv").exists()


def test_contention_of_stage_processes_measured_here(tiny_config: Path, tmp_path: Path, capsys) -> None:
    """`eesd calibrate contention --model`: two stage processes of the executor's layout, a row per batch, a
    `processes` profile of this CPU that the simulator reads as a factor per batch."""
    out = tmp_path / "processes.csv"
    argv = ["calibrate", "contention", "--model", str(tiny_config), "--processes", "2", "--batch", "1,2",
            "--context", "8", "--repeats", "3", "--rounds", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "k=2 batch 1: stages [[0, 1], [1, 3]]" in said and "overlap factor k=2 batch 1: f=" in said
    profile = read_contention_profile(out)
    assert profile.metadata["backend"] == "processes" and "1 torch threads" in profile.metadata["device"]
    assert profile.metadata["stage_layers"] == {"2": [[0, 1], [1, 3]]}
    assert [(r.passes, r.batch) for r in profile.records] == [(2, 1), (2, 2)]
    assert all(0 < r.alone_max_us < r.alone_sum_us and r.p10_us <= r.median_us for r in profile.records)
    factors = ProfiledContention(profile)
    assert factors.scope == "host" and 0.0 <= factors.factor(2, 1) <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "processes.csv"]  # nothing half-written


def test_a_stage_process_that_cannot_load_the_model_is_one_line(tiny_config: Path, tmp_path: Path, capsys) -> None:
    """A folder with a config but no weights passes the checks before the processes start; each process then fails
    to load it: one line naming the process and the reason, no traceback, nothing written."""
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text(tiny_config.read_text())
    out = tmp_path / "p.csv"
    argv = ["calibrate", "contention", "--model", str(folder), "--context", "8", "--repeats", "1", "--rounds", "1",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("eesd calibrate: error: stage process ") and "of 2: " in err and len(err.splitlines()) == 1
    assert "Traceback" not in err and not out.exists()


def test_contention_refuses_a_folder_as_out(tmp_path: Path, capsys) -> None:
    assert main(["calibrate", "contention", str(H100_BENCH), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


@requires_smollm2
def test_acceptance_prompts_follow_the_split_train_head_uses() -> None:
    """`--split held-out` keeps exactly the prompts `split_prompts` holds out (which `eesd train-head` never trains on);
    `--num-prompts` then takes the first N of them."""
    import argparse

    from calibrate.acceptance_cli import encoded_prompts
    from executor.prompts import load_prompts, split_prompts

    def ids(split: str, num: int | None = None) -> list[str]:
        args = argparse.Namespace(model="smollm2-135m", prompts="builtin", num_prompts=num, split=split,
                                  max_prompt_tokens=512)  # fmt: skip
        return [prompt_id for prompt_id, _ in encoded_prompts(args)]

    expected = split_prompts(load_prompts("builtin"))
    assert ids("held-out") == [p.id for p in expected.held_out]
    assert ids("train") == [p.id for p in expected.train]
    assert ids("held-out", 3) == [p.id for p in expected.held_out[:3]]
    assert ids("all") == [p.id for p in load_prompts("builtin")]


def test_cpu_timing_runs_before_untimed_ahead_of_every_call():
    """`time_call(before=...)` on the CPU: `before` runs ahead of every warm-up and timed call and is not timed (a
    slow `before` leaves the samples of a quick call quick)."""
    import time

    from calibrate.timing import TimerSpec, time_call

    order: list[str] = []

    def before() -> None:
        order.append("before")
        time.sleep(0.02)

    summary = time_call(lambda: order.append("call"), TimerSpec(torch.device("cpu"), 2, 3), False, before=before)
    assert order == ["before", "call"] * 5
    assert summary.p90_us < 10_000  # 20 ms of `before` per call, none of it in a sample


def test_latency_times_the_lm_head_after_the_layers_on_the_cpu(monkeypatch):
    """`calibrate.latency.measure` hands `time_call` a pass over the layers to run before the LM head and a trained
    exit head (as a real pass runs them), and nothing before the other components."""
    import calibrate.latency as latency
    from calibrate.latency import GridPoint, TimerSpec, make_inputs, measure

    adapter = ModelAdapter(tiny_model(TinySpec(num_layers=2), torch.float32))
    seen: dict[str, bool] = {}

    def fake_time_call(fn, spec, graphs, host=False, before=None):
        seen[point.component] = before is not None
        if before is not None:
            before()  # it runs: a pass over the layers
        return latency.Summary(1.0, 1.0, 1.0)

    monkeypatch.setattr(latency, "time_call", fake_time_call)
    timer = TimerSpec(torch.device("cpu"), 0, 1)
    inputs = make_inputs(adapter, 1, 8, 1)
    for component in ("embed", "layer", "exit_head", "lm_head", "overhead"):
        point = GridPoint(component, "draft", 1, 8, 1, False)
        measure(adapter, point, inputs, timer)
    assert seen == {"embed": False, "layer": False, "exit_head": True, "lm_head": True, "overhead": False}


def test_latency_refuses_no_warmup(tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shape's first call does one-time work (the LM head's kernel choice): a profile must not time it."""
    assert _latency(tiny_config, tmp_path / "out", "--warmup", "0") == 2
    assert "--warmup must be >= 1, got 0: a shape's first call does one-time work" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
