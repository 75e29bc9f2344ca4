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
    python benchmarks/sim_vs_gpu.py --predict issue24  # the rows gpu_session.sh issue24a/b measures
                                                       # (results/predictions_issue24_<date>.json)

`--predict` writes what the simulator predicts, from the files committed today, for configurations no lease has
measured, on either card: SmolLM2 through `eesd validate` (scenarios/smollm2_<card>_validate.yaml: eight prompts of
their own lengths replayed from the H100 bf16 trace, AR and EESD at batch 1 and 8, PPSD on one GPU at n = 2 and 4),
and the 7B shape through `benchmarks/gpu_decode.py` rows at new prompt lengths (512, 1024: AR, EESD E=16 fixed:3 at
forced alpha 0.5 / 0.7 / 0.9, PPSD streams n = 2 and 4 with random weights' alpha 0). Each row names the command that
measures it; the lease runs them unchanged and the comparison is out of sample.

`--predict issue24` does the same for the rows `benchmarks/gpu_session.sh issue24a` / `issue24b` measure (HF's
baselines beside ours, eight prompts a row, the memory floor): the 7B shape at contexts 32 and 3840 (our AR, its
step at context 32 in caches of 256 and 4096 slots and at 3840 in 4096, EESD at forced alpha, PPSD streams) and
SmolLM2 on the first eight built-in prompts x 128 new tokens (our AR, EESD shared E=15 fixed:3 and beta-ts, PPSD
streams n = 2; acceptance replayed from the H100 bf16 trace, which holds exits 8, 15 and 22), as today's executor
runs them (zero-draft rounds chained, 8 PPSD ticks per host read), each card in the capture mode of its profile.
HF's rows are not predicted (the simulator models this executor only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sim.contract import captured_capacity
from sim.formats import latency_profile_name, write_text_atomic
from sim.models import MODELS
from sim.policy import with_cost
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
    card: str, capture: str, kernels: str, zero_draft_rounds: str, ppsd_sync: int, contention: bool = False,
    benches: tuple[str, str] = ("smollm2", "llama7b"),
) -> tuple[Source, ...]:  # fmt: skip
    """SmolLM2 (real weights) and the 7B shape (4 of its layers profiled) of one card's lease, one capture mode;
    `contention`: SmolLM2's PPSD rows also with the card's contention profile; `benches`: the two JSON files'
    names (gpu_decode_nvidia_<card>_<name>.json)."""
    at = lambda name: ROOT / "calibration" / card / latency_profile_name(name, "cuda", "bf16", kernels)  # noqa: E731
    common = {"capture": capture, "zero_draft_rounds": zero_draft_rounds, "ppsd_sync_every": ppsd_sync}
    bench = lambda name: RESULTS / f"gpu_decode_nvidia_{card}_{name}.json"  # noqa: E731

    def measured(name: str) -> Path | None:  # the card's contention profile for the model, where one was measured
        path = ROOT / "calibration" / card / at(name).name.replace("latency_", "contention_")
        return path if contention and path.is_file() else None

    return (
        Source(
            bench(benches[0]), at("smollm2-135m"), "SmolLM2-135M", 47, **common, contention=measured("smollm2-135m")
        ),
        Source(
            bench(benches[1]), at("llama-2-7b-4layers"), "Llama-2-7B", 32, **common,
            contention=measured("llama-2-7b-4layers"),
        ),
    )  # fmt: skip


