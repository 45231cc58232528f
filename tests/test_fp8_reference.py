"""Proof that tests/fp8_reference.py is right, independently of streammerge.

Against torch where torch implements the same thing (its float8 casts and decodes, its bf16/fp16 rounding), against
tests/reference.py's base contract, and against a second, scalar, block-by-block rendering of the contract written
here with Python loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fp8_reference import (
    E4M3_VALUES,
    E5M2_VALUES,
    Fp8Tensor,
    PlainTensor,
    blend,
    decode_e4m3,
    decode_e5m2,
    dequantize,
    encode_e4m3,
    merge,
    quantize,
    round_to,
    store_scale,
    to_f32,
    widen,
    widen_scale,
)
from reference import hostile_values, round_out

F32_NAN = np.float32(np.nan)
NEGATIVE_NAN_BITS = (0xFFC00000, 0xFFFFFFFF, 0xFF800001)  # x86 arithmetic produces 0xFFC00000 (inf - inf)


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _torch_e4m3(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def _assert_codes_equal(got: np.ndarray, want: np.ndarray, x: np.ndarray) -> None:
    bad = np.flatnonzero(got != want)
    if bad.size:
        i = bad[:8]
        detail = [
            (float(x.flat[j]), hex(int(x.view(np.uint32).flat[j])), int(got.flat[j]), int(want.flat[j])) for j in i
        ]
        raise AssertionError(f"{bad.size} codes differ; first (x, bits, reference, torch): {detail}")


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit patterns, any NaN matching any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)))


# ------------------------------------------------------------------------------------------------ decode


def test_e4m3_table_facts() -> None:
    assert np.isnan(E4M3_VALUES[[0x7F, 0xFF]]).all()
    assert np.isnan(E4M3_VALUES).sum() == 2 and not np.isinf(E4M3_VALUES).any()
    assert E4M3_VALUES[0x7E] == 448 and E4M3_VALUES[0xFE] == -448
    assert np.nanmax(E4M3_VALUES) == 448
    assert E4M3_VALUES[0x01] == 2.0**-9 and E4M3_VALUES[0x08] == 2.0**-6  # smallest subnormal, smallest normal
    assert E4M3_VALUES[0x00] == 0 and E4M3_VALUES[0x80].view(np.uint32) == 0x80000000  # -0.0
    assert np.all(np.diff(E4M3_VALUES[:0x7F]) > 0)  # codes 0x00..0x7E increase


def test_e5m2_table_facts() -> None:
    assert E5M2_VALUES[0x7C] == np.inf and E5M2_VALUES[0xFC] == -np.inf
    assert np.isnan(E5M2_VALUES[[0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]]).all() and np.isnan(E5M2_VALUES).sum() == 6
    assert E5M2_VALUES[0x7B] == 57344 and E5M2_VALUES[0x01] == 2.0**-16


@pytest.mark.parametrize(
    ("decode", "torch_dtype"), [(decode_e4m3, torch.float8_e4m3fn), (decode_e5m2, torch.float8_e5m2)]
)
def test_decoders_equal_torch_for_all_256_codes(decode, torch_dtype) -> None:
    codes = np.arange(256, dtype=np.uint8)
    want = torch.from_numpy(codes).view(torch_dtype).to(torch.float32).numpy()
    assert _same_floats(decode(codes), want)


# ------------------------------------------------------------------------------------------------ encode


def _encoder_inputs() -> np.ndarray:
    finite = E4M3_VALUES[np.isfinite(E4M3_VALUES)].astype(np.float64)
    positive = np.unique(np.abs(finite))
    midpoints = np.concatenate([(positive[:-1] + positive[1:]) / 2, [464.0, 480.0, 496.0, 512.0]]).astype(np.float32)
    assert np.array_equal(midpoints.astype(np.float64)[:-4], (positive[:-1] + positive[1:]) / 2)  # exact in f32
    around = np.concatenate(
        [midpoints, np.nextafter(midpoints, np.float32(np.inf)), np.nextafter(midpoints, np.float32(0))]
    )
    specials = np.concatenate(
        [
            _f32([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x00000001, 0x80000001]),
            _f32([0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x80000000, 0x00000000]),
            np.array([448, 449, 463.99, 2**-10, 1.5 * 2**-10, 2**-11, 1e-30], dtype=np.float32),
        ]
    )
    rng = np.random.default_rng(12)
    every_exponent = rng.integers(0, 2**32, size=500_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    in_range = (rng.choice([-1.0, 1.0], 500_000) * 2.0 ** rng.uniform(-12, 10, 500_000)).astype(np.float32)
    values = np.concatenate([around, -around, E4M3_VALUES, specials, -specials, every_exponent, in_range])
    return values.astype(np.float32)


def test_encoder_equals_torch_except_the_sign_of_nan() -> None:
    x = _encoder_inputs()
    assert x.size > 1_000_000
    got, want = encode_e4m3(x), _torch_e4m3(x)
    finite_or_inf = ~np.isnan(x)
    _assert_codes_equal(got[finite_or_inf], want[finite_or_inf], x[finite_or_inf])
    # NaN: the contract writes 0x7F for every NaN; torch keeps the sign bit (0xFF for x86's default NaN).
    nan = np.isnan(x)
    assert (got[nan] == 0x7F).all()
    assert set(np.unique(want[nan])) == {0x7F, 0xFF}
    assert (want[nan & (x.view(np.uint32) >> 31 == 0)] == 0x7F).all()


def test_encoder_measured_cases() -> None:
    cases = [
        (np.inf, 0x7E),
        (-np.inf, 0xFE),
        (464.0, 0x7E),
        (-464.0, 0xFE),
        (1e30, 0x7E),
        (np.nan, 0x7F),
        (-0.0, 0x80),
        (0.0, 0x00),
        (2.0**-10, 0x00),  # exactly halfway between 0 and 2^-9: ties to the even code 0x00
        (1.5 * 2.0**-10, 0x01),
        (-(2.0**-11), 0x80),  # rounds to zero and keeps its sign
        (448.0, 0x7E),
        (432.0, 0x7E),  # halfway between 416 (0x7D, odd) and 448 (0x7E, even)
        (7.5 * 2.0**-9, 0x08),  # halfway between the largest subnormal (0x07) and the smallest normal (0x08)
    ]
    x = np.array([v for v, _ in cases], dtype=np.float32)
    want = [hex(c) for _, c in cases]
    assert [hex(c) for c in encode_e4m3(x)] == want
    assert [hex(c) for c in _torch_e4m3(x)] == want
    assert encode_e4m3(_f32(NEGATIVE_NAN_BITS)).tolist() == [0x7F] * 3


def test_encode_decode_round_trips_every_finite_code() -> None:
    codes = np.array([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=np.uint8)
    assert np.array_equal(encode_e4m3(decode_e4m3(codes)), codes)


# ------------------------------------------------------------------------------------------------ plain rounding


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_round_to_equals_the_base_reference_and_torch(dtype: str) -> None:
    rng = np.random.default_rng(3)
    r = widen(hostile_values("F32", 200_000, rng), "F32")
    r = np.concatenate([r, (rng.standard_normal(100_000) * 1e5).astype(np.float32), _f32([0x7F7FFFFF, 0x477FF000])])
    got = round_to(r, dtype)
    assert np.array_equal(got, round_out(r, dtype))
    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    view = torch.int16 if dtype != "F32" else torch.int32
    want = torch.from_numpy(r).to(torch_dtype).view(view).numpy().view(got.dtype).copy()
    want[np.isnan(r)] = {"BF16": 0x7FC0, "F16": 0x7E00, "F32": 0x7FC00000}[dtype]
    assert np.array_equal(got, want)


def test_widen_is_exact() -> None:
    bf16 = np.arange(2**16, dtype=np.uint16)
    assert _same_floats(widen(bf16, "BF16"), torch.from_numpy(bf16.view(np.int16)).view(torch.bfloat16).float().numpy())
    assert _same_floats(widen(bf16, "F16"), torch.from_numpy(bf16.view(np.int16)).view(torch.float16).float().numpy())


# ------------------------------------------------------------------------------------------------ scalar contract


def _scalar_merge(target: Fp8Tensor, sft, grpo, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The FP8-output contract again, element by element and block by block with Python loops and numpy scalars."""
    t32, s32, g32 = (_scalar_dequantize(x) for x in (target, sft, grpo))
    rows, cols = target.codes.shape
    br, bc = target.block
    a32 = np.float32(alpha)
    r = np.empty((rows, cols), dtype=np.float32)
    with np.errstate(all="ignore"):
        for i in range(rows):
            for j in range(cols):
                r[i, j] = t32[i, j] + a32 * (g32[i, j] - s32[i, j])
    codes = target.codes.copy()
    scales = target.scale_bits.copy()
    for bi in range(math.ceil(rows / br)):
        for bj in range(math.ceil(cols / bc)):
            block = (slice(bi * br, (bi + 1) * br), slice(bj * bc, (bj + 1) * bc))
            rb, tb = r[block], t32[block]
            if all(float(x) == float(y) for x, y in zip(rb.flat, tb.flat)):
                continue
            amax = max((abs(float(x)) for x in rb.flat if math.isfinite(float(x))), default=0.0)
            with np.errstate(all="ignore"):
                s = np.float32(amax) / np.float32(448)
            if amax == 0 or s == 0:
                s = np.float32(1)
            stored = store_scale(np.array([s], dtype=np.float32), target.scale_dtype)
            divisor = float(widen_scale(stored, target.scale_dtype)[0])
            scales[bi, bj] = stored[0]
            for (i, j), x in np.ndenumerate(rb):
                with np.errstate(all="ignore"):
                    q = np.float32(x) / np.float32(divisor)
                codes[bi * br + i, bj * bc + j] = _scalar_encode(float(q))
    return codes, scales


