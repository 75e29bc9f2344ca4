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
    expected_tokens,
    expected_tokens_per_cost,
    linear_round_costs,
    make_policy,
    with_cost,
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


def run_env(
    policy: DraftPolicy, alpha: float, cost: float | tuple[float, ...], rounds: int, seed: int = 1
) -> tuple[float, list[int]]:
    """Tokens per unit cost over the second half of `rounds` rounds, and every round's draft count; a round of k
    drafts costs 1 + k·cost, or cost[k] where `cost` is a table of round costs."""
    env = random.Random(seed)
    tokens = spent = 0.0
    lengths = []
    for i in range(rounds):
        drafted, accepted = play_round(policy, env, alpha)
        lengths.append(drafted)
        if i >= rounds // 2:  # long-run rate: second half only
            tokens += accepted + 1
            spent += cost[drafted] if isinstance(cost, tuple) else drafted * cost + 1
    return tokens / spent, lengths


# A CPU's round costs (AR steps): a draft step costs 0.3 of a step and a verify pass's kernels slow down from 4
# tokens on (3 drafts), as the 2-core Xeon's profile shows (SmolLM2's LM head 9 -> 11 -> 20 ms from 1 to 3 to 4 rows)
CLIFF = (1.0, 1.35, 1.7, 2.7, 3.05, 3.4, 3.75, 4.1, 4.45)


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


@given(theta=st.floats(0.0, 1.0), cost=st.floats(0.01, 2.0), longest=st.integers(1, 12))
def test_a_linear_table_chooses_as_the_cost_ratio_does(theta: float, cost: float, longest: int) -> None:
    assert best_draft_len(theta, cost, longest, linear_round_costs(cost, longest)) == best_draft_len(
        theta, cost, longest
    )


@given(theta=st.floats(0.0, 1.0))
def test_a_table_chooses_the_draft_length_with_the_most_tokens_per_cost(theta: float) -> None:
    """Against brute force over the table (ties to the smaller k), and never into the cliff where it does not pay."""
    chosen = best_draft_len(theta, 0.35, 8, CLIFF)
    rates = [expected_tokens(theta, k) / CLIFF[k] for k in range(9)]
    assert rates[chosen] == max(rates) and all(rate < rates[chosen] for rate in rates[:chosen])
    assert chosen < 3 or rates[chosen] > max(rates[:3])


def test_beta_ts_with_a_measured_table_beats_the_same_policy_with_one_ratio() -> None:
    """At α = 0.85 one ratio c = 0.35 (the per-draft cost below the cliff) drafts past the cliff and pays for it;
    the table keeps Beta-TS at the best k under the true costs, within 5% of its rate."""
    alpha = 0.85
    best = max(range(9), key=lambda k: expected_tokens(alpha, k) / CLIFF[k])
    best_rate = expected_tokens(alpha, best) / CLIFF[best]
    table_rate, lengths = run_env(BetaTSPolicy(0.35, 8, rng=random.Random(7), round_costs=CLIFF), alpha, CLIFF, 4000)
    ratio_rate, ratio_lengths = run_env(BetaTSPolicy(0.35, 8, rng=random.Random(7)), alpha, CLIFF, 4000)
    assert best == 2 and statistics.median(lengths[-1000:]) == 2 and statistics.median(ratio_lengths[-1000:]) >= 3
    assert table_rate >= 0.95 * best_rate and table_rate > 1.05 * ratio_rate, (table_rate, ratio_rate, best_rate)


