"""Every input bounded by the model, the context and the machine: extreme arguments are refused with a ValueError
that names the argument and its allowed range, or are capped where the cap changes nothing in the output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_api_errors import cli_status
from tiny_models import TinySpec, tiny_model

import executor
from executor.adapter import ModelAdapter
from executor.api import PassSetup, _policies
from executor.sampling import SamplingConfig


@pytest.fixture(scope="module")
def model():
    return tiny_model(TinySpec(num_layers=2))


# ------------------------------------------------------------------------------------------------- draft length
@pytest.mark.parametrize("max_new_tokens", [1, 2, 8])
def test_static_buffers_are_sized_by_what_is_left_to_generate_not_by_the_draft_len(model, max_new_tokens):
    adapter = ModelAdapter(model)
    draft_len = adapter.max_positions  # the largest draft_len accepted
    policies = _policies(f"fixed:{draft_len}", 1, 0, 0.5)
    setup = PassSetup("eesd", SamplingConfig(), 0, [], 1, None, policies, "none")
    passes = setup.passes(adapter, [[1, 2, 3]], max_new_tokens)
    assert passes.max_draft == max(1, max_new_tokens - 1)  # a round's drafts and token fit in what is left
    assert max(passes.positions) == passes.max_draft + 1
    assert passes.cache.max_len <= 3 + max_new_tokens + passes.max_draft + 1


def test_the_longest_draft_len_decodes_as_ar_does(model):
    prompt = [5, 6, 7]
    longest = executor.generate(model, prompt, method="eesd", exit_layer=1, draft_len=256, max_new_tokens=8)
    assert longest.sequences.tolist() == executor.generate(model, prompt, max_new_tokens=8).sequences.tolist()
    assert max(longest.stats.drafted) <= 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(draft_len=10**6), r"draft_len must be an integer in \[1, 256\] \(the model's context\), got 1000000"),
        (dict(draft_len=True), r"draft_len must be an integer in \[1, 256\]"),
        (dict(policy="beta-ts:max=1000000"), r"policy BetaTSPolicy: its max draft length .* \[1, 256\]"),
        (dict(policy="confidence:max=257"), r"policy ConfidencePolicy: its max draft length .* \[1, 256\]"),
    ],
)
def test_a_draft_beyond_the_context_is_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        executor.generate(model, [1, 2, 3], method="eesd", exit_layer=1, max_new_tokens=8, **kwargs)


# ------------------------------------------------------------------------------------- sampling and token arguments
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(repetition_penalty=float("nan")), r"repetition_penalty must be a finite number > 0, got nan"),
        (dict(repetition_penalty=float("inf")), r"repetition_penalty must be a finite number > 0, got inf"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be a finite number > 0"),
        (dict(do_sample=True, temperature=float("inf")), r"temperature must be a finite number > 0 when sampling"),
        (dict(do_sample=True, temperature=float("nan")), r"temperature must be a finite number > 0 when sampling"),
        (dict(do_sample=True, top_p=float("nan")), r"top_p must be a number in \(0, 1\], got nan"),
        (dict(do_sample=True, min_p=float("inf")), r"min_p must be a number in \[0, 1\], got inf"),
        (dict(do_sample=True, top_k=True), r"top_k must be an integer >= 0"),
        (dict(seed=2**70), r"seed must be an integer in \[0, 4294967295\]"),
        (dict(seed=-1), r"seed must be an integer in \[0, 4294967295\]"),
        (dict(do_sample=True, seed=2**32), r"seed must be an integer in \[0, 4294967295\]"),
        (
            dict(eos_token_id=10**6),
            r"eos_token_id must be token ids in \[0, 96\] \(the model's vocabulary\), got 1000000",
        ),
        (dict(eos_token_id=[2, -1]), r"eos_token_id must be token ids in \[0, 96\].*got -1"),
        (dict(eos_token_id="2"), r"eos_token_id must be token ids in \[0, 96\].*got '2'"),
        (dict(attention_mask=torch.tensor([[0.5, 1.0, 1.0]])), r"attention_mask must hold 0 and 1 .*torch.float32"),
        (dict(attention_mask=torch.tensor([[1, 1, 2]])), r"attention_mask must hold 0 and 1"),
        (dict(attention_mask=torch.tensor([[-1, 1, 1]])), r"attention_mask must hold 0 and 1"),
    ],
)
@pytest.mark.parametrize("method", ["ar", "eesd"])
def test_out_of_range_sampling_and_token_arguments_are_refused(model, method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        executor.generate(model, [[1, 2, 3]], method=method, exit_layer=1, max_new_tokens=4, **kwargs)


def test_numbers_of_other_types_in_range_are_accepted(model):
    reference = executor.generate(model, [1, 2, 3], max_new_tokens=4, eos_token_id=[5], repetition_penalty=1.2)
    other = executor.generate(
        model, [1, 2, 3], max_new_tokens=4, eos_token_id=torch.tensor([5]), repetition_penalty=np.float64(1.2),
        attention_mask=torch.ones(1, 3, dtype=torch.bool), seed=np.int64(0),
    )  # fmt: skip
    assert other.sequences.tolist() == reference.sequences.tolist()


# ------------------------------------------------------------------------------------------- files named on the CLI
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"empty\.gguf: the file is empty, not a GGUF model"),
        (b"GGUF\x03\x00\x00\x00cut", r"empty\.gguf: not a readable GGUF file, truncated or corrupt"),
        (b"PK\x03\x04 a zip file", r"empty\.gguf: not a GGUF file \(it does not start with the GGUF magic bytes\)"),
    ],
)
def test_an_empty_or_cut_gguf_is_a_one_line_error_naming_it(tmp_path, content, message):
    from executor.models import prepare_model

    source = tmp_path / "empty.gguf"
    source.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        prepare_model(source, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no half-made conversion left behind


@pytest.mark.parametrize("ids", ["", ",", " , "])
def test_empty_prompt_ids_are_refused_before_the_model_is_loaded(tmp_path, ids, capsys):
    assert cli_status("generate", "--model", str(tmp_path / "absent"), f"--prompt-ids={ids}") == 2
    stderr = capsys.readouterr().err
    assert "eesd generate: error: --prompt-ids holds no token id" in stderr
    assert "Traceback" not in stderr and "absent" not in stderr
