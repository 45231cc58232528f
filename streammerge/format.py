"""Byte-exact safetensors header parsing and building.

Layout of a safetensors file: an 8-byte little-endian unsigned header length N, N bytes of UTF-8 JSON (an object
mapping tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional ``__metadata__``
str->str map), then the data region. ``data_offsets`` are relative to the data start (8 + N). We parse headers
ourselves because ``safe_open`` does not expose byte offsets, and we validate them hard: a checkpoint from a
stranger must never make us read outside its file.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field

from .dtypes import DTYPE_BITS
from .errors import HeaderError

# Dtype facts live in one table (dtypes.py); the header checks read bits per element from it.
# A header larger than this is refused. Real headers are ~100 KB for 70B models; safetensors itself caps at 100 MB.
MAX_HEADER_BYTES = 100_000_000
HEADER_ALIGNMENT = 8
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header. ``begin``/``end`` are relative to the data start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: tensors in data order, metadata, and where the data region starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 8
    data_size: int = 0


def nbytes_for(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes a tensor of ``dtype`` and ``shape`` occupies; raises ValueError when not a whole number of bytes."""
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise ValueError(f"{math.prod(shape)} elements of {dtype} do not fill a whole number of bytes")
    return bits // 8


def _fail(path: str, msg: str) -> HeaderError:
    return HeaderError(f"{path}: invalid safetensors header: {msg}")


