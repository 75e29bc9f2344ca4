"""Token selection: greedy, exact sampling and speculative (rejection) sampling, with HF-style logit warping.

- *greedy*: argmax (ties to the lowest id, as HF).
- *exact* (Daliri et al., arXiv 2408.07978, "drafter-invariant" speculative decoding): the token at absolute
  position j is argmax(warp(logits) + G_j) where G_j[v] is Gumbel noise computed by a counter-based hash of
  (seed, j, v). The full model's token at j is thus a deterministic function of its logits, the seed and j, and a
  draft is accepted iff it equals that token, so EESD reproduces seeded AR sampling token for token. The hash runs as
  integer tensor ops on the logits' device: no generator state, no host sync, the same noise on CPU and GPU.
- *rejection* (Leviathan et al. 2023; Chen et al. 2023): drafts are sampled from the exit head's warped distribution
  q, accepted with probability min(1, p/q), the first rejection resamples from norm(max(0, p - q)). Distribution-
  preserving; q is exactly the distribution each draft was drawn from (warped the same way as p, HF #47932).
  Its randomness is keyed too: the draft at position j, the accept test at j and the token sampled at j (residual,
  bonus or plain) use independent streams of the same hash, salted differently. A position's noise is consumed by
  exactly one decision that survives (a draft rolled back with its round never influenced an earlier position's
  test, causality), so every kept decision sees fresh uniform noise and the output distribution is exact, while the
  whole verdict runs on the device (`executor.verify.rejection_verdicts`): no generator state, capturable in a CUDA
  graph.

Processing follows HF's order: HF's sequence bias (`SamplingConfig.biases`), repetition penalty (over the tokens the
position's context holds, prompt included), min-new-tokens (EOS masked), HF's other built-in prefix processors
(`SamplingConfig.processors`: no-repeat n-grams, bad words of several tokens, forced BOS / EOS, the exponential decay
length penalty), suppressed tokens (always, and at the first new token), the caller's own processors
(`SamplingConfig.custom`), then, when sampling, temperature, top-k, top-p, min-p, typical-p, epsilon and eta
cutoffs. (HF runs no-repeat n-grams and bad words before min-new-tokens; both only set scores to -inf, so the order
between them does not change a score.)

A *prefix processor* is HF's `LogitsProcessor` interface, `processor(input_ids, scores) -> scores`, for processing that
depends on the tokens before the position: `input_ids` [n, T] holds each row as HF holds it at that step (the input as
given, left padding included, then the new tokens so far), `scores` [n, V] the logits processed so far. A speculative
pass predicts several positions of a row at once, each after its own prefix (the committed text and the drafts before
it), so the selector calls a processor once per group of (row, position) whose prefixes have the same length T: for AR
that is HF's own call, the whole batch at one step. A processor with `takes_rows = True` is also given `rows`, each
input row's index in the batch (HF's prefix_allowed_tokens_fn needs it). The prefixes come from `text` [B, capacity],
the token at every position each row has fed to the model (`record`), which every pass writes as it feeds its input; a
prefix processor runs Python on the host, so passes that use one run uncaptured.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

SAMPLING_MODES = ("exact", "rejection")
_MASK32 = 0xFFFFFFFF
MAX_SEED = _MASK32  # the counter-based noise keys on a seed's 32 bits: larger seeds would repeat smaller ones


@dataclass(frozen=True)
class SamplingConfig:
    """How a token is chosen from logits. `do_sample=False` is greedy; the other fields then do nothing."""

    do_sample: bool = False
    mode: str = "exact"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | tuple[int, ...] = 0  # one for every row, or one per row (`row_seeds`)
    min_p: float | None = None  # HF's MinPLogitsWarper: drop tokens below min_p times the top token's probability
    repetition_penalty: float | None = None  # HF's: a seen token's logit / penalty (x penalty if negative); greedy too
    suppress_tokens: tuple[int, ...] = ()  # HF's: ids never chosen (-inf); greedy too
    begin_suppress_tokens: tuple[int, ...] = ()  # HF's: ids not chosen as the first new token
    processors: tuple[Callable, ...] = ()  # prefix processors before suppression (module docstring); greedy too
    biases: tuple[Callable, ...] = ()  # prefix processors before the repetition penalty (HF's sequence bias)
    custom: tuple[Callable, ...] = ()  # the caller's prefix processors, after suppression (HF's logits_processor)
    no_repeat_ngram_size: int = 0  # HF's: no n-gram of this size twice in a row's text (0: off), on the device
    typical_p: float | None = None  # HF's TypicalLogitsWarper (sampling), off when None
    epsilon_cutoff: float | None = None  # HF's EpsilonLogitsWarper (sampling), off when None
    eta_cutoff: float | None = None  # HF's EtaLogitsWarper (sampling), off when None

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {self.mode!r}")
        for name in ("processors", "biases", "custom"):
            object.__setattr__(self, name, _callables(name, getattr(self, name)))
        ngram = self.no_repeat_ngram_size
        if not _is_integer(ngram) or ngram < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0: off), got {ngram!r}")
        for name in ("typical_p", "epsilon_cutoff", "eta_cutoff"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), "a number in (0, 1) (None: off)", lambda x: 0 < x < 1)
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            object.__setattr__(self, name, token_ids(name, getattr(self, name)))
        if self.repetition_penalty is not None:
            _check_number("repetition_penalty", self.repetition_penalty, "a finite number > 0", lambda x: x > 0)
        seeds = tuple(self.seed) if isinstance(self.seed, (list, tuple)) else (self.seed,)
        if not seeds or not all(_is_integer(s) and 0 <= s <= MAX_SEED for s in seeds):
            raise ValueError(
                f"seed must be an integer in [0, {MAX_SEED}] (the noise is keyed on 32 bits) or a non-empty list of "
                f"them (one per row), got {self.seed!r}"
            )
        seeds = tuple(int(s) for s in seeds)  # numpy integers too: the policies' RNG takes ints only
        object.__setattr__(self, "seed", seeds if isinstance(self.seed, (list, tuple)) else seeds[0])
        if not self.do_sample:
            return
        _check_number("temperature", self.temperature, "a finite number > 0 when sampling", lambda x: x > 0)
        if self.top_k is not None and (not _is_integer(self.top_k) or self.top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.top_p is not None:
            _check_number("top_p", self.top_p, "a number in (0, 1]", lambda x: 0 < x <= 1)
        if self.min_p is not None:
            _check_number("min_p", self.min_p, "a number in [0, 1]", lambda x: 0 <= x <= 1)

    def row_seeds(self, rows: int) -> list[int]:
        """Each row's seed (`row_seeds` below)."""
        return row_seeds(self.seed, rows)

    @property
    def first_seed(self) -> int:
        """The seed of row 0 (what seeds the draft policies and forced acceptance)."""
        return self.seed if isinstance(self.seed, int) else self.seed[0]

    @property
    def kind(self) -> str:
        return self.mode if self.do_sample else "greedy"

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0

    @property
    def reads_prefix(self) -> bool:
        """Whether a prefix processor reads each position's tokens before it (a host call: passes run uncaptured)."""
        return bool(self.processors or self.biases or self.custom)

    @property
    def keeps_text(self) -> bool:
        """Whether selection reads each row's text: prefix processors, or the n-gram ban (on the device)."""
        return self.reads_prefix or self.no_repeat_ngram_size > 0


