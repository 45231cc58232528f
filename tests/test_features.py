"""Per-tensor rules, vocabulary mismatch, extract/apply of reusable vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TORCH, from_bits, load_all, make_related, raw_bits, write_checkpoint
from reference import expected_bits, hostile_values, round_bf16_bits, widen
from typer.testing import CliRunner

import streammerge
from streammerge.cli import app
from streammerge.errors import OptionsError, TensorMismatchError

runner = CliRunner()
SHAPES = {
    "model.embed_tokens.weight": (50, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.norm.weight": (8,),
    "lm_head.weight": (50, 8),
}


def _trio(tmp_path, shapes=SHAPES, dtype="BF16", seed=0, mutate=None):
    t, s, g = make_related(shapes, dtype=dtype, seed=seed)
    if mutate:
        mutate(t, s, g)
    return [write_checkpoint(tmp_path / n, sd, shards=k) for n, sd, k in zip("tsg", (t, s, g), (1, 2, 3))], (t, s, g)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(raw_bits(a), raw_bits(b))


def test_rules_first_match_wins(tmp_path):
    dirs, (t, s, g) = _trio(tmp_path)
    rules = ["embed_tokens|lm_head=copy-target", "self_attn=0.5", "norm=skip", "layers=-1"]
    p = streammerge.plan(*dirs, rules=rules)
    assert p.rule_hits == {"embed_tokens|lm_head=copy-target": 2, "self_attn=0.5": 1, "norm=skip": 1, "layers=-1.0": 1}
    r = streammerge.merge(*dirs, tmp_path / "out", device="cpu", rules=rules)
    out = load_all(tmp_path / "out")
    assert "model.norm.weight" not in out and r.tensors_merged == 2
    assert _bits_equal(out["lm_head.weight"], t["lm_head.weight"])
    for name, alpha in (("model.layers.0.self_attn.q_proj.weight", 0.5), ("model.layers.0.mlp.up_proj.weight", -1.0)):
        want = expected_bits(raw_bits(t[name]), raw_bits(s[name]), raw_bits(g[name]), alpha, ("BF16",) * 3, "BF16")
        assert np.array_equal(raw_bits(out[name]), want), name


def test_rule_matching_nothing_is_an_error(tmp_path):
    dirs, _ = _trio(tmp_path)
    with pytest.raises(TensorMismatchError, match="matching no target tensor: vision_tower"):
        streammerge.plan(*dirs, rules=["vision_tower=0"])
    for bad in ["(unclosed=1", "x=fast", "noequals"]:
        with pytest.raises(OptionsError):
            streammerge.plan(*dirs, rules=[bad])


def test_rules_file_and_cli(tmp_path):
    dirs, _ = _trio(tmp_path)
    f = tmp_path / "rules.toml"
    f.write_text('[[rule]]\npattern = "lm_head"\naction = "copy-target"\n\n[[rule]]\npattern = "mlp"\nalpha = 2.0\n')
    r = runner.invoke(app, ["plan", *map(str, dirs), "--rules", str(f), "--rule", "norm=skip"])
    assert r.exit_code == 0, r.output
    assert "rule    norm=skip: 1 tensor(s)" in r.output and "rule    mlp=2.0: 1 tensor(s)" in r.output
    r = runner.invoke(app, ["merge", *map(str, dirs), "-o", str(tmp_path / "o"), "--rule", "nothing=1"])
    assert r.exit_code == 1 and "matching no target tensor" in r.output


def _resize(t, s, g):
    # the target's tokenizer grew by 6 tokens: its embedding and head have 56 rows, sft/grpo 50
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        t[k] = torch.cat([t[k], torch.full((6, 8), 0.5, dtype=t[k].dtype)])


def test_vocab_mismatch_policies(tmp_path):
    dirs, (t, s, g) = _trio(tmp_path, mutate=_resize)
    with pytest.raises(TensorMismatchError, match=r"--vocab-mismatch common-rows") as ei:
        streammerge.plan(*dirs)
    assert "model.embed_tokens.weight: target BF16[56, 8], sft/grpo BF16[50, 8]" in str(ei.value)
    r = streammerge.merge(*dirs, tmp_path / "common", device="cpu", vocab_mismatch="common-rows", chunk_bytes=4096)
    out = load_all(tmp_path / "common")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[k].shape == (56, 8)
        want = expected_bits(raw_bits(t[k][:50]), raw_bits(s[k]), raw_bits(g[k]), 1.0, ("BF16",) * 3, "BF16")
        assert np.array_equal(raw_bits(out[k][:50]), want)
        assert _bits_equal(out[k][50:], t[k][50:])
    assert r.tensors_merged == 5
    streammerge.merge(*dirs, tmp_path / "copy", device="cpu", vocab_mismatch="copy-target")
    assert _bits_equal(load_all(tmp_path / "copy")["lm_head.weight"], t["lm_head.weight"])
    # the target's own rows are converted when the output dtype differs
    streammerge.merge(*dirs, tmp_path / "f32", device="cpu", vocab_mismatch="common-rows", out_dtype="fp32")
    assert torch.equal(load_all(tmp_path / "f32")["lm_head.weight"][50:], t["lm_head.weight"][50:].float())


def test_vocab_mismatch_target_smaller_and_tied(tmp_path):
    shapes = {k: v for k, v in SHAPES.items() if k != "lm_head.weight"}  # tied embeddings: no lm_head

    def shrink(t, s, g):
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:40].clone()

    dirs, (t, s, g) = _trio(tmp_path, shapes=shapes, mutate=shrink)
    streammerge.merge(*dirs, tmp_path / "out", device="cpu", vocab_mismatch="common-rows")
    out = load_all(tmp_path / "out")
    k = "model.embed_tokens.weight"
    want = expected_bits(raw_bits(t[k]), raw_bits(s[k][:40]), raw_bits(g[k][:40]), 1.0, ("BF16",) * 3, "BF16")
    assert out[k].shape == (40, 8) and np.array_equal(raw_bits(out[k]), want) and "lm_head.weight" not in out


@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.37])
def test_apply_of_extract_equals_merge_byte_for_byte(tmp_path, alpha):
    rng = np.random.default_rng(3)
    shapes = {"a": (33, 17), "b": (1000,), "c": ()}
    dts = {"t": "BF16", "s": "F16", "g": "BF16"}
    dirs = []
    for n, dt in dts.items():
        tensors = {k: from_bits(hostile_values(dt, int(np.prod(sh)), rng), dt, sh) for k, sh in shapes.items()}
        tensors["ids"] = torch.arange(3)
        dirs.append(write_checkpoint(tmp_path / n, tensors, shards=1 + len(dirs)))
    vec = tmp_path / "vec"
    r = streammerge.extract(dirs[1], dirs[2], vec, chunk_bytes=4096)
    v = load_all(vec)
    assert all(v[k].dtype == torch.float32 for k in shapes) and r.copied_reasons == {"non-floating (I64)": 1}
    merged = streammerge.merge(*dirs, tmp_path / "m", alpha=alpha, device="cpu")
    applied = streammerge.apply(dirs[0], vec, tmp_path / "a", alpha=alpha, device="cpu", chunk_bytes=4096)
    M, A = load_all(tmp_path / "m"), load_all(tmp_path / "a")
    assert M.keys() == A.keys() and all(_bits_equal(M[k], A[k]) for k in M)
    assert merged.tensors_merged == applied.tensors_merged == len(shapes)


def test_extract_bf16_and_cli(tmp_path):
    dirs, (t, s, g) = _trio(tmp_path)
    args = ["extract", str(dirs[1]), str(dirs[2]), "-o", str(tmp_path / "v"), "--dtype", "bf16"]
    r = runner.invoke(app, [*args, "--threads", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "cpu engine: 2 compute worker(s)" in r.output  # --threads reached the engine
    v = load_all(tmp_path / "v")
    k = "model.norm.weight"
    d = widen(raw_bits(g[k]), "BF16") - widen(raw_bits(s[k]), "BF16")  # float32, one rounding to bf16 below
    assert v[k].dtype == TORCH["BF16"] and np.array_equal(raw_bits(v[k]), round_bf16_bits(d))
    r = runner.invoke(app, ["apply", str(dirs[0]), str(tmp_path / "v"), "-o", str(tmp_path / "o"), "--alpha", "-1"])
    assert r.exit_code == 0, r.output
    from safetensors import safe_open

    with safe_open(str(tmp_path / "v" / "model.safetensors"), "pt") as h:
        assert h.metadata()["streammerge_formula"] == "grpo - sft"
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as h:
        assert h.metadata()["streammerge_formula"] == "target + alpha * vector"
        assert h.metadata()["streammerge_alpha"] == "-1.0"


def test_extract_leaves_out_what_a_copy_policy_would_copy(tmp_path):
    def add_new(t, s, g):
        g["new.weight"] = torch.full((4,), 3.0, dtype=torch.bfloat16)
        t["new.weight"] = torch.full((4,), 1.0, dtype=torch.bfloat16)

    dirs, (t, s, g) = _trio(tmp_path, mutate=add_new)
    r = streammerge.extract(dirs[1], dirs[2], tmp_path / "v", missing="copy-target")
    assert "new.weight" not in load_all(tmp_path / "v") and r.tensors_copied == 0
    streammerge.apply(dirs[0], tmp_path / "v", tmp_path / "a", device="cpu", missing="copy-target")
    streammerge.merge(*dirs, tmp_path / "m", device="cpu", missing="copy-target")
    A, M = load_all(tmp_path / "a"), load_all(tmp_path / "m")
    assert float(A["new.weight"][0]) == 1.0 and all(_bits_equal(A[k], M[k]) for k in M)


def test_apply_refuses_a_model_that_is_not_a_vector(tmp_path):
    dirs, _ = _trio(tmp_path)
    with pytest.raises(OptionsError, match="not a vector written by `streammerge extract`"):
        streammerge.apply(dirs[0], dirs[1], tmp_path / "o", device="cpu")
    assert not (tmp_path / "o").exists()
    r = runner.invoke(app, ["apply", str(dirs[0]), str(dirs[1]), "-o", str(tmp_path / "o"), "--any-vector"])
    assert r.exit_code == 0, r.output


def test_verify_recomputes_outputs_made_with_rules_and_vocab_policy(tmp_path):
    dirs, _ = _trio(tmp_path, mutate=_resize)
    out = tmp_path / "out"
    streammerge.merge(
        *dirs, out, device="cpu", rules=["self_attn=0.5", "norm=skip"], vocab_mismatch="common-rows", chunk_bytes=4096
    )
    r = streammerge.verify(out, *dirs, full=True)
    assert r.ok, r.problems
    assert r.chunks_checked == r.chunks_total > 4


def test_options_object_plus_keywords_keeps_rules_and_alpha_strings_are_numbers(tmp_path):
    dirs, _ = _trio(tmp_path)
    opts = streammerge.MergeOptions.create(rules=["self_attn=0.5"])
    p = streammerge.plan(*dirs, options=opts, alpha=0.25)
    assert p.options.rules == opts.rules and p.options.alpha == 0.25
    assert streammerge.MergeOptions.create(alpha="0.5").alpha == 0.5
    with pytest.raises(OptionsError, match="not a number"):
        streammerge.MergeOptions.create(alpha="half")
