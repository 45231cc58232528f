"""Every merge option declared once (:data:`OPTIONS`), and the frozen options object built from user input.

The declaration says, per option, what it is, which values it takes, whether it can change the output's bytes, and
the command-line flags that set it. The command line builds its flags from it, the spec's ``[options]`` table is
checked against it, and the manifest's record of the options (:meth:`MergeOptions.identity`) and verify's rebuild of
them (:meth:`MergeOptions.from_identity`) follow it.
"""

from __future__ import annotations

import math
import operator
import os
import re
import textwrap
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

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


def parse_rules(texts: list[str] | tuple[str, ...]) -> tuple[Rule, ...]:
    """Rules from ``REGEX=ALPHA`` / ``REGEX=copy-target`` / ``REGEX=skip`` strings (see :meth:`Rule.parse`)."""
    return tuple(Rule.parse(t) for t in texts)


# The commands of `streammerge` that take merge options (a flag lists the ones it belongs to).
MERGE = "merge"
PLAN = "plan"
EXTRACT = "extract"
APPLY = "apply"
COMBINE = "combine"
DEMO = "demo"


@dataclass(frozen=True)
class CliFlag:
    """One command-line flag that sets a merge option. `streammerge.cli` builds its typer options from these.

    Attributes:
        param (`str`): the name of the command function's parameter that receives it.
        decls (`tuple[str, ...]`): the flag's spellings, e.g. ``("--alpha", "-a")``.
        help (`str`): its ``--help`` line.
        commands (`tuple[str, ...]`): the commands that take it.
        help_for (`dict[str, str]`): a command's own wording of the help, where it differs.
        default (`Any`): the default as the command line spells it; None: the option's own default, or none at all
            where ``parse`` is given.
        type (`Any`): what the command line parses, where the option's kind does not say it (a repeatable flag).
        parse (`Callable | None`): turns the flag's value into the option's value (applied to given values only).
    """

    param: str
    decls: tuple[str, ...]
    help: str
    commands: tuple[str, ...]
    help_for: dict[str, str] = field(default_factory=dict)
    default: Any = None
    type: Any = None
    parse: Callable[[Any], Any] | None = None

    def help_in(self, command: str) -> str:
        """The help line of this flag in `command`."""
        return self.help_for.get(command, self.help)


# An option's kind: how a spec's [options] table must give it, how the manifest records it, what a flag parses.
KINDS = ("float", "str", "size", "int", "bool", "rules", "table")


@dataclass(frozen=True)
class OptionSpec:
    """The declaration of one :class:`MergeOptions` field (its name, type and default are the field's own).

    Attributes:
        name (`str`): the field.
        kind (`str`): one of :data:`KINDS`; "size" is a byte count given as an int or a string like "64MiB".
        help (`str`): what it does (the :class:`MergeOptions` docstring is built from these).
        choices (`tuple[str, ...]`): the values it takes, when it is one of a few words.
        changes_output (`bool`): it can change the output's bytes (or whether there is an output at all): recorded
            in the manifest, part of the fingerprint that ``--resume`` checks, and restored by verify to recompute.
        flags (`tuple[CliFlag, ...]`): the command-line flags that set it.
    """

    name: str
    kind: str
    help: str
    choices: tuple[str, ...] = ()
    changes_output: bool = False
    flags: tuple[CliFlag, ...] = ()

    @property
    def default(self) -> Any:
        """The field's default value."""
        f = _FIELDS[self.name]
        return f.default_factory() if f.default_factory is not MISSING else f.default

    @property
    def type(self) -> Any:
        """The field's type (resolved, not the annotation string)."""
        return typing.get_type_hints(MergeOptions)[self.name]

    def cli_default(self, flag: CliFlag) -> Any:
        """The default `flag` shows on the command line."""
        return flag.default if flag.default is not None or flag.parse is not None else self.default


_POLICY_COMMANDS = (MERGE, PLAN, EXTRACT, APPLY, COMBINE)
_RUN_COMMANDS = (MERGE, EXTRACT, APPLY, COMBINE)
_CHECK_COMMANDS = (MERGE, APPLY, COMBINE)
_RULE_COMMANDS = (MERGE, PLAN, APPLY)
_DEVICE_HELP = "auto (CUDA when a GPU and triton are present, else CPU), cpu or cuda."

