"""The ``streammerge`` command line: a thin layer over the library calls."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Annotated

import typer

from .errors import StreamMergeError
from .version import __version__

app = typer.Typer(
    name="streammerge",
    help=(
        "Stream-merge safetensors checkpoints with bounded memory: OUT = TARGET + alpha * (GRPO - SFT).\n\n"
        "Example: streammerge merge Qwen2.5-7B-Instruct sft/ grpo/ -o merged/ --alpha 1"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so temporary files are removed on the way out."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(fn, *args, **kwargs):
    """Run a command body: known errors become one line and exit 1; Ctrl-C exits 130 after cleanup."""
    debug = os.environ.get("STREAMMERGE_DEBUG", "") not in ("", "0")
    old = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise _Terminated()

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (e.g. embedded use)
        old = None
    try:
        return fn(*args, **kwargs)
    except StreamMergeError as e:
        if debug:
            traceback.print_exc()
        _stderr(f"error: {e}")
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        _stderr("interrupted: temporary files removed, no output was completed")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except _Terminated:
        _stderr("terminated: temporary files removed, no output was completed")
        raise typer.Exit(EXIT_TERMINATED) from None
    except MemoryError:
        _stderr("error: out of memory; lower --chunk-size")
        raise typer.Exit(EXIT_ERROR) from None
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _stderr(f"error: {where}{e.strerror or e}")
        raise typer.Exit(EXIT_ERROR) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as e:  # a bug: one line unless debugging
        if debug:
            traceback.print_exc()
        _stderr(f"internal error: {type(e).__name__}: {e} (set STREAMMERGE_DEBUG=1 for the traceback, and report it)")
        raise typer.Exit(EXIT_ERROR) from None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------------------------------------------- shared options
TargetArg = Annotated[str, typer.Argument(help="Target checkpoint (directory, index or .safetensors file).")]
SftArg = Annotated[str, typer.Argument(help="SFT checkpoint: the vector's base (subtracted).")]
GrpoArg = Annotated[str, typer.Argument(help="GRPO checkpoint: the vector's end (added).")]
SweepAlphaOpt = Annotated[
    str,
    typer.Option(
        "--alpha",
        "-a",
        help="Scale of the vector; 1 adds it, -1 removes it. Several, comma-separated (--alpha 0.5,1,1.5): one "
        "output per alpha in OUT/alpha-A/, every input read once.",
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (CUDA when a GPU and triton are present, else CPU), cpu or cuda.")
]
ChunkOpt = Annotated[
    str, typer.Option("--chunk-size", help="Largest buffer per chunk: bytes, or 64MiB / 512MB / 1GiB. Bounds memory.")
]
ShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Output shard size limit (decimal: 5GB = 5e9 bytes).")]
OutDtypeOpt = Annotated[
    str | None, typer.Option("--out-dtype", help="bf16, fp16 or fp32 for every blended tensor (default: target's).")
]
MissingOpt = Annotated[str, typer.Option("--missing", help="Target tensor absent from sft/grpo: error or copy-target.")]
ExtraOpt = Annotated[str, typer.Option("--extra", help="sft/grpo tensor absent from the target: error or ignore.")]
ShapeOpt = Annotated[
    str, typer.Option("--shape-mismatch", help="Shapes differ across the three: error or copy-target.")
]
UnsupOpt = Annotated[
    str,
    typer.Option("--unsupported-dtype", help="Floating tensor not in bf16/fp16/fp32 (F64, FP8): error or copy-target."),
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads for the math (default: all cores).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


RuleOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--rule",
        help="Per-tensor rule REGEX=ALPHA, REGEX=copy-target or REGEX=skip (regex searched in the name); repeatable, "
        "first match wins.",
    ),
]
RulesFileOpt = Annotated[
    str | None, typer.Option("--rules", help="TOML file of [[rule]] tables (pattern + alpha or action).")
]
VocabOpt = Annotated[
    str,
    typer.Option(
        "--vocab-mismatch",
        help="Embedding/lm_head row counts differ (resized tokenizer): error, common-rows or copy-target.",
    ),
]


def _options(rule: list[str] | None = None, rules_file: str | None = None, **kw):
    from .options import MergeOptions, Rule, load_rules

    rules = tuple(Rule.parse(r) for r in rule or ())
    if rules_file:
        rules += load_rules(rules_file)
    return MergeOptions.create(rules=rules, **kw)


def _print_plan(summary: dict, out: str | None) -> None:
    s = summary
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["copied_reasons"].items())) or "none"
    srcs = [f"{k:<7} {v}" for k, v in s["sources"].items()]
    alpha = (
        ", ".join(map(repr, s["alpha"])) + " (one output each)" if isinstance(s["alpha"], list) else repr(s["alpha"])
    )
    lines = [
        *srcs,
        f"formula {s['formula']}",
        *([] if "vectors" in s else [f"alpha   {alpha}"]),
        f"tensors {s['tensors']} ({s['parameters']:,} parameters): {s['merged']} merged, {s['copied']} copied "
        f"({reasons})" + (f", {s['ignored_extra']} sft/grpo-only ignored" if s["ignored_extra"] else ""),
        f"output  {len(s['output_files'])} file(s)"
        + (
            f" in each of {s['outputs']} outputs {out or 'OUT'}/alpha-A/"
            if s["outputs"] > 1
            else f" in {out}"
            if out
            else ""
        ),
        f"read    {_gb(s['bytes_read'])}",
        f"write   {_gb(s['bytes_written'])}",
        f"disk    {_gb(s['disk_needed'])} needed"
        + (f", {_gb(s['free_disk'])} free" if s.get("free_disk") is not None else ""),
        f"memory  ~{_gb(s['expected_peak_host_memory'])} host buffers (chunk {_gb(s['chunk_bytes'])}, "
        f"{s['chunks']} chunks); independent of model size",
        f"gpu     ~{_gb(s['expected_gpu_memory'])} device buffers with --device cuda",
    ]
    for rule_text, hits in s.get("rule_hits", {}).items():
        lines.append(f"rule    {rule_text}: {hits} tensor(s)")
    print("\n".join(lines))
    for w in s["warnings"]:
        _stderr(f"warning: {w}")


def _plan_body(target, sft, grpo, out, opts, as_json: bool, alphas=None) -> None:
    from .api import plan as plan_fn

    p = plan_fn(target, sft, grpo, out, options=opts, alphas=alphas)
    _show_plan(p, out, as_json)


def _show_plan(p, out, as_json: bool) -> None:
    summary = p.summary()
    summary["free_disk"] = getattr(p, "free_disk", None)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_plan(summary, out)


@app.command()
def merge(
    target: TargetArg,
    sft: SftArg,
    grpo: GrpoArg,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Output directory (new or empty); required unless --sink null.")
    ] = None,
    alpha: SweepAlphaOpt = "1",
    device: DeviceOpt = "auto",
    chunk_size: ChunkOpt = "16MiB",
    max_shard_size: ShardOpt = "5GB",
    out_dtype: OutDtypeOpt = None,
    missing: MissingOpt = "error",
    extra: ExtraOpt = "error",
    shape_mismatch: ShapeOpt = "error",
    unsupported_dtype: UnsupOpt = "error",
    vocab_mismatch: VocabOpt = "error",
    rule: RuleOpt = None,
    rules: RulesFileOpt = None,
    threads: ThreadsOpt = None,
    gpu_window_size: Annotated[
        str | None, typer.Option("--gpu-window-size", help="CUDA: input window registered with the GPU (256MiB).")
    ] = None,
    gpu_staging: Annotated[
        bool, typer.Option("--gpu-staging", help="CUDA: copy inputs through pinned staging buffers, no registration.")
    ] = False,
    gpu_slots: Annotated[int, typer.Option("--gpu-slots", help="CUDA: chunks in flight on the device.")] = 2,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a previous streammerge output in OUT.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted merge into OUT (same inputs and options).")
    ] = False,
    check_finite: Annotated[
        bool, typer.Option("--check-finite", help="Report tensors that became NaN/inf from finite inputs.")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="With --check-finite: fail on such a tensor.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only: check everything, write nothing.")] = False,
    sink: Annotated[
        str,
        typer.Option(
            "--sink", help="disk; or null / null-sha256: compute everything, discard the output (benchmarks)."
        ),
    ] = "disk",
    push_to: Annotated[
        str | None, typer.Option("--push-to", help="Upload the finished, verified output to this Hub repo id.")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to: create the repo as private.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; only errors and the summary.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge: OUT = TARGET + alpha * (GRPO - SFT), streamed chunk by chunk.

    Examples:

      streammerge merge Qwen2.5-7B-Instruct ./sft ./grpo -o ./merged

      streammerge merge target/ sft/ grpo/ -o out/ --alpha -1          # remove the vector

      streammerge merge target/ sft/ grpo/ -o sweep/ --alpha 0.5,1,1.5  # sweep/alpha-0.5/ ... in one pass

      streammerge merge t/ s/ g/ -o out/ --device cuda --chunk-size 256MiB --max-shard-size 10GB

      streammerge merge Qwen/Qwen2.5-1.5B-Instruct org/sft@main org/grpo -o out/ --push-to me/merged --private

    TARGET, SFT and GRPO are local paths or Hub repo ids (org/name[@revision]).
    """

    if out is None and sink == "disk":
        raise typer.BadParameter("give the output directory with -o/--out (or use --sink null)", param_hint="-o")

    def body():
        from .api import parse_alphas

        alphas = parse_alphas(alpha)
        opts = _options(
            alpha=alphas[0],
            device=device,
            chunk_bytes=chunk_size,
            max_shard_size=max_shard_size,
            out_dtype=out_dtype,
            missing=missing,
            extra=extra,
            shape_mismatch=shape_mismatch,
            unsupported_dtype=unsupported_dtype,
            vocab_mismatch=vocab_mismatch,
            rule=rule,
            rules_file=rules,
            threads=threads,
            gpu_window_bytes=gpu_window_size,
            gpu_register=not gpu_staging,
            gpu_slots=gpu_slots,
            overwrite=overwrite,
            check_finite=check_finite or strict,
            strict=strict,
        )
        sweep = alphas if len(alphas) > 1 else None
        if dry_run:
            _plan_body(target, sft, grpo, out, opts, as_json, alphas=sweep)
            return
        if sweep:
            from .api import refuse_push_for_sweep
            from .api import sweep as sweep_fn

            refuse_push_for_sweep(push_to)

            def run(progress=None):
                return sweep_fn(
                    target, sft, grpo, out, sweep, options=opts, progress=progress, resume=resume, sink=sink
                )

        else:
            from .api import merge as merge_fn

            def run(progress=None):
                return merge_fn(
                    target,
                    sft,
                    grpo,
                    out,
                    options=opts,
                    progress=progress,
                    resume=resume,
                    sink=sink,
                    push_to=push_to,
                    private=private,
                )

        _merge_body(run, opts, quiet, as_json)

    _run(body)


