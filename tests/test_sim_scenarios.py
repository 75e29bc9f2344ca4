"""Scenarios: every shipped one validates and runs; broken ones fail with the expected messages; sweeps and CLI."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from sim.cli import main
from sim.runner import plots_available, result_row, run_points, summary_table, write_outputs
from sim.scenario import ScenarioError, load_points

ROOT = Path(__file__).resolve().parents[1]
# the scenarios of `eesd simulate` (a `serving:` section makes one `eesd serve-sim`'s, tested with serve-sim)
SHIPPED = sorted(p for p in (ROOT / "scenarios").glob("*.yaml") if "serving" not in yaml.safe_load(p.read_text()))


def test_the_five_documented_scenarios_ship() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"quickstart", "eesd_exit_sweep", "ppsd_stages_links", "llama70b_gpus", "beta_ts_vs_fixed"} <= names


def test_every_shipped_scenario_has_a_row_in_the_scenarios_readme() -> None:
    """scenarios/README.md's tables say what each file shows: none ships unlisted."""
    text = (ROOT / "scenarios" / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([^`]+\.yaml)` \|", text, flags=re.MULTILINE))
    assert sorted(p.name for p in (ROOT / "scenarios").glob("*.yaml") if p.name not in listed) == []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_scenario_runs(path: Path, tmp_path: Path) -> None:
    points = load_points(path)
    results = run_points(points, jobs=1, progress=False)
    written = write_outputs(results, tmp_path)
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(points) and all(float(r["speedup"]) > 0 for r in rows)
    assert [r["point"] for r in rows] == [str(p.index) for p in points]  # no sweep key named like a column hides it
    assert all(p.exists() and p.stat().st_size > 0 for p in written)
    assert "speedup" in summary_table(results)


def test_quickstart_cli_prints_summary_and_writes_outputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(ROOT / "scenarios" / "quickstart.yaml"), "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "ppsd" in out and (tmp_path / "results.csv").exists()
    assert list(tmp_path.glob("speedup_*.png"))
    table = csv.DictReader((tmp_path / "results.csv").read_text().splitlines())
    rows = {r["method"]: float(r["speedup"]) for r in table}
    top = max(rows["eesd"], rows["ppsd"])
    said = "speculation pays here" if top > 1.02 else "speculation does not pay here" if top < 0.98 else "about breaks"
    assert f"verdict: {said}" in out and f"EESD {rows['eesd']:.3f}x; PPSD {rows['ppsd']:.3f}x" in out
    assert "(tok/round: a row's tokens a round; EESD, accepted + 1; PPSD, a flush-free run of the pipe)" in out


def test_the_verdict_names_each_methods_best_point_of_a_sweep() -> None:
    from sim.runner import verdict

    results = run_points(load_points(ROOT / "scenarios" / "ppsd_stages_links.yaml"), jobs=1, progress=False)
    best = max((r for r in results if r.result.method == "ppsd"), key=lambda r: result_row(r)["speedup"])
    line = verdict(results)
    assert line.startswith("verdict: speculation pays here (best speedup over AR on the same hardware: PPSD ")
    assert f"{result_row(best)['speedup']:.3f}x at topology.stages={best.point.values['topology.stages']}" in line
    assert verdict([r for r in results if r.result.method == "ar"]) == ""


def write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {
    "name": "t",
    "model": "SmolLM2-135M",
    "method": "ppsd",
    "acceptance": {"alpha": 0.5},
    "topology": {"gpu": "H100", "stages": 2},
    "workload": {"requests": 1, "output_len": 40},
}


def test_a_dtype_by_torchs_name_reads_as_the_short_one(tmp_path: Path) -> None:
    """Calibration files record torch's names (bfloat16); a scenario takes them too."""
    (point,) = load_points(write(tmp_path, {**BASE, "method": "eesd", "dtype": "bfloat16", "draft_dtype": "float16"}))
    assert point.scenario.dtype == "bf16" and point.scenario.draft_dtype == "fp16"


def test_the_fastest_line_sets_each_method_against_the_sweeps_fastest_ar(tmp_path: Path) -> None:
    """A sweep over the hardware (stage counts: PPSD's AR baseline is AR through the same stages): each method's
    fastest point against the fastest AR anywhere in the sweep, per swept workload; none where the hardware is the
    same at every point."""
    from sim.runner import fastest

    sweep = {"topology.stages": [2, 3, 4], "workload.output_len": [40, 80]}
    results = run_points(load_points(write(tmp_path, {**BASE, "sweep": sweep})), jobs=1, progress=False)
    lines = fastest(results)
    assert len(lines) == 2 and lines[0].startswith("fastest at workload.output_len=40 (any hardware in the sweep): AR ")
    mine = [r for r in results if r.point.values["workload.output_len"] == 40]
    ar = max(r.baseline.tokens_per_s for r in mine)
    ppsd = max(mine, key=lambda r: r.result.tokens_per_s)
    assert f"AR {ar:.1f} tok/s at topology.stages=" in lines[0]
    stages = ppsd.point.values["topology.stages"]
    expected = f"PPSD {ppsd.result.tokens_per_s:.1f} tok/s at topology.stages={stages} "
    assert expected + f"({ppsd.result.tokens_per_s / ar:.3f}x that AR)" in lines[0]
    same = run_points(load_points(write(tmp_path, {**BASE, "sweep": {"acceptance.alpha": [0.3, 0.9]}})), jobs=1,
                      progress=False)  # fmt: skip
    assert fastest(same) == []


@pytest.mark.parametrize("backend", ["distributed", "free"])
def test_single_run_writes_a_chrome_trace(tmp_path: Path, backend: str) -> None:
    """Each stage's work on a track of its own (flushed work marked), and where the links take time, the messages:
    the prefill's hand-off and token ids on each link's track, then a lockstep tick's messages after its passes
    (`distributed`) or each token's hand-offs and corrections (`free`)."""
    results = run_points(load_points(write(tmp_path, {**BASE, "ppsd_backend": backend})), progress=False)
    write_outputs(results, tmp_path / "out")
    trace = json.loads((tmp_path / "out" / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    links = {"distributed": {2, 3, 4}, "free": {2, 3}}[backend]
    assert {e["tid"] for e in spans} == {0, 1} | links and all(e["dur"] >= 0 for e in spans)
    assert any(e["args"]["flushed"] for e in spans if e["tid"] == 0)  # stage 1's drafts a flush threw away
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert [names[0], names[1]] == ["stage 1 (H100)", "stage 2 (H100)"]  # roofline stages: the GPU the scenario names
    tracks = ["link 1 -> 2", "link 2 -> 1 (token ids)"] + (["a tick's messages"] if backend == "distributed" else [])
    assert [names[tid] for tid in sorted(links)] == tracks


def test_roofline_stages_run_on_an_h100_unless_a_gpu_is_named(tmp_path: Path) -> None:
    topology = {"stages": [{"gpu": "A100"}, {}]}
    (result,) = run_points(load_points(write(tmp_path, {**BASE, "topology": topology})), progress=False)
    assert result.devices == ("A100", "H100")


def deep_update(data: dict, dotted: str, value: object) -> dict:
    out = json.loads(json.dumps(data))
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return out


DELETE = object()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("methd", "ar", "methd: unknown key (did you mean method?); allowed here: ['acceptance', 'attention'"),
        ("method", "magic", "method: Input should be 'ar', 'eesd' or 'ppsd' (got 'magic')"),
        ("model", "GPT-5", "model: unknown model 'GPT-5'; known: ['Gemma-3-270M', 'Llama-2-13B', 'Llama-2-70B'"),
        ("model", "smolm2-135m", "model: unknown model 'smolm2-135m' (did you mean 'SmolLM2-135M'?)"),
        ("acceptance.alpha", 1.5, "acceptance.alpha: Input should be less than or equal to 1 (got 1.5)"),
        ("acceptance", {"alpha": 0.5, "alphas": [0.5]}, "acceptance: give exactly one of alpha, alphas, trace"),
        ("acceptance", DELETE, "acceptance: required field is missing"),
        ("acceptance", {"alphas": [0.5], "confidence_sharpness": 2}, "confidence_sharpness only applies with alpha"),
        ("topology.gpu", "TPU", "topology.gpu: unknown GPU 'TPU'; known: ['A100'"),
        ("topology.link", "carrier-pigeon", "topology.link: unknown link preset 'carrier-pigeon'; known"),
        ("topology.gpu", "h100", "topology.gpu: unknown GPU 'h100' (did you mean 'H100'?); known: ['A100'"),
        ("topology.gpu", "H10O", "topology.gpu: unknown GPU 'H10O' (did you mean 'H100'?)"),
        ("topology.link", "NVlnk", "topology.link: unknown link preset 'NVlnk' (did you mean 'nvlink'?)"),
        (
            "model",
            {
                "name": "m",
                "num_layers": 32,
                "hidden_size": 4096,
                "num_heads": 32,
                "num_kv_heads": 3,
                "intermediate_size": 14336,
                "vocab_size": 1000,
            },  # fmt: skip
            "model: num_heads 32 is not a multiple of num_kv_heads 3",
        ),
        (
            "model",
            {
                "name": "m",
                "num_layers": 32,
                "hidden_size": 4100,
                "num_heads": 32,
                "num_kv_heads": 8,
                "intermediate_size": 14336,
                "vocab_size": 1000,
            },  # fmt: skip
            "model: hidden_size 4100 is not a multiple of num_heads 32: give head_size",
        ),
        ("dtype", "bfloat32", "dtype: Input should be 'bf16', 'fp16' or 'fp32' (got 'bfloat32')"),
        ("topology.link", {"latency_us": -1}, "topology.link.latency_us: Input should be greater than or equal to 0"),
        ("topology.stages", 0, "topology.stages: stages must be an integer >= 1"),
        ("topology.stages", [{"layers": 10}, {"layers": 10}], "layers add up to 20, the model has 30"),
        (
            "topology.stages",
            [{"gpu": "H100", "speed": 2}],
            "topology.stages.0.speed: unknown key; allowed here: ['device', 'gpu', 'layers', 'link', 'tp']",
        ),
        ("workload.output_len", "long", "workload.output_len: Input should be a valid integer"),
        ("workload.batch_size", 0, "workload.batch_size: Input should be greater than or equal to 1 (got 0)"),
        ("seed", -1, "seed: Input should be greater than or equal to 0 (got -1)"),
        (
            "latency",
            {"roofline": {"bandwidth_efficiency": 0}},
            "bandwidth_efficiency: Input should be greater than 0 (got 0)",
        ),
        ("policy", "fixed:0", "policy: Value error, policy 'fixed:0'"),
        ("exit_layer", 30, "exit_layer: expected 1 <= exit_layer < 30"),
        ("exit_head", "shared:abc", "exit_head: expected shared, trained, shared:N or trained:N"),
        ("exit_head", "shared:0", "exit_head: expected shared, trained, shared:N or trained:N"),
        ("exit_head", "trained:x", "exit_head: expected shared, trained, shared:N or trained:N"),
        (
            "exit_head",
            "shared:49153",
            "exit_head: expected shared, trained, shared:N or trained:N with 1 <= N <= 49152",
        ),
        ("exit_head", "trained:49153", "exit_head: expected shared, trained, shared:N or trained:N with 1 <= N"),
        ("latency", {"roofline": {}, "constant_us": {"layer": 1}}, "latency: give exactly one of roofline, profile"),
        ("latency", {"profile": {"path": "missing.csv"}}, "latency.profile.path: file not found"),
        ("acceptance", {"trace": "nope.csv"}, "acceptance.trace: file not found"),
    ],
)
def test_broken_scenarios_name_file_field_and_expectation(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    path = write(tmp_path, deep_update(BASE, field, value))
    with pytest.raises(ScenarioError) as info:
        load_points(path)
    text = str(info.value)
    assert text.startswith(str(path)) and message.replace("Value error, ", "") in text.replace("Value error, ", "")


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"method": "eesd", "policy": "confidence:0.5"}, "policy: 'confidence:0.5' needs draft confidences"),
        ({"model": "Llama-2-70B", "method": "eesd", "topology": {"stages": 1}}, "GiB of weights per GPU do not fit"),
        ({"topology": {"stages": 1}}, "topology.stages: ppsd needs at least 2 stages (got 1)"),
        (
            {"exit_layer": 10, "topology": {"gpu": "H100", "stages": [{"layers": 8}, {"layers": 22}]}},
            "exit_layer: ppsd drafts inside stage 1, so it must be at most 8 (stage 1's layers), got 10",
        ),
        ({"sweep": {"topology.stages": []}}, "sweep.topology.stages: expected a non-empty list"),
        ({"sweep": {"cases": [1, 2]}}, "sweep.cases: 'cases' is not a scenario field, so it must list cases"),
        ({"sweep": {"topology.stages": [2, 40]}}, "sweep point {'topology.stages': 40}: topology.stages: 40 stages"),
        ({"sweep": {"name": ["a", "b"]}}, "sweep.name: the scenario's name is one for the whole run"),
        ({"sweep": {"method": ["ar", "ppsd", "ppsd"]}}, "sweep.method: each value once (a repeat runs the same points"),
        ({"sweep": {"cases": [{"exit_layer": 8}, {"exit_layer": 8}]}}, "sweep.cases: each value once"),
        (
            {"ppsd_backend": "free", "topology": {"gpu": "H100", "stages": 2, "devices": 1}},
            "ppsd_backend: 'free' runs every stage on a device of its own",
        ),
    ],
)
def test_broken_cross_field_and_sweep_scenarios(tmp_path: Path, update: dict, message: str) -> None:
    with pytest.raises(ScenarioError, match="s.yaml") as info:
        load_points(write(tmp_path, {**BASE, **update}))
    assert message in str(info.value)


