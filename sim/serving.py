"""Serving under load: requests arrive, wait, are batched continuously and decoded with AR, EESD or PPSD
(torch-free).

A serving scenario is a simulator scenario (model, latency, acceptance, topology, exit layer, head, policy: see
`sim.scenario`) whose `workload:` is replaced by a `serving:` section:

    serving:
      workload: workloads/chat_poisson.yaml   # a workload file (`sim.workload`), or the same fields inline
      methods: [ar, eesd]                     # each is simulated on the same requests (default: the scenario's)
      rates_per_s: [1, 2, 4, 8]               # optional: the arrival rate swept (poisson and gamma arrivals)
      max_batch: 8                            # batch slots
      kv_capacity_tokens: auto                # auto | an integer | null (unlimited): per replica
      replicas: 1                             # servers side by side, each on its own devices (default 1)
      dispatch: least_loaded                  # least_loaded | least_tokens | round_robin: an arrival's replica
      by_method:                              # optional: dotted fields for one method only (the same requests)
        ar: {topology.stages: 1, serving.replicas: 2}
      slo: {ttft_ms: 500, tpot_ms: 50}        # goodput counts the requests within both bounds; a rate is within
                                              #   the SLO when attainment_pct (default 90) of requests are
      cases:                                  # optional: named variants, each a mapping of dotted fields
        - {name: smollm2, model: SmolLM2-135M}

The schedule (the executor's `executor.serving` runs the same one):
- Admission is first come, first served at round boundaries: the request at the head of the queue enters when a
  slot is free and the KV cache has room for its whole run (prompt + output + the longest draft + 1 tokens, as the
  executor's cache holds it: `sim.contract.cache_capacity`); nothing is preempted, nothing overtakes the head.
- Prefill first: an admitted request's prefill is a pass of its own (batch 1, q = its prompt) before the next decode
  round; its first token comes out of it (TTFT = that pass's end - arrival).
- A decode round runs the running requests as one batch: AR one step each; EESD one draft-then-verify round in
  which each request has its own draft policy and acceptance stream, the batch drafting while any row drafts and
  verifying at the largest draft count (as the executor's batches run it). A round in which no row drafts is one AR
  step. A request that reaches its output length leaves at the round's end and its slot goes to the next one.
- The host reads the device after every round (admission needs the tokens), so every pass pays its host read.
- Attention: with `attention: buckets` (the default, the executor's static cache with span buckets) a decode pass
  reads the span bucket of the furthest position it writes (the batch's longest row), in a cache sized for the
  longest prompt and output of the workload; with `attention: cache` every slot of that cache; with `attention:
  context` (a server with dynamic or paged attention) each row's own context, costed at the batch's mean context.
- `kv_capacity_tokens: auto` is 90% of each GPU's memory minus its weights, over the KV bytes per token of its layers
  (the smallest over devices; stages sharing one add up); a device whose memory is unknown (a CPU profile) has no
  limit unless one is given.
- PPSD serves static batches, as the executor's pipeline runs them (`executor.serving`): when the pipe is free, the
  requests waiting (up to PPSD's own `max_batch`, `by_method: {ppsd: {serving.max_batch: N}}`, default 1: one request
  at a time; the shared `max_batch` is AR's and EESD's continuous batching) enter together, admitted as above. Their
  prompts are one prefill pass (the batch's rows, as wide as the longest prompt), every row's first token out of it;
  then the batch decodes in lockstep (the engine's PPSD schedule for its rows, `sim.engine.decode_rows`: the
  executor's lockstep ticks over the span of the longest prompt, a draft confirmed only where every row going on
  drafted right, the distributed backend's ticks with its messages) until every row is done. A row ends at its own
  output length (or EOS) and its request leaves when the host reads that token (captured, at the end of its block of
  8 ticks; uncaptured, at once, as the executor's serving loop reads every tick; on the distributed backend as the
  last rank judges its tick, once its own pass is done, before the tick ends), but its slot is not
  refilled mid-decode: the next batch starts when the last row is done (with the requests due by then). With
  `ppsd_batching: continuous` requests join a running batch instead: at each host read of the device (the only
  moments the host may act), if a request waits and admission lets it in (a slot free, room in the KV budget; with
  `ppsd_join_min: k`, k requests, or as many as there are free slots if fewer), the decode stops there (on the
  distributed backend the last rank asks as it judges a tick, of the requests there by then but for one a closed
  loop's user sends as the host reads a row's end, and the decode stops at that tick's end); the
  requests waiting (as admission lets them in) are prefilled together and join the rows going on, and the pipe
  starts afresh from every row's last token (its in-flight drafts thrown away: a flush's refill, paid by the whole
  batch). Each stretch between two joins is logged as its own "ppsd" pass (`stopped` where a join
  cut it). The free-running pipe (`ppsd_backend: free`) serves one request at a time. A batch's decode is logged as
  one pass of kind "ppsd" (its ticks, longest prompt, last position the span reached and the batch's verdicts), and
  a PPSD run counts ticks as its rounds (`tokens_per_round` is tokens per tick: batch / stages for AR through the
  same stages).
- Replicas (`replicas: N`): N servers, each the plan's devices with its own slots and KV cache, run this schedule
  side by side (data parallelism); an arriving request is dispatched to one and stays there: `least_loaded` (the
  fewest requests dispatched and not finished, the lowest index among equals: join the shortest queue),
  `least_tokens` (the fewest KV tokens those requests hold or will hold: prompt + output + draft room, a KV-aware
  router) or `round_robin`. `by_method` gives a method its own fields, so methods are compared on the same devices
  laid out their own way (AR as two one-GPU replicas, PPSD as one pipeline over both GPUs); fields that would change
  the requests or the comparison (workload, rates, methods, SLO) are refused there.
- An acceptance trace is replayed as the simulator replays it (`sim.acceptance.TraceAcceptance`: request r from the
  trace's prompt r mod P, for its own output length): it must hold the whole workload's output tokens and a prompt
  per request, unless the scenario sets `acceptance.reuse: cycle`.

Times in the simulation are µs; records and metrics are in seconds and milliseconds (names say which).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import simpy
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sim.acceptance import TraceAcceptance
from sim.contract import MAX_BATCH, cache_capacity, default_sync_every, join_count, may_enter, ppsd_serving_output
from sim.cost import Pass, draft_pass, pass_costs, verify_pass
from sim.engine import TOKEN_ID_BYTES, BatchRow, LockstepDecode, decode_rows, prefill_pass
from sim.formats import quote
from sim.latency import extrapolations_of, static_capacity
from sim.models import ModelConfig
from sim.plan import SimPlan, build_plan
from sim.policy import make_policy, round_budget
from sim.runner import plan_notes
from sim.scenario import Point, Scenario, ScenarioError, model_config, read_yaml, validate
from sim.workload import ClosedLoopUsers, Request, ServingWorkload, WorkloadError, build_workload, parse_spec, with_rate

MAX_REPLICAS = 1024
DISPATCH = ("least_loaded", "least_tokens", "round_robin")
# what `serving.by_method` may not change: every method of a case serves the same requests and is compared on them
SHARED_FIELDS = ("serving.workload", "serving.rates_per_s", "serving.methods", "serving.cases", "serving.by_method",
                 "serving.slo")  # fmt: skip
KV_MEMORY_SHARE = 0.9  # the share of a GPU's memory that weights and KV cache may take (the rest: activations)
SERVING_METHODS = ("ar", "eesd", "ppsd")
PPSD_BATCHING = ("static", "continuous")


class _Strict(BaseModel):
    """As `sim.scenario.Strict`: unknown keys refused, values of the field's type only ("4" is not an integer)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class SLO(_Strict):
    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    attainment_pct: float = Field(90.0, gt=0, le=100)  # capacity: a rate holds the SLO while this % meets both bounds


