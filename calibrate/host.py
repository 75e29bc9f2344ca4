"""`eesd calibrate host`: the host's work between the device's passes, per method, timed on the executor's own decodes.

A serving loop reads the device after every round, and while the host works (the acceptance read back, the policy's
update, the next round's inputs, the KV cache's books) the device waits: on a small model on a GPU that work decides
whether a shallow exit head pays under load (docs/serving.md). A latency profile's `overhead` rows time a fixed piece
of host work, the same for every method; this measures each method's own, and a scenario that names its file as
`latency.profile.host_work` prices each method from it (`sim.host_work`).

It runs real greedy decodes (`executor.generate`), AR and EESD interleaved, each batch size's prompts decoded together
(left-padded), with every pass the executor launches (`Passes.ar`, `.ar_head`, `.draft`, `.verify`) timed where it
runs, bracketed by device synchronisations on a GPU, so that a decode's wall time splits into prefill, passes and the
host's work between them. Per method and batch size it reports that work per host read (what the simulator pays once
per read for captured passes) and per pass (what it pays on every pass uncaptured). PPSD (`--ppsd-stages N`, default
2; 0: not timed) is timed alike on its sequential backend at every batch size (a batch's rows in lockstep): every
stage's pass (`StageRunner.pass_`) timed, its tick's transition and books
left in the host's work (captured: each tick's launches timed whole, `PassClock`), and a tick counted as one pass (a
token's pass through every stage, as the simulator prices it). Output (`--out`, JSON,
written atomically): format `eesd.host_work`, docs/formats.md.

`--loop serve` times the serving loop's rounds instead (`executor.serving.serve`, what `eesd serve-bench` runs): per
batch size n, 3n requests (at least one per prompt) arrive at once and share n slots, each making `--max-new-tokens`
tokens; a request that finishes leaves and the next one's prefill takes its slot. A round's host work is its wall time
from its start to the next prefill's or round's start (its departures, admissions and books included), less the
passes it launched; rounds of n running requests make batch n's row. Prefills are timed apart and left out, as the
simulator prices them from the profile's rows. This is the file a serving scenario should name. It times AR and EESD
(a served PPSD request runs the decode `--loop generate` times).

    eesd calibrate host --model smollm2-135m --exit-layer 15 --batch 1,4 --prompts 4 --out host.json
    eesd calibrate host --model smollm2-135m --exit-layer 15 --batch 1,4 --loop serve --out host_serve.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sim.contract import is_captured
from sim.formats import short_dtype
from sim.host_work import FORMAT, LOOPS, METHODS, REQUIRED, SCHEMA_VERSION, figure_key, read_host_work

__all__ = [
    "FORMAT", "SCHEMA_VERSION", "PassClock", "ServeClock", "decode", "host_rows", "is_captured", "measure",
    "read_host_work", "serve_decode",
]  # fmt: skip
PASS_KINDS = ("ar", "ar_head", "draft", "verify")  # `Passes`' methods; a PPSD stage's pass is timed as "stage"


class PassClock:
    """Wraps the executor's pass methods: every call's wall time, kind, its verify slots and its furthest position.
    `sync`: a device's synchronisation around every pass (none on the CPU, where a pass is synchronous).

    PPSD: uncaptured, every stage's pass is timed and the tick's transition (eager tensor ops the simulator prices
    nowhere else) is the host's work; captured (`captured_ticks`), a tick's launches are timed whole (its stages'
    graphs and the transition's, which the simulator prices as the stages' passes and a launch), so that the host's
    work is what lies between ticks: the reads, the replay of their verdicts and the books."""

    def __init__(self, sync: Callable[[], None] | None = None, captured_ticks: bool = False) -> None:
        self.calls: list[tuple[str, int, int, float]] = []  # (kind, slots, furthest, ms)
        self.sync = sync or (lambda: None)
        self.captured_ticks = captured_ticks
        self._saved: dict[tuple[type, str], Callable[..., Any]] = {}  # (class, method name) -> the method it had

    def install(self) -> None:
        from executor.passes import Passes
        from executor.ppsd import LocalPipeline, StageRunner

        for kind in PASS_KINDS:
            self._wrap(Passes, kind, self._timed)
        if self.captured_ticks:
            self._wrap(LocalPipeline, "_launch_tick", lambda _, method: self._timed("tick", method, result=True))
        else:
            self._wrap(StageRunner, "pass_", lambda _, method: self._timed("stage", method))  # a PPSD stage's pass

    def uninstall(self) -> None:
        for (owner, name), method in self._saved.items():
            setattr(owner, name, method)
        self._saved.clear()

    def _wrap(self, owner: type, name: str, timer: Callable[[str, Callable[..., Any]], Callable[..., Any]]) -> None:
        """`owner.name` replaced by `timer(name, the method)` until `uninstall`."""
        self._saved[(owner, name)] = getattr(owner, name)
        setattr(owner, name, timer(name, self._saved[(owner, name)]))

    def _timed(self, kind: str, method: Callable[..., Any], result: bool = False) -> Callable[..., Any]:
        """`method` timed between synchronisations; its result returned where `result` (a tick's), else None."""
        calls, sync = self.calls, self.sync

        @functools.wraps(method)
        def timed(passes: Any, *args: Any) -> Any:
            slots, furthest = (args[0], args[1]) if kind == "verify" else (0, args[0] if args else -1)
            sync()
            begin = time.perf_counter()
            out = method(passes, *args)
            sync()
            calls.append((kind, slots, furthest, (time.perf_counter() - begin) * 1e3))
            return out if result else None

        return timed


class ServeClock(PassClock):
    """A `PassClock` that also times the serving loop's device side (`executor.serving.SlotDecoder`'s `round` and
    `prefill`): per call its kind, running requests, start and end (`time.perf_counter`), the passes it launched and
    the tokens it committed."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        super().__init__(sync)
        self.events: list[dict[str, Any]] = []

    def install(self) -> None:
        from executor.serving import SlotDecoder

        super().install()
        for kind in ("round", "prefill"):
            self._wrap(SlotDecoder, kind, self._event)

    def _event(self, kind: str, method: Callable[..., Any]) -> Callable[..., Any]:
        events, calls, sync = self.events, self.calls, self.sync

        @functools.wraps(method)
        def timed(decoder: Any, *args: Any) -> Any:
            running = list(args[0]) if kind == "round" else [args[1]]  # round(slots) | prefill(slot, running)
            made, first = sum(len(r.sink.tokens) for r in running), len(calls)
            sync()
            begin = time.perf_counter()
            out = method(decoder, *args)
            sync()
            end = time.perf_counter()
            made = sum(len(r.sink.tokens) for r in running) - made
            events.append({"kind": kind, "batch": len(running), "begin": begin, "end": end,
                           "passes": calls[first:], "tokens": made})  # fmt: skip
            return out

        return timed


def decode(model: Any, ids: Any, method: str, clock: PassClock, **settings: Any) -> dict[str, Any]:
    """One greedy decode of a batch of prompts (`ids`, left-padded, with generate's `attention_mask` among the
    `settings` where it holds several); its wall time split into prefill, passes and the host's work between them,
    with its rounds, host reads and passes, and the tokens each row made."""
    import executor

    first = len(clock.calls)
    stages = settings.pop("ppsd_stages", 2)
    if method == "ar":
        settings = {k: v for k, v in settings.items() if k not in ("exit_layer", "policy", "head")}
    elif method == "ppsd":  # one host: the sequential backend (its passes timed one by one), the rows in lockstep
        settings = {k: v for k, v in settings.items() if k != "policy"} | {"stages": stages, "backend": "sequential"}
    result = executor.generate(model, ids, method=method, **settings)
    stats, calls = result.stats, clock.calls[first:]
    passes_ms = sum(c[3] for c in calls)
    decode_ms = (stats.wall_time_s - stats.prefill_time_s) * 1e3
    if method == "ar":
        rounds = stats.rounds - 1  # AR's count includes its prefill's step
    elif method == "ppsd":
        rounds = stats.ticks  # a tick is PPSD's round (and its one pass)
    else:
        rounds = stats.rounds
    tokens = result.sequences.shape[1] - ids.shape[1]
    return {"method": method, "loop": "generate", "batch": ids.shape[0], "tokens": tokens, "decoded": tokens - 1,
            "rounds": rounds, "host_reads": stats.host_reads, "passes": rounds if method == "ppsd" else len(calls),
            "prefill_ms": stats.prefill_time_s * 1e3, "passes_ms": passes_ms, "host_ms": decode_ms - passes_ms,
            "calls": calls}  # fmt: skip


def serve_decode(model: Any, prompts: list[list[int]], batch: int, method: str, clock: ServeClock,
                 **settings: Any) -> dict[str, Any]:  # fmt: skip
    """One serving run at `batch` slots (module docstring): 3 x `batch` requests (at least one per prompt, prompt i
    mod their count) arriving at once, each making `max_new_tokens` tokens (no EOS); its rounds of `batch` running
    requests split into passes and the host's work (`serve_rounds`)."""
    from executor.serving import serve
    from sim.workload import Request, ServingWorkload

    count, length = max(3 * batch, len(prompts)), settings["max_new_tokens"]
    chosen = [prompts[i % len(prompts)] for i in range(count)]
    requests = tuple(Request(i, len(p), length, 0.0) for i, p in enumerate(chosen))
    kept = {"capture": settings.get("capture", "none")}
    if method == "eesd":
        kept |= {k: settings[k] for k in ("exit_layer", "head", "policy") if k in settings}
    first = len(clock.events)
    serve(model, ServingWorkload(requests, source="eesd calibrate host"), chosen, method=method, max_batch=batch,
          **kept)  # fmt: skip
    return {"method": method, "loop": "serve", "batch": batch, "requests": count, "tokens": length,
            **serve_rounds(clock.events[first:], batch)}  # fmt: skip


def serve_rounds(events: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """A serving run's rounds of `batch` running requests (`ServeClock.events`, in order): each round's host work is
    its span to the next event's start (the last round's: to its end) less its passes; with their count (a host read
    each), passes, the tokens a row made in them and the prefills' time."""
    rounds = passes = made = 0
    host_ms = passes_ms = 0.0
    for i, event in enumerate(events):
        if event["kind"] != "round" or event["batch"] != batch:
            continue
        until = events[i + 1]["begin"] if i + 1 < len(events) else event["end"]
        spent = sum(call[3] for call in event["passes"])
        rounds, passes, made = rounds + 1, passes + len(event["passes"]), made + event["tokens"]
        host_ms, passes_ms = host_ms + (until - event["begin"]) * 1e3 - spent, passes_ms + spent
    prefill_ms = sum((e["end"] - e["begin"]) * 1e3 for e in events if e["kind"] == "prefill")
    return {"decoded": made / batch, "rounds": rounds, "host_reads": rounds, "passes": passes,
            "prefill_ms": prefill_ms, "passes_ms": passes_ms, "host_ms": host_ms}  # fmt: skip


def host_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (`ar`, then `eesd`) and batch size: the host's work per round, per host read and per pass (medians
    over decodes, ms), its share of the decode and the tokens a round makes (a row's)."""
    rows = []
    keys = sorted({(r["method"], r.get("batch", 1)) for r in runs}, key=lambda k: (METHODS.index(k[0]), k[1]))
    for method, batch in keys:
        mine = [r for r in runs if r["method"] == method and r.get("batch", 1) == batch]

        def per(key: str, runs: list[dict[str, Any]] = mine) -> float:
            return round(statistics.median(r["host_ms"] / max(r[key], 1) for r in runs), 4)

        share = statistics.median(r["host_ms"] / (r["host_ms"] + r["passes_ms"]) for r in mine)
        tokens_per_round = sum(r["decoded"] for r in mine) / max(sum(r["rounds"] for r in mine), 1)  # a row's
        rows.append({"method": method, "batch": batch, "decodes": len(mine), "host_ms_per_round": per("rounds"),
                     "host_ms_per_read": per("host_reads"), "host_ms_per_pass": per("passes"),
                     "host_share_of_decode": round(share, 4),
                     "tokens_per_round": round(tokens_per_round, 3)})  # fmt: skip
    return rows


def by_method_snippet(rows: list[dict[str, Any]], captured: bool) -> str:
    """Measured host work (`host_rows`) at the smallest batch measured as a serving case's `serving.by_method` (µs,
    one figure a method), to paste where no file is at hand: per read for a profile of captured passes, per pass for
    one of uncaptured passes (a file named by `latency.profile.host_work` keeps every batch size). Not PPSD's: its
    figure is a tick's, and an `overhead_us` is paid by every stage of an uncaptured pass."""
    key, smallest = figure_key(captured), min(row.get("batch", 1) for row in rows)
    fields = (f"{r['method']}: {{latency.profile.overhead_us: {r[key] * 1e3:.0f}}}" for r in rows
              if r.get("batch", 1) == smallest and r["method"] in REQUIRED)  # fmt: skip
    return "serving.by_method: {" + ", ".join(fields) + "}"


def batches_of(prompts: list[list[int]], size: int) -> list[tuple[Any, Any]]:
    """The prompts (token ids) in batches of `size` (each prompt once; the last batch filled from the first prompts),
    left-padded, with the attention mask where a batch holds several: (ids, mask) tensors on the CPU."""
    import torch

    from executor.prompts import left_padded

    count = -(-len(prompts) // size)
    groups = [[prompts[(i * size + j) % len(prompts)] for j in range(size)] for i in range(count)]
    out = []
    for group in groups:
        rows, padding = left_padded(group)
        out.append((torch.tensor(rows), torch.tensor(padding) if padding is not None else None))
    return out


def methods_for(batch: int, ppsd_stages: int) -> tuple[str, ...]:
    """The methods a batch of `batch` rows is decoded by: AR and EESD, and PPSD where it is timed."""
    return (*REQUIRED, "ppsd") if ppsd_stages else REQUIRED


def measure(
    model: Any,
    batches: list[tuple[Any, Any]],
    *,
    repeats: int,
    sync: Callable[[], None] | None,
    ppsd_stages: int = 0,
    **settings: Any,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every batch of prompts ((ids, attention mask or None), `batches_of`) decoded by each method `repeats` times
    (interleaved; PPSD at `ppsd_stages` stages, none at 0), after an untimed warm-up decode per
    batch and method (captures and compilations, allocators); returns the decodes (without their calls) and the
    rows."""
    clock = PassClock(sync, captured_ticks=is_captured(settings.get("capture", "none")))
    clock.install()

    def run(ids: Any, mask: Any, method: str) -> dict[str, Any]:
        return decode(model, ids, method, clock, attention_mask=mask, ppsd_stages=ppsd_stages, **settings)

    timed = [(ids, mask, method) for ids, mask in batches for method in methods_for(ids.shape[0], ppsd_stages)]
    try:
        for ids, mask, method in timed:
            run(ids, mask, method)
        clock.calls.clear()
        runs = [run(ids, mask, method) for _ in range(repeats) for ids, mask, method in timed]
    finally:
        clock.uninstall()
    return [{k: v for k, v in r.items() if k != "calls"} for r in runs], host_rows(runs)


def measure_serving(
    model: Any,
    prompts: list[list[int]],
    sizes: list[int],
    *,
    repeats: int,
    sync: Callable[[], None] | None,
    **settings: Any,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`measure` for the serving loop (`--loop serve`): a serving run (`serve_decode`) per batch size and method,
    `repeats` times interleaved, after an untimed warm-up run of each (the captures of every running-batch size)."""
    clock = ServeClock(sync)
    clock.install()

    def run(batch: int, method: str) -> dict[str, Any]:
        result = serve_decode(model, prompts, batch, method, clock, **settings)
        clock.events.clear()
        clock.calls.clear()
        return result

    try:
        for batch in sizes:
            for method in REQUIRED:
                run(batch, method)
        runs = [run(batch, method) for _ in range(repeats) for batch in sizes for method in REQUIRED]
    finally:
        clock.uninstall()
    return runs, host_rows(runs)


def run_host(args: argparse.Namespace) -> int:
    import torch

    from calibrate.common import (
        base_metadata,
        check_counts,
        check_json_out,
        config_summary,
        model_and_head,
        parse_int_list,
    )
    from executor.models import load_tokenizer
    from executor.passes import resolve_capture
    from executor.prompts import load_prompts
    from sim.formats import write_text_atomic
    from sim.policy import parse_policy_spec

    if args.ppsd_stages is not None and (args.ppsd_stages < 0 or args.ppsd_stages == 1):
        raise ValueError(f"--ppsd-stages must be 0 (PPSD not timed) or 2 or more, got {args.ppsd_stages}")
    if args.ppsd_stages is not None and args.loop == "serve":
        raise ValueError(f"--ppsd-stages {args.ppsd_stages}: the serving loop's rounds are AR's and EESD's (--loop "
                         "serve times no PPSD; --loop generate does)")  # fmt: skip
    check_counts(("--prompts", args.prompts), ("--max-new-tokens", args.max_new_tokens), ("--repeats", args.repeats))
    args.batch = parse_int_list(args.batch, "--batch", 1)
    if args.sync_every < 1:
        raise ValueError(f"--sync-every must be >= 1, got {args.sync_every}")
    if args.loop == "serve" and args.sync_every != 1:
        raise ValueError(f"--sync-every {args.sync_every}: the serving loop reads the device after every round "
                         "(--loop serve takes 1)")  # fmt: skip
    if args.loop == "serve" and args.max_new_tokens < 2:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: a served request of one token runs no decode "
                         "round (--loop serve takes 2 or more)")  # fmt: skip
    if args.loop == "serve":
        args.ppsd_stages = 0  # the serving loop's rounds are AR's and EESD's
    elif args.ppsd_stages is None:  # PPSD alongside AR and EESD, at every batch size
        args.ppsd_stages = 2
    parse_policy_spec(args.policy)  # a bad spec named before the model loads
    check_json_out(args.out, args.force)
    device, dtype, model, head, exit_layer = model_and_head(args)
    capture = resolve_capture(args.capture, device, "greedy")
    tokenizer = load_tokenizer(args.model)
    texts = [p.text for p in load_prompts(args.prompt_set)][: args.prompts]
    prompts = [tokenizer(text).input_ids for text in texts]
    settings = {"exit_layer": exit_layer, "head": head, "policy": args.policy, "capture": capture,
                "max_new_tokens": args.max_new_tokens, "sync_every": args.sync_every}  # fmt: skip
    print(f"calibrate host: {args.model} on {device}, capture {capture}, E={exit_layer} {args.policy}, "
          f"{len(prompts)} prompts x {args.max_new_tokens} tokens x {args.repeats}, batch "
          f"{','.join(map(str, args.batch))}, {args.loop} loop"
          + (f", PPSD at {args.ppsd_stages} stages (sequential backend)" if args.ppsd_stages else ""))  # fmt: skip
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    if args.loop == "serve":
        runs, rows = measure_serving(model, prompts, args.batch, repeats=args.repeats, sync=sync, **settings)
    else:
        batches = [(ids.to(device), None if mask is None else mask.to(device))
                   for size in args.batch for ids, mask in batches_of(prompts, size)]  # fmt: skip
        runs, rows = measure(model, batches, repeats=args.repeats, sync=sync, ppsd_stages=args.ppsd_stages,
                             **settings)  # fmt: skip
    for row in rows:
        unit = "a tick (its every stage's pass)" if row["method"] == "ppsd" else "a round"
        print(
            f"{row['method']:>4} batch {row['batch']}: host work {row['host_ms_per_read']:.3f} ms a read, "
            f"{row['host_ms_per_round']:.3f} {unit}, {row['host_ms_per_pass']:.3f} a pass "
            f"({row['host_share_of_decode']:.2%} of the decode)"
        )
    timed = args.repeats * min(-(-len(prompts) // size) for size in args.batch)  # decodes per method and batch
    if timed < 3:
        print(f"note: {timed} timed decode(s) per method and batch: host work is a fraction of a "
              "millisecond, and one decode can run several times another on a busy machine; a scenario prices from "
              "the medians, so time at least 3 (--repeats, --prompts)", file=sys.stderr)  # fmt: skip
    snippet = by_method_snippet(rows, is_captured(capture))
    kind = "captured passes (paid once a read)" if is_captured(capture) else "uncaptured passes (paid every pass)"
    print(f"as a serving case's host work, for a profile of {kind}: {snippet}")
    if args.out is not None:
        metadata = base_metadata(args.model, device, dtype) | {
            "model_config": config_summary(model.model.config), "num_layers": model.num_layers,
            "exit_layer": exit_layer, "head": args.head, "policy": args.policy, "capture": capture,
            "sync_every": args.sync_every, "loop": args.loop, "ppsd_stages": args.ppsd_stages or None,
            "ppsd_backend": "sequential" if args.ppsd_stages else None, "prompt_set": args.prompt_set,
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens, "batch": args.batch, "repeats": args.repeats,
            "threads": torch.get_num_threads(),
        }  # fmt: skip
        data = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "metadata": metadata, "methods": rows,
                "serving_by_method": snippet, "decodes": runs}  # fmt: skip
        write_text_atomic(args.out, json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.out}; a scenario prices each method's host work from it with "
              f"latency.profile.host_work: {args.out} (a path relative to the scenario's folder)")  # fmt: skip
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="packaged name, HF directory or .gguf")
    p.add_argument("--head", default="shared", help="exit head: shared | shared:N | a head file (default: shared)")
    p.add_argument("--exit-layer", type=int, default=None, help="exit layer E (default: a head file's, else L / 2)")
    p.add_argument("--policy", default="fixed:1", help="EESD's draft policy (default: fixed:1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument(
        "--dtype", type=short_dtype, default=None, help="bf16 | fp16 | fp32 (default: bf16 on cuda, fp32 on cpu)"
    )
    p.add_argument("--capture", default="auto", help="how generate runs the passes: auto (as generate chooses) | "
                   "none | graph | compile | compile-layers | freeze (default: auto)")  # fmt: skip
    p.add_argument("--sync-every", type=int, default=1, help="AR steps per host read (default: 1, as a server reads)")
    p.add_argument("--prompt-set", default="builtin", help="a prompt set or JSONL file (default: builtin)")
    p.add_argument("--prompts", type=int, default=4, help="its first N prompts (default: 4)")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated: prompts decoded together, each prompt "
                   "once, a batch past --prompts filled with them again (default: 1)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per decode (default: 48)")
    p.add_argument("--loop", choices=LOOPS, default="generate", help="what is timed: generate's decodes of static "
                   "batches, or the serving loop's rounds (eesd serve-bench's: requests leave and others take their "
                   "slots; the file for a serving scenario) (default: generate)")  # fmt: skip
    p.add_argument("--ppsd-stages", type=int, default=None, help="PPSD's pipeline stages, timed on its sequential "
                   "backend at every --batch, the rows in lockstep (0: PPSD not timed; --loop serve times AR and "
                   "EESD) (default: 2)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=2, help="times over the prompts, methods interleaved (default: 2)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file (eesd.host_work)")
