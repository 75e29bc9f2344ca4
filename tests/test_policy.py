"""Draft policies: spec parsing, each schedule's rule, and Beta-TS against a synthetic Bernoulli(α) environment."""

from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.policy import (
    BetaTSPolicy,
    CalibrationTSPolicy,
    ConfidencePolicy,
    DraftPolicy,
    FixedPolicy,
    HeuristicPolicy,
    best_draft_len,
    expected_tokens_per_cost,
    make_policy,
)


def play_round(policy: DraftPolicy, env: random.Random, alpha: float, sharpness: float = 8.0) -> tuple[int, int]:
    """One draft-then-verify round against i.i.d. Bernoulli(alpha) acceptance; returns (drafted, accepted).

    Confidences are calibrated: conf ~ Beta(alpha·s, (1 − alpha)·s), match ~ Bernoulli(conf).
    """
    limit = policy.begin_round()
    drafted, accepted, rejected = 0, 0, False
    while drafted < limit:
        confidence = env.betavariate(alpha * sharpness, (1 - alpha) * sharpness)
        match = env.random() < confidence if policy.needs_confidence else env.random() < alpha
        drafted += 1
        if not match:
            rejected = True
        elif not rejected:
            accepted += 1
        if not policy.keep_drafting(drafted, confidence):
            break
    policy.update(drafted, accepted)
    return drafted, accepted


def run_env(policy: DraftPolicy, alpha: float, cost: float, rounds: int, seed: int = 1) -> tuple[float, list[int]]:
    env = random.Random(seed)
    tokens = spent = 0.0
    lengths = []
    for i in range(rounds):
        drafted, accepted = play_round(policy, env, alpha)
        lengths.append(drafted)
        if i >= rounds // 2:  # long-run rate: second half only
            tokens += accepted + 1
            spent += drafted * cost + 1
    return tokens / spent, lengths


@pytest.mark.parametrize(("alpha", "cost"), [(0.5, 0.1), (0.7, 0.1), (0.85, 0.05), (0.8, 0.3), (0.9, 0.2)])
def test_beta_ts_converges_to_best_fixed(alpha: float, cost: float) -> None:
    k_best = max(1, best_draft_len(alpha, cost, 8))
    best_rate = expected_tokens_per_cost(alpha, k_best, cost)
    rate, lengths = run_env(BetaTSPolicy(cost, 8, rng=random.Random(7)), alpha, cost, rounds=4000)
    assert abs(statistics.median(lengths[-1000:]) - k_best) <= 1
    assert rate >= 0.95 * best_rate, (rate, best_rate)


def test_best_fixed_rate_matches_environment() -> None:
    """The analytic rate used above is what the synthetic environment really yields for a fixed k."""
    rate, _ = run_env(FixedPolicy(3), 0.7, 0.1, rounds=20000)
    assert rate == pytest.approx(expected_tokens_per_cost(0.7, 3, 0.1), rel=0.02)


def test_beta_ts_stops_drafting_when_drafts_never_pay() -> None:
    _, lengths = run_env(BetaTSPolicy(0.9, 8, rng=random.Random(3)), alpha=0.05, cost=0.9, rounds=600)
    assert statistics.mean(lengths[-200:]) < 0.3


def test_beta_ts_posterior_update() -> None:
    policy = BetaTSPolicy(0.1, 4)
    policy.update(4, 4)
    policy.update(3, 1)
    assert (policy.a, policy.b) == (6.0, 2.0)


def test_calibration_ts_learns_per_bucket_and_beats_fixed_under_calibrated_confidence() -> None:
    alpha, cost = 0.6, 0.2
    policy = CalibrationTSPolicy(cost, 8, buckets=5, rng=random.Random(5))
    rate, _ = run_env(policy, alpha, cost, rounds=4000)
    means = [a / (a + b) for a, b in zip(policy.a, policy.b, strict=True)]
    assert means[4] > means[2] > means[0]  # high-confidence drafts are accepted more often
    fixed_best = max(expected_tokens_per_cost(alpha, k, cost) for k in range(1, 9))
    assert rate >= 0.95 * fixed_best


