"""The DeepSeek-V3 tensor layout: MLA attention, dense and MoE MLPs, the MTP layer, FP8 weights with block scales."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..dtypes import DTYPES
from .layouts import TRANSFORMERS_VERSION

# The block-scaled FP8 format ("fine-grained FP8" in transformers): a quantized weight is a 2-D F8_E4M3 tensor W,
# and W + SCALE_SUFFIX holds one scale per block of block_size elements, value = e4m3(q) * scale.
FP8_DTYPE = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"
FP8_BLOCK_SIZE = (128, 128)
SCALE_DTYPES = ("F32", "BF16")  # F32 in DeepSeek's checkpoints; some publishers write BF16 scales
# What a checkpoint stores: "fp8" (the weights above quantized, as published) or "bf16" (every weight BF16 and no
# scales, what DeepSeek's fp8_cast_bf16.py writes).
FORMATS = ("fp8", "bf16")
# deepseek-ai/DeepSeek-V3 is published in 163 shards, named model-00001-of-000163.safetensors (five digits, then six).
DEEPSEEK_V3_SHARDS = 163


@dataclass(frozen=True)
class DeepSeekLayout:
    """The architecture facts that decide a DeepSeek-V3-style checkpoint's tensor names, shapes and config.json.

    Get one with [`get_deepseek_layout`], which also applies the shrink knobs. Layers ``0 .. first_k_dense - 1``
    have a dense MLP, the others a mixture of experts; the ``num_mtp_layers`` multi-token-prediction layers follow
    as ``model.layers.{num_layers} ...``, each an MoE layer with its own embedding, norms, projection and head.
    """

    name: str
    hidden_size: int
    intermediate_size: int  # the dense layers' MLP
    moe_intermediate_size: int  # each routed and shared expert
    num_layers: int
    first_k_dense: int
    num_experts: int
    num_shared_experts: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    vocab_size: int
    num_mtp_layers: int
    # Config-only facts (routing and position encoding): they decide no tensor.
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0


# deepseek-ai/DeepSeek-V3's config.json (DeepSeek-R1 and V3-0324 share it), and a tiny model of the same shape for
# fast tests: most sizes are not multiples of 128, so 128x128 blocks have partial edge blocks (kv_b_proj's 128 rows
# fill one exactly), weights have 1 to 6 blocks, and nearly every tensor stays within torch's 32768-element grain
# size, below which an op runs on one thread (on the loaded 2-core development machine, 2x faster generation).
DEEPSEEK_LAYOUTS: dict[str, DeepSeekLayout] = {
    layout.name: layout
    for layout in (
        DeepSeekLayout(
            name="deepseek-v3",
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_layers=61,
            first_k_dense=3,
            num_experts=256,
            num_shared_experts=1,
            num_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            vocab_size=129280,
            num_mtp_layers=1,
        ),
        DeepSeekLayout(
            name="tiny-deepseek-v3",
            hidden_size=160,
            intermediate_size=192,
            moe_intermediate_size=64,
            num_layers=3,
            first_k_dense=1,
            num_experts=4,
            num_shared_experts=1,
            num_heads=2,
            q_lora_rank=96,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            vocab_size=192,
            num_mtp_layers=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            max_position_embeddings=4096,
        ),
    )
}

# The knobs get_deepseek_layout accepts: every field that decides a tensor (the config-only ones follow them).
_SIZE_KNOBS = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_experts",
    "num_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "vocab_size",
)


def get_deepseek_layout(
    layout: str | DeepSeekLayout = "deepseek-v3",
    *,
    num_layers: int | None = None,
    first_k_dense: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    moe_intermediate_size: int | None = None,
    num_experts: int | None = None,
    num_shared_experts: int | None = None,
    num_heads: int | None = None,
    q_lora_rank: int | None = None,
    kv_lora_rank: int | None = None,
    qk_nope_head_dim: int | None = None,
    qk_rope_head_dim: int | None = None,
    v_head_dim: int | None = None,
    vocab_size: int | None = None,
    num_mtp_layers: int | None = None,
) -> DeepSeekLayout:
    """Look up a DeepSeek layout by name and apply shrink (or grow) knobs.

    Args:
        layout (`str` or [`DeepSeekLayout`], defaults to `"deepseek-v3"`): a key of [`DEEPSEEK_LAYOUTS`]
            ("deepseek-v3", "tiny-deepseek-v3") or a layout to modify.
        num_layers, first_k_dense, hidden_size, intermediate_size, moe_intermediate_size, num_experts,
            num_shared_experts, num_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
            vocab_size, num_mtp_layers (`int`, *optional*): replace the layout's value. Fewer experts than
            ``num_experts_per_tok`` lower it to match; ``n_group`` becomes the largest divisor of the expert count
            not above it (both are config-only).

    Returns:
        [`DeepSeekLayout`]: the (possibly modified) layout; its name is unchanged.

    Raises:
        `KeyError`: unknown layout name. `ValueError`: a size below its minimum.

    Example:
        ```python
        >>> get_deepseek_layout("deepseek-v3", num_layers=4, num_experts=8).num_experts
        8
        ```
    """
    if isinstance(layout, str):
        try:
            base = DEEPSEEK_LAYOUTS[layout]
        except KeyError:
            known = ", ".join(DEEPSEEK_LAYOUTS)
            raise KeyError(f"unknown DeepSeek layout {layout!r}; known layouts: {known}") from None
    else:
        base = layout
    changes = {
        "num_layers": num_layers,
        "first_k_dense": first_k_dense,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "moe_intermediate_size": moe_intermediate_size,
        "num_experts": num_experts,
        "num_shared_experts": num_shared_experts,
        "num_heads": num_heads,
        "q_lora_rank": q_lora_rank,
        "kv_lora_rank": kv_lora_rank,
        "qk_nope_head_dim": qk_nope_head_dim,
        "qk_rope_head_dim": qk_rope_head_dim,
        "v_head_dim": v_head_dim,
        "vocab_size": vocab_size,
        "num_mtp_layers": num_mtp_layers,
    }
    out = replace(base, **{k: v for k, v in changes.items() if v is not None})
    for name in _SIZE_KNOBS:
        if getattr(out, name) < 1:
            raise ValueError(f"layout {out.name!r}: {name} must be at least 1, got {getattr(out, name)}")
    for name in ("num_layers", "first_k_dense", "num_shared_experts", "num_mtp_layers"):
        if getattr(out, name) < 0:
            raise ValueError(f"layout {out.name!r}: {name} must be >= 0, got {getattr(out, name)}")
    per_tok = min(out.num_experts_per_tok, out.num_experts)
    groups = max(g for g in range(1, min(out.n_group, out.num_experts) + 1) if out.num_experts % g == 0)
    return replace(out, num_experts_per_tok=per_tok, n_group=groups, topk_group=min(out.topk_group, groups))


def scale_name(weight: str) -> str:
    """The name of the scale tensor of FP8 weight ``weight``: ``"...q_a_proj.weight"`` -> ``"..._scale_inv"``."""
    return weight + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...], block_size: tuple[int, int] = FP8_BLOCK_SIZE) -> tuple[int, int]:
    """The scale grid of a 2-D weight: ``[ceil(R / br), ceil(C / bc)]`` (edge blocks are partial)."""
    (rows, cols), (br, bc) = shape, block_size
    return -(-rows // br), -(-cols // bc)


def _is_moe(lay: DeepSeekLayout, index: int) -> bool:
    return index >= lay.first_k_dense


def _decoder_layer(lay: DeepSeekLayout, index: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """One decoder layer's tensors, with ``"W"`` standing for a linear weight (FP8 or BF16, decided later)."""
    h, heads = lay.hidden_size, lay.num_heads
    p = f"model.layers.{index}."
    a = p + "self_attn."
    out: list[tuple[str, str, tuple[int, ...]]] = [
        (a + "q_a_proj.weight", "W", (lay.q_lora_rank, h)),
        (a + "q_a_layernorm.weight", "BF16", (lay.q_lora_rank,)),
        (a + "q_b_proj.weight", "W", (heads * (lay.qk_nope_head_dim + lay.qk_rope_head_dim), lay.q_lora_rank)),
        (a + "kv_a_proj_with_mqa.weight", "W", (lay.kv_lora_rank + lay.qk_rope_head_dim, h)),
        (a + "kv_a_layernorm.weight", "BF16", (lay.kv_lora_rank,)),
        (a + "kv_b_proj.weight", "W", (heads * (lay.qk_nope_head_dim + lay.v_head_dim), lay.kv_lora_rank)),
        (a + "o_proj.weight", "W", (h, heads * lay.v_head_dim)),
    ]

    def mlp(prefix: str, inter: int) -> None:
        out.extend(
            [
                (prefix + "gate_proj.weight", "W", (inter, h)),
                (prefix + "up_proj.weight", "W", (inter, h)),
                (prefix + "down_proj.weight", "W", (h, inter)),
            ]
        )

    if _is_moe(lay, index):
        # The router stays BF16 and its bias F32 in the published checkpoint.
        out.append((p + "mlp.gate.weight", "BF16", (lay.num_experts, h)))
        out.append((p + "mlp.gate.e_score_correction_bias", "F32", (lay.num_experts,)))
        for e in range(lay.num_experts):
            mlp(f"{p}mlp.experts.{e}.", lay.moe_intermediate_size)
        if lay.num_shared_experts:  # the shared experts are one MLP of n_shared times the expert width
            mlp(p + "mlp.shared_experts.", lay.moe_intermediate_size * lay.num_shared_experts)
    else:
        mlp(p + "mlp.", lay.intermediate_size)
    out.append((p + "input_layernorm.weight", "BF16", (h,)))
    out.append((p + "post_attention_layernorm.weight", "BF16", (h,)))
    return out


