"""Deterministic synthetic checkpoint trios shaped like real Hugging Face models.

Used by ``streammerge demo``, the tests and the benchmarks. Three kinds of output:

- [`make_trio`]: three real checkpoints (target, sft, grpo) related like real fine-tunes of one base model,
  each sharded differently, with config.json, generation_config.json and small tokenizer files.
- [`make_checkpoint`]: one of them (or the shared base) alone; each role is a pure function of
  ``(seed, tensor name)``, so the three can be generated independently, in any order, by different processes.
- [`make_sparse_checkpoint`] / [`make_sparse_trio`]: files whose safetensors headers are real (full tensor table,
  exact offsets) but whose data region is a hole: 70B-scale layouts for plan and memory tests that cost no disk
  and read as zeros.

Tensor names, shapes, order and configs follow the real models ([`LAYOUTS`]); [`layout_tensors`] lists them in the
order ``save_pretrained`` uses. The modules, each importing only those above it in this list:

- ``layouts``: the real layouts, their tensor names, shapes, parameter counts and sizes, config.json.
- ``values``: the value definition (how each role's elements are generated from the seed).
- ``files``: a checkpoint directory's files besides tensor data (shard split, names, index, side files).
- ``dense``: [`make_checkpoint`] and [`make_trio`] (values generated and written shard by shard).
- ``sparse``: [`make_sparse_checkpoint`] and [`make_sparse_trio`] (headers over holes).

This package re-exports every public name; ``from streammerge import synth; synth.make_trio(...)`` is the way in.
"""

from __future__ import annotations

from ..checkpoint import INDEX_FILE, SINGLE_FILE
from .dense import GRPO_SHARD_MAX_BYTES, SFT_SHARD_MAX_BYTES, SINGLE_FILE_MAX_BYTES, make_checkpoint, make_trio
from .files import Trio, plan_shards
from .layouts import (
    GENERATED_DTYPES,
    LAYOUTS,
    Layout,
    get_layout,
    layers_for_size,
    layout_config,
    layout_nbytes,
    layout_num_params,
    layout_tensors,
)
from .sparse import SPARSE_SHARD_BYTES, make_sparse_checkpoint, make_sparse_trio, save_file_header
from .values import CHUNK_ELEMENTS, DEFAULT_NOISE, ROLES, NoiseScales

# Names kept so code written against the single-module synth keeps working (tests of earlier versions, scripts):
# the file names are streammerge.checkpoint's, and `build_header` was renamed because streammerge.format has a
# `build_header` that does something else (it keeps the order it is given; this one sorts like save_file).
SAFETENSORS_NAME = SINGLE_FILE
INDEX_NAME = INDEX_FILE
build_header = save_file_header

__all__ = [
    "CHUNK_ELEMENTS",
    "DEFAULT_NOISE",
    "GENERATED_DTYPES",
    "GRPO_SHARD_MAX_BYTES",
    "LAYOUTS",
    "ROLES",
    "SFT_SHARD_MAX_BYTES",
    "SINGLE_FILE_MAX_BYTES",
    "SPARSE_SHARD_BYTES",
    "Layout",
    "NoiseScales",
    "Trio",
    "build_header",
    "get_layout",
    "layers_for_size",
    "layout_config",
    "layout_nbytes",
    "layout_num_params",
    "layout_tensors",
    "make_checkpoint",
    "make_sparse_checkpoint",
    "make_sparse_trio",
    "make_trio",
    "plan_shards",
    "save_file_header",
]
