"""Versioned calibration files: latency profiles, acceptance traces, link and contention profiles (docs/formats.md).

The contract between `calibrate/` (writes) and `sim/` (reads); torch-free. Every file is a UTF-8 CSV whose first line
is a `#` followed by one JSON object, `{"format": "eesd.<kind>", "schema_version": N, "metadata": {...}, "rows": R}`,
then a CSV header and R rows, one per record (`rows` is optional: files written before it was counted lack it). Times
are in microseconds (`*_us`), sizes in bytes (`nbytes`), probabilities in [0, 1].

Writers are atomic (temporary file in the same folder + `os.replace`). Readers raise `ValueError` naming the file and
the line for: a file in another encoding or a binary one, a file larger than `MAX_FILE_BYTES`, a missing or malformed
header, another format, an unknown schema version, missing or unknown columns, missing metadata keys (or required ones
that are not names), unparsable cells, impossible values (negative times or times beyond `MAX_US`, probabilities
outside [0, 1], integers beyond 2**53, p10 > median or median > p90), duplicate keys, and a file that is not whole:
no records, a last line without its line end (cut inside it), or fewer rows than the header counts (cut at a line
end). Writers refuse the same.
Messages quote values in about 80 characters (`quote`), whatever their size.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import reprlib
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.workers import USER_ERRORS

SCHEMA_VERSION = 1

COMPONENTS = ("embed", "layer", "exit_head", "lm_head", "overhead")
PHASES = ("draft", "verify", "prefill")


@dataclass(frozen=True)
class LatencyRecord:
    """Device time of one component (one decoder layer for `layer`) in one phase, µs."""

    component: str  # embed | layer | exit_head | lm_head | overhead
    phase: str  # draft | verify | prefill
    q: int  # tokens in the pass, per sequence
    context_len: int  # tokens already in the KV cache
    batch: int
    cuda_graphs: bool
    median_us: float
    p10_us: float
    p90_us: float


@dataclass(frozen=True)
class AcceptanceRecord:
    """One generated token of the full model and, for one exit layer, whether the exit head's top token matched."""

    prompt_id: str
    position: int  # index of the token among the prompt's generated tokens, from 0
    token: int
    exit_layer: int
    match: bool
    confidence: float  # the exit head's top-1 probability


@dataclass(frozen=True)
class LinkRecord:
    """Time to move `nbytes` from one pipeline stage to the next, µs."""

    nbytes: int
    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float | None = None  # where measured: what a message costs on average (the simulator's price)


@dataclass(frozen=True)
class ContentionRecord:
    """`passes` passes launched together on one device (or, a `processes` profile, on one host's cores): each timed
    alone (their sum and the longest) and together (median, p10, p90 over the repeats), µs; at `batch` rows where
    the file says."""

    passes: int
    alone_sum_us: float
    alone_max_us: float
    median_us: float
    p10_us: float
    p90_us: float
    batch: int | None = None  # the rows each pass ran; None (a file without the column): every batch


@dataclass(frozen=True)
class Column:
    name: str
    kind: type
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False  # a file may lack it (its records then hold None); written only where a record holds one


@dataclass(frozen=True)
class FileFormat:
    kind: str
    record_type: type
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # columns that identify a record; duplicates are rejected
    required_metadata: tuple[str, ...]


@dataclass(frozen=True)
class DataFile:
    """A whole file: its format kind, metadata and records in file order."""

    kind: str
    metadata: Mapping[str, Any]
    records: tuple[Any, ...]
    path: str = ""  # the file read, for the messages of those who use its records