# In the order `streammerge merge --help` lists them.
OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "alpha",
        "float",
        "the scale of the vector (1 adds the reasoning vector, -1 removes it).",
        changes_output=True,
        flags=(
            CliFlag(
                "alpha",
                ("--alpha", "-a"),
                "Scale of the vector; 1 adds it, -1 removes it. Several, comma-separated (--alpha 0.5,1,1.5): one "
                "output per alpha in OUT/alpha-A/, every input read once.",
                (MERGE, PLAN, APPLY),
                default="1",  # a string: the command line also takes a sweep
            ),
        ),
    ),
    OptionSpec(
        "device",
        "str",
        '"auto" (CUDA when a GPU and triton are present, else CPU), "cpu" or "cuda".',
        choices=DEVICES,
        flags=(
            CliFlag(
                "device",
                ("--device",),
                _DEVICE_HELP,
                (MERGE, EXTRACT, APPLY, COMBINE, DEMO),
                help_for={COMBINE: "auto (CUDA when a GPU and triton are present, else CPU), cpu, cuda."},
            ),
        ),
    ),
    OptionSpec(
        "chunk_bytes",
        "size",
        "the largest buffer of any kind the engines use per chunk.",
        flags=(
            CliFlag(
                "chunk_size",
                ("--chunk-size",),
                "Largest buffer per chunk: bytes, or 64MiB / 512MB / 1GiB. Bounds memory.",
                _POLICY_COMMANDS,
                help_for={COMBINE: "Largest buffer per chunk (16MiB)."},
                default="16MiB",
            ),
        ),
    ),
    OptionSpec(
        "max_shard_size",
        "size",
        "output shard size limit in bytes (Hugging Face's 5 GB by default).",
        changes_output=True,
        flags=(
            CliFlag(
                "max_shard_size",
                ("--max-shard-size",),
                "Output shard size limit (decimal: 5GB = 5e9 bytes).",
                _POLICY_COMMANDS,
                help_for={COMBINE: "Output shard limit (5GB)."},
                default="5GB",
            ),
        ),
    ),
    OptionSpec(
        "out_dtype",
        "str",
        '"BF16", "F16" or "F32" for every blended tensor; None keeps the target\'s dtype.',
        changes_output=True,
        flags=(
            CliFlag(
                "out_dtype",
                ("--out-dtype",),
                "bf16, fp16 or fp32 for every blended tensor (default: target's).",
                (MERGE, PLAN, APPLY, COMBINE),
            ),
        ),
    ),
    OptionSpec(
        "missing",
        "str",
        'a target tensor absent from sft or grpo: "error" or "copy-target".',
        choices=MISSING_POLICIES,
        changes_output=True,
        flags=(
            CliFlag(
                "missing",
                ("--missing",),
                "Target tensor absent from sft/grpo: error or copy-target.",
                _POLICY_COMMANDS,
                help_for={COMBINE: "error or copy-target."},
            ),
        ),
    ),
    OptionSpec(
        "extra",
        "str",
        'an sft/grpo tensor absent from the target: "error" or "ignore".',
        choices=EXTRA_POLICIES,
        changes_output=True,
        flags=(
            CliFlag(
                "extra",
                ("--extra",),
                "sft/grpo tensor absent from the target: error or ignore.",
                _POLICY_COMMANDS,
                help_for={COMBINE: "error or ignore."},
            ),
        ),
    ),
    OptionSpec(
        "shape_mismatch",
        "str",
        '"error" or "copy-target".',
        choices=SHAPE_POLICIES,
        changes_output=True,
        flags=(
            CliFlag(
                "shape_mismatch",
                ("--shape-mismatch",),
                "Shapes differ across the three: error or copy-target.",
                _POLICY_COMMANDS,
                help_for={COMBINE: "error or copy-target."},
            ),
        ),
    ),
    OptionSpec(
        "unsupported_dtype",
        "str",
        'a floating tensor we cannot blend exactly (F64, FP8, ...): "error" or "copy-target".',
        choices=UNSUPPORTED_POLICIES,
        changes_output=True,
        flags=(
            CliFlag(
                "unsupported_dtype",
                ("--unsupported-dtype",),
                "Floating tensor not in bf16/fp16/fp32 (F64, FP8): error or copy-target.",
                (MERGE, PLAN, COMBINE),
                help_for={COMBINE: "error or copy-target."},
            ),
        ),
    ),
    OptionSpec(
        "vocab_mismatch",
        "str",
        'embedding/lm_head row counts differ between target and sft/grpo: "error", "common-rows" (blend the shared '
        'rows, keep the target\'s others) or "copy-target".',
        choices=VOCAB_POLICIES,
        changes_output=True,
        flags=(
            CliFlag(
                "vocab_mismatch",
                ("--vocab-mismatch",),
                "Embedding/lm_head row counts differ (resized tokenizer): error, common-rows or copy-target.",
                (MERGE, PLAN, APPLY, COMBINE),
                help_for={COMBINE: "error, common-rows or copy-target."},
            ),
        ),
    ),
    OptionSpec(
        "rules",
        "rules",
        "per-tensor alpha / copy-target / skip by regular expression, first match wins.",
        changes_output=True,
        flags=(  # both add up: the --rule ones first, then the file's
            CliFlag(
                "rule",
                ("--rule",),
                "Per-tensor rule REGEX=ALPHA, REGEX=copy-target or REGEX=skip (regex searched in the name); "
                "repeatable, first match wins.",
                _RULE_COMMANDS,
                type=list[str],
                parse=parse_rules,
            ),
            CliFlag(
                "rules",
                ("--rules",),
                "TOML file of [[rule]] tables (pattern + alpha or action).",
                _RULE_COMMANDS,
                parse=load_rules,
            ),
        ),
    ),
    OptionSpec(
        "threads",
        "int",
        "CPU threads for the math (None: all cores).",
        flags=(CliFlag("threads", ("--threads",), "CPU threads for the math (default: all cores).", _RUN_COMMANDS),),
    ),
    OptionSpec(
        "gpu_window_bytes",
        "size",
        "CUDA engine: size of the input windows registered with the GPU.",
        flags=(
            CliFlag(
                "gpu_window_size",
                ("--gpu-window-size",),
                "CUDA: input window registered with the GPU (256MiB).",
                (MERGE,),
            ),
        ),
    ),
    OptionSpec(
        "gpu_register",
        "bool",
        "CUDA engine: DMA straight from registered page-cache windows; False uses pinned staging buffers filled by "
        "host threads.",
        flags=(
            CliFlag(
                "gpu_staging",
                ("--gpu-staging",),
                "CUDA: copy inputs through pinned staging buffers, no registration.",
                (MERGE,),
                default=False,
                parse=operator.not_,
            ),
        ),
    ),
    OptionSpec(
        "gpu_slots",
        "int",
        "CUDA engine: device slots (3 inputs + 1 output of one chunk each) in flight.",
        flags=(CliFlag("gpu_slots", ("--gpu-slots",), "CUDA: chunks in flight on the device.", (MERGE,)),),
    ),
    OptionSpec(
        "stream",
        "bool",
        "inputs that are Hub repository ids are streamed: each shard is downloaded just before the merge reads it "
        "and deleted once nothing left needs it (local disk bounded by ``stream_disk``).",
        flags=(
            CliFlag(
                "stream",
                ("--stream",),
                "Hub inputs: download shards just ahead of the merge and delete them behind it.",
                _POLICY_COMMANDS,
                help_for={PLAN: "Hub inputs: say how much disk --stream needs and how often each shard is fetched."},
            ),
        ),
    ),
    OptionSpec(
        "stream_disk",
        "size",
        "with ``stream``: the most local disk the streamed inputs may use at once (None: no refetch plus room for "
        "``download_workers`` shards downloading ahead; ``plan --stream`` says how much).",
        flags=(
            CliFlag(
                "stream_disk",
                ("--stream-disk",),
                "With --stream: most local disk for inputs at once (default: no refetch + a few shards ahead).",
                _POLICY_COMMANDS,
            ),
        ),
    ),
    OptionSpec(
        "download_workers",
        "int",
        "with ``stream``: shards downloaded at once.",
        flags=(
            CliFlag(
                "download_workers",
                ("--download-workers",),
                "With --stream: shards downloaded at once.",
                _POLICY_COMMANDS,
            ),
        ),
    ),
    OptionSpec(
        "stream_dir",
        "str",
        "with ``stream``: the folder the shards go to (None: a hidden folder beside the output directory).",
        flags=(
            CliFlag(
                "stream_dir",
                ("--stream-dir",),
                "With --stream: folder for the shards (default: .OUT.streammerge-inputs beside OUT).",
                _POLICY_COMMANDS,
            ),
        ),
    ),
    OptionSpec(
        "overwrite",
        "bool",
        "replace a previous streammerge output in the output directory.",
        flags=(
            CliFlag(
                "overwrite",
                ("--overwrite",),
                "Replace a previous streammerge output.",
                _RUN_COMMANDS,
                help_for={MERGE: "Replace a previous streammerge output in OUT."},
            ),
        ),
    ),
    OptionSpec(
        "check_finite",
        "bool",
        "count elements that became NaN/inf although all three inputs were finite.",
        flags=(
            CliFlag(
                "check_finite",
                ("--check-finite",),
                "Report tensors that became NaN/inf from finite inputs.",
                _CHECK_COMMANDS,
            ),
        ),
    ),
    OptionSpec(
        "strict",
        "bool",
        "with ``check_finite``, fail the merge on the first such tensor.",
        flags=(CliFlag("strict", ("--strict",), "With --check-finite: fail on such a tensor.", _CHECK_COMMANDS),),
    ),
    OptionSpec(
        "copy_aux_files",
        "bool",
        "copy config, generation config, tokenizer and chat-template files from the target.",
        changes_output=True,
    ),
    OptionSpec(
        "extra_metadata",
        "table",
        "string metadata added to every output shard's header.",
        changes_output=True,
    ),
)

