"""A local Hugging Face Hub for tests and benchmarks: the real ``huggingface_hub`` client talks to it over HTTP.

Point the client at it with ``HF_ENDPOINT=http://127.0.0.1:PORT`` (see [`HubServer.env`]; in-process tests must
also patch the constants huggingface_hub read at import time, see ``tests/hub_fixtures.py``). Standard library only
(``http.server.ThreadingHTTPServer`` in a background thread); nothing here imports streammerge.

    with HubServer({"org/model": {"main": folder, "v2": other_folder}}, rate_bytes_per_s=50e6) as hub:
        env = hub.env(tmp_path / "hf")           # HF_ENDPOINT, HF_HOME, ... for a subprocess
        hub.fail("org/model", "model-00002-of-00003.safetensors", after_bytes=1 << 20)   # drop mid-transfer
        ...
        [r.range for r in hub.gets("model-00002-of-00003.safetensors")]   # [None, 'bytes=1048576-']

What it serves (model repositories only; what huggingface_hub 2.4.0 calls, checked against it in
tests/test_hub_server.py):

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}`` (``model_info``, ``repo_info``,
  ``snapshot_download``): id, sha, siblings (with ``size``, ``blobId`` and ``lfs`` when ``?blobs=true``,
  i.e. ``files_metadata=True``), ``safetensors`` parameter counts from the shard headers.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=`` (``list_repo_tree``, ``snapshot_download``): files
  with ``oid`` (git blob sha1), ``size`` and, for LFS files, ``lfs: {oid: sha256, size, pointerSize}``;
  directories. One page (no ``Link`` header).
- ``POST /api/models/{repo}/paths-info/{rev}`` (``get_paths_info``) and ``GET /api/models/{repo}/refs``
  (``list_repo_refs``: every revision name is a branch).
- ``HEAD`` and ``GET /{repo}/resolve/{rev}/{filename}`` (``hf_hub_download``, ``file_exists``,
  ``get_hf_file_metadata``, ``parse_safetensors_file_metadata``): ``X-Repo-Commit``, ``ETag``, ``Content-Length``,
  ``Accept-Ranges: bytes``; LFS files (``*.safetensors``, ``*.bin``, ... and anything >= 10 MiB) also carry
  ``X-Linked-Etag`` (their sha256, also their ``ETag``) and ``X-Linked-Size`` like the Hub, regular files a
  git-blob sha1 ``ETag``. ``Range: bytes=a-b`` / ``a-`` / ``-n`` gets ``206`` with ``Content-Range`` (an end past
  the file is clamped, as ``parse_safetensors_file_metadata``'s ``bytes=0-100000`` needs), an unsatisfiable one
  ``416``; several ranges in one header are not supported (answered 416). No redirects, no Xet headers: plain HTTP.
- 404s carry the ``X-Error-Code`` the client maps to errors: ``RepoNotFound`` -> ``RepositoryNotFoundError``,
  ``RevisionNotFound`` -> ``RevisionNotFoundError``, ``EntryNotFound`` (with ``X-Repo-Commit``) ->
  ``RemoteEntryNotFoundError``.

Revisions: ``add_repo(repo_id, folder, revision)`` snapshots a folder (every file under it, recursively, except
dot-folders such as ``.cache``/``.git``): sizes and hashes are taken then, the bytes are read from disk at each
request (so do not change the files while serving). Each revision gets a stable fake commit sha (sha1 of the
file list with blob ids), and requests may name the revision or that sha.

Failure injection, per file: [`HubServer.fail`] makes the next ``times`` GETs of a file drop the connection after
``after_bytes`` body bytes (a truncated transfer; huggingface_hub 2.4.0's ``http_get`` resumes it with a
``Range: bytes=N-`` request after sleeping 1 s, up to 5 times without progress) or answer a status (500/503: the
download fails at once, ``http_get`` retries only 408/429; 429 is retried with backoff, ``Retry-After`` honoured).
[`HubServer.hold`] stalls a transfer until the test releases it (keep it under the client's 10 s read timeout,
``HF_HUB_DOWNLOAD_TIMEOUT``, or the client times out and resumes).

Link simulation: ``rate_bytes_per_s`` is one token bucket shared by all connections (a link of that many
bytes/s; it paces resolve bodies only, API JSON is not throttled), ``latency_s`` is slept before every response.
Both can be changed while serving (``server.rate_bytes_per_s = ...``).

Observation: [`HubServer.requests`] is a log of [`Request`] (start time, method, path, Range header, status, body
bytes sent, and the repo/revision/file a resolve request named); helpers [`HubServer.gets`], [`HubServer.heads`],
[`HubServer.download_order`]; [`HubServer.bytes_served`]; [`HubServer.in_flight`] and
[`HubServer.peak_in_flight`] count resolve GETs being answered at once (download concurrency).
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

# Files the Hub stores in LFS in a typical model repo (its default .gitattributes), plus anything this big.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 1 << 20  # body write size when not throttled
_HASH_CHUNK = 8 << 20
_FAKE_DATE = "2026-01-01T00:00:00.000Z"


class Request(NamedTuple):
    """One answered request. The first six fields are (start, method, path, range, status, bytes)."""

    t: float  # time.monotonic() when the request line was read
    method: str
    path: str  # URL path, percent-decoded, without the query
    range: str | None  # the Range header as sent
    status: int
    bytes: int  # body bytes actually written (JSON bodies too; bytes_served counts resolve GETs only)
    repo_id: str | None = None
    revision: str | None = None  # as requested (a name or a sha)
    filename: str | None = None  # resolve requests only
    query: str = ""  # the raw query string ("recursive=True&expand=False")
    t_end: float = 0.0
    note: str = ""  # "dropped" (injected truncation), "injected", "held", "client gone"


@dataclass(frozen=True)
class FileEntry:
    path: str  # in the repo, with "/"
    local: Path
    size: int
    sha256: str
    blob_id: str  # git blob sha1 (of the LFS pointer for LFS files)
    lfs: bool
    pointer_size: int = 0

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Snapshot:
    commit: str
    files: dict[str, FileEntry]
    parameters: dict[str, int] = field(default_factory=dict)  # safetensors dtype -> element count


@dataclass
class _Rule:
    method: str
    after_bytes: int
    times: int | None  # None: every time
    status: int | None = None
    headers: dict[str, str] | None = None
    event: threading.Event | None = None  # hold(): wait for it after after_bytes


_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def _sha256_file(path: Path, size: int, content_hash: str) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if content_hash == "stat":  # a stand-in for huge benchmark files: stable while the file is unchanged
        return hashlib.sha256(repr(key).encode()).hexdigest()
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    with _hash_lock:
        _hash_cache[key] = h.hexdigest()
    return h.hexdigest()


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _safetensors_parameters(path: Path) -> dict[str, int] | None:
    """Element count per dtype from a safetensors header, or None when the file is not one."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    out: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        count = 1
        for d in info.get("shape", []):
            count *= int(d)
        out[info.get("dtype", "?")] = out.get(info.get("dtype", "?"), 0) + count
    return out


