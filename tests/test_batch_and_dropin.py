"""Batches (left padding + attention_mask) equal HF `generate` per row; the drop-in accepts what HF accepts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import TinySpec, scale_late_layers, tiny_model, tiny_specs
from transformers import GenerationConfig

import executor

PAD = 0


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_batch(case, max_new_tokens: int, min_new_tokens: int, eos_pick: int, **extra) -> tuple:
    """A batch case's left-padded ids, its generate kwargs (an EOS frequent enough that some rows stop early) and
    HF's greedy output for them."""
    model, spec, _, prompts = case
    ids, mask = left_pad(prompts)
    eos = 1 + eos_pick % (spec.vocab - 1)
    kwargs = dict(
        attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos_token_id=eos,
        pad_token_id=PAD, **extra,
    )  # fmt: skip
    return ids, kwargs, model.generate(ids, do_sample=False, **kwargs)


@st.composite
def batch_cases(draw):
    spec = draw(tiny_specs(archs=("llama", "qwen2"), min_layers=2, max_layers=4))
    exit_layer = draw(st.integers(1, spec.num_layers - 1))
    model = scale_late_layers(tiny_model(spec), exit_layer, draw(st.sampled_from([0.0, 0.05, 1.0])))
    prompts = draw(st.lists(st.lists(st.integers(1, spec.vocab - 1), min_size=1, max_size=12), min_size=1, max_size=5))
    return model, spec, exit_layer, prompts


@given(
    case=batch_cases(),
    draft_len=st.integers(1, 5),
    max_new_tokens=st.integers(1, 24),
    min_new_tokens=st.integers(0, 6),
    eos_pick=st.integers(0, 200),
    penalty=st.sampled_from([1.0, 1.0, 0.8, 1.4]),
)
def test_batch_equals_hf_greedy_per_row(case, draft_len, max_new_tokens, min_new_tokens, eos_pick, penalty):
    """Also with HF's repetition penalty: each row's context is its own prompt (padding left out, as HF does), its
    committed tokens, and, inside a round, the drafts before the position judged."""
    model, _, exit_layer, _ = case
    ids, kwargs, expected = hf_batch(case, max_new_tokens, min_new_tokens, eos_pick, repetition_penalty=penalty)
    for method in ("ar", "eesd"):
        generator = executor.EarlyExitGenerator(model, method=method, exit_layer=exit_layer, draft_len=draft_len)
        assert generator.generate(ids, **kwargs).tolist() == expected.tolist(), method


def test_rows_keep_their_own_accepted_lengths():
    """Different prompts accept different lengths in the same round; outputs still equal one-row runs."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=64, seed=3)), 2, 0.3)
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3], [11]]
    ids, mask = left_pad(prompts)
    batched = executor.generate(
        model, ids, attention_mask=mask, method="eesd", exit_layer=2, draft_len=4, max_new_tokens=30
    )
    width = ids.shape[1]
    for row, prompt in enumerate(prompts):
        single = executor.generate(model, prompt, method="eesd", exit_layer=2, draft_len=4, max_new_tokens=30)
        assert batched.sequences[row, width:].tolist() == single.sequences[0, len(prompt) :].tolist()
    assert len(set(batched.stats.accepted)) > 1


def test_exact_sampling_batch_rows_equal_single_rows():
    """Noise is keyed by each row's own positions: a row samples the same tokens alone or in a batch."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=3, vocab=40, seed=4)), 1, 0.05)
    prompts = [[1, 2, 3, 4], [7]]
    ids, mask = left_pad(prompts)
    options = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=5, max_new_tokens=16)
    batched = executor.generate(model, ids, attention_mask=mask, method="eesd", exit_layer=1, **options)
    for row, prompt in enumerate(prompts):
        single = executor.generate(model, prompt, method="ar", **options)
        assert batched.sequences[row, ids.shape[1] :].tolist() == single.sequences[0, len(prompt) :].tolist()


