"""The CUDA engine: inputs DMA'd from registered windows of the read-only input mmaps, the fused Triton kernel, output
through pinned slots, on three streams ordered with events. Same plan, same bytes as the CPU engine.

Data path per chunk (a chunk is at most ``chunk_bytes`` per input, see ``MergeOptions.chunk_elems``)::

    page cache ──(registered window: cudaMemcpyAsync straight from the mmap, no CPU copy)──┐
              └─(refused: parallel host copies into a pinned staging slot, then H2D)──────┴► device input slot k
    copy-in stream:  wait kernel(k - S) · H2D x 3 · record in_done[k]
    compute stream:  wait in_done[k] · wait d2h_done[k] (of chunk g - S) · merge kernel · record comp_done[k]
    copy-out stream: wait comp_done[k] · D2H into pinned output slot p · record d2h_done[k], out_ready[p]
    writer thread:   out_ready[p].synchronize() · writer.write(...) · give slot p back · release windows

``S`` device slots (each 3 inputs + 1 output of ``chunk_bytes``) and ``P`` pinned output slots are allocated once
before the loop; the steady state allocates nothing. The host waits only on per-slot events: for a free pinned
output slot (the writer's pace), and, on the staging path, for the previous H2D out of a staging slot before
refilling it. There is no per-chunk device synchronisation and no ``record_stream``: buffers are freed only after
the final synchronisation.

Windows: every input file is cut into a fixed grid of ``window_bytes`` cells; a window is the page-aligned part of
one cell that a run of consecutive chunks reads (:func:`plan_windows`). A window thread registers windows with
``cudaHostRegister(ReadOnly)`` ahead of use (up to ``register_ahead_bytes`` of input ahead of the chunk being
issued, ``register_threads`` at a time; registration faults the pages in, so it doubles as read-ahead on a cold
cache) and unregisters each one once the writer has finished its last chunk, then drops its pages from this process
(``MADV_DONTNEED``). Windows of one mapping never overlap while registered. When a registration is refused, the
CUDA error it left behind is cleared (it would otherwise surface in the next kernel launch check), the refusal is
reported in the notes, and every later window is only read ahead (``MADV_WILLNEED``) while its chunks go through
pinned staging slots filled by a small pool of host threads. ``register_windows=False`` takes that path from the start.

Chunks follow the CPU engine's work list exactly (``iter_work``: per-chunk op, per-tensor alpha, vocabulary tails
copied or converted from the target, extract without a target term, apply without sft, several vectors chained
through a float32 accumulator, a sweep's outputs one kernel each); COPY chunks go from the
mapping to the writer without touching the GPU.

Everything that decides an order (windows, their register/release points, slot use) is plain Python over the plan,
testable without a GPU; the device itself is behind a small backend interface, with :class:`SimBackend` a CPU
stand-in that executes each stream's work lazily, in a random order that respects only the events, and checks that
every H2D reads registered or pinned memory — so the scheduling runs, and is checked byte for byte against the CPU
engine, in CI (with the real Triton kernel under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import dataclasses
import importlib
import mmap
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..budget import DEFAULT_DEVICE_SLOTS, DEFAULT_WINDOW_BYTES
from ..checkpoint import Checkpoint, TensorRef
from ..errors import EngineError, OptionsError, StreamMergeError
from ..kernels.reference import OUT_DTYPES, round_from_f32
from ..memory import rss_anon
from ..plan import MergePlan, Op
from . import EngineStats, Progress, ProgressCounter
from .cpu import (
    WorkItem,
    _elem_size,
    _Failure,
    _out_bytes,
    _out_offset,
    finish_chunk,
    iter_work,
    record_nonfinite,
    work_bytes,
)

# Pinned output slots between the copy-out stream and the writer thread: one being written, one being filled by
# D2H, one spare to absorb jitter in write latency (as the CPU engine's OUTPUT_SLOTS).
DEFAULT_HOST_SLOTS = 3
# Input bytes (all three inputs together) registered ahead of the chunk being issued: ~20 ms of H2D at 55 GB/s,
# several window registrations' worth, so the window thread stays ahead of the copy engine on a warm cache.
DEFAULT_REGISTER_AHEAD_BYTES = 2**30
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

# cudaHostRegister flags (CUDA runtime, driver_types.h): Portable = 0x01 (pinned for every context), ReadOnly = 0x08
# (the device only reads it: required to register a PROT_READ file mapping; needs cudaDevAttrHostRegisterReadOnly-
# Supported). Mapped (0x02) is not needed: chunks are copied with cudaMemcpyAsync, never read by kernels in place.
CUDA_HOST_REGISTER_PORTABLE = 0x01
CUDA_HOST_REGISTER_READ_ONLY = 0x08
REGISTER_FLAGS = CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_READ_ONLY

PAGE = mmap.PAGESIZE
# How often a blocked host thread re-checks for a failure elsewhere (seconds).
_POLL_S = 0.5

Key = tuple[str, int]  # (role, file index within that role's checkpoint)


# ---------------------------------------------------------------------------------------------- scheduling core
@dataclass(frozen=True)
class Source:
    """Bytes ``[start, stop)`` (absolute file offsets) of the file ``key`` that one chunk reads for one input."""

    key: Key
    start: int
    stop: int


@dataclass(frozen=True)
class Segment:
    """A piece of a :class:`Source` inside one window: file bytes ``[start, stop)`` go to offset ``dst`` of the
    input's device slot."""

    window: int
    start: int
    stop: int
    dst: int


@dataclass
class Window:
    """A page-aligned range ``[start, stop)`` of one file, registered from ``register_at`` (the GPU chunk index whose
    issue opens it) until its chunk ``last_use`` is written."""

    id: int
    key: Key
    start: int
    stop: int
    first_use: int
    last_use: int
    register_at: int = 0

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass
class WindowPlan:
    """Which windows exist, which chunk reads what from which window, and when windows open and close.

    Attributes:
        windows (`list[Window]`): every window; ids are indices.
        segments (`list[list[list[Segment]]]`): per GPU chunk, per input, the segments tiling its source in order.
        order (`list[int]`): window ids in registration order (by first use; register_at is non-decreasing in it).
        releases (`dict[int, list[int]]`): GPU chunk index -> windows whose last use it is.
        window_bytes / ahead_bytes (`int`): the grid cell size and the read-ahead the plan was made with.
    """

    windows: list[Window]
    segments: list[list[list[Segment]]]
    order: list[int]
    releases: dict[int, list[int]]
    window_bytes: int
    ahead_bytes: int

    def live(self, lag: int) -> tuple[int, int]:
        """The most windows (bytes, count) registered at once when the writer finishes chunk ``g - lag - 1`` before
        chunk ``g`` is issued (the engine's bound with ``lag`` = pinned output slots; see ``CudaEngine``)."""
        deltas: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
        for w in self.windows:
            deltas[w.register_at][0] += w.nbytes
            deltas[w.register_at][1] += 1
            deltas[w.last_use + lag + 1][0] -= w.nbytes
            deltas[w.last_use + lag + 1][1] -= 1
        best_b = best_n = cur_b = cur_n = 0
        for i in sorted(deltas):
            cur_b += deltas[i][0]
            cur_n += deltas[i][1]
            best_b, best_n = max(best_b, cur_b), max(best_n, cur_n)
        return best_b, best_n


