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
- `TraceAcceptance(trace, exit_layer, stop_at_eos=True)`: replays a calibration trace; request r starts at prompt
  r mod P and continues into the next prompts (cyclically) when it needs more tokens than one prompt has. A prompt
  whose recorded text ends in one of the trace's EOS ids (metadata `eos_token_ids`) ended there, as the executor ends
  a row: with `stop_at_eos` a request ends at the first EOS its replay reaches (`output_len(request, requested)`, at
  most `requested`), otherwise it replays on into the next prompt, as if the model had not stopped. `reuse(requests,
  output_len)` says when the replay would reuse tokens: more tokens than the trace holds, or more requests than it
  has prompts (a scenario refuses that unless it asks for `acceptance.reuse: cycle`). Each prompt's rows at the exit
  layer must hold positions 0, 1, 2, ... without a gap (a ValueError naming the row otherwise); `check_trace_fits`
  refuses a trace with an exit layer or a token id the scenario's model does not have.

Every model says how many tokens request r generates when `requested` are asked for (`output_len`): the random
models always `requested`, a trace replay fewer where its text ends first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sim.formats import FIRST_RECORD_LINE, DataFile, quote
from sim.models import ModelConfig


class AcceptanceStream(Protocol):
    def draft(self, position: int, index_in_round: int) -> tuple[bool, float]: ...


class AcceptanceModel(Protocol):
    has_confidence: bool

    def stream(self, rng: random.Random, request: int) -> AcceptanceStream: ...

    def output_len(self, request: int, requested: int) -> int: ...


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

    def output_len(self, request: int, requested: int) -> int:
        return requested


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

    def output_len(self, request: int, requested: int) -> int:
        return requested


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

    def __init__(self, trace: DataFile, exit_layer: int, stop_at_eos: bool = True) -> None:
        by_prompt: dict[str, list[tuple[int, int, bool, float, int]]] = {}
        layers = set()
        recorded = trace.metadata.get("exit_layers")
        for index, record in enumerate(trace.records):
            if isinstance(recorded, list) and record.exit_layer not in recorded:
                raise ValueError(
                    f"{_record_where(trace, index)}: column 'exit_layer': {record.exit_layer} is not among the layers "
                    f"the trace recorded (metadata.exit_layers {recorded})"
                )
            layers.add(record.exit_layer)
            if record.exit_layer == exit_layer:
                row = (record.position, record.token, record.match, record.confidence, index)
                by_prompt.setdefault(record.prompt_id, []).append(row)
        if not by_prompt:
            raise ValueError(
                f"{trace.path or 'acceptance trace'}: no records for exit_layer {exit_layer}; it has {sorted(layers)}"
            )
        self.exit_layer = exit_layer
        self.head: str | None = None  # the exit_head the trace was recorded with, where the plan could tell
        self.starts: list[int] = []
        flat: list[tuple[bool, float]] = []
        eos = {int(t) for t in trace.metadata.get("eos_token_ids") or ()}
        ends: list[int] = []  # the flat index of each prompt's last token where that token is an EOS
        for prompt in sorted(by_prompt):
            self.starts.append(len(flat))
            rows = sorted(by_prompt[prompt])
            _check_positions(trace, exit_layer, prompt, rows)
            flat.extend((match, conf) for _, _, match, conf, _ in rows)
            if rows[-1][1] in eos:
                ends.append(len(flat) - 1)
        self.flat = flat
        self.ended = len(ends)  # prompts whose text ends in an EOS
        self.stop_at_eos = stop_at_eos
        # tokens a replay from each prompt's start generates up to and including the first EOS it reaches
        self._to_eos = [_tokens_to_end(start, ends, len(flat)) for start in self.starts]
        # over the drafted positions, as the trace's own `agreement` (each prompt's token 0 comes from prefill)
        starts = set(self.starts)
        drafted = [m for i, (m, _) in enumerate(flat) if i not in starts]
        self.mean_match = sum(drafted) / len(drafted) if drafted else sum(m for m, _ in flat) / len(flat)
        # the dtype the trace's drafts ran in where narrower than the model's (`--draft-dtype`), as the file names it
        self.draft_dtype = str(trace.metadata.get("draft_dtype") or "") or None

    def stream(self, rng: random.Random, request: int) -> AcceptanceStream:
        return _TraceStream(self.flat, self.starts[request % len(self.starts)])

    def output_len(self, request: int, requested: int) -> int:
        """The tokens request `request` generates when `requested` are asked for: fewer where its replay reaches an
        EOS first (with `stop_at_eos`)."""
        to_eos = self._to_eos[request % len(self.starts)] if self.stop_at_eos else None
        return requested if to_eos is None else min(requested, to_eos)

    def reuse(self, requests: int, output_len: int | Sequence[int]) -> str | None:
        """Why replaying `requests` requests of `output_len` tokens reuses the trace (module docstring), else None.
        `output_len` may list each request's own length (a serving workload's); the tokens replayed are the sum of
        what each request generates (`output_len(request, asked)`, no more than asked)."""
        held, prompts = len(self.flat), len(self.starts)
        asked = [output_len] * requests if isinstance(output_len, int) else list(output_len)
        tokens = sum(self.output_len(r, n) for r, n in enumerate(asked))
        if isinstance(output_len, int):
            replays = f"requests x output_len = {requests:,} x {output_len:,} = {sum(asked):,}"
        else:
            replays = f"{requests:,} requests of {sum(asked):,} output tokens in all"
        replays += f" ({tokens:,} up to their EOS)" if tokens < sum(asked) else ""
        at = f"at exit_layer {self.exit_layer}"
        if tokens > held:
            return f"the trace holds {held:,} tokens {at} ({prompts} prompts); the workload replays {replays}"
        if requests > prompts:
            return f"the trace holds {prompts} prompts {at}; {requests:,} requests replay some of them twice"
        return None


