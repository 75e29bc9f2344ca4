"""PPSD (executor/ppsd.py, executor/ppsd_dist.py): lossless against AR greedy, pipeline accounting, bad input.

Models are tiny and random, in float64 so that equality with AR is exact. The epsilon trick (docs/design.md): scaling
o_proj and down_proj of the layers >= the exit layer by epsilon makes those layers nearly the identity, so the exit
head's drafts are mostly right (epsilon small) or always right (epsilon = 0); epsilon = 1 leaves the model random.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import executor
from executor.adapter import ModelAdapter
from executor.decoding import TokenSink
from executor.ppsd import balanced_bounds, decode_ppsd, plan_stages
from executor.ppsd_dist import PPSDWorkerError, stage_model
from executor.sampling import SamplingConfig

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
VOCAB = 61


def tiny_model(arch: str = "llama", num_layers: int = 4, seed: int = 0, tied: bool = False) -> nn.Module:
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float64).eval()
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def scale_late_layers(model: nn.Module, first_layer: int, epsilon: float) -> nn.Module:
    for layer in model.model.layers[first_layer:]:
        layer.self_attn.o_proj.weight.mul_(epsilon)
        layer.mlp.down_proj.weight.mul_(epsilon)
    return model


def ar_tokens(model: nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    return (
        executor.generate(model, prompt, method="ar", max_new_tokens=max_new_tokens)
        .sequences[0, len(prompt) :]
        .tolist()
    )


def hf_tokens(model: nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])  # an explicit mask: HF would mask prompt tokens equal to pad_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def run_ppsd(model: nn.Module, prompt: list[int], max_new_tokens: int, **kwargs):
    adapter = ModelAdapter(model)
    sink = TokenSink(max_new_tokens, [], None)
    cache = adapter.new_cache(1, len(prompt) + max_new_tokens)
    stats = decode_ppsd(adapter, prompt, sink, cache, **kwargs)
    return sink.tokens, stats


def check_accounting(stats, max_new_tokens: int) -> None:
    """Lockstep pipeline: filling takes n - 1 ticks, each flush n - 1 more, then one tick per decoded token."""
    n = stats.stages
    assert stats.new_tokens == max_new_tokens
    expected_ticks = (n - 1) * (1 + stats.flushes) + (max_new_tokens - 1) if max_new_tokens > 1 else 0
    assert stats.ticks == expected_ticks
    # every decoded token but the last is checked against a draft (the last one's draft is never fed)
    assert stats.confirms + stats.flushes == max(0, max_new_tokens - 2)
    assert sum(stats.drafted) == stats.confirms + stats.flushes and sum(stats.accepted) == stats.confirms
    assert all(s.work_ticks + s.bubble_ticks == stats.ticks for s in stats.stage_stats)
    assert all(s.busy_s >= 0 and s.idle_s >= -1e-9 for s in stats.stage_stats)
    if stats.confirms + stats.flushes:
        assert 1.0 <= stats.ideal_speedup <= n
    check_summary(stats)


def check_summary(stats) -> None:
    """PPSD counts ticks, not rounds: the fields and the summary say so."""
    assert stats.rounds == 0 and stats.tokens_per_round != stats.tokens_per_round  # no rounds: nan
    if stats.ticks:
        assert stats.tokens_per_tick == pytest.approx((stats.new_tokens - 1) / stats.ticks)
        assert stats.tick_speedup == pytest.approx(stats.stages * stats.tokens_per_tick)
    summary = stats.summary()
    tokens = f"{stats.new_tokens} new token{'s' if stats.new_tokens != 1 else ''}"
    assert f"{tokens} in {stats.ticks} ticks" in summary and "round" not in summary
    if stats.confirms + stats.flushes == 0:  # the run ended before a draft was judged: no nan alpha printed
        assert "no draft checked" in summary and "nan" not in summary
        return
    assert f"{stats.confirms + stats.flushes} drafts checked: {stats.confirms} confirmed, {stats.flushes} flushed" in (
        summary
    )
    assert f"{stats.tokens_per_tick:.2f} tokens/tick (AR: 1/{stats.stages})" in summary


@st.composite
def ppsd_cases(draw):
    num_layers = draw(st.integers(2, 6))
    stages = draw(st.integers(2, min(4, num_layers)))
    explicit = draw(st.booleans())
    cuts = sorted(draw(st.sets(st.integers(1, num_layers - 1), min_size=stages - 1, max_size=stages - 1)))
    bounds = [0, *cuts, num_layers] if explicit else list(balanced_bounds(num_layers, stages))
    exit_layer = draw(st.one_of(st.none(), st.integers(1, bounds[1])))
    return {
        "arch": draw(st.sampled_from(sorted(ARCHS))),
        "num_layers": num_layers,
        "seed": draw(st.integers(0, 2**16)),
        "epsilon": draw(st.sampled_from([0.0, 0.02, 0.1, 0.3, 1.0])),
        "stages": stages,
        "stage_boundaries": cuts if explicit else None,
        "exit_layer": exit_layer,
        "draft_layer": exit_layer if exit_layer is not None else bounds[1],
        "prompt": draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)),
        "max_new_tokens": draw(st.integers(1, 20)),
    }


@given(ppsd_cases())
def test_sequential_ppsd_equals_ar_greedy(case: dict) -> None:
    model = tiny_model(case["arch"], case["num_layers"], case["seed"])
    scale_late_layers(model, case["draft_layer"], case["epsilon"])
    prompt, max_new = case["prompt"], case["max_new_tokens"]
    tokens, stats = run_ppsd(
        model,
        prompt,
        max_new,
        stages=case["stages"],
        stage_boundaries=case["stage_boundaries"],
        exit_layer=case["exit_layer"],
    )
    reference = ar_tokens(model, prompt, max_new)
    assert tokens == reference
    assert tokens == hf_tokens(model, prompt, max_new)
    assert stats.exit_layer == case["draft_layer"]
    check_accounting(stats, max_new)


@pytest.mark.parametrize(
    ("arch", "num_layers", "stages", "boundaries", "exit_layer", "epsilon"),
    [
        ("llama", 4, 2, None, None, 0.1),
        ("qwen2", 6, 3, [1, 4], 1, 0.1),
        ("llama", 8, 4, None, 1, 0.5),
    ],
)
def test_confirms_and_flushes_both_occur(arch, num_layers, stages, boundaries, exit_layer, epsilon) -> None:
    model = tiny_model(arch, num_layers, seed=1)
    plan = plan_stages(num_layers, stages, boundaries, exit_layer)
    scale_late_layers(model, plan.exit_layer, epsilon)
    prompt, max_new = [5, 17, 3], 40
    tokens, stats = run_ppsd(model, prompt, max_new, stages=stages, stage_boundaries=boundaries, exit_layer=exit_layer)
    assert tokens == ar_tokens(model, prompt, max_new)
    assert stats.confirms > 0 and stats.flushes > 0, stats.summary()
    assert 0 < stats.alpha < 1
    check_accounting(stats, max_new)


def test_full_acceptance_gives_one_token_per_tick() -> None:
    model = scale_late_layers(tiny_model("llama", 6, seed=2), 2, 0.0)
    tokens, stats = run_ppsd(model, [1, 2, 3], 30, stages=3)
    assert tokens == ar_tokens(model, [1, 2, 3], 30)
    assert stats.flushes == 0 and stats.alpha == 1.0 and stats.ideal_speedup == pytest.approx(3.0)
    assert stats.ticks == 2 + 29
    assert stats.tokens_per_tick == pytest.approx(29 / 31) and stats.tick_speedup == pytest.approx(3 * 29 / 31)
    check_summary(stats)


def test_eos_stops_the_pipeline() -> None:
    model = scale_late_layers(tiny_model("llama", 4, seed=3), 2, 0.1)
    reference = ar_tokens(model, [4, 9], 25)
    eos = reference[10]
    adapter = ModelAdapter(model)
    sink = TokenSink(25, [eos], None)
    decode_ppsd(adapter, [4, 9], sink, adapter.new_cache(1, 40), stages=2)
    assert sink.tokens == reference[: reference.index(eos) + 1]


@pytest.mark.parametrize(
    ("seed", "temperature", "top_k", "top_p", "stages", "min_new"),
    [(0, 1.0, None, None, 2, 0), (7, 0.7, 20, None, 3, 3), (123, 1.3, None, 0.9, 4, 0)],
)
def test_exact_sampling_equals_seeded_ar_sampling(seed, temperature, top_k, top_p, stages, min_new) -> None:
    model = scale_late_layers(tiny_model("qwen2", 8, seed=seed), 2, 0.2)
    prompt, max_new, eos = [9, 8, 7], 30, [3, 5]
    sampling = SamplingConfig(True, "exact", temperature, top_k, top_p, seed)
    adapter = ModelAdapter(model)
    sink = TokenSink(max_new, eos, None)
    stats = decode_ppsd(
        adapter,
        prompt,
        sink,
        adapter.new_cache(1, 40),
        stages=stages,
        exit_layer=2,
        sampling=sampling,
        min_new_tokens=min_new,
    )
    reference = executor.generate(
        model,
        prompt,
        method="ar",
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        eos_token_id=eos,
        do_sample=True,
        sampling="exact",
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    assert sink.tokens == reference.sequences[0, len(prompt) :].tolist()
    assert stats.confirms > 0


# ------------------------------------------------------------------------------------------ distributed backend
@given(
    case=ppsd_cases(),
    penalty=st.sampled_from([0.7, 1.3, 2.0]),
    sample=st.booleans(),
    temperature=st.sampled_from([0.5, 1.0]),
)
def test_ppsd_with_repetition_penalty_equals_ar_and_hf(case: dict, penalty: float, sample: bool, temperature: float):
    """The penalty reads the committed text: greedy PPSD equals HF's penalised greedy, exact sampling seeded AR's."""
    model = scale_late_layers(tiny_model(case["arch"], case["num_layers"], case["seed"]), case["draft_layer"],
                              case["epsilon"])  # fmt: skip
    prompt, max_new = case["prompt"], case["max_new_tokens"]
    options = dict(repetition_penalty=penalty, do_sample=sample, temperature=temperature, seed=case["seed"])
    layout = dict(stages=case["stages"], stage_boundaries=case["stage_boundaries"], exit_layer=case["exit_layer"])
    ppsd = executor.generate(model, prompt, method="ppsd", max_new_tokens=max_new, **layout, **options)
    ar = executor.generate(model, prompt, method="ar", max_new_tokens=max_new, **options)
    assert ppsd.sequences.tolist() == ar.sequences.tolist()
    if not sample:
        ids = torch.tensor([prompt])
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                            repetition_penalty=penalty)  # fmt: skip
        assert ppsd.sequences.tolist() == hf.tolist()


def test_distributed_ppsd_with_repetition_penalty_equals_ar() -> None:
    """Every stage process learns each committed token from the tick's verdict, so the last one's penalty sees AR's
    context: greedy and exact sampling equal AR's, over 2 and 3 processes."""
    model = scale_late_layers(tiny_model("llama", 6, seed=2), 2, 0.1)
    prompt = [5, 6, 7, 5, 6]
    for stages, options in ((2, {"repetition_penalty": 1.8}), (3, {"repetition_penalty": 0.7, "do_sample": True})):
        ar = executor.generate(model, prompt, method="ar", max_new_tokens=16, seed=3, **options)
        out = executor.generate(model, prompt, method="ppsd", stages=stages, exit_layer=2, backend="distributed",
                                max_new_tokens=16, seed=3, **options)  # fmt: skip
        assert out.sequences.tolist() == ar.sequences.tolist()
        assert out.stats.confirms + out.stats.flushes == 14


