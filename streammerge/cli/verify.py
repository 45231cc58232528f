"""``streammerge verify``: check an output's structure, its recorded SHA-256s, and recomputed bytes."""

from __future__ import annotations

from typing import Annotated

import typer

from .args import JsonOpt, QuietOpt
from .errors import EXIT_ERROR, run_command
from .output import print_verify, with_progress


def verify(
    out: Annotated[str, typer.Argument(help="The merge output directory.")],
    target: Annotated[str | None, typer.Option("--target", help="Target checkpoint, to recompute chunks.")] = None,
    sft: Annotated[str | None, typer.Option("--sft", help="SFT checkpoint, to recompute chunks.")] = None,
    grpo: Annotated[str | None, typer.Option("--grpo", help="GRPO checkpoint, to recompute chunks.")] = None,
    vector: Annotated[
        str | None, typer.Option("--vector", help="For an apply output: the vector (with --target), to recompute.")
    ] = None,
    spec: Annotated[str | None, typer.Option("--spec", help="For a combine output: its spec, to recompute.")] = None,
    full: Annotated[bool, typer.Option("--full", help="Recompute every chunk (reads all inputs).")] = False,
    sample: Annotated[int, typer.Option("--sample", help="Chunks to recompute without --full.")] = 64,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Check an output: structure (index, files, headers), recorded SHA-256s, and recomputed bytes given the inputs.

    Exit 1 naming the first bad file and tensor. Examples:

      streammerge verify merged/

      streammerge verify merged/ --target t/ --sft s/ --grpo g/ --full

      streammerge verify combined/ --spec spec.toml --sample 256

      streammerge verify applied/ --target t/ --vector v/        # an apply output

      streammerge verify vector/ --sft s/ --grpo g/              # an extract output
    """

    def body():
        from ..verify import verify as verify_fn

        def run(progress=None):
            return verify_fn(
                out, target, sft, grpo, vector=vector, spec=spec, full=full, sample=sample, progress=progress
            )

        r = with_progress(run, quiet or as_json, label="verifying")
        print_verify(r, as_json)
        if not r.ok:
            raise typer.Exit(EXIT_ERROR)

    run_command(body)
