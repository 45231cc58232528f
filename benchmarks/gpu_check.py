"""``python -m benchmarks.gpu_check``: everything the CUDA engine must show on a lent GPU, in one run of ~6 minutes.

    python -m benchmarks.gpu_check                  # H100/H200: ~4 GB per checkpoint, <= ~6 min
    python -m benchmarks.gpu_check --size tiny      # seconds; on a machine without a GPU the GPU parts say so

Steps, each in its own process with its own timeout (a hung or crashed step is recorded and the next one runs),
most important first, skipped when the time budget (``--budget``) is spent:

1. ``env``: card, driver, clocks (``nvidia-smi`` queries only), versions, cores, memory, disk, and whether the
   device supports ``cudaHostRegister`` and its ReadOnly flag.
2. ``pytest``: the ``cuda``-marked tests (``pytest -m cuda``): GPU output bytes = CPU engine bytes, both input
   paths, refused registration, resume, null sink, peak memory of a 2 GB embedding, the compiled kernel. A hung
   test fails alone (pytest-timeout, 100 s: one test's 81 kernel compiles take tens of seconds); the log is
   written as it runs (``$OUT/pytest-cuda.log``).
3. ``kernel``: the merge kernel alone against a device-to-device copy of the same bytes (``triton.testing.do_bench``
   medians), a block-size sweep, pinned H2D/D2H and H2D from a registered read-only file mapping, registration speed
   with 1 and 4 threads. Needs no trio, so it runs before the slow steps.
4. ``generate``: a synthetic trio (``streammerge.synth``; full size: Qwen2.5-7B layout cut to 4 layers, 4.0 GB per
   checkpoint), timed.
5. ``pipeline``: page cache -> GPU -> null sink (``sink="null-sha256"``): the CPU engine, then the CUDA engine with
   registered windows (16 and 64 MiB chunks) and with pinned staging, each once plain and once with ``profile`` for
   the per-stage breakdown (host read = registration / pack, H2D, kernel, D2H, write) and the overlap; SHA-256 of
   every output file compared with the CPU engine's.
6. ``e2e``: the I/O floor (read the inputs + write and fsync the output's bytes), then the CPU and the CUDA engine
   to disk; output files re-hashed and compared.
7. ``mergekit``: ``mergekit-yaml --cuda`` on the same trio: an installed mergekit, else the wheels carried in
   ``.whl/`` (``make peer-wheels``), else recorded as absent.
8. ``sparse70b``: a Llama-3-70B-layout trio of holes (2 layers: embedding + head 2.1 GB each) merged on the GPU to
   the null sink with 64 MiB chunks: peak GPU memory.
9. ``sweep``: a 3-alpha sweep against 3 single runs on CUDA, and a 2-vector combine on CUDA against the CPU engine
   (issue 6 on the GPU; last, as the issue 3 targets come first).

Each step saves its parts as they complete, and the results file is rewritten after every step, so a step killed
on its timeout, or the whole run cut short, keeps what was measured before.

The last thing printed is a short table; the full results (card, versions, sizes, every figure, every failure) go
to ``benchmarks/results/gpu_check-<timestamp>.json`` and, when ``$OUT`` is set (the device tool's output folder),
to ``$OUT`` as well.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from . import machine

DEFAULT_WORKDIR = Path("/tmp/streammerge-gpu-check")
RESULTS_DIR = machine.REPO_ROOT / "benchmarks" / "results"
# The whole run's budget (seconds): the lease allows ~6 minutes for the script; steps that no longer fit are skipped.
DEFAULT_BUDGET_S = 360.0

# What each size generates. full: the 4 GB-per-checkpoint trio (DESIGN.md section 5 measured mergekit and
# the floor on it); small: ~0.6 GB per checkpoint; tiny: a few MB (any machine, seconds).
SIZES = {
    "tiny": {
        "layout": "tiny-qwen2",
        "layers": None,
        "chunks": [64 << 10, 256 << 10],
        "window": 1 << 20,
        "sparse": ("tiny-qwen2", None),
        "kernel_elems": 1 << 22,
    },
    "small": {
        "layout": "qwen2.5-0.5b",
        "layers": 8,
        "chunks": [16 << 20, 64 << 20],
        "window": 256 << 20,
        "sparse": ("llama3-70b", 1),
        "kernel_elems": 1 << 26,
    },
    "full": {
        "layout": "qwen2.5-7b",
        "layers": 4,
        "chunks": [16 << 20, 64 << 20],
        "window": 256 << 20,
        "sparse": ("llama3-70b", 2),
        "kernel_elems": 1 << 28,
    },
}
# Per-step timeouts (seconds, full size), in run order. A step also gets no more than the budget left.
STEP_TIMEOUTS = {
    "env": 60,
    "pytest": 150,
    "kernel": 90,
    "generate": 150,
    "pipeline": 150,
    "e2e": 150,
    "mergekit": 150,
    "sparse70b": 120,
    "sweep": 90,
}
# A step is skipped rather than started with less than this left (seconds).
MIN_STEP_S = 15


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _sha_files(directory: Path) -> dict[str, str]:
    from streammerge.writer import sha256_file

    return {p.name: sha256_file(p) for p in sorted(directory.glob("*.safetensors")) if not p.name.startswith(".")}


def _report_dict(r) -> dict:
    keep = (
        "device",
        "bytes_read",
        "bytes_written",
        "seconds",
        "gbps",
        "peak_rss_anon",
        "peak_gpu_memory",
        "stage_seconds",
        "shard_sha256",
        "warnings",
    )
    return {k: getattr(r, k) for k in keep}


# ---------------------------------------------------------------------------------------------- steps (child side)
def step_env(state: dict) -> dict:
    out: dict = {"machine": machine.machine_info(Path(state["workdir"])), "gpu": machine.gpu_info()}
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out["device_properties"] = {
                "name": p.name,
                "total_memory": p.total_memory,
                "multi_processor_count": p.multi_processor_count,
                "capability": f"{p.major}.{p.minor}",
            }
            out["host_register"] = _host_register_attributes()
    except Exception as e:  # noqa: BLE001 - recorded
        out["torch_error"] = repr(e)
    try:
        q = "name,memory.total,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu"
        proc = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True, timeout=20
        )
        out["nvidia_smi"] = proc.stdout.strip() or proc.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = f"unavailable: {e}"
    return out


# A hung test (a driver call, say) fails alone after this many seconds, with its name, when pytest-timeout is
# installed (the lent machines' image has it); the step's own timeout stays the backstop.
PER_TEST_TIMEOUT_S = 100


# cudaDeviceAttr values (CUDA runtime, driver_types.h): whether cudaHostRegister, and its ReadOnly flag that the
# engine's registered input windows use, are supported on this device (0 on some platforms: staging then).
_ATTR_HOST_REGISTER = 99
_ATTR_HOST_REGISTER_READ_ONLY = 113


def _host_register_attributes() -> dict:
    import ctypes

    import torch

    from streammerge.engines.cuda import _cudart_ctypes

    torch.zeros(1, device="cuda")  # the runtime and its library are loaded
    lib = _cudart_ctypes()
    if lib is None:
        return {"error": "libcudart not found in /proc/self/maps"}
    out = {}
    for name, attr in (("supported", _ATTR_HOST_REGISTER), ("read_only_supported", _ATTR_HOST_REGISTER_READ_ONLY)):
        value = ctypes.c_int(-1)
        err = lib.cudaDeviceGetAttribute(ctypes.byref(value), ctypes.c_int(attr), ctypes.c_int(0))
        out[name] = value.value if err == 0 else f"error {err}"
    return out


def step_pytest(state: dict) -> dict:
    argv = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider"]
    # One module failing to import under the image's package versions must not cancel the others.
    argv += ["--continue-on-collection-errors"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        argv += [f"--timeout={PER_TEST_TIMEOUT_S}"]
    argv += ["--basetemp", str(Path(state["workdir"]) / "pytest"), str(machine.REPO_ROOT / "tests")]
    # The log is written as pytest runs (and lands in $OUT when set), so a step killed on its timeout still shows
    # which tests had passed and which one hung.
    log_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(state["workdir"])
    log_path = log_dir / "pytest-cuda.log"
    t0 = time.perf_counter()
    timeout = max(10.0, float(state.get("step_timeout", 600)) - 10)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(argv, cwd=machine.REPO_ROOT, stdout=logf, stderr=subprocess.STDOUT)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = f"killed after {timeout:.0f} s"
    lines = log_path.read_text(errors="replace").strip().splitlines()
    for line in lines[-60:]:
        print(line, flush=True)
    outcome = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?)\b")
    summary = next((line for line in reversed(lines) if outcome.search(line)), None)
    res = {"returncode": rc, "seconds": time.perf_counter() - t0, "summary": summary or str(rc), "log": str(log_path)}
    res["tail"] = lines[-80:]
    if isinstance(rc, str):
        res["error"] = f"pytest {rc}"
    return res


def step_generate(state: dict) -> dict:
    from streammerge import synth

    cfg = SIZES[state["size"]]
    root = Path(state["workdir"]) / f"trio-{state['size']}"
    marker = root / ".complete"
    t0 = time.perf_counter()
    reused = marker.exists()
    if not reused:
        shutil.rmtree(root, ignore_errors=True)
        log(f"generating {cfg['layout']} x {cfg['layers'] or 'all'} layers in {root}")
        synth.make_trio(root, cfg["layout"], num_layers=cfg["layers"], threads=min(16, os.cpu_count() or 1))
        os.sync()
        marker.write_text("ok\n")
    seconds = time.perf_counter() - t0
    files = sorted(str(p) for d in ("target", "sft", "grpo") for p in (root / d).glob("*.safetensors"))
    out_bytes = sum(p.stat().st_size for p in (root / "target").glob("*.safetensors"))
    return {
        "root": str(root),
        "layout": cfg["layout"],
        "num_layers": cfg["layers"],
        "files": files,
        "bytes_in": sum(Path(f).stat().st_size for f in files),
        "bytes_out": out_bytes,
        "generation_s": None if reused else seconds,
        "reused": reused,
    }


def _size_name(n: int) -> str:
    return f"{n >> 20}MiB" if n >= 1 << 20 else f"{n >> 10}KiB"


def _trio(state: dict) -> tuple[str, str, str]:
    gen = state["steps"].get("generate") or {}
    if "root" not in gen:
        raise RuntimeError("no trio: the generate step did not complete")
    root = Path(gen["root"])
    return str(root / "target"), str(root / "sft"), str(root / "grpo")


def _cuda_engine(**kw):
    from streammerge.engines.cuda import CudaEngine, SimBackend

    if _cuda():
        return CudaEngine(**kw)
    # No GPU: the same engine on the simulated device (reference kernel), to check this script's plumbing.
    return CudaEngine(backend=SimBackend(kernel="reference"), **kw)


def _with_engine(engine):
    from streammerge import api

    original = api.select_engine
    api.select_engine = lambda device, threads=None, opts=None: (engine, f"{engine.name} (gpu_check)")
    return original


def _run_merge(trio, out, engine=None, **kw) -> dict:
    import streammerge
    from streammerge import api

    original = _with_engine(engine) if engine is not None else None
    try:
        t0 = time.perf_counter()
        r = streammerge.merge(*trio, out, **kw)
        d = _report_dict(r)
        d["wall_s"] = time.perf_counter() - t0
        d["gbps_moved"] = (r.bytes_read + r.bytes_written) / d["wall_s"] / 1e9
        return d
    finally:
        if original is not None:
            api.select_engine = original


def step_pipeline(state: dict) -> dict:
    cfg = SIZES[state["size"]]
    trio = _trio(state)
    cuda = _cuda()
    res: dict = {"cuda": cuda, "runs": {}}
    null = str(Path(state["workdir"]) / "null")
    log("CPU engine -> null sink")
    res["runs"]["cpu"] = _run_merge(trio, null, device="cpu", sink="null-sha256")
    want = res["runs"]["cpu"]["shard_sha256"]
    plans = [(f"cuda-registered-{_size_name(c)}", c, True) for c in cfg["chunks"]]
    plans.append((f"cuda-staging-{_size_name(cfg['chunks'][-1])}", cfg["chunks"][-1], False))
    if not cuda and state["size"] != "tiny":
        res["note"] = "no CUDA GPU: only the CPU engine ran (the simulated device is for tiny sizes)"
        return res
    save_partial(res)
    # Warm-up: compiles the kernels and creates the CUDA context outside the timed runs. A failure is recorded and
    # every variant still runs (the staging one avoids registration altogether).
    try:
        _run_merge(trio, null, engine=_cuda_engine(chunk_bytes=cfg["chunks"][0]), sink="null")
    except Exception as e:  # noqa: BLE001 - recorded
        res["warmup_error"] = {"error": repr(e), "traceback": traceback.format_exc()[-3000:]}
    for name, chunk, register in plans:
        for profile in (False, True):
            key = name + ("+profile" if profile else "")
            log(f"{key} -> null sink")
            try:
                eng = _cuda_engine(
                    chunk_bytes=chunk, window_bytes=cfg["window"], register_windows=register, profile=profile
                )
                r = _run_merge(trio, null, engine=eng, sink="null-sha256")
                r["bytes_equal_cpu"] = r["shard_sha256"] == want
                res["runs"][key] = r
            except Exception as e:  # noqa: BLE001 - recorded, the next variant still runs
                res["runs"][key] = {"error": repr(e), "traceback": traceback.format_exc()[-3000:]}
            save_partial(res)
    return res


def step_e2e(state: dict) -> dict:
    from . import workers

    cfg = SIZES[state["size"]]
    trio = _trio(state)
    gen = state["steps"]["generate"]
    work = Path(state["workdir"])
    res: dict = {"cuda": _cuda()}
    log("I/O floor: read every input, write + fsync the output's bytes")
    res["floor"] = workers.floor(gen["files"], str(work / "floor.bin"), gen["bytes_out"])
    save_partial(res)
    for name in ("cpu", "cuda"):
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        log(f"{name} engine -> disk")
        try:
            if name == "cpu":
                r = _run_merge(trio, out, device="cpu")
            else:
                if not res["cuda"] and state["size"] != "tiny":
                    res[name] = {"skipped": "no CUDA GPU"}
                    continue
                eng = _cuda_engine(chunk_bytes=cfg["chunks"][-1], window_bytes=cfg["window"])
                r = _run_merge(trio, out, engine=eng)
            t0 = time.perf_counter()
            r["files_sha256"] = _sha_files(out)
            r["rehash_s"] = time.perf_counter() - t0
            res[name] = r
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": repr(e), "traceback": traceback.format_exc()[-3000:]}
        save_partial(res)
    cpu, gpu = res.get("cpu", {}), res.get("cuda", {})
    if "files_sha256" in cpu and "files_sha256" in gpu:
        res["bytes_equal"] = cpu["files_sha256"] == gpu["files_sha256"] == gpu["shard_sha256"]
    for name in ("cpu", "cuda"):
        shutil.rmtree(work / f"out-{name}", ignore_errors=True)
    return res


def step_sweep(state: dict) -> dict:
    """An alpha sweep (3 outputs, one pass) against 3 single-alpha runs on the CUDA engine, to the null sink with
    SHA-256s; and a two-vector combine on CUDA against the CPU engine's bytes (issue 6.6 / 6.8 on the GPU)."""
    import streammerge

    cfg = SIZES[state["size"]]
    trio = _trio(state)
    cuda = _cuda()
    if not cuda and state["size"] != "tiny":
        return {"cuda": False, "note": "no CUDA GPU: skipped (the simulated device is for tiny sizes)"}
    alphas = [0.5, 1.0, 1.5]
    null = str(Path(state["workdir"]) / "null-sweep")
    res: dict = {"cuda": cuda, "alphas": alphas, "single": {}}
    spec = {
        "target": trio[0],
        "vectors": [{"sft": trio[1], "grpo": trio[2], "alpha": 0.75}, {"sft": trio[2], "grpo": trio[1], "alpha": 0.5}],
    }
    t0 = time.perf_counter()
    cpu_combine = streammerge.combine(spec, null, device="cpu", sink="null-sha256")
    res["combine_cpu_s"] = time.perf_counter() - t0
    save_partial(res)
    original = _with_engine(_cuda_engine(chunk_bytes=cfg["chunks"][-1], window_bytes=cfg["window"]))
    try:
        t0 = time.perf_counter()
        reports = streammerge.sweep(*trio, null, alphas, sink="null-sha256")
        res["sweep"] = {
            "wall_s": time.perf_counter() - t0,
            "bytes_read": reports[0].bytes_read,
            "peak_gpu_memory": reports[0].peak_gpu_memory,
            "shard_sha256": [r.shard_sha256 for r in reports],
        }
        for a in alphas:
            res["single"][repr(a)] = _run_merge(trio, null, alpha=a, sink="null-sha256")
        res["bytes_equal"] = res["sweep"]["shard_sha256"] == [res["single"][repr(a)]["shard_sha256"] for a in alphas]
        single_s = sum(r["wall_s"] for r in res["single"].values())
        res["speedup"] = single_s / res["sweep"]["wall_s"] if res["sweep"]["wall_s"] > 0 else None
        t0 = time.perf_counter()
        gpu_combine = streammerge.combine(spec, null, sink="null-sha256")
        res["combine_gpu_s"] = time.perf_counter() - t0
        res["combine_bytes_equal"] = gpu_combine.shard_sha256 == cpu_combine.shard_sha256
        res["combine_peak_gpu_memory"] = gpu_combine.peak_gpu_memory
    finally:
        from streammerge import api

        api.select_engine = original
    return res


