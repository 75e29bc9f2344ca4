"""Draft policies: how many tokens the early exit drafts each round.

Torch-free, so that the executor and the simulator drive the same objects. The interface follows HF's
`CandidateGenerator` ("propose, then get feedback"):

    k = policy.begin_round()                 # upper bound on drafts this round (>= 0)
    ... after each draft token:  policy.keep_drafting(drafted, confidence) -> bool
    policy.update(drafted, accepted)         # feedback once the full model has verified the round

`drafted` counts the draft tokens proposed this round, `accepted` the longest verified prefix (0 <= accepted <=
drafted). `confidence` is the exit head's top-1 probability of the latest draft token (policies that do not look at
it set `needs_confidence = False`, so the executor need not compute it). Randomness, where a policy has any, comes
only from the `random.Random` passed in.

Spec strings (`make_policy`): `NAME` or `NAME:ARGS`, ARGS a comma-separated list of `key=value` pairs, where the
first item may also be a bare value for the policy's main parameter:

    fixed:K                      fixed:4, fixed:k=4
    heuristic[:K][,max=M]        HF's schedule starting at K (default 4), capped at M (default 16)
    confidence[:TAU][,max=M]     stop once the draft's top-1 probability < TAU (default 0.5), M default 8
    beta-ts[:cost=C|costs=C1/../CK][,max=M][,a=A][,b=B]
    calibration-ts[:cost=C|costs=C1/../CK][,max=M][,buckets=N][,a=A][,b=B]

`cost` is c = (one draft step's time) / (one verify pass's time): a round of k drafts then costs 1 + k·c verify
passes. `costs=C1/C2/.../CK` gives the round costs themselves instead, measured: C_k = (the time of a round of k
drafts, its verify pass included) / (one AR step), for k = 1..K (a round of no drafts is an AR step: C_0 = 1). A
verify pass's time grows with its width where the hardware is not purely bound by reading weights (a CPU's kernels
can double their time from 3 to 4 rows), which one c cannot say. K caps the drafts (`max` may lower it, not raise
it). When the spec gives neither, the caller's measured table (`make_policy(..., round_costs=...)`) is used, else
its measured ratio (`cost_ratio=...`), else `DEFAULT_COST_RATIO`. `a`, `b` are the Beta prior.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

DEFAULT_COST_RATIO = 0.25  # draft step / verify pass with KV reuse is about E / L; a quarter-depth exit
DEFAULT_MAX_DRAFT_LEN = 8  # the Thompson-sampling policies' max


@runtime_checkable
class DraftPolicy(Protocol):
    """A draft-length policy: `begin_round` gives a round's budget k (0: no draft, the round is an AR step),
    `keep_drafting` may stop early, `update` sees the round's drafted and accepted counts. A round that drafts nothing
    is no observation: `update(0, 0)` must leave the policy as it was (the executor draws the budgets of consecutive
    zero-draft rounds ahead, to chain them as AR steps; the output never depends on the policy)."""

    max_draft_len: int
    needs_confidence: bool

    def begin_round(self) -> int: ...

    def keep_drafting(self, drafted: int, confidence: float) -> bool: ...

    def update(self, drafted: int, accepted: int) -> None: ...


def round_budget(policy: DraftPolicy, remaining: int, ahead: int = 0) -> int:
    """A row's draft budget for the round `ahead` one-token rounds from now (the executor and the simulator draw
    zero-draft rounds ahead): the policy's k, capped so that the round's drafts and the full model's token fit in the
    row's `remaining` tokens; 0, without asking the policy, when nothing is left by then."""
    return min(policy.begin_round(), remaining - ahead - 1) if remaining > ahead else 0


@dataclass
class FixedPolicy:
    """Always draft `draft_len` tokens."""

    draft_len: int
    needs_confidence: bool = False

    def __post_init__(self) -> None:
        if self.draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {self.draft_len}")

    @property
    def max_draft_len(self) -> int:
        return self.draft_len

    def begin_round(self) -> int:
        return self.draft_len

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return drafted < self.draft_len

    def update(self, drafted: int, accepted: int) -> None:
        pass


