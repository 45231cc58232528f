"""Hub sources through the real huggingface_hub code path (a Hub cache laid out on disk, HF_HUB_OFFLINE=1), and
push with the upload intercepted (no Hub is reachable here)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import load_all, make_related, streammerge_cmd, write_checkpoint

import streammerge
from streammerge import hub
from streammerge.errors import CheckpointError, OutputError
from streammerge.run import push_verified


def _lay_out_cache(cache: Path, repo_id: str, src: Path, commit: str, ref: str = "main") -> Path:
    """Put the files of ``src`` into a Hugging Face cache as huggingface_hub itself stores them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    src = tmp_path / "src"
    t, s, g = make_related({"model.embed_tokens.weight": (64, 16), "model.norm.weight": (16,)})
    dirs = [write_checkpoint(src / n, sd, shards=k) for n, sd, k in zip(("t", "s", "g"), (t, s, g), (1, 2, 1))]
    cache = tmp_path / "hf" / "hub"
    commits = {"org/target": "a" * 40, "org/sft": "b" * 40, "org/grpo": "c" * 40}
    for (repo, commit), d in zip(commits.items(), dirs):
        _lay_out_cache(cache, repo, d, commit)
    _lay_out_cache(cache, "org/grpo", dirs[2], "d" * 40, ref="v2")  # a second revision
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return dirs, commits


def _fresh_env(tmp_path) -> dict:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def test_parse_repo_spec(tmp_path):
    assert hub.parse_repo_spec("Qwen/Qwen2.5-7B") == ("Qwen/Qwen2.5-7B", None)
    assert hub.parse_repo_spec("org/name@v1.0") == ("org/name", "v1.0")
    assert hub.parse_repo_spec(str(tmp_path)) is None
    assert hub.parse_repo_spec("./org/name") is None and hub.parse_repo_spec("a/b/c") is None


def test_merge_from_hub_ids_offline(hub_cache, tmp_path):
    dirs, commits = hub_cache
    # a subprocess, so huggingface_hub reads HF_HOME/HF_HUB_OFFLINE from a clean start, as a user's run would
    out = tmp_path / "out"
    r = subprocess.run(
        [
            *streammerge_cmd("merge"),
            "org/target",
            "org/sft",
            "org/grpo@v2",
            "-o",
            str(out),
            "--device",
            "cpu",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=_fresh_env(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    local = tmp_path / "local"
    streammerge.merge(*dirs, local, device="cpu")
    assert (out / "model.safetensors").read_bytes()[8:] != b""  # same tensors, provenance differs in metadata
    assert load_all(out).keys() == load_all(local).keys()
    for k, v in load_all(local).items():
        assert load_all(out)[k].equal(v)
    card = (out / "README.md").read_text()
    assert f"org/target@{commits['org/target']}" in card and "org/grpo@" + "d" * 40 in card
    assert (out / "config.json").exists()


def test_hub_errors_are_clear(hub_cache, tmp_path):
    with pytest.raises(CheckpointError, match="not in the local Hub cache"):
        hub.resolve("org/absent", "target")
    r = subprocess.run(
        streammerge_cmd("plan", "org/absent", "org/sft", "org/grpo"),
        capture_output=True,
        text=True,
        env=_fresh_env(tmp_path),
    )
    assert r.returncode == 1 and "org/absent" in r.stderr and "Traceback" not in r.stderr


def test_push_uploads_only_a_verified_output(small_trio, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))

    class Info:
        commit_url = "https://huggingface.co/me/merged/commit/123"

    def upload_folder(self, **kw):
        calls.append(("upload", kw))
        return Info()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "out"
    report = streammerge.merge(*small_trio, out, device="cpu", push_to="me/merged", private=True)
    assert report.pushed == Info.commit_url
    assert calls[0] == ("create", "me/merged", {"private": True, "exist_ok": True, "repo_type": "model"})
    up = calls[1][1]
    assert up["repo_id"] == "me/merged" and Path(up["folder_path"]) == out and ".*" in up["ignore_patterns"]
    # a damaged output is never pushed
    calls.clear()
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"\x00")
    with pytest.raises(OutputError, match="did not verify"):
        push_verified(out, "me/merged")
    assert calls == []
    manifest = json.loads((out / ".streammerge.json").read_text())
    assert manifest["state"] == "complete"


def test_plan_reads_remote_headers_without_downloading(hub_cache, tmp_path, monkeypatch):
    """Not in the cache and online: plan uses get_safetensors_metadata (intercepted: no Hub is reachable here)."""
    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    from streammerge.format import read_header

    dirs, _ = hub_cache
    monkeypatch.delenv("HF_HUB_OFFLINE")
    asked = []

    def fake_metadata(repo_id, revision=None, **kw):
        asked.append((repo_id, revision))
        d = dirs[["remote/t", "remote/s", "remote/g"].index(repo_id)]
        files = {}
        for f in sorted(d.glob("*.safetensors")):
            h = read_header(f)
            files[f.name] = SafetensorsFileMetadata(
                metadata=h.metadata,
                tensors={
                    n: TensorInfo(dtype=t.dtype, shape=list(t.shape), data_offsets=(t.begin, t.end))
                    for n, t in h.tensors.items()
                },
            )
        wm = {n: fname for fname, fm in files.items() for n in fm.tensors}
        return SafetensorsRepoMetadata(metadata=None, sharded=len(files) > 1, weight_map=wm, files_metadata=files)

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", fake_metadata)
    p = streammerge.plan("remote/t", "remote/s@dev", "remote/g", tmp_path / "out")
    assert asked == [("remote/t", None), ("remote/s", "dev"), ("remote/g", None)]
    local = streammerge.plan(*dirs)
    assert p.summary()["bytes_read"] == local.summary()["bytes_read"] and p.merged == local.merged
    assert not (tmp_path / "hf" / "hub" / "models--remote--t").exists()  # nothing downloaded


def test_invalid_repo_id_or_mistyped_path_is_one_clear_line(hub_cache, tmp_path):
    r = subprocess.run(
        streammerge_cmd("plan", "org/a--b", "org/sft", "org/grpo"),
        capture_output=True,
        text=True,
        env=_fresh_env(tmp_path),
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert "org/a--b" in r.stderr


def test_combine_spec_with_hub_ids_offline(hub_cache, tmp_path):
    dirs, commits = hub_cache
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'target = "org/target"\n[[vectors]]\nsft = "org/sft"\ngrpo = "org/grpo@v2"\nalpha = 0.5\n'
        f'[[vectors]]\nsft = "{dirs[2]}"\ngrpo = "{dirs[1]}"\nalpha = 0.5\n'
    )
    out = tmp_path / "out"
    argv = streammerge_cmd("combine", spec, "-o", out, "--device", "cpu", "--json")
    r = subprocess.run(argv, capture_output=True, text=True, env=_fresh_env(tmp_path))
    assert r.returncode == 0, r.stderr
    # 0.5 * (g - s), then 0.5 * (s - g): with bf16 targets and small float32 vectors, (t + m) - m rounds back to t
    target = load_all(dirs[0])
    for k, v in load_all(out).items():
        assert v.equal(target[k]), k
    card = (out / "README.md").read_text()
    assert f"org/target@{commits['org/target']}" in card and "org/grpo@" + "d" * 40 in card
