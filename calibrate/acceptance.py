"""`eesd calibrate acceptance`: per generated token, does the exit head at layer E agree with the full model?

For each prompt: (1) the full model's own greedy output `tokens` (`executor.generate(method="ar")`, stopping at EOS);
(2) ONE teacher-forced pass over prompt + tokens through the executor's layers, applying the exit head at every
profiled exit layer on the way: for generated token i, `match` says whether the head's top token at the position
before it equals tokens[i], and `confidence` is the head's top-1 probability.

With greedy verification and KV reuse (executor/decoding.py), the draft of position p + j in a round that starts at
p sees exactly the full model's prefix as long as the j drafts before it matched, so a round accepts the run of
consecutive matches from p, capped by the draft budget (`predicted_accepted`). `check_traces` re-runs real
`executor.generate(method="eesd")` on some prompts and compares its per-round accepted lengths and tokens with that
prediction; any difference raises `TraceCheckError` in a strict check (float32 / float64), while a reporting check
(bf16 / fp16, whose batched verify and batched AR round differently from one-token steps, so near-ties can flip)
counts the runs that agree and lets the caller record that.

A head with layers of its own (`extra_layers`) is called once over the whole sequence with a cache that has slots
for them, as a decoder layer would be: it writes its KV at the pass's positions and attends causally.

With `draft_dtype` (drafts in a narrower dtype, as `generate(draft_dtype=)` makes them) the heads read a second
teacher-forced pass of the narrow copies of layers [0, E) instead. That pass is close to, not exactly, what a real
round's drafts see: a draft step reads the model's own K/V (cast) at the positions the verify passes committed, and
the narrow copies' at the drafts before it in its round, where this pass has the copies' K/V at every position. So
such a trace is checked as a report (`check_mode`): near-ties may flip.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from executor.adapter import ModelAdapter, Step
from executor.api import generate
from executor.heads import resolve_head
from sim.formats import AcceptanceRecord


class TraceCheckError(ValueError):
    """Real EESD runs did not accept the lengths the trace predicts (the CLI reports it as an error, exit 2)."""


@dataclass(frozen=True)
class PromptTrace:
    prompt_id: str
    prompt: tuple[int, ...]
    tokens: tuple[int, ...]  # the full model's greedy output (AR)
    matches: dict[int, tuple[bool, ...]]  # exit layer -> per generated token
    confidences: dict[int, tuple[float, ...]]
    full_agreement: int  # tokens the teacher-forced full model also predicts (near-ties may flip a few)


@dataclass(frozen=True)
class CheckRun:
    prompt_id: str
    exit_layer: int
    predicted: tuple[int, ...]
    measured: tuple[int, ...]
    same_tokens: bool
    ok: bool


@dataclass(frozen=True)
class CheckReport:
    runs: tuple[CheckRun, ...]
    draft_len: int
    strict: bool = True

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs)

    @property
    def rounds(self) -> int:
        return sum(len(r.measured) for r in self.runs)

    def summary(self) -> dict[str, Any]:
        return {
            "runs": len(self.runs),
            "rounds": self.rounds,
            "draft_len": self.draft_len,
            "prompts": sorted({r.prompt_id for r in self.runs}),
            "ok": self.ok,
            "strict": self.strict,
            "runs_same_tokens": sum(r.same_tokens for r in self.runs),
            "runs_same_rounds": sum(r.ok for r in self.runs),
        }

    def describe(self) -> str:
        """One line for the console: what the check found."""
        if self.ok:
            return (
                f"check: {len(self.runs)} real EESD runs ({self.rounds} rounds, draft_len {self.draft_len}) accepted "
                "exactly the lengths the trace predicts"
            )
        same_tokens = sum(r.same_tokens for r in self.runs)
        return (
            f"check (reported, not strict): {sum(r.ok for r in self.runs)} of {len(self.runs)} real EESD runs "
            f"accepted exactly the predicted lengths, {same_tokens} emitted the trace's tokens (reduced precision "
            "rounds batched passes differently, so near-ties can flip); the file records these counts"
        )


def check_exit_layers(exit_layers: Iterable[int], num_layers: int) -> tuple[int, ...]:
    layers = tuple(sorted(set(exit_layers)))
    if not layers or layers[0] < 1 or layers[-1] >= num_layers:
        raise ValueError(
            f"--exit-layers must lie in [1, {num_layers - 1}] for a {num_layers}-layer model, got {layers}"
        )
    return layers


def greedy_tokens(
    adapter: ModelAdapter, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: list[int]
) -> list[list[int]]:
    """The full model's greedy output for a batch of prompts (left-padded), each cut after its first EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    result = generate(
        adapter, ids, method="ar", max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0,
        attention_mask=mask,
    )  # fmt: skip
    outputs = []
    for row in result.sequences[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        outputs.append(row[:end])
    return outputs


@torch.inference_mode()
def teacher_forced(
    adapter: ModelAdapter,
    prompt_id: str,
    prompt: Sequence[int],
    tokens: Sequence[int],
    heads: dict[int, Any],
    drafts: dict[int, tuple[ModelAdapter, Any]] | None = None,
) -> PromptTrace:
    """One pass over prompt + tokens[:-1]; the exit heads read the hidden states at their layers on the way, or,
    with `drafts` (exit layer -> the narrow draft adapter and its head, `low_precision_draft`), a pass of each
    draft adapter's layers [0, E) over the same tokens."""
    sequence = list(prompt) + list(tokens[:-1])
    length = len(sequence)
    step = Step.at(0, length, adapter.device)
    extra = max(h.extra_layers for h in heads.values())
    cache = adapter.new_cache(1, length, extra_layers=extra)
    ids = torch.tensor([sequence], device=adapter.device)
    hidden = adapter.embed(ids)
    rows = slice(len(prompt) - 1, length)  # the position before each generated token
    targets = torch.tensor(list(tokens), device=adapter.device)
    matches, confidences, start = {}, {}, 0
    for exit_layer in sorted(heads):
        hidden = adapter.forward_layers(hidden, step, cache, start, exit_layer)
        start = exit_layer
        if drafts is None:
            logits = heads[exit_layer](hidden, step, cache)
        else:
            draft, head = drafts[exit_layer]
            draft_cache = adapter.new_cache(1, length, extra_layers=extra)  # the model's dtype, as generate's
            early = draft.forward_layers(draft.embed(ids), step, draft_cache, 0, exit_layer)
            logits = head(early, step, draft_cache)
        probs = logits[0, rows].float().softmax(-1)
        confidence, top = probs.max(-1)
        matches[exit_layer] = tuple((top == targets).tolist())
        confidences[exit_layer] = tuple(min(1.0, max(0.0, c)) for c in confidence.tolist())
    hidden = adapter.forward_layers(hidden, step, cache, start, adapter.num_layers)
    full = adapter.logits(hidden)[0, rows].argmax(-1)
    agreement = int((full == targets).sum())
    return PromptTrace(prompt_id, tuple(prompt), tuple(tokens), matches, confidences, agreement)


def trace_prompts(
    adapter: ModelAdapter,
    prompts: Sequence[tuple[str, Sequence[int]]],
    exit_layers: Sequence[int],
    head: Any,
    max_new_tokens: int,
    eos: list[int],
    draft_dtype: torch.dtype | None = None,
) -> list[PromptTrace]:
    """Greedy outputs of a batch of prompts, then one teacher-forced pass per prompt (the heads on narrow copies of
    layers [0, E) in `draft_dtype` where given)."""
    outputs = greedy_tokens(adapter, [ids for _, ids in prompts], max_new_tokens, eos)
    heads = {e: resolve_head(head, adapter, e) for e in exit_layers}
    drafts = None
    if draft_dtype is not None:
        from executor.draft_precision import low_precision_draft

        drafts = {e: low_precision_draft(adapter, e, h, draft_dtype) for e, h in heads.items()}
    return [
        teacher_forced(adapter, pid, ids, tokens, heads, drafts)
        for (pid, ids), tokens in zip(prompts, outputs, strict=True)
    ]


def predicted_accepted(matches: Sequence[bool], draft_len: int, max_new_tokens: int) -> list[int]:
    """Accepted drafts per round of a greedy EESD run with a fixed draft length (token 0 comes from prefill).

    A round starting at generated token p drafts min(draft_len, max_new_tokens - p - 1) tokens (as
    `decode_eesd` does) and accepts the run of consecutive matches from p.
    """
    accepted, position, count = [], 1, len(matches)
    while position < count:
        budget = min(draft_len, max_new_tokens - position - 1)
        run = 0
        while run < budget and position + run < count and matches[position + run]:
            run += 1
        accepted.append(run)
        position += run + 1
    return accepted


def check_run(
    adapter: ModelAdapter,
    trace: PromptTrace,
    exit_layer: int,
    head: Any,
    draft_len: int,
    max_new_tokens: int,
    eos: list[int],
    draft_dtype: torch.dtype | None = None,
) -> CheckRun:
    """A real EESD run against the trace's prediction (tokens and every round's accepted length)."""
    result = generate(
        adapter, list(trace.prompt), method="eesd", exit_layer=exit_layer, draft_len=draft_len,
        max_new_tokens=max_new_tokens, eos_token_id=eos, head=head, draft_dtype=draft_dtype,
    )  # fmt: skip
    tokens = tuple(result.sequences[0, len(trace.prompt) :].tolist())
    measured = tuple(result.stats.accepted)
    predicted = tuple(predicted_accepted(trace.matches[exit_layer], draft_len, max_new_tokens))
    ok = tokens == trace.tokens and _same_rounds(predicted, measured, trace, eos)
    return CheckRun(trace.prompt_id, exit_layer, predicted, measured, tokens == trace.tokens, ok)


def _same_rounds(predicted: tuple[int, ...], measured: tuple[int, ...], trace: PromptTrace, eos: list[int]) -> bool:
    """Equal, except that a last round running into EOS may accept drafts past it (the trace stops at EOS).

    The predicted last round ends at the trace's EOS either as its bonus token (the rounds cover len(tokens) - 1
    drafted positions) or as an accepted draft (len(tokens): the run stopped at the trace's end, not at a mismatch);
    either way the real round may go on accepting drafts past the EOS, which the output then drops.
    """
    if predicted == measured:
        return True
    ends_in_eos = bool(trace.tokens) and trace.tokens[-1] in eos
    return (
        ends_in_eos
        and len(predicted) == len(measured)
        and predicted[:-1] == measured[:-1]
        and measured[-1] > predicted[-1]
        and sum(a + 1 for a in predicted) in (len(trace.tokens) - 1, len(trace.tokens))
    )


def check_traces(
    adapter: ModelAdapter,
    traces: Sequence[PromptTrace],
    head: Any,
    draft_len: int,
    max_new_tokens: int,
    eos: list[int],
    strict: bool = True,
    draft_dtype: torch.dtype | None = None,
) -> CheckReport:
    """Re-run real EESD on `traces` (drafting in `draft_dtype` where given); a strict check raises `TraceCheckError`
    on any disagreement."""
    runs = tuple(
        check_run(adapter, trace, exit_layer, head, draft_len, max_new_tokens, eos, draft_dtype)
        for trace in traces
        for exit_layer in sorted(trace.matches)
    )
    report = CheckReport(runs, draft_len, strict)
    if strict and not report.ok:
        bad = [r for r in runs if not r.ok]
        details = "; ".join(
            f"{r.prompt_id} E={r.exit_layer}: tokens {'equal' if r.same_tokens else 'DIFFER'}, "
            f"predicted {list(r.predicted)}, measured {list(r.measured)}"
            for r in bad[:3]
        )
        raise TraceCheckError(
            f"{len(bad)} of {len(runs)} EESD runs disagree with the trace: {details} (a bf16 / fp16 trace: use "
            "--check report, which records the agreement instead)"
        )
    return report


def trace_records(traces: Sequence[PromptTrace]) -> list[AcceptanceRecord]:
    return [
        AcceptanceRecord(t.prompt_id, position, token, e, t.matches[e][position], t.confidences[e][position])
        for t in traces
        for position, token in enumerate(t.tokens)
        for e in sorted(t.matches)
    ]


def agreement_by_layer(traces: Sequence[PromptTrace]) -> dict[str, float]:
    """Mean match per exit layer over drafted positions (token 0 comes from prefill and is never drafted)."""
    layers = sorted({e for t in traces for e in t.matches})
    result = {}
    for e in layers:
        values = [m for t in traces for m in t.matches[e][1:]]
        result[str(e)] = round(sum(values) / len(values), 4) if values else float("nan")
    return result
