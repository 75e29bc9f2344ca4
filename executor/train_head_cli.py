"""`eesd train-head`: self-distil a one-layer exit head for a model and write it as safetensors, or (with
`--vocab-subset N`) pick the N ids the model is most likely to emit, for a vocabulary-subset shared head.

    eesd train-head --model smollm2-135m --exit-layer 15 --prompts builtin --steps 300 --out heads/NAME.safetensors
    eesd train-head --model gemma3-270m --vocab-subset 16384 --prompts builtin --out heads/gemma3-v16k.safetensors

Only the training split of the prompt set (`executor.prompts.split_prompts`) is used, so held-out prompts stay
unseen by the head. `--resume` continues from `OUT.ckpt` (written every `--checkpoint-every` steps).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from statistics import fmean

from executor.runtime import add_threads_argument, check_device, flag_defaults, use_threads
from sim.formats import check_output, long_dtype

DTYPES = ("float32", "float64", "bfloat16", "float16")


def _layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        layers = ()
    if not layers:
        raise argparse.ArgumentTypeError(f"expected exit layers as comma-separated integers (e.g. 7,15), got {text!r}")
    return layers


# what only training reads (--vocab-subset refuses them given): argparse destinations
TRAINING_ONLY = (
    "corpus", "exit_layer", "resume", "head_kind", "init_layer", "time_budget_s", "steps", "lr", "batch_size",
    "window", "warmup_steps", "schedule", "save_dtype", "checkpoint_every", "hard_weight", "clip_norm", "eval_corpus",
    "eval_every", "draft_len",
)  # fmt: skip


def _outs(args: argparse.Namespace) -> list[str]:
    """The head files the run writes, one per --exit-layer (`executor.train_head.head_paths`)."""
    if not args.exit_layer:
        return [args.out]
    from executor.train_head import head_paths

    return [str(path) for path in head_paths(args.out, args.exit_layer).values()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local HF directory, a .gguf file, or a packaged model name")
    parser.add_argument(
        "--exit-layer",
        type=_layers,
        default=None,
        help="layers the draft runs before the head (required to train); several (8,15) train a head each on one "
        "teacher pass, --out then holding {exit_layer}",
    )
    parser.add_argument(
        "--vocab-subset", type=int, default=None, metavar="N",
        help="instead of training: rank the vocabulary by the model's own next-token probabilities on the prompts "
        "and write the N most likely ids as a subset head (any exit layer; use it as --head FILE)",
    )  # fmt: skip
    parser.add_argument(
        "--prompts", default="builtin", help="builtin | requests | humaneval | FILE.jsonl with a prompt field"
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    parser.add_argument("--out", required=True, help="output .safetensors file (e.g. heads/NAME.safetensors)")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default: 3e-4)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default: 64)")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N training prompts")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument(
        "--dtype",
        type=long_dtype,
        default="float32",
        help=f"model dtype, one of {', '.join(DTYPES)} (default: float32)",
    )
    parser.add_argument("--save-dtype", default="bfloat16", help="dtype of the written head (default: bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches and the head's init (default: 0)")
    parser.add_argument(
        "--corpus",
        default=None,
        nargs="+",
        metavar="DIR",
        help="distil from corpus directories (eesd corpus); several are mixed, their shards shuffled together",
    )
    parser.add_argument("--eval-corpus", default=None, metavar="DIR", help="held-out corpus scored into OUT.eval.csv")
    parser.add_argument(
        "--eval-every", type=int, default=None,
        help="steps between held-out evaluations of --eval-corpus (default: the start and the end of the run)",
    )  # fmt: skip
    parser.add_argument(
        "--schedule", default="cosine", choices=("cosine", "constant"), help="LR after the warmup (default cosine)"
    )
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup (default: 0)")
    parser.add_argument("--clip-norm", type=float, default=1.0, help="gradient clipping per head (0: off; default 1)")
    parser.add_argument("--window", type=int, default=512, help="tokens per training window (default: 512)")
    parser.add_argument(
        "--hard-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="add W x the cross-entropy of the full model's top token to the KL (default: 0, the KL alone)",
    )
    parser.add_argument("--draft-len", type=int, default=4, help="k of the evaluation's tokens/round (default: 4)")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default: 50)")
    parser.add_argument(
        "--head-kind", default=None, choices=("layer", "attention"),
        help="trained head: a decoder layer (default: layer) or its attention sublayer only (a light adapter)",
    )  # fmt: skip
    parser.add_argument(
        "--init-layer", default="exit", metavar="exit|last|N",
        help="the model layer a trained head's layer starts as: its exit layer (default), the last layer, or N",
    )  # fmt: skip
    parser.add_argument(
        "--init-head", default=None, nargs="+", metavar="FILE",
        help="start from these trained head files (one per exit layer; their exit layers and kind are the run's) "
        "instead of a model layer: --corpus continues training them; --steps 0 writes them unchanged, over "
        "--draft-vocab's ids if given (a draft vocabulary for a trained head, no training)",
    )  # fmt: skip
    parser.add_argument(
        "--draft-vocab", default=None, metavar="FILE",
        help="train the head over the ids of this vocabulary-subset head file only (its LM head: their rows)",
    )  # fmt: skip
    parser.add_argument(
        "--time-budget-s", type=float, default=None, metavar="S",
        help="with --corpus: fit the run in S seconds of training: a cosine schedule is shortened to end in time "
        "(from the speed of its first steps; the head's metadata gives steps as run and as asked, and --resume then "
        "needs that --steps), and any run stops after the step that ends past S, its heads written as they stand",
    )  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue from OUT.ckpt if it exists")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    add_threads_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "max_new_tokens", "checkpoint_every"):
        least = 0 if name == "steps" and args.init_head else 1  # --steps 0: --init-head's heads written unchanged
        if getattr(args, name) < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if args.init_head is not None:
        if args.vocab_subset is not None:
            raise ValueError("--init-head starts trained heads; --vocab-subset makes a subset head (give one of them)")
        if args.steps > 0 and args.corpus is None:
            raise ValueError("--init-head trains on with --corpus (or give --steps 0 to write the heads unchanged)")
        if args.steps == 0 and (args.corpus is not None or args.resume):
            raise ValueError("--steps 0 writes the --init-head heads unchanged: --corpus and --resume do not apply")
    if args.exit_layer is not None and len(set(args.exit_layer)) != len(args.exit_layer):
        given = ",".join(map(str, args.exit_layer))
        raise ValueError(f"--exit-layer {given}: an exit layer given twice (each trains one head)")
    if not 0 < args.lr < float("inf"):  # (nan too)
        raise ValueError(f"--lr must be a number > 0, got {args.lr}")
    for name in ("clip_norm", "hard_weight", "warmup_steps"):
        value = getattr(args, name)
        if not (value >= 0 and math.isfinite(value)):  # a negative clip norm would flip the gradients; nan: no check
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0 (0: off), got {value}")
    for name in ("window", "draft_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    _check_subset(args)
    _check_eval(args)
    if args.init_layer not in ("exit", "last") and not args.init_layer.isdigit():
        raise ValueError(f"--init-layer must be exit, last or a layer number, got {args.init_layer!r}")
    if args.vocab_subset is None and args.exit_layer is None and args.init_head is None:
        raise ValueError("--exit-layer is required to train a head (or give --vocab-subset N for a subset head)")
    if args.time_budget_s is not None and (args.corpus is None or not 0 < args.time_budget_s < float("inf")):
        raise ValueError(f"--time-budget-s needs --corpus and a value > 0, got {args.time_budget_s}")
    if args.eval_corpus is not None and args.corpus is None:
        raise ValueError("--eval-corpus needs --corpus (the held-out corpus scores heads trained from a corpus)")
    if args.exit_layer is not None and len(args.exit_layer) > 1 and "{exit_layer}" not in args.out:
        raise ValueError(f"several exit layers need --out with {{exit_layer}} in it, got {args.out!r}")
    if args.vocab_subset is not None and args.draft_vocab is not None:
        raise ValueError("--draft-vocab is for a trained head; --vocab-subset makes a subset head (give one of them)")
    if args.vocab_subset is not None and args.vocab_subset < 1:
        raise ValueError(f"--vocab-subset must be >= 1, got {args.vocab_subset}")
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must end in .safetensors, got {args.out!r}")
    _check_outs(args)
    if args.vocab_subset is None and args.init_head is None:
        _check_checkpoint(args)


def _check_eval(args: argparse.Namespace) -> None:
    """--eval-every with --eval-corpus: without it a held-out corpus would score nothing (default: the start and the
    end of the run); --eval-every needs one."""
    if args.eval_every is None:
        args.eval_every = max(args.steps, 1) if args.eval_corpus is not None else 0
    elif args.eval_every < 0 or (args.eval_every > 0) != (args.eval_corpus is not None):
        raise ValueError(
            f"--eval-every {args.eval_every}: held-out evaluations need --eval-corpus and N >= 1 steps between them "
            "(without --eval-every, an --eval-corpus scores the heads at the start and the end)"
        )


def _check_subset(args: argparse.Namespace) -> None:
    """--vocab-subset ranks the vocabulary on --prompts: a training flag it would ignore is refused."""
    if args.vocab_subset is None:
        return
    defaults = flag_defaults(add_arguments)
    given = ["--" + name.replace("_", "-") for name in TRAINING_ONLY if getattr(args, name) != defaults[name]]
    if given:
        raise ValueError(f"{', '.join(given)}: for training a head; --vocab-subset ranks the vocabulary on --prompts "
                         "(no training)")  # fmt: skip


def _check_checkpoint(args: argparse.Namespace) -> None:
    """An interrupted run's checkpoint is not overwritten by a fresh run without --force; --resume without one says
    it starts from the beginning."""
    from executor.train_head import checkpoint_path, head_paths

    checkpoint = checkpoint_path(head_paths(args.out, args.exit_layer)[min(args.exit_layer)])  # as the run names it
    if checkpoint.is_file() and not args.resume and not args.force:
        raise ValueError(f"{checkpoint} holds an earlier run's state (an interrupted run's, or a finished one's): "
                         "--resume continues it, --force starts over (it is then overwritten)")  # fmt: skip
    if args.resume and not checkpoint.is_file():
        print(f"train-head: note: --resume: no checkpoint at {checkpoint}; training from the start", file=sys.stderr)


def _check_outs(args: argparse.Namespace) -> None:
    for out in _outs(args):
        check_output("--out", out, force=args.force)


def run(args: argparse.Namespace) -> int:
    _check(args)
    import torch

    from executor.models import load_model, load_tokenizer, resolve_dtype
    from executor.prompts import encode_prompt, load_prompts, split_prompts
    from executor.train_head import train_head_corpus, train_head_file

    device = check_device(args.device)
    print(f"train-head: {args.model} on {device} ({args.dtype}); {use_threads(args.threads)}", flush=True)
    model = load_model(args.model, dtype=resolve_dtype(args.dtype), device=device)
    _check_layers(args, model)
    init_heads = _init_heads(args, model)
    config = None if args.vocab_subset is not None else _config(args)
    vocab = _draft_vocab(args.draft_vocab, model)
    if init_heads is not None and args.steps == 0:
        return _write_unchanged(args, init_heads, vocab)
    if config is not None and args.init_head is not None:  # (without --init-head: checked before the model loads)
        _check_checkpoint(args)
    if args.corpus is not None and config is not None:
        _note_held_out(args.corpus)
        info = {"model": str(args.model), "model_dtype": args.dtype, **_vocab_info(args), **_init_info(args)}
        torch.manual_seed(args.seed)
        heads, state = train_head_corpus(
            model, args.corpus, config, args.out, eval_corpus=args.eval_corpus, resume=args.resume,
            save_dtype=resolve_dtype(args.save_dtype), run_info=info, progress=not args.no_progress,
            draft_vocab=vocab, time_budget_s=args.time_budget_s, init_heads=init_heads,
        )  # fmt: skip
        return _report(args, state)
    tokenizer = load_tokenizer(args.model)
    train_prompts = split_prompts(load_prompts(args.prompts)).train[: args.max_prompts]
    prompt_ids = [encode_prompt(tokenizer, p.text) for p in train_prompts]
    info = {"model": str(args.model), "prompts": str(args.prompts), "split": "train", "model_dtype": args.dtype}
    if args.vocab_subset is not None:
        return _subset(args, model, prompt_ids, info)
    torch.manual_seed(args.seed)
    head, state = train_head_file(
        model, prompt_ids, config, args.out, max_new_tokens=args.max_new_tokens, resume=args.resume,
        save_dtype=resolve_dtype(args.save_dtype), run_info=info | _vocab_info(args), progress=not args.no_progress,
        draft_vocab=vocab,
    )  # fmt: skip
    return _report(args, state)


def _note_held_out(corpora: list[str]) -> None:
    """A training corpus built from held-out prompts (`eesd corpus --split held-out`) is used, and said so: a head
    trained on it has seen what a held-out evaluation scores."""
    from executor.corpus import read_manifest

    for corpus in corpora:
        try:
            split = read_manifest(Path(corpus)).get("split")
        except (OSError, ValueError):
            continue  # the corpus reader names the problem
        if split == "held-out":
            print(f"train-head: note: --corpus {corpus} was built from held-out prompts (its manifest's split); a head "
                  "trained on it has seen what a held-out evaluation scores", file=sys.stderr)  # fmt: skip


def _check_layers(args: argparse.Namespace, model) -> None:
    """--exit-layer and --init-layer against the model's layers, before any teacher pass or corpus generation."""
    from executor.adapter import ModelAdapter

    layers = ModelAdapter(model).num_layers
    for exit_layer in args.exit_layer or ():
        if not 1 <= exit_layer < layers:
            raise ValueError(f"--exit-layer must be in [1, {layers - 1}] for {args.model} ({layers} layers), got "
                             f"{exit_layer}")  # fmt: skip
    if args.init_layer.isdigit() and int(args.init_layer) >= layers:
        raise ValueError(f"--init-layer must be in [0, {layers - 1}] for {args.model}, got {args.init_layer}")


