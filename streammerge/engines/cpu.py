"""The CPU engine: a prefetch thread, torch's threads for the math, a writer thread, all overlapping.

Work is ordered by output offset, which follows the target's file order. Host memory is a fixed set of buffers
sized by ``chunk_bytes``; input pages are mapped read-only and dropped from this process behind the work.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

# Buffer counts and sizes come from the memory formulas the plan reports (budget.py): allocated exactly as said.
from ..budget import SUB_BLOCK_ELEMS, default_workers, output_slots, scratch_buffers
from ..checkpoint import Checkpoint, TensorRef
from ..errors import NonFiniteError, StreamMergeError
from ..faults import crash_point
from ..kernels.reference import OUT_DTYPES, round_from_f32
from ..memory import rss_anon
from ..plan import MergePlan, Op, OutTensor
from ..writer import Sink
from . import EngineStats, Progress, ProgressCounter

# Chunks the prefetch thread may run ahead of the compute thread.
PREFETCH_AHEAD = 2


@dataclass
class WorkItem:
    tensor: OutTensor
    start: int  # element (MERGE/CONVERT) or byte (COPY) range
    stop: int
    last_of_file: bool = False
    op: Op | None = None  # this chunk's operation (a MERGE tensor's target-only tail is COPY/CONVERT)
    last_of_tensor: bool = False

    def __post_init__(self) -> None:
        if self.op is None and self.tensor is not None:
            self.op = self.tensor.op


def _ranges(total: int, step: int) -> Iterator[tuple[int, int]]:
    for a in range(0, total, step):
        yield a, min(total, a + step)


def _tensor_items(t: OutTensor, elems: int, chunk_bytes: int) -> Iterator[WorkItem]:
    if t.op is Op.COPY:
        yield from (WorkItem(t, a, b) for a, b in _ranges(t.nbytes, chunk_bytes))
    elif t.op is Op.CONVERT:
        yield from (WorkItem(t, a, b) for a, b in _ranges(t.numel, elems))
    else:
        yield from (WorkItem(t, a, b) for a, b in _ranges(t.blended, elems))
        if t.blended < t.numel:  # vocab common-rows: the target's own rows
            if t.dtype == t.target.dtype:
                isz = _elem_size(t.dtype)
                for a, b in _ranges((t.numel - t.blended) * isz, chunk_bytes):
                    yield WorkItem(t, t.blended * isz + a, t.blended * isz + b, op=Op.COPY)
            else:
                for a, b in _ranges(t.numel - t.blended, elems):
                    yield WorkItem(t, t.blended + a, t.blended + b, op=Op.CONVERT)
    if t.nbytes == 0:
        yield WorkItem(t, 0, 0)  # zero-element tensors still count as done


def iter_work(plan: MergePlan, skip: set[int] | frozenset[int] = frozenset()) -> Iterator[WorkItem]:
    """Chunks in output order, skipping files in ``skip``; the last chunk of each tensor and of each file is flagged
    (one item of lookahead: nothing here grows with tensor, shard or model size)."""
    elems = plan.options.chunk_elems
    for i, f in enumerate(plan.files):
        if i in skip:
            continue
        prev: WorkItem | None = None
        for t in f.tensors:
            for item in _tensor_items(t, elems, plan.options.chunk_bytes):
                if prev is not None:
                    prev.last_of_tensor = prev.tensor is not item.tensor
                    yield prev
                prev = item
        if prev is None:
            prev = WorkItem(None, 0, 0)  # type: ignore[arg-type]  # a file with no tensors
        prev.last_of_tensor = True
        prev.last_of_file = True
        yield prev


class _Failure:
    def __init__(self) -> None:
        self.exc: BaseException | None = None

    def set(self, exc: BaseException) -> None:
        if self.exc is None:
            self.exc = exc

    def check(self) -> None:
        if self.exc is not None:
            raise self.exc


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
        # Parallelism comes from our own worker threads, each running single-threaded torch ops on its own
        # sub-blocks: torch ops release the GIL, and unlike torch's OpenMP pool nothing spins at a barrier when the
        # machine is busy (measured on the 2-core machine under load: 2 OpenMP threads ran 4-6x slower than 1).
        old_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        workers = self.threads or default_workers()
        pool = ThreadPoolExecutor(workers, thread_name_prefix="sm-compute") if workers > 1 else None
        try:
            self._run(plan, ckpts, writer, progress, stats, pool, workers)
        finally:
            torch.set_num_threads(old_threads)
            if pool is not None:
                pool.shutdown(wait=True)
        stats.notes.append(f"cpu engine: {workers} compute worker(s) + writer thread")
        return stats

    def _run(self, plan, ckpts, writer, progress, stats: EngineStats, pool, workers: int) -> None:
        opts = plan.options
        chunk = opts.chunk_bytes
        elems = opts.chunk_elems
        n_out = plan.outputs
        n_slots = output_slots(n_out)
        slots = [torch.empty(chunk, dtype=torch.uint8) for _ in range(n_slots)]
        sub = min(SUB_BLOCK_ELEMS, elems)
        n_buf = scratch_buffers(n_out, plan.max_vectors)
        scratch = [tuple(torch.empty(sub) for _ in range(n_buf)) for _ in range(workers)]
        free_slots: queue.Queue[int] = queue.Queue()
        for i in range(n_slots):
            free_slots.put(i)
        write_q: queue.Queue = queue.Queue(maxsize=n_slots + 8)
        prefetch_q: queue.Queue = queue.Queue(maxsize=PREFETCH_AHEAD)
        failure = _Failure()
        stop = threading.Event()
        t_target = ckpts.get("target")
        # Output chunks are hashed on this (compute) thread, in output order: the writer thread only writes
        # (``hashed=True``).
        skip = writer.done_files
        total_bytes = work_bytes(plan, skip)
        total_tensors = sum(len(f.tensors) for i, f in enumerate(plan.files) if i not in skip)
        timers = {"compute": 0.0, "write": 0.0, "wait_slot": 0.0}

        def refs(item: WorkItem) -> list[tuple[Checkpoint, TensorRef, int, int]]:
            t = item.tensor
            if t is None:
                return []
            if item.op is Op.COPY:
                return [(t_target, t.target, item.start, item.stop)]
            out = []
            for role, ref in t.inputs(item.op):
                isz = ref.nbytes // max(1, ref.numel) if ref.numel else 0
                out.append((ckpts[role], ref, item.start * isz, item.stop * isz))
            return out

        def hand_over(item) -> bool:
            """Queue ``item`` for the compute thread unless the merge is stopping (never blocks forever)."""
            while not stop.is_set():
                try:
                    prefetch_q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def prefetcher() -> None:
            try:
                for item in iter_work(plan, skip):
                    for ck, ref, a, b in refs(item):
                        ck.prefetch(ref, a, b)
                    if not hand_over(item):
                        return
                hand_over(None)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                failure.set(e)
                hand_over(None)

        report = ProgressCounter(stats, progress, total_bytes, total_tensors)

        def write_loop() -> None:
            while True:
                job = write_q.get()
                if job is None:
                    return
                if failure.exc is not None:
                    if job[0] == "slot":
                        for sid in job[1]:
                            free_slots.put(sid)
                    continue
                try:
                    t0 = time.perf_counter()
                    kind, payload, item, nbytes_in = job
                    t = item.tensor
                    if t is not None and item.stop > item.start:
                        if kind == "slot":
                            for k, sid in enumerate(payload):
                                data = slots[sid][: _out_bytes(t, item)]
                                out = k if len(payload) > 1 else None
                                writer.write(
                                    t.file, t.offset + _out_offset(t, item), data.numpy(), out=out, hashed=True
                                )
                                del data
                                if k < len(payload) - 1:
                                    free_slots.put(sid)  # written: back to the compute thread at once
                                    payload[k] = -1
                        else:
                            writer.write(t.file, t.offset + item.start, payload.numpy(), hashed=True)
                            del payload
                        for ck, ref, a, b in refs(item):
                            ck.release(ref, a, b)
                    written = finish_chunk(plan, writer, stats, item)
                    timers["write"] += time.perf_counter() - t0
                    report(nbytes_in + written, t if item.last_of_tensor else None, written)
                except BaseException as e:  # noqa: BLE001
                    failure.set(e)
                finally:
                    if job[0] == "slot":
                        for sid in job[1]:
                            if sid >= 0:
                                free_slots.put(sid)

        threads = [
            threading.Thread(target=prefetcher, name="sm-prefetch", daemon=True),
            threading.Thread(target=write_loop, name="sm-writer", daemon=True),
        ]
        for th in threads:
            th.start()
        peak = rss_anon()
        try:
            while True:
                item = prefetch_q.get()
                failure.check()
                if item is None:
                    break
                t = item.tensor
                stats.chunks += 1
                if t is None or item.op is Op.COPY:
                    view = t_target.view(t.target, item.start, item.stop) if t is not None else None
                    n_in = item.stop - item.start
                    if view is not None and n_in:
                        writer.digest(t.file, t.offset + item.start, view.numpy())
                    self._put(write_q, ("view", view, item, n_in), failure)
                    continue
                t0 = time.perf_counter()
                # A sweep's chunk takes one slot per output, unless every output gets the same bytes.
                ids = []
                for _ in range(n_out if item.op is Op.MERGE and t.outputs_differ else 1):
                    ids.append(free_slots.get())
                timers["wait_slot"] += time.perf_counter() - t0
                failure.check()
                t0 = time.perf_counter()
                n_in = self.compute_chunk(t, item, ckpts, [slots[i] for i in ids], scratch, plan.options, stats, pool)
                if item.stop > item.start:
                    for k, sid in enumerate(ids):
                        data = slots[sid][: _out_bytes(t, item)].numpy()
                        writer.digest(t.file, t.offset + _out_offset(t, item), data, out=k if len(ids) > 1 else None)
                timers["compute"] += time.perf_counter() - t0
                self._put(write_q, ("slot", ids, item, n_in), failure)
                peak = max(peak, rss_anon())  # ~20 us per chunk
            write_q.put(None)
            threads[1].join()
            failure.check()
        except BaseException:
            stop.set()
            failure.set(StreamMergeError("merge interrupted"))
            # Unblock and drain the helper threads before the caller removes temporary files.
            try:
                while True:
                    prefetch_q.get_nowait()
            except queue.Empty:
                pass
            write_q.put(None)
            for th in threads:
                th.join()  # after a failure they only drain; the caller removes temporaries once they are done
            raise
        peak = max(peak, rss_anon())
        stats.peak_rss_anon = peak
        stats.stage_seconds = timers

    @staticmethod
    def _put(q: queue.Queue, job, failure: _Failure) -> None:
        while True:
            failure.check()
            try:
                q.put(job, timeout=0.5)
                return
            except queue.Full:
                continue

    @staticmethod
    def compute_chunk(
        t: OutTensor, item: WorkItem, ckpts, out_slots: list[torch.Tensor], scratch, opts, stats: EngineStats, pool=None
    ) -> int:
        """Compute one chunk into ``out_slots`` (one per output: several for a sweep whose outputs differ here), its
        sub-blocks spread over the workers; returns the input bytes it read."""
        a, b = item.start, item.stop
        n = b - a
        outs = [slot[: n * _elem_size(t.dtype)].view(OUT_DTYPES[t.dtype]) for slot in out_slots]
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
        return sum(_elem_size(ref.dtype) * n for _, ref in ins)


def _merge_block(tv, pairs, alphas, d, r, out_dtype: str, outs: list[torch.Tensor], w=None) -> None:
    """DESIGN.md section 2 on one cache-sized block, for each output ``k``: ``r = t32``, then for each vector
    ``r = r + a32[k][i] * (p32 - m32)`` (separate roundings, never fused), and one rounding into ``outs[k]``.

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


