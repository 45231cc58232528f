"""The CUDA engine: its scheduling core on CPU, the whole engine on a simulated device, and the real GPU.

Three layers:

- the pure-Python scheduling core (windows, their register/release points, slot ring, stage overlap): no GPU, no
  triton;
- the whole engine on :class:`SimBackend`, a CPU stand-in for the device that runs each stream's queued work lazily in
  a random order constrained only by the events, and checks every H2D source (registered or pinned) and every
  registration (page-aligned, no overlap): output files must have the CPU engine's SHA-256 on a mixed-dtype trio
  with odd sizes, on the registered path, the staging path and with refused registrations. Without a GPU the kernels
  are the real Triton ones under ``TRITON_INTERPRET=1`` (set here before ``triton_merge`` is imported, as in
  ``test_triton_kernel.py``); with a GPU (where the kernel module is compiled) the simulation uses the torch reference;
- ``cuda``-marked tests on a real GPU, skipped cleanly without one.
"""

from __future__ import annotations

import importlib
import mmap
import os
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/ is on sys.path (pytest's prepend import mode): conftest.py and reference.py are importable.
from helpers import TORCH, from_bits, load_all, raw_bits, write_checkpoint  # noqa: E402
from reference import hostile_values  # noqa: E402

import streammerge  # noqa: E402
from streammerge import run  # noqa: E402
from streammerge.budget import device_memory_bytes  # noqa: E402
from streammerge.engines import cuda as ce  # noqa: E402
from streammerge.errors import EngineError, NonFiniteError, OptionsError, OutputError  # noqa: E402
from streammerge.format import build_header  # noqa: E402
from streammerge.kernels.reference import round_from_f32_exact  # noqa: E402

try:
    from streammerge.kernels import triton_merge as tm

    if not CUDA and not tm.INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1":
        tm = importlib.reload(tm)  # imported earlier without the interpreter: decorate the kernels again
    INTERPRETED = tm.INTERPRETED
except ImportError:
    tm = None
    INTERPRETED = False

PAGE = mmap.PAGESIZE
CHUNK = 4096  # the smallest chunk: ~1000 elements, so the tiny trio makes dozens of chunks and windows
WINDOW = 2 * PAGE  # tiny windows: chunks straddle cells, cells are reused after gaps
AHEAD = 4 * CHUNK


# ------------------------------------------------------------------------------------------------ scheduling core
def random_sources(rng: random.Random, n_items: int, files: int = 3, size: int = 1 << 20, scattered: bool = False):
    """GPU chunks reading 1-3 inputs from a few files, sequentially per file or in a scattered order."""
    keys = [(role, f) for role in ("target", "sft", "grpo") for f in range(files)]
    map_sizes = {k: size - rng.randrange(0, PAGE) for k in keys}
    cursor = {k: rng.randrange(0, 64) for k in keys}
    items = []
    for _ in range(n_items):
        srcs = []
        for role in ("target", "sft", "grpo")[: rng.choice((1, 3, 3))]:
            k = (role, rng.randrange(files))
            n = rng.randrange(1, 3 * PAGE)
            a = rng.randrange(0, map_sizes[k] - n) if scattered else cursor[k]
            if a + n > map_sizes[k]:
                a = 0
            cursor[k] = a + n
            srcs.append(ce.Source(k, a, a + n))
        items.append(srcs)
    return items, map_sizes


@pytest.mark.parametrize("scattered", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_window_plan_tiles_every_chunk_with_aligned_windows(seed: int, scattered: bool) -> None:
    rng = random.Random(seed)
    window = rng.choice((1, 2, 5)) * PAGE
    sources, sizes = random_sources(rng, 200, scattered=scattered)
    wp = ce.plan_windows(sources, sizes, window_bytes=window, ahead_bytes=rng.choice((0, 3 * PAGE, 40 * PAGE)))
    assert len(wp.segments) == len(sources)
    for i, (srcs, segs) in enumerate(zip(sources, wp.segments)):
        assert len(segs) == len(srcs)
        for src, ss in zip(srcs, segs):
            # The segments tile the source in order, and land at consecutive offsets of the device slot.
            assert ss[0].start == src.start and ss[-1].stop == src.stop
            for a, b in zip(ss, ss[1:]):
                assert a.stop == b.start
            for sg in ss:
                assert sg.dst == sg.start - src.start and sg.stop > sg.start
                w = wp.windows[sg.window]
                assert w.key == src.key
                assert w.start <= sg.start and sg.stop <= w.stop, "segment outside its window"
                assert w.first_use <= i <= w.last_use
    for w in wp.windows:
        assert w.start % PAGE == 0 and w.stop % PAGE == 0 and w.stop > w.start, "registered ranges are whole pages"
        assert w.start // window == (w.stop - 1) // window, "a window never crosses a grid cell"
        assert w.stop <= -(-sizes[w.key] // PAGE) * PAGE, "a window ends at most at the page after the file"
        assert w.register_at <= w.first_use
        assert w.id in wp.releases[w.last_use], "released after its last use, not before or later"
    assert sum(len(v) for v in wp.releases.values()) == len(wp.windows)
    assert [wp.windows[j].first_use for j in wp.order] == sorted(w.first_use for w in wp.windows)
    ats = [wp.windows[j].register_at for j in wp.order]
    assert ats == sorted(ats), "registration order is also gate order (the window thread never skips ahead)"


def test_window_register_at_respects_the_read_ahead() -> None:
    # 20 chunks of 3 x 1 page each, sequential in three files: the read-ahead opens a window ahead_bytes early.
    sources = [[ce.Source((r, 0), i * PAGE, (i + 1) * PAGE) for r in ("target", "sft", "grpo")] for i in range(20)]
    sizes = {(r, 0): 20 * PAGE for r in ("target", "sft", "grpo")}
    wp = ce.plan_windows(sources, sizes, window_bytes=4 * PAGE, ahead_bytes=6 * PAGE)
    for w in wp.windows:
        # The chunks between register_at and first_use read at most ahead_bytes (3 pages per chunk -> 2 chunks).
        assert w.first_use - w.register_at == min(2, w.first_use)
        assert w.nbytes == 4 * PAGE
    assert len(wp.windows) == 15  # 3 files x 5 cells


def test_live_windows_bounded_for_sequential_reads() -> None:
    chunk, window, ahead = 3 * PAGE, 16 * PAGE, 48 * PAGE
    n = 400
    sources = [[ce.Source((r, 0), i * chunk, (i + 1) * chunk) for r in ("target", "sft", "grpo")] for i in range(n)]
    sizes = {(r, 0): n * chunk for r in ("target", "sft", "grpo")}
    wp = ce.plan_windows(sources, sizes, window_bytes=window, ahead_bytes=ahead)
    for lag in (0, 2, 5):
        live_bytes, live_n = wp.live(lag)
        per_input = -(-(ahead // 3 + (lag + 1) * chunk) // window) + 2
        assert live_n <= 3 * per_input, (lag, live_n)
        assert live_bytes <= live_n * window


def test_cell_read_again_after_a_long_gap_gets_a_new_window() -> None:
    k = ("sft", 0)
    far = [ce.Source(("target", 0), i * PAGE, (i + 1) * PAGE) for i in range(1, 30)]
    sources = [[ce.Source(k, 0, 100)]] + [[s] for s in far] + [[ce.Source(k, 200, 300)]]
    sizes = {k: PAGE, ("target", 0): 31 * PAGE}
    wp = ce.plan_windows(sources, sizes, window_bytes=PAGE, ahead_bytes=4 * PAGE)
    ws = [w for w in wp.windows if w.key == k]
    assert len(ws) == 2 and ws[0].last_use == 0 and ws[1].first_use == 30
    # Both cover the same page: the engine must never hold them at once; the live bound with lag 0 shows they don't.
    assert ws[0].start == ws[1].start
    near = ce.plan_windows(sources, sizes, window_bytes=PAGE, ahead_bytes=64 * PAGE)
    assert len([w for w in near.windows if w.key == k]) == 1, "a short gap keeps the same window"


def test_plan_windows_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="multiple of the page"):
        ce.plan_windows([], {}, window_bytes=PAGE + 1)
    with pytest.raises(ValueError, match="outside its file"):
        ce.plan_windows([[ce.Source(("target", 0), 0, 10)]], {("target", 0): 5}, window_bytes=PAGE)


def test_slot_ring_is_fifo_and_blocks_until_a_slot_comes_back() -> None:
    ring = ce.SlotRing(2)
    assert [ring.acquire(), ring.acquire()] == [0, 1]
    got: list[int] = []
    th = threading.Thread(target=lambda: got.append(ring.acquire(poll_s=0.01)))
    th.start()
    time.sleep(0.05)
    assert not got, "acquired a slot nobody gave back"
    ring.release(1)
    th.join(timeout=5)
    assert got == [1]

    def fail() -> None:
        raise RuntimeError("stop waiting")

    with pytest.raises(RuntimeError, match="stop waiting"):
        ring.acquire(fail, poll_s=0.01)
    with pytest.raises(ValueError):
        ce.SlotRing(0)


def test_interval_stats_measures_overlap() -> None:
    st = ce.interval_stats({"h2d": [(0, 2), (2, 4)], "kernel": [(1, 2), (3, 4)], "d2h": [(2, 3), (4, 5)]})
    assert st["h2d"] == 4 and st["kernel"] == 2 and st["d2h"] == 2
    assert st["sum"] == 8 and st["union"] == 5 and st["span"] == 5
    assert st["overlap"] == pytest.approx(8 / 5)
    assert ce.interval_stats({})["overlap"] == 0.0


def test_device_memory_is_slots_times_four_chunks() -> None:
    assert device_memory_bytes(64 << 20, 2) == 2 * 4 * (64 << 20)
    assert device_memory_bytes(64 << 20, 2) < 1 << 30


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunk_bytes": 100},
        {"window_bytes": PAGE + 1},
        {"slots": 0},
        {"host_slots": 1},
        {"copy_threads": 0},
        {"register_threads": 0},
    ],
)
def test_engine_options_are_checked(kwargs: dict) -> None:
    with pytest.raises(OptionsError):
        ce.CudaEngine(**kwargs)


# ------------------------------------------------------------------------------------------------ simulated device
def _hostile(dtype: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 1
    return from_bits(hostile_values(dtype, n, np.random.default_rng(seed)), dtype, shape)


def _normal(dtype: str, shape: tuple[int, ...], seed: int, scale: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(TORCH[dtype])


# name -> (shape, (target, sft, grpo) dtypes): odd sizes, dtype mixes, 0-d and empty tensors, hostile values.
MIXED = {
    "model.embed_tokens.weight": ((333, 77), ("BF16", "BF16", "BF16")),
    "model.layers.0.mlp.up_proj.weight": ((129, 65), ("F16", "BF16", "F32")),
    "model.layers.0.self_attn.q_proj.bias": ((257,), ("F32", "F32", "F32")),
    "model.layers.0.input_layernorm.weight": ((65,), ("BF16", "F16", "BF16")),
    "model.layers.0.scale": ((), ("F32", "BF16", "F16")),
    "model.layers.0.empty": ((0, 8), ("BF16", "BF16", "BF16")),
    "model.layers.1.hostile.weight": ((1031,), ("BF16", "F32", "F16")),
    "lm_head.weight": ((333, 77), ("F16", "F16", "F16")),
}


@pytest.fixture(scope="module")
def mixed_trio(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Target, sft and grpo with mixed dtypes per tensor, hostile values, an int tensor (copied), a target-only
    tensor (copied or converted), sft stored in reverse order: sharded 1, 3 and 2 ways."""
    root = tmp_path_factory.mktemp("mixed")
    roles: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for i, (name, (shape, dtypes)) in enumerate(MIXED.items()):
        for r, dt in enumerate(dtypes):
            seed = 100 * i + r
            roles[r][name] = _hostile(dt, shape, seed) if "hostile" in name else _normal(dt, shape, seed)
    roles[0]["model.position_ids"] = torch.arange(77, dtype=torch.int64)
    roles[0]["model.target_only.weight"] = _hostile("BF16", (1500,), 7)
    sft_reversed = dict(reversed(list(roles[1].items())))
    return (
        write_checkpoint(root / "target", roles[0], shards=1),
        write_checkpoint(root / "sft", sft_reversed, shards=3),
        write_checkpoint(root / "grpo", roles[2], shards=2),
    )


MERGE_KW = {"chunk_bytes": CHUNK, "missing": "copy-target", "max_shard_size": 60_000}


def _shards(out: Path) -> dict[str, str]:
    from streammerge.writer import sha256_file

    return {p.name: sha256_file(p) for p in sorted(out.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def cpu_outputs(mixed_trio, tmp_path_factory) -> dict[str, dict[str, str]]:
    """The CPU engine's output files (SHA-256 per file) for each option set the engine tests use."""
    out = {}
    for label, extra in (("default", {}), ("fp16", {"out_dtype": "fp16"}), ("fp32", {"out_dtype": "fp32"})):
        d = tmp_path_factory.mktemp(f"cpu-{label}") / "out"
        streammerge.merge(*mixed_trio, d, device="cpu", **MERGE_KW, **extra)
        out[label] = _shards(d)
        assert len(out[label]) >= 2, "the trio should make several output shards"
    return out


def _with_engine(monkeypatch, engine) -> None:
    monkeypatch.setattr(run, "select_engine", lambda *args, **kwargs: (engine, f"{engine.name} (test)"))


def _check_sim_clean(sim: ce.SimBackend, stats_notes: list[str]) -> None:
    assert not sim.errors, f"CUDA errors left uncleared: {sim.errors}"
    assert not sim.registered, "windows still registered after the merge"
    assert not sim.queued_ops(), "work left queued"
    bound = [n for n in stats_notes if "plan bound" in n]
    assert bound, stats_notes


SIM_PATHS = {
    "registered": ({}, {}),
    "staging": ({}, {"register_windows": False}),
    "refused": ({"register": "refuse"}, {}),
    "refused-after-5": ({"refuse_after": 5}, {}),
}


@pytest.mark.parametrize("path", list(SIM_PATHS))
@pytest.mark.parametrize("label", ["default", "fp16"])
def test_sim_engine_writes_the_cpu_engines_bytes(mixed_trio, cpu_outputs, tmp_path, monkeypatch, path, label) -> None:
    sim_kw, eng_kw = SIM_PATHS[path]
    sim = ce.SimBackend(seed=list(SIM_PATHS).index(path) + 10 * (label == "fp16"), **sim_kw)
    engine = ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim, copy_threads=3, **eng_kw)
    _with_engine(monkeypatch, engine)
    extra = {"out_dtype": "fp16"} if label == "fp16" else {}
    report = streammerge.merge(*mixed_trio, tmp_path / "out", **MERGE_KW, **extra)
    assert _shards(tmp_path / "out") == cpu_outputs[label]
    assert report.shard_sha256 == cpu_outputs[label]
    _check_sim_clean(sim, report.warnings)
    if not tm or not INTERPRETED:
        assert sim.kernel == "reference"
    else:
        assert sim.kernel == "triton-interpreter", "without a GPU the real kernels run under the interpreter"
    if path == "registered":
        assert sim.h2d_count["pinned"] == 0 and sim.h2d_count["registered"] > 0
        assert sim.max_registered_bytes > 0
    elif path in ("staging", "refused"):
        assert sim.h2d_count["registered"] == 0 and sim.h2d_count["pinned"] > 0
    else:
        assert sim.h2d_count["registered"] > 0 and sim.h2d_count["pinned"] > 0
    if path.startswith("refused"):
        assert any("refused" in w and "error cleared" in w for w in report.warnings), report.warnings
    assert report.device == "cuda"
    assert report.peak_gpu_memory == 2 * 4 * CHUNK  # every device buffer, allocated once


@pytest.mark.parametrize("seed", range(3))
def test_sim_engine_random_orders_and_registration_bound(mixed_trio, cpu_outputs, tmp_path, monkeypatch, seed):
    """Other interleavings of the three streams, other slot and registration thread counts: same bytes; registered
    windows never exceed the plan's bound with lag = host slots."""
    sim = ce.SimBackend(seed=seed, kernel="reference")
    slots, host_slots, threads = ((1, 2, 1), (2, 4, 2), (3, 3, 4))[seed]
    engine = ce.CudaEngine(
        window_bytes=WINDOW,
        register_ahead_bytes=AHEAD,
        backend=sim,
        slots=slots,
        host_slots=host_slots,
        register_threads=threads,
    )
    _with_engine(monkeypatch, engine)
    report = streammerge.merge(*mixed_trio, tmp_path / "out", **MERGE_KW)
    assert report.shard_sha256 == cpu_outputs["default"]
    _check_sim_clean(sim, report.warnings)
    note = next(n for n in report.warnings if "plan bound" in n)
    bound_bytes = int(note.rsplit("plan bound ", 1)[1].split(" / ")[1].split(" ")[0])
    assert 0 < sim.max_registered_bytes <= bound_bytes


def test_sim_engine_chunk_size_option(mixed_trio, cpu_outputs, tmp_path, monkeypatch) -> None:
    """The engine's own chunk size (here 3x the plan's) changes the chunking, not the bytes."""
    sim = ce.SimBackend(seed=5, kernel="reference")
    engine = ce.CudaEngine(chunk_bytes=3 * CHUNK, window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim)
    _with_engine(monkeypatch, engine)
    report = streammerge.merge(*mixed_trio, tmp_path / "out", **MERGE_KW, out_dtype="fp32")
    assert report.shard_sha256 == cpu_outputs["fp32"]
    assert report.peak_gpu_memory == 2 * 4 * 3 * CHUNK


def test_sim_engine_null_sink_and_progress(mixed_trio, cpu_outputs, monkeypatch) -> None:
    events: list = []
    sim = ce.SimBackend(seed=3, kernel="reference")
    _with_engine(monkeypatch, ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim))
    report = streammerge.merge(
        *mixed_trio, "/nonexistent-null-sink", **MERGE_KW, sink="null-sha256", progress=events.append
    )
    assert report.shard_sha256 == cpu_outputs["default"]
    assert [e.bytes_done for e in events] == sorted(e.bytes_done for e in events)
    last = events[-1]
    assert last.bytes_done == last.bytes_total == report.bytes_read + report.bytes_written
    assert last.tensors_done == last.tensors_total == report.tensors_merged + report.tensors_copied
    cpu = streammerge.merge(*mixed_trio, "/nonexistent", device="cpu", **MERGE_KW, sink="null")
    assert (report.bytes_read, report.bytes_written) == (cpu.bytes_read, cpu.bytes_written)


def test_sim_engine_drops_consumed_pages_from_the_cache(mixed_trio, cpu_outputs, monkeypatch) -> None:
    """With inputs too large to stay cached (Checkpoint.drop_cache), released windows leave the page cache too."""
    from streammerge.checkpoint import Checkpoint

    monkeypatch.setattr(Checkpoint, "drop_cache", True)
    calls: list[tuple] = []
    real = os.posix_fadvise
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, a, n, advice: calls.append((a, n, advice)) or real(fd, a, n, advice)
    )
    sim = ce.SimBackend(seed=12, kernel="reference")
    _with_engine(monkeypatch, ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim))
    report = streammerge.merge(*mixed_trio, "/nonexistent", **MERGE_KW, sink="null-sha256")
    assert report.shard_sha256 == cpu_outputs["default"]
    assert calls and all(a % PAGE == 0 and adv == os.POSIX_FADV_DONTNEED for a, _, adv in calls)


def test_sim_engine_resume_skips_finished_shards(mixed_trio, cpu_outputs, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    streammerge.merge(*mixed_trio, out, device="cpu", **MERGE_KW)
    names = sorted(cpu_outputs["default"])
    (out / names[1]).unlink()  # as if the merge had been interrupted while writing this shard
    sim = ce.SimBackend(seed=9, kernel="reference")
    _with_engine(monkeypatch, ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim))
    report = streammerge.merge(*mixed_trio, out, **MERGE_KW, resume=True)
    assert report.resumed_shards == len(names) - 1
    assert _shards(out) == cpu_outputs["default"]
    full = streammerge.merge(*mixed_trio, tmp_path / "full", device="cpu", **MERGE_KW)
    assert report.bytes_written < full.bytes_written  # only the missing shard was computed


@pytest.mark.parametrize("files", [1, 3])
def test_sim_engine_several_output_files_in_flight(mixed_trio, cpu_outputs, tmp_path, monkeypatch, files) -> None:
    """Output files in flight (their SHA-256 streams side by side, engines/output.py): 1 is output order, 3 takes
    three files' chunks in turn; the bytes and the recorded checksums are the CPU engine's either way."""
    sim = ce.SimBackend(seed=20 + files, kernel="reference")
    # output_rate: 1 B/s asks for one hash stream; 1e15 B/s for as many as threads and files allow
    engine = ce.CudaEngine(
        window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim, output_threads=files,
        output_rate=1.0 if files == 1 else 1e15,
    )  # fmt: skip
    _with_engine(monkeypatch, engine)
    report = streammerge.merge(*mixed_trio, tmp_path / "out", **MERGE_KW)
    assert _shards(tmp_path / "out") == cpu_outputs["default"]
    assert report.shard_sha256 == cpu_outputs["default"]
    n = min(files, len(cpu_outputs["default"]))
    assert any(f"{n} output file(s) in flight" in w for w in report.warnings), report.warnings
    _check_sim_clean(sim, report.warnings)


@pytest.fixture(scope="module")
def resized_trio(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The target's vocabulary grew by 7 rows (embedding in bf16, head in fp16 vs sft/grpo in bf16)."""
    root = tmp_path_factory.mktemp("resized")
    roles: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    for r in range(3):
        rows = 511 if r == 0 else 504
        roles[r]["model.embed_tokens.weight"] = _normal("BF16", (rows, 33), 10 + r)
        roles[r]["model.layers.0.mlp.up_proj.weight"] = _normal("BF16", (97, 33), 20 + r)
        roles[r]["lm_head.weight"] = _normal("F16" if r == 0 else "BF16", (rows, 33), 30 + r)
    return tuple(write_checkpoint(root / n, sd, shards=k) for n, sd, k in zip("tsg", roles, (1, 2, 3)))  # type: ignore


FEATURES = {
    # per-tensor alpha and copies from rules
    "rules": {"rules": ["embed_tokens=copy-target", "mlp=0.5", "lm_head=-1"]},
    # MERGE tensors whose target-only tail rows are COPY (same dtype) or CONVERT (fp16 head to bf16) chunks
    "vocab-common-rows": {"vocab_mismatch": "common-rows", "out_dtype": "bf16"},
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_sim_engine_rules_and_vocab_tails(mixed_trio, resized_trio, tmp_path, monkeypatch, feature) -> None:
    trio = resized_trio if feature.startswith("vocab") else mixed_trio
    kw = {**MERGE_KW, **FEATURES[feature]}
    if feature == "rules":
        kw["rules"] = ["embed_tokens=copy-target", "up_proj=0.5", "lm_head=-1"]
    cpu = streammerge.merge(*trio, tmp_path / "cpu", device="cpu", **kw)
    sim = ce.SimBackend(seed=6)
    _with_engine(monkeypatch, ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim))
    got = streammerge.merge(*trio, tmp_path / "sim", **kw)
    assert got.shard_sha256 == cpu.shard_sha256
    assert (got.bytes_read, got.bytes_written) == (cpu.bytes_read, cpu.bytes_written)
    _check_sim_clean(sim, got.warnings)


def test_sim_engine_extract_and_apply(mixed_trio, cpu_outputs, tmp_path, monkeypatch) -> None:
    """extract (grpo doubles as the target: one mapping, two roles) and apply (no sft) give the CPU engine's bytes,
    and apply(extract) the three-way merge's."""
    target, sft, grpo = mixed_trio
    kw = {k: v for k, v in MERGE_KW.items()}
    vec_cpu = streammerge.extract(sft, grpo, tmp_path / "vec-cpu", device="cpu", **kw)
    sim = ce.SimBackend(seed=8)
    _with_engine(monkeypatch, ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim))
    vec = streammerge.extract(sft, grpo, tmp_path / "vec", **kw)
    assert vec.shard_sha256 == vec_cpu.shard_sha256
    assert not any("refused" in w for w in vec.warnings), "a mapping in two roles was registered twice"
    _check_sim_clean(sim, vec.warnings)
    for alpha in (1.0, -0.5):
        # The same vector directory for both (output headers record their sources).
        vec_dir = tmp_path / "vec-cpu"
        want = streammerge.apply(target, vec_dir, tmp_path / f"a-cpu{alpha}", device="cpu", alpha=alpha, **kw)
        got = streammerge.apply(target, vec_dir, tmp_path / f"a{alpha}", alpha=alpha, **kw)
        assert got.shard_sha256 == want.shard_sha256
    three = streammerge.merge(target, sft, grpo, tmp_path / "three", device="cpu", **kw)
    a, b = load_all(tmp_path / "a1.0"), load_all(Path(three.out_dir))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert np.array_equal(raw_bits(a[name]), raw_bits(b[name])), f"apply(extract) != merge: {name}"


SWEEP = [1.0, -0.5, 2.0]


def _many_spec(mixed_trio, vec: Path) -> dict:
    """Three vectors: the trio's pair, the same pair reversed (the same mappings in other roles), a stored vector."""
    target, sft, grpo = (str(p) for p in mixed_trio)
    return {
        "target": target,
        "vectors": [
            {"sft": sft, "grpo": grpo, "alpha": 0.5},
            {"sft": grpo, "grpo": sft, "alpha": 0.25, "rules": ["embed_tokens=3"]},
            {"vector": str(vec), "alpha": -1.5},
        ],
    }


@pytest.mark.parametrize("path", ["registered", "staging", "refused-after-5"])
def test_sim_engine_sweep_and_many_vectors(mixed_trio, tmp_path, monkeypatch, path) -> None:
    """A sweep (one kernel and one pinned slot per output; a rule's fixed alpha: one for all) and a three-vector
    spec (chained through the float32 accumulator) give the CPU engine's bytes on every input path."""
    sim_kw, eng_kw = SIM_PATHS[path]
    kw = {**MERGE_KW, "rules": ["up_proj=0.5"]}
    cpu = streammerge.sweep(*mixed_trio, tmp_path / "cpu", SWEEP, device="cpu", **kw)
    vec = tmp_path / "vec"
    streammerge.extract(mixed_trio[1], mixed_trio[2], vec, device="cpu", chunk_bytes=CHUNK)
    spec = _many_spec(mixed_trio, vec)
    cpu_many = streammerge.combine(spec, tmp_path / "cpu-many", device="cpu", **MERGE_KW)
    sim = ce.SimBackend(seed=11, **sim_kw)
    _with_engine(monkeypatch, ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim, **eng_kw))
    got = streammerge.sweep(*mixed_trio, tmp_path / "sim", SWEEP, **kw)
    assert [r.shard_sha256 for r in got] == [r.shard_sha256 for r in cpu]
    assert len({tuple(r.shard_sha256.values()) for r in got}) == len(SWEEP)
    _check_sim_clean(sim, got[0].warnings)
    assert any("3 out" in w for w in got[0].warnings), got[0].warnings
    many = streammerge.combine(spec, tmp_path / "sim-many", **MERGE_KW)
    assert many.shard_sha256 == cpu_many.shard_sha256
    _check_sim_clean(sim, many.warnings)
    assert any("+ acc" in w for w in many.warnings), many.warnings


