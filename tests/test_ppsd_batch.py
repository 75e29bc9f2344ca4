"""PPSD on a batch (executor/ppsd.py, `decode_ppsd_rows`): the rows move through the pipe in lockstep, a tick's
draft confirmed only if every row that goes on drafted its full model's token. Each row's output must equal AR on it
alone (float64 tiny models, greedy and seeded exact sampling, EOS, any `sync_every`), and the batch's verdicts must
be what lockstep makes of the rows' own: a row's draft of a position is a function of the AR prefix before it, so
each row judges the same drafts as it would alone, and the batch confirms exactly where all its going rows do."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_passes import strict
from test_ppsd import VOCAB, ar_tokens, scale_late_layers, tiny_model

import executor
from executor.adapter import ModelAdapter
from executor.decoding import TokenSink
from executor.passes import StaticPass
from executor.ppsd import LocalPipeline, batch_verdict, decode_ppsd, decode_ppsd_rows
from executor.sampling import SamplingConfig
from executor.verify import TickVerdict

CONFIRM, FLUSH, NONE, EMIT = (int(v) for v in (TickVerdict.CONFIRM, TickVerdict.FLUSH, TickVerdict.NONE,
                                               TickVerdict.EMIT))  # fmt: skip


def alone(model, prompt: list[int], max_new: int, eos: list[int], **kwargs):
    """The row decoded by PPSD on its own (its tokens and stats), the same stages."""
    adapter, sink = ModelAdapter(model), TokenSink(max_new, eos)
    stats = decode_ppsd(adapter, prompt, sink, None, **kwargs)
    return sink.tokens, stats


def until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """AR's tokens up to and including the first EOS (what a row stopped at its EOS emits)."""
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens


def drawn_eos(case: dict, references: list[list[int]]) -> list[int]:
    """The case's EOS id, drawn from a row's own AR text (`eos_at`: row and index), or none."""
    if case["eos_at"] is None:
        return []
    row, index = case["eos_at"]
    text = references[row % len(references)]
    return [text[index % len(text)]]


@st.composite
def batch_cases(draw):
    num_layers = draw(st.integers(2, 6))
    stages = draw(st.integers(2, min(4, num_layers)))
    return {
        "arch": draw(st.sampled_from(["llama", "qwen2"])),
        "num_layers": num_layers,
        "seed": draw(st.integers(0, 2**16)),
        "epsilon": draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
        "stages": stages,
        "exit_layer": draw(st.integers(1, num_layers // stages)),
        "prompts": draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6), min_size=1, max_size=4)),
        "max_new_tokens": draw(st.integers(1, 20)),
        "sync_every": draw(st.integers(1, 6)),
        "eos_at": draw(st.one_of(st.none(), st.tuples(st.integers(0, 3), st.integers(0, 19)))),
    }


def own_lengths_case(case: dict, asked: list[int]):
    """The case's model and prompts, each row asking its own length (`asked`), AR's tokens of each, an EOS drawn."""
    model = scale_late_layers(tiny_model(case["arch"], case["num_layers"], case["seed"]), case["exit_layer"],
                              case["epsilon"])  # fmt: skip
    prompts = case["prompts"]
    lengths = asked[: len(prompts)]
    references = [ar_tokens(model, prompt, count) for prompt, count in zip(prompts, lengths, strict=True)]
    return model, prompts, lengths, references, drawn_eos(case, references)


@given(batch_cases(), st.booleans())
def test_a_batch_equals_each_row_alone_and_confirms_where_every_row_does(case: dict, skip_empty: bool) -> None:
    """Each row's tokens equal AR's on it alone (to its EOS, one drawn from a row's own text); every row's judged
    drafts are the ones it judges alone (same verdicts, position by position); without EOS the batch confirms
    exactly at the positions where every row confirmed alone and the pipe's tick count follows from its flushes."""
    model = scale_late_layers(tiny_model(case["arch"], case["num_layers"], case["seed"]), case["exit_layer"],
                              case["epsilon"])  # fmt: skip
    prompts, max_new = case["prompts"], case["max_new_tokens"]
    references = [ar_tokens(model, prompt, max_new) for prompt in prompts]
    eos = drawn_eos(case, references)
    options = dict(stages=case["stages"], exit_layer=case["exit_layer"], sync_every=case["sync_every"])
    LocalPipeline.skip_empty_on_cpu = skip_empty
    try:
        sinks = [TokenSink(max_new, eos) for _ in prompts]
        stats = decode_ppsd_rows(ModelAdapter(model), prompts, sinks, None, **options)
        singles = [alone(model, prompt, max_new, eos, **options) for prompt in prompts]
    finally:
        LocalPipeline.skip_empty_on_cpu = True
    assert [sink.tokens for sink in sinks] == [until_eos(reference, eos) for reference in references]
    assert stats.rows == len(prompts) and stats.new_tokens == sum(len(sink.tokens) for sink in sinks)
    assert sorted(stats.accepted) == sorted(a for _, single in singles for a in single.accepted) or eos
    if not eos:
        check_lockstep(stats, [single for _, single in singles], max_new)


