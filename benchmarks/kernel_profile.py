"""Benchmark (not a test): where one decode step's device time goes, kernel by kernel.

`gpu_decode.py` says how fast a decoder runs; this says why. It takes the AR pass `generate` itself uses (the model's
cached, captured one: a CUDA graph replay under "graph" and "compile-layers"), launches it `--steps` times at a
mid-sequence position under `torch.profiler` (CUPTI reports the kernels a graph replays) and prints, per kernel
name, the launches and device microseconds per step and the share of the step, next to the wall time per step and
the bytes a step must read, the weights and the cached keys and values (the HBM floor at `--hbm-tbps`). JSON with
device, dtype, versions and date.

On a CPU there are no kernels: it reports the aten operators' own CPU time instead (a smoke test of the script).

    python benchmarks/kernel_profile.py --model llama7b --capture compile-layers --out X.json   # on the GPU
    python benchmarks/kernel_profile.py --model llama7b --capture compile-layers --prompt-len 3968 --out X.json  # 4k
    python benchmarks/kernel_profile.py --model tiny --device cpu --capture none --out X.json     # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

import executor
from executor.adapter import ModelAdapter
from executor.api import PassSetup
from executor.models import decode_weight_bytes, kv_cache_bytes, resolve_dtype
from executor.runtime import check_device, copy_tbps, datasheet_tbps
from executor.sampling import SamplingConfig
from sim.formats import write_text_atomic
from sim.policy import make_policy

PROMPT_LEN, NEW_TOKENS, NAME_WIDTH = 32, 64, 90


def build_model(name: str, layers: int | None, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """ "llama7b" (Llama-2-7B's shape, random weights), "tiny" (a 2-layer Llama, for a smoke test), or a path or
    packaged name `executor.load_model` reads."""
    shapes = {
        "llama7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers or 32,
                        num_attention_heads=32, num_key_value_heads=32),
        "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers or 2,
                     num_attention_heads=4, num_key_value_heads=2),
    }  # fmt: skip
    if name not in shapes:
        return executor.load_model(name, dtype=dtype, device=device)
    config = LlamaConfig(**shapes[name], max_position_embeddings=4096, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype).eval()


def ar_pass(adapter: ModelAdapter, prompt: list[int], capture: str):
    """The cached passes of a greedy AR setup after one real `generate` (which captures or compiles them), and a
    function that refills the AR step's input at a mid-sequence position."""
    executor.generate(adapter, [prompt], method="ar", max_new_tokens=NEW_TOKENS, capture=capture)
    setup = PassSetup("ar", SamplingConfig(), 0, [], None, None, [make_policy("fixed:1")], capture)
    passes = setup.passes(adapter, [prompt], NEW_TOKENS)
    at = len(prompt) + NEW_TOKENS // 2
    return passes, lambda: passes.load([1], [at], 1)


def profile_steps(passes, reset, steps: int, device: torch.device) -> tuple[list[dict[str, Any]], float]:
    """Kernel (GPU) or operator (CPU) rows per step, and the wall milliseconds per step (outside the profiler)."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reset()
    for _ in range(3):
        passes.ar()
    reset()
    synchronize()
    begin = time.perf_counter()
    for _ in range(steps):
        passes.ar()
    synchronize()
    wall_ms = (time.perf_counter() - begin) / steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    reset()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            passes.ar()
        synchronize()
    return (kernel_rows(prof, steps) if device.type == "cuda" else operator_rows(prof, steps)), wall_ms


def kernel_rows(prof, steps: int) -> list[dict[str, Any]]:
    totals: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name].append(event.time_range.elapsed_us())
    return rows_of(totals, steps)


def operator_rows(prof, steps: int) -> list[dict[str, Any]]:
    totals: dict[str, list[float]] = defaultdict(list)
    for event in prof.key_averages():
        if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
            totals[event.key] += [event.self_cpu_time_total / event.count] * event.count
    return rows_of(totals, steps)


def rows_of(totals: dict[str, list[float]], steps: int) -> list[dict[str, Any]]:
    step_us = sum(sum(times) for times in totals.values()) / steps
    rows = [
        {"name": name, "per_step": len(times) / steps, "us_per_step": sum(times) / steps,
         "share": sum(times) / steps / step_us if step_us else 0.0, "median_us": statistics.median(times)}
        for name, times in totals.items()
    ]  # fmt: skip
    return sorted(rows, key=lambda r: -r["us_per_step"])


def table(rows: list[dict[str, Any]], top: int, unit: str) -> str:
    lines = [f"| {unit} | per step | µs per step | share | median µs |", "| --- | --- | --- | --- | --- |"]
    for r in rows[:top]:
        name = r["name"] if len(r["name"]) <= NAME_WIDTH else r["name"][: NAME_WIDTH - 1] + "…"
        numbers = f"{r['per_step']:.1f} | {r['us_per_step']:.1f} | {100 * r['share']:.1f}% | {r['median_us']:.1f}"
        lines.append(f"| {name} | {numbers} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama7b", help="llama7b | tiny | a packaged name or a local path")
    parser.add_argument("--layers", type=int, default=None, help="layers of llama7b / tiny (default: 32 / 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--capture", default="auto", help="the AR pass's capture mode (generate's capture=)")
    parser.add_argument("--steps", type=int, default=20, help="AR steps profiled (and timed)")
    parser.add_argument(
        "--prompt-len", type=int, default=PROMPT_LEN, help="random prompt tokens: the steps run at this context plus "
        f"{NEW_TOKENS // 2} (e.g. 3968 on llama7b: a 4k cache; the floor then counts its keys and values)",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=25, help="rows printed (the JSON has them all)")
    parser.add_argument(
        "--hbm-tbps",
        type=float,
        default=None,
        help="bandwidth of the floor (TB/s; default: a device copy measured in the run, as gpu_decode.py's floor)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from sim.formats import check_benchmark_args

    check_benchmark_args(args)
    if args.steps < 1 or args.top < 1 or args.prompt_len < 1:
        parser.error(f"--steps, --top and --prompt-len must be >= 1, got {args.steps}, {args.top}, {args.prompt_len}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = check_device(args.device), resolve_dtype(args.dtype)
    model = build_model(args.model, args.layers, dtype, device)
    adapter = ModelAdapter(model)
    prompt = torch.randint(1, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        passes, reset = ar_pass(adapter, prompt.tolist(), args.capture)
        rows, wall_ms = profile_steps(passes, reset, args.steps, device)
    weights, cached = decode_weight_bytes(model), kv_cache_bytes(model, args.prompt_len + NEW_TOKENS // 2)
    tbps = copy_tbps(device) if args.hbm_tbps is None else args.hbm_tbps
    floor_ms = (weights + cached) / (tbps * 1e12) * 1e3
    source = "a copy measured now" if args.hbm_tbps is None else "--hbm-tbps"
    unit = "kernel" if device.type == "cuda" else "aten operator (CPU self time)"
    measured_ms = sum(r["us_per_step"] for r in rows) / 1e3
    print(f"{args.model} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}, "
          f"{dtype}, capture {passes.capture}: {wall_ms:.3f} ms per step (wall), {measured_ms:.3f} ms in the profiled "
          f"{unit}s, HBM floor {floor_ms:.3f} ms at {tbps:.2f} TB/s ({source})")  # fmt: skip
    print(table(rows, args.top, unit))
    report = {
        "benchmark": "kernel_profile", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, "
        f"{os.cpu_count()} cores)", "dtype": str(dtype), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": sys.version.split()[0], "model": args.model,
        "layers": model.config.num_hidden_layers, "capture": passes.capture, "steps": args.steps,
        "wall_ms_per_step": wall_ms, "profiled_ms_per_step": measured_ms, "unit": unit,
        "prompt_len": args.prompt_len, "weight_bytes": weights, "kv_bytes": cached,
        "hbm_tbps": tbps, "hbm_tbps_source": source, "datasheet_tbps": datasheet_tbps(device),
        "hbm_floor_ms": floor_ms, "of_floor": floor_ms / wall_ms, "rows": rows,
    }  # fmt: skip
    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
