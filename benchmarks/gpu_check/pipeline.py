"""Step ``pipeline``: page cache -> GPU -> null sink (``sink="null-sha256"``): the CPU engine, then the CUDA engine
with registered windows (each chunk size) and with pinned staging, each once plain and once with ``profile`` for the
per-stage breakdown and the overlap; every output file's SHA-256 compared with the CPU engine's."""

from __future__ import annotations

import traceback
from pathlib import Path

from .common import cuda_available, cuda_engine, log, run_merge, size_name, trio
from .config import SIZES
from .runner import save_partial


def run(state: dict) -> dict:
    cfg = SIZES[state["size"]]
    inputs = trio(state)
    cuda = cuda_available()
    res: dict = {"cuda": cuda, "runs": {}}
    null = str(Path(state["workdir"]) / "null")
    log("CPU engine -> null sink")
    res["runs"]["cpu"] = run_merge(inputs, null, device="cpu", sink="null-sha256")
    want = res["runs"]["cpu"]["shard_sha256"]
    plans = [(f"cuda-registered-{size_name(c)}", c, True) for c in cfg["chunks"]]
    plans.append((f"cuda-staging-{size_name(cfg['chunks'][-1])}", cfg["chunks"][-1], False))
    if not cuda and state["size"] != "tiny":
        res["note"] = "no CUDA GPU: only the CPU engine ran (the simulated device is for tiny sizes)"
        return res
    save_partial(res)
    # Warm-up: compiles the kernels and creates the CUDA context outside the timed runs. A failure is recorded and
    # every variant still runs (the staging one avoids registration altogether).
    try:
        run_merge(inputs, null, engine=cuda_engine(chunk_bytes=cfg["chunks"][0]), sink="null")
    except Exception as e:  # noqa: BLE001 - recorded
        res["warmup_error"] = {"error": repr(e), "traceback": traceback.format_exc()[-3000:]}
    for name, chunk, register in plans:
        for profile in (False, True):
            key = name + ("+profile" if profile else "")
            log(f"{key} -> null sink")
            try:
                eng = cuda_engine(
                    chunk_bytes=chunk, window_bytes=cfg["window"], register_windows=register, profile=profile
                )
                r = run_merge(inputs, null, engine=eng, sink="null-sha256")
                r["bytes_equal_cpu"] = r["shard_sha256"] == want
                res["runs"][key] = r
            except Exception as e:  # noqa: BLE001 - recorded, the next variant still runs
                res["runs"][key] = {"error": repr(e), "traceback": traceback.format_exc()[-3000:]}
            save_partial(res)
    return res
