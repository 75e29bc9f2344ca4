"""The decoders' forward passes as static-shape functions of long-lived buffers, captured in CUDA graphs on a GPU.

Every pass the decode loop launches (the AR step, the EESD draft step, the verify pass over q = k + 1 tokens) is a
function of no arguments that reads its inputs from device buffers the caller refills (`ids`, `positions[q]`) and
writes its outputs into device buffers (`tokens[q]`, `hidden`, ...). Nothing inside a pass touches the host: its
attention spans a fixed number of cache slots (masked by position), token selection reads its prompt lengths, seed
and EOS ids from device tensors, and the cache's books are kept by the caller (`KVCache.claim`). So a pass can be

- run as it is (`capture="none"`, the CPU default, and the code path every property test checks),
- captured once in a CUDA graph and replayed (`"graph"`: one graph per pass, q and span bucket; the GPU default
  without Triton),
- compiled with `torch.compile(mode="reduce-overhead")` (`"compile"`: Inductor kernels in CUDA graphs; one
  compilation per pass, q and span bucket, slow on a GPU),
- or run with compiled layers and captured whole (`"compile-layers"`: one `torch.compile` of the decoder layer serves
  every layer and every pass with the same token count and span bucket, `ModelAdapter.compiled`; the pass is a CUDA
  graph on a GPU; the GPU default where Triton is installed),
- or, on a CPU, compiled whole with the weights frozen into it (`"freeze"`, see `FREEZE_OPTIONS`).

A pass is idempotent (it writes the same cache slots and buffers with the same values however often it runs), so
warming it up before capture changes nothing. The caller's host work per EESD round is: set the round's inputs
(a device copy of what the last verify pass's verdicts made them, or an async copy from pinned memory where the host
committed something else, `Passes.start_round`), launch the passes, then read the drafts, the full model's tokens and
the round's verdict back in one copy (`readout`), the round's single host synchronisation (plus one per draft step
for a policy that stops on the draft's confidence). The verify pass takes the verdict on the device
(`executor.verify`: token equality, or rejection sampling's accept tests and residual or bonus draw, with keyed
noise).

Span buckets: a launch attends over the first `span` cache slots only, a *bucket* chosen on the host from the
furthest position the launch writes (`span_bucket`: MIN_SPAN doubled until it holds that position, capped at the
capacity), so a short context reads a short slice of K and V however large the cache. Each (pass, q, bucket) is a
pass of its own (its own graph or compilation); the host knows every launch's positions, chained ones included (the
i-th chained AR or draft step is at its start + i), so it never reads the device to choose.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from executor.adapter import ModelAdapter, Step, allow_recompiles, inductor_available, with_layer_run
from executor.fusion import fuse_projections, unfuse_projections
from executor.kv_cache import KVCache
from executor.sampling import DRAFT_SALT, SamplingConfig, TokenSelector
from executor.verify import match_verdicts, rejection_verdicts
from sim.contract import (  # MIN_SPAN: read per launch (the tests lower it)
    AR_HISTORY,
    MIN_SPAN,
    default_sync_every,
    is_captured,
    verify_drafts,
)
from sim.contract import span_bucket as contract_span_bucket

CAPTURE_MODES = ("auto", "none", "graph", "compile", "compile-layers", "freeze")
# capture="freeze" (CPU): Inductor compiles each pass whole with the model's weights as constants, so that max-autotune
# may choose its CPU GEMM template, which packs each weight matrix once at compile time and reads it once per launch
# whatever the token count. Torch's own small-M fp32 products are not memory-bound on a CPU: a pass over q = 2..8 tokens
# costs 1.6-2.3x a one-token pass there (a 262k-row LM head: 61 ms at q = 1, 111 at q = 2), which makes every verify
# pass cost about two AR steps; frozen, q = 2 costs what q = 1 does. The price: a packed copy of the weights per
# compiled pass (pass kind x token count; span buckets are off, `bucketed`), minutes of compilation per pass on a
# small CPU, and weights read once at compile time (a later in-place change of a weight is not seen; moved weights drop
# the cached passes). A frozen pass holds its packed weights as long as it lives: dropped (an evicted set of kept
# passes, `release_passes`), it frees them (`StaticPass` compiles a function of its own, `own_function`).
FREEZE_OPTIONS = {
    "freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
    "max_autotune_report_choices_stats": False, "autotune_num_choices_displayed": 0,
}  # fmt: skip
WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS / SDPA workspaces, lazy inits)
SPAN_BUCKETS = True  # False: every launch attends over the whole cache capacity (the A/B reference); read per launch
PREFILL_BUCKETS = True  # on a GPU, prefill pads its width up to a multiple of PREFILL_BUCKET (`prefill_width`)
PREFILL_BUCKET = 64
DEVICE_INPUTS = True  # False: every round's inputs and counts uploaded from the host (the A/B reference); read per call


def prefill_width(longest: int, capacity: int, device: torch.device) -> int:
    """The width a prefill pass runs at for prompts of at most `longest` tokens: on a GPU (with PREFILL_BUCKETS) the
    next multiple of PREFILL_BUCKET, at most the cache's `capacity`, else `longest`. Prefill runs uncaptured, and on a
    GPU a shape not seen before pays for its kernels' plans (an H200 took about 100 ms more for each new prompt length
    of SmolLM2); a few bucket widths pay that once each. The pad positions come after every prompt's last token, so
    causal attention keeps them out of every real position, and they are rolled back. On a CPU the pads would only
    cost compute."""
    if not (PREFILL_BUCKETS and device.type == "cuda"):
        return longest
    return max(longest, min(-(-longest // PREFILL_BUCKET) * PREFILL_BUCKET, capacity))


def span_bucket(furthest: int, capacity: int, bucketed: bool = True) -> int:
    """The cache slots a static launch attends over when the furthest position it writes is `furthest`
    (`sim.contract.span_bucket`, MIN_SPAN there); the whole capacity with SPAN_BUCKETS off, or not `bucketed` (see
    `bucketed`)."""
    if not (SPAN_BUCKETS and bucketed):
        return capacity
    return contract_span_bucket(furthest, capacity, MIN_SPAN)


def resolve_capture(capture: str, device: torch.device, sampling_kind: str) -> str:
    """The capture mode actually used: "auto" is "compile-layers" on a CUDA device where Inductor can compile
    (Triton), "graph" on one where it cannot, and "none" elsewhere."""
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {', '.join(CAPTURE_MODES)}, got {capture!r}")
    if capture == "auto":
        if device.type != "cuda":
            return "none"
        return "compile-layers" if inductor_available() else "graph"
    if capture == "graph" and device.type != "cuda":
        raise ValueError(f"capture 'graph' needs the model on a CUDA device, it is on {device.type}")
    if capture == "freeze" and device.type != "cpu":
        raise ValueError(f"capture 'freeze' is for a model on the CPU, it is on {device.type}")
    return capture


def prefix_capture(capture: str, config: SamplingConfig, method: str, backend: str) -> str:
    """Prefix processors call Python on the host at every selection: "auto" runs the passes uncaptured, a captured
    mode is refused. PPSD's distributed backend refuses them and the n-gram ban (the last stage's process never sees
    the tokens stage 1 feeds)."""
    if config.keeps_text and method == "ppsd" and backend == "distributed":
        raise ValueError(
            "no_repeat_ngram_size and the processors that read the prefix are not supported with PPSD's 'distributed' "
            "backend"
        )
    if not config.reads_prefix:
        return capture
    named = (
        "bad_words_ids of several tokens, sequence_bias, forced_bos_token_id, forced_eos_token_id, "
        "exponential_decay_length_penalty, prefix_allowed_tokens_fn and logits_processor"
    )
    if capture not in ("auto", "none"):
        raise ValueError(f"{named} run on the host at every token: capture must be 'auto' or 'none', got {capture!r}")
    return "none"


def check_sync_every(sync_every: int | None) -> None:
    if sync_every is not None and (
        isinstance(sync_every, bool) or not isinstance(sync_every, int) or not 1 <= sync_every <= AR_HISTORY
    ):
        raise ValueError(f"sync_every must be an integer in 1..{AR_HISTORY}, got {sync_every!r}")


def bucketed(capture: str) -> bool:
    """Whether launches under `capture` use span buckets: not frozen ones ("freeze"), where every bucket would be a
    compiled pass of its own holding its own packed copy of the weights, for an attention read a CPU cache of a few
    hundred slots hardly notices."""
    return capture != "freeze"


def resolve_sync_every(sync_every: int | None, capture: str) -> int:
    """`sync_every` as given, else SYNC_CAPTURED for captured passes and 1 uncaptured or frozen (a CPU gains nothing
    from running ahead)."""
    if sync_every is not None:
        return sync_every
    return default_sync_every(is_captured(capture))


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The model's GPU as the current device while decoding: a captured graph replays on the current device's stream,
    and streams and events are made there (a model on cuda:1 under a current cuda:0). Nothing elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def verify_bucketed(capture: str, verify_buckets: bool = True) -> bool:
    """Whether a set of passes of this (resolved) capture mode pads its verify passes to bucket widths: frozen passes
    with `verify_buckets` (`generate`'s argument). A verify pass after k drafts then runs over `verify_drafts(k, ...)`
    draft slots (a power of two or the policy's longest draft; `sim.contract.verify_drafts`), so a policy whose k
    varies (beta-ts, confidence, heuristic) compiles, and holds the packed weights of, a few verify passes instead of
    one per k, for a padded pass on some rounds. Other modes build a pass per k (a CUDA graph or an uncaptured run is
    cheap to keep)."""
    return verify_buckets and capture == "freeze"


def launch_mode(capture: str, device: torch.device) -> str:
    """How a `StaticPass` launches under `capture`: "compile-layers" (compiled layers, `ModelAdapter.compiled`) is
    captured in a CUDA graph on a GPU and run as it is elsewhere; every other mode is its own."""
    if capture == "compile-layers":
        return "graph" if device.type == "cuda" else "none"
    return capture


class StaticPass:
    """One pass run eagerly, replayed from a CUDA graph captured on first use, or torch.compile'd.

    A pass is `fn` then `advance`: `fn` is idempotent (it writes the same cache slots and output buffers with the same
    values however often it runs), so warming it up before capture changes nothing; `advance` (optional) moves the
    pass's own inputs on for its next launch on the device (the next position, the token just chosen as the next
    input, a cursor into a history buffer), so that consecutive launches need nothing from the host. Warm-up runs
    `fn` only; the graph (or compiled function) holds both, so every launch runs each exactly once.

    With `fallback` (capture="auto"), a pass whose capture fails (e.g. a model whose rotary embedding reads the
    positions on the host, as "dynamic" RoPE scaling does) warns once and runs uncaptured from then on; an explicit
    capture="graph" raises instead."""

    def __init__(
        self, fn: Callable[[], None], mode: str, fallback: bool = False, advance: Callable[[], None] | None = None
    ) -> None:
        self.mode = mode
        self.fn = fn
        self.advance = advance
        self.fallback = fallback
        self.graph: torch.cuda.CUDAGraph | None = None
        self.compiled: Callable[[], None] | None = None
        if mode == "compile":
            allow_recompiles()
            self.compiled = torch.compile(self._launch, mode="reduce-overhead", fullgraph=True, dynamic=False)
        self.modules: list[types.ModuleType] | None = None  # frozen, once compiled: the wrappers holding its constants
        if mode == "freeze":
            launch = own_function(StaticPass._launch)
            self.compiled = torch.compile(types.MethodType(launch, self), fullgraph=True, dynamic=False)
            self._held: list[types.ModuleType] = []
            weakref.finalize(self, release_compiled, launch.__globals__, self._held)
            FROZEN_PASSES.add(self)

    def _launch(self) -> None:
        self.fn()
        if self.advance is not None:
            self.advance()

    def __call__(self) -> None:
        if self.mode == "compile":
            self.compiled()
            return
        if self.mode == "freeze":  # the options hold while dynamo compiles, on the first launch
            from torch._inductor import config as inductor_config

            with inductor_config.patch(FREEZE_OPTIONS):
                if self.modules is not None:
                    self.compiled()
                else:
                    self._compile_frozen()
            return
        if self.mode != "graph":
            self._launch()
            return
        if self.graph is None:
            try:
                self.graph = capture_graph(self.fn, self._launch)
            except Exception as err:  # a real bug raises again below, from the uncaptured run
                if not self.fallback:
                    raise
                warnings.warn(f"CUDA graph capture failed, pass runs uncaptured: {err}", RuntimeWarning, stacklevel=2)
                self.mode = "none"
                self._launch()
                return
        self.graph.replay()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _compile_frozen(self) -> None:
        """The first (compiling) launch of a frozen pass: the wrapper modules Inductor loads for it hold its frozen
        constants (the packed weights) as attributes; they are noted, to be released with the pass."""
        self._held.extend(loaded_modules(self.compiled))
        self.modules = self._held


FROZEN_PASSES: weakref.WeakSet[StaticPass] = weakref.WeakSet()  # the frozen passes alive (`collect_frozen`)


def collect_frozen() -> None:
    """Free the memory of frozen passes no longer referenced, now rather than at some later garbage collection: a pass
    sits in a reference cycle (its compiled function is bound to it), and so does the wrapper module its finalizer
    lets go (`release_compiled`), hence two collections. Nothing to do (and no collection) without frozen passes."""
    if len(FROZEN_PASSES):
        collect_released()


def collect_released() -> None:
    """Two garbage collections: the first collects what was just let go of (a dropped pass's cycle, whose finalizer
    runs `release_compiled`, or a released compiled function's), the second the wrapper module's own reference cycle,
    which only then has no way in."""
    gc.collect()
    gc.collect()


def own_function(function: Callable[..., Any]) -> types.FunctionType:
    """A copy of `function` (its closure and defaults too) with a code object and globals of its own, for one frozen
    pass (or one frozen calibration call) to compile.
    Dynamo keeps a compiled frame's entries on its code object and installs the compiled graph (with its frozen
    constants) in the frame's globals, which its guards keep alive as long as any object they watch lives (the
    model's weights): on the function every pass shares, every frozen pass ever compiled would keep its packed
    weights for the life of the process. Its own globals can be emptied when the pass goes (`release_compiled`)."""
    code = function.__code__.replace()
    copy = types.FunctionType(code, dict(function.__globals__), function.__name__, function.__defaults__,
                              function.__closure__)  # fmt: skip
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


def loaded_modules(first_call: Callable[[], object]) -> list[types.ModuleType]:
    """Run `first_call` (a compiling call) and return the wrapper modules Inductor's code cache loaded meanwhile (by
    identity: a collection during the call may take other passes' modules out of the cache)."""
    from torch._inductor.codecache import PyCodeCache

    known = set(map(id, PyCodeCache.modules))
    first_call()
    return [module for module in PyCodeCache.modules if id(module) not in known]


def release_compiled(launch_globals: dict[str, Any], modules: list[types.ModuleType]) -> None:
    """What a collected frozen pass leaves behind, released: the compiled graphs Dynamo installed in its function's
    own globals (nothing runs that function again), and its wrapper modules in Inductor's code cache and
    `sys.modules`, which hold its frozen constants as attributes."""
    from torch._inductor.codecache import PyCodeCache

    for name in launch_globals:  # kept, not deleted: Dynamo's own clean-up may delete them later
        launch_globals[name] = None
    gone = set(map(id, modules))
    PyCodeCache.modules[:] = [m for m in PyCodeCache.modules if id(m) not in gone]
    for path, module in list(PyCodeCache.modules_no_attr.items()):
        if id(module) in gone:
            del PyCodeCache.modules_no_attr[path]
    for module in modules:
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]


