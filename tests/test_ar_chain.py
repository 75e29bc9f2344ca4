"""The chained AR step (`Passes.ar` feeds its own token forward on the device): the host launches `sync_every` steps
and reads their tokens in one copy. Output must not depend on `sync_every`: equal to HF `generate` per row (greedy,
batches with EOS and min_new_tokens) and to `sync_every=1` (exact sampling)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_batch_and_dropin import batch_cases, hf_batch, left_pad
from test_passes import PROMPTS, model, strict

import executor
from executor.passes import StaticPass
from sim.contract import AR_HISTORY


@given(
    case=batch_cases(),
    sync_every=st.integers(1, 9),
    max_new_tokens=st.integers(1, 24),
    min_new_tokens=st.integers(0, 6),
    eos_pick=st.integers(0, 200),
)
def test_chained_ar_equals_hf_per_row(case, sync_every, max_new_tokens, min_new_tokens, eos_pick) -> None:
    """Rows that end (EOS) inside a block run on to its end unread; no row's output changes."""
    ids, kwargs, expected = hf_batch(case, max_new_tokens, min_new_tokens, eos_pick)
    out = executor.generate(case[0], ids, method="ar", sync_every=sync_every, **kwargs)
    assert out.sequences.tolist() == expected.tolist()


@given(
    sync_every=st.integers(2, 9),
    seed=st.integers(0, 2**31 - 1),
    top_k=st.sampled_from([None, 5, 40]),
    top_p=st.sampled_from([None, 0.8]),
    eos=st.sampled_from([None, 3, 7]),
)
def test_chained_ar_sampling_does_not_depend_on_sync_every(sync_every, seed, top_k, top_p, eos) -> None:
    net, (ids, mask) = model(), left_pad(PROMPTS)
    kwargs = dict(max_new_tokens=17, do_sample=True, seed=seed, top_k=top_k, top_p=top_p, eos_token_id=eos)
    reference = executor.generate(net, ids, attention_mask=mask, method="ar", sync_every=1, **kwargs)
    chained = executor.generate(net, ids, attention_mask=mask, method="ar", sync_every=sync_every, **kwargs)
    assert chained.sequences.tolist() == reference.sequences.tolist()


@pytest.mark.parametrize("sync_every", [1, 3, 8, AR_HISTORY])
def test_one_host_read_per_block(sync_every: int) -> None:
    """Without an EOS: ceil((n - 1) / sync_every) reads for n tokens (the first comes from the prefill), and exactly
    n - 1 steps run: the last block is cut to what is left."""
    out = executor.generate(model(), [PROMPTS[0]], method="ar", max_new_tokens=20, sync_every=sync_every)
    assert out.stats.host_reads == math.ceil(19 / sync_every)
    assert out.stats.rounds == 20 and out.stats.new_tokens == 20


def test_chained_steps_do_no_host_work(monkeypatch) -> None:
    """The step and its advance (next input, position, history) run under the no-host-work guard."""
    net, (ids, mask) = model(), left_pad(PROMPTS)
    reference = executor.generate(net, ids, attention_mask=mask, method="ar", max_new_tokens=15, sync_every=1)
    monkeypatch.setattr(StaticPass, "__call__", strict)
    out = executor.generate(net, ids, attention_mask=mask, method="ar", max_new_tokens=15, sync_every=6)
    assert out.sequences.tolist() == reference.sequences.tolist()


@pytest.mark.parametrize("value", [0, AR_HISTORY + 1, 2.0, "8"])
def test_sync_every_must_be_a_block_size(value) -> None:
    with pytest.raises(ValueError, match="sync_every must be an integer"):
        executor.generate(model(), [PROMPTS[0]], method="ar", max_new_tokens=4, sync_every=value)


def test_the_ar_cursor_wraps_instead_of_writing_out_of_bounds() -> None:
    """More launches than the history holds (a profiler replaying the step) wrap the cursor, never index past it."""
    from executor.adapter import ModelAdapter
    from executor.passes import Passes
    from executor.sampling import SamplingConfig, TokenSelector

    adapter = ModelAdapter(model())
    passes = Passes(adapter, adapter.new_cache(1, 256), TokenSelector(SamplingConfig(), [5], 0, [], "cpu"))
    passes.load([4], [5], 1)
    with torch.inference_mode():
        for _ in range(AR_HISTORY + 3):
            passes.ar()
    assert passes.ar_cursor.tolist() == [3]
    assert passes.positions[1].tolist() == [[5 + AR_HISTORY + 3]]
