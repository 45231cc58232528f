"""One alpha sweep against separate merges: what reading each input once saves (issue 6.8).

For each mode and round:

- ``streammerge merge T S G -o OUT --alpha A1,A2,...`` (one pass, one output per alpha);
- the same alphas as separate ``streammerge merge ... --alpha Ai`` runs, one after the other.

Modes: ``warm-disk`` (inputs in the page cache before every command, outputs to disk), ``warm-null`` (the same with
``--sink null-sha256``: read + compute + hash, no disk writes) and ``cold-disk`` (page cache dropped before every
command: each separate run reads every input from the disk again; needs root).

Every output's SHA-256 from the sweep must equal the separate run's (a mismatch fails the benchmark). Reported per
round: wall time of each command (interpreter start-up included), input bytes read (from streammerge's own report),
peak RssAnon of the process tree, page-cache residency of the inputs before each command and the load average.
Outputs are deleted after each round, so disk use is one size's outputs at a time.

    python -m benchmarks.sweep --size 2GB --alphas 0.5,1,1.5 --repeats 2 --modes warm-disk,warm-null,cold-disk
    python -m benchmarks.sweep --smoke            # tiny trio, one round: the harness itself, in seconds
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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _merge_argv(info: inputs.TrioInfo, out: Path, alphas: str, args, mode: str) -> list[str]:
    t = info.trio
    argv = [sys.executable, "-m", "streammerge", "merge", str(t.target), str(t.sft), str(t.grpo), "-o", str(out)]
    argv += ["--alpha", alphas, "--device", args.device, "--chunk-size", args.chunk_size, "--json", "--quiet"]
    if mode.endswith("null"):
        argv += ["--sink", "null-sha256"]
    return argv


def _run(info, argv, logs: Path, name: str, args, mode: str) -> dict:
    warm_s = None
    if mode.startswith("cold"):
        ok, why = machine.drop_caches()
        if not ok:
            raise SystemExit(f"cold mode needs to drop the page cache: {why}")
    elif machine.cache_residency(info.files) < 0.99:
        warm_s = machine.warm(info.files)
    residency = machine.cache_residency(info.files)
    load = machine.load_average()
    pr = run_monitored(argv, logs, name, cwd=tools.repo_cwd(), timeout_s=args.timeout)
    if not pr.ok:
        raise SystemExit(f"{name} failed ({pr.killed or pr.returncode}): {pr.stderr_tail()}")
    reported = json.loads(pr.stdout_text())
    reports = reported if isinstance(reported, list) else [reported]
    rec = {
        "name": name,
        "mode": mode,
        "wall_s": pr.wall_s,
        "peak_rss_anon": pr.peak_rss_anon,
        "cache_residency_before": residency,
        "warmed_s": warm_s,
        "load_before": load,
        "bytes_read": reports[0]["bytes_read"],
        "bytes_written": sum(r["bytes_written"] for r in reports),
        "outputs": {Path(r["out_dir"]).name: r["shard_sha256"] for r in reports},
        "argv": pr.argv,
    }
    _log(
        f"  {name:<24} {pr.wall_s:7.2f} s  read {rec['bytes_read'] / 1e9:6.2f} GB  "
        f"RssAnon {pr.peak_rss_anon / 1e6:6.0f} MB  cache {residency:.0%}  load {load:.1f}"
    )
    return rec


def _walls(runs: list[dict]) -> str:
    return " + ".join(f"{x['wall_s']:.2f}" for x in runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2GB", help="checkpoint size (default 2GB)")
    p.add_argument("--alphas", default="0.5,1,1.5", help="the sweep (default 0.5,1,1.5)")
    p.add_argument("--repeats", type=int, default=2, help="rounds (default 2)")
    p.add_argument("--device", default="cpu", help="streammerge --device (default cpu)")
    p.add_argument("--modes", default="warm-disk,warm-null", help="warm-disk, warm-null, cold-disk (comma-separated)")
    p.add_argument("--chunk-size", default="16MiB")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--name", help="results file stem (default 'sweep'; smoke 'sweep-smoke')")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="a 4MB trio, one round")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.repeats = "4MB", 1
    name = args.name or ("sweep-smoke" if args.smoke else "sweep")
    from streammerge.api import parse_alphas, sweep_dirname

    alphas = parse_alphas(args.alphas)
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = inputs.ensure_trio(args.workdir, args.size)
    logs = args.workdir / "logs" / "sweep"
    info_machine = machine.machine_info(args.workdir)
    _log(f"sweep benchmark: {info.label} trio ({info.layout}, {info.bytes_in / 1e9:.2f} GB of inputs), alphas {alphas}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("warm-disk", "warm-null", "cold-disk")]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}")
    rounds = []
    for mode in modes:
        for rep in range(args.repeats):
            out_root = args.workdir / "sweep-out"
            shutil.rmtree(out_root, ignore_errors=True)
            _log(f"{mode} round {rep + 1}/{args.repeats}")
            argv_sw = _merge_argv(info, out_root / "sweep", args.alphas, args, mode)
            sweep = _run(info, argv_sw, logs, f"{mode}-sweep-{rep}", args, mode)
            shutil.rmtree(out_root / "sweep", ignore_errors=True)
            separate = []
            for a in alphas:
                out = out_root / sweep_dirname(a)
                argv_one = _merge_argv(info, out, repr(a), args, mode)
                separate.append(_run(info, argv_one, logs, f"{mode}-single-{a}-{rep}", args, mode))
                shutil.rmtree(out, ignore_errors=True)
            mismatched = [
                sweep_dirname(a)
                for a, s in zip(alphas, separate)
                if sweep["outputs"][sweep_dirname(a)] != next(iter(s["outputs"].values()))
            ]
            if mismatched:
                raise SystemExit(f"sweep output differs from the separate merge for {mismatched}")
            rounds.append({"mode": mode, "sweep": sweep, "separate": separate, "identical": True})
    summary = {"size": info.label, "alphas": alphas, "modes": {}}
    for mode in modes:
        rs = [r for r in rounds if r["mode"] == mode]
        sweep_walls = [r["sweep"]["wall_s"] for r in rs]
        sep_walls = [sum(s["wall_s"] for s in r["separate"]) for r in rs]
        summary["modes"][mode] = {
            "sweep_wall_s_median": statistics.median(sweep_walls),
            "separate_wall_s_median": statistics.median(sep_walls),
            "speedup_median": statistics.median(s / w for s, w in zip(sep_walls, sweep_walls)),
            "sweep_bytes_read": rs[0]["sweep"]["bytes_read"],
            "separate_bytes_read": sum(s["bytes_read"] for s in rs[0]["separate"]),
            "sweep_peak_rss_anon_max": max(r["sweep"]["peak_rss_anon"] for r in rs),
            "separate_peak_rss_anon_max": max(s["peak_rss_anon"] for r in rs for s in r["separate"]),
            "outputs_identical": all(r["identical"] for r in rs),
        }
    result = {
        "benchmark": "sweep",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m benchmarks.sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
        "page_cache": "warm modes: inputs read into the page cache before every command; cold: page cache dropped "
        "before every command (residency recorded per run)",
        "machine": info_machine,
        "trio": info.to_dict(),
        "summary": summary,
        "rounds": rounds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Alpha sweep vs separate merges ({info.label} per checkpoint, {len(alphas)} alphas)",
        "",
        f"Machine: {info_machine['cores']} cores, {info_machine['mem_total'] / 2**30:.0f} GiB, "
        f"torch {info_machine['versions'].get('torch')}, streammerge {info_machine['versions'].get('streammerge')}; "
        f"device {args.device}; `{result['command']}`. Walls include interpreter start-up (~2.5 s per command here).",
        "",
        "| mode | round | sweep (1 pass) | separate runs | saving |",
        "|---|---|---|---|---|",
    ]
    for mode in modes:
        rs = [r for r in rounds if r["mode"] == mode]
        for i, r in enumerate(rs):
            w = r["sweep"]["wall_s"]
            sep = sum(x["wall_s"] for x in r["separate"])
            md.append(f"| {mode} | {i + 1} | {w:.2f} s | {sep:.2f} s ({_walls(r['separate'])}) | {sep / w:.2f}x |")
    md.append("")
    for mode, m in summary["modes"].items():
        md.append(
            f"- {mode}: input bytes read: sweep {m['sweep_bytes_read'] / 1e9:.2f} GB, separate "
            f"{m['separate_bytes_read'] / 1e9:.2f} GB; peak RssAnon: sweep {m['sweep_peak_rss_anon_max'] / 1e6:.0f} MB,"
            f" separate {m['separate_peak_rss_anon_max'] / 1e6:.0f} MB."
        )
    md += ["", "Every sweep output's SHA-256 equals its separate merge's (checked in every round).", ""]
    (args.out / f"{name}.md").write_text("\n".join(md))
    _log("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