def capture_graph(warmup: Callable[[], None], fn: Callable[[], None] | None = None) -> torch.cuda.CUDAGraph:
    """Warm `warmup` up on a side stream, then capture `fn` (default: `warmup`; the capture itself runs nothing: the
    caller replays). `warmup` must be idempotent; `fn` may also move state on (see `StaticPass`).

    Each graph keeps a private memory pool: a pass's outputs go to buffers made outside any graph, and only its
    own temporaries live in the pool, so graphs can replay in any order."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_RUNS):
            warmup()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (fn or warmup)()
    return graph


@dataclass
class HeldInputs:
    """What the host knows some of a pass set's device inputs hold (`Passes.start_round`, `Passes.set_counts`): each
    row's token and position in `ids` and `positions[1]`, the same in `next_inputs` as the last verify pass wrote
    them, and the verify pass's draft `counts`; None where not known."""

    inputs: tuple[list[int], list[int]] | None = None
    next: tuple[list[int], list[int]] | None = None
    counts: list[int] | None = None


class Passes:
    """The static buffers and passes of one decoder configuration (rows, cache capacity, exit layer, head, sampling).

    Inputs: `ids` [B, 1] (the token a one-token pass runs) and `positions[q]` [B, q]. Outputs: `tokens[q]` [B, q]
    (the chosen token after each position), `hidden` [B, 1, d] (a draft step's layer-E state), `confidence` [B]
    (the draft's top probability, when a policy asks). The AR step chains: it also makes its token the next input,
    moves `positions[1]` on and appends the token to `history` [B, AR_HISTORY] at `ar_cursor`, so the host can launch
    many steps and read their tokens in one copy (so does `ar_head`, the AR step that also keeps a layered exit head's
    KV, EESD's round that drafts nothing). A draft step chains too: it keeps its state and token for the
    verify pass in `exit_states` [B, K + 1, d] and `drafts` [B, K] at `draft_cursor` (K the largest draft length),
    feeds its token to the next draft step and moves `positions[1]` on; the verify pass resets the cursor.
    The verify pass takes its positions from where the draft steps left `positions[1]`, and the round's verdict
    (`executor.verify`) from `counts` [B] (each row's own drafts, an input the host refills when they change) into
    `verdicts` [B, 2] (accepted, token); it gathers what the host reads into `readout` and puts each row's next input
    as its verdict says (the token after its accepted drafts, at start + accepted + 1) in `next_inputs` [B, 2].
    Rejection sampling adds `draft_prob` [B, V] (a draft step's q), `draft_probs` [B, K, V] and `probs[q]` (the full
    model's p, a static output for forced verdicts).
    Every launch takes the furthest position it writes, and attends over that position's span bucket (`run`).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        cache: KVCache,
        selector: TokenSelector,
        *,
        exit_layer: int | None = None,
        head: Any = None,
        max_draft: int = 0,
        capture: str = "none",
        confidence: bool = False,
        fallback: bool = False,
        draft_dtype: torch.dtype | None = None,
        verify_buckets: bool = True,
    ) -> None:
        self.adapter = adapter.compiled(fallback) if capture == "compile-layers" else adapter
        self.cache, self.selector = cache, selector
        self.exit_layer, self.max_draft = exit_layer, max_draft
        self.head = with_layer_run(head, self.adapter.layer_run)  # compiled layers: a trained head's layer too
        self.draft_adapter = self.adapter  # what a draft step's layers [0, E) run on
        self.draft_dtype = draft_dtype  # drafts in a narrower dtype: the verify pass runs all layers (`_verify_early`)
        if draft_dtype is not None:
            from executor.draft_precision import low_precision_draft

            self.draft_adapter, self.head = low_precision_draft(self.adapter, exit_layer, head, draft_dtype)
        if getattr(self.head, "token_ids", None) is not None and hasattr(self.head, "subset_weight"):
            self.head.subset_weight()  # its rows gathered before any pass is traced, or each would be traced twice
        self.capture, self.want_confidence, self.fallback = capture, confidence, fallback
        self.verify_buckets = verify_bucketed(capture, verify_buckets)
        self.rejection = selector.config.kind == "rejection"
        batch, device = cache.batch, adapter.device
        long = {"dtype": torch.long, "device": device}
        self.ids = torch.zeros(batch, 1, **long)
        widths = {1} | {k + 1 for k in range(1, max_draft + 1)}
        self.positions = {q: torch.zeros(batch, q, **long) for q in widths}
        self.tokens = {q: torch.zeros(batch, q, **long) for q in widths}
        hidden_size = adapter.config.hidden_size
        self.hidden = torch.zeros(batch, 1, hidden_size, dtype=adapter.dtype, device=device)
        self.confidence = torch.zeros(batch, dtype=torch.float32, device=device)
        self.drafts = torch.zeros(batch, max(max_draft, 1), **long)
        self.inputs = torch.zeros(batch, max_draft + 1, **long)  # a round's tokens fed: its input, then its drafts
        self.draft_cursor = torch.zeros(1, **long)
        self.history = torch.zeros(batch, AR_HISTORY, **long)
        self.ar_cursor = torch.zeros(1, **long)
        self.exit_states = torch.zeros(batch, max_draft + 1, hidden_size, dtype=adapter.dtype, device=device)
        self.probs: dict[int, torch.Tensor] = {}
        vocab = adapter.lm_head.weight.shape[0]
        self.penalized = selector.penalized
        self.counts = torch.zeros(batch, **long)  # each row's own draft count, an input of the verify pass's verdict
        self.verdicts = torch.zeros(batch, 2, **long)  # the verify pass's (accepted, token) per row
        # the verify pass's: each row's next round input (token, position) as its verdict says, and what the host reads
        # of the round in one copy (drafts | verdict | the full model's tokens, `readout_columns`)
        self.next_inputs = torch.zeros(batch, 2, **long)
        self.readout = torch.zeros(batch, 2 * max(max_draft, 1) + 3, **long)
        self._held = HeldInputs()  # what some device inputs hold, so a round refills only what changed
        if self.rejection:
            k = max(max_draft, 1)
            self.draft_prob = torch.zeros(batch, vocab, dtype=torch.float64, device=device)
            self.draft_probs = torch.zeros(batch, k, vocab, dtype=torch.float64, device=device)
        selector.track(vocab, cache.max_len)  # a penalty's seen set, a prefix processor's text (`TokenSelector`)
        if self.penalized:  # repetition penalty: the committed text's tokens, and a draft step's (+ earlier drafts)
            self.draft_seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
            self.draft_context = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        self._passes: dict[tuple[str, int, int], StaticPass] = {}  # by (name, q, span)
        if capture == "compile":
            for tensor in self._static_tensors():
                torch._dynamo.mark_static_address(tensor)

    # ------------------------------------------------------------------------------------------------ host side
    def load(self, tokens: Sequence[int] | None, starts: Sequence[int], q: int) -> None:
        """Refill the inputs: `ids` from host tokens (None: keep) and `positions[q]` = start .. start + q - 1. (A
        verify pass sets its own `positions[q]` from `positions[1]`: what sets where it runs is `positions[1]`.)"""
        if tokens is not None:
            upload(self.ids, [[t] for t in tokens])
        upload(self.positions[q], [list(range(s, s + q)) for s in starts])
        if tokens is not None or q == 1:
            self._held.inputs = None
        if tokens is not None and q == 1:
            self._held.inputs = (list(tokens), list(starts))

    def start_round(self, tokens: Sequence[int], starts: Sequence[int]) -> None:
        """`ids` <- tokens and `positions[1]` <- starts before a round's first launch, with the least host work:
        nothing where the device holds them already (a chained block of AR steps ended there, `held_inputs`), one
        copy on the device where the last verify pass's verdicts put them in `next_inputs` (every row committed what
        its verdict said, `RoundVerdicts.read`), else an upload from the host."""
        wanted = (list(tokens), list(starts))
        if DEVICE_INPUTS and self._held.inputs == wanted:
            return
        if DEVICE_INPUTS and self._held.next == wanted:
            torch._foreach_copy_([self.ids, self.positions[1]], [self.next_inputs[:, :1], self.next_inputs[:, 1:]])
            self._held.inputs = wanted
            return
        self.load(tokens, starts, 1)

    def held_inputs(self, tokens: Sequence[int], starts: Sequence[int], key: str = "inputs") -> None:
        """The host's note of what the device holds, from what it read: `ids` and `positions[1]` after chained steps
        (key "inputs"), or `next_inputs` after a verify pass (key "next")."""
        if key not in ("inputs", "next"):
            raise ValueError(f"held_inputs: key must be 'inputs' or 'next', got {key!r}")
        setattr(self._held, key, (list(tokens), list(starts)))

    def set_counts(self, counts: Sequence[int]) -> None:
        """`counts` <- each row's draft count for the verify pass's verdict (an upload only when they changed)."""
        wanted = list(counts)
        if not DEVICE_INPUTS or self._held.counts != wanted:
            upload(self.counts, wanted)
            self._held.counts = wanted

    def readout_columns(self, k: int) -> tuple[slice, slice, slice]:
        """Where a verify pass over k drafts puts them, its verdict and the full model's k + 1 tokens in `readout`."""
        slots = self.drafts.shape[1]
        return slice(0, k), slice(slots, slots + 2), slice(slots + 2, slots + 3 + k)

    def layers_head(self) -> list[int]:
        """The exit head's own cache layers, [L, L + extra) (none for a head without a layer of its own)."""
        extra = getattr(self.head, "extra_layers", 0)
        return list(range(self.adapter.num_layers, self.adapter.num_layers + extra))

    def layers_early(self) -> list[int]:
        """Cache layers a draft step writes: [0, E) and the head's own layers."""
        return list(range(self.exit_layer)) + self.layers_head()

    def layers_ar(self) -> list[int]:
        """Cache layers an AR step writes: every model layer, and the head's own where it keeps them (`ar_head`)."""
        return list(range(self.adapter.num_layers)) + self.layers_head()

    def verify_slots(self, k: int, longest: int | None = None, room: int | None = None) -> int:
        """The draft slots of the verify pass that checks k drafts (`verify_drafts`): k itself, or with verify buckets
        the bucket holding k for a policy whose longest draft is `longest` (default: this set's `max_draft`), if the
        cache has `room` for it (positions after the round's input; None: enough)."""
        longest = self.max_draft if longest is None else min(longest, self.max_draft)
        slots = verify_drafts(k, longest, self.verify_buckets)
        return slots if room is None or slots <= room else k

    def span(self, furthest: int | None) -> int:
        """The bucket of a launch whose furthest written position is `furthest` (None: the whole capacity)."""
        capacity = self.cache.max_len
        return capacity if furthest is None else span_bucket(furthest, capacity, bucketed(self.capture))

    def run(
        self,
        name: str,
        q: int,
        fn: Callable[[Step], None],
        advance: Callable[[], None] | None = None,
        furthest: int | None = None,
    ) -> None:
        """Launch pass `name` over `q` positions: `fn` runs on the static step over `positions[q]` whose attention
        spans the bucket of `furthest` (`span`), one pass per (name, q, span)."""
        span = self.span(furthest)
        key = (name, q, span)
        self._held.inputs = None  # a pass may move its inputs on (`advance`), verify writes `next_inputs`
        if name == "verify":
            self._held.next = None
        if key not in self._passes:
            step = Step(positions=self.positions[q], starts=None, span=span)
            mode = launch_mode(self.capture, self.adapter.device)
            self._passes[key] = StaticPass(lambda: fn(step), mode, self.fallback, advance)
        self._passes[key]()

    def spans(self) -> list[tuple[str, int, int]]:
        """The (name, q, span) of every pass made so far (each its own graph or compilation when captured)."""
        return list(self._passes)

    def restart(self) -> None:
        """Cursors back to the start (a new call on cached passes, or after a call that stopped mid-round)."""
        self.draft_cursor.zero_()
        self.ar_cursor.zero_()
        self._held = HeldInputs()

    def _static_tensors(self) -> list[torch.Tensor]:
        buffers = [self.ids, self.hidden, self.confidence, self.drafts, self.inputs, self.exit_states]
        buffers += [self.draft_cursor]
        buffers += [self.history, self.ar_cursor, self.counts, self.verdicts, self.next_inputs, self.readout]
        buffers += [*self.positions.values(), *self.tokens.values(), self.selector.prompt_lens, self.selector.seed]
        if self.rejection:
            buffers += [self.draft_prob, self.draft_probs]
        if self.penalized:
            buffers += [self.selector.seen, self.draft_seen, self.draft_context]
        if self.selector.text is not None:
            buffers += [self.selector.text, self.selector.first]
        return buffers + self.cache.keys + self.cache.values

    # ------------------------------------------------------------------------------------------------ the passes
    # Each launch takes `furthest`, the furthest position it writes (a host value: the caller knows every launch's
    # positions), for its span bucket; None attends over the whole capacity.
    def ar(self, furthest: int | None = None) -> None:
        """tokens[1] <- the full model's token after `ids` at `positions[1]`; then chain: ids <- that token,
        positions[1] += 1, history[:, ar_cursor] <- that token, ar_cursor += 1 (mod AR_HISTORY)."""
        self.run("ar", 1, self._ar, self._ar_advance, furthest)

    def ar_head(self, furthest: int | None = None) -> None:
        """`ar` for a head with a layer of its own: its layer also runs on the layer-E state, writing the head's KV at
        `positions[1]` as the verify pass of a round that drafts nothing writes it (`verify(0)`), so a later draft
        step reads a head cache in step with layers [0, E). The same layers in the same order as `ar`: the same
        token; the same chaining."""
        self.run("ar_head", 1, self._ar_head, self._ar_advance, furthest)

    def draft(self, furthest: int | None = None) -> None:
        """hidden <- layer-E state of `ids` at `positions[1]`; tokens[1] <- the exit head's draft (and its
        confidence / distribution); then chain: the state and draft kept at `draft_cursor` for the verify pass,
        ids <- the draft, positions[1] += 1, draft_cursor += 1."""
        self.run("draft", 1, self._draft, self._draft_advance, furthest)

    def verify(self, k: int, furthest: int | None = None) -> None:
        """Layers [0, E) over `ids` (the last draft) at positions[k + 1][:, -1], into exit_states[:, k]; then layers
        [E, L) over exit_states[:, :k + 1] at positions[k + 1]: tokens[k + 1] (or probs[k + 1]) <- the full model's,
        verdicts <- the round's verdict on drafts[:, :k] (`executor.verify`); draft_cursor <- 0 for the next round.

        With verify buckets, k is the pass's draft slots (`verify_slots`) and the round may have drafted fewer,
        j >= 1: the last draft is at slot j (from `draft_cursor`), slots after it hold stale states whose outputs
        nobody reads (each row's verdict stops at its own count) and whose cache entries lie past every live position,
        overwritten before any query reads them, as a rejected draft's are."""
        advance = (lambda: self._verify_advance(k)) if self.penalized else None
        self.run("verify", k + 1, lambda step: self._verify(k, step), advance, furthest)

    def _ar(self, step: Step) -> None:
        adapter = self.adapter
        self.selector.record(self.ids, step.positions)  # the token fed at each position, for prefix processors
        hidden = adapter.forward_layers(adapter.embed(self.ids), step, self.cache, 0, adapter.num_layers)
        self.tokens[1].copy_(self.selector.select(adapter.logits(hidden), step.positions + 1))

    def _ar_head(self, step: Step) -> None:
        adapter = self.adapter
        hidden = self._early(step)
        self.head.prefill(hidden, step, self.cache)  # the head's KV, as `_verify` writes it for its last position
        hidden = adapter.forward_layers(hidden, step, self.cache, self.exit_layer, adapter.num_layers)
        self.tokens[1].copy_(self.selector.select(adapter.logits(hidden), step.positions + 1))

    def _ar_advance(self) -> None:
        self.selector.note(self.tokens[1])
        self.ids.copy_(self.tokens[1])
        self.positions[1].add_(1)
        self.history.index_copy_(1, self.ar_cursor, self.tokens[1])
        self.ar_cursor.add_(1).remainder_(AR_HISTORY)

    def _early(self, step: Step, adapter: ModelAdapter | None = None) -> torch.Tensor:
        adapter = adapter or self.adapter
        self.selector.record(self.ids, step.positions)
        return adapter.forward_layers(adapter.embed(self.ids), step, self.cache, 0, self.exit_layer)

    def _draft(self, step: Step) -> None:
        hidden = self._early(step, self.draft_adapter)
        self.hidden.copy_(hidden)
        logits = self.head(hidden, step, self.cache)
        targets = step.positions + 1
        context = None
        if self.penalized:  # the committed text at a round's first draft step, plus the earlier drafts after it
            self.draft_context.copy_(torch.where(self.draft_cursor == 0, self.selector.seen, self.draft_seen))
            context = self.draft_context.unsqueeze(1)
        if self.rejection:
            self.draft_prob.copy_(self.selector.probs(logits, targets, context)[:, 0])
            self.tokens[1].copy_(self.selector.sample(self.draft_prob.unsqueeze(1), targets, DRAFT_SALT))
        else:
            self.tokens[1].copy_(self.selector.select(logits, targets, context))
        if self.want_confidence:  # the top probability of the distribution the draft came from (warped if sampling)
            probs = self.draft_prob if self.rejection else self.selector.probs(logits.float(), targets, context)[:, 0]
            self.confidence.copy_(probs.amax(-1))

    def _draft_advance(self) -> None:
        if self.penalized:
            self.draft_seen.copy_(self.draft_context)
            self.draft_seen.scatter_(1, self.tokens[1], True)
        self.exit_states.index_copy_(1, self.draft_cursor, self.hidden)
        if self.draft_dtype is not None:  # the verify pass runs layers [0, E) over the round's tokens again
            self.inputs.index_copy_(1, self.draft_cursor, self.ids)
        self.drafts.index_copy_(1, self.draft_cursor, self.tokens[1])
        if self.rejection:
            self.draft_probs.index_copy_(1, self.draft_cursor, self.draft_prob.unsqueeze(1))
        self.ids.copy_(self.tokens[1])
        self.positions[1].add_(1)
        self.draft_cursor.add_(1).remainder_(self.drafts.shape[1])

    def _verify(self, k: int, step: Step) -> None:
        q = k + 1
        adapter = self.adapter
        last = self._last_draft(k)
        # the round's positions from where its draft steps left `positions[1]` (start + its drafts): no host refill
        step.positions.copy_(self.positions[1] - last + torch.arange(q, device=step.positions.device))
        if self.draft_dtype is None:
            early = Step(positions=self._at(step.positions, last), starts=None, span=step.span)
            hidden = self._early(early)
            self.head.prefill(hidden, early, self.cache)  # keeps a layered head's KV in step with layers [0, E)
            self._put(self.exit_states, last, hidden)
            states = self.exit_states[:, :q]
        else:
            states = self._verify_early(k, step, last)
        logits = adapter.logits(adapter.forward_layers(states, step, self.cache, self.exit_layer, adapter.num_layers))
        context = self._verify_context(k) if self.penalized else None
        targets = step.positions + 1
        if self.rejection:
            self.probs[q] = probs = self.selector.probs(logits, targets, context)  # a static output when captured
            verdict = rejection_verdicts(
                self.selector, self.drafts[:, :k], self.draft_probs[:, :k], probs, self.counts, targets
            )
        else:
            self.tokens[q].copy_(self.selector.select(logits, targets, context))
            verdict = match_verdicts(self.drafts[:, :k], self.tokens[q], self.counts)
        self.verdicts.copy_(torch.stack(verdict, dim=1))
        self._verify_outputs(k, step)
        self.draft_cursor.zero_()

    def _verify_outputs(self, k: int, step: Step) -> None:
        """The round's readout in one buffer, and each row's next input as its verdict says: the token after its
        accepted drafts, at the round's start + accepted + 1."""
        drafts, verdict, full = self.readout_columns(k)
        self.readout[:, drafts].copy_(self.drafts[:, :k])
        self.readout[:, verdict].copy_(self.verdicts)
        if not self.rejection:
            self.readout[:, full].copy_(self.tokens[k + 1])
        self.next_inputs[:, 1:].copy_(step.positions[:, :1] + self.verdicts[:, :1] + 1)
        self.next_inputs[:, :1].copy_(self.verdicts[:, 1:])

    def _last_draft(self, k: int) -> int | torch.Tensor:
        """The slot of the round's last draft in a verify pass of k slots: k, or with verify buckets the round's own
        count j in [1, k] as a [1] tensor, read from `draft_cursor` on the device (j drafts leave it at j mod
        `max_draft`)."""
        if not self.verify_buckets or k == 0:
            return k
        slots = self.drafts.shape[1]
        return (self.draft_cursor + (slots - 1)).remainder(slots) + 1

    @staticmethod
    def _at(tensor: torch.Tensor, slot: int | torch.Tensor) -> torch.Tensor:
        """tensor[:, slot : slot + 1], the slot a host int or a [1] device tensor."""
        return tensor[:, slot : slot + 1] if isinstance(slot, int) else tensor.index_select(1, slot)

    @staticmethod
    def _put(tensor: torch.Tensor, slot: int | torch.Tensor, value: torch.Tensor) -> None:
        """tensor[:, slot : slot + 1] <- value, the slot a host int or a [1] device tensor."""
        if isinstance(slot, int):
            tensor[:, slot : slot + 1].copy_(value)
        else:
            tensor.index_copy_(1, slot, value)

    def _verify_early(self, k: int, step: Step, last: int | torch.Tensor) -> torch.Tensor:
        """Drafts made in a narrower dtype: layers [0, E) over the round's k + 1 tokens (its input and drafts; the
        last draft in `ids`, at slot `last`), the model's own KV over the draft's; the head's KV for the last one
        from the layer-E state, as `_verify` keeps it. The layer-E states [B, k + 1, d]."""
        adapter = self.adapter
        positions = self._at(step.positions, last)
        self.selector.record(self.ids, positions)
        self._put(self.inputs, last, self.ids)
        hidden = adapter.forward_layers(adapter.embed(self.inputs[:, : k + 1]), step, self.cache, 0, self.exit_layer)
        early = Step(positions=positions, starts=None, span=step.span)
        self.head.prefill(self._at(hidden, last), early, self.cache)
        return hidden

    def _verify_context(self, k: int) -> torch.Tensor:
        """[B, k + 1, V]: position j of the verify pass follows the committed text and drafts d_1 .. d_j."""
        seen = self.selector.seen.unsqueeze(1)
        if k == 0:
            return seen
        drafted = _one_hot(self.drafts[:, :k], seen.shape[-1]).to(torch.int32).cumsum(1) > 0  # [B, k, V]
        return torch.cat([seen, seen | drafted], dim=1)

    def _verify_advance(self, k: int) -> None:
        """The round's committed tokens (accepted drafts, then the full model's token) join `seen`: the verdict the
        pass took, the one the host reads."""
        accepted, token = self.verdicts[:, 0], self.verdicts[:, 1]
        kept = torch.arange(k, device=token.device) < accepted.unsqueeze(1)  # [B, k]
        if k:
            hits = _one_hot(self.drafts[:, :k], self.selector.seen.shape[-1]) & kept.unsqueeze(-1)
            self.selector.seen.logical_or_(hits.any(1))
        self.selector.note(token.unsqueeze(1))


