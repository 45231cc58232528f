"""An independent reference of the numerics contract (docs/numerics.md), in numpy, written without streammerge code.

float32 arithmetic step by step (numpy float32 ops are IEEE round-to-nearest-even and never fused), then rounding
to the output dtype: numpy's own float32->float16 cast for fp16, and for bf16 an explicit choice between the two
neighbouring bf16 values computed in float64. NaN becomes the canonical quiet NaN of the output dtype.
"""

from __future__ import annotations

import numpy as np

CANON_NAN = {"BF16": 0x7FC0, "F16": 0x7E00, "F32": 0x7FC00000}


def widen(x: np.ndarray, dtype: str) -> np.ndarray:
    """Raw little-endian values (uint16 or uint32 bit patterns) of ``dtype`` -> float32."""
    if dtype == "F32":
        return x.view(np.uint32).view(np.float32).copy()
    if dtype == "F16":
        return x.view(np.uint16).view(np.float16).astype(np.float32)
    if dtype == "BF16":
        return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise ValueError(dtype)


def round_bf16_bits(r: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return _round_bf16_bits(r)


def _round_bf16_bits(r: np.ndarray) -> np.ndarray:
    bits = r.view(np.uint32)
    lo_bits = bits & np.uint32(0xFFFF0000)
    lo = lo_bits.view(np.float32).astype(np.float64)
    mag_next = (lo_bits & np.uint32(0x7FFFFFFF)).astype(np.uint64) + 0x10000
    # The neighbour one bf16 ulp further from zero; past the largest finite value it is "2**128" for comparison.
    hi = np.where(
        mag_next >= 0x7F800000,
        np.copysign(2.0**128, lo),
        (mag_next.astype(np.uint32) | (lo_bits & np.uint32(0x80000000))).view(np.float32).astype(np.float64),
    )
    x = r.astype(np.float64)
    d_lo = np.abs(x - lo)
    d_hi = np.abs(hi - x)
    lo_even = ((lo_bits >> 16) & 1) == 0
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ~lo_even)
    out = np.where(take_hi, (lo_bits >> 16) + 1, lo_bits >> 16).astype(np.uint32)
    # Infinity input stays infinity (lo == inf, d_lo == 0); the +1 never applies there.
    out = out.astype(np.uint16)
    out[np.isnan(r)] = CANON_NAN["BF16"]
    return out


def expected_bits(
    t: np.ndarray, s: np.ndarray, g: np.ndarray, alpha: float, dtypes: tuple[str, str, str], out_dtype: str
) -> np.ndarray:
    """Output bit patterns (uint16 or uint32) for raw inputs ``t, s, g`` of the given safetensors dtypes."""
    t32, s32, g32 = (widen(x, dt) for x, dt in zip((t, s, g), dtypes))
    a32 = np.float32(alpha)
    with np.errstate(all="ignore"):
        d = g32 - s32
        m = a32 * d
        r = t32 + m
    return round_out(r, out_dtype)


def expected_bits_many(t: np.ndarray, t_dtype: str, vectors: list[tuple], out_dtype: str) -> np.ndarray:
    """Several vectors: ``r = t32``, then ``r = r + f32(alpha) * (p32 - m32)`` for each ``(p, p_dtype, m, m_dtype,
    alpha)`` in order (``m`` None: a stored vector, ``r + f32(alpha) * p32``), and one rounding."""
    r = widen(t, t_dtype)
    with np.errstate(all="ignore"):
        for p, p_dtype, m, m_dtype, alpha in vectors:
            d = widen(p, p_dtype)
            if m is not None:
                d = d - widen(m, m_dtype)
            r = r + np.float32(alpha) * d
    return round_out(r, out_dtype)


def round_out(r: np.ndarray, out_dtype: str) -> np.ndarray:
    """float32 values -> bit patterns of ``out_dtype`` (round to nearest even, canonical NaN)."""
    with np.errstate(all="ignore"):
        if out_dtype == "F32":
            out = r.view(np.uint32).copy()
            out[np.isnan(r)] = CANON_NAN["F32"]
            return out
        if out_dtype == "F16":
            out = r.astype(np.float16).view(np.uint16).copy()
            out[np.isnan(r)] = CANON_NAN["F16"]
            return out
    if out_dtype == "BF16":
        return round_bf16_bits(r)
    raise ValueError(out_dtype)


def hostile_values(dtype: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Raw bit patterns of ``dtype``: random normals plus NaNs, infinities, subnormals, zeros and extremes."""
    width = np.uint32 if dtype == "F32" else np.uint16
    if dtype == "F32":
        base = rng.standard_normal(n).astype(np.float32).view(np.uint32)
        specials = [
            0x7FC00000,
            0xFFC00001,
            0x7F800001,
            0x7F800000,
            0xFF800000,
            0x00000001,
            0x807FFFFF,
            0x00000000,
            0x80000000,
            0x7F7FFFFF,
            0xFF7FFFFF,
            0x00800000,
        ]
    elif dtype == "F16":
        base = rng.standard_normal(n).astype(np.float16).view(np.uint16)
        specials = [0x7E00, 0xFE01, 0x7C01, 0x7C00, 0xFC00, 0x0001, 0x83FF, 0x0000, 0x8000, 0x7BFF, 0xFBFF, 0x0400]
    else:
        base = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        specials = [0x7FC0, 0xFFC1, 0x7F81, 0x7F80, 0xFF80, 0x0001, 0x807F, 0x0000, 0x8000, 0x7F7F, 0xFF7F, 0x0080]
    out = base.astype(width)
    if n:
        k = max(1, n // 8)
        idx = rng.integers(0, n, size=k)
        out[idx] = rng.choice(np.array(specials, dtype=width), size=k)
        # Some fully random bit patterns: every exponent, including the subnormal range.
        idx = rng.integers(0, n, size=k)
        out[idx] = rng.integers(0, np.iinfo(width).max, size=k, dtype=width, endpoint=True)
    return out