# that lease's executor ran zero-draft rounds as verify passes and read the device after every PPSD tick
H200 = _sources("h200", "graph", "eager", "verify", 1)
# the H100 lease that ran gpu_session.sh next1/next2: the default capture (compiled layers, zero-draft rounds of a
# shared head chained, PPSD ticks chained) with a compiled profile
H100 = _sources("h100", "compile-layers", "compiled", "chained", 8, contention=True)
# the H200's compiled rows (the third lease, 2026-12-04 14:22: issue 24's, compiled layers in CUDA graphs, span buckets)
# against the compiled profiles measured in the fourth (16:50 the same day): the rows were measured before the
# profiles and the simulator was not changed after either
H200_COMPILED = _sources(
    "h200", "compile-layers", "compiled", "chained", 8, contention=True,
    benches=("smollm2_issue24", "llama7b_ctx32_issue24"),
)  # fmt: skip
CARDS = {"h200": H200, "h100": H100, "h200-compiled": H200_COMPILED}
PREDICT_CARDS = ("h100", "h200")  # the cards predictions are written for (each its latency profiles and scenario)
EESD_LABEL = re.compile(r"eesd (?P<head>shared|trained) E=(?P<exit>\d+) (?P<policy>fixed:\d+|beta-ts)")
PPSD_LABEL = re.compile(r"ppsd streams n=(?P<stages>\d+)(?: trained E=(?P<exit>\d+))?$")


def method_of(label: str) -> str | None:
    if label in ("ours ar", "ours ar buckets off"):
        return "ar"
    return "eesd" if EESD_LABEL.match(label) else "ppsd" if PPSD_LABEL.match(label) else None


def scenario(
    source: Source, row: dict[str, Any], new_tokens: int, method: str, runs: int, contention: Path | None = None,
    acceptance: dict[str, Any] | None = None, policy_cost: float | None = None, attention: str = "cache",
) -> Point:  # fmt: skip
    """The simulator's twin of a gpu_decode row: Bernoulli(row alpha) acceptance unless `acceptance` is given; an
    EESD policy's cost pinned to `policy_cost` where given (the executor's E / L, as `generate` takes it); decode
    passes attending as `attention` says ("cache": the whole static cache, as an executor without span buckets, or
    with them off; "buckets": over span buckets)."""
    data: dict[str, Any] = {
        "name": f"{source.model} {row['method']}",
        "model": source.model,
        "dtype": "bf16",
        "method": method,
        "latency": {"profile": {"path": str(source.profile), "cuda_graphs": True}},
        "acceptance": acceptance or {"alpha": row.get("alpha") or 0.0},
        "topology": {"stages": 1, "link": "ideal"},  # the device: the profile's
        "workload": {"requests": runs, "batch_size": 1, "prompt_len": source.prompt_len, "output_len": new_tokens},
        "zero_draft_rounds": source.zero_draft_rounds,
        "attention": attention,
    }
    if method == "eesd":
        match = EESD_LABEL.match(row["method"])
        policy = match["policy"] if policy_cost is None else with_cost(match["policy"], policy_cost)
        data |= {"exit_layer": int(match["exit"]), "exit_head": match["head"], "policy": policy}
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


DRAW_SEEDS = 5  # simulator seeds a Thompson-sampling row's prediction takes the median over


def decode_rate(point: Point) -> tuple[float, bool]:
    """(tokens/s, extrapolated) of the simulator, decode only."""
    result = simulate_point(point).result
    return result.decode_tokens / (result.decode_time_us / 1e6), result.extrapolated


def median_rate(point: Point, seeds: int = DRAW_SEEDS) -> tuple[float, bool]:
    """`decode_rate` of a Thompson-sampling row, the median over `seeds` seeds of the simulator's draws: the executor
    drew one stream (its rounds' budgets, repeated in every run of one prompt at a time) that the simulator cannot
    replay (its policy seeds are derived differently since those leases), and at the low acceptance of the leases'
    rows the exploring rounds move the speedup by about 0.05 from one stream to the next."""
    rates = []
    for seed in range(seeds):
        scenario = point.scenario.model_copy(update={"seed": seed})
        rates.append(decode_rate(dataclasses.replace(point, scenario=scenario)))
    return statistics.median(rate for rate, _ in rates), any(extrapolated for _, extrapolated in rates)


