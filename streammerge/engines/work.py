"""The work list both engines follow: chunks in output order, their byte accounting, what follows each write, and the
first failure any of an engine's threads hit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ..dtypes import itemsize
from ..errors import NonFiniteError, StreamMergeError
from ..faults import crash_point
from ..plan import MergePlan, Op, OutTensor
from ..writer import Sink
from .stats import EngineStats


@dataclass
class WorkItem:
    """One chunk of the work list.

    Attributes:
        tensor (`OutTensor | None`): the output tensor; None only for a file that holds no tensors at all.
        start, stop (`int`): the element range (MERGE, CONVERT) or byte range (COPY) of the tensor.
        last_of_file / last_of_tensor (`bool`): the file's (the tensor's) last chunk.
        op (`Op | None`): this chunk's operation; the tensor's op unless given (a MERGE tensor's target-only tail is
            COPY or CONVERT).
    """

    tensor: OutTensor | None
    start: int
    stop: int
    last_of_file: bool = False
    op: Op | None = None
    last_of_tensor: bool = False

    def __post_init__(self) -> None:
        if self.op is None and self.tensor is not None:
            self.op = self.tensor.op


def _ranges(total: int, step: int) -> Iterator[tuple[int, int]]:
    for a in range(0, total, step):
        yield a, min(total, a + step)


def _tensor_items(t: OutTensor, elems: int, chunk_bytes: int) -> Iterator[WorkItem]:
    if t.op is Op.SCALE:
        return  # an FP8 weight's new scales: written with the weight's last band (no work of their own)
    if t.band_rows and t.nbytes:
        # block-scaled FP8: whole bands of block rows (a block's amax needs all its rows), all columns
        cols = t.shape[1]
        yield from (WorkItem(t, a * cols, b * cols) for a, b in _ranges(t.shape[0], t.band_rows))
        return
    if t.op is Op.COPY:
        yield from (WorkItem(t, a, b) for a, b in _ranges(t.nbytes, chunk_bytes))
    elif t.op is Op.CONVERT:
        yield from (WorkItem(t, a, b) for a, b in _ranges(t.numel, elems))
    else:
        yield from (WorkItem(t, a, b) for a, b in _ranges(t.blended, elems))
        if t.blended < t.numel:  # vocab common-rows: the target's own rows
            if t.dtype == t.target.dtype:
                isz = itemsize(t.dtype)
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
            prev = WorkItem(None, 0, 0)  # a file with no tensors
        prev.last_of_tensor = True
        prev.last_of_file = True
        yield prev


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


def work_tensors(plan: MergePlan, skip: set[int] | frozenset[int] = frozenset()) -> int:
    """Tensors with work of their own in the files not in ``skip`` (what progress counts towards; an FP8 weight's
    new scales are done with it)."""
    return sum(sum(1 for t in f.tensors if t.op is not Op.SCALE) for i, f in enumerate(plan.files) if i not in skip)


def out_bytes(t: OutTensor, item: WorkItem) -> int:
    """Output bytes of one chunk of ``t`` (an FP8 output's codes; its scales are :func:`scale_rows`')."""
    if item.op is Op.COPY:
        return item.stop - item.start
    return (item.stop - item.start) * itemsize(t.dtype)


def out_offset(t: OutTensor, item: WorkItem) -> int:
    """Where one chunk of ``t`` starts, in bytes from the start of the tensor's data."""
    return item.start if item.op is Op.COPY else item.start * itemsize(t.dtype)


def scale_rows(t: OutTensor, item: WorkItem) -> tuple[int, int]:
    """The rows of the output's block-scale grid one band chunk of FP8 output ``t`` computes (elements: a chunk's
    scales are the ``[rows, grid cols]`` slice of the ``scale_out`` tensor)."""
    cols, br = t.shape[1], t.block[0] if t.block else 1
    return item.start // cols // br, -(-(item.stop // cols) // br)


def finish_chunk(plan: MergePlan, writer: Sink, stats: EngineStats, item: WorkItem) -> int:
    """After a chunk is written: the crash-injection point, the chunk count, and the file's finish (sync, rename,
    checksum) when it was the file's last chunk. Returns the output bytes the chunk accounts for (header included)."""
    crash_point(f"chunk:{stats.chunks_written}")
    stats.chunks_written += 1
    t = item.tensor
    written = out_bytes(t, item) if t is not None else 0
    if t is not None and t.scale_out is not None and t.op is Op.MERGE and item.last_of_tensor:
        written += t.scale_out.nbytes  # the new block scales, written with the weight's last band
    if item.last_of_file:
        fi = t.file if t is not None else _file_of(plan)
        writer.finish_file(fi)
        written += len(plan.files[fi].header)
    return written * plan.outputs


def _file_of(plan: MergePlan) -> int:
    # Only used for a file that holds no tensors at all (cannot happen with the shard planner, kept for safety).
    for i, f in enumerate(plan.files):
        if not f.tensors:
            return i
    raise StreamMergeError("internal error: empty work item without an empty file")


_NONFINITE_LOCK = threading.Lock()


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


class FirstFailure:
    """The first exception any of an engine's threads raised, kept for the thread that reports it.

    Helper threads ``set`` what they caught and stop; the main thread calls ``check`` between steps, which raises it.

    Example:
        ```py
        >>> failure = FirstFailure()
        >>> failure.set(OSError("disk went away"))
        >>> failure.check()  # raises the OSError
        ```
    """

    def __init__(self) -> None:
        self.exc: BaseException | None = None

    def set(self, exc: BaseException) -> None:
        """Keep ``exc`` unless an earlier failure is already kept."""
        if self.exc is None:
            self.exc = exc

    def check(self) -> None:
        """Raise the kept failure, if any."""
        if self.exc is not None:
            raise self.exc
