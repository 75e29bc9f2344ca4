"""The decoders: vanilla autoregressive (AR) and early-exit self-speculative decoding (EESD), on batches.

EESD (Liu et al. 2024, arXiv 2406.03853) with LayerSkip's KV reuse (arXiv 2404.16710). Notation: L layers,
exit layer E, a row's last committed token t at position p, drafts d_1..d_k.

    1. Draft: run t, d_1, .., d_{k-1} through layers [0, E) at positions p .. p+k-1; the exit head at layer E
       proposes d_1 .. d_k. The layer-E hidden states are kept (LayerSkip's exit-query cache).
    2. Verify: run d_k through layers [0, E) at p+k, then all k+1 saved layer-E states through layers [E, L)
       in one pass. Layers [0, E) are never recomputed: their KV was written while drafting.
    3. Accept the longest prefix the full model agrees with (greedy / exact sampling: d_i equals the full model's
       token at p+i; rejection sampling: min(1, p/q) tests), then emit the full model's own next token (the
       correction, or the bonus token when all k were accepted): accepted + 1 tokens per round. The rule is
       `executor.verify`'s; the verify pass takes it on the device.
    4. Roll every layer back to p + accepted + 1: the rejected positions are overwritten next round.

Batches: every row keeps its own positions (cache slot = the row's absolute position, so no padding enters the
cache), its own draft policy and its own accepted lengths. A pass has one q for all rows: a row whose policy stopped
drafting early keeps computing (its surplus drafts are never accepted), and a finished row is parked: it recomputes
its last slot and is rolled back after each pass, so shapes stay static.

The passes themselves (executor/passes.py) are static-shape functions of device buffers, captured in CUDA graphs on
a GPU; this module is their host side: it refills their inputs, keeps the KV cache's books, runs the policies and
reads the device once per round (`read_back`, counted in `GenerationStats.host_reads`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from executor.adapter import ModelAdapter, Step
from executor.kv_cache import KVCache
from executor.passes import Passes, prefill_width
from executor.sampling import SamplingConfig, TokenSelector
from executor.verify import rejection_verdicts
from sim.contract import AR_HISTORY
from sim.policy import DraftPolicy, round_budget


@dataclass
class GenerationStats:
    """What one generation did. `drafted[i]` / `accepted[i]` belong to one row's round i (EESD); AR drafts none.
    `rounds`: AR's steps (the prefill's included), EESD's draft-verify rounds (those that drafted nothing included);
    PPSD has none, its unit is the tick (`executor.ppsd.PPSDStats`)."""

    method: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    prefill_time_s: float = 0.0
    wall_time_s: float = 0.0
    capture: str = "none"  # how the passes ran: none, graph, compile or compile-layers (executor.passes)
    host_reads: int = 0  # device -> host reads in the decode loop (each one a synchronisation on a GPU)

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens (nan if nothing was drafted)."""
        drafted = sum(self.drafted)
        return sum(self.accepted) / drafted if drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """New tokens per verify round (per row), the prefill's token excluded."""
        return sum(a + 1 for a in self.accepted) / len(self.accepted) if self.accepted else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else float("nan")

    def accepted_histogram(self) -> dict[int, int]:
        """Rounds per accepted length, over the rounds that drafted (a round that drafted nothing accepted nothing
        either, and is counted by `undrafted_rounds` instead of under 0)."""
        histogram: dict[int, int] = {}
        for drafted, accepted in zip(self.drafted, self.accepted, strict=True):
            if drafted:
                histogram[accepted] = histogram.get(accepted, 0) + 1
        return dict(sorted(histogram.items()))

    @property
    def undrafted_rounds(self) -> int:
        """Rounds (over every row) that drafted nothing: the policy chose no draft, or the row had no room for one."""
        return sum(1 for drafted in self.drafted if not drafted)

    def totals(self, work: str) -> str:
        """The first summary line: tokens, `work` (how many rounds, or ticks), time, capture and host reads."""
        return (
            f"method {self.method}: {self.new_tokens} new token{'s' if self.new_tokens != 1 else ''} in {work}, "
            f"{self.wall_time_s:.3f} s ({self.tokens_per_s:.1f} tok/s, prefill {self.prefill_time_s:.3f} s); "
            f"passes captured: {self.capture}, {self.host_reads} host reads"
        )

    def summary(self) -> str:
        lines = [self.totals(f"{self.rounds} rounds")]
        if self.drafted:
            lines.append(
                f"drafted {sum(self.drafted)}, accepted {sum(self.accepted)} "
                f"(rate {self.acceptance_rate:.3f}), {self.tokens_per_round:.2f} tokens/round, "
                f"accepted-length histogram {self.accepted_histogram()}"
                + (f", {self.undrafted_rounds} rounds drafted nothing" if self.undrafted_rounds else "")
            )
        return "\n".join(lines)


