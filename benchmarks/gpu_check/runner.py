"""The shared runner: each step runs in its own process (``python -m benchmarks.gpu_check --step NAME``) with its own
timeout, saves its parts as they complete, and hands back its result as JSON; a hung or crashed step is recorded and
the next one runs. Also makes ``streammerge.kernels`` importable on a bare machine before any step starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from .. import machine
from .common import log

# A step: the run's state (work directory, size, earlier steps' results) in, its JSON-able result out.
Step = Callable[[dict], dict]

_partial: list[Path] = []  # the running step's result file (child side)


def save_partial(result: dict) -> None:
    """Write what a step has measured so far: if it is killed on its timeout, the parent keeps these figures."""
    if _partial:
        write_json(_partial[-1], {**result, "partial": True})


def write_json(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; an empty dict when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_child(step: Step, state_path: Path, result_path: Path) -> int:
    """Run ``step`` on the state in ``state_path`` (the child side); its result, or its error with the parts it saved
    before it, goes to ``result_path``."""
    state = json.loads(state_path.read_text())
    _partial.append(result_path)
    try:
        try:
            result = step(state)
        except Exception as e:  # noqa: BLE001 - everything is recorded, nothing is lost
            result = {"error": repr(e), "traceback": traceback.format_exc()[-4000:]}
            if result_path.exists():  # keep the parts that completed
                result = {**json.loads(result_path.read_text()), **result}
        write_json(result_path, result)
    finally:
        _partial.remove(result_path)
    return 0


def run_step(step: str, state: dict, state_path: Path, timeout: float) -> dict:
    """Run step ``step`` in its own process for at most ``timeout`` seconds (the parent side); its result, or what
    it saved before it timed out or died, with the error."""
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
        partial = read_json(result_path)
        return {**partial, "error": f"timed out after {timeout:.0f} s", "seconds": time.perf_counter() - t0}
    if not result_path.exists():
        return {"error": f"step process exited with {rc} without a result", "seconds": time.perf_counter() - t0}
    result = settle(read_json(result_path), rc)
    result.setdefault("seconds", time.perf_counter() - t0)
    result["step_seconds"] = time.perf_counter() - t0
    return result


def settle(result: dict, rc: int) -> dict:
    """A step's result as its process left it: one still marked partial did not finish; the step's own error, when
    it recorded one, is the one to keep."""
    if result.get("partial"):
        result.setdefault("error", f"step process exited with {rc} before it finished")
    return result


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
