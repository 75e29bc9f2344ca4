"""The captured decoders on a CUDA device, token for token against HF `generate` (skipped without a GPU).

The CPU suite checks the passes uncaptured, and that they do no host work and are idempotent (what a capture needs);
this module runs the same decoders where they are really captured: CUDA graphs (`capture="graph"`), compiled layers
in CUDA graphs (`"compile-layers"`, the GPU default), `torch.compile(mode="reduce-overhead")` and the `streams` PPSD
backend, in float64 so that a verify pass over q tokens and a one-token step round alike (lossless means the same
tokens, with no tie to excuse). Run it on a GPU box with `python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import TinySpec, scale_late_layers, tiny_model

import executor
from executor.adapter import ModelAdapter
from executor.heads import TrainedExitHead

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EXIT_LAYER = 2
PROMPTS = [[5, 17, 2, 40, 33], [8, 12], [3] * 40]
ARCHS = ("llama", "qwen2", "mistral", "gemma3")


def cuda_model(spec: TinySpec, epsilon: float = 0.2) -> torch.nn.Module:
    return scale_late_layers(tiny_model(spec, torch.float64), EXIT_LAYER, epsilon).to("cuda")


def hf_tokens(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip
    return out[0].tolist()


def ours(model: torch.nn.Module, prompt: list[int], new_tokens: int, **kwargs) -> tuple[list[int], object]:
    result = executor.generate(model, [prompt], max_new_tokens=new_tokens, **kwargs)
    return result.sequences[0].tolist(), result.stats


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("capture", ["graph", "none"])
def test_ar_and_eesd_equal_hf(arch: str, capture: str) -> None:
    model = cuda_model(TinySpec(arch=arch, num_layers=4, seed=1))
    for prompt in PROMPTS:
        reference = hf_tokens(model, prompt, 24)
        tokens, stats = ours(model, prompt, 24, method="ar", capture=capture)
        assert tokens == reference and stats.capture == capture
        for policy in ("fixed:3", "beta-ts", "fixed:1"):
            kwargs = {"method": "eesd", "exit_layer": EXIT_LAYER, "policy": policy, "capture": capture}
            tokens, stats = ours(model, prompt, 24, **kwargs)
            assert tokens == reference, (arch, capture, policy, prompt)
            assert sum(stats.accepted) > 0  # the epsilon trick makes drafts land: the accept path is exercised


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    epsilon=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    prompt=st.lists(st.integers(1, 96), min_size=1, max_size=30),
    new_tokens=st.integers(1, 40),
    draft_len=st.integers(1, 6),
)
def test_captured_eesd_equals_hf_property(seed, epsilon, prompt, new_tokens, draft_len) -> None:
    model = cuda_model(TinySpec(num_layers=4, seed=seed), epsilon)
    reference = hf_tokens(model, prompt, new_tokens)
    tokens, _ = ours(model, prompt, new_tokens, method="eesd", exit_layer=EXIT_LAYER, draft_len=draft_len)
    assert tokens == reference


def test_eesd_with_trained_and_subset_heads_equals_hf() -> None:
    model = cuda_model(TinySpec(num_layers=4, seed=2))
    trained = TrainedExitHead(ModelAdapter(model), EXIT_LAYER).to("cuda", torch.float64).requires_grad_(False)
    for prompt in PROMPTS:
        reference = hf_tokens(model, prompt, 20)
        for head in (trained, "shared:48"):
            tokens, _ = ours(model, prompt, 20, method="eesd", exit_layer=EXIT_LAYER, head=head, draft_len=3)
            assert tokens == reference


@pytest.mark.parametrize("capture", ["graph", "compile-layers"])
def test_trained_head_chains_zero_draft_rounds_captured(capture: str) -> None:
    """A trained head's zero-draft rounds chain as the captured `Passes.ar_head` step (its layer's KV written inside
    the graph), between drafting rounds that read that KV: HF's tokens, fewer host reads than rounds."""
    model = cuda_model(TinySpec(num_layers=4, seed=2))
    trained = TrainedExitHead(ModelAdapter(model), EXIT_LAYER).to("cuda", torch.float64).requires_grad_(False)
    for prompt in PROMPTS:
        reference = hf_tokens(model, prompt, 24)
        kwargs = {"exit_layer": EXIT_LAYER, "head": trained, "policy": "beta-ts:cost=0.9,max=4", "sync_every": 8}
        tokens, stats = ours(model, prompt, 24, method="eesd", capture=capture, **kwargs)
        assert tokens == reference, (capture, prompt)
        assert stats.capture == capture and stats.drafted.count(0) > 1 and sum(stats.drafted) > 0
        assert stats.host_reads < len(stats.drafted)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("backend", ["streams", "sequential"])
