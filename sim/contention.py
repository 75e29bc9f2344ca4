"""Passes that share one device (or one host's memory: distributed stage processes) at the same time: how long k of
them take together.

PPSD's one-host backends launch the stages of a tick together (`streams`: one CUDA stream each on one GPU) or one
after the other (`sequential`); the distributed backend may also put several stage processes on one device. Each pass
is known by its time alone (`time_us`, from the latency model) and the part of it that reads HBM (`hbm_us`: its
weight and KV bytes over the device's effective bandwidth). Models of the time the k passes take together:

- `Serial`: one after the other, sum(time_us) (the `sequential` backend, and a device whose bandwidth is unknown).
- `SharedBandwidth` (the fallback from the device spec): the passes share the HBM, so their HBM parts add up, while
  the rest of each pass (launch-bound: kernel launches and floors, the gaps of a captured pass) overlaps:
  sum(hbm_us) + max(time_us - hbm_us), never less than the longest pass nor more than all passes in turn. On a
  bandwidth-bound device (hbm_us ~ time_us) the passes of a tick take as long as one pass over all their weights;
  only launch-bound passes overlap.
- `ProfiledContention`: measured (a contention profile, docs/formats.md): for k passes, the overlap factor
  f(k) = (together - longest alone) / (sum alone - longest alone), 0 for a perfect overlap and 1 for none, from
  the profile's rows (linear in k between them, the nearest row's outside, flagged), applied to the simulated
  passes: longest + f(k) (sum - longest). A `streams` profile (one GPU's CUDA streams) prices the passes that share
  a device; a `processes` profile (`eesd calibrate contention --model`: the distributed backend's stage processes,
  each on its own cores of one CPU host, slowing each other through the memory they share) prices a distributed
  tick's passes on every device of that host (`scope` "host"). For k equal passes each slowed by s(k) together,
  f(k) = (s(k) - 1) / (k - 1): two processes each 8% slower read f = 0.08.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sim.formats import DataFile
from sim.interpolate import along, bracket, span_text


@dataclass(frozen=True)
class PassShare:
    """One pass on a shared device: its time alone and the part of it that reads HBM, µs."""

    time_us: float
    hbm_us: float


class Contention(Protocol):
    name: str

    def together_us(self, passes: Sequence[PassShare], batch: int = 1) -> float: ...

    @property
    def extrapolated(self) -> bool: ...


@dataclass(frozen=True)
class Serial:
    name: str = "serial"

    def together_us(self, passes: Sequence[PassShare], batch: int = 1) -> float:
        return sum(p.time_us for p in passes)

    @property
    def extrapolated(self) -> bool:
        return False


@dataclass(frozen=True)
class SharedBandwidth:
    name: str = "shared bandwidth"

    def together_us(self, passes: Sequence[PassShare], batch: int = 1) -> float:
        if len(passes) <= 1:
            return sum(p.time_us for p in passes)
        longest, total = max(p.time_us for p in passes), sum(p.time_us for p in passes)
        shared = sum(p.hbm_us for p in passes) + max(p.time_us - p.hbm_us for p in passes)
        return min(max(shared, longest), total)

    @property
    def extrapolated(self) -> bool:
        return False


@dataclass
class ProfiledContention:
    """A contention profile's overlap factor f(k) (see module docstring), at the batch of the passes where the
    profile has a `batch` column (linear between its batches, the nearest one's outside them, flagged)."""

    profile: DataFile
    name: str = "profiled"
    extrapolated: bool = False
    _rows: dict[int | None, tuple[list[int], list[float]]] = field(default_factory=dict, repr=False)
    _beyond: set[str] = field(default_factory=set, repr=False)  # what was asked outside the profile, phrased

    @property
    def scope(self) -> str:
        """ "host" for a `processes` profile (stage processes on one host's cores), else "device" (passes sharing
        one device)."""
        return "host" if self.profile.metadata.get("backend") == "processes" else "device"

    def __post_init__(self) -> None:
        if not self.profile.records:
            raise ValueError("contention profile has no rows")
        for r in sorted(self.profile.records, key=lambda r: r.passes):
            passes, factors = self._rows.setdefault(r.batch, ([], []))
            passes.append(r.passes)
            factors.append(overlap_factor(r.alone_sum_us, r.alone_max_us, r.median_us))

    def factor(self, passes: int, batch: int = 1) -> float:
        """f(k) at `batch`: linear in k between the profiled counts, and in the batch between the profiled batches;
        the nearest count's or batch's outside them (flagged)."""
        if None in self._rows:  # a profile without batches holds for every batch
            return self._along(self._rows[None], passes)
        batches = sorted(self._rows)
        low, high, weight, outside = bracket(batches, batch)
        if outside:
            self._flag(f"contention batch {batch} (profiled {span_text(batches[0], batches[-1])})")
            return self._along(self._rows[batches[0] if batch < batches[0] else batches[-1]], passes)
        return along(self._along(self._rows[low], passes), self._along(self._rows[high], passes), weight)

    def _along(self, rows: tuple[list[int], list[float]], passes: int) -> float:
        """One batch's factor at `passes`: linear between its counts, the nearest count's outside (flagged)."""
        xs, ys = rows
        low, high, weight, outside = bracket(xs, passes)
        if outside:
            self._flag(f"contention passes {passes} (profiled {span_text(xs[0], xs[-1])})")
            return ys[0] if passes < xs[0] else ys[-1]
        return along(ys[xs.index(low)], ys[xs.index(high)], weight)

    def together_us(self, passes: Sequence[PassShare], batch: int = 1) -> float:
        if len(passes) <= 1:
            return sum(p.time_us for p in passes)
        longest, total = max(p.time_us for p in passes), sum(p.time_us for p in passes)
        return longest + self.factor(len(passes), batch) * (total - longest)

    def _flag(self, asked: str) -> None:
        self.extrapolated = True
        self._beyond.add(asked)

    def extrapolations(self) -> tuple[str, ...]:
        """What was asked outside the profile, a phrase each: e.g. "contention batch 8 (profiled 1-4)"."""
        return tuple(sorted(self._beyond))


def overlap_factor(alone_sum_us: float, alone_max_us: float, together_us: float) -> float:
    """(together - longest) / (sum - longest), clamped to [0, 1]: 0 perfect overlap, 1 none."""
    spread = alone_sum_us - alone_max_us
    if spread <= 0:
        return 1.0
    return min(1.0, max(0.0, (together_us - alone_max_us) / spread))
