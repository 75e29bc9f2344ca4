"""The decoders: vanilla autoregressive (AR) and early-exit self-speculative decoding (EESD), on batches.

EESD (Liu et al. 2024, arXiv 2406.03853) with LayerSkip's KV reuse (arXiv 2404.16710). Notation: L layers,
exit layer E, a row's last committed token t at position p, drafts d_1..d_k.

    1. Draft: run t, d_1, .., d_{k-1} through layers [0, E) at positions p .. p+k-1; the exit head at layer E
       proposes d_1 .. d_k. The layer-E hidden states are kept (LayerSkip's exit-query cache).
    2. Verify: run d_k through layers [0, E) at p+k, then all k+1 saved layer-E states through layers [E, L)
       in one pass. Layers [0, E) are never recomputed: their KV was written while drafting.
    3. Accept the longest prefix the full model agrees with (greedy / exact sampling: d_i equals the full model's
       token at p+i; rejection sampling: min(1, p/q) tests), then emit the full model's own next token (the
       correction, or the bonus token when all k were accepted): accepted + 1 tokens per round.
    4. Roll every layer back to p + accepted + 1: the rejected positions are overwritten next round.

Batches: every row keeps its own positions (cache slot = the row's absolute position, so no padding enters the
cache), its own draft policy and its own accepted lengths. A pass has one q for all rows: a row whose policy stopped
drafting early keeps computing (its surplus drafts are never accepted), and a finished row is parked: it recomputes
its last slot and is rolled back after each pass, so shapes stay static.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from executor.adapter import ModelAdapter, Step
from executor.kv_cache import KVCache
from executor.sampling import SamplingConfig, TokenSelector, accept_rejection
from sim.policy import DraftPolicy


@dataclass
class GenerationStats:
    """What one generation did. `drafted[i]` / `accepted[i]` belong to one row's round i (EESD); AR drafts none."""

    method: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    prefill_time_s: float = 0.0
    wall_time_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens (nan if nothing was drafted)."""
        drafted = sum(self.drafted)
        return sum(self.accepted) / drafted if drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """New tokens per verify round (per row), the prefill's token excluded."""
        return sum(a + 1 for a in self.accepted) / len(self.accepted) if self.accepted else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else float("nan")

    def accepted_histogram(self) -> dict[int, int]:
        """Rounds per accepted length."""
        histogram: dict[int, int] = {}
        for accepted in self.accepted:
            histogram[accepted] = histogram.get(accepted, 0) + 1
        return dict(sorted(histogram.items()))

    def summary(self) -> str:
        lines = [
            f"method {self.method}: {self.new_tokens} new tokens in {self.rounds} rounds, "
            f"{self.wall_time_s:.3f} s ({self.tokens_per_s:.1f} tok/s, prefill {self.prefill_time_s:.3f} s)"
        ]
        if self.drafted:
            lines.append(
                f"drafted {sum(self.drafted)}, accepted {sum(self.accepted)} "
                f"(rate {self.acceptance_rate:.3f}), {self.tokens_per_round:.2f} tokens/round, "
                f"accepted-length histogram {self.accepted_histogram()}"
            )
        return "\n".join(lines)


class TokenSink:
    """Collects one row's emitted tokens and says when to stop: after an EOS token or `max_new_tokens` tokens."""

    def __init__(
        self,
        max_new_tokens: int,
        eos_token_ids: Iterable[int],
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokens: list[int] = []
        self.done = max_new_tokens == 0
        self._on_tokens = on_tokens

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def emit(self, tokens: list[int]) -> None:
        taken: list[int] = []
        for token in tokens[: self.remaining]:
            taken.append(token)
            if token in self.eos_token_ids:
                self.done = True
                break
        self.tokens.extend(taken)
        self.done = self.done or self.remaining == 0
        if self._on_tokens is not None and taken:
            self._on_tokens(taken)


class SharedExitHead:
    """The model's own final norm + LM head applied at the exit layer (LayerSkip's shared exit, no training)."""

    extra_layers = 0

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter

    def __call__(self, hidden: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        return self.adapter.logits(hidden)

    def prefill(self, hidden: torch.Tensor, step: Step, cache: KVCache) -> None:
        """A head with layers of its own fills their KV from the exit-layer states here; this one has none."""


@dataclass
class Rows:
    """Per-row decoding state: prompt, sink, the last committed token and the position it goes to."""

    prompts: list[list[int]]
    sinks: list[TokenSink]
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    @property
    def active(self) -> list[int]:
        return [row for row, sink in enumerate(self.sinks) if not sink.done]

    def commit(self, row: int, tokens: list[int]) -> None:
        """Emit a row's new tokens; a finished row stays parked at its position."""
        if self.sinks[row].done:
            return
        self.sinks[row].emit(tokens)
        self.tokens[row] = tokens[-1]
        self.positions[row] += len(tokens)

    def step(self, offset: int, q: int, device: torch.device) -> Step:
        starts = tuple(p + offset for p in self.positions)
        positions = torch.tensor([list(range(s, s + q)) for s in starts], device=device)
        return Step(positions=positions, starts=starts)


def _column(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device).unsqueeze(1)


def prefill_rows(
    adapter: ModelAdapter, cache: KVCache, rows: Rows, selector: TokenSelector, exit_layer=None, head=None
) -> None:
    """Run every prompt through all layers (right-padded in row space, pads rolled back); commit the first token."""
    lengths = [len(p) for p in rows.prompts]
    width = max(lengths)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in rows.prompts], device=adapter.device)
    positions = torch.arange(width, device=adapter.device).expand(len(lengths), width)
    step = Step(positions=positions, starts=(0,) * len(lengths))
    hidden = adapter.embed(ids)
    if exit_layer is None:
        hidden = adapter.forward_layers(hidden, step, cache, 0, adapter.num_layers)
    else:
        hidden = adapter.forward_layers(hidden, step, cache, 0, exit_layer)
        head.prefill(hidden, step, cache)
        hidden = adapter.forward_layers(hidden, step, cache, exit_layer, adapter.num_layers)
    last = hidden[torch.arange(len(lengths)), torch.tensor(lengths) - 1].unsqueeze(1)  # [B, 1, d]
    first = selector.select(adapter.logits(last), _column(lengths, adapter.device))[:, 0].tolist()
    cache.rollback(lengths)
    rows.tokens = list(first)
    rows.positions = list(lengths)
    for row, sink in enumerate(rows.sinks):
        sink.emit([first[row]])