def test_ppsd_equals_hf(stages: int, backend: str) -> None:
    """The pipe chained on the device (captured stage passes and transition), read every tick or every few."""
    model = cuda_model(TinySpec(num_layers=6, seed=4), epsilon=0.1)
    flushes = 0
    for prompt in PROMPTS:
        reference = hf_tokens(model, prompt, 24)
        for sync_every in (None, 1, 5):
            kwargs = {"stages": stages, "backend": backend, "sync_every": sync_every, "capture": "graph"}
            tokens, stats = ours(model, prompt, 24, method="ppsd", **kwargs)
            assert tokens == reference, (stages, backend, prompt, sync_every)
            assert stats.capture == "graph"
            flushes += stats.flushes
    assert flushes > 0  # the flush path ran captured


def test_compiled_ppsd_equals_hf() -> None:
    model = cuda_model(TinySpec(num_layers=4, seed=4), epsilon=0.1)
    for prompt in PROMPTS[:2]:
        tokens, stats = ours(model, prompt, 20, method="ppsd", stages=2, backend="streams", capture="compile")
        assert tokens == hf_tokens(model, prompt, 20) and stats.capture == "compile"


def test_exact_sampling_is_the_same_captured_or_not() -> None:
    """Seeded "exact" sampling: EESD's tokens equal AR's, captured or not (keyed noise, on the device)."""
    model = cuda_model(TinySpec(num_layers=4, seed=5))
    sampling = {"do_sample": True, "temperature": 0.9, "top_k": 20, "seed": 7}
    for prompt in PROMPTS:
        ar, _ = ours(model, prompt, 24, method="ar", capture="none", **sampling)
        for capture in ("graph", "none"):
            assert ours(model, prompt, 24, method="ar", capture=capture, **sampling)[0] == ar
            assert ours(model, prompt, 24, method="eesd", exit_layer=EXIT_LAYER, capture=capture, **sampling)[0] == ar
        assert ours(model, prompt, 24, method="ppsd", stages=2, backend="streams", **sampling)[0] == ar


def test_batch_with_left_padding_equals_hf_per_row() -> None:
    model = cuda_model(TinySpec(num_layers=4, seed=6))
    rows = [[0, 0, 0, 9, 4, 7], [5, 17, 2, 40, 33, 1]]
    ids = torch.tensor(rows, device="cuda")
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6], device="cuda")
    out = executor.generate(model, ids, attention_mask=mask, method="eesd", exit_layer=EXIT_LAYER, max_new_tokens=16)
    for row, tokens in zip(([9, 4, 7], rows[1]), out.sequences.tolist(), strict=True):
        assert tokens[-16:] == hf_tokens(model, row, 16)[-16:]


@pytest.mark.parametrize(("backend", "capture"), [("streams", "graph"), ("streams", "compile-layers"),
                                                  ("sequential", "graph")])  # fmt: skip
def test_a_ppsd_batch_in_lockstep_equals_hf_per_row(backend: str, capture: str) -> None:
    """PPSD's rows in lockstep on the GPU: the stages' captured passes and the transition over 3 left-padded rows
    (an EOS that ends one early, blocks of 1 and 5 ticks), each row AR's alone; flushes ran."""
    model = cuda_model(TinySpec(num_layers=6, seed=4), epsilon=0.1)
    rows = [[0, 0, 0, 9, 4, 7], [5, 17, 2, 40, 33, 1], [0, 0, 0, 0, 0, 8]]
    ids = torch.tensor(rows, device="cuda")
    mask = (ids != 0).long()
    alone = [hf_tokens(model, [t for t in row if t], 20)[-20:] for row in rows]
    eos = alone[2][6]
    for sync_every in (1, 5):
        out = executor.generate(model, ids, attention_mask=mask, method="ppsd", stages=3, backend=backend,
                                capture=capture, sync_every=sync_every, max_new_tokens=20, eos_token_id=eos,
                                pad_token_id=0)  # fmt: skip
        for tokens, reference in zip(out.sequences[:, 6:].tolist(), alone, strict=True):
            cut = reference.index(eos) + 1 if eos in reference else len(reference)
            assert tokens[:cut] == reference[:cut], (backend, capture, sync_every)
        assert out.stats.rows == 3 and out.stats.flushes > 0 and out.stats.capture == capture


