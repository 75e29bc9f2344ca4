"""Streaming self-distillation (`executor.train_head`): the teacher runs per batch and nothing of the corpus's
targets accumulates, an interrupted and resumed run is bit-identical, heads trained together equal heads trained
alone, and the held-out evaluation's CSV holds what EESD would measure."""

from __future__ import annotations

import contextlib
import csv
import weakref
from pathlib import Path

import pytest
import torch
from test_corpus import char_tokenizer
from tiny_models import TinySpec, scale_late_layers, tiny_model

import executor.train_head as train_head
from calibrate.acceptance import predicted_accepted
from executor.adapter import ModelAdapter
from executor.corpus import CorpusConfig, Record, RecordSource, build_corpus, manifest_sha256, record_windows
from executor.heads import TrainedExitHead, load_head
from executor.train_head import (
    EVAL_COLUMNS,
    Corpus,
    TrainConfig,
    agreement,
    draft_logits,
    eval_csv_path,
    evaluate,
    lr_at,
    teacher_examples,
    train_head_corpus,
)

SPEC = TinySpec(num_layers=4, num_heads=2, num_kv_heads=1, head_dim=8, vocab=98, seed=11)
STEPS = 12


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return tiny_model(SPEC, torch.float64)


@pytest.fixture(scope="module")
def corpora(tiny, tmp_path_factory) -> dict[str, Path]:
    """A training corpus (train prompts, greedy and sampled) and a held-out one (held-out prompts, greedy)."""
    root, tokenizer = tmp_path_factory.mktemp("corpora"), char_tokenizer()
    common = dict(sources=("self",), max_new_tokens=10, batch_size=8, shard_records=10)  # fmt: skip
    train = CorpusConfig(**common, max_prompts=12, temperatures=(0.0, 1.0), samples=2)
    held = CorpusConfig(**common, split="held-out", max_prompts=6, temperatures=(0.0,))
    build_corpus(tiny, tokenizer, train, root / "train", model_name="tiny", progress=False)
    build_corpus(tiny, tokenizer, held, root / "held", model_name="tiny", progress=False)
    return {"train": root / "train", "held": root / "held"}


def config(**overrides) -> TrainConfig:
    settings = dict(exit_layer=2, steps=STEPS, lr=2e-3, batch_size=4, seed=7, checkpoint_every=4, schedule="cosine",
                    warmup_steps=3, window=48, eval_every=5, draft_len=3, logit_chunk=16)  # fmt: skip
    return TrainConfig(**(settings | overrides))


def same_heads(a: dict[int, TrainedExitHead], b: dict[int, TrainedExitHead]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[e].state_dict()[name], b[e].state_dict()[name]) for e in a for name in a[e].state_dict()
    )


