"""Model shapes the simulator knows by name (decoder-only, Llama-style: GQA attention + gated MLP).

Sizes are counts (layers, dims, tokens); `*_params` are parameter counts; bytes follow from `dtype_bytes`.
Sources: each model's HF `config.json` (Phi-3-mini: Phi-3-mini-4k-instruct, whose shape the 128k variant shares).

Limits a model sets on what may be simulated of it, as the executor (and vLLM) set them: a prompt and its output fit
the context (`max_position_embeddings`; the executor's `generate` refuses more), and a tensor-parallel degree splits
the attention heads evenly and either splits the KV heads evenly or is a multiple of them (each KV head then
replicated on tp / kv_heads ranks), as vLLM requires.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_size: int | None = None  # per-head width where it is not hidden_size / num_heads (Gemma 3: 256)
    max_position_embeddings: int | None = None  # the context, in positions (None: not known, not checked)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def layer_params(self) -> int:
        """q, k, v, o projections + gate, up, down (norm weights are negligible)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size

    @property
    def lm_head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def check_tp(self, tp: int) -> None:
        """A ValueError unless `tp` ranks can share this model's heads (module docstring)."""
        heads, kv = self.num_heads, self.num_kv_heads
        if tp < 1 or heads % tp:
            raise ValueError(f"tp {tp} does not divide {self.name}'s {heads} attention heads")
        if (kv % tp) if tp <= kv else (tp % kv):
            raise ValueError(
                f"tp {tp} neither divides {self.name}'s {kv} KV heads nor is a multiple of them (each KV head "
                "replicated on tp / kv_heads ranks)"
            )

    def check_context(self, positions: int, what: str) -> None:
        """A ValueError if `positions` (`what` they are) exceed the context, where it is known."""
        context = self.max_position_embeddings
        if context is not None and positions > context:
            raise ValueError(
                f"{what} = {positions:,} positions exceed {self.name}'s context of {context:,} positions "
                "(max_position_embeddings)"
            )


MODELS: dict[str, ModelConfig] = {
    m.name: m
    for m in (
        ModelConfig("SmolLM2-135M", 30, 576, 9, 3, 1536, 49152, max_position_embeddings=8192),
        ModelConfig("Qwen2.5-Coder-0.5B", 24, 896, 14, 2, 4864, 151936, max_position_embeddings=32768),
        ModelConfig("Gemma-3-270M", 18, 640, 4, 1, 2048, 262144, head_size=256, max_position_embeddings=32768),
        ModelConfig("Phi-3-mini", 32, 3072, 32, 32, 8192, 32064, max_position_embeddings=4096),
        ModelConfig("Llama-2-7B", 32, 4096, 32, 32, 11008, 32000, max_position_embeddings=4096),
        ModelConfig("Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, max_position_embeddings=8192),
        ModelConfig("Llama-2-13B", 40, 5120, 40, 40, 13824, 32000, max_position_embeddings=4096),
        ModelConfig("Llama-2-70B", 80, 8192, 64, 8, 28672, 32000, max_position_embeddings=4096),
    )
}

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}  # fp8: a draft dtype only (`Scenario.draft_dtype`)


def model(name: str) -> ModelConfig:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)} (or give the shape inline)")
    return MODELS[name]


# what a calibration file's metadata names (an HF config's keys, `calibrate`'s) -> the ModelConfig field it gives
_CONFIG_FIELDS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
}
_SHAPE = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size", "head_dim")


def named_model(name: str) -> ModelConfig | None:
    """The `MODELS` entry a file's `model` names: its name, a file-name label of it ('smollm2-135m'), or a path
    whose stem is one; None for a name that is none of these (a local path, a test model)."""
    stem = PurePath(name).stem if "/" in name or name.endswith((".gguf", ".json")) else name
    key = _label(stem)
    return next((m for m in MODELS.values() if _label(m.name) == key), None)


def _label(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def check_claimed_model(model: ModelConfig, metadata: Mapping[str, Any]) -> None:
    """A ValueError naming the metadata field where a calibration file says it was made with another model than
    `model`: its `model` names a known model of another shape, its `model_config` (an HF config summary) gives another
    width, head count or vocabulary, or its layer count (`total_layers`: the real model's where fewer were
    profiled; else `num_layers` or `model_config.num_hidden_layers`) differs. What a file does not say is not
    checked."""
    name = metadata.get("model")
    named = named_model(name) if isinstance(name, str) else None
    if named is not None and _shape(named) != _shape(model):
        field = next(f for f in _SHAPE if getattr(named, f) != getattr(model, f))
        raise ValueError(
            f"metadata.model: {name!r} is {named.name}, not the scenario's model {model.name} ({field} "
            f"{getattr(named, field)}, not {getattr(model, field)})"
        )
    config = metadata.get("model_config")
    config = config if isinstance(config, Mapping) else {}
    for key, field in _CONFIG_FIELDS.items():
        given = config.get(key)
        if isinstance(given, int) and given != getattr(model, field):
            raise ValueError(
                f"metadata.model_config.{key}: {given} (model {name!r}); the scenario's model {model.name} has "
                f"{getattr(model, field)}"
            )
    for key in ("total_layers", "num_layers", "model_config.num_hidden_layers"):
        given = config.get("num_hidden_layers") if key.startswith("model_config.") else metadata.get(key)
        if isinstance(given, int) and not isinstance(given, bool):
            if given != model.num_layers:
                raise ValueError(
                    f"metadata.{key}: {given} layers (model {name!r}); the scenario's model {model.name} has "
                    f"{model.num_layers}"
                )
            return


def check_profiled_layers(model: ModelConfig, metadata: Mapping[str, Any]) -> None:
    """A ValueError naming the metadata field where a latency profile says it timed layers `model` does not have:
    `layers_profiled` (the layers of the model it loaded: all, or the first few of a model too large for the device)
    beyond the model's, or a `layer_spot_check` entry's `layer` index beyond the model's layers. What a file does not
    say (or says as no integer) is not checked."""
    name, layers = metadata.get("model"), model.num_layers
    profiled = _integer(metadata.get("layers_profiled"))
    if profiled is not None and not 1 <= profiled <= layers:
        raise ValueError(
            f"metadata.layers_profiled: {profiled} layers (model {name!r}); expected 1 to the {layers} layers the "
            f"scenario's model {model.name} has"
        )
    spot_checks = metadata.get("layer_spot_check")
    for i, spot in enumerate(spot_checks if isinstance(spot_checks, list) else []):
        index = _integer(spot.get("layer")) if isinstance(spot, Mapping) else None
        if index is not None and not 0 <= index < layers:
            raise ValueError(
                f"metadata.layer_spot_check[{i}].layer: {index} (model {name!r}); expected a layer index in "
                f"[0, {layers - 1}]: the scenario's model {model.name} has {layers} layers"
            )


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _shape(model: ModelConfig) -> tuple[int, ...]:
    return tuple(getattr(model, name) for name in _SHAPE)


def known_model_like(model: ModelConfig) -> ModelConfig | None:
    """The `MODELS` entry of `model`'s shape (a known model loaded from a path, say), or None."""
    return next((known for known in MODELS.values() if _shape(known) == _shape(model)), None)