def test_compiled_passes_equal_hf() -> None:
    model = cuda_model(TinySpec(num_layers=4, seed=8))
    for prompt in PROMPTS[:2]:
        reference = hf_tokens(model, prompt, 16)
        assert ours(model, prompt, 16, method="ar", capture="compile")[0] == reference
        tokens, _ = ours(model, prompt, 16, method="eesd", exit_layer=EXIT_LAYER, draft_len=2, capture="compile")
        assert tokens == reference


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_compiled_layers_in_graphs_equal_hf(arch: str) -> None:
    """capture="compile-layers": Inductor's layer kernels inside our CUDA graphs, every pass (AR, EESD's draft and
    verify, PPSD's stages on their streams)."""
    model = cuda_model(TinySpec(arch=arch, num_layers=4, seed=8))
    for prompt in PROMPTS[:2]:
        reference = hf_tokens(model, prompt, 16)
        tokens, stats = ours(model, prompt, 16, method="ar", capture="compile-layers")
        assert tokens == reference and stats.capture == "compile-layers"
        eesd = {"method": "eesd", "exit_layer": EXIT_LAYER, "draft_len": 3, "capture": "compile-layers"}
        assert ours(model, prompt, 16, **eesd)[0] == reference
        ppsd = {"method": "ppsd", "stages": 2, "backend": "streams", "capture": "compile-layers"}
        assert ours(model, prompt, 16, **ppsd)[0] == reference


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_the_default_capture_is_compiled_layers_and_equals_hf(arch: str) -> None:
    """capture="auto" on a GPU: compiled layers in CUDA graphs, on fused q/k/v and gate/up (`executor.fusion`; Qwen2
    with its q/k/v biases, Phi-3 with its own fused projections), AR, EESD and PPSD; and the same tokens unfused."""
    from executor import passes

    model = cuda_model(TinySpec(arch=arch, num_layers=4, seed=11))
    prompt = PROMPTS[0]
    reference = hf_tokens(model, prompt, 16)
    for kwargs in ({"method": "ar"}, {"method": "eesd", "exit_layer": EXIT_LAYER},
                   {"method": "ppsd", "stages": 2, "backend": "streams"}):  # fmt: skip
        tokens, stats = ours(model, prompt, 16, **kwargs)
        assert tokens == reference and stats.capture == "compile-layers", kwargs
    passes.FUSE_CAPTURED = False
    try:
        assert ours(model, prompt, 16, method="eesd", exit_layer=EXIT_LAYER, capture="graph")[0] == reference
    finally:
        passes.FUSE_CAPTURED = True


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_on_the_second_gpu_decodes_there() -> None:
    """A model on cuda:1 while cuda:0 is current: graphs, streams and events must be made and replayed on cuda:1."""
    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, seed=10), torch.float64), EXIT_LAYER, 0.2)
    model = model.to("cuda:1")
    ids = torch.tensor([PROMPTS[0]], device="cuda:1")
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                               do_sample=False, pad_token_id=0)[0].tolist()  # fmt: skip
    with torch.cuda.device(0):
        for kwargs in ({"method": "ar"}, {"method": "eesd", "exit_layer": EXIT_LAYER},
                       {"method": "ppsd", "stages": 2, "backend": "streams"}):  # fmt: skip
            out = executor.generate(model, ids, max_new_tokens=16, capture="graph", **kwargs)
            assert out.sequences[0].tolist() == reference, kwargs


def test_captured_repetition_penalty_equals_hf() -> None:
    model = cuda_model(TinySpec(num_layers=4, seed=9))
    prompt = PROMPTS[0]
    ids = torch.tensor([prompt], device="cuda")
    hf = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False,
        repetition_penalty=1.3, pad_token_id=0,
    )[0].tolist()  # fmt: skip
    for method in ("ar", "eesd"):
        tokens, _ = ours(model, prompt, 20, method=method, exit_layer=EXIT_LAYER, repetition_penalty=1.3)
        assert tokens == hf, method


