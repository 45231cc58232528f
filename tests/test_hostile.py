"""Hostile inputs: a corrupted checkpoint fails with one "error: " line naming the file (and the tensor), writes
nothing, leaves every input byte as it was, and never hangs or shows a traceback.

Each case corrupts one input of a valid trio (the others stay valid) and runs the real CLI. A few cases also run
``python -m streammerge`` in a subprocess, with a timeout, to prove stderr holds no traceback and a FIFO never
blocks. A hypothesis fuzz test mutates bytes of valid files (single file and sharded with index) and accepts only
success or a clean ``HeaderError``/``CheckpointError``; when a mutated trio still plans, some are merged too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers import make_related, raw_bits, streammerge_cmd, tree_digest, write_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reference import expected_bits
from safetensors import safe_open
from typer.testing import CliRunner

import streammerge
from streammerge.checkpoint import Checkpoint
from streammerge.cli import app
from streammerge.errors import CheckpointError, HeaderError, StreamMergeError

runner = CliRunner()
LABELS = ("target", "sft", "grpo")
# small_trio: target is one model.safetensors, sft has 3 shards + index, grpo 2 shards + index.
SFT_SHARD = "model-0000{}-of-00003.safetensors"
GRPO_SHARD1 = "model-00001-of-00002.safetensors"
HANG_SECONDS = 20


# ---------------------------------------------------------------------------------------------------- helpers
@dataclass
class Bad:
    """What the error for a corrupted input must say."""

    path: Path  # the file or directory the message must name
    needles: tuple[str, ...]  # lower-case phrases the message must contain (what is wrong)
    tensor: str | None = None  # the tensor the message must name, where there is one
    outside: list[Path] = field(default_factory=list)  # files outside the inputs that must stay unchanged too


def _split(f: Path) -> tuple[dict, bytes]:
    """A safetensors file's header object (in file order) and its data region."""
    blob = f.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _pack(text: bytes, data: bytes = b"", pad: bool = True) -> bytes:
    if pad:
        text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _edit(f: Path, fn: Callable[[dict, bytes], bytes | None]) -> None:
    """Rewrite ``f`` after ``fn`` edits its header object in place (and optionally returns a new data region)."""
    obj, data = _split(f)
    new = fn(obj, data)
    f.write_bytes(_pack(json.dumps(obj).encode(), data if new is None else new))


def _by_offset(obj: dict) -> list[str]:
    return sorted((k for k in obj if k != "__metadata__"), key=lambda k: obj[k]["data_offsets"])


def _first(obj: dict) -> str:
    """The first tensor entry in JSON order: the one whose error the parser reports first."""
    return next(k for k in obj if k != "__metadata__")


def _tfile(c: dict[str, Path]) -> Path:
    return c["target"] / "model.safetensors"


def _index(c: dict[str, Path]) -> Path:
    return c["sft"] / "model.safetensors.index.json"


def _shard(c: dict[str, Path], i: int = 1) -> Path:
    return c["sft"] / SFT_SHARD.format(i)


def _edit_index(c: dict[str, Path], fn: Callable[[dict], None]) -> None:
    idx = json.loads(_index(c).read_text())
    fn(idx["weight_map"])
    _index(c).write_text(json.dumps(idx))


def _shard_tensors(c: dict[str, Path], i: int = 1) -> list[str]:
    wm = json.loads(_index(c).read_text())["weight_map"]
    return [k for k, v in wm.items() if v == SFT_SHARD.format(i)]


def _entry_digest(p: Path) -> tuple:
    st_ = os.lstat(p)
    if stat.S_ISLNK(st_.st_mode):
        target = os.readlink(p)
        real = Path(os.path.realpath(p))
        content = hashlib.sha256(real.read_bytes()).hexdigest() if real.is_file() else None
        return ("link", target, content)
    if stat.S_ISREG(st_.st_mode):
        return ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return ("special", stat.S_IFMT(st_.st_mode))


def _digest(paths: list[Path]) -> dict:
    """Every byte (and every link and special file) under ``paths``; never opens a FIFO."""
    out: dict = {}
    for root in paths:
        if not root.is_dir():
            out[str(root)] = _entry_digest(root)
            continue
        regular_only = True
        for dirpath, dirnames, files in os.walk(root):
            for name in dirnames + files:
                p = Path(dirpath) / name
                if p.is_symlink() or not (p.is_dir() or p.is_file()):
                    regular_only = False
                out[str(p)] = _entry_digest(p) if not (p.is_dir() and not p.is_symlink()) else ("dir",)
        if regular_only:  # the shared fixture's digest too, where it cannot block on a FIFO
            out[f"tree_digest:{root}"] = tree_digest(root)
    return out


