"""`eesd generate`: decode a prompt with AR, EESD or PPSD, print the text and the run's stats.

The run's header (model, device, torch threads) goes to stderr, so that stdout is the text and the stats line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from executor.runtime import (
    add_threads_argument,
    check_device,
    flag_defaults,
    parse_boundaries,
    stage_count,
    use_threads,
)
from sim.formats import long_dtype

DTYPES = ("float32", "float64", "bfloat16", "float16")
METHODS = ("ar", "eesd", "ppsd")
# flag, argument, the methods that use it: a value other than the flag's default with another method is refused (it
# would be ignored)
METHOD_FLAGS = (
    ("--stages", "stages", ("ppsd",)),
    ("--stage-boundaries", "stage_boundaries", ("ppsd",)),
    ("--backend", "backend", ("ppsd",)),
    ("--stall-timeout", "stall_timeout", ("ppsd",)),
    ("--policy", "policy", ("eesd",)),
    ("--draft-len", "draft_len", ("eesd",)),
    ("--exit-layer", "exit_layer", ("eesd", "ppsd")),
    ("--head", "head", ("eesd", "ppsd")),
)
# flag, argument: a value other than the flag's default without --do-sample is refused (greedy decoding ignores it)
SAMPLING_FLAGS = (
    ("--sampling", "sampling"),
    ("--temperature", "temperature"),
    ("--top-k", "top_k"),
    ("--top-p", "top_p"),
    ("--min-p", "min_p"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local HF directory, a .gguf file, or a packaged model name")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (tokenized with the model's tokenizer); "
                        "again for a batch, decoded together (left-padded; PPSD's rows in lockstep)")  # fmt: skip
    source.add_argument("--prompt-ids", action="append", help="prompt as comma-separated token ids (no tokenizer "
                        "needed); again for a batch")  # fmt: skip
    parser.add_argument("--method", default="eesd", help="ar | eesd | ppsd (default: eesd)")
    parser.add_argument(
        "--stages", type=int, default=None, help="ppsd: pipeline stages (default: 2, or what --stage-boundaries cut)"
    )
    parser.add_argument(
        "--stage-boundaries", default=None,
        help="ppsd: layer cut points, e.g. 3,6 (3 stages), or every bound, e.g. 0,3,6,9 on 9 layers",
    )  # fmt: skip
    parser.add_argument(
        "--backend", default="sequential", help="ppsd: sequential | streams | distributed (default: sequential)"
    )
    parser.add_argument(
        "--exit-layer", type=int, default=None,
        help="layers the draft runs (default: L // 2; ppsd: the end of stage 1, which an exit past it moves there; an "
        "exit before it drafts inside stage 1)",
    )  # fmt: skip
    parser.add_argument("--draft-len", type=int, default=4, help="draft tokens per round (default: 4)")
    parser.add_argument(
        "--head",
        default="shared",
        help="exit head (EESD, PPSD): shared | shared:N | FILE (trained or vocab-subset; default: shared)",
    )
    parser.add_argument(
        "--policy",
        default=None,
        help="fixed:K | heuristic | confidence:TAU | beta-ts | calibration-ts (default: fixed:DRAFT_LEN)",
    )
    parser.add_argument(
        "--round-costs", type=Path, default=None, metavar="FILE",
        help="eesd: the round costs `eesd calibrate rounds --out FILE` measured, for --policy beta-ts (the default "
        "with it) or calibration-ts; its exit layer is the default --exit-layer",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument(
        "--sampling", default="exact", help="with --do-sample: exact (EESD == AR for a seed, default) | rejection"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="sample from the k most likely tokens (default and 0: off)"
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help="sample from the smallest set with mass >= p (default: off)"
    )
    parser.add_argument(
        "--min-p", type=float, default=None, help="drop tokens below min-p x the top probability (default: off)"
    )
    parser.add_argument(
        "--repetition-penalty", type=float, default=None,
        help="HF's repetition penalty (every method and backend)",
    )  # fmt: skip
    parser.add_argument(
        "--no-repeat-ngram-size", type=int, default=0, metavar="N",
        help="HF's no_repeat_ngram_size: never repeat an n-gram of N tokens (on the device, captured passes too; not "
        "with PPSD's distributed backend)",
    )  # fmt: skip
    parser.add_argument(
        "--stop", action="append", default=None, metavar="TEXT",
        help="end the output after the first token that completes TEXT (HF's stop strings; repeatable; a newline "
        "from bash: --stop $'\\n')",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed; greedy: the draft policies' random stream (default: 0)"
    )
    parser.add_argument(
        "--dtype", type=long_dtype, default="float32", help=f"one of {', '.join(DTYPES)} (default: float32)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument(
        "--draft-dtype", type=long_dtype, default=None,
        help=f"eesd: draft in this narrower dtype ({', '.join(DTYPES)}; e.g. bfloat16 for a float32 model): copies of "
        "the draft's layers and head, the verify pass runs all layers, output as without it",
    )  # fmt: skip
    parser.add_argument(
        "--no-verify-buckets", dest="verify_buckets", action="store_false",
        help="eesd with --capture freeze: one frozen verify pass per draft length, instead of one per bucket (powers "
        "of two up to the longest draft; rounds with fewer drafts pad to their bucket): more compilation and memory, "
        "no padded rounds",
    )  # fmt: skip
    add_threads_argument(parser)
    parser.add_argument(
        "--capture", default="auto",
        help="auto (compile-layers on a GPU with Triton, else graph; none on a CPU) | none | graph (CUDA graphs) | "
        "compile (torch.compile per pass) | compile-layers (the decoder layer compiled once, passes in CUDA graphs) | "
        "freeze (CPU: each pass compiled with the weights frozen in; minutes of compilation, a packed weight copy "
        "per pass, faster verify passes)",
    )  # fmt: skip
    parser.add_argument(
        "--sync-every", type=int, default=None,
        help="AR steps (PPSD: ticks) the device runs between two host reads (default: 8 captured, 1 otherwise)",
    )  # fmt: skip
    parser.add_argument(
        "--stall-timeout", type=float, default=None, metavar="SECONDS",
        help="ppsd distributed: a stage process silent this long (stopped or hung) stops the run, naming it "
        "(default: 30, at least 0.25; a healthy run has no time limit)",
    )  # fmt: skip
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument(
        "--compare-ar", action="store_true", help="also run AR and check the outputs are equal (greedy, exact sampling)"
    )
    parser.add_argument(
        "--warmup", type=int, default=0, metavar="N",
        help="N untimed calls first (AR's too with --compare-ar), so that tok/s is a warm call's: a run's first call "
        "pays its one-off costs, capturing or compiling its passes (default: 0)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no model loading bar")


def given_ids(text: str) -> list[int]:
    """`--prompt-ids`: at least one comma-separated integer (checked before the model is loaded)."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError(f"--prompt-ids holds no token id (got {text!r}): give comma-separated ids, e.g. 1,2,3")
    return ids


