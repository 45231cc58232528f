"""Resolve a checkpoint (directory, index, single file) into named tensor references backed by read-only mmaps.

Nothing in an input directory is ever written: files are opened ``O_RDONLY`` and mapped ``ACCESS_READ``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import CheckpointError, HeaderError, format_name_list
from .format import Header, clip_repr, read_header_and_stat

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files copied from the target next to the merged weights: what AutoConfig/AutoTokenizer/generate() read.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)
MAX_INDEX_BYTES = 64_000_000

# torch.frombuffer warns on every read-only buffer; our views are only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: ``file`` (index into the checkpoint's files) at absolute ``offset``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: int
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class TensorSource(Protocol):
    """What planning reads from an input: its tensors by name and where they come from, from headers alone.

    :class:`Checkpoint` (local files, mapped) satisfies it and can also be read from; ``hub.RemoteHeaders`` (a Hub
    repository known only by its remote headers) satisfies it for planning only.
    """

    source: str  # what the user gave (path, or repo@commit), recorded as provenance
    label: str  # the role in this merge ("target", "sft", ...), used in messages
    root: Path | None  # the local directory holding it (None: nothing local)
    files: list[Path]
    tensors: dict[str, TensorRef]

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of its first file (what `extract` records: ``streammerge_formula``)."""
        ...

    def aux_files(self) -> list[Path]: ...

    def close(self) -> None: ...


class FileGate(Protocol):
    """Says when each file of a checkpoint whose files arrive later (a Hub checkpoint merged with ``--stream``) is
    on disk and complete: :meth:`wait` returns then, and raises (a `StreamMergeError`) if it never will be."""

    def wait(self, i: int) -> None: ...

    def close(self) -> None:
        """The checkpoint is closed: stop every wait and remove what was downloaded for it."""
        ...


