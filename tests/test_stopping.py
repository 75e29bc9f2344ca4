"""Stopping criteria, stop strings, max_time, num_return_sequences and output scores: the drop-in as HF generate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from packages import requires_smollm2
from test_batch_and_dropin import PAD, batch_cases, left_pad
from tiny_models import TinySpec, scale_late_layers, tiny_model
from transformers import StoppingCriteria, StoppingCriteriaList

import executor
from executor.decoding import TokenSink
from executor.sampling import row_seed


class StopAfter(StoppingCriteria):
    """Row-wise: stop once the row ends with `suffix` (HF calls it on the whole batch, we on one row at a time)."""

    def __init__(self, suffix: list[int]) -> None:
        self.suffix = torch.tensor(suffix)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        width = len(self.suffix)
        if input_ids.shape[1] < width:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)
        return (input_ids[:, -width:] == self.suffix.to(input_ids.device)).all(-1)


@settings(max_examples=25, deadline=None)
@given(
    case=batch_cases(),
    draft_len=st.integers(1, 5),
    pick=st.integers(0, 10**6),
    suffix_len=st.integers(1, 2),
    eos=st.one_of(st.none(), st.integers(1, 7)),
)
def test_stopping_criteria_end_rows_where_hf_does(case, draft_len, pick, suffix_len, eos):
    """A stop suffix taken from the free-running output (so that it occurs, often inside an accepted draft run).
    With an EOS id HF pads a stopped row; without, it decodes every row on until the last one stops. PPSD's batch
    too, a row stopped inside a block of ticks running on unread."""
    model, _, exit_layer, prompts = case
    ids, mask = left_pad(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, pad_token_id=PAD, eos_token_id=eos)
    free = model.generate(ids, do_sample=False, **kwargs)[pick % len(prompts), ids.shape[1] :].tolist()
    assume(len(free) >= suffix_len)  # (a row whose first token is its EOS holds no suffix of two)
    start = pick % (len(free) - suffix_len + 1)
    criteria = StoppingCriteriaList([StopAfter(free[start : start + suffix_len])])
    expected = model.generate(ids, do_sample=False, stopping_criteria=criteria, **kwargs)
    for method in ("ar", "eesd"):
        generator = executor.EarlyExitGenerator(model, method=method, exit_layer=exit_layer, draft_len=draft_len)
        got = generator.generate(ids, stopping_criteria=criteria, **kwargs)
        assert got.tolist() == expected.tolist(), method
    ppsd = executor.generate(model, ids, method="ppsd", exit_layer=exit_layer, stopping_criteria=criteria,
                             sync_every=1 + pick % 4, **kwargs)  # the rows in lockstep  # fmt: skip
    assert ppsd.sequences.tolist() == expected.tolist()


@pytest.fixture(scope="module")
def model():
    return scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=80, seed=8)), 2, 0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return executor.load_tokenizer("smollm2-135m")


@requires_smollm2
def test_stop_strings_match_hf(tokenizer):
    """A random model over SmolLM2's vocabulary; stop strings cut from its own output: a token's last character (it
    may end other tokens too), two tokens' text and a whole token."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=3, vocab=len(tokenizer), seed=2)), 2, 0.0)
    ids = torch.tensor([[3, 4, 5]])
    free = model.generate(ids, do_sample=False, max_new_tokens=24, pad_token_id=PAD)[0, 3:].tolist()
    texts = [tokenizer.decode([t]) for t in free]
    stops = [text for text in (texts[5].strip()[-1:], texts[6] + texts[7], texts[3]) if text.strip()]
    assert stops
    for stop in stops:
        kwargs = dict(max_new_tokens=24, pad_token_id=PAD, stop_strings=stop, tokenizer=tokenizer)
        expected = model.generate(ids, do_sample=False, **kwargs)
        assert expected.shape[1] < 3 + 24, stop  # the stop string ended the row early
        for method in ("ar", "eesd"):
            got = executor.EarlyExitGenerator(model, method=method, exit_layer=2, draft_len=4).generate(ids, **kwargs)
            assert got.tolist() == expected.tolist(), (method, stop)


