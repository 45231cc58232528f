"""The one table of safetensors dtype codes: bits, item size, torch dtype, whether the merge blends it, canonical NaN.

Every other module reads dtype facts from here. Importing it does not import torch: the torch dtype is looked up by
name when asked for (:func:`torch_dtype`), so header-only commands stay light.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """Facts about one safetensors dtype code.

    Attributes:
        code (`str`): the safetensors code ("BF16", "F8_E4M3", ...).
        bits (`int`): bits per element (4 and 6 for the sub-byte float formats).
        torch_name (`str | None`): the ``torch`` attribute naming the same element type, None where torch has none.
        blendable (`bool`): exactly widened to float32 and written back by the merge's rounding (BF16, F16, F32).
        floating (`bool`): a floating-point (or complex) format: it needs a policy when it is not blendable.
        canonical_nan (`int | None`): the bit pattern every NaN is written as, for blendable dtypes.
    """

    code: str
    bits: int
    torch_name: str | None = None
    blendable: bool = False
    floating: bool = False
    canonical_nan: int | None = None

    @property
    def itemsize(self) -> int:
        """Bytes per element (the sub-byte formats count as 1: they are never blended or viewed per element)."""
        return max(1, self.bits // 8)


# Every dtype code safetensors defines (safetensors/src/tensor.rs `Dtype`). Canonical NaNs: the quiet NaN with a
# zero payload and sign, the pattern the final rounding writes for every NaN (docs/numerics.md).
_TABLE = (
    DType("BOOL", 8, "bool"),
    DType("F4", 4, floating=True),
    DType("F6_E2M3", 6, floating=True),
    DType("F6_E3M2", 6, floating=True),
    DType("U8", 8, "uint8"),
    DType("I8", 8, "int8"),
    DType("F8_E5M2", 8, "float8_e5m2", floating=True),
    DType("F8_E4M3", 8, "float8_e4m3fn", floating=True),
    DType("F8_E8M0", 8, "float8_e8m0fnu", floating=True),
    DType("F8_E4M3FNUZ", 8, "float8_e4m3fnuz", floating=True),
    DType("F8_E5M2FNUZ", 8, "float8_e5m2fnuz", floating=True),
    DType("I16", 16, "int16"),
    DType("U16", 16, "uint16"),
    DType("F16", 16, "float16", blendable=True, floating=True, canonical_nan=0x7E00),
    DType("BF16", 16, "bfloat16", blendable=True, floating=True, canonical_nan=0x7FC0),
    DType("I32", 32, "int32"),
    DType("U32", 32, "uint32"),
    DType("F32", 32, "float32", blendable=True, floating=True, canonical_nan=0x7FC00000),
    DType("C64", 64, "complex64", floating=True),
    DType("F64", 64, "float64", floating=True),
    DType("I64", 64, "int64"),
    DType("U64", 64, "uint64"),
)
DTYPES: dict[str, DType] = {d.code: d for d in _TABLE}

# Views of the table that callers index often.
DTYPE_BITS: dict[str, int] = {d.code: d.bits for d in _TABLE}
BLENDABLE_DTYPES: tuple[str, ...] = tuple(d.code for d in _TABLE if d.blendable)
# Floating (or complex) dtypes the merge cannot widen exactly to float32: they need an explicit policy.
UNSUPPORTED_FLOAT_DTYPES: tuple[str, ...] = tuple(d.code for d in _TABLE if d.floating and not d.blendable)
CANONICAL_NAN_BITS: dict[str, int] = {d.code: d.canonical_nan for d in _TABLE if d.canonical_nan is not None}
# Block-scaled FP8 (docs/numerics.md, "Block-scaled FP8"): weights in these formats are blended through their block
# scales (a tensor named W + "_scale_inv" beside W, in one of FP8_SCALE_DTYPES); an FP8 output is always e4m3fn.
BLOCK_FP8_DTYPES: tuple[str, ...] = ("F8_E4M3", "F8_E5M2")
FP8_SCALE_DTYPES: tuple[str, ...] = ("F32", "BF16")
FP8_OUT_DTYPE = "F8_E4M3"
# The torch dtype of each output bit pattern's integer view (the rounding works on integers of the output's width).
BITS_VIEW_NAMES: dict[int, str] = {16: "int16", 32: "int32"}


def itemsize(code: str) -> int:
    """Bytes per element of dtype ``code``."""
    return DTYPES[code].itemsize


def torch_dtype(code: str):
    """The ``torch.dtype`` of safetensors dtype ``code`` (imports torch; KeyError where torch has no such type)."""
    import torch

    name = DTYPES[code].torch_name
    if name is None or not hasattr(torch, name):
        raise KeyError(f"torch has no dtype for safetensors {code}")
    return getattr(torch, name)
