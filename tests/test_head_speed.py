"""benchmarks/head_speed.py's core on a tiny random model: every configuration decodes AR's tokens, the rows carry
what the report promises, and the JSON holds the run's environment. No figure here is a claim (a tiny model)."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_scripts import load_benchmark
from tiny_models import TinySpec, scale_late_layers, tiny_model

from executor.decoding import GenerationStats

PROMPT = [5, 17, 2, 40, 33]
ENVIRONMENT = ("device", "dtype", "threads", "torch", "transformers", "date", "command")
ROW_FIELDS = ("config", "decode_tokens_per_s", "decode_tokens_per_s_min", "decode_tokens_per_s_max",
              "decode_tokens_per_s_q1", "decode_tokens_per_s_q3", "tokens_per_round", "acceptance", "speedup",
              "paired_speedup", "identical", "runs")  # fmt: skip


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("head_speed")


@pytest.fixture(scope="module")
def report(bench) -> dict:
    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, seed=2), torch.float32), 2, 0.3)
    settings = bench.Settings(heads=("shared", "shared:64"), policies=("beta-ts", "fixed:1", "fixed:2"), exit_layer=2,
                              new_tokens=10, repeats=2, warmup=0)  # fmt: skip
    return bench.run_benchmark(model, [PROMPT], settings, threads=1)


def test_every_configuration_decodes_ar_tokens(report) -> None:
    rows = {row["config"]: row for row in report["rows"]}
    assert len(rows) == 1 + 2 * 3 + 2  # AR, EESD per head and policy, PPSD per head
    assert all(row["identical"] for row in rows.values()), [r for r in rows.values() if not r["identical"]]
    assert all(row["runs"] == 2 for row in rows.values())
    assert rows["AR"]["speedup"] == 1.0 and rows["AR"]["acceptance"] is None
    ppsd = rows["PPSD seq n=2 shared E=2"]
    assert ppsd["round_unit"] == "tick" and 0 < ppsd["tokens_per_round"] <= 1
    eesd = rows["EESD shared E=2 fixed:2"]
    assert eesd["round_unit"] == "round" and 1 <= eesd["tokens_per_round"] <= 3 and 0 <= eesd["acceptance"] <= 1


def test_rows_and_json_fields(bench, report, tmp_path) -> None:
    path = bench.write_json(tmp_path / "head_speed_tiny.json", report)
    saved = json.loads(path.read_text())
    assert not list(tmp_path.glob("*.partial"))
    assert all(key in saved for key in ENVIRONMENT + ("load_average_1_5_15_before", "load_average_1_5_15_after"))
    assert saved["dtype"] == "float32" and saved["threads"] == 1
    for row in saved["rows"]:
        assert all(key in row for key in ROW_FIELDS)
        assert row["decode_tokens_per_s_min"] <= row["decode_tokens_per_s"] <= row["decode_tokens_per_s_max"]
        assert row["decode_tokens_per_s_q1"] <= row["decode_tokens_per_s_q3"]
    best = [r for r in saved["rows"] if r["best_fixed"]]
    assert {f"{r['head']}@{r['exit_layer']}" for r in best} == {"shared@2", "shared:64@2"}
    assert saved["best_fixed_k"]["shared@2"] in (1, 2)
    assert "configuration" in bench.table(saved["rows"]).splitlines()[0]


def test_a_differing_output_is_not_identical(bench) -> None:
    tally = bench.Tally()
    stats = GenerationStats(method="eesd", new_tokens=5, drafted=[2, 2], accepted=[2, 0])
    tally.add(stats, 10.0, 5.0, True)
    tally.add(stats, 20.0, 5.0, False)
    assert not tally.identical and tally.paired == [2.0, 4.0] and (tally.tokens, tally.units) == (8, 4)


def test_ppsd_stage_one_ends_at_a_deep_exit(bench) -> None:
    assert bench.stage_cuts(30, 2, 8) == (15,)
    assert bench.stage_cuts(30, 2, 22) == (22,)
    assert bench.stage_cuts(30, 3, 20) == (20, 25)
    with pytest.raises(ValueError, match="--ppsd-stages 3: exit_layer 3 leaves 1 of 4 layers"):
        bench.stage_cuts(4, 3, 3)


def test_a_mistyped_policy_is_refused_before_any_run(bench) -> None:
    model = tiny_model(TinySpec(num_layers=2), torch.float32)
    with pytest.raises(ValueError, match="polic"):
        bench.run_benchmark(model, [PROMPT], bench.Settings(policies=("fixd:2",), repeats=1), threads=1)


def test_shared_heads_at_their_own_exit_layers_and_no_repeats(bench) -> None:
    adapter = bench.ModelAdapter(tiny_model(TinySpec(num_layers=4), torch.float32))
    heads = bench.load_heads(adapter, ["shared@1", "shared:64@3", "shared"], exit_layer=None)
    assert [(name, layer) for name, _, layer in heads] == [("shared", 1), ("shared:64", 3), ("shared", 2)]
    with pytest.raises(ValueError, match="whole exit layer"):
        bench.load_heads(adapter, ["shared@x"], exit_layer=None)
    with pytest.raises(ValueError, match="given twice"):
        bench.make_configs(adapter, bench.load_heads(adapter, ["shared@2", "shared"], None), ["fixed:1"], 0)


def test_frozen_warm_up_compiles_every_verify_width_a_run_can_meet(bench) -> None:
    """A frozen EESD configuration warms up on a full run and on runs of 2 .. k + 2 tokens (first rounds drafting
    0 .. k), so no pass compiles inside a timed run; uncaptured, one short run."""
    frozen = bench.Config("eesd", "shared", None, 2, "fixed:2", capture="freeze")
    assert bench.warm_lengths(frozen, 64) == [64, 2, 3, 4]
    assert bench.warm_lengths(bench.Config("ar", capture="freeze"), 64) == [64, 2]
    assert bench.warm_lengths(bench.Config("eesd", "shared", None, 2, "fixed:2"), 64) == [8]