def snapshot_folder(folder: Path, content_hash: str = "sha256") -> Snapshot:
    """Hash the files of ``folder`` (recursively, skipping dot-folders) into a revision with a derived commit sha."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"hub_server: {folder} is not a folder")
    files: dict[str, FileEntry] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts[:-1]):
            continue
        size = p.stat().st_size
        lfs = p.suffix in LFS_SUFFIXES or size >= LFS_MIN_SIZE
        sha = _sha256_file(p, size, content_hash)
        if lfs:
            pointer = _lfs_pointer(sha, size)
            entry = FileEntry(rel.as_posix(), p, size, sha, _git_blob_sha1(pointer), True, len(pointer))
        else:
            entry = FileEntry(rel.as_posix(), p, size, sha, _git_blob_sha1(p.read_bytes()), False)
        files[entry.path] = entry
    listing = "".join(f"{e.path}\0{e.blob_id}\n" for e in files.values())
    commit = hashlib.sha1(b"streammerge-hub-server\n" + listing.encode()).hexdigest()
    params: dict[str, int] = {}
    for e in files.values():
        if e.path.endswith(".safetensors"):
            for dtype, n in (_safetensors_parameters(e.local) or {}).items():
                params[dtype] = params.get(dtype, 0) + n
    return Snapshot(commit, files, params)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single ``bytes=`` range, clamped to the file; None if unsatisfiable/unsupported."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":  # suffix: the last N bytes
            n = int(last)
            if n <= 0 or size == 0:
                return None
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or start >= size or end < start:
        return None
    return start, min(end, size - 1)


class _Throttle:
    """A token bucket shared by every connection: ``rate`` bytes/s with a burst of ``burst`` bytes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tat = 0.0  # theoretical arrival time of the next byte (GCRA)

    def take(self, n: int, rate: float, burst: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._tat)
            self._tat = start + n / rate
            wait = self._tat - now - burst / rate
        if wait > 0:
            time.sleep(wait)


