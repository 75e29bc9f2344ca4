"""Public API: `generate(model, input_ids, method=...)` and the drop-in `EarlyExitGenerator`.

Both check their arguments up front and raise `ValueError` saying what was wrong and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import numbers
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from executor.adapter import ModelAdapter
from executor.decoding import BatchStop, GenerationStats, Rows, TokenSink, decode_ar, decode_eesd
from executor.heads import draft_cost_ratio, head_key, resolve_head
from executor.passes import (
    Passes,
    cached_passes,
    check_sync_every,
    on_device,
    prefix_capture,
    resolve_capture,
    resolve_sync_every,
    verify_bucketed,
)
from executor.ppsd import DEFAULT_STALL_TIMEOUT_S, check_backend, decode_ppsd_rows, plan_stages
from executor.sampling import MAX_SEED, SAMPLING_MODES, SamplingConfig, TokenSelector, row_seed, token_ids
from sim.contract import SYNC_CAPTURED, cache_capacity, default_exit_layer, policy_seed
from sim.contract import draft_capacity as contract_draft_capacity
from sim.policy import DraftPolicy, make_policy

METHODS = ("ar", "eesd", "ppsd")


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [B, prompt width + new tokens], exactly as HF `generate` lays it out
    stats: GenerationStats
    sampling: SamplingConfig | None = None  # how the tokens were chosen (processors included), for `rescore`
    exit_layer: int | None = None  # where EESD's / PPSD's drafts exit (None: AR)


AR_SYNC_CAPTURED = SYNC_CAPTURED  # default `sync_every` of captured AR passes


def _adapter(model: nn.Module | ModelAdapter) -> ModelAdapter:
    return model if isinstance(model, ModelAdapter) else ModelAdapter(model)


def _as_2d(input_ids: torch.Tensor | list) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.numel() == 0:
        raise ValueError("empty prompt: input_ids must hold at least one token")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [seq] or [batch, seq], got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {ids.dtype}")
    return ids


def split_prompts(ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """The rows' real tokens; padding must be on the left (as HF expects for decoder-only generation)."""
    if ids.shape[1] == 0:
        raise ValueError("empty prompt: input_ids must hold at least one token")
    if attention_mask is None:
        return ids.tolist()
    mask = torch.as_tensor(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    if mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"attention_mask must hold 0 and 1 (integers, booleans or floats), got {mask.dtype} "
            f"{mask.unique()[:4].tolist()}"
        )
    mask = mask.to(torch.long)
    prompts = []
    for row, (tokens, keep) in enumerate(zip(ids.tolist(), mask.tolist(), strict=True)):
        count = sum(keep)
        if count == 0:
            raise ValueError(f"empty prompt: row {row} of attention_mask is all zeros")
        if keep != [0] * (len(keep) - count) + [1] * count:
            shown = keep if len(keep) <= 16 else [*keep[:8], "...", *keep[-8:]]
            raise ValueError(
                f"attention_mask row {row} is not left padding (zeros, then ones): {shown}; pad on the left, e.g. "
                "tokenizer(texts, padding=True, padding_side='left')"
            )
        prompts.append(tokens[len(keep) - count :])
    return prompts


def _eos_ids(eos_token_id: int | Iterable[int] | torch.Tensor | None) -> list[int]:
    if eos_token_id is None:
        return []
    if torch.is_tensor(eos_token_id):
        return eos_token_id.flatten().tolist()
    if isinstance(eos_token_id, Iterable) and not isinstance(eos_token_id, (str, bytes)):
        return list(eos_token_id)
    return [eos_token_id]


def check_eos(adapter: ModelAdapter, eos: list) -> list[int]:
    """EOS ids as ints, each a token id of the model's vocabulary (an id beyond it could never be emitted)."""
    vocab = adapter.lm_head.weight.shape[0]
    bad = [t for t in eos if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"eos_token_id must be token ids in [0, {vocab - 1}] (the model's vocabulary), got {bad[0]!r}")
    return [int(t) for t in eos]


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


# argument, its default, the methods that read it (PPSD drafts one token a tick: no draft length or policy)
METHOD_ARGUMENTS = (
    ("exit_layer", None, ("eesd", "ppsd")),
    ("head", None, ("eesd", "ppsd")),
    ("policy", None, ("eesd",)),
    ("draft_len", 4, ("eesd",)),
    ("stages", 2, ("ppsd",)),
    ("stage_boundaries", None, ("ppsd",)),
    ("backend", "sequential", ("ppsd",)),
)


def method_arguments(method: str, **given: Any) -> dict[str, Any]:
    """`given` (names of `METHOD_ARGUMENTS`) less what `method` does not read. A value other than the default that it
    drops is named in a UserWarning (as HF warns of a sampling setting in a greedy call): a loop over methods with one
    set of arguments runs, and the setting a method ignores is not ignored silently. `head="shared"` is the default."""
    check_method(method)
    ignored, used = [], {}
    for name, default, methods in METHOD_ARGUMENTS:
        value = given.get(name, default)
        if method in methods:
            used[name] = value
            continue
        if not (value is default or value == default or (name == "head" and value == "shared")):
            shown = repr(value) if isinstance(value, (int, str, list, tuple)) else f"a {type(value).__name__}"
            ignored.append(f"{name}={shown} (for {' or '.join(methods)})")
    if ignored:
        warnings.warn(f"method {method!r} ignores {', '.join(ignored)}", UserWarning, stacklevel=3)
    return used


def check_exit_layer(adapter: ModelAdapter, exit_layer: Any) -> None:
    """An exit layer inside the model: an integer in [1, L - 1] (not a bool)."""
    layers = adapter.num_layers
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer < layers:
        raise ValueError(
            f"exit_layer must be an integer in [1, {layers - 1}] for a {layers}-layer model, got {exit_layer!r}"
        )


def check_arguments(
    adapter: ModelAdapter, prompts: list[list[int]], method: str, exit_layer: int | None, max_new_tokens: int
) -> None:
    check_method(method)
    if method == "eesd" or (method == "ar" and exit_layer is not None):  # (AR ignores one inside the model)
        check_exit_layer(adapter, exit_layer)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    vocab = adapter.embed_tokens.num_embeddings
    if min(min(p) for p in prompts) < 0 or max(max(p) for p in prompts) >= vocab:
        raise ValueError(f"input_ids must lie in [0, {vocab - 1}] (the model's vocabulary)")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > adapter.max_positions:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} exceeds "
            f"the model's context of {adapter.max_positions} positions{adapter.context_note}"
        )


def check_draft_len(adapter: ModelAdapter, draft_len: int) -> None:
    """A draft is at most the model's context long (a round's drafts and token must fit in it)."""
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or not 1 <= draft_len <= adapter.max_positions:
        raise ValueError(
            f"draft_len must be an integer in [1, {adapter.max_positions}] (the model's context), got {draft_len!r}"
        )


def check_policies(adapter: ModelAdapter, policies: list[DraftPolicy]) -> None:
    """A policy's longest draft (which it may plan over every round) is bounded by the model's context too."""
    for policy in policies:
        longest = policy.max_draft_len
        if isinstance(longest, bool) or not isinstance(longest, int) or not 1 <= longest <= adapter.max_positions:
            raise ValueError(
                f"policy {type(policy).__name__}: its max draft length must be an integer in "
                f"[1, {adapter.max_positions}] (the model's context), got {longest!r}"
            )


def draft_capacity(policies: list[DraftPolicy], max_new_tokens: int) -> int:
    """The longest draft a round can make, which sizes the static buffers: the policies' longest, capped by what a
    row has left to generate (a round's drafts and the full model's token fit in it, `sim.policy.round_budget`)."""
    return contract_draft_capacity(max(p.max_draft_len for p in policies), max_new_tokens)


def _policies(spec: str | DraftPolicy, rows: int, seed: int, cost_ratio: float) -> list[DraftPolicy]:
    """One policy per row (its own posterior / schedule), seeded as `sim.contract.policy_seed` says so that the
    simulator's trace replay draws the same; a policy object is copied per row."""
    if not isinstance(spec, str):
        return [spec] if rows == 1 else [copy.deepcopy(spec) for _ in range(rows)]
    return [make_policy(spec, rng=random.Random(policy_seed(seed, row)), cost_ratio=cost_ratio) for row in range(rows)]


