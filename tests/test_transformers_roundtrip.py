"""End to end with real transformers checkpoints: tiny Qwen2 (untied and tied embeddings) and Llama models written
by ``save_pretrained`` (sharded, each of the three differently), merged by streammerge, and loaded back with
``AutoModelForCausalLM`` / ``AutoTokenizer``.

Checked: every parameter of the loaded model equals the numerics contract (docs/numerics.md) computed by the
independent numpy reference, bit for bit; the logits equal those of the same merge done in memory; the tokenizer
and config files were copied and load to the same tokenizer; a tied ``lm_head`` (absent from the files) follows the
merged embedding.

Block-scaled FP8 (issue 12), on the tiny DeepSeek-V3 layout (``DeepseekV3ForCausalLM``, MLA attention, a dense and
two MoE layers; the MTP layer's tensors are in the files and transformers leaves them unused, as for DeepSeek-V3):

- the dequantized output (``--out-dtype bf16``) has no ``_scale_inv`` tensors and no ``quantization_config``, loads
  as a plain model on CPU, and gives logits identical to a model loaded from the reference's bytes;
- the FP8 output loads on CPU too, through transformers' FP8 integration (``FineGrainedFP8HfQuantizer``): with no
  GPU it dequantizes the weights to bf16 while loading (``(e4m3(q) * scale).to(bf16)``, the contract's dequantization
  and one rounding). Its logits are identical to those of the reference's FP8 bytes loaded the same way, and to a
  plain model holding the contract's dequantized values rounded once to bf16. That integration needs the
  ``accelerate`` package: without it transformers refuses every FP8 checkpoint with "Loading an FP8 quantized model
  requires accelerate", and the test then checks exactly that refusal (it is never skipped).
- transformers derives each weight's block from its scale grid (``rows // scale_rows``), which is right only when
  the shapes are whole blocks (every DeepSeek-V3/R1, Kimi-K2 and Qwen3-FP8 weight is); the tiny layout's sizes are
  multiples of 16, so these trios use 16 x 16 blocks. (With 128 x 128 blocks the tiny layout has partial edge blocks,
  which transformers would read with other block sizes; that is the loader's limit, not the checkpoint's.)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from helpers import from_bits, load_all, raw_bits  # noqa: E402
from packaging.version import Version  # noqa: E402  (a dependency of transformers)
from reference import expected_bits  # noqa: E402

import streammerge  # noqa: E402

# transformers 4.56 renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns in 5.x).
DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 64, 2, 4, 2, 128
VOCAB = 320  # a byte-level BPE needs 256 byte tokens; the model's vocabulary is a little larger than the tokenizer's
TOKENIZER_VOCAB = 300
EOS = "<|endoftext|>"
# The three checkpoints are sharded differently (shard counts are asserted below).
SHARD_SIZES = {"target": "100KB", "sft": "50KB", "grpo": "20KB"}
TEXTS = ["the merged model reasons step by step.", "Hello, world! 12 + 30 = 42\n\tdone", "naïve café déjà vu"]
CORPUS = [
    "the cat sat on the mat and reasoned step by step about the answer",
    "reasoning vectors transfer chain of thought through task arithmetic",
    "hello world, the quick brown fox jumps over the lazy dog 0123456789",
    "target plus alpha times grpo minus sft, rounded once to bfloat16",
] * 4
MODELS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", False),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", True),
    "llama": ("LlamaConfig", "LlamaForCausalLM", False),
}


def _tokenizer():
    """A small byte-level BPE built like Qwen2's (the pipeline Qwen2Tokenizer rebuilds from tokenizer.json), trained
    offline on a few sentences, wrapped for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # Qwen2's pre-tokenizer split (the same pattern as transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
    regex = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert 256 < tok.get_vocab_size() <= VOCAB
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=EOS)


