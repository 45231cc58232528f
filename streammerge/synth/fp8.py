"""Block-scaled FP8 quantization with torch: float32 weights to e4m3 codes and per-block scales, and back.

The rule is issue 12's (the one the merge writes FP8 output with), applied to a whole tensor: per block of
``block_size`` elements (edge blocks partial), ``amax`` = max |x| over the block's finite elements,
``s = amax / 448`` in float32, ``s = 1`` where amax or s is 0, ``s`` stored in the scale dtype (round to nearest even)
and that stored value the divisor, ``q = e4m3(x / s)`` with torch's ``.to(torch.float8_e4m3fn)``: round to nearest
even, finite values beyond 448 and infinities saturating to ±448; every NaN becomes 0x7F (torch keeps a NaN's sign,
so its code is fixed up).
"""

from __future__ import annotations

import numpy as np
import torch

from ..dtypes import torch_dtype

# The largest finite e4m3fn value: the block's amax maps to it.
E4M3_MAX = 448.0
# The one NaN code the contract writes.
E4M3_NAN = 0x7F


def expand_blocks(grid: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int]) -> torch.Tensor:
    """Repeat each element of a per-block ``grid`` over its block: a tensor of ``shape`` (edge blocks cut)."""
    (rows, cols), (br, bc) = shape, block_size
    return grid.repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]


def _blocked(x: np.ndarray, block_size: tuple[int, int], fill: float) -> np.ndarray:
    """``x`` padded with ``fill`` to whole blocks and viewed as ``[grid rows, br, grid cols, bc]``."""
    (rows, cols), (br, bc) = x.shape, block_size
    grid_rows, grid_cols = -(-rows // br), -(-cols // bc)
    padded = np.full((grid_rows * br, grid_cols * bc), fill, dtype=x.dtype)
    padded[:rows, :cols] = x
    return padded.reshape(grid_rows, br, grid_cols, bc)


def quantize_fp8_blocks(
    x: torch.Tensor, block_size: tuple[int, int] = (128, 128), scale_dtype: str = "F32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float32 tensor to e4m3 codes and one scale per block (see the module docstring for the rule).

    The block arithmetic runs in numpy (float32 division is IEEE round-to-nearest-even there as in torch), which
    needs no thread pool: torch splits every op over 32k elements across its threads, and on the loaded 2-core
    development machine the wake-ups made a tiny trio take 3 s instead of 0.4 s.

    Args:
        x (`torch.Tensor`): 2-D, float32.
        block_size (`tuple[int, int]`, defaults to ``(128, 128)``): rows and columns per block.
        scale_dtype (`str`, defaults to `"F32"`): "F32" or "BF16", the dtype the scales are stored in.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the ``torch.float8_e4m3fn`` codes (shape of ``x``) and the scales
        (``[ceil(R / br), ceil(C / bc)]``, in ``scale_dtype``).

    Example:
        ```python
        >>> q, s = quantize_fp8_blocks(torch.randn(300, 200), (128, 128))
        >>> q.dtype, tuple(s.shape)
        (torch.float8_e4m3fn, (3, 2))
        ```
    """
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"quantize_fp8_blocks takes a 2-D float32 tensor, got {x.dim()}-D {x.dtype}")
    if scale_dtype not in ("F32", "BF16"):
        raise ValueError(f"unsupported scale dtype {scale_dtype!r}; use F32 or BF16")
    values = x.numpy()
    rows, cols = values.shape
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # Zero padding: |x| >= 0, so it never raises a block's maximum; non-finite elements count as 0.
        magnitude = _blocked(np.where(np.isfinite(values), np.abs(values), np.float32(0)), block_size, 0.0)
        scale = magnitude.max(axis=(1, 3)) / np.float32(E4M3_MAX)
        scale[scale == 0] = 1.0  # also where amax is 0
        stored = torch.from_numpy(scale).to(torch_dtype(scale_dtype))  # RNE; the stored value is the divisor
        divisor = stored.to(torch.float32).numpy()[:, None, :, None]
        scaled = (_blocked(values, block_size, 0.0) / divisor).reshape(magnitude.shape[0] * block_size[0], -1)
    scaled = np.ascontiguousarray(scaled[:rows, :cols])
    codes = torch.from_numpy(scaled).to(torch.float8_e4m3fn)
    # torch keeps a NaN's sign (0xFF for the negative NaN that x86 arithmetic produces); the contract writes 0x7F.
    codes.view(torch.uint8).numpy()[np.isnan(scaled)] = E4M3_NAN
    return codes, stored


def dequantize_fp8_blocks(
    q: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """``float32(q) * float32(scale)`` per block: the value an FP8 weight stands for (one float32 multiply)."""
    widened = expand_blocks(scale.to(torch.float32), tuple(q.shape), block_size)
    return q.to(torch.float32) * widened
