"""Run a scenario's points (in parallel processes), compare each with AR on the same hardware, write the outputs.

Outputs in the run folder: `results.csv` (one row per point, columns documented in `ROW_DOC`), `speedup_<field>.png`
per swept field, and `trace.json` (Chrome trace of the first 20,000 stage spans, open in chrome://tracing or
Perfetto) for a scenario without a sweep (`trace_<point>.json` per point when traces are asked for a sweep).
Times in the table: tokens/s of decode (prefill excluded, reported as `ttft_ms`). Each point is planned
(`sim.plan.build_plan`), run (`sim.engine.Simulation`) and turned into a row here.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim import workers
from sim.acceptance import TraceAcceptance
from sim.contract import balanced_counts
from sim.engine import RunResult, Simulation, trace_tracks
from sim.formats import quote, save_figure_atomic, write_text_atomic
from sim.hardware import LinkSpec
from sim.latency import ProfileLatency
from sim.plan import ONE_HOST_BACKENDS, SimPlan, build_plan
from sim.policy import parse_policy_spec
from sim.progress import progress_bar
from sim.scenario import GPUConfig, LinkConfig, Point, Scenario, TopologyConfig, claimed_dtype, narrow_draft_dtype
from sim.tables import text_table

TRACE_EVENTS = 20_000

ROW_DOC = {
    "point": "index of the sweep point",
    "method": "ar | eesd | ppsd",
    "stages": "pipeline stages",
    "devices": "each stage's device (a GPU's name, or the profile's device), ';'-joined",
    "tp": "each stage's tensor-parallel degree, ';'-joined",
    "layers": "each stage's decoder layers, ';'-joined",
    "link": "the link between stages (none with one stage): a preset, latency_us/bandwidth_GBps, or profile:<path>; "
    "where a stage gives its own, each stage's link to the next (the last stage's back to stage 1), ';'-joined",
    "tp_link": "the link inside a tensor-parallel stage (none without tp > 1), named as link is",
    "exit_layer": "layers the draft runs",
    "policy": "draft policy spec (eesd)",
    "draft_dtype": "eesd: the dtype drafts run in (the model's, or a narrower one: draft_dtype)",
    "tokens": "generated tokens, all requests",
    "tokens_per_s": "decode throughput, simulated",
    "ms_per_token": "decode time per token per request",
    "ar_tokens_per_s": "AR on the same hardware",
    "speedup": "tokens_per_s / ar_tokens_per_s",
    "tokens_per_round": "a row's tokens per round (EESD: accepted + 1 per round; PPSD: per flush-free run)",
    "flushes": "PPSD pipeline flushes",
    "ticks_per_token": "PPSD: the executor's ticks per decoded token, all rows' (AR through n stages: n / batch)",
    "ttft_ms": "mean prefill time per batch",
    "busy_pct": "per stage, time the device worked (incl. flushed work), ';'-joined",
    "flushed_pct": "per stage, time spent on work later flushed",
    "bubble_pct": "per stage, idle time",
    "extrapolated": "a latency or link query fell outside the profiled grid",
    "wall_s": "wall time of the simulation",
}


@dataclass(frozen=True)
class PointResult:
    point: Point
    result: RunResult
    baseline: RunResult  # AR on the same plan
    wall_s: float
    trace: list[dict[str, Any]] | None
    exit_layer: int  # the plan's, defaults resolved
    devices: tuple[str, ...]  # the plan's stages' devices, in order
    notes: tuple[str, ...] = ()  # what the output must say of how the point ran (a trace replayed cyclically)
    tp: tuple[int, ...] = ()  # the plan's stages' tensor-parallel degrees, in order
    layers: tuple[int, ...] = ()  # the plan's stages' decoder layers, in order


def simulate_point(point: Point, trace: bool = False) -> PointResult:
    """Plan the point (`sim.plan`), run it and AR on the same plan (`sim.engine`)."""
    start = time.perf_counter()
    plan = build_plan(point)
    simulation = Simulation(plan, trace_limit=TRACE_EVENTS if trace else 0)
    result = simulation.run()
    baseline = result if plan.method == "ar" else Simulation(build_plan(point, method="ar")).run()
    devices = tuple(stage.device for stage in plan.stages)
    wall_s = time.perf_counter() - start
    tp = tuple(stage.tp for stage in plan.stages)
    layers = tuple(stage.layer_end - stage.layer_start for stage in plan.stages)
    notes = _notes(plan, point)
    return PointResult(point, result, baseline, wall_s, simulation.trace, plan.exit_layer, devices, notes, tp, layers)


def point_notes(point: Point) -> tuple[str, ...]:
    """What `eesd simulate` notes of a point (`_notes`), without running it."""
    return _notes(build_plan(point), point)


def _notes(plan: SimPlan, point: Point) -> tuple[str, ...]:
    """A batch size outside the latency profile's batches, and a trace replay that reuses the trace's tokens (the
    scenario said `acceptance.reuse: cycle`), whose requests end at their EOS before `output_len`, or whose drafts
    ran in another dtype than the point's (its acceptance replayed as recorded)."""
    notes = plan_notes(plan, point.scenario) + _inline_gpu_notes(point.scenario) + _partial_batch_notes(point)
    notes += _core_notes(plan) + _unread_field_notes(plan, point)
    if not isinstance(plan.acceptance, TraceAcceptance):
        return tuple(notes)
    w = plan.workload
    reuse = plan.acceptance.reuse(w.requests, w.output_len)
    if reuse:
        notes.append(f"acceptance.trace replayed cyclically (acceptance.reuse: cycle): {reuse}")
    lengths = [plan.acceptance.output_len(r, w.output_len) for r in range(w.requests)]
    ended = sum(n < w.output_len for n in lengths)
    if ended:
        notes.append(
            f"{ended} of {w.requests} requests end at their trace's EOS before output_len {w.output_len} (as the "
            f"executor stops; acceptance.at_eos: continue replays on): {sum(lengths):,} tokens, not "
            f"{w.requests * w.output_len:,}"
        )
    head, drafting = plan.acceptance.head, point.scenario.exit_head
    if plan.method != "ar" and head is not None and head != drafting:
        notes.append(
            f"acceptance.trace was recorded with exit_head {head}, this point drafts with exit_head {drafting}: its "
            f"acceptance is the other head's (record the one drafting: eesd calibrate acceptance --head)"
        )
    recorded = claimed_dtype({"dtype": plan.acceptance.draft_dtype}) if plan.acceptance.draft_dtype else None
    drafts = narrow_draft_dtype(point.scenario)
    if plan.method == "eesd" and drafts != recorded:
        notes.append(
            f"acceptance.trace recorded drafts in {recorded or 'the model dtype'}; this point drafts in "
            f"{drafts or 'the model dtype'} (draft_dtype): its acceptance is replayed as recorded"
        )
    return tuple(notes)


