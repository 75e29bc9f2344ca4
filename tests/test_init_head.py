"""`eesd train-head --init-head`: start from trained head files instead of a model layer. With `--steps 0` the heads
are written unchanged, over `--draft-vocab`'s ids if given (a draft vocabulary for a head trained without one);
with `--corpus` training goes on from them. Mistakes are refused naming the flag."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from test_corpus import char_tokenizer
from tiny_models import TinySpec, tiny_model

from executor import train_head_cli
from executor.adapter import ModelAdapter
from executor.api import generate
from executor.corpus import CorpusConfig, build_corpus
from executor.heads import SubsetExitHead, TrainedExitHead, load_head, read_head_file, save_subset_head
from executor.models import load_model
from executor.train_head import TrainConfig, train_head_corpus

SPEC = TinySpec(num_layers=4, num_heads=2, num_kv_heads=1, head_dim=8, vocab=98, seed=11)
VOCAB = [5, 17, 3, 60, 42, 8, 71, 30, 11, 90, 2, 64]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("init_head")
    model = tiny_model(SPEC, torch.float32)
    model.save_pretrained(root / "model")
    config = CorpusConfig(sources=("self",), max_new_tokens=8, batch_size=8, temperatures=(0.0,), max_prompts=8)
    build_corpus(model, char_tokenizer(), config, root / "train", model_name="t", progress=False)
    for kind in ("layer", "attention"):
        train = TrainConfig(exit_layer=1, exit_layers=(2,), steps=4, batch_size=4, window=32, lr=3e-3, head_kind=kind)
        train_head_corpus(model, root / "train", train, root / f"{kind}-e{{exit_layer}}.safetensors", progress=False)
    subset = SubsetExitHead(ModelAdapter(load_model(str(root / "model"))), torch.tensor(VOCAB))
    save_subset_head(subset, root / "vocab.safetensors")
    return {"root": root, "model": root / "model", "train": root / "train", "vocab": root / "vocab.safetensors"}


def run(setup: dict[str, Path], *args: str) -> int:
    parser = argparse.ArgumentParser()
    train_head_cli.add_arguments(parser)
    argv = [
        "--model",
        str(setup["model"]),
        "--no-progress",
        *(a.format(**setup) if "{exit_layer}" not in a else a for a in args),
    ]
    return train_head_cli.run(parser.parse_args(argv))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_head_file(path)[0].items() if k != "token_ids"}


def test_steps_0_writes_the_heads_unchanged_over_the_draft_vocabulary(setup, capsys) -> None:
    out = setup["root"] / "v-e{exit_layer}.safetensors"
    assert run(setup, "--init-head", "{root}/layer-e1.safetensors", "{root}/layer-e2.safetensors", "--draft-vocab",
               "{vocab}", "--steps", "0", "--out", str(out)) == 0  # fmt: skip
    assert "unchanged, drafting over 12 ids" in capsys.readouterr().out
    model = load_model(str(setup["model"]))
    for exit_layer in (1, 2):
        made, source = Path(str(out).format(exit_layer=exit_layer)), setup["root"] / f"layer-e{exit_layer}.safetensors"
        tensors, metadata = read_head_file(made)
        assert sorted(tensors["token_ids"].tolist()) == sorted(VOCAB)
        assert all(torch.equal(value, weights(source)[key]) for key, value in weights(made).items())
        assert metadata["steps_after_init"] == "0" and str(source) in metadata["init_head_files"]
        assert metadata["draft_vocab_file"] == str(setup["vocab"]) and metadata["exit_layer"] == str(exit_layer)
        head = load_head(made, model, exit_layer)
        assert isinstance(head, TrainedExitHead) and head.draft_vocab == len(VOCAB)
        prompt = [4, 9, 21, 33, 7]
        ar = generate(model, prompt, max_new_tokens=12).sequences.tolist()
        assert (
            generate(model, prompt, method="eesd", head=head, draft_len=2, max_new_tokens=12).sequences.tolist() == ar
        )
    whole = setup["root"] / "whole.safetensors"  # no --draft-vocab: the whole vocabulary
    assert run(setup, "--init-head", str(out).format(exit_layer=1), "--steps", "0", "--out", str(whole)) == 0
    assert "token_ids" not in read_head_file(whole)[0] and "draft_vocab_size" not in read_head_file(whole)[1]


def test_one_init_head_fills_exit_layer_in_out(setup, capsys) -> None:
    """A single head's --out with {exit_layer} in it is filled in too (it was written under the literal name)."""
    out = setup["root"] / "one-e{exit_layer}.safetensors"
    assert run(setup, "--init-head", "{root}/layer-e2.safetensors", "--steps", "0", "--out", str(out)) == 0
    assert f"wrote {setup['root'] / 'one-e2.safetensors'}:" in capsys.readouterr().out
    assert read_head_file(setup["root"] / "one-e2.safetensors")[1]["exit_layer"] == "2" and not Path(out).exists()


