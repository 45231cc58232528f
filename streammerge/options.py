"""One frozen options object shared by the library and the CLI."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import OptionsError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}

# Default chunk: 16 MiB of float32 work per buffer (4 Mi elements). Measured on the 2-core development machine
# (three bf16 checkpoints, warm cache): 4-64 MiB chunks run within noise of each other; 16 MiB keeps the CPU
# engine's whole working set (~10 buffers) near 160 MB while amortising per-chunk overheads.
DEFAULT_CHUNK_BYTES = 16 * 2**20
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # Hugging Face's default, decimal like huggingface_hub
MIN_CHUNK_BYTES = 4096

OUT_DTYPE_ALIASES = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "f16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "f32": "F32",
    "float32": "F32",
    "float": "F32",
}

MISSING_POLICIES = ("error", "copy-target")
EXTRA_POLICIES = ("error", "ignore")
SHAPE_POLICIES = ("error", "copy-target")
UNSUPPORTED_POLICIES = ("error", "copy-target")
DEVICES = ("auto", "cpu", "cuda")


def parse_size(value: str | int | float, what: str = "size") -> int:
    """Parse a byte size: an integer, or a number with a decimal (KB, MB, GB, TB) or binary (KiB, MiB, GiB, TiB) unit.

    Example:
        ```py
        >>> parse_size("5GB"), parse_size("64MiB"), parse_size(4096)
        (5000000000, 67108864, 4096)
        ```
    """
    if isinstance(value, bool):
        raise OptionsError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise OptionsError(f"{what}: {value!r} is not a whole number of bytes")
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise OptionsError(
                f"{what}: cannot parse {value!r}; use bytes or a unit like 64MiB, 512MB, 5GB (decimal) or 2GiB"
            )
        n = float(m.group(1)) * _UNITS[m.group(2).upper()]
        if n != int(n):
            raise OptionsError(f"{what}: {value!r} is not a whole number of bytes")
        n = int(n)
    if n <= 0:
        raise OptionsError(f"{what}: must be positive, got {value!r}")
    return n


def parse_out_dtype(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.strip()
    if key.upper() in ("BF16", "F16", "F32"):
        return key.upper()
    if key.lower() in OUT_DTYPE_ALIASES:
        return OUT_DTYPE_ALIASES[key.lower()]
    raise OptionsError(f"--out-dtype: unknown dtype {value!r}; use bf16, fp16 or fp32")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionsError(f"{name}: {value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class MergeOptions:
    """Every knob of a merge. Build with :meth:`create` to validate and normalise user input.

    Attributes:
        alpha (`float`): the scale of the vector (1 adds the reasoning vector, -1 removes it).
        device (`str`): "auto" (CUDA when a GPU and triton are present, else CPU), "cpu" or "cuda".
        chunk_bytes (`int`): the largest buffer of any kind the engines use per chunk.
        max_shard_size (`int`): output shard size limit in bytes (Hugging Face's 5 GB by default).
        out_dtype (`str | None`): "BF16", "F16" or "F32" for every blended tensor; None keeps the target's dtype.
        missing (`str`): a target tensor absent from sft or grpo: "error" or "copy-target".
        extra (`str`): an sft/grpo tensor absent from the target: "error" or "ignore".
        shape_mismatch (`str`): "error" or "copy-target".
        unsupported_dtype (`str`): a floating tensor we cannot blend exactly (F64, FP8, ...): "error" or "copy-target".
        threads (`int | None`): CPU threads for the math (None: all cores).
        overwrite (`bool`): replace a previous streammerge output in the output directory.
        copy_aux_files (`bool`): copy config, generation config, tokenizer and chat-template files from the target.
        check_finite (`bool`): count elements that became NaN/inf although all three inputs were finite.
        strict (`bool`): with ``check_finite``, fail the merge on the first such tensor.
    """

    alpha: float = 1.0
    device: str = "auto"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    out_dtype: str | None = None
    missing: str = "error"
    extra: str = "error"
    shape_mismatch: str = "error"
    unsupported_dtype: str = "error"
    threads: int | None = None
    overwrite: bool = False
    copy_aux_files: bool = True
    check_finite: bool = False
    strict: bool = False
    extra_metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, **kwargs) -> MergeOptions:
        """Validate and normalise options given as user input (sizes as strings, dtype aliases)."""
        if "chunk_bytes" in kwargs and kwargs["chunk_bytes"] is not None:
            kwargs["chunk_bytes"] = parse_size(kwargs["chunk_bytes"], "chunk size")
        if "max_shard_size" in kwargs and kwargs["max_shard_size"] is not None:
            kwargs["max_shard_size"] = parse_size(kwargs["max_shard_size"], "max shard size")
        if "out_dtype" in kwargs:
            kwargs["out_dtype"] = parse_out_dtype(kwargs["out_dtype"])
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "out_dtype"}
        opts = cls(**kwargs)
        opts.validate()
        return opts

    def validate(self) -> None:
        try:
            a = float(self.alpha)
        except (TypeError, ValueError):
            raise OptionsError(f"alpha: {self.alpha!r} is not a number") from None
        if not math.isfinite(a):
            raise OptionsError(f"alpha: must be finite, got {self.alpha!r}")
        if abs(a) > 3.4028234663852886e38:
            raise OptionsError(f"alpha: {a!r} overflows float32")
        if self.chunk_bytes < MIN_CHUNK_BYTES:
            raise OptionsError(f"chunk size: {self.chunk_bytes} bytes is below the {MIN_CHUNK_BYTES}-byte minimum")
        if self.max_shard_size <= 0:
            raise OptionsError("max shard size must be positive")
        if self.out_dtype not in (None, "BF16", "F16", "F32"):
            raise OptionsError(f"out dtype: {self.out_dtype!r} is not BF16, F16 or F32")
        _check_choice("device", self.device, DEVICES)
        _check_choice("--missing", self.missing, MISSING_POLICIES)
        _check_choice("--extra", self.extra, EXTRA_POLICIES)
        _check_choice("--shape-mismatch", self.shape_mismatch, SHAPE_POLICIES)
        _check_choice("--unsupported-dtype", self.unsupported_dtype, UNSUPPORTED_POLICIES)
        if self.threads is not None and self.threads < 1:
            raise OptionsError(f"threads: must be at least 1, got {self.threads}")

    @property
    def chunk_elems(self) -> int:
        """Elements per chunk: every buffer, float32 scratch included, stays within ``chunk_bytes``."""
        return max(1, self.chunk_bytes // 4)
