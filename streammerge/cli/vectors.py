"""Stored and many vectors: ``streammerge extract`` (write GRPO - SFT), ``apply`` (add one) and ``combine`` (many)."""

from __future__ import annotations

from typing import Annotated

import typer

from .args import (
    DistTimeoutOpt,
    DryRunOpt,
    GrpoArg,
    JsonOpt,
    MergeFlags,
    OutOrNullOpt,
    PartOpt,
    PrivateOpt,
    PushToOpt,
    QuietOpt,
    SftArg,
    TargetArg,
    option_kwargs,
    with_merge_options,
)
from .errors import run_command
from .output import run_and_report, show_plan, stderr


@with_merge_options("extract")
def extract(
    sft: SftArg,
    grpo: GrpoArg,
    out: Annotated[str, typer.Option("--out", "-o", help="Output directory for the vector (new or empty).")],
    dtype: Annotated[
        str, typer.Option("--dtype", help="fp32 (exact: apply == merge byte for byte) or bf16/fp16 (adds a rounding).")
    ] = "fp32",
    *,
    flags: MergeFlags,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted extraction.")] = False,
    part: PartOpt = None,
    dist_timeout: DistTimeoutOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the reasoning vector V = GRPO - SFT as a safetensors checkpoint, to apply to many targets.

    Examples:

      streammerge extract ./sft ./grpo -o ./reasoning-vector

      streammerge apply Qwen2.5-7B-Instruct ./reasoning-vector -o ./merged --alpha 1
    """

    def body():
        from ..api import extract as extract_fn
        from ..options import MergeOptions

        if dtype.lower() not in ("fp32", "f32", "float32"):
            stderr(f"note: a {dtype} vector adds a rounding; apply will not be byte-identical to a three-way merge")
        opts = MergeOptions.create(**option_kwargs(flags))

        def run(progress=None):
            return extract_fn(
                sft,
                grpo,
                out,
                dtype=dtype,
                options=opts,
                progress=progress,
                resume=resume,
                part=part,
                dist_timeout=dist_timeout,
            )

        run_and_report(run, opts.check_finite, quiet, as_json, label="extracting")

    run_command(body)


@with_merge_options("apply")
def apply(
    target: TargetArg,
    vector: Annotated[str, typer.Argument(help="A vector written by `streammerge extract`.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output directory (new or empty).")],
    *,
    flags: MergeFlags,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted apply.")] = False,
    push_to: Annotated[
        str | None, typer.Option("--push-to", help="Upload the verified output to this Hub repo.")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to: a private repo.")] = False,
    any_vector: Annotated[
        bool, typer.Option("--any-vector", help="Accept a VECTOR not written by `streammerge extract`.")
    ] = False,
    part: PartOpt = None,
    dist_timeout: DistTimeoutOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """OUT = TARGET + alpha * VECTOR, with a vector from `streammerge extract` (fp32 vectors: the same bytes as merge).

    Examples:

      streammerge apply Qwen2.5-7B-Instruct ./reasoning-vector -o ./with-reasoning

      streammerge apply ./model ./reasoning-vector -o ./without-reasoning --alpha -1

      streammerge apply ./model ./reasoning-vector -o ./sweep --alpha 0.5,1,1.5   # sweep/alpha-0.5/ ... in one pass
    """

    def body():
        from ..api import parse_alphas
        from ..options import MergeOptions

        alphas = parse_alphas(flags["alpha"])
        opts = MergeOptions.create(**{**option_kwargs(flags), "alpha": alphas[0]})
        if len(alphas) > 1:
            from ..api import apply_sweep, refuse_push_for_sweep

            refuse_push_for_sweep(push_to)

            def run(progress=None):
                return apply_sweep(
                    target,
                    vector,
                    out,
                    alphas,
                    options=opts,
                    progress=progress,
                    resume=resume,
                    any_vector=any_vector,
                    part=part,
                    dist_timeout=dist_timeout,
                )

        else:
            from ..api import apply as apply_fn

            def run(progress=None):
                return apply_fn(
                    target,
                    vector,
                    out,
                    options=opts,
                    progress=progress,
                    resume=resume,
                    push_to=push_to,
                    private=private,
                    any_vector=any_vector,
                    part=part,
                    dist_timeout=dist_timeout,
                )

        run_and_report(run, opts.check_finite, quiet, as_json)

    run_command(body)


@with_merge_options("combine", overrides_spec=True)
def combine(
    spec: Annotated[
        str, typer.Argument(help="TOML or YAML spec: target, \\[\\[vectors]] (sft+grpo or vector, alpha).")
    ],
    out: OutOrNullOpt = None,
    *,
    flags: MergeFlags,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run (same spec).")] = False,
    dry_run: DryRunOpt = False,
    sink: Annotated[str, typer.Option("--sink", help="disk, null or null-sha256 (benchmarks).")] = "disk",
    push_to: PushToOpt = None,
    private: PrivateOpt = False,
    part: PartOpt = None,
    dist_timeout: DistTimeoutOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Many vectors: OUT = TARGET + sum_i alpha_i * (GRPO_i - SFT_i), every input read once.

    The spec (TOML, or YAML with a .yaml/.yml name) lists the target and the vectors, each a pair (sft, grpo) or a
    stored vector from `streammerge extract`, with its alpha and optional per-vector rules ("REGEX=ALPHA"). Top-level
    rules (REGEX=ALPHA|copy-target|skip) and an \\[options] table work as in merge; options given here override the
    spec's. Paths are relative to the spec file. Vectors are added left to right in float32, rounded once.

    Examples:

      streammerge combine spec.toml -o merged/

      streammerge combine spec.toml --dry-run

    A spec:

      target = "Qwen/Qwen2.5-7B-Instruct"
      rules = ["embed_tokens|lm_head=copy-target"]
      \\[\\[vectors]]
      sft = "./math-sft"
      grpo = "./math-grpo"
      alpha = 1.0
      \\[\\[vectors]]
      vector = "./code-vector"
      alpha = 0.5
    """
    if out is None and sink == "disk" and not dry_run:
        raise typer.BadParameter("give the output directory with -o/--out (or use --sink null)", param_hint="-o")

    def body():
        from ..api import combine as combine_fn
        from ..api import plan_combine

        # Only what was given on the command line overrides the spec's [options]: a flag can only switch on.
        kw = {k: v for k, v in option_kwargs(flags).items() if v is not False}
        if dry_run:
            show_plan(plan_combine(spec, out, **kw), out, as_json)
            return

        def run(progress=None):
            return combine_fn(
                spec,
                out,
                progress=progress,
                resume=resume,
                sink=sink,
                push_to=push_to,
                private=private,
                part=part,
                dist_timeout=dist_timeout,
                **kw,
            )

        run_and_report(run, kw.get("check_finite", False), quiet, as_json)

    run_command(body)
