"""The `eesd` command line as a newcomer meets it: a simulator-only install, torch threads, device checks, files
that are not overwritten, progress in a log, a closed pipe, help text."""

from __future__ import annotations

import ast
import collections
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import TinySpec, tiny_model

from calibrate.latency import Grid, plan_points
from executor.cli import SIGPIPE_STATUS, main
from executor.runtime import MAX_DEFAULT_THREADS, default_threads, threads_in
from sim import progress
from sim.progress import LineProgress, duration, progress_bar, track

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
CALIBRATED = ROOT / "scenarios" / "smollm2_cpu_calibrated.yaml"
# the torch commands that take --device, with what else they require ({tmp}: a fresh folder; model x is never loaded)
WITH_DEVICE = [
    ["generate", "--model", "x", "--prompt-ids", "1"],
    ["train-head", "--model", "x", "--exit-layer", "1", "--out", "{tmp}/h.safetensors"],
    ["calibrate", "latency", "--model", "x", "--out", "{tmp}"],
    ["calibrate", "acceptance", "--model", "x", "--exit-layers", "1", "--out", "{tmp}/a.csv"],
]
TINY_LATENCY = ["--q", "1", "--context", "8", "--batch", "1", "--prefill", "8", "--warmup", "1", "--repeats", "1"]

