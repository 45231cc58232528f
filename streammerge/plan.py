"""Pair tensors across target, sft and grpo, apply policies, lay out the output shards and count the work.

The plan reads headers only. Everything the merge would refuse is refused here, so `plan`/`--dry-run` fails early
on exactly what the merge would fail on.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import split_state_dict_into_shards_factory

from .budget import DEFAULT_DEVICE_SLOTS, FP8_SUB_BLOCK_ELEMS, device_memory_bytes, host_buffer_bytes
from .checkpoint import SINGLE_FILE, Checkpoint, TensorRef, TensorSource
from .dtypes import BLENDABLE_DTYPES, BLOCK_FP8_DTYPES, DTYPE_BITS, FP8_OUT_DTYPE, FP8_SCALE_DTYPES
from .errors import CheckpointError, OptionsError, TensorMismatchError, format_name_list
from .format import build_header
from .options import VOCAB_TENSOR_RE, MergeOptions
from .version import __version__


class Op(str, enum.Enum):
    MERGE = "merge"  # round(t + alpha * (g - s))
    COPY = "copy"  # the target's bytes, unchanged
    CONVERT = "convert"  # the target's values rounded to another floating dtype
    SCALE = "scale"  # the block scales of the FP8 weight before it: computed with that weight, written after it


# A block-scaled FP8 weight W is stored with its scales in a tensor named W + SCALE_SUFFIX ("fine-grained FP8").
SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class BlockScale:
    """One input's block scales of an FP8 weight: the ``W_scale_inv`` tensor (in any file of that checkpoint) and
    the block (rows, columns) each of its elements scales."""

    ref: TensorRef
    block: tuple[int, int]


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale shape of a ``[rows, cols]`` weight in ``block`` blocks: ``[ceil(rows / br), ceil(cols / bc)]``."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


@dataclass(frozen=True)
class Fp8Weights:
    """The block-scaled FP8 weights of one checkpoint, found and checked from its headers and config.json.

    Attributes:
        scales (`dict[str, BlockScale]`): FP8 weight name -> its scales.
        block (`tuple[int, int] | None`): the checkpoint's block (rows, columns); None without FP8 weights.
        block_from (`str`): "config.json" (``quantization_config.weight_block_size``) or "shapes" (inferred).
        quantization_config (`bool`): its config.json has a ``quantization_config`` (FP8 weights present).
    """

    scales: dict[str, BlockScale] = field(default_factory=dict)
    block: tuple[int, int] | None = None
    block_from: str = ""
    quantization_config: bool = False
    # the scale tensors' names: parts of their weights' units, never tensors of their own (a set, looked up per
    # tensor of every input)
    scale_names: frozenset[str] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_names", frozenset(s.ref.name for s in self.scales.values()))


class ChunkSizeError(OptionsError):
    """The chunk size cannot hold one band of an FP8 tensor (or an FP8 output's block scales); ``chunk_bytes`` is
    the smallest that would."""

    def __init__(self, message: str, chunk_bytes: int):
        super().__init__(message)
        self.chunk_bytes = chunk_bytes


def _block_text(block: tuple[int, int] | None) -> str:
    return f"{block[0]}x{block[1]}" if block else "-"


def _read_config(ck: TensorSource) -> tuple[dict | None, Path | None]:
    """The checkpoint's config.json as a dict (None: there is none), and its path."""
    path = next((p for p in ck.aux_files() if p.name == "config.json"), None)
    if path is None:
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: cannot read it as JSON ({e}); the block size of the checkpoint's FP8 weights comes from its "
            "quantization_config"
        ) from None
    return (data if isinstance(data, dict) else None), path


def _config_block(config: dict | None, path: Path | None) -> tuple[int, int] | None:
    qc = config.get("quantization_config") if config else None
    if not isinstance(qc, dict) or qc.get("weight_block_size") is None:
        return None
    wbs = qc["weight_block_size"]
    if (
        not (
            isinstance(wbs, list) and len(wbs) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in wbs)
        )
        or min(wbs) < 1
    ):
        raise CheckpointError(
            f"{path}: quantization_config.weight_block_size is {wbs!r}; expected two positive integers, e.g. [128, 128]"
        )
    return wbs[0], wbs[1]


