"""End-to-end merges through the library: pairing policies, output layout, conventions, safety of paths."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from helpers import SMALL_SHAPES, load_all, make_related, raw_bits, tree_digest, write_checkpoint
from reference import expected_bits
from safetensors import safe_open

import streammerge
from streammerge.errors import OptionsError, OutputError, TensorMismatchError


def _check_against_reference(out, target, sft, grpo, alpha=1.0):
    T, S, G, M = (load_all(p) for p in (target, sft, grpo, out))
    assert set(M) == set(T)
    for k, t in T.items():
        want = expected_bits(raw_bits(t), raw_bits(S[k]), raw_bits(G[k]), alpha, ("BF16",) * 3, "BF16")
        assert np.array_equal(raw_bits(M[k]), want), k


@pytest.mark.parametrize("alpha", [1.0, -1.0])
def test_merge_three_shardings_matches_reference(small_trio, tmp_path, alpha):
    target, sft, grpo = small_trio
    before = {p: tree_digest(p) for p in small_trio}
    report = streammerge.merge(target, sft, grpo, tmp_path / "out", alpha=alpha, device="cpu", chunk_bytes=4096)
    _check_against_reference(tmp_path / "out", target, sft, grpo, alpha)
    assert report.tensors_merged == len(SMALL_SHAPES) and report.tensors_copied == 0
    assert report.device == "cpu" and report.seconds > 0 and report.gbps > 0
    assert report.bytes_written == sum((tmp_path / "out" / f).stat().st_size for f in ["model.safetensors"])
    assert {p: tree_digest(p) for p in small_trio} == before  # inputs untouched


def test_output_conventions(small_trio, tmp_path):
    target, sft, grpo = small_trio
    out = tmp_path / "out"
    report = streammerge.merge(target, sft, grpo, out, device="cpu", max_shard_size=20_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SMALL_SHAPES)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(np.prod(s) * 2 for s in SMALL_SHAPES.values())
    for f in shards:
        with safe_open(str(out / f), "pt") as h:
            md = h.metadata()
            assert md["format"] == "pt" and md["streammerge_alpha"] == "1.0"
            assert md["streammerge_target"] == str(target) and "streammerge_version" in md
            for k in h.keys():
                assert index["weight_map"][k] == f
    for aux in ["config.json", "tokenizer_config.json", "generation_config.json"]:
        assert (out / aux).read_bytes() == (target / aux).read_bytes()
    card = (out / "README.md").read_text()
    assert "2509.01363" in card and str(sft) in card and str(grpo) in card
    assert not list(out.glob(".*.partial"))
    assert set(report.output_files) >= set(shards) | {"model.safetensors.index.json", "README.md"}
    _check_against_reference(out, target, sft, grpo)


def test_same_bytes_whatever_chunk_and_sharding(small_trio, tmp_path):
    target, sft, grpo = small_trio
    a = streammerge.merge(target, sft, grpo, tmp_path / "a", device="cpu", chunk_bytes=4096)
    b = streammerge.merge(target, sft, grpo, tmp_path / "b", device="cpu", chunk_bytes="64MiB", threads=1)
    assert a.output_files == b.output_files
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def _trio(tmp_path, t, s, g, shards=(1, 2, 3)):
    return tuple(write_checkpoint(tmp_path / n, sd, shards=k) for n, sd, k in zip(("t", "s", "g"), (t, s, g), shards))


def test_missing_and_extra_policies(tmp_path):
    shapes = {f"w{i}": (4, 4) for i in range(25)}
    t, s, g = make_related(shapes)
    for i in range(22):
        del s[f"w{i}"]
    g["only_in_grpo"] = torch.zeros(3, dtype=torch.bfloat16)
    dirs = _trio(tmp_path, t, s, g)
    with pytest.raises(TensorMismatchError) as ei:
        streammerge.plan(*dirs)
    msg = str(ei.value)
    assert "22 target tensor(s) missing" in msg and "and 2 more" in msg and "--missing copy-target" in msg
    assert "only_in_grpo" in msg and "--extra ignore" in msg
    report = streammerge.merge(*dirs, tmp_path / "out", device="cpu", missing="copy-target", extra="ignore")
    assert report.tensors_merged == 3 and report.tensors_copied == 22 and report.ignored_extra == 1
    out = load_all(tmp_path / "out")
    assert "only_in_grpo" not in out
    assert torch.equal(out["w0"], t["w0"])  # copied bytes


def test_shape_mismatch_policy(tmp_path):
    t, s, g = make_related({"a": (4, 4), "b": (8,)})
    g["a"] = torch.zeros(4, 5, dtype=torch.bfloat16)
    dirs = _trio(tmp_path, t, s, g)
    with pytest.raises(TensorMismatchError, match=r"a: target BF16\[4, 4\], sft BF16\[4, 4\], grpo BF16\[4, 5\]"):
        streammerge.merge(*dirs, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    r = streammerge.merge(*dirs, tmp_path / "out", device="cpu", shape_mismatch="copy-target")
    assert r.copied_reasons == {"shape mismatch": 1}


def test_non_floating_copied_and_unsupported_dtypes(tmp_path):
    t, s, g = make_related({"w": (16,)})
    t["ids"] = torch.arange(7)
    t["mask"] = torch.tensor([True, False])
    for sd in (t, s, g):
        sd["f64"] = torch.ones(3, dtype=torch.float64)
    dirs = _trio(tmp_path, t, s, g)
    with pytest.raises(TensorMismatchError, match=r"f64 \(target F64, sft F64, grpo F64\)"):
        streammerge.plan(*dirs)
    r = streammerge.merge(*dirs, tmp_path / "out", device="cpu", unsupported_dtype="copy-target")
    assert r.copied_reasons == {"non-floating (I64)": 1, "non-floating (BOOL)": 1, "unsupported dtype": 1}
    out = load_all(tmp_path / "out")
    assert torch.equal(out["ids"], t["ids"]) and torch.equal(out["mask"], t["mask"])
    assert out["f64"].dtype == torch.float64


def test_zero_element_and_scalar_tensors(tmp_path):
    t, s, g = make_related({"empty": (0, 5), "scalar": (), "w": (3,)})
    dirs = _trio(tmp_path, t, s, g)
    streammerge.merge(*dirs, tmp_path / "out", device="cpu")
    out = load_all(tmp_path / "out")
    assert out["empty"].shape == (0, 5) and out["scalar"].shape == ()
    want = expected_bits(
        raw_bits(t["scalar"]), raw_bits(s["scalar"]), raw_bits(g["scalar"]), 1.0, ("BF16",) * 3, "BF16"
    )
    assert np.array_equal(raw_bits(out["scalar"]), want)


def test_out_dtype_converts_copies_too(tmp_path):
    t, s, g = make_related({"w": (8, 8), "x": (5,)})
    del s["x"]
    dirs = _trio(tmp_path, t, s, g)
    streammerge.merge(*dirs, tmp_path / "out", device="cpu", out_dtype="fp32", missing="copy-target")
    out = load_all(tmp_path / "out")
    assert out["w"].dtype == torch.float32 and out["x"].dtype == torch.float32
    assert torch.equal(out["x"], t["x"].float())


def test_output_location_rules(small_trio, tmp_path):
    target, sft, grpo = small_trio
    with pytest.raises(OutputError, match="inside, the sft checkpoint"):
        streammerge.merge(target, sft, grpo, sft / "sub", device="cpu")
    with pytest.raises(OutputError, match="lies inside the output"):
        streammerge.merge(target, sft, grpo, target.parent, device="cpu")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("keep")
    with pytest.raises(OutputError, match="not empty"):
        streammerge.merge(target, sft, grpo, busy, device="cpu")
    with pytest.raises(OutputError, match="not a streammerge output"):
        streammerge.merge(target, sft, grpo, busy, device="cpu", overwrite=True)
    assert (busy / "precious.txt").read_text() == "keep"
    out = tmp_path / "out"
    streammerge.merge(target, sft, grpo, out, device="cpu", max_shard_size=20_000)
    with pytest.raises(OutputError, match="--overwrite"):
        streammerge.merge(target, sft, grpo, out, device="cpu")
    streammerge.merge(target, sft, grpo, out, device="cpu", overwrite=True, alpha=-1.0)
    assert not (out / "model.safetensors.index.json").exists()  # the old sharded layout is gone
    _check_against_reference(out, target, sft, grpo, alpha=-1.0)


def test_options_validation(small_trio, tmp_path):
    for kwargs, match in [
        ({"alpha": float("nan")}, "finite"),
        ({"chunk_bytes": "12XB"}, "cannot parse"),
        ({"chunk_bytes": 10}, "minimum"),
        ({"out_dtype": "int8"}, "unknown dtype"),
        ({"missing": "maybe"}, "not one of"),
        ({"device": "tpu"}, "not one of"),
    ]:
        with pytest.raises(OptionsError, match=match):
            streammerge.merge(*small_trio, tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


def test_plan_summary(small_trio, tmp_path):
    p = streammerge.plan(*small_trio, tmp_path / "out", chunk_bytes="1MiB")
    s = p.summary()
    data = sum(int(np.prod(x)) * 2 for x in SMALL_SHAPES.values())
    assert s["bytes_read"] == 3 * data
    assert s["bytes_written"] > data and s["disk_needed"] >= s["bytes_written"]
    assert s["merged"] == len(SMALL_SHAPES) and s["expected_peak_host_memory"] > 0
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_progress_callback(small_trio, tmp_path):
    events = []
    streammerge.merge(*small_trio, tmp_path / "out", device="cpu", chunk_bytes=4096, progress=events.append)
    done = [e.bytes_done for e in events]
    assert done == sorted(done) and done[-1] == events[-1].bytes_total
    assert events[-1].tensors_done == len(SMALL_SHAPES)


def test_null_sink_computes_the_same_bytes_and_writes_nothing(small_trio, tmp_path):
    disk = streammerge.merge(*small_trio, tmp_path / "disk", device="cpu", max_shard_size=20_000)
    null = streammerge.merge(*small_trio, tmp_path / "null", device="cpu", max_shard_size=20_000, sink="null-sha256")
    assert not (tmp_path / "null").exists()
    assert null.shard_sha256 == disk.shard_sha256 and len(disk.shard_sha256) > 1
    assert null.bytes_written == disk.bytes_written and null.bytes_read == disk.bytes_read
    for name, digest in disk.shard_sha256.items():
        assert hashlib.sha256((tmp_path / "disk" / name).read_bytes()).hexdigest() == digest


def test_source_paths_that_are_not_utf8(tmp_path):
    import os

    t, s, g = make_related({"a": (4,)})
    bad = os.fsdecode(b"\xffckpt-")
    dirs = [write_checkpoint(tmp_path / (bad + n), sd) for n, sd in zip("tsg", (t, s, g))]
    r = streammerge.merge(*dirs, tmp_path / "out", device="cpu")
    assert r.tensors_merged == 1
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as h:
        assert h.metadata()["streammerge_target"].endswith("\\xffckpt-t")