def _streamer_callback(streamer: Any, rows: int, first: torch.Tensor):
    if streamer is None:
        return None
    if rows != 1:
        raise ValueError("streamer needs batch size 1 (as in HF generate)")
    streamer.put(first.cpu())
    return lambda tokens: streamer.put(torch.tensor(tokens))


def _batch_stop(
    criteria: Sequence[Callable[..., Any]] | None, ids: torch.Tensor, eos: list[int], method: str, backend: str
) -> BatchStop | None:
    """The criteria as HF applies them to this batch (None without criteria): each row as HF holds it."""
    if not criteria:
        return None
    criteria = list(criteria)
    for criterion in criteria:
        if not callable(criterion):
            raise ValueError(f"stopping_criteria must hold callables (HF StoppingCriteria), got {criterion!r}")
    if method == "ppsd" and backend == "distributed":
        raise ValueError("stopping_criteria are not supported with PPSD's 'distributed' backend (its last stage stops)")

    def check(row: list[int]) -> Callable[[list[int]], bool]:
        def fired(emitted: list[int]) -> bool:
            held = torch.tensor([row + emitted], dtype=torch.long)
            return any(bool(torch.as_tensor(criterion(held, None)).any()) for criterion in criteria)

        return fired

    return BatchStop([check(row) for row in ids.tolist()], pads=bool(eos))


def _layout(ids: torch.Tensor, new: list[list[int]], fill: int | None, device) -> torch.Tensor:
    """HF's layout: the input as given, then each row's new tokens, finished rows filled with the pad id."""
    width = max(len(tokens) for tokens in new)
    if fill is None and any(len(tokens) < width for tokens in new):
        raise ValueError("rows finished at different lengths: pad_token_id (or eos_token_id) is needed to fill them")
    tail = [tokens + [fill] * (width - len(tokens)) for tokens in new]
    return torch.cat([ids.to(device), torch.tensor(tail, dtype=torch.long, device=device)], dim=1)


def exit_and_head(model: Any, head: Any, exit_layer: int | None) -> tuple[Any, int]:
    """(head, exit layer) as `generate` settles them for EESD: the exit layer given, else a trained head's own,
    else the middle layer; a head file's layer checked against an explicit exit layer (the exit layer's range is
    checked where it is used, as `generate` and `measure_round_costs` check it)."""
    adapter = _adapter(model)
    if exit_layer is None:
        return _exit_from_head(adapter, head)
    return resolve_head(head, adapter, exit_layer), exit_layer


def _exit_from_head(adapter: ModelAdapter, head: Any) -> tuple[Any, int]:
    """Without an explicit exit layer: a trained head's own (a head file records it), else the middle layer."""
    if head in (None, "shared"):
        return head, default_exit_layer(adapter.num_layers)
    head = resolve_head(head, adapter, None)
    return head, getattr(head, "exit_layer", None) or default_exit_layer(adapter.num_layers)


def forced_acceptance(accept_pattern: float | Sequence[int], seed: int) -> Callable[[int], int]:
    """The accept decision for `generate(accept_pattern=...)` (benchmark only, NOT lossless).

    A number alpha in [0, 1]: every draft position is accepted independently with probability alpha (draws from
    `random.Random(seed)`), a round accepts the run of successes before the first failure, capped by its drafted
    count. A sequence of integers >= 0: the accepted count of each round (one entry per row and round, in row order),
    cycled, capped by the drafted count.
    """
    if isinstance(accept_pattern, bool):
        raise ValueError(f"accept_pattern must be a number in [0, 1] or a sequence of counts, got {accept_pattern!r}")
    if isinstance(accept_pattern, (int, float)):
        alpha = float(accept_pattern)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"accept_pattern alpha must lie in [0, 1], got {accept_pattern!r}")
        rng = random.Random(seed)

        def bernoulli(drafted: int) -> int:
            accepted = 0
            while accepted < drafted and rng.random() < alpha:
                accepted += 1
            return accepted

        return bernoulli
    counts = list(accept_pattern)
    if not counts or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ValueError(f"accept_pattern counts must be a non-empty sequence of integers >= 0, got {counts!r}")
    cycle = itertools.cycle(counts)
    return lambda drafted: min(next(cycle), drafted)


def _decode_ppsd(
    adapter, rows: Rows, config, min_new_tokens, exit_layer, stages, stage_boundaries, backend, capture, head,
    sync_every, stall_timeout_s, given,
):  # fmt: skip
    return decode_ppsd_rows(
        adapter, rows.prompts, rows.sinks, None, stages=stages, stage_boundaries=stage_boundaries,
        exit_layer=exit_layer, backend=backend, sampling=config, min_new_tokens=min_new_tokens, capture=capture,
        head=head, sync_every=sync_every, stall_timeout_s=stall_timeout_s, given=given,
    )  # fmt: skip


@dataclass(frozen=True)
class PrefixProcessors:
    """HF's processors for the settings that read each position's prefix (`prefix_processors`)."""

    biases: tuple[Callable[..., Any], ...] = ()  # before the repetition penalty (HF's sequence bias)
    processors: tuple[Callable[..., Any], ...] = ()  # HF's built-in ones, before suppression
    custom: tuple[Callable[..., Any], ...] = ()  # the caller's, after suppression
    suppressed: tuple[int, ...] = ()  # single-token bad words: plain suppressed ids (a device mask, capturable)


class AllowedTokens:
    """HF's `prefix_allowed_tokens_fn` (its PrefixConstrainedLogitsProcessor, without beams): only the ids
    `fn(batch_id, row)` returns may follow a row, `batch_id` the row's index in the batch; called with the rows of
    one prefix length and their batch indices (`TokenSelector`)."""

    takes_rows = True

    def __init__(self, fn: Callable[[int, torch.Tensor], Sequence[int]]) -> None:
        if not callable(fn):
            raise ValueError(f"prefix_allowed_tokens_fn must be a callable of (batch_id, input_ids), got {fn!r}")
        self.fn = fn

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

        return PrefixConstrainedLogitsProcessor(lambda i, row: self.fn(rows[i], row), 1)(input_ids, scores)


def prefix_processors(
    settings: dict[str, Any], eos: list[int], width: int, max_new_tokens: int, taking: dict[str, Any] | None = None
) -> PrefixProcessors:
    """HF's own processors for `settings` (bad_words_ids, sequence_bias, logits_processor, forced_bos_token_id,
    forced_eos_token_id, exponential_decay_length_penalty, prefix_allowed_tokens_fn; None is off), in HF's order,
    for an input `width` tokens wide: bad words of several tokens, forced BOS and EOS (the EOS at the
    `max_new_tokens`-th new token, HF's max_length - 1), the exponential decay length penalty (and before the forced
    tokens, `prefix_allowed_tokens_fn`'s constraint, `AllowedTokens`); then the caller's `logits_processor`.
    Single-token bad words (an EOS id excepted, as HF excepts it) become suppressed ids, unless a forced token
    follows them in HF's order (it overrides them there). `taking` (`taken_over`): the caller's processors that
    replace built-ins, each put in its built-in's place."""
    from transformers.generation import logits_process as hf

    taking = taking or {}

    def placed(*names: str) -> list[Callable[..., Any]]:
        return [taking[name] for name in names if name in taking]

    words = _bad_words(settings.get("bad_words_ids"), eos)
    bos, forced_eos = settings.get("forced_bos_token_id"), _eos_ids(settings.get("forced_eos_token_id"))
    forced = (
        bos is not None
        or bool(forced_eos)
        or bool(placed("ForcedBOSTokenLogitsProcessor", "ForcedEOSTokenLogitsProcessor"))
    )
    single = () if forced else tuple(w[0] for w in words if len(w) == 1)
    processors = placed("NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor")
    banned = [list(w) for w in words if forced or len(w) > 1]
    if banned:
        processors.append(hf.NoBadWordsLogitsProcessor(banned, eos or None))
    processors += placed("PrefixConstrainedLogitsProcessor")
    if settings.get("prefix_allowed_tokens_fn") is not None:
        processors.append(AllowedTokens(settings["prefix_allowed_tokens_fn"]))
    processors += placed("ForcedBOSTokenLogitsProcessor")
    if bos is not None:
        if not _is_token_id(bos):
            raise ValueError(f"forced_bos_token_id must be a token id (an integer >= 0), got {bos!r}")
        processors.append(hf.ForcedBOSTokenLogitsProcessor(bos))
    if forced_eos:
        if not all(_is_token_id(t) for t in forced_eos):
            raise ValueError(f"forced_eos_token_id must be token ids (integers >= 0), got {forced_eos!r}")
        processors.append(hf.ForcedEOSTokenLogitsProcessor(width + max_new_tokens, forced_eos))
    processors += placed("ForcedEOSTokenLogitsProcessor", "ExponentialDecayLengthPenalty")
    decay = settings.get("exponential_decay_length_penalty")
    if decay is not None:
        processors.append(_decay(decay, eos, width))
    custom = (*placed("SuppressTokensLogitsProcessor", "SuppressTokensAtBeginLogitsProcessor"), *_custom(settings))
    bias = settings.get("sequence_bias")
    biases = (*placed("SequenceBiasLogitsProcessor"), *((_sequence_bias(bias),) if bias else ()))
    biases += tuple(placed("RepetitionPenaltyLogitsProcessor"))  # the penalty's place: right after the bias
    return PrefixProcessors(biases, tuple(processors), custom, single)


