"""Crash injection for the atomicity tests: ``STREAMMERGE_CRASH_AT=POINT`` SIGKILLs the process at POINT.

Points: ``planned`` (before the output directory is touched), ``chunk:N`` (after the N-th chunk is written),
``shard:N`` (after shard N, 0-based, got its final name), ``index`` (index written, manifest not yet complete).
``STREAMMERGE_CRASH_RANK=R`` limits it to torchrun rank R (the ``RANK`` variable). Unset in normal use; reading
them costs two environment lookups per process.
"""

from __future__ import annotations

import os
import signal

_POINT = os.environ.get("STREAMMERGE_CRASH_AT", "")
_RANK = os.environ.get("STREAMMERGE_CRASH_RANK")


def crash_point(point: str) -> None:
    if _POINT and point == _POINT and (_RANK is None or _RANK == os.environ.get("RANK")):
        os.kill(os.getpid(), signal.SIGKILL)
