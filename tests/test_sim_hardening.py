"""Hostile scenario inputs (issue 21): each is refused in one bounded line naming the file and the field or line,
or, where it is a legitimate request, runs within the limits the scenario states."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from sim.scenario import ALIAS_VALUE_BUDGET, ScenarioError, load_points

BASE = {
    "name": "h",
    "model": "SmolLM2-135M",
    "method": "eesd",
    "exit_layer": 8,
    "acceptance": {"alpha": 0.5},
    "workload": {"requests": 1, "prompt_len": 16, "output_len": 8},
}


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def scenario_text(**fields: object) -> str:
    return yaml.safe_dump({**BASE, **fields}, sort_keys=False)


def refused(path: Path, *fragments: str, max_chars: int = 600) -> str:
    with pytest.raises(ScenarioError) as info:
        load_points(path)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert len(message) < max_chars, f"{len(message)} characters"
    return message


def alias_bomb(levels: int, field: str = "description") -> str:
    """A 'billion laughs' document: `field` maps x0 to 9 strings and each x_i to 9 aliases of x_(i-1)."""
    lines = [
        scenario_text().rstrip(),
        f"{field}:",
        '  x0: &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
    ]
    lines += [f"  x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join([*lines, ""])


# ---- item 2: YAML alias bombs and unbounded echoes -------------------------------------------------------------------
def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = write(tmp_path, alias_bomb(6))  # 9**6 = 531,441 values once expanded
    tracemalloc.start()
    start = time.perf_counter()
    try:
        refused(path, "line ", "aliases (*name) expand the document by more than", f"{ALIAS_VALUE_BUDGET:,}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 50 * 2**20


def test_a_small_alias_bomb_in_a_wrongly_typed_field_is_quoted_short(tmp_path: Path) -> None:
    """Under the alias budget (9**3 + 9**2 + .. values) the value is a mapping where a string is expected: the
    message names the field and quotes the value in a few dozen characters, not its 820 strings."""
    message = refused(
        write(tmp_path, alias_bomb(3)), "description: Input should be a valid string (got {'x0': [", "..."
    )
    assert message.count("lol") < 20


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    refused(write(tmp_path, scenario_text() + "x: &a [1, *a]\n"), "line ", "an alias inside its own anchor")


def test_a_few_aliases_are_fine(tmp_path: Path) -> None:
    text = scenario_text().replace("name: h", "name: &n h") + "description: *n\n"
    assert load_points(write(tmp_path, text))[0].scenario.description == "h"


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("description", "x" * 1_000_000, "description: Input should be a valid string"),
        ("model", "M" * 1_000_000, "model: unknown model 'MMMM"),
        ("policy", "fixed:" + "9" * 100_000, "policy: "),
        ("x" * 100_000, 1, "unknown key; allowed here"),
    ],
)
def test_errors_quote_huge_values_in_a_few_characters(tmp_path: Path, field: str, value: object, fragment: str) -> None:
    data = {**BASE, field: [value] if field == "description" else value}
    refused(write(tmp_path, yaml.safe_dump(data)), fragment)


def test_a_huge_sweep_value_is_quoted_short_in_every_line(tmp_path: Path) -> None:
    text = yaml.safe_dump({**BASE, "sweep": {"exit_layer": [4, "e" * 100_000]}})
    refused(write(tmp_path, text), "sweep point {'exit_layer': 'eeee", "exit_layer: Input should be a valid integer")


def test_deep_nesting_is_one_line(tmp_path: Path) -> None:
    refused(write(tmp_path, scenario_text() + "x: " + "[" * 50_000 + "]" * 50_000 + "\n"), "nested too deeply")


def test_a_scenario_larger_than_the_yaml_limit_is_refused_unread(tmp_path: Path) -> None:
    refused(write(tmp_path, scenario_text() + "#" * (2 << 20) + "\n"), "larger than 1,048,576 bytes")
