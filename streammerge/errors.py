"""The exception hierarchy. Every message names the file, the tensor, what was expected and what to do."""

from __future__ import annotations


class StreamMergeError(Exception):
    """Base class of every error streammerge raises on purpose (bad input, bad options, I/O failures)."""


class HeaderError(StreamMergeError):
    """A safetensors header is malformed or inconsistent with its file."""


class CheckpointError(StreamMergeError):
    """A checkpoint (directory, index, shard set) cannot be resolved or is inconsistent."""


class TensorMismatchError(StreamMergeError):
    """Tensors cannot be paired across the checkpoints under the chosen policies."""


class OptionsError(StreamMergeError):
    """Merge options are invalid (alpha, sizes, dtypes, policies)."""


class OutputError(StreamMergeError):
    """The output location cannot be used or written (exists, inside an input, disk full, ...)."""


class NonFiniteError(StreamMergeError):
    """``--strict``: a blended tensor became non-finite where all its inputs were finite."""


class EngineError(StreamMergeError):
    """A compute engine is unavailable or failed."""


def format_name_list(names: list[str], limit: int = 20) -> str:
    """Render a list of names as the first `limit` plus a count of the rest."""
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... and {len(names) - limit} more"
    return shown


class DistributedError(StreamMergeError):
    """A merge across processes cannot go on: ranks disagree, a rank failed, or a collective timed out."""


class DownloadError(CheckpointError):
    """A streamed Hub input (``--stream``) could not be downloaded, even after retries, or did not match what the
    Hub said it holds."""
