"""Benchmark (not a test): the simulator's predicted decode tokens/s vs what the executor measures, on this CPU.

The simulator runs scenarios/smollm2_cpu_calibrated.yaml (SmolLM2-135M fp32, latency profile measured on this CPU,
shared-head acceptance trace over the built-in prompts) for every swept exit layer and draft length, and AR. The
executor runs `executor.generate` with the same model, exit layer and draft length on the same prompts as the
trace replay (request r replays the r-th prompt in sorted id order), with one torch thread as in the profile.
Decode tokens/s excludes prefill on both sides: (new tokens - 1) / (wall time - prefill time).

    python benchmarks/sim_vs_executor.py            # writes benchmarks/results/sim_vs_executor_cpu.json
    python benchmarks/sim_vs_executor.py --quick    # two prompts, exit layer 22 only
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from calibrate.common import base_metadata
from executor.api import generate
from executor.models import load_model, load_tokenizer
from executor.prompts import encode_prompt, load_prompts
from sim.runner import simulate_point
from sim.scenario import exit_layer_of, load_points

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "smollm2_cpu_calibrated.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "sim_vs_executor_cpu.json"


@dataclass(frozen=True)
class Row:
    method: str
    exit_layer: int | None
    draft_len: int | None
    sim_tokens_per_s: float
    executor_tokens_per_s: float
    sim_tokens_per_round: float
    executor_tokens_per_round: float

    @property
    def ratio(self) -> float:
        return self.sim_tokens_per_s / self.executor_tokens_per_s


def executor_decode(model, prompts: list[list[int]], method: str, exit_layer: int | None, draft_len: int, eos):
    """Decode tokens/s and tokens per round, summed over the prompts."""
    tokens, seconds, rounds = 0, 0.0, 0
    for ids in prompts:
        stats = generate(
            model, ids, method=method, exit_layer=exit_layer, draft_len=draft_len, max_new_tokens=48, eos_token_id=eos
        ).stats
        tokens += stats.new_tokens - 1
        seconds += stats.wall_time_s - stats.prefill_time_s
        rounds += len(stats.accepted) if method == "eesd" else stats.new_tokens - 1
    return tokens / seconds, tokens / max(rounds, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    points = load_points(SCENARIO)
    if args.quick:
        points = [p for p in points if exit_layer_of(p) == 22]
    requests = 2 if args.quick else points[0].scenario.workload.requests
    model = load_model("smollm2-135m", dtype="float32")
    tokenizer = load_tokenizer("smollm2-135m")
    prompts = sorted(load_prompts("builtin"), key=lambda p: p.id)[:requests]
    ids = [encode_prompt(tokenizer, p.text) for p in prompts]
    eos = model.generation_config.eos_token_id
    begin = time.perf_counter()
    rows = []
    ar_tps, _ = executor_decode(model, ids, "ar", None, 1, eos)
    for point in points:
        simulated = simulate_point(point)
        exit_layer, draft_len = exit_layer_of(point), int(point.scenario.policy.split(":")[1])
        tps, per_round = executor_decode(model, ids, "eesd", exit_layer, draft_len, eos)
        r = simulated.result
        rows.append(Row("eesd", exit_layer, draft_len, r.tokens_per_s, tps, r.tokens_per_round, per_round))
        print(f"E={exit_layer} k={draft_len}: sim {r.tokens_per_s:.1f} tok/s, executor {tps:.1f} tok/s")
    baseline = simulated.baseline
    rows.insert(0, Row("ar", None, None, baseline.tokens_per_s, ar_tps, 1.0, 1.0))
    report = {
        "metadata": {
            **base_metadata("smollm2-135m", torch.device("cpu"), torch.float32),
            "scenario": str(SCENARIO.relative_to(ROOT)),
            "prompts": [p.id for p in prompts],
            "max_new_tokens": 48,
            "wall_s": round(time.perf_counter() - begin, 1),
            "cpu_count": os.cpu_count(),
        },
        "rows": [{**asdict(row), "sim_over_executor": round(row.ratio, 3)} for row in rows],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(f"{row.method} E={row.exit_layer} k={row.draft_len}: sim/executor = {row.ratio:.2f}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
