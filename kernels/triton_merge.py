"""Fused Triton kernels for ``out = round(t32 + f32(alpha) * (g32 - s32))`` (docs/numerics.md), and their launchers.

Byte-identical to :func:`streammerge.kernels.reference.merge_reference`: the three fp32 steps are separate IEEE
operations (the kernel is launched with ``enable_fp_fusion=False``, so no FMA), and the final rounding to the output
dtype is the same integer code as :func:`streammerge.kernels.reference.round_from_f32`, written on ``uint32`` bit
patterns. No float cast is used for rounding because casts differ between runtimes (under ``TRITON_INTERPRET=1``,
``x.to(tl.bfloat16)`` truncates); the rounded bits are stored through an ``int16``/``int32`` view of the output.

This module imports triton at import time; callers import it lazily (the package works where triton is absent), and
:func:`triton_available` says whether it can be imported. ``TRITON_INTERPRET=1`` must be set before this module is
first imported: triton reads it when the kernel is decorated.
"""

from __future__ import annotations

import contextlib
import importlib

import numpy as np
import torch
import triton
import triton.language as tl

from streammerge.dtypes import CANONICAL_NAN_BITS

from .reference import BITS_VIEW_DTYPES, OUT_DTYPES

# 1024 elements / 4 warps chosen as the standard elementwise config (Triton tutorial 01, Liger's elementwise ops), to
# be re-measured on the GPU check script: 8 elements per thread, enough loads in flight for a memory-bound kernel.
BLOCK_SIZE = 1024
NUM_WARPS = 4

# Inputs are any of the dtypes the merge writes (bf16, fp16, fp32), in any mix.
_IN_DTYPES = tuple(OUT_DTYPES.values())
# The output dtype travels to the kernel as a constexpr code, so each output kind compiles its own specialisation.
_OUT_CODE = {"F32": 0, "BF16": 1, "F16": 2}

# Constants read inside the kernel are constexpr: Triton only lets a @jit function read constexpr globals.
_F32_ABS_MASK = tl.constexpr(0x7FFFFFFF)
_F32_INF = tl.constexpr(0x7F800000)
# Smallest |x| (float32 bits) that rounds to fp16 infinity: 65520, the tie between 65504 and 65536 goes to the even inf.
_F16_OVERFLOW = tl.constexpr(0x477FF000)
# 2**-14, the smallest normal fp16, as float32 bits.
_F16_MIN_NORMAL = tl.constexpr(0x38800000)
# Rebias the exponent from float32 (127) to fp16 (15), in the position of a float32 exponent.
_F16_REBIAS = tl.constexpr((127 - 15) << 23)
_NAN_F32 = tl.constexpr(CANONICAL_NAN_BITS["F32"])
_NAN_BF16 = tl.constexpr(CANONICAL_NAN_BITS["BF16"])
_NAN_F16 = tl.constexpr(CANONICAL_NAN_BITS["F16"])


def triton_available() -> tuple[bool, str]:
    """Whether triton can be imported here.

    Returns:
        `tuple[bool, str]`: ``(True, "")`` when ``import triton`` works, else ``(False, reason)`` with the import error.

    Example:
        ```py
        >>> ok, why = triton_available()
        ```
    """
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available", with its reason
        return False, f"triton cannot be imported: {type(exc).__name__}: {exc}"
    return True, ""


