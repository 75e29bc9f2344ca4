"""The serving simulator (sim.serving): closed forms (Little's law on every run, M/D/1 for AR at batch 1), every
request completing once with every token counted once, the admission rules, and bad scenarios refused by field."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sim.runner import plots_available
from sim.scenario import ScenarioError
from sim.serving import (
    ServingPoint,
    ServingResult,
    load_serving_points,
    metrics,
    plan_kv_tokens,
    simulate_serving,
)
from sim.serving_report import _crossing, _falls_below, capacity, run_serving, stop_paying, write_outputs
from sim.workload import WorkloadError, build_workload, parse_spec

ROOT = Path(__file__).resolve().parent.parent
LAYER_US = 100.0  # constant latencies: every pass costs the same (30 layers x 100 µs), whatever q and the batch


def write_scenario(tmp_path: Path, serving: dict, **fields) -> Path:
    data = {
        "name": "serving-test",
        "model": "SmolLM2-135M",
        "method": "ar",
        "exit_layer": 15,
        "policy": "fixed:3",
        "latency": {"constant_us": {"layer": LAYER_US}},
        "acceptance": {"alpha": 0.6},
        **fields,
        "serving": serving,
    }
    path = tmp_path / "serving.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def poisson(requests: int, rate: float, prompt=16, output=12, seed=0) -> dict:
    return {"requests": requests, "seed": seed, "arrival": {"process": "poisson", "rate_per_s": rate},
            "prompt_len": prompt, "output_len": output}  # fmt: skip


def check_run(point: ServingPoint, result: ServingResult) -> dict[str, float]:
    """What every run must satisfy: each request arrives, starts, gets its first token and finishes once, in that
    order, with exactly its output length (or up to its replayed text's EOS); the tokens counted round by round are the
    records' sum; Little's law holds over the run's window; the slots and the KV budget are never exceeded."""
    records, lengths = result.records, generated(point)
    assert sorted(r.index for r in records) == list(range(len(point.workload.requests)))
    for record, length in zip(records, lengths, strict=True):
        assert record.arrival_s <= record.start_s < record.first_token_s <= record.finish_s
        assert record.tokens == length
    assert result.tokens == sum(lengths)
    row = metrics(result)
    assert row["mean_in_system"] == pytest.approx(row["little_lambda_w"], rel=1e-9)
    assert row["mean_in_system"] > 0
    tokens = plan_kv_tokens(point.plan)
    assert {r.replica for r in records} <= set(range(point.replicas))
    for replica in range(point.replicas):  # each replica has its own slots and KV cache
        mine = [r for r in records if r.replica == replica]
        slots, kv = peak_use(mine, lambda r: 1), peak_use(mine, lambda r: tokens(point.workload.requests[r.index]))
        assert slots <= point.max_batch
        assert point.kv_capacity_tokens is None or kv <= point.kv_capacity_tokens
    assert 0 < row["busy_pct"] <= 100 + 1e-9
    return row


def generated(point: ServingPoint) -> list[int]:
    """The tokens each request generates: its output length, or fewer where its replayed text ends at an EOS."""
    return [point.plan.acceptance.output_len(r.index, r.output_len) for r in point.workload.requests]


def peak_use(records, weight) -> int:
    """The most of `weight` held at once by requests between their prefill's start and their end (a request leaving
    at a round's end frees its share before the next admission at that instant)."""
    events = sorted([(r.start_s, 1, weight(r)) for r in records] + [(r.finish_s, -1, weight(r)) for r in records])
    level = peak = 0
    for _, sign, amount in events:
        level += sign * amount
        peak = max(peak, level)
    return peak


@pytest.mark.parametrize("method", ["ar", "eesd"])
@pytest.mark.parametrize(
    "arrival",
    [
        {"process": "poisson", "rate_per_s": 30.0},
        {"process": "gamma", "rate_per_s": 30.0, "cv": 4.0},
        {"process": "closed", "users": 5, "think_s": 0.02},
    ],
)
def test_every_run_completes_counts_and_obeys_littles_law(tmp_path, method, arrival):
    workload = {"requests": 300, "seed": 2, "arrival": arrival, "prompt_len": {"dist": "uniform", "low": 4, "high": 64},
                "output_len": {"dist": "lognormal", "median": 20, "sigma": 0.7, "max": 120}}  # fmt: skip
    path = write_scenario(tmp_path, {"workload": workload, "methods": [method], "max_batch": 4})
    (point,) = load_serving_points(path)
    row = check_run(point, simulate_serving(point))
    assert 0 < row["occupancy"] <= 1
    if method == "eesd":
        assert 0 < row["acceptance"] < 1 and row["tokens_per_round"] > 1


PPSD_FIELDS = {"topology": {"stages": 2}}  # stage 1 ends at the exit layer, 15 of 30


def ppsd_point(tmp_path: Path, serving: dict, **fields) -> ServingPoint:
    (point,) = load_serving_points(write_scenario(tmp_path, {"methods": ["ppsd"], **serving}, **PPSD_FIELDS, **fields))
    return point


@pytest.mark.parametrize("backend", ["distributed", "sequential"])
@pytest.mark.parametrize(
    "arrival", [{"process": "poisson", "rate_per_s": 30.0}, {"process": "closed", "users": 3, "think_s": 0.01}]
)
def test_ppsd_serves_one_request_at_a_time(tmp_path, backend, arrival):
    """PPSD serves one request at a time whatever `max_batch` says for the other methods: every request completes
    once, Little's law holds, no two requests overlap, and each decode is logged once with its ticks as rounds."""
    workload = {"requests": 120, "seed": 3, "arrival": arrival, "prompt_len": {"dist": "uniform", "low": 4, "high": 64},
                "output_len": {"dist": "lognormal", "median": 20, "sigma": 0.7, "max": 120}}  # fmt: skip
    point = ppsd_point(tmp_path, {"workload": workload, "max_batch": 8}, ppsd_backend=backend)
    assert point.max_batch == 1 and point.plan.workload.batch_size == 1
    result = simulate_serving(point)
    row = check_run(point, result)
    records = sorted(result.records, key=lambda r: r.start_s)
    assert all(a.finish_s <= b.start_s for a, b in zip(records, records[1:], strict=False))
    decodes = [log for log in result.passes if log.kind == "ppsd"]
    assert len(decodes) == sum(r.output_len > 1 for r in point.workload.requests)
    assert result.rounds == result.row_rounds == sum(log.tokens for log in decodes)
    assert sum(log.seconds for log in decodes) == pytest.approx(result.decode_s, rel=1e-12)
    assert 0 < row["acceptance"] < 1 and row["mean_batch"] == 1.0
    assert 0.5 < row["tokens_per_round"] < 1  # tokens per tick: between AR through 2 stages (1/2) and every draft right


@pytest.mark.parametrize("backend", ["distributed", "sequential"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_served_ppsd_decode_is_the_engines_run_of_that_request(tmp_path, backend, alpha):
    """Alone in the server (one user), a request's PPSD decode takes what the engine's static run of that
    request takes (`sim.engine.Simulation`, one request of its lengths), and its first token what its prefill takes."""
    from sim.engine import Simulation
    from sim.plan import Workload

    workload = {"requests": 6, "seed": 1, "arrival": {"process": "closed", "users": 1, "think_s": 0.5},
                "prompt_len": {"dist": "uniform", "low": 4, "high": 300}, "output_len": {"dist": "uniform", "low": 2,
                "high": 90}}  # fmt: skip
    point = ppsd_point(tmp_path, {"workload": workload}, ppsd_backend=backend, acceptance={"alpha": alpha})
    result = simulate_serving(point)
    decodes = iter(log for log in result.passes if log.kind == "ppsd")
    for request, record in zip(point.workload.requests, result.records, strict=True):
        alone = dataclasses.replace(point.plan, workload=Workload(1, 1, request.prompt_len, request.output_len))
        static = Simulation(alone).run()
        assert record.queue_s == 0
        assert record.ttft_s * 1e6 == pytest.approx(static.prefill_time_us, rel=1e-9)  # times in s after ~100 s
        log = next(decodes)
        assert log.seconds * 1e6 == pytest.approx(static.decode_time_us, rel=1e-9)
        assert log.tokens == static.ticks and sum(log.verdicts) == static.accepted


@pytest.mark.parametrize(("backend", "graphs"), [("distributed", False), ("sequential", False), ("sequential", True)])
def test_ppsd_serves_static_batches_in_lockstep(tmp_path, backend, graphs):
    """PPSD given its own max_batch (`serving.by_method.ppsd.serving.max_batch`) serves static batches: the requests
    waiting when the pipe is free enter together (one prefill, as wide as the longest prompt), decode in lockstep,
    each leaving when the host reads its last token, and the next batch starts once every row is done. Every request
    completes once, Little's law holds, and a batch's decode is the engine's run of its rows
    (`sim.engine.decode_rows`): each request's finish is its row's read time after the decode began."""
    from sim.engine import BatchRow, decode_rows
    from sim.serving import ServingSimulation

    rate = 20_000.0 if graphs else 60.0  # a queue behind the batches: an H100's roofline, or a layer of 200 µs
    workload = {"requests": 120, "seed": 3, "arrival": {"process": "poisson", "rate_per_s": rate},
                "prompt_len": {"dist": "uniform", "low": 4, "high": 64},
                "output_len": {"dist": "lognormal", "median": 20, "sigma": 0.7, "max": 120}}  # fmt: skip
    serving = {"methods": ["ppsd"], "workload": workload, "by_method": {"ppsd": {"serving.max_batch": 4}}}
    device = {"latency": {"roofline": {}}, "topology": {"stages": 2, "gpu": "H100"}} if graphs else PPSD_FIELDS
    (point,) = load_serving_points(write_scenario(tmp_path, serving, ppsd_backend=backend, **device))
    assert point.max_batch == 4 and not point.notes
    simulation = ServingSimulation(point.plan, point.workload, 4, None)
    result = simulation.run()
    row = check_run(point, result)
    assert 1 < row["mean_batch"] <= 4 and 0 < row["acceptance"] < 1
    # the executor's serving loop reads every tick uncaptured, every SYNC_CAPTURED ticks captured
    assert simulation.ppsd_plan.sync_every == (8 if graphs else 1)
    groups: dict[float, list] = {}
    for record in sorted(result.records, key=lambda r: (r.start_s, r.index)):
        groups.setdefault(record.start_s, []).append(record)
    batches = list(groups.values())
    assert [r.index for b in batches for r in b] == list(range(120))  # first come, first served
    assert all(len(b) <= 4 and len({r.first_token_s for r in b}) == 1 for b in batches)
    assert all(max(r.finish_s for r in a) <= b[0].start_s for a, b in zip(batches, batches[1:], strict=False))
    assert any(len({r.finish_s for r in b}) > 1 for b in batches)  # rows of a batch leave at their own ends
    prefills = [log for log in result.passes if log.kind == "prefill"]
    assert [(log.batch, log.tokens) for log in prefills] == [(len(b), max(r.prompt_len for r in b)) for b in batches]
    decodes = [log for log in result.passes if log.kind == "ppsd"]
    assert result.rounds == sum(log.tokens for log in decodes)
    assert result.drafted == sum(len(log.verdicts) for log in decodes)
    plan = simulation.ppsd_plan
    for batch, decode in zip([b for b in batches if any(r.output_len > 1 for r in b)], decodes, strict=True):
        rows = [BatchRow(_Fixed(decode.verdicts), None, r.output_len) for r in batch]
        run, reads = decode_rows(plan, decode.context, rows)
        assert run.ticks == decode.tokens and decode.seconds * 1e6 == pytest.approx(run.decode_time_us, rel=1e-9)
        for record, read in zip(batch, reads, strict=True):
            if record.output_len > 1:
                assert (record.finish_s - decode.start_s) * 1e6 == pytest.approx(read, rel=1e-6, abs=1e-3)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_captured_ppsd_decode_cut_by_an_eos_is_costed_with_its_unread_ticks(tmp_path, batch):
    """Captured, a PPSD decode that ends at an EOS before the tokens asked runs the rest of its block of 8 ticks
    unread; its log carries the tokens asked (`PassLog.asked`), so costing it again from its verdicts gives the time
    the run charged, those ticks included."""
    from test_sim_eos import hand_trace

    from sim.serving import ServingSimulation, logged_ratios

    trace = hand_trace(tmp_path)
    serving = {"methods": ["ppsd"], "workload": poisson(12, 2000.0, output=20, seed=1)}
    fields = {"latency": {"roofline": {}}, "topology": {"stages": 2, "gpu": "H100"}, "exit_layer": 4,
              "acceptance": {"trace": str(trace), "reuse": "cycle"}}  # fmt: skip
    (point,) = load_serving_points(write_scenario(tmp_path, serving, ppsd_backend="sequential", **fields))
    result = ServingSimulation(point.plan, point.workload, batch, None).run()
    decodes = [log for log in result.passes if log.kind == "ppsd"]
    assert any(log.asked > log.furthest - log.context + 2 for log in decodes)  # some ended at their EOS
    assert batch == 1 or max(log.batch for log in decodes) > 1
    fresh = ServingSimulation(point.plan, point.workload, batch, None)
    assert logged_ratios(fresh, result.passes) == pytest.approx([1.0] * len(result.passes), rel=1e-9)


class _Fixed:
    """Every row drafts as the batch's logged verdicts say (the batch then judges as it did)."""

    def __init__(self, verdicts) -> None:
        self.verdicts = verdicts

    def draft(self, position: int, index: int) -> tuple[bool, float]:
        return (self.verdicts[position - 1] if 0 <= position - 1 < len(self.verdicts) else True), 1.0


def test_a_lockstep_batchs_verdicts_are_its_going_rows() -> None:
    """A batch's verdict at a position is every going row's (one that has a token after it); a row ending there
    decides nothing, unless every row judged there ends (then theirs)."""
    from sim.serving import RecordingStream, batch_verdicts

    class Table:
        def __init__(self, marks: str) -> None:
            self.marks = marks

        def draft(self, position: int, index: int) -> tuple[bool, float]:
            return self.marks[position - 1] == "y", 1.0

    streams = [RecordingStream(Table("yyny")), RecordingStream(Table("nnyy"))]
    for stream, upto in zip(streams, (4, 2), strict=True):  # row 0: 6 tokens, row 1: 3 (ends at position 2)
        for position in range(1, upto + 1):
            stream.draft(position, 0)
    assert batch_verdicts(streams, [6, 3]) == (False, True, False, True)  # position 2: row 1 ends there, no say
    assert batch_verdicts(streams[1:], [3]) == (False, False)  # alone, its own (the last judged as it ends)


def test_ppsd_notes_a_shared_max_batch_it_does_not_take(tmp_path) -> None:
    serving = {"workload": poisson(5, 1.0), "methods": ["ar", "ppsd"], "max_batch": 4}
    points = load_serving_points(write_scenario(tmp_path, serving, **PPSD_FIELDS))
    ppsd = next(p for p in points if p.method == "ppsd")
    assert ppsd.max_batch == 1
    assert any("serving.by_method.ppsd.serving.max_batch for PPSD's static lockstep batches" in n for n in ppsd.notes)


def test_md1_waiting_time_for_ppsd_at_full_acceptance(tmp_path):
    """PPSD at alpha 1 with fixed lengths serves each request in the same time: an M/D/1 queue again."""
    from sim.engine import Simulation
    from sim.plan import Workload

    output, rate = 10, 20.0
    point = ppsd_point(tmp_path, {"workload": poisson(20_000, rate, output=output, seed=4)}, acceptance={"alpha": 1.0})
    static = Simulation(dataclasses.replace(point.plan, workload=Workload(1, 1, 16, output))).run()
    service_s = (static.prefill_time_us + static.decode_time_us) / 1e6
    rho = rate * service_s
    result = simulate_serving(point)
    waits = [r.queue_s for r in result.records]
    expected = rho / (2 * (1 / service_s) * (1 - rho))
    batches = [statistics.mean(waits[i : i + 1000]) for i in range(0, len(waits), 1000)]
    assert abs(statistics.mean(waits) - expected) < 4 * statistics.stdev(batches) / math.sqrt(len(batches))


def test_a_logged_ppsd_decode_is_costed_at_what_the_run_charged(tmp_path):
    """Costing a logged PPSD decode again from its verdicts (`logged_us`, as the executor's are costed) gives the
    time the run charged: on a latency that varies with every argument, on one host and free-running, and with
    layers alone costed on two free-running stages, where the engine judges some positions' drafts more than once
    (a draft flushed behind a wrong one is drafted and judged again), under acceptance that depends on a draft's
    place since the last flush: the verdict logged must be the last one, on the committed path."""
    from sim.serving import ServingSimulation, logged_ratios

    cases = [("distributed", 2, {"alpha": 0.6}, True), ("sequential", 2, {"alpha": 0.6}, True)]
    cases += [("distributed", 4, {"alpha": 0.6}, True), ("distributed", 2, {"alphas": [0.9, 0.2, 0.7]}, False)]
    cases = [(*case, 1) for case in cases] + [(*case, 4) for case in cases[:3]]  # and static lockstep batches of 4
    for backend, count, acceptance, varying, batch in cases:
        rate = 5.0 if batch == 1 else 500.0  # requests queue up behind a batch
        workload = poisson(40, rate, prompt={"dist": "uniform", "low": 4, "high": 90}, seed=5)
        (point,) = load_serving_points(write_scenario(
            tmp_path, {"methods": ["ppsd"], "workload": workload}, topology={"stages": count},
            exit_layer=15 if count == 2 else 8, ppsd_backend=backend, acceptance=acceptance,
        ))  # fmt: skip
        if varying:
            stages = tuple(dataclasses.replace(stage, latency=_Varying()) for stage in point.plan.stages)
            point = dataclasses.replace(point, plan=dataclasses.replace(point.plan, stages=stages))
        result = ServingSimulation(point.plan, point.workload, batch, None).run()
        fresh = ServingSimulation(point.plan, point.workload, batch, None)
        ratios = logged_ratios(fresh, result.passes)
        assert ratios == pytest.approx([1.0] * len(result.passes), rel=1e-9)
        assert {log.kind for log in result.passes} == {"prefill", "ppsd"}
        assert batch == 1 or max(log.batch for log in result.passes) > 1


def test_trace_workload_file_and_kv_budget(tmp_path):
    lines = ["arrival_s,prompt_len,output_len"] + [f"{0.001 * i},{10 + i % 7},{5 + i % 11}" for i in range(60)]
    (tmp_path / "trace.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "w.yaml").write_text(
        "arrival: {process: trace, path: trace.csv}\nprompt_len: {dist: trace}\noutput_len: {dist: trace}\n"
    )
    # AR holds prompt + output + 1 slots (17 to 32 tokens a request): 80 tokens admit 2 to 4 at a time
    path = write_scenario(tmp_path, {"workload": "w.yaml", "max_batch": 8, "kv_capacity_tokens": 80})
    (point,) = load_serving_points(path)
    assert point.kv_capacity_tokens == 80
    result = simulate_serving(point)
    check_run(point, result)
    assert 2 < metrics(result)["mean_batch"] < 4
    unlimited = dataclasses.replace(point, kv_capacity_tokens=None)
    assert metrics(simulate_serving(unlimited))["mean_batch"] > 4


def test_md1_waiting_time_for_ar_at_batch_one(tmp_path):
    """Poisson arrivals, fixed lengths and constant pass costs make AR at batch 1 an M/D/1 queue: the mean wait
    W = rho / (2 mu (1 - rho)), within four standard errors of the batch means of the simulated waits."""
    output = 10
    service_s = output * 30 * LAYER_US / 1e6  # the prefill and output - 1 decode steps, each one pass
    rate = 16.0
    rho = rate * service_s
    path = write_scenario(tmp_path, {"workload": poisson(20_000, rate, output=output, seed=1), "max_batch": 1})
    (point,) = load_serving_points(path)
    result = simulate_serving(point)
    check_run(point, result)
    waits = [r.queue_s for r in result.records]
    expected = rho / (2 * (1 / service_s) * (1 - rho))
    batches = [statistics.mean(waits[i : i + 1000]) for i in range(0, len(waits), 1000)]
    standard_error = statistics.stdev(batches) / math.sqrt(len(batches))
    assert abs(statistics.mean(waits) - expected) < 4 * standard_error
    assert metrics(result)["busy_pct"] == pytest.approx(100 * rho, rel=0.05)


def test_eesd_at_full_acceptance_emits_draft_len_plus_one(tmp_path):
    path = write_scenario(
        tmp_path, {"workload": poisson(50, 5.0, output=41), "methods": ["eesd"]}, acceptance={"alpha": 1.0}
    )
    (point,) = load_serving_points(path)
    result = simulate_serving(point)
    check_run(point, result)
    assert metrics(result)["tokens_per_round"] == pytest.approx(4.0)  # fixed:3 at alpha 1: 3 + 1 per round


def test_first_come_first_served(tmp_path):
    path = write_scenario(tmp_path, {"workload": poisson(400, 200.0), "max_batch": 3, "methods": ["eesd"]})
    (point,) = load_serving_points(path)
    result = simulate_serving(point)
    check_run(point, result)
    starts = [r.start_s for r in result.records]
    assert starts == sorted(starts) and metrics(result)["queue_mean_ms"] > 0


def test_rate_sweep_methods_cases_and_outputs(tmp_path):
    serving = {
        "workload": poisson(200, 1.0),
        "methods": ["ar", "eesd"],
        "rates_per_s": [2, 20, 200],
        "max_batch": 4,
        "slo": {"ttft_ms": 50, "tpot_ms": 4},
        "cases": [{"name": "low", "acceptance.alpha": 0.2}, {"name": "high", "acceptance.alpha": 0.95}],
    }
    points = load_serving_points(write_scenario(tmp_path, serving))
    assert [(p.case, p.rate_per_s, p.method) for p in points[:4]] == [
        ("low", 2, "ar"), ("low", 2, "eesd"), ("low", 20, "ar"), ("low", 20, "eesd")
    ]  # fmt: skip
    same = [p.workload.requests for p in points if p.rate_per_s == 2]
    assert all(requests == same[0] for requests in same)
    runs = run_serving(points, progress=False)
    for run in runs:
        check_run(run.point, run.result)
        assert 0 <= run.metrics["goodput_rps"] <= run.metrics["requests_per_s"]
    crossings = {c["case"]: c for c in stop_paying(runs)}
    assert crossings["low"]["stop_rate_per_s"] == "never"  # drafts that are rarely accepted never pay
    assert crossings["high"]["stop_rate_per_s"] != "never"
    written = {p.name for p in write_outputs(runs, tmp_path / "out")}
    assert {"serving.csv", "speculation.csv"} <= written


def test_ppsd_pays_at_light_load_and_stops_once_requests_queue(tmp_path):
    """PPSD at a high acceptance on four free-running stages beats batched AR on the same stages while requests rarely
    wait for one another, and stops paying once they queue behind its one request at a time: the sweep finds that
    rate between the two swept around it, and `serving.csv` names PPSD's stages, exit layer and batch of 1."""
    import csv

    serving = {"workload": poisson(300, 1.0, output=40), "methods": ["ar", "ppsd"], "rates_per_s": [5, 40, 400],
               "max_batch": 8}  # fmt: skip
    points = load_serving_points(
        write_scenario(tmp_path, serving, topology={"stages": 4}, exit_layer=8, acceptance={"alpha": 0.9})
    )
    runs = run_serving(points, progress=False)
    for run in runs:
        check_run(run.point, run.result)
    (crossing,) = stop_paying(runs)
    assert crossing["method"] == "ppsd" and 5 < crossing["stop_rate_per_s"] < 400, crossing
    write_outputs(runs, tmp_path / "out")
    rows = [r for r in csv.DictReader((tmp_path / "out" / "serving.csv").open()) if r["method"] == "ppsd"]
    assert {(r["stages"], r["exit_layer"], r["max_batch"]) for r in rows} == {("4", "8", "1")}


def test_crossing_interpolates_the_latency_ratio():
    assert _crossing([1, 2, 4], [0.8, 0.9, 1.1])["stop_rate_per_s"] == pytest.approx(3.0)
    assert _crossing([1, 2], [1.2, 0.9])["stop_rate_per_s"] == "never"
    assert _crossing([1, 2], [0.5, 0.9])["stop_rate_per_s"] is None


def test_falls_below_interpolates_the_share_within_the_slo():
    assert _falls_below([1, 2, 4], [100.0, 95.0, 85.0], 90.0) == pytest.approx(3.0)
    assert _falls_below([1, 2, 4], [100.0, 90.0, 80.0], 90.0) == pytest.approx(2.0)  # at the target still holds
    assert _falls_below([1, 2], [80.0, 70.0], 90.0) == "never"
    assert _falls_below([1, 2], [100.0, 90.0], 90.0) is None


@pytest.mark.parametrize("replicas", [1, 2])
def test_capacity_is_the_rate_where_the_slo_stops_holding(tmp_path, replicas):
    """`capacity.csv`: per method, the swept rate where the share of requests within the SLO falls below
    `attainment_pct`, between the two swept rates whose shares straddle it, and per device; more replicas hold it
    further; a scenario without SLO bounds has no capacity rows."""
    import csv

    serving = {"workload": poisson(400, 1.0), "methods": ["ar", "eesd"], "rates_per_s": [20, 100, 300, 900, 2700],
               "max_batch": 4, "replicas": replicas, "slo": {"ttft_ms": 20, "attainment_pct": 80}}  # fmt: skip
    runs = run_serving(load_serving_points(write_scenario(tmp_path, serving)), progress=False)
    found = {item["method"]: item for item in capacity(runs)}
    for method, item in found.items():
        shares = {r.point.rate_per_s: r.metrics["slo_pct"] for r in runs if r.point.method == method}
        rate = item["capacity_rps"]
        below = min(r for r, share in shares.items() if share < 80)
        above = max(r for r in shares if r < below)
        assert all(shares[r] >= 80 for r in shares if r <= above), (item, shares)
        fraction = (shares[above] - 80) / (shares[above] - shares[below])  # where the share passes 80%, linearly
        assert rate == pytest.approx(above + fraction * (below - above), abs=1e-3) and above <= rate < below
        assert item["devices"] == replicas and item["capacity_rps_per_device"] == pytest.approx(rate / replicas, 1e-3)
    write_outputs(runs, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "capacity.csv").open()))
    assert (tmp_path / "out" / "capacity.png").is_file() or not plots_available()
    assert [r["method"] for r in rows] == ["ar", "eesd"]
    assert float(rows[0]["capacity_rps"]) == found["ar"]["capacity_rps"]
    if replicas == 2:
        single = dict(serving, replicas=1)
        alone = {i["method"]: i for i in capacity(run_serving(load_serving_points(write_scenario(tmp_path, single)),
                                                              progress=False))}  # fmt: skip
        assert found["ar"]["capacity_rps"] > 1.5 * alone["ar"]["capacity_rps"]
    serving["slo"] = {}
    assert capacity(run_serving(load_serving_points(write_scenario(tmp_path, serving)), progress=False)) == []


def test_kv_capacity_auto_from_gpu_memory(tmp_path):
    fields = {"latency": {"roofline": {}}, "topology": {"gpu": "H100"}}
    (point,) = load_serving_points(write_scenario(tmp_path, {"workload": poisson(5, 1.0)}, **fields))
    model = point.plan.model
    weights = (30 * model.layer_params + model.lm_head_params) * 2
    per_token = 30 * model.kv_bytes_per_token(2)
    assert point.kv_capacity_tokens == int((0.9 * 80 * 2**30 - weights) // per_token)
    profiled = {"latency": {"profile": {"path": str(ROOT / "calibration/cpu/latency_smollm2-135m_cpu_fp32.csv"),
                                        "cuda_graphs": False}}, "dtype": "fp32"}  # fmt: skip
    (point,) = load_serving_points(write_scenario(tmp_path, {"workload": poisson(5, 1.0)}, **profiled))
    assert point.kv_capacity_tokens is None  # a CPU's memory is not known: no limit unless given
    inline = {"name": "Card-40G", "hbm_bandwidth_GBps": 1000.0, "peak_tflops": {"bf16": 200.0}, "memory_GiB": 40.0,
              "source": "a test"}  # fmt: skip
    fields["topology"] = {"gpu": inline}
    (point,) = load_serving_points(write_scenario(tmp_path, {"workload": poisson(5, 1.0)}, **fields))
    assert point.kv_capacity_tokens == int((0.9 * 40 * 2**30 - weights) // per_token)


@pytest.mark.parametrize(
    ("serving", "fields", "message"),
    [
        ({"methods": ["ppsd"]}, {}, "topology.stages: ppsd needs at least 2 stages"),
        ({"methods": ["beam"]}, {}, "serving.methods: expected ar, eesd or ppsd"),
        ({"max_batch": 0}, {}, "serving.max_batch: Input should be greater than or equal to 1"),
        ({"max_batch": 100_000}, {}, "serving.max_batch: Input should be less than or equal to 4096"),
        ({"kv_capacity_tokens": 20}, {}, "serving.kv_capacity_tokens: request 0 needs 29 KV tokens"),
        ({"slo": {"ttft_ms": -1}}, {}, "serving.slo.ttft_ms: Input should be greater than 0"),
        ({"batch": 3}, {}, "serving.batch: unknown key"),
        ({"rates_per_s": [1, -2]}, {}, "serving.rates_per_s: rates must be in"),
        ({"cases": [{"model": "SmolLM2-135M"}]}, {}, r"serving.cases\[0\].name: required"),
        ({"cases": [{"name": "a", "exit_layer": 99}]}, {}, "case a: exit_layer: expected 1 <= exit_layer < 30"),
        ({}, {"workload": {"requests": 2}}, "workload: not used by a serving scenario"),
        ({}, {"model": "GPT-9"}, "model: unknown model 'GPT-9'"),
        ({"max_batch": "4"}, {}, r"serving.max_batch: Input should be a valid integer \(got '4'\)"),
        ({"methods": ["ar", "ar"]}, {}, r"serving.methods: each method once, got \['ar', 'ar'\]"),
        ({"kv_capacity_tokens": -1}, {}, "serving.kv_capacity_tokens: expected auto, null .no limit. or a number"),
        ({"workload": {**poisson(5, 1.0), "requests": "5"}}, {}, "serving.workload.requests: Input should be a valid"),
    ],
)
def test_bad_serving_scenarios_refused_with_field(tmp_path, serving, fields, message):
    path = write_scenario(tmp_path, {"workload": poisson(5, 1.0), **serving}, **fields)
    with pytest.raises((ScenarioError, WorkloadError), match=message):
        load_serving_points(path)


def csv_scenario(tmp_path: Path, rows: list[str]) -> Path:
    """A serving scenario whose requests are the rows of a workload CSV (after its header)."""
    (tmp_path / "w.csv").write_text("\n".join(["arrival_s,prompt_len,output_len", *rows]) + "\n", encoding="utf-8")
    workload = {"arrival": {"process": "trace", "path": "w.csv"}, "prompt_len": {"dist": "trace"},
                "output_len": {"dist": "trace"}}  # fmt: skip
    return write_scenario(tmp_path, {"workload": workload})


def test_a_workload_csv_without_requests_or_with_a_request_too_long_is_named_by_line(tmp_path):
    """No rows after the header; a row whose prompt + output exceed the model's context (named by its CSV line, not
    by a batch scenario's workload.output_len); two rows that fit alone but whose longest prompt and longest output
    the serving cache cannot hold together."""
    with pytest.raises(WorkloadError, match=r"w.csv: no requests after the header \(line 1\)"):
        load_serving_points(csv_scenario(tmp_path, []))
    with pytest.raises(
        WorkloadError, match=r"w.csv: line 3: prompt_len 8000 \+ output_len 500 = 8,500 positions exceed"
    ):
        load_serving_points(csv_scenario(tmp_path, ["0,10,10", "0.5,8000,500"]))
    with pytest.raises(
        ScenarioError, match="serving.yaml: serving.workload: the serving cache's longest prompt_len 8000"
    ):
        load_serving_points(csv_scenario(tmp_path, ["0,8000,10", "0.5,10,500"]))
    with pytest.raises(WorkloadError, match=r"serving.workload.prompt_len, serving.workload.output_len: request 0"):
        load_serving_points(write_scenario(tmp_path, {"workload": poisson(2, 1.0, prompt=8000, output=500)}))


def test_serve_sim_refuses_outputs_jobs_and_plain_scenarios_before_running(tmp_path, capsys):
    from executor.cli import main

    path = write_scenario(tmp_path, {"workload": poisson(3, 1.0)})
    (tmp_path / "a_file").write_text("keep me\n")
    for args, message in (
        (["--json", str(tmp_path / "a_file" / "x.json")], f"--json {tmp_path / 'a_file' / 'x.json'}: "),
        (["--json", str(tmp_path)], f"--json {tmp_path}: is a folder; --json names the file to write"),
        (["--out", ""], "--out: expected a folder, got an empty path"),
        (["--jobs", "-5"], "--jobs must be >= 1, or 0 for one per CPU, got -5"),
    ):
        assert main(["serve-sim", str(path), "--no-progress", *args]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"eesd serve-sim: error: {message}") and captured.out == "", captured.err
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"name": "p", "model": "SmolLM2-135M", "method": "ar"}), encoding="utf-8")
    assert main(["serve-sim", str(plain)]) == 2
    assert f"(this one has none: run eesd simulate {plain})" in capsys.readouterr().err
    workload = tmp_path / "workload.yaml"
    workload.write_text(yaml.safe_dump(poisson(3, 1.0)), encoding="utf-8")
    assert main(["serve-sim", str(workload)]) == 2
    assert "(this one reads as a workload file: name it under serving.workload" in capsys.readouterr().err