def _bench(fn, warmup: int = 25, rep: int = 200) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def step_kernel(state: dict) -> dict:
    if not _cuda():
        return {"skipped": "no CUDA GPU"}
    import numpy as np
    import torch
    import triton

    from streammerge.kernels import triton_merge as tm

    n = SIZES[state["size"]]["kernel_elems"]
    dev = torch.device("cuda")
    res: dict = {"elements": n, "block_size": tm.BLOCK_SIZE, "num_warps": tm.NUM_WARPS, "cases": {}}
    gen = torch.Generator(device=dev).manual_seed(0)
    cases = {
        "bf16,bf16,bf16->bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16, "BF16"),
        "bf16,bf16,bf16->fp32": (torch.bfloat16, torch.bfloat16, torch.bfloat16, "F32"),
        "fp32,fp32,fp32->fp32": (torch.float32, torch.float32, torch.float32, "F32"),
    }
    for name, (dt, ds, dg, od) in cases.items():
        t, s, g = (torch.randn(n, device=dev, dtype=x, generator=gen) for x in (dt, ds, dg))
        out = torch.empty(n, device=dev, dtype=tm.OUT_DTYPES[od])
        moved = sum(x.numel() * x.element_size() for x in (t, s, g, out))
        ms_k = _bench(lambda t=t, s=s, g=g, out=out, od=od: tm.merge_triton(t, s, g, 1.0, od, out=out))
        src = torch.empty(moved // 2, device=dev, dtype=torch.uint8)
        dst = torch.empty_like(src)
        ms_c = _bench(lambda src=src, dst=dst: dst.copy_(src))
        res["cases"][name] = {
            "bytes_moved": moved,
            "kernel_ms": ms_k,
            "copy_ms": ms_c,
            "kernel_gbps": moved / ms_k / 1e6,
            "copy_gbps": moved / ms_c / 1e6,
            "kernel_vs_copy": ms_c / ms_k,
        }
        log(f"kernel {name}: {moved / ms_k / 1e6:.0f} GB/s, device copy {moved / ms_c / 1e6:.0f} GB/s")
        del t, s, g, out, src, dst
        torch.cuda.empty_cache()
        save_partial(res)
    # Block size / warps sweep of the same kernel (bf16 -> bf16).
    t, s, g = (torch.randn(n, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    out = torch.empty(n, device=dev, dtype=torch.bfloat16)
    bits = out.view(torch.int16)
    sweep = {}
    for block, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
        grid = (triton.cdiv(n, block),)

        def launch(block=block, warps=warps, grid=grid, ins=(t, s, g), bits=bits):
            tm._merge_kernel[grid](*ins, bits, 1.0, n, OUT_CODE=1, BLOCK=block, num_warps=warps, enable_fp_fusion=False)

        try:
            ms = _bench(launch)
            sweep[f"{block}/{warps}"] = {"ms": ms, "gbps": 8 * n / ms / 1e6}
        except Exception as e:  # noqa: BLE001
            sweep[f"{block}/{warps}"] = {"error": repr(e)}
    res["block_sweep"] = sweep
    del t, s, g, out, bits, launch  # the closures hold the inputs too
    torch.cuda.empty_cache()
    save_partial(res)
    res["transfers"] = _transfers(state, dev, np)
    return res


def _transfers(state: dict, dev, np) -> dict:
    """Pinned H2D/D2H; H2D from a registered read-only file mapping; registration time with 1 and 4 threads."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from streammerge.engines.cuda import REGISTER_FLAGS, clear_cuda_error

    res: dict = {}
    nbytes = min(1 << 30, SIZES[state["size"]]["kernel_elems"] * 4)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(7)
    devbuf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    s = torch.cuda.Stream()

    def timed_copy(dst, src, reps=5) -> float:
        best = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(s):
                a.record(s)
                dst.copy_(src, non_blocking=True)
                b.record(s)
            b.synchronize()
            best.append(a.elapsed_time(b))
        return sorted(best)[len(best) // 2]

    res["pinned_h2d_gbps"] = nbytes / timed_copy(devbuf, host) / 1e6
    res["pinned_d2h_gbps"] = nbytes / timed_copy(host, devbuf) / 1e6
    # A file of the same size in the page cache, for H2D straight from a registered read-only mapping (this step runs
    # before the trio is generated).
    path = Path(state["workdir"]) / "h2d-probe.bin"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(-(-nbytes // len(block))):
            f.write(block)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    n = min(nbytes, size) // mmap.PAGESIZE * mmap.PAGESIZE
    view = torch.frombuffer(m, dtype=torch.uint8, count=n)
    cudart = torch.cuda.cudart()
    base = view.data_ptr()
    try:
        t0 = time.perf_counter()
        err = int(cudart.cudaHostRegister(base, n, REGISTER_FLAGS))
        res["register_1_thread_s"] = time.perf_counter() - t0
        res["register_bytes"] = n
        if err:
            res["register_error"] = err
            res["register_error_cleared"] = clear_cuda_error()
        else:
            res["registered_h2d_gbps"] = n / timed_copy(devbuf[:n], view) / 1e6
            cudart.cudaHostUnregister(base)
            parts = 4
            step = n // parts // mmap.PAGESIZE * mmap.PAGESIZE

            def reg(i: int) -> int:
                return int(cudart.cudaHostRegister(base + i * step, step, REGISTER_FLAGS))

            t0 = time.perf_counter()
            with ThreadPoolExecutor(parts) as ex:
                errs = list(ex.map(reg, range(parts)))
            res["register_4_threads_s"] = time.perf_counter() - t0
            for i, e in enumerate(errs):
                if e == 0:
                    cudart.cudaHostUnregister(base + i * step)
            res["register_4_threads_errors"] = [e for e in errs if e]
        res["pageable_h2d_gbps"] = n / timed_copy(devbuf[:n], view, reps=3) / 1e6
    finally:
        del view
        m.close()
        path.unlink(missing_ok=True)
    return res


def step_sparse70b(state: dict) -> dict:
    from streammerge import synth

    layout, layers = SIZES[state["size"]]["sparse"]
    root = Path(state["workdir"]) / "sparse"
    shutil.rmtree(root, ignore_errors=True)
    trio = synth.make_sparse_trio(root, layout, num_layers=layers)
    res: dict = {"layout": layout, "num_layers": layers}
    cuda = _cuda()
    if not cuda and state["size"] != "tiny":
        res["skipped"] = "no CUDA GPU"
        return res
    eng = _cuda_engine(chunk_bytes=64 << 20 if cuda else 64 << 10)
    log(f"sparse {layout} x {layers} layers -> null sink on {'cuda' if cuda else 'the simulated device'}")
    res["run"] = _run_merge(tuple(map(str, trio)), str(root / "null"), engine=eng, sink="null")
    shutil.rmtree(root, ignore_errors=True)
    return res


# Wheels for the peer, carried to the device machine (which reaches no package registry): ``make peer-wheels`` fills
# this folder (git-ignored) with mergekit 0.1.5 and the pure-Python pieces its image lacks, for Python 3.12.
PEER_WHEELS = machine.REPO_ROOT / ".whl"


def _mergekit_command(work: Path) -> tuple[list[str] | None, dict[str, str], str]:
    """How to run ``mergekit-yaml`` here: (command prefix or None, extra environment, where it came from).

    An installed mergekit wins. Otherwise the carried wheels are installed with ``--no-index --no-deps`` into a
    private folder that only the mergekit process sees on its ``PYTHONPATH``, so this script's own imports never
    pick up their versions of shared packages (typing_extensions)."""
    exe = shutil.which("mergekit-yaml")
    if exe and importlib.util.find_spec("mergekit") is not None:
        return [exe], {}, "installed"
    wheels = sorted(PEER_WHEELS.glob("*.whl"))
    if not any(w.name.startswith("mergekit-") for w in wheels):
        return None, {}, f"not installed and no mergekit wheel in {PEER_WHEELS} (run `make peer-wheels` and carry .whl)"
    site = work / "peer-site"
    shutil.rmtree(site, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target"]
    proc = subprocess.run([*pip, str(site), *map(str, wheels)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, {}, f"installing the carried wheels failed: {(proc.stdout + proc.stderr)[-500:]}"
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return [sys.executable, "-m", "mergekit.scripts.run_yaml"], {"PYTHONPATH": path}, f"carried wheels ({len(wheels)})"


def step_mergekit(state: dict) -> dict:
    from . import tools

    if not _cuda():
        return {"skipped": "no CUDA GPU for mergekit --cuda"}
    work = Path(state["workdir"])
    cmd, extra_env, source = _mergekit_command(work)
    res: dict = {"source": source}
    if cmd is None:
        res["skipped"] = source
        return res
    trio = _trio(state)
    cfg = work / "mergekit.yml"
    cfg.write_text(tools.mergekit_yaml(*trio, 1.0, float32=False, out_dtype="BF16"))
    out = work / "out-mergekit"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, **tools.OFFLINE_ENV, **extra_env}
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, str(cfg), str(out), "--cuda"], capture_output=True, text=True, env=env)
    res["wall_s"] = time.perf_counter() - t0
    res["returncode"] = proc.returncode
    res["tail"] = (proc.stdout + proc.stderr)[-2000:]
    if proc.returncode != 0:
        res["error"] = f"mergekit-yaml exited {proc.returncode}"
        res.pop("wall_s")
    shutil.rmtree(out, ignore_errors=True)
    return res


STEPS = {
    "env": step_env,
    "pytest": step_pytest,
    "kernel": step_kernel,
    "generate": step_generate,
    "pipeline": step_pipeline,
    "e2e": step_e2e,
    "mergekit": step_mergekit,
    "sparse70b": step_sparse70b,
    "sweep": step_sweep,
}


_PARTIAL: list[Path] = []  # the running step's result file (child side)


def save_partial(result: dict) -> None:
    """Write what a step has measured so far: if it is killed on its timeout, the parent keeps these figures."""
    if _PARTIAL:
        _write_json(_PARTIAL[0], {**result, "partial": True})


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _child(step: str, state_path: Path, result_path: Path) -> int:
    state = json.loads(state_path.read_text())
    _PARTIAL.append(result_path)
    try:
        result = STEPS[step](state)
    except Exception as e:  # noqa: BLE001 - everything is recorded, nothing is lost
        result = {"error": repr(e), "traceback": traceback.format_exc()[-4000:]}
        if result_path.exists():  # keep the parts that completed
            result = {**json.loads(result_path.read_text()), **result}
    _write_json(result_path, result)
    return 0


# ---------------------------------------------------------------------------------------------- orchestration
def _run_step(step: str, state: dict, state_path: Path, timeout: float) -> dict:
    state_path.write_text(json.dumps({**state, "step_timeout": timeout}, default=str))
    result_path = state_path.parent / f"step-{step}.json"
    result_path.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "benchmarks.gpu_check", "--step", step, "--state", str(state_path)]
    argv += ["--result", str(result_path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=machine.REPO_ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = _read_json(result_path)
        return {**partial, "error": f"timed out after {timeout:.0f} s", "seconds": time.perf_counter() - t0}
    if not result_path.exists():
        return {"error": f"step process exited with {rc} without a result", "seconds": time.perf_counter() - t0}
    result = _settle(_read_json(result_path), rc)
    result.setdefault("seconds", time.perf_counter() - t0)
    result["step_seconds"] = time.perf_counter() - t0
    return result


def _settle(result: dict, rc: int) -> dict:
    """A step's result as its process left it: one still marked partial did not finish; the step's own error, when
    it recorded one, is the one to keep."""
    if result.get("partial"):
        result.setdefault("error", f"step process exited with {rc} before it finished")
    return result


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fmt_gbps(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "-"


def summarize(results: dict) -> tuple[dict, list[str]]:
    """The figures the issue's targets are judged on, and the short table printed last."""
    st = results["steps"]
    s: dict = {}
    rows: list[str] = []
    env = st.get("env", {})
    card = (env.get("device_properties") or {}).get("name") or (env.get("gpu") or {}).get("why", "?")
    rows.append(f"card: {card}; size: {results['size']}; total {results.get('total_s', 0):.0f} s")
    hr = env.get("host_register")
    if hr:
        rows.append(f"cudaHostRegister supported: {hr.get('supported')}, ReadOnly: {hr.get('read_only_supported')}")
    py = st.get("pytest", {})
    rows.append(f"pytest -m cuda: {py.get('summary') or py.get('error', 'not run')}")
    gen = st.get("generate", {})
    if "bytes_in" in gen:
        rows.append(
            f"trio: {gen['layout']} x {gen['num_layers']} layers, {gen['bytes_in'] / 1e9:.2f} GB in, "
            f"{gen['bytes_out'] / 1e9:.2f} GB out, generated in {gen.get('generation_s') or 0:.1f} s"
        )
    pipe = st.get("pipeline", {}).get("runs", {})
    if pipe:
        rows.append(
            "pipeline -> null sink              GB/s moved  wall s  equal  peak GPU MB   h2d/kern/d2h busy s  overlap"
        )
        for name, r in pipe.items():
            if "error" in r:
                rows.append(f"  {name:32s} ERROR {r['error'][:80]}")
                continue
            ss = r.get("stage_seconds", {})
            busy = "/".join(f"{ss[k]:.2f}" for k in ("gpu_h2d", "gpu_kernel", "gpu_d2h") if k in ss) or "-"
            rows.append(
                f"  {name:32s} {r['gbps_moved']:9.1f}  {r['wall_s']:6.2f}  {str(r.get('bytes_equal_cpu', '-')):5s}"
                f"  {r.get('peak_gpu_memory', 0) / 2**20:10.0f}   {busy:19s}  {ss.get('gpu_overlap', 0):.2f}"
                + ("  (registration refused: staged)" if any("refused" in w for w in r.get("warnings", [])) else "")
            )
        cuda_runs = [r for k, r in pipe.items() if k.startswith("cuda") and "gbps_moved" in r]
        best = max(cuda_runs, default=None, key=lambda r: r["gbps_moved"])
        if best:
            s["pipeline_best_gbps"] = best["gbps_moved"]
            s["pipeline_target_40gbps_met"] = best["gbps_moved"] >= 40
        if "cpu" in pipe and best and "gbps_moved" in pipe["cpu"]:
            s["pipeline_cuda_over_cpu"] = best["gbps_moved"] / pipe["cpu"]["gbps_moved"]
    e2e = st.get("e2e", {})
    if "floor" in e2e:
        floor = e2e["floor"]["seconds"]
        s["floor_s"] = floor
        line = f"end to end to disk: floor {floor:.2f} s"
        for name in ("cpu", "cuda"):
            r = e2e.get(name, {})
            if "wall_s" in r:
                s[f"e2e_{name}_s"] = r["wall_s"]
                s[f"e2e_{name}_over_floor"] = r["wall_s"] / floor
                line += f"; {name} {r['wall_s']:.2f} s ({r['wall_s'] / floor:.2f}x floor)"
            elif r:
                line += f"; {name} {r.get('error') or r.get('skipped')}"
        if "bytes_equal" in e2e:
            s["e2e_bytes_equal"] = e2e["bytes_equal"]
            line += f"; files equal: {e2e['bytes_equal']}"
        rows.append(line)
    sw = st.get("sweep", {})
    if "sweep" in sw:
        single_s = sum(r.get("wall_s", 0) for r in sw["single"].values())
        s["sweep_speedup"] = sw.get("speedup")
        s["sweep_bytes_equal"] = sw.get("bytes_equal")
        s["combine_bytes_equal"] = sw.get("combine_bytes_equal")
        rows.append(
            f"sweep {sw['alphas']} -> null: {sw['sweep']['wall_s']:.2f} s vs {single_s:.2f} s single "
            f"({sw.get('speedup') or 0:.2f}x), equal: {sw.get('bytes_equal')}; combine 2 vectors cuda "
            f"{sw.get('combine_gpu_s', 0):.2f} s / cpu {sw.get('combine_cpu_s', 0):.2f} s, equal: "
            f"{sw.get('combine_bytes_equal')}"
        )
    elif sw:
        rows.append(f"sweep: {sw.get('error') or sw.get('note')}")
    ker = st.get("kernel", {})
    if "skipped" in ker or "error" in ker:
        rows.append(f"kernel: {ker.get('skipped') or ker.get('error')}")
    for name, c in (ker.get("cases") or {}).items():
        s.setdefault("kernel_vs_copy", {})[name] = c["kernel_vs_copy"]
        rows.append(
            f"kernel {name}: {c['kernel_gbps']:.0f} GB/s vs device copy {c['copy_gbps']:.0f} GB/s "
            f"({100 * c['kernel_vs_copy']:.0f}%)"
        )
    tr = ker.get("transfers") or {}
    if tr:
        rows.append(
            "transfers GB/s: pinned H2D "
            + ", ".join(
                f"{k.replace('_gbps', '')} {_fmt_gbps(tr.get(k))}"
                for k in ("pinned_h2d_gbps", "pinned_d2h_gbps", "registered_h2d_gbps", "pageable_h2d_gbps")
            )
            + f"; register {tr.get('register_bytes', 0) / 2**30:.2f} GiB in {tr.get('register_1_thread_s', 0):.3f} s"
            + f" (4 threads {tr.get('register_4_threads_s', float('nan')):.3f} s)"
        )
    sp = st.get("sparse70b", {}).get("run")
    if sp:
        s["sparse70b_peak_gpu_memory"] = sp["peak_gpu_memory"]
        rows.append(
            f"sparse {st['sparse70b']['layout']} x {st['sparse70b']['num_layers']}: peak GPU "
            f"{sp['peak_gpu_memory'] / 2**20:.0f} MiB, {sp['gbps_moved']:.1f} GB/s moved"
        )
    mk = st.get("mergekit", {})
    if "wall_s" in mk:
        s["mergekit_cuda_s"] = mk["wall_s"]
        if "e2e_cuda_s" in s:
            s["cuda_speedup_over_mergekit"] = mk["wall_s"] / s["e2e_cuda_s"]
        rows.append(f"mergekit --cuda: {mk['wall_s']:.1f} s (rc {mk.get('returncode')})")
    elif mk:
        rows.append(f"mergekit: {mk.get('skipped') or mk.get('error')}")
    failed = [k for k, v in st.items() if isinstance(v, dict) and "error" in v]
    s["failed_steps"] = failed
    rows.append(f"failed steps: {', '.join(failed) if failed else 'none'}")
    return s, rows


def ensure_importable() -> dict:
    """``streammerge.kernels`` is the repository's ``kernels/`` folder mapped into the package by the install
    (pyproject ``package-dir``). On a bare machine (the lent GPU box: no install, no package index) install this
    checkout in editable mode, offline; failing that, link ``streammerge/kernels`` to ``kernels/`` in this throwaway
    copy of the tree."""
    check = [sys.executable, "-c", "import streammerge.kernels"]

    def importable() -> bool:
        try:
            return subprocess.run(check, cwd=machine.REPO_ROOT, capture_output=True, timeout=120).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    if importable():
        return {"install": "already importable"}
    log("streammerge.kernels is not importable: installing this checkout in editable mode (offline)")
    res: dict = {}
    argv = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e"]
    try:
        proc = subprocess.run([*argv, str(machine.REPO_ROOT)], capture_output=True, text=True, timeout=180)
        res.update(pip_rc=proc.returncode, pip_tail=proc.stderr[-2000:])
    except (OSError, subprocess.TimeoutExpired) as e:
        res["pip_error"] = repr(e)
    if importable():
        return {"install": "editable", **res}
    link = machine.REPO_ROOT / "streammerge" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels")
    return {"install": "symlink streammerge/kernels -> ../kernels" if importable() else "FAILED", **res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="full", help="trio size (default full: 4 GB/checkpoint)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch directory (inputs, outputs)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the results JSON goes")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        return _child(args.step, args.state, args.result)

    t_start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    results: dict = {"started_utc": stamp, "size": args.size, "budget_s": args.budget, "steps": {}}
    state = {"workdir": str(args.workdir), "size": args.size, "steps": results["steps"]}
    state_path = args.workdir / "state.json"
    results["setup"] = ensure_importable()
    if results["setup"]["install"] == "FAILED":
        log(f"could not make streammerge.kernels importable: {results['setup']}")
    if not _cuda():
        log("no CUDA GPU here: GPU steps are skipped or run on the simulated device (tiny size only)")
    wanted = [s for s in args.steps.split(",") if s]
    for step in STEPS:
        if step not in wanted:
            continue
        left = args.budget - (time.perf_counter() - t_start)
        if left < MIN_STEP_S:
            results["steps"][step] = {"skipped": f"time budget spent ({left:.0f} s left)"}
            log(f"{step}: skipped, {left:.0f} s left")
            continue
        timeout = min(STEP_TIMEOUTS[step], left)
        log(f"{step}: start (timeout {timeout:.0f} s)")
        results["steps"][step] = _run_step(step, state, state_path, timeout)
        r = results["steps"][step]
        log(f"{step}: {'ERROR ' + r['error'][:200] if 'error' in r else 'done'} in {r.get('step_seconds', 0):.1f} s")
        results["total_s"] = time.perf_counter() - t_start
        _save_results(results, args.out, stamp, final=False)
    results["total_s"] = time.perf_counter() - t_start
    summary, rows = summarize(results)
    results["summary"] = summary
    paths = _save_results(results, args.out, stamp, final=True)
    print("\n".join(["", "=" * 100, *rows, f"results: {', '.join(paths)}", "=" * 100]), flush=True)
    return 0


def _save_results(results: dict, out: Path, stamp: str, final: bool) -> list[str]:
    """The results JSON in ``out`` and in ``$OUT`` (the device tool's folder): rewritten after every step."""
    paths = []
    for directory in (out, Path(os.environ["OUT"]) if os.environ.get("OUT") else None):
        if directory is None:
            continue
        try:
            directory.mkdir(parents=True, exist_ok=True)
            p = directory / f"gpu_check-{stamp}.json"
            _write_json(p, {**results, "complete": final})
            paths.append(str(p))
        except OSError as e:
            log(f"could not write results to {directory}: {e}")
    return paths


if __name__ == "__main__":
    sys.exit(main())
