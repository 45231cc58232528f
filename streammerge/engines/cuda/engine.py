"""The CUDA engine itself: buffers allocated once, chunks issued on three streams ordered by events, a writer thread
draining pinned output slots; the package docstring describes the pipeline.

One run is a :class:`_Run`; issuing one GPU chunk is five steps, in this order (the order of their event records and
waits is the design)::

    wait for its windows · stage what is not registered · copy in · compute · copy out
"""

from __future__ import annotations

import collections
import dataclasses
import mmap
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ...budget import DEFAULT_DEVICE_SLOTS, DEFAULT_WINDOW_BYTES, default_workers
from ...checkpoint import Checkpoint, TensorRef
from ...dtypes import itemsize
from ...errors import EngineError, OptionsError, StreamMergeError
from ...kernels.reference import OUT_DTYPES
from ...memory import rss_anon
from ...plan import MergePlan, Op, OutTensor, fp8_device_buffers
from ...writer import Sink
from ..output import OutputStage, Piece, hash_files_for, interleave
from ..stats import EngineStats, Progress, ProgressCounter
from ..work import (
    FirstFailure,
    WorkItem,
    out_bytes,
    out_offset,
    record_nonfinite,
    work_bytes,
    work_tensors,
)
from .backend import Backend, Event, Stream
from .device import CudaBackend
from .schedule import (
    DEFAULT_REGISTER_AHEAD_BYTES,
    PAGE,
    POLL_S,
    Key,
    Load,
    Segment,
    SlotRing,
    WindowPlan,
    canonical_roles,
    chunk_loads,
    chunk_sources,
    interval_stats,
    on_gpu,
    plan_windows,
)
from .windows import WindowRunner

# Pinned output slots between the copy-out stream and the writer thread: one being written, one being filled by
# D2H, one spare to absorb jitter in write latency (as the CPU engine's OUTPUT_SLOTS).
DEFAULT_HOST_SLOTS = 3
# Host threads copying mmap pages into pinned staging slots when registration is refused: memcpy into pinned memory
# measured 5.9 / 18.3 / 33.8 GB/s with 1 / 4 / 16 threads on the H200 machine (16 cores); 8 leave cores to the
# writer and to Python.
DEFAULT_COPY_THREADS = 8
# Threads calling cudaHostRegister / cudaHostUnregister: registration pins and faults every page (0.11 s per 4 GiB
# on one thread on the H200, ~37 GB/s, below the ~55 GB/s H2D it feeds); a second thread lets registration keep ahead
# of the copy engine if the kernel's page pinning scales (benchmarks.gpu_check measures 1 vs 4 threads).
DEFAULT_REGISTER_THREADS = 2
# Smallest piece of a staging copy given to one thread: below ~1 MiB the hand-off costs more than the copy.
STAGING_PIECE_MIN = 2**20
# Output bytes per second the device pipeline can deliver: 67-70 GB/s moved with 4 tensors per element on the H200
# machine (docs/hardware.md), a quarter of it output. The output files in flight are sized to hash this.
DEVICE_OUTPUT_RATE = 17e9
# Seconds the issuing thread waits for the writer thread to drain after a failure before it goes on cleaning up.
WRITER_JOIN_TIMEOUT_S = 30

Checkpoints = Mapping[str, Checkpoint | None]


def _checkpoint(ckpts: Checkpoints, role: str) -> Checkpoint:
    ck = ckpts[role]
    if ck is None:
        raise EngineError(f"internal error: a chunk reads the {role} checkpoint, which this merge does not open")
    return ck


