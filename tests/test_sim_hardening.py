"""Hostile scenario inputs: each is refused in one bounded line naming the file and the field or line,
or, where it is a legitimate request, runs within the limits the scenario states."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from sim import cli as sim_cli
from sim.formats import (
    AcceptanceRecord,
    LatencyRecord,
    read_acceptance_trace,
    read_latency_profile,
    write_acceptance_trace,
    write_latency_profile,
)
from sim.scenario import ALIAS_VALUE_BUDGET, ScenarioError, load_points, validate

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


# ---- YAML alias bombs and unbounded echoes ---------------------------------------------------------------------------
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


@pytest.mark.parametrize(
    ("tail", "fragment"),
    [
        ("x: [unclosed\ny: 1\n", "invalid YAML: line 12, column 2: while parsing a flow sequence: expected ','"),
        ("x: a\x01b\n", "invalid YAML: line 11: special characters are not allowed (character #x0001)"),
        ("x: *nowhere\n", "invalid YAML: line 11, column 4: found undefined alias 'nowhere'"),
    ],
)
def test_invalid_yaml_is_one_line_with_its_line(tmp_path: Path, tail: str, fragment: str) -> None:
    message = refused(write(tmp_path, scenario_text() + tail), fragment)
    assert "\n" not in message


def test_deep_nesting_is_one_line(tmp_path: Path) -> None:
    refused(write(tmp_path, scenario_text() + "x: " + "[" * 50_000 + "]" * 50_000 + "\n"), "nested too deeply")


def test_a_scenario_larger_than_the_yaml_limit_is_refused_unread(tmp_path: Path) -> None:
    refused(write(tmp_path, scenario_text() + "#" * (2 << 20) + "\n"), "larger than 1,048,576 bytes")


# ---- values of the wrong type and keys given twice -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"workload": {"requests": True}}, "workload.requests: Input should be a valid integer (got True)"),
        (
            {"workload": {"output_len": 1.0e12}},
            "output_len: Input should be a valid integer (got 1000000000000.0)",
        ),
        ({"workload": {"prompt_len": "64"}}, "workload.prompt_len: Input should be a valid integer (got '64')"),
        ({"exit_layer": False}, "exit_layer: Input should be a valid integer (got False)"),
        ({"acceptance": {"alpha": float("nan")}}, "acceptance.alpha: Input should be a finite number (got nan)"),
        ({"topology": {"link": {"latency_us": float("inf")}}}, "topology.link.latency_us: Input should be a finite"),
        (
            {"latency": {"roofline": {"cuda_graphs": 1}}},
            "roofline.cuda_graphs: Input should be a valid boolean",
        ),
        ({"topology": {"stages": True}}, "topology.stages: expected an integer >= 1 or a list of stages (got True)"),
        ({"seed": 1.5}, "seed: Input should be a valid integer (got 1.5)"),
    ],
)
def test_a_value_of_another_type_is_refused(tmp_path: Path, fields: dict, fragment: str) -> None:
    refused(write(tmp_path, scenario_text(**fields)), fragment)


def test_an_integer_is_a_number() -> None:
    scenario = validate({**BASE, "acceptance": {"alpha": 1}, "topology": {"link": {"latency_us": 3}}}, "s.yaml")
    assert scenario.acceptance.alpha == 1.0 and scenario.topology.link.latency_us == 3.0


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("method: ar\n", "line 11, column 1: key 'method' given twice (first on line 3)"),
        ("topology: {stages: 1,\n  stages: 2}\n", "line 12, column 3: key 'stages' given twice (first on line 11)"),
    ],
)
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path, text: str, fragment: str) -> None:
    refused(write(tmp_path, scenario_text() + text), fragment)


@pytest.mark.parametrize(
    ("fields", "first_line"),
    [
        (
            {
                "model": {
                    "name": "m",
                    "num_layers": 4,
                    "hidden_size": "wide",
                    "num_heads": 2,
                    "num_kv_heads": 2,
                    "intermediate_size": 8,
                    "vocab_size": 16,
                }
            },  # fmt: skip
            "model.hidden_size: Input should be a valid integer (got 'wide')",
        ),
        ({"model": 3.5}, "model: expected a model's name or an inline shape"),
        ({"topology": {"gpu": {"name": "card"}}}, "topology.gpu.hbm_bandwidth_GBps: required field is missing"),
        ({"topology": {"link": {"latency_us": "fast"}}}, "topology.link.latency_us: Input should be a valid number"),
    ],
)
def test_a_bad_value_inside_an_inline_object_is_named_first(tmp_path: Path, fields: dict, first_line: str) -> None:
    """A name or an inline object: the first line names the inline object's field, not the name alternative."""
    message = refused(write(tmp_path, scenario_text(**fields)), first_line)
    assert first_line in message.splitlines()[0] and "valid string" not in message


