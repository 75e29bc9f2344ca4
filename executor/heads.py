"""Exit heads: what turns the exit layer's hidden states into draft logits.

- `shared`: the model's own final norm + LM head applied at the exit layer (LayerSkip's shared exit, no training).
- `shared:N` (`SubsetExitHead`): the same over N token ids only (the N lowest, which BPE and SentencePiece
  vocabularies give to their most frequent pieces; or any list). A draft step's LM head then costs N/V of the full
  one, which matters where the vocabulary is large (Gemma 3: 262k ids, more than all its layers on a CPU). Drafts
  are only proposals, so output is unchanged; a token outside the subset is simply never drafted.
- a vocabulary-subset head file (`eesd train-head --vocab-subset N`): the N ids the model itself is most likely to
  emit on a prompt set (`executor.train_head.vocabulary_scores`), as EAGLE-3 picks its draft vocabulary. No weights
  of its own: the file holds the ids, ranked.
- trained (`TrainedExitHead`): one decoder layer of the model's own class + an RMSNorm on top of layer E, sharing
  the model's frozen LM head, trained by self-distillation (`executor.train_head`). Its layer starts as a copy of
  layer E, the layer the full model itself applies next: its input norm and projections already expect layer-E
  statistics, so before any training the head is the shared exit one layer deeper, and training only has to bend
  it towards the last layer's output. (A copy of the last layer sees inputs far from its own distribution.)
- attention-only (`AttentionExitHead`, `--head-kind attention`): the same minus the layer's MLP, an attention
  sublayer + norm as a light adapter for shallow exits.
- either trained kind with a draft vocabulary (`--draft-vocab FILE`, the ids of a vocabulary-subset head file): its
  LM head is those rows of the model's, it is trained on the full model's distribution renormalised over them, and a
  draft step pays N/V of the LM head. The ids are stored in the head file (`token_ids`).

A head object has `extra_layers` (decoder layers of its own, which get KV-cache slots after the model's layers),
`__call__(hidden, step, cache) -> logits` and `prefill(hidden, step, cache)`. The decoder calls `prefill` with the
layer-E states of the prompt and of each round's last draft, and `__call__` for every other draft step, each at
its absolute positions; both run the head's layer there, so its KV (cache layer `adapter.num_layers`) holds, for
every committed position, exactly what a teacher-forced pass over the committed text would hold. Rejected
positions are overwritten next round, as in every other layer.

Head files are safetensors: the layer's and the norm's tensors under `layer.` / `norm.` (a vocabulary-subset head:
`token_ids`, int64, most likely first), and metadata (strings) recording the format, the model fingerprint
(`model_fingerprint`), the exit layer (`any` for a subset head), the head architecture (`HEAD_ARCHITECTURE`,
`ATTENTION_ARCHITECTURE` or `SUBSET_ARCHITECTURE`; a trained head's draft vocabulary as `draft_vocab_size`), a
checksum, and how the head was made. The checksum (format version 2) covers the tensors (names, dtypes, shapes, bytes)
and every other metadata field, so an edited exit layer is caught as surely as a flipped weight. Version 1 files,
written before, sum the tensors only: they still load, their tensors checked, their metadata taken as it stands (re-
saving one with `save_head` / `reseal_head_file` writes version 2). `load_head` refuses a file made for another model
or exit layer, a corrupt or truncated file, one without a checksum and one whose fields do not parse, with a
`ValueError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from executor.adapter import (
    ModelAdapter,
    Step,
    attention_forward,
    attention_mask,
    decoder_layer,
    head_linear,
    layer_forward,
)
from executor.kv_cache import KVCache
from sim.formats import subset_size

HEAD_FORMAT = "eesd-exit-head"
HEAD_FORMAT_VERSION = "2"  # the checksum covers the tensors and the metadata
TENSORS_ONLY_VERSION = "1"  # the older format: the checksum covers the tensors only
HEAD_ARCHITECTURE = "decoder-layer+rmsnorm"
ATTENTION_ARCHITECTURE = "attention+rmsnorm"
SUBSET_ARCHITECTURE = "vocab-subset"
_CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters", "tie_word_embeddings",
    "attention_bias", "sliding_window",
)  # fmt: skip


class SharedExitHead:
    """The model's own final norm + LM head applied at the exit layer (LayerSkip's shared exit, no training)."""

    extra_layers = 0
    cache_key: object = "shared"  # heads that decode alike share captured passes

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter

    def __call__(self, hidden: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        return self.adapter.logits(hidden)

    def prefill(self, hidden: torch.Tensor, step: Step, cache: KVCache) -> None:
        """A head with layers of its own fills their KV from the exit-layer states here; this one has none."""


def head_key(head: Any) -> object:
    """Heads that decode alike share captured passes: every shared head is one, a vocabulary-subset head is its
    subset; any other head (a trained one) is itself."""
    if head is None:
        return SharedExitHead.cache_key
    return getattr(head, "cache_key", None) or id(head)


def subset_rows(adapter: ModelAdapter, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight rows (and bias) of `token_ids`: what a draft over that vocabulary subset scores."""
    bias = getattr(adapter.lm_head, "bias", None)
    weight = adapter.lm_head.weight.detach()[token_ids]
    return weight, (bias.detach()[token_ids] if bias is not None else None)