def _custom(settings: dict[str, Any]) -> list[Callable[..., Any]]:
    """The caller's `logits_processor` list, checked."""
    custom = settings.get("logits_processor")
    if custom is not None and (not isinstance(custom, (list, tuple)) or not all(callable(p) for p in custom)):
        raise ValueError(
            f"logits_processor must be a list of HF LogitsProcessor objects (callables of input_ids, scores), got "
            f"{custom!r}"
        )
    return list(custom or ())


# HF's built-in processors that a caller's processor of the same class replaces: the setting that makes each, and
# the value that leaves it off
_TAKEN_OVER = {
    "SequenceBiasLogitsProcessor": ("sequence_bias", None),
    "RepetitionPenaltyLogitsProcessor": ("repetition_penalty", 1.0),
    "NoRepeatNGramLogitsProcessor": ("no_repeat_ngram_size", 0),
    "NoBadWordsLogitsProcessor": ("bad_words_ids", None),
    "PrefixConstrainedLogitsProcessor": ("prefix_allowed_tokens_fn", None),
    "ForcedBOSTokenLogitsProcessor": ("forced_bos_token_id", None),
    "ForcedEOSTokenLogitsProcessor": ("forced_eos_token_id", None),
    "ExponentialDecayLengthPenalty": ("exponential_decay_length_penalty", None),
    "SuppressTokensLogitsProcessor": ("suppress_tokens", None),
    "SuppressTokensAtBeginLogitsProcessor": ("begin_suppress_tokens", None),
}


