"""Benchmark (not a test): measured decode speed of EESD and PPSD with given exit heads against our own AR, on the CPU.

Every configuration decodes the same held-out prompts greedily, in float32 with a fixed number of torch threads, and
the runs are interleaved so that a change of load on a shared box hits every configuration alike: for each repeat,
for each prompt, AR first, then every configuration in an order rotated by one each time. A run's speed is its
decode tokens/s (the prefill and its first token excluded, as `GenerationStats` times them). Per configuration: the
median over all runs, their spread (min, quartiles, max), tokens per round (PPSD: per tick), acceptance, the speedup
of its median over AR's, the median of its per-run speedups over the AR run just before it (paired), and
`identical`: its output equals AR's on every run. The fixed draft length k with the highest median is named per head.

Configurations: EESD for every head x policy (`--policies`, default beta-ts, plus fixed:k for k in `--fixed`),
PPSD sequential (`--ppsd-stages` stages; stage 1 is cut at the head's exit layer when that lies beyond a balanced
first stage) for every head. Heads: "shared", "shared:N" (at `--exit-layer`, default the middle layer, or at their
own with "@E": shared@8, shared:4096@8) or head files (at their own exit layer). Prompts: the held-out half of
`executor.prompts.split_prompts` of a set (builtin, humaneval) or a JSONL file; never the prompts a head was trained
on. Greedy runs go on past EOS unless `--stop-at-eos`, so that every run decodes the same number of tokens.

    python benchmarks/head_speed.py --model smollm2-135m --heads shared,heads/smollm2-135m-e15.safetensors \
        --prompts builtin --num-prompts 8 --new-tokens 64 --repeats 3 --tag smollm2-135m_cpu
    python benchmarks/head_speed.py --model smollm2-135m --heads shared --num-prompts 2 --new-tokens 16 \
        --repeats 1 --fixed 1,2 --tag smoke          # a smoke run, a few minutes on a busy 2-core box

Writes benchmarks/results/head_speed_<tag>.json (atomically): device, dtype, versions, date, threads, command line,
load average before and after, settings and rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers

import executor
import executor.passes as passes
from executor.adapter import ModelAdapter
from executor.corpus import eos_ids
from executor.heads import resolve_head
from executor.ppsd import plan_stages
from executor.prompts import encode_prompt, load_prompts, split_prompts
from sim.contract import default_exit_layer
from sim.formats import cpu_model, write_text_atomic
from sim.policy import make_policy
from sim.tables import text_table

RESULTS = Path(__file__).resolve().parent / "results"
AR_LABEL = "AR"
CAPTURE_NOTES = {
    "none": "uncaptured (run as they are)",
    "freeze": "frozen (executor capture='freeze': compiled by Inductor with the weights as constants; the AR row "
    "without a mode is uncaptured AR, for reference)",
}


def decode_rate(stats: Any) -> float:
    """Decode tokens/s of one generation: the tokens after the prefill's over the time after the prefill."""
    return (stats.new_tokens - 1) / (stats.wall_time_s - stats.prefill_time_s)


@dataclass(frozen=True)
class Config:
    """One decoding setup: AR, EESD with a head and a policy, or PPSD (sequential backend) with a head."""

    method: str
    head_name: str = "-"
    head: Any = None
    exit_layer: int | None = None
    policy: str | None = None
    stage_boundaries: tuple[int, ...] | None = None
    capture: str = "none"
    draft_dtype: str | None = None  # EESD drafting in a narrower dtype than the model's (None: the model's)

    @property
    def label(self) -> str:
        """Method, head (a head file by its stem), exit layer, and the policy (EESD) or the stage count (PPSD); the
        capture mode where the passes are not run as they are."""
        return self._what() + ("" if self.capture == "none" else f" [{self.capture}]")

    def _what(self) -> str:
        if self.method == "ar":
            return AR_LABEL
        head = Path(self.head_name).stem if self.head_name.endswith(".safetensors") else self.head_name
        if self.method == "ppsd":
            return f"PPSD seq n={len(self.stage_boundaries) + 1} {head} E={self.exit_layer}"
        drafts = f" draft={self.draft_dtype}" if self.draft_dtype else ""
        return f"EESD {head} E={self.exit_layer} {self.policy}{drafts}"

    def kwargs(self) -> dict[str, Any]:
        """`executor.generate`'s arguments for this setup (passes as they are, or frozen: `capture`)."""
        if self.method == "ar":
            return {"method": "ar", "capture": self.capture}
        common = {"method": self.method, "head": self.head, "exit_layer": self.exit_layer, "capture": self.capture}
        if self.method == "ppsd":
            stages = len(self.stage_boundaries) + 1
            return common | {"backend": "sequential", "stages": stages, "stage_boundaries": list(self.stage_boundaries)}
        return common | {"policy": self.policy} | ({"draft_dtype": self.draft_dtype} if self.draft_dtype else {})


