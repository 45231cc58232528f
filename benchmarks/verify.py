"""Correctness of benchmark outputs, read with its own safetensors header parser and numpy (no streammerge code).

- [`check_reference`]: streammerge's output against an independent numpy implementation of the numerics contract
  (README "Numerics"): float32 ``d = g - s; m = a*d; r = t + m`` (numpy float32 ops are IEEE round-to-nearest-even
  and never fused), then one round-to-nearest-even to the output dtype, NaN as the canonical quiet NaN. Checks
  whole tensors up to [`WINDOW_ELEMS`] x [`WINDOWS_PER_TENSOR`] elements and, in larger ones, windows at the
  start, at a seeded random offset and at the end (``full=True`` checks every element).
- [`compare_outputs`]: every element of a peer's output against streammerge's: how many differ, by how many units
  in the last place (distance between the two values on the ordered integer line of their bit patterns: 1 ulp =
  adjacent representable values) and by how much in absolute value.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .inputs import safetensors_files

# Header size limit (the safetensors format's own, 100 MB).
MAX_HEADER_BYTES = 100_000_000
# Elements per window of the sampled reference check (64 Ki: 3 windows of every tensor of a 2 GB trio is ~70 M
# elements, ~2 s of numpy on the development machine).
WINDOW_ELEMS = 1 << 16
WINDOWS_PER_TENSOR = 3
# Elements per block when comparing two outputs in full (bounded memory: ~10 temporaries of 8 bytes each).
COMPARE_BLOCK_ELEMS = 1 << 23
# Names of mismatching tensors kept in a result (the counts cover all).
MAX_NAMES = 10

# The dtype facts below are deliberately independent of streammerge.dtypes: this module checks streammerge's output,
# so it must not share a table (or a mistake in one) with the code under test. Keep them written out here.
ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOATS = ("BF16", "F16", "F32")
CANONICAL_NAN = {"BF16": 0x7FC0, "F16": 0x7E00, "F32": 0x7FC00000}
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes are: file, dtype code, shape, absolute byte offset and length."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def raw(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements ``[start, stop)`` as unsigned integers of the dtype's width (the stored bit patterns)."""
        size = ITEMSIZE[self.dtype]
        stop = self.numel if stop is None else stop
        count = max(0, stop - start)
        return np.fromfile(self.path, dtype=_RAW[size], count=count, offset=self.offset + start * size)


