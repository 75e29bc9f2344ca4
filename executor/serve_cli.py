"""`eesd serve-bench --workload FILE --model NAME`: serve a workload with continuous batching on this machine.

The workload file is the simulator's (`sim.workload`); requests arrive on the wall clock (seconds from the start, or a
closed loop) and are served by `executor.serving.serve` with each method in turn, on the same requests. Prompts:
`random` (seeded token ids, each request's `prompt_len` of them) or a prompt set (`builtin`, `requests`, `humaneval`,
a JSONL file): request i runs the prompt its trace row names (`prompt_id`), else the set's prompt i (cyclically, in
sorted id order, as `sim.acceptance.TraceAcceptance` replays a trace), encoded as `eesd calibrate acceptance` encodes
it, keeping its last `prompt_len` tokens. Outputs stop at `output_len` tokens (at an EOS too with `--eos`). Prints the
simulator's metrics (`sim.serving.metrics`) per method and, with `--json`, writes them with the run's metadata.
`--replicas N` serves on N worker processes, each a whole server with its own copy of the model, an arrival going to
one of them by `--dispatch` (`executor.replicas`, the simulator's `serving.replicas`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

from executor.runtime import (
    add_threads_argument,
    check_device,
    flag_defaults,
    parse_boundaries,
    stage_count,
    use_threads,
)
from sim.formats import long_dtype

DTYPES = ("float32", "float64", "bfloat16", "float16")
COLUMNS = ("method", "tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms",
           "latency_mean_ms", "occupancy", "goodput_rps")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", type=Path, required=True, help="workload YAML (see scenarios/workloads/)")
    parser.add_argument("--model", required=True, help="local HF directory, a .gguf file, or a packaged model name")
    parser.add_argument("--methods", default="ar", help="comma-separated: ar, eesd, ppsd (default: ar)")
    parser.add_argument(
        "--exit-layer", type=int, default=None,
        help="layers the draft runs (eesd default: L // 2; ppsd: inside stage 1, default its end, as serve-sim has it)",
    )  # fmt: skip
    parser.add_argument("--policy", default="fixed:4", help="eesd: draft policy (default: fixed:4)")
    parser.add_argument("--head", default="shared", help="eesd: exit head, shared | shared:N | FILE")
    parser.add_argument("--max-batch", type=int, default=8, help="batch slots of ar and eesd (default: 8)")
    parser.add_argument(
        "--ppsd-max-batch", type=int, default=1,
        help="ppsd: the widest static batch, decoded in lockstep and taking new requests only once every row is done "
        "(default: 1, one request at a time; serve-sim's serving.by_method.ppsd.serving.max_batch)",
    )  # fmt: skip
    parser.add_argument(
        "--ppsd-batching", choices=("static", "continuous"), default="static",
        help="ppsd: static batches (new requests once every row is done), or continuous: a request waiting joins the "
        "running batch at the next host read with a slot free, the pipe restarting from every row's last token "
        "(default: static; serve-sim's serving.ppsd_batching)",
    )  # fmt: skip
    parser.add_argument(
        "--ppsd-join-min", type=int, default=1,
        help="ppsd, continuous: the fewest waiting requests that stop the running batch to join it, or as many as the "
        "slots free if fewer (default: 1; serve-sim's serving.ppsd_join_min)",
    )  # fmt: skip
    parser.add_argument(
        "--stages", type=int, default=None, help="ppsd: pipeline stages (default: 2, or what --stage-boundaries cut); "
        "it drafts at the end of stage 1 (with --head FILE, at the head's exit layer)",
    )  # fmt: skip
    parser.add_argument(
        "--stage-boundaries", default=None, help="ppsd: cut points, e.g. 15 or 8,19, or every bound (default: even)"
    )
    parser.add_argument(
        "--backend",
        default="sequential",
        choices=("sequential", "streams", "distributed"),
        help="ppsd: stages in turn, on a GPU one CUDA stream each, or a process per stage (torch.distributed; "
        "--threads torch threads each) (default: sequential)",
    )
    parser.add_argument(
        "--kv-capacity-tokens", type=int, default=None, help="KV budget in tokens, per replica (default: none)"
    )
    parser.add_argument(
        "--replicas", type=int, default=1,
        help="worker processes, each a whole server with its own copy of the model (default: 1, this process)",
    )  # fmt: skip
    parser.add_argument(
        "--dispatch", default="least_loaded", choices=("least_loaded", "least_tokens", "round_robin"),
        help="with --replicas: which replica an arriving request goes to (default: least_loaded)",
    )  # fmt: skip
    parser.add_argument(
        "--prompts", default="random", help="random | builtin | requests | humaneval | FILE.jsonl (default: random); "
        "a set's prompt is cut to its last prompt_len tokens, so it must hold at least that many",
    )  # fmt: skip
    parser.add_argument("--eos", action="store_true", help="stop a request at the model's EOS token too")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT bound in ms")
    parser.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT bound in ms")
    parser.add_argument("--seed", type=int, default=0, help="seed of random prompts and draft policies (default: 0)")
    parser.add_argument(
        "--dtype", type=long_dtype, default="float32", help=f"one of {', '.join(DTYPES)} (default: float32)"
    )
    parser.add_argument(
        "--device", default="cpu",
        help="cpu, cuda, cuda:1, ... (default: cpu); with --replicas, one per replica too: cuda:0,cuda:1",
    )  # fmt: skip
    parser.add_argument(
        "--capture", default="none", choices=("none", "auto", "graph", "compile-layers"),
        help="decode passes uncaptured (default) or, on a GPU, captured per running-batch size (graph: eager kernels "
        "in CUDA graphs, cheap to capture; compile-layers: compiled per batch size and token count); the warm-up "
        "then runs every batch size once",
    )  # fmt: skip
    add_threads_argument(parser)
    parser.add_argument("--compare-ar", action="store_true", help="also run every request alone with AR and compare")
    parser.add_argument("--json", type=Path, default=None, help="write the metrics and metadata to this JSON file")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods or any(m not in ("ar", "eesd", "ppsd") for m in methods):
        raise ValueError(f"--methods must list ar, eesd and/or ppsd, comma-separated, got {text!r}")
    if len(set(methods)) < len(methods):
        raise ValueError(f"--methods must name each method once (a second run is not a comparison), got {text!r}")
    return methods


# flag, argument, the methods it is for (None: --replicas > 1): a value other than the flag's default that no run
# would read is refused, as eesd generate refuses it
FLAG_USERS = (
    ("--exit-layer", "exit_layer", ("eesd", "ppsd")), ("--policy", "policy", ("eesd",)),
    ("--max-batch", "max_batch", ("ar", "eesd")),
    ("--head", "head", ("eesd", "ppsd")),
    ("--stages", "stages", ("ppsd",)), ("--stage-boundaries", "stage_boundaries", ("ppsd",)),
    ("--backend", "backend", ("ppsd",)), ("--ppsd-max-batch", "ppsd_max_batch", ("ppsd",)),
    ("--ppsd-batching", "ppsd_batching", ("ppsd",)), ("--ppsd-join-min", "ppsd_join_min", ("ppsd",)),
    ("--dispatch", "dispatch", None),
)  # fmt: skip


def check_flags(args: argparse.Namespace, methods: list[str]) -> None:
    """No flag the runs would ignore (before the model loads)."""
    defaults = flag_defaults(add_arguments)
    for flag, name, users in FLAG_USERS:
        if getattr(args, name) == defaults[name]:
            continue
        if users is None and args.replicas <= 1:
            raise ValueError(f"{flag} is for --replicas 2 or more (which replica a request goes to)")
        if users is not None and not set(users) & set(methods):
            raise ValueError(f"{flag} is for --methods {' or '.join(users)}, got --methods {','.join(methods)}")


def run(args: argparse.Namespace) -> int:
    from sim.formats import check_output
    from sim.serving import SLO
    from sim.workload import load_workload

    methods = parse_methods(args.methods)
    check_flags(args, methods)
    args.stage_boundaries = parse_boundaries(args.stage_boundaries)
    args.stages = stage_count(args.stages, args.stage_boundaries)
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.backend == "distributed" and args.replicas > 1:
        raise ValueError(f"--backend distributed runs one pipeline of stage processes: --replicas {args.replicas} "
                         "needs --backend sequential or streams")  # fmt: skip
    if args.ppsd_join_min != 1 and args.ppsd_batching != "continuous":
        raise ValueError("--ppsd-join-min is continuous batching's: give it with --ppsd-batching continuous")
    for flag, value in (("--max-batch", args.max_batch), ("--ppsd-max-batch", args.ppsd_max_batch),
                        ("--ppsd-join-min", args.ppsd_join_min)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.json is not None:
        check_output("--json", args.json)
    for flag, value in (("--slo-ttft-ms", args.slo_ttft_ms), ("--slo-tpot-ms", args.slo_tpot_ms)):
        if value is not None and not 0 < value < float("inf"):
            raise ValueError(f"{flag} must be a time in ms > 0, got {value:g}")
    workload = load_workload(args.workload)
    slo = SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms)
    _check_kv_capacity(workload, methods, args)
    import torch

    from executor.models import load_model, load_tokenizer

    names = args.device.split(",")  # one, or one per replica
    devices = [check_device(name) for name in names]
    if len(devices) not in (1, args.replicas):
        raise ValueError(f"--device: one device, or one per replica ({args.replicas}), got {args.device!r}")
    device = devices[0]
    if args.capture in ("graph", "compile-layers") and device.type != "cuda":
        raise ValueError(f"--capture {args.capture} needs a CUDA device (--device cuda), got {device}")
    threads = use_threads(args.threads)
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    args.replica_devices = names * (args.replicas // len(names))  # a device per replica (`serve_replicas`)
    print(f"serve-bench: {args.model}, {', '.join(methods)}, {device} ({args.dtype}); {threads}", file=sys.stderr)
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    tokenizer = load_tokenizer(args.model) if args.prompts != "random" else None
    prompts = bench_prompts(workload, args.prompts, tokenizer, model.config.vocab_size, args.seed)
    eos = model.generation_config.eos_token_id if args.eos else None
    rows, records, passes = [], {}, {}
    for method in methods:
        row, outcome = serve_once(model, workload, prompts, method, args, eos, slo)
        rows.append(row)
        records[method] = [_record(r, outcome.dispatched_s) for r in outcome.result.records]
        passes[method] = [dataclasses.asdict(log) for log in outcome.result.passes]
        if args.compare_ar:
            row["identical_to_ar"] = identical_to_ar(model, workload, prompts, outcome.outputs, eos)
            same = "identical to" if row["identical_to_ar"] else "NOT all identical to"
            print(f"{method}: the {len(workload.requests)} requests' tokens {same} each request decoded alone with AR",
                  file=sys.stderr)  # fmt: skip
        if args.json is not None:  # after every method: an interrupted run keeps the methods it finished
            write_json(args.json, _document(args, workload, model, device, rows, records, passes))
    print(table(rows, slo=args.slo_ttft_ms is not None or args.slo_tpot_ms is not None))
    if args.json is not None:
        print(f"wrote {args.json}")
    return 0 if all(row.get("identical_to_ar", True) for row in rows) else 1


def _check_kv_capacity(workload: Any, methods: list[str], args: argparse.Namespace) -> None:
    """--kv-capacity-tokens holds the workload's largest request under each method (before the model loads)."""
    from sim.serving import method_kv_tokens, never_admitted

    budget = args.kv_capacity_tokens
    if budget is not None and budget < 1:
        raise ValueError(f"--kv-capacity-tokens must be >= 1 (leave it out for no budget), got {budget}")
    for method in methods:
        tokens_of = method_kv_tokens(method, args.policy)
        largest = never_admitted(workload, tokens_of, budget)
        if largest is not None:
            raise ValueError(
                f"--kv-capacity-tokens {budget}: request {largest.index} of {args.workload} needs {tokens_of(largest)} "
                f"KV tokens under {method} (prompt, output and drafts), so it could never be admitted"
            )


