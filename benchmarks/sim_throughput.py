"""Simulator throughput: simulated tokens per second of wall time, one process (= one core).

Cases: 4-stage PPSD and single-GPU EESD (fixed:4 and beta-ts), Llama-2-7B shape on H100 roofline latencies,
batch 1 and 8. Prints a table and writes JSON with the date, versions and machine.

    python benchmarks/sim_throughput.py [--tokens 20000] [--out benchmarks/results/sim_throughput_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from sim.engine import Simulation
from sim.plan import build_plan
from sim.scenario import Point, validate

CASES = {
    "ppsd 4 stages, alpha 0.8, batch 1": {"method": "ppsd", "topology": {"stages": 4}, "batch": 1},
    "ppsd 4 stages, alpha 0.8, batch 8": {"method": "ppsd", "topology": {"stages": 4}, "batch": 8},
    "eesd fixed:4, alpha 0.8, batch 1": {"method": "eesd", "policy": "fixed:4", "batch": 1},
    "eesd beta-ts, alpha 0.8, batch 1": {"method": "eesd", "policy": "beta-ts", "batch": 1},
    "eesd fixed:4, alpha 0.8, batch 8": {"method": "eesd", "policy": "fixed:4", "batch": 8},
    "ar 4 stages, batch 1": {"method": "ar", "topology": {"stages": 4}, "batch": 1},
}


def make_point(case: dict, tokens: int) -> Point:
    batch = case["batch"]
    data = {
        "name": "bench",
        "model": "Llama-2-7B",
        "method": case["method"],
        "exit_layer": 8,
        "exit_head": "trained",
        "policy": case.get("policy", "fixed:4"),
        "acceptance": {"alpha": 0.8},
        "topology": {"gpu": "H100", "link": "nvlink", **case.get("topology", {"stages": 1})},
        "workload": {"requests": batch, "batch_size": batch, "prompt_len": 128, "output_len": tokens // batch},
    }
    return Point(0, {}, validate(data, "benchmark"), Path("."), "benchmark")


def measure(point: Point, repeats: int) -> tuple[float, int]:
    best = float("inf")
    for _ in range(repeats):
        plan = build_plan(point)
        start = time.perf_counter()
        result = Simulation(plan).run()
        best = min(best, time.perf_counter() - start)
    return result.tokens / best, result.tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000, help="simulated tokens per case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sim_throughput_cpu.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'case':40s} {'tokens':>8s} {'sim tok/s (wall)':>18s}")
    for name, case in CASES.items():
        rate, tokens = measure(make_point(case, args.tokens), args.repeats)
        rows.append({"case": name, "tokens": tokens, "tokens_per_wall_s": round(rate)})
        print(f"{name:40s} {tokens:8d} {rate:18,.0f}")
    report = {
        "benchmark": "sim_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {name: metadata.version(name) for name in ("simpy", "pydantic")}
        | {"python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "processes": 1,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
