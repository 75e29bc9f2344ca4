"""What verify buckets buy under frozen passes (not a test): compilation, memory and speed of an EESD policy whose draft
length varies, with one verify pass per draft length against one per bucket (`generate`'s `verify_buckets`).

Frozen (`capture="freeze"`), every verify width is its own compiled pass holding its own packed copy of the weights,
so a Thompson-sampling or confidence policy that tries k = 1..8 compiles eight verify passes; with buckets it compiles
those of 1, 2, 4 and 8 drafts and pads a round to its bucket. Each setting runs in its own fresh process with its own
empty Inductor cache (compilation is timed cold), in the order given by `--order`: the first call over the prompts
(compiling every pass it meets) is timed as `first_call_s`, then `--repeats` timed calls over the same prompts (the
policy's seeded draws meet the same widths). The process's resident memory after the calls and its peak come from
/proc. A last process decodes the prompts with uncaptured AR: every frozen output is compared with it token for token.

    python benchmarks/verify_buckets.py --model smollm2-135m --head heads/smollm2-135m-e15-mix5-v16k.safetensors \\
        --policy beta-ts --num-prompts 8 --new-tokens 64 --out benchmarks/results/verify_buckets_smollm2-135m_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from head_speed import environment, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

CHILD = """
import json, sys, time, torch, executor
from executor.adapter import ModelAdapter
from executor.prompts import encode_prompt, load_prompts, split_prompts
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
adapter = ModelAdapter(executor.load_model(spec["model"], dtype=torch.float32))
tokenizer = executor.load_tokenizer(spec["model"])
held_out = split_prompts(load_prompts(spec["prompts"])).held_out[: spec["num_prompts"]]
prompts = [encode_prompt(tokenizer, p.text) for p in held_out]

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1e6  # GB

def one_call():
    outs, decode_s, tokens, drafted = [], 0.0, 0, []
    for ids in prompts:
        if spec["method"] == "ar":
            out = executor.generate(adapter, [ids], method="ar", max_new_tokens=spec["new_tokens"], capture="none")
        else:
            out = executor.generate(adapter, [ids], method="eesd", head=spec["head"], policy=spec["policy"],
                                    max_new_tokens=spec["new_tokens"], capture="freeze",
                                    verify_buckets=spec["buckets"])
        stats = out.stats
        outs.append(out.sequences[0].tolist()[len(ids):])
        decode_s += stats.wall_time_s - stats.prefill_time_s
        tokens += stats.new_tokens
        drafted += stats.drafted
    return outs, decode_s, tokens, drafted

begin = time.perf_counter()
outs, _, _, drafted = one_call()
first_s = time.perf_counter() - begin
rates = []
for _ in range(spec["repeats"]):
    again, decode_s, tokens, _ = one_call()
    assert again == outs, "a repeated call decoded other tokens"
    rates.append(tokens / decode_s)
kept = adapter.model.__dict__.get("_eesd_passes", {})
passes = [list(key) for p in kept.values() for key in p.spans()]
print(json.dumps({
    "first_call_s": first_s, "tok_s": rates, "rss_gb": status("VmRSS"), "peak_rss_gb": status("VmHWM"),
    "passes": passes, "draft_lengths": sorted(set(drafted)), "drafted": drafted, "outputs": outs,
}))
"""


def run_setting(args: argparse.Namespace, method: str, buckets: bool) -> dict:
    spec = {"model": args.model, "head": args.head, "policy": args.policy, "prompts": args.prompts,
            "num_prompts": args.num_prompts, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "threads": args.threads, "buckets": buckets, "method": method}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": cache}
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True,
                              text=True, timeout=args.timeout_s, check=False)  # fmt: skip
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:] or ["no output"]
        raise SystemExit(f"{method} (buckets {buckets}) failed: {' | '.join(tail)[:600]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(name: str, result: dict, reference: list[list[int]]) -> dict:
    verify = sorted({q - 1 for kind, q, _ in result["passes"] if kind == "verify"})
    same = sum(a == b for a, b in zip(result["outputs"], reference, strict=True))
    return {
        "setting": name, "first_call_s": round(result["first_call_s"], 1),
        "tok_s_median": round(statistics.median(result["tok_s"]), 2),
        "tok_s": [round(r, 2) for r in result["tok_s"]],
        "rss_gb": round(result["rss_gb"], 2), "peak_rss_gb": round(result["peak_rss_gb"], 2),
        "verify_passes": len(verify), "verify_drafts": verify, "draft_lengths": result["draft_lengths"],
        "rounds": len(result["drafted"]), "outputs_equal_ar": f"{same}/{len(reference)}",
    }  # fmt: skip


def parse_order(text: str) -> list[str]:
    """--order: the settings to run, in order (off = one verify pass per k, on = verify buckets)."""
    settings = [s.strip() for s in text.split(",") if s.strip()]
    if not settings or any(s not in ("off", "on") for s in settings):
        raise SystemExit(f"--order: expected a comma-separated list of off / on, got {text!r}")
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--head", default="heads/smollm2-135m-e15-mix5-v16k.safetensors")
    parser.add_argument("--policy", default="beta-ts", help="a policy whose draft length varies")
    parser.add_argument("--prompts", default="builtin", help="a prompt set (its held-out split is used)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--order", default="off,on", help="the settings' order (comma-separated: off, on)")
    parser.add_argument("--timeout-s", type=int, default=3600)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=RESULTS / "verify_buckets_cpu.json")
    args = parser.parse_args()
    from sim.formats import check_benchmark_args
    from sim.policy import FixedPolicy, make_policy

    check_benchmark_args(args)
    if isinstance(make_policy(args.policy), FixedPolicy):  # a ValueError names a spec that is not a policy
        raise SystemExit(
            f"verify_buckets.py: error: --policy {args.policy} drafts one length, so buckets change nothing: give "
            "one whose draft length varies (beta-ts, heuristic, confidence, ...)"
        )
    settings = parse_order(args.order)
    runs = [(s, run_setting(args, "eesd", s == "on")) for s in settings]
    reference = run_setting(args, "ar", False)["outputs"]
    rows = [summary(f"buckets {s}", result, reference) for s, result in runs]
    header = f"{'setting':<12}{'first call s':>13}{'tok/s':>8}{'RSS GB':>8}{'peak GB':>8}{'verify passes':>15}  = AR"
    print(header)
    for row in rows:
        cells = [f"{row['setting']:<12}", f"{row['first_call_s']:>13}", f"{row['tok_s_median']:>8}"]
        cells += [f"{row['rss_gb']:>8}", f"{row['peak_rss_gb']:>8}", f"{row['verify_passes']:>6} "]
        cells += [f"{str(row['verify_drafts']):<9}", f" {row['outputs_equal_ar']}"]
        print("".join(cells))
    print(f"draft lengths tried: {rows[0]['draft_lengths']}")
    result = {
        "benchmark": "verify_buckets", **environment(args.threads), "capture": "freeze",
        "model": args.model, "head": args.head, "policy": args.policy, "prompts": args.prompts,
        "num_prompts": args.num_prompts, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "order": settings, "note": args.note, "rows": rows,
    }  # fmt: skip
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
