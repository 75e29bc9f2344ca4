"""Processors that read each position's prefix: no_repeat_ngram_size, sequence_bias, bad words of several tokens and
the caller's own logits_processor, equal to HF `generate` on every method (executor.sampling's prefix processors)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batch_and_dropin import PAD, batch_cases, left_pad
from test_stopping import assert_scores_close
from tiny_models import TinySpec, scale_late_layers, tiny_model

import executor
from executor.sampling import SamplingConfig, TokenSelector, ngram_bans, row_seed


class BanSuccessor:
    """A caller's processor that reads the prefix: the token after the last one (mod V) is banned."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        banned = (input_ids[:, -1] + 1) % scores.shape[-1]
        return scores.scatter(1, banned.unsqueeze(1), float("-inf"))


class Recorder:
    """A caller's processor that changes nothing and keeps every input_ids it was called with."""

    def __init__(self) -> None:
        self.calls: list[list[list[int]]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls.append(input_ids.tolist())
        return scores


def settings_from(free: list[list[int]], data) -> dict:
    """Prefix settings that bite on this output: bigrams and tokens it holds become bad words and biases."""
    tokens = sorted({t for row in free for t in row})
    bigrams = sorted({(a, b) for row in free for a, b in zip(row, row[1:], strict=False)})
    kind = data.draw(st.sampled_from(["ngram", "bias", "bad_words", "processor", "all"]), label="kind")
    chosen: dict = {}
    if kind in ("ngram", "all"):
        chosen["no_repeat_ngram_size"] = data.draw(st.integers(1, 3), label="no_repeat_ngram_size")
    if kind in ("bias", "all"):
        keys = data.draw(st.lists(st.sampled_from(bigrams or [(3, 4)]), min_size=1, max_size=3, unique=True))
        keys += [(t,) for t in data.draw(st.lists(st.sampled_from(tokens), max_size=2, unique=True))]
        chosen["sequence_bias"] = {key: data.draw(st.sampled_from([-4.0, -1.5, 2.0, 6.0])) for key in keys}
    if kind in ("bad_words", "all"):
        words = data.draw(st.lists(st.sampled_from(bigrams or [(3, 4)]), min_size=1, max_size=3, unique=True))
        chosen["bad_words_ids"] = [list(w) for w in words]
    if kind in ("processor", "all"):
        chosen["logits_processor"] = [BanSuccessor()]
    return chosen


@settings(max_examples=30, deadline=None)
@given(
    case=batch_cases(),
    draft_len=st.integers(1, 5),
    min_new=st.integers(0, 3),
    penalty=st.sampled_from([1.0, 1.0, 1.3]),
    data=st.data(),
)
def test_prefix_processors_match_hf_greedy(case, draft_len, min_new, penalty, data):
    """Batches with left padding and an EOS, AR, EESD and PPSD against HF token for token; with a
    repetition penalty too, which HF applies after the sequence bias."""
    model, _, exit_layer, prompts = case
    ids, mask = left_pad(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=14, min_new_tokens=min_new, pad_token_id=PAD, eos_token_id=1)
    kwargs.update(repetition_penalty=penalty)
    free = model.generate(ids, do_sample=False, **kwargs)[:, ids.shape[1] :]
    kwargs.update(settings_from([ids[r][mask[r] == 1].tolist() + free[r].tolist() for r in range(len(ids))], data))
    expected = model.generate(ids, do_sample=False, **kwargs)
    for method in ("ar", "eesd"):
        generator = executor.EarlyExitGenerator(model, method=method, exit_layer=exit_layer, draft_len=draft_len)
        assert generator.generate(ids, **kwargs).tolist() == expected.tolist(), method
    ppsd = executor.generate(model, ids, method="ppsd", stages=2, **kwargs)  # the rows in lockstep
    assert ppsd.sequences.tolist() == expected.tolist()


@pytest.fixture(scope="module")
def model():
    return scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=40, seed=8)), 2, 0.0)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=14), min_size=1, max_size=3),
    lead=st.integers(0, 4),
    n=st.integers(1, 4),
    data=st.data(),
)
def test_device_ngram_bans_equal_hf(rows, lead, n, data):
    """`ngram_bans` (static shapes, on the device) against HF's processor on every prefix: texts of few distinct ids
    (so n-grams repeat), with columns before each row's first (stale tokens a ban must not read) and queries at
    several prefix ends per row."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    vocab, width = 6, 24
    text = torch.randint(0, vocab, (len(rows), width), generator=torch.Generator().manual_seed(len(rows) + lead))
    first = torch.tensor([[lead] for _ in rows])
    for r, row in enumerate(rows):
        text[r, lead : lead + len(row)] = torch.tensor(row, dtype=torch.long)
    ends = torch.tensor(
        [[lead + data.draw(st.integers(0, len(row))) for _ in range(3)] for row in rows]
    )  # prefix ends inside each row's own text
    bans = ngram_bans(text, first, ends, n, torch.zeros(len(rows), 3, vocab))
    for r in range(len(rows)):
        for j in range(3):
            prefix = text[r : r + 1, lead : int(ends[r, j])]
            expected = NoRepeatNGramLogitsProcessor(n)(prefix, torch.zeros(1, vocab))[0].isinf()
            assert torch.equal(bans[r, j], expected), (r, j, prefix.tolist())


def test_sequence_bias_comes_before_the_penalty_as_in_hf():
    """HF biases first, then penalises: a seen token's negative logit lifted above 0 by its bias is divided by the
    penalty, not multiplied (the other order gives another score)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

    prompt, vocab = [3, 4, 5], 12
    logits = torch.linspace(-2.0, 2.0, vocab, dtype=torch.float64).view(1, 1, vocab).clone()
    logits[..., prompt] = -1.0
    bias = SequenceBiasLogitsProcessor(sequence_bias={(3,): 2.5, (5, 6): 1.5, (4, 7): 9.0, (9,): -3.0})
    selector = TokenSelector(SamplingConfig(repetition_penalty=1.7, biases=(bias,)), [3], 0, [], torch.device("cpu"))
    selector.track(vocab, 8)
    selector.start([prompt])
    got = selector.scores(logits, torch.tensor([[3]]))[0, 0]
    ids = torch.tensor([prompt])
    expected = RepetitionPenaltyLogitsProcessor(1.7)(ids, bias(ids, logits[0].clone()))[0]
    assert torch.equal(got, expected) and got[3] > 0 and got[6] == logits[0, 0, 6] + 1.5