class ServingConfig(_Strict):
    workload: str | dict[str, Any]
    methods: list[str] | None = Field(None, min_length=1)
    rates_per_s: list[float] | None = Field(None, min_length=1, max_length=1000)
    max_batch: int = Field(8, ge=1, le=MAX_BATCH)
    kv_capacity_tokens: int | Literal["auto"] | None = "auto"
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    dispatch: Literal["least_loaded", "least_tokens", "round_robin"] = "least_loaded"
    by_method: dict[str, dict[str, Any]] | None = None
    slo: SLO = SLO()
    cases: list[dict[str, Any]] | None = Field(None, min_length=1)
    ppsd_batching: Literal["static", "continuous"] = "static"  # PPSD's batches (module docstring)
    ppsd_join_min: int = Field(1, ge=1, le=MAX_BATCH)  # continuous: the fewest waiting requests that stop a decode

    @field_validator("kv_capacity_tokens", mode="before")
    @classmethod
    def _kv_capacity(cls, value: Any) -> Any:
        """One message for every wrong value (not one per member of the union)."""
        if value is None or value == "auto" or (type(value) is int and value >= 1):
            return value
        raise ValueError("expected auto, null (no limit) or a number of tokens >= 1")

    @field_validator("rates_per_s")
    @classmethod
    def _rates(cls, value: list[float] | None) -> list[float] | None:
        """Swept in increasing order (the table and plots follow it); a rate given twice is refused."""
        if value is None:
            return value
        twice = sorted({rate for rate in value if value.count(rate) > 1})
        if twice:
            raise ValueError(f"each rate once: {', '.join(f'{rate:g}' for rate in twice)} given more than once")
        return sorted(value)


@dataclass(frozen=True)
class ServingPoint:
    """One run: a case of the scenario at one arrival rate (None: the workload's own) with one method."""

    case: str
    method: str
    rate_per_s: float | None
    plan: SimPlan
    workload: ServingWorkload
    max_batch: int
    kv_capacity_tokens: int | None
    slo: SLO
    source: str
    replicas: int = 1
    dispatch: str = "least_loaded"
    notes: tuple[str, ...] = ()  # how its passes are costed where the calibration files do not simply hold
    ppsd_batching: str = "static"
    ppsd_join_min: int = 1

    @property
    def devices(self) -> int:
        """The devices the point occupies: its replicas times the devices of one replica's plan."""
        return self.replicas * len({self.plan.device_of(i) for i in range(len(self.plan.stages))})


# ---- reading a serving scenario --------------------------------------------------------------------------------------
def load_serving_points(path: str | Path, raw: dict[str, Any] | None = None) -> list[ServingPoint]:
    """Read and check a serving scenario; one point per case x rate x method. Errors name the file and the field.
    `raw`: the file's data as `read_serving` read it (read again if not given)."""
    path = Path(path)
    raw = read_serving(path) if raw is None else raw
    config = _config(raw["serving"], str(path))
    points = []
    for case, data in _cases(raw, config, str(path)):
        points += _case_points(path, case, data)
    return points


