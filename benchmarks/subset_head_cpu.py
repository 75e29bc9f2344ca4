"""Benchmark (not a test): the shared exit head over a vocabulary subset (`head="shared:N"`) against the full one.

Where the vocabulary is large, a draft step's LM head is most of its cost (Gemma-3-270m: 262k ids, 58 ms of LM head
against 2.3 ms per layer on this CPU, calibration/cpu/latency_gemma3-270m_cpu_fp32.csv). Scoring only N ids cuts that
by V/N; a token outside the subset is never drafted, so acceptance can only drop. Two ways to pick the N ids:
`shared:N` takes the N lowest (BPE and SentencePiece give them to their most frequent pieces), a subset head file
(`eesd train-head --vocab-subset N`) the N the model itself is most likely to emit on the training prompts. Output
is unchanged (greedy: checked here against AR per prompt).

Per head: EESD decode tokens/s (prefill excluded), tokens per round, acceptance, and the speedup over AR measured in
the same run, on the first `--prompts` HELD-OUT built-in prompts (never seen by a subset file), one torch thread.

    python benchmarks/subset_head_cpu.py                     # gemma3-270m, E=15, fixed:1: results/subset_head_cpu.json
    python benchmarks/subset_head_cpu.py --model smollm2-135m --exit-layer 22 --heads shared,shared:8192
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

import executor
from executor.prompts import encode_prompt, load_prompts, split_prompts

RESULTS = Path(__file__).resolve().parent / "results" / "subset_head_cpu.json"


def decode_rate(stats) -> float:
    return (stats.new_tokens - 1) / (stats.wall_time_s - stats.prefill_time_s)


def run(model, prompts: list[list[int]], new_tokens: int, **kwargs) -> dict:
    rates, rounds, emitted, drafted, accepted, outputs = [], 0, 0, 0, 0, []
    for prompt in prompts:
        out = executor.generate(model, [prompt], max_new_tokens=new_tokens, capture="none", **kwargs)
        rates.append(decode_rate(out.stats))
        rounds += len(out.stats.accepted)
        emitted += sum(a + 1 for a in out.stats.accepted)
        drafted += sum(out.stats.drafted)
        accepted += sum(out.stats.accepted)
        outputs.append(out.sequences[0].tolist())
    return {
        "decode_tokens_per_s": statistics.median(rates),
        "tokens_per_round": emitted / rounds if rounds else 1.0,
        "acceptance": accepted / drafted if drafted else None,
        "outputs": outputs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--exit-layer", type=int, default=15)
    parser.add_argument("--policy", default="fixed:1")
    parser.add_argument(
        "--heads",
        default="shared,shared:16384,heads/gemma3-270m_v16k.safetensors,shared:4096,heads/gemma3-270m_v4k.safetensors",
        help="comma-separated: shared | shared:N | a head file",
    )
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = executor.load_model(args.model, dtype="float32")
    tokenizer = executor.load_tokenizer(args.model)
    held_out = split_prompts(load_prompts("builtin")).held_out[: args.prompts]
    prompts = [encode_prompt(tokenizer, p.text) for p in held_out]
    ar = run(model, prompts, args.new_tokens, method="ar")
    rows = [{"head": "- (AR)", **{k: v for k, v in ar.items() if k != "outputs"}, "speedup": 1.0, "identical": True}]
    for head in args.heads.split(","):
        result = run(model, prompts, args.new_tokens, method="eesd", exit_layer=args.exit_layer, head=head,
                     policy=args.policy)  # fmt: skip
        identical = result.pop("outputs") == ar["outputs"]
        speedup = result["decode_tokens_per_s"] / ar["decode_tokens_per_s"]
        rows.append({"head": head, **result, "speedup": speedup, "identical": identical})
    print(f"{args.model}, E={args.exit_layer}, {args.policy}, {len(prompts)} prompts x {args.new_tokens} tokens, CPU")
    print("| head | decode tok/s | tok/round | acceptance | speedup vs AR | output == AR |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        print(f"| {r['head']} | {r['decode_tokens_per_s']:.2f} | {r['tokens_per_round']:.2f} | {acceptance} | "
              f"{r['speedup']:.2f} | {r['identical']} |")  # fmt: skip
    report = {
        "label": "CPU benchmark (not a GPU result)", "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores, "
        "1 torch thread)", "dtype": "float32", "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
        "exit_layer": args.exit_layer, "policy": args.policy, "prompts": len(prompts), "new_tokens": args.new_tokens,
        "prompt_ids": [p.id for p in held_out], "prompt_split": "held-out (split_prompts)",
        "timing": "median over prompts of decode tokens/s (prefill excluded), uncaptured passes", "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