def test_the_rows_a_processor_sees_are_hf_rows(model):
    """AR calls a processor as HF does, step by step with the whole batch, left padding included; EESD calls it on
    every prefix HF does (and on the drafts' own), each row as HF holds it."""
    ids, mask = left_pad([[3, 4, 5, 6], [7, 8], [9, 10, 11]])
    kwargs = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=PAD)
    hf, ours, eesd = Recorder(), Recorder(), Recorder()
    model.generate(ids, do_sample=False, logits_processor=[hf], **kwargs)
    executor.EarlyExitGenerator(model, method="ar").generate(ids, logits_processor=[ours], **kwargs)
    assert ours.calls == hf.calls
    executor.EarlyExitGenerator(model, exit_layer=2, draft_len=3).generate(ids, logits_processor=[eesd], **kwargs)
    seen = {tuple(row) for call in eesd.calls for row in call}
    assert all(tuple(row) in seen for call in hf.calls for row in call)


def test_generation_config_prefix_settings_match_hf(model):
    """The drop-in reads no_repeat_ngram_size, sequence_bias and bad_words_ids from a generation config too."""
    from transformers import GenerationConfig

    ids = torch.tensor([[3, 4, 5, 3]])
    config = GenerationConfig(max_new_tokens=16, no_repeat_ngram_size=3, sequence_bias={(5, 6): -2.0})
    config.bad_words_ids, config.pad_token_id = [[7, 8, 9]], PAD
    free = model.generate(ids, generation_config=GenerationConfig(max_new_tokens=16, pad_token_id=PAD))
    expected = model.generate(ids, generation_config=config)
    assert expected.tolist() != free.tolist()
    got = executor.EarlyExitGenerator(model, exit_layer=2, draft_len=4).generate(ids, generation_config=config)
    assert got.tolist() == expected.tolist()


