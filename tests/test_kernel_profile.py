"""benchmarks/kernel_profile.py on the CPU (its smoke mode: aten operators' self time, no kernels): the script a GPU
lease runs must not break here. No figure here is a claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("kernel_profile")


def test_a_tiny_model_profiles_on_the_cpu(script, tmp_path: Path, capsys) -> None:
    out = tmp_path / "profile.json"
    assert script.main(["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--capture", "none",
                        "--steps", "4", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["unit"].startswith("aten operator") and report["steps"] == 4 and report["wall_ms_per_step"] > 0
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert [r["us_per_step"] for r in rows] == sorted((r["us_per_step"] for r in rows), reverse=True)
    linear = next(r for r in rows if r["name"] == "aten::linear")
    assert linear["per_step"] == 2 * 7 + 1  # uncaptured, unfused: 7 projections per layer, then the LM head
    kv = 2 * 2 * 2 * 16 * (32 + 32) * 4  # K and V, 2 layers, 2 KV heads of 16 dims, prompt + 32 positions, fp32
    assert report["kv_bytes"] == kv and report["prompt_len"] == 32
    assert report["hbm_tbps_source"] == "a copy measured now" and report["hbm_tbps"] > 0  # this machine's copy
    assert report["hbm_floor_ms"] == pytest.approx((report["weight_bytes"] + kv) / (report["hbm_tbps"] * 1e12) * 1e3)
    assert "| aten::linear | 15.0 |" in capsys.readouterr().out


def test_bad_arguments_exit_with_a_message(script, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--steps", "0", "--out", "x.json"])
    assert exit_info.value.code == 2 and "--steps must be >= 1, got 0" in capsys.readouterr().err
