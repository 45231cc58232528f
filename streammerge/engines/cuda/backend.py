"""The device interface the CUDA engine drives: buffers, streams, events, copies, kernels and host registration.

:class:`~.device.CudaBackend` (the GPU through torch.cuda) and :class:`~.sim.SimBackend` (a CPU test double that
checks the engine's ordering) both satisfy :class:`Backend`; the engine uses nothing else of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

# Opaque handles made by ``Backend.stream()`` / ``Backend.event()`` and only ever passed back to the same backend.
Stream = Any
Event = Any


class Backend(Protocol):
    """What the CUDA engine needs of a device. Work queued on a stream runs in queue order; streams are ordered
    against each other only through events (``record`` on one, ``wait`` on another).

    Attributes:
        name (`str`): the device kind reported in ``EngineStats.device`` ("cuda", "sim").
    """

    name: str

    def bind_thread(self) -> None:
        """Make this backend's device current on the calling thread (every engine thread calls it once)."""

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of uint8 device memory."""

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of uint8 pinned host memory (a valid source of ``h2d`` and destination of ``d2h``)."""

    def stream(self) -> Stream:
        """A new stream."""

    def event(self, timing: bool = False) -> Event:
        """A new event; ``timing``: usable with :meth:`elapsed_ms`."""

    def h2d(self, stream: Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue a copy from pinned or registered host memory ``src`` to device memory ``dst`` on ``stream``."""

    def d2h(self, stream: Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue a copy from device memory ``src`` to pinned host memory ``dst`` on ``stream``."""

    def record(self, stream: Stream, event: Event) -> None:
        """Queue a record of ``event`` on ``stream``: it completes when everything queued before it has."""

    def wait(self, stream: Stream, event: Event) -> None:
        """Make work queued on ``stream`` from now on wait for the last record of ``event``."""

    def sync_event(self, event: Event) -> None:
        """Block the calling thread until the last record of ``event`` completed."""

    def synchronize(self) -> None:
        """Block until all queued work on every stream completed."""

    def merge(
        self,
        stream: Stream,
        t: torch.Tensor | None,
        s: torch.Tensor | None,
        g: torch.Tensor,
        alpha: float,
        out_dtype: str,
        out: torch.Tensor,
    ) -> None:
        """Queue ``out = round(t + alpha * (g - s))``; ``t`` None: extract (``alpha * (g - s)``); ``s`` None: apply
        a stored vector (``t + alpha * g``)."""

    def convert(self, stream: Stream, src: torch.Tensor, out_dtype: str, out: torch.Tensor) -> None:
        """Queue ``out = round(src)`` into ``out_dtype`` (the contract's final rounding)."""

    def dequantize_fp8(
        self,
        stream: Stream,
        q: torch.Tensor,
        scale: torch.Tensor,
        block: tuple[int, int],
        fmt: str,
        out: torch.Tensor,
    ) -> None:
        """Queue ``out = decode(q) * scale`` (``kernels.dequantize_fp8``): uint8 codes ``[rows, C]`` of ``fmt``,
        their block scales, float32 ``out`` of the codes' shape."""

    def requantize_fp8(
        self,
        stream: Stream,
        r: torch.Tensor,
        t_q: torch.Tensor,
        t_scale: torch.Tensor,
        block: tuple[int, int],
        out_q: torch.Tensor,
        out_scale: torch.Tensor,
    ) -> None:
        """Queue the e4m3fn requantization of float32 ``r`` on the target's grid (``kernels.requantize_fp8``):
        codes into ``out_q``, block scales into ``out_scale``; blocks ``r`` leaves unchanged keep ``t_q`` and
        ``t_scale``."""

    def count_nonfinite(
        self, stream: Stream, out: torch.Tensor, inputs: Sequence[torch.Tensor], dst: torch.Tensor
    ) -> None:
        """Queue ``dst[0] =`` the number of elements of ``out`` that are not finite although every input is."""

    def register(self, ptr: int, nbytes: int) -> tuple[int, str]:
        """``cudaHostRegister`` of page-aligned host memory: (0, "") or (error code, message). A failure leaves the
        calling thread's CUDA error set until :meth:`clear_error`."""

    def unregister(self, ptr: int) -> tuple[int, str]:
        """``cudaHostUnregister``: (0, "") or (error code, message), as :meth:`register`."""

    def clear_error(self) -> bool:
        """Clear the calling thread's CUDA error; True when a kernel launch from this thread works afterwards."""

    def reset_peak(self) -> None:
        """Start counting peak device memory from now."""

    def peak_memory(self) -> int:
        """Peak device memory allocated since :meth:`reset_peak`, in bytes."""

    def elapsed_ms(self, a: Event, b: Event) -> float:
        """Milliseconds between two completed timing events."""
