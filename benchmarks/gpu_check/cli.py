"""The command line and the run: each step in run order, within the time budget, the results file rewritten after
every step, the summary table printed last."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from . import cuda_tests, e2e, env, generate, kernel, peer, pipeline, sparse70b, sweep
from .common import cuda_available, log
from .config import DEFAULT_BUDGET_S, DEFAULT_WORKDIR, MIN_STEP_S, RESULTS_DIR, SIZES, STEP_TIMEOUTS
from .runner import Step, ensure_importable, run_child, run_step, write_json
from .summary import summarize

# The --help description: the package docstring's first line.
_DESCRIPTION = (sys.modules[__package__].__doc__ or "").splitlines()[0]

# The steps by name, in run order (most important first).
STEPS: dict[str, Step] = {
    "env": env.run,
    "pytest": cuda_tests.run,
    "kernel": kernel.run,
    "generate": generate.run,
    "pipeline": pipeline.run,
    "e2e": e2e.run,
    "mergekit": peer.run,
    "sparse70b": sparse70b.run,
    "sweep": sweep.run,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=_DESCRIPTION)
    ap.add_argument("--size", choices=list(SIZES), default="full", help="trio size (default full: 4 GB/checkpoint)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch directory (inputs, outputs)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the results JSON goes")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        return run_child(STEPS[args.step], args.state, args.result)

    t_start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    results: dict = {"started_utc": stamp, "size": args.size, "budget_s": args.budget, "steps": {}}
    state = {"workdir": str(args.workdir), "size": args.size, "steps": results["steps"]}
    state_path = args.workdir / "state.json"
    results["setup"] = ensure_importable()
    if results["setup"]["install"] == "FAILED":
        log(f"could not make streammerge.kernels importable: {results['setup']}")
    if not cuda_available():
        log("no CUDA GPU here: GPU steps are skipped or run on the simulated device (tiny size only)")
    wanted = [s for s in args.steps.split(",") if s]
    for step in STEPS:
        if step not in wanted:
            continue
        left = args.budget - (time.perf_counter() - t_start)
        if left < MIN_STEP_S:
            results["steps"][step] = {"skipped": f"time budget spent ({left:.0f} s left)"}
            log(f"{step}: skipped, {left:.0f} s left")
            continue
        timeout = min(STEP_TIMEOUTS[step], left)
        log(f"{step}: start (timeout {timeout:.0f} s)")
        results["steps"][step] = run_step(step, state, state_path, timeout)
        r = results["steps"][step]
        log(f"{step}: {'ERROR ' + r['error'][:200] if 'error' in r else 'done'} in {r.get('step_seconds', 0):.1f} s")
        results["total_s"] = time.perf_counter() - t_start
        _save_results(results, args.out, stamp, final=False)
    results["total_s"] = time.perf_counter() - t_start
    summary, rows = summarize(results)
    results["summary"] = summary
    paths = _save_results(results, args.out, stamp, final=True)
    print("\n".join(["", "=" * 100, *rows, f"results: {', '.join(paths)}", "=" * 100]), flush=True)
    return 0


def _save_results(results: dict, out: Path, stamp: str, final: bool) -> list[str]:
    """The results JSON in ``out`` and in ``$OUT`` (the device tool's folder): rewritten after every step."""
    paths = []
    for directory in (out, Path(os.environ["OUT"]) if os.environ.get("OUT") else None):
        if directory is None:
            continue
        try:
            directory.mkdir(parents=True, exist_ok=True)
            p = directory / f"gpu_check-{stamp}.json"
            write_json(p, {**results, "complete": final})
            paths.append(str(p))
        except OSError as e:
            log(f"could not write results to {directory}: {e}")
    return paths