def prefill(adapter: ModelAdapter, cache: KVCache, prompt: list[int], exit_layer=None, head=None) -> int:
    """Batch-1 greedy prefill: the full model's first new token after `prompt` (KV of all layers written)."""
    rows = Rows(prompts=[prompt], sinks=[TokenSink(1, ())])
    selector = TokenSelector(SamplingConfig(), [len(prompt)], 0, [], adapter.device)
    prefill_rows(adapter, cache, rows, selector, exit_layer, head)
    return rows.tokens[0]


@torch.inference_mode()
def decode_ar(
    adapter: ModelAdapter, rows: Rows, cache: KVCache, selector: TokenSelector, stats: GenerationStats
) -> None:
    """The reference: one token per full forward pass."""
    begin = time.perf_counter()
    prefill_rows(adapter, cache, rows, selector)
    stats.prefill_time_s = time.perf_counter() - begin
    stats.rounds = 1
    while rows.active:
        step = rows.step(0, 1, adapter.device)
        hidden = adapter.embed(_column(rows.tokens, adapter.device))
        hidden = adapter.forward_layers(hidden, step, cache, 0, adapter.num_layers)
        new = selector.select(adapter.logits(hidden), step.positions + 1)[:, 0].tolist()
        for row in range(len(new)):
            rows.commit(row, [new[row]])
        cache.rollback(rows.positions)  # parks finished rows
        stats.rounds += 1
    stats.wall_time_s = time.perf_counter() - begin


@dataclass
class Drafts:
    """One round's drafts: per row the tokens (and, for rejection sampling, the distributions they came from)."""

    budgets: list[int]
    tokens: list[list[int]]
    probs: list[list[torch.Tensor]]
    exit_states: list[torch.Tensor] = field(default_factory=list)  # layer-E states [B, 1, d] of t, d_1, ..
    last: list[int] = field(default_factory=list)  # the newest draft of every row, the verify pass's input

    def wants_more(self) -> bool:
        return any(len(t) < b for t, b in zip(self.tokens, self.budgets, strict=True))


def draft_step(
    adapter: ModelAdapter, cache: KVCache, head, exit_layer: int, rows: Rows, drafts: Drafts, selector, policies
) -> None:
    """Step 1, one token deep for every row: layers [0, E) + exit head at positions p + i."""
    offset = len(drafts.exit_states)
    inputs = drafts.last if offset else rows.tokens
    step = rows.step(offset, 1, adapter.device)
    hidden = adapter.forward_layers(adapter.embed(_column(inputs, adapter.device)), step, cache, 0, exit_layer)
    logits = head(hidden, step, cache)
    drafts.exit_states.append(hidden)
    rejection = selector.config.kind == "rejection"
    probs = selector.probs(logits, step.positions + 1)[:, 0] if rejection else None
    new = (selector.sample(probs) if rejection else selector.select(logits, step.positions + 1)[:, 0]).tolist()
    confidence = logits[:, -1].softmax(-1).amax(-1).tolist() if any(p.needs_confidence for p in policies) else None
    drafts.last = new
    for row, token in enumerate(new):
        if len(drafts.tokens[row]) >= drafts.budgets[row]:
            continue
        drafts.tokens[row].append(token)
        if rejection:
            drafts.probs[row].append(probs[row])
        drafted = len(drafts.tokens[row])
        if not policies[row].keep_drafting(drafted, confidence[row] if confidence else 1.0):
            drafts.budgets[row] = drafted


