"""Triton kernels for block-scaled FP8 (issue 12, docs/numerics.md): dequantize codes to float32, requantize to e4m3fn.

Byte-identical to the torch functions of the same names in :mod:`streammerge.kernels.reference` and to the numpy
reference in ``tests/fp8_reference.py``:

- :func:`dequantize_fp8`: ``x32 = decode(q) * s32``, one float32 multiply (RNE), ``s32`` the element's block scale
  widened exactly (F32 or BF16). Every NaN comes out as the canonical ``0x7FC00000``.
- :func:`requantize_fp8`: per block of the target's grid (edge blocks partial), the target's codes and scale where
  every ``r == t32`` (IEEE: +-0 equal, NaN never equal); otherwise ``amax`` = max |r| over the finite elements,
  ``s = amax / 448`` (IEEE division), stored in the scale dtype (RNE), ``1.0`` where the stored value is 0, and
  ``q = e4m3(r / s_stored)`` (IEEE division, RNE into e4m3fn, saturating to +-448, every NaN 0x7F).

Every decode, encode and scale rounding works on integer bit patterns, never on a float cast: the interpreter
truncates on ``.to(tl.float8e4nv)`` / ``.to(tl.bfloat16)`` and has no bf16 arithmetic, and compiled casts need not
round the same way. The divisions are ``tl.math.div_rn`` (Triton's ``/`` compiles to ``div.full.f32``, up to 2 ulp
off), and the kernels launch with ``enable_fp_fusion=False``; tests/test_fp8_kernels.py reads the compiled PTX.

One program handles one block of the scale grid (a 1-D grid: CUDA limits the second and third grid dimensions to
65,535) and walks it in tiles of at most ``TILE_ELEMENTS`` elements, so any block size works with bounded registers.
Requantizing needs the block's amax before its first byte is written: it walks the block twice (the second pass
reads what the first left in L2), and writes one scale.

This module imports triton at import time; callers import it lazily. ``TRITON_INTERPRET=1`` must be set before it is
first imported (triton reads it when the kernels are decorated).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

from streammerge.dtypes import CANONICAL_NAN_BITS

# Tile of a block walked per loop iteration: 4096 elements over 4 warps, 32 per thread, the elementwise merge kernel's
# elements per warp (kernels/triton_merge.py: 1024 / 4 warps... x4 for the byte-wide codes). A 128x128 block is walked
# as four 32x128 tiles. Chosen without a GPU in this session, to be re-measured by benchmarks.gpu_check; the tile
# changes the speed, never the bytes.
TILE_ELEMENTS = 4096
# Widest tile row: a 128-column block (DeepSeek-V3, Kimi-K2, Qwen3-FP8) in one row of the tile, 512 contiguous bytes
# of r and 128 of codes per row.
TILE_MAX_COLUMNS = 128
NUM_WARPS = 4

FP8_FORMATS = ("F8_E4M3", "F8_E5M2")
# The scale dtypes and the integer view their bits travel in.
SCALE_DTYPES: dict[torch.dtype, torch.dtype] = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
SCALE_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16"}
# The largest e4m3fn value: a block's amax is scaled to it.
E4M3_MAX = 448.0

# Constants read inside the kernels are constexpr: a @jit function only reads constexpr globals.
_F32_ABS_MASK = tl.constexpr(0x7FFFFFFF)
_F32_INF = tl.constexpr(0x7F800000)
_NAN_F32 = tl.constexpr(CANONICAL_NAN_BITS["F32"])
_ONE_F32 = tl.constexpr(0x3F800000)
_ONE_BF16 = tl.constexpr(0x3F80)
_E4M3_NAN = tl.constexpr(0x7F)
_E4M3_MAX_CODE = tl.constexpr(0x7E)
# 448.0 as float32 bits: every |x| from here up (infinity included) saturates to the largest code.
_E4M3_SATURATE = tl.constexpr(0x43E00000)
# 2**-6, the smallest normal e4m3fn, as float32 bits.
_E4M3_MIN_NORMAL = tl.constexpr(0x3C800000)
# Rebias from float32 (127) to e4m3fn (7), in the position of an e4m3 exponent within (float32 bits >> 20).
_E4M3_REBIAS = tl.constexpr((127 - 7) << 3)
_E4M3_DIVISOR = tl.constexpr(E4M3_MAX)


@triton.jit
def _decode_e4m3(code):
    # uint32 holding an e4m3fn code -> float32 bits, exactly. Normal: the 7 magnitude bits sit below the float32
    # exponent at bit 20, rebias 7 -> 127. Subnormal (exponent 0): m * 2**-9 for m in 1..7, normalised by hand: its
    # leading bit p = floor(log2 m) gives the exponent 118 + p and the bits below it the mantissa.
    mag = code & 0x7F
    m = code & 0x7
    normal = (mag << 20) + ((127 - 7) << 23)
    p = (m >= 2).to(tl.uint32) + (m >= 4).to(tl.uint32)
    sub = ((118 + p) << 23) | ((m << (23 - p)) & 0x7FFFFF)
    sub = tl.where(m == 0, 0, sub)
    bits = tl.where(mag < 0x08, sub, normal)
    bits = tl.where(mag == 0x7F, _NAN_F32, bits)
    return bits | ((code & 0x80) << 24)


@triton.jit
def _decode_e5m2(code):
    # uint32 holding an e5m2 code -> float32 bits, exactly. Normal: 7 magnitude bits below the exponent at bit 21,
    # rebias 15 -> 127. Exponent 31: infinity (mantissa 0) or NaN. Subnormal: m * 2**-16, m in 1..3.
    mag = code & 0x7F
    m = code & 0x3
    normal = (mag << 21) + ((127 - 15) << 23)
    p = (m >= 2).to(tl.uint32)
    sub = ((111 + p) << 23) | ((m << (23 - p)) & 0x7FFFFF)
    sub = tl.where(m == 0, 0, sub)
    bits = tl.where(mag < 0x04, sub, normal)
    bits = tl.where(mag == 0x7C, _F32_INF, bits)
    bits = tl.where(mag > 0x7C, _NAN_F32, bits)
    return bits | ((code & 0x80) << 24)


@triton.jit
def _encode_e4m3(x):
    # float32 -> e4m3fn code (uint32), round to nearest even; |x| >= 448 and infinities saturate to +-448 (0x7E/0xFE),
    # every NaN is 0x7F, the sign is kept otherwise (-0.0 and negatives that round to zero are 0x80). Unsigned bit
    # patterns: the lanes where a subtraction or shift would wrap are replaced below.
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & _F32_ABS_MASK
    # Normal range (|x| >= 2**-6): add half an ulp of e4m3 minus one plus the lowest kept bit, drop 20 mantissa bits,
    # rebias. A carry into the exponent is right; below 448 it never reaches the NaN code.
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - _E4M3_REBIAS
    # Subnormal range: count units of 2**-9 = mant >> (141 - exp), rounded to nearest even; the result may be 8, the
    # code of 2**-6. The shift is clamped to [1, 31] so it never reaches the register width; from a true shift of 25
    # (|x| < 2**-10) the result is 0, and float32 subnormals (exp 0) are 0 too.
    exp = (a >> 23).to(tl.int32)
    mant = (a & 0x7FFFFF) | 0x800000
    shift_raw = 141 - exp
    shift = tl.minimum(tl.maximum(shift_raw, 1), 31).to(tl.uint32)
    q = mant >> shift
    rem = mant - (q << shift)
    half = tl.full(q.shape, 1, tl.uint32) << (shift - 1)
    round_up = (rem > half) | ((rem == half) & ((q & 1) != 0))
    sub = q + round_up.to(tl.uint32)
    sub = tl.where((shift_raw >= 25) | (exp == 0), 0, sub)
    code = tl.where(a < _E4M3_MIN_NORMAL, sub, normal)
    code = tl.where(a >= _E4M3_SATURATE, _E4M3_MAX_CODE, code)
    code = code | sign
    return tl.where(a > _F32_INF, _E4M3_NAN, code)


@triton.jit
def _scale_f32_bits(scale_bits_ptr, index, SCALE_BF16: tl.constexpr):
    # One stored scale -> float32 bits, exactly: a bf16 is the top half of a float32.
    raw = tl.load(scale_bits_ptr + index)
    if SCALE_BF16:
        return raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    else:
        return raw.to(tl.uint32, bitcast=True)


@triton.jit
def _block_origin(br, bc, grid_cols):
    # The block this program owns: its index in the scale grid and its first row and column, int64 (tensors exceed
    # 2**31 elements).
    pid = tl.program_id(0).to(tl.int64)
    bi = pid // grid_cols
    bj = pid - bi * grid_cols
    return pid, bi * br, bj * bc


@triton.jit
def _dequantize_kernel(
    q_ptr,
    scale_bits_ptr,
    out_bits_ptr,
    n_rows,
    n_cols,
    br,
    bc,
    grid_cols,
    E5M2: tl.constexpr,
    SCALE_BF16: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
):
    pid, row0, col0 = _block_origin(br, bc, grid_cols)
    row_end = tl.minimum(row0 + br, n_rows)
    col_end = tl.minimum(col0 + bc, n_cols)
    s32 = _scale_f32_bits(scale_bits_ptr, pid, SCALE_BF16).to(tl.float32, bitcast=True)
    for r0 in range(0, br, TILE_R):
        rows = row0 + r0 + tl.arange(0, TILE_R)[:, None]
        for c0 in range(0, bc, TILE_C):
            cols = col0 + c0 + tl.arange(0, TILE_C)[None, :]
            mask = (rows < row_end) & (cols < col_end)
            offsets = rows * n_cols + cols
            code = tl.load(q_ptr + offsets, mask=mask, other=0).to(tl.uint32)
            if E5M2:
                x = _decode_e5m2(code)
            else:
                x = _decode_e4m3(code)
            v = (x.to(tl.float32, bitcast=True) * s32).to(tl.uint32, bitcast=True)
            v = tl.where((v & _F32_ABS_MASK) > _F32_INF, _NAN_F32, v)
            tl.store(out_bits_ptr + offsets, v.to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _requantize_kernel(
    r_ptr,
    tq_ptr,
    tscale_bits_ptr,
    outq_ptr,
    outscale_bits_ptr,
    n_rows,
    n_cols,
    br,
    bc,
    grid_cols,
    SCALE_BF16: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
):
    pid, row0, col0 = _block_origin(br, bc, grid_cols)
    row_end = tl.minimum(row0 + br, n_rows)
    col_end = tl.minimum(col0 + bc, n_cols)
    t_scale = _scale_f32_bits(tscale_bits_ptr, pid, SCALE_BF16)
    t_s32 = t_scale.to(tl.float32, bitcast=True)

    # Pass 1: is every r == t32 (IEEE; masked lanes count as equal), and the largest finite |r|, as float32 bits
    # (for non-negative floats the bit patterns order like the values, so an integer max is exact).
    equal = tl.full((TILE_R, TILE_C), 1, tl.int32)
    amax_bits = tl.zeros((TILE_R, TILE_C), tl.uint32)
    for r0 in range(0, br, TILE_R):
        rows = row0 + r0 + tl.arange(0, TILE_R)[:, None]
        for c0 in range(0, bc, TILE_C):
            cols = col0 + c0 + tl.arange(0, TILE_C)[None, :]
            mask = (rows < row_end) & (cols < col_end)
            offsets = rows * n_cols + cols
            r = tl.load(r_ptr + offsets, mask=mask, other=0.0)
            code = tl.load(tq_ptr + offsets, mask=mask, other=0).to(tl.uint32)
            t32 = _decode_e4m3(code).to(tl.float32, bitcast=True) * t_s32
            equal = equal & ((r == t32) | ~mask).to(tl.int32)
            a = r.to(tl.uint32, bitcast=True) & _F32_ABS_MASK
            amax_bits = tl.maximum(amax_bits, tl.where(mask & (a < _F32_INF), a, 0))
    keep = tl.min(equal) != 0
    amax = tl.max(amax_bits).to(tl.float32, bitcast=True)

    # The new scale: amax / 448 (IEEE), stored in the scale dtype with RNE on its bits, 1.0 where the stored value is
    # 0 (amax 0, or an underflow), and the stored value divides. s is finite and non-negative: no NaN to guard.
    s_bits = tl.math.div_rn(amax, _E4M3_DIVISOR).to(tl.uint32, bitcast=True)
    if SCALE_BF16:
        stored = (s_bits + 0x7FFF + ((s_bits >> 16) & 1)) >> 16
        stored = tl.where(stored == 0, _ONE_BF16, stored)
        divisor = (stored << 16).to(tl.float32, bitcast=True)
        new_scale = tl.where(keep, t_scale >> 16, stored).to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        stored = tl.where(s_bits == 0, _ONE_F32, s_bits)
        divisor = stored.to(tl.float32, bitcast=True)
        new_scale = tl.where(keep, t_scale, stored).to(tl.int32, bitcast=True)
    tl.store(outscale_bits_ptr + pid, new_scale)

    # Pass 2: the codes, the target's own where the block is unchanged.
    for r0 in range(0, br, TILE_R):
        rows = row0 + r0 + tl.arange(0, TILE_R)[:, None]
        for c0 in range(0, bc, TILE_C):
            cols = col0 + c0 + tl.arange(0, TILE_C)[None, :]
            mask = (rows < row_end) & (cols < col_end)
            offsets = rows * n_cols + cols
            r = tl.load(r_ptr + offsets, mask=mask, other=0.0)
            code = tl.load(tq_ptr + offsets, mask=mask, other=0)
            new = _encode_e4m3(tl.math.div_rn(r, divisor)).to(tl.uint8)
            tl.store(outq_ptr + offsets, tl.where(keep, code, new), mask=mask)


# True when TRITON_INTERPRET=1 was set as the kernels were decorated: they then run on CPU tensors, in numpy.
INTERPRETED: bool = not isinstance(_dequantize_kernel, triton.runtime.JITFunction)


def tile_shape(block: tuple[int, int]) -> tuple[int, int]:
    """The (rows, columns) tile a program walks its block in: powers of two, at most ``TILE_ELEMENTS`` elements.

    Args:
        block (`tuple[int, int]`): the quantization block ``(br, bc)``.

    Returns:
        `tuple[int, int]`: ``(TILE_R, TILE_C)``, each no larger than the block's next power of two.

    Example:
        ```py
        >>> tile_shape((128, 128))
        (32, 128)
        ```
    """
    br, bc = block
    tile_c = min(triton.next_power_of_2(bc), TILE_MAX_COLUMNS)
    tile_r = min(triton.next_power_of_2(br), max(1, TILE_ELEMENTS // tile_c))
    return tile_r, tile_c


def _check_block(who: str, block: object) -> tuple[int, int]:
    ok = isinstance(block, (tuple, list)) and len(block) == 2
    ok = ok and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    if not ok:
        raise ValueError(f"{who}: block must be two positive integers (rows, columns), got {block!r}")
    return int(block[0]), int(block[1])


def _check_tensor(who: str, name: str, x: object, dtypes: tuple[torch.dtype, ...], device: torch.device | None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        wanted = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{who}: {name} has dtype {x.dtype}, expected {wanted}")
    if x.dim() != 2:
        raise ValueError(f"{who}: {name} must be 2-D, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{who}: {name} is not contiguous (strides {tuple(x.stride())}); pass x.contiguous()")
    if device is not None and x.device != device:
        raise ValueError(f"{who}: {name} is on {x.device}, the codes are on {device}")


def _check_device(who: str, device: torch.device) -> None:
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"{who}: tensors are on {device}; the compiled kernels need CUDA tensors "
            "(set TRITON_INTERPRET=1 before importing this module to run them on CPU)"
        )


def _grid_of(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _check_scale(who: str, name: str, scale: object, shape: tuple[int, int], block, device) -> None:
    _check_tensor(who, name, scale, tuple(SCALE_DTYPES), device)
    grid = _grid_of(shape, block)
    if tuple(scale.shape) != grid:
        raise ValueError(
            f"{who}: {name} has shape {tuple(scale.shape)}, but a {list(shape)} tensor in {block[0]}x{block[1]} "
            f"blocks needs {list(grid)}"
        )


def _check_out(who: str, name: str, out: object, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if out is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    _check_tensor(who, name, out, (dtype,), like.device)
    if tuple(out.shape) != tuple(like.shape):
        raise ValueError(f"{who}: {name} has shape {tuple(out.shape)}, expected {tuple(like.shape)}")
    return out


def _launch_guard(device: torch.device):
    # Triton launches on the current CUDA device; make it the tensors' one. The interpreter runs the float32 ops in
    # numpy, which warns on inf * 0 and on NaN comparisons: expected values here.
    cuda = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    return cuda, np.errstate(all="ignore")


def dequantize_fp8(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    fmt: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize block-scaled FP8 codes to float32 on the GPU: ``decode(q) * s32``, one IEEE float32 multiply.

    Byte-identical to :func:`streammerge.kernels.reference.dequantize_fp8`: codes are decoded exactly, the scale is
    widened exactly (F32, or BF16 as the top half of a float32), and every NaN (a NaN code, or an E5M2 infinity
    times a zero scale) is written as the canonical ``0x7FC00000``.

    Args:
        q (`torch.Tensor`): uint8 codes ``[rows, C]``, contiguous, on a CUDA device (or CPU under
            ``TRITON_INTERPRET=1``).
        scale (`torch.Tensor`): float32 or bfloat16 ``[ceil(rows / br), ceil(C / bc)]``, contiguous, same device.
        block (`tuple[int, int]`): ``(br, bc)``, the quantization block; edge blocks may be partial.
        fmt (`str`): the codes' safetensors dtype, "F8_E4M3" (e4m3fn) or "F8_E5M2".
        out (`torch.Tensor`, *optional*): a contiguous float32 ``[rows, C]`` tensor on the same device, written in
            place; allocated when not given.

    Returns:
        `torch.Tensor`: ``out``, float32 ``[rows, C]``.

    Raises:
        `TypeError`: a tensor argument is not a tensor or has the wrong dtype.
        `ValueError`: an unknown ``fmt``, a bad ``block``, wrong shapes, non-contiguous tensors, mixed devices, or
            CPU tensors without the interpreter.

    Example:
        ```py
        >>> q = torch.randint(0, 0x7E, (256, 384), dtype=torch.uint8, device="cuda")
        >>> s = torch.rand(2, 3, device="cuda")
        >>> x = dequantize_fp8(q, s, (128, 128), "F8_E4M3")
        ```
    """
    who = "dequantize_fp8"
    if fmt not in FP8_FORMATS:
        raise ValueError(f"{who}: unsupported FP8 format {fmt!r}; use one of {', '.join(FP8_FORMATS)}")
    block = _check_block(who, block)
    _check_tensor(who, "q", q, (torch.uint8,), None)
    shape = (q.shape[0], q.shape[1])
    _check_scale(who, "scale", scale, shape, block, q.device)
    _check_device(who, q.device)
    out = _check_out(who, "out", out, q, torch.float32)
    if q.numel() == 0:
        return out
    grid_rows, grid_cols = _grid_of(shape, block)
    tile_r, tile_c = tile_shape(block)
    cuda, quiet = _launch_guard(q.device)
    with cuda, quiet:
        _dequantize_kernel[(grid_rows * grid_cols,)](
            q,
            scale.view(SCALE_DTYPES[scale.dtype]),
            out.view(torch.int32),
            shape[0],
            shape[1],
            block[0],
            block[1],
            grid_cols,
            E5M2=fmt == "F8_E5M2",
            SCALE_BF16=scale.dtype == torch.bfloat16,
            TILE_R=tile_r,
            TILE_C=tile_c,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    return out


def requantize_fp8(
    r: torch.Tensor,
    t_q: torch.Tensor,
    t_scale: torch.Tensor,
    block: tuple[int, int],
    out_q: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Requantize float32 ``r`` to e4m3fn on the target's block grid, keeping the blocks ``r`` leaves unchanged.

    Byte-identical to :func:`streammerge.kernels.reference.requantize_fp8`. Per block, with ``t32`` the target's
    dequantized values (e4m3fn codes ``t_q`` times ``t_scale``): if every ``r == t32`` (IEEE: +-0 equal, a NaN never
    equal) the block keeps the target's code bytes and scale bytes; otherwise ``s = amax / 448`` over the block's
    finite ``|r|``, stored in ``t_scale``'s dtype (RNE; 1.0 where the stored value is 0), and
    ``q = e4m3(r / s_stored)``: RNE, +-448 for anything beyond (infinities too), 0x7F for every NaN.

    Args:
        r (`torch.Tensor`): float32 ``[rows, C]``, contiguous, on a CUDA device (or CPU under ``TRITON_INTERPRET=1``).
        t_q (`torch.Tensor`): the target's uint8 e4m3fn codes, ``[rows, C]``, same device.
        t_scale (`torch.Tensor`): the target's float32 or bfloat16 scales, ``[ceil(rows / br), ceil(C / bc)]``.
        block (`tuple[int, int]`): ``(br, bc)``; edge blocks may be partial.
        out_q (`torch.Tensor`, *optional*): uint8 ``[rows, C]`` for the codes, written in place.
        out_scale (`torch.Tensor`, *optional*): ``t_scale``'s dtype and shape, for the scales, written in place.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``(out_q, out_scale)``.

    Raises:
        `TypeError` / `ValueError`: as :func:`dequantize_fp8`.

    Example:
        ```py
        >>> r = dequantize_fp8(t_q, t_scale, (128, 128), "F8_E4M3") + 0.001
        >>> q, s = requantize_fp8(r, t_q, t_scale, (128, 128))
        ```
    """
    who = "requantize_fp8"
    block = _check_block(who, block)
    _check_tensor(who, "r", r, (torch.float32,), None)
    _check_tensor(who, "t_q", t_q, (torch.uint8,), r.device)
    if tuple(t_q.shape) != tuple(r.shape):
        raise ValueError(f"{who}: t_q has shape {tuple(t_q.shape)}, r has {tuple(r.shape)}")
    shape = (r.shape[0], r.shape[1])
    _check_scale(who, "t_scale", t_scale, shape, block, r.device)
    _check_device(who, r.device)
    out_q = _check_out(who, "out_q", out_q, t_q, torch.uint8)
    out_scale = _check_out(who, "out_scale", out_scale, t_scale, t_scale.dtype)
    if r.numel() == 0:
        return out_q, out_scale
    grid_rows, grid_cols = _grid_of(shape, block)
    tile_r, tile_c = tile_shape(block)
    bits = SCALE_DTYPES[t_scale.dtype]
    cuda, quiet = _launch_guard(r.device)
    with cuda, quiet:
        _requantize_kernel[(grid_rows * grid_cols,)](
            r,
            t_q,
            t_scale.view(bits),
            out_q,
            out_scale.view(bits),
            shape[0],
            shape[1],
            block[0],
            block[1],
            grid_cols,
            SCALE_BF16=t_scale.dtype == torch.bfloat16,
            TILE_R=tile_r,
            TILE_C=tile_c,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    return out_q, out_scale