class CudaEngine:
    """Merge on a CUDA GPU (see the package docstring for the pipeline). Output bytes equal the CPU engine's.

    Args:
        chunk_bytes (`int`, *optional*): bytes per input per chunk; the plan's ``chunk_bytes`` when not given. GPU
            memory is ``slots x 4 x chunk_bytes``.
        window_bytes (`int`): registration window (grid cell) size, a multiple of the page size.
        slots (`int`): device slots (each 3 inputs + 1 output), at least 2 for overlap.
        host_slots (`int`): pinned output slots between the GPU and the writer thread, at least 2.
        register_windows (`bool`): DMA straight from registered windows of the input mmaps; False: pinned staging.
        register_ahead_bytes (`int`): input bytes registered ahead of the chunk being issued.
        copy_threads (`int`): host threads filling pinned staging slots (staging path only).
        register_threads (`int`): threads registering / unregistering windows.
        device (`torch.device | int | str`, *optional*): the GPU; the current one by default.
        profile (`bool`): time every H2D, kernel and D2H with CUDA events and report busy time per stage and
            their overlap in ``stage_seconds`` (benchmarks; a few µs per chunk).
        backend (`Backend`, *optional*): the device (:class:`CudaBackend` by default; :class:`SimBackend` for tests).
        output_threads (`int`, *optional*): threads writing and hashing the output (one per core by default).
        output_rate (`float`): output bytes per second the pipeline should be able to hash: the number of output
            files in flight (SHA-256 streams) is this over one core's measured SHA-256 rate, at most one per output
            thread and per file (``output.hash_files_for``).

    Raises:
        [`OptionsError`]: a non-positive size or too few slots.

    Example:
        ```py
        >>> engine = CudaEngine(chunk_bytes=64 * 2**20)
        >>> stats = engine.run(plan, ckpts, writer)  # as CpuEngine.run
        ```
    """

    name = "cuda"

    def __init__(
        self,
        chunk_bytes: int | None = None,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        slots: int = DEFAULT_DEVICE_SLOTS,
        host_slots: int = DEFAULT_HOST_SLOTS,
        register_windows: bool = True,
        register_ahead_bytes: int = DEFAULT_REGISTER_AHEAD_BYTES,
        copy_threads: int = DEFAULT_COPY_THREADS,
        register_threads: int = DEFAULT_REGISTER_THREADS,
        device=None,
        profile: bool = False,
        backend: Backend | None = None,
        output_threads: int | None = None,
        output_rate: float = DEVICE_OUTPUT_RATE,
    ):
        if chunk_bytes is not None and chunk_bytes < 4096:
            raise OptionsError(f"CUDA engine: chunk_bytes must be at least 4096, got {chunk_bytes}")
        if window_bytes <= 0 or window_bytes % PAGE:
            raise OptionsError(f"CUDA engine: window_bytes must be a positive multiple of {PAGE}, got {window_bytes}")
        if slots < 1 or host_slots < 2:
            raise OptionsError(f"CUDA engine: needs >= 1 device slot and >= 2 host slots, got {slots}/{host_slots}")
        if register_ahead_bytes < 0 or copy_threads < 1 or register_threads < 1:
            raise OptionsError("CUDA engine: register_ahead_bytes must be >= 0, copy/register threads >= 1")
        self.chunk_bytes = chunk_bytes
        self.window_bytes = window_bytes
        self.slots = slots
        self.host_slots = host_slots
        self.register_windows = register_windows
        self.register_ahead_bytes = register_ahead_bytes
        self.copy_threads = copy_threads
        self.register_threads = register_threads
        self.device = device
        self.profile = profile
        self.backend = backend
        self.output_threads = output_threads
        self.output_rate = output_rate

    def run(
        self,
        plan: MergePlan,
        ckpts: Checkpoints,
        writer: Sink,
        progress: Callable[[Progress], None] | None = None,
    ) -> EngineStats:
        """Merge every output file of ``plan`` not in ``writer.done_files`` into ``writer`` (as `CpuEngine.run`).

        Returns:
            [`EngineStats`]: chunks, bytes, peak GPU memory (``torch.cuda.max_memory_allocated`` after a reset at
            the start), host stage timers and, with ``profile``, GPU busy time per stage and their overlap.

        Raises:
            [`EngineError`]: no GPU, or a CUDA failure. [`NonFiniteError`]: ``check_finite`` with ``strict``.
            [`OutputError`]: from the writer.
        """
        be = self.backend if self.backend is not None else CudaBackend(self.device)
        stats = EngineStats(device=be.name)
        old_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # our own threads run torch's CPU ops; no OpenMP pool spinning beside them
        try:
            _Run(self, be, plan, ckpts, writer, progress, stats).execute()
        finally:
            torch.set_num_threads(old_threads)
        return stats


# ---------------------------------------------------------------------------------------------- what a run reads
@dataclass
class GpuWork:
    """What one run reads: every chunk in work order, the ones computed on the GPU, and the windows over them.

    Attributes:
        items (`list[WorkItem]`): every chunk of the files to write, in work order (each file's in output order; a
            window of files in turn, ``plan_gpu_work``).
        gpu_items (`list[WorkItem]`): the MERGE and CONVERT chunks (GPU chunk ``g`` is ``gpu_items[g]``).
        canon (`dict[str, str]`): role -> the role whose checkpoint (and mappings) it shares.
        maps / bases (`dict[Key, ...]`): each file key's read-only mapping and its address.
        windows (`WindowPlan`): the registration windows over the GPU chunks' sources.
        inputs_max / terms_max (`int`): the most inputs, and vectors, of one GPU chunk (sizes the device slots).
        fp8_inputs / fp8_out / scale_bytes (`int`, `bool`, `int`): block-scaled FP8 (``plan.fp8_device_buffers``):
            the most FP8 inputs of one band chunk, whether some output is FP8, the largest scale rows of a band.
        band_bytes (`int`): the largest band chunk in float32 (a device slot holds at least that).
    """

    items: list[WorkItem]
    gpu_items: list[WorkItem]
    canon: dict[str, str]
    maps: dict[Key, mmap.mmap]
    bases: dict[Key, int]
    windows: WindowPlan
    inputs_max: int
    terms_max: int
    fp8_inputs: int = 0
    fp8_out: bool = False
    scale_bytes: int = 0
    band_bytes: int = 0


def plan_gpu_work(
    plan: MergePlan,
    ckpts: Checkpoints,
    skip: set[int] | frozenset[int],
    window_bytes: int,
    ahead_bytes: int,
    files: int = 1,
) -> GpuWork:
    """The chunks of ``plan`` (files in ``skip`` left out), what each GPU chunk reads and the windows over it.

    ``files`` output files are in flight at once, their chunks taken in turn (``output.interleave``: each file's
    SHA-256 stream then runs beside the others'); 1: output order. Maps every input file a GPU chunk reads
    (``Checkpoint.mapping``)."""
    items = list(interleave(plan, skip, files))
    gpu_items = [item for item in items if on_gpu(item)]
    canon = canonical_roles(ckpts)
    sources = chunk_sources(gpu_items, canon)
    maps: dict[Key, mmap.mmap] = {}
    bases: dict[Key, int] = {}
    for srcs in sources:
        for s in srcs:
            if s.key not in maps:
                m = _checkpoint(ckpts, s.key[0]).mapping(s.key[1])
                maps[s.key] = m
                # The mapping's address: a one-byte zero-copy view (ctypes cannot take a read-only buffer).
                bases[s.key] = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
    windows = plan_windows(sources, {k: len(m) for k, m in maps.items()}, window_bytes, ahead_bytes)
    inputs_max = max([len(_inputs(it)) for it in gpu_items] or [1])
    terms_max = max([len(_tensor(it).terms) for it in gpu_items if it.op is Op.MERGE] or [0])
    # Sized over the whole plan, as plan.expected_gpu_memory counts them (files already written change nothing).
    fp8_inputs, fp8_out, scale_bytes = fp8_device_buffers(plan.tensors)
    bands = [min(t.band_rows, t.shape[0]) * t.shape[1] * 4 for t in plan.tensors if t.band_rows]
    return GpuWork(
        items,
        gpu_items,
        canon,
        maps,
        bases,
        windows,
        inputs_max,
        terms_max,
        fp8_inputs,
        fp8_out,
        scale_bytes,
        max(bands or [0]),
    )