def _init_heads(args: argparse.Namespace, model):
    """The --init-head files' heads by exit layer (None without it); they set --exit-layer and --head-kind, which,
    if given too, must agree."""
    if args.init_head is None:
        return None
    from executor.heads import TrainedExitHead, load_head

    heads = {}
    for path in args.init_head:
        head = load_head(path, model)
        if not isinstance(head, TrainedExitHead):
            raise ValueError(f"--init-head {path}: a vocabulary-subset head has no weights to start from")
        if head.exit_layer in heads:
            raise ValueError(f"--init-head {path}: a second head for exit layer {head.exit_layer}")
        heads[head.exit_layer] = head
    layers, kinds = tuple(sorted(heads)), {head.kind for head in heads.values()}
    if args.exit_layer is not None and tuple(sorted(args.exit_layer)) != layers:
        raise ValueError(f"--init-head heads are for exit layers {list(layers)}, --exit-layer gives "
                         f"{list(args.exit_layer)}")  # fmt: skip
    if len(kinds) > 1 or (args.head_kind is not None and {args.head_kind} != kinds):
        raise ValueError(f"--init-head heads are of kind {', '.join(sorted(kinds))}; one kind per run"
                         + (f", and --head-kind says {args.head_kind}" if args.head_kind else ""))  # fmt: skip
    args.exit_layer, args.head_kind = layers, kinds.pop()
    if len(layers) > 1 and "{exit_layer}" not in args.out:
        raise ValueError(f"several exit layers need --out with {{exit_layer}} in it, got {args.out!r}")
    _check_outs(args)
    return heads


