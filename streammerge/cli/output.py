"""Everything the command line prints: plans, reports, checkpoint summaries, verify results, the progress bar."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

# Warnings that are notes about how the run went, printed as they are (the others get a "warning: " prefix).
NOTE_PREFIXES = ("engine:", "resume:", "sink:", "cpu engine:", "cuda engine:", "sweep:")


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def print_plan(summary: dict, out: str | None) -> None:
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
        f"read    {gb(s['bytes_read'])}",
        f"write   {gb(s['bytes_written'])}",
        f"disk    {gb(s['disk_needed'])} needed"
        + (f", {gb(s['free_disk'])} free" if s.get("free_disk") is not None else ""),
        f"memory  ~{gb(s['expected_peak_host_memory'])} host buffers (chunk {gb(s['chunk_bytes'])}, "
        f"{s['chunks']} chunks); independent of model size",
        f"gpu     ~{gb(s['expected_gpu_memory'])} device buffers with --device cuda",
    ]
    fp8 = s.get("fp8")
    if fp8:
        blocks = ", ".join(
            f"{role} {v['block'][0]}x{v['block'][1]} ({v['weights']} weights, from {v['from']})"
            for role, v in fp8["inputs"].items()
        )
        lines.append(f"fp8     {fp8['tensors']} tensor(s) from block-scaled FP8 inputs; blocks: {blocks}")
        new = f" ({fp8['fp8_out']} weight(s) with new block scales)" if fp8["fp8_out"] else ""
        lines.append(f"fp8 out {fp8['output']}{new}; config.json's quantization_config: {fp8['quantization_config']}")
    for rule_text, hits in s.get("rule_hits", {}).items():
        lines.append(f"rule    {rule_text}: {hits} tensor(s)")
    if s.get("stream"):
        from ..stream import describe

        lines += describe(s["stream"])
    print("\n".join(lines))
    for w in s["warnings"]:
        stderr(f"warning: {w}")


def show_plan(p, out: str | None, as_json: bool) -> None:
    """A plan (`MergePlan`) as text, or as JSON with ``--json``."""
    summary = p.summary()
    summary["free_disk"] = p.free_disk  # known when the plan was checked against an output directory
    if as_json:
        print_json(summary)
    else:
        print_plan(summary, out)


def with_progress(run: Callable[..., Any], quiet: bool, label: str = "merging") -> Any:
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


def run_and_report(
    run: Callable[..., Any], check_finite: bool, quiet: bool, as_json: bool, label: str = "merging"
) -> None:
    """Call ``run(progress=...)`` with a progress bar on a terminal, then print its report(s) (a sweep's: a list)."""
    result = with_progress(run, quiet or as_json, label)
    if isinstance(result, list):
        if as_json:
            print_json([r.to_dict() for r in result])
            return
        for r in result:
            print_report(r, check_finite, False)
        return
    print_report(result, check_finite, as_json)


def print_report(report, check_finite: bool, as_json: bool) -> None:
    """A `MergeReport`: what was merged and copied, the bytes moved and how fast, notes and warnings;
    ``check_finite``: the run checked for non-finite results (say so when there were none)."""
    if as_json:
        print_json(report.to_dict())
        return
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.copied_reasons.items()))
    print(
        f"merged {report.tensors_merged} tensors, copied {report.tensors_copied}"
        + (f" ({reasons})" if reasons else "")
        + f" -> {report.out_dir} ({len(report.output_files)} files)"
    )
    print(
        f"read {gb(report.bytes_read)}, wrote {gb(report.bytes_written)} in {report.seconds:.2f} s = "
        f"{report.gbps:.2f} GB/s; peak anonymous memory {gb(report.peak_rss_anon)}"
        + (f", peak GPU memory {gb(report.peak_gpu_memory)}" if report.peak_gpu_memory else "")
    )
    for w in report.warnings:
        print(w if w.startswith(NOTE_PREFIXES) else f"warning: {w}")
    if report.pushed:
        print(f"pushed: {report.pushed}")
    if report.nonfinite:
        items = sorted(report.nonfinite.items(), key=lambda kv: -kv[1])
        print(
            f"warning: {len(items)} tensor(s) became non-finite from finite inputs: "
            + ", ".join(f"{k} ({v})" for k, v in items[:20])
            + (" ..." if len(items) > 20 else "")
        )
    elif check_finite:
        print("check-finite: no element became non-finite from finite inputs")


def print_checkpoint(info: dict, as_json: bool) -> None:
    """``inspect``'s summary of a checkpoint."""
    if as_json:
        print_json(info)
        return
    print(f"{info['checkpoint']}: {len(info['files'])} file(s)" + (f", index {info['index']}" if info["index"] else ""))
    print(f"tensors {info['tensors']}, parameters {info['parameters']:,}, data {gb(info['bytes'])}")
    print("dtypes  " + ", ".join(f"{k}: {v}" for k, v in sorted(info["dtypes"].items())))
    print("largest " + "; ".join(f"{r['name']} {r['dtype']}{r['shape']}" for r in info["largest"]))
    if info["aux_files"]:
        print("files   " + ", ".join(info["aux_files"]))
    fp8 = info.get("fp8")
    if fp8 and "error" in fp8:
        print(f"fp8     malformed: {fp8['error']}")
    elif fp8:
        scales = ", ".join(f"{k}: {v}" for k, v in sorted(fp8["scale_dtypes"].items()))
        print(
            f"fp8     {fp8['weights']} block-scaled weight(s), blocks {fp8['block'][0]}x{fp8['block'][1]} "
            f"(from {fp8['block_from']}), scales {scales}"
            + ("" if fp8["quantization_config"] else "; config.json has no quantization_config")
        )


def print_verify(r, as_json: bool) -> None:
    """A `VerifyReport`: its problems on stderr when it failed, else what was checked."""
    if as_json:
        from dataclasses import asdict

        print_json(asdict(r))
        return
    if not r.ok:
        for p in r.problems:
            stderr(f"error: {p}")
        return
    head = f"OK: {r.files_checked} file(s), {gb(r.bytes_hashed)} hashed"
    if r.chunks_checked:
        print(f"{head}, {r.chunks_checked} of {r.chunks_total} chunks recomputed: all bytes match")
    else:  # nothing recomputed (no inputs given, or --sample 0): say only what was checked
        print(f"{head}: structure and recorded SHA-256s match (no chunk recomputed)")
