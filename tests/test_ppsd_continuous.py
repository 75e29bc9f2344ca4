"""Continuous PPSD batching (`ppsd_batching: continuous`): requests join a running lockstep batch at a host read,
the pipe restarting from every row's last token. In the executor every request's tokens are those it gets alone with
AR; the simulator stops its lockstep decodes at the same reads, so on a workload whose schedule does not hang on
the passes' speed both log the same stretches, and costing a logged stretch again gives the time it was charged."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from test_serving_executor import alone, serving_cases
from test_serving_sim import PPSD_FIELDS, check_run, poisson, write_scenario
from tiny_models import TinySpec, scale_late_layers, tiny_model

import executor.serving as serving_module
from executor.cli import main as eesd
from executor.sampling import SamplingConfig
from executor.serving import serve
from sim.engine import BatchRow, LockstepDecode, decode_rows
from sim.policy import make_policy
from sim.scenario import ScenarioError
from sim.serving import ServingSimulation, VerdictStream, load_serving_points, logged_ratios, simulate_serving
from sim.workload import Request, ServingWorkload


def check_stretches(result, max_batch: int) -> None:
    """The books of a continuous PPSD run: no stretch wider than max_batch, ticks as rounds, verdicts counted."""
    decodes = [log for log in result.passes if log.kind == "ppsd"]
    assert all(1 <= log.batch <= max_batch for log in decodes)
    assert result.rounds == sum(log.tokens for log in decodes)
    assert result.drafted == sum(len(log.verdicts) for log in decodes)
    assert result.accepted == sum(sum(log.verdicts) for log in decodes)
    assert all(len(log.verdicts) == log.furthest - log.context + 1 for log in decodes if log.stopped)


@settings(max_examples=12)
@given(
    case=serving_cases(),
    stages=st.integers(2, 4),
    sample=st.booleans(),
    max_batch=st.integers(1, 4),
    sync_every=st.integers(1, 5),
    join_min=st.integers(1, 3),
)
def test_ppsd_served_in_continuous_batches_equals_ar_alone(case, stages, sample, max_batch, sync_every, join_min):
    """Rows join a running batch at host reads (their KV prefilled into the rows after those going on, which move
    up, and the pipe restarted from every row's last token), leave at their own lengths or EOS, for any number of
    ticks between reads, 1-3 requests at least to a join: every request's tokens are AR's alone, greedy and with
    exact sampling."""
    model, _, workload, prompts, eos = case
    stages = min(stages, model.config.num_hidden_layers)
    sampling = dict(do_sample=True, temperature=0.9, top_k=0, seed=3) if sample else {}
    config = SamplingConfig(**sampling) if sample else None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serving_module, "resolve_sync_every", lambda given, capture: sync_every)
        outcome = serve(model, workload, prompts, method="ppsd", stages=stages, eos_token_id=eos, sampling=config,
                        max_batch=max_batch, ppsd_batching="continuous", ppsd_join_min=join_min)  # fmt: skip
    check_served(outcome, model, workload, prompts, eos, sampling, max_batch)


def check_served(outcome, model, workload, prompts, eos, sampling: dict, max_batch: int) -> None:
    """A continuous PPSD run: every request's tokens AR's alone, every token counted once, each request's times in
    order, the stretches' books (`check_stretches`)."""
    for request, prompt, output in zip(workload.requests, prompts, outcome.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len, eos, **sampling), request
    result = outcome.result
    assert result.tokens == sum(len(o) for o in outcome.outputs) == sum(r.tokens for r in result.records)
    for record in result.records:
        assert record.arrival_s <= record.start_s < record.first_token_s <= record.finish_s <= result.time_s
    check_stretches(result, max_batch)


# (prompt, output) per request; the one-token requests are done at their prefill (the first batch's and a join's)
LENGTHS = [(5, 9), (12, 1), (11, 3), (2, 14), (7, 6), (9, 2), (6, 1), (4, 12), (13, 5), (3, 7)]


def tiny_scenario(tmp_path, bounds: list[int], lengths=LENGTHS, **serving) -> dict:
    trace = "arrival_s,prompt_len,output_len\n" + "".join(f"0.0,{p},{o}\n" for p, o in lengths)
    (tmp_path / "trace.csv").write_text(trace, encoding="utf-8")
    workload = {"arrival": {"process": "trace", "path": "trace.csv"}, "prompt_len": {"dist": "trace"},
                "output_len": {"dist": "trace"}}  # fmt: skip
    layers = [b - a for a, b in zip([0, *bounds], [*bounds, 6], strict=True)]
    return {"name": "joins", "model": {"name": "tiny", "num_layers": 6, "hidden_size": 64, "intermediate_size": 128,
            "num_heads": 4, "num_kv_heads": 2, "vocab_size": 60}, "method": "ppsd", "ppsd_backend": "sequential",
            "exit_layer": bounds[0], "attention": "context", "topology": {"stages": [{"layers": n} for n in layers]},
            "latency": {"constant_us": {"layer": 100.0}}, "acceptance": {"alpha": 0.5},
            "serving": {"workload": workload, "ppsd_batching": "continuous", **serving}}  # fmt: skip


@pytest.mark.parametrize(
    ("stages", "bounds", "sync_every", "late", "join_min"),
    [(2, [3], 1, 0.3, 1), (3, [2, 4], 1, 0.3, 1), (3, [2, 4], 4, 0.0, 1), (2, [3], 1, 0.3, 3)],
)
def test_the_executor_and_the_simulator_join_at_the_same_reads(tmp_path, stages, bounds, sync_every, late, join_min):
    """Every request there at time 0, no EOS, 3 slots: in lockstep every row going on emits one token a tick with
    the others, so which row ends first, and at which read a request joins, does not hang on acceptance or speed. The
    executor and the simulator log the same prefills (the first batch, then each join's) and stretches (rows,
    context, furthest position, tokens asked, stopped or not; a request its prefill ended runs in none), reading
    every tick or every 4 (as a captured pipe reads every 8; then how many tokens a block emits hangs on its
    flushes, so the layers past the exit are silenced and both sides draft right every time), and the simulator,
    given a logged stretch's verdicts, runs it to the same ticks: to its read where it stopped, to its end where it
    did not."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=6, vocab=60, seed=4)), bounds[0], late)
    requests = tuple(Request(i, p, o, 0.0) for i, (p, o) in enumerate(LENGTHS))
    prompts = [[1 + (3 * i + j) % 50 for j in range(p)] for i, (p, _) in enumerate(LENGTHS)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serving_module, "resolve_sync_every", lambda given, capture: sync_every)
        served = serve(model, ServingWorkload(requests), prompts, method="ppsd", stages=stages,
                       stage_boundaries=bounds, max_batch=3, ppsd_batching="continuous",
                       ppsd_join_min=join_min)  # fmt: skip
    for request, prompt, output in zip(requests, prompts, served.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len, None)
    scenario = tiny_scenario(tmp_path, bounds)
    scenario["acceptance"] = {"alpha": 1.0 if late == 0.0 else 0.5}
    scenario["serving"]["ppsd_join_min"] = join_min
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario), encoding="utf-8")
    (point,) = load_serving_points(tmp_path / "s.yaml")
    assert (point.ppsd_batching, point.ppsd_join_min) == ("continuous", join_min)
    plan = dataclasses.replace(point.plan, sync_every=sync_every)
    simulation = ServingSimulation(plan, point.workload, 3, None, ppsd_batching="continuous", ppsd_join_min=join_min)
    simulation.ppsd_plan = plan  # read as the executor was made to read
    simulated = simulation.run()
    shape = lambda logs: [(g.kind, g.batch, g.context, g.furthest, g.asked, g.stopped, g.rows) for g in logs]  # noqa: E731
    assert shape(served.result.passes) == shape(simulated.passes)
    for result in (served.result, simulated):
        check_stretches(result, 3)
        assert sum(log.stopped for log in result.passes) >= (3 if join_min == 1 else 1)  # requests joined mid-decode
        assert [r.index for r in sorted(result.records, key=lambda r: (r.start_s, r.index))] == list(range(10))
    for log in served.result.passes:
        if log.kind != "ppsd":
            continue
        if not log.stopped:
            output = log.furthest - log.context + 2
            rows = [BatchRow(VerdictStream(log.verdicts), make_policy("fixed:1"), output) for _ in range(log.batch)]
            assert decode_rows(plan, log.context, rows)[0].ticks == log.tokens, log
            continue
        rows = [BatchRow(VerdictStream(log.verdicts), make_policy("fixed:1"), log.asked) for _ in range(log.batch)]
        decode = LockstepDecode(plan, log.context, rows)
        while decode.advance() and decode.emitted < log.furthest - log.context + 1:
            pass
        assert (decode.emitted, decode.ticks) == (log.furthest - log.context + 1, log.tokens), log


@pytest.mark.parametrize(("backend", "graphs"), [("distributed", False), ("sequential", False), ("sequential", True)])
def test_continuous_ppsd_batches_complete_every_request_and_cost_as_logged(tmp_path, backend, graphs):
    """Under a queue, continuous PPSD batching lets requests join running batches: every request completes once,
    Little's law holds, batches stay within max_batch, requests join mid-decode (stopped stretches), a stretch's
    rows keep their slot order (those going on first), and costing each logged prefill and stretch again gives the
    time the run charged. It serves the same requests as static batches."""
    rate = 20_000.0 if graphs else 60.0
    workload = {"requests": 80, "seed": 3, "arrival": {"process": "poisson", "rate_per_s": rate},
                "prompt_len": {"dist": "uniform", "low": 4, "high": 64},
                "output_len": {"dist": "lognormal", "median": 20, "sigma": 0.7, "max": 120}}  # fmt: skip
    serving = {"methods": ["ppsd"], "workload": workload, "ppsd_batching": "continuous",
               "by_method": {"ppsd": {"serving.max_batch": 4}}}  # fmt: skip
    device = {"latency": {"roofline": {}}, "topology": {"stages": 2, "gpu": "H100"}} if graphs else PPSD_FIELDS
    (point,) = load_serving_points(write_scenario(tmp_path, serving, ppsd_backend=backend, **device))
    assert (point.max_batch, point.ppsd_batching) == (4, "continuous")
    result = simulate_serving(point)
    row = check_run(point, result)
    assert 1 < row["mean_batch"] <= 4
    check_stretches(result, 4)
    assert any(log.stopped for log in result.passes)
    fresh = ServingSimulation(point.plan, point.workload, 4, None, ppsd_batching="continuous")
    assert logged_ratios(fresh, result.passes) == pytest.approx([1.0] * len(result.passes), rel=1e-9)
    static = ServingSimulation(point.plan, point.workload, 4, None).run()
    assert [r.tokens for r in static.records] == [r.tokens for r in result.records]
    assert all(math.isfinite(r.finish_s) for r in result.records)


def test_continuous_ppsd_batching_is_checked_where_it_is_given(tmp_path, capsys) -> None:
    """`serving.ppsd_batching` takes static or continuous, and the free-running pipe (no host reads to join at)
    only static; `serve` and `eesd serve-bench --ppsd-batching` refuse other values, the CLI before loading."""
    serving = {"workload": poisson(5, 1.0), "ppsd_batching": "sometimes"}
    with pytest.raises(ScenarioError, match="ppsd_batching"):
        load_serving_points(write_scenario(tmp_path, {"methods": ["ppsd"], **serving}, **PPSD_FIELDS))
    serving = {"workload": poisson(5, 1.0), "ppsd_batching": "continuous"}
    with pytest.raises(ScenarioError, match="serving.ppsd_batching: ppsd_backend 'free'"):
        load_serving_points(write_scenario(tmp_path, {"methods": ["ppsd"], **serving}, ppsd_backend="free",
                                           **PPSD_FIELDS))  # fmt: skip
    model = tiny_model(TinySpec(num_layers=2, vocab=40, seed=1))
    workload = ServingWorkload((Request(0, 3, 4, 0.0),))
    with pytest.raises(ValueError, match="ppsd_batching must be one of static, continuous"):
        serve(model, workload, [[1, 2, 3]], method="ppsd", ppsd_batching="rolling")
    with pytest.raises(ValueError, match="ppsd_join_min must be an integer >= 1, got 0"):
        serve(model, workload, [[1, 2, 3]], method="ppsd", ppsd_batching="continuous", ppsd_join_min=0)
    serving = {"workload": poisson(5, 1.0), "ppsd_join_min": 2}
    with pytest.raises(ScenarioError, match="serving.ppsd_join_min: continuous batching's"):
        load_serving_points(write_scenario(tmp_path, {"methods": ["ppsd"], **serving}, **PPSD_FIELDS))
    with pytest.raises(SystemExit) as exit_:
        eesd(["serve-bench", "--model", "nowhere", "--workload", "w.yaml", "--methods", "ppsd",
              "--ppsd-batching", "rolling"])  # fmt: skip
    assert exit_.value.code == 2 and "--ppsd-batching: invalid choice" in capsys.readouterr().err
    code = eesd(["serve-bench", "--model", "nowhere", "--workload", "w.yaml", "--methods", "ar",
                 "--ppsd-batching", "continuous"])  # fmt: skip
    assert code != 0 and "--ppsd-batching" in capsys.readouterr().err
    code = eesd(["serve-bench", "--model", "nowhere", "--workload", "w.yaml", "--methods", "ppsd",
                 "--ppsd-join-min", "2"])  # fmt: skip
    assert code != 0 and "--ppsd-join-min is continuous batching's" in capsys.readouterr().err


def test_a_stretch_stopped_before_a_rows_eos_is_costed_as_charged(tmp_path) -> None:
    """A trace replay whose request ends at its EOS after a join cut its stretch: the simulator's pipe feeds drafts
    for the tokens asked, as the executor's does (it learns of the EOS only when it reads it), so the stretch's
    charged time does not hang on an EOS after the read, and costing it again from its log gives that time."""
    from test_sim_eos import hand_trace  # trace a: EOS after 5 tokens

    (tmp_path / "w.csv").write_text("arrival_s,prompt_len,output_len\n0.0,16,9\n0.01225,16,9\n", encoding="utf-8")
    workload = {"arrival": {"process": "trace", "path": str(tmp_path / "w.csv")}, "prompt_len": {"dist": "trace"},
                "output_len": {"dist": "trace"}}  # fmt: skip
    serving = {"methods": ["ppsd"], "workload": workload, "ppsd_batching": "continuous",
               "by_method": {"ppsd": {"serving.max_batch": 2}}}  # fmt: skip
    fields = {"topology": {"stages": 3}, "ppsd_backend": "sequential", "exit_layer": 4,
              "acceptance": {"trace": str(hand_trace(tmp_path)), "reuse": "cycle"}}  # fmt: skip
    (point,) = load_serving_points(write_scenario(tmp_path, serving, **fields))
    result = simulate_serving(point)
    assert [log.stopped for log in result.passes if log.kind == "ppsd"] == [True, False]
    fresh = ServingSimulation(point.plan, point.workload, 2, None, ppsd_batching="continuous")
    assert logged_ratios(fresh, result.passes) == pytest.approx([1.0] * len(result.passes), rel=1e-9)


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_batches_whose_rows_ask_and_end_apart_are_costed_as_charged(tmp_path, batching) -> None:
    """Rows asking different numbers of tokens, some ending at their EOS (a trace replay), captured (the host reads
    every 8 ticks): a row the host has read to its end shortens the blocks of reads for the others, so each logged
    decode carries its rows' tokens made and asked (`PassLog.rows`), and costing it again gives what was charged."""
    from test_sim_eos import hand_trace

    workload = {"requests": 40, "seed": 5, "arrival": {"process": "poisson", "rate_per_s": 20000.0},
                "prompt_len": {"dist": "uniform", "low": 1, "high": 64},
                "output_len": {"dist": "uniform", "low": 1, "high": 30}}  # fmt: skip
    serving = {"methods": ["ppsd"], "workload": workload, "ppsd_batching": batching,
               "by_method": {"ppsd": {"serving.max_batch": 3}}}  # fmt: skip
    fields = {
        "latency": {"roofline": {}},
        "topology": {"stages": 2, "gpu": "H100"},
        "exit_layer": 4,
        "ppsd_backend": "sequential",
        "acceptance": {"trace": str(hand_trace(tmp_path)), "reuse": "cycle"},
    }
    (point,) = load_serving_points(write_scenario(tmp_path, serving, **fields))
    result = ServingSimulation(point.plan, point.workload, 3, None, ppsd_batching=batching).run()
    decodes = [log for log in result.passes if log.kind == "ppsd"]
    assert any(len({wanted for _, wanted in log.rows}) > 1 for log in decodes)  # rows asking apart
    assert any(made < wanted for log in decodes for made, wanted in log.rows if made > 1)  # an EOS
    fresh = ServingSimulation(point.plan, point.workload, 3, None, ppsd_batching=batching)
    assert logged_ratios(fresh, result.passes) == pytest.approx([1.0] * len(result.passes), rel=1e-9)


def test_a_closed_loops_continuous_batches_are_the_simulators(tmp_path) -> None:
    """Two users, no think time, batches of up to 2 with rows of different lengths, continuous: a row's request leaves
    when the host reads its end and its user's next request, sent then, joins the row going on at that very read,
    in the executor as in the simulator: the same passes, and every request's tokens AR's alone."""
    (tmp_path / "t.csv").write_text("arrival_s,prompt_len,output_len\n0.0,3,3\n", encoding="utf-8")
    scenario = tiny_scenario(tmp_path, [3])
    scenario["serving"]["workload"] = {"arrival": {"process": "trace", "path": "t.csv"},
                                       "prompt_len": {"dist": "trace"}, "output_len": {"dist": "trace"}}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario), encoding="utf-8")
    (point,) = load_serving_points(tmp_path / "s.yaml")
    model = scale_late_layers(tiny_model(TinySpec(num_layers=6, vocab=60, seed=1)), 3, 0.1)
    outputs = [10, 2, 4, 4, 6, 3, 7, 1, 5]
    workload = ServingWorkload(tuple(Request(i, 3, n, None, 0.0) for i, n in enumerate(outputs)), users=2)
    prompts = [[1 + (5 * i + j) % 40 for j in range(3)] for i in range(len(outputs))]
    served = serve(model, workload, prompts, method="ppsd", stages=2, stage_boundaries=[3], max_batch=2,
                   ppsd_batching="continuous")  # fmt: skip
    for request, prompt, output in zip(workload.requests, prompts, served.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len, None)
    simulated = ServingSimulation(point.plan, workload, 2, None, ppsd_batching="continuous").run()
    shape = lambda logs: [(g.kind, g.batch, g.context, g.furthest, g.asked, g.stopped, g.rows) for g in logs]  # noqa: E731
    assert shape(served.result.passes) == shape(simulated.passes)
    assert sum(log.stopped for log in simulated.passes) >= 3  # users' next requests joined running rows


