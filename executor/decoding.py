"""The decoders: vanilla autoregressive (AR) and early-exit self-speculative decoding (EESD), greedy, batch 1.

EESD (Liu et al. 2024, arXiv 2406.03853) with LayerSkip's KV reuse (arXiv 2404.16710). Notation: L layers, exit
layer E, the last committed token t at position p, k drafts d_1..d_k.

    1. Draft: run t, d_1, .., d_{k-1} through layers [0, E) at positions p .. p+k-1; the exit head at layer E
       proposes d_1 .. d_k. The layer-E hidden states are kept (LayerSkip's exit-query cache).
    2. Verify: run d_k through layers [0, E) at p+k, then all k+1 saved layer-E states through layers [E, L) in one
       pass. Layers [0, E) are never recomputed: their KV was written while drafting.
    3. Accept the longest prefix with d_i == argmax of the full model at p+i-1, then emit the full model's own
       next token (the correction, or the bonus token when all k were accepted): accepted + 1 tokens per round.
    4. Roll every layer back to p + accepted + 1: the rejected positions are overwritten next round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from executor.adapter import ModelAdapter, Step
from executor.kv_cache import KVCache
from sim.policy import DraftPolicy


@dataclass
class GenerationStats:
    """What one generation did. `drafted[i]` / `accepted[i]` belong to round i (EESD); AR has no drafts."""

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
        return self.new_tokens / self.rounds if self.rounds else float("nan")

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
    """Collects emitted tokens and says when to stop: after an EOS token or `max_new_tokens` tokens."""

    def __init__(
        self, max_new_tokens: int, eos_token_ids: Iterable[int], on_tokens: Callable[[list[int]], None] | None
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
        """A head with its own layers would fill their KV from the prompt's exit-layer states here."""


def _greedy(logits: torch.Tensor) -> list[int]:
    """[1, q, V] -> the q argmax token ids (ties go to the lowest id, as in HF)."""
    return logits[0].argmax(dim=-1).tolist()


def _ids(tokens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long, device=device)


def prefill(adapter: ModelAdapter, cache: KVCache, prompt: list[int], exit_layer: int | None = None, head=None):
    """Run the prompt through all layers; return the full model's first new token.

    With an exit layer and a head that has layers of its own, the head's KV is filled from the layer-E states.
    """
    step = Step.at(0, len(prompt), adapter.device)
    hidden = adapter.embed(_ids(prompt, adapter.device))
    if exit_layer is None:
        hidden = adapter.forward_layers(hidden, step, cache, 0, adapter.num_layers)
    else:
        hidden = adapter.forward_layers(hidden, step, cache, 0, exit_layer)
        head.prefill(hidden, step, cache)
        hidden = adapter.forward_layers(hidden, step, cache, exit_layer, adapter.num_layers)
    return _greedy(adapter.logits(hidden[:, -1:]))[0]


@torch.inference_mode()
def decode_ar(adapter: ModelAdapter, prompt: list[int], sink: TokenSink, cache: KVCache) -> GenerationStats:
    """The reference: one token per full forward pass."""
    stats = GenerationStats(method="ar", prompt_tokens=len(prompt))
    begin = time.perf_counter()
    token = prefill(adapter, cache, prompt)
    stats.prefill_time_s = time.perf_counter() - begin
    sink.emit([token])
    stats.rounds = 1
    while not sink.done:
        step = Step.at(len(prompt) + len(sink.tokens) - 1, 1, adapter.device)
        hidden = adapter.forward_layers(
            adapter.embed(_ids([token], adapter.device)), step, cache, 0, adapter.num_layers
        )
        token = _greedy(adapter.logits(hidden))[0]
        sink.emit([token])
        stats.rounds += 1
    stats.new_tokens = len(sink.tokens)
    stats.wall_time_s = time.perf_counter() - begin
    return stats


@dataclass
class Draft:
    tokens: list[int]
    exit_states: list[torch.Tensor]  # layer-E hidden states [1, 1, d] of t, d_1, .., d_{k-1}


def draft_tokens(
    adapter: ModelAdapter,
    cache: KVCache,
    head,
    exit_layer: int,
    token: int,
    position: int,
    budget: int,
    policy: DraftPolicy,
) -> Draft:
    """Step 1: up to `budget` drafts from layers [0, exit_layer) + the exit head, as long as the policy agrees."""
    draft = Draft(tokens=[], exit_states=[])
    while len(draft.tokens) < budget:
        step = Step.at(position + len(draft.tokens), 1, adapter.device)
        hidden = adapter.forward_layers(adapter.embed(_ids([token], adapter.device)), step, cache, 0, exit_layer)
        logits = head(hidden, step, cache)
        token = _greedy(logits)[0]
        draft.exit_states.append(hidden)
        draft.tokens.append(token)
        confidence = float(logits[0, -1].softmax(-1).max()) if policy.needs_confidence else 1.0
        if not policy.keep_drafting(len(draft.tokens), confidence):
            break
    return draft


def verify(
    adapter: ModelAdapter, cache: KVCache, head, exit_layer: int, token: int, position: int, draft: Draft
) -> list[int]:
    """Step 2: the full model's greedy token after each of t, d_1, .., d_k (k + 1 predictions)."""
    last = draft.tokens[-1] if draft.tokens else token
    k = len(draft.tokens)
    step = Step.at(position + k, 1, adapter.device)
    hidden = adapter.forward_layers(adapter.embed(_ids([last], adapter.device)), step, cache, 0, exit_layer)
    head.prefill(hidden, step, cache)  # keeps a layered head's KV in step with layers [0, E)
    states = torch.cat([*draft.exit_states, hidden], dim=1)  # [1, k + 1, d]
    step = Step.at(position, k + 1, adapter.device)
    states = adapter.forward_layers(states, step, cache, exit_layer, adapter.num_layers)
    return _greedy(adapter.logits(states))


def accept_greedy(drafts: list[int], targets: list[int]) -> int:
    """Step 3: length of the longest prefix of drafts that the full model agrees with."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return accepted


@torch.inference_mode()
def decode_eesd(
    adapter: ModelAdapter,
    prompt: list[int],
    sink: TokenSink,
    cache: KVCache,
    *,
    exit_layer: int,
    policy: DraftPolicy,
    head=None,
) -> GenerationStats:
    """Draft with layers [0, exit_layer) + exit head, verify with layers [exit_layer, L) in one pass."""
    head = head if head is not None else SharedExitHead(adapter)
    stats = GenerationStats(method="eesd", prompt_tokens=len(prompt))
    begin = time.perf_counter()
    token = prefill(adapter, cache, prompt, exit_layer, head)
    stats.prefill_time_s = time.perf_counter() - begin
    sink.emit([token])
    while not sink.done:
        position = len(prompt) + len(sink.tokens) - 1  # where `token` goes
        budget = min(policy.begin_round(), sink.remaining - 1)  # never draft past max_new_tokens
        draft = draft_tokens(adapter, cache, head, exit_layer, token, position, budget, policy)
        targets = verify(adapter, cache, head, exit_layer, token, position, draft)
        accepted = accept_greedy(draft.tokens, targets)
        cache.rollback(position + accepted + 1)  # step 4
        policy.update(len(draft.tokens), accepted)
        sink.emit(draft.tokens[:accepted] + [targets[accepted]])
        token = targets[accepted]
        stats.rounds += 1
        stats.drafted.append(len(draft.tokens))
        stats.accepted.append(accepted)
    stats.new_tokens = len(sink.tokens)
    stats.wall_time_s = time.perf_counter() - begin
    return stats
