"""Pure-torch implementation of the numerics contract (docs/numerics.md), shared by the CPU engine.

Per element, with x32 the exact widening of the stored value to float32 and a32 = float32(alpha):

    d = g32 - s32;  m = a32 * d;  r = t32 + m         (IEEE float32, round to nearest even, no FMA)
    out = round_to_nearest_even(r -> output dtype)

The final rounding is done on the float32 bit pattern with integer operations, never with a dtype cast, because
casts differ between runtimes (the Triton interpreter truncates to bf16; NaN payloads and signs differ between x86
and GPUs). Every NaN becomes the output dtype's canonical quiet NaN (``CANONICAL_NAN_BITS``, sign cleared), so the
output bytes never depend on the device. Overflow on rounding gives +-inf.
"""

from __future__ import annotations

import torch

# Absolute, not `..dtypes`: run from a checkout, this folder is also importable as a top-level `kernels` (the name of
# an unrelated PyPI package that transformers probes for), and a relative import beyond it would fail there.
from streammerge.dtypes import BITS_VIEW_NAMES, BLENDABLE_DTYPES, CANONICAL_NAN_BITS, DTYPE_BITS, torch_dtype

# The dtypes the merge computes and writes (streammerge.dtypes' blendable ones), sorted: the order error messages
# list them in (BF16, F16, F32).
OUT_DTYPES: dict[str, torch.dtype] = {code: torch_dtype(code) for code in sorted(BLENDABLE_DTYPES)}
# The integer view of each output dtype's bit pattern: the rounding and the NaN fix-up work on integers of its width.
BITS_VIEW_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, BITS_VIEW_NAMES[DTYPE_BITS[code]]) for code in OUT_DTYPES
}

_F32_ABS_MASK = 0x7FFFFFFF
_F32_INF = 0x7F800000
# Smallest |x| (as float32 bits) that rounds to fp16 infinity: 65520 = halfway between 65504 and 65536, and the
# tie goes to the even neighbour, which is the infinity.
_F16_OVERFLOW = 0x477FF000
# 2**-14, the smallest normal fp16, as float32 bits.
_F16_MIN_NORMAL = 0x38800000
# Rebias the exponent from float32 (127) to fp16 (15), in the position of a float32 exponent.
_F16_REBIAS = (127 - 15) << 23