@pytest.mark.parametrize("join_min", [1, 2])
def test_join_min_holds_a_lone_request_back_from_a_running_batch(tmp_path, join_min) -> None:
    """Three rows, two of which end at the same read, freeing two slots, and one request waiting: with
    `ppsd_join_min` 1 it joins the row going on there; with 2 it is not enough (two slots free, one request), so the
    batch runs on to its end and the request starts a batch of its own. The executor and the simulator agree."""
    lengths = [(5, 4), (6, 4), (7, 12), (4, 6)]
    model = scale_late_layers(tiny_model(TinySpec(num_layers=6, vocab=60, seed=4)), 3, 0.3)
    requests = tuple(Request(i, p, o, 0.0) for i, (p, o) in enumerate(lengths))
    prompts = [[1 + (3 * i + j) % 50 for j in range(p)] for i, (p, _) in enumerate(lengths)]
    served = serve(model, ServingWorkload(requests), prompts, method="ppsd", stages=2, stage_boundaries=[3],
                   max_batch=3, ppsd_batching="continuous", ppsd_join_min=join_min)  # fmt: skip
    for request, prompt, output in zip(requests, prompts, served.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len, None)
    scenario = tiny_scenario(tmp_path, [3], lengths)
    scenario["serving"]["ppsd_join_min"] = join_min
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario), encoding="utf-8")
    (point,) = load_serving_points(tmp_path / "s.yaml")
    simulated = ServingSimulation(point.plan, point.workload, 3, None, ppsd_batching="continuous",
                                  ppsd_join_min=join_min).run()  # fmt: skip
    shape = lambda logs: [(g.kind, g.batch, g.stopped, g.rows) for g in logs]  # noqa: E731
    assert shape(served.result.passes) == shape(simulated.passes)
    kinds = [(log.kind, log.batch, log.stopped) for log in simulated.passes]
    if join_min == 1:
        assert kinds == [("prefill", 3, False), ("ppsd", 3, True), ("prefill", 1, False), ("ppsd", 2, False)]
    else:
        assert kinds == [("prefill", 3, False), ("ppsd", 3, False), ("prefill", 1, False), ("ppsd", 1, False)]


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_the_simulator_prices_the_executors_serving_cache(tmp_path, batching, monkeypatch) -> None:
    """Passes over every cache slot (`attention: cache`) pay for the cache the executor's PPSD server allocates: the
    longest prompt and output, or with continuous batching two outputs (`sim.contract.ppsd_serving_output`), the
    same rule on both sides."""
    scenario = tiny_scenario(tmp_path, [3], ppsd_batching=batching)
    scenario["attention"] = "cache"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario), encoding="utf-8")
    (point,) = load_serving_points(tmp_path / "s.yaml")
    prompt, output = max(p for p, _ in LENGTHS), max(o for _, o in LENGTHS)
    assert point.plan.cache_slots == prompt + (2 if batching == "continuous" else 1) * output
    built = []
    monkeypatch.setattr(serving_module.PipelineDecoder, "__init__", lambda self, *a, **kw: built.append(kw) or None)
    monkeypatch.setattr(serving_module, "_loop", lambda *args: type("Loop", (), {"run": lambda *a: None})())
    requests = tuple(Request(i, p, o, 0.0) for i, (p, o) in enumerate(LENGTHS))
    model = tiny_model(TinySpec(num_layers=6, vocab=60, seed=4))
    serve(model, ServingWorkload(requests), [[1] * p for p, _ in LENGTHS], method="ppsd", stages=2,
          stage_boundaries=[3], max_batch=3, ppsd_batching=batching)  # fmt: skip
    assert built[0]["capacity"] == point.plan.cache_slots


