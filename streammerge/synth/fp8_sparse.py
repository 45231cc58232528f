"""Sparse block-scaled FP8 checkpoints: the full DeepSeek-V3 layout as real headers over holes (688 GB in a few MB).

A hole reads as zeros, so every e4m3 code is 0x00 and every scale is 0: a zero scale is legal in the format (some
quantizers write one for an all-zero block) and dequantizes to zeros, so a merge of such a trio is well defined.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..dtypes import DTYPES
from .deepseek import (
    DEEPSEEK_V3_SHARDS,
    FORMATS,
    FP8_BLOCK_SIZE,
    DeepSeekLayout,
    deepseek_config,
    deepseek_generation_config,
    deepseek_shard_names,
    deepseek_tensors,
    get_deepseek_layout,
    split_evenly,
)
from .files import Trio, prepare_directory, write_index, write_json
from .sparse import save_file_header

# make_sparse_fp8_trio's default split: the target as DeepSeek publishes it, sft coarser, grpo finer, so no shard
# boundary lines up across the three. The largest (sft's, ~4.6 GB) stays far below the development machine's RAM:
# safe_open maps a whole file copy-on-write (see streammerge.synth.sparse.SPARSE_SHARD_BYTES).
SPARSE_FP8_SHARDS = (DEEPSEEK_V3_SHARDS, 150, 200)


def make_sparse_fp8_checkpoint(
    directory: str | os.PathLike,
    layout: str | DeepSeekLayout = "deepseek-v3",
    *,
    fmt: str = "fp8",
    scale_dtype: str = "F32",
    block_size: tuple[int, int] = FP8_BLOCK_SIZE,
    num_layers: int | None = None,
    num_shards: int = DEEPSEEK_V3_SHARDS,
    overwrite: bool = False,
) -> Path:
    """Write a DeepSeek-layout checkpoint whose headers are real but whose data regions are holes.

    Each shard gets the header ``save_file`` would write for its tensors, then is truncated up to its final size;
    the index, config.json (with ``quantization_config`` in the ``"fp8"`` format) and generation_config.json are
    real. The full DeepSeek-V3 layout makes 91,992 tensors in 163 shards, 688.5 GB of apparent size.

    Args:
        directory (`str` or `os.PathLike`): created if missing.
        layout (`str` or [`DeepSeekLayout`], defaults to `"deepseek-v3"`): see [`get_deepseek_layout`].
        fmt (`str`, defaults to `"fp8"`): "fp8" or "bf16" (every weight BF16, no scales: 1.37 TB apparent).
        scale_dtype (`str`, defaults to `"F32"`): "F32" or "BF16".
        block_size (`tuple[int, int]`, defaults to ``(128, 128)``): rows and columns per scale block.
        num_layers (`int`, *optional*): overrides the layout's decoder layer count (the MTP layer follows them).
        num_shards (`int`, defaults to 163): shards of about equal size.
        overwrite (`bool`, defaults to `False`): replace an existing checkpoint.

    Returns:
        `Path`: ``directory``.

    Raises:
        `FileExistsError`: a checkpoint is already there and ``overwrite`` is false.
    """
    lay = get_deepseek_layout(layout, num_layers=num_layers)
    spec = deepseek_tensors(lay, fmt=fmt, scale_dtype=scale_dtype, block_size=block_size)
    entries = {name: (dtype, shape) for name, dtype, shape in spec}
    sizes = [(name, math.prod(shape) * DTYPES[dtype].itemsize) for name, dtype, shape in spec]
    shards = split_evenly(sizes, num_shards)
    files = deepseek_shard_names(len(shards))
    path = prepare_directory(directory, overwrite)
    write_json(path / "config.json", deepseek_config(lay, fmt=fmt, block_size=block_size))
    write_json(path / "generation_config.json", deepseek_generation_config())
    for names, file in zip(shards, files, strict=True):
        header, data_size = save_file_header([(name, *entries[name]) for name in names], {"format": "pt"})
        with open(path / file, "wb") as f:
            f.write(header)
            f.truncate(len(header) + data_size)
    write_index(path, shards, files, sum(nbytes for _, nbytes in sizes))
    return path


def make_sparse_fp8_trio(
    root: str | os.PathLike,
    layout: str | DeepSeekLayout = "deepseek-v3",
    *,
    formats: tuple[str, str, str] = ("fp8", "fp8", "fp8"),
    scale_dtype: str = "F32",
    block_size: tuple[int, int] = FP8_BLOCK_SIZE,
    num_layers: int | None = None,
    num_shards: tuple[int, int, int] = SPARSE_FP8_SHARDS,
    overwrite: bool = False,
) -> Trio:
    """Three sparse DeepSeek-layout checkpoints (see [`make_sparse_fp8_checkpoint`]) under ``root/{target,sft,grpo}``.

    Args:
        root (`str` or `os.PathLike`): parent directory.
        layout (`str` or [`DeepSeekLayout`], defaults to `"deepseek-v3"`): see [`get_deepseek_layout`].
        formats (`tuple[str, str, str]`, defaults to all ``"fp8"``): target, sft and grpo format ("fp8" or "bf16").
        scale_dtype (`str`, defaults to `"F32"`): "F32" or "BF16".
        block_size (`tuple[int, int]`, defaults to ``(128, 128)``): rows and columns per scale block.
        num_layers (`int`, *optional*): overrides the layout's decoder layer count.
        num_shards (`tuple[int, int, int]`, defaults to ``(163, 150, 200)``): shards of target, sft and grpo.
        overwrite (`bool`, defaults to `False`): replace existing checkpoints.

    Returns:
        [`Trio`]: the three directories.
    """
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    trio = Trio.under(root)
    for directory, fmt, shards in zip(trio, formats, num_shards, strict=True):
        make_sparse_fp8_checkpoint(
            directory,
            layout,
            fmt=fmt,
            scale_dtype=scale_dtype,
            block_size=block_size,
            num_layers=num_layers,
            num_shards=shards,
            overwrite=overwrite,
        )
    return trio