def _callables(name: str, values: object) -> tuple[Callable, ...]:
    """A list of prefix processors (callables, e.g. HF `LogitsProcessor`s; a `LogitsProcessorList` is a list)."""
    values = () if values is None else values
    if callable(values) and not isinstance(values, (list, tuple)):
        values = (values,)
    if not isinstance(values, (list, tuple)) or not all(callable(v) for v in values):
        raise ValueError(f"{name} must be a list of logits processors (callables of input_ids, scores), got {values!r}")
    return tuple(values)


def row_seeds(seed: int | tuple[int, ...], rows: int) -> list[int]:
    """Each row's seed: `seed` for all, or its own from a per-row tuple (which must have `rows` values). Rows with
    the same seed draw the same noise at the same position: the same prompt twice samples the same text, as each
    would alone; give each row its own seed for independent samples."""
    if isinstance(seed, int):
        return [seed] * rows
    if len(seed) != rows:
        raise ValueError(f"seed has {len(seed)} values (one per row), the batch has {rows} rows")
    return list(seed)


def token_ids(name: str, ids: object) -> tuple[int, ...]:
    """A list of token ids (integers >= 0) as a tuple; None is empty."""
    if ids is None:
        return ()
    if isinstance(ids, torch.Tensor) and ids.dim() <= 1 and not ids.dtype.is_floating_point:
        ids = ids.tolist()  # HF takes a tensor of ids too
    values = [ids] if _is_integer(ids) else ids
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list of token ids (integers >= 0), got {ids!r}")
    values = list(values)
    if not all(_is_integer(v) and v >= 0 for v in values):
        raise ValueError(f"{name} must be a list of token ids (integers >= 0), got {ids!r}")
    return tuple(int(v) for v in values)


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_number(name: str, value: object, allowed: str, inside: Callable[[float], bool]) -> None:
    """A real, finite number for which `inside` holds (nan and inf are refused: they compare false or poison logits)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not inside(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor: where `seen` [.., V] (broadcast), logit / penalty, or x penalty if < 0."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32, C. Wellons) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix32(x: int) -> int:
    """`_hash32` on one Python int < 2**32."""
    return int(_hash32(torch.tensor(x, dtype=torch.int64)))


ROW_SALT = 0x27D4EB2F  # keys a batch row's seed (`row_seed`); any non-zero 32-bit constant


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a drop-in call seeded `seed` (`EarlyExitGenerator`): `seed` itself for row 0, so one
    row samples what `generate` samples with that seed, and a 32-bit hash of (seed, row) for the others, so that the
    rows of a batch (a prompt repeated, or its `num_return_sequences` copies) sample independently, as HF's do, and
    calls with nearby seeds share no row's noise."""
    if row == 0:
        return seed
    return _mix32((seed & _MASK32) ^ _mix32((row * ROW_SALT) & _MASK32))


