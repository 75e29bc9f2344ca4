"""The host's work between the device's passes, per method and batch size: the `eesd.host_work` file
(`eesd calibrate host`), read and checked, and the `overhead` a method's decode passes are priced at from it.

A latency profile's `overhead` rows time one fixed piece of host work (positions, masks, an argmax read), the same for
every method; the executor's AR step and EESD round do different work between their passes (an EESD round reads its
verdict back, updates its policy, refills its inputs and rolls its KV books back), measured by `eesd calibrate host`.
A scenario's `latency.profile.host_work` names such a file: an AR point (and the AR baseline of every point) then pays
AR's figure, an EESD point EESD's, at the point's batch size, and a PPSD point on one host (the sequential or streams
backend) PPSD's, timed per tick (a token's pass through every stage) on the sequential backend, at the batch sizes it
timed (files before December 2026: batch 1), where the file has PPSD rows (schema 3); otherwise, and for the distributed
backend's ranks, PPSD keeps the profile's rows. The figure is per host read for captured passes (the simulator pays
`overhead` once a read) and per pass for uncaptured ones (paid every pass; a PPSD tick is one pass); prefill keeps the
profile's rows (the file times decodes only). `metadata.loop` says what was timed: `generate`'s decodes of static
batches (a batch scenario's), or `serve`, the serving loop's rounds with their departures and admissions (a serving
scenario's).
Torch-free: the simulator and `eesd calibrate scenario` read it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.contract import is_captured
from sim.formats import MAX_FILE_BYTES, quote, read_text
from sim.interpolate import along, bracket
from sim.models import ModelConfig, check_claimed_model

FORMAT = "eesd.host_work"
SCHEMA_VERSION = 3  # 3: PPSD rows too; 2: a row per method and batch size; 1: a row per method, batch 1
METHODS = ("ar", "eesd", "ppsd")  # the methods the file can time, in its order
REQUIRED = ("ar", "eesd")  # the methods every file times, at the same batch sizes (PPSD: where it was asked for)
FIGURES = ("host_ms_per_read", "host_ms_per_pass")
LOOPS = ("generate", "serve")  # what it timed: generate's static batches or the serving loop's rounds (none: the 1st)
MAX_BATCH = 2**31 - 1  # rows a batch can hold (the executor's int32 indices)


def figure_key(captured: bool) -> str:
    """The column the simulator pays for passes run so: per host read where captured, per pass where not."""
    return "host_ms_per_read" if captured else "host_ms_per_pass"


def read_host_work(path: str | Path) -> dict[str, Any]:
    """An `eesd.host_work` file, checked: a ValueError naming the file and the field otherwise. A schema 1 file's
    rows (one per method, measured at batch 1) are read as batch 1 rows."""
    path = Path(path)
    try:
        data = json.loads(read_text(path, MAX_FILE_BYTES, "host-work file"))
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: format: expected {FORMAT!r} (eesd calibrate host --out)")
    version = data.get("schema_version")
    if isinstance(version, bool) or version not in range(1, SCHEMA_VERSION + 1):
        raise ValueError(f"{path}: schema_version: expected 1 to {SCHEMA_VERSION}, got {quote(version)}")
    if not isinstance(data.get("metadata"), dict):
        raise ValueError(f"{path}: metadata: expected a mapping")
    loop = data["metadata"].get("loop", LOOPS[0])
    if isinstance(loop, bool) or loop not in LOOPS:
        raise ValueError(f"{path}: metadata.loop: expected one of {', '.join(LOOPS)}, got {quote(loop)}")
    rows = data.get("methods")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: methods: expected a list of rows (method, batch, host_ms_per_read, ...)")
    if version == 1:
        rows = [{**row, "batch": 1} for row in rows]
    _check_rows(path, rows)
    return {**data, "methods": rows}


def _check_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    keys = [(row.get("method"), row.get("batch")) for row in rows]
    for method, batch in keys:
        if method not in METHODS:
            raise ValueError(f"{path}: methods: method {quote(method)}: expected one of {', '.join(METHODS)}")
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"{path}: methods.{method}: batch: expected an integer 1..{MAX_BATCH}, got {quote(batch)}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: methods: a (method, batch) given twice: {quote(keys)}")
    for method in REQUIRED:
        batches = sorted(batch for m, batch in keys if m == method)
        if batches != sorted(batch for m, batch in keys if m == REQUIRED[0]) or not batches:
            listed = ", ".join(REQUIRED)
            raise ValueError(f"{path}: methods: expected rows for {listed} at the same batch sizes, got {quote(keys)}")
    for row in rows:
        for key in FIGURES:
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
                where = f"methods.{row['method']}[batch {row['batch']}].{key}"
                raise ValueError(f"{path}: {where}: expected milliseconds >= 0, got {quote(value)}")


def check_fits(
    data: Mapping[str, Any], path: str | Path, model: ModelConfig, profile: Mapping[str, Any], captured: bool
) -> None:
    """The file was measured on the scenario's model (`check_claimed_model`: a known model of another shape, or
    another layer count) and the latency profile's kind of device, with passes run as the scenario prices them
    (captured or not): a ValueError naming the file's metadata field otherwise."""
    meta = data["metadata"]
    try:
        check_claimed_model(model, meta)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    theirs, ours = meta.get("device_type"), profile.get("device_type")
    if theirs is not None and ours is not None and str(theirs).lower() != str(ours).lower():
        raise ValueError(f"{path}: metadata.device_type is {quote(theirs)}, the latency profile's is {quote(ours)}")
    if is_captured(meta.get("capture")) != captured:
        kind = "captured" if captured else "uncaptured"
        raise ValueError(
            f"{path}: metadata.capture: measured with capture {quote(meta.get('capture'))}; the scenario prices {kind} "
            f"passes (latency.profile.cuda_graphs {str(captured).lower()}): expected a file of {kind} passes"
        )