@dataclass
class HeuristicPolicy:
    """HF's `num_assistant_tokens_schedule="heuristic"`: k += 2 after a fully accepted round, else k -= 1.

    k stays within [1, max_draft_len]; it starts at `draft_len`.
    """

    draft_len: int = 4
    max_draft_len: int = 16
    needs_confidence: bool = False

    def __post_init__(self) -> None:
        _check_max(self.max_draft_len)
        if not 1 <= self.draft_len <= self.max_draft_len:
            raise ValueError(f"initial draft_len must be in [1, max={self.max_draft_len}], got {self.draft_len}")

    def begin_round(self) -> int:
        return self.draft_len

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return drafted < self.draft_len

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        step = 2 if accepted == drafted else -1
        self.draft_len = min(self.max_draft_len, max(1, self.draft_len + step))


@dataclass
class ConfidencePolicy:
    """Draft&Verify / Kangaroo: stop drafting once the latest draft's top-1 probability is below `tau`.

    The low-confidence draft itself is still verified; at most `max_draft_len` drafts per round.
    """

    tau: float = 0.5
    max_draft_len: int = 8
    needs_confidence: bool = True

    def __post_init__(self) -> None:
        _check_max(self.max_draft_len)
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"confidence threshold tau must be in [0, 1], got {self.tau}")

    def begin_round(self) -> int:
        return self.max_draft_len

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return drafted < self.max_draft_len and confidence >= self.tau

    def update(self, drafted: int, accepted: int) -> None:
        pass


def expected_tokens_per_cost(theta: float, draft_len: int, cost_ratio: float) -> float:
    """Tokens per round over the round's cost in verify passes: (1 − θ^(k+1)) / ((1 − θ)(k·c + 1)).

    Leviathan et al.'s expected tokens per round, (1 − θ^(k+1)) / (1 − θ), is k + 1 at θ = 1.
    """
    return expected_tokens(theta, draft_len) / (draft_len * cost_ratio + 1.0)


def expected_tokens(theta: float, draft_len: int) -> float:
    """Expected tokens of a round of k drafts accepted independently with probability θ: (1 − θ^(k+1)) / (1 − θ)."""
    return draft_len + 1.0 if theta >= 1.0 else (1.0 - theta ** (draft_len + 1)) / (1.0 - theta)


def linear_round_costs(cost_ratio: float, max_draft_len: int) -> tuple[float, ...]:
    """(1, 1 + c, ..., 1 + max·c): the round costs in verify passes that one draft/verify ratio c says."""
    return tuple(k * cost_ratio + 1.0 for k in range(max_draft_len + 1))


def best_draft_len(
    theta: float, cost_ratio: float, max_draft_len: int, round_costs: tuple[float, ...] | None = None
) -> int:
    """k*(θ) = argmax over k in [0, max_draft_len] of expected tokens over the round's cost (smallest k on ties): the
    cost 1 + k·c (`expected_tokens_per_cost`), or `round_costs[k]` where a table is given (C_0 = 1: a round of no
    drafts is one AR step, one token). The same arithmetic, each round's (k + 1, cost) worked out once per table,
    the values of k >= 1 in one list whose first maximum (`max` keeps the first of equals, as a loop taking only a
    larger value does) beats k = 0 or not. Beta-TS works its pairs out once per policy and calls
    `_best_draft_len` every round, in the simulator's hot path."""
    return _best_draft_len(
        theta, _round_costs(round_costs or linear_round_costs(cost_ratio, max_draft_len), max_draft_len)
    )


def _best_draft_len(theta: float, costs: tuple[tuple[float, float], ...]) -> int:
    """`best_draft_len` over (k + 1, C_k) pairs worked out once (`_round_costs`)."""
    if theta >= 1.0:
        values = [power / cost for power, cost in costs]
    else:
        rest = 1.0 - theta
        values = [(1.0 - theta**power) / rest / cost for power, cost in costs]
    top = max(values)
    return values.index(top) + 1 if top > 1.0 else 0


@functools.lru_cache(maxsize=256)
def _round_costs(round_costs: tuple[float, ...], max_draft_len: int) -> tuple[tuple[float, float], ...]:
    """(k + 1, C_k) for k in 1..max_draft_len: the power of θ (a float: `float ** int` takes the int as that float,
    so the power is the same, at less cost) and the round's cost."""
    return tuple((k + 1.0, round_costs[k]) for k in range(1, max_draft_len + 1))