def test_calibration_ts_update_counts_first_rejection_only() -> None:
    policy = CalibrationTSPolicy(0.01, 4, buckets=2, rng=random.Random(0))
    policy.begin_round()
    for drafted, confidence in enumerate([0.9, 0.1, 0.9], start=1):
        policy.keep_drafting(drafted, confidence)
    policy.update(3, 1)
    assert policy.a == [1.0, 2.0] and policy.b == [2.0, 1.0]


def test_heuristic_schedule() -> None:
    policy = HeuristicPolicy(4, max_draft_len=7)
    policy.update(4, 4)
    assert policy.begin_round() == 6
    policy.update(6, 6)
    assert policy.begin_round() == 7  # capped
    for _ in range(10):
        policy.update(policy.begin_round(), 0)
    assert policy.begin_round() == 1  # floor


def test_confidence_policy_stops_below_tau() -> None:
    policy = ConfidencePolicy(0.6, max_draft_len=3)
    assert policy.keep_drafting(1, 0.7)
    assert not policy.keep_drafting(1, 0.59)
    assert not policy.keep_drafting(3, 0.99)


def test_fixed_policy() -> None:
    policy = make_policy("fixed:3")
    assert policy.begin_round() == 3 and policy.keep_drafting(2, 0.0) and not policy.keep_drafting(3, 1.0)


@pytest.mark.parametrize(
    ("spec", "kind", "fields"),
    [
        ("fixed:4", FixedPolicy, {"draft_len": 4}),
        ("fixed:k=2", FixedPolicy, {"draft_len": 2}),
        ("heuristic", HeuristicPolicy, {"draft_len": 4, "max_draft_len": 16}),
        ("heuristic:6,max=10", HeuristicPolicy, {"draft_len": 6, "max_draft_len": 10}),
        ("confidence:0.6", ConfidencePolicy, {"tau": 0.6, "max_draft_len": 8}),
        ("beta-ts", BetaTSPolicy, {"cost_ratio": 0.25, "max_draft_len": 8}),
        ("beta-ts:cost=0.1,max=5", BetaTSPolicy, {"cost_ratio": 0.1, "max_draft_len": 5}),
        ("calibration-ts:buckets=4,a=2", CalibrationTSPolicy, {"buckets": 4, "prior_a": 2.0}),
    ],
)
def test_make_policy_specs(spec: str, kind: type, fields: dict) -> None:
    policy = make_policy(spec)
    assert isinstance(policy, kind) and isinstance(policy, DraftPolicy)
    for name, value in fields.items():
        assert getattr(policy, name) == value


def test_measured_cost_ratio_is_the_default_and_spec_wins() -> None:
    assert make_policy("beta-ts", cost_ratio=0.3).cost_ratio == 0.3
    assert make_policy("beta-ts:cost=0.1", cost_ratio=0.3).cost_ratio == 0.1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("magic", "unknown draft policy 'magic'; allowed: fixed:K"),
        ("fixed", "expected fixed:K"),
        ("fixed:0", "draft_len must be >= 1"),
        ("fixed:x", "k='x' is not a valid int"),
        ("beta-ts:0.1", "bare value '0.1' not allowed"),
        ("beta-ts:speed=3", "unknown or repeated key 'speed'"),
        ("beta-ts:cost=-1", "cost ratio c (draft step / verify pass) must be > 0"),
        ("confidence:1.5", "tau must be in [0, 1]"),
        ("calibration-ts:buckets=0", "buckets must be >= 1"),
        ("heuristic:max=0", "max draft length must be >= 1"),
    ],
)
def test_bad_specs_say_what_is_allowed(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="policy") as info:
        make_policy(spec)
    assert message in str(info.value)


@given(
    spec=st.sampled_from(["fixed:3", "heuristic:2,max=6", "confidence:0.4,max=5", "beta-ts:max=6", "calibration-ts"]),
    seed=st.integers(0, 2**32 - 1),
    alpha=st.floats(0.0, 1.0),
)
def test_policies_respect_bounds_and_are_reproducible(spec: str, seed: int, alpha: float) -> None:
    traces = []
    for _ in range(2):
        policy = make_policy(spec, rng=random.Random(seed))
        env = random.Random(seed + 1)
        rounds = [play_round(policy, env, min(max(alpha, 0.01), 0.99)) for _ in range(30)]
        assert all(0 <= accepted <= drafted <= policy.max_draft_len for drafted, accepted in rounds)
        traces.append(rounds)
    assert traces[0] == traces[1]
