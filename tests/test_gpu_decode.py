"""benchmarks/gpu_decode.py's machinery on a tiny model on the CPU: a GPU lease is short, so the script it runs must
not break there. Rows, profiled ideals (EESD's and PPSD's), speedups, `--only` and argument errors; no figure here
is a claim (the CPU times a tiny model)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TinySpec, scale_late_layers, tiny_model

from executor.adapter import ModelAdapter
from executor.heads import resolve_head

PROMPT = [5, 17, 2, 40, 33]


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_decode.py"
    spec = importlib.util.spec_from_file_location("gpu_decode", path)
    module = sys.modules["gpu_decode"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    return ModelAdapter(scale_late_layers(tiny_model(TinySpec(num_layers=4, seed=2), torch.float32), 2, 0.3))


def test_ppsd_rows_carry_the_profiled_and_the_formula_ideal(bench, adapter) -> None:
    """On a CPU the PPSD case runs the sequential backend; its ideal comes from each stage's own pass timed alone:
    decoded tokens x c_ar / (ticks x the slowest stage)."""
    case = bench.ppsd_case(adapter, PROMPT, 12, 2, adapter.device, "none")
    assert case.method == "ppsd sequential n=2" and not case.skip
    row = bench.measure("tiny", case, 5, adapter.device)
    costs = row.pass_costs_ms
    assert row.tokens_per_s > 0 and row.first_call_s > 0
    assert {"ar", "stage 1", "stage 2", "device per tick", "host per tick"} <= set(costs)
    _, stats = case.run()
    tick = max(costs["stage 1"], costs["stage 2"])
    assert row.ideal_speedup == pytest.approx((stats.new_tokens - 1) * costs["ar"] / (stats.ticks * tick))
    assert row.formula_ideal == pytest.approx(stats.ideal_speedup)
    ar = bench.measure("tiny", bench.ours_case(adapter, PROMPT, 12, "ours ar", method="ar", capture="none"), 5,
                       adapter.device)  # fmt: skip
    bench.add_speedups([ar, row])
    # against ticks as long as measured (sequential: the stages that held a token, one after the other)
    assert row.tick_efficiency == pytest.approx(row.efficiency * costs["device per tick"] / tick)
    assert f"| {row.tick_efficiency:.2f} | {row.formula_ideal:.2f} |" in bench.table([ar, row])


def test_eesd_efficiency_is_against_its_profiled_ideal(bench, adapter) -> None:
    head = resolve_head("shared", adapter, 2)
    ar = bench.measure("tiny", bench.ours_case(adapter, PROMPT, 12, "ours ar", method="ar", capture="none"), 5,
                       adapter.device)  # fmt: skip
    case = bench.eesd_case(adapter, PROMPT, 12, "eesd shared E=2 fixed:2", 2, head, "fixed:2", "none")
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
    case = bench.eesd_case(adapter, PROMPT, 12, "eesd trained E=2 beta-ts", 2, head, "beta-ts", "none")
    _, stats = case.run()
    ideal, costs = case.ideal(stats)
    assert stats.drafted[:3] == [0, 0, 2] and 0 in stats.drafted[3:]
    assert {"ar", "ar_head", "draft", "verify q=3"} <= set(costs) and "verify q=1" not in costs
    spent = sum(costs["ar_head"] if d == 0 else d * costs["draft"] + costs[f"verify q={d + 1}"] for d in stats.drafted)
    assert ideal == pytest.approx(sum(a + 1 for a in stats.accepted) * costs["ar"] / spent)


def test_the_7b_cases_include_ppsd_at_each_stage_count(bench, adapter) -> None:
    """The 7B shape's table has PPSD rows at n = 2 and 4 (`ppsd streams n=K` on a GPU, the reference backend here), in
    the first capture mode, and one of them decodes."""
    args = bench.parse_args(["--device", "cpu", "--new-tokens", "8"])
    cases = bench.llama7b_cases(adapter.model, PROMPT, args)
    ppsd = [c for c in cases if c.method.startswith("ppsd")]
    assert [c.method for c in ppsd] == [f"ppsd sequential n={n}" for n in bench.PPSD_STAGES]
    assert {c.capture for c in ppsd} == {"none"}
    row = bench.measure("tiny", ppsd[-1], 5, adapter.device)
    assert row.tokens_per_s > 0 and {"stage 1", "stage 4", "device per tick"} <= set(row.pass_costs_ms)


def test_only_keeps_the_matching_cases(bench, adapter) -> None:
    args = bench.parse_args(["--device", "cpu", "--only", "^ours ar$|^ppsd"])
    cases = [bench.ppsd_case(adapter, PROMPT, 4, n, adapter.device, "none") for n in (2, 4)]
    cases += bench.ar_cases(adapter, PROMPT, 4, ["none"], every_token=False)
    cases.append(bench.hf_case(adapter.model, PROMPT, 4, "hf generate (AR)"))
    assert [c.method for c in bench.selected(cases, args)] == ["ppsd sequential n=2", "ppsd sequential n=4", "ours ar"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--only", "(unclosed"], "--only is not a regular expression"),
        (["--captures", "graph,fast"], "--captures must name none, graph, compile and/or compile-layers"),
        (["--runs", "3"], "--runs must be >= 5"),
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

    case = bench.Case("ours ar", lambda: (passes.FUSE_CAPTURED, None), capture="graph")
    assert bench.unfused(case).run() == (False, None)
    assert passes.FUSE_CAPTURED and case.run() == (True, None)


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
