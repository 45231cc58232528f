"""Crash injection for the atomicity tests: ``STREAMMERGE_CRASH_AT=POINT`` SIGKILLs the process at POINT.

Points: ``planned`` (before the output directory is touched), ``chunk:N`` (after the N-th chunk is written),
``shard:N`` (after shard N, 0-based, got its final name), ``index`` (index written, manifest not yet complete).
Unset in normal use; reading it costs one environment lookup per process.
"""

from __future__ import annotations

import os
import signal

_POINT = os.environ.get("STREAMMERGE_CRASH_AT", "")


def crash_point(point: str) -> None:
    if _POINT and point == _POINT:
        os.kill(os.getpid(), signal.SIGKILL)
