"""`eesd calibrate scenario`: a scenario written from a latency profile and an acceptance trace simulates what the
hand-written scenario of the same files does, point for point; files that do not make one are refused by name."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from calibrate.scaffold import write_scenario
from executor.cli import main
from sim.formats import read_acceptance_trace, read_latency_profile, write_acceptance_trace, write_latency_profile
from sim.runner import run_points
from sim.scenario import load_points

ROOT = Path(__file__).resolve().parents[1]
CPU, H100, H200 = ROOT / "calibration" / "cpu", ROOT / "calibration" / "h100", ROOT / "calibration" / "h200"
SCENARIOS = ROOT / "scenarios"


@pytest.fixture(autouse=True)
def _from_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the traces name their head files relative to the repository, as eesd runs there


def tokens_per_s(path: Path, **workload: int) -> dict[tuple, float]:
    """Each point's simulated tokens/s, keyed by (method, exit layer, policy, draft dtype, batch size), with the
    workload fields given set first."""
    if workload:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["workload"].update(workload)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    results = run_points(load_points(path), progress=False)
    keyed = {}
    for item in results:
        s = item.point.scenario
        policy = s.policy if s.method == "eesd" else None
        keyed[(s.method, s.exit_layer, policy, s.draft_dtype, s.workload.batch_size)] = item.result.tokens_per_s
    return keyed


@pytest.mark.parametrize(
    ("latency", "trace", "policies", "hand", "workload"),
    [
        # the trained E = 7 head over 16k ids, eager CPU profile (the hand scenario runs 48 of the trace's 64 tokens)
        (CPU / "latency_smollm2-135m_cpu_fp32.csv", CPU / "acceptance_smollm2-135m_e7mix3v16k_builtin_heldout.csv",
         "fixed:1,fixed:2", "smollm2_cpu_vocab_head.yaml", {"output_len": 48}),
        # frozen kernels: attention over the whole static cache, the smallest prefill as the prompt
        (CPU / "latency_gemma3-270m_cpu_fp32_frozen.csv", CPU / "acceptance_gemma3-270m_e14v16k_heldout.csv",
         "fixed:1,fixed:2,fixed:3", "gemma3_cpu_frozen.yaml", {}),
        # a GPU profile (CUDA graphs, the H200) of a model the profile names by a path, the trace from an H100
        (H200 / "latency_smollm2-135m_cuda_bf16.csv", H100 / "acceptance_smollm2-135m_shared_builtin_cuda_bf16.csv",
         "fixed:1,beta-ts", "smollm2_h200_validate.yaml", {}),
    ],
)  # fmt: skip
def test_a_written_scenario_simulates_as_the_hand_written_one(tmp_path, latency, trace, policies, hand, workload):
    out = tmp_path / "written.yaml"
    assert main(["calibrate", "scenario", "--latency", str(latency), "--acceptance", str(trace), "--out", str(out),
                 "--policies", policies]) == 0  # fmt: skip
    written = tokens_per_s(out, **workload)
    expected = tokens_per_s(SCENARIOS / hand)
    shared = set(written) & set(expected)
    assert len(shared) >= 2, (sorted(written), sorted(expected))
    assert {key: written[key] for key in shared} == {key: expected[key] for key in shared}


def test_a_written_scenario_says_what_it_was_written_from(tmp_path) -> None:
    out = tmp_path / "deep" / "gemma.yaml"
    latency, trace = CPU / "latency_gemma3-270m_cpu_fp32_frozen.csv", CPU / "acceptance_gemma3-270m_e14v16k_heldout.csv"
    write_scenario(latency, trace, out)
    text = out.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    assert text.startswith("# Written by `eesd calibrate scenario` from:") and str(latency) in text
    assert data["attention"] == "cache" and data["exit_head"] == "trained:16384" and data["model"] == "Gemma-3-270M"
    assert data["workload"] == {"requests": 8, "batch_size": 1, "prompt_len": 64, "output_len": 32}
    assert data["sweep"] == {"policy": ["fixed:1", "fixed:2", "fixed:3", "beta-ts"]}
    assert not Path(data["latency"]["profile"]["path"]).is_absolute()  # relative to the scenario's folder
    assert (out.parent / data["acceptance"]["trace"]).resolve() == trace.resolve()
    assert [p.name for p in out.parent.iterdir()] == ["gemma.yaml"]  # the load check left nothing beside it
    assert data["name"] == "gemma"  # its results' folder runs/gemma/: another scenario of the profile keeps its own
    write_scenario(latency, trace, tmp_path / "x" / "two.yaml", name="mine")
    assert yaml.safe_load((tmp_path / "x" / "two.yaml").read_text())["name"] == "mine"


def test_traces_of_different_lengths_are_cut_to_what_each_holds_and_say_so(tmp_path, capsys) -> None:
    """A trace of 32 prompts x 48 tokens beside one of 20 x 64: the workload asks 8 requests x 48 tokens (no more
    than either holds), printed and written in the header, where it used to shrink silently; one trace says nothing."""
    long, held = (
        CPU / "acceptance_smollm2-135m_shared_builtin.csv",
        CPU / "acceptance_smollm2-135m_e15mix5v16k_builtin_heldout.csv",
    )
    out = write_scenario(CPU / "latency_smollm2-135m_cpu_fp32.csv", [long, held], tmp_path / "two.yaml")
    printed = capsys.readouterr().out
    assert (
        "note: the traces differ in length (acceptance_smollm2-135m_shared_builtin.csv 32 prompts x 48 tokens;"
        in printed
    )
    assert yaml.safe_load(out.read_text())["workload"]["output_len"] == 48
    assert "#   the traces differ in length" in out.read_text()
    write_scenario(CPU / "latency_smollm2-135m_cpu_fp32.csv", [long], tmp_path / "one.yaml")
    assert "differ in length" not in capsys.readouterr().out


def test_policies_whose_verify_passes_lie_past_the_profiles_q_are_named_with_the_q_to_add(tmp_path, capsys) -> None:
    """A profile of q 1..2 only: fixed:2 verifies 3 tokens and beta-ts up to 9, beyond it; the note says so and gives
    the --q that prices them. The whole q grid (1..9) says nothing."""
    full = read_latency_profile(CPU / "latency_smollm2-135m_cpu_fp32.csv")
    grid = {**full.metadata["grid"], "q": [1, 2]}
    narrow = write_latency_profile(tmp_path / "narrow.csv", {**full.metadata, "grid": grid},
                                   [r for r in full.records if r.q <= 2 or r.phase == "prefill"])  # fmt: skip
    trace = CPU / "acceptance_smollm2-135m_shared_builtin.csv"
    out = write_scenario(narrow, trace, tmp_path / "s.yaml", policies=("fixed:1", "fixed:2", "beta-ts"))
    said = "the verify passes of fixed:2 up to 3, beta-ts up to 9 tokens lie past the profile's q (at most 2)"
    assert f"note: {said}" in capsys.readouterr().out
    assert "eesd calibrate latency --q 1,2,3,4,5,6,7,8,9" in out.read_text()  # in the header
    write_scenario(CPU / "latency_smollm2-135m_cpu_fp32.csv", trace, tmp_path / "t.yaml")
    assert "verify passes" not in capsys.readouterr().out


def test_ppsd_points_run_the_stages_of_the_one_device(tmp_path) -> None:
    out = tmp_path / "ppsd.yaml"
    write_scenario(CPU / "latency_smollm2-135m_cpu_fp32.csv", CPU / "acceptance_smollm2-135m_shared_builtin.csv", out,
                   methods=("eesd", "ppsd"), policies=("fixed:1",))  # fmt: skip
    config = yaml.safe_load(out.read_text(encoding="utf-8"))["sweep"]["config"]
    ppsd = [c for c in config if c.get("method") == "ppsd"]
    assert {c["exit_layer"] for c in ppsd} == {4, 8, 15, 22} and {c["ppsd_backend"] for c in ppsd} == {"sequential"}
    results = run_points(load_points(out), progress=False)
    assert len(results) == 8 and all(item.result.tokens_per_s > 0 for item in results)


def test_a_link_adds_the_ppsd_points_on_a_process_per_stage(tmp_path) -> None:
    """`--link` (with a CPU's `processes` contention profile): each PPSD point runs again on the distributed backend
    over that link, and simulates as the shipped distributed scenario prices the same point."""
    out = tmp_path / "dist.yaml"
    contention, link = CPU / "contention_processes_smollm2-135m_cpu_fp32.csv", CPU / "link_gloo_loopback_busy.csv"
    write_scenario(CPU / "latency_smollm2-135m_cpu_fp32.csv", CPU / "acceptance_smollm2-135m_shared_builtin.csv", out,
                   methods=("ppsd",), contention=contention, link=link)  # fmt: skip
    config = yaml.safe_load(out.read_text(encoding="utf-8"))["sweep"]["config"]
    assert [c["ppsd_backend"] for c in config] == ["sequential"] * 4 + ["distributed"] * 4
    assert all(Path(out.parent, c["topology.link"]["profile"]).resolve() == link for c in config[4:])
    results = {(i.point.scenario.ppsd_backend, i.point.scenario.exit_layer): i.result.tokens_per_s
               for i in run_points(load_points(out), progress=False) if i.result.method == "ppsd"}  # fmt: skip
    shipped = load_points(SCENARIOS / "smollm2_cpu_ppsd_distributed_batch.yaml")
    point = next(p for p in shipped if p.scenario.workload.batch_size == 1 and p.scenario.ppsd_backend == "distributed")
    data = yaml.safe_load(out.read_text(encoding="utf-8"))
    data.pop("sweep")
    data.update(method="ppsd", ppsd_backend="distributed", exit_layer=15)
    data["topology"] = {**data["topology"], "stages": 2, "link": {"profile": str(link)}}
    data["workload"] = point.scenario.workload.model_dump()
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    same = run_points(load_points(tmp_path / "one.yaml"), progress=False)[-1].result.tokens_per_s
    assert same == pytest.approx(run_points([point], progress=False)[-1].result.tokens_per_s)
    assert results[("distributed", 15)] > results[("sequential", 15)]
    with pytest.raises(ValueError, match="--contention: a processes profile prices PPSD's stage processes"):
        write_scenario(CPU / "latency_smollm2-135m_cpu_fp32.csv", CPU / "acceptance_smollm2-135m_shared_builtin.csv",
                       out, methods=("ppsd",), contention=contention, force=True)  # fmt: skip
    with pytest.raises(ValueError, match="--link prices PPSD's distributed points: it needs --methods with ppsd"):
        write_scenario(CPU / "latency_smollm2-135m_cpu_fp32.csv", CPU / "acceptance_smollm2-135m_shared_builtin.csv",
                       out, link=link, force=True)  # fmt: skip


def test_a_trace_of_narrow_drafts_takes_their_profile(tmp_path) -> None:
    latency = CPU / "latency_gemma3-270m_cpu_fp32_b1.csv"
    trace = CPU / "acceptance_gemma3-270m_e14v16k_bf16drafts_heldout.csv"
    with pytest.raises(ValueError, match="metadata.draft_dtype: its drafts ran in bfloat16; pass --draft-profile"):
        write_scenario(latency, trace, tmp_path / "narrow.yaml")
    with pytest.raises(ValueError, match="expected the trace's draft dtype bf16, got 'float32'"):
        write_scenario(latency, trace, tmp_path / "narrow.yaml", draft_profile=latency)
    narrow = CPU / "latency_gemma3-270m_cpu_bf16_b1.csv"
    out = write_scenario(
        latency, trace, tmp_path / "narrow.yaml", draft_profile=narrow, policies=("fixed:2", "fixed:3")
    )
    written = tokens_per_s(out)
    expected = tokens_per_s(SCENARIOS / "gemma3_cpu_bf16_drafts.yaml")
    assert written == {key: value for key, value in expected.items() if key[3] == "bf16"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--acceptance", str(CPU / "acceptance_gemma3-270m_e14v16k_heldout.csv")],
         "acceptance_gemma3-270m_e14v16k_heldout.csv: metadata.model: 'gemma3-270m' is Gemma-3-270M, not the "
         "scenario's model SmolLM2-135M"),
        (["--methods", "ar"], "--methods: expected eesd and/or ppsd"),
        (["--policies", "fixed:0"], "--policies: 'fixed:0'"),
        (["--latency", "nope.csv"],
         "--latency nope.csv: no such file; expected a latency profile CSV (eesd calibrate latency)"),
        (["--latency", str(CPU)], f"--latency {CPU}: is a folder; expected a latency profile CSV"),
        (["--acceptance", "nope.csv"], "--acceptance nope.csv: no such file; expected an acceptance trace CSV"),
        (["--draft-profile", "nope.csv"], "--draft-profile nope.csv: no such file"),
        (["--contention", "nope.csv"], "--contention nope.csv: no such file; expected a contention profile CSV"),
        (["--contention", str(CPU / "acceptance_smollm2-135m_shared_builtin.csv")],
         "--contention: " + str(CPU / "acceptance_smollm2-135m_shared_builtin.csv") + ":1: expected format "
         "'eesd.contention_profile'"),
        (["--methods", "ppsd", "--link", "nope.csv"], "--link nope.csv: no such file; expected a link profile CSV"),
        (["--name", "a/b"], "--name 'a/b': expected a folder name"),
        (["--out", str(ROOT / "pyproject.toml" / "x.yaml")], f"--out {ROOT / 'pyproject.toml' / 'x.yaml'}: "),
        (["--out", ""], "--out .: is a folder; --out names the file to write"),
    ],
)  # fmt: skip
def test_files_that_make_no_scenario_are_one_line_naming_them(tmp_path, capsys, args, message) -> None:
    given = {
        "--latency": str(CPU / "latency_smollm2-135m_cpu_fp32.csv"),
        "--acceptance": str(CPU / "acceptance_smollm2-135m_shared_builtin.csv"),
        "--out": str(tmp_path / "s.yaml"),
    }
    for flag, value in zip(args[::2], args[1::2], strict=True):
        given[flag] = value
    argv = ["calibrate", "scenario", *[part for pair in given.items() for part in pair]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("eesd calibrate: error:") and message in err and len(err.splitlines()) == 1, err
    assert ".check.yaml" not in err  # never the probe written beside the scenario
    assert not (tmp_path / "s.yaml").exists()


def _copy(read, write, source: Path, out: Path, records=None, **metadata) -> Path:
    """A copy of a shipped file with its metadata (and records) changed; a metadata value of None drops the key."""
    data = read(source)
    changed = {key: value for key, value in {**data.metadata, **metadata}.items() if value is not None}
    return write(out, changed, data.records if records is None else records)


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("exit_layer", ":{end}: column 'exit_layer' must be in [1, 29] for SmolLM2-135M's 30 layers, got 40 (the "
         "latency profile "),
        ("layers_profiled", "latency.csv: metadata.layers_profiled: 40 layers (model 'smollm2-135m'); expected 1 to "
         "the 30 layers the scenario's model SmolLM2-135M has"),
        ("total_layers", "metadata.model: 'smollm2-135m' is SmolLM2-135M, not the scenario's model smollm2-135m "
         "(num_layers 30, not 40)"),
    ],
)  # fmt: skip
def test_files_that_do_not_fit_one_model_are_one_line_naming_the_field(tmp_path, capsys, what, message) -> None:
    """A trace with rows at an exit layer the profile's model lacks, a profile that timed more layers than its model
    has, or one of a 40-layer model named like SmolLM2 (whose trace is of the 30-layer one)."""
    latency, trace = CPU / "latency_smollm2-135m_cpu_fp32.csv", CPU / "acceptance_smollm2-135m_shared_builtin.csv"
    if what == "exit_layer":
        records = read_acceptance_trace(trace).records
        more = records + tuple(dataclasses.replace(r, exit_layer=40) for r in records if r.exit_layer == 22)
        trace = _copy(read_acceptance_trace, write_acceptance_trace, trace, tmp_path / "trace.csv", more)
        message = message.format(end=len(records) + 3)
    else:
        latency = _copy(read_latency_profile, write_latency_profile, latency, tmp_path / "latency.csv", **{what: 40})
    argv = ["calibrate", "scenario", "--latency", str(latency), "--acceptance", str(trace), "--out",
            str(tmp_path / "s.yaml")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("eesd calibrate: error:") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s.yaml").exists()


def test_an_existing_scenario_is_kept_without_force(tmp_path, capsys) -> None:
    out = tmp_path / "s.yaml"
    out.write_text("mine\n", encoding="utf-8")
    argv = ["calibrate", "scenario", "--latency", str(CPU / "latency_smollm2-135m_cpu_fp32.csv"),
            "--acceptance", str(CPU / "acceptance_smollm2-135m_shared_builtin.csv"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 2 and "pass --force" in capsys.readouterr().err and out.read_text() == "mine\n"
    assert main([*argv, "--force"]) == 0 and load_points(out)


def test_writing_a_scenario_needs_no_torch(tmp_path) -> None:
    """Files measured on a GPU box can be turned into a scenario on a laptop with the simulator alone."""
    out = tmp_path / "s.yaml"
    code = (
        "import sys; from executor.cli import main; "
        f"status = main(['calibrate', 'scenario', '--latency', {str(CPU / 'latency_smollm2-135m_cpu_fp32.csv')!r}, "
        f"'--acceptance', {str(CPU / 'acceptance_smollm2-135m_shared_builtin.csv')!r}, '--out', {str(out)!r}]); "
        "assert status == 0 and 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert load_points(out)


def test_a_serving_scenario_is_sized_from_ars_own_pace(tmp_path) -> None:
    """`--serving`: AR against EESD under Poisson load, rates a quarter to eight times what AR serves one request at
    a time, SLOs of ten and two AR steps, batches up to the profile's largest; serve-sim runs it."""
    from sim.serving import load_serving_points, simulate_serving

    out = tmp_path / "serve.yaml"
    latency = CPU / "serving" / "latency_smollm2-135m_cpu_fp32.csv"
    trace = CPU / "acceptance_smollm2-135m_shared_builtin.csv"
    write_scenario(latency, trace, out, policies=("fixed:1",), serving=True)
    data = yaml.safe_load(out.read_text(encoding="utf-8"))
    serving = data["serving"]
    assert "method" not in data and "sweep" not in data and serving["methods"] == ["ar", "eesd"]
    assert serving["max_batch"] == 4 and serving["kv_capacity_tokens"] is None  # the CPU profile's batches 1-4
    rates = serving["rates_per_s"]
    assert len(rates) == 6 and rates == sorted(rates) and rates[-1] / rates[0] == pytest.approx(32, rel=0.01)
    assert serving["slo"]["ttft_ms"] == pytest.approx(5 * serving["slo"]["tpot_ms"], rel=0.01)
    points = load_serving_points(out)
    assert len(points) == 12 and {p.method for p in points} == {"ar", "eesd"}
    unloaded = next(p for p in points if p.method == "ar" and p.rate_per_s == rates[0])
    assert simulate_serving(unloaded).tokens > 0
    with pytest.raises(ValueError, match="--serving writes AR against EESD"):
        write_scenario(latency, trace, tmp_path / "p.yaml", methods=("eesd", "ppsd"), serving=True)


def test_several_traces_make_one_sweep_comparing_their_heads(tmp_path) -> None:
    """Each head's points simulate as the scenario written from its trace alone; `--break-even` names the heads."""
    from sim.break_even import break_even, rows

    latency = CPU / "latency_smollm2-135m_cpu_fp32_frozen.csv"
    e7, e15 = (CPU / f"acceptance_smollm2-135m_e{e}mix5v16k_builtin_heldout.csv" for e in (7, 15))
    both = write_scenario(latency, [e7, e15], tmp_path / "both.yaml", policies=("fixed:1", "beta-ts"))
    config = yaml.safe_load(both.read_text(encoding="utf-8"))["sweep"]["config"]
    assert [(c["exit_layer"], c["policy"]) for c in config] == [(7, "fixed:1"), (7, "beta-ts"), (15, "fixed:1"),
                                                                (15, "beta-ts")]  # fmt: skip
    assert {c["exit_head"] for c in config} == {"trained:16384"} and len({c["acceptance.trace"] for c in config}) == 2
    alone = {}
    for trace in (e7, e15):
        alone.update(
            tokens_per_s(
                write_scenario(latency, trace, tmp_path / f"{trace.stem}.yaml", policies=("fixed:1", "beta-ts"))
            )
        )
    assert tokens_per_s(both) == alone
    shared = write_scenario(latency, [e7, CPU / "acceptance_smollm2-135m_shared_builtin.csv"], tmp_path / "heads.yaml",
                            policies=("fixed:1",))  # fmt: skip
    found = [item for item in (break_even(point) for point in load_points(shared)) if item is not None]
    assert [row["exit_head"] for row in rows(found, 1.0)] == ["trained:16384", "shared", "shared", "shared", "shared"]


def test_traces_that_cannot_share_a_scenario_are_refused(tmp_path) -> None:
    latency = CPU / "latency_gemma3-270m_cpu_fp32_b1.csv"
    narrow = CPU / "acceptance_gemma3-270m_e14v16k_bf16drafts_heldout.csv"
    with pytest.raises(ValueError, match="a trace of narrow drafts is replayed alone"):
        write_scenario(latency, [CPU / "acceptance_gemma3-270m_e14v16k_heldout.csv", narrow], tmp_path / "s.yaml")
    trace = CPU / "acceptance_gemma3-270m_e14v16k_heldout.csv"
    with pytest.raises(ValueError, match="--serving takes one trace"):
        write_scenario(latency, [trace, trace], tmp_path / "s.yaml", serving=True)


def test_a_traces_head_file_is_found_from_another_folder(tmp_path, monkeypatch, capsys) -> None:
    """A trace names its head file as `calibrate acceptance --head` was given it (from the project's root): run from
    elsewhere, the file is found from the trace's folder or one above it (the shipped traces from any folder, a
    user's project moved as a whole); a head that is nowhere is one line saying where it was looked for."""
    import shutil

    from sim.formats import read_acceptance_trace, trace_exit_head

    shipped = CPU / "acceptance_smollm2-135m_e7mix3v16k_builtin_heldout.csv"
    head = read_acceptance_trace(shipped).metadata["head"]
    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    (project / Path(head)).parent.mkdir(parents=True)
    shutil.copy(shipped, project / "runs" / shipped.name)
    shutil.copy(ROOT / head, project / head)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for trace in (shipped, project / "runs" / shipped.name):
        assert trace_exit_head(trace, read_acceptance_trace(trace)) == "trained:16384"
    out = elsewhere / "mine.yaml"
    argv = ["calibrate", "scenario", "--latency", str(CPU / "latency_smollm2-135m_cpu_fp32.csv"), "--acceptance"]
    assert main([*argv, str(project / "runs" / shipped.name), "--out", str(out)]) == 0 and load_points(out)
    (project / head).unlink()
    assert main([*argv, str(project / "runs" / shipped.name), "--out", str(elsewhere / "no.yaml")]) == 2
    err = capsys.readouterr().err
    assert "metadata.head" in err and "looked in the working folder" in err and "Traceback" not in err


def test_a_trace_given_twice_is_refused(tmp_path, capsys) -> None:
    """Each trace once: a repeat (by another path too) would write every point of its head twice."""
    trace = CPU / "acceptance_smollm2-135m_shared_builtin.csv"
    argv = ["calibrate", "scenario", "--latency", str(CPU / "latency_smollm2-135m_cpu_fp32.csv"), "--acceptance",
            str(trace), str(trace.parent / ".." / "cpu" / trace.name), "--out", str(tmp_path / "s.yaml")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--acceptance:" in err and "given twice (each trace once" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s.yaml").exists()