# runs `eesd ARGS` where the executor extra (torch, transformers) and the plots extra (matplotlib) cannot be imported:
# the bare `pip install -e .`
WITHOUT_TORCH = textwrap.dedent(
    """
    import sys

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "transformers", "matplotlib"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    from executor.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def command_id(args: list[str]) -> str:
    return " ".join(args[:2])


def eesd_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model(TinySpec(num_layers=4), torch.float32).save_pretrained(path)
    return path


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    tiny_model(TinySpec(num_layers=2), dtype=torch.float32).config.to_json_file(path)
    return path


# ---- a simulator-only install ----------------------------------------------------------------------------------------
def test_simulate_and_help_run_without_torch(tmp_path: Path) -> None:
    done = eesd_without_torch("simulate", str(QUICKSTART), "--out", str(tmp_path), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "results.csv").read_text().count("\n") == 4  # a header and AR, EESD, PPSD
    assert not list(tmp_path.glob("*.png")) and "no speedup plots" in done.stdout
    for args in (["--help"], ["generate", "--help"], ["calibrate", "latency", "--help"], ["validate", "--help"]):
        assert eesd_without_torch(*args).returncode == 0, args


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--model", "smollm2-135m", "--prompt", "Hello"],
        ["train-head", "--model", "smollm2-135m", "--exit-layer", "4", "--out", "{tmp}/h.safetensors"],
        ["calibrate", "latency", "--model", "smollm2-135m", "--out", "{tmp}"],
        ["calibrate", "link", "--out", "{tmp}/link.csv"],
        ["validate", str(CALIBRATED)],
    ],
    ids=command_id,
)
def test_a_torch_command_without_the_extra_is_one_line_naming_it(tmp_path: Path, args: list[str]) -> None:
    done = eesd_without_torch(*(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    command = args[0]
    assert lines == [
        f"eesd {command}: error: needs the executor extra (torch not installed): pip install torch==2.13.0 && "
        'pip install -e ".[executor]" (with a CUDA torch: the extra alone)'
    ]


# ---- torch threads ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cpus", "threads"), [(1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (16, 8), (64, MAX_DEFAULT_THREADS)]
)
def test_default_threads_are_one_on_small_boxes_and_half_the_cpus_otherwise(cpus: int, threads: int) -> None:
    assert default_threads(cpus) == threads


def test_threads_of_a_cpu_profile_are_read_from_its_device() -> None:
    assert threads_in("CPU: AMD EPYC (2 cores, 1 torch threads)") == 1
    assert threads_in("CPU: Xeon (16 cores, 8 torch threads)") == 8
    assert threads_in("NVIDIA H100 80GB HBM3") is None


def test_generate_sets_the_threads_and_names_them_in_its_header(saved_model: Path, capsys) -> None:
    argv = ["generate", "--model", str(saved_model), "--prompt-ids", "4,5,6", "--method", "ar", "--max-new-tokens", "3"]
    assert main([*argv, "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    assert "torch threads: 2 of" in capsys.readouterr().err
    torch.set_num_threads(3)
    assert main(argv) == 0
    assert torch.get_num_threads() == default_threads()
    assert f"torch threads: {default_threads()} of" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ar", "eesd", "ppsd"])
def test_generate_decodes_a_batch_of_prompts_as_each_alone(saved_model: Path, capsys, method: str) -> None:
    """`--prompt-ids` given again makes a batch (left-padded, PPSD's rows in lockstep): each row's line holds the
    tokens that prompt alone gets, and --compare-ar checks the batch against AR's."""
    argv = ["generate", "--model", str(saved_model), "--method", method, "--max-new-tokens", "5", "--threads", "1",
            *(["--exit-layer", "2"] if method != "ar" else [])]  # fmt: skip
    alone = []
    for ids in ("4,5,6", "7", "9,9,2,11"):
        assert main([*argv, "--prompt-ids", ids]) == 0
        alone.append(capsys.readouterr().out.splitlines()[0])
    assert main([*argv, "--prompt-ids", "4,5,6", "--prompt-ids", "7", "--prompt-ids", "9,9,2,11", "--compare-ar"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [f"[row {row}] {line}" for row, line in enumerate(alone)]
    assert "identical to AR: True" in out[-1]
    if method == "ppsd":
        assert "3 rows in lockstep" in "\n".join(out)


@pytest.mark.parametrize("args", [*WITH_DEVICE, ["validate", str(CALIBRATED)]], ids=command_id)
@pytest.mark.parametrize("threads", ["0", "-2"])
def test_threads_below_one_are_refused(tmp_path: Path, capsys, args: list[str], threads: str) -> None:
    assert main([*(a.format(tmp=tmp_path) for a in args), "--threads", threads]) == 2
    err = capsys.readouterr().err
    assert f"error: --threads must be >= 1, got {threads}" in err and "Traceback" not in err


# ---- devices ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
@pytest.mark.parametrize("args", WITH_DEVICE, ids=command_id)
def test_cuda_on_a_cpu_only_torch_is_one_line(tmp_path: Path, capsys, args: list[str]) -> None:
    assert main([*(a.format(tmp=tmp_path) for a in args), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda: no CUDA device is available" in err


def test_a_device_that_is_not_cpu_or_cuda_is_one_line(capsys) -> None:
    for device in ("tpu", "meta"):
        assert main(["generate", "--model", "x", "--prompt-ids", "1", "--device", device]) == 2
        assert "--device must be cpu or cuda[:N]" in capsys.readouterr().err


# ---- outputs that exist ----------------------------------------------------------------------------------------------
def test_latency_never_overwrites_a_profile_without_force(tiny_config: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["calibrate", "latency", "--model", str(tiny_config), "--out", str(out), *TINY_LATENCY, "--threads", "1"]
    assert main(argv) == 0
    (profile,) = out.glob("latency_*.csv")
    profile.write_text(profile.read_text() + "# edited\n")
    capsys.readouterr()
    assert main(argv) == 2
    assert f"{profile} exists; pass --force" in capsys.readouterr().err
    assert profile.read_text().endswith("# edited\n")
    assert main([*argv, "--force"]) == 0
    assert not profile.read_text().endswith("# edited\n")


@pytest.mark.parametrize(
    "args",
    [
        ["calibrate", "acceptance", "--model", "x", "--exit-layers", "1", "--out"],
        ["calibrate", "link", "--out"],
        ["train-head", "--model", "x", "--exit-layer", "1", "--out"],
    ],
    ids=command_id,
)
def test_an_existing_output_file_is_refused_without_force(tmp_path: Path, capsys, args: list[str]) -> None:
    out = tmp_path / "existing.safetensors"
    out.write_text("kept")
    assert main([*args, str(out)]) == 2
    assert f"--out {out} exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "kept"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", str(QUICKSTART), "--out"], "is a file; --out names the folder"),
        (["calibrate", "latency", "--model", "x", "--out"], "is a file; --out names the folder"),
    ],
    ids=["simulate", "calibrate latency"],
)
def test_an_output_folder_that_is_a_file_is_one_line(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    out = tmp_path / "a-file"
    out.write_text("kept")
    assert main([*args, str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and out.read_text() == "kept"


def test_an_output_file_that_is_a_folder_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["calibrate", "acceptance", "--model", "x", "--exit-layers", "1", "--out", str(tmp_path)]) == 2
    assert "is a folder; --out names the file to write" in capsys.readouterr().err


# ---- progress --------------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_come_every_n_items_or_every_interval() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = LineProgress(100, "latency", "pt", stream=stream, interval_s=30.0, clock=clock)
    assert bar.every == 10
    for _ in range(9):
        clock.now += 1.0
        bar.update(1)
    assert stream.getvalue() == ""
    clock.now += 1.0
    bar.update(1)  # the 10th item
    assert stream.getvalue() == "latency: 10/100 pt (10%), 1 pt/s, ETA 1m30s\n"
    clock.now += 40.0
    bar.update(1)  # 1 item, but 40 s since the last line
    assert stream.getvalue().splitlines()[-1] == "latency: 11/100 pt (11%), 0.22 pt/s, ETA 6m45s"
    bar.update(89)
    bar.set_postfix(kl="0.123")
    bar.close()
    bar.close()
    assert stream.getvalue().splitlines()[-1] == "latency: 100/100 pt (100%), 2 pt/s, in 50s"
    assert len(stream.getvalue().splitlines()) == 3  # the close after a line adds none


def test_progress_counts_only_this_runs_items_in_its_rate() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = LineProgress(10, "latency", "pt", initial=6, stream=stream, clock=clock)
    clock.now = 2.0
    bar.update(1)
    bar.set_postfix(last="eesd E=4: 3.10 tok/s")
    clock.now = 4.0
    bar.update(1)
    assert stream.getvalue().splitlines() == [
        "latency: 7/10 pt (70%), 0.5 pt/s, ETA 6s",
        "latency: 8/10 pt (80%), 0.5 pt/s, ETA 4s, last eesd E=4: 3.10 tok/s",
    ]


@pytest.mark.parametrize(("seconds", "text"), [(4.2, "4s"), (375, "6m15s"), (7322, "2h02m")])
def test_durations_read_as_a_person_would_write_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_a_terminal_gets_a_bar_a_log_gets_lines_and_no_progress_gets_nothing(monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not isinstance(progress_bar(5, "x", enabled=True), LineProgress)
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert list(track(range(3), "items", "it")) == [0, 1, 2]
    assert log.getvalue().splitlines()[-1].startswith("items: 3/3 it (100%)")
    with progress_bar(3, "quiet", enabled=False) as bar:
        bar.update(3)
    assert "quiet" not in log.getvalue()
    assert progress.INTERVAL_S == 30.0


def test_calibrate_prints_progress_lines_when_stderr_is_not_a_terminal(tiny_config: Path, tmp_path: Path, capsys):
    argv = ["calibrate", "latency", "--model", str(tiny_config), *TINY_LATENCY, "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    total = len(plan_points(Grid((1,), (8,), (1,), (8,)), (False,)))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("latency: ")]
    assert lines and lines[-1].startswith(f"latency: {total}/{total} pt (100%)")
    assert main([*argv, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "latency: " not in capsys.readouterr().err


# ---- a closed pipe ---------------------------------------------------------------------------------------------------
def test_a_reader_that_closes_the_pipe_early_gets_no_traceback(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "executor.cli", "simulate", str(QUICKSTART), "--out", str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    proc.stdout.close()  # before the first line is written, as `| head -0` would
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == SIGPIPE_STATUS
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


# ---- help text and names ---------------------------------------------------------------------------------------------
def test_top_level_help_names_every_method_of_generate(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "generate text with AR, EESD or PPSD" in capsys.readouterr().out


def test_public_class_names_are_unique_across_the_packages() -> None:
    """One vocabulary: a class name means one thing in sim/, executor/ and calibrate/ (a latency grid point is not a
    scenario's sweep point)."""
    defined = collections.defaultdict(list)
    for package in ("sim", "executor", "calibrate"):
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    defined[node.name].append(f"{package}/{path.name}")
    assert {name: files for name, files in defined.items() if len(files) > 1} == {}


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "scenarios/quickstart.yaml", "--no-prog"],
        ["calibrate", "scenario", "--latency", "x", "--acceptance", "y", "--out", "z", "--forc"],
    ],
)
def test_an_abbreviated_flag_is_refused_not_taken_for_the_flag_it_starts(argv: list[str], capsys) -> None:
    """`--source` for `--sources` is a typo that argparse would take silently: every eesd parser refuses it."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
