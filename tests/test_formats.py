"""Calibration file formats: write -> read round trips (hypothesis) and bad files rejected with file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.formats import (
    COMPONENTS,
    PHASES,
    AcceptanceRecord,
    LatencyRecord,
    LinkRecord,
    read_acceptance_trace,
    read_latency_profile,
    read_link_profile,
    write_acceptance_trace,
    write_latency_profile,
    write_link_profile,
)

times = st.floats(0.0, 1e9, allow_nan=False, allow_infinity=False)
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), min_size=1, max_size=12)
metadata_values = st.one_of(st.integers(-(10**6), 10**6), text, st.booleans(), st.lists(st.integers(0, 99), max_size=4))


@st.composite
def latency_records(draw: st.DrawFn) -> list[LatencyRecord]:
    keys = draw(
        st.lists(
            st.tuples(
                st.sampled_from(COMPONENTS),
                st.sampled_from(PHASES),
                st.integers(1, 16),
                st.integers(0, 8192),
                st.integers(1, 8),
                st.booleans(),
            ),
            unique=True,
            min_size=1,
            max_size=20,
        )
    )
    records = []
    for key in keys:
        p10, median, p90 = sorted(draw(st.lists(times, min_size=3, max_size=3)))
        records.append(LatencyRecord(*key, median_us=median, p10_us=p10, p90_us=p90))
    return records


@st.composite
def acceptance_records(draw: st.DrawFn) -> list[AcceptanceRecord]:
    key = st.tuples(text, st.integers(0, 4096), st.integers(1, 80))
    keys = draw(st.lists(key, unique=True, min_size=1, max_size=20))
    return [
        AcceptanceRecord(prompt, pos, draw(st.integers(0, 10**6)), layer, draw(st.booleans()), draw(st.floats(0, 1)))
        for prompt, pos, layer in keys
    ]


@st.composite
def link_records(draw: st.DrawFn) -> list[LinkRecord]:
    sizes = draw(st.lists(st.integers(0, 10**10), unique=True, min_size=1, max_size=20))
    with_mean = draw(st.booleans())  # an optional column: in every record or in none
    records = []
    for nbytes in sizes:
        p10, median, p90 = sorted(draw(st.lists(times, min_size=3, max_size=3)))
        mean = draw(times) if with_mean else None
        records.append(LinkRecord(nbytes, median_us=median, p10_us=p10, p90_us=p90, mean_us=mean))
    return records


def metadata(required: tuple[str, ...]) -> st.SearchStrategy[dict]:
    return st.dictionaries(text, metadata_values, max_size=4).flatmap(
        lambda extra: st.fixed_dictionaries({key: text for key in required}).map(lambda req: {**extra, **req})
    )


@given(records=latency_records(), meta=metadata(("device", "dtype", "model")))
def test_latency_profile_round_trip(tmp_path_factory: pytest.TempPathFactory, records: list, meta: dict) -> None:
    path = tmp_path_factory.mktemp("f") / "profile.csv"
    write_latency_profile(path, meta, records)
    loaded = read_latency_profile(path)
    assert loaded.kind == "latency_profile" and loaded.metadata == meta and list(loaded.records) == records


@given(records=acceptance_records(), meta=metadata(("model", "head")))
def test_acceptance_trace_round_trip(tmp_path_factory: pytest.TempPathFactory, records: list, meta: dict) -> None:
    path = tmp_path_factory.mktemp("f") / "trace.csv"
    write_acceptance_trace(path, meta, records)
    loaded = read_acceptance_trace(path)
    assert loaded.metadata == meta and list(loaded.records) == records


@given(records=link_records(), meta=metadata(("backend",)))
def test_link_profile_round_trip(tmp_path_factory: pytest.TempPathFactory, records: list, meta: dict) -> None:
    path = tmp_path_factory.mktemp("f") / "link.csv"
    write_link_profile(path, meta, records)
    assert list(read_link_profile(path).records) == records


def test_writer_is_atomic_and_leaves_no_temp_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "link.csv"
    write_link_profile(path, {"backend": "gloo"}, [LinkRecord(8, 1.0, 0.5, 2.0)])
    before = path.read_text()
    with pytest.raises(ValueError, match="median_us' must be >= 0"):
        write_link_profile(path, {"backend": "gloo"}, [LinkRecord(8, -1.0, -2.0, 2.0)])
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["link.csv"]


def test_an_optional_column_is_in_every_record_or_in_none(tmp_path: Path) -> None:
    path = tmp_path / "link.csv"
    write_link_profile(path, {"backend": "gloo"}, [LinkRecord(8, 1.0, 0.5, 2.0), LinkRecord(16, 1.0, 0.5, 2.0)])
    assert path.read_text().splitlines()[1] == "nbytes,median_us,p10_us,p90_us"  # older readers' columns
    assert [r.mean_us for r in read_link_profile(path).records] == [None, None]
    with pytest.raises(ValueError, match="link.csv: column 'mean_us': give it in every record or in none, got 1 of 2"):
        write_link_profile(path, {"backend": "gloo"}, [LinkRecord(8, 1.0, 0.5, 2.0, 3.0), LinkRecord(16, 1, 0.5, 2)])


def test_a_link_size_costs_its_mean_where_the_file_has_one(tmp_path: Path) -> None:
    from sim.latency import ProfiledLink

    rows = [LinkRecord(8, 100.0, 50.0, 900.0, 400.0), LinkRecord(8192, 200.0, 50.0, 900.0, 600.0)]
    with_mean = ProfiledLink(read_link_profile(write_link_profile(tmp_path / "m.csv", {"backend": "gloo"}, rows)))
    assert with_mean.time_us(8) == 400.0 and with_mean.time_us(4100) == pytest.approx(500.0)
    rows = [LinkRecord(r.nbytes, r.median_us, r.p10_us, r.p90_us) for r in rows]
    medians = ProfiledLink(read_link_profile(write_link_profile(tmp_path / "n.csv", {"backend": "gloo"}, rows)))
    assert medians.time_us(8) == 100.0 and medians.time_us(4100) == pytest.approx(150.0)


GOOD_HEADER = '# {"format": "eesd.link_profile", "schema_version": 1, "metadata": {"backend": "gloo"}}'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("nbytes,median_us,p10_us,p90_us\n", ':1: expected a \'# {"format": "eesd.link_profile"'),
        ("# {nope\n", ":1: header is not valid JSON"),
        ('# {"format": "eesd.acceptance_trace", "schema_version": 1, "metadata": {}}\n', "expected format"),
        (GOOD_HEADER.replace('"schema_version": 1', '"schema_version": 2') + "\n", "unknown schema_version 2"),
        (GOOD_HEADER.replace('"backend": "gloo"', "") + "\n", "metadata is missing ['backend']"),
        (GOOD_HEADER + "\nnbytes,median_us,p10_us\n", ":2: columns ['nbytes', 'median_us', 'p10_us'] do not match"),
        (GOOD_HEADER + "\nnbytes,median_us,p10_us,p90_us,extra\n", "unknown ['extra']"),
        (
            GOOD_HEADER + "\nnbytes,median_us\n",
            "expected ['nbytes', 'median_us', 'p10_us', 'p90_us'] and optionally ['mean_us']",
        ),
        (GOOD_HEADER + "\nnbytes,median_us,p10_us,p90_us,mean_us\n8,1,1,1,-5\n", ":3: column 'mean_us' must be >= 0"),
        (
            GOOD_HEADER + "\nnbytes,median_us,p10_us,p90_us,mean_us\n8,1,1,1,\n",
            ":3: column 'mean_us': expected a float in every row (an optional column: give it a value in every row",
        ),
        (
            GOOD_HEADER + "\nnbytes,median_us,p10_us,p90_us\n8,1.0,0.5,2.0\n16,-1.0,-2.0,1.0\n",
            ":4: column 'median_us' must be >= 0",
        ),
        (
            GOOD_HEADER + "\nnbytes,median_us,p10_us,p90_us\n8,fast,0.5,2.0\n",
            ":3: column 'median_us': expected a float",
        ),
        (GOOD_HEADER + "\nnbytes,median_us,p10_us,p90_us\n8,1.0,0.5\n", ":3: expected 4 cells, got 3"),
        (GOOD_HEADER + "\nnbytes,median_us,p10_us,p90_us\n8,1.0,1.5,2.0\n", ":3: need p10_us <= median_us <= p90_us"),
        (
            GOOD_HEADER + "\nnbytes,median_us,p10_us,p90_us\n8,1,1,1\n8,1,1,1\n",
            ":4: duplicate record for {'nbytes': 8}",
        ),
        (
            GOOD_HEADER + "\nnbytes,median_us,p10_us,p90_us\n8,nan,1,1\n",
            ":3: column 'median_us' must be a finite number",
        ),
        (  # finite, but a run summing such times overflows to inf and prints nan
            GOOD_HEADER + "\nnbytes,median_us,p10_us,p90_us\n8,1e308,1,1e308\n",
            ":3: column 'median_us' must be <= 1000000000000.0, got 1e+308",
        ),
    ],
)
def test_bad_link_files_are_rejected(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        read_link_profile(path)
    assert str(path) in str(info.value) and message in str(info.value)


def trace_file(tmp_path: Path, row: str) -> Path:
    header = {"format": "eesd.acceptance_trace", "schema_version": 1, "metadata": {"model": "m", "head": "shared"}}
    path = tmp_path / "trace.csv"
    path.write_text("# " + json.dumps(header) + "\nprompt_id,position,token,exit_layer,match,confidence\n" + row)
    return path


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("p0,0,5,8,1,1.5\n", ":3: column 'confidence' must be <= 1.0, got 1.5"),
        ("p0,0,5,8,1,-0.1\n", ":3: column 'confidence' must be >= 0.0"),
        ("p0,-1,5,8,1,0.5\n", ":3: column 'position' must be >= 0"),
        ("p0,0,5,8,yes,0.5\n", ":3: column 'match': expected 0 or 1, got 'yes'"),
        ("p0,0,5,0,1,0.5\n", ":3: column 'exit_layer' must be >= 1"),
    ],
)
def test_bad_acceptance_rows_are_rejected(tmp_path: Path, row: str, message: str) -> None:
    with pytest.raises(ValueError, match="trace.csv") as info:
        read_acceptance_trace(trace_file(tmp_path, row))
    assert message in str(info.value)


def test_bad_latency_component_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    with pytest.raises(ValueError, match="column 'component' must be one of"):
        write_latency_profile(
            path,
            {"device": "H100", "dtype": "bf16", "model": "m"},
            [LatencyRecord("attention", "draft", 1, 0, 1, True, 1.0, 1.0, 1.0)],
        )


@pytest.mark.parametrize("name", ["smollm2-135m-e15.safetensors", "gemma3-270m_v16k.safetensors"])
def test_head_metadata_is_read_without_torch_as_safetensors_reads_it(name: str, tmp_path: Path) -> None:
    from safetensors import safe_open

    from sim.formats import read_head_metadata

    path = Path(__file__).resolve().parents[1] / "heads" / name
    with safe_open(str(path), framework="np") as handle:
        assert read_head_metadata(path) == handle.metadata()
    (tmp_path / "short.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="short.safetensors: not a safetensors file"):
        read_head_metadata(tmp_path / "short.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_head_metadata(tmp_path / "missing.safetensors")


# ---- whole files only: encodings, cuts, empty files, bounded messages ------------------------------------------------
LINK_ROWS = "nbytes,median_us,p10_us,p90_us\n8,1.0,0.5,2.0\n16,2.0,1.5,2.5\n"


def link_bytes(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "link.csv"
    path.write_bytes(data)
    return path


def refused_file(path: Path, *fragments: str) -> str:
    with pytest.raises(ValueError) as info:
        read_link_profile(path)
    message = str(info.value)
    assert str(path) in message and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ((GOOD_HEADER + "\n" + LINK_ROWS).encode("utf-16"), ": UTF-16 text (it starts with a UTF-16 byte-order mark)"),
        ((GOOD_HEADER + "\n" + LINK_ROWS).encode("utf-16-le"), ":1: NUL bytes in the first line"),
        ((GOOD_HEADER + "\n" + LINK_ROWS).encode("utf-32"), ": UTF-32 text"),
        ((GOOD_HEADER + "\n" + LINK_ROWS).encode() + b"\xff\xfe\x00\n", ":5: not UTF-8 text (byte 0xff at offset"),
        (bytes(range(256)) * 4, ":2: not UTF-8 text (byte 0x80 at offset 128)"),
        ((GOOD_HEADER + "\n" + LINK_ROWS).encode("latin-1").replace(b"gloo", b"gl\xf6\xf6"), ":1: not UTF-8 text"),
    ],
)
def test_a_file_in_another_encoding_or_binary_is_one_message_with_its_line(
    tmp_path: Path, data: bytes, fragment: str
) -> None:
    refused_file(link_bytes(tmp_path, data), fragment)


def test_a_utf8_byte_order_mark_is_fine(tmp_path: Path) -> None:
    path = link_bytes(tmp_path, b"\xef\xbb\xbf" + (GOOD_HEADER + "\n" + LINK_ROWS).encode())
    assert len(read_link_profile(path).records) == 2


@pytest.mark.parametrize("cut", [1, 3, 5, 9])
def test_a_file_cut_inside_its_last_line_names_that_line(tmp_path: Path, cut: int) -> None:
    """`16,2.0,1.5,2.5` cut to `16,2.0,1.5,2.` still parses: the missing line end is what tells a cut file."""
    whole = (GOOD_HEADER + "\n" + LINK_ROWS).encode()
    refused_file(link_bytes(tmp_path, whole[:-cut]), ":4: the last line has no line end: the file was cut short")


def test_a_written_file_counts_its_rows_so_a_cut_at_a_line_end_is_refused(tmp_path: Path) -> None:
    path = write_link_profile(
        tmp_path / "link.csv", {"backend": "gloo"}, [LinkRecord(n, 1.0, 0.5, 2.0) for n in (8, 16, 32)]
    )
    assert json.loads(path.read_text().splitlines()[0][1:])["rows"] == 3
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    refused_file(path, "the header counts 3 rows, the file has 2: it was cut short or edited by hand")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", ':1: expected a \'# {"format": "eesd.link_profile"'),
        (GOOD_HEADER + "\n", ":2: columns [] do not match"),
        (GOOD_HEADER + "\nnbytes,median_us,p10_us,p90_us\n", ": no records after the header"),
        (GOOD_HEADER.replace('"backend": "gloo"', '"backend": {"a": 1}') + "\n", "metadata.backend: expected a name"),
        ("# " + "[" * 100_000 + "\n", ":1: header is not valid JSON"),
        ('# {"format": "' + "x" * 100_000 + '"}\n', ":1: expected format 'eesd.link_profile', found 'xxxx"),
        (GOOD_HEADER.replace("}}", '}, "rows": "3"}') + "\n" + LINK_ROWS, ":1: header field 'rows' must be an integer"),
        (
            GOOD_HEADER.replace("}}", '}, "rows": true}') + "\n" + LINK_ROWS,
            ":1: header field 'rows' must be an integer, got true",
        ),
        (GOOD_HEADER + "\n" + LINK_ROWS + "9" * 100 + ",1,1,1\n", ":5: column 'nbytes' must be an int of at most"),
        (GOOD_HEADER + "\n" + LINK_ROWS + "7," + "1" * 200_000 + ",1,1\n", ":5: not a CSV line (field larger than"),
        (GOOD_HEADER + "\n" + LINK_ROWS + "7," + "x" * 5_000 + ",1,1\n", ":5: column 'median_us': expected a float"),
    ],
)
def test_empty_cut_or_outsized_files_are_one_bounded_message(tmp_path: Path, content: str, fragment: str) -> None:
    refused_file(link_bytes(tmp_path, content.encode()), fragment)


def test_writers_refuse_what_readers_refuse(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no records; a link_profile holds at least one"):
        write_link_profile(tmp_path / "l.csv", {"backend": "gloo"}, [])
    with pytest.raises(ValueError, match="metadata.backend: expected a name"):
        write_link_profile(tmp_path / "l.csv", {"backend": ""}, [LinkRecord(8, 1.0, 0.5, 2.0)])
    assert not list(tmp_path.iterdir())


def test_a_trace_row_at_a_layer_the_trace_did_not_record_is_named_as_such(tmp_path: Path) -> None:
    """A row moved to exit layer 7 (metadata.exit_layers 4, 8, 15, 22) is named for its layer, not for the gap it
    leaves in layer 4's positions."""
    import dataclasses

    from sim.acceptance import TraceAcceptance
    from sim.formats import read_acceptance_trace, write_acceptance_trace

    shipped = read_acceptance_trace(Path(__file__).resolve().parents[1] / "calibration" / "cpu" /
                                    "acceptance_smollm2-135m_shared_builtin.csv")  # fmt: skip
    records = [dataclasses.replace(shipped.records[0], exit_layer=7), *shipped.records[1:]]
    path = write_acceptance_trace(tmp_path / "t.csv", shipped.metadata, records)
    with pytest.raises(ValueError, match=r"t.csv:3: column 'exit_layer': 7 is not among the layers the trace recorded"):
        TraceAcceptance(read_acceptance_trace(path), 4)