OPTION = {s.name: s for s in OPTIONS}

# The manifest's record of the options (MergeOptions.identity): every option that can change the output, and
# check_finite and strict, which change no byte but must keep a strict run from resuming on shards an unchecked run
# wrote. In the order manifests have always listed them: the manifest is written unsorted, so the order is part of
# its bytes.
IDENTITY_FIELDS = (
    "alpha",
    "out_dtype",
    "missing",
    "extra",
    "shape_mismatch",
    "unsupported_dtype",
    "max_shard_size",
    "copy_aux_files",
    "extra_metadata",
    "rules",
    "check_finite",
    "strict",
    "vocab_mismatch",
)


def _record(kind: str, value: Any) -> Any:
    """A field's value as the manifest records it (JSON)."""
    if kind == "float":
        return repr(float(value))
    if kind == "rules":
        return [r.describe() for r in value]
    if kind == "table":
        return dict(value)
    return value


def _restore(kind: str, value: Any) -> Any:
    """A field's value back from its record (the inverse of :func:`_record`)."""
    if kind == "float":
        return float(value)
    if kind == "rules":
        return tuple(Rule.parse(r) for r in value)
    return value


@dataclass(frozen=True)
class MergeOptions:
    """Every knob of a merge. Build with :meth:`create` to validate and normalise user input; each field is declared
    (what it does, its values, its flags) in :data:`OPTIONS`, from which the attribute list below is built.
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
    stream: bool = False
    stream_disk: int | None = None
    download_workers: int = 4
    stream_dir: str | None = None

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
        if kwargs.get("stream_disk") is not None:
            kwargs["stream_disk"] = parse_size(kwargs["stream_disk"], "--stream-disk")
        if kwargs.get("stream_dir") is not None:
            kwargs["stream_dir"] = os.fspath(kwargs["stream_dir"])
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
        if self.download_workers < 1:
            raise OptionsError(f"--download-workers: must be at least 1, got {self.download_workers}")
        if self.threads is not None and self.threads < 1:
            raise OptionsError(f"threads: must be at least 1, got {self.threads}")

    @property
    def chunk_elems(self) -> int:
        """Elements per chunk: every buffer, float32 scratch included, stays within ``chunk_bytes``."""
        return max(1, self.chunk_bytes // 4)

    def replace(self, **changes) -> MergeOptions:
        """These options with some fields changed, validated as :meth:`create` validates (rules stay `Rule` objects).

        Example:
            ```py
            >>> MergeOptions.create(alpha=1.0, out_dtype="bf16").replace(alpha=0.5).out_dtype
            'BF16'
            ```
        """
        return MergeOptions.create(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def identity(self) -> dict:
        """The options as a merge's manifest records them (:data:`IDENTITY_FIELDS`, in that order): JSON values,
        alpha as the ``repr`` of its float, rules as their ``REGEX=...`` text. Part of the fingerprint ``--resume``
        checks; :meth:`from_identity` reads it back."""
        return {name: _record(OPTION[name].kind, getattr(self, name)) for name in IDENTITY_FIELDS}

    @classmethod
    def from_identity(cls, identity: dict, **overrides) -> MergeOptions:
        """The options that shape an output's bytes, from a manifest's record of them (:meth:`identity`): fields
        absent from it keep their defaults, as do those that change no byte (check_finite, strict, the engine's).
        ``overrides`` (any field, as :meth:`create` takes it) win, e.g. ``chunk_bytes="4MiB"`` to recompute in small
        chunks. Keys other than options (the plan's kind, a combine's vectors) are ignored."""
        restored = {
            name: _restore(OPTION[name].kind, identity[name])
            for name in IDENTITY_FIELDS
            if OPTION[name].changes_output and identity.get(name) is not None
        }
        return cls.create(**{**restored, **overrides})


_FIELDS = {f.name: f for f in fields(MergeOptions)}


def _attributes_doc() -> str:
    """The docstring's attribute list, in field order, from the declaration."""
    lines = ["", "    Attributes:"]
    for f in fields(MergeOptions):  # f.type: the annotation as written (this module postpones annotations)
        text = f"{f.name} (`{f.type}`): {OPTION[f.name].help}"
        lines += textwrap.wrap(text, 120, initial_indent=" " * 8, subsequent_indent=" " * 12)
    return "\n".join(lines) + "\n    "


MergeOptions.__doc__ = (MergeOptions.__doc__ or "").rstrip() + "\n" + _attributes_doc()
