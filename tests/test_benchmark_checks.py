"""What every benchmark script checks before its work (`sim.formats.check_benchmark_out`, `check_benchmark_counts`):
an `--out` that cannot be written and a count below 1 are one line and exit 1, not a traceback after the run."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sim.formats import check_benchmark_counts, check_benchmark_inputs, check_benchmark_out


def test_an_out_that_cannot_be_written_is_refused_before_the_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match=r"error: --out .*a-file is a file, so the folder .* cannot be made"):
        check_benchmark_out(argparse.Namespace(out=blocker / "x.json"))
    check_benchmark_out(argparse.Namespace(out=tmp_path / "new" / "x.json"))  # a folder to be made: fine
    check_benchmark_out(argparse.Namespace(out=None))


def test_a_missing_input_file_is_refused_by_its_flag(tmp_path: Path) -> None:
    (tmp_path / "here.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"error: --validate .*gone.json: no such file"):
        check_benchmark_inputs(argparse.Namespace(validate=tmp_path / "gone.json"), "validate")
    with pytest.raises(SystemExit, match=r"error: files .*gone.json: no such file"):
        check_benchmark_inputs(argparse.Namespace(files=[tmp_path / "here.json", tmp_path / "gone.json"]), "files")
    check_benchmark_inputs(argparse.Namespace(files=[tmp_path / "here.json"], profile=None), "files", "profile")


def test_a_count_below_one_is_refused_by_its_flag() -> None:
    with pytest.raises(SystemExit, match="error: --num-prompts must be >= 1, got 0"):
        check_benchmark_counts(argparse.Namespace(num_prompts=0, repeats=3), "repeats", "num_prompts")
    check_benchmark_counts(argparse.Namespace(repeats=None), "repeats")
