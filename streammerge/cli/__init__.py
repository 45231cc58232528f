"""The ``streammerge`` command line: a thin layer over the library calls, one module per command group.

``args`` holds the shared arguments and builds every merge option's flags from `streammerge.options.OPTIONS`,
``errors`` maps exceptions to messages and exit codes, ``output`` prints; ``root`` registers the commands.
"""

from .root import app, main

__all__ = ["app", "main"]
