"""How much a decode's speed moves from one process to the next (not a test), against how much it moves within one.

A latency profile is measured in one process and `eesd validate` runs the executor in another; if the same pass runs
at a different speed in every fresh process (where its weights, or a frozen pass's packed copy of them, land in
memory), no prediction can come closer than that spread. This runs the same AR decode in `--processes` fresh
processes, each timing `--calls` calls after two warm-up calls, and reports each process's median ms per decode step,
the spread across processes (max / min of the medians) and within them (the largest max / min of one process's calls).
With `--env KEY=VALUE`, every other process runs with that environment variable set (interleaved: A, B, A, B, ...),
e.g. `THP_MEM_ALLOC_ENABLE=1`, torch's switch for transparent huge pages in its CPU allocator. The Inductor cache is
the user's: a frozen pass compiled once is reused by the later processes (their first call is not what is timed).

    python benchmarks/process_spread.py --model gemma3-270m --capture freeze --processes 8 \\
        --out benchmarks/results/process_spread_gemma3-270m_cpu_frozen.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "The quick brown fox jumps over the lazy dog. Tell me a story about it"

CHILD = """
import json, sys, torch, executor
from executor.adapter import ModelAdapter
model, capture, tokens, calls, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
adapter = ModelAdapter(executor.load_model(model, dtype=torch.float32))
ids = [executor.load_tokenizer(model)(sys.argv[6])["input_ids"]]
for _ in range(2):
    executor.generate(adapter, ids, method="ar", max_new_tokens=tokens, capture=capture)
ms = []
for _ in range(calls):
    stats = executor.generate(adapter, ids, method="ar", max_new_tokens=tokens, capture=capture).stats
    ms.append((stats.wall_time_s - stats.prefill_time_s) / (stats.new_tokens - 1) * 1000)
print(json.dumps({"ms_per_step": ms}))
"""


def run_process(args: argparse.Namespace, env: dict[str, str]) -> list[float]:
    command = [sys.executable, "-c", CHILD, args.model, args.capture, str(args.new_tokens), str(args.calls),
               str(args.threads), PROMPT]  # fmt: skip
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=args.timeout_s, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"process failed: {tail[0][:300]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["ms_per_step"]


def parse_env(text: str | None) -> dict[str, str]:
    if text is None:
        return {}
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"process_spread.py: error: --env: expected KEY=VALUE, got {text!r}")
    return {key: value}


def summarise(processes: list[list[float]]) -> dict[str, float]:
    medians = [statistics.median(calls) for calls in processes]
    return {
        "median_ms_per_step": round(statistics.median(medians), 3),
        "min_process_median_ms": round(min(medians), 3),
        "max_process_median_ms": round(max(medians), 3),
        "between_processes": round(max(medians) / min(medians), 4),
        "within_process_max": round(max(max(calls) / min(calls) for calls in processes), 4),
    }


def table(rows: list[dict]) -> str:
    lines = ["| process | setting | median ms/step | calls (ms/step) |", "| --- | --- | --- | --- |"]
    for row in rows:
        calls = ", ".join(f"{value:.2f}" for value in row["ms_per_step"])
        lines.append(f"| {row['process']} | {row['setting']} | {statistics.median(row['ms_per_step']):.2f} | {calls} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument(
        "--capture",
        default="freeze",
        choices=("auto", "none", "graph", "compile", "compile-layers", "freeze"),
        help="the executor's capture mode (default: freeze)",
    )
    parser.add_argument("--processes", type=int, default=8, help="fresh processes in all (default: 8)")
    parser.add_argument("--calls", type=int, default=5, help="timed generate calls per process (default: 5)")
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--env", default=None, help="KEY=VALUE set in every other process (interleaved)")
    parser.add_argument("--timeout-s", type=float, default=1200.0, help="per process")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from sim.formats import check_benchmark_args

    check_benchmark_args(args)
    if args.processes < 1 or args.calls < 2 or args.new_tokens < 2:
        raise SystemExit("process_spread.py: error: expected --processes >= 1, --calls >= 2, --new-tokens >= 2")
    extra = parse_env(args.env)
    settings = [("plain", {}), (args.env, extra)] if extra else [("plain", {})]

    import torch

    from calibrate.common import base_metadata
    from calibrate.validate import write_json

    rows: list[dict] = []
    for index in range(args.processes):
        setting, env = settings[index % len(settings)]
        rows.append({"process": index, "setting": setting, "ms_per_step": run_process(args, env)})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    summary = {
        setting: summarise([r["ms_per_step"] for r in rows if r["setting"] == setting]) for setting, _ in settings
    }
    report = {
        "benchmark": "process_spread",
        **base_metadata(args.model, torch.device("cpu"), torch.float32),
        "capture": args.capture, "torch_threads": args.threads, "new_tokens": args.new_tokens, "calls": args.calls,
        "timing": "AR decode ms per step ((wall - prefill) / (new tokens - 1)) per generate call, after two warm-up "
        "calls, each process fresh (the Inductor cache reused); processes run one after another, settings interleaved",
        "summary": summary, "rows": rows,
    }  # fmt: skip
    out = args.out or RESULTS / f"process_spread_{args.model}_cpu_{args.capture}.json"
    write_json(out, report)
    print(table(rows))
    for setting, numbers in summary.items():
        print(f"{setting}: median {numbers['median_ms_per_step']} ms/step, process medians "
              f"{numbers['min_process_median_ms']}-{numbers['max_process_median_ms']} "
              f"(x{numbers['between_processes']} between, up to x{numbers['within_process_max']} within)")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
