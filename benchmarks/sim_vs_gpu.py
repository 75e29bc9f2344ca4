"""Benchmark (not a test): the simulator's decode tokens/s against what the executor measured on a GPU, offline.

`eesd validate` runs the executor and the simulator side by side on one machine; a GPU lease is short, so this script
compares afterwards: it reads `benchmarks/gpu_decode.py`'s JSON (the captured-graph rows), builds one scenario per
row from the latency profile `eesd calibrate latency` measured on the same card in the same lease, with the
acceptance the row measured (per position, as `alpha` in the JSON) replayed as Bernoulli(alpha) draws, and runs the
simulator. Torch-free; the simulator is fed nothing from the timed rows but their alpha.

- AR: the simulator's AR over the profile vs our AR (`capture` graph), decode tokens/s.
- EESD: each fixed:k / beta-ts row, shared or trained head; its predicted speedup over AR vs the measured one.
- PPSD: each `streams` row as the executor ran it: n stages on one GPU (`ppsd_backend: streams`), a tick's passes
  sharing it. Twice: with the fallback from the GPU's spec (sim/contention.py: the passes' HBM reads add up, their
  launch-bound rest overlaps), and, where the card has one, with a contention profile
  (`calibration/<card>/contention_*.csv`, measured in another lease: see docs/simulator.md).

Rows are compared with a profile of the layers as their `capture` ran them: `graph` rows with an eager profile
(`latency_<model>_cuda_bf16.csv`), `compile-layers` rows with a compiled one (`..._compiled.csv`, `eesd calibrate
latency --kernels compiled`: fused projections, compiled layer).

    python benchmarks/sim_vs_gpu.py              # the H200 lease; writes results/sim_vs_gpu_nvidia_h200.json
    python benchmarks/sim_vs_gpu.py --card h100  # the H100 lease's files (benchmarks/gpu_session.sh next1, next2)
    python benchmarks/sim_vs_gpu.py --predict    # predictions for the next lease, committed before it measures them
                                                 # (results/predictions_next_lease_<date>.json)

`--predict` writes what the simulator predicts, from the files committed today, for configurations no lease has
measured, on either card: SmolLM2 through `eesd validate` (scenarios/smollm2_<card>_validate.yaml: eight prompts of
their own lengths replayed from the H100 bf16 trace, AR and EESD at batch 1 and 8, PPSD on one GPU at n = 2 and 4),
and the 7B shape through `benchmarks/gpu_decode.py` rows at new prompt lengths (512, 1024: AR, EESD E=16 fixed:3 at
forced alpha 0.5 / 0.7 / 0.9, PPSD streams n = 2 and 4 with random weights' alpha 0). Each row names the command that
measures it; the lease runs them unchanged and the comparison is out of sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sim.formats import latency_profile_name, write_text_atomic
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
    ppsd_sync_every: int = 8  # PPSD ticks per host read of the measured executor (the H200 lease: 1, every tick)
    trained_zero_draft_rounds: str = "verify"  # a trained head's k = 0 rounds (both leases: before they chained)
    capture: str = "graph"  # the rows compared: those the executor ran with this capture mode
    contention: Path | None = None  # a contention profile of the card (PPSD streams), where one was measured

    def missing(self) -> list[Path]:
        return [path for path in (self.bench, self.profile, self.contention) if path and not path.is_file()]


def _sources(
    card: str, capture: str, kernels: str, zero_draft_rounds: str, ppsd_sync: int, contention: bool = False
) -> tuple[Source, ...]:
    """SmolLM2 (real weights) and the 7B shape (4 of its layers profiled) of one card's lease, one capture mode;
    `contention`: SmolLM2's PPSD rows also with the card's contention profile."""
    at = lambda name: ROOT / "calibration" / card / latency_profile_name(name, "cuda", "bf16", kernels)  # noqa: E731
    common = {"capture": capture, "zero_draft_rounds": zero_draft_rounds, "ppsd_sync_every": ppsd_sync}
    bench = lambda name: RESULTS / f"gpu_decode_nvidia_{card}_{name}.json"  # noqa: E731
    measured = ROOT / "calibration" / card / at("smollm2-135m").name.replace("latency_", "contention_")
    return (
        Source(
            bench("smollm2"),
            at("smollm2-135m"),
            "SmolLM2-135M",
            47,
            **common,
            contention=measured if contention else None,
        ),
        Source(bench("llama7b"), at("llama-2-7b-4layers"), "Llama-2-7B", 32, **common),
    )


# that lease's executor ran zero-draft rounds as verify passes and read the device after every PPSD tick
H200 = _sources("h200", "graph", "eager", "verify", 1)
# the H100 lease that ran gpu_session.sh next1/next2: the default capture (compiled layers, zero-draft rounds of a
# shared head chained, PPSD ticks chained) with a compiled profile
H100 = _sources("h100", "compile-layers", "compiled", "chained", 8, contention=True)
CARDS = {"h200": H200, "h100": H100}
EESD_LABEL = re.compile(r"eesd (?P<head>shared|trained) E=(?P<exit>\d+) (?P<policy>fixed:\d+|beta-ts)")
PPSD_LABEL = re.compile(r"ppsd streams n=(?P<stages>\d+)(?: trained E=(?P<exit>\d+))?$")


def method_of(label: str) -> str | None:
    if label == "ours ar":
        return "ar"
    return "eesd" if EESD_LABEL.match(label) else "ppsd" if PPSD_LABEL.match(label) else None


def scenario(
    source: Source, row: dict[str, Any], new_tokens: int, method: str, runs: int, contention: Path | None = None
) -> Point:
    data: dict[str, Any] = {
        "name": f"{source.model} {row['method']}",
        "model": source.model,
        "dtype": "bf16",
        "method": method,
        "latency": {"profile": {"path": str(source.profile), "cuda_graphs": True}},
        "acceptance": {"alpha": row.get("alpha") or 0.0},
        "topology": {"stages": 1, "link": "ideal"},  # the device: the profile's
        "workload": {"requests": runs, "batch_size": 1, "prompt_len": source.prompt_len, "output_len": new_tokens},
        "zero_draft_rounds": source.zero_draft_rounds,
    }
    if method == "eesd":
        match = EESD_LABEL.match(row["method"])
        data |= {"exit_layer": int(match["exit"]), "exit_head": match["head"], "policy": match["policy"]}
        if match["head"] == "trained":
            data["zero_draft_rounds"] = source.trained_zero_draft_rounds
    if method == "ppsd":
        match = PPSD_LABEL.match(row["method"])
        data["topology"]["stages"] = int(match["stages"])  # one GPU: a one-host backend's default
        data |= {"sync_every": source.ppsd_sync_every, "ppsd_backend": "streams"}
        if contention is not None:
            data["topology"]["contention"] = str(contention)
        if match["exit"]:
            data |= {"exit_layer": int(match["exit"]), "exit_head": "trained"}
    return Point(0, {}, validate(data, f"{source.bench}: row {row['method']!r}"), ROOT, str(source.bench))


def decode_rate(point: Point) -> tuple[float, bool]:
    """(tokens/s, extrapolated) of the simulator, decode only."""
    result = simulate_point(point).result
    return result.decode_tokens / (result.decode_time_us / 1e6), result.extrapolated


def compare(source: Source, runs: int) -> list[dict[str, Any]]:
    bench = json.loads(source.bench.read_text())
    rows = [r for r in bench["rows"] if r.get("capture") == source.capture and r.get("decode_tokens_per_s")]
    ar = next(r for r in rows if r["method"] == "ours ar")
    predicted_ar, _ = decode_rate(scenario(source, ar, bench["new_tokens"], "ar", runs))  # the measured AR's twin
    out = []
    for row in rows:
        method = method_of(row["method"])
        if method is None:
            continue
        predicted, extrapolated = decode_rate(scenario(source, row, bench["new_tokens"], method, runs))
        measured = row["decode_tokens_per_s"]
        out.append(
            {"model": source.model, "method": row["method"], "kind": method, "alpha": row.get("alpha"),
             "measured_decode_tokens_per_s": measured, "predicted_decode_tokens_per_s": predicted,
             "error": predicted / measured - 1, "measured_speedup": measured / ar["decode_tokens_per_s"],
             "predicted_speedup": predicted / predicted_ar, "extrapolated": extrapolated}
        )  # fmt: skip
        if method == "ppsd":
            out[-1]["contention"] = "shared bandwidth (fallback from the GPU's spec)"
            if source.contention is not None:
                point = scenario(source, row, bench["new_tokens"], method, runs, source.contention)
                profiled, extrapolated = decode_rate(point)
                out.append(out[-1] | {"predicted_decode_tokens_per_s": profiled, "error": profiled / measured - 1,
                                      "predicted_speedup": profiled / predicted_ar, "extrapolated": extrapolated,
                                      "contention": str(source.contention.relative_to(ROOT))})  # fmt: skip
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | alpha | measured tok/s | predicted tok/s | error | measured speedup | predicted speedup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:.3f}"
        method = r["method"] + (" (contention profile)" if r.get("contention", "").endswith(".csv") else "")
        lines.append(
            f"| {r['model']} | {method} | {alpha} | {r['measured_decode_tokens_per_s']:.1f} | "
            f"{r['predicted_decode_tokens_per_s']:.1f} | {100 * r['error']:+.1f}% | {r['measured_speedup']:.2f} | "
            f"{r['predicted_speedup']:.2f} |"
        )
    return "\n".join(lines)


# ---- predictions for the next lease ------------------------------------------------------------------------------
PREDICT_PROMPTS, PREDICT_TOKENS = 8, 48  # SmolLM2: the trace's first eight prompts, its max_new_tokens
PREDICT_PROMPT_LENS = (512, 1024)  # the 7B shape: prompt lengths no lease measured (it timed 32 and 3840)
FORCED_ALPHAS = (0.5, 0.7, 0.9)  # gpu_decode's forced acceptance of the 7B shape's EESD rows
PREDICT_STAGES = (2, 4)


def predict_smollm2(card: str) -> list[dict[str, Any]]:
    """SmolLM2 through `eesd validate`'s targets (torch-free: the simulator's side of the comparison)."""
    from calibrate import validate as validate_mod
    from sim.scenario import load_points

    path = ROOT / "scenarios" / f"smollm2_{card}_validate.yaml"
    update = {"requests": PREDICT_PROMPTS, "output_len": PREDICT_TOKENS}
    chosen = [validate_mod.with_workload(p, update) for p in load_points(path)]
    relative = path.relative_to(ROOT)
    command = (f"eesd validate {relative} --prompts {PREDICT_PROMPTS} --max-new-tokens {PREDICT_TOKENS} --repeats 3 "
               "--model SMOLLM2  (the lease's copy of the model the H100 files were measured with)")  # fmt: skip
    rows = []
    for target in validate_mod.targets(chosen):
        predicted, extrapolated = validate_mod.predict(target)
        rows.append(
            {"card": card, "model": "SmolLM2-135M", "config": target.label, "batch": target.batch_size,
             "prompts": f"{PREDICT_PROMPTS} built-in prompts (trace replay)", "new_tokens": PREDICT_TOKENS,
             "predicted_decode_tokens_per_s": round(predicted.tokens_per_s, 2),
             "predicted_tokens_per_round": round(predicted.tokens_per_round, 4),
             "per": "tick" if target.method == "ppsd" else "round", "extrapolated": extrapolated,
             "measure": command}
        )  # fmt: skip
    return rows


def predict_llama7b(card: str, runs: int) -> list[dict[str, Any]]:
    """The 7B shape as `benchmarks/gpu_decode.py --models llama7b --prompt-len N` times it (random weights)."""
    source = next(s for s in CARDS[card] if s.model == "Llama-2-7B")
    configs = [("ours ar", "ar", None)]
    configs += [(f"eesd shared E=16 fixed:3 forced alpha={a}", "eesd", a) for a in FORCED_ALPHAS]
    configs += [(f"ppsd streams n={n}", "ppsd", 0.0) for n in PREDICT_STAGES]
    rows = []
    for prompt_len in PREDICT_PROMPT_LENS:
        at = dataclasses.replace(source, prompt_len=prompt_len)
        command = (f"python benchmarks/gpu_decode.py --models llama7b --prompt-len {prompt_len} "
                   f"--captures {source.capture}")  # fmt: skip
        for label, method, alpha in configs:
            predicted, extrapolated = decode_rate(scenario(at, {"method": label, "alpha": alpha}, 128, method, runs))
            rows.append(
                {"card": card, "model": "Llama-2-7B shape (random weights)", "config": label, "batch": 1,
                 "prompts": f"{prompt_len} random token ids", "new_tokens": 128, "capture": source.capture,
                 "predicted_decode_tokens_per_s": round(predicted, 2), "extrapolated": extrapolated,
                 "measure": command + ("  (needs 7B PPSD streams cases in gpu_decode.py)" if method == "ppsd" else "")}
            )  # fmt: skip
    return rows


def predictions(runs: int) -> dict[str, Any]:
    rows = [row for card in sorted(CARDS) for row in predict_smollm2(card) + predict_llama7b(card, runs)]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "benchmark": "the simulator's predictions for the next GPU lease, committed before it measures them",
        "date": datetime.now(timezone.utc).date().isoformat(),
        "code_commit": commit or None,
        "inputs": "the files committed at code_commit: calibration/h100 and calibration/h200 profiles, the H100 "
        "contention profile, the H100 bf16 shared-head trace, the scenarios named in each row's command",
        "acceptance": "SmolLM2: the trace replayed (bf16 on a GPU does not replay exactly: near ties); the 7B "
        "shape: Bernoulli at gpu_decode's forced alpha (PPSD: 0, random weights)",
        "extrapolated": "a latency query left the profile's grid (the profiles hold batch 1 only; the H100 7B "
        "profile contexts 32 and 256)",
        "rows": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="simulated requests per row (Bernoulli draws)")
    parser.add_argument("--card", choices=sorted(CARDS), default="h200", help="whose lease's files (default: h200)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/sim_vs_gpu_nvidia_<card>.json")
    parser.add_argument("--predict", action="store_true", help="predictions for the next lease (both cards)")
    args = parser.parse_args()
    if args.predict:
        document = predictions(args.runs)
        out = args.out or RESULTS / f"predictions_next_lease_{document['date']}.json"
        write_text_atomic(out, json.dumps(document, indent=2) + "\n")
        for row in document["rows"]:
            flag = "  *" if row["extrapolated"] else ""
            print(f"{row['card']}  {row['model'][:12]:12}  {row['config']:42} b={row['batch']}  "
                  f"{row['predicted_decode_tokens_per_s']:8.2f} tok/s{flag}")  # fmt: skip
        print(f"wrote {out}")
        return 0
    sources = CARDS[args.card]
    missing = [path for source in sources for path in source.missing()]
    if missing:
        print(f"sim_vs_gpu: missing {', '.join(str(p.relative_to(ROOT)) for p in dict.fromkeys(missing))}; "
              f"measure them on the card (benchmarks/gpu_session.sh) first", file=sys.stderr)  # fmt: skip
        return 2
    out = args.out or RESULTS / f"sim_vs_gpu_nvidia_{args.card}.json"
    rows = [row | {"capture": source.capture} for source in sources for row in compare(source, args.runs)]
    print(table(rows))
    groups = (
        ("AR and EESD", lambda r: r["kind"] != "ppsd"),
        ("PPSD streams, contention from the GPU's spec", lambda r: r.get("contention", "").startswith("shared")),
        ("PPSD streams, contention profile", lambda r: r.get("contention", "").endswith(".csv")),
    )
    for label, chosen in groups:
        errors = [abs(r["error"]) for r in rows if chosen(r)]
        if errors:
            print(f"{label}: mean |error| {100 * statistics.fmean(errors):.1f}%, max {100 * max(errors):.1f}%")
    document = {
        "benchmark": "simulator vs executor, offline, from one GPU lease's files",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": json.loads(sources[0].bench.read_text())["device"],
        "inputs": [
            {"bench": str(s.bench.relative_to(ROOT)), "profile": str(s.profile.relative_to(ROOT)), "capture": s.capture}
            for s in sources
        ],
        "acceptance": "each row's measured per-position alpha, replayed as Bernoulli(alpha)",
        "rows": rows,
    }
    write_text_atomic(out, json.dumps(document, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