def _with_progress(run, quiet: bool, label: str = "merging"):
    """``run(progress=...)`` under a progress bar on stderr when it is a terminal (and not ``quiet``), else
    ``run()``. A phase other than the merge's ("hash", "recompute") shows as the bar's label."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal or quiet:
        return run()
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=False),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)
        phase = ["merge"]

        def on_progress(ev):
            if ev.phase != phase[0]:  # a new phase restarts the bar, so its speed and ETA are its own
                phase[0] = ev.phase
                bar.reset(task, description="hashing" if ev.phase == "hash" else "recomputing")
            bar.update(task, completed=ev.bytes_done, total=ev.bytes_total)

        return run(progress=on_progress)


def _merge_body(run, opts, quiet: bool, as_json: bool, label: str = "merging") -> None:
    """Call ``run(progress=...)`` with a progress bar on a terminal, then print its report(s)."""
    result = _with_progress(run, quiet or as_json, label)
    if isinstance(result, list):
        if as_json:
            print(json.dumps([r.to_dict() for r in result], indent=2))
            return
        for r in result:
            _print_report(r, opts, False)
        return
    _print_report(result, opts, as_json)


def _print_report(report, opts, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.copied_reasons.items()))
    print(
        f"merged {report.tensors_merged} tensors, copied {report.tensors_copied}"
        + (f" ({reasons})" if reasons else "")
        + f" -> {report.out_dir} ({len(report.output_files)} files)"
    )
    print(
        f"read {_gb(report.bytes_read)}, wrote {_gb(report.bytes_written)} in {report.seconds:.2f} s = "
        f"{report.gbps:.2f} GB/s; peak anonymous memory {_gb(report.peak_rss_anon)}"
        + (f", peak GPU memory {_gb(report.peak_gpu_memory)}" if report.peak_gpu_memory else "")
    )
    for w in report.warnings:
        print(
            w
            if w.startswith(("engine:", "resume:", "sink:", "cpu engine:", "cuda engine:", "sweep:"))
            else f"warning: {w}"
        )
    if report.pushed:
        print(f"pushed: {report.pushed}")
    if report.nonfinite:
        items = sorted(report.nonfinite.items(), key=lambda kv: -kv[1])
        print(
            f"warning: {len(items)} tensor(s) became non-finite from finite inputs: "
            + ", ".join(f"{k} ({v})" for k, v in items[:20])
            + (" ..." if len(items) > 20 else "")
        )
    elif opts.check_finite:
        print("check-finite: no element became non-finite from finite inputs")


@app.command()
def plan(
    target: TargetArg,
    sft: SftArg,
    grpo: GrpoArg,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output directory, to check paths and disk.")] = None,
    alpha: SweepAlphaOpt = "1",
    chunk_size: ChunkOpt = "16MiB",
    max_shard_size: ShardOpt = "5GB",
    out_dtype: OutDtypeOpt = None,
    missing: MissingOpt = "error",
    extra: ExtraOpt = "error",
    shape_mismatch: ShapeOpt = "error",
    unsupported_dtype: UnsupOpt = "error",
    vocab_mismatch: VocabOpt = "error",
    rule: RuleOpt = None,
    rules: RulesFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Read headers only: pairing, output layout, bytes to move, disk and memory needed. Fails on what merge would.

    Examples:

      streammerge plan Qwen2.5-7B-Instruct ./sft ./grpo -o ./merged

      streammerge plan Qwen2.5-7B-Instruct ./sft ./grpo --alpha 0.5,1,1.5   # a sweep: outputs, disk, memory
    """
    from .api import parse_alphas

    def body():
        alphas = parse_alphas(alpha)
        opts = _options(
            alpha=alphas[0],
            chunk_bytes=chunk_size,
            max_shard_size=max_shard_size,
            out_dtype=out_dtype,
            missing=missing,
            extra=extra,
            shape_mismatch=shape_mismatch,
            unsupported_dtype=unsupported_dtype,
            vocab_mismatch=vocab_mismatch,
            rule=rule,
            rules_file=rules,
        )
        _plan_body(target, sft, grpo, out, opts, as_json, alphas=alphas if len(alphas) > 1 else None)

    _run(body)


