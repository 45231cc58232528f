"""The command line: exit codes, one-line errors without tracebacks, dry runs that write nothing, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
from helpers import load_all, make_related, write_checkpoint
from typer.testing import CliRunner

from streammerge.cli import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_merge_ok(small_trio, tmp_path):
    r = _invoke("merge", *small_trio, "-o", tmp_path / "out", "--device", "cpu", "--chunk-size", "64KiB")
    assert r.exit_code == 0, r.output
    assert "merged 9 tensors" in r.output and "GB/s" in r.output and "engine: cpu" in r.output
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_cli_options_reach_the_merge(small_trio, tmp_path):
    import numpy as np
    from helpers import raw_bits
    from reference import expected_bits

    out = tmp_path / "out"
    r = _invoke("merge", *small_trio, "-o", out, "--alpha", "-0.75", "--out-dtype", "fp32", "--max-shard-size", "30KB")
    assert r.exit_code == 0, r.output
    T, S, G, M = (load_all(p) for p in (*small_trio, out))
    assert (out / "model.safetensors.index.json").exists()
    for k in T:
        want = expected_bits(raw_bits(T[k]), raw_bits(S[k]), raw_bits(G[k]), -0.75, ("BF16",) * 3, "F32")
        assert M[k].dtype == torch.float32 and np.array_equal(raw_bits(M[k]), want), k


def test_merge_json_report(small_trio, tmp_path):
    import json

    r = _invoke("merge", *small_trio, "-o", tmp_path / "out", "--json", "--device", "cpu")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["tensors_merged"] == 9 and d["bytes_read"] > 0 and d["peak_rss_anon"] > 0


def test_errors_are_one_line_exit_1(small_trio, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 16)
    r = _invoke("merge", bad, small_trio[1], small_trio[2], "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    assert r.output.startswith("error: ") and str(bad / "model.safetensors") in r.output
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(small_trio, tmp_path):
    assert _invoke("merge", *small_trio).exit_code == 2  # no -o
    assert _invoke("merge", "--frobnicate").exit_code == 2
    assert _invoke().exit_code in (0, 2)  # no_args_is_help


def test_bad_option_values_exit_1(small_trio, tmp_path):
    r = _invoke("merge", *small_trio, "-o", tmp_path / "o", "--chunk-size", "lots")
    assert r.exit_code == 1 and "cannot parse" in r.output
    r = _invoke("merge", *small_trio, "-o", tmp_path / "o", "--missing", "sometimes")
    assert r.exit_code == 1 and "--missing" in r.output


def test_dry_run_and_plan_write_nothing(small_trio, tmp_path):
    out = tmp_path / "out"
    r = _invoke("merge", *small_trio, "-o", out, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "merged" in r.output and "disk" in r.output and "memory" in r.output
    r = _invoke("plan", *small_trio, "-o", out, "--json")
    assert r.exit_code == 0 and '"bytes_read"' in r.output
    assert not out.exists()


def test_plan_fails_like_merge(tmp_path):
    t, s, g = make_related({"a": (4,), "b": (4,)})
    del s["b"]
    dirs = [write_checkpoint(tmp_path / n, sd) for n, sd in zip("tsg", (t, s, g))]
    r = _invoke("plan", *dirs)
    assert r.exit_code == 1 and "missing from sft/grpo" in r.output and "Traceback" not in r.output
    assert _invoke("plan", *dirs, "--missing", "copy-target").exit_code == 0


def test_inspect(small_trio):
    r = _invoke("inspect", small_trio[1])
    assert r.exit_code == 0
    assert "3 file(s)" in r.output and "BF16: 9" in r.output


def test_help_has_examples():
    for cmd in ("merge", "plan", "inspect", "demo"):
        r = _invoke(cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.output, cmd


def test_python_m_and_console_script(small_trio, tmp_path):
    r = subprocess.run([sys.executable, "-m", "streammerge", "version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("streammerge ")
    r = subprocess.run(
        [sys.executable, "-m", "streammerge", "merge", *map(str, small_trio), "-o", str(tmp_path / "o"), "-q"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def test_sigint_exits_130_and_leaves_nothing_complete(tmp_path):
    # Big enough that the merge is still running when the signal arrives.
    shapes = {f"w{i}": (2048, 2048) for i in range(24)}
    t, s, g = make_related(shapes, dtype="F32")
    dirs = [write_checkpoint(tmp_path / n, sd) for n, sd in zip("tsg", (t, s, g))]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streammerge",
            "merge",
            *map(str, dirs),
            "-o",
            str(out),
            "--chunk-size",
            "64KiB",
            "--device",
            "cpu",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # A shell's background job (nohup ... &, some CI runners) starts with SIGINT ignored, and Python then keeps
        # ignoring it, as it should: give the child the default disposition, as a terminal's Ctrl-C would find it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob(".*.partial")):
        time.sleep(0.02)
    assert list(out.glob(".*.partial")), "merge never started writing"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not list(out.glob(".*.partial")) and not (out / "model.safetensors").exists()


def test_demo_runs(tmp_path):
    r = _invoke("demo", "--dir", tmp_path / "demo", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "merged" in r.output and "GB/s" in r.output
    merged = load_all(tmp_path / "demo" / "merged")
    assert merged and all(isinstance(v, torch.Tensor) for v in merged.values())


def test_gpu_options_reach_the_cuda_engine():
    from streammerge.options import MergeOptions
    from streammerge.run import cuda_engine

    e = cuda_engine(MergeOptions.create(gpu_window_bytes="64MiB", gpu_register=False, gpu_slots=3))
    assert (e.window_bytes, e.register_windows, e.slots) == (64 * 2**20, False, 3)
    r = _invoke("merge", "a", "b", "c", "-o", "x", "--gpu-slots", "0")
    assert r.exit_code == 1 and "GPU slots" in r.output