@given(batch_cases(), st.lists(st.integers(1, 20), min_size=4, max_size=4))
def test_rows_asking_their_own_lengths_end_at_them_and_decide_no_verdict_after(case: dict, asked: list[int]) -> None:
    """Serving's batches: each row asks its own max_new_tokens. Each row equals AR alone to its own length (and EOS);
    a row ending, at its length as at its EOS, decides nothing from then on, so without EOS the batch judges as many
    drafts as its longest row, confirming each iff every row still going confirmed it alone; and no tick runs past
    the longest row's end."""
    model, prompts, lengths, references, eos = own_lengths_case(case, asked)
    options = dict(stages=case["stages"], exit_layer=case["exit_layer"], sync_every=case["sync_every"])
    sinks = [TokenSink(count, eos) for count in lengths]
    stats = decode_ppsd_rows(ModelAdapter(model), prompts, sinks, None, **options)
    assert [sink.tokens for sink in sinks] == [until_eos(reference, eos) for reference in references]
    if eos:
        return
    singles = [alone(model, prompt, count, eos, **options)[1] for prompt, count in zip(prompts, lengths, strict=True)]
    longest = max(lengths)
    checked = max(0, longest - 2)
    expected = [int(all(s.accepted[i] for s in singles if i < len(s.accepted))) for i in range(checked)]
    assert stats.verdicts == expected and stats.confirms == sum(expected)
    n = stats.stages
    assert stats.ticks == ((n - 1) * (1 + stats.flushes) + (longest - 1) if longest > 1 else 0)
    assert stats.unread_ticks == 0


class _AsAlone:
    """A row's drafts judged as it judged them decoding alone (`PPSDStats.accepted`, position by position)."""

    def __init__(self, accepted: list[int]) -> None:
        self.accepted = accepted

    def draft(self, position: int, index: int) -> tuple[bool, float]:
        return (bool(self.accepted[position - 1]) if position - 1 < len(self.accepted) else True), 1.0


@given(batch_cases(), st.lists(st.integers(2, 16), min_size=4, max_size=4))
def test_the_simulator_runs_the_executors_ticks_for_rows_of_their_own_lengths(case: dict, asked: list[int]) -> None:
    """The executor's lockstep batch (rows asking their own lengths, an EOS, blocks of `sync_every` ticks) and the
    simulator's (`sim.engine.decode_rows`, every row's drafts judged as it judged them alone, its tokens and the
    tokens it asked) run the same number of ticks: the same flushes, the same blocks and unread ticks past the end."""
    from sim.acceptance import BernoulliAcceptance
    from sim.engine import BatchRow, decode_rows
    from sim.hardware import LINKS
    from sim.latency import ConstantLatency
    from sim.models import ModelConfig
    from sim.plan import SimPlan, SimStage, Workload

    model = scale_late_layers(tiny_model(case["arch"], case["num_layers"], case["seed"]), case["exit_layer"],
                              case["epsilon"])  # fmt: skip
    prompts = case["prompts"]
    lengths = asked[: len(prompts)]
    eos = drawn_eos(case, [ar_tokens(model, prompt, count) for prompt, count in zip(prompts, lengths, strict=True)])
    options = dict(stages=case["stages"], exit_layer=case["exit_layer"], sync_every=case["sync_every"])
    sinks = [TokenSink(count, eos) for count in lengths]
    stats = decode_ppsd_rows(ModelAdapter(model), prompts, sinks, None, **options)
    singles = [alone(model, prompt, count, eos, **options)[1] for prompt, count in zip(prompts, lengths, strict=True)]
    rows = [BatchRow(_AsAlone(single.accepted), None, len(sink.tokens), past_end=count - len(sink.tokens))
            for single, sink, count in zip(singles, sinks, lengths, strict=True)]  # fmt: skip
    n, latency = case["stages"], ConstantLatency({"layer": 10.0})
    stages = tuple(SimStage(i, i + 1, latency) for i in range(n))  # the ticks do not depend on the costs
    lockstep = SimPlan(ModelConfig("toy", n, 64, 4, 4, 128, VOCAB), stages, LINKS["ideal"], "ppsd",
                       BernoulliAcceptance(0.5), Workload(1, 1, 16, 2), exit_layer=1, ppsd_backend="sequential",
                       sync_every=case["sync_every"])  # fmt: skip
    run, _ = decode_rows(lockstep, max(map(len, prompts)), rows)
    assert run.ticks == stats.ticks, (stats.ticks, stats.unread_ticks, [len(s.tokens) for s in sinks], lengths)