def compare(source: Source, runs: int) -> list[dict[str, Any]]:
    bench = json.loads(source.bench.read_text())
    rows = [r for r in bench["rows"] if r.get("capture") == source.capture and r.get("decode_tokens_per_s")]
    ar = next(r for r in rows if r["method"] == "ours ar")
    attention = attention_of(rows)
    predicted_ar, _ = decode_rate(scenario(source, ar, bench["new_tokens"], "ar", runs, attention=attention("ours ar")))
    out = []
    for row in rows:
        method = method_of(row["method"])
        if method is None:
            continue
        cost = executor_cost(row, source) if method == "eesd" else None
        point = scenario(
            source, row, bench["new_tokens"], method, runs, policy_cost=cost, attention=attention(row["method"])
        )
        predicted, extrapolated = decode_rate(point) if cost is None else median_rate(point)
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
                point = scenario(
                    source, row, bench["new_tokens"], method, runs, source.contention,
                    attention=attention(row["method"]),
                )  # fmt: skip
                profiled, extrapolated = decode_rate(point)
                out.append(out[-1] | {"predicted_decode_tokens_per_s": profiled, "error": profiled / measured - 1,
                                      "predicted_speedup": profiled / predicted_ar, "extrapolated": extrapolated,
                                      "contention": str(source.contention.relative_to(ROOT))})  # fmt: skip
    return out


def executor_cost(row: dict[str, Any], source: Source) -> float | None:
    """The draft/verify cost ratio the executor's beta-ts drew with in a gpu_decode row: the row's `policy_cost`
    (recorded since generate estimates it from the weights each pass reads), else E / L, generate's default when
    the committed leases ran; None for a policy that takes no cost. Pinned, the simulator weighs drafts as the
    executor did."""
    match = EESD_LABEL.match(row["method"])
    if match is None or not match["policy"].startswith(("beta-ts", "calibration-ts")):
        return None
    if row.get("policy_cost") is not None:
        return float(row["policy_cost"])
    return int(match["exit"]) / MODELS[source.model].num_layers


def attention_of(rows: list[dict[str, Any]]) -> Any:
    """`label -> attention` for a gpu_decode JSON's rows: an executor with span buckets gives its AR an A/B twin
    ("ours ar buckets off"), so a JSON holding one measured bucketed passes (every row but the "buckets off" ones);
    one without was measured before span buckets existed: its passes attended over the whole static cache."""
    if any(r["method"] == "ours ar buckets off" for r in rows):
        return bucketed
    return lambda label: "cache"


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
    source = current(next(s for s in CARDS[card] if s.model == "Llama-2-7B"))
    configs = [("ours ar", "ar", None)]
    configs += [(f"eesd shared E=16 fixed:3 forced alpha={a}", "eesd", a) for a in FORCED_ALPHAS]
    configs += [(f"ppsd streams n={n}", "ppsd", 0.0) for n in PREDICT_STAGES]
    rows = []
    for prompt_len in PREDICT_PROMPT_LENS:
        at = dataclasses.replace(source, prompt_len=prompt_len)
        command = (f"python benchmarks/gpu_decode.py --models llama7b --prompt-len {prompt_len} "
                   f"--captures {source.capture}")  # fmt: skip
        for label, method, alpha in configs:
            contention = at.contention if method == "ppsd" else None
            point = scenario(at, {"method": label, "alpha": alpha}, 128, method, runs, contention)
            predicted, extrapolated = decode_rate(point)
            rows.append(
                {"card": card, "model": "Llama-2-7B shape (random weights)", "config": label, "batch": 1,
                 "prompts": f"{prompt_len} random token ids", "new_tokens": 128, "capture": source.capture,
                 "predicted_decode_tokens_per_s": round(predicted, 2), "extrapolated": extrapolated,
                 "measure": command}
            )  # fmt: skip
    return rows