@dataclass
class Tally:
    """One configuration's runs: decode rates, the work counted by its stats and whether every output matched AR."""

    rates: list[float] = field(default_factory=list)
    paired: list[float] = field(default_factory=list)  # this run's rate / the AR run's of the same (repeat, prompt)
    tokens: int = 0  # tokens the rounds (PPSD: ticks) emitted
    units: int = 0  # rounds or ticks
    accepted: int = 0
    drafted: int = 0
    identical: bool = True

    def add(self, stats: Any, rate: float, ar_rate: float | None, same: bool) -> None:
        self.rates.append(rate)
        if ar_rate is not None:
            self.paired.append(rate / ar_rate)
        if hasattr(stats, "ticks"):  # PPSD: decoded tokens per tick
            self.tokens, self.units = self.tokens + stats.decoded_tokens, self.units + stats.ticks
        else:
            self.tokens += sum(a + 1 for a in stats.accepted)
            self.units += len(stats.accepted)
        self.accepted += sum(stats.accepted)
        self.drafted += sum(stats.drafted)
        self.identical = self.identical and same


def stage_cuts(num_layers: int, stages: int, exit_layer: int) -> tuple[int, ...]:
    """PPSD's n - 1 cut points as the executor lays them out (`executor.ppsd.plan_stages`): balanced, unless the exit
    layer lies beyond stage 1; then stage 1 ends at it and the later layers are balanced over the other stages."""
    try:
        return plan_stages(num_layers, stages, None, exit_layer).bounds[1:-1]
    except ValueError as err:
        raise ValueError(f"--ppsd-stages {stages}: {err}") from None


def load_heads(adapter: ModelAdapter, names: Sequence[str], exit_layer: int | None) -> list[tuple[str, Any, int]]:
    """(name, head object, exit layer) per head: "shared" and "shared:N" at `exit_layer` (default: the middle layer)
    or at their own "@E" ("shared@8", "shared:4096@8"), a head file at its own exit layer (or `exit_layer` for a
    subset file, which has none)."""
    fallback = exit_layer if exit_layer is not None else default_exit_layer(adapter.num_layers)
    heads = []
    for name in names:
        spec, _, at = name.partition("@")
        if spec != "shared" and not spec.startswith("shared:"):
            head = resolve_head(name, adapter, None)
            heads.append((name, head, getattr(head, "exit_layer", None) or fallback))
            continue
        if at and not at.isdigit():
            raise ValueError(f"head {name!r}: expected shared@E or shared:N@E with a whole exit layer E")
        layer = int(at) if at else fallback
        heads.append((spec, resolve_head(spec, adapter, layer), layer))
    return heads


def make_configs(
    adapter: ModelAdapter,
    heads: Sequence[tuple[str, Any, int]],
    policies: Sequence[str],
    ppsd_stages: int,
    capture: str = "none",
    draft_dtypes: Sequence[str | None] = (None,),
) -> list[Config]:
    """AR, then EESD per head, policy and draft dtype (None: the model's), then PPSD per head (none when
    `ppsd_stages` is 0), all under `capture`; with frozen passes, AR as it is last (the uncaptured reference)."""
    for spec in policies:
        make_policy(spec)  # a mistyped policy is refused before any model runs
    configs = [Config("ar", capture=capture)]
    configs += [
        Config("eesd", name, head, exit_layer, spec, capture=capture, draft_dtype=dtype)
        for name, head, exit_layer in heads
        for spec in policies
        for dtype in draft_dtypes
    ]
    if ppsd_stages:
        configs += [
            Config(
                "ppsd", name, head, e, stage_boundaries=stage_cuts(adapter.num_layers, ppsd_stages, e), capture=capture
            )  # fmt: skip
            for name, head, e in heads
        ]
    if capture != "none":
        configs.append(Config("ar"))
    labels = [c.label for c in configs]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"configurations given twice (a head or policy repeated): {', '.join(twice)}")
    return configs


