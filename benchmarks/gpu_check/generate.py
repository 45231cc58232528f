"""Step ``generate``: the synthetic trio the later steps merge (``streammerge.synth``), timed; reused when a complete
one is already in the work directory."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .common import log
from .config import SIZES


def run(state: dict) -> dict:
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