def code_commit() -> dict[str, str | None]:
    """The commit the predictions come from (HEAD) and its commit date."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {
        "code_commit": git("rev-parse", "HEAD") or None,
        "code_commit_date": git("show", "-s", "--format=%cI") or None,
    }


def predictions(runs: int, cards: tuple[str, ...] = PREDICT_CARDS) -> dict[str, Any]:
    rows = [row for card in cards for row in predict_smollm2(card) + predict_llama7b(card, runs)]
    commit = code_commit()["code_commit"]
    return {
        "benchmark": "the simulator's predictions for the next GPU lease, committed before it measures them",
        "date": datetime.now(timezone.utc).date().isoformat(),
        "code_commit": commit or None,
        "cards": list(cards),
        "inputs": "the files committed at code_commit: the cards' latency profiles (calibration/h100, "
        "calibration/h200; `h200-compiled`: the H200's compiled ones) and contention profiles where measured, the "
        "H100 bf16 shared-head trace, the scenarios named in each row's command",
        "executor": "as committed at code_commit: zero-draft rounds chained, 8 PPSD ticks per host read (the 7B rows "
        "of the 2026-12-03 file assumed a host read every tick, the H200's first lease's executor)",
        "acceptance": "SmolLM2: the trace replayed (bf16 on a GPU does not replay exactly: near ties); the 7B "
        "shape: Bernoulli at gpu_decode's forced alpha (PPSD: 0, random weights)",
        "extrapolated": "a latency query left the profile's grid (the profiles hold batch 1 only; the H100 7B "
        "profile contexts 32 and 256)",
        "rows": rows,
    }


# ---- issue 24: the rows gpu_session.sh issue24a / issue24b measure -------------------------------------------------
ISSUE24_PROMPTS, ISSUE24_TOKENS = 8, 128  # gpu_decode's --prompts and --new-tokens
ISSUE24_CONTEXTS = (32, 3840)  # the 7B shape's --prompt-len: a short context and a ~4k one
ISSUE24_LONG = 4096  # gpu_decode's LONG_CAPACITY: the step rows' long cache
# gpu_decode's --only per call: our AR (and its span-bucket twin, where the executor has one), HF's rows, the step
# rows, EESD at forced alpha and PPSD streams n = 2 / 4 (the 7B shape); EESD shared E=15 and PPSD n = 2 (SmolLM2)
ISSUE24_ONLY = {
    32: "^ours ar( buckets off)?$|^ours ar step|^hf generate|forced alpha|^ppsd streams n=[24]$",
    3840: "^ours ar( buckets off)?$|^ours ar step|^hf generate|forced alpha=0.7$|^ppsd streams n=2$",
    "smollm2": "^ours ar( buckets off)?$|^hf generate|^eesd shared E=15 (fixed:3|beta-ts)$|^ppsd streams n=2$",
}
ISSUE24_ALPHAS = {32: FORCED_ALPHAS, 3840: (0.7,)}
ISSUE24_STAGES = {32: PREDICT_STAGES, 3840: (2,)}
STEP_LAUNCHES = 20  # gpu_decode's step rows: chained launches at positions context .. context + 19 (its REPEATS)


def issue24_command(card: str, model: str) -> str:
    """The gpu_decode command gpu_session.sh runs for these rows (its --out and --time-budget-s aside)."""
    capture = next(s for s in CARDS[card] if s.model == "Llama-2-7B").capture
    if model == "smollm2":
        return (f"python3 benchmarks/gpu_decode.py --models smollm2 --model-path SMOLLM2 --captures {capture} "
                f"--prompts {ISSUE24_PROMPTS} --match-dtypes '' --only '{ISSUE24_ONLY['smollm2']}'")  # fmt: skip
    return (f"python3 benchmarks/gpu_decode.py --models llama7b --prompt-len {model} --captures {capture} "
            f"--prompts {ISSUE24_PROMPTS} --only '{ISSUE24_ONLY[int(model)]}'")  # fmt: skip


def current(source: Source) -> Source:
    """The source as today's executor runs it: zero-draft rounds chained (trained heads too), 8 PPSD ticks per host
    read."""
    return dataclasses.replace(
        source, zero_draft_rounds="chained", trained_zero_draft_rounds="chained", ppsd_sync_every=8
    )


def issue24_row(
    card: str, source: Source, config: str, context: int, point: Point, command: str, note: str = ""
) -> dict:
    predicted, extrapolated = decode_rate(point)
    row = {"card": card, "model": source.model, "config": config, "batch": 1, "context": context,
           "capture": source.capture, "predicted_decode_tokens_per_s": round(predicted, 2),
           "extrapolated": extrapolated, "measure": command}  # fmt: skip
    return row | ({"note": note} if note else {})


def issue24_llama7b(card: str, runs: int) -> list[dict[str, Any]]:
    """The 7B shape's rows at prompts of 32 and 3840 random ids: our AR, its steps, EESD at forced alpha, PPSD."""
    source = current(next(s for s in CARDS[card] if s.model == "Llama-2-7B"))
    rows = []
    for prompt_len in ISSUE24_CONTEXTS:
        at, command = dataclasses.replace(source, prompt_len=prompt_len), issue24_command(card, str(prompt_len))
        configs = [("ours ar", "ar", None), ("ours ar buckets off", "ar", None)]
        configs += [(f"eesd shared E=16 fixed:3 forced alpha={a}", "eesd", a) for a in ISSUE24_ALPHAS[prompt_len]]
        configs += [(f"ppsd streams n={n}", "ppsd", 0.0) for n in ISSUE24_STAGES[prompt_len]]
        for label, method, alpha in configs:
            point = scenario(at, {"method": label, "alpha": alpha}, ISSUE24_TOKENS, method, runs,
                             attention=bucketed(label))  # fmt: skip
            rows.append(issue24_row(card, source, label, prompt_len, point, command))
        for capacity in sorted({captured_capacity(prompt_len + ISSUE24_TOKENS + 1), ISSUE24_LONG}):
            for suffix in ("", " buckets off"):
                label = f"ours ar step ctx={prompt_len} cache={capacity}{suffix}"
                # buckets off: a decode filling a cache of that capacity (every pass costs the whole capacity);
                # bucketed: the row's own launches, whose bucket the capacity only caps
                tokens = STEP_LAUNCHES if not suffix else capacity - prompt_len - 1
                point = scenario(at, {"method": label}, tokens, "ar", 1, attention=bucketed(label))
                note = ("the simulator's AR decode of the row's positions (bucketed) or filling a cache of this "
                        "capacity (buckets off), host reads included; the row times chained steps at the prompt's "
                        "context without host reads")  # fmt: skip
                rows.append(issue24_row(card, source, label, prompt_len, point, command, note))
    return rows


