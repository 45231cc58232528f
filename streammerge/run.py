"""Orchestration: run one planned job end to end — engine choice, sinks, input guard, finalize, verify and push."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .card import model_card
from .distributed import Coordinator
from .engines import EngineStats, Progress
from .errors import CheckpointError, EngineError, OptionsError, OutputError, format_name_list
from .faults import crash_point
from .identity import InputGuard, input_identity, merge_identity
from .memory import available_memory
from .options import MergeOptions
from .outdir import check_output_paths, earlier_sweep_outputs, refuse_sweep_over_single
from .parts import Part, files_of, finalize_parts, part_records, share_for
from .plan import MergePlan, Op, check_disk_space
from .recipes import Planned, sweep_dirname
from .stream import Streamer, schedule, streamed
from .verify import verify
from .writer import NullWriter, OutputWriter, SweepWriter

ProgressCallback = Callable[[Progress], None]
SINKS = ("disk", "null", "null-sha256")
# The engines (by name) that compute block-scaled FP8 tensors; another one meeting an FP8 tensor (one handed over
# some other way) is refused rather than trusted with bytes it was not built for.
FP8_ENGINES = ("cpu", "cuda")
FP8_ENGINE_MESSAGE = "FP8 tensors need the CPU or the CUDA engine: --device cpu or cuda"
# The CUDA engine maps (and registers) every input file before its first chunk; streamed shards arrive one by one.
STREAM_CUDA_MESSAGE = (
    "--stream merges on the CPU engine: the CUDA engine maps every input file before it starts, and streamed shards "
    "arrive one by one. Use --device cpu or auto (the download is the bottleneck), or download the inputs first "
    "and merge them without --stream on the GPU"
)


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


@dataclass(frozen=True)
class RunRequest:
    """Everything :func:`run` needs besides the planned job: where the output goes and how to run.

    Attributes:
        out_dir (`Path | None`): the output directory (None only with a null sink).
        options (`MergeOptions`): the options the plan was built with (engine choice, threads, overwrite).
        started (`float`): ``time.perf_counter()`` when the call began (planning counts in the wall time).
        progress (*optional*): the progress callback.
        resume (`bool`): keep verified shards of an interrupted run of the same job.
        sink (`str`): "disk", "null" (compute, discard) or "null-sha256" (discard, report SHA-256s).
        push_to (`str | None`): a Hub repository to upload the finished, verified output to.
        private (`bool`): create the pushed repository as private.
        part (`Part | None`): write only this part's files and no index (``--part I/N``; ``finalize`` publishes).
        coordinator (`Coordinator | None`): a torchrun job: this rank writes its part, rank 0 finalizes.
    """

    out_dir: Path | None
    options: MergeOptions
    started: float
    progress: ProgressCallback | None = None
    resume: bool = False
    sink: str = "disk"
    push_to: str | None = None
    private: bool = False
    part: Part | None = None
    coordinator: Coordinator | None = None


def refuse_push_for_sweep(push_to: str | None) -> None:
    """A sweep writes one output per alpha; ``--push-to`` uploads one: refused before anything runs."""
    if push_to:
        raise OptionsError("--push-to uploads one output; a sweep writes one per alpha: push the one you keep")


def refuse_in_parts(opts: MergeOptions, push_to: str | None) -> None:
    """What a merge in parts cannot do: replace an earlier output (parts run independently, none may delete what
    another is writing) or push (no part holds the whole output; push after ``finalize``)."""
    if opts.overwrite:
        raise OptionsError(
            "--overwrite cannot be used with --part or torchrun: parts never remove files another part may be "
            "writing. Give a new or empty output directory (or --resume an interrupted merge)"
        )
    if push_to:
        raise OptionsError(
            "--push-to with --part or torchrun: no part holds the whole output; push after the output is finalized"
        )


def _threads(opts: MergeOptions, coord: Coordinator | None) -> int | None:
    """Compute threads: as asked; under torchrun by default the node's cores shared by its local ranks (one thread
    of each rank's share goes to its writer)."""
    if opts.threads is not None or coord is None:
        return opts.threads
    return max(1, (os.cpu_count() or 2) // coord.world.local_size - 1)


def _collective(coord: Coordinator | None, fn, only_rank: int | None = None):
    """Run ``fn`` here, or under torchrun as one step of every rank (an error anywhere stops every rank)."""
    if coord is None:
        return fn()
    return coord.step(fn, only_rank=only_rank)


def _part_note(part: Part, w, total: int, ranked: bool, out_dir: Path) -> str:
    mine = total - len(w.done_files) + len(w.adopted)
    if ranked:
        return f"rank {part.index} of {part.count}: wrote {mine} of {total} file(s); rank 0 wrote the index"
    return (
        f"part {part.label}: {mine} of {total} file(s) are this part's; when every part is done, run "
        f"`streammerge finalize {out_dir}`"
    )


def cuda_usable() -> tuple[bool, str]:
    """Whether the CUDA engine can run here, and if not, why (imports torch)."""
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


def cuda_engine(opts: MergeOptions | None):
    """The CUDA engine configured by the GPU options (``gpu_window_bytes``, ``gpu_register``, ``gpu_slots``)."""
    from .budget import DEFAULT_WINDOW_BYTES
    from .engines.cuda import CudaEngine

    if opts is None:
        return CudaEngine()
    return CudaEngine(
        window_bytes=opts.gpu_window_bytes or DEFAULT_WINDOW_BYTES,
        register_windows=opts.gpu_register,
        slots=opts.gpu_slots,
    )


def select_engine(
    device: str,
    threads: int | None = None,
    opts: MergeOptions | None = None,
    coord: Coordinator | None = None,
    fp8: bool = False,
):
    """The engine for ``device`` ("auto", "cpu", "cuda") and a note saying why it was chosen. Under torchrun each
    rank takes GPU ``LOCAL_RANK``. ``fp8``: the plan computes block-scaled FP8 tensors, which only the engines in
    :data:`FP8_ENGINES` do (both engines this function makes)."""
    if device == "cpu":
        from .engines.cpu import CpuEngine

        return CpuEngine(threads), "cpu (requested)"
    cuda_ok, why = cuda_usable()
    if device == "cuda" and not cuda_ok:
        raise EngineError(f"--device cuda: {why}; use --device cpu or auto")
    if cuda_ok and coord is not None:
        import torch

        torch.cuda.set_device(coord.world.local_rank % torch.cuda.device_count())
    if device == "cuda":
        return cuda_engine(opts), "cuda (requested)"
    if cuda_ok:
        return cuda_engine(opts), "cuda (auto: GPU and triton found)"
    from .engines.cpu import CpuEngine

    return CpuEngine(threads), f"cpu (auto: {why})"


def run(job: Planned, req: RunRequest) -> list[MergeReport]:
    """Run a planned job: pick the engine, open the writer(s) (or the null sink), finalize, optionally verify and
    push; a report per output (one, or one per alpha of a sweep, each in ``out_dir/alpha-A``)."""
    p, ckpts, opts, sink = job.plan, job.inputs, req.options, req.sink
    coord = req.coordinator
    part = Part(coord.world.rank, coord.world.size) if coord is not None else req.part
    if sink not in SINKS:
        raise OptionsError(f"sink: {sink!r} is not disk, null or null-sha256")
    if sink == "disk" and req.out_dir is None:
        raise OptionsError("an output directory is needed (or sink='null')")
    out_dir = req.out_dir if req.out_dir is not None else Path("(null sink)")
    plans = p.variants or [p]
    dirs = [out_dir / sweep_dirname(vp.options.alpha) for vp in p.variants] if p.variants else [out_dir]
    if p.variants:
        refuse_push_for_sweep(req.push_to)
    if part is not None:
        refuse_in_parts(opts, req.push_to)
    if sink == "disk":
        if p.variants:
            refuse_sweep_over_single(out_dir)
        for d in dirs:
            check_output_paths(d, ckpts)
        check_disk_space(p, out_dir)
    fp8 = bool(p.fp8_tensors)
    # With streamed inputs the downloads start before the engine is chosen, so they overlap torch's import (seconds);
    # only --device cuda, which can be refused, is chosen first, before anything is written.
    late = any(streamed(ck) is not None for ck in ckpts.values())
    if late and opts.device == "cuda":
        raise EngineError(STREAM_CUDA_MESSAGE)
    engine, engine_note = (None, "") if late else _engine(opts, coord, fp8)
    if fp8:  # values, not headers: before anything is written (a streamed shard's, before the merge reads it)
        check_fp8_scales(p, ckpts, lambda ck, ref: streamed(ck) is None)
    available = available_memory()
    if available is not None and p.bytes_read > available // 2:
        for ck in ckpts.values():
            if ck is not None:
                ck.drop_cache = True
    guard = InputGuard(ckpts)  # before the identity: a change after either is caught
    inputs = input_identity(ckpts)  # headers hashed once for every output of a sweep
    identities = [merge_identity(vp, ckpts, inputs) for vp in plans]
    if coord is not None:
        where = "".join(os.path.realpath(d) for d in dirs) if sink == "disk" else sink
        agreed = hashlib.sha256(("".join(i["fingerprint"] for i in identities) + where).encode()).hexdigest()
        coord.agree(agreed, "inputs, options, output layout or output directory")
    finalize_here = False
    if part is None and sink == "disk" and any(part_records(d) for d in dirs):
        # the rest of a merge begun in parts: one process finishes it, holding the directory alone
        part, finalize_here = Part(0, 1), True
    smalls = [[path.name for path in vp.aux_files] + ["README.md"] for vp in plans]
    crash_point("planned")
    with contextlib.ExitStack() as stack:
        if sink == "disk":
            writers = [
                OutputWriter(
                    d,
                    vp,
                    ident,
                    resume=req.resume,
                    before_publish=guard.check,
                    share=share_for(vp, part, ident, d, names, exclusive=finalize_here) if part is not None else None,
                )
                for d, vp, ident, names in zip(dirs, plans, identities, smalls)
            ]
            for w in writers:
                if part is None:
                    w.preflight()  # every output is checked before any is touched
            opened = _collective(coord, lambda: [stack.enter_context(w) for w in writers])
            writers = opened if opened is not None else writers
        else:
            own = files_of(p, part) if part is not None else None
            writers = [stack.enter_context(NullWriter(vp, sink == "null-sha256", own)) for vp in plans]
        writer = SweepWriter(p, writers) if p.variants else writers[0]
        streamer = _start_stream(p, ckpts, opts, writer, fp8, stack, out_dir if sink == "disk" else None)
        if engine is None:  # streamed inputs: the CPU engine (auto), chosen now
            engine, engine_note = _engine(opts.replace(device="cpu"), coord, fp8)
            if engine.name != "cpu":  # one handed over some other way (tests inject one)
                raise EngineError(STREAM_CUDA_MESSAGE)
            if opts.device == "auto":
                engine_note = "cpu (auto: --stream merges on the CPU)"
        into = streamer.sink(writer, p, writer.done_files) if streamer is not None else writer
        stats: EngineStats = engine.run(p, ckpts, into, req.progress)
        if streamer is not None:
            streamer.check()
            stats.stage_seconds["wait_download"] = round(streamer.waited(), 3)
            stats.notes += streamer.notes()
        elif opts.stream:
            stats.notes.append("stream: no input is a Hub repository id; nothing was streamed")
        files = []
        for vp, w in zip(plans, writers):
            small = small_files(vp)
            small["README.md"] = model_card(vp).encode()
            files.append(w.finalize(small))
    if coord is not None:
        coord.barrier()  # every rank's files are in place (a rank that never arrives is named)
    if sink == "disk" and (finalize_here or coord is not None):
        _collective(coord, lambda: [finalize_parts(d) for d in dirs], only_rank=0)  # rank 0 publishes, all wait
    root_notes = earlier_sweep_outputs(out_dir, dirs, opts.overwrite, ckpts) if p.variants and sink == "disk" else []
    seconds = time.perf_counter() - req.started
    moved = stats.bytes_read + stats.bytes_written
    pushed = ""
    if req.push_to and sink == "disk":
        pushed = push_verified(out_dir, req.push_to, private=req.private, commit_message=f"streammerge: {p.formula}")
    reports = []
    for k, (d, vp, w) in enumerate(zip(dirs, plans, writers)):
        notes = [f"sweep: output {k + 1} of {len(plans)} from one pass over the inputs"] if p.variants else []
        if part is not None and not finalize_here:
            notes.append(_part_note(part, w, len(vp.files), coord is not None, d))
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
                resumed_shards=len(w.adopted),
                pushed=pushed,
            )
        )
    return reports


