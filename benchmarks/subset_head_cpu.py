"""Benchmark (not a test): the shared exit head over a vocabulary subset (`head="shared:N"`) against the full one.

Where the vocabulary is large, a draft step's LM head is most of its cost (Gemma-3-270m: 262k ids, 58 ms of LM head
against 2.3 ms per layer on this CPU, calibration/cpu/latency_gemma3-270m_cpu_fp32.csv). Scoring only N ids cuts that
by V/N; a token outside the subset is never drafted, so acceptance can only drop. Two ways to pick the N ids:
`shared:N` takes the N lowest (BPE and SentencePiece give them to their most frequent pieces), a subset head file
(`eesd train-head --vocab-subset N`) the N the model itself is most likely to emit on the training prompts. Output
is unchanged (greedy: checked here against AR per prompt).

Per head: EESD decode tokens/s (prefill excluded), tokens per round, acceptance, and the speedup over AR measured in
the same run, on the first `--prompts` HELD-OUT built-in prompts (never seen by a subset file), one torch thread;
`benchmarks/head_speed.py` measures (AR, then every head in a rotated order, per prompt and repeat) and reports.

    python benchmarks/subset_head_cpu.py                     # gemma3-270m, E=15, fixed:1: results/subset_head_cpu.json
    python benchmarks/subset_head_cpu.py --model smollm2-135m --exit-layer 22 --heads shared,shared:8192
"""

from __future__ import annotations

import argparse
from pathlib import Path

from head_speed import Settings, held_out_prompts, run_benchmark, table, write_json

import executor

RESULTS = Path(__file__).resolve().parent / "results" / "subset_head_cpu.json"
DEFAULT_HEADS = "shared,shared:16384,heads/gemma3-270m_v16k.safetensors,shared:4096,heads/gemma3-270m_v4k.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--exit-layer", type=int, default=15)
    parser.add_argument("--policy", default="fixed:1")
    parser.add_argument("--heads", default=DEFAULT_HEADS, help="comma-separated: shared | shared:N | a head file")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from sim.formats import check_benchmark_args

    check_benchmark_args(args, counts=("prompts",))
    model = executor.load_model(args.model, dtype="float32")
    ids, prompts = held_out_prompts(executor.load_tokenizer(args.model), "builtin", args.prompts)
    heads = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    settings = Settings(heads=heads, policies=(args.policy,), exit_layer=args.exit_layer, ppsd_stages=0,
                        new_tokens=args.new_tokens, repeats=args.repeats)  # fmt: skip
    report = run_benchmark(model, prompts, settings, threads=1)
    report |= {"model": args.model, "exit_layer": args.exit_layer, "policy": args.policy, "prompts": len(prompts),
               "new_tokens": args.new_tokens, "prompt_ids": ids,
               "prompt_split": "held-out (split_prompts)"}  # fmt: skip
    print(f"{args.model}, E={args.exit_layer}, {args.policy}, {len(prompts)} prompts x {args.new_tokens} tokens, CPU")
    print(table(report["rows"]))
    print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
