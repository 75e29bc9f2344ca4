"""Round costs measured on the executor's own passes: what an EESD round of k drafts costs against an AR step.

The Thompson-sampling draft policies (`sim.policy`) weigh a round's expected tokens against its cost. By default
`generate` gives them one ratio c estimated from the weights each pass reads (`executor.heads.draft_cost_ratio`),
so that a round of k drafts costs 1 + k·c AR steps. That holds where a pass is bound by reading its weights (a GPU
at small batches). It does not hold where a verify pass's time grows with its width: a CPU's matrix kernels switch
at a few rows (on a 2-core Xeon, SmolLM2's LM head takes 9 ms for 1 row, 11 ms for 3 and 20 ms for 4), so a fourth
token in the verify pass costs far more than the third, and a policy told 1 + k·c drafts into that step.

`measure_round_costs` times real rounds on the passes `generate` runs (the same capture mode): k draft steps
chained as `draft_steps` runs them, then the verify pass over k + 1 tokens, against a round of no drafts (the AR
step, with a trained head's own layer where it has one, as `zero_draft_rounds` runs it: with captured passes,
its share of `SYNC_CAPTURED` steps chained on the device with one host read). The result is the table
C_0 = 1, C_1, ..., C_max that `make_policy(..., round_costs=...)` takes, or, written out, the policy spec
`beta-ts:costs=C1/C2/...` (`RoundCosts.spec`) that `generate` and `eesd generate --policy` take as they are.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from executor.passes import resolve_capture, resolve_sync_every
from executor.runtime import synchronize
from sim.formats import write_text_atomic

FORMAT, SCHEMA_VERSION = "eesd.round_costs", 1


@dataclass(frozen=True)
class RoundCosts:
    """C_0..C_max (C_0 = 1) and the milliseconds they come from: `ms[k]` is the median time of a round of k drafts
    (k = 0: the AR step), with `spread[k]` its (min, max) over the timed rounds."""

    costs: tuple[float, ...]
    ms: tuple[float, ...]
    spread: tuple[tuple[float, float], ...]
    context: int

    def spec(self, policy: str = "beta-ts") -> str:
        """The policy spec with these costs pinned: `beta-ts:costs=1.4521/1.9032/...` (4 decimals)."""
        from sim.policy import format_costs

        return f"{policy}:costs={format_costs(self.costs[1:])}"


def measure_round_costs(
    model: Any,
    exit_layer: int,
    head: Any = None,
    max_draft_len: int = 8,
    *,
    capture: str = "none",
    context: int = 128,
    repeats: int = 5,
    warmups: int = 1,
    draft_dtype: Any = None,
    verify_buckets: bool = True,
) -> RoundCosts:
    """Time rounds of 0..`max_draft_len` drafts at position `context` of one row of `model` (an HF model or a
    `ModelAdapter`; its cache holds whatever the timing writes: a pass's time does not depend on the values),
    `repeats` timed rounds per k after `warmups`, interleaved (k = 0, 1, ..., max, then again) so that a drifting
    machine moves every k alike. `head` as `generate` takes it; `capture`, `draft_dtype` and `verify_buckets` as
    `generate`'s (the same passes: frozen, a round of k drafts verifies on its bucket's pass)."""
    from executor.adapter import ModelAdapter
    from executor.api import PassSetup, check_arguments, check_draft_dtype
    from executor.heads import resolve_head
    from executor.sampling import SamplingConfig
    from sim.policy import FixedPolicy

    if max_draft_len < 1 or context < 1 or repeats < 1 or warmups < 0:
        raise ValueError(
            f"expected max_draft_len >= 1, context >= 1, repeats >= 1, warmups >= 0; got {max_draft_len}, {context}, "
            f"{repeats}, {warmups}"
        )
    adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
    prompt, chained = [0] * context, rounds_chained(capture, adapter.device)
    check_arguments(adapter, [prompt], "eesd", exit_layer, max_draft_len + chained + 2)
    head = resolve_head(head, adapter, exit_layer)
    draft_dtype = check_draft_dtype(adapter, "eesd", draft_dtype)
    policy = [FixedPolicy(max_draft_len)]
    setup = PassSetup("eesd", SamplingConfig(), 0, [], exit_layer, head, policy, capture, draft_dtype, verify_buckets)
    with torch.inference_mode():
        passes = setup.passes(adapter, [prompt], max_draft_len + chained + 2)
        rounds = [_round(passes, context, k, chained) for k in range(max_draft_len + 1)]
        for _ in range(warmups):
            for run in rounds:
                run()
        times: list[list[float]] = [[] for _ in rounds]
        for _ in range(repeats):
            for k, run in enumerate(rounds):
                times[k].append(run())
    ms = tuple(statistics.median(t) for t in times)
    costs = (1.0, *(m / ms[0] for m in ms[1:]))
    return RoundCosts(costs, ms, tuple((min(t), max(t)) for t in times), context)


def rounds_chained(capture: str, device: Any) -> int:
    """How many rounds of no drafts `generate` chains on the device per host read with this capture mode: its
    default `sync_every` (`executor.passes.resolve_sync_every`: `SYNC_CAPTURED` where the passes are captured, 1
    uncaptured or frozen)."""
    return resolve_sync_every(None, resolve_capture(capture, device, "greedy"))


def _round(passes: Any, at: int, k: int, chained: int) -> Callable[[], float]:
    """A timed round of k drafts at position `at`, in milliseconds, device work included; k = 0: the AR step, as
    `zero_draft_rounds` runs it, its share of `chained` steps chained on the device with one host read."""
    device = passes.adapter.device
    step = passes.ar_head if passes.layers_head() else passes.ar

    def run() -> float:
        passes.load([0], [at], 1)
        passes.set_counts([k])  # the verdict's draft count, as `verify_pass` gives it
        synchronize(device)
        begin = time.perf_counter()
        if k == 0:
            for offset in range(chained):
                step(at + offset)
            synchronize(device)
            return (time.perf_counter() - begin) * 1e3 / chained
        for j in range(k):
            passes.draft(at + j)
        slots = passes.verify_slots(k)  # frozen: the verify bucket a decode of these passes would run
        passes.verify(slots, at + slots)  # its positions from where the k draft steps left `positions[1]`
        synchronize(device)
        return (time.perf_counter() - begin) * 1e3

    return run


DRAFT_DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")  # metadata.draft_dtype, where drafts ran narrower


def write_round_costs(path: Path, metadata: dict[str, Any], measured: RoundCosts) -> None:
    """The table as JSON (`eesd.round_costs`, docs/formats.md), written atomically: format, schema version, metadata
    (the machine, versions, and the head, exit layer and capture it ran with), context, costs C_0.., ms, spread and
    the policy spec."""
    data = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "metadata": metadata, "context": measured.context,
        "costs": list(measured.costs), "ms": list(measured.ms), "spread_ms": [list(s) for s in measured.spread],
        "policy": measured.spec(),
    }  # fmt: skip
    write_text_atomic(Path(path), json.dumps(data, indent=1) + "\n")


def read_round_costs(path: Path) -> tuple[tuple[float, ...], dict[str, Any]]:
    """(C_0.., metadata) of a file `write_round_costs` wrote; a ValueError naming the file and the field otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read it ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file of round costs ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: format: expected {FORMAT!r} (written by `eesd calibrate rounds --out`)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version: expected {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    costs, metadata = data.get("costs"), data.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("exit_layer"), int):
        raise ValueError(f"{path}: metadata.exit_layer: expected the exit layer the rounds ran at (an integer)")
    drafts = metadata.get("draft_dtype")
    if drafts is not None and drafts not in DRAFT_DTYPE_NAMES:
        names = ", ".join(DRAFT_DTYPE_NAMES)
        raise ValueError(f"{path}: metadata.draft_dtype: expected one of {names}, got {drafts!r}")
    numbers = isinstance(costs, list) and all(type(c) in (int, float) and math.isfinite(c) and c > 0 for c in costs)
    if not numbers or len(costs) < 2 or costs[0] != 1:
        raise ValueError(f"{path}: costs: expected [1, C_1, ..., C_K], K >= 1, every C_k a finite number > 0")
    return tuple(float(c) for c in costs), metadata