# ---- --out naming a file ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out", ["a_file", "a_file/sub", "a_file/sub/deeper"])
def test_out_naming_a_file_or_inside_one_is_one_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture, out: str
) -> None:
    (tmp_path / "a_file").write_text("keep me\n")
    code = sim_cli.main([str(write(tmp_path, scenario_text())), "--out", str(tmp_path / out), "--no-progress"])
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert code == 2 and line.startswith(f"eesd simulate: error: --out {tmp_path / out}: ") and "a_file" in line
    assert captured.out == "" and (tmp_path / "a_file").read_text() == "keep me\n"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--out", ""], "--out: expected a folder, got an empty path"),
        (["--out", "/proc/eesd-out"], "--out /proc/eesd-out: cannot write in /proc"),
        (["--jobs", "-5"], "--jobs must be >= 1, or 0 for one per CPU, got -5"),
    ],
)
def test_an_out_or_jobs_that_cannot_be_is_one_line_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: list[str], fragment: str
) -> None:
    if args[1].startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    monkeypatch.chdir(tmp_path)  # an empty --out would be the current folder
    code = sim_cli.main([str(write(tmp_path, scenario_text())), *args, "--no-progress"])
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert code == 2 and line.startswith(f"eesd simulate: error: {fragment}"), line
    assert captured.out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_a_serving_scenario_is_sent_to_serve_sim(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    serving = {"workload": {"requests": 2, "arrival": {"process": "poisson", "rate_per_s": 1.0}, "prompt_len": 8,
                            "output_len": 4}}  # fmt: skip
    fields = {key: value for key, value in BASE.items() if key != "workload"}
    path = write(tmp_path, yaml.safe_dump({**fields, "serving": serving}))
    assert sim_cli.main([str(path), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        line
        == f"eesd simulate: error: {path}: this is a serving scenario (a serving: section): run eesd serve-sim {path}"
    )


# ---- the name is one folder name -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../escaped_out", "a/b", "..", ".", "", "a\\b", "tab\there", "x" * 201])
def test_a_name_that_is_not_one_folder_name_is_refused(tmp_path: Path, name: str) -> None:
    refused(write(tmp_path, scenario_text(name=name)), "name: expected a folder name")


def test_the_default_output_folder_stays_under_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, scenario_text(name="my run-1.2"))
    assert sim_cli.main([str(path), "--no-progress"]) == 0
    assert (tmp_path / "runs" / "my run-1.2" / "results.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "s.yaml"]


# ---- calibration files that cannot serve a scenario: the message names the file --------------------------------------
META = {"device": "CPU: test", "dtype": "float32", "model": "SmolLM2-135M"}


def profile_rows(grid: list[tuple[int, int]], components: tuple[str, ...] = ("layer", "lm_head")) -> list:
    return [
        LatencyRecord(c, "verify", q, context, 1, False, 10.0, 9.0, 11.0) for c in components for q, context in grid
    ]


@pytest.mark.parametrize(
    ("rows", "fragment"),
    [
        (profile_rows([(1, 0), (2, 0), (1, 512)]), "rows of component 'layer', phase 'verify': the grid over"),
        (profile_rows([(1, 0)], ("lm_head",)), "no 'layer' rows with cuda_graphs=0"),
    ],
)
def test_a_profile_that_cannot_cost_a_pass_names_the_file_and_its_rows(
    tmp_path: Path, rows: list, fragment: str
) -> None:
    profile = write_latency_profile(tmp_path / "profile.csv", META, rows)
    text = scenario_text(dtype="fp32", latency={"profile": {"path": profile.name, "cuda_graphs": False}})
    with pytest.raises(ValueError) as info:
        load_points(write(tmp_path, text))
    assert str(profile) in str(info.value) and fragment in str(info.value)


# ---- limits from the model and from the machine ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"workload": {"output_len": 10**7}}, "workload: requests x output_len = 10,000,000 tokens, more than"),
        ({"workload": {"output_len": 10**12}}, "workload.output_len: Input should be less than or equal to"),
        ({"workload": {"requests": 10**9}}, "limits.max_tokens (200,000); raise limits.max_tokens"),
        (
            {"workload": {"prompt_len": 128, "output_len": 8065}},
            "workload.output_len: prompt_len + output_len = 8,193 positions exceed SmolLM2-135M's context of 8,192",
        ),
        ({"policy": "fixed:10000"}, "policy: the policy's longest draft = 10,000 positions exceed SmolLM2-135M's"),
        ({"topology": {"tp": 1_000_000}}, "topology.tp: tp 1000000 does not divide SmolLM2-135M's 9 attention heads"),
        ({"topology": {"tp": 2}}, "topology.tp: tp 2 does not divide SmolLM2-135M's 9 attention heads"),
        ({"topology": {"stages": [{}, {"tp": 2}]}}, "topology.stages[1].tp: tp 2 does not divide"),
        ({"model": "Llama-2-70B", "topology": {"tp": 24, "stages": 1}}, "tp 24 does not divide Llama-2-70B's 64"),
        (
            {"model": "Qwen2.5-Coder-0.5B", "topology": {"tp": 7}},
            "tp 7 neither divides Qwen2.5-Coder-0.5B's 2 KV heads nor is a multiple of them",
        ),
        ({"topology": {"stages": 10**9}}, "topology.stages: 1000000000 stages but SmolLM2-135M has 30 layers"),
        ({"workload": {"prompt_len": 2**40}}, "workload.prompt_len: Input should be less than or equal to 2147483647"),
        (
            {
                "model": {
                    **dict.fromkeys(("num_heads", "num_kv_heads"), 2),
                    "name": "m",
                    "num_layers": 10**6,
                    "hidden_size": 8,
                    "intermediate_size": 8,
                    "vocab_size": 8,
                }
            },  # fmt: skip
            "model.num_layers: Input should be less than or equal to 1024",
        ),
    ],
)
def test_what_the_model_or_the_machine_cannot_hold_is_refused(tmp_path: Path, fields: dict, fragment: str) -> None:
    start = time.perf_counter()
    refused(write(tmp_path, scenario_text(**fields)), fragment)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "fields",
    [
        {"topology": {"tp": 3}},  # 9 heads, 3 KV heads
        {"model": "Gemma-3-270M", "topology": {"tp": 4}},  # 4 heads, 1 KV head replicated
        {"model": "Llama-2-70B", "topology": {"tp": 16, "stages": 1}},  # 64 heads, 8 KV heads on 2 ranks each
        {"workload": {"prompt_len": 128, "output_len": 8064}},  # the context exactly
        {"workload": {"requests": 300, "output_len": 1000}, "limits": {"max_tokens": 300_000}},
    ],
)
def test_what_fits_the_model_and_the_stated_limits_loads(tmp_path: Path, fields: dict) -> None:
    assert load_points(write(tmp_path, scenario_text(**fields)))


