"""Fused projections: one matrix for a layer's q, k and v projections and one for its MLP's gate and up projections.

At batch 1 a decode step is a chain of matrix-vector products, each reading its weight once; one product over the
stacked rows of q, k and v (and one over gate and up) reads the same bytes in fewer, larger kernels: 4 products per
layer instead of 7 for the Llama family. Nothing is copied for good: the stacked matrix is allocated once and each
original `nn.Linear` weight becomes a view of its rows (`weight.data = fused[rows]`), so the model keeps its size, HF's
own forward reads the same values, and loading a state dict into the model writes through the views into the fused
matrix. The fused matrix hangs on the module as a non-persistent buffer (`eesd_qkv_weight`, `eesd_gate_up_weight`),
never saved; the kernels in `executor.adapter` use it when it is there.

`fuse_projections` is idempotent and checks the views on every call: a weight moved, cast or reassigned since
(`model.to(...)`, a new `nn.Parameter`) no longer lies in the fused matrix, so that module is fused again from its
current weights. Only plain `nn.Linear` projections of one device and dtype, all with or all without a bias, and
MLPs that compute `down(act(gate(x)) * up(x))` (the supported families' MLP classes) are fused.
"""

from __future__ import annotations

import torch
from torch import nn

QKV = ("eesd_qkv", ("q_proj", "k_proj", "v_proj"))
GATE_UP = ("eesd_gate_up", ("gate_proj", "up_proj"))
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma3MLP")  # down(act(gate(x)) * up(x))


def fuse_projections(layers: list[nn.Module]) -> int:
    """Fuse every layer's q/k/v and gate/up projections that can be (see the module docstring); the number of
    modules that use a fused matrix afterwards."""
    fused = 0
    with torch.inference_mode(False), torch.no_grad():  # plain tensors: a trainer may still run the model later
        for layer in layers:
            fused += _fuse(layer.self_attn, *QKV)
            if type(layer.mlp).__name__ in GATED_MLPS:
                fused += _fuse(layer.mlp, *GATE_UP)
    return fused


def unfuse_projections(layers: list[nn.Module]) -> None:
    """Drop the fused matrices (the kernels go back to one product per projection); the weights stay views."""
    for layer in layers:
        _drop(layer.self_attn, QKV[0])
        _drop(layer.mlp, GATE_UP[0])


def _drop(module: nn.Module, prefix: str) -> None:
    for suffix in ("_weight", "_bias"):
        module._buffers.pop(prefix + suffix, None)


def fused_weights(module: nn.Module, prefix: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The module's fused matrix and bias, or None when it has none."""
    weight = module._buffers.get(prefix + "_weight")
    return None if weight is None else (weight, module._buffers.get(prefix + "_bias"))


def _fuse(module: nn.Module, prefix: str, names: tuple[str, ...]) -> bool:
    linears = [getattr(module, name, None) for name in names]
    if not all(type(linear) is nn.Linear for linear in linears) or not _compatible(linears):
        _drop(module, prefix)  # a matrix fused before the projections were replaced is stale
        return False
    if _intact(module, prefix, linears):
        return True
    weight = torch.cat([linear.weight.detach() for linear in linears])
    biased = linears[0].bias is not None
    bias = torch.cat([linear.bias.detach() for linear in linears]) if biased else None
    start = 0
    for linear in linears:
        rows = slice(start, start + linear.out_features)
        linear.weight.data = weight[rows]
        if biased:
            linear.bias.data = bias[rows]
        start = rows.stop
    module.register_buffer(prefix + "_weight", weight, persistent=False)
    module.register_buffer(prefix + "_bias", bias, persistent=False)
    return True


def _compatible(linears: list[nn.Linear]) -> bool:
    first = linears[0].weight
    return all(
        not linear.weight.is_meta
        and linear.weight.device == first.device
        and linear.weight.dtype == first.dtype
        and linear.in_features == linears[0].in_features
        and (linear.bias is None) == (linears[0].bias is None)
        for linear in linears
    )


def _intact(module: nn.Module, prefix: str, linears: list[nn.Linear]) -> bool:
    """Every weight (and bias) is still the view of its rows of the module's fused matrix."""
    fused = fused_weights(module, prefix)
    if fused is None:
        return False
    weight, bias = fused
    start = 0
    for linear in linears:
        if not _is_rows(linear.weight, weight, start) or (bias is not None and not _is_rows(linear.bias, bias, start)):
            return False
        start += linear.out_features
    return start == weight.shape[0]


def _is_rows(part: torch.Tensor, whole: torch.Tensor, start: int) -> bool:
    offset = start * whole.stride(0) * whole.element_size()
    return (
        part.device == whole.device
        and part.dtype == whole.dtype
        and part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
        and part.data_ptr() == whole.data_ptr() + offset
    )
