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

Warping follows HF's order: min-new-tokens (EOS masked), temperature, top-k, top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLING_MODES = ("exact", "rejection")
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingConfig:
    """How a token is chosen from logits. `do_sample=False` is greedy; the other fields then do nothing."""

    do_sample: bool = False
    mode: str = "exact"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {self.mode!r}")
        if not self.do_sample:
            return
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def kind(self) -> str:
        return self.mode if self.do_sample else "greedy"


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32, C. Wellons) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed: int | torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [*positions.shape, vocab], a pure function of (seed, position, token id).

    `seed` may be a 0-d int64 tensor on the positions' device (a buffer a captured CUDA graph reads)."""
    tokens = torch.arange(vocab, device=positions.device, dtype=torch.int64)
    seeds = (seed & _MASK32) if torch.is_tensor(seed) else torch.tensor(seed & _MASK32, device=positions.device)
    key = _hash32(seeds.expand(positions.shape) ^ _hash32(positions.to(torch.int64) & _MASK32))
    bits = _hash32(key.unsqueeze(-1) ^ _hash32(tokens ^ 0x9E3779B9))
    uniform = (bits.to(torch.float64) + 0.5) / 2.0**32  # in (0, 1)
    return -torch.log(-torch.log(uniform))


def warp(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k, top-p over the last dim, as HF's warpers do (removed tokens get -inf)."""
    scores = logits / config.temperature if config.temperature != 1.0 else logits
    if config.top_k:
        kth = torch.topk(scores, min(config.top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove_sorted = sorted_scores.softmax(-1).cumsum(-1) <= 1 - config.top_p
        remove_sorted[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), float("-inf"))
    return scores


def mask_eos(
    logits: torch.Tensor, new_index: torch.Tensor, min_new_tokens: int, eos: torch.Tensor | None
) -> torch.Tensor:
    """HF's min_new_tokens: EOS is impossible for the new tokens numbered < min_new_tokens (new_index: [B, q];
    `eos`: the EOS ids as a 1-d int64 tensor on the logits' device, None when there is none)."""
    if min_new_tokens <= 0 or eos is None:
        return logits
    too_early = (new_index < min_new_tokens).unsqueeze(-1)
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    is_eos = (vocab.unsqueeze(-1) == eos).any(-1)  # device ops only: no index list copied from the host
    return logits.masked_fill(too_early & is_eos, float("-inf"))


class TokenSelector:
    """Turns logits into tokens for the positions they predict, identically on every decoding path.

    Everything it reads per call lives in device tensors made once (prompt lengths, seed, EOS ids), so selection
    can run inside a captured CUDA graph; `restart` refills them for the next generation with the same shapes.
    """

    def __init__(
        self, config: SamplingConfig, prompt_lens: list[int], min_new_tokens: int, eos_ids: list[int], device
    ) -> None:
        self.config = config
        self.min_new_tokens = min_new_tokens
        self.eos_ids = list(eos_ids)
        self.prompt_lens = torch.tensor(prompt_lens, device=device).unsqueeze(1)  # [B, 1]
        self.seed = torch.tensor(config.seed, dtype=torch.int64, device=device)
        self.eos = torch.tensor(self.eos_ids, dtype=torch.int64, device=device) if self.eos_ids else None
        self.generator: torch.Generator | None = None
        if config.do_sample and config.mode == "rejection":
            self.generator = torch.Generator(device=device)
        self.restart(prompt_lens, config.seed)

    def restart(self, prompt_lens: list[int], seed: int) -> None:
        """A new generation with these prompt lengths and seed (same rows, sampling settings and EOS ids)."""
        self.prompt_lens.copy_(torch.tensor(prompt_lens).unsqueeze(1))
        self.seed.fill_(seed)
        if self.generator is not None:
            self.generator.manual_seed(seed)

    def scores(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Processed and warped scores [B, q, V] for the tokens at absolute positions `targets` [B, q]."""
        if targets.shape[0] != self.prompt_lens.shape[0]:
            raise ValueError(f"selector built for {self.prompt_lens.shape[0]} rows, got {targets.shape[0]}")
        logits = mask_eos(logits, targets - self.prompt_lens, self.min_new_tokens, self.eos)
        return warp(logits, self.config) if self.config.do_sample else logits

    def probs(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.scores(logits.to(torch.float64) if self.config.do_sample else logits, targets).softmax(-1)

    def select(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Tokens [B, q]: greedy, exact (Gumbel-max keyed by target position) or a plain sample (rejection mode)."""
        kind = self.config.kind
        if kind == "greedy":
            return self.scores(logits, targets).argmax(-1)
        scores = self.scores(logits.to(torch.float64), targets)
        if kind == "exact":
            return (scores + gumbel_noise(self.seed, targets, scores.shape[-1])).argmax(-1)
        return self.sample(scores.softmax(-1))

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=self.generator).view(probs.shape[:-1])

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64, device=self.generator.device))


def accept_rejection(
    selector: TokenSelector, drafts: list[int], draft_probs: list[torch.Tensor], target_probs: torch.Tensor
) -> tuple[int, int]:
    """Speculative sampling for one row: (accepted drafts, the token emitted after them).

    draft_probs[i] is q_i [V], the distribution d_i was sampled from; target_probs [k+1, V] holds p_0 .. p_k.
    """
    for i, token in enumerate(drafts):
        p, q = target_probs[i], draft_probs[i]
        if selector.uniform() * float(q[token]) < float(p[token]):  # u < p/q, without dividing by zero
            continue
        residual = (p - q).clamp_min(0)
        total = residual.sum()
        fallback = p if float(total) <= 0 else residual / total
        return i, int(selector.sample(fallback.unsqueeze(0))[0])
    return len(drafts), int(selector.sample(target_probs[len(drafts)].unsqueeze(0))[0])
