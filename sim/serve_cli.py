"""`eesd serve-sim SCENARIO.yaml [--out DIR] [--jobs N] [--refine N]`: simulate serving under load (torch-free).

Reads a serving scenario (`sim.serving`), simulates every case x rate x method, prints a table and the rate where
speculation stops paying and up to which rate each method holds the SLO (with `--refine N`, after N rounds of
bisection of the swept rates around each), and writes `serving.csv`, `speculation.csv`, `capacity.csv` and plots
(`sim.serving_report`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sim.cli import check_jobs, output_folder
from sim.formats import check_output, remove_stale
from sim.runner import extrapolation_note, plots_available
from sim.serving import load_serving_points, points_at_rates, read_serving
from sim.serving_report import (
    capacity,
    refinements,
    run_notes,
    run_serving,
    saturation_note,
    stop_paying,
    summary_table,
    write_json,
    write_outputs,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", type=Path, help="serving scenario YAML (see scenarios/serving_*.yaml)")
    parser.add_argument("--out", default=None, help="output folder, created if missing (default: runs/<scenario name>)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes (0: one per CPU; default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's row and the crossings as JSON")
    parser.add_argument(
        "--refine", type=int, default=0, metavar="N",
        help="N rounds of bisection around each crossing (where speculation stops paying, where the SLO stops "
        "holding): each round simulates the middle rate of every bracket of swept rates around one, halving it "
        "(default: 0, the swept rates only)",
    )  # fmt: skip


def capacity_line(item: dict) -> str:
    """One line on how far a method holds the SLO (`sim.serving_report.capacity`)."""
    bounds = [f"{name} <= {item[key]:g} ms" for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms")) if item[key]]
    slo = f"{item['attainment_pct']:g}% of requests within {' and '.join(bounds)}"
    where = f"case {item['case']}: " if item["case"] else ""
    rate = item["capacity_rps"]
    if rate == "never":
        return f"{where}{item['method']} misses the SLO ({slo}) at every rate swept"
    if rate == "":
        return f"{where}{item['method']} holds the SLO ({slo}) at every rate swept"
    devices = item["devices"]
    per_device = f"{item['capacity_rps_per_device']:.3g} per device on {devices} device{'s' if devices > 1 else ''}"
    return f"{where}{item['method']} holds the SLO ({slo}) up to about {rate:.3g} requests/s, {per_device}"


def refine(scenario: Path, runs: list, rounds: int, jobs: int, progress: bool, raw: dict | None = None) -> list:
    """`--refine`: `rounds` of bisection of every bracket of rates around a crossing (`refinements`) of the scenario
    (its data `raw` as read for the sweep, so that every round runs the file the sweep ran); the runs, new ones among
    them, in the scenario's order of cases and methods, by rate."""
    added = 0
    for _ in range(rounds):
        wanted = refinements(runs)
        points = [point for case, by_rate in wanted.items()
                  for point in points_at_rates(scenario, case, sorted({m for ms in by_rate.values() for m in ms}),
                                               list(by_rate), raw)
                  if point.method in by_rate[point.rate_per_s]]  # fmt: skip
        if not points:
            break
        runs = runs + run_serving(points, jobs=jobs, progress=progress)
        added += len(points)
    if rounds:
        print(f"--refine {rounds}: {added} more run(s) at rates between the swept ones, around the crossings")
    cases = list(dict.fromkeys(run.point.case for run in runs))
    methods = list(dict.fromkeys(run.point.method for run in runs))
    return sorted(runs, key=lambda run: (cases.index(run.point.case), run.point.rate_per_s or 0.0,
                                         methods.index(run.point.method)))  # fmt: skip


def run(args: argparse.Namespace) -> int:
    jobs = check_jobs(args.jobs)
    if args.refine < 0:
        raise ValueError(f"--refine must be a number of bisection rounds >= 0, got {args.refine}")
    if args.json is not None:
        check_output("--json", args.json)
    raw = read_serving(args.scenario)
    points = load_serving_points(args.scenario, raw)
    out_dir = output_folder(args.out, Path("runs") / args.scenario.stem)
    counts = sorted({len(point.workload.requests) for point in points})
    each = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    print(f"{args.scenario}: {len(points)} serving run(s), {each} requests each")
    runs = run_serving(points, jobs=jobs, progress=not args.no_progress)
    runs = refine(args.scenario, runs, args.refine, jobs, not args.no_progress, raw)
    print(summary_table(runs))
    for item in stop_paying(runs):
        stop = item["stop_rate_per_s"]
        where = f"case {item['case']}: " if item["case"] else ""
        if stop == "never":
            print(f"{where}{item['method']} never pays against ar at the rates swept (mean end-to-end latency)")
        elif stop is None:
            print(f"{where}{item['method']} pays against ar at every rate swept (mean end-to-end latency)")
        else:
            print(f"{where}{item['method']} stops paying against ar at about {stop} requests/s")
    for item in capacity(runs):
        print(capacity_line(item))
    written = write_outputs(runs, out_dir)
    for path in written:
        print(f"wrote {path}")
    for path in remove_stale(out_dir, "serve-sim", written):
        print(f"removed {path} (the last run's here, not written by this one)")
    if args.json is not None:
        print(f"wrote {write_json(args.json, args.scenario, runs, args.refine)}")
    if not plots_available():
        print('note: no plots (matplotlib is not installed: pip install -e ".[plots]")')
    for line in run_notes(runs):
        print(f"note: {line}")
    if not any(run.point.rate_per_s is not None for run in runs):
        print("note: no serving.rates_per_s sweep, so no speculation.csv or capacity.csv (where speculation stops "
              "paying, and up to which rate the SLO holds, need a swept Poisson or Gamma rate)")  # fmt: skip
    for note in (saturation_note(runs), extrapolation_note(runs)):
        if note:
            print(f"note: {note}")
    return 0
