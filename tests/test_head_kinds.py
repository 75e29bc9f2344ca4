"""Head kinds: the attention-only adapter head and trained heads over a draft vocabulary.

Each kind must (1) round-trip through a head file and be refused for another model, exit layer or architecture,
(2) keep EESD and PPSD (every backend) equal to AR, (3) keep its own KV right inside the decoders (every draft
logit equals the head over a teacher-forced pass of the final text) and (4) train: the streaming distiller lowers
its KL and, with a draft vocabulary, only ever proposes ids of that vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_heads import RecordingHead, _teacher_forced, compared_draft_logits
from tiny_models import TinySpec, tiny_model

from executor.adapter import ModelAdapter
from executor.api import generate
from executor.corpus import Record, RecordSource
from executor.decoding import TokenSink
from executor.heads import (
    ATTENTION_ARCHITECTURE,
    HEAD_ARCHITECTURE,
    AttentionExitHead,
    TrainedExitHead,
    head_class,
    load_head,
    read_head_file,
)
from executor.ppsd import decode_ppsd
from executor.train_head import (
    TrainConfig,
    corpus_records,
    distill_heads,
    generate_corpus,
    head_target,
    new_head,
)

SPEC = TinySpec(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, vocab=64, seed=5)
EXIT_LAYER = 2
HIDDEN = SPEC.num_heads * SPEC.head_dim
VOCAB = torch.tensor([7, 3, 11, 40, 2, 9, 33, 60, 1, 15, 22, 5, 50, 8, 26, 14], dtype=torch.int64)
KINDS = [("layer", None), ("attention", None), ("layer", VOCAB), ("attention", VOCAB)]
IDS = ["layer", "attention", "layer+vocab", "attention+vocab"]


def _prompts(count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SPEC.vocab, (5 + 2 * (i % 3),), generator=generator).tolist() for i in range(count)]


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return tiny_model(SPEC, torch.float64)


@pytest.fixture(scope="module")
def records(tiny) -> list[Record]:
    return corpus_records(generate_corpus(tiny, _prompts(16, seed=0), 20, None, progress=False))


@pytest.fixture(scope="module")
def trained(tiny, records, tmp_path_factory):
    """Every kind distilled for 30 steps on the tiny model's own continuations (streamed), with its eval rows."""
    heads = {}
    source = RecordSource.from_records(records)
    held = RecordSource.from_records(corpus_records(generate_corpus(tiny, _prompts(4, 9), 20, None, progress=False)))
    for (kind, vocab), name in zip(KINDS, IDS, strict=True):
        config = TrainConfig(exit_layer=EXIT_LAYER, steps=30, lr=3e-3, batch_size=4, window=32, eval_every=30,
                             head_kind=kind, schedule="cosine")  # fmt: skip
        out = tmp_path_factory.mktemp(name.replace("+", "_")) / "head.safetensors"
        torch.manual_seed(0)
        made, state = distill_heads(tiny, source, config, {EXIT_LAYER: out}, eval_source=held, progress=False,
                                    draft_vocab=vocab)  # fmt: skip
        heads[name] = (made[EXIT_LAYER].requires_grad_(False), state, out)
    return heads


@pytest.mark.parametrize("name", IDS)
def test_training_lowers_the_kl_of_every_kind(trained, name: str) -> None:
    _, state, _ = trained[name]
    first, last = sum(state.losses[:5]) / 5, sum(state.losses[-5:]) / 5
    assert last < 0.8 * first
    before, after = state.evals[0], state.evals[-1]
    assert after["kl"] < before["kl"]


def test_the_attention_head_has_no_mlp_and_a_quarter_of_the_weights(tiny) -> None:
    adapter = ModelAdapter(tiny)
    layer = TrainedExitHead(adapter, EXIT_LAYER)
    attention = AttentionExitHead(adapter, EXIT_LAYER)
    assert attention.layer.mlp is None and not any("mlp" in name for name in attention.state_dict())
    assert sum(p.numel() for p in attention.parameters()) < 0.5 * sum(p.numel() for p in layer.parameters())
    with pytest.raises(ValueError, match="head kind must be one of layer, attention"):
        head_class("mlp")


