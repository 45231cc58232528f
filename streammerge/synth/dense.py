"""Dense synthetic checkpoints: every tensor generated and written shard by shard (make_checkpoint, make_trio)."""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..dtypes import DTYPES, torch_dtype
from .files import Trio, plan_shards, prepare_directory, shard_file_names, write_index, write_side_files
from .layouts import Layout, dtype_code, get_layout, layout_nbytes, layout_tensors
from .values import DEFAULT_NOISE, ROLES, NoiseScales, fill_chunk, tensor_chunks

# Default shard caps (decimal bytes, like huggingface_hub) for make_trio: the three checkpoints are split differently,
# and no shard is big enough to hurt a 24 GiB machine (a shard is held in memory while it is written).
SINGLE_FILE_MAX_BYTES = 2_000_000_000
SFT_SHARD_MAX_BYTES = 1_000_000_000
GRPO_SHARD_MAX_BYTES = 1_500_000_000


def make_checkpoint(
    directory: str | os.PathLike,
    layout: str | Layout = "tiny-qwen2",
    *,
    role: str = "target",
    seed: int = 0,
    dtype: str = "BF16",
    num_layers: int | None = None,
    max_shard_bytes: int | float | str | None = None,
    noise: NoiseScales = DEFAULT_NOISE,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Callable[[Path, int, int], None] | None = None,
) -> Path:
    """Write one synthetic checkpoint (one role of a trio) shard by shard.

    Each role's tensors are a pure function of ``(seed, name)``: the same arguments give the same bytes, and
    ``target``, ``sft`` and ``grpo`` made separately (other processes, other shardings) share one base. Memory
    peaks at about one shard plus 36 MB of scratch per thread.

    Args:
        directory (`str` or `os.PathLike`): created if missing; config, generation config and tokenizer files go
            beside the weights.
        layout (`str` or [`Layout`], defaults to `"tiny-qwen2"`): see [`get_layout`].
        role (`str`, defaults to `"target"`): one of "base", "target", "sft", "grpo".
        seed (`int`, defaults to 0): selects the base and the deltas.
        dtype (`str`, defaults to `"BF16"`): "BF16", "F16" or "F32" (aliases like "bf16", "fp16" accepted).
        num_layers (`int`, *optional*): overrides the layout's layer count.
        max_shard_bytes (`int`, `float`, `str` or `None`, defaults to `None`): shard cap (e.g. ``5e8`` or
            ``"500MB"``); `None` writes a single ``model.safetensors``.
        noise ([`NoiseScales`], defaults to [`DEFAULT_NOISE`]): value scales.
        threads (`int`, *optional*): generator threads; defaults to the CPU count (at most 8).
        overwrite (`bool`, defaults to `False`): replace an existing checkpoint in ``directory``.
        progress (`Callable[[Path, int, int], None]`, *optional*): called after each shard with the file
            written, the tensor bytes written so far and the total.

    Returns:
        `Path`: ``directory``.

    Raises:
        `FileExistsError`: ``directory`` holds safetensors files and ``overwrite`` is false.
        `ValueError` / `KeyError`: bad role, dtype, size or layout.

    Example:
        ```python
        >>> make_checkpoint("/tmp/m", "qwen2.5-0.5b", role="sft", num_layers=2, max_shard_bytes="200MB")
        PosixPath('/tmp/m')
        ```
    """
    with _CheckpointGenerator(threads) as generator:
        return generator.write_checkpoint(
            directory, layout, role, seed, dtype, num_layers, max_shard_bytes, noise, overwrite, progress
        )


