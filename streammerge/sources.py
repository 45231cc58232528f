"""Open the inputs of a merge, one per role: local checkpoints, Hub snapshots, or remote headers for planning."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from . import hub
from .checkpoint import TensorSource, open_checkpoint
from .errors import StreamMergeError

TRIO_ROLES = ("target", "sft", "grpo")


def open_sources(
    sources: Mapping[str, object],
    headers_only: bool = False,
    share: bool = True,
    where: Mapping[str, str] | None = None,
) -> dict[str, TensorSource]:
    """Open a source per role (``{"target": path_or_repo_id, ...}``). Hub repository ids are resolved to snapshots
    (their commit recorded); with ``headers_only``, a repository not in the local cache is read as remote headers,
    downloading no weights. With ``share``, roles naming the same source share one opened checkpoint (one mapping:
    the CUDA engine registers its pages once). ``where`` prefixes a role's errors (a spec's file and key). On any
    error every source opened so far is closed."""
    opened: dict[str, TensorSource] = {}
    by_src: dict[str, TensorSource] = {}
    try:
        for label, src in sources.items():
            key = os.fspath(src)
            if share and key in by_src:
                opened[label] = by_src[key]
                continue
            try:
                opened[label] = by_src[key] = _open_one(label, src, headers_only)
            except StreamMergeError as e:
                if where is None or label not in where:
                    raise
                raise type(e)(f"{where[label]}: {e}") from None
    except BaseException:
        close_all(opened.values())
        raise
    return opened


def open_trio(target, sft, grpo, headers_only: bool = False) -> dict[str, TensorSource]:
    """The three checkpoints of a merge, each opened on its own (a path given twice is mapped twice)."""
    return open_sources(dict(zip(TRIO_ROLES, (target, sft, grpo))), headers_only, share=False)


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