class TokenSink:
    """Collects one row's emitted tokens and says when to stop: after an EOS token, `max_new_tokens` tokens, or a
    token after which `stop` (called with the tokens emitted so far, that token last) returns True. As in HF, the
    token that ends the row is kept."""

    def __init__(
        self,
        max_new_tokens: int,
        eos_token_ids: Iterable[int],
        on_tokens: Callable[[list[int]], None] | None = None,
        stop: Callable[[list[int]], bool] | None = None,
    ) -> None:
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokens: list[int] = []
        self.done = max_new_tokens == 0
        self._on_tokens = on_tokens
        self._stop = stop

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    @property
    def has_stop_rule(self) -> bool:
        """Whether a rule of its own (`stop`) may end the row besides its EOS and `max_new_tokens`."""
        return self._stop is not None

    def emit(self, tokens: list[int]) -> None:
        taken: list[int] = []
        for token in tokens:
            if len(self.tokens) + len(taken) >= self.max_new_tokens:  # (a stop rule may lower max_new_tokens)
                break
            taken.append(token)
            if token in self.eos_token_ids or (self._stop is not None and self._stop(self.tokens + taken)):
                self.done = True
                break
        self.tokens.extend(taken)
        self.done = self.done or self.remaining <= 0
        if self._on_tokens is not None and taken:
            self._on_tokens(taken)


class BatchStop:
    """Stopping criteria over a batch, applied as HF applies them. `checks[row](emitted)` says whether the row's
    criteria fire after its last emitted token. With EOS ids (`pads`), a row whose criteria fire is finished there
    (HF pads it from then on). Without, HF keeps decoding every row until all of them have fired (or reached the
    length limit) and pads none: each row then runs to the length at which the last row fired."""

    def __init__(self, checks: list[Callable[[list[int]], bool]], pads: bool) -> None:
        self.checks = checks
        self.pads = pads
        self.fired: list[int | None] = [None] * len(checks)  # each row's length when its criteria first fired
        self.sinks: list[TokenSink] = []

    def rule(self, row: int) -> Callable[[list[int]], bool]:
        """The stop rule for row `row`'s sink."""

        def stop(emitted: list[int]) -> bool:
            if self.fired[row] is not None or not self.checks[row](emitted):
                return False
            self.fired[row] = len(emitted)
            if self.pads:
                return True
            if all(length is not None for length in self.fired):
                self._end(max(self.fired))  # type: ignore[type-var]
            return False

        return stop

    def _end(self, length: int) -> None:
        """Every row ends at `length` new tokens: rows past it drop the rest, rows short of it decode on."""
        for sink in self.sinks:
            sink.max_new_tokens = min(sink.max_new_tokens, length)
            del sink.tokens[length:]
            sink.done = sink.done or sink.remaining <= 0


