"""Benchmark (not a test): the simulator's predicted decode tokens/s vs what the executor measures, on this CPU.

A thin wrapper over `eesd validate` (calibrate/validate.py) on scenarios/smollm2_cpu_calibrated.yaml (SmolLM2-135M
fp32, latency profile measured on this CPU, shared-head acceptance trace over the built-in prompts): AR and every
swept exit layer and draft length, the executor on the same prompts as the trace replay (request r replays the r-th
prompt in sorted id order), with one torch thread as in the profile. Decode tokens/s excludes prefill on both sides:
(new tokens - 1) / (wall time - prefill time). Exit status as `eesd validate` (1: a point off by more than 25%).

    python benchmarks/sim_vs_executor.py             # writes benchmarks/results/sim_vs_executor_cpu.json
    python benchmarks/sim_vs_executor.py --quick     # two prompts, AR and E=22 fixed:4, no file unless --out
    python benchmarks/sim_vs_executor.py --compiled  # scenarios/smollm2_cpu_compiled.yaml: a profile of compiled
                                                     # layers, the executor with capture="compile-layers"
                                                     # (writes benchmarks/results/sim_vs_executor_compiled_cpu.json)
    python benchmarks/sim_vs_executor.py --wide      # scenarios/smollm2_cpu_validate.yaml: AR and EESD at batch 1
                                                     # and 4, PPSD sequential and distributed; 4 prompts x 32 tokens,
                                                     # 3 repeats interleaved, tolerance 10% (writes
                                                     # benchmarks/results/sim_vs_executor_wide_cpu.json)
    python benchmarks/sim_vs_executor.py --wide --recalibrate  # the scenario's latency profile measured again first,
                                                     # in place (same model, dtype, grid and threads), then validated

`--recalibrate` is for a box whose speed drifts (a shared VM): a profile from another day predicts another machine.
It rewrites the committed profile file (atomically, as `eesd calibrate latency --force` does): commit it with the
result, or `git checkout` it back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from calibrate.common import DTYPE_NAMES
from executor.cli import main as eesd
from sim.formats import latency_profile_name, read_latency_profile

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "smollm2_cpu_calibrated.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "sim_vs_executor_cpu.json"
COMPILED = (ROOT / "scenarios" / "smollm2_cpu_compiled.yaml", RESULTS.with_name("sim_vs_executor_compiled_cpu.json"))
WIDE = (ROOT / "scenarios" / "smollm2_cpu_validate.yaml", RESULTS.with_name("sim_vs_executor_wide_cpu.json"))
WIDE_ARGS = ["--prompts", "4", "--max-new-tokens", "32", "--repeats", "3", "--tolerance", "0.1"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two prompts, AR and the scenario's own point")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON output (default: {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--compiled", action="store_true", help="the compiled layers' profile and capture mode")
    parser.add_argument("--wide", action="store_true", help="batches and PPSD: scenarios/smollm2_cpu_validate.yaml")
    parser.add_argument("--points", default=None, help="which points (as `eesd validate --points`)")
    parser.add_argument("--recalibrate", action="store_true", help="measure the scenario's latency profile again first")
    args = parser.parse_args()
    scenario, results = COMPILED if args.compiled else WIDE if args.wide else (SCENARIO, RESULTS)
    if args.recalibrate:
        status = eesd(recalibrate_argv(scenario, threads=1))
        if status:
            return status
    argv = ["validate", str(scenario), "--threads", "1", *(WIDE_ARGS if args.wide else [])]
    if args.points:
        argv += ["--points", args.points]
    if args.quick:
        argv += ["--prompts", "2", "--points", "quick"]
    out = args.out or (None if args.quick else results)
    if out is not None:
        argv += ["--json", str(out)]
    return eesd(argv)


def recalibrate_argv(scenario: Path, threads: int, visits: int | None = None) -> list[str]:
    """`eesd calibrate latency` arguments that measure the scenario's latency profile again, in place: its model,
    device, dtype, kernels, grid, warm-up, repeats and visits, with `threads` torch threads; `visits` N instead
    times it in N visits of 3 repeats after 1 warm-up call (`calibrate.latency`)."""
    data = yaml.safe_load(scenario.read_text())
    path = (scenario.parent / data["latency"]["profile"]["path"]).resolve()
    meta = read_latency_profile(path).metadata
    short = {name: short for short, name in DTYPE_NAMES.items()}  # "float32" -> "fp32"
    grid, kernels, dtype = meta["grid"], meta.get("kernels", "eager"), short[meta["dtype"]]
    if latency_profile_name(meta["model"], meta["device_type"], dtype, kernels) != path.name:
        raise SystemExit(f"{path}: calibrate latency would write another file name; rename the profile first")
    joined = {key: ",".join(str(v) for v in grid[key]) for key in ("q", "context_len", "batch", "prefill_q")}
    timing = (meta["warmup"], meta["repeats"], meta.get("visits", 1)) if visits is None else (1, 3, visits)
    return [
        "calibrate", "latency", "--model", meta["model"], "--device", meta["device_type"],
        "--dtype", dtype, "--threads", str(threads), "--q", joined["q"],
        "--context", joined["context_len"], "--batch", joined["batch"], "--prefill", joined["prefill_q"],
        "--warmup", str(timing[0]), "--repeats", str(timing[1]), "--visits", str(timing[2]),
        *(["--kernels", kernels] if kernels != "eager" else []), "--out", str(path.parent), "--force",
    ]  # fmt: skip


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
