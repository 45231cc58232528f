"""streammerge verify (library and CLI) and --check-finite / --strict."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_all, make_related, write_checkpoint
from typer.testing import CliRunner

import streammerge
from streammerge.cli import app
from streammerge.errors import NonFiniteError

runner = CliRunner()


@pytest.fixture
def merged(small_trio, tmp_path):
    out = tmp_path / "out"
    streammerge.merge(*small_trio, out, device="cpu", max_shard_size=20_000)
    return out


def test_verify_ok_structure_and_full(small_trio, merged):
    r = streammerge.verify(merged)
    assert r.ok and r.files_checked > 1 and r.chunks_checked == 0
    r = streammerge.verify(merged, *small_trio, full=True)
    assert r.ok and r.chunks_checked == r.chunks_total > 0
    cli = runner.invoke(
        app,
        [
            "verify",
            str(merged),
            "--target",
            str(small_trio[0]),
            "--sft",
            str(small_trio[1]),
            "--grpo",
            str(small_trio[2]),
            "--full",
        ],
    )
    assert cli.exit_code == 0 and cli.output.startswith("OK:")
    assert f"{r.chunks_total} of {r.chunks_total} chunks recomputed: all bytes match" in cli.output
    # Nothing recomputed (--sample 0, or no inputs): the line claims only what was checked.
    for extra in (["--sample", "0", "--target", str(small_trio[0]), "--sft", str(small_trio[1])], []):
        extra += ["--grpo", str(small_trio[2])] if extra else []
        cli = runner.invoke(app, ["verify", str(merged), *extra])
        assert cli.exit_code == 0 and "structure and recorded SHA-256s match (no chunk recomputed)" in cli.output
        assert "all bytes match" not in cli.output


def test_verify_detects_a_flipped_byte(merged):
    shard = sorted(merged.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x10
    shard.write_bytes(bytes(data))
    r = streammerge.verify(merged)
    assert not r.ok and str(shard) in r.problems[0] and "SHA-256" in r.problems[0]
    cli = runner.invoke(app, ["verify", str(merged)])
    assert cli.exit_code == 1 and str(shard) in cli.output and "Traceback" not in cli.output


def test_verify_recompute_names_the_tensor_when_checksums_were_forged(small_trio, merged):
    # rewrite a tensor's bytes AND the manifest's checksum: only recomputation can tell
    name = "model.layers.0.mlp.up_proj.weight"
    path = _forge(merged, name)
    assert streammerge.verify(merged).ok  # structure and checksums look fine
    r = streammerge.verify(merged, *small_trio, full=True)
    assert not r.ok and name in r.problems[0] and path.name in r.problems[0]


def test_verify_incomplete_and_missing(merged):
    m = json.loads((merged / ".streammerge.json").read_text())
    m["state"] = "in-progress"
    (merged / ".streammerge.json").write_text(json.dumps(m))
    r = streammerge.verify(merged)
    assert not r.ok and "did not complete" in r.problems[0]
    sorted(merged.glob("model-*.safetensors"))[0].unlink()
    assert "missing" in " ".join(streammerge.verify(merged).problems)


def test_verify_needs_all_three_inputs(small_trio, merged):
    with pytest.raises(streammerge.StreamMergeError, match="a merge output; to recompute it give --target, --sft and"):
        streammerge.verify(merged, small_trio[0])


def _forge(out, name: str):
    """Flip a byte of tensor ``name`` and record the new checksum: only recomputation can tell. Returns its file."""
    from streammerge.checkpoint import Checkpoint
    from streammerge.writer import sha256_file

    with Checkpoint(out) as ck:
        ref = ck.tensors[name]
        path = ck.files[ref.file]
    data = bytearray(path.read_bytes())
    data[ref.offset + 6] ^= 0x02
    path.write_bytes(bytes(data))
    m = json.loads((out / ".streammerge.json").read_text())
    m["shards"][path.name]["sha256"] = sha256_file(path)
    (out / ".streammerge.json").write_text(json.dumps(m))
    return path


def test_verify_recomputes_extract_and_apply_outputs(small_trio, tmp_path):
    """An extract output from --sft/--grpo and an apply output from --target/--vector, recomputed byte for byte;
    a forged byte is found and named; the wrong inputs for the kind are refused with what to give."""
    t, s, g = small_trio
    vec, applied = tmp_path / "vec", tmp_path / "applied"
    kw = {"device": "cpu", "max_shard_size": 20_000, "chunk_bytes": 4096}
    streammerge.extract(s, g, vec, **kw)
    streammerge.apply(t, vec, applied, alpha=-0.5, **kw)
    r = streammerge.verify(vec, sft=s, grpo=g, full=True)
    assert r.ok and r.chunks_checked == r.chunks_total > 0, r.problems
    r = streammerge.verify(applied, target=t, vector=vec, full=True)
    assert r.ok and r.chunks_checked == r.chunks_total > 0, r.problems
    cli = runner.invoke(app, ["verify", str(applied), "--target", str(t), "--vector", str(vec), "--full"])
    assert cli.exit_code == 0 and cli.output.startswith("OK:"), cli.output
    # Wrong inputs for the kind: one line saying which to give.
    with pytest.raises(
        streammerge.StreamMergeError, match="an apply output; to recompute it give --target and --vector"
    ):
        streammerge.verify(applied, t, s, g)
    with pytest.raises(streammerge.StreamMergeError, match="an extract output; to recompute it give --sft and --grpo"):
        streammerge.verify(vec, target=t, vector=vec)
    cli = runner.invoke(app, ["verify", str(vec), "--target", str(t), "--sft", str(s), "--grpo", str(g)])
    assert cli.exit_code == 1 and "give --sft and --grpo" in cli.output and "Traceback" not in cli.output
    # Recomputing against another vector (the sft/grpo roles swapped: -v) finds the difference.
    other = tmp_path / "neg"
    streammerge.extract(g, s, other, **kw)
    r = streammerge.verify(applied, target=t, vector=other, full=True)
    assert not r.ok
    # A forged byte (checksum rewritten) in each output is found by recomputation and named.
    name = "model.layers.0.mlp.up_proj.weight"
    for out, inputs in ((applied, {"target": t, "vector": vec}), (vec, {"sft": s, "grpo": g})):
        _forge(out, name)
        assert streammerge.verify(out).ok
        r = streammerge.verify(out, **inputs, full=True)
        assert not r.ok and name in r.problems[0], (out, r.problems)


def test_check_finite_and_strict(tmp_path):
    t, s, g = make_related({"w": (64,), "ok": (8,)}, dtype="F16")
    t["w"][0] = 60000.0  # finite in fp16 ...
    g["w"][0] = s["w"][0] + 10000.0  # ... but t + (g - s) overflows fp16
    dirs = [write_checkpoint(tmp_path / n, sd) for n, sd in zip("tsg", (t, s, g))]
    r = streammerge.merge(*dirs, tmp_path / "out", device="cpu", check_finite=True)
    assert r.nonfinite == {"w": 1}
    with pytest.raises(NonFiniteError, match="'w'"):
        streammerge.merge(*dirs, tmp_path / "strict", device="cpu", check_finite=True, strict=True)
    assert not list((tmp_path / "strict").glob("*.safetensors"))
    cli = runner.invoke(app, ["merge", *map(str, dirs), "-o", str(tmp_path / "c"), "--check-finite"])
    assert cli.exit_code == 0 and "became non-finite" in cli.output and "w (1)" in cli.output
    cli = runner.invoke(app, ["merge", *map(str, dirs), "-o", str(tmp_path / "d"), "--strict"])
    assert cli.exit_code == 1 and "--strict" in cli.output
    # NaN already in the inputs propagates per the contract and is not counted
    t["ok"][3] = float("nan")
    dirs = [write_checkpoint(tmp_path / ("n" + n), sd) for n, sd in zip("tsg", (t, s, g))]
    r = streammerge.merge(*dirs, tmp_path / "out2", device="cpu", check_finite=True)
    assert "ok" not in r.nonfinite
    assert torch.isnan(load_all(tmp_path / "out2")["ok"][3])


def test_verify_reports_progress_per_phase(small_trio, merged):
    """A --full verify of a 70B output reads hundreds of GB: progress comes as it goes, hashing then recomputing,
    each phase ending at its total."""
    events = []
    r = streammerge.verify(merged, *small_trio, full=True, progress=events.append)
    assert r.ok
    phases = [e.phase for e in events]
    assert phases and set(phases) == {"hash", "recompute"}
    assert phases == sorted(phases, key=["hash", "recompute"].index)  # hashing first, then recomputing
    for phase in ("hash", "recompute"):
        mine = [e for e in events if e.phase == phase]
        done = [e.bytes_done for e in mine]
        assert done == sorted(done) and done[-1] == mine[-1].bytes_total > 0
        assert mine[-1].tensors_done == mine[-1].tensors_total
    assert [e for e in events if e.phase == "hash"][-1].bytes_total == r.bytes_hashed


def test_cli_progress_bar_follows_phases(monkeypatch):
    """The CLI's bar (shown on a terminal) relabels itself when verify moves from hashing to recomputing."""
    import rich.console

    from streammerge.cli.output import with_progress
    from streammerge.engines import Progress

    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))

    def run(progress=None):
        assert progress is not None, "on a terminal the bar's callback is passed"
        for phase in ("hash", "hash", "recompute"):
            progress(Progress(5, 10, 1, 2, "w", phase))
        return "done"

    assert with_progress(run, quiet=False, label="verifying") == "done"
    assert with_progress(lambda progress=None: progress, quiet=True) is None  # quiet: no bar, no callback


def test_verify_reports_a_manifest_with_a_bad_size_as_a_failure(merged):
    m = json.loads((merged / ".streammerge.json").read_text())
    name = sorted(m["shards"])[0]
    m["shards"][name]["size"] = str(m["shards"][name]["size"])  # a string where a number belongs
    (merged / ".streammerge.json").write_text(json.dumps(m))
    r = streammerge.verify(merged, progress=lambda e: None)
    assert not r.ok and name in r.problems[0] and "the manifest records" in r.problems[0]


def test_a_write_from_a_shrunken_input_mapping_names_the_input_side(small_trio, tmp_path):
    """A copied tensor's bytes go from the input mapping straight to pwrite: if that input shrank in between, the
    kernel answers EFAULT, and the error says an input changed rather than blaming the output disk."""
    import errno

    from streammerge.writer import OutputWriter

    p = streammerge.plan(*small_trio, options=streammerge.MergeOptions.create(device="cpu"))
    err = OutputWriter(tmp_path / "o", p)._write_error("model.safetensors", OSError(errno.EFAULT, "Bad address"))
    assert "an input file shrank while merging" in str(err)
