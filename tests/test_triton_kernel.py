"""Byte-exact tests of the Triton merge kernel against both references (docs/numerics.md).

Where CUDA is available the kernel is compiled and run on the GPU; elsewhere it runs on CPU tensors under
``TRITON_INTERPRET=1``. Triton reads that variable when the kernel is decorated, i.e. when
``streammerge.kernels.triton_merge`` is first imported, so it is set here before that import (and the module is
reloaded if something imported it earlier without the interpreter). Outputs are compared bit for bit with
``tests/reference.py`` (independent numpy) and with ``streammerge.kernels.reference.merge_reference`` (torch, CPU).
"""

from __future__ import annotations

import importlib
import itertools
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

# tests/ has no __init__.py: pytest's default 'prepend' import mode puts it on sys.path, so this is tests/reference.py.
from reference import expected_bits, hostile_values  # noqa: E402

from streammerge.kernels import triton_merge as tm  # noqa: E402
from streammerge.kernels.reference import merge_reference  # noqa: E402

if not CUDA and not tm.INTERPRETED:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is set to something other than 1 and there is no GPU", allow_module_level=True)
    # Imported earlier (by another test module) before TRITON_INTERPRET was set: decorate the kernel again.
    tm = importlib.reload(tm)

DEVICE = "cuda" if CUDA else "cpu"
BLOCK = tm.BLOCK_SIZE
DTYPES = ("BF16", "F16", "F32")
TORCH_DTYPE = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# Signed views for torch (which has no uint16/uint32 views everywhere) and unsigned views for numpy comparisons.
TORCH_BITS = {"BF16": torch.int16, "F16": torch.int16, "F32": torch.int32}
NP_SIGNED = {"BF16": np.int16, "F16": np.int16, "F32": np.int32}
NP_BITS = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}
ALPHAS = (1.0, -1.0, 0.5, 0.0, 1e-3)


def to_torch(raw: np.ndarray, dtype: str, device: str = DEVICE) -> torch.Tensor:
    """Raw uint16/uint32 bit patterns -> a tensor of ``dtype`` holding exactly those bits."""
    return torch.from_numpy(raw.view(NP_SIGNED[dtype]).copy()).view(TORCH_DTYPE[dtype]).to(device)


def bits_of(x: torch.Tensor, dtype: str) -> np.ndarray:
    return x.detach().cpu().contiguous().view(TORCH_BITS[dtype]).numpy().view(NP_BITS[dtype])