def test_the_teacher_runs_per_batch_and_its_outputs_never_accumulate(tiny, corpora, tmp_path, monkeypatch) -> None:
    source = RecordSource(corpora["train"])
    windows = sum(len(record_windows(r, 48)) for s in range(len(source.shards)) for r in source.read(s))
    assert windows >= 6 * 4  # the corpus is many batches
    steps = 2 * -(-windows // 4)  # two epochs
    calls, alive, peak = [], [], [0]
    real = train_head.teacher_batch

    def counting(adapter, batch, exit_layers):
        peak[0] = max(peak[0], sum(ref() is not None for ref in alive))
        out = real(adapter, batch, exit_layers)
        calls.append(batch.tokens.shape)
        alive.extend(weakref.ref(t) for t in (out, out.final, out.mask, *out.states.values()))
        return out

    monkeypatch.setattr(train_head, "teacher_batch", counting)
    out = tmp_path / "h.safetensors"
    _, state = train_head_corpus(tiny, corpora["train"], config(steps=steps, eval_every=0), out, progress=False)
    assert len(calls) == steps == state.step and state.epoch == 1
    assert all(shape[0] <= 4 and shape[1] <= 48 for shape in calls)
    assert peak[0] == 0  # every earlier batch's teacher outputs were freed (by reference count) before the next pass
    assert state.tokens_seen > 0 and state.targets_seen <= state.tokens_seen


def test_an_interrupted_run_resumes_bit_identically(tiny, corpora, tmp_path, monkeypatch) -> None:
    kwargs = dict(eval_corpus=corpora["held"], progress=False)
    straight, straight_state = train_head_corpus(tiny, corpora["train"], config(), tmp_path / "a.safetensors", **kwargs)
    real = train_head.train_step

    def interrupted(heads, optimizers, batch, cfg, step):
        if step == 9:  # after the checkpoint at step 8, mid-epoch
            raise KeyboardInterrupt
        return real(heads, optimizers, batch, cfg, step)

    monkeypatch.setattr(train_head, "train_step", interrupted)
    out = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt, match=r"after step 9 of 12; .*b.safetensors.ckpt holds step 8: the same "
                       r"command with --resume goes on from there"):  # fmt: skip
        train_head_corpus(tiny, corpora["train"], config(), out, **kwargs)
    with pytest.raises(KeyboardInterrupt, match="after step 9 of 12; no checkpoint written yet .* nothing to resume"):
        train_head_corpus(tiny, corpora["train"], config(checkpoint_every=10), tmp_path / "c.safetensors", **kwargs)
    monkeypatch.setattr(train_head, "train_step", real)
    with pytest.raises(ValueError, match=r"other data or settings: eval_\w+ '.*', now None.*delete it to start over"):
        train_head_corpus(tiny, corpora["train"], config(), out, resume=True, progress=False)  # no eval corpus now
    resumed, state = train_head_corpus(tiny, corpora["train"], config(), out, resume=True, **kwargs)
    assert same_heads(straight, resumed)
    assert state.losses == straight_state.losses and state.tokens_seen == straight_state.tokens_seen
    assert eval_csv_path(out).read_text() == eval_csv_path(tmp_path / "a.safetensors").read_text()
    with pytest.raises(ValueError, match="steps=12, not 13"):  # a cosine schedule's length is part of the run
        train_head_corpus(tiny, corpora["train"], config(steps=13), out, resume=True, **kwargs)


def test_heads_trained_together_equal_heads_trained_alone(tiny, corpora, tmp_path) -> None:
    settings = dict(steps=6, eval_every=0, clip_norm=1e-3)  # clipping active: per head, as if alone
    together, _ = train_head_corpus(tiny, corpora["train"], config(exit_layer=1, exit_layers=(3,), **settings),
                                    tmp_path / "t-e{exit_layer}.safetensors", progress=False)  # fmt: skip
    for exit_layer in (1, 3):
        alone, _ = train_head_corpus(tiny, corpora["train"], config(exit_layer=exit_layer, **settings),
                                     tmp_path / f"a{exit_layer}.safetensors", progress=False)  # fmt: skip
        assert same_heads({exit_layer: together[exit_layer]}, alone)
    assert load_head(tmp_path / "t-e3.safetensors", tiny, 3).metadata["trained_with"] == "1,3"


def test_head_paths_fill_the_exit_layer_for_one_head_too(tmp_path) -> None:
    from executor.train_head import head_paths

    assert head_paths(tmp_path / "h-e{exit_layer}.safetensors", [7]) == {7: tmp_path / "h-e7.safetensors"}
    assert head_paths(tmp_path / "h.safetensors", [7]) == {7: tmp_path / "h.safetensors"}
    assert head_paths("e{exit_layer}/h{exit_layer}", [1, 3]) == {1: Path("e1/h1"), 3: Path("e3/h3")}
    with pytest.raises(ValueError, match=r"several exit layers need an output name with \{exit_layer\}"):
        head_paths(tmp_path / "h.safetensors", [1, 3])


def test_eval_csv_columns_values_and_head_metadata(tiny, corpora, tmp_path) -> None:
    out = tmp_path / "h.safetensors"
    _, state = train_head_corpus(tiny, corpora["train"], config(), out, eval_corpus=corpora["held"], progress=False)
    with open(eval_csv_path(out)) as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == EVAL_COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 5, 10, STEPS]
    assert [int(r["tokens_seen"]) for r in rows] == sorted(int(r["tokens_seen"]) for r in rows)
    for row in rows:
        assert 0.0 <= float(row["agreement"]) <= 1.0 and 1.0 <= float(row["tokens_per_round"]) <= 3 + 1
        assert float(row["kl"]) >= 0 and int(row["eval_positions"]) > 0
    assert float(rows[-1]["kl"]) < float(rows[0]["kl"])  # training moved the head towards the full model
    metadata = load_head(out, tiny, 2).metadata
    assert metadata["corpus_manifest_sha256"] == manifest_sha256(corpora["train"])
    assert metadata["eval_corpus_manifest_sha256"] == manifest_sha256(corpora["held"])
    assert int(metadata["tokens_seen"]) == state.tokens_seen and int(metadata["train_tokens"]) == state.targets_seen
    assert metadata["eval_agreement"] == f"{float(rows[-1]['agreement']):.4f}"


