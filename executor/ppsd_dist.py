"""PPSD's `distributed` backend: one process per pipeline stage, joined by torch.distributed point-to-point messages.

Each process holds only its stage's decoder layers (the others are replaced by empty placeholders), plus the
embedding and exit head (stage 1) or the output head (last stage), and a KV cache for its own layers only. The
processes advance in lockstep ticks with exactly the semantics of executor/ppsd.py, so they produce the same ticks,
confirms and flushes as the `sequential` reference. One tick on rank r (stage r + 1 of n):

    1. run the held token through the stage (stage 1 drafts; the last stage predicts and emits);
    2. the last rank judges (`executor.ppsd.judge`, the verify rule at depth 1) and sends the tick's outcome (confirm /
       flush / emit, the token, its position, done) to every rank;
    3. on a flush every rank rolls its own layers' KV back and drops its output, and the correction enters stage 1;
       otherwise rank r sends its output (position, draft, hidden [1, 1, d]) to rank r + 1.

Backends: gloo on CPU, NCCL on GPUs (rank r on cuda:LOCAL_RANK).

Local run: `decode_ppsd(..., backend="distributed")` spawns the n processes itself (torch.multiprocessing, spawn
context, a free loopback port). Each gets its pruned stage model by pickling, so CPU weights travel through shared
memory (the parent's parameters are moved into shared memory once, in place) and are not copied. The emitted tokens
stream back to the caller's sink through a queue. If a worker raises, its traceback is sent to the caller, every
other process is terminated (then killed) and joined, and `PPSDWorkerError` is raised; `timeout_s` bounds the run.

Multi-host run, one process per stage, with torchrun (the model directory must exist on every host):

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank {0|1} --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
        -m executor.ppsd_dist --model /path/to/hf_dir --prompt "def fib(n):" --max-new-tokens 64 --dtype bfloat16

World size = number of stages (here 4); `--stage-boundaries 6,12,18`, `--exit-layer` and `--head FILE` (a trained exit
head for stage 1) as in `decode_ppsd`. The last rank prints the generated token ids and the run's statistics as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import queue as queue_lib
import socket
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from executor.adapter import ModelAdapter
from executor.decoding import TokenSink
from executor.heads import SharedExitHead, SubsetExitHead, TrainedExitHead, head_tensors, resolve_head
from executor.kv_cache import KVCache
from executor.passes import resolve_capture
from executor.ppsd import (
    Item,
    PPSDStats,
    StageOutput,
    StagePlan,
    StageRunner,
    TickOutcome,
    commit,
    feed_limit,
    first_token,
    judge,
    make_selector,
    new_stats,
    plan_stages,
    resolve_first,
)
from executor.sampling import SamplingConfig, TokenSelector
from executor.verify import TickVerdict

_POLL_S = 0.05
_KILL_GRACE_S = 5.0


class PPSDWorkerError(RuntimeError):
    """A stage process failed; the message holds its rank and traceback."""


# ------------------------------------------------------------------------------------------- a stage's own share
class StageKVCache(KVCache):
    """A KV cache for layers [first, stop) only (plus `extra` exit-head layers after the model's, on stage 1),
    addressed by global layer index as the adapter addresses it."""

    def __init__(self, adapter: ModelAdapter, first: int, stop: int, max_len: int, extra: int = 0) -> None:
        layer_ids = [*range(first, stop), *range(adapter.num_layers, adapter.num_layers + extra)]
        super().__init__(
            num_layers=len(layer_ids),
            batch=1,
            num_kv_heads=adapter.num_kv_heads,
            max_len=max_len,
            head_dim=adapter.head_dim,
            dtype=adapter.dtype,
            device=adapter.device,
            layer_ids=layer_ids,
        )


def _placeholder(module_cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """An empty (zero-row) stand-in for a part this stage does not hold; torch warns that its init is a no-op."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return module_cls(*args, **kwargs)


def stage_model(model: nn.Module, plan: StagePlan, stage: int) -> nn.Module:
    """A structural copy of `model` sharing only stage `stage`'s weights; every other part is an empty placeholder.

    Stage 1 keeps the embedding and the head (its exit head), the last stage keeps the head, all keep the final norm
    (a vector) and the rotary embedding (no weights). The original model is not modified.
    """
    layers = plan.layers(stage)
    base = copy.copy(model.model)
    base._modules = dict(base._modules)
    base.layers = nn.ModuleList(
        [layer if index in layers else nn.Identity() for index, layer in enumerate(model.model.layers)]
    )
    weight = model.lm_head.weight
    if stage != 0:
        base.embed_tokens = _placeholder(nn.Embedding, 0, weight.shape[1], device=weight.device, dtype=weight.dtype)
    clone = copy.copy(model)
    clone._modules = dict(model._modules)
    clone.model = base
    if stage not in (0, plan.stages - 1):
        clone.lm_head = _placeholder(
            nn.Linear, weight.shape[1], 0, bias=False, device=weight.device, dtype=weight.dtype
        )
    return clone


# ------------------------------------------------------------------------------------------------------ messages
class StageLink:
    """Point-to-point messages between neighbouring stages, and the last stage's tick outcome to all."""

    def __init__(self, rank: int, world: int, device: torch.device, hidden_size: int, dtype: torch.dtype) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.hidden_size, self.dtype = hidden_size, dtype
        self.last = world - 1

    def exchange_outcome(self, outcome: TickOutcome | None) -> TickOutcome:
        """The last rank sends its `outcome` to every other rank, which receives it (and passes None)."""
        if self.rank == self.last:
            message = torch.tensor(
                [outcome.verdict, outcome.token, outcome.position, outcome.done], dtype=torch.long, device=self.device
            )
            for work in [dist.isend(message, dst) for dst in range(self.last)]:
                work.wait()
            return outcome
        message = torch.empty(4, dtype=torch.long, device=self.device)
        dist.recv(message, src=self.last)
        verdict, token, position, done = message.tolist()
        return TickOutcome(TickVerdict(verdict), token, position, bool(done))

    def pass_on(self, hidden: torch.Tensor | None, meta: list[int] | None) -> Item | None:
        """Send (meta = [present, position, draft], hidden) to the next stage; receive the previous stage's."""
        works = []
        if self.rank < self.last:
            present = meta is not None
            header = torch.tensor(meta if present else [0, -1, -1], dtype=torch.long, device=self.device)
            works.append(dist.isend(header, self.rank + 1))
            if present:
                works.append(dist.isend(hidden.contiguous(), self.rank + 1))
        item = self._receive() if self.rank > 0 else None
        for work in works:
            work.wait()
        return item

    def _receive(self) -> Item | None:
        header = torch.empty(3, dtype=torch.long, device=self.device)
        dist.recv(header, src=self.rank - 1)
        present, position, draft = header.tolist()
        if not present:
            return None
        hidden = torch.empty(1, 1, self.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(hidden, src=self.rank - 1)
        return Item(position, hidden=hidden, draft=draft)

    def send_prompt_states(self, hidden: torch.Tensor) -> None:
        dist.send(hidden.contiguous(), self.rank + 1)

    def recv_prompt_states(self, prompt_len: int) -> torch.Tensor:
        hidden = torch.empty(1, prompt_len, self.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(hidden, src=self.rank - 1)
        return hidden


# ------------------------------------------------------------------------------------------------- one stage's loop
@torch.inference_mode()
def run_stage(
    adapter: ModelAdapter,
    plan: StagePlan,
    rank: int,
    prompt: list[int],
    sink: TokenSink,
    selector: TokenSelector,
    on_tokens=None,
    head: Any = None,
) -> PPSDStats:
    """Rank `rank`'s part of a PPSD generation (process group already initialised). The last rank fills `sink`;
    rank 0 drafts with `head` (None: the shared exit head). Returns this rank's count of the run: every rank counts
    the same ticks and outcomes (the last rank's `sink` holds the tokens); its own stage's time is its entry in
    `stage_stats`."""
    layers = plan.layers(rank)
    extra = getattr(head, "extra_layers", 0) if rank == 0 else 0
    cache = StageKVCache(adapter, layers.start, layers.stop, len(prompt) + sink.max_new_tokens, extra)
    capture = resolve_capture("auto", adapter.device, selector.config.kind)  # compiled layers, graphs on a GPU rank
    runner = StageRunner(adapter, cache, plan, rank, selector, capture, fallback=True, head=head)
    link = StageLink(rank, plan.stages, adapter.device, adapter.config.hidden_size, adapter.dtype)
    stats = new_stats(plan, "distributed", len(prompt))
    if runner.is_first or runner.is_last:  # the ranks that pick tokens: a repetition penalty's committed text
        selector.track(adapter.lm_head.weight.shape[0])
        selector.start([prompt])
    dist.barrier()  # every process has its model: time from here
    begin = time.perf_counter()
    outcome = _prefill(runner, link, prompt, sink, on_tokens)
    commit(selector, outcome.token)
    stats.prefill_time_s = time.perf_counter() - begin
    inbox = Item(len(prompt), token=outcome.token) if rank == 0 else None
    limit = feed_limit(len(prompt), sink.max_new_tokens)
    stage = stats.stage_stats[rank]
    while not outcome.done:
        tick_begin = time.perf_counter()
        out = runner.run(inbox) if inbox is not None else None
        if rank == 0 and out is not None:
            resolve_first(out, limit)
        stage.count(inbox is not None, time.perf_counter() - tick_begin)
        outcome = link.exchange_outcome(judge(out, sink) if runner.is_last else None)
        commit(selector, outcome.token)
        if runner.is_last and outcome.emitted and on_tokens is not None:
            on_tokens([outcome.token])
        stats.record(outcome)
        if outcome.done:
            break
        if outcome.verdict == TickVerdict.FLUSH:
            runner.flush(outcome.position)
            inbox = Item(outcome.position, token=outcome.token) if rank == 0 else None
        else:
            item = link.pass_on(out.hidden if out else None, [1, out.position, out.draft] if out else None)
            inbox = _next_draft(out) if rank == 0 else item
    stats.wall_time_s = time.perf_counter() - begin
    stage.idle_s = stats.wall_time_s - stats.prefill_time_s - stage.busy_s
    stats.new_tokens = len(sink.tokens)
    return stats


def _next_draft(out: StageOutput | None) -> Item | None:
    """Stage 1's next input: the draft it proposed after `out`, if one enters the pipe."""
    return Item(out.position + 1, token=out.draft) if out is not None and out.draft >= 0 else None


def _prefill(runner: StageRunner, link: StageLink, prompt: list[int], sink: TokenSink, on_tokens) -> TickOutcome:
    """The prompt down the pipe; the last rank's first token is broadcast as the START outcome."""
    hidden = None if runner.is_first else link.recv_prompt_states(len(prompt))
    hidden = runner.prefill(hidden, prompt)
    if not runner.is_last:
        link.send_prompt_states(hidden)
        return link.exchange_outcome(None)
    token = first_token(runner, hidden)
    sink.emit([token])
    if on_tokens is not None:
        on_tokens([token])
    return link.exchange_outcome(TickOutcome(TickVerdict.START, token, len(prompt), sink.done))


# --------------------------------------------------------------------------------------------- local launcher
@dataclass
class WorkerJob:
    """Everything a spawned stage process needs (pickled: the stage model's CPU tensors go by shared memory)."""

    model: nn.Module
    plan: StagePlan
    prompt: list[int]
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    device_type: str  # "cpu" (gloo) or "cuda" (NCCL, rank r on cuda:r)
    sampling: SamplingConfig
    min_new_tokens: int
    threads: int
    timeout_s: float
    head: HeadState | None = None  # stage 1 only: a trained exit head


@dataclass
class HeadState:
    """A non-default exit head as plain tensors, rebuilt in stage 1's process on its pruned model: a trained head
    (its layer's and norm's tensors) or a vocabulary-subset head (its token ids)."""

    exit_layer: int = 0
    init_layer: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    token_ids: torch.Tensor | None = None

    @classmethod
    def of(cls, head: Any) -> HeadState | None:
        if head is None or type(head) is SharedExitHead:
            return None
        if isinstance(head, SubsetExitHead):
            return cls(token_ids=head.token_ids.cpu())
        if not isinstance(head, TrainedExitHead):
            raise ValueError(
                f"the distributed backend sends the exit head to a stage process: it must be 'shared', 'shared:N', "
                f"a head file or a TrainedExitHead, got {type(head).__name__}"
            )
        return cls(head.exit_layer, head.init_layer, head_tensors(head, head.adapter.dtype))

    def build(self, adapter: ModelAdapter) -> Any:
        if self.token_ids is not None:
            return SubsetExitHead(adapter, self.token_ids)
        return TrainedExitHead(adapter, self.exit_layer, self.init_layer, tensors=self.tensors).requires_grad_(False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, init_method: str, job: WorkerJob, messages) -> None:
    """A spawned stage process: report tokens as they come, its stats at the end (`run_stage`), or the traceback."""
    try:
        torch.set_num_threads(job.threads)
        device = torch.device(f"cuda:{rank}") if job.device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=job.plan.stages,
            timeout=timedelta(seconds=job.timeout_s),
        )
        adapter = ModelAdapter(job.model.to(device))
        sink = TokenSink(job.max_new_tokens, job.eos_token_ids, None)
        selector = make_selector(adapter, len(job.prompt), sink, job.sampling, job.min_new_tokens)
        head = job.head.build(adapter) if job.head is not None else None
        stats = run_stage(
            adapter, job.plan, rank, job.prompt, sink, selector, lambda t: messages.put(("tokens", rank, t)), head
        )
        messages.put(("stats", rank, stats))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure must reach the caller
        messages.put(("error", rank, traceback.format_exc()))
        sys.exit(1)


def decode_distributed(
    adapter: ModelAdapter,
    prompt: list[int],
    sink: TokenSink,
    plan: StagePlan,
    *,
    sampling: SamplingConfig | None = None,
    min_new_tokens: int = 0,
    threads_per_stage: int | None = None,
    timeout_s: float = 600.0,
    head: Any = None,
) -> PPSDStats:
    """Spawn one process per stage on this host, run PPSD, stream the tokens into `sink`, stop every process.
    A trained `head` travels to stage 1's process as tensors."""
    device_type = adapter.device.type
    if device_type == "cuda" and torch.cuda.device_count() < plan.stages:
        raise ValueError(
            f"the distributed backend on GPUs needs one GPU per stage: {plan.stages} stages, "
            f"{torch.cuda.device_count()} GPUs visible"
        )
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"the distributed backend runs on cpu (gloo) or cuda (NCCL), not {adapter.device}")
    threads = threads_per_stage or max(1, (os.cpu_count() or 1) // plan.stages)
    head_state = HeadState.of(head)
    jobs = [
        WorkerJob(
            stage_model(adapter.model, plan, s),
            plan,
            prompt,
            sink.max_new_tokens,
            tuple(sink.eos_token_ids),
            device_type,
            sampling if sampling is not None else SamplingConfig(),
            min_new_tokens,
            threads,
            timeout_s,
            head_state if s == 0 else None,
        )
        for s in range(plan.stages)
    ]
    begin = time.perf_counter()
    reports = _launch(jobs, sink, timeout_s)
    stats = _merge(plan, sink, reports)
    stats.setup_time_s = time.perf_counter() - begin - stats.wall_time_s
    return stats


def _launch(jobs: list[WorkerJob], sink: TokenSink, timeout_s: float) -> dict[int, PPSDStats]:
    import torch.multiprocessing as mp

    # forkserver: one clean server process imports torch and transformers once per session, and every worker is
    # forked from it (not once per worker); the jobs are still pickled, so each gets only its stage's weights
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["executor.ppsd_dist", type(jobs[0].model).__module__])
    messages = context.Queue()
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    processes = [
        context.Process(target=_worker, args=(rank, init_method, job, messages), daemon=True)
        for rank, job in enumerate(jobs)
    ]
    finished = False
    try:
        for process in processes:
            process.start()
        reports = _collect(processes, messages, sink, time.monotonic() + timeout_s)
        finished = True
        return reports
    finally:
        _stop(processes, grace_s=_KILL_GRACE_S if finished else 0.0)
        messages.close()


def _collect(processes, messages, sink: TokenSink, deadline: float) -> dict[int, PPSDStats]:
    """Read the workers' messages until every rank has reported; raise on the first error, death or timeout."""
    reports: dict[int, PPSDStats] = {}
    dead_since: float | None = None
    while len(reports) < len(processes):
        try:
            kind, rank, payload = messages.get(timeout=_POLL_S)
        except queue_lib.Empty:
            dead = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0) and r not in reports]
            if dead:  # give its last message a moment to arrive before blaming the exit code
                dead_since = dead_since or time.monotonic()
                if time.monotonic() - dead_since > 1.0:
                    codes = ", ".join(f"rank {r}: exit code {processes[r].exitcode}" for r in dead)
                    raise PPSDWorkerError(f"PPSD stage process died without a report ({codes})") from None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"PPSD distributed run did not finish in time; ranks done: {sorted(reports)}"
                ) from None
            continue
        if kind == "error":
            raise PPSDWorkerError(f"PPSD stage {rank + 1} (rank {rank}) failed:\n{payload}")
        if kind == "tokens":
            sink.emit(payload)
        else:
            reports[rank] = payload
    return reports