def read_tensors(directory: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of every ``*.safetensors`` file in ``directory``, from the headers alone."""
    tensors: dict[str, StoredTensor] = {}
    for path in safetensors_files(Path(directory)):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"{path}: header of {n} bytes is implausible")
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            a, b = entry["data_offsets"]
            tensors[name] = StoredTensor(path, entry["dtype"], tuple(entry["shape"]), 8 + n + a, b - a)
    return tensors


def to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Exact widening of raw ``dtype`` bit patterns to float32."""
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return bits.view(np.float16).astype(np.float32)
    if dtype == "F32":
        return bits.view(np.float32)
    raise ValueError(f"not a blendable dtype: {dtype}")


def round_float32(r: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to ``dtype`` bit patterns (nearest even; NaN -> canonical quiet NaN)."""
    nan = np.isnan(r)
    if dtype == "F32":
        out = r.view(np.uint32).copy()
    elif dtype == "F16":
        with np.errstate(over="ignore"):
            out = r.astype(np.float16).view(np.uint16)
    elif dtype == "BF16":
        bits = r.view(np.uint32).astype(np.uint64)
        # Add half an ulp minus one, plus the lowest kept bit (ties to even), and drop the low 16 bits; overflow
        # carries into the exponent and gives inf, as it should. NaN is set explicitly below.
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    else:
        raise ValueError(dtype)
    out[nan] = CANONICAL_NAN[dtype]
    return out


def expected(t: StoredTensor, s: StoredTensor, g: StoredTensor, out_dtype: str, alpha: float, a: int, b: int):
    """Bit patterns the contract gives for elements ``[a, b)``."""
    t32, s32, g32 = (to_float32(x.raw(a, b), x.dtype) for x in (t, s, g))
    with np.errstate(all="ignore"):
        d = g32 - s32
        m = np.float32(alpha) * d
        r = t32 + m
    return round_float32(r, out_dtype)


def _windows(numel: int, rng: np.random.Generator, full: bool) -> list[tuple[int, int]]:
    if full or numel <= WINDOW_ELEMS * WINDOWS_PER_TENSOR:
        return [(a, min(numel, a + COMPARE_BLOCK_ELEMS)) for a in range(0, numel, COMPARE_BLOCK_ELEMS)] or [(0, 0)]
    mid = int(rng.integers(WINDOW_ELEMS, numel - 2 * WINDOW_ELEMS))
    return [(0, WINDOW_ELEMS), (mid, mid + WINDOW_ELEMS), (numel - WINDOW_ELEMS, numel)]


def check_reference(
    target: Path, sft: Path, grpo: Path, out: Path, alpha: float, *, full: bool = False, seed: int = 0
) -> dict:
    """Check ``out`` against the contract, computed here from the inputs (see the module docstring).

    Returns:
        `dict`: ``ok``, tensors and elements checked, mismatching elements and tensors (first names), tensors
        missing from or extra in the output, and whether every tensor was checked in full.
    """
    tt, ss, gg, oo = (read_tensors(d) for d in (target, sft, grpo, out))
    rng = np.random.default_rng(seed)
    missing = sorted(set(tt) - set(oo))
    extra = sorted(set(oo) - set(tt))
    bad_names: list[str] = []
    checked = bad = elements_total = 0
    for name in sorted(set(tt) & set(oo)):
        t, o = tt[name], oo[name]
        elements_total += t.numel
        if t.shape != o.shape:
            bad_names.append(name)
            continue
        blend = t.dtype in FLOATS and name in ss and name in gg
        for a, b in _windows(t.numel, rng, full):
            got = o.raw(a, b)
            want = expected(t, ss[name], gg[name], o.dtype, alpha, a, b) if blend else t.raw(a, b)
            n = int(np.count_nonzero(got != want)) if got.dtype == want.dtype else b - a
            checked += b - a
            if n:
                bad += n
                if name not in bad_names:
                    bad_names.append(name)
    return {
        "ok": not (bad or bad_names or missing or extra),
        "tensors": len(tt),
        "elements_checked": checked,
        "elements_total": elements_total,
        "full": full,
        "mismatched_elements": bad,
        "mismatched_tensors": len(bad_names),
        "mismatched_names": bad_names[:MAX_NAMES],
        "missing": missing[:MAX_NAMES],
        "extra": extra[:MAX_NAMES],
    }


def _ordered(bits: np.ndarray, width: int) -> np.ndarray:
    """Bit patterns -> integers in the order of the values they encode (-0 and +0 both 0)."""
    sign = np.int64(1) << (8 * width - 1)
    x = bits.astype(np.int64)
    mag = x & (sign - 1)
    return np.where(x & sign, -mag, mag)


def compare_outputs(reference: Path, other: Path) -> dict:
    """Every element of ``other`` against ``reference`` (two outputs of the same merge).

    Returns:
        `dict`: ``identical``; elements compared and differing (and the fraction); ``max_ulps`` and ``max_abs``
        over all elements; a histogram of differences in ulps (1, 2, 3-15, >=16); tensors with differences (count
        and the worst few, by ulps); tensors missing, extra, or of another dtype or shape.
    """
    ref, oth = read_tensors(reference), read_tensors(other)
    missing = sorted(set(ref) - set(oth))
    extra = sorted(set(oth) - set(ref))
    mismatched_type: list[str] = []
    hist = {"1": 0, "2": 0, "3-15": 0, ">=16": 0}
    per_tensor: list[tuple[int, int, str]] = []
    total = differing = max_ulps = 0
    max_abs = 0.0
    for name in sorted(set(ref) & set(oth)):
        r, o = ref[name], oth[name]
        if r.shape != o.shape or r.dtype != o.dtype:
            mismatched_type.append(f"{name}: {r.dtype}{list(r.shape)} vs {o.dtype}{list(o.shape)}")
            continue
        float_type = r.dtype in FLOATS
        width = ITEMSIZE[r.dtype]
        n_diff = worst = 0
        for a in range(0, r.numel, COMPARE_BLOCK_ELEMS):
            b = min(r.numel, a + COMPARE_BLOCK_ELEMS)
            x, y = r.raw(a, b), o.raw(a, b)
            diff = x != y
            if float_type:
                xf, yf = to_float32(x, r.dtype), to_float32(y, r.dtype)
                diff &= ~(np.isnan(xf) & np.isnan(yf))  # two NaNs are the same value, whatever their payload
            k = int(np.count_nonzero(diff))
            total += b - a
            if not k:
                continue
            n_diff += k
            if not float_type:
                continue
            ulps = np.abs(_ordered(x[diff], width) - _ordered(y[diff], width))
            worst = max(worst, int(ulps.max()))
            hist["1"] += int(np.count_nonzero(ulps == 1))
            hist["2"] += int(np.count_nonzero(ulps == 2))
            hist["3-15"] += int(np.count_nonzero((ulps >= 3) & (ulps < 16)))
            hist[">=16"] += int(np.count_nonzero(ulps >= 16))
            with np.errstate(invalid="ignore"):
                absd = np.abs(xf[diff].astype(np.float64) - yf[diff].astype(np.float64))
            if absd.size and np.isfinite(absd).any():
                max_abs = max(max_abs, float(np.nanmax(absd[np.isfinite(absd)])))
        if n_diff:
            differing += n_diff
            max_ulps = max(max_ulps, worst)
            per_tensor.append((worst, n_diff, name))
    per_tensor.sort(reverse=True)
    return {
        "identical": not (differing or missing or extra or mismatched_type),
        "elements": total,
        "differing_elements": differing,
        "differing_fraction": differing / total if total else 0.0,
        "max_ulps": max_ulps,
        "max_abs": max_abs,
        "ulps_histogram": hist,
        "tensors_with_differences": len(per_tensor),
        "worst_tensors": [{"name": n, "max_ulps": u, "differing": d} for u, d, n in per_tensor[:MAX_NAMES]],
        "missing": missing[:MAX_NAMES],
        "extra": extra[:MAX_NAMES],
        "mismatched_type": mismatched_type[:MAX_NAMES],
    }