def warm_up_workload(workload: Any, prompts: list[list[int]], rows: int) -> tuple[Any, list[list[int]]]:
    """The untimed run before a timed one: the first `rows` requests at once, request i asking for i + 2 tokens (its
    prefill makes the first; at most 4 with one row), so that the running batch shrinks through every size from
    `rows` to 1 (each size's captured passes made before timing)."""
    from sim.workload import Request, ServingWorkload

    chosen = workload.requests[: max(1, min(rows, len(workload.requests)))]
    outputs = [min(r.output_len, 4) for r in chosen] if len(chosen) == 1 else [i + 2 for i in range(len(chosen))]
    warm = tuple(Request(i, r.prompt_len, n, 0.0) for i, (r, n) in enumerate(zip(chosen, outputs, strict=True)))
    return ServingWorkload(warm), [prompts[r.index] for r in chosen]


def warm_ups(
    workload: Any, prompts: list[list[int]], method: str, max_batch: int, captured: bool
) -> list[tuple[Any, list[list[int]]]]:
    """The untimed runs before a timed one (`warm_up_workload`): uncaptured, one of one request; captured, AR's and
    EESD's one run through every running-batch size, and PPSD's one static batch of each width from 1 to `max_batch`,
    the widest last (a model keeps `MAX_RUNNERS_PER_MODEL` captured pipelines, so of more widths the widest stay)."""
    if not captured:
        return [warm_up_workload(workload, prompts, 1)]
    if method != "ppsd":
        return [warm_up_workload(workload, prompts, max_batch)]
    widths = range(1, min(max_batch, len(workload.requests)) + 1)
    return [warm_up_workload(workload, prompts, width) for width in widths]