def taken_over(settings: dict[str, Any], min_new_tokens: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """HF's rule for a `logits_processor` entry of the same class as a built-in the settings make: the caller's
    replaces the built-in, in the built-in's place (HF's `_merge_criteria_processor_list`). Returns the settings with
    those built-ins off and the rest of the caller's list, and the replacing processors by class name. A caller's
    MinLength / MinNewTokensLength processor beside a minimum length is refused (HF keeps one of its two there)."""
    from transformers.generation import logits_process as hf

    taking: dict[str, Any] = {}
    custom = _custom(settings)
    for processor in custom:
        name = type(processor).__name__
        if type(processor) is not getattr(hf, name, None):  # HF matches the exact class
            continue
        if name in ("MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor") and min_new_tokens > 0:
            raise ValueError(
                f"logits_processor holds a {name} while a minimum length is set (min_new_tokens / min_length): HF "
                "would replace only one of its two EOS masks; set the minimum by min_new_tokens alone"
            )
        key, off = _TAKEN_OVER.get(name, (None, None))
        if key is not None and name not in taking and settings.get(key) is not None and settings[key] != off:
            taking[name] = processor
    rest = [_batch_safe(p) for p in custom if all(p is not q for q in taking.values())]
    off = {_TAKEN_OVER[name][0]: _TAKEN_OVER[name][1] for name in taking}
    taking = {name: _batch_safe(processor) for name, processor in taking.items()}
    return {**settings, **off, "logits_processor": rest}, taking


def _batch_safe(processor: Any) -> Any:
    """A caller's HF processor as the selector calls it, on groups of rows (`TokenSelector._prefixed`): HF's
    PrefixConstrainedLogitsProcessor reads each row's batch index from its place in the input, so it becomes an
    `AllowedTokens` told the rows' own indices; a repetition penalty with a per-row `prompt_ignore_length` tensor
    (rows by place too) is refused. Others pass as they are."""
    from transformers.generation import logits_process as hf

    if type(processor) is hf.PrefixConstrainedLogitsProcessor:
        allowed, beams = processor._prefix_allowed_tokens_fn, processor._num_beams
        return AllowedTokens(lambda batch_id, row: allowed(batch_id // beams, row))
    ignore = getattr(processor, "prompt_ignore_length", None)
    if type(processor) is hf.RepetitionPenaltyLogitsProcessor and isinstance(ignore, torch.Tensor):
        raise ValueError(
            "logits_processor: a RepetitionPenaltyLogitsProcessor with a prompt_ignore_length tensor (one per row) "
            "reads rows by their place in the batch, which a pass's groups of rows do not keep; give one integer, the "
            "prompt's width, as HF's own example does"
        )
    return processor


def _decay(decay: Any, eos: list[int], width: int) -> Callable[..., Any]:
    """HF's ExponentialDecayLengthPenalty for (start index, decay factor), which needs EOS ids."""
    from transformers.generation.logits_process import ExponentialDecayLengthPenalty

    if (
        not isinstance(decay, (list, tuple))
        or len(decay) != 2
        or not _is_token_id(decay[0])
        or not isinstance(decay[1], numbers.Real)
        or isinstance(decay[1], bool)
    ):
        raise ValueError(f"exponential_decay_length_penalty must be (start index >= 0, decay factor), got {decay!r}")
    if not eos:
        raise ValueError("exponential_decay_length_penalty raises the EOS score: it needs eos_token_id")
    return ExponentialDecayLengthPenalty(tuple(decay), eos, width)


def _sequence_bias(sequence_bias: Any) -> Callable[..., Any]:
    """HF's processor for `sequence_bias` (a dict of token-id tuples to biases, or a list of [ids, bias] pairs), which
    checks it; what it refuses is refused with a ValueError naming the field."""
    from transformers.generation.logits_process import SequenceBiasLogitsProcessor

    try:
        return SequenceBiasLogitsProcessor(sequence_bias=sequence_bias)
    except (ValueError, TypeError) as error:
        raise ValueError(f"sequence_bias: {error}") from None


@dataclass(frozen=True)
class PassSetup:
    """What fixes a decoder's static buffers and captured passes (besides rows and cache capacity)."""

    method: str
    config: SamplingConfig
    min_new_tokens: int
    eos: list[int]
    exit_layer: int | None
    head: Any
    policies: list[DraftPolicy]
    capture: str
    draft_dtype: torch.dtype | None = None
    verify_buckets: bool = True

    def passes(self, adapter: ModelAdapter, prompts: list[list[int]], max_new_tokens: int) -> Passes:
        """Fresh buffers without capture; with capture, the model's cached ones for this setup (graphs kept)."""
        mode = resolve_capture(self.capture, adapter.device, self.config.kind)
        max_draft = draft_capacity(self.policies, max_new_tokens) if self.method == "eesd" else 0
        lengths = [len(p) for p in prompts]
        capacity = cache_capacity(self.method, max(lengths), max_new_tokens, max_draft, captured=mode != "none")
        if mode == "none":
            return self._build(adapter, lengths, capacity, max_draft, mode)
        setup = (
            self.method, len(prompts), capacity, self.exit_layer, head_key(self.head), mode,
            dataclasses.replace(self.config, seed=0), self.min_new_tokens, tuple(self.eos), self._confidence,
            self.capture == "auto",  # "auto" falls back where a capture or compilation fails, an explicit mode raises
            self.draft_dtype, verify_bucketed(mode, self.verify_buckets),
        )  # fmt: skip

        def serves(key: tuple) -> bool:  # passes of the same setup with room for longer drafts serve shorter ones
            return key[0] == setup and key[1] >= max_draft

        build = functools.partial(self._build, adapter, lengths, capacity, max_draft, mode)
        passes = cached_passes(adapter.model, (setup, max_draft), build, serves)
        passes.selector.restart(lengths, self.config.seed)
        passes.cache.rollback(0)
        passes.restart()
        return passes

    @property
    def _confidence(self) -> bool:
        return any(p.needs_confidence for p in self.policies)

    def _build(self, adapter: ModelAdapter, lengths: list[int], capacity: int, max_draft: int, mode: str) -> Passes:
        selector = TokenSelector(self.config, lengths, self.min_new_tokens, self.eos, adapter.device)
        cache = adapter.new_cache(len(lengths), capacity, extra_layers=getattr(self.head, "extra_layers", 0))
        return Passes(
            adapter, cache, selector, exit_layer=self.exit_layer, head=self.head, max_draft=max_draft, capture=mode,
            confidence=self._confidence, fallback=self.capture == "auto", draft_dtype=self.draft_dtype,
            verify_buckets=self.verify_buckets,
        )  # fmt: skip


def generate(
    model: nn.Module | ModelAdapter,
    input_ids: torch.Tensor | list,
    *,
    method: str = "ar",
    exit_layer: int | None = None,
    draft_len: int = 4,
    policy: str | DraftPolicy | None = None,
    max_new_tokens: int = 32,
    min_new_tokens: int = 0,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    sampling: str = "exact",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    suppress_tokens: Sequence[int] | None = None,
    begin_suppress_tokens: Sequence[int] | None = None,
    bad_words_ids: Sequence[Sequence[int]] | None = None,
    no_repeat_ngram_size: int = 0,
    sequence_bias: Any = None,
    logits_processor: Sequence[Callable[..., Any]] | None = None,
    forced_bos_token_id: int | None = None,
    forced_eos_token_id: int | Sequence[int] | None = None,
    exponential_decay_length_penalty: tuple[int, float] | None = None,
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], Sequence[int]] | None = None,
    typical_p: float | None = None,
    epsilon_cutoff: float | None = None,
    eta_cutoff: float | None = None,
    seed: int | Sequence[int] = 0,
    streamer: Any = None,
    stopping_criteria: Sequence[Callable[..., Any]] | None = None,
    head: Any = None,
    stages: int = 2,
    stage_boundaries: list[int] | None = None,
    backend: str = "sequential",
    accept_pattern: float | Sequence[int] | None = None,
    capture: str = "auto",
    sync_every: int | None = None,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    draft_dtype: torch.dtype | str | None = None,
    verify_buckets: bool = True,
) -> GenerationResult:
    """Decode with `method` "ar" (reference), "eesd" (early-exit self-speculation) or "ppsd", losslessly.

    Greedy unless `do_sample`; sampling is `"exact"` (Gumbel-max keyed by (seed, position): EESD reproduces AR's
    sampled tokens exactly) or `"rejection"` (speculative sampling: same distribution). `seed` is one for every row
    (rows with equal prompts then sample equal text, each as it would alone) or a list of one per row.
    `exit_layer` defaults to the middle layer; `policy` (e.g. "fixed:4", "beta-ts") overrides `draft_len`. Rows of
    a batch are left-padded with `attention_mask`, as for HF `generate`, whose output layout `sequences` follows.
    `head` is the exit head (EESD and PPSD): "shared" (default: the model's own final norm + LM head at the exit
    layer), "shared:N" (the same over the N lowest token ids), a head file (trained, or a vocabulary subset from `eesd
    train-head --vocab-subset N`) or a head object (see `executor.heads`). `repetition_penalty`, `suppress_tokens`
    (ids never chosen) and `begin_suppress_tokens` (ids not chosen as the first new token) apply as HF's processors
    do, to every method and backend, and so do `typical_p`, `epsilon_cutoff` and `eta_cutoff` when sampling, and
    `no_repeat_ngram_size` (HF's n-gram ban as device ops over each row's text, captured passes included; not with
    PPSD's "distributed" backend).
    `bad_words_ids` (HF's: single ids join the suppressed ones, an EOS id excepted as HF excepts it; longer sequences
    ban their last token after the rest), `sequence_bias`, `forced_bos_token_id`,
    `forced_eos_token_id`, `exponential_decay_length_penalty`, `prefix_allowed_tokens_fn` (HF's constrained
    decoding: `fn(batch_id, input_ids)` lists the ids allowed next) and `logits_processor` (HF `LogitsProcessor`s, or
    callables of (input_ids, scores)) depend on the tokens before each position: they run HF's own processors on
    each position's prefix, the row as HF holds it at that step (`executor.sampling`), on every method but PPSD's
    "distributed" backend, with the passes uncaptured (`capture` "auto" runs them so; a captured mode is refused).
    `stopping_criteria` (HF `StoppingCriteria` objects, e.g. `StopStringCriteria`, or any callable of the same
    signature) end a row after the first token for which one of them returns True, called once per new token with
    that row as HF holds it at that step ([1, prompt width + new tokens], on the CPU, its left padding included) and
    `scores=None` (a speculative round keeps no per-step scores); as in HF, without EOS ids the rows are not padded
    but all run to the step where the last of them stopped (`executor.decoding.BatchStop`). Not with PPSD's
    "distributed" backend.

    "ppsd" (verify-while-draft pipeline, greedy or exact sampling) splits the layers into `stages`
    (balanced, or cut at `stage_boundaries`), drafts with `head` at `exit_layer` (default: a trained head's own
    exit layer, else the end of stage 1) and runs on `backend` "sequential" (reference), "streams" (one CUDA stream
    per stage) or "distributed" (one process per stage, torch.distributed); its stats are `executor.ppsd.PPSDStats`.
    A distributed run has no time limit; a stage process that sends no heartbeat for `stall_timeout_s` seconds
    (stopped, or hung) stops it, and a failed, dead or stalled process raises `executor.ppsd_dist.PPSDWorkerError`
    naming its stage and rank. A batch (every backend) moves through the pipe in
    lockstep: a tick's draft is confirmed only if every row that goes on drafted its full model's token.

    `accept_pattern` (EESD only; benchmark only, NOT lossless, never the default) forces the accepted length of
    every round, to time EESD at a known acceptance on models whose drafts the full model would reject (e.g. random
    weights): a number alpha in [0, 1] (each draft position accepted with probability alpha, seeded by `seed`) or a
    sequence of accepted counts (cycled). Drafting and verifying do the same work as a real round with that accepted
    length; the emitted tokens are the row's first `accepted` drafts and the full model's token after them, so the
    output is NOT the model's greedy or sampled output. See `forced_acceptance`.

    `capture` ("auto", "none", "graph", "compile", "compile-layers", "freeze") is how AR, EESD and PPSD's local stages
    launch their passes (`executor.passes`): "auto" is "compile-layers" on a GPU with Triton ("graph" without; passes
    kept on the model for the next call with the same setup) and runs them as they are elsewhere; "graph" captures
    each pass in a CUDA graph; "compile" uses `torch.compile(mode="reduce-overhead")` per pass; "compile-layers"
    compiles the decoder layer once for all layers and passes and captures each pass in a CUDA graph on a GPU;
    "freeze" (CPU) compiles each pass whole with the weights frozen in as constants (`executor.passes.FREEZE_OPTIONS`:
    verify passes over a few tokens cost about what a one-token step does, at the price of minutes of compilation and
    a packed weight copy per pass).
    Captured passes are keyed by the head object: pass a loaded head (not a file path) to reuse them across calls.

    `sync_every` (AR, EESD's rounds that draft nothing, and PPSD's local backends) is how many tokens (PPSD: ticks)
    the device makes between two host reads: the AR step feeds its own token forward on the device (EESD runs a
    round of no drafts as that step), and PPSD's pipe judges and moves on on the device, so the host can queue work
    while the GPU runs. Default: 8 when the passes are captured, 1 otherwise (a CPU gains
    nothing from running ahead). Output is the same for every value; after an EOS the device may run up to
    `sync_every` - 1 steps (ticks) whose tokens are dropped.

    `draft_dtype` (EESD; e.g. "bf16" for a float32 model) drafts with copies of layers [0, E) and the exit head in
    that narrower dtype, made once and kept on the model (`executor.draft_precision`); the verify pass then runs all
    layers over the round's tokens, in the model's dtype, so the output is AR's as without it. Where passes are bound
    by reading weights a draft step reads half the bytes; the policies' default cost ratio counts it.

    `verify_buckets` (EESD under capture "freeze"): a round of k drafts runs the verify pass of its bucket (the
    smallest power of two holding k, at most the policy's longest draft), so a policy whose k varies compiles a few
    frozen verify passes instead of one per k (less compilation and memory, a padded pass on some rounds; the output
    is the same). False: one frozen verify pass per draft length. Other capture modes build one pass per k either way.
    """
    adapter = _adapter(model)
    ids = _as_2d(input_ids)
    prompts = split_prompts(ids, attention_mask)
    method_arguments(
        method, exit_layer=exit_layer, head=head, policy=policy, draft_len=draft_len, stages=stages,
        stage_boundaries=stage_boundaries, backend=backend,
    )  # fmt: skip
    if method == "eesd" and exit_layer is None:
        head, exit_layer = _exit_from_head(adapter, head)
    check_draft_len(adapter, draft_len)
    check_arguments(adapter, prompts, method, exit_layer, max_new_tokens)
    draft_dtype = check_draft_dtype(adapter, method, draft_dtype)
    check_sync_every(sync_every)
    if not isinstance(verify_buckets, bool):
        raise ValueError(f"verify_buckets must be True or False, got {verify_buckets!r}")
    if accept_pattern is not None and method != "eesd":
        raise ValueError(f"accept_pattern forces EESD's accept decision: it needs method 'eesd', got {method!r}")
    if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    eos = check_eos(adapter, _eos_ids(eos_token_id))
    settings = dict(
        bad_words_ids=bad_words_ids, sequence_bias=sequence_bias,
        logits_processor=logits_processor, forced_bos_token_id=forced_bos_token_id,
        forced_eos_token_id=forced_eos_token_id, exponential_decay_length_penalty=exponential_decay_length_penalty,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, suppress_tokens=suppress_tokens,
        begin_suppress_tokens=begin_suppress_tokens,
    )  # fmt: skip
    settings, taking = taken_over(settings, min_new_tokens)
    prefixed = prefix_processors(settings, eos, ids.shape[1], max_new_tokens, taking)
    config = SamplingConfig(
        do_sample=do_sample, mode=sampling, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, min_p=min_p,
        repetition_penalty=settings["repetition_penalty"],
        suppress_tokens=(*token_ids("suppress_tokens", settings["suppress_tokens"]), *prefixed.suppressed),
        begin_suppress_tokens=token_ids("begin_suppress_tokens", settings["begin_suppress_tokens"]),
        processors=prefixed.processors, biases=prefixed.biases,
        custom=prefixed.custom, no_repeat_ngram_size=settings["no_repeat_ngram_size"] or 0, typical_p=typical_p,
        epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
    )  # fmt: skip
    capture = prefix_capture(capture, config, method, backend)
    config.row_seeds(len(prompts))  # a per-row list must have one seed per row
    seed = config.first_seed  # checked, a plain int: the policies' and forced acceptance's
    forced = forced_acceptance(accept_pattern, seed) if accept_pattern is not None else None
    if config.penalized and accept_pattern is not None:
        raise ValueError("accept_pattern (forced acceptance) cannot be combined with repetition_penalty")
    if method == "eesd":  # loaded once: for the policies' cost ratio and the passes
        head = resolve_head(head, adapter, exit_layer)
    cost_ratio = draft_cost_ratio(adapter, exit_layer, head, draft_dtype) if method == "eesd" else 1.0  # PPSD: none
    policies = _policies(policy if policy is not None else f"fixed:{draft_len}", len(prompts), seed, cost_ratio)
    check_policies(adapter, policies)
    callback = _streamer_callback(streamer, len(prompts), ids)
    batch_stop = _batch_stop(stopping_criteria, ids, eos, method, backend)
    stops = [batch_stop.rule(row) if batch_stop else None for row in range(len(prompts))]
    rows = Rows(prompts=prompts, sinks=[TokenSink(max_new_tokens, eos, callback, stop) for stop in stops])
    if batch_stop is not None:
        batch_stop.sinks = rows.sinks
    stats = GenerationStats(method=method, prompt_tokens=sum(len(p) for p in prompts))
    with on_device(adapter.device):  # captured graphs replay on the current device's stream
        if max_new_tokens > 0 and method == "ppsd":
            stats = _decode_ppsd(
                adapter, rows, config, min_new_tokens, exit_layer, stages, stage_boundaries, backend, capture, head,
                sync_every, stall_timeout_s, ids.tolist(),
            )  # fmt: skip
        elif max_new_tokens > 0:
            exit_head = head if method == "eesd" else None  # resolved above
            setup = PassSetup(
                method, config, min_new_tokens, eos, exit_layer, exit_head, policies, capture, draft_dtype,
                verify_buckets,
            )  # fmt: skip
            passes = setup.passes(adapter, prompts, max_new_tokens)
            passes.selector.start(prompts, ids)  # a penalty's context: the prompts (HF leaves padding out); prefixes
            stats.capture = passes.capture
            if method == "ar":
                decode_ar(adapter, rows, passes, stats, sync_every=resolve_sync_every(sync_every, passes.capture))
            else:
                every = resolve_sync_every(sync_every, passes.capture)
                decode_eesd(adapter, rows, passes, stats, policies=policies, forced_accept=forced, sync_every=every)
    if streamer is not None:
        streamer.end()
    stats.new_tokens = sum(len(s.tokens) for s in rows.sinks)
    fill = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    sequences = _layout(ids, [s.tokens for s in rows.sinks], fill, adapter.device)
    exited = {"ar": None, "eesd": exit_layer, "ppsd": getattr(stats, "exit_layer", None) or exit_layer}[method]
    return GenerationResult(sequences=sequences, stats=stats, sampling=config, exit_layer=exited)


def check_draft_dtype(adapter: ModelAdapter, method: str, draft_dtype: Any) -> torch.dtype | None:
    """The narrower dtype EESD drafts in, or None (the model's own); refused for other methods."""
    if draft_dtype is None:
        return None
    if method != "eesd":
        raise ValueError(f"draft_dtype is for method 'eesd' (its draft steps), got method {method!r}")
    from executor.draft_precision import draft_dtype_for

    return draft_dtype_for(adapter.dtype, draft_dtype)


def _mask_from_pad(ids: torch.Tensor, pad: int | None, eos: list[int]) -> torch.Tensor | None:
    """HF infers the attention mask from the pad token when the input holds one that is not an EOS token. The
    decoders take left padding only: a pad id after a row's first real token is refused, saying the mask was
    inferred (no attention_mask passed)."""
    if pad is None or pad in eos or not bool((ids == pad).any()):
        return None
    mask = (ids != pad).long()
    late = (mask.cummax(dim=1).values > mask).any(dim=1)  # a pad after a real token
    if bool(late.any()):
        row = int(late.nonzero()[0])
        raise ValueError(
            f"input_ids row {row} holds pad_token_id {pad} after its first real token: with no attention_mask, the "
            "mask is inferred from pad_token_id (as HF does), and the decoders take left padding only; pass an "
            "attention_mask (ones where the tokens are real), or a pad_token_id the prompt does not use"
        )
    return mask


# model.generate arguments the drop-in understands; anything else raises instead of being ignored
# how HF keeps or compiles its cache: the tokens and every output returned here are the same whatever they say
NO_EFFECT_ARGS = (
    "cache_implementation", "cache_config", "low_memory", "return_legacy_cache", "compile_config", "disable_compile",
    "early_stopping", "bos_token_id", "decoder_start_token_id", "trust_remote_code",
)  # fmt: skip
# (early_stopping: beams only; bos_token_id and
# decoder_start_token_id: used only without a prompt, or by encoder-decoders; trust_remote_code: for custom_generate)
SUPPORTED_GENERATE_ARGS = (
    "input_ids", "attention_mask", "max_new_tokens", "min_new_tokens", "eos_token_id", "pad_token_id",
    "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "generation_config", "streamer",
    "max_length", "use_cache", "return_dict_in_generate", "output_scores", "output_logits", "stopping_criteria",
    "stop_strings", "tokenizer", "max_time", "num_return_sequences", "suppress_tokens", "begin_suppress_tokens",
    "bad_words_ids", "no_repeat_ngram_size", "sequence_bias", "logits_processor", "output_attentions",
    "output_hidden_states", "min_length", "length_penalty", "forced_bos_token_id", "forced_eos_token_id",
    "exponential_decay_length_penalty", "typical_p", "epsilon_cutoff", "eta_cutoff", "prefix_allowed_tokens_fn",
    "renormalize_logits", *NO_EFFECT_ARGS,
)  # fmt: skip
# min_length: HF's total length (input width + new tokens), i.e. min_new_tokens = min_length - width (if not set);
# length_penalty: scores beams only, so without beams (the only search here) it changes nothing, as in HF;
# renormalize_logits: the returned scores log-softmaxed after every processor, as HF's LogitNormalization (the tokens
# are the same either way)
# use_cache: decoding always keeps a KV cache (the tokens are the same either way); return_dict_in_generate: a
# GenerateDecoderOnlyOutput holding `sequences`, and `scores`, `logits`, `hidden_states`, `attentions` with their
# output_* flags (recomputed by one pass over the output: `rescore`); HF's `cache` (past_key_values) is not returned

# generation_config fields that hold one integer (a numpy integer taken as a Python int)
_INTEGER_FIELDS = (
    "max_new_tokens", "min_new_tokens", "max_length", "min_length", "num_return_sequences", "top_k",
    "no_repeat_ngram_size", "forced_bos_token_id",
)  # fmt: skip

# generate arguments that are not generation_config fields
_NOT_CONFIG = (
    "attention_mask", "streamer", "generation_config", "use_cache", "stopping_criteria", "tokenizer",
    "logits_processor", "prefix_allowed_tokens_fn",
)  # fmt: skip

# generation_config fields that change the result if set away from these values, and that we do not implement:
# accepted at these values, as arguments or in a generation_config (an eval harness passes num_beams=1), else refused
_UNSUPPORTED_CONFIG: dict[str, Any] = {
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": (None, 0.0), "encoder_repetition_penalty": 1.0,
    "guidance_scale": (None, 1.0), "prompt_lookup_num_tokens": None, "assistant_early_exit": None, "top_h": None,
    "dola_layers": None, "token_healing": False, "remove_invalid_values": False, "encoder_no_repeat_ngram_size": 0,
    "watermarking_config": None, "constraints": None, "force_words_ids": None, "diversity_penalty": 0.0,
}  # fmt: skip
# (a tuple: each of its values leaves the setting off, as HF reads it: guidance_scale 1, penalty_alpha 0)
# generate arguments, not config fields, likewise accepted only at these values (synced_gpus=True keeps a process
# stepping until every process is done: a multi-process run it would leave waiting)
_UNSUPPORTED_ARGS: dict[str, Any] = {
    "assistant_model": None, "assistant_tokenizer": None, "custom_generate": None, "negative_prompt_ids": None,
    "negative_prompt_attention_mask": None, "inputs_embeds": None, "past_key_values": None,
    "synced_gpus": (None, False),
}  # fmt: skip


def _unsupported(value: Any, neutral: Any) -> bool:
    """Whether `value` of an unsupported setting is other than its neutral value(s) (a tuple: any of them; None is
    compared by identity, a tensor or a model never equal to a number)."""
    for off in neutral if isinstance(neutral, tuple) else (neutral,):
        if value is off or (off is not None and isinstance(value, numbers.Real) and value == off):
            return False
    return True


def _neutral(neutral: Any) -> str:
    """The neutral value(s) as a message names them."""
    return " or ".join(map(repr, neutral)) if isinstance(neutral, tuple) else repr(neutral)


OUTPUT_FIELDS = ("scores", "logits", "hidden_states", "attentions")  # what `rescore` recomputes, HF's names


@torch.no_grad()
def rescore(
    adapter: ModelAdapter,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    sequences: torch.Tensor,
    config: SamplingConfig,
    min_new_tokens: int,
    eos: list[int],
    fields: Sequence[str] = ("scores", "logits"),
) -> dict[str, tuple]:
    """HF's per-step outputs `fields` (of `OUTPUT_FIELDS`) for `sequences` (the input `ids` [B, W], then the new
    tokens), one entry per new token, recomputed by one forward pass of the HF model over the whole output, with the
    attention mask and positions HF's step-by-step decoding gives them (finished rows' pad tokens attended, as HF
    does). `logits`: [B, V] in float32. `scores`: the logits processed as the decoders chose from them
    (`TokenSelector.scores`: every processor over each step's prefix, and the warpers when sampling).
    `hidden_states`: per layer (embeddings first), [B, W, d] at the first step and [B, 1, d] after it. `attentions`:
    per layer, [B, heads, W, W] at the first step and [B, heads, 1, W + step] after it (the model's attention
    implementation must give them, as for HF: `sdpa` gives none, and every step then holds an empty tuple, as HF's
    does). Equal to HF's up to float rounding: a pass over many positions sums in another order than one step at a
    time."""
    unknown = set(fields) - set(OUTPUT_FIELDS)
    if unknown:
        raise ValueError(f"rescore fields must be among {', '.join(OUTPUT_FIELDS)}, got {sorted(unknown)}")
    width, steps = ids.shape[1], sequences.shape[1] - ids.shape[1]
    if steps == 0:
        return {field: () for field in fields}
    ids = ids.to(adapter.device)
    prompt_mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).to(adapter.device, torch.long)
    full = torch.cat([prompt_mask, torch.ones_like(sequences[:, width:])], dim=1)
    positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 1)
    out = adapter.model(
        input_ids=sequences[:, :-1], attention_mask=full[:, :-1], position_ids=positions[:, :-1], use_cache=False,
        output_hidden_states="hidden_states" in fields, output_attentions="attentions" in fields,
    )  # fmt: skip
    raw = out.logits[:, width - 1 :].float()  # [B, steps, V]
    found = {"logits": tuple(raw.unbind(1))}
    if "scores" in fields:
        found["scores"] = _scores(adapter, ids, mask, prompt_mask, sequences, raw, config, min_new_tokens, eos)
    if "hidden_states" in fields or "attentions" in fields:
        # step 0 is HF's pass over the input alone: a padding position attends over the keys that pass holds (its
        # own are all masked), so its values depend on the pass's width; step s > 0 is the position W + s - 1 of the
        # pass over the output, attending over the W + s positions up to it (the later ones masked to weight 0)
        first = adapter.model(
            input_ids=ids, attention_mask=prompt_mask, position_ids=positions[:, :width], use_cache=False,
            output_hidden_states="hidden_states" in fields, output_attentions="attentions" in fields,
        )  # fmt: skip
        found["hidden_states"] = _per_step(first.hidden_states, out.hidden_states, width, steps, attention=False)
        found["attentions"] = _per_step(first.attentions, out.attentions, width, steps, attention=True)
    return {field: found[field] for field in fields}