@pytest.mark.parametrize("method", ["ar", "eesd"])
def test_per_row_seeds_sample_each_row_as_alone_with_its_seed(method):
    """`seed` as a list: each row samples what it samples alone with its own seed (the same prompt twice then gives
    two samples); one seed for all gives equal prompts equal text; a list of the wrong length is refused."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=3, vocab=40, seed=4)), 1, 0.05)
    prompts, seeds = [[1, 2, 3, 4], [1, 2, 3, 4], [7]], [11, 12, 13]
    ids, mask = left_pad(prompts)
    options = dict(do_sample=True, temperature=1.0, max_new_tokens=16)
    kwargs = dict(method=method, exit_layer=1) if method == "eesd" else dict(method="ar")
    batched = executor.generate(model, ids, attention_mask=mask, seed=seeds, **kwargs, **options)
    rows = [batched.sequences[row, ids.shape[1] :].tolist() for row in range(len(prompts))]
    for row, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        single = executor.generate(model, prompt, method="ar", seed=seed, **options)
        assert rows[row] == single.sequences[0, len(prompt) :].tolist()
    assert rows[0] != rows[1]
    shared = executor.generate(model, ids, attention_mask=mask, seed=11, **kwargs, **options)
    assert shared.sequences[0].tolist() == shared.sequences[1].tolist()
    with pytest.raises(ValueError, match="seed has 2 values"):
        executor.generate(model, ids, attention_mask=mask, seed=[1, 2], **kwargs, **options)
    with pytest.raises(ValueError, match="seed must be an integer"):
        executor.generate(model, ids, attention_mask=mask, seed=[1, -2, 3], **kwargs, **options)


@pytest.fixture(scope="module")
def model():
    return scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=80, seed=8)), 2, 0.05)


def test_generation_config_and_max_length(model):
    ids = torch.tensor([[3, 4, 5]])
    config = GenerationConfig(max_new_tokens=9, min_new_tokens=3, eos_token_id=[4, 7], pad_token_id=PAD)
    expected = model.generate(ids, generation_config=config, do_sample=False)
    got = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, generation_config=config)
    assert got.tolist() == expected.tolist()
    expected = model.generate(ids, max_length=11, do_sample=False, pad_token_id=PAD)
    got = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, max_length=11)
    assert got.tolist() == expected.tolist()


def test_pad_token_infers_attention_mask_like_hf(model):
    ids, _ = left_pad([[3, 4, 5, 6], [9, 9]])
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    got = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, max_new_tokens=6, pad_token_id=PAD)
    assert got.tolist() == expected.tolist()


def test_text_streamer_receives_the_tokens(model):
    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(torch.as_tensor(value).flatten().tolist())

        def end(self):
            self.ended = True

    recorder = Recorder()
    ids = torch.tensor([[3, 4, 5]])
    out = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, max_new_tokens=12, streamer=recorder)
    assert recorder.chunks[0] == [3, 4, 5] and recorder.ended
    assert sum(recorder.chunks[1:], []) == out[0, 3:].tolist()


def test_hf_text_streamer_works(model, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TextStreamer

    vocab = {f"w{i}": i for i in range(80)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    ids = torch.tensor([[3, 4, 5]])
    out = executor.EarlyExitGenerator(model, exit_layer=2).generate(
        ids, max_new_tokens=8, streamer=TextStreamer(tokenizer)
    )
    printed = capsys.readouterr().out
    assert tokenizer.decode(out[0, 3:].tolist()).split()[-1] in printed


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(method="foo"), "method must be one of ar, eesd, ppsd, got 'foo'"),
        (dict(exit_layer=99), r"exit_layer must be an integer in \[1, 3\] for a 4-layer model, got 99"),
        (dict(exit_layer=True), "exit_layer must be an integer"),
        (dict(draft_len=0), "draft_len must be an integer"),
        (dict(policy="beta"), "'beta'"),
        (dict(sampling="greedy"), "sampling must be one of exact, rejection, got 'greedy'"),
        (dict(capture="graph"), "capture 'graph' needs the model on a CUDA device"),
    ],
)
def test_a_generator_checks_its_settings_when_built(model, settings, message):
    with pytest.raises(ValueError, match=message):
        executor.EarlyExitGenerator(model, **settings)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_beams=4), r"^num_beams=4 is not supported \(only 1\)"),
        (dict(assistant_model=object()), "assistant_model: not supported by the drop-in .only None., got a value of"),
        (dict(synced_gpus=True), r"synced_gpus: not supported by the drop-in \(only None or False\), got True"),
        (dict(penalty_alpha=0.6), r"penalty_alpha=0.6 is not supported \(only None or 0.0\)"),
        (dict(remove_invalid_values=True), "remove_invalid_values=True is not supported"),
        (dict(generation_config=GenerationConfig(remove_invalid_values=True)), "generation_config.remove_invalid"),
        (dict(num_beam=1), "unsupported generate argument.s.: num_beam"),
        (dict(generation_config=GenerationConfig(num_beams=3)), "num_beams=3 is not supported"),
        (dict(generation_config=GenerationConfig(penalty_alpha=0.6, top_k=4)), "penalty_alpha"),
        (dict(generation_config=GenerationConfig(dola_layers="low")), "dola_layers"),
        (dict(generation_config=GenerationConfig(top_h=0.4)), "top_h"),
        (dict(generation_config=GenerationConfig(encoder_repetition_penalty=1.2)), "encoder_repetition_penalty"),
        (dict(generation_config=GenerationConfig(num_beam_groups=2)), "num_beam_groups"),
        (dict(attention_mask=torch.tensor([[1, 0, 1]])), "not left padding"),
    ],
)
def test_unsupported_arguments_raise(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        executor.EarlyExitGenerator(model, exit_layer=2).generate(torch.tensor([[3, 4, 5]]), **kwargs)


def test_return_dict_in_generate_and_use_cache_like_hf(model):
    """`**inputs`-style calls: use_cache is accepted (the tokens do not depend on it), return_dict_in_generate gives
    HF's output object with the same `sequences`."""
    ids = torch.tensor([[3, 4, 5], [9, 1, 2]])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=9, use_cache=True, return_dict_in_generate=True)
    expected = model.generate(input_ids=ids, do_sample=False, pad_token_id=0, **kwargs)
    for method in ("ar", "eesd"):
        got = executor.EarlyExitGenerator(model, method=method, exit_layer=2).generate(input_ids=ids, **kwargs)
        assert type(got) is type(expected) and got.sequences.tolist() == expected.sequences.tolist()
    plain = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, max_new_tokens=9, use_cache=False)
    assert torch.equal(plain, expected.sequences)


