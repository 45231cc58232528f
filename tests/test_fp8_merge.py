"""Block-scaled FP8 merges (issue 12) end to end, every output byte compared with the independent numpy reference.

The expected bytes come from ``tests/fp8_reference.py`` (numpy, no streammerge code) applied to the inputs as
safetensors itself reads them; the outputs are read back the same way. On a mismatch the first differing index and
both values are printed. Covered: FP8 output and dequantized outputs (BF16/F16/F32), F32 and BF16 scales, mixed
BF16/FP8 inputs both ways, scales in other shards, hostile values (NaN codes, saturation, infinities through e5m2,
all-zero blocks, zero scales, edge blocks, an outlier dominating a block, blocks the vector leaves unchanged), alpha
= 0 reproducing the target's bytes, several inputs' block sizes at once, chunk, sub-block and thread invariance,
sweeps, combine, extract and apply, rules, verify, resume, ``--check-finite``, the layout (each weight's scales right
after it, hashed in offset order), the engine choice, plan/inspect/model card reporting, memory bounded by the chunk
on a sparse FP8 tensor, and the full DeepSeek-V3 layout (sparse files): a plan of the whole and a merge of a layer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fp8_reference import (
    Fp8Tensor,
    PlainTensor,
    blend,
    dequantize,
    quantize,
    requantize,
    round_to,
    store_scale,
    to_f32,
    widen_scale,
)
from helpers import streammerge_cmd, tree_digest
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import streammerge
from streammerge import synth
from streammerge.cli import app
from streammerge.format import read_header

SUFFIX = "_scale_inv"
DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
TORCH = {v: k for k, v in DTYPES.items()}
ALPHAS = (1.0, -1.0, 0.5, 1e-3, 0.0)


# ------------------------------------------------------------------------------------------------ reading


def _bits(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    if t.element_size() == 1:
        return t.view(torch.uint8).numpy().copy()
    if t.element_size() == 2:
        return t.view(torch.int16).numpy().view(np.uint16).copy()
    if t.element_size() == 4:
        return t.view(torch.int32).numpy().view(np.uint32).copy()
    return t.view(torch.int64).numpy().view(np.uint64).copy()


def read_dir(d: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a checkpoint directory as (safetensors dtype, bit patterns), read with safetensors itself."""
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                out[k] = (DTYPES.get(t.dtype, str(t.dtype)), _bits(t))
    return out


def block_of(d: Path) -> tuple[int, int]:
    qc = json.loads((Path(d) / "config.json").read_text()).get("quantization_config", {})
    return tuple(qc.get("weight_block_size", (128, 128)))


def as_reference(raw: dict, name: str, block: tuple[int, int]) -> Fp8Tensor | PlainTensor:
    dtype, bits = raw[name]
    if dtype.startswith("F8"):
        sdtype, sbits = raw[name + SUFFIX]
        return Fp8Tensor(bits, sbits, block, sdtype, dtype)
    return PlainTensor(bits, dtype)


def is_scale(raw: dict, name: str) -> bool:
    return name.endswith(SUFFIX) and raw.get(name[: -len(SUFFIX)], ("",))[0].startswith("F8")


def first_difference(got: np.ndarray, want: np.ndarray) -> str:
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    idx = np.argwhere(got != want)
    if not len(idx):
        return "equal"
    i = tuple(int(v) for v in idx[0])
    return f"{len(idx)} differ; first at {list(i)}: got {got[i]:#x}, want {want[i]:#x}"


def assert_bytes_equal(out: dict, want: dict) -> None:
    """Every expected tensor present with the same dtype and bits, nothing else in the output."""
    assert set(out) == set(want), (
        f"missing {sorted(set(want) - set(out))[:5]}, extra {sorted(set(out) - set(want))[:5]}"
    )
    bad = []
    for name, (dtype, bits) in want.items():
        gd, gb = out[name]
        if gd != dtype:
            bad.append(f"{name}: dtype {gd}, want {dtype}")
        elif not np.array_equal(gb.reshape(-1), bits.reshape(-1)):
            bad.append(f"{name}: {first_difference(gb.reshape(-1), bits.reshape(-1))}")
    assert not bad, "\n".join(bad[:10])


# ------------------------------------------------------------------------------------------------ the reference


def emit(name: str, r: np.ndarray, target, out_dtype: str | None, want: dict) -> None:
    """The output of float32 result ``r`` for target ``target`` under the contract, into ``want``."""
    if out_dtype is None and isinstance(target, Fp8Tensor):
        q = requantize(r, target)
        want[name] = ("F8_E4M3", q.codes)
        want[name + SUFFIX] = (q.scale_dtype, q.scale_bits)
        return
    dtype = out_dtype or target.dtype
    want[name] = (dtype, round_to(r, dtype))


def expected(
    dirs: dict[str, Path], terms: list[tuple[float, str, str | None]], out_dtype=None, base=True, block=None
) -> dict:
    """The reference output of ``target + sum(alpha * (plus - minus))`` over the target's tensors (``base=False``:
    a vector ``plus - minus``, laid out as ``dirs["target"]``). ``terms``: (alpha, plus role, minus role or None).
    Each input's block is its config.json's (``block``: for inputs without one)."""
    raws = {role: read_dir(d) for role, d in dirs.items()}
    blocks = {role: block or block_of(d) for role, d in dirs.items()}
    target = raws["target"]
    want: dict = {}
    for name, (dtype, bits) in target.items():
        if is_scale(target, name):
            continue
        if dtype[0] not in "FB" or dtype not in ("BF16", "F16", "F32", "F8_E4M3", "F8_E5M2"):
            want[name] = (dtype, bits)  # non-floating: copied
            continue
        t = as_reference(target, name, blocks["target"])
        r = to_f32(t).reshape(bits.shape) if base else None
        for alpha, plus, minus in terms:
            p = to_f32(as_reference(raws[plus], name, blocks[plus])).reshape(bits.shape)
            m = to_f32(as_reference(raws[minus], name, blocks[minus])).reshape(bits.shape) if minus else None
            if r is None:  # a vector: round(g32 - s32), alpha 1
                r = blend(np.zeros_like(p), m, p, 1.0) if m is not None else p
                continue
            r = blend(r, m if m is not None else np.zeros_like(p), p, alpha)
        emit(name, r, t if base else PlainTensor(bits, dtype), out_dtype or (None if base else "F32"), want)
    return want


