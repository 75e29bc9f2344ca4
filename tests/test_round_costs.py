"""Round costs: measured on the executor's passes (`executor.round_costs`), derived from a profile by the simulator
(`sim.cost.round_costs`), taken by the policies as a spec (`beta-ts:costs=...`), and lossless whatever they say."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tiny_models import TinySpec, tiny_model

import executor
from executor.cli import main
from executor.round_costs import measure_round_costs
from sim.policy import make_policy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(TinySpec(num_layers=6), torch.float32)


def test_measured_costs_are_a_table_the_policies_take(model) -> None:
    measured = measure_round_costs(model, 3, None, 4, context=12, repeats=2)
    assert measured.costs[0] == 1.0 and len(measured.costs) == len(measured.ms) == len(measured.spread) == 5
    assert all(cost > 0 for cost in measured.costs) and all(low <= ms <= high for ms, (low, high) in
                                                          zip(measured.ms, measured.spread, strict=True))  # fmt: skip
    assert measured.costs[1:] == tuple(ms / measured.ms[0] for ms in measured.ms[1:])
    policy = make_policy(measured.spec())
    assert policy.max_draft_len == 4 and policy.round_costs == pytest.approx(measured.costs, abs=5e-5)
    assert make_policy(measured.spec("calibration-ts")).round_costs == policy.round_costs


def test_measuring_leaves_generate_as_it_was(model) -> None:
    """The timing writes a scratch cache of its own passes: decoding after it (and with its table) equals AR."""
    prompt = torch.tensor([[5, 17, 3, 60, 2, 41]])
    reference = executor.generate(model, prompt, max_new_tokens=12, method="ar")
    measured = measure_round_costs(model, 2, None, 3, context=8, repeats=1, warmups=0)
    for policy in (measured.spec(), measured.spec("calibration-ts"), "beta-ts:costs=1.1/1.2/5"):
        out = executor.generate(model, prompt, max_new_tokens=12, method="eesd", exit_layer=2, policy=policy)
        assert torch.equal(out.sequences, reference.sequences), policy


def test_a_timed_round_runs_the_passes_a_decode_round_runs(model, monkeypatch) -> None:
    """Round k: k draft steps at positions at .. at + k - 1, then one verify pass of k drafts (k = 0: one AR step),
    each k timed `warmups + repeats` times, interleaved."""
    from executor.passes import Passes

    calls: list[tuple] = []

    def spy(name: str):
        real = getattr(Passes, name)

        def run(self, *args):
            calls.append((name, *args))
            return real(self, *args)

        return run

    for name in ("ar", "draft", "verify"):
        monkeypatch.setattr(Passes, name, spy(name))
    measure_round_costs(model, 2, None, 3, context=10, repeats=2, warmups=1)
    one_sweep = [("ar", 10), ("draft", 10), ("verify", 1, 11), ("draft", 10), ("draft", 11), ("verify", 2, 12),
                 ("draft", 10), ("draft", 11), ("draft", 12), ("verify", 3, 13)]  # fmt: skip
    assert calls == one_sweep * 3
    calls.clear()  # captured passes chain rounds of no drafts: k = 0 times its share of 8 steps and one host read
    monkeypatch.setattr("executor.round_costs.resolve_capture", lambda *args: "graph")
    measure_round_costs(model, 2, None, 1, context=10, repeats=1, warmups=0)
    assert calls == [("ar", position) for position in range(10, 18)] + [("draft", 10), ("verify", 1, 11)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exit_layer": 6}, "exit_layer must be an integer in [1, 5]"),
        ({"exit_layer": 2, "max_draft_len": 0}, "expected max_draft_len >= 1"),
        ({"exit_layer": 2, "context": 4096}, "exceeds the model's context"),
    ],
)
def test_bad_settings_are_refused(model, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match="") as info:
        measure_round_costs(model, **kwargs)
    assert message in str(info.value)


def test_the_cli_prints_the_spec_and_writes_the_table(tmp_path, capsys) -> None:
    path = tmp_path / "tiny"
    tiny_model(TinySpec(num_layers=4), torch.float32).save_pretrained(path)
    out = tmp_path / "rounds.json"
    argv = ["calibrate", "rounds", "--model", str(path), "--exit-layer", "2", "--max-draft-len", "3", "--context", "8",
            "--repeats", "1", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["format"] == "eesd.round_costs" and data["schema_version"] == 1 and len(data["costs"]) == 4
    assert f"policy: {data['policy']}" in printed and data["policy"].startswith("beta-ts:costs=")
    assert data["metadata"]["exit_layer"] == 2 and data["metadata"]["device_type"] == "cpu"
    assert main(argv) == 2 and "exists; pass --force" in capsys.readouterr().err  # never overwritten unasked
    assert main([*argv[:-2], "--out", str(tmp_path / "rounds.csv")]) == 2
    assert "expected a .json file" in capsys.readouterr().err


def _point(scenario: str, policy: str = "beta-ts"):
    from sim.scenario import load_points

    point = load_points(ROOT / "scenarios" / scenario)[0]
    return dataclasses.replace(point, scenario=point.scenario.model_copy(update={"policy": policy}))


def _plan(scenario: str, policy: str = "beta-ts"):
    from sim.plan import build_plan

    return build_plan(_point(scenario, policy))


def test_the_simulator_gives_the_policies_its_profiles_round_costs() -> None:
    """The Xeon box's profile has its step where the verify pass reaches 4 tokens (3 drafts); the H100's grows
    evenly after the first draft. The table reaches the policy's max; a policy that weighs no costs, or whose spec
    gives them, gets none."""
    xeon, h100 = _plan("smollm2_cpu_xeon_calibrated.yaml"), _plan("smollm2_h100_validate.yaml", "beta-ts:max=5")
    steps = {
        name: [b - a for a, b in zip(plan.round_costs, plan.round_costs[1:], strict=False)]
        for name, plan in (("xeon", xeon), ("h100", h100))
    }
    assert len(xeon.round_costs) == 9 and len(h100.round_costs) == 6 and xeon.round_costs[0] == 1.0
    assert steps["xeon"][2] > 1.5 * max(steps["xeon"][:2]) and all(step > 0 for step in steps["xeon"])
    # captured: the first draft also brings the verify pass's host read, which chained AR steps share
    assert max(steps["h100"][1:]) < 1.25 * min(steps["h100"][1:]) < steps["h100"][0]
    for policy in ("fixed:2", "heuristic", "beta-ts:cost=0.3", "calibration-ts:costs=1.2/1.4"):
        assert _plan("smollm2_cpu_xeon_calibrated.yaml", policy).round_costs is None  # nothing to weigh, or given
    assert _plan("ppsd_one_gpu.yaml", "fixed:2").round_costs is None  # PPSD has no draft policy


def _tables_given(module, monkeypatch) -> list[tuple[float, ...] | None]:
    """The round costs each `make_policy` call in `module` is given, in order (the policies are made as before)."""
    seen: list[tuple[float, ...] | None] = []
    real = module.make_policy

    def spy(spec, **kwargs):
        seen.append(kwargs.get("round_costs"))
        return real(spec, **kwargs)

    monkeypatch.setattr(module, "make_policy", spy)
    return seen


def test_a_sim_row_draws_with_the_plans_table(monkeypatch) -> None:
    """Every EESD row's policy gets the plan's table; the AR baseline's rows (which never draft) get none."""
    import sim.engine
    from sim.runner import simulate_point

    seen = _tables_given(sim.engine, monkeypatch)
    point = _point("smollm2_cpu_xeon_calibrated.yaml")
    simulate_point(point)
    table, requests = _plan("smollm2_cpu_xeon_calibrated.yaml").round_costs, point.scenario.workload.requests
    assert seen.count(table) == requests and seen.count(None) == requests and len(seen) == 2 * requests