def no_repeats(tokens: list[int], n: int, start: int) -> bool:
    """No n-gram that ends at a new token (index >= start) occurred before it."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return all(grams[i] not in grams[:i] for i in range(max(start - n + 1, 0), len(grams)))


def test_sampling_with_prefix_processors(model):
    """Exact sampling: EESD and PPSD equal AR; rejection sampling never breaks a ban (no repeated n-gram, no bad
    word)."""
    prompt = [3, 4, 5, 3, 4]
    options = dict(max_new_tokens=24, no_repeat_ngram_size=2, bad_words_ids=[[6, 7]], sequence_bias={(8,): 3.0})
    ar = executor.generate(model, [prompt], do_sample=True, seed=4, **options).sequences
    assert no_repeats(ar[0].tolist(), 2, len(prompt))
    for method, extra in (("eesd", dict(exit_layer=2, draft_len=3)), ("ppsd", dict(stages=2))):
        got = executor.generate(model, [prompt], method=method, do_sample=True, seed=4, **extra, **options)
        assert got.sequences.tolist() == ar.tolist(), method
    for seed in range(4):
        out = (
            executor.generate(
                model, [prompt], method="eesd", exit_layer=2, do_sample=True, sampling="rejection", seed=seed, **options
            )
            .sequences[0]
            .tolist()
        )
        assert no_repeats(out, 2, len(prompt)) and (6, 7) not in set(zip(out, out[1:], strict=False)), seed


def test_scores_with_prefix_processors_match_hf(model):
    ids, mask = left_pad([[3, 4, 5, 6], [7, 8]])
    kwargs = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, eos_token_id=1, output_scores=True)
    kwargs.update(return_dict_in_generate=True, no_repeat_ngram_size=2, sequence_bias={(4, 5): 2.5, (9,): -1.0})
    kwargs.update(logits_processor=[BanSuccessor()])
    expected = model.generate(ids, do_sample=False, **kwargs)
    got = executor.EarlyExitGenerator(model, exit_layer=2, draft_len=3).generate(ids, **kwargs)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert_scores_close(expected.scores, got.scores)


def test_a_bad_word_that_is_an_eos_id_is_kept_as_hf_keeps_it(model):
    ids = torch.tensor([[3, 4, 5]])
    free = executor.generate(model, ids, max_new_tokens=8).sequences[0, 3:].tolist()
    eos = free[2]  # a token the model emits: as EOS it ends the row, as a bad word HF ignores it
    kwargs = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD, bad_words_ids=[[eos], [free[0]]])
    expected = model.generate(ids, do_sample=False, **kwargs)
    got = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()
    assert eos in got[0, 3:].tolist() and free[0] not in got[0, 3:].tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
        (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size must be an integer >= 0"),
        (dict(bad_words_ids=[[]]), "non-empty lists of token ids"),
        (dict(bad_words_ids=[3, 4]), "non-empty lists of token ids"),
        (dict(bad_words_ids=[[3, -4]]), "non-empty lists of token ids"),
        (dict(sequence_bias={(3,): "high"}), "sequence_bias"),
        (dict(sequence_bias=[[3, 1.0]]), "sequence_bias"),
        (dict(logits_processor=["not callable"]), "logits_processor must be a list"),
        (dict(sequence_bias={(3, 4): 1.0}, capture="freeze"), "capture must be 'auto' or 'none'"),
        (dict(no_repeat_ngram_size=2, method="ppsd", backend="distributed"), "'distributed' backend"),
    ],
)
def test_bad_prefix_settings_are_refused_naming_the_field(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        executor.generate(model, [[3, 4, 5]], max_new_tokens=4, **kwargs)


def test_serving_refuses_prefix_processors():
    from executor.serving import check_serving

    with pytest.raises(ValueError, match="prefix processors"):
        check_serving("eesd", SamplingConfig(processors=(BanSuccessor(),)))


def test_generate_cli_no_repeat_ngram_size(tmp_path, capsys):
    from executor.cli import main

    tiny_model(TinySpec(num_layers=2, vocab=40, seed=8), torch.float32).save_pretrained(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "--prompt-ids", "3,4,5", "--method", "eesd", "--exit-layer", "1"]
    argv += ["--max-new-tokens", "24", "--compare-ar", "--threads", "1", "--no-repeat-ngram-size", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    tokens = [int(t) for t in out[0].strip("[]").split(",")]
    assert no_repeats([3, 4, 5, *tokens], 2, 3) and out[-1].startswith("identical to AR: True")
    assert main([*argv[:-1], "-1"]) == 2
    err = capsys.readouterr().err
    assert "no_repeat_ngram_size must be an integer >= 0" in err and "Traceback" not in err


# ---- HF's length processors and extra warpers ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        dict(forced_eos_token_id=7),
        dict(forced_eos_token_id=[7, 9], suppress_tokens=[7]),  # HF forces, then suppresses: every score -inf
        dict(forced_bos_token_id=5),
        dict(forced_bos_token_id=5, bad_words_ids=[[5], [6, 7]]),  # the forced token overrides its bad word
        dict(exponential_decay_length_penalty=(2, 1.6)),
        dict(min_length=9),
        dict(min_length=9, min_new_tokens=2, length_penalty=0.3),  # length_penalty scores beams only
    ],
)
@pytest.mark.parametrize("method", ["ar", "eesd"])
def test_length_processors_match_hf(model, method, extra):
    """forced_bos fires where the row is one token long (HF's cur_len == 1): one of these rows is."""
    ids, mask = left_pad([[3, 4, 5, 6], [8], [9, 10]]) if "forced_bos_token_id" not in extra else left_pad([[8]])
    free = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=PAD)
    eos = int(free[-1, ids.shape[1] + 4])  # the 5th new token of the last row: the decay and min_length move it
    kwargs = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, eos_token_id=eos, **extra)
    expected = model.generate(ids, do_sample=False, **kwargs)
    got = executor.EarlyExitGenerator(model, method=method, exit_layer=2, draft_len=3).generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()


