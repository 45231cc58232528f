"""Byte-exact tests of the Triton FP8 kernels (kernels/triton_fp8.py) against the independent numpy reference.

Where CUDA is available the kernels are compiled and run on the GPU; elsewhere they run on CPU tensors under
``TRITON_INTERPRET=1``, set here before ``streammerge.kernels.triton_fp8`` is first imported (the module is reloaded
if something imported it earlier without the interpreter), as tests/test_triton_kernel.py does. Outputs are compared
bit for bit with ``tests/fp8_reference.py`` (numpy, no streammerge code), under the lead's decisions for issue 12
(every NaN code is 0x7F, and the "scale 1.0" rule applies to the *stored* scale: a BF16 underflow stores 1.0, not
0), and with the CPU engine's torch functions in ``streammerge.kernels.reference``.
The compiled-PTX test needs no GPU: it compiles for sm_90 and reads the PTX.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed")

# tests/ has no __init__.py: pytest's default 'prepend' import mode puts it on sys.path.
import fp8_reference as ref  # noqa: E402

from streammerge.kernels import reference as torch_ref  # noqa: E402
from streammerge.kernels import triton_fp8 as tf  # noqa: E402

if not CUDA and not tf.INTERPRETED:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is set to something other than 1 and there is no GPU", allow_module_level=True)
    # Imported earlier (by another test module) before TRITON_INTERPRET was set: decorate the kernels again.
    tf = importlib.reload(tf)

DEVICE = "cuda" if CUDA else "cpu"
SCALE_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16}
SCALE_SIGNED = {"F32": np.int32, "BF16": np.int16}
SCALE_TORCH_BITS = {"F32": torch.int32, "BF16": torch.int16}
SCALE_UNSIGNED = {"F32": np.uint32, "BF16": np.uint16}
F32_NAN = ref.CANONICAL_NAN["F32"]
BLOCK = (128, 128)


def seed_for(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def f32_bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


def from_bits(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


# ------------------------------------------------------------------------------------------------ tensors <-> bits


def codes_tensor(codes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)).to(DEVICE)


def scale_tensor(scale_bits: np.ndarray, scale_dtype: str) -> torch.Tensor:
    raw = np.ascontiguousarray(scale_bits).astype(SCALE_UNSIGNED[scale_dtype]).view(SCALE_SIGNED[scale_dtype])
    return torch.from_numpy(raw.copy()).view(SCALE_TORCH[scale_dtype]).to(DEVICE)


def f32_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).copy()).to(DEVICE)


def bits_of_f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().contiguous().view(torch.int32).numpy().view(np.uint32)


def bits_of_scale(x: torch.Tensor, scale_dtype: str) -> np.ndarray:
    return x.detach().cpu().contiguous().view(SCALE_TORCH_BITS[scale_dtype]).numpy().view(SCALE_UNSIGNED[scale_dtype])


def bits_of_codes(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().contiguous().numpy()


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str, inputs: dict[str, np.ndarray], show: int = 8):
    """Compare bit patterns; on mismatch name the first differing [row, col] with got/expected and the inputs there.

    ``inputs`` are arrays of got's shape (per element) or of the block grid's (per block): each is shown at the
    element's index, or at its block's index when given as ``(array, block)``.
    """
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = np.argwhere(got != want)
    if bad.size == 0:
        return
    width = got.itemsize * 2
    lines = [f"{what}: {len(bad)} of {got.size} elements differ; first {min(show, len(bad))}:"]
    for idx in bad[:show]:
        idx = tuple(int(i) for i in idx)
        shown = []
        for name, arr in inputs.items():
            arr, block = arr if isinstance(arr, tuple) else (arr, None)
            at = idx if block is None else tuple(i // b for i, b in zip(idx, block))
            v = arr[at]
            shown.append(f"{name}=0x{int(v):0{arr.itemsize * 2}x}" + _as_float(v))
        lines.append(
            f"  {list(idx)} got=0x{int(got[idx]):0{width}x} want=0x{int(want[idx]):0{width}x} {' '.join(shown)}"
        )
    pytest.fail("\n".join(lines))


def _as_float(v) -> str:
    if v.dtype == np.uint32:
        return f"({float(v.view(np.float32))!r})"
    if v.dtype == np.uint16:
        return f"({float((np.uint32(v) << np.uint32(16)).view(np.float32))!r})"
    return ""


# ------------------------------------------------------------------------------------------------ expected bytes


def expected_dequantize(codes, scale_bits, block, scale_dtype, fmt) -> np.ndarray:
    """fp8_reference.dequantize as float32 bits, every NaN the canonical 0x7FC00000 (the kernel's choice: NaN bits
    of float32 arithmetic differ between x86 and GPUs, and the output never depends on them)."""
    x = ref.dequantize(codes, scale_bits, block, scale_dtype, fmt)
    bits = x.view(np.uint32).copy()
    bits[np.isnan(x)] = F32_NAN
    return bits


def expected_requantize(r: np.ndarray, target: ref.Fp8Tensor) -> tuple[np.ndarray, np.ndarray]:
    """fp8_reference.requantize: codes and scale bits (the "scale 1.0" rule on the stored scale)."""
    out = ref.requantize(r, target)
    return out.codes, out.scale_bits


def _canonical_nan(bits: np.ndarray) -> np.ndarray:
    bits = bits.copy()
    bits[(bits & 0x7FFFFFFF) > 0x7F800000] = F32_NAN
    return bits


def check_dequantize(codes, scale_bits, block, scale_dtype, fmt, label: str = "") -> None:
    got = tf.dequantize_fp8(codes_tensor(codes), scale_tensor(scale_bits, scale_dtype), block, fmt)
    assert got.dtype == torch.float32 and tuple(got.shape) == codes.shape and got.device.type == DEVICE
    want = expected_dequantize(codes, scale_bits, block, scale_dtype, fmt)
    what = f"dequantize {fmt} scale={scale_dtype} shape={codes.shape} block={block} {label}"
    inputs = {"q": codes, "scale": (scale_bits, block)}
    assert_bits_equal(bits_of_f32(got), want, what, inputs)
    # The CPU engine's torch function, NaN bits aside (its NaNs keep x86's payloads; no output depends on them).
    cpu = torch_ref.dequantize_fp8(codes_tensor(codes).cpu(), scale_tensor(scale_bits, scale_dtype).cpu(), block, fmt)
    assert_bits_equal(bits_of_f32(got), _canonical_nan(bits_of_f32(cpu)), f"{what} vs the torch function", inputs)


def check_requantize(r: np.ndarray, target: ref.Fp8Tensor, label: str = "") -> tuple[np.ndarray, np.ndarray]:
    sd, block = target.scale_dtype, target.block
    got_q, got_s = tf.requantize_fp8(
        f32_tensor(r), codes_tensor(target.codes), scale_tensor(target.scale_bits, sd), block
    )
    assert got_q.dtype == torch.uint8 and got_s.dtype == SCALE_TORCH[sd]
    want_q, want_s = expected_requantize(r, target)
    what = f"requantize scale={sd} shape={r.shape} block={block} {label}"
    r_bits = r.view(np.uint32)
    t_bits = (target.scale_bits, block)
    assert_bits_equal(bits_of_scale(got_s, sd), want_s, f"{what}: scales", {"t_scale": target.scale_bits})
    assert_bits_equal(
        bits_of_codes(got_q), want_q, f"{what}: codes", {"r": r_bits, "t_q": target.codes, "t_scale": t_bits}
    )
    cpu_q, cpu_s = torch_ref.requantize_fp8(
        torch.from_numpy(r.copy()), codes_tensor(target.codes).cpu(), scale_tensor(target.scale_bits, sd).cpu(), block
    )
    assert_bits_equal(bits_of_codes(got_q), bits_of_codes(cpu_q), f"{what}: codes vs the torch function", {"r": r_bits})
    assert_bits_equal(bits_of_scale(got_s, sd), bits_of_scale(cpu_s, sd), f"{what}: scales vs the torch function", {})
    return want_q, want_s


# ------------------------------------------------------------------------------------------------ data


def random_scales(rng: np.random.Generator, grid: tuple[int, int], scale_dtype: str, hostile: bool) -> np.ndarray:
    """Positive scales over a wide range; hostile ones add zero, float32/bf16 subnormals and ones large enough that
    448 * s overflows to infinity."""
    s = (2.0 ** rng.uniform(-16, 2, grid)).astype(np.float32)
    if hostile:
        specials = f32_bits([0.0, 2.0**-149, 2.0**-133, 2.0**-127, 2.0**120, 3.4e38, 1.0, 2.0**-126])
        k = max(1, s.size // 4)
        s.flat[rng.integers(0, s.size, k)] = from_bits(rng.choice(specials, k))
    return ref.store_scale(s, scale_dtype)


def random_target(rng, shape, block, scale_dtype, nan_codes: bool = True) -> ref.Fp8Tensor:
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if not nan_codes:
        codes[(codes & 0x7F) == 0x7F] = 0x7E
    grid = ref.grid_shape(shape, block)
    scales = ref.store_scale((2.0 ** rng.uniform(-14, -2, grid)).astype(np.float32), scale_dtype)
    return ref.Fp8Tensor(codes, scales, block, scale_dtype)


def _encoder_values(rng: np.random.Generator, n_random: int) -> np.ndarray:
    """Inputs to the e4m3 encoder below 448 in magnitude (so a block holding 448 has scale exactly 1): every code's
    value, every midpoint (ties to even) and the float32 neighbours of each, the subnormal range and its ties
    (2**-10 to 0, 1.5 * 2**-10 to 0x01), float32 subnormals, signed zeros, NaN payloads of both signs, infinities."""
    values = ref.E4M3_VALUES[: ref.E4M3_MAX_CODE].astype(np.float64)  # 0 .. 416
    mids = ((values[:-1] + values[1:]) / 2).astype(np.float32)
    mids = np.concatenate([mids, [np.float32(432.0)]])  # the tie between 416 and 448 goes to 448 (0x7E)
    around = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))])
    specials = from_bits(
        [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x00000001, 0x80000001, 0x807FFFFF]
    )
    small = np.array([2.0**-10, 1.5 * 2.0**-10, 2.0**-11, 7.5 * 2.0**-9, 0.0, -0.0, 1e-30, 447.9999], dtype=np.float32)
    spread = (rng.choice([-1.0, 1.0], n_random) * 2.0 ** rng.uniform(-12, 8.8, n_random)).astype(np.float32)
    out = np.concatenate([values.astype(np.float32), around, -around, specials, small, -small, spread])
    with np.errstate(invalid="ignore"):  # widening a signalling NaN raises the invalid flag; it stays NaN
        return out[(np.abs(out.astype(np.float64)) < 448.0) | ~np.isfinite(out)]


def hostile_r(rng: np.random.Generator, target: ref.Fp8Tensor) -> np.ndarray:
    """r over the target's grid with one kind of content per block: unchanged (zeros of either sign), perturbed,
    fresh values, all zero, an outlier, NaN/inf mixed in, all non-finite, exact e4m3 midpoints at scale 1, amax just
    above 448 (a BF16 scale rounds down and values beyond 448 saturate), tiny amax (the scale underflows), random
    bit patterns."""
    t32 = ref.to_f32(target)
    r = t32.copy()
    rows, cols = r.shape
    br, bc = target.block
    gr, gc = ref.grid_shape(r.shape, target.block)
    enc = _encoder_values(rng, 4096)
    kinds = 12
    for bi in range(gr):
        for bj in range(gc):
            sl = (slice(bi * br, min((bi + 1) * br, rows)), slice(bj * bc, min((bj + 1) * bc, cols)))
            view = r[sl]
            n = view.size
            kind = int(rng.integers(0, kinds))
            if kind == 0:  # unchanged, and a zero of the other sign is still equal
                zeros = view == 0
                view[zeros] = np.where(np.signbit(view[zeros]), np.float32(0.0), np.float32(-0.0))
            elif kind == 1:  # a few elements nudged by one ulp
                flat = view.reshape(-1)
                idx = rng.integers(0, n, max(1, n // 50))
                flat[idx] = np.nextafter(flat[idx], np.float32(np.inf))
            elif kind == 2:
                view[...] = (rng.standard_normal(view.shape) * 2.0 ** rng.uniform(-10, 10)).astype(np.float32)
            elif kind == 3:
                view[...] = np.where(rng.random(view.shape) < 0.5, np.float32(0.0), np.float32(-0.0))
            elif kind == 4:  # an outlier dominates: the rest rounds to small codes or zero
                view[...] = rng.standard_normal(view.shape).astype(np.float32)
                view.reshape(-1)[rng.integers(0, n)] = rng.choice([1e30, -3.4e38, 65504.0, 2.0**40])
            elif kind == 5:
                view[...] = rng.standard_normal(view.shape).astype(np.float32)
                idx = rng.integers(0, n, max(1, n // 8))
                view.reshape(-1)[idx] = rng.choice(
                    from_bits([0x7FC00000, 0xFFC00000, 0x7F800000, 0xFF800000]), idx.size
                )
            elif kind == 6:
                view[...] = rng.choice(
                    from_bits([0x7FC00000, 0xFFC00000, 0x7F800000, 0xFF800000, 0x7F800001]), view.shape
                )
            elif kind == 7:  # scale exactly 1: the encoder on its own, midpoints and subnormals
                view[...] = rng.choice(enc, view.shape)
                view.reshape(-1)[rng.integers(0, n)] = rng.choice([448.0, -448.0])
            elif kind == 8:  # amax in (448, 449.75): a BF16 scale rounds to 1.0 and finite values past 448 saturate
                view[...] = rng.uniform(440.0, 449.5, view.shape).astype(np.float32) * rng.choice([-1, 1], view.shape)
                view.reshape(-1)[rng.integers(0, n)] = np.float32(449.5)
            elif kind == 9:  # tiny amax: s = amax / 448 is a float32 subnormal, 0 in BF16 (stored 1.0 instead)
                e = rng.uniform(-149, -120, view.shape)
                view[...] = (2.0**e * rng.choice([-1, 1], view.shape)).astype(np.float32)
            elif kind == 10:
                view[...] = from_bits(rng.integers(0, 2**32, size=view.shape, dtype=np.uint64).astype(np.uint32))
            # kind 11: left exactly equal (NaN codes in the target make such a block change)
    return r


# ------------------------------------------------------------------------------------------------ dequantize

SHAPES = [
    ((3, 5), (2, 2)),
    ((1, 1), (128, 128)),
    ((130, 257), (128, 128)),
    ((64, 48), (16, 16)),
    ((9, 40), (4, 32)),
    ((7, 700), (3, 300)),  # a block wider than a tile row (128): three tiles, the last one masked
    ((300, 5), (256, 1)),  # a block taller than a tile: eight 32-row tiles... of one column
    ((11, 13), (5, 7)),  # blocks that are not powers of two
]


@pytest.mark.parametrize("fmt", ref.FP8_FORMATS)
@pytest.mark.parametrize("scale_dtype", ref.SCALE_DTYPES)
@pytest.mark.parametrize(("shape", "block"), SHAPES, ids=[f"{s[0]}x{s[1]}-b{b[0]}x{b[1]}" for s, b in SHAPES])
def test_dequantize_random(shape, block, scale_dtype: str, fmt: str) -> None:
    rng = np.random.default_rng(seed_for("deq", shape, block, scale_dtype, fmt))
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    scales = random_scales(rng, ref.grid_shape(shape, block), scale_dtype, hostile=True)
    check_dequantize(codes, scales, block, scale_dtype, fmt)


@pytest.mark.parametrize("fmt", ref.FP8_FORMATS)
@pytest.mark.parametrize("scale_dtype", ref.SCALE_DTYPES)
def test_dequantize_every_code_times_hostile_scales(scale_dtype: str, fmt: str) -> None:
    """All 256 codes in each 16x16 block, each block its own scale: 0 (E5M2 inf * 0 is NaN), subnormal scales
    (subnormal products), 1, 2**120 and 3.4e38 (products overflow to infinity), random bf16/f32 patterns."""
    codes = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16), (4, 6))
    specials = [0.0, 2.0**-149, 2.0**-133, 2.0**-126, 1.0, 2.0**-9, 2.0**120, 3.4e38, 0.5, 1.5]
    rng = np.random.default_rng(seed_for("every-code", scale_dtype, fmt))
    s = np.concatenate([specials, 2.0 ** rng.uniform(-30, 30, 24 - len(specials))]).astype(np.float32)
    check_dequantize(codes, ref.store_scale(s.reshape(4, 6), scale_dtype), (16, 16), scale_dtype, fmt)


@pytest.mark.parametrize("scale_dtype", ref.SCALE_DTYPES)
def test_dequantize_deepseek_shape(scale_dtype: str) -> None:
    """576 x 7168 in 128 x 128 blocks: the last band of block rows is half a block (576 = 4.5 x 128)."""
    rng = np.random.default_rng(seed_for("deq-big", scale_dtype))
    shape = (576, 7168)
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    scales = random_scales(rng, ref.grid_shape(shape, BLOCK), scale_dtype, hostile=True)
    check_dequantize(codes, scales, BLOCK, scale_dtype, "F8_E4M3")


def test_dequantize_out_argument() -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, size=(5, 9), dtype=np.uint8)
    scales = random_scales(rng, (3, 3), "F32", hostile=False)
    out = torch.full((5, 9), 7.0, dtype=torch.float32, device=DEVICE)
    res = tf.dequantize_fp8(codes_tensor(codes), scale_tensor(scales, "F32"), (2, 4), "F8_E4M3", out=out)
    assert res is out
    assert_bits_equal(bits_of_f32(out), expected_dequantize(codes, scales, (2, 4), "F32", "F8_E4M3"), "out=", {})


# ------------------------------------------------------------------------------------------------ requantize


@pytest.mark.parametrize("scale_dtype", ref.SCALE_DTYPES)
@pytest.mark.parametrize(("shape", "block"), SHAPES, ids=[f"{s[0]}x{s[1]}-b{b[0]}x{b[1]}" for s, b in SHAPES])
def test_requantize_hostile(shape, block, scale_dtype: str) -> None:
    rng = np.random.default_rng(seed_for("req", shape, block, scale_dtype))
    target = random_target(rng, shape, block, scale_dtype)
    check_requantize(hostile_r(rng, target), target)


@pytest.mark.parametrize("scale_dtype", ref.SCALE_DTYPES)
def test_requantize_every_kind_of_block(scale_dtype: str) -> None:
    """Many small blocks, so every kind of block content in hostile_r appears many times, with and without NaN codes
    in the target."""
    for nan_codes in (True, False):
        rng = np.random.default_rng(seed_for("kinds", scale_dtype, nan_codes))
        target = random_target(rng, (96, 160), (8, 16), scale_dtype, nan_codes=nan_codes)
        check_requantize(hostile_r(rng, target), target, f"nan_codes={nan_codes}")


def test_requantize_deepseek_shape() -> None:
    """576 x 7168 in 128 x 128 blocks (a half-height last band), F32 scales as DeepSeek-V3 ships them (the slowest
    test here under the interpreter: ~30 s)."""
    rng = np.random.default_rng(seed_for("req-big"))
    target = random_target(rng, (576, 7168), BLOCK, "F32", nan_codes=False)
    check_requantize(hostile_r(rng, target), target)


@pytest.mark.parametrize("scale_dtype", ref.SCALE_DTYPES)
def test_requantize_encoder_at_scale_one(scale_dtype: str) -> None:
    """Blocks holding 448 have scale exactly 1.0 (F32 and BF16), so r goes through the e4m3 encoder unscaled: every
    code's value, every midpoint and its neighbours, subnormals and their ties, NaN payloads, infinities."""
    rng = np.random.default_rng(seed_for("enc", scale_dtype))
    enc = _encoder_values(rng, 60_000)
    cols = 128
    rows = -(-enc.size // (cols - 1))
    r = np.zeros((rows, cols), dtype=np.float32)
    body = np.resize(enc, rows * (cols - 1)).reshape(rows, cols - 1)
    r[:, 1:] = body
    r[:, 0] = 448.0  # one per row: blocks of one row
    target = random_target(rng, r.shape, (1, cols), scale_dtype)
    codes, scales = check_requantize(r, target)
    assert (ref.widen_scale(scales, scale_dtype) == 1.0).all()
    assert np.array_equal(codes[:, 1:], ref.encode_e4m3(body))


@pytest.mark.parametrize("scale_dtype", ref.SCALE_DTYPES)
def test_requantize_measured_cases(scale_dtype: str) -> None:
    """The issue's measured torch cases through a scale-1 block (448 in it): inf -> 0x7E, NaN -> 0x7F, -0.0 -> 0x80,
    2**-10 -> 0x00, 1.5 * 2**-10 -> 0x01; negative NaN (x86's inf - inf) -> 0x7F too."""
    cases = [
        (np.inf, 0x7E),
        (-np.inf, 0xFE),
        (np.nan, 0x7F),
        (from_bits(0xFFC00000), 0x7F),
        (-0.0, 0x80),
        (0.0, 0x00),
        (2.0**-10, 0x00),
        (1.5 * 2.0**-10, 0x01),
        (-(2.0**-11), 0x80),
        (432.0, 0x7E),
        (7.5 * 2.0**-9, 0x08),
        (448.0, 0x7E),
    ]
    r = np.array([[v for v, _ in cases]], dtype=np.float32)
    target = random_target(np.random.default_rng(0), r.shape, (1, r.shape[1]), scale_dtype)
    codes, _ = check_requantize(r, target)
    assert [hex(c) for c in codes[0]] == [hex(c) for _, c in cases]


@pytest.mark.parametrize("scale_dtype", ref.SCALE_DTYPES)
def test_requantize_scale_rule_on_the_stored_value(scale_dtype: str) -> None:
    """amax 0 (all zeros), amax with every element non-finite (0 too), amax = 2**-149 (s = 0 in F32), and
    amax = 2**-130 (s a float32 subnormal that BF16 stores as 0): each block gets the stored scale 1.0."""
    r = np.array(
        [
            [0.0, -0.0, 0.0, -0.0],
            [np.nan, np.inf, -np.inf, np.nan],
            [2.0**-149, -(2.0**-149), 0.0, 2.0**-149],
            [2.0**-130, -(2.0**-131), 2.0**-140, 0.0],
        ],
        dtype=np.float32,
    )
    target = random_target(np.random.default_rng(1), r.shape, (1, 4), scale_dtype, nan_codes=False)
    _, scales = check_requantize(r, target)
    one = ref.store_scale(np.ones(1, dtype=np.float32), scale_dtype)[0]
    assert scales[0, 0] == scales[1, 0] == scales[2, 0] == one
    assert (scales[3, 0] == one) == (scale_dtype == "BF16")


@pytest.mark.parametrize("scale_dtype", ref.SCALE_DTYPES)
def test_requantize_of_the_target_itself_keeps_its_bytes(scale_dtype: str) -> None:
    """r = dequantize(target) (what alpha = 0 gives): every block unchanged, the target's bytes, even for a foreign
    quantizer's codes and a zero scale (0 == 0 counts as equal, -0 too)."""
    rng = np.random.default_rng(seed_for("identity", scale_dtype))
    target = random_target(rng, (200, 300), BLOCK, scale_dtype, nan_codes=False)
    scales = target.scale_bits.copy()
    scales[0, 1] = 0
    target = ref.Fp8Tensor(target.codes, scales, BLOCK, scale_dtype)
    x = tf.dequantize_fp8(codes_tensor(target.codes), scale_tensor(target.scale_bits, scale_dtype), BLOCK, "F8_E4M3")
    q, s = tf.requantize_fp8(x, codes_tensor(target.codes), scale_tensor(target.scale_bits, scale_dtype), BLOCK)
    assert np.array_equal(bits_of_codes(q), target.codes)
    assert np.array_equal(bits_of_scale(s, scale_dtype), target.scale_bits)


def test_requantize_out_arguments() -> None:
    rng = np.random.default_rng(4)
    target = random_target(rng, (6, 10), (4, 4), "BF16")
    r = hostile_r(rng, target)
    out_q = torch.full((6, 10), 3, dtype=torch.uint8, device=DEVICE)
    out_s = torch.full((2, 3), 5.0, dtype=torch.bfloat16, device=DEVICE)
    q, s = tf.requantize_fp8(
        f32_tensor(r), codes_tensor(target.codes), scale_tensor(target.scale_bits, "BF16"), (4, 4), out_q, out_s
    )
    assert q is out_q and s is out_s
    want_q, want_s = expected_requantize(r, target)
    assert_bits_equal(bits_of_codes(q), want_q, "out_q", {})
    assert_bits_equal(bits_of_scale(s, "BF16"), want_s, "out_scale", {})


# ------------------------------------------------------------------------------------------------ launchers


def test_tile_shape() -> None:
    assert tf.tile_shape((128, 128)) == (32, 128)
    assert tf.tile_shape((1, 1)) == (1, 1)
    assert tf.tile_shape((3, 300)) == (4, 128)
    assert tf.tile_shape((256, 1)) == (256, 1)
    assert tf.tile_shape((5, 7)) == (8, 8)
    for block in ((128, 128), (1, 4096), (4096, 1), (3, 300), (1000, 1000)):
        r, c = tf.tile_shape(block)
        assert r * c <= tf.TILE_ELEMENTS and c <= tf.TILE_MAX_COLUMNS


class _Recorder:
    def __init__(self) -> None:
        self.calls: list = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_launch_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """One program per block of the scale grid, no FP fusion (the interpreter ignores the flag), bit views."""
    deq, req = _Recorder(), _Recorder()
    monkeypatch.setattr(tf, "_dequantize_kernel", deq)
    monkeypatch.setattr(tf, "_requantize_kernel", req)
    q = torch.zeros((300, 200), dtype=torch.uint8, device=DEVICE)
    s = torch.ones((3, 2), dtype=torch.bfloat16, device=DEVICE)
    tf.dequantize_fp8(q, s, (128, 128), "F8_E5M2")
    tf.requantize_fp8(torch.zeros((300, 200), device=DEVICE), q, s, (128, 128))
    ((grid, args, kwargs),) = deq.calls
    assert grid == (6,) and args[3:] == (300, 200, 128, 128, 2)
    assert args[1].dtype == torch.int16 and args[2].dtype == torch.int32
    assert kwargs["enable_fp_fusion"] is False and kwargs["E5M2"] and kwargs["SCALE_BF16"]
    assert (kwargs["TILE_R"], kwargs["TILE_C"]) == (32, 128) and kwargs["num_warps"] == tf.NUM_WARPS
    ((grid, args, kwargs),) = req.calls
    assert grid == (6,) and args[5:] == (300, 200, 128, 128, 2)
    assert args[2].dtype == torch.int16 and args[4].dtype == torch.int16
    assert kwargs["enable_fp_fusion"] is False and kwargs["SCALE_BF16"]


def test_empty_does_not_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tf, "_dequantize_kernel", None)
    monkeypatch.setattr(tf, "_requantize_kernel", None)
    q = torch.zeros((0, 5), dtype=torch.uint8, device=DEVICE)
    s = torch.ones((0, 1), dtype=torch.float32, device=DEVICE)
    assert tf.dequantize_fp8(q, s, (128, 128), "F8_E4M3").shape == (0, 5)
    oq, os_ = tf.requantize_fp8(torch.zeros((0, 5), device=DEVICE), q, s, (128, 128))
    assert oq.shape == (0, 5) and os_.shape == (0, 1)


