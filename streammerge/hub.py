"""Hugging Face Hub sources (resolve a repository id, or read its remote headers) and upload.

A source that is not an existing local path and looks like ``org/name`` or ``org/name@revision`` is resolved with
``huggingface_hub.snapshot_download`` (only safetensors, JSON, tokenizer and chat-template files; never pickle
weights). huggingface_hub itself honours ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and tokens
(``HF_TOKEN`` or ``hf auth login``). Snapshot files are symlinks into the repository's ``blobs/`` store, which is
the one place outside the snapshot directory they may resolve to.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import TensorRef
from .dtypes import DTYPE_BITS
from .errors import CheckpointError, OutputError

# Only what a merge reads or copies: weights in safetensors, index/config JSON, tokenizer and chat-template files.
HUB_PATTERNS = [
    "*.safetensors",
    "*.json",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
]
_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str | None
    path: Path  # the local snapshot directory
    commit: str  # the resolved commit hash

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.commit}"

    @property
    def blobs(self) -> Path:
        return self.path.parent.parent / "blobs"


def parse_repo_spec(spec: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``spec`` names a Hub repository rather than an existing local path."""
    s = os.fspath(spec)
    if os.path.exists(s) or s.startswith((".", "/", "~")) or s.count("/") != 1 and "@" not in s:
        return None
    m = _REPO_RE.match(s)
    if not m or m.group("repo").count("/") != 1:
        return None
    return m.group("repo"), m.group("rev")


def resolve(spec: str, label: str = "") -> HubSource:
    """Download (or find in the cache) the snapshot of a Hub repository; raises `CheckpointError` with advice."""
    parsed = parse_repo_spec(spec)
    if parsed is None:
        raise CheckpointError(f"{spec}: not a Hub repository id (expected org/name or org/name@revision)")
    repo_id, revision = parsed
    from huggingface_hub import snapshot_download

    with explained(spec, label, revision):
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    return HubSource(repo_id, revision, path, path.name)


@contextlib.contextmanager
def explained(spec: str, label: str = "", revision: str | None = None) -> Iterator[None]:
    """Turn a failure of the Hub client inside the block into one `CheckpointError` saying what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = spec.split("@", 1)[0]
    who = f"{label} checkpoint: " if label else ""
    try:
        yield
    except GatedRepoError:
        raise CheckpointError(
            f"{who}{spec}: gated repository; accept its terms on the Hub and log in (HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{who}{spec}: repository not found (or private: set HF_TOKEN); for a local path, check it exists"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{who}{spec}: revision {revision!r} not found in {repo_id}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{who}{spec}: not in the local Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE is "
            f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}); download it first or unset HF_HUB_OFFLINE"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{who}{spec}: cannot download from the Hub ({' '.join(str(e).split())})") from None
    except ValueError as e:  # HFValidationError: not a valid repo id (or a mistyped local path)
        raise CheckpointError(f"{who}{spec}: no such local path, and not a valid Hub repository id ({e})") from None


def push(out_dir: str | os.PathLike, repo_id: str, *, private: bool = False, commit_message: str | None = None) -> str:
    """Upload a streammerge output folder to the Hub (``HfApi.upload_folder``); returns the commit URL.

    Only uploads: the caller decides whether the output may go (``run`` verifies it first, so a partial or damaged
    output is never uploaded). Hidden files (the manifest, temporaries) are not uploaded.

    Raises:
        [`OutputError`]: the upload failed.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(out_dir),
            repo_type="model",
            commit_message=commit_message or "Upload merge made with streammerge",
            ignore_patterns=[".*", "**/.*"],
        )
    except Exception as e:  # noqa: BLE001 - any failure of the Hub client becomes one clear message
        raise OutputError(f"{out_dir}: push to {repo_id} failed ({type(e).__name__}: {e})") from None
    return str(getattr(info, "commit_url", info))


def resolve_cached(spec: str, label: str = "") -> HubSource | None:
    """The snapshot of ``spec`` if the local cache already has it (no network, nothing downloaded), else None."""
    parsed = parse_repo_spec(spec)
    if parsed is None:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(
            snapshot_download(parsed[0], revision=parsed[1], allow_patterns=HUB_PATTERNS, local_files_only=True)
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return HubSource(parsed[0], parsed[1], path, path.name)


class RemoteHeaders:
    """A Hub checkpoint known only by its safetensors headers (``get_safetensors_metadata``: a few HTTP range
    requests, no weights downloaded). Enough to plan a merge; it cannot be merged from."""

    def __init__(self, spec: str, label: str = ""):
        from huggingface_hub import get_safetensors_metadata
        from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError

        parsed = parse_repo_spec(spec)
        if parsed is None:
            raise CheckpointError(f"{spec}: not a Hub repository id")
        self.repo_id, self.revision = parsed
        self.label = label
        who = f"{label} checkpoint: " if label else ""
        try:
            meta = get_safetensors_metadata(self.repo_id, revision=self.revision)
        except NotASafetensorsRepoError:
            raise CheckpointError(f"{who}{spec}: has no model.safetensors or index on the Hub") from None
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise CheckpointError(f"{who}{spec}: cannot read remote headers ({e})") from None
        self.source = f"{self.repo_id}@{self.revision or 'main'}"
        self.root = None
        self.index_path = None
        self.files = [Path(name) for name in meta.files_metadata]
        first = next(iter(meta.files_metadata.values()), None)
        self._metadata: dict[str, str] = dict(first.metadata or {}) if first is not None else {}
        self.tensors: dict[str, TensorRef] = {}
        for i, (fname, fm) in enumerate(meta.files_metadata.items()):
            for name, info in fm.tensors.items():
                if info.dtype not in DTYPE_BITS:
                    raise CheckpointError(f"{who}{spec}/{fname}: tensor {name!r} has unknown dtype {info.dtype!r}")
                begin, end = info.data_offsets
                self.tensors[name] = TensorRef(name, info.dtype, tuple(info.shape), i, begin, end - begin)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def aux_files(self) -> list[Path]:
        return []

    def close(self) -> None:
        pass
