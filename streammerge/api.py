"""The library entry points: thin calls that build one planned job (recipes) and run it (run)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import recipes
from .distributed import DEFAULT_TIMEOUT_S, DISTRIBUTED_MODES, Coordinator, world_from_env
from .errors import OptionsError
from .options import MergeOptions
from .outdir import check_output_paths, refuse_sweep_over_single
from .parts import Part, finalize_parts
from .plan import MergePlan, check_disk_space
from .recipes import Planned, parse_alphas, sweep_dirname
from .remote import default_scratch
from .run import MergeReport, ProgressCallback, RunRequest, refuse_push_for_sweep, run, select_engine
from .spec import load_spec
from .stream import schedule, streamed

__all__ = [
    "MergeReport",
    "apply",
    "apply_sweep",
    "combine",
    "extract",
    "merge",
    "parse_alphas",
    "plan",
    "finalize",
    "plan_combine",
    "refuse_push_for_sweep",
    "select_engine",
    "sweep",
    "sweep_dirname",
]


def _options(options: MergeOptions | None, kwargs: dict) -> MergeOptions:
    if options is not None:
        options = options.replace(**kwargs) if kwargs else options
        options.validate()
        return options
    return MergeOptions.create(**kwargs)


def _streaming(opts: MergeOptions, out, part=None) -> MergeOptions:
    """With ``stream``: the scratch folder (``stream_dir``, by default one beside ``out``), with a subfolder per
    process of a merge in parts or under torchrun, so that no two download into one folder."""
    if not opts.stream:
        return opts
    tag = ""
    if isinstance(part, Part):
        tag = f"part-{part.index + 1}-of-{part.count}"
    elif isinstance(part, str) and "/" in part:
        tag = "part-" + part.replace("/", "-of-")
    elif int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and os.environ.get("STREAMMERGE_DISTRIBUTED") != "off":
        tag = f"rank-{os.environ.get('RANK', '0')}"
    if opts.stream_dir:
        return opts.replace(stream_dir=str(Path(opts.stream_dir) / tag)) if tag else opts
    real = out if out is not None and str(out) != "(null sink)" else None
    return opts.replace(stream_dir=str(default_scratch(real, tag)))


def _explicit(**given) -> dict:
    """The keyword arguments the caller actually gave (None means: keep the options' value)."""
    return {k: v for k, v in given.items() if v is not None}


def _run_one(
    job: Planned,
    out,
    opts: MergeOptions,
    started: float,
    *,
    part: str | Part | None = None,
    distributed: str = "auto",
    dist_timeout: float | None = None,
    **how,
) -> list[MergeReport]:
    """Run ``job`` alone, as ``part`` of a merge in parts, or as this rank's part of a torchrun job."""
    with job:
        if distributed not in DISTRIBUTED_MODES:
            raise OptionsError(f"distributed: {distributed!r} is not one of {', '.join(DISTRIBUTED_MODES)}")
        # STREAMMERGE_DISTRIBUTED=off: a process that inherited a torchrun environment (a subprocess of a rank)
        # merges on its own instead of joining that job's rendezvous
        off = os.environ.get("STREAMMERGE_DISTRIBUTED", "auto") == "off"
        world = world_from_env() if distributed == "auto" and not off else None
        if world is not None and part is not None:
            raise OptionsError("--part is for independent jobs; under torchrun every rank takes its part itself")
        piece = Part.parse(part) if isinstance(part, str) else part
        coord = Coordinator(world, dist_timeout or DEFAULT_TIMEOUT_S) if world is not None else None
        try:
            req = RunRequest(
                Path(out) if out is not None else None, opts, started, part=piece, coordinator=coord, **how
            )
            return run(job, req)
        finally:
            if coord is not None:
                coord.close()


def _headers_only(job: Planned, out) -> MergePlan:
    """A plan read from headers, with the output location checked as the run would; the inputs are closed."""
    with job:
        if out is not None:
            check_output_paths(Path(out), job.inputs)
            check_disk_space(job.plan, Path(out))
        if any(streamed(ck) is not None for ck in job.inputs.values()):
            opts = job.plan.options
            job.plan.stream = schedule(job.plan, job.inputs, opts.stream_disk, opts.download_workers).summary()
        return job.plan


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
    opts = _streaming(_options(options, kwargs), out)
    values = parse_alphas(alphas) if alphas is not None else None
    job = recipes.trio(target, sft, grpo, opts, values, headers_only=True)
    if values is not None and out is not None:
        with job:
            refuse_sweep_over_single(Path(out))
    return _headers_only(job, out)


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
    part: str | None = None,
    distributed: str = "auto",
    dist_timeout: float | None = None,
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
        part (`str`, *optional*): ``"I/N"``: write only part I of N of the output files and no index, for
            independent jobs (a SLURM array); :func:`finalize` publishes the output when every part is done.
        distributed (`str`, defaults to "auto"): "auto" joins a torchrun job when ``WORLD_SIZE`` > 1 (each rank
            writes its part, rank 0 finalizes; every rank returns only after that); "off" never does.
        dist_timeout (`float`, *optional*): torchrun: seconds a rank waits for the others at a step (2 hours).
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
    started = time.perf_counter()
    if isinstance(alpha, (list, tuple)) or (isinstance(alpha, str) and "," in alpha):
        raise OptionsError("merge: alpha must be one number; for several in one pass use streammerge.sweep")
    opts = _streaming(_options(options, {**_explicit(alpha=alpha, device=device), **kwargs}), out, part)
    job = recipes.trio(target, sft, grpo, opts)
    how = dict(progress=progress, resume=resume, sink=sink, push_to=push_to, private=private, part=part)
    return _run_one(
        job,
        out if out is not None else "(null sink)",
        opts,
        started,
        distributed=distributed,
        dist_timeout=dist_timeout,
        **how,
    )[0]


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
    part: str | None = None,
    distributed: str = "auto",
    dist_timeout: float | None = None,
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
    started = time.perf_counter()
    values = parse_alphas(alphas)
    opts = _streaming(_options(options, {**_explicit(device=device), **kwargs}), out, part)
    job = recipes.trio(target, sft, grpo, opts, values)
    return _run_one(
        job,
        out,
        opts,
        started,
        progress=progress,
        resume=resume,
        sink=sink,
        part=part,
        distributed=distributed,
        dist_timeout=dist_timeout,
    )


def plan_combine(spec, out: str | os.PathLike | None = None, *, options: MergeOptions | None = None, **kwargs):
    """Read headers only and describe a many-vector merge (see :func:`combine`). Returns a [`MergePlan`]."""
    sp = load_spec(spec)
    opts = _streaming(recipes.spec_options(sp, options, kwargs), out)
    return _headers_only(recipes.combine(sp, opts, headers_only=True), out)


def combine(
    spec,
    out: str | os.PathLike,
    *,
    device: str | None = None,
    options: MergeOptions | None = None,
    progress: ProgressCallback | None = None,
    resume: bool = False,
    sink: str = "disk",
    part: str | None = None,
    distributed: str = "auto",
    dist_timeout: float | None = None,
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
    started = time.perf_counter()
    sp = load_spec(spec)
    opts = _streaming(recipes.spec_options(sp, options, {**_explicit(device=device), **kwargs}), out, part)
    job = recipes.combine(sp, opts)
    how = dict(progress=progress, resume=resume, sink=sink, push_to=push_to, private=private, part=part)
    return _run_one(job, out, opts, started, distributed=distributed, dist_timeout=dist_timeout, **how)[0]


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
    part: str | None = None,
    distributed: str = "auto",
    dist_timeout: float | None = None,
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
    started = time.perf_counter()
    opts = _streaming(_options(options, {**kwargs, "out_dtype": dtype, "alpha": 1.0}), out, part)
    job = recipes.extract(sft, grpo, opts)
    return _run_one(
        job,
        out,
        opts,
        started,
        progress=progress,
        resume=resume,
        sink=sink,
        part=part,
        distributed=distributed,
        dist_timeout=dist_timeout,
    )[0]


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
    part: str | None = None,
    distributed: str = "auto",
    dist_timeout: float | None = None,
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
    started = time.perf_counter()
    opts = _streaming(_options(options, {**_explicit(alpha=alpha, device=device), **kwargs}), out, part)
    job = recipes.apply(target, vector, [opts.alpha], opts, any_vector)
    how = dict(progress=progress, resume=resume, sink=sink, push_to=push_to, private=private, part=part)
    return _run_one(job, out, opts, started, distributed=distributed, dist_timeout=dist_timeout, **how)[0]


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
    part: str | None = None,
    distributed: str = "auto",
    dist_timeout: float | None = None,
    any_vector: bool = False,
    **kwargs,
) -> list[MergeReport]:
    """:func:`apply` at several alphas in one pass: ``out/alpha-A = target + A * vector`` for each ``A``.

    As :func:`sweep` is to :func:`merge`: every input byte is read once, and each output is byte-identical to
    ``apply(target, vector, out/alpha-A, alpha=A)``. Returns one report per alpha, in order.
    """
    started = time.perf_counter()
    values = parse_alphas(alphas)
    opts = _streaming(_options(options, {**_explicit(device=device), **kwargs}), out, part)
    recipes.check_sweep_alphas(values)
    job = recipes.apply(target, vector, values, opts, any_vector)
    return _run_one(
        job,
        out,
        opts,
        started,
        progress=progress,
        resume=resume,
        sink=sink,
        part=part,
        distributed=distributed,
        dist_timeout=dist_timeout,
    )


def finalize(out: str | os.PathLike) -> list[str]:
    """Publish a merge written in parts (``part="I/N"`` / ``--part I/N``) once every part has finished: check that
    every output file is recorded by a part of one plan and present, then write the small files, the index and the
    complete manifest. Refuses, naming what is missing, and touches nothing otherwise. Returns the output's files.

    Example:
        ```py
        >>> for i in (1, 2, 3):  # anywhere, any order, e.g. three jobs of a SLURM array
        ...     streammerge.merge("t/", "s/", "g/", "out/", part=f"{i}/3")
        >>> streammerge.finalize("out/")
        ```
    """
    return finalize_parts(Path(out))
