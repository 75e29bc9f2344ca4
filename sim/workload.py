"""Serving workloads: when requests arrive and how long their prompts and outputs are (torch-free, seeded).

A workload file (YAML, or the `serving.workload` mapping of a serving scenario) names an arrival process and two
length distributions:

    requests: 200                 # how many requests (a trace: its rows, or its first N)
    seed: 0
    arrival: {process: poisson, rate_per_s: 4.0}
    prompt_len: {dist: lognormal, median: 256, sigma: 0.6, max: 2048}
    output_len: 128               # an integer is a fixed length

Arrival processes: `poisson` (exponential gaps at `rate_per_s`), `gamma` (Gamma gaps at `rate_per_s` with coefficient
of variation `cv`: bursty for cv > 1, cv = 1 is Poisson), `closed` (`users` clients, each sending its next request
`think_s` seconds after its previous one finished: exponential think times, or `think: fixed`), `trace` (the
`arrival_s` column of a CSV file: `arrival_s,prompt_len,output_len[,prompt_id]`, a header line first, `#` comments
allowed, arrival times non-decreasing). Lengths: `fixed` (`value`, or a bare integer), `uniform` (integers in
[`low`, `high`]), `lognormal` (`median`, `sigma`, rounded and clipped to [`min`, `max`]), `trace` (the CSV's column,
with `arrival.process: trace`).

Randomness: each of arrivals, prompt lengths, output lengths and think times draws from its own stream of `seed`, so a
sweep over the rate keeps every request's lengths (common random numbers). Every size is bounded (`MAX_REQUESTS`,
`MAX_TOKENS`, ...), and a mistake raises `WorkloadError` naming the file and the field (a CSV: the line and column).
"""

from __future__ import annotations

import csv
import difflib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sim.formats import quote, read_text
from sim.models import ModelConfig
from sim.scenario import read_yaml

MAX_REQUESTS = 1_000_000  # requests in one workload
MAX_TOKENS = 1_048_576  # a prompt's or an output's length
MAX_RATE_PER_S = 1e6
MAX_USERS = 100_000
MAX_TIME_S = 1e9  # think times, arrival times
MAX_TRACE_BYTES = 64 << 20  # a workload trace: MAX_REQUESTS rows of a few dozen bytes
TRACE_COLUMNS = ("arrival_s", "prompt_len", "output_len")
STREAMS = {"arrival": 1, "prompt_len": 2, "output_len": 3, "think": 4}  # a sub-stream of the seed per quantity


class WorkloadError(ValueError):
    """A workload problem: `FILE: FIELD: what was expected`."""


