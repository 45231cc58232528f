"""The commands that read headers only: ``streammerge plan`` (a merge's layout and costs) and ``inspect``."""

from __future__ import annotations

from typing import Annotated

import typer

from .args import GrpoArg, JsonOpt, MergeFlags, SftArg, TargetArg, option_kwargs, with_merge_options
from .errors import run_command
from .output import print_checkpoint, show_plan


@with_merge_options("plan")
def plan(
    target: TargetArg,
    sft: SftArg,
    grpo: GrpoArg,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output directory, to check paths and disk.")] = None,
    *,
    flags: MergeFlags,
    as_json: JsonOpt = False,
) -> None:
    """Read headers only: pairing, output layout, bytes to move, disk and memory needed. Fails on what merge would.

    Examples:

      streammerge plan Qwen2.5-7B-Instruct ./sft ./grpo -o ./merged

      streammerge plan Qwen2.5-7B-Instruct ./sft ./grpo --alpha 0.5,1,1.5   # a sweep: outputs, disk, memory
    """

    def body():
        from ..api import parse_alphas
        from ..api import plan as plan_fn
        from ..options import MergeOptions

        alphas = parse_alphas(flags["alpha"])
        opts = MergeOptions.create(**{**option_kwargs(flags), "alpha": alphas[0]})
        p = plan_fn(target, sft, grpo, out, options=opts, alphas=alphas if len(alphas) > 1 else None)
        show_plan(p, out, as_json)

    run_command(body)


def inspect(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint directory, index or .safetensors file.")],
    as_json: JsonOpt = False,
) -> None:
    """Summarise a checkpoint: files, tensors, parameters, dtypes, largest shapes, block-scaled FP8 weights.

    Example:

      streammerge inspect ./Qwen2.5-7B-Instruct
    """

    def body():
        from ..checkpoint import open_checkpoint
        from ..errors import CheckpointError
        from ..plan import fp8_weights

        with open_checkpoint(checkpoint) as ck:
            dtypes: dict[str, int] = {}
            params = 0
            for r in ck.tensors.values():
                dtypes[r.dtype] = dtypes.get(r.dtype, 0) + 1
                params += r.numel
            largest = sorted(ck.tensors.values(), key=lambda r: -r.nbytes)[:5]
            info = {
                "checkpoint": ck.source,
                "files": [str(f.name) for f in ck.files],
                "index": str(ck.index_path.name) if ck.index_path else None,
                "tensors": len(ck.tensors),
                "parameters": params,
                "bytes": ck.total_bytes,
                "dtypes": dtypes,
                "largest": [{"name": r.name, "dtype": r.dtype, "shape": list(r.shape)} for r in largest],
                "aux_files": [p.name for p in ck.aux_files()],
            }
            try:
                w = fp8_weights(ck)
            except CheckpointError as e:  # inspect reports a malformed FP8 checkpoint instead of failing on it
                info["fp8"] = {"error": str(e)}
            else:
                if w.block is not None:
                    scale_dtypes: dict[str, int] = {}
                    for s in w.scales.values():
                        scale_dtypes[s.ref.dtype] = scale_dtypes.get(s.ref.dtype, 0) + 1
                    info["fp8"] = {
                        "weights": len(w.scales),
                        "block": list(w.block),
                        "block_from": w.block_from,
                        "scale_dtypes": scale_dtypes,
                        "quantization_config": w.quantization_config,
                    }
        print_checkpoint(info, as_json)

    run_command(body)