FIRST_RECORD_LINE = 3  # a file's first record: after the header line and the column names
MAX_US = 1e12  # a time beyond a million seconds is no measurement (and a run summing such times overflows)
_TIME = {"kind": float, "minimum": 0.0, "maximum": MAX_US}
LATENCY_PROFILE = FileFormat(
    kind="latency_profile",
    record_type=LatencyRecord,
    columns=(
        Column("component", str, choices=COMPONENTS),
        Column("phase", str, choices=PHASES),
        Column("q", int, minimum=1),
        Column("context_len", int, minimum=0),
        Column("batch", int, minimum=1),
        Column("cuda_graphs", bool),
        Column("median_us", **_TIME),
        Column("p10_us", **_TIME),
        Column("p90_us", **_TIME),
    ),
    key=("component", "phase", "q", "context_len", "batch", "cuda_graphs"),
    required_metadata=("device", "dtype", "model"),
)
ACCEPTANCE_TRACE = FileFormat(
    kind="acceptance_trace",
    record_type=AcceptanceRecord,
    columns=(
        Column("prompt_id", str),
        Column("position", int, minimum=0),
        Column("token", int, minimum=0),
        Column("exit_layer", int, minimum=1),
        Column("match", bool),
        Column("confidence", float, minimum=0.0, maximum=1.0),
    ),
    key=("prompt_id", "position", "exit_layer"),
    required_metadata=("model", "head"),
)
LINK_PROFILE = FileFormat(
    kind="link_profile",
    record_type=LinkRecord,
    columns=(
        Column("nbytes", int, minimum=0),
        Column("median_us", **_TIME),
        Column("p10_us", **_TIME),
        Column("p90_us", **_TIME),
        Column("mean_us", optional=True, **_TIME),
    ),
    key=("nbytes",),
    required_metadata=("backend",),
)
CONTENTION_PROFILE = FileFormat(
    kind="contention_profile",
    record_type=ContentionRecord,
    columns=(
        Column("passes", int, minimum=2),
        Column("alone_sum_us", **_TIME),
        Column("alone_max_us", **_TIME),
        Column("median_us", **_TIME),
        Column("p10_us", **_TIME),
        Column("p90_us", **_TIME),
        Column("batch", int, minimum=1, optional=True),
    ),
    key=("passes", "batch"),
    required_metadata=("device", "backend"),
)
FORMATS = {f.kind: f for f in (LATENCY_PROFILE, ACCEPTANCE_TRACE, LINK_PROFILE, CONTENTION_PROFILE)}


MAX_FILE_BYTES = 256 << 20  # a calibration file is at most a few MB; larger is not one
MAX_INT = 2**53  # integers a float holds exactly (interpolation and sizes are computed in floats)


def write_file(path: str | Path, fmt: FileFormat, metadata: Mapping[str, Any], records: Iterable[Any]) -> Path:
    """Validate and write `records` atomically; returns the path. The header counts the rows (`rows`), so that a
    reader can tell a whole file from one cut short at a line end."""
    path = Path(path)
    records = tuple(records)
    _check_metadata(path, fmt, metadata)
    if not records:
        raise ValueError(f"{path}: no records; a {fmt.kind} holds at least one")
    buffer = io.StringIO()
    header = {"format": f"eesd.{fmt.kind}", "schema_version": SCHEMA_VERSION, "metadata": dict(metadata)}
    buffer.write("# " + json.dumps({**header, "rows": len(records)}, sort_keys=True) + "\n")
    writer = csv.writer(buffer, lineterminator="\n")
    try:
        columns = _written_columns(fmt, records)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    writer.writerow([c.name for c in columns])
    seen: set[tuple] = set()
    for line, record in enumerate(records, start=FIRST_RECORD_LINE):
        if not isinstance(record, fmt.record_type):
            raise ValueError(f"{path}: record {line - 2} is a {type(record).__name__}, not {fmt.record_type.__name__}")
        _check_record(path, line, fmt, record, seen)
        writer.writerow([_format_cell(getattr(record, c.name)) for c in columns])
    write_text_atomic(path, buffer.getvalue())
    return path


def _written_columns(fmt: FileFormat, records: Sequence[Any]) -> list[Column]:
    """The columns a file of `records` holds: every required one, and an optional one where the records hold its
    values (all of them: a column is in a file or not)."""
    columns = []
    for column in fmt.columns:
        given = [getattr(r, column.name, None) is not None for r in records]
        if column.optional and any(given) and not all(given):
            raise ValueError(f"column {column.name!r}: give it in every record or in none, got {sum(given)} of "
                             f"{len(given)}")  # fmt: skip
        if not column.optional or any(given):
            columns.append(column)
    return columns


