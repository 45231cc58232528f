"""Deterministic synthetic checkpoint trios shaped like real Hugging Face models.

Used by ``streammerge demo``, the tests and the benchmarks. Three kinds of output:

- [`make_trio`]: three real checkpoints (target, sft, grpo) related like real fine-tunes of one base model,
  each sharded differently, with config.json, generation_config.json and small tokenizer files.
- [`make_checkpoint`]: one of them (or the shared base) alone; each role is a pure function of
  ``(seed, tensor name)``, so the three can be generated independently, in any order, by different processes.
- [`make_sparse_checkpoint`] / [`make_sparse_trio`]: files whose safetensors headers are real (full tensor table,
  exact offsets) but whose data region is a hole: 70B-scale layouts for plan and memory tests that cost no disk
  and read as zeros.

Block-scaled FP8 checkpoints (issue 12) have the DeepSeek-V3 layout ([`DEEPSEEK_LAYOUTS`], [`deepseek_tensors`]):

- [`make_fp8_trio`] / [`make_fp8_checkpoint`]: real FP8 checkpoints (e4m3 weights, ``_scale_inv`` block scales in F32
  or BF16) related like fine-tunes, grpo leaving some blocks exactly as sft has them; BF16 and mixed variants.
- [`make_sparse_fp8_trio`] / [`make_sparse_fp8_checkpoint`]: the full 671B layout (91,992 tensors in 163 shards) as
  real headers over holes.

Tensor names, shapes, order and configs follow the real models ([`LAYOUTS`]); [`layout_tensors`] lists them in the
order ``save_pretrained`` uses. The modules, each importing only those above it in this list:

- ``layouts``: the real layouts, their tensor names, shapes, parameter counts and sizes, config.json.
- ``values``: the value definition (how each role's elements are generated from the seed).
- ``files``: a checkpoint directory's files besides tensor data (shard split, names, index, side files).
- ``dense``: [`make_checkpoint`] and [`make_trio`] (values generated and written shard by shard).
- ``sparse``: [`make_sparse_checkpoint`] and [`make_sparse_trio`] (headers over holes).
- ``deepseek``: the DeepSeek-V3 layout: tensor names, dtypes (FP8 weights and their scales), shapes, config.json.
- ``fp8``: block-scaled FP8 quantization of float32 weights with torch, and dequantization.
- ``fp8_dense``: [`make_fp8_checkpoint`] and [`make_fp8_trio`].
- ``fp8_sparse``: [`make_sparse_fp8_checkpoint`] and [`make_sparse_fp8_trio`].

This package re-exports every public name; ``from streammerge import synth; synth.make_trio(...)`` is the way in.
"""

from __future__ import annotations

from ..checkpoint import INDEX_FILE, SINGLE_FILE
from .deepseek import (
    DEEPSEEK_LAYOUTS,
    DEEPSEEK_V3_SHARDS,
    FP8_BLOCK_SIZE,
    FP8_DTYPE,
    SCALE_DTYPES,
    SCALE_SUFFIX,
    DeepSeekLayout,
    deepseek_config,
    deepseek_nbytes,
    deepseek_num_params,
    deepseek_shard_names,
    deepseek_tensors,
    get_deepseek_layout,
    scale_name,
    scale_shape,
    split_evenly,
)
from .dense import GRPO_SHARD_MAX_BYTES, SFT_SHARD_MAX_BYTES, SINGLE_FILE_MAX_BYTES, make_checkpoint, make_trio
from .files import Trio, plan_shards
from .fp8 import E4M3_MAX, dequantize_fp8_blocks, quantize_fp8_blocks
from .fp8_dense import FP8_NOISE, UNCHANGED_BLOCK_FRACTION, make_fp8_checkpoint, make_fp8_trio
from .fp8_sparse import SPARSE_FP8_SHARDS, make_sparse_fp8_checkpoint, make_sparse_fp8_trio
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
    "DEEPSEEK_LAYOUTS",
    "DEEPSEEK_V3_SHARDS",
    "DEFAULT_NOISE",
    "E4M3_MAX",
    "FP8_BLOCK_SIZE",
    "FP8_DTYPE",
    "FP8_NOISE",
    "GENERATED_DTYPES",
    "GRPO_SHARD_MAX_BYTES",
    "LAYOUTS",
    "ROLES",
    "SCALE_DTYPES",
    "SCALE_SUFFIX",
    "SFT_SHARD_MAX_BYTES",
    "SINGLE_FILE_MAX_BYTES",
    "SPARSE_FP8_SHARDS",
    "SPARSE_SHARD_BYTES",
    "UNCHANGED_BLOCK_FRACTION",
    "DeepSeekLayout",
    "Layout",
    "NoiseScales",
    "Trio",
    "build_header",
    "deepseek_config",
    "deepseek_nbytes",
    "deepseek_num_params",
    "deepseek_shard_names",
    "deepseek_tensors",
    "dequantize_fp8_blocks",
    "get_deepseek_layout",
    "get_layout",
    "layers_for_size",
    "layout_config",
    "layout_nbytes",
    "layout_num_params",
    "layout_tensors",
    "make_checkpoint",
    "make_fp8_checkpoint",
    "make_fp8_trio",
    "make_sparse_checkpoint",
    "make_sparse_fp8_checkpoint",
    "make_sparse_fp8_trio",
    "make_sparse_trio",
    "make_trio",
    "plan_shards",
    "quantize_fp8_blocks",
    "save_file_header",
    "scale_name",
    "scale_shape",
    "split_evenly",
]