def _tensor(item: WorkItem) -> OutTensor:
    """The tensor of a chunk that has one (every chunk but an empty file's)."""
    if item.tensor is None:
        raise EngineError("internal error: a chunk without a tensor reached the device")
    return item.tensor


def _inputs(item: WorkItem) -> list[tuple[str, TensorRef]]:
    """The (role, tensor) inputs a GPU chunk reads, as the CPU engine: CONVERT the target; MERGE the target (unless
    extracting a vector), then each vector's plus and minus tensors (no minus for a stored vector)."""
    return _tensor(item).inputs(item.op)


# ---------------------------------------------------------------------------------------------- buffers and streams
class _Buffers:
    """Every device and pinned buffer of a run, allocated once before the first chunk (the steady state allocates
    nothing); the staging slots and their copy threads only once a chunk needs them."""

    def __init__(
        self,
        be: Backend,
        slots: int,
        host_slots: int,
        slot_bytes: int,
        inputs: int,
        outputs: int,
        accumulator: bool,
        check_finite: bool,
        copy_threads: int,
        fp8_inputs: int = 0,
        fp8_out: bool = False,
        scale_bytes: int = 0,
    ):
        self.be = be
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.inputs = inputs
        self.copy_threads = copy_threads
        # Per device slot, every buffer a chunk's loads land in (chunk_loads' order maps onto it, see load_slots):
        # the inputs' elements, then the block-scale rows of FP8 inputs.
        self.load_bytes = [slot_bytes] * inputs + [scale_bytes] * fp8_inputs
        self.dev_loads = [[be.device_buffer(nb) for nb in self.load_bytes] for _ in range(slots)]
        self.dev_in = [loads[:inputs] for loads in self.dev_loads]
        self.dev_out = [[be.device_buffer(slot_bytes) for _ in range(outputs)] for _ in range(slots)]  # per output
        # An FP8 output's pinned slot holds its band's codes, then the band's new scale rows.
        self.host_bytes = slot_bytes + (scale_bytes if fp8_out else 0)
        self.host_out = [be.host_buffer(self.host_bytes) for _ in range(host_slots)]
        # A float32 accumulator per device slot (several vectors).
        self.dev_acc = [be.device_buffer(slot_bytes).view(torch.float32) for _ in range(slots)] if accumulator else []
        # Block-scaled FP8, per device slot: each FP8 input dequantized to float32; for FP8 output the float32 r and
        # each output's new scale rows.
        self.dev_f32 = [
            [be.device_buffer(slot_bytes).view(torch.float32) for _ in range(fp8_inputs)] for _ in range(slots)
        ]
        self.dev_r = [be.device_buffer(slot_bytes).view(torch.float32) for _ in range(slots)] if fp8_out else []
        self.dev_scale_out = (
            [[be.device_buffer(scale_bytes) for _ in range(outputs)] for _ in range(slots)] if fp8_out else []
        )
        self.nf_dev: list[torch.Tensor] = []
        self.nf_host: list[torch.Tensor] = []
        if check_finite:
            self.nf_dev = [be.device_buffer(8 * outputs).view(torch.int64) for _ in range(slots)]
            self.nf_host = [be.host_buffer(8).view(torch.int64) for _ in range(host_slots)]
        self._staging: list[list[torch.Tensor]] | None = None
        self._copy_pool: ThreadPoolExecutor | None = None

    def staging(self) -> tuple[list[list[torch.Tensor]], ThreadPoolExecutor]:
        """The pinned staging slots (per device slot, per input) and the threads that fill them: made once, from the
        start without registration, else at the first refusal."""
        if self._staging is None or self._copy_pool is None:
            self._staging = [[self.be.host_buffer(nb) for nb in self.load_bytes] for _ in range(self.slots)]
            self._copy_pool = ThreadPoolExecutor(
                self.copy_threads, thread_name_prefix="sm-stage", initializer=torch.set_num_threads, initargs=(1,)
            )
        return self._staging, self._copy_pool

    def staging_slot(self, k: int, r: int) -> torch.Tensor:
        """Staging slot of device slot ``k``, load buffer ``r`` (made by :meth:`staging`)."""
        staging, _ = self.staging()
        return staging[k][r]

    def load_slots(self, loads: list[Load]) -> list[int]:
        """The load buffer (index into ``dev_loads[k]`` and the staging slots) of each of a chunk's loads: its
        inputs first, in order, then its FP8 inputs' scale rows after every input buffer."""
        n_ins = sum(1 for ld in loads if not ld.scale)
        return list(range(n_ins)) + [self.inputs + j for j in range(len(loads) - n_ins)]

    def shutdown(self) -> None:
        """Stop the staging copy threads (after the last chunk, or a failure)."""
        if self._copy_pool is not None:
            self._copy_pool.shutdown(wait=True)


