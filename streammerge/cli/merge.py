"""``streammerge merge``: one three-way merge, or a sweep of alphas in one pass (``--alpha 0.5,1,1.5``)."""

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
from .output import run_and_report, show_plan


@with_merge_options("merge")
def merge(
    target: TargetArg,
    sft: SftArg,
    grpo: GrpoArg,
    out: OutOrNullOpt = None,
    *,
    flags: MergeFlags,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted merge into OUT (same inputs and options).")
    ] = False,
    dry_run: DryRunOpt = False,
    sink: Annotated[
        str,
        typer.Option(
            "--sink", help="disk; or null / null-sha256: compute everything, discard the output (benchmarks)."
        ),
    ] = "disk",
    push_to: PushToOpt = None,
    private: PrivateOpt = False,
    part: PartOpt = None,
    dist_timeout: DistTimeoutOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge: OUT = TARGET + alpha * (GRPO - SFT), streamed chunk by chunk.

    Examples:

      streammerge merge Qwen2.5-7B-Instruct ./sft ./grpo -o ./merged

      streammerge merge target/ sft/ grpo/ -o out/ --alpha -1          # remove the vector

      streammerge merge target/ sft/ grpo/ -o sweep/ --alpha 0.5,1,1.5  # sweep/alpha-0.5/ ... in one pass

      streammerge merge t/ s/ g/ -o out/ --device cuda --chunk-size 256MiB --max-shard-size 10GB

      streammerge merge Qwen/Qwen2.5-1.5B-Instruct org/sft@main org/grpo -o out/ --push-to me/merged --private

      torchrun --nnodes 4 --nproc-per-node 8 ... -m streammerge merge t/ s/ g/ -o /shared/out/   # ranks split the files

      streammerge merge t/ s/ g/ -o /shared/out/ --part 2/4 && streammerge finalize /shared/out/

    TARGET, SFT and GRPO are local paths or Hub repo ids (org/name[@revision]).
    """

    if out is None and sink == "disk":
        raise typer.BadParameter("give the output directory with -o/--out (or use --sink null)", param_hint="-o")

    def body():
        from ..api import parse_alphas
        from ..options import MergeOptions

        alphas = parse_alphas(flags["alpha"])
        opts = MergeOptions.create(**{**option_kwargs(flags), "alpha": alphas[0]})
        sweep = alphas if len(alphas) > 1 else None
        if dry_run:
            from ..api import plan

            show_plan(plan(target, sft, grpo, out, options=opts, alphas=sweep), out, as_json)
            return
        if sweep:
            from ..api import refuse_push_for_sweep
            from ..api import sweep as sweep_fn

            refuse_push_for_sweep(push_to)

            def run(progress=None):
                return sweep_fn(
                    target,
                    sft,
                    grpo,
                    out,
                    sweep,
                    options=opts,
                    progress=progress,
                    resume=resume,
                    sink=sink,
                    part=part,
                    dist_timeout=dist_timeout,
                )

        else:
            from ..api import merge as merge_fn

            def run(progress=None):
                return merge_fn(
                    target,
                    sft,
                    grpo,
                    out,
                    options=opts,
                    progress=progress,
                    resume=resume,
                    sink=sink,
                    push_to=push_to,
                    private=private,
                    part=part,
                    dist_timeout=dist_timeout,
                )

        run_and_report(run, opts.check_finite, quiet, as_json)

    run_command(body)
