"""Public API: `generate(model, input_ids, method=...)` and the drop-in `EarlyExitGenerator`.

Both check their arguments up front and raise `ValueError` saying what was wrong and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from executor.adapter import ModelAdapter
from executor.decoding import GenerationStats, TokenSink, decode_ar, decode_eesd
from sim.policy import DraftPolicy, make_policy

METHODS = ("ar", "eesd")


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [1, prompt + new tokens], like HF `generate`
    stats: GenerationStats


def _adapter(model: nn.Module | ModelAdapter) -> ModelAdapter:
    return model if isinstance(model, ModelAdapter) else ModelAdapter(model)


def _prompt_tokens(input_ids: torch.Tensor | list[int]) -> list[int]:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"input_ids has {ids.shape[0]} rows; this decoder takes batch size 1")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be [seq] or [1, seq], got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("empty prompt: input_ids must hold at least one token")
    if ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must hold integer token ids, got {ids.dtype}")
    return ids.tolist()


def _eos_ids(eos_token_id: int | Iterable[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(t) for t in (eos_token_id.tolist() if torch.is_tensor(eos_token_id) else eos_token_id)]


def default_exit_layer(num_layers: int) -> int:
    """The middle layer: LayerSkip and the EESD paper draft with about half the model."""
    return max(1, num_layers // 2)


def check_arguments(
    adapter: ModelAdapter, prompt: list[int], method: str, exit_layer: int | None, max_new_tokens: int
) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    num_layers = adapter.num_layers
    if method == "eesd" and not (isinstance(exit_layer, int) and 1 <= exit_layer < num_layers):
        raise ValueError(
            f"exit_layer must be an integer in [1, {num_layers - 1}] for a {num_layers}-layer model, got {exit_layer!r}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    vocab = adapter.embed_tokens.num_embeddings
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise ValueError(f"input_ids must lie in [0, {vocab - 1}] (the model's vocabulary)")
    total = len(prompt) + max_new_tokens
    if total > adapter.max_positions:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's "
            f"context of {adapter.max_positions} positions"
        )


def generate(
    model: nn.Module | ModelAdapter,
    input_ids: torch.Tensor | list[int],
    *,
    method: str = "ar",
    exit_layer: int | None = None,
    draft_len: int = 4,
    policy: str | DraftPolicy | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | Iterable[int] | None = None,
    streamer_callback: Callable[[list[int]], None] | None = None,
) -> GenerationResult:
    """Greedy decoding with `method` "ar" (reference) or "eesd" (early-exit self-speculation); lossless.

    `exit_layer` defaults to the middle layer; `policy` (e.g. "fixed:4") overrides `draft_len`. The result's
    `sequences` is the prompt followed by the new tokens, ending at the first EOS or after `max_new_tokens`.
    """
    adapter = _adapter(model)
    prompt = _prompt_tokens(input_ids)
    if method == "eesd" and exit_layer is None:
        exit_layer = default_exit_layer(adapter.num_layers)
    if not isinstance(draft_len, int) or draft_len < 1:
        raise ValueError(f"draft_len must be an integer >= 1, got {draft_len!r}")
    check_arguments(adapter, prompt, method, exit_layer, max_new_tokens)
    draft_policy = make_policy(policy if policy is not None else f"fixed:{draft_len}")
    sink = TokenSink(max_new_tokens, _eos_ids(eos_token_id), streamer_callback)
    cache = adapter.new_cache(1, len(prompt) + max_new_tokens + draft_policy.max_draft_len + 1)
    if sink.done:
        stats = GenerationStats(method=method, prompt_tokens=len(prompt))
    elif method == "ar":
        stats = decode_ar(adapter, prompt, sink, cache)
    else:
        stats = decode_eesd(adapter, prompt, sink, cache, exit_layer=exit_layer, policy=draft_policy)
    sequences = torch.tensor([prompt + sink.tokens], dtype=torch.long, device=adapter.device)
    return GenerationResult(sequences=sequences, stats=stats)


class EarlyExitGenerator:
    """Drop-in for `model.generate`: same arguments, same returned `LongTensor`, decoded with AR or EESD.

    >>> generator = EarlyExitGenerator(model, method="eesd", exit_layer=8, draft_len=4)
    >>> generator.generate(input_ids, max_new_tokens=64)  # == model.generate(input_ids, max_new_tokens=64)
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "eesd",
        exit_layer: int | None = None,
        draft_len: int = 4,
        policy: str | DraftPolicy | None = None,
    ) -> None:
        self.model = model
        self.adapter = ModelAdapter(model)
        self.method = method
        self.exit_layer = exit_layer
        self.draft_len = draft_len
        self.policy = policy
        self.last_stats: GenerationStats | None = None

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        config = self.model.generation_config
        if do_sample:
            raise ValueError("do_sample=True is not supported by this generator yet: use do_sample=False (greedy)")
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise ValueError("attention_mask with padding needs batched decoding, which this generator lacks yet")
        if max_new_tokens is None:
            max_new_tokens = config.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = max(config.max_length - torch.as_tensor(input_ids).shape[-1], 0)
        result = generate(
            self.adapter,
            input_ids,
            method=self.method,
            exit_layer=self.exit_layer,
            draft_len=self.draft_len,
            policy=self.policy,
            max_new_tokens=max_new_tokens,
            eos_token_id=config.eos_token_id if eos_token_id is None else eos_token_id,
        )
        self.last_stats = result.stats
        return result.sequences
