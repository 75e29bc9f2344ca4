"""Shipped calibration files mutated as a damaged disk, an interrupted copy, another tool or a hand edit would leave
them: reading either succeeds or raises a ValueError naming the file and the line (or the header field); a scenario
that uses the file either loads and simulates or is refused in one bounded message naming a file; never another
exception type, never more than a bounded time.

Each base is a shipped calibration file (a trace cut to its first prompts, so that an example stays fast) and a
shipped scenario that uses it, made cheap (one point, a tiny workload). Mutations: the file cut anywhere, a byte
flipped, a line deleted or repeated, a cell replaced (empty, NaN, infinite, negative, huge, text), a header field
deleted or replaced (format, schema_version, rows, a metadata key), the file in another encoding, garbage appended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_scenarios import (
    CALIBRATION,
    EXAMPLE_BOUND_S,
    FUZZ,
    LIMITS,
    MESSAGE_BOUND_CHARS,
    SHIPPED,
    absolute_paths,
    check_scenario,
    within,
)

from sim.formats import FORMATS, read_acceptance_trace, read_file, write_acceptance_trace

TRACE_PROMPTS = 3  # prompts of a trace a base keeps

CELLS = ["", "nan", "inf", "-inf", "-1", "0", "1", "2", "1e400", "9" * 40, "x", "1.5", "0.5", "layer", "prefill",
         "9" * 5000, "\x00", '"', "a,b"]  # fmt: skip
METADATA = [None, "", 0, -1, True, [], {}, "x" * 5000, "Llama-2-7B", "float16", {"hidden_size": 1}, 10**30]


def uses(node: Any, target: str) -> bool:
    """Whether a scenario's data (or a sweep value) names the file `target`."""
    if isinstance(node, dict):
        return any(uses(value, target) for value in node.values())
    if isinstance(node, list):
        return any(uses(value, target) for value in node)
    return node == target


def base_scenario(path: Path, target: str) -> dict[str, Any]:
    """The shipped scenario at `path` as one cheap point that uses `target`."""
    data = absolute_paths(yaml.safe_load(path.read_text(encoding="utf-8")), path.parent)
    sweep = data.pop("sweep", None) or {}
    point = {key: ([v for v in values if uses(v, target)] or values)[0] for key, values in sweep.items()}
    if point:
        data["sweep"] = {key: [value] for key, value in point.items()}
    data["workload"] = {**data.get("workload", {}), "requests": 1, "batch_size": 1, "output_len": 8}
    data["limits"] = dict(LIMITS)
    return data


SCENARIOS = {path: absolute_paths(yaml.safe_load(path.read_text(encoding="utf-8")), path.parent) for path in SHIPPED}
USED = [  # the CSV calibration files (a host-work JSON is fuzzed in tests/test_calibrate_host.py)
    target for target in CALIBRATION if target.endswith(".csv") and any(uses(d, target) for d in SCENARIOS.values())
]
NAMES = sorted(Path(target).stem for target in USED)


def bases(folder: Path) -> dict[str, tuple[str, bytes, dict[str, Any]]]:
    """name -> (format kind, the file's bytes, the data of a cheap scenario that uses it)."""
    found = {}
    for target in USED:
        scenario = next(path for path, data in SCENARIOS.items() if uses(data, target))
        kind = json.loads(Path(target).read_text(encoding="utf-8").partition("\n")[0][1:])["format"].split(".")[1]
        data = Path(target).read_bytes()
        if kind == "acceptance_trace":
            trace = read_acceptance_trace(target)
            prompts = sorted({r.prompt_id for r in trace.records})[:TRACE_PROMPTS]
            records = [r for r in trace.records if r.prompt_id in prompts]
            data = write_acceptance_trace(folder / Path(target).name, trace.metadata, records).read_bytes()
        found[Path(target).stem] = (kind, data, base_scenario(scenario, target))
    return found


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Originals:
    return Originals(bases(tmp_path_factory.mktemp("bases")))


