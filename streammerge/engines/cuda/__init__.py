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
one cell that a run of consecutive chunks reads (:func:`.schedule.plan_windows`). A window thread registers windows
with ``cudaHostRegister(ReadOnly)`` ahead of use (up to ``register_ahead_bytes`` of input ahead of the chunk being
issued, ``register_threads`` at a time; registration faults the pages in, so it doubles as read-ahead on a cold
cache) and unregisters each one once the writer has finished its last chunk, then drops its pages from this process
(``MADV_DONTNEED``). Windows of one mapping never overlap while registered. When a registration is refused, the
CUDA error it left behind is cleared (it would otherwise surface in the next kernel launch check), the refusal is
reported in the notes, and every later window is only read ahead (``MADV_WILLNEED``) while its chunks go through
pinned staging slots filled by a small pool of host threads. ``register_windows=False`` takes that path from the start.

Block-scaled FP8 (docs/numerics.md): a chunk of an FP8 tensor is a band of whole block rows. Its loads are each
input's codes or values and, after them, each FP8 input's scale rows for the band (:func:`.schedule.chunk_loads`,
windows and staging as for any input); on the compute stream every FP8 input is dequantized into a float32 buffer
of the slot, the merge kernel computes r in float32 (or the output dtype directly for a dequantized output), and
the requantize kernel writes the codes and the band's new scale rows, which follow the codes in the pinned slot. The
writer thread collects a weight's scale rows and writes them right after its last band (offset order).

Chunks follow the CPU engine's work list exactly (``iter_work``: per-chunk op, per-tensor alpha, vocabulary tails
copied or converted from the target, extract without a target term, apply without sft, several vectors chained
through a float32 accumulator, a sweep's outputs one kernel each); COPY chunks go from the
mapping to the writer without touching the GPU.

Everything that decides an order (windows, their register/release points, slot use) is plain Python over the plan,
testable without a GPU; the device itself is behind a small interface (:class:`.backend.Backend`), with
:class:`.sim.SimBackend` a CPU stand-in that executes each stream's work lazily, in a random order that respects only
the events, and checks that every H2D reads registered or pinned memory — so the scheduling runs, and is checked byte
for byte against the CPU engine, in CI (with the real Triton kernel under ``TRITON_INTERPRET=1``).

Modules, one job each: :mod:`.schedule` (window scheduling, pure functions), :mod:`.backend` (the device interface),
:mod:`.cudart` (CUDA runtime calls through ctypes), :mod:`.device` (the real backend over torch.cuda), :mod:`.sim`
(the simulated backend, a test double), :mod:`.windows` (the registration thread), :mod:`.engine` (the engine).
This package root only re-exports their public names.
"""

from .backend import Backend, Event, Stream
from .cudart import (
    CUDA_HOST_REGISTER_PORTABLE,
    CUDA_HOST_REGISTER_READ_ONLY,
    REGISTER_FLAGS,
    clear_cuda_error,
    runtime_library,
)
from .device import CudaBackend
from .engine import (
    DEFAULT_COPY_THREADS,
    DEFAULT_HOST_SLOTS,
    DEFAULT_REGISTER_THREADS,
    STAGING_PIECE_MIN,
    CudaEngine,
    GpuWork,
    plan_gpu_work,
)
from .schedule import (
    DEFAULT_REGISTER_AHEAD_BYTES,
    PAGE,
    POLL_S,
    Key,
    Load,
    Segment,
    SlotRing,
    Source,
    Window,
    WindowPlan,
    canonical_roles,
    chunk_loads,
    chunk_sources,
    interval_stats,
    on_gpu,
    plan_windows,
)
from .sim import SimBackend, SimEvent, SimStream, SimulationError, merge_torch
from .windows import WindowRunner

__all__ = [
    "CUDA_HOST_REGISTER_PORTABLE",
    "CUDA_HOST_REGISTER_READ_ONLY",
    "DEFAULT_COPY_THREADS",
    "DEFAULT_HOST_SLOTS",
    "DEFAULT_REGISTER_AHEAD_BYTES",
    "DEFAULT_REGISTER_THREADS",
    "PAGE",
    "POLL_S",
    "REGISTER_FLAGS",
    "STAGING_PIECE_MIN",
    "Backend",
    "CudaBackend",
    "CudaEngine",
    "Event",
    "GpuWork",
    "Key",
    "Load",
    "Segment",
    "SimBackend",
    "SimEvent",
    "SimStream",
    "SimulationError",
    "SlotRing",
    "Source",
    "Stream",
    "Window",
    "WindowPlan",
    "WindowRunner",
    "canonical_roles",
    "chunk_loads",
    "chunk_sources",
    "clear_cuda_error",
    "interval_stats",
    "merge_torch",
    "on_gpu",
    "plan_gpu_work",
    "plan_windows",
    "runtime_library",
]
