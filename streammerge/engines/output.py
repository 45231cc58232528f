"""The output side both engines share: finished chunks written in any order on a pool of threads, the SHA-256 of
every output file computed in offset order (one stream per file, several files hashed at once), files finished in
file order; and the work order over a window of output files that gives those hash streams work side by side.

SHA-256 is sequential within a file, so one file is hashed by one core at a time (~1.5-2 GB/s). A merge that writes
faster than that keeps several output files in flight (:class:`FileWindow`), each with its own hash stream; each
finished file's checksum stays exact because its stream still sees every byte in offset order.

Example:
    ```py
    >>> out = OutputStage(plan, writer, stats, failure, report, threads=4)
    >>> seq = out.reserve(item)                      # in the engine's dispatch order, one per chunk
    >>> out.submit(seq, item, [Piece(offset, data)], n_in, on_done=release)   # from any thread, in any order
    >>> out.drain()                                  # every chunk written, hashed and every file finished
    ```
"""

from __future__ import annotations

import collections
import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import StreamMergeError
from ..faults import crash_point
from ..plan import MergePlan, Op
from ..writer import Sink
from .stats import EngineStats, ProgressCounter
from .work import FirstFailure, WorkItem, iter_work, out_bytes

# A file's hash stream counts as the bottleneck when this many of its chunks are computed and wait for it and its
# thread has been hashing for at least HASH_BUSY_FRACTION of the time since the file's first chunk was hashed
# (measured over at least HASH_BUSY_MIN_S): the window then opens the next output file, so another core can hash it
# (see FileWindow). A stream that keeps up never widens the window: output order, files one after another.
HASH_BACKLOG_CHUNKS = 2
HASH_BUSY_FRACTION = 0.9
HASH_BUSY_MIN_S = 0.05


@dataclass
class Piece:
    """Bytes of one chunk at an absolute offset of its file (``out``: a sweep's output, as `Sink.write`).

    ``after``: write it only once every earlier chunk of the file is hashed (an FP8 weight's new block scales, filled
    by every band of the weight: all bands are computed by then, since a chunk is hashed after it is computed)."""

    offset: int
    data: object
    out: int | None = None
    after: bool = False


@dataclass
class _Chunk:
    file: int
    item: WorkItem
    pieces: list[Piece]
    n_in: int
    on_done: Callable[[], None] | None
    left: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _File:
    reserved: int = 0  # chunks handed out (sequence numbers 0..reserved-1)
    completed: int = 0  # chunks written and hashed
    next_hash: int = 0  # the next sequence number the hash stream takes
    ready: dict[int, _Chunk] = field(default_factory=dict)  # computed, waiting for the hash stream
    hashing: bool = False  # a pool thread is draining this file's stream
    closed: bool = False  # its last chunk is reserved
    hash_s: float = 0.0  # seconds its stream spent hashing
    first_hash: float = 0.0  # when its stream first started (perf_counter)