class HubServer:
    """A Hugging Face Hub on 127.0.0.1 serving local folders as model repos; see the module docstring.

    ``repos``: ``{repo_id: {revision: folder}}``; ``port=0`` picks a free port; ``content_hash="stat"`` skips
    hashing file contents (a fake sha256 from path, size and mtime: for multi-GB benchmark inputs; ETags are then
    not the files' sha256, which huggingface_hub does not check on download).
    """

    def __init__(
        self,
        repos: dict[str, dict[str, Path | str]] | None = None,
        *,
        rate_bytes_per_s: float | None = None,
        latency_s: float = 0.0,
        port: int = 0,
        content_hash: str = "sha256",
    ) -> None:
        if content_hash not in ("sha256", "stat"):
            raise ValueError(f"content_hash must be 'sha256' or 'stat', not {content_hash!r}")
        self.rate_bytes_per_s = rate_bytes_per_s
        self.latency_s = latency_s
        self.content_hash = content_hash
        self._port = port
        self._lock = threading.Lock()
        self._repos: dict[str, dict[str, str]] = {}  # repo -> revision name -> commit
        self._commits: dict[str, dict[str, Snapshot]] = {}  # repo -> commit -> snapshot
        self._rules: dict[tuple[str, str], deque[_Rule]] = {}
        self._holds: list[threading.Event] = []  # every hold() event not yet released by clear_failures()
        self._log: list[Request] = []
        self._bytes_served = 0
        self._in_flight = 0
        self._peak_in_flight = 0
        self._throttle = _Throttle()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        for repo_id, revisions in (repos or {}).items():
            for revision, folder in revisions.items():
                self.add_repo(repo_id, folder, revision)

    # -- repositories ---------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: Path | str, revision: str = "main") -> str:
        """Serve ``folder`` as ``repo_id`` at ``revision`` (a branch/tag name); returns its commit sha."""
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"hub_server: repo id must be 'org/name', not {repo_id!r}")
        snap = snapshot_folder(Path(folder), self.content_hash)
        with self._lock:
            self._repos.setdefault(repo_id, {})[revision] = snap.commit
            self._commits.setdefault(repo_id, {})[snap.commit] = snap
        return snap.commit

    def commit(self, repo_id: str, revision: str = "main") -> str:
        """The commit sha ``revision`` of ``repo_id`` resolves to."""
        return self._resolve(repo_id, revision).commit

    def files(self, repo_id: str, revision: str = "main") -> dict[str, FileEntry]:
        """The files served for that revision, by repo path (size, sha256, blob_id, lfs, local path)."""
        return dict(self._resolve(repo_id, revision).files)

    def _resolve(self, repo_id: str, revision: str) -> Snapshot:
        with self._lock:
            refs = self._repos.get(repo_id)
            if refs is None:
                raise KeyError(repo_id)
            commit = refs.get(revision, revision)
            snap = self._commits[repo_id].get(commit)
        if snap is None:
            raise LookupError(revision)
        return snap

    # -- failure injection ------------------------------------------------------------------------------------------

    def fail(
        self,
        repo_id: str,
        filename: str,
        *,
        after_bytes: int = 0,
        times: int | None = 1,
        status: int | None = None,
        method: str = "GET",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Make the next ``times`` (``None``: every) ``method`` requests of a file fail.

        ``status=None``: send the headers of a normal answer (full ``Content-Length``) and ``after_bytes`` of the
        body, then drop the connection (counted from the start of that response's body, Range or not).
        ``status=500`` (503, 429, ...): answer that status with an empty JSON error body and ``headers``
        (e.g. ``{"Retry-After": "0"}`` for 429). ``method`` is ``"GET"``, ``"HEAD"`` or ``"*"``. Rules for one file
        queue up in the order given.
        """
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        rule = _Rule(method.upper(), after_bytes, times, status, dict(headers or {}))
        with self._lock:
            self._rules.setdefault((repo_id, filename), deque()).append(rule)

    def hold(self, repo_id: str, filename: str, *, after_bytes: int = 0, times: int | None = 1) -> threading.Event:
        """Stall the next ``times`` GETs of a file after ``after_bytes`` body bytes until the returned event is set."""
        event = threading.Event()
        rule = _Rule("GET", after_bytes, times, event=event)
        with self._lock:
            self._rules.setdefault((repo_id, filename), deque()).append(rule)
            self._holds.append(event)
        return event

    def clear_failures(self) -> None:
        """Forget every pending fail()/hold() rule and release every held transfer."""
        with self._lock:
            self._rules.clear()
            holds, self._holds = self._holds, []
        for event in holds:
            event.set()

    def _take_rule(self, repo_id: str, filename: str, method: str) -> _Rule | None:
        with self._lock:
            q = self._rules.get((repo_id, filename))
            if not q:
                return None
            rule = q[0]
            if rule.method not in (method, "*"):
                return None
            if rule.times is not None:
                rule.times -= 1
                if rule.times == 0:
                    q.popleft()
            return rule

    # -- observation ------------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        """A copy of the request log, in order of completion."""
        with self._lock:
            return list(self._log)

    def gets(self, filename: str | None = None, repo_id: str | None = None) -> list[Request]:
        """Resolve GETs (of ``filename``/``repo_id`` when given), in order of start."""
        return self._resolve_requests("GET", filename, repo_id)

    def heads(self, filename: str | None = None, repo_id: str | None = None) -> list[Request]:
        """Resolve HEADs (of ``filename``/``repo_id`` when given), in order of start."""
        return self._resolve_requests("HEAD", filename, repo_id)

    def _resolve_requests(self, method: str, filename: str | None, repo_id: str | None) -> list[Request]:
        out = [
            r
            for r in self.requests
            if r.method == method
            and r.filename is not None
            and (filename is None or r.filename == filename)
            and (repo_id is None or r.repo_id == repo_id)
        ]
        return sorted(out, key=lambda r: r.t)

    def download_order(self, repo_id: str | None = None, *, full_only: bool = True) -> list[str]:
        """Filenames in the order their first GET started (``full_only``: GETs without a Range header)."""
        seen: dict[str, None] = {}
        for r in self.gets(repo_id=repo_id):
            if (r.range is None or not full_only) and r.filename not in seen:
                seen[r.filename] = None
        return list(seen)

    def clear_log(self) -> None:
        """Empty the request log and reset bytes_served and peak_in_flight."""
        with self._lock:
            self._log.clear()
            self._bytes_served = 0
            self._peak_in_flight = self._in_flight

    @property
    def bytes_served(self) -> int:
        """Body bytes of resolve GETs written so far (all files, truncated transfers included)."""
        with self._lock:
            return self._bytes_served

    @property
    def in_flight(self) -> int:
        """Resolve GETs being answered right now."""
        with self._lock:
            return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        """The most resolve GETs answered at once since start (or clear_log)."""
        with self._lock:
            return self._peak_in_flight

    # -- lifecycle --------------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` (the server must be started)."""
        if self._httpd is None:
            raise RuntimeError("hub_server: not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def env(self, hf_home: Path | str) -> dict[str, str]:
        """Environment variables that point a huggingface_hub process at this server, caching under ``hf_home``.

        Set these for a subprocess (``{**os.environ, **server.env(home)}``). An already-imported huggingface_hub
        read them at import: in-process tests also need ``tests/hub_fixtures.py``'s ``hub_env``.
        """
        home = Path(hf_home)
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
            "HF_HUB_DISABLE_XET": "1",
        }

    def start(self) -> HubServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = ThreadingHTTPServer(("127.0.0.1", self._port), _Handler)
        httpd.daemon_threads = True
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: close the listening socket and every open connection, release held transfers."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        self.clear_failures()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _HubError(Exception):
    def __init__(
        self, status: int, code: str | None, message: str, commit: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit
        self.headers = headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    server_version = "streammerge-hub-server"
    timeout = 60  # an idle keep-alive connection is closed after this
    # TCP_NODELAY: with Nagle's algorithm a small response on a kept-alive connection waits for the client's delayed
    # ACK (~40 ms a request here; 1 ms without)
    disable_nagle_algorithm = True

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.hub._lock:
                self.hub._conns.discard(self.connection)

    def log_message(self, format, *args) -> None:
        pass  # the request log is HubServer.requests

    # -- dispatch -------------------------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._t0 = time.monotonic()
        self._record = {"repo_id": None, "revision": None, "filename": None, "note": ""}
        self._status, self._sent = 0, 0
        url = urlsplit(self.path)
        self._raw_path, self._raw_query, self._query = url.path, url.query, parse_qs(url.query)
        body = b""
        if method == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub = self.hub
        if hub.latency_s:
            time.sleep(hub.latency_s)
        try:
            if self._raw_path.startswith("/api/models/"):
                self._api(method, self._raw_path[len("/api/models/") :], body)
            elif "/resolve/" in self._raw_path and method in ("GET", "HEAD"):
                self._resolve_file(method)
            else:
                raise _HubError(404, None, f"no such endpoint: {method} {unquote(self._raw_path)}")
        except _HubError as e:
            if self._status:  # headers already sent: all that can be done is to cut the body short
                self._record["note"] = e.message
                self.close_connection = True
            else:
                self._error(method, e)
        except (BrokenPipeError, ConnectionResetError):
            self._record["note"] = self._record["note"] or "client gone"
            self.close_connection = True
        finally:
            self._log(method)

    def _log(self, method: str) -> None:
        hub = self.hub
        req = Request(
            self._t0,
            method,
            unquote(self._raw_path),
            self.headers.get("Range"),
            self._status,
            self._sent,
            query=self._raw_query,
            t_end=time.monotonic(),
            **self._record,
        )
        with hub._lock:
            hub._log.append(req)

    # -- responses --------------------------------------------------------------------------------------------------

    def _headers(self, status: int, headers: dict[str, str]) -> None:
        self._status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _json(self, method: str, obj, status: int = 200, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        base = {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(data))}
        self._headers(status, {**base, **(headers or {})})
        if method != "HEAD":
            self.wfile.write(data)
            self._sent = len(data)

    def _error(self, method: str, e: _HubError) -> None:
        headers = {"X-Error-Message": e.message, **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        if e.commit:
            headers["X-Repo-Commit"] = e.commit
        self._json(method, {"error": e.message}, e.status, headers)

    def _snapshot(self, repo_id: str, revision: str) -> Snapshot:
        self._record["repo_id"], self._record["revision"] = repo_id, revision
        try:
            return self.hub._resolve(repo_id, revision)
        except KeyError:
            raise _HubError(404, "RepoNotFound", "Repository not found") from None
        except LookupError:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}") from None

    # -- /api/models/... --------------------------------------------------------------------------------------------

    def _api(self, method: str, rest: str, body: bytes) -> None:
        segs = rest.split("/")
        if len(segs) < 2:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        repo_id = unquote(segs[0]) + "/" + unquote(segs[1])
        tail = segs[2:]
        if method == "GET" and not tail:
            return self._model_info(method, self._snapshot(repo_id, "main"), repo_id)
        kind = tail[0]
        if method == "GET" and kind == "revision" and len(tail) == 2:
            return self._model_info(method, self._snapshot(repo_id, unquote(tail[1])), repo_id)
        if method == "GET" and kind == "tree" and len(tail) >= 2:
            snap = self._snapshot(repo_id, unquote(tail[1]))
            return self._tree(method, snap, unquote("/".join(tail[2:])).strip("/"))
        if method == "POST" and kind == "paths-info" and len(tail) == 2:
            snap = self._snapshot(repo_id, unquote(tail[1]))
            form = parse_qs(body.decode())
            paths = [p.strip("/") for p in form.get("paths", [])]
            return self._json(method, [e for e in self._entries(snap) if e["path"] in paths])
        if method == "GET" and kind == "refs" and len(tail) == 1:
            self._record["repo_id"] = repo_id
            with self.hub._lock:
                refs = dict(self.hub._repos.get(repo_id) or {})
            if not refs:
                raise _HubError(404, "RepoNotFound", "Repository not found")
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in sorted(refs.items())]
            return self._json(method, {"branches": branches, "tags": [], "converts": []})
        raise _HubError(404, None, f"no such endpoint: {method} /api/models/{unquote(rest)}")

    def _model_info(self, method: str, snap: Snapshot, repo_id: str) -> None:
        blobs = self._query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for e in snap.files.values():
            s: dict = {"rfilename": e.path}
            if blobs:
                s["size"] = e.size
                s["blobId"] = e.blob_id
                if e.lfs:
                    s["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
            siblings.append(s)
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": snap.commit,
            "lastModified": _FAKE_DATE,
            "createdAt": _FAKE_DATE,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["safetensors"] if snap.parameters else [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in snap.files.values()),
        }
        if snap.parameters:
            info["safetensors"] = {"parameters": snap.parameters, "total": sum(snap.parameters.values())}
        self._json(method, info)

    @staticmethod
    def _entries(snap: Snapshot) -> list[dict]:
        """Tree entries (files and directories) of a whole revision, as the Hub's tree API spells them."""
        out: list[dict] = []
        dirs: set[str] = set()
        for e in snap.files.values():
            parts = e.path.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            entry: dict = {"type": "file", "oid": e.blob_id, "size": e.size, "path": e.path}
            if e.lfs:
                entry["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
            out.append(entry)
        for d in dirs:
            oid = hashlib.sha1(f"{snap.commit}:{d}".encode()).hexdigest()
            out.append({"type": "directory", "oid": oid, "size": 0, "path": d})
        return sorted(out, key=lambda x: (x["type"] != "directory", x["path"]))

    def _tree(self, method: str, snap: Snapshot, path: str) -> None:
        recursive = self._query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = self._entries(snap)
        if path:
            if not any(e["type"] == "directory" and e["path"] == path for e in entries):
                raise _HubError(404, "EntryNotFound", f"{path} does not exist on {snap.commit}", snap.commit)
            entries = [e for e in entries if e["path"].startswith(path + "/")]
            prefix = path + "/"
        else:
            prefix = ""
        if not recursive:
            entries = [e for e in entries if "/" not in e["path"][len(prefix) :]]
        self._json(method, entries)

    # -- /{repo}/resolve/{rev}/{filename} ---------------------------------------------------------------------------

    def _resolve_file(self, method: str) -> None:
        repo_part, _, rest = self._raw_path.lstrip("/").partition("/resolve/")
        revision, _, file_part = rest.partition("/")
        repo_id, revision, filename = unquote(repo_part), unquote(revision), unquote(file_part)
        self._record["filename"] = filename
        if repo_id.startswith(("datasets/", "spaces/")):
            raise _HubError(404, "RepoNotFound", "Repository not found")
        snap = self._snapshot(repo_id, revision)
        entry = snap.files.get(filename)
        if entry is None:
            raise _HubError(404, "EntryNotFound", "Entry not found", snap.commit)
        hub = self.hub
        rule = hub._take_rule(repo_id, filename, method)
        headers = {
            "X-Repo-Commit": snap.commit,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(Path(filename).name)}",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        if rule is not None and rule.status is not None:
            self._record["note"] = "injected"
            err = {"X-Error-Message": f"injected {rule.status}", **(rule.headers or {})}
            return self._json(method, {"error": f"injected {rule.status}"}, rule.status, err)
        start, end, status = 0, entry.size - 1, 200
        range_header = self.headers.get("Range")
        if range_header is not None:
            r = _parse_range(range_header, entry.size)
            if r is None:
                msg = f"Range Not Satisfiable: {range_header} of {entry.size} bytes"
                raise _HubError(416, None, msg, snap.commit, {"Content-Range": f"bytes */{entry.size}"})
            start, end, status = r[0], r[1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = end - start + 1
        headers["Content-Length"] = str(length)
        self._headers(status, headers)
        if method == "HEAD" or length <= 0:
            return
        with hub._lock:
            hub._in_flight += 1
            hub._peak_in_flight = max(hub._peak_in_flight, hub._in_flight)
        try:
            self._send_file(entry, start, length, rule)
        finally:
            with hub._lock:
                hub._in_flight -= 1

    def _send_file(self, entry: FileEntry, start: int, length: int, rule: _Rule | None) -> None:
        hub = self.hub
        stop_at = length if rule is None else min(rule.after_bytes, length)
        with entry.local.open("rb") as f:
            f.seek(start)
            while self._sent < length:
                if self._sent == stop_at and rule is not None:
                    if rule.event is None:  # injected truncation: drop the connection mid-body
                        self._record["note"] = "dropped"
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self._record["note"] = "held"
                    while not rule.event.wait(0.05) and not hub._stopping.is_set():
                        pass
                    stop_at = length
                rate = hub.rate_bytes_per_s
                chunk = CHUNK if not rate else int(min(CHUNK, max(4096, rate / 20)))
                n = min(chunk, length - self._sent, stop_at - self._sent)
                data = f.read(n)
                if not data:
                    raise _HubError(500, None, f"{entry.local} shrank while being served")
                if rate:
                    hub._throttle.take(len(data), rate, chunk)
                self.wfile.write(data)
                self._sent += len(data)
                with hub._lock:
                    hub._bytes_served += len(data)
