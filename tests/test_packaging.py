"""Packaging: the wheel ships kernels/ only as streammerge.kernels; the package works without triton."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("streammerge-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "streammerge/kernels/reference.py" in names
    assert "streammerge/kernels/triton_merge.py" in names
    assert "streammerge/engines/cpu.py" in names
    synth_modules = ("__init__", "layouts", "values", "files", "dense", "sparse")
    assert {f"streammerge/synth/{m}.py" for m in synth_modules} <= set(names)
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package would clash with PyPI's"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "streammerge = streammerge.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_imports_from_its_own_files(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import streammerge, streammerge.kernels.reference as r, importlib.util;"
        "print(streammerge.__file__); print(r.__file__);"
        "print(importlib.util.find_spec('kernels') is None or 'site' not in str(importlib.util.find_spec('kernels')))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    mod, kern, no_top_level = r.stdout.split()
    assert mod.startswith(str(site)) and kern.startswith(str(site)) and no_top_level == "True"


def test_cpu_engine_runs_without_triton(small_trio, tmp_path):
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import streammerge\n"
        f"r = streammerge.merge({str(small_trio[0])!r}, {str(small_trio[1])!r}, {str(small_trio[2])!r}, "
        f"{str(tmp_path / 'out')!r})\n"
        "print(r.device, r.tensors_merged)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cpu", "9"]
