"""`eesd calibrate scenario`: a ready-to-run scenario YAML from a latency profile and an acceptance trace.

After `eesd calibrate latency` and `eesd calibrate acceptance` on a machine, the simulator needs a scenario that says
what the files were measured with: the model's shape, the dtype, how the passes ran (CUDA graphs, frozen kernels:
`attention: cache`), the GPU, the exit head the trace recorded, its exit layers, a workload whose decode runs inside the
profiled grid and no longer than the trace. Written by hand these are easy to get wrong; here they are read from the
files' metadata. The scenario compares AR with EESD under several draft policies at each of the trace's exit layers
(and, with `--methods eesd,ppsd`, PPSD on two stages of the one device; with `--link FILE` also on a process per stage,
the distributed backend, its messages priced by that link profile and, on a CPU, its processes slowing each other as
a `processes` contention profile says), and is checked by loading it before it is kept;
`eesd simulate FILE` then runs it and `eesd validate FILE` checks it against the executor on the machine the files came
from. Torch-free: it reads the files only.

    eesd calibrate scenario --latency my-profiles/latency_smollm2-135m_cpu_fp32.csv \\
        --acceptance my-profiles/acceptance_smollm2-135m_shared_builtin.csv --out scenarios/mine.yaml

The workload: min(8, the trace's prompts) requests at batch 1, each of the trace's `max_new_tokens`; the prompt the
profile's smallest context (its smallest prefill where it is also profiled) or, with frozen kernels (a static cache,
`attention: cache`), its smallest prefill.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sim.acceptance import check_trace_fits
from sim.formats import (
    DataFile,
    check_output,
    quote,
    read_acceptance_trace,
    read_contention_profile,
    read_latency_profile,
    read_link_profile,
    trace_exit_head,
    write_text_atomic,
)
from sim.hardware import gpu_named_by
from sim.host_work import check_fits, read_host_work
from sim.models import ModelConfig, check_claimed_model, check_profiled_layers, known_model_like, named_model
from sim.policy import make_policy
from sim.runner import simulate_point
from sim.scenario import Point, Scenario, claimed_dtype, load_points

DEFAULT_POLICIES = ("fixed:1", "fixed:2", "fixed:3", "beta-ts")  # as `eesd calibrate scenario --policies`
MAX_REQUESTS = 8


def run(args: argparse.Namespace) -> int:
    methods = _list(args.methods, "--methods")
    bad = [m for m in methods if m not in ("eesd", "ppsd")]
    if bad or not methods:
        raise ValueError(f"--methods: expected eesd and/or ppsd (AR is always the baseline), got {args.methods!r}")
    policies = _list(args.policies, "--policies")
    for policy in policies:
        try:
            make_policy(policy)
        except ValueError as err:
            raise ValueError(f"--policies: {policy!r}: {err}") from None
    command = shlex.join(["eesd", *sys.argv[1:]]) if sys.argv[1:2] == ["calibrate"] else ""
    path = write_scenario(
        args.latency, args.acceptance, args.out, methods=methods, policies=policies, name=args.name,
        draft_profile=args.draft_profile, contention=args.contention, force=args.force, command=command,
        serving=args.serving, host=args.host, link=args.link,
    )  # fmt: skip
    if args.serving:
        print(f"wrote {path}: a serving scenario (AR against EESD under Poisson load)")
        print(f"next: eesd serve-sim {path}   (where EESD stops paying, and the rate each method sustains in the SLO)")
        return 0
    points = load_points(path)
    print(f"wrote {path}: {len(points)} points (AR the baseline of each)")
    print(f"next: eesd simulate {path} --break-even   (AR against each point, and the acceptance each needs)")
    if len(args.acceptance) == 1:  # validate replays one trace's prompts
        print(f"      eesd validate {path}   (the simulator against the executor, on the machine the files came from)")
    return 0


def _list(text: str, flag: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise ValueError(f"{flag}: expected a comma-separated list, got {text!r}")
    return items


def write_scenario(
    latency: Path,
    acceptance: Path | Sequence[Path],
    out: Path,
    *,
    methods: Sequence[str] = ("eesd",),
    policies: Sequence[str] = DEFAULT_POLICIES,
    name: str | None = None,
    draft_profile: Path | None = None,
    contention: Path | None = None,
    force: bool = False,
    command: str = "",
    serving: bool = False,
    host: Path | None = None,
    link: Path | None = None,
) -> Path:
    """Write the scenario (module docstring) to `out`, atomically, once it loads; ValueError naming the file and
    field where the files do not make one. Several traces (heads to compare) make one sweep over all of them."""
    out = Path(out)
    paths = [Path(acceptance)] if isinstance(acceptance, (str, Path)) else [Path(p) for p in acceptance]
    if serving and "ppsd" in methods:
        raise ValueError("--methods: --serving writes AR against EESD (PPSD serving needs a topology of its own)")
    if serving and len(paths) > 1:
        raise ValueError("--acceptance: --serving takes one trace (write one serving scenario per head)")
    twice = [path for index, path in enumerate(paths) if path.resolve() in {p.resolve() for p in paths[:index]}]
    if twice:
        raise ValueError(f"--acceptance: {twice[0]} given twice (each trace once: a repeat would run its points twice)")
    check_output("--out", out, force=force)
    if name is not None:
        _check_name(name)
    profile = _read("--latency", latency, read_latency_profile, "a latency profile CSV (eesd calibrate latency)")
    what = "an acceptance trace CSV (eesd calibrate acceptance)"
    traces = [(path, _read("--acceptance", path, read_acceptance_trace, what)) for path in paths]
    processes = False
    if contention is not None:
        shared = _read(
            "--contention", contention, read_contention_profile, "a contention profile CSV (eesd calibrate contention)"
        )
        processes = shared.metadata.get("backend") == "processes"
    _check_distributed(link, processes, methods, serving)
    acceptance, trace = traces[0]
    data = scenario_data(latency, profile, traces, out.parent, methods, policies, name or _file_name(out))
    cut = _workload_cut(traces, out.parent, data["workload"])  # (a serving scenario takes one trace)
    narrow = [path for path, t in traces if t.metadata.get("draft_dtype")]
    if narrow and len(traces) > 1:
        raise ValueError(f"--acceptance: {narrow[0]}: a trace of narrow drafts is replayed alone (with its profile)")
    if narrow or draft_profile is not None:
        _add_draft_profile(data, acceptance, trace, draft_profile, out.parent)
    if contention is not None:
        data["topology"]["contention"] = _relative(contention, out.parent)
    if link is not None:  # PPSD's points again, on a process per stage
        _add_distributed(data, _relative(link, out.parent))
    if serving:  # sized from the batch scenario's AR point
        data = _serving_data(data, _loaded(out, _yaml(data), load_points)[0], profile)
    notes = [] if host is None else [_host_work(data, host, latency, profile, out.parent, serving)]
    drafting = () if "eesd" not in methods else policies[:1] if serving else policies  # (serving keeps the first)
    for said in (cut, _width_note(profile, drafting)):
        if said is not None:
            notes += textwrap.wrap(said, 110, initial_indent="  ", subsequent_indent="  ")  # a header line each
            print(f"note: {said}")
    text = _header(latency, profile, traces, command, serving, notes) + _yaml(data)
    _loaded(out, text, _serving_loader() if serving else load_points)
    write_text_atomic(out, text)
    return out


def _check_distributed(link: Path | None, processes: bool, methods: Sequence[str], serving: bool) -> None:
    """`--link` (distributed PPSD points) asks for PPSD in a batch scenario; a `processes` contention profile (stage
    processes of a CPU) is what those points read, so it asks for `--link`."""
    if link is not None:
        if serving or "ppsd" not in methods:
            raise ValueError("--link prices PPSD's distributed points: it needs --methods with ppsd (and no --serving)")
        _read("--link", link, read_link_profile, "a link profile CSV (eesd calibrate link)")
    elif processes:
        raise ValueError(
            "--contention: a processes profile prices PPSD's stage processes on one host (the distributed backend): "
            "give --link FILE too, the messages between them (eesd calibrate link --busy-ms MS)"
        )


def _add_distributed(data: dict[str, Any], link: str) -> None:
    """Each PPSD point of the sweep once more on the distributed backend (a process per stage), over `link`."""
    config = data["sweep"]["config"]
    distributed = [{**entry, "ppsd_backend": "distributed", "topology.link": {"profile": link}}
                   for entry in config if entry.get("method") == "ppsd"]  # fmt: skip
    data["sweep"]["config"] = config + distributed


def _read(flag: str, path: Path, read: Callable[[Path], DataFile], expected: str) -> DataFile:
    """The file `flag` names, read; a ValueError naming the flag for a missing file, a folder or a file that does not
    read as `expected`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; expected {expected}")
    if not path.exists():
        raise ValueError(f"{flag} {path}: no such file; expected {expected}")
    try:
        return read(path)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def _width_note(profile: DataFile, policies: Sequence[str]) -> str | None:
    """Where a policy's widest verify pass (k + 1 tokens after k drafts) lies past the profile's q: those points
    extrapolate it, and the `--q` that would price them."""
    profiled = [int(q) for q in (profile.metadata.get("grid") or {}).get("q", [])]
    widths = {policy: make_policy(policy).max_draft_len + 1 for policy in policies}
    wide = {policy: q for policy, q in widths.items() if profiled and q > max(profiled)}
    if not wide:
        return None
    listed = ", ".join(f"{policy} up to {q}" for policy, q in wide.items())
    needed = ",".join(map(str, sorted(set(profiled) | set(range(1, max(wide.values()) + 1)))))
    return (
        f"the verify passes of {listed} tokens lie past the profile's q (at most {max(profiled)}): those points "
        f"extrapolate them; `eesd calibrate latency --q {needed}` (with the profile's other flags) would price them"
    )


