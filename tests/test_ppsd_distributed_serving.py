"""PPSD's distributed backend beyond one generation (executor/ppsd_dist.py `DistributedPipeline`, executor/serving.py
`DistributedDecoder`): stage processes kept between generations, and serving's static batches over them. Every
request's tokens must be AR's alone, and the passes a run logs must be the sequential backend's and the simulator's
(`sim.serving`, ppsd_backend distributed) on a schedule that does not hang on speed."""

from __future__ import annotations

import dataclasses
import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ppsd import FailingMLP, _descendants_of_children
from test_ppsd_continuous import LENGTHS, check_served, check_stretches, tiny_scenario
from test_serving_executor import alone, serving_cases
from tiny_models import TinySpec, scale_late_layers, tiny_model

from executor.adapter import ModelAdapter
from executor.cli import main as eesd
from executor.decoding import TokenSink
from executor.ppsd import decode_ppsd_rows, plan_stages
from executor.ppsd_dist import DistributedPipeline, JoinRule, PPSDWorkerError
from executor.sampling import SamplingConfig
from executor.serving import serve
from sim.serving import ServingSimulation, load_serving_points
from sim.workload import Request, ServingWorkload

SHAPE = lambda logs: [(g.kind, g.batch, g.context, g.furthest, g.asked, g.stopped, g.rows) for g in logs]  # noqa: E731


def logged(run) -> list[tuple]:
    """A served run's passes as the simulator would log them, with their ticks and verdicts."""
    passes = run.result.passes
    return [(*shape, g.tokens, g.verdicts) for shape, g in zip(SHAPE(passes), passes, strict=True)]


def sequential(model, prompts: list[list[int]], asked: list[int], eos: list[int], plan, sampling=None):
    sinks = [TokenSink(count, eos) for count in asked]
    layout = dict(stages=plan.stages, stage_boundaries=plan.bounds[1:-1], exit_layer=plan.exit_layer)
    stats = decode_ppsd_rows(ModelAdapter(model), prompts, sinks, None, sampling=sampling, **layout)
    return [sink.tokens for sink in sinks], stats


