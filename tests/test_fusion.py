"""Fused q/k/v and gate/up projections (`executor.fusion`): same tokens as HF and as unfused decoding (float64), no
extra memory, weights that stay the model's own (state dicts load through them, saving ignores the fused matrix), and
a fused matrix that follows its weights when they move or are replaced."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import ARCHITECTURES, TinySpec, hf_greedy, scale_late_layers, tiny_model, tiny_specs
from torch import nn

import executor
from executor import passes
from executor.adapter import ModelAdapter
from executor.fusion import fuse_projections, fused_weights, unfuse_projections

PROMPT = [3, 11, 7, 29, 5]


def _storage_bytes(model: nn.Module) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fused_modules_per_architecture(arch: str) -> None:
    """Every family with separate projections is fused (q/k/v; gate/up where its MLP is the gated one); Phi-3's
    own fused projections are left alone."""
    model = tiny_model(TinySpec(arch=arch, num_layers=2))
    expected = {"phi3": 0}.get(arch, 4)
    assert fuse_projections(list(model.model.layers)) == expected
    layer = model.model.layers[0]
    if expected:
        weight, bias = fused_weights(layer.self_attn, "eesd_qkv")
        assert layer.self_attn.q_proj.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
        assert (bias is not None) == (layer.self_attn.q_proj.bias is not None)


@settings(max_examples=20, deadline=None)
@given(spec=tiny_specs(), method=st.sampled_from(["ar", "eesd", "ppsd"]), new_tokens=st.integers(1, 14))
def test_fused_decoding_equals_hf(spec: TinySpec, method: str, new_tokens: int) -> None:
    model = scale_late_layers(tiny_model(spec), 1, 0.3)
    prompt = [t % spec.vocab for t in PROMPT]
    reference, _ = hf_greedy(model, prompt, new_tokens)
    bytes_before = _storage_bytes(model)
    fuse_projections(list(model.model.layers))
    assert _storage_bytes(model) == bytes_before  # the weights are views of the fused matrices: nothing copied
    kwargs = {"exit_layer": 1} if method != "ar" else {}
    if method == "ppsd":
        kwargs = {"stages": 2} if spec.num_layers >= 2 else {}
        method = method if kwargs else "ar"
    out = executor.generate(ModelAdapter(model), [prompt], method=method, max_new_tokens=new_tokens, **kwargs)
    assert out.sequences[0].tolist() == reference[0].tolist()
    hf, _ = hf_greedy(model, prompt, new_tokens)  # HF's own forward on the views
    assert torch.equal(hf, reference)


def test_state_dicts_load_through_the_views_and_saving_ignores_the_fused_matrix(tmp_path: Path) -> None:
    model = tiny_model(TinySpec(arch="qwen2", num_layers=2, seed=1))  # q/k/v with biases
    other = tiny_model(TinySpec(arch="qwen2", num_layers=2, seed=2))
    fuse_projections(list(model.model.layers))
    assert not any("eesd_" in name for name in model.state_dict())
    model.load_state_dict(other.state_dict())  # copies into the views, so into the fused matrices
    weight, bias = fused_weights(model.model.layers[1].self_attn, "eesd_qkv")
    attn = other.model.layers[1].self_attn
    assert torch.equal(weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    out = executor.generate(ModelAdapter(model), [PROMPT], max_new_tokens=8)
    assert torch.equal(out.sequences, hf_greedy(other, PROMPT, 8)[0])
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert torch.equal(hf_greedy(reloaded, PROMPT, 8)[0], out.sequences)


def test_a_replaced_or_cast_weight_is_fused_again() -> None:
    model = tiny_model(TinySpec(num_layers=2, seed=4))
    layers = list(model.model.layers)
    fuse_projections(layers)
    attn = layers[0].self_attn
    attn.k_proj.weight = nn.Parameter(torch.randn_like(attn.k_proj.weight))  # no longer a view: stale matrix
    fuse_projections(layers)
    weight, _ = fused_weights(attn, "eesd_qkv")
    assert torch.equal(weight[attn.q_proj.out_features :][: attn.k_proj.out_features], attn.k_proj.weight)
    model.to(torch.float32)
    fuse_projections(layers)
    assert fused_weights(attn, "eesd_qkv")[0].dtype == torch.float32
    out = executor.generate(ModelAdapter(model), [PROMPT], max_new_tokens=6)
    assert torch.equal(out.sequences, hf_greedy(model, PROMPT, 6)[0])


def test_unfused_kernels_and_unsupported_projections() -> None:
    model = tiny_model(TinySpec(num_layers=2, seed=5))
    layers = list(model.model.layers)
    fuse_projections(layers)
    unfuse_projections(layers)
    assert fused_weights(layers[0].self_attn, "eesd_qkv") is None
    assert fused_weights(layers[0].mlp, "eesd_gate_up") is None

    class Wrapped(nn.Linear):  # e.g. a quantised or adapter-wrapped projection: not ours to fuse
        pass

    attn = layers[1].self_attn
    wrapped = Wrapped(attn.v_proj.in_features, attn.v_proj.out_features, bias=False, dtype=torch.float64)
    wrapped.weight.data.copy_(attn.v_proj.weight)
    attn.v_proj = wrapped
    assert fuse_projections(layers) == 3  # layer 0's two, layer 1's MLP
    assert fused_weights(attn, "eesd_qkv") is None


def test_captured_passes_fuse_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cached_passes` (every captured setup) fuses the projections before building, so graphs read fused weights;
    with `FUSE_CAPTURED` off it unfuses them and builds anew (the flag is part of what a cached pass depends on)."""
    model = tiny_model(TinySpec(num_layers=2, seed=6))
    built = []

    def build() -> int:
        built.append(fused_weights(model.model.layers[0].mlp, "eesd_gate_up") is not None)
        return len(built)

    assert passes.cached_passes(model, ("key",), build) == 1 and built == [True]
    assert passes.cached_passes(model, ("key",), build) == 1  # kept
    monkeypatch.setattr(passes, "FUSE_CAPTURED", False)
    assert passes.cached_passes(model, ("key",), build) == 2 and built == [True, False]