def _check_name(name: str) -> None:
    """`--name` is the scenario's `name`: one folder name (`sim.scenario.Scenario`'s rule)."""
    try:
        Scenario._name(name)
    except ValueError as err:
        raise ValueError(f"--name {quote(name)}: {err}") from None


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, width=120)


SERVING_REQUESTS = 200
LOAD_FACTORS = (0.25, 0.5, 1, 2, 4, 8)  # arrival rates, in units of what AR serves alone (one request at a time)


def _serving_data(data: dict[str, Any], point: Point, profile: DataFile) -> dict[str, Any]:
    """The scenario as a serving one (`eesd serve-sim`): Poisson arrivals of the trace's requests (its prompt and
    output lengths) at rates from a quarter to eight times what AR serves one request at a time (its batch-1 decode
    from the batch scenario's AR point), AR against EESD with the first policy, batches up to the profile's largest,
    SLOs of ten and two AR steps for TTFT and TPOT (to edit: yours)."""
    ar = simulate_point(point).baseline
    workload = data["workload"]
    step_ms = 1e3 / ar.tokens_per_s
    alone_per_s = ar.tokens_per_s / max(workload["output_len"] - 1, 1)
    serving_data = {k: v for k, v in data.items() if k not in ("method", "workload", "sweep")}
    serving_data["acceptance"] = {**data["acceptance"], "reuse": "cycle"}  # more requests than the trace has prompts
    serving_data["serving"] = {
        "workload": {
            "requests": SERVING_REQUESTS, "seed": 0, "arrival": {"process": "poisson", "rate_per_s": 1},
            "prompt_len": workload["prompt_len"], "output_len": workload["output_len"],
        },
        "methods": ["ar", "eesd"],
        "rates_per_s": [float(f"{factor * alone_per_s:.3g}") for factor in LOAD_FACTORS],
        "max_batch": max(record.batch for record in profile.records),
        "kv_capacity_tokens": "auto" if "gpu" in data["topology"] else None,
        "slo": {"ttft_ms": float(f"{10 * step_ms:.3g}"), "tpot_ms": float(f"{2 * step_ms:.3g}")},
    }  # fmt: skip
    return serving_data


