"""Benchmark (not a test): shipped `eesd validate` runs predicted again, requests ending at their EOS or not.

A trace replay used to go on past a prompt's EOS (the next prompt's tokens standing in), while the executor stops
there. `acceptance.at_eos: stop` (the default now) ends each request at the first EOS its replay reaches, with its
draft budgets and blocks of steps still reaching for the tokens asked (the executor learns of an EOS only when it
emits it); `continue` is the replay as it was. This script takes `eesd validate --json` files, plans each one again
from its metadata (the scenario, the prompts, the tokens per request), simulates every point it measured both ways,
and sets them beside what the executor measured in that run (the JSON's medians). No executor runs here: the
measured side is the file's. `stored` is the prediction the file holds, for checking that `continue` reproduces it
(calibration files edited since would show here).

    python benchmarks/eos_replay.py benchmarks/results/validate_smollm2-135m_cpu_frozen_buckets.json \\
        benchmarks/results/validate_cpu_xeon_smollm2.json --model smollm2-135m \\
        --out benchmarks/results/eos_replay_validate_smollm2.json

Errors are (predicted - measured) / measured; decode tokens are the totals over the run's requests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.validate import Target, plan, predict, short_costs  # noqa: E402
from sim.formats import read_validate_json, write_text_atomic  # noqa: E402

MODES = ("stop", "continue")


def with_at_eos(target: Target, at_eos: str) -> Target:
    """The target with `acceptance.at_eos` set."""
    scenario = target.point.scenario
    acceptance = scenario.acceptance.model_copy(update={"at_eos": at_eos})
    point = dataclasses.replace(target.point, scenario=scenario.model_copy(update={"acceptance": acceptance}))
    return dataclasses.replace(target, point=point)


def error(predicted: float, measured: float) -> float:
    return round((predicted - measured) / measured, 4)


def replay_file(path: Path, model: str | None) -> list[dict[str, Any]]:
    """One row per point the file measured: measured, stored and both predictions."""
    document = read_validate_json(path, "files")
    meta, measured = document["metadata"], {short_costs(row["point"]): row for row in document["rows"]}
    validate_plan = plan(meta["scenario"], prompts=len(meta["prompts"]), max_new_tokens=meta["max_new_tokens"],
                         model=model)  # fmt: skip
    rows = []
    for target in validate_plan.targets:
        row = measured.get(short_costs(target.label))
        if row is None:
            continue
        out: dict[str, Any] = {
            "file": path.name, "point": target.label, "device": meta.get("device"),
            "measured_tokens_per_s": round(row["executor_tokens_per_s"], 3),
            "measured_tokens_per_round": round(row["executor_tokens_per_round"], 4),
            "measured_decode_tokens": row.get("executor_decode_tokens"),
            "stored_tokens_per_s": round(row["sim_tokens_per_s"], 3),
        }  # fmt: skip
        for mode in MODES:
            predicted, _ = predict(with_at_eos(target, mode))
            out[f"{mode}_tokens_per_s"] = round(predicted.tokens_per_s, 3)
            out[f"{mode}_tokens_per_round"] = round(predicted.tokens_per_round, 4)
            out[f"{mode}_decode_tokens"] = predicted.decode_tokens
            out[f"{mode}_tokens_per_s_error"] = error(predicted.tokens_per_s, row["executor_tokens_per_s"])
            out[f"{mode}_tokens_per_round_error"] = error(predicted.tokens_per_round, row["executor_tokens_per_round"])
        rows.append(out)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {"points": len(rows)}
    for mode in MODES:
        for what in ("tokens_per_s", "tokens_per_round"):
            errors = [abs(r[f"{mode}_{what}_error"]) for r in rows]
            result[f"{mode}_median_abs_{what}_error"] = round(statistics.median(errors), 4)
            result[f"{mode}_max_abs_{what}_error"] = round(max(errors), 4)
        same = [r for r in rows if r["measured_decode_tokens"] == r[f"{mode}_decode_tokens"]]
        result[f"{mode}_decode_tokens_equal"] = f"{len(same)} of {len(rows)}"
    return result


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'file / point':<58} {'meas tok/s':>10} {'stop':>7} {'cont':>7} {'meas t/r':>8} {'stop':>7} {'cont':>7}"
            f" {'tokens meas/stop/cont':>22}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        name = f"{r['file'].removeprefix('validate_').removesuffix('.json')}: {r['point']}"[:58]
        tokens = f"{r['measured_decode_tokens']}/{r['stop_decode_tokens']}/{r['continue_decode_tokens']}"
        lines.append(
            f"{name:<58} {r['measured_tokens_per_s']:>10.2f} {r['stop_tokens_per_s_error']:>+7.1%} "
            f"{r['continue_tokens_per_s_error']:>+7.1%} {r['measured_tokens_per_round']:>8.3f} "
            f"{r['stop_tokens_per_round_error']:>+7.1%} {r['continue_tokens_per_round_error']:>+7.1%} {tokens:>22}"
        )
    return "\n".join(lines)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="eesd validate --json files")
    parser.add_argument("--model", help="the calibration files' model at this machine's path (as eesd validate)")
    parser.add_argument("--out", type=Path, help="write the rows and summary as JSON here (atomically)")
    args = parser.parse_args()
    from sim.formats import check_benchmark_args

    check_benchmark_args(args, inputs=("files",))
    rows = [row for path in args.files for row in replay_file(path, args.model)]
    print(table(rows))
    result = summary(rows)
    print(json.dumps(result, indent=1))
    if args.out:
        report = {
            "label": "simulator predictions (no executor run; measured figures are the validate files')",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "command": shlex.join([sys.executable, *sys.argv]),
            "commit": commit(), "error": "(predicted - measured) / measured", "summary": result, "rows": rows,
        }  # fmt: skip
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
