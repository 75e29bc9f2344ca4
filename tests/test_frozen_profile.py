"""Frozen-pass latency profiles (`eesd calibrate latency --kernels frozen`, the CPU's capture="freeze"): the profile
times its layers, exit head and LM head compiled with the weights frozen in; the simulator replays it over the frozen
executor's cache (a captured capacity, every slot attended); `eesd validate` runs the executor frozen against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from calibrate.latency import FrozenCalls, Grid, GridPoint, LatencySettings, make_inputs, plan_points
from calibrate.timing import TimerSpec
from executor.adapter import ModelAdapter
from executor.cli import main
from sim.cost import round_costs, verify_pass
from sim.formats import read_latency_profile
from sim.latency import ProfileLatency, ScaledLatency, static_capacity
from sim.plan import SimPlan, build_plan
from sim.scenario import ScenarioError, load_points
from tests.tiny_models import TinySpec, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "calibration" / "cpu" / "latency_smollm2-135m_cpu_fp32.csv"
TRACE = ROOT / "calibration" / "cpu" / "acceptance_smollm2-135m_shared_builtin.csv"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def relabelled(tmp_path: Path, name: str = "frozen.csv", **metadata: object) -> Path:
    """The shipped SmolLM2 CPU profile with its metadata changed (a stand-in frozen profile for the sim's checks)."""
    lines = PROFILE.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0].removeprefix("# "))
    header["metadata"] = {**header["metadata"], **metadata}
    path = tmp_path / name
    path.write_text("\n".join(["# " + json.dumps(header), *lines[1:]]) + "\n", encoding="utf-8")
    return path


def scenario(tmp_path: Path, profile: Path, **fields: object) -> Path:
    data = {
        "name": "frozen", "model": "SmolLM2-135M", "dtype": "fp32", "method": "eesd", "exit_layer": 8,
        "policy": "fixed:3", "attention": "cache",
        "latency": {"profile": {"path": str(profile), "cuda_graphs": False}},
        "acceptance": {"alpha": 0.5}, "workload": {"requests": 2, "prompt_len": 47, "output_len": 32},
        **fields,
    }  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# ---- the simulator ---------------------------------------------------------------------------------------------------
def test_a_frozen_profile_plans_the_frozen_executors_cache(tmp_path: Path) -> None:
    """Frozen passes are built for a captured capacity (47 + 32 + 3 + 1 = 83 slots -> 256) and attend over all of
    it; the host's work is paid on every pass, as uncaptured (no CUDA graphs)."""
    frozen = build_plan(load_points(scenario(tmp_path, relabelled(tmp_path, kernels="frozen")))[0])
    eager = build_plan(load_points(scenario(tmp_path, relabelled(tmp_path, "eager.csv")))[0])
    assert frozen.cache_slots == 256 and eager.cache_slots == 83
    latency = frozen.stages[0].latency
    assert latency.frozen and not latency.cuda_graphs and static_capacity(latency)
    assert not static_capacity(eager.stages[0].latency)
    assert frozen.attended(60, "verify") == 256 and not frozen.span_buckets
    assert ScaledLatency(latency, decode_default=2.0).frozen  # a validation's scaled profile keeps it


def test_a_frozen_plan_costs_each_verify_pass_at_its_bucket(tmp_path: Path) -> None:
    """On frozen passes the executor pads a round of k drafts to its verify bucket (`generate`'s `verify_buckets`),
    so the plan costs that pass's layers [E, L) and LM head over the bucket's tokens: beta-ts (up to 8 drafts) at
    1, 2, 4, 4, 8, 8, 8, 8 slots; capped by the output length as the executor caps its passes; eager: k itself.
    The engine and the round costs the policy weighs take the same passes."""
    frozen = relabelled(tmp_path, kernels="frozen")
    plan = build_plan(load_points(scenario(tmp_path, frozen, policy="beta-ts"))[0])
    assert plan.verify_widths == (0, 1, 2, 4, 4, 8, 8, 8, 8)
    work = verify_pass(plan, 3)
    assert work.lm_head_q == 5 and work.segments == ((0, 8, 1), (8, plan.model.num_layers, 5))
    assert plan.round_costs is not None
    unpadded = SimPlan(**{**plan.__dict__, "verify_widths": ()})
    assert round_costs(plan, 8)[3] > round_costs(unpadded, 8)[3]  # the profile's q = 5 costs more than q = 4
    assert round_costs(plan, 8)[4] == round_costs(unpadded, 8)[4]
    short = build_plan(load_points(scenario(tmp_path, frozen, policy="beta-ts", workload={"output_len": 6}))[0])
    assert short.verify_widths == (0, 1, 2, 4, 4, 5)  # the executor's passes hold drafts of up to 6 - 1
    assert build_plan(load_points(scenario(tmp_path, PROFILE, policy="beta-ts"))[0]).verify_widths == ()
    assert build_plan(load_points(scenario(tmp_path, frozen, method="ar"))[0]).verify_widths == ()


