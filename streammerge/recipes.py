"""Plan recipes: open the inputs of each kind of job (merge, sweep, extract, apply, combine) and build its plan.

The library entry points (api) and verify both start here, so verify rebuilds exactly the plan that made an output
without reaching up into api.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .checkpoint import TensorSource
from .errors import OptionsError
from .options import MergeOptions
from .plan import MergePlan, PlanKind, VectorInput, build_plan, build_vector_plan, sweep_plan
from .sources import StreamInputs, close_all, open_sources, open_trio
from .spec import Spec

# What `extract` records in its headers, and what apply/combine require of a stored vector.
VECTOR_FORMULA = "grpo - sft"


@dataclass
class Planned:
    """A plan with its inputs: ``inputs`` is what the engine reads by role (an apply has no ``sft``: None);
    ``opened`` is every source opened for it, closed by :meth:`close` (or the ``with`` block)."""

    plan: MergePlan
    inputs: dict[str, TensorSource | None]
    opened: dict[str, TensorSource]

    def close(self) -> None:
        close_all(self.opened.values())

    def __enter__(self) -> Planned:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sweep_dirname(alpha: float) -> str:
    """The directory of one alpha's output in a sweep: ``alpha-0.5``, ``alpha-1``, ``alpha--1``, ``alpha-1e-05``."""
    text = repr(float(alpha))
    return f"alpha-{text[:-2] if text.endswith('.0') else text}"


