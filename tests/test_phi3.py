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


def _longrope_phi3(original: int = 16):
    """A tiny Phi-3 with LongRoPE as the 128k Phi-3 / Phi-3.5 / Phi-4-mini checkpoints ship it: short factors up to
    `original` positions, long ones past it (max_position_embeddings 256)."""
    import torch
    import transformers

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
            "original_max_position_embeddings": original}  # fmt: skip
    config = transformers.Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=60, max_position_embeddings=256, original_max_position_embeddings=original, rope_parameters=rope,
        initializer_range=0.1, pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(3)
    return transformers.Phi3ForCausalLM(config).double().eval()


def test_longrope_decodes_exactly_up_to_its_original_context_and_is_refused_past_it() -> None:
    """Past its original context LongRoPE changes its rotary factors and HF re-runs the whole sequence (its cached
    keys were rotated with the short ones), which a decoder reusing its KV cache cannot match: up to that context
    every method equals HF, past it the request is refused with why, where it used to decode other tokens."""
    model = _longrope_phi3(original=16)
    reference, _ = hf_greedy(model, PROMPT, 8)  # 8 + 8 = 16 positions: the original context, all short factors
    for kwargs in ({"method": "ar"}, {"method": "eesd", "exit_layer": 1, "draft_len": 3}, {"method": "ppsd"}):
        out = executor.generate(model, PROMPT, max_new_tokens=8, **kwargs)
        assert out.sequences.tolist() == reference.tolist(), kwargs
        with pytest.raises(ValueError, match=r"= 17 exceeds the model's context of 16 positions \(LongRoPE: past "
                           r"original_max_position_embeddings 16 its rotary factors change"):  # fmt: skip
            executor.generate(model, PROMPT, max_new_tokens=9, **kwargs)
    assert ModelAdapter(_longrope_phi3(original=256)).max_positions == 256  # no switch inside the context