class Originals(dict):
    """The bases, shown short where hypothesis reports a failing example."""

    def __repr__(self) -> str:
        return f"<{len(self)} calibration files and their scenarios>"


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    text = data.decode("utf-8")
    lines = text.splitlines(keepends=True)
    operation = draw(st.sampled_from(["cut", "flip", "line", "cell", "cell", "header", "header", "encode", "append"]))
    if operation == "cut":
        return data[: draw(st.integers(0, len(data) - 1))]
    if operation == "flip":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if operation == "line":
        index = draw(st.integers(0, len(lines) - 1))
        repeat = draw(st.booleans())
        return "".join([*lines[:index], *([lines[index]] * 2 if repeat else []), *lines[index + 1 :]]).encode()
    if operation == "cell":
        index = draw(st.integers(1, len(lines) - 1))
        cells = lines[index].rstrip("\n").split(",")
        cells[draw(st.integers(0, len(cells) - 1))] = draw(st.sampled_from(CELLS))
        return "".join([*lines[:index], ",".join(cells) + "\n", *lines[index + 1 :]]).encode()
    if operation == "header":
        return (mutate_header(lines[0], draw) + "".join(lines[1:])).encode()
    if operation == "encode":
        return text.encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "cp1252"])), "replace")
    return data + draw(st.binary(min_size=1, max_size=64))


def mutate_header(line: str, draw: st.DrawFn) -> str:
    header = json.loads(line[1:])
    metadata = header["metadata"]
    target = draw(st.sampled_from(["format", "schema_version", "rows", "metadata", "metadata", "metadata"]))
    if target == "metadata":
        key = draw(st.sampled_from(sorted(metadata)))
        if draw(st.booleans()):
            del metadata[key]
        else:
            metadata[key] = draw(st.sampled_from(METADATA))
    elif draw(st.booleans()):
        header.pop(target, None)
    else:
        header[target] = draw(st.sampled_from([None, 0, 2, -1, "1", 10**6, "eesd.latency_profile", []]))
    return "# " + json.dumps(header) + "\n"


def check_file(path: Path, kind: str) -> None:
    """Read `path` as a `kind` file: a refusal is one bounded line starting with the file's path."""
    with within(EXAMPLE_BOUND_S):
        try:
            read_file(path, FORMATS[kind])
        except ValueError as err:
            message = str(err)
            assert message.startswith(str(path)) and "\n" not in message, message[:300]
            assert len(message) < MESSAGE_BOUND_CHARS


def test_every_base_loads(originals: dict, tmp_path: Path) -> None:
    """The cut traces and cheap scenarios are valid: a refusal in the fuzz below is the mutation's doing."""
    for name, (kind, data, scenario) in originals.items():
        target = tmp_path / f"{name}.csv"
        target.write_bytes(data)
        read_file(target, FORMATS[kind])
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(scenario), encoding="utf-8")
        check_scenario(path)


@FUZZ
@given(name=st.sampled_from(NAMES), data=st.data())
def test_mutated_calibration_files_are_read_and_used_or_refused_by_file_and_line(
    originals: dict, tmp_path_factory: pytest.TempPathFactory, name: str, data: st.DataObject
) -> None:
    kind, original, scenario = originals[name]
    folder = tmp_path_factory.mktemp("files")
    target = folder / f"{name}.csv"
    target.write_bytes(mutate(original, data.draw))
    check_file(target, kind)
    source = next(p for p in USED if Path(p).stem == name)
    path = folder / "scenario.yaml"
    path.write_text(yaml.safe_dump(replaced(scenario, source, str(target))), encoding="utf-8")
    check_scenario(path, str(target))


def replaced(node: Any, old: str, new: str) -> Any:
    """`node` with every string `old` in it made `new`."""
    if isinstance(node, dict):
        return {key: replaced(value, old, new) for key, value in node.items()}
    if isinstance(node, list):
        return [replaced(value, old, new) for value in node]
    return new if node == old else node
