"""The library entry points: :func:`plan` and :func:`merge`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .checkpoint import Checkpoint, open_checkpoint
from .engines import EngineStats, Progress
from .errors import CheckpointError, EngineError, OptionsError, OutputError, StreamMergeError
from .faults import crash_point
from .memory import available_memory
from .options import MergeOptions
from .plan import (
    FORMULAS,
    MergePlan,
    VectorInput,
    _printable,
    build_plan,
    build_vector_plan,
    check_disk_space,
    sweep_plan,
)
from .spec import Spec, load_spec
from .version import __version__
from .writer import MANIFEST, NullWriter, OutputWriter, SweepWriter, read_manifest, remove_output

ProgressCallback = Callable[[Progress], None]


@dataclass
class MergeReport:
    """What a merge did and measured.

    Attributes:
        out_dir (`str`): the output directory.
        device (`str`): the engine that ran ("cpu" or "cuda").
        tensors_merged / tensors_copied (`int`): blended tensors / tensors taken from the target.
        copied_reasons (`dict[str, int]`): why tensors were copied (non-floating, policies).
        bytes_read / bytes_written (`int`): input bytes read and output bytes written.
        seconds (`float`): wall time of the whole merge, planning included.
        gbps (`float`): (bytes_read + bytes_written) / seconds / 1e9.
        peak_rss_anon (`int`): peak anonymous resident memory of the process during the merge (bytes).
        peak_gpu_memory (`int`): peak GPU allocation (bytes, 0 on the CPU engine).
        output_files (`list[str]`): the files written, weights first.
        nonfinite (`dict[str, int]`): with ``check_finite``, elements per tensor that became NaN/inf from finite
            inputs.
        shard_sha256 (`dict[str, str]`): SHA-256 of every weight file (also in the manifest).
        resumed_shards (`int`): shards kept from an interrupted run (``resume=True``).
    """

    out_dir: str
    device: str
    tensors_merged: int
    tensors_copied: int
    copied_reasons: dict[str, int]
    ignored_extra: int
    bytes_read: int
    bytes_written: int
    seconds: float
    gbps: float
    peak_rss_anon: int
    peak_gpu_memory: int
    output_files: list[str]
    warnings: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)
    shard_sha256: dict[str, str] = field(default_factory=dict)
    resumed_shards: int = 0
    pushed: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _options(options: MergeOptions | None, kwargs: dict) -> MergeOptions:
    if options is not None:
        if kwargs:
            current = {f.name: getattr(options, f.name) for f in fields(options)}  # keeps Rule objects intact
            options = MergeOptions.create(**{**current, **kwargs})
        options.validate()
        return options
    return MergeOptions.create(**kwargs)


def _open_all(target, sft, grpo, headers_only: bool = False) -> dict[str, Checkpoint]:
    """Open the three checkpoints; Hub repository ids are resolved to snapshots (their commit recorded). With
    ``headers_only``, a repository not in the local cache is read as remote headers, downloading no weights."""
    return _open_sources({"target": target, "sft": sft, "grpo": grpo}, headers_only, share=False)


def _open_sources(
    sources: dict, headers_only: bool = False, share: bool = True, where: dict[str, str] | None = None
) -> dict[str, Checkpoint]:
    """Open a checkpoint per role (see `_open_all`). With ``share``, roles naming the same source share one opened
    checkpoint (one mapping: the CUDA engine registers its pages once). ``where`` prefixes a role's errors (a spec's
    file and key)."""
    ckpts: dict[str, Checkpoint] = {}
    by_src: dict[str, Checkpoint] = {}
    try:
        for label, src in sources.items():
            try:
                _open_one(ckpts, by_src, label, src, headers_only, share)
            except StreamMergeError as e:
                if where is None or label not in where:
                    raise
                raise type(e)(f"{where[label]}: {e}") from None
    except BaseException:
        _close(ckpts)
        raise
    return ckpts


def _open_one(ckpts: dict, by_src: dict, label: str, src, headers_only: bool, share: bool) -> None:
    from . import hub

    key = os.fspath(src)
    if share and key in by_src:
        ckpts[label] = by_src[key]
        return
    if hub.parse_repo_spec(src) is not None:
        hs = hub.resolve_cached(str(src), label) if headers_only else None
        if headers_only and hs is None:
            ckpts[label] = hub.RemoteHeaders(str(src), label)
        else:
            hs = hs or hub.resolve(str(src), label)
            ck = open_checkpoint(hs.path, label, allowed_roots=[hs.blobs])
            ck.source = hs.label
            ckpts[label] = ck
    else:
        ckpts[label] = open_checkpoint(src, label)
    by_src[key] = ckpts[label]


def _close(ckpts: dict) -> None:
    for c in {id(c): c for c in ckpts.values() if c is not None}.values():
        c.close()


def _check_paths(out: Path, ckpts: dict[str, Checkpoint]) -> None:
    out_real = Path(os.path.realpath(out))
    for label, ck in ckpts.items():
        if ck is None or ck.root is None:  # no such input, or remote headers: nothing local to protect
            continue
        root = Path(os.path.realpath(ck.root))
        if out_real == root or root in out_real.parents:
            raise OutputError(
                f"{out}: the output directory is, or lies inside, the {label} checkpoint directory {ck.root}; "
                "inputs are never written: choose a directory outside every input"
            )
        if out_real in root.parents:
            raise OutputError(
                f"{out}: the {label} checkpoint {ck.root} lies inside the output directory; choose another output"
            )


def plan(
    target: str | os.PathLike,
    sft: str | os.PathLike,
    grpo: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    options: MergeOptions | None = None,
    alphas=None,
    **kwargs,
) -> MergePlan:
    """Read headers only and describe the merge: pairing, output layout, bytes to move, disk and memory needed.
    With ``alphas`` (two or more), the plan of a :func:`sweep`.

    Args:
        target, sft, grpo (`str | os.PathLike`): checkpoint directories, index files or single .safetensors files.
        out (`str | os.PathLike`, *optional*): the output directory, to check paths and free disk space.
        options (`MergeOptions`, *optional*): all options at once; or pass them as keywords (see `merge`).

    Returns:
        [`MergePlan`]: call ``.summary()`` for a JSON-friendly description.

    Raises:
        [`StreamMergeError`]: anything the merge itself would refuse.
    """
    opts = _options(options, kwargs)
    if alphas is not None:
        p, ckpts = _sweep_plan(target, sft, grpo, parse_alphas(alphas), opts, headers_only=True)
    else:
        ckpts = _open_all(target, sft, grpo, headers_only=True)
    try:
        if alphas is None:
            p = build_plan(ckpts["target"], ckpts["sft"], ckpts["grpo"], opts)
        elif out is not None and (Path(out) / MANIFEST).exists():
            raise OutputError(
                f"{out}: holds a single merge's output; a sweep writes {out}/alpha-A/ directories: "
                "choose another output directory"
            )
        if out is not None:
            _check_paths(Path(out), ckpts)
            check_disk_space(p, Path(out))
        return p
    finally:
        for c in ckpts.values():
            c.close()


def _cuda_engine(opts: MergeOptions | None):
    from .budget import DEFAULT_WINDOW_BYTES
    from .engines.cuda import CudaEngine

    if opts is None:
        return CudaEngine()
    return CudaEngine(
        window_bytes=opts.gpu_window_bytes or DEFAULT_WINDOW_BYTES,
        register_windows=opts.gpu_register,
        slots=opts.gpu_slots,
    )


def select_engine(device: str, threads: int | None = None, opts: MergeOptions | None = None):
    """The engine for ``device`` ("auto", "cpu", "cuda") and a note saying why it was chosen."""
    if device == "cpu":
        from .engines.cpu import CpuEngine

        return CpuEngine(threads), "cpu (requested)"
    cuda_ok, why = _cuda_usable()
    if device == "cuda":
        if not cuda_ok:
            raise EngineError(f"--device cuda: {why}; use --device cpu or auto")
        return _cuda_engine(opts), "cuda (requested)"
    if cuda_ok:
        return _cuda_engine(opts), "cuda (auto: GPU and triton found)"
    from .engines.cpu import CpuEngine

    return CpuEngine(threads), f"cpu (auto: {why})"


def _cuda_usable() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU available"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    try:
        from .engines import cuda  # noqa: F401
    except ImportError as e:
        return False, f"the CUDA engine is unavailable ({e})"
    return True, ""


def merge(
    target: str | os.PathLike,
    sft: str | os.PathLike,
    grpo: str | os.PathLike,
    out: str | os.PathLike,
    *,
    alpha: float | None = None,
    device: str | None = None,
    options: MergeOptions | None = None,
    progress: ProgressCallback | None = None,
    resume: bool = False,
    sink: str = "disk",
    push_to: str | None = None,
    private: bool = False,
    **kwargs,
) -> MergeReport:
    """Compute ``out = target + alpha * (grpo - sft)`` tensor by tensor, chunk by chunk, into a new directory.

    Args:
        target (`str | os.PathLike`): the checkpoint that receives the vector.
        sft, grpo (`str | os.PathLike`): the pair whose difference ``grpo - sft`` is the (reasoning) vector.
        out (`str | os.PathLike`): the output directory: new, empty, or a previous streammerge output with
            ``overwrite=True``; never inside an input.
        alpha (`float`, *optional*): scale of the vector, 1.0 unless ``options`` says otherwise; -1 removes it.
        device (`str`, *optional*): "auto" (the default), "cpu" or "cuda".
        options (`MergeOptions`, *optional*): every option at once; keywords given explicitly override it.
        progress (`Callable[[Progress], None]`, *optional*): called after each chunk with bytes done/total.
        resume (`bool`, defaults to False): continue an interrupted merge in ``out``: shards it finished are kept
            once their recorded SHA-256 is verified, the rest are redone; a different merge is refused.
        sink (`str`, defaults to "disk"): "null" computes everything and discards the output (benchmarks, 70B-scale
            dry runs); "null-sha256" also reports each file's SHA-256 (to compare engines without disk space).
        push_to (`str`, *optional*): a Hub repository id to upload the finished, verified output to.
        private (`bool`, defaults to False): create the pushed repository as private.
        **kwargs: any other `MergeOptions` field: ``chunk_bytes`` (int or "64MiB"), ``max_shard_size`` ("5GB"),
            ``out_dtype`` ("bf16"/"fp16"/"fp32"), ``missing``, ``extra``, ``shape_mismatch``,
            ``unsupported_dtype``, ``threads``, ``overwrite``, ``copy_aux_files``.

    Returns:
        [`MergeReport`]: counts, bytes, wall time, GB/s, peak memory and output files.

    Raises:
        [`StreamMergeError`] subclasses: `CheckpointError`/`HeaderError` (bad input), `TensorMismatchError`
        (pairing), `OptionsError`, `OutputError` (output location, disk full), `EngineError`.

    Example:
        ```py
        >>> import streammerge
        >>> report = streammerge.merge("Qwen2.5-7B-Instruct", "sft", "grpo", "out", alpha=1.0, chunk_bytes="64MiB")
        >>> report.gbps, report.output_files[:1]
        ```
    """
    t_start = time.perf_counter()
    if isinstance(alpha, (list, tuple)) or (isinstance(alpha, str) and "," in alpha):
        raise OptionsError("merge: alpha must be one number; for several in one pass use streammerge.sweep")
    explicit = {k: v for k, v in (("alpha", alpha), ("device", device)) if v is not None}
    opts = _options(options, {**explicit, **kwargs})
    out_dir = Path(out) if out is not None else Path("(null sink)")
    ckpts = _open_all(target, sft, grpo)
    try:
        p = build_plan(ckpts["target"], ckpts["sft"], ckpts["grpo"], opts)
        return _execute(p, ckpts, out_dir, opts, t_start, progress, resume, sink, push_to, private)[0]
    finally:
        for c in ckpts.values():
            c.close()


def _out_path(out) -> Path | None:
    return Path(out) if out is not None else None


def sweep_dirname(alpha: float) -> str:
    """The directory of one alpha's output in a sweep: ``alpha-0.5``, ``alpha-1``, ``alpha--1``, ``alpha-1e-05``."""
    text = repr(float(alpha))
    return f"alpha-{text[:-2] if text.endswith('.0') else text}"