def read_file(path: str | Path, fmt: FileFormat) -> DataFile:
    """Read and validate a file of format `fmt`: UTF-8, at most `MAX_FILE_BYTES`, whole (its last line ends with a
    line end, and it has the rows its header counts where it counts them), at least one record."""
    path = Path(path)
    text = read_text(path, MAX_FILE_BYTES, f"{fmt.kind} file")
    if text and not text.endswith("\n"):
        raise ValueError(
            f"{path}:{text.count(chr(10)) + 1}: the last line has no line end: the file was cut short (every line a "
            "writer writes ends with one; add the line end if the line is whole)"
        )
    handle = io.StringIO(text, newline="")
    header = _read_header(path, fmt, handle.readline())
    metadata = header["metadata"]
    reader = csv.reader(handle)
    try:
        names = next(reader, None)
        _check_columns(path, fmt, names or [])
        order = [names.index(c.name) if c.name in names else None for c in fmt.columns]
        records, seen = [], set()
        for line, row in enumerate(reader, start=FIRST_RECORD_LINE):
            if len(row) != len(names):
                raise ValueError(f"{path}:{line}: expected {len(names)} cells, got {len(row)}")
            values = [None if i is None else _parse_cell(path, line, column, row[i])
                      for column, i in zip(fmt.columns, order, strict=True)]  # fmt: skip
            record = fmt.record_type(*values)
            _check_record(path, line, fmt, record, seen)
            records.append(record)
    except csv.Error as err:  # e.g. a cell beyond csv's field size limit
        raise ValueError(f"{path}:{reader.line_num + 1}: not a CSV line ({err})") from None
    _check_rows(path, fmt, header, len(records))
    return DataFile(fmt.kind, metadata, tuple(records), str(path))


def _check_rows(path: Path, fmt: FileFormat, header: Mapping[str, Any], count: int) -> None:
    if count == 0:
        raise ValueError(f"{path}: no records after the header; a {fmt.kind} holds at least one")
    rows = header.get("rows")
    if rows is None:  # files written before the header counted rows
        return
    if isinstance(rows, bool) or not isinstance(rows, int):
        raise ValueError(f"{path}:1: header field 'rows' must be an integer, got {json.dumps(rows)[:80]}")  # (JSON's)
    if rows != count:
        raise ValueError(
            f"{path}: the header counts {rows} rows, the file has {count}: it was cut short or edited by hand"
        )


def write_latency_profile(path: str | Path, metadata: Mapping[str, Any], records: Iterable[LatencyRecord]) -> Path:
    return write_file(path, LATENCY_PROFILE, metadata, records)


def read_latency_profile(path: str | Path) -> DataFile:
    return read_file(path, LATENCY_PROFILE)


def latency_profile_name(model: str, device_type: str, dtype: str, kernels: str = "eager") -> str:
    """The file name `eesd calibrate latency` gives a profile (`model` already a file-name-safe label): a profile of
    compiled kernels (metadata `kernels`) ends `_compiled`, so it never overwrites the eager one."""
    suffix = "" if kernels == "eager" else f"_{kernels}"
    return f"latency_{model}_{device_type}_{dtype}{suffix}.csv"


def write_acceptance_trace(path: str | Path, metadata: Mapping[str, Any], records: Iterable[AcceptanceRecord]) -> Path:
    return write_file(path, ACCEPTANCE_TRACE, metadata, records)


def read_acceptance_trace(path: str | Path) -> DataFile:
    return read_file(path, ACCEPTANCE_TRACE)


def write_link_profile(path: str | Path, metadata: Mapping[str, Any], records: Iterable[LinkRecord]) -> Path:
    return write_file(path, LINK_PROFILE, metadata, records)


def read_link_profile(path: str | Path) -> DataFile:
    return read_file(path, LINK_PROFILE)


def write_contention_profile(
    path: str | Path, metadata: Mapping[str, Any], records: Iterable[ContentionRecord]
) -> Path:
    return write_file(path, CONTENTION_PROFILE, metadata, records)


def read_contention_profile(path: str | Path) -> DataFile:
    return read_file(path, CONTENTION_PROFILE)


def subset_size(head: str) -> int | None:
    """N of a `shared:N` or `trained:N` exit head spec (the shared head, or a trained one, over N token ids; a whole
    number >= 1), else None."""
    kind, _, count = head.partition(":")
    return int(count) if kind in ("shared", "trained") and count.isdigit() and int(count) >= 1 else None


def is_trained(head: str) -> bool:
    """Whether an exit head spec names a trained head (`trained`, or `trained:N` over a draft vocabulary of N ids):
    one decoder layer of its own before the norm and LM head."""
    return head == "trained" or (head.startswith("trained:") and subset_size(head) is not None)


def read_head_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exit head file (`executor.heads`: safetensors, format `eesd-exit-head`), read from the
    safetensors header without torch: 8 bytes little-endian header length, then a JSON object whose
    `__metadata__` holds the strings. A ValueError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exit head file {path} does not exist")
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 2 <= size <= 100_000_000 or size > path.stat().st_size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {size})")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != "eesd-exit-head":
        raise ValueError(f"{path}: not an EESD exit head file (no eesd-exit-head format in its metadata)")
    return {str(k): str(v) for k, v in metadata.items()}


