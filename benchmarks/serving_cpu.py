"""Benchmark (not a test): serving on this CPU, the simulator against the executor on the same workload.

scenarios/serving_cpu.yaml names the model (SmolLM2-135M fp32), the latency profile and acceptance trace measured on
this CPU, the methods (AR, EESD at E = 22 with fixed:1, at most 4 requests at once; PPSD on two stages split at
layer 15, stages in turn, one request at a time) and three workload files
(scenarios/workloads/smollm2_cpu_rate*.yaml: Poisson arrivals at 0.15 (80 requests: a light load, the box mostly
idle between them), 0.4 and 1.2 requests/s (24 each), each request one of the
trace's prompts with its token count and at most 32 output tokens). For every case and method the executor serves
the workload on the wall clock (`executor.serving.serve`, one torch thread, no EOS: each request makes its
output_len tokens, as simulated) and the simulator runs the same point (`sim.serving`); the JSON pairs their
throughput and p50 / p90 of TTFT and TPOT with relative errors (predicted - measured) / measured. Before and after
each timed run a batch-1 AR probe (`probe_ar_ms_per_token`, `probe_prefill_ms`) shows how fast the shared box ran
then, against the profile's own batch-1 step and prefill; `sim_scaled` is the prediction with the profile's decode
passes scaled by the step's slowdown and its prefills by the prefill's.

The run's own passes (`pass_costs`): the executor logs every prefill and decode round (`sim.serving.PassLog`: its
batch, draft steps, contexts and measured time) and the simulator costs each one at its logged composition
(`sim.serving.logged_ratios`): measured / simulated, by batch size, with its spread and its drift over the run (the
median of each quarter of the run). `sim_in_run` is the prediction with the profile scaled by those medians (each
batch size's rounds by its own, prefills by theirs): what is left in `errors_in_run` is the schedule's error (who
runs with whom, queueing), with the pass costs the run itself measured; what it removes is the pass-cost error,
whether the box's speed or the profile's.

    python benchmarks/serving_cpu.py                    # writes benchmarks/results/serving_cpu.json (~25 minutes)
    python benchmarks/serving_cpu.py --cases rate0.4    # one load only
    python benchmarks/serving_cpu.py --methods ppsd     # one method only
    python benchmarks/serving_cpu.py --cases rate1.2 --first 8 --out /tmp/look.json   # a quick look
    python benchmarks/serving_cpu.py --recalibrate      # the serving profile measured again first (~3 minutes more)
    python benchmarks/serving_cpu.py --recalibrate --visits 3   # ... in three visits of the grid (a drifting box)
    python benchmarks/serving_cpu.py --write-workloads  # regenerate the workload files (needs the tokenizer)

On another device (a GPU lease: `benchmarks/gpu_session.sh serving20`), the same cases run from a latency profile and
an acceptance trace measured there: `--profile FILE --trace FILE` derive a scenario from serving_cpu.yaml with those
files and workloads written from that trace (under the output's folder, kept with the JSON), `--rate-scale F` makes
every workload's arrivals F times as dense (the same requests, F times the rates), and `--device`, `--dtype`,
`--capture` and `--model` say how the executor runs:

    python benchmarks/serving_cpu.py --device cuda --dtype bfloat16 --capture graph --model /tmp/smollm2-135m.gguf \
        --profile P.csv --trace T.csv --rate-scale 20 --out /tmp/out/serving_gpu.json

`--host FILE` (an `eesd calibrate host --loop serve` file, measured where the executor runs) prices each method's host
work between passes from it (`latency.profile.host_work`) in place of the profile's `overhead` rows, with or without
`--profile`.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "serving_cpu.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "serving_cpu.json"
WORKLOADS = ROOT / "scenarios" / "workloads"
TRACE = ROOT / "calibration" / "cpu" / "acceptance_smollm2-135m_shared_builtin.csv"
PROFILE_CPU = ROOT / "calibration" / "cpu" / "serving" / "latency_smollm2-135m_cpu_fp32.csv"  # the scenario's
MODEL = "smollm2-135m"
RATES = {0.15: 80, 0.4: 24, 1.2: 24}  # requests/s -> requests: the light load long enough for stable percentiles
MAX_OUTPUT = 32
SEED = 7
COMPARED = ("tokens_per_s", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms")
TOLERANCE = 0.10


def write_workloads(
    trace_path: Path = TRACE, folder: Path = WORKLOADS, model: str = MODEL, stem: str = "smollm2_cpu"
) -> list[Path]:
    """One CSV (arrival_s, prompt_len, output_len, prompt_id) and one YAML per rate: request r runs the trace's r-th
    prompt in sorted id order, encoded as the trace encoded it, for at most MAX_OUTPUT tokens (the trace's own length
    where it stopped sooner). Files `<stem>_rate<R>.{csv,yaml}` in `folder`."""
    from executor.models import load_tokenizer
    from executor.prompts import encode_prompt, load_prompts
    from sim.formats import read_acceptance_trace
    from sim.workload import Poisson, arrival_times

    trace = read_acceptance_trace(trace_path)
    keep = int(trace.metadata.get("max_prompt_tokens") or 0)
    positions: dict[str, int] = {}
    for record in trace.records:
        positions[record.prompt_id] = max(positions.get(record.prompt_id, 0), record.position + 1)
    ordered = sorted(positions)
    texts = {p.id: p.text for p in load_prompts(str(trace.metadata["prompts"]))}
    tokenizer = load_tokenizer(model)
    written = []
    for rate, requests in RATES.items():
        times = arrival_times(Poisson(process="poisson", rate_per_s=rate), requests, random.Random(SEED))
        lines = [
            f"# {requests} requests, Poisson arrivals at {rate}/s (seed {SEED}); written by benchmarks/serving_cpu.py",
            "arrival_s,prompt_len,output_len,prompt_id",
        ]
        for index, arrival in enumerate(times):
            prompt_id = ordered[index % len(ordered)]
            ids = encode_prompt(tokenizer, texts[prompt_id])
            length = min(len(ids), keep) if keep else len(ids)
            lines.append(f"{arrival:.6f},{length},{min(MAX_OUTPUT, positions[prompt_id])},{prompt_id}")
        csv_path = folder / f"{stem}_rate{rate}.csv"
        csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        yaml_path = csv_path.with_suffix(".yaml")
        yaml_path.write_text(
            f"# The trace's prompts under Poisson load at {rate} requests/s ({trace_path.name})\n"
            f"arrival: {{process: trace, path: {csv_path.name}}}\n"
            "prompt_len: {dist: trace}\noutput_len: {dist: trace}\n",
            encoding="utf-8",
        )
        written += [csv_path, yaml_path]
    return written


def derived_scenario(
    profile: Path | None, trace: Path | None, folder: Path, model: str, host: Path | None = None
) -> Path:
    """serving_cpu.yaml with `profile` and `trace` (absolute paths; the dtype and CUDA graphs the profile was measured
    with) and workloads written from `trace` into `folder` (`write_workloads`), or with its own profile, trace and
    workloads where both are None; with `host`, an `eesd calibrate host` file as `latency.profile.host_work` (each
    method's host work between passes). The scenario file is written into `folder`."""
    import yaml

    from sim.formats import read_contention_profile, read_latency_profile

    folder = folder.resolve()  # the scenario written there names its files by absolute path (not relative to it)
    folder.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(SCENARIO.read_text(encoding="utf-8"))
    if profile is None or trace is None:
        data["latency"]["profile"]["path"] = str((SCENARIO.parent / data["latency"]["profile"]["path"]).resolve())
        data["acceptance"]["trace"] = str((SCENARIO.parent / data["acceptance"]["trace"]).resolve())
        workload = lambda name: str((SCENARIO.parent / name).resolve())  # noqa: E731
    else:
        meta = read_latency_profile(profile).metadata
        graphs = meta.get("cuda_graphs") or [False]
        write_workloads(trace.resolve(), folder, model, "serving")
        data["latency"]["profile"] = {"path": str(profile.resolve()), "cuda_graphs": bool(max(graphs))}
        data["dtype"] = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[meta["dtype"]]  # as measured
        data["acceptance"]["trace"] = str(trace.resolve())
        workload = lambda name: str(folder / Path(name).name.replace("smollm2_cpu", "serving"))  # noqa: E731
    if host is not None:
        data["latency"]["profile"]["host_work"] = str(host.resolve())
    data["serving"]["workload"] = workload(data["serving"]["workload"])
    for case in data["serving"]["cases"]:
        case["serving.workload"] = workload(case["serving.workload"])
        link = case.get("topology.link")
        if isinstance(link, dict) and "profile" in link:  # a link profile of the shipped scenario's, by its path
            case["topology.link"] = {**link, "profile": str((SCENARIO.parent / link["profile"]).resolve())}
        if "topology.contention" in case:  # stage processes timed on a CPU: kept (by its path) for a profile of
            contention = (SCENARIO.parent / case.pop("topology.contention")).resolve()  # that CPU in that dtype
            if profile is None or _measured(read_latency_profile(profile)) == _measured(
                read_contention_profile(contention)
            ):
                case["topology.contention"] = str(contention)
    path = folder / "serving_scenario.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _measured(data: Any) -> tuple[str, str]:
    """(device, dtype) a latency or contention profile (a `sim.formats.DataFile`) was measured with."""
    return str(data.metadata.get("device")), str(data.metadata.get("dtype"))


def dense(point: Any, factor: float) -> Any:
    """The point with every arrival `factor` times as early (the same requests at `factor` times the rate)."""
    requests = tuple(dataclasses.replace(r, arrival_s=r.arrival_s / factor) for r in point.workload.requests)
    return dataclasses.replace(point, workload=dataclasses.replace(point.workload, requests=requests))


def measure(
    points: list,
    threads: int,
    model: str = MODEL,
    device: str = "cpu",
    dtype: str = "float32",
    capture: str = "none",
    on_row: Callable[[list[dict[str, Any]], dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Serve every point's workload with the executor and simulate it; one row per point. `on_row(rows, metadata)`
    after each point (a run cut short keeps its rows)."""
    import torch

    from executor.adapter import ModelAdapter
    from executor.models import load_model, load_tokenizer
    from executor.serve_cli import bench_prompts
    from executor.serving import serve
    from sim.serving import metrics, simulate_serving

    torch.set_num_threads(threads)
    adapter = ModelAdapter(load_model(model, dtype=getattr(torch, dtype), device=torch.device(device)))
    tokenizer = load_tokenizer(model)
    rows = []
    begin = time.perf_counter()
    for point in points:
        prompts = bench_prompts(point.workload, "builtin", tokenizer, adapter.config.vocab_size, 0)
        options = {**serve_options(point, threads), "capture": capture}
        warm = point.workload.requests[0]
        serve(adapter, type(point.workload)((type(warm)(0, warm.prompt_len, 4, 0.0),)), prompts[:1], **options)
        before, prefill_before = probe_ms(adapter, prompts[0], capture)
        if point.replicas > 1:  # worker processes, each loading the model (executor.replicas)
            from executor.replicas import serve_replicas

            served = serve_replicas(
                model, point.workload, prompts, replicas=point.replicas, dispatch=point.dispatch, dtype=dtype,
                device=device, threads=threads, **options,
            ).result  # fmt: skip
        else:
            served = serve(adapter, point.workload, prompts, **options).result
        measured = metrics(served, point.slo)
        after, prefill_after = probe_ms(adapter, prompts[0], capture)
        predicted_result = simulate_serving(point)
        predicted = metrics(predicted_result, point.slo)
        rows.append(_row(point, measured, predicted, predicted_result.extrapolated))
        # the same point with the profiled times scaled by how much slower the box ran than when it was profiled: the
        # decode passes (memory-bound) by the AR step's slowdown, the prefills (compute-bound) by the prefill's
        slowdown = (before + after) / 2 / profile_ar_ms(point, len(prompts[0]))
        prefill_slowdown = (prefill_before + prefill_after) / 2 / profile_prefill_ms(point, len(prompts[0]))
        plan = scaled_plan(point.plan, {}, prefill_slowdown, slowdown)
        scaled = metrics(simulate_serving(dataclasses.replace(point, plan=plan)))
        costs, in_run = in_run_costs(point, served.passes)
        rows[-1].update(pass_costs=costs, sim_in_run={key: round(in_run[key], 4) for key in COMPARED})
        rows[-1]["errors_in_run"] = {key: round((in_run[key] - measured[key]) / measured[key], 4) for key in COMPARED}
        rows[-1].update(
            probe_ar_ms_per_token=[round(before, 2), round(after, 2)],
            slowdown=round(slowdown, 3),
            probe_prefill_ms=[round(prefill_before, 1), round(prefill_after, 1)],
            prefill_slowdown=round(prefill_slowdown, 3),
            sim_scaled={key: round(scaled[key], 4) for key in COMPARED},
            errors_scaled={key: round((scaled[key] - measured[key]) / measured[key], 4) for key in COMPARED},
        )
        print(
            _line(rows[-1]),
            f"(probe {before:.1f} / {after:.1f} ms per AR token, slowdown {slowdown:.2f}; prefill "
            f"{prefill_before:.0f} / {prefill_after:.0f} ms, slowdown {prefill_slowdown:.2f})",
        )
        in_run_errors = _errors_line(rows[-1]["errors_in_run"])
        print(f"  its passes / profile: {_costs_line(costs)}; with those costs: {in_run_errors}")
        if on_row is not None:
            on_row(rows, run_metadata(adapter, model, threads, capture, points, begin))
    return rows, run_metadata(adapter, model, threads, capture, points, begin)


def shipped_profile(scenario: Path) -> dict[str, Any]:
    """The scenario's latency profile (its path from the repository's root) and the date it was timed."""
    import yaml

    from sim.formats import read_latency_profile

    path = (scenario.parent / yaml.safe_load(scenario.read_text())["latency"]["profile"]["path"]).resolve()
    return {"profile": str(path.relative_to(ROOT)), "profile_date": read_latency_profile(path).metadata.get("date")}


def run_metadata(adapter: Any, model: str, threads: int, capture: str, points: list, begin: float) -> dict[str, Any]:
    from calibrate.common import base_metadata

    return {
        **base_metadata(model, adapter.device, adapter.dtype),
        "threads": threads,
        "capture": capture,
        "scenario": str(SCENARIO.relative_to(ROOT)),
        "requests": len(points[0].workload.requests),
        "max_batch": {point.method: point.max_batch for point in points},
        "measure_wall_s": round(time.perf_counter() - begin, 1),
        "tolerance": TOLERANCE,
        "error": "(predicted - measured) / measured",
    }


def serve_options(point: Any, threads: int = 1) -> dict[str, Any]:
    """`executor.serving.serve`'s arguments for a point: its method, batch and KV budget; EESD's exit layer and
    policy (its costs pinned to the simulator's, as `eesd validate` pins them), PPSD's stages as the plan lays them
    out, its exit layer inside stage 1 (the shared head there) and its backend (sequential, or distributed: a process
    per stage of `threads` torch threads)."""
    from sim.policy import with_cost

    plan = point.plan
    options = {"method": point.method, "max_batch": point.max_batch, "kv_capacity_tokens": point.kv_capacity_tokens}
    if point.method == "eesd":  # a Thompson-sampling policy weighs the plan's round costs on both sides
        policy = with_cost(plan.policy, plan.cost_ratio or 1.0, plan.round_costs)
        options.update(exit_layer=plan.exit_layer, policy=policy, head="shared")
    if point.method == "ppsd":
        if plan.ppsd_backend not in ("sequential", "distributed"):
            raise SystemExit(f"{SCENARIO.name}: case {point.case}: ppsd_backend must be sequential or distributed on "
                             "this CPU")  # fmt: skip
        bounds = [stage.layer_end for stage in plan.stages[:-1]]
        options.update(stages=len(plan.stages), stage_boundaries=bounds, exit_layer=plan.exit_layer, head="shared",
                       backend=plan.ppsd_backend, ppsd_batching=point.ppsd_batching,
                       ppsd_join_min=point.ppsd_join_min)  # fmt: skip
        if plan.ppsd_backend == "distributed":
            options["threads_per_stage"] = threads
    return options


def probe_ms(
    adapter: Any, prompt: list[int], capture: str = "none", tokens: int = 9, runs: int = 5
) -> tuple[float, float]:
    """How fast this machine runs right now: the medians over `runs` batch-1 AR runs on `prompt` of a decode step
    (ms per token) and of the prefill (ms), to set beside the profile's (the box is shared: other work slows the
    passes, and a compute-bound prefill not by as much as a memory-bound decode step, or by more)."""
    from executor.api import generate

    steps, prefills = [], []
    generate(adapter, prompt, method="ar", max_new_tokens=tokens, capture=capture)  # its graphs made before timing
    for _ in range(runs):
        stats = generate(adapter, prompt, method="ar", max_new_tokens=tokens, capture=capture).stats
        steps.append((stats.wall_time_s - stats.prefill_time_s) / (tokens - 1) * 1e3)
        prefills.append(stats.prefill_time_s * 1e3)
    return statistics.median(steps), statistics.median(prefills)


def profile_ar_ms(point: Any, prompt_len: int) -> float:
    """The profile's batch-1 AR step in ms, for the probe's pass (the prompt + `probe_ms`'s tokens in the cache)."""
    from sim.serving import ServingSimulation

    plan = dataclasses.replace(point.plan, cache_slots=prompt_len + 10)
    simulation = ServingSimulation(plan, point.workload, 1, None)
    return simulation.pass_us(simulation.decode, prompt_len, 1, prompt_len) / 1e3


def profile_prefill_ms(point: Any, prompt_len: int) -> float:
    """The profile's batch-1 prefill of `prompt_len` tokens in ms (the probe's)."""
    from sim.cost import Pass
    from sim.serving import ServingSimulation

    simulation = ServingSimulation(point.plan, point.workload, 1, None)
    prefill = Pass("probe prefill", "prefill", ((0, point.plan.model.num_layers, prompt_len),), lm_head_q=1)
    return simulation.pass_us(prefill, 0, 1) / 1e3


def _first(point: Any, count: int) -> Any:
    workload = dataclasses.replace(point.workload, requests=point.workload.requests[:count])
    return dataclasses.replace(point, workload=workload)


def scaled_plan(plan: Any, decode: dict[int, float], prefill: float, decode_default: float) -> Any:
    """The plan with every stage's latency scaled (`sim.latency.ScaledLatency`)."""
    from sim.latency import ScaledLatency

    def scaled(stage: Any) -> Any:
        return dataclasses.replace(stage, latency=ScaledLatency(stage.latency, decode, prefill, decode_default))

    return dataclasses.replace(plan, stages=tuple(scaled(stage) for stage in plan.stages))


def in_run_costs(point: Any, logs: list[Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """The run's passes against the profile (module docstring): measured / simulated by kind and batch (median, p10,
    p90, count), the rounds' median in each quarter of the run, and the metrics simulated with those medians."""
    from sim.policy import make_policy
    from sim.serving import ServingSimulation, logged_ratios, metrics, simulate_serving

    reads = point.method == "eesd" and make_policy(point.plan.policy).needs_confidence
    simulation = ServingSimulation(
        point.plan, point.workload, point.max_batch, point.kv_capacity_tokens, ppsd_batching=point.ppsd_batching
    )
    ratios = logged_ratios(simulation, logs, reads)  # in the order the passes ran
    groups: dict[tuple[str, int], list[float]] = {}
    for log, ratio in zip(logs, ratios, strict=True):
        groups.setdefault((log.kind, log.batch), []).append(ratio)
    rounds = [ratio for log, ratio in zip(logs, ratios, strict=True) if log.kind != "prefill"]  # or PPSD decodes
    costs: dict[str, Any] = {
        kind if kind != "round" else f"round b={batch}": _spread(values)
        for (kind, batch), values in sorted(groups.items())
    }
    costs["rounds"] = _spread(rounds)
    size = max(1, -(-len(rounds) // 4))
    costs["rounds_by_quarter"] = [
        round(statistics.median(rounds[i : i + size]), 3) for i in range(0, len(rounds), size)
    ]
    decode = {batch: statistics.median(values) for (kind, batch), values in groups.items() if kind != "prefill"}
    plan = scaled_plan(point.plan, decode, statistics.median(groups[("prefill", 1)]), statistics.median(rounds))
    return costs, metrics(simulate_serving(dataclasses.replace(point, plan=plan)), point.slo)


def _spread(values: list[float]) -> dict[str, float]:
    """Median, p10 and p90 (`sim.serving.percentile`: linear between ranks, as every percentile here) and count."""
    from sim.serving import percentile

    return {"median": round(percentile(values, 50), 3), "p10": round(percentile(values, 10), 3),
            "p90": round(percentile(values, 90), 3), "count": len(values)}  # fmt: skip


def _costs_line(costs: dict[str, Any]) -> str:
    kinds = [key for key in costs if key in ("prefill", "ppsd") or key.startswith("round b=")]
    return ", ".join(f"{key} {costs[key]['median']:.2f}" for key in kinds)


def _errors_line(errors: dict[str, float]) -> str:
    return ", ".join(f"{key} {100 * value:+.0f}%" for key, value in errors.items())


def _row(point: Any, measured: dict, predicted: dict, extrapolated: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"case": point.case, "method": point.method, "replicas": point.replicas,
                           "max_batch": point.max_batch}  # fmt: skip
    for key in COMPARED + ("requests_per_s", "latency_mean_ms", "queue_mean_ms", "mean_batch", "tokens_per_round"):
        row[f"executor_{key}"] = round(measured[key], 4)
        row[f"sim_{key}"] = round(predicted[key], 4)
    errors = {key: (predicted[key] - measured[key]) / measured[key] for key in COMPARED}
    row["errors"] = {key: round(value, 4) for key, value in errors.items()}
    row["within_tolerance"] = all(abs(value) <= TOLERANCE for value in errors.values())
    row["extrapolated"] = extrapolated
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The run's rows as a table: measured and predicted tokens/s, and the prediction's error on every compared
    metric (the tolerance is 10%)."""
    from sim.tables import text_table

    cells = []
    for row in rows:
        cell = {key: row[key] for key in ("case", "method", "replicas")}
        cell.update(measured=row["executor_tokens_per_s"], predicted=row["sim_tokens_per_s"])
        cell.update({key: f"{100 * row['errors'][key]:+.1f}%" for key in COMPARED})
        cell["within"] = "yes" if row["within_tolerance"] else "no"
        cells.append(cell)
    heads = {"measured": "tok/s run", "predicted": "tok/s sim", "within": "within 10%"}
    heads.update({key: key.removesuffix("_ms").replace("tokens_per_s", "tok/s") + " err" for key in COMPARED})
    columns = ["case", "method", "replicas", "measured", "predicted", *COMPARED, "within"]
    return text_table(cells, columns, heads)


def _line(row: dict[str, Any]) -> str:
    cells = ", ".join(
        f"{key} {row[f'executor_{key}']:.1f}/{row[f'sim_{key}']:.1f} ({100 * row['errors'][key]:+.0f}%)"
        for key in COMPARED
    )
    return f"{row['case']} {row['method']}: measured/predicted {cells}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-workloads", action="store_true", help="regenerate the workload files and stop")
    parser.add_argument(
        "--recalibrate", action="store_true",
        help="measure the scenario's latency profile again first, in place (a shared box's speed drifts)",
    )  # fmt: skip
    parser.add_argument(
        "--visits", type=int, default=None,
        help="with --recalibrate: time the profile in this many visits of the grid (3 repeats each; a drifting box)",
    )  # fmt: skip
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: all the scenario's)")
    parser.add_argument("--first", type=int, default=None, help="serve only each workload's first N requests (a look)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as the profile)")
    parser.add_argument("--model", default=MODEL, help=f"the model (default: {MODEL}; a GGUF path on a GPU box)")
    parser.add_argument("--device", default="cpu", help="the executor's device (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="the executor's dtype (default: float32)")
    parser.add_argument("--capture", default="none", help="serve's capture mode (default: none; graph on a GPU)")
    parser.add_argument("--profile", type=Path, default=None, help="a latency profile measured on --device")
    parser.add_argument("--trace", type=Path, default=None, help="an acceptance trace measured on --device")
    parser.add_argument(
        "--host", type=Path, default=None,
        help="an `eesd calibrate host --loop serve` file: each method's host work between passes, from it",
    )  # fmt: skip
    parser.add_argument("--rate-scale", type=float, default=1.0, help="arrivals this many times as dense (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default: {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args()
    from sim.formats import check_benchmark_args

    check_benchmark_args(args, counts=("threads",))
    if args.write_workloads:
        for path in write_workloads():
            print(f"wrote {path}")
        return 0
    if args.recalibrate:
        from sim_vs_executor import recalibrate_argv

        from executor.cli import main as eesd

        status = eesd(recalibrate_argv(SCENARIO, threads=args.threads, visits=args.visits))
        if status:
            return status
    from calibrate.validate import write_json
    from sim.serving import load_serving_points

    scenario = SCENARIO
    if (args.profile is None) != (args.trace is None):
        raise SystemExit("--profile and --trace go together (a scenario derived from both)")
    for given in (args.profile, args.trace, args.host):
        if given is not None and not given.is_file():
            raise SystemExit(f"{given}: not a file (--profile, --trace and --host name a latency profile, a trace and "
                             "a host-work file)")  # fmt: skip
    if args.profile is not None or args.host is not None:
        folder = args.out.parent / f"{args.out.stem}_files"
        scenario = derived_scenario(args.profile, args.trace, folder, args.model, args.host)
    if not args.rate_scale > 0:
        raise SystemExit(f"--rate-scale: expected a factor > 0, got {args.rate_scale}")
    points = load_serving_points(scenario)
    if args.rate_scale != 1.0:
        points = [dense(point, args.rate_scale) for point in points]
    if args.cases:
        chosen = set(args.cases.split(","))
        points = [p for p in points if p.case in chosen]
        if not points:
            raise SystemExit(f"--cases: expected names from {SCENARIO.name}, got {args.cases!r}")
    if args.methods:
        points = [p for p in points if p.method in set(args.methods.split(","))]
        if not points:
            raise SystemExit(f"--methods: expected methods of {SCENARIO.name}'s cases, got {args.methods!r}")
    if args.device != "cpu" and any(p.replicas > 1 for p in points):  # the simulator's replicas: separate devices
        print("note: the cases with replicas are skipped on one GPU (its replicas would share the device)")
        points = [p for p in points if p.replicas == 1]
    if args.first is not None:
        if args.first < 1:
            raise SystemExit(f"--first: expected a number of requests >= 1, got {args.first}")
        points = [_first(point, args.first) for point in points]

    def write(rows: list[dict[str, Any]], metadata: dict[str, Any]) -> None:
        metadata["rate_scale"] = args.rate_scale
        if scenario != SCENARIO:  # derived: its files are kept beside the JSON
            metadata.update(scenario=str(scenario), profile=str(args.profile), trace=str(args.trace),
                            host_work=None if args.host is None else str(args.host))  # fmt: skip
        else:  # the shipped scenario's profile (timed again in place with --recalibrate), and when it was timed
            metadata.update(shipped_profile(SCENARIO))
        write_json(args.out, {"metadata": metadata, "rows": rows})

    rows, metadata = measure(points, args.threads, args.model, args.device, args.dtype, args.capture, on_row=write)
    write(rows, metadata)
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
