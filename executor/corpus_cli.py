"""`eesd corpus`: build an offline corpus for self-distilling exit heads (`executor.corpus`), no network needed.

    eesd corpus --model smollm2-135m --sources self,self-prompts --out corpora/smollm2-self
    eesd corpus --model smollm2-135m --sources self-requests --prompts requests --out corpora/smollm2-new-requests
    eesd corpus --model smollm2-135m --sources self --split held-out --temperatures 0 --out corpora/smollm2-eval
    eesd corpus --model qwen2.5-coder-0.5b --sources python-env,text --text my/code --out corpora/qwen-code

`self`, `self-prompts` and `self-requests` use the training split of the prompts (and of the shipped topics) unless
`--split held-out` builds the evaluation corpus; `self-requests` also writes the requests it kept to
`requests.jsonl` in the output directory; `text` and `python-env` split by document. Train a head from the corpus
with `eesd train-head --corpus DIR --eval-corpus DIR2`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from executor.runtime import add_threads_argument, check_device, use_threads
from sim.formats import check_output, long_dtype

SOURCE_NAMES = ("self", "self-prompts", "self-requests", "text", "python-env")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local HF directory, a .gguf file, or a packaged model name")
    parser.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    parser.add_argument(
        "--sources", default="self", help=f"comma-separated, of {', '.join(SOURCE_NAMES)} (default self)"
    )
    parser.add_argument(
        "--split", default="train", choices=("train", "held-out"), help="prompts / documents (default train)"
    )
    parser.add_argument(
        "--prompts", default="builtin", help="self, self-requests: builtin | requests | humaneval | FILE.jsonl"
    )
    parser.add_argument(
        "--max-prompts",
        type=int,
        default=None,
        help="only the first N prompts (topics) of the split, in its order (the built-in set's first are all chat: "
        "a few kinds need more)",
    )
    parser.add_argument("--temperatures", type=_floats, default=(0.0, 0.7, 1.0), help="0 is greedy (default 0,0.7,1)")
    parser.add_argument("--samples", type=int, default=2, help="per prompt at each temperature > 0 (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per answer (default 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts generated together (default 32)")
    parser.add_argument("--questions-per-topic", type=int, default=2, help="self-prompts: per topic (default 2)")
    parser.add_argument(
        "--requests-per-kind", type=int, default=32,
        help="self-requests: requests the model is asked to write per kind of --prompts (default 32)",
    )  # fmt: skip
    parser.add_argument(
        "--text", action="append", default=[], metavar="PATH",
        help="text: a text file, a JSONL file (each line's 'text' or 'prompt' field) or a directory of them",
    )  # fmt: skip
    parser.add_argument("--python-env", default="stdlib", choices=("stdlib", "all"), help="python-env: + site-packages")
    parser.add_argument("--window", type=int, default=256, help="text, python-env: tokens per window (default 256)")
    parser.add_argument(
        "--max-tokens-per-source", type=int, default=None, metavar="N",
        help="stop a source once it holds N tokens (checked before each text window or batch of continuations, "
        "which is kept whole: a source ends up to one window or batch past N)",
    )  # fmt: skip
    parser.add_argument("--shard-records", type=int, default=1024, help="records per shard (default 1024)")
    parser.add_argument(
        "--held-out-fraction", type=float, default=0.25, help="of prompts, topics, documents (default 0.25)"
    )
    parser.add_argument("--seed", type=int, default=0, help="every sample's seed derives from it (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument(
        "--capture", default="auto", choices=("auto", "none", "graph", "compile", "compile-layers"),
        help="how generation runs its passes (as `eesd generate --capture`; the tokens are the same); captured "
        "passes are kept for later batches of the same rows and cache capacity (default: auto)",
    )  # fmt: skip
    parser.add_argument(
        "--time-budget-s", type=float, default=None, metavar="S",
        help="generated sources start no batch after S seconds; the corpus is then the first batches of the full "
        "one, and its manifest says so (cut_by_time_budget)",
    )  # fmt: skip
    parser.add_argument("--dtype", type=long_dtype, default="float32", help="model dtype (default float32)")
    parser.add_argument("--force", action="store_true", help="replace a corpus already in --out")
    add_threads_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")


# CorpusConfig's settings whose flag is not the setting's own name with dashes
FLAGS = {"self_prompts_per_topic": "--questions-per-topic", "self_requests_per_kind": "--requests-per-kind",
         "text_paths": "--text", "temperatures": "--temperatures", "sources": "--sources"}  # fmt: skip


def config_from(args: argparse.Namespace):
    """The corpus settings of the command line, checked; a refusal names the flag, not the setting."""
    try:
        return _config(args)
    except ValueError as err:
        message = str(err)
        setting = message.split(" ", 1)[0]
        if setting in FLAGS or setting.replace("_", "-") != setting or hasattr(args, setting):
            flag = FLAGS.get(setting, f"--{setting.replace('_', '-')}")
            raise ValueError(flag + message[len(setting) :]) from None
        raise


def _config(args: argparse.Namespace):
    from executor.corpus import CorpusConfig

    return CorpusConfig(
        sources=tuple(s.strip() for s in args.sources.split(",") if s.strip()), seed=args.seed, split=args.split,
        held_out_fraction=args.held_out_fraction, prompts=args.prompts, max_prompts=args.max_prompts,
        temperatures=args.temperatures, samples=args.samples, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, self_prompts_per_topic=args.questions_per_topic,
        self_requests_per_kind=args.requests_per_kind, text_paths=tuple(args.text),
        python_env=args.python_env, window=args.window, max_tokens_per_source=args.max_tokens_per_source,
        shard_records=args.shard_records, capture=args.capture,
    )  # fmt: skip


GENERATED = ("self", "self-prompts", "self-requests")  # the sources the model writes
# flag, argument, its default, the sources that read it: a value other than the default that no source given reads is
# a mistake (the run would start, for minutes, and ignore it)
SOURCE_FLAGS = (
    ("--prompts", "prompts", "builtin", ("self", "self-requests")),
    ("--questions-per-topic", "questions_per_topic", 2, ("self-prompts",)),
    ("--requests-per-kind", "requests_per_kind", 32, ("self-requests",)),
    ("--text", "text", [], ("text",)),
    ("--python-env", "python_env", "stdlib", ("python-env",)),
    ("--window", "window", 256, ("text", "python-env")),
    ("--temperatures", "temperatures", (0.0, 0.7, 1.0), GENERATED),
    ("--samples", "samples", 2, GENERATED),
    ("--max-new-tokens", "max_new_tokens", 128, GENERATED),
    ("--time-budget-s", "time_budget_s", None, GENERATED),
)


def check_source_flags(args: argparse.Namespace, sources: tuple[str, ...]) -> None:
    """Refuse a flag set for sources none of `sources` is (`SOURCE_FLAGS`)."""
    for flag, name, default, readers in SOURCE_FLAGS:
        if getattr(args, name) != default and not set(readers) & set(sources):
            raise ValueError(f"{flag} is for --sources {' or '.join(readers)}, got --sources {','.join(sources)}")


def check_inputs(config) -> None:
    """Before the model loads: the prompt set the generated sources read and the text sources' paths exist (the
    builders' own readers, which would refuse them only after the model had loaded)."""
    from executor.corpus import text_files
    from executor.prompts import load_prompts

    if {"self", "self-requests"} & set(config.sources):
        load_prompts(config.prompts)
    for path in config.text_paths:
        text_files(Path(path))


