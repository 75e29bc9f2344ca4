"""PPSD's pipe chained on the device (executor/ppsd.py, `LocalPipeline`): the transition pass judges each tick and
moves the pipe on without the host, which launches `sync_every` ticks per read. The output must not depend on
`sync_every`: equal to AR (and HF) greedy, seeded exact sampling, EOS and min_new_tokens, a repetition penalty, and a
cache of exactly the size the pipe needs (its scratch slot the last)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_passes import strict
from test_ppsd import VOCAB, ar_tokens, check_accounting, hf_tokens, scale_late_layers, tiny_model

import executor
from executor.adapter import ModelAdapter
from executor.decoding import TokenSink
from executor.passes import StaticPass
from executor.ppsd import TICK_LOG, LocalPipeline, StageRunner, decode_ppsd


@st.composite
def chain_cases(draw):
    num_layers = draw(st.integers(2, 6))
    return {
        "arch": draw(st.sampled_from(["llama", "qwen2"])),
        "num_layers": num_layers,
        "seed": draw(st.integers(0, 2**16)),
        "epsilon": draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
        "stages": draw(st.integers(2, min(4, num_layers))),
        "prompt": draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5)),
        "max_new_tokens": draw(st.integers(1, 24)),
        "sync_every": draw(st.integers(1, 12)),
    }


@given(chain_cases(), st.booleans())
def test_chained_ppsd_equals_ar_greedy_for_any_sync_every(case, skip_empty) -> None:
    """Through a cache of exactly len(prompt) + max_new_tokens slots: the scratch slot is the last, so a stale write
    there would land on a real position if the pipe ever fed one that far. Empty stages run (as on a GPU) or are
    skipped (the CPU default)."""
    LocalPipeline.skip_empty_on_cpu = skip_empty
    try:
        check_chained_case(case)
    finally:
        LocalPipeline.skip_empty_on_cpu = True


def check_chained_case(case: dict) -> None:
    model = tiny_model(case["arch"], case["num_layers"], case["seed"])
    scale_late_layers(model, case["num_layers"] // case["stages"] or 1, case["epsilon"])
    prompt, max_new = case["prompt"], case["max_new_tokens"]
    adapter = ModelAdapter(model)
    sink = TokenSink(max_new, [], None)
    cache = adapter.new_cache(1, len(prompt) + max_new)
    stats = decode_ppsd(adapter, prompt, sink, cache, stages=case["stages"], sync_every=case["sync_every"])
    assert sink.tokens == ar_tokens(model, prompt, max_new) == hf_tokens(model, prompt, max_new)
    check_accounting(stats, max_new)


@given(
    sync_every=st.integers(2, 10),
    seed=st.integers(0, 2**20),
    stages=st.integers(2, 4),
    eos=st.sampled_from([None, 3, [5, 11]]),
    min_new_tokens=st.integers(0, 5),
    penalty=st.sampled_from([None, 1.3, 0.7]),
    do_sample=st.booleans(),
)
def test_chained_ppsd_equals_ar_with_eos_sampling_and_penalty(
    sync_every, seed, stages, eos, min_new_tokens, penalty, do_sample
) -> None:
    """A row that ends (EOS) inside a block runs on unread; the penalty's context is committed on the device."""
    model = scale_late_layers(tiny_model("qwen2", 4, seed=seed % 7), 1, 0.1)
    kwargs = dict(
        max_new_tokens=22, min_new_tokens=min_new_tokens, eos_token_id=eos, repetition_penalty=penalty,
        do_sample=do_sample, seed=seed, top_k=20 if do_sample else None,
    )  # fmt: skip
    prompt = [7, 3, 19, 40]
    reference = executor.generate(model, prompt, method="ar", **kwargs)
    out = executor.generate(model, prompt, method="ppsd", stages=stages, sync_every=sync_every, **kwargs)
    assert out.sequences.tolist() == reference.sequences.tolist()


@pytest.mark.parametrize(("sync_every", "reads"), [(1, 31), (8, 4), (64, 2)])
def test_one_host_read_per_block_of_ticks(sync_every: int, reads: int) -> None:
    """Drafts always right (epsilon 0), 3 stages, 30 tokens: 2 filling ticks + 29 = 31 ticks. Blocks are cut to the
    tokens left (a tick emits at most one): 8 + 8 + 8 + 7 ticks read 4 times, 29 + 2 twice; no tick runs past the
    last token."""
    model = scale_late_layers(tiny_model("llama", 6, seed=2), 2, 0.0)
    out = executor.generate(model, [1, 2, 3], method="ppsd", stages=3, max_new_tokens=30, sync_every=sync_every)
    assert out.stats.ticks == 31 and out.stats.flushes == 0
    assert out.stats.host_reads == reads


