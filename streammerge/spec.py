"""Many-vector specs: ``out = target + sum_i alpha_i * (grpo_i - sft_i)`` described in a TOML or YAML file.

A spec names the target and any number of vectors, each either a pair of checkpoints (``sft`` and ``grpo``) or a
stored vector written by ``streammerge extract`` (``vector``), with its alpha and optionally its own per-tensor
alpha rules. Global ``rules`` and an ``[options]`` table take any merge option. Paths are relative to the spec file;
anything that is not a path there may be a Hub repository id (``org/name@rev``).

Example (TOML)::

    target = "Qwen/Qwen2.5-7B-Instruct"
    rules = ["embed_tokens|lm_head=copy-target"]

    [[vectors]]            # the reasoning vector
    sft = "math-sft"
    grpo = "math-grpo"
    alpha = 1.0
    rules = ["self_attn=0.5"]

    [[vectors]]            # a vector extracted earlier, half strength
    vector = "code-vector"
    alpha = 0.5

    [options]
    out_dtype = "bf16"

Numerics (docs/numerics.md, "Many vectors"): per element, in IEEE float32 with no FMA,
``r = t32; r = r + f32(alpha_i) * (p32_i - m32_i)`` for i = 1..n in the order given, then one rounding to the output
dtype. With one vector this is exactly the three-way merge.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import OptionsError
from .options import OPTION, MergeOptions, Rule

SPEC_KEYS = ("target", "vectors", "rules", "options")
VECTOR_KEYS = ("sft", "grpo", "vector", "alpha", "rules")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# Options a spec gives elsewhere than in its [options] table.
ELSEWHERE_IN_SPEC = ("alpha", "rules")
# What an [options] value of each kind must be (sizes: "64MiB" or a byte count), and how the error says it.
_KIND_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "size": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), 'a size like "64MiB" or a byte count'),
    "str": (lambda v: isinstance(v, str), "a string"),
    "table": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()),
        "a table of strings",
    ),
}


@dataclass(frozen=True)
class VectorSpec:
    """One vector: ``alpha * (grpo - sft)``, or ``alpha * vector`` for a stored vector."""

    alpha: float
    sft: str | None = None
    grpo: str | None = None
    vector: str | None = None
    rules: tuple[Rule, ...] = ()

    def roles(self, i: int) -> dict[str, str]:
        """Checkpoint roles of vector ``i`` (1-based) and their sources."""
        if self.vector is not None:
            return {f"vector{i}": self.vector}
        return {f"sft{i}": self.sft, f"grpo{i}": self.grpo}  # type: ignore[dict-item]


@dataclass(frozen=True)
class Spec:
    """A parsed many-vector spec (see the module docstring for the format)."""

    target: str
    vectors: tuple[VectorSpec, ...]
    rules: tuple[Rule, ...] = ()
    options: dict = field(default_factory=dict)
    source: str = "<spec>"


def _rules(where: str, value, alpha_only: bool) -> tuple[Rule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise OptionsError(f"{where}: rules must be a list of 'REGEX=ALPHA' strings or {{pattern, alpha}} tables")
    out = []
    for j, r in enumerate(value):
        try:
            if isinstance(r, str):
                rule = Rule.parse(r)
            elif isinstance(r, dict) and isinstance(r.get("pattern"), str):
                if "alpha" in r:
                    rule = Rule(r["pattern"], "alpha", _alpha("", r["alpha"])).checked()
                else:
                    rule = Rule(r["pattern"], str(r.get("action", ""))).checked()
            else:
                raise OptionsError("expected 'REGEX=ALPHA' or a table with 'pattern' and 'alpha' (or 'action')")
        except OptionsError as e:
            raise OptionsError(f"{where}: rule {j + 1}: {e}") from None
        if alpha_only and rule.action != "alpha":
            raise OptionsError(
                f"{where}: rule {j + 1} ({rule.describe()}): a vector's own rules set its alpha only; put "
                "copy-target and skip rules in the spec's top-level rules"
            )
        out.append(rule)
    return tuple(out)


def _alpha(where: str, value) -> float:
    prefix = f"{where}: " if where else ""
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            raise OptionsError(f"{prefix}alpha must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionsError(f"{prefix}alpha must be a number, got {value!r}")
    a = float(value)
    if not math.isfinite(a) or abs(a) > 3.4028234663852886e38:
        raise OptionsError(f"{prefix}alpha must be a finite float32, got {value!r}")
    return a


def _options(source: str, options) -> dict:
    """Check an ``[options]`` table key by key against the declaration (`streammerge.options.OPTIONS`), so an error
    names the spec and the key."""
    if not isinstance(options, dict):
        raise OptionsError(f"{source}: 'options' must be a table of merge options")
    # in MergeOptions' field order, as the error has always listed them
    known = [f.name for f in fields(MergeOptions) if f.name not in ELSEWHERE_IN_SPEC]
    for key, value in options.items():
        where = f"{source}: [options] {key}"
        if key in ELSEWHERE_IN_SPEC:
            raise OptionsError(f"{where}: not allowed here: alphas go in each vector, rules at the top level")
        if key not in known:
            raise OptionsError(f"{where}: unknown option; known: {', '.join(known)}")
        ok, kind = _KIND_CHECKS[OPTION[key].kind]
        if not ok(value):
            raise OptionsError(f"{where}: must be {kind}, got {value!r}")
        try:
            MergeOptions.create(**{key: value})
        except (OptionsError, TypeError, ValueError) as e:
            raise OptionsError(f"{where}: {e}") from None
    return dict(options)


def _resolve(base: Path | None, value, where: str) -> str:
    """A path relative to the spec's directory (never to the working directory), or a Hub repository id: a value
    of the form ``org/name[@rev]`` with nothing of that name beside the spec."""
    if not isinstance(value, str) or not value:
        raise OptionsError(f"{where}: expected a checkpoint path or Hub repository id, got {value!r}")
    value = os.path.expanduser(value)
    if base is None or os.path.isabs(value):
        return value
    candidate = base / value
    if candidate.exists() or not _REPO_ID.match(value):
        return str(candidate)
    return value


def parse_spec(data: dict, source: str = "<spec>", base_dir: str | os.PathLike | None = None) -> Spec:
    """Validate a spec given as a mapping (what a TOML/YAML file holds). Relative paths resolve against
    ``base_dir`` when they exist there. Raises `OptionsError` naming the spec and the offending key."""
    base = Path(base_dir) if base_dir is not None else None
    if not isinstance(data, dict):
        raise OptionsError(f"{source}: a spec is a table/mapping with 'target' and 'vectors'")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise OptionsError(f"{source}: unknown key(s) {', '.join(unknown)}; a spec has {', '.join(SPEC_KEYS)}")
    if "target" not in data:
        raise OptionsError(f"{source}: missing 'target' (the checkpoint the vectors are added to)")
    target = _resolve(base, data["target"], f"{source}: target")
    vectors_in = data.get("vectors")
    if not isinstance(vectors_in, list) or not vectors_in:
        raise OptionsError(f"{source}: 'vectors' must be a non-empty list of tables ([[vectors]] in TOML)")
    vectors = []
    for i, v in enumerate(vectors_in, 1):
        where = f"{source}: vectors[{i}]"
        if not isinstance(v, dict):
            raise OptionsError(f"{where}: expected a table with sft and grpo (or vector) and alpha")
        unknown = sorted(set(v) - set(VECTOR_KEYS))
        if unknown:
            raise OptionsError(
                f"{where}: unknown key(s) {', '.join(unknown)}; a vector has sft, grpo, vector, alpha, rules"
            )
        pair = "sft" in v or "grpo" in v
        if pair == ("vector" in v) or (pair and not ("sft" in v and "grpo" in v)):
            raise OptionsError(f"{where}: give either both 'sft' and 'grpo', or 'vector' (from streammerge extract)")
        alpha = _alpha(where, v.get("alpha", 1.0))
        rules = _rules(where, v.get("rules"), alpha_only=True)
        if pair:
            vs = VectorSpec(
                alpha,
                sft=_resolve(base, v["sft"], f"{where}.sft"),
                grpo=_resolve(base, v["grpo"], f"{where}.grpo"),
                rules=rules,
            )
        else:
            vs = VectorSpec(alpha, vector=_resolve(base, v["vector"], f"{where}.vector"), rules=rules)
        vectors.append(vs)
    options = _options(source, data.get("options", {}))
    return Spec(
        target, tuple(vectors), _rules(f"{source}: rules", data.get("rules"), alpha_only=False), dict(options), source
    )


def load_spec(spec: str | os.PathLike | dict | Spec) -> Spec:
    """A :class:`Spec` from a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file, a mapping, or a `Spec`."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec)
    path = Path(spec)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise OptionsError(f"{path}: cannot read the spec ({e.strerror or e})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise OptionsError(f"{path}: invalid YAML{where}: {problem}") from None
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise OptionsError(f"{path}: invalid TOML ({e}); YAML specs need a .yaml or .yml name") from None
    return parse_spec(data, str(path), path.parent)
