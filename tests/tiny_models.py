"""Tiny random Llama-family models for fast tests, and hypothesis strategies that draw them.

The epsilon trick (docs/design.md): scaling the output projections (o_proj, down_proj) of layers >= E by epsilon makes
those layers nearly the identity on the residual stream, so the shared exit head at E agrees with the full model
often (epsilon small) or always (epsilon = 0). Random models alone rarely accept a draft.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from executor.adapter import LARGE_HEAD_ROWS

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
}


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 8
    vocab: int = 97
    tied: bool = False
    sliding_window: int | None = None
    seed: int = 0


def tiny_model(spec: TinySpec, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    config_cls, model_cls = ARCHITECTURES[spec.arch]
    hidden = spec.num_heads * spec.head_dim
    config = config_cls(
        vocab_size=spec.vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=spec.tied,
        sliding_window=spec.sliding_window,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        # Phi-3: fused qkv_proj; here rotating half of each head (Phi-4-mini style partial rotary)
        **({"partial_rotary_factor": 0.5} if spec.arch == "phi3" else {}),
    )
    if spec.arch == "gemma3":  # sliding and global layers alternate (their own rotary bases), logits soft-capped
        config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec.num_layers)]
        config.sliding_window = spec.sliding_window or 4
        config.final_logit_softcapping = 30.0
        config.query_pre_attn_scalar = 2 * spec.head_dim
    torch.manual_seed(spec.seed)
    model = model_cls(config).to(dtype).eval()
    if spec.arch == "gemma3":  # its norms scale by (1 + weight), zero at init: give them a random scale as well
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.normal_(0.0, 0.3)
    model.generation_config.pad_token_id = 0  # silences HF's "setting pad_token_id" warning
    return model


@torch.no_grad()
def scale_late_layers(model: torch.nn.Module, first_layer: int, epsilon: float) -> torch.nn.Module:
    """Scale the sublayer outputs of layers >= first_layer by epsilon (0: those layers become the identity): o_proj
    and down_proj, or for Gemma, whose norms after them would undo that, the scale (1 + weight) of those norms."""
    for layer in model.model.layers[first_layer:]:
        if hasattr(layer, "post_feedforward_layernorm"):
            for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                norm.weight.copy_((1 + norm.weight) * epsilon - 1)
        else:
            layer.self_attn.o_proj.weight.mul_(epsilon)
            layer.mlp.down_proj.weight.mul_(epsilon)
    return model


@st.composite
def tiny_specs(draw, archs=tuple(ARCHITECTURES), min_layers: int = 1, max_layers: int = 6) -> TinySpec:
    num_kv_heads = draw(st.sampled_from([1, 2]))
    arch = draw(st.sampled_from(archs))
    window = draw(st.sampled_from([None, 4, 16])) if arch in ("mistral", "gemma3") else None
    return TinySpec(
        arch=arch,
        num_layers=draw(st.integers(min_layers, max_layers)),
        num_kv_heads=num_kv_heads,
        num_heads=num_kv_heads * draw(st.sampled_from([1, 2, 3])),
        head_dim=draw(st.sampled_from([4, 8, 16])),
        # a vocabulary as large as a real LM head's sometimes, so that verify passes take the CPU LM-head kernel
        # order of `executor.adapter.head_linear` (2..8 rows of a head with LARGE_HEAD_ROWS or more ids)
        vocab=draw(st.integers(8, 160) | st.integers(LARGE_HEAD_ROWS, LARGE_HEAD_ROWS + 32)),
        tied=draw(st.booleans()),
        sliding_window=window,
        seed=draw(st.integers(0, 2**16)),
    )


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, eos_token_id=None):
    """HF `generate`, greedy, with the per-step logits (for the tie check)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, out.logits


def assert_same_or_tie(reference: torch.Tensor, logits: tuple[torch.Tensor, ...], other: torch.Tensor, tol: float):
    """Equal token for token, or the first difference falls where the reference's top-2 logits are within `tol`.

    Float32 is not associative: a (k+1)-token verify pass and a 1-token decode step use different GEMM shapes, so
    near-ties can flip (docs/design.md). Anything else is a real bug.
    """
    prompt_len = reference.shape[1] - len(logits)
    ref, out = reference[0].tolist(), other[0].tolist()
    for index, (a, b) in enumerate(zip(ref, out, strict=False)):
        if a != b:
            top2 = logits[index - prompt_len][0].double().topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < tol, f"token {index} differs ({a} vs {b}) with top-2 logit gap {gap:.3g} >= {tol}"
            return
    assert len(ref) == len(out), f"lengths differ: {len(ref)} vs {len(out)}"
