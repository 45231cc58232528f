"""Step ``sweep``: a 3-alpha sweep (one pass) against 3 single-alpha runs on the CUDA engine, to the null sink with
SHA-256s; and a two-vector combine on CUDA against the CPU engine's bytes (issue 6 on the GPU)."""

from __future__ import annotations

import time
from pathlib import Path

from .common import cuda_available, cuda_engine, restore_engine, run_merge, trio, with_engine
from .config import SIZES
from .runner import save_partial


def run(state: dict) -> dict:
    import streammerge

    cfg = SIZES[state["size"]]
    inputs = trio(state)
    cuda = cuda_available()
    if not cuda and state["size"] != "tiny":
        return {"cuda": False, "note": "no CUDA GPU: skipped (the simulated device is for tiny sizes)"}
    alphas = [0.5, 1.0, 1.5]
    null = str(Path(state["workdir"]) / "null-sweep")
    res: dict = {"cuda": cuda, "alphas": alphas, "single": {}}
    spec = {
        "target": inputs[0],
        "vectors": [
            {"sft": inputs[1], "grpo": inputs[2], "alpha": 0.75},
            {"sft": inputs[2], "grpo": inputs[1], "alpha": 0.5},
        ],
    }
    t0 = time.perf_counter()
    cpu_combine = streammerge.combine(spec, null, device="cpu", sink="null-sha256")
    res["combine_cpu_s"] = time.perf_counter() - t0
    save_partial(res)
    original = with_engine(cuda_engine(chunk_bytes=cfg["chunks"][-1], window_bytes=cfg["window"]))
    try:
        t0 = time.perf_counter()
        reports = streammerge.sweep(*inputs, null, alphas, sink="null-sha256")
        res["sweep"] = {
            "wall_s": time.perf_counter() - t0,
            "bytes_read": reports[0].bytes_read,
            "peak_gpu_memory": reports[0].peak_gpu_memory,
            "shard_sha256": [r.shard_sha256 for r in reports],
        }
        for a in alphas:
            res["single"][repr(a)] = run_merge(inputs, null, alpha=a, sink="null-sha256")
        res["bytes_equal"] = res["sweep"]["shard_sha256"] == [res["single"][repr(a)]["shard_sha256"] for a in alphas]
        single_s = sum(r["wall_s"] for r in res["single"].values())
        res["speedup"] = single_s / res["sweep"]["wall_s"] if res["sweep"]["wall_s"] > 0 else None
        t0 = time.perf_counter()
        gpu_combine = streammerge.combine(spec, null, sink="null-sha256")
        res["combine_gpu_s"] = time.perf_counter() - t0
        res["combine_bytes_equal"] = gpu_combine.shard_sha256 == cpu_combine.shard_sha256
        res["combine_peak_gpu_memory"] = gpu_combine.peak_gpu_memory
    finally:
        restore_engine(original)
    return res