def test_the_penalty_changes_ppsd_output_as_it_changes_ars() -> None:
    """Not ignored: a strong penalty changes the greedy text (of AR and of PPSD alike)."""
    model = scale_late_layers(tiny_model("llama", 6, seed=4), 3, 0.1)
    prompt = [5, 6, 7, 5, 6, 7]
    plain = executor.generate(model, prompt, method="ppsd", stages=2, max_new_tokens=24)
    penalised = executor.generate(model, prompt, method="ppsd", stages=2, max_new_tokens=24, repetition_penalty=3.0)
    assert penalised.sequences.tolist() != plain.sequences.tolist()
    assert len(set(penalised.sequences[0, 6:].tolist())) > len(set(plain.sequences[0, 6:].tolist()))


def _descendants_of_children() -> list[int]:
    """Processes whose parent is one of our children (the forkserver's workers), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    children = {pid for pid, parent in parents.items() if parent == os.getpid()}
    return [pid for pid, parent in parents.items() if parent in children]


@pytest.mark.parametrize(
    ("stages", "arch", "tied", "must_flush"),
    [(2, "llama", False, True), (3, "qwen2", False, True), (2, "llama", True, False)],
)
def test_distributed_equals_ar_and_sequential(stages: int, arch: str, tied: bool, must_flush: bool) -> None:
    # a random tied-embedding model this small mostly repeats its input token: it rarely flushes, but checks that
    # the last stage's head, tied to stage 1's embedding, is handed over right
    model = scale_late_layers(tiny_model(arch, 6, seed=4, tied=tied), 6 // stages, 0.3)
    prompt, max_new = [7, 1, 30, 2], 24
    tokens, stats = run_ppsd(model, prompt, max_new, stages=stages, backend="distributed")
    assert tokens == ar_tokens(model, prompt, max_new)
    _, sequential = run_ppsd(model, prompt, max_new, stages=stages)
    assert (stats.ticks, stats.confirms, stats.flushes) == (sequential.ticks, sequential.confirms, sequential.flushes)
    assert stats.host_reads == stats.ticks  # each rank reads every tick's outcome (what the simulator prices)
    busy_s = sum(stage.busy_s for stage in stats.stage_stats)  # every rank's CPU, its passes' at least
    assert stats.process_cpu_s > 0.5 * busy_s and sequential.process_cpu_s == 0.0
    # each rank's idle time holds its time in the tick's messages (one process: none)
    assert all(0 < stage.link_s <= stage.idle_s for stage in stats.stage_stats)
    assert all(stage.link_s == 0 for stage in sequential.stage_stats) and "in messages" in stats.summary()
    first = stats.stage_stats[0]
    assert f"({1e3 * first.busy_s / first.work_ticks:.1f} ms a working tick)" in stats.summary()
    assert f"{first.link_s:.3f} s in messages, {1e3 * first.link_s / stats.ticks:.2f} ms a tick" in stats.summary()
    assert stats.confirms > 0 and (stats.flushes > 0 or not must_flush)
    check_accounting(stats, max_new)
    assert _descendants_of_children() == []


def test_distributed_exact_sampling_equals_sequential() -> None:
    model = scale_late_layers(tiny_model("llama", 6, seed=8), 2, 0.3)
    sampling = SamplingConfig(True, "exact", 0.8, None, None, 11)
    tokens, stats = run_ppsd(model, [4, 4, 2], 20, stages=3, sampling=sampling, backend="distributed")
    expected, sequential = run_ppsd(model, [4, 4, 2], 20, stages=3, sampling=sampling)
    assert tokens == expected and (stats.confirms, stats.flushes) == (sequential.confirms, sequential.flushes)


def test_distributed_worker_error_reaches_caller_and_nothing_hangs() -> None:
    model = tiny_model("llama", 6, seed=5)
    begin = time.monotonic()
    with pytest.raises(PPSDWorkerError, match=r"(?s)stage 1 \(rank 0\).*IndexError"):
        run_ppsd(model, [3, VOCAB + 10], 8, stages=3, backend="distributed")
    assert time.monotonic() - begin < 30  # the blocked ranks were stopped, not waited for
    assert _descendants_of_children() == []


class FailingMLP(nn.Module):
    """A layer's MLP that breaks after `calls` calls, as a device fault in one stage would."""

    def __init__(self, mlp: nn.Module, calls: int) -> None:
        super().__init__()
        self.mlp, self.calls = mlp, calls

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("injected stage fault")
        return self.mlp(hidden)


