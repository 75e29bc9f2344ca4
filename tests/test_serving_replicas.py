"""The executor's replicas (executor.replicas): worker processes, each a whole server, and a dispatcher on the wall
clock. Every request's tokens are those it gets alone with AR; the records and logged passes name their replica; the
dispatch follows the simulator's rule; a worker's failure comes back with its traceback; bad inputs are refused
before any process starts."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import TinySpec, scale_late_layers, tiny_model

from executor.api import generate
from executor.replicas import serve_replicas
from sim.serving import metrics
from sim.workload import Request, ServingWorkload

VOCAB = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("replicas") / "tiny"
    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=VOCAB, seed=3), torch.float32), 2, 0.1)
    model.save_pretrained(path)
    return path, model


def alone(model, prompt, new_tokens, **sampling) -> list[int]:
    result = generate(model, prompt, method="ar", max_new_tokens=new_tokens, **sampling)
    return result.sequences[0, len(prompt) :].tolist()


def requests(count: int, gap_s: float, users: int | None = None) -> tuple[ServingWorkload, list[list[int]]]:
    rng = random.Random(count)
    found = tuple(
        Request(i, 3 + i % 5, 3 + (7 * i) % 9, None if users else gap_s * i, 0.002 if users else 0.0)
        for i in range(count)
    )
    prompts = [[rng.randrange(VOCAB) for _ in range(r.prompt_len)] for r in found]
    return ServingWorkload(found, users=users), prompts


@pytest.mark.parametrize(
    ("method", "dispatch", "batch", "batching"),
    [("ar", "round_robin", 2, None), ("eesd", "least_loaded", 2, None), ("ppsd", "least_tokens", 1, "static"),
     ("ppsd", "least_loaded", 3, "static"), ("ppsd", "round_robin", 3, "continuous")],
)  # fmt: skip
def test_replicas_serve_every_request_as_ar_alone(model_dir, method, dispatch, batch, batching):
    path, model = model_dir
    workload, prompts = requests(14, 0.0005)  # arrivals that overlap: every rule uses both replicas
    options = {"stages": 2, "ppsd_batching": batching} if method == "ppsd" else {"exit_layer": 2, "policy": "fixed:2"}
    options["max_batch"] = batch  # PPSD's lockstep batches (static or joined at reads), AR's and EESD's slots
    outcome = serve_replicas(path, workload, prompts, replicas=2, dispatch=dispatch, method=method, **options)
    for request, prompt, output in zip(workload.requests, prompts, outcome.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len), request
    result = outcome.result
    assert result.replicas == 2 and result.tokens == sum(r.output_len for r in workload.requests)
    for record, request in zip(result.records, workload.requests, strict=True):
        assert record.index == request.index and record.arrival_s == pytest.approx(request.arrival_s)
        assert record.arrival_s <= record.start_s < record.first_token_s <= record.finish_s <= result.time_s
    replicas = [r.replica for r in result.records]
    if dispatch == "round_robin":
        assert replicas == [i % 2 for i in range(14)]
    assert all(sent >= record.arrival_s for record, sent in zip(result.records, outcome.dispatched_s, strict=True))
    assert set(replicas) == {0, 1} and {log.replica for log in result.passes} == {0, 1}
    widest = max(log.batch for log in result.passes)
    assert widest <= batch and (method != "ppsd" or batch == 1 or widest > 1)  # PPSD's queue fills its batches
    for replica in (0, 1):  # each replica's passes one after another, on its own clock
        logs = sorted((log for log in result.passes if log.replica == replica), key=lambda log: log.start_s)
        assert all(a.start_s + a.seconds <= b.start_s + 1e-6 for a, b in zip(logs, logs[1:], strict=False))
    row = metrics(result)
    assert 0 < row["busy_pct"] <= 100 and row["mean_in_system"] == pytest.approx(row["little_lambda_w"])


@pytest.mark.parametrize("dispatch", ["least_loaded", "least_tokens", "round_robin"])
def test_the_dispatcher_counts_each_request_until_its_worker_reports_it_finished(dispatch):
    """The dispatcher's books, driven by hand (no processes): a request counts against its replica from dispatch
    until the worker's "finished" arrives, and each arrival goes where `sim.serving.pick_replica` says for those
    books; a closed loop's next request is scheduled at the finish time plus its think time."""
    import queue

    from executor.replicas import ReplicaLink, _Dispatcher
    from sim.serving import kv_tokens, pick_replica

    lengths = [(30, 2), (4, 2), (4, 2), (4, 2), (4, 2), (4, 2)]  # request 0 holds far more KV than the others
    workload = ServingWorkload(tuple(Request(i, p, o, 0.0) for i, (p, o) in enumerate(lengths)))
    links = [ReplicaLink(i, queue.Queue(), None) for i in range(2)]
    dispatcher = _Dispatcher(workload, dispatch, links, {"method": "ar"})
    kv, expected_loads, expected_tokens, sent = kv_tokens("ar", 0), [0, 0], [0, 0], 0

    def send(index):
        nonlocal sent
        replica = pick_replica(dispatch, expected_loads, expected_tokens, sent)
        dispatcher._send(0.0, index, workload.requests[index])
        assert links[replica].inbox.get_nowait()[1].index == index  # it went where the rule says
        expected_loads[replica] += 1
        expected_tokens[replica] += kv(workload.requests[index])
        sent += 1
        return replica

    where = {i: send(i) for i in range(3)}
    for index in (1, 0):  # reports arrive; the books drop those requests
        dispatcher._receive(("finished", where[index], index, 0.01))
        expected_loads[where[index]] -= 1
        expected_tokens[where[index]] -= kv(workload.requests[index])
        assert (dispatcher.loads, dispatcher.tokens) == (expected_loads, expected_tokens)
        where[index + 3] = send(index + 3)
    assert dispatcher.finished == 2
    if dispatch == "least_loaded":
        assert [where[i] for i in range(5)] == [0, 1, 0, 0, 1]
    elif dispatch == "least_tokens":
        assert [where[i] for i in range(5)] == [0, 1, 1, 0, 1]  # request 0 outweighs two others