class _Hung(BaseException):
    """Raised by the alarm when a call blocks (a FIFO opened for reading); not caught by the CLI's handlers."""


@contextlib.contextmanager
def _no_hang(seconds: int = HANG_SECONDS):
    def on_alarm(signum, frame):
        raise _Hung(f"blocked for {seconds} s (opened a FIFO?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------------- the cases
CASES: dict[str, Callable[[dict[str, Path], Path], Bad]] = {}


def case(fn):
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


# --- one safetensors file (the target's model.safetensors)
@case
def case_truncated_in_data(c, tmp):
    f = _tfile(c)
    obj, _ = _split(f)
    f.write_bytes(f.read_bytes()[:-10])
    return Bad(f, ("past the end of the data region",), tensor=_by_offset(obj)[-1])


@case
def case_truncated_in_header(c, tmp):
    f = _tfile(c)
    blob = f.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    f.write_bytes(blob[: 8 + n // 2])
    return Bad(f, ("header length", "past the end", "truncated"))


@case
def case_header_length_past_eof(c, tmp):
    f = _tfile(c)
    blob = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(blob)) + blob[8:])
    return Bad(f, ("past the end",))


@case
def case_header_length_2_to_60(c, tmp):
    f = _tfile(c)
    f.write_bytes(struct.pack("<Q", 2**60) + f.read_bytes()[8:])
    return Bad(f, ("header length", "exceeds"))


@case
def case_zero_byte_file(c, tmp):
    _tfile(c).write_bytes(b"")
    return Bad(_tfile(c), ("0 bytes", "8-byte"))


@case
def case_invalid_json(c, tmp):
    f = _tfile(c)
    blob = f.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    text = b'{"model.norm.weight": {"dtype": BF16'
    f.write_bytes(blob[:8] + text + b" " * (n - len(text)) + blob[8 + n :])
    return Bad(f, ("not valid json",))


@case
def case_json_not_an_object(c, tmp):
    f = _tfile(c)
    f.write_bytes(_pack(b"[1, 2, 3]", _split(f)[1]))
    return Bad(f, ("must be an object", "list"))


@case
def case_json_string_not_an_object(c, tmp):
    f = _tfile(c)
    f.write_bytes(_pack(b'"model.safetensors"', _split(f)[1]))
    return Bad(f, ("must be an object", "str"))


@case
def case_non_utf8_header(c, tmp):
    f = _tfile(c)
    blob = bytearray(f.read_bytes())
    i = blob.index(b"model.norm.weight")
    blob[i + 6] = 0xFF  # inside a tensor name; length unchanged
    f.write_bytes(bytes(blob))
    return Bad(f, ("not valid utf-8",))


@case
def case_nested_100000_deep(c, tmp):
    f = _tfile(c)
    f.write_bytes(_pack(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", _split(f)[1]))
    return Bad(f, ("not valid json", "recursion"))


@case
def case_metadata_not_str_to_str(c, tmp):
    def fn(obj, data):
        obj["__metadata__"] = {"format": 1}

    _edit(_tfile(c), fn)
    return Bad(_tfile(c), ("__metadata__", "strings"))


@case
def case_metadata_a_list(c, tmp):
    def fn(obj, data):
        obj["__metadata__"] = ["pt"]

    _edit(_tfile(c), fn)
    return Bad(_tfile(c), ("__metadata__", "strings"))


def _entry_case(mutate: Callable[[dict], None], needles: tuple[str, ...]):
    """A case that edits the first tensor entry of the target's header."""

    def run(c, tmp):
        name = ""

        def fn(obj, data):
            nonlocal name
            name = _first(obj)
            mutate(obj[name])

        _edit(_tfile(c), fn)
        return Bad(_tfile(c), needles, tensor=name)

    return run


CASES["unknown_dtype"] = _entry_case(lambda e: e.update(dtype="F33"), ("unknown dtype", "'f33'"))
CASES["dtype_not_a_string"] = _entry_case(lambda e: e.update(dtype=16), ("unknown dtype",))
CASES["negative_dim"] = _entry_case(lambda e: e.update(shape=[-1, *e["shape"][1:]]), ("negative dimension",))
CASES["float_dim"] = _entry_case(lambda e: e.update(shape=[float(d) for d in e["shape"]]), ("list of integers",))
CASES["string_dim"] = _entry_case(lambda e: e.update(shape=[str(d) for d in e["shape"]]), ("list of integers",))
CASES["bool_dim"] = _entry_case(lambda e: e.update(shape=[True] * len(e["shape"])), ("list of integers",))
CASES["shape_not_a_list"] = _entry_case(lambda e: e.update(shape=64), ("list of integers",))
CASES["overflowing_dims_2_62"] = _entry_case(lambda e: e.update(shape=[2**62, 2**62]), ("needs more than",))
# 10**200 squared overflows a float: the message used to be computed as bits / 8 (OverflowError, a traceback).
CASES["dims_past_float_range"] = _entry_case(lambda e: e.update(shape=[10**200, 10**200]), ("needs more than",))
# 300 dims of 4000 digits each: the exact product is enormous; validation must stop early, and the message stay short.
CASES["many_huge_dims"] = _entry_case(lambda e: e.update(shape=[10**3999] * 300), ("needs more than",))
CASES["span_not_numel_times_itemsize"] = _entry_case(
    lambda e: e.update(shape=[e["shape"][0] - 1, *e["shape"][1:]]), ("needs", "bytes but data_offsets span")
)
CASES["not_whole_bytes"] = _entry_case(lambda e: e.update(dtype="F4", shape=[3]), ("whole number of bytes",))
CASES["offsets_not_two_ints"] = _entry_case(lambda e: e.update(data_offsets=[0]), ("two integers",))
CASES["offsets_decreasing"] = _entry_case(
    lambda e: e.update(data_offsets=e["data_offsets"][::-1]), ("increasing, non-negative",)
)
CASES["entry_missing_keys"] = _entry_case(lambda e: (e.clear(), e.update(x=1)), ("missing",))
CASES["entry_unexpected_key"] = _entry_case(lambda e: e.update(strides=[1]), ("unexpected keys",))


@case
def case_entry_a_list(c, tmp):
    name = ""

    def fn(obj, data):
        nonlocal name
        name = _first(obj)
        obj[name] = [1, 2]

    _edit(_tfile(c), fn)
    return Bad(_tfile(c), ("entry must be an object",), tensor=name)


@case
def case_offsets_past_eof(c, tmp):
    name = ""

    def fn(obj, data):
        nonlocal name
        name = _first(obj)
        b, e = obj[name]["data_offsets"]
        obj[name]["data_offsets"] = [len(data), len(data) + e - b]

    _edit(_tfile(c), fn)
    return Bad(_tfile(c), ("past the end of the data region",), tensor=name)


@case
def case_overlapping_spans(c, tmp):
    name = ""

    def fn(obj, data):
        nonlocal name
        name = _by_offset(obj)[1]
        b, e = obj[name]["data_offsets"]
        obj[name]["data_offsets"] = [b - 2, e - 2]

    _edit(_tfile(c), fn)
    return Bad(_tfile(c), ("overlap",), tensor=name)


@case
def case_gap_between_tensors(c, tmp):
    name = ""

    def fn(obj, data):
        nonlocal name
        name = _by_offset(obj)[-1]
        b, e = obj[name]["data_offsets"]
        obj[name]["data_offsets"] = [b + 4, e + 4]
        return data[:b] + b"\0" * 4 + data[b:]

    _edit(_tfile(c), fn)
    return Bad(_tfile(c), ("gap of 4 bytes", "contiguous"), tensor=name)


@case
def case_trailing_bytes(c, tmp):
    f = _tfile(c)
    f.write_bytes(f.read_bytes() + b"\0" * 6)
    return Bad(f, ("trailing bytes",))


@case
def case_duplicate_tensor_names(c, tmp):
    f = _tfile(c)
    obj, data = _split(f)
    name = _first(obj)
    text = json.dumps(obj)[:-1] + f", {json.dumps(name)}: {json.dumps(obj[name])}}}"
    f.write_bytes(_pack(text.encode(), data))
    return Bad(f, ("duplicate key",), tensor=name)


@case
def case_lone_surrogate_tensor_name(c, tmp):
    # Valid JSON ("\ud800" escape) that UTF-8 cannot encode: it used to pass parsing and crash building the output
    # header (UnicodeEncodeError, an internal error).
    def fn(obj, data):
        obj["\ud800bad"] = obj.pop(_first(obj))

    _edit(_tfile(c), fn)
    return Bad(_tfile(c), ("not valid unicode", "surrogate"))


@case
def case_target_is_a_fifo(c, tmp):
    _tfile(c).unlink()
    os.mkfifo(_tfile(c))
    return Bad(_tfile(c), ("not a regular file",))


@case
def case_target_is_a_directory(c, tmp):
    _tfile(c).unlink()
    _tfile(c).mkdir()
    (_tfile(c) / "x").write_bytes(b"1")
    return Bad(_tfile(c), ("weights file is a directory",))


@case
def case_empty_directory(c, tmp):
    shutil.rmtree(c["target"])
    c["target"].mkdir()
    return Bad(c["target"], ("directory is empty",))


@case
def case_only_pickle_weights(c, tmp):
    shutil.rmtree(c["target"])
    c["target"].mkdir()
    (c["target"] / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle; must never be loaded
    (c["target"] / "config.json").write_text("{}")
    return Bad(c["target"] / "pytorch_model.bin", ("pickle", "never loaded", "convert", "safetensors"))


@case
def case_pickle_file_given(c, tmp):
    f = c["target"] / "pytorch_model.bin"
    f.write_bytes(b"\x80\x02}q\x00.")
    c["target"] = f
    return Bad(f, ("pickle", "never loaded", "convert"))


# --- the sft checkpoint's index and shards
@case
def case_index_names_missing_shard(c, tmp):
    _shard(c, 2).unlink()
    return Bad(_shard(c, 2), ("does not exist", str(_index(c)).lower()))


@case
def case_index_path_with_dotdot(c, tmp):
    _edit_index(c, lambda wm: wm.update({k: f"../grpo/{GRPO_SHARD1}" for k in list(wm)[:1]}))
    return Bad(_index(c), ("relative", "inside the checkpoint directory"))


@case
def case_index_absolute_path(c, tmp):
    _edit_index(c, lambda wm: wm.update({k: str(c["grpo"] / GRPO_SHARD1) for k in list(wm)[:1]}))
    return Bad(_index(c), ("relative", "inside the checkpoint directory"))


@case
def case_shard_symlink_to_valid_file_outside(c, tmp):
    outside = tmp / "outside"
    outside.mkdir()
    stolen = outside / "stolen.safetensors"
    shutil.copy(_shard(c, 1), stolen)  # a valid safetensors file with exactly the expected tensors
    _shard(c, 1).unlink()
    _shard(c, 1).symlink_to(stolen)
    return Bad(_shard(c, 1), ("outside the checkpoint directory", "refusing"), outside=[outside])


@case
def case_shard_symlink_to_etc_passwd(c, tmp):
    _shard(c, 1).unlink()
    _shard(c, 1).symlink_to("/etc/passwd")
    return Bad(_shard(c, 1), ("outside the checkpoint directory", "refusing"), outside=[Path("/etc/passwd")])


@case
def case_symlinked_directory_component(c, tmp):
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    shutil.move(str(_shard(c, 1)), elsewhere / SFT_SHARD.format(1))
    (c["sft"] / "sub").symlink_to(elsewhere, target_is_directory=True)
    _edit_index(c, lambda wm: wm.update({k: f"sub/{v}" for k, v in wm.items() if v == SFT_SHARD.format(1)}))
    return Bad(c["sft"] / "sub" / SFT_SHARD.format(1), ("outside the checkpoint directory",), outside=[elsewhere])


@case
def case_shard_dangling_symlink(c, tmp):
    _shard(c, 1).unlink()
    _shard(c, 1).symlink_to(c["sft"] / "nowhere.safetensors")
    return Bad(_shard(c, 1), ("dangling symlink",))


@case
def case_index_tensor_in_wrong_shard(c, tmp):
    name = _shard_tensors(c, 1)[0]
    _edit_index(c, lambda wm: wm.update({name: SFT_SHARD.format(2)}))
    return Bad(_index(c), ("disagrees", "index says"), tensor=name)


@case
def case_tensor_in_shard_not_in_index(c, tmp):
    name = _shard_tensors(c, 2)[0]
    _edit_index(c, lambda wm: wm.pop(name))
    return Bad(_index(c), ("disagrees", "not in the index"), tensor=name)


@case
def case_index_tensor_in_no_shard(c, tmp):
    _edit_index(c, lambda wm: wm.update({"ghost.weight": SFT_SHARD.format(1)}))
    return Bad(_index(c), ("disagrees", "in no shard"), tensor="ghost.weight")


@case
def case_index_not_json(c, tmp):
    _index(c).write_text("{weight_map: nope")
    return Bad(_index(c), ("not valid json",))


@case
def case_index_not_utf8(c, tmp):
    _index(c).write_bytes(b"\xff\xfe" + _index(c).read_bytes())
    return Bad(_index(c), ("not valid json", "utf-8"))


@case
def case_index_not_an_object(c, tmp):
    _index(c).write_text("[1, 2, 3]")
    return Bad(_index(c), ("weight_map",))


@case
def case_index_weight_map_a_list(c, tmp):
    _index(c).write_text(json.dumps({"weight_map": [SFT_SHARD.format(1)]}))
    return Bad(_index(c), ("weight_map",))


@case
def case_index_weight_map_values_not_str(c, tmp):
    _edit_index(c, lambda wm: wm.update({k: 1 for k in list(wm)[:1]}))
    return Bad(_index(c), ("weight_map",))


@case
def case_index_weight_map_empty(c, tmp):
    _index(c).write_text(json.dumps({"weight_map": {}}))
    return Bad(_index(c), ("weight_map is empty",))


@case
def case_index_nested_100000_deep(c, tmp):
    _index(c).write_text("[" * 100_000 + "]" * 100_000)
    return Bad(_index(c), ("not valid json", "recursion"))


@case
def case_index_integer_too_long(c, tmp):
    # json.loads raises a plain ValueError (not JSONDecodeError) past 4300 digits: it used to be an internal error.
    idx = _index(c).read_text()
    _index(c).write_text(idx.replace('"total_size": ', '"total_size": ' + "9" * 5000, 1))
    return Bad(_index(c), ("not valid json", "digits"))


@case
def case_index_shard_name_with_nul(c, tmp):
    # A JSON "\u0000" in a shard name used to escape as ValueError("embedded null byte"): an internal error.
    _edit_index(c, lambda wm: wm.update({k: "model\u0000.safetensors" for k in list(wm)[:1]}))
    return Bad(_index(c), ("not a valid file name",))


@case
def case_index_shard_name_lone_surrogate(c, tmp):
    _edit_index(c, lambda wm: wm.update({k: "\ud800.safetensors" for k in list(wm)[:1]}))
    return Bad(_index(c), ("not a valid file name",))


@case
def case_index_shard_name_empty(c, tmp):
    _edit_index(c, lambda wm: wm.update({k: "" for k in list(wm)[:1]}))
    return Bad(c["sft"], ("is a directory",))


@case
def case_shard_is_a_directory(c, tmp):
    _shard(c, 1).unlink()
    _shard(c, 1).mkdir()
    return Bad(_shard(c, 1), ("is a directory",))


@case
def case_shard_is_a_fifo(c, tmp):
    _shard(c, 1).unlink()
    os.mkfifo(_shard(c, 1))
    return Bad(_shard(c, 1), ("not a regular file",))


@case
def case_index_is_a_fifo(c, tmp):
    # Reading it used to block forever waiting for a writer.
    _index(c).unlink()
    os.mkfifo(_index(c))
    return Bad(_index(c), ("not a regular file",))


@case
def case_index_is_a_directory(c, tmp):
    _index(c).unlink()
    _index(c).mkdir()
    return Bad(_index(c), ("not a regular file",))


@case
def case_index_symlink_to_dev_zero(c, tmp):
    # Size 0 passed the index size check and read_bytes() then read /dev/zero forever.
    _index(c).unlink()
    _index(c).symlink_to("/dev/zero")
    return Bad(_index(c), ("outside the checkpoint directory",))


@case
def case_tensor_stored_in_two_shards(c, tmp):
    shutil.copy(_shard(c, 1), _shard(c, 2))
    return Bad(_shard(c, 2), ("stored twice",), tensor=_shard_tensors(c, 1)[0])


# ---------------------------------------------------------------------------------------------------- the checks
def _prepare(small_trio, tmp_path: Path, name: str) -> tuple[dict[str, Path], Bad, dict]:
    root = tmp_path / "in"
    c = {label: Path(shutil.copytree(src, root / label, symlinks=True)) for label, src in zip(LABELS, small_trio)}
    bad = CASES[name](c, tmp_path)
    watched = [root, *bad.outside]
    return c, bad, _digest(watched)


def _check_message(text: str, bad: Bad) -> None:
    assert "Traceback" not in text, text
    assert text.startswith("error: "), text
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    assert str(bad.path) in text, f"message does not name {bad.path}:\n{text}"
    low = text.lower()
    for needle in bad.needles:
        assert needle in low, f"message does not say {needle!r}:\n{text}"
    if bad.tensor is not None:
        assert repr(bad.tensor) in text or bad.tensor in text, f"message does not name tensor {bad.tensor}:\n{text}"
    assert len(text) < 2000, f"message is {len(text)} characters long"


def _check_nothing_written(out: Path, pre_created: bool) -> None:
    if pre_created:
        assert out.is_dir() and not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    else:
        assert not out.exists() and not out.is_symlink()


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_cli(small_trio, tmp_path, name):
    c, bad, before = _prepare(small_trio, tmp_path, name)
    out = tmp_path / "out"
    with _no_hang():
        r = runner.invoke(app, ["merge", *(str(c[k]) for k in LABELS), "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    _check_message(r.output, bad)
    _check_nothing_written(out, pre_created=False)
    assert _digest([tmp_path / "in", *bad.outside]) == before


@pytest.mark.parametrize(
    "name",
    [
        "truncated_in_data",
        "invalid_json",
        "index_names_missing_shard",
        "shard_symlink_to_etc_passwd",
        "shard_is_a_fifo",
    ],
)
def test_hostile_input_into_empty_output_dir(small_trio, tmp_path, name):
    c, bad, before = _prepare(small_trio, tmp_path, name)
    out = tmp_path / "out"
    out.mkdir()
    with _no_hang():
        r = runner.invoke(app, ["merge", *(str(c[k]) for k in LABELS), "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    _check_message(r.output, bad)
    _check_nothing_written(out, pre_created=True)
    assert _digest([tmp_path / "in", *bad.outside]) == before


@pytest.mark.parametrize("name", ["truncated_in_header", "lone_surrogate_tensor_name", "index_shard_name_with_nul"])
def test_hostile_input_plan_fails_the_same(small_trio, tmp_path, name):
    c, bad, before = _prepare(small_trio, tmp_path, name)
    r = runner.invoke(app, ["plan", *(str(c[k]) for k in LABELS), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1, r.output
    _check_message(r.output, bad)
    _check_nothing_written(tmp_path / "out", pre_created=False)
    assert _digest([tmp_path / "in"]) == before


# Real processes, started together (each imports torch: seconds), with a timeout: no traceback on stderr, no hang.
SUBPROCESS_CASES = [
    ("truncated_in_header", False),
    ("shard_is_a_fifo", False),
    ("index_is_a_fifo", True),
    ("shard_symlink_to_etc_passwd", True),
]


def test_hostile_input_subprocess(small_trio, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STREAMMERGE_DEBUG"}
    runs = []
    for name, pre_created in SUBPROCESS_CASES:
        case_tmp = tmp_path / name
        case_tmp.mkdir()
        c, bad, before = _prepare(small_trio, case_tmp, name)
        out = case_tmp / "out"
        if pre_created:
            out.mkdir()
        cmd = streammerge_cmd("merge", *(c[k] for k in LABELS), "-o", out)
        proc = subprocess.Popen(
            [*cmd, "--device", "cpu"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        runs.append((name, pre_created, case_tmp, bad, before, out, proc))
    for name, pre_created, case_tmp, bad, before, out, proc in runs:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{name}: streammerge hung (a FIFO opened for reading?)")
        assert proc.returncode == 1, (name, proc.returncode, stdout, stderr)
        assert stdout == "", (name, stdout)
        _check_message(stderr, bad)
        _check_nothing_written(out, pre_created)
        assert _digest([case_tmp / "in", *bad.outside]) == before, name


def test_every_case_fails_in_the_library_too(small_trio, tmp_path):
    """Checkpoint() itself raises HeaderError/CheckpointError naming the file; never another exception type."""
    for name in sorted(CASES):
        case_tmp = tmp_path / name
        case_tmp.mkdir()
        c, bad, before = _prepare(small_trio, case_tmp, name)
        failures = []
        with _no_hang():
            for label in LABELS:
                try:
                    Checkpoint(c[label], label=label).close()
                except (HeaderError, CheckpointError) as e:
                    failures.append(str(e))
        assert len(failures) == 1, (name, failures)
        assert str(bad.path) in failures[0], (name, failures[0])
        assert _digest([case_tmp / "in", *bad.outside]) == before


def test_lone_surrogate_name_in_every_input(tmp_path):
    """A name spelled with a lone surrogate escape in all three inputs pairs up; it used to pass parsing and crash
    building the output header (UnicodeEncodeError, reported as an internal error)."""
    header = _pack(json.dumps({"\ud800w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode())
    roots = []
    for label in LABELS:
        (tmp_path / label).mkdir()
        (tmp_path / label / "model.safetensors").write_bytes(header + b"\0" * 8)
        roots.append(str(tmp_path / label))
    before = _digest([tmp_path])
    r = runner.invoke(app, ["merge", *roots, "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert r.exit_code == 1, r.output
    _check_message(r.output, Bad(tmp_path / "target" / "model.safetensors", ("not valid unicode",)))
    _check_nothing_written(tmp_path / "out", pre_created=False)
    assert _digest([tmp_path]) == before


# ---------------------------------------------------------------------------------------------------- the fuzz test
FUZZ_SHAPES = {"embed.weight": (12, 8), "layer.weight": (8, 8), "layer.bias": (8,), "norm.weight": (5,)}
# (checkpoint, file) pairs the fuzzer mutates: a single file, an index, and both shards of a sharded checkpoint.
FUZZ_VICTIMS = [
    ("target", "model.safetensors"),
    ("sft", "model.safetensors.index.json"),
    ("sft", "model-00001-of-00002.safetensors"),
    ("sft", "model-00002-of-00002.safetensors"),
]
INTERESTING_BYTES = b'\x00\xff\x80"{}[],:-.0129 \\eE'


@pytest.fixture(scope="module")
def fuzz_trio(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz_base")
    t, s, g = make_related(FUZZ_SHAPES, seed=7)
    return {
        "target": write_checkpoint(root / "target", t, shards=1, aux=False),
        "sft": write_checkpoint(root / "sft", s, shards=2, aux=False),
        "grpo": write_checkpoint(root / "grpo", g, shards=1, aux=False),
    }


def _header_end(blob: bytes) -> int:
    if len(blob) < 8:
        return len(blob)
    return min(len(blob), 8 + struct.unpack("<Q", blob[:8])[0])


# Values that have broken parsers: NUL, lone surrogates, path tricks, huge and negative numbers, deep nesting.
NASTY = ["", ".", "..", "../x.safetensors", "/etc/passwd", "\x00", "a\x00b", "\ud800", "\udcff", "x" * 300]
NASTY += ["F4", "BOOL", "F8_E4M3", "__metadata__", 10**4000, -(10**4000), 2**64, -1, 1e308, float("nan"), [[[[[[]]]]]]]


def _nasty(i: int):
    return NASTY[i]


nasty_values = st.integers(0, len(NASTY) - 1).map(_nasty)  # (keeps hypothesis' statistics readable)
nasty_names = st.sampled_from(range(10)).map(_nasty)  # the strings
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6) | nasty_values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def mutations(draw, blob: bytes, is_index: bool):
    """Apply 1-3 byte-level (or JSON-level) mutations to ``blob``, biased towards the header."""
    blob = bytearray(blob)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(
            st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend", "relen"] + ["json", "data"] * 3)
        )
        end = len(blob) if is_index else _header_end(bytes(blob))
        region = draw(st.sampled_from(["header", "header", "anywhere"]))
        hi = max(0, (end if region == "header" else len(blob)) - 1)
        pos = draw(st.integers(0, hi))
        if op == "flip" and blob:
            blob[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and blob:
            blob[pos] = draw(st.sampled_from(list(INTERESTING_BYTES)))
        elif op == "insert":
            blob[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del blob[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del blob[pos:]
        elif op == "extend":
            blob += draw(st.binary(min_size=1, max_size=16))
        elif op == "relen" and not is_index and len(blob) >= 8:
            n = struct.unpack("<Q", blob[:8])[0]
            blob[:8] = struct.pack("<Q", max(0, n + draw(st.integers(-16, 16))) % 2**64)
        elif op == "data" and not is_index and end < len(blob):  # a new value: the file stays valid, and merges
            blob[draw(st.integers(end, len(blob) - 1))] = draw(st.integers(0, 255))
        elif op == "json":
            blob = bytearray(_json_mutation(draw, bytes(blob), is_index))
    return bytes(blob)


def _json_mutation(draw, blob: bytes, is_index: bool) -> bytes:
    """Replace one value of the header/index JSON with an arbitrary JSON value and re-serialise it correctly."""
    if is_index:
        text = blob
    else:
        end = _header_end(blob)
        text, data = blob[8:end], blob[end:]
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return blob
    if not isinstance(obj, dict) or not obj:
        return blob
    target = obj["weight_map"] if is_index and isinstance(obj.get("weight_map"), dict) else obj
    if not target:
        return blob
    key = draw(st.sampled_from(sorted(target)))
    if isinstance(target[key], dict) and target[key] and draw(st.booleans()):
        sub = draw(st.sampled_from(sorted(target[key])))
        target[key][sub] = draw(nasty_values | json_values)
    elif draw(st.booleans()):
        new_key = draw(st.text(max_size=12) | nasty_names)
        target[new_key] = target.pop(key)  # rename (a tensor or a shard mapping)
    else:
        target[key] = draw(nasty_values | json_values)
    new = json.dumps(obj).encode()
    return new if is_index else _pack(new, data, pad=draw(st.booleans()))


def _check_merged(out: Path, roots: dict[str, Path]) -> None:
    """A merge of mutated-but-valid inputs is still exact: compare with the independent reference."""

    def load(root: Path) -> dict:
        tensors = {}
        for f in sorted(root.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                tensors.update({k: h.get_tensor(k) for k in h.keys()})
        return tensors

    dt = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}
    T, S, G, M = (load(p) for p in (roots["target"], roots["sft"], roots["grpo"], out))
    assert set(M) == set(T)
    for k, t in T.items():
        dts = tuple(dt.get(str(x.dtype)) for x in (t, S[k], G[k]))
        if None in dts or dt.get(str(M[k].dtype)) is None:
            continue
        want = expected_bits(raw_bits(t), raw_bits(S[k]), raw_bits(G[k]), 1.0, dts, dt[str(M[k].dtype)])
        assert np.array_equal(raw_bits(M[k]), want), k


@settings(
    max_examples=int(os.environ.get("STREAMMERGE_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzz_mutated_checkpoints_fail_cleanly(fuzz_trio, data):
    label, fname = data.draw(st.sampled_from(FUZZ_VICTIMS), label="victim")
    work = Path(tempfile.mkdtemp(prefix="hostile-fuzz-"))
    try:
        roots = {k: Path(shutil.copytree(v, work / k)) for k, v in fuzz_trio.items()}
        victim = roots[label] / fname
        victim.write_bytes(data.draw(mutations(victim.read_bytes(), fname.endswith(".json")), label="mutated"))
        before = _digest([roots[k] for k in LABELS])
        try:
            with _no_hang():
                Checkpoint(roots[label], label=label).close()
        except (HeaderError, CheckpointError) as e:
            event(f"open: {type(e).__name__}")
            assert str(roots[label]) in str(e), str(e)  # names the file (or directory) at fault
        else:
            try:
                streammerge.plan(roots["target"], roots["sft"], roots["grpo"])
            except StreamMergeError as e:  # e.g. a renamed tensor no longer pairs: a clean TensorMismatchError
                event(f"plan: {type(e).__name__}")
            else:
                event("plan: ok")
                if data.draw(st.booleans(), label="merge?"):
                    out = work / "out"
                    try:
                        streammerge.merge(
                            roots["target"], roots["sft"], roots["grpo"], out, device="cpu", chunk_bytes="4KiB"
                        )
                    except StreamMergeError as e:
                        event(f"merge: {type(e).__name__}")
                        assert not out.exists() or not any(out.iterdir())
                    else:
                        event("merge: ok")
                        _check_merged(out, roots)
        assert _digest([roots[k] for k in LABELS]) == before
    finally:
        shutil.rmtree(work, ignore_errors=True)
