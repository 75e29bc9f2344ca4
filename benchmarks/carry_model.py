"""Pack a packaged model for a machine that cannot install it (the lent GPU box: no hub, no `gguf`, 64 MiB per call).

`split` cuts a model `executor.load_model` can load (e.g. "smollm2-135m", from its PyPI GGUF package) into chunks of
at most `--chunk-mib` MiB under `--out` (default `.carry/<name>/`, ignored by git), with a manifest of sha256 sums:

- `--format gguf` (the default for a GGUF-packaged model): the GGUF file itself, byte for byte (SmolLM2-135M: 92 MiB,
  two chunks). The box then needs the `gguf` wheel (pure Python; `benchmarks/gpu_session.sh prepare` fetches it) and
  converts the file with `executor.load_model` exactly as here, so its weights are bit-identical to ours.
- `--format hf`: the converted Hugging Face directory (safetensors in `--dtype`, tokenizer included) as a tar, for a
  box without `gguf` (SmolLM2-135M in bfloat16: 270 MiB, five chunks).

Carry one chunk per device call while the machine stays warm (30 s), copying each to /tmp/parts there, then `join`
(standard library only: it checks every chunk's sha256 first):

    python benchmarks/carry_model.py split smollm2-135m                       # here
    python benchmarks/carry_model.py join /tmp/parts /tmp/smollm2.gguf        # there: a .gguf file (or an HF dir)
    python benchmarks/gpu_decode.py --model-path /tmp/smollm2.gguf ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.json"
FORMATS = ("gguf", "hf")


def _gguf_sources(name: str) -> list[Path]:
    from executor.models import _gguf_sources

    return list(_gguf_sources(name, Path(name).expanduser())[1])


def _read_chunks(paths: list[Path], chunk_bytes: int) -> Iterator[bytes]:
    """The files' concatenation in chunks of exactly `chunk_bytes` (the last one shorter)."""
    pending = b""
    for path in paths:
        with path.open("rb") as source:
            while block := source.read(chunk_bytes - len(pending)):
                pending += block
                if len(pending) == chunk_bytes:
                    yield pending
                    pending = b""
    if pending:
        yield pending


def _write_parts(chunks: Iterator[bytes], out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    parts = []
    for chunk in chunks:
        part = out / f"part-{len(parts):03d}"
        part.write_bytes(chunk)
        parts.append({"file": part.name, "sha256": hashlib.sha256(chunk).hexdigest(), "bytes": len(chunk)})
    return parts


def split(name: str, fmt: str, dtype: str, out: Path, chunk_mib: int) -> None:
    chunk = chunk_mib * 2**20
    if fmt == "gguf":
        parts = _write_parts(_read_chunks(_gguf_sources(name), chunk), out)
        manifest = {"model": name, "format": "gguf", "dtype": "as packaged", "parts": parts}
    else:
        import executor  # torch and transformers only for packing

        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "model"
            executor.load_model(name, dtype=dtype).save_pretrained(directory, safe_serialization=True)
            executor.load_tokenizer(name).save_pretrained(directory)
            archive = Path(tmp) / "model.tar"
            with tarfile.open(archive, "w") as tar:
                tar.add(directory, arcname=".")
            parts = _write_parts(_read_chunks([archive], chunk), out)
        manifest = {"model": name, "format": "hf", "dtype": dtype, "parts": parts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{name}: {len(parts)} parts of <= {chunk_mib} MiB ({fmt}) in {out}")


def join(parts_dir: Path, target: Path) -> None:
    """Check every chunk, then build `target` (a .gguf file or an HF directory) under a temporary name and rename."""
    try:
        manifest = json.loads((parts_dir / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        sys.exit(f"{parts_dir / MANIFEST}: cannot read the manifest ({err})")
    if not manifest.get("parts"):
        sys.exit(f"{parts_dir / MANIFEST}: lists no parts: nothing to join (split again)")
    for part in manifest["parts"]:
        path = parts_dir / part["file"]
        if not path.is_file():
            sys.exit(f"{path}: missing (carry every part of {parts_dir} before joining)")
        if hashlib.sha256(path.read_bytes()).hexdigest() != part["sha256"]:
            sys.exit(f"{path}: sha256 mismatch (the chunk is damaged or from another split)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        joined = Path(tmp) / "joined"
        with joined.open("wb") as sink:
            for part in manifest["parts"]:
                sink.write((parts_dir / part["file"]).read_bytes())
        if manifest.get("format", "hf") == "gguf":
            os.replace(joined, target)
        else:
            staging = Path(tmp) / "model"
            with tarfile.open(joined) as tar:
                tar.extractall(staging, filter="data")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    print(f"{manifest['model']} ({manifest.get('format', 'hf')}, {manifest['dtype']}) in {target}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("split", help="chunk a model's GGUF file (or its converted HF directory)")
    pack.add_argument("name")
    pack.add_argument("--format", choices=FORMATS, default="gguf")
    pack.add_argument("--dtype", default="bfloat16", help="--format hf only: the stored dtype")
    pack.add_argument("--out", type=Path, default=None)
    pack.add_argument("--chunk-mib", type=int, default=50)
    unpack = sub.add_parser("join", help="check and join the chunks into a .gguf file or a model directory")
    unpack.add_argument("parts_dir", type=Path)
    unpack.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "split" and args.chunk_mib < 1:
        parser.error(f"--chunk-mib must be >= 1 (MiB a chunk), got {args.chunk_mib}")
    if args.command == "split":
        split(args.name, args.format, args.dtype, args.out or Path(".carry") / args.name, args.chunk_mib)
    else:
        join(args.parts_dir, args.target)


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
