"""How a command ends when it fails: one table from exception to message and exit code, and the runner using it."""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import typer

from ..errors import StreamMergeError
from .output import stderr

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM, turned into an exception so temporary files are removed on the way out."""


class Outcome(NamedTuple):
    """What a command prints (on stderr) and exits with when its body raises ``exc_type``."""

    exc_type: type[BaseException]
    message: Callable[[Any], str]
    exit_code: int
    traceback_when_debugging: bool  # with STREAMMERGE_DEBUG set


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"error: {where}{e.strerror or e}"


# First match wins. typer's own exits (a command's typer.Exit, typer.Abort) and SystemExit pass through untouched.
OUTCOMES: tuple[Outcome, ...] = (
    Outcome(StreamMergeError, lambda e: f"error: {e}", EXIT_ERROR, True),
    Outcome(
        KeyboardInterrupt,
        lambda e: "interrupted: temporary files removed, no output was completed",
        EXIT_INTERRUPTED,
        False,
    ),
    Outcome(
        Terminated, lambda e: "terminated: temporary files removed, no output was completed", EXIT_TERMINATED, False
    ),
    Outcome(MemoryError, lambda e: "error: out of memory; lower --chunk-size", EXIT_ERROR, False),
    Outcome(OSError, _os_error, EXIT_ERROR, True),
    # a bug: one line unless debugging
    Outcome(
        Exception,
        lambda e: f"internal error: {type(e).__name__}: {e} (set STREAMMERGE_DEBUG=1 for the traceback, and report it)",
        EXIT_ERROR,
        True,
    ),
)
PASS_THROUGH = (typer.Exit, typer.Abort)


def outcome_of(e: BaseException) -> Outcome | None:
    """The row of :data:`OUTCOMES` for `e`; None for what passes through."""
    if isinstance(e, PASS_THROUGH):
        return None
    return next((o for o in OUTCOMES if isinstance(e, o.exc_type)), None)


def run_command(body: Callable[[], Any]) -> Any:
    """Run a command's body: a failure becomes one line on stderr and its exit code (:data:`OUTCOMES`); Ctrl-C
    exits 130 and SIGTERM 143, after the library removed its temporary files."""
    debug = os.environ.get("STREAMMERGE_DEBUG", "") not in ("", "0")
    old = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise Terminated()

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (e.g. embedded use)
        old = None
    try:
        return body()
    except BaseException as e:
        outcome = outcome_of(e)
        if outcome is None:
            raise
        if debug and outcome.traceback_when_debugging:
            traceback.print_exc()
        stderr(outcome.message(e))
        raise typer.Exit(outcome.exit_code) from None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