@app.command()
def extract(
    sft: SftArg,
    grpo: GrpoArg,
    out: Annotated[str, typer.Option("--out", "-o", help="Output directory for the vector (new or empty).")],
    dtype: Annotated[
        str, typer.Option("--dtype", help="fp32 (exact: apply == merge byte for byte) or bf16/fp16 (adds a rounding).")
    ] = "fp32",
    device: DeviceOpt = "auto",
    chunk_size: ChunkOpt = "16MiB",
    max_shard_size: ShardOpt = "5GB",
    missing: MissingOpt = "error",
    extra: ExtraOpt = "error",
    shape_mismatch: ShapeOpt = "error",
    threads: ThreadsOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous streammerge output.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted extraction.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; only errors and the summary.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the reasoning vector V = GRPO - SFT as a safetensors checkpoint, to apply to many targets.

    Examples:

      streammerge extract ./sft ./grpo -o ./reasoning-vector

      streammerge apply Qwen2.5-7B-Instruct ./reasoning-vector -o ./merged --alpha 1
    """

    def body():
        from .api import extract as extract_fn

        if dtype.lower() not in ("fp32", "f32", "float32"):
            _stderr(f"note: a {dtype} vector adds a rounding; apply will not be byte-identical to a three-way merge")
        opts = _options(
            device=device,
            chunk_bytes=chunk_size,
            max_shard_size=max_shard_size,
            missing=missing,
            extra=extra,
            shape_mismatch=shape_mismatch,
            threads=threads,
            overwrite=overwrite,
        )

        def run(progress=None):
            return extract_fn(sft, grpo, out, dtype=dtype, options=opts, progress=progress, resume=resume)

        _merge_body(run, opts, quiet, as_json, label="extracting")

    _run(body)


@app.command(name="apply")
def apply_cmd(
    target: TargetArg,
    vector: Annotated[str, typer.Argument(help="A vector written by `streammerge extract`.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output directory (new or empty).")],
    alpha: SweepAlphaOpt = "1",
    device: DeviceOpt = "auto",
    chunk_size: ChunkOpt = "16MiB",
    max_shard_size: ShardOpt = "5GB",
    out_dtype: OutDtypeOpt = None,
    missing: MissingOpt = "error",
    extra: ExtraOpt = "error",
    shape_mismatch: ShapeOpt = "error",
    vocab_mismatch: VocabOpt = "error",
    rule: RuleOpt = None,
    rules: RulesFileOpt = None,
    threads: ThreadsOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous streammerge output.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted apply.")] = False,
    check_finite: Annotated[
        bool, typer.Option("--check-finite", help="Report tensors that became NaN/inf from finite inputs.")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="With --check-finite: fail on such a tensor.")] = False,
    push_to: Annotated[
        str | None, typer.Option("--push-to", help="Upload the verified output to this Hub repo.")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to: a private repo.")] = False,
    any_vector: Annotated[
        bool, typer.Option("--any-vector", help="Accept a VECTOR not written by `streammerge extract`.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; only errors and the summary.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """OUT = TARGET + alpha * VECTOR, with a vector from `streammerge extract` (fp32 vectors: the same bytes as merge).

    Examples:

      streammerge apply Qwen2.5-7B-Instruct ./reasoning-vector -o ./with-reasoning

      streammerge apply ./model ./reasoning-vector -o ./without-reasoning --alpha -1

      streammerge apply ./model ./reasoning-vector -o ./sweep --alpha 0.5,1,1.5   # sweep/alpha-0.5/ ... in one pass
    """

    def body():
        from .api import parse_alphas

        alphas = parse_alphas(alpha)
        opts = _options(
            alpha=alphas[0],
            device=device,
            chunk_bytes=chunk_size,
            max_shard_size=max_shard_size,
            out_dtype=out_dtype,
            missing=missing,
            extra=extra,
            shape_mismatch=shape_mismatch,
            vocab_mismatch=vocab_mismatch,
            rule=rule,
            rules_file=rules,
            threads=threads,
            overwrite=overwrite,
            check_finite=check_finite or strict,
            strict=strict,
        )
        if len(alphas) > 1:
            from .api import apply_sweep, refuse_push_for_sweep

            refuse_push_for_sweep(push_to)

            def run(progress=None):
                return apply_sweep(
                    target, vector, out, alphas, options=opts, progress=progress, resume=resume, any_vector=any_vector
                )

        else:
            from .api import apply as apply_fn

            def run(progress=None):
                return apply_fn(
                    target,
                    vector,
                    out,
                    options=opts,
                    progress=progress,
                    resume=resume,
                    push_to=push_to,
                    private=private,
                    any_vector=any_vector,
                )

        _merge_body(run, opts, quiet, as_json)

    _run(body)


@app.command()
def combine(
    spec: Annotated[
        str, typer.Argument(help="TOML or YAML spec: target, \\[\\[vectors]] (sft+grpo or vector, alpha).")
    ],
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Output directory (new or empty); required unless --sink null.")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="auto (CUDA when a GPU and triton are present, else CPU), cpu, cuda.")
    ] = None,
    chunk_size: Annotated[str | None, typer.Option("--chunk-size", help="Largest buffer per chunk (16MiB).")] = None,
    max_shard_size: Annotated[str | None, typer.Option("--max-shard-size", help="Output shard limit (5GB).")] = None,
    out_dtype: OutDtypeOpt = None,
    missing: Annotated[str | None, typer.Option("--missing", help="error or copy-target.")] = None,
    extra: Annotated[str | None, typer.Option("--extra", help="error or ignore.")] = None,
    shape_mismatch: Annotated[str | None, typer.Option("--shape-mismatch", help="error or copy-target.")] = None,
    unsupported_dtype: Annotated[str | None, typer.Option("--unsupported-dtype", help="error or copy-target.")] = None,
    vocab_mismatch: Annotated[
        str | None, typer.Option("--vocab-mismatch", help="error, common-rows or copy-target.")
    ] = None,
    threads: ThreadsOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous streammerge output.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run (same spec).")] = False,
    check_finite: Annotated[
        bool, typer.Option("--check-finite", help="Report tensors that became NaN/inf from finite inputs.")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="With --check-finite: fail on such a tensor.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only: check everything, write nothing.")] = False,
    sink: Annotated[str, typer.Option("--sink", help="disk, null or null-sha256 (benchmarks).")] = "disk",
    push_to: Annotated[
        str | None, typer.Option("--push-to", help="Upload the finished, verified output to this Hub repo id.")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to: create the repo as private.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; only errors and the summary.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Many vectors: OUT = TARGET + sum_i alpha_i * (GRPO_i - SFT_i), every input read once.

    The spec (TOML, or YAML with a .yaml/.yml name) lists the target and the vectors, each a pair (sft, grpo) or a
    stored vector from `streammerge extract`, with its alpha and optional per-vector rules ("REGEX=ALPHA"). Top-level
    rules (REGEX=ALPHA|copy-target|skip) and an \\[options] table work as in merge; options given here override the
    spec's. Paths are relative to the spec file. Vectors are added left to right in float32, rounded once.

    Examples:

      streammerge combine spec.toml -o merged/

      streammerge combine spec.toml --dry-run

    A spec:

      target = "Qwen/Qwen2.5-7B-Instruct"
      rules = ["embed_tokens|lm_head=copy-target"]
      \\[\\[vectors]]
      sft = "./math-sft"
      grpo = "./math-grpo"
      alpha = 1.0
      \\[\\[vectors]]
      vector = "./code-vector"
      alpha = 0.5
    """
    if out is None and sink == "disk" and not dry_run:
        raise typer.BadParameter("give the output directory with -o/--out (or use --sink null)", param_hint="-o")

    def body():
        from .api import combine as combine_fn
        from .api import plan_combine

        given = {
            "chunk_bytes": chunk_size,
            "max_shard_size": max_shard_size,
            "out_dtype": out_dtype,
            "missing": missing,
            "extra": extra,
            "shape_mismatch": shape_mismatch,
            "unsupported_dtype": unsupported_dtype,
            "vocab_mismatch": vocab_mismatch,
            "threads": threads,
        }
        kw = {k: v for k, v in given.items() if v is not None}
        # Only what was given on the command line overrides the spec's [options]: a flag can only switch on.
        if device is not None:
            kw["device"] = device
        kw.update(
            {
                k: True
                for k, v in (("overwrite", overwrite), ("check_finite", check_finite or strict), ("strict", strict))
                if v
            }
        )
        if dry_run:
            _show_plan(plan_combine(spec, out, **kw), out, as_json)
            return
        from .options import MergeOptions

        report_opts = MergeOptions.create(check_finite=check_finite or strict)  # the summary's check-finite line

        def run(progress=None):
            return combine_fn(
                spec, out, progress=progress, resume=resume, sink=sink, push_to=push_to, private=private, **kw
            )

        _merge_body(run, report_opts, quiet, as_json)

    _run(body)


@app.command()
def inspect(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint directory, index or .safetensors file.")],
    as_json: JsonOpt = False,
) -> None:
    """Summarise a checkpoint: files, tensors, parameters, dtypes, largest shapes.

    Example:

      streammerge inspect ./Qwen2.5-7B-Instruct
    """

    def body():
        from .checkpoint import open_checkpoint

        with open_checkpoint(checkpoint) as ck:
            dtypes: dict[str, int] = {}
            params = 0
            for r in ck.tensors.values():
                dtypes[r.dtype] = dtypes.get(r.dtype, 0) + 1
                params += r.numel
            largest = sorted(ck.tensors.values(), key=lambda r: -r.nbytes)[:5]
            info = {
                "checkpoint": ck.source,
                "files": [str(f.name) for f in ck.files],
                "index": str(ck.index_path.name) if ck.index_path else None,
                "tensors": len(ck.tensors),
                "parameters": params,
                "bytes": ck.total_bytes,
                "dtypes": dtypes,
                "largest": [{"name": r.name, "dtype": r.dtype, "shape": list(r.shape)} for r in largest],
                "aux_files": [p.name for p in ck.aux_files()],
            }
        if as_json:
            print(json.dumps(info, indent=2))
            return
        print(
            f"{info['checkpoint']}: {len(info['files'])} file(s)"
            + (f", index {info['index']}" if info["index"] else "")
        )
        print(f"tensors {info['tensors']}, parameters {params:,}, data {_gb(info['bytes'])}")
        print("dtypes  " + ", ".join(f"{k}: {v}" for k, v in sorted(dtypes.items())))
        print("largest " + "; ".join(f"{r['name']} {r['dtype']}{r['shape']}" for r in info["largest"]))
        if info["aux_files"]:
            print("files   " + ", ".join(info["aux_files"]))

    _run(body)


@app.command()
def demo(
    workdir: Annotated[
        str | None, typer.Option("--dir", help="Where to create the demo checkpoints (default: a temp directory).")
    ] = None,
    layout: Annotated[str, typer.Option("--layout", help="Synthetic layout (see streammerge.synth).")] = "tiny-qwen2",
    layers: Annotated[int | None, typer.Option("--layers", help="Number of transformer layers.")] = None,
    device: DeviceOpt = "auto",
    keep: Annotated[bool, typer.Option("--keep", help="Keep the demo files (always kept with --dir).")] = False,
) -> None:
    """Create three small synthetic Qwen2-shaped checkpoints (sharded differently), merge them, print the report.

    Needs no network. Example:

      streammerge demo --layers 4
    """

    def body():
        from . import synth
        from .api import merge as merge_fn

        root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="streammerge-demo-"))
        try:
            print(f"creating synthetic {layout} checkpoints (target, sft, grpo) in {root}")
            trio = synth.make_trio(root, layout, num_layers=layers)
            for label in ("target", "sft", "grpo"):
                p = Path(getattr(trio, label))
                shards = sorted(x.name for x in p.glob("*.safetensors"))
                print(f"  {label:6} {p} ({len(shards)} shard(s))")
            out = root / "merged"
            report = merge_fn(trio.target, trio.sft, trio.grpo, out, alpha=1.0, device=device, overwrite=True)
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.copied_reasons.items()))
            print(
                f"merged {report.tensors_merged} tensors, copied {report.tensors_copied}"
                + (f" ({reasons})" if reasons else "")
                + f" -> {out}"
            )
            print(f"files   {', '.join(report.output_files)}")
            print(
                f"read {_gb(report.bytes_read)}, wrote {_gb(report.bytes_written)} in {report.seconds:.2f} s "
                f"= {report.gbps:.2f} GB/s; peak anonymous memory {_gb(report.peak_rss_anon)}"
            )
            for w in report.warnings:
                print(w)
        finally:
            if not workdir and not keep:
                import shutil

                shutil.rmtree(root, ignore_errors=True)
            elif not workdir:
                print(f"kept {root}")

    _run(body)


