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


# ------------------------------------------------------------------------------------------------ block-scaled FP8
# The FP8 half of the contract (docs/numerics.md, "Block-scaled FP8"): every input is dequantized to float32, the
# float32 contract above gives r, and an FP8 output requantizes r on the target's block grid. The CUDA engine's
# Triton kernels (kernels/triton_fp8.py) implement the same two functions with the same signatures.

# The FP8 formats inputs may come in, by safetensors code; the output is always e4m3fn.
FP8_TORCH_DTYPES: dict[str, torch.dtype] = {code: torch_dtype(code) for code in ("F8_E4M3", "F8_E5M2")}
# The block scale dtypes (DeepSeek writes F32; some publishers BF16), as torch dtypes.
SCALE_TORCH_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
E4M3_MAX = 448.0
E4M3_NAN_CODE = 0x7F  # every NaN, whatever its sign (torch's cast keeps the sign: 0xFF for x86's default NaN)
E4M3_MAX_CODE = 0x7E  # 448: finite values beyond it and infinities saturate here (0xFE for the negative side)
_F32_448 = 0x43E00000  # 448.0 as float32 bits
_F32_E4M3_MIN_NORMAL_EXP = 121  # float32 biased exponent of 2**-6, e4m3fn's smallest normal
_E4M3_REBIAS = (127 - 7) << 3  # float32 exponent bias (127) to e4m3 (7), in the position of an e4m3 exponent


def block_regions(rows: int, cols: int, block: tuple[int, int]):
    """The rectangles of a ``[rows, cols]`` tensor that hold blocks of one size: the full blocks, and the partial
    edge blocks of the last block row and column. Yields ``(rows, cols, grid rows, grid cols, block rows, block
    cols)``, the first four as slices (element and block-grid coordinates).

    A rectangle viewed as ``[grid rows, block rows, grid cols, block cols]`` lets one broadcast op per rectangle
    work on every block at once (:func:`blocked`)."""
    br, bc = block
    full_r, full_c = rows // br, cols // bc
    row_parts = ([(0, full_r * br, br, 0, full_r)] if full_r else []) + (
        [(full_r * br, rows, rows - full_r * br, full_r, full_r + 1)] if rows % br else []
    )
    col_parts = ([(0, full_c * bc, bc, 0, full_c)] if full_c else []) + (
        [(full_c * bc, cols, cols - full_c * bc, full_c, full_c + 1)] if cols % bc else []
    )
    for r0, r1, h, g0, g1 in row_parts:
        for c0, c1, w, k0, k1 in col_parts:
            yield slice(r0, r1), slice(c0, c1), slice(g0, g1), slice(k0, k1), h, w


def blocked(x: torch.Tensor, region) -> torch.Tensor:
    """The rectangle ``region`` (from :func:`block_regions`) of 2-D ``x`` as a ``[gr, h, gc, w]`` view (no copy)."""
    rs, cs, gs, ks, h, w = region
    return x[rs, cs].view(gs.stop - gs.start, h, ks.stop - ks.start, w)


