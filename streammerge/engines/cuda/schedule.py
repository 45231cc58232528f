"""Window scheduling, pure Python over the plan: what each GPU chunk reads, the registration windows over it and when
they open and close, the pinned output slot ring, and the stages' overlap. No device, no torch: testable anywhere.

Every input file is cut into a fixed grid of ``window_bytes`` cells; a window is the page-aligned part of one cell
that a run of consecutive chunks reads (:func:`plan_windows`).
"""

from __future__ import annotations

import bisect
import collections
import mmap
import queue
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ...budget import DEFAULT_WINDOW_BYTES
from ...checkpoint import TensorRef
from ...dtypes import itemsize
from ...plan import Op
from ..work import WorkItem

# Input bytes (all three inputs together) registered ahead of the chunk being issued: ~20 ms of H2D at 55 GB/s,
# several window registrations' worth, so the window thread stays ahead of the copy engine on a warm cache.
DEFAULT_REGISTER_AHEAD_BYTES = 2**30

PAGE = mmap.PAGESIZE
# How often a blocked host thread re-checks for a failure elsewhere (seconds).
POLL_S = 0.5

Key = tuple[str, int]  # (role, file index within that role's checkpoint)


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


def on_gpu(item: WorkItem) -> bool:
    """Whether a chunk is computed on the GPU (MERGE, CONVERT) rather than copied or empty."""
    return item.tensor is not None and item.op in (Op.MERGE, Op.CONVERT) and item.stop > item.start


def canonical_roles(checkpoints: Mapping[str, object]) -> dict[str, str]:
    """Role -> the first role holding the same checkpoint object.

    One checkpoint may stand in several roles (extract passes grpo as the target too): windows are per mapping, so
    such roles share one key and their windows can never overlap in address space.
    """
    canon: dict[str, str] = {}
    for role, ck in checkpoints.items():
        canon[role] = next((r for r in canon if checkpoints.get(r) is ck), role)
    return canon


@dataclass(frozen=True)
class Load:
    """Bytes ``[start, stop)`` of tensor ``ref`` (from the start of its data) that one GPU chunk copies to the
    device for ``role``: an input's elements, or (``scale``) the rows of an FP8 input's block scales its band needs.
    """

    role: str
    ref: TensorRef
    start: int
    stop: int
    scale: bool = False

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def chunk_loads(item: WorkItem) -> list[Load]:
    """What one GPU chunk copies in: each input's elements (the inputs as ``OutTensor.inputs`` lists them), then,
    for a band chunk of a block-scaled FP8 tensor, the block-scale rows of each FP8 input in the same order (rows
    ``[row0 // br, ceil(row1 / br))`` of its grid: a band starts on a block row of every input's grid)."""
    t = item.tensor
    assert t is not None  # on_gpu
    ins = t.inputs(item.op)
    loads = []
    for role, ref in ins:
        isz = itemsize(ref.dtype)
        loads.append(Load(role, ref, item.start * isz, item.stop * isz))
    if t.band_rows:
        cols = t.shape[1]
        row0, row1 = item.start // cols, item.stop // cols
        for role, _ in ins:
            sc = t.scales.get(role)
            if sc is None:
                continue
            br = sc.block[0]
            if row0 % br:
                raise ValueError(f"band of {t.name!r} starts at row {row0}, inside a {br}-row block of {role}")
            row_bytes = sc.ref.shape[1] * itemsize(sc.ref.dtype)
            loads.append(Load(role, sc.ref, row0 // br * row_bytes, -(-row1 // br) * row_bytes, scale=True))
    return loads


def chunk_sources(gpu_items: Sequence[WorkItem], canon: Mapping[str, str]) -> list[list[Source]]:
    """Per GPU chunk, the file bytes each of its loads reads (:func:`chunk_loads`, in that order)."""
    sources: list[list[Source]] = []
    for item in gpu_items:
        srcs = []
        for ld in chunk_loads(item):
            a = ld.ref.offset + ld.start
            srcs.append(Source((canon[ld.role], ld.ref.file), a, a + ld.nbytes))
        sources.append(srcs)
    return sources


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

    def acquire(self, check: Callable[[], None] | None = None, poll_s: float = POLL_S) -> int:
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
