"""The files of a checkpoint directory besides tensor data: shard split and names, index, config and tokenizer JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from ..checkpoint import INDEX_FILE, SINGLE_FILE
from .layouts import TRANSFORMERS_VERSION, Layout, layout_config, special_tokens


class Trio(NamedTuple):
    """Directories of the three checkpoints of a merge: ``out = target + alpha * (grpo - sft)``."""

    target: Path
    sft: Path
    grpo: Path

    @classmethod
    def under(cls, root: str | os.PathLike) -> Trio:
        """The trio at ``root/target``, ``root/sft`` and ``root/grpo``, where [`make_trio`] writes one."""
        root_path = Path(root)
        return cls(root_path / "target", root_path / "sft", root_path / "grpo")


def _size_bytes(size: int | float | str | None) -> int | None:
    """Accept 5e9, 5_000_000_000 or "5GB" (decimal units, as huggingface_hub; "MiB" etc. binary)."""
    if size is None:
        return None
    if isinstance(size, str):
        s = size.strip().upper()
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9}
        units |= {"TB": 10**12, "B": 1}
        unit = next((u for u in units if s.endswith(u)), "B")
        try:
            size = float(s[: len(s) - len(unit)] if s.endswith(unit) else s) * units[unit]
        except ValueError:
            raise ValueError(f"cannot read shard size {size!r}; give bytes (5e9) or a string like '5GB'") from None
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {size}")
    return int(size)


def plan_shards(tensors: list[tuple[str, int]], max_shard_bytes: int | float | str | None) -> list[list[str]]:
    """Split tensors into shards the way huggingface_hub's ``split_state_dict_into_shards_factory`` does.

    Greedy in order: a tensor that would tip the current shard over the cap starts a new shard; a tensor bigger
    than the cap gets a shard of its own (appended when met, so it may precede the shard being filled).

    Args:
        tensors (`list[tuple[str, int]]`): ``(name, nbytes)`` in save order.
        max_shard_bytes (`int`, `float`, `str` or `None`): the cap; ``None`` means a single shard.

    Returns:
        `list[list[str]]`: names per shard, in file order.
    """
    cap = _size_bytes(max_shard_bytes)
    if cap is None:
        return [[name for name, _ in tensors]]
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, nbytes in tensors:
        if nbytes > cap:
            shards.append([name])
            continue
        if current_size + nbytes > cap:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(shards: list[list[str]]) -> list[str]:
    """The shards' file names as ``save_pretrained`` gives them: ``model.safetensors``, or ``model-0000i-of-0000n``."""
    if len(shards) == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]


def prepare_directory(directory: str | os.PathLike, overwrite: bool) -> Path:
    """Create ``directory``; remove the weights and index of an earlier checkpoint there only when ``overwrite``."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    stale = sorted(path.glob("*.safetensors")) + sorted(path.glob(INDEX_FILE))
    if stale and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint ({stale[0].name}); pass overwrite=True to replace it")
    for f in stale:
        f.unlink()
    return path


def write_index(directory: Path, shards: list[list[str]], files: list[str], total_size: int) -> None:
    """Write ``model.safetensors.index.json`` for a sharded checkpoint (a single file has none)."""
    if len(files) == 1:
        return
    weight_map = {name: file for names, file in zip(shards, files, strict=True) for name in names}
    write_json(directory / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def _generation_config(lay: Layout) -> dict:
    config = layout_config(lay)
    out = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    if lay.model_type == "qwen2":
        out |= {"do_sample": False, "max_new_tokens": 2048}
    return out | {"transformers_version": TRANSFORMERS_VERSION}


_CHAT_TEMPLATES = {
    "qwen2": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama": (
        "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}
_WORDS = (
    "the of and to in is was for on that with as by it at from his an were are which this be or has had not "
    "first one their its new after but who they have her she two been other when there all during into school "
    "time may years more most only over city some world would where later up such used many can state about "
    "national out known university united then made model weights merge reason step answer think so"
).split()


def _tokenizer_files(lay: Layout) -> dict[str, dict]:
    """A minimal, valid ``tokenizers`` JSON (WordLevel over ASCII punctuation/letters and some words) + its config."""
    specials = special_tokens(lay)
    words = [chr(c) for c in range(33, 127)] + [w for w in _WORDS if len(w) > 1] + ["<unk>"]
    words = words[: max(1, min(len(words), specials[0][1]))]
    if words[-1] != "<unk>":
        words[-1] = "<unk>"
    # The special tokens sit in the model's vocabulary too: ``tokenizers`` gives an added token that the model lacks
    # the next free id after the model's vocabulary, not the id written beside it.
    vocab = {w: i for i, w in enumerate(words)} | dict(specials)
    added = [
        {
            "id": tid,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for tok, tid in specials
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    config = layout_config(lay)
    names = {tid: tok for tok, tid in specials}
    eos = names[config["eos_token_id"]]
    tokenizer_config = {
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "bos_token": None if lay.model_type == "qwen2" else names[config["bos_token_id"]],
        "chat_template": _CHAT_TEMPLATES[lay.model_type],
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_max_length": lay.max_position_embeddings,
        "pad_token": eos,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": tokenizer_config}


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as the generated checkpoints' JSON files are written: indented, keys sorted, one final newline."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_side_files(directory: Path, lay: Layout, dtype: str) -> None:
    """Write config.json, generation_config.json, tokenizer.json and tokenizer_config.json for ``lay``."""
    write_json(directory / "config.json", layout_config(lay, dtype=dtype))
    write_json(directory / "generation_config.json", _generation_config(lay))
    for name, obj in _tokenizer_files(lay).items():
        write_json(directory / name, obj)
