"""Typed arguments and options the commands share, and every merge option's flags built from its declaration.

Merge options are declared once, in `streammerge.options.OPTIONS`. :func:`with_merge_options` turns the
declaration into typer options by extending a command function's ``__signature__`` with one ``inspect.Parameter``
per flag, annotated ``Annotated[type, typer.Option(...)]`` like any hand-written typer parameter, and hands the
command the values given as one dict.

Why this way: typer has no feature for options shared by many commands (its issues #153 and #405 ask for one), but
it builds every command from ``inspect.signature(callback)`` (``typer.utils.get_params_from_function``, the same in
the 0.27 and 0.29 sources), and ``inspect.signature`` honours ``__signature__``. So the flags are ordinary typer
options made with typer's public API only: no click objects (typer moved click into a private module in 0.26), no
generated source. Writing every flag out in every command, as this CLI did, mirrored each option's help, default
and spelling by hand in five commands; mergekit's ``add_merge_options`` loops over its option fields the same way
with click decorators. `tests/test_options_declared.py` checks that every declared flag reaches typer as declared.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ..options import OPTIONS, CliFlag, OptionSpec

# ------------------------------------------------------------------------------------------------- shared arguments
TargetArg = Annotated[str, typer.Argument(help="Target checkpoint (directory, index or .safetensors file).")]
SftArg = Annotated[str, typer.Argument(help="SFT checkpoint: the vector's base (subtracted).")]
GrpoArg = Annotated[str, typer.Argument(help="GRPO checkpoint: the vector's end (added).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; only errors and the summary.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Plan only: check everything, write nothing.")]
OutOrNullOpt = Annotated[
    str | None, typer.Option("--out", "-o", help="Output directory (new or empty); required unless --sink null.")
]
PushToOpt = Annotated[
    str | None, typer.Option("--push-to", help="Upload the finished, verified output to this Hub repo id.")
]
PrivateOpt = Annotated[bool, typer.Option("--private", help="With --push-to: create the repo as private.")]
PartOpt = Annotated[
    str | None,
    typer.Option(
        "--part",
        help="Write only part I of N of the output files (e.g. 2/4), for jobs without a rendezvous (SLURM arrays, "
        "other machines, other times); no index: run `streammerge finalize OUT` when every part is done. Under "
        "torchrun each rank takes its part by itself.",
    ),
]
DistTimeoutOpt = Annotated[
    float | None,
    typer.Option("--dist-timeout", help="torchrun: seconds a rank waits for the others at a step (default 7200)."),
]

# What a command decorated with `with_merge_options` receives: {flag parameter name: value given}.
MergeFlags = dict[str, Any]

# Own parameters that --help lists right after a merge option's flag, where the command has that flag: --resume beside
# --overwrite, as both say what happens to an earlier output in OUT.
PLACED_AFTER = {"resume": "overwrite"}


def flags_of(command: str) -> list[tuple[OptionSpec, CliFlag]]:
    """The merge-option flags `command` takes, in the declaration's order."""
    return [(spec, flag) for spec in OPTIONS for flag in spec.flags if command in flag.commands]


def _parameter(spec: OptionSpec, flag: CliFlag, command: str, overrides_spec: bool) -> inspect.Parameter:
    default = spec.cli_default(flag)
    if overrides_spec and spec.kind != "bool":
        default = None  # only what is given overrides the spec's [options] (the help names the spec's default)
    # sizes, dtypes and alphas stay strings: MergeOptions.create parses them, with its own messages
    parsed = flag.type or {"int": int, "bool": bool}.get(spec.kind, str)
    if default is None:
        parsed = parsed | None
    option = typer.Option(*flag.decls, help=flag.help_in(command))
    return inspect.Parameter(
        flag.param, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[parsed, option]
    )


def with_merge_options(command: str, *, overrides_spec: bool = False) -> Callable[[Callable], Callable]:
    """Give a command function the flags of every merge option `command` takes (see the module docstring).

    The function declares a keyword-only parameter ``flags: MergeFlags``: the flags take its place in the signature
    (and so in ``--help``), and it receives their values keyed by parameter name; :func:`option_kwargs` turns them
    into `MergeOptions.create` keywords. ``overrides_spec``: the flags override a spec's ``[options]`` (combine), so
    none has a default of its own.

    Example:
        ```py
        @with_merge_options("plan")
        def plan(target: TargetArg, *, flags: MergeFlags, as_json: JsonOpt = False) -> None:
            opts = MergeOptions.create(**option_kwargs(flags))
        ```
    """
    declared = flags_of(command)
    names = [flag.param for _, flag in declared]

    def decorate(fn: Callable) -> Callable:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())
        at = next((i for i, p in enumerate(own) if p.name == "flags"), None)
        if at is None:
            raise TypeError(f"{fn.__name__}: a command with merge options declares a keyword-only `flags` parameter")
        params = [*own[:at], *(_parameter(s, f, command, overrides_spec) for s, f in declared), *own[at + 1 :]]
        for name, anchor in PLACED_AFTER.items():
            moved = next((p for p in params if p.name == name), None)
            if moved is not None and anchor in names:
                params.remove(moved)
                params.insert(next(i for i, p in enumerate(params) if p.name == anchor) + 1, moved)

        @functools.wraps(fn)
        def command_fn(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            return fn(**kwargs, flags=given)

        command_fn.__signature__ = inspect.Signature(params)  # what typer (through inspect.signature) reads
        return command_fn

    return decorate


def option_kwargs(flags: MergeFlags) -> dict[str, Any]:
    """`MergeOptions.create` keywords from the values of a command's merge-option flags: each flag's value parsed
    as declared (rules read, ``--gpu-staging`` turned round), flags of one option added up (``--rule`` then
    ``--rules``), flags not given (None) left out. ``--strict`` implies ``--check-finite``. Raises `OptionsError`
    on a bad rule or rules file: call it inside the command's error handling."""
    kw: dict[str, Any] = {}
    for spec in OPTIONS:
        for flag in spec.flags:
            value = flags.get(flag.param)
            if value is None:
                continue
            if flag.parse is not None:
                value = flag.parse(value)
            kw[spec.name] = kw[spec.name] + value if spec.name in kw else value
    if kw.get("strict"):
        kw["check_finite"] = True
    return kw