def test_distributed_mid_run_failure_in_last_stage() -> None:
    model = tiny_model("llama", 4, seed=6)
    model.model.layers[3].mlp = FailingMLP(model.model.layers[3].mlp, calls=5)
    with pytest.raises(PPSDWorkerError, match=r"(?s)stage 2 \(rank 1\).*injected stage fault"):
        run_ppsd(model, [3, 4], 12, stages=2, backend="distributed")
    assert _descendants_of_children() == []


class SignalMLP(nn.Module):
    """A layer's MLP that sends its own process `signum` on its `calls`-th call, after writing the time to `mark`
    (as an operator's `kill -STOP` or the OOM killer would, mid-run)."""

    def __init__(self, mlp: nn.Module, calls: int, signum: int, mark: str) -> None:
        super().__init__()
        self.mlp, self.calls, self.signum, self.mark = mlp, calls, signum, mark

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls -= 1
        if self.calls == 0:
            Path(self.mark).write_text(repr(time.time()))
            os.kill(os.getpid(), self.signum)
        return self.mlp(hidden)


class SlowMLP(nn.Module):
    """A layer's MLP that takes `delay_s` per call: a slow but healthy stage."""

    def __init__(self, mlp: nn.Module, delay_s: float) -> None:
        super().__init__()
        self.mlp, self.delay_s = mlp, delay_s

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.mlp(hidden)


