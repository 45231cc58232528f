"""Pair tensors across target, sft and grpo, apply policies, lay out the output shards and count the work.

The plan reads headers only. Everything the merge would refuse is refused here, so `plan`/`--dry-run` fails early
on exactly what the merge would fail on.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import split_state_dict_into_shards_factory

from . import __version__
from .checkpoint import SINGLE_FILE, Checkpoint, TensorRef
from .errors import TensorMismatchError, format_name_list
from .format import BLENDABLE_DTYPES, DTYPE_BITS, build_header
from .options import VOCAB_TENSOR_RE, MergeOptions


class Op(str, enum.Enum):
    MERGE = "merge"  # round(t + alpha * (g - s))
    COPY = "copy"  # the target's bytes, unchanged
    CONVERT = "convert"  # the target's values rounded to another floating dtype


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    op: Op
    target: TensorRef
    sft: TensorRef | None = None
    grpo: TensorRef | None = None
    reason: str = ""
    file: int = -1
    offset: int = 0  # absolute offset in the output file
    alpha: float = 1.0  # this tensor's alpha (the options' alpha, or a rule's)
    # MERGE only: elements [0, merge_elems) are blended, the rest come from the target (vocab common-rows); None: all
    merge_elems: int | None = None
    base: bool = True  # False when extracting a vector: there is no target term (out = round(grpo - sft))

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BITS[self.dtype] // 8

    @property
    def blended(self) -> int:
        """Elements blended (MERGE); the rest, if any, come from the target."""
        return self.numel if self.merge_elems is None else self.merge_elems

    def input_bytes(self) -> int:
        """Input bytes this tensor reads: the target's, plus the blended elements of sft and grpo."""
        if self.op is not Op.MERGE:
            return self.target.nbytes
        total = self.target.nbytes if self.base else 0
        for ref in (self.sft, self.grpo):
            if ref is not None:
                total += self.blended * DTYPE_BITS[ref.dtype] // 8
        return total

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

    kind: str
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
    warnings: list[str] = field(default_factory=list)

    @property
    def formula(self) -> str:
        f = FORMULAS[self.kind].replace("target", self.sources.get("target", "target"))
        return f.replace("alpha", repr(float(self.options.alpha)))

    @property
    def merged(self) -> int:
        return sum(1 for t in self.tensors if t.op is Op.MERGE)

    @property
    def copied(self) -> int:
        return len(self.tensors) - self.merged

    @property
    def is_sharded(self) -> bool:
        return len(self.files) > 1

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    def expected_peak_memory(self) -> int:
        """Host buffers the CPU engine allocates: a bound on anonymous memory growth, independent of model size."""
        from .engines.cpu import host_buffer_bytes

        return host_buffer_bytes(self.options.chunk_bytes, self.options.threads)

    def expected_gpu_memory(self) -> int:
        """Device buffers the CUDA engine allocates (slots x (3 inputs + 1 output) x chunk, plus fixed extras)."""
        from .engines.cuda import device_memory_bytes

        return device_memory_bytes(self.options.chunk_bytes, check_finite=self.options.check_finite)

    def index_json(self) -> str:
        weight_map = {t.name: self.files[t.file].name for t in sorted(self.tensors, key=lambda t: t.name)}
        total = sum(t.nbytes for t in self.tensors)
        return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"

    def summary(self) -> dict:
        """A JSON-friendly description: pairing counts, layout, bytes to move, disk and memory."""
        return {
            "sources": self.sources,
            "alpha": self.options.alpha,
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
            "warnings": list(self.warnings),
        }


def _shape_str(ref: TensorRef | None) -> str:
    return "absent" if ref is None else f"{ref.dtype}{list(ref.shape)}"


FORMULAS = {
    "merge": "target + alpha * (grpo - sft)",
    "vector": "grpo - sft",
    "apply": "target + alpha * vector",
}