def test_a_misspelt_key_comes_first_and_the_field_it_stands_for_is_not_called_missing(tmp_path: Path) -> None:
    gpu = {"name": "X", "hbm_bandwith_GBps": 1000, "peak_tflops": {"bf16": 100}, "memory_GiB": 24}
    with pytest.raises(ScenarioError) as info:
        load_points(write(tmp_path, deep_update(BASE, "topology.gpu", gpu)))
    lines = str(info.value).splitlines()
    assert "topology.gpu.hbm_bandwith_GBps: unknown key (did you mean hbm_bandwidth_GBps?)" in lines[0]
    assert lines[1:] == [f"{tmp_path / 's.yaml'}: topology.gpu.source: required field is missing"]


def test_requests_that_do_not_fill_their_batches_are_noted(tmp_path: Path) -> None:
    from sim.runner import point_notes

    for workload, note in (({"requests": 2, "batch_size": 4}, "workload.batch_size 4 > requests 2: one batch of 2"),
                           ({"requests": 5, "batch_size": 2}, "5 requests in batches of 2: the last batch holds 1 row"),
                           ({"requests": 4, "batch_size": 2}, None)):  # fmt: skip
        (point,) = load_points(write(tmp_path, deep_update(BASE, "workload", {**BASE["workload"], **workload})))
        notes = [n for n in point_notes(point) if n.startswith("workload")]
        assert notes == ([] if note is None else [notes[0]]) and (note is None or note in notes[0])


