"""Process memory figures from /proc (Linux), with a portable fallback."""

from __future__ import annotations

import resource
import sys


def _proc_kib(path: str, key: bytes) -> int | None:
    """The ``key: N kB`` field of a /proc file in bytes (None where absent or unreadable)."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_anon() -> int:
    """Anonymous resident memory of this process in bytes (RssAnon: our own buffers, not mapped file pages)."""
    n = _proc_kib("/proc/self/status", b"RssAnon:")
    return n if n is not None else peak_rss()


def peak_rss() -> int:
    """Peak resident set size (file pages included) of this process in bytes."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    return _proc_kib("/proc/meminfo", b"MemAvailable:")
