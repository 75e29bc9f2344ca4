"""Benchmark (not a test): the simulator's decode tokens/s against what the executor measured on a GPU, offline.

`eesd validate` runs the executor and the simulator side by side on one machine; a GPU lease is short, so this script
compares afterwards: it reads `benchmarks/gpu_decode.py`'s JSON (the captured-graph rows), builds one scenario per
row from the latency profile `eesd calibrate latency` measured on the same card in the same lease, with the
acceptance the row measured (per position, as `alpha` in the JSON) replayed as Bernoulli(alpha) draws, and runs the
simulator. Torch-free; the simulator is fed nothing from the timed rows but their alpha.

- AR: the simulator's AR over the profile vs our AR (`capture` graph), decode tokens/s.
- EESD: each fixed:k / beta-ts row, shared or trained head; its predicted speedup over AR vs the measured one.
- PPSD: each `streams` row as a pipeline of n stages with ideal links. Not like for like: the executor's stages
  share one GPU (one CUDA stream each), the simulator gives each its own device, so it over-predicts as n grows.

    python benchmarks/sim_vs_gpu.py          # the H200 files; writes benchmarks/results/sim_vs_gpu_nvidia_h200.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sim.runner import simulate_point
from sim.scenario import Point, validate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Source:
    """One benchmarked model: its rows' JSON, the profile of the same card, the simulator's model name."""

    bench: Path
    profile: Path
    model: str
    prompt_len: int  # the timed prompt's length (SmolLM2: builtin/chat-01 = 47 tokens; 7B shape: 32 random ids)
    zero_draft_rounds: str = "verify"  # how the measured executor ran EESD rounds of k = 0 (the H200 lease: "verify")


H200 = (
    Source(
        RESULTS / "gpu_decode_nvidia_h200_smollm2.json",
        ROOT / "calibration" / "h200" / "latency_smollm2-135m_cuda_bf16.csv",
        "SmolLM2-135M",
        47,
    ),
    Source(
        RESULTS / "gpu_decode_nvidia_h200_llama7b.json",
        ROOT / "calibration" / "h200" / "latency_llama-2-7b-4layers_cuda_bf16.csv",
        "Llama-2-7B",
        32,
    ),
)
EESD_LABEL = re.compile(r"eesd (?P<head>shared|trained) E=(?P<exit>\d+) (?P<policy>fixed:\d+|beta-ts)")
PPSD_LABEL = re.compile(r"ppsd streams n=(?P<stages>\d+)(?: trained E=(?P<exit>\d+))?$")


def method_of(label: str) -> str | None:
    if label == "ours ar":
        return "ar"
    return "eesd" if EESD_LABEL.match(label) else "ppsd" if PPSD_LABEL.match(label) else None


def scenario(source: Source, row: dict[str, Any], new_tokens: int, method: str, runs: int) -> Point:
    data: dict[str, Any] = {
        "name": f"{source.model} {row['method']}",
        "model": source.model,
        "dtype": "bf16",
        "method": method,
        "latency": {"profile": {"path": str(source.profile), "cuda_graphs": True}},
        "acceptance": {"alpha": row.get("alpha") or 0.0},
        "topology": {"gpu": "H200", "stages": 1, "link": "ideal"},
        "workload": {"requests": runs, "batch_size": 1, "prompt_len": source.prompt_len, "output_len": new_tokens},
        "zero_draft_rounds": source.zero_draft_rounds,
    }
    if method == "eesd":
        match = EESD_LABEL.match(row["method"])
        data |= {"exit_layer": int(match["exit"]), "exit_head": match["head"], "policy": match["policy"]}
    if method == "ppsd":
        match = PPSD_LABEL.match(row["method"])
        data["topology"]["stages"] = int(match["stages"])
        if match["exit"]:
            data |= {"exit_layer": int(match["exit"]), "exit_head": "trained"}
    return Point(0, {}, validate(data, f"{source.bench}: row {row['method']!r}"), ROOT, str(source.bench))


def decode_rate(point: Point) -> tuple[float, float, bool]:
    """(method tokens/s, AR tokens/s, extrapolated) of the simulator, decode only."""
    item = simulate_point(point)
    rate = lambda r: r.decode_tokens / (r.decode_time_us / 1e6)  # noqa: E731
    return rate(item.result), rate(item.baseline), item.result.extrapolated or item.baseline.extrapolated


def compare(source: Source, runs: int) -> list[dict[str, Any]]:
    bench = json.loads(source.bench.read_text())
    rows = [r for r in bench["rows"] if r.get("capture") == "graph" and r.get("decode_tokens_per_s")]
    ar = next(r for r in rows if r["method"] == "ours ar")
    out = []
    for row in rows:
        method = method_of(row["method"])
        if method is None:
            continue
        predicted, predicted_ar, extrapolated = decode_rate(scenario(source, row, bench["new_tokens"], method, runs))
        measured = row["decode_tokens_per_s"]
        out.append(
            {"model": source.model, "method": row["method"], "kind": method, "alpha": row.get("alpha"),
             "measured_decode_tokens_per_s": measured, "predicted_decode_tokens_per_s": predicted,
             "error": predicted / measured - 1, "measured_speedup": measured / ar["decode_tokens_per_s"],
             "predicted_speedup": predicted / predicted_ar, "extrapolated": extrapolated}
        )  # fmt: skip
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | alpha | measured tok/s | predicted tok/s | error | measured speedup | predicted speedup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:.3f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {alpha} | {r['measured_decode_tokens_per_s']:.1f} | "
            f"{r['predicted_decode_tokens_per_s']:.1f} | {100 * r['error']:+.1f}% | {r['measured_speedup']:.2f} | "
            f"{r['predicted_speedup']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="simulated requests per row (Bernoulli draws)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sim_vs_gpu_nvidia_h200.json")
    args = parser.parse_args()
    rows = [row for source in H200 for row in compare(source, args.runs)]
    print(table(rows))
    for label, kinds in (("AR and EESD", {"ar", "eesd"}), ("PPSD (one GPU vs separate devices)", {"ppsd"})):
        errors = [abs(r["error"]) for r in rows if r["kind"] in kinds]
        print(f"{label}: mean |error| {100 * statistics.fmean(errors):.1f}%, max {100 * max(errors):.1f}%")
    document = {
        "benchmark": "simulator vs executor, offline, from one GPU lease's files",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": json.loads(H200[0].bench.read_text())["device"],
        "inputs": [
            {"bench": str(s.bench.relative_to(ROOT)), "profile": str(s.profile.relative_to(ROOT))} for s in H200
        ],
        "acceptance": "each row's measured per-position alpha, replayed as Bernoulli(alpha)",
        "rows": rows,
    }
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    partial.replace(args.out)  # atomic: never half a file
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
