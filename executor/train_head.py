"""Self-distillation of trained exit heads (EESD, Liu et al. 2024, arXiv 2406.03853), streamed from a corpus.

The data is a stream of records (`executor.corpus`: a corpus directory from `eesd corpus`, or the full model's
greedy continuations of prompts held in memory), each a token sequence and the position from which the full
model's next-token distribution is a target. Per step:
1. a packed batch of windows (`executor.corpus.epoch_batches`: shuffled by a generator seeded with (seed, epoch),
   sorted by length within a pool, so batches carry little padding);
2. one frozen full-model pass over it (`teacher_batch`): the states after every exit layer being trained (each
   head's input) and the last layer's output at the target positions, used at once and dropped, so memory is one
   batch's whatever the corpus size;
3. each head (one per exit layer, sharing that teacher pass) minimises KL(p_full || q_head) over the target
   positions, computed over chunks of `logit_chunk` positions so that no [positions, vocabulary] tensor of the
   whole batch is ever held; AdamW per head, warmup + cosine (or constant) learning rate, gradient clipping per
   head. The teacher runs in the model's dtype; the heads keep float32 weights, used under bf16 autocast when the
   model is loaded in bf16 (as on a GPU) and in float32 as a CPU loads it. Heads share no parameter and no
   optimizer, so a head trained with others equals one trained alone on the same batches.
Every `eval_every` steps the heads are scored on a held-out corpus (`evaluate`: agreement with the full model's
greedy token and tokens/round at a fixed draft length, from the runs of consecutive matches as the acceptance traces
count them), written to `NAME.eval.csv` next to each head.

Training is resumable: a checkpoint (heads, optimizers, step, position in the batch stream, losses, evaluations)
is written atomically every `checkpoint_every` steps next to the first output file; the stream is a function of
(seed, epoch), so a resumed run continues bit-identically where the interrupted one was. The head file records
its training data (the corpus and its manifest's sha256, tokens seen) in its metadata.

The in-memory helpers of the first version (`teacher_examples`, `train`, `agreement` over `Example`s) remain for
the benchmarks and tests that score a few prompts' worth of examples at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from executor.adapter import ModelAdapter, Step
from executor.corpus import (
    Batch,
    Record,
    RecordSource,
    continue_batch,
    epoch_batches,
    manifest_sha256,
    ordered_batches,
)
from executor.heads import (
    SubsetExitHead,
    TrainedExitHead,
    atomic_write,
    head_class,
    model_fingerprint,
    retargeted,
    save_head,
    save_subset_head,
)
from executor.runtime import synchronize
from sim.progress import progress_bar

CHECKPOINT_VERSION = 2
SCHEDULES = ("constant", "cosine")
INIT_LAYERS = ("exit", "last")
# settings a resumed run must share with the checkpoint (`steps` too under a cosine schedule, whose length it is)
RESUME_KEYS = ("exit_layer", "exit_layers", "lr", "batch_size", "seed", "schedule", "warmup_steps", "min_lr_ratio",
               "clip_norm", "weight_decay", "window", "logit_chunk", "head_kind", "init_layer",
               "hard_weight")  # fmt: skip
EVAL_COLUMNS = ("step", "tokens_seen", "targets_seen", "exit_layer", "draft_len", "agreement", "tokens_per_round",
                "kl", "train_kl", "eval_positions")  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    exit_layer: int
    steps: int = 300
    lr: float = 3e-4
    batch_size: int = 4
    seed: int = 0
    checkpoint_every: int = 50
    exit_layers: tuple[int, ...] = ()  # further exit layers trained alongside `exit_layer`, on the same teacher pass
    schedule: str = "constant"  # or "cosine": from lr down to lr * min_lr_ratio at the last step
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps
    min_lr_ratio: float = 0.1
    clip_norm: float | None = 1.0  # per head
    weight_decay: float = 0.0
    window: int = 512  # tokens per training window (longer records are cut)
    eval_every: int = 0  # steps between held-out evaluations (0: none)
    draft_len: int = 4  # the fixed k of the evaluation's tokens/round
    logit_chunk: int = 1024  # target positions whose vocabulary-wide logits are held at once
    head_kind: str = "layer"  # "layer" (a decoder layer) or "attention" (its attention sublayer only)
    init_layer: str = "exit"  # the model layer each head's layer starts as: "exit" (its own E), "last" or a number
    hard_weight: float = 0.0  # weight of a cross-entropy on the full model's top token, added to the KL

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        head_class(self.head_kind)  # a ValueError naming the kinds
        for name in ("steps", "batch_size", "checkpoint_every", "window", "draft_len", "logit_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.eval_every < 0 or self.hard_weight < 0:
            raise ValueError("lr must be > 0, warmup_steps, eval_every and hard_weight >= 0")
        if self.init_layer not in INIT_LAYERS and not self.init_layer.isdigit():
            raise ValueError(f"init_layer must be 'exit', 'last' or a layer number, got {self.init_layer!r}")

    @property
    def layers(self) -> tuple[int, ...]:
        """Every exit layer trained, ascending."""
        return tuple(sorted({self.exit_layer, *self.exit_layers}))


@dataclass(frozen=True)
class Corpus:
    """Token sequences (prompt + the full model's continuation) and where each one's draft positions begin."""

    sequences: list[list[int]]
    starts: list[int]  # first position whose next token is a generated one: len(prompt) - 1


@dataclass
class Example:
    """One sequence's teacher-forced view: exit-layer states and the full model's targets at draft positions."""

    states: dict[int, torch.Tensor]  # exit layer -> [T, d]
    teacher_logits: torch.Tensor  # [T - start, V], bfloat16 (the KL target)
    teacher_tokens: torch.Tensor  # [T - start], the full model's greedy token (exact, from float logits)
    start: int


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)  # per step: the mean KL over the heads
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already trained on
    tokens_seen: int = 0  # window tokens the teacher has run over
    targets_seen: int = 0  # target positions distilled
    head_losses: dict[int, list[float]] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)  # one row per (evaluation, exit layer): EVAL_COLUMNS

    def advance(self, epoch: int, index: int, batch: Batch, losses: dict[int, float]) -> None:
        self.step, self.epoch, self.batch_in_epoch = self.step + 1, epoch, index + 1
        self.tokens_seen += batch.token_count
        self.targets_seen += batch.target_count
        for exit_layer, loss in losses.items():
            self.head_losses.setdefault(exit_layer, []).append(loss)
        self.losses.append(sum(losses.values()) / len(losses))


def generate_corpus(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    batch_size: int = 8,
    progress: bool = True,
) -> Corpus:
    """Greedy AR continuations of `prompts` by the full model, in left-padded batches."""
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    sequences, starts = [], []
    batches = range(0, len(prompts), batch_size)
    for first in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        chunk = [list(p) for p in prompts[first : first + batch_size]]
        for prompt, new in zip(chunk, continue_batch(model, chunk, max_new_tokens, eos), strict=True):
            sequences.append(prompt + new)
            starts.append(len(prompt) - 1)
    return Corpus(sequences=sequences, starts=starts)


def corpus_records(corpus: Corpus) -> list[Record]:
    """An in-memory corpus as records (source `self`, greedy)."""
    pairs = zip(corpus.sequences, corpus.starts, strict=True)
    return [Record(f"self/prompt-{index}", "self", list(tokens), start) for index, (tokens, start) in enumerate(pairs)]


@torch.no_grad()
def teacher_examples(
    adapter: ModelAdapter, corpus: Corpus, exit_layers: Sequence[int], progress: bool = True
) -> list[Example]:
    """One frozen full-model pass per sequence: states after each of `exit_layers` and the final logits."""
    examples = []
    pairs = list(zip(corpus.sequences, corpus.starts, strict=True))
    for tokens, start in tqdm(pairs, desc="teacher pass", unit="seq", disable=not progress):
        states, logits = teacher_pass(adapter, tokens, start, exit_layers)
        examples.append(Example(states, logits.to(torch.bfloat16), logits.argmax(-1), start))
    return examples


@torch.no_grad()
def teacher_pass(
    adapter: ModelAdapter, tokens: list[int], start: int, exit_layers: Sequence[int] = ()
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One full-model pass over `tokens`: the states after each of `exit_layers` ({E: [T, d]}) and the final logits
    at positions `start`.. ([T - start, V]); no autograd graph (the LM head's logits kept one per sequence: a
    vocabulary ranking over a corpus held them all)."""
    states, hidden = teacher_states(adapter, torch.tensor([tokens]), exit_layers)
    return {layer: state[0] for layer, state in states.items()}, adapter.logits(hidden[0, start:])


@torch.no_grad()
def teacher_states(
    adapter: ModelAdapter, tokens: torch.Tensor, exit_layers: Sequence[int]
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One frozen full-model pass over right-padded rows `tokens` [B, T] at positions 0..T-1: the states after each
    of `exit_layers` ({E: [B, T, d]}) and the last layer's output [B, T, d] (before the final norm). Padding sits
    after every real position, so the causal mask hides it from them."""
    batch, length = tokens.shape
    step = Step(positions=torch.arange(length, device=adapter.device).expand(batch, length), starts=(0,) * batch)
    cache = adapter.new_cache(batch, length)
    hidden = adapter.embed(tokens.to(adapter.device))
    states, done = {}, 0
    for layer in sorted(exit_layers):
        hidden = adapter.forward_layers(hidden, step, cache, done, layer)
        states[layer], done = hidden, layer
    return states, adapter.forward_layers(hidden, step, cache, done, adapter.num_layers)


def _batch_states(examples: Sequence[Example], exit_layer: int) -> torch.Tensor:
    """Right-padded exit-layer states [B, T, d]: padding sits after every real position, so the causal mask hides it."""
    return torch.nn.utils.rnn.pad_sequence([e.states[exit_layer] for e in examples], batch_first=True)


def draft_logits(head: TrainedExitHead, examples: Sequence[Example]) -> list[torch.Tensor]:
    """The head's teacher-forced logits at each example's draft positions, [T - start, V] each."""
    out = head.layer_sequences(_batch_states(examples, head.exit_layer))
    return [head.head_logits(out[row, e.start : len(e.states[head.exit_layer])]) for row, e in enumerate(examples)]


def distill_loss(head: TrainedExitHead, examples: Sequence[Example]) -> torch.Tensor:
    """Mean over draft positions of KL(p_full || q_head)."""
    student = torch.cat(draft_logits(head, examples)).float().log_softmax(-1)
    teacher = torch.cat([e.teacher_logits for e in examples]).to(student.device).float().log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


@torch.no_grad()
def agreement(logits_of: Callable[[Sequence[Example]], list[torch.Tensor]], examples: Sequence[Example]) -> float:
    """Fraction of draft positions where the head's top token is the full model's greedy token."""
    hits = total = 0
    for first in range(0, len(examples), 8):
        chunk = examples[first : first + 8]
        for logits, example in zip(logits_of(chunk), chunk, strict=True):
            hits += int((logits.argmax(-1) == example.teacher_tokens).sum())
            total += len(example.teacher_tokens)
    return hits / total if total else float("nan")


def shared_logits(adapter: ModelAdapter, exit_layer: int) -> Callable[[Sequence[Example]], list[torch.Tensor]]:
    """The shared exit head (final norm + LM head at the exit layer) as a `logits_of` for `agreement`."""
    return lambda examples: [adapter.logits(e.states[exit_layer][e.start :]) for e in examples]


def batch_indices(count: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of one step, a function of (seed, step) only, so a resumed run draws the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(count, generator=generator)[: min(batch_size, count)].tolist()


def make_optimizer(head: TrainedExitHead, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)


def train(
    head: TrainedExitHead,
    examples: Sequence[Example],
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    progress: bool = True,
) -> TrainState:
    """Steps `state.step` .. `config.steps` of self-distillation; only the head's parameters change."""
    head.train()
    bar = tqdm(total=config.steps, initial=state.step, desc=f"head @ layer {config.exit_layer}", disable=not progress)
    while state.step < config.steps:
        batch = [examples[i] for i in batch_indices(len(examples), config.batch_size, config.seed, state.step)]
        loss = distill_loss(head, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.step += 1
        state.losses.append(float(loss.detach()))
        bar.set_postfix(kl=f"{state.losses[-1]:.3f}")  # before the update that prints the line
        bar.update(1)
        if on_checkpoint is not None and (state.step % config.checkpoint_every == 0 or state.step == config.steps):
            on_checkpoint(state)
    bar.close()
    head.eval()
    return state


# --- streaming self-distillation ----------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model's own parameters without gradients while heads train (the LM head the heads share included)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


HALF_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class PhaseTimes:
    """Wall seconds per phase of the training steps, the device synchronised around each phase: off unless a
    profiler (`benchmarks/train_profile.py`) turns it on, since the synchronisations cost a GPU its overlap."""

    enabled: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


PHASES = PhaseTimes()


@contextlib.contextmanager
def phase(name: str, device: torch.device) -> Iterator[None]:
    """A phase of a training step: timed into `PHASES` when it is enabled, a no-op otherwise."""
    if not PHASES.enabled:
        yield
        return
    synchronize(device)
    begin = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        PHASES.seconds[name] = PHASES.seconds.get(name, 0.0) + time.perf_counter() - begin


def autocast(adapter: ModelAdapter) -> contextlib.AbstractContextManager[Any]:
    """The heads' computations under autocast to the model's dtype when that is a half type (bf16 on a GPU): their
    float32 master weights meet the teacher's half-precision states there. A float32 model trains in float32, and
    the teacher always runs in the model's own dtype (the executor's KV cache holds one dtype)."""
    if adapter.dtype in HALF_DTYPES:
        return torch.autocast(adapter.device.type, dtype=adapter.dtype)
    return contextlib.nullcontext()


def new_head(
    adapter: ModelAdapter,
    exit_layer: int,
    kind: str = "layer",
    token_ids: torch.Tensor | None = None,
    init_layer: str = "exit",
) -> TrainedExitHead:
    """A head of `kind` to train, over the draft vocabulary `token_ids` if given, its layer a copy of model layer
    `init_layer` ("exit": E itself, "last": the model's last layer, or a layer number): float32 weights whatever
    the model's dtype (AdamW's updates are lost in bf16 weights)."""
    head = head_class(kind)(adapter, exit_layer, init_layer_index(adapter, exit_layer, init_layer), token_ids=token_ids)
    return head.float() if adapter.dtype in HALF_DTYPES else head


def starting_heads(
    adapter: ModelAdapter,
    config: TrainConfig,
    draft_vocab: torch.Tensor | None = None,
    init_heads: dict[int, TrainedExitHead] | None = None,
) -> dict[int, TrainedExitHead]:
    """The heads a run starts from, one per exit layer of `config`: new ones (`new_head`), or copies of `init_heads`
    (each of `config.head_kind`, at its exit layer) over `draft_vocab` (None: the whole vocabulary), float32 weights
    whatever the model's dtype."""
    if init_heads is None:
        return {e: new_head(adapter, e, config.head_kind, draft_vocab, config.init_layer) for e in config.layers}
    if sorted(init_heads) != list(config.layers):
        layers = list(config.layers)
        raise ValueError(f"initial heads are for exit layers {sorted(init_heads)}; the run trains {layers}")
    for exit_layer, head in init_heads.items():
        if head.kind != config.head_kind or head.exit_layer != exit_layer:
            raise ValueError(f"the initial head for exit layer {exit_layer} is a {head.kind!r} head at exit layer "
                             f"{head.exit_layer}; the run trains {config.head_kind!r} heads")  # fmt: skip
    copies = {e: retargeted(head, draft_vocab) for e, head in init_heads.items()}
    return {e: head.float() if adapter.dtype in HALF_DTYPES else head for e, head in copies.items()}


def init_layer_index(adapter: ModelAdapter, exit_layer: int, init_layer: str) -> int:
    """The model layer a new head's layer copies (see `new_head`)."""
    index = {"exit": exit_layer, "last": adapter.num_layers - 1}.get(init_layer)
    index = int(init_layer) if index is None else index
    if not 0 <= index < adapter.num_layers:
        raise ValueError(f"init_layer must be in [0, {adapter.num_layers - 1}], got {init_layer}")
    return index


@dataclass
class TeacherBatch:
    """The frozen full model's view of one batch, dropped once the heads have used it."""

    states: dict[int, torch.Tensor]  # exit layer -> [B, T, d], each head's input
    final: torch.Tensor  # [N, d]: the last layer's output at the N target positions (row-major order)
    mask: torch.Tensor  # [B, T] bool, the target positions


def teacher_batch(adapter: ModelAdapter, batch: Batch, exit_layers: Sequence[int]) -> TeacherBatch:
    vocab = adapter.embed_tokens.weight.shape[0]
    if batch.tokens.numel() and not 0 <= int(batch.tokens.min()) <= int(batch.tokens.max()) < vocab:
        raise ValueError(f"a corpus record holds token ids outside the model's vocabulary [0, {vocab}): a corpus of "
                         "another tokenizer, or an edited shard; rebuild it with eesd corpus")  # fmt: skip
    states, hidden = teacher_states(adapter, batch.tokens, exit_layers)
    mask = batch.targets.to(adapter.device)
    return TeacherBatch(states, hidden[mask], mask)


def teacher_chunks(
    adapter: ModelAdapter,
    teacher: TeacherBatch,
    chunk: int,
    rows: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(positions, the full model's log-probabilities there [n, V] in float32), `chunk` target positions at a time;
    with `rows` (a draft vocabulary's LM-head weight rows and bias), renormalised over those ids [n, N], scored on
    those rows only (a large vocabulary's LM head is most of the teacher's cost)."""
    for first in range(0, teacher.final.shape[0], chunk):
        piece = slice(first, first + chunk)
        with torch.no_grad():
            if rows is None:
                logits = adapter.logits(teacher.final[piece])
            else:
                logits = adapter.softcap(torch.nn.functional.linear(adapter.norm(teacher.final[piece]), *rows))
        yield piece, logits.float().log_softmax(-1)


def shared_draft_vocab(heads: dict[int, TrainedExitHead]) -> torch.Tensor | None:
    """The draft vocabulary every head has, if they all have the same one: the teacher then need not score the rest."""
    vocabularies = [head.token_ids for head in heads.values()]
    first = vocabularies[0]
    if first is None or any(v is None or not torch.equal(v, first) for v in vocabularies[1:]):
        return None
    return first


def head_states(head: TrainedExitHead, teacher: TeacherBatch) -> torch.Tensor:
    """The head layer's output at the target positions [N, d] (with its graph when training)."""
    with autocast(head.adapter):
        return head.layer_sequences(teacher.states[head.exit_layer])[teacher.mask]


def chunk_log_probs(head: TrainedExitHead, states: torch.Tensor) -> torch.Tensor:
    """The head's log-probabilities over its draft vocabulary (the whole one, or its subset) [n, N]."""
    with autocast(head.adapter):
        logits = head.draft_logits(states)
    return logits.float().log_softmax(-1)


def head_target(head: TrainedExitHead, target: torch.Tensor) -> torch.Tensor:
    """The full model's log-probabilities [n, V] as the head is trained to match them: renormalised over its draft
    vocabulary when it has one (a draft outside it is never proposed, so only the order inside it matters)."""
    return target if head.token_ids is None else target[:, head.token_ids].log_softmax(-1)


def head_tokens(head: TrainedExitHead, student: torch.Tensor) -> torch.Tensor:
    """The head's top token ids (vocabulary ids) from its draft log-probabilities [n, N]."""
    top = student.argmax(-1)
    return top if head.token_ids is None else head.token_ids[top]


def distill_batch(
    heads: dict[int, TrainedExitHead], teacher: TeacherBatch, chunk: int, hard_weight: float = 0.0
) -> dict[int, float]:
    """Each head's mean KL(p_full || q_head) over the batch's target positions, its gradients accumulated (with
    `hard_weight` times the cross-entropy of the full model's top token added to what is minimised: greedy
    agreement is decided by the top token alone). The vocabulary-wide logits exist one chunk at a time: each chunk's
    loss is backpropagated to the head layer's output (a leaf here), whose gradient then flows through the head
    layer once."""
    adapter = next(iter(heads.values())).adapter
    with phase("head layers forward", adapter.device):
        outputs = {e: head_states(head, teacher) for e, head in heads.items()}
    leaves = {e: out.detach().requires_grad_(True) for e, out in outputs.items()}
    count, totals = teacher.final.shape[0], {e: [] for e in heads}
    vocab = shared_draft_vocab(heads)
    rows = next(iter(heads.values())).subset_weight() if vocab is not None else None  # gathered once per LM head
    with phase("logits + KL (forward and backward)", adapter.device):
        for piece, target in teacher_chunks(adapter, teacher, chunk, rows):
            for exit_layer, head in heads.items():
                student = chunk_log_probs(head, leaves[exit_layer][piece])
                own = target if vocab is not None else head_target(head, target)
                loss = F.kl_div(student, own, log_target=True, reduction="sum") / count
                if hard_weight:
                    loss_ce = F.nll_loss(student, own.argmax(-1), reduction="sum") / count
                    (loss + hard_weight * loss_ce).backward()
                else:
                    loss.backward()
                totals[exit_layer].append(loss.detach())  # read once per step, not once per chunk (a GPU sync each)
    with phase("head layers backward", adapter.device):
        for exit_layer, out in outputs.items():
            out.backward(leaves[exit_layer].grad)
    return {e: float(torch.stack(parts).sum()) for e, parts in totals.items()}


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of step `step` (0-based): linear warmup, then constant or cosine down to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    done = min((step - config.warmup_steps) / max(config.steps - config.warmup_steps - 1, 1), 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * done))


def make_optimizers(heads: dict[int, TrainedExitHead], config: TrainConfig) -> dict[int, torch.optim.Optimizer]:
    return {
        e: torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        for e, head in heads.items()
    }


def train_step(
    heads: dict[int, TrainedExitHead], optimizers: dict[int, torch.optim.Optimizer], batch: Batch,
    config: TrainConfig, step: int,
) -> dict[int, float]:  # fmt: skip
    """One optimizer step of every head on one teacher pass over `batch`; returns each head's KL."""
    adapter = next(iter(heads.values())).adapter
    with phase("teacher (full model)", adapter.device):
        teacher = teacher_batch(adapter, batch, list(heads))
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    losses = distill_batch(heads, teacher, config.logit_chunk, config.hard_weight)
    del teacher
    lr = lr_at(step, config)
    with phase("clip + optimizer", adapter.device):
        bad = {}
        for exit_layer, head in heads.items():  # the norm is read whether or not it clips (max_norm inf: not)
            norm = float(torch.nn.utils.clip_grad_norm_(head.parameters(), config.clip_norm or math.inf))
            if not math.isfinite(losses[exit_layer]):
                bad[exit_layer] = f"KL {losses[exit_layer]}"
            elif not math.isfinite(norm):
                bad[exit_layer] = f"gradient norm {norm}"
        if bad:  # before any head moves: the heads and their checkpoint stay finite
            raise Diverged(", ".join(f"exit layer {e}: {value}" for e, value in bad.items()))
        for exit_layer in heads:
            for group in optimizers[exit_layer].param_groups:
                group["lr"] = lr
            optimizers[exit_layer].step()
    return losses


class Diverged(ValueError):
    """A training step whose loss or gradient is not finite (`train_step`), raised before the heads move."""


def batch_stream(source: RecordSource, config: TrainConfig, epoch: int, skip: int) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, index in epoch, batch) from batch `skip` of `epoch` on, epoch after epoch."""
    while True:
        served = -1
        for index, batch in enumerate(epoch_batches(source, config.batch_size, config.window, config.seed, epoch)):
            served = index
            if index >= skip:
                yield epoch, index, batch
        if served < 0:
            raise ValueError("the corpus has no window with a target position: nothing to train on")
        epoch, skip = epoch + 1, 0


# --- held-out evaluation ------------------------------------------------------------------------------------------


@dataclass
class EvalTally:
    hits: int = 0
    positions: int = 0
    kl: float = 0.0
    rounds: int = 0
    round_tokens: int = 0
    windows: list[tuple[int, int]] = field(default_factory=list)  # (hits, positions) per window, in evaluation order

    def add_rows(self, matches: torch.Tensor, counts: list[int], draft_len: int) -> None:
        """Matches of one batch's target positions (row-major), counted per window as EESD rounds would accept."""
        from calibrate.acceptance import predicted_accepted

        self.hits += int(matches.sum())
        self.positions += matches.numel()
        for row in matches.split(counts):
            self.windows.append((int(row.sum()), len(row)))
            accepted = predicted_accepted(row.tolist(), draft_len, len(row))
            self.rounds += len(accepted)
            self.round_tokens += sum(accepted) + len(accepted)

    def row(self) -> dict[str, Any]:
        return {
            "agreement": self.hits / self.positions if self.positions else float("nan"),
            "tokens_per_round": self.round_tokens / self.rounds if self.rounds else float("nan"),
            "kl": self.kl / self.positions if self.positions else float("nan"),
            "eval_positions": self.positions,
        }


def agreement_interval(
    windows: Sequence[tuple[int, int]], baseline: Sequence[tuple[int, int]] | None = None, draws: int = 2000,
    seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:  # fmt: skip
    """A percentile bootstrap interval for the agreement of (hits, positions) `windows`, resampling whole windows (a
    window is one answer: its positions are not independent draws), or, given the `baseline` head's windows on the
    same corpus (the same windows in the same order), for the paired difference agreement - baseline agreement."""
    import numpy as np

    hits, positions = np.array(windows, dtype=np.float64).reshape(-1, 2).T
    base_hits = hits
    if baseline is not None:
        base_hits, base_positions = np.array(baseline, dtype=np.float64).reshape(-1, 2).T
        if not np.array_equal(positions, base_positions):
            raise ValueError("a paired interval needs the two heads' windows of the same corpus, in the same order")
    scored = positions > 0
    hits, base_hits, positions = hits[scored], base_hits[scored], positions[scored]
    if not len(positions):
        return float("nan"), float("nan")
    picks = np.random.default_rng(seed).integers(0, len(positions), size=(draws, len(positions)))
    total = positions[picks].sum(axis=1)
    values = hits[picks].sum(axis=1) / total
    if baseline is not None:
        values -= base_hits[picks].sum(axis=1) / total
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


@torch.no_grad()
def evaluate(
    heads: dict[int, TrainedExitHead], source: RecordSource, config: TrainConfig, windows: bool = False
) -> dict[int, dict]:
    """Each head on every window of `source`, one teacher pass per batch: agreement (the head's top-1 is the full
    model's greedy token), tokens/round at draft length `config.draft_len` and mean KL; with `windows`, also each
    window's (hits, positions), in a fixed order (for `agreement_interval`)."""
    adapter = next(iter(heads.values())).adapter
    tallies = {e: EvalTally() for e in heads}
    for batch in ordered_batches(source, config.batch_size, config.window):
        teacher = teacher_batch(adapter, batch, list(heads))
        counts = batch.targets.sum(-1).tolist()
        outputs = {e: head_states(head, teacher) for e, head in heads.items()}
        matches = {e: [] for e in heads}
        for piece, target in teacher_chunks(adapter, teacher, config.logit_chunk):
            for exit_layer, head in heads.items():
                student = chunk_log_probs(head, outputs[exit_layer][piece])
                matches[exit_layer].append(head_tokens(head, student) == target.argmax(-1))
                own = head_target(head, target)
                tallies[exit_layer].kl += float(F.kl_div(student, own, log_target=True, reduction="sum"))
        for exit_layer, tally in tallies.items():
            tally.add_rows(torch.cat(matches[exit_layer]).cpu(), counts, config.draft_len)
    return {e: tally.row() | ({"windows": tally.windows} if windows else {}) for e, tally in tallies.items()}


def eval_csv_path(out: str | os.PathLike[str]) -> Path:
    """`heads/NAME.safetensors` -> `heads/NAME.eval.csv`."""
    return Path(out).with_suffix(".eval.csv")


def write_eval_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EVAL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: row[key] for key in EVAL_COLUMNS} for row in rows)
    atomic_write(path, lambda temp: Path(temp).write_text(buffer.getvalue()))


def record_eval(
    heads: dict[int, TrainedExitHead], source: RecordSource, config: TrainConfig, state: TrainState,
    outs: dict[int, Path],
) -> None:  # fmt: skip
    """Evaluate, append the rows to the state and rewrite each head's CSV (rows of a resumed run's lost steps never
    reach it: the CSV is rewritten from the checkpointed rows)."""
    for head in heads.values():
        head.eval()
    results = evaluate(heads, source, config)
    for exit_layer, result in results.items():
        recent = state.head_losses.get(exit_layer, [])[-max(config.eval_every, 1) :]
        state.evals.append({
            "step": state.step, "tokens_seen": state.tokens_seen, "targets_seen": state.targets_seen,
            "exit_layer": exit_layer, "draft_len": config.draft_len,
            "train_kl": sum(recent) / len(recent) if recent else float("nan"), **result,
        })  # fmt: skip
        write_eval_csv(eval_csv_path(outs[exit_layer]), [r for r in state.evals if r["exit_layer"] == exit_layer])
    for head in heads.values():
        head.train()


# --- checkpoints and the training run -----------------------------------------------------------------------------


def checkpoint_path(out: str | os.PathLike[str]) -> Path:
    return Path(f"{out}.ckpt")


@dataclass
class Run:
    """What a training run holds: heads, their optimizers, the data and where it all goes."""

    heads: dict[int, TrainedExitHead]
    optimizers: dict[int, torch.optim.Optimizer]
    config: TrainConfig
    source: RecordSource
    outs: dict[int, Path]
    info: dict[str, str]
    eval_source: RecordSource | None = None
    steps_asked: int = field(init=False)  # config.steps as given (a time budget may shorten the schedule)
    saved_step: int | None = None  # the step the checkpoint on disk holds (None: none written or resumed)

    def __post_init__(self) -> None:
        self.steps_asked = self.config.steps

    @property
    def checkpoint(self) -> Path:
        return checkpoint_path(self.outs[self.config.layers[0]])

    def save_checkpoint(self, state: TrainState) -> None:
        in_memory = self.source.directory is None
        payload = {
            "version": CHECKPOINT_VERSION,
            "heads": {e: head.state_dict() for e, head in self.heads.items()},
            "optimizers": {e: opt.state_dict() for e, opt in self.optimizers.items()},
            "state": asdict(state), "config": asdict(self.config), "run_info": self.info,
            "model_fingerprint": model_fingerprint(next(iter(self.heads.values())).adapter),
            "records": [asdict(r) for r in self.source.records] if in_memory else None,
        }  # fmt: skip
        atomic_write(self.checkpoint, lambda temp: torch.save(payload, temp))
        self.saved_step = state.step

    def restore(self, payload: dict[str, Any]) -> TrainState:
        for exit_layer, head in self.heads.items():
            head.load_state_dict(payload["heads"][exit_layer])
            self.optimizers[exit_layer].load_state_dict(payload["optimizers"][exit_layer])
        state = TrainState(**payload["state"])
        self.saved_step = state.step
        return state

    def interrupted(self, state: TrainState) -> str:
        """What an interrupted run leaves: the step its checkpoint holds and how to go on, or that it has none."""
        done = f"after step {state.step} of {self.config.steps}"
        if self.saved_step is None:
            return (f"{done}; no checkpoint written yet (one every --checkpoint-every {self.config.checkpoint_every} "
                    "steps): nothing to resume")  # fmt: skip
        again = "the same command with --resume" + (
            f" --steps {self.config.steps} (the schedule the time budget fitted)"
            if self.config.steps != self.steps_asked else ""
        )  # fmt: skip
        return f"{done}; {self.checkpoint} holds step {self.saved_step}: {again} goes on from there"


def load_checkpoint(path: Path, adapter: ModelAdapter, config: TrainConfig, run_info: dict[str, str]) -> dict:
    """A checkpoint's payload, after checking it belongs to this model and run (same data, batches and heads)."""
    try:
        payload = torch.load(path, map_location=adapter.device, weights_only=True)
    except Exception as err:  # a truncated file, another format: torch's own words are about its unpickler
        why = "a truncated or damaged file" if isinstance(err, (EOFError, RuntimeError)) else "not a torch checkpoint"
        kind = type(err).__name__
        raise ValueError(f"checkpoint {path} is unreadable ({why}: {kind}); delete it to start over") from None
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {path} holds no train-head checkpoint (a {type(payload).__name__}); delete it to "
                         "start over")  # fmt: skip
    if payload.get("version") != CHECKPOINT_VERSION or payload.get("model_fingerprint") != model_fingerprint(adapter):
        raise ValueError(f"checkpoint {path} belongs to another model or format version; delete it to start over")
    saved = dict(payload["config"])
    keys = RESUME_KEYS + (("steps",) if config.schedule == "cosine" else ())
    for key in keys:
        made_with = saved.get(key, getattr(TrainConfig, key, None))  # a field the checkpoint predates: its default
        if made_with != getattr(config, key):
            hint = f" (resume it with --{key.replace('_', '-')} {made_with})" if key == "steps" else ""
            raise ValueError(f"checkpoint {path} was made with {key}={made_with}, not {getattr(config, key)}{hint}")
    if payload["run_info"] != run_info:
        made = payload["run_info"] if isinstance(payload["run_info"], dict) else {}
        differ = [f"{key} {made.get(key)!r}, now {run_info.get(key)!r}" for key in sorted({*made, *run_info})
                  if made.get(key) != run_info.get(key)]  # fmt: skip
        shown = "; ".join(differ[:4]) + (f"; {len(differ) - 4} more" if len(differ) > 4 else "")
        raise ValueError(f"checkpoint {path} was made from other data or settings: {shown} (the same command resumes "
                         "it; delete it to start over)")  # fmt: skip
    return payload


def head_paths(out: str | os.PathLike[str], exit_layers: Sequence[int]) -> dict[int, Path]:
    """One output file per exit layer: `out` with `{exit_layer}` filled in (needed for several), else `out` itself."""
    if "{exit_layer}" not in str(out):
        if len(exit_layers) == 1:
            return {exit_layers[0]: Path(out)}
        raise ValueError(f"several exit layers need an output name with {{exit_layer}} in it, got {out}")
    return {e: Path(str(out).replace("{exit_layer}", str(e))) for e in exit_layers}


PROBE_STEPS = 10  # steps timed (after the first, which warms up) before a time budget fits the cosine schedule


def fit_steps(run: Run, state: TrainState, per_step_s: float, deadline: float) -> TrainConfig:
    """A cosine schedule shortened so that it ends by `deadline` at `per_step_s` a step (never lengthened): the
    learning rate then anneals within the budget instead of being cut off mid-schedule. `run.config` is replaced."""
    fit = state.step + int(0.95 * max(deadline - time.perf_counter(), 0.0) / per_step_s)
    if run.config.schedule == "cosine" and fit < run.config.steps:
        run.config = dataclasses.replace(run.config, steps=max(fit, state.step + 1))
    return run.config


def run_steps(run: Run, state: TrainState, progress: bool, time_budget_s: float | None = None) -> TrainState:
    """Steps `state.step` .. `config.steps`, with evaluations and checkpoints on their cadences. With `time_budget_s`,
    a cosine schedule is first shortened to fit it (`fit_steps`, from the speed of `PROBE_STEPS` steps), and the run
    stops after any step that ends past it (evaluated and checkpointed there: `--resume` continues the schedule)."""
    config = run.config
    stream = batch_stream(run.source, config, state.epoch, state.batch_in_epoch)
    begin, tokens_before = time.perf_counter(), state.tokens_seen
    deadline = None if time_budget_s is None else begin + time_budget_s
    try:
        _steps(run, state, progress, stream, begin, tokens_before, deadline)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(run.interrupted(state)) from None
    return state


def _steps(run: Run, state: TrainState, progress: bool, stream: Any, begin: float, tokens_before: int,
           deadline: float | None) -> None:  # fmt: skip
    """`run_steps`' loop."""
    config = run.config
    label, first, warm = ",".join(map(str, config.layers)), state.step, begin
    with progress_bar(config.steps, f"heads @ layer {label}", "step", progress, initial=state.step) as bar:
        while state.step < config.steps:
            epoch, index, batch = next(stream)
            try:
                losses = train_step(run.heads, run.optimizers, batch, config, state.step)
            except Diverged as err:
                raise _diverged(run, state, err) from None
            state.advance(epoch, index, batch, losses)
            if state.step == first + 1:
                warm = time.perf_counter()
            if deadline is not None and state.step == first + 1 + PROBE_STEPS:
                config = fit_steps(run, state, (time.perf_counter() - warm) / PROBE_STEPS, deadline)
                bar.total = config.steps
            rate = (state.tokens_seen - tokens_before) / max(time.perf_counter() - begin, 1e-9)
            bar.set_postfix(kl=f"{state.losses[-1]:.3f}", tok_s=f"{rate:.0f}", epoch=state.epoch)  # (then the line)
            bar.update(1)
            at_end = state.step == config.steps or (deadline is not None and time.perf_counter() >= deadline)
            if run.eval_source is not None and config.eval_every and (state.step % config.eval_every == 0 or at_end):
                record_eval(run.heads, run.eval_source, config, state, run.outs)
                if progress:  # one line per evaluation beside the bar (the CSV keeps every row)
                    _say_eval(bar, [row for row in state.evals if row["step"] == state.step])
            if state.step % config.checkpoint_every == 0 or at_end:
                run.save_checkpoint(state)
            if at_end:
                break


def _say_eval(bar: Any, rows: list[dict[str, Any]]) -> None:
    """`step N: E=15 held-out agreement 0.412, tokens/round 1.62; E=7 ...` on stderr, through the bar where it draws
    on a terminal (so it is not torn)."""
    if not rows:
        return
    said = "; ".join(f"E={row['exit_layer']} held-out agreement {row['agreement']:.3f}, tokens/round "
                     f"{row['tokens_per_round']:.2f}" for row in rows)  # fmt: skip
    line = f"step {rows[0]['step']}: {said}"
    write = getattr(bar, "write", None)
    if callable(write):
        write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def _diverged(run: Run, state: TrainState, err: Diverged) -> ValueError:
    """What stops a run whose step did not stay finite: where, what the checkpoint holds, what to change; no head
    is written."""
    held = f"{run.checkpoint} holds step {run.saved_step}" if run.saved_step else "this run wrote no checkpoint"
    return ValueError(f"training diverged at step {state.step + 1} ({err}); no head written ({held}): lower --lr "
                      f"(it was {run.config.lr:g}) or keep --clip-norm on")  # fmt: skip


def head_metadata(run: Run, state: TrainState, exit_layer: int) -> dict[str, Any]:
    import datetime

    config, losses = run.config, state.head_losses.get(exit_layer, [])
    first, last = losses[:10], losses[-10:]
    evals = [r for r in state.evals if r["exit_layer"] == exit_layer]
    return run.info | {
        "steps": config.steps, "steps_done": state.step, "steps_asked": run.steps_asked, "lr": config.lr,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "schedule": config.schedule, "warmup_steps": config.warmup_steps, "clip_norm": config.clip_norm,
        "weight_decay": config.weight_decay, "hard_weight": config.hard_weight, "window": config.window,
        "trained_with": ",".join(map(str, config.layers)),
        "kl_first10": f"{sum(first) / max(len(first), 1):.4f}", "kl_last10": f"{sum(last) / max(len(last), 1):.4f}",
        "tokens_seen": state.tokens_seen, "train_tokens": state.targets_seen, "epochs_started": state.epoch + 1,
        **({"eval_agreement": f"{evals[-1]['agreement']:.4f}",
            "eval_tokens_per_round": f"{evals[-1]['tokens_per_round']:.4f}"} if evals else {}),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }  # fmt: skip


def distill_heads(
    model: torch.nn.Module,
    source: RecordSource,
    config: TrainConfig,
    outs: dict[int, Path],
    *,
    eval_source: RecordSource | None = None,
    resume: bool = False,
    save_dtype: torch.dtype = torch.bfloat16,
    run_info: dict[str, str] | None = None,
    progress: bool = True,
    draft_vocab: torch.Tensor | None = None,
    time_budget_s: float | None = None,
    init_heads: dict[int, TrainedExitHead] | None = None,
) -> tuple[dict[int, TrainedExitHead], TrainState]:
    """Train one head per exit layer of `config` (of kind `config.head_kind`, over the draft vocabulary
    `draft_vocab` if given) on `source` and write each to `outs[E]` (atomically), evaluating on `eval_source` and
    checkpointing next to the first; `resume` continues from that checkpoint if it exists. `time_budget_s` stops
    the run early (`run_steps`); the heads are written as they stand, their metadata's `steps_done` saying where.
    `init_heads` (a trained head per exit layer) start the heads from their weights instead of a model layer."""
    adapter = ModelAdapter(model)
    heads = starting_heads(adapter, config, draft_vocab, init_heads)
    info = {k: str(v) for k, v in (dict(run_info or {}) | source.describe()).items()}
    if eval_source is not None:
        info |= {f"eval_{key}": value for key, value in eval_source.describe().items()}
    if draft_vocab is not None:
        ids = draft_vocab.detach().cpu().to(torch.int64).contiguous()
        info |= {"draft_vocab_size": str(ids.numel()), "draft_vocab_sha256": hashlib.sha256(ids.numpy()).hexdigest()}
    run = Run(heads, make_optimizers(heads, config), config, source, outs, info, eval_source)
    state = TrainState()
    if resume and run.checkpoint.is_file():
        state = run.restore(load_checkpoint(run.checkpoint, adapter, config, info))
    with frozen(model):
        for head in heads.values():
            head.train()
        if eval_source is not None and config.eval_every and state.step == 0:
            record_eval(heads, eval_source, config, state, outs)  # the curve's starting point
            if progress:
                _say_eval(None, state.evals)
        run_steps(run, state, progress, time_budget_s)
    for exit_layer, head in heads.items():
        head.eval()
        save_head(head, outs[exit_layer], dtype=save_dtype, info=head_metadata(run, state, exit_layer))
        if not any(row["exit_layer"] == exit_layer for row in state.evals):  # an earlier run's curve is not this head's
            eval_csv_path(outs[exit_layer]).unlink(missing_ok=True)
    return heads, state


def saved_records(path: Path) -> list[Record] | None:
    """The in-memory corpus a checkpoint holds (so that a resumed run need not generate it again)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # `load_checkpoint` names the problem
    return [Record(**r) for r in payload.get("records") or []] or None


def train_head_file(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    config: TrainConfig,
    out: str | os.PathLike[str],
    *,
    max_new_tokens: int = 64,
    resume: bool = False,
    save_dtype: torch.dtype = torch.bfloat16,
    run_info: dict[str, str] | None = None,
    progress: bool = True,
    draft_vocab: torch.Tensor | None = None,
) -> tuple[TrainedExitHead, TrainState]:
    """Distil a head (or, with `config.exit_layers`, one per exit layer: `out` then holds `{exit_layer}`) on the full
    model's greedy continuations of `prompts`, held in memory, and write it to `out`; returns the head at
    `config.exit_layer`."""
    outs = head_paths(out, config.layers)
    records = saved_records(checkpoint_path(outs[config.layers[0]])) if resume else None
    if records is None:
        eos = model.generation_config.eos_token_id
        records = corpus_records(generate_corpus(model, prompts, max_new_tokens, eos, progress=progress))
    info = dict(run_info or {}) | {"max_new_tokens": str(max_new_tokens), "prompts_count": str(len(prompts))}
    heads, state = distill_heads(model, RecordSource.from_records(records), config, outs, resume=resume,
                                 save_dtype=save_dtype, run_info=info, progress=progress,
                                 draft_vocab=draft_vocab)  # fmt: skip
    return heads[config.exit_layer], state


def train_head_corpus(
    model: torch.nn.Module,
    corpus: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    config: TrainConfig,
    out: str | os.PathLike[str],
    *,
    eval_corpus: str | os.PathLike[str] | None = None,
    resume: bool = False,
    save_dtype: torch.dtype = torch.bfloat16,
    run_info: dict[str, str] | None = None,
    progress: bool = True,
    draft_vocab: torch.Tensor | None = None,
    time_budget_s: float | None = None,
    init_heads: dict[int, TrainedExitHead] | None = None,
) -> tuple[dict[int, TrainedExitHead], TrainState]:
    """Distil one head per exit layer of `config` from a corpus directory (`eesd corpus`) or several, scored every
    `config.eval_every` steps on `eval_corpus` (a corpus built from held-out prompts), and write them to `out`
    (`{exit_layer}` filled in when there are several)."""
    source = RecordSource(corpus)
    check_corpus_model(source, model)
    eval_source = RecordSource(eval_corpus) if eval_corpus is not None else None
    if eval_source is not None:
        check_corpus_model(eval_source, model)
        held = eval_source.directory
        if held.resolve() in {d.resolve() for d in source.directories} or manifest_sha256(held) in {
            manifest_sha256(d) for d in source.directories
        }:  # the same folder, or a copy of one
            raise ValueError(f"the held-out corpus {held} is also a training corpus (or a copy)")
        if not config.eval_every:  # a held-out corpus scores the heads: at least at the start and the end
            config = dataclasses.replace(config, eval_every=config.steps)
    return distill_heads(model, source, config, head_paths(out, config.layers), eval_source=eval_source,
                         resume=resume, save_dtype=save_dtype, run_info=run_info, progress=progress,
                         draft_vocab=draft_vocab, time_budget_s=time_budget_s, init_heads=init_heads)  # fmt: skip


def check_corpus_model(source: RecordSource, model: torch.nn.Module) -> None:
    """A corpus's token ids are only meaningful for the model (and tokenizer) it was built with."""
    this = model_fingerprint(model)
    for directory, manifest in zip(source.directories, source.manifests, strict=True):
        if manifest["model_fingerprint"] != this:
            raise ValueError(
                f"corpus {directory} was built with another model ({manifest['model']}, fingerprint "
                f"{manifest['model_fingerprint']}); this model's fingerprint is {this}: build a corpus with this model"
            )


def vocabulary_scores(adapter: ModelAdapter, corpus: Corpus, progress: bool = True) -> torch.Tensor:
    """Each id's expected count over the corpus's generated positions: the sum of the full model's next-token
    probabilities there [V] (float64). Soft counts rank every id the model finds likely, not only the few thousand
    it happened to emit, so a subset from a few dozen prompts still ranks its tail sensibly."""
    scores = torch.zeros(adapter.lm_head.weight.shape[0], dtype=torch.float64)
    pairs = list(zip(corpus.sequences, corpus.starts, strict=True))
    for tokens, start in tqdm(pairs, desc="vocabulary", unit="seq", disable=not progress):
        _, logits = teacher_pass(adapter, tokens, start)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
        scores += probs.sum(0).double().cpu()
    return scores


def subset_head_file(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    count: int,
    out: str | os.PathLike[str],
    *,
    max_new_tokens: int = 64,
    run_info: dict[str, str] | None = None,
    progress: bool = True,
) -> SubsetExitHead:
    """Rank the vocabulary by `vocabulary_scores` over the full model's greedy continuations of `prompts` and write
    the `count` most likely ids as a vocabulary-subset head file (atomically)."""
    import datetime

    adapter = ModelAdapter(model)
    corpus = generate_corpus(model, prompts, max_new_tokens, model.generation_config.eos_token_id, progress=progress)
    scores = vocabulary_scores(adapter, corpus, progress=progress)
    head = SubsetExitHead.ranked(adapter, scores, count)
    positions = sum(len(t) - s for t, s in zip(corpus.sequences, corpus.starts, strict=True))
    info = dict(run_info or {}) | {
        "max_new_tokens": str(max_new_tokens), "prompts_count": str(len(prompts)), "positions": str(positions),
        "ranking": "expected count: sum of the full model's next-token probabilities over generated positions",
        "covered_mass": f"{float(scores[head.ranking].sum() / scores.sum()):.6f}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }  # fmt: skip
    save_subset_head(head, out, info=info)
    head.metadata = info
    return head
