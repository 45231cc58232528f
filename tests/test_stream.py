"""``--stream``: Hub inputs downloaded just ahead of the merge and deleted behind it, through the real
huggingface_hub client talking to a local Hub server (benchmarks/hub_server.py) on 127.0.0.1.

What is checked: output bytes equal to the same merge from downloaded snapshots (and its tensors to a local-path
merge), the disk bound sampled while the merge runs, the download order, refetches when the bound forces them,
retries, a failure mid-stream then ``--resume`` (fetching only what the unfinished files need), Ctrl-C removing
partial downloads, a sweep and a combine fetching each shard once, block-scaled FP8 inputs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import load_all, make_related, streammerge_cmd, tree_digest, write_checkpoint
from hub_fixtures import HubServer, hub_env, sampled_disk

import streammerge
from streammerge.errors import OptionsError

LAYERS = 8
SHAPE = (256, 512)  # 256 KiB of bf16 per tensor


def _names() -> list[str]:
    return [f"model.layers.{i}.mlp.weight" for i in range(LAYERS)]


@pytest.fixture(scope="module")
def trio_dirs(tmp_path_factory) -> list[Path]:
    """target in 4 shards, sft in 2 shards holding every other tensor (its shards are needed in turns: a tight
    bound must refetch), grpo in 3 shards."""
    root = tmp_path_factory.mktemp("stream-trio")
    t, s, g = make_related({n: SHAPE for n in _names()})
    names = _names()
    interleaved = {n: s[n] for n in names[0::2] + names[1::2]}
    return [
        write_checkpoint(root / "t", t, shards=4),
        write_checkpoint(root / "s", interleaved, shards=2),
        write_checkpoint(root / "g", g, shards=3),
    ]


@pytest.fixture
def hub(trio_dirs, tmp_path):
    with HubServer(
        {"org/t": {"main": trio_dirs[0]}, "org/s": {"main": trio_dirs[1]}, "org/g": {"main": trio_dirs[2]}}
    ) as server:
        env = {**os.environ, **server.env(tmp_path / "hf"), "STREAMMERGE_DOWNLOAD_BACKOFF_S": "0.01"}
        env.pop("HF_HUB_OFFLINE", None)
        yield server, env


def _cli(env, *args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([*streammerge_cmd(*args)], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _weights(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def _plan_stream(env, *extra) -> dict:
    r = _cli(env, "plan", "org/t", "org/s", "org/g", "--stream", "--json", *extra)
    return json.loads(r.stdout)["stream"]


def _shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_stream_equals_snapshot_merge_and_leaves_nothing(hub, trio_dirs, tmp_path):
    server, env = hub
    out = tmp_path / "streamed"
    r = _cli(
        env,
        "merge",
        "org/t",
        "org/s",
        "org/g",
        "-o",
        str(out),
        "--device",
        "cpu",
        "--max-shard-size",
        "600KB",
        "--stream",
        "--json",
    )
    full = [q for q in server.requests if q.method == "GET" and q.path.endswith(".safetensors") and q.range is None]
    snap = tmp_path / "snapshot"
    _cli(env, "merge", "org/t", "org/s", "org/g", "-o", str(snap), "--device", "cpu", "--max-shard-size", "600KB")
    report = json.loads(r.stdout)
    # the same merge: every byte, card included; the manifest identifies the inputs by commit and SHA-256 instead
    # of the snapshot files' sizes and times
    digest = {k: v for k, v in tree_digest(out).items() if k != ".streammerge.json"}
    assert digest == {k: v for k, v in tree_digest(snap).items() if k != ".streammerge.json"} and len(digest) > 5
    local = tmp_path / "local"
    _cli(env, "merge", *map(str, trio_dirs), "-o", str(local), "--device", "cpu", "--max-shard-size", "600KB")
    a, b = load_all(out), load_all(local)
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)
    # each of the 9 shards downloaded once in full; nothing of the inputs is left behind
    assert len(full) == 9 and len({q.path for q in full}) == 9
    assert not (tmp_path / ".streamed.streammerge-inputs").exists()
    assert any(w.startswith("stream: 9 shard download(s)") for w in report["warnings"])


def test_download_order_follows_first_use(hub, tmp_path):
    server, env = hub
    _cli(
        env,
        "merge",
        "org/t",
        "org/s",
        "org/g",
        "-o",
        str(tmp_path / "o"),
        "--device",
        "cpu",
        "--stream",
        "--download-workers",
        "1",
    )
    order = [
        (q.repo_id.split("/")[1], q.filename)
        for q in server.requests
        if q.method == "GET" and q.path.endswith(".safetensors") and q.range is None
    ]
    # tensor 0 reads the target, then grpo - sft (shard 1 of each); tensor 1 sft shard 2; tensor 2 target shard 2
    assert order[:4] == [
        ("t", "model-00001-of-00004.safetensors"),
        ("g", "model-00001-of-00003.safetensors"),
        ("s", "model-00001-of-00002.safetensors"),
        ("s", "model-00002-of-00002.safetensors"),
    ]
    assert order[4] == ("t", "model-00002-of-00004.safetensors")


def test_tight_bound_refetches_and_the_sampled_disk_stays_under_it(hub, trio_dirs, tmp_path):
    server, env = hub
    minimum = _plan_stream(env)["minimum_bound"]
    planned = _plan_stream(env, "--stream-disk", str(minimum))
    assert planned["refetched"], "the interleaved sft shards must be fetched again under the least bound"
    server.clear_log()
    server.rate_bytes_per_s = 20e6  # long enough to be sampled
    scratch, out = tmp_path / "scratch", tmp_path / "o"
    with hub_env(server, tmp_path / "hf-in"), sampled_disk(scratch) as peak:
        report = streammerge.merge(
            "org/t",
            "org/s",
            "org/g",
            out,
            device="cpu",
            stream=True,
            stream_disk=minimum,
            stream_dir=str(scratch),
            download_workers=2,
        )
    assert 0 < peak[0] <= minimum
    # as planned, at most: every shard downloaded, a refetched one no more often than planned (a refetch is skipped
    # when the merge read the shard's later tensors before its first copy was deleted), the others once
    full = {}
    for q in server.requests:
        if q.method == "GET" and q.path.endswith(".safetensors") and q.range is None:
            key = f"{q.repo_id.split('/')[1]}:{q.filename}"
            full[key] = full.get(key, 0) + 1
    roles = {"t": "target", "s": "sft", "g": "grpo"}
    got = {f"{roles[k.split(':')[0]]}:{k.split(':')[1]}": v for k, v in full.items() if v > 1}
    assert all(v <= planned["refetched"].get(k, 1) for k, v in got.items()) and len(full) == planned["shards"]
    assert planned["shards"] <= sum(full.values()) <= planned["fetches"]
    ref = tmp_path / "ref"
    streammerge.merge(*trio_dirs, ref, device="cpu")
    a, b = load_all(out), load_all(ref)
    assert all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in b)
    assert not scratch.exists() and report.stage_seconds["wait_download"] >= 0


def test_bound_below_one_tensor_is_refused(hub, tmp_path):
    _, env = hub
    r = _cli(
        env,
        "merge",
        "org/t",
        "org/s",
        "org/g",
        "-o",
        str(tmp_path / "o"),
        "--stream",
        "--stream-disk",
        "100KB",
        check=False,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--stream-disk 100.0 KB is below what tensor" in r.stderr and "give at least" in r.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.safetensors"))


def test_failed_downloads_are_retried(hub, tmp_path):
    server, env = hub
    # the first GET (the header, read before the merge begins) goes through; the download's GETs fail twice
    name = "model-00002-of-00003.safetensors"
    server.fail("org/g", name, after_bytes=10**9)
    server.fail("org/g", name, status=500, times=2)
    r = _cli(
        env, "merge", "org/t", "org/s", "org/g", "-o", str(tmp_path / "o"), "--device", "cpu", "--stream", "--json"
    )
    gets = server.gets(name, "org/g")
    assert [q.status for q in gets] == [206, 500, 500, 200]
    assert any("2 retried" in w for w in json.loads(r.stdout)["warnings"])


def test_failure_mid_stream_then_resume_fetches_only_what_is_left(hub, tmp_path):
    server, env = hub
    common = [
        "-o",
        str(tmp_path / "o"),
        "--device",
        "cpu",
        "--stream",
        "--max-shard-size",
        "600KB",
        "--download-workers",
        "1",
    ]
    minimum = _plan_stream(env)["minimum_bound"]
    bound = ["--stream-disk", str(minimum)]
    # only the last tensors read this shard: its header is read first, then every download of it fails
    server.fail("org/g", "model-00003-of-00003.safetensors", after_bytes=10**9)
    server.fail("org/g", "model-00003-of-00003.safetensors", status=503, times=None)
    r = _cli(env, "merge", "org/t", "org/s", "org/g", *common, *bound, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "download failed after 4 attempt(s)" in last and "--resume" in last
    out = tmp_path / "o"
    assert not (out / "model.safetensors.index.json").exists()
    finished = _shard_names(out)
    assert finished, "the files before the failing shard's first use were finished"
    assert not (tmp_path / ".o.streammerge-inputs").exists()
    server.clear_failures()
    server.clear_log()
    r = _cli(env, "merge", "org/t", "org/s", "org/g", *common, *bound, "--resume", "--json")
    assert json.loads(r.stdout)["resumed_shards"] == len(finished)
    # target shard 1 feeds only the first output file, which was finished: not fetched again
    assert not [q for q in server.gets("model-00001-of-00004.safetensors", "org/t") if q.range is None]
    ref = tmp_path / "ref"
    _cli(env, "merge", "org/t", "org/s", "org/g", "-o", str(ref), "--device", "cpu", "--max-shard-size", "600KB")
    assert _weights(out) == _weights(ref)


def test_ctrl_c_removes_partial_downloads(hub, tmp_path):
    server, env = hub
    server.rate_bytes_per_s = 300e3  # a slow link: the merge is mid-download when interrupted
    out = tmp_path / "o"
    p = subprocess.Popen(
        streammerge_cmd("merge", "org/t", "org/s", "org/g", "-o", str(out), "--device", "cpu", "--stream"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    scratch = tmp_path / ".o.streammerge-inputs"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(scratch.rglob("*.incomplete")):
        time.sleep(0.05)
    assert list(scratch.rglob("*.incomplete")), "a download should be in flight"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "interrupted" in err and "Traceback" not in err
    assert not scratch.exists()
    assert not (out / "model.safetensors.index.json").exists()


def test_sweep_and_combine_download_each_shard_once(hub, tmp_path):
    server, env = hub
    r = _cli(
        env,
        "merge",
        "org/t",
        "org/s",
        "org/g",
        "-o",
        str(tmp_path / "sw"),
        "--device",
        "cpu",
        "--alpha",
        "0.5,1",
        "--stream",
    )
    full = [
        q.path for q in server.requests if q.method == "GET" and q.path.endswith(".safetensors") and q.range is None
    ]
    assert len(full) == len(set(full)) == 9, r.stderr
    server.clear_log()
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'target = "org/t"\n[[vectors]]\nsft = "org/s"\ngrpo = "org/g"\nalpha = 1.0\n'
        '[[vectors]]\nsft = "org/s"\ngrpo = "org/t"\nalpha = -0.5\n'
    )
    _cli(env, "combine", str(spec), "-o", str(tmp_path / "c"), "--device", "cpu", "--stream")
    full = [
        q.path for q in server.requests if q.method == "GET" and q.path.endswith(".safetensors") and q.range is None
    ]
    assert len(full) == len(set(full)) == 9  # org/s and org/t serve two roles each, downloaded once
    ref = tmp_path / "c-ref"
    _cli(env, "combine", str(spec), "-o", str(ref), "--device", "cpu")
    assert _weights(tmp_path / "c") == _weights(ref)


def test_fp8_trio_streams_byte_identical(tmp_path):
    from streammerge.synth import make_fp8_trio

    trio = make_fp8_trio(tmp_path / "fp8", num_layers=2)
    dirs = [Path(trio.target), Path(trio.sft), Path(trio.grpo)]
    with HubServer({"org/t": {"main": dirs[0]}, "org/s": {"main": dirs[1]}, "org/g": {"main": dirs[2]}}) as server:
        env = {**os.environ, **server.env(tmp_path / "hf")}
        env.pop("HF_HUB_OFFLINE", None)
        _cli(env, "merge", "org/t", "org/s", "org/g", "-o", str(tmp_path / "snap"), "--device", "cpu")
        _cli(env, "merge", "org/t", "org/s", "org/g", "-o", str(tmp_path / "st"), "--device", "cpu", "--stream")
    assert _weights(tmp_path / "st") == _weights(tmp_path / "snap") and _weights(tmp_path / "st")


def test_schedule_keeps_its_bound(hub, tmp_path):
    """The schedule itself, for every bound from the least upwards: peak within the bound, every tensor's shards
    on disk when it runs, each fetch started only after what it waits for is done."""
    server, _ = hub
    from streammerge.stream import schedule, streamed

    with hub_env(server, tmp_path / "hf-in"):
        opts = streammerge.MergeOptions.create(stream=True, stream_dir=str(tmp_path / "scratch"))
        from streammerge import recipes

        with recipes.trio("org/t", "org/s", "org/g", opts) as job:
            base = schedule(job.plan, job.inputs)
            assert base.refetched() == {} and base.peak <= base.bound
            for bound in range(base.minimum, base.no_refetch + 1, max(1, (base.no_refetch - base.minimum) // 6)):
                s = schedule(job.plan, job.inputs, bound)
                assert s.peak <= bound
                for f in s.fetches:
                    assert f.start_after <= f.first_step <= f.last_step
                assert all(streamed(ck) is not None for ck in {id(f.ck): f.ck for f in s.fetches}.values())
            with pytest.raises(OptionsError, match="is below what tensor"):
                schedule(job.plan, job.inputs, base.minimum - 1)


def test_parts_stream_into_their_own_folders(hub, tmp_path):
    server, env = hub
    out = tmp_path / "o"
    common = ["org/t", "org/s", "org/g", "-o", str(out), "--device", "cpu", "--stream", "--max-shard-size", "600KB"]
    _cli(env, "merge", *common, "--part", "1/2")
    first = {(q.repo_id, q.filename) for q in server.gets() if q.range is None and q.filename.endswith("safetensors")}
    server.clear_log()
    _cli(env, "merge", *common, "--part", "2/2")
    second = {(q.repo_id, q.filename) for q in server.gets() if q.range is None and q.filename.endswith("safetensors")}
    assert first and second and len(first) < 9  # a part fetches only the shards its own files read
    _cli(env, "finalize", str(out))
    ref = tmp_path / "ref"
    _cli(env, "merge", "org/t", "org/s", "org/g", "-o", str(ref), "--device", "cpu", "--max-shard-size", "600KB")
    assert _weights(out) == _weights(ref)
    assert not (tmp_path / ".o.streammerge-inputs").exists()


def test_torchrun_ranks_stream_their_own_files(hub, tmp_path):
    server, env = hub
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "streammerge"]
    cmd += ["merge", "org/t", "org/s", "org/g", "-o", str(out), "--device", "cpu", "--stream", "--max-shard-size"]
    r = subprocess.run([*cmd, "600KB"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    ref = tmp_path / "ref"
    _cli(env, "merge", "org/t", "org/s", "org/g", "-o", str(ref), "--device", "cpu", "--max-shard-size", "600KB")
    assert _weights(out) == _weights(ref) and (out / "model.safetensors.index.json").exists()
    assert not (tmp_path / ".o.streammerge-inputs").exists()


def test_not_enough_disk_for_the_streamed_shards_is_refused_up_front(hub, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from streammerge.errors import OutputError

    server, _ = hub
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(*real(p)[:2], 1_000_000))
    with hub_env(server, tmp_path / "hf-in"), pytest.raises(OutputError, match="will use up to .* at once"):
        streammerge.merge("org/t", "org/s", "org/g", tmp_path / "o", device="cpu", stream=True)
    # refused before any shard was fetched (only the index and small files were)
    assert server.download_order() and not [n for n in server.download_order() if n.endswith(".safetensors")]


def test_plan_stream_says_the_disk_and_the_fetches(hub):
    server, env = hub
    text = _cli(env, "plan", "org/t", "org/s", "org/g", "--stream").stdout
    assert "stream  9 input shard(s), 9 download(s)" in text and "every shard is fetched once" in text
    least = _plan_stream(env)["minimum_bound"]
    tight = _cli(env, "plan", "org/t", "org/s", "org/g", "--stream", "--stream-disk", str(least)).stdout
    assert "the bound forces" in tight and "sft:model-0000" in tight
    assert not [n for n in server.download_order() if n.endswith(".safetensors")]  # planning fetched no shard
