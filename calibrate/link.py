"""`eesd calibrate link`: one-way transfer time vs message size between two pipeline stages, as a link profile.

- `gloo`: two CPU processes on this host (loopback), `torch.distributed` send/recv.
- `nccl`: two processes, one GPU each (`cuda:0`, `cuda:1`), send/recv.
- `cuda-copy`: one process, `copy_` from `cuda:0` to `cuda:1` (peer-to-peer when the GPUs allow it).

For the two-process backends each sample is a ping-pong (rank 0 sends, rank 1 sends the message back) and the
one-way time is half the round trip, so no clock has to be shared between processes. Back to back (the default) a
message finds its receiver waiting, awake; with `--busy-ms` both ranks first compute that long, as PPSD's
distributed ranks run a stage pass between a tick's messages, and the receiver wakes from its work: on a 2-core VM
that raised the mean one-way time of a few KB from 0.09 to about 0.9 ms, with a long tail. Each size records its
mean besides the median and percentiles; the simulator prices a message at its mean where the profile has one.
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

from calibrate.common import base_metadata, check_dtype, check_output_file, config_of, parse_int_list, percentile
from sim.formats import LinkRecord, write_link_profile

BACKENDS = ("gloo", "nccl", "cuda-copy")
DEFAULT_SIZES = (8, *(4**k for k in range(4, 13)))  # a token id, then 256 B .. 16 MiB
ACTIVATION_TOKENS = (1, 2, 4, 8, 16)  # tokens per message: a draft step .. a long verify pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ping_pong(rank: int, message: torch.Tensor, warmup: int, repeats: int, busy_ms: float = 0.0) -> list[float]:
    """One-way µs per repeat, measured on rank 0 (rank 1 echoes); with `busy_ms`, both ranks compute that long
    before each exchange, as a lockstep tick's messages follow its passes."""
    import torch.distributed as dist

    samples = []
    work = torch.ones(256, 256)
    for index in range(warmup + repeats):
        _compute(work, busy_ms)
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


def _compute(work: torch.Tensor, busy_ms: float) -> None:
    """Keep this process's core busy with matrix products for `busy_ms` (none for 0)."""
    end = time.perf_counter() + busy_ms / 1e3
    while time.perf_counter() < end:
        work @ work


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(
    rank: int, backend: str, port: int, sizes: list[int], warmup: int, repeats: int, out: str, busy_ms: float
) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=2)
    try:
        results = {
            n: _ping_pong(rank, torch.zeros(n, dtype=torch.uint8, device=device), warmup, repeats, busy_ms)
            for n in sizes
        }
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({str(n): v for n, v in results.items()}))


def two_process_samples(
    backend: str, sizes: list[int], warmup: int, repeats: int, busy_ms: float = 0.0
) -> dict[int, list[float]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "samples.json")
        mp.spawn(_worker, args=(backend, _free_port(), sizes, warmup, repeats, out, busy_ms), nprocs=2, join=True)
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
        middle, low, high = (percentile(values, q) for q in (0.5, 0.1, 0.9))
        records.append(LinkRecord(n, middle, low, high, sum(values) / len(values)))
    return records


def measure_link(backend: str, sizes: list[int], warmup: int, repeats: int, busy_ms: float = 0.0) -> list[LinkRecord]:
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need --warmup >= 0 and --repeats >= 1, got {warmup} and {repeats}")
    if not 0 <= busy_ms <= 10_000 or (busy_ms and backend != "gloo"):
        raise ValueError(f"--busy-ms must be in [0, 10000] and applies to --backend gloo (CPU processes), got "
                         f"{busy_ms} with {backend}")  # fmt: skip
    if backend != "gloo" and torch.cuda.device_count() < 2:
        raise ValueError(f"--backend {backend} needs 2 GPUs, found {torch.cuda.device_count()}; use --backend gloo")
    if backend == "cuda-copy":
        return link_records(copy_samples(sizes, warmup, repeats))
    return link_records(two_process_samples(backend, sizes, warmup, repeats, busy_ms))


def activation_sizes(model: str, dtype_bytes: int) -> list[int]:
    """hidden_size × tokens × dtype bytes for a draft step up to a 16-token verify pass."""
    config = config_of(model)
    return [config.hidden_size * tokens * dtype_bytes for tokens in ACTIVATION_TOKENS]


def _method(backend: str, busy_ms: float) -> str:
    if backend == "cuda-copy":
        return "copy_, wall time"
    after = f", each after {busy_ms:g} ms of computing on both ranks" if busy_ms else ""
    return f"ping-pong, one-way = round trip / 2{after}"


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
    records = measure_link(args.backend, sizes, args.warmup, args.repeats, args.busy_ms)
    devices = ("cuda:0", "cuda:1") if args.backend != "gloo" else ("cpu rank 0", "cpu rank 1")
    metadata = {
        **base_metadata(args.model or "-", torch.device("cpu"), torch.float32),
        **metadata,
        "backend": args.backend,
        "src": devices[0],
        "dst": devices[1],
        "method": _method(args.backend, args.busy_ms),
        "busy_ms": args.busy_ms,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    for key in ("dtype", "device_type"):
        metadata.pop(key)
    path = write_link_profile(args.out, metadata, records)
    print(f"wrote {path} ({len(records)} sizes, {time.perf_counter() - begin:.1f} s)")
    return 0
