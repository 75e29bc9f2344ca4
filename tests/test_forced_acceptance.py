"""Forced acceptance (`generate(accept_pattern=...)`, benchmark only, not lossless): the realised accepted lengths
follow the pattern, and a forced round does exactly the work of a real round with the same accepted length.

The work is counted by a ModelAdapter subclass that records every `forward_layers` call (start, stop, q) and then
runs it as usual: draft steps are the q = 1 calls over [0, E), verify passes the calls over [E, L), and a round that
drafts nothing runs as the AR step, a q = 1 call over [0, L).
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import TinySpec, scale_late_layers, tiny_model

import executor
from executor.adapter import ModelAdapter
from executor.api import forced_acceptance

# a spec whose exit head at layer 2 agrees with the full model rarely (epsilon 1) and often (epsilon 0.3)
SPEC = TinySpec(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, vocab=160, seed=1)
EXIT_LAYER = 2
PROMPT = [5, 17, 2, 40, 33, 8, 12, 50, 3]  # longer than any verify pass, for telling prefill apart


class CountingAdapter(ModelAdapter):
    """Records (start, stop, q) of every forward_layers call, then runs it unchanged."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.calls: list[tuple[int, int, int]] = []

    def forward_layers(self, hidden, step, cache, start, stop):
        self.calls.append((start, stop, hidden.shape[1]))
        return super().forward_layers(hidden, step, cache, start, stop)

    def work(self, exit_layer: int) -> tuple[int, int, list[int], int]:
        """After prefill: (verify passes, q = 1 passes over [0, E), the q of every verify pass, AR steps)."""
        decode = [call for call in self.calls if call[2] != len(PROMPT)]
        verify = [q for start, stop, q in decode if start == exit_layer and stop == self.num_layers]
        lower = sum(1 for start, stop, q in decode if start == 0 and stop == exit_layer and q == 1)
        ar_steps = sum(1 for start, stop, q in decode if (start, stop, q) == (0, self.num_layers, 1))
        return len(verify), lower, verify, ar_steps


def model(epsilon: float) -> torch.nn.Module:
    return scale_late_layers(tiny_model(SPEC, torch.float64), EXIT_LAYER, epsilon)


def run(adapter, max_new_tokens: int, draft_len: int = 4, **kwargs):
    return executor.generate(
        adapter, [PROMPT], method="eesd", exit_layer=EXIT_LAYER, draft_len=draft_len, max_new_tokens=max_new_tokens,
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("epsilon", [0.3, 1.0])
def test_forcing_the_real_lengths_repeats_the_real_run(epsilon: float) -> None:
    """A real run's own accepted lengths, forced: same tokens, same rounds, same draft steps and verify passes."""
    real_adapter = CountingAdapter(model(epsilon))
    real = run(real_adapter, 40)
    assert 0 < sum(real.stats.accepted) < sum(real.stats.drafted), "need rounds with some drafts rejected"
    forced_adapter = CountingAdapter(model(epsilon))
    forced = run(forced_adapter, 40, accept_pattern=list(real.stats.accepted))
    assert forced.stats.accepted == real.stats.accepted
    assert forced.stats.drafted == real.stats.drafted
    assert forced.stats.rounds == real.stats.rounds
    assert torch.equal(forced.sequences, real.sequences)  # greedy: forcing the true verdict changes nothing
    assert forced_adapter.calls == real_adapter.calls


@given(
    pattern=st.lists(st.integers(0, 6), min_size=1, max_size=5),
    draft_len=st.integers(1, 5),
    max_new_tokens=st.integers(1, 30),
)
def test_accepted_lengths_follow_the_pattern(pattern: list[int], draft_len: int, max_new_tokens: int) -> None:
    """Round i accepts min(pattern[i mod len], drafted); the work is one verify pass per round and one q = 1 pass
    over [0, E) per draft, on a model whose own drafts are almost always rejected (epsilon 1: random weights)."""
    adapter = CountingAdapter(model(1.0))
    result = run(adapter, max_new_tokens, draft_len=draft_len, accept_pattern=pattern)
    stats = result.stats
    expected = [min(pattern[i % len(pattern)], d) for i, d in enumerate(stats.drafted)]
    assert stats.accepted == expected
    assert stats.new_tokens == max_new_tokens == 1 + sum(a + 1 for a in stats.accepted)
    verify_passes, lower_passes, verify_q, ar_steps = adapter.work(EXIT_LAYER)
    assert ar_steps == stats.drafted.count(0)  # a round with no room to draft is the AR step
    assert verify_passes + ar_steps == len(stats.accepted) == stats.rounds
    # every drafting round drafts `drafted` tokens (one q = 1 pass each) and verify runs the newest through [0, E)
    assert lower_passes == sum(stats.drafted) + verify_passes
    assert verify_q == [d + 1 for d in stats.drafted if d]
    emitted = 1  # the prefill's token
    for drafted, accepted in zip(stats.drafted, stats.accepted, strict=True):
        assert drafted == min(draft_len, max_new_tokens - emitted - 1)  # the budget leaves room for the verdict
        emitted += accepted + 1


def test_forced_tokens_are_drafts_then_the_full_model_token() -> None:
    """With every draft forced accepted, the output is the exit head's own greedy continuation between verifies."""
    epsilon_model = model(1.0)
    forced = run(ModelAdapter(epsilon_model), 21, draft_len=4, accept_pattern=[4])
    real = run(ModelAdapter(epsilon_model), 21, draft_len=4)
    assert forced.stats.accepted == [4] * 4
    assert real.stats.accepted != forced.stats.accepted
    assert not torch.equal(forced.sequences, real.sequences), "forced acceptance is not lossless on random weights"


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.7, 0.9, 1.0])
def test_bernoulli_alpha_is_the_per_position_acceptance(alpha: float) -> None:
    """alpha = accepted / checked positions (a round checks accepted + 1 positions unless all were accepted)."""
    draft_len, rows = 4, 6
    stats = executor.generate(
        ModelAdapter(model(1.0)), [PROMPT] * rows, method="eesd", exit_layer=EXIT_LAYER, draft_len=draft_len,
        max_new_tokens=200, accept_pattern=alpha, seed=11,
    ).stats  # fmt: skip
    checked = sum(a + (a < d) for a, d in zip(stats.accepted, stats.drafted, strict=True))
    rounds = len(stats.accepted)
    assert rounds > 150
    estimate = sum(stats.accepted) / checked
    assert abs(estimate - alpha) < 0.05, (estimate, alpha)
    full = [d for d in stats.drafted if d == draft_len]
    mean_length = sum(a for a, d in zip(stats.accepted, stats.drafted, strict=True) if d == draft_len) / len(full)
    expected_length = sum(alpha**i for i in range(1, draft_len + 1))
    assert abs(mean_length - expected_length) < 0.25, (mean_length, expected_length)