def test_evaluation_agrees_with_the_per_sequence_teacher(tiny, corpora) -> None:
    adapter = ModelAdapter(tiny)
    head = TrainedExitHead(adapter, 2)
    held = RecordSource(corpora["held"])
    records = [r for shard in range(len(held.shards)) for r in held.read(shard)]
    result = evaluate({2: head}, RecordSource.from_records(records), config(window=512))[2]
    examples = teacher_examples(adapter, Corpus([r.tokens for r in records], [r.start for r in records]), [2], False)
    assert result["agreement"] == pytest.approx(agreement(lambda ex: draft_logits(head, ex), examples), abs=1e-12)
    assert result["eval_positions"] == sum(len(e.teacher_tokens) for e in examples)


def test_tokens_per_round_counts_runs_of_matches_as_eesd_rounds(tmp_path) -> None:
    model = scale_late_layers(tiny_model(SPEC, torch.float64), 2, 0.0)  # layers 2.. are the identity
    head = TrainedExitHead(ModelAdapter(model), 2)  # a copy of an identity layer + the final norm: the full model
    records = [Record(f"r{i}", "text", list(range(3 + i, 40 + 3 * i)), i) for i in range(5)]
    result = evaluate({2: head}, RecordSource.from_records(records), config(window=512, draft_len=3))[2]
    assert result["agreement"] == 1.0
    runs = [predicted_accepted([True] * (len(r.tokens) - r.start), 3, len(r.tokens) - r.start) for r in records]
    expected = sum(sum(a) + len(a) for a in runs) / sum(len(a) for a in runs)
    assert result["tokens_per_round"] == pytest.approx(expected) and 3.5 < expected <= 4


def test_learning_rate_warms_up_then_follows_a_cosine() -> None:
    cfg = config(steps=10, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)
    rates = [lr_at(step, cfg) for step in range(10)]
    assert rates[:3] == [0.5, 1.0, 1.0] and rates[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[2:], rates[3:], strict=False))
    assert [lr_at(s, config(schedule="constant", warmup_steps=0, lr=0.3)) for s in (0, 5)] == [0.3, 0.3]


def test_a_corpus_of_another_model_is_refused(tiny, corpora, tmp_path) -> None:
    other = tiny_model(TinySpec(**{**SPEC.__dict__, "seed": 12}), torch.float64)
    with pytest.raises(ValueError, match="built with another model"):
        train_head_corpus(other, corpora["train"], config(), tmp_path / "x.safetensors", progress=False)
    with pytest.raises(ValueError, match="exit_layer"):
        train_head_corpus(tiny, corpora["train"], config(exit_layer=1, exit_layers=(2,)), tmp_path / "x.safetensors")


def test_a_bf16_model_trains_float32_heads_under_autocast(corpora, tmp_path) -> None:
    model = tiny_model(SPEC, torch.bfloat16)  # as a GPU run loads it; autocast on the CPU takes the same path
    out = tmp_path / "h.safetensors"
    heads, state = train_head_corpus(model, corpora["train"], config(steps=8, eval_every=4, lr=5e-3), out,
                                     eval_corpus=corpora["held"], progress=False)  # fmt: skip
    assert all(p.dtype == torch.float32 for p in heads[2].parameters())
    assert all(torch.isfinite(torch.tensor(state.losses)))
    assert state.evals[-1]["kl"] < state.evals[0]["kl"]
    assert load_head(out, model, 2).layer.mlp.down_proj.weight.dtype == torch.bfloat16


