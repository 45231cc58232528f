"""The real Qwen2.5 / Llama-3 tensor layouts: names, shapes and order, parameter counts, sizes, config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..dtypes import BLENDABLE_DTYPES, DTYPES, torch_dtype
from ..options import OUT_DTYPE_ALIASES

if TYPE_CHECKING:
    import torch

# The dtypes a synthetic checkpoint can be stored in: the generator computes every value in float32 and rounds it
# once per stored model, exactly what the merge's blendable dtypes allow (BF16, F16, F32).
GENERATED_DTYPES = BLENDABLE_DTYPES
# Recorded in config.json and generation_config.json, as the real models' files record the version that wrote them.
TRANSFORMERS_VERSION = "4.45.2"


@dataclass(frozen=True)
class Layout:
    """The architecture facts that decide a checkpoint's tensor names, shapes and config.json.

    Get one with [`get_layout`], which also applies the shrink knobs (layers, hidden, vocab, ...).
    """

    name: str
    model_type: str  # "qwen2" or "llama": decides the architecture class and config fields
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry biases (Qwen2), o_proj never does
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _qwen(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tie: bool, ctx: int):
    return Layout(name, "qwen2", hidden, inter, layers, heads, kv, vocab, tie, True, ctx, 1e-6, 1_000_000.0)


def _llama(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int):
    return Layout(name, "llama", hidden, inter, layers, heads, kv, 128256, False, False, 8192, 1e-5, 500_000.0)


# The real models' numbers (their config.json on the Hub), plus a tiny Qwen2-shaped model for fast tests.
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        _qwen("tiny-qwen2", 64, 176, 2, 4, 2, 512, True, 2048),
        _qwen("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, True, 32768),
        _qwen("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, 151936, True, 131072),
        _qwen("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, False, 131072),
        _llama("llama3-8b", 4096, 14336, 32, 32, 8),
        _llama("llama3-70b", 8192, 28672, 80, 64, 8),
    )
}


def dtype_code(dtype: str | torch.dtype) -> str:
    """The safetensors code of a storage dtype given as a code, an alias ("bf16", "half", ...) or a ``torch.dtype``.

    Raises:
        `ValueError`: not one of [`GENERATED_DTYPES`].
    """
    if not isinstance(dtype, str):
        import torch  # only a torch.dtype argument needs it: layouts themselves are plain numbers

        if isinstance(dtype, torch.dtype):
            for code in GENERATED_DTYPES:
                if torch_dtype(code) == dtype:
                    return code
            raise ValueError(f"unsupported dtype {dtype}; use BF16, F16 or F32")
    code = OUT_DTYPE_ALIASES.get(dtype.lower(), dtype.upper())
    if code not in GENERATED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use BF16, F16 or F32")
    return code


def get_layout(
    layout: str | Layout,
    *,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    tie_word_embeddings: bool | None = None,
) -> Layout:
    """Look up a layout by name and apply shrink (or grow) knobs.

    Args:
        layout (`str` or [`Layout`]): a key of [`LAYOUTS`] ("tiny-qwen2", "qwen2.5-0.5b", "qwen2.5-1.5b",
            "qwen2.5-7b", "llama3-8b", "llama3-70b") or a layout to modify.
        num_layers, hidden_size, intermediate_size, vocab_size, num_heads, num_kv_heads (`int`, *optional*):
            replace the layout's value. ``hidden_size`` must stay divisible by ``num_heads``, and ``num_heads`` by
            ``num_kv_heads``.
        tie_word_embeddings (`bool`, *optional*): whether ``lm_head.weight`` is left out (shares the embedding).

    Returns:
        [`Layout`]: the (possibly modified) layout; its name is unchanged.

    Raises:
        `KeyError`: unknown layout name. `ValueError`: inconsistent sizes.

    Example:
        ```python
        >>> get_layout("qwen2.5-1.5b", num_layers=4).num_layers
        4
        ```
    """
    if isinstance(layout, str):
        try:
            base = LAYOUTS[layout]
        except KeyError:
            raise KeyError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}") from None
    else:
        base = layout
    changes = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "tie_word_embeddings": tie_word_embeddings,
    }
    out = replace(base, **{k: v for k, v in changes.items() if v is not None})
    for field in ("hidden_size", "intermediate_size", "vocab_size", "num_heads", "num_kv_heads"):
        if getattr(out, field) < 1:
            raise ValueError(f"layout {out.name!r}: {field} must be at least 1, got {getattr(out, field)}")
    if out.num_layers < 0:
        raise ValueError(f"layout {out.name!r}: num_layers must be >= 0, got {out.num_layers}")
    if out.hidden_size % out.num_heads:
        raise ValueError(f"layout {out.name!r}: hidden_size {out.hidden_size} not divisible by {out.num_heads} heads")
    if out.num_heads % out.num_kv_heads:
        raise ValueError(f"layout {out.name!r}: {out.num_heads} heads not divisible by {out.num_kv_heads} kv heads")
    return out


def layout_tensors(layout: str | Layout, num_layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a layout, in the order ``save_pretrained`` writes them.

    The embedding first, then each decoder layer (attention q/k/v/o with their biases where the model has them,
    MLP gate/up/down, the two RMSNorms), the final norm, and ``lm_head.weight`` unless the embeddings are tied.

    Args:
        layout (`str` or [`Layout`]): see [`get_layout`].
        num_layers (`int`, *optional*): overrides the layout's number of decoder layers.

    Returns:
        `list[tuple[str, tuple[int, ...]]]`: ``(name, shape)`` pairs.

    Example:
        ```python
        >>> layout_tensors("tiny-qwen2")[:2]
        [('model.embed_tokens.weight', (512, 64)), ('model.layers.0.self_attn.q_proj.weight', (64, 64))]
        ```
    """
    lay = get_layout(layout, num_layers=num_layers)
    h, inter = lay.hidden_size, lay.intermediate_size
    q_dim, kv_dim = lay.num_heads * lay.head_dim, lay.num_kv_heads * lay.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (lay.vocab_size, h))]
    for i in range(lay.num_layers):
        p = f"model.layers.{i}."
        for proj, dim in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            out.append((f"{p}self_attn.{proj}.weight", (dim, h)))
            if lay.attention_bias:
                out.append((f"{p}self_attn.{proj}.bias", (dim,)))
        out.append((f"{p}self_attn.o_proj.weight", (h, q_dim)))
        out.append((f"{p}mlp.gate_proj.weight", (inter, h)))
        out.append((f"{p}mlp.up_proj.weight", (inter, h)))
        out.append((f"{p}mlp.down_proj.weight", (h, inter)))
        out.append((f"{p}input_layernorm.weight", (h,)))
        out.append((f"{p}post_attention_layernorm.weight", (h,)))
    out.append(("model.norm.weight", (h,)))
    if not lay.tie_word_embeddings:
        out.append(("lm_head.weight", (lay.vocab_size, h)))
    return out