def parse_alphas(value) -> list[float]:
    """One alpha or several: a number, a sequence of numbers, or text like ``"0.5,1,1.5"``."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not all(parts):
            raise OptionsError(f"alpha: {value!r}: expected a number or a comma-separated list like 0.5,1,1.5")
        try:
            return [float(p) for p in parts]
        except ValueError:
            raise OptionsError(
                f"alpha: {value!r}: expected a number or a comma-separated list like 0.5,1,1.5"
            ) from None
    items = list(value) if hasattr(value, "__iter__") else [value]
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        raise OptionsError(f"alpha: {value!r}: expected numbers") from None


def _execute(
    p: MergePlan,
    ckpts,
    out_dir: Path | None,
    opts: MergeOptions,
    t_start: float,
    progress,
    resume: bool,
    sink: str,
    push_to: str | None,
    private: bool,
) -> list[MergeReport]:
    """Run a plan: pick the engine, open the writer(s) (or the null sink), finalize, optionally push; a report per
    output (one, or one per alpha of a sweep, each in ``out_dir/alpha-A``)."""
    if sink not in ("disk", "null", "null-sha256"):
        raise OptionsError(f"sink: {sink!r} is not disk, null or null-sha256")
    if sink == "disk" and out_dir is None:
        raise OptionsError("an output directory is needed (or sink='null')")
    out_dir = out_dir if out_dir is not None else Path("(null sink)")
    plans = p.variants or [p]
    dirs = [out_dir / sweep_dirname(vp.options.alpha) for vp in p.variants] if p.variants else [out_dir]
    if p.variants:
        refuse_push_for_sweep(push_to)
    if sink == "disk":
        if p.variants and (out_dir / MANIFEST).exists():
            raise OutputError(
                f"{out_dir}: holds a single merge's output; a sweep writes {out_dir}/alpha-A/ directories: "
                "choose another output directory"
            )
        for d in dirs:
            _check_paths(d, ckpts)
        check_disk_space(p, out_dir)
    engine, engine_note = select_engine(opts.device, opts.threads, opts)
    available = available_memory()
    if available is not None and p.bytes_read > available // 2:
        for ck in ckpts.values():
            if ck is not None:
                ck.drop_cache = True
    guard = InputGuard(ckpts)  # before the identity: a change after either is caught
    inputs = input_identity(ckpts)  # headers hashed once for every output of a sweep
    identities = [merge_identity(vp, ckpts, inputs) for vp in plans]
    crash_point("planned")
    with contextlib.ExitStack() as stack:
        if sink == "disk":
            writers = [
                OutputWriter(d, vp, ident, resume=resume, before_publish=guard.check)
                for d, vp, ident in zip(dirs, plans, identities)
            ]
            for w in writers:
                w.preflight()  # every output is checked before any is touched
            writers = [stack.enter_context(w) for w in writers]
        else:
            writers = [stack.enter_context(NullWriter(vp, checksums=sink == "null-sha256")) for vp in plans]
        writer = SweepWriter(p, writers) if p.variants else writers[0]
        stats: EngineStats = engine.run(p, ckpts, writer, progress)
        files = []
        for vp, w in zip(plans, writers):
            small = {path.name: path.read_bytes() for path in vp.aux_files}
            small["README.md"] = model_card(vp).encode()
            files.append(w.finalize(small))
    root_notes = _earlier_sweep_outputs(out_dir, dirs, opts.overwrite, ckpts) if p.variants and sink == "disk" else []
    seconds = time.perf_counter() - t_start
    moved = stats.bytes_read + stats.bytes_written
    pushed = ""
    if push_to and sink == "disk":
        from .hub import push

        pushed = push(out_dir, push_to, private=private, commit_message=f"streammerge: {p.formula}")
    reports = []
    for k, (d, vp, w) in enumerate(zip(dirs, plans, writers)):
        notes = [f"sweep: output {k + 1} of {len(plans)} from one pass over the inputs"] if p.variants else []
        notes += root_notes if k == 0 else []
        reports.append(
            MergeReport(
                out_dir=str(d) if sink == "disk" or p.variants else str(out_dir),
                device=engine.name,
                tensors_merged=vp.merged,
                tensors_copied=vp.copied,
                copied_reasons=dict(vp.copied_reasons),
                ignored_extra=len(vp.ignored_extra),
                bytes_read=stats.bytes_read,
                bytes_written=w.bytes_written if p.variants else stats.bytes_written,
                seconds=seconds,
                gbps=moved / seconds / 1e9 if seconds > 0 else 0.0,
                peak_rss_anon=stats.peak_rss_anon,
                peak_gpu_memory=stats.peak_gpu_memory,
                output_files=files[k],
                warnings=list(p.warnings) + w.notes + notes + [f"engine: {engine_note}"] + stats.notes,
                stage_seconds=dict(stats.stage_seconds),
                nonfinite=stats.nonfinite_of(k) if p.variants else dict(stats.nonfinite),
                shard_sha256={name: v["sha256"] for name, v in w.shards.items()},
                resumed_shards=len(w.done_files),
                pushed=pushed,
            )
        )
    return reports


def refuse_push_for_sweep(push_to: str | None) -> None:
    """A sweep writes one output per alpha; ``--push-to`` uploads one: refused before anything runs."""
    if push_to:
        raise OptionsError("--push-to uploads one output; a sweep writes one per alpha: push the one you keep")


def _earlier_sweep_outputs(root: Path, dirs: list[Path], overwrite: bool, ckpts: dict) -> list[str]:
    """After a sweep into ``root``: the outputs an earlier sweep left there for other alphas (``alpha-A`` holding a
    finished merge or apply at alpha ``A``). With ``overwrite`` they are removed (only what their manifests record),
    since the root now stands for this sweep; else they are named, so nobody takes them for this sweep's. Anything
    else is never touched: other directories, unreadable manifests, and an output that is (or holds) an input of
    this run, such as an earlier output used as the target."""
    ours = {d.name for d in dirs}
    others: list[tuple[Path, dict]] = []
    kept: list[str] = []
    for d in sorted(root.glob("alpha-*")):
        if d.name in ours or d.is_symlink() or not d.is_dir():
            continue
        try:
            previous = read_manifest(d)
        except OutputError:
            continue  # not readable as ours: not ours to judge
        o = (previous or {}).get("options", {})
        try:
            named_for_its_alpha = sweep_dirname(float(o.get("alpha"))) == d.name
        except (TypeError, ValueError):
            named_for_its_alpha = False
        if not named_for_its_alpha or o.get("kind", "merge") not in ("merge", "apply"):
            continue
        try:
            _check_paths(d, ckpts)
        except OutputError:
            kept.append(d.name)  # an input of this run
            continue
        others.append((d, previous))  # type: ignore[arg-type]
    if not overwrite:
        if not others:
            return []
        names = ", ".join(d.name for d, _ in others)
        return [f"sweep: {root} also holds {names} from an earlier sweep (not this one's; --overwrite removes them)"]
    notes = [f"sweep: kept {name} of an earlier sweep: it is an input of this one" for name in kept]
    for d, previous in others:
        why = remove_output(d, previous)
        notes.append(f"sweep: removed {d.name} of an earlier sweep (--overwrite)" if why is None else f"sweep: {why}")
    return notes


def sweep(
    target: str | os.PathLike,
    sft: str | os.PathLike,
    grpo: str | os.PathLike,
    out: str | os.PathLike,
    alphas,
    *,
    device: str | None = None,
    options: MergeOptions | None = None,
    progress: ProgressCallback | None = None,
    resume: bool = False,
    sink: str = "disk",
    **kwargs,
) -> list[MergeReport]:
    """Several alphas in one pass: ``out/alpha-A = target + A * (grpo - sft)`` for each ``A`` in ``alphas``.

    Each input byte is read once; each output is byte-identical to ``merge(..., alpha=A)`` into its own directory
    (its header and model card record its alpha). Per-tensor rules that set an alpha keep it in every output. Host
    memory grows by one chunk per extra output, GPU memory by one chunk per device slot per extra output.

    Args:
        alphas (`Sequence[float] | str`): two or more distinct alphas, or text like ``"0.5,1,1.5"``.
        Other arguments: as :func:`merge` (``push_to`` is not available: push the output you keep).

    Returns:
        `list[MergeReport]`: one per alpha, in the given order (``bytes_read`` is the shared pass's).

    Example:
        ```py
        >>> reports = streammerge.sweep("target/", "sft/", "grpo/", "sweep/", [0.5, 1.0, 1.5])
        >>> [r.out_dir for r in reports]
        ['sweep/alpha-0.5', 'sweep/alpha-1', 'sweep/alpha-1.5']
        ```
    """
    t_start = time.perf_counter()
    values = parse_alphas(alphas)
    explicit = {"device": device} if device is not None else {}
    opts = _options(options, {**explicit, **kwargs})
    p, ckpts = _sweep_plan(target, sft, grpo, values, opts)
    try:
        return _execute(p, ckpts, _out_path(out), opts, t_start, progress, resume, sink, None, False)
    finally:
        _close(ckpts)


def _check_sweep_alphas(values: list[float]) -> None:
    names = [sweep_dirname(a) for a in values]
    if len(values) < 2:
        raise OptionsError("a sweep needs two or more alphas (for one, use merge or apply)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise OptionsError(f"alpha: repeated value(s) {', '.join(dup)}; give each alpha once")


def _with_alpha(opts: MergeOptions, alpha: float) -> MergeOptions:
    return MergeOptions.create(**{f.name: getattr(opts, f.name) for f in fields(opts)} | {"alpha": alpha})


def _sweep_plan(target, sft, grpo, values: list[float], opts: MergeOptions, headers_only: bool = False):
    _check_sweep_alphas(values)
    ckpts = _open_all(target, sft, grpo, headers_only=headers_only)
    try:
        plans = [build_plan(ckpts["target"], ckpts["sft"], ckpts["grpo"], _with_alpha(opts, a)) for a in values]
        return sweep_plan(plans), ckpts
    except BaseException:
        _close(ckpts)
        raise


def _spec_sources(spec: Spec) -> dict[str, str]:
    sources = {"target": spec.target}
    for i, v in enumerate(spec.vectors, 1):
        sources.update(v.roles(i))
    return sources


def _spec_plan(spec: Spec, opts: MergeOptions, headers_only: bool = False):
    """Open every checkpoint of a spec and build its plan; stored vectors must come from ``streammerge extract``."""
    sources = _spec_sources(spec)
    where = {"target": f"{spec.source}: target"}
    for i, v in enumerate(spec.vectors, 1):
        where.update({role: f"{spec.source}: vectors[{i}].{role.rstrip('0123456789')}" for role in v.roles(i)})
    ckpts = _open_sources(sources, headers_only=headers_only, where=where)
    try:
        vectors = []
        for i, v in enumerate(spec.vectors, 1):
            if v.vector is not None:
                ck = ckpts[f"vector{i}"]
                headers = getattr(ck, "headers", None)
                if headers and headers[0].metadata.get("streammerge_formula") != "grpo - sft":
                    raise OptionsError(
                        f"{spec.source}: vectors[{i}]: {v.vector} is not a vector written by `streammerge extract` "
                        "(no streammerge_formula 'grpo - sft' in its metadata); give a pair as sft and grpo instead"
                    )
                vectors.append(VectorInput(f"vector{i}", ck, None, None, v.alpha, v.rules))
            else:
                vectors.append(
                    VectorInput(f"grpo{i}", ckpts[f"grpo{i}"], f"sft{i}", ckpts[f"sft{i}"], v.alpha, v.rules)
                )
        labelled = {k: ck.source for k, ck in ckpts.items()}
        return build_vector_plan(ckpts["target"], vectors, opts, labelled, kind="combine"), ckpts
    except BaseException:
        _close(ckpts)
        raise


def _spec_options(spec: Spec, options: MergeOptions | None, kwargs: dict) -> MergeOptions:
    base = {**spec.options, **({"rules": spec.rules} if spec.rules else {})}
    if options is not None:
        current = {f.name: getattr(options, f.name) for f in fields(options)}
        return MergeOptions.create(**{**current, **base, **kwargs})
    try:
        return MergeOptions.create(**{**base, **kwargs})
    except TypeError as e:
        raise OptionsError(f"{spec.source}: [options]: {e}") from None


def plan_combine(spec, out: str | os.PathLike | None = None, *, options: MergeOptions | None = None, **kwargs):
    """Read headers only and describe a many-vector merge (see :func:`combine`). Returns a [`MergePlan`]."""
    sp = load_spec(spec)
    opts = _spec_options(sp, options, kwargs)
    p, ckpts = _spec_plan(sp, opts, headers_only=True)
    try:
        if out is not None:
            _check_paths(Path(out), ckpts)
            check_disk_space(p, Path(out))
        return p
    finally:
        _close(ckpts)


def combine(
    spec,
    out: str | os.PathLike,
    *,
    device: str | None = None,
    options: MergeOptions | None = None,
    progress: ProgressCallback | None = None,
    resume: bool = False,
    sink: str = "disk",
    push_to: str | None = None,
    private: bool = False,
    **kwargs,
) -> MergeReport:
    """Many vectors: ``out = target + sum_i alpha_i * (grpo_i - sft_i)``, every input streamed once.

    Per element, in float32 without FMA: ``r = t32``, then ``r = r + f32(alpha_i) * (g32_i - s32_i)`` for each vector
    in the spec's order (a stored vector from :func:`extract` is added as ``r + f32(alpha_i) * v32_i``), and one
    rounding to the output dtype. One vector gives exactly the bytes of :func:`merge`.

    Args:
        spec (`str | os.PathLike | dict | Spec`): a TOML or YAML spec file (see `streammerge.spec`), or its content.
        out: the output directory. Other arguments and options: as :func:`merge`; keywords override the spec's
            ``[options]``.

    Example:
        ```py
        >>> streammerge.combine("spec.toml", "merged/")
        >>> streammerge.combine({"target": "t/", "vectors": [{"sft": "s/", "grpo": "g/", "alpha": 1.0},
        ...                                                  {"vector": "v/", "alpha": -0.5}]}, "merged/")
        ```
    """
    t_start = time.perf_counter()
    sp = load_spec(spec)
    explicit = {"device": device} if device is not None else {}
    opts = _spec_options(sp, options, {**explicit, **kwargs})
    p, ckpts = _spec_plan(sp, opts)
    try:
        return _execute(p, ckpts, _out_path(out), opts, t_start, progress, resume, sink, push_to, private)[0]
    finally:
        _close(ckpts)


def extract(
    sft: str | os.PathLike,
    grpo: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "fp32",
    options: MergeOptions | None = None,
    progress: ProgressCallback | None = None,
    resume: bool = False,
    sink: str = "disk",
    **kwargs,
) -> MergeReport:
    """Write the vector ``v = grpo - sft`` as a safetensors checkpoint, to apply later with :func:`apply`.

    Per element ``v = round(g32 - s32)``. In float32 (the default) no rounding happens at all, so
    ``apply(target, v, alpha=a)`` gives exactly the bytes of ``merge(target, sft, grpo, alpha=a)``. ``dtype="bf16"``
    halves the size but adds a rounding (apply is then no longer byte-identical to the three-way merge).
    Non-floating tensors are copied from ``grpo``. Same options and report as :func:`merge`.

    Example:
        ```py
        >>> streammerge.extract("sft/", "grpo/", "reasoning-vector/")
        >>> streammerge.apply("Qwen2.5-7B-Instruct/", "reasoning-vector/", "out/", alpha=1.0)
        ```
    """
    t_start = time.perf_counter()
    opts = _options(options, {**kwargs, "out_dtype": dtype, "alpha": 1.0})
    p, ckpts, opened = _extract_plan(sft, grpo, opts)
    try:
        return _execute(p, ckpts, Path(out), opts, t_start, progress, resume, sink, None, False)[0]
    finally:
        _close(opened)


def _extract_plan(sft, grpo, opts: MergeOptions, sources=None):
    """The plan of ``grpo - sft`` laid out as grpo (grpo is the engine's target too: its non-floating tensors are
    copied), the engine's checkpoints and the opened ones to close. ``sources``: see :func:`_apply_plan`."""
    opened = _open_all(sft, grpo, grpo)  # labels target=sft, sft=grpo, grpo=grpo (a second map of grpo)
    try:
        sft_ck, grpo_ck = opened["target"], opened["grpo"]
        sources = sources or {"target": "-", "sft": sft_ck.source, "grpo": grpo_ck.source}
        p = build_plan(grpo_ck, sft_ck, grpo_ck, opts, sources=sources, kind="vector")
        return p, {"target": grpo_ck, "sft": sft_ck, "grpo": grpo_ck}, opened
    except BaseException:
        _close(opened)
        raise


def apply(
    target: str | os.PathLike,
    vector: str | os.PathLike,
    out: str | os.PathLike,
    *,
    alpha: float | None = None,
    device: str | None = None,
    options: MergeOptions | None = None,
    progress: ProgressCallback | None = None,
    resume: bool = False,
    sink: str = "disk",
    push_to: str | None = None,
    private: bool = False,
    any_vector: bool = False,
    **kwargs,
) -> MergeReport:
    """``out = target + alpha * vector`` for a vector written by :func:`extract` (one rounding, as in `merge`).

    With a float32 vector the bytes equal ``merge(target, sft, grpo, alpha=alpha)``. Same options and report as
    :func:`merge` (rules, policies, out dtype, sinks, push). ``vector`` must carry extract's metadata
    (``streammerge_formula: grpo - sft``) unless ``any_vector=True``: adding a whole model by mistake is refused.
    """
    t_start = time.perf_counter()
    explicit = {k: v for k, v in (("alpha", alpha), ("device", device)) if v is not None}
    opts = _options(options, {**explicit, **kwargs})
    p, ckpts, opened = _apply_plan(target, vector, [opts.alpha], opts, any_vector)
    try:
        return _execute(p, ckpts, _out_path(out), opts, t_start, progress, resume, sink, push_to, private)[0]
    finally:
        _close(opened)


def apply_sweep(
    target: str | os.PathLike,
    vector: str | os.PathLike,
    out: str | os.PathLike,
    alphas,
    *,
    device: str | None = None,
    options: MergeOptions | None = None,
    progress: ProgressCallback | None = None,
    resume: bool = False,
    sink: str = "disk",
    any_vector: bool = False,
    **kwargs,
) -> list[MergeReport]:
    """:func:`apply` at several alphas in one pass: ``out/alpha-A = target + A * vector`` for each ``A``.

    As :func:`sweep` is to :func:`merge`: every input byte is read once, and each output is byte-identical to
    ``apply(target, vector, out/alpha-A, alpha=A)``. Returns one report per alpha, in order.
    """
    t_start = time.perf_counter()
    values = parse_alphas(alphas)
    explicit = {"device": device} if device is not None else {}
    opts = _options(options, {**explicit, **kwargs})
    _check_sweep_alphas(values)
    p, ckpts, opened = _apply_plan(target, vector, values, opts, any_vector)
    try:
        return _execute(p, ckpts, _out_path(out), opts, t_start, progress, resume, sink, None, False)
    finally:
        _close(opened)


def _apply_plan(target, vector, values: list[float], opts: MergeOptions, any_vector: bool, sources=None):
    """The plan of ``target + alpha * vector`` (a sweep plan for several alphas), the engine's checkpoints and the
    opened ones to close. ``sources``: what the headers record as the inputs (verify passes the manifest's)."""
    opened = _open_all(target, vector, vector)
    try:
        vec = opened["grpo"]
        if not any_vector and vec.headers and vec.headers[0].metadata.get("streammerge_formula") != "grpo - sft":
            raise OptionsError(
                f"{vec.files[0]}: not a vector written by `streammerge extract` (its metadata has no "
                "streammerge_formula 'grpo - sft'); applying a whole model would add its weights. Pass --any-vector "
                "if it really is a difference of two checkpoints"
            )
        sources = sources or {"target": opened["target"].source, "sft": "-", "grpo": opened["grpo"].source}
        plans = [
            build_plan(
                opened["target"], opened["sft"], opened["grpo"], _with_alpha(opts, a), sources=sources, kind="apply"
            )
            for a in values
        ]
        p = sweep_plan(plans) if len(plans) > 1 else plans[0]
        return p, {"target": opened["target"], "sft": None, "grpo": opened["grpo"]}, opened
    except BaseException:
        _close(opened)
        raise


class InputGuard:
    """Every input file's size, mtime, ctime and inode when its header was read; :meth:`check` raises if any changed.

    A checkpoint rewritten in place during a merge (a download or a save still running) would give an output that
    mixes old and new bytes. The writer calls :meth:`check` before it gives an output file its final name, after
    every read that file's bytes came from, so such a file is never published. ctime is compared too: a copy that
    restores the old mtime (``cp -p``, ``rsync -t``) still moves it. (A file that shrinks is caught sooner, by the
    size check before every read in `Checkpoint.view`.)"""

    def __init__(self, ckpts: dict[str, Checkpoint | None]):
        self._stats: dict[Path, tuple[int, ...]] = {}
        for ck in ckpts.values():
            if ck is None:
                continue
            stats = getattr(ck, "file_stats", None) or [None] * len(ck.files)
            for f, st in zip(ck.files, stats):
                self._stats.setdefault(f, self._key(st) if st is not None else self._stat(f))

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

    @classmethod
    def _stat(cls, f: Path) -> tuple[int, ...]:
        try:
            return cls._key(f.stat())
        except OSError:
            return ()

    def check(self) -> None:
        for f, before in self._stats.items():
            now = self._stat(f)
            if now == before:
                continue
            if not now:
                what = "removed"
            elif now[0] != before[0]:
                what = f"{before[0]} bytes then, {now[0]} now"
            elif now[3:] != before[3:]:
                what = "replaced by another file"
            else:
                what = "modified in place: its mtime or ctime changed"
            raise CheckpointError(
                f"{f}: input changed while merging ({what}); the output could mix old and new bytes, so nothing "
                "more was published. Wait until the input is complete and stable, then run again with --overwrite"
            )


def input_identity(ckpts: dict[str, Checkpoint]) -> dict[str, list[dict]]:
    """Per role, each input file's name, size, mtime, ctime and header SHA-256 (a checkpoint in several roles is read
    once)."""
    inputs: dict[str, list[dict]] = {}
    seen: dict[int, list[dict]] = {}
    for label, ck in ckpts.items():
        if ck is None:
            continue
        if id(ck) not in seen:
            entries = []
            for f in ck.files:
                st = f.stat()
                with open(f, "rb") as fh:
                    head = fh.read(8)
                    n = int.from_bytes(head, "little") if len(head) == 8 else 0
                    hh = hashlib.sha256(head + fh.read(n)).hexdigest()
                entries.append(
                    {
                        "file": f.name,
                        "size": st.st_size,
                        "mtime_ns": st.st_mtime_ns,
                        # moved by a rewrite that restores the mtime (cp -p, rsync -t): resume must not trust it
                        "ctime_ns": st.st_ctime_ns,
                        "header_sha256": hh,
                    }
                )
            seen[id(ck)] = entries
        inputs[label] = seen[id(ck)]
    return inputs


def merge_identity(p: MergePlan, ckpts: dict[str, Checkpoint], inputs: dict | None = None) -> dict:
    """What makes a merge's output what it is: input files (size, mtime, header hash), byte-relevant options and
    the output layout, with a fingerprint over all of it. Recorded in the manifest; ``resume`` requires a match.
    ``inputs``: :func:`input_identity` of ``ckpts`` when already computed (a sweep's outputs share it)."""
    inputs = inputs if inputs is not None else input_identity(ckpts)
    o = p.options
    options = {
        "alpha": repr(float(o.alpha)),
        "out_dtype": o.out_dtype,
        "missing": o.missing,
        "extra": o.extra,
        "shape_mismatch": o.shape_mismatch,
        "unsupported_dtype": o.unsupported_dtype,
        "max_shard_size": o.max_shard_size,
        "copy_aux_files": o.copy_aux_files,
        "extra_metadata": dict(o.extra_metadata),
        "rules": [r.describe() for r in o.rules],
        # not byte-relevant, but a strict run must not keep shards an unchecked run wrote
        "check_finite": o.check_finite,
        "strict": o.strict,
        "vocab_mismatch": o.vocab_mismatch,
        "kind": p.kind,
        **({"vectors": p.vectors} if p.kind == "combine" else {}),
    }
    layout = [{"name": f.name, "size": f.size, "header_sha256": hashlib.sha256(f.header).hexdigest()} for f in p.files]
    identity = {
        "streammerge_version": __version__,
        "formula": FORMULAS[p.kind],
        "sources": p.sources,
        "inputs": inputs,
        "options": options,
        "layout": layout,
    }
    blob = json.dumps({k: identity[k] for k in ("streammerge_version", "inputs", "options", "layout")}, sort_keys=True)
    identity["fingerprint"] = hashlib.sha256(blob.encode()).hexdigest()
    return identity


def model_card(p: MergePlan) -> str:
    """A Hugging Face model card (README.md) recording what was merged and how."""
    o = p.options
    reasons = "".join(f"\n| copied: {k} | {v} |" for k, v in sorted(p.copied_reasons.items()))
    if p.kind == "combine":
        formula = "`θ_out = θ_target + Σᵢ αᵢ·(θ_grpo,ᵢ − θ_sft,ᵢ)`, the vectors added in the order below"
        rows = [f"| target | `{_printable(p.sources['target'])}` |"]
        for i, v in enumerate(p.vectors, 1):
            diff = (
                f"`{_printable(p.sources[v['vector']])}` (stored vector)"
                if "vector" in v
                else f"`{_printable(p.sources[v['grpo']])}` − `{_printable(p.sources[v['sft']])}`"
            )
            rules = f", rules {'; '.join(v['rules'])}" if v.get("rules") else ""
            rows.append(f"| vector {i} | {diff}, α = {v['alpha']!r}{rules} |")
        table = "\n".join(rows)
        math_line = "`r = t; r = r + αᵢ·(gᵢ − sᵢ)` for each vector in order"
    else:
        formula = "`θ_out = θ_target + α·(θ_grpo − θ_sft)`"
        table = (
            f"| target | `{_printable(p.sources['target'])}` |\n| sft | `{_printable(p.sources['sft'])}` |\n"
            f"| grpo | `{_printable(p.sources['grpo'])}` |\n| α | {o.alpha!r} |"
        )
        math_line = "`d = g − s; m = α·d; r = t + m`"
    rules = f"\n| rules | {'; '.join(r.describe() for r in o.rules)} |" if o.rules else ""
    return f"""---
tags:
- merge
- streammerge
- reasoning-vector
---
# Merged with streammerge {__version__}

{formula} — the reasoning-vector transfer of Zbeeb, Hammoud and Ghanem,
"Reasoning Vectors: Transferring Chain-of-Thought Capabilities via Task Arithmetic" (arXiv:2509.01363).

| | |
|---|---|
{table}{rules}
| output dtype | {o.out_dtype or "target's dtype per tensor"} |
| tensors merged | {p.merged} |{reasons}
| parameters | {p.parameters:,} |

Numerics: each element is computed in IEEE float32 as {math_line} (separate roundings, no
FMA) and rounded once to the output dtype, round-to-nearest-even; every NaN is written as the canonical quiet NaN.
The output bytes do not depend on the device that computed them.

Policies: missing={o.missing}, extra={o.extra}, shape-mismatch={o.shape_mismatch},
unsupported-dtype={o.unsupported_dtype}.
"""