def check_flags(args: argparse.Namespace) -> None:
    """Before the model loads: a method this command runs, tokens to make, and no flag the run would ignore (one the
    method does not use, a sampling flag without --do-sample, --chat without --prompt) or contradict (--compare-ar of
    rejection sampling, whose tokens are AR's in distribution only)."""
    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    head = args.head
    if head is not None and head != "shared" and not head.startswith("shared:") and not os.path.isfile(head):
        what = "a directory" if os.path.isdir(head) else "no such file"
        raise ValueError(f"--head {head}: {what} (expected a .safetensors head file, or shared / shared:N)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0 (untimed calls before the timed one), got {args.warmup}")
    defaults = flag_defaults(add_arguments)
    for flag, name, methods in METHOD_FLAGS:
        if getattr(args, name) != defaults[name] and args.method not in methods:
            raise ValueError(f"{flag} is for --method {' or '.join(methods)}, got --method {args.method}")
    for flag, name in SAMPLING_FLAGS:
        if getattr(args, name) != defaults[name] and not args.do_sample:
            given = f"{flag} {getattr(args, name)}"
            raise ValueError(f"{given} is for sampling: add --do-sample, or drop it (decoding is greedy without it)")
    if args.policy is not None and args.draft_len != defaults["draft_len"]:
        raise ValueError(f"--draft-len {args.draft_len} and --policy {args.policy}: the policy sets the draft length "
                         "(fixed:K drafts K); give one of them")  # fmt: skip
    if args.method == "ppsd":
        _check_pipeline_flags(args)
    if args.chat and not args.prompt:
        raise ValueError("--chat wraps --prompt's text in the chat template: drop it with --prompt-ids")
    if args.compare_ar and args.do_sample and args.sampling == "rejection":
        raise ValueError(
            "--compare-ar checks that the output is AR's, which --sampling rejection does not promise (AR's "
            "distribution, not its tokens): use --sampling exact, or drop --compare-ar"
        )
    _check_values(args)


