"""What every benchmark script checks before its work (`sim.formats.check_benchmark_args`): an `--out` that cannot be
written, a missing input file and a count below 1 are one line and exit 2, not a traceback after the run; and what
`sim.formats.run_script` makes of a user's mistake found during the work (one line, exit 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sim.formats import (
    check_benchmark_args,
    check_benchmark_counts,
    check_benchmark_inputs,
    check_benchmark_out,
    run_script,
)


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


def test_one_call_makes_every_check(tmp_path: Path) -> None:
    args = argparse.Namespace(out=tmp_path / "x.json", profile=tmp_path / "gone.json", repeats=0)
    with pytest.raises(SystemExit, match=r"error: --profile .*gone.json: no such file"):
        check_benchmark_args(args, inputs=("profile",), counts=("repeats",))
    args.profile = None
    with pytest.raises(SystemExit, match="error: --repeats must be >= 1, got 0"):
        check_benchmark_args(args, inputs=("profile",), counts=("repeats",))


def test_a_mistake_found_in_the_work_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    def main() -> None:
        raise FileNotFoundError("exit head file h.safetensors does not exist")

    monkeypatch.delenv("EESD_DEBUG", raising=False)
    monkeypatch.setattr("sys.argv", ["head_speed.py"])
    assert run_script(main) == 2
    assert capsys.readouterr().err == "head_speed.py: error: exit head file h.safetensors does not exist\n"
    assert run_script(lambda: None) == 0 and run_script(lambda: 3) == 3
    with pytest.raises(RuntimeError):  # a bug is not a user's mistake: its traceback stays
        run_script(lambda: (_ for _ in ()).throw(RuntimeError("bug")))
    monkeypatch.setenv("EESD_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run_script(main)


def test_the_usual_count_flags_are_checked_wherever_a_script_has_them() -> None:
    """`--threads 0` and the like are refused in every script that calls check_benchmark_args, named or not; a flag of
    such a name holding a text (a prompt set) is not a count."""
    for name in ("threads", "repeats", "runs", "cycles", "max_k"):
        flag = "--" + name.replace("_", "-")
        with pytest.raises(SystemExit, match=f"error: {flag} must be >= 1, got 0"):
            check_benchmark_args(argparse.Namespace(out=None, **{name: 0}))
    check_benchmark_args(argparse.Namespace(out=None, prompts="builtin", threads=None, warmup=0))


def test_a_validate_json_of_another_kind_is_named(tmp_path: Path) -> None:
    from sim.formats import read_validate_json

    path = tmp_path / "x.json"
    cases = [
        ("not json", "not a JSON file"),
        ('{"rows": []}', "not an `eesd validate --json` file"),
        ('{"metadata": {"scenario": "s"}, "rows": []}', "metadata lacks prompts, max_new_tokens"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(ValueError, match=f"--validate {path}: {message}"):
            read_validate_json(path, "--validate")
    path.write_text('{"metadata": {"scenario": "s", "prompts": [], "max_new_tokens": 8}, "rows": []}')
    assert read_validate_json(path, "--validate")["rows"] == []


def test_a_benchmark_json_names_the_machine_and_the_command() -> None:
    from sim.formats import machine_info

    info = machine_info()
    assert info["cpu"] and info["cores"] >= 1 and info["python"] and "T" in info["date"] and info["command"]


def test_head_report_refuses_two_heads_at_one_exit_layer(tmp_path: Path) -> None:
    """Its report keeps one head per exit layer: two files at E = 7 are refused before the work instead of the first
    being dropped from the report; heads at different exits pass."""
    import shutil

    from benchmark_scripts import load_benchmark

    report = load_benchmark("head_report")
    root = Path(__file__).resolve().parents[1] / "heads"
    e7, e15 = root / "smollm2-135m-e7-mix5-v16k.safetensors", root / "smollm2-135m-e15-mix5-v16k.safetensors"
    twin = shutil.copy(e7, tmp_path / "twin.safetensors")
    report.check_one_head_per_exit([str(e7), str(e15)])
    with pytest.raises(ValueError, match=r"twin.safetensors both draft at exit layer 7; the report keeps one head"):
        report.check_one_head_per_exit([str(e7), str(twin)])
