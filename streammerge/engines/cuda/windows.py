"""The window thread: registers input windows with the device ahead of the issuing thread (registration doubles as
read-ahead), unregisters them behind the writer, and drops their pages from this process."""

from __future__ import annotations

import collections
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ...checkpoint import Checkpoint
from ...errors import EngineError
from ..work import FirstFailure
from .backend import Backend
from .schedule import POLL_S, Key, Window, WindowPlan

_PENDING, _REGISTERED, _STAGED, _RELEASED = "pending", "registered", "staged", "released"


class WindowRunner:
    """Registers windows ahead of the issuing thread and unregisters them behind the writer.

    A scheduling thread closes (unregisters) the windows whose last chunk the writer finished, then decides, in window
    order, what may open (its gate is open, no occupied window of the same mapping overlaps it, fewer than
    ``threads`` opens in flight); ``threads`` workers do the slow calls (cudaHostRegister pins and faults every page).
    Every open starts after the closes posted before it, so registered bytes stay within ``WindowPlan.live``. A refused
    registration's error is cleared on the worker thread that got it (CUDA errors are per thread).

    Args:
        be (`Backend`): the device.
        wplan (`WindowPlan`): the windows and when they open and close.
        maps (`dict[Key, mmap.mmap]`): the read-only mapping of each file key.
        bases (`dict[Key, int]`): the address of each mapping.
        files (`dict[Key, tuple[Checkpoint, int]]`): the checkpoint and file index of each key (to drop pages from
            the page cache when ``Checkpoint.drop_cache`` is set).
        register (`bool`): register windows; False: only read them ahead (pinned staging carries the chunks).
        failure (`FirstFailure`): where a failure on these threads goes.
        timers (`dict[str, float]`): adds up "register", "advise" and "unregister" seconds.
        threads (`int`): workers doing the (un)registration calls.
    """

    def __init__(
        self,
        be: Backend,
        wplan: WindowPlan,
        maps: dict[Key, mmap.mmap],
        bases: dict[Key, int],
        files: dict[Key, tuple[Checkpoint, int]],
        *,
        register: bool,
        failure: FirstFailure,
        timers: dict[str, float],
        threads: int = 1,
    ):
        self.be = be
        self.files = files
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
        """GPU chunk ``g`` is being issued: windows whose gate is ``g`` or earlier may open."""
        with self.cond:
            self.issue_pos = g
            self.cond.notify_all()

    def release_after(self, g: int) -> None:
        """The writer finished GPU chunk ``g``: close the windows whose last use it was."""
        done = self.plan.releases.get(g)
        if done:
            with self.cond:
                self.pending.extend(done)
                self.cond.notify_all()

    def wait_ready(self, wid: int, check: Callable[[], None]) -> bool:
        """Block until window ``wid`` is registered or staged; True when its chunks may DMA from it directly."""
        ev = self.ready[wid]
        while not ev.wait(POLL_S):
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
                ck, fi = self.files[w.key]
                if ck.drop_cache and hasattr(os, "posix_fadvise"):
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