class _Streams:
    """The copy-in, compute and copy-out streams, the per-slot events that order them, and the profile's events.

    Events per device slot ``k``: ``in_done`` (its inputs are on the device), ``comp_done`` (its kernels ran),
    ``d2h_done`` (its output left); per pinned slot ``p``: ``out_ready`` (its bytes arrived)."""

    def __init__(self, be: Backend, slots: int, host_slots: int, profiled_chunks: int):
        self.s_in: Stream = be.stream()
        self.s_comp: Stream = be.stream()
        self.s_out: Stream = be.stream()
        self.in_done: list[Event] = [be.event() for _ in range(slots)]
        self.comp_done: list[Event] = [be.event() for _ in range(slots)]
        self.d2h_done: list[Event] = [be.event() for _ in range(slots)]
        self.out_ready: list[Event] = [be.event() for _ in range(host_slots)]
        self.start: Event = be.event(timing=True)
        self.end: Event = be.event(timing=True)
        # Per profiled GPU chunk: H2D begin/end, kernel begin/end, D2H begin/end.
        self.prof: list[list[Event]] = [[be.event(timing=True) for _ in range(6)] for _ in range(profiled_chunks)]


@dataclass
class _Job:
    kind: str  # "slot" (GPU chunk in pinned slots) or "view" (bytes straight from the mmap, or nothing)
    item: WorkItem
    n_in: int
    slots: list[int] = field(default_factory=list)  # one pinned slot per output (one for all when they agree)
    gpu_index: int = -1
    view: torch.Tensor | None = None
    count_nonfinite: bool = False
    # An FP8 output's band: its new scale rows follow the codes in each pinned slot (``scale_bytes`` of them), and
    # belong at ``scale_at`` bytes into the weight's scale tensor.
    scale_bytes: int = 0
    scale_at: int = 0


