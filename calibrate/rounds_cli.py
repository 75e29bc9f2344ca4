"""`eesd calibrate rounds`: what an EESD round of k drafts costs against an AR step on this machine, as the policy
spec that `eesd generate --policy` and `generate(policy=...)` take (`executor.round_costs`).

    eesd calibrate rounds --model gemma3-270m --head heads/gemma3-270m-e14-v16k.safetensors --threads 1
    ...
    policy: beta-ts:costs=1.4102/1.8250/2.9531/...

With `--out FILE.json` the table is also written (atomically) with the machine, versions and settings it was
measured with (format `eesd.round_costs`, docs/formats.md).
"""

from __future__ import annotations

import argparse

from calibrate.common import base_metadata, check_dtype, check_json_out, model_and_head, model_layers


def run_rounds(args: argparse.Namespace) -> int:
    from executor.passes import resolve_capture
    from executor.round_costs import measure_round_costs, rounds_chained, write_round_costs

    for flag, value, least in (("--max-draft-len", args.max_draft_len, 1), ("--context", args.context, 1),
                               ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0)):  # fmt: skip
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    check_json_out(args.out, args.force)
    layers = model_layers(args.model) if args.exit_layer is not None else None
    if layers is not None and not 1 <= args.exit_layer < layers:  # before the model loads
        raise ValueError(f"--exit-layer must be in [1, {layers - 1}] for {args.model}'s {layers} layers, got "
                         f"{args.exit_layer}")  # fmt: skip
    device, dtype, model, head, exit_layer = model_and_head(args)
    draft_dtype = None if args.draft_dtype is None else check_dtype(args.draft_dtype, "--draft-dtype")
    positions, room = model.max_positions, rounds_chained(args.capture, device) + 2
    if args.context + args.max_draft_len + room > positions:
        raise ValueError(
            f"--context {args.context} + --max-draft-len {args.max_draft_len} + {room} reach past {args.model}'s "
            f"{positions} positions"
        )
    print(f"calibrate rounds: {args.model} E={exit_layer} head {args.head} on {device}, context {args.context}")
    measured = measure_round_costs(
        model, exit_layer, head, args.max_draft_len, capture=args.capture, context=args.context,
        repeats=args.repeats, warmups=args.warmup, draft_dtype=draft_dtype,
    )  # fmt: skip
    print(f"{'drafts':>6} {'ms (median)':>12} {'min .. max':>18} {'cost (AR steps)':>16}")
    for k, (ms, (low, high), cost) in enumerate(zip(measured.ms, measured.spread, measured.costs, strict=True)):
        print(f"{k:>6} {ms:>12.3f} {f'{low:.3f} .. {high:.3f}':>18} {cost:>16.4f}")
    print(f"policy: {measured.spec()}")
    if args.out is not None:
        capture = resolve_capture(args.capture, device, "greedy")  # what ran (auto resolved), as calibrate host records
        settings = {"head": args.head, "exit_layer": exit_layer, "capture": capture, "repeats": args.repeats}
        settings |= {"draft_dtype": str(draft_dtype).removeprefix("torch.")} if draft_dtype is not None else {}
        write_round_costs(args.out, base_metadata(args.model, device, dtype) | settings, measured)
        print(f"wrote {args.out}")
    return 0
