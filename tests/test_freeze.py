"""capture="freeze" (CPU): each pass compiled whole by Inductor with the model's weights frozen in as constants (and
max-autotune free to pick its CPU GEMM template). Every buffer the host refills between launches (token ids,
positions, a round's draft counts) and every buffer a pass writes (the KV cache, the chained cursors) must stay an
input of the compiled pass, not a constant: a pass that froze one would replay the first launch's value, and EESD's
verdicts or PPSD's pipe would go wrong. So frozen AR, EESD and PPSD must decode exactly what uncompiled AR decodes
(float64: far below any logit gap of these models), and the mode is refused off the CPU."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TinySpec, scale_late_layers, tiny_model

import executor
import executor.passes
from executor.passes import bucketed, resolve_capture, resolve_sync_every, span_bucket

PROMPT = [5, 17, 2, 40]


def test_frozen_passes_decode_what_ar_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gemma 3's layout (sliding and global layers, soft-capped logits). AR (chained steps), EESD fixed:2 (draft
    counts refilled every round), PPSD on 2 stages (the pipe's transition frozen too):
    frozen passes equal uncompiled AR token for token, and a second call reuses the cached frozen passes. Without
    max-autotune, whose kernel choice is a matter of speed (its CPU GEMM template takes no float64) and whose
    benchmarking would take minutes here."""
    monkeypatch.setattr(executor.passes, "FREEZE_OPTIONS", {"freezing": True})
    net = scale_late_layers(tiny_model(TinySpec(arch="gemma3", num_layers=4, seed=5), torch.float64), 2, 0.3)
    reference = executor.generate(net, [PROMPT], max_new_tokens=12, method="ar", capture="none").sequences
    cases = [
        {"method": "ar"},
        {"method": "eesd", "exit_layer": 2, "draft_len": 2},
        {"method": "ppsd", "stages": 2},
    ]
    for kwargs in cases:
        for _ in range(2):
            out = executor.generate(net, [PROMPT], max_new_tokens=12, capture="freeze", **kwargs)
            assert out.stats.capture == "freeze"
            assert torch.equal(out.sequences, reference), kwargs


def test_freeze_is_a_cpu_mode_without_span_buckets() -> None:
    """Refused for a CUDA model (named); one host read per token as uncaptured; every launch spans the capacity
    (a bucket would be another compiled pass with its own packed weights)."""
    assert resolve_capture("freeze", torch.device("cpu"), "greedy") == "freeze"
    with pytest.raises(ValueError, match="capture 'freeze' is for a model on the CPU, it is on cuda"):
        resolve_capture("freeze", torch.device("cuda"), "greedy")
    assert resolve_sync_every(None, "freeze") == 1
    assert not bucketed("freeze") and bucketed("graph")
    assert span_bucket(10, 4096, bucketed("freeze")) == 4096
    assert span_bucket(10, 4096, bucketed("graph")) < 4096


def test_frozen_verify_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy whose k varies (heuristic: up to 16, its k 4, 6, 5, 7, 2 here) under frozen passes: AR's tokens,
    the round's last draft found on the device inside the compiled pass (`Passes._last_draft`), and verify passes
    compiled at the bucket widths only (1, 2, 4, 8 drafts and the longest), fewer than the draft lengths tried."""
    monkeypatch.setattr(executor.passes, "FREEZE_OPTIONS", {"freezing": True})
    net = scale_late_layers(tiny_model(TinySpec(arch="llama", num_layers=4, seed=2), torch.float64), 2, 0.05)
    reference = executor.generate(net, [PROMPT], max_new_tokens=24, method="ar", capture="none").sequences
    out = executor.generate(net, [PROMPT], max_new_tokens=24, method="eesd", exit_layer=2, policy="heuristic",
                            capture="freeze")  # fmt: skip
    assert torch.equal(out.sequences, reference)
    (passes,) = net.__dict__["_eesd_passes"].values()
    widths = {q - 1 for name, q, _ in passes.spans() if name == "verify"}
    assert widths <= {1, 2, 4, 8, passes.max_draft}
    assert len({k for k in out.stats.drafted if k}) > len(widths)


def _compiled_modules(net: torch.nn.Module) -> list:
    """Weak references to the wrapper modules Inductor loaded for the frozen passes kept on `net`, and to the functions
    defined in them: a module carries its pass's frozen constants (packed weights and folded tensors) in its namespace,
    which its functions keep alive (as their globals) even after the module object itself is gone, so while any of
    these lives the constants do."""
    import types
    import weakref

    kept = net.__dict__["_eesd_passes"].values()
    modules = [module for passes in kept for static in passes._passes.values() for module in static.modules]
    functions = [
        f for m in modules for f in vars(m).values() if isinstance(f, types.FunctionType) and f.__globals__ is vars(m)
    ]
    return [weakref.ref(x) for x in (*modules, *functions)]


def test_released_frozen_passes_free_their_compilations(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen pass's compilation (and the packed weights its wrapper module carries) lives as long as the pass:
    `executor.release_passes` frees it, and so does the eviction of a kept set (`MAX_RUNNERS_PER_MODEL`), while the
    kept set in use keeps its own. Before each frozen pass compiled a function of its own, Dynamo's globals and
    Inductor's code cache kept every frozen compilation for the life of the process."""
    monkeypatch.setattr(executor.passes, "FREEZE_OPTIONS", {"freezing": True})
    net = tiny_model(TinySpec(arch="llama", num_layers=2, seed=3), torch.float64)
    reference = executor.generate(net, [PROMPT], max_new_tokens=6, method="ar", capture="none").sequences
    assert torch.equal(executor.generate(net, [PROMPT], max_new_tokens=6, capture="freeze").sequences, reference)
    first = _compiled_modules(net)
    assert first and all(r() is not None for r in first)
    executor.release_passes(net)
    assert "_eesd_passes" not in net.__dict__ and all(r() is None for r in first)
    monkeypatch.setattr(executor.passes, "MAX_RUNNERS_PER_MODEL", 1)
    assert torch.equal(executor.generate(net, [PROMPT], max_new_tokens=6, capture="freeze").sequences, reference)
    ar = _compiled_modules(net)
    executor.passes.warn_frozen_evicted.cache_clear()  # once per process: maybe said already in this one
    with pytest.warns(RuntimeWarning, match="frozen passes of an older setup were dropped"):
        out = executor.generate(net, [PROMPT], max_new_tokens=6, capture="freeze", method="eesd", exit_layer=1)
    assert torch.equal(out.sequences, reference)
    assert all(r() is None for r in ar)  # the AR set evicted: its compilation freed
    eesd = _compiled_modules(net)
    assert eesd and all(r() is not None for r in eesd)
