"""benchmarks/frozen_memory.py's pure parts: a cycle's row, its table, and the release it uses (the script compiles a
real model frozen for minutes, so it is run by hand; docs/executor.md)."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark
from tiny_models import TinySpec, tiny_model

import executor


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("frozen_memory")


def test_rows_and_table(bench) -> None:
    row = bench.row(1, "eesd fixed:2", 212.345, 31.456, (2.3456, 1.2345, 1.1111))
    assert row == {"cycle": 1, "configuration": "eesd fixed:2", "first_call_s": 212.3, "tok_s": 31.46,
                   "rss_gb_in_use": 2.346, "rss_gb_after_release": 1.234, "rss_gb_after_trim": 1.111}  # fmt: skip
    lines = bench.table([row], 0.9).splitlines()
    assert lines[0] == "model loaded: 0.90 GB resident"
    assert lines[2].split() == ["1", "eesd", "fixed:2", "212.3", "31.46", "2.35", "1.23", "1.11"]
    assert [name for name, _ in bench.configurations("h.safetensors", "fixed:2")] == ["ar", "eesd fixed:2"]
    assert 0 < bench.resident_gb() < bench.resident_gb() + 1


def test_release_uses_the_executors_and_drops_every_kept_table(bench) -> None:
    net = tiny_model(TinySpec(num_layers=2, seed=1), torch.float32)
    executor.generate(net, [[3, 4, 5]], max_new_tokens=3, method="eesd", exit_layer=1, draft_dtype="bfloat16")
    assert "_eesd_low_drafts" in net.__dict__  # the narrow draft copies, kept on the model
    assert bench.release(net) == "executor.release_passes"
    assert not [name for name in net.__dict__ if name.startswith("_eesd_")]