def test_an_inline_shape_bounds_the_context_where_it_gives_one(tmp_path: Path) -> None:
    shape = {"name": "tiny", "num_layers": 4, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
             "intermediate_size": 128, "vocab_size": 1000}  # fmt: skip
    workload = {"prompt_len": 100, "output_len": 60}
    assert load_points(write(tmp_path, scenario_text(model=shape, exit_layer=2, workload=workload)))
    text = scenario_text(model={**shape, "max_position_embeddings": 128}, exit_layer=2, workload=workload)
    refused(write(tmp_path, text), "prompt_len + output_len = 160 positions exceed tiny's context of 128")


def test_a_sweep_beyond_max_points_is_refused_before_it_expands(tmp_path: Path) -> None:
    sweep = {"acceptance.alpha": [i / 1000 for i in range(1000)], "seed": list(range(1000))}
    start = time.perf_counter()
    refused(write(tmp_path, scenario_text(sweep=sweep)), "sweep: 1000 x 1000 = 1,000,000 points, more than")
    assert time.perf_counter() - start < 5
    small = {"seed": list(range(12))}
    refused(write(tmp_path, scenario_text(sweep=small, limits={"max_points": 10})), "12 points, more than")
    assert len(load_points(write(tmp_path, scenario_text(sweep=small, limits={"max_points": 12})))) == 12
    refused(write(tmp_path, scenario_text(sweep={"limits.max_tokens": [1, 2]})), "sweep.limits: limits apply")
    refused(write(tmp_path, scenario_text(limits={"max_points": 0})), "limits.max_points: Input should be greater")