def test_a_served_requests_policy_draws_with_the_plans_table(tmp_path, monkeypatch) -> None:
    """The serving simulator's per-request policies get the plan's round costs too."""
    import yaml

    import sim.serving
    from sim.serving import load_serving_points, simulate_serving

    seen = _tables_given(sim.serving, monkeypatch)
    workload = {"requests": 5, "seed": 0, "arrival": {"process": "poisson", "rate_per_s": 2.0}, "prompt_len": 64,
                "output_len": 8}  # fmt: skip
    scenario = yaml.safe_load((ROOT / "scenarios" / "smollm2_cpu_xeon_calibrated.yaml").read_text())
    for key in ("sweep", "workload"):
        scenario.pop(key)
    profile = ROOT / "calibration" / "cpu-xeon" / "latency_smollm2-135m_cpu_fp32.csv"
    scenario["latency"]["profile"]["path"] = str(profile)
    scenario["acceptance"] = {"alpha": 0.6}
    scenario |= {"policy": "beta-ts", "serving": {"workload": workload, "methods": ["eesd"], "max_batch": 2}}
    path = tmp_path / "serving.yaml"
    path.write_text(yaml.safe_dump(scenario), encoding="utf-8")
    (point,) = load_serving_points(path)
    simulate_serving(point)
    drawing = seen[1:]  # the first call only reads the policy's max draft length (its KV budget per request)
    assert seen[0] is None and len(drawing) == 5 and all(table == point.plan.round_costs for table in drawing)
    assert point.plan.round_costs[0] == 1.0 and len(point.plan.round_costs) == 9


