"""The CUDA engine's block-scaled FP8 path (issue 12) on the simulated device: the CPU engine's bytes, file for file.

The simulated device (:class:`SimBackend`) runs each stream's queued work lazily in a random order constrained only by
the events, and checks every H2D source, so the FP8 path's extra loads (each FP8 input's scale rows, possibly from
another shard), its float32 buffers, the requantization and the new scale rows that follow each band's codes are
exercised with the engine's real ordering. Without a GPU the kernels are the real Triton ones under
``TRITON_INTERPRET=1`` (``kernel="auto"``, slow: a few tests) or the torch reference (``kernel="reference"``: the
engine's logic; tests/test_fp8_kernels.py pins the Triton kernels to the numpy reference). The CPU engine's output
is itself checked against the numpy reference in tests/test_fp8_merge.py.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fp8_reference import quantize  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import streammerge  # noqa: E402
from streammerge import run, synth  # noqa: E402
from streammerge.budget import device_memory_bytes  # noqa: E402
from streammerge.engines import cuda as ce  # noqa: E402
from streammerge.errors import NonFiniteError  # noqa: E402
from streammerge.plan import fp8_device_buffers  # noqa: E402

try:
    from streammerge.kernels import triton_fp8, triton_merge

    if not CUDA and os.environ.get("TRITON_INTERPRET") == "1":
        # Imported earlier without the interpreter: decorate the kernels again (as tests/test_cuda_engine.py).
        if not triton_merge.INTERPRETED:
            triton_merge = importlib.reload(triton_merge)
        if not triton_fp8.INTERPRETED:
            triton_fp8 = importlib.reload(triton_fp8)
    INTERPRETED = triton_merge.INTERPRETED and triton_fp8.INTERPRETED
except ImportError:
    INTERPRETED = False

PAGE = 4096
WINDOW = 2 * PAGE  # tiny windows: loads straddle cells, scale rows share windows with other tensors' bytes
AHEAD = 8 * PAGE
# One band of 128 rows of the tiny trio's widest FP8 weight (the MTP layer's eh_proj, 320 columns) in float32: its
# 160 x 192 weights take two bands, the second partial (32 rows), narrower ones one band; plain tensors many chunks.
CHUNK = 128 * 320 * 4
SUFFIX = "_scale_inv"


def _with_engine(monkeypatch, engine) -> None:
    monkeypatch.setattr(run, "select_engine", lambda *args, **kwargs: (engine, f"{engine.name} (test)"))


def _engine(sim: ce.SimBackend, **kw) -> ce.CudaEngine:
    return ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim, copy_threads=3, **kw)


def _check_sim_clean(sim: ce.SimBackend, notes: list[str]) -> None:
    assert not sim.errors, f"CUDA errors left uncleared: {sim.errors}"
    assert not sim.registered, "windows still registered after the merge"
    assert not sim.queued_ops(), "work left queued"
    assert any("plan bound" in n for n in notes), notes


def _same_files(got: Path, want: Path) -> None:
    """Every output file byte-identical (safetensors shards, index, config.json, model card aside)."""
    names = sorted(p.name for p in want.iterdir() if p.suffix in (".safetensors", ".json"))
    assert names == sorted(p.name for p in got.iterdir() if p.suffix in (".safetensors", ".json"))
    for name in names:
        a, b = (got / name).read_bytes(), (want / name).read_bytes()
        if a != b:
            n = min(len(a), len(b))
            first = next((i for i in range(n) if a[i] != b[i]), n)
            pytest.fail(f"{name}: differs from the CPU engine's at byte {first} (sizes {len(a)} / {len(b)})")


def _pair(tmp_path: Path, trio, label: str, sim: ce.SimBackend, monkeypatch, eng_kw=None, **kw):
    """The same merge on the CPU engine and on the simulated device; their output directories and reports."""
    cpu = streammerge.merge(*trio, tmp_path / f"{label}-cpu", device="cpu", **kw)
    _with_engine(monkeypatch, _engine(sim, **(eng_kw or {})))
    got = streammerge.merge(*trio, tmp_path / f"{label}-sim", **kw)
    _same_files(tmp_path / f"{label}-sim", tmp_path / f"{label}-cpu")
    assert got.shard_sha256 == cpu.shard_sha256
    assert (got.bytes_read, got.bytes_written) == (cpu.bytes_read, cpu.bytes_written)
    _check_sim_clean(sim, got.warnings)
    return cpu, got


# ------------------------------------------------------------------------------------------------ trios


@pytest.fixture(scope="module")
def fp8_trio(tmp_path_factory):
    """The tiny DeepSeek-V3 trio in FP8 with F32 scales; sft's scales lie in other shards than their weights."""
    return synth.make_fp8_trio(tmp_path_factory.mktemp("fp8") / "trio")


