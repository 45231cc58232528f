"""The streaming writer: every output file is created at its final size under a temporary name, filled at final
offsets, synced and renamed; small files are written atomically; the index comes last.

After any crash, every file with a final name is complete and correct, and the index exists only when every shard
it names does. Temporary files are hidden (``.NAME.partial``) and removed on any error or interrupt. A manifest
(``.streammerge.json``) records the merge's fingerprint (inputs, options, layout) and the SHA-256 of every finished
shard, so ``--resume`` keeps verified shards and redoes the rest.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .checkpoint import INDEX_FILE
from .errors import OutputError
from .faults import crash_point
from .plan import MergePlan

MANIFEST = ".streammerge.json"
# A merge split across processes (parts.py): what every part writes besides its own record, for finalize.
PLAN_RECORD = ".streammerge.plan.json"
SMALL_PREFIX = ".streammerge.small."
PARTIAL_SUFFIX = ".partial"
STATE_IN_PROGRESS = "in-progress"
STATE_COMPLETE = "complete"
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_HASH_READ = 8 * 2**20


class Sink(Protocol):
    """Where an engine sends output bytes: :class:`OutputWriter` (disk), :class:`NullWriter` (discard, optionally
    hashing) and :class:`SweepWriter` (one writer per output of a sweep). Engines use only these members.

    Chunks arrive at their final offsets. ``write(..., hashed=True)`` says the caller feeds the same bytes to
    :meth:`digest` itself; without it the sink hashes them itself.

    Threads: ``write`` may be called from several threads at once, for any files, in any order (the engines write on
    a pool, engines/output.py). ``digest`` calls for one file come in offset order and never overlap each other
    (one hash stream per file); different files' digests may run at once. ``finish_file`` is called for one file
    at a time, after every write and digest of that file returned.
    """

    done_files: set[int]  # files already complete (resume): no work for them
    notes: list[str]

    def write(self, file: int, offset: int, data, out: int | None = None, *, hashed: bool = False) -> None: ...

    def digest(self, file: int, offset: int, data, out: int | None = None) -> None: ...

    def finish_file(self, file: int) -> None: ...


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """SHA-256 of a file, read in 8 MiB blocks (hashlib releases the GIL on large buffers); ``on_bytes(n)`` after
    each block, for progress."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_HASH_READ):
            h.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return h.hexdigest()


def read_manifest(out_dir: Path) -> dict | None:
    p = out_dir / MANIFEST
    if not p.exists():
        return None
    if p.is_symlink() or not p.is_file():
        raise OutputError(f"{p}: manifest is not a regular file; refusing to use this directory")
    try:
        m = json.loads(p.read_text())
        if not isinstance(m, dict) or not isinstance(m.get("shards", {}), dict):
            raise ValueError
        return m
    except (OSError, ValueError):
        raise OutputError(f"{p}: unreadable streammerge manifest; remove the output directory and start over") from None


def _recorded_names(previous: dict) -> list[str]:
    """The plain file names a previous streammerge run recorded in its manifest (never a path elsewhere)."""
    names = [INDEX_FILE, *previous.get("files", []), *previous.get("shards", {}), MANIFEST]
    return [n for n in names if isinstance(n, str) and "/" not in n and "\\" not in n and n not in ("", ".", "..")]


def _remove_recorded(out_dir: Path, previous: dict) -> None:
    """Remove only what a previous streammerge run recorded in its manifest, index first so nothing looks complete,
    the manifest last."""
    for name in _recorded_names(previous):
        try:
            (out_dir / name).unlink()
        except FileNotFoundError:
            pass