def round_from_f32(r: torch.Tensor, out_dtype: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Round a float32 tensor to ``out_dtype`` with round-to-nearest-even and canonical NaN, as fast as is exact.

    Uses torch's own dtype cast plus a NaN fix-up when a self-test (run once per process over every bf16 high half
    and the fp16 rounding boundaries, see :func:`fast_cast_is_exact`) proves the cast gives the contract's bytes on
    this machine; otherwise the integer path :func:`round_from_f32_exact`. Same arguments and result.
    """
    if r.dtype != torch.float32:
        raise TypeError(f"round_from_f32 needs float32 input, got {r.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"unsupported output dtype {out_dtype!r}; use one of {', '.join(OUT_DTYPES)}")
    if not fast_cast_is_exact(out_dtype):
        return round_from_f32_exact(r, out_dtype, out)
    return _round_fast(r, out_dtype, out)


def _round_fast(r: torch.Tensor, out_dtype: str, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        out = torch.empty(r.shape, dtype=OUT_DTYPES[out_dtype])
    out.copy_(r)  # RNE cast (verified by fast_cast_is_exact); NaN bits still need canonicalising
    if r.numel() and bool(torch.isfinite(r.sum())):
        return out  # no NaN anywhere (a sum is one read and no allocation; inf or overflow falls through)
    nan = torch.isnan(out)
    if nan.any():
        ints = out.view(BITS_VIEW_DTYPES[out_dtype])
        ints.masked_fill_(nan, _as_signed(CANONICAL_NAN_BITS[out_dtype], out_dtype))
    return out


def _as_signed(bits: int, out_dtype: str) -> int:
    width = DTYPE_BITS[out_dtype]
    return bits - (1 << width) if bits >= 1 << (width - 1) else bits


_FAST_OK: dict[str, bool] = {}


def fast_cast_is_exact(out_dtype: str) -> bool:
    """Whether torch's float32 -> ``out_dtype`` cast (+ NaN fix-up) equals the integer path on this machine.

    Checked once per process on every bf16 high half with the low halves that decide rounding (0, ties, just
    below/above ties, all ones) and random ones, which also covers the fp16 normal, subnormal and overflow
    boundaries; an odd length exercises both torch's vectorised loop and its scalar tail.
    """
    ok = _FAST_OK.get(out_dtype)
    if ok is None:
        if out_dtype == "F32":
            ok = True
        else:
            hi = torch.arange(0, 1 << 16, dtype=torch.int64) << 16
            # ties and neighbours for bf16 (bit 15) and for fp16 normals (bit 12) and subnormals (bits 13-14 near
            # the float32 exponents that map to fp16 subnormals)
            lows = torch.tensor(
                [
                    0,
                    1,
                    0x0FFF,
                    0x1000,
                    0x1001,
                    0x1FFF,
                    0x2000,
                    0x2001,
                    0x3FFF,
                    0x4000,
                    0x4001,
                    0x7FFF,
                    0x8000,
                    0x8001,
                    0xFFFF,
                ]
            )
            rnd = torch.randint(0, 1 << 16, (hi.numel(),), generator=torch.Generator().manual_seed(0))
            bits = torch.cat([(hi[:, None] | lows[None, :]).reshape(-1), hi | rnd, torch.tensor([0x477FEFFF])])
            bits = ((bits + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)[:-2]  # odd length
            x = bits.view(torch.float32)
            fast = _round_fast(x.clone(), out_dtype, None)
            exact = round_from_f32_exact(x.clone(), out_dtype)
            ok = bool(torch.equal(fast.view(torch.int16), exact.view(torch.int16)))
        _FAST_OK[out_dtype] = ok
    return ok


def round_from_f32_exact(r: torch.Tensor, out_dtype: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Round a float32 tensor to ``out_dtype`` ("BF16", "F16", "F32") with round-to-nearest-even and canonical NaN.

    This integer path on the float32 bit pattern *is* the contract's definition of the final rounding; the Triton
    kernel mirrors it operation for operation.

    Args:
        r (`torch.Tensor`): contiguous float32 values; may be overwritten (used as scratch).
        out_dtype (`str`): the safetensors dtype code of the result.
        out (`torch.Tensor`, *optional*): a contiguous tensor of the result dtype and ``r``'s size to write into.

    Returns:
        `torch.Tensor`: the rounded values in the output dtype (``out`` when given).
    """
    if r.dtype != torch.float32:
        raise TypeError(f"round_from_f32 needs float32 input, got {r.dtype}")
    bits = r.view(torch.int32)
    nan = bits.bitwise_and(_F32_ABS_MASK).gt_(_F32_INF).bool() if r.numel() else torch.zeros(0, dtype=torch.bool)
    if out_dtype == "F32":
        res = bits.masked_fill(nan, CANONICAL_NAN_BITS["F32"])
        res = res.view(torch.float32)
    elif out_dtype == "BF16":
        # bits + 0x7FFF + lowest kept bit, then keep the high half: round to nearest, ties to even. Negative values
        # are negative int32 here; two's-complement addition gives the same bits as unsigned, and the arithmetic
        # shift only changes bits above the 16 we keep.
        lsb = bits.bitwise_right_shift(16).bitwise_and_(1)
        res = lsb.add_(0x7FFF).add_(bits).bitwise_right_shift_(16)
        res.masked_fill_(nan, CANONICAL_NAN_BITS["BF16"])
        res = res.to(torch.int16).view(torch.bfloat16)
    elif out_dtype == "F16":
        res = _f32_bits_to_f16_bits(bits, nan).to(torch.int16).view(torch.float16)
    else:
        raise ValueError(f"unsupported output dtype {out_dtype!r}; use one of {', '.join(OUT_DTYPES)}")
    if out is not None:
        out.copy_(res)
        return out
    return res


