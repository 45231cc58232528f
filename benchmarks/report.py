"""Write a benchmark run as JSON (everything), CSV (one row per size/cache/tool, and one per run), a markdown
table and a PNG plot of throughput and peak anonymous memory against model size."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# Summary columns of the CSV, in order.
SUMMARY_FIELDS = (
    "size",
    "cache",
    "tool",
    "status",
    "reason",
    "runs",
    "failed",
    "checkpoint_bytes",
    "bytes_moved",
    "wall_min_s",
    "wall_median_s",
    "work_min_s",
    "work_median_s",
    "gbps_median",
    "gbps_best",
    "gbps_work_median",
    "ratio_to_floor_median",
    "ratio_to_floor_min",
    "work_ratio_to_floor_median",
    "peak_rss_anon",
    "peak_rss",
    "maxrss",
    "peak_gpu_memory",
    "cpu_median_s",
    "sync_after_median_s",
    "cache_residency_min",
    "load_median",
    "correct",
    "differing_elements",
    "differing_fraction",
    "max_ulps",
    "max_abs",
)
RUN_FIELDS = (
    "size",
    "cache",
    "repeat",
    "tool",
    "ok",
    "wall_s",
    "work_s",
    "user_s",
    "sys_s",
    "peak_rss_anon",
    "peak_rss",
    "maxrss",
    "peak_gpu_memory",
    "cache_residency_before",
    "load_before",
    "load_after",
    "sync_after_s",
    "returncode",
    "killed",
)
# Plot styles: one colour per tool, the floor dashed.
TOOL_STYLE = {
    "floor": {"color": "black", "linestyle": "--", "marker": "s"},
    "streammerge-cpu": {"color": "tab:blue", "linestyle": "-", "marker": "o"},
    "streammerge-cpu-null": {"color": "tab:blue", "linestyle": "-.", "marker": "o", "alpha": 0.5},
    "streammerge-cuda": {"color": "tab:cyan", "linestyle": "-", "marker": "o"},
    "naive": {"color": "tab:red", "linestyle": "-", "marker": "^"},
    "mergekit-bf16": {"color": "tab:orange", "linestyle": "-", "marker": "v"},
    "mergekit-fp32": {"color": "tab:brown", "linestyle": "-", "marker": "v"},
    "mergekit-bf16-cuda": {"color": "tab:pink", "linestyle": "-", "marker": "v"},
}
PLOT_DPI = 130
# Issue 4's targets for the 2-core development machine, warm cache, ~2 GB checkpoints (checked at every size).
TARGET_FLOOR_RATIO = 1.3
TARGET_SPEEDUP_VS_MERGEKIT = 4.0
TARGET_RSS_ANON_BYTES = 512 << 20
TARGET_RSS_ANON_FACTOR_VS_MERGEKIT = 4.0


def write_all(results: dict, out_dir: Path, name: str) -> list[Path]:
    """Write ``<name>.json``, ``<name>.csv``, ``<name>-runs.csv``, ``<name>.md`` and (with matplotlib)
    ``<name>.png`` into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets(results)
    results["scaling"] = scaling(results)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.csv", out_dir / f"{name}-runs.csv", out_dir / f"{name}.md"]
    png = out_dir / f"{name}.png"
    plotted = write_plot(results, png)
    if plotted is None:
        results["notes"].append("no plot: matplotlib is not installed (pip install -e '.[bench]')")
    paths[0].write_text(json.dumps(results, indent=2, default=str) + "\n")
    rows = [row for size in results["sizes"] for row in size["summary"]]
    _write_csv(paths[1], SUMMARY_FIELDS, rows)
    _write_csv(paths[2], RUN_FIELDS, [r for size in results["sizes"] for r in size["runs"]])
    paths[3].write_text(markdown(results, png.name if plotted else None))
    return paths + ([png] if plotted else [])


def _rows(results: dict, cache: str) -> dict[str, dict[str, dict]]:
    """{size label: {tool: summary row}} of the successful rows of one cache state."""
    out: dict[str, dict[str, dict]] = {}
    for size in results["sizes"]:
        for row in size["summary"]:
            if row["cache"] == cache and row["status"] == "ok":
                out.setdefault(size["size"]["label"], {})[row["tool"]] = row
    return out


