"""Prefill buckets (`executor.passes.prefill_width`): on a GPU a prefill pass runs at a width padded up to a multiple
of PREFILL_BUCKET (at most the cache capacity), so that a new prompt length reuses the kernels' plans of a bucket.

The pads sit after every prompt's last token and are rolled back, so nothing a real position computes may change.
On this CPU the buckets are forced (`prefill_width` patched to multiples of 8): AR and EESD (shared and a layered
head, alone and in a left-padded ragged batch, greedy and sampled in exact mode, uncaptured and frozen) must give
exactly the tokens they give unpadded (float64), every prefill having run at its bucket width; so must PPSD (every
stage's prefill at the bucket width, its pads' KV rolled back in every stage, the trained head's too)."""

from __future__ import annotations

import pytest
import torch
from test_batch_and_dropin import left_pad
from test_eesd_chain import layered_head
from test_passes import EXIT_LAYER, PROMPTS, model

import executor
import executor.decoding
import executor.passes
import executor.ppsd
from executor.passes import prefill_width

BUCKET = 8


def test_a_gpu_prefill_width_is_the_next_bucket_within_the_cache() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [prefill_width(n, 4096, cuda) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]
    assert prefill_width(100, 110, cuda) == 110 and prefill_width(110, 110, cuda) == 110  # capped by the cache
    assert prefill_width(45, 4096, cpu) == 45  # a CPU pays for pads in compute only: none
    executor.passes.PREFILL_BUCKETS = False
    try:
        assert prefill_width(45, 4096, cuda) == 45
    finally:
        executor.passes.PREFILL_BUCKETS = True


def force_buckets(monkeypatch) -> list[tuple[int, int, int]]:
    """Buckets of 8 on this CPU from here on; records (longest prompt, capacity, width) of every prefill."""
    widths: list[tuple[int, int, int]] = []

    def bucketed(longest: int, capacity: int, device: torch.device) -> int:
        width = max(longest, min(-(-longest // BUCKET) * BUCKET, capacity))
        widths.append((longest, capacity, width))
        return width

    monkeypatch.setattr(executor.decoding, "prefill_width", bucketed)
    monkeypatch.setattr(executor.ppsd, "prefill_width", bucketed)
    return widths


RAGGED = [*PROMPTS, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]  # 5, 2 and 11 tokens: buckets 8 and 16


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "ar"},
        {"method": "eesd", "exit_layer": EXIT_LAYER, "draft_len": 3},
        {"method": "eesd", "exit_layer": EXIT_LAYER, "policy": "beta-ts"},
        {"method": "eesd", "exit_layer": EXIT_LAYER, "draft_len": 2, "do_sample": True, "temperature": 0.8, "seed": 3},
        {"method": "eesd", "exit_layer": EXIT_LAYER, "draft_len": 2, "head": "layered"},
    ],
    ids=["ar", "eesd-fixed", "eesd-beta-ts", "eesd-sampled", "eesd-layered-head"],
)
@pytest.mark.parametrize("capture", ["none", "freeze"])
def test_padded_prefill_gives_the_tokens_of_an_unpadded_one(monkeypatch, kwargs, capture) -> None:
    tiny = model()
    if kwargs.get("head") == "layered":
        kwargs = {**kwargs, "head": layered_head(tiny)}

    def run() -> list[list[int]]:
        alone = [executor.generate(tiny, [p], max_new_tokens=12, capture=capture, **kwargs).sequences[0].tolist()
                 for p in RAGGED]  # fmt: skip
        ids, mask = left_pad(RAGGED)
        batch = executor.generate(tiny, ids, attention_mask=mask, max_new_tokens=12, capture=capture, **kwargs)
        return alone + batch.sequences.tolist()

    reference = run()
    widths = force_buckets(monkeypatch)
    assert run() == reference
    assert {(longest, width) for longest, _, width in widths} >= {(5, 8), (2, 8), (11, 16)}
    assert all(width == min(-(-longest // BUCKET) * BUCKET, capacity) for longest, capacity, width in widths)


def test_a_bucket_past_the_cache_is_cut_to_its_capacity(monkeypatch) -> None:
    """A prompt whose bucket would run past the cache: the prefill runs at the capacity (the pads that fit)."""
    tiny = model()
    prompt = list(range(1, 14))  # 13 tokens + 2 new: a cache of 15 slots, bucket 16 cut to 15
    reference = executor.generate(tiny, [prompt], max_new_tokens=2, capture="none").sequences.tolist()
    widths = force_buckets(monkeypatch)
    assert executor.generate(tiny, [prompt], max_new_tokens=2, capture="none").sequences.tolist() == reference
    assert widths and all(width <= capacity for _, capacity, width in widths)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stages": 2},
        {"stages": 3, "sync_every": 4},
        {"stages": 2, "do_sample": True, "temperature": 0.8, "seed": 5},
        {"stages": 2, "head": "layered"},
    ],
    ids=["two-stages", "three-stages-chained", "sampled", "layered-head"],
)
def test_padded_ppsd_prefill_gives_the_tokens_of_an_unpadded_one(monkeypatch, kwargs) -> None:
    tiny = model()
    if kwargs.get("head") == "layered":
        kwargs = {**kwargs, "head": layered_head(tiny), "exit_layer": EXIT_LAYER}

    def run() -> list[list[int]]:
        return [executor.generate(tiny, [p], method="ppsd", backend="sequential", max_new_tokens=12, **kwargs)
                .sequences[0].tolist() for p in RAGGED]  # fmt: skip

    ar = [executor.generate(tiny, [p], max_new_tokens=12, **{k: v for k, v in kwargs.items() if k in SAMPLING})
          .sequences[0].tolist() for p in RAGGED]  # fmt: skip
    reference = run()
    assert reference == ar
    widths = force_buckets(monkeypatch)
    assert run() == reference
    expected = [(5, 8), (2, 8), (11, 16)]  # a width per prompt and stage
    assert [(longest, width) for longest, _, width in widths] == [w for w in expected for _ in range(kwargs["stages"])]


SAMPLING = ("do_sample", "temperature", "seed")


def test_a_padded_ppsd_prefill_leaves_the_books_at_the_prompt(monkeypatch) -> None:
    """Every stage's prefill runs at the bucket width and rolls its pads' KV back, in its own layers and its trained
    exit head's: the books hold the prompt only, so a later write past them is still refused as a gap."""
    from executor.adapter import ModelAdapter
    from executor.ppsd import StageRunner, plan_stages
    from executor.sampling import SamplingConfig, TokenSelector

    tiny = model()
    adapter, head = ModelAdapter(tiny), layered_head(tiny)
    cache = adapter.new_cache(1, 32, extra_layers=head.extra_layers)
    selector = TokenSelector(SamplingConfig(), [5], 0, [], "cpu")
    plan = plan_stages(adapter.num_layers, 2, exit_layer=EXIT_LAYER)
    runners = [StageRunner(adapter, cache, plan, stage, selector, head=head) for stage in range(2)]
    force_buckets(monkeypatch)
    hidden = None
    with torch.inference_mode():
        for runner in runners:
            hidden = runner.prefill(hidden, [[5, 9, 1, 33, 2]])
    assert hidden.shape[1] == BUCKET
    assert cache.lengths == [[5]] * cache.num_layers
    with pytest.raises(ValueError, match="gap"):
        cache.claim([0], [6], 1)
