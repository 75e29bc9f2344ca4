"""Exit-head report: agreement with the full model per exit layer (shared head, trained heads) and EESD tokens/round.

Prompts are split by id (`executor.prompts.split_prompts`): heads are trained on continuations of training prompts
only and evaluated on the held-out prompts' continuations. Agreement = fraction of draft positions (from the last
prompt token on, teacher-forced on the full model's own greedy text) where the head's top token equals the full
model's. EESD tokens per round are measured by real EESD runs (greedy, fixed draft length) on held-out prompts.

    python benchmarks/head_report.py --steps 120 --train-prompts 32 --eval-prompts 12 --tag cpu
    python benchmarks/head_report.py --heads heads/smollm2-135m-e15.safetensors --eval-prompts 20 --tag cpu_corpus

The trained heads are written to `heads/<model>-e<E>.safetensors` (bfloat16); `eesd train-head` with the same
settings reproduces each one (same training prompts, corpus, batches and seed). With `--heads`, nothing is trained:
the given head files (e.g. distilled from a corpus, `eesd train-head --corpus`) are scored on the held-out prompts,
and each one's held-out evaluations during training (`NAME.eval.csv`, written by `executor.train_head`) give the
curve of agreement and tokens/round against training tokens: does more data still help?

With `--speed`, the report also holds the measured decode speed of EESD (beta-ts and fixed:1..4) and PPSD
(sequential, 2 stages) with the shared and the trained head at each exit layer against our AR, on the first
`--eesd-prompts` held-out prompts (`benchmarks/head_speed.py`: interleaved runs, medians, output checked against AR).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from head_speed import Settings, run_benchmark
from head_speed import table as speed_table

from executor.adapter import ModelAdapter
from executor.api import generate
from executor.corpus import read_manifest
from executor.heads import TrainedExitHead, load_head, save_head
from executor.models import load_model, load_tokenizer
from executor.prompts import encode_prompt, load_prompts, split_prompts
from executor.train_head import (
    TrainConfig,
    TrainState,
    agreement,
    draft_logits,
    eval_csv_path,
    generate_corpus,
    make_optimizer,
    shared_logits,
    teacher_examples,
    train,
)
from sim.formats import check_benchmark_args, check_output, read_head_metadata, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_FRACTION = 0.25  # split_prompts' default, which this report's held-out prompts come from


@dataclass(frozen=True)
class EesdRun:
    exit_layer: int
    head: str
    tokens_per_round: float
    acceptance_rate: float
    tokens_per_s: float
    identical_to_ar: bool


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", default="builtin")
    parser.add_argument("--exit-layers", default="8,15,22", help="trained heads at these exit layers")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--train-prompts", type=int, default=32)
    parser.add_argument("--eval-prompts", type=int, default=12)
    parser.add_argument("--eesd-prompts", type=int, default=6)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    parser.add_argument(
        "--heads-dir", default=str(ROOT / "heads"),
        help="where trained heads are written, as <model>-e<E>.safetensors (default: the repository's heads/)",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="overwrite head files already in --heads-dir")
    parser.add_argument("--tag", default="cpu", help="results file suffix: benchmarks/results/head_report_<tag>")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON's path instead (its plots beside it; default: the --tag name)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", nargs="+", default=None, metavar="FILE",
                        help="score these head files (trained elsewhere) instead of training heads here")  # fmt: skip
    parser.add_argument("--speed", action="store_true", help="also measure decode speed against AR (head_speed.py)")
    parser.add_argument("--speed-repeats", type=int, default=3, help="--speed: interleaved repeats")
    return parser.parse_args()


def eesd_runs(model, prompts: list[list[int]], heads: dict[int, str], args, eos) -> list[EesdRun]:
    """EESD with the shared and the trained head at each exit layer, one batch of held-out prompts each."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    common = dict(attention_mask=mask, max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=0)
    reference = generate(model, ids, method="ar", **common).sequences
    runs = []
    for exit_layer, path in heads.items():
        for name, head in (("shared", "shared"), ("trained", path)):
            result = generate(model, ids, method="eesd", exit_layer=exit_layer, draft_len=args.draft_len, head=head,
                              **common)  # fmt: skip
            stats = result.stats
            same = torch.equal(result.sequences, reference)
            runs.append(
                EesdRun(exit_layer, name, stats.tokens_per_round, stats.acceptance_rate, stats.tokens_per_s, same)
            )
            print(f"EESD E={exit_layer} {name}: {stats.tokens_per_round:.2f} tokens/round, identical to AR: {same}")
    return runs


