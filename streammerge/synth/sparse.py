"""Sparse checkpoints: real safetensors headers over data regions that are holes (70B-scale layouts in a few KB)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..dtypes import DTYPES
from ..format import build_header
from .files import Trio, plan_shards, prepare_directory, shard_file_names, write_index, write_side_files
from .layouts import Layout, dtype_code, get_layout, layout_tensors

# make_sparse_trio's default split: the Hub's usual 5GB shards, smaller and larger ones. Not one 141 GB file:
# safe_open maps a whole file copy-on-write, which the kernel's overcommit heuristic refuses beyond RAM + swap
# ("unable to mmap 141107499128 bytes ... Cannot allocate memory" on the 24 GiB development machine).
SPARSE_SHARD_BYTES = (5_000_000_000, 2_000_000_000, 10_000_000_000)


def save_file_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, int]:
    """The safetensors header ``safetensors.torch.save_file`` would write for these tensors, byte for byte.

    Tensors are laid out contiguously in save_file's order: by dtype (F32, then BF16, F16, F8_E4M3, F8_E5M2: the
    reverse of the safetensors ``Dtype`` enum order), then by name; the bytes come from
    :func:`streammerge.format.build_header`, which lays tensors out in the order it is given.

    Args:
        tensors (`list[tuple[str, str, tuple[int, ...]]]`): ``(name, dtype, shape)`` in any order; dtype as for
            [`make_sparse_checkpoint`], or "F8_E4M3" / "F8_E5M2".
        metadata (`dict[str, str]`, *optional*): written as ``__metadata__``.

    Returns:
        `tuple[bytes, int]`: the header (length prefix included) and the size of the data region.
    """
    entries = sorted(((_header_code(d), name, tuple(shape)) for name, d, shape in tensors), key=_save_order)
    header, spans = build_header([(name, dtype, shape) for dtype, name, shape in entries], metadata)
    return header, max((end for _, end in spans.values()), default=0)


# Position of each dtype in the safetensors Dtype enum (F16 < BF16 < F32); save_file writes larger positions first.
# A fact of its own, not streammerge.dtypes': the declaration order of safetensors' Rust `Dtype` enum, which its
# derived `Ord`, and so save_file's sort, follows. The dtype table promises no order, and only the generated
# dtypes need a position here (the FP8 ones for block-scaled checkpoints, which precede F16 in the enum).
_DTYPE_ENUM_ORDER = {"F8_E5M2": -2, "F8_E4M3": -1, "F16": 0, "BF16": 1, "F32": 2}


def _header_code(dtype: str) -> str:
    """A dtype as for [`make_sparse_checkpoint`], or an FP8 code (which no generated dense dtype alias names)."""
    return dtype if dtype in _DTYPE_ENUM_ORDER else dtype_code(dtype)


def _save_order(entry: tuple[str, str, tuple[int, ...]]) -> tuple[int, str]:
    return -_DTYPE_ENUM_ORDER[entry[0]], entry[1]


def make_sparse_checkpoint(
    directory: str | os.PathLike,
    layout: str | Layout = "llama3-70b",
    *,
    dtype: str = "BF16",
    shard_bytes: int | float | str | None = 5e9,
    num_layers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint whose headers are real but whose data regions are holes: no disk used, reads as zeros.

    Each file gets its full header (the same bytes ``save_file`` would write for these tensors) and is then
    truncated up to its final size, so the data region is a sparse hole. The index and config/tokenizer files are
    real. A 70B layout makes ~141 GB of apparent size in a few KB of disk.

    Args:
        directory (`str` or `os.PathLike`): created if missing.
        layout (`str` or [`Layout`], defaults to `"llama3-70b"`): see [`get_layout`].
        dtype (`str`, defaults to `"BF16"`): storage dtype.
        shard_bytes (`int`, `float`, `str` or `None`, defaults to 5e9): shard cap, `None` for one file.
        num_layers (`int`, *optional*): overrides the layer count.
        overwrite (`bool`, defaults to `False`): replace an existing checkpoint.

    Returns:
        `Path`: ``directory``.

    Raises:
        `FileExistsError`: a checkpoint is already there and ``overwrite`` is false.
    """
    code = dtype_code(dtype)
    lay = get_layout(layout, num_layers=num_layers)
    tensors = layout_tensors(lay)
    shapes = dict(tensors)
    sizes = [(name, math.prod(shape) * DTYPES[code].itemsize) for name, shape in tensors]
    shards = plan_shards(sizes, shard_bytes)
    files = shard_file_names(shards)
    path = prepare_directory(directory, overwrite)
    write_side_files(path, lay, code)
    for names, file in zip(shards, files, strict=True):
        header, data_size = save_file_header([(name, code, shapes[name]) for name in names], {"format": "pt"})
        with open(path / file, "wb") as f:
            f.write(header)
            f.truncate(len(header) + data_size)
    write_index(path, shards, files, sum(nbytes for _, nbytes in sizes))
    return path


def make_sparse_trio(
    root: str | os.PathLike,
    layout: str | Layout = "llama3-70b",
    *,
    dtype: str = "BF16",
    num_layers: int | None = None,
    shard_sizes: tuple[int | float | str | None, int | float | str | None, int | float | str | None] = (
        SPARSE_SHARD_BYTES
    ),
    overwrite: bool = False,
) -> Trio:
    """Three sparse checkpoints (see [`make_sparse_checkpoint`]) under ``root/{target,sft,grpo}``, split differently.

    Args:
        root (`str` or `os.PathLike`): parent directory.
        layout (`str` or [`Layout`], defaults to `"llama3-70b"`): see [`get_layout`].
        dtype (`str`, defaults to `"BF16"`): storage dtype of all three.
        num_layers (`int`, *optional*): overrides the layer count.
        shard_sizes (`tuple`, defaults to ``(5e9, 2e9, 1e10)``): shard caps of target, sft, grpo (`None`: one file).
        overwrite (`bool`, defaults to `False`): replace existing checkpoints.

    Returns:
        [`Trio`]: the three directories.
    """
    trio = Trio.under(root)
    for directory, cap in zip(trio, shard_sizes, strict=True):
        make_sparse_checkpoint(
            directory, layout, dtype=dtype, shard_bytes=cap, num_layers=num_layers, overwrite=overwrite
        )
    return trio
