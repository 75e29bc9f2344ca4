"""`eesd calibrate host`: the host's work between the device's passes, per method, timed on the executor's own decodes.

A serving loop reads the device after every round, and while the host works (the acceptance read back, the policy's
update, the next round's inputs, the KV cache's books) the device waits: on a small model on a GPU that work decides
whether a shallow exit head pays under load (docs/serving.md). The simulator prices it from a latency profile's
`overhead` rows, which time a fixed piece of host work, the same for every method; this measures each method's own.

It runs real greedy decodes (`executor.generate`), AR and EESD interleaved, with every pass the executor launches
(`Passes.ar`, `.ar_head`, `.draft`, `.verify`) timed where it runs, bracketed by device synchronisations on a GPU, so
that a decode's wall time splits into prefill, passes and the host's work between them. Per method it reports that work
per host read (what the simulator pays once per read for captured passes) and per pass (what it pays on every pass
uncaptured), and prints them as a serving case's `serving.by_method` fields. Output (`--out`, JSON, written
atomically): format `eesd.host_work`, docs/formats.md.

    eesd calibrate host --model smollm2-135m --exit-layer 15 --prompts 6 --max-new-tokens 48 --out host.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMAT, SCHEMA_VERSION = "eesd.host_work", 1
PASS_KINDS = ("ar", "ar_head", "draft", "verify")
METHODS = ("ar", "eesd")


class PassClock:
    """Wraps the executor's pass methods: every call's wall time, kind, its verify slots and its furthest position.
    `sync`: a device's synchronisation around every pass (none on the CPU, where a pass is synchronous)."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.calls: list[tuple[str, int, int, float]] = []  # (kind, slots, furthest, ms)
        self.sync = sync or (lambda: None)
        self._saved: dict[str, Callable[..., None]] = {}

    def install(self) -> None:
        from executor.passes import Passes

        for kind in PASS_KINDS:
            self._saved[kind] = getattr(Passes, kind)
            setattr(Passes, kind, self._timed(kind, self._saved[kind]))

    def uninstall(self) -> None:
        from executor.passes import Passes

        for kind, method in self._saved.items():
            setattr(Passes, kind, method)
        self._saved.clear()

    def _timed(self, kind: str, method: Callable[..., None]) -> Callable[..., None]:
        calls, sync = self.calls, self.sync

        @functools.wraps(method)
        def timed(passes: Any, *args: Any) -> None:
            slots, furthest = (args[0], args[1]) if kind == "verify" else (0, args[0] if args else -1)
            sync()
            begin = time.perf_counter()
            method(passes, *args)
            sync()
            calls.append((kind, slots, furthest, (time.perf_counter() - begin) * 1e3))

        return timed


def decode(model: Any, ids: Any, method: str, clock: PassClock, **settings: Any) -> dict[str, Any]:
    """One greedy decode (`settings`: generate's arguments); its wall time split into prefill, passes and the host's
    work between them, with its rounds, host reads and passes."""
    import executor

    first = len(clock.calls)
    if method == "ar":
        settings = {k: v for k, v in settings.items() if k not in ("exit_layer", "policy", "head")}
    result = executor.generate(model, ids, method=method, **settings)
    stats, calls = result.stats, clock.calls[first:]
    passes_ms = sum(c[3] for c in calls)
    decode_ms = (stats.wall_time_s - stats.prefill_time_s) * 1e3
    return {"method": method, "tokens": result.sequences.shape[1] - ids.shape[1], "rounds": stats.rounds,
            "host_reads": stats.host_reads, "passes": len(calls), "prefill_ms": stats.prefill_time_s * 1e3,
            "passes_ms": passes_ms, "host_ms": decode_ms - passes_ms, "calls": calls}  # fmt: skip