def run(args: argparse.Namespace) -> int:
    config = config_from(args)  # checks the settings before the model loads
    check_source_flags(args, config.sources)
    check_inputs(config)
    check_output("--out", args.out, folder=True)
    if args.time_budget_s is not None and args.time_budget_s <= 0:
        raise ValueError(f"--time-budget-s must be > 0, got {args.time_budget_s}")
    import time

    from executor.corpus import build_corpus
    from executor.models import load_model, load_tokenizer, resolve_dtype

    device = check_device(args.device)
    print(f"corpus: {args.model} on {device} ({args.dtype}); {use_threads(args.threads)}", flush=True)
    model = load_model(args.model, dtype=resolve_dtype(args.dtype), device=device)
    tokenizer = load_tokenizer(args.model)
    begin = time.perf_counter()
    plain = (str, int, float, list, tuple, type(None))  # what JSON holds: not the parser's own callables
    arguments = {key: value for key, value in vars(args).items() if isinstance(value, plain)}
    manifest = build_corpus(model, tokenizer, config, args.out, model_name=str(args.model), arguments=arguments,
                            force=args.force, progress=not args.no_progress,
                            time_budget_s=args.time_budget_s)  # fmt: skip
    elapsed = time.perf_counter() - begin
    for name, count in manifest["sources"].items():
        print(f"  {name}: {count['records']} records, {count['tokens']} tokens ({count['targets']} targets), "
              f"{count['duplicates']} duplicates dropped")  # fmt: skip
    totals = manifest["totals"]
    print(f"wrote {args.out}: {totals['records']} records, {totals['tokens']} tokens in {len(manifest['shards'])} "
          f"shards in {elapsed:.0f} s ({totals['targets'] / max(elapsed, 1e-9):.1f} target tokens/s: generated ones "
          f"for self sources)" + (" - cut at the time budget" if manifest["cut_by_time_budget"] else ""))  # fmt: skip
    return 0
