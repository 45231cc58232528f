"""What the benchmarks ran on: machine, versions, load, and the page-cache state of the inputs.

Page-cache residency is measured with ``mincore(2)`` over a read-only shared mapping of each file (mapping faults
nothing in, so measuring does not change what is measured); cold runs drop the caches through
``/proc/sys/vm/drop_caches``, which needs root and a writable ``/proc/sys``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import mmap
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("streammerge", "torch", "triton", "safetensors", "numpy", "psutil", "matplotlib")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# After a drop, inputs still more resident than this count as "the drop did not work" (a container may accept the
# write and ignore it).
COLD_RESIDENCY_MAX = 0.05
# Files are read in 8 MiB blocks when warming the cache: large enough that syscall overhead is noise.
WARM_READ_BLOCK = 8 << 20

_PROT_READ = 0x1
_MAP_SHARED = 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def resident_bytes(path: str | os.PathLike) -> tuple[int, int]:
    """Bytes of ``path`` in the page cache and its size, via ``mincore`` (``(0, size)`` where it is unavailable)."""
    size = os.path.getsize(path)
    if size == 0 or not sys.platform.startswith("linux"):
        return 0, size
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            return 0, size
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return 0, size
            resident = int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return min(size, resident * mmap.PAGESIZE), size


def cache_residency(files: Iterable[str | os.PathLike]) -> float:
    """Fraction (0..1) of the bytes of ``files`` that are in the page cache."""
    resident = total = 0
    for f in files:
        r, s = resident_bytes(f)
        resident += r
        total += s
    return resident / total if total else 1.0


def warm(files: Iterable[str | os.PathLike]) -> float:
    """Read ``files`` once so they sit in the page cache; returns the seconds it took."""
    t0 = time.perf_counter()
    buf = bytearray(WARM_READ_BLOCK)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def drop_caches() -> tuple[bool, str]:
    """``sync`` then drop the page cache, dentries and inodes; returns whether it worked and a note."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as e:
        return False, f"cold not permitted: writing {DROP_CACHES} failed ({e.strerror or e})"
    return True, "dropped with sync; echo 3 > /proc/sys/vm/drop_caches"


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (MemTotal, MemAvailable, Cached, ...); empty off Linux."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def load_average() -> float:
    """The 1-minute load average (other work on a shared machine shows up here)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, str | bool | None]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def gpu_info() -> dict[str, object]:
    """Whether torch sees a CUDA GPU (which), and whether streammerge's CUDA engine can run on it (imports torch)."""
    try:
        import torch
    except ImportError:
        return {"cuda": False, "why": "torch not importable"}
    if not torch.cuda.is_available():
        return {"cuda": False, "why": "no CUDA GPU available"}
    props = torch.cuda.get_device_properties(0)
    info: dict[str, object] = {"name": props.name, "memory": props.total_memory, "count": torch.cuda.device_count()}
    missing = [m for m in ("triton", "streammerge.engines.cuda") if importlib.util.find_spec(m) is None]
    if missing:
        return {**info, "cuda": False, "why": f"a GPU but no streammerge CUDA engine ({', '.join(missing)} missing)"}
    return {**info, "cuda": True}


def machine_info(workdir: Path) -> dict[str, object]:
    """Cores, memory, CPU model, kernel, disk of the work directory, load, versions and git commit."""
    mem = meminfo()
    disk = shutil.disk_usage(workdir)
    return {
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total": mem.get("MemTotal"),
        "mem_available_at_start": mem.get("MemAvailable"),
        "swap_total": mem.get("SwapTotal"),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "workdir": str(workdir),
        "workdir_disk_total": disk.total,
        "workdir_disk_free_at_start": disk.free,
        "load_average_at_start": list(os.getloadavg()),
        "versions": {p: _version(p) for p in PACKAGES},
        "git": _git(),
    }