def trio_dirs(trio) -> dict[str, Path]:
    return {"target": Path(trio[0]), "sft": Path(trio[1]), "grpo": Path(trio[2])}


def merge_expected(trio, alpha: float, out_dtype=None) -> dict:
    return expected(trio_dirs(trio), [(alpha, "grpo", "sft")], out_dtype)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def fp8_trio(tmp_path_factory):
    """The tiny DeepSeek-V3 trio in FP8 with F32 scales; sft's scales lie in other shards than their weights."""
    return synth.make_fp8_trio(tmp_path_factory.mktemp("fp8") / "trio")


@pytest.fixture(scope="session")
def bf16_scale_trio(tmp_path_factory):
    return synth.make_fp8_trio(tmp_path_factory.mktemp("fp8bf16") / "trio", scale_dtype="BF16", seed=3)


@pytest.fixture(
    scope="session", params=[("bf16", "fp8", "fp8"), ("fp8", "bf16", "bf16")], ids=["bf16-target", "fp8-target"]
)
def mixed_trio(request, tmp_path_factory):
    return synth.make_fp8_trio(tmp_path_factory.mktemp("mixed") / "trio", formats=request.param, seed=5)


def _fp8(values: np.ndarray, block, scale_dtype="F32") -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of float32 ``values`` quantized by the reference."""
    codes, sbits = quantize(values.astype(np.float32), block, scale_dtype)
    q = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    s = torch.from_numpy(sbits.view(np.int32 if scale_dtype == "F32" else np.int16).copy()).view(TORCH[scale_dtype])
    return q, s


def _codes(
    codes: np.ndarray, scales: np.ndarray, fmt="F8_E4M3", scale_dtype="F32"
) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.from_numpy(np.asarray(codes, dtype=np.uint8).copy()).view(TORCH[fmt])
    s = torch.from_numpy(np.asarray(scales, dtype=np.float32)).to(TORCH[scale_dtype])
    return q, s


def write_fp8_dir(root: Path, tensors: dict[str, torch.Tensor], block, shards: int = 1, config: bool = True) -> Path:
    """A checkpoint of ``tensors`` (in this order) written by safetensors itself, with a config.json that declares
    ``block`` as its FP8 block size (``config=False``: no config.json)."""
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
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    if config:
        qc = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block), "activation_scheme": "dynamic"}
        (root / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": qc}))
    return root


@pytest.fixture(scope="session")
def hostile_trio(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Hand-made inputs full of hard cases. Target and grpo use 4x8 blocks, sft 2x4 (a finer grid: every input's
    own block counts); scales F32 and BF16; sft's scales all lie in its last shard.

    - ``a.weight`` [10, 20] (edge blocks both ways): NaN codes (0x7F, 0xFF) and +-448 in the target, a zero scale
      (legal: zeros), an all-zero block, an outlier in grpo dominating its block.
    - ``b.weight`` FP8 target [130, 70] with plain BF16 sft/grpo, one block grpo leaves as sft has it;
      ``c.weight`` BF16 target with FP8 sft/grpo.
    - ``e.weight``: e5m2 sft and grpo with +-inf and NaN codes, an e4m3 target: r saturates to +-448 in FP8.
    - ``s.weight`` BF16 scales, a block whose merged maximum is about 2^-126: amax / 448 rounds to 0 in BF16, so
      the stored scale is 1 (the rule applies to the stored value) and the codes 0; its other block sft and grpo
      hold alike (on their different grids).
    - ``wide.weight`` [9, 300]; ``row.weight`` [1, 5]; ``norm`` F32; ``ids`` I64 (copied).
    """
    rng = np.random.default_rng(12)
    root = tmp_path_factory.mktemp("hostile")
    tb, sb = (4, 8), (2, 4)

    def vals(shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    base_a = vals((10, 20))
    t = {}
    q, s = _fp8(base_a + vals((10, 20), 0.01), tb)
    qa = q.view(torch.uint8).numpy()
    qa[0, 0], qa[0, 1], qa[9, 19], qa[5, 17] = 0x7F, 0xFF, 0x7E, 0xFE  # NaN, -NaN, +-448
    qa[8:10, 0:8] = 0  # an all-zero block (edge rows)
    t["a.weight"], t["a.weight" + SUFFIX] = q, s
    t["a.weight" + SUFFIX][1, 1] = 0.0  # a zero scale: its block is zeros
    q, s = _fp8(vals((130, 70)), tb)
    t["b.weight"], t["b.weight" + SUFFIX] = q, s
    t["c.weight"] = torch.from_numpy(vals((33, 17))).to(torch.bfloat16)
    q, s = _fp8(vals((6, 12)), tb)
    t["e.weight"], t["e.weight" + SUFFIX] = q, s
    one = np.full((4, 16), 0x38, dtype=np.uint8)  # e4m3 1.0
    t["s.weight"], t["s.weight" + SUFFIX] = _codes(one, [[2.0**-127, 0.01]], scale_dtype="BF16")
    q, s = _fp8(vals((9, 300)), tb)
    t["wide.weight"], t["wide.weight" + SUFFIX] = q, s
    q, s = _fp8(vals((1, 5)), tb, "BF16")
    t["row.weight"], t["row.weight" + SUFFIX] = q, s
    t["norm"] = torch.from_numpy(vals((20,), 1.0))
    t["ids"] = torch.arange(7, dtype=torch.int64)

    def related(target_vals, grid_block, scale_dtype="F32"):
        return _fp8(target_vals, grid_block, scale_dtype)

    sft, grpo = {}, {}
    sa = base_a + vals((10, 20), 0.01)
    ga = sa + vals((10, 20), 0.004)
    ga[6, 3] = 40.0  # an outlier dominating its block's amax
    sft["a.weight"], sft["a.weight" + SUFFIX] = related(sa, sb)
    grpo["a.weight"], grpo["a.weight" + SUFFIX] = related(ga, tb, "BF16")
    for d in (sft, grpo):
        d["b.weight"] = torch.from_numpy(vals((130, 70))).to(torch.bfloat16)
    grpo["b.weight"][4:8, 8:16] = sft["b.weight"][4:8, 8:16]  # a block of the target's grid grpo leaves as sft has it
    sft["c.weight"], sft["c.weight" + SUFFIX] = related(vals((33, 17)), sb)
    grpo["c.weight"], grpo["c.weight" + SUFFIX] = related(vals((33, 17)), tb)
    for d, blk in ((sft, sb), (grpo, tb)):
        codes = rng.integers(0, 0x78, size=(6, 12), dtype=np.uint8) | (rng.integers(0, 2, (6, 12)) << 7).astype(
            np.uint8
        )
        codes[0, 0], codes[1, 1], codes[2, 2] = 0x7C, 0xFC, 0x7E  # e5m2: +inf, -inf, NaN
        grid = (-(-6 // blk[0]), -(-12 // blk[1]))
        d["e.weight"], d["e.weight" + SUFFIX] = _codes(codes, np.full(grid, 0.25), "F8_E5M2")
    codes = rng.integers(0, 0x70, size=(4, 16), dtype=np.uint8)
    codes[:, :8] = 0
    sft["s.weight"], sft["s.weight" + SUFFIX] = _codes(codes, np.full((2, 4), 0.01), scale_dtype="BF16")
    codes = codes.copy()
    codes[:, :8] = 0x38
    grpo["s.weight"], grpo["s.weight" + SUFFIX] = _codes(codes, [[2.0**-127, 0.01]], scale_dtype="BF16")
    for d, blk in ((sft, sb), (grpo, tb)):
        d["wide.weight"], d["wide.weight" + SUFFIX] = related(vals((9, 300)), blk)
        d["row.weight"], d["row.weight" + SUFFIX] = related(vals((1, 5)), blk, "BF16")
        d["norm"] = torch.from_numpy(vals((20,), 1.0))
        d["ids"] = torch.arange(7, dtype=torch.int64) * 3
    scales_last = {k: v for k, v in sft.items() if not k.endswith(SUFFIX)} | {
        k: v for k, v in sft.items() if k.endswith(SUFFIX)
    }
    return (
        write_fp8_dir(root / "target", t, tb),
        write_fp8_dir(root / "sft", scales_last, sb, shards=3),
        write_fp8_dir(root / "grpo", grpo, tb, shards=2),
    )


def _merge(trio, out: Path, **kw):
    return streammerge.merge(*trio, out, device="cpu", **kw)


def _offsets(d: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (file, begin, end) of every tensor of an output directory, from its headers."""
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        h = read_header(f)
        for name, info in h.tensors.items():
            out[name] = (f.name, info.begin, info.end)
    return out


# ------------------------------------------------------------------------------------------------ byte-exact merges


@pytest.mark.parametrize("alpha", ALPHAS)
def test_fp8_merge_matches_the_reference(fp8_trio, alpha, tmp_path) -> None:
    before = {d: tree_digest(d) for d in fp8_trio}
    report = _merge(fp8_trio, tmp_path / "out", alpha=alpha)
    assert_bytes_equal(read_dir(tmp_path / "out"), merge_expected(fp8_trio, alpha))
    assert {d: tree_digest(d) for d in fp8_trio} == before  # inputs untouched
    plan = streammerge.plan(*fp8_trio, alpha=alpha)
    assert report.bytes_read == plan.bytes_read and report.bytes_written == plan.bytes_written
    # config.json keeps the target's quantization_config: the output is the same kind of FP8 checkpoint
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (fp8_trio.target / "config.json").read_text()
    )


def test_scales_follow_their_weight_in_the_same_file(fp8_trio, tmp_path) -> None:
    """Each FP8 weight's new scales lie right after it in its file, although sft keeps its scales in other shards."""
    _merge(fp8_trio, tmp_path / "out", max_shard_size="200KB")
    where = _offsets(tmp_path / "out")
    assert len({f for f, _, _ in where.values()}) > 1  # sharded
    weights = [n for n, (f, _, _) in where.items() if n + SUFFIX in where]
    assert len(weights) == 69
    for w in weights:
        f, _, end = where[w]
        sf, begin, _ = where[w + SUFFIX]
        assert (sf, begin) == (f, end), w
    sft = read_dir(fp8_trio.sft)
    sft_files = {}
    for f in fp8_trio.sft.glob("*.safetensors"):
        for name in read_header(f).tensors:
            sft_files[name] = f.name
    assert sum(sft_files[w] != sft_files[w + SUFFIX] for w in weights if w in sft) > 30


def test_hashing_stays_in_offset_order(fp8_trio, tmp_path, monkeypatch) -> None:
    """The scales are written (and hashed) as their weight's last band finishes, in offset order: no output file is
    ever re-read to compute its SHA-256."""
    import streammerge.writer

    def reread(*a, **k):
        raise AssertionError("an output file was re-read to hash it: chunks came out of offset order")

    monkeypatch.setattr(streammerge.writer, "sha256_file", reread)
    report = _merge(fp8_trio, tmp_path / "out", alpha=0.5, chunk_bytes="256KiB")
    manifest = json.loads((tmp_path / "out" / ".streammerge.json").read_text())
    assert manifest["shards"]["model.safetensors"]["sha256"] == report.shard_sha256["model.safetensors"]


def test_bf16_scales(bf16_scale_trio, tmp_path) -> None:
    _merge(bf16_scale_trio, tmp_path / "out", alpha=0.75)
    out = read_dir(tmp_path / "out")
    assert {d for n, (d, _) in out.items() if n.endswith(SUFFIX)} == {"BF16"}
    assert_bytes_equal(out, merge_expected(bf16_scale_trio, 0.75))


@pytest.mark.parametrize("out_dtype", ["BF16", "F16", "F32"])
def test_dequantized_output(fp8_trio, out_dtype, tmp_path) -> None:
    _merge(fp8_trio, tmp_path / "out", alpha=0.5, out_dtype=out_dtype)
    out = read_dir(tmp_path / "out")
    assert not [n for n in out if n.endswith(SUFFIX)]
    assert_bytes_equal(out, merge_expected(fp8_trio, 0.5, out_dtype))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((fp8_trio.target / "config.json").read_text())
    assert "quantization_config" not in config and "quantization_config" in original
    original.pop("quantization_config")
    assert config == original


def test_mixed_formats(mixed_trio, tmp_path) -> None:
    """A BF16 target with FP8 sft and grpo gives BF16; an FP8 target with BF16 sft and grpo gives FP8."""
    _merge(mixed_trio, tmp_path / "out", alpha=0.5)
    out = read_dir(tmp_path / "out")
    assert_bytes_equal(out, merge_expected(mixed_trio, 0.5))
    target_fp8 = any(d.startswith("F8") for d, _ in read_dir(mixed_trio.target).values())
    assert any(n.endswith(SUFFIX) for n in out) == target_fp8
    _merge(mixed_trio, tmp_path / "deq", alpha=0.5, out_dtype="bf16")
    assert_bytes_equal(read_dir(tmp_path / "deq"), merge_expected(mixed_trio, 0.5, "BF16"))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_hostile_values(hostile_trio, alpha, tmp_path) -> None:
    _merge(hostile_trio, tmp_path / "out", alpha=alpha)
    out = read_dir(tmp_path / "out")
    want = merge_expected(hostile_trio, alpha)
    assert_bytes_equal(out, want)
    # the cases the fixture builds are really there
    a_codes = out["a.weight"][1].reshape(10, 20)
    e_codes = out["e.weight"][1].reshape(6, 12)
    target = read_dir(hostile_trio[0])
    if alpha != 0:
        assert a_codes[0, 0] == 0x7F and a_codes[0, 1] == 0x7F  # NaN, whatever its sign
        assert {0x7E, 0xFE} & set(e_codes.ravel().tolist())  # +-inf through e5m2 saturates
        # the blocks the vector leaves unchanged keep the target's bytes and scale
        b, tb = out["b.weight"][1].reshape(130, 70), target["b.weight"][1].reshape(130, 70)
        assert np.array_equal(b[4:8, 8:16], tb[4:8, 8:16])
        assert abs(alpha) < 0.5 or not np.array_equal(b[0:4, 0:8], tb[0:4, 0:8])  # a touched block is new
        assert out["b.weight" + SUFFIX][1][1, 1] == target["b.weight" + SUFFIX][1][1, 1]
        s_codes, t_codes = out["s.weight"][1].reshape(4, 16), target["s.weight"][1].reshape(4, 16)
        assert np.array_equal(s_codes[:, 8:], t_codes[:, 8:])
        # merged maximum ~2^-126: amax / 448 rounds to 0 in BF16, so the stored scale is 1 and the codes 0
        scale = widen_scale(out["s.weight" + SUFFIX][1], "BF16")
        assert scale[0, 0] == 1.0 and (s_codes[:, :8] == 0).all()


@pytest.mark.parametrize("out_dtype", ["BF16", "F32"])
def test_hostile_values_dequantized(hostile_trio, out_dtype, tmp_path) -> None:
    _merge(hostile_trio, tmp_path / "out", alpha=-1.0, out_dtype=out_dtype)
    assert_bytes_equal(read_dir(tmp_path / "out"), merge_expected(hostile_trio, -1.0, out_dtype))


def test_alpha_zero_reproduces_the_target_bytes(fp8_trio, tmp_path) -> None:
    _merge(fp8_trio, tmp_path / "out", alpha=0.0)
    out, target = read_dir(tmp_path / "out"), read_dir(fp8_trio.target)
    assert set(out) == set(target)
    for name, (dtype, bits) in target.items():
        assert out[name][0] == dtype and np.array_equal(out[name][1], bits), name


def test_only_touched_blocks_change(fp8_trio, tmp_path) -> None:
    """Blocks the vector leaves unchanged (grpo == sft there) keep the target's codes and scales: RL updates are
    sparse, and so is the FP8 output's difference from the target."""
    _merge(fp8_trio, tmp_path / "out")
    out, target = read_dir(tmp_path / "out"), read_dir(fp8_trio.target)
    kept = total = 0
    for name in out:
        if name.endswith(SUFFIX) and name[: -len(SUFFIX)] in out:
            kept += int((out[name][1] == target[name][1]).sum())
            total += out[name][1].size
    assert 0.1 < kept / total < 0.6, (kept, total)  # synth leaves ~25% of grpo's blocks as sft has them


@pytest.mark.parametrize(
    "chunk,threads,sub",
    [("256KiB", 1, None), ("256KiB", 2, None), ("64MiB", 2, None), ("1MiB", 2, 1000)],
    ids=["one-band-chunks", "threads", "whole-tensors", "tiny-sub-blocks"],
)
def test_chunks_threads_and_sub_blocks_do_not_change_bytes(
    hostile_trio, fp8_trio, chunk, threads, sub, tmp_path, monkeypatch
) -> None:
    if sub is not None:  # sub-blocks of a few block columns: the column split inside a band
        monkeypatch.setattr(sys.modules["streammerge.plan"], "FP8_SUB_BLOCK_ELEMS", sub)
    for name, trio in (("hostile", hostile_trio), ("synth", fp8_trio)):
        out = tmp_path / name
        _merge(trio, out, alpha=0.5, chunk_bytes=chunk, threads=threads)
        assert_bytes_equal(read_dir(out), merge_expected(trio, 0.5))


def test_many_bands_per_tensor(tmp_path) -> None:
    """A tensor of many bands, and bands of several block rows each: 1,000 x 600 in 16 x 32 blocks."""
    rng = np.random.default_rng(3)
    dirs = []
    for role in ("target", "sft", "grpo"):
        q, s = _fp8((rng.standard_normal((1000, 600)) * 0.1).astype(np.float32), (16, 32))
        dirs.append(write_fp8_dir(tmp_path / role, {"w": q, "w" + SUFFIX: s}, (16, 32)))
    plan = streammerge.plan(*dirs, chunk_bytes="64KiB")
    (t,) = [t for t in plan.tensors if t.name == "w"]
    assert t.band_rows == 16 and plan.chunks == 63  # 64 KiB of float32: one band of 16 rows x 600
    plan = streammerge.plan(*dirs, chunk_bytes="1MiB")
    assert [t.band_rows for t in plan.tensors if t.name == "w"] == [432]  # 27 bands of 16 rows in 1 MiB
    for chunk in ("64KiB", "1MiB"):
        _merge(dirs, tmp_path / f"out-{chunk}", alpha=0.3, chunk_bytes=chunk, threads=2)
        assert_bytes_equal(read_dir(tmp_path / f"out-{chunk}"), merge_expected(dirs, 0.3))


def test_a_band_larger_than_the_chunk_is_refused(fp8_trio, tmp_path) -> None:
    with pytest.raises(streammerge.StreamMergeError, match=r"too small for .* block-scaled FP8.*--chunk-size 1MiB"):
        streammerge.plan(*fp8_trio, chunk_bytes="64KiB")
    r = CliRunner().invoke(app, ["merge", *map(str, fp8_trio), "-o", str(tmp_path / "out"), "--chunk-size", "64KiB"])
    assert r.exit_code == 1 and "--chunk-size 1MiB" in r.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ other jobs


def test_sweep_outputs_equal_their_single_merges(fp8_trio, tmp_path) -> None:
    reports = streammerge.sweep(*fp8_trio, tmp_path / "sweep", [0.5, 1.0], device="cpu")
    assert len(reports) == 2
    for alpha in (0.5, 1.0):
        d = tmp_path / "sweep" / f"alpha-{alpha:g}"
        assert_bytes_equal(read_dir(d), merge_expected(fp8_trio, alpha))
        _merge(fp8_trio, tmp_path / f"single-{alpha}", alpha=alpha)
        for f in d.glob("*.safetensors"):
            assert f.read_bytes() == (tmp_path / f"single-{alpha}" / f.name).read_bytes()


def test_combine_two_vectors(fp8_trio, hostile_trio, tmp_path) -> None:
    """Two FP8 pairs (one of them the BF16-scaled trio's) added in the spec's order, one rounding/requantization."""
    other = synth.make_fp8_trio(tmp_path / "other", scale_dtype="BF16", seed=9)
    spec = {
        "target": str(fp8_trio.target),
        "vectors": [
            {"sft": str(fp8_trio.sft), "grpo": str(fp8_trio.grpo), "alpha": 0.5},
            {"sft": str(other.sft), "grpo": str(other.grpo), "alpha": -0.25},
        ],
    }
    streammerge.combine(spec, tmp_path / "out", device="cpu")
    dirs = {"target": fp8_trio.target, "s1": fp8_trio.sft, "g1": fp8_trio.grpo, "s2": other.sft, "g2": other.grpo}
    assert_bytes_equal(read_dir(tmp_path / "out"), expected(dirs, [(0.5, "g1", "s1"), (-0.25, "g2", "s2")]))
    r = streammerge.verify(tmp_path / "out", spec=spec, full=True)
    assert r.ok and r.chunks_checked == r.chunks_total > 0, r.problems


def test_extract_is_f32_dequantized_and_apply_equals_merge(fp8_trio, tmp_path) -> None:
    streammerge.extract(fp8_trio.sft, fp8_trio.grpo, tmp_path / "vec", device="cpu")
    vec = read_dir(tmp_path / "vec")
    assert not [n for n in vec if n.endswith(SUFFIX)]
    floats = {d for n, (d, _) in vec.items()}
    assert floats == {"F32"}, floats
    dirs = {"target": fp8_trio.grpo, "sft": fp8_trio.sft, "grpo": fp8_trio.grpo}
    assert_bytes_equal(vec, expected(dirs, [(1.0, "grpo", "sft")], base=False))
    assert "quantization_config" not in json.loads((tmp_path / "vec" / "config.json").read_text())
    for alpha in (1.0, -0.5):
        streammerge.apply(fp8_trio.target, tmp_path / "vec", tmp_path / f"applied-{alpha}", alpha=alpha, device="cpu")
        _merge(fp8_trio, tmp_path / f"merged-{alpha}", alpha=alpha)
        a, m = read_dir(tmp_path / f"applied-{alpha}"), read_dir(tmp_path / f"merged-{alpha}")
        assert {k: v[1].tobytes() for k, v in a.items()} == {k: v[1].tobytes() for k, v in m.items()}
    r = streammerge.verify(tmp_path / "applied-1.0", target=fp8_trio.target, vector=tmp_path / "vec", full=True)
    assert r.ok, r.problems
    r = streammerge.verify(tmp_path / "vec", sft=fp8_trio.sft, grpo=fp8_trio.grpo, full=True)
    assert r.ok, r.problems


def test_rules_treat_the_weight_and_its_scales_as_one(fp8_trio, tmp_path) -> None:
    q = "model.layers.0.self_attn.q_a_proj.weight"
    kv = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    rules = [f"{q}=copy-target", f"{kv}=skip", r"mlp\.down_proj=0.25"]
    report = _merge(fp8_trio, tmp_path / "out", rules=rules)
    out, target = read_dir(tmp_path / "out"), read_dir(fp8_trio.target)
    assert kv not in out and kv + SUFFIX not in out
    assert np.array_equal(out[q][1], target[q][1]) and np.array_equal(out[q + SUFFIX][1], target[q + SUFFIX][1])
    assert report.copied_reasons == {f"rule {q}=copy-target": 2}  # the weight and its scales
    want = merge_expected(fp8_trio, 1.0)
    down = merge_expected(fp8_trio, 0.25)
    for name in list(want):
        base = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
        if "mlp.down_proj" in base:
            want[name] = down[name]
        if base == q:
            want[name] = target[name]
        if base == kv:
            del want[name]
    assert_bytes_equal(out, want)
    # copy-target with --out-dtype dequantizes the copied unit too: a plain output has no FP8 left
    _merge(fp8_trio, tmp_path / "deq", rules=[f"{q}=copy-target"], out_dtype="bf16")
    deq = read_dir(tmp_path / "deq")
    assert deq[q][0] == "BF16" and q + SUFFIX not in deq
    assert np.array_equal(deq[q][1], round_to(to_f32(as_reference(target, q, (128, 128))), "BF16"))


def test_verify_recomputes_fp8_chunks(fp8_trio, hostile_trio, tmp_path) -> None:
    for name, trio, kw in (
        ("fp8", fp8_trio, {}),
        ("deq", fp8_trio, {"out_dtype": "fp16"}),
        ("hostile", hostile_trio, {"alpha": -0.5}),
    ):
        out = tmp_path / name
        _merge(trio, out, **kw)
        r = streammerge.verify(out, *trio, full=True)
        assert r.ok and r.chunks_checked == r.chunks_total > 0, r.problems
    # other inputs recompute to other bytes: the first bad tensor is named
    r = streammerge.verify(tmp_path / "fp8", fp8_trio.target, fp8_trio.grpo, fp8_trio.sft, full=True)
    assert not r.ok and "differs from what its inputs recompute to" in r.problems[0]
    # a wide band (more than verify's 4 MiB chunk) still recomputes
    rng = np.random.default_rng(8)
    dirs = []
    for role in ("target", "sft", "grpo"):
        q, s = _fp8((rng.standard_normal((130, 9000)) * 0.1).astype(np.float32), (128, 128))
        dirs.append(write_fp8_dir(tmp_path / role, {"w": q, "w" + SUFFIX: s}, (128, 128)))
    _merge(dirs, tmp_path / "wide")
    r = streammerge.verify(tmp_path / "wide", *dirs, full=True)
    assert r.ok and r.chunks_checked == 2, r.problems


def test_resume_after_a_crash(fp8_trio, tmp_path) -> None:
    out = tmp_path / "out"
    args = [*fp8_trio, "-o", out, "--device", "cpu", "--max-shard-size", "300KB"]
    r = subprocess.run(
        streammerge_cmd("merge", *args), env={**os.environ, "STREAMMERGE_CRASH_AT": "shard:1"}, capture_output=True
    )
    assert r.returncode != 0 and not (out / "model.safetensors.index.json").exists()
    r = subprocess.run(streammerge_cmd("merge", *args, "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resume: kept 2 verified shard(s)" in r.stdout, r.stdout
    _merge(fp8_trio, tmp_path / "clean", max_shard_size="300KB")
    files = sorted(p.name for p in (tmp_path / "clean").glob("*.safetensors"))
    assert len(files) > 2
    for f in files:
        assert (out / f).read_bytes() == (tmp_path / "clean" / f).read_bytes(), f


@pytest.mark.parametrize("out_dtype", [None, "bf16"], ids=["fp8", "dequantized"])
def test_merge_in_parts_equals_one_merge(fp8_trio, out_dtype, tmp_path) -> None:
    """``--part I/N`` then ``finalize``: each part writes its own files (a weight and its new scales are never split
    between files), and the result is the single-process merge byte for byte, config.json included."""
    kw = {"max_shard_size": "300KB", "out_dtype": out_dtype, "alpha": 0.5}
    for part in ("2/2", "1/2"):
        _merge(fp8_trio, tmp_path / "parts", part=part, **kw)
    streammerge.finalize(tmp_path / "parts")
    _merge(fp8_trio, tmp_path / "one", **kw)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) > 2
    assert names == sorted(p.name for p in (tmp_path / "parts").iterdir())
    for name in names:
        assert (tmp_path / "parts" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    config = json.loads((tmp_path / "parts" / "config.json").read_text())
    assert ("quantization_config" in config) == (out_dtype is None)


def test_check_finite_and_strict(tmp_path) -> None:
    """Finite FP8 inputs whose merge overflows float32: counted (the FP8 output saturates them to +-448); --strict
    refuses the output."""
    big = np.float32(np.finfo(np.float32).max / 448)
    codes = np.full((4, 8), 0x7E, dtype=np.uint8)  # 448 x FLT_MAX/448 ~ FLT_MAX
    codes[1] = 0x38
    t = write_fp8_dir(tmp_path / "t", dict(zip(("w", "w" + SUFFIX), _codes(codes, [[big]]))), (4, 8))
    s = write_fp8_dir(tmp_path / "s", dict(zip(("w", "w" + SUFFIX), _codes(codes ^ 0x80, [[big]]))), (4, 8))
    g = write_fp8_dir(tmp_path / "g", dict(zip(("w", "w" + SUFFIX), _codes(codes, [[big]]))), (4, 8))
    r = streammerge.merge(t, s, g, tmp_path / "out", device="cpu", check_finite=True)
    assert r.nonfinite == {"w": 24}  # g - s = 2 x FLT_MAX for the 0x7E codes: inf
    assert_bytes_equal(read_dir(tmp_path / "out"), merge_expected((t, s, g), 1.0))
    assert (read_dir(tmp_path / "out")["w"][1].reshape(4, 8)[0] == 0x7E).all()
    with pytest.raises(streammerge.StreamMergeError, match="became NaN/inf"):
        streammerge.merge(t, s, g, tmp_path / "strict", device="cpu", check_finite=True, strict=True)
    r = streammerge.merge(t, s, g, tmp_path / "deq", device="cpu", check_finite=True, out_dtype="bf16")
    assert r.nonfinite == {"w": 24}
    r = streammerge.merge(t, t, t, tmp_path / "fine", device="cpu", check_finite=True)
    assert r.nonfinite == {}


# ------------------------------------------------------------------------------------------------ engines


def test_only_fp8_engines_compute_fp8(fp8_trio, tmp_path, monkeypatch) -> None:
    from streammerge import run as run_module

    assert run_module.FP8_ENGINES == ("cpu", "cuda")
    engine, _ = run_module.select_engine("auto", fp8=True)  # cpu here, cuda where a GPU is
    assert engine.name in run_module.FP8_ENGINES

    class NotFp8:  # an engine handed over some other way (as tests inject the simulated CUDA engine)
        name = "other"

        def run(self, *a, **k):
            raise AssertionError("must not run")

    monkeypatch.setattr(run_module, "select_engine", lambda *a, **k: (NotFp8(), "other (test)"))
    with pytest.raises(streammerge.EngineError, match="--device cpu or cuda"):
        streammerge.merge(*fp8_trio, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------------------ reporting


def test_plan_inspect_and_card_report_fp8(fp8_trio, mixed_trio, tmp_path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["plan", *map(str, fp8_trio)])
    assert r.exit_code == 0, r.output
    assert "fp8     69 tensor(s) from block-scaled FP8 inputs" in r.output
    assert "target 128x128 (69 weights, from config.json)" in r.output
    assert "fp8 out F8_E4M3 with F32 block scales 128x128 (69 weight(s) with new block scales)" in r.output
    r = runner.invoke(app, ["plan", *map(str, fp8_trio), "--out-dtype", "bf16", "--json"])
    fp8 = json.loads(r.output)["fp8"]
    assert fp8["output"] == "dequantized to BF16" and fp8["quantization_config"] == "removed"
    assert fp8["inputs"]["sft"] == {"block": [128, 128], "from": "config.json", "weights": 69}
    r = runner.invoke(app, ["inspect", str(fp8_trio.sft)])
    assert "fp8     69 block-scaled weight(s), blocks 128x128 (from config.json), scales F32: 69" in r.output
    r = runner.invoke(app, ["inspect", str(fp8_trio.sft), "--json"])
    assert json.loads(r.output)["fp8"]["block"] == [128, 128]
    _merge(fp8_trio, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| FP8 tensors | 69 block-scaled" in card and "F8_E4M3 with F32 block scales 128x128" in card
    assert "quantization_config kept" in card and "amax / 448" in card
    r = runner.invoke(app, ["plan", *map(str, mixed_trio)])
    assert r.exit_code == 0 and "fp8 " in r.output


# ------------------------------------------------------------------------------------------------ block sizes


def test_block_size_comes_from_config_json_not_from_128(tmp_path) -> None:
    """A 64x32 block declared in config.json is used (128x128 would give other bytes), and with no config.json it
    is inferred from the shapes when they allow only one."""
    rng = np.random.default_rng(2)
    shapes = {"a": (256, 97), "b": (130, 64), "c": (64, 33)}  # only 64 x 32 fits all three scale grids
    for cfg in (True, False):
        dirs = []
        for role in ("target", "sft", "grpo"):
            tensors = {}
            for n, shape in shapes.items():
                tensors[n], tensors[n + SUFFIX] = _fp8((rng.standard_normal(shape) * 0.1).astype(np.float32), (64, 32))
            dirs.append(write_fp8_dir(tmp_path / f"{role}-{cfg}", tensors, (64, 32), config=cfg))
        plan = streammerge.plan(*dirs)
        assert plan.fp8["inputs"]["target"] == {
            "block": [64, 32],
            "from": "config.json" if cfg else "shapes",
            "weights": 3,
        }
        _merge(dirs, tmp_path / f"out-{cfg}", alpha=0.5)
        want = expected({"target": dirs[0], "sft": dirs[1], "grpo": dirs[2]}, [(0.5, "grpo", "sft")], block=(64, 32))
        assert_bytes_equal(read_dir(tmp_path / f"out-{cfg}"), want)


# ------------------------------------------------------------------------------------------------ memory and scale

MB = 1_000_000
MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import streammerge
    import streammerge.kernels.reference as ref
    from streammerge.memory import rss_anon

    def vmrss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    t, s, g, out, chunk = sys.argv[1:6]
    peak = {"anon": 0, "rss": 0}
    stop = False
    def sample():
        while not stop:
            peak["anon"] = max(peak["anon"], rss_anon()); peak["rss"] = max(peak["rss"], vmrss())
            time.sleep(0.003)
    ref.fast_cast_is_exact("BF16"); ref.fast_e4m3_is_exact()  # warm up torch and the self-tests first
    base, base_rss = rss_anon(), vmrss()
    th = threading.Thread(target=sample, daemon=True); th.start()
    plan = streammerge.plan(t, s, g, chunk_bytes=int(chunk))
    r = streammerge.merge(t, s, g, out, device="cpu", chunk_bytes=int(chunk), sink="null", threads=1)
    stop = True; th.join()
    print(json.dumps({"anon": peak["anon"] - base, "rss": peak["rss"] - base_rss,
                      "bound": plan.expected_peak_memory(), "read": r.bytes_read,
                      "plan_read": plan.bytes_read}))
    """
)


def _sparse_fp8(d: Path, shape: tuple[int, int], block=(128, 128)) -> Path:
    """One FP8 weight of ``shape`` and its F32 scales as a sparse file (a hole: codes 0, scales 0 - legal)."""
    from streammerge.format import build_header

    d.mkdir(parents=True)
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    header, spans = build_header([("w", "F8_E4M3", shape), ("w" + SUFFIX, "F32", grid)], {"format": "pt"})
    with open(d / "model.safetensors", "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + max(e for _, e in spans.values()))
    qc = {"quant_method": "fp8", "weight_block_size": list(block)}
    (d / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": qc}))
    return d


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_memory_is_bounded_by_the_chunk_not_the_fp8_tensor(tmp_path) -> None:
    """A 134 MB FP8 tensor (32x the 4 MiB chunk) and one 4x larger grow anonymous memory by the same amount, within
    the plan's figure (budget.host_buffer_bytes with the FP8 scratch) plus the allowance test_memory.py uses."""
    chunk = 4 * 2**20
    results = {}
    for name, shape in (("small", (32768, 4096)), ("large", (131072, 4096))):
        dirs = [_sparse_fp8(tmp_path / name / k, shape) for k in ("t", "s", "g")]
        r = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, *map(str, dirs), str(tmp_path / name / "out"), str(chunk)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, r.stderr
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
    allowance = 48 * MB  # as tests/test_memory.py: allocator slack, thread stacks, small temporaries
    for name, m in results.items():
        assert m["read"] == m["plan_read"]
        assert m["anon"] < m["bound"] + allowance, f"{name}: grew {m['anon'] / MB:.0f} MB, bound {m['bound'] / MB:.0f}"
        # mapped input pages (codes and scales) are released behind the work: total RSS stays far below the inputs
        assert m["rss"] < m["bound"] + allowance + 64 * MB, f"{name}: total RSS grew {m['rss'] / MB:.0f} MB"
    assert abs(results["large"]["anon"] - results["small"]["anon"]) < 24 * MB, results


def test_full_deepseek_v3_layout_plans_in_seconds(tmp_path) -> None:
    """The real layout (91,992 tensors in 163 shards per checkpoint, 45,809 FP8 weights) as sparse files."""
    trio = synth.make_sparse_fp8_trio(tmp_path / "ds")
    t0 = time.perf_counter()
    plan = streammerge.plan(*trio)
    seconds = time.perf_counter() - t0
    assert len(plan.tensors) == 91_992 and len(plan.fp8_tensors) == 45_809 and plan.scales_written == 45_809
    assert plan.fp8["inputs"]["target"]["weights"] == 45_809
    assert plan.expected_peak_memory() < 200 * MB
    assert seconds < 20, seconds
    print(f"full DeepSeek-V3 plan: {seconds:.1f} s, read {plan.bytes_read / 1e12:.2f} TB")


def test_deepseek_v3_layer_merges_end_to_end(tmp_path) -> None:
    """A real-width DeepSeek-V3 dense layer (MLA attention, 18432-wide MLP) and an MoE layer with 4 experts, from
    sparse files, merged to disk: every FP8 band and scale path at full size; a hole merges to the target's bytes."""
    layout = synth.get_deepseek_layout("deepseek-v3", num_layers=2, first_k_dense=1, num_experts=4, num_mtp_layers=0)
    trio = synth.make_sparse_fp8_trio(tmp_path / "ds", layout, num_shards=(3, 2, 4))
    report = _merge(trio, tmp_path / "out", rules=["embed_tokens|lm_head=skip"])
    plan = streammerge.plan(*trio, rules=["embed_tokens|lm_head=skip"])
    assert report.bytes_read == plan.bytes_read > 1.5e9
    r = streammerge.verify(tmp_path / "out", *trio, sample=8)
    assert r.ok, r.problems
    out = _offsets(tmp_path / "out")
    w = "model.layers.0.mlp.down_proj.weight"
    assert out[w + SUFFIX][1] == out[w][2]


# ------------------------------------------------------------------------------------------------ the torch functions


@pytest.mark.parametrize(
    "shape,block", [((300, 200), (128, 128)), ((128, 256), (128, 128)), ((5, 7), (2, 3)), ((1, 1), (128, 128))]
)
@pytest.mark.parametrize("scale_dtype", ["F32", "BF16"])
def test_kernel_functions_match_the_reference(shape, block, scale_dtype) -> None:
    """kernels/reference.py's dequantize_fp8 and requantize_fp8 (the fp8.md interface, the CPU engine's math and
    the GPU kernels' reference) against the numpy reference, with NaN codes, saturating and tiny values."""
    from streammerge.kernels.reference import dequantize_fp8, encode_e4m3, encode_e4m3_exact, requantize_fp8

    rng = np.random.default_rng(sum(shape) + len(scale_dtype))
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    sbits = store_scale((np.abs(rng.standard_normal(grid)) * 1e-3).astype(np.float32), scale_dtype)
    target = Fp8Tensor(codes, sbits, block, scale_dtype)
    ts = torch.from_numpy(sbits.view(np.int32 if scale_dtype == "F32" else np.int16).copy()).view(TORCH[scale_dtype])
    q = torch.from_numpy(codes.copy())
    for fmt in ("F8_E4M3", "F8_E5M2"):
        got = dequantize_fp8(q, ts, block, fmt).numpy()
        want = dequantize(codes, sbits, block, scale_dtype, fmt)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        assert np.array_equal(got[~np.isnan(got)].view(np.uint32), want[~np.isnan(want)].view(np.uint32))
    t32 = to_f32(target)
    r = (t32 + rng.standard_normal(shape).astype(np.float32) * 3e-4).astype(np.float32)
    r[: block[0], : block[1]] = t32[: block[0], : block[1]]  # an unchanged block (NaN codes there still change it)
    r.reshape(-1)[:: max(1, r.size // 7)] = np.float32(1e30)  # saturating values, and a tiny block-sized one
    out_q, out_s = requantize_fp8(torch.from_numpy(r), q, ts, block)
    want = requantize(r, target)
    assert np.array_equal(out_q.numpy(), want.codes), first_difference(out_q.numpy(), want.codes)
    assert np.array_equal(_bits(out_s), want.scale_bits)
    x = torch.from_numpy(np.array([np.nan, -np.nan, np.inf, -np.inf, 464, 480, -0.0, 2**-10, 1.5 * 2**-10], np.float32))
    assert encode_e4m3(x).tolist() == encode_e4m3_exact(x).tolist() == [0x7F, 0x7F, 0x7E, 0xFE, 0x7E, 0x7E, 0x80, 0, 1]
