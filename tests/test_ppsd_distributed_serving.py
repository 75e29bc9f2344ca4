"""PPSD's distributed backend beyond one generation (executor/ppsd_dist.py `DistributedPipeline`, executor/serving.py
`DistributedDecoder`): stage processes kept between generations, and serving's static batches over them. Every
request's tokens must be AR's alone, and the passes a run logs must be the sequential backend's and the simulator's
(`sim.serving`, ppsd_backend distributed) on a schedule that does not hang on speed."""

from __future__ import annotations

import dataclasses
import time

import pytest
import yaml
from test_ppsd import FailingMLP, _descendants_of_children
from test_ppsd_continuous import LENGTHS, tiny_scenario
from test_serving_executor import alone
from tiny_models import TinySpec, scale_late_layers, tiny_model

from executor.adapter import ModelAdapter
from executor.cli import main as eesd
from executor.decoding import TokenSink
from executor.ppsd import decode_ppsd_rows, plan_stages
from executor.ppsd_dist import DistributedPipeline, PPSDWorkerError
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


@pytest.mark.parametrize("sample", [False, True])
def test_served_over_stage_processes_as_the_sequential_backend_and_the_simulator(tmp_path, sample) -> None:
    """Every request there at time 0, static batches of up to 3: over a process per stage each request's tokens are
    AR's alone (greedy, or exact sampling), and the run logs the sequential backend's passes (prefills and decodes:
    rows, context, furthest position, tokens asked, ticks and verdicts) and, with a speed-free schedule, the
    simulator's (ppsd_backend distributed)."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=6, vocab=60, seed=4)), 3, 0.3)
    requests = tuple(Request(i, p, o, 0.0) for i, (p, o) in enumerate(LENGTHS))
    prompts = [[1 + (3 * i + j) % 50 for j in range(p)] for i, (p, _) in enumerate(LENGTHS)]
    sampling = dict(do_sample=True, temperature=0.9, top_k=0, seed=5) if sample else {}
    config = SamplingConfig(**sampling) if sample else None
    runs = {
        backend: serve(model, ServingWorkload(requests), prompts, method="ppsd", stages=2, stage_boundaries=[3],
                       max_batch=3, backend=backend, sampling=config, threads_per_stage=1)
        for backend in ("distributed", "sequential")
    }  # fmt: skip
    served = runs["distributed"]
    for request, prompt, output in zip(requests, prompts, served.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len, None, **sampling)
    assert logged(served) == logged(runs["sequential"])
    assert served.outputs == runs["sequential"].outputs
    assert served.result.drafted == sum(len(g.verdicts) for g in served.result.passes)
    scenario = tiny_scenario(tmp_path, [3], ppsd_batching="static")
    scenario["ppsd_backend"] = "distributed"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario), encoding="utf-8")
    (point,) = load_serving_points(tmp_path / "s.yaml")
    plan = dataclasses.replace(point.plan, sync_every=1)
    assert plan.ppsd_backend == "distributed"
    simulated = ServingSimulation(plan, point.workload, 3, None).run()
    assert SHAPE(served.result.passes) == SHAPE(simulated.passes)
    assert _descendants_of_children() == []


def test_the_distributed_backend_serves_static_batches_only(tmp_path, capsys) -> None:
    """Continuous batching and replicas are refused, by `serve` and by `eesd serve-bench` (exit 2, the flags named,
    before a model loads)."""
    model = tiny_model(TinySpec(num_layers=4, vocab=60, seed=1))
    workload = ServingWorkload((Request(0, 3, 4, 0.0),))
    with pytest.raises(ValueError, match="backend 'distributed' serves static batches.*continuous batching"):
        serve(model, workload, [[1, 2, 3]], method="ppsd", backend="distributed", ppsd_batching="continuous")
    with pytest.raises(ValueError, match="backend 'distributed' serves static batches.*replicas need"):
        serve(model, workload, [[1, 2, 3]], method="ppsd", backend="distributed", replica=object())
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,prompt_len,output_len\n0.0,3,4\n", encoding="utf-8")
    base = ["serve-bench", "--model", str(tmp_path / "no-model"), "--workload", str(trace), "--methods", "ppsd",
            "--backend", "distributed"]  # fmt: skip
    for extra, fragment in ((["--ppsd-batching", "continuous"], "--ppsd-batching continuous"),
                            (["--replicas", "2"], "--replicas")):  # fmt: skip
        assert eesd([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert "--backend distributed" in err and fragment in err and "Traceback" not in err
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