def test_an_integer_beyond_pythons_digit_limit_is_invalid_yaml(tmp_path: Path) -> None:
    refused(write(tmp_path, scenario_text() + "seed: " + "9" * 5000 + "\n"), "invalid YAML: Exceeds the limit")


# ---- calibration files checked against what they claim ---------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
CPU_PROFILE = ROOT / "calibration" / "cpu" / "latency_smollm2-135m_cpu_fp32.csv"
CPU_TRACE = ROOT / "calibration" / "cpu" / "acceptance_smollm2-135m_shared_builtin.csv"
H200_7B_PROFILE = ROOT / "calibration" / "h200" / "latency_llama-2-7b-4layers_cuda_bf16.csv"


def calibrated(**fields: object) -> str:
    calibration = {
        "dtype": "fp32",
        "latency": {"profile": {"path": str(CPU_PROFILE), "cuda_graphs": False}},
        "acceptance": {"trace": str(CPU_TRACE)},
        "workload": {"requests": 8, "prompt_len": 128, "output_len": 48},
    }
    return scenario_text(**{**calibration, **fields})


def test_the_shipped_calibration_files_load_for_their_model(tmp_path: Path) -> None:
    assert load_points(write(tmp_path, calibrated()))


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        (
            {"model": "Llama-2-7B"},
            (
                "latency.profile.path: ",
                str(CPU_PROFILE),
                "metadata.model: 'smollm2-135m' is SmolLM2-135M, not the scenario's model Llama-2-7B",
            ),
        ),
        (
            {"dtype": "bf16"},
            (
                "latency.profile.path: ",
                "metadata.dtype: the profile was measured in float32; expected the scenario's dtype to match, got bf16",
            ),
        ),
        (
            {"model": "Llama-2-13B", "dtype": "bf16", "latency": {"profile": {"path": str(H200_7B_PROFILE)}}},
            ("metadata.model: 'Llama-2-7B' is Llama-2-7B, not the scenario's model Llama-2-13B",),
        ),
    ],
)
def test_a_profile_made_with_another_model_or_dtype_is_refused(
    tmp_path: Path, fields: dict, fragments: tuple[str, ...]
) -> None:
    text = calibrated(**{k: v for k, v in fields.items() if k != "latency"})
    if "latency" in fields:
        text = scenario_text(**{**fields, "acceptance": {"alpha": 0.5}})
    refused(write(tmp_path, text), *fragments)


def test_a_profile_whose_name_is_a_path_is_checked_by_its_config(tmp_path: Path) -> None:
    profile = read_latency_profile(CPU_PROFILE)
    path = write_latency_profile(tmp_path / "p.csv", {**profile.metadata, "model": "/x/m.gguf"}, profile.records)
    text = scenario_text(model="Qwen2.5-Coder-0.5B", dtype="fp32", latency={"profile": {"path": str(path)}})
    refused(write(tmp_path, text), "metadata.model_config.hidden_size: 576 (model '/x/m.gguf'); the scenario's model")


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ({"model": "Llama-2-7B"}, "metadata.model: 'Llama-2-7B' is Llama-2-7B, not the scenario's model SmolLM2-135M"),
        ({"model": "/elsewhere/m.gguf", "num_layers": 24}, "metadata.num_layers: 24 layers (model '/elsewhere/m"),
    ],
)
def test_a_trace_made_with_another_model_is_refused(tmp_path: Path, metadata: dict, fragment: str) -> None:
    trace = read_acceptance_trace(CPU_TRACE)
    path = write_acceptance_trace(tmp_path / "t.csv", {**trace.metadata, **metadata}, trace.records)
    refused(write(tmp_path, calibrated(acceptance={"trace": str(path)})), "acceptance.trace: ", str(path), fragment)


