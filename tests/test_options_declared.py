"""Every merge option declared once (streammerge.options.OPTIONS), and what is derived from the declaration: the CLI
flags, the spec's [options] checks, the manifest's record of the options and verify's rebuild of them."""

from __future__ import annotations

from dataclasses import fields

import pytest
import typer.main

from streammerge.cli import app
from streammerge.cli.args import PLACED_AFTER, flags_of, option_kwargs
from streammerge.errors import OptionsError
from streammerge.options import (
    IDENTITY_FIELDS,
    KINDS,
    OPTION,
    OPTIONS,
    MergeOptions,
    Rule,
    load_rules,
)
from streammerge.spec import parse_spec

COMMANDS = sorted({c for s in OPTIONS for f in s.flags for c in f.commands})


def _click_commands():
    return typer.main.get_command(app).commands


# ------------------------------------------------------------------------------------------------ the declaration
def test_every_field_is_declared_exactly_once():
    names = [s.name for s in OPTIONS]
    assert sorted(names) == sorted(f.name for f in fields(MergeOptions))
    assert len(names) == len(set(names))
    assert all(s.kind in KINDS for s in OPTIONS)
    params = [f.param for s in OPTIONS for f in s.flags]
    assert len(params) == len(set(params)), "two flags with one parameter name"


def test_declared_choices_are_what_validation_accepts():
    for s in OPTIONS:
        for choice in s.choices:
            assert getattr(MergeOptions.create(**{s.name: choice}), s.name) == choice
        if s.choices:
            with pytest.raises(OptionsError):
                MergeOptions.create(**{s.name: "no-such-choice"})


def test_the_fingerprint_records_every_option_that_changes_the_output():
    recorded = set(IDENTITY_FIELDS)
    assert len(IDENTITY_FIELDS) == len(recorded) and recorded <= set(OPTION)
    assert {s.name for s in OPTIONS if s.changes_output} <= recorded
    # check_finite and strict change no byte, but a strict run must not resume on an unchecked run's shards
    assert recorded - {s.name for s in OPTIONS if s.changes_output} == {"check_finite", "strict"}


@pytest.mark.parametrize("command", COMMANDS)
def test_command_line_defaults_are_the_library_defaults(command):
    """The defaults each command shows (sizes and alphas as strings, --gpu-staging turned round) parse to
    MergeOptions' own defaults."""
    shown = {f.param: s.cli_default(f) for s, f in flags_of(command)}
    kw = option_kwargs(shown)
    assert MergeOptions.create(**kw) == MergeOptions()


def test_the_docstring_lists_every_field_with_its_declared_help():
    doc = MergeOptions.__doc__ or ""
    flat = " ".join(doc.split())
    for f in fields(MergeOptions):
        assert f"{f.name} (`{f.type}`): {OPTION[f.name].help}" in flat, f.name


# ----------------------------------------------------------------------------------------------------- CLI flags
def test_every_declared_flag_reaches_its_commands():
    all_declared = {f.param for s in OPTIONS for f in s.flags}
    for command, click_command in _click_commands().items():
        params = {p.name: p for p in click_command.params}
        # exactly the flags the declaration gives this command (none for verify, inspect, version)
        assert set(params) & all_declared == {f.param for _, f in flags_of(command)}, command
        for _, flag in flags_of(command):
            p = params[flag.param]
            assert tuple(p.opts) == flag.decls, (command, flag.param)
            assert p.help == flag.help_in(command), (command, flag.param)


def test_flags_keep_their_help_order():
    """The flags appear where the command's ``flags`` parameter stands, in the declaration's order, with --resume
    after --overwrite."""
    merge = [p.name for p in _click_commands()["merge"].params]
    assert merge == [
        "target",
        "sft",
        "grpo",
        "out",
        *[f.param for _, f in flags_of("merge")][: [f.param for _, f in flags_of("merge")].index("overwrite") + 1],
        "resume",
        "check_finite",
        "strict",
        "dry_run",
        "sink",
        "push_to",
        "private",
        "part",
        "dist_timeout",
        "quiet",
        "as_json",
    ]
    for command in ("extract", "apply", "combine"):
        names = [p.name for p in _click_commands()[command].params]
        for name, anchor in PLACED_AFTER.items():
            assert names.index(name) == names.index(anchor) + 1, command