def _args():
    q = torch.zeros((4, 6), dtype=torch.uint8, device=DEVICE)
    s = torch.ones((2, 2), dtype=torch.float32, device=DEVICE)
    return q, s


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda q, s: tf.dequantize_fp8(q, s, (2, 3), "F8_E4M3FNUZ"), ValueError, "unsupported FP8 format"),
        (lambda q, s: tf.dequantize_fp8(q, s, (2, 0), "F8_E4M3"), ValueError, "two positive integers"),
        (lambda q, s: tf.dequantize_fp8(q, s, 128, "F8_E4M3"), ValueError, "two positive integers"),
        (lambda q, s: tf.dequantize_fp8(q.to(torch.int8), s, (2, 3), "F8_E4M3"), TypeError, "q has dtype torch.int8"),
        (lambda q, s: tf.dequantize_fp8(q, s.half(), (2, 3), "F8_E4M3"), TypeError, "scale has dtype torch.float16"),
        (lambda q, s: tf.dequantize_fp8(q, s, (1, 3), "F8_E4M3"), ValueError, r"needs \[4, 2\]"),
        (lambda q, s: tf.dequantize_fp8(q.reshape(-1), s, (2, 3), "F8_E4M3"), ValueError, "q must be 2-D"),
        (lambda q, s: tf.dequantize_fp8(q.t(), s, (3, 2), "F8_E4M3"), ValueError, "q is not contiguous"),
        (lambda q, s: tf.dequantize_fp8([0], s, (2, 3), "F8_E4M3"), TypeError, "q must be a torch.Tensor"),
        (
            lambda q, s: tf.dequantize_fp8(q, s.to("meta"), (2, 3), "F8_E4M3"),
            ValueError,
            "scale is on meta",
        ),
        (
            lambda q, s: tf.dequantize_fp8(q, s, (2, 3), "F8_E4M3", out=torch.empty((4, 6), dtype=torch.bfloat16)),
            TypeError,
            "out has dtype torch.bfloat16",
        ),
        (
            lambda q, s: tf.dequantize_fp8(q, s, (2, 3), "F8_E4M3", out=torch.empty((6, 4), device=q.device)),
            ValueError,
            r"out has shape \(6, 4\)",
        ),
        (lambda q, s: tf.requantize_fp8(q.float().double(), q, s, (2, 3)), TypeError, "r has dtype torch.float64"),
        (lambda q, s: tf.requantize_fp8(q.float()[:2], q, s, (2, 3)), ValueError, "t_q has shape"),
        (lambda q, s: tf.requantize_fp8(q.float(), q, s[:1], (2, 3)), ValueError, "t_scale has shape"),
        (
            lambda q, s: tf.requantize_fp8(
                q.float(), q, s, (2, 3), out_scale=torch.empty((2, 2), dtype=torch.bfloat16)
            ),
            TypeError,
            "out_scale has dtype torch.bfloat16",
        ),
    ],
)
def test_bad_arguments(call, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        call(*_args())


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tf, "INTERPRETED", False)
    q, s = (x.cpu() for x in _args())
    with pytest.raises(ValueError, match="need CUDA tensors"):
        tf.dequantize_fp8(q, s, (2, 3), "F8_E4M3")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        tf.requantize_fp8(q.float(), q, s, (2, 3))


