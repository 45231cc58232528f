"""What an output is made of: the input guard (inputs must not change under a merge) and the merge's identity
(input files, byte-relevant options, layout, fingerprint) that the manifest records and ``--resume`` checks."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import CheckpointError
from .plan import FORMULAS, MergePlan, PlanKind
from .version import __version__


class InputGuard:
    """Every input file's size, mtime, ctime and inode when its header was read; :meth:`check` raises if any changed.

    A checkpoint rewritten in place during a merge (a download or a save still running) would give an output that
    mixes old and new bytes. The writer calls :meth:`check` before it gives an output file its final name, after
    every read that file's bytes came from, so such a file is never published. ctime is compared too: a copy that
    restores the old mtime (``cp -p``, ``rsync -t``) still moves it. (A file that shrinks is caught sooner, by the
    size check before every read in `Checkpoint.view`.)"""

    def __init__(self, ckpts: Mapping[str, Checkpoint | None]):
        self._stats: dict[Path, tuple[int, ...]] = {}
        for ck in ckpts.values():
            if ck is None:
                continue
            for f, st in zip(ck.files, ck.file_stats):
                self._stats.setdefault(f, self._key(st))

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

    @classmethod
    def _stat(cls, f: Path) -> tuple[int, ...]:
        try:
            return cls._key(f.stat())
        except OSError:
            return ()

    def check(self) -> None:
        for f, before in self._stats.items():
            now = self._stat(f)
            if now == before:
                continue
            if not now:
                what = "removed"
            elif now[0] != before[0]:
                what = f"{before[0]} bytes then, {now[0]} now"
            elif now[3:] != before[3:]:
                what = "replaced by another file"
            else:
                what = "modified in place: its mtime or ctime changed"
            raise CheckpointError(
                f"{f}: input changed while merging ({what}); the output could mix old and new bytes, so nothing "
                "more was published. Wait until the input is complete and stable, then run again with --overwrite"
            )


def input_identity(ckpts: Mapping[str, Checkpoint | None]) -> dict[str, list[dict]]:
    """Per role, each input file's name, size, mtime, ctime and header SHA-256 (a checkpoint in several roles is read
    once); for a streamed Hub input, its name, size, header SHA-256, repository at its commit and SHA-256."""
    inputs: dict[str, list[dict]] = {}
    seen: dict[int, list[dict]] = {}
    for label, ck in ckpts.items():
        if ck is None:
            continue
        if id(ck) not in seen and getattr(ck, "remote_identity", None) is not None:
            seen[id(ck)] = ck.remote_identity  # a streamed Hub input: its files are not on disk yet
        if id(ck) not in seen:
            entries = []
            for f in ck.files:
                st = f.stat()
                with open(f, "rb") as fh:
                    head = fh.read(8)
                    n = int.from_bytes(head, "little") if len(head) == 8 else 0
                    hh = hashlib.sha256(head + fh.read(n)).hexdigest()
                entries.append(
                    {
                        "file": f.name,
                        "size": st.st_size,
                        "mtime_ns": st.st_mtime_ns,
                        # moved by a rewrite that restores the mtime (cp -p, rsync -t): resume must not trust it
                        "ctime_ns": st.st_ctime_ns,
                        "header_sha256": hh,
                    }
                )
            seen[id(ck)] = entries
        inputs[label] = seen[id(ck)]
    return inputs


def merge_identity(p: MergePlan, ckpts: Mapping[str, Checkpoint | None], inputs: dict | None = None) -> dict:
    """What makes a merge's output what it is: input files (size, mtime, header hash), byte-relevant options and
    the output layout, with a fingerprint over all of it. Recorded in the manifest; ``resume`` requires a match.
    ``inputs``: :func:`input_identity` of ``ckpts`` when already computed (a sweep's outputs share it)."""
    inputs = inputs if inputs is not None else input_identity(ckpts)
    # the byte-relevant options as declared (options.IDENTITY_FIELDS), then what the plan adds
    options = {
        **p.options.identity(),
        "kind": p.kind,
        **({"vectors": p.vectors} if p.kind is PlanKind.COMBINE else {}),
        # block sizes come from config.json, which no header hash covers: a changed one must not resume
        **({"fp8_blocks": {role: v["block"] for role, v in p.fp8["inputs"].items()}} if p.fp8.get("inputs") else {}),
    }
    layout = [{"name": f.name, "size": f.size, "header_sha256": hashlib.sha256(f.header).hexdigest()} for f in p.files]
    identity = {
        "streammerge_version": __version__,
        "formula": FORMULAS[p.kind],
        "sources": p.sources,
        "inputs": inputs,
        "options": options,
        "layout": layout,
    }
    blob = json.dumps({k: identity[k] for k in ("streammerge_version", "inputs", "options", "layout")}, sort_keys=True)
    identity["fingerprint"] = hashlib.sha256(blob.encode()).hexdigest()
    return identity