def scenario_data(
    latency: Path,
    profile: DataFile,
    traces: Sequence[tuple[Path, DataFile]],
    folder: Path,
    methods: Sequence[str],
    policies: Sequence[str],
    name: str | None,
) -> dict[str, Any]:
    """The scenario's fields, in the order a reader expects them: the first trace's, and a sweep over every trace's
    head and exit layers."""
    model, model_field = _model(latency, profile)
    try:
        check_profiled_layers(model, profile.metadata)
    except ValueError as err:
        raise ValueError(f"{latency}: {err}") from None
    for acceptance, trace in traces:
        try:
            check_claimed_model(model, trace.metadata)
        except ValueError as err:
            raise ValueError(f"{acceptance}: {err} (the latency profile {latency} is of {model.name})") from None
        try:
            check_trace_fits(trace, model)
        except ValueError as err:
            raise ValueError(f"--acceptance: {err} (the latency profile {latency} is of {model.name})") from None
    acceptance, trace = traces[0]
    dtype = claimed_dtype(profile.metadata)
    if dtype is None:
        given = profile.metadata.get("dtype")
        raise ValueError(f"{latency}: metadata.dtype: expected bfloat16, float16 or float32, got {given!r}")
    on_gpu = profile.metadata.get("device_type") == "cuda"
    frozen = profile.metadata.get("kernels") == "frozen"
    heads = [_head(path, t, folder) for path, t in traces]
    exit_layers = heads[0].exit_layers
    prompts = min(head.prompts for head in heads)
    output_len = min(_output_len(path, t) for path, t in traces)
    data: dict[str, Any] = {
        "name": name or _name(profile, model, dtype),
        "description": _description(profile, trace, model, dtype, len(traces)),
        "seed": 0,
        "model": model_field,
        "dtype": dtype,
        "method": "eesd",
        "exit_layer": exit_layers[-1],
        "exit_head": trace_exit_head(acceptance, trace),
        "policy": policies[0],
    }
    if frozen:
        data["attention"] = "cache"  # the frozen executor's static cache: every pass attends over all of it
    data["latency"] = {"profile": {"path": _relative(latency, folder), "cuda_graphs": on_gpu and _has_graphs(profile)}}
    data["acceptance"] = {"trace": _relative(acceptance, folder)}
    topology: dict[str, Any] = {"stages": 1, "link": "ideal"}
    gpu = gpu_named_by(str(profile.metadata.get("device", ""))) if on_gpu else None
    if gpu is not None:
        topology = {"gpu": gpu, **topology}
    data["topology"] = topology
    data["workload"] = {
        "requests": min(MAX_REQUESTS, prompts),
        "batch_size": 1,
        "prompt_len": _prompt_len(latency, profile, frozen),
        "output_len": output_len,
    }
    data["sweep"] = _sweep(methods, policies, heads, on_gpu)
    return data


