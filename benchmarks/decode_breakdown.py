"""Benchmark (not a test): where a real decode's time goes on the CPU, pass by pass, against a latency profile's price.

The simulator prices an EESD round as its passes (k draft steps, one verify pass) from a profile's components and
nothing else between them. This runs real greedy decodes (`executor.generate`, uncaptured: on the CPU every pass
is synchronous, so a pass's wall time is its compute) of the builtin prompts, AR and EESD interleaved, times every
pass where it runs (`Passes.ar`, `.draft`, `.verify`, `.ar_head`), and splits each decode's wall time into prefill,
passes and the host's work between them (budgets, policy draws and updates, the cache's claims and rollbacks, the
verdict's read-back and commits). Each pass kind is set beside what the profile prices it at, at the context it ran
at, both relative to the AR step of the same decodes (a box running faster or slower than when it was profiled
cancels out):

    python benchmarks/decode_breakdown.py --profile calibration/cpu/latency_smollm2-135m_cpu_fp32.csv \\
        --exit-layer 15 --policy fixed:1 --prompts 6 --max-new-tokens 48 \\
        --out benchmarks/results/decode_breakdown_smollm2-135m_e15_fixed1_cpu.json

Prints a table and writes JSON with the machine, versions, date and command. On a GPU (`--device cuda`, with
`--dtype bfloat16 --capture graph` or `compile-layers` and a GPU profile) the host queues passes ahead of the device,
so each timed pass is bracketed by device synchronisations: a pass's time is then its launch and device time, and
the host's work between passes is what the device waits for when the host reads after every round, as a serving loop
does (run AR with `--sync-every 1` for that; the simulator prices either from the profile's one `overhead` row):

    python benchmarks/decode_breakdown.py --profile calibration/h200/latency_smollm2-135m_cuda_bf16.csv \
        --device cuda --dtype bfloat16 --capture graph --sync-every 1 --prompts 4 --out OUT.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from head_speed import environment, write_json  # noqa: E402

from calibrate.host import PassClock, by_method_snippet, host_rows, is_captured  # noqa: E402
from calibrate.host import decode as host_decode  # noqa: E402


def pricer(
    profile: Path, model: str, exit_layer: int, prompt_len: int = 16, output_len: int = 16, gpu: bool = False
) -> Callable[[str, int, int], float]:
    """price(kind, slots, context) in ms, as the simulator costs the pass (`sim.cost`, without the host's
    `overhead`), the shared exit head, at the context the engine looks it up at (a verify pass of k drafts: the
    round's start + k), in a cache sized for a request of `prompt_len` + `output_len` tokens as the scenario's (the
    executor's static cache); `gpu`: a bf16 profile of captured passes."""
    from sim.cost import Pass, draft_pass, stage_time_us, verify_pass
    from sim.plan import build_plan
    from sim.scenario import Point, validate

    data = {
        "name": "decode-breakdown", "model": model, "dtype": "bf16" if gpu else "fp32", "method": "eesd",
        "exit_layer": exit_layer, "exit_head": "shared", "policy": "fixed:1", "latency": {"profile": {"path":
        str(profile), "cuda_graphs": gpu}}, "acceptance": {"alpha": 0.5}, "topology": {"stages": 1, "link": "ideal"},
        "workload": {"requests": 1, "batch_size": 1, "prompt_len": prompt_len, "output_len": output_len},
    }  # fmt: skip
    plan = build_plan(Point(0, {}, validate(data, "decode-breakdown"), ROOT, "decode-breakdown"))
    layers = plan.model.num_layers

    @functools.cache
    def price(kind: str, slots: int, context: int) -> float:
        work = draft_pass(plan) if kind == "draft" else verify_pass(plan, slots) if kind == "verify" else None
        work = work or Pass("decode", "verify", ((0, layers, 1),), lm_head_q=1)
        at = plan.attended(context, work.phase)
        return sum(stage_time_us(plan, s, work, at, 1) for s in plan.stages) / 1e3

    return price


def decode(model: Any, ids: Any, method: str, args: argparse.Namespace, clock: PassClock) -> dict[str, Any]:
    """One greedy decode; its wall time split into prefill, passes (by kind) and host work between the passes."""
    return host_decode(model, ids, method, clock, max_new_tokens=args.max_new_tokens, capture=args.capture,
                       sync_every=args.sync_every, exit_layer=args.exit_layer, policy=args.policy)  # fmt: skip


def add_pricing_arguments(parser: argparse.ArgumentParser) -> None:
    """The profile the passes are priced from, the model (the executor's and the simulator's name) and the exit
    layer: what this benchmark and `pass_check.py` share."""
    parser.add_argument(
        "--profile",
        type=Path,
        required=True,
        help="a latency profile: an eager CPU one, or the GPU's own with --device cuda",
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sim-model", default="SmolLM2-135M", help="the simulator's name of the model")
    parser.add_argument("--exit-layer", type=int, default=15)


def gap_row(name: str, measured: float, priced: float, ar_measured: float, ar_priced: float) -> dict[str, Any]:
    """One pass's ms measured and priced, each over the AR step's, and the gap (measured / AR) / (priced / AR) - 1."""
    ratio, priced_ratio = measured / ar_measured, priced / ar_priced
    return {"pass": name, "measured_ms": round(measured, 3), "priced_ms": round(priced, 3),
            "measured_over_ar": round(ratio, 4), "priced_over_ar": round(priced_ratio, 4),
            "gap": round(ratio / priced_ratio - 1, 4)}  # fmt: skip


def pass_rows(runs: list[dict[str, Any]], price: Callable[[str, int, int], float]) -> list[dict[str, Any]]:
    """Per pass kind (verify by slots): calls, median ms measured and priced at each call's context, and both over
    the AR step's (the AR decodes' median AR pass against its price)."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        for kind, slots, furthest, ms in run["calls"]:
            name = f"verify k={slots}" if kind == "verify" else kind
            groups.setdefault(name, []).append((ms, price(kind, slots, furthest)))
    ar = groups["ar"]
    ar_measured, ar_priced = statistics.median(m for m, _ in ar), statistics.median(p for _, p in ar)
    rows = []
    for name, values in groups.items():
        measured, priced = statistics.median(m for m, _ in values), statistics.median(p for _, p in values)
        row = gap_row(name, measured, priced, ar_measured, ar_priced)
        spread = [round(q, 3) for q in _deciles([m for m, _ in values])]
        rows.append({**row, "calls": len(values), "p10_p90_ms": spread})
    return rows


def _deciles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=10)
    return cuts[0], cuts[-1]


def profile_overhead_ms(profile: Path) -> dict[str, float]:
    """The profile's `overhead` rows at q = 1, batch 1 (ms, by phase: the median over its contexts): what the
    simulator prices a host read at, for the host work this measures."""
    from sim.formats import read_latency_profile

    rows: dict[str, list[float]] = {}
    for r in read_latency_profile(profile).records:
        if r.component == "overhead" and r.q == 1 and r.batch == 1:
            rows.setdefault(r.phase, []).append(r.median_us / 1e3)
    return {phase: round(statistics.median(values), 3) for phase, values in sorted(rows.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pricing_arguments(parser)
    parser.add_argument("--policy", default="fixed:1")
    parser.add_argument("--prompts", type=int, default=6, help="the first N builtin prompts")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=1, help="times over the prompts (AR and EESD interleaved)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (every pass bracketed by synchronisations)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--capture", default="auto", help="the executor's capture mode (auto: none on the CPU)")
    parser.add_argument("--sync-every", type=int, default=None, help="AR steps per host read (default: the executor's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from sim.formats import check_benchmark_args

    check_benchmark_args(args, inputs=("profile",), counts=("prompts",))

    import torch

    import executor
    from executor.prompts import load_prompts
    from executor.runtime import check_device

    check_device(args.device)  # cuda on a CPU-only torch: one line
    torch.set_num_threads(args.threads)
    model = executor.load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = executor.load_tokenizer(args.model)
    gpu = torch.device(args.device).type == "cuda"
    prompts = [tokenizer(p.text, return_tensors="pt").input_ids for p in load_prompts("builtin")[: args.prompts]]
    clock = PassClock(torch.cuda.synchronize if gpu else None)
    clock.install()
    for ids in prompts if gpu else [prompts[0][:, :8]]:  # warm-up: allocators, kernels (a GPU: every prompt's
        for method in ("ar", "eesd"):  # captures and compiles, which would otherwise land in the timed passes)
            decode(model, ids, method, args, clock)
    clock.calls.clear()
    runs = [decode(model, ids, method, args, clock)
            for _ in range(args.repeats) for ids in prompts for method in ("ar", "eesd")]  # fmt: skip
    longest = max(ids.shape[1] for ids in prompts)
    price = pricer(args.profile, args.sim_model, args.exit_layer, longest, args.max_new_tokens, gpu)
    passes = pass_rows(runs, price)
    hosts = host_rows(runs)
    header = ("pass", "calls", "measured ms", "priced ms", "/AR meas", "/AR priced", "gap")
    print("{:<12} {:>6} {:>12} {:>10} {:>9} {:>10} {:>7}".format(*header))
    for row in passes:
        print(f"{row['pass']:<12} {row['calls']:>6} {row['measured_ms']:>12.2f} {row['priced_ms']:>10.2f} "
              f"{row['measured_over_ar']:>9.3f} {row['priced_over_ar']:>10.3f} {row['gap']:>+7.1%}")  # fmt: skip
    for row in hosts:
        share, per_round = row["host_share_of_decode"], row["host_ms_per_round"]
        print(f"{row['method']}: host work between passes {per_round:.3f} ms/round ({share:.2%} of the decode), "
              f"{row['tokens_per_round']:.2f} tokens/round")  # fmt: skip
    overhead_ms = profile_overhead_ms(args.profile)
    snippet = by_method_snippet(hosts, gpu and is_captured(args.capture))
    print(f"the profile prices a host read at (ms, by phase): {overhead_ms}")
    print(f"as a serving case's per-method host work: {snippet}")
    if args.out:
        where = {"label": f"GPU run: {torch.cuda.get_device_name(args.device)}"} if gpu else {}
        result = {**environment(args.threads, str(args.dtype)), **where, "profile": str(args.profile),
                  "model": args.model, "exit_layer": args.exit_layer, "policy": args.policy, "prompts": args.prompts,
                  "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "device_flag": args.device,
                  "dtype": args.dtype, "capture": args.capture, "sync_every": args.sync_every,
                  "profile_overhead_ms": overhead_ms,
                  "gap": "(measured / AR) / (priced / AR) - 1, each priced at the context it ran at",
                  "passes": passes, "host": hosts, "serving_by_method": snippet,
                  "decodes": [{k: v for k, v in r.items() if k != "calls"} for r in runs]}  # fmt: skip
        print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
