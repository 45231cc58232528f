"""The output stage (engines/output.py): several output files in flight, each hashed in offset order, finished in file
order, byte-identical to a one-file-at-a-time run; the work window; the slot formula the plan reports."""

from __future__ import annotations

import hashlib
import threading

import pytest
from helpers import make_related, write_checkpoint

import streammerge
from streammerge import writer as wr
from streammerge.budget import host_buffer_bytes, output_slots
from streammerge.engines import output as eo

MAX_SHARD = "3MB"  # ~1 MB tensors in fp32 -> several shards


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("perf-trio")
    shapes = {f"model.layers.{i}.w": (256, 1024 + 8 * i) for i in range(10)}
    shapes["model.norm.weight"] = (1024,)
    t, s, g = make_related(shapes, dtype="F32", seed=3)
    return tuple(write_checkpoint(root / n, sd, shards=k) for n, sd, k in zip("tsg", (t, s, g), (1, 3, 2)))


class _Recorder:
    """Wraps OutputWriter.digest / finish_file: every digest of a file must start where the previous one ended."""

    def __init__(self, monkeypatch):
        self.lock = threading.Lock()
        self.cursor: dict[int, int] = {}
        self.finished: list[int] = []
        self.out_of_order: list[tuple[int, int, int]] = []
        self.live: set[int] = set()  # files with a digest running right now
        self.overlaps = 0  # a file's digest started while another of the same file ran
        self.concurrent_files = 0  # the most files with a digest running at once
        digest, finish = wr.OutputWriter.digest, wr.OutputWriter.finish_file
        rec = self

        def rec_digest(w, file, offset, data, out=None):
            n = memoryview(data).nbytes
            with rec.lock:
                expect = rec.cursor.get(file, len(w.plan.files[file].header))
                if offset != expect:
                    rec.out_of_order.append((file, offset, expect))
                rec.cursor[file] = offset + n
                if file in rec.live:
                    rec.overlaps += 1
                rec.live.add(file)
                rec.concurrent_files = max(rec.concurrent_files, len(rec.live))
            try:
                digest(w, file, offset, data, out)
            finally:
                with rec.lock:
                    rec.live.discard(file)

        def rec_finish(w, file):
            with rec.lock:
                rec.finished.append(file)
            finish(w, file)

        monkeypatch.setattr(wr.OutputWriter, "digest", rec_digest)
        monkeypatch.setattr(wr.OutputWriter, "finish_file", rec_finish)


def _files(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def test_window_of_files_gives_the_same_bytes_and_exact_checksums(trio, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    r0 = streammerge.merge(*trio, ref, device="cpu", threads=1, max_shard_size=MAX_SHARD, chunk_bytes=65536)
    want = _files(ref)
    assert len(want) >= 4, "the trio should make several output shards"
    assert r0.shard_sha256 == want
    # every open file's hash stream counts as the bottleneck at once: the window opens every file it may
    monkeypatch.setattr(eo, "HASH_BACKLOG_CHUNKS", 0)
    monkeypatch.setattr(eo, "HASH_BUSY_FRACTION", 0.0)
    monkeypatch.setattr(eo, "HASH_BUSY_MIN_S", 0.0)
    rec = _Recorder(monkeypatch)
    out = tmp_path / "out"
    r = streammerge.merge(*trio, out, device="cpu", threads=4, max_shard_size=MAX_SHARD, chunk_bytes=65536)
    assert _files(out) == want
    assert r.shard_sha256 == want  # the manifest's checksums, computed as the data passed
    assert not rec.out_of_order, rec.out_of_order[:3]
    assert rec.overlaps == 0, "two digests of one file ran at once"
    assert rec.finished == sorted(rec.finished) and len(rec.finished) == len(want)
    note = next(n for n in r.warnings if n.startswith("cpu engine:"))
    opened = int(note.split("up to ")[1].split(" ")[0])
    assert opened > 1, note  # several files were in flight


def test_file_window_orders_each_file_and_opens_files_when_bound(trio):
    plan = streammerge.plan(*trio, max_shard_size=MAX_SHARD, chunk_bytes=65536)
    taken: dict[int, int] = {}  # chunks handed out per file and never hashed: the backlog keeps growing
    seq = []
    for it in eo.FileWindow(plan, frozenset(), 3, backlog=lambda f: taken.get(f, 0), bound=lambda f: True):
        taken[it.tensor.file] = taken.get(it.tensor.file, 0) + 1
        seq.append(it)
    plain = list(eo.FileWindow(plan, frozenset(), 3, backlog=lambda f: 0, bound=lambda f: False))
    key = [(it.tensor.file, it.tensor.name, it.start) for it in plain]
    assert key == sorted(key, key=lambda k: (k[0],)) and [k[0] for k in key] == sorted(k[0] for k in key)
    assert sorted((it.tensor.file, it.tensor.name, it.start) for it in seq) == sorted(key)
    for f in {k[0] for k in key}:  # within a file: the same (offset) order either way
        assert [(it.tensor.name, it.start) for it in seq if it.tensor.file == f] == [
            (n, s) for ff, n, s in key if ff == f
        ]
    # bound from the start: three files open at once, the next chunk from the one with the fewest waiting
    assert [it.tensor.file for it in seq[:3]] == [0, 1, 2]
    inter = list(eo.interleave(plan, frozenset(), 2))
    assert sorted((it.tensor.file, it.tensor.name, it.start) for it in inter) == sorted(key)


def test_slots_and_reported_memory_follow_the_compute_threads():
    assert output_slots(1, 1) == 3 and output_slots(3, 1) == 7  # as before issue 15 for one thread
    assert output_slots(1, 4) == 6 and output_slots(2, 4) == 11
    chunk = 16 << 20
    assert host_buffer_bytes(chunk, 4) - host_buffer_bytes(chunk, 1) >= 3 * chunk
    assert eo.hash_files_for(1e15, 4, 9) == 4 and eo.hash_files_for(1e15, 4, 2) == 2
    assert eo.hash_files_for(1.0, 4, 9) == 1
