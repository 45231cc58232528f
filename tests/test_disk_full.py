"""Disk full and write errors: a clean message with the space needed, no temporary files, inputs untouched, and
--resume completes once space is freed. Uses RLIMIT_FSIZE (always) and a small tmpfs (where mounting is allowed)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from helpers import make_related, streammerge_cmd, tree_digest, write_checkpoint

import streammerge

SHAPES = {f"w{i}": (512, 512) for i in range(12)}  # 12 x 1 MB in fp32


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    t, s, g = make_related(SHAPES, dtype="F32", seed=5)
    dirs = tuple(write_checkpoint(root / n, sd, shards=k) for n, sd, k in zip("tsg", (t, s, g), (1, 2, 3)))
    ref = root / "ref"
    streammerge.merge(*dirs, ref, device="cpu", max_shard_size="4MB")
    return dirs, ref


def _cmd(dirs, out, *extra):
    return [
        *streammerge_cmd("merge", *dirs),
        "-o",
        str(out),
        "--device",
        "cpu",
        "--max-shard-size",
        "4MB",
        "-q",
        *extra,
    ]


def _limit_file_size(nbytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


def _same_weights(out: Path, ref: Path) -> bool:
    names = [p.name for p in ref.iterdir() if not p.name.startswith(".")]
    return all((out / n).read_bytes() == (ref / n).read_bytes() for n in names)


def test_file_size_limit_fails_cleanly_then_resume(trio, tmp_path):
    dirs, ref = trio
    before = {d: tree_digest(d) for d in dirs}
    out = tmp_path / "out"
    r = subprocess.run(_cmd(dirs, out), capture_output=True, text=True, preexec_fn=_limit_file_size(2_000_000))
    assert r.returncode == 1, r.stderr
    # the file-size limit gives EFBIG: advice to use smaller shards, then resume
    assert "file too large" in r.stderr and "--max-shard-size" in r.stderr and "--resume" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list(out.glob(".*.partial"))
    assert {d: tree_digest(d) for d in dirs} == before
    r = subprocess.run(_cmd(dirs, out, "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _same_weights(out, ref)


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0 or os.geteuid() != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()}); RLIMIT_FSIZE test covers it")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_small_filesystem_plan_warns_merge_fails_then_resume(trio, small_fs):
    dirs, ref = trio
    out = small_fs / "out"
    r = subprocess.run(
        [*streammerge_cmd("plan", *dirs), "-o", str(out), "--max-shard-size", "4MB"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "warning: only" in r.stderr and "the output needs" in r.stderr
    r = subprocess.run(_cmd(dirs, out), capture_output=True, text=True)
    assert r.returncode == 1 and "out of disk space" in r.stderr and "Traceback" not in r.stderr
    assert not list(out.glob(".*.partial"))
    # free space (grow the filesystem) and resume
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    r = subprocess.run(_cmd(dirs, out, "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _same_weights(out, ref)


def test_filling_the_disk_mid_merge_cannot_corrupt(trio, small_fs):
    """Space is reserved when each file is created: filling the filesystem afterwards cannot fail a weight write."""
    dirs, ref = trio
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_fs)], check=True)
    out = small_fs / "out"
    p = subprocess.Popen(
        _cmd(dirs, out, "--chunk-size", "64KiB", "--threads", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while p.poll() is None and not (out.exists() and list(out.glob(".*.partial"))):
        time.sleep(0.005)
    with open(small_fs / "filler", "wb") as f:  # take every free byte
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    _, err = p.communicate(timeout=120)
    (small_fs / "filler").unlink()
    if p.returncode == 0:
        assert _same_weights(out, ref)
    else:  # only the small files at the end can hit the full disk: a clean error, and resume finishes
        assert p.returncode == 1 and "out of disk space" in err and "Traceback" not in err
        r = subprocess.run(_cmd(dirs, out, "--resume"), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert _same_weights(out, ref)
