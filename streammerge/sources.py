"""Open the inputs of a merge, one per role: local checkpoints, Hub snapshots, or remote headers for planning."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .checkpoint import TensorSource, open_checkpoint
from .errors import StreamMergeError
from .options import MergeOptions
from .remote import default_scratch, list_repo, open_streamed

TRIO_ROLES = ("target", "sft", "grpo")


@dataclass(frozen=True)
class StreamInputs:
    """Hub inputs are streamed (``--stream``): their headers read remotely, their shards downloaded into
    ``scratch`` later by the stream."""

    scratch: Path
    workers: int = 4

    @classmethod
    def of(cls, opts: MergeOptions, out_dir=None) -> StreamInputs | None:
        """From the options (None without ``stream``); the scratch folder defaults to one beside ``out_dir``."""
        if not opts.stream:
            return None
        scratch = Path(opts.stream_dir) if opts.stream_dir else default_scratch(out_dir)
        return cls(scratch, opts.download_workers)


def open_sources(
    sources: Mapping[str, object],
    headers_only: bool = False,
    share: bool = True,
    where: Mapping[str, str] | None = None,
    stream: StreamInputs | None = None,
) -> dict[str, TensorSource]:
    """Open a source per role (``{"target": path_or_repo_id, ...}``). Hub repository ids are resolved to snapshots
    (their commit recorded); with ``headers_only``, a repository not in the local cache is read as remote headers,
    downloading no weights. With ``share``, roles naming the same source share one opened checkpoint (one mapping:
    the CUDA engine registers its pages once). ``where`` prefixes a role's errors (a spec's file and key). On any
    error every source opened so far is closed. With ``stream``, a Hub repository is opened for streaming
    (:func:`remote.open_streamed`: nothing but headers and small files downloaded), one per repository whatever
    ``share`` says (each shard is downloaded once)."""
    opened: dict[str, TensorSource] = {}
    by_src: dict[str, TensorSource] = {}
    # a scratch folder made for this merge is removed with its last streamed input (a given one is kept)
    made: list[Path] = []
    if stream is not None:
        for d in (stream.scratch, *stream.scratch.parents):
            if d.exists():
                break
            made.append(d)
    try:
        for label, src in sources.items():
            key = os.fspath(src)
            streaming = stream is not None and hub.parse_repo_spec(src) is not None
            if (share or streaming) and key in by_src:
                opened[label] = by_src[key]
                continue
            try:
                if streaming:
                    # one checkpoint per repository and commit, however it is spelled (org/m, org/m@main, ...)
                    listing = list_repo(key, label)
                    pinned = f"{listing[0]}@{listing[1]}"
                    if pinned not in by_src:
                        by_src[pinned] = open_streamed(key, label, stream.scratch, stream.workers, made, listing)
                    opened[label] = by_src[key] = by_src[pinned]
                else:
                    opened[label] = by_src[key] = _open_one(label, src, headers_only)
            except StreamMergeError as e:
                if where is None or label not in where:
                    raise
                raise type(e)(f"{where[label]}: {e}") from None
    except BaseException:
        close_all(opened.values())
        raise
    return opened


def open_trio(
    target, sft, grpo, headers_only: bool = False, stream: StreamInputs | None = None
) -> dict[str, TensorSource]:
    """The three checkpoints of a merge, each opened on its own (a path given twice is mapped twice; a streamed
    repository given twice is opened once)."""
    return open_sources(dict(zip(TRIO_ROLES, (target, sft, grpo))), headers_only, share=False, stream=stream)


def _open_one(label: str, src, headers_only: bool) -> TensorSource:
    if hub.parse_repo_spec(src) is None:
        return open_checkpoint(src, label)
    snapshot = hub.resolve_cached(str(src), label) if headers_only else None
    if headers_only and snapshot is None:
        return hub.RemoteHeaders(str(src), label)
    snapshot = snapshot or hub.resolve(str(src), label)
    ck = open_checkpoint(snapshot.path, label, allowed_roots=[snapshot.blobs])
    ck.source = snapshot.label
    return ck


def close_all(sources: Iterable[TensorSource | None]) -> None:
    """Close each distinct source once (roles may share one)."""
    for s in {id(s): s for s in sources if s is not None}.values():
        s.close()