def remove_output(out_dir: Path, previous: dict) -> str | None:
    """Delete a finished streammerge output directory that nothing is writing and that holds nothing else: the files
    its manifest (``previous``) records, its temporaries, then the directory. Returns why it was left untouched, or
    None.

    For ``--overwrite`` on a sweep: outputs of an earlier sweep's other alphas would otherwise stay beside the new
    ones and look like part of it. A directory that also holds a file streammerge did not write (an evaluation
    result, say) is left whole."""
    if out_dir.is_symlink() or not out_dir.is_dir():
        return f"{out_dir}: not a directory (a symlink or file), left alone"
    try:
        fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        return f"{out_dir}: cannot open ({e.strerror or e})"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return f"{out_dir}: another streammerge process is writing it"
        ours = set(_recorded_names(previous))
        foreign = [
            p.name
            for p in out_dir.iterdir()
            if p.name not in ours and not (p.name.startswith(".") and p.name.endswith(PARTIAL_SUFFIX))
        ]
        if foreign:
            return f"{out_dir}: kept whole, it holds {len(foreign)} file(s) streammerge did not write ({foreign[0]})"
        _remove_recorded(out_dir, previous)
        for p in out_dir.iterdir():
            p.unlink()  # only temporaries are left
        out_dir.rmdir()
        return None
    except OSError as e:
        return f"{out_dir}: could not remove ({e.strerror or e})"
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Share:
    """This writer's share of a merge split across processes (the caller decides the split; parts.py).

    Attributes:
        files (`frozenset[int]`): the plan's files this process writes; the others are another process's.
        record (`str`): the hidden file this process records its shards in, instead of the manifest.
        recorded (`dict[str, dict]`): shards that any process of the same merge recorded earlier (name -> size,
            sha256): with ``resume``, this process keeps those of its files that still match.
        extra (`dict`): fields added to its record (which part, the assignment).
        plan_record (`bytes`): written as ``PLAN_RECORD`` when this process finishes: the same bytes from every part.
        check (*optional*): called once this process's record is written, before any data: raises if another
            merge's parts write the same directory (each checks after announcing itself, so of two that start
            together at least one sees the other).
    """

    files: frozenset[int]
    record: str
    recorded: dict[str, dict] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    plan_record: bytes = b""
    check: Callable[[], None] | None = None
    exclusive: bool = False  # hold the directory alone (one process finishing a merge begun in parts)


