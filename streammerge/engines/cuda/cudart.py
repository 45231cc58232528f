"""The CUDA runtime calls torch does not bind, through ctypes: the runtime library torch loaded, clearing a thread's
CUDA error, and the ``cudaHostRegister`` flags the engine registers input windows with."""

from __future__ import annotations

import ctypes
import functools

import torch

# cudaHostRegister flags (CUDA runtime, driver_types.h): Portable = 0x01 (pinned for every context), ReadOnly = 0x08
# (the device only reads it: required to register a PROT_READ file mapping; needs cudaDevAttrHostRegisterReadOnly-
# Supported). Mapped (0x02) is not needed: chunks are copied with cudaMemcpyAsync, never read by kernels in place.
CUDA_HOST_REGISTER_PORTABLE = 0x01
CUDA_HOST_REGISTER_READ_ONLY = 0x08
REGISTER_FLAGS = CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_READ_ONLY


@functools.cache
def runtime_library() -> ctypes.CDLL | None:
    """The CUDA runtime library torch loaded (found in ``/proc/self/maps``), through ctypes; None if not found.

    ``torch.cuda.cudart()`` binds ``cudaHostRegister`` but not ``cudaGetLastError``; the same library instance gives
    it. Looked up once per process: call it after torch has initialised CUDA (any CUDA tensor), or it finds nothing.

    Returns:
        `ctypes.CDLL | None`: the library, with ``cudaGetLastError`` and ``cudaPeekAtLastError`` returning ``int``.

    Example:
        ```py
        >>> torch.zeros(1, device="cuda")  # the runtime is loaded
        >>> lib = runtime_library()
        >>> lib.cudaGetLastError()
        0
        ```
    """
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            lib.cudaGetLastError.restype = ctypes.c_int
            lib.cudaPeekAtLastError.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


def clear_cuda_error(device: torch.device | None = None) -> bool:
    """Clear this thread's CUDA runtime error left by a failed call (such as a refused ``cudaHostRegister``).

    A failed runtime call leaves its error as the thread's "last error"; torch checks ``cudaGetLastError()`` after
    every kernel launch, so the next launch on this thread would raise it. Cleared through the runtime's own
    ``cudaGetLastError`` (the library torch loaded, through ctypes) when it is found, then checked with a tiny
    launch whose check consumes whatever is left (torch clears the error it raises).

    Args:
        device (`torch.device`, *optional*): the GPU to check on; the current one by default.

    Returns:
        `bool`: True when a launch on this thread works afterwards.
    """
    lib = runtime_library()
    if lib is not None:
        lib.cudaGetLastError()
    dev = device or torch.device("cuda", torch.cuda.current_device())
    for attempt in range(2):
        try:
            torch.zeros(1, device=dev)  # a fill kernel: torch checks (and so clears) the last error after it
            return True
        except RuntimeError:
            if attempt:
                return False  # a sticky error: the context is broken
    return False
