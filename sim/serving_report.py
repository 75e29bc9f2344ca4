"""Run a serving scenario's points and write what they show: a table, `serving.csv`, `speculation.csv` and plots.

`serving.csv` has one row per (case, rate, method) with the metrics of `sim.serving.metrics` (latencies in ms,
throughput per second). `speculation.csv` says, per case and speculative method, where speculation stops paying:
the lowest swept rate at which its mean end-to-end latency is no longer below AR's on the same requests, interpolated
linearly in the latency ratio between the two rates around the crossing (`stop_rate_per_s`; empty when it pays at every
rate swept, `never` when it pays at none). `capacity.csv` says, per case and method, up to which request rate the
scenario's SLO holds (at least `slo.attainment_pct` of the requests within both bounds): the rate where the share
first falls below it, interpolated linearly in the share between the two rates around it (`capacity_rps`; empty when
it holds at every rate swept, `never` when at none), and that rate per device (`capacity_rps_per_device`: replicas
times a replica's devices), what sizing a deployment asks. Plots (matplotlib, the `plots` extra): per case, the
throughput-latency curve of each method (`throughput_latency_<case>.png`) and p50 TPOT and p90 TTFT over the rate
(`latency_vs_rate_<case>.png`); the capacity per device of every case and method (`capacity.png`).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sim import tables, workers
from sim.formats import save_figure_atomic, write_text_atomic
from sim.progress import progress_bar
from sim.runner import plots_available
from sim.serving import SATURATED, ServingPoint, ServingRun, metrics, simulate_serving

PAYS_METRIC = "latency_mean_ms"  # speculation pays at a rate where its mean end-to-end latency is below AR's
TABLE_COLUMNS = ("case", "rate_per_s", "method", "tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p90_ms",
                 "tpot_p50_ms", "tpot_p90_ms", "latency_mean_ms", "occupancy", "goodput_rps")  # fmt: skip


def run_point(point: ServingPoint) -> ServingRun:
    start = time.perf_counter()
    result = simulate_serving(point)
    return ServingRun(point, result, time.perf_counter() - start, metrics(result, point.slo))


def run_serving(points: Sequence[ServingPoint], jobs: int = 1, progress: bool = True) -> list[ServingRun]:
    """Simulate every point (`jobs` > 1: in that many processes); results in point order."""
    bar = progress_bar(len(points), "serving", "run", progress, leave=False)
    runs = []
    with contextlib.ExitStack() as stack:
        mapper: Any = map
        if jobs > 1 and len(points) > 1:
            mapper = stack.enter_context(workers.pool(min(jobs, len(points)))).map
        for run in mapper(run_point, points):
            runs.append(run)
            bar.update(1)
    bar.close()
    return runs


def row(run: ServingRun) -> dict[str, Any]:
    p = run.point
    head = {
        "case": p.case,
        "rate_per_s": p.rate_per_s if p.rate_per_s is not None else "",
        "method": p.method,
        "policy": p.plan.policy if p.method == "eesd" else "",
        "exit_layer": p.plan.exit_layer if p.method in ("eesd", "ppsd") else "",
        "stages": len(p.plan.stages),
        "replicas": p.replicas,
        "dispatch": p.dispatch if p.replicas > 1 else "",
        "devices": p.devices,
        "max_batch": p.max_batch,
        "kv_capacity_tokens": p.kv_capacity_tokens if p.kv_capacity_tokens is not None else "",
    }
    values = {k: _rounded(v) for k, v in run.metrics.items()}
    return {**head, **values, "extrapolated": run.result.extrapolated, "wall_s": round(run.wall_s, 3)}


def _rounded(value: float) -> float | int | str:
    if isinstance(value, int):
        return value
    return "" if math.isnan(value) else round(value, 4)


def _curves(runs: Sequence[ServingRun]) -> dict[tuple[str, str], dict[float, ServingRun]]:
    """The runs at swept rates, by (case, method) and rate (in the runs' order of cases and methods)."""
    curves: dict[tuple[str, str], dict[float, ServingRun]] = {}
    for run in runs:
        if run.point.rate_per_s is not None:
            curves.setdefault((run.point.case, run.point.method), {})[run.point.rate_per_s] = run
    return curves


def _latency_ratios(
    curves: dict[tuple[str, str], dict[float, ServingRun]], case: str, method: str
) -> tuple[list[float], list[float]] | None:
    """A speculative method's mean end-to-end latency over AR's at each rate both ran (None: AR itself, or no AR)."""
    curve, baseline = curves[(case, method)], curves.get((case, "ar"))
    if method == "ar" or baseline is None:
        return None
    rates = sorted(r for r in curve if r in baseline)
    return rates, [curve[r].metrics[PAYS_METRIC] / baseline[r].metrics[PAYS_METRIC] for r in rates]


def _slo_shares(curve: dict[float, ServingRun]) -> tuple[ServingPoint, list[float], list[float]] | None:
    """A method's first point and its share of requests within the SLO at each rate (None: an SLO without a bound)."""
    point = next(iter(curve.values())).point
    if point.slo.ttft_ms is None and point.slo.tpot_ms is None:
        return None
    rates = sorted(curve)
    return point, rates, [curve[r].metrics["slo_pct"] for r in rates]


def stop_paying(runs: Sequence[ServingRun]) -> list[dict[str, Any]]:
    """Per case and speculative method: the rate where it stops paying against AR (see the module docstring)."""
    curves, found = _curves(runs), []
    for case, method in curves:
        pair = _latency_ratios(curves, case, method)
        if pair is not None:
            found.append({"case": case, "method": method, "metric": PAYS_METRIC, **_crossing(*pair)})
    return found


def _crossing(rates: list[float], ratios: list[float]) -> dict[str, Any]:
    cells = {"ratios": ";".join(f"{r:g}:{x:.3f}" for r, x in zip(rates, ratios, strict=True))}
    if not rates or ratios[0] >= 1.0:
        return {"stop_rate_per_s": "never", **cells}
    i = _first(ratios, lambda x: x >= 1.0)
    if i is None:
        return {"stop_rate_per_s": None, **cells}
    r0, r1, x0, x1 = rates[i - 1], rates[i], ratios[i - 1], ratios[i]
    return {"stop_rate_per_s": round(r0 + (1.0 - x0) / (x1 - x0) * (r1 - r0), 4), **cells}


def _first(values: list[float], holds: Callable[[float], bool]) -> int | None:
    """The index of the first of `values` for which `holds`, after the first; None if none."""
    return next((i for i in range(1, len(values)) if holds(values[i])), None)


def _falls_below(rates: list[float], values: list[float], target: float) -> float | str | None:
    """The rate where `values` (over increasing `rates`) first fall below `target`, linear between the two rates
    around it; "never" when the first is below, None when none is."""
    if values[0] < target:
        return "never"
    i = _first(values, lambda v: v < target)
    if i is None:
        return None
    r0, r1, v0, v1 = rates[i - 1], rates[i], values[i - 1], values[i]
    return round(r0 + (v0 - target) / (v0 - v1) * (r1 - r0), 4)


def refinements(runs: Sequence[ServingRun]) -> dict[str, dict[float, set[str]]]:
    """The runs that halve every bracket of swept rates around a crossing (serve-sim's `--refine`), by case: its
    middle rate for AR and the method where speculation stops paying (`stop_paying`), for the method where its SLO
    attainment falls below the target (`capacity`)."""
    curves = _curves(runs)
    wanted: dict[str, dict[float, set[str]]] = {}

    def halve(case: str, rates: list[float], i: int | None, methods: set[str]) -> None:
        if i is not None:
            wanted.setdefault(case, {}).setdefault((rates[i - 1] + rates[i]) / 2, set()).update(methods)

    for (case, method), curve in curves.items():
        pair = _latency_ratios(curves, case, method)
        if pair is not None and pair[0] and pair[1][0] < 1.0:
            halve(case, pair[0], _first(pair[1], lambda x: x >= 1.0), {"ar", method})
        shares = _slo_shares(curve)
        if shares is not None:
            point, rates, values = shares
            target = point.slo.attainment_pct
            if values[0] >= target:
                halve(case, rates, _first([v - target for v in values], lambda v: v < 0), {method})
    return wanted


def capacity(runs: Sequence[ServingRun]) -> list[dict[str, Any]]:
    """Per case and method with rates swept and an SLO with a bound: the request rate up to which the SLO holds
    (see the module docstring)."""
    found = []
    for (case, method), curve in _curves(runs).items():
        shares = _slo_shares(curve)
        if shares is None:
            continue
        point, rates, values = shares
        target = point.slo.attainment_pct
        stop = _falls_below(rates, values, target)
        found.append({
            "case": case, "method": method, "devices": point.devices, "ttft_ms": point.slo.ttft_ms or "",
            "tpot_ms": point.slo.tpot_ms or "", "attainment_pct": target, "capacity_rps": "" if stop is None else stop,
            "capacity_rps_per_device": round(stop / point.devices, 4) if isinstance(stop, float) else "",
            "slo_pct": ";".join(f"{r:g}:{v:.1f}" for r, v in zip(rates, values, strict=True)),
        })  # fmt: skip
    return found


def write_outputs(runs: Sequence[ServingRun], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_write_csv([row(run) for run in runs], out_dir / "serving.csv")]
    crossings = stop_paying(runs)
    if crossings:
        written.append(_write_csv(crossings, out_dir / "speculation.csv"))
    capacities = capacity(runs)
    if capacities:
        written.append(_write_csv(capacities, out_dir / "capacity.csv"))
    if plots_available() and any(run.point.rate_per_s is not None for run in runs):
        written += _plots(runs, out_dir)
    if plots_available() and any(isinstance(item["capacity_rps"], float) for item in capacities):
        written.append(_capacity_plot(capacities, out_dir / "capacity.png"))
    return written


def _highest_rate(item: dict[str, Any]) -> float:
    return max(float(pair.split(":")[0]) for pair in item["slo_pct"].split(";"))


def _capacity_plot(capacities: list[dict[str, Any]], path: Path) -> Path:
    """Requests/s per device within the SLO, a bar per case and method (a hatched bar: held at every rate swept, so
    at least the highest; none: missed at every rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(item["case"] for item in capacities))
    methods = list(dict.fromkeys(item["method"] for item in capacities))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(cases)), 4.0))
    for m, method in enumerate(methods):
        label: str | None = method
        for c, case in enumerate(cases):
            item = next((i for i in capacities if i["case"] == case and i["method"] == method), None)
            if item is None or item["capacity_rps"] == "never":
                continue
            held = item["capacity_rps"] == ""  # held at every rate swept: at least the highest
            rate = _highest_rate(item) if held else item["capacity_rps"]
            offset = (m - (len(methods) - 1) / 2) * width
            hatch = "//" if held else None
            ax.bar(c + offset, rate / item["devices"], width, color=f"C{m}", hatch=hatch, label=label)
            label = None
    ax.set_xticks(range(len(cases)), [case or "scenario" for case in cases], rotation=20, fontsize=7)
    ax.set_ylabel("requests/s per device within the SLO")
    ax.set_title("SLO capacity per device (hatched: held at every rate swept)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path


def saturation_note(runs: Sequence[ServingRun]) -> str | None:
    """The runs that served less than the rate offered them (column `saturated`), per case and method from the
    lowest such rate; None if none did."""
    lowest: dict[tuple[str, str], tuple[float, bool]] = {}  # (rate, swept: a rate of the sweep, else as offered)
    for run in runs:
        swept = run.point.rate_per_s is not None
        rate = run.point.rate_per_s if swept else run.metrics.get("offered_rps", math.nan)
        if run.metrics.get("saturated"):
            key = (run.point.case, run.point.method)
            lowest[key] = min(lowest.get(key, (rate, swept)), (rate, swept))
    if not lowest:
        return None
    where = "; ".join(
        f"{f'case {case}: ' if case else ''}{method} " + (f"from {rate:g}/s" if swept else f"(offered {rate:.3g}/s)")
        for (case, method), (rate, swept) in sorted(lowest.items())
    )
    return (
        f"saturated (column saturated: from its earliest third of requests to its latest, latency grew by over "
        f"{1 / SATURATED - 1:.2f} s per second of arrivals, the backlog of a server working at under "
        f"{SATURATED:.0%} of the offered rate; it grows for as long as the run lasts, so its latencies and SLO "
        f"attainment depend on the run's length, not on the rate alone; a run of few requests is judged noisily): "
        f"{where}"
    )


def run_notes(runs: Sequence[ServingRun]) -> list[str]:
    """Each case and method's notes (`ServingPoint.notes`: the same at every rate), each once."""
    lines = (f"{f'case {r.point.case}: ' if r.point.case else ''}{r.point.method}: {note}"
             for r in runs for note in r.point.notes)  # fmt: skip
    return list(dict.fromkeys(lines))


def write_json(path: Path, scenario: Path, runs: Sequence[ServingRun], refine: int = 0) -> Path:
    """Every run's row and the crossings, with the scenario, date, host, the rounds of `--refine` and the runs' notes
    (empty cells: null)."""
    metadata = {
        "scenario": str(scenario),
        "refine": refine,
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "stop_paying_metric": PAYS_METRIC,
        "notes": run_notes(runs),
    }
    rows = [{k: (None if v == "" else v) for k, v in row(run).items()} for run in runs]
    capacities = [{k: (None if v == "" else v) for k, v in item.items()} for item in capacity(runs)]
    document = {"metadata": metadata, "speculation": stop_paying(runs), "capacity": capacities, "runs": rows}
    write_text_atomic(path, json.dumps(document, indent=2, allow_nan=False) + "\n")
    return path


def _write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
    return path


def _plots(runs: Sequence[ServingRun], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for case in dict.fromkeys(run.point.case for run in runs):
        curves: dict[str, list[ServingRun]] = {}
        for run in runs:
            if run.point.case == case and run.point.rate_per_s is not None:
                curves.setdefault(run.point.method, []).append(run)
        name = case or "scenario"
        throughput = {
            method: ([r.metrics["tokens_per_s"] for r in items], [r.metrics["latency_mean_ms"] for r in items], "-")
            for method, items in curves.items()
        }
        labels = ("throughput (tokens/s)", "mean end-to-end latency (ms)", f"{name}: one point per request rate")
        paths.append(_figure(plt, throughput, labels, False, out_dir / f"throughput_latency_{name}.png"))
        latency = {}
        for method, items in curves.items():
            rates = [r.point.rate_per_s for r in items]
            latency[f"{method} TPOT p50"] = (rates, [r.metrics["tpot_p50_ms"] for r in items], "-")
            latency[f"{method} TTFT p90"] = (rates, [r.metrics["ttft_p90_ms"] for r in items], "--")
        labels = ("request rate (1/s)", "ms", f"{name}: latency over the offered load")
        paths.append(_figure(plt, latency, labels, True, out_dir / f"latency_vs_rate_{name}.png"))
    return paths


def _figure(plt: Any, series: dict[str, tuple[list, list, str]], labels: tuple[str, str, str], log_x: bool,
            path: Path) -> Path:  # fmt: skip
    """One plot of `series` (label -> xs, ys, line style), log-scaled in y (and in x with `log_x`), saved at `path`."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (xs, ys, style) in series.items():
        ax.plot(xs, ys, marker="o", linestyle=style, label=label)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(labels[2], fontsize=9)
    ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path


HEADS = {
    "rate_per_s": "rate/s", "tokens_per_s": "tok/s", "requests_per_s": "req/s", "latency_mean_ms": "e2e ms",
    "ttft_p50_ms": "ttft50", "ttft_p90_ms": "ttft90", "tpot_p50_ms": "tpot50", "tpot_p90_ms": "tpot90",
    "goodput_rps": "goodput/s",
}  # fmt: skip


def summary_table(runs: Sequence[ServingRun]) -> str:
    """A fixed-width table, one line per run; goodput only where a run has an SLO (without one every request
    counts, and it is the requests/s)."""
    slo = any(run.point.slo.ttft_ms is not None or run.point.slo.tpot_ms is not None for run in runs)
    return text_table([row(run) for run in runs], [c for c in TABLE_COLUMNS if slo or c != "goodput_rps"])


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """`columns` of `rows` as a fixed-width table with the serving metrics' short heads (also `eesd serve-bench`'s)."""
    return tables.text_table(rows, columns, HEADS)
