"""An offline corpus for self-distilling exit heads (`eesd corpus`): token windows the full model is asked to continue.

Sources (each record is a token sequence and the position `start` from which the full model's next-token
distribution is a distillation target):
- `self`: the model's own continuations of a prompt set's split (`executor.prompts.split_prompts`; `train` by
  default, never the held-out prompts unless `split="held-out"` builds the evaluation corpus), in left-padded
  batches through `executor.api.generate`: greedy (temperature 0) and sampled at each other temperature `samples`
  times. Sampling is exact (`executor.sampling`: Gumbel noise keyed by (seed, position)), with a seed per row derived
  from the corpus seed, the prompt's id, the temperature and the sample index: a record is a function of those
  alone, whatever the batch it ran in or its size, and no two rows share their noise (version 1 derived one seed per
  (temperature, sample) for every prompt, so that the rows of a batch drew the same noise). `start` = len(prompt) - 1:
  targets are the positions that predict generated tokens.
- `self-prompts`: questions the model writes itself, through its chat template, on the `TOPICS` shipped here
  (split by topic as prompts are), sampled, each ask (topic, question number) with its own seed; then its answers to
  them, exactly as `self`.
- `self-requests`: new requests the model writes itself, in the kinds (categories) of the prompt set's training
  split: for each kind, `self_requests_per_kind` asks, each a plain-text list (no chat template) of
  `SELF_REQUEST_EXAMPLES` training requests of that kind drawn with the ask's own seed, left open at a new item; the
  model's sampled next line is the request. Lines cut off at `SELF_REQUEST_TOKENS`, too short, already written (or in
  the set) or a near copy (`executor.prompts.near_copy`) of a held-out prompt of the set or of a shipped set are
  dropped, so held-out evaluation stays unseen; the kept ones are written to `requests.jsonl` (a prompt file) and
  the manifest counts the drops (`self_requests`). Then its answers to them, exactly as `self`.
- `text`: text files, JSONL files (a `text` or `prompt` field per line) and directories (recursively, files with a
  `TEXT_SUFFIXES` suffix), tokenized and cut into windows of `window` tokens, teacher-forced from position 0.
- `python-env`: the Python sources of the installed environment (the stdlib from `sysconfig`, optionally
  site-packages) and their docstrings, for code models: windows as `text`.
Documents (files, JSONL lines, modules) are split into train / held-out by `split_score` of their id, so the
held-out corpus of a text source never shares a document with its training corpus.

Output: a directory of JSONL shards (`shard-00000.jsonl`, one record per line: `id`, `source`, `start`, `tokens`,
and for generated records `prompt_id`, `temperature`, `seed`) and `manifest.json` (`CORPUS_FORMAT`, version, model
name, fingerprint, dtype and device, tokenizer, seed, the exact settings and command-line arguments, per-source
record / token / target counts, duplicates dropped, each shard's records and sha256). Each shard is written
atomically (temporary file + rename) once full, the manifest last, so a directory with a manifest is complete.
Records are deduplicated by a hash of their token ids (the first one is kept). The same settings give byte-identical
shards (and manifest, but for the command line recorded there). Memory stays bounded: one shard's lines, one batch
of generation and the set of record hashes.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from executor.heads import atomic_write, model_fingerprint
from executor.passes import CAPTURE_MODES
from executor.prompts import (
    SHIPPED_SETS,
    Prompt,
    common_words,
    encode_prompt,
    load_prompts,
    near_copy,
    split_prompts,
    split_score,
    words,
)
from sim.progress import progress_bar

CORPUS_FORMAT = "eesd-corpus"
CORPUS_VERSION = 2  # 2: a sampling seed per row (records of version 1 read the same; they were sampled otherwise)
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
SOURCES = ("self", "self-prompts", "self-requests", "text", "python-env")
SPLITS = ("train", "held-out")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs",
                 ".toml", ".yaml", ".yml", ".html", ".tex", ".csv")  # fmt: skip
SKIPPED_DIRS = ("test", "tests", "__pycache__", "site-packages", "idlelib", "turtledemo")
SELF_PROMPT_REQUEST = (
    "Write one question or request that a user might send to an AI assistant about {topic}. "
    "Reply with the question only."
)
SELF_PROMPT_TEMPERATURE = 1.0
SELF_PROMPT_TOKENS = 64
MIN_PROMPT_CHARS = 12
SELF_REQUEST_HEADER = "Requests that users sent to an AI assistant:\n"
SELF_REQUEST_EXAMPLES = 6
SELF_REQUEST_TEMPERATURE = 0.8
SELF_REQUEST_TOKENS = 48
REQUESTS_FILE = "requests.jsonl"
TOPICS = (
    "cooking a weeknight dinner", "baking bread", "personal finance and budgeting", "planning a trip abroad",
    "packing for a hike", "writing a polite email", "preparing for a job interview", "learning a new language",
    "keeping a houseplant alive", "training a puppy", "fixing a leaking tap", "choosing a laptop",
    "staying productive at home", "sleeping better", "a beginner's running plan", "healthy snacks",
    "the history of the Roman Empire", "the French Revolution", "how vaccines work", "photosynthesis",
    "black holes", "the water cycle", "plate tectonics", "climate change", "how the internet works",
    "electric cars", "renewable energy", "the human immune system", "DNA and genes", "the stock market",
    "inflation", "supply and demand", "a short poem about the sea", "a bedtime story for a child",
    "a birthday message for a friend", "summarising a news article", "a product description", "a haiku about autumn",
    "Python lists and dictionaries", "writing a Python function", "recursion", "sorting algorithms",
    "SQL queries", "regular expressions", "git branches", "debugging a stack trace", "unit testing",
    "JavaScript promises", "HTML and CSS layout", "the Linux command line", "object-oriented programming",
    "big-O notation", "linear equations", "fractions and percentages", "probability with dice",
    "the Pythagorean theorem", "derivatives in calculus", "prime numbers", "a math word problem about trains",
    "unit conversions", "statistics: mean, median and mode", "compound interest", "the rules of chess",
    "a famous painting", "classical music", "the plot of a well-known novel", "philosophy of ethics",
    "world geography", "the solar system", "first aid basics", "ordering food politely in a restaurant",
)  # fmt: skip


@dataclass(frozen=True)
class CorpusConfig:
    """Everything that fixes a corpus besides the model: the same config and model give byte-identical shards."""

    sources: tuple[str, ...] = ("self",)
    seed: int = 0
    split: str = "train"
    held_out_fraction: float = 0.25
    prompts: str = "builtin"
    max_prompts: int | None = None
    temperatures: tuple[float, ...] = (0.0, 0.7, 1.0)
    samples: int = 2  # per temperature > 0 (greedy once)
    max_new_tokens: int = 128
    batch_size: int = 32
    self_prompts_per_topic: int = 2
    self_requests_per_kind: int = 32
    text_paths: tuple[str, ...] = ()
    python_env: str = "stdlib"  # stdlib | all (site-packages too)
    window: int = 256
    min_window: int = 16
    max_tokens_per_source: int | None = None
    shard_records: int = 1024
    capture: str = "auto"  # how generation runs its passes (`executor.api.generate`); tokens are the same either way

    def __post_init__(self) -> None:
        unknown = [s for s in self.sources if s not in SOURCES]
        if not self.sources or unknown:
            raise ValueError(f"corpus sources must be among {', '.join(SOURCES)}, got {', '.join(self.sources)}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        if not self.temperatures or any(not math.isfinite(t) or t < 0 for t in self.temperatures):
            given = ",".join(f"{t:g}" for t in self.temperatures) or "none"
            raise ValueError(f"temperatures must be finite numbers >= 0 (0: greedy), got {given}")
        if len(set(self.temperatures)) < len(self.temperatures):
            given = ",".join(f"{t:g}" for t in self.temperatures)
            raise ValueError(f"temperatures must each be given once (a repeat generates the same answers), got {given}")
        for name in ("samples", "max_new_tokens", "batch_size", "self_prompts_per_topic", "self_requests_per_kind",
                     "window", "shard_records"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.python_env not in ("stdlib", "all"):
            raise ValueError(f"python_env must be 'stdlib' or 'all', got {self.python_env!r}")
        if self.capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {', '.join(CAPTURE_MODES)}, got {self.capture!r}")
        if "text" in self.sources and not self.text_paths:
            raise ValueError("source 'text' needs at least one text path")
        for name in ("max_prompts", "max_tokens_per_source"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset: no limit), got {getattr(self, name)}")


@dataclass(frozen=True)
class Record:
    id: str
    source: str
    tokens: list[int]
    start: int  # the first position whose next-token distribution is a target
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def targets(self) -> int:
        return len(self.tokens) - self.start

    def line(self) -> str:
        body = {"id": self.id, "source": self.source, "start": self.start, "tokens": self.tokens} | self.meta
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def parse(cls, line: str) -> Record:
        body = json.loads(line)
        fixed = {key: body.pop(key) for key in ("id", "source", "start", "tokens")}
        return cls(meta=body, **fixed)


@dataclass
class SourceCount:
    records: int = 0
    tokens: int = 0
    targets: int = 0
    duplicates: int = 0


def derive_seed(seed: int, *parts: object) -> int:
    """A seed in [0, 2^31) that is a function of the corpus seed and `parts` alone."""
    text = "\0".join(str(part) for part in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1


def token_hash(tokens: Sequence[int]) -> bytes:
    return hashlib.sha256(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes()).digest()[:16]


class CorpusWriter:
    """Streams records into shards of `shard_records` lines (each written atomically once full), deduplicated."""

    def __init__(self, out: Path, shard_records: int, deadline: float | None = None) -> None:
        self.out, self.shard_records, self.deadline = out, shard_records, deadline
        self.cut = False  # set once a generated source stopped at the deadline (`out_of_time`)
        self.interrupted = False  # set by a Ctrl-C (`stop_on_interrupt`): every source stops at its next batch
        self.seen: set[bytes] = set()
        self.lines: list[str] = []
        self.shards: list[dict[str, Any]] = []
        self.counts: dict[str, SourceCount] = {}
        self.notes: dict[str, Any] = {}  # a source's own counts, for the manifest
        self.shard_tokens = 0

    def count(self, source: str) -> SourceCount:
        return self.counts.setdefault(source, SourceCount())

    def out_of_time(self) -> bool:
        """True (and remembered as `cut`) once the build's time budget is spent, or once it was interrupted:
        generation starts no new batch."""
        self.cut = self.cut or (self.deadline is not None and time.perf_counter() >= self.deadline)
        return self.cut or self.interrupted

    def add(self, record: Record) -> bool:
        """Queue `record` for the current shard; False (and counted) if its tokens were seen before."""
        count, digest = self.count(record.source), token_hash(record.tokens)
        if digest in self.seen:
            count.duplicates += 1
            return False
        self.seen.add(digest)
        self.lines.append(record.line())
        count.records, count.tokens, count.targets = (
            count.records + 1, count.tokens + len(record.tokens), count.targets + record.targets,
        )  # fmt: skip
        self.shard_tokens += len(record.tokens)
        if len(self.lines) >= self.shard_records:
            self.flush()
        return True

    def flush(self) -> None:
        if not self.lines:
            return
        name = f"shard-{len(self.shards):05d}.jsonl"
        data = ("\n".join(self.lines) + "\n").encode()
        atomic_write(self.out / name, lambda temp: Path(temp).write_bytes(data))
        digest = hashlib.sha256(data).hexdigest()
        self.shards.append({"file": name, "records": len(self.lines), "tokens": self.shard_tokens, "sha256": digest})
        self.lines, self.shard_tokens = [], 0

    def finish(self, header: dict[str, Any]) -> dict[str, Any]:
        """Write the last shard, then the manifest; returns the manifest."""
        self.flush()
        counts = {name: asdict(count) for name, count in self.counts.items()}
        totals = {key: sum(c[key] for c in counts.values()) for key in ("records", "tokens", "targets", "duplicates")}
        manifest = header | self.notes | {"sources": counts, "totals": totals, "shards": self.shards}
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        atomic_write(self.out / MANIFEST, lambda temp: Path(temp).write_text(text))
        return manifest


@contextlib.contextmanager
def stop_on_interrupt(writer: CorpusWriter) -> Iterator[None]:
    """A Ctrl-C (SIGINT) while building asks every source to stop at its next batch or window (`writer.interrupted`)
    instead of raising in the middle of a record, so what was made is written whole; a second one raises at once.
    Only in the main thread, where Python handles signals."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None:  # not the main thread, or a handler not set from Python
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        writer.interrupted = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def prepare_output(out: Path, force: bool) -> None:
    """An empty output directory; `force` removes a previous corpus there (its manifest first), nothing else."""
    out.mkdir(parents=True, exist_ok=True)
    temps = [*out.glob(".shard-*.tmp"), *out.glob(f".{MANIFEST}.*.tmp")]  # left by an interrupted build
    temps += list(out.glob(f".{REQUESTS_FILE}.*.tmp"))
    ours = [out / MANIFEST, *sorted(out.glob("shard-*.jsonl")), out / REQUESTS_FILE, *sorted(temps)]
    present = [p for p in ours if p.exists()]
    if present and not force:
        raise ValueError(f"corpus directory {out} is not empty; pass --force to replace the corpus there")
    foreign = sorted(set(out.iterdir()) - set(ours))
    if foreign:
        raise ValueError(f"corpus directory {out} holds other files ({foreign[0].name}, ...): use an empty directory")
    for path in present:
        path.unlink()


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer), "vocab_sha256": digest}