class _Strict(BaseModel):
    """As `sim.scenario.Strict`: unknown keys refused, values of the field's type only ("4" is not an integer)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Poisson(_Strict):
    process: Literal["poisson"]
    rate_per_s: float = Field(gt=0, le=MAX_RATE_PER_S)


class GammaArrivals(_Strict):
    process: Literal["gamma"]
    rate_per_s: float = Field(gt=0, le=MAX_RATE_PER_S)
    cv: float = Field(gt=0, le=100)  # coefficient of variation of the gaps (1: Poisson)


class ClosedLoop(_Strict):
    process: Literal["closed"]
    users: int = Field(ge=1, le=MAX_USERS)
    think_s: float = Field(ge=0, le=MAX_TIME_S)  # mean think time (exponential) or the think time (fixed)
    think: Literal["exponential", "fixed"] = "exponential"


class TraceArrivals(_Strict):
    process: Literal["trace"]
    path: str  # CSV, relative to the file that names it


Arrival = Annotated[Poisson | GammaArrivals | ClosedLoop | TraceArrivals, Field(discriminator="process")]


def _ordered(model: Any, low: str, high: str) -> Any:
    """`model`, if its field `low` is at most its field `high`."""
    if getattr(model, low) > getattr(model, high):
        raise ValueError(f"{low} must be <= {high} (got {low} {getattr(model, low)}, {high} {getattr(model, high)})")
    return model


class FixedLen(_Strict):
    dist: Literal["fixed"]
    value: int = Field(ge=1, le=MAX_TOKENS)


class UniformLen(_Strict):
    dist: Literal["uniform"]
    low: int = Field(ge=1, le=MAX_TOKENS)
    high: int = Field(ge=1, le=MAX_TOKENS)

    @model_validator(mode="after")
    def _order(self) -> UniformLen:
        return _ordered(self, "low", "high")


class LognormalLen(_Strict):
    dist: Literal["lognormal"]
    median: float = Field(ge=1, le=MAX_TOKENS)
    sigma: float = Field(ge=0, le=5)
    min: int = Field(1, ge=1, le=MAX_TOKENS)
    max: int = Field(MAX_TOKENS, ge=1, le=MAX_TOKENS)

    @model_validator(mode="after")
    def _order(self) -> LognormalLen:
        return _ordered(self, "min", "max")


class TraceLen(_Strict):
    dist: Literal["trace"]


Length = Annotated[FixedLen | UniformLen | LognormalLen | TraceLen, Field(discriminator="dist")]


class WorkloadSpec(_Strict):
    requests: int | None = Field(None, ge=1, le=MAX_REQUESTS)  # required unless the arrivals come from a trace
    seed: int = Field(0, ge=0)
    arrival: Arrival
    prompt_len: Length
    output_len: Length

    @field_validator("prompt_len", "output_len", mode="before")
    @classmethod
    def _bare_length(cls, value: Any) -> Any:
        """A bare integer is a fixed length."""
        if isinstance(value, int) and not isinstance(value, bool):
            return {"dist": "fixed", "value": value}
        if not isinstance(value, dict):
            raise ValueError(
                "expected an integer (a fixed length) or a mapping with dist: fixed|uniform|lognormal|trace"
            )
        return value


@dataclass(frozen=True, slots=True)
class Request:
    """One request: `arrival_s` (None in a closed loop, where a user sends it), its lengths in tokens, the think time
    its user waits before sending it (closed loop) and a prompt id where a trace names one."""

    index: int
    prompt_len: int
    output_len: int
    arrival_s: float | None = None
    think_s: float = 0.0
    prompt_id: str | None = None


@dataclass(frozen=True)
class ServingWorkload:
    """The requests in index order; `users` is the closed loop's number of users (None: open loop)."""

    requests: tuple[Request, ...]
    users: int | None = None
    source: str = ""

    @property
    def closed(self) -> bool:
        return self.users is not None

    @property
    def max_prompt_len(self) -> int:
        return max(r.prompt_len for r in self.requests)

    @property
    def max_output_len(self) -> int:
        return max(r.output_len for r in self.requests)


class ClosedLoopUsers:
    """Who sends what when in a closed loop: request i goes out `think_s` after its user's previous request finished
    (at time 0 for each user's first). Requests are handed out in index order as users become free, so the same
    request carries the same lengths and think time whatever the order of completions."""

    def __init__(self, workload: ServingWorkload) -> None:
        if workload.users is None:
            raise ValueError("a closed loop needs a workload with users")
        self.requests = workload.requests
        self.next_index = 0
        self.users = workload.users

    def first(self) -> list[tuple[Request, float]]:
        """Each user's first request and when it is sent."""
        return [self._take(0.0) for _ in range(min(self.users, len(self.requests)))]

    def after(self, finish_s: float) -> tuple[Request, float] | None:
        """The finishing user's next request and when it is sent (None once every request has gone out)."""
        return self._take(finish_s) if self.next_index < len(self.requests) else None

    def _take(self, free_s: float) -> tuple[Request, float]:
        request = self.requests[self.next_index]
        self.next_index += 1
        return request, free_s + request.think_s


