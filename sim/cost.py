"""What one forward pass costs on a plan's stages (device µs per stage, bytes over each link): the cost model that
the engine schedules and that the plan's draft/verify cost ratio comes from.

A `Pass` names its layer segments (start, end, q), an exit head after layer `exit_at`, the LM head's q and whether
the host reads the device after it. A stage pays its share of each segment's layers (plus two all-reduces per layer
when tp > 1), the embedding when it holds layer 0, an exit head or a trained head's layer when it holds their layer,
the LM head when it holds the last layer, and the host's `overhead` where `stage_time_us` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sim.formats import is_trained, subset_size
from sim.hardware import allreduce_us
from sim.latency import LatencyModel
from sim.models import ModelConfig
from sim.policy import linear_round_costs

if TYPE_CHECKING:  # the plan holds the stages these functions cost; it imports this module
    from sim.plan import SimPlan, SimStage

PassCost = tuple[int, int, tuple[float, ...], tuple[int, ...]]


@dataclass(frozen=True)
class Pass:
    """Work of one forward pass: layer segments (start, end, q), optional exit head after layer `exit_at`."""

    name: str
    phase: str
    segments: tuple[tuple[int, int, int], ...]
    exit_at: int = 0
    lm_head_q: int = 0
    head_layer_at: int = 0  # a trained head's own layer runs after this layer (its KV kept in step), no LM head
    head_layer_q: int = 1  # the tokens that layer runs over (a prefill: the prompt)
    host_sync: bool = True  # the host reads the device after this pass (see `stage_time_us`)
    host_per_stage: bool = False  # every stage's own host handles the pass (PPSD distributed), not one host read
    narrow: bool = False  # a draft step on narrow copies (`SimPlan.draft_dtype_bytes`): the stage's `draft_latency`


def draft_pass(plan: SimPlan, name: str = "draft", host_sync: bool = False) -> Pass:
    """One EESD draft step: layers [0, E) and the exit head, on the narrow copies where the plan drafts narrower."""
    exit_layer = plan.exit_layer
    return Pass(name, "draft", ((0, exit_layer, 1),), exit_at=exit_layer, host_sync=host_sync,
                narrow=plan.draft_dtype_bytes is not None)  # fmt: skip


def verify_segments(plan: SimPlan, k: int) -> tuple[tuple[int, int, int], ...]:
    """The layer segments of an EESD verify pass after k drafts: layers [0, E) for the last draft (the others' KV is
    the draft steps') and [E, L) for all k + 1 tokens; every layer over the k + 1 tokens where the drafts ran on
    narrow copies (their KV is not the model's); k = 0, one full-model step. On frozen passes the k + 1 tokens are
    the bucket's (`SimPlan.verify_slots`: the executor pads the round to a verify pass it has compiled)."""
    exit_layer, layers, q = plan.exit_layer, plan.model.num_layers, plan.verify_slots(k) + 1
    if k == 0:
        return ((0, layers, 1),)
    if plan.draft_dtype_bytes is not None:
        return ((0, layers, q),)
    return ((0, exit_layer, 1), (exit_layer, layers, q))


def verify_pass(plan: SimPlan, k: int) -> Pass:
    """An EESD round's verify pass after k drafts (`verify_segments`; its LM head over the same tokens)."""
    q = plan.verify_slots(k) + 1
    return Pass(f"verify k={k}", "verify", verify_segments(plan, k), lm_head_q=q, head_layer_at=plan.head_layer_at)


def pass_costs(plan: SimPlan, work: Pass, context_len: int, batch: int) -> PassCost:
    """(first stage, last stage, µs per visited stage, link bytes after each stage index) of one pass."""
    visited = [i for i, s in enumerate(plan.stages) if _stage_touched(s, work)]
    first, last = visited[0], visited[-1]
    durations = tuple(
        stage_time_us(plan, plan.stages[i], work, context_len, batch, read=i == last) for i in range(first, last + 1)
    )
    hidden_bytes = plan.model.hidden_size * plan.dtype_bytes * batch
    link_bytes = tuple(_q_at(work, s.layer_end) * hidden_bytes for s in plan.stages)
    return first, last, durations, link_bytes


def stage_time_us(plan: SimPlan, stage: SimStage, work: Pass, context_len: int, batch: int, read: bool = True) -> float:
    """Device time of one stage's share of a pass: layers, TP all-reduces, embedding, heads, and the host's
    `overhead`. Uncaptured (a CPU, or eager on a GPU) every pass pays it; captured in CUDA graphs only a pass after
    which the host reads the device does: the executor chains the passes in between on the device (AR makes
    `sync_every` tokens per read, PPSD runs `sync_every` ticks, a draft step feeds the next one, while the host
    queues them ahead). The read is paid once, by the pass's last stage (`read`): the host waits for it."""
    lat, host, phase = stage.latency, stage.latency, work.phase
    if work.narrow and stage.draft_latency is not None:  # the host's work stays the model's: the narrow head's
        lat = stage.draft_latency  # logits are cast back to the model's dtype and sampled as the model's are
    total = 0.0
    if stage.layer_start == 0 and work.segments[0][0] == 0:
        total += lat.time_us("embed", phase, work.segments[0][2], context_len, batch)
    for start, end, q in work.segments:
        layers = min(end, stage.layer_end) - max(start, stage.layer_start)
        if layers > 0:
            per_layer = lat.time_us("layer", phase, q, context_len, batch)
            if stage.tp > 1 and stage.tp_link is not None:
                nbytes = q * batch * plan.model.hidden_size * plan.dtype_bytes
                per_layer += 2 * allreduce_us(stage.tp_link, nbytes, stage.tp)
            total += layers * per_layer
    if work.exit_at and stage.layer_start < work.exit_at <= stage.layer_end:
        total += exit_head_us(plan, lat, context_len, batch)
    if work.head_layer_at and stage.layer_start < work.head_layer_at <= stage.layer_end:
        total += lat.time_us("layer", phase, work.head_layer_q, context_len, batch)
    if work.lm_head_q and stage.layer_end == plan.model.num_layers:
        total += lat.time_us("lm_head", phase, work.lm_head_q, context_len, batch)
    if _pays_host(stage, work, host, read):
        total += host.time_us("overhead", phase, 1, plan.host_context(context_len, phase), batch)
    return total


def _pays_host(stage: SimStage, work: Pass, latency: LatencyModel, read: bool) -> bool:
    """Whether this stage's share of the pass pays the host's `overhead` (`stage_time_us`). A method's measured host
    work (`latency.profile.host_work`: one process's, between its passes) is paid once a pass, by the stage where
    the pass ends; a profile's `overhead` rows as before, by every stage of an uncaptured pass."""
    if getattr(latency, "host", None) is not None and work.phase != "prefill":
        ends = max(end for _, end, _ in work.segments)
        return stage.layer_start < ends <= stage.layer_end and (work.host_sync or not latency.cuda_graphs)
    return (work.host_sync and (read or work.host_per_stage)) or not latency.cuda_graphs


def stage_hbm_us(plan: SimPlan, stage: SimStage, work: Pass, context_len: int, batch: int) -> float | None:
    """The HBM part of a stage's share of a pass: the bytes it reads (its layers' weights and K/V at `context_len`,
    an exit head's and the LM head's weights) over the device's effective bandwidth; None where that is unknown."""
    if stage.hbm_GBps is None:
        return None
    model, width = plan.model, plan.dtype_bytes
    if work.narrow and plan.draft_dtype_bytes is not None:  # narrow weights; the K/V stay the model's dtype
        width = plan.draft_dtype_bytes
    layer_bytes = model.layer_params * width / stage.tp
    nbytes = 0.0
    for start, end, q in work.segments:
        layers = min(end, stage.layer_end) - max(start, stage.layer_start)
        if layers > 0:
            kv_bytes = batch * (context_len + q) * model.kv_bytes_per_token(plan.dtype_bytes) / stage.tp
            nbytes += layers * (layer_bytes + kv_bytes)
    head_bytes = model.lm_head_params * width
    if work.exit_at and stage.layer_start < work.exit_at <= stage.layer_end:
        trained = is_trained(plan.exit_head)
        nbytes += head_bytes * head_vocab_fraction(plan.exit_head, model) + (layer_bytes if trained else 0.0)
    if work.head_layer_at and stage.layer_start < work.head_layer_at <= stage.layer_end:
        nbytes += layer_bytes
    if work.lm_head_q and stage.layer_end == model.num_layers:
        nbytes += head_bytes
    return nbytes / (stage.hbm_GBps * 1e3)


def exit_head_us(plan: SimPlan, lat: LatencyModel, context_len: int, batch: int) -> float:
    """One draft step's exit head: a trained head's `exit_head` (its layer, norm and the whole LM head), else the
    `lm_head`; over N of the V ids (`shared:N`, `trained:N`) the LM head's share is scaled by N/V: at draft batch
    sizes it is bound by reading its N x d weight rows."""
    fraction = head_vocab_fraction(plan.exit_head, plan.model)
    if not is_trained(plan.exit_head):
        return lat.time_us("lm_head", "draft", 1, context_len, batch) * fraction
    head = lat.time_us("exit_head", "draft", 1, context_len, batch)
    if fraction == 1.0:  # the whole vocabulary: the profile's exit_head as it is
        return head
    return head - lat.time_us("lm_head", "draft", 1, context_len, batch) * (1.0 - fraction)


def head_vocab_fraction(exit_head: str, model: ModelConfig) -> float:
    """N / V for `shared:N` and `trained:N`, 1 for `shared` and `trained`; a ValueError for anything else."""
    if exit_head in ("shared", "trained"):
        return 1.0
    count = subset_size(exit_head)
    if count is None or count > model.vocab_size:
        raise ValueError(
            f"expected shared, trained, shared:N or trained:N with 1 <= N <= {model.vocab_size} (the model's "
            f"vocabulary), got {exit_head!r}"
        )
    return count / model.vocab_size


def cost_ratio(plan: SimPlan) -> float:
    """c = one draft step / one verify pass of 2 tokens, at the prompt's context (as the engine costs a pass there:
    `SimPlan.attended`, a static cache's slots or span bucket) and the batch size."""
    prompt, batch = plan.workload.prompt_len, plan.workload.batch_size
    draft = draft_pass(plan, host_sync=True)
    verify = Pass("verify", "verify", verify_segments(plan, 1), lm_head_q=2)
    draft_at, verify_at = plan.attended(prompt, draft.phase), plan.attended(prompt, verify.phase)
    draft_us = sum(
        stage_time_us(plan, s, draft, draft_at, batch) for s in plan.stages if s.layer_start < plan.exit_layer
    )
    verify_us = sum(stage_time_us(plan, s, verify, verify_at, batch) for s in plan.stages)
    return max(draft_us / verify_us, 1e-6) if verify_us > 0 else 1.0


def round_costs(plan: SimPlan, max_draft_len: int) -> tuple[float, ...]:
    """C_0..C_max: an EESD round of k drafts (k draft steps, then the verify pass over k + 1 tokens, as the engine
    runs them) over a round of none (one full-model step, C_0 = 1; where such rounds chain, as captured passes chain
    them, its share of a block of `sync_every` steps and one host read), at the prompt's context and the batch: the
    measured round costs the Thompson-sampling policies weigh against expected tokens (`sim.policy`); each pass at
    the context the engine costs it at (`SimPlan.attended`). Unlike one
    ratio c they follow the profile where a pass's time grows with its width (a CPU's kernels switch at 4 rows)."""
    context, batch = plan.workload.prompt_len, plan.workload.batch_size
    layers, head_at = plan.model.num_layers, plan.head_layer_at

    def time_us(work: Pass, at: int) -> float:
        at = plan.attended(at, work.phase)  # a static cache's slots or span bucket, as the engine costs the pass
        return sum(stage_time_us(plan, s, work, at, batch) for s in plan.stages if _stage_touched(s, work))

    draft = draft_pass(plan)
    step = time_us(Pass("decode", "verify", ((0, layers, 1),), lm_head_q=1, head_layer_at=head_at), context)
    if plan.chain_zero_rounds and plan.sync_every > 1:  # rounds of no drafts chain, one host read per sync_every
        chained = Pass("decode chained", "verify", ((0, layers, 1),), lm_head_q=1, head_layer_at=head_at,
                       host_sync=False)  # fmt: skip
        step = (step + (plan.sync_every - 1) * time_us(chained, context)) / plan.sync_every
    if step <= 0.0:
        return linear_round_costs(1.0, max_draft_len)
    costs, drafts = [1.0], 0.0
    for k in range(1, max_draft_len + 1):
        verify = verify_pass(plan, k)
        drafts += time_us(draft, context + k - 1)  # draft step k runs at context + k - 1
        costs.append(max((drafts + time_us(verify, context + k)) / step, 1e-6))
    return tuple(costs)


def _stage_touched(stage: SimStage, work: Pass) -> bool:
    if any(min(end, stage.layer_end) > max(start, stage.layer_start) for start, end, _ in work.segments):
        return True
    return bool(work.exit_at) and stage.layer_start < work.exit_at <= stage.layer_end


def _q_at(work: Pass, layer: int) -> int:
    """Tokens whose hidden states cross the boundary before `layer`."""
    return next((q for start, end, q in work.segments if start <= layer < end), 1)
