"""What an engine reports: its measured figures (EngineStats) and progress events (Progress, ProgressCounter)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..plan import OutTensor


@dataclass
class EngineStats:
    """What an engine measured while running."""

    device: str
    chunks: int = 0
    chunks_written: int = 0
    peak_rss_anon: int = 0  # bytes, sampled per chunk
    peak_gpu_memory: int = 0  # bytes, torch.cuda.max_memory_allocated
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # tensor name -> elements that became non-finite from finite inputs (check_finite only), in every output
    nonfinite: dict[str, int] = field(default_factory=dict)
    # the same for one output of a sweep only: output -> tensor name -> elements
    nonfinite_by_output: dict[int, dict[str, int]] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    notes: list[str] = field(default_factory=list)

    def add_nonfinite(self, name: str, n: int, output: int | None = None) -> None:
        """Count ``n`` elements of ``name`` that became non-finite, in output ``output`` (None: every output)."""
        d = self.nonfinite if output is None else self.nonfinite_by_output.setdefault(output, {})
        d[name] = d.get(name, 0) + n

    def nonfinite_of(self, output: int) -> dict[str, int]:
        """Non-finite counts of one output: the ones common to every output plus its own."""
        d = dict(self.nonfinite)
        for k, v in self.nonfinite_by_output.get(output, {}).items():
            d[k] = d.get(k, 0) + v
        return d


@dataclass(frozen=True)
class Progress:
    """A progress event passed to the ``progress`` callback. Bytes count input read + output written."""

    bytes_done: int
    bytes_total: int
    tensors_done: int
    tensors_total: int
    tensor: str = ""
    phase: str = "merge"


class ProgressCounter:
    """Counts bytes and finished tensors from any thread into ``stats`` and calls the progress callback."""

    def __init__(
        self, stats: EngineStats, progress: Callable[[Progress], None] | None, total_bytes: int, total_tensors: int
    ):
        self.stats = stats
        self.progress = progress
        self.total_bytes = total_bytes
        self.total_tensors = total_tensors
        self._lock = threading.Lock()
        self._bytes = 0
        self._tensors = 0

    def __call__(self, nbytes: int, tensor_done: OutTensor | None, out_written: int) -> None:
        """Record ``nbytes`` moved (of which ``out_written`` written); ``tensor_done`` when a tensor completed."""
        with self._lock:
            self._bytes += nbytes
            self.stats.bytes_written += out_written
            self.stats.bytes_read += nbytes - out_written
            if tensor_done is not None:
                self._tensors += 1
            b, n = self._bytes, self._tensors
        if self.progress is not None:
            name = tensor_done.name if tensor_done is not None else ""
            self.progress(Progress(b, self.total_bytes, n, self.total_tensors, name))
