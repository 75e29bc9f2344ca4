"""Progress of a long command: a tqdm bar on a terminal, plain lines otherwise (torch-free).

A bar redrawn with carriage returns is unreadable in a log file and tqdm shows nothing useful when stderr is a pipe,
so `eesd calibrate ... 2> log` would be silent for minutes. When stderr is not a terminal, `progress_bar` writes one
line instead, every `every` items (a tenth of the total by default) or every `INTERVAL_S` seconds, whichever comes
first, and one when it closes:

    latency: 240/1404 pt (17%), 3.1 pt/s, ETA 6m15s

`enabled=False` (`--no-progress`) silences both. The object returned offers what the commands use of tqdm:
`update(n)`, `set_postfix(**values)`, `close()` and use as a context manager; `track` wraps an iterable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TextIO, TypeVar

INTERVAL_S = 30.0  # the longest a non-terminal log waits for a progress line
LINES = 10  # progress lines per run from item counts alone (every = total // LINES)

T = TypeVar("T")


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> Any: ...

    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc: object) -> Any: ...


class LineProgress:
    """Plain progress lines on a stream that is not a terminal (see the module docstring)."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        initial: int = 0,
        stream: TextIO | None = None,
        every: int | None = None,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = self.initial = initial
        self.stream = stream if stream is not None else sys.stderr
        self.every = every if every is not None else max(1, total // LINES)
        self.interval_s, self.clock = interval_s, clock
        self.start = self.last_time = clock()
        self.last_done = initial
        self.postfix = ""
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if self.done - self.last_done >= self.every or now - self.last_time >= self.interval_s:
            self._write(self.line(now))
            self.last_time, self.last_done = now, self.done

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def close(self) -> None:
        if not self.closed and self.done > self.last_done:
            self._write(self.line(self.clock()))
        self.closed = True

    def line(self, now: float) -> str:
        """`desc: done/total unit (pct%), rate unit/s, ETA` (elapsed time instead of the ETA once done)."""
        elapsed = now - self.start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit}"]
        if self.total > 0:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.done >= self.total:
            parts.append(f"in {duration(elapsed)}")
        elif rate > 0:
            parts.append(f"ETA {duration((self.total - self.done) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def duration(seconds: float) -> str:
    """4.2 -> '4s', 375 -> '6m15s', 7322 -> '2h02m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_bar(
    total: int, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0, leave: bool = True
) -> Progress:
    """A tqdm bar when stderr is a terminal, else a `LineProgress`; a silent tqdm when not `enabled`."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, desc, unit, initial)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, leave=leave)


def track(
    items: Iterable[T], desc: str, unit: str = "it", enabled: bool = True, total: int | None = None
) -> Iterator[T]:
    """Iterate over `items`, counting each one in a `progress_bar` (`total` defaults to `len(items)`)."""
    count = total if total is not None else len(items)  # type: ignore[arg-type]
    with progress_bar(count, desc, unit, enabled) as bar:
        for item in items:
            yield item
            bar.update(1)
