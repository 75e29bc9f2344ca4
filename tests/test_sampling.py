"""Sampling: exact mode reproduces seeded AR sampling token for token; rejection mode preserves the distribution."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import TinySpec, scale_late_layers, tiny_model, tiny_specs

import executor
from executor.sampling import (
    DRAFT_SALT,
    SamplingConfig,
    TokenSelector,
    gumbel_noise,
    penalize,
    warp,
)
from executor.verify import rejection_verdicts

POLICIES = ["fixed:3", "heuristic", "confidence:0.3", "beta-ts", "calibration-ts"]


@st.composite
def sampling_cases(draw):
    spec = draw(tiny_specs(min_layers=2, max_layers=5))
    exit_layer = draw(st.integers(1, spec.num_layers - 1))
    model = scale_late_layers(tiny_model(spec), exit_layer, draw(st.sampled_from([0.0, 0.05, 1.0])))
    prompt = draw(st.lists(st.integers(0, spec.vocab - 1), min_size=1, max_size=16))
    options = dict(
        temperature=draw(st.sampled_from([0.3, 0.7, 1.0, 1.5])),
        top_k=draw(st.sampled_from([None, 0, 1, 5, 50])),
        top_p=draw(st.sampled_from([None, 0.5, 0.9, 1.0])),
        min_p=draw(st.sampled_from([None, 0.0, 0.05, 0.3])),
        repetition_penalty=draw(st.sampled_from([None, 1.0, 0.8, 1.3])),
        seed=draw(st.integers(0, 2**20)),
        max_new_tokens=draw(st.integers(1, 30)),
    )
    return model, exit_layer, prompt, options


@given(case=sampling_cases(), policy=st.sampled_from(POLICIES), draft_len=st.integers(1, 6))
def test_exact_sampling_eesd_equals_ar(case, policy, draft_len):
    model, exit_layer, prompt, options = case
    ar = executor.generate(model, prompt, method="ar", do_sample=True, **options)
    eesd = executor.generate(
        model, prompt, method="eesd", exit_layer=exit_layer, draft_len=draft_len, policy=policy, do_sample=True,
        **options,
    )  # fmt: skip
    assert eesd.sequences.tolist() == ar.sequences.tolist()


@given(case=sampling_cases(), policy=st.sampled_from(POLICIES))
def test_greedy_equality_for_every_policy(case, policy):
    model, exit_layer, prompt, options = case
    ar = executor.generate(model, prompt, method="ar", max_new_tokens=options["max_new_tokens"])
    eesd = executor.generate(
        model, prompt, method="eesd", exit_layer=exit_layer, policy=policy, max_new_tokens=options["max_new_tokens"]
    )
    assert eesd.sequences.tolist() == ar.sequences.tolist()


def test_exact_sampling_depends_on_seed_and_samples():
    """Not secretly greedy: different seeds give different outputs, and neither is the greedy one."""
    model = tiny_model(TinySpec(vocab=64, seed=5))
    outputs = {
        tuple(executor.generate(model, [1, 2], do_sample=True, seed=s, max_new_tokens=20).sequences[0].tolist())
        for s in range(4)
    }
    greedy = tuple(executor.generate(model, [1, 2], max_new_tokens=20).sequences[0].tolist())
    assert len(outputs) == 4 and greedy not in outputs


def test_gumbel_noise_is_a_pure_function_of_seed_and_position():
    positions = torch.tensor([[3, 4, 5]])
    noise = gumbel_noise(7, positions, 11)
    assert torch.equal(noise, gumbel_noise(7, positions, 11))
    assert torch.equal(noise[0, 1], gumbel_noise(7, torch.tensor([[4]]), 11)[0, 0])
    assert not torch.equal(noise, gumbel_noise(8, positions, 11))
    assert noise.shape == (1, 3, 11) and torch.isfinite(noise).all()


def test_exact_sampling_follows_the_distribution():
    """Gumbel-max over many positions: token frequencies match softmax(logits) (chi-square, df = 4)."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0], dtype=torch.float64)
    n = 20000
    selector = TokenSelector(SamplingConfig(do_sample=True, seed=3), [0], 0, [], "cpu")
    tokens = selector.select(logits.expand(1, n, 5), torch.arange(n).unsqueeze(0))[0]
    counts = torch.bincount(tokens, minlength=5).double()
    expected = n * logits.softmax(-1)
    assert float(((counts - expected) ** 2 / expected).sum()) < 18.47  # chi2(df=4) 0.999 quantile