def _check_values(args: argparse.Namespace) -> None:
    """The values `generate` itself would refuse only once the model has loaded (seconds later), refused by the same
    checks before it does: the sampling settings, --sync-every, --capture, --policy."""
    import random

    from executor.passes import CAPTURE_MODES, check_sync_every
    from executor.sampling import SamplingConfig
    from sim.policy import make_policy

    SamplingConfig(
        do_sample=args.do_sample, mode=args.sampling, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )  # fmt: skip
    check_sync_every(args.sync_every)
    if args.capture not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {', '.join(CAPTURE_MODES)}, got {args.capture!r}")
    if args.policy is not None and args.round_costs is None:  # with --round-costs, checked once pinned to its costs
        make_policy(args.policy, rng=random.Random(0), cost_ratio=0.5)  # any cost: the spec's own values are checked


def _check_pipeline_flags(args: argparse.Namespace) -> None:
    """PPSD's flags that need no model: a backend there is, at least two stages, and what only one backend reads."""
    from executor.ppsd import BACKENDS

    if args.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    given, args.stages = args.stages, stage_count(args.stages, parse_boundaries(args.stage_boundaries))
    if args.stages < 2:
        flag = "--stages" if given is not None else f"--stage-boundaries {args.stage_boundaries} (cut points)"
        raise ValueError(f"{flag} must make at least 2 stages (a pipeline of stages), got {args.stages}")
    if args.stall_timeout is not None and args.backend != "distributed":
        raise ValueError(f"--stall-timeout is for --backend distributed (its stage processes), got --backend "
                         f"{args.backend}")  # fmt: skip
    if args.backend == "distributed" and args.stop:
        raise ValueError("--stop is not supported with --backend distributed (its last stage decides when to stop): "
                         "use --backend sequential")  # fmt: skip


def _tokenized(args: argparse.Namespace, tokenizer, prompt: str) -> list[int]:
    """A `--prompt`'s ids, through the model's tokenizer (and its chat template with `--chat`)."""
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer: pass --prompt-ids instead of --prompt")
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"model {args.model!r} has no chat template: drop --chat")
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ValueError(f"--prompt {prompt!r} tokenizes to no token: give some text")
    return ids


def _row_length(tokens: list[int], eos: int | list[int] | None, pad: int) -> int:
    """A batch row's own new tokens: up to its first EOS, else without the pads a stop left after it (as HF lays a
    finished row out: its EOS, then pads)."""
    ends = [eos] if isinstance(eos, int) else list(eos or [])
    for index, token in enumerate(tokens):
        if token in ends:
            return index + 1
    length = len(tokens)
    if not ends:  # without EOS ids no row is padded (each runs to the last row's end)
        return length
    while length and tokens[length - 1] == pad:
        length -= 1
    return length


def _stops(args: argparse.Namespace, tokenizer) -> list | None:
    """`--stop`'s stop strings as HF's criterion (it needs the tokenizer to know which tokens complete them)."""
    if not args.stop:
        return None
    if tokenizer is None:
        raise ValueError(f"--stop needs the model's tokenizer and {args.model!r} has none: drop --stop")
    if any(not text for text in args.stop):
        raise ValueError("--stop takes a non-empty text")
    from transformers.generation.stopping_criteria import StopStringCriteria

    return [StopStringCriteria(tokenizer=tokenizer, stop_strings=args.stop)]