def test_training_goes_on_from_the_initial_head(setup) -> None:
    out = setup["root"] / "more.safetensors"
    assert run(setup, "--init-head", "{root}/attention-e2.safetensors", "--corpus", "{train}", "--steps", "2",
               "--lr", "1e-9", "--batch-size", "4", "--window", "32", "--out", str(out)) == 0  # fmt: skip
    source = setup["root"] / "attention-e2.safetensors"
    metadata = read_head_file(out)[1]
    assert metadata["head_architecture"] == read_head_file(source)[1]["head_architecture"]
    assert metadata["init_head_files"] == str(source) and metadata["exit_layer"] == "2"
    start = {k: v.float() for k, v in weights(source).items()}
    assert all((v.float() - start[k]).abs().max() < 1e-2 for k, v in weights(out).items())  # bf16 files, lr 1e-9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init-head", "{vocab}", "--steps", "0"], "vocabulary-subset head has no weights"),
        (
            ["--init-head", "{root}/layer-e1.safetensors", "--head-kind", "attention", "--steps", "0"],
            "of kind layer; one kind per run, and --head-kind says attention",
        ),
        (
            ["--init-head", "{root}/layer-e1.safetensors", "{root}/attention-e2.safetensors", "--steps", "0"],
            "one kind per run",
        ),
        (
            ["--init-head", "{root}/layer-e1.safetensors", "--exit-layer", "2", "--steps", "0"],
            r"exit layers \[1\], --exit-layer gives \[2\]",
        ),
        (
            ["--init-head", "{root}/layer-e1.safetensors", "{root}/layer-e1.safetensors", "--steps", "0"],
            "a second head for exit layer 1",
        ),
        (["--init-head", "{root}/layer-e1.safetensors", "--steps", "3"], "trains on with --corpus"),
        (["--init-head", "{root}/layer-e1.safetensors", "--steps", "0", "--corpus", "{train}"], "do not apply"),
        (["--exit-layer", "1", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["--init-head", "{root}/layer-e1.safetensors", "--steps", "-1"], "--steps must be >= 0, got -1"),
        (["--init-head", "{root}/layer-e1.safetensors", "--vocab-subset", "8", "--steps", "0"], "give one of them"),
    ],
    ids=[
        "subset-file",
        "kind-flag",
        "mixed-kinds",
        "exit-layer",
        "twice",
        "no-corpus",
        "corpus-at-0",
        "steps-0-alone",
        "negative-steps",
        "vocab-subset",
    ],  # fmt: skip
)
def test_mistakes_are_refused_naming_the_flag(setup, args: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        run(setup, *args, "--out", str(tmp_path / "bad.safetensors"))
    assert not (tmp_path / "bad.safetensors").exists()


def test_an_existing_out_is_kept_without_force(setup) -> None:
    out = setup["root"] / "kept.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(ValueError, match="exists; pass --force"):
        run(setup, "--init-head", "{root}/layer-e1.safetensors", "--steps", "0", "--out", str(out))
    assert out.read_bytes() == b"mine"
