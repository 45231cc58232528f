"""``python -m benchmarks.run``: streammerge against the I/O floor and its peers, over model sizes and cache states.

For each size a synthetic trio is generated once (cached under ``--workdir``); then, round after round (one round =
every tool once, so the ratio to the floor compares runs made moments apart on a shared, noisy machine), each tool
runs in its own process tree while a sampler records the tree's RssAnon and VmRSS every 10 ms. Outputs are
checked afterwards: streammerge's against an independent numpy reference and for identical bytes across runs,
each peer's element by element against streammerge's. streammerge also runs with ``--sink null`` (everything
computed, nothing written) to show what the disk costs. A sparse 70B-layout trio (real headers, data holes) shows
the plan of a real 70B merge, all of it merged end to end to the null sink, and a few layers to disk. Results go
to ``<out>/<name>.json``, ``.csv``, ``-runs.csv``, ``.md`` and ``.png``.

Examples:

    python -m benchmarks.run                                   # 0.5GB,2GB,8GB, warm, 3 repeats
    python -m benchmarks.run --cold --repeats 5 --mergekit /tmp/mkvenv/bin/mergekit-yaml
    python -m benchmarks.run --sizes 2GB --repeats 1 --peers mergekit --no-sparse --out benchmarks/results/tmp
    python -m benchmarks.run --smoke                           # tiny, one repeat, < 60 s: what CI runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import streammerge
from streammerge import synth

from . import machine, report, tools, verify
from .inputs import TrioInfo, ensure_trio, parse_size, sparse_trio
from .monitor import ProcessRun, run_monitored

DEFAULT_SIZES = "0.5GB,2GB,8GB"
DEFAULT_REPEATS = 3
DEFAULT_WORKDIR = Path("/tmp/streammerge-bench")
DEFAULT_OUT = machine.REPO_ROOT / "benchmarks" / "results"
SMOKE_OUT = DEFAULT_OUT / "tmp"
SMOKE_SIZES = "4MB"
SMOKE_SPARSE_LAYOUT = "tiny-qwen2"
DEFAULT_SPARSE_LAYOUT = "llama3-70b"
# Layers of the sparse layout merged end to end to disk: 2 Llama-3-70B layers + embedding + lm_head = 7.6 GB per
# checkpoint (22.9 GB of holes read, 7.6 GB written): 120 s on the (loaded) development machine. All 80 layers go to
# the null sink: 423 GB of holes read, ~42 s per 2 layers there (so ~15 min).
DEFAULT_SPARSE_LAYERS = 2
# In warm mode the inputs are re-read (untimed) before a run when less than this fraction is in the page cache.
WARM_MIN_RESIDENCY = 0.99
# Inputs larger than this fraction of RAM cannot all stay in the page cache beside the tools: not re-read before
# "warm" runs (each run's residency is recorded instead).
WARMABLE_FRACTION = 0.75
# Skip a peer whose estimated peak RSS exceeds this fraction of MemAvailable; kill one whose tree RSS exceeds
# this fraction of MemAvailable at start (other work shares the machine).
RAM_HEADROOM = 0.85
PEER_RSS_CAP = 0.9
# Slack allowed over "the baseline (the larger of a plan process's RssAnon and that of a process that only imports
# the engine: plan reads headers without torch) + the plan's expected host buffers" for the sparse merge's RssAnon:
# the engine's thread stacks, the kernel self-test and allocator fragmentation.
SPARSE_RSS_SLACK_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 3600.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.0f} MB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark streammerge against the I/O floor, a naive torch merge and mergekit.",
        epilog=__doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", help=f"checkpoint sizes, comma-separated (default {DEFAULT_SIZES}; smoke {SMOKE_SIZES})")
    p.add_argument("--layout", help="synth layout for every size (default: by size, see benchmarks.inputs)")
    p.add_argument("--repeats", type=int, help=f"rounds per cache state (default {DEFAULT_REPEATS}; smoke 1)")
    p.add_argument("--cold", action="store_true", help="also run cold-cache rounds (drops caches: needs root)")
    p.add_argument("--peers", default=",".join(tools.PEERS), help="comma-separated: naive, mergekit, or none")
    p.add_argument("--mergekit", help="path of mergekit-yaml (default: on PATH); 'none' to leave mergekit out")
    p.add_argument("--alpha", type=float, default=1.0, help="the vector's scale (default 1.0)")
    p.add_argument("--chunk-size", default="16MiB", help="streammerge --chunk-size (default 16MiB)")
    p.add_argument("--threads", type=int, help="streammerge --threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="synth seed (default 0)")
    p.add_argument("--workdir", type=Path, help=f"inputs (cached) and outputs (default {DEFAULT_WORKDIR})")
    p.add_argument(
        "--out", type=Path, help="results directory (default benchmarks/results; smoke benchmarks/results/tmp)"
    )
    p.add_argument("--name", help="results file stem (default 'latest'; smoke 'smoke')")
    p.add_argument("--full-check", action="store_true", help="check every output element against the reference")
    p.add_argument(
        "--no-null-sink",
        dest="null_sink",
        action="store_false",
        help="leave out the streammerge --sink null runs (per size, and the full sparse layout)",
    )
    p.add_argument("--no-sparse", dest="sparse", action="store_false", help="skip the sparse 70B-layout section")
    p.add_argument("--sparse-layout", help=f"sparse layout (default {DEFAULT_SPARSE_LAYOUT}; smoke tiny-qwen2)")
    p.add_argument("--sparse-layers", type=int, help=f"layers merged to disk (default {DEFAULT_SPARSE_LAYERS})")
    p.add_argument(
        "--sparse-null-layers", type=int, help="layers merged to the null sink (default: all of the layout's)"
    )
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds before a run is killed")
    p.add_argument(
        "--ignore-ram-estimate",
        action="store_true",
        help="run peers even where their estimated memory exceeds what is available (a cap still kills them)",
    )
    p.add_argument("--keep-outputs", action="store_true", help="leave the merged outputs in the work directory")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, no cold: finishes in < 60 s")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.smoke and args.cold:
        p.error("--smoke runs warm only")
    args.sizes = [s.strip() for s in (args.sizes or (SMOKE_SIZES if args.smoke else DEFAULT_SIZES)).split(",")]
    try:
        for s in args.sizes:
            parse_size(s)
    except ValueError as e:
        p.error(str(e))
    args.repeats = args.repeats or (1 if args.smoke else DEFAULT_REPEATS)
    peers = [x.strip() for x in args.peers.split(",") if x.strip() and x.strip() != "none"]
    unknown = set(peers) - set(tools.PEERS)
    if unknown:
        p.error(f"unknown peer(s) {', '.join(sorted(unknown))}; use {', '.join(tools.PEERS)} or none")
    args.peers = peers
    args.workdir = (args.workdir or DEFAULT_WORKDIR).resolve()
    args.out = (args.out or (SMOKE_OUT if args.smoke else DEFAULT_OUT)).resolve()
    args.name = args.name or ("smoke" if args.smoke else "latest")
    args.sparse_layout = args.sparse_layout or (SMOKE_SPARSE_LAYOUT if args.smoke else DEFAULT_SPARSE_LAYOUT)
    args.sparse_layers = args.sparse_layers or DEFAULT_SPARSE_LAYERS
    args.full_check = args.full_check or args.smoke
    return args


def _json_stdout(run: ProcessRun) -> dict | None:
    """The JSON object a tool printed last on stdout (streammerge --json, the workers), if any."""
    text = run.stdout_text().strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start = text.rfind("\n{")
        try:
            return json.loads(text[start + 1 :]) if start >= 0 else None
        except json.JSONDecodeError:
            return None


class Bench:
    """One invocation of the suite: settings, the tools, and everything measured so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        args.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = args.workdir / "logs" / self.stamp
        self.machine = machine.machine_info(args.workdir)
        self.gpu = machine.gpu_info()
        self.mergekit = tools.find_mergekit(args.mergekit) if "mergekit" in args.peers else None
        self.mergekit_version = tools.mergekit_version(self.mergekit) if self.mergekit else None
        self.tools, self.absent = tools.select_tools(args.peers, self.mergekit, self.gpu, args.null_sink)
        self.caches = ["warm"] + (["cold"] if args.cold else [])
        self.cold_note: str | None = None
        self.mem_available = machine.meminfo().get("MemAvailable", 0)
        self.notes: list[str] = []

    # ------------------------------------------------------------------------------------------------ one run
    def run_tool(self, tool: tools.Tool, info: TrioInfo, cache: str, rep: int, out_root: Path) -> dict:
        out = out_root / tool.name
        tools.clear(out)
        if tool.kind == "floor":
            out.mkdir(parents=True)
        ctx = tools.Context(
            trio=info,
            out_dir=out,
            config_dir=self.args.workdir / "configs",
            alpha=self.args.alpha,
            chunk_size=self.args.chunk_size,
            threads=self.args.threads,
            mergekit=self.mergekit,
        )
        warm_s = None
        if cache == "cold":
            machine.drop_caches()
        elif self.warmable(info) and machine.cache_residency(info.files) < WARM_MIN_RESIDENCY:
            warm_s = machine.warm(info.files)
        residency = machine.cache_residency(info.files)
        load = machine.load_average()
        cap = int(self.mem_available * PEER_RSS_CAP) if tool.ram_factor else None
        pr = run_monitored(
            tool.build(ctx),
            self.logs / info.label,
            f"{tool.name}-{cache}-{rep}",
            cwd=tools.repo_cwd(),
            env=dict(tool.env),
            timeout_s=self.args.timeout,
            rss_cap=cap,
            gpu=tool.gpu,
        )
        t0 = time.perf_counter()
        os.sync()  # peers do not fsync: what they left dirty is flushed here, outside their wall time
        sync_s = time.perf_counter() - t0
        rec: dict = {
            "size": info.label,
            "tool": tool.name,
            "cache": cache,
            "repeat": rep,
            "ok": pr.ok,
            "wall_s": pr.wall_s,
            "user_s": pr.user_s,
            "sys_s": pr.sys_s,
            "peak_rss_anon": pr.peak_rss_anon,
            "peak_rss": pr.peak_rss,
            "maxrss": pr.maxrss,
            "peak_gpu_memory": pr.peak_gpu_memory,
            "samples": pr.samples,
            "processes": pr.processes,
            "cache_residency_before": residency,
            "warmed_s": warm_s,
            "load_before": load,
            "load_after": machine.load_average(),
            "sync_after_s": sync_s,
            "returncode": pr.returncode,
            "killed": pr.killed,
            "argv": pr.argv,
            "work_s": None,
        }
        if not pr.ok:
            rec["stderr_tail"] = pr.stderr_tail()
        reported = _json_stdout(pr) if pr.ok else None
        if reported is not None:
            rec["work_s"] = reported.get("seconds")
            if tool.kind.startswith("streammerge"):
                rec["reported"] = {
                    k: reported.get(k)
                    for k in (
                        "device",
                        "bytes_read",
                        "bytes_written",
                        "gbps",
                        "peak_rss_anon",
                        "peak_gpu_memory",
                        "stage_seconds",
                        "shard_sha256",
                        "warnings",
                    )
                }
            else:
                rec["reported"] = reported
        gbps = info.bytes_moved / pr.wall_s / 1e9 if pr.ok and pr.wall_s > 0 else None
        status = "ok" if pr.ok else f"FAILED ({pr.killed or f'exit {pr.returncode}'})"
        _log(
            f"[{info.label} {cache} #{rep + 1}] {tool.name:<20} {status:<6} {pr.wall_s:7.2f} s"
            + (f" {gbps:6.2f} GB/s" if gbps else "")
            + f"  RssAnon {_mb(pr.peak_rss_anon)}  RSS {_mb(pr.peak_rss)}  cache {residency:.0%}  load {load:.1f}"
        )
        return rec

    def warmable(self, info: TrioInfo) -> bool:
        """Whether the inputs fit the page cache at all (else "warm" runs read partly from disk, as recorded)."""
        return info.bytes_in <= WARMABLE_FRACTION * (self.machine.get("mem_total") or 0)

    # ------------------------------------------------------------------------------------------------ one size
    def bench_size(self, label: str) -> dict:
        info = ensure_trio(self.args.workdir, label, layout=self.args.layout, seed=self.args.seed)
        _log(
            f"size {label}: {info.layout} x {info.num_layers} layers, {info.checkpoint_bytes / 1e9:.3f} GB per "
            f"checkpoint, {info.bytes_moved / 1e9:.2f} GB moved per merge"
            + (f" (generated in {info.generation_s:.0f} s)" if info.generation_s else " (cached)")
        )
        if not self.warmable(info):
            self.notes.append(
                f"{label}: {info.bytes_in / 1e9:.1f} GB of inputs cannot all stay in the page cache "
                f"({(self.machine.get('mem_total') or 0) / 2**30:.0f} GiB RAM): warm runs read partly from disk"
            )
            _log(f"  {self.notes[-1]}")
        skipped: dict[str, str] = {}
        for tool in self.tools:
            if tool.ram_factor is None or self.args.ignore_ram_estimate:
                continue
            need = tool.ram_factor * info.checkpoint_bytes
            if need > RAM_HEADROOM * self.mem_available:
                skipped[tool.name] = (
                    f"skipped: would need ~{need / 1e9:.1f} GB of memory ({tool.ram_factor:g} x a "
                    f"{info.checkpoint_bytes / 1e9:.1f} GB checkpoint), {self.mem_available / 1e9:.1f} GB available"
                )
                _log(f"  {tool.name}: {skipped[tool.name]}")
        active = [t for t in self.tools if t.name not in skipped]
        out_root = self.args.workdir / "out" / info.label
        runs: list[dict] = []
        cache_notes: dict[str, str] = {}
        for cache in self.caches:
            if cache == "cold":
                ok, note = self._check_cold(info)
                cache_notes["cold"] = note
                if not ok:
                    _log(f"  {note}")
                    continue
            for rep in range(self.args.repeats):
                for tool in active:
                    runs.append(self.run_tool(tool, info, cache, rep, out_root))
        correctness = self.check_outputs(info, active, runs, out_root)
        if not self.args.keep_outputs:
            tools.clear(out_root)
        summary = summarize(runs, info, correctness)
        for name, why in skipped.items():
            summary.append({"size": info.label, "tool": name, "cache": "all", "status": "skipped", "reason": why})
        return {
            "size": info.to_dict(),
            "skipped": skipped,
            "cache_notes": cache_notes,
            "runs": runs,
            "correctness": correctness,
            "summary": summary,
        }

    def _check_cold(self, info: TrioInfo) -> tuple[bool, str]:
        """Drop caches once and confirm the inputs left the page cache."""
        if self.cold_note is not None and self.cold_note.startswith("cold not permitted"):
            return False, self.cold_note
        ok, note = machine.drop_caches()
        if ok:
            left = machine.cache_residency(info.files)
            if left > machine.COLD_RESIDENCY_MAX:
                ok, note = False, f"cold not permitted: caches dropped but {left:.0%} of the inputs stayed cached"
        self.cold_note = note
        return ok, note

    # ------------------------------------------------------------------------------------------------ correctness
    def check_outputs(self, info: TrioInfo, active: list[tools.Tool], runs: list[dict], out_root: Path) -> dict:
        """streammerge vs the numpy reference and across runs; each peer's output vs streammerge's."""
        t = info.trio
        result: dict = {}
        last_ok = {r["tool"]: r for r in runs if r["ok"]}
        sm_out = out_root / tools.STREAMMERGE_CPU.name
        for tool in active:
            if tool.kind != "streammerge":
                continue
            ok_runs = [r for r in runs if r["tool"] == tool.name and r["ok"]]
            if not ok_runs:
                result[tool.name] = {"ok": False, "why": "no successful run"}
                continue
            digests = [json.dumps((r.get("reported") or {}).get("shard_sha256"), sort_keys=True) for r in ok_runs]
            t0 = time.perf_counter()
            ref = verify.check_reference(
                t.target, t.sft, t.grpo, out_root / tool.name, self.args.alpha, full=self.args.full_check
            )
            entry = {
                **ref,
                "check_s": time.perf_counter() - t0,
                "runs": len(ok_runs),
                "sha256_stable": len(set(digests)) == 1,
                "shard_sha256": (ok_runs[-1].get("reported") or {}).get("shard_sha256"),
            }
            entry["ok"] = bool(ref["ok"] and entry["sha256_stable"])
            result[tool.name] = entry
            _log(
                f"  {tool.name}: reference check {'ok' if ref['ok'] else 'FAILED'} "
                f"({ref['elements_checked']:,} of {ref['elements_total']:,} elements), "
                f"SHA-256 {'identical' if entry['sha256_stable'] else 'DIFFERENT'} over {len(ok_runs)} run(s)"
            )
        cuda = result.get(tools.STREAMMERGE_CUDA.name)
        if cuda is not None and "shard_sha256" in cuda:
            same = cuda["shard_sha256"] == result.get(tools.STREAMMERGE_CPU.name, {}).get("shard_sha256")
            cuda["same_bytes_as_cpu"] = same
            cuda["ok"] = bool(cuda["ok"] and same)
        for tool in active:
            if tool.kind != "peer":
                continue
            if tool.name not in last_ok:
                result[tool.name] = {"identical": None, "why": "no successful run"}
            elif tools.STREAMMERGE_CPU.name not in last_ok:
                result[tool.name] = {"identical": None, "why": "no streammerge output to compare with"}
            else:
                t0 = time.perf_counter()
                result[tool.name] = {
                    **verify.compare_outputs(sm_out, out_root / tool.name),
                    "check_s": time.perf_counter() - t0,
                }
                c = result[tool.name]
                _log(
                    f"  {tool.name} vs streammerge: {c['differing_elements']:,} of {c['elements']:,} elements differ "
                    f"({c['differing_fraction']:.2%}), max {c['max_ulps']} ulps, max abs {c['max_abs']:.3g}"
                )
        return result

    # ------------------------------------------------------------------------------------------------ sparse
    def bench_sparse(self) -> dict:
        """Plan a full sparse trio of the layout; merge a few of its layers to disk and bound the memory."""
        args = self.args
        py = sys.executable
        logs = self.logs / "sparse"
        full, apparent = sparse_trio(args.workdir, args.sparse_layout, None)
        plan_argv = [py, "-m", "streammerge", "plan", *map(str, full), "--json", "--chunk-size", args.chunk_size]
        plan_run = run_monitored(plan_argv, logs, "plan-full", cwd=tools.repo_cwd(), timeout_s=args.timeout)
        plan = _json_stdout(plan_run) if plan_run.ok else None
        # `plan` no longer imports torch; the merge does: its libraries count in the baseline, not in the buffers
        imports_argv = [py, "-c", "import time, streammerge.engines.cpu; time.sleep(0.5)"]
        imports_run = run_monitored(imports_argv, logs, "engine-imports", cwd=tools.repo_cwd(), timeout_s=args.timeout)
        self.baseline_rss_anon = max(plan_run.peak_rss_anon, imports_run.peak_rss_anon)
        free = shutil.disk_usage(args.workdir).free
        out: dict = {
            "layout": args.sparse_layout,
            "apparent_checkpoint_bytes": apparent,
            "plan_ok": plan_run.ok,
            "plan_wall_s": plan_run.wall_s,
            "plan_peak_rss_anon": plan_run.peak_rss_anon,
            "free_disk": free,
        }
        if plan is None:
            out["plan_error"] = plan_run.stderr_tail()
            _log(f"sparse {args.sparse_layout}: plan FAILED: {out['plan_error'][-300:]}")
            return out
        out["plan"] = {k: v for k, v in plan.items() if k not in ("sources", "output_files", "copied_reasons")}
        out["plan"]["output_files"] = len(plan["output_files"])
        _log(
            f"sparse {args.sparse_layout} plan: {plan['tensors']} tensors, {plan['parameters']:,} parameters; "
            f"read {plan['bytes_read'] / 1e9:.1f} GB, write {plan['bytes_written'] / 1e9:.1f} GB, "
            f"disk needed {plan['disk_needed'] / 1e9:.1f} GB ({free / 1e9:.1f} GB free), "
            f"host buffers ~{plan['expected_peak_host_memory'] / 1e6:.0f} MB in {plan['chunks']} chunks"
        )
        devices = ["cpu"] + (["cuda"] if self.gpu.get("cuda") else [])
        merges = []
        if args.null_sink:
            null_trio, null_bytes, null_plan = full, apparent, plan
            if args.sparse_null_layers is not None:
                null_trio, null_bytes = sparse_trio(args.workdir, args.sparse_layout, args.sparse_null_layers)
                null_plan = streammerge.plan(*null_trio, chunk_bytes=args.chunk_size).summary()
            layers = args.sparse_null_layers or synth.get_layout(args.sparse_layout).num_layers
            for device in devices:
                merges.append(self._sparse_merge(null_trio, null_bytes, null_plan, plan_run, device, "null", layers))
        few, few_bytes = sparse_trio(args.workdir, args.sparse_layout, args.sparse_layers)
        try:  # in this process: the plan process above already measured a planning process's memory
            few_plan = streammerge.plan(*few, chunk_bytes=args.chunk_size).summary()
        except streammerge.StreamMergeError as e:
            few_plan = None
            out["few_plan_error"] = str(e)
        if few_plan is None or few_plan["disk_needed"] > free:
            why = "plan failed" if few_plan is None else "not enough free disk for the output"
            merges.append({"num_layers": args.sparse_layers, "sink": "disk", "skipped": why})
        else:
            for device in devices:
                merges.append(
                    self._sparse_merge(few, few_bytes, few_plan, plan_run, device, "disk", args.sparse_layers)
                )
        out["merges"] = merges
        return out

    def _sparse_merge(
        self, trio, apparent: int, plan: dict, plan_run: ProcessRun, device: str, sink: str, layers: int
    ) -> dict:
        """Merge a sparse trio on ``device`` to ``sink`` ("disk" or "null"); check its RssAnon bound and, on disk,
        its (all-zero) output against the reference."""
        args = self.args
        dest = args.workdir / "out" / "sparse"
        tools.clear(dest)
        argv = [sys.executable, "-m", "streammerge", "merge", *map(str, trio), "-o", str(dest), "--device", device]
        argv += ["--json", "--quiet", "--chunk-size", args.chunk_size, "--sink", sink]
        run = run_monitored(
            argv, self.logs / "sparse", f"merge-{layers}L-{sink}-{device}", cwd=tools.repo_cwd(), timeout_s=args.timeout
        )
        reported = _json_stdout(run) if run.ok else None
        moved = plan["bytes_read"] + plan["bytes_written"]
        bound = self.baseline_rss_anon + plan["expected_peak_host_memory"] + SPARSE_RSS_SLACK_BYTES
        merge = {
            "device": device,
            "num_layers": layers,
            "apparent_checkpoint_bytes": apparent,
            "sink": sink,
            "ok": run.ok,
            "wall_s": run.wall_s,
            "gbps": moved / run.wall_s / 1e9 if run.ok else None,
            "work_s": (reported or {}).get("seconds"),
            "bytes_read": plan["bytes_read"],
            "bytes_written": plan["bytes_written"],
            "peak_rss_anon": run.peak_rss_anon,
            "peak_rss": run.peak_rss,
            "maxrss": run.maxrss,
            "reported_peak_rss_anon": (reported or {}).get("peak_rss_anon"),
            "peak_gpu_memory": (reported or {}).get("peak_gpu_memory"),
            "stage_seconds": (reported or {}).get("stage_seconds"),
            "expected_host_buffers": plan["expected_peak_host_memory"],
            "baseline_rss_anon": self.baseline_rss_anon,
            "rss_anon_bound": bound,
            "within_bound": bool(run.ok and run.peak_rss_anon <= bound),
        }
        if not run.ok:
            merge["error"] = run.stderr_tail()
        elif sink == "disk":
            merge["reference_ok"] = verify.check_reference(*trio, dest, args.alpha, full=False)["ok"]
        tools.clear(dest)
        _log(
            f"sparse {args.sparse_layout} x {layers} layers merged on {device} to {sink}: "
            + (
                f"{run.wall_s:.1f} s, {merge['gbps']:.2f} GB/s, RssAnon {_mb(run.peak_rss_anon)} "
                f"(bound {_mb(bound)}: {'within' if merge['within_bound'] else 'EXCEEDED'}), RSS {_mb(run.peak_rss)}"
                + (f", GPU {_mb(merge['peak_gpu_memory'])}" if merge["peak_gpu_memory"] else "")
                if run.ok
                else f"FAILED: {merge['error'][-300:]}"
            )
        )
        return merge

    # ------------------------------------------------------------------------------------------------ all
    def run(self) -> dict:
        args = self.args
        _log(
            f"benchmarks: sizes {', '.join(args.sizes)}; {args.repeats} repeat(s); cache {'+'.join(self.caches)}; "
            f"tools {', '.join(t.name for t in self.tools)}" + "".join(f"; {k}: {v}" for k, v in self.absent.items())
        )
        sizes = [self.bench_size(label) for label in args.sizes]
        sparse = self.bench_sparse() if args.sparse else None
        self.machine["load_average_at_end"] = list(os.getloadavg())
        return {
            "schema": 1,
            "created": self.stamp,
            "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
            "machine": self.machine,
            "gpu": self.gpu,
            "settings": {
                "sizes": args.sizes,
                "repeats": args.repeats,
                "caches": self.caches,
                "cold": self.cold_note if args.cold else "not requested",
                "alpha": args.alpha,
                "chunk_size": args.chunk_size,
                "threads": args.threads,
                "seed": args.seed,
                "peers": args.peers,
                "full_check": args.full_check,
                "smoke": args.smoke,
                "workdir": str(args.workdir),
            },
            "tools": {t.name: t.description for t in self.tools},
            "absent": self.absent,
            "mergekit": {
                "path": self.mergekit,
                "version": self.mergekit_version,
                "status": "installed" if self.mergekit else "not installed",
                "yaml_bf16": tools.mergekit_yaml("TARGET", "SFT", "GRPO", args.alpha, float32=False),
                "yaml_fp32": tools.mergekit_yaml("TARGET", "SFT", "GRPO", args.alpha, float32=True),
            },
            "sizes": sizes,
            "sparse": sparse,
            "notes": self.notes,
        }


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict], info: TrioInfo, correctness: dict) -> list[dict]:
    """One row per (cache, tool): min/median wall, GB/s, ratio to the floor of the same rounds, peaks, correctness."""
    floor = {(r["cache"], r["repeat"]): r["wall_s"] for r in runs if r["tool"] == "floor" and r["ok"]}
    floor_work = {(r["cache"], r["repeat"]): r["work_s"] for r in runs if r["tool"] == "floor" and r["ok"]}
    rows = []
    keys = dict.fromkeys((r["cache"], r["tool"]) for r in runs)
    for cache, tool in keys:
        mine = [r for r in runs if r["cache"] == cache and r["tool"] == tool]
        ok = [r for r in mine if r["ok"]]
        row: dict = {"size": info.label, "tool": tool, "cache": cache, "runs": len(ok), "failed": len(mine) - len(ok)}
        row["status"] = "ok" if ok else "failed"
        if not ok:
            row["reason"] = mine[-1].get("killed") or f"exit {mine[-1]['returncode']}"
            rows.append(row)
            continue
        walls = [r["wall_s"] for r in ok]
        works = [r["work_s"] for r in ok if r["work_s"] is not None]
        ratios = [r["wall_s"] / floor[(cache, r["repeat"])] for r in ok if (cache, r["repeat"]) in floor]
        work_ratios = [
            r["work_s"] / floor_work[(cache, r["repeat"])]
            for r in ok
            if r["work_s"] is not None and floor_work.get((cache, r["repeat"]))
        ]
        med = statistics.median(walls)
        row.update(
            {
                "checkpoint_bytes": info.checkpoint_bytes,
                "bytes_moved": info.bytes_moved,
                "wall_min_s": min(walls),
                "wall_median_s": med,
                "work_min_s": min(works) if works else None,
                "work_median_s": _median(works),
                "gbps_median": info.bytes_moved / med / 1e9,
                "gbps_best": info.bytes_moved / min(walls) / 1e9,
                "gbps_work_median": info.bytes_moved / statistics.median(works) / 1e9 if works else None,
                "ratio_to_floor_median": _median(ratios),
                "ratio_to_floor_min": min(ratios) if ratios else None,
                "work_ratio_to_floor_median": _median(work_ratios),
                "peak_rss_anon": max(r["peak_rss_anon"] for r in ok),
                "peak_rss": max(r["peak_rss"] for r in ok),
                "maxrss": max(r["maxrss"] for r in ok),
                "peak_gpu_memory": max((r["peak_gpu_memory"] or 0 for r in ok), default=0) or None,
                "cpu_median_s": statistics.median(r["user_s"] + r["sys_s"] for r in ok),
                "sync_after_median_s": statistics.median(r["sync_after_s"] for r in ok),
                "cache_residency_min": min(r["cache_residency_before"] for r in ok),
                "load_median": statistics.median(r["load_before"] for r in ok),
            }
        )
        reported = [(r.get("reported") or {}).get("peak_gpu_memory") for r in ok]
        if any(reported):
            row["peak_gpu_memory"] = max(x for x in reported if x)
        c = correctness.get(tool)
        if c is not None:
            if "sha256_stable" in c:
                row["correct"] = c["ok"]
            else:
                row["correct"] = c.get("identical")
                row["differing_elements"] = c.get("differing_elements")
                row["differing_fraction"] = c.get("differing_fraction")
                row["max_ulps"] = c.get("max_ulps")
                row["max_abs"] = c.get("max_abs")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    results = bench.run()
    paths = report.write_all(results, args.out, args.name)
    _log("results: " + ", ".join(str(p) for p in paths))
    failed = [
        row
        for size in results["sizes"]
        for row in size["summary"]
        if row["tool"].startswith("streammerge") and (row["status"] != "ok" or row.get("correct") is False)
    ]
    if failed:
        _log("streammerge failed or produced wrong bytes: " + ", ".join(f"{r['size']} {r['tool']}" for r in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