def _engine(opts: MergeOptions, coord: Coordinator | None, fp8: bool):
    engine, note = select_engine(opts.device, _threads(opts, coord), opts, coord, fp8=fp8)
    if fp8 and engine.name not in FP8_ENGINES:  # an engine given some other way (tests inject one)
        raise EngineError(FP8_ENGINE_MESSAGE)
    return engine, note


def _start_stream(
    p: MergePlan, ckpts, opts: MergeOptions, writer, fp8: bool, stack, out_dir: Path | None
) -> Streamer | None:
    """With streamed Hub inputs: schedule their shards for the work left (files already done are not fetched),
    check the disk (the output's too, when it is on the same filesystem), start the downloads; the stack stops
    them."""
    gates = {id(g): g for g in (streamed(ck) for ck in ckpts.values()) if g is not None}
    if not gates:
        return None
    sched = schedule(p, ckpts, opts.stream_disk, opts.download_workers, skip=writer.done_files)
    _check_stream_disk(sched.peak, next(iter(gates.values())).folder, p, out_dir)

    def on_arrival(ck, i: int) -> None:
        # read from the file itself: the checkpoint lets nobody map it before this check is done
        import torch

        def read(_, ref):
            with open(streamed(ck).path(i), "rb") as fh:
                fh.seek(ref.offset)
                return torch.frombuffer(bytearray(fh.read(ref.nbytes)), dtype=torch.uint8)

        check_fp8_scales(p, ckpts, lambda c, ref: c is ck and ref.file == i, read)

    streamer = Streamer(sched, opts.download_workers, on_arrival if fp8 else None)
    stack.callback(streamer.stop)
    streamer.start()
    return streamer


