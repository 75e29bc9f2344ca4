"""`eesd calibrate latency|acceptance|link|contention|rounds|host|scenario`: measure the files the simulator reads
(docs/formats.md), (`rounds`) the round costs a Thompson-sampling draft policy weighs on this machine
(`executor.round_costs`), (`host`) the host's work between passes per method (`calibrate.host`), and (`scenario`,
`calibrate.scaffold`) write a scenario that replays a profile and a trace.

`contention` writes a contention profile (`calibrate.contention`): from a `benchmarks/gpu_decode.py` run's PPSD
`streams` rows (no model runs), or, with `--model`, by measuring k PPSD stage processes on this host
(`calibrate.processes`, `--threads` torch threads each).

torch is imported only inside `run`, so `eesd --help` stays fast. A calibration never overwrites a finished file
without `--force` (a latency profile's `*.partial.jsonl` is not one: a rerun continues it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from calibrate import contention
from executor.runtime import add_threads_argument, use_threads
from sim.formats import short_dtype

GRAPH_MODES = {"on": (True,), "off": (False,), "both": (False, True)}
SCENARIO_POLICIES = "fixed:1,fixed:2,fixed:3,beta-ts"  # calibrate.scaffold.DEFAULT_POLICIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="calibration", required=True, metavar="CALIBRATION")
    parsers = (
        (_latency_arguments, "latency", "device time per component, phase, q, context and batch"),
        (_acceptance_arguments, "acceptance", "per-token exit-head agreement with the full model"),
        (_link_arguments, "link", "transfer time vs bytes between two pipeline stages"),
        (_rounds_arguments, "rounds", "an EESD round of k drafts against an AR step: beta-ts:costs=... for --policy"),
        (_host_arguments, "host", "the host's work between passes per AR step, EESD round, PPSD tick; per batch"),
    )
    for add, name, help_text in parsers:
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        add(p)
        p.add_argument("--force", action="store_true", help="overwrite an existing output file")
        if name != "link":  # link times two processes of one thread each and shows no progress
            p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
            add_threads_argument(p)
    help_text = (
        "how k PPSD stage passes computing at once slow each other: streams on one GPU (from a "
        "benchmarks/gpu_decode.py JSON) or stage processes on this CPU host (--model)"
    )
    contention.add_arguments(sub.add_parser("contention", help=help_text, description=help_text, allow_abbrev=False))
    help_text = "a ready-to-run scenario YAML from a latency profile and an acceptance trace (torch-free)"
    _scenario_arguments(sub.add_parser("scenario", help=help_text, description=help_text, allow_abbrev=False))


def _scenario_arguments(p: argparse.ArgumentParser) -> None:
    """`calibrate.scaffold`'s arguments (it is imported only to run: it needs the simulator, a GPU box may not)."""
    p.add_argument("--latency", type=Path, required=True, help="a latency profile (eesd calibrate latency)")
    p.add_argument(
        "--acceptance", type=Path, required=True, nargs="+",
        help="acceptance traces (eesd calibrate acceptance); several: one sweep comparing their heads",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="the scenario YAML to write")
    p.add_argument(
        "--draft-profile", type=Path, default=None,
        help="a latency profile in the trace's draft dtype (a trace of --draft-dtype drafts needs one)",
    )  # fmt: skip
    p.add_argument(
        "--contention", type=Path, default=None,
        help="a contention profile: PPSD streams on a GPU, or stage processes on a CPU (with --link)",
    )  # fmt: skip
    p.add_argument(
        "--link", type=Path, default=None,
        help="a link profile: PPSD's points again on a process per stage (the distributed backend) over it",
    )  # fmt: skip
    p.add_argument("--methods", default="eesd", help="eesd and/or ppsd, comma-separated, besides AR (default: eesd)")
    policies = f"EESD draft policies, comma-separated (default: {SCENARIO_POLICIES})"
    p.add_argument("--policies", default=SCENARIO_POLICIES, help=policies)
    p.add_argument("--name", default=None, help="the scenario's name, its results' folder under runs/ (default: the "
                   "--out file's name without .yaml)")  # fmt: skip
    p.add_argument(
        "--serving", action="store_true",
        help="write a serving scenario (eesd serve-sim): AR against EESD under Poisson load, rates from AR's own pace",
    )  # fmt: skip
    p.add_argument(
        "--host", type=Path, default=None,
        help="each method's host work between passes (eesd calibrate host --out): latency.profile.host_work",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")


def _latency_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="packaged name, HF directory, .gguf, CONFIG.json or a sim shape")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument(
        "--dtype", type=short_dtype, default=None, help="bf16 | fp16 | fp32 (default: bf16 on cuda, fp32 on cpu)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (file: latency_<model>_<device>_<dtype>[_compiled].csv)"
    )
    p.add_argument("--q", default=None, help="verify q grid, e.g. 1,2,4,8 (default: by device)")
    p.add_argument("--context", default=None, help="context-length grid (default: by device)")
    p.add_argument("--batch", default=None, help="batch grid (default: by device)")
    p.add_argument("--prefill", default=None, help="prompt-length grid for prefill (default: by device)")
    p.add_argument("--graphs", default=None, choices=sorted(GRAPH_MODES),
                   help="CUDA graphs (default: both on cuda; on with compiled kernels)")  # fmt: skip
    p.add_argument(
        "--kernels", default="auto", choices=("auto", "eager", "compiled", "frozen"),
        help="layers as capture='graph' runs them (eager), fused and torch.compiled as capture='compile-layers' "
        "(compiled; file name ends _compiled), or compiled with the weights frozen in as the CPU's capture='freeze' "
        "(frozen; file name ends _frozen); auto: what capture='auto' runs on the device (default)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first, >= 1 (default: 3 cpu, 5 cuda)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (default: 7 cpu, 20 cuda)")
    p.add_argument(
        "--visits", type=int, default=1,
        help="time the whole grid this many times over; a point's median is its visits' median (default: 1; a "
        "shared box whose speed drifts: 3, with --repeats 3 --warmup 1)",
    )  # fmt: skip
    p.add_argument("--layers", type=int, default=None, help="keep this many layers of a config/shape model")
    p.add_argument("--max-new-points", type=int, default=None, help="stop after N measurements (rerun continues)")