@app.command()
def verify(
    out: Annotated[str, typer.Argument(help="The merge output directory.")],
    target: Annotated[str | None, typer.Option("--target", help="Target checkpoint, to recompute chunks.")] = None,
    sft: Annotated[str | None, typer.Option("--sft", help="SFT checkpoint, to recompute chunks.")] = None,
    grpo: Annotated[str | None, typer.Option("--grpo", help="GRPO checkpoint, to recompute chunks.")] = None,
    vector: Annotated[
        str | None, typer.Option("--vector", help="For an apply output: the vector (with --target), to recompute.")
    ] = None,
    spec: Annotated[str | None, typer.Option("--spec", help="For a combine output: its spec, to recompute.")] = None,
    full: Annotated[bool, typer.Option("--full", help="Recompute every chunk (reads all inputs).")] = False,
    sample: Annotated[int, typer.Option("--sample", help="Chunks to recompute without --full.")] = 64,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; only errors and the summary.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check an output: structure (index, files, headers), recorded SHA-256s, and recomputed bytes given the inputs.

    Exit 1 naming the first bad file and tensor. Examples:

      streammerge verify merged/

      streammerge verify merged/ --target t/ --sft s/ --grpo g/ --full

      streammerge verify combined/ --spec spec.toml --sample 256

      streammerge verify applied/ --target t/ --vector v/        # an apply output

      streammerge verify vector/ --sft s/ --grpo g/              # an extract output
    """

    def body():
        from dataclasses import asdict

        from .verify import verify as verify_fn

        def run(progress=None):
            return verify_fn(
                out, target, sft, grpo, vector=vector, spec=spec, full=full, sample=sample, progress=progress
            )

        r = _with_progress(run, quiet or as_json, label="verifying")
        if as_json:
            print(json.dumps(asdict(r), indent=2))
        if not r.ok:
            if not as_json:
                _stderr(f"error: {r.problems[0]}")
                for p in r.problems[1:]:
                    _stderr(f"error: {p}")
            raise typer.Exit(EXIT_ERROR)
        if not as_json:
            head = f"OK: {r.files_checked} file(s), {_gb(r.bytes_hashed)} hashed"
            if r.chunks_checked:
                print(f"{head}, {r.chunks_checked} of {r.chunks_total} chunks recomputed: all bytes match")
            else:  # nothing recomputed (no inputs given, or --sample 0): say only what was checked
                print(f"{head}: structure and recorded SHA-256s match (no chunk recomputed)")

    _run(body)


@app.command()
def version() -> None:
    """Print the versions of streammerge and its main dependencies."""
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    print(f"streammerge {__version__}, torch {torch.__version__}, triton {tv}, python {sys.version.split()[0]}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
