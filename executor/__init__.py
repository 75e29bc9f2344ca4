"""The executor: lossless AR and early-exit self-speculative decoding on Hugging Face models.

Public names are imported lazily (PEP 562), so that `import executor.cli` (and `eesd simulate`) does not pay for
importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "generate": "executor.api",
    "GenerationResult": "executor.api",
    "EarlyExitGenerator": "executor.api",
    "GenerationStats": "executor.decoding",
    "ModelAdapter": "executor.adapter",
    "KVCache": "executor.kv_cache",
    "load_model": "executor.models",
    "load_tokenizer": "executor.models",
    "release_passes": "executor.passes",
}

__all__ = [
    "EarlyExitGenerator",
    "GenerationResult",
    "GenerationStats",
    "KVCache",
    "ModelAdapter",
    "generate",
    "load_model",
    "load_tokenizer",
    "release_passes",
]

if TYPE_CHECKING:
    from executor.adapter import ModelAdapter
    from executor.api import EarlyExitGenerator, GenerationResult, generate
    from executor.decoding import GenerationStats
    from executor.kv_cache import KVCache
    from executor.models import load_model, load_tokenizer
    from executor.passes import release_passes


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'executor' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