def _core_notes(plan: SimPlan) -> list[str]:
    """PPSD with a process per stage on a CPU whose cores (its profile's device names them) cannot give every stage
    process its torch threads: the executor's processes then share cores, which the simulator does not price."""
    if plan.method != "ppsd" or plan.ppsd_backend in ONE_HOST_BACKENDS:
        return []
    found = re.search(r"\((\d+) cores?, (\d+) torch threads?\)", plan.stages[0].device)
    processes = len({plan.device_of(i) for i in range(len(plan.stages))})
    if found is None or processes * int(found[2]) <= int(found[1]):
        return []
    cores, threads = int(found[1]), int(found[2])
    return [
        f"{processes} stage processes of {threads} torch thread{'s' * (threads != 1)} each need "
        f"{processes * threads} cores, the profile's CPU has {cores}: the executor's processes would share them, "
        "which the simulator does not price (each stage runs as if on cores of its own)"
    ]


UNREAD_BY_PPSD = ("policy", "zero_draft_rounds", "verify_buckets")  # EESD's round settings: PPSD has no rounds


def _unread_field_notes(plan: SimPlan, point: Point) -> list[str]:
    """A swept field the point's method does not read (PPSD's points then differ only in name), and a PPSD window
    `max_in_flight` no narrower than the pipe (it changes nothing)."""
    if plan.method != "ppsd":
        return []
    swept = {*point.values, *(key for value in point.values.values() for key in UNREAD_BY_PPSD
                              if isinstance(value, str) and f"{key}=" in value)}  # (a zipped case's label)  # fmt: skip
    notes = [f"PPSD does not read {key} (EESD's rounds): points that differ only in it are the same run"
             for key in UNREAD_BY_PPSD if key in swept]  # fmt: skip
    notes += _cpu_link_notes(plan)
    if plan.max_in_flight is not None and plan.max_in_flight >= len(plan.stages):
        notes.append(f"max_in_flight {plan.max_in_flight} >= the {len(plan.stages)} stages: the pipe holds one token a "
                     "stage at most, so the window changes nothing")  # fmt: skip
    return notes