def assert_bits_equal(
    got: np.ndarray, want: np.ndarray, what: str, inputs: tuple[np.ndarray, ...] = (), show: int = 8
) -> None:
    """Compare bit patterns; on mismatch name the first indices with the got/expected bits and the input bits."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = np.flatnonzero(got != want)
    if bad.size == 0:
        return
    lines = [f"{what}: {bad.size} of {got.size} elements differ; first {min(show, bad.size)}:"]
    for i in bad[:show]:
        ins = " ".join(f"in{k}=0x{int(x[i]):0{x.itemsize * 2}x}" for k, x in enumerate(inputs))
        lines.append(
            f"  [{i}] got=0x{int(got[i]):0{got.itemsize * 2}x} want=0x{int(want[i]):0{want.itemsize * 2}x} {ins}"
        )
    pytest.fail("\n".join(lines))


def check_merge(
    raw: tuple[np.ndarray, np.ndarray, np.ndarray], dtypes: tuple[str, str, str], out_dtype: str, alpha: float
) -> None:
    """Run the kernel on raw bits and compare with the numpy reference and with merge_reference, byte for byte."""
    tensors = [to_torch(r, dt) for r, dt in zip(raw, dtypes, strict=True)]
    out = tm.merge_triton(*tensors, alpha, out_dtype)
    assert out.dtype == TORCH_DTYPE[out_dtype] and out.device.type == DEVICE and out.numel() == raw[0].size
    got = bits_of(out, out_dtype)
    label = f"dtypes={dtypes} out={out_dtype} alpha={alpha!r} n={raw[0].size}"
    with np.errstate(all="ignore"):  # the numpy reference computes with infinities and NaNs on purpose
        want = expected_bits(*raw, alpha, dtypes, out_dtype)
    assert_bits_equal(got, want, f"vs numpy reference, {label}", raw)
    cpu = [t.cpu() for t in tensors]
    ref = merge_reference(*cpu, alpha, out_dtype)
    assert_bits_equal(got, bits_of(ref, out_dtype), f"vs merge_reference, {label}", raw)


def seed_for(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


# All 27 input dtype mixes x 3 outputs at one small size (two programs, the second masked): the interpreter is slow.
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("dtypes", list(itertools.product(DTYPES, repeat=3)), ids="-".join)
def test_every_dtype_mix(dtypes: tuple[str, str, str], out_dtype: str) -> None:
    rng = np.random.default_rng(seed_for("mix", dtypes, out_dtype))
    n = BLOCK + 1
    raw = tuple(hostile_values(dt, n, rng) for dt in dtypes)
    for alpha in ALPHAS:
        check_merge(raw, dtypes, out_dtype, alpha)


# Sizes around the block edges (empty, one, odd, one short of a block, one past, several blocks plus a tail).
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize(
    "dtypes", [("BF16", "BF16", "BF16"), ("F16", "F32", "BF16"), ("F32", "F32", "F32")], ids="-".join
)
@pytest.mark.parametrize("n", [0, 1, 7, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 5])
def test_sizes(n: int, dtypes: tuple[str, str, str], out_dtype: str) -> None:
    rng = np.random.default_rng(seed_for("sizes", n, dtypes, out_dtype))
    raw = tuple(hostile_values(dt, n, rng) for dt in dtypes)
    for alpha in ALPHAS:
        check_merge(raw, dtypes, out_dtype, alpha)


def _f32(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32).view(np.uint32)


def _zeros_like_bits(raw: np.ndarray, dtype: str) -> np.ndarray:
    return np.zeros(raw.size, dtype=NP_BITS[dtype])


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_overflow_on_rounding(out_dtype: str) -> None:
    """Finite fp32 results that round to +-inf in bf16/fp16 (sft == grpo, so r == target exactly)."""
    t = np.array(
        [
            0x7F7FFFFF,
            0xFF7FFFFF,
            0x7F7F8000,
            0x7F7F7FFF,
            0x477FF000,
            0xC77FF000,
            0x477FEFFF,
            0x477FE000,
            0x47800000,
            0x7F800000,
            0xFF800000,
        ],
        dtype=np.uint32,
    )
    s = np.array([0x3F800000] * t.size, dtype=np.uint32)  # sft == grpo == 1.0: d == 0
    for alpha in ALPHAS:
        check_merge((t, s, s.copy()), ("F32", "F32", "F32"), out_dtype, alpha)


@pytest.mark.parametrize("out_dtype", ["F16", "BF16"])
def test_fp16_subnormal_range(out_dtype: str) -> None:
    """Results in and around fp16's subnormal range, including the ties at 2**-25 and between subnormals."""
    u = 2.0**-24  # one fp16 subnormal unit
    vals = [
        u / 2,
        -u / 2,
        u / 2 * 1.0000001,
        u * 1.5,
        u * 2.5,
        u * 3.5,
        u * 1023.5,
        u * 1024,
        u * 1023.75,
        2.0**-14,
        2.0**-14 - u / 2,
        2.0**-15,
        2.0**-26,
        2.0**-149,
        -(2.0**-149),
        1e-30,
        u * 0.75,
        u * 0.25,
    ]
    rng = np.random.default_rng(5)
    # For every float32 exponent from 2**-27 to 2**-14, mantissas whose dropped bits are just below, at and just
    # above half an fp16 unit (the round-to-nearest-even decisions), on odd and even kept bits.
    near_ties = []
    for exp in range(100, 114):
        shift = 126 - exp  # float32 mantissa bits below one fp16 subnormal unit at this exponent
        half = 1 << (shift - 1)
        kept = rng.integers(0, 1 << 23, size=16, dtype=np.uint32) & ~np.uint32((1 << shift) - 1)
        for delta in (-1, 0, 1):
            mant = (kept + np.uint32(half + delta)) & np.uint32(0x7FFFFF)
            near_ties.append((np.uint32(exp) << np.uint32(23)) | mant)
    # Plus random patterns over the whole range, from below 2**-25 to past 2**-14.
    spread = rng.integers(0x32000000, 0x38900000, size=8 * BLOCK, dtype=np.uint32)
    t = np.concatenate([_f32(vals), *near_ties, spread])
    t = np.concatenate([t, t | np.uint32(0x80000000)])
    z = _zeros_like_bits(t, "F32")
    check_merge((t, z, z.copy()), ("F32", "F32", "F32"), out_dtype, 1.0)
    # The same values reached through the arithmetic: 0 + 1 * (t - 0).
    check_merge((z, z.copy(), t), ("F32", "F32", "F32"), out_dtype, 1.0)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("in_dtype", ["BF16", "F16"])