def test_a_stopped_worker_is_named_within_the_stall_timeout(tmp_path: Path) -> None:
    model = tiny_model("llama", 4, seed=6)
    mark = tmp_path / "stopped_at"
    model.model.layers[3].mlp = SignalMLP(model.model.layers[3].mlp, 5, signal.SIGSTOP, str(mark))
    stall_s = 2.0
    with pytest.raises(PPSDWorkerError) as caught:
        run_ppsd(model, [3, 4], 40, stages=2, backend="distributed", stall_timeout_s=stall_s)
    late_s = time.time() - float(mark.read_text())
    message = str(caught.value)
    assert message.startswith("PPSD stage 2 (rank 1) stalled: no heartbeat for ") and "\n" not in message
    assert "stall_timeout_s=2)" in message and "rank 0" not in message
    assert late_s < stall_s + 4.0  # the stall timeout, a heartbeat interval, the poll and stopping the others
    assert _descendants_of_children() == []


@pytest.mark.parametrize(("layer", "rank"), [(3, 1), (1, 0)])
def test_a_killed_worker_is_the_one_named(tmp_path: Path, layer: int, rank: int) -> None:
    """Its neighbour fails too, losing it: the caller names the rank that died, not the survivor."""
    model = tiny_model("llama", 4, seed=6)
    mark = tmp_path / "killed_at"
    model.model.layers[layer].mlp = SignalMLP(model.model.layers[layer].mlp, 5, signal.SIGKILL, str(mark))
    with pytest.raises(PPSDWorkerError) as caught:
        run_ppsd(model, [3, 4], 40, stages=2, backend="distributed", stall_timeout_s=30)
    assert time.time() - float(mark.read_text()) < 10
    assert str(caught.value) == f"PPSD stage {rank + 1} (rank {rank}) died: killed by signal 9 (SIGKILL)"
    assert _descendants_of_children() == []


