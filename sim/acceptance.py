"""Acceptance models: whether the exit head's draft for a position equals the full model's token.

A model hands out one `AcceptanceStream` per request; `stream.draft(position, index_in_round)` returns
(match, confidence) for the draft of generated token `position` (0-based; token 0 comes from prefill), where
`index_in_round` counts the drafts since the round (EESD) or the last flush (PPSD) began, from 0. Confidence is the
exit head's top-1 probability in [0, 1]; models without one set `has_confidence = False` and return their α.
Randomness only from the `random.Random` passed to `stream`, which the stream owns (it draws ahead). The random models
draw one uniform per position (in position order), so a position's draft is the same whichever round drafts it, just
as in a replayed trace, and a larger α accepts a superset of positions under the same seed (common random numbers make
sweeps over α monotone).

- `BernoulliAcceptance(alpha)`: i.i.d. matches. With `confidence_sharpness=s` the confidence is drawn
  calibrated: conf ~ Beta(α·s, (1 − α)·s) and match ~ Bernoulli(conf), so the mean acceptance is still α.
- `PositionalAcceptance(alphas)`: match ~ Bernoulli(α_i) for the i-th draft of a round (the last α repeats);
  acceptance is front-loaded in real traces (docs/design.md).
- `TraceAcceptance(trace, exit_layer)`: replays a calibration trace; request r starts at prompt r mod P and
  continues into the next prompts (cyclically) when it needs more tokens than one prompt has. `reuse(requests,
  output_len)` says when that would replay tokens beyond a spill into the next prompt: more tokens than the trace
  holds, or more requests than it has prompts (a scenario refuses that unless it asks for `acceptance.reuse: cycle`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sim.formats import DataFile


class AcceptanceStream(Protocol):
    def draft(self, position: int, index_in_round: int) -> tuple[bool, float]: ...


class AcceptanceModel(Protocol):
    has_confidence: bool

    def stream(self, rng: random.Random, request: int) -> AcceptanceStream: ...


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class BernoulliAcceptance:
    alpha: float
    confidence_sharpness: float | None = None

    def __post_init__(self) -> None:
        _check_probability("alpha", self.alpha)
        if self.confidence_sharpness is not None and self.confidence_sharpness <= 0:
            raise ValueError(f"confidence_sharpness must be > 0, got {self.confidence_sharpness}")

    @property
    def has_confidence(self) -> bool:
        return self.confidence_sharpness is not None

    def stream(self, rng: random.Random, request: int) -> AcceptanceStream:
        return _BernoulliStream(rng, self.alpha, self.confidence_sharpness)


DRAW_AHEAD = 64  # positions drawn beyond the one asked for (the same draws, fewer calls)


class _Uniforms:
    """One uniform (and optionally one Beta draw) per position, drawn lazily in position order, `DRAW_AHEAD` at a
    time."""

    def __init__(self, rng: random.Random, alpha: float = 0.0, sharpness: float | None = None) -> None:
        self.rng, self.alpha, self.sharpness = rng, alpha, sharpness
        self.u: list[float] = []
        self.confidence: list[float] = []

    def extend(self, position: int) -> None:
        rng, a, s, end = self.rng, self.alpha, self.sharpness, position + DRAW_AHEAD
        if s is None:
            uniform = rng.random
            self.u.extend([uniform() for _ in range(end + 1 - len(self.u))])
            return
        while len(self.u) <= end:
            self.u.append(rng.random())
            self.confidence.append(a if a in (0.0, 1.0) else rng.betavariate(a * s, (1.0 - a) * s))


class _BernoulliStream(_Uniforms):
    def draft(self, position: int, index_in_round: int) -> tuple[bool, float]:
        if position >= len(self.u):
            self.extend(position)
        if self.sharpness is None:
            return self.u[position] < self.alpha, self.alpha
        confidence = self.confidence[position]
        return self.u[position] < confidence, confidence


@dataclass(frozen=True)
class PositionalAcceptance:
    alphas: tuple[float, ...]
    has_confidence: bool = False

    def __post_init__(self) -> None:
        if not self.alphas:
            raise ValueError("alphas must list at least one probability")
        for i, value in enumerate(self.alphas):
            _check_probability(f"alphas[{i}]", value)

    def stream(self, rng: random.Random, request: int) -> AcceptanceStream:
        return _PositionalStream(self.alphas, rng)


class _PositionalStream(_Uniforms):
    def __init__(self, alphas: Sequence[float], rng: random.Random) -> None:
        super().__init__(rng)
        self.alphas = alphas

    def draft(self, position: int, index_in_round: int) -> tuple[bool, float]:
        if position >= len(self.u):
            self.extend(position)
        alpha = self.alphas[min(index_in_round, len(self.alphas) - 1)]
        return self.u[position] < alpha, alpha


class TraceAcceptance:
    """Replay of an acceptance trace at one exit layer (see module docstring)."""

    has_confidence = True

    def __init__(self, trace: DataFile, exit_layer: int) -> None:
        by_prompt: dict[str, list[tuple[int, bool, float]]] = {}
        layers = set()
        for record in trace.records:
            layers.add(record.exit_layer)
            if record.exit_layer == exit_layer:
                by_prompt.setdefault(record.prompt_id, []).append((record.position, record.match, record.confidence))
        if not by_prompt:
            raise ValueError(
                f"{trace.path or 'acceptance trace'}: no records for exit_layer {exit_layer}; it has {sorted(layers)}"
            )
        self.exit_layer = exit_layer
        self.starts: list[int] = []
        flat: list[tuple[bool, float]] = []
        for prompt in sorted(by_prompt):
            self.starts.append(len(flat))
            flat.extend((match, conf) for _, match, conf in sorted(by_prompt[prompt]))
        self.flat = flat
        self.mean_match = sum(m for m, _ in flat) / len(flat)
        # the dtype the trace's drafts ran in where narrower than the model's (`--draft-dtype`), as the file names it
        self.draft_dtype = str(trace.metadata.get("draft_dtype") or "") or None

    def stream(self, rng: random.Random, request: int) -> AcceptanceStream:
        return _TraceStream(self.flat, self.starts[request % len(self.starts)])

    def reuse(self, requests: int, output_len: int | Sequence[int]) -> str | None:
        """Why replaying `requests` requests of `output_len` tokens reuses the trace (module docstring), else None.
        `output_len` may list each request's own length (a serving workload's): the tokens are then their sum."""
        held, prompts = len(self.flat), len(self.starts)
        if isinstance(output_len, int):
            tokens = requests * output_len
            replays = f"requests x output_len = {requests:,} x {output_len:,} = {tokens:,}"
        else:
            tokens = sum(output_len)
            replays = f"{requests:,} requests of {tokens:,} output tokens in all"
        at = f"at exit_layer {self.exit_layer}"
        if tokens > held:
            return f"the trace holds {held:,} tokens {at} ({prompts} prompts); the workload replays {replays}"
        if requests > prompts:
            return f"the trace holds {prompts} prompts {at}; {requests:,} requests replay some of them twice"
        return None


@dataclass
class _TraceStream:
    flat: Sequence[tuple[bool, float]]
    start: int

    def draft(self, position: int, index_in_round: int) -> tuple[bool, float]:
        return self.flat[(self.start + position) % len(self.flat)]
