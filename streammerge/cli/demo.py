"""``streammerge demo``: three small synthetic checkpoints, merged, and the merge's report."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from .args import MergeFlags, option_kwargs, with_merge_options
from .errors import run_command
from .output import print_report


@with_merge_options("demo")
def demo(
    workdir: Annotated[
        str | None, typer.Option("--dir", help="Where to create the demo checkpoints (default: a temp directory).")
    ] = None,
    layout: Annotated[str, typer.Option("--layout", help="Synthetic layout (see streammerge.synth).")] = "tiny-qwen2",
    layers: Annotated[int | None, typer.Option("--layers", help="Number of transformer layers.")] = None,
    *,
    flags: MergeFlags,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the demo files (always kept with --dir).")] = False,
) -> None:
    """Create three small synthetic Qwen2-shaped checkpoints (sharded differently), merge them, print the report.

    Needs no network. Example:

      streammerge demo --layers 4
    """

    def body():
        from .. import synth
        from ..api import merge as merge_fn

        root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="streammerge-demo-"))
        try:
            print(f"creating synthetic {layout} checkpoints (target, sft, grpo) in {root}")
            trio = synth.make_trio(root, layout, num_layers=layers)
            for label, path in (("target", trio.target), ("sft", trio.sft), ("grpo", trio.grpo)):
                p = Path(path)
                shards = sorted(x.name for x in p.glob("*.safetensors"))
                print(f"  {label:6} {p} ({len(shards)} shard(s))")
            out = root / "merged"
            report = merge_fn(trio.target, trio.sft, trio.grpo, out, alpha=1.0, overwrite=True, **option_kwargs(flags))
            print_report(report, check_finite=False, as_json=False)
        finally:
            if not workdir and not keep:
                import shutil

                shutil.rmtree(root, ignore_errors=True)
            elif not workdir:
                print(f"kept {root}")

    run_command(body)