# ------------------------------------------------------------------------------------------------ compiled code

_PTX_CHECK = textwrap.dedent(
    r"""
    import re, sys
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError as exc:
        print(f"SKIP: triton's NVIDIA backend is not importable: {exc}")
        sys.exit(77)
    from streammerge.kernels import triton_fp8 as tf

    assert not tf.INTERPRETED
    tile_r, tile_c = tf.tile_shape((128, 128))

    def compile_ptx(fn, sig, constexprs, aligned):
        # `aligned`: what a launch specializes to for 16-byte-aligned buffers and sizes divisible by 16 (a 128x128
        # grid of a DeepSeek-V3 weight).
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        try:
            src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
        except TypeError as exc:
            print(f"SKIP: this triton's ASTSource takes other arguments: {exc}")
            sys.exit(77)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": tf.NUM_WARPS, "enable_fp_fusion": False})
        return kernel.asm["ptx"], kernel.asm["ttir"]

    def check(name, ptx, ttir, float_ops, scale_moves):
        assert "div.full" not in ptx and "div.approx" not in ptx and "rcp.approx" not in ptx, name
        assert "fma" not in ptx and ".ftz" not in ptx, name
        # No float8 cast anywhere: the codes are encoded and decoded on integer bit patterns.
        assert "e4m3" not in ptx and "e5m2" not in ptx, name
        ops = sorted(set(re.findall(r"\b(?:fma|add|sub|mul|div|rcp|sqrt)\.[a-z0-9.]*f32", ptx)))
        assert ops == float_ops, (name, ops)
        pid = re.search(r"(%\S+) = tt\.get_program_id x : i32", ttir)
        assert pid and f"arith.extsi {pid.group(1)} : i32 to i64" in ttir, (name, "program id not int64")
        # Every tile load and store moves 16 bytes (r, the codes, the float32 output); the scale is one element.
        moves = set(re.findall(r"\b(?:ld|st)\.global[.a-z0-9]*", ptx))
        assert moves == {"ld.global.v4.b32", "st.global.v4.b32"} | scale_moves, (name, sorted(moves))

    for bf16 in (False, True):
        bits, width = ("*i16", "b16") if bf16 else ("*i32", "b32")
        for e5m2 in (False, True):
            sig = {"q_ptr": "*u8", "scale_bits_ptr": bits, "out_bits_ptr": "*i32", "n_rows": "i32", "n_cols": "i32",
                   "br": "i32", "bc": "i32", "grid_cols": "i32", "E5M2": "constexpr", "SCALE_BF16": "constexpr",
                   "TILE_R": "constexpr", "TILE_C": "constexpr"}
            consts = {"E5M2": e5m2, "SCALE_BF16": bf16, "TILE_R": tile_r, "TILE_C": tile_c}
            ptx, ttir = compile_ptx(tf._dequantize_kernel, sig, consts, (0, 2, 4, 5, 6))
            check(f"dequantize bf16={bf16} e5m2={e5m2}", ptx, ttir, ["mul.rn.f32"], {f"ld.global.{width}"})
        sig = {"r_ptr": "*fp32", "tq_ptr": "*u8", "tscale_bits_ptr": bits, "outq_ptr": "*u8",
               "outscale_bits_ptr": bits, "n_rows": "i32", "n_cols": "i32", "br": "i32", "bc": "i32",
               "grid_cols": "i32", "SCALE_BF16": "constexpr", "TILE_R": "constexpr", "TILE_C": "constexpr"}
        consts = {"SCALE_BF16": bf16, "TILE_R": tile_r, "TILE_C": tile_c}
        ptx, ttir = compile_ptx(tf._requantize_kernel, sig, consts, (0, 1, 3, 6, 7, 8))
        check(f"requantize bf16={bf16}", ptx, ttir, ["div.rn.f32", "mul.rn.f32"],
              {f"ld.global.{width}", f"st.global.{width}"})
    print("OK", triton.__version__)
    """
)


