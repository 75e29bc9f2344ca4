"""Draft policies: how many tokens the early exit drafts each round.

Torch-free, so that the executor and the simulator drive the same objects. The interface follows HF's
`CandidateGenerator` ("propose, then get feedback"):

    k = policy.begin_round()                 # upper bound on drafts this round (>= 0)
    ... after each draft token:  policy.keep_drafting(drafted, confidence) -> bool
    policy.update(drafted, accepted)         # feedback once the full model has verified the round

`drafted` counts the draft tokens proposed this round, `accepted` the longest verified prefix (0 <= accepted <=
drafted). `confidence` is the exit head's top-1 probability of the latest draft token (policies that do not look at
it set `needs_confidence = False`, so the executor need not compute it). Randomness, where a policy has any, comes
only from the `random.Random` passed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class DraftPolicy(Protocol):
    max_draft_len: int
    needs_confidence: bool

    def begin_round(self) -> int: ...

    def keep_drafting(self, drafted: int, confidence: float) -> bool: ...

    def update(self, drafted: int, accepted: int) -> None: ...


@dataclass
class FixedPolicy:
    """Always draft `draft_len` tokens."""

    draft_len: int
    needs_confidence: bool = False

    def __post_init__(self) -> None:
        if self.draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {self.draft_len}")

    @property
    def max_draft_len(self) -> int:
        return self.draft_len

    def begin_round(self) -> int:
        return self.draft_len

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return drafted < self.draft_len

    def update(self, drafted: int, accepted: int) -> None:
        pass


def make_policy(spec: str | DraftPolicy, *, rng: random.Random | None = None) -> DraftPolicy:
    """Build a policy from a spec such as `"fixed:4"`; a policy object is returned unchanged."""
    if not isinstance(spec, str):
        return spec
    name, _, arg = spec.partition(":")
    if name == "fixed":
        try:
            return FixedPolicy(int(arg))
        except ValueError:
            raise ValueError(f"policy {spec!r}: expected 'fixed:K' with an integer K >= 1") from None
    raise ValueError(f"unknown draft policy {spec!r}; known: fixed:K")