def test_a_frozen_plan_without_verify_buckets_costs_each_k_at_its_own_width(tmp_path: Path) -> None:
    """`verify_buckets: false` (the executor's `verify_buckets=False`): a verify pass per k, nothing padded; the
    round costs the policy weighs are the unpadded ones."""
    from executor.passes import verify_bucketed

    frozen = relabelled(tmp_path, kernels="frozen")
    plan = build_plan(load_points(scenario(tmp_path, frozen, policy="beta-ts", verify_buckets=False))[0])
    assert plan.verify_widths == () and not plan.verify_buckets
    assert verify_pass(plan, 3).lm_head_q == 4
    padded = build_plan(load_points(scenario(tmp_path, frozen, policy="beta-ts"))[0])
    assert plan.round_costs is not None and padded.round_costs is not None
    assert plan.round_costs[3] < padded.round_costs[3] and plan.round_costs[4] == padded.round_costs[4]
    assert verify_bucketed("freeze") and not verify_bucketed("freeze", False) and not verify_bucketed("none")


@pytest.mark.parametrize("attention", ["buckets", "context"])
def test_a_frozen_profile_with_another_attention_is_refused(tmp_path: Path, attention: str) -> None:
    path = scenario(tmp_path, relabelled(tmp_path, kernels="frozen"), attention=attention)
    expected = f"attention: .*times frozen passes.*expected attention: cache, got {attention}"
    with pytest.raises(ScenarioError, match=expected):
        build_plan(load_points(path)[0])


def test_a_draft_profile_of_other_kernels_is_refused(tmp_path: Path) -> None:
    frozen = relabelled(tmp_path, kernels="frozen")
    draft = relabelled(tmp_path, "bf16.csv", dtype="bfloat16")
    path = scenario(tmp_path, frozen, draft_dtype="bf16")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["latency"]["draft_profile"] = {"path": str(draft), "cuda_graphs": False}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    expected = r"metadata.kernels: timed eager kernels; expected latency.profile's \(frozen\)"
    with pytest.raises(ScenarioError, match=expected):
        build_plan(load_points(path)[0])


def test_validate_runs_the_executor_frozen_for_a_frozen_profile() -> None:
    from calibrate.validate import capture_of

    def profile(kernels: str | None, device_type: str = "cpu"):
        meta = {"device_type": device_type, **({"kernels": kernels} if kernels else {})}
        return type("P", (), {"metadata": meta})()

    assert capture_of(profile("frozen"), False) == "freeze"
    assert capture_of(profile("eager"), False) == "none" and capture_of(profile(None), False) == "none"
    assert capture_of(profile("compiled"), True) == "compile-layers"


def test_the_shipped_frozen_scenario_plans_a_frozen_validation() -> None:
    from calibrate.validate import plan

    validation = plan(ROOT / "scenarios" / "gemma3_cpu_frozen.yaml")
    assert validation.capture == "freeze" and validation.probe_context == 256
    assert [t.label for t in validation.targets][:1] == ["ar"]
    assert {t.policy for t in validation.targets if t.method == "eesd"} == {"fixed:1", "fixed:2", "fixed:3"}
    profile = read_latency_profile(validation.profile_path)
    assert profile.metadata["kernels"] == "frozen" and ProfileLatency(profile, cuda_graphs=False).frozen


def test_planning_the_shipped_frozen_scenario_queries_no_latency_off_the_grid() -> None:
    """Every pass of the frozen scenario is costed at its 256-slot cache, inside the profiled grid: planning it (the
    policy's cost ratio included, once taken at the 64-token prompt) flags nothing as extrapolated."""
    for point in load_points(ROOT / "scenarios" / "gemma3_cpu_frozen.yaml"):
        plan = build_plan(point)
        assert plan.cache_slots == 256 and plan.cost_ratio is not None
        assert not any(stage.latency.extrapolated for stage in plan.stages), point.values


