"""benchmarks/gpu_decode.py's machinery on a tiny model on the CPU: a GPU lease is short, so the script it runs must
not break there. Rows, profiled ideals (EESD's and PPSD's), speedups, `--only` and argument errors, the CPU smoke
path end to end (HF's baselines beside ours on the same prompts and token counts, the spread, the memory floors, the
step rows); no figure here is a claim (the CPU times a tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from tiny_models import TinySpec, scale_late_layers, tiny_model

from executor.adapter import ModelAdapter
from executor.heads import resolve_head

PROMPT = [5, 17, 2, 40, 33]
PROMPTS = [PROMPT]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("gpu_decode")


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    return ModelAdapter(scale_late_layers(tiny_model(TinySpec(num_layers=4, seed=2), torch.float32), 2, 0.3))


def test_ppsd_rows_carry_the_profiled_and_the_formula_ideal(bench, adapter) -> None:
    """On a CPU the PPSD case runs the sequential backend; its ideal comes from each stage's own pass timed alone:
    decoded tokens x c_ar / (ticks x the slowest stage)."""
    case = bench.ppsd_case(adapter, PROMPTS, 12, 2, adapter.device, "none")
    assert case.method == "ppsd sequential n=2" and not case.skip
    row = bench.measure("tiny", case, 5, adapter.device)
    costs = row.pass_costs_ms
    assert row.tokens_per_s > 0 and row.first_call_s > 0
    assert {"ar", "stage 1", "stage 2", "device per tick", "host per tick"} <= set(costs)
    _, stats = case.run(0)
    tick = max(costs["stage 1"], costs["stage 2"])
    assert row.ideal_speedup == pytest.approx((stats.new_tokens - 1) * costs["ar"] / (stats.ticks * tick))
    assert row.formula_ideal == pytest.approx(stats.ideal_speedup)
    ar = bench.measure("tiny", bench.ours_case(adapter, PROMPTS, 12, "ours ar", method="ar", capture="none"), 5,
                       adapter.device)  # fmt: skip
    bench.add_speedups([ar, row])
    # against ticks as long as measured (sequential: the stages that held a token, one after the other)
    assert row.tick_efficiency == pytest.approx(row.efficiency * costs["device per tick"] / tick)
    assert f"| {row.tick_efficiency:.2f} | {row.formula_ideal:.2f} |" in bench.table([ar, row])


def test_eesd_efficiency_is_against_its_profiled_ideal(bench, adapter) -> None:
    head = resolve_head("shared", adapter, 2)
    ar = bench.measure("tiny", bench.ours_case(adapter, PROMPTS, 12, "ours ar", method="ar", capture="none"), 5,
                       adapter.device)  # fmt: skip
    case = bench.eesd_case(adapter, PROMPTS, 12, "eesd shared E=2 fixed:2", 2, head, "fixed:2", "none")
    eesd = bench.measure("tiny", case, 5, adapter.device)
    rows = [ar, eesd]
    bench.add_speedups(rows)
    assert {"ar", "draft", "verify q=3"} <= set(eesd.pass_costs_ms)
    assert eesd.efficiency == pytest.approx(eesd.speedup_vs_ar / eesd.ideal_speedup)
    assert "| eesd shared E=2 fixed:2 | none |" in bench.table(rows)


def test_a_trained_heads_zero_rounds_cost_its_chained_ar_step(bench, adapter, monkeypatch) -> None:
    """With a head of its own layer, a round that drafts nothing runs as `Passes.ar_head` (the AR step that also runs
    the head's layer): the ideal prices such rounds at that pass's profiled cost, drafting rounds at theirs."""
    from scripted_policy import ScriptedPolicy

    import executor.api
    from executor.heads import TrainedExitHead

    script = [0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    monkeypatch.setattr(executor.api, "make_policy", lambda spec, **kw: ScriptedPolicy(script))
    head = TrainedExitHead(adapter, 2).requires_grad_(False)
    case = bench.eesd_case(adapter, PROMPTS, 12, "eesd trained E=2 beta-ts", 2, head, "beta-ts", "none")
    _, stats = case.run(0)
    ideal, costs = case.ideal(stats)
    assert stats.drafted[:3] == [0, 0, 2] and 0 in stats.drafted[3:]
    assert {"ar", "ar_head", "draft", "verify q=3"} <= set(costs) and "verify q=1" not in costs
    spent = sum(costs["ar_head"] if d == 0 else d * costs["draft"] + costs[f"verify q={d + 1}"] for d in stats.drafted)
    assert ideal == pytest.approx(sum(a + 1 for a in stats.accepted) * costs["ar"] / spent)


def test_the_7b_cases_include_ppsd_at_each_stage_count(bench, adapter) -> None:
    """The 7B shape's table has PPSD rows at n = 2 and 4 (`ppsd streams n=K` on a GPU, the reference backend here), in
    the first capture mode, and one of them decodes."""
    args = bench.parse_args(["--device", "cpu", "--new-tokens", "8"])
    baselines, cases = bench.llama7b_cases(adapter.model, PROMPTS, args)
    assert [c.method for c in baselines if not c.method.startswith("ours ar ")] == [
        "ours ar",
        bench.HF_AR,
        bench.HF_FAST,
    ]
    ppsd = [c for c in cases if c.method.startswith("ppsd")]
    assert [c.method for c in ppsd] == [f"ppsd sequential n={n}" for n in bench.PPSD_STAGES]
    assert {c.capture for c in ppsd} == {"none"}
    row = bench.measure("tiny", ppsd[-1], 5, adapter.device)
    assert row.tokens_per_s > 0 and {"stage 1", "stage 4", "device per tick"} <= set(row.pass_costs_ms)


def test_without_the_default_trained_head_its_rows_are_left_out(bench, adapter, monkeypatch, tmp_path) -> None:
    """A device call that leaves heads/ behind still runs the other SmolLM2 rows; a head file named and missing is
    an error before any work, not a silent fallback."""
    monkeypatch.setattr(bench, "HEAD_FILE", tmp_path / "absent.safetensors")
    args = bench.parse_args(["--device", "cpu", "--exit-layer", "2", "--trained-head", str(bench.HEAD_FILE)])
    first, _ = bench.smollm2_cases(adapter.model, PROMPTS, args)
    labels = [c.method for c in first]
    assert "eesd shared E=2 beta-ts" in labels and not [label for label in labels if "trained" in label]
    missing = str(tmp_path / "other.safetensors")
    with pytest.raises(SystemExit, match="error: --trained-head .*other.safetensors: no such file"):
        bench.parse_args(["--device", "cpu", "--exit-layer", "2", "--trained-head", missing])


def test_only_keeps_the_matching_cases(bench, adapter) -> None:
    args = bench.parse_args(["--device", "cpu", "--only", "^ours ar$|^ppsd"])
    cases = [bench.ppsd_case(adapter, PROMPTS, 4, n, adapter.device, "none") for n in (2, 4)]
    cases += bench.ar_cases(adapter, PROMPTS, 4, ["none"], every_token=False)
    cases.append(bench.hf_case(adapter.model, PROMPTS, 4, "hf generate (AR)"))
    assert [c.method for c in bench.selected(cases, args)] == ["ppsd sequential n=2", "ppsd sequential n=4", "ours ar"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--only", "(unclosed"], "--only is not a regular expression"),
        (["--captures", "graph,fast"], "--captures must name none, graph, compile and/or compile-layers"),
        (["--prompts", "2", "--runs", "2"], "--runs x --prompts must be >= 5"),
        (["--prompts", "0"], "--prompts must be >= 1, got 0"),
        (["--prompt-len", "3968"], "--prompt-len must be in [1, 3967]"),
    ],
)
def test_bad_arguments_exit_with_a_message(bench, capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unfused_rows_run_with_fusion_off_and_restore_it(bench) -> None:
    from executor import passes

    case = bench.Case("ours ar", lambda i: (passes.FUSE_CAPTURED, None), capture="graph")
    assert bench.unfused(case).run(0) == (False, None)
    assert passes.FUSE_CAPTURED and case.run(0) == (True, None)


def test_the_hbm_floor_counts_the_cached_keys_and_values(bench) -> None:
    """A decode step reads the weights and the K/V of every cached position: at the 7B shape's 4k context the cache
    is 2 GiB next to 12.3 GiB of weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    weights = sum(p.numel() for p in model.parameters()) - 64 * 32  # the embedding's rows aside
    per_position = 2 * 2 * 2 * 8  # keys and values, 2 layers, 2 KV heads of 8 dims
    assert bench.hbm_floor(model, 1e-12) == pytest.approx(1 / (2 * weights))
    assert bench.hbm_floor(model, 1e-12, context=10) == pytest.approx(1 / (2 * weights + 10 * 2 * per_position))


def tiny_llama(num_layers: int, dtype: torch.dtype, device: torch.device):
    """Stands in for the 7B shape (`llama2_7b_shape`'s signature): the same code paths on a model the CPU decodes in
    milliseconds, with Llama-2's 4096 positions for the long step cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory) -> dict:
    """The CPU smoke path (`--device cpu --quick --small --captures none`) on the tiny stand-in, the baselines and
    the step rows only (`--only`): its JSON."""
    import json

    out = tmp_path_factory.mktemp("smoke") / "smoke.json"
    real = bench.llama2_7b_shape
    bench.llama2_7b_shape = tiny_llama
    try:
        bench.main(["--device", "cpu", "--quick", "--small", "--captures", "none", "--models", "llama7b",
                    "--only", "^ours ar|^hf generate", "--out", str(out)])  # fmt: skip
    finally:
        bench.llama2_7b_shape = real
    return json.loads(out.read_text())


def test_smoke_rows_hf_and_ours_on_the_same_prompts_and_token_counts(bench, smoke) -> None:
    """HF as it comes and on its fast path sit beside our AR, each over the same 8 prompts, every run making the
    16 new tokens asked (EOS ignored on both sides); the spread is over those 8 runs, its median the row's."""
    rows = {r["method"]: r for r in smoke["rows"]}
    assert smoke["complete"] and smoke["prompts_per_row"] == 8 and smoke["new_tokens"] == 16
    for method in ("ours ar", bench.HF_AR, bench.HF_FAST):
        row = rows[method]
        assert row["prompts"] == 8 and len(row["runs_tokens_per_s"]) == 8 and row["new_tokens_made"] == [16]
        spread = row["spread_tokens_per_s"]
        assert spread["n"] == 8 and spread["min"] <= spread["q1"] <= spread["median"] <= spread["q3"] <= spread["max"]
        assert spread["median"] == pytest.approx(row["tokens_per_s"])
    assert (
        "did not compile" in rows[bench.HF_FAST]["note"]
        and "static cache of 256 positions" in rows[bench.HF_FAST]["note"]
    )
    assert rows["ours ar"]["speedup_vs_hf"] == pytest.approx(
        rows["ours ar"]["tokens_per_s"] / rows[bench.HF_AR]["tokens_per_s"]
    )
    assert rows["ours ar"]["speedup_vs_hf_fast"] == pytest.approx(
        rows["ours ar"]["tokens_per_s"] / rows[bench.HF_FAST]["tokens_per_s"]
    )


def test_smoke_floors_are_bandwidth_over_bytes_per_token(bench, smoke) -> None:
    """Every floor is bandwidth / (weight bytes + K/V bytes of its context), at the copy bandwidth measured in the run
    and at the datasheet's (none for a CPU); each AR row carries its context's floor and its fraction of it."""
    tbps = smoke["bandwidth_tbps"]
    assert tbps["copy"] > 0 and tbps["datasheet"] is None
    model = tiny_llama(4, torch.bfloat16, torch.device("cpu"))
    for floor in smoke["floors"]:
        assert floor["bytes_per_token"] == floor["weight_bytes"] + floor["kv_bytes"]
        assert floor["kv_bytes"] == pytest.approx(2 * 4 * 2 * 8 * floor["context"] * 2)  # K+V, 4 layers, 2 heads of 8
        assert floor["tokens_per_s"]["copy"] == pytest.approx(tbps["copy"] * 1e12 / floor["bytes_per_token"])
        assert floor["tokens_per_s"]["copy"] == pytest.approx(bench.hbm_floor(model, tbps["copy"], floor["context"]))
        assert floor["tokens_per_s"]["datasheet"] is None
    ar_rows = [r for r in smoke["rows"] if r["method"].startswith("ours ar")]
    assert ar_rows and {r["context"] for r in ar_rows} == {f["context"] for f in smoke["floors"]}
    for row in ar_rows:
        floor = next(f for f in smoke["floors"] if f["context"] == row["context"])
        assert row["floor_tokens_per_s"] == floor["tokens_per_s"]
        assert row["of_floor"] == {"copy": pytest.approx(row["decode_tokens_per_s"] / floor["tokens_per_s"]["copy"])}


def test_smoke_step_rows_time_one_context_in_a_short_and_a_long_cache(bench, smoke) -> None:
    """The step rows: the prompt's context (32) in the cache `generate` gives it (uncaptured: 32 + 20 + 1) and in a
    4096-slot one, both timed (and, where the executor has span buckets, each with them off too)."""
    steps = {r["method"]: r for r in smoke["rows"] if r["method"].startswith("ours ar step")}
    expected = {bench.step_label(32, capacity) for capacity in (53, 4096)}
    if bench.span_buckets_known():
        expected |= {bench.step_label(32, capacity, buckets=False) for capacity in (53, 4096)}
    assert set(steps) == expected
    for row in steps.values():
        assert row["tokens_per_s"] > 0 and row["context"] == 32 + bench.REPEATS / 2 and row["of_floor"]["copy"] > 0
        assert row["spread_tokens_per_s"]["n"] == bench.BATCHES and row["speedup_vs_hf"] is None


def test_datasheet_bandwidth_by_card_name(bench, monkeypatch) -> None:
    cuda = torch.device("cuda")
    for name, tbps in [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H200", 4.8), ("NVIDIA H100 PCIe", None),
                       ("NVIDIA A100-SXM4-80GB", None)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bench.datasheet_tbps(cuda) == tbps
    assert bench.datasheet_tbps(torch.device("cpu")) is None


def test_a_run_that_makes_another_token_count_says_so(bench) -> None:
    case = bench.Case("hf generate (AR)", lambda i: (7 + i, None), prompts=2, new_tokens=8)
    row = bench.measure("tiny", case, 3, torch.device("cpu"))
    assert row.new_tokens_made == [7, 8] and "made [7, 8] new tokens, asked 8" in row.note


def test_issue24_predictions_name_the_runbooks_commands() -> None:
    """Every committed issue-24 prediction names a gpu_decode command whose --only pattern the runbook runs, and the
    file says when, from which commit and with which command it was made."""
    import json

    path = ROOT / "benchmarks" / "results" / "predictions_issue24_2026-12-03.json"
    document = json.loads(path.read_text())
    runbook = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    assert document["command"].startswith("python benchmarks/sim_vs_gpu.py --predict issue24")
    assert document["code_commit"] and document["code_commit_date"] and document["date"] == "2026-12-03"
    cards = {row["card"] for row in document["rows"]}
    assert cards == {"h100", "h200"}
    for row in document["rows"]:
        only = row["measure"].split("--only ", 1)[1].strip("'")
        assert f"'{only}'" in runbook, row
        assert row["predicted_decode_tokens_per_s"] > 0
    configs = {(row["card"], row["config"]) for row in document["rows"]}
    for card, config in configs:  # every bucketed AR row has its buckets-off twin predicted too
        if config.startswith("ours ar") and not config.endswith(" buckets off"):
            assert (card, config + " buckets off") in configs, config


def test_the_simulated_step_rows_launch_what_the_bench_launches(bench) -> None:
    assert load_benchmark("sim_vs_gpu").STEP_LAUNCHES == bench.REPEATS


def test_rows_warm_up_on_two_prompts_before_timing_every_prompt(bench) -> None:
    """A compiled prefill recompiles for dynamic lengths at its second prompt length: that happens in the warm-up."""
    ran: list[int] = []

    def run(prompt: int) -> tuple[int, None]:
        ran.append(prompt)
        return 4, None

    timing = bench.time_case(bench.Case("fake", run, prompts=3), 2, torch.device("cpu"))
    assert ran == [0, 1, 0, 1, 2, 0, 1, 2] and len(timing.speeds) == 6 and timing.first_call >= 0


def test_the_real_models_rows_are_named_after_it(bench) -> None:
    assert bench.real_model_name("smollm2-135m") == bench.real_model_name("/tmp/smollm2-135m.gguf") == "SmolLM2-135M"
    assert bench.real_model_name("qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b"
    assert bench.real_model_name("/tmp/qwen2.5-coder-0.5b.gguf") == "qwen2.5-coder-0.5b"


def test_humaneval_prompts_are_its_held_out_split(bench) -> None:
    from executor.prompts import load_prompts, split_prompts

    held = split_prompts(load_prompts("humaneval")).held_out
    assert bench.prompt_texts("humaneval") == [p.text for p in held] and len(held) == 41
    assert bench.prompt_texts("builtin")[0] == load_prompts("builtin")[0].text