def _init_info(args: argparse.Namespace) -> dict[str, str]:
    return {} if args.init_head is None else {"init_head_files": ",".join(map(str, args.init_head))}


def _write_unchanged(args: argparse.Namespace, heads: dict, vocab) -> int:
    """--steps 0: each --init-head head as it is, over --draft-vocab's ids (or the whole vocabulary), written to its
    --out with the source file's metadata and where it came from."""
    from executor.heads import retargeted, save_head
    from executor.models import resolve_dtype

    for out, (exit_layer, head) in zip(_outs(args), sorted(heads.items()), strict=True):
        copy = retargeted(head, vocab)
        info = {k: v for k, v in head.metadata.items() if k != "checksum" and not k.startswith("draft_vocab")}
        info |= {"init_head_files": ",".join(map(str, args.init_head)), "steps_after_init": "0", **_vocab_info(args)}
        save_head(copy, out, dtype=resolve_dtype(args.save_dtype), info=info)
        size = "the whole vocabulary" if copy.draft_vocab is None else f"{copy.draft_vocab} ids"
        print(f"wrote {out}: the exit layer {exit_layer} head of {head.metadata.get('model', args.model)}, "
              f"unchanged, drafting over {size}")  # fmt: skip
    return 0


def _config(args: argparse.Namespace):
    from executor.train_head import TrainConfig

    return TrainConfig(
        exit_layer=args.exit_layer[0], exit_layers=args.exit_layer[1:], steps=max(args.steps, 1), lr=args.lr,
        batch_size=args.batch_size, seed=args.seed, checkpoint_every=args.checkpoint_every, schedule=args.schedule,
        warmup_steps=args.warmup_steps, clip_norm=args.clip_norm or None, window=args.window,
        eval_every=args.eval_every, draft_len=args.draft_len, head_kind=args.head_kind or "layer",
        init_layer=args.init_layer,
        hard_weight=args.hard_weight,
    )  # fmt: skip


