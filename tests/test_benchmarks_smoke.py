"""The benchmark suite's smoke run (``python -m benchmarks.run --smoke``), so the harness cannot rot.

Runs in a subprocess from the repository root (``benchmarks`` is a top-level package there, not part of the
wheel), writing its results and work files under pytest's tmp_path, never into benchmarks/results/.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# The smoke run itself takes ~30 s on the 2-core development machine; leave room for a loaded one.
SMOKE_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the harness reads /proc")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--smoke",
        "--peers",
        "naive",  # mergekit, when installed, adds ~20 s of start-up: the full suite covers it
        "--workdir",
        str(tmp / "work"),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert done.returncode == 0, f"smoke run failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads((out / "smoke.json").read_text()), out


def test_result_files_written(smoke):
    _, out = smoke
    for name in ("smoke.json", "smoke.csv", "smoke-runs.csv", "smoke.md"):
        assert (out / name).stat().st_size > 0, name


def test_machine_and_settings_recorded(smoke):
    results, _ = smoke
    m = results["machine"]
    for key in ("cpu_model", "cores", "mem_total", "kernel", "python", "versions", "load_average_at_start"):
        assert m[key], key
    for pkg in ("streammerge", "torch", "safetensors"):
        assert m["versions"][pkg], pkg
    assert results["settings"]["smoke"] is True
    assert results["settings"]["repeats"] == 1
    assert results["mergekit"]["status"] in ("installed", "not installed")
    assert "normalize: false" in results["mergekit"]["yaml_bf16"]


def test_streammerge_correct_and_measured(smoke):
    results, _ = smoke
    (size,) = results["sizes"]
    rows = {row["tool"]: row for row in size["summary"]}
    sm = rows["streammerge-cpu"]
    assert sm["status"] == "ok"
    assert sm["correct"] is True
    for key in ("wall_min_s", "wall_median_s", "gbps_median", "ratio_to_floor_median", "peak_rss_anon", "peak_rss"):
        assert sm[key] > 0, key
    assert size["correctness"]["streammerge-cpu"]["ok"] is True
    assert size["correctness"]["streammerge-cpu"]["full"] is True
    assert rows["floor"]["status"] == "ok"
    run = next(r for r in size["runs"] if r["tool"] == "streammerge-cpu")
    assert run["cache_residency_before"] >= 0.99  # warm
    assert run["reported"]["shard_sha256"]


def test_naive_peer_compared_in_ulps(smoke):
    results, _ = smoke
    (size,) = results["sizes"]
    naive = size["correctness"]["naive"]
    assert naive["identical"] is True  # float32 math in the contract's op order, one rounding
    assert naive["differing_elements"] == 0 and naive["max_ulps"] == 0
    assert naive["elements"] == size["correctness"]["streammerge-cpu"]["elements_total"]


def test_sparse_section(smoke):
    results, _ = smoke
    sparse = results["sparse"]
    assert sparse["plan_ok"] is True
    assert sparse["plan"]["bytes_read"] > 0 and sparse["plan"]["disk_needed"] > 0
    merges = {m["sink"]: m for m in sparse["merges"] if m["device"] == "cpu"}
    assert set(merges) == {"null", "disk"}
    for merge in merges.values():
        assert merge["ok"] is True and merge["within_bound"] is True, merge
    assert merges["disk"]["reference_ok"] is True


def test_csv_has_summary_fields(smoke):
    _, out = smoke
    with open(out / "smoke.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"floor", "streammerge-cpu", "streammerge-cpu-null", "naive"} <= {r["tool"] for r in rows}
    for field in ("wall_median_s", "gbps_median", "ratio_to_floor_median", "peak_rss_anon", "peak_rss", "correct"):
        assert field in rows[0], field


def test_sweep_benchmark_smoke(tmp_path):
    """benchmarks.sweep on a 4 MB trio: one sweep and three single runs, outputs compared by SHA-256."""
    cmd = [sys.executable, "-m", "benchmarks.sweep", "--smoke", "--modes", "warm-disk,warm-null"]
    cmd += ["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "res")]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "res" / "sweep-smoke.json").read_text())
    for mode in ("warm-disk", "warm-null"):
        m = result["summary"]["modes"][mode]
        assert m["outputs_identical"] is True
        assert m["separate_bytes_read"] == 3 * m["sweep_bytes_read"] > 0
    assert result["machine"]["cores"] and result["page_cache"]


def test_gpu_check_plumbing_on_the_simulated_device(tmp_path):
    """benchmarks.gpu_check --size tiny without a GPU: the CUDA engine on the simulated device through every step
    that does not need a real GPU, so the one-shot script cannot rot between GPU sessions."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU, benchmarks.gpu_check runs for real")
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--size", "tiny", "--workdir", str(tmp_path / "w")]
    cmd += ["--out", str(tmp_path / "res"), "--steps", "env,generate,pipeline,e2e,sweep"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "failed steps: none" in done.stdout, done.stdout[-3000:]
    result = json.loads(next((tmp_path / "res").glob("gpu_check-*.json")).read_text())
    steps = result["steps"]
    cuda_runs = {k: r for k, r in steps["pipeline"]["runs"].items() if k.startswith("cuda")}
    assert cuda_runs and all(r.get("bytes_equal_cpu") for r in cuda_runs.values())
    # They ran on the CUDA engine (on the simulated device), not on an engine chosen for the machine.
    assert all("engine: cuda (gpu_check)" in r["warnings"] for r in cuda_runs.values()), cuda_runs
    assert steps["e2e"]["bytes_equal"] is True
    assert steps["sweep"]["bytes_equal"] is True and steps["sweep"]["combine_bytes_equal"] is True


def _fake_wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel (what pip needs to install one offline)."""
    import zipfile

    info = f"{name}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in [*files, f"{info}/RECORD"])
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def test_gpu_check_runs_the_peer_from_carried_wheels(tmp_path, monkeypatch):
    """The device machine has no package registry: mergekit travels as wheels in .whl/ (``make peer-wheels``).
    gpu_check installs them into a private folder seen only by the mergekit process, which then runs with them."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.gpu_check import peer

    wheels = tmp_path / "whl"
    wheels.mkdir()
    monkeypatch.setattr(peer, "PEER_WHEELS", wheels)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # as on the device: no mergekit-yaml
    cmd, env, source = peer.mergekit_command(tmp_path)
    assert cmd is None and "make peer-wheels" in source

    script = "import sys, pathlib, helper\npathlib.Path(sys.argv[2]).write_text(helper.VALUE + ' ' + sys.argv[3])\n"
    _fake_wheel(
        wheels,
        "mergekit",
        "0.1.5",
        {"mergekit/__init__.py": "", "mergekit/scripts/__init__.py": "", "mergekit/scripts/run_yaml.py": script},
    )
    _fake_wheel(wheels, "helper", "1.0", {"helper.py": "VALUE = 'carried'\n"})
    cmd, env, source = peer.mergekit_command(tmp_path)
    assert cmd is not None, source
    assert source == "carried wheels (2)"
    # The carried packages are visible to the peer's process only, not to this one.
    assert str(tmp_path / "peer-site") in env["PYTHONPATH"]
    assert "helper" not in sys.modules
    done = subprocess.run([*cmd, "cfg.yml", str(tmp_path / "marker"), "--cuda"], env={**os.environ, **env})
    assert done.returncode == 0
    assert (tmp_path / "marker").read_text() == "carried --cuda"


def test_gpu_check_keeps_the_parts_of_a_step_that_failed(tmp_path, monkeypatch):
    """A step that dies half way keeps what it measured: each part is saved as it completes (a step killed on its
    timeout is read back the same way), so one hang on the lent GPU does not lose the figures before it."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.gpu_check import runner

    def step(state):
        res = {"first": 1.5}
        runner.save_partial(res)
        raise RuntimeError("the driver went away")

    state, result = tmp_path / "state.json", tmp_path / "step-fake.json"
    state.write_text(json.dumps({"workdir": str(tmp_path), "steps": {}}))
    assert runner.run_child(step, state, result) == 0
    got = json.loads(result.read_text())
    assert got["first"] == 1.5 and "the driver went away" in got["error"]
    assert runner.read_json(tmp_path / "missing.json") == {}
    # The parent keeps the step's own error; a result left partial without one says the process did not finish.
    assert "the driver went away" in runner.settle({**got, "partial": True}, 0)["error"]
    assert (
        runner.settle({"first": 1.5, "partial": True}, -9)["error"] == "step process exited with -9 before it finished"
    )
    assert "error" not in runner.settle({"first": 1.5}, 0)