def _stop(processes, grace_s: float) -> None:
    """Join the workers (for up to `grace_s`); terminate, then kill, any that is still running."""
    end = time.monotonic() + grace_s
    for process in processes:
        if process.pid is not None:
            process.join(timeout=max(0.0, end - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        if process.pid is not None:
            process.join(timeout=_KILL_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()


def _merge(plan: StagePlan, sink: TokenSink, reports: dict[int, PPSDStats]) -> PPSDStats:
    """The run's stats: the last rank's count and times, each stage's own time from its rank."""
    stats = reports[plan.stages - 1]
    stats.stage_stats = [reports[rank].stage_stats[rank] for rank in range(plan.stages)]
    stats.new_tokens = len(sink.tokens)
    return stats


# ----------------------------------------------------------------------------------------------- torchrun entry
def main(argv: list[str] | None = None) -> int:
    """One stage of a torchrun-launched PPSD run (see the module docstring)."""
    args = _parser().parse_args(argv)
    from executor.models import load_model, load_tokenizer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=args.timeout_s))
    try:
        model = load_model(args.model, dtype=args.dtype, device="cpu")
        trained = resolve_head(args.head, ModelAdapter(model), args.exit_layer)  # checked on the whole model
        exit_layer = args.exit_layer if args.exit_layer is not None else getattr(trained, "exit_layer", None)
        cuts = [int(c) for c in args.stage_boundaries.split(",")] if args.stage_boundaries else None
        plan = plan_stages(len(model.model.layers), world, cuts, exit_layer)
        state = HeadState.of(trained) if rank == 0 else None
        adapter = ModelAdapter(stage_model(model, plan, rank).to(device))
        head = state.build(adapter) if state is not None else None
        del model, trained
        prompt = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
        if prompt is None:
            prompt = load_tokenizer(args.model)(args.prompt)["input_ids"]
        eos = adapter.config.eos_token_id
        sink = TokenSink(args.max_new_tokens, [] if eos is None else [eos] if isinstance(eos, int) else eos, None)
        sampling = SamplingConfig(args.do_sample, "exact", args.temperature, args.top_k, args.top_p, args.seed)
        selector = make_selector(adapter, len(prompt), sink, sampling, 0)
        stats = run_stage(adapter, plan, rank, prompt, sink, selector, head=head)
        if rank == world - 1:
            print(json.dumps({"tokens": sink.tokens, "stats": asdict(stats)}))
    finally:
        dist.destroy_process_group()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m executor.ppsd_dist", description="one PPSD stage under torchrun")
    parser.add_argument("--model", required=True, help="a Hugging Face directory, .gguf file or packaged model name")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (tokenised with the model's tokenizer)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--stage-boundaries", help="comma-separated cut points, n - 1 of them")
    parser.add_argument("--exit-layer", type=int)
    parser.add_argument("--head", default="shared", help="stage 1's exit head: shared | shared:N | a head file")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--do-sample", action="store_true", help="exact sampling (Gumbel-max keyed by position)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads per process")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU even where GPUs are visible")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
