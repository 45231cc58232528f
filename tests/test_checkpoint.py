"""The checkpoint reader: layouts it accepts, layouts it refuses, zero-copy read-only views."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import write_checkpoint

from streammerge.checkpoint import Checkpoint
from streammerge.errors import CheckpointError, HeaderError

TENSORS = {
    "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b": torch.ones(5, dtype=torch.bfloat16),
    "c": torch.zeros(2, 2, dtype=torch.float16),
}


def test_single_file_directory(tmp_path):
    d = write_checkpoint(tmp_path / "m", TENSORS)
    ck = Checkpoint(d)
    assert set(ck.tensors) == set(TENSORS) and len(ck.files) == 1
    ref = ck.tensors["a"]
    view = ck.view(ref, 0, ref.nbytes, torch.float32)
    assert torch.equal(view.reshape(3, 4), TENSORS["a"])
    assert [p.name for p in ck.aux_files()] == ["config.json", "generation_config.json", "tokenizer_config.json"]
    ck.close()


def test_sharded_directory_index_file_and_single_file(tmp_path):
    d = write_checkpoint(tmp_path / "m", TENSORS, shards=3)
    for src in (d, d / "model.safetensors.index.json"):
        with Checkpoint(src) as ck:
            assert set(ck.tensors) == set(TENSORS) and len(ck.files) == 3
    one = write_checkpoint(tmp_path / "one", TENSORS)
    with Checkpoint(one / "model.safetensors") as ck:
        assert set(ck.tensors) == set(TENSORS)


def test_views_are_zero_copy_and_read_only(tmp_path):
    d = write_checkpoint(tmp_path / "m", TENSORS)
    with Checkpoint(d) as ck:
        ref = ck.tensors["a"]
        v1 = ck.view(ref, 0, 16, torch.float32)
        v2 = ck.view(ref, 0, 16, torch.float32)
        assert v1.data_ptr() == v2.data_ptr()  # same mapped memory, no copy
        del v1, v2
        with pytest.raises(TypeError):  # mapped ACCESS_READ: the mapping refuses writes
            ck._map(ref.file)[0] = 1


def _index(d, weight_map):
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_paths_must_stay_inside(tmp_path):
    d = write_checkpoint(tmp_path / "m", TENSORS, shards=2)
    outside = write_checkpoint(tmp_path / "outside", TENSORS)
    for bad in ["../outside/model.safetensors", str(outside / "model.safetensors"), "/etc/passwd"]:
        _index(d, {"a": bad})
        with pytest.raises(CheckpointError, match="inside the checkpoint directory"):
            Checkpoint(d)
    os.symlink(outside / "model.safetensors", d / "link.safetensors")
    _index(d, {k: "link.safetensors" for k in TENSORS})
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        Checkpoint(d)


def test_index_disagreements(tmp_path):
    d = write_checkpoint(tmp_path / "m", TENSORS, shards=2)
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    _index(d, {**wm, "ghost": wm["a"]})
    with pytest.raises(CheckpointError, match="ghost"):
        Checkpoint(d)
    _index(d, {**wm, "a": "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointError, match="disagrees"):
        Checkpoint(d)
    _index(d, {**wm, "z": "model-00009-of-00009.safetensors"})
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(d)


def test_tensor_in_two_shards(tmp_path):
    d = write_checkpoint(tmp_path / "m", TENSORS, shards=2)
    from safetensors.torch import save_file

    save_file({"a": TENSORS["a"]}, str(d / "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="stored twice"):
        Checkpoint(d)


def test_empty_pickle_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        Checkpoint(tmp_path / "empty")
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match="pickle") as ei:
        Checkpoint(tmp_path / "pk")
    assert "never loaded" in str(ei.value) and "safetensors" in str(ei.value)
    with pytest.raises(CheckpointError, match="no such file"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pass the .safetensors file itself"):
        Checkpoint(tmp_path / "loose")


def test_bad_header_names_file(tmp_path):
    d = write_checkpoint(tmp_path / "m", TENSORS)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 3])
    with pytest.raises(HeaderError, match=str(f)):
        Checkpoint(d)


def test_bad_index_json(tmp_path):
    d = write_checkpoint(tmp_path / "m", TENSORS, shards=2)
    (d / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Checkpoint(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": []}))
    with pytest.raises(CheckpointError, match="weight_map"):
        Checkpoint(d)


def test_a_file_shrunk_under_an_open_mapping_is_an_error_before_any_read(tmp_path):
    """Touching a mapping past a shrunken file's end is SIGBUS; every view checks the file's size first."""
    write_checkpoint(tmp_path / "m", {"a": torch.arange(4096, dtype=torch.float32)})
    with Checkpoint(tmp_path / "m", label="sft") as ck:
        ref = ck.tensors["a"]
        assert ck.view(ref, 0, 16).tolist()[4:8] == [0, 0, 128, 63]  # element 1: 1.0f, little endian
        os.truncate(ck.files[0], ck.files[0].stat().st_size - 4096)
        with pytest.raises(CheckpointError, match=r"sft checkpoint: .*model.safetensors: file changed while merging"):
            ck.view(ref, ref.nbytes - 16, ref.nbytes)