# independent noise streams of one seed (0: the exact mode's, unchanged); any distinct non-zero 32-bit constants
DRAFT_SALT, ACCEPT_SALT, SAMPLE_SALT = 0x1B873593, 0xCC9E2D51, 0x85EBCA6B


def _position_key(seed: int | torch.Tensor, positions: torch.Tensor, salt: int) -> torch.Tensor:
    """A 32-bit key per position (int64 tensor of positions.shape) from (seed, position, salt).

    `seed` may be an int64 tensor on the positions' device that broadcasts to them (a buffer a captured CUDA graph
    reads): 0-d, or [B, 1], a seed per row of positions [B, q]."""
    seeds = (seed & _MASK32) if torch.is_tensor(seed) else torch.tensor(seed & _MASK32, device=positions.device)
    key = _hash32(seeds.expand(positions.shape) ^ _hash32(positions.to(torch.int64) & _MASK32))
    return key if salt == 0 else _hash32(key ^ salt)


def _unit(bits: torch.Tensor) -> torch.Tensor:
    return (bits.to(torch.float64) + 0.5) / 2.0**32  # in (0, 1)


def gumbel_noise(seed: int | torch.Tensor, positions: torch.Tensor, vocab: int, salt: int = 0) -> torch.Tensor:
    """Gumbel(0, 1) noise [*positions.shape, vocab], a pure function of (seed, position, token id, salt)."""
    tokens = torch.arange(vocab, device=positions.device, dtype=torch.int64)
    bits = _hash32(_position_key(seed, positions, salt).unsqueeze(-1) ^ _hash32(tokens ^ 0x9E3779B9))
    return -torch.log(-torch.log(_unit(bits)))


def uniform_noise(seed: int | torch.Tensor, positions: torch.Tensor, salt: int) -> torch.Tensor:
    """Uniform(0, 1) noise of positions.shape, a pure function of (seed, position, salt)."""
    return _unit(_hash32(_position_key(seed, positions, salt)))