def _f32_bits_to_f16_bits(bits: torch.Tensor, nan: torch.Tensor) -> torch.Tensor:
    sign = bits.bitwise_right_shift(16).bitwise_and_(0x8000)
    a = bits.bitwise_and(_F32_ABS_MASK)
    # Normal range: add half an ulp minus one plus the lowest kept bit, drop 13 mantissa bits, rebias.
    normal = a.bitwise_right_shift(13).bitwise_and_(1).add_(0xFFF).add_(a).sub_(_F16_REBIAS).bitwise_right_shift_(13)
    # Subnormal range (|x| < 2**-14): the result counts units of 2**-24. value = mant * 2**(exp - 150), so the
    # number of units is mant >> (126 - exp), rounded to nearest even. Shifts of 25 or more give 0 (|x| < 2**-25
    # rounds to zero; exactly 2**-25 is a tie that goes to the even 0).
    exp = a.bitwise_right_shift(23)
    mant = a.bitwise_and(0x7FFFFF).bitwise_or_(0x800000)
    shift = exp.neg().add_(126).clamp_(0, 31)
    q = mant.bitwise_right_shift(shift)
    rem = mant.sub(q.bitwise_left_shift(shift))
    half = torch.ones_like(shift).bitwise_left_shift_(shift.sub(1).clamp_(min=0))
    round_up = rem.gt(half).logical_or_(rem.eq(half).logical_and_(q.bitwise_and(1).bool()))
    sub = q.add_(round_up.to(torch.int32))
    sub.masked_fill_(shift.ge(25).logical_or_(exp.eq(0)), 0)
    res = torch.where(a.lt(_F16_MIN_NORMAL), sub, normal)
    res.masked_fill_(a.ge(_F16_OVERFLOW), 0x7C00)
    res.bitwise_or_(sign)
    res.masked_fill_(nan, CANONICAL_NAN_BITS["F16"])
    return res


def widen_f32(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact widening of bf16/fp16/fp32 values to float32 (into ``out`` when given)."""
    if out is None:
        return x.to(torch.float32) if x.dtype != torch.float32 else x.clone()
    out.copy_(x)
    return out


def merge_reference(
    target: torch.Tensor,
    sft: torch.Tensor,
    grpo: torch.Tensor,
    alpha: float,
    out_dtype: str,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute ``round(t32 + f32(alpha) * (g32 - s32))`` per the numerics contract on CPU tensors.

    Args:
        target, sft, grpo (`torch.Tensor`): 1-D tensors of equal length, each bf16, fp16 or fp32.
        alpha (`float`): rounded once to float32.
        out_dtype (`str`): "BF16", "F16" or "F32".
        scratch (`tuple[torch.Tensor, torch.Tensor]`, *optional*): two float32 buffers at least as long as the
            inputs, reused across calls so the steady state allocates only the rounding temporaries.
        out (`torch.Tensor`, *optional*): where to write the result.

    Returns:
        `torch.Tensor`: the merged values in the output dtype.
    """
    n = target.numel()
    if not (sft.numel() == n == grpo.numel()):
        raise ValueError(f"length mismatch: target {n}, sft {sft.numel()}, grpo {grpo.numel()}")
    if scratch is None:
        a_buf = torch.empty(n, dtype=torch.float32)
        b_buf = torch.empty(n, dtype=torch.float32)
    else:
        a_buf, b_buf = scratch[0][:n], scratch[1][:n]
    a32 = torch.tensor(alpha, dtype=torch.float32)
    d = widen_f32(grpo.reshape(-1), a_buf)
    d.sub_(widen_f32(sft.reshape(-1), b_buf))  # g32 - s32, float32 RNE
    d.mul_(a32)  # a32 * d, a separate rounding (never fused with the add)
    r = widen_f32(target.reshape(-1), b_buf)
    r.add_(d)  # t32 + m
    return round_from_f32(r, out_dtype, out)