def host_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the host's work per round, per host read and per pass (medians over decodes, ms), its share of
    the decode and the tokens a round makes."""
    rows = []
    for method in sorted({r["method"] for r in runs}):
        mine = [r for r in runs if r["method"] == method]

        def per(key: str, runs: list[dict[str, Any]] = mine) -> float:
            return round(statistics.median(r["host_ms"] / max(r[key], 1) for r in runs), 4)

        share = statistics.median(r["host_ms"] / (r["host_ms"] + r["passes_ms"]) for r in mine)
        tokens_per_round = sum(r["tokens"] for r in mine) / sum(r["rounds"] for r in mine)
        rows.append({"method": method, "decodes": len(mine), "host_ms_per_round": per("rounds"),
                     "host_ms_per_read": per("host_reads"), "host_ms_per_pass": per("passes"),
                     "host_share_of_decode": round(share, 4),
                     "tokens_per_round": round(tokens_per_round, 3)})  # fmt: skip
    return rows


def is_captured(capture: str | None) -> bool:
    """Whether passes run under this (resolved) capture mode are captured: the simulator then pays a profile's
    `overhead` once per host read, and on every pass where they are not ("none", "freeze")."""
    return capture not in ("none", "freeze")


def host_fields(rows: list[dict[str, Any]], captured: bool) -> dict[str, dict[str, float]]:
    """Measured host work (`host_rows`, or a host-work file's `methods`) as `serving.by_method` fields (µs), for a
    profile of passes run as these were: per read where they are captured, per pass where they are not."""
    key = "host_ms_per_read" if captured else "host_ms_per_pass"
    return {row["method"]: {"latency.profile.overhead_us": round(row[key] * 1e3, 1)} for row in rows}


def by_method_snippet(rows: list[dict[str, Any]], captured: bool) -> str:
    """`host_fields` as the text of a serving case's `serving.by_method`, to paste."""
    fields = (f"{m}: {{{k}: {v:.0f}}}" for m, f in host_fields(rows, captured).items() for k, v in f.items())
    return "serving.by_method: {" + ", ".join(fields) + "}"


def read_host_work(path: Path) -> dict[str, Any]:
    """An `eesd.host_work` file, checked (torch-free: `eesd calibrate scenario` reads it); ValueError naming the file
    and the field otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: format: expected {FORMAT!r} (eesd calibrate host --out)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version: expected {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    if not isinstance(data.get("metadata"), dict):
        raise ValueError(f"{path}: metadata: expected a mapping")
    rows = data.get("methods")
    methods = (
        [row.get("method") for row in rows]
        if isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
        else None
    )
    if methods != list(METHODS):
        raise ValueError(f"{path}: methods: expected one row each for {', '.join(METHODS)}, got {methods!r}")
    for row in rows:
        for key in ("host_ms_per_read", "host_ms_per_pass"):
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
                raise ValueError(f"{path}: methods.{row['method']}.{key}: expected milliseconds >= 0, got {value!r}")
    return data


def measure(
    model: Any, prompts: list[Any], *, repeats: int, sync: Callable[[], None] | None, **settings: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every prompt decoded by each method `repeats` times (interleaved), after an untimed warm-up decode per prompt
    and method (captures and compilations, allocators); returns the decodes (without their calls) and the rows."""
    clock = PassClock(sync)
    clock.install()
    try:
        for ids in prompts:
            for method in METHODS:
                decode(model, ids, method, clock, **settings)
        clock.calls.clear()
        runs = [decode(model, ids, method, clock, **settings)
                for _ in range(repeats) for ids in prompts for method in METHODS]  # fmt: skip
    finally:
        clock.uninstall()
    return [{k: v for k, v in r.items() if k != "calls"} for r in runs], host_rows(runs)


def run_host(args: argparse.Namespace) -> int:
    import torch

    from calibrate.common import base_metadata, check_json_out, model_and_head
    from executor.models import load_tokenizer
    from executor.passes import resolve_capture
    from executor.prompts import load_prompts
    from sim.formats import write_text_atomic

    for flag, value in (("--prompts", args.prompts), ("--max-new-tokens", args.max_new_tokens),
                        ("--repeats", args.repeats)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    check_json_out(args.out, args.force)
    device, dtype, model, head, exit_layer = model_and_head(args)
    capture = resolve_capture(args.capture, device, "greedy")
    tokenizer = load_tokenizer(args.model)
    texts = [p.text for p in load_prompts(args.prompt_set)][: args.prompts]
    prompts = [tokenizer(text, return_tensors="pt").input_ids.to(device) for text in texts]
    settings = {"exit_layer": exit_layer, "head": head, "policy": args.policy, "capture": capture,
                "max_new_tokens": args.max_new_tokens, "sync_every": args.sync_every}  # fmt: skip
    print(f"calibrate host: {args.model} on {device}, capture {capture}, E={exit_layer} {args.policy}, "
          f"{len(prompts)} prompts x {args.max_new_tokens} tokens x {args.repeats}")  # fmt: skip
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    runs, rows = measure(model, prompts, repeats=args.repeats, sync=sync, **settings)
    for row in rows:
        print(
            f"{row['method']:>4}: host work {row['host_ms_per_read']:.3f} ms a read, {row['host_ms_per_round']:.3f} "
            f"a round, {row['host_ms_per_pass']:.3f} a pass ({row['host_share_of_decode']:.2%} of the decode)"
        )
    snippet = by_method_snippet(rows, is_captured(capture))
    kind = "captured passes (paid once a read)" if is_captured(capture) else "uncaptured passes (paid every pass)"
    print(f"as a serving case's host work, for a profile of {kind}: {snippet}")
    if args.out is not None:
        metadata = base_metadata(args.model, device, dtype) | {
            "exit_layer": exit_layer, "head": args.head, "policy": args.policy, "capture": capture,
            "sync_every": args.sync_every, "prompt_set": args.prompt_set, "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
        }  # fmt: skip
        data = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "metadata": metadata, "methods": rows,
                "serving_by_method": snippet, "decodes": runs}  # fmt: skip
        write_text_atomic(args.out, json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="packaged name, HF directory or .gguf")
    p.add_argument("--head", default="shared", help="exit head: shared | shared:N | a head file (default: shared)")
    p.add_argument("--exit-layer", type=int, default=None, help="exit layer E (default: a head file's, else L / 2)")
    p.add_argument("--policy", default="fixed:1", help="EESD's draft policy (default: fixed:1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--capture", default="auto", help="the passes generate runs: auto | none | graph | ... ")
    p.add_argument("--sync-every", type=int, default=1, help="AR steps per host read (default: 1, as a server reads)")
    p.add_argument("--prompt-set", default="builtin", help="a prompt set or JSONL file (default: builtin)")
    p.add_argument("--prompts", type=int, default=4, help="its first N prompts (default: 4)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per decode (default: 48)")
    p.add_argument("--repeats", type=int, default=2, help="times over the prompts, methods interleaved (default: 2)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file (eesd.host_work)")