@dataclass
class BetaTSPolicy:
    """Beta-TS (Thompson sampling over a Beta posterior of the per-token acceptance probability θ).

    Each round: θ ~ Beta(a, b), draft k*(θ) = argmax_k (1 − θ^(k+1)) / ((1 − θ)·C_k), k in [0, max], with the round
    cost C_k = k·c + 1 (`cost_ratio` c = draft step time / verify pass time) or, given `round_costs`, the measured
    C_k of that table (C_0 = 1, one entry per k up to at least `max_draft_len`). After verification the accepted run
    is a geometric observation: a += accepted, b += 1 if a draft was rejected.
    """

    cost_ratio: float = DEFAULT_COST_RATIO
    max_draft_len: int = 8
    prior_a: float = 1.0
    prior_b: float = 1.0
    rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)
    needs_confidence: bool = False
    round_costs: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_max(self.max_draft_len)
        _check_cost(self.cost_ratio)
        _check_prior(self.prior_a, self.prior_b)
        self.round_costs = _checked_table(self.round_costs, self.max_draft_len)
        table = self.round_costs or linear_round_costs(self.cost_ratio, self.max_draft_len)
        self._pairs = _round_costs(table, self.max_draft_len)  # once per policy: begin_round is a hot path
        self.a, self.b = float(self.prior_a), float(self.prior_b)
        self._draft_len = 0

    def begin_round(self) -> int:
        theta = self.rng.betavariate(self.a, self.b)
        self._draft_len = _best_draft_len(theta, self._pairs)
        return self._draft_len

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return drafted < self._draft_len

    def update(self, drafted: int, accepted: int) -> None:
        self.a += accepted
        if accepted < drafted:
            self.b += 1.0


@dataclass
class CalibrationTSPolicy:
    """Calibration-TS: Beta-TS with one Beta(a, b) posterior per bucket of the exit head's confidence.

    Confidence in [0, 1] falls into one of `buckets` equal-width buckets. Every round drafts at least once; after
    draft j, θ_j is sampled from that draft's bucket and drafting goes on while draft j + 1 pays for itself:

        θ_j · P_j · C_j >= (C_(j+1) − C_j) · T_j,   P_j = θ_1···θ_j,  T_j = 1 + P_1 + … + P_j,

    i.e. while its expected extra tokens P_j θ (θ_j standing in for its own, unseen θ) pay what it adds to the
    round's cost at the round's current rate T_j / C_j (tokens per unit of cost). The round cost C_j is 1 + j·c, or
    C_j of `round_costs` (a measured table, as Beta-TS's): a step in the table (a CPU's verify kernels slowing from
    4 tokens on) stops drafting before it unless the drafts are sure. With 1 + j·c and j = 1 the rule is
    θ² >= c(1 + θ) / (1 + c), where Beta-TS's k*(θ) reaches 2. Feedback is per token: the accepted drafts count as
    successes of their buckets, the first rejected draft as a failure of its bucket; later drafts are unobserved
    (they were conditioned on a wrong prefix).
    """

    cost_ratio: float = DEFAULT_COST_RATIO
    max_draft_len: int = 8
    buckets: int = 10
    prior_a: float = 1.0
    prior_b: float = 1.0
    rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)
    needs_confidence: bool = True
    round_costs: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_max(self.max_draft_len)
        _check_cost(self.cost_ratio)
        _check_prior(self.prior_a, self.prior_b)
        self.round_costs = _checked_table(self.round_costs, self.max_draft_len)
        self._costs = self.round_costs or linear_round_costs(self.cost_ratio, self.max_draft_len)
        if self.buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {self.buckets}")
        self.a = [float(self.prior_a)] * self.buckets
        self.b = [float(self.prior_b)] * self.buckets
        self._round_buckets: list[int] = []
        self._prefix_prob, self._tokens = 1.0, 1.0

    def bucket(self, confidence: float) -> int:
        return min(self.buckets - 1, max(0, int(confidence * self.buckets)))

    def begin_round(self) -> int:
        self._round_buckets = []
        self._prefix_prob, self._tokens = 1.0, 1.0
        return self.max_draft_len

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        index = self.bucket(confidence)
        self._round_buckets.append(index)
        theta = self.rng.betavariate(self.a[index], self.b[index])
        if drafted >= self.max_draft_len or self._prefix_prob <= 0.0:
            return False
        self._prefix_prob *= theta
        self._tokens += self._prefix_prob
        cost = self._costs[drafted]
        return theta * self._prefix_prob * cost >= (self._costs[drafted + 1] - cost) * self._tokens

    def update(self, drafted: int, accepted: int) -> None:
        seen = self._round_buckets
        for index in seen[: min(accepted, len(seen))]:
            self.a[index] += 1.0
        if accepted < drafted and accepted < len(seen):
            self.b[seen[accepted]] += 1.0
        self._round_buckets = []


