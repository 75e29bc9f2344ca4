"""The host's work between an EESD round's passes: what it refills on the device.

The verify pass takes its positions from where the round's draft steps left `positions[1]` and writes each row's
next input (the token after its accepted drafts, at the round's start + accepted + 1) into `next_inputs`; a chained
block of AR steps leaves its last token and position in `ids` / `positions[1]`. The host notes both from what it
reads, and refills from the host only what differs from what it commits (`Passes.start_round`): a row whose commit
is not its verdict's (a finished row left parked, a forced verdict) or a batch that changed. So a steady decode
uploads its inputs once, at its first round, and the draft counts only when they change. The outputs must not
depend on any of this (the losslessness tests run every path; these count the refills).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batch_and_dropin import batch_cases, hf_batch
from test_passes import EXIT_LAYER, PROMPTS, model

import executor
import executor.passes
from executor.adapter import ModelAdapter
from executor.heads import TrainedExitHead
from executor.passes import Passes


@pytest.fixture
def refills(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts `Passes.load` calls with tokens at q = 1 (an upload of a round's inputs) and counts uploads."""
    seen = {"inputs": 0, "counts": 0}
    load, upload = Passes.load, executor.passes.upload

    def counted_load(self: Passes, tokens, starts, q: int) -> None:
        seen["inputs"] += q == 1 and tokens is not None
        load(self, tokens, starts, q)

    def counted_upload(buffer, values) -> None:
        seen["counts"] += any(buffer is p.counts for p in live)
        upload(buffer, values)

    live: list[Passes] = []
    init = Passes.__init__

    def tracked_init(self: Passes, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        live.append(self)

    monkeypatch.setattr(Passes, "load", counted_load)
    monkeypatch.setattr(Passes, "__init__", tracked_init)
    monkeypatch.setattr(executor.passes, "upload", counted_upload)
    return seen


@pytest.mark.parametrize(
    ("policy", "head", "sync_every"),
    [("fixed:2", None, 1), ("fixed:3", "layered", 1), ("beta-ts:cost=0.9,max=4", None, 4), ("beta-ts", "layered", 1)],
)
def test_a_steady_decode_uploads_its_inputs_once(refills: dict[str, int], policy: str, head, sync_every: int) -> None:
    """Batch 1, greedy: one upload of the inputs in the whole decode however its rounds mix drafting and chained AR
    steps (a head of its own layer chains as `ar_head`); the counts at most once per change of k. The tokens are
    AR's."""
    net = model(epsilon=0.2)
    if head == "layered":
        head = TrainedExitHead(ModelAdapter(net), EXIT_LAYER).requires_grad_(False)
    ar = executor.generate(net, [PROMPTS[0]], method="ar", max_new_tokens=40)
    refills.update(inputs=0, counts=0)
    out = executor.generate(net, [PROMPTS[0]], method="eesd", exit_layer=EXIT_LAYER, policy=policy, head=head,
                            max_new_tokens=40, sync_every=sync_every, capture="none")  # fmt: skip
    assert out.sequences.tolist() == ar.sequences.tolist()
    drafted = [k for k in out.stats.drafted if k]
    assert len(out.stats.drafted) >= 10 and sum(out.stats.accepted) >= 5  # rounds that accept, a real steady state
    assert refills["inputs"] == 1
    changes = 1 + sum(a != b for a, b in zip(drafted, drafted[1:], strict=False))
    assert 1 <= refills["counts"] <= changes


def test_a_row_whose_commit_is_not_its_verdict_is_refilled(refills: dict[str, int]) -> None:
    """A batch whose first row ends early (EOS): it stays parked while the verify pass moves its next input on, so
    the host refills the rounds after it. The tokens are AR's."""
    net = model(epsilon=0.2)
    free = executor.generate(net, [PROMPTS[0]], method="ar", max_new_tokens=30).sequences[0, len(PROMPTS[0]) :]
    kwargs = dict(max_new_tokens=30, eos_token_id=int(free[3]), pad_token_id=0)  # the first row ends at token 4
    prompts = [PROMPTS[0], PROMPTS[0][::-1]]
    ar = executor.generate(net, prompts, method="ar", **kwargs)
    assert ar.sequences.shape[1] > len(PROMPTS[0]) + 4  # the other row runs on
    refills.update(inputs=0, counts=0)
    out = executor.generate(net, prompts, method="eesd", exit_layer=EXIT_LAYER, policy="fixed:2", capture="none",
                            **kwargs)  # fmt: skip
    assert out.sequences.tolist() == ar.sequences.tolist()
    assert 2 <= refills["inputs"] <= len(out.stats.drafted)


@settings(max_examples=30, deadline=None)
@given(
    case=batch_cases(),
    policy=st.sampled_from(["fixed:1", "fixed:3", "beta-ts", "beta-ts:cost=0.9,max=4", "confidence:0.5"]),
    sampling=st.sampled_from([None, "exact", "rejection"]),
    forced=st.sampled_from([None, 0.5, [2, 0, 1]]),
    sync_every=st.integers(1, 4),
    max_new_tokens=st.integers(1, 20),
    eos_pick=st.integers(0, 200),
)
def test_refills_from_the_device_change_nothing(case, policy, sampling, forced, sync_every, max_new_tokens, eos_pick):
    """Against every round's inputs and counts uploaded from the host (`DEVICE_INPUTS` off): the same tokens and the
    same rounds, drafts and accepted lengths, for batches whose rows end early, sampled rows (exact and rejection
    sampling) and forced verdicts (whose commits are not the pass's verdicts), which no test against AR covers."""
    net, _, exit_layer, _ = case
    ids, kwargs, _ = hf_batch(case, max_new_tokens, 0, eos_pick)
    if sampling is not None:
        kwargs.update(do_sample=True, sampling=sampling, top_k=20, seed=7)
    kwargs.update(method="eesd", exit_layer=exit_layer, policy=policy, sync_every=sync_every, accept_pattern=forced)
    runs = []
    for device_inputs in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(executor.passes, "DEVICE_INPUTS", device_inputs)
            out = executor.generate(net, ids, **kwargs)
        runs.append((out.sequences.tolist(), out.stats.rounds, out.stats.drafted, out.stats.accepted))
    assert runs[0] == runs[1]


def test_any_load_of_the_ids_drops_the_note_of_what_the_device_holds() -> None:
    """`load` with tokens at any width rewrites `ids`: a later `start_round` for the values noted before must upload
    them again, not trust the note."""
    from executor.api import PassSetup
    from executor.heads import resolve_head
    from executor.sampling import SamplingConfig
    from sim.policy import FixedPolicy

    adapter = ModelAdapter(model())
    head = resolve_head(None, adapter, EXIT_LAYER)
    setup = PassSetup("eesd", SamplingConfig(), 0, [], EXIT_LAYER, head, [FixedPolicy(2)], "none")
    passes = setup.passes(adapter, [[1, 2, 3]], 8)
    passes.start_round([7], [3])
    passes.load([9], [3], 3)
    passes.start_round([7], [3])
    assert passes.ids.tolist() == [[7]] and passes.positions[1].tolist() == [[3]]
