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
| output dtype | {o.out_dtype or "target's dtype per tensor"} |
| tensors merged | {p.merged} |{reasons}
| parameters | {p.parameters:,} |

Numerics: each element is computed in IEEE float32 as {math_line} (separate roundings, no
FMA) and rounded once to the output dtype, round-to-nearest-even; every NaN is written as the canonical quiet NaN.
The output bytes do not depend on the device that computed them.

Policies: missing={o.missing}, extra={o.extra}, shape-mismatch={o.shape_mismatch},
unsupported-dtype={o.unsupported_dtype}.
"""