@triton.jit
def _widen_f32(x):
    # bf16 widens by placing its 16 bits on top of a float32: exact everywhere. `.to(tl.float32)` is not used for bf16
    # because the triton 3.9 interpreter maps every bf16 subnormal to a wrong float32 (254 of 65,536 patterns).
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _round_store(r, out_bits_ptr, offsets, mask, OUT_CODE: tl.constexpr):
    # Round float32 ``r`` to the output dtype (docs/numerics.md) on its bit pattern and store the bits. Shared by
    # the merge and the convert kernels, so both round with exactly the same integer code. Unsigned bit patterns:
    # shifts are logical and wrap-around (only ever reached by NaN patterns, which are replaced below) is defined
    # behaviour, with no signed-overflow checks under TRITON_DEBUG.
    bits = r.to(tl.uint32, bitcast=True)
    a = bits & _F32_ABS_MASK
    is_nan = a > _F32_INF

    if OUT_CODE == 0:
        res = tl.where(is_nan, _NAN_F32, bits)
        tl.store(out_bits_ptr + offsets, res.to(tl.int32, bitcast=True), mask=mask)
    elif OUT_CODE == 1:
        # bits + 0x7FFF + lowest kept bit, keep the high half: round to nearest, ties to even; overflow gives inf.
        lsb = (bits >> 16) & 1
        res = (bits + 0x7FFF + lsb) >> 16
        res = tl.where(is_nan, _NAN_BF16, res)
        tl.store(out_bits_ptr + offsets, res.to(tl.int16), mask=mask)
    else:
        sign = (bits >> 16) & 0x8000
        # Normal range: add half an ulp minus one plus the lowest kept bit, rebias, drop 13 mantissa bits. Only used
        # where a >= 2**-14 > the rebias, so the subtraction never wraps where it matters.
        normal = (a + 0xFFF + ((a >> 13) & 1) - _F16_REBIAS) >> 13
        # Subnormal range (|x| < 2**-14): count units of 2**-24 = mant >> (126 - exp), rounded to nearest even. The
        # shift is clamped to [1, 31] so it never reaches the register width (undefined in LLVM); where the true
        # shift is 25 or more the clamped one still gives q = 0, rem < half, so 0, and the mask below says so too.
        exp = (a >> 23).to(tl.int32)
        mant = (a & 0x7FFFFF) | 0x800000
        shift_raw = 126 - exp
        shift = tl.minimum(tl.maximum(shift_raw, 1), 31).to(tl.uint32)
        q = mant >> shift
        rem = mant - (q << shift)
        half = tl.full(q.shape, 1, tl.uint32) << (shift - 1)
        round_up = (rem > half) | ((rem == half) & ((q & 1) != 0))
        sub = q + round_up.to(tl.uint32)
        sub = tl.where((shift_raw >= 25) | (exp == 0), 0, sub)
        res = tl.where(a < _F16_MIN_NORMAL, sub, normal)
        res = tl.where(a >= _F16_OVERFLOW, 0x7C00, res)
        res = res | sign
        res = tl.where(is_nan, _NAN_F16, res)
        tl.store(out_bits_ptr + offsets, res.to(tl.int16), mask=mask)