def trace_head(path: str | Path, trace: DataFile) -> str:
    """An acceptance trace's head: `shared` / `shared:N` as named, else the head file as the trace names it (the
    path `eesd calibrate acceptance --head` was given), found from the working folder, else from the trace's own
    folder or one above it (a trace recorded at the root of a project and kept in a folder of it, as the shipped
    ones: `heads/x.safetensors` named from the root, the trace in `calibration/cpu/`); as named where none holds it."""
    head = str(trace.metadata["head"])
    if head == "shared" or head.startswith("shared:") or Path(head).is_absolute() or Path(head).exists():
        return head
    for folder in Path(path).resolve().parents:
        if (folder / head).is_file():
            return str(folder / head)
    return head


def trace_exit_head(path: str | Path, trace: DataFile) -> str:
    """The scenario `exit_head` an acceptance trace's head is: `shared` and `shared:N` by name, a head file (found
    as `trace_head` finds it) by its metadata: a vocabulary-subset file of N ids is `shared:N`, a trained head
    `trained`, or `trained:N` over a draft vocabulary of N ids. A ValueError naming the trace where the file cannot
    be read."""
    head = trace_head(path, trace)
    if head == "shared" or head.startswith("shared:"):
        return head
    try:
        metadata = read_head_metadata(head)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(
            f"{path}: metadata.head: the head file {head!r} cannot be read (looked in the working folder and the "
            f"trace's folder and those above it): {err}"
        ) from None
    if metadata.get("head_architecture") == "vocab-subset":
        return f"shared:{metadata.get('subset_size')}"
    vocab = metadata.get("draft_vocab_size")
    return "trained" + (f":{vocab}" if vocab else "")


_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = 80
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 6
_QUOTE.maxlevel = 3


SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}  # torch's -> short


def short_dtype(name: str) -> str:
    """A dtype named either way (`bfloat16`, `bf16`) as the short name the calibration commands and scenarios use."""
    return SHORT_DTYPES.get(name, name)


def long_dtype(name: str) -> str:
    """A dtype named either way as torch's name, which the executor's commands use."""
    return {short: long for long, short in SHORT_DTYPES.items()}.get(name, name)


def quote(value: Any, limit: int = 80) -> str:
    """`repr(value)` for an error message, at most about `limit` characters whatever the value's size: an error
    never echoes a whole input (reprlib bounds the work, nested containers are elided as `...`)."""
    text = _QUOTE.repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


_BOMS = {codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32", codecs.BOM_UTF16_LE: "UTF-16",
         codecs.BOM_UTF16_BE: "UTF-16"}  # fmt: skip


def read_text(path: str | Path, max_bytes: int, what: str = "file") -> str:
    """The UTF-8 text of `path`, read up to `max_bytes` (a longer file, a file in another encoding or a binary one
    is a ValueError naming the file, and the line where a byte is wrong). A UTF-8 byte-order mark is dropped."""
    path = Path(path)
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: larger than {max_bytes:,} bytes, more than a {what} may hold")
    for bom, name in _BOMS.items():
        if data.startswith(bom):
            raise ValueError(f"{path}: {name} text (it starts with a {name} byte-order mark); save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}): a binary file, or "
            f"text in another encoding; save it as UTF-8"
        ) from None
    first_line = text.partition("\n")[0]
    if "\x00" in first_line:
        raise ValueError(f"{path}:1: NUL bytes in the first line: a binary or UTF-16 file, not UTF-8 text")
    return text


def check_output(flag: str, path: str | Path, folder: bool = False, force: bool | None = None) -> None:
    """Before any work: `path` can be written as the file (or, `folder`, the folder) that `flag` names: not a folder
    where a file goes (nor a file where a folder goes), its nearest existing parent a folder (so the missing ones can
    be made), and, with `force` given, no existing file unless it is True. A ValueError naming the flag otherwise."""
    path = Path(path)
    try:
        if folder and path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {path}: is a file; {flag} names the folder the outputs are written into")
        if not folder and path.is_dir():
            raise ValueError(f"{flag} {path}: is a folder; {flag} names the file to write")
        parent = next((p for p in path.parents if p.exists()), None)
    except OSError as err:  # a name too long, a folder that cannot be read
        raise ValueError(f"{flag} {quote(str(path))}: not a path one can write to ({err.strerror})") from None
    if parent is not None and not parent.is_dir():
        made = path if folder else path.parent
        raise ValueError(f"{flag} {path}: {parent} is a file, so the folder {made} cannot be made")
    if force is False and not folder and path.exists():
        raise ValueError(f"{flag} {path} exists; pass --force to overwrite it")
    if folder and path.is_dir():
        _probe(flag, path, path)  # the outputs go into it
    elif parent is not None:
        _probe(flag, path, parent)