@pytest.mark.parametrize("name", IDS)
def test_head_files_round_trip_every_kind(trained, tiny, name: str) -> None:
    head, _, out = trained[name]
    tensors, metadata = read_head_file(out)
    kind = name.split("+")[0]
    assert metadata["head_architecture"] == (ATTENTION_ARCHITECTURE if kind == "attention" else HEAD_ARCHITECTURE)
    if "vocab" in name:
        assert tensors["token_ids"].dtype == torch.int64 and tensors["token_ids"].tolist() == VOCAB.tolist()
        assert metadata["draft_vocab_size"] == str(len(VOCAB)) and "draft_vocab_sha256" in metadata
    loaded = load_head(out, tiny, EXIT_LAYER)
    assert type(loaded) is type(head) and loaded.draft_vocab == head.draft_vocab
    hidden = torch.randn(2, 5, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = head.forward_sequences(hidden)
    torch.testing.assert_close(loaded.forward_sequences(hidden), expected, rtol=1e-2, atol=1e-2)  # bf16 file


def test_a_file_of_one_kind_is_refused_as_another(trained, tiny, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from executor.heads import head_checksum

    _, _, out = trained["attention"]
    tensors, metadata = read_head_file(out)
    metadata = {**metadata, "head_architecture": HEAD_ARCHITECTURE}
    metadata["checksum"] = head_checksum(tensors, metadata)
    save_file(tensors, str(tmp_path / "odd.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_head(tmp_path / "odd.safetensors", tiny)
    with pytest.raises(ValueError, match="trained for exit layer 2, not 1"):
        load_head(out, tiny, 1)
    other = tiny_model(TinySpec(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, vocab=64, seed=6), torch.float64)
    with pytest.raises(ValueError, match="made for another model"):
        load_head(out, other)


@pytest.mark.parametrize("name", IDS)
def test_eesd_and_ppsd_with_every_kind_equal_ar(trained, tiny, name: str) -> None:
    head, _, out = trained[name]
    for prompt in _prompts(3, seed=4):
        ar = generate(tiny, prompt, method="ar", max_new_tokens=20).sequences.tolist()
        for draft_len in (1, 4):
            eesd = generate(tiny, prompt, method="eesd", exit_layer=EXIT_LAYER, draft_len=draft_len, head=head,
                            max_new_tokens=20)  # fmt: skip
            assert eesd.sequences.tolist() == ar
        ppsd = generate(tiny, prompt, method="ppsd", stages=2, head=str(out), max_new_tokens=20)
        assert ppsd.sequences.tolist() == ar


@pytest.mark.parametrize("name", ["attention+vocab"])
def test_distributed_ppsd_sends_the_head_kind(trained, tiny, name: str) -> None:
    head, _, _ = trained[name]
    prompt = [3, 14, 15, 9, 26]
    ar = generate(tiny, prompt, method="ar", max_new_tokens=16).sequences[0, len(prompt) :].tolist()
    sink = TokenSink(16, ())
    decode_ppsd(ModelAdapter(tiny), prompt, sink, None, head=head, stages=2, backend="distributed")
    assert sink.tokens == ar


@pytest.mark.parametrize("name", ["attention", "attention+vocab"])
def test_attention_head_kv_inside_eesd_equals_teacher_forced(trained, tiny, name: str) -> None:
    head = trained[name][0]
    prompt = [5, 9, 1, 33, 2, 7]
    recorder = RecordingHead(head)
    result = generate(tiny, prompt, method="eesd", exit_layer=EXIT_LAYER, draft_len=3, max_new_tokens=24,
                      head=recorder)  # fmt: skip
    states, reference = _teacher_forced(head, prompt + result.sequences[0, len(prompt) :].tolist())
    compared = compared_draft_logits(recorder, 0, states, reference)
    assert compared >= sum(1 for drafted in result.stats.drafted if drafted)


@pytest.mark.parametrize("kind", ["layer", "attention"])
def test_training_runs_the_head_layer_causally_as_decoding_runs_it_through_a_cache(tiny, kind: str) -> None:
    """`layer_sequences` (causal attention, no cache: what training runs) equals the cache path decoding runs, in
    value and in the gradients it gives the head's weights (float64, GQA: 4 query heads over 2 KV heads)."""
    adapter = ModelAdapter(tiny)
    head = head_class(kind)(adapter, EXIT_LAYER)
    hidden = torch.randn(3, 11, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = []
    for run in (head.layer_sequences, head.cached_sequences):
        head.zero_grad()
        out = run(hidden)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}))
    (causal, causal_grads), (cached, cached_grads) = grads
    torch.testing.assert_close(causal, cached, rtol=1e-12, atol=1e-12)
    assert causal_grads.keys() == cached_grads.keys() and any("q_proj" in n for n in causal_grads)
    for name, grad in causal_grads.items():
        torch.testing.assert_close(grad, cached_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_a_draft_vocabulary_head_proposes_only_its_ids(trained) -> None:
    head = trained["layer+vocab"][0]
    hidden = torch.randn(3, 7, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    logits = head.forward_sequences(hidden)
    allowed = torch.zeros(SPEC.vocab, dtype=torch.bool)
    allowed[VOCAB] = True
    assert torch.isinf(logits[..., ~allowed]).all() and torch.isfinite(logits[..., allowed]).all()
    assert allowed[logits.argmax(-1)].all()


def test_the_target_of_a_draft_vocabulary_is_the_full_distribution_renormalised_over_it(trained) -> None:
    head = trained["layer+vocab"][0]
    full = torch.randn(4, SPEC.vocab, dtype=torch.float64).log_softmax(-1)
    target = head_target(head, full)
    expected = full.exp()[:, VOCAB] / full.exp()[:, VOCAB].sum(-1, keepdim=True)
    torch.testing.assert_close(target.exp(), expected)


def test_a_shared_draft_vocabulary_teacher_scores_only_its_rows_and_gives_the_same_loss(
    trained, records, monkeypatch
) -> None:
    """With one draft vocabulary for every head the teacher projects onto its rows alone; the loss is the one the
    vocabulary-wide teacher renormalised over the subset gives."""
    import copy

    import executor.train_head as train_head
    from executor.corpus import epoch_batches

    heads = {EXIT_LAYER: copy.deepcopy(trained["layer+vocab"][0]).requires_grad_(True)}
    assert torch.equal(train_head.shared_draft_vocab(heads), VOCAB)
    batch = next(iter(epoch_batches(RecordSource.from_records(records), 4, 32, 0, 0)))
    teacher = train_head.teacher_batch(heads[EXIT_LAYER].adapter, batch, [EXIT_LAYER])
    subset = train_head.distill_batch(heads, teacher, 1024)
    monkeypatch.setattr(train_head, "shared_draft_vocab", lambda _: None)
    full = train_head.distill_batch(heads, teacher, 1024)
    assert subset[EXIT_LAYER] == pytest.approx(full[EXIT_LAYER], rel=1e-3)  # float32 targets: rounding only


def test_a_head_started_from_another_layer_records_it_and_stays_lossless(tiny, records, tmp_path: Path) -> None:
    adapter = ModelAdapter(tiny)
    last = new_head(adapter, EXIT_LAYER, init_layer="last")
    assert last.init_layer == SPEC.num_layers - 1 and new_head(adapter, EXIT_LAYER, init_layer="1").init_layer == 1
    expected = adapter.layers[SPEC.num_layers - 1].state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in last.layer.state_dict().items())
    for bad in ("first", str(SPEC.num_layers)):
        with pytest.raises(ValueError, match="init_layer"):
            new_head(adapter, EXIT_LAYER, init_layer=bad) if bad.isdigit() else TrainConfig(1, init_layer=bad)
    config = TrainConfig(exit_layer=EXIT_LAYER, steps=4, lr=3e-3, window=32, init_layer="last")
    out = tmp_path / "head.safetensors"
    distill_heads(tiny, RecordSource.from_records(records), config, {EXIT_LAYER: out}, progress=False)
    loaded = load_head(out, tiny, EXIT_LAYER)
    assert read_head_file(out)[1]["init_layer"] == str(SPEC.num_layers - 1) and loaded.init_layer == SPEC.num_layers - 1
    for prompt in _prompts(2, seed=3):
        ar = generate(tiny, prompt, method="ar", max_new_tokens=16).sequences.tolist()
        eesd = generate(tiny, prompt, method="eesd", head=loaded, draft_len=3, max_new_tokens=16)
        assert eesd.sequences.tolist() == ar


@pytest.mark.parametrize("name", IDS)
def test_a_retargeted_head_keeps_its_weights_and_drafts_over_the_new_vocabulary(trained, tiny, name: str) -> None:
    """`retargeted`: the same layer and norm over another draft vocabulary (or the whole one): its logits are the
    old head's full-vocabulary logits on the new ids, -inf elsewhere; EESD and PPSD with it still equal AR."""
    from executor.heads import retargeted

    head = trained[name][0]
    whole = retargeted(head, None)
    other = torch.tensor([4, 7, 12, 30, 31, 63, 0], dtype=torch.int64)
    narrow = retargeted(head, other)
    assert type(whole) is type(head) and whole.draft_vocab is None and narrow.draft_vocab == len(other)
    assert (whole.exit_layer, whole.init_layer) == (head.exit_layer, head.init_layer)
    own = {k: v for k, v in head.state_dict().items() if k != "token_ids"}
    assert all(torch.equal(value, own[key]) for key, value in whole.state_dict().items())
    hidden = torch.randn(2, 6, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    full = whole.forward_sequences(hidden)
    logits = narrow.forward_sequences(hidden)
    outside = torch.ones(SPEC.vocab, dtype=torch.bool)
    outside[other] = False
    torch.testing.assert_close(logits[..., other], full[..., other])
    assert torch.isinf(logits[..., outside]).all()
    for prompt in _prompts(2, seed=8):
        ar = generate(tiny, prompt, method="ar", max_new_tokens=16).sequences.tolist()
        for draft in (whole, narrow):
            eesd = generate(tiny, prompt, method="eesd", head=draft, draft_len=3, max_new_tokens=16)
            assert eesd.sequences.tolist() == ar
        assert generate(tiny, prompt, method="ppsd", stages=2, head=narrow, max_new_tokens=16).sequences.tolist() == ar
    with pytest.raises(ValueError, match="distinct int64 token ids"):
        retargeted(head, torch.tensor([1, 1, 2]))


def test_training_from_initial_heads_starts_at_their_weights(trained, tiny, records, tmp_path: Path) -> None:
    """`distill_heads(init_heads=...)` starts from the given heads (over the run's draft vocabulary), not from a model
    layer; a head of another kind or exit layer is refused."""
    from executor.train_head import starting_heads

    adapter = ModelAdapter(tiny)
    head = trained["layer"][0]
    config = TrainConfig(exit_layer=EXIT_LAYER, steps=1, lr=1e-9, window=32)
    start = starting_heads(adapter, config, VOCAB, {EXIT_LAYER: head})[EXIT_LAYER]
    assert start.draft_vocab == len(VOCAB) and start is not head
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in start.state_dict().items() if k != "token_ids")
    out = tmp_path / "again.safetensors"
    made, _ = distill_heads(tiny, RecordSource.from_records(records), config, {EXIT_LAYER: out}, progress=False,
                            init_heads={EXIT_LAYER: head})  # fmt: skip
    moved = max((made[EXIT_LAYER].state_dict()[k] - v).abs().max().item() for k, v in head.state_dict().items())
    assert moved < 1e-6  # one step at lr 1e-9 from the initial head, not from layer 2's copy
    fresh = new_head(adapter, EXIT_LAYER)
    assert max((fresh.state_dict()[k] - v).abs().max().item() for k, v in head.state_dict().items()) > 1e-3
    with pytest.raises(ValueError, match="'attention' head"):
        starting_heads(adapter, config, None, {EXIT_LAYER: trained["attention"][0]})
    with pytest.raises(ValueError, match="exit layers"):
        starting_heads(adapter, TrainConfig(exit_layer=1, steps=1), None, {EXIT_LAYER: head})
