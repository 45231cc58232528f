"""Dense block-scaled FP8 checkpoints of the DeepSeek layout: values generated, quantized and written shard by shard.

Each role's values are those of [`streammerge.synth.values`] (a pure function of ``(seed, tensor name, chunk)``),
computed in float32 and stored once: the linear projection weights as e4m3 codes with per-block scales (the rule of
[`streammerge.synth.fp8`]) in the ``"fp8"`` format, or in BF16 in the ``"bf16"`` format; embeddings, norms and the
router as BF16 (its bias F32), rounded as the dense generator rounds them. grpo leaves a seeded share of each
quantized weight's blocks exactly as sft has them (RL updates are sparse), so those blocks of grpo and sft hold the
same bytes and their difference is exactly zero.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..dtypes import DTYPES, torch_dtype
from .deepseek import (
    FORMATS,
    FP8_BLOCK_SIZE,
    FP8_DTYPE,
    SCALE_SUFFIX,
    DeepSeekLayout,
    deepseek_config,
    deepseek_generation_config,
    deepseek_shard_names,
    deepseek_tensors,
    get_deepseek_layout,
    scale_name,
    scale_shape,
    split_evenly,
)
from .files import Trio, prepare_directory, write_index, write_json
from .fp8 import quantize_fp8_blocks
from .values import ROLES, NoiseScales, fill_chunk, tensor_chunks

# Value scales for FP8 trios: the dense defaults' fine-tune deltas (1e-3, 2.5e-4) lie below an e4m3 step of a typical
# weight (about 1.5e-3 for |x| ~ 0.02 in a block whose amax is ~0.09), so nearly every quantized element of grpo would
# equal sft's. These deltas move a good share of the codes by one or more steps, as fine-tunes of one base do.
FP8_NOISE = NoiseScales(base_std=0.02, target_std=4e-3, sft_std=3e-3, grpo_std=1e-3)
# Share of each quantized weight's blocks that grpo leaves exactly as sft has them.
UNCHANGED_BLOCK_FRACTION = 0.25
# make_fp8_trio's defaults: target in one file, sft in three shards with its scales after all weights (so most of
# its scales lie in another shard than their weight, as some publishers write them), grpo in two shards.
FP8_TRIO_SHARDS = (1, 3, 2)
FP8_TRIO_SCALES_LAST = (False, True, False)


def _role_values(role: str, seed: int, name: str, shape: tuple[int, ...], noise: NoiseScales) -> torch.Tensor:
    """``role``'s float32 values of tensor ``name``, unrounded (one rounding happens when they are stored)."""
    out = torch.empty(shape, dtype=torch.float32)
    for chunk, chunk_name, index in tensor_chunks(name, out):
        fill_chunk(chunk, role, seed, chunk_name, index, noise)
    return out


def unchanged_blocks(seed: int, name: str, grid: tuple[int, int], fraction: float) -> np.ndarray:
    """Which blocks of weight ``name`` grpo leaves as sft has them: a seeded boolean grid, about ``fraction`` true."""
    digest = hashlib.blake2b(f"streammerge.synth.fp8\0{seed}\0{name}".encode(), digest_size=8).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little"))).random(grid) < fraction


def linear_values(
    role: str,
    seed: int,
    name: str,
    shape: tuple[int, int],
    noise: NoiseScales,
    block_size: tuple[int, int],
    unchanged_fraction: float,
) -> torch.Tensor:
    """``role``'s float32 values of a quantized weight: grpo's unchanged blocks hold sft's values exactly."""
    values = _role_values(role, seed, name, shape, noise)
    if role == "grpo":
        (rows, cols), (br, bc) = shape, block_size
        keep = unchanged_blocks(seed, name, scale_shape(shape, block_size), unchanged_fraction)
        mask = keep.repeat(br, axis=0)[:rows].repeat(bc, axis=1)[:, :cols]
        # numpy, not a torch boolean index: that costs ~5 ms per small tensor on a loaded 2-core machine.
        np.copyto(values.numpy(), _role_values("sft", seed, name, shape, noise).numpy(), where=mask)
    return values