def _per_step(first: tuple | None, whole: tuple | None, width: int, steps: int, attention: bool) -> tuple:
    """HF's per-step layout of per-layer tensors: step 0 the input pass's own, step s > 0 the output pass's at
    position W + s - 1 (hidden [B, 1, d]; attention [B, heads, 1, W + s], the keys up to that position)."""
    if not first:
        return ((),) * steps  # e.g. attention weights from an implementation that gives none (as HF returns then)

    def at(t: torch.Tensor, s: int) -> torch.Tensor:
        row = width + s - 1
        return t[:, :, row : row + 1, : row + 1] if attention else t[:, row : row + 1]

    return (tuple(first), *(tuple(at(t, s) for t in whole) for s in range(1, steps)))


def _scores(adapter, ids, mask, prompt_mask, sequences, raw, config, min_new_tokens, eos) -> tuple:
    """Each step's processed scores [B, V] (float32) from its raw logits `raw` [B, steps, V] (`rescore`)."""
    width = ids.shape[1]
    prompts = split_prompts(ids, None if mask is None else prompt_mask)
    lengths = [len(p) for p in prompts]
    selector = TokenSelector(config, lengths, min_new_tokens, eos, adapter.device)
    selector.track(raw.shape[-1], max(lengths) + raw.shape[1])
    selector.start(prompts, ids)
    start = torch.tensor(lengths, device=adapter.device).unsqueeze(1)
    scores = []
    for step in range(raw.shape[1]):
        scores.append(selector.scores(raw[:, step : step + 1].double(), start + step)[:, 0].float())
        token = sequences[:, width + step : width + step + 1]
        selector.note(token)
        selector.record(token, start + step)
    return tuple(scores)