def test_warp_matches_hf_warpers():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    scores = torch.randn(3, 40, dtype=torch.float64)
    config = SamplingConfig(do_sample=True, temperature=0.7, top_k=12, top_p=0.8)
    expected = scores
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(12), TopPLogitsWarper(0.8)):
        expected = warper(None, expected)
    assert torch.equal(warp(scores, config), expected)
    for min_p in (0.0, 0.1, 0.5, 1.0):  # after temperature and top-p, as HF orders them
        config = SamplingConfig(do_sample=True, temperature=0.7, top_p=0.9, min_p=min_p)
        expected = scores
        for warper in (TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9), MinPLogitsWarper(min_p)):
            expected = warper(None, expected)
        assert torch.equal(warp(scores, config), expected)


# --- rejection sampling: distribution preservation, with a test that has power ------------------------------

VOCAB = 6
CHI2_DF5_999 = 20.52  # chi-square, df = 5, 0.999 quantile
TARGET = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05], dtype=torch.float64)
DRAFT = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.20, 0.30], dtype=torch.float64)


def first_token_counts(target: torch.Tensor, draft_used: torch.Tensor, draft_claimed: torch.Tensor, n: int):
    """Draw a draft from `draft_used`, verify it as if it came from `draft_claimed`; count the first token.

    The n trials are n rows at n different positions: their keyed noise streams are independent."""
    selector = TokenSelector(SamplingConfig(do_sample=True, mode="rejection", seed=11), [0] * n, 0, [], "cpu")
    targets = torch.arange(0, 2 * n, 2).unsqueeze(1) + torch.arange(2)  # [n, 2]: the draft's position, the bonus's
    drafts = selector.sample(draft_used.expand(n, 1, VOCAB), targets[:, :1], DRAFT_SALT)  # [n, 1]
    counts = torch.ones(n, dtype=torch.long)
    accepted, token = rejection_verdicts(
        selector, drafts, draft_claimed.expand(n, 1, VOCAB), target.expand(n, 2, VOCAB), counts, targets
    )
    first = torch.where(accepted > 0, drafts[:, 0], token)
    return torch.bincount(first, minlength=VOCAB).to(torch.float64)


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 0.0) -> float:
    """Pearson's statistic; cells expecting fewer than `min_expected` counts are merged into one."""
    expected = counts.sum() * probs
    small = expected < min_expected
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_preserves_the_target():
    counts = first_token_counts(TARGET, DRAFT, DRAFT, 20000)
    assert chi_square(counts, TARGET) < CHI2_DF5_999


def test_rejection_sampling_with_top_k_on_both_sides():
    """top-k warps p and q alike; the first token follows the warped target."""
    config = SamplingConfig(do_sample=True, mode="rejection", top_k=3)
    target = warp(TARGET.log(), config).softmax(-1)
    draft = warp(DRAFT.log() + 0.3 * torch.arange(VOCAB), config).softmax(-1)
    counts = first_token_counts(target, draft, draft, 20000)
    assert counts[target == 0].sum() == 0
    kept = target > 0
    assert chi_square(counts[kept], target[kept]) < 13.82  # df = 2, 0.999 quantile


def test_a_rows_surplus_drafts_are_never_used():
    """A row that drafted fewer tokens than the pass holds (counts < k, in a batch or after its policy stopped): its
    surplus drafts are never accepted, and its token after them is the bonus drawn from p itself, not a residual."""
    n = 20000
    selector = TokenSelector(SamplingConfig(do_sample=True, mode="rejection", seed=3), [0] * n, 0, [], "cpu")
    targets = torch.arange(0, 2 * n, 2).unsqueeze(1) + torch.arange(2)
    drafts = selector.sample(DRAFT.expand(n, 1, VOCAB), targets[:, :1], DRAFT_SALT)
    counts = torch.zeros(n, dtype=torch.long)  # no own draft: the draft in the pass is surplus
    accepted, token = rejection_verdicts(
        selector, drafts, DRAFT.expand(n, 1, VOCAB), TARGET.expand(n, 2, VOCAB), counts, targets
    )
    assert int(accepted.max()) == 0
    assert chi_square(torch.bincount(token, minlength=VOCAB).to(torch.float64), TARGET) < CHI2_DF5_999