def test_several_corpora_train_together_and_each_is_checked(tiny, corpora, tmp_path) -> None:
    root, tokenizer = tmp_path / "more", char_tokenizer()
    more = CorpusConfig(sources=("self",), max_new_tokens=10, batch_size=8, shard_records=10, max_prompts=4,
                        temperatures=(1.0,), samples=1, seed=9)  # fmt: skip
    build_corpus(tiny, tokenizer, more, root, model_name="tiny", progress=False)
    heads, state = train_head_corpus(tiny, [corpora["train"], root], config(steps=4, eval_every=0),
                                     tmp_path / "h.safetensors", progress=False)  # fmt: skip
    head = load_head(tmp_path / "h.safetensors", tiny)
    assert head.metadata["corpus"] == f"{corpora['train']},{root}" and state.step == 4
    assert head.metadata["hard_weight"] == "0.0"
    other = tiny_model(TinySpec(**{**SPEC.__dict__, "seed": 12}), torch.float64)
    build_corpus(other, tokenizer, more, tmp_path / "other", model_name="other", progress=False)
    with pytest.raises(ValueError, match="other.*built with another model"):
        train_head_corpus(tiny, [corpora["train"], tmp_path / "other"], config(), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="also a training corpus"):
        train_head_corpus(tiny, [corpora["train"], corpora["held"]], config(), tmp_path / "x.safetensors",
                          eval_corpus=corpora["held"])  # fmt: skip
    import shutil

    copy = shutil.copytree(corpora["train"], tmp_path / "copy")  # another folder, the same manifest
    with pytest.raises(ValueError, match="copy is also a training corpus .or a copy."):
        train_head_corpus(tiny, [corpora["train"]], config(), tmp_path / "x.safetensors", eval_corpus=copy)


