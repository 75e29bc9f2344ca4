"""Trained exit heads: file format and refusals, self-distillation, and EESD with a trained head == AR.

The KV check: a trained head has a decoder layer of its own whose KV the decoder keeps through `prefill` and
`__call__`. A wrong KV would not break losslessness (the full model verifies), only acceptance, so it is tested
directly: every draft logit computed inside EESD from a committed token's state must equal the head applied to a
teacher-forced pass over the final text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from packages import requires_smollm2
from tiny_models import TinySpec, assert_same_or_tie, hf_greedy, tiny_model

import executor
from executor.adapter import ModelAdapter, Step
from executor.api import generate
from executor.decoding import TokenSink
from executor.heads import TrainedExitHead, load_head, model_fingerprint, resolve_head, save_head
from executor.train_head import (
    TrainConfig,
    TrainState,
    agreement,
    distill_loss,
    draft_logits,
    generate_corpus,
    make_optimizer,
    shared_logits,
    teacher_examples,
    train,
    train_head_file,
)

FLOAT32_TIE_TOL = 1e-5
SPEC = TinySpec(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, vocab=64, seed=3)
EXIT_LAYER = 2
SHIPPED_HEAD = Path(__file__).resolve().parents[1] / "heads" / "smollm2-135m-e15.safetensors"


def _prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(5 + 3 * (i % 4)),), generator=generator).tolist() for i in range(count)]


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return tiny_model(SPEC, torch.float64)


@pytest.fixture(scope="module")
def trained(tiny):
    """A head trained for 60 steps on the tiny model's own continuations, with its KL curve and examples."""
    adapter = ModelAdapter(tiny)
    corpus = generate_corpus(tiny, _prompts(24, SPEC.vocab), 24, None, progress=False)
    examples = teacher_examples(adapter, corpus, [EXIT_LAYER], progress=False)
    head = TrainedExitHead(adapter, EXIT_LAYER)
    before = agreement(lambda ex: draft_logits(head, ex), examples)
    config = TrainConfig(exit_layer=EXIT_LAYER, steps=60, lr=3e-3, batch_size=8)
    state = train(head, examples, config, make_optimizer(head, config.lr), TrainState(), progress=False)
    return head.requires_grad_(False), state, examples, before


def test_training_lowers_kl_and_raises_agreement(trained) -> None:
    head, state, examples, before = trained
    with torch.no_grad():
        kl_after = float(distill_loss(head, examples))
    assert sum(state.losses[-5:]) / 5 < 0.5 * sum(state.losses[:5]) / 5, state.losses
    assert kl_after < state.losses[0]
    after = agreement(lambda ex: draft_logits(head, ex), examples)
    assert after > before + 0.1, (before, after)
    assert after > agreement(shared_logits(head.adapter, EXIT_LAYER), examples)


def test_head_file_round_trip(trained, tiny, tmp_path: Path) -> None:
    head = trained[0]
    path = save_head(head, tmp_path / "h.safetensors", dtype=torch.float64, info={"steps": 60, "dtype": "x"})
    loaded = load_head(path, tiny, EXIT_LAYER)
    for name, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert loaded.metadata["steps"] == "60" and loaded.metadata["exit_layer"] == str(EXIT_LAYER)
    assert loaded.metadata["dtype"] == "float64"  # info never overrides the format's own fields
    assert loaded.metadata["model_fingerprint"] == model_fingerprint(tiny)
    assert load_head(path, tiny).exit_layer == EXIT_LAYER  # exit layer taken from the file
    assert isinstance(resolve_head(str(path), ModelAdapter(tiny), EXIT_LAYER), TrainedExitHead)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_drop_in_generator_loads_a_head_file_once(trained, tiny, tmp_path: Path) -> None:
    """The drop-in keeps one head object (captured passes are keyed by it) and decodes like AR with it."""
    path = save_head(trained[0], tmp_path / "h.safetensors", dtype=torch.float64)
    generator = executor.EarlyExitGenerator(tiny, method="eesd", head=str(path), draft_len=3)
    assert isinstance(generator.head, TrainedExitHead) and generator.head.exit_layer == EXIT_LAYER
    ids = torch.tensor([[3, 9, 27, 1]])
    first = generator.generate(ids, max_new_tokens=10)
    head = generator.head
    assert generator.generate(ids, max_new_tokens=10).tolist() == first.tolist() and generator.head is head
    reference = executor.generate(tiny, ids, method="ar", max_new_tokens=10).sequences
    assert first.tolist() == reference.tolist()


