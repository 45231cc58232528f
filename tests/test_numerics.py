"""The CPU engine against the independent numpy reference (tests/reference.py), byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TORCH, from_bits, load_all, raw_bits, write_checkpoint
from reference import expected_bits, hostile_values

import streammerge
from streammerge.kernels.reference import fast_cast_is_exact, merge_reference, round_from_f32, round_from_f32_exact

ALPHAS = [1.0, -1.0, 0.5, 0.0, 1e-3]
DTYPES = ["BF16", "F16", "F32"]


def _assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if not np.array_equal(got, want):
        idx = np.nonzero(got != want)[0]
        raise AssertionError(
            f"{what}: {idx.size} of {got.size} elements differ; first at {idx[:5].tolist()}: "
            f"got {[hex(x) for x in got[idx[:5]]]}, want {[hex(x) for x in want[idx[:5]]]}"
        )


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_rounding_paths_match_reference_on_all_bit_patterns(out_dtype):
    rng = np.random.default_rng(1)
    bits = np.concatenate(
        [
            rng.integers(0, 2**32, size=400_000, dtype=np.uint64).astype(np.uint32),
            # every bf16 high half with the deciding low halves (ties, just below and above)
            (
                (np.arange(2**16, dtype=np.uint32) << 16)[:, None] | np.array([0, 0x7FFF, 0x8000, 0x8001], np.uint32)
            ).reshape(-1),
            np.array([0x7F7FFFFF, 0x477FF000, 0x477FEFFF, 0x33000000, 0x33000001, 0x387FE000, 0x38800000], np.uint32),
        ]
    )
    x = torch.from_numpy(bits.view(np.int32).copy()).view(torch.float32)
    zero = np.zeros_like(bits)
    neg_zero = np.full_like(bits, 0x80000000)  # g - s = -0 and t + -0 = t exactly, so the reference only rounds t
    want = expected_bits(bits, zero, neg_zero, 1.0, ("F32", "F32", "F32"), out_dtype)
    for fn in (round_from_f32, round_from_f32_exact):
        got = raw_bits(fn(x.clone(), out_dtype))
        _assert_bits_equal(got, want, f"{fn.__name__} -> {out_dtype}")


def test_fast_cast_self_test_runs():
    for d in DTYPES:
        assert fast_cast_is_exact(d) in (True, False)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize(
    "in_dtypes", [("BF16",) * 3, ("F16",) * 3, ("F32",) * 3, ("BF16", "F16", "F32"), ("F32", "BF16", "F16")]
)
def test_merge_reference_matches_numpy(alpha, out_dtype, in_dtypes):
    rng = np.random.default_rng(abs(hash((alpha, out_dtype, in_dtypes))) % 2**32)
    n = 20_011
    raw = [hostile_values(d, n, rng) for d in in_dtypes]
    t, s, g = (from_bits(r, d, (n,)) for r, d in zip(raw, in_dtypes))
    got = raw_bits(merge_reference(t, s, g, alpha, out_dtype))
    _assert_bits_equal(got, expected_bits(*raw, alpha, in_dtypes, out_dtype), f"alpha={alpha} {in_dtypes}->{out_dtype}")


def test_overflow_on_rounding_becomes_inf():
    big = torch.tensor([3.4028234663852886e38, -3.4028234663852886e38, 65519.0, 65520.0, -65520.0])
    z = torch.zeros_like(big)
    bf = merge_reference(big, z, z, 1.0, "BF16").float()
    assert torch.isinf(bf[:2]).all() and bf[0] > 0 > bf[1]
    h = merge_reference(big, z, z, 1.0, "F16").float()
    assert h[2] == 65504 and torch.isinf(h[3]) and h[4] == -float("inf")


def test_no_fma_contraction():
    # t + a*d with a single rounding (FMA) differs from two roundings for these values.
    t = torch.tensor([1.0], dtype=torch.float32)
    a = 1.0 + 2**-12
    s = torch.tensor([0.0])
    g = torch.tensor([1.0 + 2**-12])
    two_roundings = np.float32(1.0) + np.float32(a) * np.float32(1.0 + 2**-12)
    got = merge_reference(t, s, g, a, "F32")
    assert got.item() == float(two_roundings)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_engine_end_to_end_hostile_values_mixed_dtypes(tmp_path, alpha):
    """Whole merges through the CPU engine, chunk boundaries inside tensors, every output dtype."""
    rng = np.random.default_rng(7)
    shapes = {"a": (37, 129), "b": (5000,), "c": (3, 3, 333), "scalar": (), "empty": (0, 7)}
    dts = {"target": "BF16", "sft": "F16", "grpo": "F32"}
    raw = {lab: {k: hostile_values(dt, int(np.prod(s)), rng) for k, s in shapes.items()} for lab, dt in dts.items()}
    dirs = {}
    for i, (lab, dt) in enumerate(dts.items()):
        tensors = {k: from_bits(raw[lab][k], dt, s) for k, s in shapes.items()}
        dirs[lab] = write_checkpoint(tmp_path / lab, tensors, shards=i + 1)
    for out_dtype in [None, "F16", "F32"]:
        out = tmp_path / f"out-{out_dtype}"
        report = streammerge.merge(
            dirs["target"],
            dirs["sft"],
            dirs["grpo"],
            out,
            alpha=alpha,
            device="cpu",
            chunk_bytes=4096,
            out_dtype=out_dtype,
        )
        assert report.tensors_merged == len(shapes)
        merged = load_all(out)
        od = out_dtype or "BF16"
        for k, s in shapes.items():
            assert merged[k].dtype == TORCH[od] and tuple(merged[k].shape) == s
            want = expected_bits(raw["target"][k], raw["sft"][k], raw["grpo"][k], alpha, tuple(dts.values()), od)
            _assert_bits_equal(raw_bits(merged[k]), want, f"{k} alpha={alpha} out={od}")
