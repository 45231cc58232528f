"""Start-up: the commands that only read headers never import torch or triton (1.5-2 s of a short command)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import streammerge

HEAVY = ("torch", "triton", "safetensors", "numpy")
# Runs the CLI as `streammerge ARGS` and reports, at exit, which heavy libraries were imported (exit status kept).
_PROBE = """
import atexit, json, sys
atexit.register(lambda: print("MODULES=" + json.dumps([m for m in {heavy!r} if m in sys.modules]), file=sys.stderr))
from streammerge.cli import main
sys.argv = ["streammerge", *sys.argv[1:]]
main()
"""


def _heavy_modules(*args: str) -> tuple[int, list[str], str]:
    r = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True, timeout=120
    )
    line = next(x for x in r.stderr.splitlines() if x.startswith("MODULES="))
    return r.returncode, json.loads(line[len("MODULES=") :]), r.stdout + r.stderr


@pytest.fixture(scope="module")
def merged(small_trio, tmp_path_factory):
    out = tmp_path_factory.mktemp("startup") / "out"
    streammerge.merge(*small_trio, out, device="cpu")
    return out


@pytest.mark.parametrize(
    "args",
    [("--help",), ("merge", "--help"), ("plan", "--help"), ("combine", "--help")],
    ids=lambda a: " ".join(a),
)
def test_help_imports_no_heavy_library(args) -> None:
    code, heavy, out = _heavy_modules(*args)
    assert code == 0, out
    assert heavy == [], f"`streammerge {' '.join(args)}` imported {heavy}"


def test_plan_inspect_and_checksum_verify_import_no_heavy_library(small_trio, merged, tmp_path) -> None:
    runs = {
        "plan": ("plan", *map(str, small_trio), "-o", str(tmp_path / "x")),
        "plan --json": ("plan", *map(str, small_trio), "--json"),
        "inspect": ("inspect", str(small_trio[0])),
        "verify": ("verify", str(merged)),
    }
    for what, args in runs.items():
        code, heavy, out = _heavy_modules(*args)
        assert code == 0, f"{what}: {out}"
        assert heavy == [], f"`streammerge {what}` imported {heavy}"


def test_the_probe_sees_a_heavy_import(small_trio, merged) -> None:
    """The check above can fail: verify with inputs recomputes chunks, which needs torch."""
    code, heavy, out = _heavy_modules(
        "verify", str(merged), *sum(zip(("--target", "--sft", "--grpo"), map(str, small_trio)), ())
    )
    assert code == 0, out
    assert "torch" in heavy