def _cpu_link_notes(plan: SimPlan) -> list[str]:
    """PPSD's stages on devices of their own, priced from a CPU's latency profile, joined by a named link (a GPU's
    NVLink, say) rather than a measured one: a CPU's stage processes hand off over gloo, which a link profile times."""
    latency = plan.stages[0].latency
    if plan.ppsd_backend == "sequential" or not isinstance(latency, ProfileLatency):
        return []
    if (
        latency.profile.metadata.get("device_type") != "cpu"
        or len({plan.device_of(i) for i in range(len(plan.stages))}) < 2
    ):
        return []
    named = sorted({link.name for link in plan.links if isinstance(link, LinkSpec) and link.name != "ideal"})
    if not named:
        return []
    return [f"the stages' link{'s' * (len(named) > 1)} {', '.join(named)} join{'s' * (len(named) == 1)} devices "
            "priced from a CPU's latency profile: a CPU's stage processes hand off over gloo, which a link profile "
            "measures (eesd calibrate link --backend gloo, then topology.link: {profile: FILE})"]  # fmt: skip


def _partial_batch_notes(point: Point) -> list[str]:
    """Requests that do not fill their batches: fewer than `batch_size`, or a last batch holding fewer rows."""
    w = point.scenario.workload
    if w.batch_size > w.requests:
        return [f"workload.batch_size {w.batch_size} > requests {w.requests}: one batch of {w.requests} rows runs"]
    left = w.requests % w.batch_size
    if w.batch_size > 1 and left:
        rows = f"{left} row{'s' * (left > 1)}"
        return [f"workload: {w.requests} requests in batches of {w.batch_size}: the last batch holds {rows}"]
    return []


def _inline_gpu_notes(scenario: Scenario) -> list[str]:
    """An inline GPU priced by the roofline without its own kernel floor or launch cost borrows the H100's."""
    if scenario.latency.roofline is None:
        return []
    topology = scenario.topology
    stages = topology.stages if isinstance(topology.stages, list) else []
    gpus = {id(g): g for g in (topology.gpu, *(s.gpu for s in stages)) if isinstance(g, GPUConfig)}
    notes = []
    for gpu in gpus.values():
        borrowed = [f for f in ("kernel_floor_us", "launch_us") if f not in gpu.model_fields_set]
        if borrowed:
            notes.append(f"GPU {gpu.name!r}: {' and '.join(borrowed)} not given, the H100's measured ones used (a "
                         "kernel's least time and a graph launch's cost: give the card's own where known)")  # fmt: skip
    return notes


def plan_notes(
    plan: SimPlan, scenario: Scenario, batch_field: str = "workload.batch_size", loop: str = "generate"
) -> list[str]:
    """What the output must say of how a plan's passes are costed: a batch size (the scenario's `batch_field`)
    outside the latency profile's batches, and where a host-work file does not simply apply (`_host_notes`)."""
    return _batch_notes(plan, batch_field) + _host_notes(plan, scenario, batch_field, loop)


def _batch_notes(plan: SimPlan, batch_field: str = "workload.batch_size") -> list[str]:
    """A batch size the latency profile does not span is costed from its edge: flat where it holds one batch size (a
    batch of 8 then costs what one row does, which no device does: on an H200 that predicted AR at batch 8 53% too
    fast), else extrapolated along the last segment."""
    batch, notes = plan.workload.batch_size, []
    for latency in {id(stage.latency): stage.latency for stage in plan.stages}.values():
        if not isinstance(latency, ProfileLatency) or min(latency.batches) <= batch <= max(latency.batches):
            continue
        batches, path = latency.batches, latency.profile.path or "the latency profile"
        how = _past_batches(latency, batch)
        notes.append(
            f"{batch_field} {batch} lies outside the batches {list(batches)} of {path}: {how}; profile it "
            f"(eesd calibrate latency --batch 1,{batch})"
        )
    return notes


