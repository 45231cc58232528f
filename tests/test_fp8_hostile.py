"""Malformed block-scaled FP8 inputs: one clear error naming the file and the tensor, exit status 1 and no traceback
from the command line, nothing written, inputs untouched.

The battery: an FP8 weight without its scale (in the target, in sft), a scale of the wrong shape or dtype, a NaN or
infinite scale, a block size in config.json that disagrees with the shapes or is not two positive integers, an
unreadable config.json, no config.json and shapes that do not tell the block size, an FP8 tensor that is not 2-D,
an e5m2 target with FP8 output. What is legal stays legal: a zero scale, e5m2 inputs, an e5m2 target with a
dequantized output, a scale in another shard.

``plan`` reads headers only, so it refuses everything here except the scale values (NaN/inf), which the merge
checks before it creates any output file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fp8_reference import Fp8Tensor, PlainTensor, merge, quantize, round_to
from helpers import tree_digest
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import streammerge
from streammerge.cli import app

SUFFIX = "_scale_inv"
BLOCK = (4, 8)
SHAPE = (10, 20)  # 3 x 3 blocks of 4 x 8, the last row and column of blocks partial


def _fp8(seed: int, shape=SHAPE, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    codes, scales = quantize((rng.standard_normal(shape) * 0.05).astype(np.float32), block)
    return torch.from_numpy(codes).view(torch.float8_e4m3fn), torch.from_numpy(scales.view(np.float32).copy())


def _write(
    root: Path, tensors: dict[str, torch.Tensor], config: dict | str | None = "default", shards: int = 1
) -> Path:
    root.mkdir(parents=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i * per : (i + 1) * per]}
        save_file(part, str(root / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    if shards > 1:
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config == "default":
        config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(BLOCK)}}
    if isinstance(config, dict):
        (root / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", **config}))
    elif isinstance(config, str):
        (root / "config.json").write_text(config)
    return root


def _good(seed: int) -> dict[str, torch.Tensor]:
    q, s = _fp8(seed)
    return {"w": q, "w" + SUFFIX: s, "norm": torch.ones(20)}


def _trio(tmp_path: Path, target=None, sft=None, grpo=None, configs=("default",) * 3) -> tuple[Path, Path, Path]:
    parts = [target or _good(0), sft or _good(1), grpo or _good(2)]
    return tuple(_write(tmp_path / role, t, c) for role, t, c in zip(("target", "sft", "grpo"), parts, configs))


def _refused(dirs, tmp_path: Path, *must: str, plan_too: bool = True, args: tuple[str, ...] = ()) -> str:
    """Merge (and plan) through the CLI: exit 1, one line naming ``must``, no traceback, no output, inputs unchanged."""
    before = {d: tree_digest(d) for d in dirs}
    out = tmp_path / "out"
    runner = CliRunner()
    commands = [["merge", *map(str, dirs), "-o", str(out), "--device", "cpu", *args]]
    if plan_too:
        commands.append(["plan", *map(str, dirs), *args])
    for argv in commands:
        r = runner.invoke(app, argv)
        assert r.exit_code == 1, (argv[0], r.output)
        assert "Traceback" not in r.output and r.output.startswith("error: "), r.output
        for text in must:
            assert text in r.output, (argv[0], text, r.output)
    assert not out.exists(), "something was written"
    assert {d: tree_digest(d) for d in dirs} == before, "an input changed"
    return r.output


def test_weight_without_its_scale(tmp_path) -> None:
    t = _good(0)
    del t["w" + SUFFIX]
    dirs = _trio(tmp_path, target=t)
    _refused(dirs, tmp_path, "target checkpoint", "w (in ", "model.safetensors) has no w_scale_inv")
    s = _good(1)
    del s["w" + SUFFIX]
    dirs = _trio(tmp_path / "sft-side", sft=s)
    _refused(dirs, tmp_path / "sft-side", "sft checkpoint", "has no w_scale_inv")


@pytest.mark.parametrize(
    "scale,what",
    [
        (torch.ones(3, 2), "w_scale_inv [3, 2]"),  # a grid of 4 x 10 blocks
        (torch.ones(9), "w_scale_inv F32[9]"),  # not 2-D
        (torch.ones(3, 3, dtype=torch.float16), "w_scale_inv F16[3, 3]"),  # neither F32 nor BF16
        (torch.ones(3, 3, dtype=torch.int32), "w_scale_inv I32[3, 3]"),
    ],
    ids=["shape", "1-d", "f16", "i32"],
)
def test_scale_of_the_wrong_shape_or_dtype(tmp_path, scale, what) -> None:
    t = _good(0)
    t["w" + SUFFIX] = scale
    _refused(_trio(tmp_path, target=t), tmp_path, what, "model.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_infinite_scale(tmp_path, value) -> None:
    g = _good(2)
    g["w" + SUFFIX][2, 1] = value
    dirs = _trio(tmp_path, grpo=g)
    out = _refused(dirs, tmp_path, "w_scale_inv in ", "grpo", "non-finite", "at [2, 1]", plan_too=False)
    assert "1 block scale tensor(s) hold NaN or infinite scales" in out
    assert CliRunner().invoke(app, ["plan", *map(str, dirs)]).exit_code == 0  # headers cannot tell


def test_a_zero_scale_is_legal(tmp_path) -> None:
    t = _good(0)
    t["w" + SUFFIX][1, 1] = 0.0
    dirs = _trio(tmp_path, target=t)
    streammerge.merge(*dirs, tmp_path / "out", device="cpu")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as h:
        got = h.get_tensor("w").view(torch.uint8).numpy()
    want = merge(*[_as_ref(d) for d in dirs], 1.0)
    assert np.array_equal(got, want.codes)


def _as_ref(d: Path) -> Fp8Tensor:
    with safe_open(str(d / "model.safetensors"), "pt") as h:
        q, s = h.get_tensor("w"), h.get_tensor("w" + SUFFIX)
    fmt = "F8_E5M2" if q.dtype == torch.float8_e5m2 else "F8_E4M3"
    return Fp8Tensor(q.view(torch.uint8).numpy(), s.view(torch.int32).numpy().view(np.uint32), BLOCK, "F32", fmt)


def test_config_block_size_disagrees_with_the_shapes(tmp_path) -> None:
    cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    dirs = _trio(tmp_path, configs=("default", cfg, "default"))
    _refused(
        dirs,
        tmp_path,
        "sft",
        "config.json: quantization_config.weight_block_size [128, 128] disagrees",
        "w_scale_inv [3, 3]",
    )


@pytest.mark.parametrize("bad", [[128], [0, 128], "128x128", [128.0, 128], [True, 128]])
def test_config_block_size_is_not_two_positive_integers(tmp_path, bad) -> None:
    cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": bad}}
    dirs = _trio(tmp_path, configs=(cfg, "default", "default"))
    _refused(dirs, tmp_path, "target", "config.json: quantization_config.weight_block_size is", "two positive integers")


def test_unreadable_config_json(tmp_path) -> None:
    dirs = _trio(tmp_path, configs=("default", "{not json", "default"))
    _refused(dirs, tmp_path, "sft", "config.json: cannot read it as JSON")


def test_no_config_and_shapes_that_do_not_tell_the_block(tmp_path) -> None:
    # [10, 20] with a [3, 3] grid: only 4 rows per block give 3 rows of blocks, but 7, 8 or 9 columns give 3 columns
    dirs = _trio(tmp_path, configs=(None, "default", "default"))
    _refused(
        dirs,
        tmp_path,
        "target checkpoint",
        "cannot tell the FP8 block size from the shapes",
        "blocks of 7 to 9 columns",
        "weight_block_size",
    )


def test_no_config_and_shapes_that_tell_the_block(tmp_path) -> None:
    """Without config.json the block is inferred where only one size fits every scale grid."""
    t = _good(0)
    t["v"], t["v" + SUFFIX] = _fp8(5, (16, 128))  # [4, 16] in 4 x 8 blocks: with w's [3, 3], only 8 columns fit
    dirs = _trio(tmp_path, target=t, configs=(None, "default", "default"))
    plan = streammerge.plan(*dirs, missing="copy-target")
    assert plan.fp8["inputs"]["target"] == {"block": [4, 8], "from": "shapes", "weights": 2}


@pytest.mark.parametrize("shape", [(200,), (2, 10, 10)], ids=["1-d", "3-d"])
def test_fp8_tensor_not_2d(tmp_path, shape) -> None:
    t = _good(0)
    t["odd"] = torch.zeros(shape).to(torch.float8_e4m3fn)
    t["odd" + SUFFIX] = torch.ones(1, 1)
    _refused(_trio(tmp_path, target=t), tmp_path, f"odd F8_E4M3{list(shape)}", "not 2-D", "model.safetensors")


def test_e5m2_target_with_fp8_output(tmp_path) -> None:
    t = _good(0)
    t["w"] = t["w"].view(torch.uint8).bitwise_and(0x7B).view(torch.float8_e5m2)  # finite e5m2 codes
    dirs = _trio(tmp_path, target=t)
    _refused(dirs, tmp_path, "w (F8_E5M2)", "F8_E4M3 only", "--out-dtype bf16")
    # decoded fine as an input, and with a dequantized output
    streammerge.merge(*dirs, tmp_path / "deq", device="cpu", out_dtype="bf16")
    with safe_open(str(tmp_path / "deq" / "model.safetensors"), "pt") as h:
        got = h.get_tensor("w").view(torch.int16).numpy().view(np.uint16)
    want = merge(*[_as_ref(d) for d in dirs], 1.0, out_dtype="BF16")
    assert np.array_equal(got.reshape(-1), want.bits.reshape(-1))


def test_scale_in_another_shard_and_bf16_inputs_need_no_scales(tmp_path) -> None:
    """Not errors: sft's scale in another shard than its weight, grpo in BF16 with no scales at all."""
    s = _good(1)
    s = {"w": s["w"], "norm": s["norm"], "w" + SUFFIX: s["w" + SUFFIX]}
    g = _good(2)
    g_plain = round_to(np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32) * 0.05, "BF16")
    g = {"w": torch.from_numpy(g_plain.view(np.int16).copy()).view(torch.bfloat16), "norm": g["norm"]}
    root = tmp_path
    dirs = (_write(root / "t", _good(0)), _write(root / "s", s, shards=3), _write(root / "g", g, config={}))
    streammerge.merge(*dirs, root / "out", device="cpu")
    with safe_open(str(root / "out" / "model.safetensors"), "pt") as h:
        got = h.get_tensor("w").view(torch.uint8).numpy()
    with safe_open(str(dirs[1] / "model-00001-of-00003.safetensors"), "pt") as h:
        sq = h.get_tensor("w").view(torch.uint8).numpy()
    with safe_open(str(dirs[1] / "model-00003-of-00003.safetensors"), "pt") as h:
        ss = h.get_tensor("w" + SUFFIX).view(torch.int32).numpy().view(np.uint32)
    want = merge(_as_ref(dirs[0]), Fp8Tensor(sq, ss, BLOCK), PlainTensor(g_plain, "BF16"), 1.0)
    assert np.array_equal(got, want.codes)
