"""benchmarks/carry_model.py: a GGUF cut into chunks (for the GPU box's 64 MiB per call) joins back byte for byte,
and a missing or damaged chunk stops the join with the chunk's name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def carry():
    return load_benchmark("carry_model")


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(int(2.5 * 2**20)))  # any bytes: split/join never parse the file
    return path


def test_split_and_join_give_the_same_bytes(carry, gguf: Path, tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    carry.main(["split", str(gguf), "--out", str(parts), "--chunk-mib", "1"])
    manifest = json.loads((parts / "manifest.json").read_text())
    assert manifest["format"] == "gguf"
    assert [p["bytes"] for p in manifest["parts"]] == [2**20, 2**20, 2**19]
    target = tmp_path / "box" / "joined.gguf"
    carry.main(["join", str(parts), str(target)])
    assert target.read_bytes() == gguf.read_bytes()
    assert not list(target.parent.glob("tmp*"))  # the temporary join folder is gone


def test_join_refuses_a_missing_or_damaged_chunk(carry, gguf: Path, tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    carry.main(["split", str(gguf), "--out", str(parts), "--chunk-mib", "1"])
    target = tmp_path / "joined.gguf"
    damaged = parts / "part-001"
    data = damaged.read_bytes()
    damaged.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # always a different first byte
    with pytest.raises(SystemExit, match="part-001: sha256 mismatch"):
        carry.main(["join", str(parts), str(target)])
    carry.main(["split", str(gguf), "--out", str(parts), "--chunk-mib", "1"])
    (parts / "part-002").unlink()
    with pytest.raises(SystemExit, match="part-002: missing"):
        carry.main(["join", str(parts), str(target)])
    assert not target.exists()  # nothing half-joined is left where the model should be


def test_a_resplit_removes_old_chunks(carry, gguf: Path, tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    carry.main(["split", str(gguf), "--out", str(parts), "--chunk-mib", "1"])
    carry.main(["split", str(gguf), "--out", str(parts), "--chunk-mib", "2"])
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-000", "part-001"]


def test_a_chunk_size_below_one_mib_and_a_manifest_of_no_parts_are_refused(carry, gguf: Path, tmp_path: Path) -> None:
    """`--chunk-mib 0` wrote a manifest of no parts and exited 0, and joining it made an empty .gguf."""
    with pytest.raises(SystemExit) as refused:
        carry.main(["split", str(gguf), "--out", str(tmp_path / "p"), "--chunk-mib", "0"])
    assert refused.value.code == 2 and not (tmp_path / "p").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps({"format": "gguf", "parts": []}))
    with pytest.raises(SystemExit, match="lists no parts"):
        carry.main(["join", str(tmp_path / "empty"), str(tmp_path / "x.gguf")])
    assert not (tmp_path / "x.gguf").exists()