# ---- the profile -----------------------------------------------------------------------------------------------------
def test_frozen_kernels_are_the_cpus_and_run_fused_projections() -> None:
    """As the frozen executor's passes (`executor.passes.FUSE_CAPTURED`)."""
    grid = Grid((1,), (8,), (1,), (8,))
    with pytest.raises(ValueError, match="--kernels frozen: frozen passes are the CPU's"):
        LatencySettings(grid, (True,), TimerSpec(torch.device("cuda"), 1, 1), "frozen")
    settings = LatencySettings(grid, (False,), TimerSpec(torch.device("cpu"), 1, 1), "frozen")
    from calibrate.latency import profiling_adapter
    from executor.fusion import GATE_UP, QKV, fused_weights

    adapter = profiling_adapter(tiny_model(TinySpec(num_layers=2), torch.float32), settings, [])
    assert adapter.layer_run is None  # the layers compiled whole by `FrozenCalls`, not one by one
    assert all(fused_weights(x.self_attn, QKV[0]) and fused_weights(x.mlp, GATE_UP[0]) for x in adapter.layers)


def test_a_frozen_pass_reads_its_weights_once_at_compile_time() -> None:
    """What makes it frozen: the weights are constants of the compiled pass, so a later in-place change of a weight
    is not seen by it (and is by the eager pass); the frozen and eager passes agree before the change."""
    adapter = ModelAdapter(tiny_model(TinySpec(num_layers=2), torch.float32))
    inputs = make_inputs(adapter, 1, 8, 1)
    point = GridPoint("lm_head", "verify", 1, 8, 1, False)
    from calibrate.latency import component_call

    eager = component_call(adapter, inputs, "lm_head")
    calls = FrozenCalls()
    with torch.inference_mode():
        frozen = calls.get(point, None, eager)
        torch.testing.assert_close(frozen(), eager(), rtol=1e-5, atol=1e-5)
        before = frozen().clone()
        adapter.model.lm_head.weight.mul_(2.0)
        torch.testing.assert_close(frozen(), before)
        assert not torch.allclose(eager(), before)


def test_frozen_calls_compile_each_shape_once_and_never_reset_dynamo(monkeypatch) -> None:
    """Each (component, layer, shape) compiles once and is kept, so a later visit of the grid reuses it, until it is
    released (then compiled again if asked for); Dynamo is never reset (a validation's probe compiles after the
    executor's frozen passes, which a reset would throw away)."""
    import calibrate.latency as latency
    import executor.passes

    resets: list[int] = []
    compiled: list[object] = []
    released: list[tuple] = []
    monkeypatch.setattr(latency, "_freeze", lambda fn: (compiled.append(fn) or fn, ({"fn": fn}, [])))
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr(executor.passes, "release_compiled", lambda names, modules: released.append(names["fn"]()))
    calls = FrozenCalls()
    grid = [GridPoint("layer", "draft", 1, 8, 1, False), GridPoint("lm_head", "verify", 1, 8, 1, False),
            GridPoint("layer", "verify", 3, 8, 1, False), GridPoint("layer", "verify", 1, 8, 1, False)]  # fmt: skip
    for visit in range(3):
        for index, point in enumerate(grid):
            calls.get(point, None, lambda index=index, visit=visit: (index, visit))
    assert resets == [] and len(compiled) == 3  # the draft and verify phases of one shape share a compilation
    assert [fn() for fn in compiled] == [(0, 0), (1, 0), (2, 0)]
    calls.release(calls.key(grid[1], None))
    calls.release(calls.key(grid[1], None))  # released once
    assert released == [(1, 0)] and calls.key(grid[1], None) not in calls.calls
    calls.get(grid[1], None, lambda: "again")
    assert len(compiled) == 4 and compiled[-1]() == "again"


