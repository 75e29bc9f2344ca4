"""Shipped scenarios mutated as a hand edit, a bad copy or a hostile user would leave them: loading either gives
points that simulate or refuses with a ValueError (a ScenarioError for the scenario's own fields) whose every line
names a file (the scenario, or the calibration file at fault) and a field or line, in a bounded message and bounded
time; never another exception type.

Each base is a shipped scenario made cheap: calibration paths absolute, a sweep cut to at most 4 points, a tiny
workload and `limits` that keep what a mutant may ask small. Mutations of its data: a field deleted, retyped (None,
booleans, negative, zero, huge, NaN and infinite numbers, empty and huge strings, lists, mappings, another file's
path) or renamed; of its text: truncated, a byte flipped, bytes inserted, a line repeated, another encoding."""

from __future__ import annotations

import copy
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.runner import result_row, run_points, summary_table
from sim.scenario import Point, load_points

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = sorted(str(p) for ext in ("csv", "json") for p in (ROOT / "calibration").glob(f"*/*.{ext}"))
SHIPPED = sorted(p for p in (ROOT / "scenarios").glob("*.yaml") if "serving" not in yaml.safe_load(p.read_text()))
EXAMPLE_BOUND_S = 30.0  # a mutant loads in well under a second and simulates a few tiny points in a few more
MESSAGE_BOUND_CHARS = 4000  # a few lines, each quoting its value in ~80 characters
SIMULATED_TOKENS = 512  # mutants that ask more (within their limits) are loaded, not simulated
LIMITS = {"max_tokens": 256, "max_points": 4}
FUZZ = settings(max_examples=max(150, settings.default.max_examples), deadline=None)

POOL: list[Any] = [
    None, True, False, -1, 0, 1, 2, 3, 7, 10**6, 2**31, 10**30, -(10**30), 0.5, -0.5, 1e308, float("nan"),
    float("inf"), float("-inf"), "", "x" * 100_000, "H100", "nvlink", "fixed:1000000", "../../escaped", "a/b", [],
    [1, 2, 3], ["x"] * 50, {}, {"a": 1}, {"layer": 1.0}, CALIBRATION[0], CALIBRATION[-1], "missing.csv",
]  # fmt: skip


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail an example that runs longer than `seconds` instead of letting it hang the suite."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"an example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_refusal(err: ValueError, files: tuple[str, ...]) -> None:
    """A refusal: bounded, and every line starts with one of `files` (the scenario or a calibration file)."""
    message = str(err)
    assert 0 < len(message) < MESSAGE_BOUND_CHARS, f"{len(message)} characters"
    for line in message.splitlines():
        assert line.startswith(files), line[:300]
        assert ": " in line, line[:300]


def cheap(path: Path) -> dict[str, Any]:
    """A shipped scenario's data, made cheap to run (module docstring)."""
    data = absolute_paths(yaml.safe_load(path.read_text(encoding="utf-8")), path.parent)
    sweep = data.get("sweep") or {}
    data["sweep"] = {key: values[: 2 if index < 2 else 1] for index, (key, values) in enumerate(sweep.items())}
    if not data["sweep"]:
        del data["sweep"]
    workload = data.get("workload", {})
    data["workload"] = {**workload, "requests": 1, "batch_size": 1, "output_len": 8}
    data["limits"] = dict(LIMITS)
    return data


def absolute_paths(node: Any, base: Path) -> Any:
    """Every `.csv` / `.json` path made absolute, so that a copy of the scenario elsewhere finds its calibration
    files."""
    if isinstance(node, dict):
        return {key: absolute_paths(value, base) for key, value in node.items()}
    if isinstance(node, list):
        return [absolute_paths(value, base) for value in node]
    if isinstance(node, str) and node.endswith((".csv", ".json")):
        return str((base / node).resolve())
    return node


BASES = {path.stem: cheap(path) for path in SHIPPED}


def paths_in(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indices) to a value in `node`, the root's children first."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        found.append((*prefix, key))
        found.extend(paths_in(value, (*prefix, key)))
    return found


def mutate_data(data: dict[str, Any], draw: st.DrawFn) -> dict[str, Any]:
    data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy of plain data
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_in(data)
        if not paths:
            break
        *parents, last = draw(st.sampled_from(paths))
        node = data
        for part in parents:
            node = node[part]
        operation = draw(st.sampled_from(["delete", "retype", "retype", "rename"]))
        if operation == "delete":
            del node[last]
        elif operation == "retype":
            node[last] = copy.deepcopy(draw(st.sampled_from(POOL)))  # a pool list must never hold itself
        elif isinstance(node, dict):
            node[draw(st.sampled_from(["nonsense", "x" * 1000, "workload_", "sweep", "limits"]))] = node.pop(last)
    return data


def mutate_text(text: str, draw: st.DrawFn) -> bytes:
    data = text.encode()
    operation = draw(st.sampled_from(["truncate", "flip", "insert", "repeat_line", "encode"]))
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    if operation == "truncate":
        return data[:at]
    if operation == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if operation == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if operation == "repeat_line":
        lines = text.splitlines(keepends=True)
        index = draw(st.integers(0, len(lines) - 1))
        return "".join([*lines[: index + 1], lines[index], *lines[index + 1 :]]).encode()
    return text.encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"])), "replace")


def tokens(point: Point) -> int:
    workload = point.scenario.workload
    return workload.requests * workload.output_len


def check_scenario(path: Path, *files: str) -> None:
    """Load `path`; simulate what loads and is small; a refusal must be one bounded ValueError whose lines start with
    the scenario's path, a shipped calibration file's or one of `files`."""
    begin = time.monotonic()
    with within(EXAMPLE_BOUND_S):
        try:
            points = load_points(path)
        except ValueError as err:
            check_refusal(err, (str(path), *CALIBRATION, *files))
            return
        if sum(tokens(p) for p in points) <= SIMULATED_TOKENS:
            results = run_points(points, progress=False)
            assert summary_table(results) and all(math.isfinite(r.result.tokens_per_s) for r in results)
            assert all(result_row(r)["tokens"] == tokens(r.point) * (r.result.method != "") for r in results)
    assert time.monotonic() - begin < EXAMPLE_BOUND_S


def test_every_base_loads_and_simulates(tmp_path: Path) -> None:
    """The cheap bases are valid: a refusal in the fuzz below is the mutation's doing."""
    for name, data in BASES.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        points = load_points(path)
        assert sum(tokens(p) for p in points) <= SIMULATED_TOKENS
        assert run_points(points, progress=False)


def mutated_fields(name: str, draw: st.DrawFn) -> bytes:
    return yaml.safe_dump(mutate_data(BASES[name], draw), sort_keys=False).encode()


def mutated_text(name: str, draw: st.DrawFn) -> bytes:
    return mutate_text(yaml.safe_dump(BASES[name], sort_keys=False), draw)


@FUZZ
@pytest.mark.parametrize("mutant", [mutated_fields, mutated_text], ids=["fields", "text"])
@given(name=st.sampled_from(sorted(BASES)), data=st.data())
def test_mutated_scenarios_load_and_run_or_are_refused_by_file_and_field(
    tmp_path_factory: pytest.TempPathFactory, mutant: Any, name: str, data: st.DataObject
) -> None:
    path = tmp_path_factory.mktemp("mutants") / f"{name}.yaml"
    path.write_bytes(mutant(name, data.draw))
    check_scenario(path)