def test_device_memory_counts_inputs_and_outputs() -> None:
    chunk = 64 * 2**20
    assert device_memory_bytes(chunk) == 2 * 4 * chunk
    assert device_memory_bytes(chunk, outputs=3) == 2 * 6 * chunk
    assert device_memory_bytes(chunk, inputs=7) == 2 * (7 + 1 + 1) * chunk  # + the float32 accumulator


@pytest.fixture(scope="module")
def overflow_trio(tmp_path_factory) -> tuple[Path, Path, Path]:
    """bf16 values near the top of the range whose merge overflows to inf from finite inputs."""
    root = tmp_path_factory.mktemp("overflow")
    big = torch.full((3000,), 3.0e38).to(torch.bfloat16)
    small = torch.zeros(3000, dtype=torch.bfloat16)
    grow = big.clone()
    grow[::7] = 0  # only some elements overflow
    return (
        write_checkpoint(root / "target", {"w": big, "ok": small.clone()}),
        write_checkpoint(root / "sft", {"w": small.clone(), "ok": small.clone()}),
        write_checkpoint(root / "grpo", {"w": grow, "ok": small.clone()}),
    )


def test_sim_engine_check_finite_and_strict(overflow_trio, tmp_path, monkeypatch) -> None:
    kw = {"chunk_bytes": CHUNK, "check_finite": True}
    cpu = streammerge.merge(*overflow_trio, tmp_path / "cpu", device="cpu", **kw)
    assert cpu.nonfinite and cpu.nonfinite["w"] > 0
    sim = ce.SimBackend(seed=2, kernel="reference")
    _with_engine(monkeypatch, ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim))
    got = streammerge.merge(*overflow_trio, tmp_path / "sim", **kw)
    assert got.nonfinite == cpu.nonfinite
    assert got.shard_sha256 == cpu.shard_sha256
    with pytest.raises(NonFiniteError, match="'w'"):
        streammerge.merge(*overflow_trio, tmp_path / "strict", **kw, strict=True)
    assert not list((tmp_path / "strict").glob("*.safetensors")), "a refused merge leaves no final file"
    _check_sim_clean(sim, ["plan bound"])