def test_min_p_sampling_drop_in_equals_ar(model):
    ids = torch.tensor([[3, 4, 5]])
    kwargs = dict(max_new_tokens=12, do_sample=True, min_p=0.2, temperature=1.4)
    eesd = executor.EarlyExitGenerator(model, exit_layer=2, seed=3).generate(ids, **kwargs)
    ar = executor.EarlyExitGenerator(model, method="ar", seed=3).generate(ids, **kwargs)
    assert eesd.tolist() == ar.tolist()


def test_model_generation_config_sampling_defaults_apply(model):
    """A model whose generation_config samples makes the drop-in sample too (exact mode), as HF would."""
    ids = torch.tensor([[3, 4, 5]])
    greedy = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, max_new_tokens=10)
    config = GenerationConfig(do_sample=True, temperature=1.3, top_p=0.95, max_new_tokens=10)
    eesd = executor.EarlyExitGenerator(model, exit_layer=2, seed=1).generate(ids, generation_config=config)
    ar = executor.EarlyExitGenerator(model, method="ar", seed=1).generate(ids, generation_config=config)
    assert eesd.tolist() == ar.tolist() and eesd.tolist() != greedy.tolist()


@pytest.mark.parametrize("method", ["ar", "eesd"])
@pytest.mark.parametrize("shift", [-1, 0, 1])
def test_min_new_tokens_boundary_matches_hf(model, method, shift):
    """EOS first due at new token j: min_new_tokens = j allows it there, j + 1 forbids it (HF's rule)."""
    prompt = [3, 4, 5]
    free = executor.generate(model, prompt, max_new_tokens=30).sequences[0, 3:].tolist()
    j = next(i for i in range(3, 30) if free[i] not in free[:i] and free[i] not in prompt)
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=30, min_new_tokens=j + shift, eos_token_id=free[j], pad_token_id=PAD)
    expected = model.generate(ids, do_sample=False, **kwargs)
    got = executor.EarlyExitGenerator(model, method=method, exit_layer=2).generate(ids, **kwargs)
    assert got.tolist() == expected.tolist()
    assert (got.shape[1] == 3 + j + 1) == (shift <= 0)