def layout_num_params(layout: str | Layout, num_layers: int | None = None) -> int:
    """Number of parameters (elements) of a layout, e.g. ~7.6e9 for "qwen2.5-7b" and ~70.6e9 for "llama3-70b"."""
    return sum(math.prod(shape) for _, shape in layout_tensors(layout, num_layers))


def layout_nbytes(layout: str | Layout, dtype: str = "BF16", num_layers: int | None = None) -> int:
    """Bytes of tensor data of a checkpoint of this layout (what the index's ``total_size`` says)."""
    return layout_num_params(layout, num_layers) * DTYPES[dtype_code(dtype)].itemsize


def layers_for_size(layout: str | Layout, target_bytes: int | float, dtype: str = "BF16") -> int:
    """The number of decoder layers that brings a checkpoint of ``layout`` closest to ``target_bytes``.

    The embedding (and an untied ``lm_head``) are fixed costs, so the answer is at least 1 even when they alone
    exceed the target.

    Args:
        layout (`str` or [`Layout`]): see [`get_layout`]; its other knobs are kept.
        target_bytes (`int` or `float`): wanted checkpoint size in bytes (decimal: 2e9 is "2GB").
        dtype (`str`, defaults to `"BF16"`): storage dtype.

    Returns:
        `int`: the layer count (may exceed the real model's).

    Example:
        ```python
        >>> layers_for_size("qwen2.5-1.5b", 2e9)  # 16 layers: 1.96 GB
        16
        ```
    """
    fixed = layout_nbytes(layout, dtype, num_layers=0)
    per_layer = layout_nbytes(layout, dtype, num_layers=1) - fixed
    return max(1, round((float(target_bytes) - fixed) / per_layer))


def special_tokens(lay: Layout) -> list[tuple[str, int]]:
    """The special tokens of the layout's model family and their ids, shared by config.json and the tokenizer."""
    # Real ids where the vocabulary has room for them, else the top of the (shrunk) vocabulary.
    if lay.model_type == "qwen2":
        first, offsets = 151643, [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)]
    else:
        first = 128000
        offsets = [
            ("<|begin_of_text|>", 0),
            ("<|end_of_text|>", 1),
            ("<|start_header_id|>", 6),
            ("<|end_header_id|>", 7),
            ("<|eot_id|>", 9),
        ]
    span = offsets[-1][1] + 1
    if lay.vocab_size < span + 1:
        raise ValueError(f"layout {lay.name!r}: vocab_size {lay.vocab_size} leaves no room for {span} special ids")
    if first + span > lay.vocab_size:
        first = lay.vocab_size - span
    return [(tok, first + off) for tok, off in offsets]


def layout_config(layout: str | Layout, num_layers: int | None = None, dtype: str = "BF16") -> dict:
    """The config.json of a checkpoint of this layout, with the fields the real model's config has.

    Args:
        layout (`str` or [`Layout`]): see [`get_layout`].
        num_layers (`int`, *optional*): overrides the number of decoder layers.
        dtype (`str`, defaults to `"BF16"`): recorded as ``torch_dtype``.

    Returns:
        `dict`: JSON-serializable config (``architectures``, ``model_type``, sizes, ``rope_theta``, ...).
    """
    lay = get_layout(layout, num_layers=num_layers)
    specials = dict(special_tokens(lay))
    common = {
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": lay.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": lay.intermediate_size,
        "max_position_embeddings": lay.max_position_embeddings,
        "model_type": lay.model_type,
        "num_attention_heads": lay.num_heads,
        "num_hidden_layers": lay.num_layers,
        "num_key_value_heads": lay.num_kv_heads,
        "rms_norm_eps": lay.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": lay.rope_theta,
        "tie_word_embeddings": lay.tie_word_embeddings,
        # transformers records the torch dtype's name ("bfloat16"), the same name the dtype table keeps.
        "torch_dtype": DTYPES[dtype_code(dtype)].torch_name,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": lay.vocab_size,
    }
    if lay.model_type == "qwen2":
        eos = specials["<|endoftext|>"]
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "bos_token_id": eos,
            "eos_token_id": eos,
            "max_window_layers": lay.num_layers,
            "sliding_window": lay.max_position_embeddings,
            "use_mrope": False,
            "use_sliding_window": False,
            **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": lay.attention_bias,
        "bos_token_id": specials["<|begin_of_text|>"],
        "eos_token_id": specials["<|end_of_text|>"],
        "head_dim": lay.head_dim,
        "mlp_bias": False,
        "pretraining_tp": 1,
        **common,
    }
