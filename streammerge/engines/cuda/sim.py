"""A simulated device for tests: a :class:`~.backend.Backend` on CPU tensors that runs each stream's queued work
lazily, in a random order constrained only by the events, and checks every H2D source and every registration."""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from ...kernels.reference import dequantize_fp8, requantize_fp8, round_from_f32
from .schedule import PAGE

# Operations one simulated stream runs in a row before another is picked.
_SIM_BURSTS = (1, 1, 2, 3, 8, 32)


def merge_torch(
    t: torch.Tensor | None, s: torch.Tensor | None, g: torch.Tensor, alpha: float, out_dtype: str, out: torch.Tensor
) -> None:
    """The contract in torch on CPU tensors, with the optional terms of extract (no ``t``) and apply (no ``s``): what
    the simulated device computes with ``kernel="reference"``."""
    d = g.to(torch.float32)
    if s is not None:
        d = d - s.to(torch.float32)
    d = d * torch.tensor(alpha, dtype=torch.float32)
    r = d if t is None else t.to(torch.float32) + d
    round_from_f32(r.contiguous(), out_dtype, out=out)


class SimulationError(AssertionError):
    """The simulated device caught the engine doing something a real GPU would punish (a race, a pageable or
    unregistered H2D, an overlapping registration, a launch with an uncleared error)."""


class SimEvent:
    """A simulated event: how many records were queued and how many have run, and when the last one ran."""

    def __init__(self) -> None:
        self.recorded = 0  # records issued
        self.done = 0  # records executed
        self.time = 0.0


class SimStream:
    """A simulated stream: its queued operations, run in order."""

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

    The kernels are the Triton launchers when ``streammerge.kernels.triton_merge`` and ``triton_fp8`` run under
    ``TRITON_INTERPRET=1`` (``kernel="auto"``), else the pure-torch reference (``kernel="reference"``; for FP8
    ``kernels.reference.dequantize_fp8`` / ``requantize_fp8``).
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
        self._streams: list[SimStream] = []
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
        self._triton: ModuleType | None = None  # the Triton launchers, when they run under the interpreter
        self._triton_fp8: ModuleType | None = None
        if kernel == "auto":
            try:
                from ...kernels import triton_fp8, triton_merge
            except ImportError:
                pass
            else:
                if triton_merge.INTERPRETED and triton_fp8.INTERPRETED:
                    self.kernel = "triton-interpreter"
                    self._triton = triton_merge
                    self._triton_fp8 = triton_fp8
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

    def stream(self) -> SimStream:
        s = SimStream(f"stream{len(self._streams)}")
        with self._lock:
            self._streams.append(s)
        return s

    def event(self, timing: bool = False) -> SimEvent:
        return SimEvent()

    # ----- queued work
    def _enqueue(self, stream: SimStream, op) -> None:
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

    def h2d(self, stream: SimStream, dst: torch.Tensor, src: torch.Tensor) -> None:
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

    def d2h(self, stream: SimStream, dst: torch.Tensor, src: torch.Tensor) -> None:
        def run() -> None:
            if not self._inside(dst.data_ptr(), dst.numel() * dst.element_size(), self.pinned):
                raise SimulationError("D2H into memory that is not pinned")
            dst.copy_(src)

        self._enqueue(stream, ("op", run))

    def record(self, stream: SimStream, event: SimEvent) -> None:
        with self._lock:
            event.recorded += 1
            stream.ops.append(("record", event, event.recorded))
            self._spontaneous()

    def wait(self, stream: SimStream, event: SimEvent) -> None:
        with self._lock:
            if event.recorded:
                stream.ops.append(("wait", event, event.recorded))

    def _launch_check(self) -> None:
        err = self.errors.get(threading.get_ident())
        if err is not None:
            raise SimulationError(f"kernel launch with an uncleared CUDA error: {err}")

    def merge(
        self,
        stream: SimStream,
        t: torch.Tensor | None,
        s: torch.Tensor | None,
        g: torch.Tensor,
        alpha: float,
        out_dtype: str,
        out: torch.Tensor,
    ) -> None:
        self._launch_check()

        def run() -> None:
            km = self._triton
            if km is not None:
                if t is None:
                    km.extract_vector_triton(s, g, alpha, out_dtype, out=out)
                elif s is None:
                    km.apply_vector_triton(t, g, alpha, out_dtype, out=out)
                else:
                    km.merge_triton(t, s, g, alpha, out_dtype, out=out)
            else:
                merge_torch(t, s, g, alpha, out_dtype, out)

        self._enqueue(stream, ("op", run))

    def convert(self, stream: SimStream, src: torch.Tensor, out_dtype: str, out: torch.Tensor) -> None:
        self._launch_check()

        def run() -> None:
            if self._triton is not None:
                self._triton.convert_triton(src, out_dtype, out=out)
            else:
                round_from_f32(src.to(torch.float32), out_dtype, out=out)

        self._enqueue(stream, ("op", run))

    def dequantize_fp8(
        self,
        stream: SimStream,
        q: torch.Tensor,
        scale: torch.Tensor,
        block: tuple[int, int],
        fmt: str,
        out: torch.Tensor,
    ) -> None:
        self._launch_check()

        def run() -> None:
            fn = self._triton_fp8.dequantize_fp8 if self._triton_fp8 is not None else dequantize_fp8
            fn(q, scale, block, fmt, out=out)

        self._enqueue(stream, ("op", run))

    def requantize_fp8(
        self,
        stream: SimStream,
        r: torch.Tensor,
        t_q: torch.Tensor,
        t_scale: torch.Tensor,
        block: tuple[int, int],
        out_q: torch.Tensor,
        out_scale: torch.Tensor,
    ) -> None:
        self._launch_check()

        def run() -> None:
            fn = self._triton_fp8.requantize_fp8 if self._triton_fp8 is not None else requantize_fp8
            fn(r, t_q, t_scale, block, out_q=out_q, out_scale=out_scale)

        self._enqueue(stream, ("op", run))

    def count_nonfinite(
        self, stream: SimStream, out: torch.Tensor, inputs: Sequence[torch.Tensor], dst: torch.Tensor
    ) -> None:
        self._launch_check()

        def run() -> None:
            bad = torch.isfinite(inputs[0])
            for x in inputs[1:]:
                bad &= torch.isfinite(x)
            bad &= ~torch.isfinite(out)
            dst.copy_(bad.sum())

        self._enqueue(stream, ("op", run))

    # ----- execution
    def _runnable(self, s: SimStream) -> bool:
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

    def _burst(self, s: SimStream, done: Callable[[], bool]) -> None:
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

    def sync_event(self, event: SimEvent) -> None:
        target = event.recorded
        if self.rng.random() < 0.3:
            # A waiting thread is sometimes slow to get there, so that other threads queue more work meanwhile.
            time.sleep(self.rng.random() * 2e-3)
        self._run_until(lambda: event.done >= target)

    def synchronize(self) -> None:
        self._run_until(lambda: not self.queued_ops())

    def queued_ops(self) -> int:
        """Operations queued on every stream that have not run yet (0 once the device is idle)."""
        with self._lock:
            return sum(len(s.ops) for s in self._streams)

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

    def elapsed_ms(self, a: SimEvent, b: SimEvent) -> float:
        return (b.time - a.time) * 1e3
