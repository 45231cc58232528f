"""One frozen options object shared by the library and the CLI."""

from __future__ import annotations

import math
import os
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


RULE_ACTIONS = ("alpha", "copy-target", "skip")
VOCAB_POLICIES = ("error", "common-rows", "copy-target")
# Tensors the vocab-mismatch policy may apply to: embeddings and output heads (rows = vocabulary entries).
VOCAB_TENSOR_RE = r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_out|output)\.weight$"


@dataclass(frozen=True)
class Rule:
    """A per-tensor rule: tensors whose name matches ``pattern`` (``re.search``) get ``alpha``, are copied from the
    target, or are left out of the output. The first matching rule wins."""

    pattern: str
    action: str = "alpha"
    alpha: float | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``REGEX=ALPHA``, ``REGEX=copy-target`` or ``REGEX=skip`` (the last ``=`` separates)."""
        if "=" not in text:
            raise OptionsError(f"--rule {text!r}: expected REGEX=ALPHA, REGEX=copy-target or REGEX=skip")
        pattern, value = text.rsplit("=", 1)
        value = value.strip()
        if value in ("copy-target", "skip"):
            return cls(pattern, value).checked()
        try:
            return cls(pattern, "alpha", float(value)).checked()
        except ValueError:
            raise OptionsError(f"--rule {text!r}: {value!r} is not a number, copy-target or skip") from None

    def checked(self) -> Rule:
        import re

        if not self.pattern:
            raise OptionsError("rule: empty pattern")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise OptionsError(f"rule {self.pattern!r}: invalid regular expression ({e})") from None
        if self.action not in RULE_ACTIONS:
            raise OptionsError(f"rule {self.pattern!r}: action {self.action!r} is not one of {', '.join(RULE_ACTIONS)}")
        if self.action == "alpha":
            if self.alpha is None or not math.isfinite(self.alpha) or abs(self.alpha) > 3.4028234663852886e38:
                raise OptionsError(f"rule {self.pattern!r}: alpha must be a finite float32, got {self.alpha!r}")
        return self

    def describe(self) -> str:
        return f"{self.pattern}={self.alpha!r}" if self.action == "alpha" else f"{self.pattern}={self.action}"


def load_rules(path: str | os.PathLike) -> tuple[Rule, ...]:
    """Rules from a TOML file: ``[[rule]]`` tables with ``pattern`` and either ``alpha`` or ``action``.

    Example:
        ```toml
        [[rule]]
        pattern = "embed_tokens|lm_head"
        action = "copy-target"

        [[rule]]
        pattern = "self_attn"
        alpha = 0.5
        ```
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise OptionsError(f"{path}: cannot read the rules file ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise OptionsError(f"{path}: invalid TOML ({e})") from None
    rules = []
    for i, r in enumerate(data.get("rule", [])):
        if not isinstance(r, dict) or not isinstance(r.get("pattern"), str):
            raise OptionsError(f"{path}: rule {i + 1} needs a string 'pattern'")
        if "alpha" in r:
            try:
                rules.append(Rule(r["pattern"], "alpha", float(r["alpha"])).checked())
            except (TypeError, ValueError):
                raise OptionsError(f"{path}: rule {i + 1}: alpha {r['alpha']!r} is not a number") from None
        else:
            rules.append(Rule(r["pattern"], str(r.get("action", ""))).checked())
    if not rules:
        raise OptionsError(f"{path}: no [[rule]] tables found")
    return tuple(rules)


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
        rules (`tuple[Rule, ...]`): per-tensor alpha / copy-target / skip by regular expression, first match wins.
        vocab_mismatch (`str`): embedding/lm_head row counts differ between target and sft/grpo: "error",
            "common-rows" (blend the shared rows, keep the target's others) or "copy-target".
        gpu_window_bytes (`int | None`): CUDA engine: size of the input windows registered with the GPU.
        gpu_register (`bool`): CUDA engine: DMA straight from registered page-cache windows; False uses pinned
            staging buffers filled by host threads.
        gpu_slots (`int`): CUDA engine: device slots (3 inputs + 1 output of one chunk each) in flight.
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
    rules: tuple[Rule, ...] = ()
    vocab_mismatch: str = "error"
    gpu_window_bytes: int | None = None
    gpu_register: bool = True
    gpu_slots: int = 2
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
        if kwargs.get("alpha") is not None:
            try:
                kwargs["alpha"] = float(kwargs["alpha"])
            except (TypeError, ValueError):
                raise OptionsError(f"alpha: {kwargs['alpha']!r} is not a number") from None
        if kwargs.get("gpu_window_bytes") is not None:
            kwargs["gpu_window_bytes"] = parse_size(kwargs["gpu_window_bytes"], "GPU window size")
        if "rules" in kwargs and kwargs["rules"] is not None:
            kwargs["rules"] = tuple(r if isinstance(r, Rule) else Rule.parse(r) for r in kwargs["rules"])
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
        _check_choice("--vocab-mismatch", self.vocab_mismatch, VOCAB_POLICIES)
        for r in self.rules:
            r.checked()
        if self.gpu_slots < 1:
            raise OptionsError(f"GPU slots: must be at least 1, got {self.gpu_slots}")
        if self.threads is not None and self.threads < 1:
            raise OptionsError(f"threads: must be at least 1, got {self.threads}")

    @property
    def chunk_elems(self) -> int:
        """Elements per chunk: every buffer, float32 scratch included, stays within ``chunk_bytes``."""
        return max(1, self.chunk_bytes // 4)