def test_stop_strings_need_the_tokenizer(model):
    with pytest.raises(ValueError, match="tokenizer"):
        executor.EarlyExitGenerator(model, exit_layer=2).generate(torch.tensor([[3, 4]]), stop_strings=["w1"])


def test_ppsd_and_sampling_stop_where_ar_does(model):
    ids = torch.tensor([[3, 4, 5]])
    free = executor.generate(model, ids, max_new_tokens=20, do_sample=True, seed=4).sequences[0, 3:].tolist()
    criteria = [StopAfter(free[9:11])]
    options = dict(max_new_tokens=20, do_sample=True, seed=4, stopping_criteria=criteria)
    ar = executor.generate(model, ids, method="ar", **options).sequences
    assert ar.shape[1] <= 3 + 11
    for method, extra in (("eesd", dict(exit_layer=2)), ("ppsd", dict(stages=2))):
        assert executor.generate(model, ids, method=method, **extra, **options).sequences.tolist() == ar.tolist()
    with pytest.raises(ValueError, match="distributed"):
        executor.generate(model, ids, method="ppsd", backend="distributed", **options)


def test_max_time_zero_stops_after_one_token(model):
    """HF's MaxTimeCriteria is checked after each token: max_time=0 leaves exactly one new token."""
    ids = torch.tensor([[3, 4, 5]])
    expected = model.generate(ids, do_sample=False, max_new_tokens=10, max_time=0.0, pad_token_id=PAD)
    got = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, max_new_tokens=10, max_time=0.0)
    assert got.tolist() == expected.tolist() and got.shape[1] == 4


def test_token_sink_keeps_the_stopping_token_and_drops_the_rest():
    sink = TokenSink(10, eos_token_ids=[], stop=lambda emitted: emitted[-1] == 7)
    sink.emit([1, 2])
    sink.emit([3, 7, 8, 9])
    assert sink.tokens == [1, 2, 3, 7] and sink.done


def test_num_return_sequences_samples_each_copy_with_its_own_seed(model):
    """HF's layout (a prompt's copies side by side); output row r is what the generator samples alone with the seed
    `row_seed(seed, r)` (row 0: the seed itself), so copies differ from each other and from other prompts' copies."""
    ids, mask = left_pad([[3, 4, 5], [9, 8]])
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, pad_token_id=PAD, temperature=1.5)
    got = executor.EarlyExitGenerator(model, exit_layer=2, seed=5).generate(ids, num_return_sequences=3, **kwargs)
    assert got.shape[0] == 6
    for row in range(2):
        for copy in range(3):
            alone = executor.EarlyExitGenerator(model, method="ar", seed=row_seed(5, 3 * row + copy))
            one = alone.generate(ids[row : row + 1], **{**kwargs, "attention_mask": mask[row : row + 1]})[0].tolist()
            assert got[3 * row + copy].tolist() == one + [PAD] * (got.shape[1] - len(one))
    assert len({tuple(r) for r in got[:3].tolist()}) > 1  # the copies differ
    shape = model.generate(ids, num_return_sequences=3, **kwargs).shape
    assert shape[0] == got.shape[0]


def test_num_return_sequences_needs_sampling_as_in_hf(model):
    with pytest.raises(ValueError, match="do_sample"):
        executor.EarlyExitGenerator(model, exit_layer=2).generate(torch.tensor([[3, 4]]), num_return_sequences=2)


@requires_smollm2
def test_generate_cli_stop_ends_the_text_after_the_stop_string(tmp_path, capsys, tokenizer):
    from executor.cli import main

    tiny_model(TinySpec(num_layers=2, vocab=len(tokenizer), seed=3), torch.float32).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "--prompt-ids", "400,500,600", "--method", "eesd"]
    argv += ["--exit-layer", "1", "--max-new-tokens", "24", "--compare-ar", "--threads", "1"]
    assert main(argv) == 0
    free = capsys.readouterr().out.splitlines()[0]
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert main([*argv, "--stop", stop]) == 0
    out = capsys.readouterr().out.splitlines()
    text = out[0]
    assert stop in text and free.startswith(text) and len(text) < len(free)
    assert out[-1].startswith("identical to AR: True")