def test_a_slow_healthy_run_outlasts_its_stall_timeout() -> None:
    """No whole-run time limit: passes slower than the stall timeout in total never stop a run whose processes
    keep beating."""
    model = scale_late_layers(tiny_model("llama", 4, seed=3), 2, 0.3)
    model.model.layers[3].mlp = SlowMLP(model.model.layers[3].mlp, 0.15)
    begin = time.monotonic()
    tokens, stats = run_ppsd(model, [7, 1, 30], 20, stages=2, backend="distributed", stall_timeout_s=1.5)
    assert time.monotonic() - begin > 2 * 1.5
    assert tokens == ar_tokens(model, [7, 1, 30], 20)
    check_accounting(stats, 20)


@pytest.mark.parametrize(
    ("value", "message"),
    [*((v, "a finite number of seconds > 0") for v in (0, -1.0, float("nan"), float("inf"), True, "30")),
     (0.001, r"at least 0.25 s .*got 0.001")],
)  # fmt: skip
def test_a_bad_stall_timeout_is_refused(value, message: str) -> None:
    with pytest.raises(ValueError, match=f"stall_timeout_s must be {message}"):
        executor.generate(tiny_model("llama", 4), [1, 2], method="ppsd", backend="distributed", stall_timeout_s=value)


def test_stage_model_holds_only_its_layers() -> None:
    model = tiny_model("llama", 6, seed=7)
    plan = plan_stages(6, 3)
    shares = [stage_model(model, plan, s) for s in range(3)]
    ids = {s: {id(p) for p in part.parameters()} for s, part in enumerate(shares)}
    for s in range(3):
        for index, layer in enumerate(model.model.layers):
            inside = index in plan.layers(s)
            assert all((id(p) in ids[s]) == inside for p in layer.parameters())
    assert id(model.model.embed_tokens.weight) in ids[0] and id(model.model.embed_tokens.weight) not in ids[1]
    assert id(model.lm_head.weight) in ids[2] and id(model.lm_head.weight) not in ids[1]
    assert len(model.model.layers) == 6 and all(not isinstance(x, nn.Identity) for x in model.model.layers)