def generate_once(
    adapter: ModelAdapter, prompt: list[int], config: Config, new_tokens: int, eos: list[int], **processing: Any
):
    """One greedy generation of `config` (with `processing`, e.g. no_repeat_ngram_size): its new tokens and stats."""
    out = executor.generate(adapter, [prompt], max_new_tokens=new_tokens, eos_token_id=eos or None,
                            **config.kwargs(), **processing)  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), out.stats


def warm_lengths(config: Config, new_tokens: int) -> list[int]:
    """The new-token counts of a configuration's untimed warm-up runs. Uncaptured: one short run (first calls pay
    one-off allocations). Frozen: a full run, then runs of 2 .. k + 2 tokens, whose first round's budget is 0 .. k
    drafts, so that every verify width a timed run can meet (its last rounds may draft fewer) is compiled first."""
    if config.capture == "none":
        return [min(new_tokens, 8)]
    most = make_policy(config.policy).max_draft_len if config.method == "eesd" else 0
    return [new_tokens, *range(2, min(new_tokens, most + 2) + 1)]


def measure(
    adapter: ModelAdapter,
    prompts: Sequence[list[int]],
    configs: Sequence[Config],
    new_tokens: int,
    repeats: int,
    eos: Sequence[int] = (),
    warmup: int = 1,
    **processing: Any,
) -> dict[str, Tally]:
    """Interleaved runs: for each repeat and prompt, AR, then the other configurations in a rotated order; every
    generation with `processing` (generate's keyword arguments, e.g. no_repeat_ngram_size)."""
    ar, others = configs[0], list(configs[1:])
    for config in configs if warmup else ():  # untimed
        for warm in warm_lengths(config, new_tokens):
            generate_once(adapter, prompts[0], config, warm, list(eos), **processing)
    tallies = {c.label: Tally() for c in configs}
    first_ar: dict[int, list[int]] = {}  # AR's output per prompt in the first repeat: AR must repeat itself too
    slot = 0
    for _ in range(repeats):
        for index, prompt in enumerate(prompts):
            reference, stats = generate_once(adapter, prompt, ar, new_tokens, list(eos), **processing)
            ar_rate = decode_rate(stats)
            tallies[ar.label].add(stats, ar_rate, None, first_ar.setdefault(index, reference) == reference)
            turn = slot % len(others) if others else 0
            for config in others[turn:] + others[:turn]:
                tokens, stats = generate_once(adapter, prompt, config, new_tokens, list(eos), **processing)
                tallies[config.label].add(stats, decode_rate(stats), ar_rate, tokens == reference)
            slot += 1
    return tallies


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (both the value itself for a single run)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def row_of(config: Config, tally: Tally, ar_median: float) -> dict[str, Any]:
    median = statistics.median(tally.rates)
    q1, q3 = quartiles(tally.rates)
    return {
        "config": config.label, "method": config.method, "head": config.head_name, "exit_layer": config.exit_layer,
        "policy": config.policy, "draft_dtype": config.draft_dtype, "ppsd_stage_boundaries": config.stage_boundaries,
        "runs": len(tally.rates),
        "decode_tokens_per_s": median, "decode_tokens_per_s_min": min(tally.rates), "decode_tokens_per_s_q1": q1,
        "decode_tokens_per_s_q3": q3, "decode_tokens_per_s_max": max(tally.rates),
        "tokens_per_round": tally.tokens / tally.units if tally.units else None,
        "round_unit": "tick" if config.method == "ppsd" else "round",
        "acceptance": tally.accepted / tally.drafted if tally.drafted else None,
        "speedup": median / ar_median,
        "paired_speedup": statistics.median(tally.paired) if tally.paired else 1.0,
        "identical": tally.identical, "best_fixed": False, "decode_rates": tally.rates,
    }  # fmt: skip


def fixed_k(policy: str | None) -> int | None:
    """k of a "fixed:k" policy, else None."""
    if policy is None or not policy.startswith("fixed:"):
        return None
    try:
        return int(policy.split(":", 1)[1])
    except ValueError:
        return None


