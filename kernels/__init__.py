"""Merge kernels, shipped as ``streammerge.kernels``.

- :mod:`streammerge.kernels.reference`: the pure-torch implementation of the numerics contract (docs/numerics.md),
  used by the CPU engine and as the reference every other engine is compared with.
- :mod:`streammerge.kernels.triton_merge`: the fused Triton kernel and its launcher (imported lazily: the package
  works where triton is absent).
"""

from .reference import (
    BITS_VIEW_DTYPES,
    CANONICAL_NAN_BITS,
    OUT_DTYPES,
    merge_reference,
    round_from_f32,
    round_from_f32_exact,
)

__all__ = [
    "BITS_VIEW_DTYPES",
    "CANONICAL_NAN_BITS",
    "OUT_DTYPES",
    "merge_reference",
    "round_from_f32",
    "round_from_f32_exact",
]
