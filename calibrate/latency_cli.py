"""`eesd calibrate latency`: arguments -> settings -> `calibrate.latency.calibrate_latency`."""

from __future__ import annotations

import argparse
import time

import torch

from calibrate.common import (
    OTHER_WORK_NOTE_CORES,
    base_metadata,
    check_device,
    check_dtype,
    check_output_folder,
    device_memory_bytes,
    device_name,
    estimated_weight_bytes,
    load,
    model_config,
    parse_int_list,
    slug,
)
from calibrate.latency import (
    COMPILED_GPU_GRID,
    CPU_GRID,
    FROZEN_CPU_GRID,
    GPU_GRID,
    Grid,
    LatencySettings,
    calibrate_latency,
    compiled_shapes,
    plan_points,
    profile_path,
)
from calibrate.timing import TimerSpec
from executor.adapter import check_architecture, context_of
from executor.passes import resolve_capture
from sim.formats import read_latency_profile

FEW_LAYERS = 4  # a model too large for the device is profiled from this many layers
COMPILE_COST = {"compiled": "a few seconds each", "frozen": "about a minute each on a small CPU"}
MEMORY_FRACTION = 0.6  # of the device's memory the weights may take (KV caches and activations need the rest)


def kernels_from_args(args: argparse.Namespace, device: torch.device) -> str:
    """--kernels, where "auto" is what the executor's capture="auto" runs on this device."""
    if args.kernels != "auto":
        return args.kernels
    return "compiled" if resolve_capture("auto", device, "greedy") == "compile-layers" else "eager"


def grid_from_args(args: argparse.Namespace, device: torch.device, kernels: str) -> Grid:
    if device.type == "cuda":
        default = COMPILED_GPU_GRID if kernels == "compiled" else GPU_GRID
    else:
        default = FROZEN_CPU_GRID if kernels == "frozen" else CPU_GRID

    def pick(text: str | None, flag: str, fallback: tuple[int, ...], minimum: int) -> tuple[int, ...]:
        return fallback if text is None else parse_int_list(text, flag, minimum)

    return Grid(
        q=pick(args.q, "--q", default.q, 1),
        context_len=pick(args.context, "--context", default.context_len, 0),
        batch=pick(args.batch, "--batch", default.batch, 1),
        prefill_q=pick(args.prefill, "--prefill", default.prefill_q, 1),
    )


def graph_modes(args: argparse.Namespace, device: torch.device, kernels: str) -> tuple[bool, ...]:
    from calibrate.cli import GRAPH_MODES

    if device.type != "cuda":
        if args.graphs not in (None, "off"):
            raise ValueError(f"--graphs {args.graphs}: CUDA graphs need --device cuda")
        return (False,)
    return GRAPH_MODES[args.graphs or ("on" if kernels == "compiled" else "both")]