def check_lockstep(stats, singles, max_new: int) -> None:
    """Rows of one length: the batch judges each position once, confirming iff every row confirmed it alone."""
    n, rows = stats.stages, stats.rows
    checked = max(0, max_new - 2)
    assert all(len(single.accepted) == checked for single in singles)
    confirmed = [all(single.accepted[i] for single in singles) for i in range(checked)]
    assert stats.confirms == sum(confirmed) and stats.flushes == checked - sum(confirmed)
    assert len(stats.drafted) == rows * checked and sum(stats.accepted) == sum(sum(s.accepted) for s in singles)
    assert stats.ticks == ((n - 1) * (1 + stats.flushes) + (max_new - 1) if max_new > 1 else 0)
    if stats.ticks:
        assert stats.tokens_per_tick == pytest.approx(rows * (max_new - 1) / stats.ticks)
        assert stats.tick_speedup == pytest.approx(n * (max_new - 1) / stats.ticks)
    summary = stats.summary()
    assert f"(AR: {rows}/{n})" in summary or not checked
    assert (f"{rows} rows in lockstep" in summary) == (rows > 1)


def test_identical_rows_run_as_one() -> None:
    """Rows that agree everywhere confirm and flush together: the batch's ticks, confirms and flushes are one row's,
    its rows' own acceptance the row's."""
    model = scale_late_layers(tiny_model("llama", 6, seed=4), 2, 0.2)
    prompt, options = [3, 14, 15, 9], dict(stages=3, exit_layer=2)
    tokens, single = alone(model, prompt, 30, [], **options)
    sinks = [TokenSink(30, []) for _ in range(3)]
    stats = decode_ppsd_rows(ModelAdapter(model), [prompt] * 3, sinks, None, **options)
    assert all(sink.tokens == tokens for sink in sinks)
    assert (stats.ticks, stats.confirms, stats.flushes) == (single.ticks, single.confirms, single.flushes)
    assert single.confirms > 0 and single.flushes > 0
    assert stats.acceptance_rate == pytest.approx(single.alpha) == pytest.approx(stats.alpha)


def test_lockstep_confirms_less_often_than_its_rows() -> None:
    """Rows that disagree: a batch's confirm needs every row's, so its alpha is below its rows' own, and the summary
    gives both."""
    model = scale_late_layers(tiny_model("qwen2", 6, seed=5), 2, 0.3)
    prompts = [[3, 14, 15], [9, 2, 6, 5, 35], [8, 30]]
    sinks = [TokenSink(40, []) for _ in prompts]
    stats = decode_ppsd_rows(ModelAdapter(model), prompts, sinks, None, stages=3, exit_layer=2)
    assert 0 < stats.alpha < stats.acceptance_rate < 1, stats.summary()
    assert f"alpha {stats.alpha:.3f}, the rows' own {stats.acceptance_rate:.3f}" in stats.summary()