def verify_pass(adapter: ModelAdapter, cache: KVCache, head, exit_layer: int, rows: Rows, drafts: Drafts):
    """Step 2: full-model logits [B, k+1, V] after each of t, d_1, .., d_k; layers [0, E) only for d_k."""
    k = len(drafts.exit_states)
    inputs = drafts.last if k else rows.tokens
    step = rows.step(k, 1, adapter.device)
    hidden = adapter.forward_layers(adapter.embed(_column(inputs, adapter.device)), step, cache, 0, exit_layer)
    head.prefill(hidden, step, cache)  # keeps a layered head's KV in step with layers [0, E)
    states = torch.cat([*drafts.exit_states, hidden], dim=1)
    step = rows.step(0, k + 1, adapter.device)
    return adapter.logits(adapter.forward_layers(states, step, cache, exit_layer, adapter.num_layers)), step


def full_model_choices(selector: TokenSelector, logits: torch.Tensor, step: Step):
    """The full model's verdict material for all rows at once: its tokens [B][k+1] (greedy / exact sampling) or its
    warped distributions [B, k+1, V] (rejection sampling). Logits at position j choose the token at j + 1."""
    if selector.config.kind == "rejection":
        return selector.probs(logits, step.positions + 1)
    return selector.select(logits, step.positions + 1).tolist()


def accept(selector: TokenSelector, drafts: Drafts, choices, row: int) -> tuple[int, int]:
    """Step 3 for one row: (accepted drafts, the full model's token after them)."""
    own = drafts.tokens[row]
    if selector.config.kind == "rejection":
        return accept_rejection(selector, own, drafts.probs[row], choices[row])
    tokens = choices[row]
    accepted = 0
    while accepted < len(own) and own[accepted] == tokens[accepted]:
        accepted += 1
    return accepted, tokens[accepted]


def forced_verdict(selector: TokenSelector, choices, row: int, accepted: int) -> tuple[int, int]:
    """Step 3 replaced (benchmark only, NOT lossless): `accepted` drafts kept whatever the full model said, then the
    full model's own token at that position, as a real verdict with that accepted length would emit."""
    if selector.config.kind == "rejection":
        return accepted, int(selector.sample(choices[row, accepted].unsqueeze(0))[0])
    return accepted, choices[row][accepted]


@torch.inference_mode()
def decode_eesd(
    adapter: ModelAdapter,
    rows: Rows,
    cache: KVCache,
    selector: TokenSelector,
    stats: GenerationStats,
    *,
    exit_layer: int,
    policies: list[DraftPolicy],
    head=None,
    forced_accept: Callable[[int], int] | None = None,
) -> None:
    """Draft with layers [0, exit_layer) + exit head, verify with layers [exit_layer, L) in one pass.

    `forced_accept` (benchmark only, NOT lossless, never the default) replaces step 3's decision: it is called once
    per active row and round, in row order, with the row's drafted count and returns how many drafts to accept
    (capped to [0, drafted]). Drafting and the verify pass are unchanged, so the work per round is exactly a real
    round's at that accepted length, but the emitted drafts need not be the full model's tokens.
    """
    head = head if head is not None else SharedExitHead(adapter)
    begin = time.perf_counter()
    prefill_rows(adapter, cache, rows, selector, exit_layer, head)
    stats.prefill_time_s = time.perf_counter() - begin
    while rows.active:
        active = set(rows.active)
        budgets = [
            min(policies[row].begin_round(), rows.sinks[row].remaining - 1) if row in active else 0
            for row in range(len(policies))
        ]
        drafts = Drafts(budgets=budgets, tokens=[[] for _ in budgets], probs=[[] for _ in budgets])
        while drafts.wants_more():
            draft_step(adapter, cache, head, exit_layer, rows, drafts, selector, policies)
        logits, step = verify_pass(adapter, cache, head, exit_layer, rows, drafts)
        choices = full_model_choices(selector, logits, step)
        for row in sorted(active):
            if forced_accept is None:
                accepted, token = accept(selector, drafts, choices, row)
            else:
                drafted = len(drafts.tokens[row])
                accepted, token = forced_verdict(selector, choices, row, min(max(forced_accept(drafted), 0), drafted))
            policies[row].update(len(drafts.tokens[row]), accepted)
            rows.commit(row, drafts.tokens[row][:accepted] + [token])
            stats.drafted.append(len(drafts.tokens[row]))
            stats.accepted.append(accepted)
        cache.rollback(rows.positions)  # step 4; also parks finished rows
        stats.rounds += 1
    stats.wall_time_s = time.perf_counter() - begin