def bucketed(label: str) -> str:
    """The attention of a row the lease measures: its executor attends over span buckets, but in its A/B twins
    (" buckets off")."""
    return "cache" if label.endswith(" buckets off") else "buckets"


def issue24_smollm2(card: str) -> list[dict[str, Any]]:
    """SmolLM2 on the first eight built-in prompts x 128 tokens, acceptance replayed from the H100 bf16 trace."""
    source = current(next(s for s in CARDS[card] if s.model == "SmolLM2-135M"))
    trace = ROOT / "calibration" / "h100" / "acceptance_smollm2-135m_shared_builtin_cuda_bf16.csv"
    acceptance = {"trace": str(trace), "reuse": "cycle"}  # 8 x 128 tokens run past a prompt's 48 into the next
    layers, exit_layer = 30, 15
    contention = ROOT / "calibration" / card / "contention_smollm2-135m_cuda_bf16_compiled.csv"
    command = issue24_command(card, "smollm2")
    configs = [("ours ar", "ar"), ("ours ar buckets off", "ar"), (f"eesd shared E={exit_layer} fixed:3", "eesd")]
    configs += [(f"eesd shared E={exit_layer} beta-ts", "eesd")]
    configs += [("ppsd streams n=2", "ppsd")]  # exit 15; n = 4 exits at 7 (7+7+8+8), a layer the trace lacks
    rows = []
    for label, method in configs:
        point = scenario(
            source, {"method": label}, ISSUE24_TOKENS, method, ISSUE24_PROMPTS,
            contention if contention.is_file() and method == "ppsd" else None,
            None if method == "ar" else acceptance, exit_layer / layers,  # AR drafts nothing: no trace to check
            attention=bucketed(label),
        )  # fmt: skip
        rows.append(issue24_row(card, source, label, source.prompt_len, point, command))
    return rows


