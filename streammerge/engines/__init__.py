"""Compute engines. Every engine consumes the same plan and produces the same bytes (DESIGN.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """What an engine measured while running."""

    device: str
    chunks: int = 0
    chunks_written: int = 0
    peak_rss_anon: int = 0  # bytes, sampled per chunk
    peak_gpu_memory: int = 0  # bytes, torch.cuda.max_memory_allocated
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # tensor name -> elements that became non-finite from finite inputs (check_finite only)
    nonfinite: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Progress:
    """A progress event passed to the ``progress`` callback. Bytes count input read + output written."""

    bytes_done: int
    bytes_total: int
    tensors_done: int
    tensors_total: int
    tensor: str = ""
    phase: str = "merge"