@pytest.fixture(scope="module")
def measured_file(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model's folder and the round costs `eesd calibrate rounds --out` wrote for it at exit layer 2."""
    folder = tmp_path_factory.mktemp("rounds")
    tiny_model(TinySpec(num_layers=4), torch.float32).save_pretrained(folder / "tiny")
    out = folder / "rounds.json"
    argv = ["calibrate", "rounds", "--model", str(folder / "tiny"), "--exit-layer", "2", "--max-draft-len", "3",
            "--context", "8", "--repeats", "1", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return folder / "tiny", out


def test_generate_takes_a_measured_file(measured_file, capsys) -> None:
    """`eesd generate --round-costs FILE`: beta-ts (or the policy named) with the file's costs, at its exit layer;
    the output equals AR."""
    model, out = measured_file
    base = ["generate", "--model", str(model), "--prompt-ids", "5,17,3,60", "--max-new-tokens", "8", "--threads", "1"]
    for extra in ([], ["--policy", "calibration-ts:buckets=4"], ["--exit-layer", "2"]):
        assert main([*base, "--round-costs", str(out), "--compare-ar", *extra]) == 0
        assert "identical to AR: True" in capsys.readouterr().out
    import argparse

    from executor.generate_cli import _with_round_costs
    from executor.round_costs import read_round_costs

    costs = read_round_costs(out)[0]
    args = argparse.Namespace(
        round_costs=out, policy=None, exit_layer=None, method="eesd", head="shared", draft_dtype=None, model=str(model)
    )
    policy, exit_layer = _with_round_costs(args)
    assert exit_layer == 2 and make_policy(policy).round_costs == pytest.approx(costs, abs=5e-5)
    args.policy = "calibration-ts:buckets=4"
    assert make_policy(_with_round_costs(args)[0]).buckets == 4


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("rounds", ["--max-draft-len", "0"], "--max-draft-len must be >= 1, got 0"),
        ("rounds", ["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        ("rounds", ["--context", "250"], "--context 250 + --max-draft-len 8 + 3 reach past"),
        ("rounds", ["--exit-layer", "4"], "--exit-layer must be in [1, 3] for "),
        ("rounds", ["--head", "missing.safetensors"], "exit head file missing.safetensors does not exist"),
        ("rounds", ["--out", str(ROOT / "pyproject.toml" / "rc.json")], "pyproject.toml is a file, so the folder"),
        (
            "generate",
            ["--policy", "fixed:2"],
            "--round-costs is for --method eesd with --policy beta-ts or calibration-ts",
        ),
        (
            "generate",
            ["--policy", "beta-ts:cost=0.2"],
            "and no cost of its own, got --method eesd --policy beta-ts:cost=0.2",
        ),
        ("generate", ["--method", "ar"], "got --method ar --policy beta-ts"),
        ("generate", ["--exit-layer", "3"], "was measured at exit layer 2, not 3"),
        ("generate", ["--head", "shared:10"], "was measured with head shared, not shared:10"),
    ],
)
def test_bad_settings_are_refused_with_the_flag_named(measured_file, capsys, command, extra, message: str) -> None:
    """`eesd calibrate rounds` checks its flags; `eesd generate --round-costs FILE` refuses a file that does not fit."""
    model, out = measured_file
    argv = {
        "rounds": ["calibrate", "rounds", "--model", str(model), "--threads", "1"],
        "generate": ["generate", "--model", str(model), "--prompt-ids", "5,17", "--round-costs", str(out)],
    }[command]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_an_out_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys) -> None:
    (tmp_path / "a_file").write_text("keep me\n")
    for out, message in ((tmp_path / "a_file" / "rc.json", "a_file is a file, so the folder"),
                         (tmp_path / "a_folder.json", "is a folder; --out names the file to write")):  # fmt: skip
        (tmp_path / "a_folder.json").mkdir(exist_ok=True)
        argv = ["calibrate", "rounds", "--model", str(tmp_path / "absent"), "--threads", "1", "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: --out {out}: " in err and message in err, err


def test_an_exit_layer_past_the_model_is_refused_before_it_loads(tmp_path, capsys, monkeypatch) -> None:
    import calibrate.common

    path = tmp_path / "tiny"
    tiny_model(TinySpec(num_layers=4)).save_pretrained(path)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(calibrate.common, "load_model", no_load)
    argv = ["calibrate", "rounds", "--model", str(path), "--exit-layer", "4", "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "rc.json")]) == 2
    assert "--exit-layer must be in [1, 3] for " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda data: data.update(format="eesd.latency_profile"), "format: expected 'eesd.round_costs'"),
        (lambda data: data.update(schema_version=2), "schema_version: expected 1, got 2"),
        (lambda data: data["metadata"].pop("exit_layer"), "metadata.exit_layer: expected the exit layer"),
        (lambda data: data.update(costs=[1, 1.5, float("inf")]), "costs: expected [1, C_1, ..., C_K]"),
        (lambda data: data.update(costs=[2, 1.5]), "costs: expected [1, C_1, ..., C_K]"),
        (lambda data: data.update(costs=[1]), "costs: expected [1, C_1, ..., C_K]"),
        (lambda data: data.update(costs="1/2"), "costs: expected [1, C_1, ..., C_K]"),
    ],
)
def test_a_bad_file_is_refused_with_the_field_named(measured_file, tmp_path, edit, message: str) -> None:
    from executor.round_costs import read_round_costs

    data = json.loads(measured_file[1].read_text())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="bad.json") as info:
        read_round_costs(path)
    assert message in str(info.value)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file of round costs"):
        read_round_costs(path)
    with pytest.raises(ValueError, match="cannot read it"):
        read_round_costs(tmp_path / "missing.json")


@pytest.mark.parametrize("capture", ["none", "auto", "freeze"])
def test_round_costs_chain_ar_steps_as_generate_reads_them(capture) -> None:
    """A round of no drafts is timed as `generate` runs it with that capture mode: its default `sync_every` steps a
    host read (frozen passes on a CPU read after every step, as uncaptured ones do)."""
    from executor.passes import resolve_capture, resolve_sync_every
    from executor.round_costs import rounds_chained

    device = torch.device("cpu")
    assert rounds_chained(capture, device) == resolve_sync_every(None, resolve_capture(capture, device, "greedy")) == 1
