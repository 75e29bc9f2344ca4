"""Compile time on first use (not a test): `capture="compile"` (torch.compile of every pass) against
`capture="compile-layers"` (the decoder layer compiled once for all layers and passes).

Each (capture, method) runs in a fresh process with an empty Inductor cache (`TORCHINDUCTOR_CACHE_DIR` in a new
temporary directory), so nothing compiled before is reused: the first `executor.generate` call's seconds are what a
user pays on first use, the second call's what every later call costs. SmolLM2-135M, real weights, batch 1, greedy.

    python benchmarks/compile_time.py                      # CPU: benchmarks/results/compile_time_cpu.json
    python benchmarks/compile_time.py --device cuda --dtype bfloat16 --out X.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CAPTURES = ("compile-layers", "compile")
METHODS = {"ar": {}, "eesd": {"exit_layer": 15, "draft_len": 3}}

CHILD = """
import json, sys, time, torch, executor
device, dtype, method, capture, tokens = sys.argv[1:6]
kwargs = json.loads(sys.argv[6])
torch.set_num_threads(int(sys.argv[7]))
model = executor.load_model("smollm2-135m", dtype=getattr(torch, dtype), device=device)
prompt = executor.load_tokenizer("smollm2-135m")("def fibonacci(n):")["input_ids"]
seconds = []
for _ in range(2):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    begin = time.perf_counter()
    executor.generate(model, [prompt], method=method, max_new_tokens=int(tokens), capture=capture, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds.append(time.perf_counter() - begin)
print(json.dumps({"first_call_s": seconds[0], "second_call_s": seconds[1]}))
"""


def measure(args: argparse.Namespace, capture: str, method: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
        command = [sys.executable, "-c", CHILD, args.device, args.dtype, method, capture, str(args.new_tokens),
                   json.dumps(METHODS[method]), str(args.threads)]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout_s, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"capture": capture, "method": method, "error": tail[0][:300]}
    return {"capture": capture, "method": method, **json.loads(done.stdout.strip().splitlines()[-1])}


def table(rows: list[dict]) -> str:
    lines = ["| method | capture | first call (s) | second call (s) |", "| --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['capture']} | error: {r['error']} | - |")
        else:
            lines.append(f"| {r['method']} | {r['capture']} | {r['first_call_s']:.1f} | {r['second_call_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens each call makes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of each process (default: the "
                        "project's, 1 on a machine of 2 CPUs or fewer)")  # fmt: skip
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per (capture, method) process")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="the JSON written (default: benchmarks/results/compile_time_{cpu,cuda}.json; none if a process fails)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from sim.formats import check_benchmark_args, machine_info, write_text_atomic

    check_benchmark_args(args)
    import torch
    import transformers

    from executor.runtime import check_device, default_threads

    check_device(args.device)  # before any process starts: cuda on a CPU-only torch is one line
    args.threads = args.threads or default_threads()

    rows = []
    for method in METHODS:
        for capture in CAPTURES:
            rows.append(measure(args, capture, method))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    if any("error" in r for r in rows):  # not a result: the committed file is left as it is
        print(table(rows))
        print("compile_time.py: a process failed (its error above); nothing written", file=sys.stderr)
        return 1
    machine = machine_info()
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else machine["cpu"]
    report = {
        "benchmark": "compile_time", "device": args.device, "device_name": device, "machine": machine,
        "threads": args.threads, "cpus": os.cpu_count(), "dtype": args.dtype, "model": "smollm2-135m",
        "new_tokens": args.new_tokens,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timing": "each (capture, method) in a fresh process with an empty Inductor cache; first and second "
        "executor.generate call, wall seconds (model loading excluded)",
        "methods": METHODS, "rows": rows,
    }  # fmt: skip
    out = args.out or RESULTS / f"compile_time_{'cpu' if args.device == 'cpu' else 'cuda'}.json"
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
