"""EOS handling: the output ends exactly where HF `generate` ends, wherever the EOS falls in a round."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TinySpec, hf_greedy, scale_late_layers, tiny_model

import executor

DRAFT_LEN = 4
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(scope="module")
def always_accepting_model():
    """Late layers zeroed: every round accepts all 4 drafts and adds a bonus token (5 tokens per round)."""
    return scale_late_layers(tiny_model(TinySpec(num_layers=4, vocab=200, seed=11)), 2, 0.0)


def first_new_token_at(tokens: list[int], roles: set[str]) -> int:
    """Index of the first new token whose value occurs nowhere earlier and which plays one of `roles`.

    Token 0 comes from the prefill; then each round emits 4 accepted drafts and a bonus token.
    """
    for index, token in enumerate(tokens):
        role = "prefill" if index == 0 else ("bonus" if index % (DRAFT_LEN + 1) == 0 else "draft")
        if role in roles and token not in tokens[:index] and token not in PROMPT:
            return index
    raise AssertionError(f"no token with role {roles} is new in {tokens}")


@pytest.mark.parametrize("role", ["draft", "bonus"])
def test_eos_ends_output_where_hf_does(always_accepting_model, role):
    model = always_accepting_model
    free = executor.generate(model, PROMPT, method="eesd", exit_layer=2, draft_len=DRAFT_LEN, max_new_tokens=40)
    assert free.stats.accepted == free.stats.drafted  # the round structure first_new_token_at assumes
    new_tokens = free.sequences[0, len(PROMPT) :].tolist()
    index = first_new_token_at(new_tokens, {role})
    eos = new_tokens[index]
    reference, _ = hf_greedy(model, PROMPT, 40, eos_token_id=eos)
    for method in ("ar", "eesd"):
        result = executor.generate(
            model, PROMPT, method=method, exit_layer=2, draft_len=DRAFT_LEN, max_new_tokens=40, eos_token_id=eos
        )
        assert result.sequences.tolist() == reference.tolist()
        assert result.sequences.shape[1] == len(PROMPT) + index + 1
        assert result.sequences[0, -1].item() == eos


def test_eos_list_and_drop_in_generator(always_accepting_model):
    """Several EOS ids; the drop-in generator returns what `model.generate` returns for the same arguments."""
    model = always_accepting_model
    free = executor.generate(model, PROMPT, method="ar", max_new_tokens=30).sequences[0, len(PROMPT) :].tolist()
    eos_ids = [free[7], free[12]]
    ids = torch.tensor([PROMPT])
    expected = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=eos_ids, pad_token_id=0)
    generator = executor.EarlyExitGenerator(model, method="eesd", exit_layer=2, draft_len=DRAFT_LEN)
    got = generator.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, eos_token_id=eos_ids)
    assert got.tolist() == expected.tolist()
    assert got.dtype == torch.long
    assert generator.last_stats is not None and generator.last_stats.rounds >= 1


def test_drop_in_uses_generation_config_eos(always_accepting_model):
    model = always_accepting_model
    free = executor.generate(model, PROMPT, method="ar", max_new_tokens=20).sequences[0, len(PROMPT) :].tolist()
    model.generation_config.eos_token_id = free[9]
    try:
        ids = torch.tensor([PROMPT])
        expected = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
        got = executor.EarlyExitGenerator(model, exit_layer=2).generate(ids, max_new_tokens=20)
        assert got.tolist() == expected.tolist()
        assert got.shape[1] <= len(PROMPT) + 10
    finally:
        model.generation_config.eos_token_id = None