def test_generate_cli_stop_needs_a_tokenizer(tmp_path, capsys):
    from executor.cli import main

    tiny_model(TinySpec(num_layers=2), torch.float32).save_pretrained(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "--prompt-ids", "4,5", "--stop", "x", "--threads", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--stop needs the model's tokenizer" in err and "Traceback" not in err


# ---- output_scores / output_logits -----------------------------------------------------------------------------------
def assert_scores_close(expected: tuple, got: tuple) -> None:
    assert len(got) == len(expected)
    for want, have in zip(expected, got, strict=True):
        assert have.shape == want.shape and have.dtype == want.dtype
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(have))  # the same ids removed (-inf)
        torch.testing.assert_close(have[finite], want[finite], rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    case=batch_cases(),
    draft_len=st.integers(1, 4),
    eos_pick=st.integers(0, 200),
    penalty=st.sampled_from([1.0, 1.3]),
    min_new=st.integers(0, 3),
)
def test_output_scores_and_logits_match_hf_greedy(case, draft_len, eos_pick, penalty, min_new):
    """Recomputed in one pass over the output: HF's per-step values (float rounding apart), finished rows too."""
    model, spec, exit_layer, prompts = case
    ids, mask = left_pad(prompts)
    kwargs = dict(
        attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, eos_token_id=1 + eos_pick % (spec.vocab - 1),
        repetition_penalty=penalty, min_new_tokens=min_new, return_dict_in_generate=True, output_scores=True,
        output_logits=True,
    )  # fmt: skip
    expected = model.generate(ids, do_sample=False, **kwargs)
    got = executor.EarlyExitGenerator(model, exit_layer=exit_layer, draft_len=draft_len).generate(ids, **kwargs)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert_scores_close(expected.scores, got.scores)
    assert_scores_close(expected.logits, got.logits)


def test_sampled_output_scores_are_hf_processors_over_the_output(model):
    """Sampling draws other tokens than HF's stream, so the reference is HF's own processors and warpers applied to
    HF's logits over our output, step by step (HF's order)."""
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.tensor([[3, 4, 5]])
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.2)
    got = executor.EarlyExitGenerator(model, exit_layer=2, seed=3).generate(
        ids, return_dict_in_generate=True, output_scores=True, output_logits=True, **kwargs
    )
    processors = [RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(1.3)]
    processors += [TopKLogitsWarper(20), TopPLogitsWarper(0.9)]
    expected = []
    for step, logits in enumerate(got.logits):
        scores = logits.clone()
        for processor in processors:
            scores = processor(got.sequences[:, : 3 + step], scores)
        expected.append(scores)
        assert torch.isfinite(got.scores[step][0, got.sequences[0, 3 + step]])  # the token drawn was allowed
    assert_scores_close(tuple(expected), got.scores)
    plain = model(got.sequences[:, :-1]).logits[:, 2:].float()
    torch.testing.assert_close(torch.stack(got.logits, 1), plain)