# a benchmark script's flags of these names are counts of at least 1 wherever it has them (`check_benchmark_args`)
COUNT_FLAGS = (
    "threads", "repeats", "runs", "prompts", "num_prompts", "tokens", "new_tokens", "max_new_tokens", "cycles",
    "steps", "requests", "samples", "processes", "layers", "max_k", "calls",
)  # fmt: skip


def check_benchmark_args(args: Any, *, inputs: Sequence[str] = (), counts: Sequence[str] = ()) -> None:
    """What a benchmark script checks before its work, one line and exit 2 each rather than a traceback: its `--out`
    (`args.out`) can be written, its input files (`args.<name>` in `inputs`: a path or a list of them) exist, and its
    count flags (`args.<name>` in `counts`, and any of `COUNT_FLAGS` it has) are >= 1. None means a flag not given."""
    check_benchmark_out(args)
    check_benchmark_inputs(args, *inputs)
    given = [name for name in COUNT_FLAGS if isinstance(getattr(args, name, None), int)]
    check_benchmark_counts(args, *dict.fromkeys([*counts, *given]))


def read_validate_json(path: str | Path, flag: str) -> dict[str, Any]:
    """An `eesd validate --json` file (its `metadata`: scenario, prompts, max_new_tokens; its `rows`), read for a
    benchmark script; a ValueError naming `flag` and the file where it is not one."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{flag} {path}: not a JSON file ({err})") from None
    meta = document.get("metadata") if isinstance(document, dict) else None
    if not isinstance(meta, dict) or not isinstance(document.get("rows"), list):
        raise ValueError(f"{flag} {path}: not an `eesd validate --json` file (expected 'metadata' and 'rows')")
    missing = [key for key in ("scenario", "prompts", "max_new_tokens") if key not in meta]
    if missing:
        raise ValueError(f"{flag} {path}: metadata lacks {', '.join(missing)} (written by an older eesd validate?)")
    return document


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's first), else what `platform` says."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran, for its JSON: the CPU's model name (/proc/cpuinfo; else what `platform` says), its
    cores, the platform, Python's version, the date (UTC) and the command line."""
    import platform
    import shlex
    from datetime import datetime, timezone

    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
    }  # fmt: skip


class UsageExit(SystemExit):
    """A benchmark script's mistake found before its work: `SCRIPT: error: MESSAGE` on stderr (printed when raised,
    as argparse prints its own) and exit status 2, as argparse's and `run_script`'s; `str()` is that line."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.line = f"{Path(sys.argv[0]).name}: error: {message}"
        print(self.line, file=sys.stderr)

    def __str__(self) -> str:
        return self.line


def run_script(main: Callable[[], int | None]) -> int:
    """Run a benchmark script's `main` as `eesd` runs a command: a user's mistake that surfaces in the work (a
    missing head file, prompt set or corpus; a value out of range) is one line naming the script and exit 2, not a
    traceback (EESD_DEBUG=1 shows it). Returns the exit status."""
    try:
        return int(main() or 0)
    except USER_ERRORS as err:
        if os.environ.get("EESD_DEBUG"):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        return 2


def check_benchmark_counts(args: Any, *names: str) -> None:
    """A benchmark script's count flags (`args.<name>`, None: not given) are >= 1: one line and exit 2 otherwise."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise UsageExit(f"{flag} must be >= 1, got {value}")


def check_benchmark_inputs(args: Any, *names: str) -> None:
    """A benchmark script's input files (`args.<name>`: a path or a list of them) exist: one line naming the flag and
    exit 2 otherwise, rather than a traceback."""
    for name in names:
        value = getattr(args, name, None)
        for path in value if isinstance(value, list) else [value]:
            if path is not None and not Path(path).is_file():
                flag = name if name in ("files", "scenario") else "--" + name.replace("_", "-")
                raise UsageExit(f"{flag} {path}: no such file")


