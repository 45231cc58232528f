"""What the steps share: the log line, whether a GPU is here, the trio the generate step made, the CUDA engine on the
real or the simulated device, and one timed merge reported as a dict."""

from __future__ import annotations

import time
from pathlib import Path

# The report fields a step records for each merge it runs.
REPORT_FIELDS = (
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


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cuda_available() -> bool:
    """Whether torch is importable and sees a CUDA GPU."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def sha_files(directory: Path) -> dict[str, str]:
    """SHA-256 of every weight file in ``directory``, re-read from disk."""
    from streammerge.writer import sha256_file

    return {p.name: sha256_file(p) for p in sorted(directory.glob("*.safetensors")) if not p.name.startswith(".")}


def report_dict(report) -> dict:
    """The :data:`REPORT_FIELDS` of a ``MergeReport``."""
    d = report.to_dict()
    return {k: d[k] for k in REPORT_FIELDS}


def size_name(n: int) -> str:
    return f"{n >> 20}MiB" if n >= 1 << 20 else f"{n >> 10}KiB"


def trio(state: dict) -> tuple[str, str, str]:
    """The target, sft and grpo directories the generate step made (an error when it did not complete)."""
    gen = state["steps"].get("generate") or {}
    if "root" not in gen:
        raise RuntimeError("no trio: the generate step did not complete")
    root = Path(gen["root"])
    return str(root / "target"), str(root / "sft"), str(root / "grpo")


def cuda_engine(**kw):
    """A ``CudaEngine`` on the GPU; without one, the same engine on the simulated device (reference kernel), which
    checks this script's plumbing."""
    from streammerge.engines.cuda import CudaEngine, SimBackend

    if cuda_available():
        return CudaEngine(**kw)
    return CudaEngine(backend=SimBackend(kernel="reference"), **kw)


def with_engine(engine):
    """Make every merge from here on run on ``engine`` (the orchestration's engine choice, ``run.select_engine``,
    replaced); returns the engine choice to restore."""
    from streammerge import run

    original = run.select_engine
    run.select_engine = lambda *args, **kwargs: (engine, f"{engine.name} (gpu_check)")
    return original


def restore_engine(original) -> None:
    """Undo :func:`with_engine`."""
    from streammerge import run

    run.select_engine = original


def run_merge(trio, out, engine=None, **kw) -> dict:
    """One ``streammerge.merge`` (on ``engine`` when given), its report fields, wall time and GB/s moved."""
    import streammerge

    original = with_engine(engine) if engine is not None else None
    try:
        t0 = time.perf_counter()
        r = streammerge.merge(*trio, out, **kw)
        d = report_dict(r)
        d["wall_s"] = time.perf_counter() - t0
        d["gbps_moved"] = (r.bytes_read + r.bytes_written) / d["wall_s"] / 1e9
        return d
    finally:
        if original is not None:
            restore_engine(original)