def serve_once(model: Any, workload: Any, prompts: list[list[int]], method: str, args: argparse.Namespace, eos: Any,
               slo: Any) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """One method over the workload: a short warm-up on the first prompt, then the timed run; (its metrics row, the
    outcome)."""
    from executor.serving import serve
    from sim.serving import metrics

    common = dict(
        method=method, exit_layer=args.exit_layer, policy=args.policy, head=args.head, max_batch=args.max_batch,
        kv_capacity_tokens=args.kv_capacity_tokens, eos_token_id=eos, seed=args.seed, capture=args.capture,
    )  # fmt: skip
    if method == "ppsd":  # static batches, drafting at --exit-layer, else stage 1's end (or a head file's)
        common.update(
            max_batch=args.ppsd_max_batch,
            stages=args.stages,
            stage_boundaries=args.stage_boundaries,
            backend=args.backend,
            ppsd_batching=args.ppsd_batching,
            ppsd_join_min=args.ppsd_join_min,
        )
        if args.backend == "distributed":
            common["threads_per_stage"] = args.threads
    if args.replicas > 1:  # each worker loads the model and warms up itself
        import torch

        from executor.replicas import serve_replicas

        warm, warm_prompts = warm_up_workload(workload, prompts, 1)  # the settings checked here, before any worker
        serve(model, warm, warm_prompts, **{**common, "capture": "none"})  # starts (nothing captured on its device)

        outcome = serve_replicas(
            args.model, workload, prompts, replicas=args.replicas, dispatch=args.dispatch, dtype=args.dtype,
            device=args.replica_devices, threads=args.threads or torch.get_num_threads(), **common,
        )  # fmt: skip
    else:
        for warm, warm_prompts in warm_ups(workload, prompts, method, common["max_batch"], args.capture != "none"):
            serve(model, warm, warm_prompts, **common)
        outcome = serve(model, workload, prompts, **common)
    row = {"method": method, **metrics(outcome.result, slo)}
    if args.replicas > 1:
        row.update(replicas=args.replicas, dispatch=args.dispatch)
    if method == "eesd":
        row.update(exit_layer=args.exit_layer, policy=args.policy)
    if method == "ppsd":
        row.update(
            stages=args.stages,
            stage_boundaries=args.stage_boundaries,
            backend=args.backend,
            max_batch=args.ppsd_max_batch,
            batching=args.ppsd_batching,
            join_min=args.ppsd_join_min,
        )
    return row, outcome


