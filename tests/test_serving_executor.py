"""The executor's continuous batching (executor.serving): every request's tokens are those it gets alone with AR,
whatever the arrivals, lengths, EOS, slots and method; the records follow the simulator's schedule; bad inputs are
refused."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import TinySpec, scale_late_layers, tiny_model, tiny_specs

from executor.adapter import ModelAdapter
from executor.api import generate
from executor.cli import main as eesd
from executor.heads import TrainedExitHead
from executor.sampling import SamplingConfig
from executor.serving import SlotDecoder, serve
from sim.serving import metrics
from sim.workload import Request, ServingWorkload


def alone(model, prompt: list[int], max_new_tokens: int, eos: int | None, **sampling) -> list[int]:
    result = generate(model, prompt, method="ar", max_new_tokens=max_new_tokens, eos_token_id=eos, **sampling)
    return result.sequences[0, len(prompt) :].tolist()


@st.composite
def serving_cases(draw):
    spec = draw(tiny_specs(archs=("llama", "qwen2"), min_layers=2, max_layers=4))
    exit_layer = draw(st.integers(1, spec.num_layers - 1))
    model = scale_late_layers(tiny_model(spec), exit_layer, draw(st.sampled_from([0.0, 0.05, 1.0])))
    count = draw(st.integers(1, 10))
    prompts = [draw(st.lists(st.integers(0, spec.vocab - 1), min_size=1, max_size=10)) for _ in range(count)]
    gaps_ms = draw(st.lists(st.floats(0.0, 1.0), min_size=count, max_size=count))
    outputs = draw(st.lists(st.integers(1, 20), min_size=count, max_size=count))
    arrivals = [sum(gaps_ms[: i + 1]) / 1e3 for i in range(count)]
    requests = tuple(Request(i, len(p), outputs[i], arrivals[i]) for i, p in enumerate(prompts))
    eos = draw(st.none() | st.integers(0, spec.vocab - 1))
    return model, exit_layer, ServingWorkload(requests), prompts, eos


@settings(max_examples=25)
@given(
    case=serving_cases(),
    method=st.sampled_from(["ar", "eesd"]),
    policy=st.sampled_from(["fixed:1", "fixed:3", "heuristic:2,max=5", "beta-ts:max=4"]),
    max_batch=st.integers(1, 4),
)
def test_served_tokens_equal_ar_alone(case, method, policy, max_batch):
    """Continuous batching on fixed slots is lossless: rows join (prefill into a freed slot) and leave (the last row
    moved into the freed one) mid-run, each request keeps its own positions, policy and EOS."""
    model, exit_layer, workload, prompts, eos = case
    outcome = serve(model, workload, prompts, method=method, exit_layer=exit_layer, policy=policy,
                    max_batch=max_batch, eos_token_id=eos)  # fmt: skip
    for request, prompt, output in zip(workload.requests, prompts, outcome.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len, eos), request
    result = outcome.result
    assert result.tokens == sum(len(o) for o in outcome.outputs) == sum(r.tokens for r in result.records)
    for record in result.records:
        assert record.arrival_s <= record.start_s < record.first_token_s <= record.finish_s <= result.time_s
    assert result.row_rounds <= result.rounds * max_batch


@settings(max_examples=12)
@given(case=serving_cases(), stages=st.integers(2, 4), sample=st.booleans(), max_batch=st.integers(1, 4))
def test_ppsd_served_in_static_batches_equals_ar_alone(case, stages, sample, max_batch):
    """PPSD serving (static batches of up to max_batch requests through the pipeline in lockstep, each row ending at
    its own length or EOS, one cache of max_batch rows reused for every batch) is lossless, greedy and with exact
    sampling; batches are taken in arrival order, prefilled together, and the next starts once the last is done."""
    model, _, workload, prompts, eos = case
    stages = min(stages, model.config.num_hidden_layers)
    sampling = dict(do_sample=True, temperature=0.9, top_k=0, seed=3) if sample else {}
    config = SamplingConfig(**sampling) if sample else None
    outcome = serve(model, workload, prompts, method="ppsd", stages=stages, eos_token_id=eos, sampling=config,
                    max_batch=max_batch)  # fmt: skip
    for request, prompt, output in zip(workload.requests, prompts, outcome.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len, eos, **sampling), request
    result = outcome.result
    assert result.max_batch == max_batch
    assert result.tokens == sum(len(o) for o in outcome.outputs) == sum(r.tokens for r in result.records)
    records = sorted(result.records, key=lambda r: (r.start_s, r.index))
    assert [r.index for r in records] == list(range(len(records)))  # first come, first served
    batches: dict[float, list] = {}
    for record in records:
        assert record.arrival_s <= record.start_s < record.first_token_s <= record.finish_s <= result.time_s
        batches.setdefault(record.start_s, []).append(record)
    groups = list(batches.values())
    assert all(len(group) <= max_batch and len({r.first_token_s for r in group}) == 1 for group in groups)
    assert all(max(r.finish_s for r in a) <= b[0].start_s for a, b in zip(groups, groups[1:], strict=False))
    prefills = [log for log in result.passes if log.kind == "prefill"]
    assert [log.batch for log in prefills] == [len(group) for group in groups]
    decodes = [log for log in result.passes if log.kind == "ppsd"]
    assert result.rounds == sum(log.tokens for log in decodes)  # a PPSD run's rounds are its ticks
    assert result.drafted == sum(len(log.verdicts) for log in decodes)
    assert result.accepted == sum(sum(log.verdicts) for log in decodes)


def test_rows_move_when_an_earlier_row_leaves(monkeypatch):
    """Requests that end out of order hand their row to the last running request (its KV copied over), and new
    requests prefill into freed rows; every output is still AR's alone."""
    moves = []
    original = SlotDecoder.move
    monkeypatch.setattr(SlotDecoder, "move", lambda self, *args: (moves.append(args), original(self, *args))[1])
    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=64, seed=7)), 2, 0.1)
    outputs = [9, 2, 7, 3, 5, 8, 1, 6, 4, 10]
    requests = tuple(Request(i, 3 + i % 4, n, 0.0) for i, n in enumerate(outputs))
    prompts = [[(7 * i + j) % 64 for j in range(r.prompt_len)] for i, r in enumerate(requests)]
    trained = TrainedExitHead(ModelAdapter(model), 2).double().requires_grad_(False)  # a head with its own KV layer
    for method, head in (("ar", None), ("eesd", None), ("eesd", trained)):
        moves.clear()
        outcome = serve(model, ServingWorkload(requests), prompts, method=method, exit_layer=2, policy="fixed:3",
                        max_batch=3, head=head)  # fmt: skip
        assert moves, method
        for request, prompt, output in zip(requests, prompts, outcome.outputs, strict=True):
            assert output == alone(model, prompt, request.output_len, None), (method, request)
    assert sum(outcome.stats.accepted) > 0