def make_fp8_checkpoint(
    directory: str | os.PathLike,
    layout: str | DeepSeekLayout = "tiny-deepseek-v3",
    *,
    role: str = "target",
    seed: int = 0,
    fmt: str = "fp8",
    scale_dtype: str = "F32",
    block_size: tuple[int, int] = FP8_BLOCK_SIZE,
    num_layers: int | None = None,
    num_shards: int = 1,
    scales_last: bool = False,
    noise: NoiseScales = FP8_NOISE,
    unchanged_fraction: float = UNCHANGED_BLOCK_FRACTION,
    overwrite: bool = False,
) -> Path:
    """Write one synthetic DeepSeek-layout checkpoint (one role of an FP8 trio), shard by shard.

    Memory peaks at about one shard plus the values of one tensor (two for grpo's quantized weights).

    Args:
        directory (`str` or `os.PathLike`): created if missing; config.json (with ``quantization_config`` in the
            ``"fp8"`` format) and generation_config.json go beside the weights.
        layout (`str` or [`DeepSeekLayout`], defaults to `"tiny-deepseek-v3"`): see [`get_deepseek_layout`].
        role (`str`, defaults to `"target"`): one of "base", "target", "sft", "grpo".
        seed (`int`, defaults to 0): selects the values and grpo's unchanged blocks.
        fmt (`str`, defaults to `"fp8"`): "fp8" (quantized weights with ``_scale_inv`` scales) or "bf16".
        scale_dtype (`str`, defaults to `"F32"`): "F32" or "BF16".
        block_size (`tuple[int, int]`, defaults to ``(128, 128)``): rows and columns per scale block.
        num_layers (`int`, *optional*): overrides the layout's decoder layer count.
        num_shards (`int`, defaults to 1): shards of about equal size (1: a single ``model.safetensors``).
        scales_last (`bool`, defaults to `False`): write every scale after all weights instead of right after its
            weight, so scales and their weights fall in different shards.
        noise ([`NoiseScales`], defaults to [`FP8_NOISE`]): value scales.
        unchanged_fraction (`float`, defaults to 0.25): share of blocks grpo leaves as sft has them.
        overwrite (`bool`, defaults to `False`): replace an existing checkpoint in ``directory``.

    Returns:
        `Path`: ``directory``.

    Raises:
        `FileExistsError`: ``directory`` holds safetensors files and ``overwrite`` is false.
        `ValueError` / `KeyError`: bad role, format, scale dtype or layout.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    block = (int(block_size[0]), int(block_size[1]))
    lay = get_deepseek_layout(layout, num_layers=num_layers)
    spec = deepseek_tensors(lay, fmt=fmt, scale_dtype=scale_dtype, block_size=block)
    if scales_last:
        spec = [t for t in spec if not t[0].endswith(SCALE_SUFFIX)] + [t for t in spec if t[0].endswith(SCALE_SUFFIX)]
    # The weights the FP8 format quantizes; the "bf16" format stores the same weights in BF16.
    linear = {name for name, dtype, _ in deepseek_tensors(lay, fmt="fp8") if dtype == FP8_DTYPE}
    sizes = [(name, math.prod(shape) * DTYPES[dtype].itemsize) for name, dtype, shape in spec]
    shards = split_evenly(sizes, num_shards)
    files = deepseek_shard_names(len(shards))
    path = prepare_directory(directory, overwrite)
    write_json(path / "config.json", deepseek_config(lay, fmt=fmt, block_size=block))
    write_json(path / "generation_config.json", deepseek_generation_config())

    entries = {name: (dtype, shape) for name, dtype, shape in spec}
    pending_scales: dict[str, torch.Tensor] = {}  # a scale always follows its weight, in its shard or a later one
    for names, file in zip(shards, files, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            dtype, shape = entries[name]
            if name in pending_scales:
                tensors[name] = pending_scales.pop(name)
            elif name in linear:
                values = linear_values(role, seed, name, shape, noise, block, unchanged_fraction)
                if fmt == "fp8":
                    tensors[name], pending_scales[scale_name(name)] = quantize_fp8_blocks(values, block, scale_dtype)
                else:
                    tensors[name] = values.to(torch.bfloat16)
            else:
                tensors[name] = torch.empty(shape, dtype=torch_dtype(dtype))
                for chunk, chunk_name, index in tensor_chunks(name, tensors[name]):
                    fill_chunk(chunk, role, seed, chunk_name, index, noise)
        save_file(tensors, str(path / file), metadata={"format": "pt"})
    write_index(path, shards, files, sum(nbytes for _, nbytes in sizes))
    return path


def make_fp8_trio(
    root: str | os.PathLike,
    layout: str | DeepSeekLayout = "tiny-deepseek-v3",
    *,
    seed: int = 0,
    formats: tuple[str, str, str] = ("fp8", "fp8", "fp8"),
    scale_dtype: str = "F32",
    block_size: tuple[int, int] = FP8_BLOCK_SIZE,
    num_layers: int | None = None,
    num_shards: tuple[int, int, int] = FP8_TRIO_SHARDS,
    scales_last: tuple[bool, bool, bool] = FP8_TRIO_SCALES_LAST,
    noise: NoiseScales = FP8_NOISE,
    unchanged_fraction: float = UNCHANGED_BLOCK_FRACTION,
    overwrite: bool = False,
) -> Trio:
    """Write a target, sft and grpo DeepSeek-layout checkpoint in block-scaled FP8 under ``root/{target,sft,grpo}``.

    The three share one base like real fine-tunes (see [`make_fp8_checkpoint`] and [`streammerge.synth.values`]),
    are sharded differently, and by default sft writes its scales after all its weights, so most of them lie in
    another shard than their weight. ``formats=("bf16", "fp8", "fp8")`` makes the mixed trio of a BF16 target with
    FP8 sft and grpo; ``("fp8", "bf16", "bf16")`` the reverse.

    Args:
        root (`str` or `os.PathLike`): parent directory, created if missing.
        layout (`str` or [`DeepSeekLayout`], defaults to `"tiny-deepseek-v3"`): see [`get_deepseek_layout`].
        seed (`int`, defaults to 0): same seed, same bytes.
        formats (`tuple[str, str, str]`, defaults to all ``"fp8"``): target, sft and grpo format, each "fp8" or
            "bf16".
        scale_dtype (`str`, defaults to `"F32"`): "F32" or "BF16", for every FP8 checkpoint of the trio.
        block_size (`tuple[int, int]`, defaults to ``(128, 128)``): rows and columns per scale block.
        num_layers (`int`, *optional*): overrides the layout's decoder layer count.
        num_shards (`tuple[int, int, int]`, defaults to ``(1, 3, 2)``): shards of target, sft and grpo.
        scales_last (`tuple[bool, bool, bool]`, defaults to ``(False, True, False)``): per checkpoint, see
            [`make_fp8_checkpoint`].
        noise ([`NoiseScales`], defaults to [`FP8_NOISE`]): value scales.
        unchanged_fraction (`float`, defaults to 0.25): share of blocks grpo leaves as sft has them.
        overwrite (`bool`, defaults to `False`): replace existing checkpoints.

    Returns:
        [`Trio`]: the three directories.

    Example:
        ```python
        >>> trio = make_fp8_trio("/tmp/fp8", scale_dtype="BF16")
        >>> sorted(p.name for p in trio.sft.glob("*.safetensors"))[0]
        'model-00001-of-000003.safetensors'
        ```
    """
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    trio = Trio.under(root)
    for role, directory, fmt, shards, last in zip(
        ("target", "sft", "grpo"), trio, formats, num_shards, scales_last, strict=True
    ):
        make_fp8_checkpoint(
            directory,
            layout,
            role=role,
            seed=seed,
            fmt=fmt,
            scale_dtype=scale_dtype,
            block_size=block_size,
            num_layers=num_layers,
            num_shards=shards,
            scales_last=last,
            noise=noise,
            unchanged_fraction=unchanged_fraction,
            overwrite=overwrite,
        )
    return trio