def test_every_16bit_pattern(in_dtype: str, out_dtype: str) -> None:
    """Every bf16/fp16 bit pattern as the target with sft == grpo: exact widening, then rounding (NaN canonical)."""
    t = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    z = np.zeros_like(t)
    check_merge((t, z, z.copy()), (in_dtype, in_dtype, in_dtype), out_dtype, 0.5)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_nan_and_inf_arithmetic(out_dtype: str) -> None:
    """inf - inf, 0 * inf, NaNs of either sign and payload all give the canonical NaN; inf survives otherwise."""
    inf = np.float32(np.inf)
    t = np.array([1.0, 1.0, inf, -inf, 1.0, 2.0, 0.0, -0.0, -0.0], dtype=np.float32).view(np.uint32)
    s = np.array([inf, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, -0.0], dtype=np.float32).view(np.uint32)
    g = np.array([inf, inf, inf, -inf, 0.0, 1.0, 0.0, -0.0, 0.0], dtype=np.float32).view(np.uint32)
    t = np.concatenate([t, np.array([0xFFC00001, 0x7F800001, 0xFFFFFFFF, 0x7FC00000], dtype=np.uint32)])
    s = np.concatenate([s, np.array([0, 0, 0, 0], dtype=np.uint32)])
    g = np.concatenate([g, np.array([0, 0, 0, np.float32(1.0).view(np.uint32)], dtype=np.uint32)])
    for alpha in ALPHAS + (float("inf"),):
        check_merge((t, s, g), ("F32", "F32", "F32"), out_dtype, alpha)


def test_alpha_is_rounded_to_float32_once() -> None:
    """alpha = 0.1 is not a float32; the kernel must use float32(0.1), like both references."""
    rng = np.random.default_rng(7)
    raw = tuple(rng.standard_normal(4 * BLOCK).astype(np.float32).view(np.uint32) for _ in range(3))
    check_merge(raw, ("F32", "F32", "F32"), "F32", 0.1)
    check_merge(raw, ("F32", "F32", "F32"), "F32", np.float64(1 / 3))
    # A float32-subnormal alpha, one that rounds to a subnormal, and one near the float32 maximum.
    for alpha in (1e-40, 2.0**-149 * 0.75, 3e38):
        check_merge(raw, ("F32", "F32", "F32"), "BF16", alpha)


def test_out_argument_and_shapes() -> None:
    """``out`` is written in place and returned; contiguous multi-dim inputs are read flat."""
    rng = np.random.default_rng(3)
    raw = tuple(hostile_values("BF16", 6 * 5, rng) for _ in range(3))
    t, s, g = (to_torch(r, "BF16").reshape(6, 5) for r in raw)
    out = torch.full((6, 5), 7.0, dtype=torch.float16, device=DEVICE)
    res = tm.merge_triton(t, s, g, 0.5, "F16", out=out)
    assert res is out
    want = expected_bits(*raw, 0.5, ("BF16",) * 3, "F16")
    assert_bits_equal(bits_of(out.reshape(-1), "F16"), want, "out= argument", raw)
    fresh = tm.merge_triton(t, s, g, 0.5, "F16")
    assert fresh.shape == (30,)