def read_serving(path: str | Path) -> dict[str, Any]:
    """A serving scenario file's data, checked to be one (a `serving` section, no `workload` or `sweep`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: serving scenario not found")
    raw = read_yaml(path)
    if not isinstance(raw, dict) or "serving" not in raw:
        plain = f" (this one has none: run eesd simulate {path})" if isinstance(raw, dict) else ""
        if isinstance(raw, dict) and "model" not in raw and {"arrival", "prompt_len", "output_len"} & set(raw):
            plain = (" (this one reads as a workload file: name it under serving.workload of a scenario, e.g. "
                     "scenarios/serving_cpu.yaml's, or serve it with eesd serve-bench --workload)")  # fmt: skip
        raise ScenarioError(
            f"{path}: serving: required: a serving scenario is a scenario with a serving section{plain}"
        )
    for key in ("workload", "sweep"):
        if key in raw:
            raise ScenarioError(
                f"{path}: {key}: not used by a serving scenario; give serving.workload, serving.rates_per_s, "
                "serving.methods and serving.cases instead"
            )
    return raw


def points_at_rates(
    path: str | Path, case: str, methods: Sequence[str], rates: Sequence[float], raw: dict[str, Any] | None = None
) -> list[ServingPoint]:
    """Case `case` of the serving scenario at `path` (its data `raw`, as `read_serving` read it; read again if not
    given) at arrival rates of its own choosing instead of its `serving.rates_per_s` (serve-sim's `--refine`), its
    `methods` only: the points `load_serving_points` would make had the scenario swept those rates."""
    path = Path(path)
    raw = read_serving(path) if raw is None else raw
    for name, data in _cases(raw, _config(raw["serving"], str(path)), str(path)):
        if name == case:
            data["serving"] = {**data["serving"], "rates_per_s": sorted(set(rates))}
            return [point for point in _case_points(path, name, data) if point.method in methods]
    raise ValueError(f"{path}: serving.cases: no case named {case!r}")


def _config(data: Any, where: str) -> ServingConfig:
    try:
        return ServingConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field_path = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("literal", "function")))
            message = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: serving.{field_path}: {message} (got {quote(e.get('input'))})")
        raise ScenarioError("\n".join(lines)) from None


def _cases(raw: dict[str, Any], config: ServingConfig, where: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, the scenario's data with the case's fields set) per case; one unnamed case without `cases`."""
    if not config.cases:
        return [("", raw)]
    found = []
    for index, case in enumerate(config.cases):
        name = case.get("name")
        if not isinstance(name, str) or not name:
            raise ScenarioError(f"{where}: serving.cases[{index}].name: required, a non-empty string")
        data = copy.deepcopy(raw)
        for dotted, value in case.items():
            if dotted != "name":
                _set_path(data, dotted, value)
        found.append((name, data))
    if len({name for name, _ in found}) != len(found):
        raise ScenarioError(f"{where}: serving.cases: names must be unique, got {[n for n, _ in found]}")
    return found


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node[part] = node = dict(node[part]) if isinstance(node.get(part), dict) else {}
    node[last] = value


def _case_points(path: Path, case: str, data: dict[str, Any]) -> list[ServingPoint]:
    where = f"{path}: case {case}" if case else str(path)
    config = _config(data["serving"], where)
    methods = config.methods or [data.get("method", "ar")]
    for method in methods:
        if method not in SERVING_METHODS:
            raise ScenarioError(f"{where}: serving.methods: expected ar, eesd or ppsd, got {method!r}")
    if len(set(methods)) != len(methods):
        raise ScenarioError(f"{where}: serving.methods: each method once, got {methods}")
    unknown = sorted(set(config.by_method or ()) - set(methods))
    if unknown:
        raise ScenarioError(f"{where}: serving.by_method: {', '.join(unknown)}: not among the case's methods {methods}")
    by_method = {method: _method_data(data, config, method, where) for method in methods}
    # an error in a method's own fields says they were its (`serving.by_method`), not the case's
    wheres = {method: f"{where} (method {method}, with serving.by_method.{method})"
              if (config.by_method or {}).get(method) else where for method in methods}  # fmt: skip
    models = {method: _model(by_method[method][0], method, wheres[method]) for method in methods}
    model = _narrowest_model(list(models.values()))
    spec, base_dir, spec_where, prefix = _workload_spec(config, path, where)
    rates: Sequence[float | None] = config.rates_per_s or [None]
    points = []
    for rate in rates:
        rated = spec if rate is None else with_rate(spec, rate, where, "serving.rates_per_s")
        workload = build_workload(rated, base_dir, spec_where, prefix, model)
        for method in methods:
            method_data, method_config = by_method[method]
            max_batch = _ppsd_batch(config, method_config) if method == "ppsd" else method_config.max_batch
            continuous = method == "ppsd" and method_config.ppsd_batching == "continuous"
            plan, scenario = _plan(path, method_data, method, workload, max_batch, wheres[method], models[method],
                                   continuous)  # fmt: skip
            _check_free_batch(plan, max_batch, method_config.ppsd_batching, where)
            if method_config.ppsd_join_min != 1 and method_config.ppsd_batching != "continuous":
                raise ScenarioError(
                    f"{where}: serving.ppsd_join_min: continuous batching's (serving.ppsd_batching: continuous); "
                    f"PPSD's batches here are {method_config.ppsd_batching}"
                )
            _check_trace_covers(plan, scenario, workload, where)
            capacity = _kv_capacity(plan, method_config.kv_capacity_tokens)
            _check_fits(plan, workload, capacity, where)
            notes = tuple(plan_notes(plan, scenario, "serving.max_batch", loop="serve")) + _ppsd_batch_note(
                config, method, max_batch
            )
            points.append(ServingPoint(
                case, method, rate, plan, workload, max_batch, capacity, config.slo, where,
                method_config.replicas, method_config.dispatch, notes, method_config.ppsd_batching,
                method_config.ppsd_join_min,
            ))  # fmt: skip
    return points


def _ppsd_batch(config: ServingConfig, own: ServingConfig) -> int:
    """PPSD's widest static batch: its own `serving.by_method.ppsd.serving.max_batch` (checked in `own`, its
    config), else 1 (one request at a time). A shared `max_batch` is continuous batching's, AR's and EESD's: a
    lockstep batch is another thing."""
    given = "serving.max_batch" in ((config.by_method or {}).get("ppsd") or {})
    return own.max_batch if given else 1


def _ppsd_batch_note(config: ServingConfig, method: str, max_batch: int) -> tuple[str, ...]:
    """A note where a shared `max_batch` over 1 was written and PPSD still serves one request at a time."""
    if method != "ppsd" or max_batch != 1 or "max_batch" not in config.model_fields_set or config.max_batch == 1:
        return ()
    return (f"PPSD serves one request at a time: serving.max_batch ({config.max_batch}) is AR's and EESD's continuous "
            "batching; give serving.by_method.ppsd.serving.max_batch for PPSD's static lockstep batches",)  # fmt: skip


def _check_free_batch(plan: Any, max_batch: int, batching: str, where: str) -> None:
    if plan.method != "ppsd" or plan.ppsd_backend != "free":
        return
    if max_batch != 1:
        raise ScenarioError(
            f"{where}: serving.by_method.ppsd.serving.max_batch: ppsd_backend 'free' serves one request at a time "
            f"(static batches are the lockstep backends', the executor's); expected 1, got {max_batch}"
        )
    if batching != "static":
        raise ScenarioError(
            f"{where}: serving.ppsd_batching: ppsd_backend 'free' serves one request at a time (continuous batching "
            f"stops the lockstep backends' decode at a host read); expected static, got {batching!r}"
        )


def _method_data(
    data: dict[str, Any], config: ServingConfig, method: str, where: str
) -> tuple[dict[str, Any], ServingConfig]:
    """The case's data and serving config for one method: `serving.by_method[method]`'s dotted fields set (e.g. AR
    as two one-GPU replicas where PPSD pipelines over both GPUs); fields that would change the requests or the
    comparison (`SHARED_FIELDS`) are refused."""
    fields = (config.by_method or {}).get(method)
    if not fields:
        return data, config
    method_data = copy.deepcopy(data)
    for dotted, value in fields.items():
        if dotted == "method" or any(dotted == f or dotted.startswith(f + ".") for f in SHARED_FIELDS):
            raise ScenarioError(
                f"{where}: serving.by_method.{method}.{dotted}: not set per method (every method of a case serves "
                "the same requests); set it in a case of its own"
            )
        _set_path(method_data, dotted, value)
    return method_data, _config(method_data["serving"], f"{where}: serving.by_method.{method}")


def _workload_spec(config: ServingConfig, path: Path, where: str) -> tuple[Any, Path, str, str]:
    """(the validated spec, the folder its trace paths are relative to, the file its errors name, the field prefix)."""
    if isinstance(config.workload, dict):
        return parse_spec(config.workload, where, "serving.workload."), path.parent, where, "serving.workload."
    file = (path.parent / config.workload).resolve()
    if not file.is_file():
        raise WorkloadError(f"{where}: serving.workload: file not found: {file}")
    return parse_spec(read_yaml(file), str(file)), file.parent, str(file), ""


def _model(data: dict[str, Any], method: str, where: str) -> ModelConfig:
    """The model one method serves, from the case's fields (checked with a one-token workload: the requests' own
    lengths are checked against its context by `build_workload`)."""
    fields = {k: v for k, v in data.items() if k != "serving"}
    fields |= {"method": method, "workload": {"requests": 1, "batch_size": 1, "prompt_len": 1, "output_len": 1}}
    return model_config(validate(fields, where))


def _narrowest_model(models: Sequence[ModelConfig]) -> ModelConfig:
    """The model of the smallest context among `models` (one whose context is not known: the least bound)."""
    return min(models, key=lambda m: m.max_position_embeddings or math.inf)


def _plan(
    path: Path, data: dict[str, Any], method: str, workload: ServingWorkload, max_batch: int, where: str,
    model: ModelConfig, continuous: bool = False,
) -> tuple[SimPlan, Scenario]:  # fmt: skip
    """The simulator's plan for one method: the scenario's fields, with a static workload of the longest prompt and
    output at `max_batch` (the executor's serving cache holds that many slots a row; the cost ratio is taken there).
    PPSD's `continuous` batches: the executor's cache holds two outputs past the longest prompt
    (`sim.contract.ppsd_serving_output`), which a pass over every cache slot pays for."""
    fields = {k: v for k, v in data.items() if k != "serving"}
    fields["method"] = method
    fields["workload"] = {
        "requests": 1,
        "batch_size": max_batch,
        "prompt_len": workload.max_prompt_len,
        "output_len": workload.max_output_len,
    }
    _check_cache_context(model, workload, where)
    scenario = validate(fields, where)
    plan = build_plan(Point(0, {}, scenario, path.parent, where), reads_every=1, stand_in=True)  # a read a round
    if continuous and plan.cache_slots:
        fed = ppsd_serving_output(workload.max_output_len, True)
        slots = cache_capacity("ppsd", workload.max_prompt_len, fed, 0, static_capacity(plan.stages[0].latency))
        plan = dataclasses.replace(plan, cache_slots=slots)
    return plan, scenario


def _check_cache_context(model: ModelConfig, workload: ServingWorkload, where: str) -> None:
    """The serving cache holds the longest prompt and the longest output (of two requests, maybe): within the
    model's context, or a message saying so (not the batch scenario's `workload.output_len`, which serving has not)."""
    prompt = max(workload.requests, key=lambda r: r.prompt_len)
    output = max(workload.requests, key=lambda r: r.output_len)
    what = (
        f"the serving cache's longest prompt_len {prompt.prompt_len} (request {prompt.index}) + longest output_len "
        f"{output.output_len} (request {output.index})"
    )
    try:
        model.check_context(prompt.prompt_len + output.output_len, what)
    except ValueError as err:
        raise ScenarioError(f"{where}: serving.workload: {err}") from None


def _check_trace_covers(plan: SimPlan, scenario: Scenario, workload: ServingWorkload, where: str) -> None:
    """A replayed acceptance trace holds the whole workload: every request replays it from its own prompt for its
    own output length (`TraceAcceptance.reuse` over all of them; the plan checked only the longest one), unless the
    scenario asks for `acceptance.reuse: cycle`."""
    replay = plan.acceptance
    if not isinstance(replay, TraceAcceptance) or scenario.acceptance.reuse == "cycle":
        return
    reuse = replay.reuse(len(workload.requests), [r.output_len for r in workload.requests])
    if reuse:
        raise ScenarioError(
            f"{where}: acceptance.trace: {scenario.acceptance.trace}: {reuse}: a replay would reuse its tokens; "
            "serve fewer or shorter requests, use a longer trace, or set acceptance.reuse: cycle to replay it "
            "cyclically"
        )


def kv_tokens(method: str, max_draft_len: int) -> Callable[[Request], int]:
    """The KV cache slots a request holds from admission to its end: prompt + output (+ the longest draft + 1), as
    `sim.contract.cache_capacity` sizes the executor's cache (uncaptured: not rounded up)."""
    return lambda r: cache_capacity(method, r.prompt_len, r.output_len, max_draft_len, captured=False)


def method_kv_tokens(method: str, policy: str) -> Callable[[Request], int]:
    """`kv_tokens` for a method and its draft policy (EESD's longest draft; the others draft none here)."""
    return kv_tokens(method, make_policy(policy).max_draft_len if method == "eesd" else 0)


def never_admitted(
    workload: ServingWorkload, tokens_of: Callable[[Request], int], capacity: int | None
) -> Request | None:
    """The workload's largest request (in `tokens_of` KV tokens) where even it alone exceeds `capacity`: a request no
    admission can take; None where every request fits (or there is no limit)."""
    if capacity is None:
        return None
    largest = max(workload.requests, key=tokens_of)
    return largest if tokens_of(largest) > capacity else None


def plan_kv_tokens(plan: SimPlan) -> Callable[[Request], int]:
    """`kv_tokens` for a plan's method and policy."""
    return method_kv_tokens(plan.method, plan.policy)


def _kv_capacity(plan: SimPlan, given: int | Literal["auto"] | None) -> int | None:
    """The KV budget in tokens: `given`, or with `auto` the smallest over devices of what KV_MEMORY_SHARE of its
    memory (the plan's stages carry it: the GPU table's or an inline GPU's) leaves beside its stages' weights (and
    narrow draft copies), over the KV bytes per token of its stages' layers (stages sharing a device add up); None
    (no limit) where a device's memory is not known (a CPU profile)."""
    if given != "auto":
        return given
    model, dtype_bytes = plan.model, plan.dtype_bytes
    weights: dict[int, float] = {}
    per_token: dict[int, float] = {}
    memory: dict[int, float | None] = {}
    for index, stage in enumerate(plan.stages):
        device = plan.device_of(index)
        memory[device] = stage.memory_GiB
        layers = stage.layer_end - stage.layer_start
        head = model.lm_head_params if device not in weights else 0  # the embedding / LM head once per device
        weights[device] = weights.get(device, 0.0) + (layers * model.layer_params + head) * dtype_bytes / stage.tp
        per_token[device] = per_token.get(device, 0.0) + layers * model.kv_bytes_per_token(dtype_bytes) / stage.tp
    weights[plan.device_of(0)] += plan.draft_copy_bytes / plan.stages[0].tp  # narrow draft copies, where drafted
    if any(gib is None for gib in memory.values()):
        return None
    free = {d: KV_MEMORY_SHARE * gib * 2**30 - weights[d] for d, gib in memory.items()}  # type: ignore[operator]
    return min(max(0, int(free[d] // per_token[d])) for d in memory)


def _check_fits(plan: SimPlan, workload: ServingWorkload, capacity: int | None, where: str) -> None:
    if capacity is None:
        return
    tokens = plan_kv_tokens(plan)  # (a policy made: only where there is a budget to check)
    largest = never_admitted(workload, tokens, capacity)
    if largest is not None:
        raise ScenarioError(
            f"{where}: serving.kv_capacity_tokens: request {largest.index} needs {tokens(largest)} KV tokens (prompt "
            f"{largest.prompt_len} + output {largest.output_len} + draft room), the capacity is {capacity}: it could "
            "never be admitted"
        )


# ---- what a run records, and its metrics (shared with executor.serving) ----------------------------------------------
@dataclass(slots=True)
class RequestRecord:
    """One request's times in seconds from the run's start; `tokens` it produced."""

    index: int
    prompt_len: int
    output_len: int
    arrival_s: float
    start_s: float = math.nan  # its prefill began (it left the queue)
    first_token_s: float = math.nan
    finish_s: float = math.nan
    tokens: int = 0
    replica: int = 0  # the replica that served it

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def queue_s(self) -> float:
        return self.start_s - self.arrival_s

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None for a one-token request)."""
        return (self.finish_s - self.first_token_s) / (self.tokens - 1) if self.tokens > 1 else None


@dataclass(frozen=True, slots=True)
class PassLog:
    """One prefill or decode round of a serving run, as it ran: its start and duration (s from the run's start), its
    batch, its tokens (a prefill's prompt length, a PPSD batch's longest; a round's draft steps, 0 for an AR step),
    and its rows' mean context (positions already cached) and furthest written position at the round's start (0 for
    a prefill). A PPSD batch's decode (kind "ppsd") is one entry: `tokens` its ticks, `context` its longest prompt's
    length, `furthest` that + its longest output - 2 (the last position its span reached; prompt + output - 2 for one
    request), `verdicts` the batch's checked drafts in order (True: confirmed, False: flushed) and `asked` the most
    tokens a row asked (past an EOS, a captured pipe's block of reads runs on for them). With continuous PPSD
    batching, a stretch of a batch's decode between joins is such an entry, its `context` the furthest row's position
    as it began (the position of the token each row resumed from), its output counted from that token, and
    `stopped` where a join cut it at a host read. `rows` gives each row's tokens made and asked, counted from the
    token it began with: rows that end sooner, at their EOS or their own length, shorten the host's blocks of reads
    for the others, so costing the decode again needs them. The simulator and
    the executor log the same fields, so a logged pass can be costed by the simulator (`ServingSimulation.logged_us`)
    and set beside its measured time."""

    kind: Literal["prefill", "round", "ppsd"]
    start_s: float
    seconds: float
    batch: int
    tokens: int
    context: int = 0
    furthest: int = 0
    verdicts: tuple[bool, ...] = ()
    replica: int = 0
    asked: int = 0  # a PPSD decode: the most tokens a row asked (its host's blocks reach for them; 0: as many as made)
    stopped: bool = False  # a PPSD decode stopped at a host read for requests to join (`tokens` ticks in)
    rows: tuple[tuple[int, int], ...] = ()  # a PPSD decode's rows: (tokens made, tokens asked), from its first token


@dataclass
class ServingResult:
    """A serving run: every request's record, the device's totals (seconds) and every prefill and round (`passes`)."""

    method: str
    max_batch: int
    records: list[RequestRecord]
    time_s: float = 0.0  # from time 0 to the last request's end
    prefill_s: float = 0.0
    decode_s: float = 0.0
    batch_time_s: float = 0.0  # sum over decode rounds of batch size x round time
    rounds: int = 0
    row_rounds: int = 0  # sum over decode rounds of the batch size
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # counted as produced, round by round
    in_system_s: float = 0.0  # integral over time of the number of requests in the system
    extrapolated: bool = False
    extrapolations: tuple[str, ...] = ()  # what the latency profiles were asked outside their grids
    passes: list[PassLog] = field(default_factory=list)
    replicas: int = 1  # servers (each with its own devices, slots and KV cache); the totals above sum over them

    def book(self, log: PassLog, rounds: int = 1) -> None:
        """Log a pass the run ran and count its time: a prefill's, or a decode's with its batch-weighted time and its
        `rounds` (one for a round; a PPSD decode's ticks)."""
        self.passes.append(log)
        if log.kind == "prefill":
            self.prefill_s += log.seconds
            return
        self.decode_s += log.seconds
        self.batch_time_s += log.batch * log.seconds
        self.rounds += rounds
        self.row_rounds += log.batch * rounds


class Admission:
    """First come, first served admission into `max_batch` slots under a KV budget of `kv_capacity` tokens (None:
    unlimited); `tokens(request)` is what a request holds from admission to its end."""

    def __init__(self, max_batch: int, kv_capacity: int | None, tokens: Callable[[Request], int]) -> None:
        self.max_batch, self.kv_capacity, self.tokens = max_batch, kv_capacity, tokens
        self.waiting: deque[Request] = deque()
        self.running = 0
        self.kv_used = 0

    def arrive(self, request: Request) -> None:
        self.waiting.append(request)

    def ready(self, count: int = 1) -> bool:
        """Whether the first `count` requests of the queue may all enter now (slots free and room in the cache);
        nothing changes."""
        needs = [self.tokens(request) for request in itertools.islice(self.waiting, count)]
        return may_enter(needs, count, self.running, self.kv_used, self.max_batch, self.kv_capacity)

    def joinable(self, join_min: int) -> bool:
        """Continuous PPSD batching's rule at a host read: `join_min` waiting requests may enter now, or as many as
        the slots free if fewer (at least one)."""
        return self.ready(join_count(join_min, self.max_batch, self.running))

    def waiting_tokens(self) -> list[int]:
        """What each request waiting would hold, in queue order, as far as a batch could take them: the queue as
        `may_enter` reads it (a process that asks `joinable` away from this one, from what it is told)."""
        return [self.tokens(request) for request in itertools.islice(self.waiting, self.max_batch)]

    def next(self) -> Request | None:
        """The head of the queue if it may enter now (`ready`), else None."""
        if not self.ready():
            return None
        need = self.tokens(self.waiting[0])
        self.running += 1
        self.kv_used += need
        return self.waiting.popleft()

    def admit_all(self) -> list[Request]:
        """Every request that may enter now, in order (`next` until it says no): a static batch's rows."""
        admitted = []
        request = self.next()
        while request is not None:
            admitted.append(request)
            request = self.next()
        return admitted

    def release(self, request: Request) -> None:
        self.running -= 1
        self.kv_used -= self.tokens(request)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats_ms(name: str, values_s: Sequence[float]) -> dict[str, float]:
    values = [v * 1e3 for v in values_s]
    mean = sum(values) / len(values) if values else math.nan
    return {
        f"{name}_mean_ms": mean,
        f"{name}_p50_ms": percentile(values, 50),
        f"{name}_p90_ms": percentile(values, 90),
        f"{name}_p99_ms": percentile(values, 99),
    }


def metrics(result: ServingResult, slo: SLO | None = None) -> dict[str, float]:
    """Latency percentiles (ms), throughput, queueing, batch occupancy, goodput and Little's law's two sides."""
    records, time_s = result.records, result.time_s or math.nan
    tpots = [r.tpot_s for r in records if r.tpot_s is not None]
    row: dict[str, float] = {
        "requests": len(records),
        "tokens": sum(r.tokens for r in records),
        "time_s": result.time_s,
        "tokens_per_s": sum(r.tokens for r in records) / time_s,
        "requests_per_s": len(records) / time_s,
    }
    row.update(_stats_ms("ttft", [r.ttft_s for r in records]))
    row.update(_stats_ms("tpot", tpots))
    row.update(_stats_ms("latency", [r.latency_s for r in records]))
    row.update(_stats_ms("queue", [r.queue_s for r in records]))
    row["mean_batch"] = result.batch_time_s / result.decode_s if result.decode_s > 0 else 0.0
    row["occupancy"] = row["mean_batch"] / result.max_batch
    row["busy_pct"] = 100.0 * (result.prefill_s + result.decode_s) / time_s / result.replicas  # mean over replicas
    decode_tokens = sum(r.tokens - 1 for r in records if r.tokens)
    row["tokens_per_round"] = decode_tokens / result.row_rounds if result.row_rounds else math.nan
    row["acceptance"] = result.accepted / result.drafted if result.drafted else math.nan
    good = [r for r in records if _within(r, slo)]
    row["goodput_rps"] = len(good) / time_s
    row["slo_pct"] = 100.0 * len(good) / len(records) if records else math.nan
    # Little's law: the time-average number in the system against arrival rate x mean time in the system
    row["mean_in_system"] = result.in_system_s / time_s
    row["little_lambda_w"] = row["requests_per_s"] * sum(r.latency_s for r in records) / max(len(records), 1)
    row.update(_load(records))
    return row


SATURATED = 0.9  # served / offered request rate below which a run is saturated


def _load(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """The offered rate (requests over the span of their arrivals) and whether the run is saturated: served at under
    `SATURATED` of that rate, its backlog grows, and with it every later request's latency, by 1 / SATURATED - 1
    seconds per second of arrivals or more (the growth of the latest third of requests' mean latency over the
    earliest third's, against their mean arrival times). Its latencies, queueing and SLO attainment then depend on
    how long the run is, not on the rate alone. (A last request's long decode, or a run's drain, is not growth.)"""
    arrivals = [r.arrival_s for r in records if math.isfinite(r.arrival_s)]
    span = max(arrivals) - min(arrivals) if len(arrivals) > 1 else 0.0
    offered = (len(arrivals) - 1) / span if span > 0 else math.nan
    done = sorted((r for r in records if math.isfinite(r.arrival_s) and math.isfinite(r.finish_s)),
                  key=lambda r: r.arrival_s)  # fmt: skip
    third = len(done) // 3
    if third < 2:
        return {"offered_rps": offered, "saturated": False}
    early, late = done[:third], done[-third:]
    waited = statistics.fmean(r.latency_s for r in late) - statistics.fmean(r.latency_s for r in early)
    apart = statistics.fmean(r.arrival_s for r in late) - statistics.fmean(r.arrival_s for r in early)
    return {"offered_rps": offered, "saturated": bool(apart > 0 and waited / apart > 1 / SATURATED - 1)}


def _within(record: RequestRecord, slo: SLO | None) -> bool:
    if slo is None:
        return True
    if slo.ttft_ms is not None and record.ttft_s * 1e3 > slo.ttft_ms:
        return False
    tpot = record.tpot_s
    return slo.tpot_ms is None or tpot is None or tpot * 1e3 <= slo.tpot_ms


# ---- the simulation --------------------------------------------------------------------------------------------------
class _Row:
    """A running request: its record, acceptance stream, policy and progress (`generated` includes the prefill's);
    it generates `length` tokens in all (its `output_len`, or fewer where its replayed text ends at an EOS first:
    `AcceptanceModel.output_len`). Its KV reservation and draft budgets still reach for `output_len` (`past_end`
    tokens past its end), as the executor's do: it learns of the EOS only when it emits it."""

    __slots__ = ("record", "request", "stream", "policy", "generated", "remaining", "past_end", "limit", "drafted",
                 "accepted", "all_match")  # fmt: skip

    def __init__(self, record: RequestRecord, request: Request, stream: Any, policy: Any, length: int) -> None:
        self.record, self.request, self.stream, self.policy = record, request, stream, policy
        self.generated, self.remaining, self.past_end = 1, length - 1, request.output_len - length
        self.limit = self.drafted = self.accepted = 0
        self.all_match = True


def pick_replica(dispatch: str, loads: Sequence[int], tokens: Sequence[int], arrivals: int) -> int:
    """The replica the next arrival goes to, given each replica's requests dispatched and not finished (`loads`),
    their KV tokens (`tokens`) and the arrivals dispatched so far: `least_loaded` and `least_tokens` take the lowest
    index among equals, `round_robin` replica arrivals mod N (shared with the executor's dispatcher)."""
    if dispatch not in DISPATCH:
        raise ValueError(f"dispatch must be one of {', '.join(DISPATCH)}, got {dispatch!r}")
    if dispatch == "round_robin":
        return arrivals % len(loads)
    key = loads if dispatch == "least_loaded" else tokens
    return min(range(len(key)), key=key.__getitem__)


class _Server:
    """One replica: its own slots and KV budget (`admission`), running rows, the event that wakes its idle loop, and
    the requests dispatched to it and not finished (`load`)."""

    __slots__ = ("index", "admission", "running", "wake", "tokens")

    def __init__(self, index: int, admission: Admission) -> None:
        self.index, self.admission = index, admission
        self.running: list[_Row] = []
        self.wake: simpy.Event | None = None
        self.tokens = 0  # the KV tokens of its requests not finished, queued or running (a sum kept, not recounted)

    @property
    def load(self) -> int:
        """Its requests not finished: queued, or admitted and running."""
        return len(self.admission.waiting) + self.admission.running


class ServingSimulation:
    """One serving run of a plan over a workload (see the module docstring for the schedule). Create one per run.

    `replicas` servers, each the plan's devices with `max_batch` slots and its own KV budget, run the schedule side
    by side; a request is dispatched to one of them when it arrives and stays there: `least_loaded` (the replica with
    the fewest requests dispatched and not finished, the lowest index on a tie), `least_tokens` (the fewest KV tokens
    of those requests) or `round_robin` (the i-th arrival to replica i mod N)."""

    def __init__(
        self,
        plan: SimPlan,
        workload: ServingWorkload,
        max_batch: int,
        kv_capacity_tokens: int | None,
        replicas: int = 1,
        dispatch: str = "least_loaded",
        ppsd_batching: str = "static",
        ppsd_join_min: int = 1,
    ) -> None:
        if plan.method not in SERVING_METHODS:
            raise ValueError(f"method must be ar, eesd or ppsd: {plan.method}")
        if plan.method == "ppsd" and max_batch != 1 and plan.ppsd_backend == "free":
            raise ValueError(
                f"ppsd_backend 'free' serves one request at a time (its static batches are the lockstep backends'): "
                f"max_batch {max_batch}"
            )
        if ppsd_batching not in PPSD_BATCHING or (ppsd_batching == "continuous" and plan.ppsd_backend == "free"):
            raise ValueError(
                f"ppsd_batching must be one of {PPSD_BATCHING} (continuous on a lockstep backend), got "
                f"{ppsd_batching!r}"
            )
        if isinstance(ppsd_join_min, bool) or not isinstance(ppsd_join_min, int) or ppsd_join_min < 1:
            raise ValueError(f"ppsd_join_min must be an integer >= 1, got {ppsd_join_min!r}")
        if replicas < 1 or dispatch not in DISPATCH:
            raise ValueError(f"need replicas >= 1 and dispatch in {DISPATCH}: got {replicas}, {dispatch!r}")
        self.plan, self.workload, self.dispatch, self.ppsd_batching = plan, workload, dispatch, ppsd_batching
        self.ppsd_join_min = ppsd_join_min
        self.env = simpy.Environment()
        self.kv_tokens = tokens = plan_kv_tokens(plan)
        # PPSD's decodes read the device as the executor's serving loop reads it, which takes no `sync_every`
        # (`executor.passes.resolve_sync_every`): every SYNC_CAPTURED ticks captured, every tick uncaptured
        reads = default_sync_every(plan.stages[0].latency.cuda_graphs)
        self.ppsd_plan = plan if plan.sync_every == reads else replace(plan, sync_every=reads)
        self.servers = [_Server(i, Admission(max_batch, kv_capacity_tokens, tokens)) for i in range(replicas)]
        self.records = [RequestRecord(r.index, r.prompt_len, r.output_len, math.nan) for r in workload.requests]
        self.result = ServingResult(plan.method, max_batch, self.records, replicas=replicas)
        self.users = ClosedLoopUsers(workload) if workload.closed else None
        self.in_system, self.last_change_us, self.finished, self.arrivals = 0, 0.0, 0, 0
        self._costs: dict[tuple[str, int, int], float] = {}
        layers = plan.model.num_layers
        # an AR step: EESD's (a round in which no row drafts) keeps a trained head's KV in step; AR runs no head
        head_at = plan.head_layer_at if plan.method == "eesd" else 0
        self.decode = Pass("decode", "verify", ((0, layers, 1),), lm_head_q=1, head_layer_at=head_at)
        self.draft = draft_pass(plan)
        # a policy that stops on the draft's confidence reads the device after every draft step
        self.draft_read = draft_pass(plan, "draft read", host_sync=True)
        self.verify: dict[int, Pass] = {}

    def run(self) -> ServingResult:
        env = self.env
        if self.users is None:
            env.process(self._open_arrivals())
        else:
            for request, at_s in self.users.first():
                self._arrive_at(request, at_s)
        for server in self.servers:
            env.process(self._serve(server))
        env.run()
        self._count_in_system(0)
        result = self.result
        result.time_s = env.now / 1e6
        result.extrapolated = any(getattr(s.latency, "extrapolated", False) for s in self.plan.stages) or any(
            getattr(link, "extrapolated", False) for link in self.plan.links
        )
        result.extrapolations = tuple(dict.fromkeys(e for s in self.plan.stages for e in extrapolations_of(s.latency)))
        return result

    # ---- arrivals ----------------------------------------------------------------------------------------------------
    def _open_arrivals(self) -> Generator[simpy.Event, Any, None]:
        env = self.env
        for request in self.workload.requests:
            at_us = request.arrival_s * 1e6  # type: ignore[operator]
            if at_us > env.now:
                yield env.timeout(at_us - env.now)
            self._arrive(request)

    def _arrive_at(self, request: Request, at_s: float) -> None:
        delay_us = max(0.0, at_s * 1e6 - self.env.now)
        self.env.timeout(delay_us).callbacks.append(lambda _: self._arrive(request))

    def _arrive(self, request: Request) -> None:
        record = self.records[request.index]
        record.arrival_s = self.env.now / 1e6
        self._count_in_system(+1)
        server = self._dispatch()
        record.replica = server.index
        server.tokens += self.kv_tokens(request)
        server.admission.arrive(request)
        if server.wake is not None:
            wake, server.wake = server.wake, None
            wake.succeed()

    def _dispatch(self) -> _Server:
        """The replica an arriving request goes to (see the class docstring)."""
        servers = self.servers
        loads, tokens = [s.load for s in servers], [s.tokens for s in servers]
        server = servers[pick_replica(self.dispatch, loads, tokens, self.arrivals)]
        self.arrivals += 1
        return server

    def _count_in_system(self, change: int) -> None:
        now = self.env.now
        self.result.in_system_s += self.in_system * (now - self.last_change_us) / 1e6
        self.in_system += change
        self.last_change_us = now

    # ---- the scheduler -----------------------------------------------------------------------------------------------
    def _serve(self, server: _Server) -> Generator[simpy.Event, Any, None]:
        env, running, total, admission = self.env, server.running, len(self.records), server.admission
        if self.plan.method == "ppsd":
            yield from self._serve_ppsd(server)
            return
        round_fn = self._ar_round if self.plan.method == "ar" else self._eesd_round
        while self.finished < total:
            request = admission.next()
            while request is not None:
                yield from self._prefill(request, server)
                request = admission.next()
            if not running:
                server.wake = env.event()
                yield server.wake
                continue
            start, context, furthest = env.now, self._context(running), self._furthest(running)
            steps = yield from round_fn(running, context, furthest)
            elapsed_s = (env.now - start) / 1e6
            log = PassLog("round", start / 1e6, elapsed_s, len(running), steps, context, furthest, (), server.index)
            self.result.book(log)
            if any(row.remaining == 0 for row in running):
                running[:] = [row for row in running if not self._finish_if_done(row, server)]

    def _serve_ppsd(self, server: _Server) -> Generator[simpy.Event, Any, None]:
        """PPSD's server: static batches, each the requests waiting when the last is done (as admission lets them
        in), prefilled together (`_ppsd_prefill`) and decoded in lockstep until every row is done (`_ppsd_decode`)."""
        env, total = self.env, len(self.records)
        while self.finished < total:
            yield env.timeout(0)  # arrivals due now first (a closed loop's user sent one as the last row ended)
            admitted = server.admission.admit_all()
            if not admitted:
                server.wake = env.event()
                yield server.wake
                continue
            rows = yield from self._ppsd_prefill(admitted, server)
            if self.ppsd_batching == "static":
                if any(row.remaining for row in rows):
                    yield from self._ppsd_decode(rows, server)
                continue
            rows = [row for row in rows if row.remaining]
            while rows:
                rows = yield from self._ppsd_stretch(rows, server)

    def _ppsd_prefill(self, requests: list[Request], server: _Server) -> Generator[simpy.Event, Any, list[_Row]]:
        """A batch's prompts in one pass (`len(requests)` rows as wide as the longest prompt, the executor's
        pipeline prefill), every row's first token out of it; returns the batch's rows (those done already left)."""
        start, context = self.env.now, max(r.prompt_len for r in requests)
        duration_us = self.prefill_us(context, len(requests))
        yield self.env.timeout(duration_us)
        log = PassLog("prefill", start / 1e6, duration_us / 1e6, len(requests), context, replica=server.index)
        self.result.book(log)
        rows = []
        for request in requests:
            record = self.records[request.index]
            record.start_s, record.first_token_s, record.tokens = start / 1e6, self.env.now / 1e6, 1
            self.result.tokens += 1
            length = self.plan.acceptance.output_len(request.index, request.output_len)
            rows.append(_Row(record, request, *self._stream_and_policy(request), length))
            self._finish_if_done(rows[-1], server)
        return rows

    def _ppsd_decode(self, rows: list[_Row], server: _Server) -> Generator[simpy.Event, Any, None]:
        """A batch's decode through the pipeline: the engine's lockstep PPSD schedule for its rows' lengths and
        acceptance streams (`sim.engine.decode_rows`, over the span of the longest prompt), each request leaving
        when the host read its last token; logged as one pass of kind "ppsd" with the batch's verdicts."""
        env, start = self.env, self.env.now
        streams = [RecordingStream(row.stream) for row in rows]
        lengths = [row.generated + row.remaining for row in rows]
        batch = [BatchRow(stream, row.policy, length, past_end=row.past_end)
                 for stream, row, length in zip(streams, rows, lengths, strict=True)]  # fmt: skip
        context = max(row.request.prompt_len for row in rows)
        run, reads = decode_rows(self.ppsd_plan, context, batch)
        reads = reads or [run.decode_time_us] * len(rows)  # the free pipe: a batch of one, read at its end
        for index in sorted(range(len(rows)), key=reads.__getitem__):
            row = rows[index]
            if row.remaining == 0:  # done at the prefill
                continue
            if start + reads[index] > env.now:
                yield env.timeout(start + reads[index] - env.now)
            self._emit(row, row.remaining, server)
        if start + run.decode_time_us > env.now:
            yield env.timeout(start + run.decode_time_us - env.now)
        made = tuple((length, row.request.output_len) for length, row in zip(lengths, rows, strict=True))
        self._log_ppsd(start, context, run.ticks, made, batch_verdicts(streams, lengths), server)

    def _ppsd_stretch(self, rows: list[_Row], server: _Server) -> Generator[simpy.Event, Any, list[_Row]]:
        """Continuous PPSD batching (module docstring): the rows' lockstep decode from each row's last token, read by
        read (`sim.engine.LockstepDecode`), each request leaving as the host reads its last token, until the batch is
        done (returns []) or a read at which a request waiting may enter: the decode stops there, the requests
        waiting are prefilled together, and the rows to decode next are returned (those going on, then the new)."""
        env, start = self.env, self.env.now
        streams = [RecordingStream(OffsetStream(row.stream, row.generated - 1)) for row in rows]
        lengths = [row.remaining + 1 for row in rows]  # from the token each row resumes from
        batch = [BatchRow(stream, row.policy, length, past_end=row.past_end)
                 for stream, row, length in zip(streams, rows, lengths, strict=True)]  # fmt: skip
        context = max(row.request.prompt_len + row.generated - 1 for row in rows)
        wanted = [length + row.past_end for length, row in zip(lengths, rows, strict=True)]  # asked from there
        decode, left = LockstepDecode(self.ppsd_plan, context, batch), set()
        while True:
            paused = decode.advance()
            reads = decode.row_reads_us
            for index in sorted((i for i in range(len(rows)) if i not in left and not math.isnan(reads[i])),
                                key=reads.__getitem__):  # fmt: skip
                if start + reads[index] > env.now:
                    yield env.timeout(start + reads[index] - env.now)
                self._emit(rows[index], rows[index].remaining, server)
                left.add(index)
            if not paused:
                break
            if self.ppsd_plan.ppsd_backend == "distributed":  # the last rank asks, as it judges the tick (it has not
                # heard of a closed loop's next request, sent as the host reads a row's end), and stops at its end
                if start + decode.judged_us > env.now:
                    yield env.timeout(start + decode.judged_us - env.now)
                joins = server.admission.joinable(self.ppsd_join_min)
                if start + decode.at_us > env.now:
                    yield env.timeout(start + decode.at_us - env.now)
            else:
                if start + decode.at_us > env.now:
                    yield env.timeout(start + decode.at_us - env.now)
                yield env.timeout(0)  # arrivals due now first (a closed loop's user sent one as a row ended)
                joins = server.admission.joinable(self.ppsd_join_min)
            if joins:
                going = [row for index, row in enumerate(rows) if index not in left]
                for row in going:
                    self._emit(row, decode.emitted, server)
                verdicts = batch_verdicts(streams, lengths, decode.emitted)
                made = [lengths[i] if i in left else decode.emitted + 1 for i in range(len(rows))]
                self._log_ppsd(start, context, decode.ticks, tuple(zip(made, wanted, strict=True)), verdicts, server,
                               stopped=True)  # fmt: skip
                joined = yield from self._ppsd_prefill(server.admission.admit_all(), server)
                return going + [row for row in joined if row.remaining]
        run = decode.result
        assert run is not None
        if start + run.decode_time_us > env.now:
            yield env.timeout(start + run.decode_time_us - env.now)
        made = tuple(zip(lengths, wanted, strict=True))
        self._log_ppsd(start, context, run.ticks, made, batch_verdicts(streams, lengths), server)
        return []

    def _emit(self, row: _Row, count: int, server: _Server) -> None:
        """`count` more tokens of `row` read by the host (its request leaves if that is its last)."""
        row.generated += count
        row.remaining -= count
        row.record.tokens += count
        self.result.tokens += count
        self._finish_if_done(row, server)

    def _log_ppsd(
        self, start: float, context: int, ticks: int, made: tuple[tuple[int, int], ...], verdicts: tuple[bool, ...],
        server: _Server, stopped: bool = False,
    ) -> None:  # fmt: skip
        """A PPSD decode (a static batch's, or a continuous one's stretch) that began at `start` µs, ending now, as one
        pass of kind "ppsd" (`PassLog`): its context, ticks, each row's (tokens made, tokens asked) from its first
        token and its verdicts; its ticks count as rounds."""
        longest, asked = max(count for count, _ in made), max(wanted for _, wanted in made)
        log = PassLog("ppsd", start / 1e6, (self.env.now - start) / 1e6, len(made), ticks, context,
                      context + longest - 2, verdicts, server.index, asked, stopped, made)  # fmt: skip
        self.result.book(log, rounds=ticks)
        self.result.drafted += len(verdicts)
        self.result.accepted += sum(verdicts)

    def _prefill(self, request: Request, server: _Server) -> Generator[simpy.Event, Any, None]:
        record = self.records[request.index]
        record.start_s = self.env.now / 1e6
        duration_us = self.prefill_us(request.prompt_len)
        yield self.env.timeout(duration_us)
        log = PassLog("prefill", record.start_s, duration_us / 1e6, 1, request.prompt_len, replica=server.index)
        self.result.book(log)
        record.first_token_s = self.env.now / 1e6
        record.tokens = 1
        self.result.tokens += 1
        length = self.plan.acceptance.output_len(request.index, request.output_len)
        row = _Row(record, request, *self._stream_and_policy(request), length)
        if not self._finish_if_done(row, server):
            server.running.append(row)

    def _stream_and_policy(self, request: Request) -> tuple[Any, Any]:
        """A request's own acceptance stream and draft policy, seeded by the plan's seed and its index (the same
        whatever the order of admission)."""
        plan, base = self.plan, self.plan.seed * 1_000_003 + 2 * request.index
        stream = plan.acceptance.stream(random.Random(base), request.index)
        rng, costs = random.Random(base + 1), plan.round_costs
        policy = make_policy(plan.policy, rng=rng, cost_ratio=plan.cost_ratio, round_costs=costs)
        return stream, policy

    def _finish_if_done(self, row: _Row, server: _Server) -> bool:
        if row.remaining > 0:
            return False
        record = row.record
        record.finish_s = self.env.now / 1e6
        server.admission.release(row.request)
        server.tokens -= self.kv_tokens(row.request)
        self._count_in_system(-1)
        self.finished += 1
        if self.users is not None:
            following = self.users.after(record.finish_s)
            if following is not None:
                self._arrive_at(*following)
        return True

    # ---- rounds ------------------------------------------------------------------------------------------------------
    def _ar_round(self, rows: list[_Row], context: int, furthest: int) -> Generator[simpy.Event, Any, int]:
        """One AR step of the batch (its mean context and furthest position: `_context`, `_furthest`); returns its
        draft steps (0)."""
        yield self.env.timeout(self.round_us(len(rows), 0, context, furthest))
        for row in rows:
            row.generated += 1
            row.remaining -= 1
            row.record.tokens += 1
        self.result.tokens += len(rows)
        return 0

    def _eesd_round(self, rows: list[_Row], context: int, furthest: int) -> Generator[simpy.Event, Any, int]:
        """One draft-then-verify round of the batch (an AR step where no row drafts); returns its draft steps."""
        drafting = []
        for row in rows:
            row.limit = round_budget(row.policy, row.remaining + row.past_end)
            row.drafted = row.accepted = 0
            row.all_match = True
            if row.limit > 0:
                drafting.append(row)
        if not drafting:  # a round in which no row drafts is one AR step
            yield from self._ar_round(rows, context, furthest)
            for row in rows:
                row.policy.update(0, 0)
            return 0
        while drafting:  # the batch drafts while any row drafts
            drafting = [row for row in drafting if self._draft_one(row)]
        k = max(row.drafted for row in rows)
        reads = any(row.policy.needs_confidence for row in rows)
        yield self.env.timeout(self.round_us(len(rows), k, context, furthest, reads))
        result, emitted_total = self.result, 0
        for row in rows:
            row.policy.update(row.drafted, row.accepted)
            emitted = min(row.accepted + 1, row.remaining)
            row.generated += emitted
            row.remaining -= emitted
            row.record.tokens += emitted
            emitted_total += emitted
            result.drafted += row.drafted
            result.accepted += row.accepted
        result.tokens += emitted_total
        return k

    def _draft_one(self, row: _Row) -> bool:
        """The row's next draft (position `generated + drafted`); whether it drafts again this round."""
        match, confidence = row.stream.draft(row.generated + row.drafted, row.drafted)
        row.drafted += 1
        row.all_match = row.all_match and match
        row.accepted += row.all_match
        return row.drafted < row.limit and row.policy.keep_drafting(row.drafted, confidence)

    def _verify(self, k: int) -> Pass:
        work = self.verify.get(k)
        if work is None:
            work = verify_pass(self.plan, k)
            self.verify[k] = work
        return work

    # ---- costs -------------------------------------------------------------------------------------------------------
    def round_us(self, batch: int, steps: int, context: int, furthest: int, reads: bool = False) -> float:
        """A decode round of `batch` rows at mean context `context`, its furthest written position `furthest`: one AR
        step (`steps` = 0), or `steps` draft steps (each reading the device if `reads`: a policy that stops on the
        draft's confidence) then the verify pass of `steps` drafts."""
        if steps == 0:
            return self.pass_us(self.decode, context, batch, furthest)
        draft = self.draft_read if reads else self.draft
        total = sum(self.pass_us(draft, context + i, batch, furthest + i) for i in range(steps))
        return total + self.pass_us(self._verify(steps), context + steps, batch, furthest + steps)

    def prefill_us(self, prompt_len: int, batch: int = 1) -> float:
        """A request's prefill: a batch-1 pass of `prompt_len` tokens through every layer, the LM head at its last
        (a PPSD batch's: `batch` rows as wide as its longest prompt)."""
        return self.pass_us(prefill_pass(self.plan, prompt_len), 0, batch)  # its name (with the length) keys the cache

    def logged_us(self, log: PassLog, reads: bool = False) -> float:
        """What this simulation's costs say a logged prefill, round or PPSD decode (another run's, e.g. the
        executor's) takes; a PPSD decode is simulated again with its logged verdicts (`ppsd_us`)."""
        if log.kind == "prefill":
            return self.prefill_us(log.tokens, log.batch)
        if log.kind == "ppsd" and log.stopped:  # decoded towards the tokens asked, stopped after its ticks
            return self.ppsd_us(log.context, log.asked, log.verdicts, log.batch, log.asked, stop_ticks=log.tokens,
                                rows=log.rows)  # fmt: skip
        if log.kind == "ppsd":
            output = log.furthest - log.context + 2
            return self.ppsd_us(log.context, output, log.verdicts, log.batch, log.asked, rows=log.rows)
        return self.round_us(log.batch, log.tokens, log.context, log.furthest, reads)

    def ppsd_us(
        self, prompt_len: int, output_len: int, verdicts: Sequence[bool], batch: int = 1, asked: int = 0,
        stop_ticks: int | None = None, rows: Sequence[tuple[int, int]] = (),
    ) -> float:  # fmt: skip
        """A PPSD decode of `output_len` tokens after a `prompt_len`-token prompt whose checked drafts go as
        `verdicts` (in order; the draft for generated token i + 1 is the i-th) on the plan's stages: alone, or a
        lockstep batch of `batch` rows judged as the batch was (every row given the batch's verdicts, each as long
        as the longest: its ticks and the batch's width; rows that ended sooner ran on in the executor's batch).
        `asked`: the tokens asked, where the decode ended at an EOS before them (a captured pipe's block of reads
        runs on past it, unread). `stop_ticks`: the decode stopped at the host read after that many ticks (continuous
        batching's join): its time to that read. `rows`: each row's (tokens made, tokens asked) as `PassLog.rows`
        (then each row runs to its own; in a stopped decode the rows that made the most were going on, towards the
        tokens they asked)."""
        policy = make_policy(self.plan.policy)
        if rows:
            most = max(made for made, _ in rows)
            lengths = [(wanted if stop_ticks is not None and made == most else made, wanted) for made, wanted in rows]
        else:
            lengths = [(output_len, max(asked, output_len))] * batch
        batch_rows = [BatchRow(VerdictStream(verdicts), policy, length, past_end=wanted - length)
                      for length, wanted in lengths]  # fmt: skip
        if stop_ticks is None:
            return decode_rows(self.ppsd_plan, prompt_len, batch_rows)[0].decode_time_us
        decode = LockstepDecode(self.ppsd_plan, prompt_len, batch_rows)
        while decode.advance():
            if decode.ticks >= stop_ticks:
                return decode.at_us
        raise ValueError(f"a PPSD decode stopped after {stop_ticks} ticks, but it ends sooner with these verdicts")

    def _context(self, rows: list[_Row]) -> int:
        """The batch's mean context: a pass over rows of different lengths reads (and multiplies) each row's own
        keys and values, as many as `batch` rows at the mean length (costs are linear in the context)."""
        return round(sum(row.request.prompt_len + row.generated for row in rows) / len(rows))

    @staticmethod
    def _furthest(rows: list[_Row]) -> int:
        """The furthest position a decode step of the batch writes (its longest row's last token)."""
        return max([row.request.prompt_len + row.generated for row in rows]) - 1

    def pass_us(self, work: Pass, context_len: int, batch: int, furthest: int = 0) -> float:
        """A pass's time through every stage it visits, the links between them and the token ids' way back; decode
        passes attend over the plan's cache slots where it has them (the executor's static cache), or over the span
        bucket of `furthest`, the furthest position they write (`SimPlan.attended`)."""
        plan = self.plan
        if plan.cache_slots and work.phase != "prefill":
            context_len = plan.attended(furthest + 1, work.phase)
        context_len = plan.rounded(context_len)
        key = (work.name, context_len, batch)  # names are unique per pass shape (a prefill's name has its length)
        cached = self._costs.get(key)
        if cached is None:
            first, last, durations, link_bytes = pass_costs(plan, work, context_len, batch)
            links = sum(plan.link_after(i).time_us(link_bytes[i]) for i in range(first, last))
            back = plan.link_back(last).time_us(TOKEN_ID_BYTES * batch) if last > 0 else 0.0
            cached = self._costs[key] = sum(durations) + links + back
        return cached


class RecordingStream:
    """A request's acceptance stream, remembering the verdict of the last draft judged at each position (a draft
    flushed before it was judged is judged again later, on the committed path)."""

    __slots__ = ("stream", "seen")

    def __init__(self, stream: Any) -> None:
        self.stream, self.seen = stream, {}

    def draft(self, position: int, index_in_round: int) -> tuple[bool, float]:
        match, confidence = self.stream.draft(position, index_in_round)
        self.seen[position] = match
        return match, confidence


def batch_verdicts(
    streams: Sequence[RecordingStream], lengths: Sequence[int], upto: int | None = None
) -> tuple[bool, ...]:
    """A lockstep batch's verdicts by position from its rows' recorded ones (`lengths`: each row's tokens): a draft is
    confirmed iff every row going on past it drafted right; where none goes on, the rows ending there judge it (as
    the executor's `_batch_verdict` has it). `upto`: the drafts for tokens 1 .. upto only (a decode stopped once
    those were emitted: the drafts after them were never judged)."""
    verdicts = []
    for position in sorted(set().union(*(stream.seen for stream in streams))):
        if upto is not None and position > upto:
            break
        judged = [(stream.seen[position], length) for stream, length in zip(streams, lengths, strict=True)
                  if position in stream.seen]  # fmt: skip
        going = [match for match, length in judged if position <= length - 2]
        verdicts.append(all(going or [match for match, _ in judged]))
    return tuple(verdicts)


class OffsetStream:
    """A request's acceptance stream from its `offset`-th generated token on (position 0 is that token): a
    continuous PPSD batch's stretch resumes each row from its last token."""

    __slots__ = ("stream", "offset")

    def __init__(self, stream: Any, offset: int) -> None:
        self.stream, self.offset = stream, offset

    def draft(self, position: int, index_in_round: int) -> tuple[bool, float]:
        return self.stream.draft(position + self.offset, index_in_round)


class VerdictStream:
    """Drafts judged as logged: generated token i + 1's draft matches iff `verdicts[i]` (confirmed past the end)."""

    __slots__ = ("verdicts",)

    def __init__(self, verdicts: Sequence[bool]) -> None:
        self.verdicts = tuple(verdicts)

    def draft(self, position: int, index_in_round: int) -> tuple[bool, float]:
        index = position - 1
        return (self.verdicts[index] if 0 <= index < len(self.verdicts) else True), 1.0


def logged_ratios(simulation: ServingSimulation, logs: Sequence[PassLog], reads: bool = False) -> list[float]:
    """Measured over simulated time of each logged prefill and round (another run's, e.g. the executor's), in the
    logs' order, each costed by `simulation` at its logged composition (`ServingSimulation.logged_us`)."""
    return [log.seconds * 1e6 / simulation.logged_us(log, reads) for log in logs]


def simulate_serving(point: ServingPoint) -> ServingResult:
    """Run one serving point."""
    return ServingSimulation(
        point.plan,
        point.workload,
        point.max_batch,
        point.kv_capacity_tokens,
        point.replicas,
        point.dispatch,
        point.ppsd_batching,
        point.ppsd_join_min,
    ).run()


@dataclass(frozen=True)
class ServingRun:
    point: ServingPoint
    result: ServingResult
    wall_s: float
    metrics: dict[str, float] = field(default_factory=dict)
