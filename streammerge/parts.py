"""A merge split by output file: which part writes which files, each part's record, and the finalize step.

A merge is embarrassingly parallel by output file: each output shard depends only on its own tensors' inputs, and the
plan lays out every shard from headers alone. So N processes that plan the same merge agree on the files without
talking, and :func:`assign_files` gives each a share balanced by bytes. Part ``I`` of ``N`` writes its files at
their final names and records them (size, SHA-256) in ``.streammerge.part-I-of-N.json``. It also writes the plan
record and hidden copies of the small files, the same bytes from every part. It never writes the index. When every
file of the plan is recorded, :func:`finalize_parts` publishes the small files and the index, then marks the manifest
complete. torchrun ranks (rank 0 finalizes after a barrier) and independent ``--part I/N`` jobs followed by
``streammerge finalize`` take this same path.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import INDEX_FILE
from .errors import OptionsError, OutputError
from .faults import crash_point
from .plan import MergePlan
from .writer import MANIFEST, PLAN_RECORD, SMALL_PREFIX, STATE_COMPLETE, Share, read_manifest, write_small_file

PART_RECORD_RE = re.compile(r"^\.streammerge\.part-(\d{5})-of-(\d{5})\.json$")


@dataclass(frozen=True)
class Part:
    """Part ``index`` (0-based) of ``count``: torchrun rank ``index`` of world size ``count``, or ``--part I/N`` with
    ``I = index + 1``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise OptionsError(f"part {self.index + 1}/{self.count}: needs 1 <= I <= N")

    @classmethod
    def parse(cls, text: str) -> Part:
        """``"I/N"`` with 1 <= I <= N (``--part 2/3`` is the second of three)."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise OptionsError(f"--part {text!r}: expected I/N, e.g. 1/4 (the first of four parts)")
        i, n = int(m.group(1)), int(m.group(2))
        if n < 1 or not 1 <= i <= n:
            raise OptionsError(f"--part {text!r}: needs 1 <= I <= N")
        return cls(i - 1, n)

    @property
    def label(self) -> str:
        return f"{self.index + 1}/{self.count}"

    @property
    def record_name(self) -> str:
        return f".streammerge.part-{self.index + 1:05d}-of-{self.count:05d}.json"


def file_costs(plan: MergePlan) -> list[int]:
    """Bytes each output file moves: the input bytes its tensors read plus its own size."""
    return [f.size + sum(t.input_bytes() for t in f.tensors) for f in plan.files]


def assign_files(plan: MergePlan, count: int) -> list[list[int]]:
    """Output files per part, balanced by bytes moved: longest processing time first (files by cost, largest first,
    ties by index), each to the least-loaded part (ties to the lowest). Within 4/3 of the best split. Each part's
    files are in plan order. A pure function of the plan, so every process computes the same split."""
    costs = file_costs(plan)
    loads = [0] * count
    owned: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        k = min(range(count), key=lambda k: (loads[k], k))
        owned[k].append(i)
        loads[k] += costs[i]
    return [sorted(files) for files in owned]


def files_of(plan: MergePlan, part: Part | None) -> set[int]:
    """The output files ``part`` writes (every file when ``part`` is None)."""
    if part is None:
        return set(range(len(plan.files)))
    return set(assign_files(plan, part.count)[part.index])


def read_json(path: Path, what: str) -> dict:
    if path.is_symlink() or not path.is_file():
        raise OutputError(f"{path}: {what} is not a regular file; refusing to use this directory")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError
        return data
    except (OSError, ValueError):
        raise OutputError(f"{path}: unreadable {what}; remove the output directory and start over") from None


def part_records(out_dir: Path) -> dict[str, dict]:
    """Every part record in ``out_dir`` by file name."""
    if not out_dir.is_dir():
        return {}
    return {p.name: read_json(p, "part record") for p in sorted(out_dir.iterdir()) if PART_RECORD_RE.match(p.name)}


def recorded_shards(out_dir: Path, fingerprint: str, manifest: dict | None = None) -> dict[str, dict]:
    """Finished shards that any record of the merge ``fingerprint`` lists (the manifest, then each part record)."""
    shards: dict[str, dict] = {}
    sources = ([manifest] if manifest else []) + list(part_records(out_dir).values())
    for rec in sources:
        if rec.get("fingerprint") == fingerprint and isinstance(rec.get("shards"), dict):
            shards.update({k: v for k, v in rec["shards"].items() if isinstance(v, dict)})
    return shards


def other_merges(out_dir: Path, fingerprint: str) -> list[str]:
    """Part records in ``out_dir`` that belong to another merge (another plan, inputs or options)."""
    return [name for name, rec in part_records(out_dir).items() if rec.get("fingerprint") != fingerprint]


def plan_record(plan: MergePlan, identity: dict, small_names: list[str]) -> bytes:
    """What finalize needs and no part can give alone: the output's identity, files, index and small files. The
    same bytes from every part and every world size."""
    rec = {
        **identity,
        "files": [{"name": f.name, "size": f.size} for f in plan.files],
        "index": plan.index_json() if plan.is_sharded else None,
        "small_files": small_names,
    }
    return (json.dumps(rec, indent=2, default=str) + "\n").encode()


def finalize_parts(out_dir: str | os.PathLike) -> list[str]:
    """Publish a merge whose parts have all finished: check that every output file of the plan is recorded by a
    part of this merge and present with its recorded size, then write the small files, the index and, last, the
    complete manifest; remove the part records. Refuses (naming what is missing) otherwise, touching nothing.
    Returns the files of the finished output."""
    out = Path(out_dir)
    if not (out / PLAN_RECORD).exists():
        if (out / MANIFEST).exists() and not part_records(out):
            raise OutputError(
                f"{out}: not a merge in parts (it has a manifest and no part records): nothing to finalize"
            )
        raise OutputError(
            f"{out}: no plan record ({PLAN_RECORD}): no part of a merge has finished here; run the parts first "
            "(`streammerge merge ... --part I/N`)"
        )
    plan = read_json(out / PLAN_RECORD, "plan record")
    fingerprint = plan.get("fingerprint")
    done = read_manifest(out)
    if done is not None and done.get("state") == STATE_COMPLETE and done.get("fingerprint") == fingerprint:
        # an earlier finalize wrote the complete manifest and was stopped while it cleaned up
        _clean_up(out, plan.get("small_files", []))
        return list(done.get("files", []))
    foreign = other_merges(out, fingerprint)
    if foreign:
        raise OutputError(
            f"{out}: {', '.join(foreign[:4])} come(s) from another plan (other inputs, options or layout) than "
            f"{PLAN_RECORD}; finalize refuses to mix merges: remove the directory and run every part again"
        )
    records = part_records(out)
    shards = recorded_shards(out, fingerprint)
    missing, wrong = [], []
    for f in plan.get("files", []):
        name, size = f.get("name"), f.get("size")
        rec = shards.get(name)
        path = out / name
        if rec is None or not path.exists():
            missing.append(name)
        elif path.is_symlink() or not path.is_file() or path.stat().st_size != size or rec.get("size") != size:
            wrong.append(name)
    if missing or wrong:
        counts = sorted({(r.get("part") or [0, 0])[1] for r in records.values()})
        owners = _owners(plan, records, missing)
        detail = "; ".join(
            [f"not written yet: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}" + owners] * bool(missing)
            + [f"missing or the wrong size: {', '.join(wrong[:6])}"] * bool(wrong)
        )
        raise OutputError(
            f"{out}: cannot finalize: {detail}. Run the missing part(s) (with --resume) and finalize again"
            + (f" (parts seen: of {', '.join(map(str, counts))})" if counts else "")
        )
    small_names = [n for n in plan.get("small_files", []) if isinstance(n, str) and "/" not in n]
    for name in small_names:
        staged = out / f"{SMALL_PREFIX}{name}"
        if not staged.is_file():
            raise OutputError(f"{out}: cannot finalize: {staged.name} is missing; run a part again with --resume")
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(
                f"{out}: a part is still writing this directory; finalize when every part is done"
            ) from None
        # Idempotent: the staged copies, records and plan record are removed only once the complete manifest is
        # written, so a finalize killed at any step is finished by running it again.
        for name in small_names:
            write_small_file(out, name, (out / f"{SMALL_PREFIX}{name}").read_bytes())
        files = [f["name"] for f in plan["files"]] + small_names
        if plan.get("index") is not None:
            write_small_file(out, INDEX_FILE, plan["index"].encode())
            files.append(INDEX_FILE)
        crash_point("index")
        manifest = {k: v for k, v in plan.items() if k not in ("files", "index", "small_files")}
        # the manifest a single process would have written: the same keys, shards in file order
        manifest.update(
            state=STATE_COMPLETE, shards={n: shards[n] for n in (f["name"] for f in plan["files"])}, files=files
        )
        write_small_file(out, MANIFEST, (json.dumps(manifest, indent=2, default=str) + "\n").encode())
        os.fsync(fd)
        crash_point("finalized")
        leftovers = [
            p.name
            for p in out.iterdir()
            if p.name.lstrip(".").startswith("streammerge.") and p.name.endswith(".partial")
        ]
        staged = [f"{SMALL_PREFIX}{name}" for name in small_names]
        for name in [*staged, *records, *leftovers, PLAN_RECORD]:  # killed parts' temporaries too: no part runs now
            (out / name).unlink(missing_ok=True)
        os.fsync(fd)
    finally:
        os.close(fd)
    return files


def _clean_up(out: Path, small_names: list[str]) -> None:
    """After the complete manifest: remove the staged small files, the part records, killed parts' temporaries of
    our hidden files (no part runs now), and the plan record last (its presence lets finalize be run again)."""
    leftovers = [
        p.name for p in out.iterdir() if p.name.lstrip(".").startswith("streammerge.") and p.name.endswith(".partial")
    ]
    staged = [f"{SMALL_PREFIX}{name}" for name in small_names if isinstance(name, str) and "/" not in name]
    for name in [*staged, *part_records(out), *leftovers, PLAN_RECORD]:
        (out / name).unlink(missing_ok=True)


def _owners(plan: dict, records: dict[str, dict], missing: list[str]) -> str:
    """Which part of the latest split owns the missing files, as ``--part`` would name it."""
    latest = max(records.values(), key=lambda r: r.get("written_at", 0), default=None)
    if latest is None or not missing:
        return ""
    assigned = latest.get("assignment") or []
    count = (latest.get("part") or [0, 0])[1]
    want = set(missing)
    parts = [f"{k + 1}/{count}" for k, files in enumerate(assigned) if want & set(files)]
    return f" (part(s) {', '.join(parts)})" if parts else ""


def share_for(
    plan: MergePlan, part: Part, identity: dict, out_dir: Path, small_names: list[str], exclusive: bool = False
) -> Share:
    """What the writer of ``part`` needs: its files, its record, what this merge recorded earlier (for resume)."""
    assignment = assign_files(plan, part.count)
    fingerprint = identity["fingerprint"]
    previous = read_manifest(out_dir) if out_dir.is_dir() else None

    def check() -> None:
        foreign = other_merges(out_dir, fingerprint)
        if foreign:
            raise OutputError(
                f"{out_dir}: {foreign[0]} belongs to another merge (other inputs, options or layout); parts of two "
                "merges never share a directory: choose a new one"
            )

    check()
    return Share(
        files=frozenset(assignment[part.index]),
        record=part.record_name,
        recorded=recorded_shards(out_dir, fingerprint, previous),
        extra={
            "part": [part.index + 1, part.count],
            "assignment": [[plan.files[i].name for i in a] for a in assignment],
        },
        plan_record=plan_record(plan, identity, small_names),
        check=check,
        exclusive=exclusive,
    )