def test_sim_engine_fails_cleanly_when_the_error_cannot_be_cleared(mixed_trio, tmp_path, monkeypatch) -> None:
    sim = ce.SimBackend(register="refuse", clear_works=False, kernel="reference")
    _with_engine(monkeypatch, ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim))
    with pytest.raises(EngineError, match="could not be cleared"):
        streammerge.merge(*mixed_trio, tmp_path / "out", **MERGE_KW)
    assert not list((tmp_path / "out").glob("*.safetensors"))


FAIL_AT = 12


def _read_traceback_data(tb) -> int:
    """Read every array and tensor an exception's traceback keeps in its frames (what pytest does when it reports a
    failure, and a debugger when it shows locals); returns the bytes read."""
    n = 0
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                n += value.detach().flatten().view(torch.uint8).clone().numel()  # any dtype, as raw bytes
            elif isinstance(value, np.ndarray):
                n += len(value.tobytes())
        tb = tb.tb_next
    return n


@pytest.mark.parametrize(
    ("fail_at", "error"),
    [(FAIL_AT, OutputError), (1, OutputError), (1, TypeError)],
    ids=["later-write", "first-write", "first-write-typeerror"],
)
def test_sim_engine_writer_failure_propagates_without_hanging(mixed_trio, tmp_path, monkeypatch, fail_at, error):
    """A write that raises (the first or a later one, any exception type) fails the merge at once, leaves no window
    registered and no thread behind; the data its traceback keeps (views of the input mappings among them) stays
    readable after the merge closed its inputs (reading it was a segfault when closing unmapped live views)."""
    from streammerge.writer import OutputWriter

    calls = {"n": 0}
    real_write = OutputWriter.write

    def flaky(self, file, offset, data, out=None, **kw):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise error("disk went away (test)")
        return real_write(self, file, offset, data, **kw)

    monkeypatch.setattr(OutputWriter, "write", flaky)
    sim = ce.SimBackend(seed=4, kernel="reference")
    _with_engine(monkeypatch, ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim))
    t0 = time.perf_counter()
    with pytest.raises(error, match="disk went away") as excinfo:
        streammerge.merge(*mixed_trio, tmp_path / "out", **MERGE_KW)
    assert time.perf_counter() - t0 < 60
    assert not sim.registered, "windows left registered after a failure"
    assert not [t for t in threading.enumerate() if t.name.startswith(("sm-windows", "sm-writer"))]
    assert _read_traceback_data(excinfo.tb) > 0, "the failed write's data is in its traceback"


