"""Step ``sparse70b``: a Llama-3-70B-layout trio of holes (data regions never written) merged on the GPU to the null
sink with 64 MiB chunks: the peak GPU memory of 70B-sized tensors."""

from __future__ import annotations

import shutil
from pathlib import Path

from .common import cuda_available, cuda_engine, log, run_merge
from .config import SIZES


def run(state: dict) -> dict:
    from streammerge import synth

    layout, layers = SIZES[state["size"]]["sparse"]
    root = Path(state["workdir"]) / "sparse"
    shutil.rmtree(root, ignore_errors=True)
    trio = synth.make_sparse_trio(root, layout, num_layers=layers)
    res: dict = {"layout": layout, "num_layers": layers}
    cuda = cuda_available()
    if not cuda and state["size"] != "tiny":
        res["skipped"] = "no CUDA GPU"
        return res
    eng = cuda_engine(chunk_bytes=64 << 20 if cuda else 64 << 10)
    log(f"sparse {layout} x {layers} layers -> null sink on {'cuda' if cuda else 'the simulated device'}")
    res["run"] = run_merge(tuple(map(str, trio)), str(root / "null"), engine=eng, sink="null")
    shutil.rmtree(root, ignore_errors=True)
    return res