@triton.jit
def _merge_kernel(
    target_ptr,
    sft_ptr,
    grpo_ptr,
    out_bits_ptr,
    alpha,
    n_elements,
    OUT_CODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 before multiplying: tensors exceed 2**31 elements.
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements

    # Exact widening of bf16/fp16/fp32 to float32; three separate fp32 roundings (no FMA: enable_fp_fusion=False).
    t = _widen_f32(tl.load(target_ptr + offsets, mask=mask, other=0.0))
    s = _widen_f32(tl.load(sft_ptr + offsets, mask=mask, other=0.0))
    g = _widen_f32(tl.load(grpo_ptr + offsets, mask=mask, other=0.0))
    # Compiled, alpha arrives as fp32; the interpreter passes the Python float itself, which Triton types as fp64 when
    # it is a float32 subnormal. The value is already a float32 (rounded on the host), so this cast is exact.
    a32 = tl.cast(alpha, tl.float32)
    d = g - s
    m = a32 * d
    r = t + m

    _round_store(r, out_bits_ptr, offsets, mask, OUT_CODE)


@triton.jit
def _convert_kernel(src_ptr, out_bits_ptr, n_elements, OUT_CODE: tl.constexpr, BLOCK: tl.constexpr):
    # out = round(x32): a tensor copied from the target into another output dtype (the engines' CONVERT op). Not the
    # merge kernel with alpha = 0: t + 0 * (t - t) is NaN where t is infinite.
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    r = _widen_f32(tl.load(src_ptr + offsets, mask=mask, other=0.0))
    _round_store(r, out_bits_ptr, offsets, mask, OUT_CODE)


@triton.jit
def _merge_two_kernel(
    a_ptr,
    b_ptr,
    out_bits_ptr,
    alpha,
    n_elements,
    MODE: tl.constexpr,
    OUT_CODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The merge with one term absent, same separate fp32 roundings as _merge_kernel (no FMA) and the same final
    # rounding. MODE 0, apply a stored vector (a = target, b = vector): r = t32 + a32 * v32. MODE 1, extract the
    # vector (a = sft, b = grpo): r = a32 * (g32 - s32).
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = _widen_f32(tl.load(a_ptr + offsets, mask=mask, other=0.0))
    y = _widen_f32(tl.load(b_ptr + offsets, mask=mask, other=0.0))
    a32 = tl.cast(alpha, tl.float32)
    if MODE == 0:
        m = a32 * y
        r = x + m
    else:
        d = y - x
        r = a32 * d
    _round_store(r, out_bits_ptr, offsets, mask, OUT_CODE)


# True when TRITON_INTERPRET=1 was set as the kernel was decorated: it then runs on CPU tensors, in numpy.
INTERPRETED: bool = not isinstance(_merge_kernel, triton.runtime.JITFunction)


def _check_inputs(tensors: dict[str, torch.Tensor]) -> tuple[int, torch.device]:
    n = None
    device = None
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"merge_triton: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _IN_DTYPES:
            raise TypeError(
                f"merge_triton: {name} has dtype {x.dtype}; only bfloat16, float16 and float32 are merged "
                "(non-floating tensors are copied from the target by the engine, never blended)"
            )
        if not x.is_contiguous():
            raise ValueError(
                f"merge_triton: {name} is not contiguous (strides {tuple(x.stride())}); pass x.contiguous()"
            )
        if n is None:
            n, device = x.numel(), x.device
        elif x.numel() != n:
            sizes = ", ".join(f"{k} {v.numel()}" for k, v in tensors.items())
            raise ValueError(f"merge_triton: inputs must have the same number of elements, got {sizes}")
        elif x.device != device:
            devices = ", ".join(f"{k} on {v.device}" for k, v in tensors.items())
            raise ValueError(f"merge_triton: inputs must be on one device, got {devices}")
    assert n is not None and device is not None
    return n, device


def _prepare_out(out: torch.Tensor | None, out_dtype: str, n: int, device: torch.device, who: str = "merge_triton"):
    torch_out_dtype = OUT_DTYPES[out_dtype]
    if out is None:
        return torch.empty(n, dtype=torch_out_dtype, device=device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{who}: out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch_out_dtype:
        raise TypeError(f"{who}: out has dtype {out.dtype}, but out_dtype {out_dtype!r} needs {torch_out_dtype}")
    if out.numel() != n:
        raise ValueError(f"{who}: out has {out.numel()} elements, the inputs have {n}")
    if out.device != device:
        raise ValueError(f"{who}: out is on {out.device}, the inputs are on {device}")
    if not out.is_contiguous():
        raise ValueError(f"{who}: out is not contiguous (strides {tuple(out.stride())})")
    return out


def merge_triton(
    target: torch.Tensor,
    sft: torch.Tensor,
    grpo: torch.Tensor,
    alpha: float,
    out_dtype: str,
    out: torch.Tensor | None = None,
    *,
    block_size: int = BLOCK_SIZE,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """Compute ``round(t32 + f32(alpha) * (g32 - s32))`` per the numerics contract with one fused Triton kernel.

    The bytes equal those of :func:`streammerge.kernels.reference.merge_reference` for every input, including NaN
    (canonical quiet NaN of the output dtype, sign cleared), infinities, subnormals and overflow on rounding (+-inf).

    Args:
        target, sft, grpo (`torch.Tensor`): contiguous tensors with the same number of elements (read flat), on the
            same CUDA device (or on CPU when running under ``TRITON_INTERPRET=1``), each bf16, fp16 or fp32 in any mix.
        alpha (`float`): the blend factor, rounded once to float32 here.
        out_dtype (`str`): "BF16", "F16" or "F32".
        out (`torch.Tensor`, *optional*): a contiguous tensor of the output dtype, the inputs' number of elements and
            device, written in place. Allocated (1-D) when not given.
        block_size (`int`, defaults to `BLOCK_SIZE`): elements per program, a power of two. The launch
            configuration changes the speed, never the bytes; benchmarks sweep it, the engines keep the default.
        num_warps (`int`, defaults to `NUM_WARPS`): warps per program, a power of two from 1 to 32.

    Returns:
        `torch.Tensor`: ``out``, holding the merged values.

    Raises:
        `TypeError`: an input or ``out`` is not a tensor, has an unsupported dtype, or ``out`` has the wrong dtype.
        `ValueError`: an unknown ``out_dtype``, non-contiguous tensors, mismatched sizes or devices, CPU tensors
            without the interpreter, or a launch configuration that is not a power of two.

    Example:
        ```py
        >>> t, s, g = (torch.randn(10, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        >>> merged = merge_triton(t, s, g, alpha=0.5, out_dtype="BF16")
        >>> merge_triton(t, s, g, 0.5, "BF16", out=merged, block_size=4096, num_warps=8)  # another launch config
        ```
    """
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"merge_triton: unsupported output dtype {out_dtype!r}; use one of {', '.join(OUT_DTYPES)}")
    _check_launch_config("merge_triton", block_size, num_warps)
    n, device = _check_inputs({"target": target, "sft": sft, "grpo": grpo})
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"merge_triton: inputs are on {device}; the compiled kernel needs CUDA tensors "
            "(set TRITON_INTERPRET=1 before importing this module to run it on CPU)"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise TypeError(f"merge_triton: alpha must be a real number, got {type(alpha).__name__}")

    out = _prepare_out(out, out_dtype, n, device)
    if n == 0:
        return out

    # Rounded on the host so the interpreter and the GPU see the same float32 value.
    a32 = float(np.float32(alpha))
    out_bits = out.view(BITS_VIEW_DTYPES[out_dtype])
    grid = (triton.cdiv(n, block_size),)
    # Triton launches on the current CUDA device; make it the inputs' one.
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    # The interpreter runs the fp32 ops in numpy, which warns on inf - inf and overflow: expected values here.
    with guard, np.errstate(all="ignore"):
        _merge_kernel[grid](
            target,
            sft,
            grpo,
            out_bits,
            a32,
            n,
            OUT_CODE=_OUT_CODE[out_dtype],
            BLOCK=block_size,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )
    return out


def _is_power_of_two(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


# tl.arange needs a power-of-two length; warps per program are a power of two up to 32 on NVIDIA GPUs.
_MAX_WARPS = 32


def _check_launch_config(who: str, block_size: int, num_warps: int) -> None:
    if not _is_power_of_two(block_size):
        raise ValueError(f"{who}: block_size must be a positive power of two, got {block_size!r}")
    if not _is_power_of_two(num_warps) or num_warps > _MAX_WARPS:
        raise ValueError(f"{who}: num_warps must be a power of two from 1 to {_MAX_WARPS}, got {num_warps!r}")


def convert_triton(src: torch.Tensor, out_dtype: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Round ``src`` (bf16, fp16 or fp32) to ``out_dtype`` with the contract's final rounding, on the GPU.

    The bytes equal :func:`streammerge.kernels.reference.round_from_f32` of the exact float32 widening of ``src``:
    round to nearest even, canonical quiet NaN, overflow to +-inf. This is the engines' CONVERT op (a tensor copied
    from the target into another ``--out-dtype``).

    Args:
        src (`torch.Tensor`): a contiguous bf16, fp16 or fp32 tensor on a CUDA device (or on CPU under
            ``TRITON_INTERPRET=1``), read flat.
        out_dtype (`str`): "BF16", "F16" or "F32".
        out (`torch.Tensor`, *optional*): a contiguous tensor of the output dtype, ``src``'s number of elements and
            device, written in place. Allocated (1-D) when not given.

    Returns:
        `torch.Tensor`: ``out``.

    Raises:
        `TypeError` / `ValueError`: as :func:`merge_triton`.

    Example:
        ```py
        >>> x = torch.randn(10, device="cuda")
        >>> convert_triton(x, "BF16")
        ```
    """
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"convert_triton: unsupported output dtype {out_dtype!r}; use one of {', '.join(OUT_DTYPES)}")
    n, device = _check_inputs({"src": src})
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"convert_triton: input is on {device}; the compiled kernel needs CUDA tensors "
            "(set TRITON_INTERPRET=1 before importing this module to run it on CPU)"
        )
    out = _prepare_out(out, out_dtype, n, device, "convert_triton")
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard, np.errstate(all="ignore"):
        _convert_kernel[grid](
            src,
            out.view(BITS_VIEW_DTYPES[out_dtype]),
            n,
            OUT_CODE=_OUT_CODE[out_dtype],
            BLOCK=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    return out


def _merge_two(who: str, mode: int, a, b, alpha, out_dtype: str, out):
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{who}: unsupported output dtype {out_dtype!r}; use one of {', '.join(OUT_DTYPES)}")
    names = ("target", "vector") if mode == 0 else ("sft", "grpo")
    n, device = _check_inputs({names[0]: a, names[1]: b})
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"{who}: inputs are on {device}; the compiled kernel needs CUDA tensors "
            "(set TRITON_INTERPRET=1 before importing this module to run it on CPU)"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise TypeError(f"{who}: alpha must be a real number, got {type(alpha).__name__}")
    out = _prepare_out(out, out_dtype, n, device, who)
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard, np.errstate(all="ignore"):
        _merge_two_kernel[grid](
            a,
            b,
            out.view(BITS_VIEW_DTYPES[out_dtype]),
            float(np.float32(alpha)),
            n,
            MODE=mode,
            OUT_CODE=_OUT_CODE[out_dtype],
            BLOCK=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    return out


def apply_vector_triton(
    target: torch.Tensor, vector: torch.Tensor, alpha: float, out_dtype: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``round(t32 + f32(alpha) * v32)``: apply a stored vector (``streammerge.apply``), the merge's roundings.

    With ``vector`` = float32 ``grpo - sft`` the bytes equal :func:`merge_triton` of the trio. Arguments, returns
    and errors as :func:`merge_triton`.

    Example:
        ```py
        >>> apply_vector_triton(target, vector, 1.0, "BF16")
        ```
    """
    return _merge_two("apply_vector_triton", 0, target, vector, alpha, out_dtype, out)


def extract_vector_triton(
    sft: torch.Tensor, grpo: torch.Tensor, alpha: float, out_dtype: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``round(f32(alpha) * (g32 - s32))``: the vector itself (``streammerge.extract``, alpha 1), the merge's
    roundings. Arguments, returns and errors as :func:`merge_triton`.

    Example:
        ```py
        >>> extract_vector_triton(sft, grpo, 1.0, "F32")
        ```
    """
    return _merge_two("extract_vector_triton", 1, sft, grpo, alpha, out_dtype, out)
