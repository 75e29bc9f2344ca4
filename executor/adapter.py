"""A thin view of a Hugging Face decoder-only causal LM: the pieces the decoders call, on the model's own weights.

Supported: the Llama family (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`; SmolLM2
is a Llama) and text-only Gemma 3 (`Gemma3ForCausalLM`). They share one layer layout (pre-norm attention with rotary
embeddings and grouped-query attention, then a pre-norm gated MLP), differing only in attention bias (Qwen2),
per-head q/k norms (Qwen3, Gemma 3) and sliding windows (Mistral, some Qwen2 layers). Gemma 3 adds, all read from the
model itself: a norm after attention and one after the MLP (`post_attention_layernorm` then `pre_feedforward_layernorm`
/ `post_feedforward_layernorm`), a rotary embedding per layer type (local sliding layers and global layers have
their own base), its attention scale (`query_pre_attn_scalar`), a scaled embedding (inside its module) and an
optional final logit soft-cap. Phi-3 fuses the q, k, v projections (`qkv_proj`) and may rotate only the first part
of each head (`partial_rotary_factor`: the rotary table is narrower than the head). Another architecture with the
same layout can be added to `SUPPORTED_ARCHITECTURES`.

The adapter never copies a weight: it calls the model's own modules (`embed_tokens`, each layer's projections,
norms and MLP, `norm`, `lm_head`) and only replaces the attention kernel, so that keys and values go into our
preallocated `KVCache` by absolute position. Captured passes fuse the q/k/v and gate/up projections first
(`executor.fusion`): the weights become views of one matrix each, still no copy.

Shapes: B batch, q tokens in the pass, S cache slots, H heads, Hkv key/value heads, D head dim, d hidden size.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from executor.fusion import GATE_UP, QKV, fused_weights
from executor.kv_cache import KVCache, store

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
)  # fmt: skip


@dataclass(frozen=True)
class Step:
    """Where the q tokens of one forward pass sit: absolute positions, on the device and on the host.

    `positions` is [B, q] on the model's device; `starts` holds each row's first position on the host, so that cache
    bookkeeping never reads the device. A *static* step (`starts=None`) is one whose positions live only in a device
    buffer that is refilled between passes (a pass captured in a CUDA graph): its attention spans the first `span`
    cache slots (masked by position; a span bucket the host chose to hold every position the pass writes, see
    `executor.passes.span_bucket`), it reads and writes no slot beyond, and the caller keeps the cache's books
    (`KVCache.claim`).
    """

    positions: torch.Tensor
    starts: tuple[int, ...] | None
    span: int | None = None

    @property
    def q(self) -> int:
        return self.positions.shape[1]

    @property
    def kv_len(self) -> int:
        """Cache slots the pass can see: the static span, else up to the furthest position it writes."""
        if self.span is not None:
            return self.span
        return max(self.starts) + self.q

    @classmethod
    def at(cls, start: int, q: int, device: torch.device) -> Step:
        """Batch-1 step over positions start .. start + q - 1."""
        positions = torch.arange(start, start + q, device=device).unsqueeze(0)
        return cls(positions=positions, starts=(start,))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [.., D] by cos/sin broadcast to [.., R]: the first R dims rotate (R < D: partial)."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    head, tail = x[..., :rotary], x[..., rotary:]
    return torch.cat([head * cos + _rotate_half(head) * sin, tail], dim=-1)


def _rotate_pair(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query [B, q, H, D] and key [B, q, Hkv, D] rotated by cos/sin [B, q, 1, R] as one tensor: the same values as
    rotating each (elementwise ops), in half the kernels (a captured pass replays every one)."""
    joint = _rotate(torch.cat([query, key], dim=2), cos, sin)
    return joint.split([query.shape[2], key.shape[2]], dim=2)