def test_cpu_engine_writer_failure_leaves_readable_views(mixed_trio, tmp_path, monkeypatch) -> None:
    """The same on the CPU engine: the data of its failed first write (here a view of the target's mapping) stays
    readable after the merge closed its inputs."""
    from streammerge.writer import OutputWriter

    def broken(self, file, offset, data, out=None, **kw):
        raise TypeError("disk went away (test)")

    monkeypatch.setattr(OutputWriter, "write", broken)
    with pytest.raises(TypeError, match="disk went away") as excinfo:
        streammerge.merge(*mixed_trio, tmp_path / "out", device="cpu", **MERGE_KW)
    assert _read_traceback_data(excinfo.tb) > 0
    assert not [t for t in threading.enumerate() if t.name.startswith(("sm-prefetch", "sm-writer"))]


class _SkipWaits(ce.SimBackend):
    """A broken engine, as far as the device can tell: the waits of one stream are dropped."""

    def __init__(self, stream_name: str, **kw):
        super().__init__(**kw)
        self.stream_name = stream_name

    def wait(self, stream, event) -> None:
        if stream.name != self.stream_name:
            super().wait(stream, event)


@pytest.mark.parametrize("stream_name", ["stream0", "stream1", "stream2"])
@pytest.mark.parametrize("register", [True, False])
def test_sim_catches_a_missing_wait(mixed_trio, cpu_outputs, tmp_path, monkeypatch, stream_name, register) -> None:
    """The simulation is strong enough to matter: drop the waits of the copy-in, compute or copy-out stream and some
    interleaving gives wrong bytes or an H2D from a window already released."""
    caught = 0
    for seed in range(8):
        sim = _SkipWaits(stream_name, seed=seed, kernel="reference")
        engine = ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=sim, register_windows=register)
        _with_engine(monkeypatch, engine)
        try:
            report = streammerge.merge(*mixed_trio, tmp_path / f"o{seed}", **MERGE_KW, sink="null-sha256")
            caught += report.shard_sha256 != cpu_outputs["default"]
        except ce.SimulationError:
            caught += 1
        if caught:
            break
    assert caught, f"dropping the waits on {stream_name} went unnoticed in 8 interleavings"


