"""Benchmark (not a test): how fast the serving simulator runs 10,000 requests at up to 64 at once, on one core.

The point is scenarios/serving_h100.yaml's `llama2-7b-alpha0.86` case (the Llama-2-7B shape on an H100, EESD at
E = 16 with fixed:3) with its workload drawn for 10,000 requests at a rate past saturation, so that the batch stays
near 64 for most of the run (the most rows per round, the slowest case per request). AR and EESD are timed on the
same requests; the target is under 60 s each. PPSD, which serves one request at a time (each decode the engine's
PPSD run of that request), is timed on the same requests with the `llama2-7b-ppsd-4gpus-alpha0.8` case (four stages,
a GPU each, the free-running pipe).

    python benchmarks/serving_sim_speed.py            # writes benchmarks/results/serving_sim_speed.json
    python benchmarks/serving_sim_speed.py --requests 2000 --out /tmp/speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import time
from pathlib import Path

from sim.formats import machine_info, write_text_atomic
from sim.serving import load_serving_points, metrics, simulate_serving
from sim.workload import build_workload, parse_spec

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "serving_h100.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "serving_sim_speed.json"
CASE = "llama2-7b-alpha0.86"
PPSD_CASE = "llama2-7b-ppsd-4gpus-alpha0.8"
RATE_PER_S = 24.0
TARGET_S = 60.0


def table(rows: list[dict]) -> str:
    """The rows as a table: wall time per method against the target, and how much the run simulated."""
    from sim.tables import text_table

    columns = ["method", "requests", "max_batch", "wall_s", "within_target", "simulated_tokens_per_wall_s", "rounds",
               "mean_batch", "simulated_time_s"]  # fmt: skip
    heads = {"within_target": f"< {TARGET_S:.0f} s", "simulated_tokens_per_wall_s": "sim tok / wall s",
             "simulated_time_s": "simulated s"}  # fmt: skip
    return text_table(rows, columns, heads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests in the workload (default: 10000)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default: {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args()
    from sim.formats import check_benchmark_args

    check_benchmark_args(args, counts=("requests",))
    loaded = load_serving_points(SCENARIO)
    points = [p for p in loaded if p.case == CASE and p.rate_per_s == RATE_PER_S]
    points.append(next(p for p in loaded if p.case == PPSD_CASE and p.method == "ppsd"))  # its workload replaced
    spec = {
        "requests": args.requests,
        "seed": 0,
        "arrival": {"process": "poisson", "rate_per_s": RATE_PER_S},
        "prompt_len": {"dist": "lognormal", "median": 256, "sigma": 0.8, "min": 16, "max": 2048},
        "output_len": {"dist": "lognormal", "median": 128, "sigma": 0.8, "min": 8, "max": 1024},
    }
    workload = build_workload(parse_spec(spec, "serving_sim_speed"), ROOT, "serving_sim_speed")
    rows = []
    for point in points:
        point = dataclasses.replace(point, workload=workload)
        start = time.perf_counter()
        result = simulate_serving(point)
        wall_s = time.perf_counter() - start
        row = metrics(result)
        rows.append({
            "method": point.method,
            "case": point.case,
            "requests": len(workload.requests),
            "max_batch": point.max_batch,
            "wall_s": round(wall_s, 2),
            "within_target": wall_s < TARGET_S,
            "simulated_tokens": int(row["tokens"]),
            "simulated_tokens_per_wall_s": round(row["tokens"] / wall_s),
            "rounds": result.rounds,
            "mean_batch": round(row["mean_batch"], 2),
            "simulated_time_s": round(result.time_s, 1),
        })  # fmt: skip
        print(f"{point.method}: {len(workload.requests)} requests in {wall_s:.1f} s", flush=True)
    metadata = {
        "scenario": str(SCENARIO.relative_to(ROOT)),
        "case": CASE,
        "ppsd_case": PPSD_CASE,
        "rate_per_s": RATE_PER_S,
        "target_s": TARGET_S,
        "host": platform.node(),
        "python_version": platform.python_version(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": {name: importlib.metadata.version(name) for name in ("simpy", "pydantic")},
    }
    import json

    write_text_atomic(args.out, json.dumps({"metadata": metadata, "rows": rows}, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {args.out}")
    return 0 if all(row["within_target"] for row in rows) else 1


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
