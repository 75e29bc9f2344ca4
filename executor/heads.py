"""Exit heads: what turns the exit layer's hidden states into draft logits.

`shared` is the model's own final norm + LM head applied at the exit layer (LayerSkip's shared exit, no training).
A head object has `extra_layers` (decoder layers of its own, which get KV-cache slots after the model's layers),
`__call__(hidden, step, cache) -> logits` and `prefill(hidden, step, cache)` (fills its own KV from the exit-layer
states of positions it has not seen).
"""

from __future__ import annotations

from typing import Any

from executor.adapter import ModelAdapter
from executor.decoding import SharedExitHead


def resolve_head(head: Any, adapter: ModelAdapter, exit_layer: int):
    """A head object from `None` / "shared" / a head object."""
    if head is None or head == "shared":
        return SharedExitHead(adapter)
    if isinstance(head, str):
        raise ValueError(f"head must be 'shared' or a head object, got {head!r}")
    return head
