"""`eesd calibrate link`: one-way transfer time vs message size between two pipeline stages, as a link profile.

- `gloo`: two CPU processes on this host (loopback), `torch.distributed` send/recv.
- `nccl`: two processes, one GPU each (`cuda:0`, `cuda:1`), send/recv.
- `cuda-copy`: one process, `copy_` from `cuda:0` to `cuda:1` (peer-to-peer when the GPUs allow it).

For the two-process backends each sample is a ping-pong (rank 0 sends, rank 1 sends the message back) and the
one-way time is half the round trip, so no clock has to be shared between processes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from calibrate.common import base_metadata, check_dtype, check_output_file, model_config, parse_int_list, percentile
from sim.formats import LinkRecord, write_link_profile

BACKENDS = ("gloo", "nccl", "cuda-copy")
DEFAULT_SIZES = (8, *(4**k for k in range(4, 13)))  # a token id, then 256 B .. 16 MiB
ACTIVATION_TOKENS = (1, 2, 4, 8, 16)  # tokens per message: a draft step .. a long verify pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ping_pong(rank: int, message: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """One-way µs per repeat, measured on rank 0 (rank 1 echoes)."""
    import torch.distributed as dist

    samples = []
    for index in range(warmup + repeats):
        if rank == 0:
            _sync(message.device)
            begin = time.perf_counter()
            dist.send(message, 1)
            dist.recv(message, 1)
            _sync(message.device)
            if index >= warmup:
                samples.append((time.perf_counter() - begin) * 1e6 / 2)
        else:
            dist.recv(message, 0)
            dist.send(message, 0)
    return samples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(rank: int, backend: str, port: int, sizes: list[int], warmup: int, repeats: int, out: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=2)
    try:
        results = {
            n: _ping_pong(rank, torch.zeros(n, dtype=torch.uint8, device=device), warmup, repeats) for n in sizes
        }
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({str(n): v for n, v in results.items()}))


def two_process_samples(backend: str, sizes: list[int], warmup: int, repeats: int) -> dict[int, list[float]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "samples.json")
        mp.spawn(_worker, args=(backend, _free_port(), sizes, warmup, repeats, out), nprocs=2, join=True)
        return {int(n): v for n, v in json.loads(Path(out).read_text()).items()}


def copy_samples(sizes: list[int], warmup: int, repeats: int) -> dict[int, list[float]]:
    """cuda:0 -> cuda:1 `copy_`, wall time between synchronisations of both devices."""
    results = {}
    for n in sizes:
        source = torch.zeros(n, dtype=torch.uint8, device="cuda:0")
        target = torch.empty(n, dtype=torch.uint8, device="cuda:1")
        samples = []
        for index in range(warmup + repeats):
            torch.cuda.synchronize("cuda:0")
            torch.cuda.synchronize("cuda:1")
            begin = time.perf_counter()
            target.copy_(source)
            torch.cuda.synchronize("cuda:0")
            torch.cuda.synchronize("cuda:1")
            if index >= warmup:
                samples.append((time.perf_counter() - begin) * 1e6)
        results[n] = samples
    return results


def link_records(samples: dict[int, list[float]]) -> list[LinkRecord]:
    records = []
    for n in sorted(samples):
        values = sorted(samples[n])
        records.append(LinkRecord(n, percentile(values, 0.5), percentile(values, 0.1), percentile(values, 0.9)))
    return records


def measure_link(backend: str, sizes: list[int], warmup: int, repeats: int) -> list[LinkRecord]:
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need --warmup >= 0 and --repeats >= 1, got {warmup} and {repeats}")
    if backend != "gloo" and torch.cuda.device_count() < 2:
        raise ValueError(f"--backend {backend} needs 2 GPUs, found {torch.cuda.device_count()}; use --backend gloo")
    if backend == "cuda-copy":
        return link_records(copy_samples(sizes, warmup, repeats))
    return link_records(two_process_samples(backend, sizes, warmup, repeats))


def activation_sizes(model: str, dtype_bytes: int) -> list[int]:
    """hidden_size × tokens × dtype bytes for a draft step up to a 16-token verify pass."""
    config = model_config(model)
    if config is None:
        from transformers import AutoConfig

        from executor.models import prepare_model

        config = AutoConfig.from_pretrained(prepare_model(model).hf_dir)
    return [config.hidden_size * tokens * dtype_bytes for tokens in ACTIVATION_TOKENS]


def run_link_cli(args: argparse.Namespace) -> int:
    check_output_file(args.out, args.force)
    sizes = list(DEFAULT_SIZES if args.sizes is None else parse_int_list(args.sizes, "--sizes", minimum=1))
    metadata: dict[str, Any] = {}
    if args.model is not None:
        dtype = check_dtype(args.dtype)
        extra = activation_sizes(args.model, torch.finfo(dtype).bits // 8)
        sizes = sorted(set(sizes) | set(extra))
        metadata["activation_nbytes"] = extra
    begin = time.perf_counter()
    records = measure_link(args.backend, sizes, args.warmup, args.repeats)
    devices = ("cuda:0", "cuda:1") if args.backend != "gloo" else ("cpu rank 0", "cpu rank 1")
    metadata = {
        **base_metadata(args.model or "-", torch.device("cpu"), torch.float32),
        **metadata,
        "backend": args.backend,
        "src": devices[0],
        "dst": devices[1],
        "method": "ping-pong, one-way = round trip / 2" if args.backend != "cuda-copy" else "copy_, wall time",
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    for key in ("dtype", "device_type"):
        metadata.pop(key)
    path = write_link_profile(args.out, metadata, records)
    print(f"wrote {path} ({len(records)} sizes, {time.perf_counter() - begin:.1f} s)")
    return 0
