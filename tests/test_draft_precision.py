"""Drafts in a narrower dtype than the model (`generate(..., draft_dtype=...)`, `executor.draft_precision`).

The output must stay AR's token for token (float64 models drafting in float32 or bfloat16: strict equality), the
draft steps must really run the narrow copies, the verify pass must run every layer over the round's tokens in the
model's dtype (the draft's KV entries are not the model's), and bad settings are refused with a clear message.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packages import requires_smollm2
from test_head_kinds import EXIT_LAYER, IDS, records, tiny, trained  # noqa: F401 (records, tiny, trained: fixtures)
from tiny_models import TinySpec, scale_late_layers, tiny_model, tiny_specs

import executor
from executor.adapter import ModelAdapter
from executor.api import generate
from executor.draft_precision import CastHead, draft_dtype_for
from executor.heads import SharedExitHead, draft_cost_ratio

PROMPT = [3, 5, 7, 11, 13]


def _agreeing(spec: TinySpec, exit_layer: int) -> torch.nn.Module:
    """A float64 tiny model whose layers from `exit_layer` on are nearly the identity: the shared head's drafts are
    mostly accepted, so rounds accept, reject and run to their end."""
    return scale_late_layers(tiny_model(spec, torch.float64), exit_layer, 0.05)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=tiny_specs(min_layers=2, max_layers=5),
    data=st.data(),
)
def test_narrow_drafts_equal_ar(spec: TinySpec, data) -> None:
    """Greedy and exact sampling, shared / subset heads, fixed and Thompson-sampling policies: AR's tokens."""
    exit_layer = data.draw(st.integers(1, spec.num_layers - 1), label="exit_layer")
    model = _agreeing(spec, exit_layer)
    prompt = data.draw(st.lists(st.integers(0, spec.vocab - 1), min_size=1, max_size=9), label="prompt")
    dtype = data.draw(st.sampled_from(["float32", "bfloat16"]), label="draft_dtype")
    head = data.draw(st.sampled_from([None, f"shared:{max(spec.vocab // 2, 1)}"]), label="head")
    policy = data.draw(st.sampled_from(["fixed:1", "fixed:3", "beta-ts"]), label="policy")
    sample = data.draw(st.booleans(), label="do_sample")
    common = dict(max_new_tokens=24, do_sample=sample, seed=7, temperature=0.8)
    ar = generate(model, prompt, method="ar", **common)
    eesd = generate(model, prompt, method="eesd", exit_layer=exit_layer, head=head, policy=policy,
                    draft_dtype=dtype, capture="none", **common)  # fmt: skip
    assert torch.equal(eesd.sequences, ar.sequences)