class _CheckpointGenerator:
    """Generates checkpoints shard by shard with one thread pool and one reusable shard buffer.

    Every shard's tensors are views into one anonymous mapping sized for the largest shard so far (huge pages
    requested): first-touch page faults cost ~0.6 s of system time per GB on the development machine, and a fresh
    allocation per shard would pay them for every shard of every checkpoint.
    """

    def __init__(self, threads: int | None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads or min(os.cpu_count() or 1, 8), thread_name_prefix="synth")
        self._arena: torch.Tensor | None = None

    def __enter__(self) -> _CheckpointGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown()
        self._arena = None

    def _shard_buffer(self, nbytes: int) -> torch.Tensor:
        if self._arena is None or self._arena.numel() < nbytes:
            self._arena = None  # free the old mapping before making the bigger one
            mapping = mmap.mmap(-1, max(nbytes, 1))
            if hasattr(mmap, "MADV_HUGEPAGE"):
                mapping.madvise(mmap.MADV_HUGEPAGE)
            self._arena = torch.frombuffer(mapping, dtype=torch.uint8)
        return self._arena

    def write_checkpoint(
        self,
        directory: str | os.PathLike,
        layout: str | Layout,
        role: str,
        seed: int,
        dtype: str,
        num_layers: int | None,
        max_shard_bytes: int | float | str | None,
        noise: NoiseScales,
        overwrite: bool,
        progress: Callable[[Path, int, int], None] | None,
    ) -> Path:
        """Generate one checkpoint into ``directory``: the body of [`make_checkpoint`] (see it for the arguments)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        code = dtype_code(dtype)
        element_type, itemsize = torch_dtype(code), DTYPES[code].itemsize
        lay = get_layout(layout, num_layers=num_layers)
        shapes = dict(layout_tensors(lay))
        nbytes = {name: math.prod(shape) * itemsize for name, shape in shapes.items()}
        total = sum(nbytes.values())
        shards = plan_shards(list(nbytes.items()), max_shard_bytes)
        files = shard_file_names(shards)
        path = prepare_directory(directory, overwrite)
        write_side_files(path, lay, code)

        done = 0
        for names, file in zip(shards, files, strict=True):
            buffer = self._shard_buffer(sum(nbytes[name] for name in names))
            tensors: dict[str, torch.Tensor] = {}
            offset = 0
            for name in names:  # every size is a multiple of the itemsize, so every view is aligned
                tensors[name] = buffer[offset : offset + nbytes[name]].view(element_type).view(shapes[name])
                offset += nbytes[name]
            items = [item for name in names for item in tensor_chunks(name, tensors[name])]
            # list() re-raises the first worker exception here.
            list(self._pool.map(lambda it: fill_chunk(it[0], role, seed, it[1], it[2], noise), items))
            save_file(tensors, str(path / file), metadata={"format": "pt"})
            done += offset
            del tensors, items
            if progress is not None:
                progress(path / file, done, total)
        write_index(path, shards, files, total)
        return path


def _default_shard_sizes(total_bytes: int) -> tuple[int | None, int, int]:
    """Three different splits: target as one file (up to 2 GB), sft in ~3 shards, grpo in ~2 (capped)."""
    target = None if total_bytes <= SINGLE_FILE_MAX_BYTES else SINGLE_FILE_MAX_BYTES
    sft = max(1, min(SFT_SHARD_MAX_BYTES, -(-total_bytes // 3)))
    grpo = max(1, min(GRPO_SHARD_MAX_BYTES, -(-total_bytes // 2)))
    return target, sft, grpo


def make_trio(
    root: str | os.PathLike,
    layout: str | Layout = "tiny-qwen2",
    *,
    seed: int = 0,
    dtype: str = "BF16",
    num_layers: int | None = None,
    shard_sizes: tuple[int | float | str | None, int | float | str | None, int | float | str | None] | None = None,
    noise: NoiseScales = DEFAULT_NOISE,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Callable[[Path, int, int], None] | None = None,
) -> Trio:
    """Write a target, sft and grpo checkpoint that share one base, under ``root/{target,sft,grpo}``.

    ``sft = base + noise``, ``grpo = sft + smaller noise`` (the reasoning vector), ``target = base + its own noise``
    (the exact definition is in [`streammerge.synth.values`]). Checkpoints are generated one after another, tensor by
    tensor and shard by shard, so memory peaks at about one shard.

    Args:
        root (`str` or `os.PathLike`): parent directory, created if missing.
        layout (`str` or [`Layout`], defaults to `"tiny-qwen2"`): see [`get_layout`]; use [`layers_for_size`] to
            aim at a size.
        seed (`int`, defaults to 0): same seed, same bytes.
        dtype (`str`, defaults to `"BF16"`): "BF16", "F16" or "F32", for all three.
        num_layers (`int`, *optional*): overrides the layout's layer count.
        shard_sizes (`tuple` of three caps, *optional*): per checkpoint (target, sft, grpo) shard cap in bytes
            (`int`, `float` or a string like "500MB"), `None` for a single file. The default splits all three
            differently: target as one ``model.safetensors`` up to 2 GB (2 GB shards beyond), sft in shards of
            min(total/3, 1 GB), grpo in shards of min(total/2, 1.5 GB).
        noise ([`NoiseScales`], defaults to [`DEFAULT_NOISE`]): value scales.
        threads (`int`, *optional*): generator threads, defaults to the CPU count (at most 8).
        overwrite (`bool`, defaults to `False`): replace existing checkpoints.
        progress (`Callable[[Path, int, int], None]`, *optional*): called after each shard with the file written,
            the tensor bytes written so far over all three checkpoints and the total of all three.

    Returns:
        [`Trio`]: the three directories.

    Raises:
        `FileExistsError`: a checkpoint already exists there and ``overwrite`` is false.

    Example:
        ```python
        >>> trio = make_trio("/tmp/trio", "qwen2.5-1.5b", num_layers=layers_for_size("qwen2.5-1.5b", 2e9))
        >>> trio.grpo
        PosixPath('/tmp/trio/grpo')
        ```
    """
    lay = get_layout(layout, num_layers=num_layers)
    total = layout_nbytes(lay, dtype)
    caps = _default_shard_sizes(total) if shard_sizes is None else shard_sizes
    if len(caps) != 3:
        raise ValueError(f"shard_sizes needs three entries (target, sft, grpo), got {caps!r}")
    trio = Trio.under(root)
    with _CheckpointGenerator(threads) as generator:
        for i, (role, directory, cap) in enumerate(zip(("target", "sft", "grpo"), trio, caps, strict=True)):
            report = _shifted_progress(progress, i * total, 3 * total)
            generator.write_checkpoint(directory, lay, role, seed, dtype, None, cap, noise, overwrite, report)
    return trio


def _shifted_progress(
    progress: Callable[[Path, int, int], None] | None, offset: int, total: int
) -> Callable[[Path, int, int], None] | None:
    """Report one checkpoint's progress as part of a trio's."""
    if progress is None:
        return None

    def report(file: Path, done: int, _checkpoint_total: int) -> None:
        progress(file, offset + done, total)

    return report