@pytest.fixture(scope="module")
def bf16_scale_trio(tmp_path_factory):
    """BF16 scales and 32 x 64 blocks: several block rows per band, partial edge blocks both ways."""
    root = tmp_path_factory.mktemp("fp8bf16") / "trio"
    return synth.make_fp8_trio(root, scale_dtype="BF16", block_size=(32, 64), seed=3)


@pytest.fixture(scope="module", params=[("bf16", "fp8", "fp8"), ("fp8", "bf16", "bf16")], ids=["bf16-t", "fp8-t"])
def mixed_trio(request, tmp_path_factory):
    return synth.make_fp8_trio(tmp_path_factory.mktemp("mixed") / "trio", formats=request.param, seed=5)


def _fp8(values: np.ndarray, block, scale_dtype="F32") -> tuple[torch.Tensor, torch.Tensor]:
    codes, bits = quantize(values.astype(np.float32), block, scale_dtype)
    q = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    signed = bits.view(np.int32 if scale_dtype == "F32" else np.int16).copy()
    return q, torch.from_numpy(signed).view(torch.float32 if scale_dtype == "F32" else torch.bfloat16)


def _write(root: Path, tensors: dict[str, torch.Tensor], block, shards: int = 1) -> Path:
    """A checkpoint of ``tensors`` in this order, cut into ``shards`` files, config.json declaring ``block``."""
    root.mkdir(parents=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in names[i * per : (i + 1) * per]}
        save_file(part, str(root / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    qc = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block), "activation_scheme": "dynamic"}
    (root / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": qc}))
    return root


@pytest.fixture(scope="module")
def hostile_trio(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Hard cases for the device path. Target and grpo in 4x8 blocks, sft in 2x4 (every input's own grid, its own
    scale rows per band); sft's scales all in its last shard.

    - ``a.weight`` [10, 20]: NaN codes and +-448 in the target, a zero scale, an all-zero block, an outlier in grpo;
    - ``b.weight`` FP8 target with plain BF16 sft and grpo; ``c.weight`` BF16 target with FP8 sft and grpo;
    - ``e.weight``: E5M2 sft and grpo holding +-inf and NaN, an e4m3 target (r saturates);
    - ``s.weight``: BF16 scales, a block whose amax / 448 rounds to 0 in BF16 (stored scale 1);
    - ``wide.weight`` [9, 300], ``row.weight`` [1, 5] (BF16 scales), ``tall.weight`` [70, 40]; ``norm``, ``ids``.
    """
    rng = np.random.default_rng(21)
    root = tmp_path_factory.mktemp("hostile")
    tb, sb = (4, 8), (2, 4)

    def vals(shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def e5m2(shape, blk):
        codes = rng.integers(0, 0x78, size=shape, dtype=np.uint8) | (rng.integers(0, 2, shape) << 7).astype(np.uint8)
        codes[0, 0], codes[1, 1], codes[2, 2] = 0x7C, 0xFC, 0x7E  # +inf, -inf, NaN
        grid = (-(-shape[0] // blk[0]), -(-shape[1] // blk[1]))
        return torch.from_numpy(codes).view(torch.float8_e5m2), torch.full(grid, 0.25)

    t, s, g = {}, {}, {}
    base = vals((10, 20))
    q, sc = _fp8(base + vals((10, 20), 0.01), tb)
    qa = q.view(torch.uint8)
    qa[0, 0], qa[0, 1], qa[9, 19], qa[5, 17] = 0x7F, 0xFF, 0x7E, 0xFE
    qa[8:10, 0:8] = 0
    sc[1, 1] = 0.0
    t["a.weight"], t["a.weight" + SUFFIX] = q, sc
    sa = base + vals((10, 20), 0.01)
    ga = sa + vals((10, 20), 0.004)
    ga[6, 3] = 40.0
    s["a.weight"], s["a.weight" + SUFFIX] = _fp8(sa, sb)
    g["a.weight"], g["a.weight" + SUFFIX] = _fp8(ga, tb, "BF16")
    t["b.weight"], t["b.weight" + SUFFIX] = _fp8(vals((130, 70)), tb)
    s["b.weight"] = torch.from_numpy(vals((130, 70))).to(torch.bfloat16)
    g["b.weight"] = s["b.weight"].clone()
    g["b.weight"][20:, :] = torch.from_numpy(vals((110, 70))).to(torch.bfloat16)  # the first rows left unchanged
    t["c.weight"] = torch.from_numpy(vals((33, 17))).to(torch.bfloat16)
    s["c.weight"], s["c.weight" + SUFFIX] = _fp8(vals((33, 17)), sb)
    g["c.weight"], g["c.weight" + SUFFIX] = _fp8(vals((33, 17)), tb)
    t["e.weight"], t["e.weight" + SUFFIX] = _fp8(vals((6, 12)), tb)
    s["e.weight"], s["e.weight" + SUFFIX] = e5m2((6, 12), sb)
    g["e.weight"], g["e.weight" + SUFFIX] = e5m2((6, 12), tb)
    one = torch.full((4, 16), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)  # e4m3 1.0
    t["s.weight"], t["s.weight" + SUFFIX] = one, torch.tensor([[2.0**-127, 0.01]]).to(torch.bfloat16)
    codes = torch.from_numpy(rng.integers(0, 0x70, size=(4, 16), dtype=np.uint8))
    codes[:, :8] = 0
    s["s.weight"], s["s.weight" + SUFFIX] = codes.view(torch.float8_e4m3fn), torch.full((2, 4), 0.01).bfloat16()
    codes = codes.clone()
    codes[:, :8] = 0x38
    g["s.weight"], g["s.weight" + SUFFIX] = codes.view(torch.float8_e4m3fn), t["s.weight" + SUFFIX].clone()
    for name, shape, sd in (("wide", (9, 300), "F32"), ("row", (1, 5), "BF16"), ("tall", (70, 40), "F32")):
        t[f"{name}.weight"], t[f"{name}.weight" + SUFFIX] = _fp8(vals(shape), tb, sd)
        s[f"{name}.weight"], s[f"{name}.weight" + SUFFIX] = _fp8(vals(shape), sb, sd)
        g[f"{name}.weight"], g[f"{name}.weight" + SUFFIX] = _fp8(vals(shape), tb, sd)
    for d in (t, s, g):
        d["norm"] = torch.from_numpy(vals((20,), 1.0))
        d["ids"] = torch.arange(7, dtype=torch.int64)
    scales_last = {k: v for k, v in s.items() if not k.endswith(SUFFIX)} | {
        k: v for k, v in s.items() if k.endswith(SUFFIX)
    }
    return (
        _write(root / "target", t, tb),
        _write(root / "sft", scales_last, sb, shards=3),
        _write(root / "grpo", g, tb, 2),
    )


# ------------------------------------------------------------------------------------------------ simulated device

SIM_PATHS = {
    "registered": ({}, {}),
    "staging": ({}, {"register_windows": False}),
    "refused": ({"register": "refuse"}, {}),
    "refused-after-7": ({"refuse_after": 7}, {}),
}


@pytest.mark.parametrize("path", list(SIM_PATHS))
def test_fp8_output_on_every_input_path(fp8_trio, tmp_path, monkeypatch, path) -> None:
    """FP8 output (codes and new F32 scales in bands of 128 rows, one partial) on registered windows, pinned
    staging and refused registrations: the CPU engine's files; the device memory is the plan's formula."""
    sim_kw, eng_kw = SIM_PATHS[path]
    sim = ce.SimBackend(seed=list(SIM_PATHS).index(path), kernel="auto" if path == "registered" else "reference",
                        **sim_kw)  # fmt: skip
    _, got = _pair(tmp_path, fp8_trio, path, sim, monkeypatch, eng_kw, chunk_bytes=CHUNK)
    if path == "registered":
        assert sim.kernel == ("triton-interpreter" if INTERPRETED else "reference")
        assert sim.h2d_count["pinned"] == 0 and sim.h2d_count["registered"] > 0
    elif path in ("staging", "refused"):
        assert sim.h2d_count["registered"] == 0 and sim.h2d_count["pinned"] > 0
    else:
        assert sim.h2d_count["registered"] > 0 and sim.h2d_count["pinned"] > 0
    plan = streammerge.plan(*fp8_trio, chunk_bytes=CHUNK)
    assert got.peak_gpu_memory == plan.expected_gpu_memory()
    # Three FP8 inputs, an FP8 output, 16 bytes of scale rows at most: a 160 x 160 weight is one band, 2 x 2 scales.
    assert fp8_device_buffers(plan.tensors) == (3, True, 16)
    assert got.peak_gpu_memory == device_memory_bytes(
        CHUNK, 2, inputs=3, fp8_inputs=3, fp8_out=True, fp8_scale_bytes=16
    )


@pytest.mark.parametrize("seed", range(3))
def test_fp8_random_orders_and_slot_counts(fp8_trio, tmp_path, monkeypatch, seed) -> None:
    """Other interleavings, slot and thread counts, and the default chunk (every tensor one band): same bytes."""
    slots, host_slots, threads = ((1, 2, 1), (2, 4, 2), (3, 3, 4))[seed]
    sim = ce.SimBackend(seed=100 + seed, kernel="reference")
    eng = {"slots": slots, "host_slots": host_slots, "register_threads": threads}
    kw = {"chunk_bytes": CHUNK} if seed != 1 else {}
    _pair(tmp_path, fp8_trio, f"s{seed}", sim, monkeypatch, eng, **kw)


def test_bf16_scales_and_small_blocks(bf16_scale_trio, tmp_path, monkeypatch) -> None:
    """BF16 scales in 32 x 64 blocks (partial edge blocks, several block rows per band). The torch reference here:
    test_hostile_values runs BF16 scales through the Triton kernels."""
    sim = ce.SimBackend(seed=4, kernel="reference")
    _pair(tmp_path, bf16_scale_trio, "bf16", sim, monkeypatch, chunk_bytes=CHUNK)


@pytest.mark.parametrize("out_dtype", [None, "bf16"])
def test_mixed_formats(mixed_trio, tmp_path, monkeypatch, out_dtype) -> None:
    """A BF16 target with FP8 sft and grpo (plain output from dequantized inputs), and the reverse (FP8 output from
    plain inputs), with the output following the target or dequantized."""
    sim = ce.SimBackend(seed=6, kernel="reference")
    extra = {"out_dtype": out_dtype} if out_dtype else {}
    _pair(tmp_path, mixed_trio, "mixed", sim, monkeypatch, chunk_bytes=CHUNK, **extra)


@pytest.mark.parametrize("out_dtype", ["bf16", "fp16", "fp32"])
def test_dequantized_outputs(fp8_trio, tmp_path, monkeypatch, out_dtype) -> None:
    """``--out-dtype``: merged FP8 weights rounded once to a plain dtype, target-only FP8 weights dequantized
    (CONVERT bands), no scales written."""
    sim = ce.SimBackend(seed=7, kernel="reference")
    _, got = _pair(tmp_path, fp8_trio, out_dtype, sim, monkeypatch, chunk_bytes=CHUNK, out_dtype=out_dtype)
    assert (
        got.peak_gpu_memory == streammerge.plan(*fp8_trio, chunk_bytes=CHUNK, out_dtype=out_dtype).expected_gpu_memory()
    )


# (out_dtype, chunk, kernels): the real kernels under the interpreter once per output kind (slow: every 4x8 block is
# a program), the torch reference for the small chunks (many bands).
HOSTILE_RUNS = [
    (None, 1 << 16, "auto"),
    (None, 8192, "reference"),
    ("fp16", 1 << 16, "auto"),
    ("fp16", 8192, "reference"),
]


@pytest.mark.parametrize(("out_dtype", "chunk", "kernel"), HOSTILE_RUNS)
def test_hostile_values(hostile_trio, tmp_path, monkeypatch, out_dtype, chunk, kernel) -> None:
    """NaN codes, saturation, E5M2 infinities, zero and underflowing scales, different grids per input, scales in
    another shard, plain inputs beside FP8 ones; small chunks (``b`` and ``tall`` in bands of 28 and 48 rows, the
    last ones partial) and large ones (one band per tensor)."""
    sim = ce.SimBackend(seed=8, kernel=kernel)
    extra = {"out_dtype": out_dtype} if out_dtype else {}
    _pair(tmp_path, hostile_trio, "h", sim, monkeypatch, chunk_bytes=chunk, **extra)


def test_engine_chunk_smaller_than_a_band(fp8_trio, tmp_path, monkeypatch) -> None:
    """The engine's own chunk size below the plan's band: the device slots grow to one band, the bytes stay."""
    sim = ce.SimBackend(seed=9, kernel="reference")
    _, got = _pair(tmp_path, fp8_trio, "small", sim, monkeypatch, {"chunk_bytes": 8192}, chunk_bytes=CHUNK)
    note = next(n for n in got.warnings if "device slots" in n)
    assert f"x {CHUNK} B" in note, note


def test_sweep_combine_extract_and_apply(fp8_trio, hostile_trio, tmp_path, monkeypatch) -> None:
    """A sweep (one requantization and one set of new scales per output), a two-vector combine (the float32
    accumulator, then requantized), extract (F32, dequantized) and apply of the extracted vector."""
    kw = {"chunk_bytes": CHUNK}
    sim = ce.SimBackend(seed=10, kernel="reference")
    alphas = [1.0, -0.5, 2.0]
    cpu = streammerge.sweep(*fp8_trio, tmp_path / "sw-cpu", alphas, device="cpu", **kw)
    _with_engine(monkeypatch, _engine(sim))
    got = streammerge.sweep(*fp8_trio, tmp_path / "sw-sim", alphas, **kw)
    assert [r.shard_sha256 for r in got] == [r.shard_sha256 for r in cpu]
    assert len({tuple(r.shard_sha256.values()) for r in got}) == len(alphas)
    _check_sim_clean(sim, got[0].warnings)

    target, sft, grpo = (str(p) for p in fp8_trio)
    spec = {
        "target": target,
        "vectors": [{"sft": sft, "grpo": grpo, "alpha": 0.5}, {"sft": grpo, "grpo": sft, "alpha": 0.25}],
    }
    want = streammerge.combine(spec, tmp_path / "many-cpu", device="cpu", **kw)
    many = streammerge.combine(spec, tmp_path / "many-sim", **kw)
    assert many.shard_sha256 == want.shard_sha256
    assert any("+ acc" in w for w in many.warnings), many.warnings

    vec_cpu = streammerge.extract(sft, grpo, tmp_path / "vec-cpu", device="cpu", **kw)
    vec = streammerge.extract(sft, grpo, tmp_path / "vec-sim", **kw)
    assert vec.shard_sha256 == vec_cpu.shard_sha256
    want = streammerge.apply(target, tmp_path / "vec-cpu", tmp_path / "ap-cpu", device="cpu", alpha=0.75, **kw)
    got_apply = streammerge.apply(target, tmp_path / "vec-cpu", tmp_path / "ap-sim", alpha=0.75, **kw)
    assert got_apply.shard_sha256 == want.shard_sha256
    _check_sim_clean(sim, got_apply.warnings)


def test_check_finite_and_strict(hostile_trio, tmp_path, monkeypatch) -> None:
    """``--check-finite`` counts what the CPU engine counts (an FP8 output's r, a dequantized copy's overflow);
    ``--strict`` refuses the merge and leaves no final file."""
    kw = {"chunk_bytes": 1 << 16, "check_finite": True}
    for extra in ({}, {"out_dtype": "fp16"}):
        sim = ce.SimBackend(seed=11, kernel="reference")
        cpu, got = _pair(tmp_path, hostile_trio, f"cf{len(extra)}", sim, monkeypatch, **kw, **extra, alpha=3e37)
        assert got.nonfinite == cpu.nonfinite and cpu.nonfinite, cpu.nonfinite
    with pytest.raises(NonFiniteError):
        streammerge.merge(*hostile_trio, tmp_path / "strict", **kw, alpha=3e37, strict=True)
    assert not list((tmp_path / "strict").glob("*.safetensors"))


def test_resume_skips_finished_shards(fp8_trio, tmp_path, monkeypatch) -> None:
    """A resumed FP8 merge on the device computes only the missing shard, to the CPU engine's bytes."""
    kw = {"chunk_bytes": CHUNK, "max_shard_size": 400_000}
    full = tmp_path / "full"
    streammerge.merge(*fp8_trio, full, device="cpu", **kw)
    out = tmp_path / "out"
    streammerge.merge(*fp8_trio, out, device="cpu", **kw)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    sim = ce.SimBackend(seed=12, kernel="reference")
    _with_engine(monkeypatch, _engine(sim))
    report = streammerge.merge(*fp8_trio, out, **kw, resume=True)
    assert report.resumed_shards == len(shards) - 1
    _same_files(out, full)


# ------------------------------------------------------------------------------------------------ budget and loads


def test_device_memory_formula_for_fp8() -> None:
    chunk = 64 * 2**20
    assert device_memory_bytes(chunk) == 2 * 4 * chunk  # unchanged without FP8
    # three FP8 inputs (float32 each + scale rows), FP8 output (float32 r + new scale rows)
    assert device_memory_bytes(chunk, fp8_inputs=3, fp8_out=True, fp8_scale_bytes=512) == 2 * (
        4 * chunk + 3 * (chunk + 512) + chunk + 512
    )
    # a dequantized output of FP8 inputs: no r, no new scales
    assert device_memory_bytes(chunk, fp8_inputs=3, fp8_scale_bytes=512) == 2 * (4 * chunk + 3 * (chunk + 512))
    assert device_memory_bytes(chunk, fp8_inputs=3, fp8_out=True, fp8_scale_bytes=512) < 1.1 * 2**30


def test_chunk_loads_add_each_fp8_inputs_scale_rows(hostile_trio) -> None:
    """A band's loads: its inputs' elements, then each FP8 input's scale rows on that input's own grid."""
    from streammerge.engines.work import iter_work

    plan = streammerge.plan(*hostile_trio, chunk_bytes=8192)
    items = [it for it in iter_work(plan) if it.tensor is not None and it.tensor.name == "tall.weight"]
    assert len(items) > 1  # several bands
    for it in items:
        loads = ce.chunk_loads(it)
        assert [ld.role for ld in loads] == ["target", "grpo", "sft", "target", "grpo", "sft"]
        assert [ld.scale for ld in loads] == [False] * 3 + [True] * 3
        row0, row1 = it.start // 40, it.stop // 40
        for ld, br in zip(loads[3:], (4, 4, 2)):
            row_bytes = ld.ref.shape[1] * (4 if ld.ref.dtype == "F32" else 2)
            assert (ld.start, ld.stop) == (row0 // br * row_bytes, -(-row1 // br) * row_bytes)


# ------------------------------------------------------------------------------------------------ GPU only


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("register", [True, False], ids=["registered", "staging"])
def test_cuda_fp8_matches_cpu(fp8_trio, hostile_trio, mixed_trio, tmp_path, monkeypatch, register: bool) -> None:
    """The compiled kernels on the GPU: FP8 output, dequantized output, hostile values and mixed formats give the
    CPU engine's files; a sweep too (``--device cuda``, the engine as ``run.select_engine`` makes it)."""
    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: this test checks the compiled kernels")
    for i, (trio, extra) in enumerate(
        [
            (fp8_trio, {"chunk_bytes": CHUNK}),
            (fp8_trio, {"out_dtype": "bf16"}),
            (hostile_trio, {"chunk_bytes": 8192}),
            (hostile_trio, {"out_dtype": "fp32", "check_finite": True}),
            (mixed_trio, {}),
        ]
    ):
        engine = ce.CudaEngine(
            window_bytes=WINDOW, register_ahead_bytes=AHEAD, register_windows=register,
            backend=ce.CudaBackend(check_pinned=True),
        )  # fmt: skip
        cpu = streammerge.merge(*trio, tmp_path / f"cpu{i}", device="cpu", **extra)
        _with_engine(monkeypatch, engine)
        got = streammerge.merge(*trio, tmp_path / f"gpu{i}", **extra)
        monkeypatch.undo()
        _same_files(tmp_path / f"gpu{i}", tmp_path / f"cpu{i}")
        assert got.device == "cuda" and got.nonfinite == cpu.nonfinite
        assert 0 < got.peak_gpu_memory
    cpu = streammerge.sweep(*fp8_trio, tmp_path / "sw-cpu", [1.0, -0.5], device="cpu", chunk_bytes=CHUNK)
    got = streammerge.sweep(*fp8_trio, tmp_path / "sw-gpu", [1.0, -0.5], device="cuda", chunk_bytes=CHUNK)
    assert [r.shard_sha256 for r in got] == [r.shard_sha256 for r in cpu]