def work_bytes(plan: MergePlan, skip: set[int] | frozenset[int] = frozenset()) -> int:
    """Bytes read + written for the files not in ``skip`` (what progress counts towards)."""
    total = 0
    for i, f in enumerate(plan.files):
        if i in skip:
            continue
        total += f.size * plan.outputs
        for t in f.tensors:
            total += t.input_bytes()
    return total


_NONFINITE_LOCK = threading.Lock()


def _count_nonfinite(
    t: OutTensor, out: torch.Tensor, inputs, strict: bool, stats: EngineStats, output: int | None = None
) -> None:
    bad = ~torch.isfinite(out)
    if not bad.any():
        return
    for x in inputs:
        bad &= torch.isfinite(x)
    record_nonfinite(t, int(bad.sum()), strict, stats, output)


def record_nonfinite(t: OutTensor, n: int, strict: bool, stats: EngineStats, output: int | None = None) -> None:
    """``n`` elements of ``t`` became NaN/inf although every input was finite: refuse (``strict``) or count them (in
    output ``output`` of a sweep, None: every output). Both engines report through here."""
    if not n:
        return
    if strict:
        raise NonFiniteError(
            f"tensor {t.name!r}: {n} element(s) became NaN/inf although every input was finite "
            "(overflow in the output dtype?); --strict refuses this output. Lower |alpha|, use --out-dtype fp32, "
            "or drop --strict to write it anyway"
        )
    with _NONFINITE_LOCK:  # several workers may count sub-blocks of one tensor
        stats.add_nonfinite(t.name, n, output)