@dataclass
class Rows:
    """Per-row decoding state: prompt, sink, the last committed token and the position it goes to."""

    prompts: list[list[int]]
    sinks: list[TokenSink]
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    @property
    def active(self) -> list[int]:
        return [row for row, sink in enumerate(self.sinks) if not sink.done]

    def commit(self, row: int, tokens: list[int]) -> None:
        """Emit a row's new tokens; a finished row stays parked at its position."""
        if self.sinks[row].done:
            return
        self.sinks[row].emit(tokens)
        self.tokens[row] = tokens[-1]
        self.positions[row] += len(tokens)


def _column(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device).unsqueeze(1)


def prefill_rows(
    adapter: ModelAdapter, cache: KVCache, rows: Rows, selector: TokenSelector, exit_layer=None, head=None
) -> None:
    """Run every prompt through all layers (right-padded in row space to `prefill_width`, pads rolled back); commit
    the first token."""
    lengths = [len(p) for p in rows.prompts]
    width = prefill_width(max(lengths), cache.max_len, adapter.device)  # on a GPU: a bucket width (pads rolled back)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in rows.prompts], device=adapter.device)
    positions = torch.arange(width, device=adapter.device).expand(len(lengths), width)
    step = Step(positions=positions, starts=(0,) * len(lengths))
    hidden = adapter.embed(ids)
    if exit_layer is None:
        hidden = adapter.forward_layers(hidden, step, cache, 0, adapter.num_layers)
    else:
        hidden = adapter.forward_layers(hidden, step, cache, 0, exit_layer)
        head.prefill(hidden, step, cache)
        hidden = adapter.forward_layers(hidden, step, cache, exit_layer, adapter.num_layers)
    last = hidden[torch.arange(len(lengths)), torch.tensor(lengths) - 1].unsqueeze(1)  # [B, 1, d]
    chosen = selector.select(adapter.logits(last), _column(lengths, adapter.device))  # [B, 1]
    selector.note(chosen)
    first = chosen[:, 0].tolist()
    cache.rollback(lengths)
    rows.tokens = list(first)
    rows.positions = list(lengths)
    for row, sink in enumerate(rows.sinks):
        sink.emit([first[row]])


def prefill(adapter: ModelAdapter, cache: KVCache, prompt: list[int], exit_layer=None, head=None) -> int:
    """Batch-1 greedy prefill: the full model's first new token after `prompt` (KV of all layers written)."""
    rows = Rows(prompts=[prompt], sinks=[TokenSink(1, ())])
    selector = TokenSelector(SamplingConfig(), [len(prompt)], 0, [], adapter.device)
    prefill_rows(adapter, cache, rows, selector, exit_layer, head)
    return rows.tokens[0]


def read_back(tensor: torch.Tensor, stats: GenerationStats) -> list:
    """Device -> host: the decoders' only synchronising reads, counted in `stats.host_reads`."""
    stats.host_reads += 1
    return tensor.tolist()


@torch.inference_mode()
def decode_ar(adapter: ModelAdapter, rows: Rows, passes: Passes, stats: GenerationStats, sync_every: int = 1) -> None:
    """The reference: one token per full forward pass. The AR step chains on the device (its token is the next
    step's input, see `Passes.ar`), so the host launches `sync_every` steps and reads their tokens in one copy: one
    host read per `sync_every` tokens, and on a GPU the host queues the next steps while the device runs. Rows run
    in lockstep; a row that ends (EOS) inside a block runs on to the block's end (at most `sync_every` - 1 steps, their
    tokens dropped), and no step goes past the longest row's `max_new_tokens`. The i-th step of a block writes at
    its row's start + i (every row, an ended one too), so the host knows each launch's span bucket."""
    if not 1 <= sync_every <= AR_HISTORY:
        raise ValueError(f"sync_every must be in 1..{AR_HISTORY}, got {sync_every}")
    cache, layers = passes.cache, range(adapter.num_layers)
    begin = time.perf_counter()
    prefill_rows(adapter, cache, rows, passes.selector)
    stats.prefill_time_s = time.perf_counter() - begin
    stats.rounds = 1
    at = list(rows.positions)  # each row's next position on the device (an ended row's runs on, unread)
    passes.load(rows.tokens, at, 1)
    while rows.active:
        steps = min(sync_every, max(rows.sinks[row].remaining for row in rows.active))
        cache.claim(layers, at, steps)
        for step in range(steps):
            passes.ar(max(at) + step)
        at = [position + steps for position in at]
        block = read_back(passes.history[:, :steps], stats)
        passes.ar_cursor.zero_()
        for row, tokens in enumerate(block):
            rows.commit(row, tokens)
        stats.rounds += steps
    stats.wall_time_s = time.perf_counter() - begin