def test_exact_sampling_and_a_closed_loop():
    """Exact sampling keys each token by (seed, position): a served request samples what it samples alone; a closed
    loop's users send their next request after their last one finished."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=64, seed=5)), 2, 0.2)
    rng = random.Random(1)
    requests = tuple(Request(i, 4 + i % 3, 6 + i % 5, None, 0.001) for i in range(7))
    workload = ServingWorkload(requests, users=2)
    prompts = [[rng.randrange(64) for _ in range(r.prompt_len)] for r in requests]
    config = SamplingConfig(do_sample=True, temperature=0.8, top_k=20, seed=11)
    outcome = serve(model, workload, prompts, method="eesd", exit_layer=2, policy="fixed:2", max_batch=2,
                    sampling=config)  # fmt: skip
    for request, prompt, output in zip(requests, prompts, outcome.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len, None, do_sample=True, temperature=0.8, top_k=20,
                               seed=11)  # fmt: skip
    records = outcome.result.records
    in_flight = max(sum(1 for r in records if r.arrival_s <= t < r.finish_s) for t in [r.arrival_s for r in records])
    assert in_flight <= 2
    row = metrics(outcome.result)
    assert row["mean_in_system"] == pytest.approx(row["little_lambda_w"])


def test_kv_budget_limits_what_runs_at_once():
    model = tiny_model(TinySpec(num_layers=2, vocab=50, seed=2))
    requests = tuple(Request(i, 5, 6, 0.0) for i in range(6))
    prompts = [[1 + i, 2, 3, 4, 5] for i in range(6)]
    outcome = serve(model, ServingWorkload(requests), prompts, max_batch=6, kv_capacity_tokens=2 * 12)  # 5 + 6 + 1 each
    records = outcome.result.records
    assert max(sum(1 for r in records if r.start_s <= t < r.finish_s) for t in [r.start_s for r in records]) == 2
    for request, prompt, output in zip(requests, prompts, outcome.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len, None)


def test_the_executor_logs_the_rounds_the_simulator_runs(tmp_path):
    """With every request there at time 0 the schedule does not depend on the passes' speed: the executor's log of
    prefills and rounds (`ServingResult.passes`) has the simulator's compositions (batch, draft steps, mean context,
    furthest position), so a simulator can cost each measured round at what it ran; measured times are positive and
    add up to the run's prefill and decode times."""
    import yaml

    from sim.serving import ServingSimulation, load_serving_points

    lengths = [(5, 9), (11, 3), (2, 14), (7, 6), (9, 1), (4, 8), (13, 5)]  # (prompt, output) per request
    model = tiny_model(TinySpec(num_layers=2, vocab=60, seed=4))
    requests = tuple(Request(i, p, o, 0.0) for i, (p, o) in enumerate(lengths))
    prompts = [[1 + (3 * i + j) % 50 for j in range(p)] for i, (p, _) in enumerate(lengths)]
    served = serve(model, ServingWorkload(requests), prompts, max_batch=3).result
    trace = "arrival_s,prompt_len,output_len\n" + "".join(f"0.0,{p},{o}\n" for p, o in lengths)
    (tmp_path / "trace.csv").write_text(trace, encoding="utf-8")
    workload = {"arrival": {"process": "trace", "path": "trace.csv"}, "prompt_len": {"dist": "trace"},
                "output_len": {"dist": "trace"}}  # fmt: skip
    scenario = {"name": "logs", "model": "SmolLM2-135M", "method": "ar", "attention": "context",
                "latency": {"constant_us": {"layer": 100.0}}, "acceptance": {"alpha": 0.5},
                "serving": {"workload": workload, "max_batch": 3}}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario), encoding="utf-8")
    (point,) = load_serving_points(tmp_path / "s.yaml")
    simulated = ServingSimulation(point.plan, point.workload, 3, None).run()
    shape = lambda logs: [(g.kind, g.batch, g.tokens, g.context, g.furthest) for g in logs]  # noqa: E731
    assert shape(served.passes) == shape(simulated.passes)
    assert [g.batch for g in served.passes if g.kind == "round"][:2] == [3, 3]
    assert all(g.seconds > 0 for g in served.passes)
    assert sum(g.seconds for g in served.passes if g.kind == "prefill") == pytest.approx(served.prefill_s)
    assert sum(g.seconds for g in served.passes if g.kind == "round") == pytest.approx(served.decode_s)


