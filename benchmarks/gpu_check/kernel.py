"""Step ``kernel``: the merge kernel alone against a device-to-device copy of the same bytes
(``triton.testing.do_bench`` medians), a block-size sweep, pinned H2D/D2H and H2D from a registered read-only file
mapping, registration speed with 1 and 4 threads. Needs no trio, so it runs before the slow steps."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .common import cuda_available, log
from .config import SIZES
from .runner import save_partial

# (block size, warps) launch configurations of the merge kernel the sweep times (bf16 -> bf16).
BLOCK_SWEEP = ((512, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8), (4096, 16), (8192, 16))


def bench(fn, warmup: int = 25, rep: int = 200) -> float:
    """Median milliseconds of ``fn`` on the GPU (``triton.testing.do_bench``)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def run(state: dict) -> dict:
    if not cuda_available():
        return {"skipped": "no CUDA GPU"}
    import numpy as np
    import torch

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
        ms_k = bench(lambda t=t, s=s, g=g, out=out, od=od: tm.merge_triton(t, s, g, 1.0, od, out=out))
        src = torch.empty(moved // 2, device=dev, dtype=torch.uint8)
        dst = torch.empty_like(src)
        ms_c = bench(lambda src=src, dst=dst: dst.copy_(src))
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
    # Block size / warps sweep of the same kernel (bf16 -> bf16), through the launcher's launch configuration.
    t, s, g = (torch.randn(n, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    out = torch.empty(n, device=dev, dtype=torch.bfloat16)
    sweep = {}
    for block, warps in BLOCK_SWEEP:

        def launch(block=block, warps=warps, ins=(t, s, g), out=out):
            tm.merge_triton(*ins, 1.0, "BF16", out=out, block_size=block, num_warps=warps)

        try:
            ms = bench(launch)
            sweep[f"{block}/{warps}"] = {"ms": ms, "gbps": 8 * n / ms / 1e6}
        except Exception as e:  # noqa: BLE001
            sweep[f"{block}/{warps}"] = {"error": repr(e)}
    res["block_sweep"] = sweep
    del t, s, g, out, launch  # the closures hold the inputs too
    torch.cuda.empty_cache()
    save_partial(res)
    res["transfers"] = transfers(state, dev, np)
    return res


def transfers(state: dict, dev, np) -> dict:
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