def test_sim_refuses_pageable_h2d_and_overlapping_registrations() -> None:
    sim = ce.SimBackend()
    s = sim.stream()
    pageable = torch.zeros(PAGE, dtype=torch.uint8)
    sim.h2d(s, sim.device_buffer(PAGE), pageable)
    with pytest.raises(ce.SimulationError, match="neither registered nor pinned"):
        sim.synchronize()
    sim = ce.SimBackend()
    buf = torch.zeros(4 * PAGE, dtype=torch.uint8)
    base = -(-buf.data_ptr() // PAGE) * PAGE
    assert sim.register(base, PAGE) == (0, "")
    with pytest.raises(ce.SimulationError, match="overlapping"):
        sim.register(base, 2 * PAGE)
    with pytest.raises(ce.SimulationError, match="page-aligned"):
        sim.register(base + 1, PAGE)
    assert sim.unregister(base) == (0, "")
    code, _ = sim.unregister(base)
    assert code != 0 and sim.errors, "unregistering twice fails and leaves an error, as CUDA does"
    assert sim.clear_error() and not sim.errors


@pytest.mark.skipif(tm is None or not INTERPRETED, reason="needs triton's interpreter (no GPU here)")
@pytest.mark.parametrize("src_dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("out_dtype", ["BF16", "F16", "F32"])
def test_convert_kernel_matches_the_reference_rounding(src_dtype: str, out_dtype: str) -> None:
    for n in (1, 1023, 1025, 5000):
        src = _hostile(src_dtype, (n,), n)
        got = tm.convert_triton(src, out_dtype)
        want = round_from_f32_exact(src.to(torch.float32), out_dtype)
        bits = torch.int32 if out_dtype == "F32" else torch.int16
        assert torch.equal(got.view(bits), want.view(bits)), (src_dtype, out_dtype, n)
    assert tm.convert_triton(torch.empty(0, dtype=TORCH[src_dtype]), out_dtype).numel() == 0


@pytest.mark.skipif(tm is None or not INTERPRETED, reason="needs triton's interpreter (no GPU here)")
@pytest.mark.parametrize("dtypes", [("BF16", "F32"), ("F16", "BF16"), ("F32", "F32")])
@pytest.mark.parametrize("out_dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("alpha", [1.0, -0.5, 1e-3])
def test_two_term_kernels_match_the_cpu_engines_math(dtypes, out_dtype: str, alpha: float) -> None:
    for n in (1, 1025, 3001):
        a, b = _hostile(dtypes[0], (n,), n), _hostile(dtypes[1], (n,), n + 1)
        bits = torch.int32 if out_dtype == "F32" else torch.int16
        for got, want in (
            (tm.apply_vector_triton(a, b, alpha, out_dtype), (a, None, b)),
            (tm.extract_vector_triton(a, b, alpha, out_dtype), (None, a, b)),
        ):
            ref = torch.empty(n, dtype=TORCH[out_dtype])
            ce.merge_torch(*want, alpha, out_dtype, ref)
            assert torch.equal(got.view(bits), ref.view(bits)), (dtypes, out_dtype, alpha, n)


_PTX_CHECK = r"""
import re, sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton.backends.nvidia.compiler  # noqa: F401
except ImportError as exc:
    print(f"SKIP: triton's NVIDIA backend is not importable: {exc}")
    sys.exit(77)
from streammerge.kernels import triton_merge as tm

assert not tm.INTERPRETED
cases = []
for code, out_ptr in ((0, "*i32"), (1, "*i16"), (2, "*i16")):
    for mode, want in ((0, ["add.rn.f32", "mul.rn.f32"]), (1, ["mul.rn.f32", "sub.rn.f32"])):
        sig = {"a_ptr": "*bf16", "b_ptr": "*fp32", "out_bits_ptr": out_ptr, "alpha": "fp32", "n_elements": "i32",
               "MODE": "constexpr", "OUT_CODE": "constexpr", "BLOCK": "constexpr"}
        cases.append((tm._merge_two_kernel, sig, {"MODE": mode, "OUT_CODE": code, "BLOCK": tm.BLOCK_SIZE}, want))
    sig = {"src_ptr": "*fp16", "out_bits_ptr": out_ptr, "n_elements": "i32", "OUT_CODE": "constexpr",
           "BLOCK": "constexpr"}
    cases.append((tm._convert_kernel, sig, {"OUT_CODE": code, "BLOCK": tm.BLOCK_SIZE}, None))
for fn, sig, constexprs, want in cases:
    try:
        src = ASTSource(fn, sig, constexprs=constexprs)
    except TypeError as exc:
        print(f"SKIP: this triton's ASTSource takes other arguments: {exc}")
        sys.exit(77)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": tm.NUM_WARPS, "enable_fp_fusion": False})
    ptx = kernel.asm["ptx"]
    ops = sorted(set(re.findall(r"\b(?:fma|add|sub|mul)\.[a-z.]*f32", ptx)))
    assert "fma" not in " ".join(ops) and ".ftz" not in ptx, (fn.__name__, constexprs, ops)
    if want is not None:
        assert ops == want, (fn.__name__, constexprs, ops)
print("OK")
"""


def test_new_kernels_compile_without_fma_or_ftz() -> None:
    """The two-term and convert kernels compiled for sm_90 (no GPU needed): separate IEEE ops, no FMA, no FTZ."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PTX_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ real GPU
def _needs_compiled_kernel() -> None:
    if tm is None:
        pytest.skip("triton is not installed")
    if tm.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: these tests check the compiled kernel")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("register", [True, False], ids=["registered", "staging"])
def test_cuda_merge_matches_cpu(mixed_trio, cpu_outputs, tmp_path, monkeypatch, register: bool) -> None:
    _needs_compiled_kernel()
    engine = ce.CudaEngine(
        window_bytes=WINDOW,
        register_ahead_bytes=AHEAD,
        register_windows=register,
        backend=ce.CudaBackend(check_pinned=True),
        profile=True,
    )
    _with_engine(monkeypatch, engine)
    for label, extra in (("default", {}), ("fp16", {"out_dtype": "fp16"})):
        report = streammerge.merge(*mixed_trio, tmp_path / label, **MERGE_KW, **extra)
        assert _shards(tmp_path / label) == cpu_outputs[label], label
        assert report.device == "cuda"
        assert 0 < report.peak_gpu_memory
        assert not any("refused" in w for w in report.warnings), report.warnings
        assert "gpu_overlap" in report.stage_seconds
    # Resume: one shard missing, redone on the GPU.
    out = tmp_path / "default"
    victim = sorted(cpu_outputs["default"])[0]
    (out / victim).unlink()
    report = streammerge.merge(*mixed_trio, out, **MERGE_KW, resume=True)
    assert report.resumed_shards == len(cpu_outputs["default"]) - 1
    assert _shards(out) == cpu_outputs["default"]
    # Null sink.
    report = streammerge.merge(*mixed_trio, tmp_path / "null", **MERGE_KW, sink="null-sha256")
    assert report.shard_sha256 == cpu_outputs["default"]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_sweep_and_many_vectors_match_cpu(mixed_trio, tmp_path) -> None:
    _needs_compiled_kernel()
    kw = {**MERGE_KW, "rules": ["up_proj=0.5"]}
    cpu = streammerge.sweep(*mixed_trio, tmp_path / "cpu", SWEEP, device="cpu", **kw)
    got = streammerge.sweep(*mixed_trio, tmp_path / "gpu", SWEEP, device="cuda", **kw)
    assert [r.shard_sha256 for r in got] == [r.shard_sha256 for r in cpu]
    assert got[0].device == "cuda"
    vec = tmp_path / "vec"
    streammerge.extract(mixed_trio[1], mixed_trio[2], vec, device="cpu", chunk_bytes=CHUNK)
    spec = _many_spec(mixed_trio, vec)
    want = streammerge.combine(spec, tmp_path / "cpu-many", device="cpu", **MERGE_KW)
    many = streammerge.combine(spec, tmp_path / "gpu-many", device="cuda", **MERGE_KW)
    assert many.shard_sha256 == want.shard_sha256 and many.device == "cuda"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_device_auto_merges_on_the_gpu(mixed_trio, cpu_outputs, tmp_path) -> None:
    _needs_compiled_kernel()
    report = streammerge.merge(*mixed_trio, tmp_path / "out", device="cuda", **MERGE_KW)
    assert report.device == "cuda" and report.shard_sha256 == cpu_outputs["default"]
    report = streammerge.merge(*mixed_trio, tmp_path / "auto", device="auto", **MERGE_KW)
    assert report.device == "cuda" and report.shard_sha256 == cpu_outputs["default"]


class _RefusingCudaBackend(ce.CudaBackend):
    """The real backend, but after ``after`` registrations every one fails for real (a null pointer), leaving a
    real CUDA error in the window thread that the engine must clear."""

    def __init__(self, after: int, **kw):
        super().__init__(**kw)
        self.after = after
        self.calls = 0

    def register(self, ptr: int, nbytes: int):
        self.calls += 1
        return super().register(ptr if self.calls <= self.after else 0, nbytes)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("after", [0, 4])
def test_cuda_refused_registration_falls_back_to_staging(mixed_trio, cpu_outputs, tmp_path, monkeypatch, after) -> None:
    _needs_compiled_kernel()
    be = _RefusingCudaBackend(after, check_pinned=True)
    _with_engine(monkeypatch, ce.CudaEngine(window_bytes=WINDOW, register_ahead_bytes=AHEAD, backend=be))
    report = streammerge.merge(*mixed_trio, tmp_path / "out", **MERGE_KW)
    assert report.shard_sha256 == cpu_outputs["default"]
    assert any("refused" in w and "error cleared" in w for w in report.warnings), report.warnings
    torch.ones(8, device="cuda").add_(1)  # this thread's CUDA state is fine
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_refused_registration_error_is_cleared() -> None:
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(0, PAGE, ce.REGISTER_FLAGS)
    assert int(err) != 0, "registering a null pointer should be refused"
    assert ce.clear_cuda_error(), "the error a refused registration leaves could not be cleared"
    x = torch.ones(1024, device="cuda")
    x.add_(1)  # a launch check that would raise the refusal's error had it not been cleared
    torch.cuda.synchronize()
    assert float(x[0]) == 2.0


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_registers_a_read_only_file_mapping(tmp_path) -> None:
    """cudaHostRegister(ReadOnly) of a read-only file mmap works, the range is then pinned, and H2D from it is exact."""
    path = tmp_path / "blob"
    data = np.random.default_rng(0).integers(0, 256, 8 * PAGE, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = torch.frombuffer(m, dtype=torch.uint8)
    be = ce.CudaBackend()
    code, msg = be.register(view.data_ptr(), 8 * PAGE)
    if code:
        ce.clear_cuda_error()
        pytest.skip(f"this machine refuses read-only registration ({msg}): the staging path is what runs here")
    try:
        assert view.is_pinned()
        dev = torch.empty(8 * PAGE, dtype=torch.uint8, device="cuda")
        s = be.stream()
        be.h2d(s, dev, view)
        s.synchronize()
        assert torch.equal(dev.cpu(), view)
    finally:
        assert be.unregister(view.data_ptr()) == (0, "")
    del view
    m.close()


def _sparse_checkpoint(path: Path, name: str, shape: tuple[int, ...], dtype: str = "BF16") -> Path:
    """One tensor whose data is a hole: real header, no disk, reads as zeros."""
    path.mkdir(parents=True, exist_ok=True)
    header, spans = build_header([(name, dtype, shape)], {"format": "pt"})
    f = path / "model.safetensors"
    with open(f, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + spans[name][1])
    return path


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_peak_memory_of_a_2gb_embedding_with_64mib_chunks(tmp_path) -> None:
    """A 128256 x 8192 bf16 embedding (2.1 GB per checkpoint) merges in well under 1 GB of GPU memory."""
    _needs_compiled_kernel()
    shape = (128256, 8192)
    trio = [_sparse_checkpoint(tmp_path / r, "model.embed_tokens.weight", shape) for r in ("target", "sft", "grpo")]
    report = streammerge.merge(*trio, tmp_path / "out", device="cuda", chunk_bytes="64MiB", sink="null-sha256")
    assert report.device == "cuda"
    assert report.peak_gpu_memory < 1 << 30, report.peak_gpu_memory
    assert report.peak_gpu_memory <= device_memory_bytes(64 << 20) + (64 << 20)
    zeros = report.bytes_read // 3
    assert report.bytes_read == 3 * zeros and zeros == 128256 * 8192 * 2
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