def _processing(config: Any) -> dict[str, Any]:
    """How a generation config has the logits processed and the token chosen, as `generate`'s keyword arguments
    (HF's warpers only where HF would apply them: typical-p below 1, the cutoffs inside (0, 1))."""
    return dict(
        do_sample=bool(config.do_sample),
        temperature=config.temperature if config.temperature is not None else 1.0,
        top_k=config.top_k,
        top_p=config.top_p,
        min_p=config.min_p,
        repetition_penalty=config.repetition_penalty,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        bad_words_ids=config.bad_words_ids,
        no_repeat_ngram_size=config.no_repeat_ngram_size or 0,
        sequence_bias=config.sequence_bias,
        forced_bos_token_id=config.forced_bos_token_id,
        forced_eos_token_id=config.forced_eos_token_id,
        exponential_decay_length_penalty=config.exponential_decay_length_penalty,
        typical_p=config.typical_p if config.typical_p is not None and config.typical_p < 1.0 else None,
        epsilon_cutoff=config.epsilon_cutoff if config.epsilon_cutoff and 0.0 < config.epsilon_cutoff < 1.0 else None,
        eta_cutoff=config.eta_cutoff if config.eta_cutoff and 0.0 < config.eta_cutoff < 1.0 else None,
    )


def _prompt_ids(inputs: Any, kwargs: dict[str, Any]) -> Any:
    """The prompt from HF's `inputs` (positional) or `input_ids=`; `inputs_embeds` is refused (ids are needed)."""
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("inputs_embeds is not supported: the decoders start from token ids; pass input_ids")
    ids = kwargs.pop("input_ids", None)
    if inputs is not None and ids is not None:
        raise ValueError("the prompt was given twice: pass inputs or input_ids, not both")
    if inputs is None and ids is None:
        raise ValueError("no prompt: pass input_ids (a [batch, seq] tensor of token ids)")
    return ids if inputs is None else inputs