@dataclass(frozen=True)
class HostOverhead:
    """One method's host work (µs) at the batch sizes measured: linear between them; outside, along the edge
    segment (clamped at 0; held flat where that segment falls), or flat where one batch size was measured
    (`outside` says when a batch is)."""

    method: str
    batches: tuple[int, ...]
    us: tuple[float, ...]
    source: str = ""  # the file
    policy: str | None = None  # the draft policy EESD was measured with
    device: str | None = None  # the device it was measured on (its host's work is that machine's)
    sync_every: int | None = None  # AR steps per host read in the decodes it timed
    loop: str = LOOPS[0]  # what it timed (`LOOPS`)
    stages: int | None = None  # PPSD's: the pipeline stages it was timed with

    def at(self, batch: int) -> float:
        xs, ys = self.batches, self.us
        lo, hi, weight, _ = bracket(xs, batch)
        return max(0.0, along(ys[xs.index(lo)], ys[xs.index(hi)], weight))

    def outside(self, batch: int) -> bool:
        return not self.batches[0] <= batch <= self.batches[-1]

    def edge_falls(self, batch: int) -> bool:
        """Whether the figure falls towards the edge `batch` lies past (then `at` holds the edge's figure)."""
        xs, ys = self.batches, self.us
        if len(xs) < 2 or not self.outside(batch):
            return False
        return ys[-1] < ys[-2] if batch > xs[-1] else ys[0] > ys[1]


def host_overhead(data: Mapping[str, Any], method: str, captured: bool, source: str | Path = "") -> HostOverhead | None:
    """`method`'s host work from a checked file (`read_host_work`), in the column its passes pay; None for a method
    the file does not time (PPSD in a file without its rows)."""
    rows = sorted((r for r in data["methods"] if r["method"] == method), key=lambda r: r["batch"])
    if not rows:
        return None
    meta, key = data["metadata"], figure_key(captured)
    policy, device, sync = meta.get("policy"), meta.get("device"), meta.get("sync_every")
    return HostOverhead(method, tuple(r["batch"] for r in rows), tuple(r[key] * 1e3 for r in rows), str(source),
                        str(policy) if method == "eesd" and policy is not None else None,
                        str(device) if device is not None else None,
                        sync if isinstance(sync, int) and not isinstance(sync, bool) else None,
                        meta.get("loop", LOOPS[0]), _stages(meta) if method == "ppsd" else None)  # fmt: skip


def _stages(meta: Mapping[str, Any]) -> int | None:
    stages = meta.get("ppsd_stages")
    return stages if isinstance(stages, int) and not isinstance(stages, bool) else None