def _page_floor(x: int, page: int) -> int:
    return x // page * page


def _page_ceil(x: int, page: int) -> int:
    return -(-x // page) * page


def plan_windows(
    sources: Sequence[Sequence[Source]],
    map_sizes: dict[Key, int],
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    ahead_bytes: int = DEFAULT_REGISTER_AHEAD_BYTES,
    page: int = PAGE,
) -> WindowPlan:
    """Plan the registration windows for GPU chunks reading ``sources`` (per chunk, per input), in issue order.

    Each file is cut into a grid of ``window_bytes`` cells (a multiple of ``page``). Consecutive uses of a cell form
    one window unless more than ``ahead_bytes`` of input are read between two of them (then the cell gets a new
    window later, so a scattered read order does not keep a window registered for long). A window covers the
    page-aligned hull of its uses within its cell, so windows of different cells never overlap; two windows of one
    cell may share a page, and the engine never registers them at once. A source crossing a cell boundary is split
    into segments, one per window. ``register_at`` opens a window when the chunks between it and the window's first
    use read at most ``ahead_bytes``.

    Args:
        sources: per GPU chunk, its input byte ranges (one :class:`Source` per input).
        map_sizes (`dict`): bytes mapped per file key (windows end at most at the page boundary after it).
        window_bytes (`int`): grid cell size, a positive multiple of ``page``.
        ahead_bytes (`int`): read-ahead, in input bytes of all inputs together.
        page (`int`): the page size.

    Returns:
        [`WindowPlan`].

    Raises:
        `ValueError`: a window size that is not a positive multiple of the page, or a source outside its file.
    """
    if window_bytes <= 0 or window_bytes % page:
        raise ValueError(f"window_bytes must be a positive multiple of the page size {page}, got {window_bytes}")
    cum = [0]
    for item in sources:
        cum.append(cum[-1] + sum(s.stop - s.start for s in item))
    windows: list[Window] = []
    current: dict[tuple[Key, int], int] = {}
    segments: list[list[list[Segment]]] = []
    for i, item in enumerate(sources):
        per_input: list[list[Segment]] = []
        for src in item:
            size = map_sizes[src.key]
            if not 0 <= src.start <= src.stop <= size:
                raise ValueError(f"source {src} lies outside its file of {size} bytes")
            segs: list[Segment] = []
            a = src.start
            while a < src.stop:
                cell = a // window_bytes
                b = min(src.stop, (cell + 1) * window_bytes)
                lo, hi = _page_floor(a, page), min(_page_ceil(b, page), _page_ceil(size, page))
                wid = current.get((src.key, cell))
                if wid is not None and cum[i] - cum[windows[wid].last_use + 1] > ahead_bytes:
                    wid = None  # a long gap since this cell was last read: close it, open a new window later
                if wid is None:
                    wid = len(windows)
                    windows.append(Window(wid, src.key, lo, hi, i, i))
                    current[(src.key, cell)] = wid
                else:
                    w = windows[wid]
                    w.start, w.stop, w.last_use = min(w.start, lo), max(w.stop, hi), i
                segs.append(Segment(wid, a, b, a - src.start))
                a = b
            per_input.append(segs)
        segments.append(per_input)
    releases: dict[int, list[int]] = collections.defaultdict(list)
    for w in windows:
        w.register_at = min(w.first_use, bisect.bisect_left(cum, cum[w.first_use] - ahead_bytes))
        releases[w.last_use].append(w.id)
    order = sorted(range(len(windows)), key=lambda j: (windows[j].first_use, j))
    return WindowPlan(windows, segments, order, dict(releases), window_bytes, ahead_bytes)


class SlotRing:
    """A free list of ``n`` pinned output slots, handed out in FIFO order: slot ``p`` is reused only after the writer
    gave it back, i.e. after its D2H completed and its bytes were written.

    Example:
        ```py
        >>> ring = SlotRing(2)
        >>> ring.acquire(), ring.acquire()
        (0, 1)
        ```
    """

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"SlotRing needs at least one slot, got {n}")
        self.n = n
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(n):
            self._free.put(i)

    def acquire(self, check: Callable[[], None] | None = None, poll_s: float = _POLL_S) -> int:
        """The next free slot, blocking until the writer gives one back; ``check`` runs between polls (raise there
        to abandon the wait)."""
        while True:
            if check is not None:
                check()
            try:
                return self._free.get(timeout=poll_s)
            except queue.Empty:
                continue

    def release(self, slot: int) -> None:
        self._free.put(slot)

    def free(self) -> int:
        return self._free.qsize()


