"""Benchmark (not a test): does pricing each method's own host work (`latency.profile.host_work`) move the simulator
closer to what the executor measured? An `eesd validate --json` run on a scenario that names a host-work file holds
the executor's measurements and the predictions with the file; this re-predicts every row with the scenario's
`host_work` dropped (the latency profile's `overhead` rows instead, every method alike) and reports both errors on the
same measurements, nothing run again. Torch-free.

    eesd validate SCENARIO --points 0,3,6,9 --prompts 4 --max-new-tokens 32 --threads 1 --repeats 3 --json v.json
    python benchmarks/host_work_ab.py --validate v.json --points 0,3,6,9 --out benchmarks/results/host_work_ab_cpu.json

Errors: (predicted - measured) / measured on decode tokens/s, also against each run scaled to the profile's conditions
(`eesd validate`'s `error now`), and on the speedup over AR at the same batch size. The JSON keeps the validate run's
metadata (its date, device, versions) and, under `compared`, when this comparison was made.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.validate import plan, predict, short_costs  # noqa: E402
from sim.formats import write_text_atomic  # noqa: E402


def predictions(scenario: Path, points: str, prompts: int, tokens: int) -> dict[str, float]:
    """Decode tokens/s the simulator predicts per validate target (its label)."""
    plan_ = plan(scenario, prompts, tokens, points)
    out = {}
    for target in plan_.targets:
        measured, _ = predict(target)
        out[short_costs(target.label)] = measured.tokens_per_s  # as `rows` reads a file's labels
    return out


def without_host_work(scenario: Path) -> Path:
    """A copy of the scenario beside it (its relative paths resolve alike) with `latency.profile.host_work` dropped."""
    data = yaml.safe_load(scenario.read_text(encoding="utf-8"))
    profile = data["latency"]["profile"]
    if profile.pop("host_work", None) is None:
        raise SystemExit(f"{scenario}: latency.profile.host_work: not set; nothing to compare")
    copy = scenario.with_name(f".{scenario.stem}.rows.yaml")
    copy.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return copy


def rows(validate: dict[str, Any], with_file: dict[str, float], with_rows: dict[str, float]) -> list[dict[str, Any]]:
    measured_by = {short_costs(r["point"]): r for r in validate["rows"]}
    out = []
    for r in validate["rows"]:
        label, measured = short_costs(r["point"]), r["executor_tokens_per_s"]
        runs, slowdowns = r["executor_runs_tokens_per_s"], r.get("slowdowns_since_profile") or []
        now = statistics.median(t * f for t, f in zip(runs, slowdowns, strict=True)) if slowdowns else measured
        _, batch, size = label.partition(" b=")
        base = measured_by.get("ar" + batch + size)  # AR at the same batch size
        row = {"point": label, "measured_tokens_per_s": measured}
        for name, predicted in (("host_work", with_file[label]), ("profile_rows", with_rows[label])):
            row[f"{name}_tokens_per_s"] = round(predicted, 3)
            row[f"{name}_error"] = round(predicted / measured - 1, 4)
            row[f"{name}_error_now"] = round(predicted / now - 1, 4)
            if base is not None and r["method"] != "ar":
                measured_speedup = measured / base["executor_tokens_per_s"]
                predicted_speedup = predicted / (with_file if name == "host_work" else with_rows)[base["point"]]
                row[f"{name}_speedup_error"] = round(predicted_speedup / measured_speedup - 1, 4)
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--validate", type=Path, required=True, help="an `eesd validate --json` file")
    p.add_argument("--points", default="all", help="the --points the validate run took (default: all)")
    p.add_argument("--out", type=Path, default=None, help="write the comparison here (JSON)")
    args = p.parse_args()
    from sim.formats import check_benchmark_args, read_validate_json

    check_benchmark_args(args, inputs=("validate",))
    validate = read_validate_json(args.validate, "--validate")
    meta = validate["metadata"]
    scenario = ROOT / meta["scenario"]
    prompts, tokens = len(meta["prompts"]), meta["max_new_tokens"]
    with_file = predictions(scenario, args.points, prompts, tokens)
    copy = without_host_work(scenario)
    try:
        with_rows = predictions(copy, args.points, prompts, tokens)
    finally:
        copy.unlink(missing_ok=True)
    table = rows(validate, with_file, with_rows)
    print(f"{'point':<24} {'measured':>9} {'file':>8} {'rows':>8} {'err file':>9} {'err rows':>9} {'now file':>9} "
          f"{'now rows':>9} {'spd file':>9} {'spd rows':>9}")  # fmt: skip
    for r in table:
        speedups = [r.get(f"{n}_speedup_error") for n in ("host_work", "profile_rows")]
        text = " ".join(f"{s:>+9.1%}" if s is not None else f"{'-':>9}" for s in speedups)
        print(f"{r['point']:<24} {r['measured_tokens_per_s']:>9.2f} {r['host_work_tokens_per_s']:>8.2f} "
              f"{r['profile_rows_tokens_per_s']:>8.2f} {r['host_work_error']:>+9.1%} {r['profile_rows_error']:>+9.1%} "
              f"{r['host_work_error_now']:>+9.1%} {r['profile_rows_error_now']:>+9.1%} {text}")  # fmt: skip
    if args.out:
        columns = "host_work: latency.profile.host_work's figures; profile_rows: the profile's overhead rows"
        result = {"validate": str(args.validate), "points": args.points, "metadata": meta, "rows": table,
                  "columns": columns, "compared": {"date": datetime.datetime.now(datetime.UTC).isoformat(
                      timespec="seconds"), "python_version": platform.python_version()}}  # fmt: skip
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