@pytest.mark.parametrize("method", ["ar", "eesd"])
def test_no_length_set_makes_hf_default_twenty_new_tokens(model, method):
    """No length anywhere: HF 5 counts its default max_length (20) from the prompt; a passed config alike."""
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    expected = model.generate(ids, do_sample=False, pad_token_id=PAD)
    generator = executor.EarlyExitGenerator(model, method=method, exit_layer=2)
    got = generator.generate(ids, pad_token_id=PAD)
    assert got.tolist() == expected.tolist() and got.shape[1] == 5 + 20
    got = generator.generate(ids, generation_config=GenerationConfig(pad_token_id=PAD))
    assert got.tolist() == expected.tolist()


def test_passed_generation_config_keeps_the_models_own_settings(model):
    """A passed config's unset fields come from the model's generation config (its EOS and pad ids), as in HF."""
    ids = torch.tensor([[3, 4, 5]])
    free = executor.generate(model, ids, max_new_tokens=12).sequences[0, 3:].tolist()
    saved = (model.generation_config.eos_token_id, model.generation_config.pad_token_id)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = free[3], PAD
    try:
        config = GenerationConfig(max_new_tokens=12)
        expected = model.generate(ids, generation_config=config, do_sample=False)
        got = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, generation_config=config)
    finally:
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = saved
    assert got.tolist() == expected.tolist() and got.shape[1] < 3 + 12


def test_unseeded_sampling_follows_torch_global_generator(model):
    """seed=None (the default): each sampling call draws its seed from torch's generator, as HF samples from it:
    `torch.manual_seed` repeats a call, successive calls differ; an AR generator after the same manual_seed gives
    the same tokens (exact mode); a pinned seed repeats whatever torch's state."""
    ids, kwargs = torch.tensor([[3, 4, 5]]), dict(max_new_tokens=16, do_sample=True, temperature=1.5)
    eesd, ar = (executor.EarlyExitGenerator(model, method=m, exit_layer=2) for m in ("eesd", "ar"))
    torch.manual_seed(0)
    first, second = eesd.generate(ids, **kwargs), eesd.generate(ids, **kwargs)
    torch.manual_seed(0)
    again = ar.generate(ids, **kwargs)
    assert first.tolist() == again.tolist() and first.tolist() != second.tolist()
    pinned = executor.EarlyExitGenerator(model, exit_layer=2, seed=7)
    torch.manual_seed(1)
    one = pinned.generate(ids, **kwargs)
    assert one.tolist() == pinned.generate(ids, **kwargs).tolist()
    greedy_state = torch.random.get_rng_state()
    eesd.generate(ids, max_new_tokens=4)
    assert torch.equal(torch.random.get_rng_state(), greedy_state)  # greedy draws nothing from torch's generator


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(max_length=3), dict(max_length=2)])
def test_no_room_for_a_new_token_is_refused_like_hf(model, kwargs):
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError):
        model.generate(ids, do_sample=False, pad_token_id=PAD, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens must be greater than 0|no new token fits"):
        executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, **kwargs)