def test_the_hard_weight_adds_the_top_token_cross_entropy_to_the_gradient(tiny, corpora, tmp_path, monkeypatch) -> None:
    """distill_batch(w) backpropagates KL + w * CE(full model's top token): its gradient is the KL's plus w times
    the cross-entropy's computed here directly (to float32 precision: the teacher's log-probabilities are float32);
    the reported loss stays the KL; a resume refuses another w."""
    adapter = ModelAdapter(tiny)
    batch = next(iter(train_head.epoch_batches(RecordSource(corpora["train"]), 4, 48, seed=0, epoch=0)))
    teacher = train_head.teacher_batch(adapter, batch, [2])

    def gradients(weight: float, direct_ce: bool = False) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(0)
        head = train_head.new_head(adapter, 2, init_layer="last")
        if direct_ce:
            student = train_head.chunk_log_probs(head, train_head.head_states(head, teacher))
            top = adapter.logits(teacher.final).argmax(-1)
            torch.nn.functional.nll_loss(student, top).backward()
            loss = 0.0
        else:
            loss = train_head.distill_batch({2: head}, teacher, chunk=16, hard_weight=weight)[2]
        return loss, [p.grad.clone() for p in head.parameters() if p.grad is not None]

    kl_loss, kl = gradients(0.0)
    mixed_loss, mixed = gradients(0.5)
    _, ce = gradients(0.0, direct_ce=True)
    assert mixed_loss == pytest.approx(kl_loss, rel=1e-12)
    assert all(torch.allclose(m, k + 0.5 * c, rtol=1e-5, atol=1e-8) for m, k, c in zip(mixed, kl, ce, strict=True))
    assert any(c.abs().max() > 1e-6 for c in ce)
    out, real = tmp_path / "h.safetensors", train_head.train_step

    def interrupted(heads, optimizers, batch, cfg, step):
        if step == 5:  # after the checkpoint at step 4
            raise KeyboardInterrupt
        return real(heads, optimizers, batch, cfg, step)

    monkeypatch.setattr(train_head, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_head_corpus(tiny, corpora["train"], config(hard_weight=1.0), out, progress=False)
    monkeypatch.setattr(train_head, "train_step", real)
    with pytest.raises(ValueError, match="hard_weight=1.0, not 0.0"):
        train_head_corpus(tiny, corpora["train"], config(), out, resume=True, progress=False)
    with pytest.raises(ValueError, match="hard_weight"):
        config(hard_weight=-1.0)


class FakeClock:
    """`train_head`'s clock: it moves only when a training step runs (one second a step)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_a_time_budget_fits_a_cosine_schedule_or_stops_the_run(tiny, corpora, tmp_path, monkeypatch, schedule) -> None:
    """At 1 s a step and a 25 s budget: the probe (steps 2-11) times 1 s a step, so a cosine schedule of 40 steps
    is shortened to end inside the budget (11 + 0.95 x 14 s -> 24 steps) and runs to its end; a constant one runs
    until the step that ends past the budget (25). Either way the heads are written, saying how far they got."""
    clock, real = FakeClock(), train_head.train_step

    def timed(heads, optimizers, batch, cfg, step):
        clock.now += 1.0
        return real(heads, optimizers, batch, cfg, step)

    monkeypatch.setattr(train_head, "time", clock)
    monkeypatch.setattr(train_head, "train_step", timed)
    out = tmp_path / "h.safetensors"
    _, state = train_head_corpus(tiny, corpora["train"], config(steps=40, schedule=schedule, eval_every=0), out,
                                 progress=False, time_budget_s=25.0)  # fmt: skip
    metadata = load_head(out, tiny, 2).metadata
    expected = 24 if schedule == "cosine" else 25
    assert state.step == int(metadata["steps_done"]) == expected and metadata["steps_asked"] == "40"
    assert metadata["steps"] == ("24" if schedule == "cosine" else "40")
    fitted = config(steps=24)
    assert train_head.lr_at(23, fitted) == pytest.approx(fitted.lr * fitted.min_lr_ratio)  # annealed at its end
    with pytest.raises(ValueError, match="steps=24, not 40") if schedule == "cosine" else contextlib.nullcontext():
        monkeypatch.setattr(train_head, "train_step", real)
        train_head_corpus(tiny, corpora["train"], config(steps=40, schedule=schedule, eval_every=0), out,
                          progress=False, resume=True)  # fmt: skip


def test_train_head_refuses_a_time_budget_without_a_corpus(tmp_path) -> None:
    import argparse

    from executor import train_head_cli

    parser = argparse.ArgumentParser()
    train_head_cli.add_arguments(parser)
    argv = ["--model", "m", "--exit-layer", "2", "--out", str(tmp_path / "h.safetensors")]
    for extra in (["--time-budget-s", "5"], ["--corpus", "c", "--time-budget-s", "0"]):
        with pytest.raises(ValueError, match="--time-budget-s needs --corpus and a value > 0"):
            train_head_cli._check(parser.parse_args(argv + extra))


def test_phase_times_cover_a_step_only_when_enabled(tiny, corpora) -> None:
    """`PHASES` (what benchmarks/train_profile.py reads) times each phase of a step when on, nothing when off."""
    cfg = config(exit_layer=1, exit_layers=(3,))
    adapter = ModelAdapter(tiny)
    heads = {e: train_head.new_head(adapter, e) for e in cfg.layers}
    optimizers = train_head.make_optimizers(heads, cfg)
    batches = train_head.batch_stream(RecordSource(corpora["train"]), cfg, 0, 0)
    with train_head.frozen(tiny):
        train_head.train_step(heads, optimizers, next(batches)[2], cfg, 0)
        assert train_head.PHASES.seconds == {}
        train_head.PHASES.enabled = True
        try:
            train_head.train_step(heads, optimizers, next(batches)[2], cfg, 1)
        finally:
            train_head.PHASES.enabled = False
    phases = train_head.PHASES.seconds
    train_head.PHASES.seconds = {}
    assert set(phases) == {"teacher (full model)", "head layers forward", "logits + KL (forward and backward)",
                           "head layers backward", "clip + optimizer"}  # fmt: skip
    assert all(seconds > 0 for seconds in phases.values())


def test_a_held_out_corpus_given_to_train_on_is_noted(corpora, capsys) -> None:
    from executor.train_head_cli import _note_held_out

    _note_held_out([str(corpora["train"])])
    assert capsys.readouterr().err == ""
    _note_held_out([str(corpora["train"]), str(corpora["held"])])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--corpus {corpora['held']} was built from held-out prompts" in err


def test_a_run_whose_kl_rose_is_told_to_lower_its_learning_rate(capsys) -> None:
    from types import SimpleNamespace

    from executor.train_head_cli import _report

    args = SimpleNamespace(exit_layer=(4,), steps=30, out="h.safetensors", lr=5.0)
    state = SimpleNamespace(losses=[10.0 + i for i in range(30)], step=30, tokens_seen=100, evals=[], head_losses={})
    assert _report(args, state) == 0
    assert "the KL rose (14.500 -> 34.500): training diverged; try a lower --lr (it was 5)" in capsys.readouterr().err
    state.losses = [10.0 - 0.1 * i for i in range(30)]
    _report(args, state)
    assert "diverged" not in capsys.readouterr().err


def test_an_interrupted_run_whose_budget_fitted_its_schedule_says_the_steps_to_resume_with(tmp_path) -> None:
    """A time budget shortens a cosine schedule (`fit_steps`) and the checkpoint keeps the fitted length: the way on
    names it, and a resume with the original --steps is told it."""
    import dataclasses

    from executor.train_head import Run, TrainState

    run = Run({}, {}, config(steps=100_000), None, {2: tmp_path / "h.safetensors"}, {})
    run.config, run.saved_step = dataclasses.replace(run.config, steps=758), 16
    said = run.interrupted(TrainState(step=17))
    assert said.endswith("holds step 16: the same command with --resume --steps 758 (the schedule the time budget "
                         "fitted) goes on from there") and said.startswith("after step 17 of 758")  # fmt: skip


def test_a_diverged_run_writes_no_head_and_a_fresh_run_drops_an_earlier_curve(tiny, corpora, tmp_path, monkeypatch):
    """A step whose loss is not finite stops the run before its heads move (a head of NaNs used to be written, exit
    0); a head written without held-out rows removes an earlier OUT.eval.csv, which would be credited to it."""
    import executor.train_head as train_head

    out = tmp_path / "h.safetensors"
    stale = eval_csv_path(out)
    stale.write_text("step,agreement\n0,0.9\n")
    real, calls = train_head.distill_batch, []

    def blows_up(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls.append(1)
        return {e: float("nan") for e in losses} if len(calls) > 5 else losses

    monkeypatch.setattr(train_head, "distill_batch", blows_up)
    with pytest.raises(ValueError, match=r"training diverged at step 6 \(exit layer 2: KL nan\); no head written \(.*"
                                         r"h.safetensors.ckpt holds step 4\)"):  # fmt: skip
        train_head_corpus(tiny, corpora["train"], config(eval_every=0), out, progress=False)
    assert not out.exists() and stale.exists()  # the earlier run's curve stays with the earlier run's head
    monkeypatch.setattr(train_head, "distill_batch", real)
    (tmp_path / "h.safetensors.ckpt").unlink()
    train_head_corpus(tiny, corpora["train"], config(steps=2, eval_every=0), out, progress=False)
    assert out.exists() and not stale.exists()


def test_a_held_out_corpus_scores_at_the_start_and_end_by_default(tiny, corpora, tmp_path) -> None:
    out = tmp_path / "h.safetensors"
    train_head_corpus(tiny, corpora["train"], config(steps=3, eval_every=0), out, eval_corpus=corpora["held"],
                      progress=False)  # fmt: skip
    with open(eval_csv_path(out)) as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [0, 3]


def test_a_token_id_outside_the_vocabulary_is_named_not_an_index_error(tiny) -> None:
    from executor.adapter import ModelAdapter
    from executor.corpus import Batch
    from executor.train_head import teacher_batch

    tokens = torch.tensor([[1, 2, SPEC.vocab + 5]])
    batch = Batch(tokens, torch.ones_like(tokens, dtype=torch.bool), [3], [0])
    with pytest.raises(ValueError, match=f"token ids outside the model's vocabulary .0, {SPEC.vocab}."):
        teacher_batch(ModelAdapter(tiny), batch, [2])


@pytest.mark.parametrize(
    ("manifest", "message"),
    [("{not json", "manifest.json: not JSON"), ("[1, 2, 3]", "manifest.json: expected a JSON object .the corpus")],
)
def test_a_broken_manifest_or_a_missing_shard_is_named(corpora, tmp_path, manifest, message) -> None:
    import shutil

    from executor.corpus import read_manifest, read_shard

    broken = shutil.copytree(corpora["train"], tmp_path / "c")
    shard = read_manifest(broken)["shards"][0]
    (broken / shard["file"]).unlink()
    with pytest.raises(
        FileNotFoundError, match=f"corpus shard .*{shard['file']}, listed in .*manifest.json, is missing"
    ):
        read_shard(broken, shard)
    (broken / "manifest.json").write_text(manifest)
    with pytest.raises(ValueError, match=message):
        read_manifest(broken)


def test_each_evaluation_is_said_beside_the_progress(tiny, corpora, tmp_path, capsys) -> None:
    """--eval-every: a line per evaluation on stderr with each head's held-out agreement (the CSV keeps the rows)."""
    out = tmp_path / "h.safetensors"
    _, state = train_head_corpus(tiny, corpora["train"], config(steps=8, eval_every=4), out,
                                 eval_corpus=corpora["held"], progress=True)  # fmt: skip
    err = capsys.readouterr().err
    for row in state.evals:
        assert f"step {row['step']}: E={row['exit_layer']} held-out agreement {row['agreement']:.3f}" in err
