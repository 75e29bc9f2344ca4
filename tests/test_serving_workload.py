"""Serving workloads (sim.workload): arrival processes and length distributions, seeded; bad inputs refused with the
file and the field named."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from sim.workload import (
    MAX_REQUESTS,
    MAX_TOKENS,
    ClosedLoopUsers,
    WorkloadError,
    build_workload,
    load_workload,
    parse_spec,
    with_rate,
)


def workload(data: dict, base: Path = Path(".")):
    return build_workload(parse_spec(data, "w.yaml"), base, "w.yaml")


def open_loop(**arrival) -> dict:
    return {"requests": 4000, "seed": 3, "arrival": arrival, "prompt_len": 8, "output_len": 4}


def gaps(requests) -> list[float]:
    times = [0.0] + [r.arrival_s for r in requests]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_poisson_rate_and_exponential_gaps():
    w = workload(open_loop(process="poisson", rate_per_s=5.0))
    between = gaps(w.requests)
    assert all(g >= 0 for g in between)
    assert statistics.mean(between) == pytest.approx(1 / 5.0, rel=0.05)
    assert statistics.stdev(between) / statistics.mean(between) == pytest.approx(1.0, rel=0.06)  # exponential: CV 1


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_gaps_have_the_asked_cv(cv):
    w = workload(open_loop(process="gamma", rate_per_s=5.0, cv=cv))
    between = gaps(w.requests)
    assert statistics.mean(between) == pytest.approx(1 / 5.0, rel=0.1)
    assert statistics.stdev(between) / statistics.mean(between) == pytest.approx(cv, rel=0.1)


def test_seeded_and_lengths_kept_across_rates():
    data = open_loop(process="poisson", rate_per_s=2.0)
    data["output_len"] = {"dist": "lognormal", "median": 50, "sigma": 0.8, "min": 2, "max": 400}
    data["prompt_len"] = {"dist": "uniform", "low": 3, "high": 9}
    first, again = workload(data), workload(data)
    assert first == again
    faster = build_workload(with_rate(parse_spec(data, "w.yaml"), 20.0, "w.yaml", "rate"), Path("."), "w.yaml")
    assert [(r.prompt_len, r.output_len) for r in faster.requests] == [
        (r.prompt_len, r.output_len) for r in first.requests
    ]
    assert faster.requests[-1].arrival_s < first.requests[-1].arrival_s / 5
    outputs = [r.output_len for r in first.requests]
    assert min(outputs) >= 2 and max(outputs) <= 400
    assert statistics.median(outputs) == pytest.approx(50, rel=0.1)
    assert {r.prompt_len for r in first.requests} == set(range(3, 10))
    other_seed = workload({**data, "seed": 4})
    assert [r.output_len for r in other_seed.requests] != outputs


def test_closed_loop_hands_requests_out_in_index_order():
    w = workload({"requests": 5, "arrival": {"process": "closed", "users": 2, "think_s": 1.5, "think": "fixed"},
                  "prompt_len": 4, "output_len": 3})  # fmt: skip
    assert w.closed and w.users == 2 and all(r.arrival_s is None and r.think_s == 1.5 for r in w.requests)
    users = ClosedLoopUsers(w)
    assert [(r.index, t) for r, t in users.first()] == [(0, 1.5), (1, 1.5)]
    assert users.after(10.0)[0].index == 2 and users.after(11.0)[1] == 12.5
    assert users.after(12.0)[0].index == 4
    assert users.after(13.0) is None


def test_trace_replay(tmp_path):
    (tmp_path / "t.csv").write_text(
        "# a comment\narrival_s,prompt_len,output_len,prompt_id\n0.0,5,7,a\n0.5,6,8,b\n0.5,7,9,\n", encoding="utf-8"
    )
    data = {"arrival": {"process": "trace", "path": "t.csv"}, "prompt_len": {"dist": "trace"},
            "output_len": {"dist": "trace"}}  # fmt: skip
    w = workload(data, tmp_path)
    assert [(r.arrival_s, r.prompt_len, r.output_len, r.prompt_id) for r in w.requests] == [
        (0.0, 5, 7, "a"), (0.5, 6, 8, "b"), (0.5, 7, 9, None)
    ]  # fmt: skip
    assert len(workload({**data, "requests": 2}, tmp_path).requests) == 2
    with pytest.raises(WorkloadError, match="requests: the trace t.csv has 3 rows"):
        workload({**data, "requests": 4}, tmp_path)
    fixed = workload({**data, "output_len": 3}, tmp_path)
    assert [r.output_len for r in fixed.requests] == [3, 3, 3]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("arrival_s,prompt_len\n0,1\n", "line 1: header: expected columns arrival_s,prompt_len,output_len"),
        ("arrival_s,prompt_len,output_len\n0,1,x\n", "line 2: output_len: expected an integer"),
        ("arrival_s,prompt_len,output_len\n1,1,1\n0.5,1,1\n", "line 3: arrival_s: arrival times must not decrease"),
        ("arrival_s,prompt_len,output_len\n-1,1,1\n", "line 2: arrival_s: expected a number in"),
        ("arrival_s,prompt_len,output_len\n0,0,1\n", "line 2: prompt_len: expected an integer in"),
        ("arrival_s,prompt_len,output_len\n0,2000000,1\n", "line 2: prompt_len: expected an integer in .1, 1,048,576"),
        (f"arrival_s,prompt_len,output_len\n0,{MAX_TOKENS + 1},1\n", "line 2: prompt_len"),
        ("arrival_s,prompt_len,output_len\n0,1\n", "line 2: expected 3 cells, got 2"),
        ("arrival_s,prompt_len,output_len\nnan,1,1\n", "line 2: arrival_s"),
        ("", "empty workload trace"),
    ],
)
def test_bad_trace_refused_with_line_and_column(tmp_path, body, message):
    (tmp_path / "t.csv").write_text(body, encoding="utf-8")
    data = {"arrival": {"process": "trace", "path": "t.csv"}, "prompt_len": 4, "output_len": 4}
    with pytest.raises(WorkloadError, match="t.csv: " + message.replace("(", r"\(")):
        workload(data, tmp_path)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"requests": 0}, "requests: Input should be greater than or equal to 1"),
        ({"requests": MAX_REQUESTS + 1}, "requests: Input should be less than or equal to"),
        ({"arrival": {"process": "poisson", "rate_per_s": 0}}, "arrival.rate_per_s: Input should be greater than 0"),
        ({"arrival": {"process": "gamma", "rate_per_s": 1}}, "arrival.cv: required field is missing"),
        ({"arrival": {"process": "burst", "rate_per_s": 1}}, "arrival: Input tag 'burst'"),
        ({"arrival": {"process": "closed", "users": 0, "think_s": 1}}, "arrival.users: Input should be greater"),
        ({"arrival": {"process": "closed", "users": 2, "think_s": -1}}, "arrival.think_s: Input should be greater"),
        ({"arrival": {"process": "trace", "path": "missing.csv"}}, "arrival.path: file not found"),
        ({"prompt_len": 0}, "prompt_len: Input should be greater than or equal to 1 .got 0.$"),
        ({"prompt_len": {"dist": "fixed", "value": 0}}, "prompt_len.value: Input should be greater than or equal to 1"),
        ({"output_len": MAX_TOKENS + 1}, "output_len: Input should be less than or equal to"),
        ({"output_len": "long"}, "output_len: expected an integer .a fixed length. or a mapping"),
        (
            {"output_len": {"dist": "uniform", "low": 9, "high": 3}},
            r"output_len: low must be <= high \(got low 9, high 3\)$",
        ),
        ({"output_len": {"dist": "lognormal", "median": 9, "sigma": 1, "min": 9, "max": 3}}, "output_len: min must"),
        ({"output_len": {"dist": "trace"}}, "output_len: dist trace reads a column of the arrival trace"),
        ({"prompt_len": {"dist": "zipf"}}, "prompt_len: Input tag 'zipf'"),
        ({"rate": 3}, "rate: unknown key"),
        ({"arrival": {"process": "poisson", "rate": 3}}, r"arrival.rate: unknown key \(did you mean rate_per_s\?\)$"),
    ],
)
def test_bad_workload_refused_with_field(change, field):
    data = {**open_loop(process="poisson", rate_per_s=1.0), **change}
    with pytest.raises(WorkloadError, match="^w.yaml: " + field):
        workload(data)


def test_missing_requests_and_bad_rate_sweep():
    with pytest.raises(WorkloadError, match="w.yaml: requests: required"):
        workload({"arrival": {"process": "poisson", "rate_per_s": 1}, "prompt_len": 1, "output_len": 1})
    closed = parse_spec({"requests": 2, "arrival": {"process": "closed", "users": 1, "think_s": 0},
                         "prompt_len": 1, "output_len": 1}, "w.yaml")  # fmt: skip
    with pytest.raises(WorkloadError, match="w.yaml: serving.rates_per_s: a rate sweep needs poisson or gamma"):
        with_rate(closed, 2.0, "w.yaml", "serving.rates_per_s")
    spec = parse_spec(open_loop(process="poisson", rate_per_s=1.0), "w.yaml")
    with pytest.raises(WorkloadError, match="rates must be in"):
        with_rate(spec, math.inf, "w.yaml", "serving.rates_per_s")


def test_load_workload_file(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("requests: 3\narrival: {process: poisson, rate_per_s: 1}\nprompt_len: 4\noutput_len: 2\n")
    assert len(load_workload(path).requests) == 3
    path.write_text("requests: [3\n")
    with pytest.raises(ValueError, match="w.yaml: invalid YAML"):
        load_workload(path)
    path.write_text("- 3\n")
    with pytest.raises(WorkloadError, match=r"w.yaml: \(top level\): expected a mapping"):
        load_workload(path)
    with pytest.raises(FileNotFoundError):
        load_workload(tmp_path / "none.yaml")


def test_a_scenario_or_a_csv_given_as_a_workload_says_what_it_is(tmp_path) -> None:
    from sim.workload import WorkloadError, load_workload

    root = Path(__file__).resolve().parents[1] / "scenarios"
    with pytest.raises(WorkloadError, match=r"serving_cpu.yaml: a scenario, not a workload .*eesd serve-sim"):
        load_workload(root / "serving_cpu.yaml")
    with pytest.raises(WorkloadError, match=r"a workload is a YAML file; a CSV trace is replayed through one"):
        load_workload(root / "workloads" / "smollm2_cpu_rate0.4.csv")


def test_a_misspelt_key_is_one_line_saying_what_was_meant(tmp_path) -> None:
    from sim.workload import WorkloadError, load_workload

    path = tmp_path / "w.yaml"
    path.write_text("requests: 4\narival: {process: poisson, rate_per_s: 1}\nprompt_len: {dist: fixed, value: 8}\n"
                    "output_len: {dist: fixed, valeu: 8}\n")  # fmt: skip
    with pytest.raises(WorkloadError) as info:
        load_workload(path)
    assert str(info.value).splitlines() == [
        f"{path}: output_len.valeu: unknown key (did you mean value?)",
        f"{path}: arival: unknown key (did you mean arrival?)",
    ]  # no "required field is missing" for the fields they misspell