def speed_runs(model, prompts: list[list[int]], heads: dict[int, str], args) -> dict:
    """Measured decode speed (`head_speed.run_benchmark`) of the shared and the trained head at each exit layer."""
    names = [name for exit_layer, path in heads.items() for name in (f"shared@{exit_layer}", path)]
    settings = Settings(heads=tuple(names), new_tokens=args.max_new_tokens, repeats=args.speed_repeats)
    speed = run_benchmark(model, prompts, settings, args.threads)
    print(speed_table(speed["rows"]))
    return {key: speed[key] for key in ("load_average_1_5_15_before", "load_average_1_5_15_after", "settings",
                                        "best_fixed_k", "timing", "rows")}  # fmt: skip


def training_curve(head_file: str | Path) -> list[dict[str, float]]:
    """The held-out evaluations written while the head trained (`NAME.eval.csv`), if any: agreement and tokens/round
    against training tokens."""
    path = eval_csv_path(head_file)
    if not path.is_file():
        return []
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    keys = ("step", "tokens_seen", "targets_seen", "agreement", "tokens_per_round", "kl")
    return [{key: float(row[key]) for key in keys} for row in rows]


def agreement_plot(path: Path, label: str, xlabel: str, draw) -> None:
    """A figure of agreement (0..1) against `xlabel`, its lines drawn by `draw(axes)`, saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out agreement with the full model (top-1)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(label)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_curves(path: Path, curves: dict[int, list[dict[str, float]]], label: str) -> None:
    def draw(ax) -> None:
        for exit_layer, rows in curves.items():
            ax.plot([r["tokens_seen"] for r in rows], [r["agreement"] for r in rows], "o-", label=f"E = {exit_layer}")

    agreement_plot(path, label, "training tokens seen", draw)


def check_unseen(path: str, metadata: dict[str, str], prompts: str) -> str:
    """Refuse a head whose corpus holds this prompt set's held-out prompts (where its manifest says so)."""
    corpus = Path(metadata.get("corpus", ""))
    if not (corpus / "manifest.json").is_file():
        return f"not checked: corpus {metadata.get('corpus', 'unknown')} is not on this machine"
    manifest = read_manifest(corpus)
    settings = manifest["settings"]
    same_prompts = "self" in settings["sources"] and settings["prompts"] == prompts
    if same_prompts and (manifest["split"] != "train" or settings["held_out_fraction"] != HELD_OUT_FRACTION):
        raise ValueError(f"{path} was trained on a corpus that holds held-out prompts of {prompts}: {corpus}")
    return f"corpus {corpus} ({manifest['split']} split)"


def check_one_head_per_exit(paths: list[str]) -> None:
    """The report keeps one head per exit layer (its agreement curve, its EESD row): two head files at one exit layer
    are refused before the work, rather than the first silently dropped. A file that is not a head is left to the
    loader, which names what is wrong with it."""
    seen: dict[str, str] = {}
    for path in paths:
        try:
            exit_layer = read_head_metadata(path).get("exit_layer")
        except ValueError:
            continue
        if exit_layer is not None and exit_layer in seen:
            raise ValueError(
                f"--heads: {seen[exit_layer]} and {path} both draft at exit layer {exit_layer}; the report keeps one "
                "head per exit layer: run it once per head"
            )
        if exit_layer is not None:
            seen[exit_layer] = path


def given_heads(
    model, paths: list[str], eval_examples, args
) -> tuple[dict[int, float], dict[int, str], dict[int, dict]]:
    """Held-out agreement of head files trained elsewhere, their paths and what they were trained on."""
    trained, heads, data = {}, {}, {}
    for path in paths:
        head = load_head(path, model)
        exit_layer = head.exit_layer
        trained[exit_layer] = agreement(lambda ex, h=head: draft_logits(h, ex), eval_examples)
        heads[exit_layer] = str(path)
        keys = ("corpus", "corpus_manifest_sha256", "tokens_seen", "train_tokens", "steps", "trained_with")
        data[exit_layer] = {key: head.metadata[key] for key in keys if key in head.metadata}
        data[exit_layer]["held_out_check"] = check_unseen(path, head.metadata, args.prompts)
        print(f"E={exit_layer}: {path} agrees on {trained[exit_layer]:.3f} of held-out positions")
    return trained, heads, data


def plot(path: Path, shared: dict[int, float], trained: dict[int, float], label: str) -> None:
    def draw(ax) -> None:
        ax.plot(list(shared), list(shared.values()), "o-", label="shared head (final norm + LM head)")
        ax.plot(list(trained), list(trained.values()), "s", markersize=9, label="trained one-layer head")

    agreement_plot(path, label, "exit layer E", draw)


def head_files(args) -> list[Path]:
    """The head files a run that trains writes: one per exit layer in --heads-dir."""
    return [Path(args.heads_dir) / f"{args.model}-e{int(e)}.safetensors" for e in args.exit_layers.split(",")]