# ---- reading ---------------------------------------------------------------------------------------------------------
def load_workload(path: str | Path) -> ServingWorkload:
    """Read and validate a workload YAML file and draw its requests."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: workload file not found")
    if path.suffix.lower() == ".csv":
        raise WorkloadError(
            f"{path}: a workload is a YAML file; a CSV trace is replayed through one: arrival: {{process: trace, path: "
            f"{path.name}}}, prompt_len: {{dist: trace}}, output_len: {{dist: trace}}"
        )
    data = read_yaml(path)
    if isinstance(data, dict) and ("serving" in data or "model" in data):
        raise WorkloadError(
            f"{path}: a scenario, not a workload (it has {'serving' if 'serving' in data else 'model'}:): simulate it "
            "with eesd serve-sim, or give the workload file its serving.workload names"
        )
    return build_workload(parse_spec(data, str(path)), path.parent, str(path))


def parse_spec(data: Any, where: str, prefix: str = "") -> WorkloadSpec:
    """Validate a workload mapping; errors name `where` and the field (`prefix` + its dotted path)."""
    if not isinstance(data, dict):
        raise WorkloadError(f"{where}: {prefix.rstrip('.') or '(top level)'}: expected a mapping of workload fields")
    try:
        spec = WorkloadSpec.model_validate(data)
    except ValidationError as err:
        errors = _unrepeated(err.errors())
        raise WorkloadError("\n".join(_describe(where, prefix, e, data) for e in errors)) from None
    from_trace = isinstance(spec.arrival, TraceArrivals)
    if spec.requests is None and not from_trace:
        raise WorkloadError(f"{where}: {prefix}requests: required (the number of requests) unless arrivals are a trace")
    for name in ("prompt_len", "output_len"):
        if isinstance(getattr(spec, name), TraceLen) and not from_trace:
            raise WorkloadError(
                f"{where}: {prefix}{name}: dist trace reads a column of the arrival trace; it needs arrival.process "
                f"trace, got {spec.arrival.process}"
            )
    return spec


def _describe(where: str, prefix: str, error: Any, data: dict[str, Any]) -> str:
    tags = {"poisson", "gamma", "closed", "trace", "fixed", "uniform", "lognormal"}
    parts = [str(p) for p in error["loc"] if not (isinstance(p, str) and (p in tags or _is_union_tag(p)))]
    if len(parts) == 2 and parts[1] == "value" and not isinstance(data.get(parts[0]), dict):
        parts = parts[:1]  # a plain length (prompt_len: 0) is read as {dist: fixed, value: 0}: name the field given
    field = prefix + ".".join(parts) if parts else prefix.rstrip(".") or "(top level)"
    if error["type"] == "extra_forbidden":
        meant = _meant(tuple(error["loc"]))
        return f"{where}: {field}: unknown key" + (f" (did you mean {meant}?)" if meant else "")
    if error["type"] == "missing":
        return f"{where}: {field}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    if "(got " in message:  # the check says what it got
        return f"{where}: {field}: {message}"
    return f"{where}: {field}: {message} (got {quote(error.get('input'))})"


def _unrepeated(errors: list[Any]) -> list[Any]:
    """The errors without a "required field is missing" for a field an unknown key beside it misspells (the unknown
    key's line says "did you mean" it)."""
    unknown = (tuple(e["loc"]) for e in errors if e["type"] == "extra_forbidden")
    meant = {(*loc[:-1], near) for loc in unknown if (near := _meant(loc))}
    return [e for e in errors if not (e["type"] == "missing" and tuple(e["loc"]) in meant)]


def _meant(loc: tuple) -> str | None:
    """The key an unknown key at `loc` likely misspells, among those its mapping takes (None: none close)."""
    key, keys = str(loc[-1]), _workload_keys(loc[:-1])
    near = difflib.get_close_matches(key, keys, n=1) or [k for k in keys if k.startswith(key) or key.startswith(k)]
    return near[0] if near else None  # (rate: rate_per_s, its start)


def _workload_keys(loc: tuple) -> list[str]:
    """The keys a workload mapping at `loc` takes (its top level, or a named part: arrival, prompt_len, ...)."""
    if not loc:
        return sorted(WorkloadSpec.model_fields)
    kinds = {"arrival": (Poisson, GammaArrivals, ClosedLoop, TraceArrivals),
             "prompt_len": (FixedLen, UniformLen, LognormalLen, TraceLen)}  # fmt: skip
    models = kinds.get("prompt_len" if loc[0] == "output_len" else str(loc[0]), ())
    return sorted({key for model in models for key in model.model_fields})


def _is_union_tag(part: str) -> bool:
    return "[" in part or part.startswith(("function-", "tagged-union"))


def build_workload(
    spec: WorkloadSpec, base_dir: Path, where: str, prefix: str = "", model: ModelConfig | None = None
) -> ServingWorkload:
    """Draw the requests of a validated spec (a trace is read relative to `base_dir`); with `model`, each request's
    prompt + output must fit its context (`check_context`)."""
    trace, trace_path = None, None
    if isinstance(spec.arrival, TraceArrivals):
        trace_path = _resolve(base_dir, spec.arrival.path, where, f"{prefix}arrival.path")
        trace = read_workload_trace(trace_path)
        if spec.requests is not None and spec.requests > len(trace):
            raise WorkloadError(
                f"{where}: {prefix}requests: the trace {spec.arrival.path} has {len(trace)} rows, got {spec.requests}"
            )
    count = spec.requests if spec.requests is not None else len(trace or ())
    prompts = _lengths(spec.prompt_len, count, _stream(spec.seed, "prompt_len"), trace, 1)
    outputs = _lengths(spec.output_len, count, _stream(spec.seed, "output_len"), trace, 2)
    arrival, users = spec.arrival, None
    if isinstance(arrival, ClosedLoop):
        users = arrival.users
        thinks = _think_times(arrival, count, _stream(spec.seed, "think"))
        requests = tuple(Request(i, prompts[i], outputs[i], None, thinks[i]) for i in range(count))
    else:
        if trace is not None:
            times = [row[0] for row in trace[:count]]
            ids = [row[3] for row in trace[:count]]
        else:
            times, ids = arrival_times(arrival, count, _stream(spec.seed, "arrival")), [None] * count
        requests = tuple(Request(i, prompts[i], outputs[i], times[i], 0.0, ids[i]) for i in range(count))
    if model is not None:
        check_context(model, requests, spec, where, prefix, trace_path, trace)
    return ServingWorkload(requests, users, where)


def check_context(
    model: ModelConfig, requests: Sequence[Request], spec: WorkloadSpec, where: str, prefix: str = "",
    trace_path: Path | None = None, trace: Sequence[tuple] | None = None,
) -> None:  # fmt: skip
    """Each request's prompt + output within `model`'s context: a `WorkloadError` naming the trace's file and line
    where a length comes from the trace (`read_workload_trace`'s rows), else the workload's length fields and the
    request."""
    from_trace = trace is not None and TraceLen in (type(spec.prompt_len), type(spec.output_len))
    for request in requests:
        what = f"prompt_len {request.prompt_len} + output_len {request.output_len}"
        try:
            model.check_context(request.prompt_len + request.output_len, what)
        except ValueError as err:
            if from_trace and trace is not None:
                raise WorkloadError(f"{trace_path}: line {trace[request.index][4]}: {err}") from None
            fields = f"{prefix}prompt_len, {prefix}output_len"
            raise WorkloadError(f"{where}: {fields}: request {request.index}: {err}") from None


def with_rate(spec: WorkloadSpec, rate_per_s: float, where: str, field: str) -> WorkloadSpec:
    """The spec at another arrival rate (Poisson and Gamma arrivals only)."""
    if not isinstance(spec.arrival, (Poisson, GammaArrivals)):
        raise WorkloadError(
            f"{where}: {field}: a rate sweep needs poisson or gamma arrivals, the workload's are {spec.arrival.process}"
        )
    if not 0 < rate_per_s <= MAX_RATE_PER_S:
        raise WorkloadError(f"{where}: {field}: rates must be in (0, {MAX_RATE_PER_S:g}] per second, got {rate_per_s}")
    return spec.model_copy(update={"arrival": spec.arrival.model_copy(update={"rate_per_s": float(rate_per_s)})})


def _stream(seed: int, quantity: str) -> random.Random:
    return random.Random(seed * 1_000_003 + STREAMS[quantity])


def arrival_times(arrival: Poisson | GammaArrivals, count: int, rng: random.Random) -> list[float]:
    """Cumulative gaps from time 0: exponential (Poisson) or Gamma with shape 1/cv² and mean 1/rate."""
    times, now = [], 0.0
    if isinstance(arrival, Poisson):
        draw = lambda: rng.expovariate(arrival.rate_per_s)  # noqa: E731
    else:
        shape = 1.0 / arrival.cv**2
        scale = 1.0 / (arrival.rate_per_s * shape)
        draw = lambda: rng.gammavariate(shape, scale)  # noqa: E731
    for _ in range(count):
        now += draw()
        times.append(now)
    return times


def _think_times(arrival: ClosedLoop, count: int, rng: random.Random) -> list[float]:
    if arrival.think == "fixed" or arrival.think_s == 0:
        return [arrival.think_s] * count
    return [rng.expovariate(1.0 / arrival.think_s) for _ in range(count)]


def _lengths(
    spec: FixedLen | UniformLen | LognormalLen | TraceLen,
    count: int,
    rng: random.Random,
    trace: Sequence[tuple] | None,
    column: int,
) -> list[int]:
    if isinstance(spec, FixedLen):
        return [spec.value] * count
    if isinstance(spec, UniformLen):
        return [rng.randint(spec.low, spec.high) for _ in range(count)]
    if isinstance(spec, LognormalLen):
        mu = math.log(spec.median)
        return [min(spec.max, max(spec.min, round(rng.lognormvariate(mu, spec.sigma)))) for _ in range(count)]
    assert trace is not None  # the spec's validator requires a trace for dist: trace
    return [int(row[column]) for row in trace[:count]]


def read_workload_trace(path: Path) -> list[tuple[float, int, int, str | None, int]]:
    """Rows (arrival_s, prompt_len, output_len, prompt_id or None, line number) of a workload CSV, checked line by
    line; at least one."""
    text = read_text(path, MAX_TRACE_BYTES, "workload trace")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise WorkloadError(f"{path}: empty workload trace; expected a header {','.join(TRACE_COLUMNS)}[,prompt_id]")
    header_line, header = lines[0][0], next(csv.reader([lines[0][1]]))
    header = [h.strip() for h in header]
    missing = [c for c in TRACE_COLUMNS if c not in header]
    unknown = [c for c in header if c not in (*TRACE_COLUMNS, "prompt_id")]
    if missing or unknown:
        raise WorkloadError(
            f"{path}: line {header_line}: header: expected columns {','.join(TRACE_COLUMNS)}[,prompt_id], got "
            f"{','.join(header)}"
        )
    if len(lines) == 1:
        raise WorkloadError(f"{path}: no requests after the header (line {header_line})")
    if len(lines) - 1 > MAX_REQUESTS:
        raise WorkloadError(f"{path}: {len(lines) - 1} rows; at most {MAX_REQUESTS} requests")
    rows, last = [], 0.0
    for number, line in lines[1:]:
        cells = [c.strip() for c in next(csv.reader([line]))]
        if len(cells) != len(header):
            raise WorkloadError(f"{path}: line {number}: expected {len(header)} cells, got {len(cells)}")
        record = dict(zip(header, cells, strict=True))
        arrival = _cell(path, number, "arrival_s", record["arrival_s"], float, 0.0, MAX_TIME_S)
        if arrival < last:
            raise WorkloadError(
                f"{path}: line {number}: arrival_s: arrival times must not decrease ({arrival} after {last})"
            )
        last = arrival
        prompt = _cell(path, number, "prompt_len", record["prompt_len"], int, 1, MAX_TOKENS)
        output = _cell(path, number, "output_len", record["output_len"], int, 1, MAX_TOKENS)
        rows.append((arrival, prompt, output, record.get("prompt_id") or None, number))
    return rows


def _cell(path: Path, line: int, column: str, text: str, kind: type, low: float, high: float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not low <= value <= high:
        what = "an integer" if kind is int else "a number"
        bounds = ", ".join(f"{int(b):,}" if float(b).is_integer() else f"{b:g}" for b in (low, high))
        raise WorkloadError(f"{path}: line {line}: {column}: expected {what} in [{bounds}], got {quote(text)}")
    return value


def _resolve(base_dir: Path, relative: str, where: str, field: str) -> Path:
    path = (base_dir / relative).resolve()
    if not path.is_file():
        raise WorkloadError(f"{where}: {field}: file not found: {path}")
    return path
