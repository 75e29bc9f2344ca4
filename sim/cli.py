"""`eesd simulate SCENARIO.yaml [--out DIR] [--jobs N] [--break-even [TARGET]]`: validate, run, print a summary,
write outputs; with `--break-even`, the acceptance each point needs to match AR (`sim.break_even`).

Torch-free. Scenario mistakes raise `ScenarioError` (a `ValueError`), which the dispatcher prints as one line with
exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sim.formats import check_output, remove_stale
from sim.runner import (
    default_exit_note,
    extrapolation_note,
    fastest,
    map_points,
    plots_available,
    run_points,
    summary_table,
    verdict,
    write_outputs,
    write_rows_csv,
)
from sim.scenario import Point, ScenarioError, load_points, read_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", type=Path, help="scenario YAML (see scenarios/)")
    parser.add_argument("--out", default=None, help="output folder, created if missing (default: runs/<scenario name>)")
    parser.add_argument("--jobs", type=int, default=1, help="processes for sweeps (0: one per CPU; default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines for sweeps")
    parser.add_argument("--trace", action="store_true", help="write a Chrome trace per run (default: single runs)")
    parser.add_argument(
        "--break-even", type=float, nargs="?", const=1.0, default=None, metavar="TARGET",
        help="also find, for every EESD / PPSD point, the i.i.d. acceptance at which it reaches TARGET x AR "
        "(default 1.0), and its speedup at acceptance 1 (writes break_even.csv)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.break_even is not None and not 0 < args.break_even <= 100:  # before anything runs
        raise ValueError(f"--break-even: expected a target speedup over AR in (0, 100], got {args.break_even:g}")
    jobs = check_jobs(args.jobs)
    points = load_batch_points(args.scenario)
    scenario = points[0].scenario
    out_dir = output_folder(args.out, Path("runs") / scenario.name)  # the name is one folder name (sim.scenario)
    print(f"{scenario.name}: {len(points)} run(s){' — ' + scenario.description if scenario.description else ''}")
    progress = not args.no_progress
    results = run_points(points, jobs=jobs, progress=progress, trace=True if args.trace else None)
    print(summary_table(results))
    if any(r.result.method == "ppsd" for r in results):
        print("(tok/round: a row's tokens a round; EESD, accepted + 1; PPSD, a flush-free run of the pipe)")
    said = verdict(results)
    if said:
        print(said)
    for line in fastest(results):
        print(line)
    for note in dict.fromkeys(note for r in results for note in r.notes):  # beside the table they qualify
        print(f"note: {note}")
    for note in (extrapolation_note(results), default_exit_note(results)):
        if note:
            print(f"note: {note}")
    written = write_outputs(results, out_dir)
    for path in written:
        print(f"wrote {path}")
    if len(points) > 1 and not plots_available():
        print('note: no speedup plots (matplotlib is not installed: pip install -e ".[plots]")')
    if args.break_even is not None:
        written += _break_even(points, args.break_even, out_dir, jobs)
    for path in remove_stale(out_dir, "simulate", written):
        print(f"removed {path} (the last run's here, not written by this one)")
    return 0


def _break_even(points: list, target: float, out_dir: Path, jobs: int) -> list[Path]:
    """`--break-even`: the acceptance each EESD / PPSD point needs (`sim.break_even`), as a table and a CSV (and a
    plot); returns the files written."""
    from sim.break_even import break_even, falling_notes, plot, rows, table

    found = [item for item in map_points(break_even, points, jobs, target) if item is not None]
    if not found:
        print("note: --break-even: no EESD or PPSD point (AR needs no acceptance)")
        return []
    print(f"\nbreak-even: the least i.i.d. acceptance each point needs for {target:g}x AR on its hardware")
    print(table(found, target))
    for note in falling_notes(found):
        print(note)
    written = [write_rows_csv(rows(found, target), out_dir / "break_even.csv")]
    if plots_available():
        written.append(plot(found, target, out_dir / "break_even.png"))
    for path in written:
        print(f"wrote {path}")
    if any(item.sharpness is not None for item in found):
        print("note: --break-even: policies that read confidences drew them calibrated (confidence_sharpness)")
    return written


def output_folder(given: str | Path | None, default: Path) -> Path:
    """`--out` as given (an empty path is refused: it is no folder) or `default`, checked (`sim.formats.check_output`)
    and made once before anything runs (a folder the system will not make, as under /proc, fails here, not after the
    run); what was made is removed again until the outputs are written, so an interrupted run leaves no empty
    folder."""
    if given is not None and not str(given).strip():
        raise ValueError("--out: expected a folder, got an empty path")
    out_dir = Path(given) if given is not None else default
    check_output("--out", out_dir, folder=True)
    missing = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]  # the deepest first
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out_dir}: the folder cannot be made ({err.strerror or err})") from None
    for folder in missing:
        folder.rmdir()
    return out_dir


def check_jobs(jobs: int) -> int:
    """`--jobs`: the processes to run, 0 meaning one per CPU."""
    if jobs < 0:
        raise ValueError(f"--jobs must be >= 1, or 0 for one per CPU, got {jobs}")
    return jobs if jobs > 0 else (os.cpu_count() or 1)


def load_batch_points(path: Path) -> list[Point]:
    """`load_points`, but a serving scenario (one with a top-level `serving:` section) is told to run `eesd serve-sim`
    instead of being refused field by field."""
    try:
        return load_points(path)
    except ScenarioError:
        if is_serving_scenario(path):
            raise ScenarioError(
                f"{path}: this is a serving scenario (a serving: section): run eesd serve-sim {path}"
            ) from None
        raise


def is_serving_scenario(path: Path) -> bool:
    """Whether `path` reads as a YAML mapping with a top-level `serving:` key (False where it does not read)."""
    try:
        data = read_yaml(path)
    except (ValueError, OSError):
        return False
    return isinstance(data, dict) and "serving" in data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eesd simulate", description=__doc__.splitlines()[0], allow_abbrev=False)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"eesd simulate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
