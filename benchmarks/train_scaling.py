"""Benchmark (not a test): exit-head training throughput and peak memory as the corpus grows (1x, 10x, ...).

`executor.train_head` streams its corpus: one shard of token ids and one batch's teacher pass at a time, so memory
should not grow with the corpus. This measures it. Per scale s, a corpus of s x `--base-tokens` tokens is built with
`eesd corpus` from a teacher-forced text source (the Python stdlib's sources and docstrings, `--sources
python-env`; the same seeded file order, so the 1x corpus is the start of the 10x one), and a head is trained on it
for the same `--steps` in a fresh process, so that the run time is the same and only the corpus size differs. That
process reports:
- throughput: window tokens (teacher + heads) and target tokens distilled per second of the training call (the
  head and its checkpoint written at the end included);
- memory: the resident set after the model loaded, the peak resident set during training (Linux `VmHWM` after
  resetting it through /proc/self/clear_refs once the model is in; where that reset is refused, the process's
  whole peak, labelled), and the training's extra = peak - resident after load; `ru_maxrss` as a cross-check.

    python benchmarks/train_scaling.py --model smollm2-135m --exit-layer 15 --base-tokens 20000 --scales 1,10 \
        --steps 10 --batch-size 4 --window 256 --tag smollm2-135m_cpu

Writes benchmarks/results/train_scaling_<tag>.json (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from head_speed import environment, write_json

from sim.tables import text_table

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024


def proc_status_kib(field: str) -> int | None:
    """A `VmXXX:` field of /proc/self/status in KiB (None where there is no such file or field)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS; False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def train_once(args: argparse.Namespace) -> dict[str, Any]:
    """The worker: load the model, train `args.steps` steps on `args.worker`'s corpus, report time and memory."""
    import torch

    from executor.models import load_model
    from executor.train_head import TrainConfig, train_head_corpus

    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="float32")
    rss_loaded, peak_loading = proc_status_kib("VmRSS"), proc_status_kib("VmHWM")
    reset = reset_peak_rss()
    config = TrainConfig(
        exit_layer=args.exit_layer, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        checkpoint_every=args.steps, schedule="cosine", window=args.window,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="train_scaling_") as out:
        begin = time.perf_counter()
        _, state = train_head_corpus(model, args.worker, config, Path(out) / "head.safetensors", progress=False)
        wall = time.perf_counter() - begin
        peak = proc_status_kib("VmHWM")
    return {
        "steps": state.step, "epochs_started": state.epoch + 1, "tokens_seen": state.tokens_seen,
        "targets_seen": state.targets_seen, "train_wall_s": wall, "tokens_per_s": state.tokens_seen / wall,
        "targets_per_s": state.targets_seen / wall, "rss_after_load_mib": mib(rss_loaded),
        "peak_rss_loading_mib": mib(peak_loading), "peak_rss_training_mib": mib(peak),
        "peak_rss_training_scope": "training only (VmHWM reset after the model loaded)" if reset
        else "whole process (the VmHWM reset was refused)",
        "training_extra_mib": None if None in (peak, rss_loaded) else (peak - rss_loaded) / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


def build_corpus(args: argparse.Namespace, tokens: int, out: Path) -> dict[str, Any]:
    """`eesd corpus` of `tokens` stdlib tokens into `out`; returns its manifest's totals and shard count."""
    command = [sys.executable, "-m", "executor.cli", "corpus", "--model", args.model, "--sources", "python-env",
               "--python-env", "stdlib", "--max-tokens-per-source", str(tokens), "--window", str(args.window),
               "--shard-records", str(args.shard_records), "--seed", str(args.seed), "--threads", "1", "--force",
               "--no-progress", "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"corpus_command": " ".join(command[1:]), **manifest["totals"], "shards": len(manifest["shards"])}


def worker_command(args: argparse.Namespace, corpus: Path) -> list[str]:
    options = ("model", "exit_layer", "steps", "batch_size", "window", "lr", "seed", "threads")
    flags = [item for name in options for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    return [sys.executable, str(Path(__file__).resolve()), "--worker", str(corpus), *flags]


def measure_scale(args: argparse.Namespace, scale: int, root: Path) -> dict[str, Any]:
    """Build the corpus of one scale, train on it in a fresh process, return the row."""
    corpus = root / f"corpus_{scale}x"
    row = {"scale": scale, "requested_tokens": scale * args.base_tokens, **build_corpus(args, scale * args.base_tokens,
                                                                                        corpus)}  # fmt: skip
    done = subprocess.run(worker_command(args, corpus), check=True, capture_output=True, text=True)
    row |= json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {scale}x: {row['tokens']} corpus tokens, {row['tokens_per_s']:.0f} tok/s, "
          f"peak {row['peak_rss_training_mib']:.0f} MiB", flush=True)  # fmt: skip
    return row


SCALING_COLUMNS = {
    "scale": "corpus", "tokens": "tokens", "shards": "shards", "steps": "steps", "train_wall_s": "train s",
    "tokens_per_s": "window tok/s", "targets_per_s": "target tok/s", "rss_after_load_mib": "RSS after load MiB",
    "peak_rss_training_mib": "peak training MiB", "training_extra_mib": "extra MiB",
}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    shown = [{key: f"{r[key]}x" if key == "scale" else r[key] for key in SCALING_COLUMNS} for r in rows]
    return text_table(shown, list(SCALING_COLUMNS), SCALING_COLUMNS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--exit-layer", type=int, default=15)
    parser.add_argument("--base-tokens", type=int, default=20_000, help="the 1x corpus's tokens")
    parser.add_argument("--scales", default="1,10", help="corpus sizes in multiples of --base-tokens")
    parser.add_argument("--steps", type=int, default=10, help="training steps at every scale")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=256, help="tokens per corpus and training window")
    parser.add_argument("--shard-records", type=int, default=64, help="records per corpus shard (what one read holds)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--tag", default="cpu", help="results/train_scaling_<tag>.json")
    parser.add_argument("--out", type=Path, default=None, help="the JSON's path (overrides --tag)")
    parser.add_argument("--note", default="", help="the conditions, for the JSON (e.g. 'busy 2-core box')")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # one scale's training process
    args = parser.parse_args(argv)
    from sim.formats import check_benchmark_args

    check_benchmark_args(args)
    args.scale_list = [int(s) for s in args.scales.split(",") if s.strip()]
    for name in ("base_tokens", "steps", "batch_size", "window", "shard_records", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.scale_list or min(args.scale_list) < 1:
        parser.error(f"--scales must be integers >= 1, got {args.scales!r}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(train_once(args)))
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="train_scaling_") as root:
        rows = [measure_scale(args, scale, Path(root)) for scale in args.scale_list]
    report = environment(args.threads) | {
        "model": args.model, "note": args.note,
        "load_average_1_5_15_before": list(load_before), "load_average_1_5_15_after": list(os.getloadavg()),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "scale_list")},
        "method": "per scale: eesd corpus (python-env stdlib, teacher-forced windows), then train_head_corpus for "
        "--steps steps in a fresh process; throughput over the training call, memory from /proc/self/status",
        "rows": rows,
    }  # fmt: skip
    print(table(rows))
    out = args.out or RESULTS / f"train_scaling_{args.tag}.json"
    print(f"wrote {write_json(out, report)}")


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