def bench_prompts(workload: Any, source: str, tokenizer: Any, vocab: int, seed: int) -> list[list[int]]:
    """Each request's prompt token ids (see the module docstring)."""
    requests = workload.requests
    if source == "random":
        return [[random.Random(seed * 1_000_003 + r.index).randrange(vocab) for _ in range(r.prompt_len)]
                for r in requests]  # fmt: skip
    from executor.prompts import encode_prompt, load_prompts

    by_id = {p.id: p for p in load_prompts(source)}
    ordered = sorted(by_id)
    prompts = []
    for request in requests:
        prompt_id = request.prompt_id or ordered[request.index % len(ordered)]
        if prompt_id not in by_id:
            raise ValueError(f"{workload.source}: request {request.index}: prompt_id {prompt_id!r} is not in {source}")
        ids = encode_prompt(tokenizer, by_id[prompt_id].text)
        if len(ids) < request.prompt_len:
            raise ValueError(
                f"{workload.source}: request {request.index}: prompt_len {request.prompt_len}, but prompt "
                f"{prompt_id!r} has {len(ids)} tokens; expected prompt_len <= {len(ids)}"
            )
        prompts.append(ids[len(ids) - request.prompt_len :])
    return prompts


def identical_to_ar(model: Any, workload: Any, prompts: list[list[int]], outputs: list[list[int]], eos: Any) -> bool:
    """Whether every request's served tokens are those `generate` gives it alone with AR."""
    from executor.api import generate

    for request, prompt, output in zip(workload.requests, prompts, outputs, strict=True):
        alone = generate(model, prompt, method="ar", max_new_tokens=request.output_len, eos_token_id=eos)
        if alone.sequences[0, len(prompt) :].tolist() != output:
            print(f"request {request.index}: served tokens differ from AR alone", file=sys.stderr)
            return False
    return True