@pytest.mark.parametrize("name", IDS)
def test_narrow_drafts_with_trained_heads_equal_ar(name: str, tiny, trained) -> None:  # noqa: F811
    """Every trained head kind (decoder layer, attention adapter, over a draft vocabulary or not), batched with
    left padding: AR's tokens, and the heads' own KV kept by the narrow copy."""
    head = trained[name][0]
    prompts = torch.tensor([[0, 0, 4, 9, 1, 7], [5, 3, 8, 2, 6, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ar = generate(tiny, prompts, attention_mask=mask, method="ar", max_new_tokens=20)
    eesd = generate(tiny, prompts, attention_mask=mask, method="eesd", exit_layer=EXIT_LAYER, head=head,
                    draft_len=3, max_new_tokens=20, draft_dtype=torch.float32, capture="none")  # fmt: skip
    assert torch.equal(eesd.sequences, ar.sequences)
    assert sum(eesd.stats.drafted) > 0


def test_draft_steps_run_the_narrow_copies_and_verify_runs_every_layer(monkeypatch) -> None:
    """The draft's layers [0, E) run in float32 over one token; the verify pass runs layers [0, E) over the round's
    k + 1 tokens in the model's float64 (a verify pass that reused the draft's KV would run them over one token)."""
    model = _agreeing(TinySpec(num_layers=4, seed=3), 2)
    calls: list[tuple[int, int, int, torch.dtype]] = []
    original = ModelAdapter.forward_layers

    def spy(self, hidden, step, cache, start, stop):
        calls.append((start, stop, hidden.shape[1], hidden.dtype))
        return original(self, hidden, step, cache, start, stop)

    monkeypatch.setattr(ModelAdapter, "forward_layers", spy)
    out = generate(model, PROMPT, method="eesd", exit_layer=2, draft_len=3, max_new_tokens=16,
                   draft_dtype="float32", capture="none")  # fmt: skip
    drafts = [c for c in calls if c[:3] == (0, 2, 1) and c[3] == torch.float32]
    early = [c[2] for c in calls if c[:2] == (0, 2) and c[3] == torch.float64]  # the prefill's, then the rounds'
    assert len(drafts) == sum(out.stats.drafted) and early[0] == len(PROMPT)
    # one per round that drafted, over its k drafts + its input
    assert [q for q in early[1:] if q > 1] == [k + 1 for k in out.stats.drafted if k > 0]
    assert all(c[3] == torch.float64 for c in calls if c[1] == 4)  # layers after E only ever in the model's dtype


def test_the_narrow_copies_are_made_once_and_leave_the_model_as_it_was() -> None:
    model = _agreeing(TinySpec(num_layers=4, seed=4), 2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(2):
        generate(model, PROMPT, method="eesd", exit_layer=2, max_new_tokens=8, draft_dtype="bf16", capture="none")
    kept = model.__dict__["_eesd_low_drafts"]
    assert len(kept) == 1  # the second call reused the copies
    ((draft, head),) = kept.values()
    assert all(p.dtype == torch.bfloat16 for layer in draft.layers[:2] for p in layer.parameters())
    assert draft.lm_head.weight.dtype == torch.bfloat16 and isinstance(head, CastHead)
    assert all(torch.equal(p, before[name]) and p.dtype == torch.float64 for name, p in model.named_parameters())


def test_the_narrow_copies_are_what_drafts() -> None:
    """Drafts come from the kept narrow copies: with their LM head scrambled, a model whose drafts were nearly all
    accepted sees them rejected, and the output is AR's either way."""
    model = _agreeing(TinySpec(num_layers=4, seed=6), 2)
    ar = generate(model, PROMPT, method="ar", max_new_tokens=30)
    run = dict(method="eesd", exit_layer=2, draft_len=2, max_new_tokens=30, draft_dtype="float32", capture="none")
    before = generate(model, PROMPT, **run)
    ((draft, _),) = model.__dict__["_eesd_low_drafts"].values()
    with torch.no_grad():
        draft.lm_head.weight.copy_(torch.randn_like(draft.lm_head.weight))
    after = generate(model, PROMPT, **run)
    assert torch.equal(before.sequences, ar.sequences) and torch.equal(after.sequences, ar.sequences)
    assert before.stats.acceptance_rate > 0.8 > 0.3 > after.stats.acceptance_rate


def test_the_cost_ratio_counts_the_narrow_bytes() -> None:
    adapter = ModelAdapter(tiny_model(TinySpec(num_layers=4), torch.float32))
    head = SharedExitHead(adapter)
    full = draft_cost_ratio(adapter, 2, head)
    assert draft_cost_ratio(adapter, 2, head, torch.bfloat16) == pytest.approx(full / 2)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(method="ar"), "draft_dtype is for method 'eesd'"),
        (dict(method="ppsd", exit_layer=2), "draft_dtype is for method 'eesd'"),
        (dict(method="eesd", exit_layer=2, draft_dtype="int8"), "unknown dtype"),
    ],
)
def test_bad_draft_dtypes_are_refused(kwargs: dict, fragment: str) -> None:
    model = tiny_model(TinySpec(num_layers=4), torch.float32)
    with pytest.raises(ValueError, match=fragment):
        generate(model, PROMPT, max_new_tokens=4, **({"draft_dtype": "bf16"} | kwargs))


def test_a_wider_draft_dtype_is_refused_and_the_models_own_is_a_no_op() -> None:
    assert draft_dtype_for(torch.float32, "float32") is None
    assert draft_dtype_for(torch.float32, "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="wider than the model's"):
        draft_dtype_for(torch.bfloat16, "float32")


def test_cli_drafts_narrow_and_checks_its_flags(tmp_path, capsys) -> None:
    from executor.cli import main

    model = tiny_model(TinySpec(num_layers=4, seed=2), torch.float32)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    args = ["generate", "--model", str(path), "--prompt-ids", "3,5,7", "--exit-layer", "2", "--max-new-tokens", "6"]
    assert main([*args, "--draft-dtype", "bfloat16", "--compare-ar"]) == 0
    assert "identical to AR: True" in capsys.readouterr().out
    for bad, fragment in (
        (["--draft-dtype", "int8"], "--draft-dtype must be one of"),
        (["--draft-dtype", "bfloat16", "--method", "ar"], "--draft-dtype is for --method eesd"),
        (["--no-verify-buckets"], "--no-verify-buckets is for --method eesd with --capture freeze"),
        (["--no-verify-buckets", "--capture", "freeze", "--method", "ar"], "got --method ar --capture freeze"),
    ):
        assert main([*args, *bad]) == 2
        assert fragment in capsys.readouterr().err


def test_round_costs_files_keep_the_draft_dtype(tmp_path, capsys) -> None:
    """`eesd calibrate rounds --draft-dtype` records it; `eesd generate --round-costs` refuses the file for drafts in
    another dtype."""
    from executor.cli import main

    model = tiny_model(TinySpec(num_layers=4, seed=2), torch.float32)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    out = tmp_path / "rounds.json"
    rounds = [
        "calibrate",
        "rounds",
        "--model",
        str(path),
        "--exit-layer",
        "2",
        "--max-draft-len",
        "2",
        "--context",
        "8",
        "--repeats",
        "1",
        "--draft-dtype",
        "bf16",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(rounds) == 0
    assert json.loads(out.read_text())["metadata"]["draft_dtype"] == "bfloat16"
    args = ["generate", "--model", str(path), "--prompt-ids", "3,5,7", "--max-new-tokens", "4", "--round-costs",
            str(out)]  # fmt: skip
    assert main([*args, "--draft-dtype", "bfloat16"]) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "measured with drafts in bfloat16" in capsys.readouterr().err


def test_the_drop_in_drafts_narrow_and_equals_hf_generate() -> None:
    model = _agreeing(TinySpec(num_layers=4, seed=8), 2)
    ids = torch.tensor([PROMPT])
    expected = model.generate(ids, max_new_tokens=20, do_sample=False)
    generator = executor.EarlyExitGenerator(model, exit_layer=2, draft_len=3, draft_dtype="bfloat16", capture="none")
    assert torch.equal(generator.generate(ids, max_new_tokens=20), expected)
    assert sum(generator.last_stats.accepted) > 0


def _traces(draft_dtype: torch.dtype | None):
    from calibrate.acceptance import trace_prompts

    model = _agreeing(TinySpec(num_layers=4, vocab=61, seed=3), 2)
    adapter = ModelAdapter(model)
    generator = torch.Generator().manual_seed(0)
    prompts = [(f"p{i}", torch.randint(1, 61, (3 + 2 * i,), generator=generator).tolist()) for i in range(4)]
    return adapter, trace_prompts(adapter, prompts, (1, 2), "shared", 20, eos=[], draft_dtype=draft_dtype)


def test_an_acceptance_trace_of_narrow_drafts_reads_the_narrow_copies(monkeypatch) -> None:
    """`eesd calibrate acceptance --draft-dtype`: the heads read a pass of the narrow copies of layers [0, E). Float32
    copies of a float64 model propose what it proposes (real EESD runs with them agree with the trace); copies whose
    layers are scrambled do not."""
    from calibrate.acceptance import check_traces

    _, full = _traces(None)
    adapter, narrow = _traces(torch.float32)
    assert [t.matches for t in narrow] == [t.matches for t in full] and [t.tokens for t in narrow] == [
        t.tokens for t in full
    ]
    report = check_traces(adapter, narrow, "shared", 3, 20, eos=[], strict=False, draft_dtype=torch.float32)
    assert report.ok and report.summary()["runs_same_rounds"] == len(narrow) * 2

    import executor.draft_precision as precision

    made = precision.low_precision_draft

    def scrambled(*args):
        draft, head = made(*args)
        draft = copy.copy(draft)
        draft.layers = [scale_late_layers_copy(layer) for layer in draft.layers[: args[1]]] + draft.layers[args[1] :]
        return draft, head

    monkeypatch.setattr(precision, "low_precision_draft", scrambled)
    _, broken = _traces(torch.float32)
    pairs = [
        pair
        for f, g in zip(full, broken, strict=True)
        for e in f.matches
        for pair in zip(f.matches[e], g.matches[e], strict=True)
    ]
    assert sum(a != b for a, b in pairs) > 0.2 * len(pairs)


def scale_late_layers_copy(layer: torch.nn.Module) -> torch.nn.Module:
    """A copy of a decoder layer with its weights permuted (a different function of the same shapes)."""
    layer = copy.deepcopy(layer)
    with torch.no_grad():
        for parameter in layer.parameters():
            if parameter.dim() == 2:
                parameter.copy_(parameter.flip(0))
    return layer


@pytest.mark.parametrize(
    ("check", "mode"), [("auto", "report"), ("report", "report"), ("strict", "--check strict: a trace of narrow")]
)
def test_a_narrow_trace_is_checked_as_a_report(check: str, mode: str) -> None:
    from calibrate.acceptance_cli import check_mode

    if mode.startswith("--check"):
        with pytest.raises(ValueError, match=mode):
            check_mode(check, torch.float32, torch.bfloat16)
    else:
        assert check_mode(check, torch.float32, torch.bfloat16) == mode


@requires_smollm2
def test_the_acceptance_cli_records_the_draft_dtype(tmp_path, capsys) -> None:
    from executor.cli import main
    from sim.formats import read_acceptance_trace

    out = tmp_path / "trace.csv"
    args = ["calibrate", "acceptance", "--model", "smollm2-135m", "--exit-layers", "15", "--num-prompts", "1",
            "--max-new-tokens", "6", "--check-prompts", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main([*args, "--draft-dtype", "bf16"]) == 0
    metadata = read_acceptance_trace(out).metadata
    assert metadata["draft_dtype"] == "bfloat16" and metadata["eesd_check"]["strict"] is False
    assert metadata["eesd_check"]["runs_same_tokens"] == 1
    for bad, fragment in (
        (["--draft-dtype", "int8"], "--draft-dtype must be one of"),
        (["--draft-dtype", "bf16", "--check", "strict"], "--check strict: a trace of narrow"),
    ):
        assert main([*args, "--force", *bad]) == 2
        assert fragment in capsys.readouterr().err