@pytest.mark.parametrize("capture", ["graph", "compile-layers"])
def test_captured_suppression_and_stop_strings_equal_hf(capture: str) -> None:
    """Suppressed ids (a device mask inside the captured passes) and a stopping criterion (host side, after each
    token of a round the device chained) give HF's tokens."""
    model = cuda_model(TinySpec(num_layers=4, seed=11))
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    free = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    always, first = list(dict.fromkeys(free))[:2], free[2:3]
    kwargs = dict(max_new_tokens=24, pad_token_id=0, suppress_tokens=always, begin_suppress_tokens=first)
    expected = model.generate(ids, do_sample=False, **kwargs)
    criteria = [lambda held, scores: held[:, -1] == int(expected[0, 15])]  # ends the row by its 11th new token
    stopped = model.generate(ids, do_sample=False, stopping_criteria=criteria, **kwargs)
    assert stopped.shape[1] < expected.shape[1]
    for method in ("ar", "eesd"):
        generator = executor.EarlyExitGenerator(model, method=method, exit_layer=EXIT_LAYER, capture=capture)
        assert torch.equal(generator.generate(ids, **kwargs), expected), method
        assert torch.equal(generator.generate(ids, stopping_criteria=criteria, **kwargs), stopped), method


@pytest.mark.parametrize("capture", ["graph", "compile-layers"])
def test_captured_ngram_ban_and_warpers_equal_uncaptured(capture: str) -> None:
    """HF's typical-p and eta warpers (made once per selector) and the n-gram ban (over the text the passes record)
    run inside the captured passes as device ops: greedy gives HF's tokens with the ban, exact sampling the
    uncaptured passes' tokens, EESD equal to AR; a batch with left padding too. Host prefix processors refuse a
    captured mode."""
    model = cuda_model(TinySpec(num_layers=4, seed=12))
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    greedy = dict(max_new_tokens=24, no_repeat_ngram_size=2, pad_token_id=0)
    expected = model.generate(ids, do_sample=False, **greedy)
    sampled = dict(max_new_tokens=20, do_sample=True, temperature=0.3, typical_p=0.7, eta_cutoff=0.2, seed=3)
    sampled.update(no_repeat_ngram_size=3)
    reference = executor.generate(model, ids, method="ar", capture="none", **sampled).sequences
    batch = torch.tensor([[0, 0] + PROMPTS[0][:3], PROMPTS[0]], device="cuda")
    mask = (torch.arange(5, device="cuda") >= torch.tensor([[2], [0]], device="cuda")).long()
    batch_expected = model.generate(batch, attention_mask=mask, do_sample=False, **greedy)
    for method in ("ar", "eesd"):
        generator = executor.EarlyExitGenerator(model, method=method, exit_layer=EXIT_LAYER, capture=capture)
        assert torch.equal(generator.generate(ids, **greedy), expected), method
        assert torch.equal(generator.generate(batch, attention_mask=mask, **greedy), batch_expected), method
        got = executor.generate(model, ids, method=method, exit_layer=EXIT_LAYER, capture=capture, **sampled)
        assert torch.equal(got.sequences, reference), method
    with pytest.raises(ValueError, match="capture must be 'auto' or 'none'"):
        executor.generate(model, ids, capture=capture, sequence_bias={(5, 17): 2.0})


def test_drop_in_generate_equals_model_generate_on_the_gpu() -> None:
    """`EarlyExitGenerator.generate` in place of `model.generate` (compiled layers in CUDA graphs by default on a
    GPU): same LongTensor, twice in a row (the second call replays the first call's graphs)."""
    model = cuda_model(TinySpec(num_layers=4, seed=10))
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    expected = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    generator = executor.EarlyExitGenerator(model, exit_layer=EXIT_LAYER, draft_len=3)
    for _ in range(2):
        got = generator.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
        assert got.device == expected.device and torch.equal(got, expected)
        assert generator.last_stats.capture == "compile-layers"  # the default on a GPU with Triton


