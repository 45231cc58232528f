"""Block-scaled FP8 at DeepSeek-V3 scale without the disk: sparse files with the real layout (issue 12, item 6).

Each step runs as a command in its own monitored process tree ([`benchmarks.monitor`]: wall time, peak RssAnon):

1. ``streammerge plan`` on the full sparse DeepSeek-V3 trio (61 layers and the MTP layer; 91,992 tensors and 45,809
   FP8 weights per checkpoint, in 163, 150 and 200 shards): plan time, peak RssAnon, what a whole merge reads and
   writes.
2. ``streammerge merge`` of the first ``--layers`` decoder layers at full width (the first 3 are dense: MLA
   attention and 18,432-wide MLPs; later ones MoE with every expert) to each ``--sinks`` (``null``: computed and
   discarded; ``disk``: written), embedding and head left out by a rule (they are BF16: the plain path, measured by
   ``benchmarks.run``): GB/s (bytes read + written / wall, start-up included, and in-process), peak RssAnon against
   the plan's host buffers plus a fixed slack.
3. A whole 671B FP8 merge: the full plan's bytes read and written, and the time at each measured rate.

The holes read as zeros (codes 0x00, scales 0, which is legal): every block of the output equals the target's, so
the unchanged-block path runs everywhere, with the same passes over every element as for real data; and no byte
comes from a disk, so the rates are the engine's compute rate on this machine, not an I/O rate.

    python -m benchmarks.fp8                                 # 3 dense layers, null sink and disk
    python -m benchmarks.fp8 --layers 1 --sinks null --smoke # a quick look
Results: ``benchmarks/results/fp8.json`` and ``fp8.md`` (``--out`` changes the folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from . import machine, tools
from .monitor import run_monitored

DEFAULT_WORKDIR = Path("/tmp/streammerge-bench")
RESULTS = Path(__file__).resolve().parent / "results"
# As benchmarks.run's sparse section: slack over "a plan process's (or an engine-importing process's) RssAnon + the
# plan's host buffers" for the merge's RssAnon: thread stacks, the kernels' self-tests, allocator fragmentation.
RSS_SLACK_BYTES = 64 << 20
SKIP_BF16_RULE = "embed_tokens|lm_head=skip"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.0f} MB"


def _json_stdout(run) -> dict | None:
    try:
        return json.loads(run.stdout_text())
    except ValueError:
        return None


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fp8", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (fp8.json, fp8.md)")
    p.add_argument("--layers", type=int, default=3, help="decoder layers merged (the first 3 are dense)")
    p.add_argument("--sinks", default="null,disk", help="comma-separated: null, disk")
    p.add_argument(
        "--repeats", type=int, default=2, help="runs per sink (the first faults the new sparse files' zero pages in)"
    )
    p.add_argument("--chunk-size", default="16MiB")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--smoke", action="store_true", help="name the results fp8-smoke.* (a quick look, not the record)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from streammerge import synth

    args = _parse(argv)
    command = "python -m benchmarks.fp8 " + " ".join(sys.argv[1:] if argv is None else argv)
    py = sys.executable
    work = args.workdir / "fp8"
    logs = work / "logs"
    work.mkdir(parents=True, exist_ok=True)
    info = machine.machine_info(args.workdir)

    t0 = time.perf_counter()
    full = synth.make_sparse_fp8_trio(work / "deepseek-v3", overwrite=True)
    made_s = time.perf_counter() - t0
    plan_argv = [py, "-m", "streammerge", "plan", *map(str, full), "--json", "--chunk-size", args.chunk_size]
    plan_run = run_monitored(plan_argv, logs, "plan-full", cwd=tools.repo_cwd(), timeout_s=args.timeout)
    plan = _json_stdout(plan_run) if plan_run.ok else None
    if plan is None:
        raise SystemExit(f"plan of the full layout failed: {plan_run.stderr_tail()}")
    imports_argv = [py, "-c", "import time, streammerge.engines.cpu; time.sleep(0.5)"]
    imports_run = run_monitored(imports_argv, logs, "engine-imports", cwd=tools.repo_cwd(), timeout_s=args.timeout)
    baseline = max(plan_run.peak_rss_anon, imports_run.peak_rss_anon)
    full_moved = plan["bytes_read"] + plan["bytes_written"]
    _log(
        f"full DeepSeek-V3 plan: {plan_run.wall_s:.1f} s, RssAnon {_mb(plan_run.peak_rss_anon)}; {plan['tensors']} "
        f"tensors, {plan['fp8']['tensors']} FP8; read {plan['bytes_read'] / 1e12:.2f} TB, write "
        f"{plan['bytes_written'] / 1e12:.2f} TB"
    )

    layout = synth.get_deepseek_layout("deepseek-v3", num_layers=args.layers, num_mtp_layers=0)
    few = synth.make_sparse_fp8_trio(work / f"deepseek-v3-{args.layers}L", layout, overwrite=True)
    few_argv = [*map(str, few), "--chunk-size", args.chunk_size, "--rule", SKIP_BF16_RULE]
    few_plan_run = run_monitored([py, "-m", "streammerge", "plan", *few_argv, "--json"], logs, "plan-few")
    few_plan = _json_stdout(few_plan_run) if few_plan_run.ok else None
    if few_plan is None:
        raise SystemExit(f"plan of {args.layers} layers failed: {few_plan_run.stderr_tail()}")
    moved = few_plan["bytes_read"] + few_plan["bytes_written"]
    bound = baseline + few_plan["expected_peak_host_memory"] + RSS_SLACK_BYTES
    merges = []
    for sink, repeat in [(sink, k) for sink in args.sinks.split(",") for k in range(1, args.repeats + 1)]:
        dest = work / "out"
        tools.clear(dest)
        if sink == "disk" and shutil.disk_usage(work).free < few_plan["disk_needed"]:
            merges.append({"sink": sink, "repeat": repeat, "skipped": "not enough free disk for the output"})
            continue
        merge_argv = [py, "-m", "streammerge", "merge", *few_argv, "-o", str(dest), "--device", "cpu", "--sink", sink]
        merge_argv += ["--json", "--quiet"] + (["--threads", str(args.threads)] if args.threads else [])
        run = run_monitored(merge_argv, logs, f"merge-{sink}-{repeat}", cwd=tools.repo_cwd(), timeout_s=args.timeout)
        report = _json_stdout(run) if run.ok else None
        tools.clear(dest)
        if report is None:
            merges.append({"sink": sink, "repeat": repeat, "ok": False, "error": run.stderr_tail()})
            _log(f"merge to {sink} FAILED: {run.stderr_tail()[-300:]}")
            continue
        entry = {
            "sink": sink,
            "repeat": repeat,
            "ok": True,
            "wall_s": run.wall_s,
            "seconds": report["seconds"],
            "bytes_read": report["bytes_read"],
            "bytes_written": report["bytes_written"],
            "gbps_wall": moved / run.wall_s / 1e9,
            "gbps": report["gbps"],
            "stage_seconds": report["stage_seconds"],
            "peak_rss_anon": run.peak_rss_anon,
            "peak_rss": run.peak_rss,
            "expected_host_buffers": few_plan["expected_peak_host_memory"],
            "baseline_rss_anon": baseline,
            "rss_anon_bound": bound,
            "within_bound": run.peak_rss_anon <= bound,
            "full_merge_hours": full_moved / (report["gbps"] * 1e9) / 3600,
        }
        merges.append(entry)
        _log(
            f"{args.layers} layer(s) to {sink} (run {repeat}): {run.wall_s:.1f} s wall, "
            f"{report['gbps']:.2f} GB/s in-process, "
            f"RssAnon {_mb(run.peak_rss_anon)} (bound {_mb(bound)}: "
            f"{'within' if entry['within_bound'] else 'EXCEEDED'}); a whole 671B merge at this rate: "
            f"{entry['full_merge_hours']:.1f} h"
        )
    result = {
        "command": command,
        "when": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "machine": info,
        "sparse_trio_seconds": made_s,
        "full_plan": {
            "wall_s": plan_run.wall_s,
            "peak_rss_anon": plan_run.peak_rss_anon,
            "tensors": plan["tensors"],
            "parameters": plan["parameters"],
            "fp8": plan["fp8"],
            "bytes_read": plan["bytes_read"],
            "bytes_written": plan["bytes_written"],
            "chunks": plan["chunks"],
            "expected_peak_host_memory": plan["expected_peak_host_memory"],
            "output_files": len(plan["output_files"]),
        },
        "layers": args.layers,
        "few_plan": {k: few_plan[k] for k in ("tensors", "bytes_read", "bytes_written", "expected_peak_host_memory")},
        "merges": merges,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "fp8-smoke" if args.smoke else "fp8"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    """The results as the README's table."""
    m, p = r["machine"], r["full_plan"]
    lines = [
        f"`{r['command']}` — {r['when']}, git {str(m['git'].get('commit', ''))[:10]}",
        f"**Machine:** {m['cpu_model']}, {m['cores_usable']} cores, {m['mem_total'] / 2**30:.1f} GiB RAM, Python "
        f"{m['python']}; torch {m['versions'].get('torch')}. Sparse inputs: no byte comes from a disk.",
        "",
        f"Full DeepSeek-V3 layout (sparse): `streammerge plan` in {p['wall_s']:.1f} s (process start-up included), "
        f"peak RssAnon {_mb(p['peak_rss_anon'])}: {p['tensors']:,} output tensors ({p['fp8']['tensors']:,} FP8 "
        f"weights, {p['fp8']['scales_written']:,} new scale tensors) in {p['output_files']} files, "
        f"{p['parameters']:,} parameters; a whole merge reads {p['bytes_read'] / 1e12:.2f} TB and writes "
        f"{p['bytes_written'] / 1e12:.2f} TB in {p['chunks']:,} chunks, host buffers "
        f"~{_mb(p['expected_peak_host_memory'])}.",
        "",
        f"| {r['layers']} full-width layer(s): sink, run | wall (s) | in-process GB/s | peak RssAnon (bound) | "
        "a whole 671B FP8 merge at this rate |",
        "|---|---|---|---|---|",
    ]
    for e in r["merges"]:
        if not e.get("ok"):
            lines.append(f"| {e['sink']}, {e.get('repeat', '-')} | {e.get('skipped') or 'failed'} | | | |")
            continue
        lines.append(
            f"| {e['sink']}, {e['repeat']} | {e['wall_s']:.1f} | {e['gbps']:.2f} | {_mb(e['peak_rss_anon'])} "
            f"({_mb(e['rss_anon_bound'])}) | {e['full_merge_hours']:.1f} h |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