def _check_stream_disk(peak: int, folder: Path, p: MergePlan, out_dir: Path | None) -> None:
    import shutil

    try:
        free = shutil.disk_usage(folder).free
        shared = out_dir is not None and os.stat(folder).st_dev == os.stat(out_dir).st_dev
    except OSError:
        return
    need = peak + (p.disk_needed if shared else 0)
    if free < need:
        also = f" plus the output's {p.disk_needed / 1e9:.1f} GB" if shared else ""
        raise OutputError(
            f"{folder}: {free / 1e9:.1f} GB free, but the streamed inputs will use up to {peak / 1e9:.1f} GB there "
            f"at once{also}; free some space, give a smaller --stream-disk, or put them elsewhere with --stream-dir"
        )


def small_files(p: MergePlan) -> dict[str, bytes]:
    """The files copied from the target (config, tokenizer, ...): as they are, except that config.json loses its
    ``quantization_config`` where the output holds no FP8 tensor (``plan.drops_quantization_config``), so
    transformers loads the dequantized model as a plain one."""
    out = {}
    for path in p.aux_files:
        data = path.read_bytes()
        if path.name == "config.json" and p.drops_quantization_config:
            try:
                config = json.loads(data)
            except ValueError:
                raise CheckpointError(f"{path}: not valid JSON; cannot remove its quantization_config") from None
            config.pop("quantization_config", None)
            data = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
        out[path.name] = data
    return out


