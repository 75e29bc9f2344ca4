"""A replayed request ends at its text's EOS, as the executor's row does (`acceptance.at_eos: stop`, the default).

The unit tests pin `TraceAcceptance.output_len` on a hand-written trace; the end-to-end test records a trace of a
tiny model with an EOS id it emits, runs the executor on the same prompts, and holds the simulator's replay of that
trace to the executor's tokens, rounds and drafts, run for run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from calibrate.acceptance import trace_prompts, trace_records
from executor.adapter import ModelAdapter
from executor.api import generate
from sim.acceptance import TraceAcceptance
from sim.formats import AcceptanceRecord, read_acceptance_trace, write_acceptance_trace
from sim.runner import run_points
from sim.scenario import ScenarioError, load_points
from tests.test_sim_models import profile_file
from tests.tiny_models import TinySpec, scale_late_layers, tiny_model

EOS = 2


def hand_trace(tmp_path: Path, metadata: dict | None = None) -> Path:
    """Three prompts at exit layer 4: a ends at EOS after 5 tokens, b stops at 8 without one (max_new_tokens), c
    ends at EOS after 3; every draft matches."""
    texts = {"a": [7, 8, 9, 10, EOS], "b": [11, 12, 13, 14, 15, 16, 17, 18], "c": [19, 20, EOS]}
    records = [
        AcceptanceRecord(prompt, position, token, 4, True, 0.9)
        for prompt, tokens in texts.items()
        for position, token in enumerate(tokens)
    ]
    meta = {"model": "SmolLM2-135M", "head": "trained", "eos_token_ids": [EOS]} if metadata is None else metadata
    return write_acceptance_trace(tmp_path / "trace.csv", meta, records)


def test_a_request_ends_at_the_first_eos_its_replay_reaches(tmp_path: Path) -> None:
    trace = read_acceptance_trace(hand_trace(tmp_path))
    replay = TraceAcceptance(trace, exit_layer=4)
    assert replay.ended == 2
    # a: its own EOS; b: no EOS of its own, so it replays on into c and ends at c's; c: its own; a again (cyclic)
    assert [replay.output_len(r, 100) for r in range(4)] == [5, 11, 3, 5]
    assert [replay.output_len(r, 4) for r in range(4)] == [4, 4, 3, 4]  # never more than asked
    assert [TraceAcceptance(trace, 4, stop_at_eos=False).output_len(r, 100) for r in range(3)] == [100] * 3
    # what a workload replays counts the tokens up to each EOS: 5 + 8 + 3 = the 16 the trace holds, then one more
    assert replay.reuse(3, 8) is None
    assert replay.reuse(3, 9) == (
        "the trace holds 16 tokens at exit_layer 4 (3 prompts); the workload replays requests x output_len = 3 x 9 = "
        "27 (17 up to their EOS)"
    )


def test_a_trace_without_eos_ids_replays_every_request_in_full(tmp_path: Path) -> None:
    trace = read_acceptance_trace(hand_trace(tmp_path, {"model": "SmolLM2-135M", "head": "trained"}))
    replay = TraceAcceptance(trace, exit_layer=4)
    assert replay.ended == 0 and [replay.output_len(r, 100) for r in range(3)] == [100] * 3


def scenario(tmp_path: Path, trace: Path, method: str, requests: int, output_len: int, **extra) -> Path:
    data = {
        "name": "eos",
        "model": "SmolLM2-135M",
        "method": method,
        "exit_layer": extra.pop("exit_layer", 4),
        "policy": extra.pop("policy", "fixed:3"),
        "latency": extra.pop("latency", {"constant_us": {"layer": 100.0, "lm_head": 50.0}}),
        "acceptance": {"trace": str(trace), "reuse": "cycle", **extra.pop("acceptance", {})},
        "topology": {"stages": extra.pop("stages", 1)},
        "workload": {"requests": requests, "batch_size": extra.pop("batch_size", 1), "prompt_len": 16,
                     "output_len": output_len},
        **extra,
    }  # fmt: skip
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("method", ["ar", "eesd", "ppsd"])
def test_the_simulator_stops_each_request_at_its_eos(tmp_path: Path, method: str) -> None:
    """Three requests asking for 9 tokens generate 5, 9 and 3 (8 decoded tokens fewer than asked); with
    `acceptance.at_eos: continue` all 27, as before. With a host read after every step the stopped run is shorter;
    AR's blocks of 8 chained steps reach for the tokens asked, as the executor's do, so its time stays."""
    trace = hand_trace(tmp_path)
    stages = 2 if method == "ppsd" else 1
    times = {}
    for sync_every in (1, 8):
        given = {"stages": stages, "sync_every": sync_every}
        (stop,) = run_points(load_points(scenario(tmp_path, trace, method, 3, 9, **given)), progress=False)
        assert stop.result.decode_tokens == (5 - 1) + (9 - 1) + (3 - 1)
        assert any("2 of 3 requests end at their trace's EOS" in note for note in stop.notes)
        on = {"acceptance": {"at_eos": "continue"}, **given}
        (full,) = run_points(load_points(scenario(tmp_path, trace, method, 3, 9, **on)), progress=False)
        assert full.result.decode_tokens == 3 * 8 and not any("EOS" in note for note in full.notes)
        times[sync_every] = stop.result.decode_time_us, full.result.decode_time_us
    assert times[1][0] < times[1][1]
    assert (times[8][0] == times[8][1]) == (method == "ar")


def test_at_eos_needs_a_trace(tmp_path: Path) -> None:
    path = scenario(tmp_path, hand_trace(tmp_path), "eesd", 1, 9, acceptance={"at_eos": "continue"})
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["acceptance"] = {"alpha": 0.5, "at_eos": "continue"}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ScenarioError, match="at_eos only applies with trace"):
        load_points(path)


def test_a_batch_keeps_its_width_after_a_row_ends(tmp_path: Path) -> None:
    """As the executor's: a row that ended runs on, parked, in every step of its batch, so a batch of a 3-token and a
    9-token request takes as long as two 9-token requests (AR, one step per token); the tokens are 2 + 8."""
    trace = hand_trace(tmp_path)
    profile_file(tmp_path)  # a layer costs 3 µs more at batch 2 than at batch 1
    both = {"batch_size": 2, "sync_every": 1, "latency": {"profile": {"path": str(tmp_path / "profile.csv")}}}
    (stop,) = run_points(load_points(scenario(tmp_path, trace, "ar", 2, 9, **both)), progress=False)
    on = {"acceptance": {"at_eos": "continue"}, **both}
    (full,) = run_points(load_points(scenario(tmp_path, trace, "ar", 2, 9, **on)), progress=False)
    # requests 0 (a: 5 tokens) and 1 (b then c: 9 asked, 11 up to EOS)
    assert stop.result.decode_tokens == 4 + 8 and full.result.decode_tokens == 16
    assert stop.result.decode_time_us == pytest.approx(full.result.decode_time_us)
    # and not as long as it would be were the ended row dropped from the batch: the last 4 steps at batch 1
    assert stop.result.decode_time_us > full.result.decode_time_us - 4 * 30 * 3 / 2


# ---- against the executor ------------------------------------------------------------------------------------------
def tiny_eos_traces(eos: list[int], max_new_tokens: int):
    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=61, seed=3)), 1, 0.5)
    adapter = ModelAdapter(model)
    generator = torch.Generator().manual_seed(0)
    prompts = [(f"p{i}", torch.randint(1, 61, (3 + 2 * i,), generator=generator).tolist()) for i in range(6)]
    return adapter, trace_prompts(adapter, prompts, (2,), "shared", max_new_tokens, eos=eos)


def pick_eos() -> int:
    """A token the tiny model emits in the middle of some generations and never in others."""
    _, traces = tiny_eos_traces(eos=[], max_new_tokens=24)
    counts: dict[int, int] = {}
    for trace in traces:
        for token in set(trace.tokens[3:20]):
            counts[token] = counts.get(token, 0) + 1
    return min(counts, key=lambda token: (abs(counts[token] - 3), token))


@pytest.mark.parametrize("draft_len", [2, 4])
def test_the_replay_matches_the_executor_run_for_run_with_eos(tmp_path: Path, draft_len: int) -> None:
    """Each prompt alone: the executor's EESD (greedy, fixed k, EOS on) and the simulator's replay of the trace
    recorded with that EOS agree on the tokens, the rounds and the drafts. The executor's last round still drafts
    toward max_new_tokens (it learns of the EOS when it emits it), and so does the simulator's."""
    eos, asked = pick_eos(), 24
    adapter, traces = tiny_eos_traces([eos], asked)
    ended = [t for t in traces if t.tokens and t.tokens[-1] == eos and len(t.tokens) < asked]
    assert ended and len(ended) < len(traces)  # some stop early, some run to max_new_tokens
    meta = {"model": "SmolLM2-135M", "head": "shared", "eos_token_ids": [eos]}
    path = write_acceptance_trace(tmp_path / "tiny.csv", meta, trace_records(traces))
    for request, trace in enumerate(sorted(traces, key=lambda t: t.prompt_id)):
        result = generate(
            adapter, list(trace.prompt), method="eesd", exit_layer=2, draft_len=draft_len, max_new_tokens=asked,
            eos_token_id=[eos], head="shared",
        )  # fmt: skip
        stats = result.stats
        extra = {"exit_layer": 2, "policy": f"fixed:{draft_len}"}
        sim_path = scenario(tmp_path, path, "eesd", request + 1, asked, **extra)
        (point,) = run_points(load_points(sim_path), progress=False)
        # request r alone: the run of r + 1 requests minus the run of r
        if request:
            (before,) = run_points(load_points(scenario(tmp_path, path, "eesd", request, asked, **extra)),
                                   progress=False)  # fmt: skip
        else:
            before = None
        got = {k: getattr(point.result, k) - (getattr(before.result, k) if before else 0)
               for k in ("decode_tokens", "rounds", "drafted")}  # fmt: skip
        want = {"decode_tokens": stats.new_tokens - 1, "rounds": len(stats.drafted), "drafted": sum(stats.drafted)}
        assert got == want, (trace.prompt_id, got, want)


