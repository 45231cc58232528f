"""Step ``pytest``: the ``cuda``-marked tests (``pytest -m cuda``) in a child process, its log written as it runs."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .. import machine

# A hung test (a driver call, say) fails alone after this many seconds, with its name, when pytest-timeout is
# installed (the lent machines' image has it); the step's own timeout stays the backstop.
PER_TEST_TIMEOUT_S = 100


def run(state: dict) -> dict:
    argv = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider"]
    # One module failing to import under the image's package versions must not cancel the others.
    argv += ["--continue-on-collection-errors"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        argv += [f"--timeout={PER_TEST_TIMEOUT_S}"]
    argv += ["--basetemp", str(Path(state["workdir"]) / "pytest"), str(machine.REPO_ROOT / "tests")]
    # The log is written as pytest runs (and lands in $OUT when set), so a step killed on its timeout still shows
    # which tests had passed and which one hung.
    log_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(state["workdir"])
    log_path = log_dir / "pytest-cuda.log"
    t0 = time.perf_counter()
    timeout = max(10.0, float(state.get("step_timeout", 600)) - 10)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(argv, cwd=machine.REPO_ROOT, stdout=logf, stderr=subprocess.STDOUT)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = f"killed after {timeout:.0f} s"
    lines = log_path.read_text(errors="replace").strip().splitlines()
    for line in lines[-60:]:
        print(line, flush=True)
    outcome = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?)\b")
    summary = next((line for line in reversed(lines) if outcome.search(line)), None)
    res = {"returncode": rc, "seconds": time.perf_counter() - t0, "summary": summary or str(rc), "log": str(log_path)}
    res["tail"] = lines[-80:]
    if isinstance(rc, str):
        res["error"] = f"pytest {rc}"
    return res
