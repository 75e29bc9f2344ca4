"""The static passes (`executor.passes`) that a GPU captures in CUDA graphs (AR, EESD draft and verify, PPSD stage
steps), checked on the CPU:

- a pass does no host work: run under a guard that raises on any device -> host read, any tensor built from host
  data and any data-dependent shape, the decoders still finish (a capture would fail on exactly these);
- a pass is idempotent: run three times per launch (as warm-up + capture + replay do), the output still equals HF;
- the decode loop reads the device once per round (once per draft step more for a confidence policy);
- the capture modes resolve and refuse as documented, and captured passes are reused per model and setup.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import TinySpec, hf_greedy, scale_late_layers, tiny_model

import executor
from executor.adapter import ModelAdapter
from executor.api import PassSetup
from executor.decoding import GenerationStats, Rows, TokenSink, decode_ar, decode_eesd
from executor.heads import SharedExitHead, TrainedExitHead
from executor.passes import MAX_RUNNERS_PER_MODEL, Passes, StaticPass, cached_passes, resolve_capture
from executor.sampling import SamplingConfig, TokenSelector
from sim.policy import make_policy

SPEC = TinySpec(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, vocab=97, seed=3)
EXIT_LAYER = 2
PROMPTS = [[5, 17, 2, 40, 33], [8, 12]]


class HostWork(AssertionError):
    pass


@contextlib.contextmanager
def no_host_work():
    """Inside: reading a tensor's values on the host, building a tensor from host data, or a data-dependent shape
    raises HostWork. These are what make a CUDA graph capture fail (or sync every replay)."""

    def refuse(name):
        def method(*args, **kwargs):
            raise HostWork(f"host work inside a static pass: {name}")

        return method

    patched = {
        (torch.Tensor, name): refuse(f"Tensor.{name}")
        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")
    }
    patched |= {(torch, name): refuse(f"torch.{name}") for name in ("tensor", "as_tensor", "nonzero")}
    saved = {key: getattr(*key) for key in patched}
    try:
        for (owner, name), replacement in patched.items():
            setattr(owner, name, replacement)
        yield
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)


def strict(self) -> None:
    """A static pass's idempotent part run three times per launch, then its advance once (as a warmed-up, captured
    pass runs), each under the no-host-work guard."""
    for _ in range(3):
        with no_host_work():
            self.fn()
    if self.advance is not None:
        with no_host_work():
            self.advance()


@pytest.fixture
def strict_passes(monkeypatch):
    monkeypatch.setattr(StaticPass, "__call__", strict)


def model(epsilon: float = 0.3) -> torch.nn.Module:
    return scale_late_layers(tiny_model(SPEC, torch.float64), EXIT_LAYER, epsilon)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "ar"},
        {"method": "eesd", "draft_len": 3},
        {"method": "eesd", "policy": "beta-ts"},
        {"method": "eesd", "policy": "confidence:0.5"},
        {"method": "eesd", "policy": "beta-ts:cost=0.7", "head": "layered", "sync_every": 4},  # `ar_head`, drafts
        {"method": "eesd", "draft_len": 2, "do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 0.7},
        {"method": "eesd", "draft_len": 4, "min_new_tokens": 6, "eos_token_id": [3, 7]},
        {"method": "eesd", "draft_len": 3, "do_sample": True, "sampling": "rejection", "top_k": 30},
        {"method": "eesd", "policy": "confidence:0.3", "do_sample": True, "sampling": "rejection"},
        {"method": "ar", "repetition_penalty": 1.3},
        {"method": "eesd", "draft_len": 3, "repetition_penalty": 1.3, "do_sample": True, "top_k": 20},
        {"method": "eesd", "policy": "confidence:0.3", "repetition_penalty": 0.8},
        {"method": "eesd", "draft_len": 2, "do_sample": True, "sampling": "rejection", "repetition_penalty": 1.5},
        {"method": "ppsd", "stages": 2},
        {"method": "ppsd", "stages": 3, "do_sample": True, "top_k": 10, "min_new_tokens": 4, "eos_token_id": 3},
        {"method": "ppsd", "stages": 2, "repetition_penalty": 1.4},
        {"method": "ppsd", "stages": 3, "repetition_penalty": 0.8, "do_sample": True, "top_p": 0.9},
    ],
)
def test_passes_do_no_host_work_and_are_idempotent(monkeypatch, kwargs) -> None:
    """Strict passes give what plain ones give: AR's tokens (greedy, exact sampling) or, for rejection sampling, the
    same seeded draws (its noise is keyed by position, so a run is a function of the seed)."""
    net = model()
    if kwargs.get("head") == "layered":  # a head with a layer of its own: zero-draft rounds chain as `ar_head`
        kwargs = {**kwargs, "head": TrainedExitHead(ModelAdapter(net), EXIT_LAYER).requires_grad_(False)}
    if kwargs.get("sampling") == "rejection":
        reference = executor.generate(net, [PROMPTS[0]], max_new_tokens=14, **kwargs)
    else:
        reference = executor.generate(net, [PROMPTS[0]], max_new_tokens=14, method="ar", **{
            k: v for k, v in kwargs.items() if k not in ("method", "draft_len", "policy", "stages", "head")
        })  # fmt: skip
    monkeypatch.setattr(StaticPass, "__call__", strict)
    out = executor.generate(net, [PROMPTS[0]], max_new_tokens=14, **kwargs)
    assert out.sequences.tolist() == reference.sequences.tolist()


def test_strict_passes_equal_hf_for_a_batch_and_a_trained_head(strict_passes) -> None:
    net = model()
    head = TrainedExitHead(ModelAdapter(net), EXIT_LAYER)
    ids = torch.tensor([[0, 0, 0] + PROMPTS[1], PROMPTS[0]])
    mask = (torch.arange(5) >= torch.tensor([[3], [0]])).long()
    out = executor.generate(net, ids, attention_mask=mask, method="eesd", head=head, draft_len=3, max_new_tokens=9)
    for row, prompt in enumerate((PROMPTS[1], PROMPTS[0])):
        reference, _ = hf_greedy(net, prompt, 9)
        assert out.sequences[row, 5:].tolist() == reference[0, len(prompt) :].tolist()


def test_the_guard_catches_host_work() -> None:
    """The guard is not vacuous: the pre-static decoder read its drafts inside the draft step."""
    with no_host_work(), pytest.raises(HostWork):
        torch.ones(2).argmax().tolist()
    with no_host_work(), pytest.raises(HostWork):
        bool(torch.ones(1) > 0)
    with no_host_work(), pytest.raises(HostWork):
        torch.tensor([1, 2])


def _decode(method: str, policy: str, max_new_tokens: int = 20, config: SamplingConfig | None = None):
    adapter = ModelAdapter(model())
    policies = [make_policy(policy)] if method == "eesd" else []
    config = config or SamplingConfig()
    head = SharedExitHead(adapter) if method == "eesd" else None
    setup = PassSetup(method, config, 0, [], EXIT_LAYER if head else None, head, policies, "none")
    passes = setup.passes(adapter, [PROMPTS[0]], max_new_tokens)
    rows = Rows(prompts=[PROMPTS[0]], sinks=[TokenSink(max_new_tokens, ())])
    stats = GenerationStats(method=method)
    if method == "ar":
        decode_ar(adapter, rows, passes, stats)
    else:
        decode_eesd(adapter, rows, passes, stats, policies=policies)
    stats.new_tokens = len(rows.sinks[0].tokens)
    return stats


@pytest.mark.parametrize("policy", ["fixed:3", "beta-ts", "heuristic"])
def test_one_host_read_per_round(policy: str) -> None:
    stats = _decode("eesd", policy)
    assert stats.host_reads == len(stats.accepted) == stats.rounds
    assert sum(a + 1 for a in stats.accepted) + 1 == stats.new_tokens == 20


def test_rejection_sampling_reads_once_per_round() -> None:
    stats = _decode("eesd", "fixed:3", config=SamplingConfig(do_sample=True, mode="rejection", seed=5))
    assert stats.host_reads == len(stats.accepted) == stats.rounds
    assert sum(stats.accepted) > 0


def test_ar_reads_once_per_token_and_confidence_once_per_draft_step() -> None:
    ar = _decode("ar", "")
    assert ar.host_reads == 19  # the first token comes from the prefill
    conf = _decode("eesd", "confidence:0.5")
    assert conf.host_reads == len(conf.accepted) + sum(conf.drafted)


def test_host_reads_are_counted_where_they_happen(monkeypatch) -> None:
    """`host_reads` is not self-reported only: count every Tensor.tolist/item the decode loop makes."""
    calls = []
    for name in ("tolist", "item"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original: calls.append(1) or _o(self))
    stats = _decode("eesd", "fixed:4")
    assert len(calls) == stats.host_reads + 1  # + the prefill's first token


def test_capture_modes(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_capture("auto", cpu, "greedy") == "none"
    monkeypatch.setattr("executor.passes.inductor_available", lambda: True)
    assert resolve_capture("auto", cuda, "exact") == "compile-layers"
    assert resolve_capture("auto", cuda, "rejection") == "compile-layers"  # its verdict runs on the device, keyed
    monkeypatch.setattr("executor.passes.inductor_available", lambda: False)  # no Triton: plain CUDA graphs
    assert resolve_capture("auto", cuda, "greedy") == "graph"
    assert resolve_capture("compile", cpu, "greedy") == "compile"
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        resolve_capture("graph", cpu, "greedy")
    with pytest.raises(ValueError, match="capture must be one of"):
        resolve_capture("cudagraphs", cpu, "greedy")
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        executor.generate(model(), [PROMPTS[0]], max_new_tokens=2, capture="graph")


def test_cached_passes_are_reused_per_key_and_bounded() -> None:
    net = model()
    built = []

    def build():
        built.append(object())
        return built[-1]

    first = cached_passes(net, ("a",), build)
    assert cached_passes(net, ("a",), build) is first and len(built) == 1
    for index in range(MAX_RUNNERS_PER_MODEL):
        cached_passes(net, ("b", index), build)
    assert len(net.__dict__["_eesd_passes"]) == MAX_RUNNERS_PER_MODEL
    assert cached_passes(net, ("a",), build) is not first  # the oldest went


def test_a_cached_setup_restarts_its_selector_and_cache() -> None:
    """The cached path (as on a GPU) with passes run as they are: a second call with another seed and prompt
    length reuses the buffers and still equals a fresh run."""
    net = model()

    class Eager(PassSetup):
        def passes(self, adapter, prompts, max_new_tokens):
            lengths = [len(p) for p in prompts]
            key = ("test", len(prompts))
            passes = cached_passes(adapter.model, key, lambda: self._build(adapter, lengths, 64, 4, "none"))
            passes.selector.restart(lengths, self.config.seed)
            passes.cache.rollback(0)
            return passes

    adapter = ModelAdapter(net)
    outputs = []
    for seed, prompt in ((1, PROMPTS[0]), (2, PROMPTS[1])):
        config = SamplingConfig(do_sample=True, seed=seed)
        policies = [make_policy("fixed:4")]
        setup = Eager("eesd", config, 0, [], EXIT_LAYER, SharedExitHead(adapter), policies, "none")
        passes = setup.passes(adapter, [prompt], 12)
        rows = Rows(prompts=[prompt], sinks=[TokenSink(12, ())])
        decode_eesd(adapter, rows, passes, GenerationStats("eesd"), policies=policies)
        outputs.append((passes, rows.sinks[0].tokens))
        fresh = executor.generate(net, [prompt], method="ar", do_sample=True, seed=seed, max_new_tokens=12)
        assert rows.sinks[0].tokens == fresh.sequences[0, len(prompt) :].tolist()
    assert outputs[0][0] is outputs[1][0]


def test_static_pass_runs_the_function_without_capture() -> None:
    counter = []
    step = StaticPass(lambda: counter.append(1), "none")
    step()
    step()
    assert len(counter) == 2 and not step.captured


def test_passes_refill_inputs() -> None:
    adapter = ModelAdapter(model())
    selector = TokenSelector(SamplingConfig(), [3, 2], 0, [], "cpu")
    passes = Passes(adapter, adapter.new_cache(2, 16), selector, exit_layer=EXIT_LAYER, max_draft=3)
    passes.load([4, 9], [3, 2], 3)
    assert passes.ids.tolist() == [[4], [9]]
    assert passes.positions[3].tolist() == [[3, 4, 5], [2, 3, 4]]
    assert sorted(passes.positions) == [1, 2, 3, 4]


def test_compiled_passes_equal_ar_and_are_reused() -> None:
    """capture="compile" (torch.compile, reduce-overhead; on a CPU without CUDA graphs): same tokens as AR, and a
    second call reuses the compiled passes (one cached setup on the model)."""
    net = model()
    reference = executor.generate(net, [PROMPTS[0]], method="ar", max_new_tokens=10, capture="none")
    for _ in range(2):
        out = executor.generate(
            net, [PROMPTS[0]], method="eesd", exit_layer=EXIT_LAYER, draft_len=2, max_new_tokens=10, capture="compile"
        )
        assert out.stats.capture == "compile"
        assert out.sequences.tolist() == reference.sequences.tolist()
    assert len(net.__dict__["_eesd_passes"]) == 1


def test_ppsd_reads_the_host_at_most_once_per_tick() -> None:
    out = executor.generate(model(), [PROMPTS[0]], method="ppsd", stages=3, max_new_tokens=16)
    stats = out.stats
    assert stats.confirms + stats.flushes > 0
    assert stats.new_tokens - 1 <= stats.host_reads <= stats.ticks


def test_a_failed_capture_falls_back_under_auto_and_raises_under_graph(monkeypatch) -> None:
    """capture="auto" keeps working where a model cannot be captured (warns, runs the pass as it is); an explicit
    "graph" surfaces the failure. (The capture itself is replaced: this box has no GPU.)"""

    def failing_capture(warmup, fn=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr("executor.passes.capture_graph", failing_capture)
    calls = []
    strict_pass = StaticPass(lambda: calls.append(1), "graph")
    with pytest.raises(RuntimeError, match="stream is capturing"):
        strict_pass()
    lenient = StaticPass(lambda: calls.append(1), "graph", fallback=True)
    with pytest.warns(RuntimeWarning, match="runs uncaptured"):
        lenient()
    lenient()
    assert len(calls) == 2 and lenient.mode == "none" and not lenient.captured


def test_cached_passes_are_dropped_when_the_weights_move() -> None:
    net = model()
    first = cached_passes(net, ("a",), object)
    assert cached_passes(net, ("a",), object) is first
    net.to(torch.float32)  # new tensors at new addresses: a captured graph would read freed memory
    assert cached_passes(net, ("a",), object) is not first
    assert len(net.__dict__["_eesd_passes"]) == 1


def test_passes_for_longer_drafts_serve_a_policy_of_shorter_ones() -> None:
    """EESD's captured passes built for drafts of up to 3 serve fixed:1 and fixed:2 (the same draft step and verify
    widths; a frozen pass holds its own packed weights, so each policy building its own set multiplied them), the
    outputs, greedy and rejection-sampled, those of fresh uncaptured passes."""
    net = model()
    ids = torch.tensor([PROMPTS[0]])

    def run(policy: str, capture: str, **sampling) -> list[int]:
        out = executor.generate(net, ids, method="eesd", exit_layer=EXIT_LAYER, policy=policy, max_new_tokens=8,
                                capture=capture, **sampling)  # fmt: skip
        return out.sequences.tolist()

    sampled = {"do_sample": True, "sampling": "rejection", "temperature": 0.9, "seed": 5}
    assert run("fixed:3", "compile") == run("fixed:3", "none")
    assert run("fixed:3", "compile", **sampled) == run("fixed:3", "none", **sampled)
    kept = net.__dict__["_eesd_passes"]
    sets = list(kept.values())
    for policy in ("fixed:1", "fixed:2"):
        assert run(policy, "compile") == run(policy, "none")
    assert run("fixed:1", "compile", **sampled) == run("fixed:1", "none", **sampled)
    assert [key[1] for key in kept] == [3, 3] and sorted(map(id, kept.values())) == sorted(map(id, sets))


def test_which_kept_passes_serve_a_setup() -> None:
    """Passes for longer drafts serve shorter ones of the same setup; not the other way, nor another exit layer, nor
    AR (built, not run: nothing compiles)."""
    adapter = ModelAdapter(model())

    def passes(policy: str | None, exit_layer: int = EXIT_LAYER, method: str = "eesd") -> Passes:
        policies = [make_policy(policy)] if policy else []
        setup = PassSetup(method, SamplingConfig(), 0, [], exit_layer if policy else None,
                          SharedExitHead(adapter) if policy else None, policies, "compile")  # fmt: skip
        return setup.passes(adapter, [PROMPTS[0]], 8)

    wide = passes("fixed:3")
    assert passes("fixed:1") is wide and passes("fixed:2") is wide and passes("fixed:3") is wide
    assert passes("fixed:4") is not wide and passes("fixed:4").max_draft == 4
    assert passes("fixed:1", exit_layer=1) is not wide
    assert passes(None, method="ar") is not wide


def test_kept_on_model_uses_a_kept_object_that_serves_the_key() -> None:
    from executor.passes import kept_on_model

    net = model()
    built: list[object] = []

    def build():
        built.append(object())
        return built[-1]

    wide = kept_on_model(net, "_t", ("a", 3), build, 4)
    assert kept_on_model(net, "_t", ("a", 2), build, 4, lambda key: key[0] == "a" and key[1] >= 2) is wide
    assert kept_on_model(net, "_t", ("a", 4), build, 4, lambda key: key[0] == "a" and key[1] >= 4) is not wide
    assert kept_on_model(net, "_t", ("a", 2), build, 4, lambda key: False) is not wide and len(built) == 3


def test_uncaptured_eesd_cache_holds_the_drafts_the_output_allows() -> None:
    """A policy's longest draft beyond what the output leaves (fixed:8 for 4 new tokens) sizes the cache by the capped
    draft (`sim.contract.draft_capacity`: 3): prompt + output + 3 + 1 slots, the capacity the simulator plans
    (tests/test_sim_scenarios.py::test_plans_carry_the_executors_cache_capacity)."""
    adapter = ModelAdapter(model())
    setup = PassSetup("eesd", SamplingConfig(), 0, [], EXIT_LAYER, SharedExitHead(adapter), [make_policy("fixed:8")],
                      "none")  # fmt: skip
    passes = setup.passes(adapter, [PROMPTS[0]], 4)
    assert passes.max_draft == 3 and passes.cache.max_len == len(PROMPTS[0]) + 4 + 3 + 1
