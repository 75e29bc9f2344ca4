"""The verify rule (executor/verify.py): against plain Python references, PPSD's four tick verdicts, and that EESD and
PPSD decide with it (patching the rule changes what they accept; nothing else decides)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import TinySpec, scale_late_layers, tiny_model

import executor
import executor.verify as verify
from executor.adapter import ModelAdapter
from executor.decoding import TokenSink
from executor.ppsd import decode_ppsd
from executor.sampling import ACCEPT_SALT, SamplingConfig, TokenSelector, uniform_noise
from executor.verify import TickVerdict, judge_tick, match_verdicts, rejection_verdicts, tick_verdict


def longest_prefix(drafts: list[int], full: list[int], count: int) -> tuple[int, int]:
    """The rule in plain Python: accept d_i while i <= count and d_i == x_{i-1}; then x_a."""
    accepted = 0
    while accepted < count and drafts[accepted] == full[accepted]:
        accepted += 1
    return accepted, full[accepted]


@st.composite
def rounds(draw):
    """A batch round: drafts that agree with the full model's tokens for a while (so long prefixes occur), then
    anything; each row's own count <= k."""
    rows, k, vocab = draw(st.integers(1, 5)), draw(st.integers(0, 6)), draw(st.integers(2, 5))
    full = draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=k + 1, max_size=k + 1), min_size=rows,
                         max_size=rows))  # fmt: skip
    drafts = []
    for row in full:
        agree = draw(st.integers(0, k))
        tail = draw(st.lists(st.integers(0, vocab - 1), min_size=k - agree, max_size=k - agree))
        drafts.append(row[:agree] + tail)
    counts = draw(st.lists(st.integers(0, k), min_size=rows, max_size=rows))
    return drafts, full, counts


@given(rounds())
def test_match_verdicts_is_the_longest_agreeing_prefix(case) -> None:
    drafts, full, counts = case
    k = len(full[0]) - 1
    accepted, token = match_verdicts(
        torch.tensor(drafts, dtype=torch.long).view(len(full), k), torch.tensor(full), torch.tensor(counts)
    )
    expected = [longest_prefix(d, f, c) for d, f, c in zip(drafts, full, counts, strict=True)]
    assert list(zip(accepted.tolist(), token.tolist(), strict=True)) == expected


@given(rounds(), st.integers(0, 2**31))
def test_rejection_accepts_the_run_of_passed_tests(case, seed: int) -> None:
    """Rejection sampling's accepted count: the leading run of own drafts with u_i q_i(d_i) < p_{i-1}(d_i), with u_i
    keyed by the draft's position, as a plain loop computes it."""
    drafts, full, counts = case
    rows, k = len(full), len(full[0]) - 1
    vocab = 1 + max(t for row in full + drafts for t in row)
    generator = torch.Generator().manual_seed(seed)
    draft_probs = torch.rand(rows, k, vocab, generator=generator, dtype=torch.float64).softmax(-1)
    target_probs = torch.rand(rows, k + 1, vocab, generator=generator, dtype=torch.float64).softmax(-1)
    selector = TokenSelector(SamplingConfig(do_sample=True, mode="rejection", seed=seed), [0] * rows, 0, [], "cpu")
    targets = torch.arange(rows).unsqueeze(1) * 100 + torch.arange(k + 1)
    draft_ids = torch.tensor(drafts, dtype=torch.long).view(rows, k)
    accepted, _ = rejection_verdicts(selector, draft_ids, draft_probs, target_probs, torch.tensor(counts), targets)
    noise = uniform_noise(selector.seed, targets, ACCEPT_SALT).tolist()
    for row in range(rows):
        run = 0
        while run < counts[row]:
            d = drafts[row][run]
            if not noise[row][run] * float(draft_probs[row, run, d]) < float(target_probs[row, run, d]):
                break
            run += 1
        assert int(accepted[row]) == run


@pytest.mark.parametrize(
    ("held", "draft", "predicted", "verdict"),
    [
        (False, 7, 7, TickVerdict.NONE),  # nothing left the pipe
        (True, 7, 7, TickVerdict.CONFIRM),  # the draft in flight equals the full model's token
        (True, 6, 7, TickVerdict.FLUSH),  # it does not
        (True, -1, 7, TickVerdict.EMIT),  # no draft in flight
    ],
)
def test_tick_verdict_in_all_four_cases(held: bool, draft: int, predicted: int, verdict: TickVerdict) -> None:
    assert judge_tick(held, draft, predicted) == verdict
    on_tensors = tick_verdict(torch.tensor([held]), torch.tensor([draft]), torch.tensor([predicted]))
    assert on_tensors.dtype == torch.long and on_tensors.tolist() == [int(verdict)]


