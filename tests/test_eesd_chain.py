"""EESD rounds that draft nothing (a policy's k = 0, as beta-ts picks at a low acceptance) run as chained AR steps,
up to `sync_every` with one host read (`executor.decoding.zero_draft_rounds`). The output must not depend on it
(equal to HF per row, with EOS and min_new_tokens; exact sampling equal to AR), and neither may the policy's draws:
the rounds' drafted and accepted counts are the same for every `sync_every`.

A head with a layer of its own (a trained head) chains too (`Passes.ar_head`): its KV after a chained block must be
what the round-by-round path (a verify pass per round) writes, bit for bit, so that a later draft round reads the
same head cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scripted_policy import ScriptedPolicy
from test_batch_and_dropin import batch_cases, hf_batch
from test_passes import EXIT_LAYER, PROMPTS, model
from tiny_models import TinySpec, hf_greedy, scale_late_layers, tiny_model

import executor
import executor.decoding
from executor.adapter import ModelAdapter, Step
from executor.api import PassSetup
from executor.decoding import GenerationStats, Rows, TokenSink, decode_eesd
from executor.heads import TrainedExitHead
from executor.kv_cache import KVCache
from executor.passes import Passes
from executor.sampling import SamplingConfig

ZERO_HEAVY = ("beta-ts:cost=0.9,max=4", "beta-ts:cost=0.5,a=1,b=4")  # k = 0 often, sometimes not


@given(
    case=batch_cases(),
    policy=st.sampled_from((*ZERO_HEAVY, "beta-ts")),
    sync_every=st.integers(1, 9),
    max_new_tokens=st.integers(1, 24),
    min_new_tokens=st.integers(0, 6),
    eos_pick=st.integers(0, 200),
    layered=st.booleans(),
)
def test_eesd_with_chained_zero_rounds_equals_hf_per_row(
    case, policy, sync_every, max_new_tokens, min_new_tokens, eos_pick, layered
) -> None:
    """Shared head, or a head of its own layer (its zero rounds chain as `Passes.ar_head`)."""
    net, _, exit_layer, _ = case
    head = TrainedExitHead(ModelAdapter(net), exit_layer).to(net.dtype).requires_grad_(False) if layered else None
    ids, kwargs, expected = hf_batch(case, max_new_tokens, min_new_tokens, eos_pick)
    out = executor.generate(net, ids, method="eesd", exit_layer=exit_layer, head=head, policy=policy,
                            sync_every=sync_every, **kwargs)  # fmt: skip
    assert out.sequences.tolist() == expected.tolist()


@pytest.mark.parametrize("policy", ZERO_HEAVY)
@pytest.mark.parametrize("sync_every", [2, 5, 8])
def test_rounds_and_draws_do_not_depend_on_sync_every(policy: str, sync_every: int) -> None:
    """The budgets of zero-draft rounds are drawn ahead, in the same order as round by round: the same rounds, the
    same drafted and accepted counts, the same tokens; fewer host reads."""
    net = model(epsilon=0.6)
    kwargs = dict(method="eesd", exit_layer=EXIT_LAYER, policy=policy, max_new_tokens=40, seed=3)
    one = executor.generate(net, [PROMPTS[0]], sync_every=1, **kwargs)
    chained = executor.generate(net, [PROMPTS[0]], sync_every=sync_every, **kwargs)
    assert chained.sequences.tolist() == one.sequences.tolist()
    assert chained.stats.drafted == one.stats.drafted and chained.stats.accepted == one.stats.accepted
    assert chained.stats.rounds == one.stats.rounds
    zeros = one.stats.drafted.count(0)
    assert zeros >= 4  # the case exercises chaining
    assert one.stats.host_reads == len(one.stats.drafted)  # one read per round
    assert chained.stats.host_reads < one.stats.host_reads


def test_a_block_reads_once_and_stops_before_a_drafting_round() -> None:
    """A policy that never drafts: ceil((n - 1) / sync_every) reads for n tokens, as AR makes them."""
    net = model()
    out = executor.generate(net, [PROMPTS[0]], method="eesd", exit_layer=EXIT_LAYER, policy="beta-ts:cost=0.99,b=1e6",
                            max_new_tokens=20, sync_every=8)  # fmt: skip
    assert set(out.stats.drafted) == {0} and len(out.stats.drafted) == 19
    assert out.stats.host_reads == 3  # 8 + 8 + 3
    ar = executor.generate(net, [PROMPTS[0]], method="ar", max_new_tokens=20)
    assert out.sequences.tolist() == ar.sequences.tolist()


def test_exact_sampling_with_chained_zero_rounds_equals_ar() -> None:
    net = model()
    sampling = dict(do_sample=True, temperature=0.9, top_k=20, seed=11, max_new_tokens=30)
    ar = executor.generate(net, [PROMPTS[0]], method="ar", **sampling)
    for sync_every in (1, 4, 8):
        out = executor.generate(net, [PROMPTS[0]], method="eesd", exit_layer=EXIT_LAYER, policy=ZERO_HEAVY[0],
                                sync_every=sync_every, **sampling)  # fmt: skip
        assert out.sequences.tolist() == ar.sequences.tolist()


@pytest.mark.parametrize(
    "kwargs", [{"repetition_penalty": 1.3}, {"do_sample": True, "sampling": "rejection", "seed": 2}]
)
def test_no_chaining_where_the_verify_pass_does_more(kwargs: dict) -> None:
    """Rejection sampling and a repetition penalty keep one verify pass per round."""
    net = scale_late_layers(tiny_model(TinySpec(num_layers=4, seed=1), torch.float64), EXIT_LAYER, 0.6)
    out = executor.generate(net, [PROMPTS[0]], method="eesd", exit_layer=EXIT_LAYER, policy=ZERO_HEAVY[0],
                            max_new_tokens=24, sync_every=8, **kwargs)  # fmt: skip
    assert out.stats.drafted.count(0) > 0
    assert out.stats.host_reads == len(out.stats.drafted)


@pytest.mark.parametrize("sync_every", [1, 8])
def test_a_budget_drawn_ahead_is_capped_by_what_is_left_after_the_block(sync_every: int) -> None:
    """Five zero rounds, then k = 3 with 2 tokens left: the drawn-ahead budget is capped at 1 (the round's draft and
    the full model's token), as round by round."""
    policy = ScriptedPolicy([0, 0, 0, 0, 0, 3])
    out = executor.generate(model(), [PROMPTS[0]], method="eesd", exit_layer=EXIT_LAYER, policy=policy,
                            max_new_tokens=8, sync_every=sync_every)  # fmt: skip
    assert out.stats.drafted == [0, 0, 0, 0, 0, 1]
    assert out.stats.host_reads == (6 if sync_every == 1 else 2)


def test_a_row_that_ran_ahead_and_ended_bounds_the_block() -> None:
    """Rows advance at their own pace in EESD: a row that ended far ahead still runs every AR step of a block
    (static shapes) at its parked position, so a block is cut to what the cache has room for after every row."""
    net = model()
    ids = torch.tensor([PROMPTS[0], PROMPTS[0]])
    # both rows draft 3 for 6 rounds, row 0 accepting all (4 tokens a round) and row 1 none; then no drafts
    out = executor.generate(net, ids, method="eesd", exit_layer=EXIT_LAYER, policy=ScriptedPolicy([3] * 6),
                            accept_pattern=[3, 0], max_new_tokens=24, sync_every=8)  # fmt: skip
    assert out.sequences.shape == (2, len(PROMPTS[0]) + 24)
    assert out.stats.drafted.count(0) > 8  # row 1's zero-draft rounds ran while row 0 sat at the cache's end


# ------------------------------------------------------------------------------- a head with a layer of its own
SCRIPTS = (  # runs of zero rounds (longer than some sync_every values, shorter than others) between drafting rounds
    [0, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 1],
    [2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
)


def layered_head(net: torch.nn.Module, noise: float = 0.05) -> TrainedExitHead:
    """A trained-head architecture (a decoder layer + norm of its own, `extra_layers` = 1) with seeded random weights
    off layer E's, so its KV is its own."""
    head = TrainedExitHead(ModelAdapter(net), EXIT_LAYER).double().requires_grad_(False)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(noise * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return head


def expected_reads(drafted: list[int], sync_every: int) -> int:
    """One host read per drafting round and per block of up to `sync_every` zero rounds in a row (one row)."""
    reads, run = 0, 0
    for count in [*drafted, 1]:
        if count == 0:
            run += 1
            continue
        reads += -(-run // sync_every) + 1
        run = 0
    return reads - 1  # the sentinel's round


def _policy(name: str):
    return ScriptedPolicy(SCRIPTS[0]) if name == "script" else name


@pytest.mark.parametrize("policy", ["script", *ZERO_HEAVY])
@pytest.mark.parametrize("sync_every", [1, 3, 8])
def test_a_layered_head_chains_zero_rounds_and_decodes_as_round_by_round(monkeypatch, policy, sync_every) -> None:
    """Zero-draft rounds chain with a head of its own layer and decode what HF, AR and the round-by-round path
    (`chains_zero_rounds` off: a verify pass per round) decode, with the same rounds, drafts and accepted counts;
    one host read per block of zero rounds."""
    net = model(epsilon=0.6)
    head = layered_head(net)
    kwargs = dict(method="eesd", exit_layer=EXIT_LAYER, head=head, max_new_tokens=30, seed=3, sync_every=sync_every)
    chained = executor.generate(net, [PROMPTS[0]], policy=_policy(policy), **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(executor.decoding, "chains_zero_rounds", lambda passes: False)
        unchained = executor.generate(net, [PROMPTS[0]], policy=_policy(policy), **kwargs)
    reference, _ = hf_greedy(net, PROMPTS[0], 30)
    ar = executor.generate(net, [PROMPTS[0]], method="ar", max_new_tokens=30)
    assert chained.sequences.tolist() == unchained.sequences.tolist() == ar.sequences.tolist() == reference.tolist()
    assert chained.stats.drafted == unchained.stats.drafted and chained.stats.accepted == unchained.stats.accepted
    assert chained.stats.rounds == unchained.stats.rounds
    drafted = unchained.stats.drafted
    assert drafted.count(0) >= 4 and sum(drafted) > 0  # the case exercises chaining and later drafting rounds
    assert unchained.stats.host_reads == len(drafted)
    assert chained.stats.host_reads == expected_reads(drafted, sync_every)


def _decode_rows(net, head, sync_every: int) -> tuple[Passes, Rows, GenerationStats]:
    """Two ragged rows with their own scripts (a round drafts nothing only where both are 0); the passes kept."""
    adapter = ModelAdapter(net)
    prompts = [PROMPTS[0], PROMPTS[1]]
    policies = [ScriptedPolicy(script) for script in SCRIPTS]
    setup = PassSetup("eesd", SamplingConfig(), 0, [], EXIT_LAYER, head, policies, "none")
    passes = setup.passes(adapter, prompts, 30)
    rows = Rows(prompts=prompts, sinks=[TokenSink(30, ()) for _ in prompts])
    stats = GenerationStats("eesd")
    decode_eesd(adapter, rows, passes, stats, policies=policies, sync_every=sync_every)
    return passes, rows, stats


def _teacher_forced_head_kv(head: TrainedExitHead, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The head layer's keys and values [Hkv, T, D] over a teacher-forced pass of `tokens` (positions 0 .. T - 1)."""
    adapter = head.adapter
    step = Step.at(0, len(tokens), adapter.device)
    states = adapter.forward_layers(adapter.embed(torch.tensor([tokens])), step, adapter.new_cache(1, len(tokens)),
                                    0, EXIT_LAYER)  # fmt: skip
    cache = KVCache(num_layers=1, batch=1, num_kv_heads=adapter.num_kv_heads, max_len=len(tokens),
                    head_dim=adapter.head_dim, dtype=states.dtype, device=states.device,
                    layer_ids=[head.index])  # fmt: skip
    head.run_layer(states, step, cache)
    return cache.keys[0][0], cache.values[0][0]


@pytest.mark.parametrize("sync_every", [2, 8])
@torch.inference_mode()
def test_a_chained_block_keeps_the_heads_kv_as_the_verify_pass_does(monkeypatch, sync_every: int) -> None:
    """After decoding, every committed position's KV, the head's layer included, is bit for bit what the
    round-by-round path wrote (so each draft round read the same head cache), and the head's KV is a teacher-forced
    pass's over the final text."""
    net = model(epsilon=0.6)
    head = layered_head(net)
    chained, rows, stats = _decode_rows(net, head, sync_every)
    with monkeypatch.context() as patch:
        patch.setattr(executor.decoding, "chains_zero_rounds", lambda passes: False)
        unchained, rows_unchained, stats_unchained = _decode_rows(net, head, sync_every)
    assert [s.tokens for s in rows.sinks] == [s.tokens for s in rows_unchained.sinks]
    assert stats.drafted == stats_unchained.drafted and stats.host_reads < stats_unchained.host_reads
    assert rows.positions == rows_unchained.positions and chained.cache.lengths == unchained.cache.lengths
    layers = chained.layers_ar()
    assert layers[-1] == head.index == net.config.num_hidden_layers  # the head's own cache layer is compared too
    for row, end in enumerate(rows.positions):
        for layer in layers:
            for ours, theirs in (
                (chained.cache.keys, unchained.cache.keys),
                (chained.cache.values, unchained.cache.values),
            ):
                assert torch.equal(ours[layer][row, :, :end], theirs[layer][row, :, :end]), (row, layer)
        keys, values = _teacher_forced_head_kv(head, rows.prompts[row] + rows.sinks[row].tokens[:-1])
        torch.testing.assert_close(chained.cache.keys[head.index][row, :, :end], keys, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(chained.cache.values[head.index][row, :, :end], values, rtol=1e-9, atol=1e-10)


def test_a_layered_heads_block_reads_once_and_runs_no_verify_pass(monkeypatch) -> None:
    """A policy that never drafts, with a head of its own layer: ceil((n - 1) / sync_every) reads for n tokens, every
    round an `ar_head` step, no verify pass, no plain AR step (which would leave the head's KV behind)."""
    net = model()
    launched: list[str] = []
    for name in ("ar", "ar_head", "verify", "draft"):
        original = getattr(Passes, name)
        monkeypatch.setattr(Passes, name, lambda self, *a, _o=original, _n=name: launched.append(_n) or _o(self, *a))
    out = executor.generate(net, [PROMPTS[0]], method="eesd", exit_layer=EXIT_LAYER, head=layered_head(net),
                            policy="beta-ts:cost=0.99,b=1e6", max_new_tokens=20, sync_every=8)  # fmt: skip
    assert set(out.stats.drafted) == {0} and len(out.stats.drafted) == 19
    assert out.stats.host_reads == 3  # 8 + 8 + 3
    assert launched == ["ar_head"] * 19
    ar = executor.generate(net, [PROMPTS[0]], method="ar", max_new_tokens=20)
    assert out.sequences.tolist() == ar.sequences.tolist()


def test_the_histogram_counts_drafting_rounds_and_names_those_that_drafted_nothing() -> None:
    stats = GenerationStats("eesd", new_tokens=6, rounds=4, drafted=[0, 3, 3, 0], accepted=[0, 0, 3, 0])
    assert stats.accepted_histogram() == {0: 1, 3: 1}
    assert stats.undrafted_rounds == 2
    assert stats.summary().splitlines()[1].endswith("{0: 1, 3: 1}, 2 rounds drafted nothing")
    assert "drafted nothing" not in GenerationStats("eesd", drafted=[1], accepted=[1]).summary()