def warp(logits: torch.Tensor, config: SamplingConfig, warpers: tuple[Callable, ...] = ()) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p over the last dim, as HF's warpers do (removed tokens get -inf), then
    `warpers` (`hf_warpers`: typical-p, epsilon, eta)."""
    scores = logits / config.temperature if config.temperature != 1.0 else logits
    if config.top_k:
        kth = torch.topk(scores, min(config.top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove_sorted = sorted_scores.softmax(-1).cumsum(-1) <= 1 - config.top_p
        remove_sorted[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), float("-inf"))
    if config.min_p is not None:  # the top token always stays: its probability is the threshold's scale
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < config.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    for warper in warpers:  # HF's own, over [N, V] rows (they read no input_ids)
        scores = warper(None, scores.reshape(-1, scores.shape[-1])).reshape(scores.shape)
    return scores


def hf_warpers(config: SamplingConfig, device) -> tuple[Callable, ...]:
    """HF's typical-p, epsilon and eta warpers for `config`, in HF's order, made once (Eta holds a device tensor: made
    outside any captured pass)."""
    if not config.do_sample:
        return ()
    from transformers.generation.logits_process import EpsilonLogitsWarper, EtaLogitsWarper, TypicalLogitsWarper

    warpers: list[Callable] = []
    if config.typical_p is not None:
        warpers.append(TypicalLogitsWarper(mass=config.typical_p))
    if config.epsilon_cutoff is not None:
        warpers.append(EpsilonLogitsWarper(epsilon=config.epsilon_cutoff))
    if config.eta_cutoff is not None:
        warpers.append(EtaLogitsWarper(epsilon=config.eta_cutoff, device=device))
    return tuple(warpers)


def ngram_bans(text: torch.Tensor, first: torch.Tensor, ends: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """HF's NoRepeatNGramLogitsProcessor as device ops on static shapes (capturable): bool [B, q, V] (V, shape and
    device of `like`), True at the tokens that would complete an n-gram already in the prefix text[b, first[b] :
    ends[b, j]] (`first` [B, 1], `ends` [B, q] columns of `text` [B, S]): every n-token window inside the prefix whose
    first n - 1 tokens equal the prefix's last n - 1 bans its own last token (none while the prefix is shorter than
    n)."""
    rows, width = text.shape
    if n > width:  # no prefix is that long
        return torch.zeros(like.shape, dtype=torch.bool, device=like.device)
    windows = text.unfold(1, n, 1)  # [B, S - n + 1, n]
    tail = ends.unsqueeze(-1) - (n - 1) + torch.arange(n - 1, device=text.device)  # [B, q, n - 1]
    suffix = text.gather(1, tail.clamp(0, width - 1).flatten(1)).view(*ends.shape, n - 1)
    match = (windows[:, None, :, : n - 1] == suffix[:, :, None, :]).all(-1)  # [B, q, S - n + 1]
    start = torch.arange(windows.shape[1], device=text.device)
    inside = (start >= first.unsqueeze(-1)) & (start <= ends.unsqueeze(-1) - n)
    last = windows[:, None, :, -1].expand(*match.shape)
    hits = torch.zeros(like.shape, dtype=torch.int32, device=like.device)
    return hits.scatter_add_(2, last, (match & inside).to(torch.int32)) > 0


def token_mask(vocab: int, ids: torch.Tensor) -> torch.Tensor:
    """[V] bool, True at `ids` (a 1-d int64 tensor on the device; ids >= vocab match nothing, as in HF)."""
    tokens = torch.arange(vocab, device=ids.device)
    return (tokens.unsqueeze(-1) == ids).any(-1)  # device ops only: no index list copied from the host


def suppress(
    logits: torch.Tensor, new_index: torch.Tensor, always: torch.Tensor | None, first: torch.Tensor | None
) -> torch.Tensor:
    """HF's SuppressTokens and SuppressTokensAtBegin processors: the ids `always` are -inf at every position, the ids
    `first` at the first new token (new_index [B, q] == 0); each a 1-d int64 tensor, or None."""
    vocab = logits.shape[-1]
    if always is not None:
        logits = logits.masked_fill(token_mask(vocab, always), float("-inf"))
    if first is not None:
        logits = logits.masked_fill((new_index == 0).unsqueeze(-1) & token_mask(vocab, first), float("-inf"))
    return logits


def mask_eos(
    logits: torch.Tensor, new_index: torch.Tensor, min_new_tokens: int, eos: torch.Tensor | None
) -> torch.Tensor:
    """HF's min_new_tokens: EOS is impossible for the new tokens numbered < min_new_tokens (new_index: [B, q];
    `eos`: the EOS ids as a 1-d int64 tensor on the logits' device, None when there is none)."""
    if min_new_tokens <= 0 or eos is None:
        return logits
    too_early = (new_index < min_new_tokens).unsqueeze(-1)
    return logits.masked_fill(too_early & token_mask(logits.shape[-1], eos), float("-inf"))


def _id_tensor(ids: tuple[int, ...], device) -> torch.Tensor | None:
    return torch.tensor(ids, dtype=torch.int64, device=device) if ids else None