def _mtp_layer(lay: DeepSeekLayout, index: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """A multi-token-prediction layer: its own embedding, two norms, the projection of their concatenation, a head."""
    h, p = lay.hidden_size, f"model.layers.{index}."
    return [
        (p + "embed_tokens.weight", "BF16", (lay.vocab_size, h)),
        (p + "enorm.weight", "BF16", (h,)),
        (p + "hnorm.weight", "BF16", (h,)),
        (p + "eh_proj.weight", "W", (h, 2 * h)),
        (p + "shared_head.norm.weight", "BF16", (h,)),
        (p + "shared_head.head.weight", "BF16", (lay.vocab_size, h)),
        *_decoder_layer(lay, index),
    ]


def deepseek_tensors(
    layout: str | DeepSeekLayout = "deepseek-v3",
    *,
    fmt: str = "fp8",
    scale_dtype: str = "F32",
    block_size: tuple[int, int] = FP8_BLOCK_SIZE,
) -> list[tuple[str, str, tuple[int, ...]]]:
    """Tensor names, safetensors dtypes and shapes of a DeepSeek-V3-style checkpoint, in save order.

    The embedding, the decoder layers (MLA attention: q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa,
    kv_a_layernorm, kv_b_proj, o_proj; then the dense MLP, or the router gate with its score-correction bias, the
    routed experts and the shared experts; then the two layer norms), the final norm, ``lm_head.weight``, and the MTP
    layers. In the ``"fp8"`` format every 2-D linear projection of attention, MLP and experts (and the MTP's
    ``eh_proj``) is F8_E4M3 and is followed by its scale ``W_scale_inv`` of shape [`scale_shape`]; embeddings, heads,
    norms and the router gate are BF16, the router bias F32.

    Args:
        layout (`str` or [`DeepSeekLayout`], defaults to `"deepseek-v3"`): see [`get_deepseek_layout`].
        fmt (`str`, defaults to `"fp8"`): one of [`FORMATS`]; ``"bf16"`` stores the quantized weights in BF16 and
            drops their scales.
        scale_dtype (`str`, defaults to `"F32"`): one of [`SCALE_DTYPES`].
        block_size (`tuple[int, int]`, defaults to ``(128, 128)``): rows and columns per scale block.

    Returns:
        `list[tuple[str, str, tuple[int, ...]]]`: ``(name, dtype, shape)``.

    Example:
        ```python
        >>> deepseek_tensors("deepseek-v3")[1:3]
        [('model.layers.0.self_attn.q_a_proj.weight', 'F8_E4M3', (1536, 7168)),
         ('model.layers.0.self_attn.q_a_proj.weight_scale_inv', 'F32', (12, 56))]
        ```
    """
    lay = get_deepseek_layout(layout)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"unsupported scale dtype {scale_dtype!r}; use one of {', '.join(SCALE_DTYPES)}")
    if len(block_size) != 2 or min(block_size) < 1:
        raise ValueError(f"block_size must be two positive integers, got {block_size!r}")
    h = lay.hidden_size
    spec = [("model.embed_tokens.weight", "BF16", (lay.vocab_size, h))]
    for i in range(lay.num_layers):
        spec += _decoder_layer(lay, i)
    spec += [("model.norm.weight", "BF16", (h,)), ("lm_head.weight", "BF16", (lay.vocab_size, h))]
    for i in range(lay.num_layers, lay.num_layers + lay.num_mtp_layers):
        spec += _mtp_layer(lay, i)
    out: list[tuple[str, str, tuple[int, ...]]] = []
    for name, dtype, shape in spec:
        if dtype != "W":
            out.append((name, dtype, shape))
        elif fmt == "bf16":
            out.append((name, "BF16", shape))
        else:
            out.append((name, FP8_DTYPE, shape))
            out.append((scale_name(name), scale_dtype, scale_shape(shape, tuple(block_size))))
    return out