def _check_max(max_draft_len: int) -> None:
    if max_draft_len < 1:
        raise ValueError(f"max draft length must be >= 1, got {max_draft_len}")


def _check_cost(cost_ratio: float) -> None:
    if not cost_ratio > 0.0:
        raise ValueError(f"cost ratio c (draft step / verify pass) must be > 0, got {cost_ratio}")


def _checked_table(round_costs: tuple[float, ...] | None, max_draft_len: int) -> tuple[float, ...] | None:
    """`round_costs` as a tuple of floats C_0..C_K with C_0 = 1 and K >= `max_draft_len`, every C_k > 0 and finite;
    None stays None (the policy's cost ratio then says the costs)."""
    if round_costs is None:
        return None
    table = tuple(float(cost) for cost in round_costs)
    if len(table) < max_draft_len + 1 or table[0] != 1.0:
        raise ValueError(
            f"round costs need C_0 = 1 (a round of no drafts is one AR step) and one cost per draft count up to the "
            f"max draft length {max_draft_len}, got {list(table)}"
        )
    if not all(0.0 < cost < float("inf") for cost in table):
        raise ValueError(f"round costs must be finite and > 0, got {list(table)}")
    return table


def _check_prior(a: float, b: float) -> None:
    if not (a > 0.0 and b > 0.0):
        raise ValueError(f"Beta prior needs a > 0 and b > 0, got a={a}, b={b}")


# name -> (main positional key or None, allowed keys, usage)
_SPECS: dict[str, tuple[str | None, tuple[str, ...], str]] = {
    "fixed": ("k", ("k",), "fixed:K"),
    "heuristic": ("k", ("k", "max"), "heuristic[:K][,max=M]"),
    "confidence": ("tau", ("tau", "max"), "confidence[:TAU][,max=M]"),
    "beta-ts": (None, ("cost", "costs", "max", "a", "b"), "beta-ts[:cost=C|costs=C1/../CK][,max=M][,a=A][,b=B]"),
    "calibration-ts": (
        None,
        ("cost", "costs", "max", "buckets", "a", "b"),
        "calibration-ts[:cost=C|costs=C1/../CK][,max=M][,buckets=N][,a=A][,b=B]",
    ),
}


def policy_usage() -> str:
    """One line listing every policy's spec syntax."""
    return "; ".join(usage for _, _, usage in _SPECS.values())


def with_cost(spec: str, cost_ratio: float, round_costs: tuple[float, ...] | None = None) -> str:
    """`spec` with its costs pinned where the policy takes a cost and the spec gives none: `costs=` to the round
    costs of `round_costs` for k = 1..max (4 decimals; the spec's own `max` or the policy's default) where a table is
    given, else `cost=` to `cost_ratio`, so that every reader of the spec draws with the same costs; any other spec
    unchanged."""
    name, args = parse_policy_spec(spec)
    if "cost" not in _SPECS[name][1] or "cost" in args or "costs" in args:
        return spec
    if round_costs is None:
        pinned = f"cost={cost_ratio:.4f}"
    else:
        count = int(args.get("max", DEFAULT_MAX_DRAFT_LEN))
        pinned = f"costs={format_costs(round_costs[1 : count + 1])}"
    return f"{spec}{',' if args else ':'}{pinned}"


def format_costs(costs: tuple[float, ...]) -> str:
    """Round costs as a spec's `costs=` value: `1.4620/1.9252/...` (4 decimals)."""
    return "/".join(f"{cost:.4f}" for cost in costs)