def targets(results: dict) -> list[dict]:
    """Issue 4's targets (item 7), per size and cache state, from the median figures: met, missed or n/a."""
    out = []
    for cache in results["settings"]["caches"]:
        for label, rows in _rows(results, cache).items():
            sm = rows.get("streammerge-cpu")
            if sm is None:
                continue
            checks = []
            ratio = sm.get("ratio_to_floor_median")
            if ratio is not None:
                checks.append(("within 1.3x of the I/O floor", f"{ratio:.2f}x", ratio <= TARGET_FLOOR_RATIO))
            bf16, fp32 = rows.get("mergekit-bf16"), rows.get("mergekit-fp32")
            speed_bf16 = bf16["wall_median_s"] / sm["wall_median_s"] if bf16 else None
            if speed_bf16 is not None:
                checks.append(
                    (
                        ">= 4x faster than mergekit (default)",
                        f"{speed_bf16:.2f}x",
                        speed_bf16 >= TARGET_SPEEDUP_VS_MERGEKIT,
                    )
                )
            if fp32 is not None:
                speed_fp32 = fp32["wall_median_s"] / sm["wall_median_s"]
                ok = speed_fp32 > (speed_bf16 or 0.0)
                checks.append(("faster than mergekit fp32 by a larger margin", f"{speed_fp32:.2f}x", ok))
            anon = sm["peak_rss_anon"]
            checks.append(("peak RssAnon < 512 MB", f"{anon / 1e6:.0f} MB", anon < TARGET_RSS_ANON_BYTES))
            if bf16 is not None:
                factor = bf16["peak_rss_anon"] / anon if anon else None
                if factor is not None:
                    checks.append(
                        (
                            "peak RssAnon >= 4x below mergekit's",
                            f"{factor:.1f}x",
                            factor >= TARGET_RSS_ANON_FACTOR_VS_MERGEKIT,
                        )
                    )
            for what, value, met in checks:
                out.append({"size": label, "cache": cache, "target": what, "value": value, "met": met})
    return out


def scaling(results: dict) -> list[dict]:
    """Per tool and cache state across sizes: GB/s and peak RssAnon at the smallest and largest size, and the
    spread (largest / smallest): ~1 for throughput and memory means flat."""
    out = []
    for cache in results["settings"]["caches"]:
        per_tool: dict[str, list[dict]] = {}
        for rows in _rows(results, cache).values():
            for tool, row in rows.items():
                per_tool.setdefault(tool, []).append(row)
        for tool, rows in per_tool.items():
            if len(rows) < 2:
                continue
            rows.sort(key=lambda r: r["checkpoint_bytes"])
            small, large = rows[0], rows[-1]
            out.append(
                {
                    "tool": tool,
                    "cache": cache,
                    "sizes": [r["size"] for r in rows],
                    "gbps": [r["gbps_median"] for r in rows],
                    "peak_rss_anon": [r["peak_rss_anon"] for r in rows],
                    "gbps_spread": max(r["gbps_median"] for r in rows) / min(r["gbps_median"] for r in rows),
                    "rss_anon_growth": large["peak_rss_anon"] / small["peak_rss_anon"]
                    if small["peak_rss_anon"]
                    else None,
                    "size_growth": large["checkpoint_bytes"] / small["checkpoint_bytes"],
                }
            )
    return out


def _write_csv(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k) for k in fields})


