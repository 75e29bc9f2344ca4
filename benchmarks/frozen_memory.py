"""What frozen passes hold in a long-lived process (not a test): resident memory while configurations are compiled
frozen, used, and released, in one process, cycle after cycle.

On a CPU each frozen pass (`capture="freeze"`) holds a packed copy of the weights it reads. A process that serves or
benchmarks one configuration after another (AR, then EESD, then AR again) must get that memory back when it drops a
configuration: `executor.release_passes(model)` drops what the executor keeps on the model and frees it. Per cycle,
per configuration: the first call (compiling) and its time, the decode speed of a second call, the resident memory
after it; then, after the release, the resident memory again. A checkout without `release_passes` (an older one) is
measured with the same script: its kept tables are dropped by hand and garbage is collected twice, which is all a
user could do there.

    python benchmarks/frozen_memory.py --model smollm2-135m --head heads/smollm2-135m-e7-mix5-v16k.safetensors \\
        --cycles 2 --num-prompts 2 --new-tokens 32 --threads 1 --out benchmarks/results/frozen_memory_cpu.json

Writes JSON (atomically): device, dtype, versions, date, command line, the checkout's commit and the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from head_speed import environment, write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def resident_gb() -> float:
    """This process's resident memory (VmRSS), in GB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    raise RuntimeError("no VmRSS in /proc/self/status")


def release(model: Any) -> str:
    """Drop what the executor keeps on `model`: `executor.release_passes` where the checkout has it, else by hand."""
    import executor

    if hasattr(executor, "release_passes"):
        executor.release_passes(model)
        how = "executor.release_passes"
    else:
        for name in [n for n in model.__dict__ if n.startswith("_eesd_")]:
            del model.__dict__[name]
        gc.collect()
        gc.collect()
        how = "kept tables dropped by hand, gc twice"
    return how


def trimmed_gb() -> float:
    """Resident memory after glibc gives the free pages of its heaps back to the system (malloc_trim)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return resident_gb()


def configurations(head: str, policy: str) -> list[tuple[str, dict[str, Any]]]:
    """AR, then EESD with the head and a policy: two sets of frozen passes."""
    return [("ar", {"method": "ar"}), (f"eesd {policy}", {"method": "eesd", "head": head, "policy": policy})]


def run_calls(model: Any, prompts: list[list[int]], kwargs: dict[str, Any], new_tokens: int) -> tuple[float, float]:
    """The first call over the prompts (compiling: its seconds), then a second one: its decode tokens/s."""
    import executor

    def one_call() -> tuple[float, int, float]:
        start, tokens, decode_s = time.perf_counter(), 0, 0.0
        for ids in prompts:
            stats = executor.generate(model, [ids], max_new_tokens=new_tokens, capture="freeze", **kwargs).stats
            tokens += stats.new_tokens
            decode_s += stats.wall_time_s - stats.prefill_time_s
        return time.perf_counter() - start, tokens, decode_s

    first_s, _, _ = one_call()
    _, tokens, decode_s = one_call()
    return first_s, tokens / decode_s


def row(cycle: int, name: str, first_s: float, tok_s: float, rss: tuple[float, float, float]) -> dict[str, Any]:
    """One configuration of one cycle; `rss`: resident GB in use, after the release, and after a heap trim."""
    return {
        "cycle": cycle, "configuration": name, "first_call_s": round(first_s, 1), "tok_s": round(tok_s, 2),
        "rss_gb_in_use": round(rss[0], 3), "rss_gb_after_release": round(rss[1], 3),
        "rss_gb_after_trim": round(rss[2], 3),
    }  # fmt: skip


def table(rows: list[dict[str, Any]], loaded_gb: float) -> str:
    lines = [f"model loaded: {loaded_gb:.2f} GB resident",
             f"{'cycle':>5}  {'configuration':<16}{'first call s':>13}{'tok/s':>8}{'GB in use':>11}{'released':>10}"
             f"{'trimmed':>9}"]  # fmt: skip
    for r in rows:
        memory = f"{r['rss_gb_in_use']:>11.2f}{r['rss_gb_after_release']:>10.2f}{r['rss_gb_after_trim']:>9.2f}"
        lines.append(f"{r['cycle']:>5}  {r['configuration']:<16}{r['first_call_s']:>13}{r['tok_s']:>8}{memory}")
    return "\n".join(lines)


def commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--head", default="heads/smollm2-135m-e7-mix5-v16k.safetensors")
    parser.add_argument("--policy", default="fixed:2")
    parser.add_argument("--prompts", default="builtin", help="a prompt set (its held-out split is used)")
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=RESULTS / "frozen_memory_cpu.json")
    args = parser.parse_args()
    from sim.formats import check_benchmark_args

    check_benchmark_args(args, counts=("num_prompts",))
    import torch

    import executor
    from executor.prompts import encode_prompt, load_prompts, split_prompts

    torch.set_num_threads(args.threads)
    model = executor.load_model(args.model, dtype=torch.float32)
    tokenizer = executor.load_tokenizer(args.model)
    held_out = split_prompts(load_prompts(args.prompts)).held_out[: args.num_prompts]
    prompts = [encode_prompt(tokenizer, p.text) for p in held_out]
    head = str(ROOT / args.head) if not Path(args.head).is_absolute() else args.head
    loaded = resident_gb()
    rows, how = [], ""
    for cycle in range(args.cycles):
        for name, kwargs in configurations(head, args.policy):
            first_s, tok_s = run_calls(model, prompts, kwargs, args.new_tokens)
            used = resident_gb()
            how = release(model)
            released = resident_gb()
            rows.append(row(cycle, name, first_s, tok_s, (used, released, trimmed_gb())))
            print(table(rows[-1:], loaded).splitlines()[-1], flush=True)
    print(table(rows, loaded))
    print(f"released with: {how}")
    result = {
        "benchmark": "frozen_memory", **environment(args.threads), "capture": "freeze", "commit": commit(),
        "model": args.model, "head": args.head, "policy": args.policy, "prompts": args.prompts,
        "num_prompts": args.num_prompts, "new_tokens": args.new_tokens, "cycles": args.cycles,
        "released_with": how, "loaded_rss_gb": round(loaded, 3),
        "median_tok_s": {n: statistics.median(r["tok_s"] for r in rows if r["configuration"] == n)
                         for n in dict.fromkeys(r["configuration"] for r in rows)},
        "note": args.note, "rows": rows,
    }  # fmt: skip
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
