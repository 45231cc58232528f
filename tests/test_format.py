"""The safetensors header parser and builder: round trips, interop with safetensors, and every rejection."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from streammerge.errors import HeaderError
from streammerge.format import DTYPE_BITS, MAX_HEADER_BYTES, build_header, nbytes_for, parse_header, read_header


def _write(path: Path, header_obj, data: bytes = b"", raw_header: bytes | None = None, length: int | None = None):
    body = raw_header if raw_header is not None else json.dumps(header_obj).encode()
    n = len(body) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def test_round_trip_with_safetensors(tmp_path):
    tensors = [
        ("a", "BF16", (3, 5)),
        ("b", "F32", (7,)),
        ("scalar", "F16", ()),
        ("empty", "F32", (0, 4)),
        ("ids", "I64", (2, 2)),
        ("mask", "BOOL", (3,)),
    ]
    header, spans = build_header(tensors, {"format": "pt", "k": "v"})
    assert len(header) % 8 == 0
    data = bytearray()
    values = {}
    for name, dtype, shape in tensors:
        n = nbytes_for(dtype, shape)
        assert spans[name] == (len(data), len(data) + n)
        chunk = bytes((i * 7 + len(name)) % 251 for i in range(n))
        if dtype == "BOOL":
            chunk = bytes(b & 1 for b in chunk)
        values[name] = chunk
        data += chunk
    path = tmp_path / "x.safetensors"
    path.write_bytes(header + bytes(data))

    parsed = read_header(path)
    assert parsed.metadata == {"format": "pt", "k": "v"}
    assert [(t.name, t.dtype, t.shape) for t in parsed.tensors.values()] == tensors
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
        assert set(f.keys()) == {t[0] for t in tensors}
        for name, _, shape in tensors:
            t = f.get_tensor(name)
            assert tuple(t.shape) == shape
            assert t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == values[name]


def test_parse_file_written_by_safetensors(tmp_path):
    sd = {"w": torch.randn(4, 6).to(torch.bfloat16), "b": torch.randn(6), "i": torch.arange(5, dtype=torch.int32)}
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path), metadata={"format": "pt"})
    h = read_header(path)
    raw = path.read_bytes()
    for name, t in sd.items():
        info = h.tensors[name]
        assert info.shape == tuple(t.shape)
        got = raw[h.data_start + info.begin : h.data_start + info.end]
        assert got == t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", sorted(DTYPE_BITS))
def test_every_dtype_code(tmp_path, dtype):
    shape = (4, 2)  # 8 elements: whole bytes even for 4- and 6-bit types
    header, _ = build_header([("t", dtype, shape)])
    path = tmp_path / "d.safetensors"
    path.write_bytes(header + b"\0" * nbytes_for(dtype, shape))
    assert read_header(path).tensors["t"].dtype == dtype


def _valid_entry(begin=0, end=8, dtype="F32", shape=(2,)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


CASES = {
    "truncated below 8 bytes": (lambda p: p.write_bytes(b"\x10\0\0"), "shorter than the 8-byte"),
    "length past end": (lambda p: _write(p, {}, length=1000), "past the end"),
    "absurd length": (lambda p: _write(p, {}, length=2**60), "exceeds"),
    "invalid json": (lambda p: _write(p, None, raw_header=b"{not json"), "not valid JSON"),
    "json not object": (lambda p: _write(p, [1, 2]), "must be an object"),
    "non utf8": (lambda p: _write(p, None, raw_header=b'{"\xff\xfe": 1}'), "UTF-8"),
    "metadata not str": (lambda p: _write(p, {"__metadata__": {"a": 1}}), "__metadata__"),
    "unknown dtype": (lambda p: _write(p, {"t": _valid_entry(dtype="F128")}, b"\0" * 8), "unknown dtype"),
    "negative dim": (lambda p: _write(p, {"t": _valid_entry(shape=(-2,))}, b"\0" * 8), "negative"),
    "float dim": (lambda p: _write(p, {"t": {**_valid_entry(), "shape": [2.0]}}, b"\0" * 8), "list of integers"),
    "bool dim": (lambda p: _write(p, {"t": {**_valid_entry(), "shape": [True]}}, b"\0" * 8), "list of integers"),
    "overflowing dims": (lambda p: _write(p, {"t": _valid_entry(shape=(2**40, 2**40))}, b"\0" * 8), "needs"),
    "span size wrong": (lambda p: _write(p, {"t": _valid_entry(shape=(3,))}, b"\0" * 8), "needs"),
    "offsets past end": (lambda p: _write(p, {"t": _valid_entry(0, 16, shape=(4,))}, b"\0" * 8), "past the end"),
    "overlap": (
        lambda p: _write(p, {"a": _valid_entry(0, 8), "b": _valid_entry(4, 12)}, b"\0" * 12),
        "overlap",
    ),
    "gap": (lambda p: _write(p, {"a": _valid_entry(0, 8), "b": _valid_entry(12, 20)}, b"\0" * 20), "gap"),
    "trailing bytes": (lambda p: _write(p, {"a": _valid_entry(0, 8)}, b"\0" * 12), "trailing"),
    "duplicate names": (
        lambda p: _write(
            p,
            None,
            raw_header=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
            b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
        ),
        "duplicate",
    ),
    "offsets reversed": (lambda p: _write(p, {"t": _valid_entry(8, 0)}, b"\0" * 8), "increasing"),
    "entry not object": (lambda p: _write(p, {"t": 5}, b""), "must be an object"),
    "missing keys": (lambda p: _write(p, {"t": {"dtype": "F32"}}, b""), "missing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejections_name_the_file(tmp_path, case):
    make, expected = CASES[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(HeaderError) as ei:
        read_header(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert expected in msg


def test_header_size_bound_is_sane():
    assert 10_000_000 <= MAX_HEADER_BYTES <= 100_000_000


names = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12).filter(
    lambda s: s != "__metadata__"
)
entry = st.tuples(
    names,
    st.sampled_from(["BF16", "F16", "F32", "I64", "U8", "BOOL", "F8_E4M3"]),
    st.lists(st.integers(0, 5), max_size=3).map(tuple),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(entry, max_size=6, unique_by=lambda e: e[0]), st.dictionaries(names, st.text(max_size=8), max_size=3))
def test_property_build_parse_round_trip(entries, metadata):
    header, spans = build_header(entries, metadata)
    data_size = sum(nbytes_for(d, s) for _, d, s in entries)
    h = parse_header(header, len(header) + data_size)
    assert h.metadata == metadata
    assert h.data_start == len(header)
    assert {n: (t.dtype, t.shape, t.begin, t.end) for n, t in h.tensors.items()} == {
        n: (d, s, *spans[n]) for n, d, s in entries
    }


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_property_mutated_headers_fail_cleanly(data):
    header, _ = build_header([("a", "F32", (3,)), ("b", "BF16", (2, 2))], {"format": "pt"})
    blob = bytearray(header + b"\x01" * 20)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    blob = blob[:cut] if data.draw(st.booleans()) else blob
    try:
        h = parse_header(bytes(blob), len(blob), "fuzz.safetensors")
    except HeaderError as e:
        assert "fuzz.safetensors" in str(e)
    else:
        assert sum(t.nbytes for t in h.tensors.values()) == h.data_size