def test_empty_does_not_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("kernel launched for an empty tensor")

    monkeypatch.setattr(tm, "_merge_kernel", NoLaunch())
    e = torch.empty(0, dtype=torch.bfloat16, device=DEVICE)
    out = tm.merge_triton(e, e, e, 1.0, "F32")
    assert out.numel() == 0 and out.dtype == torch.float32
    given = torch.empty(0, dtype=torch.bfloat16, device=DEVICE)
    assert tm.merge_triton(e, e, e, 1.0, "BF16", out=given) is given


def test_launch_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher asks for no FP fusion (the interpreter ignores the flag, so only this and the GPU tests see it)."""
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    monkeypatch.setattr(tm, "_merge_kernel", Recorder())
    n = 2 * BLOCK + 3
    t, s, g = _three(n)
    out = tm.merge_triton(t, s, g, 0.1, "F16")
    ((grid, args, kwargs),) = calls
    assert grid == ((n + BLOCK - 1) // BLOCK,)
    assert kwargs["enable_fp_fusion"] is False and kwargs["num_warps"] == tm.NUM_WARPS
    assert kwargs["BLOCK"] == BLOCK
    assert args[4] == float(np.float32(0.1)) and args[5] == n
    assert args[3].dtype == torch.int16 and args[3].data_ptr() == out.data_ptr()


@pytest.mark.parametrize(("block", "warps"), [(256, 2), (4096, 8)])
def test_launch_config_changes_the_grid_not_the_bytes(monkeypatch: pytest.MonkeyPatch, block: int, warps: int) -> None:
    """Another block size and warp count (what benchmarks.gpu_check sweeps): the same bytes, the grid it implies."""
    n = 3 * 4096 + 5
    raw = [hostile_values(d, n, np.random.default_rng(n + i)) for i, d in enumerate(("BF16", "F16", "F32"))]
    t, s, g = (to_torch(r, d) for r, d in zip(raw, ("BF16", "F16", "F32")))
    got = tm.merge_triton(t, s, g, 0.5, "BF16", block_size=block, num_warps=warps)
    want = expected_bits(*raw, 0.5, ("BF16", "F16", "F32"), "BF16")
    assert_bits_equal(bits_of(got, "BF16"), want, f"block {block} / {warps} warps", tuple(raw))
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, kwargs))

    monkeypatch.setattr(tm, "_merge_kernel", Recorder())
    tm.merge_triton(t, s, g, 0.5, "BF16", block_size=block, num_warps=warps)
    ((grid, kwargs),) = calls
    assert grid == ((n + block - 1) // block,)
    assert kwargs["BLOCK"] == block and kwargs["num_warps"] == warps and kwargs["enable_fp_fusion"] is False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 1000}, "block_size must be a positive power of two"),
        ({"block_size": 0}, "block_size must be a positive power of two"),
        ({"num_warps": 3}, "num_warps must be a power of two"),
        ({"num_warps": 64}, "num_warps must be a power of two"),
    ],
)
def test_bad_launch_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tm.merge_triton(*_three(), 1.0, "BF16", **kwargs)


# ------------------------------------------------------------------------------------------------ launcher errors


def _three(n: int = 8, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    return [torch.zeros(n, dtype=dtype, device=DEVICE) for _ in range(3)]


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda a: a.__setitem__(0, a[0].to(torch.int32)), TypeError, "target has dtype torch.int32"),
        (lambda a: a.__setitem__(1, a[1].bool()), TypeError, "sft has dtype torch.bool"),
        (lambda a: a.__setitem__(2, a[2].double()), TypeError, "grpo has dtype torch.float64"),
        (lambda a: a.__setitem__(0, [0.0] * 8), TypeError, "target must be a torch.Tensor"),
        (
            lambda a: a.__setitem__(1, torch.zeros(16, dtype=torch.bfloat16, device=DEVICE)[::2]),
            ValueError,
            "not contiguous",
        ),
        (
            lambda a: a.__setitem__(2, torch.zeros(9, dtype=torch.bfloat16, device=DEVICE)),
            ValueError,
            "same number of elements",
        ),
        (lambda a: a.__setitem__(1, torch.zeros(8, dtype=torch.bfloat16, device="meta")), ValueError, "one device"),
    ],
    ids=["int-target", "bool-sft", "f64-grpo", "not-a-tensor", "non-contiguous", "size-mismatch", "device-mismatch"],
)
def test_bad_inputs(mutate, exc: type[Exception], match: str) -> None:
    args = _three()
    mutate(args)
    with pytest.raises(exc, match=match):
        tm.merge_triton(*args, 1.0, "BF16")


def test_bad_out_dtype_string() -> None:
    with pytest.raises(ValueError, match="unsupported output dtype 'F64'"):
        tm.merge_triton(*_three(), 1.0, "F64")


@pytest.mark.parametrize(
    ("out", "exc", "match"),
    [
        (lambda: torch.zeros(8, dtype=torch.float16, device=DEVICE), TypeError, "out has dtype torch.float16"),
        (lambda: torch.zeros(9, dtype=torch.bfloat16, device=DEVICE), ValueError, "out has 9 elements"),
        (lambda: torch.zeros(16, dtype=torch.bfloat16, device=DEVICE)[::2], ValueError, "out is not contiguous"),
        (lambda: torch.zeros(8, dtype=torch.bfloat16, device="meta"), ValueError, "out is on meta"),
        (lambda: [0.0] * 8, TypeError, "out must be a torch.Tensor"),
    ],
    ids=["dtype", "size", "non-contiguous", "device", "not-a-tensor"],
)
def test_bad_out(out, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        tm.merge_triton(*_three(), 1.0, "BF16", out=out())


@pytest.mark.parametrize("alpha", ["0.5", None, True, torch.tensor(0.5)])
def test_bad_alpha(alpha) -> None:
    with pytest.raises(TypeError, match="alpha must be a real number"):
        tm.merge_triton(*_three(), alpha, "BF16")


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tm, "INTERPRETED", False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        tm.merge_triton(*[torch.zeros(4, dtype=torch.float32) for _ in range(3)], 1.0, "F32")


def test_triton_available() -> None:
    ok, why = tm.triton_available()
    assert ok and why == ""


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
    from streammerge.kernels import triton_merge as tm

    assert not tm.INTERPRETED
    for code, out_ptr in ((0, "*i32"), (1, "*i16"), (2, "*i16")):
        for ins in (("*bf16", "*fp16", "*fp32"), ("*fp32", "*fp32", "*fp32")):
            sig = {"target_ptr": ins[0], "sft_ptr": ins[1], "grpo_ptr": ins[2], "out_bits_ptr": out_ptr,
                   "alpha": "fp32", "n_elements": "i32", "OUT_CODE": "constexpr", "BLOCK": "constexpr"}
            try:
                src = ASTSource(tm._merge_kernel, sig, constexprs={"OUT_CODE": code, "BLOCK": tm.BLOCK_SIZE})
            except TypeError as exc:
                print(f"SKIP: this triton's ASTSource takes other arguments: {exc}")
                sys.exit(77)
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": tm.NUM_WARPS, "enable_fp_fusion": False})
            ptx = kernel.asm["ptx"]
            ops = sorted(set(re.findall(r"\b(?:fma|add|sub|mul)\.[a-z.]*f32", ptx)))
            assert ops == ["add.rn.f32", "mul.rn.f32", "sub.rn.f32"], (code, ins, ops)
            assert ".ftz" not in ptx, (code, ins)
            # The program id is widened to int64 before any offset arithmetic (tensors exceed 2**31 elements).
            ttir = kernel.asm["ttir"]
            pid = re.search(r"(%\S+) = tt\.get_program_id x : i32", ttir)
            assert pid and f"arith.extsi {pid.group(1)} : i32 to i64" in ttir, (code, ins, "program id not int64")
            # What the launch specializes to for 16-byte-aligned buffers and a length divisible by 16 (every full
            # chunk): each global load and store moves 16 bytes, as a memory-bound kernel needs to reach copy speed.
            aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5)}
            src = ASTSource(tm._merge_kernel, sig, constexprs={"OUT_CODE": code, "BLOCK": tm.BLOCK_SIZE}, attrs=aligned)
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": tm.NUM_WARPS, "enable_fp_fusion": False})
            moves = set(re.findall(r"\b(?:ld|st)\.global[.a-z0-9]*", kernel.asm["ptx"]))
            assert moves == {"ld.global.v4.b32", "st.global.v4.b32"}, (code, ins, sorted(moves))
    print("OK")
    """
)


