"""Property tests: EESD == AR == HF `model.generate`, greedy, token for token, on tiny random models.

float64: strict equality. float32: equality or a documented near-tie (top-2 logits within 1e-5 at the first
difference, docs/design.md). The epsilon trick (tests/tiny_models.py) makes rounds with none, some and all drafts
accepted occur; `test_all_round_kinds_occur` asserts that each kind does.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from tiny_models import TinySpec, assert_same_or_tie, hf_greedy, scale_late_layers, tiny_model, tiny_specs

import executor
from executor.adapter import LARGE_HEAD_ROWS

EPSILONS = [0.0, 1e-3, 0.05, 0.3, 1.0]
FLOAT32_TIE_TOL = 1e-5

# accepted-length histogram over every EESD round the property tests ran (reported in the terminal summary)
ACCEPTED_HISTOGRAM: Counter[int] = Counter()


def round_kind(drafted: int, accepted: int) -> str:
    if accepted == 0:
        return "none accepted"
    return "all accepted" if accepted == drafted else "some accepted"


@st.composite
def cases(draw, dtype: torch.dtype):
    spec = draw(tiny_specs())
    exit_layer = draw(st.integers(1, spec.num_layers - 1)) if spec.num_layers > 1 else None
    epsilon = draw(st.sampled_from(EPSILONS))
    model = tiny_model(spec, dtype)
    if exit_layer is not None:
        scale_late_layers(model, exit_layer, epsilon)
    prompt = draw(st.lists(st.integers(0, spec.vocab - 1), min_size=1, max_size=32))
    head = draw(st.sampled_from(["shared", "subset"]))
    if head == "subset":  # the shared head over the N lowest ids: drafts only from those, output unchanged
        head = f"shared:{draw(st.integers(1, spec.vocab))}"
    return model, spec, exit_layer, prompt, head


def run_case(model, exit_layer, prompt, draft_len, max_new_tokens, check, head="shared"):
    reference, logits = hf_greedy(model, prompt, max_new_tokens)
    ar = executor.generate(model, prompt, method="ar", max_new_tokens=max_new_tokens)
    check(reference, logits, ar.sequences)
    if exit_layer is None:  # a 1-layer model has no exit layer to draft from
        return
    eesd = executor.generate(model, prompt, method="eesd", exit_layer=exit_layer, draft_len=draft_len,
                             max_new_tokens=max_new_tokens, head=head)  # fmt: skip
    check(reference, logits, eesd.sequences)
    assert eesd.stats.new_tokens == eesd.sequences.shape[1] - len(prompt)
    assert sum(a + 1 for a in eesd.stats.accepted) + 1 >= eesd.stats.new_tokens  # tokens per round = accepted + 1
    for drafted, accepted in zip(eesd.stats.drafted, eesd.stats.accepted, strict=True):
        assert 0 <= accepted <= drafted <= draft_len
        ACCEPTED_HISTOGRAM[accepted] += 1
        if drafted:
            event(round_kind(drafted, accepted))


def exact(reference, logits, other):
    assert other.tolist() == reference.tolist()


def near_tie(reference, logits, other):
    assert_same_or_tie(reference, logits, other, FLOAT32_TIE_TOL)


@given(case=cases(torch.float64), draft_len=st.integers(1, 8), max_new_tokens=st.integers(1, 40))
def test_eesd_equals_ar_equals_hf_float64(case, draft_len, max_new_tokens):
    model, _, exit_layer, prompt, head = case
    large = model.config.vocab_size >= LARGE_HEAD_ROWS
    event(f"head {'subset' if ':' in head else 'shared'}, vocab {'>=' if large else '<'} {LARGE_HEAD_ROWS}")
    run_case(model, exit_layer, prompt, draft_len, max_new_tokens, exact, head)


@given(case=cases(torch.float32), draft_len=st.integers(1, 8), max_new_tokens=st.integers(1, 40))
def test_eesd_equals_ar_equals_hf_float32_with_tie_check(case, draft_len, max_new_tokens):
    model, _, exit_layer, prompt, head = case
    run_case(model, exit_layer, prompt, draft_len, max_new_tokens, near_tie, head)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_all_round_kinds_occur(arch):
    """With epsilon-scaled late layers one generation has rounds with none, some and all drafts accepted."""
    spec = TinySpec(arch=arch, num_layers=4, vocab=64, seed=3)
    model = scale_late_layers(tiny_model(spec), 2, 0.3)
    prompt = list(range(5, 17))
    result = executor.generate(model, prompt, method="eesd", exit_layer=2, draft_len=4, max_new_tokens=120)
    kinds = {round_kind(d, a) for d, a in zip(result.stats.drafted, result.stats.accepted, strict=True) if d}
    assert kinds == {"none accepted", "some accepted", "all accepted"}, result.stats.accepted_histogram()
    reference, _ = hf_greedy(model, prompt, 120)
    assert result.sequences.tolist() == reference.tolist()


def test_zeroed_late_layers_accept_everything():
    """epsilon = 0: layers >= E are the identity, so the shared head drafts exactly the full model's tokens."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=5)), 2, 0.0)
    result = executor.generate(model, [1, 2, 3], method="eesd", exit_layer=2, draft_len=4, max_new_tokens=31)
    assert result.stats.accepted == result.stats.drafted
    assert result.stats.rounds == 6  # 1 token from the prefill, then 6 rounds of 4 accepted + 1 bonus
