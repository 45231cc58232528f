"""The model card (README.md) written beside a merge's weights: what was merged, how, and with which numerics."""

from __future__ import annotations

from .plan import MergePlan, PlanKind, printable
from .version import __version__


def model_card(p: MergePlan) -> str:
    """A Hugging Face model card (README.md) recording what was merged and how."""
    o = p.options
    reasons = "".join(f"\n| copied: {k} | {v} |" for k, v in sorted(p.copied_reasons.items()))
    if p.kind is PlanKind.COMBINE:
        formula = "`θ_out = θ_target + Σᵢ αᵢ·(θ_grpo,ᵢ − θ_sft,ᵢ)`, the vectors added in the order below"
        rows = [f"| target | `{printable(p.sources['target'])}` |"]
        for i, v in enumerate(p.vectors, 1):
            diff = (
                f"`{printable(p.sources[v['vector']])}` (stored vector)"
                if "vector" in v
                else f"`{printable(p.sources[v['grpo']])}` − `{printable(p.sources[v['sft']])}`"
            )
            rules = f", rules {'; '.join(v['rules'])}" if v.get("rules") else ""
            rows.append(f"| vector {i} | {diff}, α = {v['alpha']!r}{rules} |")
        table = "\n".join(rows)
        math_line = "`r = t; r = r + αᵢ·(gᵢ − sᵢ)` for each vector in order"
    else:
        formula = "`θ_out = θ_target + α·(θ_grpo − θ_sft)`"
        table = (
            f"| target | `{printable(p.sources['target'])}` |\n| sft | `{printable(p.sources['sft'])}` |\n"
            f"| grpo | `{printable(p.sources['grpo'])}` |\n| α | {o.alpha!r} |"
        )
        math_line = "`d = g − s; m = α·d; r = t + m`"
    rules = f"\n| rules | {'; '.join(r.describe() for r in o.rules)} |" if o.rules else ""
    fp8 = p.fp8_summary()
    fp8_rows = ""
    fp8_numerics = ""
    if fp8:
        blocks = "; ".join(
            f"{role} {v['block'][0]}x{v['block'][1]} (from {v['from']})" for role, v in fp8["inputs"].items()
        )
        fp8_rows = (
            f"\n| FP8 tensors | {fp8['tensors']} block-scaled (blocks: {blocks}) |"
            f"\n| FP8 output | {fp8['output']}; quantization_config {fp8['quantization_config']} |"
        )
        fp8_numerics = (
            "\n\nBlock-scaled FP8 inputs are dequantized first (`x = e4m3(q) × scale`, one float32 multiply). An FP8 "
            "output is requantized per block of the target's grid: a block whose every value equals the target's "
            "keeps the target's bytes and scale; any other gets `scale = amax / 448` (stored in the scale dtype) and "
            "codes rounded to nearest even, saturating at ±448."
        )
    return f"""---
tags:
- merge
- streammerge
- reasoning-vector
---
# Merged with streammerge {__version__}

{formula} — the reasoning-vector transfer of Zbeeb, Hammoud and Ghanem,
"Reasoning Vectors: Transferring Chain-of-Thought Capabilities via Task Arithmetic" (arXiv:2509.01363).

| | |
|---|---|
{table}{rules}
| output dtype | {o.out_dtype or "target's dtype per tensor"} |{fp8_rows}
| tensors merged | {p.merged} |{reasons}
| parameters | {p.parameters:,} |

Numerics: each element is computed in IEEE float32 as {math_line} (separate roundings, no
FMA) and rounded once to the output dtype, round-to-nearest-even; every NaN is written as the canonical quiet NaN.
The output bytes do not depend on the device that computed them.{fp8_numerics}

Policies: missing={o.missing}, extra={o.extra}, shape-mismatch={o.shape_mismatch},
unsupported-dtype={o.unsupported_dtype}.
"""
