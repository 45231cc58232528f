"""Crash safety: kill real merge processes at many points; every file with a final name is complete and correct,
no index unless every shard is; --resume then produces bytes identical to an uninterrupted merge."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_related, streammerge_cmd, tree_digest, write_checkpoint

import streammerge

SHAPES = {f"model.layers.{i}.mlp.weight": (512, 512) for i in range(24)}
MAX_SHARD = "5MB"  # 1 MB tensors in fp32 -> 6 shards


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("atom")
    t, s, g = make_related(SHAPES, dtype="F32", seed=3)
    dirs = tuple(write_checkpoint(root / n, sd, shards=k) for n, sd, k in zip("tsg", (t, s, g), (1, 3, 2)))
    ref = root / "reference"
    streammerge.merge(*dirs, ref, device="cpu", max_shard_size=MAX_SHARD)
    return dirs, ref


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _visible(out: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in out.iterdir() if not p.name.startswith(".")} if out.exists() else {}


def _cmd(dirs, out, *extra):
    return [
        *streammerge_cmd("merge", *dirs),
        "-o",
        str(out),
        "--device",
        "cpu",
        "--max-shard-size",
        MAX_SHARD,
        "--chunk-size",
        "64KiB",
        "--threads",
        "1",
        "-q",
        *extra,
    ]


def _check_invariants(out: Path, ref: Path) -> None:
    want = _visible(ref)
    shards = {n for n in want if n.endswith(".safetensors")}
    got = _visible(out)
    for name, digest in got.items():
        if name in shards or name == "model.safetensors.index.json":
            assert digest == want[name], f"{name} has a final name but wrong bytes"
    if "model.safetensors.index.json" in got:
        assert shards <= set(got), "index present before every shard was complete"


POINTS = ["planned", "chunk:0", "chunk:37", "chunk:150", "shard:0", "shard:2", "index"]


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_injected_point_then_resume(trio, tmp_path, point):
    dirs, ref = trio
    before = {d: tree_digest(d) for d in dirs}
    out = tmp_path / "out"
    r = subprocess.run(_cmd(dirs, out), env={**os.environ, "STREAMMERGE_CRASH_AT": point}, capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    _check_invariants(out, ref)
    if out.exists() and any(out.iterdir()):
        # a plain rerun is refused with advice; --resume finishes it
        r2 = subprocess.run(_cmd(dirs, out), capture_output=True, text=True)
        assert r2.returncode == 1 and "--resume" in r2.stderr
    r = subprocess.run(_cmd(dirs, out, "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _visible(out) == _visible(ref)
    assert {d: tree_digest(d) for d in dirs} == before
    if point.startswith("shard:") or point == "index":
        assert "resume: kept" in r.stdout  # finished shards were verified and kept, not redone


def test_kill_at_random_times(trio, tmp_path):
    dirs, ref = trio
    rng = random.Random(11)
    for k in range(4):
        out = tmp_path / f"out{k}"
        p = subprocess.Popen(_cmd(dirs, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 3.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        _check_invariants(out, ref)
        r = subprocess.run(_cmd(dirs, out, "--resume"), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert _visible(out) == _visible(ref)


def test_resume_refuses_different_inputs_or_options(trio, tmp_path):
    dirs, ref = trio
    out = tmp_path / "out"
    r = subprocess.run(_cmd(dirs, out), env={**os.environ, "STREAMMERGE_CRASH_AT": "shard:1"}, capture_output=True)
    assert r.returncode == -signal.SIGKILL
    r = subprocess.run(_cmd(dirs, out, "--resume", "--alpha", "0.5"), capture_output=True, text=True)
    assert r.returncode == 1 and "cannot resume" in r.stderr and "options" in r.stderr
    swapped = (dirs[0], dirs[2], dirs[1])
    r = subprocess.run(_cmd(swapped, out, "--resume"), capture_output=True, text=True)
    assert r.returncode == 1 and "cannot resume" in r.stderr and "inputs" in r.stderr
    manifest = json.loads((out / ".streammerge.json").read_text())
    assert manifest["state"] == "in-progress" and len(manifest["shards"]) == 2


def test_resume_redoes_a_tampered_shard(trio, tmp_path):
    dirs, ref = trio
    out = tmp_path / "out"
    subprocess.run(_cmd(dirs, out), env={**os.environ, "STREAMMERGE_CRASH_AT": "shard:2"}, capture_output=True)
    done = json.loads((out / ".streammerge.json").read_text())["shards"]
    assert len(done) == 3
    victim = out / sorted(done)[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = subprocess.run(_cmd(dirs, out, "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "did not match its recorded checksum" in r.stdout
    assert _visible(out) == _visible(ref)


def test_concurrent_merge_is_refused(trio, tmp_path):
    import fcntl

    dirs, _ = trio
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running merge holds
    try:
        r = subprocess.run(_cmd(dirs, out), capture_output=True, text=True)
        assert r.returncode == 1 and "another streammerge process" in r.stderr
    finally:
        os.close(fd)
    assert not any(out.iterdir())


def test_symlinks_in_the_output_are_never_followed(trio, tmp_path):
    dirs, ref = trio
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    # an interrupted merge, then links planted where a shard, the index and the card will go
    r = subprocess.run(_cmd(dirs, out), env={**os.environ, "STREAMMERGE_CRASH_AT": "shard:1"}, capture_output=True)
    assert r.returncode == -signal.SIGKILL
    shard0 = sorted(p for p in out.glob("model-*.safetensors"))[0]
    shard0.unlink()
    for name in (shard0.name, "model.safetensors.index.json", "README.md", ".model-00004-of-00006.safetensors.partial"):
        (out / name).unlink(missing_ok=True)
        os.symlink(victim, out / name)
    r = subprocess.run(_cmd(dirs, out, "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious"
    assert not any(p.is_symlink() for p in out.iterdir())
    assert _visible(out) == _visible(ref)
    # --overwrite removes links, never their targets
    (out / "config.json").unlink()
    os.symlink(victim, out / "config.json")
    r = subprocess.run(_cmd(dirs, out, "--overwrite"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious"


def test_output_path_that_is_a_symlink_is_refused(trio, tmp_path):
    dirs, _ = trio
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    r = subprocess.run(_cmd(dirs, tmp_path / "link"), capture_output=True, text=True)
    assert r.returncode == 1 and "symlink" in r.stderr
    assert not any(real.iterdir())


@pytest.mark.parametrize("change", ["rewrite", "append", "rewrite-keeping-mtime"])
def test_input_changed_during_the_merge_is_never_published(trio, tmp_path, change):
    """An input rewritten in place mid-merge (a save or a download still running) would give output mixing old and
    new bytes: no output file is given its final name after the change, and the error names the file."""
    import shutil

    dirs, ref = trio
    copies = [Path(shutil.copytree(d, tmp_path / d.name)) for d in dirs]
    victim = sorted(copies[1].glob("*.safetensors"))[-1]
    done = []

    def progress(event) -> None:
        if done:
            return
        done.append(event)
        before = victim.stat()
        with open(victim, "r+b") as f:
            if change == "append":
                f.seek(0, os.SEEK_END)
                f.write(b"\0" * 8)
            else:
                f.seek(-4, os.SEEK_END)
                f.write(b"\x7f\x7f\x7f\x7f")
        if change == "rewrite-keeping-mtime":  # as cp -p or rsync -t leave it: only the ctime tells
            os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
        else:
            os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns + 5_000_000_000))  # coarse-mtime fs too

    out = tmp_path / "out"
    size = victim.stat().st_size
    what = f"{size} bytes then, {size + 8} now" if change == "append" else "modified in place"
    with pytest.raises(streammerge.CheckpointError, match=f"{victim.name}: input changed while merging.*{what}"):
        streammerge.merge(*copies, out, device="cpu", max_shard_size=MAX_SHARD, chunk_bytes=65536, progress=progress)
    assert done
    visible = _visible(out)
    assert "model.safetensors.index.json" not in visible
    for name, digest in visible.items():  # published before the change: the reference's bytes
        assert digest == _digest(ref / name), name
    # --resume refuses the changed input (or the now invalid file), in one line with exit 1.
    r = subprocess.run(_cmd(copies, out, "--resume"), capture_output=True, text=True)
    why = "trailing bytes" if change == "append" else "cannot resume"
    assert r.returncode == 1 and why in r.stderr and "Traceback" not in r.stderr


_TRUNCATE_MID_MERGE = """
import os, sys
from pathlib import Path
import streammerge

