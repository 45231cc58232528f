"""The streaming writer: every output file is created at its final size under a temporary name, filled at final
offsets, synced and renamed; small files are written atomically; the index comes last.

After any crash, every file with a final name is complete and correct, and the index exists only when every shard
it names does. Temporary files are hidden (``.NAME.partial``) and removed on any error or interrupt.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from .checkpoint import INDEX_FILE
from .errors import OutputError
from .plan import MergePlan

MANIFEST = ".streammerge.json"
PARTIAL_SUFFIX = ".partial"
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


class OutputWriter:
    """Writes one merge's output directory. Use as a context manager: leaving it with an exception aborts.

    Args:
        out_dir (`Path`): the output directory (created if missing; must be empty or a previous streammerge output
            with ``overwrite=True``).
        plan (`MergePlan`): the exact layout to write.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: MergePlan):
        self.out_dir = Path(out_dir)
        self.plan = plan
        self._fds: list[int | None] = [None] * len(plan.files)
        self._temps: list[Path] = [self.out_dir / f".{f.name}{PARTIAL_SUFFIX}" for f in plan.files]
        self._dir_fd: int | None = None
        self._done = [False] * len(plan.files)
        self.bytes_written = 0

    # ------------------------------------------------------------------ setup
    def open(self) -> None:
        out = self.out_dir
        if out.is_symlink():
            raise OutputError(f"{out}: output path is a symlink; give a real directory path")
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: exists and is not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise OutputError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._dir_fd)
            self._dir_fd = None
            raise OutputError(f"{out}: another streammerge process is writing this directory; wait for it") from None
        try:
            self._clear_previous()
            for i, f in enumerate(self.plan.files):
                self._create(i, f.name, f.header, f.size)
        except BaseException:
            self.abort()
            self.close()
            raise

    def _clear_previous(self) -> None:
        entries = [p for p in self.out_dir.iterdir()]
        ours = [p for p in entries if p.name.endswith(PARTIAL_SUFFIX) and p.name.startswith(".")]
        rest = [p for p in entries if p not in ours]
        if rest:
            manifest = self.out_dir / MANIFEST
            if not self.plan.options.overwrite:
                raise OutputError(
                    f"{self.out_dir}: output directory is not empty ({len(rest)} entries); choose a new directory"
                    + (", or pass --overwrite to replace the previous streammerge output" if manifest.exists() else "")
                )
            if not manifest.is_file() or manifest.is_symlink():
                raise OutputError(
                    f"{self.out_dir}: not a streammerge output (no {MANIFEST}); refusing to overwrite it. "
                    "Choose a new or empty directory"
                )
            try:
                previous = json.loads(manifest.read_text())["files"]
            except (OSError, ValueError, KeyError, TypeError):
                raise OutputError(f"{manifest}: unreadable manifest; remove the directory by hand") from None
            # Remove only what the previous streammerge run wrote, index first so nothing looks complete.
            names = [INDEX_FILE] + [n for n in previous if n != INDEX_FILE] + [MANIFEST]
            for name in names:
                if isinstance(name, str) and "/" not in name and name not in (".", ".."):
                    try:
                        (self.out_dir / name).unlink()
                    except FileNotFoundError:
                        pass
        for p in ours:  # stale temporaries of an interrupted run
            p.unlink(missing_ok=True)

    def _create(self, i: int, name: str, header: bytes, size: int) -> None:
        tmp = self._temps[i]
        try:
            fd = os.open(tmp, _OPEN_NEW, 0o644)
        except OSError as e:
            raise OutputError(f"{tmp}: cannot create ({e.strerror or e})") from None
        self._fds[i] = fd
        try:
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

    def _write_error(self, name: str, e: OSError) -> OutputError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            free = _free_bytes(self.out_dir)
            return OutputError(
                f"{self.out_dir / name}: out of disk space ({e.strerror}). The output needs "
                f"{_human(self.plan.disk_needed)}"
                + (f", {_human(free)} is free" if free is not None else "")
                + "; free space or choose another output directory"
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

    def write(self, file: int, offset: int, data) -> None:
        """Write ``data`` (any buffer) at absolute ``offset`` of output file ``file``."""
        fd = self._fds[file]
        if fd is None:
            raise OutputError(f"{self.plan.files[file].name}: written after it was finished (internal error)")
        try:
            self.bytes_written += self._pwrite_all(fd, data, offset)
        except OSError as e:
            raise self._write_error(self.plan.files[file].name, e) from None

    def finish_file(self, file: int) -> None:
        """Sync the file and give it its final name."""
        fd = self._fds[file]
        name = self.plan.files[file].name
        try:
            os.fsync(fd)  # type: ignore[arg-type]
            os.close(fd)  # type: ignore[arg-type]
            self._fds[file] = None
            os.replace(self._temps[file], self.out_dir / name)
        except OSError as e:
            raise self._write_error(name, e) from None
        self._done[file] = True
        self.bytes_written += len(self.plan.files[file].header)

    def write_small(self, name: str, data: bytes) -> None:
        """Write a small file atomically (temporary name, fsync, rename)."""
        tmp = self.out_dir / f".{name}{PARTIAL_SUFFIX}"
        tmp.unlink(missing_ok=True)
        try:
            fd = os.open(tmp, _OPEN_NEW, 0o644)
            try:
                self._pwrite_all(fd, data, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.out_dir / name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise self._write_error(name, e) from None

    def finalize(self, small_files: dict[str, bytes]) -> None:
        """Write the small files (aux, card, manifest), then the index last, then sync the directory."""
        if not all(self._done):
            missing = [f.name for f, d in zip(self.plan.files, self._done) if not d]
            raise OutputError(f"internal error: finalize before {missing} were complete")
        for name, data in small_files.items():
            self.write_small(name, data)
        if self.plan.is_sharded:
            self.write_small(INDEX_FILE, self.plan.index_json().encode())
        if self._dir_fd is not None:
            os.fsync(self._dir_fd)

    def abort(self) -> None:
        """Close and remove every temporary file; files already given final names are complete and stay."""
        for i, fd in enumerate(self._fds):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                self._fds[i] = None
        for p in self._temps:
            try:
                p.unlink()
            except OSError:
                pass

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
