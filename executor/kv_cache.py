"""A preallocated key/value cache written by absolute position (gpt-fast style).

Every layer owns two buffers `[B, Hkv, max_len, D]` allocated once. A pass writes its keys and values at its
positions with one `index_put_` (static shapes, no host sync, so a decode or verify step can be captured in a CUDA
graph); rolling back is only lowering a host-side length: rejected positions are overwritten by the next write, and
the attention mask (a query at position p sees slots <= p) never lets a query see a stale slot beyond itself.

Layers may be valid to different lengths: while drafting, layers [0, exit_layer) run ahead of the later ones. The
host-side `lengths[layer][row]` records how far each layer holds valid entries; a write may overwrite or extend
that prefix but never leave a gap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from executor.adapter import Step


class KVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        layer_ids: Sequence[int] | None = None,
    ) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        with torch.inference_mode(False):  # plain tensors wherever the cache is made: one kind for a compiled layer
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.rows = torch.arange(batch, device=device).unsqueeze(1)  # [B, 1]: the row index of a write
        self.max_len = max_len
        self.batch = batch
        self.lengths = [[0] * batch for _ in range(num_layers)]
        # layers are addressed by model index: this cache holds `layer_ids` (default 0 .. n - 1; a pipeline stage's
        # layers and its exit head's, or a trained head's layer alone), in that order
        layer_ids = range(num_layers) if layer_ids is None else layer_ids
        if len(layer_ids) != num_layers:
            raise ValueError(f"layer_ids names {len(layer_ids)} layers, the cache holds {num_layers}")
        self._slots = {layer: slot for slot, layer in enumerate(layer_ids)}

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def slot(self, layer: int) -> int:
        """Where model layer `layer` lives in this cache's lists."""
        if layer not in self._slots:
            raise KeyError(f"KV cache holds layers {sorted(self._slots)}, not layer {layer}")
        return self._slots[layer]

    def claim(self, layers: Iterable[int], starts: Sequence[int], q: int) -> None:
        """The books of a pass that writes positions start .. start + q - 1 of every row in `layers`: refuse a gap
        or an overflow, then extend the valid prefixes. `write` does this itself for a step with host `starts`; a
        static step's caller (whose pass may be a replayed CUDA graph) calls it before launching the pass.

        Host work of every decode round, so the common case is cheap: a layer whose valid lengths are exactly the
        starts (a round's layers after its rollback, a draft step's after the step before) is checked with one list
        comparison, and every claimed layer gets the same new list (the books' lists are never changed in place). A
        refused claim changes no books."""
        starts = list(starts)
        extended = [start + q for start in starts]
        if starts and max(extended) > self.max_len:
            self._check_claim(layers, starts, q)  # the first (layer, row) at fault, as a row-by-row check meets it
        slots, books, claimed = self._slots, self.lengths, []
        for layer in layers:
            slot = slots[layer] if layer in slots else self.slot(layer)  # (`slot` raises for a layer not held)
            if books[slot] != starts and any(s > n for s, n in zip(starts, books[slot], strict=True)):
                self._check_claim((layer,), starts, q)
            claimed.append(slot)
        for slot in claimed:  # a refused claim changes no books
            books[slot] = extended

    def _check_claim(self, layers: Iterable[int], starts: Sequence[int], q: int) -> None:
        """Refuse the first gap or overflow, layer by layer and row by row."""
        for layer in layers:
            lengths = self.lengths[self.slot(layer)]
            for row, start in enumerate(starts):
                if start > lengths[row]:
                    raise ValueError(
                        f"KV cache layer {layer} row {row}: write at position {start} would leave a gap "
                        f"(valid length {lengths[row]})"
                    )
                if start + q > self.max_len:
                    raise ValueError(f"KV cache overflow: positions up to {start + q - 1}, capacity {self.max_len}")

    def write(self, layer: int, step: Step, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store key/value [B, Hkv, q, D] of `layer` at the step's positions (the books too, unless static)."""
        if step.starts is not None:
            self.claim((layer,), step.starts, step.q)
        slot = self.slot(layer)
        store(self.keys[slot], self.values[slot], self.rows, step.positions, key, value)

    def view(self, layer: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `kv_len` slots, [B, Hkv, kv_len, D] (views, no copy)."""
        index = self.slot(layer)
        return self.keys[index][:, :, :kv_len], self.values[index][:, :, :kv_len]

    def rollback(self, length: int | list[int], layers: Iterable[int] | None = None) -> None:
        """Forget everything at positions >= length (per row if a list) in `layers` (default: all). Layers that share
        one list of valid lengths (as `claim` leaves them) share the rolled-back one too."""
        per_row = [length] * self.batch if isinstance(length, int) else list(length)
        if any(n < 0 for n in per_row):
            raise ValueError(f"rollback length must be >= 0, got {per_row}")
        if len(per_row) != self.batch:
            raise ValueError(f"rollback takes one length per row ({self.batch}), got {len(per_row)}")
        books, done = self.lengths, {}  # id(old list) -> (old list, its rolled-back list)
        for slot in range(self.num_layers) if layers is None else (self.slot(n) for n in layers):
            old = books[slot]
            seen = done.get(id(old))
            if seen is None:
                seen = done[id(old)] = (old, [min(o, n) for o, n in zip(old, per_row, strict=True)])
            books[slot] = seen[1]


def rows_view(cache: KVCache, start: int, stop: int) -> KVCache:
    """A cache over rows [start, stop) of `cache`, sharing its buffers (views along the batch dimension) and its layers,
    with books of its own (`lengths`, which the caller sets before a pass)."""
    _, heads, _, head_dim = cache.keys[0].shape
    first = cache.keys[0]
    view = KVCache(
        num_layers=cache.num_layers, batch=stop - start, num_kv_heads=heads, max_len=1, head_dim=head_dim,
        dtype=first.dtype, device=first.device,
    )  # fmt: skip
    view.keys = [k[start:stop] for k in cache.keys]
    view.values = [v[start:stop] for v in cache.values]
    view.max_len = cache.max_len
    view._slots = dict(cache._slots)  # a stage's cache addresses its layers by model index: so does the view
    return view


def copy_rows(source: KVCache, target: KVCache, rows: Sequence[int], lengths: Sequence[int]) -> None:
    """Row `rows[i]`'s KV at positions < `lengths[i]` in `source` into row i of `target`, in every cache layer. In
    row order, so where both are one cache and every `rows[i]` >= i no row is written before it is read."""
    same = source.keys[0].data_ptr() == target.keys[0].data_ptr()
    for target_row, (row, length) in enumerate(zip(rows, lengths, strict=True)):
        if same and row == target_row:
            continue
        for keys, values, to_keys, to_values in zip(source.keys, source.values, target.keys, target.values,
                                                    strict=True):  # fmt: skip
            to_keys[target_row, :, :length] = keys[row, :, :length]
            to_values[target_row, :, :length] = values[row, :, :length]


def store(
    keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, key: torch.Tensor,
    value: torch.Tensor,
) -> None:  # fmt: skip
    """key/value [B, Hkv, q, D] into a layer's slots keys/values [B, Hkv, S, D] at `positions` [B, q] (`rows`
    [B, 1]): advanced indices around a slice select [B, q, Hkv, D], so each is one index_put_, no host sync."""
    keys[rows, :, positions] = key.transpose(1, 2)
    values[rows, :, positions] = value.transpose(1, 2)
