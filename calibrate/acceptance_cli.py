"""`eesd calibrate acceptance`: arguments -> prompts -> traces -> check -> `eesd.acceptance_trace` file."""

from __future__ import annotations

import argparse
import time

import torch

from calibrate.acceptance import (
    agreement_by_layer,
    check_exit_layers,
    check_traces,
    trace_prompts,
    trace_records,
)
from calibrate.common import (
    base_metadata,
    check_device,
    check_dtype,
    check_output_file,
    device_name,
    load,
    parse_int_list,
)
from executor.adapter import ModelAdapter
from sim.formats import write_acceptance_trace
from sim.progress import progress_bar


def encoded_prompts(args: argparse.Namespace) -> list[tuple[str, list[int]]]:
    from executor.models import load_tokenizer
    from executor.prompts import encode_prompt, load_prompts, split_prompts

    prompts = load_prompts(args.prompts)
    if args.split != "all":
        split = split_prompts(prompts)
        prompts = list(split.train if args.split == "train" else split.held_out)
    if args.num_prompts is not None:
        if args.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
        prompts = prompts[: args.num_prompts]
    if args.max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
    tokenizer = load_tokenizer(args.model)
    return [(p.id, encode_prompt(tokenizer, p.text)[-args.max_prompt_tokens :]) for p in prompts]


def check_numbers(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 2:
        raise ValueError(f"--max-new-tokens must be >= 2 (token 0 comes from prefill), got {args.max_new_tokens}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.check_prompts < 0 or args.check_draft_len < 1:
        raise ValueError(
            f"need --check-prompts >= 0 and --check-draft-len >= 1, got {args.check_prompts}, {args.check_draft_len}"
        )


def check_mode(check: str, dtype: torch.dtype, draft_dtype: torch.dtype | None = None) -> str:
    """`--check auto`: strict in float32 / float64 (exact by construction), a report in bf16 / fp16 and for narrow
    drafts (whose teacher-forced pass reads the copies' K/V where a round's first draft reads the model's)."""
    if check not in ("auto", "strict", "report"):
        raise ValueError(f"--check must be auto, strict or report, got {check!r}")
    if check == "strict" and draft_dtype is not None:
        raise ValueError("--check strict: a trace of narrow drafts (--draft-dtype) is close, not exact; use report")
    if check != "auto":
        return check
    return "strict" if dtype in (torch.float32, torch.float64) and draft_dtype is None else "report"


def run_acceptance(args: argparse.Namespace, progress: bool) -> int:
    check_output_file(args.out, args.force)
    check_numbers(args)
    device, dtype = check_device(args.device), check_dtype(args.dtype)
    exit_layers = parse_int_list(args.exit_layers, "--exit-layers", minimum=1)
    print(f"calibrate acceptance: {args.model} on {device_name(device)} -> {args.out}", flush=True)
    loaded = load(args.model, dtype, device)
    adapter = ModelAdapter(loaded.model)
    exit_layers = check_exit_layers(exit_layers, adapter.num_layers)
    draft_dtype = _draft_dtype(args.draft_dtype, adapter.dtype)
    strict = check_mode(args.check, dtype, draft_dtype) == "strict"
    prompts = encoded_prompts(args)
    eos = _eos(loaded.model.generation_config.eos_token_id)
    begin = time.perf_counter()
    traces = []
    with progress_bar(len(prompts), "acceptance", "prompt", progress) as bar:
        for first in range(0, len(prompts), args.batch):
            chunk = prompts[first : first + args.batch]
            traces += trace_prompts(adapter, chunk, exit_layers, args.head, args.max_new_tokens, eos, draft_dtype)
            bar.update(len(chunk))
    trace_s = time.perf_counter() - begin
    report = check_traces(
        adapter, traces[: args.check_prompts], args.head, args.check_draft_len, args.max_new_tokens, eos, strict,
        draft_dtype,
    )  # fmt: skip
    metadata = {
        **base_metadata(args.model, device, dtype),
        "head": args.head,
        **({"draft_dtype": str(draft_dtype).removeprefix("torch.")} if draft_dtype is not None else {}),
        "prompts": args.prompts,
        "prompt_split": args.split,
        "num_prompts": len(traces),
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_tokens": args.max_prompt_tokens,
        "exit_layers": list(exit_layers),
        "num_layers": adapter.num_layers,
        "eos_token_ids": eos,
        "agreement": agreement_by_layer(traces),
        "teacher_forced_full_agreement": round(
            sum(t.full_agreement for t in traces) / max(1, sum(len(t.tokens) for t in traces)), 4
        ),
        "eesd_check": report.summary(),
        "trace_time_s": round(trace_s, 1),
    }
    path = write_acceptance_trace(args.out, metadata, trace_records(traces))
    print(f"agreement by exit layer: {metadata['agreement']}")
    print(report.describe())
    print(f"wrote {path} ({sum(len(t.tokens) for t in traces)} tokens, {time.perf_counter() - begin:.1f} s)")
    return 0


def _draft_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype | None:
    """`--draft-dtype` as the dtype drafts run in (None: the model's own); a wider one refused."""
    if name is None:
        return None
    from executor.draft_precision import draft_dtype_for

    dtype = check_dtype(name, "--draft-dtype")
    try:
        return draft_dtype_for(model_dtype, dtype)
    except ValueError as err:
        raise ValueError(f"--draft-dtype: {err}") from None


def _eos(eos) -> list[int]:
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