@dataclass(frozen=True)
class _Head:
    """What one trace replays: its file (relative to the scenario), head, exit layers and prompts."""

    trace: str
    exit_head: str
    exit_layers: list[int]
    prompts: int


def _head(path: Path, trace: DataFile, folder: Path) -> _Head:
    layers = sorted({record.exit_layer for record in trace.records})
    prompts = len({record.prompt_id for record in trace.records if record.exit_layer == layers[0]})
    return _Head(_relative(path, folder), trace_exit_head(path, trace), layers, prompts)


def _model(latency: Path, profile: DataFile) -> tuple[ModelConfig, Any]:
    """The profile's model: one the simulator knows, by its name or by the shape its `model_config` gives (a known
    model loaded from a path), else that shape inline."""
    meta = profile.metadata
    named = named_model(str(meta.get("model", "")))
    if named is not None:
        try:
            check_claimed_model(named, meta)
            return named, named.name
        except ValueError:
            pass  # a file named like a known model but of another shape: its own config decides
    config = meta.get("model_config")
    if not isinstance(config, Mapping):
        raise ValueError(
            f"{latency}: metadata.model: {meta.get('model')!r} is no model the simulator knows by name and the file "
            "has no model_config to read its shape from"
        )
    layers = meta.get("total_layers") or config.get("num_hidden_layers")
    fields = {
        "num_layers": layers,
        "hidden_size": config.get("hidden_size"),
        "num_heads": config.get("num_attention_heads"),
        "num_kv_heads": config.get("num_key_value_heads") or config.get("num_attention_heads"),
        "intermediate_size": config.get("intermediate_size"),
        "vocab_size": config.get("vocab_size"),
    }
    missing = [key for key, value in fields.items() if not isinstance(value, int) or value < 1]
    if missing:
        raise ValueError(f"{latency}: metadata.model_config: no positive integer for {', '.join(missing)}")
    inline: dict[str, Any] = {"name": _label(str(meta.get("model", "model"))), **fields}
    head_dim = config.get("head_dim")
    if isinstance(head_dim, int) and head_dim != fields["hidden_size"] // fields["num_heads"]:
        inline["head_size"] = head_dim
    if isinstance(config.get("max_position_embeddings"), int):
        inline["max_position_embeddings"] = config["max_position_embeddings"]
    shape = ModelConfig(**inline)
    known = known_model_like(shape)  # a known model at another path
    return (known, known.name) if known is not None else (shape, inline)