def deepseek_num_params(layout: str | DeepSeekLayout = "deepseek-v3", *, include_mtp: bool = True) -> int:
    """Parameters (weight elements, scales not counted) of a DeepSeek layout.

    deepseek-ai/DeepSeek-V3: 671.0e9 without the MTP layer (the model card's "671B"), 684.5e9 with it (the Hub's
    "685B").
    """
    lay = get_deepseek_layout(layout)
    if not include_mtp:
        lay = replace(lay, num_mtp_layers=0)
    return sum(math.prod(shape) for _, _, shape in deepseek_tensors(lay, fmt="bf16"))


def deepseek_nbytes(
    layout: str | DeepSeekLayout = "deepseek-v3",
    *,
    fmt: str = "fp8",
    scale_dtype: str = "F32",
    block_size: tuple[int, int] = FP8_BLOCK_SIZE,
) -> int:
    """Bytes of tensor data of a DeepSeek checkpoint (the index's ``total_size``): 688.5e9 for the FP8 DeepSeek-V3."""
    tensors = deepseek_tensors(layout, fmt=fmt, scale_dtype=scale_dtype, block_size=block_size)
    return sum(math.prod(shape) * DTYPES[dtype].itemsize for _, dtype, shape in tensors)


def split_evenly(tensors: list[tuple[str, int]], num_shards: int) -> list[list[str]]:
    """Split tensors, in order, into at most ``num_shards`` contiguous shards of about equal bytes.

    A tensor goes to the shard its middle byte falls in, so no shard is empty unless one tensor is larger than a
    shard's share (then fewer shards come back). DeepSeek's 163 shards are cut like this, about 4.2 GB each.

    Args:
        tensors (`list[tuple[str, int]]`): ``(name, nbytes)`` in save order.
        num_shards (`int`): wanted number of shards, at least 1.

    Returns:
        `list[list[str]]`: names per shard, in file order.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    total = sum(nbytes for _, nbytes in tensors)
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    start = 0
    for name, nbytes in tensors:
        middle = 2 * start + nbytes  # twice the middle byte: integers only, exact for any size
        shards[min(num_shards - 1, middle * num_shards // max(2 * total, 1))].append(name)
        start += nbytes
    return [names for names in shards if names] or [[]]


def deepseek_shard_names(num_shards: int) -> list[str]:
    """Shard file names as DeepSeek publishes them: ``model-00001-of-000163.safetensors``; one file is
    ``model.safetensors``."""
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_shards:06d}.safetensors" for i in range(num_shards)]


def deepseek_config(
    layout: str | DeepSeekLayout = "deepseek-v3", *, fmt: str = "fp8", block_size: tuple[int, int] = FP8_BLOCK_SIZE
) -> dict:
    """The config.json of a DeepSeek checkpoint, with the fields deepseek-ai/DeepSeek-V3's config has.

    Args:
        layout (`str` or [`DeepSeekLayout`], defaults to `"deepseek-v3"`): see [`get_deepseek_layout`].
        fmt (`str`, defaults to `"fp8"`): ``"fp8"`` adds ``quantization_config`` (fp8, e4m3, ``block_size``,
            dynamic activations); ``"bf16"`` leaves it out, as a dequantized checkpoint has none.
        block_size (`tuple[int, int]`, defaults to ``(128, 128)``): recorded as ``weight_block_size``.

    Returns:
        `dict`: JSON-serializable config.
    """
    lay = get_deepseek_layout(layout)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
        },
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": lay.first_k_dense,
        "hidden_act": "silu",
        "hidden_size": lay.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": lay.intermediate_size,
        "kv_lora_rank": lay.kv_lora_rank,
        "max_position_embeddings": lay.max_position_embeddings,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": lay.moe_intermediate_size,
        "moe_layer_freq": 1,
        "n_group": lay.n_group,
        "n_routed_experts": lay.num_experts,
        "n_shared_experts": lay.num_shared_experts,
        "norm_topk_prob": True,
        "num_attention_heads": lay.num_heads,
        "num_experts_per_tok": lay.num_experts_per_tok,
        "num_hidden_layers": lay.num_layers,
        "num_key_value_heads": lay.num_heads,
        "num_nextn_predict_layers": lay.num_mtp_layers,
        "pretraining_tp": 1,
        "q_lora_rank": lay.q_lora_rank,
        "qk_nope_head_dim": lay.qk_nope_head_dim,
        "qk_rope_head_dim": lay.qk_rope_head_dim,
        "rms_norm_eps": lay.rms_norm_eps,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": lay.rope_theta,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": lay.topk_group,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "v_head_dim": lay.v_head_dim,
        "vocab_size": lay.vocab_size,
    }
    if fmt == "fp8":
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(block_size),
        }
    return config


def deepseek_generation_config() -> dict:
    """generation_config.json as deepseek-ai/DeepSeek-V3 publishes it (the sampling its model card recommends)."""
    return {
        "_from_model_config": True,
        "bos_token_id": 0,
        "do_sample": True,
        "eos_token_id": 1,
        "temperature": 0.6,
        "top_p": 0.95,
        "transformers_version": TRANSFORMERS_VERSION,
    }