def test_a_trace_cut_inside_a_number_names_the_file_and_line(tmp_path: Path) -> None:
    data = CPU_TRACE.read_bytes()
    cut = tmp_path / "cut.csv"
    cut.write_bytes(data[:-3])  # '...,0.0123\n' -> '...,0.01'
    with pytest.raises(ValueError) as info:
        load_points(write(tmp_path, calibrated(acceptance={"trace": str(cut)})))
    last_line = data.count(b"\n")  # the cut one: the lines before it end with a line end
    assert f"{cut}:{last_line}: the last line has no line end" in str(info.value)


def trace_with(tmp_path: Path, edit: Callable[[list[AcceptanceRecord]], list[AcceptanceRecord]]) -> Path:
    """A copy of the shipped CPU trace (exit layers 4, 8, 15, 22 of SmolLM2's 30) with its records edited."""
    trace = read_acceptance_trace(CPU_TRACE)
    return write_acceptance_trace(tmp_path / "t.csv", trace.metadata, edit(list(trace.records)))


def at_layer(records: list[AcceptanceRecord], layer: int, **fields: object) -> list[AcceptanceRecord]:
    return [dataclasses.replace(r, exit_layer=layer, **fields) for r in records if r.exit_layer == 8]


def without(records: list[AcceptanceRecord], position: int) -> list[AcceptanceRecord]:
    """The records less the first prompt's at `position` and exit layer 8 (the scenario's)."""
    return [r for r in records if (r.prompt_id, r.position, r.exit_layer) != ("builtin/chat-01", position, 8)]


TRACE_ROWS = len(read_acceptance_trace(CPU_TRACE).records)  # on lines 3 .. TRACE_ROWS + 2


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda r: r + at_layer(r, 40), f":{TRACE_ROWS + 3}: column 'exit_layer' must be in [1, 29] for SmolLM2-135M's "
         "30 layers, got 40"),
        (lambda r: r + at_layer(r, 30), f":{TRACE_ROWS + 3}: column 'exit_layer' must be in [1, 29] for SmolLM2-135M's "
         "30 layers, got 30"),
        (lambda r: [dataclasses.replace(r[0], token=49152), *r[1:]], ":3: column 'token' must be below SmolLM2-135M's "
         "vocab_size 49152, got 49152"),
        (lambda r: without(r, 5), ":27: column 'position': expected 5, got 6 (prompt 'builtin/chat-01' at "
         "exit_layer 8: a prompt's positions run 0, 1, 2, ... without gaps)"),
        (lambda r: without(r, 0), ":7: column 'position': expected 0, got 1 (prompt 'builtin/chat-01' at exit_layer 8"),
    ],
)  # fmt: skip
def test_a_trace_the_model_cannot_have_made_or_with_a_gap_is_refused_by_its_row(
    tmp_path: Path, edit: Callable, fragment: str
) -> None:
    """Rows at an exit layer the model does not have (even beside the scenario's), a token beyond its vocabulary, or
    a prompt whose positions skip one (a replay would join two parts of its text) name the file's line."""
    path = trace_with(tmp_path, edit)
    refused(write(tmp_path, calibrated(acceptance={"trace": str(path)})), "acceptance.trace: ", f"{path}{fragment}")


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ({"layers_profiled": 40}, "metadata.layers_profiled: 40 layers (model 'smollm2-135m'); expected 1 to the 30 "
         "layers the scenario's model SmolLM2-135M has"),
        ({"layers_profiled": 0, "total_layers": None}, "metadata.layers_profiled: 0 layers"),
        ({"layer_spot_check": [{"layer": 0}, {"layer": 30}]}, "metadata.layer_spot_check[1].layer: 30 (model "
         "'smollm2-135m'); expected a layer index in [0, 29]: the scenario's model SmolLM2-135M has 30 layers"),
    ],
)  # fmt: skip
def test_a_profile_that_timed_layers_the_model_lacks_is_refused(tmp_path: Path, metadata: dict, fragment: str) -> None:
    profile = read_latency_profile(CPU_PROFILE)
    changed = {key: value for key, value in {**profile.metadata, **metadata}.items() if value is not None}
    path = write_latency_profile(tmp_path / "p.csv", changed, profile.records)
    text = calibrated(latency={"profile": {"path": str(path), "cuda_graphs": False}})
    refused(write(tmp_path, text), "latency.profile.path: ", f"{path}: {fragment}")


