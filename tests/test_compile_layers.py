"""capture="compile-layers": one `torch.compile` of the decoder layer (`executor.adapter.compiled_layer`) runs every
layer of every static pass, captured whole in a CUDA graph on a GPU and run as it is here. It must compile once per
token count, not once per layer or pass, and decode exactly what uncompiled AR decodes (float64: Inductor's fused
kernels round differently from eager, far below any logit gap of these models)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from tiny_models import TinySpec, scale_late_layers, tiny_model
from torch._dynamo.utils import counters

import executor
import executor.api
import executor.ppsd
from executor.adapter import compiled_layer

PROMPT = [5, 17, 2, 40]


@pytest.fixture
def fresh_compiler():
    torch._dynamo.reset()
    compiled_layer.cache_clear()
    yield
    torch._dynamo.reset()
    compiled_layer.cache_clear()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_one_compilation_serves_every_layer_and_pass(fresh_compiler) -> None:
    """Six layers, AR then PPSD's stages (one token per pass): one layer graph, and PPSD's transition one more.
    EESD fixed:2 adds its verify widths."""
    net = tiny_model(TinySpec(num_layers=6), torch.float64)
    before = graphs()
    executor.generate(net, [PROMPT], max_new_tokens=8, method="ar", capture="compile-layers")
    assert graphs() - before == 1
    executor.generate(net, [PROMPT], max_new_tokens=8, method="ppsd", stages=3, capture="compile-layers")
    assert graphs() - before == 2  # the transition, compiled once (primed before any capture)
    executor.generate(net, [PROMPT], max_new_tokens=8, method="ppsd", stages=3, capture="compile-layers")
    assert graphs() - before == 2  # the cached pipeline: nothing compiles again
    executor.generate(net, [PROMPT], max_new_tokens=8, method="eesd", exit_layer=3, draft_len=2,
                      capture="compile-layers")  # fmt: skip
    assert graphs() - before <= 4  # q = 3 (k + 1), and q = 2 where a round drafted one token before the end


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_compiled_layers_decode_what_ar_decodes(arch: str) -> None:
    """Llama; Gemma 3 (sliding and global layers, q/k norms, post norms, soft-capped logits); Phi-3 (fused qkv,
    partial rotary): AR, EESD and PPSD with compiled layers equal uncompiled AR."""
    net = scale_late_layers(tiny_model(TinySpec(arch=arch, num_layers=4, seed=3), torch.float64), 2, 0.3)
    reference = executor.generate(net, [PROMPT], max_new_tokens=16, method="ar", capture="none").sequences
    cases = [{"method": "ar"}, {"method": "eesd", "exit_layer": 2, "draft_len": 3}, {"method": "ppsd", "stages": 2}]
    for kwargs in cases:
        out = executor.generate(net, [PROMPT], max_new_tokens=16, capture="compile-layers", **kwargs)
        assert out.stats.capture == "compile-layers"
        assert out.sequences.tolist() == reference.tolist(), kwargs


def test_a_trained_heads_layer_runs_compiled_too(monkeypatch) -> None:
    """A trained head's own decoder layer runs the compiled layer in the static passes (EESD's draft and verify,
    PPSD's stage 1), never in the prompt's prefill (its length varies); the caller's head is left as it was; the
    tokens are AR's."""
    from executor.adapter import ModelAdapter
    from executor.heads import TrainedExitHead

    net = scale_late_layers(tiny_model(TinySpec(num_layers=4, seed=5), torch.float64), 2, 0.3)
    head = TrainedExitHead(ModelAdapter(net), 2).double().requires_grad_(False)
    reference = executor.generate(net, [PROMPT], max_new_tokens=12, method="ar", capture="none").sequences
    seen: list[tuple[int, bool]] = []
    original = TrainedExitHead.run_layer

    def spy(self, hidden, step, cache):
        seen.append((hidden.shape[1], self.layer_run is not None and step.span is not None))
        return original(self, hidden, step, cache)

    monkeypatch.setattr(TrainedExitHead, "run_layer", spy)
    for kwargs in ({"method": "eesd", "exit_layer": 2, "draft_len": 3}, {"method": "ppsd", "stages": 2}):
        seen.clear()
        out = executor.generate(net, [PROMPT], max_new_tokens=12, capture="compile-layers", head=head, **kwargs)
        assert out.sequences.tolist() == reference.tolist(), kwargs
        assert seen[0] == (len(PROMPT), False)  # the prompt: uncompiled
        assert seen[1:] and all(compiled for _, compiled in seen[1:]), kwargs
    assert head.layer_run is None