def test_calibration_ts_weighs_the_next_draft_by_what_it_adds_to_the_table() -> None:
    """Draft j + 1 goes ahead while θ_j P_j C_j >= (C_(j+1) − C_j) T_j: with θ near 0.9 a linear c = 0.35 drafts on,
    while the table stops before the draft that crosses its cliff (3 drafts cost 2.7 steps, 2 cost 1.7). A linear
    table draws and decides exactly as the ratio."""
    kept = {}
    for name, table in (("cliff", CLIFF), ("linear", None)):
        policy = CalibrationTSPolicy(0.35, 8, buckets=1, rng=random.Random(0), round_costs=table)
        policy.a, policy.b = [900.0], [100.0]  # θ near 0.9 for every draft
        policy.begin_round()
        kept[name] = [policy.keep_drafting(j, 0.9) for j in (1, 2)]  # the round ends at the first False
    assert kept == {"cliff": [True, False], "linear": [True, True]}, kept
    twins = [
        CalibrationTSPolicy(0.3, 6, rng=random.Random(4), round_costs=linear_round_costs(0.3, 6)),
        CalibrationTSPolicy(0.3, 6, rng=random.Random(4)),
    ]
    traces = [run_env(policy, 0.7, 0.3, 300)[1] for policy in twins]
    assert traces[0] == traces[1]


def test_calibration_ts_drafts_on_where_beta_ts_would_draft_two() -> None:
    """With 1 + j·c the rule after the first draft, θ² >= c(1 + θ) / (1 + c), is where Beta-TS's k*(θ) reaches 2."""
    for theta in (0.3, 0.5, 0.6, 0.7, 0.8, 0.95):
        policy = CalibrationTSPolicy(0.35, 8, buckets=1, rng=random.Random(0))
        policy.a, policy.b = [theta * 1e7], [(1 - theta) * 1e7]  # θ drawn within 1e-3 of `theta`
        policy.begin_round()
        assert policy.keep_drafting(1, 0.5) == (best_draft_len(theta, 0.35, 8) >= 2), theta


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("beta-ts:costs=1.4/1.8/2.9", ((1.0, 1.4, 1.8, 2.9), 3)),
        ("beta-ts:costs=1.4/1.8/2.9,max=2", ((1.0, 1.4, 1.8), 2)),
        ("calibration-ts:costs=1.2/1.4,buckets=4", ((1.0, 1.2, 1.4), 2)),
    ],
)
def test_costs_in_a_spec_set_the_table_and_the_max(spec: str, expected: tuple) -> None:
    policy = make_policy(spec, cost_ratio=0.9, round_costs=CLIFF)  # the spec's own table wins over the caller's
    assert (policy.round_costs, policy.max_draft_len) == expected


def test_the_callers_table_is_used_where_the_spec_gives_no_cost() -> None:
    assert make_policy("beta-ts", cost_ratio=0.3, round_costs=CLIFF).round_costs == CLIFF
    assert make_policy("beta-ts:max=4", round_costs=CLIFF).round_costs == CLIFF[:5]
    assert make_policy("beta-ts:cost=0.2", round_costs=CLIFF).round_costs is None  # the spec's ratio wins
    with pytest.raises(ValueError, match="one cost per draft count up to the max draft length 12"):
        make_policy("beta-ts:max=12", round_costs=CLIFF)


def test_with_cost_pins_the_table_to_the_policys_max() -> None:
    assert with_cost("beta-ts", 0.3) == "beta-ts:cost=0.3000"
    assert with_cost("beta-ts:max=3", 0.3, CLIFF) == "beta-ts:max=3,costs=1.3500/1.7000/2.7000"
    assert with_cost("beta-ts:cost=0.1", 0.3, CLIFF) == "beta-ts:cost=0.1"
    assert with_cost("fixed:2", 0.3, CLIFF) == "fixed:2"
    pinned = with_cost("calibration-ts", 0.3, CLIFF)
    assert make_policy(pinned).round_costs == CLIFF


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
        ("beta-ts:cost=0.2,costs=1.2", "give cost=C or costs=C1/../CK, not both"),
        ("beta-ts:costs=1.2/x", "costs='1.2/x' is not a '/'-separated list of numbers"),
        ("beta-ts:costs=1.2/1.4,max=3", "max=3 drafts more than costs= gives (2 round costs)"),
        ("calibration-ts:costs=1.2/-1", "round costs must be finite and > 0"),
        ("beta-ts:costs=1.2/nan", "round costs must be finite and > 0"),
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