@pytest.mark.parametrize("command", ["simulate", "serve-sim"])
def test_calibration_files_that_do_not_fit_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    from executor.cli import main

    trace = trace_with(tmp_path, lambda r: r + at_layer(r, 40))
    fields = yaml.safe_load(calibrated(acceptance={"trace": str(trace)}))
    if command == "serve-sim":
        del fields["method"], fields["workload"]
        fields["serving"] = {"workload": {"requests": 2, "arrival": {"process": "poisson", "rate_per_s": 1.0},
                                          "prompt_len": 128, "output_len": 8}}  # fmt: skip
    path = write(tmp_path, yaml.safe_dump(fields))
    assert main([command, str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith(f"eesd {command}: error: {path}: acceptance.trace: {trace}:{TRACE_ROWS + 3}: "), line
    assert "Traceback" not in captured.err and not (tmp_path / "out").exists()


def short_trace(tmp_path: Path, lengths: list[int]) -> Path:
    records = [
        AcceptanceRecord(f"p{p}", i, 7, 8, i % 3 == 0, 0.5) for p, length in enumerate(lengths) for i in range(length)
    ]
    return write_acceptance_trace(tmp_path / "short.csv", {"model": "SmolLM2-135M", "head": "shared"}, records)


@pytest.mark.parametrize(
    ("lengths", "workload", "fragment"),
    [
        ([10], {"requests": 8, "output_len": 48}, "holds 10 tokens at exit_layer 8 (1 prompts); the workload replays "
         "requests x output_len = 8 x 48 = 384"),
        ([200, 200], {"requests": 3, "output_len": 10}, "holds 2 prompts at exit_layer 8; 3 requests replay some"),
    ],
)  # fmt: skip
def test_a_trace_shorter_than_the_work_is_an_error_or_an_explicit_printed_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture, lengths: list[int], workload: dict, fragment: str
) -> None:
    trace = short_trace(tmp_path, lengths)
    text = scenario_text(acceptance={"trace": str(trace)}, workload={**workload, "prompt_len": 16})
    refused(write(tmp_path, text), "acceptance.trace: ", fragment, "set acceptance.reuse: cycle")
    text = scenario_text(acceptance={"trace": str(trace), "reuse": "cycle"}, workload={**workload, "prompt_len": 16})
    assert sim_cli.main([str(write(tmp_path, text)), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert f"note: acceptance.trace replayed cyclically (acceptance.reuse: cycle): the trace {fragment}"[:120] in (
        capsys.readouterr().out
    )


def test_reuse_needs_a_trace(tmp_path: Path) -> None:
    refused(write(tmp_path, scenario_text(acceptance={"alpha": 0.5, "reuse": "cycle"})), "reuse only applies with")


@pytest.mark.parametrize(
    ("field", "value"),
    [("acceptance", {"trace": "x" * 300}), ("acceptance", {"trace": "a\x00b"}), ("acceptance", {"trace": ""}),
     ("latency", {"profile": {"path": "/".join(["d"] * 3000)}}), ("topology", {"link": {"profile": "y" * 256}})],
)  # fmt: skip
def test_a_path_no_file_can_have_is_refused_by_field(tmp_path: Path, field: str, value: dict) -> None:
    refused(write(tmp_path, scenario_text(**{field: value})), f"{field}.", "expected a file's path")


def test_a_scenario_path_no_file_can_have_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv in (["x" * 300 + ".yaml"], [str(write(tmp_path, scenario_text())), "--out", str(tmp_path / ("o" * 300))]):
        assert sim_cli.main(argv) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert len(line) < 300 and ("not a file's path" in line or "not a path one can write to" in line), line


def test_many_mistakes_are_a_few_lines(tmp_path: Path) -> None:
    message = refused(write(tmp_path, scenario_text(topology={"stages": ["x"] * 50})), max_chars=2000)
    assert len(message.splitlines()) == 11 and message.endswith("and 40 more mistakes of this kind or others")
    refused(write(tmp_path, scenario_text(topology={"stages": ["x"] * 5000})), "List should have at most 1024 items")


@pytest.mark.parametrize(
    "sweep",
    [
        {"exit_layer": [8, 15], "cases": [{"exit_layer": 22}]},  # a field and a case group
        {"a": [{"exit_layer": 8}], "b": [{"policy": "fixed:1"}, {"exit_layer": 15}]},  # two case groups
        {"acceptance": [{"alpha": 0.5}], "acceptance.alpha": [0.6, 0.7]},  # a field and one inside it
    ],
)
def test_a_field_two_sweep_keys_set_is_refused(tmp_path: Path, sweep: dict) -> None:
    """The later key would overwrite the earlier at every point: the points run would not be the ones listed."""
    refused(write(tmp_path, scenario_text(sweep=sweep)), "sweep.", "also sets")


def test_an_output_is_probed_where_it_will_be_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that exists is written into (its parent may be read-only); a new file or folder is made in the
    nearest folder on its way."""
    import sim.formats as formats

    probed = []
    monkeypatch.setattr(formats, "_probe", lambda flag, path, where: probed.append(where))
    (tmp_path / "have").mkdir()
    formats.check_output("--out", tmp_path / "have", folder=True)
    formats.check_output("--out", tmp_path / "new" / "deeper", folder=True)
    formats.check_output("--json", tmp_path / "have" / "x.json")
    assert probed == [tmp_path / "have", tmp_path, tmp_path / "have"]


def test_a_worker_ends_with_its_killed_parent(tmp_path: Path) -> None:
    """`exit_with_parent`: a pool's or replicas' worker whose parent is killed (SIGKILL runs no clean-up) ends
    within a poll or two instead of living on."""
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    parent = (
        "import multiprocessing as mp, os, time\n"
        "from sim.workers import exit_with_parent\n"
        "def child(path, parent):\n"
        "    exit_with_parent(parent, 0.1)\n"
        "    open(path, 'w').write(str(os.getpid()))\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        f"    mp.get_context('spawn').Process(target=child, args=({str(pid_file)!r}, os.getpid())).start()\n"
        "    time.sleep(60)\n"
    )
    script = tmp_path / "parent.py"
    script.write_text(parent)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _running(child):
            time.sleep(0.1)
        if not _running(child):
            return
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the worker outlived its parent by 10 s")
    finally:
        if proc.poll() is None:
            proc.kill()


def _running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited and not yet reaped by an init that may never reap, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # the process may end and be reaped between the two looks: its /proc entry then goes, or reads ESRCH
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def test_worker_pools_end_with_their_parent() -> None:
    """Every pool `eesd simulate` and `eesd serve-sim` start is `sim.workers.pool`: its workers watch this pid."""
    from sim import serving_report, workers

    with workers.pool(2) as pool:
        assert pool._initializer is workers.exit_with_parent and pool._initargs == (os.getpid(),)
        assert pool._mp_context.get_start_method() == "spawn"  # not forkserver's: its workers' parent is the server
        assert list(pool.map(abs, [-1, -2, -3])) == [1, 2, 3]  # its workers run (none ended itself at start)
    for module in (sim_cli, serving_report, __import__("sim.runner", fromlist=["x"])):
        assert "ProcessPoolExecutor(" not in Path(module.__file__).read_text()


def test_an_interrupted_pool_drops_its_queued_work_and_stops_its_workers() -> None:
    """Ctrl-C in a sweep over --jobs: the pool does not run every queued point to its end before the command
    returns; the work not started is dropped and the workers stopped at once."""
    from sim import workers

    begin = time.perf_counter()
    with pytest.raises(KeyboardInterrupt), workers.pool(2) as pool:
        futures = [pool.submit(time.sleep, 30.0) for _ in range(6)]
        processes = list(pool._processes.values())
        raise KeyboardInterrupt
    assert time.perf_counter() - begin < 15.0  # not 90 s of queued sleeps, nor 30 s of the running ones
    finished = [f for f in futures if f.done() and not f.cancelled() and f.exception(timeout=5) is None]
    assert not finished  # no queued sleep ran to its end: dropped, or stopped with its worker
    deadline = time.perf_counter() + 20  # stopped, not left to finish their sleeps (the pool's own thread may be
    while any(_running(p.pid) for p in processes) and time.perf_counter() < deadline:  # the one to reap them)
        time.sleep(0.1)
    assert not any(_running(p.pid) for p in processes)


def test_an_interrupted_run_leaves_no_empty_output_folder(tmp_path: Path, monkeypatch) -> None:
    """--out is checked (made once) before the run, and made for good only when the outputs are written."""
    from executor.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim_cli, "run_points", interrupted)
    out = tmp_path / "new" / "deeper"
    assert main(["simulate", str(ROOT / "scenarios" / "quickstart.yaml"), "--out", str(out), "--no-progress"]) == 130
    assert not (tmp_path / "new").exists()