def _layer_windows(config, num_layers: int) -> list[int | None]:
    """Sliding-window size per layer (None: full attention), read as transformers reads it."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    return [window] * num_layers


def _rope_settings(config) -> list[dict]:
    """Every RoPE setting the config holds: `rope_parameters` (one, or one per layer type) and `rope_scaling`."""
    found = []
    for value in (getattr(config, "rope_parameters", None), getattr(config, "rope_scaling", None)):
        if isinstance(value, dict):
            nested = [v for v in value.values() if isinstance(v, dict)]
            found += nested if nested and "rope_type" not in value else [value]
    return found


def context_of(config) -> tuple[int, str]:
    """(the positions the decoders run, and why that is less than `max_position_embeddings` where it is). LongRoPE
    changes its rotary factors once a sequence passes its original context: HF re-runs the whole sequence then
    (its cached keys were rotated with the short factors), which a decoder reusing its cache cannot match, so the
    decoders stop at that original context."""
    most = config.max_position_embeddings
    for rope in _rope_settings(config):
        original = rope.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", 0
        )
        if rope.get("rope_type", rope.get("type")) == "longrope" and original and original < most:
            return original, (
                f" (LongRoPE: past original_max_position_embeddings {original} its rotary factors change and HF "
                f"re-runs the sequence, which a decoder reusing its KV cache cannot match; max_position_embeddings is "
                f"{most})"
            )
    return most, ""


def check_architecture(name: str) -> None:
    """A ValueError for a model class the adapter does not run, naming the ones it does and where adding one is told."""
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported model class {name}: expected one of {', '.join(SUPPORTED_ARCHITECTURES)} (docs/executor.md, "
            "Supported models: what another architecture needs)"
        )


def _check_config(name: str, config) -> None:
    """Refuse what the adapter would compute differently from the model (rather than decode something else)."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"unsupported {name}: attention logit soft-capping (attn_logit_softcapping) is not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"unsupported {name}: bidirectional attention cannot decode autoregressively")
    for field, applies, what in UNSUPPORTED_SETTINGS:  # reached by a class added to SUPPORTED_ARCHITECTURES
        value = getattr(config, field, None)
        if value is not None and applies(value):
            shown = f"{field}" if isinstance(value, (list, tuple)) else f"{field} {value!r}"
            raise ValueError(f"unsupported {name}: {what} ({shown}), which the adapter does not compute")


UNSUPPORTED_SETTINGS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (  # (config field, set when, what it does)
    ("embedding_multiplier", lambda v: v != 1, "scaled embeddings"),
    ("residual_multiplier", lambda v: v != 1, "scaled residual connections"),
    ("logits_scaling", lambda v: v != 1, "scaled logits"),
    ("clip_qkv", lambda v: True, "clipped query, key and value projections"),
    ("use_parallel_residual", bool, "parallel attention and MLP residuals"),
    ("no_rope_layers", lambda v: not all(v), "layers without rotary embeddings"),
)


# A large LM head over a few rows (a verify pass) can run much faster, or much slower, on torch's CPU kernels as
# W @ x^T than as x @ W^T (`F.linear`), depending on the machine: W @ x^T was 2-4x faster on a 2-core AMD EPYC, and
# 3x slower on a 2-core Intel Xeon with AMX (15 against 5 ms for 2 rows of SmolLM2's 49k x 576 head). So each shape
# times both once and keeps the faster (`EESD_HEAD_KERNEL`: auto, the default; linear; transposed). At 1 row HF's
# F.linear is kept; a decoder layer's small matrices always use F.linear.
FEW_ROWS = range(2, 17)
LARGE_HEAD_ROWS = 4096
HEAD_KERNEL_ENV = "EESD_HEAD_KERNEL"
HEAD_KERNELS = ("auto", "linear", "transposed")
_TRANSPOSED_WINS: dict[tuple, bool] = {}  # (rows, weight shape, dtype, threads) -> W @ x^T timed faster


def head_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for an output head, with the faster CPU kernel order for a few rows."""
    rows = x.shape[:-1].numel()
    few = rows in FEW_ROWS and weight.shape[0] >= LARGE_HEAD_ROWS and not x.requires_grad
    # compiled (capture="freeze"): Inductor picks the kernel; its CPU GEMM template packs F.linear's weight operand
    if x.device.type != "cpu" or not few or torch.compiler.is_compiling():
        return torch.nn.functional.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if not transposed_wins(flat, weight):
        return torch.nn.functional.linear(x, weight, bias)
    out = torch.mm(weight, flat.T).T.contiguous().view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def transposed_wins(flat: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether W @ x^T is the order to use for rows `flat` [n, d]: as `EESD_HEAD_KERNEL` says, or, with auto, the
    faster of the two on this machine, timed once per (rows, weight shape, dtype, torch threads)."""
    kernel = os.environ.get(HEAD_KERNEL_ENV, "auto")
    if kernel not in HEAD_KERNELS:
        raise ValueError(f"{HEAD_KERNEL_ENV} must be one of {', '.join(HEAD_KERNELS)}, got {kernel!r}")
    if kernel != "auto":
        return kernel == "transposed"
    key = (flat.shape[0], tuple(weight.shape), weight.dtype, torch.get_num_threads())
    if key not in _TRANSPOSED_WINS:
        plain = _fastest_s(lambda: torch.nn.functional.linear(flat, weight))
        _TRANSPOSED_WINS[key] = _fastest_s(lambda: torch.mm(weight, flat.T)) < plain
    return _TRANSPOSED_WINS[key]