def issue24_predictions(runs: int) -> dict[str, Any]:
    rows = [row for card in PREDICT_CARDS for row in issue24_llama7b(card, runs) + issue24_smollm2(card)]
    return {
        "benchmark": "the simulator's predictions for the rows gpu_session.sh issue24a/issue24b measures (issue 24), "
        "committed before the lease measures them",
        "date": datetime.now(timezone.utc).date().isoformat(),
        **code_commit(),
        "command": f"python benchmarks/sim_vs_gpu.py --predict issue24 --runs {runs}",
        "inputs": "the files committed at code_commit: calibration/h100 and calibration/h200 latency profiles, the "
        "H100 SmolLM2 contention profile, the H100 bf16 shared-head trace",
        "executor": "as committed at code_commit: zero-draft rounds chained, 8 PPSD ticks per host read; each card in "
        "its profile's capture mode (h100: compile-layers, compiled profile; h200: graph, eager profile)",
        "span_buckets": "the lease's executor attends over span buckets (executor.passes.SPAN_BUCKETS); its AR rows "
        "and AR step rows have A/B twins with them off (' buckets off'). The simulator predicts each row as it runs: "
        "bucketed rows with attention: buckets (a pass costed at the span bucket of the furthest position it "
        "writes), the ' buckets off' rows with attention: cache (at the whole capacity). This file replaces the "
        "one committed at b04d9a8 (same date), whose simulator knew no span buckets and predicted every row at the "
        "whole capacity",
        "acceptance": "SmolLM2: the H100 bf16 trace replayed (cycled: 8 x 128 tokens, 48 per prompt), beta-ts at the "
        "executor's cost E / L = 0.5; the 7B shape: Bernoulli at the forced alpha (PPSD: 0, random weights)",
        "extrapolated": "a latency query left the profile's grid (H100 7B profile: contexts 32 and 256; H200 7B: 128 "
        "to 2048)",
        "not_predicted": "HF's rows (the simulator models this executor only); the tokens/s spread over prompts",
        "measured_as": "decode tokens/s (the median over prompts x runs) of the row of the same config in the JSON "
        "the measure command writes",
        "rows": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="simulated requests per row (Bernoulli draws)")
    parser.add_argument("--card", choices=sorted(CARDS), default="h200", help="whose lease's files (default: h200)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/sim_vs_gpu_nvidia_<card>.json")
    parser.add_argument(
        "--cards", default=",".join(PREDICT_CARDS),
        help=f"--predict next_lease: whose rows (default {','.join(PREDICT_CARDS)}; also h200-compiled)",
    )  # fmt: skip
    parser.add_argument(
        "--predict", nargs="?", const="next_lease", choices=("next_lease", "issue24"), default=None,
        help="predictions for the next lease (both cards); 'issue24': for gpu_session.sh issue24a/issue24b",
    )  # fmt: skip
    args = parser.parse_args()
    from sim.formats import check_benchmark_args

    check_benchmark_args(args, counts=("runs",))
    if args.predict:
        cards = tuple(args.cards.split(","))
        unknown = sorted(set(cards) - set(CARDS))
        if unknown:
            parser.error(f"--cards: unknown {', '.join(unknown)} (known: {', '.join(sorted(CARDS))})")
        document = predictions(args.runs, cards) if args.predict == "next_lease" else issue24_predictions(args.runs)
        out = args.out or RESULTS / f"predictions_{args.predict}_{document['date']}.json"
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
        "python": platform.python_version(),
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
    from sim.formats import run_script

    raise SystemExit(run_script(main))
