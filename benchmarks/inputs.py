"""Benchmark inputs: synthetic trios of a requested size, generated once and cached, and sparse 70B-layout trios.

Trios come from [`streammerge.synth`] (real Qwen2.5 / Llama-3 layouts, related like real fine-tunes, each of the
three sharded differently), scaled to a size with [`streammerge.synth.layers_for_size`]. A trio is cached under
``<workdir>/inputs/<layout>-<layers>L-<dtype>-s<seed>`` with a marker written last, so an interrupted generation
is redone rather than reused.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from streammerge import synth

# Default layout per checkpoint size (bytes, per checkpoint): the smallest real layout whose fixed part (embedding,
# lm_head) leaves room for layers. tiny-qwen2 for smoke sizes; Qwen2.5-0.5B for ~0.5 GB (272 MB embedding, ~30 MB
# per layer); Qwen2.5-1.5B for ~2 GB (16 layers); Qwen2.5-7B for larger (2.2 GB embedding + lm_head, ~466 MB per
# layer: 13 layers at 8 GB).
LAYOUT_BY_SIZE: tuple[tuple[float, str], ...] = (
    (50e6, "tiny-qwen2"),
    (1.2e9, "qwen2.5-0.5b"),
    (4e9, "qwen2.5-1.5b"),
    (float("inf"), "qwen2.5-7b"),
)
MARKER = ".bench-complete.json"
# A made checkpoint further than this from the size asked for is pointed out.
SIZE_TOLERANCE = 0.25
DTYPE = "BF16"
# Free disk to keep beyond a new trio and the outputs of one size (other work shares the disk).
DISK_HEADROOM_BYTES = 5_000_000_000


def parse_size(text: str) -> int:
    """``"0.5GB"`` -> 500000000 (decimal units as huggingface_hub; KiB/MiB/GiB binary): streammerge's own parser."""
    from streammerge.errors import OptionsError
    from streammerge.options import parse_size as parse_option_size

    try:
        return parse_option_size(text, "size")
    except OptionsError:
        raise ValueError(f"cannot read size {text!r}; use e.g. 500MB, 2GB, 8GB or 4GiB") from None


def layout_for_size(nbytes: int) -> str:
    """The default layout for a checkpoint of ``nbytes`` (see [`LAYOUT_BY_SIZE`])."""
    return next(name for limit, name in LAYOUT_BY_SIZE if nbytes < limit)


@dataclass(frozen=True)
class TrioInfo:
    """A generated trio and its sizes.

    Attributes:
        label (`str`): the size as asked for ("2GB").
        requested_bytes (`int`): that size in bytes.
        layout (`str`) / num_layers (`int`) / dtype (`str`) / seed (`int`): what was generated.
        root (`str`): the directory holding ``target/``, ``sft/`` and ``grpo/``.
        checkpoint_bytes (`int`): tensor bytes of one checkpoint (what the size means).
        bytes_in (`int`): size of every input ``.safetensors`` file, headers included (what a merge reads).
        bytes_out (`int`): size of the target's ``.safetensors`` files (what a merge writes, to a few KB).
        files (`list[str]`): every input ``.safetensors`` file.
        generation_s (`float | None`): seconds spent generating, `None` when reused from the cache.
    """

    label: str
    requested_bytes: int
    layout: str
    num_layers: int
    dtype: str
    seed: int
    root: str
    checkpoint_bytes: int
    bytes_in: int
    bytes_out: int
    files: list[str]
    generation_s: float | None

    @property
    def trio(self) -> synth.Trio:
        return synth.Trio.under(self.root)

    @property
    def bytes_moved(self) -> int:
        """Bytes read + written by a merge: the numerator of every GB/s figure."""
        return self.bytes_in + self.bytes_out

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_moved": self.bytes_moved}


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory (hidden temporaries excluded), sorted."""
    return sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("."))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_trio(workdir: Path, label: str, *, layout: str | None = None, seed: int = 0) -> TrioInfo:
    """The trio for size ``label`` ("2GB"): reused from ``workdir`` when complete, else generated.

    Args:
        workdir (`Path`): the benchmark work directory.
        label (`str`): checkpoint size, e.g. "0.5GB", "2GB", "4MB".
        layout (`str`, *optional*): a [`streammerge.synth.LAYOUTS`] name; default by size ([`layout_for_size`]).
        seed (`int`, defaults to 0): synth seed.

    Returns:
        [`TrioInfo`].

    Raises:
        `OSError`: not enough free disk for the trio.
    """
    requested = parse_size(label)
    name = layout or layout_for_size(requested)
    layers = synth.layers_for_size(name, requested, DTYPE)
    checkpoint_bytes = synth.layout_nbytes(name, DTYPE, num_layers=layers)
    root = workdir / "inputs" / f"{name}-{layers}L-{DTYPE.lower()}-s{seed}"
    marker = root / MARKER
    generation_s: float | None = None
    if not marker.exists():
        need = 3 * checkpoint_bytes + DISK_HEADROOM_BYTES
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if free < need:
            raise OSError(f"{root}: generating a {label} trio needs ~{need / 1e9:.1f} GB free, {free / 1e9:.1f} GB is")
        _log(f"generating {label} trio: {name}, {layers} layers, 3 x {checkpoint_bytes / 1e9:.2f} GB in {root}")
        t0 = time.perf_counter()
        synth.make_trio(root, name, seed=seed, dtype=DTYPE, num_layers=layers, overwrite=True)
        generation_s = time.perf_counter() - t0
        marker.write_text(json.dumps({"layout": name, "num_layers": layers, "seed": seed, "dtype": DTYPE}) + "\n")
    if abs(checkpoint_bytes - requested) > SIZE_TOLERANCE * requested:
        _log(
            f"note: {label} asked for, {checkpoint_bytes / 1e9:.3f} GB made: {name}'s fixed tensors and layer size "
            "allow no closer fit (give --layout to choose another)"
        )
    trio = synth.Trio.under(root)
    files = [f for d in trio for f in safetensors_files(d)]
    return TrioInfo(
        label=label,
        requested_bytes=requested,
        layout=name,
        num_layers=layers,
        dtype=DTYPE,
        seed=seed,
        root=str(root),
        checkpoint_bytes=checkpoint_bytes,
        bytes_in=sum(f.stat().st_size for f in files),
        bytes_out=sum(f.stat().st_size for f in safetensors_files(trio.target)),
        files=[str(f) for f in files],
        generation_s=generation_s,
    )


def sparse_trio(workdir: Path, layout: str, num_layers: int | None) -> tuple[synth.Trio, int]:
    """A sparse trio (real headers, data holes: no disk) of ``layout``, rebuilt each time (it takes milliseconds).

    Returns:
        `tuple[Trio, int]`: the directories and the apparent tensor bytes of one checkpoint.
    """
    tag = "full" if num_layers is None else f"{num_layers}L"
    root = workdir / "sparse" / f"{layout}-{tag}"
    trio = synth.make_sparse_trio(root, layout, num_layers=num_layers, overwrite=True)
    return trio, synth.layout_nbytes(layout, DTYPE, num_layers=num_layers)
