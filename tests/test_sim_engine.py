"""Simulator engine: analytic agreement (EESD, PPSD, AR) and hypothesis properties."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scripted_policy import ScriptedPolicy

from sim.acceptance import AcceptanceModel, AcceptanceStream, BernoulliAcceptance, PositionalAcceptance
from sim.cost import Pass, stage_time_us
from sim.engine import BatchRow, RunResult, Simulation, decode_rows, events_per_token
from sim.hardware import LINKS, LinkSpec
from sim.latency import ConstantLatency
from sim.models import ModelConfig
from sim.plan import SimPlan, SimStage, Workload

MODEL = ModelConfig("toy-24", 24, 64, 4, 4, 128, 100)
FREE = LINKS["ideal"]


def plan(
    method: str,
    alpha: float,
    n_stages: int = 1,
    *,
    draft_len: int = 4,
    exit_layer: int | None = None,
    output_len: int = 2000,
    layer_us: float | list[float] = 10.0,
    head_us: float = 0.0,
    link: LinkSpec = FREE,
    seed: int = 0,
    batch: int = 1,
    policy: str | None = None,
    ppsd_backend: str = "free",
) -> SimPlan:
    """A plan of constant latencies over `n_stages` stages, PPSD on the free-running pipe unless `ppsd_backend`
    names another (the closed forms here are the free pipe's; `distributed` is the executor's lockstep)."""
    bounds = [round(i * MODEL.num_layers / n_stages) for i in range(n_stages + 1)]
    layer = layer_us if isinstance(layer_us, list) else [layer_us] * n_stages
    stages = tuple(
        SimStage(bounds[i], bounds[i + 1], ConstantLatency({"layer": layer[i], "lm_head": head_us}))
        for i in range(n_stages)
    )
    return SimPlan(
        MODEL,
        stages,
        link,
        method,
        BernoulliAcceptance(alpha),
        Workload(batch, batch, 16, output_len),
        exit_layer=exit_layer or bounds[1],
        policy=policy or f"fixed:{draft_len}",
        seed=seed,
        ppsd_backend=ppsd_backend,
    )


def per_token_us(result: RunResult) -> float:
    return result.decode_time_us / result.decode_tokens


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("draft_len", [1, 3, 6])
def test_eesd_tokens_per_round_match_leviathan(alpha: float, draft_len: int) -> None:
    expected = (1 - alpha ** (draft_len + 1)) / (1 - alpha)
    rounds = 6000  # relative standard error of the mean <= 0.7% for every case here
    result = Simulation(plan("eesd", alpha, draft_len=draft_len, exit_layer=6, output_len=int(rounds * expected))).run()
    assert result.tokens_per_round == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 0.9])
@pytest.mark.parametrize("n_stages", [2, 3, 4, 8])
def test_balanced_ppsd_speedup_matches_ideal(alpha: float, n_stages: int) -> None:
    ideal = n_stages / (alpha + (1 - alpha) * n_stages)
    ar = Simulation(plan("ar", alpha, n_stages, output_len=3000)).run()
    ppsd = Simulation(plan("ppsd", alpha, n_stages, output_len=3000)).run()
    assert per_token_us(ar) / per_token_us(ppsd) == pytest.approx(ideal, rel=0.03)


@pytest.mark.parametrize("layer_us", [[10.0], [3.0, 7.0], [1.0, 2.0, 4.0, 8.0]])
def test_ar_time_is_tokens_times_sum_of_stage_latencies(layer_us: list[float]) -> None:
    p = plan("ar", 0.5, len(layer_us), layer_us=layer_us, head_us=5.0, output_len=50)
    decode = Pass("decode", "verify", ((0, MODEL.num_layers, 1),), lm_head_q=1)
    stage_sum = sum(stage_time_us(p, s, decode, 0, 1) for s in p.stages)
    result = Simulation(p).run()
    assert result.decode_tokens == 49
    assert result.decode_time_us == pytest.approx(49 * stage_sum, rel=1e-12)
    assert stage_sum == pytest.approx(sum(layer_us[i] * (24 // len(layer_us)) for i in range(len(layer_us))) + 5.0)


@pytest.mark.parametrize(("exit_head", "fraction"), [("shared", 1.0), ("shared:25", 0.25), ("shared:100", 1.0)])
def test_a_subset_head_costs_its_share_of_the_lm_head(exit_head: str, fraction: float) -> None:
    base = plan("eesd", 0.5, exit_layer=6, head_us=40.0)
    p = SimPlan(**{**base.__dict__, "exit_head": exit_head})
    draft = Pass("draft", "draft", ((0, 6, 1),), exit_at=6)
    assert stage_time_us(p, p.stages[0], draft, 16, 1) == pytest.approx(6 * 10.0 + 40.0 * fraction)
    verify = Pass("verify", "verify", ((6, 24, 2),), lm_head_q=2)  # verification always scores the whole vocabulary
    assert stage_time_us(p, p.stages[0], verify, 16, 1) == pytest.approx(18 * 10.0 + 40.0)
    with pytest.raises(ValueError, match="shared:N or trained:N with 1 <= N <= 100"):
        Simulation(SimPlan(**{**base.__dict__, "exit_head": "shared:101"}))


@pytest.mark.parametrize(("exit_head", "fraction"), [("trained", 1.0), ("trained:25", 0.25), ("trained:100", 1.0)])
def test_a_trained_head_over_a_draft_vocabulary_saves_its_share_of_the_lm_head(exit_head: str, fraction: float) -> None:
    """`trained:N`: the head's layer and norm as `trained` (the profile's `exit_head` holds them and the whole LM
    head), less the LM head's share of the V - N ids it does not score; its layer still runs in every verify pass."""
    base = plan("eesd", 0.5, exit_layer=6, head_us=40.0)
    stage = SimStage(0, 24, ConstantLatency({"layer": 10.0, "lm_head": 40.0, "exit_head": 55.0}))
    p = SimPlan(**{**base.__dict__, "stages": (stage,), "exit_head": exit_head})
    draft = Pass("draft", "draft", ((0, 6, 1),), exit_at=6)
    assert stage_time_us(p, stage, draft, 16, 1) == pytest.approx(6 * 10.0 + 55.0 - 40.0 * (1 - fraction))
    assert p.head_layer_at == 6 and p.prefill_head_layer_at == 6
    with pytest.raises(ValueError, match="trained:N with 1 <= N <= 100"):
        Simulation(SimPlan(**{**p.__dict__, "exit_head": "trained:101"}))