def draw_budgets(rows: Rows, policies: list[DraftPolicy], ahead: int) -> list[int]:
    """Each row's draft budget for the round `ahead` one-token rounds from now: its policy's k, capped so that the
    round's drafts and the full model's token fit in what the row has left; 0 for a row that is done."""
    return [round_budget(policy, sink.remaining, ahead) for policy, sink in zip(policies, rows.sinks, strict=True)]


def chains_zero_rounds(passes: Passes) -> bool:
    """Whether a round that drafts nothing may run as the AR step: the same full-model token at the same position
    (greedy, or exact sampling's keyed draw); a head with a layer of its own gets its KV there as the verify pass
    writes it (`Passes.ar_head`). Rejection sampling and repetition penalties keep their own verify pass."""
    return not passes.rejection and not passes.penalized


def zero_draft_rounds(
    passes: Passes,
    rows: Rows,
    policies: list[DraftPolicy],
    stats: GenerationStats,
    limit: int,
    forced_accept: Callable[[int], int] | None = None,
) -> list[int] | None:
    """Rounds in which no row drafts, run as chained AR steps with one host read: `Passes.ar`, or `Passes.ar_head`
    where the exit head has a layer of its own (its KV kept in step, as a verify pass keeps it). A round that drafts
    nothing leaves every policy as it was (its update sees 0 drafts), so the next rounds' budgets can be drawn
    first, in the same order as round by round: while they are all 0 (and fewer than `limit`, and a row has tokens
    left, and the cache has room after every row: a row that ended ahead of the others still runs every step, at
    its parked position), the block grows. Returns the budgets drawn for the round after the block (None if none
    were drawn). A row that ends inside the block runs on to its end, its tokens dropped (as in `decode_ar`).
    Forced acceptance is asked once per row and round, as in a drafting round (its answer for 0 drafts can only be
    0), so a forced run keeps its pattern in step and runs the same passes as the real run it repeats."""
    longest = max(rows.sinks[row].remaining for row in rows.active)
    room = passes.cache.max_len - max(rows.positions)  # every row runs every step: one that ended ahead too
    steps, drawn = 1, None
    while steps < min(limit, longest, room):
        budgets = draw_budgets(rows, policies, steps)
        if any(budgets):
            drawn = budgets
            break
        steps += 1
    passes.start_round(rows.tokens, rows.positions)
    passes.cache.claim(passes.layers_ar(), rows.positions, steps)
    ar_step = passes.ar_head if passes.layers_head() else passes.ar
    for step in range(steps):
        ar_step(max(rows.positions) + step)
    block = read_back(passes.history[:, :steps], stats)
    passes.ar_cursor.zero_()
    passes.held_inputs([tokens[-1] for tokens in block], [p + steps for p in rows.positions])  # every row ran on
    for step in range(steps):
        for row in rows.active:
            if forced_accept is not None:
                forced_accept(0)
            policies[row].update(0, 0)
            rows.commit(row, [block[row][step]])
            stats.drafted.append(0)
            stats.accepted.append(0)
        stats.rounds += 1
    passes.cache.rollback(rows.positions)
    return drawn


