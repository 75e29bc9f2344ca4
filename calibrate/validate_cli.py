"""`eesd validate SCENARIO.yaml`: does the simulator predict what the executor measures on this machine?

Runs the executor and the simulator for every configuration of a calibrated scenario (method, exit layer, draft
policy, batch size, PPSD backend and stages), plus AR, on the prompts the scenario's acceptance trace replays
(calibrate/validate.py), the executor `--repeats` times interleaved (in `--processes` fresh processes, pooled),
prints a table (median tokens/s, run-to-run spread, errors), optionally writes JSON, and exits with status 1 when a
point's tokens/s or tokens/round error exceeds `--tolerance` (0 otherwise).
Scenario and argument mistakes exit with status 2 (a `ValueError` for the dispatcher). torch is imported only in
`run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from calibrate.validate import POINT_CHOICES
from executor.runtime import add_threads_argument, check_threads, threads_in, use_threads
from sim.formats import check_output
from sim.progress import Progress, progress_bar


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "scenario", type=Path, help="scenario YAML with latency.profile and acceptance.trace measured on this machine"
    )
    parser.add_argument("--prompts", type=int, default=None, help="requests (prompts) per point (default: scenario's)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="tokens per request (default: workload.output_len)"
    )
    parser.add_argument("--points", default="all", help=f"which points: {POINT_CHOICES} (default: all); AR always")
    parser.add_argument(
        "--model",
        default=None,
        help="the calibration files' model at this machine's path (default: the path they name)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.25, help="largest |relative error| that passes (default: 0.25 = 25%%)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="executor runs per point, interleaved across points (default: 1)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the repeats in this many fresh processes one after another, pooled (default: 1, this one): a frozen "
        "CPU pass runs at its own speed in each process",
    )
    add_threads_argument(parser, preferred="the CPU profile's")
    parser.add_argument("--json", type=Path, default=None, help="write the comparison as JSON here (atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def run(args: argparse.Namespace) -> int:
    from calibrate import validate

    validate.check_tolerance(args.tolerance)
    check_threads(args.threads)
    validate.check_processes(args.processes)
    if args.json is not None:
        check_output("--json", args.json)
    plan = validate.plan(args.scenario, args.prompts, args.max_new_tokens, args.points, args.model)
    print(
        f"{plan.name}: {len(plan.targets)} configuration(s) (AR's included) × {len(plan.prompt_ids)} prompt(s) × "
        f"{plan.max_new_tokens} tokens, model {plan.model} ({plan.dtype}, {plan.device_type}), head {plan.head}"
    )
    print(f"profile: {plan.profile_path} ({plan.profile_device})\ntrace:   {plan.trace_path}")
    if plan.host_work_path is not None:
        print(f"host:    {plan.host_work_path} (each method's host work between passes)")
    print(use_threads(args.threads, default=threads_in(plan.profile_device)), flush=True)
    runs = len(plan.targets) * args.repeats * args.processes
    with progress_bar(runs, "validate", "run", not args.no_progress) as bar:
        report_run = lambda message: _measured(bar, message)  # noqa: E731
        if args.processes == 1:
            measured, metadata = validate.measure(plan, progress=report_run, repeats=args.repeats)
        else:
            import torch

            request = {"scenario_path": str(args.scenario), "prompts": args.prompts, "points": args.points,
                       "max_new_tokens": args.max_new_tokens, "model": args.model}  # fmt: skip
            measured, metadata = validate.measure_in_processes(
                request, args.processes, torch.get_num_threads(), report_run, args.repeats
            )
    if metadata["device"] != plan.profile_device:
        print(f"note: this machine is {metadata['device']}; the profile was measured on {plan.profile_device}")
    comparisons = validate.compare(plan, measured)
    print(validate.table(comparisons, args.tolerance))
    if any(c.extrapolated for c in comparisons):
        asked = list(dict.fromkeys(e for c in comparisons for e in c.extrapolations))
        shown = "; ".join(asked[:6]) + (f"; {len(asked) - 6} more" if len(asked) > 6 else "")
        print("* a latency query fell outside the profiled grid (extrapolated)" + (f": {shown}" if asked else ""))
    if any(c.method == "ppsd" and " b=" in c.label for c in comparisons):
        print("/tick: a PPSD batch's tokens a tick, every row's (through n stages without drafts: batch / n); "
              "tok/round elsewhere is a row's")  # fmt: skip
    if any(c.short for c in comparisons):
        print(f"~ a run decodes for under {validate.SHORT_RUN_S} s: a few slow steps move its rate (more --prompts "
              "make it longer; a batch point runs its prompts in batches)")  # fmt: skip
    if any(c.noisy(args.tolerance) for c in comparisons):
        print("! the repeats spread wider than the tolerance: that point's error cannot be told from noise")
    for note in validate.other_work_notes(metadata, len(comparisons)):
        print(f"note: {note}")
    from calibrate.common import OTHER_WORK_NOTE_CORES

    profiled = plan.profile_conditions.get("other_work_cores")
    if profiled is not None and profiled >= OTHER_WORK_NOTE_CORES:
        print(f"note: other work used {profiled:.2f} cores while the profile was measured: its latencies are that "
              "shared box's")  # fmt: skip
    notes = validate.simulator_notes(plan)
    for note in notes:
        print(f"note (simulator): {note}")
    if args.json is not None:
        document = validate.report(plan, comparisons, args.tolerance, metadata, notes=notes)
        path = validate.write_json(args.json, document)
        print(f"wrote {path}")
    failed = validate.failures(comparisons, args.tolerance)
    within = len(comparisons) - len(failed)
    print(f"{within}/{len(comparisons)} points within ±{100 * args.tolerance:g}% (tokens/s and tokens/round)")
    return 1 if failed else 0


def _measured(bar: Progress, message: str) -> None:
    """One target measured (`message`: its label and tokens/s) shows in the next progress line."""
    bar.set_postfix(last=message)
    bar.update(1)
