"""Benchmark (not a test): exit-head files scored on corpora, held-out ones by default.

Each head is scored as `eesd train-head` scores it during training (`executor.train_head.evaluate`): on every window
of a corpus, teacher-forced on its text, the fraction of target positions where the head's top token is the full
model's (agreement), tokens/round at a fixed draft length, and the mean KL. A corpus must have been built from the
held-out split (its manifest says `split: held-out`) unless `--allow-train` is given, which is how the gap between
training and held-out agreement is measured (is a head short of data, or of capacity?).

    python benchmarks/head_eval.py --heads heads/smollm2-135m-e15-mix.safetensors \
        heads/smollm2-135m-e7-mix.safetensors --corpus HELD HELD_SELF_PROMPTS --threads 2 --tag smollm2-135m_mix_cpu

Every agreement gets a 95% percentile-bootstrap interval resampling whole windows (an answer's positions are not
independent draws). `--baseline FILE ...` scores those heads too and compares every other head of the same exit
layer with its baseline on the same windows: the paired difference in agreement, with its bootstrap interval (one
resample for both heads), and the difference in KL, under `comparisons`.

Writes benchmarks/results/head_eval_<tag>.json (atomically) with the device, dtype, versions and date, and prints a
table.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch
from head_speed import environment, write_json

from executor.corpus import Record, RecordSource, iter_records, read_manifest
from executor.heads import TrainedExitHead, load_head
from executor.models import load_model
from executor.runtime import use_threads
from executor.train_head import TrainConfig, agreement_interval, check_corpus_model, evaluate
from sim.formats import check_output
from sim.tables import text_table

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--heads", nargs="+", required=True, metavar="FILE", help="trained head files")
    parser.add_argument("--corpus", nargs="+", required=True, metavar="DIR", help="corpora to score on")
    parser.add_argument("--allow-train", action="store_true", help="also score on corpora of the training split")
    parser.add_argument(
        "--by-kind", action="store_true",
        help="also score each kind of prompt apart (code, chat, explanation, math, ...: the record's prompt id)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", nargs="+", default=[], metavar="FILE",
        help="head files (scored too) that every other head of the same exit layer is compared against: the paired "
        "difference in agreement on the same windows, with its bootstrap interval",
    )  # fmt: skip
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap draws per interval (default 2000)")
    parser.add_argument("--draft-len", type=int, default=4, help="k of tokens/round (default 4, as train-head's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--window", type=int, default=None,
        help="tokens per scored window (default: the heads' training window, from their metadata, else 256)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default=None, help="output name: benchmarks/results/head_eval_<tag>.json")
    parser.add_argument("--out", default=None, help="output path instead of the --tag name")
    args = parser.parse_args(argv)
    if (args.tag is None) == (args.out is None):
        parser.error("give one of --tag and --out")
    for flag, value in (
        ("--draws", args.draws),
        ("--draft-len", args.draft_len),
        ("--batch-size", args.batch_size),
        ("--window", args.window if args.window is not None else 1),
        ("--threads", args.threads),
    ):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    try:  # before the work, not after it
        check_output("--out", Path(args.out) if args.out else RESULTS / f"head_eval_{args.tag}.json")
    except ValueError as err:
        parser.error(str(err))
    return args


DEFAULT_WINDOW = 256  # heads whose metadata give no training window, or different ones


def common_window(heads: dict[str, Any]) -> int:
    """The window every head trained with (their metadata's `window`), to score them as training scored them; where
    they differ or do not say, DEFAULT_WINDOW, said (one window for all: baselines pair windows)."""
    found = {str(head.metadata.get("window") or "") for head in heads.values()}
    if len(found) == 1 and found != {""}:
        return int(found.pop())
    print(f"note: the heads trained with windows {sorted(found - {''}) or 'unrecorded'}: scored at {DEFAULT_WINDOW} "
          "tokens (--window to choose)")  # fmt: skip
    return DEFAULT_WINDOW


def check_split(directory: str, allow_train: bool) -> str:
    try:
        split = read_manifest(directory).get("split")
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: --corpus {directory}: {err}") from None
    if split != "held-out" and not allow_train:
        raise SystemExit(f"error: {directory} was built from the {split!r} split; pass --allow-train to score on it")
    return str(split)


def kind_of(record: Record) -> str:
    """The kind of prompt a record continues: a built-in prompt's kind ('builtin/code-03' -> 'code'), else its prompt
    id's first part ('topic/045/q0' -> 'topic': a question the model wrote), else the record's source."""
    prompt = str(record.meta.get("prompt_id") or "")
    if prompt.startswith("builtin/"):
        return re.sub(r"-\d+$", "", prompt.removeprefix("builtin/"))
    return prompt.split("/", 1)[0] if prompt else record.source


def by_kind(corpus: str) -> list[tuple[str, RecordSource]]:
    """The corpus's records split by `kind_of`, one source per kind (sorted); none for a corpus of one kind (its
    whole is that kind)."""
    groups: dict[str, list[Record]] = {}
    for record in iter_records(corpus):
        groups.setdefault(kind_of(record), []).append(record)
    if len(groups) < 2:
        return []
    return [(kind, RecordSource.from_records(records)) for kind, records in sorted(groups.items())]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    splits = {c: check_split(c, args.allow_train) for c in args.corpus}
    print(use_threads(args.threads))
    model = load_model(args.model, dtype=torch.float32)
    heads = {}
    for path in dict.fromkeys([*args.baseline, *args.heads]):
        try:
            head = load_head(path, model)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: {path}: {err}") from None
        if not isinstance(head, TrainedExitHead):
            raise SystemExit(f"error: {path} is a vocabulary-subset head: only trained heads are scored here")
        heads[path] = head.eval()
    window = args.window or common_window(heads)
    rows: list[dict[str, Any]] = []
    for corpus in args.corpus:
        source = RecordSource(corpus)
        check_corpus_model(source, model)
        parts = [("all", source)] + (by_kind(corpus) if args.by_kind else [])
        for path, head in heads.items():
            config = TrainConfig(exit_layer=head.exit_layer, batch_size=args.batch_size, window=window,
                                 draft_len=args.draft_len)  # fmt: skip
            for kind, part in parts:
                with torch.no_grad():
                    result = evaluate({head.exit_layer: head}, part, config, windows=True)[head.exit_layer]
                rows.append({"head": path, "exit_layer": head.exit_layer, "corpus": corpus, "split": splits[corpus],
                             "kind": kind, **result})  # fmt: skip
                print(f"  {Path(path).name} on {corpus} ({kind}): agreement {result['agreement']:.3f}", flush=True)
    windows = {(r["head"], r["corpus"], r["kind"]): r.pop("windows") for r in rows}
    for row in rows:
        own = windows[row["head"], row["corpus"], row["kind"]]
        row["windows"], row["agreement_ci95"] = len(own), list(agreement_interval(own, draws=args.draws))
    comparisons = compare(rows, windows, args.baseline, args.draws)
    print_tables(rows, comparisons)
    report = {"benchmark": "head_eval", "model": str(args.model), "draft_len": args.draft_len, "window": window,
              "rows": rows,
              "comparisons": comparisons, "bootstrap": {"draws": args.draws, "level": 0.95, "resampled": "windows"},
              "environment": environment(args.threads)}  # fmt: skip
    out = Path(args.out) if args.out else RESULTS / f"head_eval_{args.tag}.json"
    print(f"wrote {write_json(out, report)}")
    return 0


def compare(
    rows: list[dict[str, Any]], windows: dict[tuple, list], baselines: list[str], draws: int
) -> list[dict[str, Any]]:  # fmt: skip
    """Each head against the baseline of its exit layer on every corpus and kind: the paired difference in agreement
    and in KL, with the difference's bootstrap interval (the same windows resampled for both heads)."""
    by_layer = {row["exit_layer"]: row["head"] for row in rows if row["head"] in baselines}
    index = {(r["head"], r["corpus"], r["kind"]): r for r in rows}
    out = []
    for row in rows:
        base = by_layer.get(row["exit_layer"])
        if base is None or base == row["head"]:
            continue
        key, base_key = (row["head"], row["corpus"], row["kind"]), (base, row["corpus"], row["kind"])
        low, high = agreement_interval(windows[key], windows[base_key], draws=draws)
        out.append({"head": row["head"], "baseline": base, "exit_layer": row["exit_layer"], "corpus": row["corpus"],
                    "kind": row["kind"], "delta_agreement": row["agreement"] - index[base_key]["agreement"],
                    "delta_ci95": [low, high], "delta_kl": row["kl"] - index[base_key]["kl"],
                    "windows": row["windows"]})  # fmt: skip
    return out


