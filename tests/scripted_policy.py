"""A scripted draft policy for tests of the executor and the simulator (torch-free)."""

from __future__ import annotations


class ScriptedPolicy:
    """A draft policy (`sim.policy.DraftPolicy`) that drafts the scripted budgets in turn (then 0) whatever it
    observes: a round that drafts nothing is no observation."""

    max_draft_len, needs_confidence = 4, False

    def __init__(self, budgets: list[int]) -> None:
        self.budgets = list(budgets)

    def begin_round(self) -> int:
        return self.budgets.pop(0) if self.budgets else 0

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return True

    def update(self, drafted: int, accepted: int) -> None:
        pass