def check_benchmark_out(args: Any, flag: str = "--out") -> None:
    """A benchmark script's `--out` (`args.out`, None: not given) checked before its work (`check_output`): one line
    and exit 2 where it cannot be written, rather than a traceback after the run."""
    path = getattr(args, "out", None)
    if path is None:
        return
    try:
        check_output(flag, path)
    except ValueError as err:
        raise UsageExit(str(err)) from None


def _probe(flag: str, path: Path, parent: Path) -> None:
    """A file can be made in `parent` (the folder `path` is written into, or the nearest one on the way to it): a
    ValueError naming the flag otherwise, before a long run finds out at its end."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".eesd-probe-", dir=parent)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write in {parent} ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder + `os.replace` (readers never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; data files are meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_figure_atomic(fig: Any, path: Path, **options: Any) -> Path:
    """matplotlib's `fig.savefig` through a temporary file beside `path` (its suffix kept: it names the format) +
    `os.replace`, so an interrupted run leaves the earlier plot or none, never half of one."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp_name, **options)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def remove_stale(out_dir: Path, command: str, written: Iterable[Path]) -> list[Path]:
    """The files `command` wrote in `out_dir` on its last run there and did not write again on this one (another
    scenario's cases, a sweep's plots), removed so that a reused folder holds one run's results; a user's own files
    are never touched: only names listed in the folder's `.eesd-<command>-outputs` (the last run's, then rewritten
    with this run's) go. Returns the removed paths, for the command to say so."""
    manifest = out_dir / f".eesd-{command}-outputs"
    names = sorted({Path(path).name for path in written if Path(path).parent.resolve() == out_dir.resolve()})
    try:
        earlier = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no earlier run here (or an unreadable list: nothing is removed)
        earlier = []
    removed = []
    for name in earlier if isinstance(earlier, list) else []:
        path = out_dir / str(name)
        if str(name) not in names and Path(str(name)).name == str(name) and path.is_file():
            path.unlink()
            removed.append(path)
    write_text_atomic(manifest, json.dumps(names) + "\n")
    return removed


def _read_header(path: Path, fmt: FileFormat, first_line: str) -> dict[str, Any]:
    """The header line's JSON object (`format`, `schema_version`, `metadata`, `rows` where counted), checked."""
    expected = f"eesd.{fmt.kind}"
    if not first_line.startswith("#"):
        raise ValueError(f'{path}:1: expected a \'# {{"format": "{expected}", ...}}\' header line')
    try:
        header = json.loads(first_line[1:])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:1: header is not valid JSON ({err.msg})") from None
    except (ValueError, RecursionError) as err:  # a number beyond int's digit limit; nesting too deep
        raise ValueError(f"{path}:1: header is not valid JSON ({type(err).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != expected:
        found = header.get("format") if isinstance(header, dict) else header
        raise ValueError(f"{path}:1: expected format {expected!r}, found {quote(found)}")
    version = header.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}:1: unknown schema_version {quote(version)}; this reader knows {SCHEMA_VERSION}")
    metadata = header.get("metadata")
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}:1: header field 'metadata' must be a JSON object")
    _check_metadata(path, fmt, metadata)
    return header


def _check_metadata(path: Path, fmt: FileFormat, metadata: Mapping[str, Any]) -> None:
    missing = [key for key in fmt.required_metadata if key not in metadata]
    if missing:
        raise ValueError(f"{path}: metadata is missing {missing}; required: {list(fmt.required_metadata)}")
    for key in fmt.required_metadata:
        value = metadata[key]
        if not isinstance(value, str) or not value or len(value) > 1000:
            raise ValueError(f"{path}: metadata.{key}: expected a name (1 to 1000 characters), got {quote(value)}")
    try:
        json.dumps(dict(metadata))
    except TypeError as err:
        raise ValueError(f"{path}: metadata must be JSON-serialisable ({err})") from None


def _check_columns(path: Path, fmt: FileFormat, names: Sequence[str]) -> None:
    required = [c.name for c in fmt.columns if not c.optional]
    optional = [c.name for c in fmt.columns if c.optional]
    missing = [n for n in required if n not in names]
    unknown = [n for n in names if n not in required + optional]
    if missing or unknown or len(set(names)) != len(names):
        also = f" and optionally {optional}" if optional else ""
        raise ValueError(
            f"{path}:2: columns {_listed(names)} do not match {fmt.kind} v{SCHEMA_VERSION}: "
            f"missing {missing}, unknown {_listed(unknown)}; expected {required}{also}"
        )


