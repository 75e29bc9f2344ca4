"""benchmarks/predictions_check.py: every prediction committed before the fourth H200 lease finds the row that lease
measured (and only that row), errors are (predicted - measured) / measured, and a file of another kind is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MEASURED = [
    RESULTS / "gpu_decode_nvidia_h200_llama7b_prompt512.json",
    RESULTS / "gpu_decode_nvidia_h200_llama7b_prompt1024.json",
    RESULTS / "validate_nvidia_h200_smollm2.json",
    RESULTS / "gpu_decode_nvidia_h200_smollm2_issue24.json",
]


@pytest.fixture(scope="module")
def check():
    return load_benchmark("predictions_check")


def test_every_h200_prediction_finds_its_measured_row(check) -> None:
    measured = [row for path in MEASURED for row in check.read_measured(path)]
    predictions = json.loads((RESULTS / "predictions_next_lease_2026-12-03.json").read_text())["rows"]
    checks = check.check([r for r in predictions if r["card"] == "h200"], measured)
    assert len(checks) == 20 and all(c.measured is not None for c in checks)
    ar = next(c for c in checks if c.config == "ours ar" and c.context.startswith("512"))
    assert ar.measured == pytest.approx(163.0409, abs=1e-3)  # the prompt-512 file's decode median, not 1024's
    assert ar.error == pytest.approx((ar.predicted - ar.measured) / ar.measured)
    batch8 = next(c for c in checks if c.config == "ar b=8")
    assert batch8.source == "validate_nvidia_h200_smollm2.json" and batch8.spread > 0.25


def test_an_unmeasured_prediction_is_listed_as_such(check) -> None:
    predictions = json.loads((RESULTS / "predictions_next_lease_2026-12-03.json").read_text())["rows"]
    checks = check.check([r for r in predictions if r["card"] == "h100"], [])
    assert checks and all(c.measured is None and c.error is None for c in checks)
    assert check.summary(checks)["measured"] == 0


def test_a_file_of_another_kind_is_refused(check, tmp_path, capsys) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    predictions = RESULTS / "predictions_next_lease_2026-12-03.json"
    assert check.main(["--predictions", str(predictions), "--card", "h200", "--measured", str(other)]) == 2
    assert "neither gpu_decode.py's JSON" in capsys.readouterr().err


def test_a_prediction_matched_by_two_measured_rows_is_refused(check, capsys) -> None:
    twice = [str(MEASURED[0]), str(MEASURED[0])]
    predictions = RESULTS / "predictions_next_lease_2026-12-03.json"
    assert check.main(["--predictions", str(predictions), "--card", "h200", "--measured", *twice]) == 2
    assert "2 measured rows match" in capsys.readouterr().err