def short_names(paths: list[str]) -> dict[str, str]:
    """Each path as its file name, or as many of its last parts as tell it from the others (two heads named alike in
    two folders: `a/head.safetensors`, `b/head.safetensors`)."""
    unique = list(dict.fromkeys(paths))
    parts = {path: Path(path).parts for path in unique}

    def name(path: str) -> str:
        for depth in range(1, len(parts[path]) + 1):
            tail = parts[path][-depth:]
            if all(parts[other][-depth:] != tail for other in unique if other != path):
                return "/".join(tail)
        return path

    return {path: name(path) for path in unique}


def print_tables(rows: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> None:
    def interval(pair: list[float]) -> str:
        return f"{pair[0]:+.3f} .. {pair[1]:+.3f}" if pair[0] < 0 else f"{pair[0]:.3f} .. {pair[1]:.3f}"

    heads = short_names([r["head"] for r in rows] + [c[k] for c in comparisons for k in ("head", "baseline")])
    corpora = short_names([r["corpus"] for r in rows] + [c["corpus"] for c in comparisons])
    shown = [{**r, "head": heads[r["head"]], "corpus": corpora[r["corpus"]],
              "ci": interval(r["agreement_ci95"])} for r in rows]  # fmt: skip
    columns = ["head", "exit_layer", "corpus", "kind", "split", "agreement", "ci", "tokens_per_round", "kl",
               "eval_positions", "windows"]  # fmt: skip
    names = {"exit_layer": "E", "ci": "95% (windows)", "tokens_per_round": "tok/round", "eval_positions": "positions"}
    print(text_table(shown, columns, names))
    if comparisons:
        shown = [{**c, "head": heads[c["head"]], "baseline": heads[c["baseline"]], "corpus": corpora[c["corpus"]],
                  "ci": interval(c["delta_ci95"])} for c in comparisons]  # fmt: skip
        columns = ["head", "baseline", "corpus", "kind", "delta_agreement", "ci", "delta_kl", "windows"]
        print(text_table(shown, columns, {"delta_agreement": "d agreement", "ci": "95% (paired)", "delta_kl": "d KL"}))


if __name__ == "__main__":
    from sim.formats import run_script

    raise SystemExit(run_script(main))