def interval_stats(intervals: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Busy time per stage (union of its intervals), their sum, the union of everything and the span, in the units
    given; ``overlap`` = sum / union (1.0: stages ran one after another; 3.0: three stages always at once)."""

    def union(ivs: list[tuple[float, float]]) -> float:
        total, end = 0.0, float("-inf")
        for a, b in sorted(ivs):
            if b <= end:
                continue
            total += b - max(a, end)
            end = b
        return total

    out: dict[str, float] = {}
    everything: list[tuple[float, float]] = []
    for name, ivs in intervals.items():
        out[name] = union(ivs)
        everything += ivs
    out["sum"] = sum(out[name] for name in intervals)
    out["union"] = union(everything)
    out["span"] = (max(b for _, b in everything) - min(a for a, _ in everything)) if everything else 0.0
    out["overlap"] = out["sum"] / out["union"] if out["union"] > 0 else 0.0
    return out


# ---------------------------------------------------------------------------------------------- device backends
_CUDART: list = []


def _cudart_ctypes():
    """The CUDA runtime library torch loaded (found in /proc/self/maps), through ctypes; None if not found.

    torch.cuda.cudart() binds cudaHostRegister but not cudaGetLastError; the same library instance gives it."""
    if not _CUDART:
        lib = None
        try:
            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "libcudart.so" in line}
            for path in sorted(paths):
                try:
                    cand = ctypes.CDLL(path)
                    cand.cudaGetLastError.restype = ctypes.c_int
                    cand.cudaPeekAtLastError.restype = ctypes.c_int
                    lib = cand
                    break
                except (OSError, AttributeError):
                    continue
        except OSError:
            pass
        _CUDART.append(lib)
    return _CUDART[0]


def clear_cuda_error(device: torch.device | None = None) -> bool:
    """Clear this thread's CUDA runtime error left by a failed call (such as a refused ``cudaHostRegister``).

    A failed runtime call leaves its error as the thread's "last error"; torch checks ``cudaGetLastError()`` after
    every kernel launch, so the next launch on this thread would raise it. Cleared through the runtime's own
    ``cudaGetLastError`` (the library torch loaded, through ctypes) when it is found, then checked with a tiny
    launch whose check consumes whatever is left (torch clears the error it raises).

    Returns:
        `bool`: True when a launch on this thread works afterwards.
    """
    lib = _cudart_ctypes()
    if lib is not None:
        lib.cudaGetLastError()
    dev = device or torch.device("cuda", torch.cuda.current_device())
    for attempt in range(2):
        try:
            torch.zeros(1, device=dev)  # a fill kernel: torch checks (and so clears) the last error after it
            return True
        except RuntimeError:
            if attempt:
                return False  # a sticky error: the context is broken
    return False


class CudaBackend:
    """The real device: torch CUDA streams, events and buffers, the Triton kernels, cudaHostRegister.

    Args:
        device (`torch.device | int | str`, *optional*): the GPU (the current one by default).
        register_flags (`int`): flags for ``cudaHostRegister`` (``REGISTER_FLAGS``).
        check_pinned (`bool`): assert that every H2D source is pinned or registered (a test aid: ~µs per copy).
    """

    name = "cuda"

    def __init__(self, device=None, register_flags: int = REGISTER_FLAGS, check_pinned: bool = False):
        if not torch.cuda.is_available():
            raise EngineError("the CUDA engine needs a CUDA GPU; none is available (use --device cpu)")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.register_flags = register_flags
        self.check_pinned = check_pinned
        self.kernels = importlib.import_module("streammerge.kernels.triton_merge")
        self.cudart = torch.cuda.cudart()

    def bind_thread(self) -> None:
        torch.cuda.set_device(self.device)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def stream(self):
        return torch.cuda.Stream(device=self.device)

    def event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing)

    def h2d(self, stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.check_pinned and not src.is_pinned():
            raise EngineError(f"internal error: H2D from pageable memory at 0x{src.data_ptr():x}")
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def d2h(self, stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream, event) -> None:
        event.record(stream)

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def sync_event(self, event) -> None:
        event.synchronize()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def merge(self, stream, t, s, g, alpha: float, out_dtype: str, out: torch.Tensor) -> None:
        """``round(t + alpha * (g - s))`` on ``stream``; ``t`` None: extract (``alpha * (g - s)``); ``s`` None:
        apply a stored vector (``t + alpha * g``)."""
        with torch.cuda.stream(stream):
            if t is None:
                self.kernels.extract_vector_triton(s, g, alpha, out_dtype, out=out)
            elif s is None:
                self.kernels.apply_vector_triton(t, g, alpha, out_dtype, out=out)
            else:
                self.kernels.merge_triton(t, s, g, alpha, out_dtype, out=out)

    def convert(self, stream, src, out_dtype: str, out: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            self.kernels.convert_triton(src, out_dtype, out=out)

    def count_nonfinite(self, stream, out: torch.Tensor, inputs: Sequence[torch.Tensor], dst: torch.Tensor) -> None:
        # Temporaries come from the caching allocator on this stream and are reused chunk after chunk.
        with torch.cuda.stream(stream):
            bad = torch.isfinite(inputs[0])
            for x in inputs[1:]:
                bad &= torch.isfinite(x)
            bad &= ~torch.isfinite(out)
            dst.copy_(bad.sum())

    def register(self, ptr: int, nbytes: int) -> tuple[int, str]:
        """``cudaHostRegister``; returns (error code, message). A failure leaves the thread's CUDA error set: the
        caller clears it (:meth:`clear_error`)."""
        err = self.cudart.cudaHostRegister(ptr, nbytes, self.register_flags)
        code = int(err)
        return (0, "") if code == 0 else (code, str(self.cudart.cudaGetErrorString(err)))

    def unregister(self, ptr: int) -> tuple[int, str]:
        err = self.cudart.cudaHostUnregister(ptr)
        code = int(err)
        return (0, "") if code == 0 else (code, str(self.cudart.cudaGetErrorString(err)))

    def clear_error(self) -> bool:
        return clear_cuda_error(self.device)

    def is_pinned(self, t: torch.Tensor) -> bool:
        return t.is_pinned()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b)


# Operations one simulated stream runs in a row before another is picked.
_SIM_BURSTS = (1, 1, 2, 3, 8, 32)


def _merge_torch(t, s, g, alpha: float, out_dtype: str, out: torch.Tensor) -> None:
    """The contract in torch on CPU tensors, with the optional terms of extract (no ``t``) and apply (no ``s``)."""
    d = g.to(torch.float32)
    if s is not None:
        d = d - s.to(torch.float32)
    d = d * torch.tensor(alpha, dtype=torch.float32)
    r = d if t is None else t.to(torch.float32) + d
    round_from_f32(r.contiguous(), out_dtype, out=out)


class SimulationError(AssertionError):
    """The simulated device caught the engine doing something a real GPU would punish (a race, a pageable or
    unregistered H2D, an overlapping registration, a launch with an uncleared error)."""


class _SimEvent:
    def __init__(self) -> None:
        self.recorded = 0  # records issued
        self.done = 0  # records executed
        self.time = 0.0


class _SimStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ops: collections.deque = collections.deque()


class SimBackend:
    """A CPU stand-in for the GPU that checks the engine's ordering, for tests and CPU-only runs of the scheduling.

    "Device" buffers are CPU tensors (filled with a poison byte). Work queued on a stream runs lazily: when a thread
    waits for an event or the device (those waits sometimes start late, so that other threads queue more work
    meanwhile), and now and then by itself as work is queued. Each time a random stream whose next operation may run
    runs a burst of random length; a ``wait`` blocks its stream until the event's record made before the wait has
    executed. So a missing wait lets a later operation overtake (the output then differs from the CPU engine's), a
    buffer reused before the copy reading it ran gives wrong bytes, and a window unregistered before its copy ran is
    caught when the copy executes. Every H2D source must lie inside a live registration or a pinned
    (``host_buffer``) allocation, every D2H destination inside a pinned one. Registration mimics CUDA: page-aligned,
    no overlap; ``register="refuse"`` refuses every call and ``refuse_after=N`` every call after the N-th, leaving an
    error on the calling thread that a kernel launch from that thread raises until :meth:`clear_error` (CUDA's
    per-thread "last error"; ``errors`` shows what was never cleared; ``clear_works=False`` makes clearing fail).

    The kernels are the Triton launchers when ``streammerge.kernels.triton_merge`` runs under ``TRITON_INTERPRET=1``
    (``kernel="auto"``), else the pure-torch reference (``kernel="reference"``).
    """

    name = "sim"

    def __init__(
        self,
        seed: int = 0,
        register: str = "accept",
        refuse_after: int | None = None,
        clear_works: bool = True,
        kernel: str = "auto",
    ):
        if register not in ("accept", "refuse"):
            raise ValueError(f"register must be 'accept' or 'refuse', got {register!r}")
        self.rng = random.Random(seed)
        self.register_mode = register
        self.refuse_after = refuse_after
        self.clear_works = clear_works
        self._lock = threading.RLock()
        self._streams: list[_SimStream] = []
        self.registered: dict[int, int] = {}  # ptr -> nbytes
        self.registered_bytes = 0
        self.max_registered_bytes = 0
        self.max_registered = 0
        self.registrations = 0
        self.refusals = 0
        self.errors: dict[int, str] = {}  # thread ident -> the error a failed call left there (CUDA: per thread)
        self.pinned: list[tuple[int, int]] = []
        self._keep: list[torch.Tensor] = []
        self.device_bytes = 0
        self.h2d_count = {"registered": 0, "pinned": 0}
        self.ops_run = 0
        self.kernel = "reference"
        if kernel == "auto":
            try:
                tm = importlib.import_module("streammerge.kernels.triton_merge")
                if tm.INTERPRETED:
                    self.kernel = "triton-interpreter"
            except ImportError:
                pass
        elif kernel != "reference":
            raise ValueError(f"kernel must be 'auto' or 'reference', got {kernel!r}")

    # ----- buffers, streams, events
    def bind_thread(self) -> None:
        pass

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        self.device_bytes += nbytes
        return torch.full((nbytes,), 0xA5, dtype=torch.uint8)  # poisoned: unwritten bytes show up as mismatches

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        t = torch.full((nbytes,), 0x5A, dtype=torch.uint8)
        with self._lock:
            self.pinned.append((t.data_ptr(), nbytes))
            self._keep.append(t)
        return t

    def stream(self) -> _SimStream:
        s = _SimStream(f"stream{len(self._streams)}")
        with self._lock:
            self._streams.append(s)
        return s

    def event(self, timing: bool = False) -> _SimEvent:
        return _SimEvent()

    # ----- queued work
    def _enqueue(self, stream: _SimStream, op) -> None:
        with self._lock:
            stream.ops.append(op)
            self._spontaneous()

    def _spontaneous(self) -> None:
        # Now and then the device gets on with queued work by itself, on one stream, before anyone waits for it.
        if self.rng.random() < 0.25:
            ready = [s for s in self._streams if self._runnable(s)]
            if ready:
                self._burst(self.rng.choice(ready), lambda: False)

    def _inside(self, ptr: int, n: int, ranges) -> bool:
        return any(p <= ptr and ptr + n <= p + m for p, m in ranges)

    def h2d(self, stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        def run() -> None:
            ptr, n = src.data_ptr(), src.numel() * src.element_size()
            if self._inside(ptr, n, self.registered.items()):
                self.h2d_count["registered"] += 1
            elif self._inside(ptr, n, self.pinned):
                self.h2d_count["pinned"] += 1
            else:
                raise SimulationError(f"H2D from memory neither registered nor pinned: 0x{ptr:x} + {n}")
            dst.copy_(src)

        self._enqueue(stream, ("op", run))

    def d2h(self, stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        def run() -> None:
            if not self._inside(dst.data_ptr(), dst.numel() * dst.element_size(), self.pinned):
                raise SimulationError("D2H into memory that is not pinned")
            dst.copy_(src)

        self._enqueue(stream, ("op", run))

    def record(self, stream, event: _SimEvent) -> None:
        with self._lock:
            event.recorded += 1
            stream.ops.append(("record", event, event.recorded))
            self._spontaneous()

    def wait(self, stream, event: _SimEvent) -> None:
        with self._lock:
            if event.recorded:
                stream.ops.append(("wait", event, event.recorded))

    def _launch_check(self) -> None:
        err = self.errors.get(threading.get_ident())
        if err is not None:
            raise SimulationError(f"kernel launch with an uncleared CUDA error: {err}")

    def merge(self, stream, t, s, g, alpha: float, out_dtype: str, out: torch.Tensor) -> None:
        self._launch_check()

        def run() -> None:
            if self.kernel == "triton-interpreter":
                km = importlib.import_module("streammerge.kernels.triton_merge")
                if t is None:
                    km.extract_vector_triton(s, g, alpha, out_dtype, out=out)
                elif s is None:
                    km.apply_vector_triton(t, g, alpha, out_dtype, out=out)
                else:
                    km.merge_triton(t, s, g, alpha, out_dtype, out=out)
            else:
                _merge_torch(t, s, g, alpha, out_dtype, out)

        self._enqueue(stream, ("op", run))

    def convert(self, stream, src, out_dtype: str, out: torch.Tensor) -> None:
        self._launch_check()

        def run() -> None:
            if self.kernel == "triton-interpreter":
                importlib.import_module("streammerge.kernels.triton_merge").convert_triton(src, out_dtype, out=out)
            else:
                round_from_f32(src.to(torch.float32), out_dtype, out=out)

        self._enqueue(stream, ("op", run))

    def count_nonfinite(self, stream, out: torch.Tensor, inputs: Sequence[torch.Tensor], dst: torch.Tensor) -> None:
        self._launch_check()

        def run() -> None:
            bad = torch.isfinite(inputs[0])
            for x in inputs[1:]:
                bad &= torch.isfinite(x)
            bad &= ~torch.isfinite(out)
            dst.copy_(bad.sum())

        self._enqueue(stream, ("op", run))

    # ----- execution
    def _runnable(self, s: _SimStream) -> bool:
        if not s.ops:
            return False
        head = s.ops[0]
        return head[0] != "wait" or head[1].done >= head[2]

    def _run_until(self, done: Callable[[], bool]) -> None:
        with self._lock:
            while not done():
                ready = [s for s in self._streams if self._runnable(s)]
                if not ready:
                    raise SimulationError("simulated device deadlock: no stream can make progress")
                # A random stream runs a burst of random length: streams race ahead of each other, as DMA engines and
                # SMs do, which is what exposes a missing wait.
                self._burst(self.rng.choice(ready), done)

    def _burst(self, s: _SimStream, done: Callable[[], bool]) -> None:
        for _ in range(self.rng.choice(_SIM_BURSTS)):
            op = s.ops.popleft()
            if op[0] == "record":
                op[1].done = max(op[1].done, op[2])
                op[1].time = time.perf_counter()
            elif op[0] == "op":
                op[1]()
            self.ops_run += 1
            if done() or not self._runnable(s):
                return

    def sync_event(self, event: _SimEvent) -> None:
        target = event.recorded
        if self.rng.random() < 0.3:
            # A waiting thread is sometimes slow to get there, so that other threads queue more work meanwhile.
            time.sleep(self.rng.random() * 2e-3)
        self._run_until(lambda: event.done >= target)

    def synchronize(self) -> None:
        self._run_until(lambda: not any(s.ops for s in self._streams))

    # ----- registration
    def register(self, ptr: int, nbytes: int) -> tuple[int, str]:
        with self._lock:
            if ptr % PAGE or nbytes % PAGE or nbytes <= 0:
                raise SimulationError(f"registration not page-aligned: 0x{ptr:x} + {nbytes}")
            refuse = self.register_mode == "refuse" or (
                self.refuse_after is not None and self.registrations >= self.refuse_after
            )
            if refuse:
                self.refusals += 1
                self.errors[threading.get_ident()] = "cudaErrorNotSupported (simulated refusal)"
                return 801, "operation not supported (simulated refusal)"
            for p, m in self.registered.items():
                if ptr < p + m and p < ptr + nbytes:
                    raise SimulationError(f"overlapping registration: 0x{ptr:x}+{nbytes} and 0x{p:x}+{m}")
            self.registered[ptr] = nbytes
            self.registrations += 1
            self.registered_bytes += nbytes
            self.max_registered_bytes = max(self.max_registered_bytes, self.registered_bytes)
            self.max_registered = max(self.max_registered, len(self.registered))
            return 0, ""

    def unregister(self, ptr: int) -> tuple[int, str]:
        with self._lock:
            n = self.registered.pop(ptr, None)
            if n is None:
                self.errors[threading.get_ident()] = "cudaErrorHostMemoryNotRegistered (simulated)"
                return 713, "host memory not registered (simulated)"
            self.registered_bytes -= n
            return 0, ""

    def clear_error(self) -> bool:
        with self._lock:
            if self.clear_works:
                self.errors.pop(threading.get_ident(), None)
            return threading.get_ident() not in self.errors

    def is_pinned(self, t: torch.Tensor) -> bool:
        n = t.numel() * t.element_size()
        return self._inside(t.data_ptr(), n, self.pinned) or self._inside(t.data_ptr(), n, self.registered.items())

    def reset_peak(self) -> None:
        self.device_bytes = 0

    def peak_memory(self) -> int:
        return self.device_bytes

    def elapsed_ms(self, a: _SimEvent, b: _SimEvent) -> float:
        return (b.time - a.time) * 1e3


# ---------------------------------------------------------------------------------------------- window thread
_PENDING, _REGISTERED, _STAGED, _RELEASED = "pending", "registered", "staged", "released"


class _WindowRunner:
    """Registers windows ahead of the issuing thread and unregisters them behind the writer.

    A scheduling thread closes (unregisters) the windows whose last chunk the writer finished, then decides, in window
    order, what may open (its gate is open, no occupied window of the same mapping overlaps it, fewer than
    ``threads`` opens in flight); ``threads`` workers do the slow calls (cudaHostRegister pins and faults every page).
    Every open starts after the closes posted before it, so registered bytes stay within ``WindowPlan.live``. A refused
    registration's error is cleared on the worker thread that got it (CUDA errors are per thread).
    """

    def __init__(
        self,
        be,
        wplan: WindowPlan,
        maps: dict[Key, mmap.mmap],
        bases: dict[Key, int],
        register: bool,
        failure: _Failure,
        timers: dict[str, float],
        threads: int = 1,
        files: dict[Key, tuple[Checkpoint, int]] | None = None,
    ):
        self.be = be
        self.files = files or {}
        self.plan = wplan
        self.maps = maps
        self.bases = bases
        self.register_enabled = register
        self.failure = failure
        self.timers = timers
        self.threads = threads
        n = len(wplan.windows)
        self.status = [_PENDING] * n
        self.ready = [threading.Event() for _ in range(n)]
        self.cond = threading.Condition()
        self.issue_pos = -1
        self.pending: collections.deque[int] = collections.deque()
        self.stopping = False
        self.occupied: set[int] = set()  # opening, open, or closing: its range may not be registered again yet
        self.opening = 0
        self.live: dict[int, int] = {}  # window id -> registered pointer
        self.live_bytes = 0
        self.max_live_bytes = 0
        self.max_live = 0
        self.registered = 0
        self.registered_bytes = 0
        self.refusal: str | None = None
        self.unregister_errors: list[str] = []
        self.thread = threading.Thread(target=self._main, name="sm-windows", daemon=True)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="sm-register", initializer=self._init_worker)

    # ----- called by other threads
    def start(self) -> None:
        self.thread.start()

    def advance(self, g: int) -> None:
        with self.cond:
            self.issue_pos = g
            self.cond.notify_all()

    def release_after(self, g: int) -> None:
        done = self.plan.releases.get(g)
        if done:
            with self.cond:
                self.pending.extend(done)
                self.cond.notify_all()

    def wait_ready(self, wid: int, check: Callable[[], None]) -> bool:
        """Block until window ``wid`` is registered or staged; True when its chunks may DMA from it directly."""
        ev = self.ready[wid]
        while not ev.wait(_POLL_S):
            check()
            if not self.thread.is_alive() and not ev.is_set():
                raise EngineError("internal error: the window thread stopped before a window was ready")
        return self.status[wid] == _REGISTERED

    def overlaps_occupied(self, key: Key, start: int, stop: int) -> bool:
        """Whether file bytes ``[start, stop)`` of mapping ``key`` touch a window being registered or registered."""
        with self.cond:
            return any(
                (o := self.plan.windows[wid]).key == key and o.start < stop and start < o.stop for wid in self.occupied
            )

    def close(self) -> None:
        """Stop, let the workers finish, then unregister whatever is still registered (call once the device is
        idle: no copy may still read a window)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join()
        self.pool.shutdown(wait=True)
        for wid in list(self.live):
            self._close(wid)

    # ----- the scheduling thread
    def _init_worker(self) -> None:
        self.be.bind_thread()

    def _overlaps(self, w: Window) -> bool:
        for wid in self.occupied:
            o = self.plan.windows[wid]
            if o.key == w.key and o.start < w.stop and w.start < o.stop:
                return True
        return False

    def _can_open(self, nxt: int) -> bool:
        order = self.plan.order
        if nxt >= len(order) or self.opening >= self.threads:
            return False
        w = self.plan.windows[order[nxt]]
        return w.register_at <= self.issue_pos and not self._overlaps(w)

    def _main(self) -> None:
        try:
            self.be.bind_thread()
            order = self.plan.order
            nxt = 0
            while True:
                with self.cond:
                    while not (self.stopping or self.pending or self._can_open(nxt)):
                        self.cond.wait()
                    if self.stopping:
                        return
                    closes = list(self.pending)
                    self.pending.clear()
                if closes:
                    for wid in closes:
                        self._close(wid)
                    continue  # decide the opens with these windows gone
                with self.cond:
                    opens = []
                    while self._can_open(nxt):
                        wid = order[nxt]
                        self.occupied.add(wid)
                        self.opening += 1
                        opens.append((wid, order[nxt + 1] if nxt + 1 < len(order) else None))
                        nxt += 1
                for wid, next_wid in opens:
                    self.pool.submit(self._job, self._open, wid, next_wid)
        except BaseException as e:  # noqa: BLE001 - handed to the issuing thread
            self.failure.set(e)

    def _job(self, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the issuing thread
            self.failure.set(e)

    # ----- worker side
    def _advise(self, w: Window, advice: int) -> None:
        m = self.maps[w.key]
        if w.start >= len(m):
            return
        try:
            m.madvise(advice, w.start, min(w.stop, len(m)) - w.start)
        except (OSError, ValueError):
            pass

    def _open(self, wid: int, next_wid: int | None) -> None:
        w = self.plan.windows[wid]
        t0 = time.perf_counter()
        try:
            if hasattr(mmap, "MADV_WILLNEED"):
                # Asynchronous read-ahead of this window and the next: on a cold cache the kernel reads in large
                # requests while registration (or the staging copies) fault the pages in one by one.
                self._advise(w, mmap.MADV_WILLNEED)
                if next_wid is not None:
                    self._advise(self.plan.windows[next_wid], mmap.MADV_WILLNEED)
            status = _STAGED
            if self.register_enabled:
                ptr = self.bases[w.key] + w.start
                code, msg = self.be.register(ptr, w.nbytes)
                if code == 0:
                    status = _REGISTERED
                else:
                    # The refusal left this thread's CUDA error set: clear it, or a later launch check raises it.
                    if not self.be.clear_error():
                        raise EngineError(
                            f"cudaHostRegister of {w.nbytes} bytes was refused ({msg}, error {code}) and the CUDA "
                            "error it left could not be cleared; rerun with registration off (pinned staging)"
                        )
                    with self.cond:
                        self.register_enabled = False  # from here on every window goes through staging
                        self.refusal = (
                            self.refusal or f"cudaHostRegister of {w.nbytes} bytes refused ({msg}, error {code})"
                        )
            with self.cond:
                if status == _REGISTERED:
                    self.live[wid] = ptr
                    self.live_bytes += w.nbytes
                    self.max_live_bytes = max(self.max_live_bytes, self.live_bytes)
                    self.max_live = max(self.max_live, len(self.live))
                    self.registered += 1
                    self.registered_bytes += w.nbytes
                    self.timers["register"] += time.perf_counter() - t0
                else:
                    self.timers["advise"] += time.perf_counter() - t0
                self.status[wid] = status
        finally:
            with self.cond:
                self.opening -= 1
                self.cond.notify_all()
            self.ready[wid].set()

    def _close(self, wid: int) -> None:
        w = self.plan.windows[wid]
        t0 = time.perf_counter()
        with self.cond:
            ptr = self.live.pop(wid, None)
        try:
            if ptr is not None:
                code, msg = self.be.unregister(ptr)
                if code:
                    cleared = self.be.clear_error()
                    with self.cond:
                        state = "cleared" if cleared else "NOT cleared"
                        self.unregister_errors.append(f"cudaHostUnregister failed ({msg}, error {code}; {state})")
            with self.cond:
                if ptr is not None:
                    self.live_bytes -= w.nbytes
                others = [o for o in self.occupied if o != wid]
            if hasattr(mmap, "MADV_DONTNEED") and not any(
                self.plan.windows[o].key == w.key
                and self.plan.windows[o].start < w.stop
                and w.start < self.plan.windows[o].stop
                for o in others
            ):
                # Drop the pages from this process: RSS does not grow with the model. The page cache keeps them,
                # unless the inputs cannot stay cached anyway (Checkpoint.drop_cache, set by the merge for inputs
                # larger than half the available memory): then they leave the cache too, as with the CPU engine.
                self._advise(w, mmap.MADV_DONTNEED)
                ck, fi = self.files.get(w.key, (None, 0))
                if ck is not None and getattr(ck, "drop_cache", False) and hasattr(os, "posix_fadvise"):
                    try:
                        os.posix_fadvise(ck.fd(fi), w.start, w.nbytes, os.POSIX_FADV_DONTNEED)
                    except OSError:
                        pass
        finally:
            with self.cond:
                self.status[wid] = _RELEASED
                self.occupied.discard(wid)
                self.timers["unregister"] += time.perf_counter() - t0
                self.cond.notify_all()


# ---------------------------------------------------------------------------------------------- the engine
def _on_gpu(item: WorkItem) -> bool:
    """Whether a chunk is computed on the GPU (MERGE, CONVERT) rather than copied or empty."""
    return item.tensor is not None and item.op in (Op.MERGE, Op.CONVERT) and item.stop > item.start


def _inputs(item: WorkItem) -> list[tuple[str, TensorRef]]:
    """The (role, tensor) inputs a GPU chunk reads, as the CPU engine: CONVERT the target; MERGE the target (unless
    extracting a vector), then each vector's plus and minus tensors (no minus for a stored vector)."""
    return item.tensor.inputs(item.op)


@dataclass
class _Job:
    kind: str  # "slot" (GPU chunk in pinned slots) or "view" (bytes straight from the mmap, or nothing)
    item: WorkItem
    n_in: int
    slots: list[int] = field(default_factory=list)  # one pinned slot per output (one for all when they agree)
    gpu_index: int = -1
    view: torch.Tensor | None = None
    count_nonfinite: bool = False


@dataclass
class _Buffers:
    dev_in: list[list[torch.Tensor]]
    dev_out: list[list[torch.Tensor]]  # per device slot, one per output
    host_out: list[torch.Tensor]
    dev_acc: list[torch.Tensor] = field(default_factory=list)  # float32 accumulator per device slot (several vectors)
    nf_dev: list[torch.Tensor] = field(default_factory=list)
    nf_host: list[torch.Tensor] = field(default_factory=list)
    staging: list[list[torch.Tensor]] | None = None


class CudaEngine:
    """Merge on a CUDA GPU (see the module docstring for the pipeline). Output bytes equal the CPU engine's.

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
        backend (*optional*): the device backend (:class:`CudaBackend` by default; :class:`SimBackend` for tests).

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
        backend=None,
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

    def run(
        self,
        plan: MergePlan,
        ckpts: dict[str, Checkpoint],
        writer,
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
            self._run(be, plan, ckpts, writer, progress, stats)
        finally:
            torch.set_num_threads(old_threads)
        return stats

    # The pipeline is one long function on purpose: the order of its event records and waits is the design.
    def _run(self, be, plan: MergePlan, ckpts, writer, progress, stats: EngineStats) -> None:  # noqa: C901
        t_wall = time.perf_counter()
        opts = plan.options
        chunk = self.chunk_bytes or opts.chunk_bytes
        eplan = (
            plan
            if chunk == opts.chunk_bytes
            else dataclasses.replace(plan, options=dataclasses.replace(opts, chunk_bytes=chunk))
        )
        slot_bytes = max(4, eplan.options.chunk_elems * 4)
        skip = writer.done_files
        items = list(iter_work(eplan, skip))
        total_bytes = work_bytes(plan, skip)
        total_tensors = sum(len(f.tensors) for i, f in enumerate(plan.files) if i not in skip)
        n_out = plan.outputs
        # A sweep's chunk takes one pinned slot per output at once: two chunks' worth plus a spare keep the GPU
        # issuing the next chunk while the writer drains the previous one (as the CPU engine's output_slots).
        S, P = self.slots, (self.host_slots if n_out == 1 else max(self.host_slots, 2 * n_out + 1))

        # ---- what each GPU chunk reads, and the windows over it
        # One checkpoint may stand in several roles (extract passes grpo as the target too): windows are per mapping,
        # so such roles share one key and their windows can never overlap in address space.
        canon: dict[str, str] = {}
        for role, ck in ckpts.items():
            canon[role] = next((r for r in canon if ckpts.get(r) is ck), role)

        gpu_items: list[WorkItem] = []
        sources: list[list[Source]] = []
        for item in items:
            if not _on_gpu(item):
                continue
            gpu_items.append(item)
            srcs = []
            for role, ref in _inputs(item):
                isz = _elem_size(ref.dtype)
                key = (canon[role], ref.file)
                srcs.append(Source(key, ref.offset + item.start * isz, ref.offset + item.stop * isz))
            sources.append(srcs)
        maps: dict[Key, mmap.mmap] = {}
        bases: dict[Key, int] = {}
        for srcs in sources:
            for s in srcs:
                if s.key not in maps:
                    m = ckpts[s.key[0]].mapping(s.key[1])  # type: ignore[union-attr]
                    maps[s.key] = m
                    # The mapping's address: a one-byte zero-copy view (ctypes cannot take a read-only buffer).
                    bases[s.key] = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
        wplan = plan_windows(
            sources, {k: len(m) for k, m in maps.items()}, self.window_bytes, self.register_ahead_bytes
        )
        bound_bytes, bound_count = wplan.live(P)

        timers = collections.defaultdict(float)
        failure = _Failure()
        files = {key: (ckpts[key[0]], key[1]) for key in maps}
        runner = _WindowRunner(
            be, wplan, maps, bases, self.register_windows, failure, timers, threads=self.register_threads, files=files
        )
        write_q: queue.Queue = queue.Queue(maxsize=P + 8)
        ring = SlotRing(P)
        pool: list[ThreadPoolExecutor] = []

        # ---- every buffer, stream and event, once
        be.reset_peak()
        n_in_max = max([len(_inputs(it)) for it in gpu_items] or [1])
        n_terms_max = max([len(it.tensor.terms) for it in gpu_items if it.op is Op.MERGE] or [0])
        buf = _Buffers(
            dev_in=[[be.device_buffer(slot_bytes) for _ in range(n_in_max)] for _ in range(S)],
            dev_out=[[be.device_buffer(slot_bytes) for _ in range(n_out)] for _ in range(S)],
            host_out=[be.host_buffer(slot_bytes) for _ in range(P)],
        )
        if n_terms_max > 1:
            buf.dev_acc = [be.device_buffer(slot_bytes).view(torch.float32) for _ in range(S)]
        if opts.check_finite:
            buf.nf_dev = [be.device_buffer(8 * n_out).view(torch.int64) for _ in range(S)]
            buf.nf_host = [be.host_buffer(8).view(torch.int64) for _ in range(P)]

        def staging() -> list[list[torch.Tensor]]:
            if buf.staging is None:  # once: from the start without registration, else at the first refusal
                buf.staging = [[be.host_buffer(slot_bytes) for _ in range(n_in_max)] for _ in range(S)]
                pool.append(
                    ThreadPoolExecutor(
                        self.copy_threads,
                        thread_name_prefix="sm-stage",
                        initializer=torch.set_num_threads,
                        initargs=(1,),
                    )
                )
            return buf.staging

        if not self.register_windows:
            staging()
        s_in, s_comp, s_out = be.stream(), be.stream(), be.stream()
        in_done = [be.event() for _ in range(S)]
        comp_done = [be.event() for _ in range(S)]
        d2h_done = [be.event() for _ in range(S)]
        out_ready = [be.event() for _ in range(P)]
        ev_start, ev_end = be.event(timing=True), be.event(timing=True)
        prof: list[list] = [[be.event(timing=True) for _ in range(6)] for _ in gpu_items] if self.profile else []
        be.record(s_in, ev_start)

        report = ProgressCounter(stats, progress, total_bytes, total_tensors)

        # The output's SHA-256 is computed beside the pwrite rather than after it (hashlib and pwrite both release the
        # GIL): on the way to disk the writer thread is the critical path, and hashing ~2 GB/s on one core is as slow
        # as the page-cache copy. Every sink declares ``digest`` (the Sink protocol, writer.py).
        hasher = ThreadPoolExecutor(1, thread_name_prefix="sm-digest")

        def write_out(file: int, offset: int, data, out: int | None = None) -> None:
            fut = hasher.submit(writer.digest, file, offset, data, out)
            try:
                writer.write(file, offset, data, out=out, hashed=True)
            finally:
                fut.result()  # in order: one hashing thread, and each chunk waits for its own digest

        def write_loop() -> None:
            be.bind_thread()  # events of this GPU are synchronised from here
            while True:
                job: _Job | None = write_q.get()
                if job is None:
                    return
                try:
                    if failure.exc is not None:
                        continue
                    item, t = job.item, job.item.tensor
                    many = len(job.slots) > 1
                    if job.kind == "slot":
                        t0 = time.perf_counter()
                        for j, p in enumerate(job.slots):
                            be.sync_event(out_ready[p])
                            if job.count_nonfinite:
                                n_bad = int(buf.nf_host[p][0])
                                record_nonfinite(t, n_bad, opts.strict, stats, j if many else None)
                        timers["wait_gpu"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    if t is not None and item.stop > item.start:
                        if job.kind == "slot":
                            for j, p in enumerate(job.slots):
                                data = buf.host_out[p][: _out_bytes(t, item)]
                                write_out(t.file, t.offset + _out_offset(t, item), data.numpy(), j if many else None)
                                del data
                                if j < len(job.slots) - 1:
                                    ring.release(p)  # written: back to the issuing thread at once
                                    job.slots[j] = -1
                        else:
                            write_out(t.file, t.offset + item.start, job.view.numpy())  # type: ignore[union-attr]
                            # Drop the copied pages from this process, unless a registered window holds them: pages
                            # pinned for DMA are left mapped (an unregistration drops them later).
                            a, b = t.target.offset + item.start, t.target.offset + item.stop
                            if not runner.overlaps_occupied((canon["target"], t.target.file), a, b):
                                ckpts["target"].release(t.target, item.start, item.stop)  # type: ignore[union-attr]
                    written = finish_chunk(plan, writer, stats, item)
                    timers["write"] += time.perf_counter() - t0
                    if job.kind == "slot":
                        runner.release_after(job.gpu_index)  # before the slot goes back: bounds registered bytes
                    report(job.n_in + written, t if item.last_of_tensor else None, written)
                except BaseException as e:  # noqa: BLE001 - handed to the issuing thread
                    failure.set(e)
                finally:
                    job.view = None
                    if job.kind == "slot":
                        for p in job.slots:
                            if p >= 0:
                                ring.release(p)

        def put(job: _Job) -> None:
            while True:
                failure.check()
                try:
                    write_q.put(job, timeout=_POLL_S)
                    return
                except queue.Full:
                    continue

        def segment_view(ck: Checkpoint, ref: TensorRef, seg: Segment) -> torch.Tensor:
            return ck.view(ref, seg.start - ref.offset, seg.stop - ref.offset)

        writer_thread = threading.Thread(target=write_loop, name="sm-writer", daemon=True)
        writer_thread.start()
        runner.start()
        peak_rss = rss_anon()
        n_direct = n_staged = 0
        g = -1
        try:
            for item in items:
                failure.check()
                t = item.tensor
                stats.chunks += 1
                if not _on_gpu(item):
                    # Bytes straight from the target's mapping to the writer (COPY), or nothing (empty tensor/file).
                    view, n_in = None, 0
                    if t is not None and item.op is Op.COPY and item.stop > item.start:
                        view = ckpts["target"].view(t.target, item.start, item.stop)  # type: ignore[union-attr]
                        n_in = item.stop - item.start
                    put(_Job("view", item, n_in, view=view))
                    continue
                g += 1
                t_issue = time.perf_counter()
                runner.advance(g)
                k = g % S
                n = item.stop - item.start
                ins = _inputs(item)
                segs = wplan.segments[g]
                t0 = time.perf_counter()
                # Every window of the chunk is waited for (no short cut): its registration is the read-ahead too.
                direct = [all([runner.wait_ready(sg.window, failure.check) for sg in segs[r]]) for r in range(len(ins))]
                t_wait = time.perf_counter() - t0
                timers["wait_window"] += t_wait
                nbytes = [n * _elem_size(ref.dtype) for _, ref in ins]
                if not all(direct):
                    stg = staging()
                    t0 = time.perf_counter()
                    be.sync_event(in_done[k])  # the previous H2D out of these staging slots has completed
                    t1 = time.perf_counter()
                    pieces = []
                    for r, (role, ref) in enumerate(ins):
                        if direct[r]:
                            continue
                        for sg in segs[r]:
                            src = segment_view(ckpts[role], ref, sg)  # type: ignore[arg-type]
                            step = max(STAGING_PIECE_MIN, -(-src.numel() // self.copy_threads))
                            for a in range(0, src.numel(), step):
                                b = min(src.numel(), a + step)
                                pieces.append((stg[k][r][sg.dst + a : sg.dst + b], src[a:b]))
                    list(pool[0].map(lambda p: p[0].copy_(p[1]), pieces))
                    timers["wait_staging"] += t1 - t0
                    timers["pack"] += time.perf_counter() - t1
                    t_wait += time.perf_counter() - t0
                # H2D on the copy-in stream, once the kernel that last read this slot is done.
                be.wait(s_in, comp_done[k])
                if self.profile:
                    be.record(s_in, prof[g][0])
                for r, (role, ref) in enumerate(ins):
                    if direct[r]:
                        for sg in segs[r]:
                            dst = buf.dev_in[k][r][sg.dst : sg.dst + (sg.stop - sg.start)]
                            be.h2d(s_in, dst, segment_view(ckpts[role], ref, sg))  # type: ignore[arg-type]
                        n_direct += 1
                    else:
                        be.h2d(s_in, buf.dev_in[k][r][: nbytes[r]], buf.staging[k][r][: nbytes[r]])  # type: ignore
                        n_staged += 1
                if self.profile:
                    be.record(s_in, prof[g][1])
                be.record(s_in, in_done[k])
                # The kernel, once its inputs are in and the D2H that last read this output slot is done.
                be.wait(s_comp, in_done[k])
                be.wait(s_comp, d2h_done[k])
                if self.profile:
                    be.record(s_comp, prof[g][2])
                views = [buf.dev_in[k][r][: nbytes[r]].view(OUT_DTYPES[ref.dtype]) for r, (_, ref) in enumerate(ins)]
                out_b = n * _elem_size(t.dtype)
                n_o = n_out if item.op is Op.MERGE and t.outputs_differ else 1
                out_views = [buf.dev_out[k][j][:out_b].view(OUT_DTYPES[t.dtype]) for j in range(n_o)]
                count = opts.check_finite and item.op is Op.MERGE
                if item.op is Op.MERGE:
                    tv = views[0] if t.base else None
                    rest = list(views[1:] if t.base else views)
                    pairs = []
                    for term in t.terms:
                        plus = rest.pop(0)
                        pairs.append((plus, rest.pop(0) if term.minus_ref is not None else None))
                    for j, out_view in enumerate(out_views):
                        alphas = t.alphas_for(j)
                        if len(pairs) == 1:
                            be.merge(s_comp, tv, pairs[0][1], pairs[0][0], alphas[0], t.dtype, out_view)
                        else:
                            # Several vectors: r = r + a_i * (p_i - m_i) left to right in a float32 accumulator (the
                            # kernel's float32 store keeps every bit but a NaN's payload, and a NaN stays NaN to the
                            # end), then one rounding into the output: the CPU engine's bytes.
                            acc = buf.dev_acc[k][:n]
                            prev = tv
                            for i, (pv, mv) in enumerate(pairs):
                                last = i == len(pairs) - 1
                                dst, dt = (out_view, t.dtype) if last else (acc, "F32")
                                be.merge(s_comp, prev, mv, pv, alphas[i], dt, dst)
                                prev = acc
                        if count:
                            be.count_nonfinite(s_comp, out_view, views, buf.nf_dev[k][j : j + 1])
                else:
                    be.convert(s_comp, views[0], t.dtype, out_views[0])
                if self.profile:
                    be.record(s_comp, prof[g][3])
                be.record(s_comp, comp_done[k])
                # D2H into pinned output slots the writer has given back (one per output that differs).
                t0 = time.perf_counter()
                ps = [ring.acquire(failure.check) for _ in out_views]
                dt = time.perf_counter() - t0
                timers["wait_out_slot"] += dt
                t_wait += dt
                be.wait(s_out, comp_done[k])
                if self.profile:
                    be.record(s_out, prof[g][4])
                for j, p in enumerate(ps):
                    be.d2h(s_out, buf.host_out[p][:out_b], buf.dev_out[k][j][:out_b])
                    if count:
                        be.d2h(s_out, buf.nf_host[p], buf.nf_dev[k][j : j + 1])
                if self.profile:
                    be.record(s_out, prof[g][5])
                be.record(s_out, d2h_done[k])
                for p in ps:
                    be.record(s_out, out_ready[p])
                put(_Job("slot", item, sum(nbytes), slots=ps, gpu_index=g, count_nonfinite=count))
                timers["issue"] += time.perf_counter() - t_issue - t_wait
                peak_rss = max(peak_rss, rss_anon())
            be.record(s_out, ev_end)
            write_q.put(None)
            writer_thread.join()
            failure.check()
            be.synchronize()
        except BaseException:
            failure.set(StreamMergeError("merge interrupted"))
            try:
                while True:
                    write_q.get_nowait()
            except queue.Empty:
                pass
            write_q.put(None)
            writer_thread.join(timeout=30)
            try:
                be.synchronize()  # no DMA may still read a window or write a slot once we unregister and free
            except Exception as e:  # noqa: BLE001 - a broken device: report the original error, not this one
                stats.notes.append(f"cuda engine: device synchronisation after a failure failed ({e})")
            runner.close()
            for ex in [*pool, *([hasher] if hasher else [])]:
                ex.shutdown(wait=True)
            raise
        runner.close()
        for ex in [*pool, *([hasher] if hasher else [])]:
            ex.shutdown(wait=True)

        # ---- stats
        stats.peak_gpu_memory = be.peak_memory()
        stats.peak_rss_anon = max(peak_rss, rss_anon())
        timers["wall"] = time.perf_counter() - t_wall
        if gpu_items:
            timers["gpu_span"] = be.elapsed_ms(ev_start, ev_end) / 1e3
        if self.profile and gpu_items:
            ivs: dict[str, list[tuple[float, float]]] = {"gpu_h2d": [], "gpu_kernel": [], "gpu_d2h": []}
            for ev in prof:
                for name, (a, b) in zip(ivs, ((ev[0], ev[1]), (ev[2], ev[3]), (ev[4], ev[5]))):
                    ivs[name].append((be.elapsed_ms(ev_start, a) / 1e3, be.elapsed_ms(ev_start, b) / 1e3))
            st = interval_stats(ivs)
            timers.update({k: st[k] for k in ivs})
            timers.update({"gpu_busy": st["union"], "gpu_overlap": st["overlap"]})
        stats.stage_seconds = dict(timers)
        mode = "registered windows" if self.register_windows else "pinned staging (registration off)"
        stats.notes.append(
            f"cuda engine: {S} device slots x ({n_in_max} in + {n_out} out{' + acc' if buf.dev_acc else ''}) x "
            f"{slot_bytes} B, {P} pinned output slots, "
            f"{mode}; window {self.window_bytes} B, read-ahead {self.register_ahead_bytes} B"
        )
        stats.notes.append(
            f"cuda engine: {len(gpu_items)} GPU chunks, inputs {n_direct} DMA'd from registered windows and "
            f"{n_staged} through pinned staging; {runner.registered} windows registered "
            f"({runner.registered_bytes} B), at most {runner.max_live} / {runner.max_live_bytes} B at once "
            f"(plan bound {bound_count} / {bound_bytes} B)"
        )
        if runner.refusal:
            stats.notes.append(f"cuda engine: {runner.refusal}; error cleared, fell back to pinned staging")
        stats.notes += [f"cuda engine: {e}" for e in runner.unregister_errors[:5]]
