"""Contention profiles: how k passes launched together on one device share it (docs/formats.md).

PPSD's `streams` backend measures it on a GPU: `benchmarks/gpu_decode.py` times each stage's pass alone (its PPSD
rows' `pass_costs_ms`, "stage 1" .. "stage n": back-to-back captured launches) and the stages of every tick together
(CUDA events around each stage of each tick: "device per tick"). `from_gpu_decode` turns those rows into a contention
profile, one row per stage count k: the k passes' sum and longest alone, and their time together. The simulator reads
it as an overlap factor (sim/contention.py). Torch-free.

    python -m calibrate.contention benchmarks/results/gpu_decode_nvidia_h100_smollm2_lease1.json \\
        --capture compile-layers --out calibration/h100/contention_smollm2-135m_cuda_bf16_compiled.csv
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sim.formats import ContentionRecord, write_contention_profile

STREAMS_ROW = re.compile(r"ppsd streams n=(?P<stages>\d+)$")  # the shared head's rows at the default sync cadence


def contention_record(pass_costs_ms: Mapping[str, float]) -> ContentionRecord:
    """One row from a PPSD row's `pass_costs_ms`: its stages alone and its device time per tick, in µs."""
    stages = [1e3 * ms for name, ms in pass_costs_ms.items() if name.startswith("stage ")]
    if len(stages) < 2 or "device per tick" not in pass_costs_ms:
        raise ValueError(f"expected 'stage 1' .. 'stage n' (n >= 2) and 'device per tick', got {sorted(pass_costs_ms)}")
    together = 1e3 * pass_costs_ms["device per tick"]
    return ContentionRecord(len(stages), sum(stages), max(stages), together, together, together)


def from_gpu_decode(document: Mapping[str, Any], capture: str) -> tuple[dict[str, Any], list[ContentionRecord]]:
    """(metadata, rows) of a contention profile from a `gpu_decode` JSON: every `ppsd streams n=K` row of `capture`
    that measured its stages; a ValueError if there is none."""
    rows = [
        row
        for row in document.get("rows", [])
        if STREAMS_ROW.match(row.get("method", "")) and row.get("capture") == capture and row.get("pass_costs_ms")
    ]
    if not rows:
        raise ValueError(f"no 'ppsd streams n=K' row with capture {capture!r} and pass_costs_ms in the document")
    records = sorted((contention_record(row["pass_costs_ms"]) for row in rows), key=lambda r: r.passes)
    metadata = {
        "device": document.get("device"),
        "backend": "streams",
        "dtype": document.get("dtype"),
        "capture": capture,
        "model": sorted({row.get("model") for row in rows}),
        "date": document.get("date"),
        "rows": [row["method"] for row in rows],
        "alone": "each stage's captured pass, back-to-back launches (gpu_decode pass_costs_ms 'stage s')",
        "together": "the stages of each tick on their streams, CUDA events, mean per tick ('device per tick')",
    }
    return metadata, records


def write_from_gpu_decode(bench: Path, capture: str, out: Path) -> Path:
    """`from_gpu_decode` of the JSON file `bench`, written to `out` (its metadata names the source file)."""
    metadata, records = from_gpu_decode(json.loads(bench.read_text(encoding="utf-8")), capture)
    return write_contention_profile(out, {**metadata, "source": bench.name}, records)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrate.contention", description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="a benchmarks/gpu_decode.py JSON with PPSD streams rows")
    parser.add_argument("--capture", default="compile-layers", help="the rows' capture mode (default: compile-layers)")
    parser.add_argument("--out", type=Path, required=True, help="the contention profile to write (CSV)")
    args = parser.parse_args(argv)
    try:
        path = write_from_gpu_decode(args.bench, args.capture, args.out)
    except (OSError, ValueError) as err:
        print(f"calibrate.contention: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