class OutputStage:
    """Writes, hashes and finishes the chunks of one run (see the module docstring).

    Args:
        plan (`MergePlan`): the run's plan (file headers, outputs per pass).
        writer (`Sink`): the sink; only its declared members are used: ``write(..., hashed=True)``, ``digest``,
            ``finish_file`` and ``done_files``.
        stats (`EngineStats`), failure (`FirstFailure`), report (`ProgressCounter`): the engine's.
        threads (`int`): pool threads for writes and hash streams. At most one thread hashes a file at a time; the
            others write, or hash other files of the window.
        timers (`dict`, *optional*): thread-seconds spent per stage are added to it ("hash", "write", "finish").
    """

    def __init__(
        self,
        plan: MergePlan,
        writer: Sink,
        stats: EngineStats,
        failure: FirstFailure,
        report: ProgressCounter,
        threads: int,
        timers: dict[str, float] | None = None,
    ):
        self.plan, self.writer, self.stats, self.failure, self.report = plan, writer, stats, failure, report
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="sm-output")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._files: dict[int, _File] = collections.defaultdict(_File)
        skip = writer.done_files
        self._order = [i for i in range(len(plan.files)) if i not in skip]  # files are finished in this order
        self._finish_next = 0
        self._complete: set[int] = set()
        self._finish_lock = threading.Lock()  # finish_file, the chunk count and its crash point: one at a time
        self.timers = timers if timers is not None else {}
        self._timer_lock = threading.Lock()
        self.max_hashing = 0  # the most files hashed at once (reported)
        self._hashing_now = 0

    # ------------------------------------------------------------------ the engine's side
    def reserve(self, item: WorkItem) -> int:
        """The chunk's place in its file's hash stream. Call in dispatch order (each file's chunks by offset)."""
        f = self._files[file_of(self.plan, item)]
        with self._lock:
            seq = f.reserved
            f.reserved += 1
            f.closed = f.closed or item.last_of_file
        return seq

    def backlog(self, file: int) -> int:
        """Chunks of ``file`` computed and waiting for its hash stream."""
        return len(self._files[file].ready) if file in self._files else 0

    def hash_bound(self, file: int) -> bool:
        """Whether ``file``'s hash stream is the bottleneck: chunks wait for it and its thread is (nearly) always
        hashing (see HASH_BUSY_FRACTION)."""
        f = self._files.get(file)
        if f is None or len(f.ready) < HASH_BACKLOG_CHUNKS or not f.first_hash:
            return False
        span = time.perf_counter() - f.first_hash
        return span >= HASH_BUSY_MIN_S and f.hash_s >= HASH_BUSY_FRACTION * span

    def submit(
        self,
        seq: int,
        item: WorkItem,
        pieces: list[Piece],
        n_in: int,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """Hand over a computed chunk (any thread, any order): its pieces are written at once on the pool and hashed
        in turn; ``on_done()`` runs once all are written and hashed (give its buffers back there)."""
        file = file_of(self.plan, item)
        chunk = _Chunk(file, item, pieces, n_in, on_done)
        writes = [p for p in pieces if not p.after]
        chunk.left = 1 + len(writes)
        f = self._files[file]
        with self._lock:
            self._in_flight += 1
            f.ready[seq] = chunk
            start = not f.hashing and f.next_hash in f.ready
            if start:
                f.hashing = True
        for p in writes:
            self.pool.submit(self._write, chunk, p)
        if start:
            self.pool.submit(self._hash_stream, file)

    def drain(self) -> None:
        """Wait until every submitted chunk is done, then stop the pool. Raises the first failure."""
        with self._idle:
            while self._in_flight:
                self._idle.wait(0.5)
        self.pool.shutdown(wait=True)
        self.failure.check()
        if self._finish_next != len(self._order):
            left = [self.plan.files[i].name for i in self._order[self._finish_next :]]
            raise StreamMergeError(f"internal error: output files left unfinished: {', '.join(left[:3])}")

    def shutdown(self) -> None:
        """After a failure: let queued tasks run out (they only give buffers back), then stop the pool."""
        self.pool.shutdown(wait=True)

    # ------------------------------------------------------------------ pool tasks
    def _add(self, stage: str, dt: float) -> None:
        with self._timer_lock:
            self.timers[stage] = self.timers.get(stage, 0.0) + dt

    def _write(self, chunk: _Chunk, p: Piece) -> None:
        try:
            if self.failure.exc is None:
                t0 = time.perf_counter()
                self.writer.write(chunk.file, p.offset, p.data, out=p.out, hashed=True)
                self._add("write", time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - handed to the engine's thread
            self.failure.set(e)
        finally:
            self._task_done(chunk)

    def _hash_stream(self, file: int) -> None:
        """Drain ``file``'s hash stream: its ready chunks in sequence order, until the next one is not ready."""
        f = self._files[file]
        with self._lock:
            self._hashing_now += 1
            self.max_hashing = max(self.max_hashing, self._hashing_now)
        try:
            while True:
                with self._lock:
                    chunk = f.ready.pop(f.next_hash, None)
                    if chunk is None:
                        f.hashing = False
                        return
                    f.next_hash += 1
                try:
                    if self.failure.exc is None:
                        t0 = time.perf_counter()
                        f.first_hash = f.first_hash or t0
                        for p in chunk.pieces:
                            self.writer.digest(file, p.offset, p.data, p.out)
                        dt = time.perf_counter() - t0
                        f.hash_s += dt
                        self._add("hash", dt)
                        for p in chunk.pieces:
                            if p.after:
                                t0 = time.perf_counter()
                                self.writer.write(file, p.offset, p.data, out=p.out, hashed=True)
                                self._add("write", time.perf_counter() - t0)
                except BaseException as e:  # noqa: BLE001
                    self.failure.set(e)
                finally:
                    self._task_done(chunk)
        finally:
            with self._lock:
                self._hashing_now -= 1

    def _task_done(self, chunk: _Chunk) -> None:
        with chunk.lock:
            chunk.left -= 1
            if chunk.left:
                return
        try:
            if chunk.on_done is not None:
                chunk.on_done()
            if self.failure.exc is None:
                self._chunk_complete(chunk)
        except BaseException as e:  # noqa: BLE001
            self.failure.set(e)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _chunk_complete(self, chunk: _Chunk) -> None:
        plan, item = self.plan, chunk.item
        t = item.tensor
        with self._finish_lock:
            crash_point(f"chunk:{self.stats.chunks_written}")
            self.stats.chunks_written += 1
        written = chunk_out_bytes(plan, item)
        self.report(chunk.n_in + written, t if item.last_of_tensor else None, written)
        f = self._files[chunk.file]
        with self._lock:
            f.completed += 1
            done = f.closed and f.completed == f.reserved
        if done:
            self._file_complete(chunk.file)

    def _file_complete(self, file: int) -> None:
        """Finish complete files in file order (a crash leaves the earlier files finished, as a sequential run)."""
        with self._finish_lock:
            self._complete.add(file)
            while self._finish_next < len(self._order) and self._order[self._finish_next] in self._complete:
                i = self._order[self._finish_next]
                if self.failure.exc is not None:
                    return
                t0 = time.perf_counter()
                self.writer.finish_file(i)
                self._add("finish", time.perf_counter() - t0)
                self._finish_next += 1
                header = len(self.plan.files[i].header) * self.plan.outputs
                self.report(header, None, header)


def file_of(plan: MergePlan, item: WorkItem) -> int:
    """The output file a chunk belongs to."""
    if item.tensor is not None:
        return item.tensor.file
    for i, f in enumerate(plan.files):  # a file with no tensors at all (the shard planner never makes one)
        if not f.tensors:
            return i
    raise StreamMergeError("internal error: empty work item without an empty file")


def chunk_out_bytes(plan: MergePlan, item: WorkItem) -> int:
    """Output bytes a chunk accounts for, over every output of the pass, headers aside (finish_chunk's count)."""
    t = item.tensor
    written = out_bytes(t, item) if t is not None else 0
    if t is not None and t.scale_out is not None and t.op is Op.MERGE and item.last_of_tensor:
        written += t.scale_out.nbytes  # the new block scales, written with the weight's last band
    return written * plan.outputs


# ---------------------------------------------------------------------------------------------- the work order
class FileWindow:
    """The work list over a window of output files: output order while the hash streams keep up, and one more
    output file in flight each time every open file's hash stream is backed up, up to ``max_files``.

    Each file's chunks still come in offset order (its hash stream needs them so); between files, the next chunk is
    taken from the open file with the fewest chunks waiting for its hash. ``backlog(file)``: chunks of ``file``
    computed and waiting to be hashed (:meth:`OutputStage.backlog`); ``bound(file)``: whether its hash stream is
    the bottleneck (:meth:`OutputStage.hash_bound`); None or ``max_files`` 1: plain output order.
    ``prefetch(item)`` is called ``ahead`` chunks before each file's chunk is yielded (input read-ahead).
    """

    def __init__(
        self,
        plan: MergePlan,
        skip: set[int] | frozenset[int],
        max_files: int,
        backlog: Callable[[int], int] | None = None,
        prefetch: Callable[[WorkItem], None] | None = None,
        ahead: int = 2,
        bound: Callable[[int], bool] | None = None,
    ):
        self.plan = plan
        self.max_files = max(1, max_files)
        self.backlog = backlog
        self.bound = bound
        self.prefetch = prefetch
        self.ahead = ahead
        n = len(plan.files)
        self._pending = collections.deque(i for i in range(n) if i not in skip)
        self._skip_all = frozenset(range(n))
        self.max_open = 0  # the most files open at once (reported)

    def _file_items(self, i: int) -> Iterator[WorkItem]:
        queued: collections.deque[WorkItem] = collections.deque()
        for item in iter_work(self.plan, self._skip_all - {i}):
            if self.prefetch is not None:
                self.prefetch(item)
            queued.append(item)
            if len(queued) > self.ahead:
                yield queued.popleft()
        yield from queued

    def __iter__(self) -> Iterator[WorkItem]:
        open_: list[tuple[int, Iterator[WorkItem]]] = []
        while open_ or self._pending:
            if not open_ or (
                self._pending
                and len(open_) < self.max_files
                and self.bound is not None
                and all(self.bound(i) for i, _ in open_)
            ):
                i = self._pending.popleft()
                open_.append((i, self._file_items(i)))
                self.max_open = max(self.max_open, len(open_))
            k = 0
            if len(open_) > 1 and self.backlog is not None:
                k = min(range(len(open_)), key=lambda j: self.backlog(open_[j][0]))  # ties: the earliest file
            i, it = open_[k]
            item = next(it, None)
            if item is None:
                del open_[k]
                continue
            yield item


_SHA_RATE: list[float] = []
# Bytes hashed once to measure this machine's SHA-256 rate on one core (~5 ms).
SHA_PROBE_BYTES = 8 * 2**20


def sha256_rate() -> float:
    """One core's SHA-256 rate on this machine in bytes/s, measured once per process (best of three 8 MiB runs)."""
    if not _SHA_RATE:
        buf = bytes(SHA_PROBE_BYTES)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            hashlib.sha256(buf).digest()
            best = min(best, time.perf_counter() - t0)
        _SHA_RATE.append(SHA_PROBE_BYTES / max(best, 1e-9))
    return _SHA_RATE[0]


def hash_files_for(rate: float, threads: int, files: int) -> int:
    """Output files to keep in flight so that their SHA-256 streams hash ``rate`` bytes/s: ``rate`` over one core's
    measured rate (:func:`sha256_rate`), rounded up, at least 1, at most ``threads`` and ``files``."""
    need = math.ceil(rate / sha256_rate()) if rate > 0 else 1
    return max(1, min(need, threads, files))


def interleave(plan: MergePlan, skip: set[int] | frozenset[int], files: int) -> Iterator[WorkItem]:
    """A static window (for an engine that plans its whole work list first): ``files`` output files in flight,
    their chunks taken in turn, each file's in offset order; a finished file's place goes to the next file."""
    n = len(plan.files)
    every = frozenset(range(n))
    pending = collections.deque(i for i in range(n) if i not in skip)
    open_: collections.deque[Iterator[WorkItem]] = collections.deque()
    while open_ or pending:
        while pending and len(open_) < max(1, files):
            open_.append(iter_work(plan, every - {pending.popleft()}))
        it = open_.popleft()
        item = next(it, None)
        if item is not None:
            yield item
            open_.append(it)
