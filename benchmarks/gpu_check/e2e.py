"""Step ``e2e``: the I/O floor (read the inputs, write and fsync the output's bytes), then the CPU and the CUDA engine
to disk; the output files re-hashed and compared."""

from __future__ import annotations

import shutil
import time
import traceback
from pathlib import Path

from .common import cuda_available, cuda_engine, log, run_merge, sha_files, trio
from .config import SIZES
from .runner import save_partial


def run(state: dict) -> dict:
    from .. import workers

    cfg = SIZES[state["size"]]
    inputs = trio(state)
    gen = state["steps"]["generate"]
    work = Path(state["workdir"])
    res: dict = {"cuda": cuda_available()}
    log("I/O floor: read every input, write + fsync the output's bytes")
    res["floor"] = workers.floor(gen["files"], str(work / "floor.bin"), gen["bytes_out"])
    save_partial(res)
    for name in ("cpu", "cuda"):
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        log(f"{name} engine -> disk")
        try:
            if name == "cpu":
                r = run_merge(inputs, out, device="cpu")
            else:
                if not res["cuda"] and state["size"] != "tiny":
                    res[name] = {"skipped": "no CUDA GPU"}
                    continue
                eng = cuda_engine(chunk_bytes=cfg["chunks"][-1], window_bytes=cfg["window"])
                r = run_merge(inputs, out, engine=eng)
            t0 = time.perf_counter()
            r["files_sha256"] = sha_files(out)
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
