"""Fewer kernels per layer, the same values: a captured pass replays every kernel of a layer, so the adapter rotates
query and key as one tensor and gives SDPA an additive mask made once per pass. Both must be bit for bit what the
plain forms give (the decoders' equality with HF rests on it), in every dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from executor.adapter import Step, _rotate, _rotate_pair, attention_mask

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@given(
    heads=st.sampled_from([(4, 2), (3, 3), (8, 1)]),
    q=st.integers(1, 5),
    head_dim=st.sampled_from([4, 8, 16]),
    partial=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_rotating_query_and_key_together_equals_rotating_each(heads, q, head_dim, partial, dtype, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, q, heads[0], head_dim, generator=generator).to(dtype)
    key = torch.randn(2, q, heads[1], head_dim, generator=generator).to(dtype)
    rotary = head_dim // 2 if partial else head_dim
    cos, sin = (torch.randn(2, q, 1, rotary, generator=generator).to(dtype) for _ in range(2))
    joint_query, joint_key = _rotate_pair(query, key, cos, sin)
    assert torch.equal(joint_query, _rotate(query, cos, sin))
    assert torch.equal(joint_key, _rotate(key, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize(("q", "kv_heads"), [(1, 2), (4, 2), (3, 4)])
def test_the_additive_mask_gives_what_the_bool_mask_gives(dtype, window, q, kv_heads) -> None:
    generator = torch.Generator().manual_seed(q + kv_heads)
    positions = torch.tensor([[5 + i for i in range(q)], [2 + i for i in range(q)]])
    step = Step(positions=positions, starts=None, span=16)
    mask = attention_mask(step, window, dtype)
    slots, query_at = torch.arange(16), positions.unsqueeze(-1)
    visible = (slots <= query_at) & (slots > query_at - window if window else True)
    assert mask.dtype == dtype and mask.shape == (2, 1, q, 16)
    assert torch.equal(mask[:, 0] == 0, visible) and bool(torch.isneginf(mask[:, 0][~visible]).all())
    query = torch.randn(2, 4, q, 8, generator=generator).to(dtype)
    keys, values = (torch.randn(2, kv_heads, 16, 8, generator=generator).to(dtype) for _ in range(2))
    gqa = kv_heads != 4
    plain = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible.unsqueeze(1), enable_gqa=gqa)
    assert torch.equal(F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=gqa), plain)