def draft_steps(passes: Passes, rows: Rows, policies: list[DraftPolicy], budgets: list[int], stats) -> list[int]:
    """Step 1: draft steps (layers [0, E) + exit head) until every row's budget is spent or its policy stops.
    Returns each row's drafted count; all rows run the same number of steps (static shapes), a row's surplus drafts
    are never accepted. A draft step chains on the device (`Passes.draft`): one launch each, no host read except
    for a policy that stops on the draft's confidence."""
    counts = [0] * len(budgets)
    confidence = any(p.needs_confidence for p in policies)
    passes.start_round(rows.tokens, rows.positions)
    step = 0
    while any(c < b for c, b in zip(counts, budgets, strict=True)):
        passes.cache.claim(passes.layers_early(), [p + step for p in rows.positions], 1)
        passes.draft(max(rows.positions) + step)  # a parked row's too: it drafts on from its parked position
        step += 1
        top = read_back(passes.confidence, stats) if confidence else None
        for row, policy in enumerate(policies):
            if counts[row] < budgets[row]:
                counts[row] += 1
                if not policy.keep_drafting(counts[row], top[row] if top else 1.0):
                    budgets[row] = counts[row]
    return counts


def longest_draft(policies: Sequence[DraftPolicy]) -> int:
    """The most drafts any of these policies makes in a round."""
    return max(policy.max_draft_len for policy in policies)


def verify_pass(passes: Passes, rows: Rows, k: int, counts: list[int], longest: int | None = None) -> int:
    """Step 2: layers [0, E) for d_k only, then layers [E, L) over the k + 1 saved layer-E states in one pass, which
    also takes step 3's verdict on the device, given each row's own draft count. Returns the pass's draft slots:
    k, or with verify buckets (frozen passes) the bucket holding k for policies drafting at most `longest`
    (`Passes.verify_slots`; the slots after k are padding)."""
    adapter, cache = passes.adapter, passes.cache
    slots = passes.verify_slots(k, longest, passes.cache.max_len - 1 - max(rows.positions))
    passes.set_counts(counts)  # the pass takes its positions from where the draft steps left them
    cache.claim(passes.layers_early(), [p + k for p in rows.positions], 1)
    cache.claim(range(passes.exit_layer, adapter.num_layers), rows.positions, slots + 1)
    passes.verify(slots, max(rows.positions) + slots)
    return slots


@dataclass
class RoundVerdicts:
    """One round's step 3, read back: per row its drafts d_1 .. d_c, the verdict the verify pass took on the device
    (`executor.verify`: accepted a, then the token after them) and, for greedy / exact sampling, the full model's
    tokens x_0 .. x_k (a forced verdict's token)."""

    drafts: list[list[int]]
    verdicts: list[list[int]]
    full: list[list[int]] | None = None
    passes: Passes | None = None  # rejection sampling: for a forced verdict's token
    k: int = 0
    slots: int = 0  # the verify pass's draft slots (k, or its bucket)

    @classmethod
    def read(
        cls,
        passes: Passes,
        k: int,
        counts: list[int],
        stats: GenerationStats,
        starts: Sequence[int],
        slots: int | None = None,
    ) -> RoundVerdicts:
        """The round's one synchronising read: drafts, verdicts (and the full model's tokens) in one copy of the
        verify pass's `readout`, from a verify pass of `slots` draft slots (default k) of a round that began at
        `starts`. Notes for the next round where the pass put each row's next input (`Passes.start_round`)."""
        slots = k if slots is None else slots
        drafted, verdict, full = passes.readout_columns(k)
        both = read_back(passes.readout, stats)
        drafts = [b[drafted][:c] for b, c in zip(both, counts, strict=True)]
        verdicts = [b[verdict] for b in both]
        following = [start + accepted + 1 for start, (accepted, _) in zip(starts, verdicts, strict=True)]
        passes.held_inputs([token for _, token in verdicts], following, "next")
        if passes.rejection:
            return cls(drafts, verdicts, passes=passes, k=k, slots=slots)
        return cls(drafts, verdicts, full=[b[full] for b in both])

    def verdict(self, row: int) -> tuple[int, int]:
        """Step 3 for one row: (accepted drafts, the full model's token after them)."""
        accepted, token = self.verdicts[row]
        return accepted, token

    def forced(self, row: int, accepted: int) -> tuple[int, int]:
        """Step 3 replaced (benchmark only, NOT lossless): `accepted` drafts kept whatever the full model said, then
        the full model's own token at that position, as a real verdict with that accepted length would emit."""
        if self.full is not None:
            return accepted, self.full[row][accepted]
        p, k, q = self.passes, self.k, max(self.slots, self.k) + 1
        forced = torch.full((p.cache.batch,), accepted, dtype=torch.long, device=p.adapter.device)
        targets = p.positions[q][:, : k + 1] + 1
        _, tokens = rejection_verdicts(
            p.selector, p.drafts[:, :k], p.draft_probs[:, :k], p.probs[q][:, : k + 1], p.counts, targets, forced
        )
        return accepted, int(tokens[row])


