"""benchmarks/process_spread.py's pure parts: the spreads it reports and its refusal of a malformed --env (its
processes load real models, so the script itself is run by hand; docs/results/cpu.md)."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("process_spread")


def test_spreads_between_and_within_processes(bench) -> None:
    summary = bench.summarise([[40.0, 41.0, 40.5], [44.0, 44.0, 48.4], [36.0, 36.5, 37.0]])
    assert summary["median_ms_per_step"] == 40.5  # the median of the process medians 40.5, 44.0, 36.5
    assert (summary["min_process_median_ms"], summary["max_process_median_ms"]) == (36.5, 44.0)
    assert summary["between_processes"] == round(44.0 / 36.5, 4)
    assert summary["within_process_max"] == 1.1  # 48.4 / 44.0


def test_env_is_key_equals_value(bench) -> None:
    assert bench.parse_env("THP_MEM_ALLOC_ENABLE=1") == {"THP_MEM_ALLOC_ENABLE": "1"}
    assert bench.parse_env(None) == {}
    for bad in ("THP_MEM_ALLOC_ENABLE", "=1"):
        with pytest.raises(SystemExit, match="expected KEY=VALUE"):
            bench.parse_env(bad)