def _fastest_s(run: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls of `run`, after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


class ModelAdapter:
    """The decoders' view of a supported HF causal LM (see module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        name = type(model).__name__
        check_architecture(name)
        config = model.config
        _check_config(name, config)
        self.model = model
        self.config = config
        base = model.model
        self.embed_tokens: nn.Module = base.embed_tokens
        self.layers: list[nn.Module] = list(base.layers)
        self.norm: nn.Module = base.norm
        self.lm_head: nn.Module = model.lm_head
        self.rotary_emb: nn.Module = base.rotary_emb
        self.num_layers = len(self.layers)
        self.num_kv_heads: int = config.num_key_value_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.max_positions, self.context_note = context_of(config)
        self.windows = _layer_windows(config, self.num_layers)
        # Gemma 3: one rotary table per layer type; the Llama family's rotary embedding takes no type.
        self.typed_rotary = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        layer_types = getattr(config, "layer_types", None) if self.typed_rotary else None
        self.rotary_kinds: list[str | None] = list(layer_types) if layer_types else [None] * self.num_layers
        self.logit_softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self.layer_run: Callable[..., torch.Tensor] | None = None  # a compiled `layer_forward` for static steps

    def compiled(self, fallback: bool = False) -> ModelAdapter:
        """This adapter with every static step's layers run by one compiled `layer_forward` (`compiled_layer`)."""
        view = copy.copy(self)
        view.layer_run = compiled_layer(fallback)
        return view

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, batch: int, max_len: int, extra_layers: int = 0) -> KVCache:
        """A cache for every decoder layer (+ `extra_layers`, e.g. a trained exit head's own layer)."""
        return KVCache(
            num_layers=self.num_layers + extra_layers,
            batch=batch,
            num_kv_heads=self.num_kv_heads,
            max_len=max_len,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, q] token ids -> [B, q, d] hidden states."""
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own output head: final norm + LM head. [B, q, d] -> [B, q, V]."""
        return self.project(self.norm(hidden))

    def project(self, normed: torch.Tensor) -> torch.Tensor:
        """LM head over normed states, soft-capped as the model caps its logits."""
        head = self.lm_head
        if not isinstance(head, nn.Linear):
            return self.softcap(head(normed))
        return self.softcap(head_linear(normed, head.weight, head.bias))

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's final logit soft-cap (Gemma's final_logit_softcapping), or the logits as they are."""
        if self.logit_softcap is None:
            return logits
        return torch.tanh(logits / self.logit_softcap) * self.logit_softcap

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor, kind: str | None) -> tuple[torch.Tensor, ...]:
        """(cos, sin) [B, q, D] at `positions` for layers of rotary `kind` (see `rotary_kinds`)."""
        if self.typed_rotary:
            return self.rotary_emb(hidden, positions, kind)
        return self.rotary_emb(hidden, positions)

    def forward_layers(self, hidden: torch.Tensor, step: Step, cache: KVCache, start: int, stop: int) -> torch.Tensor:
        """Run decoder layers [start, stop) over hidden [B, q, d] at `step`, writing their KV into `cache`."""
        rotaries: dict[str | None, tuple[torch.Tensor, ...]] = {}
        masks: dict[int | None, torch.Tensor] = {}
        run = self.layer_run if step.span is not None else None  # a static step's shapes never change
        if run is not None:  # one layout for every caller (dynamo guards strides, even of size-1 dims), no recompile
            hidden = hidden.clone(memory_format=torch.contiguous_format)
            step = dataclasses.replace(step, positions=step.positions.clone(memory_format=torch.contiguous_format))
        for index in range(start, stop):
            window, kind = self.windows[index], self.rotary_kinds[index]
            if window not in masks:
                masks[window] = attention_mask(step, window, hidden.dtype)
            if kind not in rotaries:
                rotaries[kind] = self.rotary(hidden, step.positions, kind)
            hidden = decoder_layer(self.layers[index], index, hidden, step, cache, rotaries[kind], masks[window], run)
        return hidden


def attention_mask(step: Step, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, q, kv_len] additive mask in `dtype` (0 where visible, -inf elsewhere): a query at position p sees the
    cache slots 0..p (the last `window` of them). SDPA turns a bool mask into exactly this, in every layer; made here
    once per pass, it saves a captured pass those kernels in each layer."""
    slots = torch.arange(step.kv_len, device=step.positions.device)
    query = step.positions.unsqueeze(-1)  # [B, q, 1]
    visible = slots <= query
    if window is not None:
        visible &= slots > query - window
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(visible.logical_not(), float("-inf")).unsqueeze(1)