def _label(model: str) -> str:
    """A model's name for the scenario: a path's stem."""
    return Path(model).stem if "/" in model or model.endswith(".gguf") else model


def _file_name(out: Path) -> str | None:
    """The scenario file's stem as its name (its results go to runs/<name>/, one folder per scenario written), where
    it is one folder name; else None (the name then comes from the profile: `_name`)."""
    try:
        return Scenario._name(out.stem)
    except ValueError:
        return None


def _name(profile: DataFile, model: ModelConfig, dtype: str) -> str:
    device = gpu_named_by(str(profile.metadata.get("device", ""))) or str(profile.metadata.get("device_type", "cpu"))
    kernels = str(profile.metadata.get("kernels", "eager"))
    parts = [model.name, device, dtype] + ([kernels] if kernels != "eager" else [])
    return re.sub(r"[^a-z0-9.]+", "-", "-".join(parts).lower()).strip("-.")


def _description(profile: DataFile, trace: DataFile, model: ModelConfig, dtype: str, traces: int) -> str:
    meta, tmeta = profile.metadata, trace.metadata
    split = f", {tmeta['prompt_split']}" if tmeta.get("prompt_split") else ""
    heads = f"{traces} heads' traces" if traces > 1 else f"head {tmeta.get('head')}"
    return (
        f"{model.name} {dtype} on {meta.get('device', 'an unnamed device')} ({meta.get('kernels', 'eager')} kernels, "
        f"profile of {str(meta.get('date', '?'))[:10]}), {heads} ({tmeta.get('prompts', '?')} prompts{split})"
    )


def _has_graphs(profile: DataFile) -> bool:
    return any(record.cuda_graphs for record in profile.records)