def _past_batches(latency: ProfileLatency, batch: int) -> str:
    """How a batch outside the profile's batch sizes is costed (`ProfileLatency`'s edge rule)."""
    batches = latency.batches
    if len(batches) == 1:
        return f"costed as batch {batches[0]} (a single batch profiled: flat, as if rows were free)"
    above = batch > batches[-1]
    edge, beside = (batches[-1], batches[-2]) if above else (batches[0], batches[1])
    if latency.batch_edge_falls(above):
        return (f"costed as batch {edge} (the profile's batch {edge} costs {'less' if above else 'more'} than its "
                f"batch {beside}: a falling edge is held flat, not extrapolated)")  # fmt: skip
    return f"extrapolated linearly from batches {min(edge, beside)} and {max(edge, beside)}"


def _host_notes(plan: SimPlan, scenario: Scenario, batch_field: str, loop: str) -> list[str]:
    """How a host-work file (`latency.profile.host_work`) prices the plan's host work where it does not simply apply:
    PPSD where it does not time it, or at another stage count; a batch size outside the ones it measured; EESD under
    another policy; a file measured on another device than the profile; one that timed another loop than the simulated
    one's (`loop`: `generate`, a static batch; `serve`, serving)."""
    ref = scenario.latency.profile
    if ref is None or ref.host_work is None:
        return []
    host, batch = getattr(plan.stages[0].latency, "host", None), plan.workload.batch_size
    if host is None:
        why = (
            f"PPSD's ranks (a process per stage) are hosts of their own, which no host-work file times "
            f"({ref.host_work})"
            if plan.ppsd_backend not in ONE_HOST_BACKENDS
            else f"{ref.host_work} has no PPSD rows (eesd calibrate host --ppsd-stages N, generate loop)"
        )
        return [f"{why}: PPSD's passes pay the profile's overhead rows"]
    notes = []
    if host.outside(batch):
        how = (
            "flat" if len(host.batches) == 1
            else "held at its edge's figure (the figure falls towards that edge)" if host.edge_falls(batch)
            else "extrapolated linearly from its edge"
        )  # fmt: skip
        sizes = ",".join(map(str, sorted({*host.batches, batch})))
        notes.append(
            f"{batch_field} {batch} lies outside the batches {list(host.batches)} {host.source} measured the "
            f"host's work at: {how}; measure it there (eesd calibrate host --batch {sizes})"
        )
    if host.policy is not None and _policy_kind(host.policy) != _policy_kind(plan.policy):
        notes.append(
            f"the host's work of an EESD round was measured under {quote(host.policy)}, this point runs "
            f"{quote(plan.policy)}"
        )
    if host.stages is not None and host.stages != len(plan.stages):
        notes.append(
            f"{host.source} timed PPSD's host work at {host.stages} stages, this point runs {len(plan.stages)} "
            f"(eesd calibrate host --ppsd-stages {len(plan.stages)})"
        )
    profiled = plan.stages[0].device
    if host.device is not None and _machine(host.device) != _machine(profiled):
        notes.append(f"the host's work was measured on {quote(host.device)}, the latency profile on {profiled}")
    if host.loop != loop:
        notes.append(LOOP_NOTES[loop].format(source=host.source))
    if not plan.stages[0].latency.cuda_graphs and host.sync_every not in (None, 1):
        notes.append(
            f"{host.source} timed decodes reading every {host.sync_every} steps; uncaptured decodes read every step "
            "(eesd calibrate host --sync-every 1)"
        )
    return notes


LOOP_NOTES = {  # a host-work file of the other loop than the simulated one's
    "serve": "{source} timed the host's work on generate's static batches, not on the serving loop's rounds (their "
    "departures and admissions): eesd calibrate host --loop serve",
    "generate": "{source} timed the host's work on the serving loop's rounds (their departures and admissions "
    "included), not on a static batch's decode: eesd calibrate host --loop generate",
}


def _machine(device: str) -> str:
    """A device's name without the torch threads a CPU's name records (the host's work is the machine's)."""
    return re.sub(r",? ?\d+ torch threads?", "", device)


def _policy_kind(spec: str) -> tuple[str, tuple]:
    """A policy spec without the costs it was given (`with_cost`): what its host work depends on."""
    try:
        name, args = parse_policy_spec(spec)
    except ValueError:
        return spec, ()
    return name, tuple(sorted((k, str(v)) for k, v in args.items() if k not in ("cost", "costs")))


