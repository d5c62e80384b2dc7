"""The one safetensors header reader: every malformed header is a FlashMoeError naming the file (and tensor)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashmoe.errors import FlashMoeError
from flashmoe.loader import default_model_dir, load_model
from flashmoe.safetensors import DTYPE_SIZES, read_header_info, read_tensors, tensor_infos


def write_raw(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def good_header() -> tuple[dict, bytes]:
    return (
        {
            "__metadata__": {"format": "mlx"},
            "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "U8", "shape": [3], "data_offsets": [16, 19]},
        },
        bytes(19),
    )


def refused(path: Path, *words: str) -> str:
    with pytest.raises(FlashMoeError) as info:
        read_header_info(path)
    message = str(info.value)
    assert str(path) in message and all(w in message for w in words), message
    return message


def test_a_good_header_is_read(tmp_path):
    header, data = good_header()
    got, start = read_header_info(write_raw(tmp_path / "m.safetensors", header, data))
    assert set(got) == {"a", "b"} and start == 8 + len(json.dumps(header).encode())


@pytest.mark.parametrize("length", [10**12, 2**63, 2**64 - 1, 100_000_001])
def test_an_absurd_header_length_is_refused_without_allocating(tmp_path, length):
    refused(write_raw(tmp_path / "m.safetensors", b"{}", length=length), "header")


def test_short_and_truncated_files(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    refused(tmp_path / "short.safetensors", "too short")
    refused(write_raw(tmp_path / "m.safetensors", b"{}", length=50), "truncated")
    header, data = good_header()
    refused(write_raw(tmp_path / "cut.safetensors", header, data[:-1]), "truncated")
    refused(write_raw(tmp_path / "long.safetensors", header, data + b"x"), "after the last tensor")


@pytest.mark.parametrize(
    "raw,words",
    [
        (b"\xff\xfe{}", ["UTF-8"]),
        (b"[1, 2]", ["not an object"]),
        (b"{", ["unreadable"]),
        (b'{"__metadata__": 3}', ["__metadata__"]),
        (b"[" * 100000 + b"]" * 100000, ["header"]),
        (
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
            ["'a'", "twice"],
        ),
    ],
)
def test_unreadable_json(tmp_path, raw, words):
    refused(write_raw(tmp_path / "m.safetensors", raw, bytes(8)), *words)


@pytest.mark.parametrize(
    "entry,words",
    [
        ([1], ["'t'", "not an object"]),
        ({"dtype": "F128", "shape": [1], "data_offsets": [0, 4]}, ["'t'", "dtype"]),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, ["'t'", "shape"]),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, ["'t'", "shape"]),
        ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, ["'t'", "shape"]),
        ({"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}, ["'t'", "shape"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, ["'t'", "data_offsets"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, ["'t'", "data_offsets"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}, ["'t'", "data_offsets"]),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, ["'t'", "takes 8 bytes"]),
        ({"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}, ["'t'", "too large"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, ["'t'", "gap"]),
    ],
)
def test_bad_entries_name_the_tensor(tmp_path, entry, words):
    refused(write_raw(tmp_path / "m.safetensors", {"t": entry}, bytes(8)), *words)


def test_overlap_is_refused(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
    }
    refused(write_raw(tmp_path / "m.safetensors", header, bytes(8)), "overlaps")


def test_fifos_and_directories_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(FlashMoeError, match="not a regular file"):
        tensor_infos(tmp_path)
    os.unlink(tmp_path / "pipe.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(FlashMoeError, match="dir.safetensors: not a regular file"):
        read_tensors(tmp_path)


def test_the_bundled_model_with_a_corrupt_header_is_refused_by_every_path(tmp_path):
    shutil.copytree(default_model_dir(), tmp_path / "m")
    shard = next((tmp_path / "m").glob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[8:9] = b"["  # the JSON object becomes an unterminated list
    shard.write_bytes(bytes(raw))
    for read in (tensor_infos, read_tensors, load_model):
        with pytest.raises(FlashMoeError, match=shard.name):
            read(tmp_path / "m")
    from flashmoe.loader import load

    with pytest.raises(FlashMoeError, match=shard.name):
        load(tmp_path / "m", stream_experts=True)


# --- property: what is accepted is in bounds and disjoint; what is refused is a FlashMoeError -----------------

_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPE_SIZES, "F128", 3]),
        "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.just("x")),
        "data_offsets": st.one_of(st.lists(st.integers(-4, 80), min_size=2, max_size=2), st.just([0])),
    }
)


@st.composite
def headers(draw):
    names = draw(st.lists(st.sampled_from("abcdef"), max_size=5, unique=True))
    header, offset = {}, 0
    for name in names:
        entry = draw(_entry)
        if draw(st.booleans()) and entry["dtype"] in DTYPE_SIZES and isinstance(entry["shape"], list):
            size = DTYPE_SIZES[entry["dtype"]]  # often a consistent entry, to reach the later checks
            for d in entry["shape"]:
                size *= max(d, 0)
            entry["shape"] = [max(d, 0) for d in entry["shape"]]
            entry["data_offsets"] = [offset, offset + size]
            offset += size
        header[name] = entry
    data = draw(st.integers(0, 100)) if draw(st.booleans()) else offset
    return header, data


def _check(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        path.write_bytes(raw)
        try:
            header, start = read_header_info(path)
        except FlashMoeError as err:
            assert str(path) in str(err)
            return
        size = os.path.getsize(path)
        spans = sorted(tuple(e["data_offsets"]) for e in header.values())
        for begin, end in spans:
            assert 0 <= begin <= end and start + end <= size
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # disjoint
        for e in header.values():
            n = DTYPE_SIZES[e["dtype"]]
            for d in e["shape"]:
                n *= d
            assert e["data_offsets"][1] - e["data_offsets"][0] == n


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers())
def test_property_structured_headers(case):
    header, data = case
    raw = json.dumps(header).encode()
    _check(struct.pack("<Q", len(raw)) + raw + bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_property_random_bytes(body, length):
    _check(struct.pack("<Q", len(body) if length is None else length) + body)