def test_tick_verdict_is_the_rule_at_depth_one() -> None:
    """Every (held, draft, predicted) at once: CONFIRM / FLUSH exactly where `match_verdicts` with one own draft
    accepts / rejects it."""
    held = torch.tensor([True, True, True, False, True])
    draft = torch.tensor([3, 4, -1, 3, 0])
    predicted = torch.tensor([3, 5, 2, 3, 0])
    verdicts = tick_verdict(held, draft, predicted).tolist()
    assert verdicts == [TickVerdict.CONFIRM, TickVerdict.FLUSH, TickVerdict.EMIT, TickVerdict.NONE,
                        TickVerdict.CONFIRM]  # fmt: skip
    in_flight = (draft >= 0).long()
    accepted, _ = match_verdicts(draft.unsqueeze(1), torch.stack([predicted, predicted], 1), in_flight)
    for verdict, a, holds, c in zip(verdicts, accepted.tolist(), held.tolist(), in_flight.tolist(), strict=True):
        if holds and c:
            assert verdict == (TickVerdict.CONFIRM if a else TickVerdict.FLUSH)


# --------------------------------------------------------------------------------------- the decoders use the rule
PROMPT = [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """Drafts often but not always right (exit layer 2 of 6)."""
    return scale_late_layers(tiny_model(TinySpec(vocab=61, num_layers=6, seed=4)), 2, 0.1)


def _eesd(model, **kwargs):
    return executor.generate(model, PROMPT, method="eesd", exit_layer=2, draft_len=3, max_new_tokens=30, **kwargs)


def _ppsd(model):
    sink = TokenSink(30, [], None)
    stats = decode_ppsd(ModelAdapter(model), PROMPT, sink, None, stages=3, exit_layer=2)
    return sink.tokens, stats


def _accept_nothing(drafts, full, counts):
    return torch.zeros(drafts.shape[0], dtype=torch.long, device=drafts.device)


def _accept_every_own(drafts, full, counts):
    return counts.clone()


def test_the_rule_as_it_is_accepts_some_and_rejects_some(model) -> None:
    ar = executor.generate(model, PROMPT, method="ar", max_new_tokens=30).sequences
    eesd = _eesd(model)
    tokens, stats = _ppsd(model)
    assert torch.equal(eesd.sequences, ar) and tokens == ar[0, len(PROMPT) :].tolist()
    assert 0 < sum(eesd.stats.accepted) < sum(eesd.stats.drafted)
    assert stats.confirms > 0 and stats.flushes > 0


@pytest.mark.parametrize("penalty", [None, 1.5])
def test_eesd_and_ppsd_decide_with_the_rule(model, monkeypatch, penalty) -> None:
    """Patched to accept nothing, the rule makes EESD accept nothing and PPSD flush every draft; both stay lossless
    (the full model's token is always emitted). Patched to accept every own draft, both emit wrong drafts."""
    ar = executor.generate(model, PROMPT, method="ar", max_new_tokens=30, repetition_penalty=penalty).sequences
    with monkeypatch.context() as patch:
        patch.setattr(verify, "accepted_prefix", _accept_nothing)
        eesd = _eesd(model, repetition_penalty=penalty)
        assert torch.equal(eesd.sequences, ar)
        assert sum(eesd.stats.drafted) > 0 and sum(eesd.stats.accepted) == 0
        if penalty is None:
            tokens, stats = _ppsd(model)
            assert tokens == ar[0, len(PROMPT) :].tolist()
            assert stats.confirms == 0 and stats.flushes > 0
    with monkeypatch.context() as patch:
        patch.setattr(verify, "accepted_prefix", _accept_every_own)
        eesd = _eesd(model, repetition_penalty=penalty)
        assert sum(eesd.stats.accepted) == sum(eesd.stats.drafted) > 0
        assert not torch.equal(eesd.sequences, ar)
        if penalty is None:
            tokens, stats = _ppsd(model)
            assert stats.flushes == 0 and tokens != ar[0, len(PROMPT) :].tolist()


def test_rejection_sampling_decides_with_the_rule(model, monkeypatch) -> None:
    """Rejection sampling's accepted run is the rule's too (`accepted_run`): patched to accept nothing, EESD does."""
    monkeypatch.setattr(verify, "accepted_run", lambda passed: torch.zeros(passed.shape[0], dtype=torch.long))
    out = _eesd(model, do_sample=True, sampling="rejection", seed=3)
    assert sum(out.stats.drafted) > 0 and sum(out.stats.accepted) == 0