class Checkpoint:
    """A safetensors checkpoint: its files, validated headers, tensors by name and read-only mmaps.

    Args:
        source (`str | os.PathLike`): a directory holding ``model.safetensors`` or shards plus
            ``model.safetensors.index.json``, a single ``.safetensors`` file, or an index file.
        allowed_roots (`list[Path]`, *optional*): extra directories that symlinked files may resolve into (the Hub
            cache's blob store for a snapshot).
        label (`str`, *optional*): how errors refer to this checkpoint ("target", "sft", "grpo").
        headers (`dict[str, Header]`, *optional*): every weight file's header, read elsewhere (by name relative to
            the checkpoint directory): the files need not exist yet. With ``gate``, each is mapped once the gate says
            it is on disk (:class:`FileGate`); :meth:`unmap` lets it go again.
        gate (`FileGate`, *optional*): see ``headers``.

    Raises:
        [`CheckpointError`], [`HeaderError`]: the checkpoint cannot be resolved, or a header or index is invalid.

    Example:
        ```py
        >>> ckpt = Checkpoint("path/to/Qwen2.5-7B")
        >>> ref = ckpt.tensors["model.embed_tokens.weight"]
        >>> view = ckpt.view(ref, 0, ref.nbytes)  # zero-copy torch.uint8 view of the bytes
        ```
    """

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        allowed_roots: list[Path] | None = None,
        label: str = "",
        headers: dict[str, Header] | None = None,
        gate: FileGate | None = None,
    ):
        self.source = str(source)
        self.label = label
        path = Path(source)
        if not path.exists():
            raise CheckpointError(f"{self._who()}{path}: no such file or directory")
        # Known before any index is read, so the index itself is held to the same containment rule as the shards.
        self._root_real = Path(os.path.realpath(path if path.is_dir() else path.parent))
        self._allowed = [self._root_real] + [Path(os.path.realpath(r)) for r in (allowed_roots or [])]
        if path.is_dir():
            self.root = path
            index = path / INDEX_FILE
            if not index.exists():
                others = sorted(p.name for p in path.glob("*.safetensors.index.json"))
                index = path / others[0] if len(others) == 1 else index
            if index.exists():
                self.index_path: Path | None = index
                files = self._files_from_index(index)
            elif (path / SINGLE_FILE).exists() or headers is not None and SINGLE_FILE in headers:
                self.index_path = None
                files = [path / SINGLE_FILE]
            else:
                raise CheckpointError(self._explain_empty(path))
        elif path.name.endswith(".index.json"):
            self.root = path.parent
            self.index_path = path
            files = self._files_from_index(path)
        elif path.suffix == ".safetensors":
            self.root = path.parent
            self.index_path = None
            files = [path]
        elif path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(self._who() + _pickle_message(path))
        else:
            raise CheckpointError(f"{self._who()}{path}: not a .safetensors file, an index or a checkpoint directory")

        for f in files:
            self._check_inside(f)
        self.files: list[Path] = files
        self.headers: list[Header] = []
        # Each file's fstat when its header was read: a change after that (a save still running) is caught before
        # any output file is published (identity.InputGuard).
        self.file_stats: list[os.stat_result] = []
        self.tensors: dict[str, TensorRef] = {}
        owner: dict[str, Path] = {}
        for i, f in enumerate(files):
            if headers is not None:
                header = self._given_header(headers, f)
            else:
                problem = self._not_a_file(f)
                if problem:
                    raise CheckpointError(problem)
                header, st = read_header_and_stat(f)
                self.file_stats.append(st)
            self.headers.append(header)
            for name, info in header.tensors.items():
                if name in owner:
                    raise CheckpointError(
                        f"{self._who()}tensor {name!r} is stored twice: in {owner[name]} and in {f}; "
                        "the checkpoint is inconsistent"
                    )
                owner[name] = f
                self.tensors[name] = TensorRef(
                    name, info.dtype, info.shape, i, header.data_start + info.begin, info.nbytes
                )
        if self.index_path is not None:
            self._check_index_agrees(owner)
        self._maps: list[mmap.mmap | None] = [None] * len(files)
        self._fds: list[int | None] = [None] * len(files)
        self.gate = gate
        # A gated file is mapped and unmapped while the engine's threads read: one lock per file orders the two.
        self._locks = [threading.RLock() for _ in files] if gate is not None else None
        # How the manifest identifies each file when its size and times say nothing (set by whoever read the
        # headers elsewhere: a Hub file's repository, commit and SHA-256); None: from the files themselves.
        self.remote_identity: list[dict] | None = None

    # ------------------------------------------------------------------ resolution helpers
    def _who(self) -> str:
        return f"{self.label} checkpoint: " if self.label else ""

    def _given_header(self, headers: dict[str, Header], f: Path) -> Header:
        name = f.relative_to(self.root).as_posix()
        if name not in headers:
            raise CheckpointError(f"{self._who()}{f}: no header was read for this weights file")
        return headers[name]

    def _not_a_file(self, f: Path) -> str | None:
        """Why ``f`` cannot be a weights file (None when it is a regular file), without opening it."""
        what = f"shard named by {self.index_path}" if self.index_path is not None else "weights file"
        try:
            mode = os.stat(f).st_mode
        except FileNotFoundError:
            if os.path.islink(f):
                return f"{self._who()}{f}: {what} is a dangling symlink"
            return f"{self._who()}{f}: {what} does not exist"
        except OSError as e:  # a symlink loop, a name too long, a component that is not a directory, ...
            return f"{self._who()}{f}: {what} cannot be opened ({e.strerror or e})"
        if stat.S_ISREG(mode):
            return None
        if stat.S_ISDIR(mode):
            return f"{self._who()}{f}: {what} is a directory, not a .safetensors file"
        return f"{self._who()}{f}: {what} is not a regular file (a FIFO, socket or device); refusing to read it"

    def _explain_empty(self, path: Path) -> str:
        entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        st = [e for e in entries if e.endswith(".safetensors")]
        pickles = [e for e in entries if e.endswith(PICKLE_SUFFIXES)]
        if st:
            return (
                f"{self._who()}{path}: has {format_name_list(st, 5)} but neither {SINGLE_FILE} nor {INDEX_FILE}; "
                "pass the .safetensors file itself, or add an index"
            )
        if pickles:
            return self._who() + _pickle_message(path / pickles[0])
        if not entries:
            return f"{self._who()}{path}: directory is empty (expected {SINGLE_FILE} or {INDEX_FILE})"
        return f"{self._who()}{path}: no safetensors weights found (expected {SINGLE_FILE} or {INDEX_FILE})"

    def _files_from_index(self, index: Path) -> list[Path]:
        self._check_inside(index)
        try:
            # O_NONBLOCK so that a FIFO does not block the open; only a regular file is read, and never past the cap
            # (a symlink to /dev/zero reports size 0 and would otherwise be read forever).
            fd = os.open(index, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise CheckpointError(
                        f"{self._who()}{index}: index is not a regular file (a directory, FIFO or device)"
                    )
                if st.st_size > MAX_INDEX_BYTES:
                    raise CheckpointError(
                        f"{self._who()}{index}: index is {st.st_size} bytes, larger than any real index"
                    )
                with open(fd, "rb", closefd=False) as fh:
                    raw = fh.read(MAX_INDEX_BYTES + 1)
            finally:
                os.close(fd)
            if len(raw) > MAX_INDEX_BYTES:
                raise CheckpointError(f"{self._who()}{index}: index grew past {MAX_INDEX_BYTES} bytes while read")
            obj = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, or an integer too long to convert
            raise CheckpointError(f"{self._who()}{index}: index is not valid JSON ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{self._who()}{index}: cannot read index ({e.strerror or e})") from None
        wm = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(f'{self._who()}{index}: index needs a "weight_map" object mapping names to files')
        if not wm:
            raise CheckpointError(f"{self._who()}{index}: index weight_map is empty")
        self._weight_map: dict[str, str] = wm
        files: list[Path] = []
        for fname in dict.fromkeys(wm.values()):
            p = Path(fname)
            if p.is_absolute() or ".." in p.parts or fname.startswith(("/", "\\")) or "\\" in fname:
                raise CheckpointError(
                    f"{self._who()}{index}: weight_map names {clip_repr(fname)}; shard paths must be relative and "
                    "stay inside the checkpoint directory"
                )
            if not _is_file_name(fname):
                raise CheckpointError(
                    f"{self._who()}{index}: weight_map names {clip_repr(fname)}, which is not a valid file name "
                    "(a NUL byte or an unencodable character)"
                )
            # "a.safetensors" and "./a.safetensors" are one shard: Path equality normalises the spelling.
            if index.parent / p not in files:
                files.append(index.parent / p)
        return files

    def _check_inside(self, f: Path) -> None:
        real = Path(os.path.realpath(f))
        if not any(real == r or r in real.parents for r in self._allowed):
            raise CheckpointError(
                f"{self._who()}{f}: resolves to {real}, outside the checkpoint directory {self._root_real}; "
                "refusing to follow it"
            )

    def _check_index_agrees(self, owner: dict[str, Path]) -> None:
        wrong = []
        for name, fname in self._weight_map.items():
            actual = owner.get(name)
            if actual is None:
                wrong.append(f"{name} (in index as {fname}, in no shard)")
            elif actual != self.index_path.parent / fname:  # type: ignore[union-attr]
                wrong.append(f"{name} (index says {fname}, found in {actual.name})")
        unindexed = [n for n in owner if n not in self._weight_map]
        wrong += [f"{n} (in {owner[n].name}, not in the index)" for n in unindexed]
        if wrong:
            raise CheckpointError(
                f"{self._who()}{self.index_path}: weight_map disagrees with the shard headers for {len(wrong)} "
                f"tensor(s): {format_name_list(wrong)}. Re-download the checkpoint or fix its index"
            )

    def aux_files(self) -> list[Path]:
        """Config, generation config, tokenizer and chat-template files beside the weights (inside the root)."""
        out = []
        for name in AUX_FILES:
            p = self.root / name
            if p.is_file():
                try:
                    self._check_inside(p)
                except CheckpointError:
                    continue
                out.append(p)
        return out

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.headers[0].metadata) if self.headers else {}

    # ------------------------------------------------------------------ data access
    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.tensors.values())

    def mapping(self, i: int) -> mmap.mmap:
        """The read-only mapping of file ``i`` (mapped on first use; the size is checked when it is mapped). The CUDA
        engine registers windows of it with the GPU; everyone else reads through :meth:`view`."""
        return self._map(i)

    def _map(self, i: int) -> mmap.mmap:
        if self._locks is None:
            return self._map_now(i)
        with self._locks[i]:
            return self._map_now(i)

    def _map_now(self, i: int) -> mmap.mmap:
        m = self._maps[i]
        if m is None:
            if self.gate is not None:
                self.gate.wait(i)  # the file is complete on disk (or this raises)
            # O_NONBLOCK: a shard swapped for a FIFO since its header was read must not hang the open.
            fd = os.open(self.files[i], os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            try:
                self._check_size(i, fd)
                m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except BaseException:
                os.close(fd)
                raise
            self._fds[i] = fd
            self._maps[i] = m
        return m

    def _check_size(self, i: int, fd: int) -> None:
        """Raise if file ``i`` no longer has the size its header promised: reading a mapping past a shrunken file's
        end kills the process with SIGBUS, so every read checks first (an ``fstat``, about a microsecond)."""
        size = os.fstat(fd).st_size
        expected = self.headers[i].data_start + self.headers[i].data_size
        if size != expected:
            raise CheckpointError(
                f"{self._who()}{self.files[i]}: file changed while merging ({size} bytes, expected {expected}); "
                "wait until it is complete and stable, then run again"
            )

    def fd(self, i: int) -> int:
        self._map(i)
        return self._fds[i]  # type: ignore[return-value]

    def view(self, ref: TensorRef, start: int, stop: int, dtype=None):
        """A zero-copy tensor over bytes [start, stop) of ``ref`` (relative to the tensor), read-only by contract.
        ``dtype``: a ``torch.dtype`` (``torch.uint8`` by default). torch is imported here, not with the module, so
        header-only commands never load it."""
        import torch

        dtype = torch.uint8 if dtype is None else dtype
        if not 0 <= start <= stop <= ref.nbytes:
            raise ValueError(f"byte range [{start}, {stop}) outside tensor {ref.name!r} of {ref.nbytes} bytes")
        if stop == start:
            return torch.empty(0, dtype=dtype)
        if self._locks is None:
            return self._view_now(ref, start, stop, dtype, torch)
        with self._locks[ref.file]:
            return self._view_now(ref, start, stop, dtype, torch)

    def _view_now(self, ref: TensorRef, start: int, stop: int, dtype, torch):
        m = self._map_now(ref.file)
        self._check_size(ref.file, self._fds[ref.file])  # type: ignore[arg-type]
        # Through a fresh memoryview: torch.frombuffer(m) drops its buffer export at once, so close() would unmap pages
        # a live view still points into (a segfault when read: a failed write's traceback keeps its data array). The
        # tensor keeps the memoryview, whose export makes m.close() raise BufferError until the last view is gone.
        mv = memoryview(m)
        return torch.frombuffer(mv, dtype=dtype, count=(stop - start) // dtype.itemsize, offset=ref.offset + start)

    # Set by the merge when the inputs cannot stay in the page cache anyway (larger than half the available
    # memory): consumed pages are then also dropped from the cache, so a 420 GB merge does not evict everything
    # else on the machine. Smaller inputs stay cached for the next run.
    drop_cache: bool = False

    def release(self, ref: TensorRef, start: int, stop: int) -> None:
        """Drop this process's mapping of fully consumed pages in [start, stop), and their page-cache pages too
        when ``drop_cache`` is set."""
        if self._locks is None:
            self._release_now(ref, start, stop)
            return
        with self._locks[ref.file]:
            self._release_now(ref, start, stop)

    def _release_now(self, ref: TensorRef, start: int, stop: int) -> None:
        m = self._maps[ref.file]
        if m is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        a = -(-(ref.offset + start) // page) * page
        b = (ref.offset + stop) // page * page
        if b > a:
            try:
                m.madvise(mmap.MADV_DONTNEED, a, b - a)
                if self.drop_cache and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self._fds[ref.file], a, b - a, os.POSIX_FADV_DONTNEED)  # type: ignore[arg-type]
            except (OSError, ValueError):
                pass

    def prefetch(self, ref: TensorRef, start: int, stop: int) -> None:
        """Ask the kernel to read [start, stop) ahead (cold cache); cheap when the pages are already cached. A gated
        file that is not on disk yet is not waited for (a hint needs no answer)."""
        if self._locks is not None:
            with self._locks[ref.file]:
                if self._maps[ref.file] is not None:
                    self._prefetch_now(self._maps[ref.file], ref, start, stop)
            return
        self._prefetch_now(self._maps[ref.file] or self._map(ref.file), ref, start, stop)

    def _prefetch_now(self, m: mmap.mmap, ref: TensorRef, start: int, stop: int) -> None:
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        page = mmap.PAGESIZE
        a = (ref.offset + start) // page * page
        b = ref.offset + stop
        if b > a:
            try:
                m.madvise(mmap.MADV_WILLNEED, a, b - a)
            except (OSError, ValueError):
                pass

    def unmap(self, i: int) -> mmap.mmap | None:
        """Let file ``i`` go: close its descriptor and its mapping (mapped again on the next read). Returns the
        mapping when a view still holds it (it is unmapped when the last such view is collected), else None."""
        if self._locks is None:
            return self._unmap_now(i)
        with self._locks[i]:
            return self._unmap_now(i)

    def _unmap_now(self, i: int) -> mmap.mmap | None:
        m, held = self._maps[i], None
        if m is not None:
            try:
                m.close()
            except BufferError:
                held = m  # a caller still holds a view; the map closes when it is collected
            self._maps[i] = None
        fd = self._fds[i]
        if fd is not None:
            os.close(fd)
            self._fds[i] = None
        return held

    def close(self) -> None:
        for i in range(len(self._maps)):
            self.unmap(i)
        if self.gate is not None:
            self.gate.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, files={len(self.files)}, tensors={len(self.tensors)})"


def _is_file_name(name: str) -> bool:
    if "\x00" in name:
        return False
    try:
        os.fsencode(name)
    except UnicodeEncodeError:  # a lone surrogate outside the surrogateescape range
        return False
    return True


def _pickle_message(path: Path) -> str:
    return (
        f"{path}: pickle weights (.bin/.pt) are never loaded (unpickling runs arbitrary code). Convert the "
        "checkpoint to safetensors first, e.g. `AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, "
        "safe_serialization=True)` in a trusted environment, or use the safetensors version of the repository"
    )


def open_checkpoint(source: str | os.PathLike, label: str = "", allowed_roots: list[Path] | None = None) -> Checkpoint:
    """Open a checkpoint, turning unexpected OS errors into a `CheckpointError` naming it."""
    try:
        return Checkpoint(source, label=label, allowed_roots=allowed_roots)
    except (CheckpointError, HeaderError):
        raise
    except OSError as e:
        raise CheckpointError(f"{label + ' checkpoint: ' if label else ''}{source}: {e.strerror or e}") from None
