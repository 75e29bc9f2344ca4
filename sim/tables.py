"""Fixed-width text tables for the command line (torch-free)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def text_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], heads: Mapping[str, str]) -> str:
    """`columns` of `rows`, right-aligned under their heads (`heads[column]`, else the column's name), a rule under
    the heads; floats shortened (`short`)."""
    table = [[heads.get(c, c) for c in columns]] + [[short(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def short(value: Any) -> str:
    """A float with 3 decimals below 100, 1 from there; anything else as `str` gives it."""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)