def _listed(names: Sequence[str], limit: int = 300) -> str:
    """A list of column names as Python writes it, cut to about `limit` characters (a line may hold anything)."""
    text = repr(list(names))
    return text if len(text) <= limit else f"{text[: limit - 10]}... ({len(names)} names)]"


def _format_cell(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse_cell(path: Path, line: int, column: Column, text: str) -> Any:
    try:
        if column.kind is bool:
            if text not in ("0", "1"):
                raise ValueError
            return text == "1"
        return column.kind(text)
    except ValueError:
        expected = "0 or 1" if column.kind is bool else f"a {column.kind.__name__}"
        if column.optional and not text.strip():
            expected += " in every row (an optional column: give it a value in every row, or drop the column)"
        raise ValueError(f"{path}:{line}: column {column.name!r}: expected {expected}, got {quote(text)}") from None


def check_record(path: Path, line: int, fmt: FileFormat, record: Any) -> None:
    """One record's values as `fmt`'s reader checks them (types, ranges, p10 <= median <= p90): a ValueError naming
    `path`:`line` and the column otherwise. For records kept elsewhere before a file is written (a partial run)."""
    _check_record(path, line, fmt, record, set())


def _check_record(path: Path, line: int, fmt: FileFormat, record: Any, seen: set[tuple]) -> None:
    where = f"{path}:{line}"
    for column in fmt.columns:
        value = getattr(record, column.name)
        if value is not None or not column.optional:
            _check_value(where, column, value)
    if hasattr(record, "median_us") and not record.p10_us <= record.median_us <= record.p90_us:
        raise ValueError(
            f"{where}: need p10_us <= median_us <= p90_us, got {record.p10_us}, {record.median_us}, {record.p90_us}"
        )
    if hasattr(record, "alone_max_us") and not record.alone_max_us <= record.alone_sum_us:
        raise ValueError(
            f"{where}: need alone_max_us <= alone_sum_us, got {record.alone_max_us}, {record.alone_sum_us}"
        )
    key = tuple(getattr(record, name) for name in fmt.key)
    if key in seen:
        named = {name: value for name, value in zip(fmt.key, key, strict=True) if value is not None}
        raise ValueError(f"{where}: duplicate record for {named}")
    seen.add(key)


def _check_value(where: str, column: Column, value: Any) -> None:
    name = column.name
    if column.kind is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: column {name!r} must be a bool, got {quote(value)}")
    if column.kind is int and (isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_INT):
        raise ValueError(f"{where}: column {name!r} must be an int of at most 2**53, got {quote(value)}")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if column.kind is float and not (is_number and math.isfinite(value)):
        raise ValueError(f"{where}: column {name!r} must be a finite number, got {quote(value)}")
    if column.kind is str and (not isinstance(value, str) or value == "" or "\n" in value or "\r" in value):
        raise ValueError(f"{where}: column {name!r} must be a non-empty one-line string, got {quote(value)}")
    if column.choices and value not in column.choices:
        raise ValueError(f"{where}: column {name!r} must be one of {list(column.choices)}, got {quote(value)}")
    if column.minimum is not None and value < column.minimum:
        raise ValueError(f"{where}: column {name!r} must be >= {column.minimum}, got {quote(value)}")
    if column.maximum is not None and value > column.maximum:
        raise ValueError(f"{where}: column {name!r} must be <= {column.maximum}, got {quote(value)}")


__all__ = [
    "ACCEPTANCE_TRACE",
    "COMPONENTS",
    "CONTENTION_PROFILE",
    "FIRST_RECORD_LINE",
    "FORMATS",
    "LATENCY_PROFILE",
    "LINK_PROFILE",
    "MAX_US",
    "PHASES",
    "SCHEMA_VERSION",
    "AcceptanceRecord",
    "ContentionRecord",
    "DataFile",
    "LatencyRecord",
    "LinkRecord",
    "check_record",
    "latency_profile_name",
    "read_acceptance_trace",
    "read_contention_profile",
    "read_file",
    "read_latency_profile",
    "read_link_profile",
    "remove_stale",
    "save_figure_atomic",
    "write_acceptance_trace",
    "write_contention_profile",
    "write_file",
    "write_latency_profile",
    "write_link_profile",
]
