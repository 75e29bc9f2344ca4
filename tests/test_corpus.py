"""The offline corpus builder (`executor.corpus`, `eesd corpus`): reproducible, deduplicated, the train split only,
manifest counts that match the shards, text windows, the Python environment source, and the training loader."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import TinySpec, tiny_model

from executor import corpus as corpus_module
from executor.corpus import (
    MANIFEST,
    CorpusConfig,
    CorpusWriter,
    Record,
    RecordSource,
    build_corpus,
    continue_batch,
    docstrings,
    epoch_batches,
    iter_records,
    python_files,
    read_manifest,
    record_windows,
    token_hash,
)
from executor.prompts import encode_prompt, load_prompts, read_jsonl_prompts, split_prompts

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
SPEC = TinySpec(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, vocab=len(CHARS) + 2, seed=5)


def char_tokenizer():
    """A real (fast) character-level tokenizer with a chat template, built offline: id 0 pads, 1 ends a turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1} | {c: i + 2 for i, c in enumerate(CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tokenizer


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return tiny_model(SPEC, torch.float64)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    for index in range(6):
        (root / f"doc{index}.txt").write_text(f"Document {index}. " + "The quick brown fox jumps. " * (3 + index))
    (root / "sub" / "copy.md").write_text((root / "doc2.txt").read_text())  # a duplicate under another name
    lines = [json.dumps({"text": f"line {i}: " + "lorem ipsum dolor " * 4}) for i in range(5)]
    (root / "sub" / "more.jsonl").write_text("\n".join(lines + [json.dumps({"prompt": "a prompt field, long enough"})]))
    (root / "image.bin").write_bytes(bytes(range(256)))  # not a text suffix: ignored
    return root


def small_config(**overrides) -> CorpusConfig:
    settings = dict(sources=("self",), max_prompts=5, temperatures=(0.0, 1.0), samples=2, max_new_tokens=6,
                    batch_size=3, window=40, min_window=8, shard_records=4)  # fmt: skip
    return CorpusConfig(**(settings | overrides))


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.jsonl"))}


def test_same_settings_give_byte_identical_shards_and_another_seed_does_not(tiny, tokenizer, texts, tmp_path) -> None:
    config = small_config(sources=("self", "self-prompts", "text"), text_paths=(str(texts),), max_prompts=3)
    first = build_corpus(tiny, tokenizer, config, tmp_path / "a", model_name="tiny", progress=False)
    build_corpus(tiny, tokenizer, config, tmp_path / "b", model_name="tiny", progress=False)
    assert set(first["sources"]) == {"self", "self-prompts", "text"}
    assert len(first["shards"]) > 1
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert (tmp_path / "a" / MANIFEST).read_bytes() == (tmp_path / "b" / MANIFEST).read_bytes()
    other = small_config(**{**config.__dict__, "seed": 1})
    build_corpus(tiny, tokenizer, other, tmp_path / "c", model_name="tiny", progress=False)
    sampled = {r.id: r.tokens for r in iter_records(tmp_path / "a") if r.meta.get("temperature")}
    resampled = {r.id: r.tokens for r in iter_records(tmp_path / "c") if r.meta.get("temperature")}
    common = sampled.keys() & resampled.keys()
    assert common and any(sampled[k] != resampled[k] for k in common)


def test_records_are_the_models_own_continuations(tiny, tokenizer, tmp_path) -> None:
    config = small_config(max_prompts=4)
    build_corpus(tiny, tokenizer, config, tmp_path / "c", model_name="tiny", progress=False)
    prompts = {p.id: encode_prompt(tokenizer, p.text) for p in split_prompts(load_prompts("builtin")).train[:4]}
    records = list(iter_records(tmp_path / "c"))
    assert len(records) == 4 * (1 + 2)  # greedy once, two samples at temperature 1
    for record in records:
        prompt = prompts[record.meta["prompt_id"]]
        assert record.tokens[: len(prompt)] == prompt and record.start == len(prompt) - 1
        assert len(record.tokens) == len(prompt) + config.max_new_tokens
        temperature = record.meta["temperature"]
        alone = continue_batch(tiny, [prompt], config.max_new_tokens, [], temperature, record.meta["seed"] or 0)
        assert record.tokens[len(prompt) :] == alone[0]  # a function of prompt and seed, not of its batch
    seeds = [r.meta["seed"] for r in records if r.meta["temperature"]]
    assert len(set(seeds)) == len(seeds) == 4 * 2  # each sampled row its own seed


def test_a_record_is_the_same_whatever_the_batch_and_rows_do_not_share_noise(tiny, tokenizer, tmp_path) -> None:
    """Per-row seeds: the same corpus with batches of 1 and of every ask at once (the same request for a topic
    several times in one batch), and the questions asked on one topic differ from each other."""
    settings = dict(sources=("self-prompts",), max_prompts=2, self_prompts_per_topic=3, temperatures=(0.0, 1.0),
                    samples=1, max_new_tokens=4)  # fmt: skip
    built = {}
    for size in (1, 16):
        build_corpus(tiny, tokenizer, small_config(**settings, batch_size=size), tmp_path / str(size),
                     model_name="tiny", progress=False)  # fmt: skip
        built[size] = {r.id: r.tokens for r in iter_records(tmp_path / str(size))}
    assert built[1] == built[16] and len(built[1]) > 4
    questions = {}
    for record in iter_records(tmp_path / "16"):
        topic = record.meta["prompt_id"].rsplit("/", 1)[0]
        questions.setdefault(topic, set()).add(tuple(record.tokens[: record.start + 1]))
    assert all(len(asked) > 1 for asked in questions.values())


def test_a_time_budget_cuts_the_build_and_the_manifest_says_so(tiny, tokenizer, tmp_path) -> None:
    config = small_config(max_prompts=4)
    with pytest.raises(ValueError, match="time budget .* ended before the first record"):  # no empty corpus
        build_corpus(tiny, tokenizer, config, tmp_path / "none", model_name="tiny", progress=False, time_budget_s=1e-9)
    begin = time.perf_counter()
    whole = build_corpus(tiny, tokenizer, config, tmp_path / "whole", model_name="tiny", progress=False,
                         time_budget_s=600.0)  # fmt: skip
    assert not whole["cut_by_time_budget"] and whole["totals"]["records"] == 4 * 3
    budget = (time.perf_counter() - begin) / 4  # about one of the build's four batches (3 prompts each)
    config = small_config(max_prompts=12, batch_size=3)
    cut = build_corpus(tiny, tokenizer, config, tmp_path / "cut", model_name="tiny", progress=False,
                       time_budget_s=budget)  # fmt: skip
    assert cut["cut_by_time_budget"] and 0 < cut["totals"]["records"] < 12 * 3
    assert read_manifest(tmp_path / "cut")["cut_by_time_budget"]


def test_an_interrupted_build_keeps_its_records_as_a_corpus_that_says_so(tiny, tokenizer, tmp_path, monkeypatch):
    """Ctrl-C during a long build: the batches made so far are written (the manifest says `interrupted`), and are the
    whole build's first records; interrupted before any record, a folder the build made is removed."""
    config = small_config(max_prompts=12, batch_size=3, temperatures=(0.0,))
    build_corpus(tiny, tokenizer, config, tmp_path / "whole", model_name="tiny", progress=False)
    whole = [r.tokens for r in iter_records(tmp_path / "whole")]
    real, calls = corpus_module.continue_batch, []

    def stopped_at(limit: int):
        def batch(*args, **kwargs):
            calls.append(1)
            if len(calls) > limit:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        return batch

    monkeypatch.setattr(corpus_module, "continue_batch", stopped_at(2))
    with pytest.raises(KeyboardInterrupt, match=r"after 6 records .*interrupted: true.*--force builds the whole one"):
        build_corpus(tiny, tokenizer, config, tmp_path / "cut", model_name="tiny", progress=False)
    manifest = read_manifest(tmp_path / "cut")
    assert manifest["interrupted"] and manifest["totals"]["records"] == 6
    assert [r.tokens for r in iter_records(tmp_path / "cut")] == whole[:6]
    calls.clear()
    monkeypatch.setattr(corpus_module, "continue_batch", stopped_at(0))
    with pytest.raises(KeyboardInterrupt, match="before the first record"):
        build_corpus(tiny, tokenizer, config, tmp_path / "none", model_name="tiny", progress=False)
    assert not (tmp_path / "none").exists()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread only")
def test_a_ctrl_c_stops_the_build_at_the_next_batch_with_every_record_whole(tiny, tokenizer, tmp_path, monkeypatch):
    """A real SIGINT while a batch is made: the batch finishes, no other starts, and the records so far are the
    corpus (whole: never a record cut in two), the whole build's first ones."""
    config = small_config(max_prompts=12, batch_size=3, temperatures=(0.0,))
    build_corpus(tiny, tokenizer, config, tmp_path / "whole", model_name="tiny", progress=False)
    whole = [r.tokens for r in iter_records(tmp_path / "whole")]
    real, calls = corpus_module.continue_batch, []

    def batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(corpus_module, "continue_batch", batch)
    with pytest.raises(KeyboardInterrupt, match="after 6 records"):
        build_corpus(tiny, tokenizer, config, tmp_path / "cut", model_name="tiny", progress=False)
    assert read_manifest(tmp_path / "cut")["interrupted"] and len(calls) == 2
    assert [r.tokens for r in iter_records(tmp_path / "cut")] == whole[:6]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back


def test_only_the_train_split_is_used_unless_held_out_is_asked(tiny, tokenizer, tmp_path) -> None:
    split = split_prompts(load_prompts("builtin"))
    for name, expected in (("train", split.train), ("held-out", split.held_out)):
        config = small_config(split=name, max_prompts=None, temperatures=(0.0,), max_new_tokens=2, batch_size=16)
        build_corpus(tiny, tokenizer, config, tmp_path / name, model_name="tiny", progress=False)
        used = {r.meta["prompt_id"] for r in iter_records(tmp_path / name)}
        assert used == {p.id for p in expected}
    train = {r.meta["prompt_id"] for r in iter_records(tmp_path / "train")}
    assert not train & {p.id for p in split.held_out}


def test_duplicates_are_dropped_and_counted(tiny, tokenizer, texts, tmp_path) -> None:
    config = small_config(sources=("text",), text_paths=(str(texts), str(texts / "doc2.txt")), held_out_fraction=0.01)
    manifest = build_corpus(tiny, tokenizer, config, tmp_path / "c", model_name="tiny", progress=False)
    records = list(iter_records(tmp_path / "c"))
    hashes = [token_hash(r.tokens) for r in records]
    assert len(set(hashes)) == len(hashes)
    assert manifest["sources"]["text"]["duplicates"] >= 2  # copy.md and doc2.txt given twice
    assert manifest["totals"]["duplicates"] == manifest["sources"]["text"]["duplicates"]


def test_manifest_counts_match_the_shards(tiny, tokenizer, texts, tmp_path) -> None:
    config = small_config(sources=("self", "text"), text_paths=(str(texts),), max_prompts=3)
    build_corpus(tiny, tokenizer, config, tmp_path / "c", model_name="tiny", force=False, progress=False)
    manifest = read_manifest(tmp_path / "c")
    assert manifest["settings"]["text_paths"] == [str(texts)] and manifest["seed"] == 0
    assert manifest["model_fingerprint"] and manifest["tokenizer"]["vocab_size"] == len(CHARS) + 2
    for shard in manifest["shards"]:
        data = (tmp_path / "c" / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(data.decode().splitlines()) == shard["records"] <= config.shard_records
    records = list(iter_records(tmp_path / "c"))
    for source, counts in manifest["sources"].items():
        mine = [r for r in records if r.source == source]
        assert counts["records"] == len(mine) > 0
        assert counts["tokens"] == sum(len(r.tokens) for r in mine)
        assert counts["targets"] == sum(len(r.tokens) - r.start for r in mine)
    assert manifest["totals"]["records"] == len(records) == sum(s["records"] for s in manifest["shards"])
    assert not list((tmp_path / "c").glob(".*.tmp"))


def test_text_windows_splits_and_jsonl_fields(tiny, tokenizer, texts, tmp_path) -> None:
    config = small_config(sources=("text",), text_paths=(str(texts),))
    build_corpus(tiny, tokenizer, config, tmp_path / "train", model_name="tiny", progress=False)
    held = CorpusConfig(**{**config.__dict__, "split": "held-out"})
    build_corpus(tiny, tokenizer, held, tmp_path / "held", model_name="tiny", progress=False)
    docs = {side: {r.id.rsplit("/w", 1)[0] for r in iter_records(tmp_path / side)} for side in ("train", "held")}
    assert docs["train"] and docs["held"] and not docs["train"] & docs["held"]
    records = list(iter_records(tmp_path / "train")) + list(iter_records(tmp_path / "held"))
    assert all(config.min_window <= len(r.tokens) <= config.window and r.start == 0 for r in records)
    texts_seen = {tokenizer.decode(r.tokens) for r in records}
    assert any(t.startswith("line 0: lorem") for t in texts_seen) and "a prompt field, long enough" in texts_seen
    assert not any(r.id.startswith("text/texts/image.bin") for r in records)


def test_self_prompts_are_questions_the_model_wrote_on_train_topics(tiny, tokenizer, tmp_path) -> None:
    config = small_config(sources=("self-prompts",), max_prompts=4, temperatures=(0.0,), self_prompts_per_topic=2)
    build_corpus(tiny, tokenizer, config, tmp_path / "c", model_name="tiny", progress=False)
    records = list(iter_records(tmp_path / "c"))
    train_topics = {p.id for p in split_prompts(corpus_module.topic_prompts()).train[:4]}
    assert records and {r.meta["prompt_id"].rsplit("/", 1)[0] for r in records} <= train_topics
    for record in records:  # the prompt is the chat-templated question, not the request that produced it
        prompt = tokenizer.decode(record.tokens[: record.start + 1])
        assert prompt.startswith("<user>") and "Write one question" not in prompt


def test_self_requests_are_new_requests_of_the_train_kinds_answered_as_prompts(tiny, tokenizer, tmp_path) -> None:
    lines = [{"id": f"r/{kind}-{i}", "category": kind, "prompt": f"{verb} {i}."}
             for kind, verb in (("sum", "Add two to"), ("name", "Name the colour")) for i in range(12)]  # fmt: skip
    (tmp_path / "short.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = small_config(sources=("self-requests",), prompts=str(tmp_path / "short.jsonl"), max_prompts=None,
                          self_requests_per_kind=12, temperatures=(0.0,), batch_size=16)  # fmt: skip
    manifest = build_corpus(tiny, tokenizer, config, tmp_path / "c", model_name="tiny", progress=False)
    written = read_jsonl_prompts(tmp_path / "c" / corpus_module.REQUESTS_FILE)
    counts = manifest["self_requests"]
    assert counts["asked"] == 2 * 12 and counts["kept"] == len(written) > 0
    assert sum(counts[k] for k in ("kept", "cut_or_short", "repeated", "near_held_out")) == counts["asked"]
    assert all(p.category == p.id.split("/")[0] in {"sum", "name"} for p in written)
    records = list(iter_records(tmp_path / "c"))
    assert {r.meta["prompt_id"] for r in records} == {p.id for p in written}
    texts = {p.id: p.text for p in written}
    for record in records:  # the answer's prompt is the written request in the chat template
        assert record.tokens[: record.start + 1] == encode_prompt(tokenizer, texts[record.meta["prompt_id"]])
    build_corpus(tiny, tokenizer, config, tmp_path / "again", model_name="tiny", progress=False)
    assert shard_bytes(tmp_path / "c") == shard_bytes(tmp_path / "again")
    assert (tmp_path / "c" / "requests.jsonl").read_bytes() == (tmp_path / "again" / "requests.jsonl").read_bytes()


def test_request_asks_list_train_requests_of_one_kind_each_ask_its_own_draw(tokenizer) -> None:
    config = small_config(sources=("self-requests",), prompts="requests", max_prompts=None, self_requests_per_kind=3)
    split = split_prompts(load_prompts("requests"))
    train = {p.text: p.category for p in split.train}
    asks = corpus_module.request_asks(config, tokenizer)
    assert sorted(kind for _, kind, _ in asks) == sorted(["chat", "code", "explanation", "math"] * 3)
    drawn = set()
    for ask_id, kind, tokens in asks:
        text = tokenizer.decode(tokens)
        assert text.startswith(corpus_module.SELF_REQUEST_HEADER) and text.endswith("\n-") and "<user>" not in text
        examples = [line.removeprefix("- ") for line in text.splitlines()[1:-1]]
        assert len(examples) == corpus_module.SELF_REQUEST_EXAMPLES
        assert all(train.get(example) == kind for example in examples), ask_id  # never a held-out request
        drawn.add(tuple(examples))
    assert len(drawn) == len(asks)


def test_request_filter_drops_cut_lines_repeats_and_near_copies_of_held_out_prompts() -> None:
    keep = corpus_module.RequestFilter(CorpusConfig(sources=("self-requests",), prompts="requests"))
    held_out = split_prompts(load_prompts("builtin")).held_out[0].text  # another shipped set's held-out prompt
    training = split_prompts(load_prompts("requests")).train[0].text
    new = "Write a limerick about a cat who runs a small bakery."
    verdicts = [keep.keep(text) for text in (None, training, held_out.rstrip(".?!") + " please", new, new.upper())]
    assert verdicts == [False, False, False, True, False]
    assert keep.counts == {"asked": 5, "kept": 1, "cut_or_short": 1, "repeated": 2, "near_held_out": 1}


def test_written_requests_are_cleaned() -> None:
    assert corpus_module.clean_request(" Write a haiku about rain.\n- Write another") == "Write a haiku about rain."
    assert corpus_module.clean_request("- Explain how tides work.\n") == "Explain how tides work."
    assert corpus_module.clean_request("Explain how tides work and why the") is None  # cut off, no end of line
    assert corpus_module.clean_request("hi\n") is None


def test_generated_questions_are_cleaned() -> None:
    assert corpus_module.clean_question('User: "What is the best bread?"\n\nmore text') == "What is the best bread?"
    assert corpus_module.clean_question('"Question: how do I sort a list?"') == "how do I sort a list?"
    assert corpus_module.clean_question("  hi  ") is None


def test_python_env_files_skip_tests_and_docstrings_read_as_prose(tmp_path) -> None:
    root = tmp_path / "lib"
    (root / "pkg" / "tests").mkdir(parents=True)
    module = '"""Module doc."""\n\ndef f():\n    """F doc."""\n\nclass C:\n    """C doc."""\n'
    (root / "pkg" / "mod.py").write_text(module)
    (root / "pkg" / "tests" / "test_mod.py").write_text("def test(): pass\n")
    (root / "top.py").write_text("x = 1\n")
    files = python_files([root], seed=0)
    assert sorted(i for i, _ in files) == ["lib/pkg/mod.py", "lib/top.py"]
    assert python_files([root], seed=0) == files
    assert docstrings((root / "pkg" / "mod.py").read_text()) == "Module doc.\n\nf: F doc.\n\nC: C doc."
    assert docstrings("x = (") is None and docstrings("x = 1") is None


def test_python_env_source_builds_from_the_stdlib_under_a_cap(tiny, tokenizer, tmp_path) -> None:
    config = small_config(sources=("python-env",), max_tokens_per_source=400, window=64)
    manifest = build_corpus(tiny, tokenizer, config, tmp_path / "c", model_name="tiny", progress=False)
    counts = manifest["sources"]["python-env"]
    assert 400 <= counts["tokens"] < 400 + 64 and counts["records"] >= 400 // 64


def test_output_directory_refusals(tiny, tokenizer, tmp_path) -> None:
    config = small_config(max_prompts=2, temperatures=(0.0,), max_new_tokens=2)
    build_corpus(tiny, tokenizer, config, tmp_path / "c", model_name="tiny", progress=False)
    with pytest.raises(ValueError, match="not empty"):
        build_corpus(tiny, tokenizer, config, tmp_path / "c", model_name="tiny", progress=False)
    build_corpus(tiny, tokenizer, config, tmp_path / "c", model_name="tiny", force=True, progress=False)
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="other files"):
        build_corpus(tiny, tokenizer, config, tmp_path / "c", model_name="tiny", force=True, progress=False)
    missing = small_config(sources=("self", "text"), text_paths=(str(tmp_path / "nope.jsonl"),), max_prompts=1,
                           temperatures=(0.0,), max_new_tokens=2)  # fmt: skip
    with pytest.raises((OSError, ValueError)):  # a source that fails after another wrote records
        build_corpus(tiny, tokenizer, missing, tmp_path / "half", model_name="tiny", progress=False)
    assert not (tmp_path / "half").exists()  # no half corpus (shards without a manifest) is left behind
    with pytest.raises(ValueError, match="sources"):
        CorpusConfig(sources=("web",))
    with pytest.raises(ValueError, match="text path"):
        CorpusConfig(sources=("text",))


def test_a_damaged_shard_is_refused(tiny, tokenizer, tmp_path) -> None:
    build_corpus(tiny, tokenizer, small_config(max_prompts=2), tmp_path / "c", model_name="tiny", progress=False)
    shard = tmp_path / "c" / "shard-00000.jsonl"
    shard.write_bytes(shard.read_bytes().replace(b'"start":', b'"start": ', 1))
    with pytest.raises(ValueError, match="does not match its manifest"):
        list(iter_records(tmp_path / "c"))


def writer_corpus(directory: Path, count: int, seed: int = 0, shard_records: int = 7) -> RecordSource:
    generator = torch.Generator().manual_seed(seed)
    writer = CorpusWriter(directory, shard_records)
    for index in range(count):
        length = int(torch.randint(4, 30, (1,), generator=generator))
        tokens = torch.randint(0, 50, (length,), generator=generator).tolist()
        writer.add(Record(f"r{index}", "text", tokens, int(torch.randint(0, length, (1,), generator=generator))))
    writer.finish({"format": corpus_module.CORPUS_FORMAT, "version": corpus_module.CORPUS_VERSION})
    return RecordSource(directory)


def test_epoch_batches_cover_every_window_once_seeded_by_epoch(tmp_path) -> None:
    source = writer_corpus(tmp_path / "c", 60)
    windows = sorted((tuple(t), s) for r in iter_records(tmp_path / "c") for t, s in record_windows(r, 12))

    def served(epoch: int) -> list[tuple[tuple[int, ...], int]]:
        out = []
        for batch in epoch_batches(source, 5, 12, seed=3, epoch=epoch):
            assert batch.tokens.shape[0] <= 5 and batch.tokens.shape[1] <= 12
            for row, (length, start) in enumerate(zip(batch.lengths, batch.starts, strict=True)):
                assert batch.targets[row].nonzero().flatten().tolist() == list(range(start, length))
                out.append((tuple(batch.tokens[row, :length].tolist()), start))
        return out

    first = served(0)
    assert sorted(first) == windows
    assert served(0) == first and served(1) != first


def test_record_windows_keep_targets_only() -> None:
    record = Record("r", "self", list(range(25)), 13)
    assert record_windows(record, 10) == [(list(range(10, 20)), 3), (list(range(20, 25)), 0)]
    assert record_windows(Record("r", "self", list(range(5)), 4), 10) == [(list(range(5)), 4)]


def test_corpus_command_builds_from_a_model_directory(tiny, tokenizer, tmp_path, capsys) -> None:
    import argparse

    from executor import corpus_cli

    model_dir = tmp_path / "model"
    tiny.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    parser = argparse.ArgumentParser()
    corpus_cli.add_arguments(parser)
    argv = ["--model", str(model_dir), "--out", str(tmp_path / "c"), "--max-prompts", "2", "--temperatures", "0,0.5",
            "--samples", "1", "--max-new-tokens", "3", "--dtype", "float64", "--no-progress"]  # fmt: skip
    assert corpus_cli.run(parser.parse_args(argv)) == 0
    manifest = read_manifest(tmp_path / "c")
    assert manifest["settings"]["temperatures"] == [0.0, 0.5] and manifest["totals"]["records"] == 4
    assert manifest["model"] == str(model_dir) and "4 records" in capsys.readouterr().out
    assert manifest["arguments"]["dtype"] == "float64" == manifest["model_dtype"].removeprefix("torch.")
    with pytest.raises(ValueError, match="corpus sources"):
        corpus_cli.run(parser.parse_args([*argv, "--sources", "self,web"]))
    with pytest.raises(ValueError, match="--time-budget-s must be > 0"):
        corpus_cli.run(parser.parse_args([*argv, "--force", "--time-budget-s", "0"]))
    with pytest.raises(ValueError, match="capture must be one of"):
        CorpusConfig(capture="fast")


def test_a_version_1_corpus_still_reads(tmp_path) -> None:
    writer = CorpusWriter(tmp_path, 4)
    writer.add(Record("a", "text", [1, 2, 3], 0))
    writer.finish({"format": corpus_module.CORPUS_FORMAT, "version": 1})
    assert read_manifest(tmp_path)["version"] == 1 and [r.tokens for r in iter_records(tmp_path)] == [[1, 2, 3]]
    (tmp_path / MANIFEST).write_text(json.dumps({"format": corpus_module.CORPUS_FORMAT, "version": 99}))
    with pytest.raises(ValueError, match="version 1 or 2"):
        read_manifest(tmp_path)


def test_several_corpora_serve_every_window_of_each_once_mixed(tmp_path) -> None:
    one, two = writer_corpus(tmp_path / "a", 30, seed=1), writer_corpus(tmp_path / "b", 40, seed=2)
    both = RecordSource([tmp_path / "a", tmp_path / "b"])
    windows = [(tuple(t), s) for d in ("a", "b") for r in iter_records(tmp_path / d) for t, s in record_windows(r, 12)]
    served = [
        (tuple(b.tokens[row, :length].tolist()), start)
        for b in epoch_batches(both, 5, 12, seed=3, epoch=0)
        for row, (length, start) in enumerate(zip(b.lengths, b.starts, strict=True))
    ]  # fmt: skip
    assert sorted(served) == sorted(windows)
    assert len(both.shards) == len(one.shards) + len(two.shards)
    info = both.describe()
    assert info["corpus_records"] == "70" and info["corpus"] == f"{tmp_path / 'a'},{tmp_path / 'b'}"
    assert info["corpus_manifest_sha256"] not in (one.describe()["corpus_manifest_sha256"],
                                                  two.describe()["corpus_manifest_sha256"])  # fmt: skip
    assert RecordSource([tmp_path / "a"]).describe() == one.describe()  # one directory: as before (resumable)
    with pytest.raises(ValueError, match="given twice"):
        RecordSource([tmp_path / "a", tmp_path / "a"])
    with pytest.raises(ValueError, match="given twice"):
        RecordSource([tmp_path / "a", tmp_path / "b" / ".." / "a"])
    with pytest.raises(FileNotFoundError, match="not a corpus directory"):
        RecordSource([tmp_path / "a", tmp_path / "missing"])
    with pytest.raises(FileNotFoundError, match="manifest.json is a file: a corpus is the directory that holds"):
        RecordSource([tmp_path / "a" / "manifest.json"])
    with pytest.raises(ValueError, match="temperatures must be finite numbers >= 0 .0: greedy., got 0.5,-1"):
        CorpusConfig(temperatures=(0.5, -1.0))