def test_length_processors_change_the_output(model):
    """The cases above bite: each changes HF's output (so equality with HF checks it is applied)."""
    ids = torch.tensor([[8]])
    free = model.generate(ids, do_sample=False, max_new_tokens=10, pad_token_id=PAD)[0].tolist()
    bos = model.generate(ids, do_sample=False, max_new_tokens=10, pad_token_id=PAD, forced_bos_token_id=5)[0]
    eos = model.generate(ids, do_sample=False, max_new_tokens=10, pad_token_id=PAD, forced_eos_token_id=7)[0]
    assert bos[1] == 5 != free[1] and eos[-1] == 7 != free[-1]


def test_typical_epsilon_eta_sampling(model):
    """Exact sampling: EESD and PPSD equal AR; each step's scores are HF's warpers over HF's logits of our output, and
    every token drawn is one they allow."""
    from transformers import EpsilonLogitsWarper, EtaLogitsWarper, TemperatureLogitsWarper, TypicalLogitsWarper

    prompt = [3, 4, 5]
    for name, value, warper in (
        ("typical_p", 0.6, TypicalLogitsWarper(0.6)),
        ("epsilon_cutoff", 0.02, EpsilonLogitsWarper(0.02)),
        ("eta_cutoff", 0.3, EtaLogitsWarper(0.3)),
    ):
        options = {name: value, "max_new_tokens": 16, "do_sample": True, "temperature": 0.2}
        ar = executor.generate(model, [prompt], seed=1, **options).sequences
        for method, extra in (("eesd", dict(exit_layer=2, draft_len=3)), ("ppsd", dict(stages=2))):
            got = executor.generate(model, [prompt], method=method, seed=1, **extra, **options).sequences
            assert got.tolist() == ar.tolist(), (name, method)
        out = executor.EarlyExitGenerator(model, exit_layer=2, seed=1).generate(
            torch.tensor([prompt]), return_dict_in_generate=True, output_scores=True, output_logits=True, top_k=0,
            **options,
        )  # fmt: skip
        for step, logits in enumerate(out.logits):
            expected = warper(None, TemperatureLogitsWarper(0.2)(None, logits.clone()))
            assert_scores_close((expected,), (out.scores[step],))
            assert torch.isfinite(out.scores[step][0, out.sequences[0, 3 + step]])
        assert any(bool(torch.isinf(s).any()) for s in out.scores), name  # the warper removed something


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(typical_p=1.5, do_sample=True), "typical_p must be a number in \\(0, 1\\)"),
        (dict(eta_cutoff=0.0, do_sample=True), "eta_cutoff must be a number in \\(0, 1\\)"),
        (dict(forced_bos_token_id=-2), "forced_bos_token_id must be a token id"),
        (dict(forced_eos_token_id=[3, "x"]), "forced_eos_token_id must be token ids"),
        (dict(exponential_decay_length_penalty=(2,), eos_token_id=3), "must be \\(start index >= 0, decay factor\\)"),
        (dict(exponential_decay_length_penalty=(2, 1.5)), "needs eos_token_id"),
    ],
)
def test_bad_length_settings_are_refused_naming_the_field(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        executor.generate(model, [[3, 4, 5]], max_new_tokens=4, **kwargs)


def allowed_by_row_and_length(batch_id: int, row: torch.Tensor) -> list[int]:
    """A constraint that depends on the row's batch index and its length (as a grammar's state would)."""
    return [t for t in range(40) if (t + batch_id + len(row)) % 3 == 0]


@pytest.mark.parametrize("scale", [0.0, 0.3])
@pytest.mark.parametrize("method", ["ar", "eesd"])
def test_prefix_allowed_tokens_fn_matches_hf(method, scale):
    """HF's constrained decoding: the function gets each row's batch index and prefix; AR and EESD give HF's tokens,
    every new token one the function allowed; PPSD on one row too. With late layers that matter (scale 0.3) rows
    accept different draft counts, so a round's positions fall into groups of other rows than the batch's."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=40, seed=8)), 2, scale)
    ids, mask = left_pad([[3, 4, 5, 6], [8], [9, 10]])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=PAD, eos_token_id=1)
    kwargs.update(prefix_allowed_tokens_fn=allowed_by_row_and_length, no_repeat_ngram_size=2)
    expected = model.generate(ids, do_sample=False, **kwargs)
    got = executor.EarlyExitGenerator(model, method=method, exit_layer=2, draft_len=3).generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()
    for row in range(3):  # each new token up to the row's EOS was allowed after the step-long prefix before it
        for step in range(ids.shape[1], got.shape[1]):
            token = int(got[row, step])
            assert token in allowed_by_row_and_length(row, got[row, :step])
            if token == 1:
                break
    one = {key: value for key, value in kwargs.items() if key != "attention_mask"}
    alone = model.generate(ids[:1], do_sample=False, **one)
    assert executor.generate(model, ids[:1], method="ppsd", stages=2, **one).sequences.tolist() == alone.tolist()


def test_prefix_allowed_tokens_fn_that_allows_nothing_is_refused_as_hf_refuses_it(model):
    with pytest.raises(ValueError, match="returned an empty list"):
        executor.generate(model, [[3, 4]], max_new_tokens=3, prefix_allowed_tokens_fn=lambda batch, row: [])
    with pytest.raises(ValueError, match="prefix_allowed_tokens_fn must be a callable"):
        executor.generate(model, [[3, 4]], max_new_tokens=3, prefix_allowed_tokens_fn=[3, 4])


def test_prefix_settings_with_copies_stops_and_chained_steps(model):
    """With num_return_sequences (each copy its own seed), a stopping criterion, and AR steps chained on the device
    (sync_every 4): EESD's sampled copies equal AR's, each copy is its row decoded alone with its seed, greedy with
    the criterion equals HF, and chained AR equals step-by-step AR."""
    ids, mask = left_pad([[3, 4, 5, 6], [8, 9]])
    kwargs = dict(attention_mask=mask, max_new_tokens=14, pad_token_id=PAD, eos_token_id=1)
    kwargs.update(no_repeat_ngram_size=2, logits_processor=[BanSuccessor()])
    kwargs.update(stopping_criteria=[lambda held, scores: held[:, -1] == 7])
    expected = model.generate(ids, do_sample=False, **kwargs)
    greedy = executor.EarlyExitGenerator(model, exit_layer=2, draft_len=3).generate(ids, **kwargs)
    assert greedy.tolist() == expected.tolist()
    kwargs.update(do_sample=True, num_return_sequences=2)
    ar = executor.EarlyExitGenerator(model, method="ar", seed=9).generate(ids, **kwargs)
    eesd = executor.EarlyExitGenerator(model, exit_layer=2, draft_len=3, seed=9).generate(ids, **kwargs)
    assert ar.shape[0] == 4 and eesd.tolist() == ar.tolist()
    alone = {**kwargs, "num_return_sequences": 1}
    for row in range(2):
        for copy in range(2):
            one = (
                executor.EarlyExitGenerator(model, method="ar", seed=row_seed(9, 2 * row + copy))
                .generate(ids[row : row + 1], **{**alone, "attention_mask": mask[row : row + 1]})[0]
                .tolist()
            )
            assert ar[2 * row + copy].tolist() == one + [PAD] * (ar.shape[1] - len(one))
    options = dict(max_new_tokens=16, no_repeat_ngram_size=2, sequence_bias={(4, 5): 3.0}, eos_token_id=1)
    stepwise = executor.generate(model, [[3, 4, 5, 6]], sync_every=1, **options).sequences
    chained = executor.generate(model, [[3, 4, 5, 6]], sync_every=4, **options).sequences
    assert chained.tolist() == stepwise.tolist()


@pytest.mark.parametrize(
    ("settings", "custom"),
    [
        (dict(repetition_penalty=3.0), "RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=4)"),
        (dict(no_repeat_ngram_size=1), "NoRepeatNGramLogitsProcessor(3)"),
        (dict(sequence_bias={(9,): 2.0}, repetition_penalty=1.5), "SequenceBiasLogitsProcessor({(25,): -5.0})"),
        (dict(bad_words_ids=[[25]], forced_bos_token_id=3), "NoBadWordsLogitsProcessor([[5]], eos_token_id=None)"),
        (dict(suppress_tokens=[25]), "SuppressTokensLogitsProcessor([5])"),
        (
            dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=1),
            "ExponentialDecayLengthPenalty((1, 3.0), 1, 4)",
        ),
        (dict(repetition_penalty=1.01), "RepetitionPenaltyLogitsProcessor(0.3)"),  # applied twice: another text
        (dict(repetition_penalty=1.3), "NoRepeatNGramLogitsProcessor(2)"),  # nothing to replace: HF appends it
    ],
)
def test_a_custom_processor_of_a_built_ins_class_replaces_it_in_its_place(settings, custom):
    """HF: a `logits_processor` entry of the class of a built-in the settings make takes the built-in's place (and
    only there: applied twice, a penalty of 0.3 makes another text on this model)."""
    from transformers.generation import logits_process as hf

    model = tiny_model(TinySpec(num_layers=4, vocab=40, seed=1))

    processor = eval(custom, vars(hf))  # noqa: S307 (a literal of the test's own)
    ids = torch.tensor([[5, 6, 7, 8], [9, 9, 3, 4]])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, logits_processor=[processor], **settings)
    expected = model.generate(ids, do_sample=False, **kwargs)
    for method in ("ar", "eesd"):
        got = executor.EarlyExitGenerator(model, method=method, exit_layer=2, draft_len=3).generate(ids, **kwargs)
        assert got.tolist() == expected.tolist(), method


def test_a_custom_min_length_processor_beside_a_minimum_is_refused(model):
    from transformers.generation.logits_process import MinLengthLogitsProcessor

    with pytest.raises(ValueError, match="holds a MinLengthLogitsProcessor while a minimum length is set"):
        executor.generate(
            model, [[3, 4]], max_new_tokens=4, min_new_tokens=2, eos_token_id=1,
            logits_processor=[MinLengthLogitsProcessor(5, 1)],
        )  # fmt: skip


def test_a_callers_prefix_constraint_gets_each_rows_own_batch_index():
    """HF's PrefixConstrainedLogitsProcessor reads batch_id from a row's place in the input; a speculative pass calls
    processors on groups of rows, so it is told the rows' own indices: EESD equals HF with a per-row constraint."""
    from transformers.generation.logits_process import (
        PrefixConstrainedLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    def allowed(batch_id: int, row: torch.Tensor) -> list[int]:
        return list(range(10, 25)) if batch_id == 0 else list(range(25, 40))

    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=40, seed=1)), 2, 1.0)  # rows accept unlike
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12,
                  logits_processor=[PrefixConstrainedLogitsProcessor(allowed, 1)])  # fmt: skip
    expected = model.generate(ids, do_sample=False, **kwargs)
    for method in ("ar", "eesd"):
        got = executor.EarlyExitGenerator(model, method=method, exit_layer=2, draft_len=3).generate(ids, **kwargs)
        assert got.tolist() == expected.tolist(), method
    per_row = RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=torch.tensor([4, 4, 4]))
    with pytest.raises(ValueError, match="prompt_ignore_length tensor .one per row. reads rows by their place"):
        executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, max_new_tokens=3, logits_processor=[per_row])
