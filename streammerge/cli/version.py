"""``streammerge version``: the versions of streammerge and of what it runs on."""

from __future__ import annotations

import sys

from ..version import __version__


def version() -> None:
    """Print the versions of streammerge and its main dependencies."""
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    print(f"streammerge {__version__}, torch {torch.__version__}, triton {tv}, python {sys.version.split()[0]}")