def test_the_last_rank_asks_the_join_rule_as_it_judges_a_distributed_tick(tmp_path) -> None:
    """On the distributed backend the last rank asks the join rule as it judges a tick, once its own pass is done:
    stage 1 400 µs a tick, stage 2 200 µs, every draft right. A request arriving 50 µs before the judge of the
    decode's third tick stops it at that tick's end; one arriving 50 µs after waits for the fourth's judge (asked at
    the tick's end, both would stop at the third)."""

    def stretch_ticks(arrival_us: float) -> tuple[int, float]:
        scenario = tiny_scenario(tmp_path, [4])
        (tmp_path / "trace.csv").write_text(f"arrival_s,prompt_len,output_len\n0.0,5,30\n{arrival_us / 1e6},3,4\n",
                                            encoding="utf-8")  # fmt: skip
        scenario.update(ppsd_backend="distributed", acceptance={"alpha": 1.0})
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario), encoding="utf-8")
        (point,) = load_serving_points(tmp_path / "s.yaml")
        plan = dataclasses.replace(point.plan, sync_every=1)
        simulation = ServingSimulation(plan, point.workload, 3, None, ppsd_batching="continuous")
        simulation.ppsd_plan = plan
        first = next(log for log in simulation.run().passes if log.kind == "ppsd")
        return first.tokens, first.start_s * 1e6

    _, start_us = stretch_ticks(1e6)  # the second request long after: the first decode starts at start_us
    assert stretch_ticks(start_us + 2 * 400 + 150)[0] == 3
    assert stretch_ticks(start_us + 2 * 400 + 250)[0] == 4