def test_prompt_as_inputs_keyword_tensor_ids_and_float_mask_like_hf(model):
    """HF's `inputs=` keyword, `suppress_tokens` as a tensor and a float 0/1 attention mask are taken as HF takes
    them; `inputs_embeds` and a prompt given twice are refused in one line."""
    ids, mask = left_pad([[3, 4, 5, 6], [9, 2]])
    kwargs = dict(max_new_tokens=8, pad_token_id=PAD, suppress_tokens=torch.tensor([25, 51]))
    expected = model.generate(inputs=ids, attention_mask=mask.float(), do_sample=False, **kwargs)
    generator = executor.EarlyExitGenerator(model, exit_layer=2)
    assert generator.generate(inputs=ids, attention_mask=mask.float(), **kwargs).tolist() == expected.tolist()
    plain = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=PAD)
    assert plain.tolist() != expected.tolist()  # the suppression changed something, so the check above means it
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        generator.generate(inputs_embeds=torch.zeros(1, 3, 16), max_new_tokens=4)
    with pytest.raises(ValueError, match="given twice"):
        generator.generate(ids, input_ids=ids, max_new_tokens=4)


def test_the_drop_in_takes_ppsds_pipeline_and_refuses_it_for_another_method() -> None:
    """`EarlyExitGenerator(method="ppsd", stages=..., stage_boundaries=..., backend=...)`: the pipeline asked for
    decodes (HF's tokens); too many stages or an unknown backend are refused when built, a pipeline given to EESD
    named in a warning."""

    model = tiny_model(TinySpec(num_layers=6))
    ids = torch.tensor([[5, 6, 7, 8]])
    reference = model.generate(ids, max_new_tokens=12, do_sample=False)
    generator = executor.EarlyExitGenerator(model, method="ppsd", stages=3, stage_boundaries=[1, 4])
    assert torch.equal(generator.generate(ids, max_new_tokens=12, do_sample=False), reference)
    assert generator.last_stats.stage_boundaries == (0, 1, 4, 6) and generator.last_stats.backend == "sequential"
    with pytest.warns(UserWarning, match=r"method 'eesd' ignores stages=3 \(for ppsd\)"):
        executor.EarlyExitGenerator(model, method="eesd", stages=3)
    for kwargs, message in (({"method": "ppsd", "stages": 9}, "must not exceed the model's 6 layers"),
                            ({"method": "ppsd", "backend": "x"}, "backend must be one of")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            executor.EarlyExitGenerator(model, **kwargs)


def test_rows_of_one_sampled_batch_sample_independently_as_hfs_do(model):
    """A prompt repeated gives different samples; each row is what the generator samples alone with its row's seed
    (`row_seed`: row 0 the call's own), and EESD's rows equal AR's."""
    from executor.sampling import row_seed

    ids = torch.tensor([[3, 4, 5, 6]] * 4)
    kwargs = dict(do_sample=True, max_new_tokens=8, temperature=1.5, top_k=0)
    ar = executor.EarlyExitGenerator(model, method="ar", seed=11).generate(ids, **kwargs)
    eesd = executor.EarlyExitGenerator(model, exit_layer=2, seed=11).generate(ids, **kwargs)
    assert eesd.tolist() == ar.tolist() and len({tuple(row) for row in ar.tolist()}) == 4
    for row in range(4):
        alone = executor.EarlyExitGenerator(model, method="ar", seed=row_seed(11, row)).generate(ids[:1], **kwargs)
        assert alone[0].tolist() == ar[row].tolist()
    per_prompt = executor.EarlyExitGenerator(model, method="ar", seed=[11, 12]).generate(
        ids[:2], num_return_sequences=2, **kwargs
    )
    assert per_prompt[0].tolist() == ar[0].tolist() and per_prompt[1].tolist() == ar[1].tolist()
    with pytest.raises(ValueError, match="seed has 1 values .one per prompt row., the batch has 2 rows"):
        executor.EarlyExitGenerator(model, method="ar", seed=[11]).generate(ids[:2], num_return_sequences=2, **kwargs)
    assert row_seed(11, 0) == 11 and len({row_seed(s, r) for s in range(50) for r in range(50)}) == 2500


def test_an_explicit_none_turns_a_default_off_as_in_hf(model):
    """HF fills its defaults (top_k 50) before the arguments: top_k=None samples from the whole vocabulary."""
    ids = torch.tensor([[3, 4, 5]])
    kwargs = dict(do_sample=True, top_k=None, max_new_tokens=1, return_dict_in_generate=True, output_scores=True)
    for extra in ({}, {"top_p": 0.9}):
        hf = model.generate(ids, **kwargs, **extra).scores[0]
        ours = executor.EarlyExitGenerator(model, method="ar").generate(ids, **kwargs, **extra).scores[0]
        assert torch.isfinite(ours).sum() == torch.isfinite(hf).sum()
    assert torch.isfinite(hf).sum() > 50


def test_prefix_allowed_tokens_fn_gets_the_prompts_index_with_copies(model):
    """HF's constraint takes num_return_sequences copies as beams: batch_id is the prompt's index."""
    seen = set()

    def allowed(batch_id: int, row: torch.Tensor) -> list[int]:
        seen.add(batch_id)
        return list(range(10, 30)) if batch_id == 0 else list(range(50, 70))

    ids = torch.tensor([[3, 4, 5], [9, 8, 7]])
    for method in ("ar", "eesd"):
        got = executor.EarlyExitGenerator(model, method=method, exit_layer=2).generate(
            ids, prefix_allowed_tokens_fn=allowed, do_sample=True, max_new_tokens=5, num_return_sequences=2
        )
        assert seen == {0, 1}
        assert all(10 <= t < 30 for t in got[:2, 3:].flatten()) and all(50 <= t < 70 for t in got[2:, 3:].flatten())


def test_neutral_values_and_numpy_integers_are_taken_as_hf_takes_them(model):
    np = pytest.importorskip("numpy")
    ids = torch.tensor([[3, 4, 5]])
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    neutral = dict(num_beams=1, num_beam_groups=1, early_stopping=False, synced_gpus=False, diversity_penalty=0.0,
                   penalty_alpha=0.0, guidance_scale=1, encoder_no_repeat_ngram_size=0, bos_token_id=1,
                   trust_remote_code=False, custom_generate=None, remove_invalid_values=False,
                   num_return_sequences=None)  # fmt: skip
    got = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, max_new_tokens=np.int64(4), **neutral)
    assert got.tolist() == expected.tolist()


def test_an_inferred_mask_that_is_not_left_padding_says_it_was_inferred(model):
    with pytest.raises(ValueError, match="row 0 holds pad_token_id 0 after its first real token: with no attention"):
        executor.EarlyExitGenerator(model, method="ar").generate(
            torch.tensor([[5, PAD, 7], [9, 8, 7]]), pad_token_id=PAD
        )


def test_a_generators_settings_changed_after_it_was_built_are_read_at_each_call() -> None:
    model = tiny_model(TinySpec(num_layers=4))
    ids = torch.tensor([[5, 6, 7, 8]])
    generator = executor.EarlyExitGenerator(model, method="eesd", exit_layer=2, draft_len=4)
    reference = generator.generate(ids, max_new_tokens=16, do_sample=False)
    assert max(generator.last_stats.drafted) == 4
    generator.draft_len = 1
    assert torch.equal(generator.generate(ids, max_new_tokens=16, do_sample=False), reference)
    assert max(generator.last_stats.drafted) == 1
