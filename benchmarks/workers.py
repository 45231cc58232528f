"""The two baselines that are not separate programs, run by the harness as ``python -m benchmarks.workers``.

- ``floor``: the I/O floor. Reads every input byte sequentially into one reused buffer, then writes the output's
  byte count to a new file and fsyncs it. No merge tool can move the same bytes through the same page cache and
  disk faster without overlapping the two (which streammerge does, so it may beat this floor a little).
- ``naive``: what most people write: ``load_file`` all three checkpoints, ``t + alpha * (g - s)`` in float32 with
  torch, cast back, ``save_file``. Exact (the same op order and one rounding as the contract), memory ~4x a
  checkpoint.

Each prints one JSON object with its own timings on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# One reused 8 MiB buffer: large enough that syscalls are noise (cat uses 128 KiB, dd bs=8M is the usual choice).
IO_BLOCK_BYTES = 8 << 20
# A non-zero fill byte for the floor's output, so nothing on the way can treat the data as zeros.
FILL_BYTE = 0x5A


def floor(inputs: list[str], out_file: str, out_bytes: int, method: str = "write") -> dict:
    """Read ``inputs`` whole, then write and fsync ``out_bytes`` bytes to ``out_file`` (removed afterwards).

    ``method``: "write" (sequential ``write`` calls into a new file, as dd does) or "pwrite" (the streaming writer's
    own way: the file is first ``posix_fallocate``d to its final size, then filled with ``pwrite`` at offsets)."""
    buf = bytearray(IO_BLOCK_BYTES)
    view = memoryview(buf)
    t0 = time.perf_counter()
    read = 0
    for path in inputs:
        fd = os.open(path, os.O_RDONLY)
        try:
            while n := os.readv(fd, [view]):
                read += n
        finally:
            os.close(fd)
    t1 = time.perf_counter()
    block = bytes([FILL_BYTE]) * IO_BLOCK_BYTES
    fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if method == "pwrite":
            os.posix_fallocate(fd, 0, out_bytes)
            at = 0
            while at < out_bytes:
                at += os.pwrite(fd, block[: min(out_bytes - at, IO_BLOCK_BYTES)], at)
        else:
            left = out_bytes
            while left:
                left -= os.write(fd, block[: min(left, IO_BLOCK_BYTES)])
        t2 = time.perf_counter()
        os.fsync(fd)
    finally:
        os.close(fd)
    t3 = time.perf_counter()
    os.unlink(out_file)
    return {
        "method": method,
        "bytes_read": read,
        "bytes_written": out_bytes,
        "read_s": t1 - t0,
        "write_s": t2 - t1,
        "fsync_s": t3 - t2,
        "seconds": t3 - t0,
    }


def _weight_files(directory: str) -> list[Path]:
    return sorted(p for p in Path(directory).glob("*.safetensors") if not p.name.startswith("."))


def naive(target: str, sft: str, grpo: str, out_dir: str, alpha: float) -> dict:
    """``load_file`` x3, float32 torch math in the contract's op order, ``save_file`` of one file."""
    import torch
    from safetensors.torch import load_file, save_file

    def load(directory: str) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for f in _weight_files(directory):
            tensors.update(load_file(f))
        return tensors

    t0 = time.perf_counter()
    tt, ss, gg = load(target), load(sft), load(grpo)
    t1 = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    for name, t in tt.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        d = gg[name].float() - ss[name].float()
        d.mul_(alpha)
        r = t.float()
        r.add_(d)
        out[name] = r.to(t.dtype)
        del d, r
    t2 = time.perf_counter()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(out, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "compute_s": t2 - t1, "save_s": t3 - t2, "seconds": t3 - t0, "tensors": len(out)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="worker", required=True)
    p_floor = sub.add_parser("floor", help="read all inputs, write + fsync the output's byte count")
    p_floor.add_argument("--out-file", required=True)
    p_floor.add_argument("--out-bytes", type=int, required=True)
    p_floor.add_argument("--method", choices=("write", "pwrite"), default="write")
    p_floor.add_argument("inputs", nargs="+")
    p_naive = sub.add_parser("naive", help="load_file x3 + torch + save_file")
    p_naive.add_argument("target")
    p_naive.add_argument("sft")
    p_naive.add_argument("grpo")
    p_naive.add_argument("out_dir")
    p_naive.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.worker == "floor":
        result = floor(args.inputs, args.out_file, args.out_bytes, args.method)
    else:
        result = naive(args.target, args.sft, args.grpo, args.out_dir, args.alpha)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