@pytest.mark.parametrize("batch", [1, 3])
def test_the_executor_logs_the_ppsd_decodes_the_simulator_runs(tmp_path, batch):
    """PPSD serving logs each batch's prefill and decode (kind "ppsd": ticks, longest prompt, last position written,
    the batch's verdicts) where the simulator logs them, one request at a time or in static batches of 3; the
    simulator, given a logged decode's verdicts, runs the same number of ticks (so it costs the decode at the
    composition it ran), on 2 and 3 stages, with EOS cuts."""
    import yaml

    from sim.engine import BatchRow, decode_alone, decode_rows
    from sim.policy import make_policy
    from sim.serving import ServingSimulation, VerdictStream, load_serving_points

    lengths = [(5, 9), (11, 3), (2, 14), (7, 6), (9, 1), (4, 12), (13, 5)]
    model = scale_late_layers(tiny_model(TinySpec(num_layers=6, vocab=60, seed=4)), 3, 0.3)
    requests = tuple(Request(i, p, o, 0.0) for i, (p, o) in enumerate(lengths))
    prompts = [[1 + (3 * i + j) % 50 for j in range(p)] for i, (p, _) in enumerate(lengths)]
    trace = "arrival_s,prompt_len,output_len\n" + "".join(f"0.0,{p},{o}\n" for p, o in lengths)
    (tmp_path / "trace.csv").write_text(trace, encoding="utf-8")
    workload = {"arrival": {"process": "trace", "path": "trace.csv"}, "prompt_len": {"dist": "trace"},
                "output_len": {"dist": "trace"}}  # fmt: skip
    for stages, bounds in ((2, [3]), (3, [2, 4])):
        served = serve(model, ServingWorkload(requests), prompts, method="ppsd", stages=stages,
                       stage_boundaries=bounds, max_batch=batch).result  # fmt: skip
        layers = [b - a for a, b in zip([0, *bounds], [*bounds, 6], strict=True)]
        scenario = {"name": "logs", "model": {"name": "tiny", "num_layers": 6, "hidden_size": 64,
                    "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 60},
                    "method": "ppsd", "ppsd_backend": "sequential", "exit_layer": bounds[0], "attention": "context",
                    "topology": {"stages": [{"layers": n} for n in layers]},
                    "latency": {"constant_us": {"layer": 100.0}}, "acceptance": {"alpha": 0.5},
                    "serving": {"workload": workload}}  # fmt: skip
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario), encoding="utf-8")
        (point,) = load_serving_points(tmp_path / "s.yaml")
        simulated = ServingSimulation(point.plan, point.workload, batch, None).run()
        shape = lambda logs: [(g.kind, g.batch, g.context, g.furthest, g.asked, g.rows) for g in logs]  # noqa: E731
        assert shape(served.passes) == shape(simulated.passes)
        decodes = [log for log in served.passes if log.kind == "ppsd"]
        assert any(not all(log.verdicts) for log in decodes) and any(sum(log.verdicts) for log in decodes)
        assert [log.batch for log in decodes] == ([1] * 6 if batch == 1 else [3, 3, 1])  # the 1-token one: no decode
        for log in decodes:
            output = log.furthest - log.context + 2
            assert len(log.verdicts) == max(output - 2, 0)
            rows = [BatchRow(VerdictStream(log.verdicts), make_policy("fixed:1"), output) for _ in range(log.batch)]
            assert decode_rows(point.plan, log.context, rows)[0].ticks == log.tokens, log
    eos = alone(model, prompts[2], 14, None)[5]  # a request cut by an EOS logs what it ran
    cut = serve(model, ServingWorkload((Request(0, 2, 14, 0.0),)), prompts[2:3], method="ppsd", stages=3,
                stage_boundaries=[2, 4], eos_token_id=eos).result  # fmt: skip
    log, tokens = cut.passes[-1], cut.records[0].tokens
    assert tokens < 14 and log.furthest == 2 + tokens - 2
    run = decode_alone(point.plan, 2, tokens, VerdictStream(log.verdicts), make_policy("fixed:1"))
    assert run.ticks == log.tokens


