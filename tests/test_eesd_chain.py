"""EESD rounds that draft nothing (a policy's k = 0, as beta-ts picks at a low acceptance) run as chained AR steps,
up to `sync_every` with one host read (`executor.decoding.zero_draft_rounds`). The output must not depend on it
(equal to HF per row, with EOS and min_new_tokens; exact sampling equal to AR), and neither may the policy's draws:
the rounds' drafted and accepted counts are the same for every `sync_every`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scripted_policy import ScriptedPolicy
from test_batch_and_dropin import batch_cases, hf_batch
from test_passes import EXIT_LAYER, PROMPTS, model
from tiny_models import TinySpec, scale_late_layers, tiny_model

import executor
from executor.adapter import ModelAdapter
from executor.heads import TrainedExitHead

ZERO_HEAVY = ("beta-ts:cost=0.9,max=4", "beta-ts:cost=0.5,a=1,b=4")  # k = 0 often, sometimes not


@given(
    case=batch_cases(),
    policy=st.sampled_from((*ZERO_HEAVY, "beta-ts")),
    sync_every=st.integers(1, 9),
    max_new_tokens=st.integers(1, 24),
    min_new_tokens=st.integers(0, 6),
    eos_pick=st.integers(0, 200),
)
def test_eesd_with_chained_zero_rounds_equals_hf_per_row(
    case, policy, sync_every, max_new_tokens, min_new_tokens, eos_pick
) -> None:
    net, _, exit_layer, _ = case
    ids, kwargs, expected = hf_batch(case, max_new_tokens, min_new_tokens, eos_pick)
    out = executor.generate(
        net, ids, method="eesd", exit_layer=exit_layer, policy=policy, sync_every=sync_every, **kwargs
    )
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
    "kwargs",
    [{"repetition_penalty": 1.3}, {"do_sample": True, "sampling": "rejection", "seed": 2}, {"head": "trained"}],
)
def test_no_chaining_where_the_verify_pass_does_more(kwargs: dict) -> None:
    """Rejection sampling, a repetition penalty and a head with a layer of its own keep one verify pass per round."""
    net = scale_late_layers(tiny_model(TinySpec(num_layers=4, seed=1), torch.float64), EXIT_LAYER, 0.6)
    if kwargs.get("head") == "trained":
        kwargs = {"head": TrainedExitHead(ModelAdapter(net), EXIT_LAYER).double().requires_grad_(False)}
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
