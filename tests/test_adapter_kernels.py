"""Fewer kernels per layer, the same values: a captured pass replays every kernel of a layer, so the adapter rotates
query and key as one tensor and gives SDPA an additive mask made once per pass. Both must be bit for bit what the
plain forms give (the decoders' equality with HF rests on it), in every dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import TinySpec, scale_late_layers, tiny_model

import executor
from executor import adapter
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


# ---- the LM head's kernel order on a CPU -----------------------------------------------------------------------------
@pytest.fixture
def head_orders(monkeypatch):
    """A clean memory of timed choices for each test (restored after it)."""
    monkeypatch.setattr(adapter, "_TRANSPOSED_WINS", {})
    return adapter


@pytest.mark.parametrize("kernel", ["linear", "transposed", "auto"])
@pytest.mark.parametrize("rows", [1, 2, 5, 9])
def test_every_head_order_computes_the_same_logits(head_orders, monkeypatch, kernel, rows) -> None:
    monkeypatch.setenv(adapter.HEAD_KERNEL_ENV, kernel)
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(adapter.LARGE_HEAD_ROWS + 3, 24, generator=generator, dtype=torch.float64)
    x = torch.randn(1, rows, 24, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(adapter.head_linear(x, weight), F.linear(x, weight), rtol=1e-12, atol=1e-12)
    if kernel != "auto":
        assert adapter.transposed_wins(x.reshape(rows, 24), weight) == (kernel == "transposed")


def test_auto_keeps_the_order_timed_faster_once_per_shape(head_orders, monkeypatch) -> None:
    monkeypatch.delenv(adapter.HEAD_KERNEL_ENV, raising=False)
    times = [1.0, 2.0, 3.0, 1.0]  # seconds of F.linear, then W @ x^T: linear wins the first shape, W @ x^T the second
    monkeypatch.setattr(adapter, "_fastest_s", lambda run, repeats=3: times.pop(0))
    weight = torch.randn(adapter.LARGE_HEAD_ROWS, 8)
    assert not adapter.transposed_wins(torch.randn(2, 8), weight)
    assert not adapter.transposed_wins(torch.randn(2, 8), weight) and len(times) == 2  # remembered, not timed again
    assert adapter.transposed_wins(torch.randn(3, 8), weight) and not times  # another shape: timed anew


def test_a_head_kernel_setting_that_is_not_one_of_three_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(adapter.HEAD_KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="EESD_HEAD_KERNEL must be one of auto, linear, transposed, got 'fast'"):
        adapter.head_linear(torch.randn(1, 2, 8), torch.randn(adapter.LARGE_HEAD_ROWS, 8))


@pytest.mark.parametrize("kernel", ["linear", "transposed"])
def test_eesd_equals_ar_with_either_head_order(monkeypatch, kernel) -> None:
    """float64, a head of LARGE_HEAD_ROWS ids (the verify passes take head_linear's few-rows path)."""
    monkeypatch.setenv(adapter.HEAD_KERNEL_ENV, kernel)
    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=adapter.LARGE_HEAD_ROWS + 5, seed=4)), 2, 0.0)
    prompt = [[7, 300, 4000, 12]]
    ar = executor.generate(model, prompt, method="ar", max_new_tokens=16).sequences
    eesd = executor.generate(model, prompt, method="eesd", exit_layer=2, draft_len=4, max_new_tokens=16)
    assert eesd.sequences.tolist() == ar.tolist() and eesd.stats.acceptance_rate > 0.5