def test_compiled_ptx_has_no_fma_and_no_ftz() -> None:
    """Compile for sm_90 without a GPU (triton ships ptxas) and read the PTX: separate IEEE add/mul, no FMA, no FTZ,
    16-byte loads and stores for aligned chunks; and the TTIR: the program id is widened to int64.

    Runs in a subprocess without TRITON_INTERPRET, so the kernel is decorated for compilation. This pins the part of
    the contract the interpreter cannot show: with enable_fp_fusion=True the same kernel compiles to fma.rn.f32.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PTX_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ GPU only


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_random_and_hostile_millions() -> None:
    """Every dtype mix and output on a few million random + hostile values, compiled on the GPU, vs merge_reference."""
    if tm.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: this test checks the compiled kernel")
    n = 3_000_017
    rng = np.random.default_rng(2024)
    raws = {dt: hostile_values(dt, n, rng) for dt in DTYPES}
    # Different tensors for the three roles, so sft and grpo differ even when their dtypes match.
    roles = [np.roll, lambda x, k: x, lambda x, k: x[::-1].copy()]
    for i, (dtypes, out_dtype) in enumerate(itertools.product(itertools.product(DTYPES, repeat=3), DTYPES)):
        alpha = ALPHAS[i % len(ALPHAS)]
        raw = tuple(roles[r](raws[dt], 12345) for r, dt in enumerate(dtypes))
        ins_cpu = [to_torch(x, dt, "cpu") for x, dt in zip(raw, dtypes, strict=True)]
        ins_gpu = [x.to("cuda") for x in ins_cpu]
        got = bits_of(tm.merge_triton(*ins_gpu, alpha, out_dtype), out_dtype)
        want = bits_of(merge_reference(*ins_cpu, alpha, out_dtype), out_dtype)
        assert_bits_equal(got, want, f"cuda dtypes={dtypes} out={out_dtype} alpha={alpha}", raw)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_past_int32_offsets() -> None:
    """More than 2**31 elements: the tail past 2**31 is merged (int64 offsets) and matches merge_reference there."""
    if tm.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: this test checks the compiled kernel")
    n = 2**31 + 3 * BLOCK + 5
    need = n * 2 * 4  # three bf16 inputs and a bf16 output
    if torch.cuda.get_device_properties(0).total_memory < need + (4 << 30):
        pytest.skip(f"needs about {need / 2**30:.0f} GiB of GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(11)
    t, s, g = (torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    out = tm.merge_triton(t, s, g, 1e-3, "BF16")
    lo = 2**31 - 2 * BLOCK  # a window across the 2**31 boundary, up to the masked end
    want = merge_reference(t[lo:].cpu(), s[lo:].cpu(), g[lo:].cpu(), 1e-3, "BF16")
    assert_bits_equal(bits_of(out[lo:], "BF16"), bits_of(want, "BF16"), "past 2**31")
    head = merge_reference(t[:4096].cpu(), s[:4096].cpu(), g[:4096].cpu(), 1e-3, "BF16")
    assert_bits_equal(bits_of(out[:4096], "BF16"), bits_of(head, "BF16"), "head")
