"""Memory is bounded by the chunk size, never by tensor or model size (docs/memory.md).

Each measurement runs in a fresh subprocess: inputs are sparse safetensors files (real headers, data holes), so a
multi-hundred-MB tensor costs no disk; a sampler thread reads RssAnon and VmRSS from /proc every few milliseconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streammerge.budget import host_buffer_bytes
from streammerge.format import build_header

MB = 1_000_000
CHUNK = 4 * 2**20
ALLOWANCE = 48 * MB  # allocator slack, thread stacks, the bool/temporary tensors of torch ops

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")


def _sparse_checkpoint(d: Path, tensors: list[tuple[str, tuple[int, ...]]]) -> Path:
    d.mkdir(parents=True)
    header, spans = build_header([(n, "BF16", s) for n, s in tensors], {"format": "pt"})
    f = d / "model.safetensors"
    with open(f, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + max(e for _, e in spans.values()))
    return d


SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import streammerge
    import streammerge.kernels.reference
    from streammerge.memory import rss_anon

    def vmrss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    t, s, g, out, chunk = sys.argv[1:6]
    alphas = sys.argv[6] if len(sys.argv) > 6 else ""
    peak = {"anon": 0, "rss": 0}
    stop = False
    def sample():
        while not stop:
            peak["anon"] = max(peak["anon"], rss_anon()); peak["rss"] = max(peak["rss"], vmrss())
            time.sleep(0.003)
    # warm up torch's allocator and thread pool, then take the baseline
    streammerge.kernels.reference.fast_cast_is_exact("BF16")
    base_anon, base_rss = rss_anon(), vmrss()
    th = threading.Thread(target=sample, daemon=True); th.start()
    if alphas:
        r = streammerge.sweep(t, s, g, out, alphas, device="cpu", chunk_bytes=int(chunk), max_shard_size="1GB")[0]
    else:
        r = streammerge.merge(t, s, g, out, device="cpu", chunk_bytes=int(chunk), max_shard_size="1GB")
    stop = True; th.join()
    print(json.dumps({"anon": peak["anon"] - base_anon, "rss": peak["rss"] - base_rss,
                      "report_anon": r.peak_rss_anon - base_anon, "read": r.bytes_read}))
    """
)


def _measure(tmp_path: Path, name: str, tensors, alphas: str = "") -> dict:
    root = tmp_path / name
    dirs = [_sparse_checkpoint(root / k, tensors) for k in ("t", "s", "g")]
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, *map(str, dirs), str(root / "out"), str(CHUNK), *([alphas] if alphas else [])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_anon_memory_bounded_by_chunk_not_tensor_or_model(tmp_path):
    bound = host_buffer_bytes(CHUNK) + ALLOWANCE
    # one 128 MB tensor (32x the chunk) ...
    big = _measure(tmp_path, "big", [("embed", (8192, 8192))])
    # ... and a model twice the size made of many tensors
    many = _measure(tmp_path, "many", [(f"w{i}", (4096, 4096)) for i in range(8)] + [("embed", (8192, 8192))])
    assert big["read"] == 3 * 8192 * 8192 * 2
    for m in (big, many):
        assert m["anon"] < bound, f"anonymous memory grew by {m['anon'] / MB:.0f} MB, bound {bound / MB:.0f} MB"
        # mapped input pages are released behind the work: total RSS stays far below the ~0.4-0.8 GB of inputs
        assert m["rss"] < bound + 64 * MB, f"total RSS grew by {m['rss'] / MB:.0f} MB"
    print(
        f"anon growth big/many {big['anon'] / MB:.0f}/{many['anon'] / MB:.0f} MB, "
        f"rss growth {big['rss'] / MB:.0f}/{many['rss'] / MB:.0f} MB, bound {bound / MB:.0f} MB"
    )
    # no growth with model size beyond noise
    assert abs(many["anon"] - big["anon"]) < 24 * MB, (big, many)


def test_sweep_memory_is_bounded_by_chunk_times_outputs(tmp_path):
    """A 3-alpha sweep holds one chunk per output per slot: more than a merge, still independent of the model."""
    bound = host_buffer_bytes(CHUNK, outputs=3) + ALLOWANCE
    big = _measure(tmp_path, "sweep", [("embed", (8192, 8192))], alphas="0.5,1,1.5")
    assert big["read"] == 3 * 8192 * 8192 * 2  # each input read once for three outputs
    assert big["anon"] < bound, f"anonymous memory grew by {big['anon'] / MB:.0f} MB, bound {bound / MB:.0f} MB"
    assert big["rss"] < bound + 64 * MB, f"total RSS grew by {big['rss'] / MB:.0f} MB"
    print(f"sweep anon growth {big['anon'] / MB:.0f} MB, rss {big['rss'] / MB:.0f} MB, bound {bound / MB:.0f} MB")
