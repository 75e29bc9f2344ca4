"""CPU benchmark (not a test): AR vs EESD vs PPSD (sequential, distributed with 2 and 4 processes).

The model is a random Llama config large enough that compute dominates (hidden 1024, 12 layers, float32). Acceptance
is controlled with the epsilon trick (docs/design.md): o_proj and down_proj of layers >= the exit layer are scaled
by epsilon, so the shared exit head agrees with the full model often (small epsilon) or always (epsilon 0). Every
method drafts at the same exit layer (L / 4 = 3), so they see the same drafts and the same acceptance.

Each distributed stage process runs with one torch thread. This box has 2 cores: 2 processes use both, 4 processes
oversubscribe them (two stages per core), so the 4-stage pipeline cannot overlap its stages here; the numbers say so.
AR, EESD and sequential PPSD are timed with 1 and 2 threads; speedups are over the faster AR.
Decode time excludes process start-up and model hand-over (reported separately as setup_s).

    python benchmarks/ppsd_cpu.py                   # writes benchmarks/results/ppsd_cpu.json
    python benchmarks/ppsd_cpu.py --quick           # a smaller run to try the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import executor
from executor.adapter import ModelAdapter
from executor.decoding import TokenSink
from executor.ppsd import PPSDStats, decode_ppsd

RESULTS = Path(__file__).parent / "results" / "ppsd_cpu.json"


@dataclass
class Row:
    method: str
    epsilon: float
    threads: str
    tokens_per_s: float  # best of the repeats
    speedup_vs_ar: float  # best over AR's best (1 or 2 threads, whichever is faster here)
    alpha: float | None = None
    ideal_speedup: float | None = None
    tick_speedup: float | None = None
    setup_s: float | None = None
    stage_busy_s: list[float] | None = None
    stage_idle_s: list[float] | None = None
    median_tokens_per_s: float | None = None


def build_model(num_layers: int, hidden: int, epsilon: float, exit_layer: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers[exit_layer:]:
            layer.self_attn.o_proj.weight.mul_(epsilon)
            layer.mlp.down_proj.weight.mul_(epsilon)
    return model


@dataclass
class Method:
    """One contender: `run()` decodes once and returns (new tokens, decode seconds, PPSD stats or None)."""

    name: str
    threads: str
    run: Callable[[], tuple[list[int], float, PPSDStats | None]]
    times: list[float] = field(default_factory=list)
    stats: list[PPSDStats] = field(default_factory=list)


def generate_method(model, prompt: list[int], max_new: int, name: str, threads: int, **kwargs) -> Method:
    def run():
        torch.set_num_threads(threads)
        begin = time.perf_counter()
        result = executor.generate(model, prompt, max_new_tokens=max_new, **kwargs)
        return result.sequences[0, len(prompt) :].tolist(), time.perf_counter() - begin, None

    return Method(name, str(threads), run)


def ppsd_method(
    model, prompt: list[int], max_new: int, stages: int, backend: str, exit_layer: int, threads: int
) -> Method:
    """`threads`: torch threads of the one process (sequential) or of each stage process (distributed)."""
    adapter = ModelAdapter(model)

    def run():
        torch.set_num_threads(threads)
        sink = TokenSink(max_new, [], None)
        cache = adapter.new_cache(1, len(prompt) + max_new)
        stats = decode_ppsd(
            adapter,
            prompt,
            sink,
            cache,
            stages=stages,
            exit_layer=exit_layer,
            backend=backend,
            threads_per_stage=threads,
        )
        return sink.tokens, stats.wall_time_s, stats

    label = f"{stages}x{threads}" if backend == "distributed" else str(threads)
    return Method(f"ppsd n={stages} {backend}", label, run)


def bench_epsilon(epsilon: float, args: argparse.Namespace, prompt: list[int]) -> list[Row]:
    """Every method once per repeat, round-robin, so that load from other jobs on the box hits them alike."""
    model = build_model(args.layers, args.hidden, epsilon, args.exit_layer)
    new = args.max_new_tokens
    eesd_name = f"eesd k={args.draft_len}"
    eesd_args = {"method": "eesd", "exit_layer": args.exit_layer, "draft_len": args.draft_len}
    methods = [generate_method(model, prompt, new, "ar", t, method="ar") for t in (1, 2)]
    methods += [generate_method(model, prompt, new, eesd_name, t, **eesd_args) for t in (1, 2)]
    methods += [ppsd_method(model, prompt, new, 2, "sequential", args.exit_layer, t) for t in (1, 2)]
    methods += [ppsd_method(model, prompt, new, n, "distributed", args.exit_layer, 1) for n in (2, 4)]
    reference = methods[0].run()[0]  # also the warm-up
    alphas = {}
    for _ in range(args.repeats):
        for method in methods:
            tokens, seconds, stats = method.run()
            assert tokens == reference, f"{method.name} output differs from AR"
            method.times.append(seconds)
            if stats is not None:
                method.stats.append(stats)
    alphas[eesd_name] = executor.generate(model, prompt, max_new_tokens=new, **eesd_args).stats.acceptance_rate
    ar_best = new / min(methods[0].times + methods[1].times)
    return [_row(method, epsilon, new, ar_best, alphas.get(method.name)) for method in methods]


def _row(method: Method, epsilon: float, new: int, ar_best: float, alpha: float | None) -> Row:
    best = new / min(method.times)
    row = Row(method.name, epsilon, method.threads, best, best / ar_best, alpha=alpha)
    row.median_tokens_per_s = new / statistics.median(method.times)
    if method.stats:
        stats = min(method.stats, key=lambda s: s.wall_time_s)
        row.alpha, row.ideal_speedup, row.tick_speedup = stats.alpha, stats.ideal_speedup, stats.tick_speedup
        row.setup_s = stats.setup_time_s or None
        row.stage_busy_s = [round(s.busy_s, 4) for s in stats.stage_stats]
        row.stage_idle_s = [round(s.idle_s, 4) for s in stats.stage_stats]
    return row


def table(rows: list[Row]) -> str:
    head = f"{'method':<24}{'eps':>6}{'threads':>8}{'tok/s':>9}{'median':>8}{'vs AR':>9}"
    head += f"{'alpha':>7}{'ideal':>7}{'ticks':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:

        def fmt(x):
            return f"{x:7.2f}" if x is not None else f"{'':>7}"

        lines.append(
            f"{r.method:<24}{r.epsilon:>6.2f}{r.threads:>8}{r.tokens_per_s:>9.1f}{r.median_tokens_per_s:>8.1f}{r.speedup_vs_ar:>8.2f}x"
            f"{fmt(r.alpha)}{fmt(r.ideal_speedup)}{fmt(r.tick_speedup)}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12, help="decoder layers of the random model (4 stages)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size, a multiple of 256 (64-wide heads)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens each decode makes")
    parser.add_argument("--draft-len", type=int, default=4, help="EESD's fixed draft length")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method; the best is reported")
    parser.add_argument("--epsilons", default="0,0.06", help="scales of the late layers (0: drafts always right)")
    parser.add_argument("--quick", action="store_true", help="8 layers, 24 tokens, 1 repeat, no JSON")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON written")
    args = parser.parse_args()
    from sim.formats import check_benchmark_args, machine_info, write_text_atomic

    check_benchmark_args(args, counts=("repeats", "draft_len"))
    if args.hidden < 256 or args.hidden % 256:
        raise SystemExit(f"ppsd_cpu.py: error: --hidden must be a multiple of 256 (64-wide heads, 4 per KV head), "
                         f"got {args.hidden}")  # fmt: skip
    if args.layers < 4:
        raise SystemExit(f"ppsd_cpu.py: error: --layers must be >= 4 (the pipeline has 4 stages), got {args.layers}")
    if args.quick:
        args.layers, args.max_new_tokens, args.repeats = 8, 24, 1
    args.exit_layer = args.layers // 4  # inside stage 1 of the 4-stage pipeline, shared by every method
    prompt = list(range(5, 37))
    load_before = os.getloadavg()
    rows = [row for eps in map(float, args.epsilons.split(",")) for row in bench_epsilon(eps, args, prompt)]
    print(table(rows))
    if args.quick:
        return
    result = {
        "benchmark": "ppsd_cpu",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "dtype": "float32",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": machine_info(),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {"arch": "llama (random)", "layers": args.layers, "hidden": args.hidden, "vocab": 8192},
        "exit_layer": args.exit_layer,
        "prompt_tokens": len(prompt),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "note": (
            "tokens/s = new tokens / decode time (prefill included, process start-up excluded); best of the repeats, "
            "methods interleaved round-robin; median also given. The box is shared: other sessions' jobs ran "
            "concurrently (see load_average), so absolute tokens/s are noisy. 2 cores: distributed n=4 runs 4 "
            "single-thread processes on 2 cores (oversubscribed). 'ticks' = speedup in ticks (n x decoded / ticks)."
        ),
        "load_average_1_5_15_before_after": [load_before, os.getloadavg()],
        "rows": [row.__dict__ for row in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
