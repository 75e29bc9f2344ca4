"""Self-distillation of a trained exit head (EESD, Liu et al. 2024, arXiv 2406.03853).

1. The full model generates text (greedy AR, `executor.generate`) from the training prompts.
2. One teacher-forced pass of the frozen model over each sequence keeps the layer-E states (the head's input) and
   the full model's next-token logits (the target) at the positions a draft would predict: from the last prompt
   token on.
3. Only the head is trained, to minimise KL(p_full || q_head) at those positions; its layer attends over the whole
   sequence, prompt included, as it does while drafting.

Training is resumable: a checkpoint (head, optimizer, step, losses, corpus) is written atomically every
`checkpoint_every` steps next to the output file, and batches are drawn by a generator seeded with (seed, step),
so a resumed run continues exactly where the interrupted one was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from executor.adapter import ModelAdapter, Step
from executor.heads import SubsetExitHead, TrainedExitHead, atomic_write, model_fingerprint, save_subset_head

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    exit_layer: int
    steps: int = 300
    lr: float = 3e-4
    batch_size: int = 4
    seed: int = 0
    checkpoint_every: int = 50


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
    losses: list[float] = field(default_factory=list)


def generate_corpus(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    eos_token_id: int | list[int] | None,
    batch_size: int = 8,
    progress: bool = True,
) -> Corpus:
    """Greedy AR continuations of `prompts` by the full model, in left-padded batches."""
    from executor.api import generate

    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    sequences, starts = [], []
    batches = range(0, len(prompts), batch_size)
    for first in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        chunk = list(prompts[first : first + batch_size])
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                       pad_token_id=0)  # fmt: skip
        for prompt, row in zip(chunk, out.sequences[:, width:].tolist(), strict=True):
            sequences.append(prompt + _until_eos(row, eos))
            starts.append(len(prompt) - 1)
    return Corpus(sequences=sequences, starts=starts)


def _until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens


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


def teacher_pass(
    adapter: ModelAdapter, tokens: list[int], start: int, exit_layers: Sequence[int] = ()
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One full-model pass over `tokens`: the states after each of `exit_layers` ({E: [T, d]}) and the final logits
    at positions `start`.. ([T - start, V])."""
    cache = adapter.new_cache(1, len(tokens))
    step = Step.at(0, len(tokens), adapter.device)
    hidden = adapter.embed(torch.tensor([tokens], device=adapter.device))
    states, done = {}, 0
    for layer in sorted(exit_layers):
        hidden = adapter.forward_layers(hidden, step, cache, done, layer)
        states[layer], done = hidden[0].clone(), layer
    hidden = adapter.forward_layers(hidden, step, cache, done, adapter.num_layers)
    return states, adapter.logits(hidden[0, start:])


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
        bar.update(1)
        bar.set_postfix(kl=f"{state.losses[-1]:.3f}")
        if on_checkpoint is not None and (state.step % config.checkpoint_every == 0 or state.step == config.steps):
            on_checkpoint(state)
    bar.close()
    head.eval()
    return state


def checkpoint_path(out: str | os.PathLike[str]) -> Path:
    return Path(f"{out}.ckpt")


def save_checkpoint(
    path: Path, head: TrainedExitHead, optimizer: torch.optim.Optimizer, state: TrainState, config: TrainConfig,
    corpus: Corpus, run_info: dict[str, str],
) -> None:  # fmt: skip
    payload = {
        "version": CHECKPOINT_VERSION,
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
        "config": asdict(config),
        "corpus": asdict(corpus),
        "run_info": run_info,
        "model_fingerprint": model_fingerprint(head.adapter),
    }
    atomic_write(path, lambda temp: torch.save(payload, temp))


def load_checkpoint(path: Path, head: TrainedExitHead, config: TrainConfig, run_info: dict[str, str]) -> dict:
    """A checkpoint's payload, after checking it belongs to this model and run (same data, batches and head)."""
    try:
        payload = torch.load(path, map_location=head.adapter.device, weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} is unreadable ({err}); delete it to start over") from None
    if payload.get("version") != CHECKPOINT_VERSION or payload.get("model_fingerprint") != model_fingerprint(
        head.adapter
    ):
        raise ValueError(f"checkpoint {path} belongs to another model or format version; delete it to start over")
    saved = dict(payload["config"])
    for key in ("exit_layer", "lr", "batch_size", "seed"):
        if saved[key] != getattr(config, key):
            raise ValueError(f"checkpoint {path} was made with {key}={saved[key]}, not {getattr(config, key)}")
    if payload["run_info"] != run_info:
        raise ValueError(f"checkpoint {path} was made from other prompts or settings: {payload['run_info']}")
    return payload


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
) -> tuple[TrainedExitHead, TrainState]:
    """Generate, distil and write the head to `out` (atomically), checkpointing next to it; resume if asked."""
    import datetime

    adapter = ModelAdapter(model)
    head = TrainedExitHead(adapter, config.exit_layer)
    optimizer = make_optimizer(head, config.lr)
    info = dict(run_info or {}) | {"max_new_tokens": str(max_new_tokens), "prompts_count": str(len(prompts))}
    ckpt = checkpoint_path(out)
    state, corpus = TrainState(), None
    if resume and ckpt.is_file():
        payload = load_checkpoint(ckpt, head, config, info)
        head.load_state_dict(payload["head"])
        optimizer.load_state_dict(payload["optimizer"])
        state, corpus = TrainState(**payload["state"]), Corpus(**payload["corpus"])
    if corpus is None:
        eos = model.generation_config.eos_token_id
        corpus = generate_corpus(model, prompts, max_new_tokens, eos, progress=progress)
    examples = teacher_examples(adapter, corpus, [config.exit_layer], progress=progress)

    def checkpoint(current: TrainState) -> None:
        save_checkpoint(ckpt, head, optimizer, current, config, corpus, info)

    train(head, examples, config, optimizer, state, on_checkpoint=checkpoint, progress=progress)
    first = sum(state.losses[:10]) / max(len(state.losses[:10]), 1)
    last = sum(state.losses[-10:]) / max(len(state.losses[-10:]), 1)
    metadata = info | {
        "steps": config.steps, "lr": config.lr, "batch_size": config.batch_size, "seed": config.seed,
        "kl_first10": f"{first:.4f}", "kl_last10": f"{last:.4f}",
        "train_tokens": sum(len(e.teacher_tokens) for e in examples),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }  # fmt: skip
    from executor.heads import save_head

    save_head(head, out, dtype=save_dtype, info=metadata)
    return head, state


@torch.no_grad()
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