@pytest.mark.parametrize(
    ("own", "alive", "ending", "expected"),
    [
        ([CONFIRM, CONFIRM], [True, True], [False, False], CONFIRM),
        ([CONFIRM, FLUSH], [True, True], [False, False], FLUSH),  # one row wrong: the batch flushes
        ([CONFIRM, FLUSH], [True, True], [False, True], CONFIRM),  # a row emitting its EOS decides nothing
        ([CONFIRM, FLUSH], [True, False], [False, False], CONFIRM),  # nor does a finished row
        ([FLUSH, CONFIRM], [True, True], [True, True], FLUSH),  # every row ends now: judged as they are
        ([FLUSH], [True], [True], FLUSH),  # batch 1 at its EOS: its own verdict, as before batches
        ([NONE, NONE], [True, True], [False, False], NONE),  # nothing left the pipe
        ([EMIT, EMIT], [True, True], [False, True], EMIT),  # no draft in flight (the last token)
    ],
)
def test_thebatch_verdict(own, alive, ending, expected) -> None:
    verdict = batch_verdict(torch.tensor(own), torch.tensor(alive), torch.tensor(ending))
    assert verdict.tolist() == [expected]


@given(seed=st.integers(0, 2**20), sync_every=st.integers(1, 5), penalty=st.sampled_from([None, 1.3]))
def test_a_left_padded_batch_through_the_drop_in_equals_ar(seed, sync_every, penalty) -> None:
    """`executor.generate(method="ppsd")` on a left-padded batch: seeded exact sampling (a seed per row) and a
    repetition penalty, with an EOS, token for token AR's, and the transition does no host work (`strict`)."""
    model = scale_late_layers(tiny_model("llama", 4, seed=seed % 5), 2, 0.1)
    ids = torch.tensor([[0, 0, 5, 17, 3], [4, 9, 11, 2, 8], [0, 0, 0, 0, 21]])
    kwargs = dict(attention_mask=(torch.arange(5) >= (ids == 0).sum(1, keepdim=True)).long(), max_new_tokens=16,
                  do_sample=True, sampling="exact", seed=[seed, seed + 1, seed + 2], repetition_penalty=penalty,
                  eos_token_id=7, pad_token_id=0)  # fmt: skip
    reference = executor.generate(model, ids, method="ar", **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StaticPass, "__call__", strict)
        out = executor.generate(model, ids, method="ppsd", stages=2, exit_layer=2, sync_every=sync_every, **kwargs)
    assert torch.equal(out.sequences, reference.sequences)
    assert out.stats.rows == 3 and out.stats.prompt_tokens == 3 + 5 + 1


@settings(max_examples=4, deadline=None)  # each example starts a process per stage
@given(batch_cases(), st.lists(st.integers(1, 20), min_size=4, max_size=4), st.booleans())
def test_the_distributed_backend_runs_a_batch_as_the_sequential_one(case: dict, asked: list[int], sample: bool) -> None:
    """A process per stage (torch.distributed, gloo) on a lockstep batch whose rows ask their own lengths, with an EOS
    and greedy or exact sampling (a seed per row): every row's tokens, the batch's verdicts and every row's own are
    the sequential reference's, tick for tick; each rank reads every tick's report."""
    model, prompts, lengths, references, eos = own_lengths_case(case, asked)
    seeds = tuple(case["seed"] + row for row in range(len(prompts)))
    sampling = SamplingConfig(True, "exact", 0.9, None, None, seeds) if sample else None
    options = dict(stages=case["stages"], exit_layer=case["exit_layer"], sampling=sampling)
    runs = []
    for backend in ("sequential", "distributed"):
        sinks = [TokenSink(count, eos) for count in lengths]
        stats = decode_ppsd_rows(ModelAdapter(model), prompts, sinks, None, backend=backend, **options)
        runs.append(([sink.tokens for sink in sinks], stats))
    (tokens, sequential), (spread, distributed) = runs
    assert spread == tokens
    if not sample:
        assert tokens == [until_eos(reference, eos) for reference in references]
    assert distributed.rows == len(prompts) and distributed.new_tokens == sequential.new_tokens
    assert (distributed.ticks, distributed.verdicts) == (sequential.ticks, sequential.verdicts)
    assert (distributed.drafted, distributed.accepted) == (sequential.drafted, sequential.accepted)
    assert distributed.host_reads == distributed.ticks