def test_loading_a_head_file_leaves_torchs_random_state_alone(trained, tiny, tmp_path: Path) -> None:
    """Seeding and then building a generator with a head file samples what building it and then seeding does: the
    head's layers, built before its weights load, draw nothing from the caller's random state."""
    path = save_head(trained[0], tmp_path / "h.safetensors", dtype=torch.float64)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    executor.EarlyExitGenerator(tiny, method="eesd", head=str(path), draft_len=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_generate_with_a_head_path_loads_it_once_and_reuses_its_passes(trained, tmp_path: Path) -> None:
    """`generate(head=PATH)` call after call (as `eesd validate` runs each prompt) gets one head object per model and
    file, so captured passes (keyed by the head) are built once, even after fusing the projections moved the model's
    weights; a rewritten file is loaded anew, another exit layer is another head."""
    import os

    from executor.heads import resolve_head

    model = tiny_model(SPEC, torch.float32)
    path = save_head(trained[0], tmp_path / "h.safetensors", dtype=torch.float32)
    first = resolve_head(str(path), ModelAdapter(model), EXIT_LAYER)
    assert resolve_head(path, ModelAdapter(model), EXIT_LAYER) is first
    sets = []
    for ids in ([[3, 9, 27, 1]], [[5, 2, 8]], [[7, 7, 1, 4, 2]]):
        executor.generate(model, torch.tensor(ids), method="eesd", head=str(path), policy="fixed:2",
                          max_new_tokens=6, capture="compile")  # fmt: skip
        sets.append(list(model.__dict__["_eesd_passes"].values()))
    assert len(sets[-1]) == 1 and sets[0][0] is sets[-1][0]  # one set of passes, the first
    assert resolve_head(str(path), ModelAdapter(model), EXIT_LAYER) is first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert resolve_head(str(path), ModelAdapter(model), EXIT_LAYER) is not first
    assert resolve_head(str(path), ModelAdapter(tiny_model(SPEC, torch.float32)), EXIT_LAYER) is not first


def test_fingerprint_ignores_dtype_but_not_weights(tiny) -> None:
    assert model_fingerprint(tiny) == model_fingerprint(tiny_model(SPEC, torch.float32))
    assert model_fingerprint(tiny) != model_fingerprint(tiny_model(TinySpec(**{**SPEC.__dict__, "seed": 4})))


def test_wrong_model_or_exit_layer_refused(trained, tiny, tmp_path: Path) -> None:
    path = save_head(trained[0], tmp_path / "h.safetensors")
    other = tiny_model(TinySpec(**{**SPEC.__dict__, "seed": 9}))
    with pytest.raises(ValueError, match=r"h\.safetensors was made for another model"):
        load_head(path, other, EXIT_LAYER)
    with pytest.raises(ValueError, match=rf"h\.safetensors was trained for exit layer {EXIT_LAYER}, not 1"):
        load_head(path, tiny, 1)
    with pytest.raises(ValueError, match="trained for exit layer"):
        generate(tiny, [1, 2, 3], method="eesd", exit_layer=3, head=str(path), max_new_tokens=2)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupt_or_truncated_file_refused(trained, tiny, tmp_path: Path, damage: str) -> None:
    path = save_head(trained[0], tmp_path / "bad.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x40  # inside the last tensor's bytes: only the checksum can tell
    elif damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "garbage":
        data = bytearray(b"not a safetensors file at all" * 10)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.safetensors is corrupt"):
        load_head(path, tiny, EXIT_LAYER)


def test_a_training_checkpoint_given_as_a_head_names_the_head_file(tiny, tmp_path: Path) -> None:
    checkpoint = tmp_path / "h.safetensors.ckpt"
    checkpoint.write_bytes(b"\x80\x02 a torch pickle")
    with pytest.raises(ValueError, match=r"\.ckpt is a training checkpoint .*the head file .*h\.safetensors "):
        load_head(checkpoint, tiny, EXIT_LAYER)


def _edit_header(path: Path, old: bytes, new: bytes) -> None:
    """Replace bytes in a safetensors header in place (same length: the file stays well-formed)."""
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def test_edited_metadata_is_caught_by_the_checksum(trained, tiny, tmp_path: Path) -> None:
    path = save_head(trained[0], tmp_path / "edited.safetensors")
    _edit_header(path, f'"exit_layer":"{EXIT_LAYER}"'.encode(), b'"exit_layer":"1"')
    with pytest.raises(ValueError, match=r"edited\.safetensors is corrupt or was edited: its tensors and metadata"):
        load_head(path, tiny)


def test_a_head_without_a_checksum_says_so(trained, tiny, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from executor.heads import read_head_file

    tensors, metadata = read_head_file(save_head(trained[0], tmp_path / "h.safetensors"))
    del metadata["checksum"]
    save_file(tensors, tmp_path / "unsealed.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=r"unsealed\.safetensors has no checksum in its metadata"):
        load_head(tmp_path / "unsealed.safetensors", tiny)


def _resealed(path: Path, out: Path, **fields: str) -> Path:
    """The head in `path` with metadata `fields` changed and a checksum that matches (a consistent, wrong file)."""
    from safetensors.torch import save_file

    from executor.heads import head_checksum, read_head_file

    tensors, metadata = read_head_file(path)
    metadata = {**metadata, **fields}
    save_file(tensors, out, metadata={**metadata, "checksum": head_checksum(tensors, metadata)})
    return out


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"exit_layer": "two"}, r"metadata exit_layer='two' is not a layer index"),
        ({"exit_layer": "4"}, r"metadata exit_layer=4 is outside \[1, 3\]"),
        ({"exit_layer": "0"}, r"metadata exit_layer=0 is outside \[1, 3\]"),
        ({"init_layer": "-1"}, r"metadata init_layer=-1 is outside \[0, 3\]"),
        ({"init_layer": ""}, r"metadata init_layer='' is not a layer index"),
        ({"head_architecture": "mlp"}, r"unknown head_architecture 'mlp'"),
        ({"format_version": "3"}, r"unsupported format version '3'"),
    ],
)
def test_sealed_but_unparsable_metadata_is_refused_naming_file_and_field(trained, tiny, tmp_path, fields, message):
    path = _resealed(save_head(trained[0], tmp_path / "h.safetensors"), tmp_path / "odd.safetensors", **fields)
    with pytest.raises(ValueError, match=rf"odd\.safetensors.*{message}"):
        load_head(path, tiny)