def test_flushes_inside_a_block_are_replayed_in_order() -> None:
    """Flushes and confirms mixed inside one block of 40 ticks: the same verdicts, ticks and stage books as a read
    after every tick."""
    model = scale_late_layers(tiny_model("llama", 8, seed=1), 2, 0.5)
    runs = {
        every: executor.generate(model, [5, 17, 3], method="ppsd", stages=4, max_new_tokens=30, sync_every=every)
        for every in (1, 40)
    }
    one, block = runs[1].stats, runs[40].stats
    assert runs[1].sequences.tolist() == runs[40].sequences.tolist()
    assert one.confirms > 0 and one.flushes > 0
    assert (one.ticks, one.confirms, one.flushes, one.accepted) == (block.ticks, block.confirms, block.flushes,
                                                                    block.accepted)  # fmt: skip
    books = [[(s.work_ticks, s.bubble_ticks) for s in stats.stage_stats] for stats in (one, block)]
    assert books[0] == books[1]
    assert block.host_reads < one.host_reads == one.ticks


def test_the_transition_does_no_host_work(monkeypatch) -> None:
    """Every stage pass and the transition run under the no-host-work guard (the stages three times each, as a
    warmed-up captured pass runs; the transition is all `advance`, once)."""
    model = scale_late_layers(tiny_model("llama", 6, seed=4), 2, 0.2)
    kwargs = dict(method="ppsd", stages=3, max_new_tokens=25, repetition_penalty=1.2, eos_token_id=9)
    reference = executor.generate(model, [4, 4, 8], sync_every=1, **kwargs)
    monkeypatch.setattr(StaticPass, "__call__", strict)
    out = executor.generate(model, [4, 4, 8], sync_every=7, **kwargs)
    assert out.sequences.tolist() == reference.sequences.tolist()


def test_the_tick_log_wraps() -> None:
    """More ticks than the log has rows: the cursor wraps, the host reads each block where it was written."""
    model = scale_late_layers(tiny_model("llama", 8, seed=1), 2, 0.5)
    max_new = TICK_LOG + 10
    out = executor.generate(model, [2, 9], method="ppsd", stages=2, max_new_tokens=max_new, sync_every=9)
    assert out.stats.ticks > TICK_LOG
    assert out.sequences[0, 2:].tolist() == ar_tokens(model, [2, 9], max_new)


def test_a_cache_without_the_scratch_slot_is_refused() -> None:
    adapter = ModelAdapter(tiny_model())
    wanted = r"PPSD needs the longest prompt.s length \+ the largest max_new_tokens = 12 .*scratch"
    with pytest.raises(ValueError, match=wanted):
        decode_ppsd(adapter, [1, 2], TokenSink(10, []), adapter.new_cache(1, 11), stages=2)


@pytest.mark.parametrize("value", [0, 65, 2.0, True])
def test_sync_every_is_checked_for_ppsd(value) -> None:
    with pytest.raises(ValueError, match="sync_every must be an integer in 1..64"):
        executor.generate(tiny_model(), [1, 2], method="ppsd", max_new_tokens=4, sync_every=value)


@pytest.mark.parametrize("skip_empty", [False, True])
def test_invalid_stages_write_only_the_scratch_slot(monkeypatch, skip_empty: bool) -> None:
    """After a run, the slots past the last position fed are untouched (zero) but the scratch slot, which the empty
    stages wrote when they ran (on a GPU; on a CPU they are skipped and it stays zero too)."""
    monkeypatch.setattr(LocalPipeline, "skip_empty_on_cpu", skip_empty)
    model = scale_late_layers(tiny_model("llama", 8, seed=1), 1, 0.5)  # flushes: every stage runs empty ticks
    adapter = ModelAdapter(model)
    prompt, max_new, spare = [5, 17, 3], 40, 6
    cache = adapter.new_cache(1, len(prompt) + max_new + spare)
    stats = decode_ppsd(adapter, prompt, TokenSink(max_new, []), cache, stages=4, exit_layer=1)
    assert stats.flushes > 0
    fed = len(prompt) + max_new - 1  # positions 0 .. fed - 1 hold the prompt and every token fed
    for keys in cache.keys:
        assert torch.count_nonzero(keys[:, :, fed:-1]) == 0
        assert (torch.count_nonzero(keys[:, :, -1]) == 0) == skip_empty