def test_combine_flags_only_override_what_is_given():
    params = {p.name: p for p in _click_commands()["combine"].params}
    for spec, flag in flags_of("combine"):
        assert params[flag.param].default is (False if spec.kind == "bool" else None), flag.param


def test_option_kwargs(tmp_path):
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text('[[rule]]\npattern = "lm_head"\naction = "copy-target"\n')
    kw = option_kwargs(
        {"rule": ["self_attn=0.5"], "rules": str(rules_file), "gpu_staging": True, "strict": True, "threads": None}
    )
    assert kw == {
        "rules": (Rule("self_attn", "alpha", 0.5), *load_rules(rules_file)),
        "gpu_register": False,
        "strict": True,
        "check_finite": True,
    }
    with pytest.raises(OptionsError):
        option_kwargs({"rule": ["no-equals-sign"]})


# ------------------------------------------------------------------------------- the manifest and verify's rebuild
def _identity_the_old_way(o: MergeOptions) -> dict:
    """api.merge_identity's options dict as it was written before the declaration (without kind and vectors)."""
    return {
        "alpha": repr(float(o.alpha)),
        "out_dtype": o.out_dtype,
        "missing": o.missing,
        "extra": o.extra,
        "shape_mismatch": o.shape_mismatch,
        "unsupported_dtype": o.unsupported_dtype,
        "max_shard_size": o.max_shard_size,
        "copy_aux_files": o.copy_aux_files,
        "extra_metadata": dict(o.extra_metadata),
        "rules": [r.describe() for r in o.rules],
        "check_finite": o.check_finite,
        "strict": o.strict,
        "vocab_mismatch": o.vocab_mismatch,
    }


def _recompute_options_the_old_way(o: dict) -> MergeOptions:
    """verify._recompute's options as they were built before the declaration."""
    return MergeOptions.create(
        rules=tuple(Rule.parse(r) for r in o.get("rules", [])),
        vocab_mismatch=o.get("vocab_mismatch", "error"),
        alpha=float(o.get("alpha", "1.0")),
        out_dtype=o.get("out_dtype"),
        missing=o.get("missing", "error"),
        extra=o.get("extra", "error"),
        shape_mismatch=o.get("shape_mismatch", "error"),
        unsupported_dtype=o.get("unsupported_dtype", "error"),
        max_shard_size=o.get("max_shard_size", 5 * 10**9),
        copy_aux_files=o.get("copy_aux_files", True),
        extra_metadata=o.get("extra_metadata", {}),
        chunk_bytes="4MiB",
    )


OPTION_SETS = [
    {},
    {"alpha": -0.75, "out_dtype": "fp32", "max_shard_size": "30KB"},
    {"alpha": 1 / 3, "missing": "copy-target", "extra": "ignore", "shape_mismatch": "copy-target"},
    {"unsupported_dtype": "copy-target", "vocab_mismatch": "common-rows", "copy_aux_files": False},
    {"rules": ["embed_tokens|lm_head=copy-target", r"layers\.0\.=0.5", "bias=skip"], "check_finite": True},
    {"strict": True, "check_finite": True, "extra_metadata": {"note": "x"}, "device": "cpu", "threads": 1},
    {"alpha": 1e-3, "chunk_bytes": "64KiB", "gpu_slots": 3, "gpu_register": False, "overwrite": True},
]


@pytest.mark.parametrize("kw", OPTION_SETS)
def test_identity_is_the_fingerprint_as_it_was(kw):
    o = MergeOptions.create(**kw)
    # items, not just the dict: the manifest is written unsorted, so the key order is part of its bytes
    assert list(o.identity().items()) == list(_identity_the_old_way(o).items())