def build_corpus(
    model: torch.nn.Module,
    tokenizer: Any,
    config: CorpusConfig,
    out: str | os.PathLike[str],
    *,
    model_name: str,
    arguments: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    time_budget_s: float | None = None,
) -> dict[str, Any]:
    """Build the corpus of `config` into the directory `out`; returns its manifest, which records `arguments` (the
    command line's, say) besides the settings. With `time_budget_s`, the generated sources start no batch past that
    many seconds: the corpus is then the first batches of the full one, and the manifest says it was cut
    (`cut_by_time_budget`). Interrupted (Ctrl-C), the records made so far are written as a corpus whose manifest says
    `interrupted: true`, and the KeyboardInterrupt names it; a folder this build made and left empty is removed."""
    directory = Path(out)
    created = not directory.exists()
    prepare_output(directory, force)
    deadline = None if time_budget_s is None else time.perf_counter() + time_budget_s
    writer = CorpusWriter(directory, config.shard_records, deadline)
    interrupted = False
    try:
        with stop_on_interrupt(writer):
            for source in config.sources:
                BUILDERS[source](model, tokenizer, config, writer, progress)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread's handler
        interrupted = True
    except BaseException:  # a source that failed (a text path that is not there, ...): no half corpus is left
        if created and directory.exists():
            shutil.rmtree(directory)
        raise
    interrupted = interrupted or writer.interrupted
    records = sum(count.records for count in writer.counts.values())
    if not records:
        if created and not any(directory.iterdir()):
            directory.rmdir()  # a folder this build made and left empty
        if interrupted:
            raise KeyboardInterrupt(f"before the first record of corpus {directory}; nothing was written")
        if writer.cut:
            raise ValueError(f"corpus {directory}: the time budget ({time_budget_s:g} s) ended before the first "
                             "record; nothing was written")  # fmt: skip
        raise ValueError(
            f"corpus {directory}: the sources ({', '.join(config.sources)}) gave no record with a target position "
            "(empty text files? texts shorter than the window's minimum?); nothing was written"
        )
    header = {
        "format": CORPUS_FORMAT, "version": CORPUS_VERSION, "model": model_name,
        "model_fingerprint": model_fingerprint(model), "model_dtype": str(next(model.parameters()).dtype),
        "device": next(model.parameters()).device.type, "tokenizer": tokenizer_info(tokenizer), "seed": config.seed,
        "split": config.split, "settings": asdict(config), "arguments": arguments or {},
        "time_budget_s": time_budget_s, "cut_by_time_budget": writer.cut, "interrupted": interrupted,
    }  # fmt: skip
    manifest = writer.finish(header)
    if interrupted:  # the records made so far are a corpus: the first batches and windows of the whole one
        tokens = manifest["totals"]["tokens"]
        raise KeyboardInterrupt(
            f"after {records:,} records ({tokens:,} tokens): {directory / MANIFEST} written (interrupted: true), a "
            "usable corpus of the first batches; the same command with --force builds the whole one"
        )
    return manifest