def run_points(
    points: Sequence[Point], jobs: int = 1, progress: bool = True, trace: bool | None = None
) -> list[PointResult]:
    """Simulate every point; `jobs` > 1 uses that many processes. Results come back in point order.

    `trace` records Chrome-trace spans (default: only when there is a single point).
    """
    trace = len(points) == 1 if trace is None else trace
    bar = _progress(len(points), progress)
    if jobs <= 1 or len(points) == 1:
        results = []
        for point in points:
            results.append(simulate_point(point, trace))
            bar.update(1)
    else:
        with workers.pool(min(jobs, len(points))) as running:
            futures = [running.submit(simulate_point, point, trace) for point in points]
            for future in futures:
                future.add_done_callback(lambda _: bar.update(1))
            results = [f.result() for f in futures]
    bar.close()
    return results


def map_points(function: Callable[..., Any], points: Sequence[Point], jobs: int, *args: Any) -> list[Any]:
    """`function(point, *args)` for every point, in point order; `jobs` > 1 uses that many processes."""
    if jobs <= 1 or len(points) == 1:
        return [function(point, *args) for point in points]
    with workers.pool(min(jobs, len(points))) as running:
        return list(running.map(function, points, *[[arg] * len(points) for arg in args]))


def write_rows_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """`rows` (one header: the first row's keys) as a CSV at `path`, atomically; its folder made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_csv(rows, path)


def _stage_links(topology: TopologyConfig) -> str:
    """A results row's `link`: the topology's, or where a stage gives its own, each stage's ';'-joined."""
    stages = topology.stages if isinstance(topology.stages, list) else []
    if all(stage.link is None for stage in stages):
        return _link_name(topology.link)
    return ";".join(_link_name(stage.link or topology.link) for stage in stages)


def _link_name(link: str | LinkConfig) -> str:
    """A results row's `link` or `tp_link`: the preset's name, `<latency_us>us/<bandwidth_GBps>GBps` (inf: no
    bandwidth bound), or `profile:<its path as the scenario gives it>`."""
    if isinstance(link, str):
        return link
    if link.profile is not None:
        return f"profile:{link.profile}"
    bandwidth = "inf" if link.bandwidth_GBps is None else f"{link.bandwidth_GBps:g}"
    return f"{link.latency_us:g}us/{bandwidth}GBps"


def _progress(total: int, enabled: bool) -> Any:
    return progress_bar(total, "simulating", "run", enabled, leave=False)


def result_row(item: PointResult) -> dict[str, Any]:
    p, r, b = item.point, item.result, item.baseline
    total_us = r.total_time_us or 1.0
    row: dict[str, Any] = {"point": p.index, **{k: _cell(v) for k, v in p.values.items() if k != "method"}}
    row.update(
        method=r.method,
        stages=len(item.devices),
        devices=";".join(item.devices),
        tp=";".join(map(str, item.tp)),
        layers=";".join(map(str, item.layers)),
        link=_stage_links(p.scenario.topology) if len(item.devices) > 1 else "",
        tp_link=_link_name(p.scenario.topology.tp_link) if max(item.tp, default=1) > 1 else "",
        exit_layer=item.exit_layer if r.method != "ar" else "",
        policy=p.scenario.policy if r.method == "eesd" else "",
        draft_dtype=(p.scenario.draft_dtype or p.scenario.dtype) if r.method == "eesd" else "",
        tokens=r.tokens,
        tokens_per_s=round(r.tokens_per_s, 3),
        ms_per_token=round(_ms_per_token(p, r), 5),
        ar_tokens_per_s=round(b.tokens_per_s, 3),
        speedup=round(r.tokens_per_s / b.tokens_per_s, 5) if b.tokens_per_s else 0.0,
        tokens_per_round=round(r.tokens_per_round, 4),
        flushes=r.flushes,
        ticks_per_token=round(r.ticks_per_token, 4),
        ttft_ms=round(r.prefill_time_us / 1e3 / _batches(p), 5),
        busy_pct=";".join(f"{100 * s.busy_us / total_us:.1f}" for s in r.stages),
        flushed_pct=";".join(f"{100 * (s.busy_us - s.useful_us) / total_us:.1f}" for s in r.stages),
        bubble_pct=";".join(f"{max(0.0, 100 * (1 - s.busy_us / total_us)):.1f}" for s in r.stages),
        extrapolated=r.extrapolated,
        wall_s=round(item.wall_s, 4),
    )
    return row


