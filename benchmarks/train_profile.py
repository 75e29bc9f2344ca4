"""Benchmark (not a test): where a training step of `eesd train-head` spends its time, phase by phase.

A step of `executor.train_head.train_step` is: the frozen full model over the batch (teacher), each head's layer
forward, the vocabulary-wide logits and KL over chunks of target positions with their backward, the head layers'
backward, clipping and the optimizer step. `executor.train_head.PHASES` times each phase with the device
synchronised around it; building the batch (`batch_stream`: shards read, windows packed) is timed here. The steps
are also timed with the phases off (no synchronisation: the throughput a real run gets), interleaved with the
phased ones so that both see the same machine.

    python benchmarks/train_profile.py --model smollm2-135m --corpus /work/corpora/smol-train --exit-layer 7,15 \
        --batch-size 4 --window 256 --steps 6 --threads 2 --tag smollm2-135m_cpu
    # on a GPU (the runbook's): --device cuda --dtype bfloat16 --batch-size 64

Prints a table and writes benchmarks/results/train_profile_<tag>.json (atomically) with the device, dtype and
versions. The heads start from the model's last layer (as the shipped ones) and train with the CLI's defaults.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from head_speed import environment, write_json

from executor.adapter import ModelAdapter
from executor.corpus import RecordSource
from executor.heads import HEAD_CLASSES
from executor.models import load_model, resolve_dtype
from executor.runtime import check_device, synchronize, use_threads
from executor.train_head import (
    PHASES,
    TrainConfig,
    batch_stream,
    check_corpus_model,
    frozen,
    make_optimizers,
    new_head,
    train_step,
)
from sim.tables import text_table

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_PHASE = "batch (shards read, windows packed)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", nargs="+", required=True, metavar="DIR")
    parser.add_argument("--exit-layer", default="7,15", help="comma-separated exit layers trained together")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--logit-chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each kind (phased, plain)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default=None, help="output name: benchmarks/results/train_profile_<tag>.json")
    parser.add_argument("--out", default=None, help="output path instead of the --tag name")
    parser.add_argument(
        "--head-path", choices=("causal", "cached"), default="causal",
        help="how a head's layer runs in training: causal attention without a cache (what train-head runs) or "
        "through a KV cache and an explicit mask (decoding's path; what train-head ran before 2026-12-04)",
    )  # fmt: skip
    parser.add_argument("--ops", type=int, default=0, help="also profile one plain step: its N costliest operators")
    args = parser.parse_args(argv)
    from sim.formats import check_benchmark_args

    check_benchmark_args(args)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.window < 2:
        parser.error("--steps, --batch-size >= 1, --warmup >= 0, --window >= 2")
    return args


def timed_steps(heads, optimizers, stream, config: TrainConfig, steps: int, phased: bool, device) -> dict[str, Any]:
    """`steps` steps, each timed whole (device synchronised at its ends); with `phased`, phase by phase too."""
    PHASES.enabled, PHASES.seconds = phased, {}
    walls, window_tokens, targets = [], 0, 0
    for _ in range(steps):
        synchronize(device)
        begin = time.perf_counter()
        _, _, batch = next(stream)
        if phased:
            PHASES.seconds[BATCH_PHASE] = PHASES.seconds.get(BATCH_PHASE, 0.0) + time.perf_counter() - begin
        train_step(heads, optimizers, batch, config, 0)
        synchronize(device)
        walls.append(time.perf_counter() - begin)
        window_tokens += int(batch.tokens.numel())
        targets += int(batch.targets.sum())
    PHASES.enabled = False
    return {
        "step_s": walls, "median_step_s": statistics.median(walls), "window_tokens": window_tokens,
        "target_tokens": targets, "window_tokens_per_s": window_tokens / sum(walls),
        "phase_s_per_step": {name: value / steps for name, value in PHASES.seconds.items()} if phased else None,
    }  # fmt: skip


def top_ops(heads, optimizers, stream, config: TrainConfig, count: int, device) -> list[dict[str, Any]]:
    """One plain step under torch.profiler: its `count` costliest operators by self time on the device (a GPU's
    kernels' time under each operator; the host's on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        timed_steps(heads, optimizers, stream, config, 1, False, device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:count]
    return [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key) / 1e3, 3)} for e in events]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(use_threads(args.threads))
    if args.head_path == "cached":  # the A/B twin: every head's layer through decoding's cache path
        for cls in HEAD_CLASSES.values():
            cls.layer_sequences = cls.cached_sequences
    device = check_device(args.device)
    model = load_model(args.model, dtype=resolve_dtype(args.dtype), device=device)
    layers = [int(x) for x in args.exit_layer.split(",")]
    config = TrainConfig(exit_layer=layers[0], exit_layers=tuple(layers[1:]), batch_size=args.batch_size,
                         window=args.window, logit_chunk=args.logit_chunk, lr=2e-3)  # fmt: skip
    source = RecordSource(args.corpus)
    check_corpus_model(source, model)
    adapter = ModelAdapter(model)
    heads = {e: new_head(adapter, e, init_layer="last") for e in config.layers}
    optimizers = make_optimizers(heads, config)
    stream = batch_stream(source, config, 0, 0)
    runs: dict[str, list[dict[str, Any]]] = {"phased": [], "plain": []}
    with frozen(model):
        for head in heads.values():
            head.train()
        timed_steps(heads, optimizers, stream, config, args.warmup, False, device) if args.warmup else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):  # interleaved: phased, plain, phased, plain
            runs["phased"].append(timed_steps(heads, optimizers, stream, config, args.steps, True, device))
            runs["plain"].append(timed_steps(heads, optimizers, stream, config, args.steps, False, device))
        ops = top_ops(heads, optimizers, stream, config, args.ops, device) if args.ops else None
    report = summary(args, runs, device) | {"environment": environment(args.threads), "head_path": args.head_path}
    if ops is not None:
        report["top_ops"] = ops
    if device.type == "cuda":
        report["environment"] |= {"label": "GPU benchmark", "device": torch.cuda.get_device_name(device)}
        report["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    report["environment"]["dtype"] = args.dtype
    print(text_table(report["table"], ["phase", "ms", "share"], {"ms": "ms / step", "share": "of a phased step"}))
    plain, phased = report["plain_median_step_s"] * 1e3, report["phased_median_step_s"] * 1e3
    print(f"plain steps: {report['plain_window_tokens_per_s']:.0f} window tokens/s ({plain:.1f} ms a step); "
          f"phased: {phased:.1f} ms")  # fmt: skip
    tag = args.tag or f"{Path(args.model).stem}_{device.type}"
    out = Path(args.out) if args.out else RESULTS / f"train_profile_{tag}.json"
    if ops is not None:
        print(text_table(ops, ["op", "calls", "self_ms"], {"self_ms": "self ms (one step)"}))
    print(f"wrote {write_json(out, report)}")
    return 0


def summary(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], device: torch.device) -> dict[str, Any]:
    phased = [s for run in runs["phased"] for s in run["step_s"]]
    plain = [s for run in runs["plain"] for s in run["step_s"]]
    names = list(runs["phased"][0]["phase_s_per_step"])
    per_step = {n: statistics.mean(run["phase_s_per_step"][n] for run in runs["phased"]) for n in names}
    total = statistics.mean(phased)  # the phases' shares of a mean phased step
    ranked = sorted(per_step.items(), key=lambda kv: -kv[1])
    table = [{"phase": n, "ms": round(v * 1e3, 2), "share": f"{v / total:.0%}"} for n, v in ranked]
    tokens = sum(run["window_tokens"] for run in runs["plain"])
    return {
        "benchmark": "train_profile", "model": str(args.model), "corpus": list(args.corpus),
        "exit_layers": args.exit_layer, "batch_size": args.batch_size, "window": args.window,
        "logit_chunk": args.logit_chunk, "steps_each": args.steps, "device_type": device.type,
        "phase_ms_per_step": {n: v * 1e3 for n, v in per_step.items()}, "table": table,
        "phased_median_step_s": statistics.median(phased), "plain_median_step_s": statistics.median(plain),
        "plain_window_tokens_per_s": tokens / sum(plain), "runs": runs,
    }  # fmt: skip


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