def _elem_size(dtype: str) -> int:
    return {"BF16": 2, "F16": 2, "F32": 4}[dtype]


def _typed_view(ck: Checkpoint, ref: TensorRef, a: int, b: int) -> torch.Tensor:
    isz = _elem_size(ref.dtype)
    return ck.view(ref, a * isz, b * isz, OUT_DTYPES[ref.dtype])


def _out_bytes(t: OutTensor, item: WorkItem) -> int:
    if item.op is Op.COPY:
        return item.stop - item.start
    return (item.stop - item.start) * _elem_size(t.dtype)


def _out_offset(t: OutTensor, item: WorkItem) -> int:
    return item.start if item.op is Op.COPY else item.start * _elem_size(t.dtype)


def finish_chunk(plan: MergePlan, writer, stats: EngineStats, item: WorkItem) -> int:
    """After a chunk is written: the crash-injection point, the chunk count, and the file's finish (sync, rename,
    checksum) when it was the file's last chunk. Returns the output bytes the chunk accounts for (header included)."""
    crash_point(f"chunk:{stats.chunks_written}")
    stats.chunks_written += 1
    t = item.tensor
    written = _out_bytes(t, item) if t is not None else 0
    if item.last_of_file:
        fi = t.file if t is not None else _file_of(plan, item)
        writer.finish_file(fi)
        written += len(plan.files[fi].header)
    return written * plan.outputs


def _file_of(plan: MergePlan, item: WorkItem) -> int:
    # Only used for a file that holds no tensors at all (cannot happen with the shard planner, kept for safety).
    for i, f in enumerate(plan.files):
        if not f.tensors:
            return i
    raise StreamMergeError("internal error: empty work item without an empty file")