def mark_best_fixed(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Flag, per EESD head and exit layer, the fixed:k row with the highest median; returns {head@E: k}."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["method"] == "eesd" and fixed_k(row["policy"]) is not None:
            key = f"{row['head']}@{row['exit_layer']}"
            if key not in best or row["decode_tokens_per_s"] > best[key]["decode_tokens_per_s"]:
                best[key] = row
    for row in best.values():
        row["best_fixed"] = True
    return {key: fixed_k(row["policy"]) for key, row in best.items()}


def rows_from(configs: Sequence[Config], tallies: dict[str, Tally]) -> list[dict[str, Any]]:
    ar_median = statistics.median(tallies[configs[0].label].rates)  # the first: AR under the configurations' mode
    return [row_of(c, tallies[c.label], ar_median) for c in configs]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


SPEED_COLUMNS = {
    "config": "configuration", "median": "decode tok/s", "range": "min - max", "iqr": "IQR", "work": "tok/round",
    "acceptance": "acceptance", "speedup": "speedup", "paired": "paired", "identical": "output == AR",
}  # fmt: skip


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a text table: median and spread of decode tokens/s, work per round, speedups, identity."""
    shown = []
    for r in rows:
        shown.append({
            "config": r["config"] + (" (best fixed)" if r["best_fixed"] else ""),
            "median": f"{r['decode_tokens_per_s']:.2f}",
            "range": f"{r['decode_tokens_per_s_min']:.2f} - {r['decode_tokens_per_s_max']:.2f}",
            "iqr": f"{r['decode_tokens_per_s_q1']:.2f} - {r['decode_tokens_per_s_q3']:.2f}",
            "work": fmt(r["tokens_per_round"], ".2f") + ("/tick" if r["round_unit"] == "tick" else ""),
            "acceptance": fmt(r["acceptance"], ".3f"), "speedup": f"{r['speedup']:.2f}x",
            "paired": f"{r['paired_speedup']:.2f}x", "identical": str(r["identical"]),
        })  # fmt: skip
    return text_table(shown, list(SPEED_COLUMNS), SPEED_COLUMNS)


def environment(threads: int, dtype: str = "float32") -> dict[str, Any]:
    """What the figures depend on besides the settings: machine, threads, dtype (the model's), versions, date,
    command line."""
    return {
        "label": "CPU benchmark (not a GPU result)",
        "device": f"CPU: {cpu_model()} ({os.cpu_count()} cores, {threads} torch threads)",
        "dtype": dtype, "threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
    }  # fmt: skip


def write_json(path: Path, report: dict[str, Any]) -> Path:
    """Write `report` to `path` atomically (a temporary file beside it, then a rename)."""
    write_text_atomic(path, json.dumps(report, indent=2, default=str) + "\n")  # (paths in settings: as text)
    return path


@dataclass(frozen=True)
class Settings:
    """What a run measures: heads x policies (EESD) and heads (PPSD), on prompts, for tokens, repeated."""

    heads: tuple[str, ...] = ("shared",)
    policies: tuple[str, ...] = ("beta-ts", "fixed:1", "fixed:2", "fixed:3", "fixed:4")
    exit_layer: int | None = None
    ppsd_stages: int = 2
    new_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    stop_at_eos: bool = False
    capture: str = "none"
    no_repeat_ngram_size: int = 0  # HF's n-gram ban on every run, AR included (a processor that reads the prefix)
    draft_dtypes: tuple[str | None, ...] = (None,)  # EESD's drafts: None in the model's dtype, or a narrower one


def run_benchmark(model: Any, prompts: Sequence[list[int]], settings: Settings, threads: int) -> dict[str, Any]:
    """Measure every configuration on `prompts`; the report's environment, load average, settings and rows."""
    torch.set_num_threads(threads)
    adapter = ModelAdapter(model)
    heads = load_heads(adapter, settings.heads, settings.exit_layer)
    configs = make_configs(
        adapter, heads, settings.policies, settings.ppsd_stages, settings.capture, settings.draft_dtypes
    )
    if settings.capture != "none":  # every configuration's compiled passes stay cached through the interleaved runs
        passes.MAX_RUNNERS_PER_MODEL = max(passes.MAX_RUNNERS_PER_MODEL, len(configs))
    eos = eos_ids(model)
    load_before = os.getloadavg()
    processing = {"no_repeat_ngram_size": settings.no_repeat_ngram_size} if settings.no_repeat_ngram_size else {}
    tallies = measure(adapter, prompts, configs, settings.new_tokens, settings.repeats,
                      eos if settings.stop_at_eos else (), settings.warmup, **processing)  # fmt: skip
    load_after = os.getloadavg()
    rows = rows_from(configs, tallies)
    return environment(threads) | {
        "load_average_1_5_15_before": list(load_before), "load_average_1_5_15_after": list(load_after),
        "settings": asdict(settings) | {"prompts": len(prompts)}, "best_fixed_k": mark_best_fixed(rows),
        "timing": f"decode tokens/s per run (prefill and its token excluded), passes {CAPTURE_NOTES[settings.capture]};"
        " runs interleaved: per repeat and prompt AR, then the other configurations in a rotated order; median over "
        "all runs",
        "rows": rows,
    }  # fmt: skip


def held_out_prompts(tokenizer: Any, prompt_set: str, count: int) -> tuple[list[str], list[list[int]]]:
    """Ids and token ids of the first `count` held-out prompts of a set (chat-templated where the model has one)."""
    held_out = split_prompts(load_prompts(prompt_set)).held_out[:count]
    return [p.id for p in held_out], [encode_prompt(tokenizer, p.text) for p in held_out]


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a packaged model name or a local HF directory")
    parser.add_argument("--heads", default="shared", help="comma-separated: shared[@E] | shared:N[@E] | a head file")
    parser.add_argument("--exit-layer", type=int, default=None, help="for shared heads (default: the middle layer)")
    parser.add_argument("--policies", default="beta-ts", help="EESD policies besides fixed:k (comma-separated)")
    parser.add_argument("--fixed", default="1,2,3,4", help="k of the fixed:k policies (comma-separated; '' for none)")
    parser.add_argument("--ppsd-stages", type=int, default=2, help="PPSD sequential's stages (0: no PPSD rows)")
    parser.add_argument("--prompts", default="builtin", help="a prompt set or FILE.jsonl (held-out split)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="1: one short untimed run per configuration first")
    parser.add_argument("--stop-at-eos", action="store_true", help="stop at the model's EOS (default: run on)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--capture", choices=tuple(CAPTURE_NOTES), default="none",
        help="how every configuration's passes run: none (as they are) or freeze (compiled with frozen weights; "
        "each configuration's passes compile in its untimed warm-up run, minutes each; AR as it is added last)",
    )  # fmt: skip
    parser.add_argument(
        "--no-repeat-ngram-size", type=int, default=0, metavar="N",
        help="HF's no_repeat_ngram_size on every run, AR included (0: off; passes then run uncaptured)",
    )  # fmt: skip
    parser.add_argument(
        "--draft-dtypes", default="model",
        help="EESD's drafts, comma-separated: model (the model's float32) and/or a narrower dtype such as bf16 "
        "(executor.generate's draft_dtype); every EESD configuration runs with each",
    )  # fmt: skip
    parser.add_argument("--tag", default=None, help="results/head_speed_<tag>.json (default: <model>_cpu)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON's path (overrides --tag)")
    parser.add_argument("--note", default="", help="the conditions, for the JSON (e.g. 'busy 2-core box, smoke run')")
    args = parser.parse_args(argv)
    from sim.formats import check_benchmark_args

    check_benchmark_args(args, counts=("num_prompts", "new_tokens", "repeats", "threads"))
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    policies = parse_list(args.policies) + tuple(f"fixed:{k}" for k in parse_list(args.fixed))
    if not policies:
        raise ValueError("--policies and --fixed give no EESD policy: name at least one")
    return Settings(
        heads=parse_list(args.heads), policies=policies, exit_layer=args.exit_layer, ppsd_stages=args.ppsd_stages,
        new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup, stop_at_eos=args.stop_at_eos,
        capture=args.capture, no_repeat_ngram_size=args.no_repeat_ngram_size,
        draft_dtypes=tuple(None if d == "model" else d for d in parse_list(args.draft_dtypes)) or (None,),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from(args)
    torch.set_num_threads(args.threads)
    model = executor.load_model(args.model, dtype="float32")
    ids, prompts = held_out_prompts(executor.load_tokenizer(args.model), args.prompts, args.num_prompts)
    report = run_benchmark(model, prompts, settings, args.threads)
    report |= {"model": args.model, "prompt_set": args.prompts, "prompt_split": "held-out (split_prompts)",
               "prompt_ids": ids, "note": args.note}  # fmt: skip
    print(f"{args.model}, {len(prompts)} held-out {args.prompts} prompts x {args.new_tokens} tokens, "
          f"{args.repeats} repeats, CPU float32, {args.threads} thread(s)")  # fmt: skip
    print(table(report["rows"]))
    print(f"best fixed k: {report['best_fixed_k']}")
    out = args.out or RESULTS / f"head_speed_{args.tag or args.model + '_cpu'}.json"
    print(f"wrote {write_json(out, report)}")


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