def _perturbed(model, gen: torch.Generator, scale: float):
    """A copy of ``model`` with every parameter moved by N(0, scale) noise, added in float32 and rounded to bf16.
    Tied parameters are one Parameter (``parameters()`` yields it once), so they stay tied."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_((p.float() + noise).to(torch.bfloat16))
    return out


@pytest.fixture(scope="module", params=list(MODELS))
def trio(request, tmp_path_factory):
    kind = request.param
    config_cls, model_cls, tied = MODELS[kind]
    config = getattr(transformers, config_cls)(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTER,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):  # random init from a fixed seed, without touching the global RNG
        torch.manual_seed(1234)
        target = getattr(transformers, model_cls)(config).to(torch.bfloat16).eval()
    assert (target.lm_head.weight is target.model.embed_tokens.weight) == tied
    gen = torch.Generator().manual_seed(99)
    sft = _perturbed(target, gen, 0.01)
    grpo = _perturbed(sft, gen, 0.003)  # grpo = sft + smaller noise: they share a "base"

    root = tmp_path_factory.mktemp(kind)
    dirs = {}
    for label, model in (("target", target), ("sft", sft), ("grpo", grpo)):
        dirs[label] = root / label
        model.save_pretrained(dirs[label], max_shard_size=SHARD_SIZES[label])
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(dirs["target"])

    shard_counts = []
    for label, d in dirs.items():
        assert (d / "model.safetensors.index.json").is_file(), f"{label} was not sharded"
        shard_counts.append(len(list(d.glob("model-*.safetensors"))))
        names = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"])
        # save_pretrained leaves a tied lm_head out of the files: it is the embedding.
        assert ("lm_head.weight" in names) == (not tied)
        assert "model.embed_tokens.weight" in names
    assert len(set(shard_counts)) == 3, shard_counts
    return {"kind": kind, "tied": tied, "dirs": dirs, "tokenizer": tokenizer}


def _load(path: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, **{DTYPE_KW: torch.bfloat16}, output_loading_info=True
    )
    return model.eval(), info


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# alpha = 1 writes one model.safetensors (default max_shard_size); alpha = -1 writes shards plus an index.
@pytest.mark.parametrize("alpha, out_shard_size", [(1.0, None), (-1.0, "60KB")])
def test_transformers_roundtrip(trio, alpha, out_shard_size, tmp_path):
    dirs, tied = trio["dirs"], trio["tied"]
    out = tmp_path / "merged"
    sharding = {"max_shard_size": out_shard_size} if out_shard_size else {}
    report = streammerge.merge(dirs["target"], dirs["sft"], dirs["grpo"], out, alpha=alpha, device="cpu", **sharding)
    if out_shard_size:
        assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    else:
        assert [f.name for f in out.glob("*.safetensors")] == ["model.safetensors"]

    # The merge done in memory, per the contract, by the independent numpy reference over the files' raw bits.
    t, s, g = (load_all(dirs[k]) for k in ("target", "sft", "grpo"))
    assert set(t) == set(s) == set(g)
    expected = {}
    for name, tt in t.items():
        assert tt.dtype == s[name].dtype == g[name].dtype == torch.bfloat16, name
        bits = expected_bits(
            raw_bits(tt), raw_bits(s[name]), raw_bits(g[name]), alpha, ("BF16", "BF16", "BF16"), "BF16"
        )
        expected[name] = from_bits(bits, "BF16", tt.shape)
    assert report.tensors_merged == len(expected) and report.tensors_copied == 0

    # The output files hold exactly the target's tensor names (a tied lm_head stays absent) with the expected bits.
    written = load_all(out)
    assert set(written) == set(expected)
    for name, w in written.items():
        assert w.dtype == torch.bfloat16 and w.shape == expected[name].shape, name
        assert np.array_equal(raw_bits(w), raw_bits(expected[name])), name

    # (d) config, generation config and tokenizer files are copied from the target, byte for byte.
    for fname in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (dirs["target"] / fname).is_file(), fname
        assert (out / fname).read_bytes() == (dirs["target"] / fname).read_bytes(), fname

    # (a) Every parameter of the model transformers loads from the output equals the contract, bit for bit.
    merged, info = _load(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    state = merged.state_dict()
    full = dict(expected)
    if tied:
        full["lm_head.weight"] = expected["model.embed_tokens.weight"]
        assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert set(state) == set(full)
    for name, p in state.items():
        assert p.dtype == torch.bfloat16 and p.shape == full[name].shape, name
        assert np.array_equal(raw_bits(p), raw_bits(full[name])), name

    # (b) Logits equal those of the target model given the in-memory merged weights.
    tok_target = transformers.AutoTokenizer.from_pretrained(dirs["target"])
    tok_out = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok_target.encode(TEXTS[0])[:12] + [0, 5, 97, 255, VOCAB - 1]])
    in_memory, _ = _load(dirs["target"])
    before = _logits(in_memory, ids)
    in_memory.load_state_dict(full, strict=True)
    if tied:
        assert in_memory.lm_head.weight.data_ptr() == in_memory.model.embed_tokens.weight.data_ptr()
    want = _logits(in_memory, ids)
    got = _logits(merged, ids)
    assert got.dtype == torch.bfloat16 and got.shape == (1, ids.shape[1], VOCAB)
    assert torch.equal(got, want)
    assert not torch.equal(got, before)  # the merge changed the model

    # (c) The tokenizer round-trips: the output's encodes to the same ids as the target's and the original object.
    assert type(tok_out) is type(tok_target)
    original = trio["tokenizer"]
    for text in TEXTS:
        ids_out = tok_out.encode(text)
        assert ids_out == tok_target.encode(text) == original.encode(text), text
        assert tok_out.decode(ids_out) == text
        assert max(ids_out) < VOCAB
    assert tok_out.eos_token == tok_target.eos_token == EOS
    assert tok_out.get_vocab() == tok_target.get_vocab()

    # The config transformers reads back is the target's.
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert strip(merged.config) == strip(in_memory.config)


# ------------------------------------------------------------------------------------------------ block-scaled FP8

FP8_BLOCK = (16, 16)  # the tiny DeepSeek-V3 layout's sizes are multiples of 16 (see the module docstring)
SCALE_SUFFIX = "_scale_inv"
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


def _raw(d: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a directory as (dtype, bit patterns), read with safetensors itself."""
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k).contiguous()
                view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
                bits = t.view(view).numpy()
                out[k] = (_ST_DTYPES[t.dtype], bits.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[t.element_size()]))
    return out