def test_one_pipeline_runs_generation_after_generation() -> None:
    """Batches of 1, 3 and 2 rows (one with exact sampling, a seed per row; one with an EOS) through the same stage
    processes: each equals the sequential backend's run of it, tick for tick, and counts its processes' CPU; a
    closed pipeline takes no more and leaves no process behind."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=6, vocab=60, seed=2)), 2, 0.2)
    plan = plan_stages(6, 3, None, 2)
    jobs = [
        ([[4, 8, 15]], [12], [], None),
        ([[16, 23, 42, 4], [8], [15, 16]], [10, 4, 14], [], SamplingConfig(True, "exact", 0.8, None, None, (1, 2, 3))),
        ([[5, 9, 1], [7, 7, 7, 7]], [16, 16], [9], None),
    ]
    with DistributedPipeline(ModelAdapter(model), plan, threads_per_stage=1) as pipeline:
        for prompts, asked, eos, sampling in jobs:
            sinks = [TokenSink(count, eos) for count in asked]
            stats = pipeline.generate(prompts, sinks, sampling)
            tokens, reference = sequential(model, prompts, asked, eos, plan, sampling)
            assert [sink.tokens for sink in sinks] == tokens
            assert (stats.rows, stats.ticks, stats.verdicts) == (len(prompts), reference.ticks, reference.verdicts)
            assert (stats.drafted, stats.accepted) == (reference.drafted, reference.accepted)
            assert stats.process_cpu_s > 0
    assert pipeline.closed
    with pytest.raises(RuntimeError, match="closed"):
        pipeline.start([[1, 2]], [TokenSink(4, [])])
    assert _descendants_of_children() == []


def test_a_fault_in_a_later_generation_names_its_stage_and_stops_the_pipeline() -> None:
    """The first generation runs; the last stage breaks in the second: the caller is told which stage failed, and
    every process is stopped."""
    model = tiny_model(TinySpec(num_layers=4, vocab=60, seed=6))
    model.model.layers[3].mlp = FailingMLP(model.model.layers[3].mlp, calls=14)
    pipeline = DistributedPipeline(ModelAdapter(model), plan_stages(4, 2, None, None), threads_per_stage=1)
    pipeline.generate([[3, 4]], [TokenSink(6, [])])
    with pytest.raises(PPSDWorkerError, match=r"(?s)stage 2 \(rank 1\).*injected stage fault"):
        pipeline.generate([[3, 4], [5]], [TokenSink(12, []), TokenSink(12, [])])
    assert pipeline.closed and _descendants_of_children() == []


@pytest.mark.parametrize(
    ("batching", "bounds", "sample", "join_min"),
    [("static", [3], False, 1), ("static", [3], True, 1), ("continuous", [3], False, 1),
     ("continuous", [2, 4], True, 1), ("continuous", [3], False, 3)],
)  # fmt: skip
def test_served_over_stage_processes_as_the_sequential_backend_and_the_simulator(
    tmp_path, batching, bounds, sample, join_min
) -> None:
    """Every request there at time 0, batches of up to 3, static or continuous: over a process per stage each
    request's tokens are AR's alone (greedy, or exact sampling), and the run logs the sequential backend's passes
    (prefills and decodes: rows, context, furthest position, tokens asked, stopped, ticks and verdicts) and, with a
    speed-free schedule, the simulator's (ppsd_backend distributed). Continuous, the last stage stops the lockstep
    decode at the tick where a row's end frees a slot (the rule asked of the queue the host published), and every
    stage process keeps its rows' KV and prefills the joining requests after them."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=6, vocab=60, seed=4)), bounds[0], 0.3)
    requests = tuple(Request(i, p, o, 0.0) for i, (p, o) in enumerate(LENGTHS))
    prompts = [[1 + (3 * i + j) % 50 for j in range(p)] for i, (p, _) in enumerate(LENGTHS)]
    sampling = dict(do_sample=True, temperature=0.9, top_k=0, seed=5) if sample else {}
    runs = {
        backend: serve(model, ServingWorkload(requests), prompts, method="ppsd", stages=len(bounds) + 1,
                       stage_boundaries=bounds, max_batch=3, backend=backend, ppsd_batching=batching,
                       ppsd_join_min=join_min, sampling=SamplingConfig(**sampling) if sample else None,
                       threads_per_stage=1)
        for backend in ("distributed", "sequential")
    }  # fmt: skip
    served = runs["distributed"]
    for request, prompt, output in zip(requests, prompts, served.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len, None, **sampling)
    assert logged(served) == logged(runs["sequential"])
    check_stretches(served.result, 3)
    stops = sum(log.stopped for log in served.result.passes)
    assert stops >= (3 if join_min == 1 else 1) if batching == "continuous" else stops == 0
    scenario = tiny_scenario(tmp_path, bounds, ppsd_batching=batching, ppsd_join_min=join_min)
    scenario["ppsd_backend"] = "distributed"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario), encoding="utf-8")
    (point,) = load_serving_points(tmp_path / "s.yaml")
    plan = dataclasses.replace(point.plan, sync_every=1)
    assert plan.ppsd_backend == "distributed"
    simulation = ServingSimulation(plan, point.workload, 3, None, ppsd_batching=batching, ppsd_join_min=join_min)
    simulation.ppsd_plan = plan
    assert SHAPE(served.result.passes) == SHAPE(simulation.run().passes)
    assert _descendants_of_children() == []


@settings(max_examples=10)
@given(case=serving_cases(), stages=st.integers(2, 3), sample=st.booleans(), max_batch=st.integers(1, 4))
def test_continuous_batches_over_stage_processes_equal_ar_alone(case, stages, sample, max_batch) -> None:
    """Requests arriving on the wall clock (gaps under a millisecond, so they come while the stage processes decode:
    the host publishes each to the last stage's process as it wakes), random lengths and EOS tokens: every request's
    tokens are AR's alone, greedy and with exact sampling, and the books add up."""
    model, _, workload, prompts, eos = case
    stages = min(stages, model.config.num_hidden_layers)
    sampling = dict(do_sample=True, temperature=0.9, top_k=0, seed=3) if sample else {}
    outcome = serve(model, workload, prompts, method="ppsd", stages=stages, eos_token_id=eos, max_batch=max_batch,
                    sampling=SamplingConfig(**sampling) if sample else None, ppsd_batching="continuous",
                    backend="distributed", threads_per_stage=1)  # fmt: skip
    check_served(outcome, model, workload, prompts, eos, sampling, max_batch)