def test_a_closed_loops_ppsd_batches_are_the_simulators(tmp_path):
    """Two users, no think time, PPSD batches of up to 2 with rows of different lengths: a row's request leaves when
    the host read its end, in that order, so the users send their next requests in index order, and the request
    sent as a batch's last row ends joins the next batch; the simulator forms the very same batches."""
    import yaml

    from sim.serving import ServingSimulation, load_serving_points

    (tmp_path / "t.csv").write_text("arrival_s,prompt_len,output_len\n0.0,3,3\n", encoding="utf-8")
    scenario = {"name": "closed", "model": {"name": "tiny", "num_layers": 4, "hidden_size": 32,
                "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 50}, "method": "ppsd",
                "ppsd_backend": "sequential", "exit_layer": 2, "attention": "context",
                "topology": {"stages": [{"layers": 2}, {"layers": 2}]}, "latency": {"constant_us": {"layer": 100.0}},
                "acceptance": {"alpha": 0.5}, "serving": {"workload": {"arrival": {"process": "trace",
                "path": "t.csv"}, "prompt_len": {"dist": "trace"}, "output_len": {"dist": "trace"}}}}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario), encoding="utf-8")
    (point,) = load_serving_points(tmp_path / "s.yaml")
    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=50, seed=1)), 2, 0.1)
    outputs = [10, 2, 4, 4, 6, 3]
    workload = ServingWorkload(tuple(Request(i, 3, n, None, 0.0) for i, n in enumerate(outputs)), users=2)
    prompts = [[1 + (5 * i + j) % 40 for j in range(3)] for i in range(len(outputs))]

    def batches(result) -> list[list[int]]:
        groups: dict[float, list[int]] = {}
        for record in sorted(result.records, key=lambda r: (r.start_s, r.index)):
            groups.setdefault(record.start_s, []).append(record.index)
        return list(groups.values())

    served = serve(model, workload, prompts, method="ppsd", stages=2, stage_boundaries=[2], max_batch=2).result
    simulated = ServingSimulation(point.plan, workload, 2, None).run()
    assert batches(served) == batches(simulated) == [[0, 1], [2, 3], [4, 5]]
    for result in (served, simulated):
        arrivals = [record.arrival_s for record in result.records]
        assert arrivals == sorted(arrivals)  # the users' next requests go out in the order their rows ended