# --- generated sources --------------------------------------------------------------------------------------------


def eos_ids(model: torch.nn.Module) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def until_eos(tokens: list[int], eos: Sequence[int]) -> list[int]:
    """`tokens` up to and including the first EOS id."""
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens


def continue_batch(
    model: torch.nn.Module, prompts: Sequence[list[int]], max_new_tokens: int, eos: Sequence[int],
    temperature: float = 0.0, seed: int | Sequence[int] = 0, capture: str = "auto",
) -> list[list[int]]:  # fmt: skip
    """The model's continuations of `prompts` (one left-padded batch; greedy at temperature 0, else exact sampling
    keyed by `seed`: one for all rows, or one per row), each cut after its first EOS."""
    from executor.api import generate

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    seed = seed if isinstance(seed, int) else list(seed)
    sampled = {"do_sample": True, "temperature": temperature, "seed": seed} if temperature > 0 else {}
    out = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=list(eos) or None,
                   pad_token_id=0, capture=capture, **sampled)  # fmt: skip
    return [until_eos(row, eos) for row in out.sequences[:, width:].tolist()]


def generation_plan(config: CorpusConfig) -> list[tuple[float, int]]:
    """(temperature, sample index) pairs: greedy once, every other temperature `samples` times."""
    return [(t, s) for t in config.temperatures for s in range(1 if t == 0 else config.samples)]


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for first in range(0, len(items), size):
        yield items[first : first + size]