@torch.inference_mode()
def decode_eesd(
    adapter: ModelAdapter,
    rows: Rows,
    passes: Passes,
    stats: GenerationStats,
    *,
    policies: list[DraftPolicy],
    forced_accept: Callable[[int], int] | None = None,
    sync_every: int = 1,
) -> None:
    """Draft with layers [0, exit_layer) + exit head, verify with layers [exit_layer, L) in one pass.

    A round in which no row drafts (every policy's k is 0, as beta-ts picks at a low acceptance) is an AR step (one
    that also runs a trained head's layer, keeping its KV); up to `sync_every` such rounds in a row run as chained AR
    steps with one host read (`zero_draft_rounds`; not under rejection sampling or a repetition penalty, whose verify
    pass does more: `chains_zero_rounds`).

    `forced_accept` (benchmark only, NOT lossless, never the default) replaces step 3's decision: it is called once
    per active row and round, in row order, with the row's drafted count and returns how many drafts to accept
    (capped to [0, drafted]). Drafting and the verify pass are unchanged, so the work per round is exactly a real
    round's at that accepted length, but the emitted drafts need not be the full model's tokens.
    """
    cache, selector = passes.cache, passes.selector
    begin = time.perf_counter()
    prefill_rows(adapter, cache, rows, selector, passes.exit_layer, passes.head)
    stats.prefill_time_s = time.perf_counter() - begin
    chain, longest = chains_zero_rounds(passes), longest_draft(policies)
    drawn: list[int] | None = None  # budgets already drawn for the next round (while looking past AR rounds)
    while rows.active:
        active = set(rows.active)
        budgets = [b if row in active else 0 for row, b in enumerate(drawn or draw_budgets(rows, policies, 0))]
        if chain and not any(budgets):
            drawn = zero_draft_rounds(passes, rows, policies, stats, sync_every, forced_accept)
            continue
        drawn = None
        counts = draft_steps(passes, rows, policies, budgets, stats)
        k = max(counts)
        slots = verify_pass(passes, rows, k, counts, longest)
        verdicts = RoundVerdicts.read(passes, k, counts, stats, rows.positions, slots)
        for row in sorted(active):
            if forced_accept is None:
                accepted, token = verdicts.verdict(row)
            else:
                accepted, token = verdicts.forced(row, min(max(forced_accept(counts[row]), 0), counts[row]))
            policies[row].update(counts[row], accepted)
            rows.commit(row, verdicts.drafts[row][:accepted] + [token])
            stats.drafted.append(counts[row])
            stats.accepted.append(accepted)
        cache.rollback(rows.positions)  # step 4; also parks finished rows
        stats.rounds += 1
    stats.wall_time_s = time.perf_counter() - begin