@pytest.mark.parametrize("stages", [2, 3])
def test_the_replay_counts_the_executors_ppsd_ticks_with_eos(tmp_path: Path, stages: int) -> None:
    """PPSD (sequential backend, a host read every tick), each prompt alone: the executor's ticks, checked and
    confirmed drafts and tokens equal the simulator's replay of the trace recorded with that EOS (the pipe stops when
    the EOS leaves; the draft of the EOS's own position, made before anyone knew, is judged then)."""
    eos, asked = pick_eos(), 24
    adapter, traces = tiny_eos_traces([eos], asked)
    meta = {"model": "SmolLM2-135M", "head": "shared", "eos_token_ids": [eos]}
    path = write_acceptance_trace(tmp_path / "tiny.csv", meta, trace_records(traces))
    extra = {"exit_layer": 2, "stages": stages, "ppsd_backend": "sequential", "sync_every": 1}
    totals = {"decode_tokens": 0, "ticks": 0, "drafted": 0, "accepted": 0}
    for trace in sorted(traces, key=lambda t: t.prompt_id):
        result = generate(
            adapter, list(trace.prompt), method="ppsd", exit_layer=2, stages=stages,
            stage_boundaries=[2] + ([3] if stages == 3 else []), max_new_tokens=asked, eos_token_id=[eos],
            head="shared", sync_every=1,
        )  # fmt: skip
        stats = result.stats
        totals["decode_tokens"] += stats.decoded_tokens
        totals["ticks"] += stats.ticks
        totals["drafted"] += stats.confirms + stats.flushes
        totals["accepted"] += stats.confirms
    (point,) = run_points(load_points(scenario(tmp_path, path, "ppsd", len(traces), asked, **extra)), progress=False)
    got = {key: getattr(point.result, key) for key in totals}
    assert got == totals