def _batches(point: Point) -> int:
    w = point.scenario.workload
    return -(-w.requests // w.batch_size)


def _ms_per_token(point: Point, r: RunResult) -> float:
    """A batch's decode time per step a row takes: the decode time per batch over the tokens a request decodes (on
    average: fewer than output_len - 1 where requests end at their EOS)."""
    w = point.scenario.workload
    per_request = max(r.decode_tokens / w.requests, 1)
    return r.decode_time_us / _batches(point) / per_request / 1e3


def workload_key(point: Point) -> tuple:
    """The values a sweep point's `workload.*` fields take: points of one key served the same requests."""
    return tuple((k, _cell(v)) for k, v in point.values.items() if k.startswith("workload"))


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def write_outputs(results: Sequence[PointResult], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [result_row(item) for item in results]
    written = [_write_csv(rows, out_dir / "results.csv")]
    swept = list(results[0].point.values) if results else []
    if swept and plots_available():
        written += _plots(rows, swept, out_dir)
    for item in results:
        if item.trace is not None:
            name = "trace.json" if len(results) == 1 else f"trace_{item.point.index}.json"
            written.append(_write_trace(item, out_dir / name))
    return written


def _write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def _write_trace(item: PointResult, path: Path) -> Path:
    names = [
        {"name": "thread_name", "ph": "M", "pid": 1, "tid": i, "args": {"name": f"stage {i + 1} ({device})"}}
        for i, device in enumerate(item.devices)
    ]
    used = {event["tid"] for event in item.trace or ()}
    names += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}
              for tid, name in trace_tracks(len(item.devices)).items() if tid in used]  # fmt: skip
    payload = {"traceEvents": names + (item.trace or []), "displayTimeUnit": "ms"}
    write_text_atomic(path, json.dumps(payload))
    return path