t, s, g, out, victim = sys.argv[1:6]
done = []

def progress(event):
    if not done:
        done.append(1)
        os.truncate(victim, os.path.getsize(victim) // 2)  # a save of this checkpoint restarted

try:
    streammerge.merge(t, s, g, out, device="cpu", max_shard_size="5MB", chunk_bytes=65536, threads=1,
                      progress=progress)
except streammerge.CheckpointError as e:
    print(e)
    sys.exit(3)
"""


def test_input_truncated_during_the_merge_is_an_error_not_sigbus(trio, tmp_path):
    """Reading a mapping past a shrunken file's end would kill the process with SIGBUS: every read checks the file's
    size first, so a checkpoint truncated mid-merge is a clear error naming it, and nothing looks complete."""
    import shutil

    dirs, _ = trio
    copies = [Path(shutil.copytree(d, tmp_path / d.name)) for d in dirs]
    victim = sorted(copies[1].glob("*.safetensors"))[-1]  # read last: the compute thread is far from it
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_MID_MERGE, *map(str, copies), str(out), str(victim)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr[-2000:])
    # Whichever check sees it first: the size check before a read, or the input check before a shard is published.
    assert f"{victim}: file changed while merging" in r.stdout or f"{victim}: input changed while merging" in r.stdout
    assert "model.safetensors.index.json" not in _visible(out)
