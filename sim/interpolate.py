"""Piecewise-linear lookup over measured points, one rule for every measured grid (latency profiles, link profiles,
host work; contention profiles inside their range): linear between neighbours, along the edge segment past the ends,
except past the end of a segment that falls (noise, a kernel switch), where the end's own value holds, so a size past
the measured ones never costs less than the edge's. Pure Python."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def span_text(low: float, high: float) -> str:
    """A measured range as the extrapolation notes phrase it: "4" for one point, "1-4" for several."""
    return f"{low}" if low == high else f"{low}-{high}"


def bracket(xs: Sequence[int], x: float) -> tuple[int, int, float, bool]:
    """Neighbours (lo, hi) of `x` among the sorted `xs`, the weight of hi, and whether x lies outside the range."""
    outside = x < xs[0] or x > xs[-1]
    if len(xs) == 1:
        return xs[0], xs[0], 0.0, outside
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    lo, hi = xs[i], xs[i + 1]
    return lo, hi, (x - lo) / (hi - lo), outside


def along(low: float, high: float, weight: float) -> float:
    """The segment from `low` to `high` at `weight` (0: low, 1: high), linear, past its ends too, except past the end
    of a segment that falls: there the end's own value holds."""
    if high < low and not 0.0 <= weight <= 1.0:
        return high if weight > 1.0 else low
    return low + (high - low) * weight