def _draft_vocab(path: str | None, model):
    """The ranked ids of the vocabulary-subset head file `path` (None: the whole vocabulary)."""
    if path is None:
        return None
    from executor.heads import SubsetExitHead, load_head

    head = load_head(path, model)
    if not isinstance(head, SubsetExitHead):
        raise ValueError(f"--draft-vocab {path}: not a vocabulary-subset head file (eesd train-head --vocab-subset N)")
    return head.ranking


def _vocab_info(args: argparse.Namespace) -> dict[str, str]:
    return {} if args.draft_vocab is None else {"draft_vocab_file": str(args.draft_vocab)}


def _report(args: argparse.Namespace, state) -> int:
    first10 = state.losses[:10]  # the first and the last ten steps' means, as the head's metadata records them
    first, last = fmean(first10), fmean(state.losses[-10:])
    layers = ",".join(map(str, args.exit_layer))
    steps = f"{state.step} steps" + (f" (of {args.steps}: the time budget)" if state.step < args.steps else "")
    print(f"wrote {', '.join(_outs(args))}: exit layer {layers}, {steps}, {state.tokens_seen} tokens, "
          f"KL {first:.3f} -> {last:.3f} (means of the first and last 10 steps"
          + (", the heads' mean)" if len(args.exit_layer) > 1 else ")"))  # fmt: skip
    for exit_layer in args.exit_layer if len(args.exit_layer) > 1 or state.evals else ():
        losses = state.head_losses.get(exit_layer, [])
        evals = [row for row in state.evals if row["exit_layer"] == exit_layer]
        kl = f"KL {fmean(losses[:10]):.3f} -> {fmean(losses[-10:]):.3f}" if losses else "no steps"
        held = (f", held-out agreement {evals[-1]['agreement']:.3f} ({evals[0]['agreement']:.3f} at step "
                f"{evals[0]['step']}), tokens/round {evals[-1]['tokens_per_round']:.2f}") if evals else ""  # fmt: skip
        print(f"  exit layer {exit_layer}: {kl}{held}")
    if len(state.losses) >= 20 and last > 1.5 * first:
        print(f"train-head: note: the KL rose ({first:.3f} -> {last:.3f}): training diverged; try a lower --lr (it "
              f"was {args.lr:g})", file=sys.stderr)  # fmt: skip
    return 0


def _subset(args: argparse.Namespace, model, prompt_ids: list[list[int]], info: dict[str, str]) -> int:
    from executor.train_head import subset_head_file

    vocab = model.get_output_embeddings().weight.shape[0]
    if args.vocab_subset > vocab:
        raise ValueError(f"--vocab-subset must be <= {vocab} (the model's vocabulary), got {args.vocab_subset}")
    head = subset_head_file(model, prompt_ids, args.vocab_subset, args.out, max_new_tokens=args.max_new_tokens,
                            run_info=info, progress=not args.no_progress)  # fmt: skip
    print(
        f"wrote {args.out}: {args.vocab_subset} of {vocab} ids, {float(head.metadata['covered_mass']):.2%} of the "
        f"model's next-token probability over {head.metadata['positions']} generated positions"
    )
    return 0