def train_heads(model, train_ids: list[list[int]], eval_examples, args):
    """Train a head per exit layer here (in memory, the first version's loop) and score it on the held-out prompts."""
    adapter = ModelAdapter(model)
    exit_layers = [int(e) for e in args.exit_layers.split(",")]
    train_corpus = generate_corpus(model, train_ids, args.max_new_tokens, model.generation_config.eos_token_id)
    train_examples = teacher_examples(adapter, train_corpus, exit_layers)
    trained, losses, heads = {}, {}, {}
    for exit_layer in exit_layers:
        head = TrainedExitHead(adapter, exit_layer)
        config = TrainConfig(exit_layer=exit_layer, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                             seed=args.seed)  # fmt: skip
        state = train(head, train_examples, config, make_optimizer(head, config.lr), TrainState())
        path = head_files(args)[exit_layers.index(exit_layer)]
        info = {"model": args.model, "prompts": args.prompts, "split": "train", "model_dtype": "float32",
                "max_new_tokens": args.max_new_tokens, "prompts_count": len(train_ids), "steps": args.steps,
                "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        save_head(head, path, dtype=torch.bfloat16, info=info)
        shipped = load_head(path, model, exit_layer)  # evaluate what ships: the bfloat16 file
        trained[exit_layer] = agreement(lambda ex, h=shipped: draft_logits(h, ex), eval_examples)
        losses[exit_layer] = state.losses
        heads[exit_layer] = str(path)
        print(f"E={exit_layer}: trained {trained[exit_layer]:.3f}")
    return trained, losses, heads


def main() -> None:
    args = parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / f"head_report_{args.tag}.json"
    check_benchmark_args(args, inputs=("heads",), counts=("batch_size", "train_prompts", "eval_prompts",
                                                        "eesd_prompts", "draft_len", "speed_repeats"))  # fmt: skip
    try:
        check_output("--out", out)  # before the work, not after it
        for path in [] if args.heads else head_files(args):  # shipped heads are not replaced unasked
            check_output("--heads-dir", path, force=args.force)
        check_one_head_per_exit(args.heads or [])
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    begin = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype="float32"), load_tokenizer(args.model)
    adapter = ModelAdapter(model)
    eos = model.generation_config.eos_token_id
    split = split_prompts(load_prompts(args.prompts))
    train_ids = [encode_prompt(tokenizer, p.text) for p in split.train[: args.train_prompts]]
    eval_ids = [encode_prompt(tokenizer, p.text) for p in split.held_out[: args.eval_prompts]]
    eval_corpus = generate_corpus(model, eval_ids, args.max_new_tokens, eos)
    eval_examples = teacher_examples(adapter, eval_corpus, list(range(1, adapter.num_layers)))
    shared = {e: agreement(shared_logits(adapter, e), eval_examples) for e in range(1, adapter.num_layers)}

    if args.heads:
        trained, heads, head_data = given_heads(model, args.heads, eval_examples, args)
        losses: dict[int, list[float]] = {}
    else:
        trained, losses, heads = train_heads(model, train_ids, eval_examples, args)
        head_data = {}
    curves = {e: training_curve(path) for e, path in heads.items()}
    runs = eesd_runs(model, eval_ids[: args.eesd_prompts], heads, args, eos)
    speed = speed_runs(model, eval_ids[: args.eesd_prompts], heads, args) if args.speed else None
    trained_how = "given heads" if args.heads else f"{args.steps} steps, {len(train_ids)} train prompts"
    label = f"{args.model}, {args.tag.upper()}, float32: {trained_how}"
    report = {
        "label": label,
        "device": "cpu" if args.tag == "cpu" else args.tag,
        "machine": f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads",
        "dtype": "float32",
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "heads_dir"},
        "prompts": {
            "set": args.prompts,
            "train": [p.id for p in split.train[: args.train_prompts]],
            "held_out": [p.id for p in split.held_out[: args.eval_prompts]],
        },  # fmt: skip
        "eval_positions": sum(len(e.teacher_tokens) for e in eval_examples),
        "agreement_shared": shared,
        "agreement_trained": trained,
        "kl_first10_last10": {e: [sum(v[:10]) / 10, sum(v[-10:]) / 10] for e, v in losses.items()},
        "eesd": [asdict(run) for run in runs],
        "speed": speed,  # --speed: decode tokens/s against AR, interleaved runs (head_speed.py); None without
        "heads": heads,
        "head_training_data": head_data,
        "training_curves": curves,  # held-out agreement / tokens per round vs training tokens, from NAME.eval.csv
        "wall_time_s": time.perf_counter() - begin,
    }
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    plot(out.with_suffix(".png"), shared, trained, label)
    if any(curves.values()):
        plot_curves(out.with_name(f"{out.stem}_curve.png"), {e: c for e, c in curves.items() if c}, label)
    print(f"wrote {out} and {out.with_suffix('.png')} in {report['wall_time_s']:.0f} s")


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