@functools.cache
def compiled_layer(fallback: bool = False) -> Callable[..., torch.Tensor]:
    """`layer_forward` under `torch.compile` (Inductor, no CUDA graphs of its own: the pass that calls it is captured
    whole). Regional compilation: dynamo inlines the layer module, so its weights are inputs of the compiled graph and
    one compilation serves every layer of a model with the same shapes; another token count q (a verify pass) or
    another model compiles once more. Compiling one layer is far cheaper than compiling a whole pass.

    With `fallback` (capture="auto"), a compilation that fails warns once and the layers run uncompiled from then on
    (a real error in the layer raises again, from the uncompiled run)."""
    return compile_static(layer_forward, fallback, "the decoder layer")


def compile_static(fn: Callable[..., Any], fallback: bool, what: str) -> Callable[..., Any]:
    """`fn` under `torch.compile` (Inductor, whole graph, static shapes); with `fallback` (capture="auto"), run
    uncompiled from its first failed compilation on (`uncompiled_on_failure`)."""
    allow_recompiles()
    compiled = torch.compile(fn, dynamic=False, fullgraph=True)
    return uncompiled_on_failure(compiled, fn, what) if fallback else compiled


def with_layer_run(head: Any, run: Callable[..., torch.Tensor] | None) -> Any:
    """`head` with its own decoder layer (a trained head's) run by `run` (a compiled `layer_forward`, as the
    model's layers under capture="compile-layers"): a shallow copy, so the caller's head object is unchanged;
    a head without a layer of its own, or no `run`, is returned as it is."""
    if run is None or not getattr(head, "extra_layers", 0) or not hasattr(head, "layer_run"):
        return head
    view = copy.copy(head)
    view.layer_run = run
    return view


def uncompiled_on_failure(compiled: Callable[..., Any], eager: Callable[..., Any], what: str) -> Callable[..., Any]:
    """`compiled`, or `eager` from its first failure on (warned once): capture="auto"'s fallback. A real error in
    the function raises again, from the eager run."""
    current = [compiled]

    def run(*args: Any) -> Any:
        try:
            return current[0](*args)
        except Exception as err:
            if current[0] is eager:
                raise
            warnings.warn(f"torch.compile of {what} failed, it runs uncompiled: {err}", RuntimeWarning, stacklevel=2)
            current[0] = eager
            return eager(*args)

    return run


def inductor_available() -> bool:
    """Whether torch.compile can make GPU kernels here (Inductor needs Triton): what capture="auto" asks on a GPU."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return bool(has_triton())


def allow_recompiles(limit: int = 256) -> None:
    """Dynamo compiles a function once per guard set (a compiled pass per instance, a compiled layer per token count,
    span bucket and model: up to (max draft + 1) x buckets per model); its default limit (8 per code object) would
    silently leave the rest uncompiled."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


class Slots(NamedTuple):
    """Where a layer's pass reads and writes its KV: the tokens' `positions` [B, q], the cache's `rows` [B, 1], and
    the layer's `keys`/`values` [B, Hkv, S, D] (the S cache slots the pass sees)."""

    positions: torch.Tensor
    rows: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor


