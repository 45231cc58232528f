"""Shared fixtures: tiny synthetic checkpoints built once per session (helpers in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SMALL_SHAPES, make_related, write_checkpoint


@pytest.fixture(scope="session")
def small_trio(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Three related bf16 checkpoints, each sharded differently (1, 3 and 2 files)."""
    root = tmp_path_factory.mktemp("trio")
    t, s, g = make_related(SMALL_SHAPES)
    return (
        write_checkpoint(root / "target", t, shards=1),
        write_checkpoint(root / "sft", s, shards=3),
        write_checkpoint(root / "grpo", g, shards=2),
    )