def parse_alphas(value) -> list[float]:
    """One alpha or several: a number, a sequence of numbers, or text like ``"0.5,1,1.5"``."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not all(parts):
            raise OptionsError(f"alpha: {value!r}: expected a number or a comma-separated list like 0.5,1,1.5")
        try:
            return [float(p) for p in parts]
        except ValueError:
            raise OptionsError(
                f"alpha: {value!r}: expected a number or a comma-separated list like 0.5,1,1.5"
            ) from None
    items = list(value) if isinstance(value, Iterable) else [value]
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        raise OptionsError(f"alpha: {value!r}: expected numbers") from None


def check_sweep_alphas(values: list[float]) -> None:
    """A sweep takes two or more alphas, each giving its own output directory."""
    names = [sweep_dirname(a) for a in values]
    if len(values) < 2:
        raise OptionsError("a sweep needs two or more alphas (for one, use merge or apply)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise OptionsError(f"alpha: repeated value(s) {', '.join(dup)}; give each alpha once")


def _planned(build, opened: dict[str, TensorSource]) -> Planned:
    """Run ``build()`` -> (plan, engine inputs); close what was opened if it raises."""
    try:
        plan, inputs = build()
    except BaseException:
        close_all(opened.values())
        raise
    return Planned(plan, inputs, opened)


def trio(
    target, sft, grpo, opts: MergeOptions, alphas: list[float] | None = None, *, headers_only=False, sources=None
) -> Planned:
    """``target + alpha * (grpo - sft)``, or with ``alphas`` (two or more) a sweep over them. ``sources``: what the
    headers record as the inputs (verify passes the manifest's)."""
    if alphas is not None:
        check_sweep_alphas(alphas)
    opened = open_trio(target, sft, grpo, headers_only=headers_only, stream=StreamInputs.of(opts))

    def build():
        t, s, g = (opened[k] for k in ("target", "sft", "grpo"))
        if alphas is None:
            return build_plan(t, s, g, opts, sources=sources), opened
        return sweep_plan([build_plan(t, s, g, opts.replace(alpha=a), sources=sources) for a in alphas]), opened

    return _planned(build, opened)


def extract(sft, grpo, opts: MergeOptions, sources=None) -> Planned:
    """The plan of ``grpo - sft`` laid out as grpo (grpo is the engine's target too: its non-floating tensors are
    copied)."""
    # labels target=sft, sft=grpo, grpo=grpo (a second map of grpo; streamed: one download)
    opened = open_trio(sft, grpo, grpo, stream=StreamInputs.of(opts))

    def build():
        sft_ck, grpo_ck = opened["target"], opened["grpo"]
        src = sources or {"target": "-", "sft": sft_ck.source, "grpo": grpo_ck.source}
        p = build_plan(grpo_ck, sft_ck, grpo_ck, opts, sources=src, kind=PlanKind.VECTOR)
        return p, {"target": grpo_ck, "sft": sft_ck, "grpo": grpo_ck}

    return _planned(build, opened)


def is_stored_vector(source: TensorSource) -> bool:
    """Whether ``source`` was written by `extract` (adding a whole model by mistake would add its weights)."""
    return source.metadata.get("streammerge_formula") == VECTOR_FORMULA


def apply(target, vector, alphas: list[float], opts: MergeOptions, any_vector: bool, sources=None) -> Planned:
    """``target + alpha * vector`` (a sweep plan for several alphas)."""
    opened = open_trio(target, vector, vector, stream=StreamInputs.of(opts))

    def build():
        vec = opened["grpo"]
        if not any_vector and not is_stored_vector(vec):
            raise OptionsError(
                f"{vec.files[0]}: not a vector written by `streammerge extract` (its metadata has no "
                "streammerge_formula 'grpo - sft'); applying a whole model would add its weights. Pass --any-vector "
                "if it really is a difference of two checkpoints"
            )
        src = sources or {"target": opened["target"].source, "sft": "-", "grpo": vec.source}
        t, s = opened["target"], opened["sft"]
        plans = [build_plan(t, s, vec, opts.replace(alpha=a), sources=src, kind=PlanKind.APPLY) for a in alphas]
        return (sweep_plan(plans) if len(plans) > 1 else plans[0]), {"target": t, "sft": None, "grpo": vec}

    return _planned(build, opened)


def spec_options(spec: Spec, options: MergeOptions | None, kwargs: dict) -> MergeOptions:
    """A spec's ``[options]`` and rules, overridden by ``options`` and then by keywords."""
    base = {**spec.options, **({"rules": spec.rules} if spec.rules else {})}
    if options is not None:
        return options.replace(**{**base, **kwargs})
    try:
        return MergeOptions.create(**{**base, **kwargs})
    except TypeError as e:
        raise OptionsError(f"{spec.source}: [options]: {e}") from None


def combine(spec: Spec, opts: MergeOptions, headers_only: bool = False) -> Planned:
    """Open every checkpoint of a spec and build its plan; stored vectors must come from ``streammerge extract``."""
    sources = {"target": spec.target}
    for i, v in enumerate(spec.vectors, 1):
        sources.update(v.roles(i))
    where = {"target": f"{spec.source}: target"}
    for i, v in enumerate(spec.vectors, 1):
        where.update({role: f"{spec.source}: vectors[{i}].{role.rstrip('0123456789')}" for role in v.roles(i)})
    opened = open_sources(sources, headers_only=headers_only, where=where, stream=StreamInputs.of(opts))

    def build():
        vectors = []
        for i, v in enumerate(spec.vectors, 1):
            if v.vector is not None:
                ck = opened[f"vector{i}"]
                if not is_stored_vector(ck):
                    raise OptionsError(
                        f"{spec.source}: vectors[{i}]: {v.vector} is not a vector written by `streammerge extract` "
                        "(no streammerge_formula 'grpo - sft' in its metadata); give a pair as sft and grpo instead"
                    )
                vectors.append(VectorInput(f"vector{i}", ck, None, None, v.alpha, v.rules))
            else:
                vectors.append(
                    VectorInput(f"grpo{i}", opened[f"grpo{i}"], f"sft{i}", opened[f"sft{i}"], v.alpha, v.rules)
                )
        labelled = {k: ck.source for k, ck in opened.items()}
        return build_vector_plan(opened["target"], vectors, opts, labelled, kind=PlanKind.COMBINE), opened

    return _planned(build, opened)