def check_fp8_scales(p: MergePlan, ckpts, which: Callable | None = None, read: Callable | None = None) -> None:
    """Every block scale the plan computes with must be finite (a zero scale is legal: its block dequantizes to
    zeros). Headers cannot tell, so the values are read here (about 1/4096 of the FP8 bytes with 128x128 F32
    blocks), before any output file exists. ``which(checkpoint, scale_ref)``: check only the scales it accepts
    (a streamed shard's are checked when it arrives); ``read(checkpoint, scale_ref)``: their bytes (default: a
    view of the checkpoint).

    Raises:
        [`CheckpointError`]: naming each offending scale tensor and its file, nothing written.
    """
    seen: set[tuple[int, str]] = set()
    bad: list[str] = []
    for t in p.fp8_tensors:
        if t.op is Op.COPY:
            continue
        for role, scale in t.scales.items():
            ck = ckpts[role]
            key = (id(ck), scale.ref.name)
            if key in seen or which is not None and not which(ck, scale.ref):
                continue
            seen.add(key)
            import torch  # here: a merge whose FP8 inputs are all streamed imports it later, beside the downloads

            from .dtypes import torch_dtype

            ref = scale.ref
            raw = read(ck, ref) if read is not None else ck.view(ref, 0, ref.nbytes)
            values = raw.view(torch_dtype(ref.dtype))
            finite = torch.isfinite(values)
            if not bool(finite.all()):
                i = int((~finite).nonzero()[0, 0])
                pos = list(divmod(i, ref.shape[1])) if ref.shape[1] else [i]
                n = int((~finite).sum())
                g = streamed(ck)
                where = f"{g.source}/{g.files[ref.file].name}" if g is not None else ck.files[ref.file]
                bad.append(f"{ref.name} in {where} ({n} non-finite, first {float(values[i])} at {pos})")
            del values, finite, raw
            if read is None:
                ck.release(ref, 0, ref.nbytes)
    if bad:
        raise CheckpointError(
            f"{len(bad)} block scale tensor(s) hold NaN or infinite scales: {format_name_list(bad)}. A scale must be "
            "finite (0 is fine); the checkpoint is corrupt or was quantized wrongly"
        )


def push_verified(out_dir: Path, repo_id: str, *, private: bool = False, commit_message: str | None = None) -> str:
    """Verify a finished output (structure and the SHA-256 of every weight file), then upload it with
    :func:`hub.push`: a partial or damaged output is never pushed. Returns the commit URL.

    Raises:
        [`OutputError`]: the output did not verify, or the upload failed.
    """
    from . import hub

    report = verify(out_dir)
    if not report.ok:
        raise OutputError(f"{out_dir}: not pushed, the output did not verify: {report.problems[0]}")
    return hub.push(out_dir, repo_id, private=private, commit_message=commit_message)
