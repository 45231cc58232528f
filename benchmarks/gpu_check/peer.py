"""Step ``mergekit``: the peer, ``mergekit-yaml --cuda``, on the same trio: an installed mergekit, else the wheels
carried in ``.whl/`` (``make peer-wheels``), installed into a private folder; else recorded as absent."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .. import machine
from .common import cuda_available, trio

# Wheels for the peer, carried to the device machine (which reaches no package registry): ``make peer-wheels`` fills
# this folder (git-ignored) with mergekit 0.1.5 and the pure-Python pieces its image lacks, for Python 3.12.
PEER_WHEELS = machine.REPO_ROOT / ".whl"


def mergekit_command(work: Path) -> tuple[list[str] | None, dict[str, str], str]:
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


def run(state: dict) -> dict:
    from .. import tools

    if not cuda_available():
        return {"skipped": "no CUDA GPU for mergekit --cuda"}
    work = Path(state["workdir"])
    cmd, extra_env, source = mergekit_command(work)
    res: dict = {"source": source}
    if cmd is None:
        res["skipped"] = source
        return res
    inputs = trio(state)
    cfg = work / "mergekit.yml"
    cfg.write_text(tools.mergekit_yaml(*inputs, 1.0, float32=False, out_dtype="BF16"))
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
