"""A Hub checkpoint merged with ``--stream``: what the repository holds (files, sizes, SHA-256s), its shard headers
read with range requests, its small files downloaded at once, and the gate the merge waits at for each shard.

Nothing here downloads a shard: the stream (``stream.py``) does, in the order the merge reads them, and tells the
gate when each is on disk (:meth:`ShardGate.ready`) and when it is gone again (:meth:`ShardGate.gone`). The
checkpoint itself is an ordinary :class:`~streammerge.checkpoint.Checkpoint` whose headers were read remotely: it
maps a shard when the gate lets it, and the engines read it as any other.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import AUX_FILES, INDEX_FILE, SINGLE_FILE, Checkpoint
from .errors import CheckpointError, DownloadError, HeaderError
from .format import MAX_HEADER_BYTES, Header, parse_header
from .hub import explained, parse_repo_spec

# get_safetensors_metadata's probe: most headers fit in the first 100 kB, so one range request reads them.
HEADER_PROBE = 100_000
# A LFS object id is the file's SHA-256.
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The folder, next to (not inside) the output directory, that streamed inputs go to by default.
SCRATCH_SUFFIX = ".streammerge-inputs"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Hub repository at a commit: its path in the repository, its size and (for an LFS file, as
    weights are) its SHA-256."""

    name: str
    size: int
    sha256: str | None