def test_bad_serving_inputs_refused():
    model = tiny_model(TinySpec(num_layers=2, vocab=50))
    workload = ServingWorkload((Request(0, 3, 4, 0.0),))
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1, got 0"):
        serve(model, workload, [[1, 2, 3]], method="ppsd", max_batch=0)
    with pytest.raises(ValueError, match="backend must be one of sequential, streams, distributed"):
        serve(model, workload, [[1, 2, 3]], method="ppsd", backend="bogus")
    with pytest.raises(ValueError, match="backend 'streams' needs a GPU.*serve with backend 'sequential'"):
        serve(model, workload, [[1, 2, 3]], method="ppsd", backend="streams")
    with pytest.raises(ValueError, match="stages must be an integer >= 2"):
        serve(model, workload, [[1, 2, 3]], method="ppsd", stages=1)
    with pytest.raises(ValueError, match="method must be ar, eesd or ppsd"):
        serve(model, workload, [[1, 2, 3]], method="beam")
    with pytest.raises(ValueError, match="one prompt per request"):
        serve(model, workload, [[1, 2, 3], [4]])
    with pytest.raises(ValueError, match="request 0 needs 8 tokens"):
        serve(model, workload, [[1, 2, 3]], kv_capacity_tokens=7)
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        serve(model, workload, [[1, 2, 3]], max_batch=0)
    with pytest.raises(ValueError, match="sampling 'exact' only"):
        serve(model, workload, [[1, 2, 3]], sampling=SamplingConfig(do_sample=True, mode="rejection"))
    with pytest.raises(ValueError, match="repetition penalty"):
        serve(model, workload, [[1, 2, 3]], sampling=SamplingConfig(repetition_penalty=1.3))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        serve(model, workload, [[1, 2, 99]])


