"""The verify rule of speculative decoding, defined once: which drafts the full model accepts, and what it emits.

Vocabulary (as in Leviathan et al. 2023, Chen et al. 2023; the names the decoders use):

    B            rows of a batch.
    k            drafts per row in the round (the pass's width); row b's own are its first c_b <= k (`counts`), the
                 rest is padding that is never accepted.
    d_1 .. d_k   the drafts (`drafts`, [B, k]); d_i was proposed for the position after d_{i-1} (d_0: the row's last
                 committed token t).
    p_0 .. p_k   the full model's distributions after t, d_1, .., d_k (`target_probs`, [B, k + 1, V]): p_{i-1} is
                 its distribution for d_i's position; q_1 .. q_k the distributions the drafts were drawn from
                 (`draft_probs`, [B, k, V], rejection sampling only).
    x_0 .. x_k   the full model's tokens after t, d_1, .., d_k (`full`, [B, k + 1]): greedy argmax of p_i, or exact
                 sampling's keyed Gumbel-max, a function of the logits, the seed and the position.
    a            accepted: the length of the longest run of accepted drafts from d_1 (`accepted`, [B]).
    token        the token after the accepted run (`token`, [B]): the correction (a < c_b) or the bonus (a = c_b).
                 Each row emits d_1 .. d_a, token: a + 1 tokens per round.

The rule (greedy and exact sampling): d_i is accepted iff i <= c_b, d_i = x_{i-1}, and every earlier draft was;
then token = x_a. Rejection sampling: d_i is accepted iff u_i q_i(d_i) < p_{i-1}(d_i) and every earlier draft was;
then token is drawn from norm(max(0, p_a - q_{a+1})), or from p_a when all c_b were accepted. Both run on the device
for a whole batch, with no host read, so a captured verify pass holds them.

PPSD applies the same rule at depth 1, once per tick (`tick_verdict`): the token leaving the last stage at position
p yields x_0 for p + 1, and the draft in flight behind it (c = 1) or none (c = 0) is judged against it.
"""

from __future__ import annotations

from enum import IntEnum

import torch

from executor.sampling import ACCEPT_SALT, SAMPLE_SALT, TokenSelector, uniform_noise


def own_drafts(counts: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [B, k]: which of the k draft slots are row b's own (the first counts[b])."""
    # counts: [B]
    return torch.arange(k, device=counts.device) < counts.unsqueeze(1)


def accepted_run(passed: torch.Tensor) -> torch.Tensor:
    """a [B]: how many leading drafts passed their test (a draft counts only if every earlier one passed too)."""
    # passed: [B, k] bool
    return passed.to(torch.int64).cumprod(-1).sum(-1)


def accepted_prefix(drafts: torch.Tensor, full: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """a [B]: the longest run d_1 .. d_a of own drafts each equal to the full model's token at its position."""
    # drafts: [B, k]; full: [B, k] (x_0 .. x_{k-1}); counts: [B]
    return accepted_run((drafts == full) & own_drafts(counts, drafts.shape[1]))


def match_verdicts(drafts: torch.Tensor, full: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy / exact sampling, every row at once: (a [B], token [B] = x_a)."""
    # drafts: [B, k]; full: [B, k + 1] (x_0 .. x_k); counts: [B]
    accepted = accepted_prefix(drafts, full[:, : drafts.shape[1]], counts)
    return accepted, full.gather(1, accepted.unsqueeze(1)).squeeze(1)


def rejection_verdicts(
    selector: TokenSelector,
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    counts: torch.Tensor,
    targets: torch.Tensor,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling, every row at once: (a [B], token [B]).

    The accept test of d_i draws u_i keyed by d_i's position (`ACCEPT_SALT`), the token after the run is drawn
    keyed by its own position (`SAMPLE_SALT`): each kept decision sees fresh noise (executor/sampling.py).
    `forced` (benchmark only) replaces a; the token is then drawn as for a real run that long.
    """
    # drafts: [B, k]; draft_probs: [B, k, V] (q_1 .. q_k); target_probs: [B, k + 1, V] (p_0 .. p_k)
    # counts: [B]; targets: [B, k + 1] (the positions p_0 .. p_k predict); forced: [B] or None
    k = drafts.shape[1]
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    if forced is None:
        p = target_probs[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # p_{i-1}(d_i): [B, k]
        q = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # q_i(d_i): [B, k]
        u = uniform_noise(selector.seed, targets[:, :k], ACCEPT_SALT)
        accepted = accepted_run((u * q < p) & own_drafts(counts, k))  # u < p/q, no division
    else:
        accepted = forced
    p_a = target_probs[rows, accepted]  # [B, V]
    padding = target_probs.new_zeros(target_probs.shape[0], 1, target_probs.shape[-1])
    q_a = torch.cat([draft_probs, padding], dim=1)[rows, accepted]  # q_{a+1}: [B, V]
    q_a = q_a * (accepted < counts).unsqueeze(-1)  # all own drafts accepted: the bonus token, from p_a itself
    residual = (p_a - q_a).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    dist = torch.where(total > 0, residual / total.clamp_min(1e-300), p_a)
    token = selector.sample(dist.unsqueeze(1), targets[rows, accepted].unsqueeze(1), SAMPLE_SALT)[:, 0]
    return accepted, token


class TickVerdict(IntEnum):
    """PPSD's verdict on one tick (an int in the device's tick log and in the distributed backend's messages)."""

    NONE = 0  # nothing left the pipe
    CONFIRM = 1  # the draft in flight equals x_0: it stays in the pipe
    FLUSH = 2  # it does not: the younger tokens are flushed, x_0 (the correction) enters stage 1
    EMIT = 3  # no draft was in flight (max_new_tokens reached): x_0 is emitted only
    START = 4  # not a verdict of the rule: the prefill's token, announced to every stage


def tick_verdict(held: torch.Tensor, draft: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """PPSD's per-tick verdict (`TickVerdict` values, int64): the rule at depth 1, d_1 = the draft in flight behind
    the token that left the last stage (c = 0 if none), x_0 = the full model's token after that one."""
    # held: [n] bool (a token left the last stage); draft: [n] (d_1, -1: none in flight); predicted: [n] (x_0)
    in_flight = draft >= 0
    confirmed = accepted_prefix(draft.unsqueeze(1), predicted.unsqueeze(1), in_flight.to(torch.int64)) > 0
    verdict = torch.where(confirmed, int(TickVerdict.CONFIRM), int(TickVerdict.FLUSH))
    verdict = torch.where(in_flight, verdict, int(TickVerdict.EMIT))
    return torch.where(held, verdict, int(TickVerdict.NONE))


def judge_tick(held: bool, draft: int, predicted: int) -> TickVerdict:
    """`tick_verdict` for host values (the distributed backend's last stage): one tick, on tiny CPU tensors."""
    verdict = tick_verdict(torch.tensor([held]), torch.tensor([draft]), torch.tensor([predicted]))
    return TickVerdict(int(verdict[0]))