@dataclass
class ShardGate:
    """The shards of one streamed Hub checkpoint: where each lands, what it must be, and whether it is on disk.

    Readers (the engine's threads, through :meth:`Checkpoint.view`) call :meth:`wait`; the stream calls
    :meth:`ready`, :meth:`gone` and :meth:`fail`. Satisfies ``checkpoint.FileGate``.
    """

    repo_id: str
    commit: str
    label: str
    folder: Path  # this checkpoint's files: index, small files, and the shards while they are needed
    files: list[RemoteFile]  # the weight files, in the checkpoint's file order
    headers: list[bytes]  # each weight file's header bytes (8-byte length and JSON), as read remotely
    made: tuple[Path, ...] = ()  # folders created for the scratch, deepest first: removed on close once empty
    lock_fd: int | None = None  # the folder's lock (remote._lock), released on close
    waited_s: float = 0.0  # time readers spent waiting for shards
    _on_disk: list[bool] = field(default_factory=list)
    _failure: BaseException | None = None
    _closed: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self._on_disk = [False] * len(self.files)

    @property
    def source(self) -> str:
        return f"{self.repo_id}@{self.commit}"

    def path(self, i: int) -> Path:
        return self.folder / self.files[i].name

    def wait(self, i: int) -> None:
        """Return once shard ``i`` is complete on disk; raise the stream's failure if it never will be."""
        t0 = time.perf_counter()
        with self._cond:
            while not self._on_disk[i] and self._failure is None and not self._closed:
                self._cond.wait(1.0)
            self.waited_s += time.perf_counter() - t0
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise DownloadError(
                    f"{self.label} checkpoint: {self.source}: the stream stopped before "
                    f"{self.files[i].name} was downloaded"
                )

    def is_on_disk(self, i: int) -> bool:
        with self._cond:
            return self._on_disk[i]

    def ready(self, i: int) -> None:
        with self._cond:
            self._on_disk[i] = True
            self._cond.notify_all()

    def gone(self, i: int) -> None:
        with self._cond:
            self._on_disk[i] = False

    def fail(self, exc: BaseException) -> None:
        """Every reader waiting now or later gets ``exc`` (the first failure is kept)."""
        with self._cond:
            if self._failure is None:
                self._failure = exc
            self._cond.notify_all()

    def close(self) -> None:
        """Stop every wait and remove what was downloaded for this checkpoint (index, small files, shards, partial
        downloads)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.lock_fd is not None:
            _unlock(self.folder, self.lock_fd)
            self.lock_fd = None
        _remove_empty(self.made)  # only when empty: other checkpoints of the merge may still use them


def _remove_empty(folders) -> None:
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def _remove_dead_scratch(tmp: Path) -> None:
    """Temporary scratch folders of processes that are gone (killed before they could remove their own)."""
    for d in tmp.glob("streammerge-inputs-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, OSError):
            continue


def default_scratch(out_dir: str | os.PathLike | None, tag: str = "") -> Path:
    """Where streamed inputs go when ``--stream-dir`` is not given: a hidden folder beside the output directory
    (on the same disk, outside it: nothing in the output is ever an input), or a temporary folder without one.
    ``tag`` names one process of a merge in parts."""
    if out_dir is None:
        _remove_dead_scratch(Path(tempfile.gettempdir()))
        base = Path(tempfile.gettempdir()) / f"streammerge-inputs-{os.getpid()}"
    else:
        out = Path(os.path.abspath(out_dir))
        base = out.parent / f".{out.name}{SCRATCH_SUFFIX}"
    return base / tag if tag else base


def list_repo(spec: str, label: str = "") -> tuple[str, str, dict[str, RemoteFile]]:
    """``(repo_id, commit, files by name)`` of a Hub repository at the spec's revision (one ``model_info`` call;
    the commit pins every later request, so a push during the merge changes nothing)."""
    parsed = parse_repo_spec(spec)
    if parsed is None:
        raise CheckpointError(f"{spec}: not a Hub repository id (expected org/name or org/name@revision)")
    repo_id, revision = parsed
    from huggingface_hub import HfApi

    with explained(spec, label, revision):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    files: dict[str, RemoteFile] = {}
    for s in info.siblings or []:
        lfs = s.lfs
        sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        files[s.rfilename] = RemoteFile(s.rfilename, int(s.size or 0), sha if sha and _SHA256.match(sha) else None)
    if not info.sha:
        raise CheckpointError(f"{label + ' checkpoint: ' if label else ''}{spec}: the Hub gave no commit for it")
    return repo_id, info.sha, files


def read_remote_header(repo_id: str, commit: str, f: RemoteFile, label: str = "") -> tuple[Header, bytes]:
    """The header of one remote safetensors file, read with one or two range requests and validated as a local
    header is (against the file's size on the Hub)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, f.name, revision=commit)
    auth = build_hf_headers()
    with explained(f"{repo_id}@{commit}", label):
        r = get_session().get(url, headers={**auth, "Range": f"bytes=0-{max(1, min(HEADER_PROBE, f.size)) - 1}"})
        hf_raise_for_status(r)
        raw = bytes(r.content)
        if len(raw) >= 8:
            n = int.from_bytes(raw[:8], "little")
            if n <= MAX_HEADER_BYTES and 8 + n <= f.size and len(raw) < 8 + n:
                r = get_session().get(url, headers={**auth, "Range": f"bytes={len(raw)}-{8 + n - 1}"})
                hf_raise_for_status(r)
                raw += bytes(r.content)
            raw = raw[: 8 + n]
    who = f"{label} checkpoint: " if label else ""
    return parse_header(raw, f.size, f"{who}{repo_id}@{commit[:12]}/{f.name}"), raw


def _download_small(repo_id: str, commit: str, name: str, folder: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, name, revision=commit, local_dir=folder))


