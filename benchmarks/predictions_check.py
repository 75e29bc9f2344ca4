"""Benchmark (not a test): predictions committed before a GPU lease against what the lease measured, out of sample.

`benchmarks/sim_vs_gpu.py --predict` writes the simulator's predictions for configurations no lease has measured
(each row names the command that measures it) and they are committed before the lease. The lease runs those commands
unchanged; this script matches every prediction with its measured row and reports the error, so nothing measured
can have changed the model before the comparison. Torch-free: it reads JSON only.

Measured files of two kinds are read: `benchmarks/gpu_decode.py`'s JSON (a row matches on the model, its `method`
label, its `capture` and the 7B shape's prompt length) and `eesd validate --json` (a row matches on its `point`
label, the scenario the prediction's command names). A prediction with no measured row is listed as unmeasured.

    python benchmarks/predictions_check.py --predictions benchmarks/results/predictions_next_lease_2026-12-03.json \\
        --card h200 --measured benchmarks/results/gpu_decode_nvidia_h200_llama7b_prompt512.json ... \\
        --out benchmarks/results/predictions_check_nvidia_h200_2026-12-04.json

The error is (predicted - measured) / measured on decode tokens/s (the median the measured file reports).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.validate import short_costs  # noqa: E402
from sim.formats import write_text_atomic  # noqa: E402


@dataclass(frozen=True)
class Measured:
    """One measured row: what it is (the keys a prediction matches) and its decode tokens/s."""

    source: str  # the file it came from
    kind: str  # "gpu_decode" | "validate"
    model: str  # "Llama-2-7B" | "SmolLM2-135M" | ...
    config: str  # gpu_decode's `method` label, validate's `point`
    capture: str | None
    prompt_len: int | None  # the 7B shape's random prompt length; None for real prompts
    scenario: str | None  # validate's scenario file
    tokens_per_s: float
    runs: tuple[float, ...]  # the values the median is over (prompts x runs, or validate's repeats)
    extra: dict[str, Any]


@dataclass(frozen=True)
class Check:
    card: str
    model: str
    config: str
    batch: int
    context: str
    capture: str | None
    predicted: float
    measured: float | None
    error: float | None  # (predicted - measured) / measured
    spread: float | None  # (max - min) / median of the measured runs
    extrapolated: bool
    source: str | None
    measure: str


def family(model: str) -> str:
    """The model a row names, as predictions and measured files both spell it (first word)."""
    return re.split(r"[ ,(]", model.strip(), maxsplit=1)[0]


def read_measured(path: Path) -> list[Measured]:
    """The rows of one measured file (gpu_decode.py's or eesd validate's JSON)."""
    data = json.loads(path.read_text())
    name = path.name
    if "metadata" in data and "rows" in data and "scenario" in data["metadata"]:
        scenario = Path(data["metadata"]["scenario"]).name
        profile = Path(data["metadata"].get("latency_profile", "")).stem  # latency_<model>_<device>_<dtype>
        model = profile.removeprefix("latency_").split("_")[0] or "?"
        return [
            Measured(name, "validate", model, r["point"], data["metadata"].get("capture"), None, scenario,
                     float(r["executor_tokens_per_s"]), tuple(r.get("executor_runs_tokens_per_s", ())),
                     {"tokens_per_round": r.get("executor_tokens_per_round"),
                      "predicted_tokens_per_round": r.get("sim_tokens_per_round")})
            for r in data["rows"]
        ]  # fmt: skip
    if "rows" in data and "llama7b_prompt_len" in data:
        rows = []
        for r in data["rows"]:
            if r.get("decode_tokens_per_s") is None:
                continue  # HF's rows: end to end only, and not predicted
            model = family(r["model"])
            prompt_len = int(data["llama7b_prompt_len"]) if model.startswith("Llama") else None
            spread = r.get("spread_decode_tokens_per_s") or {}
            runs = tuple(v for k, v in spread.items() if k in ("min", "max"))
            rows.append(Measured(name, "gpu_decode", model, r["method"], r.get("capture"), prompt_len, None,
                                 float(r["decode_tokens_per_s"]), runs, {}))  # fmt: skip
        return rows
    raise ValueError(f"{path}: neither gpu_decode.py's JSON (rows + llama7b_prompt_len) nor eesd validate's")


def prompt_len_of(prediction: dict[str, Any]) -> int | None:
    """The 7B shape's prompt length a prediction names (`context`, or `prompts`: 'N random token ids')."""
    if not family(prediction["model"]).startswith("Llama"):
        return None
    if "context" in prediction:
        return int(prediction["context"])
    found = re.match(r"(\d+) random", str(prediction.get("prompts", "")))
    return int(found.group(1)) if found else None


