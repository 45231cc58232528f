"""Test helpers: tiny synthetic checkpoints written with safetensors itself (an independent writer), readers of
tensors and bit patterns, and the command line of a `streammerge` subprocess."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def write_checkpoint(root: Path, tensors: dict[str, torch.Tensor], shards: int = 1, aux: bool = True) -> Path:
    """Write ``tensors`` as one model.safetensors or as ``shards`` shards plus an index (Hugging Face layout)."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        total = 0
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[i * per : (i + 1) * per]}
            save_file(part, str(root / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
            total += sum(t.numel() * t.element_size() for t in part.values())
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    if aux:
        (root / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
        (root / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
        (root / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return root


def load_all(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with safetensors' own reader."""
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def raw_bits(t: torch.Tensor) -> np.ndarray:
    """The tensor's bit patterns as uint16/uint32 numpy (for the independent reference)."""
    t = t.contiguous().reshape(-1)
    if t.element_size() == 2:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.view(torch.int32).numpy().view(np.uint32)


def from_bits(bits: np.ndarray, dtype: str, shape) -> torch.Tensor:
    signed = bits.view(np.int16 if bits.dtype == np.uint16 else np.int32)
    return torch.from_numpy(signed.copy()).view(TORCH[dtype]).reshape(shape)


def make_related(shapes: dict[str, tuple], dtype: str = "BF16", seed: int = 0):
    """Target/sft/grpo state dicts that share a base, like real fine-tunes."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    noise = lambda s, scale: torch.randn(s, generator=g) * scale  # noqa: E731
    target = {k: (v + noise(v.shape, 0.004)).to(TORCH[dtype]) for k, v in base.items()}
    sft = {k: (v + noise(v.shape, 0.002)).to(TORCH[dtype]) for k, v in base.items()}
    grpo = {k: (sft[k].float() + noise(v.shape, 0.001)).to(TORCH[dtype]) for k, v in base.items()}
    return target, sft, grpo


SMALL_SHAPES = {
    "model.embed_tokens.weight": (300, 64),
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.self_attn.q_proj.bias": (64,),
    "model.layers.0.mlp.up_proj.weight": (176, 64),
    "model.layers.0.input_layernorm.weight": (64,),
    "model.layers.1.self_attn.q_proj.weight": (64, 64),
    "model.layers.1.mlp.down_proj.weight": (64, 176),
    "model.norm.weight": (64,),
    "lm_head.weight": (300, 64),
}


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (to prove inputs are never modified)."""
    import hashlib

    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def streammerge_cmd(command: str, *args) -> list[str]:
    """The argv of ``python -m streammerge COMMAND ARGS...`` in this interpreter (paths and numbers as text)."""
    return [sys.executable, "-m", "streammerge", command, *map(str, args)]
