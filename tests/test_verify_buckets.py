"""Verify buckets (frozen passes): the verify pass that checks k drafts runs over `verify_drafts(k, longest, True)`
draft slots, a power of two or the policy's longest draft, so that a policy whose k varies compiles a few verify
passes, not one per k. The slots after the round's own k are padding: stale layer-E states at positions past every
live one. They must change nothing: the round's last draft is found on the device (from the draft cursor), each
row's verdict stops at its own count, and the padding's cache entries are overwritten before any query reads them.

The buckets are forced on uncaptured passes here (frozen compilation takes minutes per pass on a real model; the
frozen path itself is `tests/test_freeze.py`), so these runs take the same code as frozen ones without compiling.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_head_kinds import EXIT_LAYER, IDS, records, tiny, trained  # noqa: F401 (records, tiny, trained: fixtures)
from tiny_models import TinySpec, scale_late_layers, tiny_model, tiny_specs

import executor.passes
from executor.api import generate
from executor.passes import Passes
from sim.contract import verify_drafts

POLICIES = ["heuristic", "confidence:0.3", "beta-ts", "fixed:3", "fixed:5"]


def _any_capture(capture: str, verify_buckets: bool = True) -> bool:
    """`executor.passes.verify_bucketed` for every capture mode, uncaptured included: buckets as `generate`'s
    `verify_buckets` says."""
    return verify_buckets


@pytest.fixture
def buckets(monkeypatch) -> list[tuple[int, int]]:
    """Verify buckets for every set of passes built (`generate(verify_buckets=False)` turns them off); records each
    drafting round's verify launch as (the round's own k, the pass's slots)."""
    monkeypatch.setattr(executor.passes, "verify_bucketed", _any_capture)
    launched: list[tuple[int, int]] = []
    original = Passes.verify

    def recording(self, k, furthest=None):
        if k:  # j >= 1 drafts leave the cursor at j mod max_draft
            launched.append((int(self.draft_cursor) or self.max_draft, k))
        return original(self, k, furthest)

    monkeypatch.setattr(Passes, "verify", recording)
    return launched


def test_bucket_widths() -> None:
    """Powers of two up to the policy's longest draft, which is a bucket too; k = 0 and 1 as they are; off: k."""
    assert [verify_drafts(k, 8, True) for k in range(9)] == [0, 1, 2, 4, 4, 8, 8, 8, 8]
    assert [verify_drafts(k, 6, True) for k in range(7)] == [0, 1, 2, 4, 4, 6, 6]
    assert [verify_drafts(k, 3, True) for k in range(4)] == [0, 1, 2, 3]
    assert [verify_drafts(k, 16, False) for k in range(17)] == list(range(17))


def _agreeing(spec: TinySpec, exit_layer: int) -> torch.nn.Module:
    """Late layers near the identity: drafts mostly accepted, so the varying policies try many k."""
    return scale_late_layers(tiny_model(spec, torch.float64), exit_layer, 0.05)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(spec=tiny_specs(min_layers=2, max_layers=5), data=st.data())
def test_padded_verify_equals_ar(spec: TinySpec, data, buckets) -> None:
    """Greedy and exact sampling, with or without a repetition penalty, narrow drafts or not, one row or a ragged
    batch, every policy: AR's tokens. Rejection sampling (not AR's tokens) gives what the unpadded passes give."""
    exit_layer = data.draw(st.integers(1, spec.num_layers - 1), label="exit_layer")
    model = _agreeing(spec, exit_layer)
    rows = data.draw(st.integers(1, 2), label="rows")
    prompts = [data.draw(st.lists(st.integers(0, spec.vocab - 1), min_size=1, max_size=7)) for _ in range(rows)]
    policy = data.draw(st.sampled_from(POLICIES), label="policy")
    sampling = data.draw(st.sampled_from(["greedy", "exact", "rejection"]), label="sampling")
    penalty = data.draw(st.sampled_from([None, 1.3]), label="repetition_penalty")
    narrow = data.draw(st.sampled_from([None, "float32"]), label="draft_dtype")
    common = dict(max_new_tokens=data.draw(st.integers(1, 30)), seed=11, temperature=0.9, repetition_penalty=penalty)
    if sampling != "greedy":
        common.update(do_sample=True, sampling=sampling)
    eesd = dict(method="eesd", exit_layer=exit_layer, policy=policy, draft_dtype=narrow, capture="none")
    ids = prompts if rows == 1 else torch.tensor([[0] * (7 - len(p)) + p for p in prompts])
    mask = None if rows == 1 else torch.tensor([[0] * (7 - len(p)) + [1] * len(p) for p in prompts])
    out = generate(model, ids, attention_mask=mask, **eesd, **common)
    if sampling == "rejection":
        reference = generate(model, ids, attention_mask=mask, **eesd, **common, verify_buckets=False)
    else:
        reference = generate(model, ids, attention_mask=mask, method="ar", **common)
    assert torch.equal(out.sequences, reference.sequences)