def _with_round_costs(args: argparse.Namespace) -> tuple[str | None, int | None]:
    """(--policy, --exit-layer) with `--round-costs` applied: the file's costs pinned into a Thompson-sampling
    policy's spec (beta-ts when no --policy is given) and its exit layer the default; a ValueError for a file measured
    at another exit layer or with another head, or a policy that weighs no costs or brings its own."""
    if args.round_costs is None:
        return args.policy, args.exit_layer
    from executor.round_costs import read_round_costs
    from sim.policy import parse_policy_spec, with_cost

    try:
        costs, metadata = read_round_costs(args.round_costs)
    except ValueError as err:  # it names the file and the field
        raise ValueError(f"--round-costs {err}") from None
    _check_round_costs_model(args.round_costs, str(metadata.get("model", "")), args.model)
    policy = args.policy or "beta-ts"
    name, given = parse_policy_spec(policy)
    if args.method != "eesd" or name not in ("beta-ts", "calibration-ts") or "cost" in given or "costs" in given:
        raise ValueError(
            f"--round-costs is for --method eesd with --policy beta-ts or calibration-ts and no cost of its own, got "
            f"--method {args.method} --policy {policy}"
        )
    measured_at = metadata["exit_layer"]
    if args.exit_layer not in (None, measured_at):
        raise ValueError(
            f"--round-costs {args.round_costs} was measured at exit layer {measured_at}, not {args.exit_layer}"
        )
    head = str(metadata.get("head", "shared"))
    if _head_name(head) != _head_name(args.head):
        raise ValueError(f"--round-costs {args.round_costs} was measured with head {head}, not {args.head}")
    drafts = metadata.get("draft_dtype")
    if _dtype_name(drafts) != _dtype_name(args.draft_dtype):
        raise ValueError(
            f"--round-costs {args.round_costs} was measured with drafts in {drafts or 'the model dtype'}, not in "
            f"{args.draft_dtype or 'the model dtype'} (--draft-dtype)"
        )
    return with_cost(policy, 1.0, costs), measured_at


def _check_round_costs_model(path: Path, measured: str, model: str) -> None:
    """The round costs were measured with `--model`'s model, where both name one the simulator knows (a path and a
    name, or two paths, cannot be told apart without loading them: not compared)."""
    from sim.models import named_model

    ours, theirs = named_model(model), named_model(measured)
    if ours is not None and theirs is not None and ours.name != theirs.name:
        raise ValueError(
            f"--round-costs {path}: metadata.model: measured with {measured} ({theirs.name}), not --model {model} "
            f"({ours.name}); measure this model's: eesd calibrate rounds --model {model} --out FILE"
        )


def _dtype_name(name: str | None) -> str | None:
    from executor.models import resolve_dtype

    return None if name is None else str(resolve_dtype(name)).removeprefix("torch.")


def _head_name(head: str) -> str:
    """A head as a file measured with it names it: `shared`, `shared:N`, or a head file's name (its folder may be
    given another way)."""
    return head if head == "shared" or head.startswith("shared:") else Path(head).name


def _optional_tokenizer(model: str, load_tokenizer):
    """With --prompt-ids a tokenizer only decodes the output: a model without one prints token ids."""
    try:
        return load_tokenizer(model)
    except (OSError, ValueError):
        return None


def _warm(call, warmup: int):
    """`call()`'s result after `warmup` untimed calls (they capture or compile the passes the timed one reuses)."""
    for _ in range(warmup):
        call()
    return call()