@pytest.mark.parametrize("kw", OPTION_SETS)
def test_from_identity_rebuilds_what_verify_did(kw):
    record = {**MergeOptions.create(**kw).identity(), "kind": "merge"}
    assert MergeOptions.from_identity(record, chunk_bytes="4MiB") == _recompute_options_the_old_way(record)


@pytest.mark.parametrize("drop", IDENTITY_FIELDS)
def test_from_identity_defaults_absent_keys_as_verify_did(drop):
    record = MergeOptions.create(**OPTION_SETS[4]).identity()
    del record[drop]
    assert MergeOptions.from_identity(record, chunk_bytes="4MiB") == _recompute_options_the_old_way(record)
    assert MergeOptions.from_identity({}, chunk_bytes="4MiB") == _recompute_options_the_old_way({})


def test_replace_validates_and_keeps_rules():
    o = MergeOptions.create(rules=["self_attn=0.5"], out_dtype="bf16", chunk_bytes="64KiB")
    r = o.replace(alpha=0.25)
    assert r.rules is o.rules or r.rules == o.rules
    assert all(isinstance(x, Rule) for x in r.rules)
    assert (r.alpha, r.out_dtype, r.chunk_bytes) == (0.25, "BF16", 64 * 2**10)
    # what api's field loops built
    assert r == MergeOptions.create(**{f.name: getattr(o, f.name) for f in fields(o)} | {"alpha": 0.25})
    assert o.replace() == o
    with pytest.raises(OptionsError):
        o.replace(missing="sometimes")
    with pytest.raises(OptionsError):
        o.replace(alpha=float("inf"))


# -------------------------------------------------------------------------------------------- spec [options]
_OLD_SPEC_KINDS = {
    "bool": ("overwrite", "copy_aux_files", "check_finite", "strict", "gpu_register"),
    "int": ("threads", "gpu_slots"),
    "size": ("chunk_bytes", "max_shard_size", "gpu_window_bytes"),
    "str": ("device", "out_dtype", "missing", "extra", "shape_mismatch", "unsupported_dtype", "vocab_mismatch"),
    "table": ("extra_metadata",),
}
# added since: the Hub stream (issue 14)
_NEW_SPEC_KINDS = {"bool": ("stream",), "int": ("download_workers",), "size": ("stream_disk",), "str": ("stream_dir",)}
_OLD_SPEC_KINDS = {k: v + _NEW_SPEC_KINDS.get(k, ()) for k, v in _OLD_SPEC_KINDS.items()}


def test_spec_option_kinds_are_as_they_were():
    got: dict[str, list[str]] = {}
    for s in OPTIONS:
        if s.name not in ("alpha", "rules"):
            got.setdefault(s.kind, []).append(s.name)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in _OLD_SPEC_KINDS.items()}


@pytest.mark.parametrize(
    "key, bad, says",
    [
        ("overwrite", "yes", "true or false"),
        ("gpu_slots", 2.5, "an integer"),
        ("chunk_bytes", True, 'a size like "64MiB"'),
        ("missing", 3, "a string"),
        ("extra_metadata", {"a": 1}, "a table of strings"),
    ],
)
def test_spec_options_are_checked_by_kind(key, bad, says):
    spec = {"target": "t", "vectors": [{"vector": "v", "alpha": 1.0}]}
    with pytest.raises(OptionsError, match=f"s.toml: \\[options\\] {key}: must be {says}"):
        parse_spec({**spec, "options": {key: bad}}, "s.toml")
    with pytest.raises(OptionsError, match="unknown option; known: device, chunk_bytes, max_shard_size, out_dtype"):
        parse_spec({**spec, "options": {"frobnicate": 1}}, "s.toml")
    with pytest.raises(OptionsError, match="not allowed here"):
        parse_spec({**spec, "options": {"alpha": 1.0}}, "s.toml")