def _record_where(trace: DataFile, index: int) -> str:
    """How a message names record `index` of a trace: `FILE:LINE` for a file read (a record a line, after the two
    header lines), else its number."""
    return f"{trace.path}:{index + FIRST_RECORD_LINE}" if trace.path else f"acceptance trace record {index + 1}"


def _check_positions(trace: DataFile, exit_layer: int, prompt: str, rows: Sequence[tuple]) -> None:
    """A prompt's rows at one exit layer, sorted, hold positions 0, 1, 2, ...: a replay reads them in turn, so a gap
    would join two parts of the text and shift every later token. A ValueError naming the row after the gap."""
    for expected, (position, *_, index) in enumerate(rows):
        if position != expected:
            raise ValueError(
                f"{_record_where(trace, index)}: column 'position': expected {expected}, got {position} (prompt "
                f"{quote(prompt)} at exit_layer {exit_layer}: a prompt's positions run 0, 1, 2, ... without gaps)"
            )


def check_trace_fits(trace: DataFile, model: ModelConfig) -> None:
    """A ValueError naming the first row of an acceptance trace that `model` cannot have made: an exit layer outside
    [1, num_layers - 1] (the layers before it and one after it) or a token id outside its vocabulary."""
    layers, vocab = model.num_layers, model.vocab_size
    for index, record in enumerate(trace.records):
        if not 1 <= record.exit_layer < layers:
            raise ValueError(
                f"{_record_where(trace, index)}: column 'exit_layer' must be in [1, {layers - 1}] for {model.name}'s "
                f"{layers} layers, got {record.exit_layer}"
            )
        if record.token >= vocab:
            raise ValueError(
                f"{_record_where(trace, index)}: column 'token' must be below {model.name}'s vocab_size {vocab}, got "
                f"{record.token}"
            )


def _tokens_to_end(start: int, ends: Sequence[int], held: int) -> int | None:
    """Tokens from flat index `start` up to and including the first EOS at or after it (cyclically, as a replay
    continues into the next prompts); None where the trace has no EOS."""
    if not ends:
        return None
    later = [end for end in ends if end >= start]
    end = later[0] if later else ends[0] + held
    return end - start + 1


@dataclass
class _TraceStream:
    flat: Sequence[tuple[bool, float]]
    start: int

    def draft(self, position: int, index_in_round: int) -> tuple[bool, float]:
        return self.flat[(self.start + position) % len(self.flat)]