def test_a_stage_model_leaves_the_decoders_caches_behind() -> None:
    """What the decoders keep on the model (a loaded head, its passes) holds the whole model: a stage's copy that
    carried it pickled every weight to every process (past the forkserver's file descriptors: 'too many fds', with
    any head file). The model keeps its own."""
    import pickle

    model = tiny_model("llama", 6, seed=7)
    model.__dict__["_eesd_heads"] = {"a head": model}  # as `heads.loaded_head` keeps one: it reaches the model
    model.__dict__["_eesd_passes"] = {"a pass": model}
    kept = [name for name in model.__dict__ if name.startswith("_eesd")]
    share = stage_model(model, plan_stages(6, 3), 1)
    assert not [name for name in share.__dict__ if name.startswith("_eesd")]
    assert [name for name in model.__dict__ if name.startswith("_eesd")] == kept
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(pickle.dumps(share)) < whole / 2  # its own two layers, not the model


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stages": 1}, "stages must be an integer >= 2"),
        ({"stages": 5}, "must not exceed the model's 4 layers"),
        ({"stages": 2, "stage_boundaries": [0]}, "strictly increasing"),
        ({"stages": 2, "stage_boundaries": [4]}, "strictly increasing"),
        ({"stages": 3, "stage_boundaries": [2, 2]}, "strictly increasing"),
        ({"stages": 3, "stage_boundaries": [3, 1]}, "strictly increasing"),
        ({"stages": 3, "stage_boundaries": [1]}, "cut points"),
        ({"stages": 2, "stage_boundaries": [1, 2, 4]}, "must start at 0"),
        ({"stages": 3, "exit_layer": 3}, r"exit_layer 3 leaves 1 of 4 layers for 2 later stages"),
        ({"stages": 2, "exit_layer": 4}, r"exit_layer must be an integer in \[1, 3\] for 2 stages of 4 layers"),
        ({"stages": 2, "stage_boundaries": [1], "exit_layer": 2}, r"inside stage 1.*\[1, 1\]"),
        ({"stages": 2, "exit_layer": 0}, r"in \[1, 3\] for 2 stages .*got 0"),
        ({"stages": 2, "backend": "threads"}, "backend must be one of"),
        ({"stages": 2, "backend": "streams"}, "needs a GPU"),
        ({"stages": 2, "sampling": SamplingConfig(True, "rejection")}, "greedy and exact sampling"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, message: str) -> None:
    model = tiny_model("llama", 4)
    with pytest.raises(ValueError, match=message):
        run_ppsd(model, [1, 2], 4, **kwargs)


