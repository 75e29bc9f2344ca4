"""Contention profiles: how k passes computing at once slow each other (docs/formats.md).

PPSD's `streams` backend measures it on a GPU: `benchmarks/gpu_decode.py` times each stage's pass alone (its PPSD
rows' `pass_costs_ms`, "stage 1" .. "stage n": back-to-back captured launches) and the stages of every tick together
(CUDA events around each stage of each tick: "device per tick"). `from_gpu_decode` turns those rows into a contention
profile, one row per stage count k: the k passes' sum and longest alone, and their time together. The simulator reads
it as an overlap factor (sim/contention.py). The conversion is torch-free and runs no model.

    eesd calibrate contention benchmarks/results/gpu_decode_nvidia_h100_smollm2_lease1.json \\
        --capture compile-layers --out calibration/h100/contention_smollm2-135m_cuda_bf16_compiled.csv

With `--model` it measures a `processes` profile instead: k stage processes of the distributed backend on this host
(`calibrate.processes`, which imports torch). (`python -m calibrate.contention` takes the same arguments.) An existing
`--out` is overwritten only with `--force`; the file is written atomically (`sim.formats`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sim.contention import overlap_factor
from sim.formats import (
    MAX_FILE_BYTES,
    ContentionRecord,
    quote,
    read_contention_profile,
    read_text,
    write_contention_profile,
)

STREAMS_ROW = re.compile(r"ppsd streams n=(?P<stages>\d+)$")  # the shared head's rows at the default sync cadence


def contention_record(pass_costs_ms: Mapping[str, Any]) -> ContentionRecord:
    """One row from a PPSD row's `pass_costs_ms`: its stages alone and its device time per tick, in µs."""
    if not isinstance(pass_costs_ms, Mapping):
        raise ValueError(f"pass_costs_ms must be an object of milliseconds, got {quote(pass_costs_ms)}")
    stages = [_ms(pass_costs_ms, name) for name in pass_costs_ms if str(name).startswith("stage ")]
    if len(stages) < 2 or "device per tick" not in pass_costs_ms:
        names = quote(sorted(map(str, pass_costs_ms)))
        raise ValueError(f"expected 'stage 1' .. 'stage n' (n >= 2) and 'device per tick', got {names}")
    together = _ms(pass_costs_ms, "device per tick")
    return ContentionRecord(len(stages), sum(stages), max(stages), together, together, together)


def _ms(costs: Mapping[str, Any], name: str) -> float:
    """`costs[name]` (milliseconds) in µs; a ValueError naming the entry if it is not a number."""
    value = costs[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"pass_costs_ms[{name!r}] must be a number of milliseconds, got {quote(value)}")
    return 1e3 * value


def from_gpu_decode(document: Mapping[str, Any], capture: str) -> tuple[dict[str, Any], list[ContentionRecord]]:
    """(metadata, rows) of a contention profile from a `gpu_decode` JSON: every `ppsd streams n=K` row of `capture`
    that measured its stages; a ValueError if there is none, or if two rows measure the same stage count."""
    rows = document.get("rows") if isinstance(document, Mapping) else None
    if not isinstance(rows, list):
        raise ValueError("expected a benchmarks/gpu_decode.py JSON: an object with a 'rows' list")
    rows = [
        row
        for row in rows
        if isinstance(row, Mapping)
        and STREAMS_ROW.match(str(row.get("method", "")))
        and row.get("capture") == capture
        and row.get("pass_costs_ms")
    ]
    if not rows:
        raise ValueError(f"no 'ppsd streams n=K' row with capture {capture!r} and pass_costs_ms in the document")
    device = document.get("device")
    if not isinstance(device, str) or not device:
        raise ValueError(f"'device' must name the GPU the rows ran on, got {quote(device)}")
    records = []
    for row in rows:
        try:
            records.append(contention_record(row["pass_costs_ms"]))
        except ValueError as err:
            raise ValueError(f"row {row['method']!r}: {err}") from None
    records.sort(key=lambda r: r.passes)
    counts = [r.passes for r in records]
    if len(set(counts)) != len(counts):
        methods = [row["method"] for row in rows]
        raise ValueError(f"two rows measure the same stage count with capture {capture!r}: {quote(methods)}")
    metadata = {
        "device": device,
        "backend": "streams",
        "dtype": document.get("dtype"),
        "capture": capture,
        "model": sorted({str(row.get("model")) for row in rows}),
        "date": document.get("date"),
        "rows": [row["method"] for row in rows],
        "alone": "each stage's captured pass, back-to-back launches (gpu_decode pass_costs_ms 'stage s')",
        "together": "the stages of each tick on their streams, CUDA events, mean per tick ('device per tick')",
    }
    return metadata, records