def test_serve_bench_cli(tmp_path, capsys):
    """`eesd serve-bench` on a packaged model's shape is slow on a CPU; a local tiny model in HF format serves the
    same command line."""
    model = tiny_model(TinySpec(num_layers=2, vocab=60, seed=4), dtype=torch.float32)
    model.save_pretrained(tmp_path / "tiny")
    (tmp_path / "w.yaml").write_text(
        "requests: 5\nseed: 2\narrival: {process: poisson, rate_per_s: 500}\nprompt_len: {dist: uniform, low: 2, "
        "high: 6}\noutput_len: 5\n"
    )
    out = tmp_path / "serve.json"
    argv = [
        "serve-bench", "--workload", str(tmp_path / "w.yaml"), "--model", str(tmp_path / "tiny"), "--methods",
        "ar,eesd", "--exit-layer", "1", "--max-batch", "2", "--compare-ar", "--json", str(out), "--threads", "1",
    ]  # fmt: skip
    assert eesd(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "tpot50" in printed and "eesd" in printed
    for method in ("ar", "eesd"):  # --compare-ar says what it found
        assert f"{method}: the 5 requests' tokens identical to each request decoded alone with AR" in captured.err
    import json

    document = json.loads(out.read_text())
    assert [row["method"] for row in document["rows"]] == ["ar", "eesd"]
    assert all(row["identical_to_ar"] and row["tokens"] == 25 for row in document["rows"])
    assert math.isfinite(document["rows"][0]["tpot_p50_ms"])
    from sim.serving import PassLog

    for method, logs in document["passes"].items():  # every prefill and round the run timed, as `PassLog`s
        runs = [PassLog(**log) for log in logs]
        assert sum(log.kind == "prefill" for log in runs) == 5 and all(log.seconds > 0 for log in runs)
        if method == "ar":
            assert {log.tokens for log in runs if log.kind == "round"} == {0}  # an AR round drafts nothing
    # drafting inside stage 1 (--exit-layer 1 of stage 1's 2 layers), as serve-sim lays such a point out
    ppsd = [*argv[:5], "--methods", "ppsd", "--stages", "2", "--compare-ar", "--json", str(out), "--exit-layer", "1"]
    assert eesd(ppsd) == 0  # PPSD serves one request at a time by default
    capsys.readouterr()
    (row,) = json.loads(out.read_text())["rows"]
    assert row["identical_to_ar"] and row["tokens"] == 25 and row["occupancy"] == 1.0 and row["stages"] == 2
    assert eesd([*ppsd, "--ppsd-max-batch", "3"]) == 0  # static batches of up to 3, still AR's tokens
    capsys.readouterr()
    (row,) = json.loads(out.read_text())["rows"]
    assert row["identical_to_ar"] and row["tokens"] == 25 and row["max_batch"] == 3
    assert eesd([*argv[:5], "--methods", "ppsd,beam"]) == 2
    assert "--methods must list ar, eesd and/or ppsd" in capsys.readouterr().err


def test_captured_serving_needs_a_gpu_and_auto_is_uncaptured_on_the_cpu() -> None:
    """`capture` as `generate` takes it: a mode that needs CUDA is refused on the CPU, "auto" runs uncaptured there
    (the same tokens, no decoder kept on the model)."""
    model = tiny_model(TinySpec(num_layers=3, seed=4))
    prompts = [[3, 1, 4], [1, 5, 9, 2]]
    workload = ServingWorkload((Request(0, 3, 5, 0.0), Request(1, 4, 6, 0.0)))
    with pytest.raises(ValueError, match="capture 'graph' needs the model on a CUDA device"):
        serve(model, workload, prompts, capture="graph")
    plain = serve(model, workload, prompts, max_batch=2).outputs
    assert serve(model, workload, prompts, max_batch=2, capture="auto").outputs == plain
    assert "_eesd_serving" not in model.__dict__


def test_the_warm_up_runs_every_batch_size_once() -> None:
    """serve-bench's untimed run before a captured one: the first max_batch requests at once, request i asking for
    i + 2 tokens (the prefill makes one), so the running batch goes through every size (each size's passes captured
    before timing)."""
    from executor.serve_cli import warm_up_workload

    requests = tuple(Request(i, 5 + i, 20, 0.1 * i) for i in range(6))
    prompts = [[1] * (5 + i) for i in range(6)]
    warm, chosen = warm_up_workload(ServingWorkload(requests), prompts, 4)
    assert [(r.prompt_len, r.output_len, r.arrival_s) for r in warm.requests] == [(5 + i, i + 2, 0.0) for i in range(4)]
    assert chosen == prompts[:4]
    one, _ = warm_up_workload(ServingWorkload(requests), prompts, 1)
    assert [(r.output_len, r.arrival_s) for r in one.requests] == [(4, 0.0)]
    model = tiny_model(TinySpec(num_layers=3, seed=4))
    sizes = []
    original = SlotDecoder.round
    SlotDecoder.round = lambda self, slots: (sizes.append(len(slots)), original(self, slots))[1]
    try:
        serve(model, warm, chosen, max_batch=4)
    finally:
        SlotDecoder.round = original
    assert sorted(set(sizes)) == [1, 2, 3, 4]


def test_a_captured_ppsd_server_warms_up_every_static_batch_width() -> None:
    """PPSD's static batches run at any width up to max_batch: a captured serve-bench warms each one up (a batch of
    that many requests at once), the widest last; uncaptured, one request; AR and EESD one run through every size."""
    from executor.serve_cli import warm_ups

    requests = tuple(Request(i, 5 + i, 20, 0.1 * i) for i in range(6))
    prompts, workload = [[1] * (5 + i) for i in range(6)], ServingWorkload(requests)
    widths = [len(warm.requests) for warm, _ in warm_ups(workload, prompts, "ppsd", 4, True)]
    assert widths == [1, 2, 3, 4]
    assert [len(w.requests) for w, _ in warm_ups(workload, prompts, "ppsd", 9, True)] == [1, 2, 3, 4, 5, 6]
    assert [len(w.requests) for w, _ in warm_ups(workload, prompts, "ppsd", 4, False)] == [1]
    assert [len(w.requests) for w, _ in warm_ups(workload, prompts, "ar", 4, True)] == [4]
    model = tiny_model(TinySpec(num_layers=3, seed=4))
    for warm, chosen in warm_ups(workload, prompts, "ppsd", 3, True):
        outcome = serve(model, warm, chosen, method="ppsd", stages=2, max_batch=3)
        assert [log.batch for log in outcome.result.passes if log.kind == "prefill"] == [len(warm.requests)]


def test_a_captured_decoder_is_kept_on_the_model_for_the_same_setup() -> None:
    """What a warm-up buys: the next call of the same setup gets the same decoder (its graphs), its stats reset;
    another setup (here another sampling seed) a new one; at most MAX_KEPT_DECODERS are kept; a moved weight drops
    them. Built here without capturing anything (graphs are made on first use, on a GPU)."""
    import executor.serving as serving

    model = tiny_model(TinySpec(num_layers=3, seed=4))
    adapter = ModelAdapter(model)

    def settings(seed: int) -> dict:
        return dict(method="ar", max_batch=2, exit_layer=None, head=None, max_draft=0, capacity=256,
                    confidence=False, config=SamplingConfig(seed=seed), eos=[], capture="graph")  # fmt: skip

    first = serving.slot_decoder(adapter, settings(0))
    first.stats.rounds = 5
    again = serving.slot_decoder(adapter, settings(0))
    assert again is first and again.stats.rounds == 0
    others = [serving.slot_decoder(adapter, settings(seed)) for seed in (1, 2)]
    assert all(d is not first for d in others) and len(model.__dict__["_eesd_serving"]) == serving.MAX_KEPT_DECODERS
    assert serving.slot_decoder(adapter, settings(0)) is not first  # the oldest went when the third came
    with torch.no_grad():
        model.model.norm.weight.data = model.model.norm.weight.data.clone()  # a weight moved
    assert serving.slot_decoder(adapter, settings(2)) is not others[1]
    assert len(model.__dict__["_eesd_serving"]) == 1


def test_serve_bench_refuses_a_gpu_capture_on_the_cpu_before_loading(capsys) -> None:
    from pathlib import Path

    workload = str(Path(__file__).resolve().parents[1] / "scenarios" / "workloads" / "smollm2_cpu_rate0.4.yaml")
    argv = ["serve-bench", "--workload", workload, "--model", "no-such-model", "--capture", "graph"]
    assert eesd(argv) == 2
    assert "--capture graph needs a CUDA device" in capsys.readouterr().err


def test_serve_bench_refuses_an_slo_or_kv_budget_that_cannot_be_before_loading(capsys) -> None:
    from pathlib import Path

    workload = str(Path(__file__).resolve().parents[1] / "scenarios" / "workloads" / "smollm2_cpu_rate0.4.yaml")
    argv = ["serve-bench", "--workload", workload, "--model", "no-such-model"]
    for flags, message in ((["--slo-ttft-ms", "-5"], "--slo-ttft-ms must be a time in ms > 0, got -5"),
                           (["--slo-tpot-ms", "nan"], "--slo-tpot-ms must be a time in ms > 0, got nan"),
                           (["--kv-capacity-tokens", "-5"], "--kv-capacity-tokens must be >= 1 (leave it out"),
                           (["--methods", "ar", "--policy", "fixed:2"], "--policy is for --methods eesd, got"),
                           (["--methods", "eesd", "--stages", "3"], "--stages is for --methods ppsd, got"),
                           (["--dispatch", "round_robin"], "--dispatch is for --replicas 2 or more"),
                           (["--methods", "ppsd", "--max-batch", "4"], "--max-batch is for --methods ar or eesd"),
                           (["--methods", "ar", "--ppsd-max-batch", "4"], "--ppsd-max-batch is for --methods ppsd"),
                           (["--methods", "ppsd", "--ppsd-max-batch", "0"], "--ppsd-max-batch must be >= 1, got 0"),
                           (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
                           (["--kv-capacity-tokens", "10"], "--kv-capacity-tokens 10: request ")):  # fmt: skip
        assert eesd([*argv, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert "of " + workload + " needs " in err[0] and "under ar" in err[0]


def test_serve_bench_refuses_a_json_it_cannot_write_before_loading(tmp_path, capsys) -> None:
    from pathlib import Path

    workload = str(Path(__file__).resolve().parents[1] / "scenarios" / "workloads" / "smollm2_cpu_rate0.4.yaml")
    (tmp_path / "a_file").write_text("keep me\n")
    for json_path, message in ((tmp_path / "a_file" / "x.json", "a_file is a file, so the folder"),
                               (tmp_path, "is a folder; --json names the file to write")):  # fmt: skip
        assert eesd(["serve-bench", "--workload", workload, "--model", "no-such-model", "--json", str(json_path)]) == 2
        err = capsys.readouterr().err
        assert f"error: --json {json_path}: " in err and message in err, err


def test_a_scenario_derived_from_a_devices_files_serves_the_same_requests(tmp_path, monkeypatch) -> None:
    """`benchmarks/serving_cpu.py --profile P --trace T` (the GPU runbook's serving call) derives serving_cpu.yaml's
    cases from another device's files: given this CPU's own profile and trace it writes the workloads committed for
    them (the same requests), and every case loads with those files; `--rate-scale` divides every arrival."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from serving_cpu import PROFILE_CPU, TRACE, WORKLOADS, dense, derived_scenario
    finally:
        sys.path.remove(str(root / "benchmarks"))
    from sim.serving import load_serving_points

    path = derived_scenario(PROFILE_CPU, TRACE, tmp_path / "files", "smollm2-135m")
    for rate in ("0.15", "0.4", "1.2"):
        written = (tmp_path / "files" / f"serving_rate{rate}.csv").read_text().splitlines()[1:]
        committed = (WORKLOADS / f"smollm2_cpu_rate{rate}.csv").read_text().splitlines()[1:]
        assert written == committed  # past the comment line
    derived, shipped = load_serving_points(path), load_serving_points(root / "scenarios" / "serving_cpu.yaml")
    assert [(p.case, p.method) for p in derived] == [(p.case, p.method) for p in shipped]
    assert [p.workload.requests for p in derived] == [p.workload.requests for p in shipped]
    assert [p.plan.dtype_bytes for p in derived] == [4] * len(derived)  # fp32, as the profile was measured
    bf16 = tmp_path / "latency_smollm2-135m_cpu_bf16.csv"  # the same profile, as if measured in bf16
    bf16.write_text(PROFILE_CPU.read_text().replace('"dtype": "float32"', '"dtype": "bfloat16"', 1))
    (point, *_) = load_serving_points(derived_scenario(bf16, TRACE, tmp_path / "bf16", "smollm2-135m"))
    assert point.plan.dtype_bytes == 2
    monkeypatch.chdir(tmp_path)  # a relative output folder (`--out results/x.json`): the scenario still loads
    assert len(load_serving_points(derived_scenario(PROFILE_CPU, TRACE, Path("relative"), "smollm2-135m"))) == len(
        shipped
    )
    faster = dense(derived[0], 20.0)
    assert [r.arrival_s * 20.0 for r in faster.workload.requests] == pytest.approx(
        [r.arrival_s for r in derived[0].workload.requests]
    )
    host = tmp_path / "host.json"  # `--host` alone: the shipped scenario's files, each method's host work from it
    rows = [{"method": m, "batch": b, "host_ms_per_read": 0.5, "host_ms_per_pass": 0.25 + (m == "eesd")}
            for m in ("ar", "eesd") for b in (1, 4)]  # fmt: skip
    host.write_text(json.dumps({"format": "eesd.host_work", "schema_version": 2, "methods": rows, "metadata": {
        "model": "smollm2-135m", "device_type": "cpu", "capture": "none", "loop": "serve"}}))  # fmt: skip
    priced = load_serving_points(derived_scenario(None, None, tmp_path / "host", "smollm2-135m", host))
    assert [p.workload.requests for p in priced] == [p.workload.requests for p in shipped]
    for point in priced:
        figure = {"ar": 250.0, "eesd": 1250.0}.get(point.method)
        if figure is not None:
            assert point.plan.stages[0].latency.time_us("overhead", "verify", 1, 128, 1) == pytest.approx(figure)


def test_the_serving_benchmark_pins_a_thompson_policys_costs_for_the_executor() -> None:
    """serving_cpu.py hands the executor the simulator's round costs for a beta-ts case (as `eesd validate` does), so
    both weigh drafts alike; a fixed policy goes as it is."""
    import dataclasses
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from serving_cpu import serve_options
    finally:
        sys.path.remove(str(root / "benchmarks"))
    from sim.cost import round_costs
    from sim.policy import make_policy
    from sim.serving import load_serving_points

    point = next(p for p in load_serving_points(root / "scenarios" / "serving_cpu.yaml") if p.method == "eesd")
    assert serve_options(point)["policy"] == point.plan.policy == "fixed:1"
    plan = dataclasses.replace(point.plan, policy="beta-ts")
    plan = dataclasses.replace(plan, round_costs=round_costs(plan, 8))
    pinned = serve_options(dataclasses.replace(point, plan=plan))["policy"]
    assert pinned.startswith("beta-ts:costs=")
    assert make_policy(pinned).round_costs == pytest.approx(plan.round_costs, abs=5e-5)
    ppsd = next(p for p in load_serving_points(root / "scenarios" / "serving_cpu.yaml") if p.method == "ppsd")
    inside = dataclasses.replace(ppsd.plan, exit_layer=8)  # drafting inside a balanced stage 1, as the simulator may
    options = serve_options(dataclasses.replace(ppsd, plan=inside))
    assert (options["stages"], options["stage_boundaries"], options["exit_layer"]) == (2, [15], 8)


def test_serve_benchs_table_shows_replicas_and_saturation_where_a_row_has_them() -> None:
    from executor.serve_cli import COLUMNS, table

    base = {column: 1.0 for column in COLUMNS}
    both = table([{**base, "method": "ar", "replicas": 2, "saturated": True}, {**base, "method": "eesd"}])
    head = both.splitlines()[0].split()
    assert head[:2] == ["method", "replicas"] and head[-1] == "saturated"
    assert "replicas" not in table([{**base, "method": "ar", "saturated": False}])
