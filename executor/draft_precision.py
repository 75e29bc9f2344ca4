"""Drafting in a lower precision than the model verifies in (`generate(..., draft_dtype=...)`, EESD).

A draft is only a proposal: the verify pass decides every emitted token with the model as it is, so the draft may run
a cheaper copy of layers [0, E) and of the exit head, here one cast to a narrower float type (bfloat16 drafts for a
float32 model, float32 drafts for a float64 one). Where decoding is bound by reading weights (one row at a time on a
CPU, a GPU at small batch), a draft step then reads half the bytes.

What it changes in a round: the draft's KV entries for layers [0, E) are no longer the model's, so the verify pass
cannot start from the draft's layer-E states (KV reuse). It runs all L layers over the k + 1 positions instead
(the round's input token and its drafts), overwriting the draft's entries in those slots before any query reads them
(a layer stores its pass's keys and values, then attends). Where passes are bound by reading weights, a verify pass
over k + 1 positions from layer 0 costs about what one from layer E does: both read every weight once.

The cache stays the model's, in its dtype: a draft layer reads the committed positions' keys and values (the
model's own, exact) cast to its dtype, and stores its own cast back. A trained head's own layer keeps its KV from
the draft-precision head (`prefill` included): it shapes the drafts only. Outputs stay AR's token for token (greedy
and exact sampling); rejection sampling judges each draft by the draft-precision distribution it was drawn from.

The copies (layers [0, E), final norm, LM head, and the head's own weights) are made once per model, exit layer,
head and dtype and kept on the model object (`kept_on_model`), like captured passes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from executor.adapter import ModelAdapter, Step, with_layer_run
from executor.fusion import QKV, fuse_projections, fused_weights, unfuse_projections
from executor.heads import SharedExitHead, SubsetExitHead, TrainedExitHead, head_key
from executor.kv_cache import KVCache

MAX_DRAFT_COPIES = 2  # per model: each holds a copy of layers [0, E) and the LM head in the draft dtype


def draft_dtype_for(model_dtype: torch.dtype, draft_dtype: Any) -> torch.dtype | None:
    """The dtype drafts run in, or None (the model's own): `draft_dtype` as a dtype or a name ("bf16", "float32",
    ...), which must be a float type no wider than the model's."""
    if draft_dtype is None:
        return None
    from executor.models import resolve_dtype

    dtype = resolve_dtype(draft_dtype)
    if dtype == model_dtype:
        return None
    if torch.finfo(dtype).bits > torch.finfo(model_dtype).bits:
        raise ValueError(f"draft_dtype {dtype} is wider than the model's {model_dtype}: drafts run narrower or alike")
    return dtype


class CastOutput:
    """A module's output cast to `dtype` (the model's embedding, feeding the draft's layers)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        self.module, self.dtype = module, dtype

    def __call__(self, *args: Any) -> torch.Tensor:
        return self.module(*args).to(self.dtype)


class CastHead:
    """An exit head built over the draft adapter: takes the model's states, casts them to the draft dtype, and
    gives its logits back in the model's dtype."""

    def __init__(self, head: Any, dtype: torch.dtype, model_dtype: torch.dtype) -> None:
        self.inner, self.dtype, self.model_dtype = head, dtype, model_dtype
        self.extra_layers = getattr(head, "extra_layers", 0)
        self.cache_key = ("cast", head_key(head), dtype)

    def __call__(self, hidden: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        return self.inner(hidden.to(self.dtype), step, cache).to(self.model_dtype)

    def prefill(self, hidden: torch.Tensor, step: Step, cache: KVCache) -> None:
        self.inner.prefill(hidden.to(self.dtype), step, cache)


def low_precision_draft(adapter: ModelAdapter, exit_layer: int, head: Any, dtype: torch.dtype) -> tuple[Any, Any]:
    """(the draft adapter: `adapter` with layers [0, E), final norm and LM head in `dtype`; the exit head over it,
    cast at its edges), kept on the model per (E, head, dtype) and made after the model's layers were fused or not
    (`executor.fusion`), as their copies are."""
    fused = fused_weights(adapter.layers[0].self_attn, QKV[0]) is not None
    key = (exit_layer, head_key(head), dtype, fused)

    def build() -> tuple[ModelAdapter, Any]:
        draft = draft_adapter(adapter, exit_layer, dtype, fused)
        return draft, CastHead(draft_head(head, draft, exit_layer, dtype), dtype, adapter.dtype)

    from executor.passes import kept_on_model

    draft, cast = kept_on_model(adapter.model, "_eesd_low_drafts", key, build, MAX_DRAFT_COPIES)
    draft = copy.copy(draft)
    draft.layer_run = adapter.layer_run  # compiled layers (capture="compile-layers") as the model's run
    cast = copy.copy(cast)
    cast.inner = with_layer_run(cast.inner, adapter.layer_run)
    return draft, cast


def draft_adapter(adapter: ModelAdapter, exit_layer: int, dtype: torch.dtype, fused: bool) -> ModelAdapter:
    """A view of `adapter` whose layers [0, E), final norm and LM head are copies in `dtype` and whose embedding
    casts to it (the layers after E are the model's: a draft never runs them)."""
    view = copy.copy(adapter)
    with torch.inference_mode(False), torch.no_grad():
        layers = [copy.deepcopy(layer).to(dtype) for layer in adapter.layers[:exit_layer]]
        (fuse_projections if fused else unfuse_projections)(layers)  # weights as views of one matrix, as the model's
        view.layers = layers + adapter.layers[exit_layer:]
        view.norm = copy.deepcopy(adapter.norm).to(dtype)
        view.lm_head = copy.deepcopy(adapter.lm_head).to(dtype)
    view.embed_tokens = CastOutput(adapter.embed_tokens, dtype)
    view.layer_run = None
    return view


def draft_head(head: Any, draft: ModelAdapter, exit_layer: int, dtype: torch.dtype) -> Any:
    """`head` (a resolved exit head of the model) rebuilt over the draft adapter, its weights in `dtype`."""
    if isinstance(head, SubsetExitHead):
        return SubsetExitHead(draft, head.ranking)
    if isinstance(head, SharedExitHead):
        return SharedExitHead(draft)
    if isinstance(head, TrainedExitHead):
        with torch.inference_mode(False), torch.no_grad():
            tensors = {name: value.detach().clone() for name, value in head.state_dict().items()}
            rebuilt = type(head)(draft, exit_layer, head.init_layer, tensors=tensors).to(dtype=dtype)
        rebuilt.metadata = dict(head.metadata)
        return rebuilt
    raise ValueError(f"draft_dtype needs a shared, vocabulary-subset or trained exit head, got {type(head).__name__}")