def layers_to_keep(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> int | None:
    """--layers, or a few layers when the whole model would not fit the device."""
    if args.layers is not None:
        if args.layers < 1:
            raise ValueError(f"--layers must be >= 1, got {args.layers}")
        return args.layers
    config = model_config(args.model)
    if config is None or estimated_weight_bytes(config, dtype) <= MEMORY_FRACTION * device_memory_bytes(device):
        return None
    print(f"{args.model}: too large for {device}; profiling {FEW_LAYERS} of its {config.num_hidden_layers} layers")
    return FEW_LAYERS


def check_context(grid: Grid, max_positions: int, model: str, why: str = "") -> None:
    longest = max(max(grid.context_len) + max(grid.q), max(grid.prefill_q))
    if longest > max_positions:
        raise ValueError(
            f"--context/--q/--prefill reach position {longest}; {model} has {max_positions} positions{why}"
        )


def point_bytes(config, grid: Grid, dtype: torch.dtype) -> int:
    """An upper bound of what the grid's largest point holds at once (`calibrate.latency.make_inputs` and its pass):
    per row, the logits of its positions, one layer's KV cache, the attention mask and scores, the hidden states and
    the MLP's activations; the largest over the verify points (q at a context) and the prefill points (context 0)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_row = 2 * config.num_key_value_heads * head_dim
    activations = 4 * config.hidden_size + 3 * config.intermediate_size

    def per_row(q: int, span: int, logits: int) -> int:
        return (
            logits * config.vocab_size + span * kv_row + q * span * (1 + config.num_attention_heads) + q * activations
        )

    q, prefill = max(grid.q), max(grid.prefill_q)
    largest = max(per_row(q, max(grid.context_len) + q, q), per_row(prefill, prefill, 1))
    return max(grid.batch) * largest * torch.finfo(dtype).bits // 8


def check_grid_memory(config, grid: Grid, dtype: torch.dtype, device: torch.device) -> None:
    """The grid's largest point must fit in what the weights leave of the device's memory."""
    needed = point_bytes(config, grid, dtype)
    budget = (1 - MEMORY_FRACTION) * device_memory_bytes(device)
    if needed > budget:
        raise ValueError(
            f"--batch/--q/--prefill/--context: the largest point (batch {max(grid.batch)}, q {max(grid.q)}, "
            f"prefill {max(grid.prefill_q)}, context {max(grid.context_len)}) needs about {needed / 2**30:.1f} GiB, "
            f"more than the {budget / 2**30:.1f} GiB the weights leave free on {device}"
        )


def run_latency(args: argparse.Namespace, progress: bool) -> int:
    check_output_folder(args.out)
    device = check_device(args.device)
    dtype = check_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    kernels = kernels_from_args(args, device)
    grid = grid_from_args(args, device, kernels)
    cuda = device.type == "cuda"
    repeats = args.repeats if args.repeats is not None else (20 if cuda else 7)
    if args.warmup is not None and args.warmup < 1:
        raise ValueError(
            f"--warmup must be >= 1, got {args.warmup}: a shape's first call does one-time work (the CPU's choice of "
            "LM-head kernel order, allocations, compilation) that a profile must not time"
        )
    timer = TimerSpec(device, args.warmup if args.warmup is not None else (5 if cuda else 3), repeats)
    if args.max_new_points is not None and args.max_new_points < 0:
        raise ValueError(f"--max-new-points must be >= 0, got {args.max_new_points}")
    settings = LatencySettings(grid, graph_modes(args, device, kernels), timer, kernels, args.visits)
    if kernels in COMPILE_COST:
        shapes = compiled_shapes(plan_points(grid, settings.graph_modes))
        print(f"{kernels} kernels: {shapes} shapes to compile, {COMPILE_COST[kernels]} (fewer: --q, --context)")
    keep = layers_to_keep(args, device, dtype)
    name = args.model if keep is None else f"{slug(args.model)}-{keep}layers"  # latency_llama-2-7b-4layers_...
    out_path = profile_path(args.out, name, device, args.dtype or ("bf16" if cuda else "fp32"), kernels)
    if out_path.exists() and not args.force:
        raise ValueError(f"{out_path} exists; pass --force to measure the profile again and overwrite it")
    print(f"calibrate latency: {args.model} on {device_name(device)} -> {out_path}", flush=True)
    config = model_config(args.model)
    if config is not None:  # before the weights are made: a model not run or a grid that cannot fit refused at once
        for name in getattr(config, "architectures", None) or ():
            check_architecture(name)
        check_grid_memory(config, grid, dtype, device)
    loaded = load(args.model, dtype, device, keep)
    check_architecture(type(loaded.model).__name__)
    positions, why = context_of(loaded.model.config)
    check_context(grid, positions, args.model, why)
    check_grid_memory(loaded.model.config, grid, dtype, device)
    begin = time.perf_counter()
    metadata = base_metadata(args.model, device, dtype)
    partial = out_path.with_name(out_path.name + ".partial.jsonl")
    again = "run the same command again to go on" + (" (--force included)" if args.force else "")
    try:
        written = calibrate_latency(loaded, settings, out_path, metadata, args.max_new_points, progress)
    except KeyboardInterrupt:
        kept = f"(the measurements so far are kept in {partial}; {again})" if partial.exists() else ""
        raise KeyboardInterrupt(kept) from None
    elapsed = time.perf_counter() - begin
    if written is None:
        print(f"stopped after {args.max_new_points} new measurements ({elapsed:.1f} s), kept in {partial}; {again}")
        return 3
    print(f"wrote {written} ({elapsed:.1f} s)")
    busy = read_latency_profile(written).metadata.get("other_work_cores")
    if busy is not None and busy >= OTHER_WORK_NOTE_CORES:
        print(f"note: other work used {busy:.2f} cores while it measured (the machine's busy CPU less this run's own): "
              "these latencies are the shared box's; measure again on a quiet one, or take --visits 3")  # fmt: skip
    return 0
