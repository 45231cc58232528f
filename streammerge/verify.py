"""Verify a streammerge output: structure, recorded checksums, and (given the inputs) recomputed bytes."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import recipes
from .budget import SUB_BLOCK_ELEMS
from .checkpoint import Checkpoint
from .dtypes import DTYPE_BITS, torch_dtype
from .engines import Progress
from .errors import StreamMergeError
from .format import read_header
from .options import MergeOptions
from .plan import ChunkSizeError, Op, PlanKind
from .sources import close_all
from .writer import STATE_COMPLETE, read_manifest, sha256_file


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`. ``ok`` is False when anything is wrong; ``problems[0]`` is the first."""

    out_dir: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0
    bytes_hashed: int = 0
    chunks_checked: int = 0
    chunks_total: int = 0

    def fail(self, msg: str) -> None:
        self.ok = False
        self.problems.append(msg)


def verify(
    out: str | os.PathLike,
    target: str | os.PathLike | None = None,
    sft: str | os.PathLike | None = None,
    grpo: str | os.PathLike | None = None,
    *,
    vector: str | os.PathLike | None = None,
    spec=None,
    full: bool = False,
    sample: int = 64,
    seed: int = 0,
    progress: Callable[[Progress], None] | None = None,
) -> VerifyReport:
    """Check a merge output.

    Always: the manifest says the merge completed; every weight file exists with its recorded size and SHA-256; the
    headers parse; index, files and headers agree. Given the inputs the output was made from, the layout equals the
    one those inputs and the recorded options produce, and ``sample`` random chunks (all of them with ``full=True``)
    are recomputed on the CPU and compared byte for byte. Which inputs, by what made the output (its manifest says):
    merge: ``target``, ``sft``, ``grpo``; apply: ``target``, ``vector``; extract: ``sft``, ``grpo``; combine:
    ``spec``.

    Args:
        out (`str | os.PathLike`): the output directory.
        target, sft, grpo, vector (`str | os.PathLike`, *optional*): the inputs (see above), or none.
        spec (*optional*): for an output of `combine`, its spec (file, mapping or `Spec`).
        full (`bool`): recompute every chunk.
        sample (`int`): chunks to recompute when not ``full``.
        seed (`int`): which chunks are sampled.
        progress (*optional*): called with a `Progress` as the work advances: phase "hash" (bytes of the output
            files hashed; ``tensors_*`` count files), then phase "recompute" (output bytes recomputed and compared;
            ``tensors_*`` count chunks).

    Returns:
        [`VerifyReport`]: ``ok`` and the problems found (the first names the bad tensor and file).
    """
    out_dir = Path(out)
    report = VerifyReport(str(out_dir))
    if sample < 0:
        raise StreamMergeError(f"verify: --sample must be 0 or more, got {sample}")
    given = {k for k, v in (("target", target), ("sft", sft), ("grpo", grpo), ("vector", vector)) if v is not None}
    if spec is not None and given:
        raise StreamMergeError("verify: give --spec (a combine output) or the input checkpoints, not both")
    if not out_dir.is_dir():
        raise StreamMergeError(f"{out_dir}: not a directory")
    manifest = read_manifest(out_dir)
    if manifest is None:
        swept = sorted(p.name for p in out_dir.glob("alpha-*") if (p / ".streammerge.json").exists())
        if swept:
            raise StreamMergeError(
                f"{out_dir}: the root of an alpha sweep; verify each output: {', '.join(swept[:6])}"
                + (" ..." if len(swept) > 6 else "")
            )
        raise StreamMergeError(f"{out_dir}: no streammerge manifest (.streammerge.json); not a streammerge output")
    kind = manifest.get("options", {}).get("kind", "merge")
    if given or spec is not None:
        _check_inputs_for(out_dir, kind, given, spec is not None)
    if manifest.get("state") != STATE_COMPLETE:
        report.fail(
            f"{out_dir}: the merge did not complete (state {manifest.get('state')!r}); run it again with --resume"
        )
    shards = manifest.get("shards", {})
    sizes = [r.get("size") for r in shards.values() if isinstance(r, dict)]
    tick = _Ticker(progress, "hash", sum(n for n in sizes if isinstance(n, int)), len(shards))
    for name, rec in shards.items():
        path = out_dir / name
        if path.is_symlink() or not path.is_file():
            report.fail(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != rec.get("size"):
            report.fail(f"{path}: {size} bytes, the manifest records {rec.get('size')}")
            continue
        try:
            read_header(path)
        except StreamMergeError as e:
            report.fail(str(e))
            continue
        digest = sha256_file(path, tick.add)
        tick.item_done(name)
        report.bytes_hashed += size
        report.files_checked += 1
        if digest != rec.get("sha256"):
            report.fail(f"{path}: SHA-256 {digest[:16]}... differs from the recorded {str(rec.get('sha256'))[:16]}...")
    if not report.ok:
        return report
    try:
        with Checkpoint(out_dir, label="output") as ck:
            on_disk = {f.name for f in ck.files}
    except StreamMergeError as e:
        report.fail(str(e))
        return report
    if on_disk != set(shards):
        report.fail(f"{out_dir}: weight files {sorted(on_disk)} differ from the manifest's {sorted(shards)}")
        return report
    if given or spec is not None:
        inputs = {"target": target, "sft": sft, "grpo": grpo, "vector": vector}
        _recompute(out_dir, manifest, inputs, full, sample, seed, report, spec, progress)
    return report


# What recomputes each kind of output (the manifest's options.kind), and how the CLI names it.
_INPUTS_FOR = {
    "merge": ({"target", "sft", "grpo"}, "--target, --sft and --grpo"),
    "apply": ({"target", "vector"}, "--target and --vector"),
    "vector": ({"sft", "grpo"}, "--sft and --grpo"),
    "combine": (set(), "--spec"),
}


def _check_inputs_for(out_dir: Path, kind: str, given: set[str], has_spec: bool) -> None:
    want, how = _INPUTS_FOR.get(kind, (None, None))
    what = {"vector": "an extract", "apply": "an apply", "combine": "a combine"}.get(kind, f"a {kind}")
    if want is None:
        raise StreamMergeError(f"{out_dir}: an output of kind {kind!r}, which this version cannot recompute")
    if (kind == "combine") != has_spec or (kind != "combine" and given != want):
        raise StreamMergeError(f"{out_dir}: {what} output; to recompute it give {how}")


def _recompute(
    out_dir: Path,
    manifest: dict,
    inputs: dict,
    full: bool,
    sample: int,
    seed: int,
    report: VerifyReport,
    spec=None,
    progress: Callable[[Progress], None] | None = None,
) -> None:
    import torch  # recomputing needs the engine's math; checking checksums alone does not

    from .engines import EngineStats
    from .engines.cpu import CpuEngine, Fp8Scratch, iter_work
    from .engines.work import scale_rows

    o = manifest.get("options", {})
    kind = o.get("kind", "merge")
    opts = MergeOptions.from_identity(o, chunk_bytes="4MiB")  # small chunks: a sample costs little to read
    outs: dict[int, Checkpoint] = {}
    sources = manifest.get("sources")

    def planned(opts: MergeOptions):
        if spec is not None:
            from .spec import load_spec

            return recipes.combine(load_spec(spec), opts)
        if kind == PlanKind.APPLY:
            # The vector is the one given: any difference from the one used shows as a layout or byte mismatch.
            vec = inputs["vector"]
            return recipes.apply(inputs["target"], vec, [opts.alpha], opts, any_vector=True, sources=sources)
        if kind == PlanKind.VECTOR:
            return recipes.extract(inputs["sft"], inputs["grpo"], opts, sources=sources)
        return recipes.trio(inputs["target"], inputs["sft"], inputs["grpo"], opts, sources=sources)

    try:
        job = planned(opts)
    except ChunkSizeError as e:  # an FP8 band wider than the small chunk: its bytes do not depend on the chunk
        opts = opts.replace(chunk_bytes=e.chunk_bytes)
        job = planned(opts)
    plan, ckpts = job.plan, job.inputs
    try:
        for i, f in enumerate(plan.files):
            path = out_dir / f.name
            if not path.is_file():
                report.fail(f"{path}: these inputs and options produce {f.name}, which is missing")
                return
            with open(path, "rb") as fh:
                if fh.read(len(f.header)) != f.header or os.fstat(fh.fileno()).st_size != f.size:
                    report.fail(f"{path}: header or size differs from what these inputs and options produce")
                    return
            outs[i] = Checkpoint(path, label="output")
        total = sum(1 for _ in iter_work(plan))  # a generator: no list of every chunk is kept
        report.chunks_total = total
        chosen = None if full or sample >= total else set(random.Random(seed).sample(range(total), sample))
        items = (it for k, it in enumerate(iter_work(plan)) if chosen is None or k in chosen)
        if progress is not None:  # the work list is computed from headers: a second pass to size the bar is cheap
            work = (it for k, it in enumerate(iter_work(plan)) if chosen is None or k in chosen)
            picked = [_out_bytes(it) for it in work if it.tensor is not None and it.stop > it.start]
            tick = _Ticker(progress, "recompute", sum(picked), len(picked))
        else:
            tick = _Ticker(None, "recompute", 0, 0)
        buf = torch.empty(opts.chunk_bytes, dtype=torch.uint8)
        sub = min(SUB_BLOCK_ELEMS, opts.chunk_elems)
        scratch = [(torch.empty(sub), torch.empty(sub), torch.empty(sub))]
        fp8_scratch = [Fp8Scratch.allocate(plan.fp8_sub_elems)] if plan.fp8_sub_elems else None
        stats = EngineStats(device="cpu")
        for item in items:
            t = item.tensor
            if t is None or item.stop == item.start:
                continue
            out_ck = outs[t.file]
            ref = out_ck.tensors[t.name]
            new_scales = None
            if item.op is Op.COPY:
                a, b = item.start, item.stop
                want = ckpts["target"].view(t.target, a, b)
            else:
                if t.fp8_out and t.scale_out is not None:  # this band's new block scales, compared beside its codes
                    g0, g1 = scale_rows(t, item)
                    new_scales = torch.empty((g1 - g0, t.scale_out.shape[1]), dtype=torch_dtype(t.scale_out.dtype))
                bands = [new_scales] if new_scales is not None else None
                CpuEngine.compute_chunk(t, item, ckpts, [buf], scratch, opts, stats, None, bands, fp8_scratch)
                isz = DTYPE_BITS[t.dtype] // 8
                a, b = item.start * isz, item.stop * isz
                want = buf[: b - a]
            got = out_ck.view(ref, a, b)
            report.chunks_checked += 1
            tick.add(b - a)
            tick.item_done(t.name)
            same = torch.equal(want, got)
            del want, got
            out_ck.release(ref, a, b)  # keep resident memory flat on a --full pass over a 70B output
            if new_scales is not None and same and t.scale_out is not None:
                s_ref = out_ck.tensors[t.scale_out.name]
                row = t.scale_out.shape[1] * DTYPE_BITS[t.scale_out.dtype] // 8
                got_scales = out_ck.view(s_ref, g0 * row, g1 * row)
                same = torch.equal(new_scales.view(-1).view(torch.uint8), got_scales)
                del got_scales
            for label, r in t.inputs(item.op):
                if r is not None:
                    isz_in = DTYPE_BITS[r.dtype] // 8
                    lo, hi = (a, b) if item.op is Op.COPY else (item.start * isz_in, item.stop * isz_in)
                    if hi <= r.nbytes:
                        ckpts[label].release(r, lo, hi)
            if not same:
                unit = "bytes" if item.op is Op.COPY else "elements"
                report.fail(
                    f"{out_dir / plan.files[t.file].name}: tensor {t.name!r} differs from what its inputs recompute to "
                    f"(in {unit} [{item.start}, {item.stop}))"
                )
                return
    finally:
        job.close()
        close_all(outs.values())


def _out_bytes(item) -> int:
    """Output bytes a work item covers (a COPY's range is in bytes, the others' in elements)."""
    n = item.stop - item.start
    return n if item.op is Op.COPY else n * (DTYPE_BITS[item.tensor.dtype] // 8)


class _Ticker:
    """Progress events for one phase of verify: at each item's end, and about every 64 MiB within one."""

    def __init__(self, progress: Callable[[Progress], None] | None, phase: str, total_bytes: int, total_items: int):
        self.progress = progress
        self.phase = phase
        self.total_bytes = total_bytes
        self.total_items = total_items
        self.done_bytes = 0
        self.done_items = 0
        self._last = 0

    def add(self, n: int) -> None:
        self.done_bytes += n
        if self.progress is not None and self.done_bytes - self._last >= 64 << 20:
            self._emit("")

    def item_done(self, name: str) -> None:
        self.done_items += 1
        if self.progress is not None:
            self._emit(name)

    def _emit(self, name: str) -> None:
        self._last = self.done_bytes
        self.progress(  # type: ignore[misc]
            Progress(self.done_bytes, self.total_bytes, self.done_items, self.total_items, name, self.phase)
        )