def test_links_add_their_latency_to_ar() -> None:
    link = LinkSpec("slow", 100.0, None)
    free = Simulation(plan("ar", 0.5, 4, output_len=11)).run()
    slow = Simulation(plan("ar", 0.5, 4, output_len=11, link=link)).run()
    # 3 hops forward + the token id back to stage 1, per token
    assert slow.decode_time_us - free.decode_time_us == pytest.approx(10 * 4 * 100.0)


def test_ppsd_with_slow_stage_shows_bubbles_and_flushed_work() -> None:
    result = Simulation(plan("ppsd", 0.95, 4, layer_us=[10.0, 10.0, 30.0, 10.0], output_len=400)).run()
    busy = [s.busy_us / result.total_time_us for s in result.stages]
    assert busy[2] > 0.85 and max(busy[0], busy[1], busy[3]) < 0.5
    assert result.flushes > 0 and any(s.busy_us > s.useful_us for s in result.stages)


def test_positional_alphas_front_loaded() -> None:
    p = plan("eesd", 0.0, draft_len=3, exit_layer=6, output_len=6000)
    positional = SimPlan(**{**p.__dict__, "acceptance": PositionalAcceptance((0.9, 0.5, 0.1))})
    result = Simulation(positional).run()
    # P(accept >= 1) = 0.9, >= 2: 0.45, 3: 0.045 -> 1 + 0.9 + 0.45 + 0.045 tokens per round
    assert result.tokens_per_round == pytest.approx(2.395, rel=0.03)


def test_batched_eesd_runs_rows_to_their_own_lengths() -> None:
    result = Simulation(plan("eesd", 0.7, draft_len=3, exit_layer=6, output_len=64, batch=3)).run()
    assert result.tokens == 3 * 64 and result.decode_tokens == 3 * 63


def test_beta_ts_runs_in_the_simulator() -> None:
    p = plan("eesd", 0.9, exit_layer=3, output_len=3000, policy="beta-ts:cost=0.125,max=8")
    result = Simulation(p).run()
    assert result.tokens_per_round > 3.5


alphas = st.floats(0.0, 0.95)


@given(alpha=alphas, delta=st.floats(0.01, 0.3), method=st.sampled_from(["eesd", "ppsd"]), seed=st.integers(0, 99))
def test_speedup_non_decreasing_in_alpha(alpha: float, delta: float, method: str, seed: int) -> None:
    n = 1 if method == "eesd" else 4
    low = Simulation(plan(method, alpha, n, exit_layer=6 if n == 1 else None, output_len=300, seed=seed)).run()
    high = Simulation(
        plan(method, min(alpha + delta, 1.0), n, exit_layer=6 if n == 1 else None, output_len=300, seed=seed)
    ).run()
    assert high.decode_time_us <= low.decode_time_us + 1e-6


@given(
    alpha=st.floats(0.0, 1.0),
    layer_us=st.lists(st.floats(0.5, 50.0), min_size=2, max_size=6),
    window=st.one_of(st.none(), st.integers(1, 8)),
    seed=st.integers(0, 99),
)
def test_ppsd_never_slower_than_ar_with_free_links(
    alpha: float, layer_us: list[float], window: int | None, seed: int
) -> None:
    p = plan("ppsd", alpha, len(layer_us), layer_us=layer_us, output_len=200, seed=seed)
    p = SimPlan(**{**p.__dict__, "max_in_flight": window})
    ar = Simulation(SimPlan(**{**p.__dict__, "method": "ar"})).run()
    ppsd = Simulation(p).run()
    assert ppsd.decode_time_us <= ar.decode_time_us * (1 + 1e-9)