def test_a_request_arriving_mid_decode_joins_it_over_stage_processes() -> None:
    """A long request alone (240 tokens, a tick at least two messages long), a second arriving 50 ms in: the host wakes
    for the arrival and publishes it, the last stage stops the decode at its next tick, and the newcomer joins long
    before the first request ends; both are AR's alone."""
    model = tiny_model(TinySpec(num_layers=4, vocab=60, seed=8))
    requests = (Request(0, 4, 240, 0.0), Request(1, 3, 8, 0.05))
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    outcome = serve(model, ServingWorkload(requests), prompts, method="ppsd", stages=2, max_batch=2,
                    ppsd_batching="continuous", backend="distributed", threads_per_stage=1)  # fmt: skip
    for request, prompt, output in zip(requests, prompts, outcome.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len, None)
    first, second = outcome.result.records
    decodes = [log for log in outcome.result.passes if log.kind == "ppsd"]
    assert decodes[0].stopped and decodes[1].batch == 2
    assert second.first_token_s - second.arrival_s < first.finish_s - second.first_token_s
    assert _descendants_of_children() == []


def test_a_pipeline_stops_for_a_published_request_and_joins_it() -> None:
    """The pipeline's own API: a continuous generation stops at its first tick while the queue published holds a
    request that fits, and not while it holds none that fits the KV budget; a join then takes the rows going on
    (their KV kept in each process) and a new prompt (or none: the rows go on from their last tokens), and every
    row's tokens are AR's alone. A join with nothing stopped, naming a row that is not going on, of nothing at all
    or past the rule's max_batch, a continuous start without KV counts and a finish once closed are refused."""
    model = tiny_model(TinySpec(num_layers=4, vocab=60, seed=5))
    rule = JoinRule(max_batch=3, kv_capacity=40)
    with DistributedPipeline(ModelAdapter(model), plan_stages(4, 2, None, None), threads_per_stage=1) as pipeline:
        with pytest.raises(ValueError, match="KV token count per row"):
            pipeline.start([[1, 2]], [TokenSink(4, [])], join=rule)
        with pytest.raises(RuntimeError, match="no stopped continuous batch"):
            pipeline.join([0], [[1]], [TokenSink(2, [])], [3])
        pipeline.publish([30])  # 10 + 30 tokens fit: stop at the first tick
        first = [TokenSink(6, [])]
        pipeline.start([[4, 5, 6, 7]], first, join=rule, kv_tokens=[10])
        pipeline.wait_prefill()
        stats = pipeline.finish()
        assert pipeline.stopped and stats.ticks == 1 and not first[0].done
        with pytest.raises(ValueError, match="distinct rows of the stopped batch"):
            pipeline.join([1], [[1]], [TokenSink(2, [])], [3])
        with pytest.raises(ValueError, match="given neither"):
            pipeline.join([], [], [], [])
        with pytest.raises(ValueError, match="passes the join rule's max_batch 3"):
            pipeline.join([0], [[1], [2], [3]], [TokenSink(2, []) for _ in range(3)], [1, 1, 1])
        pipeline.join([0], [], [], [])  # no newcomer: the row goes on, and stops again for the one still waiting
        pipeline.wait_prefill()
        assert pipeline.finish().ticks == 1 and pipeline.stopped
        pipeline.publish([31])  # 10 + 30 held, 31 more does not fit: no stop
        second = [TokenSink(9, [])]
        pipeline.join([0], [[8, 9, 10]], second, [30])
        pipeline.wait_prefill()
        pipeline.finish()
        assert not pipeline.stopped and first[0].done and second[0].done
        assert first[0].tokens == alone(model, [4, 5, 6, 7], 6, None)
        assert second[0].tokens == alone(model, [8, 9, 10], 9, None)
    with pytest.raises(RuntimeError, match="closed"):
        pipeline.finish()
    assert _descendants_of_children() == []


def test_a_static_batch_its_prefill_ends_leaves_the_pipeline_ready(tmp_path) -> None:
    """A batch whose every row ends at its prefill (one token each) runs no decode: the stage processes' report of it
    is still read, so the next batch starts (it was refused as 'runs a generation already')."""
    model = tiny_model(TinySpec(num_layers=4, vocab=60, seed=4))
    requests = tuple(Request(i, 3, 1 if i < 2 else 4, 0.0) for i in range(4))
    prompts = [[1 + i, 2, 3] for i in range(4)]
    for batching in ("static", "continuous"):
        outcome = serve(model, ServingWorkload(requests), prompts, method="ppsd", stages=2, max_batch=2,
                        ppsd_batching=batching, backend="distributed", threads_per_stage=1)  # fmt: skip
        assert outcome.outputs == [alone(model, p, r.output_len, None) for r, p in zip(requests, prompts, strict=True)]
    assert _descendants_of_children() == []