def write_small_file(out_dir: Path, name: str, data: bytes, tag: str = "") -> None:
    """Write a small file atomically: a hidden temporary, fsync, rename. Raises OSError (an interrupt included, the
    temporary is removed first). ``tag`` makes the temporary this writer's own, where several processes write the
    same file (the parts of one merge write identical copies)."""
    tmp = out_dir / f".{name}{'.' + tag if tag else ''}{PARTIAL_SUFFIX}"
    tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, _OPEN_NEW, 0o644)
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out_dir / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class OutputWriter:
    """Writes one merge's output directory. Use as a context manager: leaving it with an exception aborts.

    Args:
        out_dir (`Path`): the output directory (created if missing; must be empty, or a previous streammerge output
            with ``overwrite=True``, or an interrupted one with ``resume=True``).
        plan (`MergePlan`): the exact layout to write.
        manifest (`dict`): the identity of this merge (``fingerprint`` plus descriptive fields), recorded in the
            manifest and compared on resume.
        resume (`bool`): keep shards an interrupted run with the same fingerprint finished (after re-hashing them).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        plan: MergePlan,
        manifest: dict | None = None,
        resume: bool = False,
        before_publish: Callable[[], None] | None = None,
        share: Share | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.share = share
        self.before_publish = before_publish  # raises to stop an output file getting its final name
        self.plan = plan
        self.manifest = dict(manifest or {})
        self.manifest.setdefault("fingerprint", "")
        self.resume = resume
        n = len(plan.files)
        self._fds: list[int | None] = [None] * n
        self._temps: list[Path] = [self.out_dir / f".{f.name}{PARTIAL_SUFFIX}" for f in plan.files]
        self._hash = [hashlib.sha256() for _ in range(n)]
        self._cursor = [0] * n
        self._sequential = [True] * n
        self._dir_fd: int | None = None
        self.shards: dict[str, dict] = {}  # finished: name -> {"size", "sha256"}
        self.adopted: set[int] = set()  # finished before this run started (resume)
        # another process's files (a merge in parts): never created, written or recorded here
        self._others: frozenset[int] = frozenset(range(n)) - share.files if share is not None else frozenset()
        self.notes: list[str] = []
        self.bytes_written = 0
        self._count_lock = threading.Lock()  # bytes_written: writes come from several threads
        self._created: set[int] = set()  # temporaries this run created (the only ones abort removes)
        self._record_is_ours = False  # this run created its part record

    @property
    def done_files(self) -> set[int]:
        """Files with no work in this process: finished earlier (resume), or another part's."""
        return self.adopted | self._others

    # ------------------------------------------------------------------ setup
    def _check_path(self) -> None:
        out = self.out_dir
        if out.is_symlink():
            raise OutputError(f"{out}: output path is a symlink; give a real directory path")
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: exists and is not a directory")

    def open(self) -> None:
        out = self.out_dir
        self._check_path()
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise OutputError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
        # The parts of one merge share the directory (each writes only its own files); a single-process merge, or
        # finalize, holds it alone.
        try:
            shared = self.share is not None and not self.share.exclusive
            fcntl.flock(self._dir_fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            os.close(self._dir_fd)
            self._dir_fd = None
            raise OutputError(f"{out}: another streammerge process is writing this directory; wait for it") from None
        try:
            previous = read_manifest(out)
            if self.share is not None:
                self._open_share(previous)
            elif self.resume and previous is not None:
                self._adopt(previous)
            else:
                self._clear_previous(previous)
            self._write_manifest(STATE_IN_PROGRESS)
            if self.share is not None and self.share.check is not None:
                self.share.check()
            for i, f in enumerate(self.plan.files):
                if i not in self.done_files:
                    self._create(i, f.name, f.header, f.size)
        except BaseException:
            self.abort()
            self.close()
            raise

    def _open_share(self, previous: dict | None) -> None:
        """A part of a merge in parts: the directory may hold only this merge's files and records (other parts write
        beside this one); this part's stale temporaries go, and with ``resume`` its recorded files are kept once
        their SHA-256 is re-verified."""
        out, fp, share = self.out_dir, self.manifest["fingerprint"], self.share
        assert share is not None
        if previous is not None and (previous.get("fingerprint") != fp or previous.get("state") == STATE_COMPLETE):
            raise OutputError(
                f"{out}: holds a streammerge output"
                + (" (finished)" if previous.get("state") == STATE_COMPLETE else " of another merge")
                + "; a merge in parts never replaces one: choose a new directory, or remove this one"
            )
        names = {f.name for f in self.plan.files}
        mine = {f".{n}{PARTIAL_SUFFIX}" for n in names}
        ours = names | mine
        # other parts' records and their atomic-write temporaries (``..streammerge.*.partial``) are this merge's too
        foreign = sorted(
            p.name for p in out.iterdir() if p.name not in ours and not p.name.lstrip(".").startswith("streammerge.")
        )
        if foreign:
            raise OutputError(
                f"{out}: output directory holds {len(foreign)} entries that are not this merge's ({foreign[0]}); "
                "choose a new directory"
            )
        for i in sorted(share.files):
            f = self.plan.files[i]
            self._remove_stale_temp(i)
            path, rec = out / f.name, share.recorded.get(f.name)
            if path.is_symlink():
                path.unlink()  # never follow a link planted where a shard belongs
                continue
            if not path.exists():
                continue
            if not self.resume:
                raise OutputError(
                    f"{out}: {f.name} was already written by an earlier run of this merge; pass --resume to keep it "
                    "(it is re-verified first), or choose a new directory"
                )
            if rec and path.is_file() and path.stat().st_size == f.size == rec.get("size"):
                if sha256_file(path) == rec.get("sha256"):
                    self.adopted.add(i)
                    self.shards[f.name] = {"size": f.size, "sha256": rec["sha256"]}
                    continue
            self.notes.append(f"resume: {f.name} did not match a recorded checksum and is redone")
            path.unlink()
        if self.adopted:
            self.notes.append(f"resume: kept {len(self.adopted)} verified shard(s) of this part")

    def _remove_stale_temp(self, i: int) -> None:
        """Remove file ``i``'s temporary left by a crashed run; refuse if a live process still writes it (every
        writer holds an exclusive flock on its open temporaries: a rerun of the same part, or an overlapping split,
        must never delete or adopt another process's half-written file)."""
        tmp = self._temps[i]
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(
                f"{self.out_dir}: another process is writing {self.plan.files[i].name} (a part running twice, or "
                "overlapping splits); wait for it, then run again with --resume"
            ) from None
        finally:
            os.close(fd)
        tmp.unlink(missing_ok=True)

    def _stale_partials(self) -> list[Path]:
        return [p for p in self.out_dir.iterdir() if p.name.startswith(".") and p.name.endswith(PARTIAL_SUFFIX)]

    def preflight(self) -> None:
        """Raise what :meth:`open` would refuse, touching nothing: a sweep checks every output before it opens any."""
        out = self.out_dir
        self._check_path()
        if not out.is_dir():
            return
        previous = read_manifest(out)
        if self.resume and previous is not None:
            self._check_same_merge(previous)
            return
        partials = self._stale_partials()
        self._check_may_clear(previous, [p for p in out.iterdir() if p not in partials])

    def _check_may_clear(self, previous: dict | None, rest: list[Path]) -> None:
        if rest:
            interrupted = previous is not None and previous.get("state") != STATE_COMPLETE
            if not self.plan.options.overwrite:
                if interrupted:
                    raise OutputError(
                        f"{self.out_dir}: holds an interrupted streammerge merge; pass --resume to continue it "
                        "(same inputs and options), or --overwrite to start over"
                    )
                raise OutputError(
                    f"{self.out_dir}: output directory is not empty ({len(rest)} entries); choose a new directory"
                    + (", or pass --overwrite to replace the previous streammerge output" if previous else "")
                )
            if previous is None:
                raise OutputError(
                    f"{self.out_dir}: not a streammerge output (no {MANIFEST}); refusing to overwrite it. "
                    "Choose a new or empty directory"
                )

    def _clear_previous(self, previous: dict | None) -> None:
        partials = self._stale_partials()
        rest = [p for p in self.out_dir.iterdir() if p not in partials]
        self._check_may_clear(previous, rest)
        if rest and previous is not None:
            _remove_recorded(self.out_dir, previous)
        for p in partials:
            p.unlink(missing_ok=True)

    def _check_same_merge(self, previous: dict) -> None:
        if previous.get("fingerprint") != self.manifest["fingerprint"]:
            diffs = [
                k
                for k in ("sources", "inputs", "options", "streammerge_version", "layout")
                if previous.get(k) != self.manifest.get(k)
            ]
            raise OutputError(
                f"{self.out_dir}: cannot resume: the interrupted merge used different "
                f"{', '.join(diffs) or 'settings'}. Resume with exactly the same inputs and options, or run without "
                "--resume and with --overwrite to start over"
            )

    def _adopt(self, previous: dict) -> None:
        """Resume: refuse a different merge; keep finished shards whose size and SHA-256 still match."""
        self._check_same_merge(previous)
        for p in self._stale_partials():
            p.unlink(missing_ok=True)
        (self.out_dir / INDEX_FILE).unlink(missing_ok=True)  # rewritten last
        recorded = previous.get("shards", {})
        for i, f in enumerate(self.plan.files):
            rec = recorded.get(f.name)
            path = self.out_dir / f.name
            if path.is_symlink():
                path.unlink()  # never follow a link planted where a shard belongs
                continue
            if not isinstance(rec, dict) or not path.is_file():
                continue
            if path.stat().st_size == f.size == rec.get("size") and sha256_file(path) == rec.get("sha256"):
                self.adopted.add(i)
                self.shards[f.name] = {"size": f.size, "sha256": rec["sha256"]}
            else:
                self.notes.append(f"resume: {f.name} did not match its recorded checksum and is redone")
                path.unlink()
        if self.adopted:
            self.notes.append(
                f"resume: kept {len(self.adopted)} verified shard(s), "
                f"redoing {len(self.plan.files) - len(self.adopted)}"
            )

    def _create(self, i: int, name: str, header: bytes, size: int) -> None:
        tmp = self._temps[i]
        try:
            fd = os.open(tmp, _OPEN_NEW, 0o644)
        except OSError as e:
            raise OutputError(f"{tmp}: cannot create ({e.strerror or e})") from None
        self._fds[i] = fd
        self._created.add(i)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while written: see _remove_stale_temp
            # Reserve the space now: a full disk fails here, before hours of work, not in the middle.
            if size > len(header):
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                        os.ftruncate(fd, size)
                    else:
                        raise
            self._pwrite_all(fd, header, 0)
        except OSError as e:
            raise self._write_error(name, e) from None
        self._hash[i].update(header)
        self._cursor[i] = len(header)

    def _write_error(self, name: str, e: OSError) -> OutputError:
        if e.errno == errno.EFBIG:
            return OutputError(
                f"{self.out_dir / name}: file too large for this filesystem or the process's file-size limit "
                f"({e.strerror}); use a smaller --max-shard-size (FAT32 and some mounts cap files at 4 GB), then "
                "run again with --resume"
            )
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = shutil.disk_usage(self.out_dir).free
            except OSError:
                free = None
            return OutputError(
                f"{self.out_dir / name}: out of disk space ({e.strerror}). The output needs "
                f"{human_bytes(self.plan.disk_needed)}"
                + (f", {human_bytes(free)} is free" if free is not None else "")
                + "; free space (or choose another output directory), then run again with --resume"
            )
        if e.errno == errno.EFAULT:  # the bytes came straight from an input mapping that no longer has them
            return OutputError(
                f"{self.out_dir / name}: write failed ({e.strerror}): an input file shrank while merging; wait until "
                "every input is complete and stable, then run again"
            )
        return OutputError(f"{self.out_dir / name}: write failed ({e.strerror or e})")

    # ------------------------------------------------------------------ data
    @staticmethod
    def _pwrite_all(fd: int, data, offset: int) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        done = 0
        while done < total:
            n = os.pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n
        return total

    def write(self, file: int, offset: int, data, out: int | None = None, *, hashed: bool = False) -> None:
        """Write ``data`` (any buffer) at absolute ``offset`` of output file ``file`` (``out``: see `SweepWriter`).
        ``hashed``: the caller feeds these bytes to :meth:`digest` itself (an engine hashing on another thread).
        Safe from several threads at once."""
        fd = self._fds[file]
        if fd is None:
            raise OutputError(f"{self.plan.files[file].name}: written after it was finished (internal error)")
        try:
            n = self._pwrite_all(fd, data, offset)
        except OSError as e:
            raise self._write_error(self.plan.files[file].name, e) from None
        with self._count_lock:
            self.bytes_written += n
        if not hashed:
            self.digest(file, offset, data)

    def digest(self, file: int, offset: int, data, out: int | None = None) -> None:
        """Feed ``data`` (about to be written at ``offset``) to the file's SHA-256. Chunks come in offset order, so
        the checksum is computed as the data passes; anything out of order makes ``finish_file`` re-read the file.
        The engines call it from the file's hash stream (engines/output.py), beside the writes (``hashed=True``)."""
        n = memoryview(data).nbytes
        if self._sequential[file] and offset == self._cursor[file]:
            self._hash[file].update(data)
            self._cursor[file] += n
        else:
            self._sequential[file] = False

    def finish_file(self, file: int) -> None:
        """Sync the file, give it its final name and record its checksum in the manifest."""
        fd = self._fds[file]
        f = self.plan.files[file]
        try:
            os.fsync(fd)  # type: ignore[arg-type]
            os.close(fd)  # type: ignore[arg-type]
            self._fds[file] = None
            if self._sequential[file] and self._cursor[file] == f.size:
                digest = self._hash[file].hexdigest()
            else:
                digest = sha256_file(self._temps[file])
            if self.before_publish is not None:
                self.before_publish()
            os.replace(self._temps[file], self.out_dir / f.name)
        except OSError as e:
            raise self._write_error(f.name, e) from None
        with self._count_lock:
            self.bytes_written += len(f.header)
        self.shards[f.name] = {"size": f.size, "sha256": digest}
        self._write_manifest(STATE_IN_PROGRESS)
        crash_point(f"shard:{file}")

    def _write_manifest(self, state: str, files: list[str] | None = None) -> None:
        """The manifest, or in a merge in parts this part's own record (the manifest is finalize's)."""
        m = {**self.manifest, "state": state, "shards": dict(self.shards)}
        if files is not None:
            m["files"] = files
        if self.share is not None:
            m.update(self.share.extra, written_at=time.time())
            if not self._record_is_ours and not (self.out_dir / self.share.record).exists():
                self._record_is_ours = True  # abort removes it again while it records nothing
        name = MANIFEST if self.share is None else self.share.record
        self.write_small(name, (json.dumps(m, indent=2, default=str) + "\n").encode())

    def write_small(self, name: str, data: bytes) -> None:
        """Write a small file atomically (temporary name, fsync, rename); errors say what to do."""
        try:
            write_small_file(self.out_dir, name, data, tag=str(os.getpid()) if self.share is not None else "")
        except OSError as e:
            raise self._write_error(name, e) from None

    def finalize(self, small_files: dict[str, bytes]) -> list[str]:
        """Write the small files (aux, card), then the index (the last visible file), then mark the hidden manifest
        complete and sync the directory. A crash before the last step leaves an in-progress manifest: ``--resume``
        re-verifies the shards and finishes."""
        missing = [f.name for i, f in enumerate(self.plan.files) if f.name not in self.shards and i not in self._others]
        if missing:
            raise OutputError(f"internal error: finalize before {missing} were complete")
        if self.share is not None:  # a part: stage what finalize publishes, record this part complete
            for name, data in small_files.items():
                self.write_small(f"{SMALL_PREFIX}{name}", data)
            self.write_small(PLAN_RECORD, self.share.plan_record)
            own = [f.name for i, f in enumerate(self.plan.files) if i not in self._others]
            self._write_manifest(STATE_COMPLETE, own)
            if self._dir_fd is not None:
                os.fsync(self._dir_fd)
            return own
        for name, data in small_files.items():
            self.write_small(name, data)
        files = [f.name for f in self.plan.files] + list(small_files)
        if self.plan.is_sharded:
            files.append(INDEX_FILE)
        if self.plan.is_sharded:
            self.write_small(INDEX_FILE, self.plan.index_json().encode())
        crash_point("index")
        self._write_manifest(STATE_COMPLETE, files)
        if self._dir_fd is not None:
            os.fsync(self._dir_fd)
        return files

    def abort(self) -> None:
        """Close and remove every temporary file; files already given final names are complete and stay."""
        for i, fd in enumerate(self._fds):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                self._fds[i] = None
        for i in self._created:
            try:
                self._temps[i].unlink()
            except OSError:
                pass
        if self.share is not None and self._record_is_ours and not self.shards:
            (self.out_dir / self.share.record).unlink(missing_ok=True)

    def close(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)  # releases the lock
            self._dir_fd = None

    def __enter__(self) -> OutputWriter:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self.abort()
        finally:
            self.close()


class NullWriter:
    """A discard sink with the writer's interface: everything is computed, nothing is stored.

    For benchmarks (the pipeline without the disk) and 70B-scale dry runs. With ``checksums=True`` it still hashes
    each file in write order, so two engines can be compared without disk space.
    """

    def __init__(self, plan: MergePlan, checksums: bool = False, files: set[int] | None = None):
        self.plan = plan
        self.checksums = checksums
        self._hash = [hashlib.sha256() if checksums else None for _ in plan.files]
        self.shards: dict[str, dict] = {}
        self.adopted: set[int] = set()
        # ``files``: this process's share of a merge in parts (the rest is another process's: no work here)
        self.done_files: set[int] = set(range(len(plan.files))) - set(files) if files is not None else set()
        self.notes: list[str] = ["sink: null (output discarded)"]
        self.bytes_written = 0
        self._count_lock = threading.Lock()

    def open(self) -> None:
        for i, f in enumerate(self.plan.files):
            if self._hash[i] is not None:
                self._hash[i].update(f.header)

    def write(self, file: int, offset: int, data, out: int | None = None, *, hashed: bool = False) -> None:
        with self._count_lock:
            self.bytes_written += memoryview(data).nbytes
        if not hashed:
            self.digest(file, offset, data)

    def digest(self, file: int, offset: int, data, out: int | None = None) -> None:
        h = self._hash[file]
        if h is not None:
            h.update(data)

    def finish_file(self, file: int) -> None:
        f = self.plan.files[file]
        with self._count_lock:
            self.bytes_written += len(f.header)
        h = self._hash[file]
        self.shards[f.name] = {"size": f.size, "sha256": h.hexdigest() if h is not None else ""}

    def finalize(self, small_files: dict[str, bytes]) -> list[str]:
        return [f.name for f in self.plan.files]

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullWriter:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        pass


class SweepWriter:
    """One pass, several outputs: the writer interface over one writer per output of an alpha sweep.

    ``plan`` is the sweep plan (:func:`streammerge.plan.sweep_plan`), whose offsets are its first output's; each
    output's header records its own alpha, so its offsets differ by its header-size difference, added here. ``out=k``
    sends data to output ``k`` only; ``out=None`` to every output (tensors whose bytes do not depend on alpha). A file
    one output already finished (resume) is skipped for that output; the engine skips files every output finished.
    """

    def __init__(self, plan: MergePlan, writers: list):
        if len(writers) != len(plan.variants):
            raise ValueError("SweepWriter: one writer per sweep output")
        self.plan = plan
        self.writers = writers
        self.delta = [
            [len(vp.files[i].header) - len(f.header) for i, f in enumerate(plan.files)] for vp in plan.variants
        ]

    @property
    def done_files(self) -> set[int]:
        return set.intersection(*(set(w.done_files) for w in self.writers))

    @property
    def notes(self) -> list[str]:
        return [n for w in self.writers for n in w.notes]

    def _targets(self, file: int, out: int | None):
        for k in range(len(self.writers)) if out is None else (out,):
            w = self.writers[k]
            if file not in w.done_files:
                yield k, w

    def write(self, file: int, offset: int, data, out: int | None = None, *, hashed: bool = False) -> None:
        for k, w in self._targets(file, out):
            w.write(file, offset + self.delta[k][file], data, hashed=hashed)

    def digest(self, file: int, offset: int, data, out: int | None = None) -> None:
        for k, w in self._targets(file, out):
            w.digest(file, offset + self.delta[k][file], data)

    def finish_file(self, file: int) -> None:
        for _, w in self._targets(file, None):
            w.finish_file(file)
