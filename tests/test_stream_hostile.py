"""``--stream`` against a hostile or unlucky Hub: the local Hub server (benchmarks/hub_server.py) serves bytes that
differ from what it listed, headers that change after they were read, repositories without weights, indexes that
name missing files, absurd header lengths, 404s and stalls mid-merge; the merge runs with one download worker and
many, tight disk bounds, sweeps, a repository in several roles, extract/apply, merges in parts, and the CUDA engine's
simulated device.

Every case asserts what must be true: output bytes equal to the same merge without ``--stream``, fetch counts (full
GETs in the server's request log) equal to what ``plan --stream`` announced, the sampled disk within the bound, one
clear error line and nothing left behind. The last cases reproduce bugs found in review: each failed before its fix.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import socketserver
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from helpers import make_related, streammerge_cmd, write_checkpoint
from hub_fixtures import HubServer, hub_env, sampled_disk

import streammerge
from streammerge.errors import CheckpointError, DownloadError, EngineError, StreamMergeError

if not torch.cuda.is_available():  # as tests/test_cuda_engine.py: the simulated device's Triton kernels interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

LAYERS = 8
SHAPE = (64, 128)  # 16 KiB of bf16 per tensor: the whole trio is ~400 KB, every merge here takes about a second
G2 = "model-00002-of-00003.safetensors"
G3 = "model-00003-of-00003.safetensors"


def _names() -> list[str]:
    return [f"model.layers.{i}.mlp.weight" for i in range(LAYERS)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> list[Path]:
    """target in 4 shards, sft in 2 holding every other tensor (needed in turns: a tight bound refetches), grpo in
    3 (as tests/test_stream.py, smaller)."""
    root = tmp_path_factory.mktemp("hostile-trio")
    t, s, g = make_related({n: SHAPE for n in _names()})
    names = _names()
    return [
        write_checkpoint(root / "t", t, shards=4),
        write_checkpoint(root / "s", {n: s[n] for n in names[0::2] + names[1::2]}, shards=2),
        write_checkpoint(root / "g", g, shards=3),
    ]


@pytest.fixture(scope="module")
def server(dirs):
    """One server for the module (org/t, org/s, org/g; tests add repositories of their own names).

    With TCP_NODELAY on its connections (``StreamRequestHandler.disable_nagle_algorithm``, for this module only):
    the server writes a response's headers and body apart, and without it every small answer on a kept-alive
    connection waits ~40 ms for the client's delayed ACK (measured: 44 ms -> 1 ms per request; a streamed merge
    makes ~90 requests). Nothing asserted here depends on it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socketserver.StreamRequestHandler, "disable_nagle_algorithm", True)
        with HubServer({"org/t": {"main": dirs[0]}, "org/s": {"main": dirs[1]}, "org/g": {"main": dirs[2]}}) as s:
            yield s


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    """The server with no rules, an empty log and no throttle; this process's huggingface_hub pointed at it with an
    empty cache (a cached blob would be copied instead of downloaded, and the fetch counts would say nothing)."""
    monkeypatch.setenv("STREAMMERGE_DOWNLOAD_BACKOFF_S", "0.01")
    server.clear_failures()
    server.clear_log()
    server.rate_bytes_per_s = None
    with hub_env(server, tmp_path / "hf"):
        yield server
    server.clear_failures()


@pytest.fixture(scope="module")
def refs(server, tmp_path_factory) -> dict:
    """Output weights of the same jobs from downloaded snapshots (no ``--stream``): what every streamed job must
    equal byte for byte (the headers name the inputs by repo and commit, as a streamed job's do). ``vector_dir``:
    the extracted vector, which the tests serve as org/v."""
    root = tmp_path_factory.mktemp("hostile-refs")
    out: dict = {}
    with hub_env(server, root / "hf"):
        streammerge.merge("org/t", "org/s", "org/g", root / "merge", device="cpu")
        out["merge"] = _weights(root / "merge")
        streammerge.merge("org/t", "org/s", "org/g", root / "small", device="cpu", max_shard_size="40KB")
        out["small"] = _weights(root / "small")
        streammerge.sweep("org/t", "org/s", "org/g", root / "sweep", alphas="0.5,1", device="cpu")
        for k in ("alpha-0.5", "alpha-1"):
            out[f"sweep/{k}"] = _weights(root / "sweep" / k)
        streammerge.merge("org/g", "org/s", "org/g", root / "g-twice", device="cpu")
        out["g-twice"] = _weights(root / "g-twice")
        streammerge.extract("org/s", "org/g", root / "vector", device="cpu")
        out["vector"] = _weights(root / "vector")
        server.add_repo("org/v", root / "vector")
        streammerge.apply("org/t", "org/v", root / "applied", device="cpu")
        out["applied"] = _weights(root / "applied")
    out["vector_dir"] = root / "vector"
    return out


