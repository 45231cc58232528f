"""Compute engines: every engine consumes the same plan and produces the same bytes (docs/numerics.md).

This package root only re-exports what the engines report; the engines live in :mod:`.cpu` and :mod:`.cuda`, the work
list they share in :mod:`.work`.
"""

from .stats import EngineStats, Progress, ProgressCounter

__all__ = ["EngineStats", "Progress", "ProgressCounter"]