def test_a_cpu_skips_the_empty_stages(monkeypatch) -> None:
    """On a CPU the sequential reference runs a stage only in the ticks it holds a token: no wasted work."""
    runs = []
    compute = StageRunner._compute
    monkeypatch.setattr(StageRunner, "_compute", lambda self, step: runs.append(self.stage) or compute(self, step))
    model = scale_late_layers(tiny_model("llama", 8, seed=1), 1, 0.5)
    out = executor.generate(model, [5, 17, 3], method="ppsd", stages=4, exit_layer=1, max_new_tokens=30)
    stats = out.stats
    assert stats.flushes > 0
    assert [runs.count(stage) for stage in range(4)] == [s.work_ticks for s in stats.stage_stats]
    assert all(s.bubble_ticks > 0 for s in stats.stage_stats[1:])


def test_a_stage_runs_at_the_scratch_slot_exactly_when_it_holds_no_token(monkeypatch) -> None:
    """Each tick, each stage: the position it ran at is the scratch slot iff the tick's log says it held no token."""
    monkeypatch.setattr(LocalPipeline, "skip_empty_on_cpu", False)  # as on a GPU: every stage runs every tick
    ran, held = [], []
    compute, replay = StageRunner._compute, LocalPipeline._replay

    def recording_compute(self, step) -> None:
        ran.append((self.stage, int(self.position)))
        compute(self, step)

    def recording_replay(self, row, busy, sinks) -> None:
        held.append(row[-len(self.runners) :])  # each stage's valid flag ends a log row
        replay(self, row, busy, sinks)

    monkeypatch.setattr(StageRunner, "_compute", recording_compute)
    monkeypatch.setattr(LocalPipeline, "_replay", recording_replay)
    model = scale_late_layers(tiny_model("llama", 8, seed=1), 1, 0.5)
    adapter, prompt, max_new = ModelAdapter(model), [5, 17, 3], 30
    cache = adapter.new_cache(1, len(prompt) + max_new + 4)
    stats = decode_ppsd(adapter, prompt, TokenSink(max_new, []), cache, stages=4, exit_layer=1, sync_every=5)
    assert stats.flushes > 0 and len(held) == stats.ticks
    scratch = cache.max_len - 1
    for tick, flags in enumerate(held):
        positions = [position for stage, position in ran[4 * tick : 4 * tick + 4]]
        assert [stage for stage, _ in ran[4 * tick : 4 * tick + 4]] == [0, 1, 2, 3]
        assert [position == scratch for position in positions] == [not flag for flag in flags], tick


def test_compiled_pipe_equals_ar() -> None:
    """capture="compile" (torch.compile of every stage pass and of the transition; on a CPU without CUDA graphs),
    flushes included."""
    model = scale_late_layers(tiny_model("llama", 4, seed=0), 1, 1.0)
    out = executor.generate(model, [5, 17, 3], method="ppsd", stages=2, exit_layer=1, max_new_tokens=20,
                            capture="compile", sync_every=4)  # fmt: skip
    assert out.stats.capture == "compile" and out.stats.flushes > 0
    assert out.sequences[0, 3:].tolist() == ar_tokens(model, [5, 17, 3], 20)


@pytest.mark.parametrize("rows", [1, 3])
def test_ticks_run_unread_after_the_end_are_counted(rows: int) -> None:
    """A decode whose last row ends at its EOS inside a block of 8 ticks: the block's later ticks run (the device
    does not know the end) and are counted as ticks, unread, in every stage's books too, as the simulator counts
    them; read after every tick, the same run has none, and the two differ by exactly those ticks."""
    model = scale_late_layers(tiny_model("llama", 6, seed=3), 2, 0.2)
    prompts = [[7, 3, 19, 40], [5, 1, 8, 8], [9, 9, 2, 4]][:rows]
    free = [ar_tokens(model, prompt, 40) for prompt in prompts]
    eos = sorted({text[4] for text in free})  # every row ends early, the last inside a block
    runs = {}
    for every in (1, 8):
        out = executor.generate(model, prompts, method="ppsd", stages=3, max_new_tokens=40, eos_token_id=eos,
                                pad_token_id=0, sync_every=every)  # fmt: skip
        runs[every] = out.stats
    one, eight = runs[1], runs[8]
    assert one.unread_ticks == 0 and eight.unread_ticks > 0
    assert eight.ticks == one.ticks + eight.unread_ticks
    assert (eight.confirms, eight.flushes, eight.new_tokens) == (one.confirms, one.flushes, one.new_tokens)
    assert all(s.work_ticks + s.bubble_ticks == eight.ticks for s in eight.stage_stats)
    assert f"{eight.ticks} ticks ({eight.unread_ticks} run unread past the end)" in eight.summary()
