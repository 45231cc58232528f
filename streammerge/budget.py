"""Memory budgets: the buffers each engine allocates, as formulas of the options alone (never of model size).

The plan reports these figures from headers only, and the engines allocate exactly what they say, so both read
the same constants from here.
"""

from __future__ import annotations

import os

# ------------------------------------------------------------------------------------------------ CPU engine
# Output slots beyond one per compute thread: one being written and hashed, one spare to absorb jitter in write and
# hash latency (each slot costs chunk_bytes of host memory).
SPARE_OUTPUT_SLOTS = 2
# The output slots of a one-thread engine: one being computed, one being written, a spare (as before issue 15).
OUTPUT_SLOTS = 1 + SPARE_OUTPUT_SLOTS
# Sub-block of a chunk processed by one pass of torch ops: 1 Mi elements keep each fp32 temporary at 4 MiB, near
# L2/L3, so the ~8 elementwise passes of the contract mostly run from cache (measured, 2-core dev machine, 64 Mi
# bf16 elements: 64 Ki 286, 256 Ki 418, 1 Mi 493, 4 Mi 102 Melem/s; 4 Mi falls out of cache and into mmap-backed
# allocations).
SUB_BLOCK_ELEMS = 1024 * 1024


def default_workers() -> int:
    """Compute threads by default: one per core this process may run on. The CPU engine's writes and SHA-256 run on
    output threads beside them; the kernel shares the cores among whichever stage has work (engines/cpu.py)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def output_slots(outputs: int = 1, workers: int = 1) -> int:
    """Output slots for ``outputs`` outputs per pass and ``workers`` compute threads: a chunk being computed per
    thread, plus one chunk's worth being written and hashed and a spare. A sweep's chunk takes one slot per output
    at once (with only one chunk's worth the compute thread and the writer took turns: measured 32 s instead of
    ~20 s for a 3-alpha sweep of 2 GB checkpoints on the 2-core machine)."""
    per_chunk = max(1, outputs)
    return (max(1, workers) + 1) * per_chunk + (SPARE_OUTPUT_SLOTS - 1 if per_chunk == 1 else 1)


def scratch_buffers(outputs: int = 1, vectors: int = 1) -> int:
    """float32 sub-block buffers per worker: two, plus one holding the widened target (or a widened minus) when a
    chunk has several outputs or vectors (mixed-dtype torch ops cost ~4x a same-dtype one: widening once is cheaper)."""
    return 2 if outputs <= 1 and vectors <= 1 else 3


def host_buffer_bytes(
    chunk_bytes: int,
    workers: int | None = None,
    outputs: int = 1,
    vectors: int = 1,
    fp8_sub_elems: int = 0,
    scale_bytes: int = 0,
) -> int:
    """Anonymous memory the CPU engine allocates: output slots (:func:`output_slots`), plus per worker its fp32
    sub-block buffers and the temporaries of one sub-block's torch ops, plus with block-scaled FP8 tensors
    :func:`fp8_buffer_bytes`. Independent of tensor and model size."""
    workers = workers or default_workers()
    sub = min(SUB_BLOCK_ELEMS, max(1, chunk_bytes // 4))
    plain = output_slots(outputs, workers) * chunk_bytes + workers * (scratch_buffers(outputs, vectors) + 2) * sub * 4
    return plain + fp8_buffer_bytes(workers, fp8_sub_elems, outputs, scale_bytes)


# Block-scaled FP8 sub-block: a band's rows by whole block columns, about this many elements. The FP8 path runs ~25
# torch passes per sub-block (decode, scale, blend, per-block reductions, divide, encode, select). Measured on the
# 2-core development machine, layer 0 of the sparse DeepSeek-V3 trio to the null sink (1.8 GB read): 64 Ki 7.7 s,
# 256 Ki 6.3 s, 1 Mi 6.6 s, 4 Mi 7.8 s.
FP8_SUB_BLOCK_ELEMS = 256 * 1024
# float32-sized buffers per worker for one FP8 sub-block: the engine's four (target, plus, minus, r) and one for the
# uint8 codes of the target, an input and the output and the finite mask; at their peak the temporaries of
# requantize_fp8 (t32, |r|, r / s and its clamp, the block masks and codes: ~3.5 buffers) or of a decode (its int64
# gather index: 2 buffers). 7.5 at the peak: 10 leaves room.
FP8_SCRATCH_BUFFERS = 10


def fp8_buffer_bytes(workers: int, fp8_sub_elems: int, outputs: int = 1, scale_bytes: int = 0) -> int:
    """The FP8 path's buffers: per worker ``FP8_SCRATCH_BUFFERS`` float32 sub-blocks of ``fp8_sub_elems`` elements
    (0: no FP8 tensor), and the block scales of FP8 outputs held until their weight's last band is written, at most
    one per output slot in flight and one being filled, per output (``scale_bytes``: the largest scale tensor)."""
    if not fp8_sub_elems:
        return 0
    held = (output_slots(outputs, workers) + 1) * outputs * scale_bytes
    return workers * FP8_SCRATCH_BUFFERS * fp8_sub_elems * 4 + held


# ----------------------------------------------------------------------------------------------- CUDA engine
# Device slots: 2 give the full three-stage overlap (H2D of chunk g+1, kernel of g and D2H of g-1 touch different
# slots), and bound GPU memory to 2 x 4 x chunk_bytes (512 MiB at a 64 MiB chunk) whatever the model.
DEFAULT_DEVICE_SLOTS = 2
# Registration window: cudaHostRegister(ReadOnly) of cached pages took 0.11 s per 4 GiB on the H200 (docs/hardware.md),
# ~7 ms per 256 MiB: short enough that the first window is ready almost at once and that pinned memory
# stays ~1-2 GB (3 inputs x (read-ahead + in flight)); long enough that per-call driver overhead is noise.
DEFAULT_WINDOW_BYTES = 256 * 2**20


def device_memory_bytes(
    chunk_bytes: int,
    slots: int = DEFAULT_DEVICE_SLOTS,
    check_finite: bool = False,
    inputs: int = 3,
    outputs: int = 1,
    fp8_inputs: int = 0,
    fp8_out: bool = False,
    fp8_scale_bytes: int = 0,
) -> int:
    """GPU memory the engine allocates: ``slots`` x (``inputs`` + ``outputs``) x chunk, independent of the model (the
    three-way merge: 3 inputs, 1 output; a sweep: one output per alpha; several vectors: 1 + 2 per vector inputs plus a
    float32 accumulator), plus, with ``check_finite``, the non-finite count's temporaries: bool masks of one chunk's
    elements.

    Block-scaled FP8 (``fp8_inputs``: the most FP8 inputs of one band chunk; ``fp8_out``: some output is FP8;
    ``fp8_scale_bytes``: the largest scale rows of one band, ``plan.fp8_device_buffers``) adds per slot a float32
    chunk and a band's scale rows per FP8 input (the codes stay in the input slot, dequantized beside it), and for an
    FP8 output a float32 chunk for r and a band's new scale rows per output. Still bounded by the chunk: a band's
    float32 fits one chunk, and its scale rows are at most that."""
    slot = max(4, chunk_bytes // 4 * 4)
    acc = 1 if inputs > 3 else 0
    extra = 3 * (slot // 4) + 64 * outputs if check_finite else 0
    fp8 = fp8_inputs * (slot + fp8_scale_bytes) + ((slot + outputs * fp8_scale_bytes) if fp8_out else 0)
    return slots * ((inputs + outputs + acc) * slot + fp8) + extra
