"""One alpha sweep against separate merges: what reading each input once saves (issue 6.8).

For each round (warm page cache, inputs re-warmed before every command):

- ``streammerge merge T S G -o OUT --alpha A1,A2,...`` (one pass, one output per alpha);
- the same alphas as separate ``streammerge merge ... --alpha Ai`` runs, one after the other.

Every output's SHA-256 from the sweep must equal the separate run's (a mismatch fails the benchmark). Reported per
round: wall time of each command (interpreter start-up included), input bytes read (from streammerge's own report),
peak RssAnon of the process tree, page-cache residency of the inputs before each command and the load average.
Outputs are deleted after each round, so disk use is one size's outputs at a time.

    python -m benchmarks.sweep --size 2GB --alphas 0.5,1,1.5 --repeats 2
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


def _merge_argv(info: inputs.TrioInfo, out: Path, alphas: str, args) -> list[str]:
    t = info.trio
    argv = [sys.executable, "-m", "streammerge", "merge", str(t.target), str(t.sft), str(t.grpo), "-o", str(out)]
    argv += ["--alpha", alphas, "--device", args.device, "--chunk-size", args.chunk_size, "--json", "--quiet"]
    return argv


def _run(info, argv, logs: Path, name: str, args) -> dict:
    warm_s = None
    if machine.cache_residency(info.files) < 0.99:
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
    p.add_argument("--chunk-size", default="16MiB")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--name", help="results file stem (default 'sweep'; smoke 'sweep-smoke')")
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
    rounds = []
    for rep in range(args.repeats):
        out_root = args.workdir / "sweep-out"
        shutil.rmtree(out_root, ignore_errors=True)
        _log(f"round {rep + 1}/{args.repeats}")
        sweep = _run(info, _merge_argv(info, out_root / "sweep", args.alphas, args), logs, f"sweep-{rep}", args)
        shutil.rmtree(out_root / "sweep")
        separate = []
        for a in alphas:
            out = out_root / sweep_dirname(a)
            separate.append(_run(info, _merge_argv(info, out, repr(a), args), logs, f"single-{a}-{rep}", args))
            shutil.rmtree(out)
        mismatched = [
            sweep_dirname(a)
            for a, s in zip(alphas, separate)
            if sweep["outputs"][sweep_dirname(a)] != next(iter(s["outputs"].values()))
        ]
        if mismatched:
            raise SystemExit(f"sweep output differs from the separate merge for {mismatched}")
        rounds.append({"sweep": sweep, "separate": separate, "identical": True})
    sweep_walls = [r["sweep"]["wall_s"] for r in rounds]
    sep_walls = [sum(s["wall_s"] for s in r["separate"]) for r in rounds]
    summary = {
        "size": info.label,
        "alphas": alphas,
        "sweep_wall_s_median": statistics.median(sweep_walls),
        "separate_wall_s_median": statistics.median(sep_walls),
        "speedup": statistics.median(s / w for s, w in zip(sep_walls, sweep_walls)),
        "sweep_bytes_read": rounds[0]["sweep"]["bytes_read"],
        "separate_bytes_read": sum(s["bytes_read"] for s in rounds[0]["separate"]),
        "sweep_peak_rss_anon_max": max(r["sweep"]["peak_rss_anon"] for r in rounds),
        "separate_peak_rss_anon_max": max(s["peak_rss_anon"] for r in rounds for s in r["separate"]),
        "outputs_identical": all(r["identical"] for r in rounds),
    }
    result = {
        "benchmark": "sweep",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m benchmarks.sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
        "page_cache": "warm: inputs read into the page cache before every command (residency recorded per run)",
        "machine": info_machine,
        "trio": info.to_dict(),
        "summary": summary,
        "rounds": rounds,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Alpha sweep vs separate merges ({info.label} per checkpoint, {len(alphas)} alphas)",
        "",
        f"Machine: {info_machine['cores']} cores, {info_machine['mem_total'] / 2**30:.0f} GiB, "
        f"torch {info_machine['versions'].get('torch')}, streammerge {info_machine['versions'].get('streammerge')}; "
        f"warm page cache; device {args.device}; `{result['command']}`",
        "",
        "| round | sweep (1 pass) | separate runs | saving |",
        "|---|---|---|---|",
        *[
            f"| {i + 1} | {w:.2f} s | {s:.2f} s ({_walls(r['separate'])}) | {s / w:.2f}x |"
            for i, (r, w, s) in enumerate(zip(rounds, sweep_walls, sep_walls))
        ],
        "",
        f"Input bytes read: sweep {summary['sweep_bytes_read'] / 1e9:.2f} GB, separate "
        f"{summary['separate_bytes_read'] / 1e9:.2f} GB. Peak RssAnon: sweep "
        f"{summary['sweep_peak_rss_anon_max'] / 1e6:.0f} MB, separate "
        f"{summary['separate_peak_rss_anon_max'] / 1e6:.0f} MB. "
        "Every sweep output's SHA-256 equals its separate merge's.",
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    _log("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
