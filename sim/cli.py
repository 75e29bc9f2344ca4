"""`eesd simulate SCENARIO.yaml [--out DIR] [--jobs N]`: validate, run, print a summary, write outputs.

Torch-free. Scenario mistakes raise `ScenarioError` (a `ValueError`), which the dispatcher prints as one line with
exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sim.formats import quote
from sim.runner import plots_available, run_points, summary_table, write_outputs
from sim.scenario import load_points


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", type=Path, help="scenario YAML (see scenarios/)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder, created if missing (default: runs/<scenario name>)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes for sweeps (0: one per CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines for sweeps")
    parser.add_argument("--trace", action="store_true", help="write a Chrome trace per run (default: single runs)")


def run(args: argparse.Namespace) -> int:
    points = load_points(args.scenario)
    scenario = points[0].scenario
    jobs = args.jobs if args.jobs > 0 else (os.cpu_count() or 1)
    out_dir = args.out or Path("runs") / scenario.name  # the name is one folder name (sim.scenario)
    check_out_dir(out_dir)
    print(f"{scenario.name}: {len(points)} run(s){' — ' + scenario.description if scenario.description else ''}")
    progress = not args.no_progress
    results = run_points(points, jobs=jobs, progress=progress, trace=True if args.trace else None)
    print(summary_table(results))
    for path in write_outputs(results, out_dir):
        print(f"wrote {path}")
    if len(points) > 1 and not plots_available():
        print('note: no speedup plots (matplotlib is not installed: pip install -e ".[plots]")')
    for note in dict.fromkeys(note for r in results for note in r.notes):
        print(f"note: {note}")
    if any(r.result.extrapolated for r in results):
        print("note: some latencies were extrapolated beyond the profiled grid (column 'extrapolated')")
    return 0


def check_out_dir(out_dir: Path) -> None:
    """Before anything runs: the output folder is a folder, or one can be made there (its nearest existing parent is a
    folder); a ValueError naming `--out` otherwise."""
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir}: is a file; --out names the folder the outputs are written into")
        parent = next((p for p in out_dir.parents if p.exists()), None)
    except OSError as err:  # a name too long, a folder that cannot be read
        raise ValueError(f"--out {quote(str(out_dir))}: not a folder one can write to ({err.strerror})") from None
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out_dir}: {parent} is a file, so the output folder cannot be made inside it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eesd simulate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"eesd simulate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
