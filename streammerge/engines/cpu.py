"""The CPU engine: compute threads for the math (a chunk per task), output threads for the writes and the SHA-256
of each output file (engines/output.py), all overlapping, as many of each as cores given.

Work follows output order within a window of output files (FileWindow: more files in flight when hash streams back
up). Host memory is a fixed set of buffers sized by ``chunk_bytes``; input pages are mapped read-only, read ahead of
the work and dropped from this process behind it.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

# Buffer counts and sizes come from the memory formulas the plan reports (budget.py): allocated exactly as said.
from ..budget import SUB_BLOCK_ELEMS, default_workers, output_slots, scratch_buffers
from ..checkpoint import Checkpoint, TensorRef
from ..dtypes import itemsize
from ..errors import StreamMergeError
from ..kernels.reference import OUT_DTYPES, dequantize_fp8, requantize_fp8, round_from_f32
from ..memory import rss_anon
from ..plan import MergePlan, Op, OutTensor, fp8_sub_block
from ..writer import Sink
from .output import FileWindow, OutputStage, Piece
from .stats import EngineStats, Progress, ProgressCounter
from .work import (  # iter_work: verify.py takes it from here
    FirstFailure,
    WorkItem,
    iter_work,  # noqa: F401
    out_bytes,
    out_offset,
    record_nonfinite,
    scale_rows,
    work_bytes,
    work_tensors,
)


@dataclass
class Fp8Scratch:
    """One worker's buffers for block-scaled FP8 sub-blocks (``budget.fp8_buffer_bytes``), ``elems`` elements each:
    float32 target, plus, minus and result values; uint8 codes of the target (kept for the requantization), of
    another input and of the output; a bool mask of finite inputs (``check_finite``)."""

    t32: torch.Tensor
    p32: torch.Tensor
    m32: torch.Tensor
    r32: torch.Tensor
    t_codes: torch.Tensor
    codes: torch.Tensor
    out_codes: torch.Tensor
    finite: torch.Tensor

    @classmethod
    def allocate(cls, elems: int) -> Fp8Scratch:
        f32 = [torch.empty(elems, dtype=torch.float32) for _ in range(4)]
        u8 = [torch.empty(elems, dtype=torch.uint8) for _ in range(3)]
        return cls(*f32, *u8, torch.empty(elems, dtype=torch.bool))


class CpuEngine:
    """Merge on the CPU. See the module docstring for the pipeline."""

    name = "cpu"

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def run(
        self,
        plan: MergePlan,
        ckpts: dict[str, Checkpoint],
        writer: Sink,
        progress: Callable[[Progress], None] | None = None,
    ) -> EngineStats:
        stats = EngineStats(device="cpu")
        # Parallelism comes from our own threads, each running single-threaded torch ops on its own chunk: torch ops,
        # hashlib and pwrite release the GIL, and unlike torch's OpenMP pool nothing spins at a barrier when the
        # machine is busy (measured on the 2-core machine under load: 2 OpenMP threads ran 4-6x slower than 1).
        old_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        workers = self.threads or default_workers()
        resident = None
        if self.threads is None and workers > 1:
            # Inputs read from disk: one compute thread. Page faults from several compute threads at once defeat the
            # kernel's read-ahead (measured, 8 GB trio whose 23 GB of inputs the page cache could not keep: 143 s
            # with 2 compute threads, 47 s with 1, 88 s with the engine before issue 15), and the disk is the floor
            # there anyway. Measured per run: the inputs' page-cache residency (mincore).
            resident = _resident_fraction(ckpts, plan, writer.done_files)
            if resident is not None and resident < RESIDENT_FOR_PARALLEL:
                workers = 1
        try:
            self._run(plan, ckpts, writer, progress, stats, workers, self.threads or default_workers())
        finally:
            torch.set_num_threads(old_threads)
        if resident is not None:
            stats.notes.append(
                f"cpu engine: inputs {resident:.0%} in the page cache"
                + (" (read from disk: one compute thread)" if workers == 1 else "")
            )
        return stats

    def _run(self, plan, ckpts, writer, progress, stats: EngineStats, workers: int, out_threads: int) -> None:
        opts = plan.options
        chunk = opts.chunk_bytes
        elems = opts.chunk_elems
        n_out = plan.outputs
        n_slots = output_slots(n_out, workers)
        slots = [torch.empty(chunk, dtype=torch.uint8) for _ in range(n_slots)]
        sub = min(SUB_BLOCK_ELEMS, elems)
        n_buf = scratch_buffers(n_out, plan.max_vectors)
        scratch = [tuple(torch.empty(sub) for _ in range(n_buf)) for _ in range(workers)]
        fp8_scratch = [Fp8Scratch.allocate(plan.fp8_sub_elems) for _ in range(workers)] if plan.fp8_sub_elems else None
        # Each compute task takes a worker's buffers from here (as many sets as compute threads: never waits).
        free_scratch: queue.SimpleQueue[int] = queue.SimpleQueue()
        for k in range(workers):
            free_scratch.put(k)
        # An FP8 output's new block scales, per tensor and output: filled band by band (by any worker), written
        # after the weight's last band (each a fresh tensor: the previous weight's may still be in flight).
        scales_of: dict[int, list[torch.Tensor]] = {}
        free_slots: queue.Queue[int] = queue.Queue()
        for i in range(n_slots):
            free_slots.put(i)
        failure = FirstFailure()
        t_target = ckpts.get("target")
        skip = writer.done_files
        total_bytes = work_bytes(plan, skip)
        total_tensors = work_tensors(plan, skip)
        timers: dict[str, float] = {"compute": 0.0, "wait_slot": 0.0}
        timer_lock = threading.Lock()
        report = ProgressCounter(stats, progress, total_bytes, total_tensors)
        # Three kinds of work share the cores: the math (compute pool, a chunk per task), the writes (output pool,
        # any order) and the SHA-256 of each output file (output pool, one thread per file at a time, in offset
        # order). Every pool has a thread per core given; the slots bound the chunks in flight, so a stage that
        # falls behind blocks the ones feeding it and the kernel gives their cores to it: no core idles while another
        # stage is the bottleneck, and no thread count is tuned per machine.
        output = OutputStage(plan, writer, stats, failure, report, out_threads, timers)
        # Read-ahead (madvise WILLNEED) on a thread of its own, as each file's chunks are taken from the work list
        # (FileWindow: ``ahead`` chunks before they are dispatched): on a cold cache the call can block on the disk,
        # and the dispatching thread must not.
        prefetch_q: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()

        def prefetcher() -> None:
            while (it := prefetch_q.get()) is not None:
                if failure.exc is None:
                    try:
                        _prefetch(ckpts, it)
                    except BaseException as e:  # noqa: BLE001 - handed to the main thread
                        failure.set(e)

        prefetch_thread = threading.Thread(target=prefetcher, name="sm-prefetch", daemon=True)
        prefetch_thread.start()
        compute_pool = ThreadPoolExecutor(workers, thread_name_prefix="sm-compute")
        window = FileWindow(plan, skip, out_threads, output.backlog, prefetch_q.put, bound=output.hash_bound)

        def add(stage: str, dt: float) -> None:
            with timer_lock:
                timers[stage] += dt

        def release_inputs(item: WorkItem) -> None:
            t = item.tensor
            for ck, ref, a, b in _refs(ckpts, item):
                ck.release(ref, a, b)
            if t is not None and item.last_of_tensor:  # an FP8 weight's scales are read by every band: dropped after
                for role, scale in t.scales.items():
                    ckpts[role].release(scale.ref, 0, scale.ref.nbytes)

        def compute(seq: int, item: WorkItem, ids: list[int], band_scales, new_scales) -> None:
            t = item.tensor
            done = False
            try:
                failure.check()
                t0 = time.perf_counter()
                k = free_scratch.get()
                try:
                    n_in = self.compute_chunk(
                        t,
                        item,
                        ckpts,
                        [slots[i] for i in ids],
                        [scratch[k]],
                        opts,
                        stats,
                        None,
                        band_scales,
                        [fp8_scratch[k]] if fp8_scratch is not None else None,
                    )
                finally:
                    free_scratch.put(k)
                add("compute", time.perf_counter() - t0)
                pieces: list[Piece] = []
                if item.stop > item.start:
                    many = len(ids) > 1
                    at = t.offset + out_offset(t, item)
                    nb = out_bytes(t, item)
                    pieces = [Piece(at, slots[i][:nb].numpy(), k if many else None) for k, i in enumerate(ids)]
                    pieces += [
                        Piece(t.scale_out.offset, _bytes_of(sc), k if many else None, after=True)
                        for k, sc in enumerate(new_scales)
                    ]

                def on_done() -> None:
                    for i in ids:
                        free_slots.put(i)
                    release_inputs(item)

                output.submit(seq, item, pieces, n_in, on_done)
                done = True
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                failure.set(e)
            finally:
                if not done:
                    for i in ids:
                        free_slots.put(i)

        def take_slot() -> int:
            while True:
                failure.check()
                try:
                    return free_slots.get(timeout=0.2)
                except queue.Empty:
                    continue

        peak = rss_anon()
        futures: collections.deque = collections.deque()
        try:
            for item in window:
                failure.check()
                t = item.tensor
                stats.chunks += 1
                seq = output.reserve(item)
                if t is None or item.op is Op.COPY:
                    view = t_target.view(t.target, item.start, item.stop) if t is not None else None
                    n_in = item.stop - item.start
                    pieces = [Piece(t.offset + item.start, view.numpy())] if view is not None and n_in else []
                    output.submit(seq, item, pieces, n_in, lambda item=item: release_inputs(item))
                    continue
                t0 = time.perf_counter()
                # A sweep's chunk takes one slot per output, unless every output gets the same bytes.
                ids = [take_slot() for _ in range(n_out if item.op is Op.MERGE and t.outputs_differ else 1)]
                add("wait_slot", time.perf_counter() - t0)
                if t.fp8_out and item.start == 0:
                    dtype = OUT_DTYPES[t.scale_out.dtype]
                    scales_of[id(t)] = [torch.empty(t.scale_out.shape, dtype=dtype) for _ in ids]
                band_scales = [sc[slice(*scale_rows(t, item))] for sc in scales_of[id(t)]] if t.fp8_out else None
                new_scales = tuple(scales_of.pop(id(t))) if t.fp8_out and item.last_of_tensor else ()
                futures.append(compute_pool.submit(compute, seq, item, ids, band_scales, new_scales))
                while futures and futures[0].done():
                    futures.popleft()
                peak = max(peak, rss_anon())  # ~20 us per chunk
            compute_pool.shutdown(wait=True)
            failure.check()
            output.drain()
            prefetch_q.put(None)
            prefetch_thread.join()
        except BaseException:
            failure.set(StreamMergeError("merge interrupted"))
            # Let the helper threads run out (after a failure they only give buffers back) before the caller
            # removes temporary files.
            compute_pool.shutdown(wait=True, cancel_futures=True)
            output.shutdown()
            prefetch_q.put(None)
            prefetch_thread.join()
            raise
        peak = max(peak, rss_anon())
        stats.peak_rss_anon = peak
        stats.stage_seconds = dict(timers)
        stats.notes.append(
            f"cpu engine: {workers} compute worker(s) + {output.threads} output thread(s) (writes, SHA-256 per file); "
            f"up to {window.max_open} output file(s) in flight, {output.max_hashing} hashed at once"
        )

    @staticmethod
    def compute_chunk(
        t: OutTensor,
        item: WorkItem,
        ckpts,
        out_slots: list[torch.Tensor],
        scratch,
        opts,
        stats: EngineStats,
        pool=None,
        scale_outs: list[torch.Tensor] | None = None,
        fp8_scratch: list[Fp8Scratch] | None = None,
    ) -> int:
        """Compute one chunk into ``out_slots`` (one per output: several for a sweep whose outputs differ here), its
        sub-blocks spread over the workers; returns the input bytes it read.

        A chunk of a tensor with block-scaled FP8 inputs or output (a band chunk) is computed by
        :func:`compute_fp8_chunk` with ``fp8_scratch`` (one per worker); an FP8 output's new block scales for the
        band go into ``scale_outs`` (per output, the band's rows of the scale grid)."""
        if t.band_rows:
            if fp8_scratch is None:
                raise StreamMergeError(f"internal error: FP8 tensor {t.name!r} without FP8 scratch buffers")
            return compute_fp8_chunk(t, item, ckpts, out_slots, scale_outs or [], fp8_scratch, opts, stats, pool)
        a, b = item.start, item.stop
        n = b - a
        outs = [slot[: n * itemsize(t.dtype)].view(OUT_DTYPES[t.dtype]) for slot in out_slots]
        convert = item.op is Op.CONVERT
        ins = t.inputs(item.op)
        views = [_typed_view(ckpts[role], ref, a, b) for role, ref in ins]
        base = convert or t.base
        tv = views[0] if base else None
        rest = views[1:] if base else views
        pairs = []  # (plus, minus) views per vector
        for term in () if convert else t.terms:
            plus = rest.pop(0)
            pairs.append((plus, rest.pop(0) if term.minus_ref is not None else None))
        alphas = [[torch.tensor(x, dtype=torch.float32) for x in t.alphas_for(k)] for k in range(len(outs))]
        sub = scratch[0][0].numel()
        blocks = [(s0, min(n, s0 + sub)) for s0 in range(0, n, sub)]

        def work(k: int) -> None:
            d_buf, r_buf, *extra = scratch[k % len(scratch)]
            w_buf = extra[0] if extra else None
            for s0, s1 in blocks[k :: len(scratch)]:
                os_ = [o[s0:s1] for o in outs]
                tb = tv[s0:s1] if tv is not None else None
                if convert:
                    r = r_buf[: s1 - s0]
                    r.copy_(tb)
                    round_from_f32(r, t.dtype, out=os_[0])
                    continue
                pb = [(p[s0:s1], m[s0:s1] if m is not None else None) for p, m in pairs]
                w = w_buf[: s1 - s0] if w_buf is not None else None
                _merge_block(tb, pb, alphas, d_buf[: s1 - s0], r_buf[: s1 - s0], t.dtype, os_, w)
                if opts.check_finite:
                    inputs = [v[s0:s1] for v in views]
                    for j, o in enumerate(os_):
                        _count_nonfinite(t, o, inputs, opts.strict, stats, j if len(os_) > 1 else None)

        if pool is None or len(blocks) <= 1:
            work(0)  # one worker takes every block; or the only block is worker 0's
        else:
            for f in [pool.submit(work, k) for k in range(min(len(blocks), len(scratch)))]:
                f.result()
        return sum(itemsize(ref.dtype) * n for _, ref in ins)


def _merge_block(tv, pairs, alphas, d, r, out_dtype: str, outs: list[torch.Tensor], w=None) -> None:
    """The numerics contract (docs/numerics.md) on one cache-sized block, for each output ``k``: ``r = t32``, then
    for each vector ``r = r + a32[k][i] * (p32 - m32)`` (separate roundings, never fused), and one rounding into
    ``outs[k]``.

    ``pairs``: (plus, minus) per vector, minus None for a stored vector (apply). ``tv`` None (extract a vector, one
    vector only): the result is the scaled difference itself. With one vector the difference is computed once for
    all outputs of a sweep. ``w``, a third buffer (needed with several outputs or vectors), holds a widened input.
    Same-dtype float32 ops give the same bits as the mixed-dtype ones (widening is exact); they are only faster."""
    if len(pairs) == 1:
        pv, mv = pairs[0]
        d.copy_(pv)
        if mv is not None:
            r.copy_(mv)
            d.sub_(r)  # g32 - s32
        for a, out in zip(alphas, outs):
            if len(outs) == 1:
                d.mul_(a[0])  # a32 * d, rounded on its own (never fused with the add)
                if tv is None:
                    round_from_f32(d, out_dtype, out=out)
                    return
                r.copy_(tv)
                r.add_(d)  # t32 + m
            else:
                if tv is not None and w is not None and out is outs[0]:
                    w.copy_(tv)  # t32, once for every output
                torch.mul(d, a[0], out=r)  # m = a32 * d, keeping d for the next output
                if tv is not None:
                    r.add_(w if w is not None else tv)  # m + t32 (IEEE addition is commutative: t32 + m's bits)
            round_from_f32(r, out_dtype, out=out)
        return
    if tv is None:
        raise StreamMergeError("internal error: several vectors without a target")
    for a, out in zip(alphas, outs):
        r.copy_(tv)
        for (pv, mv), ai in zip(pairs, a):
            d.copy_(pv)
            if mv is not None:
                if w is not None:
                    w.copy_(mv)
                    d.sub_(w)  # p32 - m32
                else:
                    d.sub_(mv)  # the same bits: torch widens mv exactly and subtracts in float32
            d.mul_(ai)
            r.add_(d)  # left to right: ((t + m1) + m2) + ...
        round_from_f32(r, out_dtype, out=out)


def _count_nonfinite(
    t: OutTensor, out: torch.Tensor, inputs, strict: bool, stats: EngineStats, output: int | None = None
) -> None:
    bad = ~torch.isfinite(out)
    if not bad.any():
        return
    for x in inputs:
        bad &= torch.isfinite(x)
    record_nonfinite(t, int(bad.sum()), strict, stats, output)


def _bytes_of(t: torch.Tensor):
    """A contiguous tensor's bytes as a numpy uint8 array (no copy)."""
    return t.view(torch.uint8).numpy() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().view("uint8")


def compute_fp8_chunk(
    t: OutTensor,
    item: WorkItem,
    ckpts,
    out_slots: list[torch.Tensor],
    scale_outs: list[torch.Tensor],
    scratch: list[Fp8Scratch],
    opts,
    stats: EngineStats,
    pool=None,
) -> int:
    """One band chunk of a tensor with block-scaled FP8 inputs or output (docs/numerics.md, "Block-scaled FP8").

    The chunk's rows are cut into sub-blocks of whole block columns (``plan.fp8_sub_block``), spread over the
    workers. Per sub-block every input is dequantized to float32 (``x32 = decode(q) * s32``; plain inputs are
    widened), the float32 contract gives r per output, and r is requantized on the target's grid (FP8 output, codes
    into ``out_slots[k]``, scales into ``scale_outs[k]``) or rounded once (plain output). Returns the input bytes
    read (codes, values and the scale rows of the band)."""
    cols = t.shape[1]
    row0, row1 = item.start // cols, item.stop // cols
    rows = row1 - row0
    if rows == 0 or cols == 0:
        return 0
    convert = item.op is Op.CONVERT
    ins = t.inputs(item.op)
    base = convert or t.base
    read = 0
    views: list[tuple[torch.Tensor, tuple | None]] = []  # per input: [rows, cols] view, (scales, block, grid row 0)
    for role, ref in ins:
        scale = t.scales.get(role)
        ck = ckpts[role]
        isz = itemsize(ref.dtype)
        dtype = torch.uint8 if scale is not None else OUT_DTYPES[ref.dtype]
        view = ck.view(ref, row0 * cols * isz, row1 * cols * isz, dtype).view(rows, cols)
        read += rows * cols * isz
        extra = None
        if scale is not None:
            br, bc = scale.block
            g0, g1 = row0 // br, -(-row1 // br)
            gcols = scale.ref.shape[1]
            s_isz = itemsize(scale.ref.dtype)
            sv = ck.view(scale.ref, g0 * gcols * s_isz, g1 * gcols * s_isz, OUT_DTYPES[scale.ref.dtype])
            extra = (sv.view(g1 - g0, gcols), scale.block, g0, ref.dtype)
            read += (g1 - g0) * gcols * s_isz
        views.append((view, extra))
    tv = views[0] if base else None
    rest = views[1:] if base else views
    pairs = []  # (plus, minus) per vector
    for term in () if convert else t.terms:
        plus = rest.pop(0)
        pairs.append((plus, rest.pop(0) if term.minus_ref is not None else None))
    n_out = len(out_slots)
    alphas = [[torch.tensor(x, dtype=torch.float32) for x in t.alphas_for(k)] for k in range(n_out)]
    out_views = [
        slot[: rows * cols].view(rows, cols)
        if t.fp8_out
        else slot[: rows * cols * itemsize(t.dtype)].view(OUT_DTYPES[t.dtype]).view(rows, cols)
        for slot in out_slots
    ]
    sub_rows, sub_cols = fp8_sub_block(t)
    blocks = [
        (r0, min(rows, r0 + sub_rows), c0, min(cols, c0 + sub_cols))
        for r0 in range(0, rows, sub_rows)
        for c0 in range(0, cols, sub_cols)
    ]

    def load(src, buf: torch.Tensor, codes: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> tuple:
        """Input ``src``'s sub-block as float32 in ``buf`` (FP8: its codes kept in ``codes``); returns the float32
        [h, w] view, and for FP8 the codes and scales (contiguous) that were used."""
        view, extra = src
        h, w = r1 - r0, c1 - c0
        x = buf[: h * w].view(h, w)
        if extra is None:
            x.copy_(view[r0:r1, c0:c1])  # exact widening
            return x, None, None
        sv, (br, bc), g0, fmt = extra
        q = codes[: h * w].view(h, w)
        q.copy_(view[r0:r1, c0:c1])
        # absolute grid rows of this sub-block, minus the band's first one; its rows and columns start on blocks
        gr0, gr1 = (row0 + r0) // br - g0, -(-(row0 + r1) // br) - g0
        s = sv[gr0:gr1, c0 // bc : -(-c1 // bc)].contiguous()
        dequantize_fp8(q, s, (br, bc), fmt, out=x)
        return x, q, s

    def work(k: int) -> None:
        sc = scratch[k % len(scratch)]
        for r0, r1, c0, c1 in blocks[k :: len(scratch)]:
            h, w = r1 - r0, c1 - c0
            n = h * w
            t32 = tq = ts = None
            if tv is not None:
                t32, tq, ts = load(tv, sc.t32, sc.t_codes, r0, r1, c0, c1)
            fin = sc.finite[:n].view(h, w) if opts.check_finite else None
            if fin is not None:
                fin.copy_(torch.isfinite(t32)) if t32 is not None else fin.fill_(True)
            r = sc.r32[:n].view(h, w)
            one = len(pairs) == 1
            d = None
            if one:  # d = g32 - s32, once for every output of a sweep
                d = _difference(load, pairs[0], sc, r0, r1, c0, c1, fin)
            for k_out in range(n_out):
                if one:
                    torch.mul(d, alphas[k_out][0], out=r)  # m = a32 * d, rounded on its own
                    if t32 is not None:
                        r.add_(t32)  # m + t32: IEEE addition is commutative (t32 + m's bits)
                elif convert:
                    r.copy_(t32)
                else:
                    r.copy_(t32)
                    for pair, a in zip(pairs, alphas[k_out]):
                        m = _difference(load, pair, sc, r0, r1, c0, c1, fin if k_out == 0 else None)
                        m.mul_(a)
                        r.add_(m)  # left to right: ((t + m1) + m2) + ...
                dst = out_views[k_out][r0:r1, c0:c1]
                if t.fp8_out:
                    br, bc = t.block
                    q_out = sc.out_codes[:n].view(h, w)
                    gr0, gr1 = r0 // br, -(-r1 // br)
                    gc0, gc1 = c0 // bc, -(-c1 // bc)
                    s_out = scale_outs[k_out][gr0:gr1, gc0:gc1] if scale_outs else None
                    q_out, s_new = requantize_fp8(r, tq, ts, t.block, out_q=q_out)
                    dst.copy_(q_out)
                    if s_out is not None:
                        s_out.copy_(s_new)
                    result = r  # FP8 has no infinity: an overflow is a non-finite r, saturated to +-448
                else:
                    result = round_from_f32(r.reshape(-1), t.dtype).view(h, w)
                    dst.copy_(result)
                if fin is not None:
                    bad = (~torch.isfinite(result)).logical_and_(fin)
                    record_nonfinite(t, int(bad.sum()), opts.strict, stats, k_out if n_out > 1 else None)

    if pool is None or len(blocks) <= 1:
        work(0)
    else:
        for f in [pool.submit(work, k) for k in range(min(len(blocks), len(scratch)))]:
            f.result()
    return read


def _difference(load, pair, sc: Fp8Scratch, r0: int, r1: int, c0: int, c1: int, fin) -> torch.Tensor:
    """``p32 - m32`` of one vector's sub-block in ``sc.p32`` (``p32`` alone for a stored vector), as float32; the
    inputs' finiteness is and-ed into ``fin`` when given."""
    plus, minus = pair
    p, _, _ = load(plus, sc.p32, sc.codes, r0, r1, c0, c1)
    if fin is not None:
        fin.logical_and_(torch.isfinite(p))
    if minus is not None:
        m, _, _ = load(minus, sc.m32, sc.codes, r0, r1, c0, c1)
        if fin is not None:
            fin.logical_and_(torch.isfinite(m))
        p.sub_(m)  # g32 - s32
    return p


def _refs(ckpts, item: WorkItem) -> list[tuple[Checkpoint, TensorRef, int, int]]:
    """What one chunk reads: (checkpoint, tensor, byte range) per input."""
    t = item.tensor
    if t is None:
        return []
    if item.op is Op.COPY:
        return [(ckpts["target"], t.target, item.start, item.stop)]
    out = []
    for role, ref in t.inputs(item.op):
        isz = ref.nbytes // max(1, ref.numel) if ref.numel else 0
        out.append((ckpts[role], ref, item.start * isz, item.stop * isz))
    return out


# Compute threads beyond one only when at least this fraction of the inputs' pages is in the page cache.
RESIDENT_FOR_PARALLEL = 0.9
# Pages whose residency is sampled per input file (mincore over evenly spaced windows): bounded work on any model.
RESIDENCY_SAMPLE_PAGES = 1 << 16


def _resident_fraction(ckpts, plan: MergePlan, skip) -> float | None:
    """The fraction of the input files' pages in the page cache (sampled with mincore over at most
    RESIDENCY_SAMPLE_PAGES pages per file), or None where mincore is not available."""
    libc = _libc_mincore()
    if libc is None:
        return None
    page = mmap.PAGESIZE
    resident = total = 0
    seen: set[tuple[int, int]] = set()
    for t in plan.tensors:
        if t.file in skip:
            continue
        for role, ref in t.inputs():
            ck = ckpts.get(role)
            if ck is None or ref is None or (id(ck), ref.file) in seen:
                continue
            seen.add((id(ck), ref.file))
            if ck.gate is not None:  # a streamed shard, not on disk yet: it arrives through the page cache
                continue
            try:
                m = ck.mapping(ref.file)
            except (OSError, ValueError, StreamMergeError):
                return None
            pages = len(m) // page
            if pages == 0:
                continue
            base = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
            span = min(pages, 256)  # windows of 256 pages (1 MiB), spread evenly over the file
            vec = (ctypes.c_ubyte * span)()
            for p0 in range(0, pages, max(span, pages * span // RESIDENCY_SAMPLE_PAGES)):
                n = min(span, pages - p0)
                if libc(ctypes.c_void_p(base + p0 * page), ctypes.c_size_t(n * page), vec) != 0:
                    return None
                resident += sum(v & 1 for v in vec[:n])
                total += n
    return resident / total if total else None


_MINCORE: list = []


def _libc_mincore():
    if not _MINCORE:
        fn = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.mincore
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _MINCORE.append(fn)
    return _MINCORE[0]


def _prefetch(ckpts, item: WorkItem) -> None:
    for ck, ref, a, b in _refs(ckpts, item):
        ck.prefetch(ref, a, b)


def _typed_view(ck: Checkpoint, ref: TensorRef, a: int, b: int) -> torch.Tensor:
    isz = itemsize(ref.dtype)
    return ck.view(ref, a * isz, b * isz, OUT_DTYPES[ref.dtype])
