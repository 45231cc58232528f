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

from .budget import DEFAULT_DEVICE_SLOTS, device_memory_bytes, host_buffer_bytes
from .checkpoint import SINGLE_FILE, Checkpoint, TensorRef
from .dtypes import BLENDABLE_DTYPES, DTYPE_BITS
from .errors import TensorMismatchError, format_name_list
from .format import build_header
from .options import VOCAB_TENSOR_RE, MergeOptions
from .version import __version__


class Op(str, enum.Enum):
    MERGE = "merge"  # round(t + alpha * (g - s))
    COPY = "copy"  # the target's bytes, unchanged
    CONVERT = "convert"  # the target's values rounded to another floating dtype


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

    @property
    def outputs_differ(self) -> bool:
        """Whether the outputs of a sweep get different values for this tensor (else one result is written to all)."""
        return any(len(set(term.alphas)) > 1 for term in self.terms)

    def alphas_for(self, k: int) -> list[float]:
        """Each vector's alpha for output ``k``."""
        return [term.alphas[k] for term in self.terms]

    def inputs(self, op: Op | None = None) -> list[tuple[str, TensorRef]]:
        """(role, tensor) read by a chunk of ``op`` (this tensor's op by default): the target (CONVERT, COPY, or MERGE
        unless extracting a vector), then each vector's plus and minus tensors (MERGE)."""
        op = op or self.op
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
        """Input bytes this tensor reads: the target's, plus the blended elements of every vector's tensors."""
        if self.op is not Op.MERGE:
            return self.target.nbytes
        total = self.target.nbytes if self.base else 0
        for term in self.terms:
            for _, ref in term.refs():
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
        return len(self.tensors) - self.merged

    @property
    def is_sharded(self) -> bool:
        return len(self.files) > 1

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    def expected_peak_memory(self) -> int:
        """Host buffers the CPU engine allocates: a bound on anonymous memory growth, independent of model size."""
        return host_buffer_bytes(self.options.chunk_bytes, self.options.threads, self.outputs, self.max_vectors)

    def expected_gpu_memory(self) -> int:
        """Device buffers the CUDA engine allocates (slots x (inputs + outputs) x chunk, plus fixed extras)."""
        o = self.options
        inputs = max([len(t.inputs()) for t in self.tensors if t.op is Op.MERGE] or [3])
        return device_memory_bytes(
            o.chunk_bytes, o.gpu_slots or DEFAULT_DEVICE_SLOTS, o.check_finite, inputs=inputs, outputs=self.outputs
        )

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
    each vector's own rules. The three-way merge, extract and apply are the one-vector cases (:func:`build_plan`)."""
    missing: list[str] = []
    shape_bad: list[str] = []
    unsupported: list[str] = []
    out: list[OutTensor] = []
    reasons: dict[str, int] = {}
    skipped: list[str] = []

    def copy(ref: TensorRef, reason: str) -> None:
        if kind is PlanKind.VECTOR and ref.dtype.startswith(("F", "BF", "C")):
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
        # Every vector's tensors: (role, ref or None)
        pairs = []
        for v in vectors:
            if v.minus is not None:
                pairs.append((v.minus_role, v.minus.tensors.get(ref.name)))
            pairs.append((v.plus_role, v.plus.tensors.get(ref.name)))
        absent = [role for role, r in pairs if r is None]
        if absent:
            if options.missing == "copy-target":
                copy(ref, "missing in a vector" if many else "missing in sft/grpo")
            else:
                missing.append(f"{ref.name} (absent from {' and '.join(absent)})")
            continue
        merge_elems = None
        shapes = {r.shape for _, r in pairs}
        if shapes != {ref.shape}:
            per_vector_equal = all(
                v.minus is None or v.plus.tensors[ref.name].shape == v.minus.tensors[ref.name].shape for v in vectors
            )
            if (
                per_vector_equal
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
        bad = [f"{k} {r.dtype}" for k, r in [("target", ref), *pairs] if r.dtype not in BLENDABLE_DTYPES]
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
        out.append(
            OutTensor(
                ref.name,
                options.out_dtype or ref.dtype,
                ref.shape,
                Op.MERGE,
                ref,
                tuple(terms),
                merge_elems=merge_elems,
                base=kind is not PlanKind.VECTOR,
            )
        )

    vector_names: set[str] = set()
    for v in vectors:
        vector_names |= set(v.plus.tensors) | (set(v.minus.tensors) if v.minus is not None else set())
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
            f"{len(unsupported)} tensor(s) in a floating dtype that cannot be blended exactly (only BF16, F16, F32): "
            f"{format_name_list(unsupported)}. Pass --unsupported-dtype copy-target to keep the target's values"
        )
    if problems:
        if kind is PlanKind.COMBINE:
            withs = ", ".join(f"{k} {v}" for k, v in sources.items() if k != "target")
            head = f"cannot pair target {sources['target']} with {withs}"
        else:
            head = f"cannot pair target {sources['target']} with sft {sources['sft']} and grpo {sources['grpo']}"
        raise TensorMismatchError(head + ":\n  - " + "\n  - ".join(problems))

    described = []
    for v in vectors:
        d = {"grpo": v.plus_role, "sft": v.minus_role} if v.minus is not None else {"vector": v.plus_role}
        d["alpha"] = float(v.alpha)
        if v.rules:
            d["rules"] = [r.describe() for r in v.rules]
        described.append(d)
    files = _layout(out, options, sources, kind, described)
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
        vectors=described,
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
            members.append(dataclasses.replace(t, terms=terms))
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
    split = split_state_dict_into_shards_factory(
        {t.name: t for t in out},
        get_storage_size=lambda t: t.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=options.max_shard_size,
    )
    by_name = {t.name: t for t in out}
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