def open_streamed(
    spec: str,
    label: str,
    scratch: Path,
    workers: int = 4,
    made: list[Path] | tuple[Path, ...] = (),
    listing: tuple[str, str, dict[str, RemoteFile]] | None = None,
) -> Checkpoint:
    """A Hub checkpoint whose shards the stream downloads later into ``scratch``: headers read remotely, the index
    and small files (config, tokenizer) downloaded now. The returned checkpoint's ``gate`` is its
    :class:`ShardGate`; closing the checkpoint removes everything downloaded for it (and the folders in ``made``,
    deepest first, once empty: those the merge created for ``scratch``). ``listing``: :func:`list_repo`'s answer,
    when the caller already has it. A lock file beside the folder keeps two merges from streaming into one folder."""
    who = f"{label} checkpoint: " if label else ""
    repo_id, commit, files = listing if listing is not None else list_repo(spec, label)
    folder = scratch / f"{repo_id.replace('/', '--')}--{commit[:12]}"
    lock = _lock(folder, who)
    gate: ShardGate | None = None
    try:
        shutil.rmtree(folder, ignore_errors=True)  # what a killed run left (the lock says none is running): untrusted
        folder.mkdir(parents=True)
        source = f"{repo_id}@{commit}"
        if INDEX_FILE in files:
            index = _download_small_explained(spec, label, repo_id, commit, INDEX_FILE, folder)
            try:
                wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
                names = list(dict.fromkeys(wm.values()))
            except (ValueError, AttributeError, TypeError):
                names = []  # the Checkpoint below explains what is wrong with the index
        elif SINGLE_FILE in files:
            names = [SINGLE_FILE]
        else:
            raise CheckpointError(f"{who}{spec}: has no {SINGLE_FILE} or {INDEX_FILE} on the Hub")
        missing = [n for n in names if n not in files]
        if missing:
            raise CheckpointError(
                f"{who}{source}/{INDEX_FILE}: names {', '.join(missing[:5])}, which the repository does not hold"
            )
        for name in AUX_FILES:
            if name in files:
                _download_small_explained(spec, label, repo_id, commit, name, folder)
        weights = [files[n] for n in names]
        with ThreadPoolExecutor(max(1, min(workers, len(weights) or 1)), thread_name_prefix="sm-headers") as pool:
            read = list(pool.map(lambda f: read_remote_header(repo_id, commit, f, label), weights))
        gate = ShardGate(
            repo_id, commit, label, folder, weights, [raw for _, raw in read], made=tuple(made), lock_fd=lock
        )
        try:
            ck = Checkpoint(folder, label=label, headers={f.name: h for f, (h, _) in zip(weights, read)}, gate=gate)
        except HeaderError as e:
            raise CheckpointError(f"{who}{source}: {e}") from None
        ck.source = source
        ck.remote_identity = [
            {
                "file": f.name,
                "size": f.size,
                "header_sha256": hashlib.sha256(raw).hexdigest(),
                "hub": source,
                "sha256": f.sha256,
            }
            for f, raw in zip(weights, gate.headers)
        ]
        return ck
    except BaseException:
        if gate is not None:
            gate.close()
        else:
            shutil.rmtree(folder, ignore_errors=True)
            _unlock(folder, lock)
            _remove_empty(made)
        raise


def _lock(folder: Path, who: str) -> int:
    """An exclusive lock on ``folder``'s lock file (created with its parents), held until the checkpoint closes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.with_name(folder.name + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise CheckpointError(
            f"{who}{folder}: another streammerge merge is streaming into this folder; give each merge its own "
            "--stream-dir"
        ) from None
    return fd


def _unlock(folder: Path, fd: int) -> None:
    try:
        os.unlink(folder.with_name(folder.name + ".lock"))
    except OSError:
        pass
    os.close(fd)


def _download_small_explained(spec: str, label: str, repo_id: str, commit: str, name: str, folder: Path) -> Path:
    with explained(spec, label, commit):
        return _download_small(repo_id, commit, name, folder)


def verify_download(gate: ShardGate, i: int) -> None:
    """A downloaded shard must be what the Hub listed: its size, its header (the one the plan was made from) and,
    for an LFS file, its SHA-256. Raises `DownloadError` naming it."""
    f, path = gate.files[i], gate.path(i)
    where = f"{gate.label} checkpoint: {gate.source}/{f.name}"
    size = path.stat().st_size
    if size != f.size:
        raise DownloadError(f"{where}: downloaded {size} bytes, the Hub lists {f.size}")
    head = gate.headers[i]
    with open(path, "rb") as fh:
        if fh.read(len(head)) != head:
            raise DownloadError(f"{where}: the downloaded header differs from the one read before the merge began")
        if f.sha256 is not None:
            h = hashlib.sha256(head)
            while block := fh.read(8 * 2**20):
                h.update(block)
            if h.hexdigest() != f.sha256:
                raise DownloadError(f"{where}: SHA-256 {h.hexdigest()} differs from the Hub's {f.sha256}")