def test_a_closed_loop_with_exact_sampling_on_least_tokens(model_dir):
    """Closed-loop users get their next request after their last one finished, whichever replica served it; exact
    sampling keys each token by (seed, position), so a request samples what it samples alone."""
    path, model = model_dir
    workload, prompts = requests(9, 0.0, users=3)
    sampling = {"do_sample": True, "temperature": 0.8, "top_k": 20, "seed": 7}
    from executor.sampling import SamplingConfig

    outcome = serve_replicas(path, workload, prompts, replicas=2, dispatch="least_tokens", method="eesd", exit_layer=2,
                             policy="fixed:1", max_batch=2, sampling=SamplingConfig(**sampling))  # fmt: skip
    for request, prompt, output in zip(workload.requests, prompts, outcome.outputs, strict=True):
        assert output == alone(model, prompt, request.output_len, **sampling), request
    records = outcome.result.records
    in_flight = max(sum(1 for r in records if r.arrival_s <= t < r.finish_s) for t in [r.arrival_s for r in records])
    assert in_flight <= 3


def test_a_workers_mistake_comes_back_as_one_line_of_its_class(model_dir, tmp_path):
    """A missing head file, found in the workers: FileNotFoundError naming the replica (a crash comes back with its
    traceback: `_raise_failure`)."""
    path, _ = model_dir
    workload, prompts = requests(2, 0.0)
    with pytest.raises(FileNotFoundError, match=r"^replica \d: exit head file .*no-such-head.safetensors does not"):
        serve_replicas(path, workload, prompts, replicas=2, method="eesd", exit_layer=2,
                       head=str(tmp_path / "no-such-head.safetensors"))  # fmt: skip


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("object", {}, "serve_replicas loads the model in each worker"),
        ("path", {"replicas": 0}, "replicas must be an integer >= 1"),
        ("path", {"dispatch": "random"}, "dispatch must be one of least_loaded, least_tokens, round_robin"),
        ("path", {"clock": lambda: 0.0}, "clock is not an option"),
        ("path", {"device": ["cpu", "cpu", "cpu"]}, "device: one for every replica or one for all, got 3 for 2"),
    ],
)
def test_bad_replica_inputs_refused_before_any_worker_starts(model_dir, model, options, message):
    path, tiny = model_dir
    workload, prompts = requests(2, 0.0)
    options = {"replicas": 2, **options}
    with pytest.raises(ValueError, match=message):
        serve_replicas(tiny if model == "object" else path, workload, prompts, **options)


def test_serve_bench_on_replicas(model_dir, tmp_path, capsys):
    """`eesd serve-bench --replicas 2`: every request as AR alone (`--compare-ar`), the rows and logged passes naming
    their replicas."""
    import json

    from executor.cli import main as eesd

    path, _ = model_dir
    (tmp_path / "w.yaml").write_text(
        "requests: 8\nseed: 2\narrival: {process: poisson, rate_per_s: 300}\nprompt_len: {dist: uniform, low: 2, "
        "high: 6}\noutput_len: 5\n"
    )
    out = tmp_path / "serve.json"
    argv = ["serve-bench", "--workload", str(tmp_path / "w.yaml"), "--model", str(path), "--methods", "ar,eesd",
            "--exit-layer", "2", "--max-batch", "2", "--replicas", "2", "--dispatch", "round_robin", "--compare-ar",
            "--json", str(out), "--threads", "1", "--device", "cpu,cpu"]  # fmt: skip
    assert eesd(argv) == 0
    capsys.readouterr()
    document = json.loads(out.read_text())
    assert all(r["identical_to_ar"] and r["replicas"] == 2 and r["tokens"] == 40 for r in document["rows"])
    for logs in document["passes"].values():
        assert {log["replica"] for log in logs} == {0, 1}
    assert eesd([*argv[:5], "--replicas", "0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err
    assert eesd([*argv[:5], "--replicas", "2", "--device", "cpu,cpu,cpu"]) == 2
    assert "--device: one device, or one per replica (2)" in capsys.readouterr().err


def test_a_workers_mistake_is_raised_as_one_line_naming_the_replica():
    from executor.replicas import _raise_failure

    with pytest.raises(ValueError, match=r"^replica 1: exit_layer must be an integer in \[1, 29\]$"):
        _raise_failure(("mistake", 1, "ValueError", "exit_layer must be an integer in [1, 29]"))
    with pytest.raises(FileNotFoundError, match="^replica 0: exit head file h.safetensors does not exist$"):
        _raise_failure(("mistake", 0, "FileNotFoundError", "exit head file h.safetensors does not exist"))
    with pytest.raises(RuntimeError, match="replica 2 failed:\nTraceback"):
        _raise_failure(("error", 2, "Traceback (most recent call last): ..."))
    _raise_failure(("finished", 0, 3, 1.0))  # not a failure: nothing raised