def test_renormalized_scores_and_cache_hints_as_hf(model):
    """`renormalize_logits`: the returned scores log-softmaxed after every processor, as HF's; the arguments that only
    say how HF keeps or compiles its cache are taken and change nothing."""
    ids = torch.tensor([[3, 4, 5]])
    kwargs = dict(max_new_tokens=8, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True)
    kwargs.update(repetition_penalty=1.2, renormalize_logits=True)
    expected = model.generate(ids, do_sample=False, **kwargs)
    generator = executor.EarlyExitGenerator(model, exit_layer=2)
    got = generator.generate(ids, **kwargs)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert_scores_close(expected.scores, got.scores)
    plain = generator.generate(ids, max_new_tokens=8, pad_token_id=PAD)
    hints = dict(cache_implementation="static", cache_config={}, low_memory=True, return_legacy_cache=False,
                 disable_compile=True, compile_config=None)  # fmt: skip
    assert torch.equal(generator.generate(ids, max_new_tokens=8, pad_token_id=PAD, **hints), plain)
    assert torch.equal(generator.generate(ids, max_new_tokens=8, pad_token_id=PAD, cache_implementation="paged"), plain)
    with pytest.raises(ValueError, match="cache_implementation must be one of static, .*got 'bogus'"):
        generator.generate(ids, max_new_tokens=8, pad_token_id=PAD, cache_implementation="bogus")  # as HF refuses it


def test_ppsd_drop_in_output_scores_match_hf(model):
    ids = torch.tensor([[3, 4, 5]])
    kwargs = dict(max_new_tokens=10, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True)
    kwargs.update(repetition_penalty=1.2, suppress_tokens=favourite_ids(model))
    expected = model.generate(ids, do_sample=False, **kwargs)
    got = executor.EarlyExitGenerator(model, method="ppsd", exit_layer=2).generate(ids, **kwargs)
    assert got.sequences.tolist() == expected.sequences.tolist() and got.logits is None
    assert_scores_close(expected.scores, got.scores)


def assert_nested_close(expected: tuple, got: tuple) -> None:
    """Per step, per layer: the same shapes, values equal up to float rounding."""
    assert len(got) == len(expected)
    for want_step, have_step in zip(expected, got, strict=True):
        assert len(have_step) == len(want_step)
        for want, have in zip(want_step, have_step, strict=True):
            assert have.shape == want.shape and have.dtype == want.dtype
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ar", "eesd", "ppsd"])
def test_hidden_states_and_attentions_match_hf(method):
    """HF's layout: per step a tuple per layer, the first step over the input's width, then one position attending
    over all before it; a finished row's pads included. In float32: HF's eager attention turns
    a float64 model's left-padded rows into NaN (what this fixed case's tokens are checked against HF for first)."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=40, seed=8), torch.float32), 2, 0.0)
    model.set_attn_implementation("eager")  # HF returns attentions from eager attention only
    ids, mask = left_pad([[3, 4, 5, 6], [7, 8], [9]])
    free = executor.generate(model, ids, attention_mask=mask, max_new_tokens=8).sequences[:, ids.shape[1] :]
    kwargs = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=PAD, eos_token_id=int(free[-1, 2]))
    kwargs.update(return_dict_in_generate=True, output_hidden_states=True, output_attentions=True, output_scores=True)
    expected = model.generate(ids, do_sample=False, **kwargs)
    got = executor.EarlyExitGenerator(model, method=method, exit_layer=2, draft_len=3).generate(ids, **kwargs)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert len(expected.attentions[1]) == 4 and expected.attentions[1][0].shape[-1] == ids.shape[1] + 1
    assert_nested_close(expected.hidden_states, got.hidden_states)
    assert_nested_close(expected.attentions, got.attentions)
    assert_scores_close(expected.scores, got.scores)


def test_attentions_under_sdpa_are_empty_as_in_hf(model):
    """`sdpa` gives no attention weights: HF returns an empty tuple per step, so does the drop-in."""
    ids = torch.tensor([[3, 4, 5]])
    kwargs = dict(max_new_tokens=5, pad_token_id=PAD, return_dict_in_generate=True, output_attentions=True)
    expected = model.generate(ids, do_sample=False, **kwargs)
    got = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, **kwargs)
    assert got.attentions == expected.attentions == ((),) * 5 and got.hidden_states is None


def favourite_ids(model) -> list[int]:
    """Two ids the model outputs for [3, 4, 5] unconstrained."""
    return list(dict.fromkeys(executor.generate(model, [[3, 4, 5]], max_new_tokens=8).sequences[0, 3:].tolist()))[:2]