def test_frozen_profile_of_a_tiny_model(tmp_path: Path, monkeypatch) -> None:
    """--kernels frozen: the layers, exit head and LM head of each decode shape (and the spot check's layers) timed
    frozen, embed / overhead / prefill eager; a file of its own the simulator reads as frozen."""
    import calibrate.latency as latency

    frozen: list[tuple[str, int | None, int]] = []
    released: list[tuple[str, int | None, int]] = []
    real, real_release = latency.FrozenCalls.get, latency.FrozenCalls.release

    def spy(self, point, layer, fn):
        if (point.component, layer, point.q, point.context_len, point.batch) not in self.calls:
            frozen.append((point.component, layer, point.q))
        return real(self, point, layer, fn)

    def spy_release(self, key):
        released.append(key[:3])
        return real_release(self, key)

    monkeypatch.setattr(latency.FrozenCalls, "get", spy)
    monkeypatch.setattr(latency.FrozenCalls, "release", spy_release)
    config = tmp_path / "config.json"
    tiny_model(TinySpec(num_layers=2), dtype=torch.float32).config.to_json_file(config)
    grid = ["--q", "1,2", "--context", "8", "--batch", "1", "--prefill", "16", "--warmup", "1", "--repeats", "2"]
    argv = ["calibrate", "latency", "--model", str(config), "--out", str(tmp_path / "out"), "--kernels", "frozen"]
    assert main([*argv, *grid, "--threads", "1", "--no-progress"]) == 0
    (path,) = (tmp_path / "out").glob("latency_*.csv")
    assert path.name.endswith("_fp32_frozen.csv")
    profile = read_latency_profile(path)
    assert profile.metadata["kernels"] == "frozen"
    assert len(profile.records) == len(plan_points(Grid((1, 2), (8,), (1,), (16,)), (False,)))
    spot = [("layer", 0, 2), ("layer", 1, 2)]  # layers 0 and L - 1 alone at the grid's last q
    decode = [("layer", None, 1), ("exit_head", None, 1), ("lm_head", None, 1)]
    decode += [("layer", None, 2), ("lm_head", None, 2)]
    assert frozen == spot + decode  # draft and verify at q = 1 share a shape's compilations
    # each shape released once, after its last use (one visit): the draft layer at q = 1 waits for the verify one
    assert sorted(released, key=str) == sorted(frozen, key=str) and len(set(released)) == len(released)
    assert released.index(("layer", None, 1)) > released.index(("exit_head", None, 1))
    assert all(r.median_us > 0 for r in profile.records)


def test_the_policys_round_costs_are_costed_where_the_engine_costs_the_passes(tmp_path: Path) -> None:
    """Beta-TS weighs round costs from the profile: with a static cache attended whole, at its slots (256), not at
    the prompt's context (47), as the engine costs each pass."""
    from sim.cost import round_costs

    plan = build_plan(load_points(scenario(tmp_path, relabelled(tmp_path, kernels="frozen")))[0])
    latency = plan.stages[0].latency
    seen: list[tuple[str, int]] = []
    real = latency.time_us

    def spy(component: str, phase: str, q: int, context_len: int, batch: int) -> float:
        seen.append((phase, context_len))
        return real(component, phase, q, context_len, batch)

    latency.time_us = spy
    round_costs(plan, 3)
    assert seen and {context for phase, context in seen if phase != "prefill"} == {256}


def test_a_component_runs_eagerly_before_it_is_frozen(monkeypatch) -> None:
    """As the executor's prefill runs before its passes compile: frozen cold, a Gemma-3-270m layer stack ran twice as
    slow (docs/results/cpu.md)."""
    import calibrate.latency as latency

    order: list[str] = []

    def compile_(fn, **options):
        order.append("compile")
        return lambda: order.append("compiled call")

    monkeypatch.setattr(torch, "compile", compile_)
    latency._freeze(lambda: order.append("eager call"))
    assert order == ["eager call", "compile", "compiled call"]


def test_the_smollm2_buckets_validation_ranks_the_settings_as_measured() -> None:
    """The shipped SmolLM2 frozen scenario plans heuristic drafting on bucket passes and on a pass per k, each decode
    query inside its q = 1..9 profile; the committed `eesd validate` of it (the EPYC box, one process) has every point
    within 6% of the executor and both simulator and executor find buckets slower on this profile."""
    path = ROOT / "scenarios" / "smollm2_cpu_frozen_buckets.yaml"
    plans = {p.values["verify_buckets"]: build_plan(p) for p in load_points(path)}
    assert plans[True].verify_widths[:9] == (0, 1, 2, 4, 4, 8, 8, 8, 8) and plans[False].verify_widths == ()
    assert plans[True].stages[0].latency.frozen and plans[True].cache_slots == 256
    report = json.loads((ROOT / "benchmarks" / "results" / "validate_smollm2-135m_cpu_frozen_buckets.json").read_text())
    rows = {row["point"]: row for row in report["rows"]}
    assert all(abs(row["tokens_per_s_error"]) < 0.06 for row in rows.values())
    bucketed, own = rows["eesd E=7 heuristic"], rows["eesd E=7 heuristic unbucketed"]
    assert bucketed["executor_tokens_per_s"] < own["executor_tokens_per_s"]
    assert bucketed["sim_tokens_per_s"] < own["sim_tokens_per_s"]
