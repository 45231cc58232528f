"""What each ``--size`` generates and runs, the whole run's time budget, and each step's timeout."""

from __future__ import annotations

from pathlib import Path

from .. import machine

DEFAULT_WORKDIR = Path("/tmp/streammerge-gpu-check")
RESULTS_DIR = machine.REPO_ROOT / "benchmarks" / "results"
# The whole run's budget (seconds): the lease allows ~6 minutes for the script; steps that no longer fit are skipped.
DEFAULT_BUDGET_S = 360.0

# What each size generates. full: the 4 GB-per-checkpoint trio; small: ~0.6 GB per checkpoint; tiny: a few
# MB (any machine, seconds).
SIZES = {
    "tiny": {
        "layout": "tiny-qwen2",
        "layers": None,
        "chunks": [64 << 10, 256 << 10],
        "window": 1 << 20,
        "sparse": ("tiny-qwen2", None),
        "kernel_elems": 1 << 22,
    },
    "small": {
        "layout": "qwen2.5-0.5b",
        "layers": 8,
        "chunks": [16 << 20, 64 << 20],
        "window": 256 << 20,
        "sparse": ("llama3-70b", 1),
        "kernel_elems": 1 << 26,
    },
    "full": {
        "layout": "qwen2.5-7b",
        "layers": 4,
        "chunks": [16 << 20, 64 << 20],
        "window": 256 << 20,
        "sparse": ("llama3-70b", 2),
        "kernel_elems": 1 << 28,
    },
}
# Per-step timeouts (seconds, full size), in run order. A step also gets no more than the budget left.
STEP_TIMEOUTS = {
    "env": 60,
    "pytest": 150,
    "kernel": 90,
    "generate": 150,
    "pipeline": 150,
    "e2e": 150,
    "mergekit": 150,
    "sparse70b": 120,
    "sweep": 90,
}
# A step is skipped rather than started with less than this left (seconds).
MIN_STEP_S = 15
