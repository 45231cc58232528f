"""An independent numpy reference of issue 12's block-scaled FP8 contract, written without streammerge code or torch.

Every value is computed from its definition: the e4m3fn and e5m2 codes are decoded from their bit fields into
tables, e4m3fn encoding picks between the two neighbouring representable values with exact float64 midpoints (ties
to the even code), and all arithmetic is numpy float32, one IEEE round-to-nearest-even operation at a time (numpy
never fuses a multiply and an add). Bit patterns travel as unsigned integers: uint8 for FP8 codes, uint16 for BF16
and F16, uint32 for F32.

The contract, per tensor:

- dequantize each input: ``x32 = e4m3(q) * s32`` (one float32 multiply), ``s32`` the block's scale widened exactly;
  BF16/F16/F32 inputs are widened exactly;
- blend: ``d = g32 - s32; m = a32 * d; r = t32 + m``;
- FP8 output (target FP8): per block of the target's grid, if every ``r == t32`` (IEEE: +-0 equal, NaN never) the
  target's codes and scale stay; else ``amax`` = max |r| over finite elements, ``s = f32(amax / 448)`` stored in
  the scale dtype (RNE), the stored 1 where amax or the stored s is 0, and the stored value the divisor:
  ``q = e4m3(f32(r / s_stored))``;
- plain output (BF16/F16/F32): one rounding from ``r``, RNE, overflow to infinity, NaN to the canonical quiet NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

E4M3_MAX = 448.0
CANONICAL_NAN = {"BF16": 0x7FC0, "F16": 0x7E00, "F32": 0x7FC00000}
BITS_DTYPE = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}
SCALE_DTYPES = ("F32", "BF16")
FP8_FORMATS = ("F8_E4M3", "F8_E5M2")
E4M3_NAN = 0x7F
E4M3_MAX_CODE = 0x7E


# ------------------------------------------------------------------------------------------------ FP8 code tables


def _e4m3_value(code: int) -> float:
    """e4m3fn: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return float("nan")
    if exponent == 0:
        return sign * mantissa * 2.0**-9  # subnormal: 2^(1 - 7) * mantissa / 8
    return sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)


def _e5m2_value(code: int) -> float:
    """e5m2: 1 sign bit, 5 exponent bits (bias 15), 2 mantissa bits; exponent 31 is infinity (mantissa 0) or NaN."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 2) & 0x1F, code & 0x3
    if exponent == 0x1F:
        return sign * float("inf") if mantissa == 0 else float("nan")
    if exponent == 0:
        return sign * mantissa * 2.0**-16  # subnormal: 2^(1 - 15) * mantissa / 4
    return sign * (1.0 + mantissa / 4.0) * 2.0 ** (exponent - 15)


E4M3_VALUES = np.array([_e4m3_value(c) for c in range(256)], dtype=np.float32)
E5M2_VALUES = np.array([_e5m2_value(c) for c in range(256)], dtype=np.float32)
# The non-negative finite e4m3fn values in code order 0x00 .. 0x7E, which is also increasing value order.
_E4M3_POSITIVE = E4M3_VALUES[: E4M3_MAX_CODE + 1].astype(np.float64)
# Midpoints between neighbours, exact in float64 (5 significant bits at most).
_E4M3_MIDPOINTS = (_E4M3_POSITIVE[:-1] + _E4M3_POSITIVE[1:]) / 2


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """uint8 e4m3fn codes -> float32 values (0x7F and 0xFF are NaN)."""
    return E4M3_VALUES[np.asarray(codes, dtype=np.uint8)]


def decode_e5m2(codes: np.ndarray) -> np.ndarray:
    """uint8 e5m2 codes -> float32 values (infinities at 0x7C and 0xFC, NaN above them)."""
    return E5M2_VALUES[np.asarray(codes, dtype=np.uint8)]


def decode_fp8(codes: np.ndarray, fmt: str = "F8_E4M3") -> np.ndarray:
    """Decode codes of safetensors dtype ``fmt`` ("F8_E4M3" or "F8_E5M2") to float32."""
    return {"F8_E4M3": decode_e4m3, "F8_E5M2": decode_e5m2}[fmt](codes)


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> uint8 e4m3fn codes: round to nearest, ties to the even code; beyond +-448 (infinities too)
    saturate to +-448 (0x7E / 0xFE); every NaN is 0x7F; the sign is kept, so -0.0 and negative values that round
    to zero are 0x80."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore"):  # widening a signalling NaN raises the invalid flag; it stays NaN
        magnitude = np.abs(x).astype(np.float64)
    finite_small = magnitude < E4M3_MAX  # False for NaN, infinities and everything from 448 up
    m = np.where(finite_small, magnitude, 0.0)
    # lower[i]: index of the largest representable value <= m; m < 448 so lower + 1 exists.
    lower = np.searchsorted(_E4M3_POSITIVE, m, side="right") - 1
    lower = np.minimum(lower, E4M3_MAX_CODE - 1)
    midpoint = _E4M3_MIDPOINTS[lower]
    up = (m > midpoint) | ((m == midpoint) & (lower % 2 == 1))  # a tie goes to the even code
    code = np.where(up, lower + 1, lower)
    code = np.where(finite_small, code, E4M3_MAX_CODE)
    sign = (x.view(np.uint32) >> 31).astype(np.int64) << 7
    out = (code | sign).astype(np.uint8)
    out[np.isnan(x)] = E4M3_NAN
    return out


# ------------------------------------------------------------------------------------------------ BF16 / F16 / F32


def widen(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Bit patterns of a BF16, F16 or F32 tensor -> float32, exactly."""
    bits = np.asarray(bits)
    if dtype == "F32":
        return bits.astype(np.uint32).view(np.float32).copy()
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return bits.astype(np.uint16).view(np.float16).astype(np.float32)
    raise ValueError(dtype)