def _check_cache_implementation(value: Any) -> None:
    """HF's cache_implementation changes no token here (NO_EFFECT_ARGS), but a name HF does not know is refused, as
    HF's generate refuses it, rather than passed over."""
    try:
        from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS
    except ImportError:  # a transformers without the list: nothing to check against
        return
    known = (*ALL_CACHE_IMPLEMENTATIONS, "paged")  # as HF's GenerationConfig.validate takes them
    if value is not None and value not in known:
        raise ValueError(f"cache_implementation must be one of {', '.join(known)}, got {value!r}")


def _max_new_tokens(config: Any, width: int, default_length: bool, positions: int | None = None) -> int:
    """New tokens per row as HF 5 counts them: max_new_tokens, else max_length minus the prompt width, else (no
    length set anywhere) max_length new tokens, capped by the model's positions; none left is refused, as HF does."""
    if config.max_new_tokens is not None:
        if isinstance(config.max_new_tokens, bool) or not isinstance(config.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer > 0, got {config.max_new_tokens!r}")
        if config.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be greater than 0, got {config.max_new_tokens}")
        return config.max_new_tokens
    if default_length:
        if positions is not None and width >= positions:
            raise ValueError(
                f"the prompt is {width} tokens wide and fills the model's context ({positions} positions): no new "
                "token fits; shorten the prompt"
            )
        return config.max_length if positions is None else min(config.max_length, positions - width)
    if width >= config.max_length:
        raise ValueError(
            f"the prompt is {width} tokens wide but max_length is {config.max_length}: no new token fits; raise "
            "max_length or set max_new_tokens (as HF generate refuses it)"
        )
    return config.max_length - width


def _min_new_tokens(config: Any, width: int) -> int:
    """HF masks EOS while fewer than min_new_tokens are new, or, when min_new_tokens is not set, while the row is
    shorter than min_length (input width included); min_new_tokens takes precedence (HF sets min_length from it)."""
    if config.min_new_tokens is not None:
        return config.min_new_tokens
    min_length = config.min_length or 0
    if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0:
        raise ValueError(f"min_length must be an integer >= 0, got {min_length!r}")
    return max(min_length - width, 0)


def _return_sequences(config: Any) -> int:
    """`num_return_sequences`, checked as HF checks it (sampling only, without beams)."""
    copies = config.num_return_sequences or 1
    if not isinstance(copies, int) or copies < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {copies!r}")
    if copies > 1 and not config.do_sample:
        raise ValueError(
            f"num_return_sequences={copies} needs do_sample=True: greedy decoding gives one sequence per prompt "
            "(as HF generate)"
        )
    return copies


def _bad_words(bad_words_ids: Any, eos: list[int]) -> list[tuple[int, ...]]:
    """HF's `bad_words_ids` (a list of non-empty lists of token ids), checked, without a single EOS id (HF lets the
    model end a row even when EOS is listed as a bad word)."""
    if bad_words_ids is None:
        return []
    if not isinstance(bad_words_ids, (list, tuple)) or not all(
        isinstance(words, (list, tuple)) and words and all(_is_token_id(t) for t in words) for words in bad_words_ids
    ):
        raise ValueError(f"bad_words_ids must be a list of non-empty lists of token ids (>= 0), got {bad_words_ids!r}")
    words = [tuple(int(t) for t in w) for w in bad_words_ids]
    return [w for w in words if not (len(w) == 1 and w[0] in eos)]


def _is_token_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _criteria(config: Any, kwargs: dict[str, Any]) -> list:
    """The stopping criteria HF would add for this config (max_time, stop_strings), then the caller's own."""
    from transformers.generation.stopping_criteria import MaxTimeCriteria, StopStringCriteria

    criteria: list = []
    if config.max_time is not None:
        criteria.append(MaxTimeCriteria(max_time=config.max_time))
    if config.stop_strings is not None:
        if kwargs.get("tokenizer") is None:
            raise ValueError("stop_strings need the model's tokenizer: pass tokenizer=... (as HF generate does)")
        criteria.append(StopStringCriteria(tokenizer=kwargs["tokenizer"], stop_strings=config.stop_strings))
    return criteria + list(kwargs.get("stopping_criteria") or [])


def _check_generator(
    adapter: ModelAdapter, method: str, exit_layer: int | None, draft_len: int, policy: Any, sampling: str, capture: str
) -> None:
    """What an `EarlyExitGenerator` is built with, checked when it is built (not at its first call)."""
    if exit_layer is not None:
        check_exit_layer(adapter, exit_layer)
    check_draft_len(adapter, draft_len)
    if isinstance(policy, str):
        make_policy(policy)  # a bad spec names itself and the policies there are
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {sampling!r}")
    resolve_capture(capture, adapter.device, "greedy")


def _check_pipeline(
    adapter: ModelAdapter, method: str, exit_layer: int | None, head: Any, stages: int, bounds: Any, backend: str
) -> None:
    """PPSD's pipeline as an `EarlyExitGenerator` is built with it: its stages plan (a trained head's exit layer is
    checked where the head loads) and its backend (another method ignores them, with a warning: `method_arguments`)."""
    if method != "ppsd":
        return
    plan_stages(adapter.num_layers, stages, bounds, exit_layer if head in (None, "shared") else None)
    check_backend(adapter, backend)


def _per_prompt(fn: Any, copies: int) -> Any:
    """`prefix_allowed_tokens_fn` as HF calls it with `num_return_sequences` copies: `batch_id` the prompt's index,
    not the output row's (HF's constraint takes the copies as beams)."""
    if fn is None or copies == 1 or not callable(fn):  # not callable: refused by name where it is read
        return fn
    return lambda batch_id, row: fn(batch_id // copies, row)


def _row_seeds(seed: int | Sequence[int], prompts: int, copies: int) -> list[int]:
    """Each output row's seed for a drop-in call (`sampling.row_seed`): rows of one batch sample independently, as
    HF's do. `seed` an int: the rows (each prompt's copies side by side) take row_seed(seed, r); one seed per prompt
    row: a prompt's copy c takes row_seed(its seed, c)."""
    if isinstance(seed, numbers.Integral):
        return [row_seed(int(seed), row) for row in range(prompts * copies)]
    seeds = list(seed)
    if len(seeds) != prompts:
        raise ValueError(f"seed has {len(seeds)} values (one per prompt row), the batch has {prompts} rows")
    if not all(isinstance(s, numbers.Integral) and 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seed must be integers in [0, {MAX_SEED}] (one per prompt row), got {seed!r}")
    return [row_seed(int(s), c) for s in seeds for c in range(copies)]


class EarlyExitGenerator:
    """Drop-in for `model.generate`: same arguments, same returned `LongTensor`, decoded with AR or EESD.

    >>> generator = EarlyExitGenerator(model, method="eesd", exit_layer=8, draft_len=4)
    >>> generator.generate(input_ids, max_new_tokens=64)  # == model.generate(input_ids, max_new_tokens=64)

    Greedy results equal `model.generate`'s token for token. With `do_sample=True` the tokens are drawn by the
    `sampling` mode given here ("exact": equal to this generator's own AR sampling for the same seed), so they
    follow the same distribution as HF's sampling but not HF's random stream. As HF, a call with no seed set takes
    its randomness from torch's global generator (`seed=None`, the default: one 32-bit seed drawn per sampling call,
    so `torch.manual_seed` makes a call reproducible and successive calls differ); `seed=N` pins every call to N, and
    `seed=[N0, N1, ...]` gives each prompt row its own. The rows of a batch sample independently, as HF's do (a
    prompt repeated, or its `num_return_sequences` copies, gives different samples): row r takes a seed derived from
    the call's and r (`sampling.row_seed`; row 0 takes the call's own).

    Lengths and the config as HF 5 reads them: the passed `generation_config`'s unset fields come from the model's
    own (its EOS and pad ids, ...); with no length set at all, 20 new tokens (HF's default `max_length` counted from
    the prompt); a length that leaves no new token is refused, as HF refuses it.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "eesd",
        exit_layer: int | None = None,
        draft_len: int = 4,
        policy: str | DraftPolicy | None = None,
        sampling: str = "exact",
        seed: int | Sequence[int] | None = None,
        head: Any = None,
        capture: str = "auto",
        draft_dtype: torch.dtype | str | None = None,
        verify_buckets: bool = True,
        stages: int = 2,
        stage_boundaries: list[int] | None = None,
        backend: str = "sequential",
    ) -> None:
        self.model = model
        self.adapter = ModelAdapter(model)
        # a setting the method would ignore is named in a warning, once, here (each call reads what it uses quietly)
        used = method_arguments(
            method, exit_layer=exit_layer, head=head, policy=policy, draft_len=draft_len, stages=stages,
            stage_boundaries=stage_boundaries, backend=backend,
        )  # fmt: skip
        _check_generator(self.adapter, method, exit_layer, draft_len, policy, sampling, capture)
        _check_pipeline(self.adapter, method, exit_layer, head, stages, stage_boundaries, backend)
        # a head file is loaded once, so that every call reuses the same captured passes (they are keyed by head)
        self.head = resolve_head(head, self.adapter, exit_layer) if used.get("head") not in (None, "shared") else head
        self.stages, self.stage_boundaries, self.backend = stages, stage_boundaries, backend  # PPSD's pipeline
        self.capture = capture
        self.draft_dtype = draft_dtype  # EESD: drafts in a narrower dtype (`generate`'s draft_dtype)
        self.verify_buckets = verify_buckets  # frozen EESD: verify passes at bucket widths (`generate`'s)
        self.method = method
        self.exit_layer = exit_layer
        self.draft_len = draft_len
        self.policy = policy
        self.sampling = sampling
        self.seed = seed
        self.last_stats: GenerationStats | None = None

    def _method_arguments(self) -> dict[str, Any]:
        """What the generator's method reads of its settings as they are now (set after it was built too); what it
        would ignore was named when it was built."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return method_arguments(
                self.method, exit_layer=self.exit_layer, head=self.head, policy=self.policy, draft_len=self.draft_len,
                stages=self.stages, stage_boundaries=self.stage_boundaries, backend=self.backend,
            )  # fmt: skip

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """`model.generate`'s LongTensor (or, with return_dict_in_generate, its output object with `sequences`).
        The prompt as HF takes it: `inputs` (positional) or `input_ids=`."""
        input_ids = _prompt_ids(inputs, kwargs)
        unknown = sorted(set(kwargs) - set(SUPPORTED_GENERATE_ARGS) - set(_UNSUPPORTED_CONFIG) - set(_UNSUPPORTED_ARGS))
        for key, neutral in _UNSUPPORTED_ARGS.items():
            if key in kwargs and _unsupported(kwargs[key], neutral):
                value = kwargs[key]
                got = repr(value) if isinstance(value, (int, float, str)) else f"a value of type {type(value).__name__}"
                raise ValueError(f"{key}: not supported by the drop-in (only {_neutral(neutral)}), got {got}")
        if unknown:
            raise ValueError(
                f"unsupported generate argument(s): {', '.join(unknown)} (not implemented by the drop-in: "
                "executor.api.SUPPORTED_GENERATE_ARGS lists what it takes, docs/executor.md what each does)"
            )
        config, default_length = self._generation_config(kwargs)
        ids = _as_2d(input_ids)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = _mask_from_pad(ids, config.pad_token_id, _eos_ids(config.eos_token_id))
        copies = _return_sequences(config)
        seed = _row_seeds(self._call_seed(config), ids.shape[0], copies)
        if copies > 1:  # HF's layout: each row's copies next to each other
            ids = ids.repeat_interleave(copies, dim=0)
            mask = None if mask is None else torch.as_tensor(mask).repeat_interleave(copies, dim=0)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        max_new = _max_new_tokens(config, ids.shape[1], default_length, positions)
        processing = _processing(config)
        result = generate(
            self.adapter, ids, method=self.method, **self._method_arguments(), max_new_tokens=max_new,
            min_new_tokens=_min_new_tokens(config, ids.shape[1]),
            eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, attention_mask=mask,
            sampling=self.sampling, seed=seed, streamer=kwargs.get("streamer"),
            stopping_criteria=_criteria(config, kwargs), capture=self.capture,
            draft_dtype=self.draft_dtype, verify_buckets=self.verify_buckets,
            logits_processor=kwargs.get("logits_processor"),
            prefix_allowed_tokens_fn=_per_prompt(kwargs.get("prefix_allowed_tokens_fn"), copies), **processing,
        )  # fmt: skip
        self.last_stats = result.stats
        if not config.return_dict_in_generate:
            return result.sequences
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        fields = [field for field in OUTPUT_FIELDS if getattr(config, f"output_{field}", False)]
        extra = {}
        if fields:  # recomputed over the output, processed as the tokens were chosen (`rescore`)
            min_new, eos = _min_new_tokens(config, ids.shape[1]), _eos_ids(config.eos_token_id)
            extra = rescore(self.adapter, ids, mask, result.sequences, result.sampling, min_new, eos, fields)
            if "scores" in extra and getattr(config, "renormalize_logits", False):
                extra["scores"] = tuple(step.log_softmax(-1) for step in extra["scores"])
        return GenerateDecoderOnlyOutput(sequences=result.sequences, **extra)

    def _call_seed(self, config: Any) -> int | Sequence[int]:
        """This call's sampling seed: the generator's (an int, or one per prompt row), else (sampling) one drawn
        from torch's global generator, as HF's sampling draws from it; greedy draws nothing (the seed then only keys
        the draft policies' RNG)."""
        if self.seed is not None:
            return self.seed
        if not config.do_sample:
            return 0
        return int(torch.randint(0, MAX_SEED + 1, (), dtype=torch.int64))

    def _generation_config(self, kwargs: dict[str, Any]) -> tuple[Any, bool]:
        """(config, whether no length was set anywhere): the passed `generation_config` (else the model's), its unset
        fields filled from the model's own and then from HF's defaults, then overridden by the keyword arguments."""
        from transformers import GenerationConfig

        model_config, given = self.model.generation_config, kwargs.get("generation_config")
        config = copy.deepcopy(given or model_config)
        if given is not None and given is not model_config:
            for key, value in model_config.to_dict().items():
                if getattr(config, key, None) is None and value is not None:
                    setattr(config, key, value)
        # HF's "no length set": max_length unset (transformers 5) or at the library's default (4.x, where it is 20)
        default_length = kwargs.get("max_length") is None and config.max_length in (None, GenerationConfig().max_length)
        defaults = getattr(type(config), "_get_default_generation_params", None)  # transformers >= 5
        for key, value in (defaults() if defaults else {}).items():
            if getattr(config, key, None) is None:
                setattr(config, key, value)
        for key, value in kwargs.items():  # last, as HF: an explicit None turns a default off (top_k=None: no top-k)
            if key not in _NOT_CONFIG and key not in _UNSUPPORTED_ARGS:
                setattr(config, key, value)
        for key in _INTEGER_FIELDS:  # numpy's integers as HF takes them
            value = getattr(config, key, None)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                setattr(config, key, int(value))
        for key, neutral in _UNSUPPORTED_CONFIG.items():
            value = getattr(config, key, None)  # a field this transformers lacks is not set
            if value is not None and _unsupported(value, neutral):
                where = "" if key in kwargs else "generation_config."
                raise ValueError(f"{where}{key}={value!r} is not supported (only {_neutral(neutral)})")
        _check_cache_implementation(getattr(config, "cache_implementation", None))
        return config, default_length
