"""suppress_tokens, begin_suppress_tokens and single-token bad_words_ids: HF's processors, on every method."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batch_and_dropin import PAD, batch_cases, left_pad
from tiny_models import TinySpec, scale_late_layers, tiny_model

import executor
from executor.sampling import SamplingConfig


@settings(max_examples=25, deadline=None)
@given(case=batch_cases(), draft_len=st.integers(1, 5), min_new=st.integers(0, 3), data=st.data())
def test_suppressed_tokens_match_hf_greedy(case, draft_len, min_new, data):
    """The ids suppressed are drawn from the tokens the model outputs unsuppressed (and its first new tokens), so
    that suppressing them changes the output."""
    model, _, exit_layer, prompts = case
    ids, mask = left_pad(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=min_new, pad_token_id=PAD, eos_token_id=1)
    free = model.generate(ids, do_sample=False, **kwargs)[:, ids.shape[1] :]
    seen = sorted(set(free.flatten().tolist()))
    always = data.draw(st.lists(st.sampled_from(seen), max_size=3, unique=True), label="suppress_tokens")
    first = data.draw(st.lists(st.sampled_from(seen), max_size=3, unique=True), label="begin_suppress_tokens")
    kwargs.update(suppress_tokens=always or None, begin_suppress_tokens=first or None)
    expected = model.generate(ids, do_sample=False, **kwargs)
    for method in ("ar", "eesd"):
        generator = executor.EarlyExitGenerator(model, method=method, exit_layer=exit_layer, draft_len=draft_len)
        assert generator.generate(ids, **kwargs).tolist() == expected.tolist(), method


@pytest.fixture(scope="module")
def model():
    return scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=40, seed=8)), 2, 0.0)


def favourites(model, prompt: list[int], count: int) -> list[int]:
    """The first `count` distinct tokens of the model's greedy output: suppressing them changes the output."""
    out = executor.generate(model, [prompt], max_new_tokens=12).sequences[0, len(prompt) :].tolist()
    return list(dict.fromkeys(out))[:count]


def test_bad_words_of_single_tokens_match_hf(model):
    ids = torch.tensor([[3, 4, 5]])
    bad = [[t] for t in favourites(model, [3, 4, 5], 2)]
    expected = model.generate(ids, do_sample=False, max_new_tokens=12, bad_words_ids=bad, pad_token_id=PAD)
    got = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, max_new_tokens=12, bad_words_ids=bad)
    assert got.tolist() == expected.tolist()
    assert not set(got[0, 3:].tolist()) & {t for (t,) in bad}


@pytest.mark.parametrize(
    ("bad", "message"), [([[]], "non-empty lists"), ([3, 4], "non-empty lists"), ([["a"]], "non-empty lists")]
)
def test_bad_words_the_drop_in_cannot_apply_are_refused(model, bad, message):
    with pytest.raises(ValueError, match=message):
        executor.EarlyExitGenerator(model, exit_layer=2).generate(torch.tensor([[3, 4]]), bad_words_ids=bad)


@pytest.mark.parametrize("ids", [[-1], "abc", [1.5], 3.0])
def test_bad_suppress_ids_are_refused_naming_the_field(ids):
    with pytest.raises(ValueError, match="suppress_tokens must be a list of token ids"):
        SamplingConfig(suppress_tokens=ids)


def test_sampling_and_ppsd_suppress_as_ar_does(model):
    """Exact sampling (EESD and PPSD equal AR) and rejection sampling never emit a suppressed token."""
    prompt = [3, 4, 5]
    always = favourites(model, prompt, 3)
    first = [t for t in range(40) if t not in always][:5]
    options = dict(max_new_tokens=16, suppress_tokens=always, begin_suppress_tokens=first)
    for do_sample in (False, True):
        ar = executor.generate(model, [prompt], method="ar", do_sample=do_sample, seed=2, **options).sequences
        new = ar[0, 3:].tolist()
        assert not set(new) & set(always) and new[0] not in first
        for method, extra in (("eesd", dict(exit_layer=2)), ("ppsd", dict(stages=2))):
            got = executor.generate(model, [prompt], method=method, do_sample=do_sample, seed=2, **extra, **options)
            assert got.sequences.tolist() == ar.tolist(), (method, do_sample)
    for seed in range(4):
        out = executor.generate(
            model, [prompt], method="eesd", exit_layer=2, do_sample=True, sampling="rejection", seed=seed, **options
        ).sequences[0, 3:]
        assert not set(out.tolist()) & set(always) and int(out[0]) not in first