def test_the_chi_square_check_has_power():
    """A verifier told the wrong draft distribution (HF #47932's bug) fails the same check."""
    counts = first_token_counts(TARGET, DRAFT, TARGET, 20000)
    assert chi_square(counts, TARGET) > CHI2_DF5_999


def test_rejection_mode_end_to_end_runs_and_emits_valid_tokens():
    model = scale_late_layers(tiny_model(TinySpec(vocab=50)), 2, 0.05)
    result = executor.generate(
        model, [1, 2, 3], method="eesd", exit_layer=2, do_sample=True, sampling="rejection", top_k=10,
        max_new_tokens=40, seed=1,
    )  # fmt: skip
    assert result.sequences.shape == (1, 43)
    assert sum(result.stats.accepted) > 0


@pytest.mark.parametrize(("penalty", "draft_dtype"), [(None, None), (3.0, None), (None, "bfloat16")])
def test_rejection_sampling_end_to_end_joint_distribution(penalty, draft_dtype):
    """The whole EESD path: (first, second) new tokens follow the full model's joint distribution.

    With max_new_tokens=3 the second token is decided by a real draft + verify round (accepted draft or the
    residual resample), so this checks the rejection path end to end, chi-square over the 16 cells. With a
    repetition penalty, each distribution is the penalised one over its own context (the prompt, then also the
    first token): the draft's q and the verify pass's p must each see the right one. With bfloat16 drafts of the
    float64 model, q is the bfloat16 copy's distribution, the one each draft was drawn from.
    """
    vocab, n, temperature = 4, 3000, 1.0
    model = tiny_model(TinySpec(vocab=vocab, num_layers=2, seed=2))
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)  # peaked distributions, and the exit head's q differs from p
    prompt = [1, 2, 2]

    def dist(context: list[int]) -> torch.Tensor:
        logits = model(torch.tensor([context])).logits[0, -1].double()
        if penalty is not None:
            seen = torch.zeros(vocab, dtype=torch.bool)
            seen[context] = True
            logits = penalize(logits, seen, penalty)
        return (logits / temperature).softmax(-1)

    with torch.no_grad():
        first = dist(prompt)
        second = torch.stack([dist(prompt + [t]) for t in range(vocab)])
    joint = (first.unsqueeze(1) * second).flatten()
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    drafted = accepted = 0
    for seed in range(n):
        out = executor.generate(
            model, prompt, method="eesd", exit_layer=1, do_sample=True, sampling="rejection", max_new_tokens=3,
            seed=seed, temperature=temperature, draft_len=1, repetition_penalty=penalty, draft_dtype=draft_dtype,
        )  # fmt: skip
        t1, t2 = out.sequences[0, 3:5].tolist()
        counts[t1 * vocab + t2] += 1
        drafted += sum(out.stats.drafted)
        accepted += sum(out.stats.accepted)
    assert drafted == n  # every run verified one draft for the second token
    assert 0 < accepted < n  # both accepted drafts and residual resamples happened
    assert chi_square(counts, joint, min_expected=5) < 37.7  # df <= 15, 0.999 quantile


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=0), dict(top_k=-1), dict(top_p=0.0), dict(min_p=1.5), dict(sampling="nucleus"),
        dict(repetition_penalty=0.0), dict(repetition_penalty=1.2, method="ppsd", sampling="rejection"),
        dict(repetition_penalty=1.2, method="eesd", accept_pattern=0.5),
    ],
)  # fmt: skip
def test_bad_sampling_arguments(bad):
    model = tiny_model(TinySpec())
    with pytest.raises(ValueError, match="temperature|top_k|top_p|min_p|sampling|repetition_penalty"):
        executor.generate(model, [1], do_sample=True, **bad)