def run(args: argparse.Namespace) -> int:
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.draft_dtype is not None and args.draft_dtype not in DTYPES:
        raise ValueError(f"--draft-dtype must be one of {', '.join(DTYPES)}, got {args.draft_dtype!r}")
    if args.draft_dtype is not None and args.method != "eesd":
        raise ValueError(f"--draft-dtype is for --method eesd, got --method {args.method}")
    if not args.verify_buckets and (args.method != "eesd" or args.capture != "freeze"):
        raise ValueError(
            f"--no-verify-buckets is for --method eesd with --capture freeze (frozen verify passes), got --method "
            f"{args.method} --capture {args.capture}"
        )
    check_flags(args)
    import torch

    from executor.api import generate
    from executor.models import load_model, load_tokenizer
    from executor.ppsd_dist import PPSDWorkerError
    from executor.prompts import left_padded

    given = [given_ids(text) for text in args.prompt_ids] if args.prompt_ids is not None else None
    policy, exit_layer = _with_round_costs(args)
    device = check_device(args.device)
    threads = use_threads(args.threads)
    tokenizer = _optional_tokenizer(args.model, load_tokenizer) if given else load_tokenizer(args.model)
    print(f"generate: {args.model}, {args.method}, {device} ({args.dtype}); {threads}", file=sys.stderr)
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    prompts = given or [_tokenized(args, tokenizer, text) for text in args.prompt]
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    pad = pad if isinstance(pad, int) else (eos if isinstance(eos, int) else (eos or [0])[0])
    prompt, mask = left_padded(prompts, pad)
    common = dict(
        max_new_tokens=args.max_new_tokens, eos_token_id=eos, do_sample=args.do_sample, sampling=args.sampling,
        attention_mask=mask, pad_token_id=pad,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        repetition_penalty=args.repetition_penalty, capture=args.capture, stopping_criteria=_stops(args, tokenizer),
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )  # fmt: skip
    stall = {} if args.stall_timeout is None else {"stall_timeout_s": args.stall_timeout}
    cuts = parse_boundaries(args.stage_boundaries)

    def call():
        return generate(
            model, prompt, method=args.method, exit_layer=exit_layer, draft_len=args.draft_len,
            policy=policy, head=args.head, stages=args.stages or 2, stage_boundaries=cuts, backend=args.backend,
            sync_every=args.sync_every, **stall, **common,
            **({"draft_dtype": args.draft_dtype} if args.draft_dtype else {}),
            **({} if args.verify_buckets else {"verify_buckets": False}),
        )  # fmt: skip

    try:
        result = _warm(call, args.warmup)
    except PPSDWorkerError as err:  # a stage process failed, died or stalled: one line naming it (not a usage error)
        if os.environ.get("EESD_DEBUG"):
            print(err.details, file=sys.stderr)
            raise
        print(f"eesd generate: error: {err}", file=sys.stderr)
        return 1
    for row, tokens in enumerate(result.sequences[:, len(prompt[0]) :].tolist()):
        if mask is not None:  # a finished row's pads dropped
            tokens = tokens[: _row_length(tokens, eos, pad)]
        text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else tokens
        print(text if mask is None else f"[row {row}] {text}")
    drafting = f"exit layer {result.exit_layer}" + (f" ({args.head})" if args.head else "")
    named = result.exit_layer is not None and args.method == "eesd"  # (PPSD's stats name their stages' layers)
    head = f"head {args.head}; " if args.head and args.method == "ppsd" else ""  # (and its exit layer)
    print((f"{drafting}; " if named else head) + result.stats.summary())
    if args.warmup == 0 and result.stats.capture != "none":
        print(f"(a first call: its time includes capturing its passes ({result.stats.capture}); --warmup 1 times a "
              "warm call)")  # fmt: skip
    if args.compare_ar:
        reference = _warm(lambda: generate(model, prompt, method="ar", **common), args.warmup)
        same = torch.equal(reference.sequences, result.sequences)
        narrow = not same and args.dtype in ("bfloat16", "float16")
        note = (f"; in {args.dtype} two top logits can tie or sit within rounding, and a pass over several positions "
                "rounds differently from one over one, so greedy text may part at a near-tie (docs/design.md); not "
                "a failure") if narrow else ""  # fmt: skip
        print(f"identical to AR: {same} (AR {reference.stats.tokens_per_s:.1f} tok/s{note})")
        return 0 if same or narrow else 1
    return 0
