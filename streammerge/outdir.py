"""Where an output may go: never inside an input, a sweep root never over a single merge, and what an earlier
sweep left in a root (named, or removed with ``--overwrite``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .checkpoint import TensorSource
from .errors import OutputError
from .recipes import sweep_dirname
from .writer import MANIFEST, read_manifest, remove_output


def refuse_sweep_over_single(out_dir: Path) -> None:
    """A sweep writes ``out/alpha-A/`` directories: refused into a directory holding a single merge's output."""
    if (out_dir / MANIFEST).exists():
        raise OutputError(
            f"{out_dir}: holds a single merge's output; a sweep writes {out_dir}/alpha-A/ directories: "
            "choose another output directory"
        )


def check_output_paths(out: Path, ckpts: Mapping[str, TensorSource | None]) -> None:
    """Refuse an output directory that is, or lies inside, an input's directory, or that holds an input."""
    out_real = Path(os.path.realpath(out))
    for label, ck in ckpts.items():
        if ck is None or ck.root is None:  # no such input, or remote headers: nothing local to protect
            continue
        root = Path(os.path.realpath(ck.root))
        if out_real == root or root in out_real.parents:
            raise OutputError(
                f"{out}: the output directory is, or lies inside, the {label} checkpoint directory {ck.root}; "
                "inputs are never written: choose a directory outside every input"
            )
        if out_real in root.parents:
            raise OutputError(
                f"{out}: the {label} checkpoint {ck.root} lies inside the output directory; choose another output"
            )


def earlier_sweep_outputs(
    root: Path, dirs: list[Path], overwrite: bool, ckpts: Mapping[str, TensorSource | None]
) -> list[str]:
    """After a sweep into ``root``: the outputs an earlier sweep left there for other alphas (``alpha-A`` holding a
    finished merge or apply at alpha ``A``). With ``overwrite`` they are removed (only what their manifests record),
    since the root now stands for this sweep; else they are named, so nobody takes them for this sweep's. Anything
    else is never touched: other directories, unreadable manifests, and an output that is (or holds) an input of
    this run, such as an earlier output used as the target."""
    ours = {d.name for d in dirs}
    others: list[tuple[Path, dict]] = []
    kept: list[str] = []
    for d in sorted(root.glob("alpha-*")):
        if d.name in ours or d.is_symlink() or not d.is_dir():
            continue
        try:
            previous = read_manifest(d)
        except OutputError:
            continue  # not readable as ours: not ours to judge
        o = (previous or {}).get("options", {})
        try:
            named_for_its_alpha = sweep_dirname(float(o.get("alpha"))) == d.name
        except (TypeError, ValueError):
            named_for_its_alpha = False
        if not named_for_its_alpha or o.get("kind", "merge") not in ("merge", "apply"):
            continue
        try:
            check_output_paths(d, ckpts)
        except OutputError:
            kept.append(d.name)  # an input of this run
            continue
        others.append((d, previous or {}))
    if not overwrite:
        if not others:
            return []
        names = ", ".join(d.name for d, _ in others)
        return [f"sweep: {root} also holds {names} from an earlier sweep (not this one's; --overwrite removes them)"]
    notes = [f"sweep: kept {name} of an earlier sweep: it is an input of this one" for name in kept]
    for d, previous in others:
        why = remove_output(d, previous)
        notes.append(f"sweep: removed {d.name} of an earlier sweep (--overwrite)" if why is None else f"sweep: {why}")
    return notes