def _check_grid(what: str, q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    if q.dim() != 2:
        raise ValueError(f"{what}: FP8 codes must be 2-D, got shape {tuple(q.shape)}")
    grid = (-(-q.shape[0] // block[0]), -(-q.shape[1] // block[1]))
    if tuple(scale.shape) != grid:
        raise ValueError(f"{what}: scale shape {tuple(scale.shape)} is not the {grid} grid of {tuple(q.shape)}")
    if scale.dtype not in SCALE_TORCH_DTYPES:
        raise ValueError(f"{what}: scales must be float32 or bfloat16, got {scale.dtype}")


def dequantize_fp8(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    fmt: str = "F8_E4M3",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-scaled FP8 codes to float32: ``x32 = decode(q) * s32``, one float32 multiply (RNE) per element.

    Args:
        q (`torch.Tensor`): uint8 codes ``[rows, C]`` (contiguous), of safetensors dtype ``fmt``.
        scale (`torch.Tensor`): float32 or bfloat16 ``[ceil(rows / br), ceil(C / bc)]``, widened exactly.
        block (`tuple[int, int]`): rows and columns per block (edge blocks partial).
        fmt (`str`): "F8_E4M3" (e4m3fn) or "F8_E5M2".
        out (`torch.Tensor`, *optional*): float32 ``[rows, C]`` to write into.

    Returns:
        `torch.Tensor`: float32 ``[rows, C]`` (``out`` when given).
    """
    _check_grid("dequantize_fp8", q, scale, block)
    rows, cols = q.shape
    if out is None:
        out = torch.empty((rows, cols), dtype=torch.float32, device=q.device)
    # The decode is exact (every FP8 value is a float32 value): a 256-entry table of torch's own casts, gathered,
    # 3.4x faster than the cast itself on the development machine (0.25 vs 0.85 ms per 256 Ki codes).
    torch.index_select(decode_table(fmt, q.device), 0, q.reshape(-1).long(), out=out.view(-1))
    s32 = scale if scale.dtype == torch.float32 else scale.to(torch.float32)
    for region in block_regions(rows, cols, block):
        blocked(out, region).mul_(s32[region[2], region[3]][:, None, :, None])
    return out


_DECODE_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def decode_table(fmt: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 value of each of the 256 codes of FP8 format ``fmt`` (torch's exact cast; 0x7F/0xFF NaN for e4m3)."""
    key = (fmt, str(device))
    if key not in _DECODE_TABLES:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        _DECODE_TABLES[key] = codes.view(FP8_TORCH_DTYPES[fmt]).to(torch.float32).to(device)
    return _DECODE_TABLES[key]


def requantize_fp8(
    r: torch.Tensor,
    t_q: torch.Tensor,
    t_scale: torch.Tensor,
    block: tuple[int, int],
    out_q: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 output of merged float32 values ``r`` on the target's block grid and scale dtype.

    Per block: if every ``r == t32`` (IEEE: +-0 equal, NaN never), the target's codes and scale unchanged; else
    ``amax`` = max |r| over the block's finite elements, ``s = f32(amax / 448)`` stored in the scale dtype (RNE),
    1 where amax is 0 or the stored scale is 0, and ``q = e4m3(f32(r / s_stored))`` (:func:`encode_e4m3`).

    Args:
        r (`torch.Tensor`): float32 ``[rows, C]``.
        t_q (`torch.Tensor`): the target's uint8 e4m3fn codes ``[rows, C]``.
        t_scale (`torch.Tensor`): the target's scales ``[ceil(rows / br), ceil(C / bc)]``, float32 or bfloat16; ``t32``
            is recomputed from ``t_q`` and ``t_scale``.
        block (`tuple[int, int]`): the target's block.
        out_q (`torch.Tensor`, *optional*): uint8 ``[rows, C]`` for the codes.
        out_scale (`torch.Tensor`, *optional*): ``t_scale``'s dtype and shape, for the scales.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the codes and the scales (``out_q``/``out_scale`` when given).
    """
    _check_grid("requantize_fp8", t_q, t_scale, block)
    rows, cols = r.shape
    t32 = dequantize_fp8(t_q, t_scale, block, "F8_E4M3")
    grid = tuple(t_scale.shape)
    changed = torch.zeros(grid, dtype=torch.bool)
    amax = torch.zeros(grid, dtype=torch.float32)
    # NaN != NaN: a block holding a NaN always counts as changed. As uint8, a block's maximum is its "any" (the bool
    # reduction over a blocked view ran 4x slower).
    differs = (r != t32).view(torch.uint8)
    magnitude = r.abs().nan_to_num_(nan=0.0, posinf=0.0)  # non-finite elements do not count towards amax
    del t32
    regions = list(block_regions(rows, cols, block))
    for region in regions:
        gs, ks = region[2], region[3]
        changed[gs, ks] = blocked(differs, region).amax(dim=(1, 3)).bool()
        amax[gs, ks] = blocked(magnitude, region).amax(dim=(1, 3))
    del differs, magnitude
    stored = store_scale(amax.div(E4M3_MAX), t_scale.dtype)  # IEEE float32 division (RNE), then RNE to the dtype
    stored.masked_fill_((amax == 0) | (stored == 0), 1.0)  # the rule applies to the stored value: never divide by 0
    divisor = stored.to(torch.float32)
    scaled = torch.empty_like(r)
    for region in regions:
        torch.div(blocked(r, region), divisor[region[2], region[3]][:, None, :, None], out=blocked(scaled, region))
    codes = encode_e4m3(scaled)
    del scaled
    if out_q is None:
        out_q = torch.empty((rows, cols), dtype=torch.uint8)
    for region in regions:
        # codes where the block changed, the target's where it did not: codes + (t_q - codes) * unchanged, in
        # uint8 (mod 256, exact); 6x faster than torch.where with a broadcast block mask
        unchanged = (~changed[region[2], region[3]]).to(torch.uint8)[:, None, :, None]
        dst, new = blocked(out_q, region), blocked(codes, region)
        torch.sub(blocked(t_q, region), new, out=dst)
        dst.mul_(unchanged).add_(new)
    if out_scale is None:
        out_scale = torch.empty_like(t_scale)
    torch.where(changed, stored, t_scale, out=out_scale)
    return out_q, out_scale


def store_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 scales in the scale dtype: as they are (float32) or rounded to nearest even (bfloat16)."""
    if dtype == torch.float32:
        return s
    return round_from_f32_exact(s.clone(), "BF16")  # amax is finite, so s is: no NaN to canonicalise


def encode_e4m3(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 to e4m3fn codes (uint8): round to nearest even, finite values beyond +-448 and infinities saturate to
    +-448 (0x7E / 0xFE), every NaN is 0x7F, the sign is kept (-0.0 is 0x80).

    torch's cast (after a clamp to +-448 and a NaN fix-up) is used when a once-per-process self-test shows it gives
    the integer path's bytes (:func:`fast_e4m3_is_exact`), else the integer path :func:`encode_e4m3_exact`."""
    if x.dtype != torch.float32:
        raise TypeError(f"encode_e4m3 needs float32 input, got {x.dtype}")
    if not fast_e4m3_is_exact():
        res = encode_e4m3_exact(x)
        if out is None:
            return res
        out.copy_(res)
        return out
    return _encode_e4m3_fast(x, out)


def _encode_e4m3_fast(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    # Saturation by clamping first: older torch casts values from 480 up to NaN. clamp keeps NaN a NaN.
    out.view(torch.float8_e4m3fn).copy_(x.clamp(-E4M3_MAX, E4M3_MAX))
    if x.numel() and bool(torch.isfinite(x.sum())):
        return out  # no NaN anywhere (a sum is one read and no allocation; inf or overflow falls through)
    nan = torch.isnan(x)
    if nan.any():
        out.masked_fill_(nan, E4M3_NAN_CODE)
    return out


def encode_e4m3_exact(x: torch.Tensor) -> torch.Tensor:
    """The e4m3fn encoding on the float32 bit pattern with integer operations only (the contract's definition; see
    :func:`encode_e4m3` for the rule)."""
    bits = x.contiguous().view(torch.int32)
    sign = bits.lt(0).to(torch.int32).bitwise_left_shift_(7)
    a = bits.bitwise_and(_F32_ABS_MASK)
    nan = a.gt(_F32_INF)
    # Normal range (|x| >= 2**-6): add half an e4m3 ulp minus one plus the lowest kept bit, keep exponent and 3
    # mantissa bits, rebias; a carry into the exponent is right.
    normal = a.bitwise_right_shift(20).bitwise_and_(1).add_(0x7FFFF).add_(a).bitwise_right_shift_(20)
    normal.sub_(_E4M3_REBIAS)
    # Subnormal range: units of 2**-9, rounded to nearest even. value = mant * 2**(exp - 150), so the count is
    # mant >> (141 - exp); 8 units is 2**-6, the smallest normal, whose code is 0x08 as it should be.
    exp = a.bitwise_right_shift(23)
    mant = a.bitwise_and(0x7FFFFF).bitwise_or_(0x800000)
    shift = exp.neg().add_(141).clamp_(0, 31)
    q = mant.bitwise_right_shift(shift)
    rem = mant.sub(q.bitwise_left_shift(shift))
    half = torch.ones_like(shift).bitwise_left_shift_(shift.sub(1).clamp_(min=0))
    round_up = rem.gt(half).logical_or_(rem.eq(half).logical_and_(q.bitwise_and(1).bool()))
    sub = q.add_(round_up.to(torch.int32))
    sub.masked_fill_(exp.eq(0), 0)  # float32 zeros and subnormals (< 2**-126) round to zero
    code = torch.where(exp.lt(_F32_E4M3_MIN_NORMAL_EXP), sub, normal)
    code.masked_fill_(a.ge(_F32_448).logical_or_(code.gt(E4M3_MAX_CODE)), E4M3_MAX_CODE)  # saturate
    code.bitwise_or_(sign)
    code.masked_fill_(nan, E4M3_NAN_CODE)
    return code.to(torch.uint8).reshape(x.shape)


_FAST_E4M3_OK: list[bool] = []


def fast_e4m3_is_exact() -> bool:
    """Whether torch's float32 -> e4m3fn cast (clamped, NaN fixed up) equals :func:`encode_e4m3_exact` here.

    Checked once per process on every float32 high half (sign, exponent, 7 mantissa bits) with the low halves that
    decide a rounding (0, ties, just below/above, all ones) and random ones: every e4m3 tie, normal and subnormal,
    and the saturation boundaries. An odd length exercises both torch's vectorised loop and its scalar tail."""
    if not _FAST_E4M3_OK:
        hi = torch.arange(0, 1 << 16, dtype=torch.int64) << 16
        lows = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF])
        rnd = torch.randint(0, 1 << 16, (hi.numel(),), generator=torch.Generator().manual_seed(0))
        bits = torch.cat([(hi[:, None] | lows[None, :]).reshape(-1), hi | rnd])
        bits = ((bits + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32)[:-1]  # odd length
        x = bits.view(torch.float32)
        _FAST_E4M3_OK.append(bool(torch.equal(_encode_e4m3_fast(x, None), encode_e4m3_exact(x))))
    return _FAST_E4M3_OK[0]