def build_plan(
    target: Checkpoint,
    sft: Checkpoint,
    grpo: Checkpoint,
    options: MergeOptions,
    sources: dict[str, str] | None = None,
    kind: str = "merge",
) -> MergePlan:
    """Pair tensors and lay out the output. Raises `TensorMismatchError` listing every offending name.

    ``kind`` "merge" is the three-way merge; "vector" writes ``grpo - sft`` (pass grpo as ``target`` too: its
    non-floating tensors are copied); "apply" adds a stored vector (pass the vector as ``sft`` and ``grpo``)."""
    sources = sources or {"target": target.source, "sft": sft.source, "grpo": grpo.source}
    missing: list[str] = []
    shape_bad: list[str] = []
    unsupported: list[str] = []
    out: list[OutTensor] = []
    reasons: dict[str, int] = {}

    def copy(ref: TensorRef, reason: str) -> None:
        if kind == "vector" and ref.dtype.startswith(("F", "BF", "C")):
            # A vector holds differences: copying grpo's own weights in would be added to every target by apply.
            # Leave the tensor out; `apply --missing copy-target` then keeps the target's values for it.
            skipped.append(ref.name)
            return
        op, dtype = Op.COPY, ref.dtype
        if options.out_dtype and ref.dtype in BLENDABLE_DTYPES and options.out_dtype != ref.dtype:
            op, dtype = Op.CONVERT, options.out_dtype
        out.append(OutTensor(ref.name, dtype, ref.shape, op, ref, reason=reason))
        reasons[reason] = reasons.get(reason, 0) + 1

    # Target order by (file, offset): reading the target is sequential, and sft/grpo saved by the same library
    # follow the same order.
    rules = options.rules
    skipped: list[str] = []
    rule_hits = {r.describe(): 0 for r in rules}
    vocab_re = re.compile(VOCAB_TENSOR_RE)
    vocab_bad: list[str] = []
    for ref in sorted(target.tensors.values(), key=lambda r: (r.file, r.offset)):
        s, g = sft.tensors.get(ref.name), grpo.tensors.get(ref.name)
        alpha = options.alpha
        rule = next((r for r in rules if re.search(r.pattern, ref.name)), None)
        if rule is not None:
            rule_hits[rule.describe()] += 1
            if rule.action == "skip":
                skipped.append(ref.name)
                continue
            if rule.action == "copy-target":
                copy(ref, f"rule {rule.describe()}")
                continue
            alpha = rule.alpha  # type: ignore[assignment]
        is_float = ref.dtype.startswith(("F", "BF", "C"))
        if not is_float:
            copy(ref, f"non-floating ({ref.dtype})")
            continue
        if s is None or g is None:
            where = " and ".join(k for k, v in (("sft", s), ("grpo", g)) if v is None)
            if options.missing == "copy-target":
                copy(ref, "missing in sft/grpo")
            else:
                missing.append(f"{ref.name} (absent from {where})")
            continue
        merge_elems = None
        if (
            ref.shape != s.shape
            and s.shape == g.shape
            and len(ref.shape) >= 1
            and ref.shape[1:] == s.shape[1:]
            and vocab_re.search(ref.name)
        ):
            # Resized vocabulary: the row counts differ, everything else agrees.
            if options.vocab_mismatch == "copy-target":
                copy(ref, "vocab mismatch")
                continue
            if options.vocab_mismatch == "error":
                vocab_bad.append(f"{ref.name}: target {_shape_str(ref)}, sft/grpo {_shape_str(s)}")
                continue
            row = 1
            for d in ref.shape[1:]:
                row *= d
            merge_elems = min(ref.shape[0], s.shape[0]) * row
        elif not (ref.shape == s.shape == g.shape):
            if options.shape_mismatch == "copy-target":
                copy(ref, "shape mismatch")
            else:
                shape_bad.append(f"{ref.name}: target {_shape_str(ref)}, sft {_shape_str(s)}, grpo {_shape_str(g)}")
            continue
        bad = [
            f"{k} {r.dtype}" for k, r in (("target", ref), ("sft", s), ("grpo", g)) if r.dtype not in BLENDABLE_DTYPES
        ]
        if bad:
            if options.unsupported_dtype == "copy-target":
                copy(ref, "unsupported dtype")
            else:
                unsupported.append(f"{ref.name} ({', '.join(bad)})")
            continue
        out.append(
            OutTensor(
                ref.name,
                options.out_dtype or ref.dtype,
                ref.shape,
                Op.MERGE,
                ref,
                None if kind == "apply" else s,
                g,
                alpha=1.0 if kind == "vector" else alpha,
                merge_elems=merge_elems,
                base=kind != "vector",
            )
        )

    extra = sorted((set(sft.tensors) | set(grpo.tensors)) - set(target.tensors))
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} target tensor(s) missing from sft/grpo: {format_name_list(missing)}. "
            "Pass --missing copy-target to keep the target's values for them"
        )
    if extra and options.extra == "error":
        problems.append(
            f"{len(extra)} sft/grpo tensor(s) absent from the target: {format_name_list(extra)}. "
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
            f"{len(unsupported)} tensor(s) in a floating dtype that cannot be blended exactly (only BF16, F16, F32): "
            f"{format_name_list(unsupported)}. Pass --unsupported-dtype copy-target to keep the target's values"
        )
    if problems:
        raise TensorMismatchError(
            f"cannot pair target {sources['target']} with sft {sources['sft']} and grpo {sources['grpo']}:\n  - "
            + "\n  - ".join(problems)
        )

    files = _layout(out, options, sources, kind)
    bytes_read = 0
    chunks = 0
    for t in out:
        if t.op is Op.MERGE:
            bytes_read += t.input_bytes()
            chunks += max(1, -(-t.numel // options.chunk_elems))
        else:
            bytes_read += t.target.nbytes
            step = options.chunk_bytes if t.op is Op.COPY else options.chunk_elems * DTYPE_BITS[t.dtype] // 8
            chunks += max(1, -(-t.nbytes // max(1, step)))
    bytes_written = sum(f.size for f in files)
    aux = target.aux_files() if options.copy_aux_files else []
    plan = MergePlan(
        kind=kind,
        options=options,
        sources=sources,
        files=files,
        tensors=[t for f in files for t in f.tensors],
        copied_reasons=reasons,
        ignored_extra=extra,
        rule_hits=rule_hits,
        skipped=skipped,
        aux_files=aux,
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        disk_needed=0,
        chunks=chunks,
    )
    index_size = len(plan.index_json()) if plan.is_sharded else 0
    # + the model card and the manifest, a few KB
    plan.disk_needed = bytes_written + index_size + sum(p.stat().st_size for p in aux) + 65536
    return plan


def _printable(path: str) -> str:
    """A source path as valid UTF-8 for the header metadata (undecodable bytes become backslash escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _layout(out: list[OutTensor], options: MergeOptions, sources: dict[str, str], kind: str) -> list[OutFile]:
    split = split_state_dict_into_shards_factory(
        {t.name: t for t in out},
        get_storage_size=lambda t: t.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=options.max_shard_size,
    )
    by_name = {t.name: t for t in out}
    metadata = {
        "format": "pt",
        "streammerge_version": __version__,
        "streammerge_formula": FORMULAS[kind],
        **({} if kind == "vector" else {"streammerge_alpha": repr(float(options.alpha))}),
        **({"streammerge_rules": "; ".join(r.describe() for r in options.rules)} if options.rules else {}),
        "streammerge_target": _printable(sources["target"]),
        "streammerge_sft": _printable(sources["sft"]),
        "streammerge_grpo": _printable(sources["grpo"]),
        **({"streammerge_out_dtype": options.out_dtype} if options.out_dtype else {}),
        **options.extra_metadata,
    }
    files: list[OutFile] = []
    names = list(split.filename_to_tensors) if split.is_sharded else [SINGLE_FILE]
    for i, fname in enumerate(names):
        members = [by_name[n] for n in split.filename_to_tensors[fname]] if split.is_sharded else list(out)
        # Widest dtypes first keeps every tensor aligned to its element size (as safetensors itself does); the
        # sort is stable, so a single-dtype model keeps the target's order.
        members.sort(key=lambda t: -DTYPE_BITS[t.dtype])
        header, spans = build_header([(t.name, t.dtype, t.shape) for t in members], metadata)
        for t in members:
            t.file = i
            t.offset = len(header) + spans[t.name][0]
        size = len(header) + sum(t.nbytes for t in members)
        files.append(OutFile(fname, header, size, members))
    return files


def check_disk_space(plan: MergePlan, out_dir: Path) -> None:
    """Add a warning to the plan when the output filesystem has less free space than the output needs."""
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    plan.free_disk = free  # type: ignore[attr-defined]
    if free < plan.disk_needed:
        plan.warnings.append(
            f"only {free / 1e9:.2f} GB free on the filesystem of {out_dir}, "
            f"the output needs {plan.disk_needed / 1e9:.2f} GB"
        )