def test_format_version_1_loads_with_its_tensors_checked_and_reseals(trained, tiny, tmp_path: Path) -> None:
    """Version 1 (the checksum over the tensors only): still read, its tensors checked; `reseal_head_file` rewrites
    it as version 2 with the same tensors, byte for byte."""
    from safetensors.torch import save_file

    from executor.heads import read_head_file, reseal_head_file, tensors_checksum

    tensors, metadata = read_head_file(save_head(trained[0], tmp_path / "h.safetensors"))
    old = tmp_path / "v1.safetensors"
    save_file(tensors, old, metadata={**metadata, "format_version": "1", "checksum": tensors_checksum(tensors)})
    assert load_head(old, tiny).exit_layer == EXIT_LAYER
    reseal_head_file(old)
    again, resealed = read_head_file(old)
    assert all(torch.equal(again[name], tensors[name]) for name in tensors) and again.keys() == tensors.keys()
    unchanged = {key: value for key, value in metadata.items() if key != "checksum"}
    assert {key: value for key, value in resealed.items() if key != "checksum"} == {**unchanged, "format_version": "2"}
    bad = tmp_path / "v1bad.safetensors"
    save_file(tensors, bad, metadata={**metadata, "format_version": "1", "checksum": "0" * 64})
    with pytest.raises(ValueError, match=r"v1bad\.safetensors is corrupt: its tensors do not match"):
        load_head(bad, tiny)


@pytest.mark.parametrize("path", sorted((SHIPPED_HEAD.parent).glob("*.safetensors")), ids=lambda p: p.name)
def test_shipped_heads_are_sealed_with_their_metadata(path: Path) -> None:
    from executor.heads import HEAD_FORMAT_VERSION, read_head_file

    _, metadata = read_head_file(path)  # the checksum checked over tensors and metadata
    assert metadata["format_version"] == HEAD_FORMAT_VERSION
    assert read_head_file(str(path))[1] == metadata  # a path given as a string reads the same


def test_missing_file_and_bad_head_name(tiny) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_head("nope.safetensors", tiny)
    with pytest.raises(ValueError, match="head must be"):
        generate(tiny, [1, 2], method="eesd", exit_layer=2, head="fancy", max_new_tokens=2)


class RecordingHead:
    """Wraps a head and records every draft call: positions, input states and the logits it returned."""

    extra_layers = 1

    def __init__(self, head: TrainedExitHead) -> None:
        self.head = head
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, hidden: torch.Tensor, step: Step, cache) -> torch.Tensor:
        logits = self.head(hidden, step, cache)
        self.calls.append((step.positions.clone(), hidden.clone(), logits.clone()))
        return logits

    def prefill(self, hidden: torch.Tensor, step: Step, cache) -> None:
        self.head.prefill(hidden, step, cache)