def write_answers(
    model: torch.nn.Module, prompts: Sequence[tuple[str, list[int]]], source: str, config: CorpusConfig,
    writer: CorpusWriter, progress: bool,
) -> None:  # fmt: skip
    """The model's continuations of (id, tokens) prompts at every (temperature, sample) of the plan, as records,
    batch by batch of prompts (a token cap keeps every temperature of the prompts it reaches)."""
    ordered = sorted(prompts, key=lambda item: (len(item[1]), item[0]))  # similar lengths share a batch
    plan, eos, cap = generation_plan(config), eos_ids(model), config.max_tokens_per_source
    total = len(plan) * -(-len(ordered) // config.batch_size)
    with progress_bar(total, f"corpus {source}", "batch", progress) as bar:
        for chunk in _batches(ordered, config.batch_size):
            for temperature, sample in plan:
                if (cap is not None and writer.count(source).tokens >= cap) or writer.out_of_time():
                    return
                seeds = [derive_seed(config.seed, source, prompt_id, temperature, sample) for prompt_id, _ in chunk]
                rows = continue_batch(model, [t for _, t in chunk], config.max_new_tokens, eos, temperature, seeds,
                                      config.capture)  # fmt: skip
                for (prompt_id, tokens), new, seed in zip(chunk, rows, seeds, strict=True):
                    meta = {"prompt_id": prompt_id, "temperature": temperature, "seed": seed if temperature else None}
                    record_id = f"{source}/{prompt_id}/t{temperature:g}/s{sample}"
                    writer.add(Record(record_id, source, tokens + new, len(tokens) - 1, meta))
                bar.set_postfix(tokens=writer.count(source).tokens)
                bar.update(1)


def split_of(prompts: Sequence[Prompt], config: CorpusConfig) -> tuple[Prompt, ...]:
    split = split_prompts(prompts, config.held_out_fraction)
    chosen = split.train if config.split == "train" else split.held_out
    return chosen[: config.max_prompts]


def build_self(model: torch.nn.Module, tokenizer: Any, config: CorpusConfig, writer: CorpusWriter, progress: bool):
    prompts = split_of(load_prompts(config.prompts), config)
    encoded = [(p.id, encode_prompt(tokenizer, p.text)) for p in prompts]
    write_answers(model, encoded, "self", config, writer, progress)


def topic_prompts() -> list[Prompt]:
    return [Prompt(id=f"topic/{index:03d}", text=topic, category="topic") for index, topic in enumerate(TOPICS)]


def sampled_texts(
    model: torch.nn.Module, tokenizer: Any, asks: Sequence[tuple[str, list[int]]], max_new_tokens: int,
    temperature: float, seed_tag: str, config: CorpusConfig, writer: CorpusWriter, progress: bool, label: str,
) -> Iterator[tuple[str, str]]:  # fmt: skip
    """(ask id, decoded text) of the model's sampled continuation of each (id, tokens) ask, batch by batch, each ask
    with its own seed (from the corpus seed, `seed_tag` and its id); no batch starts past the writer's time budget."""
    eos = eos_ids(model)
    with progress_bar(-(-len(asks) // config.batch_size), label, "batch", progress) as bar:
        for chunk in _batches(asks, config.batch_size):
            if writer.out_of_time():
                return
            seeds = [derive_seed(config.seed, seed_tag, ask_id) for ask_id, _ in chunk]
            rows = continue_batch(model, [t for _, t in chunk], max_new_tokens, eos, temperature, seeds, config.capture)
            for (ask_id, _), row in zip(chunk, rows, strict=True):
                yield ask_id, tokenizer.decode(row, skip_special_tokens=True)
            bar.update(1)


def self_questions(
    model: torch.nn.Module, tokenizer: Any, config: CorpusConfig, progress: bool, writer: CorpusWriter
) -> list[tuple[str, list[int]]]:
    """Questions the model writes on the split's topics (sampled), as (id, encoded prompt) pairs."""
    topics = split_of(topic_prompts(), config)
    asks = [(f"{t.id}/q{n}", encode_prompt(tokenizer, SELF_PROMPT_REQUEST.format(topic=t.text)))
            for n in range(config.self_prompts_per_topic) for t in topics]  # fmt: skip
    texts = sampled_texts(model, tokenizer, asks, SELF_PROMPT_TOKENS, SELF_PROMPT_TEMPERATURE, "self-prompts/questions",
                          config, writer, progress, "corpus self-prompts: questions")  # fmt: skip
    questions = [(ask_id, clean_question(text)) for ask_id, text in texts]
    return [(ask_id, encode_prompt(tokenizer, text)) for ask_id, text in questions if text is not None]


def clean_question(text: str) -> str | None:
    """The first paragraph of a generated question, without a speaker label or quotes; None when too short."""
    paragraph = text.strip().split("\n\n")[0].strip().strip('"')
    paragraph = re.sub(r"^(user|question|q)\s*:\s*", "", paragraph, flags=re.IGNORECASE).strip().strip('"').strip()
    return paragraph if len(paragraph) >= MIN_PROMPT_CHARS else None


def build_self_prompts(
    model: torch.nn.Module, tokenizer: Any, config: CorpusConfig, writer: CorpusWriter, progress: bool
) -> None:
    questions = self_questions(model, tokenizer, config, progress, writer)
    write_answers(model, questions, "self-prompts", config, writer, progress)


def request_asks(config: CorpusConfig, tokenizer: Any) -> list[tuple[str, str, list[int]]]:
    """(ask id, kind, encoded list prompt) for every ask: `self_requests_per_kind` per kind of the split's prompts,
    each listing `SELF_REQUEST_EXAMPLES` of that kind's prompts drawn with the ask's own seed."""
    by_kind: dict[str, list[Prompt]] = {}
    for prompt in split_of(load_prompts(config.prompts), config):
        by_kind.setdefault(prompt.category or "request", []).append(prompt)
    asks = []
    for n in range(config.self_requests_per_kind):
        for kind in sorted(by_kind):
            ask_id = f"{kind}/w{n:03d}"
            draw = random.Random(derive_seed(config.seed, "self-requests/examples", ask_id))
            examples = draw.sample(by_kind[kind], min(SELF_REQUEST_EXAMPLES, len(by_kind[kind])))
            text = SELF_REQUEST_HEADER + "".join(f"- {' '.join(p.text.split())}\n" for p in examples) + "-"
            asks.append((ask_id, kind, encode_prompt(tokenizer, text, chat=False)))
    return asks


def clean_request(text: str) -> str | None:
    """The list item the model wrote (its first line); None when the line was cut off or is too short."""
    if "\n" not in text:
        return None
    line = text.split("\n", 1)[0].strip().removeprefix("-").strip()
    return line if len(line) >= MIN_PROMPT_CHARS else None


def word_key(text: str) -> str:
    """What two requests share when they are the same words, whatever their order, case or punctuation."""
    return " ".join(sorted(words(text)))


class RequestFilter:
    """Keeps a written request unless it repeats a prompt of the set or of a shipped set, or one kept before (the same
    words, whatever their order, case or punctuation), or is a near copy of a held-out prompt of the set or of a
    shipped set; counts what it drops, and why."""

    def __init__(self, config: CorpusConfig) -> None:
        prompts = load_prompts(config.prompts)
        sets = [prompts] + [load_prompts(name) for name in SHIPPED_SETS if name != config.prompts]
        self.held_out = [p.text for s in sets for p in split_prompts(s, config.held_out_fraction).held_out]
        self.common = common_words([p.text for s in sets for p in s])
        self.seen = {word_key(p.text) for s in sets for p in s}
        self.counts = {"asked": 0, "kept": 0, "cut_or_short": 0, "repeated": 0, "near_held_out": 0}

    def keep(self, text: str | None) -> bool:
        self.counts["asked"] += 1
        key = None if text is None else word_key(text)
        reason = (
            "cut_or_short" if text is None else "repeated" if key in self.seen
            else "near_held_out" if any(near_copy(text, other, self.common) for other in self.held_out) else "kept"
        )  # fmt: skip
        self.counts[reason] += 1
        if reason == "kept":
            self.seen.add(key)
        return reason == "kept"


def self_requests(
    model: torch.nn.Module, tokenizer: Any, config: CorpusConfig, writer: CorpusWriter, progress: bool
) -> list[Prompt]:
    """New requests the model writes in the kinds of the split's prompts (sampled, each ask with its own seed)."""
    asks, keep = request_asks(config, tokenizer), RequestFilter(config)
    kinds = {ask_id: kind for ask_id, kind, _ in asks}
    texts = sampled_texts(model, tokenizer, [(ask_id, tokens) for ask_id, _, tokens in asks], SELF_REQUEST_TOKENS,
                          SELF_REQUEST_TEMPERATURE, "self-requests/requests", config, writer, progress,
                          "corpus self-requests: requests")  # fmt: skip
    written = [(ask_id, clean_request(text)) for ask_id, text in texts]
    kept = [Prompt(id=ask_id, text=text, category=kinds[ask_id]) for ask_id, text in written if keep.keep(text)]
    writer.notes["self_requests"] = keep.counts
    return kept


def build_self_requests(
    model: torch.nn.Module, tokenizer: Any, config: CorpusConfig, writer: CorpusWriter, progress: bool
) -> None:
    requests = self_requests(model, tokenizer, config, writer, progress)
    lines = "".join(json.dumps({"id": p.id, "category": p.category, "prompt": p.text}) + "\n" for p in requests)
    atomic_write(writer.out / REQUESTS_FILE, lambda temp: Path(temp).write_text(lines))
    encoded = [(p.id, encode_prompt(tokenizer, p.text)) for p in requests]
    write_answers(model, encoded, "self-requests", config, writer, progress)


# --- text sources -------------------------------------------------------------------------------------------------


def in_split(document_id: str, config: CorpusConfig) -> bool:
    """A document is held out iff its `split_score` falls in the lowest `held_out_fraction` of the range."""
    held_out = split_score(document_id) < config.held_out_fraction * 2**64
    return held_out == (config.split == "held-out")


def windows(tokens: Sequence[int], window: int, min_window: int) -> Iterator[list[int]]:
    """Consecutive windows of `window` tokens; a last, shorter one if it has at least `min_window`."""
    for first in range(0, len(tokens), window):
        piece = list(tokens[first : first + window])
        if len(piece) >= min(min_window, window):
            yield piece


def text_files(path: Path) -> list[tuple[str, Path]]:
    """(id, path) of a file, or of a directory's text files; ids are relative to the path given (its name, then the
    path inside it), so that the split does not depend on the working directory."""
    if path.is_file():
        return [(path.name, path)]
    if not path.is_dir():
        raise FileNotFoundError(f"text source {path} is neither a file nor a directory")
    found = (p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    return sorted((f"{path.name}/{p.relative_to(path).as_posix()}", p) for p in found)


def documents(file_id: str, path: Path) -> Iterator[tuple[str, str]]:
    """(document id, text) of a file, or of each line of a JSONL file (its `text` or `prompt` field)."""
    if path.suffix != ".jsonl":
        text = _read_text(path)
        if text:
            yield file_id, text
        return
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                yield f"{file_id}:{lineno}", _jsonl_text(line, f"{path}:{lineno}")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary or unreadable files in a directory are not text


def _jsonl_text(line: str, where: str) -> str:
    try:
        body = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    text = body.get("text", body.get("prompt")) if isinstance(body, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a JSON object with a string 'text' or 'prompt' field")
    return text


def write_documents(
    files: Sequence[tuple[str, Path]], read: Callable[[str, Path], Iterable[tuple[str, str]]], source: str,
    tokenizer: Any, config: CorpusConfig, writer: CorpusWriter, progress: bool,
) -> None:  # fmt: skip
    """Tokenize the split's documents (`read(file id, path)` gives a file's) and write their windows, until the
    source's token cap."""
    cap = config.max_tokens_per_source
    with progress_bar(len(files), f"corpus {source}", "file", progress) as bar:
        for file_id, path in files:
            for doc_id, text in read(file_id, path):
                if not in_split(doc_id, config):
                    continue
                tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
                for index, piece in enumerate(windows(tokens, config.window, config.min_window)):
                    if (cap is not None and writer.count(source).tokens >= cap) or writer.interrupted:
                        return
                    writer.add(Record(f"{source}/{doc_id}/w{index}", source, piece, 0))
            bar.set_postfix(tokens=writer.count(source).tokens)
            bar.update(1)


def build_text(model: torch.nn.Module, tokenizer: Any, config: CorpusConfig, writer: CorpusWriter, progress: bool):
    files = [item for path in config.text_paths for item in text_files(Path(path))]
    write_documents(files, documents, "text", tokenizer, config, writer, progress)


def python_roots(which: str) -> list[Path]:
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"])]
    if which == "all":
        roots += sorted({Path(paths["purelib"]), Path(paths["platlib"])})
    return roots


def python_files(roots: Sequence[Path], seed: int) -> list[tuple[str, Path]]:
    """(id, path) of the roots' .py files outside test and cache directories, in an order fixed by the seed, so
    that a token cap keeps a seeded sample of the environment rather than its alphabetical start."""
    found = []
    for root in roots:
        for path in root.rglob("*.py"):
            relative = path.relative_to(root)
            if not any(part in SKIPPED_DIRS for part in relative.parts[:-1]):
                found.append((f"{root.name}/{relative.as_posix()}", path))
    return sorted(found, key=lambda item: (derive_seed(seed, "python-env", item[0]), item[0]))


def docstrings(source: str) -> str | None:
    """A module's docstrings as prose: the module's, then `name: docstring` for each class and function."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts = [ast.get_docstring(tree) or ""]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(node):
            parts.append(f"{node.name}: {ast.get_docstring(node)}")
    text = "\n\n".join(p for p in parts if p)
    return text or None


def python_documents(doc_id: str, path: Path) -> Iterator[tuple[str, str]]:
    """A module's source, then its docstrings as prose."""
    source = _read_text(path)
    if not source:
        return
    yield doc_id, source
    prose = docstrings(source)
    if prose:
        yield f"{doc_id}#docstrings", prose


def build_python_env(
    model: torch.nn.Module, tokenizer: Any, config: CorpusConfig, writer: CorpusWriter, progress: bool
) -> None:
    files = python_files(python_roots(config.python_env), config.seed)
    write_documents(files, python_documents, "python-env", tokenizer, config, writer, progress)


BUILDERS: dict[str, Callable[..., None]] = {
    "self": build_self, "self-prompts": build_self_prompts, "self-requests": build_self_requests,
    "text": build_text, "python-env": build_python_env,
}  # fmt: skip


# --- reading ------------------------------------------------------------------------------------------------------


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """A corpus directory's manifest, checked for format and version."""
    path = Path(directory) / MANIFEST
    if Path(directory).is_file():
        raise FileNotFoundError(f"{directory} is a file: a corpus is the directory that holds {MANIFEST} and its "
                                "shards (eesd corpus --out)")  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a corpus directory (no {MANIFEST}; build one with eesd corpus)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not JSON ({err}); rebuild the corpus with eesd corpus") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object (the corpus manifest), got {type(manifest).__name__}")
    if manifest.get("format") != CORPUS_FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        versions = " or ".join(map(str, READABLE_VERSIONS))
        raise ValueError(f"{path}: not an {CORPUS_FORMAT} manifest of version {versions}")
    return manifest


def manifest_sha256(directory: str | os.PathLike[str]) -> str:
    return hashlib.sha256((Path(directory) / MANIFEST).read_bytes()).hexdigest()


def read_shard(directory: str | os.PathLike[str], shard: dict[str, Any]) -> list[Record]:
    """One shard's records, after checking its bytes against the manifest."""
    path = Path(directory) / shard["file"]
    if not path.is_file():
        raise FileNotFoundError(f"corpus shard {path}, listed in {Path(directory) / MANIFEST}, is missing: rebuild the "
                                "corpus")  # fmt: skip
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise ValueError(f"corpus shard {path} does not match its manifest (changed or damaged): rebuild the corpus")
    return [Record.parse(line) for line in data.decode().splitlines() if line]


def iter_records(directory: str | os.PathLike[str]) -> Iterator[Record]:
    """Every record of a corpus, shard by shard (one shard in memory at a time)."""
    for shard in read_manifest(directory)["shards"]:
        yield from read_shard(directory, shard)


# --- loading for training: record sources, windows, packed batches ------------------------------------------------

POOL_BATCHES = 64  # batches whose windows are sorted by length together: little padding, still well mixed


class RecordSource:
    """Records in shards, read one shard at a time: one corpus directory or several (their shards shuffled together
    each epoch, so that small shards mix them well), or a list held in memory (`from_records`)."""

    def __init__(
        self, directory: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        records: Sequence[Record] = (),
    ) -> None:  # fmt: skip
        given = [] if directory is None else [directory] if isinstance(directory, (str, os.PathLike)) else directory
        self.directories = [Path(d) for d in given]
        if len({d.resolve() for d in self.directories}) != len(self.directories):
            raise ValueError(f"corpus directories given twice: {', '.join(map(str, self.directories))}")
        self.records = list(records)
        self.manifests = [read_manifest(d) for d in self.directories]
        for directory, manifest in zip(self.directories, self.manifests, strict=True):
            if not manifest["shards"]:
                raise ValueError(f"corpus {directory}: holds no records (its manifest lists no shard)")
        self.shards: list[Any] = [(i, s) for i, m in enumerate(self.manifests) for s in m["shards"]] or [None]

    @classmethod
    def from_records(cls, records: Sequence[Record]) -> RecordSource:
        return cls(records=records)

    @property
    def directory(self) -> Path | None:
        """The (first) corpus directory; None for records in memory."""
        return self.directories[0] if self.directories else None

    @property
    def manifest(self) -> dict[str, Any] | None:
        return self.manifests[0] if self.manifests else None

    def read(self, index: int) -> list[Record]:
        if not self.directories:
            return self.records
        corpus, shard = self.shards[index]
        return read_shard(self.directories[corpus], shard)

    def describe(self) -> dict[str, str]:
        """What identifies the data (for a checkpoint and a head's metadata)."""
        if not self.directories:
            return {"corpus": "in-memory", "corpus_records": str(len(self.records))}
        digests = [manifest_sha256(d) for d in self.directories]
        digest = digests[0] if len(digests) == 1 else hashlib.sha256(",".join(digests).encode()).hexdigest()
        return {
            "corpus": ",".join(map(str, self.directories)), "corpus_manifest_sha256": digest,
            "corpus_records": str(sum(m["totals"]["records"] for m in self.manifests)),
            "corpus_tokens": str(sum(m["totals"]["tokens"] for m in self.manifests)),
        }  # fmt: skip


@dataclass
class Batch:
    """Right-padded windows: tokens [B, T] and the target positions [B, T] (whose next token is distilled)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    lengths: list[int]
    starts: list[int]

    @property
    def token_count(self) -> int:
        return sum(self.lengths)

    @property
    def target_count(self) -> int:
        return int(self.targets.sum())


Window = tuple[list[int], int]  # tokens, the first target position


def record_windows(record: Record, window: int) -> list[Window]:
    """The record cut into consecutive windows of at most `window` tokens, those holding a target position."""
    pieces = []
    for first in range(0, len(record.tokens), window):
        piece, start = record.tokens[first : first + window], max(record.start - first, 0)
        if start < len(piece):
            pieces.append((piece, start))
    return pieces


def make_batch(items: Sequence[Window]) -> Batch:
    width = max(len(tokens) for tokens, _ in items)
    tokens = torch.tensor([list(t) + [0] * (width - len(t)) for t, _ in items])
    positions = torch.arange(width)
    targets = torch.stack([(positions >= start) & (positions < len(t)) for t, start in items])
    return Batch(tokens, targets, [len(t) for t, _ in items], [start for _, start in items])


def _pool_batches(pool: list[Window], batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    ordered = sorted(pool, key=lambda item: len(item[0]))  # stable: equal lengths keep their shuffled order
    chunks = [ordered[first : first + batch_size] for first in range(0, len(ordered), batch_size)]
    order = torch.randperm(len(chunks), generator=generator).tolist()  # drawn before the next pool's shuffle
    return (make_batch(chunks[i]) for i in order)


def epoch_batches(source: RecordSource, batch_size: int, window: int, seed: int, epoch: int) -> Iterator[Batch]:
    """One epoch of packed batches, a function of (seed, epoch): shards in a shuffled order, each shard's windows
    shuffled into a pool of `POOL_BATCHES` batches, sorted by length there and cut into batches, served in a
    shuffled order. One shard and one pool of token ids are in memory at a time."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    pool: list[Window] = []
    for shard in torch.randperm(len(source.shards), generator=generator).tolist():
        items = [piece for record in source.read(shard) for piece in record_windows(record, window)]
        for index in torch.randperm(len(items), generator=generator).tolist():
            pool.append(items[index])
            if len(pool) == POOL_BATCHES * batch_size:
                yield from _pool_batches(pool, batch_size, generator)
                pool = []
    if pool:
        yield from _pool_batches(pool, batch_size, generator)


def ordered_batches(source: RecordSource, batch_size: int, window: int) -> Iterator[Batch]:
    """Every window once, in a fixed order (shard by shard, sorted by length): for evaluation."""
    for shard in range(len(source.shards)):
        items = sorted((p for r in source.read(shard) for p in record_windows(r, window)), key=lambda p: len(p[0]))
        for first in range(0, len(items), batch_size):
            yield make_batch(items[first : first + batch_size])
