"""``streammerge finalize``: publish a merge written in parts (``--part I/N``) once every part has finished."""

from __future__ import annotations

from typing import Annotated

import typer

from .args import JsonOpt
from .errors import run_command
from .output import print_json


def finalize(
    out: Annotated[str, typer.Argument(help="The output directory the parts wrote into.")],
    as_json: JsonOpt = False,
) -> None:
    """Publish a merge written in parts once every part is done: index, copied files, card, manifest.

    Checks that every output file is written by parts of one plan first; otherwise refuses, naming the missing
    files and parts, and touches nothing.

    Examples:

      for i in 1 2 3 4; do streammerge merge t/ s/ g/ -o /shared/out --part $i/4; done   # or a SLURM array

      streammerge finalize /shared/out
    """

    def body():
        from ..api import finalize as finalize_fn

        files = finalize_fn(out)
        if as_json:
            print_json({"out_dir": out, "files": files})
        else:
            typer.echo(f"finalized {out}: {len(files)} files, index and manifest written")

    run_command(body)
