"""One merge on 1 process against 2 torchrun ranks on this machine, to the null sink and to disk (issue 13.7).

For each sink and round: ``streammerge merge T S G -o OUT`` as one process, then the same command under
``torchrun --standalone --nproc-per-node 2``. Inputs are read into the page cache before every command. Reported: wall
time (interpreter start-up and torchrun's rendezvous included), the in-process seconds and peak RssAnon of each rank
(from each rank's own report), and every output file's SHA-256, which must be the same for both (a mismatch fails the
benchmark). What the numbers mean for a 671B FP8 merge on many nodes is worked out on paper in README "Distributed
merges".

    python -m benchmarks.distributed --size 2GB --repeats 2
    python -m benchmarks.distributed --smoke          # tiny trio, one round: the harness itself
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from . import inputs, machine, tools
from .monitor import run_monitored

DEFAULT_WORKDIR = Path("/tmp/streammerge-bench")
RESULTS = Path(__file__).resolve().parent / "results"
SINKS = ("null-sha256", "disk")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _argv(info: inputs.TrioInfo, out: Path, ranks: int, sink: str, args, logs: Path) -> list[str]:
    t = info.trio
    cmd = [sys.executable, "-m", "streammerge"]
    if ranks > 1:
        # each rank's stdout to its own file: two JSON reports on one stream could interleave
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        cmd += ["--log-dir", str(logs), "--redirects", "1", "-m", "streammerge"]
    cmd += ["merge", str(t.target), str(t.sft), str(t.grpo), "-o", str(out), "--device", "cpu", "--json", "--quiet"]
    cmd += ["--chunk-size", args.chunk_size, "--max-shard-size", args.max_shard_size]
    return cmd + (["--sink", sink] if sink != "disk" else [])


def _reports(pr, ranks: int, logs: Path) -> list[dict]:
    if ranks == 1:
        return [json.loads(pr.stdout_text())]
    found = sorted(logs.rglob("stdout.log"))
    if len(found) != ranks:
        raise SystemExit(f"expected {ranks} rank logs under {logs}, found {len(found)}")
    return [json.loads(p.read_text()) for p in found]


def _run(info, ranks: int, sink: str, rep: int, args, logdir: Path) -> dict:
    out = args.workdir / "dist-out"
    shutil.rmtree(out, ignore_errors=True)
    if machine.cache_residency(info.files) < 0.99:
        machine.warm(info.files)
    name = f"{sink}-{ranks}rank-{rep}"
    rank_logs = logdir / name
    shutil.rmtree(rank_logs, ignore_errors=True)
    load = machine.load_average()
    pr = run_monitored(
        _argv(info, out, ranks, sink, args, rank_logs), logdir, name, cwd=tools.repo_cwd(), timeout_s=args.timeout
    )
    if not pr.ok:
        raise SystemExit(f"{name} failed ({pr.killed or pr.returncode}): {pr.stderr_tail()}")
    reports = _reports(pr, ranks, rank_logs)
    shards: dict[str, str] = {}
    for r in reports:
        shards.update(r["shard_sha256"])
    rec = {
        "name": name,
        "ranks": ranks,
        "sink": sink,
        "wall_s": pr.wall_s,
        "in_process_s": [r["seconds"] for r in reports],
        "peak_rss_anon_per_rank": [r["peak_rss_anon"] for r in reports],
        "peak_rss_anon_tree": pr.peak_rss_anon,
        "bytes_read": sum(r["bytes_read"] for r in reports),
        "bytes_written": sum(r["bytes_written"] for r in reports),
        "load_before": load,
        "shard_sha256": shards,
        "argv": pr.argv,
    }
    _log(
        f"  {name:<22} {pr.wall_s:7.2f} s  in-process {max(rec['in_process_s']):6.2f} s  "
        f"RssAnon/rank {max(rec['peak_rss_anon_per_rank']) / 1e6:5.0f} MB  load {load:.1f}"
    )
    shutil.rmtree(out, ignore_errors=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2GB", help="checkpoint size (default 2GB)")
    p.add_argument("--repeats", type=int, default=2, help="rounds (default 2)")
    p.add_argument("--sinks", default=",".join(SINKS), help="null-sha256, disk (comma-separated)")
    p.add_argument("--chunk-size", default="16MiB")
    p.add_argument("--max-shard-size", default="500MB", help="output shard size: the unit of work of a rank")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--name", help="results file stem (default 'distributed'; smoke 'distributed-smoke')")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="a 4MB trio, one round")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.repeats, args.max_shard_size = "4MB", 1, "1MB"
    name = args.name or ("distributed-smoke" if args.smoke else "distributed")
    sinks = [s.strip() for s in args.sinks.split(",") if s.strip()]
    if [s for s in sinks if s not in SINKS]:
        raise SystemExit(f"unknown sink(s) in {sinks}; use {', '.join(SINKS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = inputs.ensure_trio(args.workdir, args.size)
    logdir = args.workdir / "logs" / "distributed"
    info_machine = machine.machine_info(args.workdir)
    _log(f"distributed benchmark: {info.label} trio ({info.bytes_in / 1e9:.2f} GB of inputs), 1 vs 2 ranks")
    runs = []
    for sink in sinks:
        for rep in range(args.repeats):
            one = _run(info, 1, sink, rep, args, logdir)
            two = _run(info, 2, sink, rep, args, logdir)
            if one["shard_sha256"] != two["shard_sha256"]:
                raise SystemExit(f"{sink}: the 2-rank output differs from the single process's")
            runs += [one, two]
    summary = {}
    for sink in sinks:
        for ranks in (1, 2):
            rs = [r for r in runs if r["sink"] == sink and r["ranks"] == ranks]
            summary[f"{sink}/{ranks}"] = {
                "wall_s_min": min(r["wall_s"] for r in rs),
                "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                "in_process_s_median": statistics.median(max(r["in_process_s"]) for r in rs),
                "gbps_median": statistics.median(
                    (r["bytes_read"] + r["bytes_written"]) / r["wall_s"] / 1e9 for r in rs
                ),
                "peak_rss_anon_per_rank_max": max(max(r["peak_rss_anon_per_rank"]) for r in rs),
            }
    result = {
        "benchmark": "distributed",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m benchmarks.distributed " + " ".join(argv if argv is not None else sys.argv[1:]),
        "page_cache": "inputs read into the page cache before every command",
        "machine": info_machine,
        "trio": info.to_dict(),
        "summary": summary,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# One merge, 1 process vs 2 torchrun ranks ({info.label} per checkpoint)",
        "",
        f"Machine: {info_machine['cores']} cores, {info_machine['mem_total'] / 2**30:.0f} GiB, "
        f"torch {info_machine['versions'].get('torch')}; `{result['command']}`; warm page cache. Walls include "
        "interpreter start-up (and for 2 ranks torchrun's rendezvous).",
        "",
        "| sink | ranks | wall min / median (s) | in-process (s) | GB/s | peak RssAnon per rank |",
        "|---|---|---|---|---|---|",
    ]
    for key, m in summary.items():
        sink, ranks = key.split("/")
        md.append(
            f"| {sink} | {ranks} | {m['wall_s_min']:.2f} / {m['wall_s_median']:.2f} | {m['in_process_s_median']:.2f} "
            f"| {m['gbps_median']:.2f} | {m['peak_rss_anon_per_rank_max'] / 1e6:.0f} MB |"
        )
    md += ["", "Every 2-rank output's SHA-256s equal the single process's (checked in every round).", ""]
    (args.out / f"{name}.md").write_text("\n".join(md))
    _log("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