def test_bad_inline_workload_named_under_serving(tmp_path):
    bad = {**poisson(5, 1.0), "output_len": {"dist": "uniform", "low": 5}}
    with pytest.raises(WorkloadError, match=r"serving.yaml: serving.workload.output_len.high: required field"):
        load_serving_points(write_scenario(tmp_path, {"workload": bad}))
    with pytest.raises(WorkloadError, match="serving.workload: file not found"):
        load_serving_points(write_scenario(tmp_path, {"workload": "none.yaml"}))
    spec = parse_spec(poisson(5, 1.0), "x")
    assert len(build_workload(spec, tmp_path, "x").requests) == 5


def test_serve_sim_cli_runs_without_torch(tmp_path):
    serving = {"workload": poisson(30, 50.0), "methods": ["ar", "eesd"], "rates_per_s": [5, 50], "slo": {"ttft_ms": 9}}
    path = write_scenario(tmp_path, serving)
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from executor.cli import main\n"
        f"sys.exit(main(['serve-sim', {str(path)!r}, '--out', {str(tmp_path / 'out')!r}, '--no-progress', "
        f"'--json', {str(tmp_path / 'runs.json')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "eesd" in done.stdout and (tmp_path / "out" / "serving.csv").is_file()
    document = json.loads((tmp_path / "runs.json").read_text())
    assert len(document["runs"]) == 4 and document["speculation"][0]["method"] == "eesd"
    assert [item["method"] for item in document["capacity"]] == ["ar", "eesd"] and "holds the SLO" in done.stdout
    bad = write_scenario(tmp_path, {"workload": poisson(3, 1.0), "methods": ["beam"]})
    done = subprocess.run([sys.executable, "-m", "executor.cli", "serve-sim", str(bad)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "expected ar, eesd or ppsd, got 'beam'" in done.stderr


def test_shipped_serving_scenarios_load():
    cpu = load_serving_points(ROOT / "scenarios" / "serving_cpu.yaml")
    loads = ("rate0.15", "rate0.4", "rate1.2")
    expected = {(c, m) for c in loads for m in ("ar", "eesd")} | {(f"{c}-ppsd", "ppsd") for c in loads}
    expected |= {(f"{c}-2replicas", m) for c in ("rate0.4", "rate1.2") for m in ("ar", "eesd")}
    expected |= {("rate0.4-ppsd-2replicas", "ppsd"), ("rate0.4-ppsd-batch4", "ppsd"), ("rate1.2-ppsd-batch4", "ppsd")}
    expected |= {("rate0.4-ppsd-cont4", "ppsd"), ("rate1.2-ppsd-cont4", "ppsd")}
    expected |= {("rate0.4-ppsd-dist4", "ppsd"), ("rate1.2-ppsd-dist4", "ppsd")}
    expected |= {("rate0.4-ppsd-dist-cont4", "ppsd"), ("rate1.2-ppsd-dist-cont4", "ppsd")}
    assert {(p.case, p.method) for p in cpu} == expected
    assert {p.replicas for p in cpu if p.case.endswith("2replicas")} == {2}
    backends = {p.case: p.plan.ppsd_backend for p in cpu if p.method == "ppsd"}
    assert backends == {case: "distributed" if "-dist" in case else "sequential" for case in backends}
    assert all(len(p.plan.stages) == 2 for p in cpu if p.method == "ppsd")
    assert all(p.kv_capacity_tokens is None and p.plan.cache_slots for p in cpu)
    ppsd = [p for p in cpu if p.method == "ppsd"]
    assert all(p.max_batch == (4 if p.case.endswith(("batch4", "cont4", "dist4")) else 1) for p in ppsd)
    assert all(p.ppsd_batching == ("continuous" if p.case.endswith("cont4") else "static") for p in ppsd)
    assert all([s.layer_end for s in p.plan.stages] == [15, 30] for p in ppsd)
    h100 = load_serving_points(ROOT / "scenarios" / "serving_h100.yaml")
    cases = {p.case: p for p in h100}
    ppsd_cases = [c for c in cases if "ppsd" in c]  # 7, 7, 6 and 6 rates, three methods each
    assert len(cases) == 9 and len(h100) == (4 * 8 + 10) * 2 + (7 + 7 + 6 + 6) * 3  # 8B: 10 rates
    assert cases["llama3-8b-alpha0.7-batch256"].max_batch == 256 and cases["smollm2-measured"].max_batch == 64
    assert {p.plan.exit_layer for p in h100 if p.case.startswith("smollm2-") and "ppsd" not in p.case} == {7, 15}
    assert {p.max_batch for p in h100 if p.method == "ppsd"} == {1}
    devices = {(p.case, p.method): (len(p.plan.stages), p.replicas, p.devices) for p in h100 if p.case in ppsd_cases}
    assert devices[("smollm2-ppsd-4gpus", "ppsd")] == (2, 2, 4) and devices[("smollm2-ppsd-4gpus", "ar")] == (1, 4, 4)
    for case in ppsd_cases:  # every method of a PPSD case on the same GPUs, AR and EESD as one-GPU replicas
        assert len({devices[(case, m)][2] for m in ("ar", "eesd", "ppsd")}) == 1
        assert devices[(case, "ar")][0] == devices[(case, "eesd")][0] == 1
    assert all(p.plan.cache_slots is None and p.kv_capacity_tokens > 100_000 for p in h100)  # paged: context only
    reads = load_serving_points(ROOT / "scenarios" / "serving_host_read_h100.yaml")  # host work per step, per method
    host_us = {(p.case, p.method): p.plan.stages[0].latency.time_us("overhead", "verify", 1, 256, 1) for p in reads}
    assert len(reads) == (7 + 2) * 2 * 2 and {
        us for (c, m), us in host_us.items() if m == "ar" and "-h100-" not in c
    } == {40}
    assert host_us[("e7-eesd-host300us", "eesd")] == 300 and host_us[("e15-eesd-host40us", "eesd")] == 40
    profiled = host_us[("e7-h100-profile", "ar")]  # the measured profile's rows, then AR's read set on its own
    assert profiled > 200 and host_us[("e7-h100-profile-ar-read40us", "eesd")] == profiled
    assert host_us[("e7-h100-profile-ar-read40us", "ar")] == 40
    fleet = load_serving_points(ROOT / "scenarios" / "serving_replicas_h100.yaml")
    assert {(p.case, p.replicas, p.devices) for p in fleet} == {(f"{n}-gpu{'s' * (n > 1)}", n, n) for n in range(1, 5)}
    assert all(p.rate_per_s % p.replicas == 0 and p.dispatch == "least_loaded" for p in fleet)


def trace_scenario(tmp_path: Path, workload: dict, **acceptance) -> Path:
    """EESD replaying the CPU trace of SmolLM2's shared head (1,492 tokens over 32 prompts at exit layer 15)."""
    trace = {"trace": str(ROOT / "calibration/cpu/acceptance_smollm2-135m_shared_builtin.csv"), **acceptance}
    return write_scenario(tmp_path, {"workload": workload}, method="eesd", acceptance=trace)


@pytest.mark.parametrize("method", ["eesd", "ppsd"])
def test_a_served_request_ends_at_its_replayed_eos(tmp_path, method):
    """Requests 8 and 16 replay the trace's chat-09 and chat-17, whose text ends at an EOS after 33 and 19 tokens: they
    leave then (KV reserved for all 40 until they do), where with `acceptance.at_eos: continue` they make all 40."""
    trace = str(ROOT / "calibration/cpu/acceptance_smollm2-135m_shared_builtin.csv")
    serving = {"workload": poisson(17, 0.5, output=40), "methods": [method]}
    topology = {"topology": {"stages": 2, "link": "ideal"}} if method == "ppsd" else {}
    lengths = {}
    for at_eos in ("stop", "continue"):
        fields = {"method": method, "acceptance": {"trace": trace, "at_eos": at_eos}, **topology}
        (point,) = load_serving_points(write_scenario(tmp_path, serving, **fields))
        result = simulate_serving(point)
        check_run(point, result)
        lengths[at_eos] = [record.tokens for record in result.records]
    assert lengths["stop"][8] == 33 and lengths["stop"][16] == 19 and lengths["stop"][0] == 40
    assert lengths["continue"] == [40] * 17


@pytest.mark.parametrize(
    ("requests", "output", "message"),
    [
        (20, 100, "the trace holds 1,492 tokens at exit_layer 15 \\(32 prompts\\); the workload replays 20 requests "
                  "of 2,000 output tokens in all \\(1,800 up to their EOS\\)"),
        (40, 10, "the trace holds 32 prompts at exit_layer 15; 40 requests replay some of them twice"),
    ],
)  # fmt: skip
def test_a_trace_shorter_than_the_whole_workload_is_refused(tmp_path, requests, output, message):
    """Every request of a serving workload replays the trace (each from its own prompt), so the trace must hold them
    all, not just the longest one; `acceptance.reuse: cycle` replays it cyclically instead."""
    workload = poisson(requests, 1.0, output=output)
    with pytest.raises(ScenarioError, match=f"acceptance.trace: .*: {message}: a replay would reuse its tokens"):
        load_serving_points(trace_scenario(tmp_path, workload))
    points = load_serving_points(trace_scenario(tmp_path, workload, reuse="cycle"))
    assert len(points) == 1 and len(points[0].workload.requests) == requests
    (fits,) = load_serving_points(trace_scenario(tmp_path, poisson(14, 1.0, output=100)))  # 1,400 tokens
    assert sum(r.output_len for r in fits.workload.requests) <= 1492


def test_kv_capacity_of_an_inline_gpu_costed_by_a_profile(tmp_path):
    """The KV budget comes from the memory of the GPU the plan's stage runs on: an inline GPU's datasheet, also where a
    latency profile names the device (the stage then carries the profile's device name, not the inline one)."""
    profile = ROOT / "calibration/h100/latency_smollm2-135m_cuda_bf16_compiled.csv"
    card = {"name": "H100 80GB", "hbm_bandwidth_GBps": 3000.0, "peak_tflops": {"bf16": 989.0}, "memory_GiB": 40.0,
            "source": "a test: an H100 with half its memory"}  # fmt: skip
    fields = {"latency": {"profile": {"path": str(profile)}}, "topology": {"gpu": card}}
    (point,) = load_serving_points(write_scenario(tmp_path, {"workload": poisson(5, 1.0)}, **fields))
    assert point.plan.stages[0].device != card["name"] and point.plan.stages[0].memory_GiB == 40.0
    model = point.plan.model
    weights = (30 * model.layer_params + model.lm_head_params) * 2
    assert point.kv_capacity_tokens == int((0.9 * 40 * 2**30 - weights) // (30 * model.kv_bytes_per_token(2)))


@dataclasses.dataclass(frozen=True)
class _PerQueryToken:
    """A layer costs LAYER_US per token of its query (so a prefill's time says which length it was costed at)."""

    cuda_graphs: bool = False
    extrapolated: bool = False

    def time_us(self, component: str, phase: str, q: int, context_len: int, batch: int) -> float:
        return LAYER_US * q if component == "layer" else 0.0


def test_each_prefill_is_costed_at_its_own_prompt_length(tmp_path):
    """Requests of different prompt lengths: each one's prefill (its first token's time after its start, arrivals
    far apart) costs its own q, not the first request's (a cache keyed by the pass's name alone once did that)."""
    from sim.serving import ServingSimulation

    lengths = [10, 40, 20, 10, 33]
    lines = ["arrival_s,prompt_len,output_len"] + [f"{10.0 * i},{q},2" for i, q in enumerate(lengths)]
    (tmp_path / "trace.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "w.yaml").write_text(
        "arrival: {process: trace, path: trace.csv}\nprompt_len: {dist: trace}\noutput_len: {dist: trace}\n"
    )
    (point,) = load_serving_points(write_scenario(tmp_path, {"workload": "w.yaml", "max_batch": 2}))
    stages = tuple(dataclasses.replace(stage, latency=_PerQueryToken()) for stage in point.plan.stages)
    plan = dataclasses.replace(point.plan, stages=stages)
    result = ServingSimulation(plan, point.workload, point.max_batch, None).run()
    prefill_us = [(r.first_token_s - r.start_s) * 1e6 for r in result.records]
    assert prefill_us == pytest.approx([30 * LAYER_US * q for q in lengths])


@dataclasses.dataclass(frozen=True)
class _Varying:
    """Latencies that change with every argument a pass is costed at (so a pass costed at the wrong q, context or
    batch costs something else)."""

    cuda_graphs: bool = False
    extrapolated: bool = False

    def time_us(self, component: str, phase: str, q: int, context_len: int, batch: int) -> float:
        weight = {"layer": 10.0, "lm_head": 31.0, "exit_head": 17.0, "overhead": 3.0, "embed": 1.0}[component]
        return weight * (1 + q + 0.01 * context_len + 0.37 * batch + 0.5 * (phase == "draft"))


@pytest.mark.parametrize(
    ("method", "policy", "attention"),
    [("ar", "fixed:3", "context"), ("eesd", "fixed:3", "context"), ("eesd", "beta-ts:max=5", "buckets"),
     ("eesd", "heuristic:2,max=6", "context")],
)  # fmt: skip
def test_every_prefill_and_round_is_logged_at_the_cost_it_was_charged(tmp_path, method, policy, attention):
    """The run's log (`ServingResult.passes`) holds each prefill and round once, in the order they ran, and costing a
    logged one again (`logged_us`, as the executor's logs are costed) gives the time the run charged for it."""
    from sim.policy import make_policy
    from sim.serving import ServingSimulation, logged_ratios

    workload = poisson(60, 40.0, prompt={"dist": "uniform", "low": 4, "high": 90}, seed=5)
    scenario = write_scenario(
        tmp_path, {"workload": workload, "methods": [method], "max_batch": 4}, policy=policy, attention=attention
    )
    (point,) = load_serving_points(scenario)
    stages = tuple(dataclasses.replace(stage, latency=_Varying()) for stage in point.plan.stages)
    point = dataclasses.replace(point, plan=dataclasses.replace(point.plan, stages=stages))
    result = ServingSimulation(point.plan, point.workload, point.max_batch, None).run()
    prefills = [log for log in result.passes if log.kind == "prefill"]
    rounds = [log for log in result.passes if log.kind == "round"]
    assert [log.tokens for log in prefills] == [r.prompt_len for r in point.workload.requests]
    assert sum(log.seconds for log in prefills) == pytest.approx(result.prefill_s, rel=1e-12)
    assert sum(log.seconds for log in rounds) == pytest.approx(result.decode_s, rel=1e-12)
    assert (len(rounds), sum(log.batch for log in rounds)) == (result.rounds, result.row_rounds)
    starts = [log.start_s for log in result.passes]
    assert starts == sorted(starts)
    ends = [log.start_s + log.seconds for log in result.passes]
    assert all(end <= start + 1e-12 for end, start in zip(ends, starts[1:], strict=False))  # one after another
    steps = {log.tokens for log in rounds}  # a round's draft steps: 0 for AR, several counts for EESD
    assert steps == {0} if method == "ar" else len(steps) > 1
    reads = make_policy(policy).needs_confidence
    fresh = ServingSimulation(point.plan, point.workload, point.max_batch, None)  # its pass costs not yet cached
    ratios = logged_ratios(fresh, result.passes, reads)
    assert ratios == pytest.approx([1.0] * len(result.passes), rel=1e-9)
    assert len({log.batch for log in rounds}) > 1


def test_scaled_latency_by_phase_and_batch():
    from sim.latency import ConstantLatency, ScaledLatency

    inner = ConstantLatency({"layer": 100.0})
    scaled = ScaledLatency(inner, decode={2: 1.5, 4: 0.5}, prefill=2.0, decode_default=1.25)
    assert scaled.time_us("layer", "prefill", 40, 0, 1) == 200.0
    assert [scaled.time_us("layer", "verify", 1, 64, b) for b in (1, 2, 3, 4)] == [125.0, 150.0, 125.0, 50.0]
    assert scaled.time_us("layer", "draft", 1, 64, 4) == 50.0
    assert scaled.time_us("lm_head", "verify", 1, 64, 2) == 0.0
    assert not scaled.cuda_graphs and not scaled.extrapolated


def test_recalibrating_a_scenario_profile_keeps_its_timing_or_takes_visits():
    """`benchmarks/sim_vs_executor.recalibrate_argv` (used by serving_cpu.py and sim_vs_executor.py --recalibrate)
    measures the scenario's profile again with its own grid and timing, or in N visits of 3 repeats when asked."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from sim_vs_executor import recalibrate_argv
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from sim.formats import read_latency_profile

    scenario = ROOT / "scenarios" / "serving_cpu.yaml"
    meta = read_latency_profile(ROOT / "calibration" / "cpu" / "serving" / "latency_smollm2-135m_cpu_fp32.csv").metadata
    argv = recalibrate_argv(scenario, threads=1)
    option = lambda args, name: args[args.index(name) + 1]  # noqa: E731
    assert argv[:2] == ["calibrate", "latency"] and option(argv, "--model") == meta["model"]
    assert option(argv, "--batch") == ",".join(str(b) for b in meta["grid"]["batch"])
    assert (option(argv, "--warmup"), option(argv, "--repeats")) == (str(meta["warmup"]), str(meta["repeats"]))
    assert option(argv, "--visits") == str(meta.get("visits", 1))
    visited = recalibrate_argv(scenario, threads=1, visits=3)
    assert [option(visited, name) for name in ("--warmup", "--repeats", "--visits")] == ["1", "3", "3"]
    assert option(visited, "--out") == str((ROOT / "calibration" / "cpu" / "serving").resolve())


# ---- replicas --------------------------------------------------------------------------------------------------------
def replica_point(tmp_path: Path, method: str, replicas: int, dispatch: str, workload: dict, **fields) -> ServingPoint:
    serving = {"workload": workload, "methods": [method], "max_batch": 3, "replicas": replicas, "dispatch": dispatch}
    if method == "ppsd":
        fields = {**PPSD_FIELDS, **fields}
    (point,) = load_serving_points(write_scenario(tmp_path, serving, **fields))
    return point


def alone(point: ServingPoint, requests: list) -> ServingResult:
    """`requests` served by one server of the point's plan (renumbered from 0, arrivals kept)."""
    renumbered = tuple(dataclasses.replace(r, index=i) for i, r in enumerate(requests))
    workload = dataclasses.replace(point.workload, requests=renumbered)
    return simulate_serving(dataclasses.replace(point, workload=workload, replicas=1))


@pytest.mark.parametrize(("method", "alpha"), [("ar", 0.6), ("eesd", 1.0), ("eesd", 0.0), ("ppsd", 1.0), ("ppsd", 0.0)])
def test_round_robin_replicas_are_independent_servers(tmp_path, method, alpha):
    """Round robin sends the i-th arrival to replica i mod N, and replicas share nothing: each replica's requests are
    served exactly as one server serves those requests alone (every time of every record, to the last bit)."""
    workload = {**poisson(90, 400.0, output=14), "prompt_len": {"dist": "uniform", "low": 4, "high": 40}}
    point = replica_point(tmp_path, method, 3, "round_robin", workload, acceptance={"alpha": alpha})
    result = simulate_serving(point)
    check_run(point, result)
    assert [r.replica for r in result.records] == [i % 3 for i in range(90)]
    assert metrics(result)["queue_mean_ms"] > 0  # the load makes requests wait: the replicas' queues are exercised
    times = ("arrival_s", "start_s", "first_token_s", "finish_s")
    for replica in range(3):
        mine = [r for r in result.records if r.replica == replica]
        single = alone(point, [point.workload.requests[r.index] for r in mine])
        rows = [[getattr(r, t) for t in times] for r in mine]
        assert rows == [[getattr(r, t) for t in times] for r in single.records]
    assert {log.replica for log in result.passes} == {0, 1, 2}


@pytest.mark.parametrize("dispatch", ["least_loaded", "least_tokens"])
@pytest.mark.parametrize("method", ["ar", "eesd", "ppsd"])
def test_load_aware_dispatch_picks_the_least_loaded_replica(tmp_path, method, dispatch):
    """Each arrival goes to the replica with the fewest requests dispatched and not finished (`least_loaded`) or the
    fewest KV tokens of them (`least_tokens`), the lowest index among equals, recomputed from the records; lengths
    vary, so round robin would not do the same, nor would the two policies do the same as each other."""
    workload = {"requests": 200, "seed": 4, "arrival": {"process": "poisson", "rate_per_s": 300.0},
                "prompt_len": {"dist": "uniform", "low": 4, "high": 64},
                "output_len": {"dist": "lognormal", "median": 12, "sigma": 0.9, "max": 80}}  # fmt: skip
    point = replica_point(tmp_path, method, 3, dispatch, workload)
    result = simulate_serving(point)
    check_run(point, result)
    records, tokens = result.records, plan_kv_tokens(point.plan)
    weight = (lambda r: 1) if dispatch == "least_loaded" else (lambda r: tokens(point.workload.requests[r.index]))
    for record in records:
        load = [0, 0, 0]
        for other in records:
            if other.index < record.index and other.finish_s > record.arrival_s:
                load[other.replica] += weight(other)
        assert record.replica == load.index(min(load)), (record.index, load)
    assert [r.replica for r in records] != [i % 3 for i in range(len(records))]
    other = "least_tokens" if dispatch == "least_loaded" else "least_loaded"
    elsewhere = simulate_serving(dataclasses.replace(point, dispatch=other)).records
    assert [r.replica for r in records] != [r.replica for r in elsewhere]


def test_replicas_multiply_saturated_throughput_and_ease_the_queue(tmp_path):
    """Closed-loop users who always keep every replica full: two replicas produce twice one's tokens/s (the same
    passes, side by side); at an open rate one replica cannot keep up with, two cut the mean wait."""
    closed = {"requests": 400, "seed": 1, "arrival": {"process": "closed", "users": 12, "think_s": 0.0},
              "prompt_len": 16, "output_len": 12}  # fmt: skip
    one, two = (simulate_serving(replica_point(tmp_path, "ar", n, "least_loaded", closed)) for n in (1, 2))
    assert metrics(two)["tokens_per_s"] == pytest.approx(2 * metrics(one)["tokens_per_s"], rel=0.02)
    assert metrics(two)["busy_pct"] == pytest.approx(100.0, abs=1.0)
    open_load = poisson(400, 1.4 * metrics(one)["requests_per_s"])  # one replica overloaded, two at 70%
    waits = [metrics(simulate_serving(replica_point(tmp_path, "ar", n, "least_loaded", open_load)))["queue_mean_ms"]
             for n in (1, 2)]  # fmt: skip
    assert waits[1] < waits[0] / 4


def test_by_method_gives_each_method_its_own_devices(tmp_path):
    """`serving.by_method` sets fields for one method: AR as two one-GPU replicas beside PPSD pipelined over two
    GPUs, on the same requests; `serving.csv` names each point's stages, replicas and devices."""
    import csv

    serving = {"workload": poisson(60, 20.0), "methods": ["ar", "ppsd"], "rates_per_s": [5, 50],
               "by_method": {"ar": {"topology.stages": 1, "serving.replicas": 2}}}  # fmt: skip
    path = write_scenario(tmp_path, serving, topology={"gpu": "H100", "stages": 2})
    points = load_serving_points(path)
    assert [(p.method, len(p.plan.stages), p.replicas, p.devices) for p in points[:2]] == [
        ("ar", 1, 2, 2), ("ppsd", 2, 1, 2)
    ]  # fmt: skip
    assert points[0].workload.requests == points[1].workload.requests
    runs = run_serving(points, progress=False)
    for run in runs:
        check_run(run.point, run.result)
    write_outputs(runs, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "serving.csv").open()))
    assert {(r["method"], r["stages"], r["replicas"], r["devices"]) for r in rows} == {
        ("ar", "1", "2", "2"), ("ppsd", "2", "1", "2")
    }  # fmt: skip


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        ({"replicas": 0}, "serving.replicas: Input should be greater than or equal to 1"),
        ({"dispatch": "random"}, "serving.dispatch: Input should be 'least_loaded', 'least_tokens' or 'round_robin'"),
        ({"by_method": {"eesd": {"serving.replicas": 2}}}, r"serving.by_method: eesd: not among the case's methods"),
        ({"by_method": {"ar": {"serving.workload": "x.yaml"}}}, r"serving.by_method.ar.serving.workload: not set per"),
        ({"by_method": {"ar": {"serving.rates_per_s": [1]}}}, r"serving.by_method.ar.serving.rates_per_s: not set"),
        ({"by_method": {"ar": {"method": "eesd"}}}, r"serving.by_method.ar.method: not set per method"),
        (
            {"by_method": {"ar": {"serving.replicas": 0}}},
            r"serving.by_method.ar: serving.replicas: Input should be greater than or equal to 1",
        ),
        ({"by_method": {"ar": {"exit_layer": 99}}}, r"exit_layer: expected 1 <= exit_layer < 30"),
        (
            {"methods": ["ar", "eesd"], "by_method": {"eesd": {"policy": "fixed:0"}}},
            r"\(method eesd, with serving.by_method.eesd\).*policy",
        ),
        (
            {
                "methods": ["ar", "ppsd"],
                "by_method": {"ppsd": {"serving.max_batch": 4, "topology.stages": 2, "ppsd_backend": "free"}},
            },
            r"serving.by_method.ppsd.serving.max_batch: ppsd_backend 'free' serves one request at a time .*got 4",
        ),
        (
            {"methods": ["ar", "ppsd"], "by_method": {"ppsd": {"serving.max_batch": 0, "topology.stages": 2}}},
            r"serving.by_method.ppsd: serving.max_batch: Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_replicas_and_by_method_refused_with_field(tmp_path, serving, message):
    path = write_scenario(tmp_path, {"workload": poisson(5, 1.0), **serving})
    with pytest.raises(ScenarioError, match=message):
        load_serving_points(path)


@pytest.mark.parametrize("head", ["trained", "shared"])
def test_a_trained_heads_layer_is_costed_where_it_runs(tmp_path, head):
    """A trained head's own layer runs over the prompt in an EESD or PPSD prefill (its KV filled) and in EESD's AR
    steps (kept in step), never in AR, which runs no head: with every layer costing LAYER_US and nothing else, the
    prefills and steps differ by exactly that layer, in the serving simulator and the engine alike."""
    from sim.engine import Simulation
    from sim.serving import ServingSimulation

    serving = {"workload": poisson(4, 1.0, prompt=20), "methods": ["ar", "eesd", "ppsd"]}
    path = write_scenario(tmp_path, serving, exit_head=head, topology={"stages": 2})
    ar, eesd, ppsd = load_serving_points(path)
    sims = {p.method: ServingSimulation(p.plan, p.workload, p.max_batch, None) for p in (ar, eesd, ppsd)}
    extra = LAYER_US if head == "trained" else 0.0
    prefill, step = sims["ar"].prefill_us(20), sims["ar"].round_us(1, 0, 40, 45)  # 30 layers and the token's way back
    assert prefill == pytest.approx(30 * LAYER_US, abs=20) and step == pytest.approx(30 * LAYER_US, abs=20)
    assert sims["eesd"].prefill_us(20) - prefill == sims["ppsd"].prefill_us(20) - prefill == pytest.approx(extra)
    assert sims["eesd"].round_us(1, 0, 40, 45) - step == pytest.approx(extra)
    static = {p.method: Simulation(p.plan).run() for p in (ar, eesd)}  # the engine's one prefill pass of the batch
    assert static["eesd"].prefill_time_us - static["ar"].prefill_time_us == pytest.approx(extra)


def test_a_run_that_serves_less_than_it_is_offered_is_saturated_and_noted(tmp_path, capsys) -> None:
    """Served below 90% of the offered rate, a run's backlog, and so its latency, grows by over 1/0.9 - 1 s per
    second of arrivals: its latencies depend on its length. Arrivals 1/s for 10 s, each done half a second later: a
    last one done at 10 s or 11.4 s (a long last decode, not a backlog) is not saturated, at 20 s it is; serve-sim
    says which case and method from which rate."""
    from sim.serving import RequestRecord, ServingResult, metrics

    def run(last_finish: float) -> dict:
        records = [RequestRecord(i, 8, 4, float(i), float(i), i + 0.1, float(i) + 0.5, 4) for i in range(10)]
        records[-1].finish_s = last_finish
        return metrics(ServingResult("ar", 1, records, time_s=last_finish, decode_s=1.0, batch_time_s=1.0))

    assert run(10.0)["offered_rps"] == pytest.approx(1.0) and not run(10.0)["saturated"]
    assert run(20.0)["saturated"] and run(20.0)["requests_per_s"] == pytest.approx(0.5)
    long_tail = [RequestRecord(i, 8, 4, float(i), float(i), i + 0.1, float(i) + 0.5, 4) for i in range(10)]
    long_tail[-1].finish_s = 11.4  # a long last decode after a run that kept up
    assert not metrics(ServingResult("ar", 1, long_tail, time_s=11.4, decode_s=1.0, batch_time_s=1.0))["saturated"]
    from executor.cli import main as cli

    scenario = Path(__file__).resolve().parents[1] / "scenarios" / "serving_cpu.yaml"
    assert cli(["serve-sim", str(scenario), "--out", str(tmp_path), "--no-progress", "--jobs", "1"]) == 0
    rows = list(csv.DictReader((tmp_path / "serving.csv").read_text().splitlines()))
    saturated = {(r["case"], r["method"]) for r in rows if r["saturated"] == "True"}
    printed = capsys.readouterr().out.splitlines()
    (note,) = [line for line in printed if line.startswith("note: saturated")]
    assert "note: no serving.rates_per_s sweep, so no speculation.csv or capacity.csv" in "\n".join(printed)
    assert saturated and all(f"case {case}: {method} (offered " in note for case, method in saturated)
    assert ("rate0.15", "ar") not in saturated  # a light load is served as offered


def test_serve_sim_clears_an_earlier_runs_outputs_from_a_reused_folder(tmp_path, capsys):
    """A reused --out holds one run's results: a rate sweep's crossings and plots go when a run without one follows;
    files of other names stay."""
    from executor.cli import main

    swept = write_scenario(tmp_path, {"workload": poisson(6, 50.0), "methods": ["ar", "eesd"], "rates_per_s": [5, 50]})
    out = tmp_path / "out"
    assert main(["serve-sim", str(swept), "--out", str(out), "--no-progress"]) == 0
    assert (out / "speculation.csv").is_file()
    (out / "mine.txt").write_text("keep me\n")
    capsys.readouterr()
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["serve-sim", str(write_scenario(plain, {"workload": poisson(6, 50.0)})), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"removed {out / 'speculation.csv'} (the last run's here, not written by this one)" in printed
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["mine.txt", "serving.csv"]


def test_goodput_is_shown_only_with_an_slo(tmp_path):
    """Without an SLO every request counts and goodput is the requests/s: the table leaves it out."""
    from sim.serving_report import run_serving, summary_table

    plain = run_serving(load_serving_points(write_scenario(tmp_path, {"workload": poisson(4, 5.0)})), progress=False)
    assert "goodput" not in summary_table(plain) and "req/s" in summary_table(plain)
    bounded = {"workload": poisson(4, 5.0), "slo": {"ttft_ms": 100}}
    runs = run_serving(load_serving_points(write_scenario(tmp_path, bounded)), progress=False)
    assert "goodput/s" in summary_table(runs)


def test_rates_run_in_increasing_order_and_a_repeated_rate_is_refused(tmp_path):
    points = load_serving_points(write_scenario(tmp_path, {"workload": poisson(3, 1.0), "rates_per_s": [8, 1, 4]}))
    assert [p.rate_per_s for p in points] == [1, 4, 8]
    with pytest.raises(ScenarioError, match="serving.rates_per_s: each rate once: 4 given more than once"):
        load_serving_points(write_scenario(tmp_path, {"workload": poisson(3, 1.0), "rates_per_s": [4, 1, 4]}))


def test_refine_bisects_each_crossing_as_a_sweep_of_those_rates_would(tmp_path, capsys):
    """`serve-sim --refine N` halves, N times, each bracket of swept rates around a crossing (here where each
    method's SLO stops holding): every run it adds is the run a scenario sweeping that rate makes, so its output is
    that of the finer sweep, and the bracket around each crossing is 2^N times narrower."""
    from executor.cli import main

    serving = {"workload": poisson(60, 50.0), "methods": ["ar", "eesd"], "rates_per_s": [5, 40, 160, 640],
               "slo": {"ttft_ms": 30}}  # fmt: skip
    path = write_scenario(tmp_path, serving, acceptance={"alpha": 0.9}, exit_layer=8)
    assert main(["serve-sim", str(path), "--out", str(tmp_path / "out"), "--no-progress", "--refine", "3",
                 "--json", str(tmp_path / "refined.json")]) == 0  # fmt: skip
    assert "--refine 3: 6 more run(s)" in capsys.readouterr().out
    refined = json.loads((tmp_path / "refined.json").read_text())
    assert refined["metadata"]["refine"] == 3
    rates = sorted({run["rate_per_s"] for run in refined["runs"]})
    # both SLOs fail first at 160: AR's bracket (40, 160) halves to (40, 100), (70, 100), (85, 100); EESD's, which
    # holds at 100 and 130, to (100, 160), (130, 160), (130, 145): 15 requests/s wide, 120 / 2^3
    by_method = {m: sorted(r["rate_per_s"] for r in refined["runs"] if r["method"] == m) for m in ("ar", "eesd")}
    assert by_method == {"ar": [5, 40, 70, 85, 100, 160, 640], "eesd": [5, 40, 100, 130, 145, 160, 640]}
    (tmp_path / "fine").mkdir()
    fine = write_scenario(tmp_path / "fine", {**serving, "rates_per_s": rates}, acceptance={"alpha": 0.9},
                          exit_layer=8)  # fmt: skip
    swept = capacity(run_serving(load_serving_points(fine), progress=False))
    assert [item["capacity_rps"] for item in refined["capacity"]] == [item["capacity_rps"] for item in swept]
    assert 85 < refined["capacity"][0]["capacity_rps"] < 100 and 130 < refined["capacity"][1]["capacity_rps"] < 145
    assert main(["serve-sim", str(path), "--refine", "-1"]) == 2
    assert "--refine must be a number of bisection rounds >= 0, got -1" in capsys.readouterr().err


def test_refined_rates_run_the_scenario_as_the_sweep_read_it(tmp_path):
    """`--refine` hands every round the scenario's data as read for the sweep: a file changed or gone since then
    does not change which runs it makes."""
    from sim.serving import points_at_rates, read_serving

    path = write_scenario(tmp_path, {"workload": poisson(6, 5.0), "methods": ["ar", "eesd"], "rates_per_s": [1, 4]})
    raw = read_serving(path)
    path.unlink()
    points = points_at_rates(path, "", ["eesd"], [2.5], raw)
    assert [(p.method, p.rate_per_s) for p in points] == [("eesd", 2.5)]
    with pytest.raises(FileNotFoundError, match="serving scenario not found"):
        points_at_rates(path, "", ["eesd"], [2.5])


def test_refine_brackets_where_speculation_stops_paying():
    """Where a method's mean latency over AR's crosses 1 between two swept rates, both are run at the middle rate;
    a method that pays at every rate, or never, and AR itself, ask for nothing (no SLO here)."""
    from types import SimpleNamespace

    from sim.serving import SLO
    from sim.serving_report import refinements

    def run(method: str, rate: float, latency: float):
        point = SimpleNamespace(case="c", method=method, rate_per_s=rate, slo=SLO())
        return SimpleNamespace(point=point, metrics={"latency_mean_ms": latency, "slo_pct": 100.0})

    ar = [run("ar", r, 10.0) for r in (1, 2, 4, 8)]
    eesd = [run("eesd", r, x) for r, x in ((1, 6.0), (2, 8.0), (4, 12.0), (8, 30.0))]  # crosses between 2 and 4
    ppsd = [run("ppsd", r, 5.0) for r in (1, 2, 4, 8)]  # pays at every rate
    assert refinements(ar + eesd + ppsd) == {"c": {3.0: {"ar", "eesd"}}}
    assert refinements(ar + ppsd) == {}