def test_a_left_padded_batch_over_stage_processes_equals_ar_and_hf() -> None:
    """`executor.generate(method="ppsd", backend="distributed")` on a left-padded batch equals AR (greedy with a
    repetition penalty, which every stage process learns from the tick's report) and HF `generate`."""
    model = scale_late_layers(tiny_model("qwen2", 6, seed=3), 2, 0.2)
    ids = torch.tensor([[0, 0, 5, 17, 3], [4, 9, 11, 2, 8], [0, 0, 0, 0, 21]])
    mask = (torch.arange(5) >= (ids == 0).sum(1, keepdim=True)).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=14, repetition_penalty=1.4, pad_token_id=0)
    out = executor.generate(model, ids, method="ppsd", stages=3, exit_layer=2, backend="distributed", **kwargs)
    assert torch.equal(out.sequences, executor.generate(model, ids, method="ar", **kwargs).sequences)
    assert torch.equal(out.sequences, model.generate(ids, do_sample=False, **kwargs))
    assert out.stats.rows == 3 and out.stats.backend == "distributed" and out.stats.confirms > 0


def test_a_greedy_batch_equals_hf_generate() -> None:
    model = scale_late_layers(tiny_model("qwen2", 4, seed=2), 1, 0.2)
    ids = torch.tensor([[0, 0, 5, 17, 3], [4, 9, 11, 2, 8]])
    mask = (ids != 0).long()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = executor.generate(model, ids, attention_mask=mask, method="ppsd", stages=2, exit_layer=1, max_new_tokens=20)
    assert torch.equal(out.sequences, expected)


def test_a_compiled_batch_equals_ar() -> None:
    """capture="compile" (every stage pass and the transition compiled; on a CPU without CUDA graphs) on 2 rows."""
    model = scale_late_layers(tiny_model("llama", 4, seed=0), 1, 1.0)
    prompts = [[5, 17, 3], [8, 2, 2, 40]]
    ids, mask = torch.tensor([[0, *prompts[0]], prompts[1]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    out = executor.generate(model, ids, attention_mask=mask, method="ppsd", stages=2, exit_layer=1, max_new_tokens=12,
                            capture="compile", sync_every=3)  # fmt: skip
    assert out.stats.capture == "compile" and out.stats.flushes > 0
    assert [out.sequences[0, 4:].tolist(), out.sequences[1, 4:].tolist()] == [ar_tokens(model, p, 12) for p in prompts]


def test_bad_batches_are_refused() -> None:
    model = tiny_model("llama", 4)
    adapter = ModelAdapter(model)
    with pytest.raises(ValueError, match="a sink per prompt"):
        decode_ppsd_rows(adapter, [[1, 2], [3]], [TokenSink(4, [])], None, stages=2)
    with pytest.raises(ValueError, match="same EOS ids"):
        decode_ppsd_rows(adapter, [[1, 2], [3]], [TokenSink(4, []), TokenSink(4, [7])], None, stages=2)
    with pytest.raises(ValueError, match="empty prompt"):
        decode_ppsd_rows(adapter, [[1, 2], []], [TokenSink(4, []), TokenSink(4, [])], None, stages=2)
    with pytest.raises(ValueError, match="cache holds 1 rows, the batch has 2"):
        decode_ppsd_rows(adapter, [[1, 2], [3]], [TokenSink(4, []), TokenSink(4, [])], adapter.new_cache(1, 8),
                         stages=2)  # fmt: skip


@pytest.mark.parametrize("rows", [1, 2])
def test_a_kept_compiled_pipeline_samples_with_each_calls_seed(rows) -> None:
    """A captured pipeline is kept on the model across calls (its key leaves the seed out): each call must still
    sample with its own seed (a seed per row for a batch), as AR does."""
    model = scale_late_layers(tiny_model("llama", 4, seed=0), 1, 0.3)
    prompts = [[5, 17, 3, 9], [8, 2, 2, 40]][:rows]
    options = dict(max_new_tokens=12, do_sample=True, sampling="exact", temperature=1.5)
    for seed in (1, 2, [3, 4][:rows] if rows > 1 else 3):
        ar = executor.generate(model, prompts, method="ar", seed=seed, **options).sequences
        ppsd = executor.generate(model, prompts, method="ppsd", stages=2, exit_layer=1, capture="compile", seed=seed,
                                 **options).sequences  # fmt: skip
        assert torch.equal(ppsd, ar), seed