def _reference_merge(dirs: dict[str, Path], alpha: float, out_dtype: str | None) -> dict[str, tuple[str, np.ndarray]]:
    """The merge by the independent numpy reference (tests/fp8_reference.py) over the inputs' raw bits."""
    from fp8_reference import Fp8Tensor, PlainTensor, merge

    raws = {k: _raw(d) for k, d in dirs.items()}

    def as_ref(raw, name):
        dtype, bits = raw[name]
        if dtype.startswith("F8"):
            sdtype, sbits = raw[name + SCALE_SUFFIX]
            return Fp8Tensor(bits, sbits, FP8_BLOCK, sdtype, dtype)
        return PlainTensor(bits, dtype)

    want = {}
    target = raws["target"]
    for name in target:
        if name.endswith(SCALE_SUFFIX) and target.get(name[: -len(SCALE_SUFFIX)], ("",))[0].startswith("F8"):
            continue
        out = merge(*(as_ref(raws[k], name) for k in ("target", "sft", "grpo")), alpha, out_dtype)
        if isinstance(out, Fp8Tensor):
            want[name] = ("F8_E4M3", out.codes)
            want[name + SCALE_SUFFIX] = (out.scale_dtype, out.scale_bits)
        else:
            want[name] = (out.dtype, out.bits)
    return want


def _save_reference(d: Path, tensors: dict[str, tuple[str, np.ndarray]], shapes: dict, config: dict) -> Path:
    """A checkpoint holding exactly the reference's bytes, written by safetensors, with ``config`` as config.json."""
    from safetensors.torch import save_file

    torch_of = {"BF16": (np.int16, torch.bfloat16), "F32": (np.int32, torch.float32), "F8_E4M3": (np.uint8, None)}
    state = {}
    for name, (dtype, bits) in tensors.items():
        signed, dt = torch_of[dtype]
        t = torch.from_numpy(np.ascontiguousarray(bits).view(signed).copy()).reshape(shapes[name])
        state[name] = t.view(torch.float8_e4m3fn) if dtype == "F8_E4M3" else t.view(dt)
    d.mkdir(parents=True)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def fp8_trio(tmp_path_factory):
    from streammerge import synth

    trio = synth.make_fp8_trio(tmp_path_factory.mktemp("deepseek") / "trio", block_size=FP8_BLOCK, seed=7)
    return {"target": trio.target, "sft": trio.sft, "grpo": trio.grpo}