class TokenSelector:
    """Turns logits into tokens for the positions they predict, identically on every decoding path.

    Everything it reads per call lives in device tensors made once (prompt lengths, seed, EOS ids), so selection
    can run inside a captured CUDA graph; `restart` refills them for the next generation with the same shapes.
    With a repetition penalty, `seen` [B, V] (bool, made by `track`) holds the tokens of each row's committed text
    (as HF, which leaves a row's left padding out): `start` fills it from the prompts, `note` adds emitted tokens, and a
    pass that predicts positions past uncommitted drafts passes its own `context` instead. With the n-gram ban or a
    prefix processor, `text` (made by `track`, filled by `start` with the rows as given) gets every token a pass feeds
    at its position (`record`), so the prefix of any position a pass predicts, drafts included, is in it.
    """

    def __init__(
        self, config: SamplingConfig, prompt_lens: list[int], min_new_tokens: int, eos_ids: list[int], device
    ) -> None:
        self.config = config
        self.min_new_tokens = min_new_tokens
        self.eos_ids = list(eos_ids)
        self.prompt_lens = torch.tensor(prompt_lens, device=device).unsqueeze(1)  # [B, 1]
        self.seed = torch.zeros(len(prompt_lens), 1, dtype=torch.int64, device=device)  # [B, 1]: each row's
        self.eos = _id_tensor(tuple(self.eos_ids), device)
        self.suppressed = _id_tensor(config.suppress_tokens, device)
        self.suppressed_first = _id_tensor(config.begin_suppress_tokens, device)
        self.seen: torch.Tensor | None = None
        # each row as HF holds it (`track`): [B, room + capacity], position p at column room + p, the row's left padding
        # (the input as given, before its prompt) just before column room, from column `first` [B, 1] on
        self.text: torch.Tensor | None = None
        self.room = 0
        self.first = torch.zeros(len(prompt_lens), 1, dtype=torch.long, device=device)
        self.firsts = [0] * len(prompt_lens)  # `first` on the host, for the prefix processors' grouping
        self.warpers = hf_warpers(config, device)
        self._written: tuple[list[int], list[int]] | None = None  # what `restart` last put in prompt_lens and seed
        self.restart(prompt_lens, config.seed)

    @property
    def penalized(self) -> bool:
        return self.config.penalized

    def track(self, vocab: int, capacity: int | None = None) -> None:
        """Allocate, once and before any capture, `seen` when the config has a repetition penalty and `text` over
        `capacity` positions (and as much room for left padding) when something reads the prefix."""
        rows, device = self.prompt_lens.shape[0], self.prompt_lens.device
        if self.penalized and self.seen is None:
            self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        if self.config.keeps_text and capacity is not None and self.text is None:
            self.room = capacity
            self.text = torch.zeros(rows, 2 * capacity, dtype=torch.long, device=device)

    def start(self, prompts: list[list[int]], given: torch.Tensor | list[list[int]] | None = None) -> None:
        """A generation's prompts (no padding): `seen` <- their tokens; `text` <- the rows as the caller gave them
        (`given`, left padding included; default the prompts), as HF holds them."""
        device = self.prompt_lens.device
        if self.seen is not None:
            width = max(len(p) for p in prompts)
            rows = torch.tensor([p + p[:1] * (width - len(p)) for p in prompts], device=device)
            self.seen.zero_()
            self.seen.scatter_(1, rows, True)
        if not self.config.keeps_text:
            return
        rows_given = [list(p) for p in prompts] if given is None else torch.as_tensor(given).tolist()
        leads = [len(row) - len(prompt) for row, prompt in zip(rows_given, prompts, strict=True)]
        if self.text is None:  # untracked: room for the prompts' own selection
            self.room = max(leads)
            width = self.room + max(len(p) for p in prompts)
            self.text = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        if max(leads) > self.room:
            raise ValueError(f"the input has {max(leads)} padding columns, more than the {self.room} this text keeps")
        self.text.zero_()
        for row, given_row in enumerate(rows_given):
            self.text[row, self.room - leads[row] : self.room - leads[row] + len(given_row)] = torch.tensor(given_row)
        self.firsts = [self.room - lead for lead in leads]
        self.first.copy_(torch.tensor(self.firsts).unsqueeze(1))

    def record(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Tokens [B, n] fed at absolute `positions` [B, n] join `text` (a no-op when nothing reads the prefix)."""
        if self.text is not None:
            self.text.scatter_(1, positions + self.room, tokens)

    def note(self, tokens: torch.Tensor) -> None:
        """Committed tokens [B, n] (device) join `seen`."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens, True)

    def restart(self, prompt_lens: list[int], seed: int | tuple[int, ...]) -> None:
        """A new generation with these prompt lengths and seed, one for all rows or one per row (same rows, sampling
        settings and EOS ids). Nothing is copied where they are what the last call wrote (a serving loop restarts
        its rows' selector every round)."""
        wanted = (list(prompt_lens), list(row_seeds(seed, len(prompt_lens))))
        if wanted == self._written:
            return
        self.prompt_lens.copy_(torch.tensor(wanted[0]).unsqueeze(1))
        self.seed.copy_(torch.tensor(wanted[1], dtype=torch.int64).unsqueeze(1))
        self._written = wanted

    def scores(self, logits: torch.Tensor, targets: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Processed and warped scores [B, q, V] for the tokens at absolute positions `targets` [B, q]. `context`
        (bool, broadcast to [B, q, V]) is what the repetition penalty sees; default the committed text, `seen`."""
        if targets.shape[0] != self.prompt_lens.shape[0]:
            raise ValueError(f"selector built for {self.prompt_lens.shape[0]} rows, got {targets.shape[0]}")
        logits = self._prefixed(self.config.biases, logits, targets)
        if self.penalized:
            if context is None and self.seen is None:
                raise RuntimeError("repetition penalty without a context: call track(vocab) and start(rows) first")
            seen = context if context is not None else self.seen.unsqueeze(1)
            logits = penalize(logits, seen, float(self.config.repetition_penalty))
        if self.config.no_repeat_ngram_size:
            if self.text is None:
                raise RuntimeError("no_repeat_ngram_size without the rows' text: call track(vocab, capacity) first")
            bans = ngram_bans(self.text, self.first, targets + self.room, self.config.no_repeat_ngram_size, logits)
            logits = logits.masked_fill(bans, float("-inf"))
        new_index = targets - self.prompt_lens
        logits = mask_eos(logits, new_index, self.min_new_tokens, self.eos)
        logits = self._prefixed(self.config.processors, logits, targets)
        logits = suppress(logits, new_index, self.suppressed, self.suppressed_first)
        logits = self._prefixed(self.config.custom, logits, targets)
        return warp(logits, self.config, self.warpers) if self.config.do_sample else logits

    def _prefixed(self, processors: tuple[Callable, ...], logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`processors` applied to logits [B, q, V], the scores of the tokens at `targets` [B, q]: one call per
        group of (row, position) whose prefixes (`prefix`) have the same length, as HF calls a processor per step."""
        if not processors:
            return logits
        if self.text is None:
            raise RuntimeError("prefix processors without the rows' text: call track(vocab, capacity), start(prompts)")
        groups: dict[int, list[tuple[int, int, int]]] = {}
        for row, row_targets in enumerate(targets.tolist()):
            for j, target in enumerate(row_targets):
                groups.setdefault(self.room + target - self.firsts[row], []).append((row, j, target))
        for cells in groups.values():
            rows, js, _ = (torch.tensor(index, device=logits.device) for index in zip(*cells, strict=True))
            input_ids = torch.stack([self.prefix(row, target) for row, _, target in cells])
            scores = logits[rows, js]  # a copy: a processor that works in place changes nothing else
            for processor in processors:
                if getattr(processor, "takes_rows", False):  # it needs each input row's index in the batch
                    scores = processor(input_ids, scores, rows=[row for row, _, _ in cells])
                else:
                    scores = processor(input_ids, scores)
            logits = logits.index_put((rows, js), scores.to(logits.dtype))
        return logits

    def prefix(self, row: int, target: int) -> torch.Tensor:
        """Row `row` as HF holds it when it chooses the token at absolute position `target`: the row as given, then
        the new tokens before `target`."""
        return self.text[row, self.firsts[row] : self.room + target]

    def probs(self, logits: torch.Tensor, targets: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.to(torch.float64) if self.config.do_sample else logits
        return self.scores(logits, targets, context).softmax(-1)

    def select(self, logits: torch.Tensor, targets: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [B, q]: greedy, exact (Gumbel-max keyed by target position) or a plain sample (rejection mode)."""
        kind = self.config.kind
        if kind == "greedy":
            return self.scores(logits, targets, context).argmax(-1)
        scores = self.scores(logits.to(torch.float64), targets, context)
        if kind == "exact":
            return (scores + gumbel_noise(self.seed, targets, scores.shape[-1])).argmax(-1)
        return self.sample(scores.softmax(-1), targets, SAMPLE_SALT)

    def sample(self, probs: torch.Tensor, targets: torch.Tensor, salt: int) -> torch.Tensor:
        """A token [B, q] drawn from probs [B, q, V] for the positions `targets` [B, q] (Gumbel-max, keyed)."""
        return (probs.log() + gumbel_noise(self.seed, targets, probs.shape[-1], salt)).argmax(-1)