def _gb(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _correct_cell(row: dict) -> str:
    c = row.get("correct")
    if row["tool"] == "floor":
        return ""
    if row.get("differing_elements") is not None:
        if not row["differing_elements"]:
            return "identical to streammerge"
        return (
            f"{row['differing_fraction']:.2%} of elements differ, max {row['max_ulps']} ulps "
            f"(max abs {row['max_abs']:.2g})"
        )
    if row["tool"].endswith("-null"):
        return "(null sink: no output)"
    return {True: "exact (reference + SHA-256)", False: "**WRONG**", None: "-"}[c]


def markdown(results: dict, png_name: str | None) -> str:
    """The markdown report: setup, one table per cache state, correctness, skips, the 70B layout, mergekit YAML."""
    m, s = results["machine"], results["settings"]
    v = m["versions"]
    mk = results["mergekit"]
    mem = (m.get("mem_total") or 0) / 2**30
    lines = [
        "# streammerge benchmarks",
        "",
        f"`{results['command']}` — {results['created']}, git {str((m['git'] or {}).get('commit'))[:10]}"
        + (" (uncommitted changes)" if (m["git"] or {}).get("dirty") else ""),
        "",
        f"**Machine:** {m['cpu_model']}, {m['cores']} cores, {mem:.1f} GiB RAM, kernel {m['kernel']}, "
        f"Python {m['python']}; torch {v.get('torch')}, safetensors {v.get('safetensors')}, triton {v.get('triton')}, "
        f"streammerge {v.get('streammerge')}, mergekit {mk['version'] or mk['status']}. "
        + (f"GPU: {results['gpu'].get('name')}. " if results["gpu"].get("cuda") else "No GPU. ")
        + f"Load average at start {m['load_average_at_start'][0]:.1f}, at end {m['load_average_at_end'][0]:.1f} "
        "(the machine may be shared: compare ratios, not absolute times).",
        "",
        f"**Inputs:** synthetic bf16 trios from `streammerge.synth` (real layouts, each checkpoint sharded "
        f"differently), α = {s['alpha']}, streammerge chunk {s['chunk_size']}, {s['repeats']} round(s) per cache "
        "state. **wall** = process start to exit (interpreter start-up and imports included); **GB/s** = (bytes "
        "read + written) / median wall; **× floor** = median over rounds of wall / the floor's wall in the same "
        "round; **RssAnon / RSS** = peak of the process tree's summed RssAnon / VmRSS, sampled every 10 ms. "
        "streammerge and the floor fsync their output; naive and mergekit do not (their unflushed writes are "
        "synced after the run, outside their wall time). **Cold** runs follow `sync; echo 3 > "
        "/proc/sys/vm/drop_caches`, so each tool's own libraries (torch, ...) are read from disk too.",
        "",
    ]
    sizes = results["sizes"]
    for cache in s["caches"]:
        lines += [f"## {cache.capitalize()} page cache", ""]
        if cache == "cold" and str(s.get("cold", "")).startswith("cold not permitted"):
            lines += [s["cold"], ""]
            continue
        lines += [
            "| size | tool | wall min / median (s) | GB/s | × floor | peak RssAnon | peak RSS | correctness |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for size in sizes:
            info = size["size"]
            label = f"{info['label']} ({info['layout']} × {info['num_layers']})"
            for row in size["summary"]:
                if row["cache"] not in (cache, "all"):
                    continue
                if row["status"] != "ok":
                    reason = row.get("reason", row["status"])
                    lines.append(f"| {label} | {row['tool']} | {reason} | | | | | |")
                    continue
                lines.append(
                    f"| {label} | {row['tool']} | {row['wall_min_s']:.2f} / {row['wall_median_s']:.2f} | "
                    f"{row['gbps_median']:.2f} | {_f(row['ratio_to_floor_median'], '.2f')} | "
                    f"{_gb(row['peak_rss_anon'])} | {_gb(row['peak_rss'])} | {_correct_cell(row)} |"
                )
        lines.append("")
    lines += _targets_section(results)
    lines += _scaling_section(results)
    lines += _work_section(sizes)
    lines += _sparse_section(results.get("sparse"))
    if results["absent"]:
        lines += ["## Not run", ""] + [f"- {k}: {v}" for k, v in results["absent"].items()] + [""]
    lines += [
        "## mergekit configuration",
        "",
        "task_arithmetic computes `base + Σ wᵢ·(modelᵢ − base)`; with base_model = target, sft at weight −α and "
        "grpo at +α that is `target + α·(grpo − sft)`. `normalize: false` is required (the weights sum to 0).",
        "Validated on a tiny trio: the float32 variant's output is byte-identical to streammerge's.",
        "",
        "```yaml",
        mk["yaml_bf16"].rstrip(),
        "```",
        "",
        "float32 variant: the same plus",
        "",
        "```yaml",
        "dtype: float32",
        "out_dtype: bfloat16",
        "```",
        "",
    ]
    if png_name:
        lines += [f"![throughput and peak anonymous memory vs model size]({png_name})", ""]
    lines += [f"- {n}" for n in results["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def _targets_section(results: dict) -> list[str]:
    if not results.get("targets"):
        return []
    lines = [
        "## Targets (issue 4, item 7: warm cache, ~2 GB, 2 cores; median walls, start-up included)",
        "",
        "| size | cache | target | measured | met |",
        "|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        lines.append(
            f"| {t['size']} | {t['cache']} | {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |"
        )
    return lines + [""]


def _scaling_section(results: dict) -> list[str]:
    if not results.get("scaling"):
        return []
    lines = [
        "## Scaling with model size",
        "",
        "| tool | cache | sizes | GB/s | peak RssAnon | RssAnon growth vs size growth |",
        "|---|---|---|---|---|---|",
    ]
    for s in results["scaling"]:
        growth = "-" if s["rss_anon_growth"] is None else f"{s['rss_anon_growth']:.2f}x"
        lines.append(
            f"| {s['tool']} | {s['cache']} | {', '.join(s['sizes'])} | {' / '.join(f'{g:.2f}' for g in s['gbps'])} | "
            f"{' / '.join(_gb(m) for m in s['peak_rss_anon'])} | {growth} for {s['size_growth']:.1f}x the size |"
        )
    return lines + [""]


def _detail(row_runs: list[dict]) -> str:
    """Where a tool's in-process time went (last successful run): floor, streammerge and naive report stages."""
    rep = next((r.get("reported") for r in reversed(row_runs) if r["ok"] and r.get("reported")), None) or {}
    if "read_s" in rep:
        return f"read {rep['read_s']:.2f} + write {rep['write_s']:.2f} + fsync {rep['fsync_s']:.2f} s"
    if "load_s" in rep:
        return f"load {rep['load_s']:.2f} + compute {rep['compute_s']:.2f} + save {rep['save_s']:.2f} s"
    stages = rep.get("stage_seconds") or {}
    return ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())


def _work_section(sizes: list[dict]) -> list[str]:
    """In-process times: what each tool reports for its own work (no interpreter start-up)."""
    rows = []
    for size in sizes:
        for row in size["summary"]:
            if row["status"] == "ok" and row.get("work_median_s") is not None:
                runs = [r for r in size["runs"] if r["tool"] == row["tool"] and r["cache"] == row["cache"]]
                rows.append(
                    f"| {size['size']['label']} | {row['cache']} | {row['tool']} | {row['work_median_s']:.2f} | "
                    f"{_f(row['gbps_work_median'], '.2f')} | {_f(row['work_ratio_to_floor_median'], '.2f')} | "
                    f"{_detail(runs)} |"
                )
    if not rows:
        return []
    return [
        "## In-process time (start-up excluded)",
        "",
        "What each tool measures itself: streammerge's report `seconds`, the floor's read + write + fsync, the naive "
        "baseline's load + compute + save (mergekit reports none). streammerge's `stage_seconds` are as its "
        "report gives them; they run on different threads and overlap.",
        "",
        "| size | cache | tool | median (s) | GB/s | × floor | where the time went (last run) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _sparse_section(sparse: dict | None) -> list[str]:
    if not sparse:
        return []
    lines = [f"## {sparse['layout']} layout without the disk (sparse files)", ""]
    plan = sparse.get("plan")
    if plan is None:
        return lines + [f"plan failed: `{sparse.get('plan_error', '')[-300:]}`", ""]
    lines += [
        f"`streammerge plan` on the full sparse trio ({sparse['apparent_checkpoint_bytes'] / 1e9:.1f} GB apparent "
        f"per checkpoint, {sparse['plan_wall_s']:.1f} s, RssAnon {_gb(sparse['plan_peak_rss_anon'])}): "
        f"{plan['tensors']} tensors, {plan['parameters']:,} parameters, read {_gb(plan['bytes_read'])}, "
        f"write {_gb(plan['bytes_written'])} in {plan['output_files']} file(s), disk needed "
        f"{_gb(plan['disk_needed'])} ({_gb(sparse['free_disk'])} free here), host buffers "
        f"~{_gb(plan['expected_peak_host_memory'])} ({plan['chunks']} chunks of {_gb(plan['chunk_bytes'])}).",
        "",
    ]
    for mg in sparse.get("merges") or []:
        where = "the null sink (computed, discarded)" if mg.get("sink") == "null" else "disk"
        if mg.get("skipped"):
            lines.append(f"- merge of {mg['num_layers']} layers to {where}: skipped ({mg['skipped']}).")
        elif mg.get("ok"):
            gpu = f", peak GPU memory {_gb(mg['peak_gpu_memory'])}" if mg.get("peak_gpu_memory") else ""
            verdict = {True: "; output matches the reference", False: "; output **WRONG**"}.get(
                mg.get("reference_ok"), ""
            )
            lines.append(
                f"- merge of {mg['num_layers']} layers on {mg['device']}, end to end to {where}: "
                f"{_gb(mg['bytes_read'])} read, {_gb(mg['bytes_written'])} written in {mg['wall_s']:.1f} s "
                f"({mg['gbps']:.2f} GB/s); peak RssAnon {_gb(mg['peak_rss_anon'])} (bound: a baseline process's "
                f"{_gb(mg['baseline_rss_anon'])} + planned buffers {_gb(mg['expected_host_buffers'])} + 64 MB = "
                f"{_gb(mg['rss_anon_bound'])}: {'within' if mg['within_bound'] else '**EXCEEDED**'}), peak RSS "
                f"{_gb(mg['peak_rss'])}{gpu}{verdict}."
            )
        else:
            err = (mg.get("error") or "")[-300:]
            lines.append(f"- merge of {mg['num_layers']} layers on {mg['device']} to {where} FAILED: `{err}`")
    return lines + [""]


def write_plot(results: dict, path: Path) -> Path | None:
    """Two panels against checkpoint size: median GB/s, and peak RssAnon (log scale). `None` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
    except ImportError:
        return None
    series: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    tick_labels: dict[float, str] = {}
    for size in results["sizes"]:
        tick_labels[size["size"]["checkpoint_bytes"] / 1e9] = size["size"]["label"]
        for row in size["summary"]:
            if row["status"] != "ok":
                continue
            x = row["checkpoint_bytes"] / 1e9
            series.setdefault((row["tool"], row["cache"]), []).append((x, row["gbps_median"], row["peak_rss_anon"]))
    fig, (ax_tp, ax_mem) = plt.subplots(1, 2, figsize=(13, 5))
    order = list(TOOL_STYLE)
    xs_all: set[float] = set()
    for (tool, cache), pts in sorted(
        series.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99, kv[0][1])
    ):
        pts.sort()
        style = dict(TOOL_STYLE.get(tool, {"marker": "o"}))
        if cache == "cold":
            style.update(alpha=0.55, linestyle=":")
        label = f"{tool} ({cache})" if len(results["settings"]["caches"]) > 1 else tool
        xs = [p[0] for p in pts]
        xs_all.update(xs)
        ax_tp.plot(xs, [p[1] for p in pts], label=label, **style)
        if tool != "floor":
            ax_mem.plot(xs, [p[2] / 1e6 for p in pts], label=label, **style)
    ticks = sorted(xs_all)
    for ax in (ax_tp, ax_mem):
        if len(ticks) > 1:
            ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{tick_labels.get(x, '')}\n{x:.3g} GB" for x in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    m = results["machine"]
    ax_tp.set_title("Throughput: (bytes read + written) / wall")
    ax_tp.set_xlabel("checkpoint size (bf16, per checkpoint)")
    ax_tp.set_ylabel("GB/s (median)")
    ax_tp.set_ylim(bottom=0)
    ax_mem.set_title("Peak anonymous memory of the process tree")
    ax_mem.set_xlabel("checkpoint size (bf16, per checkpoint)")
    ax_mem.set_ylabel("peak RssAnon (MB, log scale)")
    ax_mem.set_yscale("log")  # resets the formatters: set them after
    ax_mem.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_mem.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}"))
    ax_mem.yaxis.set_minor_locator(NullLocator())
    for ax in (ax_tp, ax_mem):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"streammerge vs I/O floor vs peers — {m['cpu_model']}, {m['cores']} cores, "
        f"{(m.get('mem_total') or 0) / 2**30:.0f} GiB RAM, {results['created']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path