def _block_range(n: int, g: int) -> tuple[int, float]:
    """Block sizes b with ``ceil(n / b) == g``: ``[lo, hi]`` (hi infinite when g is 1; lo > hi: none)."""
    if n == 0:
        return (1, math.inf) if g == 0 else (1, 0)
    if g < 1:
        return 1, 0
    return -(-n // g), ((n - 1) // (g - 1) if g > 1 else math.inf)


def _infer_block(ck: TensorSource, pairs: list[tuple[TensorRef, TensorRef]], config: Path | None) -> tuple[int, int]:
    """The one block size every FP8 weight's scale shape allows; an error naming the tensors where none or several
    fit (several that cut some tensor differently: blocks wider than every tensor cut them all alike)."""
    where = f"{ck.label + ' checkpoint ' if ck.label else ''}{ck.source}"
    fix = f"add quantization_config.weight_block_size (e.g. [128, 128]) to {config or 'its config.json'}"
    block = []
    for axis, name in ((0, "rows"), (1, "columns")):
        lo, hi, first = 1, math.inf, None
        for w, s in pairs:
            a, b = _block_range(w.shape[axis], s.shape[axis])
            if max(lo, a) > min(hi, b):
                what = "no block size gives" if a > b else "no block size fits both it and the other weights, with"
                raise CheckpointError(
                    f"{where}: cannot tell the FP8 block size from the shapes: {what} scale {s.name} "
                    f"{list(s.shape)} for {w.name} {list(w.shape)} (in {ck.files[s.file]}); {fix}"
                )
            lo, hi = max(lo, a), min(hi, b)
            first = first or w
        if hi != lo and hi != math.inf:
            raise CheckpointError(
                f"{where}: cannot tell the FP8 block size from the shapes: blocks of {lo} to {int(hi)} {name} fit "
                f"every scale shape (e.g. {first.name if first else '?'}), and they cut the weights differently; {fix}"
            )
        block.append(lo)
    return block[0], block[1]


def fp8_weights(ck: TensorSource) -> Fp8Weights:
    """Find the block-scaled FP8 weights of ``ck`` with their scales, and the block size: config.json's
    ``quantization_config.weight_block_size``, else inferred from the shapes where only one size fits.

    Raises:
        [`CheckpointError`]: naming the file and tensors: an FP8 weight that is not 2-D or has no scale tensor, a
            scale that is not a 2-D F32/BF16 tensor or whose shape disagrees with the block size, a block size that
            config.json does not give and the shapes do not tell.
    """
    weights = sorted((r for r in ck.tensors.values() if r.dtype in BLOCK_FP8_DTYPES), key=lambda r: (r.file, r.offset))
    if not weights:
        return Fp8Weights()
    who = f"{ck.label} checkpoint " if ck.label else ""
    not_2d, no_scale, bad_scale = [], [], []
    pairs = []
    for w in weights:
        s = ck.tensors.get(w.name + SCALE_SUFFIX)
        if len(w.shape) != 2:
            not_2d.append(f"{w.name} {w.dtype}{list(w.shape)} in {ck.files[w.file]}")
        elif s is None:
            no_scale.append(f"{w.name} (in {ck.files[w.file]}) has no {w.name + SCALE_SUFFIX}")
        elif s.dtype not in FP8_SCALE_DTYPES or len(s.shape) != 2:
            bad_scale.append(f"{s.name} {s.dtype}{list(s.shape)} in {ck.files[s.file]}")
        else:
            pairs.append((w, s))
    problems = []
    if not_2d:
        problems.append(f"{len(not_2d)} FP8 tensor(s) not 2-D (blocks tile matrices): {format_name_list(not_2d)}")
    if no_scale:
        problems.append(f"{len(no_scale)} FP8 weight(s) without their block scales: {format_name_list(no_scale)}")
    if bad_scale:
        problems.append(
            f"{len(bad_scale)} block scale tensor(s) not a 2-D F32 or BF16 tensor: {format_name_list(bad_scale)}"
        )
    if problems:
        raise CheckpointError(
            f"{who}{ck.source}: malformed block-scaled FP8 weights (each F8 weight W needs W{SCALE_SUFFIX}, F32 or "
            "BF16, one scale per block):\n  - " + "\n  - ".join(problems)
        )
    config, path = _read_config(ck)
    block = _config_block(config, path)
    if block is None:
        block, source = _infer_block(ck, pairs, path), "shapes"
    else:
        source = "config.json"
        wrong = [
            f"{s.name} {list(s.shape)} for {w.name} {list(w.shape)} (in {ck.files[s.file]}; "
            f"{_block_text(block)} blocks need {list(scale_grid(w.shape, block))})"
            for w, s in pairs
            if tuple(s.shape) != scale_grid(w.shape, block)
        ]
        if wrong:
            raise CheckpointError(
                f"{path}: quantization_config.weight_block_size {list(block)} disagrees with {len(wrong)} scale "
                f"shape(s) of {who}{ck.source}: {format_name_list(wrong)}"
            )
    quantized = isinstance(config, dict) and isinstance(config.get("quantization_config"), dict)
    return Fp8Weights({w.name: BlockScale(s, block) for w, s in pairs}, block, source, quantized)


def granule(scales: dict[str, BlockScale], block: tuple[int, int] | None = None) -> tuple[int, int]:
    """Rows and columns on which every block grid of a tensor's FP8 inputs (and its output ``block``) lines up:
    the least common multiples of their block sizes (the block itself when every grid is the same)."""
    blocks = [s.block for s in scales.values()] + ([block] if block else [])
    return math.lcm(*(b[0] for b in blocks)), math.lcm(*(b[1] for b in blocks))


def fp8_sub_block(t: OutTensor) -> tuple[int, int]:
    """Rows and columns of the sub-blocks the CPU engine computes an FP8 tensor's chunks in: whole granules (see
    :func:`granule`), about ``FP8_SUB_BLOCK_ELEMS`` elements, never more rows than a chunk holds."""
    gr, gc = granule(t.scales, t.block)
    rows, cols = t.shape
    rows_up = max(gr, -(-rows // gr) * gr)
    if gr * cols <= FP8_SUB_BLOCK_ELEMS:
        return min(t.band_rows, rows_up, gr * max(1, FP8_SUB_BLOCK_ELEMS // max(1, gr * cols))), cols
    return gr, min(cols, gc * max(1, FP8_SUB_BLOCK_ELEMS // (gr * gc)))


def fp8_device_buffers(tensors: list[OutTensor]) -> tuple[int, bool, int]:
    """What the CUDA engine's FP8 path holds per device slot beside its plain buffers (budget.device_memory_bytes):
    the most FP8 inputs of one band chunk (each dequantized to a float32 band, with its scale rows), whether some
    output is FP8 (a float32 r, and a band's new scale rows per output), and the largest scale rows of one band in
    bytes, of any input or output."""
    inputs, out, scale_bytes = 0, False, 0
    for t in tensors:
        if not t.band_rows:
            continue
        rows = min(t.band_rows, t.shape[0])
        grids = [(s.block[0], s.ref.shape[1], s.ref.dtype) for s in t.scales.values()]
        if t.fp8_out and t.scale_out is not None and t.block is not None:
            out = True
            grids.append((t.block[0], t.scale_out.shape[1], t.scale_out.dtype))
        inputs = max(inputs, len(t.scales))
        for br, cols, dtype in grids:
            scale_bytes = max(scale_bytes, -(-rows // br) * cols * DTYPE_BITS[dtype] // 8)
    return inputs, out, scale_bytes


@dataclass(frozen=True)
class Term:
    """One vector of a merge, ``alphas[k] * (plus - minus)`` for output ``k``.

    ``plus``/``minus`` are checkpoint roles ("grpo"/"sft" in the three-way merge, "grpo1"/"sft1", "vector2", ... in a
    many-vector spec); ``minus`` is None for a stored vector (``apply``). ``alphas`` has one entry per output: one,
    or one per alpha of a sweep."""

    plus: str
    plus_ref: TensorRef
    minus: str | None
    minus_ref: TensorRef | None
    alphas: tuple[float, ...]

    def refs(self) -> list[tuple[str, TensorRef]]:
        return [(self.plus, self.plus_ref)] + ([(self.minus, self.minus_ref)] if self.minus_ref is not None else [])


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    op: Op
    target: TensorRef
    # MERGE only: the vectors, added left to right (docs/numerics.md, "Many vectors")
    terms: tuple[Term, ...] = ()
    reason: str = ""
    file: int = -1
    offset: int = 0  # absolute offset in the output file
    # MERGE only: elements [0, merge_elems) are blended, the rest come from the target (vocab common-rows); None: all
    merge_elems: int | None = None
    base: bool = True  # False when extracting a vector: there is no target term (out = round(grpo - sft))
    # Block-scaled FP8 (docs/numerics.md): role -> the block scales of that input, for every FP8 tensor this one
    # reads; such a tensor is chunked in whole bands of ``band_rows`` rows (0: plain element chunks).
    scales: dict[str, BlockScale] = field(default_factory=dict)
    band_rows: int = 0
    # The output tensor of this weight's block scales, right after it in the same file: the new scales of an FP8
    # output (op SCALE), or the target's, copied with it (COPY). ``block``: the output's block grid (FP8 output).
    scale_out: OutTensor | None = None
    block: tuple[int, int] | None = None

    @property
    def outputs_differ(self) -> bool:
        """Whether the outputs of a sweep get different values for this tensor (else one result is written to all)."""
        return any(len(set(term.alphas)) > 1 for term in self.terms)

    def alphas_for(self, k: int) -> list[float]:
        """Each vector's alpha for output ``k``."""
        return [term.alphas[k] for term in self.terms]

    @property
    def fp8_out(self) -> bool:
        """Whether this output tensor is block-scaled FP8 written anew (its scales in ``scale_out``)."""
        return self.op is Op.MERGE and self.scale_out is not None

    def inputs(self, op: Op | None = None) -> list[tuple[str, TensorRef]]:
        """(role, tensor) read by a chunk of ``op`` (this tensor's op by default): the target (CONVERT, COPY, or MERGE
        unless extracting a vector), then each vector's plus and minus tensors (MERGE). An FP8 input's block scales
        are in ``scales`` (by role); a SCALE tensor reads nothing of its own (its weight reads them)."""
        op = op or self.op
        if op is Op.SCALE:
            return []
        if op is not Op.MERGE:
            return [("target", self.target)]
        out = [("target", self.target)] if self.base else []
        for term in self.terms:
            out += term.refs()
        return out

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BITS[self.dtype] // 8

    @property
    def blended(self) -> int:
        """Elements blended (MERGE); the rest, if any, come from the target."""
        return self.numel if self.merge_elems is None else self.merge_elems

    def input_bytes(self) -> int:
        """Input bytes this tensor reads: the target's, plus the blended elements of every vector's tensors, plus
        the block scales of its FP8 inputs."""
        scales = sum(s.ref.nbytes for s in self.scales.values())
        if self.op is Op.SCALE:
            return 0
        if self.op is not Op.MERGE:
            return self.target.nbytes + scales
        total = self.target.nbytes if self.base else 0
        for term in self.terms:
            for _, ref in term.refs():
                total += self.blended * DTYPE_BITS[ref.dtype] // 8
        return total + scales

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class OutFile:
    name: str
    header: bytes
    size: int
    tensors: list[OutTensor]


@dataclass
class MergePlan:
    """What a merge will do, computed from headers only.

    Attributes:
        files (`list[OutFile]`): output files with their exact headers and sizes.
        tensors (`list[OutTensor]`): every output tensor in write order.
        merged / copied (`int`): tensors blended / taken from the target (by reason in ``copied_reasons``).
        ignored_extra (`list[str]`): sft/grpo tensors absent from the target, ignored by ``extra="ignore"``.
        bytes_read / bytes_written (`int`): input bytes read, output bytes written (headers included).
        disk_needed (`int`): bytes the output directory needs (weights, index, copied files).
        expected_peak_memory (`int`): the engine's buffers (host), from the chunk size.
    """

    kind: PlanKind
    options: MergeOptions
    sources: dict[str, str]
    files: list[OutFile]
    tensors: list[OutTensor]
    copied_reasons: dict[str, int]
    ignored_extra: list[str]
    rule_hits: dict[str, int]
    skipped: list[str]
    aux_files: list[Path]
    bytes_read: int
    bytes_written: int
    disk_needed: int
    chunks: int
    # free bytes on the output filesystem, when check_disk_space looked (None: not looked, or unknown)
    free_disk: int | None = None
    warnings: list[str] = field(default_factory=list)
    # the vectors added to the target: role names, sources and alpha (a description; the per-tensor truth is in terms)
    vectors: list[dict] = field(default_factory=list)
    # an alpha sweep: one single-alpha plan per output (their headers record their own alpha); empty otherwise
    variants: list[MergePlan] = field(default_factory=list)
    # block-scaled FP8 facts: "inputs" (role -> block, where it came from, FP8 weights), "target_quantized"
    fp8: dict = field(default_factory=dict)
    # with --stream: the shard schedule's summary (stream.Schedule.summary), set by whoever scheduled it
    stream: dict = field(default_factory=dict)

    @property
    def outputs(self) -> int:
        """Outputs this plan writes in one pass: 1, or one per alpha of a sweep."""
        return max(1, len(self.variants))

    @property
    def max_vectors(self) -> int:
        """The most vectors any tensor adds (1 for the three-way merge)."""
        return max([len(t.terms) for t in self.tensors] or [1])

    @property
    def formula(self) -> str:
        if self.kind is PlanKind.COMBINE:
            parts = [self.sources.get("target", "target")]
            for v in self.vectors:
                diff = v["vector"] if "vector" in v else f"{v['grpo']} - {v['sft']}"
                parts.append(f"{v['alpha']!r} * ({diff})")
            return " + ".join(parts)
        f = FORMULAS[self.kind].replace("target", self.sources.get("target", "target"))
        return f if self.variants else f.replace("alpha", repr(float(self.options.alpha)))

    @property
    def merged(self) -> int:
        return sum(1 for t in self.tensors if t.op is Op.MERGE)

    @property
    def copied(self) -> int:
        """Tensors copied or converted from the target (an FP8 weight's new scales are neither)."""
        return sum(1 for t in self.tensors if t.op in (Op.COPY, Op.CONVERT))

    @property
    def fp8_tensors(self) -> list[OutTensor]:
        """Output tensors computed from block-scaled FP8 inputs (merged, or converted to a plain dtype)."""
        return [t for t in self.tensors if t.scales]

    @property
    def scales_written(self) -> int:
        """Block-scale tensors of the output: new ones (FP8 output) and copied ones."""
        return sum(1 for t in self.tensors if t.scale_out is not None)

    @property
    def fp8_sub_elems(self) -> int:
        """Elements of one FP8 sub-block (a band's rows by whole columns of blocks): the CPU engine's FP8 scratch
        buffers hold this many, 0 without FP8 tensors (budget.fp8_scratch_bytes)."""
        return max([fp8_sub_block(t)[0] * fp8_sub_block(t)[1] for t in self.fp8_tensors] or [0])

    @property
    def max_scale_bytes(self) -> int:
        """The largest block-scale tensor an FP8 output holds in memory until its weight's last band is done."""
        return max([t.scale_out.nbytes for t in self.tensors if t.fp8_out and t.scale_out] or [0])

    @property
    def drops_quantization_config(self) -> bool:
        """Whether the copied config.json loses its ``quantization_config``: the target is block-scaled FP8 and the
        output holds no FP8 tensor (dequantized with ``out_dtype``, or a vector), so transformers loads it plain."""
        return bool(self.fp8.get("target_quantized")) and not any(t.dtype in BLOCK_FP8_DTYPES for t in self.tensors)

    @property
    def is_sharded(self) -> bool:
        return len(self.files) > 1

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    def expected_peak_memory(self) -> int:
        """Host buffers the CPU engine allocates: a bound on anonymous memory growth, independent of model size."""
        return host_buffer_bytes(
            self.options.chunk_bytes,
            self.options.threads,
            self.outputs,
            self.max_vectors,
            fp8_sub_elems=self.fp8_sub_elems,
            scale_bytes=self.max_scale_bytes,
        )

    def expected_gpu_memory(self) -> int:
        """Device buffers the CUDA engine allocates (slots x (inputs + outputs) x chunk, plus fixed extras)."""
        o = self.options
        inputs = max([len(t.inputs()) for t in self.tensors if t.op is Op.MERGE] or [3])
        fp8_inputs, fp8_out, scale_bytes = fp8_device_buffers(self.tensors)
        return device_memory_bytes(
            o.chunk_bytes,
            o.gpu_slots or DEFAULT_DEVICE_SLOTS,
            o.check_finite,
            inputs=inputs,
            outputs=self.outputs,
            fp8_inputs=fp8_inputs,
            fp8_out=fp8_out,
            fp8_scale_bytes=scale_bytes,
        )

    def fp8_summary(self) -> dict:
        """The block-scaled FP8 side of the plan: weights read, each input's block and where it came from, and the
        output format (empty when no input holds FP8 weights)."""
        if not self.fp8.get("inputs"):
            return {}
        fp8_out = [t for t in self.tensors if t.fp8_out]
        plain = sorted({t.dtype for t in self.fp8_tensors if not t.fp8_out})
        if fp8_out:
            scale_dtypes = sorted({t.scale_out.dtype for t in fp8_out if t.scale_out is not None})
            output = f"{FP8_OUT_DTYPE} with {'/'.join(scale_dtypes)} block scales {_block_text(fp8_out[0].block)}"
            if plain:
                output += f"; dequantized to {'/'.join(plain)} where the target is not FP8"
        else:
            output = f"dequantized to {'/'.join(plain)}" if plain else "no FP8 tensor is computed"
        return {
            "tensors": len(self.fp8_tensors),
            "fp8_out": len(fp8_out),
            "scales_written": self.scales_written,
            "inputs": self.fp8["inputs"],
            "output": output,
            "quantization_config": "removed"
            if self.drops_quantization_config
            else "kept"
            if self.fp8.get("target_quantized")
            else "none",
        }

    def index_json(self) -> str:
        weight_map = {t.name: self.files[t.file].name for t in sorted(self.tensors, key=lambda t: t.name)}
        total = sum(t.nbytes for t in self.tensors)
        return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"

    def summary(self) -> dict:
        """A JSON-friendly description: pairing counts, layout, bytes to move, disk and memory."""
        return {
            "sources": self.sources,
            "formula": self.formula,
            "alpha": [v.options.alpha for v in self.variants]
            if self.variants
            else None
            if self.kind is PlanKind.COMBINE
            else self.options.alpha,
            "outputs": self.outputs,
            **({"vectors": list(self.vectors)} if self.kind is PlanKind.COMBINE else {}),
            "tensors": len(self.tensors),
            "parameters": self.parameters,
            "merged": self.merged,
            "copied": self.copied,
            "copied_reasons": dict(self.copied_reasons),
            "ignored_extra": len(self.ignored_extra),
            "rule_hits": dict(self.rule_hits),
            "skipped": len(self.skipped),
            "output_files": [{"name": f.name, "bytes": f.size, "tensors": len(f.tensors)} for f in self.files],
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "disk_needed": self.disk_needed,
            "chunk_bytes": self.options.chunk_bytes,
            "chunks": self.chunks,
            "expected_peak_host_memory": self.expected_peak_memory(),
            "expected_gpu_memory": self.expected_gpu_memory(),
            **({"fp8": fp8} if (fp8 := self.fp8_summary()) else {}),
            **({"stream": dict(self.stream)} if self.stream else {}),
            "warnings": list(self.warnings),
        }


def _shape_str(ref: TensorRef | None) -> str:
    return "absent" if ref is None else f"{ref.dtype}{list(ref.shape)}"


class PlanKind(str, enum.Enum):
    """What a plan computes. The value is what manifests record as ``options.kind`` (a str: JSON and comparisons with
    manifest text work unchanged)."""

    MERGE = "merge"  # target + alpha * (grpo - sft)
    VECTOR = "vector"  # grpo - sft (extract)
    APPLY = "apply"  # target + alpha * vector (a stored vector)
    COMBINE = "combine"  # target + sum_i alpha_i * (grpo_i - sft_i)

    def __str__(self) -> str:
        return self.value


FORMULAS = {
    PlanKind.MERGE: "target + alpha * (grpo - sft)",
    PlanKind.VECTOR: "grpo - sft",
    PlanKind.APPLY: "target + alpha * vector",
    PlanKind.COMBINE: "target + sum_i alpha_i * (grpo_i - sft_i)",
}


@dataclass
class VectorInput:
    """One vector to add to the target: ``alpha * (plus - minus)``; ``minus`` None for a stored vector.

    ``rules`` are this vector's own ``REGEX=ALPHA`` rules (a many-vector spec); the first match sets its alpha for
    that tensor."""

    plus_role: str
    plus: Checkpoint
    minus_role: str | None
    minus: Checkpoint | None
    alpha: float
    rules: tuple = ()


def build_plan(
    target: Checkpoint,
    sft: Checkpoint | None,
    grpo: Checkpoint,
    options: MergeOptions,
    sources: dict[str, str] | None = None,
    kind: PlanKind = PlanKind.MERGE,
) -> MergePlan:
    """Pair tensors and lay out the output. Raises `TensorMismatchError` listing every offending name.

    ``kind`` "merge" is the three-way merge; "vector" writes ``grpo - sft`` (pass grpo as ``target`` too: its
    non-floating tensors are copied); "apply" adds a stored vector (pass the vector as ``grpo``; ``sft`` is not
    read)."""
    sources = sources or {"target": target.source, "sft": sft.source, "grpo": grpo.source}  # type: ignore[union-attr]
    minus = None if kind is PlanKind.APPLY else sft
    vec = VectorInput(
        "grpo", grpo, None if minus is None else "sft", minus, 1.0 if kind is PlanKind.VECTOR else options.alpha
    )
    return build_vector_plan(target, [vec], options, sources, kind)


def build_vector_plan(
    target: Checkpoint,
    vectors: list[VectorInput],
    options: MergeOptions,
    sources: dict[str, str],
    kind: PlanKind = PlanKind.COMBINE,
) -> MergePlan:
    """Pair every target tensor with each vector's tensors and lay out ``target + sum_i alpha_i * (plus_i - minus_i)``.

    ``options.rules`` apply first (skip, copy-target, or an alpha that every vector takes for those tensors); then
    each vector's own rules. The three-way merge, extract and apply are the one-vector cases (:func:`build_plan`).

    A block-scaled FP8 weight and its ``_scale_inv`` scales are one unit (docs/numerics.md): rules, policies and
    pairing see the weight's name only, a scale may lie in any file of its checkpoint, and an input without FP8
    weights needs no scales. The output is FP8 (e4m3fn, the target's block grid and scale dtype, the new scales
    right after the weight) where the target's tensor is FP8 and ``out_dtype`` is not given, else dequantized."""
    missing: list[str] = []
    shape_bad: list[str] = []
    unsupported: list[str] = []
    e5m2_targets: list[str] = []
    chunk_short: list[tuple[str, int]] = []
    out: list[OutTensor] = []
    reasons: dict[str, int] = {}
    skipped: list[str] = []
    # Each checkpoint's FP8 weights and scales, found once (extract passes one checkpoint in two roles).
    found: dict[int, Fp8Weights] = {}

    def fp8_of(ck: TensorSource) -> Fp8Weights:
        if id(ck) not in found:
            found[id(ck)] = fp8_weights(ck)
        return found[id(ck)]

    t_fp8 = fp8_of(target)

    def lookup(ck: TensorSource, name: str) -> TensorRef | None:
        """A tensor of ``ck`` by name, where a scale of one of its FP8 weights is not a tensor of its own."""
        return None if name in fp8_of(ck).scale_names else ck.tensors.get(name)

    def banding(name: str, shape: tuple[int, ...], scales: dict[str, BlockScale], block) -> int:
        """Rows per chunk of an FP8 tensor: whole bands of every grid's block rows, the band's float32 within the
        chunk (else the tensor is noted with the chunk size that would fit)."""
        granule_rows, _ = granule(scales, block)
        cols = shape[1]
        bands = options.chunk_elems // max(1, granule_rows * cols)
        if bands < 1:
            chunk_short.append((name, granule_rows * cols * 4))
            return granule_rows
        return granule_rows * bands

    def copy(ref: TensorRef, reason: str) -> None:
        if kind is PlanKind.VECTOR and ref.dtype.startswith(("F", "BF", "C")):
            # A vector holds differences: copying grpo's own weights in would be added to every target by apply.
            # Leave the tensor out; `apply --missing copy-target` then keeps the target's values for it.
            skipped.append(ref.name)
            return
        scale = t_fp8.scales.get(ref.name)
        op, dtype = Op.COPY, ref.dtype
        if options.out_dtype and ref.dtype in BLENDABLE_DTYPES and options.out_dtype != ref.dtype:
            op, dtype = Op.CONVERT, options.out_dtype
        if scale is not None and options.out_dtype:
            # An FP8 unit in a plain output: dequantized, one rounding (its scales are not written).
            t = OutTensor(ref.name, options.out_dtype, ref.shape, Op.CONVERT, ref, reason=reason)
            t.scales = {"target": scale}
            t.band_rows = banding(ref.name, ref.shape, t.scales, None)
            out.append(t)
        elif scale is not None:  # the weight and its scales, copied together
            s = scale.ref
            t = OutTensor(ref.name, ref.dtype, ref.shape, Op.COPY, ref, reason=reason)
            t.scale_out = OutTensor(s.name, s.dtype, s.shape, Op.COPY, s, reason=reason)
            out.append(t)
            reasons[reason] = reasons.get(reason, 0) + 1
        else:
            out.append(OutTensor(ref.name, dtype, ref.shape, op, ref, reason=reason))
        reasons[reason] = reasons.get(reason, 0) + 1

    # Target order by (file, offset): reading the target is sequential, and sft/grpo saved by the same library
    # follow the same order.
    rules = options.rules
    rule_hits = {r.describe(): 0 for r in rules}
    many = len(vectors) > 1
    vec_rule_key = [
        [
            f"{v.plus_role if v.minus_role is None else v.minus_role + '/' + v.plus_role}: {r.describe()}"
            for r in v.rules
        ]
        for v in vectors
    ]
    for keys in vec_rule_key:
        rule_hits.update({k: 0 for k in keys})
    vocab_re = re.compile(VOCAB_TENSOR_RE)
    vocab_bad: list[str] = []
    for ref in sorted(target.tensors.values(), key=lambda r: (r.file, r.offset)):
        if ref.name in t_fp8.scale_names:
            continue  # part of its FP8 weight's unit, planned with the weight
        forced_alpha: float | None = None
        rule = next((r for r in rules if re.search(r.pattern, ref.name)), None)
        if rule is not None:
            rule_hits[rule.describe()] += 1
            if rule.action == "skip":
                skipped.append(ref.name)
                continue
            if rule.action == "copy-target":
                copy(ref, f"rule {rule.describe()}")
                continue
            forced_alpha = rule.alpha
        is_float = ref.dtype.startswith(("F", "BF", "C"))
        if not is_float:
            copy(ref, f"non-floating ({ref.dtype})")
            continue
        # Every vector's tensors: (role, ref or None), and the checkpoint each comes from
        pairs = []
        owners = []
        for v in vectors:
            if v.minus is not None:
                pairs.append((v.minus_role, lookup(v.minus, ref.name)))
                owners.append(v.minus)
            pairs.append((v.plus_role, lookup(v.plus, ref.name)))
            owners.append(v.plus)
        absent = [role for role, r in pairs if r is None]
        if absent:
            if options.missing == "copy-target":
                copy(ref, "missing in a vector" if many else "missing in sft/grpo")
            else:
                missing.append(f"{ref.name} (absent from {' and '.join(absent)})")
            continue
        # role -> block scales of each FP8 input (the target's too, where it is read)
        scales = {
            role: fp8_of(ck).scales[r.name] for (role, r), ck in zip(pairs, owners) if r.name in fp8_of(ck).scales
        }
        if ref.name in t_fp8.scales:
            scales = {"target": t_fp8.scales[ref.name], **scales}
        merge_elems = None
        shapes = {r.shape for _, r in pairs}
        if shapes != {ref.shape}:
            per_vector_equal = all(
                v.minus is None or v.plus.tensors[ref.name].shape == v.minus.tensors[ref.name].shape for v in vectors
            )
            if (
                per_vector_equal
                and not scales  # FP8 rows come in blocks: an FP8 tensor takes the shape-mismatch policy
                and len(ref.shape) >= 1
                and all(len(sh) == len(ref.shape) and sh[1:] == ref.shape[1:] for sh in shapes)
                and vocab_re.search(ref.name)
            ):
                # Resized vocabulary: the row counts differ, everything else agrees.
                if options.vocab_mismatch == "copy-target":
                    copy(ref, "vocab mismatch")
                    continue
                if options.vocab_mismatch == "error":
                    vs = ", ".join(f"{role} {_shape_str(r)}" for role, r in pairs)
                    if not many and len(pairs) == 2:
                        vs = f"sft/grpo {_shape_str(pairs[1][1])}"
                    vocab_bad.append(f"{ref.name}: target {_shape_str(ref)}, {vs}")
                    continue
                row = math.prod(ref.shape[1:])
                merge_elems = min([ref.shape[0]] + [sh[0] for sh in shapes]) * row
            else:
                if options.shape_mismatch == "copy-target":
                    copy(ref, "shape mismatch")
                else:
                    vs = ", ".join(f"{role} {_shape_str(r)}" for role, r in pairs)
                    shape_bad.append(f"{ref.name}: target {_shape_str(ref)}, {vs}")
                continue
        bad = [
            f"{k} {r.dtype}"
            for k, r in [("target", ref), *pairs]
            if r.dtype not in BLENDABLE_DTYPES and not (r.dtype in BLOCK_FP8_DTYPES and k in scales)
        ]
        if bad:
            if options.unsupported_dtype == "copy-target":
                copy(ref, "unsupported dtype")
            else:
                unsupported.append(f"{ref.name} ({', '.join(bad)})")
            continue
        terms = []
        for v, keys in zip(vectors, vec_rule_key):
            alpha = v.alpha
            if forced_alpha is not None:
                alpha = forced_alpha
            else:
                j = next((j for j, r in enumerate(v.rules) if re.search(r.pattern, ref.name)), None)
                if j is not None:
                    rule_hits[keys[j]] += 1
                    alpha = v.rules[j].alpha
            if kind is PlanKind.VECTOR:
                alpha = 1.0
            minus_ref = v.minus.tensors[ref.name] if v.minus is not None else None
            terms.append(Term(v.plus_role, v.plus.tensors[ref.name], v.minus_role, minus_ref, (float(alpha),)))
        base = kind is not PlanKind.VECTOR
        if not base:
            scales.pop("target", None)  # extracting a vector reads no target term
        fp8_out = base and ref.name in t_fp8.scales and not options.out_dtype
        dtype = options.out_dtype or (FP8_OUT_DTYPE if fp8_out else ref.dtype)
        t = OutTensor(ref.name, dtype, ref.shape, Op.MERGE, ref, tuple(terms), merge_elems=merge_elems, base=base)
        if fp8_out:
            if ref.dtype != FP8_OUT_DTYPE:
                e5m2_targets.append(f"{ref.name} ({ref.dtype})")
                continue
            ts = t_fp8.scales[ref.name]
            t.block = ts.block
            t.scale_out = OutTensor(ts.ref.name, ts.ref.dtype, ts.ref.shape, Op.SCALE, ts.ref)
            if t.scale_out.nbytes > options.chunk_bytes:
                chunk_short.append((ts.ref.name, t.scale_out.nbytes))
        if scales:
            t.scales = scales
            t.band_rows = banding(ref.name, ref.shape, scales, t.block)
        out.append(t)

    vector_names: set[str] = set()
    for v in vectors:
        for ck in (v.plus, v.minus):
            if ck is not None:
                vector_names |= set(ck.tensors) - fp8_of(ck).scale_names
    extra = sorted(vector_names - set(target.tensors))
    who = "a vector" if many else "sft/grpo"
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} target tensor(s) missing from {who}: {format_name_list(missing)}. "
            "Pass --missing copy-target to keep the target's values for them"
        )
    if extra and options.extra == "error":
        problems.append(
            f"{len(extra)} {who} tensor(s) absent from the target: {format_name_list(extra)}. "
            "Pass --extra ignore to leave them out"
        )
    if shape_bad:
        problems.append(
            f"{len(shape_bad)} shape mismatch(es): {format_name_list(shape_bad)}. "
            "The checkpoints are probably not of one architecture; pass --shape-mismatch copy-target to keep the "
            "target's values for them"
        )
    if vocab_bad:
        problems.append(
            f"{len(vocab_bad)} vocabulary size mismatch(es) (resized tokenizer?): {format_name_list(vocab_bad)}. "
            "Pass --vocab-mismatch common-rows to blend the shared rows and keep the target's others, or "
            "--vocab-mismatch copy-target"
        )
    unmatched = [k for k, v in rule_hits.items() if v == 0]
    if unmatched:
        problems.append(
            f"rule(s) matching no target tensor: {format_name_list(unmatched)} (patterns are Python regular "
            "expressions searched anywhere in the name)"
        )
    if unsupported:
        problems.append(
            f"{len(unsupported)} tensor(s) in a floating dtype that cannot be blended exactly (only BF16, F16, F32, "
            f"and block-scaled FP8 with its scales): {format_name_list(unsupported)}. Pass --unsupported-dtype "
            "copy-target to keep the target's values"
        )
    if e5m2_targets:
        problems.append(
            f"{len(e5m2_targets)} FP8 target tensor(s) not in e4m3fn: {format_name_list(e5m2_targets)}. FP8 output "
            "is written in F8_E4M3 only; pass --out-dtype bf16, fp16 or fp32 for a dequantized output"
        )
    if problems:
        if kind is PlanKind.COMBINE:
            withs = ", ".join(f"{k} {v}" for k, v in sources.items() if k != "target")
            head = f"cannot pair target {sources['target']} with {withs}"
        else:
            head = f"cannot pair target {sources['target']} with sft {sources['sft']} and grpo {sources['grpo']}"
        raise TensorMismatchError(head + ":\n  - " + "\n  - ".join(problems))
    if chunk_short:
        need = max(n for _, n in chunk_short)
        suggest = -(-need // 2**20)
        raise ChunkSizeError(
            f"--chunk-size {options.chunk_bytes} bytes is too small for {len(chunk_short)} block-scaled FP8 "
            f"tensor(s): {format_name_list([f'{n} ({b} bytes)' for n, b in chunk_short])}. A chunk holds whole bands "
            f"of block rows in float32 (and an FP8 output's block scales); pass --chunk-size {suggest}MiB or more",
            need,
        )

    described = []
    for v in vectors:
        d = {"grpo": v.plus_role, "sft": v.minus_role} if v.minus is not None else {"vector": v.plus_role}
        d["alpha"] = float(v.alpha)
        if v.rules:
            d["rules"] = [r.describe() for r in v.rules]
        described.append(d)
    files = _layout(out, options, sources, kind, described)
    tensors = [t for f in files for t in f.tensors]
    bytes_read = 0
    chunks = 0
    for t in tensors:
        bytes_read += t.input_bytes()
        if t.op is Op.SCALE:
            continue
        if t.band_rows:
            chunks += max(1, -(-t.shape[0] // t.band_rows))
        elif t.op is Op.MERGE:
            chunks += max(1, -(-t.numel // options.chunk_elems))
        else:
            step = options.chunk_bytes if t.op is Op.COPY else options.chunk_elems * DTYPE_BITS[t.dtype] // 8
            chunks += max(1, -(-t.nbytes // max(1, step)))
    bytes_written = sum(f.size for f in files)
    aux = target.aux_files() if options.copy_aux_files else []
    roles = {"target": target}
    for v in vectors:
        roles[v.plus_role] = v.plus
        if v.minus is not None and v.minus_role is not None:
            roles[v.minus_role] = v.minus
    fp8 = {
        "inputs": {
            role: {"block": list(w.block), "from": w.block_from, "weights": len(w.scales)}
            for role, ck in roles.items()
            if (w := fp8_of(ck)).block is not None
        },
        "target_quantized": t_fp8.quantization_config,
    }
    plan = MergePlan(
        kind=kind,
        options=options,
        sources=sources,
        files=files,
        tensors=tensors,
        copied_reasons=reasons,
        ignored_extra=extra,
        rule_hits=rule_hits,
        skipped=skipped,
        aux_files=aux,
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        disk_needed=0,
        chunks=chunks,
        vectors=described,
        fp8=fp8 if fp8["inputs"] or fp8["target_quantized"] else {},
    )
    index_size = len(plan.index_json()) if plan.is_sharded else 0
    # + the model card and the manifest, a few KB
    plan.disk_needed = bytes_written + index_size + sum(p.stat().st_size for p in aux) + 65536
    return plan


def sweep_plan(plans: list[MergePlan]) -> MergePlan:
    """One pass that writes every plan's output: ``plans`` differ only in alpha (one per output), so they pair the
    same tensors into the same layout; the result reads each input once and gives each tensor one alpha per output.

    Offsets are the first plan's; a writer adds each output's header-size difference (headers record the alpha)."""
    first = plans[0]
    files = []
    for i, f in enumerate(first.files):
        members = []
        for j, t in enumerate(f.tensors):
            others = [p.files[i].tensors[j] for p in plans]
            if any((o.name, o.op, o.dtype, len(o.terms)) != (t.name, t.op, t.dtype, len(t.terms)) for o in others):
                raise TensorMismatchError(f"internal error: sweep plans disagree at {f.name}:{t.name}")
            terms = tuple(
                dataclasses.replace(term, alphas=tuple(o.terms[n].alphas[0] for o in others))
                for n, term in enumerate(t.terms)
            )
            # a SCALE tensor is written by its weight's chunks, which keep pointing at this one (``scale_out``)
            members.append(t if t.op is Op.SCALE else dataclasses.replace(t, terms=terms))
        files.append(OutFile(f.name, f.header, f.size, members))
    return dataclasses.replace(
        first,
        files=files,
        tensors=[t for f in files for t in f.tensors],
        bytes_written=sum(p.bytes_written for p in plans),
        disk_needed=sum(p.disk_needed for p in plans),
        variants=list(plans),
    )


def printable(path: str) -> str:
    """A source path as valid UTF-8 for the header metadata (undecodable bytes become backslash escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _layout(
    out: list[OutTensor], options: MergeOptions, sources: dict[str, str], kind: PlanKind, vectors: list[dict]
) -> list[OutFile]:
    # An FP8 weight and its block scales are one unit: one shard holds both, the scales right after the weight, so
    # an engine writes (and hashes) the scales in offset order once the weight's last band is done.
    units = {t.name: [t] + ([t.scale_out] if t.scale_out is not None else []) for t in out}
    split = split_state_dict_into_shards_factory(
        units,
        get_storage_size=lambda unit: sum(t.nbytes for t in unit),
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=options.max_shard_size,
    )
    if kind is PlanKind.COMBINE:
        described = [
            {k: (v if k in ("alpha", "rules") else printable(sources[v])) for k, v in d.items()} for d in vectors
        ]
        specific = {
            "streammerge_vectors": json.dumps(described, ensure_ascii=False),
            **({"streammerge_rules": "; ".join(r.describe() for r in options.rules)} if options.rules else {}),
            "streammerge_target": printable(sources["target"]),
        }
    else:
        specific = {
            **({} if kind is PlanKind.VECTOR else {"streammerge_alpha": repr(float(options.alpha))}),
            **({"streammerge_rules": "; ".join(r.describe() for r in options.rules)} if options.rules else {}),
            "streammerge_target": printable(sources["target"]),
            "streammerge_sft": printable(sources["sft"]),
            "streammerge_grpo": printable(sources["grpo"]),
        }
    metadata = {
        "format": "pt",
        "streammerge_version": __version__,
        "streammerge_formula": FORMULAS[kind],
        **specific,
        **({"streammerge_out_dtype": options.out_dtype} if options.out_dtype else {}),
        **options.extra_metadata,
    }
    files: list[OutFile] = []
    names = list(split.filename_to_tensors) if split.is_sharded else [SINGLE_FILE]
    for i, fname in enumerate(names):
        grouped = [units[n] for n in split.filename_to_tensors[fname]] if split.is_sharded else list(units.values())
        # Widest dtypes first keeps every tensor aligned to its element size (as safetensors itself does); the
        # sort is stable, so a single-dtype model keeps the target's order.
        grouped.sort(key=lambda unit: -_alignment_bits(unit))
        members = [t for unit in grouped for t in unit]
        header, spans = build_header([(t.name, t.dtype, t.shape) for t in members], metadata)
        for t in members:
            t.file = i
            t.offset = len(header) + spans[t.name][0]
        size = len(header) + sum(t.nbytes for t in members)
        files.append(OutFile(fname, header, size, members))
    return files


def _alignment_bits(unit: list[OutTensor]) -> int:
    """The element width a unit of the layout keeps aligned: a tensor's own; for an FP8 weight (1 byte) with its
    scales after it, the scales' width where the weight's bytes keep them aligned (DeepSeek's always do), else 8."""
    head, *rest = unit
    if not rest:
        return DTYPE_BITS[head.dtype]
    width = DTYPE_BITS[rest[0].dtype]
    return width if head.nbytes * 8 % width == 0 else DTYPE_BITS[head.dtype]


def check_disk_space(plan: MergePlan, out_dir: Path) -> None:
    """Record the output filesystem's free space in the plan, with a warning when it is less than the output needs."""
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    plan.free_disk = free
    if free < plan.disk_needed:
        plan.warnings.append(
            f"only {free / 1e9:.2f} GB free on the filesystem of {out_dir}, "
            f"the output needs {plan.disk_needed / 1e9:.2f} GB"
        )