def parse_policy_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split `"beta-ts:cost=0.1,max=8"` into `("beta-ts", {"cost": "0.1", "max": "8"})`, checking the keys."""
    name, _, arg_text = spec.strip().partition(":")
    if name not in _SPECS:
        raise ValueError(f"unknown draft policy {spec!r}; allowed: {policy_usage()}")
    main_key, allowed, usage = _SPECS[name]
    args: dict[str, str] = {}
    items = [item.strip() for item in arg_text.split(",")] if arg_text.strip() else []
    for position, item in enumerate(items):
        key, sep, value = item.partition("=")
        if not sep:
            if position != 0 or main_key is None:
                raise ValueError(f"policy {spec!r}: bare value {item!r} not allowed here; expected {usage}")
            key, value = main_key, item
        key = key.strip()
        if key not in allowed or key in args:
            raise ValueError(f"policy {spec!r}: unknown or repeated key {key!r}; expected {usage}")
        args[key] = value.strip()
    if name == "fixed" and "k" not in args:
        raise ValueError(f"policy {spec!r}: expected {usage} with an integer K >= 1")
    if "cost" in args and "costs" in args:
        raise ValueError(f"policy {spec!r}: give cost=C or costs=C1/../CK, not both; expected {usage}")
    return name, args


def make_policy(
    spec: str | DraftPolicy,
    *,
    rng: random.Random | None = None,
    cost_ratio: float | None = None,
    round_costs: tuple[float, ...] | None = None,
) -> DraftPolicy:
    """Build a policy from a spec such as `"fixed:4"` or `"beta-ts:cost=0.1,max=8"`.

    A policy object is returned unchanged. `rng` feeds the Thompson-sampling policies (default `Random(0)`);
    `round_costs` (C_0 = 1, C_1, ..., measured) and `cost_ratio` are the caller's measured costs, used when the spec
    gives neither `cost=` nor `costs=` (the table first; it must reach the policy's max draft length).
    """
    if not isinstance(spec, str):
        return spec
    name, args = parse_policy_spec(spec)
    usage = _SPECS[name][2]
    try:
        return _build(name, args, rng or random.Random(0), cost_ratio, round_costs)
    except ValueError as err:
        raise ValueError(f"policy {spec!r}: {err}; expected {usage}") from None


def _build(
    name: str,
    args: dict[str, str],
    rng: random.Random,
    cost_ratio: float | None,
    round_costs: tuple[float, ...] | None,
) -> DraftPolicy:
    def num(key: str, kind: type, default: float | int) -> float | int:
        if key not in args:
            return default
        try:
            return kind(args[key])
        except ValueError:
            raise ValueError(f"{key}={args[key]!r} is not a valid {kind.__name__}") from None

    if name == "fixed":
        return FixedPolicy(int(num("k", int, 0)))
    if name == "heuristic":
        return HeuristicPolicy(int(num("k", int, 4)), int(num("max", int, 16)))
    if name == "confidence":
        return ConfidencePolicy(float(num("tau", float, 0.5)), int(num("max", int, 8)))
    given = _spec_costs(args["costs"]) if "costs" in args else None
    longest = len(given) - 1 if given else DEFAULT_MAX_DRAFT_LEN
    max_draft_len = int(num("max", int, longest))
    if given and max_draft_len > longest:
        raise ValueError(f"max={max_draft_len} drafts more than costs= gives ({longest} round costs)")
    if "cost" not in args and given is None and round_costs is not None:
        given = tuple(round_costs)
    cost = float(num("cost", float, cost_ratio if cost_ratio is not None else DEFAULT_COST_RATIO))
    prior = {"prior_a": float(num("a", float, 1.0)), "prior_b": float(num("b", float, 1.0))}
    table = given[: max_draft_len + 1] if given else None
    if name == "beta-ts":
        return BetaTSPolicy(cost, max_draft_len, rng=rng, round_costs=table, **prior)
    buckets = int(num("buckets", int, 10))
    return CalibrationTSPolicy(cost, max_draft_len, buckets, rng=rng, round_costs=table, **prior)


def _spec_costs(text: str) -> tuple[float, ...]:
    """`"1.4/1.8/2.7"` (the costs of rounds of 1, 2, 3 drafts, in AR steps) as (1.0, 1.4, 1.8, 2.7)."""
    try:
        costs = tuple(float(item) for item in text.split("/"))
    except ValueError:
        expected = "a '/'-separated list of numbers (rounds of 1, 2, ... drafts)"
        raise ValueError(f"costs={text!r} is not {expected}") from None
    return (1.0, *costs)