def _workload_cut(traces: Sequence[tuple[Path, DataFile]], folder: Path, workload: dict[str, Any]) -> str | None:
    """Where the traces differ in prompts or tokens, what the workload takes (every trace's shortest) and which trace
    sets it; None where they agree. A longer trace then replays only part of what it recorded."""
    if len(traces) < 2:
        return None
    sizes = [(_head(path, t, folder).prompts, _output_len(path, t)) for path, t in traces]
    if len(set(sizes)) == 1:
        return None
    held = "; ".join(
        f"{path.name} {n} prompts x {tokens} tokens" for (path, _), (n, tokens) in zip(traces, sizes, strict=True)
    )
    return (
        f"the traces differ in length ({held}): the workload asks no more than every one holds, "
        f"{workload['requests']} requests x {workload['output_len']} tokens, so a longer trace replays only that much "
        "of itself (traces of the same prompts and tokens compare at full length)"
    )


def _output_len(acceptance: Path, trace: DataFile) -> int:
    """The trace's `max_new_tokens` (the longest it recorded where the metadata does not say)."""
    given = trace.metadata.get("max_new_tokens")
    if isinstance(given, int) and not isinstance(given, bool) and given >= 2:
        return given
    longest = max(record.position for record in trace.records) + 1
    if longest < 2:
        raise ValueError(f"{acceptance}: the trace records at most one token per prompt: nothing to decode")
    return longest


def _prompt_len(latency: Path, profile: DataFile, frozen: bool) -> int:
    """Inside the profiled grid: its smallest decode context (decode starts there); frozen (a static cache: decode
    attends over every slot whatever the context), its smallest prefill."""
    contexts = sorted({r.context_len for r in profile.records if r.component == "layer" and r.phase == "verify"})
    prefills = sorted({r.q for r in profile.records if r.component == "layer" and r.phase == "prefill"})
    if not contexts:
        raise ValueError(f"{latency}: no layer verify rows: not a decode profile")
    if frozen and prefills:
        return prefills[0]
    return max(contexts[0], 1)


def _sweep(methods: Sequence[str], policies: Sequence[str], heads: Sequence[_Head], on_gpu: bool) -> dict[str, Any]:
    """EESD at every exit layer x policy of every trace's head; PPSD on two stages of the one device (CUDA streams on
    a GPU, in turn on a CPU) at every exit layer."""
    if len(heads) == 1 and "ppsd" not in methods:
        sweep: dict[str, Any] = {"policy": list(policies)}
        if len(heads[0].exit_layers) > 1:
            sweep = {"exit_layer": heads[0].exit_layers, **sweep}
        return sweep
    backend, config = "streams" if on_gpu else "sequential", []
    for head in heads:
        which = {"acceptance.trace": head.trace, "exit_head": head.exit_head} if len(heads) > 1 else {}
        if "eesd" in methods:
            config += [{**which, "exit_layer": e, "policy": p} for e in head.exit_layers for p in policies]
        if "ppsd" in methods:
            ppsd = {"method": "ppsd", "ppsd_backend": backend, "topology.stages": 2}
            config += [{**which, **ppsd, "exit_layer": e} for e in head.exit_layers]
    return {"config": config}


def _relative(path: Path, folder: Path) -> str:
    """`path` as the scenario names it: relative to the scenario's folder (where the simulator resolves it)."""
    return os.path.relpath(Path(path).resolve(), Path(folder).resolve())


def _add_draft_profile(
    data: dict[str, Any], acceptance: Path, trace: DataFile, draft_profile: Path | None, folder: Path
) -> None:
    """A trace whose drafts ran narrower (`--draft-dtype`) is replayed with the draft's own latency profile."""
    narrow = trace.metadata.get("draft_dtype")
    recorded = claimed_dtype({"dtype": narrow}) if narrow else None
    if draft_profile is None:
        raise ValueError(
            f"{acceptance}: metadata.draft_dtype: its drafts ran in {trace.metadata['draft_dtype']}; pass "
            "--draft-profile, a latency profile in that dtype measured on the same device"
        )
    what = "a latency profile CSV in the trace's draft dtype"
    profile = _read("--draft-profile", draft_profile, read_latency_profile, what)
    dtype = claimed_dtype(profile.metadata)
    if recorded is not None and dtype != recorded:
        raise ValueError(
            f"--draft-profile: {draft_profile}: metadata.dtype: expected the trace's draft dtype {recorded}, got "
            f"{profile.metadata.get('dtype')!r}"
        )
    data["draft_dtype"] = dtype
    cuda_graphs = data["latency"]["profile"]["cuda_graphs"]
    data["latency"]["draft_profile"] = {"path": _relative(draft_profile, folder), "cuda_graphs": cuda_graphs}


