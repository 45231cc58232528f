"""Many vectors from a spec (issue 6.6) and alpha sweeps in one pass (issue 6.8).

Outputs are checked byte for byte: sweeps against separate single-alpha merges (whole files, headers included) and
against the numpy reference; many-vector merges against the independent numpy reference of the extended contract
(``r = t32``, ``r = r + f32(alpha_i) * (p32_i - m32_i)`` in order, one rounding).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TORCH, from_bits, load_all, make_related, raw_bits, streammerge_cmd, tree_digest, write_checkpoint
from reference import expected_bits, expected_bits_many, hostile_values
from typer.testing import CliRunner

import streammerge
from streammerge.cli import app
from streammerge.errors import OptionsError, OutputError, TensorMismatchError
from streammerge.writer import MANIFEST

runner = CliRunner()
SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (48, 16),
    "model.norm.weight": (16,),
    "lm_head.weight": (40, 16),
}
# Small chunks and shards: every tensor spans several chunks and the output several files.
KW = {"chunk_bytes": 4096, "max_shard_size": "3KB", "device": "cpu"}


def _hostile(shapes: dict, dtypes: dict, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        dt = dtypes.get(name, "BF16")
        n = int(np.prod(shape))
        out[name] = from_bits(hostile_values(dt, n, rng), dt, shape)
    return out


@pytest.fixture(scope="module")
def five(tmp_path_factory) -> dict[str, Path]:
    """target + two sft/grpo pairs, mixed dtypes (bf16, fp16, fp32), NaN/inf/subnormals, sharded differently."""
    root = tmp_path_factory.mktemp("five")
    dtypes = [
        {"model.norm.weight": "F32"},
        {"model.layers.0.mlp.up_proj.weight": "F16"},
        {"model.norm.weight": "F16", "lm_head.weight": "F32"},
        {},
        {"model.layers.0.self_attn.q_proj.weight": "F32"},
    ]
    cks = {}
    for i, (name, shards) in enumerate((("t", 1), ("s1", 2), ("g1", 3), ("s2", 1), ("g2", 2))):
        tensors = _hostile(SHAPES, dtypes[i], seed=i)
        tensors["step"] = torch.tensor([7 + i], dtype=torch.int64)
        cks[name] = write_checkpoint(root / name, tensors, shards=shards)
    return cks


def _raw(root: Path) -> dict[str, tuple[np.ndarray, str]]:
    inv = {v: k for k, v in TORCH.items()}
    return {k: (raw_bits(v), inv[v.dtype]) for k, v in load_all(root).items() if v.is_floating_point()}


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and p.name != MANIFEST}


# ------------------------------------------------------------------------------------------------- alpha sweeps
@pytest.mark.parametrize("extra", [{}, {"out_dtype": "fp32"}, {"rules": ["embed_tokens=copy-target", "up_proj=0.25"]}])
def test_sweep_outputs_equal_single_merges_byte_for_byte(five, tmp_path, extra) -> None:
    alphas = [0.5, 1.0, -1.5, 1e-3]
    before = tree_digest(five["t"].parent)
    reports = streammerge.sweep(five["t"], five["s1"], five["g1"], tmp_path / "sweep", alphas, **KW, **extra)
    assert [Path(r.out_dir).name for r in reports] == ["alpha-0.5", "alpha-1", "alpha--1.5", "alpha-0.001"]
    singles = []
    for a, r in zip(alphas, reports):
        one = streammerge.merge(five["t"], five["s1"], five["g1"], tmp_path / f"one{a}", alpha=a, **KW, **extra)
        singles.append(one)
        got, want = _files(Path(r.out_dir)), _files(Path(one.out_dir))
        assert got.keys() == want.keys() and len([n for n in got if n.endswith(".safetensors")]) >= 2
        for name in want:
            assert got[name] == want[name], f"alpha {a}: {name} differs from the single-alpha merge"
        assert r.shard_sha256 == one.shard_sha256
    # The inputs were read once, not once per alpha.
    assert reports[0].bytes_read == singles[0].bytes_read
    assert tree_digest(five["t"].parent) == before


def test_sweep_matches_the_independent_reference(five, tmp_path) -> None:
    alphas = [2.0, -0.75]
    streammerge.sweep(five["t"], five["s1"], five["g1"], tmp_path / "sw", alphas, **KW)
    t, s, g = _raw(five["t"]), _raw(five["s1"]), _raw(five["g1"])
    for a in alphas:
        out = _raw(tmp_path / "sw" / streammerge.sweep_dirname(a))
        for name, (bits, dt) in out.items():
            want = expected_bits(t[name][0], s[name][0], g[name][0], a, (t[name][1], s[name][1], g[name][1]), dt)
            assert np.array_equal(bits, want), f"alpha {a}: {name}"


def test_sweep_reads_inputs_once_and_memory_bound_counts_outputs(five, tmp_path) -> None:
    single = streammerge.plan(five["t"], five["s1"], five["g1"], **KW)
    sw = streammerge.plan(five["t"], five["s1"], five["g1"], alphas="0.5,1,1.5", **KW)
    assert sw.outputs == 3 and sw.bytes_read == single.bytes_read
    assert sw.bytes_written == 3 * single.bytes_written
    # one more chunk per output per slot; the model's size does not enter
    assert sw.expected_peak_memory() >= single.expected_peak_memory() + 4 * KW["chunk_bytes"]
    summary = sw.summary()
    assert summary["alpha"] == [0.5, 1.0, 1.5] and summary["outputs"] == 3


@pytest.mark.parametrize(
    ("alphas", "match"),
    [([1.0], "two or more"), ([1.0, 0.5, 1.0], "repeated"), ("0.5,,1", "comma-separated"), ("a,b", "comma")],
)
def test_sweep_rejects_bad_alpha_lists(five, tmp_path, alphas, match) -> None:
    with pytest.raises(OptionsError, match=match):
        streammerge.sweep(five["t"], five["s1"], five["g1"], tmp_path / "x", alphas, **KW)
    assert not (tmp_path / "x").exists()


def test_sweep_refuses_a_single_output_dir_push_and_merge_with_a_list(five, tmp_path) -> None:
    one = tmp_path / "one"
    streammerge.merge(five["t"], five["s1"], five["g1"], one, **KW)
    with pytest.raises(OutputError, match="holds a single merge's output"):
        streammerge.sweep(five["t"], five["s1"], five["g1"], one, [0.5, 1], **KW)
    with pytest.raises(OptionsError, match="streammerge.sweep"):
        streammerge.merge(five["t"], five["s1"], five["g1"], tmp_path / "y", alpha=[0.5, 1], **KW)


def test_sweep_interrupted_then_resumed_gives_the_same_bytes(five, tmp_path) -> None:
    out = tmp_path / "sw"
    argv = [*streammerge_cmd("merge", five["t"], five["s1"], five["g1"]), "-o"]
    argv += [str(out), "--alpha", "0.5,-1", "--chunk-size", "4096", "--max-shard-size", "3KB", "--device", "cpu"]
    env = {**os.environ, "STREAMMERGE_CRASH_AT": "chunk:3"}
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert r.returncode != 0
    for a in (0.5, -1.0):
        d = out / streammerge.sweep_dirname(a)
        assert json.loads((d / MANIFEST).read_text())["state"] != "complete"
        assert not (d / "model.safetensors.index.json").exists(), "an interrupted output looks complete"
    r = subprocess.run([*argv, "--resume", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for a in (0.5, -1.0):
        one = streammerge.merge(five["t"], five["s1"], five["g1"], tmp_path / f"one{a}", alpha=a, **KW)
        assert _files(out / streammerge.sweep_dirname(a)) == _files(Path(one.out_dir))


def test_sweep_outputs_verify_against_their_inputs(five, tmp_path) -> None:
    streammerge.sweep(five["t"], five["s1"], five["g1"], tmp_path / "sw", [0.5, 3.0], **KW)
    for a in (0.5, 3.0):
        rep = streammerge.verify(
            tmp_path / "sw" / streammerge.sweep_dirname(a), five["t"], five["s1"], five["g1"], full=True
        )
        assert rep.ok, rep.errors


def test_sweep_check_finite_counts_per_output(tmp_path) -> None:
    big = torch.full((600,), 3.0e38).to(torch.bfloat16)
    zero = torch.zeros(600, dtype=torch.bfloat16)
    t = write_checkpoint(tmp_path / "t", {"w": big})
    s = write_checkpoint(tmp_path / "s", {"w": zero})
    g = write_checkpoint(tmp_path / "g", {"w": big.clone()})
    reports = streammerge.sweep(
        t, s, g, tmp_path / "sw", [-1.0, 0.5], check_finite=True, chunk_bytes=4096, device="cpu"
    )
    assert reports[0].nonfinite == {}  # t - g = 0
    assert reports[1].nonfinite == {"w": 600}  # 3e38 + 1.5e38 overflows bf16


def test_sweep_cli(five, tmp_path) -> None:
    out = tmp_path / "cli"
    args = ["merge", str(five["t"]), str(five["s1"]), str(five["g1"]), "-o", str(out), "--alpha", "0.5,1"]
    r = runner.invoke(app, [*args, "--chunk-size", "4096", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    reports = json.loads(r.stdout)
    assert [Path(x["out_dir"]).name for x in reports] == ["alpha-0.5", "alpha-1"]
    r = runner.invoke(app, ["plan", str(five["t"]), str(five["s1"]), str(five["g1"]), "--alpha", "0.5,1,2"])
    assert r.exit_code == 0 and "one output each" in r.stdout and "3 outputs" in r.stdout, r.output
    r = runner.invoke(
        app, ["merge", str(five["t"]), str(five["s1"]), str(five["g1"]), "-o", str(tmp_path / "z"), "--alpha", "1,1"]
    )
    assert r.exit_code == 1 and "repeated" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------------------------- many vectors
def _spec(five, a1=0.7, a2=-0.3, **extra) -> dict:
    return {
        "target": str(five["t"]),
        "vectors": [
            {"sft": str(five["s1"]), "grpo": str(five["g1"]), "alpha": a1},
            {"sft": str(five["s2"]), "grpo": str(five["g2"]), "alpha": a2},
        ],
        **extra,
    }


@pytest.mark.parametrize("out_dtype", [None, "bf16", "fp16", "fp32"])
def test_two_vectors_match_the_independent_reference(five, tmp_path, out_dtype) -> None:
    kw = {**KW, **({"out_dtype": out_dtype} if out_dtype else {})}
    rep = streammerge.combine(_spec(five), tmp_path / "c", **kw)
    assert rep.tensors_merged == len(SHAPES)
    t, s1, g1, s2, g2 = (_raw(five[k]) for k in ("t", "s1", "g1", "s2", "g2"))
    out = _raw(tmp_path / "c")
    assert out.keys() == set(SHAPES)
    for name, (bits, dt) in out.items():
        vec = [
            (g1[name][0], g1[name][1], s1[name][0], s1[name][1], 0.7),
            (g2[name][0], g2[name][1], s2[name][0], s2[name][1], -0.3),
        ]
        want = expected_bits_many(t[name][0], t[name][1], vec, dt)
        assert np.array_equal(bits, want), name
    assert load_all(tmp_path / "c")["step"].item() == 7  # non-floating: the target's


def test_order_is_left_to_right(five, tmp_path) -> None:
    """The spec's order is the summation order: swapping the vectors changes some bytes (float32 addition is not
    associative), and the reference follows the order given."""
    a = streammerge.combine(_spec(five, 1e3, -1e3), tmp_path / "a", **KW)
    swapped = _spec(five, 1e3, -1e3)
    swapped["vectors"].reverse()
    b = streammerge.combine(swapped, tmp_path / "b", **KW)
    assert a.shard_sha256 != b.shard_sha256


def test_one_vector_spec_equals_merge(five, tmp_path) -> None:
    spec = {"target": str(five["t"]), "vectors": [{"sft": str(five["s1"]), "grpo": str(five["g1"]), "alpha": -1}]}
    streammerge.combine(spec, tmp_path / "c", **KW)
    streammerge.merge(five["t"], five["s1"], five["g1"], tmp_path / "m", alpha=-1, **KW)
    a, b = load_all(tmp_path / "c"), load_all(tmp_path / "m")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def test_stored_vector_in_a_spec_equals_its_pair(five, tmp_path) -> None:
    streammerge.extract(five["s2"], five["g2"], tmp_path / "vec2", chunk_bytes=4096, device="cpu")
    with_pair = streammerge.combine(_spec(five), tmp_path / "pair", **KW)
    spec = _spec(five)
    spec["vectors"][1] = {"vector": str(tmp_path / "vec2"), "alpha": -0.3}
    with_vec = streammerge.combine(spec, tmp_path / "vec", **KW)
    a, b = load_all(tmp_path / "pair"), load_all(tmp_path / "vec")
    for k in a:
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert with_vec.tensors_merged == with_pair.tensors_merged
    spec["vectors"][1] = {"vector": str(five["g2"]), "alpha": -0.3}  # a whole model, not a vector
    with pytest.raises(OptionsError, match="not a vector written by `streammerge extract`"):
        streammerge.combine(spec, tmp_path / "bad", **KW)


def test_global_and_per_vector_rules(five, tmp_path) -> None:
    spec = _spec(five, rules=["embed_tokens=copy-target", "norm=0"])
    spec["vectors"][0]["rules"] = ["up_proj=2.5"]
    p = streammerge.plan_combine(spec, **KW)
    hits = p.summary()["rule_hits"]
    assert hits["embed_tokens=copy-target"] == 1 and hits["norm=0.0"] == 1
    assert hits["sft1/grpo1: up_proj=2.5"] == 1
    streammerge.combine(spec, tmp_path / "c", **KW)
    t, s1, g1, s2, g2 = (_raw(five[k]) for k in ("t", "s1", "g1", "s2", "g2"))
    out = _raw(tmp_path / "c")
    assert np.array_equal(out["model.embed_tokens.weight"][0], t["model.embed_tokens.weight"][0])
    for name, a1, a2 in (("model.norm.weight", 0.0, 0.0), ("model.layers.0.mlp.up_proj.weight", 2.5, -0.3)):
        vec = [
            (g1[name][0], g1[name][1], s1[name][0], s1[name][1], a1),
            (g2[name][0], g2[name][1], s2[name][0], s2[name][1], a2),
        ]
        assert np.array_equal(out[name][0], expected_bits_many(t[name][0], t[name][1], vec, out[name][1])), name
    spec["vectors"][1]["rules"] = ["no_such_tensor=1"]
    with pytest.raises(TensorMismatchError, match="sft2/grpo2: no_such_tensor=1.0"):
        streammerge.plan_combine(spec, **KW)


def test_vocab_common_rows_with_vectors_of_different_sizes(tmp_path) -> None:
    shapes = {"model.embed_tokens.weight": (30, 8), "model.norm.weight": (8,)}
    t, s, g = make_related(shapes, seed=1)
    t2, s2, g2 = make_related({**shapes, "model.embed_tokens.weight": (26, 8)}, seed=2)
    t = {
        **t,
        "model.embed_tokens.weight": make_related({"model.embed_tokens.weight": (28, 8)}, seed=3)[0][
            "model.embed_tokens.weight"
        ],
    }
    dirs = {n: write_checkpoint(tmp_path / n, sd) for n, sd in (("t", t), ("s1", s), ("g1", g), ("s2", s2), ("g2", g2))}
    spec = {
        "target": str(dirs["t"]),
        "vectors": [
            {"sft": str(dirs["s1"]), "grpo": str(dirs["g1"])},
            {"sft": str(dirs["s2"]), "grpo": str(dirs["g2"]), "alpha": 0.5},
        ],
    }
    with pytest.raises(TensorMismatchError, match="vocabulary size mismatch"):
        streammerge.plan_combine(spec)
    streammerge.combine(spec, tmp_path / "c", vocab_mismatch="common-rows", device="cpu")
    out = _raw(tmp_path / "c")["model.embed_tokens.weight"][0].reshape(28, 8)
    name = "model.embed_tokens.weight"
    bits = {k: raw_bits(v[name]) for k, v in (("t", t), ("s1", s), ("g1", g), ("s2", s2), ("g2", g2))}
    rows = 26 * 8
    vec = [
        (bits["g1"][:rows], "BF16", bits["s1"][:rows], "BF16", 1.0),
        (bits["g2"][:rows], "BF16", bits["s2"][:rows], "BF16", 0.5),
    ]
    assert np.array_equal(out.reshape(-1)[:rows], expected_bits_many(bits["t"][:rows], "BF16", vec, "BF16"))
    assert np.array_equal(out.reshape(-1)[rows:], bits["t"][rows:])  # the target's own rows


def test_spec_files_toml_and_yaml_with_relative_paths_and_options(five, tmp_path) -> None:
    root = five["t"].parent
    toml = root / "spec.toml"
    toml.write_text(
        'target = "t"\nrules = ["embed_tokens=copy-target"]\n'
        '[[vectors]]\nsft = "s1"\ngrpo = "g1"\nalpha = 0.7\n'
        '[[vectors]]\nsft = "s2"\ngrpo = "g2"\nalpha = -0.3\n'
        '[options]\nout_dtype = "fp32"\nchunk_bytes = "4KiB"\n'
    )
    yml = root / "spec.yaml"
    yml.write_text(
        "target: t\nrules: ['embed_tokens=copy-target']\nvectors:\n"
        "  - {sft: s1, grpo: g1, alpha: 0.7}\n  - {sft: s2, grpo: g2, alpha: -0.3}\n"
        "options: {out_dtype: fp32, chunk_bytes: 4KiB}\n"
    )
    a = streammerge.combine(toml, tmp_path / "a", device="cpu")
    b = streammerge.combine(yml, tmp_path / "b", device="cpu")
    assert a.shard_sha256 == b.shard_sha256
    assert all(v.dtype == torch.float32 for k, v in load_all(tmp_path / "a").items() if k != "step")
    assert a.copied_reasons == {"rule embed_tokens=copy-target": 1, "non-floating (I64)": 1}
    # a keyword overrides the spec's [options]
    c = streammerge.combine(toml, tmp_path / "c", device="cpu", out_dtype="bf16")
    assert load_all(tmp_path / "c")["model.norm.weight"].dtype == torch.bfloat16
    assert c.shard_sha256 != a.shard_sha256
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| vector 2 |" in card and "α = -0.3" in card
    header = next((tmp_path / "a").glob("*.safetensors")).read_bytes()
    assert b'"streammerge_vectors"' in header and b"target + sum_i alpha_i" in header


BAD_SPECS = [
    ({"vectors": [{"sft": "s1", "grpo": "g1"}]}, "missing 'target'"),
    ({"target": "t", "vectors": []}, "non-empty list"),
    ({"target": "t", "vectors": [{"sft": "s1"}]}, "both 'sft' and 'grpo', or 'vector'"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1", "vector": "v"}]}, "either both"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1", "alpha": "big"}]}, "alpha must be a number"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1", "alpha": float("inf")}]}, "finite"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1", "alhpa": 1}]}, "unknown key.*alhpa"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1", "rules": ["x=skip"]}]}, "set its alpha only"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1"}], "taget": 1}, "unknown key.*taget"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1"}], "options": {"alpha": 2}}, "alphas go in each vector"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1"}], "options": {"chunk": 2}}, "chunk"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1"}], "rules": ["(=1"]}, "invalid regular expression"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1"}], "options": {"out_dtype": 5}}, r"\[options\] out_dtype"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1"}], "options": {"out_dtype": "int8"}}, r"out_dtype: .*int8"),
    (
        {"target": "t", "vectors": [{"sft": "s1", "grpo": "g1"}], "options": {"threads": "x"}},
        r"threads: must be an int",
    ),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1"}], "options": {"overwrite": "yes"}}, "true or false"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1"}], "options": {"missing": "bogus"}}, r"missing: .*bogus"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1"}], "options": {"extra_metadata": 3}}, "table of strings"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "g1"}], "options": {"chunk_bytes": [1]}}, "a size like"),
    (
        {"target": "t", "vectors": [{"sft": "s1", "grpo": "g1"}], "rules": [{"pattern": "a", "alpha": "x"}]},
        r"^\S+: rules: rule 1: alpha must be a number, got 'x'$",
    ),
    ({"target": "nope", "vectors": [{"sft": "s1", "grpo": "g1"}]}, r"bad.yaml: target: target checkpoint: .*nope"),
    ({"target": "t", "vectors": [{"sft": "s1", "grpo": "missing-g"}]}, r"vectors\[1\].grpo: .*missing-g"),
]


@pytest.mark.parametrize(("spec", "match"), BAD_SPECS)
def test_bad_specs_are_refused_with_the_key_named(five, tmp_path, spec, match) -> None:
    import yaml

    path = five["t"].parent / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(streammerge.StreamMergeError, match=match):
        streammerge.plan_combine(path)
    r = runner.invoke(app, ["combine", str(path), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Traceback" not in r.output and "bad.yaml" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_spec_file_errors(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("target = [\n")
    with pytest.raises(OptionsError, match="invalid TOML"):
        streammerge.plan_combine(bad)
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: [1, 2\nvectors: []\n")
    with pytest.raises(OptionsError, match=r"bad.yaml: invalid YAML at line \d+, column \d+: [^\n]+$"):
        streammerge.plan_combine(bad)
    with pytest.raises(OptionsError, match="cannot read the spec"):
        streammerge.plan_combine(tmp_path / "nope.toml")


def test_combine_cli_dry_run_and_run(five, tmp_path) -> None:
    spec = five["t"].parent / "cli.toml"
    spec.write_text(
        'target = "t"\n[[vectors]]\nsft = "s1"\ngrpo = "g1"\n[[vectors]]\nsft = "s2"\ngrpo = "g2"\nalpha = 0.5\n'
    )
    r = runner.invoke(app, ["combine", str(spec), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "grpo2" in r.stdout and "0.5 * (grpo2 - sft2)" in r.stdout
    r = runner.invoke(
        app, ["combine", str(spec), "-o", str(tmp_path / "o"), "--device", "cpu", "--json", "--chunk-size", "4KiB"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tensors_merged"] == len(SHAPES)
    r = runner.invoke(app, ["combine", "--help"])
    assert "Examples" in r.stdout and "[[vectors]]" in r.stdout


def test_combine_resume_refuses_another_spec(five, tmp_path) -> None:
    out = tmp_path / "c"
    argv = streammerge_cmd("combine", "SPEC", "-o", out, "--device", "cpu")
    argv += ["--chunk-size", "4096", "--max-shard-size", "3KB"]
    spec = five["t"].parent / "r.toml"
    spec.write_text('target = "t"\n[[vectors]]\nsft = "s1"\ngrpo = "g1"\n[[vectors]]\nsft = "s2"\ngrpo = "g2"\n')
    argv[4] = str(spec)
    r = subprocess.run(argv, env={**os.environ, "STREAMMERGE_CRASH_AT": "chunk:3"}, capture_output=True, text=True)
    assert r.returncode != 0
    spec.write_text(spec.read_text().replace('grpo = "g2"\n', 'grpo = "g2"\nalpha = 0.5\n'))
    r = subprocess.run([*argv, "--resume"], capture_output=True, text=True)
    assert r.returncode == 1 and "resume" in r.stderr, r.stderr
    spec.write_text(spec.read_text().replace("alpha = 0.5\n", ""))
    r = subprocess.run([*argv, "--resume", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fresh = streammerge.combine(spec, tmp_path / "fresh", **KW)
    assert _files(out) == _files(Path(fresh.out_dir))


def test_verify_recomputes_a_combine_output_from_its_spec(five, tmp_path) -> None:
    spec = _spec(five)
    streammerge.combine(spec, tmp_path / "c", **KW)
    rep = streammerge.verify(tmp_path / "c", spec=spec, full=True)
    assert rep.ok and rep.chunks_checked == rep.chunks_total > 0, rep.problems
    other = _spec(five, a2=-0.25)
    rep = streammerge.verify(tmp_path / "c", spec=other, full=True)
    assert not rep.ok and "header" in rep.problems[0]
    with pytest.raises(streammerge.StreamMergeError, match="a combine output; to recompute it give --spec"):
        streammerge.verify(tmp_path / "c", five["t"], five["s1"], five["g1"])
    # flip one element of the output: found and named
    f = sorted((tmp_path / "c").glob("model-*.safetensors"))[-1]
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40
    f.write_bytes(bytes(data))
    rep = streammerge.verify(tmp_path / "c", spec=spec, full=True)
    assert not rep.ok


def test_relative_spec_paths_never_fall_back_to_the_working_directory(five, tmp_path, monkeypatch) -> None:
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    (spec_dir / "s.toml").write_text('target = "t"\n[[vectors]]\nsft = "s1"\ngrpo = "g1"\n')
    monkeypatch.chdir(five["t"].parent)  # t, s1, g1 exist here, not beside the spec
    with pytest.raises(streammerge.StreamMergeError, match=r"s.toml: target: .*specs/t"):
        streammerge.plan_combine(spec_dir / "s.toml")


def test_combine_cli_honours_the_spec_options(tmp_path) -> None:
    big = torch.full((600,), 3.0e38).to(torch.bfloat16)
    for n, v in (("t", big), ("s", torch.zeros(600, dtype=torch.bfloat16)), ("g", big.clone())):
        write_checkpoint(tmp_path / n, {"w": v})
    spec = tmp_path / "strict.toml"
    spec.write_text(
        'target = "t"\n[[vectors]]\nsft = "s"\ngrpo = "g"\nalpha = 5\n'
        '[options]\ncheck_finite = true\nstrict = true\ndevice = "cpu"\n'
    )
    r = runner.invoke(app, ["combine", str(spec), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "strict" in r.output and "Traceback" not in r.output, r.output
    spec.write_text('target = "t"\n[[vectors]]\nsft = "s"\ngrpo = "g"\n[options]\noverwrite = true\n')
    for _ in range(2):  # the second run replaces the first: overwrite came from the spec
        r = runner.invoke(app, ["combine", str(spec), "-o", str(tmp_path / "o2"), "--device", "cpu"])
        assert r.exit_code == 0, r.output


def test_null_sink_needs_no_output_dir_and_push_is_refused_for_sweeps(five, tmp_path) -> None:
    args = [str(five["t"]), str(five["s1"]), str(five["g1"])]
    r = runner.invoke(app, ["merge", *args, "--sink", "null", "--alpha", "1,2", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 2
    spec = five["t"].parent / "null.toml"
    spec.write_text('target = "t"\n[[vectors]]\nsft = "s1"\ngrpo = "g1"\n')
    r = runner.invoke(app, ["combine", str(spec), "--sink", "null", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["merge", *args, "-o", str(tmp_path / "p"), "--alpha", "1,2", "--push-to", "me/x"])
    assert r.exit_code == 1 and "internal error" not in r.output and "push the one you keep" in r.output


def test_sweep_checks_every_output_before_touching_any(five, tmp_path) -> None:
    out = tmp_path / "fo"
    out.mkdir()
    (out / "alpha-2").write_text("in the way")
    with pytest.raises(OutputError, match="alpha-2: exists and is not a directory"):
        streammerge.sweep(five["t"], five["s1"], five["g1"], out, [0.5, 2], **KW)
    assert not (out / "alpha-0.5").exists()
    (out / "alpha-2").unlink()
    reports = streammerge.sweep(five["t"], five["s1"], five["g1"], out, [0.5, 2], **KW)
    assert len(reports) == 2
    with pytest.raises(streammerge.StreamMergeError, match="root of an alpha sweep; verify each output: alpha-0.5"):
        streammerge.verify(out)


def test_overwrite_on_a_sweep_removes_an_earlier_sweeps_other_alphas(five, tmp_path) -> None:
    """The root of a sweep stands for that sweep: with --overwrite, outputs an earlier sweep left there for other
    alphas go (only the files their manifests record); without it they are named in the report. Anything else stays
    whole: an output holding a file of the user's, a directory that is not a sweep output (another merge named
    alpha-best, an alpha dir whose merge was at another alpha), an unreadable manifest."""
    out = tmp_path / "root"
    streammerge.sweep(five["t"], five["s1"], five["g1"], out, [0.5, 2, -1], **KW)
    (out / "alpha--1" / "eval.txt").write_text("the user's own file")
    streammerge.merge(five["t"], five["s1"], five["g1"], out / "alpha-best", **KW)
    streammerge.merge(five["t"], five["s1"], five["g1"], out / "alpha-7", alpha=0.25, **KW)
    (out / "alpha-9").mkdir()
    (out / "alpha-9" / "data.bin").write_text("not a streammerge output")
    (out / "alpha-junk").mkdir()
    (out / "alpha-junk" / MANIFEST).write_text("garbage")
    untouched = {d: tree_digest(out / d) for d in ("alpha--1", "alpha-best", "alpha-7", "alpha-9", "alpha-junk")}

    reports = streammerge.sweep(five["t"], five["s1"], five["g1"], out, [1, 4], **KW)
    notes = [w for w in reports[0].warnings if "earlier sweep" in w]
    assert notes == [
        f"sweep: {out} also holds alpha--1, alpha-0.5, alpha-2 from an earlier sweep (not this one's; "
        "--overwrite removes them)"
    ]

    want = _files(out / "alpha-2")
    reports = streammerge.sweep(five["t"], five["s1"], five["g1"], out, [2, 3], overwrite=True, **KW)
    notes = reports[0].warnings
    for name in ("alpha-0.5", "alpha-1", "alpha-4"):
        assert f"sweep: removed {name} of an earlier sweep (--overwrite)" in notes
    assert any("alpha--1: kept whole, it holds 1 file(s) streammerge did not write (eval.txt)" in w for w in notes)
    assert {p.name for p in out.iterdir()} == {"alpha-2", "alpha-3", *untouched}
    assert {d: tree_digest(out / d) for d in untouched} == untouched
    assert _files(out / "alpha-2") == want  # rewritten, same bytes


def test_remove_output_leaves_a_directory_another_process_writes(five, tmp_path) -> None:
    import fcntl

    from streammerge.writer import read_manifest, remove_output

    d = tmp_path / "busy"
    streammerge.merge(five["t"], five["s1"], five["g1"], d, **KW)
    previous = read_manifest(d)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert "another streammerge process is writing it" in remove_output(d, previous)
    finally:
        os.close(fd)
    assert (d / MANIFEST).exists()
    assert remove_output(d, previous) is None and not d.exists()
    assert "not a directory" in remove_output(d, previous)


def test_overwrite_on_a_sweep_never_removes_an_input(five, tmp_path) -> None:
    """An earlier sweep's output used as this sweep's target, in the same root: --overwrite keeps it."""
    out = tmp_path / "root"
    streammerge.sweep(five["t"], five["s1"], five["g1"], out, [0.5, 2], **KW)
    before = tree_digest(out / "alpha-0.5")
    reports = streammerge.sweep(out / "alpha-0.5", five["s1"], five["g1"], out, [2, 3], overwrite=True, **KW)
    assert "sweep: kept alpha-0.5 of an earlier sweep: it is an input of this one" in reports[0].warnings
    assert tree_digest(out / "alpha-0.5") == before


def test_apply_sweep_equals_single_applies_and_the_merge_sweep(five, tmp_path) -> None:
    """Several alphas of an extracted vector in one pass: each output is byte-identical to a single apply and, for a
    float32 vector, to the merge sweep's output; the inputs are read once."""
    vec = tmp_path / "vec"
    streammerge.extract(five["s1"], five["g1"], vec, chunk_bytes=4096)
    alphas = [0.5, -1.0, 2.0]
    reports = streammerge.apply_sweep(five["t"], vec, tmp_path / "sw", alphas, **KW)
    assert [Path(r.out_dir).name for r in reports] == ["alpha-0.5", "alpha--1", "alpha-2"]
    merged = streammerge.sweep(five["t"], five["s1"], five["g1"], tmp_path / "msw", alphas, **KW)
    for a, r, m in zip(alphas, reports, merged):
        one = streammerge.apply(five["t"], vec, tmp_path / f"one{a}", alpha=a, **KW)
        got = _files(Path(r.out_dir))
        assert got == _files(Path(one.out_dir)), f"alpha {a}: differs from a single apply"
        # The same tensor bytes as the merge sweep (headers differ only in the recorded formula and sources).
        mine, theirs = load_all(Path(r.out_dir)), load_all(Path(m.out_dir))
        assert mine.keys() == theirs.keys()
        assert all(np.array_equal(raw_bits(mine[k]), raw_bits(theirs[k])) for k in mine if mine[k].is_floating_point())
    assert reports[0].bytes_read == one.bytes_read
    with pytest.raises(OptionsError, match="two or more alphas"):
        streammerge.apply_sweep(five["t"], vec, tmp_path / "x", [1.0], **KW)


def test_apply_cli_sweep_and_progress_options(five, tmp_path) -> None:
    vec = tmp_path / "vec"
    streammerge.extract(five["s1"], five["g1"], vec, chunk_bytes=4096)
    args = ["apply", str(five["t"]), str(vec), "-o", str(tmp_path / "sw"), "--alpha", "1,-1", "--device", "cpu"]
    r = runner.invoke(app, [*args, "--chunk-size", "4KiB", "--check-finite", "-q"])
    assert r.exit_code == 0, r.output
    assert "sweep: output 2 of 2 from one pass over the inputs" in r.output
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["alpha--1", "alpha-1"]
    r = runner.invoke(app, [*args, "--push-to", "me/x"])
    assert r.exit_code == 1 and "a sweep writes one per alpha" in r.output