def _teacher_forced(head: TrainedExitHead, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit-layer states [T, d] and the head's draft logits [T, V] over `tokens`, in one teacher-forced pass."""
    adapter = head.adapter
    cache = adapter.new_cache(1, len(tokens))
    hidden = adapter.embed(torch.tensor([tokens]))
    states = adapter.forward_layers(hidden, Step.at(0, len(tokens), adapter.device), cache, 0, head.exit_layer)
    return states[0], head.forward_sequences(states)[0]


def compared_draft_logits(recorder: RecordingHead, row: int, states: torch.Tensor, reference: torch.Tensor) -> int:
    """How many of the recorded draft logits of `row` were made from a committed token's state: each must equal the
    teacher-forced head's logits there (`_teacher_forced`), else an assertion fails."""
    compared = 0
    for positions, hidden, logits in recorder.calls:
        position = int(positions[row, 0])
        if position < len(states) and torch.allclose(hidden[row, 0], states[position], atol=1e-10):
            torch.testing.assert_close(logits[row, 0], reference[position], rtol=1e-9, atol=1e-9)
            compared += 1
    return compared


def test_draft_logits_inside_eesd_equal_teacher_forced_head(trained, tiny) -> None:
    head = trained[0]
    prompts = [[5, 9, 1, 33, 2, 7], [11, 4, 60, 3]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    recorder = RecordingHead(head)
    result = generate(tiny, ids, attention_mask=mask, method="eesd", exit_layer=EXIT_LAYER, draft_len=3,
                      max_new_tokens=30, head=recorder)  # fmt: skip
    assert sum(result.stats.accepted) > 0  # some drafts accepted: the rounds' KV really carried over
    compared = 0
    for row, prompt in enumerate(prompts):
        states, reference = _teacher_forced(head, prompt + result.sequences[row, width:].tolist())
        compared += compared_draft_logits(recorder, row, states, reference)
    assert compared >= sum(1 for drafted in result.stats.drafted if drafted)  # each drafting round's first step


def test_eesd_with_trained_head_equals_ar_float64(trained, tiny) -> None:
    head = trained[0]
    for prompt in _prompts(6, SPEC.vocab, seed=1):
        for draft_len in (1, 3, 6):
            ar = generate(tiny, prompt, method="ar", max_new_tokens=25)
            eesd = generate(tiny, prompt, method="eesd", exit_layer=EXIT_LAYER, draft_len=draft_len,
                            max_new_tokens=25, head=head)  # fmt: skip
            assert eesd.sequences.tolist() == ar.sequences.tolist()
            reference, _ = hf_greedy(tiny, prompt, 25)
            assert ar.sequences.tolist() == reference.tolist()


def test_train_head_file_writes_and_resumes(tiny, tmp_path: Path) -> None:
    out = tmp_path / "heads" / "tiny.safetensors"
    prompts = _prompts(8, SPEC.vocab, seed=2)
    config = TrainConfig(exit_layer=EXIT_LAYER, steps=6, lr=1e-3, batch_size=2, checkpoint_every=3)
    straight, _ = train_head_file(tiny, prompts, config, out, max_new_tokens=8, progress=False)
    half = TrainConfig(**{**config.__dict__, "steps": 3})
    train_head_file(tiny, prompts, half, tmp_path / "r.safetensors", max_new_tokens=8, progress=False)
    resumed, state = train_head_file(tiny, prompts, config, tmp_path / "r.safetensors", max_new_tokens=8,
                                     resume=True, progress=False)  # fmt: skip
    assert state.step == 6 and len(state.losses) == 6
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-6, atol=1e-9)
    loaded = load_head(out, tiny, EXIT_LAYER)
    assert loaded.metadata["steps"] == "6" and "date" in loaded.metadata
    with pytest.raises(ValueError, match="batch_size=2, not 3"):
        bad = TrainConfig(**{**config.__dict__, "batch_size": 3})
        train_head_file(tiny, prompts, bad, tmp_path / "r.safetensors", max_new_tokens=8, resume=True, progress=False)


@pytest.fixture(scope="module")
def smollm2():
    from executor.models import load_model, load_tokenizer

    return load_model("smollm2-135m", dtype="float32"), load_tokenizer("smollm2-135m")


def _smollm2_prompt(tokenizer) -> list[int]:
    from executor.prompts import encode_prompt

    return encode_prompt(tokenizer, "Explain in two sentences why the sky is blue.")


@requires_smollm2
@pytest.mark.skipif(not SHIPPED_HEAD.is_file(), reason=f"no shipped head at {SHIPPED_HEAD}")
def test_smollm2_eesd_with_shipped_head_equals_ar_float32(smollm2) -> None:
    model, tokenizer = smollm2
    prompt = _smollm2_prompt(tokenizer)
    head = load_head(SHIPPED_HEAD, model)
    reference, logits = hf_greedy(model, prompt, 40)
    eesd = generate(model, prompt, method="eesd", exit_layer=head.exit_layer, draft_len=4, max_new_tokens=40,
                    head=str(SHIPPED_HEAD))  # fmt: skip
    assert_same_or_tie(reference, logits, eesd.sequences, FLOAT32_TIE_TOL)
    assert sum(eesd.stats.accepted) > 0, eesd.stats.summary()  # the shipped head drafts tokens the model accepts


@requires_smollm2
def test_smollm2_untrained_head_kv_and_losslessness(smollm2) -> None:
    """Without a shipped file: the head as initialised (a copy of layer E) keeps its KV right on the real model."""
    model, tokenizer = smollm2
    prompt = _smollm2_prompt(tokenizer)
    head = TrainedExitHead(ModelAdapter(model), 15).requires_grad_(False)
    recorder = RecordingHead(head)
    reference, logits = hf_greedy(model, prompt, 24)
    eesd = generate(model, prompt, method="eesd", exit_layer=15, draft_len=3, max_new_tokens=24, head=recorder)
    assert_same_or_tie(reference, logits, eesd.sequences, FLOAT32_TIE_TOL)
    with torch.no_grad():
        states, expected = _teacher_forced(head, eesd.sequences[0].tolist())
    compared = 0
    for positions, hidden, draft in recorder.calls:
        position = int(positions[0, 0])
        if torch.allclose(hidden[0, 0], states[position], atol=1e-4, rtol=1e-4):
            torch.testing.assert_close(draft[0, 0], expected[position], atol=2e-3, rtol=1e-3)
            compared += 1
    assert compared >= sum(1 for drafted in eesd.stats.drafted if drafted)  # every round that drafted


# ------------------------------------------------------------------------------------------------------ PPSD
def _ppsd(model, prompt: list[int], head, **kwargs):
    from executor.ppsd import decode_ppsd

    sink = TokenSink(kwargs.pop("max_new_tokens", 25), ())
    stats = decode_ppsd(ModelAdapter(model), prompt, sink, None, head=head, **kwargs)
    return sink.tokens, stats


@pytest.mark.parametrize(("stages", "boundaries"), [(2, None), (3, [2, 3])])
def test_ppsd_with_trained_head_equals_ar_float64(trained, tiny, stages, boundaries) -> None:
    """Stage 1 drafts with the trained head; its layer's KV is flushed with stage 1's own on a wrong draft."""
    head = trained[0]
    flushes = confirms = 0
    for prompt in _prompts(5, SPEC.vocab, seed=4):
        ar = generate(tiny, prompt, method="ar", max_new_tokens=25).sequences[0, len(prompt) :].tolist()
        tokens, stats = _ppsd(tiny, prompt, head, stages=stages, stage_boundaries=boundaries)
        assert tokens == ar
        flushes, confirms = flushes + stats.flushes, confirms + stats.confirms
    assert flushes > 0 and confirms > 0  # both kinds of tick happened with this head


def test_ppsd_draft_logits_equal_teacher_forced_head(trained, tiny) -> None:
    """Every draft stage 1 makes, flushes included, is what the head computes over the committed text."""
    head = trained[0]
    recorder = RecordingHead(head)
    prompt = [5, 9, 1, 33, 2, 7]
    tokens, stats = _ppsd(tiny, prompt, recorder, stages=2)
    states, reference = _teacher_forced(head, prompt + tokens)
    compared = compared_draft_logits(recorder, 0, states, reference)
    assert stats.flushes > 0 and compared >= stats.confirms  # drafts after flushes were compared too


def test_ppsd_head_file_through_generate_and_distributed(trained, tiny, tmp_path: Path) -> None:
    """A head file gives PPSD its exit layer; the distributed backend sends the head to stage 1's process and
    makes the same ticks as the sequential reference."""
    path = save_head(trained[0], tmp_path / "tiny.safetensors", dtype=torch.float64)
    prompt = [3, 14, 15, 9, 26]
    ar = generate(tiny, prompt, method="ar", max_new_tokens=20)
    local = generate(tiny, prompt, method="ppsd", stages=2, head=str(path), max_new_tokens=20)
    assert local.sequences.tolist() == ar.sequences.tolist() and local.stats.exit_layer == EXIT_LAYER
    tokens, stats = _ppsd(tiny, prompt, str(path), stages=2, backend="distributed", max_new_tokens=20)
    assert tokens == ar.sequences[0, len(prompt) :].tolist()
    ticks = (local.stats.ticks, local.stats.confirms, local.stats.flushes)
    assert (stats.ticks, stats.confirms, stats.flushes) == ticks
    with pytest.raises(ValueError, match="trained for exit layer 2, not 1"):
        generate(tiny, prompt, method="ppsd", stages=2, exit_layer=1, head=str(path), max_new_tokens=4)


def test_a_head_object_at_another_exit_layer_is_refused(trained, tiny) -> None:
    head = trained[0]
    for method in ("eesd", "ppsd"):
        with pytest.raises(ValueError, match="made for exit layer 2, not 1"):
            generate(tiny, [1, 2, 3], method=method, exit_layer=1, head=head, max_new_tokens=4)


# ------------------------------------------------------------------------------------------ vocabulary-subset head
@pytest.mark.parametrize("count", [1, 20, SPEC.vocab])
def test_subset_head_is_lossless_and_drafts_only_its_ids(tiny, count: int) -> None:
    from executor.heads import SubsetExitHead, head_key

    adapter = ModelAdapter(tiny)
    head = resolve_head(f"shared:{count}", adapter, EXIT_LAYER)
    assert isinstance(head, SubsetExitHead) and head_key(head) == head_key(SubsetExitHead.lowest(adapter, count))
    assert head_key(head) != head_key(None)
    for prompt in _prompts(4, SPEC.vocab, seed=7):
        ar = generate(tiny, prompt, method="ar", max_new_tokens=20)
        for kwargs in ({"method": "eesd", "draft_len": 3}, {"method": "ppsd", "stages": 2}):
            out = generate(tiny, prompt, exit_layer=EXIT_LAYER, head=f"shared:{count}", max_new_tokens=20, **kwargs)
            assert out.sequences.tolist() == ar.sequences.tolist()
        sampled = generate(tiny, prompt, method="ar", max_new_tokens=20, do_sample=True, seed=3)
        eesd = generate(tiny, prompt, method="eesd", exit_layer=EXIT_LAYER, head=head, max_new_tokens=20,
                        do_sample=True, seed=3)  # fmt: skip
        assert eesd.sequences.tolist() == sampled.sequences.tolist()
    hidden = torch.randn(2, 3, tiny.config.hidden_size, dtype=torch.float64)
    logits = head(hidden, None, None)
    full = adapter.logits(hidden)
    torch.testing.assert_close(logits[..., :count], full[..., :count])
    assert torch.isneginf(logits[..., count:]).all()


def test_subset_head_in_rejection_sampling_and_distributed(tiny) -> None:
    prompt = [3, 14, 15, 9, 26]
    out = generate(tiny, prompt, method="eesd", exit_layer=EXIT_LAYER, head="shared:16", draft_len=2, do_sample=True,
                   sampling="rejection", seed=5, max_new_tokens=16)  # fmt: skip
    assert out.sequences.shape == (1, len(prompt) + 16) and int(out.sequences.max()) < SPEC.vocab
    tokens, stats = _ppsd(tiny, prompt, "shared:16", stages=2, backend="distributed", max_new_tokens=16)
    local_tokens, local = _ppsd(tiny, prompt, "shared:16", stages=2, max_new_tokens=16)
    assert tokens == local_tokens and (stats.confirms, stats.flushes) == (local.confirms, local.flushes)


@pytest.mark.parametrize("spec", ["shared:0", "shared:x", "shared:100000"])
def test_bad_subset_head_specs(tiny, spec: str) -> None:
    with pytest.raises(ValueError, match="shared:N"):
        generate(tiny, [1, 2], method="eesd", exit_layer=EXIT_LAYER, head=spec, max_new_tokens=2)


@pytest.fixture(scope="module")
def ranked_subset(tiny, tmp_path_factory):
    """A vocabulary-subset head file of 24 ids, ranked on the tiny model's own continuations of 12 prompts."""
    from executor.train_head import subset_head_file

    path = tmp_path_factory.mktemp("subset") / "v24.safetensors"
    head = subset_head_file(tiny, _prompts(12, SPEC.vocab, seed=11), 24, path, max_new_tokens=12, progress=False,
                            run_info={"prompts": "random"})  # fmt: skip
    return head, path


def test_vocabulary_scores_are_expected_counts(tiny) -> None:
    from executor.train_head import vocabulary_scores

    corpus = generate_corpus(tiny, _prompts(6, SPEC.vocab, seed=2), 10, None, progress=False)
    scores = vocabulary_scores(ModelAdapter(tiny), corpus, progress=False)
    assert not scores.requires_grad  # no graph kept: it held every sequence's [T, V] softmax to the end
    positions = sum(len(t) - s for t, s in zip(corpus.sequences, corpus.starts, strict=True))
    assert scores.shape == (SPEC.vocab,) and bool((scores >= 0).all())
    assert float(scores.sum()) == pytest.approx(positions, rel=1e-9)  # each position's probabilities sum to 1
    expected = torch.zeros(SPEC.vocab, dtype=torch.float64)
    with torch.no_grad():  # the same sum from HF's own forward over each whole sequence
        for tokens, start in zip(corpus.sequences, corpus.starts, strict=True):
            expected += tiny(torch.tensor([tokens])).logits[0, start:].softmax(-1).sum(0)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


def test_subset_head_file_ranks_saves_and_is_lossless(tiny, ranked_subset) -> None:
    from executor.heads import SUBSET_ARCHITECTURE, SubsetExitHead, read_head_file

    head, path = ranked_subset
    tensors, metadata = read_head_file(path)
    assert metadata["head_architecture"] == SUBSET_ARCHITECTURE and metadata["subset_size"] == "24"
    assert metadata["exit_layer"] == "any" and metadata["prompts"] == "random"
    assert 0 < float(metadata["covered_mass"]) <= 1
    assert tensors["token_ids"].tolist() == head.ranking.tolist() and len(set(head.ranking.tolist())) == 24
    loaded = load_head(path, tiny, EXIT_LAYER)
    assert isinstance(loaded, SubsetExitHead) and loaded.cache_key == head.cache_key
    assert sorted(loaded.token_ids.tolist()) == sorted(head.ranking.tolist())
    runs = [
        (1, {"method": "eesd", "draft_len": 3}),
        (3, {"method": "eesd", "policy": "beta-ts"}),
        (2, {"method": "ppsd", "stages": 2}),
    ]  # fmt: skip  (a subset head is not tied to an exit layer)
    for prompt in _prompts(3, SPEC.vocab, seed=19):
        ar = generate(tiny, prompt, method="ar", max_new_tokens=16)
        for exit_layer, kwargs in runs:
            out = generate(tiny, prompt, exit_layer=exit_layer, head=str(path), max_new_tokens=16, **kwargs)
            assert out.sequences.tolist() == ar.sequences.tolist()
        default = generate(tiny, prompt, method="eesd", head=str(path), max_new_tokens=16)  # exit layer: L/2
        assert default.sequences.tolist() == ar.sequences.tolist()
    logits = loaded(torch.randn(1, 2, tiny.config.hidden_size, dtype=torch.float64), None, None)
    outside = torch.ones(SPEC.vocab, dtype=torch.bool)
    outside[head.ranking] = False
    assert torch.isneginf(logits[..., outside]).all() and torch.isfinite(logits[..., ~outside]).all()


def test_ranked_subset_keeps_the_highest_scores_and_breaks_ties_by_id(tiny) -> None:
    from executor.heads import SubsetExitHead

    adapter = ModelAdapter(tiny)
    scores = torch.zeros(SPEC.vocab, dtype=torch.float64)
    scores[[40, 7, 63]] = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert SubsetExitHead.ranked(adapter, scores, 5).ranking.tolist() == [40, 7, 63, 0, 1]
    with pytest.raises(ValueError, match="shape"):
        SubsetExitHead.ranked(adapter, scores[:-1], 5)
    with pytest.raises(ValueError, match="1 <= N"):
        SubsetExitHead.ranked(adapter, scores, SPEC.vocab + 1)


def test_a_subset_head_file_is_refused_for_another_model_or_when_damaged(ranked_subset, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from executor.heads import head_checksum, read_head_file

    _, path = ranked_subset
    other = tiny_model(TinySpec(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, vocab=64, seed=4))
    with pytest.raises(ValueError, match="made for another model"):
        load_head(path, other)
    tensors, metadata = read_head_file(path)
    for name, bad in (("dup", torch.tensor([1, 1, 2])), ("big", torch.tensor([1, SPEC.vocab + 5]))):
        broken = {"token_ids": bad}
        sealed = {**metadata, "checksum": head_checksum(broken, metadata)}
        save_file(broken, tmp_path / f"{name}.safetensors", metadata=sealed)
        with pytest.raises(ValueError, match=rf"{name}\.safetensors"):
            load_head(tmp_path / f"{name}.safetensors", ranked_subset[0].adapter)


def test_train_head_cli_checks_its_arguments(capsys) -> None:
    from executor.cli import main

    assert main(["train-head", "--model", "x", "--out", "h.safetensors"]) == 2
    assert "--exit-layer is required" in capsys.readouterr().err
    assert main(["train-head", "--model", "x", "--vocab-subset", "0", "--out", "h.safetensors"]) == 2
    assert "--vocab-subset must be >= 1" in capsys.readouterr().err


def test_ppsd_flush_rolls_back_the_heads_kv_books(trained, tiny) -> None:
    """Stage 1's flush forgets the flushed positions in its exit head's layer too, not only in its own layers (a
    stale prefix there would let a later write leave a gap unnoticed)."""
    from executor.ppsd import Item, StageRunner, plan_stages
    from executor.sampling import SamplingConfig, TokenSelector

    adapter, head = ModelAdapter(tiny), trained[0]
    cache = adapter.new_cache(1, 32, extra_layers=head.extra_layers)
    selector = TokenSelector(SamplingConfig(), [5], 0, [], "cpu")
    runner = StageRunner(adapter, cache, plan_stages(adapter.num_layers, 2), 0, selector, head=head)
    with torch.inference_mode():
        runner.prefill(None, [[5, 9, 1, 33, 2]])
        runner.run(Item([5], tokens=[7]))
        runner.run(Item([6], tokens=[8]))
    stage_layers = [0, 1, head.index]
    assert [cache.lengths[cache.slot(layer)] for layer in stage_layers] == [[7]] * 3
    runner.flush(6)
    assert [cache.lengths[cache.slot(layer)] for layer in stage_layers] == [[6]] * 3


@pytest.mark.parametrize("rows", [(1, 1), (1, 2), (2, 3), (1, 8), (3, 3), (1, 12), (1, 16), (1, 17), (3, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kernel", ["transposed", "linear"])
def test_head_linear_is_f_linear_in_another_kernel_order(
    rows: tuple[int, int], with_bias: bool, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU LM-head product gives F.linear's values in either kernel order (`W @ x^T` for 2..16 rows where that
    order is chosen); 1 row, 17+ rows and the linear order are F.linear itself, bit for bit."""
    from executor.adapter import FEW_ROWS, HEAD_KERNEL_ENV, LARGE_HEAD_ROWS, head_linear

    monkeypatch.setenv(HEAD_KERNEL_ENV, kernel)
    generator = torch.Generator().manual_seed(sum(rows))
    x = torch.randn(*rows, 48, generator=generator, dtype=torch.float64)
    weight = torch.randn(LARGE_HEAD_ROWS, 48, generator=generator, dtype=torch.float64)
    bias = torch.randn(LARGE_HEAD_ROWS, generator=generator, dtype=torch.float64) if with_bias else None
    expected = torch.nn.functional.linear(x, weight, bias)
    out = head_linear(x, weight, bias)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if kernel == "linear" or rows[0] * rows[1] not in FEW_ROWS:
        assert torch.equal(out, expected)
    grad = head_linear(x.clone().requires_grad_(True), weight)  # training keeps autograd's own F.linear
    assert grad.requires_grad and grad.grad_fn is not None


def test_draft_cost_ratio_counts_the_weights_each_pass_reads():
    """c = (layers [0, E) + the head's own layer + the LM head rows it scores) / (all layers + the LM head): E / L for
    a model without an LM head worth counting, much less for a head over a small subset of a large vocabulary."""
    from executor.heads import SharedExitHead, SubsetExitHead, TrainedExitHead, draft_cost_ratio

    adapter = ModelAdapter(tiny_model(TinySpec(num_layers=4, vocab=64, seed=2), torch.float32))
    layer = sum(p.numel() for p in adapter.layers[0].parameters())
    head_rows = adapter.lm_head.weight.numel()
    shared = draft_cost_ratio(adapter, 2, SharedExitHead(adapter))
    assert shared == pytest.approx((2 * layer + head_rows) / (4 * layer + head_rows))
    subset = draft_cost_ratio(adapter, 2, SubsetExitHead.lowest(adapter, 16))
    assert subset == pytest.approx((2 * layer + head_rows / 4) / (4 * layer + head_rows))
    trained = draft_cost_ratio(adapter, 2, TrainedExitHead(adapter, 2))
    assert trained == pytest.approx((3 * layer + head_rows) / (4 * layer + head_rows))
    assert subset < shared < trained