def _host_work(data: dict[str, Any], path: Path, latency: Path, profile: DataFile, folder: Path, serving: bool) -> str:
    """`--host`: an `eesd calibrate host` file named as the scenario's `latency.profile.host_work` (AR, EESD and, where
    the file times it, PPSD on one host then pay their own measured host work), checked to be of the profile's model and
    device and of passes run as the profile's were; a batch scenario of captured passes reads the device as often as the
    file's decodes did (its `sync_every`; a serving loop reads every round). The header's line for it."""
    ref = data["latency"]["profile"]
    try:
        host = read_host_work(path)
        check_fits(host, path, _model(latency, profile)[0], profile.metadata, ref["cuda_graphs"])
    except ValueError as err:
        raise ValueError(f"--host {err}") from None
    meta = host["metadata"]
    ref["host_work"] = _relative(path, folder)
    if ref["cuda_graphs"] and not serving:
        data["sync_every"] = meta.get("sync_every")
    per = "host read" if ref["cuda_graphs"] else "pass"
    return f"  host work per method {path} ({meta.get('device')}, {meta.get('date')}): paid per {per}"


def _header(
    latency: Path,
    profile: DataFile,
    traces: Sequence[tuple[Path, DataFile]],
    command: str,
    serving: bool = False,
    notes: Sequence[str] = (),
) -> str:
    lines = [
        "Written by `eesd calibrate scenario` from:",
        f"  latency profile {latency} ({profile.metadata.get('device')}, {profile.metadata.get('date')})",
    ]
    for path, trace in traces:
        lines.append(
            f"  acceptance trace {path} ({trace.metadata.get('device', 'device not recorded')}, "
            f"{trace.metadata.get('date', 'date not recorded')})"
        )
    lines += notes
    if command:
        lines.append(f"  with: {command}")
    if serving:
        lines += [
            "Serve: eesd serve-sim THIS_FILE (Poisson arrivals at each rate, continuous batching, AR against EESD).",
            "The rates span a quarter to eight times what AR serves one request at a time; the SLOs are ten and two",
            "AR steps: put your traffic and your bounds there. docs/serving.md says what each field means.",
        ]
    else:
        lines += [
            "Simulate: eesd simulate THIS_FILE; check against the executor where the files were measured: eesd",
            "validate THIS_FILE. AR runs beside every point as its baseline. docs/simulator.md and scenarios/README.md",
            "say what each field means; edit freely (a wider workload, other policies, a what-if topology).",
        ]
    return "".join(f"# {line}\n" for line in lines)


def _serving_loader() -> Callable[[Path], Any]:
    from sim.serving import load_serving_points  # the serving simulator only where a serving scenario is written

    return load_serving_points


def _loaded(out: Path, text: str, load: Callable[[Path], Any]) -> Any:
    """`load` of the scenario `text`, written beside `out` (its relative paths resolve there) and removed again: what
    is kept must load. A ValueError saying so where it does not."""
    out.parent.mkdir(parents=True, exist_ok=True)
    probe = out.with_name(f".{out.name}.check.yaml")
    try:
        probe.write_text(text, encoding="utf-8")
        return load(probe)
    except ValueError as err:  # a ScenarioError, or a file the scenario names that does not read
        message = str(err).replace(str(probe), str(out))  # the file the user asked for, not the probe beside it
        raise ValueError(f"the scenario written from these files does not load: {message}") from None
    finally:
        probe.unlink(missing_ok=True)