def _weights(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.safetensors"))}


def _fetches(server: HubServer) -> dict[str, int]:
    """Full downloads (GETs without a Range: not the header reads) per repo:file."""
    counts: dict[str, int] = {}
    for q in server.gets():
        if q.range is None and q.filename.endswith(".safetensors"):
            key = f"{q.repo_id}:{q.filename}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.glob(".*streammerge-inputs*"))


def _cli(server: HubServer, home: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, **server.env(home), "STREAMMERGE_DOWNLOAD_BACKOFF_S": "0.01"}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(streammerge_cmd(*args), capture_output=True, text=True, env=env, timeout=120)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def _copy_repo(server: HubServer, src: Path, dst: Path, repo_id: str) -> Path:
    shutil.copytree(src, dst)
    server.add_repo(repo_id, dst)
    return dst


def _bounded(fn, timeout_s: float = 30.0):
    """``fn()`` on a thread; a merge still running after ``timeout_s`` is a hang (not a speed check: these merges
    take about a second): every stream gate is failed to set the stuck threads free, then the test fails."""
    from streammerge.remote import ShardGate

    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        for g in [o for o in gc.get_objects() if type(o) is ShardGate]:
            g.fail(DownloadError("test: the merge hung; gates failed to free it"))
        t.join(30)
        pytest.fail(f"the merge was still running after {timeout_s} s (deadlock)")
    if "error" in box:
        raise box["error"]
    return box["value"]


# ------------------------------------------------------------------------------------------------ hostile server
def test_bytes_that_differ_from_the_listed_sha256_are_refused_leaving_nothing(hub, dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMMERGE_DOWNLOAD_RETRIES", "1")
    bad = _copy_repo(hub, dirs[2], tmp_path / "gbad", "org/gbad")  # listed (hashed) now, then changed
    raw = bytearray((bad / G2).read_bytes())
    raw[-1] ^= 1  # a data byte: the header read before the merge is still right
    (bad / G2).write_bytes(raw)
    with pytest.raises(DownloadError) as e:
        streammerge.merge("org/t", "org/s", "org/gbad", tmp_path / "o", device="cpu", stream=True)
    assert f"org/gbad@{hub.commit('org/gbad')}/{G2}" in str(e.value) and "SHA-256" in str(e.value)
    assert _fetches(hub)[f"org/gbad:{G2}"] == 2  # the first download and its one retry; never merged from
    assert _leftovers(tmp_path) == [] and not (tmp_path / "o" / "model.safetensors").exists()


def test_a_header_changed_after_it_was_read_is_refused(hub, dirs, tmp_path):
    g2 = _copy_repo(hub, dirs[2], tmp_path / "g2", "org/g2")
    hub.fail("org/g2", G2, after_bytes=10**9)  # the header's range read goes through untouched
    held = hub.hold("org/g2", G2, after_bytes=0)  # the download waits until the file has changed

    def change() -> None:
        while hub.in_flight == 0 or not hub.gets(G2, "org/g2"):  # header read done, download in flight
            threading.Event().wait(0.01)
        with open(g2 / G2, "r+b") as fh:  # same size, same inode: what the server sends from now on
            raw = fh.read()
            fh.seek(raw.index(b'"pt"'))
            fh.write(b'"px"')
        held.set()

    changer = threading.Thread(target=change)
    changer.start()
    try:
        with pytest.raises(DownloadError, match="the downloaded header differs from the one read before"):
            streammerge.merge("org/t", "org/s", "org/g2", tmp_path / "o", device="cpu", stream=True)
    finally:
        held.set()
        changer.join()
    assert _leftovers(tmp_path) == []


def _repo_without_weights(server, dirs, tmp_path) -> str:
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    server.add_repo("org/noweights", d)
    return "org/noweights"


def _index_naming_a_missing_shard(server, dirs, tmp_path) -> str:
    d = _copy_repo(server, dirs[2], tmp_path / "mi-src", "org/unused")
    (d / G3).unlink()
    server.add_repo("org/mi", d)
    return "org/mi"


def _header_length(n_of_size):
    def make(server, dirs, tmp_path) -> str:
        d = tmp_path / "hl"
        shutil.copytree(dirs[2], d)
        f = d / G2
        raw = bytearray(f.read_bytes())
        raw[:8] = n_of_size(len(raw)).to_bytes(8, "little")
        f.write_bytes(raw)
        server.add_repo("org/hl", d)
        return "org/hl"

    return make


def _truncated_shard(server, dirs, tmp_path) -> str:
    d = tmp_path / "tr"
    shutil.copytree(dirs[2], d)
    (d / G2).write_bytes((3).to_bytes(8, "little")[:5])
    server.add_repo("org/tr", d)
    return "org/tr"


@pytest.mark.parametrize(
    "make, expected",
    [
        (_repo_without_weights, "has no model.safetensors or model.safetensors.index.json on the Hub"),
        (_index_naming_a_missing_shard, f"model.safetensors.index.json: names {G3}, which the repository does not"),
        (_header_length(lambda size: 2**40), "header length 1099511627776 exceeds"),
        (_header_length(lambda size: size - 8), f"{G2}: invalid safetensors header"),
        (_truncated_shard, "shorter than the 8-byte length prefix"),
    ],
    ids=["no-weights", "index-names-missing-shard", "huge-header-length", "header-length-is-the-file", "5-bytes"],
)
def test_a_bad_repository_is_one_clear_line_before_anything_is_downloaded(hub, dirs, tmp_path, make, expected):
    repo = make(hub, dirs, tmp_path)
    with pytest.raises(StreamMergeError, match=re.escape(expected)):
        streammerge.plan("org/t", "org/s", repo, stream=True)
    assert not (Path(tempfile.gettempdir()) / f"streammerge-inputs-{os.getpid()}").exists()  # plan's scratch
    out = tmp_path / "o"
    if make in (_repo_without_weights, _truncated_shard):  # the command line: one line, no traceback
        line = _one_line_error(
            _cli(hub, tmp_path / "hf-cli", "merge", "org/t", "org/s", repo, "-o", str(out), "--stream")
        )
        assert "grpo checkpoint: " in line and expected in line, line
    else:
        with pytest.raises(StreamMergeError, match="grpo checkpoint: .*" + re.escape(expected)):
            streammerge.merge("org/t", "org/s", repo, out, device="cpu", stream=True)
    assert not _fetches(hub)  # refused from headers and listings alone
    assert _leftovers(tmp_path) == []


def test_a_404_mid_merge_fails_resumably_then_resume_finishes_the_same_bytes(hub, refs, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMMERGE_DOWNLOAD_RETRIES", "1")
    out = tmp_path / "o"
    kw = dict(device="cpu", stream=True, max_shard_size="40KB", download_workers=1)
    hub.fail("org/g", G3, after_bytes=10**9)  # header read
    hub.fail("org/g", G3, status=404, times=None)  # the shard vanishes mid-merge
    with pytest.raises(DownloadError, match=r"download failed after 2 attempt\(s\).*404.*--resume"):
        streammerge.merge("org/t", "org/s", "org/g", out, stream_disk=150_000, **kw)
    done = sorted(p.name for p in out.glob("*.safetensors"))
    assert done and not (out / "model.safetensors.index.json").exists() and _leftovers(tmp_path) == []
    hub.clear_failures()
    hub.clear_log()
    report = streammerge.merge("org/t", "org/s", "org/g", out, resume=True, **{**kw, "download_workers": 4})
    assert report.resumed_shards == len(done)  # other stream options: still the same merge
    assert _weights(out) == refs["small"]
    assert "org/t:model-00001-of-00004.safetensors" not in _fetches(hub)  # only the first output file read it


def test_a_held_transfer_outliving_a_failed_merge_leaves_nothing_behind(hub, tmp_path):
    t4 = "model-00004-of-00004.safetensors"
    hub.fail("org/t", t4, after_bytes=10**9)  # header read
    held = hub.hold("org/t", t4, after_bytes=100)  # this download stalls past the merge's end...
    hub.fail("org/g", G3, after_bytes=10**9)
    hub.fail("org/g", G3, status=503, times=None)  # ...which another shard's failure brings about
    try:
        with pytest.raises(DownloadError, match=G3):
            streammerge.merge("org/t", "org/s", "org/g", tmp_path / "o", device="cpu", stream=True)
        assert _leftovers(tmp_path) == []
    finally:
        held.set()
    stray = [t for t in threading.enumerate() if t.name.startswith("sm-download")]
    for t in stray:
        t.join(15)  # the stalled transfer completes into a folder that is gone
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ plan vs run
_PLANS: dict = {}


def _planned(*sources, **kw) -> dict:
    """``plan --stream``'s numbers (a pure function of the repositories' contents: computed once per module)."""
    key = (sources, tuple(sorted(kw.items())))
    if key not in _PLANS:
        _PLANS[key] = streammerge.plan(*sources, stream=True, **kw).stream
    return _PLANS[key]


@pytest.mark.parametrize("workers, threads", [(1, 1), (8, 4)])
def test_least_bound_any_workers_and_threads_run_as_planned_within_the_sampled_bound(
    hub, refs, tmp_path, workers, threads
):
    least = _planned("org/t", "org/s", "org/g")["minimum_bound"]
    planned = _planned("org/t", "org/s", "org/g", stream_disk=least, download_workers=workers)
    assert planned["refetched"]
    hub.clear_log()
    hub.rate_bytes_per_s = 2e6  # slow enough to be sampled a few hundred times
    scratch = tmp_path / "scratch"
    with sampled_disk(scratch, every_s=0.002) as peak:
        streammerge.merge(
            "org/t",
            "org/s",
            "org/g",
            tmp_path / "o",
            device="cpu",
            stream=True,
            stream_disk=least,
            stream_dir=scratch,
            download_workers=workers,
            threads=threads,
        )
    assert 0 < peak[0] <= least
    got = _fetches(hub)  # at most as planned: a refetch the merge did not need (it read ahead) is skipped
    assert sum(got.values()) <= planned["fetches"] and len(got) == planned["shards"]
    assert _weights(tmp_path / "o") == refs["merge"] and not scratch.exists()


def test_a_sweep_under_the_least_bound_fetches_as_planned(hub, refs, tmp_path):
    least = _planned("org/t", "org/s", "org/g", alphas="0.5,1")["minimum_bound"]
    planned = _planned("org/t", "org/s", "org/g", alphas="0.5,1", stream_disk=least, download_workers=1)
    hub.clear_log()
    streammerge.sweep(
        "org/t", "org/s", "org/g", tmp_path / "sw", alphas="0.5,1", device="cpu", stream=True, stream_disk=least,
        download_workers=1,
    )  # fmt: skip
    assert planned["shards"] <= sum(_fetches(hub).values()) <= planned["fetches"] and planned["refetched"]
    for k in ("alpha-0.5", "alpha-1"):
        assert _weights(tmp_path / "sw" / k) == refs[f"sweep/{k}"]
    assert _leftovers(tmp_path) == []


def test_one_repository_in_two_roles_is_downloaded_once_per_planned_fetch(hub, refs, tmp_path):
    least = _planned("org/g", "org/s", "org/g")["minimum_bound"]
    for bound, workers in ((None, 4), (least, 1)):
        planned = _planned("org/g", "org/s", "org/g", stream_disk=bound, download_workers=workers)
        hub.clear_log()
        out = tmp_path / f"o-{workers}"
        streammerge.merge(
            "org/g", "org/s", "org/g", out, device="cpu", stream=True, stream_disk=bound, download_workers=workers
        )
        assert planned["shards"] <= sum(_fetches(hub).values()) <= planned["fetches"]  # a refetch may be skipped
        assert _weights(out) == refs["g-twice"]
    assert planned["refetched"]


def test_extract_and_apply_stream(hub, refs, tmp_path):
    streammerge.extract("org/s", "org/g", tmp_path / "v", device="cpu", stream=True, download_workers=1)
    assert _weights(tmp_path / "v") == refs["vector"]
    assert sum(_fetches(hub).values()) == 5  # sft 2 + grpo 3 shards; grpo stands in two roles, fetched once
    hub.add_repo("org/v", refs["vector_dir"])  # the snapshot's vector (its commit is the reference's)
    streammerge.apply("org/t", "org/v", tmp_path / "a", device="cpu", stream=True, download_workers=1)
    assert _weights(tmp_path / "a") == refs["applied"]
    assert _leftovers(tmp_path) == []


def test_a_merge_in_parts_fetches_only_each_parts_inputs(hub, refs, tmp_path):
    out = tmp_path / "o"
    per_part = []
    for part in ("1/2", "2/2"):
        hub.clear_log()
        streammerge.merge("org/t", "org/s", "org/g", out, device="cpu", max_shard_size="40KB", stream=True, part=part)
        per_part.append(sum(_fetches(hub).values()))
    streammerge.finalize(out)
    assert _weights(out) == refs["small"]
    assert all(0 < n < 9 for n in per_part)  # neither part downloads every shard


@pytest.fixture(scope="module")
def poisoned_fp8(tmp_path_factory) -> tuple[list[Path], str]:
    """A block-scaled FP8 trio whose sft holds a NaN block scale in its last shard (where its scales are, after all
    its weights); returns the trio's folders and the scale's name."""
    from streammerge.synth import make_fp8_trio

    trio = make_fp8_trio(tmp_path_factory.mktemp("fp8") / "trio", num_layers=2)
    dirs = [Path(trio.target), Path(trio.sft), Path(trio.grpo)]
    shard = sorted(dirs[1].glob("*.safetensors"))[-1]
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k.endswith("scale_inv") and header[k]["dtype"] == "F32")
    start = 8 + n + header[name]["data_offsets"][0]
    raw[start : start + 4] = struct.pack("<f", float("nan"))
    shard.write_bytes(raw)
    return dirs, name


def _serve_fp8(server: HubServer, dirs: list[Path]) -> list[str]:
    for repo, d in zip(("org/f8t", "org/f8s", "org/f8g"), dirs):
        server.add_repo(repo, d)
    return ["org/f8t", "org/f8s", "org/f8g"]


def test_fp8_nan_scale_in_a_streamed_shard_is_one_clear_line(hub, poisoned_fp8, tmp_path):
    dirs, name = poisoned_fp8
    r = _cli(hub, tmp_path / "hf-cli", "merge", *_serve_fp8(hub, dirs), "-o", str(tmp_path / "o"), "--stream")
    line = _one_line_error(r)
    assert "hold NaN or infinite scales" in line and name in line
    assert _leftovers(tmp_path) == []
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()


# ------------------------------------------------------------------ bugs found in review (each failed before its fix)
def _sim_engine(monkeypatch):
    from streammerge import run
    from streammerge.engines import cuda as ce

    sim = ce.SimBackend(seed=1, kernel="reference")
    engine = ce.CudaEngine(window_bytes=8192, register_ahead_bytes=16384, backend=sim)
    monkeypatch.setattr(run, "select_engine", lambda *a, **k: (engine, "cuda (test)"))
    return sim


def test_cuda_engine_is_refused_with_stream_before_anything_is_written(hub, tmp_path, monkeypatch):
    # the CUDA engine maps every input file before its first chunk (plan_gpu_work); streamed shards arrive one by one
    _sim_engine(monkeypatch)
    with pytest.raises(EngineError, match="--stream merges on the CPU engine"):
        streammerge.merge("org/t", "org/s", "org/g", tmp_path / "o", stream=True, device="cuda")
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []
    assert not [n for n in hub.download_order() if n.endswith(".safetensors")]
    # an engine handed over some other way (here: the simulated CUDA engine for --device auto) is refused too
    with pytest.raises(EngineError, match="--stream merges on the CPU engine"):
        streammerge.merge("org/t", "org/s", "org/g", tmp_path / "o2", stream=True)
    assert _leftovers(tmp_path) == []


def test_auto_device_streams_on_the_cpu(hub, refs, tmp_path):
    r = streammerge.merge("org/t", "org/s", "org/g", tmp_path / "o", stream=True)
    assert r.device == "cpu" and any("auto: --stream merges on the CPU" in w for w in r.warnings)
    assert _weights(tmp_path / "o") == refs["merge"]


def test_a_merge_in_parts_leaves_no_scratch_folder(hub, tmp_path):
    streammerge.merge("org/t", "org/s", "org/g", tmp_path / "o", device="cpu", stream=True, part="1/2")
    assert _leftovers(tmp_path) == []


def test_one_repository_spelled_two_ways_is_downloaded_once(hub, refs, tmp_path):
    planned = _planned("org/g", "org/s", "org/g@main", download_workers=1)
    streammerge.merge("org/g", "org/s", "org/g@main", tmp_path / "o", device="cpu", stream=True, download_workers=1)
    assert _weights(tmp_path / "o") == refs["g-twice"]
    assert planned["shards"] == 5 and sum(_fetches(hub).values()) == 5


def test_a_second_run_sharing_the_stream_dir_leaves_the_first_runs_files_alone(hub, tmp_path):
    from huggingface_hub import hf_hub_download

    from streammerge import recipes

    scratch = tmp_path / "shared-scratch"
    opts = streammerge.MergeOptions.create(stream=True, stream_dir=str(scratch))
    with recipes.trio("org/t", "org/s", "org/g", opts) as first:
        gate = first.inputs["target"].gate
        # the first run's stream has downloaded its first shard (as Streamer._download does)
        hf_hub_download(gate.repo_id, gate.files[0].name, revision=gate.commit, local_dir=gate.folder)
        assert gate.path(0).is_file()
        # a second merge starts with the same --stream-dir: refused, the first's files left alone
        with pytest.raises(CheckpointError, match="another streammerge merge is streaming into this folder"):
            recipes.trio("org/t", "org/s", "org/g", opts)
        assert gate.path(0).is_file(), "the second run deleted a shard the first one is merging from"
    assert not scratch.exists()


def test_a_sha256_mismatch_is_reported_once_without_connection_advice(hub, dirs, tmp_path):
    bad = _copy_repo(hub, dirs[2], tmp_path / "gbad", "org/gbad")
    raw = bytearray((bad / G2).read_bytes())
    raw[-1] ^= 1
    (bad / G2).write_bytes(raw)
    with pytest.raises(DownloadError) as e:
        streammerge.merge("org/t", "org/s", "org/gbad", tmp_path / "o", device="cpu", stream=True)
    msg = str(e.value)
    assert "SHA-256" in msg and "fix the connection" not in msg and msg.count(f"/{G2}") == 1


def test_fp8_nan_scale_in_a_streamed_shard_names_the_hub_file(hub, poisoned_fp8, tmp_path):
    dirs, _ = poisoned_fp8
    with pytest.raises(CheckpointError) as e:
        streammerge.merge(*_serve_fp8(hub, dirs), tmp_path / "o", device="cpu", stream=True)
    assert f"org/f8s@{hub.commit('org/f8s')[:12]}" in str(e.value), str(e.value)
    assert "streammerge-inputs" not in str(e.value)


def test_several_compute_threads_stream_without_probing_shards_not_there_yet(hub, refs, tmp_path, monkeypatch):
    # the CPU engine samples its inputs' page-cache residency before it starts when it has more than one compute
    # thread (engines/cpu.py); mapping a streamed shard that has not arrived would wait for ever
    from streammerge.engines import cpu

    monkeypatch.setattr(cpu, "default_workers", lambda: 2)
    r = _bounded(
        lambda: streammerge.merge(
            "org/t", "org/s", "org/g", tmp_path / "o", device="cpu", stream=True, download_workers=1
        ),
        timeout_s=30,
    )
    assert _weights(tmp_path / "o") == refs["merge"] and "2 compute" in " ".join(r.warnings)