@pytest.mark.parametrize("name", IDS)
def test_padded_verify_with_trained_heads_equals_ar(name: str, tiny, trained, buckets) -> None:  # noqa: F811
    """Every trained head kind (its own layer's KV written for the round's last draft, wherever it sits in the
    pass), batched with left padding: AR's tokens, and rounds really padded."""
    head = trained[name][0]
    prompts = torch.tensor([[0, 0, 4, 9, 1, 7], [5, 3, 8, 2, 6, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ar = generate(tiny, prompts, attention_mask=mask, method="ar", max_new_tokens=24)
    eesd = generate(tiny, prompts, attention_mask=mask, method="eesd", exit_layer=EXIT_LAYER, head=head,
                    policy="heuristic", max_new_tokens=24, capture="none")  # fmt: skip
    assert torch.equal(eesd.sequences, ar.sequences)
    assert any(k < slots for k, slots in buckets)


def test_varying_policies_launch_only_bucket_widths(buckets) -> None:
    """A heuristic policy (k from 1 up to 16) verifies at the buckets only, pads rounds whose k is not one, and
    decodes AR's tokens; with buckets off, one verify width per k."""
    model = _agreeing(TinySpec(num_layers=4, seed=2), 2)
    prompt = [3, 1, 4, 1, 5]
    ar = generate(model, prompt, method="ar", max_new_tokens=40)
    out = generate(model, prompt, method="eesd", exit_layer=2, policy="heuristic", max_new_tokens=40, capture="none")
    assert torch.equal(out.sequences, ar.sequences)
    widths = {slots for _, slots in buckets}
    assert widths <= {1, 2, 4, 8, 16}
    assert all(k <= slots for k, slots in buckets)
    assert any(k < slots for k, slots in buckets)  # some rounds were padded
    drafted = {k for k in out.stats.drafted if k}
    assert len(drafted) > len(widths)  # fewer verify passes than draft lengths tried
    buckets.clear()
    off = generate(model, prompt, method="eesd", exit_layer=2, policy="heuristic", max_new_tokens=40, capture="none",
                   verify_buckets=False)  # fmt: skip
    assert torch.equal(off.sequences, ar.sequences)
    assert buckets and all(k == slots for k, slots in buckets)
    assert {slots for _, slots in buckets} == {k for k in off.stats.drafted if k}


def test_no_room_for_the_bucket_runs_the_round_unpadded() -> None:
    """Where the bucket would write past the cache's capacity (`room`: positions after the round's input), the round
    runs at its own width; the policy's longest draft caps the bucket; a set without buckets never pads."""
    passes = SimpleNamespace(max_draft=8, verify_buckets=True)
    assert Passes.verify_slots(passes, 3) == 4
    assert Passes.verify_slots(passes, 3, None, 4) == 4
    assert Passes.verify_slots(passes, 3, None, 3) == 3
    assert Passes.verify_slots(passes, 5, 6) == 6
    assert Passes.verify_slots(passes, 5, 16) == 8  # this set holds drafts of up to 8
    assert Passes.verify_slots(SimpleNamespace(max_draft=8, verify_buckets=False), 3) == 3