def test_an_exit_layer_past_balanced_stage_1_ends_stage_1_there() -> None:
    """A trained head at E = 14 of 18 (Gemma-3's) with 2 stages: stage 1 is [0, 14), as the simulator lays a PPSD
    point out, where it was refused (balanced stage 1 ends at 9); the output is AR's. Given cut points still rule."""
    assert plan_stages(18, 2, None, 14).bounds == (0, 14, 18) and plan_stages(18, 3, None, 14).bounds == (0, 14, 16, 18)
    assert plan_stages(30, 2, None, 8).bounds == (0, 15, 30)  # inside balanced stage 1: balanced, drafting at 8
    model = tiny_model("llama", 6, seed=3)
    reference = executor.generate(model, [5, 6, 7], method="ar", max_new_tokens=10).sequences
    out = executor.generate(model, [5, 6, 7], method="ppsd", exit_layer=4, max_new_tokens=10)
    assert out.stats.stage_boundaries == (0, 4, 6) and torch.equal(out.sequences, reference)


@given(layers=st.integers(2, 40), stages=st.integers(2, 6), exit_layer=st.integers(1, 39) | st.none())
def test_the_simulator_lays_ppsd_stages_out_as_the_executor_does(layers: int, stages: int, exit_layer: int | None):
    """A PPSD point without explicit layers has the executor's stages and exit layer (`plan_stages`): balanced,
    drafting inside stage 1 where the exit lies before its end, stage 1 ending at an exit past it; and both refuse the
    same layouts."""
    from sim.plan import build_plan
    from sim.scenario import Point, Scenario, ScenarioError

    stages = min(stages, layers)
    exit_layer = None if exit_layer is None else min(exit_layer, layers - 1)
    shape = {"name": "m", "num_layers": layers, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 4,
             "intermediate_size": 128, "vocab_size": 100}  # fmt: skip
    scenario = Scenario.model_validate({
        "name": "t", "model": shape, "method": "ppsd", "exit_layer": exit_layer, "acceptance": {"alpha": 0.5},
        "topology": {"gpu": "H100", "stages": stages}, "workload": {"requests": 1, "output_len": 4},
    })  # fmt: skip
    try:
        expected = plan_stages(layers, stages, None, exit_layer)
    except ValueError:
        with pytest.raises(ScenarioError, match="exit_layer: leaves"):
            build_plan(Point(0, {}, scenario, Path("."), "t.yaml"))
        return
    plan = build_plan(Point(0, {}, scenario, Path("."), "t.yaml"))
    assert (0, *(stage.layer_end for stage in plan.stages)) == expected.bounds
    assert plan.exit_layer == expected.exit_layer


def test_explicit_full_bounds_and_balanced_default() -> None:
    assert plan_stages(10, 4).bounds == (0, 2, 4, 7, 10)
    assert plan_stages(10, 2, [0, 3, 10], 2).bounds == (0, 3, 10)
    for layers in range(2, 13):
        for stages in range(2, layers + 1):
            bounds = balanced_bounds(layers, stages)
            sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
            assert sum(sizes) == layers and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