def clip_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a hostile header must not turn into a megabyte-long message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _is_utf8(text: str) -> bool:
    # JSON escapes can spell lone surrogates ("\ud800"), which Python accepts and UTF-8 cannot encode; safetensors
    # (serde_json) refuses them, and so must we before a name reaches an output header.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_header(raw: bytes, file_size: int, path: str = "<memory>") -> Header:
    """Parse and validate the header bytes of a safetensors file.

    Args:
        raw (`bytes`): the file's first ``8 + N`` bytes (at least the 8-byte length prefix).
        file_size (`int`): the file's total size in bytes, to check every span lies inside it.
        path (`str`): named in error messages.

    Returns:
        [`Header`]: tensors ordered by data offset, the metadata, the data start and data size.

    Raises:
        [`HeaderError`]: for any violation of the format, naming ``path`` (and the tensor where there is one).
    """
    if file_size < 8 or len(raw) < 8:
        raise _fail(path, f"file is {file_size} bytes, shorter than the 8-byte length prefix (truncated download?)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES:
        raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt or not safetensors)")
    if 8 + n > file_size:
        raise _fail(path, f"header length {n} runs past the end of the {file_size}-byte file (truncated?)")
    if len(raw) < 8 + n:
        raise _fail(path, f"header is {n} bytes but only {len(raw) - 8} were given")
    try:
        text = raw[8 : 8 + n].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"header is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
    except HeaderError:
        raise
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise _fail(path, f"header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _fail(path, f"header JSON must be an object, got {type(obj).__name__}")

    metadata: dict[str, str] = {}
    if METADATA_KEY in obj:
        meta = obj.pop(METADATA_KEY)
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise _fail(path, "__metadata__ must map strings to strings")
        if not all(_is_utf8(k) and _is_utf8(v) for k, v in meta.items()):
            raise _fail(path, "__metadata__ holds a string that is not valid Unicode (a lone surrogate escape)")
        metadata = meta

    data_start = 8 + n
    data_size = file_size - data_start
    tensors: list[TensorInfo] = []
    for name, entry in obj.items():
        tensors.append(_parse_entry(path, name, entry, data_size))

    tensors.sort(key=lambda t: (t.begin, t.end))
    cursor = 0
    for t in tensors:
        if t.begin < cursor:
            prev = next(p for p in tensors if p.end > t.begin and p is not t)
            raise _fail(
                path, f"tensor {clip_repr(t.name)} bytes [{t.begin}, {t.end}) overlap tensor {clip_repr(prev.name)}"
            )
        if t.begin > cursor:
            raise _fail(
                path, f"gap of {t.begin - cursor} bytes before tensor {clip_repr(t.name)} (data must be contiguous)"
            )
        cursor = t.end
    if cursor != data_size:
        raise _fail(
            path,
            f"tensors cover {cursor} bytes but the data region is {data_size} bytes "
            f"({'trailing bytes' if cursor < data_size else 'truncated'})",
        )
    return Header(tensors={t.name: t for t in tensors}, metadata=metadata, data_start=data_start, data_size=data_size)


def _no_duplicate_keys(path: str):
    def hook(pairs):
        seen: dict = {}
        for k, v in pairs:
            if k in seen:
                raise _fail(path, f"duplicate key {clip_repr(k)} in header")
            seen[k] = v
        return seen

    return hook


def _parse_entry(path: str, name: str, entry: object, data_size: int) -> TensorInfo:
    where = f"tensor {clip_repr(name)}"
    if not _is_utf8(name):
        raise _fail(path, f"{where}: name is not valid Unicode (a lone surrogate escape)")
    if not isinstance(entry, dict):
        raise _fail(path, f"{where}: entry must be an object")
    extra = set(entry) - {"dtype", "shape", "data_offsets"}
    missing = {"dtype", "shape", "data_offsets"} - set(entry)
    if missing:
        raise _fail(path, f"{where}: missing {sorted(missing)}")
    if extra:
        raise _fail(path, f"{where}: unexpected keys {sorted(extra)}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _fail(path, f"{where}: unknown dtype {clip_repr(dtype)} (known: {', '.join(DTYPE_BITS)})")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise _fail(path, f"{where}: shape must be a list of integers, got {clip_repr(shape)}")
    if any(d < 0 for d in shape):
        raise _fail(path, f"{where}: negative dimension in shape {clip_repr(shape)}")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _fail(path, f"{where}: data_offsets must be two integers, got {clip_repr(offsets)}")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise _fail(path, f"{where}: data_offsets {offsets} are not an increasing, non-negative pair")
    if end > data_size:
        raise _fail(path, f"{where}: data_offsets end {end} lies past the end of the data region ({data_size} bytes)")
    # Multiply with an early exit: a header may hold thousands of 4000-digit dimensions, whose exact product would
    # be slow to compute and too large for a float; any product past the span is wrong anyway.
    span = end - begin
    numel = 0 if 0 in shape else 1
    for d in shape if numel else ():
        numel *= d
        if numel * DTYPE_BITS[dtype] > 8 * span:
            raise _fail(
                path, f"{where}: shape {clip_repr(shape)} of {dtype} needs more than the {span} bytes data_offsets span"
            )
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise _fail(path, f"{where}: shape {clip_repr(shape)} of {dtype} does not fill a whole number of bytes")
    if bits // 8 != span:
        raise _fail(
            path, f"{where}: shape {clip_repr(shape)} of {dtype} needs {bits // 8} bytes but data_offsets span {span}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of the safetensors file at ``path``."""
    return read_header_and_stat(path)[0]


def read_header_and_stat(path: str | os.PathLike) -> tuple[Header, os.stat_result]:
    """:func:`read_header`, with the file's ``fstat`` taken when it was opened (what the header describes)."""
    path = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait forever for a writer. It changes nothing for
        # a regular file, and anything else (FIFO, device, directory) is refused before a byte is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise HeaderError(f"{path}: not a regular file (a directory, FIFO or device); refusing to read it")
        with open(fd, "rb") as f:
            size = st.st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                return parse_header(prefix, size, path), st
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                return parse_header(prefix, size, path), st
            raw = prefix + f.read(n)
    except OSError as e:
        raise HeaderError(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_header(raw, size, path), st


def build_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Build header bytes for tensors laid out contiguously in the given order.

    Args:
        entries (`list[tuple[str, str, tuple[int, ...]]]`): (name, dtype, shape) in data order.
        metadata (`dict[str, str]`, *optional*): written as ``__metadata__``.

    Returns:
        `tuple[bytes, dict]`: the full header (8-byte length + JSON padded with spaces to a multiple of 8) and each
        tensor's (begin, end) relative to the data start.
    """
    obj: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("metadata must map str to str")
        obj[METADATA_KEY] = metadata
    spans: dict[str, tuple[int, int]] = {}
    cursor = 0
    for name, dtype, shape in entries:
        if name in obj or name == METADATA_KEY:
            raise ValueError(f"duplicate or reserved tensor name {name!r}")
        size = nbytes_for(dtype, shape)
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + size]}
        spans[name] = (cursor, cursor + size)
        cursor += size
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text, spans
