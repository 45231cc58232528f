"""The real device: torch.cuda streams, events and buffers, the Triton kernels, and ``cudaHostRegister`` (a
:class:`~.backend.Backend`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...errors import EngineError
from .backend import Event, Stream
from .cudart import REGISTER_FLAGS, clear_cuda_error


class CudaBackend:
    """The real device: torch CUDA streams, events and buffers, the Triton kernels, cudaHostRegister.

    Args:
        device (`torch.device | int | str`, *optional*): the GPU (the current one by default).
        register_flags (`int`): flags for ``cudaHostRegister`` (``REGISTER_FLAGS``).
        check_pinned (`bool`): assert that every H2D source is pinned or registered (a test aid: ~µs per copy).
    """

    name = "cuda"

    def __init__(self, device=None, register_flags: int = REGISTER_FLAGS, check_pinned: bool = False):
        if not torch.cuda.is_available():
            raise EngineError("the CUDA engine needs a CUDA GPU; none is available (use --device cpu)")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.register_flags = register_flags
        self.check_pinned = check_pinned
        from ...kernels import triton_fp8, triton_merge  # triton is imported only when a GPU engine is made

        self.kernels = triton_merge
        self.fp8_kernels = triton_fp8
        self.cudart = torch.cuda.cudart()

    def bind_thread(self) -> None:
        torch.cuda.set_device(self.device)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def stream(self) -> Stream:
        return torch.cuda.Stream(device=self.device)

    def event(self, timing: bool = False) -> Event:
        return torch.cuda.Event(enable_timing=timing)

    def h2d(self, stream: Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.check_pinned and not src.is_pinned():
            raise EngineError(f"internal error: H2D from pageable memory at 0x{src.data_ptr():x}")
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def d2h(self, stream: Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream: Stream, event: Event) -> None:
        event.record(stream)

    def wait(self, stream: Stream, event: Event) -> None:
        stream.wait_event(event)

    def sync_event(self, event: Event) -> None:
        event.synchronize()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

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
        """``round(t + alpha * (g - s))`` on ``stream``; ``t`` None: extract (``alpha * (g - s)``); ``s`` None:
        apply a stored vector (``t + alpha * g``)."""
        with torch.cuda.stream(stream):
            if t is None:
                self.kernels.extract_vector_triton(s, g, alpha, out_dtype, out=out)
            elif s is None:
                self.kernels.apply_vector_triton(t, g, alpha, out_dtype, out=out)
            else:
                self.kernels.merge_triton(t, s, g, alpha, out_dtype, out=out)

    def convert(self, stream: Stream, src: torch.Tensor, out_dtype: str, out: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            self.kernels.convert_triton(src, out_dtype, out=out)

    def dequantize_fp8(
        self,
        stream: Stream,
        q: torch.Tensor,
        scale: torch.Tensor,
        block: tuple[int, int],
        fmt: str,
        out: torch.Tensor,
    ) -> None:
        with torch.cuda.stream(stream):
            self.fp8_kernels.dequantize_fp8(q, scale, block, fmt, out=out)

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
        with torch.cuda.stream(stream):
            self.fp8_kernels.requantize_fp8(r, t_q, t_scale, block, out_q=out_q, out_scale=out_scale)

    def count_nonfinite(
        self, stream: Stream, out: torch.Tensor, inputs: Sequence[torch.Tensor], dst: torch.Tensor
    ) -> None:
        # Temporaries come from the caching allocator on this stream and are reused chunk after chunk.
        with torch.cuda.stream(stream):
            bad = torch.isfinite(inputs[0])
            for x in inputs[1:]:
                bad &= torch.isfinite(x)
            bad &= ~torch.isfinite(out)
            dst.copy_(bad.sum())

    def register(self, ptr: int, nbytes: int) -> tuple[int, str]:
        """``cudaHostRegister``; returns (error code, message). A failure leaves the thread's CUDA error set: the
        caller clears it (:meth:`clear_error`)."""
        err = self.cudart.cudaHostRegister(ptr, nbytes, self.register_flags)
        code = int(err)
        return (0, "") if code == 0 else (code, str(self.cudart.cudaGetErrorString(err)))

    def unregister(self, ptr: int) -> tuple[int, str]:
        err = self.cudart.cudaHostUnregister(ptr)
        code = int(err)
        return (0, "") if code == 0 else (code, str(self.cudart.cudaGetErrorString(err)))

    def clear_error(self) -> bool:
        return clear_cuda_error(self.device)

    def is_pinned(self, t: torch.Tensor) -> bool:
        return t.is_pinned()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def elapsed_ms(self, a: Event, b: Event) -> float:
        return a.elapsed_time(b)
