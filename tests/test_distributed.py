"""One merge across processes: torchrun ranks (gloo on CPU) and independent --part jobs, against a single process.

Every output compared here must be byte-identical to the single-process merge of the same inputs: weights, index,
copied files, model card and manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_related, streammerge_cmd, write_checkpoint

import streammerge
from streammerge.errors import OptionsError, OutputError
from streammerge.parts import Part, assign_files, file_costs
from streammerge.plan import MergePlan, OutFile

SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (96 + 8 * i, 64) for i in range(7)} | {"lm_head.weight": (300, 64)}
# ~40 KB shards: 6 output files, so 2 and 3 ranks all get work, and 7 ranks leave one with none.
KW = ["--device", "cpu", "--max-shard-size", "40KB", "-q"]
LIB_KW = {"device": "cpu", "max_shard_size": "40KB"}
TORCHRUN_TIMEOUT = 180


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    t, s, g = make_related(SHAPES, dtype="F32", seed=11)
    return tuple(write_checkpoint(root / n, sd, shards=k) for n, sd, k in zip("tsg", (t, s, g), (1, 2, 3)))


@pytest.fixture(scope="module")
def reference(trio, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    streammerge.merge(*trio, out, **LIB_KW)
    return out


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _torchrun(nproc: int, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["-m", "streammerge", *map(str, args)]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("STREAMMERGE_DEBUG", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT, env=full_env)


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_output_is_byte_identical(trio, reference, tmp_path, nproc) -> None:
    out = tmp_path / "out"
    r = _torchrun(nproc, "merge", *trio, "-o", out, *KW)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _digests(out) == _digests(reference)
    assert not [p for p in out.iterdir() if p.name.startswith(".streammerge.part")]


def test_ranks_with_no_file_to_write(trio, reference, tmp_path) -> None:
    plan = streammerge.plan(*trio, **LIB_KW)
    n = len(plan.files) + 1
    assert [] in assign_files(plan, n)
    out = tmp_path / "out"
    r = _torchrun(n, "merge", *trio, "-o", out, *KW)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _digests(out) == _digests(reference)


def test_a_sweep_under_torchrun(trio, tmp_path) -> None:
    ref = tmp_path / "ref"
    streammerge.sweep(*trio, ref, [0.5, 1.0], **LIB_KW)
    out = tmp_path / "out"
    r = _torchrun(2, "merge", *trio, "-o", out, "--alpha", "0.5,1", *KW)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("alpha-0.5", "alpha-1"):
        assert _digests(out / name) == _digests(ref / name)


def test_a_killed_rank_fails_the_job_then_resume_with_another_world_size(trio, reference, tmp_path) -> None:
    out = tmp_path / "out"
    r = _torchrun(
        2, "merge", *trio, "-o", out, *KW, env={"STREAMMERGE_CRASH_AT": "shard:3", "STREAMMERGE_CRASH_RANK": "1"}
    )
    assert r.returncode != 0
    assert not (out / "model.safetensors.index.json").exists()
    manifest = out / ".streammerge.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["state"] != "complete"
    finished = [p.name for p in out.iterdir() if p.name.startswith("model-")]
    assert finished, "the finished shards stay for --resume"
    # without --resume the interrupted merge is not silently redone
    again = _torchrun(3, "merge", *trio, "-o", out, *KW)
    assert again.returncode != 0 and "--resume" in again.stdout + again.stderr
    r = _torchrun(3, "merge", *trio, "-o", out, *KW, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _digests(out) == _digests(reference)


def test_resume_without_torchrun_finishes_a_merge_begun_in_parts(trio, reference, tmp_path) -> None:
    out = tmp_path / "out"
    streammerge.merge(*trio, out, part="2/3", **LIB_KW)
    report = streammerge.merge(*trio, out, resume=True, **LIB_KW)
    assert report.resumed_shards == len(assign_files(streammerge.plan(*trio, **LIB_KW), 3)[1])
    assert _digests(out) == _digests(reference)


def test_ranks_given_different_inputs_all_fail(trio, tmp_path) -> None:
    """A wrapper gives rank 1 another alpha: every rank must refuse, naming the disagreement."""
    out = tmp_path / "out"
    script = tmp_path / "odd_rank.py"
    script.write_text(
        "import os, sys\n"
        "from streammerge.cli import main\n"
        "alpha = '0.5' if os.environ['RANK'] == '1' else '1'\n"
        "sys.argv = ['streammerge', *sys.argv[1:], '--alpha', alpha]\n"
        "main()\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    cmd += ["merge", *map(str, trio), "-o", str(out), *KW]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)
    assert r.returncode != 0
    assert r.stderr.count("see different") + r.stdout.count("see different") >= 2, r.stdout + r.stderr
    assert not out.exists() or not any(p.name.startswith("model-") for p in out.iterdir())


@pytest.mark.parametrize("order", [(1, 2, 3), (3, 1, 2)])
def test_parts_in_any_order_then_finalize(trio, reference, tmp_path, order) -> None:
    out = tmp_path / "out"
    for i in order:
        r = subprocess.run(
            [*streammerge_cmd("merge", *trio), "-o", str(out), *KW, "--part", f"{i}/3"], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert not (out / "model.safetensors.index.json").exists(), "a part never writes the index"
    r = subprocess.run(streammerge_cmd("finalize", out), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _digests(out) == _digests(reference)


def test_finalize_refuses_with_a_part_missing(trio, tmp_path) -> None:
    out = tmp_path / "out"
    for i in (1, 3):
        streammerge.merge(*trio, out, part=f"{i}/3", **LIB_KW)
    before = _digests(out)
    r = subprocess.run(streammerge_cmd("finalize", out), capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "part(s) 2/3" in r.stdout + r.stderr
    assert _digests(out) == before, "a refused finalize touches nothing"
    assert not (out / "model.safetensors.index.json").exists()


def test_finalize_refuses_parts_of_two_merges(trio, tmp_path) -> None:
    out = tmp_path / "out"
    streammerge.merge(*trio, out, part="1/2", **LIB_KW)
    before = _digests(out)
    with pytest.raises(OutputError, match="another merge"):
        streammerge.merge(*trio, out, part="2/2", alpha=0.5, **LIB_KW)  # another merge's part is refused at once
    assert _digests(out) == before, "the refused part leaves nothing behind"
    with pytest.raises(OutputError, match="another plan"):
        streammerge.merge(*trio, out, part="2/2", **LIB_KW)
        (out / ".streammerge.part-00001-of-00002.json").write_text(
            (out / ".streammerge.part-00001-of-00002.json").read_text().replace('"fingerprint": "', '"fingerprint": "x')
        )
        streammerge.finalize(out)
    assert not (out / "model.safetensors.index.json").exists()


def test_assignment_is_balanced_and_shared() -> None:
    """LPT over bytes moved: every file once, and no part above 4/3 of the best possible maximum."""
    costs = [5, 9, 3, 3, 7, 1, 8, 2]
    plan = MergePlan.__new__(MergePlan)  # only its files matter to the assignment
    plan.files = [OutFile(f"f{i}", b"", c, []) for i, c in enumerate(costs)]
    assert file_costs(plan) == costs
    for n in (1, 2, 3, 5, 8, 11):
        split = assign_files(plan, n)
        assert sorted(i for part in split for i in part) == list(range(len(costs)))
        loads = [sum(costs[i] for i in part) for part in split]
        best = max(max(costs), -(-sum(costs) // n))  # a lower bound of the optimal maximum load
        assert max(loads) <= best * 4 / 3
        assert split == assign_files(plan, n)


def test_part_options_are_checked(trio, tmp_path) -> None:
    for bad in ("0/3", "4/3", "2", "a/b"):
        with pytest.raises(OptionsError):
            Part.parse(bad)
    with pytest.raises(OptionsError, match="--overwrite"):
        streammerge.merge(*trio, tmp_path / "o", part="1/2", overwrite=True, **LIB_KW)


def test_the_distributed_benchmark_runs(tmp_path) -> None:
    """The benchmark harness itself (tiny trio, one round): it fails on any output mismatch between 1 and 2 ranks."""
    cmd = [sys.executable, "-m", "benchmarks.distributed", "--smoke", "--workdir", str(tmp_path / "w")]
    r = subprocess.run([*cmd, "--out", str(tmp_path / "res")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "res" / "distributed-smoke.json").read_text())
    assert {"null-sha256/1", "null-sha256/2", "disk/1", "disk/2"} == set(result["summary"])
    assert all(len(run["peak_rss_anon_per_rank"]) == run["ranks"] for run in result["runs"])


@pytest.mark.parametrize("point", ["index", "finalized"])
def test_a_finalize_killed_at_any_step_is_finished_by_running_it_again(trio, reference, tmp_path, point) -> None:
    out = tmp_path / "out"
    for i in (1, 2):
        streammerge.merge(*trio, out, part=f"{i}/2", **LIB_KW)
    env = {**os.environ, "STREAMMERGE_CRASH_AT": point}
    r = subprocess.run(streammerge_cmd("finalize", out), capture_output=True, text=True, env=env)
    assert r.returncode != 0
    r = subprocess.run(streammerge_cmd("finalize", out), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _digests(out) == _digests(reference)


def test_a_part_running_twice_never_takes_the_other_runs_file(trio, tmp_path) -> None:
    """A live writer holds an flock on its temporary; a second run of the same part refuses instead of deleting it."""
    import fcntl

    from streammerge.parts import assign_files

    out = tmp_path / "out"
    plan = streammerge.plan(*trio, **LIB_KW)
    name = plan.files[assign_files(plan, 2)[0][0]].name
    out.mkdir()
    tmp = out / f".{name}.partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running part holds it
    try:
        with pytest.raises(OutputError, match="another process is writing"):
            streammerge.merge(*trio, out, part="1/2", resume=True, **LIB_KW)
        assert tmp.exists()
    finally:
        os.close(fd)
    streammerge.merge(*trio, out, part="1/2", resume=True, **LIB_KW)  # a stale temporary (no lock) is removed


def test_push_and_a_single_process_beside_running_parts_are_refused(trio, tmp_path) -> None:
    with pytest.raises(OptionsError, match="--push-to"):
        streammerge.merge(*trio, tmp_path / "o", part="1/2", push_to="me/x", **LIB_KW)
    out = tmp_path / "out"
    streammerge.merge(*trio, out, part="1/2", **LIB_KW)
    import fcntl

    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a part still running
    try:
        with pytest.raises(OutputError, match="another streammerge process"):
            streammerge.merge(*trio, out, resume=True, **LIB_KW)  # finishing it alone needs the directory alone
    finally:
        os.close(fd)


def test_an_inherited_torchrun_environment_can_be_opted_out(trio, reference, tmp_path) -> None:
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    env = {**os.environ, **env, "STREAMMERGE_DISTRIBUTED": "off"}
    out = tmp_path / "out"
    r = subprocess.run(
        [*streammerge_cmd("merge", *trio), "-o", str(out), *KW], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert _digests(out) == _digests(reference)