def _one_hot(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bool [.., vocab]; unlike F.one_hot, never checks the ids on the host (a sync that would break a capture)."""
    return tokens.unsqueeze(-1) == torch.arange(vocab, device=tokens.device)


def upload(buffer: torch.Tensor, values: list) -> None:
    """Host values into a device buffer; on a GPU an async copy from pinned memory (no host synchronisation)."""
    host = torch.tensor(values, dtype=buffer.dtype)
    if buffer.device.type == "cuda":
        buffer.copy_(host.pin_memory(), non_blocking=True)
    else:
        buffer.copy_(host)


# ---------------------------------------------------------------------------------------------------- reuse
MAX_RUNNERS_PER_MODEL = 4
FUSE_CAPTURED = True  # captured passes run fused q/k/v and gate/up products (`executor.fusion`; no extra memory)


def cached_passes(
    model: torch.nn.Module, key: tuple, build: Callable[[], Passes], serves: Callable[[tuple], bool] | None = None
) -> Passes:
    """Captured passes outlive a call (capturing a graph has a cost): one set per model and configuration,
    the `MAX_RUNNERS_PER_MODEL` most recent kept (each holds its own KV cache; `kept_on_model`); a kept set for which
    `serves(its key)` holds is used instead of building one (EESD's passes for longer drafts serve a policy of shorter
    ones: the same draft step and verify widths, so a frozen or captured pass is not made, and held, twice). With
    `FUSE_CAPTURED`, the layers' projections are fused first (`captured_projections`), so the passes are built on the
    fused weights."""
    captured_projections(model)
    return kept_on_model(model, "_eesd_passes", key, build, MAX_RUNNERS_PER_MODEL, serves)


def captured_projections(model: torch.nn.Module) -> None:
    """The layers' projections as captured passes run them: fused with `FUSE_CAPTURED` (a no-op once done; redone for
    weights that moved, which moves the projection weights), unfused without it."""
    layers = list(model.model.layers)
    if FUSE_CAPTURED:
        fuse_projections(layers)
    else:
        unfuse_projections(layers)


def kept_on_model(
    model: torch.nn.Module,
    table: str,
    key: Hashable,
    build: Callable[[], Any],
    limit: int,
    serves: Callable[[Any], bool] | None = None,
) -> Any:
    """`build()`'s result for `key`, kept in the model object's own dict under `table` (the `limit` most recent), so
    it goes when the model goes (a weak-keyed table would be kept alive by the kept objects' own reference); without
    one for `key`, the most recent kept one whose key `serves` accepts, if any. All of a table is dropped when any
    weight tensor moved (`model.to(...)`, a reassigned parameter: a graph reads addresses) or `FUSE_CAPTURED` changed
    (fused and unfused passes differ)."""
    kept = model.__dict__.setdefault(table, {})
    model.__dict__.setdefault(KEPT_TABLES, set()).add(table)
    weights = (FUSE_CAPTURED, *(p.data_ptr() for p in model.parameters()))
    if model.__dict__.get(table + "_weights") != weights:  # moved, cast or reassigned since: nothing kept is valid
        if kept:
            kept.clear()
            collect_frozen()
        model.__dict__[table + "_weights"] = weights
    if key not in kept and serves is not None:
        key = next((other for other in reversed(kept) if serves(other)), key)
    if key in kept:
        kept[key] = kept.pop(key)  # most recent last
        return kept[key]
    evicted = len(kept) >= limit
    while len(kept) >= limit:
        kept.pop(next(iter(kept)))
    if evicted:
        frozen = len(FROZEN_PASSES)
        collect_frozen()  # an evicted frozen set's packed weights freed before the next one compiles
        if len(FROZEN_PASSES) < frozen:
            warn_frozen_evicted(limit)
    kept[key] = build()
    return kept[key]


@functools.cache
def warn_frozen_evicted(limit: int) -> None:
    """Once per process: a set of frozen passes went to make room; if its setup comes back it compiles again."""
    warnings.warn(
        f"frozen passes of an older setup were dropped (at most {limit} sets are kept per model, "
        "executor.passes.MAX_RUNNERS_PER_MODEL) and their memory freed; that setup compiles again if used again",
        RuntimeWarning,
        stacklevel=3,
    )


KEPT_TABLES = "_eesd_kept_tables"  # the model's own dict: the names of the tables `kept_on_model` keeps there


def release_passes(model: torch.nn.Module) -> None:
    """Drop everything the executor keeps on `model` between calls (captured or frozen passes and their KV caches,
    PPSD and serving decoders, narrow draft copies) and free its memory now: on a CPU each frozen pass holds a packed
    copy of the weights it reads (given back to the system where the C library is glibc). The next call builds (and
    compiles or captures) what it needs again."""
    model = model.model if isinstance(model, ModelAdapter) else model
    for table in model.__dict__.pop(KEPT_TABLES, set()):
        model.__dict__.pop(table, None)
        model.__dict__.pop(table + "_weights", None)
    collect_frozen()
    with contextlib.suppress(OSError, AttributeError):  # glibc: the freed pages of its heaps back to the system
        ctypes.CDLL("libc.so.6").malloc_trim(0)
