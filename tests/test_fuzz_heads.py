"""Head files mutated as a damaged disk, an interrupted copy or a hand edit would leave them: loading either gives the
original head (the same tensors and metadata) or refuses with a ValueError / FileNotFoundError naming the file, in
bounded time; never another exception type.

The mutations start from head files a tiny model writes (a trained head, bfloat16 and float32, and a vocabulary-
subset head): flipped bytes anywhere (the header's length, its JSON, the tensor bytes), truncation, trailing bytes,
and metadata fields removed, edited, added or replaced by garbage, with the checksum left as it was or recomputed
to match (a consistent file with wrong fields, which the field checks must refuse or take as written)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from tiny_models import TinySpec, tiny_model

from executor.adapter import ModelAdapter
from executor.heads import (
    SubsetExitHead,
    TrainedExitHead,
    head_checksum,
    load_head,
    read_head_file,
    save_head,
    save_subset_head,
)

LOAD_BOUND_S = 10.0  # a tiny head loads in milliseconds; a mutation must never make it hang or crawl
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return tiny_model(TinySpec(num_layers=4, vocab=64, seed=5), torch.float32)


@pytest.fixture(scope="module")
def originals(tiny, tmp_path_factory) -> dict[str, bytes]:
    adapter = ModelAdapter(tiny)
    folder = tmp_path_factory.mktemp("heads")
    head = TrainedExitHead(adapter, 2)
    paths = {
        "bf16": save_head(head, folder / "bf16.safetensors", info={"steps": 3}),
        "f32": save_head(head, folder / "f32.safetensors", dtype=torch.float32),
        "subset": save_subset_head(SubsetExitHead.lowest(adapter, 16), folder / "subset.safetensors"),
    }
    return {name: path.read_bytes() for name, path in paths.items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mutants")


def _check_load(path: Path, model: torch.nn.Module, expected: tuple[dict, dict] | None) -> None:
    """Load `path`: a refusal must be a ValueError / FileNotFoundError naming the file; a success must give exactly
    `expected` (tensors, metadata), or, with `expected` None, tensors equal to the original's."""
    begin = time.monotonic()
    try:
        head = load_head(path, model)
    except (ValueError, FileNotFoundError) as err:
        assert path.name in str(err), str(err)
        assert "\n" not in str(err)
        return
    finally:
        assert time.monotonic() - begin < LOAD_BOUND_S
    tensors, metadata = read_head_file(path)
    if expected is not None:
        assert metadata == expected[1]
        assert tensors.keys() == expected[0].keys()
        assert all(torch.equal(tensors[name], expected[0][name]) for name in tensors)
    assert head.metadata == metadata


def _reference(data: bytes, folder: Path) -> tuple[dict, dict]:
    path = folder / "reference.safetensors"
    path.write_bytes(data)
    return read_head_file(path)


@FUZZ
@given(
    kind=st.sampled_from(["bf16", "f32", "subset"]),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_flipped_bytes(tiny, originals, folder, kind, flips):
    data = bytearray(originals[kind])
    for where, mask in flips:
        data[min(int(where * len(data)), len(data) - 1)] ^= mask
    path = folder / "flipped.safetensors"
    path.write_bytes(bytes(data))
    _check_load(path, tiny, _reference(originals[kind], folder))


@FUZZ
@given(
    kind=st.sampled_from(["bf16", "f32", "subset"]), keep=st.floats(0, 1, exclude_max=True), tail=st.binary(max_size=16)
)
def test_truncated_or_extended(tiny, originals, folder, kind, keep, tail):
    data = originals[kind]
    data = data[: int(keep * len(data))] if not tail else data + tail
    path = folder / "cut.safetensors"
    path.write_bytes(data)
    _check_load(path, tiny, _reference(originals[kind], folder))


TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["", "0", "1", "2", "3", "-1", "99", "any", "1e3", " 2", "2.0", "nan", "decoder-layer+rmsnorm"]),
)


@st.composite
def metadata_edits(draw, keys: list[str]) -> dict[str, str | None]:
    """Field -> new text (None: removed); at least one field changed."""
    edits = draw(st.dictionaries(st.sampled_from(keys), st.one_of(st.none(), TEXT), min_size=1, max_size=3))
    extra = draw(st.dictionaries(st.text(min_size=1, max_size=8), TEXT, max_size=2))
    return {**edits, **{key: value for key, value in extra.items() if key not in keys}}


@FUZZ
@given(kind=st.sampled_from(["bf16", "subset"]), data=st.data(), reseal=st.booleans())
def test_metadata_removed_edited_or_garbage(tiny, originals, folder, kind, data, reseal):
    tensors, metadata = _reference(originals[kind], folder)
    edits = data.draw(metadata_edits(sorted(metadata)))
    changed = {key: value for key, value in {**metadata, **edits}.items() if value is not None}
    if reseal and "checksum" in changed:
        changed["checksum"] = head_checksum(tensors, changed)
    path = folder / "edited.safetensors"
    save_file(tensors, path, metadata=changed)
    _check_load(path, tiny, (tensors, changed) if reseal else (tensors, metadata))