def write_from_gpu_decode(bench: Path, capture: str, out: Path, force: bool = False) -> Path:
    """`from_gpu_decode` of the JSON file `bench`, written to `out` (its metadata names the source file). An
    existing `out` is overwritten only with `force`; every error is a ValueError naming the file it is about."""
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; --out names the contention profile (a .csv file)")
    if out.exists() and not force:
        raise ValueError(f"--out {out} exists; pass --force to overwrite it")
    if not bench.is_file():
        raise ValueError(f"{bench}: no such file (expected a benchmarks/gpu_decode.py JSON)")
    try:
        document = json.loads(read_text(bench, MAX_FILE_BYTES, "gpu_decode JSON"))
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{bench}: not JSON ({type(err).__name__}: {err})") from None
    try:
        metadata, records = from_gpu_decode(document, capture)
    except ValueError as err:
        raise ValueError(f"{bench}: {err}") from None
    return write_contention_profile(out, {**metadata, "source": bench.name}, records)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `eesd calibrate contention` and `python -m calibrate.contention`."""
    parser.add_argument(
        "bench", type=Path, nargs="?", default=None,
        help="a benchmarks/gpu_decode.py JSON with PPSD streams rows (or measure stage processes: --model)",
    )  # fmt: skip
    parser.add_argument(
        "--capture", default="compile-layers",
        help="with a benchmark JSON: the rows' capture mode (default: compile-layers)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="the contention profile to write (CSV)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    measured = parser.add_argument_group(
        "measured here: k PPSD stage processes on this host's cores (the distributed backend on one CPU host)"
    )
    measured.add_argument("--model", default=None, help="the model: a packaged name or a local path")
    measured.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    measured.add_argument("--processes", default="2", help="stage counts k to measure, comma-separated (default: 2)")
    measured.add_argument("--exit-layer", type=int, default=None, help="stage 1's exit layer (default: its end)")
    measured.add_argument("--batch", default="1", help="rows a pass decodes, comma-separated (default: 1)")
    measured.add_argument("--context", type=int, default=128, help="the context a pass attends over (default: 128)")
    measured.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    measured.add_argument("--repeats", type=int, default=20, help="ticks per round, alone and together (default: 20)")
    measured.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")


def run(args: argparse.Namespace) -> int:
    """Write the profile and say what it holds: the stage counts and their overlap factors."""
    if (args.bench is None) == (args.model is None):
        raise ValueError("give a benchmarks/gpu_decode.py JSON (GPU streams) or --model (stage processes here), "
                         "one of the two")  # fmt: skip
    _check_mode_flags(args)
    if args.model is not None:
        path = _write_measured(args)
    else:
        path = write_from_gpu_decode(args.bench, args.capture, args.out, args.force)
    profile = read_contention_profile(path)
    factors = ", ".join(
        f"k={r.passes}{'' if r.batch is None else f' batch {r.batch}'}: "
        f"f={overlap_factor(r.alone_sum_us, r.alone_max_us, r.median_us):.3f}"
        for r in profile.records
    )
    print(f"wrote {path} ({profile.metadata['device']}, overlap factor {factors})")
    return 0


# the flags of one way of making a profile: (flag, argument); the other way would ignore them
CONVERTING = (("--capture", "capture"),)
MEASURING = (
    ("--dtype", "dtype"), ("--processes", "processes"), ("--exit-layer", "exit_layer"), ("--batch", "batch"),
    ("--context", "context"), ("--threads", "threads"), ("--repeats", "repeats"), ("--rounds", "rounds"),
)  # fmt: skip


def _check_mode_flags(args: argparse.Namespace) -> None:
    """Refuse a flag the chosen way ignores: the measuring flags with a benchmark JSON, --capture with --model."""
    from executor.runtime import flag_defaults  # torch-free

    defaults = flag_defaults(add_arguments)
    ignored, mode = (CONVERTING, "a benchmarks/gpu_decode.py JSON") if args.model else (MEASURING, "--model")
    for flag, name in ignored:
        if getattr(args, name) != defaults[name]:
            raise ValueError(f"{flag} is for {mode}: drop it (it would be ignored)")


def _write_measured(args: argparse.Namespace) -> Path:
    """Measure stage processes (`calibrate.processes`, torch) and write their profile."""
    from calibrate.common import check_counts, check_output_file, parse_int_list
    from calibrate.processes import check_layout, measure_contention

    check_output_file(args.out, args.force)
    processes = parse_int_list(args.processes, "--processes", minimum=2)
    batches = parse_int_list(args.batch, "--batch", minimum=1)
    check_counts(("--context", args.context), ("--threads", args.threads), ("--repeats", args.repeats),
                 ("--rounds", args.rounds))  # fmt: skip
    check_layout(args.model, args.dtype, processes, args.exit_layer, args.context)
    metadata, records = measure_contention(
        args.model, args.dtype, processes, batches, args.exit_layer, args.context, args.threads,
        args.repeats, args.rounds,
    )  # fmt: skip
    return write_contention_profile(args.out, metadata, records)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrate.contention", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (OSError, ValueError) as err:
        print(f"calibrate.contention: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