def matches(prediction: dict[str, Any], row: Measured) -> bool:
    same = short_costs(prediction["config"]) == short_costs(row.config)  # (older files keep pinned costs whole)
    if family(prediction["model"]).lower() != row.model.lower() or not same:
        return False
    command = prediction.get("measure", "")
    if command.startswith("eesd validate"):
        return row.kind == "validate" and row.scenario is not None and row.scenario in command
    return (
        row.kind == "gpu_decode"
        and prediction.get("capture") == row.capture
        and prompt_len_of(prediction) == row.prompt_len
    )


def spread_of(row: Measured) -> float | None:
    if len(row.runs) < 2 or not row.tokens_per_s:
        return None
    return (max(row.runs) - min(row.runs)) / row.tokens_per_s


def check(predictions: Iterable[dict[str, Any]], measured: list[Measured]) -> list[Check]:
    out = []
    for p in predictions:
        found = [m for m in measured if matches(p, m)]
        if len(found) > 1:
            raise ValueError(f"{p['config']} ({p['card']}): {len(found)} measured rows match ({found[0].source} ...)")
        row = found[0] if found else None
        predicted = float(p["predicted_decode_tokens_per_s"])
        error = None if row is None else (predicted - row.tokens_per_s) / row.tokens_per_s
        context = str(p.get("context", p.get("prompts", "")))
        out.append(Check(
            p["card"], p["model"], p["config"], int(p.get("batch", 1)), context, p.get("capture"), predicted,
            None if row is None else row.tokens_per_s, error, None if row is None else spread_of(row),
            bool(p.get("extrapolated")), None if row is None else row.source, p.get("measure", ""),
        ))  # fmt: skip
    return out


def group_of(c: Check) -> str:
    config = c.config.lower()
    method = "ppsd" if config.startswith("ppsd") else "eesd" if config.startswith("eesd") else "ar"
    return f"{method}, batch {c.batch}"


def summary(checks: list[Check]) -> dict[str, Any]:
    done = [c for c in checks if c.error is not None]
    groups: dict[str, list[float]] = {}
    for c in done:
        groups.setdefault(group_of(c), []).append(abs(c.error))
    return {
        "predicted": len(checks),
        "measured": len(done),
        "median_abs_error": round(statistics.median(abs(c.error) for c in done), 4) if done else None,
        "max_abs_error": round(max(abs(c.error) for c in done), 4) if done else None,
        "within_10_percent": sum(abs(c.error) <= 0.10 for c in done),
        "by_group_median_abs_error": {g: round(statistics.median(v), 4) for g, v in sorted(groups.items())},
    }


def table(checks: list[Check]) -> str:
    head = "| model | configuration | batch | prompts | capture | predicted | measured | error | spread |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in checks:
        star = " *" if c.extrapolated else ""
        measured = "unmeasured" if c.measured is None else f"{c.measured:.1f}"
        error = "-" if c.error is None else f"{100 * c.error:+.1f}%"
        spread = "-" if c.spread is None else f"{100 * c.spread:.0f}%"
        lines.append(f"| {c.model} | {c.config} | {c.batch} | {c.context} | {c.capture or '-'} | "
                     f"{c.predicted:.1f}{star} | {measured} | {error} | {spread} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", type=Path, required=True, action="append", help="committed predictions")
    parser.add_argument("--card", required=True, help="whose rows (the predictions' `card`: h100, h200)")
    parser.add_argument("--measured", type=Path, nargs="+", required=True, help="the lease's measured JSON files")
    parser.add_argument("--out", type=Path, default=None, help="write the comparison here (JSON, atomically)")
    args = parser.parse_args(argv)
    from sim.formats import check_benchmark_args

    check_benchmark_args(args)
    try:
        measured = [row for path in args.measured for row in read_measured(path)]
        files = [(path, json.loads(path.read_text())) for path in args.predictions]
    except (OSError, ValueError, KeyError) as error:
        print(f"predictions_check: {error}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"benchmark": "predictions_check", "card": args.card, "files": [],
                              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "python": platform.python_version()}  # fmt: skip
    for path, data in files:
        rows = [r for r in data["rows"] if r.get("card") == args.card]
        if not rows:
            cards = sorted({str(r.get("card")) for r in data["rows"]})
            print(f"predictions_check: {path}: no predictions for --card {args.card} (it holds {', '.join(cards)})",
                  file=sys.stderr)  # fmt: skip
            return 2
        try:
            checks = check(rows, measured)
        except (ValueError, KeyError) as error:
            print(f"predictions_check: {path}: {error}", file=sys.stderr)
            return 2
        print(f"{path.name} (committed {data.get('date')}, code {str(data.get('code_commit', '?'))[:7]}):")
        print(table(checks))
        print(json.dumps(summary(checks)))
        report["files"].append({
            "predictions": str(path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path),
            "predictions_date": data.get("date"), "code_commit": data.get("code_commit"),
            "summary": summary(checks), "rows": [asdict(c) for c in checks],
        })  # fmt: skip
    report["measured"] = sorted({str(p) for p in args.measured})
    report["error"] = "(predicted - measured) / measured, decode tokens/s; spread: (max - min) / median of the runs"
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