def test_invalid_yaml_and_non_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match="bad.yaml: invalid YAML"):
        load_points(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ScenarioError, match="expected a mapping"):
        load_points(bad)


def test_cli_reports_errors_in_one_line_with_status_2(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "method": "warp"})
    proc = subprocess.run(
        [sys.executable, "-m", "sim.cli", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{path}: method: Input should be 'ar', 'eesd' or 'ppsd'" in proc.stderr


def test_sweep_rows_equal_the_single_runs_they_stand_for(tmp_path: Path) -> None:
    sweep = {
        **BASE,
        "method": "eesd",
        "exit_layer": 8,
        "sweep": {"acceptance.alpha": [0.2, 0.7], "policy": ["fixed:2", "beta-ts"], "topology.stages": [1, 2]},
    }
    swept = run_points(load_points(write(tmp_path, sweep)), jobs=2, progress=False)
    assert len(swept) == 8
    volatile = {"wall_s", "point", "acceptance.alpha", "policy", "topology.stages"}
    for item in swept:
        single = deep_update({k: v for k, v in sweep.items() if k != "sweep"}, "x", DELETE)
        for key, value in item.point.values.items():
            single = deep_update(single, key, value)
        (alone,) = run_points(load_points(write(tmp_path, single, "single.yaml")), progress=False)
        row, alone_row = result_row(item), result_row(alone)
        assert {k: v for k, v in row.items() if k not in volatile} == {
            k: v for k, v in alone_row.items() if k not in volatile
        }


def test_sim_never_imports_torch_or_transformers() -> None:
    code = (
        "import sys, sim.cli, sim.runner, sim.scenario, sim.plan, sim.cost, sim.engine, sim.policy, sim.formats;"
        "from sim.scenario import load_points; from sim.runner import run_points;"
        f"run_points(load_points({str(ROOT / 'scenarios' / 'quickstart.yaml')!r}), progress=False);"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


UNCAPTURED = {"roofline": {"cuda_graphs": False}}


@pytest.mark.parametrize(
    ("update", "slots"),
    [
        ({}, 256),  # 47 + 128 + 3 + 1 = 179 slots, captured: a multiple of 256
        ({"latency": UNCAPTURED}, 179),
        ({"method": "ar"}, 256),
        ({"method": "ar", "latency": UNCAPTURED}, 176),
        ({"policy": "beta-ts:max=9", "workload": {"prompt_len": 200}}, 512),
        # drafts capped by the output (`sim.contract.draft_capacity`): 47 + 4 + 3 + 1, as the executor sizes it
        ({"policy": "fixed:8", "workload": {"output_len": 4}, "latency": UNCAPTURED}, 55),
        ({"method": "ppsd", "topology": {"stages": 2}, "exit_layer": 15, "latency": UNCAPTURED}, 175),
        ({"attention": "cache"}, 256),
        ({"attention": "context"}, None),
    ],
)
def test_plans_carry_the_executors_cache_capacity(tmp_path: Path, update: dict, slots: int | None) -> None:
    """`attention: buckets` (the default) and `cache`: decode passes attend over the executor's static cache, prompt
    + output (+ the largest draft + 1 for AR and EESD), a multiple of 256 when captured (over the span bucket of the
    furthest position written with `buckets`, over every slot with `cache`); `context`: over the positions so far."""
    from sim.plan import build_plan

    data = {"name": "s", "model": "SmolLM2-135M", "method": "eesd", "exit_layer": 8, "policy": "fixed:3",
            "acceptance": {"alpha": 0.3}, "latency": {"roofline": {"cuda_graphs": True}},
            "workload": {"requests": 1, "prompt_len": 47, "output_len": 128}}  # fmt: skip
    for key, value in update.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    point = load_points(write(tmp_path, data))[0]
    built = build_plan(point)
    assert built.cache_slots == slots
    assert built.span_buckets == (update.get("attention", "buckets") == "buckets")


def test_a_trace_of_another_head_than_the_scenario_drafts_with_is_noted(tmp_path: Path) -> None:
    """The quickstart drafts with a trained head and replays that head's trace; given the shared head's trace it
    still simulates (a what-if), and says whose acceptance it replays. AR points replay nothing: no note."""
    from sim.runner import point_notes

    data = yaml.safe_load((ROOT / "scenarios" / "quickstart.yaml").read_text())
    assert not any("recorded with exit_head" in n for p in load_points(ROOT / "scenarios" / "quickstart.yaml")
                   for n in point_notes(p))  # fmt: skip
    data["acceptance"]["trace"] = str(ROOT / "calibration" / "cpu" / "acceptance_smollm2-135m_shared_builtin.csv")
    data["latency"]["profile"]["path"] = str((ROOT / "scenarios" / data["latency"]["profile"]["path"]).resolve())
    notes = {p.values.get("method", p.scenario.method): point_notes(p) for p in load_points(write(tmp_path, data))}
    wanted = "acceptance.trace was recorded with exit_head shared, this point drafts with exit_head trained:16384"
    assert any(n.startswith(wanted) for n in notes["eesd"]) and any(n.startswith(wanted) for n in notes["ppsd"])
    assert not any("recorded with exit_head" in n for n in notes["ar"])


def test_a_mistake_outside_the_sweep_is_named_at_the_scenario_not_at_a_point(tmp_path: Path) -> None:
    data = {**BASE, "workload": {"requests": 1, "output_lenn": 40}, "sweep": {"exit_layer": [8, 15]}}
    with pytest.raises(ScenarioError) as info:
        load_points(write(tmp_path, data))
    assert str(info.value).startswith(f"{tmp_path / 's.yaml'}: workload.output_lenn: unknown key (did you mean "
                                      "output_len?); allowed here: ")  # fmt: skip
    data = {**BASE, "method": "eesd", "sweep": {"exit_layer": [8], "policy": ["fixed:1", "fixed:0"]}}
    with pytest.raises(ScenarioError) as info:  # the sweep's own value: that point named, its value quoted once
        load_points(write(tmp_path, data))
    message = str(info.value)
    assert "sweep point {'exit_layer': 8, 'policy': 'fixed:0'}: policy:" in message and message.count("fixed:0") == 2


def test_the_extrapolation_note_says_what_was_asked_past_the_profile(tmp_path: Path, capsys) -> None:
    profile = ROOT / "calibration" / "cpu" / "serving" / "latency_smollm2-135m_cpu_fp32.csv"
    data = {"name": "ex", "model": "SmolLM2-135M", "dtype": "fp32", "method": "eesd", "exit_layer": 15,
            "policy": "fixed:8", "latency": {"profile": {"path": str(profile), "cuda_graphs": False}},
            "acceptance": {"alpha": 0.5}, "topology": {"stages": 1},
            "workload": {"requests": 8, "batch_size": 8, "prompt_len": 16, "output_len": 16}}  # fmt: skip
    assert main([str(write(tmp_path, data)), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    (extrapolated,) = [n for n in notes if "extrapolated beyond the profiled grid" in n]
    for asked in ("verify q 9 (profiled 1-2)", "prefill tokens 16 (profiled 32-256)", "draft batch 8 (profiled 1-4)"):
        assert asked in extrapolated, extrapolated
    assert any("costed as batch 4 (the profile's batch 4 costs less than its batch 3" in n for n in notes), notes


def test_the_verdict_and_the_notes_for_runs_with_nothing_to_compare_or_only_a_link_stretched(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from sim.runner import extrapolation_note, verdict

    data = yaml.safe_load((ROOT / "scenarios" / "quickstart.yaml").read_text())
    data["latency"]["profile"]["path"] = str((ROOT / "scenarios" / data["latency"]["profile"]["path"]).resolve())
    data["acceptance"]["trace"] = str((ROOT / "scenarios" / data["acceptance"]["trace"]).resolve())
    data["workload"]["output_len"] = 1  # the prefill's token only: no decode, no speed to compare
    assert verdict(run_points(load_points(write(tmp_path, data)), jobs=1, progress=False)) == ""
    stretched = SimpleNamespace(result=SimpleNamespace(extrapolated=True, extrapolations=()))
    assert "eesd calibrate link, eesd calibrate contention" in extrapolation_note([stretched])
    data["workload"]["output_len"] = 64
    line = verdict(run_points(load_points(write(tmp_path, data)), jobs=1, progress=False))
    assert "(speedup over AR on the same hardware:" in line  # one point a method: not "best"


def test_results_rows_name_each_stages_tp_and_the_link(tmp_path: Path) -> None:
    results = run_points(load_points(ROOT / "scenarios" / "llama70b_gpus.yaml"), jobs=1, progress=False)
    assert [result_row(r)["tp"] for r in results] == ["4", "8", "1;1;1;1", "1;1;1;1;1;1;1;1", "2;2;2;2"]
    assert [result_row(r)["link"] for r in results] == ["", "", "nvlink", "nvlink", "nvlink"]  # one stage: no link
    assert [result_row(r)["tp_link"] for r in results] == ["nvlink", "nvlink", "", "", "nvlink"]
    custom = {"latency_us": 3, "bandwidth_GBps": 25}
    workload = {"requests": 1, "prompt_len": 8, "output_len": 8}
    data = {"name": "link", "model": "SmolLM2-135M", "method": "ppsd", "exit_layer": 8, "acceptance": {"alpha": 0.5},
            "topology": {"stages": 2, "link": custom}, "workload": workload}  # fmt: skip
    (row,) = [result_row(r) for r in run_points(load_points(write(tmp_path, data)), jobs=1, progress=False)]
    assert row["link"] == "3us/25GBps" and row["tp"] == "1;1" and row["layers"] == "15;15"  # drafting at 8 of 15


def test_a_best_speedup_within_two_percent_of_ar_is_called_even(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured latencies move a few percent from run to run: 1.005x is not "pays"."""
    from types import SimpleNamespace

    from sim import runner

    items = [SimpleNamespace(result=SimpleNamespace(method=method), baseline=SimpleNamespace(tokens_per_s=1.0),
                             point=SimpleNamespace(values={})) for method in ("ar", "eesd")]  # fmt: skip
    for speedup, said in ((1.005, "about breaks even here (within 2% of AR"), (0.985, "about breaks even"),
                          (1.03, "speculation pays here"), (0.97, "does not pay here")):  # fmt: skip
        monkeypatch.setattr(runner, "result_row", lambda item, s=speedup: {"speedup": s})
        assert said in runner.verdict(items)


def test_a_models_packaged_name_reads_as_its_table_name(tmp_path: Path) -> None:
    """Calibration files name the model as its package does (smollm2-135m): a scenario may too."""
    data = {**BASE, "model": "smollm2-135m"}
    assert load_points(write(tmp_path, data))[0].scenario.model == "SmolLM2-135M"


def test_simulate_clears_an_earlier_sweeps_plots_from_a_reused_folder(tmp_path: Path, capsys) -> None:
    """Only what the last run wrote there (its `.eesd-simulate-outputs`) goes: a user's files stay, even one named as
    a plot; a --break-even run again in the same folder removes nothing of its own."""
    sweep = {**BASE, "sweep": {"acceptance.alpha": [0.3, 0.6]}}
    out = tmp_path / "out"
    out.mkdir()
    (out / "speedup_mine.png").write_text("mine\n")
    assert main([str(write(tmp_path, sweep)), "--out", str(out), "--no-progress"]) == 0
    assert (out / "speedup_acceptance_alpha.png").is_file() or not plots_available()
    (out / "notes.md").write_text("mine\n")
    assert main([str(write(tmp_path, BASE, "one.yaml")), "--out", str(out), "--no-progress"]) == 0
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["notes.md", "results.csv", "speedup_mine.png", "trace.json"]  # a single run traces
    for _ in range(2):
        capsys.readouterr()
        assert main([str(write(tmp_path, BASE, "one.yaml")), "--out", str(out), "--no-progress", "--break-even"]) == 0
        assert "removed" not in capsys.readouterr().out and (out / "break_even.csv").is_file()


def ppsd_stages(name: str, stages: list[int]) -> dict:
    """SmolLM2-135M's PPSD at 10 µs a layer and alpha 0.7, swept over `stages`."""
    return {
        "name": name, "model": "SmolLM2-135M", "method": "ppsd", "latency": {"constant_us": {"layer": 10.0}},
        "acceptance": {"alpha": 0.7}, "topology": {"stages": stages[0], "link": "ideal"},
        "workload": {"requests": 1, "prompt_len": 8, "output_len": 32}, "sweep": {"topology.stages": stages},
    }  # fmt: skip


def test_a_stage_sweep_that_moves_the_default_exit_shows_it_and_says_alpha_holds_at_each(tmp_path: Path, capsys):
    """PPSD without an exit layer drafts at the end of stage 1: a stage sweep moves it (15, then 7), the table shows
    it, and a note says the same i.i.d. alpha is held at each exit; with exit_layer set neither appears."""
    data = ppsd_stages("moving-exit", [2, 4])
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main([str(path), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1].split()
    assert header[:3] == ["topology.stages", "method", "exit_layer"]
    assert [line.split()[2] for line in out.splitlines()[3:5]] == ["15", "7"]
    assert (
        "note: exit_layer is not set, so these points draft at their defaults (7, 15; PPSD: the end of stage 1)" in out
    )
    path.write_text(yaml.safe_dump({**data, "exit_layer": 5}), encoding="utf-8")
    assert main([str(path), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "exit_layer" not in out.splitlines()[1] and "exit_layer is not set" not in out


def test_a_pipeline_of_30_stages_keeps_the_summary_table_on_one_line(tmp_path: Path, capsys) -> None:
    """Past 6 stages a row's busy and bubble percentages show stage 1's and the others' range, with a note saying so
    (a 30-stage row listed every stage's: over 300 characters); the CSV keeps each stage's; up to 6 nothing changes."""
    data = ppsd_stages("deep", [6, 30])
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main([str(path), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    six, thirty = (line.split() for line in lines[3:5])
    assert len(six[-1].split(";")) == 6 and re.fullmatch(r"[\d.]+;[\d.]+\.\.[\d.]+", thirty[-1])
    assert max(map(len, lines[1:5])) < 160
    assert any("past 6 stages, stage 1's then the range of the others'" in line for line in lines)
    with open(tmp_path / "a" / "results.csv", encoding="utf-8") as handle:
        assert [len(row["busy_pct"].split(";")) for row in csv.DictReader(handle)] == [6, 30]


def test_pipelines_of_as_many_stages_split_differently_show_each_stages_layers(tmp_path: Path, capsys) -> None:
    """An exit before balanced stage 1's end drafts inside it (15 + 15 layers, as the executor lays it out); cutting
    stage 1 at the exit takes its layers given: the table shows each point's layers, a case by its fields in short."""
    data = {
        "name": "layouts", "model": "SmolLM2-135M", "method": "ppsd", "exit_layer": 8,
        "latency": {"constant_us": {"layer": 10.0}}, "acceptance": {"alpha": 0.7},
        "topology": {"stages": 2, "link": "ideal"}, "workload": {"requests": 1, "prompt_len": 8, "output_len": 32},
        "sweep": {"layout": [{"topology.stages": 2}, {"topology.stages": [{"layers": 8}, {"layers": 22}]}]},
    }  # fmt: skip
    assert main([str(write(tmp_path, data)), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["layout", "method", "layers"]
    assert lines[3].split()[:3] == ["topology.stages=2", "ppsd", "15;15"]
    assert lines[4].split()[:5] == ["topology.stages=[{layers:", "8},", "{layers:", "22}]", "ppsd"]
    assert lines[4].split()[5] == "8;22"


def test_a_stage_gives_its_own_link_and_a_case_its_own_name(tmp_path: Path, capsys) -> None:
    """Two nodes of two GPUs: the 2nd and 4th stages' own `link` (InfiniBand) joins the nodes and brings token ids back;
    the row names each stage's link and the table each case by its name (a name alone: the scenario as it is); the
    slower link makes the same pipeline slower."""
    two_nodes = [{}, {"link": "ib-ndr"}, {}, {"link": "ib-ndr"}]
    data = {
        "name": "nodes", "model": "Llama-2-7B", "method": "ppsd", "acceptance": {"alpha": 0.6},
        "topology": {"gpu": "H100", "stages": 4, "link": "nvlink"}, "workload": {"requests": 1, "output_len": 32},
        "sweep": {"layout": [{"name": "one node"}, {"name": "two nodes", "topology.stages": two_nodes}]},
    }  # fmt: skip
    results = run_points(load_points(write(tmp_path, data)), jobs=1, progress=False)
    rows = [result_row(r) for r in results]
    assert [row["layout"] for row in rows] == ["one node", "two nodes"]
    assert [row["link"] for row in rows] == ["nvlink", "nvlink;ib-ndr;nvlink;ib-ndr"]
    assert rows[1]["tokens_per_s"] < rows[0]["tokens_per_s"]
    assert main([str(write(tmp_path, data)), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split()[:3] == ["one", "node", "ppsd"] and lines[4].split()[:3] == ["two", "nodes", "ppsd"]


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"c": [{"name": "a"}, {"name": "a", "seed": 1}]}, "sweep.c[1].name: 'a' names two cases"),
        ({"c": [{"name": 3, "seed": 1}]}, "sweep.c[0].name: expected a non-empty text naming the case, got 3"),
        ({"topology.stages": [[{}, {"link": "ib"}]]}, "topology.stages.1.link: unknown link preset 'ib'"),
        (
            {"topology.stages": [[{"device": 0}, {"device": 0, "link": "ib-ndr"}]], "ppsd_backend": ["streams"]},
            "topology.stages[1].link: stage 2 hands on to stage 1, which shares its device: no link is used there",
        ),
    ],
)
def test_bad_case_names_and_stage_links_are_refused(tmp_path: Path, sweep: dict, message: str) -> None:
    with pytest.raises(ScenarioError, match=re.escape(message)):
        load_points(write(tmp_path, {**BASE, "sweep": sweep}))


def test_a_cpu_profile_refuses_streams_and_notes_stage_processes_past_its_cores(tmp_path: Path) -> None:
    """The executor runs `streams` on a GPU only; a process per stage on the 2-core Xeon profile (1 torch thread) fits
    2 stages, while 3 would share cores, which a note says."""
    from sim.runner import point_notes

    profile = ROOT / "calibration" / "cpu-xeon" / "latency_smollm2-135m_cpu_fp32.csv"
    data = {**BASE, "dtype": "fp32", "latency": {"profile": {"path": str(profile), "cuda_graphs": False}},
            "topology": {"stages": 2, "link": "ideal"}}  # fmt: skip
    with pytest.raises(ScenarioError, match="ppsd_backend: streams runs one CUDA stream per stage on a GPU"):
        load_points(write(tmp_path, {**data, "ppsd_backend": "streams"}))
    fits, shares = load_points(write(tmp_path, {**data, "sweep": {"topology.stages": [2, 3]}}))
    wanted = "3 stage processes of 1 torch thread each need 3 cores, the profile's CPU has 2"
    assert not any("cores" in note for note in point_notes(fits))
    assert any(note.startswith(wanted) for note in point_notes(shares))
    one_host = load_points(write(tmp_path, {**data, "ppsd_backend": "sequential", "topology": {"stages": 3}}))
    assert not any("cores" in note for note in point_notes(one_host[0]))


def test_a_missing_scenario_and_a_folder_given_as_one_are_told_apart(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml: scenario file not found"):
        load_points(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="a folder, not a scenario file"):
        load_points(tmp_path)


def test_the_verdict_is_the_executors_and_the_free_pipe_is_named_as_a_bound(tmp_path: Path) -> None:
    """7B shape over 8 H100s at alpha 0.3: the free-running pipe would pay, the executor's lockstep does not; the
    verdict goes by what an executor runs and names the free pipe's figure as a bound."""
    from sim.runner import verdict

    data = {"name": "v", "model": "Llama-2-7B", "method": "ppsd", "exit_head": "trained", "acceptance": {"alpha": 0.3},
            "topology": {"gpu": "H100", "stages": 8, "link": "nvlink"},
            "workload": {"requests": 1, "prompt_len": 256, "output_len": 128},
            "sweep": {"ppsd_backend": ["distributed", "free"]}}  # fmt: skip
    results = run_points(load_points(write(tmp_path, data)), progress=False)
    lock, free = (result_row(r)["speedup"] for r in results)
    assert lock < 0.98 and free > 1.02
    line = verdict(results)
    assert line.startswith("verdict: speculation does not pay here") and f"PPSD {lock:.3f}x" in line
    assert f"PPSD on the free pipe (a bound no executor runs) {free:.3f}x" in line
    alone = run_points(load_points(write(tmp_path, {**data, "ppsd_backend": "free", "sweep": {}})), progress=False)
    assert verdict(alone).startswith("verdict: no point an executor runs; the free pipe's bound pays")


@pytest.mark.parametrize(("backend", "requests"), [("distributed", 1), ("free", 1), ("streams", 1), ("free", 2)])
def test_a_traces_flushed_work_is_the_work_the_results_count_as_thrown_away(
    tmp_path: Path, backend: str, requests: int
) -> None:
    """Per stage, the traced spans marked flushed add up to the stage's busy time less its useful time (the CSV's
    flushed share): on three stages, stage 1's drafts finish before the flush that throws them away; on one captured
    GPU (`streams`) a stage holding no token runs an empty pass, work no token keeps; two batches one after the other
    on the free pipe: a flush in the second does not mark the first's confirmed work."""
    from sim.engine import Simulation
    from sim.plan import build_plan

    data = {**BASE, "model": "Llama-2-13B", "ppsd_backend": backend, "topology": {"gpu": "H100", "stages": 3},
            "workload": {"requests": requests, "prompt_len": 64, "output_len": 40}}  # fmt: skip
    (point,) = load_points(write(tmp_path, data))
    simulation = Simulation(build_plan(point), trace_limit=20_000)
    result = simulation.run()
    for index, stage in enumerate(result.stages):
        flushed = sum(e["dur"] for e in simulation.trace if e["tid"] == index and e["args"]["flushed"])
        assert flushed == pytest.approx(stage.busy_us - stage.useful_us, abs=1e-6)
    assert result.stages[0].busy_us > result.stages[0].useful_us  # there was thrown-away work to mark


def test_a_batch_wider_than_the_requests_runs_and_is_costed_as_wide_as_they_are() -> None:
    """Batch 8 over 4 requests is one batch of 4: the same result as batch 4, costed at the profile's batch 4 (not
    extrapolated past it), the note saying so; serving's stand-in workload (at its max_batch) keeps its width."""
    from sim.plan import build_plan
    from sim.runner import point_notes, simulate_point

    scenario = Path(__file__).parents[1] / "scenarios" / "smollm2_cpu_xeon_ppsd_batch.yaml"
    four = next(p for p in load_points(scenario) if p.values == {"exit_layer": 15, "workload.batch_size": 4})
    workload = four.scenario.workload.model_copy(update={"batch_size": 8})
    wide = replace(four, scenario=four.scenario.model_copy(update={"workload": workload}))
    assert build_plan(wide).workload.batch_size == 4 and build_plan(wide, stand_in=True).workload.batch_size == 8
    ran, asked = simulate_point(four).result, simulate_point(wide).result
    assert asked.tokens_per_s == ran.tokens_per_s and not asked.extrapolated
    notes = [n for n in point_notes(wide) if "batch" in n]
    assert notes == ["workload.batch_size 8 > requests 4: one batch of 4 rows runs"]


def test_fields_ppsd_does_not_read_are_noted_where_swept(tmp_path: Path) -> None:
    """PPSD has no rounds: a sweep over an EESD round setting gives PPSD points that are one run, and a window wider
    than the pipe changes nothing; a GPU's link between
    stages priced from a CPU's profile is not how a CPU's stages hand off; each is noted (a field set once, as for an
    EESD sweep beside, is not)."""
    import yaml

    from sim.runner import point_notes

    root = Path(__file__).parents[1]
    data = yaml.safe_load((root / "scenarios" / "smollm2_cpu_xeon_ppsd_batch.yaml").read_text())
    data["latency"]["profile"]["path"] = str(root / "calibration" / "cpu-xeon" / "latency_smollm2-135m_cpu_fp32.csv")
    data["acceptance"]["trace"] = str(root / "calibration" / "cpu" / "acceptance_smollm2-135m_shared_builtin.csv")
    data["policy"] = "fixed:2"
    data["sweep"] = {"config": [{"policy": "beta-ts"}, {"zero_draft_rounds": "verify"}, {"max_in_flight": 2},
                                {"max_in_flight": 1}, {"ppsd_backend": "distributed", "workload.batch_size": 2},
                                {"ppsd_backend": "distributed", "topology.link": "pcie5"}]}  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    points = load_points(path)
    notes = [[n for n in point_notes(p) if "PPSD does not read" in n or "max_in_flight" in n or "link" in n]
             for p in points]  # fmt: skip
    assert notes == [
        ["PPSD does not read policy (EESD's rounds): points that differ only in it are the same run"],
        ["PPSD does not read zero_draft_rounds (EESD's rounds): points that differ only in it are the same run"],
        ["max_in_flight 2 >= the 2 stages: the pipe holds one token a stage at most, so the window changes nothing"],
        [],
        ["the stages' link nvlink joins devices priced from a CPU's latency profile: a CPU's stage processes hand "
         "off over gloo, which a link profile measures (eesd calibrate link --backend gloo, then topology.link: "
         "{profile: FILE})"],
        ["the stages' link pcie5 joins devices priced from a CPU's latency profile: a CPU's stage processes hand "
         "off over gloo, which a link profile measures (eesd calibrate link --backend gloo, then topology.link: "
         "{profile: FILE})"],
    ]  # fmt: skip