def test_the_distributed_backend_refuses_replicas(tmp_path, capsys) -> None:
    """Replicas are refused, by `serve` and by `eesd serve-bench` (exit 2, the flag named, before a model loads);
    continuous batching is not."""
    model = tiny_model(TinySpec(num_layers=4, vocab=60, seed=1))
    workload = ServingWorkload((Request(0, 3, 4, 0.0),))
    with pytest.raises(ValueError, match="backend 'distributed' runs one pipeline.*replicas need"):
        serve(model, workload, [[1, 2, 3]], method="ppsd", backend="distributed", replica=object())
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,prompt_len,output_len\n0.0,3,4\n", encoding="utf-8")
    base = ["serve-bench", "--model", str(tmp_path / "no-model"), "--workload", str(trace), "--methods", "ppsd",
            "--backend", "distributed"]  # fmt: skip
    assert eesd([*base, "--replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert "--backend distributed" in err and "--replicas 2" in err and "Traceback" not in err
    assert eesd([*base, "--ppsd-batching", "continuous"]) == 2  # past the flags: the trace is what is wrong
    err = capsys.readouterr().err
    assert "trace.csv" in err and "--backend distributed" not in err and "Traceback" not in err
    assert _descendants_of_children() == []


def test_a_pipeline_takes_one_generation_at_a_time_and_checks_its_rows() -> None:
    """A second start before the first finished would mix their tokens and stats up: refused, as are a finish with
    nothing started and rows the stages cannot take (a sink short, EOS ids that differ, a sink's own stop rule),
    before any process hears of them; the pipeline then still runs."""
    model = tiny_model(TinySpec(num_layers=4, vocab=60, seed=3))
    with DistributedPipeline(ModelAdapter(model), plan_stages(4, 2, None, None), threads_per_stage=1) as pipeline:
        with pytest.raises(RuntimeError, match="runs no generation: start one first"):
            pipeline.finish()
        with pytest.raises(ValueError, match="a sink per prompt"):
            pipeline.start([[1, 2], [3]], [TokenSink(4, [])])
        with pytest.raises(ValueError, match="same EOS ids"):
            pipeline.start([[1, 2], [3]], [TokenSink(4, []), TokenSink(4, [7])])
        with pytest.raises(ValueError, match="a sink's own stop rule is not theirs"):
            pipeline.start([[1, 2]], [TokenSink(4, [], stop=lambda tokens: True)])
        first = [TokenSink(12, [])]
        pipeline.start([[5, 6, 7]], first)
        with pytest.raises(RuntimeError, match="runs a generation already"):
            pipeline.start([[1, 2, 3, 4]], [TokenSink(5, [])])
        assert pipeline.finish().rows == 1 and len(first[0].tokens) == 12
        again = [TokenSink(5, [])]
        pipeline.generate([[1, 2, 3, 4]], again)
        assert again[0].tokens == alone(model, [1, 2, 3, 4], 5, None)
    assert _descendants_of_children() == []


def test_an_idle_pipeline_closes_promptly_with_its_pipes_full_of_heartbeats(monkeypatch) -> None:
    """Nothing reads the stage processes' pipes between generations, and their heartbeats go on: once a pipe is full
    a heartbeat blocks, and the process could not end. Closing reads the pipes while the processes end, so they exit
    on their own (exit code 0), not killed after the grace period; and the smallest stall timeout survives the
    processes' start (the first heartbeat comes once a process runs)."""
    import executor.ppsd_dist as ppsd_dist

    monkeypatch.setattr(ppsd_dist, "heartbeat_interval", lambda stall_timeout_s: 0.001)  # a pipe full in seconds
    model = tiny_model(TinySpec(num_layers=4, vocab=60, seed=3))
    pipeline = DistributedPipeline(ModelAdapter(model), plan_stages(4, 2, None, None), threads_per_stage=1,
                                   stall_timeout_s=0.25)  # fmt: skip
    pipeline.generate([[1, 2, 3]], [TokenSink(3, [])])
    time.sleep(6.0)  # ~6000 beats a process: past the 64 KiB a pipe holds
    begin = time.monotonic()
    pipeline.close()
    assert [process.exitcode for process in pipeline.processes] == [0, 0]  # ended, not killed (-9)
    assert time.monotonic() - begin < ppsd_dist._KILL_GRACE_S
    assert _descendants_of_children() == []