def decoder_layer(
    layer: nn.Module,
    index: int,
    hidden: torch.Tensor,
    step: Step,
    cache: KVCache,
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    run: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """One pre-norm decoder layer (model layer `index`) at `step`: keeps the cache's books, then runs `layer_forward`
    (or `run`, a compiled one) over the cache slots the step sees."""
    if step.starts is not None:
        cache.claim((index,), step.starts, step.q)
    slots = Slots(step.positions, cache.rows, *cache.view(index, step.kv_len))
    return (run or layer_forward)(layer, hidden, slots, rotary, mask)


def layer_forward(
    layer: nn.Module,
    hidden: torch.Tensor,
    slots: Slots | None,
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """One pre-norm decoder layer, as the HF layer computes it, with our cache and attention kernel: hidden [B, q, d]
    at `slots.positions`; its keys and values are stored there and attended over with `mask` [B, 1, q, S], rotated
    by `rotary` (cos, sin [B, q, D]). Tensors and the layer only, no host value: one `torch.compile` of it serves
    every layer of a model (see `compiled_layer`). Without `slots` (and `mask`), hidden is whole sequences at
    positions 0..q-1 attending causally among themselves, no cache: what training a head's layer runs."""
    hidden = attention_forward(layer, hidden, slots, rotary, mask)
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: the sublayers' outputs are normed too
        return hidden + layer.post_feedforward_layernorm(gated_mlp(layer.mlp, layer.pre_feedforward_layernorm(hidden)))
    return hidden + gated_mlp(layer.mlp, layer.post_attention_layernorm(hidden))


def attention_forward(
    layer: nn.Module,
    hidden: torch.Tensor,
    slots: Slots | None,
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """A pre-norm decoder layer's attention sublayer with its residual (`layer_forward` without the MLP): what an
    attention-only exit head runs."""
    attended = self_attention(layer.self_attn, layer.input_layernorm(hidden), slots, rotary, mask)
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: the sublayer's output is normed too
        return hidden + layer.post_attention_layernorm(attended)
    return hidden + attended


def gated_mlp(mlp: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The layer's MLP: the module itself, or with gate and up fused (`executor.fusion`) one product for both."""
    fused = fused_weights(mlp, GATE_UP[0])
    if fused is None:
        return mlp(hidden)
    gate, up = F.linear(hidden, *fused).split([mlp.gate_proj.out_features, mlp.up_proj.out_features], dim=-1)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def self_attention(
    attn: nn.Module,
    hidden: torch.Tensor,
    slots: Slots | None,
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention over the cache `slots` (this pass's keys and values stored first) with `mask`; without `slots`,
    causal attention among the pass's own tokens (whole sequences from position 0: no cache, no mask tensor, the
    fused causal kernels, forward and backward)."""
    batch, q, _ = hidden.shape
    head_dim = attn.head_dim
    query, key, value = _projections(attn, hidden)
    query = query.view(batch, q, -1, head_dim)  # [B, q, H, D]
    key = key.view(batch, q, -1, head_dim)  # [B, q, Hkv, D]
    value = value.view(batch, q, -1, head_dim).transpose(1, 2)  # [B, Hkv, q, D]
    if hasattr(attn, "q_norm"):  # Qwen3, Gemma 3: RMS norm per head before the rotation
        query, key = attn.q_norm(query), attn.k_norm(key)
    cos, sin = (t.unsqueeze(2) for t in rotary)  # [B, q, 1, D]
    query, key = _rotate_pair(query, key, cos, sin)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # [B, H, q, D], [B, Hkv, q, D]
    if slots is None:
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=attn.scaling, enable_gqa=key.shape[1] != query.shape[1]
        )
        return attn.o_proj(out.transpose(1, 2).reshape(batch, q, -1))
    keys, values = slots.keys, slots.values
    if keys.dtype != query.dtype:  # a lower-precision draft's layer over the model's cache (`draft_precision`)
        key, value = key.to(keys.dtype), value.to(values.dtype)
    store(keys, values, slots.rows, slots.positions, key, value)
    if keys.dtype != query.dtype:
        keys, values = keys.to(query.dtype), values.to(query.dtype)
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=keys.shape[1] != query.shape[1]
    )
    return attn.o_proj(out.transpose(1, 2).reshape(batch, q, -1))


def _projections(attn: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value [B, q, heads * D]: three projections, one over our fused matrix (`executor.fusion`), or
    Phi-3's own fused `qkv_proj`, split in that order."""
    fused = fused_weights(attn, QKV[0])
    if fused is not None:
        widths = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        return F.linear(hidden, *fused).split(widths, dim=-1)
    if not hasattr(attn, "qkv_proj"):
        return attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)
    qkv = attn.qkv_proj(hidden)
    kv_width = attn.num_key_value_heads * attn.head_dim
    query_width = qkv.shape[-1] - 2 * kv_width
    return qkv.split([query_width, kv_width, kv_width], dim=-1)