@given(
    method=st.sampled_from(["ar", "eesd", "ppsd"]),
    alpha=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
    batch=st.integers(1, 3),
    policy=st.sampled_from(["fixed:2", "heuristic", "beta-ts", "calibration-ts"]),
)
def test_same_seed_same_result(method: str, alpha: float, seed: int, batch: int, policy: str) -> None:
    n = 1 if method == "eesd" else 3
    kwargs = dict(exit_layer=6 if n == 1 else None, output_len=60, seed=seed, batch=batch, policy=policy)
    p = plan(method, alpha, n, **kwargs)
    if policy == "calibration-ts":
        p = SimPlan(**{**p.__dict__, "acceptance": BernoulliAcceptance(alpha, confidence_sharpness=4.0)})
    assert Simulation(p).run() == Simulation(p).run()


@pytest.mark.parametrize(("captured", "sync_every"), [(False, 8), (True, 8), (True, 3)])
def test_host_overhead_is_paid_per_host_read_when_captured(captured: bool, sync_every: int) -> None:
    """Uncaptured, every pass pays the host `overhead`; captured in CUDA graphs only a pass after which the executor's
    host reads the device: every sync_every-th AR step (and the last), each EESD verify pass (draft steps chain
    on the device for a policy that ignores confidences)."""
    layer_us, overhead_us, output_len = 10.0, 100.0, 41
    latency = ConstantLatency({"layer": layer_us, "overhead": overhead_us}, cuda_graphs=captured)
    runs = {}
    for method in ("ar", "eesd"):
        base = plan(method, 0.0, draft_len=2, exit_layer=6, output_len=output_len)
        stages = (SimStage(0, 24, latency),)
        runs[method] = Simulation(SimPlan(**{**base.__dict__, "stages": stages, "sync_every": sync_every})).run()
    steps = output_len - 1  # decode passes after the prefill's token
    ar_reads = -(-steps // sync_every) if captured else steps
    assert runs["ar"].decode_time_us == pytest.approx(steps * 24 * layer_us + ar_reads * overhead_us)
    eesd = runs["eesd"]  # alpha 0: each round drafts up to 2 tokens (6 layers each), verifies (24 layers), emits 1
    layers_us = eesd.drafted * 6 * layer_us + eesd.rounds * 24 * layer_us
    reads = eesd.rounds if captured else eesd.rounds + eesd.drafted
    assert eesd.drafted > eesd.rounds > 0
    assert eesd.decode_time_us == pytest.approx(layers_us + reads * overhead_us)


def test_the_simulated_sync_defaults_to_the_contract() -> None:
    """A scenario without `sync_every` reads the device as the executor does by default
    (`executor.passes.resolve_sync_every`): every SYNC_CAPTURED steps or ticks captured, every one uncaptured or
    frozen; one that gives it is taken at its word."""
    from sim.contract import SYNC_CAPTURED
    from sim.plan import scenario_sync_every
    from sim.scenario import Scenario

    assert SimPlan.sync_every == SYNC_CAPTURED and Scenario.model_fields["sync_every"].default is None
    base = {"name": "s", "model": "SmolLM2-135M", "method": "ar", "acceptance": {"alpha": 0.5}}
    latencies = {True: {"roofline": {}}, False: {"roofline": {"cuda_graphs": False}}}
    for captured, latency in latencies.items():
        assert scenario_sync_every(Scenario(**base, latency=latency)) == (SYNC_CAPTURED if captured else 1)
        assert scenario_sync_every(Scenario(**base, latency=latency, sync_every=3)) == 3
    assert scenario_sync_every(Scenario(**base, latency={"constant_us": {"layer": 1.0}})) == 1
    profile = {"profile": {"path": "p.csv", "cuda_graphs": False}}
    assert scenario_sync_every(Scenario(**base, latency=profile)) == 1


def ppsd_decode_us(captured: bool, overhead_us: float, **fields: object) -> float:
    """Decode time of a 2-stage PPSD at alpha 1 (no flushes: one tick per token after the first, 40 ticks)."""
    base = plan("ppsd", 1.0, 2, output_len=41)
    latency = ConstantLatency({"layer": 10.0, "overhead": overhead_us}, cuda_graphs=captured)
    stages = (SimStage(0, 12, latency), SimStage(12, 24, latency))
    return Simulation(SimPlan(**{**base.__dict__, "stages": stages, **fields})).run().decode_time_us


@pytest.mark.parametrize("sync_every", [1, 4, 8])
def test_one_host_ppsd_reads_the_host_once_per_sync_every_ticks(sync_every: int) -> None:
    """The `streams` backend chains its ticks on the device: captured, the host reads once per block of
    min(sync_every, tokens still to come) ticks, as the executor's `LocalPipeline.decode`, so the overhead adds
    reads x overhead to the decode time (41 ticks: the first token crosses both stages, then one a tick).
    Uncaptured every stage of every tick pays it."""
    fields, ticks, overhead = {"sync_every": sync_every, "ppsd_backend": "streams"}, 41, 100.0
    free = ppsd_decode_us(True, 0.0, **fields)
    assert ppsd_decode_us(True, overhead, **fields) - free == pytest.approx(-(-ticks // sync_every) * overhead)
    assert ppsd_decode_us(False, overhead, **fields) - free >= ticks * overhead


@pytest.mark.parametrize("backend", ["distributed", "free"])
def test_a_process_per_stage_pays_the_host_on_every_stage_of_every_tick(backend: str) -> None:
    """With a process per stage (`distributed`, the executor's lockstep ranks; `free`, the free-running pipe) each
    rank's host takes part in every tick, captured or not, whatever `sync_every` says: each stage's pass is one
    overhead longer, and as the two balanced stages overlap, every tick (and the pipe's fill) is one overhead
    longer."""
    ticks, overhead = 40, 100.0
    free = ppsd_decode_us(True, 0.0, ppsd_backend=backend)
    for captured in (True, False):
        for sync_every in (1, 8):
            delta = ppsd_decode_us(captured, overhead, sync_every=sync_every, ppsd_backend=backend) - free
            assert delta == pytest.approx((ticks + 1) * overhead)
    streams = ppsd_decode_us(True, overhead, sync_every=8, ppsd_backend="streams") - free
    assert streams == pytest.approx(-(-(ticks + 1) // 8) * overhead)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_distributed_ppsd_moves_in_the_executors_lockstep_ticks_and_messages(alpha: float) -> None:
    """`distributed` is the executor's `ppsd_dist` loop: every tick, each rank runs its token and the last rank's
    outcome (4 int64) reaches every rank; where the pipe moves on (no flush, not the last tick) each rank then sends
    the next its header (3 int64) and, where it ran a token, its hidden state, back to back: one message of their
    bytes. A tick lasts its slowest running stage, plus the outcome, plus the slowest hand-off. Stage 1's layers cost
    20 µs, stage 2's 10. Alpha 1: 40 ticks that run stage 1 and move on, then the last (stage 2 alone). Alpha 0: each
    of the 40 tokens enters stage 1 alone and moves on; 39 ticks run it in stage 2 with its draft in stage 1 and
    flush; the last runs stage 2 alone. The free pipe pays neither the outcome nor the headers and starts each stage's
    work as soon as it may."""
    link = LinkSpec("test", 1.0, 100.0)  # 1 µs + bytes / 100 GB/s
    stages = (SimStage(0, 12, ConstantLatency({"layer": 20.0 / 12})),
              SimStage(12, 24, ConstantLatency({"layer": 10.0 / 12})))  # fmt: skip
    p = replace(plan("ppsd", alpha, 2, output_len=41, link=link, ppsd_backend="distributed"), stages=stages)
    result = Simulation(p).run()
    outcome, hand_off = (link.time_us(n) for n in (4 * 8, 3 * 8 + MODEL.hidden_size * p.dtype_bytes))
    moved, last = 40 * (20.0 + outcome + hand_off), 10.0 + outcome
    flushed = 0.0 if alpha else 39 * (20.0 + outcome)
    assert result.ticks == (41 if alpha else 80)
    assert result.decode_time_us == pytest.approx(moved + flushed + last)
    assert result.ticks == Simulation(replace(p, sync_every=1)).run().ticks  # every tick's outcome is read
    free = Simulation(replace(p, ppsd_backend="free")).run()
    assert free.ticks == result.ticks and free.decode_time_us < result.decode_time_us


def test_the_host_reads_a_distributed_tick_as_the_last_rank_judges_it() -> None:
    """The executor's last rank judges a tick, and streams its tokens to the host, once its own pass is done, before
    the tick's messages and a slower stage 1's pass end: a row's end is read 10 µs (stage 2's pass) into the tick it
    leaves in, where the one-process backends read it at the tick's end. Stage 1 20 µs, stage 2 10 µs, alpha 1: the
    token at position q leaves in tick q + 2 (the first ticks T long, the decode's last stage 2's alone)."""
    from sim.policy import make_policy
    from sim.serving import VerdictStream

    link = LinkSpec("test", 1.0, 100.0)
    stages = (SimStage(0, 12, ConstantLatency({"layer": 20.0 / 12})),
              SimStage(12, 24, ConstantLatency({"layer": 10.0 / 12})))  # fmt: skip
    p = replace(plan("ppsd", 1.0, 2, output_len=41, link=link, ppsd_backend="distributed"), stages=stages)
    rows = lambda: [BatchRow(VerdictStream([True] * 41), make_policy("fixed:1"), n) for n in (41, 21)]  # noqa: E731
    _, reads = decode_rows(p, 16, rows())
    tick = 20.0 + sum(link.time_us(n) for n in (4 * 16, 3 * 16 + 2 * MODEL.hidden_size * p.dtype_bytes))
    assert reads == pytest.approx([40 * tick + 10.0, 20 * tick + 10.0])
    one_process, ends = decode_rows(replace(p, ppsd_backend="sequential", sync_every=1), 16, rows())
    assert ends[1] == pytest.approx(21 * (20.0 + link.time_us(2 * MODEL.hidden_size * p.dtype_bytes)))
    assert ends[0] == pytest.approx(one_process.decode_time_us)


def test_a_stages_own_link_carries_its_hand_off_and_the_last_stages_the_token_ids_back() -> None:
    """AR through 3 stages of 8 layers at 1 µs each: a token costs the three stages, the hand-off after stage 1 over
    its own link (7 µs), after stage 2 over the plan's (3 µs) and its id back to stage 1 over the last stage's own
    (11 µs); without their own links every hop is the plan's."""
    base = plan("ar", 0.0, 3, output_len=20, layer_us=1.0, link=LinkSpec("plan", 3.0, None))
    own = (LinkSpec("first", 7.0, None), None, LinkSpec("back", 11.0, None))
    stages = tuple(replace(stage, link=link) for stage, link in zip(base.stages, own, strict=True))
    linked = replace(base, stages=stages)
    assert (linked.link_after(0).name, linked.link_after(1).name, linked.return_link.name) == ("first", "plan", "back")
    steps = 19  # decode tokens after the prefill's
    assert Simulation(linked).run().decode_time_us == pytest.approx(steps * (24.0 + 7.0 + 3.0 + 11.0))
    assert Simulation(base).run().decode_time_us == pytest.approx(steps * (24.0 + 3.0 * 3))
    assert [linked.link_back(i).name for i in range(3)] == ["ideal", "first", "back"]  # the slowest hop on the way


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_token_ids_go_back_from_where_a_pass_ended(alpha: float) -> None:
    """EESD over 3 stages drafting at layer 12 (in stage 2): a draft step's ids go back from stage 2 over the hop it
    came by, so slowing the last stage's own link back to stage 1 by 997 µs slows only the verify pass, once a
    round."""
    link = LinkSpec("p", 3.0, None)
    base = plan("eesd", alpha, 3, output_len=60, exit_layer=12, draft_len=2, layer_us=1.0, link=link)

    def last_link(latency_us: float) -> RunResult:
        stages = (*base.stages[:2], replace(base.stages[2], link=LinkSpec("back", latency_us, None)))
        return Simulation(replace(base, stages=stages)).run()

    fast, slow = last_link(3.0), last_link(1000.0)
    assert fast.decode_time_us == pytest.approx(Simulation(base).run().decode_time_us)
    assert slow.decode_time_us - fast.decode_time_us == pytest.approx(fast.rounds * 997.0)


@pytest.mark.parametrize("backend", ["distributed", "free"])
def test_ppsd_drafting_inside_stage_1_costs_stage_1_whole(backend: str) -> None:
    """An exit before stage 1's end (the executor's balanced stages with `exit_layer` inside stage 1): stage 1 still
    runs every one of its layers for each token, its exit head at the exit layer, so at the same agreement a tick
    costs what drafting at stage 1's end costs, and cutting stage 1 at the exit instead moves its layers to stage 2."""
    balanced = plan("ppsd", 0.7, 2, output_len=60, head_us=5.0, ppsd_backend=backend, seed=3)
    inside = Simulation(replace(balanced, exit_layer=5)).run()
    assert inside == Simulation(balanced).run()
    cut = (SimStage(0, 5, balanced.stages[0].latency), SimStage(5, 24, balanced.stages[1].latency))
    assert Simulation(replace(balanced, exit_layer=5, stages=cut)).run().decode_time_us > inside.decode_time_us


@pytest.mark.parametrize(
    ("mode", "head"), [("chained", "shared"), ("verify", "shared"), ("chained", "trained"), ("verify", "trained")]
)
def test_zero_draft_rounds_are_chained_ar_steps_as_the_executor_runs_them(mode: str, head: str, monkeypatch) -> None:
    """Captured, EESD rounds that draft nothing run as the executor's chained AR steps (`zero_draft_rounds`): one host
    read per block of up to sync_every rounds, a block ending before a round that drafts; "verify" (an executor that
    does not chain them) reads after every round. A trained head's own layer runs once per verified position (in
    each chained step, or in each verify pass), keeping its KV in step."""
    import sim.engine

    script = [0] * 10 + [2] + [0] * 30  # 10 zero rounds: blocks of 8 and 2, then a drafting round, then blocks
    monkeypatch.setattr(sim.engine, "make_policy", lambda spec, **_: ScriptedPolicy(script))
    layer_us, overhead_us, output_len = 10.0, 100.0, 30
    latency = ConstantLatency({"layer": layer_us, "overhead": overhead_us, "exit_head": 0.0}, cuda_graphs=True)
    base = plan("eesd", 0.0, exit_layer=6, output_len=output_len, policy="beta-ts")
    chained = mode == "chained"
    run = Simulation(SimPlan(**{**base.__dict__, "stages": (SimStage(0, 24, latency),), "exit_head": head,
                                "chain_zero_rounds": mode == "chained"})).run()  # fmt: skip
    # 29 decode tokens: 10 zero rounds, a round drafting 2 (alpha 0: emits 1), 18 zero rounds
    assert run.rounds == 29 and run.drafted == 2
    reads = 2 + 1 + 3 if chained else 29  # blocks 8 + 2, the drafting round, blocks 8 + 8 + 2
    layers_us = 2 * 6 * layer_us + 29 * (24 + (head == "trained")) * layer_us
    assert run.decode_time_us == pytest.approx(layers_us + reads * overhead_us)


class _ContextLog(ConstantLatency):
    """Constant latency that records the context every decode query asks at."""

    def time_us(self, component: str, phase: str, q: int, context_len: int, batch: int) -> float:
        if phase != "prefill":
            self.contexts.add(context_len)  # type: ignore[attr-defined]
        return super().time_us(component, phase, q, context_len, batch)


@pytest.mark.parametrize("method", ["ar", "eesd", "ppsd"])
@pytest.mark.parametrize("slots", [None, 4096])
def test_static_passes_attend_over_the_cache_slots(method: str, slots: int | None) -> None:
    """The executor's static passes attend over every slot of their cache: with `cache_slots` every decode pass (AR
    step, draft step, verify pass, PPSD tick) asks the latency model at that context; without, at the context so
    far (the prompt of 16 plus the tokens made, rounded to the plan's context step)."""
    latency = _ContextLog({"layer": 10.0, "lm_head": 1.0})
    object.__setattr__(latency, "contexts", set())
    base = plan(method, 0.5, 1 if method != "ppsd" else 2, exit_layer=6 if method != "ppsd" else None, output_len=200)
    stages = tuple(SimStage(s.layer_start, s.layer_end, latency) for s in base.stages)
    Simulation(SimPlan(**{**base.__dict__, "stages": stages, "cache_slots": slots})).run()
    if slots:
        assert latency.contexts == {slots}
    else:
        assert min(latency.contexts) <= 64 and max(latency.contexts) >= 192


class _HostLog(ConstantLatency):
    """Constant latency that records, per component, the contexts decode queries ask at."""

    def time_us(self, component: str, phase: str, q: int, context_len: int, batch: int) -> float:
        if phase != "prefill":
            self.asked.setdefault(component, set()).add(context_len)  # type: ignore[attr-defined]
        return super().time_us(component, phase, q, context_len, batch)


class _ContextCost(_ContextLog):
    """A layer costs 10 µs + 0.01 µs per attended slot (so that the span a pass is costed at shows in its time)."""

    def time_us(self, component: str, phase: str, q: int, context_len: int, batch: int) -> float:
        base = super().time_us(component, phase, q, context_len, batch)
        return base + 0.01 * context_len if component == "layer" else base


@pytest.mark.parametrize("method", ["ar", "eesd", "ppsd"])
def test_bucketed_passes_attend_over_the_span_of_their_furthest_position(method: str) -> None:
    """With span buckets (the executor's default) a decode pass is costed at the span bucket of the furthest position
    it writes, not at the cache's 4096 slots: a prompt of 16 and 200 tokens ask for the buckets 64, 128 and 256."""
    latency = _HostLog({"layer": 10.0, "lm_head": 1.0})
    object.__setattr__(latency, "asked", {})
    base = plan(method, 0.5, 1 if method != "ppsd" else 2, exit_layer=6 if method != "ppsd" else None, output_len=200)
    stages = tuple(SimStage(s.layer_start, s.layer_end, latency) for s in base.stages)
    Simulation(SimPlan(**{**base.__dict__, "stages": stages, "cache_slots": 4096, "span_buckets": True})).run()
    assert latency.asked["layer"] == latency.asked["lm_head"] == {64, 128, 256}


@pytest.mark.parametrize("method", ["ar", "eesd", "ppsd"])
def test_the_hosts_overhead_is_not_looked_up_at_the_span(method: str) -> None:
    """The host reads no K/V: with span buckets its per-pass `overhead` is still looked up at the cache capacity
    (rounded to the context step, as without buckets), while the layers ask at their buckets."""
    latency = _HostLog({"layer": 10.0, "lm_head": 1.0, "overhead": 5.0})
    object.__setattr__(latency, "asked", {})
    base = plan(method, 0.5, 1 if method != "ppsd" else 2, exit_layer=6 if method != "ppsd" else None, output_len=200)
    stages = tuple(SimStage(s.layer_start, s.layer_end, latency) for s in base.stages)
    Simulation(SimPlan(**{**base.__dict__, "stages": stages, "cache_slots": 4000, "span_buckets": True})).run()
    assert latency.asked["overhead"] == {4032} and latency.asked["layer"] == {64, 128, 256}


def test_a_bucketed_ar_step_costs_its_own_bucket() -> None:
    """AR with span buckets: step i (i = 1 .. 199 after the prefill's token) writes position 16 + i - 1 and costs
    its layers at that position's bucket (64, then 128 from position 64, then 256 from 128), to the µs."""
    from sim.contract import span_bucket

    latency = _ContextCost({"layer": 10.0})
    object.__setattr__(latency, "contexts", set())
    base = plan("ar", 0.0, output_len=200)
    stages = (SimStage(0, MODEL.num_layers, latency),)
    run = Simulation(SimPlan(**{**base.__dict__, "stages": stages, "cache_slots": 4096, "span_buckets": True})).run()
    spans = [span_bucket(16 + i - 1, 4096) for i in range(1, 200)]
    assert run.decode_time_us == pytest.approx(sum(MODEL.num_layers * (10.0 + 0.01 * span) for span in spans))


@st.composite
def tied_plans(draw: st.DrawFn) -> SimPlan:
    """Small plans of every schedule whose latencies are whole µs, so that many events fall due at the same time
    (where the order in which SimPy processes them could tell)."""
    method = draw(st.sampled_from(["ar", "eesd", "ppsd"]))
    n_stages = draw(st.integers(2 if method == "ppsd" else 1, 4))  # PPSD drafts inside stage 1 (24 // n layers)
    base = plan(method, draw(st.sampled_from([0.0, 0.5, 0.8, 1.0])), n_stages, output_len=draw(st.integers(1, 40)),
                seed=draw(st.integers(0, 9)), batch=draw(st.integers(1, 3)),
                exit_layer=draw(st.integers(1, 23) if method != "ppsd" else st.integers(1, 24 // n_stages)),
                policy=draw(st.sampled_from(["fixed:1", "fixed:3", "beta-ts", "heuristic:2"])))  # fmt: skip
    captured = draw(st.booleans())
    stages = tuple(
        SimStage(s.layer_start, s.layer_end, ConstantLatency(
            {"layer": draw(st.sampled_from([0.5, 1.0, 2.0])), "lm_head": draw(st.sampled_from([0.0, 1.0, 4.0])),
             "overhead": draw(st.sampled_from([0.0, 2.0])), "embed": draw(st.sampled_from([0.0, 1.0]))},
            cuda_graphs=captured))
        for s in base.stages
    )  # fmt: skip
    link = draw(st.sampled_from([FREE, LinkSpec("whole", 1.0, None), LinkSpec("slow", 1.0, 1.0)]))
    return SimPlan(**{**base.__dict__, "stages": stages, "link": link, "workload": Workload(
        2 * base.workload.batch_size, base.workload.batch_size, 16, base.workload.output_len),
        "sync_every": draw(st.sampled_from([1, 3, 8])), "max_in_flight": draw(st.sampled_from([None, 1, 2])),
        "ppsd_backend": draw(st.sampled_from(["distributed", "free", "streams"])),
        "chain_zero_rounds": draw(st.booleans()), "cache_slots": draw(st.sampled_from([None, 256])),
        "span_buckets": draw(st.booleans())})  # fmt: skip


@dataclass(frozen=True)
class EndsEarly:
    """An acceptance model whose request r ends after `ends[r % len(ends)]` tokens where that is fewer than asked, as
    a trace replay ends a request at its EOS (`sim.acceptance.TraceAcceptance.output_len`): rows of one batch then
    end at different lengths."""

    inner: AcceptanceModel
    ends: tuple[int, ...]

    @property
    def has_confidence(self) -> bool:
        return self.inner.has_confidence

    def stream(self, rng: random.Random, request: int) -> AcceptanceStream:
        return self.inner.stream(rng, request)

    def output_len(self, request: int, requested: int) -> int:
        return min(requested, self.ends[request % len(self.ends)])


ENDS = st.none() | st.lists(st.integers(1, 60), min_size=1, max_size=3).map(tuple)


def ending(p: SimPlan, ends: tuple[int, ...] | None) -> SimPlan:
    return p if ends is None else replace(p, acceptance=EndsEarly(p.acceptance, ends))


@given(p=tied_plans(), traced=st.booleans(), ends=ENDS)
def test_the_event_saving_hand_offs_change_no_result(p: SimPlan, traced: bool, ends: tuple[int, ...] | None) -> None:
    """The hand-offs that spare SimPy events (a stage starting a job where its wake-up would be the next event, a
    link's landing folded into the job it starts, a round's passes as one job, the main process woken once the token
    ids are back) give the very numbers, to the bit, and the same trace as every hand-off as its own event; rows
    ending at different lengths too."""
    p = ending(p, ends)
    limit = 10**6 if traced else 0
    fast, reference = Simulation(p, limit), Simulation(p, limit, shortcuts=False)
    assert fast.run() == reference.run()
    assert fast.trace == reference.trace


@st.composite
def free_pipes(draw: st.DrawFn) -> SimPlan:
    """PPSD plans on the free-running pipe whose stage and link times are not whole µs, so that a younger job ending
    at the very time of a flush may end there by one sum and stop there by another (the sweep then declines)."""
    alpha, n_stages = draw(st.sampled_from([0.0, 0.5, 0.8, 1.0])), draw(st.integers(2, 4))
    base = plan("ppsd", alpha, n_stages, output_len=draw(st.integers(1, 60)), seed=draw(st.integers(0, 9)),
                batch=draw(st.integers(1, 3)))  # fmt: skip
    stages = tuple(
        SimStage(s.layer_start, s.layer_end, ConstantLatency(
            {"layer": draw(st.sampled_from([0.1, 0.3, 0.7, 1.1])), "lm_head": draw(st.sampled_from([0.0, 0.1, 0.3]))}))
        for s in base.stages
    )  # fmt: skip
    link = draw(st.sampled_from([FREE, LinkSpec("short", 0.1, None), LinkSpec("slow", 0.3, 1.0)]))
    return SimPlan(**{**base.__dict__, "stages": stages, "link": link, "workload": Workload(
        2 * base.workload.batch_size, base.workload.batch_size, 16, base.workload.output_len),
        "max_in_flight": draw(st.sampled_from([None, 1, 2, 3])), "ppsd_backend": "free",
        "cache_slots": draw(st.sampled_from([None, 256])), "span_buckets": draw(st.booleans())})  # fmt: skip


@settings(max_examples=150)
@given(p=free_pipes(), ends=ENDS)
def test_the_free_pipe_swept_gives_the_events_numbers(p: SimPlan, ends: tuple[int, ...] | None) -> None:
    """A PPSD decode on the free-running pipe worked out as one sweep (a flow shop: flushes stopping the younger
    jobs, the window, the correction's trip back) books the very times and counts of every hand-off as its own
    event, to the bit; where a flush ties with a younger job's end and the two bookings would differ, it declines
    and the events run. Rows of a batch ending at different lengths too (each counted to its own end)."""
    p = ending(p, ends)
    fast = Simulation(p).run()
    assert fast == Simulation(p, shortcuts=False).run()
    w = p.workload
    asked = [min(w.output_len, ends[r % len(ends)]) if ends else w.output_len for r in range(w.requests)]
    assert fast.decode_tokens == sum(n - 1 for n in asked)


@pytest.mark.parametrize(
    ("method", "n_stages", "most", "reference_least", "stage_1_us"),
    [("ar", 4, 0.7, 13.0, 10.0), ("ar", 1, 0.15, 3.0, 10.0), ("eesd", 1, 0.35, 4.0, 10.0), ("eesd", 2, 1, 5.5, 10.0),
     ("ppsd", 4, 0.05, 14.5, 10.0), ("ppsd", 4, 0.05, 13.0, 12.0)],
)  # fmt: skip
def test_events_per_token(method: str, n_stages: int, most: float, reference_least: float, stage_1_us: float) -> None:
    """What the simulator's speed rests on: SimPy events per simulated token (alpha 0.8, links of 1 µs, stage 1's
    layers `stage_1_us` and the others' 10 µs), at most `most`; `reference_least` or more with every hand-off its
    own event. A block of AR steps up to a host read (8 steps) and an EESD round are one sweep: one event per stage
    taking part and one for the main process, shared with the last stage's where no token ids come back over a link
    (one stage). A PPSD decode on the free-running pipe is one sweep (`_FreePipe`): the events left are the
    prefill's and the one that ends the decode, about 13 per 400-token request."""
    p = plan(method, 0.8, n_stages, output_len=400, link=LinkSpec("test", 1.0, None),
             exit_layer=6 if method == "eesd" and n_stages == 1 else None,
             layer_us=[stage_1_us] + [10.0] * (n_stages - 1))  # fmt: skip
    assert events_per_token(p, True) <= most
    assert events_per_token(p, False) >= reference_least


@pytest.mark.parametrize("backend", ["distributed", "free", "sequential"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_ppsd_counts_a_rows_rounds_as_eesd_does_at_any_batch_size(backend: str, alpha: float) -> None:
    """`tokens_per_round` is a row's tokens per round for every method: a PPSD batch of rows that all confirm
    (alpha 1: one flush-free run each) or all flush (alpha 0: a run a token) makes the batch-1 figure, not the
    batch's sum of rows."""
    figures = set()
    for batch in (1, 4):
        p = replace(plan("ppsd", alpha, 2, output_len=41, batch=batch), ppsd_backend=backend)
        result = Simulation(p).run()
        assert result.decode_tokens == 40 * batch and result.rounds == (1 if alpha else 40) * batch
        figures.add(result.tokens_per_round)
    assert figures == {40.0 if alpha else 1.0}
