"""benchmarks/head_eval.py on a tiny model: a trained head scored on a held-out corpus as training scores it, and a
corpus of the training split refused unless asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from test_corpus import char_tokenizer
from tiny_models import TinySpec, tiny_model

from executor.corpus import CorpusConfig, RecordSource, build_corpus
from executor.models import load_model
from executor.train_head import TrainConfig, agreement_interval, evaluate, train_head_corpus

ROOT = Path(__file__).resolve().parents[1]
SPEC = TinySpec(num_layers=4, num_heads=2, num_kv_heads=1, head_dim=8, vocab=98, seed=11)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("head_eval")  # it imports head_speed as a sibling


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root, tokenizer = tmp_path_factory.mktemp("head_eval"), char_tokenizer()
    model = tiny_model(SPEC, torch.float32)
    model.save_pretrained(root / "model")
    common = dict(sources=("self",), max_new_tokens=8, batch_size=8, temperatures=(0.0,))  # fmt: skip
    train, held = CorpusConfig(**common, max_prompts=8), CorpusConfig(**common, split="held-out", max_prompts=4)
    build_corpus(model, tokenizer, train, root / "train", model_name="t", progress=False)
    build_corpus(model, tokenizer, held, root / "held", model_name="t", progress=False)
    config = TrainConfig(exit_layer=2, steps=3, batch_size=4, window=32, lr=1e-3)
    train_head_corpus(model, root / "train", config, root / "head.safetensors", progress=False)
    return {"root": root, "model": root / "model", "train": root / "train", "held": root / "held",
            "head": root / "head.safetensors"}  # fmt: skip


def test_a_head_is_scored_on_a_held_out_corpus_as_training_scores_it(bench, setup) -> None:
    out = setup["root"] / "report.json"
    argv = ["--model", str(setup["model"]), "--heads", str(setup["head"]), "--corpus", str(setup["held"]),
            "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    from executor.heads import load_head
    from executor.models import load_model

    model = load_model(str(setup["model"]), dtype=torch.float32)
    head = load_head(setup["head"], model).eval()
    with torch.no_grad():
        expected = evaluate({2: head}, RecordSource(setup["held"]), TrainConfig(exit_layer=2, batch_size=8, window=32))
    assert json.loads(out.read_text())["window"] == 32  # the head's own training window, from its metadata
    assert row["split"] == "held-out" and row["exit_layer"] == 2
    assert row["agreement"] == pytest.approx(expected[2]["agreement"]) and row["eval_positions"] > 0


def test_a_training_corpus_is_refused_unless_asked_for(bench, setup) -> None:
    argv = ["--model", str(setup["model"]), "--heads", str(setup["head"]), "--corpus", str(setup["train"]),
            "--out", str(setup["root"] / "train.json")]  # fmt: skip
    with pytest.raises(SystemExit, match="built from the 'train' split"):
        bench.main(argv)
    assert bench.main([*argv, "--allow-train"]) == 0
    with pytest.raises(SystemExit, match="error: .*missing.safetensors"):
        bench.main([*argv[:2], "--heads", str(setup["root"] / "missing.safetensors"), *argv[4:], "--allow-train"])


def test_by_kind_splits_the_corpus_by_prompt_kind_and_the_parts_add_up(bench, setup) -> None:
    """Each kind of prompt scored apart: the parts' positions add up to the whole corpus's and its agreement is their
    position-weighted mean."""
    from executor.models import load_model

    held, out = setup["root"] / "held-all", setup["root"] / "kinds.json"  # every held-out prompt: all four kinds
    config = CorpusConfig(sources=("self",), max_new_tokens=4, batch_size=20, temperatures=(0.0,), split="held-out")
    build_corpus(load_model(str(setup["model"]), dtype=torch.float32), char_tokenizer(), config, held, model_name="t",
                 progress=False)  # fmt: skip
    argv = ["--model", str(setup["model"]), "--heads", str(setup["head"]), "--corpus", str(held), "--by-kind",
            "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    whole, parts = rows[0], rows[1:]
    assert whole["kind"] == "all" and [r["kind"] for r in parts] == ["chat", "code", "explanation", "math"]
    assert sum(r["eval_positions"] for r in parts) == whole["eval_positions"]
    mean = sum(r["agreement"] * r["eval_positions"] for r in parts) / whole["eval_positions"]
    assert mean == pytest.approx(whole["agreement"])


def test_baseline_comparison_is_the_paired_difference_with_intervals_around_it(bench, setup) -> None:
    other = setup["root"] / "head-longer.safetensors"
    config = TrainConfig(exit_layer=2, steps=8, batch_size=4, window=32, lr=3e-3)
    train_head_corpus(load_model(str(setup["model"]), dtype=torch.float32), setup["train"], config, other,
                      progress=False)  # fmt: skip
    out = setup["root"] / "compare.json"
    argv = ["--model", str(setup["model"]), "--heads", str(other), "--baseline", str(setup["head"]), "--corpus",
            str(setup["held"]), "--draws", "300", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    rows = {Path(r["head"]).name: r for r in report["rows"]}
    assert set(rows) == {"head.safetensors", "head-longer.safetensors"}  # the baseline is scored too
    for row in rows.values():
        low, high = row["agreement_ci95"]
        assert low <= row["agreement"] <= high and row["windows"] > 1
    (comparison,) = report["comparisons"]
    delta = rows["head-longer.safetensors"]["agreement"] - rows["head.safetensors"]["agreement"]
    assert comparison["delta_agreement"] == pytest.approx(delta)
    assert Path(comparison["baseline"]).name == "head.safetensors"
    low, high = comparison["delta_ci95"]
    assert low <= delta <= high and report["bootstrap"]["draws"] == 300


def test_agreement_interval_resamples_whole_windows_and_pairs_them() -> None:
    # four answers of 100 positions, two drafted right throughout and two wrong throughout: the positions of one
    # answer are not independent, so the interval is wide (resampling positions would give about +-0.1)
    windows = [(100, 100), (0, 100), (100, 100), (0, 100)]
    low, high = agreement_interval(windows, draws=2000)
    assert low <= 0.25 and high >= 0.75
    many = windows * 25
    narrow = agreement_interval(many, draws=2000)
    assert 0.3 < narrow[0] < 0.5 < narrow[1] < 0.7
    assert agreement_interval(windows, windows) == (0.0, 0.0)  # a head against itself: no difference at all
    # ten more hits than the baseline on every window: the paired difference is 0.1 whatever the draw, though the two
    # heads' own intervals overlap widely
    baseline, better = [(90, 100), (0, 100)] * 2, [(100, 100), (10, 100)] * 2
    assert agreement_interval(better, baseline) == pytest.approx((0.1, 0.1))
    assert agreement_interval(better)[0] < agreement_interval(baseline)[1]
    assert agreement_interval([*windows, (0, 0)], [*windows, (0, 0)]) == (0.0, 0.0)  # empty windows are left out
    with pytest.raises(ValueError, match="same corpus"):
        agreement_interval(windows, windows[:3])


def test_the_kind_of_a_record_comes_from_its_prompt(bench) -> None:
    from executor.corpus import Record

    def record(prompt_id: str | None, source: str = "self") -> Record:
        return Record("r", source, [1, 2], 1, {} if prompt_id is None else {"prompt_id": prompt_id})

    assert bench.kind_of(record("builtin/code-03")) == "code"
    assert bench.kind_of(record("builtin/explanation-19")) == "explanation"
    assert bench.kind_of(record("topic/045/q0", "self-prompts")) == "topic"
    assert bench.kind_of(record(None, "text")) == "text"


def test_tables_name_heads_by_as_much_of_their_path_as_tells_them_apart(bench) -> None:
    names = bench.short_names(["runs/a/head.safetensors", "runs/b/head.safetensors", "heads/x.safetensors"])
    assert names == {"runs/a/head.safetensors": "a/head.safetensors", "runs/b/head.safetensors": "b/head.safetensors",
                     "heads/x.safetensors": "x.safetensors"}  # fmt: skip
    assert bench.short_names(["c/one", "c/two", "c/one"]) == {"c/one": "one", "c/two": "two"}