def test_compiled_layers_with_exact_sampling_and_a_batch() -> None:
    net = scale_late_layers(tiny_model(TinySpec(num_layers=4, seed=4), torch.float64), 2, 0.3)
    ids = torch.tensor([[0, 0, 9, 4, 7], [5, 17, 2, 40, 33]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20, seed=11, pad_token_id=0)
    reference = executor.generate(net, ids, method="ar", capture="none", **kwargs).sequences
    out = executor.generate(net, ids, method="eesd", exit_layer=2, draft_len=2, capture="compile-layers", **kwargs)
    assert out.sequences.tolist() == reference.tolist()


def test_auto_runs_uncompiled_when_compilation_fails(fresh_compiler, monkeypatch) -> None:
    """capture="auto" is "compile-layers" on a GPU: where torch.compile fails there, it warns once and the layers (and
    PPSD's transition) run uncompiled (same tokens); an explicit "compile-layers" raises. (This box has no GPU:
    "auto" is made to resolve to "compile-layers" here, and the compiler to fail.)"""

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no working C compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    net = tiny_model(TinySpec(num_layers=3, seed=8), torch.float64)
    reference = executor.generate(net, [PROMPT], max_new_tokens=6, capture="none").sequences
    with pytest.raises(RuntimeError, match="no working C compiler"):
        executor.generate(net, [PROMPT], max_new_tokens=6, capture="compile-layers")
    resolve = executor.api.resolve_capture
    monkeypatch.setattr(
        executor.api, "resolve_capture", lambda c, d, k: "compile-layers" if c == "auto" else resolve(c, d, k)
    )
    with pytest.warns(RuntimeWarning, match="decoder layer failed, it runs uncompiled"):
        out = executor.generate(net, [PROMPT], max_new_tokens=6, capture="auto")
    assert torch.equal(out.sequences, reference) and out.stats.capture == "compile-layers"
    monkeypatch.setattr(
        executor.ppsd, "resolve_capture", lambda c, d, k: "compile-layers" if c == "auto" else resolve(c, d, k)
    )
    with pytest.warns(RuntimeWarning, match="PPSD transition failed, it runs uncompiled"):
        out = executor.generate(net, [PROMPT], max_new_tokens=6, method="ppsd", stages=3, capture="auto")
    assert torch.equal(out.sequences, reference) and out.stats.capture == "compile-layers"


@pytest.mark.parametrize("capture", ["compile-layers", "compile"])
def test_a_trained_heads_zero_draft_rounds_chain_compiled(monkeypatch, capture: str) -> None:
    """Zero-draft rounds with a trained head chain as `Passes.ar_head` under compiled layers (the head's layer
    compiled too) and under a compiled pass: AR's tokens, fewer host reads than rounds."""
    from executor.adapter import ModelAdapter
    from executor.heads import TrainedExitHead
    from executor.passes import Passes

    net = scale_late_layers(tiny_model(TinySpec(num_layers=4, seed=5), torch.float64), 2, 0.3)
    head = TrainedExitHead(ModelAdapter(net), 2).double().requires_grad_(False)
    reference = executor.generate(net, [PROMPT], max_new_tokens=16, method="ar", capture="none").sequences
    compiled: list[bool] = []
    original_run, original_ar_head = TrainedExitHead.run_layer, Passes.ar_head

    def spy(self, hidden, step, cache):
        compiled.append(self.layer_run is not None and step.span is not None)
        return original_run(self, hidden, step, cache)

    launches: list[int] = []
    monkeypatch.setattr(TrainedExitHead, "run_layer", spy)
    monkeypatch.setattr(
        Passes, "ar_head", lambda self, furthest=None: launches.append(1) or original_ar_head(self, furthest)
    )
    out = executor.generate(net, [PROMPT], max_new_tokens=16, method="eesd", exit_layer=2, head=head,
                            policy="beta-ts:cost=0.7", sync_every=4, capture=capture)  # fmt: skip
    assert out.stats.capture == capture
    assert out.sequences.tolist() == reference.tolist()
    assert len(launches) == out.stats.drafted.count(0) >= 2 and sum(out.stats.drafted) > 0
    assert out.stats.host_reads < len(out.stats.drafted)
    if capture == "compile-layers":
        assert compiled[1:] and all(compiled[1:])  # after the prompt's prefill, every head layer run is compiled