def _deepseek_ids() -> torch.Tensor:
    return torch.tensor([[0, 5, 17, 42, 99, 150, 191, 3, 8]])


def _shapes(d: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


def _fp8_load(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **{DTYPE_KW: torch.bfloat16}).eval()


def test_fp8_dequantized_output_roundtrip(fp8_trio, tmp_path):
    out = tmp_path / "merged"
    streammerge.merge(*fp8_trio.values(), out, alpha=0.5, out_dtype="bf16", device="cpu")
    want = _reference_merge(fp8_trio, 0.5, "BF16")
    got = _raw(out)
    assert set(got) == set(want) and not [n for n in got if n.endswith(SCALE_SUFFIX)]
    for name, (dtype, bits) in want.items():
        assert got[name][0] == dtype and np.array_equal(got[name][1].reshape(-1), bits.reshape(-1)), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model = _fp8_load(out)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}  # the router bias is F32
    reference = _fp8_load(_save_reference(tmp_path / "reference", want, _shapes(out), config))
    ids = _deepseek_ids()
    got_logits, want_logits = _logits(model, ids), _logits(reference, ids)
    assert got_logits.shape == (1, ids.shape[1], 192) and torch.isfinite(got_logits).all()
    assert torch.equal(got_logits, want_logits)
    target = _fp8_load_plain_target(fp8_trio["target"], tmp_path / "target-deq")
    assert not torch.equal(got_logits, _logits(target, ids))  # the merge changed the model


def _fp8_load_plain_target(target: Path, d: Path):
    """The target's weights dequantized by the reference and rounded once to bf16, as a plain checkpoint."""
    from fp8_reference import dequantize, round_to

    raw = _raw(target)
    plain = {}
    for name, (dtype, bits) in raw.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if dtype.startswith("F8"):
            sdtype, sbits = raw[name + SCALE_SUFFIX]
            values = dequantize(bits, sbits, FP8_BLOCK, sdtype)
            plain[name] = ("BF16", round_to(values, "BF16"))
        else:
            plain[name] = (dtype, bits)
    config = json.loads((target / "config.json").read_text())
    config.pop("quantization_config")
    return _fp8_load(_save_reference(d, plain, _shapes(target), config))


def test_fp8_output_roundtrip(fp8_trio, tmp_path):
    """The FP8 output in transformers on CPU: dequantized while loading (needs accelerate; see the docstring)."""
    out = tmp_path / "merged"
    streammerge.merge(*fp8_trio.values(), out, alpha=1.0, device="cpu")
    want = _reference_merge(fp8_trio, 1.0, None)
    got = _raw(out)
    assert set(got) == set(want)
    for name, (dtype, bits) in want.items():
        assert got[name][0] == dtype and np.array_equal(got[name][1].reshape(-1), bits.reshape(-1)), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == list(FP8_BLOCK)
    try:
        import accelerate  # noqa: F401
    except ImportError:
        # transformers' FP8 integration cannot load any FP8 checkpoint without accelerate, on any device
        with pytest.raises(ImportError, match="Loading an FP8 quantized model requires accelerate"):
            _fp8_load(out)
        return
    model = _fp8_load(out)
    # no GPU: dequantized while loading (the router bias stays F32, as in the checkpoint)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    reference = _fp8_load(_save_reference(tmp_path / "reference", want, _shapes(out), config))
    ids = _deepseek_ids()
    got_logits = _logits(model, ids)
    assert torch.isfinite(got_logits).all() and torch.equal(got_logits, _logits(reference, ids))
    # transformers' dequantization is the contract's, rounded once to bf16: a plain model of those values agrees
    plain = _fp8_load_plain_target(_save_reference(tmp_path / "ref-fp8", want, _shapes(out), config), tmp_path / "p")
    assert torch.equal(got_logits, _logits(plain, ids))
