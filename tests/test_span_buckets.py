"""Attention span buckets (`executor.passes.span_bucket`): a static launch attends over the first `span` cache slots,
a power-of-two multiple of MIN_SPAN that the host chooses from the furthest position the launch writes.

With MIN_SPAN = 4, a 40-token generation crosses the buckets 8, 16, 32 and the cache capacity. Every static pass
runs with the cache slots at and beyond its span poisoned (NaN, put back after it): a pass that read one of them
would turn its output NaN (a masked slot still enters the product), so an output equal to AR's, with buckets off
and to HF's, shows that a bucket of S slots reads only the first S. The spans seen are checked against each
launch's furthest position: AR and EESD launches get exactly the bucket of that position; PPSD's ticks get a bucket
one slot larger (its scratch slot, where an empty stage runs), shared by a block of ticks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from test_eesd_chain import layered_head
from test_passes import EXIT_LAYER, PROMPTS, model, strict
from tiny_models import hf_greedy

import executor
import executor.passes
from executor.adapter import ModelAdapter
from executor.api import PassSetup
from executor.decoding import GenerationStats, Rows, TokenSink, decode_eesd
from executor.heads import SharedExitHead
from executor.passes import StaticPass, span_bucket
from executor.ppsd import LocalPipeline
from executor.sampling import SamplingConfig
from sim.policy import make_policy

SMALL = 4  # MIN_SPAN in these tests: buckets 8, 16, 32, then the capacity (about 50 slots)
NEW_TOKENS = 40


@pytest.fixture
def small_buckets(monkeypatch):
    monkeypatch.setattr(executor.passes, "MIN_SPAN", SMALL)


def launches(
    monkeypatch, poison_from=lambda span, furthest: span
) -> Iterator[tuple[int, int, int, bool]]:  # fmt: skip
    """Record every static `forward_layers` call as (capacity, span, furthest position, output has a NaN), run with
    every cache layer's slots from `poison_from(span, furthest)` on poisoned with NaN (put back after the call)."""
    seen: list[tuple[int, int, int, bool]] = []
    original = ModelAdapter.forward_layers

    def recording(self, hidden, step, cache, start, stop):
        if step.span is None:
            return original(self, hidden, step, cache, start, stop)
        furthest = int(step.positions.max())
        first = poison_from(step.span, furthest)
        buffers = [*cache.keys, *cache.values]
        kept = [buffer[:, :, first:].clone() for buffer in buffers]
        for buffer in buffers:
            buffer[:, :, first:] = float("nan")
        out = original(self, hidden, step, cache, start, stop)
        for buffer, old in zip(buffers, kept, strict=True):  # what was there (the pass cannot write past its span)
            buffer[:, :, first:] = old
        seen.append((cache.max_len, step.span, furthest, bool(torch.isnan(out).any())))
        return out

    monkeypatch.setattr(ModelAdapter, "forward_layers", recording)
    return seen