def test_compiled_ptx_divides_exactly_without_fma_or_ftz() -> None:
    """Compile both kernels for sm_90 without a GPU and read the PTX: ``div.rn.f32`` (never ``div.full`` or
    ``div.approx``, what Triton's ``/`` gives), ``mul.rn.f32``, no FMA, no FTZ, no float8 cast, 16-byte tile loads and
    stores; and the TTIR: the program id is widened to int64. Runs in a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PTX_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ GPU only


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_large_random() -> None:
    """A 2048 x 7168 weight (E4M3 and E5M2, F32 and BF16 scales) compiled on the GPU vs the numpy reference."""
    if tf.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: this test checks the compiled kernels")
    for scale_dtype in ref.SCALE_DTYPES:
        rng = np.random.default_rng(seed_for("cuda", scale_dtype))
        target = random_target(rng, (2048 + 64, 7168), BLOCK, scale_dtype)
        for fmt in ref.FP8_FORMATS:
            check_dequantize(target.codes, target.scale_bits, BLOCK, scale_dtype, fmt)
        check_requantize(hostile_r(rng, target), target)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_past_int32_offsets() -> None:
    """More than 2**31 elements: the blocks past element 2**31 are dequantized and requantized (int64 offsets)."""
    if tf.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: this test checks the compiled kernels")
    rows, cols = 2**31 // 7168 + 128, 7168
    need = rows * cols * (1 + 4 + 1)
    if torch.cuda.get_device_properties(0).total_memory < need + (4 << 30):
        pytest.skip(f"needs about {need / 2**30:.0f} GiB of GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randint(0, 0x7E, (rows, cols), dtype=torch.uint8, device="cuda", generator=gen)
    grid = ref.grid_shape((rows, cols), BLOCK)
    s = torch.rand(grid, device="cuda", generator=gen) * 0.01
    x = tf.dequantize_fp8(q, s, BLOCK, "F8_E4M3")
    x.mul_(1.5)
    out_q, out_s = tf.requantize_fp8(x, q, s, BLOCK)
    lo = (2**31 // cols // 128 - 1) * 128  # block rows across element 2**31, to the end
    tail_q, tail_s = q[lo:].cpu().numpy(), s[lo // 128 :].cpu().numpy().view(np.uint32)
    target = ref.Fp8Tensor(tail_q, tail_s, BLOCK, "F32")
    assert_bits_equal(bits_of_f32(x[lo:]), f32_bits(ref.to_f32(target) * np.float32(1.5)), "dequantize past 2**31", {})
    want_q, want_s = expected_requantize(bits_of_f32(x[lo:]).view(np.float32), target)
    assert_bits_equal(bits_of_codes(out_q[lo:]), want_q, "requantize past 2**31", {})
    assert_bits_equal(bits_of_scale(out_s[lo // 128 :], "F32"), want_s, "scales past 2**31", {})
