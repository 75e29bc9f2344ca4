"""benchmarks/verify_buckets.py's pure parts: a setting's summary row and its refusal of a malformed --order (its
processes compile real models for minutes, so the script itself is run by hand; docs/executor.md)."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("verify_buckets")


def test_summary_counts_verify_passes_and_outputs_equal_to_ar(bench) -> None:
    result = {
        "first_call_s": 301.04, "tok_s": [20.0, 22.0, 21.0], "rss_gb": 5.123, "peak_rss_gb": 5.5,
        "passes": [["draft", 1, 256], ["verify", 2, 256], ["verify", 5, 256], ["verify", 3, 256], ["ar", 1, 256]],
        "draft_lengths": [0, 1, 2, 3, 4], "drafted": [1, 3, 4, 0, 2], "outputs": [[1, 2], [3, 4], [5]],
    }  # fmt: skip
    row = bench.summary("buckets on", result, [[1, 2], [3, 9], [5]])
    assert row["verify_passes"] == 3 and row["verify_drafts"] == [1, 2, 4]
    assert row["tok_s_median"] == 21.0 and row["first_call_s"] == 301.0 and row["rss_gb"] == 5.12
    assert row["outputs_equal_ar"] == "2/3" and row["rounds"] == 5


def test_order_is_off_and_on(bench) -> None:
    assert bench.parse_order("off, on,off") == ["off", "on", "off"]
    for bad in ("", "off,maybe"):
        with pytest.raises(SystemExit, match="expected a comma-separated list of off / on"):
            bench.parse_order(bad)