def _acceptance_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="packaged name, HF directory or .gguf (real weights)")
    p.add_argument("--head", default="shared", help="exit head: shared | shared:N | a head file (default: shared)")
    p.add_argument("--exit-layers", required=True, help="comma-separated exit layers, e.g. 4,8,15,22")
    p.add_argument("--prompts", default="builtin", help="builtin | requests | humaneval | FILE.jsonl")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (default: all)")
    p.add_argument(
        "--split", choices=("all", "train", "held-out"), default="all",
        help="the prompt set's split (executor.prompts.split_prompts, as train-head uses): held-out keeps prompts a "
        "trained or subset head never saw (default: all); --num-prompts then takes the first N of it",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default: 64)")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="keep the last N prompt tokens")
    p.add_argument("--batch", type=int, default=8, help="prompts generated together (greedy; default: 8)")
    p.add_argument("--check-prompts", type=int, default=3, help="prompts re-run with real EESD to check the trace")
    p.add_argument("--check-draft-len", type=int, default=4, help="draft_len of the check runs")
    p.add_argument(
        "--check", default="auto", choices=("auto", "strict", "report"),
        help="strict: any disagreement is an error; report: record how many runs agree (auto: strict in fp32/fp64, "
        "report in bf16/fp16, whose batched passes round differently)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--dtype", type=short_dtype, default="fp32", help="bf16 | fp16 | fp32 (default: fp32)")
    p.add_argument(
        "--draft-dtype", type=short_dtype, default=None,
        help="the heads on copies of layers [0, E) in this narrower dtype, as generate's draft_dtype (recorded in the "
        "file; checked as a report)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output CSV (eesd.acceptance_trace)")


def _host_arguments(p: argparse.ArgumentParser) -> None:
    from calibrate.host import add_arguments

    add_arguments(p)


def _rounds_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="packaged name, HF directory or .gguf")
    p.add_argument("--head", default="shared", help="exit head: shared | shared:N | a head file (default: shared)")
    p.add_argument("--exit-layer", type=int, default=None, help="exit layer E (default: a head file's, else L / 2)")
    p.add_argument("--max-draft-len", type=int, default=8, help="rounds of 0 .. this many drafts (default: 8)")
    p.add_argument("--context", type=int, default=128, help="the position the rounds run at (default: 128)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument(
        "--dtype", type=short_dtype, default=None, help="bf16 | fp16 | fp32 (default: bf16 on cuda, fp32 on cpu)"
    )
    p.add_argument(
        "--draft-dtype", type=short_dtype, default=None, help="drafts in this narrower dtype, as generate's draft_dtype"
    )
    p.add_argument("--capture", default="auto", help="the passes generate would run: auto | none | graph | ... ")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per draft count, interleaved (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per draft count first (default: 1)")
    p.add_argument("--out", type=Path, default=None, help="also write them to this JSON file (eesd.round_costs)")


def _link_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output CSV (eesd.link_profile)")
    p.add_argument("--backend", default="gloo", help="gloo (2 CPU processes) | nccl | cuda-copy (2 GPUs)")
    p.add_argument("--model", default=None, help="add this model's activation sizes (hidden × tokens × dtype)")
    p.add_argument(
        "--dtype", type=short_dtype, default="bf16", help="element size for --model's activation sizes (default: bf16)"
    )
    p.add_argument("--sizes", default=None, help="bytes to time, comma-separated (default: 8 B, 256 B .. 16 MiB)")
    p.add_argument("--warmup", type=int, default=3, help="untimed messages per size first (default: 3)")
    p.add_argument("--repeats", type=int, default=20, help="timed messages per size (default: 20)")
    p.add_argument(
        "--busy-ms", type=float, default=0.0,
        help="gloo: both ranks compute this long before each message, as PPSD's distributed ranks run a stage pass "
        "between a tick's messages (default: 0, back to back)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.calibration == "contention":
        return contention.run(args)
    if args.calibration == "scenario":
        from calibrate.scaffold import run as run_scaffold

        return run_scaffold(args)
    if args.calibration == "link":
        from calibrate.link import run_link_cli

        return run_link_cli(args)
    print(f"calibrate {args.calibration}: {use_threads(args.threads)}", flush=True)
    if args.calibration == "latency":
        from calibrate.latency_cli import run_latency

        return run_latency(args, not args.no_progress)
    if args.calibration == "rounds":
        from calibrate.rounds_cli import run_rounds

        return run_rounds(args)
    if args.calibration == "host":
        from calibrate.host import run_host

        return run_host(args)
    from calibrate.acceptance_cli import run_acceptance

    return run_acceptance(args, not args.no_progress)
