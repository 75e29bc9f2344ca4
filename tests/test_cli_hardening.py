"""User mistakes on the torch commands are one line naming the flag, before the long work: train-head's settings,
an empty corpus, a model folder that holds no model, an output path under a file, calibration repeats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import TinySpec, tiny_model

from executor.cli import main
from executor.corpus import MANIFEST, CorpusConfig, RecordSource, build_corpus
from executor.models import load_model


def one_error_line(capsys: pytest.CaptureFixture, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line]  # (transformers' loading bar may precede it)
    assert "Traceback" not in err and len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    for fragment in fragments:
        assert fragment in errors[0], err
    return errors[0]


@pytest.mark.parametrize(
    ("flag", "value"), [("--clip-norm", "-1"), ("--hard-weight", "-0.5"), ("--warmup-steps", "-1"),
                        ("--eval-every", "-2"), ("--init-layer", "first"), ("--lr", "nan"), ("--lr", "inf"),
                        ("--exit-layer", "4,4"), ("--clip-norm", "nan"), ("--hard-weight", "nan"), ("--window", "0"),
                        ("--draft-len", "0"), ("--eval-every", "5"), ("--vocab-subset", "64")],
)  # fmt: skip
def test_train_head_settings_are_checked_before_the_model_loads(tmp_path, capsys, flag, value) -> None:
    """A negative clip norm would flip the gradients (torch scales them by it), not clip them; the model named
    does not exist, so a refusal here came before any loading."""
    argv = ["train-head", "--model", "no-such-model", "--exit-layer", "4", "--out", str(tmp_path / "h.safetensors")]
    assert main([*argv, flag, value]) == 2
    one_error_line(capsys, flag)


@pytest.mark.parametrize(("flag", "value"), [("--exit-layer", "30"), ("--init-layer", "30")])
def test_train_head_layers_are_checked_against_the_model_before_any_teacher_pass(tmp_path, capsys, flag, value):
    argv = ["train-head", "--model", "smollm2-135m", "--exit-layer", "4", "--out", str(tmp_path / "h.safetensors")]
    argv += [flag, value, "--threads", "1", "--no-progress"]
    assert main(argv) == 2
    one_error_line(capsys, flag, "30 layers" if flag == "--exit-layer" else "[0, 29]")
    assert not list(tmp_path.iterdir())


def test_an_output_path_under_a_file_is_refused_before_any_work(tmp_path, capsys) -> None:
    blocker = tmp_path / "base.yaml"
    blocker.write_text("x")
    out = str(blocker / "h.safetensors")
    assert main(["train-head", "--model", "no-such-model", "--exit-layer", "4", "--out", out]) == 2
    one_error_line(capsys, "--out", "is a file")
    assert main(["corpus", "--model", "no-such-model", "--out", str(blocker)]) == 2
    one_error_line(capsys, "--out", "is a file")


def test_an_output_folder_one_cannot_write_in_is_refused_before_any_work(tmp_path, capsys) -> None:
    """A training run used to find out at its first checkpoint (after its last step, with a long cadence)."""
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anyway: a folder that cannot hold files in any case
            locked = Path("/proc")
        assert main(["train-head", "--model", "no-such-model", "--exit-layer", "4", "--out",
                     str(locked / "h.safetensors")]) == 2  # fmt: skip
        one_error_line(capsys, "--out", f"cannot write in {locked}")
    finally:
        os.chmod(tmp_path / "locked", 0o700)


def test_an_empty_corpus_is_refused_where_it_is_built_and_where_it_is_read(tmp_path) -> None:
    """Texts that give no record write nothing (a corpus of 0 records used to be written and to crash training);
    a corpus without shards is refused by name when read."""
    spec = TinySpec(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, vocab=300, seed=5)
    model = tiny_model(spec)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    from executor.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    config = CorpusConfig(sources=("text",), text_paths=(str(empty),))
    with pytest.raises(ValueError, match="gave no record"):
        build_corpus(model, tokenizer, config, tmp_path / "c", model_name="tiny", progress=False)
    assert not (tmp_path / "c" / MANIFEST).exists()
    for name in ("max_prompts", "max_tokens_per_source"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1"):
            CorpusConfig(**{name: 0})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / MANIFEST).write_text(json.dumps({"shards": []}))
    with pytest.raises(ValueError, match="holds no records|manifest"):
        RecordSource(tmp_path / "d")


@pytest.mark.parametrize("config", ["{not json", None])
def test_a_folder_that_holds_no_model_is_one_line(tmp_path, config) -> None:
    from executor.models import prepare_model

    folder = tmp_path / "hf"
    folder.mkdir()
    real = prepare_model("smollm2-135m").hf_dir / "config.json"
    (folder / "config.json").write_text(config if config is not None else real.read_text())
    with pytest.raises(ValueError, match="cannot load a Hugging Face causal LM"):
        load_model(folder)


def test_calibration_repeats_of_zero_are_refused_not_replaced(tmp_path, capsys) -> None:
    assert main(["calibrate", "latency", "--model", "smollm2-135m", "--out", str(tmp_path), "--repeats", "0"]) == 2
    one_error_line(capsys, "--repeats >= 1", "0")


@pytest.mark.parametrize(
    ("flag", "value"), [("--max-prompts", "0"), ("--requests-per-kind", "0"), ("--held-out-fraction", "1.5")]
)
def test_corpus_settings_are_refused_by_flag_before_the_model_loads(tmp_path, capsys, flag, value) -> None:
    assert main(["corpus", "--model", "no-such-model", "--out", str(tmp_path / "c"), flag, value]) == 2
    one_error_line(capsys, f"{flag} must be")


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--temperatures", "nan"], ("--temperatures must be finite numbers >= 0", "nan")),
        (["--temperatures", "0,inf"], ("--temperatures must be finite numbers >= 0", "inf")),
        (["--temperatures", "0,0.7,0"], ("--temperatures must each be given once", "0,0.7,0")),
        (["--sources", "self", "--text", "notes.txt"], ("--text is for --sources text", "got --sources self")),
        (["--python-env", "all"], ("--python-env is for --sources python-env", "got --sources self")),
        (["--sources", "text", "--text", "notes.txt", "--samples", "3"], ("--samples is for --sources self",)),
        (["--sources", "python-env", "--prompts", "humaneval"], ("--prompts is for --sources self or self-requests",)),
        (["--prompts", "no-such-prompts.jsonl"], ("no prompt set or file 'no-such-prompts.jsonl'",)),
        (["--sources", "text", "--text", "no-such.txt"], ("text source no-such.txt is neither a file nor a",)),
    ],
)
def test_corpus_flags_no_source_reads_or_bad_temperatures_are_refused_before_the_model_loads(
    tmp_path, capsys, argv, fragments
) -> None:
    """A NaN, infinite or repeated temperature, a flag set for a source not given (the run would start, for
    minutes, and ignore it), a prompt set or a text source that is not there, are refused before anything loads."""
    assert main(["corpus", "--model", "no-such-model", "--out", str(tmp_path / "c"), *argv]) == 2
    one_error_line(capsys, *fragments)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--do-sample", "--temperature", "-1"], ("temperature must be a finite number > 0 when sampling", "-1.0")),
        (["--do-sample", "--top-p", "2"], ("top_p must be a number in (0, 1]", "2.0")),
        (["--seed", "-1"], ("seed must be an integer in [0, 4294967295]", "-1")),
        (["--repetition-penalty", "0"], ("repetition_penalty must be a finite number > 0",)),
        (["--no-repeat-ngram-size", "-1"], ("no_repeat_ngram_size must be an integer >= 0",)),
        (["--sync-every", "0"], ("sync_every must be an integer in 1..64", "got 0")),
        (["--capture", "bogus"], ("capture must be one of auto, none", "'bogus'")),
        (["--method", "eesd", "--policy", "bogus"], ("unknown draft policy 'bogus'",)),
        (["--method", "eesd", "--policy", "beta-ts:max=0"], ("policy 'beta-ts:max=0'",)),
    ],
)
def test_generate_values_are_refused_before_the_model_loads(capsys, argv, fragments) -> None:
    """The checks `generate` makes of its settings run before the model loads (which takes seconds), with the same
    words: here there is no model to load, so a check made after loading would name the model instead."""
    assert main(["generate", "--model", "no-such-model", "--prompt", "hi", *argv]) == 2
    one_error_line(capsys, *fragments)


def test_serve_bench_refuses_a_method_given_twice(tmp_path, capsys) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,prompt_len,output_len\n0.0,3,4\n", encoding="utf-8")
    argv = ["serve-bench", "--model", "no-such-model", "--workload", str(trace), "--methods", "ar,eesd,ar"]
    assert main(argv) == 2
    one_error_line(capsys, "--methods must name each method once", "'ar,eesd,ar'")


def test_train_head_checks_before_loading_a_time_budget_a_subset_run_and_a_left_checkpoint(tmp_path, capsys) -> None:
    """No model is loaded (it does not exist): each refusal comes first. A checkpoint an earlier run left is named
    by the run's own name for it (the lowest exit layer's), whatever order --exit-layer gives."""
    out = str(tmp_path / "h-e{exit_layer}.safetensors")
    base = ["train-head", "--model", "no-such-model", "--out", out]
    assert main([*base, "--exit-layer", "4", "--corpus", "C", "--time-budget-s", "nan"]) == 2
    one_error_line(capsys, "--time-budget-s needs --corpus and a value > 0, got nan")
    assert main([*base, "--vocab-subset", "64", "--batch-size", "16", "--window", "128"]) == 2
    one_error_line(capsys, "--batch-size, --window: for training a head")
    (tmp_path / "h-e4.safetensors.ckpt").write_bytes(b"state")
    assert main([*base, "--exit-layer", "9,4"]) == 2
    one_error_line(capsys, "h-e4.safetensors.ckpt holds an earlier run's state", "--resume continues it")
    assert main([*base, "--exit-layer", "9,5", "--resume"]) == 2  # no checkpoint of this run: said, then the model
    assert "note: --resume: no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own refusal (usage and one error line, status 2)
        main([*base, "--exit-layer", ","])
    assert "--exit-layer: expected exit layers as comma-separated integers" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_named_without_torchs_unpickler_words(tmp_path) -> None:
    """A checkpoint that is not one (garbage bytes, a cut-off file, another object saved by torch) is refused in
    words of the checkpoint, with what to do."""
    from types import SimpleNamespace

    import torch

    from executor.train_head import load_checkpoint

    adapter, path = SimpleNamespace(device="cpu"), tmp_path / "h.safetensors.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"h\.safetensors\.ckpt is unreadable \(not a torch checkpoint: .*delete it"):
        load_checkpoint(path, adapter, None, {})
    torch.save({"version": 1, "steps": list(range(1000))}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"is unreadable \(a truncated or damaged file: RuntimeError\)"):
        load_checkpoint(path, adapter, None, {})
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match=r"holds no train-head checkpoint \(a list\); delete it"):
        load_checkpoint(path, adapter, None, {})