def round_to(r: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> bit patterns of ``dtype`` (BF16, F16, F32): round to nearest even, overflow to infinity, every NaN
    the canonical quiet NaN."""
    r = np.asarray(r, dtype=np.float32)
    if dtype == "F32":
        out = r.view(np.uint32).copy()
    elif dtype == "BF16":
        bits = r.view(np.uint32).astype(np.uint64)
        # Add half an ulp of bf16, minus one unless the kept part is odd: a carry out of the dropped 16 bits rounds
        # up, exactly half rounds to even; the carry may run into the exponent, which is right (and overflows to inf).
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    elif dtype == "F16":
        with np.errstate(over="ignore"):
            out = r.astype(np.float16).view(np.uint16).copy()  # numpy's float32->float16 cast is correctly rounded
    else:
        raise ValueError(dtype)
    out[np.isnan(r)] = CANONICAL_NAN[dtype]
    return out


# ------------------------------------------------------------------------------------------------ block scales


@dataclass(frozen=True)
class Fp8Tensor:
    """A block-scaled FP8 tensor: ``codes`` uint8 [R, C], ``scale_bits`` [ceil(R/br), ceil(C/bc)] as uint32 (F32)
    or uint16 (BF16) bit patterns."""

    codes: np.ndarray
    scale_bits: np.ndarray
    block: tuple[int, int] = (128, 128)
    scale_dtype: str = "F32"
    fmt: str = "F8_E4M3"

    def __post_init__(self) -> None:
        rows, cols = self.codes.shape
        grid = (-(-rows // self.block[0]), -(-cols // self.block[1]))
        if tuple(self.scale_bits.shape) != grid:
            raise ValueError(f"scale shape {self.scale_bits.shape} is not the {grid} grid of {self.codes.shape}")
        if self.scale_dtype not in SCALE_DTYPES or self.fmt not in FP8_FORMATS:
            raise ValueError(f"unsupported scale dtype {self.scale_dtype} or format {self.fmt}")


@dataclass(frozen=True)
class PlainTensor:
    """A BF16, F16 or F32 tensor as bit patterns (uint16 or uint32)."""

    bits: np.ndarray
    dtype: str


def grid_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def expand(grid: np.ndarray, shape: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    """Each element of a per-block grid repeated over its block, cut to ``shape`` (edge blocks partial)."""
    return np.repeat(np.repeat(grid, block[0], axis=0), block[1], axis=1)[: shape[0], : shape[1]]


def widen_scale(scale_bits: np.ndarray, scale_dtype: str) -> np.ndarray:
    """Stored scales -> float32, exactly."""
    return widen(scale_bits, scale_dtype)


def store_scale(s: np.ndarray, scale_dtype: str) -> np.ndarray:
    """float32 scales -> stored bit patterns (F32 as is, BF16 rounded to nearest even, NaN canonical)."""
    return round_to(s, scale_dtype)


def dequantize(
    codes: np.ndarray,
    scale_bits: np.ndarray,
    block: tuple[int, int] = (128, 128),
    scale_dtype: str = "F32",
    fmt: str = "F8_E4M3",
) -> np.ndarray:
    """``decode(q) * s32`` per element, one float32 multiply, ``s32`` the scale of the element's block."""
    codes = np.asarray(codes, dtype=np.uint8)
    s32 = expand(widen_scale(scale_bits, scale_dtype), codes.shape, block)
    with np.errstate(invalid="ignore", over="ignore"):
        return decode_fp8(codes, fmt) * s32


def to_f32(x: Fp8Tensor | PlainTensor) -> np.ndarray:
    """The float32 values an input stands for."""
    if isinstance(x, Fp8Tensor):
        return dequantize(x.codes, x.scale_bits, x.block, x.scale_dtype, x.fmt)
    return widen(x.bits, x.dtype)


def blend(t32: np.ndarray, s32: np.ndarray, g32: np.ndarray, alpha: float) -> np.ndarray:
    """``d = g32 - s32; m = a32 * d; r = t32 + m``, each step a float32 operation (no FMA)."""
    a32 = np.float32(alpha)
    with np.errstate(all="ignore"):
        d = (g32 - s32).astype(np.float32)
        m = (a32 * d).astype(np.float32)
        return (t32 + m).astype(np.float32)


def _blocks(x: np.ndarray, block: tuple[int, int], fill: float) -> np.ndarray:
    """``x`` padded with ``fill`` to whole blocks and viewed as [grid rows, br, grid cols, bc]."""
    gr, gc = grid_shape(x.shape, block)
    padded = np.full((gr * block[0], gc * block[1]), fill, dtype=x.dtype)
    padded[: x.shape[0], : x.shape[1]] = x
    return padded.reshape(gr, block[0], gc, block[1])


def block_amax(r: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """max |r| over each block's finite elements (0 for a block without any), float32."""
    finite = np.where(np.isfinite(r), np.abs(r), np.float32(0)).astype(np.float32)
    return _blocks(finite, block, 0.0).max(axis=(1, 3))  # zero padding never raises a maximum of |r| >= 0


def new_scales(amax: np.ndarray, scale_dtype: str = "F32") -> np.ndarray:
    """The stored scale bits of blocks with maximum ``amax``: ``s = f32(amax / 448)`` stored in ``scale_dtype``
    (RNE), and the stored 1.0 where amax is 0 or the stored s is 0.

    The rule applies to the stored value (the lead's decision on issue 12): checking s before it is rounded to
    BF16 would let an amax below about 2^-124 store a 0 scale (bf16's smallest subnormal is 2^-133), and the divide
    would turn finite inputs into 0/0 = NaN.
    """
    with np.errstate(all="ignore"):
        s = (amax.astype(np.float32) / np.float32(E4M3_MAX)).astype(np.float32)
    stored = store_scale(s, scale_dtype)
    one = store_scale(np.ones_like(s), scale_dtype)
    return np.where((amax == 0) | (widen_scale(stored, scale_dtype) == 0), one, stored).astype(stored.dtype)


def quantize(
    r: np.ndarray, block: tuple[int, int] = (128, 128), scale_dtype: str = "F32"
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float32 ``r`` block by block, every block anew: ``(codes uint8, scale bits)``."""
    r = np.asarray(r, dtype=np.float32)
    scale_bits = new_scales(block_amax(r, block), scale_dtype)
    divisor = expand(widen_scale(scale_bits, scale_dtype), r.shape, block)
    with np.errstate(all="ignore"):
        scaled = (r / divisor).astype(np.float32)
    return encode_e4m3(scaled), scale_bits


def unchanged_blocks(r: np.ndarray, t32: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Per block: every element ``r == t32`` in IEEE comparison (+-0 equal, NaN never)."""
    with np.errstate(invalid="ignore"):
        equal = (r == t32).astype(np.uint8)
    return _blocks(equal, block, 1).min(axis=(1, 3)).astype(bool)  # padding counts as equal


def requantize(r: np.ndarray, target: Fp8Tensor) -> Fp8Tensor:
    """FP8 output on the target's grid and scale dtype: unchanged blocks keep the target's codes and scale, the
    others are quantized anew from ``r``."""
    if target.fmt != "F8_E4M3":
        raise ValueError("FP8 output is e4m3fn; a target in another FP8 format takes a plain --out-dtype")
    t32 = to_f32(target)
    keep = unchanged_blocks(r, t32, target.block)
    codes, scale_bits = quantize(r, target.block, target.scale_dtype)
    keep_elements = expand(keep, r.shape, target.block)
    codes = np.where(keep_elements, target.codes, codes).astype(np.uint8)
    scale_bits = np.where(keep, target.scale_bits, scale_bits).astype(target.scale_bits.dtype)
    return Fp8Tensor(codes, scale_bits, target.block, target.scale_dtype)


def merge(
    target: Fp8Tensor | PlainTensor,
    sft: Fp8Tensor | PlainTensor,
    grpo: Fp8Tensor | PlainTensor,
    alpha: float,
    out_dtype: str | None = None,
) -> Fp8Tensor | PlainTensor:
    """``out = target + alpha * (grpo - sft)`` under the contract.

    Args:
        target, sft, grpo: each FP8 or plain, in any mix (shapes equal).
        alpha: the blend factor (rounded once to float32).
        out_dtype: None follows the target (FP8 in the target's grid and scale dtype, or the target's plain dtype);
            "BF16" / "F16" / "F32" writes a dequantized output.

    Returns:
        [`Fp8Tensor`] or [`PlainTensor`].
    """
    t32, s32, g32 = (to_f32(x) for x in (target, sft, grpo))
    r = blend(t32, s32, g32, alpha)
    if out_dtype is None:
        if isinstance(target, Fp8Tensor):
            return requantize(r, target)
        out_dtype = target.dtype
    return PlainTensor(round_to(r, out_dtype), out_dtype)