def _record(record: Any, dispatched_s: list[float] | None) -> dict[str, Any]:
    """A request's record for the JSON; with replicas, the one that served it and when it was sent there."""
    keys = ("index", "prompt_len", "output_len", "arrival_s", "start_s", "first_token_s", "finish_s", "tokens")
    row = {key: getattr(record, key) for key in keys}
    if dispatched_s is not None:
        row.update(replica=record.replica, dispatched_s=dispatched_s[record.index])
    return row


def table(rows: list[dict[str, Any]], slo: bool = True) -> str:
    """The rows' main metrics, with the replicas and whether a run saturated where any row says so; goodput only
    with an SLO (`slo`: without one every request counts, and it is the requests/s)."""
    from sim.serving_report import text_table

    rows = [{"replicas": 1, "saturated": False, **row} for row in rows]
    replicas = ["replicas"] if any(row["replicas"] > 1 for row in rows) else []
    saturated = ["saturated"] if any(row["saturated"] for row in rows) else []
    columns = [c for c in COLUMNS[1:] if slo or c != "goodput_rps"]
    return text_table(rows, [COLUMNS[0], *replicas, *columns, *saturated])


def _document(
    args: argparse.Namespace, workload: Any, model: Any, device: Any, rows: list, records: dict, passes: dict
) -> dict:
    """Metadata, a metrics row per method, and per method every request's record and every prefill and decode round
    the run timed (`sim.serving.PassLog`'s fields: a simulator costs them with `ServingSimulation.logged_us`)."""
    from calibrate.common import base_metadata

    metadata = {
        **base_metadata(args.model, device, model.dtype),
        "workload": str(args.workload),
        "requests": len(workload.requests),
        "max_batch": args.max_batch,
        "ppsd_max_batch": args.ppsd_max_batch,
        "kv_capacity_tokens": args.kv_capacity_tokens,
        "prompts": args.prompts,
        "eos": args.eos,
        "capture": args.capture,
    }
    return {"metadata": metadata, "rows": rows, "requests": records, "passes": passes}


def write_json(path: Path, document: dict[str, Any]) -> None:
    """The document as JSON, a metric without a value (nan: e.g. no TPOT of one-token requests) as null."""
    from sim.formats import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(_finite(document), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