def test_the_distributed_ranks_read_every_ticks_outcome_so_no_tick_runs_past_an_eos(tmp_path: Path) -> None:
    """The executor's distributed ranks judge every tick and stop at the outcome that ends the row: `sync_every`
    (one host's reads, after which a block's unread ticks run on past an EOS) does not apply to them."""
    trace = hand_trace(tmp_path)
    found = {}
    for backend in ("distributed", "sequential"):
        for every in (1, 8):
            path = scenario(tmp_path, trace, "ppsd", 3, 9, stages=2, sync_every=every, ppsd_backend=backend)
            (item,) = run_points(load_points(path), progress=False)
            found[backend, every] = (item.result.ticks, item.result.decode_time_us)
    assert found["distributed", 1] == found["distributed", 8]
    assert found["sequential", 8][0] > found["sequential", 1][0]  # one host: the block's unread ticks after the EOS


def test_a_traced_run_marks_the_unread_ticks_past_an_eos_as_thrown_away(tmp_path: Path) -> None:
    from sim.engine import Simulation
    from sim.plan import build_plan

    trace = hand_trace(tmp_path)
    wasted = {}
    for every in (1, 8):
        (point,) = load_points(scenario(tmp_path, trace, "ppsd", 3, 9, stages=2, sync_every=every,
                                        ppsd_backend="sequential"))  # fmt: skip
        simulation = Simulation(build_plan(point), trace_limit=10_000)
        simulation.run()
        wasted[every] = sum(e["args"]["flushed"] for e in simulation.trace if e["tid"] < 2)
    assert wasted[8] > wasted[1]  # the block's ticks after each EOS: 8 more ticks in all (25 against 17)
