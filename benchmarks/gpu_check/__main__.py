"""``python -m benchmarks.gpu_check``: runs :func:`benchmarks.gpu_check.cli.main`."""

import sys

from .cli import main

sys.exit(main())
