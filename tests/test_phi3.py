"""Phi-3 through the adapter: the fused `qkv_proj` split into query, key and value, and partial rotary (only the first
part of each head rotates). Tiny random models in float64 equal HF token for token."""

from __future__ import annotations

import pytest
from tiny_models import TinySpec, hf_greedy, scale_late_layers, tiny_model

import executor
from executor.adapter import ModelAdapter

PROMPT = [5, 17, 2, 40, 33, 8, 9, 51]


@pytest.mark.parametrize("epsilon", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_tiny_phi3_with_partial_rotary_equals_hf_float64(epsilon: float, num_kv_heads: int) -> None:
    spec = TinySpec(arch="phi3", num_layers=4, num_heads=4, num_kv_heads=num_kv_heads, head_dim=16, vocab=60, seed=2)
    model = scale_late_layers(tiny_model(spec), 2, epsilon)
    assert model.model.rotary_emb.inv_freq.numel() == spec.head_dim // 4  # half of each head rotates
    assert hasattr(ModelAdapter(model).layers[0].self_attn, "qkv_proj")
    reference, _ = hf_greedy(model, PROMPT, 24)
    for kwargs in ({"method": "ar"}, {"method": "eesd", "exit_layer": 2, "draft_len": 3}, {"method": "ppsd"}):
        out = executor.generate(model, PROMPT, max_new_tokens=24, **kwargs)
        assert out.sequences.tolist() == reference.tolist(), kwargs