def full_vocabulary(logits: torch.Tensor, token_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Subset logits [..., N] as vocabulary-wide logits [..., V], -inf outside the subset: the selector, the
    confidence policy and rejection sampling's q then see a distribution over the subset only."""
    full = logits.new_full((*logits.shape[:-1], vocab), float("-inf"))
    return full.index_copy(-1, token_ids, logits)


def checked_token_ids(token_ids: torch.Tensor | list[int], vocab: int) -> torch.Tensor:
    """`token_ids` as a 1-D int64 tensor of distinct ids in [0, vocab), in the given order; a `ValueError` if not."""
    ids = torch.as_tensor(token_ids).cpu()
    if ids.dim() != 1 or ids.dtype != torch.int64 or ids.numel() == 0 or ids.unique().numel() != ids.numel():
        raise ValueError(f"a draft vocabulary needs distinct int64 token ids, got {ids.numel()} ids of {ids.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"a draft vocabulary needs token ids in [0, {vocab}), got ids up to {int(ids.max())}")
    return ids


class TrainedExitHead(nn.Module):
    """One decoder layer + final RMSNorm on top of layer `exit_layer`, sharing the model's (frozen) LM head, over the
    whole vocabulary or, with `token_ids`, over that draft vocabulary only."""

    extra_layers = 1
    kind = "layer"
    architecture = HEAD_ARCHITECTURE
    layer_run: Callable[..., torch.Tensor] | None = None  # a compiled `layer_forward` (see `with_layer_run`)

    def __init__(
        self,
        adapter: ModelAdapter,
        exit_layer: int,
        init_layer: int | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
        token_ids: torch.Tensor | list[int] | None = None,
    ) -> None:
        """A head at `exit_layer` whose layer starts as a copy of layer `init_layer` (default: E), or, with
        `tensors` (a head's state dict), holds those: then no model layer is read but layer 0 for its class, as
        in a pipeline stage process that holds only its own layers. `token_ids` (or a `token_ids` tensor among
        `tensors`) makes it draft over those ids only: its LM head is their rows of the model's."""
        super().__init__()
        if not 1 <= exit_layer < adapter.num_layers:
            raise ValueError(f"exit_layer must be in [1, {adapter.num_layers - 1}], got {exit_layer}")
        self.adapter = adapter  # not a module: the model's weights stay outside the head's parameters
        self.exit_layer = exit_layer
        self.init_layer = exit_layer if init_layer is None else init_layer
        self.index = adapter.num_layers  # the head's KV lives in the first extra cache layer
        self.window = adapter.windows[self.init_layer]
        source = adapter.layers[0 if tensors is not None else self.init_layer]
        # its class and, through the config, its window and rotary kind (HF's own layer index is unused here: the
        # head's KV goes to cache layer `self.index`)
        self.layer = type(source)(adapter.config, layer_idx=self.init_layer)
        self.norm = type(adapter.norm)(adapter.config.hidden_size, eps=adapter.config.rms_norm_eps)
        # in the model's dtype before any weight is loaded (built in torch's default dtype, a float64 head's
        # weights would be rounded to float32 on the way in)
        self.layer.to(dtype=adapter.dtype)
        self.norm.to(dtype=adapter.dtype)
        if tensors is None:
            self.layer.load_state_dict(source.state_dict())
            self.norm.load_state_dict(adapter.norm.state_dict())
        self.trim()
        if token_ids is None and tensors is not None:
            token_ids = tensors.get("token_ids")
        vocab = adapter.lm_head.weight.shape[0]
        ids = None if token_ids is None else checked_token_ids(token_ids, vocab)
        self.register_buffer("token_ids", ids)
        if tensors is not None:
            self.load_state_dict(tensors)
        self.vocab = vocab
        self._rows: tuple[object, torch.Tensor, torch.Tensor | None] | None = None
        self.metadata: dict[str, str] = {}
        self.to(device=adapter.device, dtype=adapter.dtype)

    def trim(self) -> None:
        """Drop what the head's layer does not run (an attention-only head: the MLP)."""

    @property
    def draft_vocab(self) -> int | None:
        """The size of the head's draft vocabulary, or None: the whole vocabulary."""
        return None if self.token_ids is None else self.token_ids.numel()

    def run_layer(self, hidden: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        """The head's decoder layer over exit-layer states [B, q, d] at `step`, writing its KV into `cache`."""
        rotary = self.adapter.rotary(hidden, step.positions, self.adapter.rotary_kinds[self.init_layer])
        mask = attention_mask(step, self.window, hidden.dtype)
        run = self.layer_run if step.span is not None else None  # compiled for a static step (fixed shapes) only
        return decoder_layer(self.layer, self.index, hidden, step, cache, rotary, mask, run)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Norm + the model's LM head over the head layer's output [B, q, d] -> [B, q, V] (-inf outside a draft
        vocabulary)."""
        if self.token_ids is None:
            return self.adapter.project(self.norm(hidden))
        return full_vocabulary(self.draft_logits(hidden), self.token_ids, self.vocab)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the head's draft vocabulary [B, q, N] (N = V without one), the distribution it is trained
        to match."""
        if self.token_ids is None:
            return self.adapter.project(self.norm(hidden))
        weight, bias = self.subset_weight()
        return self.adapter.softcap(head_linear(self.norm(hidden), weight, bias))

    def subset_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's rows of the draft vocabulary, gathered once per LM-head weight (not per draft step)."""
        weight = self.adapter.lm_head.weight
        if self._rows is None or self._rows[0] is not weight:
            self._rows = (weight, *subset_rows(self.adapter, self.token_ids.to(weight.device)))
        return self._rows[1], self._rows[2]

    def __call__(self, hidden: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        return self.head_logits(self.run_layer(hidden, step, cache))

    def prefill(self, hidden: torch.Tensor, step: Step, cache: KVCache) -> None:
        self.run_layer(hidden, step, cache)

    sequence_forward = staticmethod(layer_forward)  # its layer over whole sequences (`layer_sequences`)

    def layer_sequences(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head layer's output [B, T, d] over exit-layer states [B, T, d] at positions 0..T-1 (trainable): causal
        attention among the T positions without a cache (a sliding-window layer: through a cache and its mask, as
        decoding runs it). On a GPU the cache path's indexed writes, their backward and a [B, 1, T, T] mask cost
        far more than the layer's products (a training step's head layers took 4.5x the whole teacher's time)."""
        if self.window is not None:
            return self.cached_sequences(hidden)
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        rotary = self.adapter.rotary(hidden, positions, self.adapter.rotary_kinds[self.init_layer])
        return self.sequence_forward(self.layer, hidden, None, rotary, None)

    def cached_sequences(self, hidden: torch.Tensor) -> torch.Tensor:
        """`layer_sequences` through a KV cache of its own and the decoding path's mask (windows apply)."""
        batch, length, _ = hidden.shape
        positions = torch.arange(length, device=hidden.device).expand(batch, length)
        step = Step(positions=positions, starts=(0,) * batch)
        cache = KVCache(  # the head's layer alone: the model's layers are not run in training
            num_layers=1, batch=batch, num_kv_heads=self.adapter.num_kv_heads, max_len=length,
            head_dim=self.adapter.head_dim, dtype=hidden.dtype, device=hidden.device, layer_ids=[self.index],
        )  # fmt: skip
        return self.run_layer(hidden, step, cache)

    def forward_sequences(self, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced draft logits [B, T, V] from exit-layer states [B, T, d] at positions 0..T-1."""
        return self.head_logits(self.layer_sequences(hidden))


class AttentionExitHead(TrainedExitHead):
    """An attention-only adapter on top of layer `exit_layer`: the attention sublayer of a decoder layer (its input
    norm, projections and residual; no MLP) + a final RMSNorm, sharing the model's LM head. About a quarter of a
    decoder layer's weights, for shallow exits where the head's own cost per draft step matters. Its attention
    starts as a copy of layer E's, trained like the decoder-layer head's."""

    kind = "attention"
    architecture = ATTENTION_ARCHITECTURE
    sequence_forward = staticmethod(attention_forward)

    def trim(self) -> None:
        self.layer.mlp = None

    def run_layer(self, hidden: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        rotary = self.adapter.rotary(hidden, step.positions, self.adapter.rotary_kinds[self.init_layer])
        mask = attention_mask(step, self.window, hidden.dtype)
        return decoder_layer(self.layer, self.index, hidden, step, cache, rotary, mask, attention_forward)


HEAD_CLASSES: dict[str, type[TrainedExitHead]] = {"layer": TrainedExitHead, "attention": AttentionExitHead}
ARCHITECTURE_CLASSES = {cls.architecture: cls for cls in HEAD_CLASSES.values()}


def retargeted(head: TrainedExitHead, token_ids: torch.Tensor | list[int] | None) -> TrainedExitHead:
    """A copy of the trained `head` (its kind, exit layer, layer and norm weights) drafting over `token_ids` (None:
    the whole vocabulary) instead of its own draft vocabulary. Its top token is the same wherever the old head's
    lies in the new vocabulary; drafts are proposals, so the output is AR's either way."""
    tensors = {name: value for name, value in head.state_dict().items() if name != "token_ids"}
    if token_ids is not None:
        tensors["token_ids"] = checked_token_ids(token_ids, head.vocab)
    copy = type(head)(head.adapter, head.exit_layer, head.init_layer, tensors=tensors)
    return copy.to(dtype=next(head.parameters()).dtype)


def head_class(kind: str) -> type[TrainedExitHead]:
    """The trained head class of `kind` ("layer" or "attention")."""
    if kind not in HEAD_CLASSES:
        raise ValueError(f"head kind must be one of {', '.join(HEAD_CLASSES)}, got {kind!r}")
    return HEAD_CLASSES[kind]


class SubsetExitHead(SharedExitHead):
    """The shared exit head over a subset of the vocabulary: logits of the other ids are -inf, so the selector,
    the confidence policy and rejection sampling's q see a distribution over the subset only."""

    def __init__(self, adapter: ModelAdapter, token_ids: torch.Tensor | list[int]) -> None:
        super().__init__(adapter)
        vocab = adapter.lm_head.weight.shape[0]
        given = torch.as_tensor(token_ids, dtype=torch.long).cpu()
        ids = given.unique()
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"a vocabulary-subset head needs token ids in [0, {vocab}), got {ids.numel()} ids")
        self.token_ids = ids.to(adapter.device)
        self.vocab = vocab
        self.weight, self.bias = subset_rows(adapter, self.token_ids)  # [N, d], the rows it scores
        self.cache_key = ("subset", vocab, ids.numel(), hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16])
        # the ids as given, which is how a head file stores them (most likely first, where ranked); sorted when the
        # list repeats ids
        self.ranking = given if given.numel() == ids.numel() else ids
        self.metadata: dict[str, str] = {}

    @classmethod
    def lowest(cls, adapter: ModelAdapter, count: int) -> SubsetExitHead:
        vocab = adapter.lm_head.weight.shape[0]
        if not 1 <= count <= vocab:
            raise ValueError(f"shared:N needs 1 <= N <= {vocab} (the vocabulary), got {count}")
        return cls(adapter, torch.arange(count))

    @classmethod
    def ranked(cls, adapter: ModelAdapter, scores: torch.Tensor, count: int) -> SubsetExitHead:
        """The `count` ids of highest score (ties: the lower id), e.g. `train_head.vocabulary_scores`."""
        vocab = adapter.lm_head.weight.shape[0]
        if scores.shape != (vocab,):
            raise ValueError(f"vocabulary scores must have shape ({vocab},), got {tuple(scores.shape)}")
        if not 1 <= count <= vocab:
            raise ValueError(f"a vocabulary subset needs 1 <= N <= {vocab} (the vocabulary), got {count}")
        order = torch.sort(-scores.detach().double().cpu(), stable=True).indices
        return cls(adapter, order[:count])

    def __call__(self, hidden: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        adapter = self.adapter
        logits = adapter.softcap(head_linear(adapter.norm(hidden), self.weight, self.bias))
        return full_vocabulary(logits, self.token_ids, self.vocab)


def as_adapter(model: nn.Module | ModelAdapter) -> ModelAdapter:
    return model if isinstance(model, ModelAdapter) else ModelAdapter(model)


def model_fingerprint(model: nn.Module | ModelAdapter) -> str:
    """A short hash of the model's shape-defining config and a few weight slices, independent of dtype and device.

    Weights are rounded to bfloat16 before hashing, so the same checkpoint loaded in float32 or bfloat16 gives the
    same fingerprint, while another model (or another fine-tune of the same shape) does not.
    """
    adapter = as_adapter(model)
    config = {key: getattr(adapter.config, key, None) for key in _CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(type(adapter.model).__name__.encode())
    samples = (
        adapter.embed_tokens.weight[:64],
        adapter.layers[0].self_attn.q_proj.weight[:16],
        adapter.layers[-1].mlp.down_proj.weight[:16],
        adapter.norm.weight,
        adapter.lm_head.weight[-64:],
    )
    for tensor in samples:
        rounded = tensor.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        digest.update(rounded.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def head_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The version-2 checksum: the tensors' (`tensors_checksum`) and every metadata field but the checksum itself."""
    fields = {key: value for key, value in metadata.items() if key != "checksum"}
    digest = hashlib.sha256(tensors_checksum(tensors).encode())
    digest.update(json.dumps(fields, sort_keys=True, ensure_ascii=True).encode())
    return digest.hexdigest()


def head_tensors(head: TrainedExitHead, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The head's state dict on the CPU, its floating tensors in `dtype` (a draft vocabulary's ids stay int64)."""
    return {
        name: value.detach().to(device="cpu", dtype=dtype if value.is_floating_point() else value.dtype).contiguous()
        for name, value in head.state_dict().items()
    }


def atomic_write(path: Path, write: Any) -> None:
    """Write through `write(temp_path)` into a temporary file next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o644)  # mkstemp creates the file private; a head or checkpoint is an ordinary file
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def save_head(
    head: TrainedExitHead,
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.bfloat16,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the head atomically as safetensors with its metadata (`info`: steps, date, prompts, ...)."""
    own = {"exit_layer": head.exit_layer, "init_layer": head.init_layer, "dtype": str(dtype).removeprefix("torch.")}
    if head.draft_vocab is not None:
        own["draft_vocab_size"] = head.draft_vocab
    return _write_head_file(path, head.adapter, head.architecture, head_tensors(head, dtype), own, info)


def save_subset_head(head: SubsetExitHead, path: str | os.PathLike[str], info: dict[str, Any] | None = None) -> Path:
    """Write a vocabulary-subset head atomically: its ids (ranked) and the same metadata as a trained head's."""
    tensors = {"token_ids": head.ranking.detach().to(device="cpu", dtype=torch.int64).contiguous()}
    own = {"exit_layer": "any", "vocab_size": head.vocab, "subset_size": head.token_ids.numel()}
    return _write_head_file(path, head.adapter, SUBSET_ARCHITECTURE, tensors, own, info)


def _write_head_file(
    path: str | os.PathLike[str],
    adapter: ModelAdapter,
    architecture: str,
    tensors: dict[str, torch.Tensor],
    own: dict[str, Any],
    info: dict[str, Any] | None,
) -> Path:
    from safetensors.torch import save_file

    metadata = {
        "format": HEAD_FORMAT,
        "format_version": HEAD_FORMAT_VERSION,
        "head_architecture": architecture,
        "model_architecture": type(adapter.model).__name__,
        "model_fingerprint": model_fingerprint(adapter),
        "num_layers": str(adapter.num_layers),
        **{key: str(value) for key, value in own.items()},
    }
    metadata = {key: str(value) for key, value in (info or {}).items() if key not in metadata} | metadata
    metadata["checksum"] = head_checksum(tensors, metadata)
    out = Path(path)
    atomic_write(out, lambda temp: save_file(tensors, temp, metadata=metadata))
    return out


def reseal_head_file(path: str | os.PathLike[str]) -> Path:
    """Rewrite a checked head file (version 1 or 2) in the current version: the same tensors, byte for byte, and the
    same metadata, under a checksum that covers both."""
    from safetensors.torch import save_file

    file = Path(path)
    tensors, metadata = read_head_file(file)
    metadata = {**metadata, "format_version": HEAD_FORMAT_VERSION}
    metadata["checksum"] = head_checksum(tensors, metadata)
    atomic_write(file, lambda temp: save_file(tensors, temp, metadata=metadata))
    return file


def read_head_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a head file; a clear `ValueError` if it is not a complete, intact head file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exit head file {path} does not exist")
    if path.suffix == ".ckpt":
        raise ValueError(f"{path} is a training checkpoint (eesd train-head's), not a head file: use the head file "
                         f"{path.with_suffix('')} it was written beside")  # fmt: skip
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as err:  # safetensors raises its own error types for truncated or malformed files
        raise ValueError(f"exit head file {path} is corrupt or truncated: {err}") from None
    if metadata.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path} is not an EESD exit head file (metadata format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version not in (HEAD_FORMAT_VERSION, TENSORS_ONLY_VERSION):
        raise ValueError(
            f"exit head file {path}: unsupported format version {version!r} (this version reads "
            f"{TENSORS_ONLY_VERSION} and {HEAD_FORMAT_VERSION})"
        )
    if "checksum" not in metadata:
        raise ValueError(f"exit head file {path} has no checksum in its metadata: it cannot be checked")
    if version == TENSORS_ONLY_VERSION:
        if tensors_checksum(tensors) != metadata["checksum"]:
            raise ValueError(f"exit head file {path} is corrupt: its tensors do not match the checksum in its metadata")
    elif head_checksum(tensors, metadata) != metadata["checksum"]:
        raise ValueError(
            f"exit head file {path} is corrupt or was edited: its tensors and metadata do not match its checksum"
        )
    return tensors, metadata


def _layer_field(file: Path, metadata: dict[str, str], key: str, low: int, high: int, default: int | None) -> int:
    """An integer layer index from the metadata, in [low, high]; a `ValueError` naming the file and field if not."""
    text = metadata.get(key)
    if text is None and default is not None:
        return default
    try:
        value = int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"exit head file {file}: metadata {key}={text!r} is not a layer index") from None
    if not low <= value <= high:
        raise ValueError(f"exit head file {file}: metadata {key}={value} is outside [{low}, {high}] for this model")
    return value


def load_head(
    path: str | os.PathLike[str], model: nn.Module | ModelAdapter, exit_layer: int | None = None
) -> TrainedExitHead | SubsetExitHead:
    """The head in `path` for `model`: a trained head (at `exit_layer`, if given: it must be the one the head was
    trained for) or a vocabulary-subset head (any exit layer)."""
    file = Path(path)
    tensors, metadata = read_head_file(file)
    adapter = as_adapter(model)
    fingerprint = model_fingerprint(adapter)
    if metadata.get("model_fingerprint") != fingerprint:
        raise ValueError(
            f"exit head file {file} was made for another model ({metadata.get('model_architecture')}, "
            f"{metadata.get('num_layers')} layers, fingerprint {metadata.get('model_fingerprint')}); this model is "
            f"{type(adapter.model).__name__}, {adapter.num_layers} layers, fingerprint {fingerprint}"
            + (
                f" (the head was trained on model {metadata['model']!r}: load that one)"
                if metadata.get("model")
                else ""
            )
        )
    architecture = metadata.get("head_architecture")
    if architecture == SUBSET_ARCHITECTURE:
        return _subset_from_file(file, tensors, metadata, adapter)
    if architecture not in ARCHITECTURE_CLASSES:
        known = ", ".join(repr(a) for a in [*ARCHITECTURE_CLASSES, SUBSET_ARCHITECTURE])
        raise ValueError(f"exit head file {file}: unknown head_architecture {architecture!r} (expected one of {known})")
    last = adapter.num_layers - 1
    trained_at = _layer_field(file, metadata, "exit_layer", 1, last, None)
    if exit_layer is not None and exit_layer != trained_at:
        raise ValueError(f"exit head file {file} was trained for exit layer {trained_at}, not {exit_layer}")
    init_layer = _layer_field(file, metadata, "init_layer", 0, last, trained_at)
    try:
        head = ARCHITECTURE_CLASSES[architecture](adapter, trained_at, init_layer, token_ids=tensors.get("token_ids"))
        head.load_state_dict({
            name: value.to(adapter.dtype) if value.is_floating_point() else value for name, value in tensors.items()
        })  # fmt: skip
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"exit head file {file} does not fit this model: {err}") from None
    head.metadata = metadata
    return head.eval().requires_grad_(False)


def _subset_from_file(
    file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], adapter: ModelAdapter
) -> SubsetExitHead:
    ids = tensors.get("token_ids")
    if ids is None or ids.dim() != 1 or ids.dtype != torch.int64 or ids.unique().numel() != ids.numel():
        raise ValueError(f"exit head file {file}: a vocabulary-subset head needs 'token_ids', distinct int64 ids")
    try:
        head = SubsetExitHead(adapter, ids)
    except ValueError as err:
        raise ValueError(f"exit head file {file}: {err}") from None
    head.metadata = metadata
    return head


def draft_cost_ratio(
    adapter: ModelAdapter, exit_layer: int, head: Any, draft_dtype: torch.dtype | None = None
) -> float:
    """c = a draft step's cost / a verify pass's, estimated by the bytes of weights each reads (decoding at small
    batches is bound by reading them): layers [0, E), the head's own layer and the LM head rows it scores, against
    all L layers and the whole LM head. E / L undercounts what a vocabulary-subset head saves: Gemma-3-270m's LM head
    (262k ids) is most of a step, so its E = 14 of 18 head over 16k ids costs about 0.3 of a step, not 0.78. Drafts
    in a narrower `draft_dtype` (`executor.draft_precision`) read its bytes per weight."""

    def numel(module: Any) -> int:
        return sum(p.numel() for p in module.parameters()) if isinstance(module, nn.Module) else 0

    vocab, width = adapter.lm_head.weight.shape
    layers = [numel(layer) for layer in adapter.layers]
    rows = getattr(head, "draft_vocab", None) if not isinstance(head, SubsetExitHead) else head.token_ids.numel()
    draft = sum(layers[:exit_layer]) + numel(getattr(head, "layer", None)) + (rows or vocab) * width
    narrower = 1.0 if draft_dtype is None else draft_dtype.itemsize / adapter.dtype.itemsize
    return draft * narrower / (sum(layers) + vocab * width)


MAX_LOADED_HEADS = 4  # head files kept loaded per model (`loaded_head`)


def loaded_head(path: str | os.PathLike, adapter: ModelAdapter, exit_layer: int | None) -> Any:
    """The head in file `path`, loaded once per model, device, dtype and (file, exit layer) and kept on the model
    object (the `MAX_LOADED_HEADS` most recent): calls that name the same file get the same head object, so they
    share its captured or frozen passes (`head_key`) instead of each compiling and holding its own (a frozen CPU pass
    holds a packed copy of the weights: a new head per call ran a 24 GB box out of memory within a few prompts). A
    file changed since (size or modification time) is loaded anew. Unlike captured passes, a head stays valid when
    the model's projections are fused (their weights move, the head reads none of them)."""
    try:
        stat = Path(path).stat()
    except OSError:  # load_head says what is wrong with the path
        return _load_seed_free(path, adapter, exit_layer)
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, exit_layer, str(adapter.device), adapter.dtype)
    kept = adapter.model.__dict__.setdefault("_eesd_heads", {})
    head = kept.pop(key, None) or _load_seed_free(path, adapter, exit_layer)
    kept[key] = head  # most recent last
    while len(kept) > MAX_LOADED_HEADS:
        kept.pop(next(iter(kept)))
    return head


def _load_seed_free(path: str | os.PathLike, adapter: ModelAdapter, exit_layer: int | None) -> Any:
    """`load_head` with torch's random state as it was: a head's layers are built (randomly initialised) before its
    weights load, and a `torch.manual_seed` before building a generator must still decide the text it samples."""
    devices = [adapter.device.index or 0] if adapter.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return load_head(path, adapter, exit_layer)


def resolve_head(head: Any, adapter: ModelAdapter, exit_layer: int):
    """A head object from `None` / "shared" / "shared:N" / a path to a head file / a head object."""
    if head is None or head == "shared":
        return SharedExitHead(adapter)
    if isinstance(head, str) and head.startswith("shared:"):
        count = subset_size(head)
        if count is None:
            raise ValueError(f"head 'shared:N' needs a whole number of token ids N >= 1, got {head!r}")
        return SubsetExitHead.lowest(adapter, count)
    if isinstance(head, (str, os.PathLike)):
        if not str(head).endswith(".safetensors") and not Path(head).is_file():
            raise ValueError(
                f"head must be 'shared', 'shared:N', a .safetensors head file or a head object, got {head!r}"
            )
        return loaded_head(head, adapter, exit_layer)
    trained_at = getattr(head, "exit_layer", None)
    if exit_layer is not None and trained_at is not None and trained_at != exit_layer:
        raise ValueError(f"the exit head was made for exit layer {trained_at}, not {exit_layer}")
    return head
