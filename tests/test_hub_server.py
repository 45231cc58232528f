"""The local Hub server (benchmarks/hub_server.py) against the real huggingface_hub client: what it serves is what
the client expects (metadata, downloads byte for byte, revisions, errors, safetensors headers), and the failure
injection, holds and throttle do what the streaming tests will rely on.

huggingface_hub is imported inside the tests, never at collection (it reads its environment once, at import).
"""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import load_all, make_related, write_checkpoint
from hub_fixtures import HubServer, hub_env, hub_server  # noqa: F401 - hub_server is a fixture

SHARDED = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A single-file checkpoint (plus a nested file), a 2-shard one, and a 12 MiB one (past the client's chunk)."""
    root = tmp_path_factory.mktemp("hubsrc")
    t, s, _ = make_related({"model.embed_tokens.weight": (96, 32), "model.norm.weight": (32,)})
    single = write_checkpoint(root / "single", t, shards=1)
    (single / "sub").mkdir()
    (single / "sub" / "extra.json").write_text('{"nested": true}')
    sharded = write_checkpoint(root / "sharded", s, shards=2)
    g = torch.Generator().manual_seed(1)
    big = write_checkpoint(root / "big", {"w": torch.randn(6 << 20, generator=g).to(torch.bfloat16)}, aux=False)
    return {"single": single, "sharded": sharded, "big": big}


@pytest.fixture
def hub(hub_server, folders):  # noqa: F811 - the fixture imported above
    hub_server.add_repo("org/single", folders["single"])
    hub_server.add_repo("org/sharded", folders["sharded"])
    hub_server.add_repo("org/sharded", folders["single"], revision="v2")
    hub_server.add_repo("org/big", folders["big"])
    return hub_server


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_model_info_and_tree(hub, folders):
    import huggingface_hub as hf

    info = hf.model_info("org/single")
    assert info.id == "org/single" and info.sha == hub.commit("org/single") and len(info.sha) == 40
    assert sorted(s.rfilename for s in info.siblings) == sorted(_files(folders["single"]))
    assert info.safetensors.total == 96 * 32 + 32
    assert all(s.size is None for s in info.siblings)  # sizes only with files_metadata (?blobs=true)
    detailed = {s.rfilename: s for s in hf.model_info("org/single", files_metadata=True).siblings}
    data = (folders["single"] / "model.safetensors").read_bytes()
    st = detailed["model.safetensors"]
    assert st.size == len(data) and st.lfs.sha256 == hashlib.sha256(data).hexdigest() and st.lfs.size == len(data)
    cfg = (folders["single"] / "config.json").read_bytes()
    assert detailed["config.json"].lfs is None
    assert detailed["config.json"].blob_id == hashlib.sha1(b"blob %d\0" % len(cfg) + cfg).hexdigest()

    flat = {e.path: e for e in hf.list_repo_tree("org/single")}
    assert "sub" in flat and "sub/extra.json" not in flat and type(flat["sub"]).__name__ == "RepoFolder"
    assert flat["model.safetensors"].lfs.sha256 == st.lfs.sha256
    deep = {e.path for e in hf.list_repo_tree("org/single", recursive=True)}
    assert deep == set(_files(folders["single"])) | {"sub"}
    assert [e.path for e in hf.list_repo_tree("org/single", path_in_repo="sub")] == ["sub/extra.json"]
    gets = [r for r in hub.requests if "/tree/" in r.path]
    assert [r.query for r in gets][-1] == "recursive=false&expand=false"


def test_download_byte_identical_and_headers(hub, folders, tmp_path):
    import huggingface_hub as hf
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    for name, data in _files(folders["sharded"]).items():
        local = hf.hf_hub_download("org/sharded", name, local_dir=tmp_path / "ld")
        cached = hf.hf_hub_download("org/sharded", name)
        assert Path(local).read_bytes() == data and Path(cached).read_bytes() == data
        meta = get_hf_file_metadata(hf_hub_url("org/sharded", name))
        assert meta.commit_hash == hub.commit("org/sharded") and meta.size == len(data)
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        assert meta.etag == (hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_sha1)
    snap = hf.snapshot_download("org/sharded", local_dir=tmp_path / "snap")
    assert _files(Path(snap)).items() >= _files(folders["sharded"]).items()
    assert hub.bytes_served >= 2 * sum(len(d) for d in _files(folders["sharded"]).values())


def test_other_revision_by_name_and_sha(hub, folders, tmp_path):
    import huggingface_hub as hf

    v2 = hub.commit("org/sharded", "v2")
    assert v2 != hub.commit("org/sharded") and hf.model_info("org/sharded", revision="v2").sha == v2
    assert hf.model_info("org/sharded", revision=v2).sha == v2
    want = (folders["single"] / "model.safetensors").read_bytes()
    for rev in ("v2", v2):
        path = hf.hf_hub_download("org/sharded", "model.safetensors", revision=rev, local_dir=tmp_path / rev)
        assert Path(path).read_bytes() == want
    snap = Path(hf.snapshot_download("org/sharded", revision="v2"))
    assert snap.name == v2 and (snap / "sub" / "extra.json").read_text() == '{"nested": true}'
    assert not (snap / SHARDED).exists()
    with pytest.raises(hf.errors.RemoteEntryNotFoundError):  # model.safetensors is only on v2
        hf.hf_hub_download("org/sharded", "model.safetensors", local_dir=tmp_path / "main")
    assert {b.name: b.target_commit for b in hf.list_repo_refs("org/sharded").branches}["v2"] == v2


def test_404s_are_the_client_errors(hub, tmp_path):
    import huggingface_hub as hf
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        hf.hf_hub_download("org/nope", "config.json", local_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf.model_info("org/nope")
    with pytest.raises(RevisionNotFoundError):
        hf.hf_hub_download("org/single", "config.json", revision="nope", local_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf.model_info("org/single", revision="0" * 40)
    with pytest.raises(RemoteEntryNotFoundError):
        hf.hf_hub_download("org/single", "missing.json")
    with pytest.raises(RemoteEntryNotFoundError):
        list(hf.list_repo_tree("org/single", path_in_repo="missing"))
    assert not hf.file_exists("org/single", "missing.json") and not hf.file_exists("org/nope", "config.json")
    assert hf.file_exists("org/single", "sub/extra.json")
    missing = [r for r in hub.heads("missing.json")]
    assert missing and all(r.status == 404 for r in missing)


@pytest.mark.parametrize("repo", ["org/single", "org/sharded"])
def test_get_safetensors_metadata(hub, folders, repo):
    import huggingface_hub as hf

    meta = hf.get_safetensors_metadata(repo)
    local = load_all(folders[repo.split("/")[1]])
    assert meta.sharded == (repo == "org/sharded")
    tensors = {k: v for fm in meta.files_metadata.values() for k, v in fm.tensors.items()}
    assert {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()} == {
        k: ("BF16", tuple(v.shape)) for k, v in local.items()
    }
    header_reads = [r for r in hub.gets() if r.range is not None]
    assert header_reads and all(r.range == "bytes=0-100000" and r.status == 206 for r in header_reads)


def test_range_requests_return_exactly_the_bytes(hub, folders):
    data = (folders["big"] / "model.safetensors").read_bytes()
    url = f"{hub.endpoint}/org/big/resolve/main/model.safetensors"

    def get(rng: str) -> tuple[int, str, bytes]:
        req = urllib.request.Request(url, headers={"Range": rng})
        with urllib.request.urlopen(req) as r:
            return r.status, r.headers["Content-Range"], r.read()

    n = len(data)
    assert get("bytes=100-199") == (206, f"bytes 100-199/{n}", data[100:200])
    assert get(f"bytes={n - 10}-") == (206, f"bytes {n - 10}-{n - 1}/{n}", data[-10:])
    assert get("bytes=-7") == (206, f"bytes {n - 7}-{n - 1}/{n}", data[-7:])
    assert get(f"bytes={n - 3}-{n + 1000}") == (206, f"bytes {n - 3}-{n - 1}/{n}", data[-3:])  # end clamped
    with pytest.raises(urllib.error.HTTPError) as err:
        get(f"bytes={n}-")
    assert err.value.code == 416 and err.value.headers["Content-Range"] == f"bytes */{n}"
    with urllib.request.urlopen(url) as r:
        assert r.status == 200 and r.headers["Accept-Ranges"] == "bytes" and r.read() == data
        assert r.headers["X-Linked-Size"] == str(n) and "X-Xet-Hash" not in r.headers


def test_truncated_transfer_is_resumed_with_a_range(hub, folders, tmp_path):
    import huggingface_hub as hf
    from huggingface_hub import constants

    name = "model.safetensors"
    data = (folders["big"] / name).read_bytes()
    chunk = constants.DOWNLOAD_CHUNK_SIZE  # http_get keeps whole chunks only: resume from the last one received
    assert len(data) > chunk + (1 << 20)
    hub.fail("org/big", name, after_bytes=chunk + 12345)
    path = hf.hf_hub_download("org/big", name, local_dir=tmp_path)
    assert Path(path).read_bytes() == data
    gets = hub.gets(name)
    assert [(g.range, g.status, g.bytes, g.note) for g in gets] == [
        (None, 200, chunk + 12345, "dropped"),
        (f"bytes={chunk}-", 206, len(data) - chunk, ""),
    ]
    assert hub.download_order() == [name]


def test_drop_before_a_whole_chunk_restarts_and_small_chunks_resume(hub, folders, tmp_path):
    import huggingface_hub as hf

    name = "model-00001-of-00002.safetensors"
    data = (folders["sharded"] / name).read_bytes()
    hub.fail("org/sharded", name, after_bytes=1000)
    assert Path(hf.hf_hub_download("org/sharded", name, local_dir=tmp_path / "a")).read_bytes() == data
    assert [g.range for g in hub.gets(name)] == [None, None]  # nothing kept: downloaded again from byte 0
    hub.clear_log()
    with hub_env(hub, tmp_path / "hf2", download_chunk_size=256):
        hub.fail("org/sharded", name, after_bytes=1000)
        assert Path(hf.hf_hub_download("org/sharded", name, local_dir=tmp_path / "b")).read_bytes() == data
    assert [g.range for g in hub.gets(name)] == [None, "bytes=768-"]


def test_injected_errors(hub, folders, tmp_path):
    """huggingface_hub 2.4.0: a 500/503 on the GET fails hf_hub_download at once (http_get retries only 408/429);
    a 5xx on the HEAD is retried at once, then with backoff (1, 2, 4, 8, 8 s); a 429 after Retry-After + 1 s."""
    import huggingface_hub as hf
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    name = "model-00002-of-00002.safetensors"
    data = (folders["sharded"] / name).read_bytes()
    hub.fail("org/sharded", name, status=500)
    with pytest.raises(HfHubHTTPError) as err:
        hf.hf_hub_download("org/sharded", name, local_dir=tmp_path / "a")
    assert err.value.response.status_code == 500 and not (tmp_path / "a" / name).exists()
    assert [g.status for g in hub.gets(name)] == [500]
    assert Path(hf.hf_hub_download("org/sharded", name, local_dir=tmp_path / "a")).read_bytes() == data  # once only

    hub.clear_log()
    hub.fail("org/sharded", name, status=503, method="HEAD")
    assert Path(hf.hf_hub_download("org/sharded", name, local_dir=tmp_path / "b")).read_bytes() == data
    assert [h.status for h in hub.heads(name)] == [503, 200]
    with pytest.raises(LocalEntryNotFoundError):  # a 404 repo is an error, but not a LocalEntryNotFoundError
        hf.hf_hub_download("org/sharded", name, local_dir=tmp_path / "c", local_files_only=True)

    hub.clear_log()
    hub.fail("org/sharded", name, status=429, headers={"Retry-After": "0"})
    assert Path(hf.hf_hub_download("org/sharded", name, local_dir=tmp_path / "d")).read_bytes() == data
    assert [g.status for g in hub.gets(name)] == [429, 200]


def test_hold_stalls_a_transfer_until_released(hub, folders, tmp_path):
    import huggingface_hub as hf

    name = "model.safetensors"
    release = hub.hold("org/big", name, after_bytes=1 << 20)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(hf.hf_hub_download, "org/big", name, local_dir=tmp_path)
        deadline = time.monotonic() + 5
        while hub.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hub.in_flight == 1 and not (tmp_path / name).exists()
        release.set()
        assert Path(fut.result(timeout=30)).read_bytes() == (folders["big"] / name).read_bytes()
    assert [(g.note, g.bytes) for g in hub.gets(name)] == [("held", (folders["big"] / name).stat().st_size)]


def test_throttle_bounds_the_rate_across_connections(hub, folders, tmp_path):
    import huggingface_hub as hf

    rate = 16e6
    hub.rate_bytes_per_s = rate
    url = f"{hub.endpoint}/org/big/resolve/main/model.safetensors"

    def fetch(_):  # two concurrent 2 MB range reads share one bucket
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=0-1999999"})) as r:
            return len(r.read())

    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        got = sum(pool.map(fetch, range(2)))
    elapsed = time.monotonic() - t0
    assert got == 4_000_000 and got / elapsed <= 1.5 * rate
    hub.clear_log()
    t0 = time.monotonic()
    path = hf.hf_hub_download("org/big", "model.safetensors", local_dir=tmp_path)  # through the client too
    elapsed = time.monotonic() - t0
    assert Path(path).stat().st_size / elapsed <= 1.5 * rate
    (get,) = hub.gets()
    assert get.bytes / (get.t_end - get.t) <= 1.5 * rate


def test_stop_closes_everything(folders):
    server = HubServer({"org/single": {"main": folders["single"]}}).start()
    url = f"{server.endpoint}/org/single/resolve/main/config.json"
    with urllib.request.urlopen(url) as r:
        assert r.headers["X-Repo-Commit"] == server.commit("org/single") and r.headers["ETag"].startswith('"')
    release = server.hold("org/single", "config.json")
    outcome = []

    def held_get():
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                outcome.append(r.read())
        except Exception as e:  # the connection may be cut by stop(): either way it must not hang
            outcome.append(e)

    t = threading.Thread(target=held_get)
    t.start()
    deadline = time.monotonic() + 5
    while server.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.in_flight == 1
    server.stop()
    t.join(timeout=10)
    assert not t.is_alive() and outcome and release.is_set()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)
    with pytest.raises(ValueError):
        server.add_repo("no-slash", folders["single"])