def _scalar_dequantize(x) -> np.ndarray:
    if isinstance(x, PlainTensor):
        return widen(x.bits, x.dtype)
    rows, cols = x.codes.shape
    out = np.empty((rows, cols), dtype=np.float32)
    scale = widen_scale(x.scale_bits, x.scale_dtype)
    table = E4M3_VALUES if x.fmt == "F8_E4M3" else E5M2_VALUES
    with np.errstate(all="ignore"):
        for i in range(rows):
            for j in range(cols):
                out[i, j] = table[x.codes[i, j]] * scale[i // x.block[0], j // x.block[1]]
    return out


def _scalar_encode(q: float) -> int:
    """Nearest e4m3 value by exhaustive search (ties to the even code), saturating, NaN 0x7F."""
    if math.isnan(q):
        return 0x7F
    sign = 0x80 if math.copysign(1.0, q) < 0 else 0
    m = min(abs(q), 448.0)
    best = min(range(0x7F), key=lambda c: (abs(float(E4M3_VALUES[c]) - m), c % 2))
    return best | sign


def _random_fp8(rng: np.random.Generator, shape, block, scale_dtype="F32", spread=1.0) -> Fp8Tensor:
    x = (rng.standard_normal(shape) * spread).astype(np.float32)
    codes, scales = quantize(x, block, scale_dtype)
    return Fp8Tensor(codes, scales, block, scale_dtype)


def _foreign_fp8(rng: np.random.Generator, shape, block, scale_dtype="F32") -> Fp8Tensor:
    """As another quantizer might write: any codes (NaN too, a block's largest code anywhere), scales of any size,
    one of them zero."""
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    scales = (2.0 ** rng.uniform(-20, 4, grid)).astype(np.float32)
    scales.flat[0] = 0
    return Fp8Tensor(codes, round_to(scales, scale_dtype), block, scale_dtype)


@pytest.mark.parametrize("scale_dtype", ["F32", "BF16"])
@pytest.mark.parametrize(("shape", "block"), [((13, 11), (4, 4)), ((9, 16), (8, 3)), ((5, 7), (128, 128))])
@pytest.mark.parametrize("foreign", [False, True])
def test_vectorized_merge_equals_the_scalar_contract(shape, block, scale_dtype: str, foreign: bool) -> None:
    rng = np.random.default_rng(sum(shape) + block[0])
    target = (_foreign_fp8 if foreign else _random_fp8)(rng, shape, block, scale_dtype)
    sft = _random_fp8(rng, shape, block, scale_dtype)
    grpo_codes = sft.codes.copy()
    grpo_codes[: shape[0] // 2] = rng.integers(0, 256, size=grpo_codes[: shape[0] // 2].shape)  # NaN codes too
    grpo = Fp8Tensor(grpo_codes, sft.scale_bits, block, scale_dtype)
    for alpha in (0.0, 0.5, 1.0, -3.0, 1e30):
        out = merge(target, sft, grpo, alpha)
        codes, scales = _scalar_merge(target, sft, grpo, alpha)
        assert np.array_equal(out.codes, codes), alpha
        assert np.array_equal(out.scale_bits, scales), alpha


# ------------------------------------------------------------------------------------------------ block requant


def test_alpha_zero_reproduces_the_target_bytes() -> None:
    rng = np.random.default_rng(0)
    for scale_dtype in ("F32", "BF16"):
        target = _random_fp8(rng, (300, 200), (128, 128), scale_dtype)
        sft, grpo = (_random_fp8(rng, (300, 200), (128, 128), scale_dtype) for _ in range(2))
        out = merge(target, sft, grpo, 0.0)
        assert np.array_equal(out.codes, target.codes) and np.array_equal(out.scale_bits, target.scale_bits)
        # sft == grpo: the same at any alpha.
        out = merge(target, sft, sft, 1.7)
        assert np.array_equal(out.codes, target.codes) and np.array_equal(out.scale_bits, target.scale_bits)


@pytest.mark.parametrize("scale_dtype", ["F32", "BF16"])
def test_requantizing_the_rules_own_output_is_the_identity(scale_dtype: str) -> None:
    """A block quantized by this rule has its largest code at 448 and f32(f32(448 s) / 448) == s for every s the
    rule produces, so quantizing its values again gives the same bytes."""
    rng = np.random.default_rng(1)
    target = _random_fp8(rng, (256, 256), (8, 8), scale_dtype, spread=0.02)
    codes, scales = quantize(to_f32(target), target.block, scale_dtype)
    assert np.array_equal(codes, target.codes) and np.array_equal(scales, target.scale_bits)


def test_requantizing_another_quantizers_output_is_not_the_identity() -> None:
    """Why the unchanged rule exists: a publisher's blocks need not have their largest code at 448."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 0x70, size=(64, 64), dtype=np.uint8) | (rng.integers(0, 2, (64, 64)) << 7).astype(np.uint8)
    scales = (np.abs(rng.standard_normal((8, 8))) * 1e-3).astype(np.float32).view(np.uint32)
    target = Fp8Tensor(codes, scales, (8, 8))
    fresh_codes, fresh_scales = quantize(to_f32(target), target.block, "F32")
    assert np.mean(fresh_scales != scales) > 0.9 and np.mean(fresh_codes != codes) > 0.5
    sft = _random_fp8(rng, (64, 64), (8, 8))
    out = merge(target, sft, sft, 0.3)
    assert np.array_equal(out.codes, codes) and np.array_equal(out.scale_bits, scales)


def test_only_touched_blocks_change() -> None:
    rng = np.random.default_rng(2)
    block = (128, 128)
    target = _random_fp8(rng, (300, 260), block)
    sft = _random_fp8(rng, (300, 260), block)
    g32 = to_f32(sft).copy()
    g32[130:140, 10:20] += np.float32(0.5)  # inside block (1, 0) only
    g32[260, 140] += np.float32(100)  # an outlier in edge block (2, 1): its scale must grow
    grpo = PlainTensor(g32.view(np.uint32), "F32")
    out = merge(target, sft, grpo, 1.0)
    changed = {(i, j) for i in range(3) for j in range(3) if out.scale_bits[i, j] != target.scale_bits[i, j]}
    assert (2, 1) in changed and changed <= {(1, 0), (2, 1)}
    diff = {(i // 128, j // 128) for i, j in np.argwhere(out.codes != target.codes)}
    assert diff == {(1, 0), (2, 1)}


def test_edge_blocks_take_their_own_amax() -> None:
    rows, cols, block = 300, 200, (128, 128)  # grid 3 x 2, last row of blocks 44 rows, last column 72 columns
    r = np.full((rows, cols), 0.25, dtype=np.float32)
    peaks = {(0, 0): 1.0, (0, 1): 2.0, (1, 0): 3.0, (1, 1): 4.0, (2, 0): 5.0, (2, 1): 6.0}
    for (bi, bj), v in peaks.items():
        r[min(bi * 128 + 127, rows - 1), min(bj * 128 + 127, cols - 1)] = v  # the block's last element
    codes, scales = quantize(r, block)
    expected = np.array([[peaks[i, j] for j in range(2)] for i in range(3)], dtype=np.float32) / np.float32(448)
    assert np.array_equal(widen_scale(scales, "F32"), expected)
    assert codes[rows - 1, cols - 1] == 0x7E and codes[127, 127] == 0x7E
    assert codes.shape == (rows, cols)


def test_all_zero_block_gets_scale_one() -> None:
    r = np.zeros((256, 128), dtype=np.float32)
    r[128:] = 1.0
    r[5, 5] = -0.0
    for scale_dtype, one in (("F32", 0x3F800000), ("BF16", 0x3F80)):
        codes, scales = quantize(r, (128, 128), scale_dtype)
        assert scales[0, 0] == one
        assert codes[5, 5] == 0x80 and (np.delete(codes[:128].ravel(), 5 * 128 + 5) == 0).all()
    # An underflowing scale (amax / 448 == 0 in float32) is 1 as well.
    tiny = np.full((4, 4), _f32(1)[()], dtype=np.float32)  # the smallest subnormal
    codes, scales = quantize(tiny, (4, 4))
    assert scales[0, 0] == 0x3F800000 and (codes == 0).all()


def test_outlier_dominates_the_block() -> None:
    rng = np.random.default_rng(4)
    r = (rng.standard_normal((128, 128)) * 0.01).astype(np.float32)
    r[17, 99] = 300.0
    codes, scales = quantize(r, (128, 128))
    assert widen_scale(scales, "F32")[0, 0] == np.float32(300) / np.float32(448)
    assert codes[17, 99] == 0x7E
    # The others shrink to a few codes near zero: below 0.25 (code 0x28) after scaling, most of them subnormal.
    small = np.delete(codes.ravel(), 17 * 128 + 99) & 0x7F
    assert small.max() < 0x28 and np.mean(small < 0x08) > 0.25


def test_nan_and_inf_inside_a_block() -> None:
    r = np.linspace(-2, 3, 64, dtype=np.float32).reshape(8, 8)
    r[1, 1], r[2, 2], r[3, 3] = np.nan, np.inf, _f32(0xFFC00000)[()]
    codes, scales = quantize(r, (8, 8))
    assert widen_scale(scales, "F32")[0, 0] == np.float32(3) / np.float32(448)  # NaN and inf left out of amax
    assert codes[1, 1] == 0x7F and codes[3, 3] == 0x7F and codes[2, 2] == 0x7E
    # An all-NaN block has no finite element: scale 1.
    codes, scales = quantize(np.full((8, 8), np.nan, dtype=np.float32), (8, 8))
    assert scales[0, 0] == 0x3F800000 and (codes == 0x7F).all()
    # A NaN in the target's block makes r != t32 there, so that block is requantized (the result is still 0x7F).
    target = Fp8Tensor(np.array([[0x7F, 0x38]], dtype=np.uint8), np.array([[0x3F800000]], dtype=np.uint32), (1, 2))
    out = merge(target, target, target, 0.0)
    assert out.codes.tolist() == [[0x7F, 0x7E]] and widen_scale(out.scale_bits, "F32")[0, 0] == np.float32(1 / 448)


def test_bf16_scales_are_rounded_and_the_stored_value_divides() -> None:
    rng = np.random.default_rng(5)
    r = (rng.standard_normal((64, 64)) * 0.37).astype(np.float32)
    codes, scales = quantize(r, (32, 32), "BF16")
    assert scales.dtype == np.uint16
    exact = np.array(
        [[np.abs(r[i : i + 32, j : j + 32]).max() for j in (0, 32)] for i in (0, 32)], dtype=np.float32
    ) / np.float32(448)
    want = torch.from_numpy(exact).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(scales, want)
    divisor = np.repeat(np.repeat(widen_scale(scales, "BF16"), 32, 0), 32, 1)
    assert np.array_equal(codes, _torch_e4m3(r / divisor))
    assert not np.array_equal(codes, _torch_e4m3(r / np.repeat(np.repeat(exact, 32, 0), 32, 1)))


def test_dequantize_is_one_float32_multiply() -> None:
    rng = np.random.default_rng(6)
    codes = rng.integers(0, 256, size=(20, 30), dtype=np.uint8)
    scales = (rng.standard_normal((3, 2)) * 1e-3).astype(np.float32).view(np.uint32)
    got = dequantize(codes, scales, (8, 16))
    want = (
        torch.from_numpy(codes).view(torch.float8_e4m3fn).float()
        * torch.from_numpy(np.repeat(np.repeat(scales.view(np.float32), 8, 0), 16, 1)[:20, :30].copy())
    ).numpy()
    assert _same_floats(got, want)
    e5m2 = dequantize(codes, scales, (8, 16), fmt="F8_E5M2")
    assert _same_floats(e5m2, decode_e5m2(codes) * np.repeat(np.repeat(scales.view(np.float32), 8, 0), 16, 1)[:20, :30])
    # A zero scale dequantizes to zeros (what a sparse file's holes hold), signed as the code is.
    zeros = dequantize(codes[:8, :16] & 0x7E, np.zeros((1, 1), dtype=np.uint32), (8, 16))
    assert (zeros == 0).all()


def test_blend_is_three_rounded_float32_steps() -> None:
    rng = np.random.default_rng(7)
    t, s, g = (rng.standard_normal(100_000).astype(np.float32) for _ in range(3))
    a = 0.3
    want = torch.from_numpy(t) + torch.tensor(a, dtype=torch.float32) * (torch.from_numpy(g) - torch.from_numpy(s))
    got = blend(t, s, g, a)
    assert np.array_equal(got, t + np.float32(a) * (g - s))
    assert np.array_equal(got, want.numpy())  # three separate torch ops: nothing to fuse


# ------------------------------------------------------------------------------------------------ outputs


def test_dequantized_output_is_one_rounding_from_r() -> None:
    rng = np.random.default_rng(8)
    target, sft, grpo = (_random_fp8(rng, (130, 140), (128, 128)) for _ in range(3))
    r = blend(to_f32(target), to_f32(sft), to_f32(grpo), 0.75)
    for dtype in ("BF16", "F16", "F32"):
        out = merge(target, sft, grpo, 0.75, out_dtype=dtype)
        assert out.dtype == dtype and np.array_equal(out.bits, round_out(r, dtype))
    # alpha 0 with a dequantized output: the target's values, rounded once.
    out = merge(target, sft, grpo, 0.0, out_dtype="F32")
    assert np.array_equal(out.bits, to_f32(target).view(np.uint32))


def test_mixed_targets() -> None:
    rng = np.random.default_rng(9)
    shape, block = (200, 150), (128, 128)
    fp8 = [_random_fp8(rng, shape, block, "BF16") for _ in range(3)]
    bf16 = [PlainTensor(round_to((rng.standard_normal(shape) * 0.02).astype(np.float32), "BF16"), "BF16")]
    bf16 += [PlainTensor(round_to(to_f32(x), "BF16"), "BF16") for x in fp8[1:]]
    # A BF16 target with FP8 sft and grpo: BF16 output, one rounding from r.
    out = merge(bf16[0], fp8[1], fp8[2], 0.5)
    r = blend(widen(bf16[0].bits, "BF16"), to_f32(fp8[1]), to_f32(fp8[2]), 0.5)
    assert isinstance(out, PlainTensor) and np.array_equal(out.bits, round_out(r, "BF16"))
    # An FP8 target with BF16 sft and grpo: FP8 output on the target's grid, its scale dtype.
    out = merge(fp8[0], bf16[1], bf16[2], 0.5)
    assert isinstance(out, Fp8Tensor) and out.scale_dtype == "BF16" and out.scale_bits.dtype == np.uint16
    r = blend(to_f32(fp8[0]), widen(bf16[1].bits, "BF16"), widen(bf16[2].bits, "BF16"), 0.5)
    codes, scales = quantize(r, block, "BF16")
    assert np.array_equal(out.codes, codes) and np.array_equal(out.scale_bits, scales)
    # FP8 target, alpha 0, BF16 sft/grpo: the target's bytes.
    out = merge(fp8[0], bf16[1], bf16[2], 0.0)
    assert np.array_equal(out.codes, fp8[0].codes) and np.array_equal(out.scale_bits, fp8[0].scale_bits)


def test_saturating_values_in_r() -> None:
    target = Fp8Tensor(np.full((2, 2), 0x38, dtype=np.uint8), np.array([[0x3F800000]], dtype=np.uint32), (2, 2))
    huge = PlainTensor(_f32([[0x7F7FFFFF, 0x7F800000], [0xFF800000, 0x00000000]]).view(np.uint32), "F32")
    zero = PlainTensor(np.zeros((2, 2), dtype=np.uint32), "F32")
    out = merge(target, zero, huge, 1.0)
    # r = 1 + FLT_MAX = FLT_MAX, inf, -inf, 1: amax over finite = FLT_MAX.
    assert widen_scale(out.scale_bits, "F32")[0, 0] == np.float32(np.finfo(np.float32).max) / np.float32(448)
    assert out.codes.tolist() == [[0x7E, 0x7E], [0xFE, 0x00]]
    # Overflow in the blend: inf - inf = NaN (x86's negative default NaN) encodes 0x7F.
    inf = PlainTensor(np.full((2, 2), 0x7F800000, dtype=np.uint32), "F32")
    out = merge(target, inf, inf, 1.0)
    assert (out.codes == 0x7F).all() and out.scale_bits[0, 0] == 0x3F800000