def ladder(capacity: int) -> set[int]:
    """The buckets a cache of `capacity` slots has with MIN_SPAN = SMALL."""
    spans, span = {capacity}, SMALL
    while span < capacity:
        spans.add(span)
        span *= 2
    return spans


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two ragged rows, left-padded."""
    ids = torch.tensor([[0, 0, 0] + PROMPTS[1], PROMPTS[0]])
    return ids, (torch.arange(5) >= torch.tensor([[3], [0]])).long()


def reference(net, monkeypatch, ids, mask, **kwargs) -> list[list[int]]:
    """The same call with buckets off (every launch spans the whole capacity)."""
    with monkeypatch.context() as patch:
        patch.setattr(executor.passes, "SPAN_BUCKETS", False)
        return executor.generate(net, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **kwargs).sequences.tolist()


def test_a_bucket_doubles_from_min_span_and_stops_at_the_capacity(monkeypatch) -> None:
    assert executor.passes.MIN_SPAN == 64 and executor.passes.SPAN_BUCKETS
    assert [span_bucket(p, 4096) for p in (0, 63, 64, 127, 128, 1000, 2048, 4095)] == [
        64, 64, 128, 128, 256, 1024, 4096, 4096
    ]  # fmt: skip
    assert span_bucket(40, 50) == span_bucket(10, 50) == 50  # capped: never past the cache
    monkeypatch.setattr(executor.passes, "SPAN_BUCKETS", False)
    assert span_bucket(3, 4096) == 4096


AR_CASES = [
    {"method": "ar", "sync_every": 1},
    {"method": "ar", "sync_every": 6, "eos_token_id": [3, 7]},  # a row that ends runs on parked, unread
    {"method": "eesd", "draft_len": 1},
    {"method": "eesd", "draft_len": 4},
    {"method": "eesd", "draft_len": 4, "eos_token_id": [3, 7]},  # a finished row drafts on from its parked slot
    {"method": "eesd", "policy": "beta-ts", "sync_every": 4},  # zero-draft rounds chained as AR steps
    {"method": "eesd", "policy": "beta-ts:cost=0.9,max=4", "sync_every": 8, "head": "layered"},  # `ar_head`
    {"method": "eesd", "policy": "confidence:0.5"},  # a host read per draft step
    {"method": "eesd", "draft_len": 3, "do_sample": True, "top_k": 20},  # exact sampling: AR's draws
    {"method": "eesd", "draft_len": 3, "do_sample": True, "sampling": "rejection", "top_k": 30},
]


@pytest.mark.parametrize("kwargs", AR_CASES)
def test_ar_and_eesd_launches_span_their_bucket_and_read_nothing_beyond(monkeypatch, small_buckets, kwargs) -> None:
    """Two ragged rows: the tokens equal AR's with buckets off (rejection sampling: its own seeded run with buckets
    off) and HF's for greedy; every launch's span is the bucket of the furthest position it writes, and the
    launches cross every bucket."""
    net = model(epsilon=0.4)
    if kwargs.get("head") == "layered":
        kwargs = {**kwargs, "head": layered_head(net)}
    ids, mask = batch()
    if kwargs.get("sampling") == "rejection":
        expected = reference(net, monkeypatch, ids, mask, **kwargs)
    else:
        ar_kwargs = {k: v for k, v in kwargs.items() if k not in ("method", "draft_len", "policy", "head")}
        expected = reference(net, monkeypatch, ids, mask, method="ar", **ar_kwargs)
    seen = launches(monkeypatch)
    out = executor.generate(net, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **kwargs)
    assert out.sequences.tolist() == expected
    if not kwargs.get("do_sample") and "eos_token_id" not in kwargs:
        for row, prompt in enumerate((PROMPTS[1], PROMPTS[0])):
            assert expected[row][5:] == hf_greedy(net, prompt, NEW_TOKENS)[0][0, len(prompt) :].tolist()
    assert not any(nan for *_, nan in seen)
    for capacity, span, furthest, _ in seen:
        assert span == span_bucket(furthest, capacity) and furthest < span
    capacity = seen[0][0]
    assert {span for _, span, _, _ in seen} == ladder(capacity) - {SMALL}  # prompts of 5: from bucket 8 on


@pytest.mark.parametrize("skip_empty", [True, False])
@pytest.mark.parametrize(("stages", "sync_every"), [(2, 1), (3, 5), (4, 12)])
def test_ppsd_ticks_span_a_bucket_past_every_position_they_write(
    monkeypatch, small_buckets, skip_empty, stages, sync_every
) -> None:
    """Sequential PPSD with confirms and flushes equals AR; a valid stage writes below its span's last slot (the
    scratch slot), where an empty stage runs (`skip_empty` False, as on a GPU); the spans grow with the pipe's
    reach and cross buckets."""
    monkeypatch.setattr(LocalPipeline, "skip_empty_on_cpu", skip_empty)
    net = model(epsilon=0.6)
    prompt = PROMPTS[0]
    expected = reference(net, monkeypatch, [prompt], None, method="ar")
    seen = launches(monkeypatch)
    out = executor.generate(net, [prompt], method="ppsd", stages=stages, exit_layer=1, max_new_tokens=NEW_TOKENS,
                            sync_every=sync_every)  # fmt: skip
    assert out.sequences.tolist() == expected
    assert out.stats.flushes > 0 and out.stats.confirms > 0
    assert not any(nan for *_, nan in seen)
    capacity = seen[0][0]
    assert capacity == len(prompt) + NEW_TOKENS
    reached = len(prompt)  # the furthest position run so far (stage 1 starts at the prompt's end)
    for _, span, furthest, _ in seen:
        assert furthest <= span - 1 and span in ladder(capacity)
        if skip_empty:  # only valid stages run: the scratch slot stays free
            assert span >= span_bucket(furthest + 1, capacity)
        # no larger than a block's reach needs: stage 1 moves on one position a tick, plus the scratch slot
        assert span <= span_bucket(reached + sync_every + 1, capacity)
        reached = max(reached, furthest)
    spans = [span for _, span, _, _ in seen]
    assert spans == sorted(spans)  # buckets never shrink within a generation
    assert len(set(spans)) >= 2 and spans[-1] == capacity


def test_the_poison_catches_a_read_of_a_masked_slot(monkeypatch, small_buckets) -> None:
    """Not vacuous: poisoning the masked slots inside the span (past the furthest position) turns outputs NaN."""
    seen = launches(monkeypatch, poison_from=lambda span, furthest: furthest + 1)
    executor.generate(model(), [PROMPTS[0]], method="ar", max_new_tokens=8)
    assert any(nan for *_, nan in seen)


def test_buckets_off_span_the_whole_capacity(monkeypatch, small_buckets) -> None:
    monkeypatch.setattr(executor.passes, "SPAN_BUCKETS", False)
    seen = launches(monkeypatch)
    executor.generate(model(), [PROMPTS[0]], method="eesd", draft_len=3, max_new_tokens=20)
    executor.generate(model(), [PROMPTS[0]], method="ppsd", stages=2, max_new_tokens=20)
    assert seen and all(span == capacity for capacity, span, _, _ in seen)


def test_passes_are_kept_per_name_q_and_span(small_buckets) -> None:
    """One pass (one graph or compilation when captured) per (name, q, span): the keys seen."""
    adapter = ModelAdapter(model(epsilon=0.4))
    policies = [make_policy("fixed:2")]
    setup = PassSetup("eesd", SamplingConfig(), 0, [], EXIT_LAYER, SharedExitHead(adapter), policies, "none")
    passes = setup.passes(adapter, [PROMPTS[0]], NEW_TOKENS)
    rows = Rows(prompts=[PROMPTS[0]], sinks=[TokenSink(NEW_TOKENS, ())])
    decode_eesd(adapter, rows, passes, GenerationStats("eesd"), policies=policies)
    keys = set(passes.spans())
    capacity = passes.cache.max_len
    assert {"draft", "verify"} <= {name for name, _, _ in keys} <= {"draft", "verify", "ar"}
    assert {q for name, q, _ in keys if name == "verify"} <= {1, 2, 3}
    assert {span for name, _, span in keys if name == "draft"} == ladder(capacity) - {SMALL}
    assert passes.span(None) == capacity and passes.span(9) == 16


@contextlib.contextmanager
def strict_passes(monkeypatch) -> Iterator[None]:
    with monkeypatch.context() as patch:
        patch.setattr(StaticPass, "__call__", strict)
        yield


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "ar", "sync_every": 8},
        {"method": "eesd", "policy": "beta-ts", "sync_every": 4},
        {"method": "ppsd", "stages": 3, "exit_layer": 1, "sync_every": 7},
    ],
)
def test_bucketed_passes_do_no_host_work(monkeypatch, small_buckets, kwargs) -> None:
    """The host chooses each bucket from positions it knows: every pass still runs under the no-host-work guard
    (three times per launch, as a captured pass is warmed up), with the same tokens."""
    net = model(epsilon=0.6)
    expected = reference(net, monkeypatch, [PROMPTS[0]], None, method="ar")
    with strict_passes(monkeypatch):
        out = executor.generate(net, [PROMPTS[0]], max_new_tokens=NEW_TOKENS, **kwargs)
    assert out.sequences.tolist() == expected


def test_distributed_ppsd_crosses_a_default_bucket(monkeypatch) -> None:
    """The distributed backend's stage processes (started afresh: the default MIN_SPAN of 64) launch each token
    over the bucket of its position, known on the host: 70 tokens cross from bucket 64 to the capacity."""
    net = model(epsilon=0.6)
    prompt, new_tokens = PROMPTS[0], 70
    with monkeypatch.context() as patch:
        patch.setattr(executor.passes, "SPAN_BUCKETS", False)
        expected = executor.generate(net, [prompt], method="ar", max_new_tokens=new_tokens).sequences.tolist()
    out = executor.generate(net, [prompt], method="ppsd", stages=2, exit_layer=1, backend="distributed",
                            max_new_tokens=new_tokens)  # fmt: skip
    assert out.sequences.tolist() == expected
    assert out.stats.flushes > 0 and len(prompt) + new_tokens > executor.passes.MIN_SPAN
