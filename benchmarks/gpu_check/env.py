"""Step ``env``: the card, driver and clocks (``nvidia-smi`` queries only), versions, cores, memory, disk, and whether
the device supports ``cudaHostRegister`` and its ReadOnly flag."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .. import machine

# cudaDeviceAttr values (CUDA runtime, driver_types.h): whether cudaHostRegister, and its ReadOnly flag that the
# engine's registered input windows use, are supported on this device (0 on some platforms: staging then).
ATTR_HOST_REGISTER = 99
ATTR_HOST_REGISTER_READ_ONLY = 113


def run(state: dict) -> dict:
    out: dict = {"machine": machine.machine_info(Path(state["workdir"])), "gpu": machine.gpu_info()}
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out["device_properties"] = {
                "name": p.name,
                "total_memory": p.total_memory,
                "multi_processor_count": p.multi_processor_count,
                "capability": f"{p.major}.{p.minor}",
            }
            out["host_register"] = host_register_attributes()
    except Exception as e:  # noqa: BLE001 - recorded
        out["torch_error"] = repr(e)
    try:
        q = "name,memory.total,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu"
        proc = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True, timeout=20
        )
        out["nvidia_smi"] = proc.stdout.strip() or proc.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = f"unavailable: {e}"
    return out


def host_register_attributes() -> dict:
    """Whether this GPU supports ``cudaHostRegister`` and its ReadOnly flag (device attributes, through ctypes)."""
    import ctypes

    import torch

    from streammerge.engines.cuda import runtime_library

    torch.zeros(1, device="cuda")  # the runtime and its library are loaded
    lib = runtime_library()
    if lib is None:
        return {"error": "libcudart not found in /proc/self/maps"}
    out = {}
    for name, attr in (("supported", ATTR_HOST_REGISTER), ("read_only_supported", ATTR_HOST_REGISTER_READ_ONLY)):
        value = ctypes.c_int(-1)
        err = lib.cudaDeviceGetAttribute(ctypes.byref(value), ctypes.c_int(attr), ctypes.c_int(0))
        out[name] = value.value if err == 0 else f"error {err}"
    return out