def plots_available() -> bool:
    """matplotlib is the `plots` extra: without it a sweep writes its table and CSV and no PNG."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ImportError:  # a finder that refuses the name outright
        return False


def _plots(rows: list[dict[str, Any]], swept: list[str], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for field in swept:
        others = [f for f in swept if f != field]
        groups: dict[str, list[tuple[Any, float]]] = {}
        for row in rows:
            label = ", ".join(f"{f}={row[f]}" for f in others) or "speedup"
            groups.setdefault(textwrap.fill(label, 90), []).append((row[field], row["speedup"]))
        numeric = all(isinstance(row[field], (int, float)) and not isinstance(row[field], bool) for row in rows)
        categories = len({str(row[field]) for row in rows})
        fig, ax = plt.subplots(figsize=(6.4 if numeric else min(16.0, max(6.4, 1.6 * categories)), 4.0))
        for label, pairs in groups.items():
            # categories (methods, policies, links, zipped cases) get points, not a line that suggests an order
            xs = [x if numeric else textwrap.fill(str(x), 24) for x, _ in pairs]
            ax.plot(xs, [y for _, y in pairs], marker="o", linestyle="-" if numeric else "none", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel(field)
        ax.set_ylabel("speedup vs AR (same hardware)")
        ax.tick_params(axis="x", labelsize=7 if not numeric else None)
        if len(groups) > 1:  # below the axes: a legend inside covered the points
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16 if numeric else -0.3), frameon=False)
        path = out_dir / f"speedup_{field.replace('.', '_')}.png"
        save_figure_atomic(fig, path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


MAX_EXTRAPOLATIONS = 6  # listed in the note; the rest counted


def extrapolation_note(results: Sequence[Any]) -> str | None:
    """The note for runs that asked a latency profile outside its grid, or a link or contention profile outside its
    sizes (None if none did): what was asked, per phase and axis, and how to profile it. `results`: objects with a
    `result` holding `extrapolated` and `extrapolations` (a batch run's `PointResult`, a serving run)."""
    if not any(r.result.extrapolated for r in results):
        return None
    asked = list(dict.fromkeys(e for r in results for e in getattr(r.result, "extrapolations", ())))
    latency = [e for e in asked if not e.startswith(("contention ", "link "))]
    shared = [e for e in asked if e.startswith(("contention ", "link "))]
    parts = []
    if latency:
        parts.append(
            f"some latencies were extrapolated beyond the profiled grid (column 'extrapolated'): {_listed(latency)}; "
            "profile those sizes to price them from measurements (eesd calibrate latency --q, --context, --batch, "
            "--prefill)"
        )
    if shared or not latency:  # a flag with nothing itemised: a model that does not phrase what it was asked
        what = f": {_listed(shared)}" if shared else ""
        parts.append(
            f"some transfers or shared passes were extrapolated beyond the link or contention profile's sizes (column "
            f"'extrapolated'){what}; measure those (eesd calibrate link, eesd calibrate contention)"
        )
    return "; ".join(parts)


def _listed(asked: Sequence[str]) -> str:
    more = len(asked) - MAX_EXTRAPOLATIONS
    return "; ".join(asked[:MAX_EXTRAPOLATIONS]) + (f"; {more} more" if more > 0 else "")


def default_exit_note(results: Sequence[PointResult]) -> str | None:
    """A note where points that set no exit layer draft at different default ones (PPSD: the end of stage 1, so a
    stage sweep moves it) under one i.i.d. α: a shallower exit agrees less often, and α says nothing of that."""
    unset = [r for r in results if r.result.method != "ar" and r.point.scenario.exit_layer is None]
    iid = [r for r in unset if r.point.scenario.acceptance.trace is None]  # alpha, or alphas per draft
    layers = sorted({r.exit_layer for r in iid})
    if len(layers) < 2:
        return None
    return (
        f"exit_layer is not set, so these points draft at their defaults ({', '.join(map(str, layers))}; PPSD: the "
        "end of stage 1) with the same acceptance (alpha) at each: a shallower exit agrees less often, which "
        "alpha does not model; set exit_layer, sweep it, or replay a trace recorded at those exits"
    )


EVEN_BAND = 0.02  # a best speedup this close to 1 is called even: measured latencies move a few percent run to run


def verdict(results: Sequence[PointResult]) -> str:
    """One line: whether speculation pays in these runs, with each speculative method's best speedup over AR on the
    same hardware (and, where a sweep varied it, the point's values); empty without a speculative point."""
    best: dict[str, tuple[float, dict[str, Any]]] = {}
    counts: dict[str, int] = {}
    for item in results:
        method, speedup = _method_key(item), result_row(item)["speedup"]
        if method == "ar":
            continue
        counts[method] = counts.get(method, 0) + 1
        if method not in best or speedup > best[method][0]:
            best[method] = (speedup, {k: v for k, v in item.point.values.items() if k != "method"})
    if not best or not any(item.baseline.tokens_per_s for item in results):  # (no decode: no speed to compare)
        return ""
    parts = []
    for method, (speedup, where) in best.items():
        at = ", ".join(f"{k}={_cell(v)}" for k, v in where.items() if k != "ppsd_backend" or method != FREE_PIPE)
        at = at if counts[method] > 1 else ""
        parts.append(f"{_method_label(method)} {speedup:.3f}x" + (f" at {at}" if at else ""))
    runnable = [speedup for method, (speedup, _) in best.items() if method != FREE_PIPE]
    top = max(runnable or [speedup for speedup, _ in best.values()])
    if not runnable:  # only the free pipe's points: a bound, not a verdict on what an executor runs
        said = "pays" if top > 1.0 + EVEN_BAND else "does not pay" if top < 1.0 - EVEN_BAND else "about breaks even"
        head = f"no point an executor runs; the free pipe's bound {said}"
    elif abs(top - 1.0) < EVEN_BAND:
        head = f"speculation about breaks even here (within {EVEN_BAND:.0%} of AR: less than measured latencies move)"
    elif top > 1.0:
        head = "speculation pays here"
    else:
        head = "speculation does not pay here, AR is fastest"
    label = "best speedup over AR" if any(count > 1 for count in counts.values()) else "speedup over AR"
    return f"verdict: {head} ({label} on the same hardware: {'; '.join(parts)})"


FREE_PIPE = "ppsd-free"  # PPSD's points on the free-running pipe (`ppsd_backend: free`): a bound, run by no executor


def _method_key(item: PointResult) -> str:
    """The point's method for the verdict and the fastest lines; PPSD on the free pipe apart (`FREE_PIPE`): a bound
    no executor runs does not decide whether speculation pays."""
    method = item.result.method
    return FREE_PIPE if method == "ppsd" and item.point.scenario.ppsd_backend == "free" else method


def _method_label(method: str) -> str:
    return "PPSD on the free pipe (a bound no executor runs)" if method == FREE_PIPE else method.upper()


SAME_HARDWARE = 1e-3  # AR baselines this close (relative) are one layout's: a link's hand-offs, rounding
NOT_HARDWARE = ("method", "exit_layer", "policy", "acceptance", "draft", "exit_head", "head", "seed", "max_in_flight")


def fastest(results: Sequence[PointResult]) -> list[str]:
    """Where a sweep varies the hardware (points of one workload whose AR baselines differ), a line per workload:
    each method's fastest point against the fastest AR of that workload anywhere in the sweep. A speedup over AR on
    the same hardware can hide another layout whose plain AR beats it. The sweep's workload values label a line."""
    groups: dict[tuple, list[PointResult]] = {}
    for item in results:
        groups.setdefault(workload_key(item.point), []).append(item)
    lines = []
    for key, items in groups.items():
        speeds = [item.baseline.tokens_per_s for item in items]
        if max(speeds) <= min(speeds) * (1 + SAME_HARDWARE) or all(item.result.method == "ar" for item in items):
            continue
        ar = max(items, key=lambda item: item.baseline.tokens_per_s)
        ar_speed = ar.baseline.tokens_per_s
        parts = [f"AR {ar_speed:.1f} tok/s{_at(ar, NOT_HARDWARE)}"]
        for method in dict.fromkeys(_method_key(item) for item in items if item.result.method != "ar"):
            best = max((item for item in items if _method_key(item) == method), key=lambda i: i.result.tokens_per_s)
            speed = best.result.tokens_per_s
            parts.append(
                f"{_method_label(method)} {speed:.1f} tok/s{_at(best, ('method',))} ({speed / ar_speed:.3f}x that AR)"
            )
        label = ", ".join(f"{k}={v}" for k, v in key)
        lines.append(f"fastest{' at ' + label if label else ''} (any hardware in the sweep): {'; '.join(parts)}")
    return lines


def _at(item: PointResult, dropped: tuple[str, ...]) -> str:
    """` at k=v, ...` of the point's swept values but the workload's and those starting with a `dropped` word."""
    kept = [f"{k}={_cell(v)}" for k, v in item.point.values.items()
            if not k.startswith("workload") and not k.startswith(dropped)]  # fmt: skip
    return f" at {', '.join(kept)}" if kept else ""


def summary_table(results: Sequence[PointResult]) -> str:
    """A fixed-width table: one line per point; the exit layer where the points draft at different ones, and each
    stage's layers where a pipeline's are not balanced (given, or an exit past balanced stage 1's end)."""
    rows = [result_row(item) for item in results]
    swept = list(results[0].point.values) if results else []
    layers = {item.exit_layer for item in results if item.result.method != "ar"}
    uneven = any(len(item.layers) > 1 and list(item.layers) != balanced_counts(sum(item.layers), len(item.layers))
                 for item in results)  # fmt: skip
    columns = [
        *[f for f in swept if f != "method"],
        "method",
        *(["exit_layer"] if len(layers) > 1 and "exit_layer" not in swept else []),
        *(["layers"] if uneven else []),
        "tokens_per_s",
        "ms_per_token",
        "speedup",
        "tokens_per_round",
        "busy_pct",
        "bubble_pct",
    ]
    heads = {"tokens_per_s": "tok/s", "ms_per_token": "ms/tok", "tokens_per_round": "tok/round"}
    shown = [{**row, **{key: stage_span(row[key]) for key in ("busy_pct", "bubble_pct")}} for row in rows]
    table = text_table(shown, columns, heads)
    if any(len(item.result.stages) > WIDE_STAGES for item in results):
        table += (f"\n(busy_pct, bubble_pct: past {WIDE_STAGES} stages, stage 1's then the range of the others'; "
                  "each stage's in results.csv)")  # fmt: skip
    return table


WIDE_STAGES = 6  # the most stages whose busy and bubble percentages the summary table lists one by one


def stage_span(joined: str) -> str:
    """A row's ';'-joined per-stage percentages for the summary table: as they are up to `WIDE_STAGES` stages; past
    that, stage 1's (the drafting stage) and the range of the others' ("98.8;55.6..62.4"), which keeps a pipeline of
    30 stages on one line."""
    values = joined.split(";")
    if len(values) <= WIDE_STAGES:
        return joined
    rest = sorted(values[1:], key=float)
    return f"{values[0]};{rest[0]}..{rest[-1]}"
