"""Facts the executor and the simulator must agree on, stated once (torch-free; both sides import this module).

- The default exit layer of EESD: the middle layer (the draft runs about half the model).
- The cache capacity a decoder's static passes are built for: prompt + output tokens, plus room for the longest
  draft and the token after it (AR and EESD; PPSD's pipeline holds prompt + output only). Captured passes (CUDA
  graphs) round it up to a multiple of `CAPACITY_STEP`, so that one set of graphs serves many lengths; a static
  pass attends over the first `span_bucket` slots of that capacity, which is why the simulator needs the same numbers.
- Span buckets: a static launch attends over a power-of-two number of slots (at least `MIN_SPAN`) holding the
  furthest position it writes, capped at the capacity, so a short context in a large cache reads a short slice.
- The host-read cadence of captured passes: `SYNC_CAPTURED` chained AR steps (or PPSD ticks) per host read, at most
  `AR_HISTORY` (the device-side log they write between two reads); uncaptured ("none") and frozen passes read after
  every step (`is_captured`).
- Verify buckets (frozen CPU passes): a verify pass after k drafts runs at `verify_drafts(k, max_draft, True)` draft
  slots (a power of two, or the policy's longest draft), so a policy whose k varies compiles a few verify passes
  instead of one per k; the slots after the k-th hold stale drafts whose outputs are never read.
- The random stream of a row's draft policy (beta-ts, calibration-ts): `random.Random(policy_seed(seed, row))`, row
  being the row's index in its batch, so that a replay draws what the executor drew.
- Admission into a serving batch (`may_enter`), and continuous PPSD batching's join rule (`join_count` of them),
  asked by the simulator, the executor's serving host and, on the distributed backend, PPSD's last stage process.
- PPSD's balanced stages (`balanced_counts`): sizes that differ by at most one layer, the later stages taking the
  extra ones.
"""

from __future__ import annotations

from collections.abc import Sequence

CAPACITY_STEP = 256  # captured passes: cache capacity is a multiple of this
SYNC_CAPTURED = 8  # captured passes: default `sync_every` (chained AR steps or PPSD ticks per host read)


def default_sync_every(captured: bool) -> int:
    """The executor's `sync_every` where none is given: SYNC_CAPTURED for captured passes, 1 uncaptured or frozen (a
    host read after every step or tick)."""
    return SYNC_CAPTURED if captured else 1


AR_HISTORY = 64  # the most chained steps between two host reads (rows of the device-side token/verdict log)
# The smallest attention span bucket. 64 slots of K/V are under 1% of the bytes a decode step reads per layer (its
# weights: SmolLM2-135M's layer holds 7 MB in bf16, 64 slots of its K and V 48 KB), so smaller buckets would add
# graphs and compilations for next to no saving; buckets double from here, so a cache of capacity C has about
# log2(C / MIN_SPAN) + 1 of them (7 for 4096).
MIN_SPAN = 64
# PPSD's distributed backend, one tick's messages, int64 values each (`ID_BYTES`): the last rank's outcome to every
# other rank (verdict, token, position, going: 0 done, 1 on, 2 on after a continuous batch's stop), then each rank's
# header to the next (present, position, draft), followed by the hidden state where it holds a token
# (`executor.ppsd_dist.StageLink`).
ID_BYTES = 8
PPSD_OUTCOME_VALUES = 4
PPSD_HEADER_VALUES = 3


def is_captured(capture: str | None) -> bool:
    """Whether passes of this (resolved) capture mode are captured, chained on the device between host reads: every
    mode but "none" and "freeze" (frozen CPU passes run as the host calls them)."""
    return capture not in ("none", "freeze")


def default_exit_layer(num_layers: int) -> int:
    """EESD's exit layer when none is given: the middle layer, at least 1."""
    return max(1, num_layers // 2)


def draft_capacity(longest: int, output_len: int) -> int:
    """The longest draft a round can make, which sizes an EESD decoder's static buffers and bounds its verify buckets:
    the policy's `longest`, capped by what a row has left to generate (a round's drafts and the full model's token fit
    in it, `sim.policy.round_budget`)."""
    return max(1, min(longest, output_len - 1))


def verify_drafts(k: int, max_draft: int, bucketed: bool) -> int:
    """The draft slots of the verify pass that checks k drafts: k itself, or, bucketed, the smallest power of two
    holding k, capped at `max_draft` (the longest draft the policy makes, which the cache has room for). k = 0, a
    round that drafts nothing, is never padded."""
    if not bucketed or k <= 1:
        return k
    return min(1 << (k - 1).bit_length(), max(max_draft, k))


def captured_capacity(needed: int) -> int:
    """`needed` cache slots rounded up to a multiple of CAPACITY_STEP (captured passes)."""
    return -(-needed // CAPACITY_STEP) * CAPACITY_STEP


def span_bucket(furthest: int, capacity: int, min_span: int = MIN_SPAN) -> int:
    """The cache slots a static launch attends over when the furthest position it writes is `furthest`: `min_span`
    (a power of two) doubled until it holds slots 0 .. furthest, capped at `capacity`."""
    return min(max(min_span, 1 << max(furthest, 0).bit_length()), capacity)


def cache_capacity(method: str, prompt_len: int, output_len: int, max_draft_len: int, captured: bool) -> int:
    """The cache slots a decoder's passes hold: prompt + output, + max_draft_len + 1 for AR and EESD (a verify pass
    writes the drafts and the token after them; AR's max_draft_len is 0), rounded up when captured."""
    slots = prompt_len + output_len
    if method != "ppsd":
        slots += max_draft_len + 1
    return captured_capacity(slots) if captured else slots


def ppsd_serving_output(max_output_len: int, continuous: bool) -> int:
    """The output room of PPSD serving's cache past the longest prompt: the longest output, or with continuous
    batching two of them (a stretch feeds every row as far as its row asking the most from where it resumed, so a
    row that resumed near its end is fed up to another row's output length further)."""
    return 2 * max_output_len if continuous else max_output_len


MAX_BATCH = 4096  # the most rows a serving batch may hold (a scenario's max_batch)


def join_count(join_min: int, max_batch: int, running: int) -> int:
    """How many waiting requests stop a continuous PPSD decode: `join_min`, or the slots free if fewer (at least
    one)."""
    return max(1, min(join_min, max_batch - running))


def may_enter(
    needs: Sequence[int], count: int, running: int, kv_used: int, max_batch: int, kv_capacity: int | None
) -> bool:
    """Admission's rule: the first `count` requests waiting (`needs`: the KV tokens each would hold, in queue order)
    may all enter a batch running `running` rows that hold `kv_used` tokens (slots free and room in the cache)."""
    if len(needs) < count or running + count > max_batch:
        return False
    return kv_capacity is None or kv_used + sum(needs[:count]) <= kv_capacity


def policy_seed(seed: int, row: int) -> int:
    """The seed of the draft policy of row `row` (its index in the batch) of a generation seeded `seed`."""
    return seed * 7919 + row


def balanced_counts(layers: int, n: int) -> list[int]:
    """Stage sizes that differ by at most one layer, the later stages taking the extra ones (stage 1 also runs the
    exit head): how the executor's PPSD balances its stages and the simulator prices them."""
    base, extra = divmod(layers, n)
    return [base + (1 if i >= n - extra else 0) for i in range(n)]