@pytest.mark.parametrize("sampling", ["exact", "rejection"])
def test_sampling_modes_follow_the_pattern(sampling: str) -> None:
    """Sampled decoding: the forced rounds keep `accepted` drafts, then a token drawn from the full model there."""
    adapter = CountingAdapter(model(1.0))
    result = run(adapter, 25, draft_len=3, accept_pattern=[2, 0, 3], do_sample=True, sampling=sampling, seed=5)
    stats = result.stats
    assert stats.accepted == [min([2, 0, 3][i % 3], d) for i, d in enumerate(stats.drafted)]
    assert stats.new_tokens == 25
    assert adapter.work(EXIT_LAYER)[0] == stats.rounds
    assert int(result.sequences.max()) < SPEC.vocab


def test_bernoulli_is_seeded() -> None:
    first, second, other = (forced_acceptance(0.6, seed) for seed in (4, 4, 5))
    a, b, c = ([f(8) for _ in range(200)] for f in (first, second, other))
    assert a == b
    assert a != c
    rng = random.Random(4)
    runs = []
    for _ in range(200):
        length = 0
        while length < 8 and rng.random() < 0.6:
            length += 1
        runs.append(length)
    assert a == runs


def test_batch_rows_take_pattern_entries_in_row_order() -> None:
    result = executor.generate(
        ModelAdapter(model(1.0)), [PROMPT, PROMPT[::-1]], method="eesd", exit_layer=EXIT_LAYER, draft_len=3,
        max_new_tokens=13, accept_pattern=[3, 0, 1],
    )  # fmt: skip
    stats = result.stats
    assert stats.accepted == [min([3, 0, 1][i % 3], d) for i, d in enumerate(stats.drafted)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accept_pattern": 1.5}, "alpha must lie in"),
        ({"accept_pattern": -0.1}, "alpha must lie in"),
        ({"accept_pattern": float("nan")}, "alpha must lie in"),
        ({"accept_pattern": True}, "accept_pattern must be"),
        ({"accept_pattern": [2, -1]}, "integers >= 0"),
        ({"accept_pattern": []}, "non-empty"),
        ({"accept_pattern": [1.5]}, "integers >= 0"),
        ({"accept_pattern": 0.5, "method": "ar"}, "needs method 'eesd'"),
        ({"accept_pattern": [1], "method": "ppsd"}, "needs method 'eesd'"),
    ],
)
def test_bad_patterns_raise(kwargs: dict, message: str) -> None:
    arguments = {"method": "eesd", "exit_layer": EXIT_LAYER, "max_new_tokens": 4} | kwargs
    if arguments["method"] != "eesd":
        arguments.pop("exit_layer")
    with pytest.raises(ValueError, match=message):
        executor.generate(ModelAdapter(model(1.0)), [PROMPT], **arguments)


def test_default_is_lossless_accept() -> None:
    """Without accept_pattern nothing is forced: EESD equals AR."""
    adapter = ModelAdapter(model(0.05))
    eesd = run(adapter, 24)
    ar = executor.generate(adapter, [PROMPT], method="ar", max_new_tokens=24)
    assert torch.equal(eesd.sequences, ar.sequences)
