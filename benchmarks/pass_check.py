"""Benchmark (not a test): the executor's whole EESD passes against what a latency profile's components price them at.

The simulator prices a draft step as E layers + the exit head, a verify pass after k drafts as layers [0, E) for the
last draft, [E, L) for k + 1 tokens and the LM head over them, each from the profile's per-component rows. This
times the executor's own passes (`Passes.ar`, `.draft`, `.verify`, as `executor.round_costs` runs them: uncaptured
here) at one context, interleaved, and sets each beside the profile's price, both relative to the AR step (so a box
running faster or slower than when it was profiled cancels out):

    python benchmarks/pass_check.py --profile calibration/cpu/latency_smollm2-135m_cpu_fp32.csv --exit-layer 15 \\
        --repeats 15 --out benchmarks/results/pass_check_smollm2-135m_e15_eager_cpu.json

Prints a table (ms, ratio to AR measured / priced) and writes JSON with the machine, versions, date and command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_breakdown import add_pricing_arguments, gap_row, pricer  # noqa: E402
from head_speed import environment, write_json  # noqa: E402


def priced_ms(profile: Path, model: str, exit_layer: int, context: int, max_k: int) -> dict[str, float]:
    """The profile's price of each pass (ms), as the simulator costs it (`sim.cost`), the shared exit head."""
    price = pricer(profile, model, exit_layer, context, 16)
    priced = {"ar": price("ar", 0, context), "draft": price("draft", 0, context)}
    for k in range(1, max_k + 1):
        priced[f"verify k={k}"] = price("verify", k, context + k)
    return priced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pricing_arguments(parser)
    parser.add_argument("--context", type=int, default=152)
    parser.add_argument("--max-k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from sim.formats import check_benchmark_args

    check_benchmark_args(args, inputs=("profile",), counts=("repeats",))

    import torch

    import executor
    from executor.adapter import ModelAdapter
    from executor.api import PassSetup
    from executor.heads import resolve_head
    from executor.sampling import SamplingConfig
    from sim.policy import FixedPolicy

    torch.set_num_threads(args.threads)
    adapter = ModelAdapter(executor.load_model(args.model))
    at, exit_layer, max_k = args.context, args.exit_layer, args.max_k
    head = resolve_head("shared", adapter, exit_layer)
    setup = PassSetup("eesd", SamplingConfig(), 0, [], exit_layer, head, [FixedPolicy(max_k)], "none", None, True)
    with torch.inference_mode():
        passes = setup.passes(adapter, [[0] * at], max_k + 4)

        def timed(fn: Any) -> float:
            begin = time.perf_counter()
            fn()
            return (time.perf_counter() - begin) * 1e3

        def ar() -> float:
            passes.load([0], [at], 1)
            return timed(lambda: passes.ar(at))

        def draft() -> float:
            passes.load([0], [at], 1)
            return timed(lambda: passes.draft(at))

        def verify(k: int) -> Any:
            def run() -> float:
                passes.load([0], [at], 1)
                passes.set_counts([k])
                for j in range(k):
                    passes.draft(at + j)
                return timed(lambda: passes.verify(k, at + k))  # over at .. at + k, where the drafts left it

            return run

        calls = {"ar": ar, "draft": draft, **{f"verify k={k}": verify(k) for k in range(1, max_k + 1)}}
        for call in calls.values():
            call(), call()
        runs: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):  # interleaved: a drifting box moves every pass alike
            for name, call in calls.items():
                runs[name].append(call())
    measured = {name: statistics.median(values) for name, values in runs.items()}
    priced = priced_ms(args.profile, args.sim_model, exit_layer, at, max_k)
    rows = []
    print(f"{'pass':<12} {'measured ms':>12} {'priced ms':>10} {'/AR meas':>9} {'/AR priced':>10} {'gap':>7}")
    for name in calls:
        row = gap_row(name, measured[name], priced[name], measured["ar"], priced["ar"])
        print(f"{name:<12} {measured[name]:>12.2f} {priced[name]:>10.2f} {row['measured_over_ar']:>9.3f} "
              f"{row['priced_over_ar']:>10.3f} {row['gap']:>+7.1%}")  # fmt: skip
        spread = (max(runs[name]) - min(runs[name])) / measured[name]
        rows.append({**row, "spread": round(spread, 3), "runs_ms": [round(v, 3) for v in runs[name]]})
    if args.out:
        result = {**environment(args.threads), "profile": str(args.profile), "model": args.model,
                  "exit_layer": exit_layer, "context": at, "repeats": args.repeats, "capture": "none",
                  "gap": "(measured / AR) / (priced / AR) - 1", "rows": rows}  # fmt: skip
        print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
