"""How a torch command runs on this machine: its torch threads and its device, shared by every torch command.

`eesd generate`, `train-head`, `calibrate` and `validate` take `--threads` (`add_threads_argument`) and `--device`;
the threads are checked without importing torch and applied (`use_threads`) with a line for the run's header; a
device is checked once (`check_device`), so that `--device cuda` on a CPU-only torch is one line, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MAX_DEFAULT_THREADS = 8  # beyond this, one decode's small matrix products gain little from more threads


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one: a container's or taskset's share)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads(cpus: int | None = None) -> int:
    """The torch threads a command uses without `--threads`: 1 on a machine with at most 2 CPUs, else half the CPUs,
    at most `MAX_DEFAULT_THREADS`.

    torch's own default (one thread per core) is the worst choice on a small or shared box: decoding is a chain of
    small matrix products, and on a busy 2-core machine its threads wait on each other for milliseconds per operation
    (EESD fell to 0.6-2.3 tokens/s with torch's default against 4.5 with one thread). Half the CPUs leaves room for
    the host work between passes and for other processes; a batch-1 decode gains little past a few threads.
    """
    cpus = cpu_count() if cpus is None else cpus
    return 1 if cpus <= 2 else min(cpus // 2, MAX_DEFAULT_THREADS)


def add_threads_argument(parser: argparse.ArgumentParser, preferred: str | None = None) -> None:
    """`--threads N`; its default (None) is `default_threads()`, or what the command `preferred` (named in the help)
    when it has one."""
    default = f"1 on <= 2 CPUs, else half the CPUs up to {MAX_DEFAULT_THREADS}: {default_threads()} here"
    default = f"{preferred}; without one, {default}" if preferred else default
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N", help=f"torch CPU threads (default: {default})"
    )


def flag_defaults(add_arguments: Callable[[argparse.ArgumentParser], None]) -> dict[str, Any]:
    """A command's flags' defaults as its own `add_arguments` sets them (by argparse destination): what a check that
    refuses a flag the run would ignore compares against, without a copy of the defaults to drift from."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return {action.dest: action.default for action in parser._actions}


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")


def use_threads(threads: int | None, default: int | None = None) -> str:
    """Set torch's threads to `threads` (or `default`, or `default_threads()`); returns the run's header line."""
    check_threads(threads)
    import torch

    chosen = threads if threads is not None else (default if default is not None else default_threads())
    torch.set_num_threads(chosen)
    source = "--threads" if threads is not None else "default; --threads N to change"
    return f"torch threads: {chosen} of {cpu_count()} CPUs ({source})"


def threads_in(device_description: str) -> int | None:
    """The torch threads a CPU calibration ran with, from its metadata's device (`calibrate.common.device_name`:
    'CPU: ... (2 cores, 1 torch threads)'); None for a GPU's or an older description."""
    found = re.search(r"(\d+) torch threads?\b", device_description)
    return int(found.group(1)) if found else None


def check_device(name: str) -> torch.device:
    """`--device`: cpu or cuda[:N], and a CUDA device must be there (a one-line `ValueError` otherwise)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available to this torch {torch.__version__} (use cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA): around whatever is timed on a GPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


DATASHEET_TBPS = {"H100 80GB HBM3": 3.35, "H200": 4.8}  # HBM bandwidth (TB/s) by card name


def copy_tbps(device: torch.device, gib: float | None = None) -> float:
    """The device's copy bandwidth in TB/s: bytes read + written per second, median of 5 copies after one (2 GiB on a
    GPU, timed with CUDA events; 0.25 GiB of host memory on a CPU, timed with the host clock)."""
    import torch

    cuda = device.type == "cuda"
    size = int((gib or (2.0 if cuda else 0.25)) * 2**30)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(6):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            begin = time.perf_counter()
            target.copy_(source)
            times.append(time.perf_counter() - begin)
    del source, target
    return 2 * size / statistics.median(times[1:]) / 1e12


def datasheet_tbps(device: torch.device) -> float | None:
    """The card's HBM bandwidth from its datasheet (`DATASHEET_TBPS`), None for a CPU or a card not in the table."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((tbps for card, tbps in DATASHEET_TBPS.items() if card in name), None)


def parse_boundaries(text: str | None) -> list[int] | None:
    """`--stage-boundaries`' layer numbers (None where not given); a user's mistake is a ValueError naming the flag."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--stage-boundaries must be comma-separated layer numbers, e.g. 8,19, got {text!r}") from None


def stage_count(stages: int | None, cuts: list[int] | None) -> int:
    """`--stages`, or where it is not given as many stages as `--stage-boundaries`' cut points make (every bound,
    0 first: one fewer than the bounds), else 2."""
    if stages is not None:
        return stages
    if cuts is None:
        return 2
    return len(cuts) - 1 if cuts[:1] == [0] else len(cuts) + 1