@pytest.mark.parametrize("capture", ["graph", "compile-layers"])
@pytest.mark.parametrize("method", ["ar", "eesd"])
def test_captured_serving_equals_ar_alone_and_keeps_its_graphs(method: str, capture: str) -> None:
    """Continuous batching with captured decode passes (one set per running-batch size): every request's tokens are
    its own AR decode's; a second call of the same setup reuses the decoder kept on the model (its graphs)."""
    from executor.serving import serve
    from sim.workload import Request, ServingWorkload

    model = cuda_model(TinySpec(num_layers=4, seed=6))
    prompts = [[5, 9, 1, 33, 2][: 2 + i % 4] for i in range(7)]
    requests = tuple(Request(i, len(p), 4 + 3 * (i % 3), 0.0005 * i) for i, p in enumerate(prompts))
    workload = ServingWorkload(requests)
    kwargs = dict(method=method, max_batch=3, capture=capture)
    if method == "eesd":
        kwargs |= dict(exit_layer=EXIT_LAYER, policy="fixed:2")
    first = serve(model, workload, prompts, **kwargs)
    kept = dict(model.__dict__["_eesd_serving"])
    second = serve(model, workload, prompts, **kwargs)
    assert first.outputs == second.outputs and model.__dict__["_eesd_serving"].keys() == kept.keys()
    for request, prompt, output in zip(requests, prompts, first.outputs, strict=True):
        alone = executor.generate(model, prompt, method="ar", max_new_tokens=request.output_len, capture="none")
        assert output == alone.sequences[0, len(prompt) :].tolist(), request


@pytest.mark.parametrize(("max_batch", "batching"), [(1, "static"), (3, "static"), (3, "continuous")])
@pytest.mark.parametrize(("backend", "capture"), [("streams", "graph"), ("sequential", "none"), ("streams", "auto")])
def test_ppsd_serving_on_a_gpu_equals_ar_alone(backend: str, capture: str, max_batch: int, batching: str) -> None:
    """PPSD serving (one request at a time, or lockstep batches of up to 3 whose rows end at their own lengths on the
    device inside blocks of captured ticks, static or joined by new requests at host reads, their KV copied between
    the captured pipelines of each width; the pipeline's stages on CUDA streams, captured or not) gives every request
    its own AR decode's tokens, and logs a decode after each prefill."""
    from executor.serving import serve
    from sim.workload import Request, ServingWorkload

    model = cuda_model(TinySpec(num_layers=4, seed=6))
    prompts = [[5, 9, 1, 33, 2][: 2 + i % 4] for i in range(5)]
    requests = tuple(Request(i, len(p), 4 + 3 * (i % 3), 0.0005 * i) for i, p in enumerate(prompts))
    outcome = serve(model, ServingWorkload(requests), prompts, method="ppsd", stages=2, backend=backend,
                    capture=capture, max_batch=max_batch, ppsd_batching=batching)  # fmt: skip
    for request, prompt, output in zip(requests, prompts, outcome.outputs, strict=True):
        alone = executor.generate(model, prompt, method="ar", max_new_tokens=request.output_len, capture="none")
        assert output == alone.sequences[0, len(prompt) :].tolist(), request
    prefills = [log.batch for log in outcome.result.passes if log.kind == "prefill"]
    assert sum(prefills) == len(requests) and max(prefills) <= max_batch
    assert sum(log.kind == "ppsd" for log in outcome.result.passes) == len(prefills)


def test_replicas_on_a_gpu_equal_ar_alone(tmp_path) -> None:
    """Two replica workers on the GPU (spawned processes initialising CUDA, each capturing its own graphs) give every
    request its own AR decode's tokens."""
    from executor.replicas import serve_replicas
    from sim.workload import Request, ServingWorkload

    model = scale_late_layers(tiny_model(TinySpec(num_layers=4, seed=8), torch.float64), EXIT_LAYER, 0.2)
    model.save_pretrained(tmp_path / "tiny")
    prompts = [[5, 9, 1, 33, 2][: 2 + i % 4] for i in range(8)]
    requests = tuple(Request(i, len(p), 4 + 3 * (i % 3), 0.002 * i) for i, p in enumerate(prompts))
    outcome = serve_replicas(
        tmp_path / "tiny", ServingWorkload(requests), prompts, replicas=2, device="cuda", dtype="float64",
        method="eesd", exit_layer=EXIT_LAYER, policy="fixed:2", max_batch=2, capture="graph",
    )  # fmt: skip
    cuda = model.to("cuda")
    for request, prompt, output in zip(requests, prompts, outcome.outputs, strict=True):
        alone = executor.generate(cuda, prompt, method="ar", max_new_tokens=request.output_len, capture="none")
        assert output == alone.sequences[0, len(prompt) :].tolist(), request
    assert {r.replica for r in outcome.result.records} == {0, 1}