# ---------------------------------------------------------------------------------------------- the writer thread
class _WriterThread:
    """Drains finished chunks in order: waits for a slot's D2H, tells the window thread which windows the chunk is
    done with, and hands the slot's bytes to the output stage (engines/output.py: written on a pool, hashed per file
    in offset order); the slot goes back once they are written and hashed."""

    def __init__(self, run: _Run):
        self.run = run
        self.queue: queue.Queue[_Job | None] = queue.Queue(maxsize=run.host_slots + 8)
        # An FP8 output's new block scales, per tensor and output: filled band by band, written after the weight's
        # last band (the scales follow their weight in the file, and every file is hashed in offset order).
        self.scales: dict[int, list[torch.Tensor]] = {}
        self.thread = threading.Thread(target=self._loop, name="sm-writer", daemon=True)

    def put(self, job: _Job) -> None:
        """Queue ``job``, giving up when a failure is recorded (the writer may have stopped taking jobs)."""
        while True:
            self.run.failure.check()
            try:
                self.queue.put(job, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def drain(self) -> None:
        """Drop every queued job (after a failure), then tell the thread to stop."""
        try:
            while True:
                job = self.queue.get_nowait()
                if job is not None and job.kind == "slot":
                    for p in job.slots:
                        self.run.ring.release(p)
        except queue.Empty:
            pass
        self.queue.put(None)

    def _loop(self) -> None:
        run = self.run
        run.be.bind_thread()  # events of this GPU are synchronised from here
        while True:
            job = self.queue.get()
            if job is None:
                return
            handed = False
            try:
                if run.failure.exc is None:
                    handed = self._finish(job)
            except BaseException as e:  # noqa: BLE001 - handed to the issuing thread
                run.failure.set(e)
            finally:
                if not handed:
                    job.view = None
                    if job.kind == "slot":
                        for p in job.slots:
                            run.ring.release(p)

    def _finish(self, job: _Job) -> bool:
        """Hand ``job`` to the output stage; True once it owns the job's slots (it gives them back)."""
        run = self.run
        item, t = job.item, job.item.tensor
        seq = run.output.reserve(item)
        if job.kind == "slot":
            self._wait_slots(job)
            run.runner.release_after(job.gpu_index)  # the chunk's inputs are on the device and done with
        t0 = time.perf_counter()
        pieces: list[Piece] = []
        if t is not None and item.stop > item.start:
            if job.kind == "slot":
                pieces = self._slot_pieces(job, t)
            elif job.view is not None:
                pieces = [Piece(t.offset + item.start, job.view.numpy())]
        run.timers["hand_over"] += time.perf_counter() - t0
        view, slots = job.view, list(job.slots) if job.kind == "slot" else []
        job.view = None

        def on_done() -> None:
            for p in slots:
                run.ring.release(p)
            if view is not None:
                self._release_view(item)

        run.output.submit(seq, item, pieces, job.n_in, on_done)
        return True

    def _wait_slots(self, job: _Job) -> None:
        """Wait for the D2H into each of the job's pinned slots; record the non-finite counts that came with it."""
        run = self.run
        t0 = time.perf_counter()
        many = len(job.slots) > 1
        for j, p in enumerate(job.slots):
            run.be.sync_event(run.streams.out_ready[p])
            if job.count_nonfinite:
                n_bad = int(run.buf.nf_host[p][0])
                record_nonfinite(_tensor(job.item), n_bad, run.opts.strict, run.stats, j if many else None)
        run.timers["wait_gpu"] += time.perf_counter() - t0

    def _slot_pieces(self, job: _Job, t: OutTensor) -> list[Piece]:
        run, item = self.run, job.item
        many = len(job.slots) > 1
        n_b = out_bytes(t, item)
        key = id(t)
        if job.scale_bytes and item.start == 0:
            assert t.scale_out is not None
            self.scales[key] = [torch.empty(t.scale_out.nbytes, dtype=torch.uint8) for _ in job.slots]
        pieces = []
        for j, p in enumerate(job.slots):
            if job.scale_bytes:
                new = run.buf.host_out[p][n_b : n_b + job.scale_bytes]
                self.scales[key][j][job.scale_at : job.scale_at + job.scale_bytes].copy_(new)
            data = run.buf.host_out[p][:n_b]
            pieces.append(Piece(t.offset + out_offset(t, item), data.numpy(), j if many else None))
        if job.scale_bytes and item.last_of_tensor:
            assert t.scale_out is not None
            for j, scales in enumerate(self.scales.pop(key)):
                pieces.append(Piece(t.scale_out.offset, scales.numpy(), j if many else None, after=True))
        return pieces

    def _release_view(self, item: WorkItem) -> None:
        # Drop the copied pages from this process, unless a registered window holds them: pages pinned for DMA are
        # left mapped (an unregistration drops them later).
        run, t = self.run, _tensor(item)
        a, b = t.target.offset + item.start, t.target.offset + item.stop
        if not run.runner.overlaps_occupied((run.work.canon["target"], t.target.file), a, b):
            _checkpoint(run.ckpts, "target").release(t.target, item.start, item.stop)


# ---------------------------------------------------------------------------------------------- one run
class _Run:
    """One run of :class:`CudaEngine` over a plan: what it reads, its buffers, streams and threads, and the issuing
    thread's steps."""

    def __init__(
        self,
        engine: CudaEngine,
        be: Backend,
        plan: MergePlan,
        ckpts: Checkpoints,
        writer: Sink,
        progress: Callable[[Progress], None] | None,
        stats: EngineStats,
    ):
        self.t_wall = time.perf_counter()
        self.engine, self.be, self.plan, self.ckpts, self.writer, self.stats = engine, be, plan, ckpts, writer, stats
        self.opts = opts = plan.options
        chunk = engine.chunk_bytes or opts.chunk_bytes
        eplan = (
            plan
            if chunk == opts.chunk_bytes
            else dataclasses.replace(plan, options=dataclasses.replace(opts, chunk_bytes=chunk))
        )
        self.slot_bytes = max(4, eplan.options.chunk_elems * 4)
        skip = writer.done_files
        self.n_out = n_out = plan.outputs
        # A sweep's chunk takes one pinned slot per output at once: two chunks' worth plus a spare keep the GPU
        # issuing the next chunk while the writer drains the previous one (as the CPU engine's output_slots).
        self.slots = engine.slots
        # Output files in flight: as many SHA-256 streams as the pipeline's output rate needs, from this machine's
        # measured hash rate (output.hash_files_for), at most one per core and per file; each stream in flight
        # holds a pinned slot beside the one being filled.
        self.output_threads = engine.output_threads or default_workers()
        self.hash_files = hash_files_for(engine.output_rate, self.output_threads, len(plan.files) - len(skip))
        host = max(engine.host_slots, self.hash_files + 1)
        self.host_slots = host if n_out == 1 else max(host, 2 * n_out + 1)
        self.work = work = plan_gpu_work(
            eplan, ckpts, skip, engine.window_bytes, engine.register_ahead_bytes, self.hash_files
        )
        self.bound_bytes, self.bound_count = work.windows.live(self.host_slots)
        # A band chunk of an FP8 tensor is whole block rows: its float32 fits the plan's chunk, not necessarily an
        # engine chunk chosen smaller.
        self.slot_bytes = max(self.slot_bytes, work.band_bytes)

        self.timers: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.failure = FirstFailure()
        self.runner = WindowRunner(
            be,
            work.windows,
            work.maps,
            work.bases,
            {key: (_checkpoint(ckpts, key[0]), key[1]) for key in work.maps},
            register=engine.register_windows,
            failure=self.failure,
            timers=self.timers,
            threads=engine.register_threads,
        )
        self.ring = SlotRing(self.host_slots)

        be.reset_peak()
        self.buf = _Buffers(
            be,
            self.slots,
            self.host_slots,
            self.slot_bytes,
            work.inputs_max,
            n_out,
            accumulator=work.terms_max > 1,
            check_finite=opts.check_finite,
            copy_threads=engine.copy_threads,
            fp8_inputs=work.fp8_inputs,
            fp8_out=work.fp8_out,
            scale_bytes=work.scale_bytes,
        )
        if not engine.register_windows:
            self.buf.staging()
        self.streams = _Streams(be, self.slots, self.host_slots, len(work.gpu_items) if engine.profile else 0)
        be.record(self.streams.s_in, self.streams.start)
        self.report = ProgressCounter(stats, progress, work_bytes(plan, skip), work_tensors(plan, skip))
        self.output = OutputStage(plan, writer, stats, self.failure, self.report, self.output_threads, self.timers)
        self.writer_thread = _WriterThread(self)
        self.n_direct = self.n_staged = 0

    # ----- the issuing thread
    def execute(self) -> None:
        """Issue every chunk, wait for the writer and the device, close everything; then the stats."""
        wt = self.writer_thread
        wt.thread.start()
        self.runner.start()
        peak_rss = rss_anon()
        try:
            g = -1
            for item in self.work.items:
                self.failure.check()
                self.stats.chunks += 1
                if not on_gpu(item):
                    self._issue_view(item)
                    continue
                g += 1
                self._issue_gpu(g, item)
                peak_rss = max(peak_rss, rss_anon())
            self.be.record(self.streams.s_out, self.streams.end)
            wt.queue.put(None)
            wt.thread.join()
            self.failure.check()
            self.output.drain()
            self.be.synchronize()
        except BaseException:
            self._abort()
            raise
        self._close()
        self._collect_stats(peak_rss)

    def _issue_view(self, item: WorkItem) -> None:
        """Bytes straight from the target's mapping to the writer (COPY), or nothing (an empty tensor or file)."""
        t = item.tensor
        view, n_in = None, 0
        if t is not None and item.op is Op.COPY and item.stop > item.start:
            view = _checkpoint(self.ckpts, "target").view(t.target, item.start, item.stop)
            n_in = item.stop - item.start
        self.writer_thread.put(_Job("view", item, n_in, view=view))

    def _issue_gpu(self, g: int, item: WorkItem) -> None:
        """GPU chunk ``g`` in device slot ``g % slots``: inputs in, kernels, output out into pinned slots, then handed
        to the writer."""
        t_issue = time.perf_counter()
        self.runner.advance(g)
        k = g % self.slots
        loads = chunk_loads(item)
        bufs = self.buf.load_slots(loads)
        segs = self.work.windows.segments[g]
        direct, t_wait = self._wait_windows(segs)
        if not all(direct):
            t_wait += self._stage(k, loads, bufs, segs, direct)
        self._copy_in(g, k, loads, bufs, segs, direct)
        out_views, count, scale_bytes = self._compute(g, k, item, loads, bufs)
        ps, dt = self._copy_out(g, k, out_views, count, scale_bytes)
        t_wait += dt
        job = _Job("slot", item, sum(ld.nbytes for ld in loads), slots=ps, gpu_index=g, count_nonfinite=count)
        if scale_bytes:
            t = _tensor(item)
            assert t.block is not None and t.scale_out is not None  # an FP8 output
            job.scale_bytes = scale_bytes
            job.scale_at = item.start // t.shape[1] // t.block[0] * (t.scale_out.nbytes // t.scale_out.shape[0])
        self.writer_thread.put(job)
        self.timers["issue"] += time.perf_counter() - t_issue - t_wait

    def _wait_windows(self, segs: list[list[Segment]]) -> tuple[list[bool], float]:
        """Wait until every window the chunk reads is open; per input, whether all of them are registered (its
        bytes are DMA'd in place), and the seconds waited."""
        t0 = time.perf_counter()
        # Every window of the chunk is waited for (no short cut): its registration is the read-ahead too.
        check = self.failure.check
        direct = [all([self.runner.wait_ready(sg.window, check) for sg in s]) for s in segs]
        t_wait = time.perf_counter() - t0
        self.timers["wait_window"] += t_wait
        return direct, t_wait

    def _segment_view(self, role: str, ref: TensorRef, seg: Segment) -> torch.Tensor:
        return _checkpoint(self.ckpts, role).view(ref, seg.start - ref.offset, seg.stop - ref.offset)

    def _stage(
        self, k: int, loads: list[Load], bufs: list[int], segs: list[list[Segment]], direct: list[bool]
    ) -> float:
        """Copy the loads that are not in registered windows into device slot ``k``'s pinned staging slots, with
        parallel host copies, once the previous H2D out of them is done; returns the seconds it took."""
        staging, pool = self.buf.staging()
        t0 = time.perf_counter()
        self.be.sync_event(self.streams.in_done[k])  # the previous H2D out of these staging slots has completed
        t1 = time.perf_counter()
        pieces = []
        for r, ld in enumerate(loads):
            if direct[r]:
                continue
            for sg in segs[r]:
                src = self._segment_view(ld.role, ld.ref, sg)
                step = max(STAGING_PIECE_MIN, -(-src.numel() // self.engine.copy_threads))
                for a in range(0, src.numel(), step):
                    b = min(src.numel(), a + step)
                    pieces.append((staging[k][bufs[r]][sg.dst + a : sg.dst + b], src[a:b]))
        list(pool.map(lambda p: p[0].copy_(p[1]), pieces))
        self.timers["wait_staging"] += t1 - t0
        self.timers["pack"] += time.perf_counter() - t1
        return time.perf_counter() - t0

    def _copy_in(
        self,
        g: int,
        k: int,
        loads: list[Load],
        bufs: list[int],
        segs: list[list[Segment]],
        direct: list[bool],
    ) -> None:
        """H2D on the copy-in stream, once the kernel that last read this device slot is done."""
        be, st, buf = self.be, self.streams, self.buf
        be.wait(st.s_in, st.comp_done[k])
        if self.engine.profile:
            be.record(st.s_in, st.prof[g][0])
        for r, ld in enumerate(loads):
            dev = buf.dev_loads[k][bufs[r]]
            if direct[r]:
                for sg in segs[r]:
                    src = self._segment_view(ld.role, ld.ref, sg)
                    be.h2d(st.s_in, dev[sg.dst : sg.dst + (sg.stop - sg.start)], src)
                self.n_direct += 1
            else:
                be.h2d(st.s_in, dev[: ld.nbytes], buf.staging_slot(k, bufs[r])[: ld.nbytes])
                self.n_staged += 1
        if self.engine.profile:
            be.record(st.s_in, st.prof[g][1])
        be.record(st.s_in, st.in_done[k])

    def _compute(
        self, g: int, k: int, item: WorkItem, loads: list[Load], bufs: list[int]
    ) -> tuple[list[torch.Tensor], bool, int]:
        """The kernels on the compute stream, once the chunk's inputs are in and the D2H that last read this output
        slot is done; returns the output views (one per output that differs), whether non-finite counts come with
        them, and the bytes of new block-scale rows in each output's scale buffer (an FP8 output; else 0)."""
        be, st, buf = self.be, self.streams, self.buf
        t = _tensor(item)
        n = item.stop - item.start
        be.wait(st.s_comp, st.in_done[k])
        be.wait(st.s_comp, st.d2h_done[k])
        if self.engine.profile:
            be.record(st.s_comp, st.prof[g][2])
        n_o = self.n_out if item.op is Op.MERGE and t.outputs_differ else 1
        scale_bytes = 0
        if t.band_rows:
            out_views, count, scale_bytes = self._compute_band(k, item, loads, bufs, n_o)
        else:
            views = [buf.dev_in[k][r][: ld.nbytes].view(OUT_DTYPES[ld.ref.dtype]) for r, ld in enumerate(loads)]
            out_b = n * itemsize(t.dtype)
            out_views = [buf.dev_out[k][j][:out_b].view(OUT_DTYPES[t.dtype]) for j in range(n_o)]
            count = self.opts.check_finite and item.op is Op.MERGE
            if item.op is Op.MERGE:
                self._merge(k, t, n, views, out_views, t.dtype, count)
            else:
                be.convert(st.s_comp, views[0], t.dtype, out_views[0])
        if self.engine.profile:
            be.record(st.s_comp, st.prof[g][3])
        be.record(st.s_comp, st.comp_done[k])
        return out_views, count, scale_bytes

    def _compute_band(
        self, k: int, item: WorkItem, loads: list[Load], bufs: list[int], n_o: int
    ) -> tuple[list[torch.Tensor], bool, int]:
        """A band chunk of a block-scaled FP8 tensor (docs/numerics.md): each FP8 input dequantized to float32 on
        the device (its codes and scale rows came with the chunk), plain inputs as they are; then the float32
        contract, and the output rounded once (plain dtype) or r requantized on the target's grid (FP8 output:
        codes into ``dev_out``, the band's new scale rows into ``dev_scale_out``). As ``compute_fp8_chunk`` of the
        CPU engine, non-finite results are counted for a dequantized copy (CONVERT) too, and for an FP8 output in r.
        """
        be, s_comp, buf = self.be, self.streams.s_comp, self.buf
        t = _tensor(item)
        cols = t.shape[1]
        n = item.stop - item.start
        rows = n // cols
        ins = _inputs(item)
        views: list[torch.Tensor] = []  # per input, flat: float32 (dequantized) or its own dtype
        target_codes: tuple[torch.Tensor, torch.Tensor] | None = None
        fp8 = 0
        for r, (role, ref) in enumerate(ins):
            sc = t.scales.get(role)
            raw = buf.dev_in[k][r]
            if sc is None:
                views.append(raw[: n * itemsize(ref.dtype)].view(OUT_DTYPES[ref.dtype]))
                continue
            ld = loads[len(ins) + fp8]
            assert ld.scale and ld.role == role  # chunk_loads: scale rows in input order
            q = raw[:n].view(rows, cols)
            scale = buf.dev_loads[k][bufs[len(ins) + fp8]][: ld.nbytes].view(OUT_DTYPES[sc.ref.dtype])
            x = buf.dev_f32[k][fp8][:n]
            be.dequantize_fp8(s_comp, q, scale.view(-1, sc.ref.shape[1]), sc.block, ref.dtype, x.view(rows, cols))
            if r == 0 and (item.op is Op.CONVERT or t.base):
                target_codes = (q, scale.view(-1, sc.ref.shape[1]))
            views.append(x)
            fp8 += 1
        count = self.opts.check_finite
        if item.op is Op.CONVERT:
            out = buf.dev_out[k][0][: n * itemsize(t.dtype)].view(OUT_DTYPES[t.dtype])
            be.convert(s_comp, views[0], t.dtype, out)
            if count:
                be.count_nonfinite(s_comp, out, views, buf.nf_dev[k][0:1])
            return [out], count, 0
        if not t.fp8_out:
            out_views = [buf.dev_out[k][j][: n * itemsize(t.dtype)].view(OUT_DTYPES[t.dtype]) for j in range(n_o)]
            self._merge(k, t, n, views, out_views, t.dtype, count)
            return out_views, count, 0
        assert target_codes is not None and t.block is not None and t.scale_out is not None  # FP8 output: FP8 target
        t_q, t_scale = target_codes
        br, gcols = t.block[0], t.scale_out.shape[1]
        grid_rows = -(-rows // br)
        scale_bytes = grid_rows * (t.scale_out.nbytes // t.scale_out.shape[0])
        codes = [buf.dev_out[k][j][:n] for j in range(n_o)]
        r32 = buf.dev_r[k][:n]

        def requantize(j: int) -> None:
            new_scale = buf.dev_scale_out[k][j][:scale_bytes].view(OUT_DTYPES[t.scale_out.dtype])
            be.requantize_fp8(
                s_comp, r32.view(rows, cols), t_q, t_scale, t.block, codes[j].view(rows, cols),
                new_scale.view(grid_rows, gcols),
            )  # fmt: skip

        # Every output's r in one float32 buffer, each requantized before the next one overwrites it (one stream).
        self._merge(k, t, n, views, [r32] * n_o, "F32", count, requantize)
        return codes, count, scale_bytes

    def _merge(
        self,
        k: int,
        t: OutTensor,
        n: int,
        views: list[torch.Tensor],
        out_views: list[torch.Tensor],
        out_dtype: str,
        count: bool,
        then: Callable[[int], None] | None = None,
    ) -> None:
        """A MERGE chunk's kernels: per output, one kernel per vector, into ``out_views[j]`` in ``out_dtype``; then
        the non-finite count and ``then(j)`` (an FP8 output's requantization of that float32 result)."""
        be, s_comp = self.be, self.streams.s_comp
        tv = views[0] if t.base else None
        rest = list(views[1:] if t.base else views)
        pairs: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for term in t.terms:
            plus = rest.pop(0)
            pairs.append((plus, rest.pop(0) if term.minus_ref is not None else None))
        for j, out_view in enumerate(out_views):
            alphas = t.alphas_for(j)
            if len(pairs) == 1:
                be.merge(s_comp, tv, pairs[0][1], pairs[0][0], alphas[0], out_dtype, out_view)
            else:
                # Several vectors: r = r + a_i * (p_i - m_i) left to right in a float32 accumulator (the kernel's
                # float32 store keeps every bit but a NaN's payload, and a NaN stays NaN to the end), then one
                # rounding into the output: the CPU engine's bytes.
                acc = self.buf.dev_acc[k][:n]
                prev = tv
                for i, (pv, mv) in enumerate(pairs):
                    last = i == len(pairs) - 1
                    dst, dt = (out_view, out_dtype) if last else (acc, "F32")
                    be.merge(s_comp, prev, mv, pv, alphas[i], dt, dst)
                    prev = acc
            if count:
                be.count_nonfinite(s_comp, out_view, views, self.buf.nf_dev[k][j : j + 1])
            if then is not None:
                then(j)

    def _copy_out(
        self, g: int, k: int, out_views: list[torch.Tensor], count: bool, scale_bytes: int = 0
    ) -> tuple[list[int], float]:
        """D2H on the copy-out stream into pinned output slots the writer has given back (one per output that
        differs), an FP8 output's new scale rows (``scale_bytes``) right after its codes; returns the slots and the
        seconds spent waiting for them."""
        be, st, buf = self.be, self.streams, self.buf
        out_b = out_views[0].numel() * out_views[0].element_size()
        t0 = time.perf_counter()
        ps = [self.ring.acquire(self.failure.check) for _ in out_views]
        dt = time.perf_counter() - t0
        self.timers["wait_out_slot"] += dt
        be.wait(st.s_out, st.comp_done[k])
        if self.engine.profile:
            be.record(st.s_out, st.prof[g][4])
        for j, p in enumerate(ps):
            be.d2h(st.s_out, buf.host_out[p][:out_b], buf.dev_out[k][j][:out_b])
            if scale_bytes:
                be.d2h(st.s_out, buf.host_out[p][out_b : out_b + scale_bytes], buf.dev_scale_out[k][j][:scale_bytes])
            if count:
                be.d2h(st.s_out, buf.nf_host[p], buf.nf_dev[k][j : j + 1])
        if self.engine.profile:
            be.record(st.s_out, st.prof[g][5])
        be.record(st.s_out, st.d2h_done[k])
        for p in ps:
            be.record(st.s_out, st.out_ready[p])
        return ps, dt

    # ----- the end
    def _abort(self) -> None:
        """After a failure: stop the writer, let the device finish what it was given (no DMA may still read a
        window or write a slot once windows are unregistered and buffers freed), then close everything."""
        self.failure.set(StreamMergeError("merge interrupted"))
        wt = self.writer_thread
        wt.drain()
        wt.thread.join(timeout=WRITER_JOIN_TIMEOUT_S)
        try:
            self.be.synchronize()
        except Exception as e:  # noqa: BLE001 - a broken device: report the original error, not this one
            self.stats.notes.append(f"cuda engine: device synchronisation after a failure failed ({e})")
        self._close()

    def _close(self) -> None:
        self.output.shutdown()  # every write and digest has returned: no thread reads a pinned slot any more
        self.runner.close()
        self.buf.shutdown()

    def _collect_stats(self, peak_rss: int) -> None:
        be, stats, timers, work, runner, engine = self.be, self.stats, self.timers, self.work, self.runner, self.engine
        stats.peak_gpu_memory = be.peak_memory()
        stats.peak_rss_anon = max(peak_rss, rss_anon())
        timers["wall"] = time.perf_counter() - self.t_wall
        if work.gpu_items:
            timers["gpu_span"] = be.elapsed_ms(self.streams.start, self.streams.end) / 1e3
        if engine.profile and work.gpu_items:
            timers.update(self._profile())
        stats.stage_seconds = dict(timers)
        mode = "registered windows" if engine.register_windows else "pinned staging (registration off)"
        stats.notes.append(
            f"cuda engine: {self.slots} device slots x ({work.inputs_max} in + {self.n_out} out"
            f"{' + acc' if self.buf.dev_acc else ''}) x {self.slot_bytes} B, {self.host_slots} pinned output slots, "
            f"{mode}; window {engine.window_bytes} B, read-ahead {engine.register_ahead_bytes} B"
        )
        stats.notes.append(
            f"cuda engine: {self.output_threads} output thread(s) (writes + SHA-256 per file), {self.hash_files} "
            f"output file(s) in flight, {self.output.max_hashing} hashed at once"
        )
        stats.notes.append(
            f"cuda engine: {len(work.gpu_items)} GPU chunks, inputs {self.n_direct} DMA'd from registered windows and "
            f"{self.n_staged} through pinned staging; {runner.registered} windows registered "
            f"({runner.registered_bytes} B), at most {runner.max_live} / {runner.max_live_bytes} B at once "
            f"(plan bound {self.bound_count} / {self.bound_bytes} B)"
        )
        if runner.refusal:
            stats.notes.append(f"cuda engine: {runner.refusal}; error cleared, fell back to pinned staging")
        stats.notes += [f"cuda engine: {e}" for e in runner.unregister_errors[:5]]

    def _profile(self) -> dict[str, float]:
        """GPU busy time per stage (H2D, kernel, D2H) from the profile's events, their union and overlap."""
        be, st = self.be, self.streams
        ivs: dict[str, list[tuple[float, float]]] = {"gpu_h2d": [], "gpu_kernel": [], "gpu_d2h": []}
        for ev in st.prof:
            for name, (a, b) in zip(ivs, ((ev[0], ev[1]), (ev[2], ev[3]), (ev[4], ev[5]))):
                ivs[name].append((be.elapsed_ms(st.start, a) / 1e3, be.elapsed_ms(st.start, b) / 1e3))
        s = interval_stats(ivs)
        return {**{k: s[k] for k in ivs}, "gpu_busy": s["union"], "gpu_overlap": s["overlap"]}
