"""``python -m benchmarks.floor``: the hardware's limits on one trio, and streammerge and mergekit against them.

Every round runs each tool once, interleaved, each in its own process (the same rounds for all, because this kind of
machine is shared and its write + fsync time swings 3x from run to run); the minimum over rounds of each is what the
hardware (or the tool) can do, the median is printed beside it.

- I/O floor, two ways: read every input byte (``read`` into one reused buffer), then write the output's byte count
  and fsync it: with sequential ``write`` calls (as dd), and the writer's own way (``posix_fallocate`` to the final
  size, then ``pwrite`` at offsets). ``io_floor`` is the smaller of the two.
- Compute floor, measured in this process on this trio: the contract's math on one core (the CPU engine with one
  compute thread into a sink that neither stores nor hashes: its compute thread-seconds), and SHA-256 on one core
  (over the same number of bytes). On ``k`` cores with ``f`` output files the math and the hashing split over the
  cores, but one file's SHA-256 is one sequential stream: ``compute_floor(k) = max((math + sha) / k, sha / min(k, f))``.
- streammerge (``python -m streammerge merge --json``): wall time with start-up (interpreter, imports, plan) and
  its reported ``seconds`` (the job without start-up); against ``bound = max(io_floor, compute_floor(cores))``.
- mergekit 0.1.5 ``task_arithmetic`` with its default dtype (the checkpoints' bf16), when installed
  (``--mergekit``; a venv as in README "Benchmarks"), in the same rounds.
- SHA-256 throughput with 1..N threads each hashing their own stream (hashlib releases the GIL), and what that gives
  on paper to a 16-core machine whose merge keeps several output files in flight (engines/output.py).

Results: ``<out>/<name>.json`` and ``<out>/<name>.md``; ``--readme`` also rewrites README.md's floor table.

Examples:

    python -m benchmarks.floor --rounds 3 --mergekit /tmp/mkvenv/bin/mergekit-yaml --readme
    python -m benchmarks.floor --size 4MB --rounds 1 --mergekit none --out /tmp/floor-smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from . import machine, tools
from .inputs import TrioInfo, ensure_trio, parse_size
from .monitor import run_monitored

DEFAULT_SIZE = "2GB"
DEFAULT_ROUNDS = 3
DEFAULT_WORKDIR = Path("/tmp/streammerge-bench")
DEFAULT_OUT = machine.REPO_ROOT / "benchmarks" / "results"
README = machine.REPO_ROOT / "README.md"
README_START, README_END = "<!-- floor:start -->", "<!-- floor:end -->"
HASH_BUFFER_BYTES = 64 << 20  # per thread, hashed repeatedly
HASH_BYTES_PER_THREAD = 1 << 30
PAPER_CORES = 16  # the lent GPU machine's cores (docs/hardware.md)
TARGET_FLOOR_RATIO = 1.3
TARGET_MERGEKIT_SPEEDUP = 4.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.floor",
        description="The I/O and compute floors of one trio, with streammerge and mergekit in the same rounds.",
        epilog=__doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", default=DEFAULT_SIZE, help=f"checkpoint size (default {DEFAULT_SIZE})")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help=f"rounds (default {DEFAULT_ROUNDS})")
    p.add_argument("--mergekit", help="path of mergekit-yaml (default: on PATH); 'none' to leave mergekit out")
    p.add_argument("--chunk-size", default="16MiB", help="streammerge --chunk-size (default 16MiB)")
    p.add_argument("--threads", type=int, help="streammerge --threads (default: the engine's own, all cores)")
    p.add_argument("--hash-threads", type=int, help="SHA-256 scaling up to this many threads (default 2 x cores)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--name", default="floor")
    p.add_argument("--readme", action="store_true", help="rewrite README.md's floor table from this run")
    args = p.parse_args(argv)
    parse_size(args.size)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------- compute floor
def math_floor(info: TrioInfo, chunk: str) -> dict:
    """The contract's math on one core over the whole trio: the CPU engine with one compute thread into a sink that
    neither stores nor hashes. Returns its compute thread-seconds and the run's wall."""
    import streammerge
    from streammerge.options import parse_size as parse_option_size

    t = info.trio
    t0 = time.perf_counter()
    r = streammerge.merge(
        str(t.target),
        str(t.sft),
        str(t.grpo),
        str(Path(info.root) / "null-out"),
        device="cpu",
        threads=1,
        sink="null",
        chunk_bytes=parse_option_size(chunk, "chunk"),
    )
    wall = time.perf_counter() - t0
    return {"math_s": r.stage_seconds.get("compute"), "run_s": wall, "stage_seconds": r.stage_seconds}


def sha_floor(nbytes: int) -> float:
    """Seconds SHA-256 takes for ``nbytes`` on one core (one 64 MiB buffer, hashed repeatedly)."""
    buf = os.urandom(1 << 20) * (HASH_BUFFER_BYTES >> 20)
    h = hashlib.sha256()
    left = nbytes
    t0 = time.perf_counter()
    while left > 0:
        n = min(left, len(buf))
        h.update(memoryview(buf)[:n])
        left -= n
    return time.perf_counter() - t0


def hash_scaling(max_threads: int, repeats: int = 3) -> list[dict]:
    """Aggregate SHA-256 throughput with 1..max_threads threads, each hashing its own stream (as the engines hash
    several output files at once): GB/s (best of ``repeats`` passes over 1..max_threads), and per thread."""
    best: dict[int, dict] = {}
    for _ in range(repeats):
        for row in _hash_pass(max_threads):
            k = row["threads"]
            if k not in best or row["seconds"] < best[k]["seconds"]:
                best[k] = row
    return [best[k] for k in sorted(best)]


def _hash_pass(max_threads: int) -> list[dict]:
    buf = os.urandom(1 << 20) * (HASH_BUFFER_BYTES >> 20)
    rows = []
    for k in range(1, max_threads + 1):

        def one() -> None:
            h = hashlib.sha256()
            view = memoryview(buf)
            for _ in range(HASH_BYTES_PER_THREAD // len(buf)):
                h.update(view)

        threads = [threading.Thread(target=one) for _ in range(k)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t0
        gbps = k * HASH_BYTES_PER_THREAD / dt / 1e9
        rows.append(
            {"threads": k, "seconds": dt, "gbps": gbps, "gbps_per_thread": gbps / k, "load": os.getloadavg()[0]}
        )
        _log(f"  SHA-256 x {k} thread(s): {gbps:.2f} GB/s ({gbps / k:.2f} per thread)")
    return rows


# ---------------------------------------------------------------------------------------------- one round
def _floor_argv(info: TrioInfo, out: Path, method: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.workers",
        "floor",
        "--method",
        method,
        "--out-file",
        str(out / f"floor-{method}.bin"),
        "--out-bytes",
        str(info.bytes_out),
        *info.files,
    ]


def _json(text: str) -> dict | None:
    text = text.strip()
    start = text.rfind("\n{")
    try:
        return json.loads(text if start < 0 else text[start + 1 :])
    except json.JSONDecodeError:
        return None


def run_round(args, info: TrioInfo, rnd: int, mergekit: str | None, logs: Path) -> list[dict]:
    out = args.workdir / "out" / f"floor-{info.label}"
    out.mkdir(parents=True, exist_ok=True)
    t = info.trio
    sm_out = out / "streammerge"
    sm = [sys.executable, "-m", "streammerge", "merge", str(t.target), str(t.sft), str(t.grpo), "-o", str(sm_out)]
    sm += ["--json", "--quiet", "--chunk-size", args.chunk_size] + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    runs: list[tuple[str, list[str], Path | None]] = [
        ("io-floor-write", _floor_argv(info, out, "write"), None),
        ("io-floor-pwrite", _floor_argv(info, out, "pwrite"), None),
        ("streammerge", sm, sm_out),
    ]
    if mergekit:
        ctx = tools.Context(info, out / "mergekit", args.workdir / "configs", 1.0, args.chunk_size, None, mergekit)
        runs.append(("mergekit-bf16", tools.MERGEKIT_BF16.build(ctx), out / "mergekit"))
    # a different order each round, so no tool always follows the same one (page-cache and write-back state)
    k = rnd % len(runs)
    runs = runs[k:] + runs[:k]
    recs = []
    for name, argv, dest in runs:
        if dest is not None:
            tools.clear(dest)
        if machine.cache_residency(info.files) < 0.99:
            machine.warm(info.files)
        residency = machine.cache_residency(info.files)
        env = dict(tools.OFFLINE_ENV) if name.startswith("mergekit") else {}
        pr = run_monitored(argv, logs, f"{name}-{rnd}", cwd=tools.repo_cwd(), env=env, timeout_s=3600)
        t0 = time.perf_counter()
        os.sync()  # mergekit does not fsync: what it left dirty is flushed here, outside its wall time
        sync_s = time.perf_counter() - t0
        rep = _json(pr.stdout_text()) if pr.ok else None
        rec = {
            "tool": name,
            "round": rnd,
            "ok": pr.ok,
            "wall_s": pr.wall_s,
            "user_s": pr.user_s,
            "sys_s": pr.sys_s,
            "peak_rss_anon": pr.peak_rss_anon,
            "cache_residency_before": residency,
            "load_before": machine.load_average(),
            "sync_after_s": sync_s,
            "reported": rep,
            "work_s": (rep or {}).get("seconds"),
        }
        if name == "streammerge" and rep:
            rec["stage_seconds"] = rep.get("stage_seconds")
            rec["sha256"] = rep.get("shard_sha256")
        if not pr.ok:
            rec["stderr_tail"] = pr.stderr_tail()
        _log(
            f"[round {rnd + 1}] {name:<16} {'ok' if pr.ok else 'FAILED'} {pr.wall_s:7.2f} s"
            + (f" (work {rec['work_s']:.2f} s)" if rec["work_s"] else "")
            + f"  cpu {pr.user_s + pr.sys_s:.2f} s  load {rec['load_before']:.1f}"
        )
        if dest is not None and name != "streammerge":
            tools.clear(dest)
        recs.append(rec)
    return recs


# ---------------------------------------------------------------------------------------------- summary
def summarize(runs: list[dict], compute: dict, info: TrioInfo, n_cores: int, files_out: int) -> dict:
    def walls(tool: str, key: str = "wall_s") -> list[float]:
        return [r[key] for r in runs if r["tool"] == tool and r["ok"] and r.get(key) is not None]

    s: dict = {}
    for tool in dict.fromkeys(r["tool"] for r in runs):
        w = walls(tool)
        s[tool] = {"min_s": min(w) if w else None, "median_s": statistics.median(w) if w else None, "runs": len(w)}
        works = walls(tool, "work_s")
        if works:
            s[tool]["work_min_s"] = min(works)
            s[tool]["work_median_s"] = statistics.median(works)
    io = [x for x in (s.get("io-floor-write", {}).get("min_s"), s.get("io-floor-pwrite", {}).get("min_s")) if x]
    io_floor = min(io) if io else None
    math_s, sha_s = compute["math_s"], compute["sha_s"]

    def cfloor(k: int) -> float:
        return max((math_s + sha_s) / k, sha_s / min(k, max(1, files_out)))

    bound = max(io_floor or 0.0, cfloor(n_cores))
    sm = s.get("streammerge", {})
    mk = s.get("mergekit-bf16", {})
    res = {
        "io_floor_s": io_floor,
        "io_floor_pwrite_s": s.get("io-floor-pwrite", {}).get("min_s"),
        "compute_floor_1core_s": cfloor(1),
        "compute_floor_s": cfloor(n_cores),
        "bound_s": bound,
        "tools": s,
    }
    if sm.get("min_s") and io_floor:
        res["streammerge_vs_io_floor"] = sm["min_s"] / io_floor
        res["streammerge_work_vs_io_floor"] = sm.get("work_min_s", 0) / io_floor if sm.get("work_min_s") else None
        res["streammerge_vs_bound"] = sm["min_s"] / bound
        res["streammerge_work_vs_bound"] = sm.get("work_min_s", 0) / bound if sm.get("work_min_s") else None
    if sm.get("min_s") and mk.get("min_s"):
        res["speedup_vs_mergekit"] = mk["min_s"] / sm["min_s"]
    # the same ratios within each round (tools moments apart), median over rounds: less exposed to a noisy round
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["ok"]:
            by_round.setdefault(r["round"], {})[r["tool"]] = r["wall_s"]
    floor_r, mk_r = [], []
    for w in by_round.values():
        io_r = min([w[k] for k in ("io-floor-write", "io-floor-pwrite") if k in w] or [0.0])
        if "streammerge" in w and io_r:
            floor_r.append(w["streammerge"] / io_r)
        if "streammerge" in w and "mergekit-bf16" in w:
            mk_r.append(w["mergekit-bf16"] / w["streammerge"])
    res["per_round_vs_io_floor"] = floor_r
    res["per_round_speedup_vs_mergekit"] = mk_r
    return res


def markdown(results: dict) -> str:
    m, s, c = results["machine"], results["summary"], results["compute"]
    info = results["trio"]
    lines = [
        f"`{results['command']}` — {results['created']}, git {str(m.get('git', {}).get('commit', '?'))[:10]}",
        "",
        f"**Machine:** {m.get('cpu_model', '?')}, {results['cores']} cores, "
        f"{(m.get('mem_total') or 0) / 2**30:.1f} GiB RAM; Python {m.get('python', '?')}, torch "
        f"{m.get('versions', {}).get('torch', '?')}; mergekit {results.get('mergekit_version') or 'not installed'}. "
        f"Trio: {info['layout']} x {info['num_layers']} layers, {info['checkpoint_bytes'] / 1e9:.2f} GB per "
        f"checkpoint, {info['bytes_in'] / 1e9:.2f} GB read, {info['bytes_out'] / 1e9:.2f} GB written, page cache warm "
        f"(inputs re-read before a run when less than 99% cached). {results['rounds']} interleaved rounds: minimum "
        "(median) wall per tool.",
        "",
        "| what | seconds, min (median) | × I/O floor | × bound |",
        "|---|---|---|---|",
    ]
    io, bound = s["io_floor_s"], s["bound_s"]

    def ratio(x, y):
        return f"{x / y:.2f}" if x and y else "-"

    for tool, label in (
        ("io-floor-write", "I/O floor: read inputs + write + fsync (write, as dd)"),
        ("io-floor-pwrite", "I/O floor, the writer's way: posix_fallocate + pwrite + fsync"),
    ):
        t = s["tools"].get(tool, {})
        if t.get("min_s"):
            lines.append(f"| {label} | {t['min_s']:.2f} ({t['median_s']:.2f}) | {ratio(t['min_s'], io)} | |")
    lines.append(
        f"| compute floor, 1 core: math {c['math_s']:.2f} + SHA-256 {c['sha_s']:.2f} | "
        f"{s['compute_floor_1core_s']:.2f} | {ratio(s['compute_floor_1core_s'], io)} | |"
    )
    lines.append(
        f"| compute floor, {results['cores']} cores (one SHA-256 stream per output file, {results['files_out']} "
        f"file(s)) | {s['compute_floor_s']:.2f} | {ratio(s['compute_floor_s'], io)} | |"
    )
    lines.append(
        f"| **bound** = max(I/O floor, compute floor on {results['cores']} cores) | {bound:.2f} | "
        f"{ratio(bound, io)} | 1.00 |"
    )
    sm = s["tools"].get("streammerge", {})
    if sm.get("min_s"):
        lines.append(
            f"| streammerge merge, start-up included | {sm['min_s']:.2f} ({sm['median_s']:.2f}) | "
            f"{ratio(sm['min_s'], io)} | {ratio(sm['min_s'], bound)} |"
        )
        if sm.get("work_min_s"):
            lines.append(
                f"| streammerge merge, start-up excluded (its reported seconds) | {sm['work_min_s']:.2f} "
                f"({sm['work_median_s']:.2f}) | {ratio(sm['work_min_s'], io)} | {ratio(sm['work_min_s'], bound)} |"
            )
    mk = s["tools"].get("mergekit-bf16", {})
    if mk.get("min_s"):
        lines.append(
            f"| mergekit task_arithmetic, default dtype (bf16) | {mk['min_s']:.2f} ({mk['median_s']:.2f}) | "
            f"{ratio(mk['min_s'], io)} | {ratio(mk['min_s'], bound)} |"
        )
    lines.append("")
    lines.append("| target | measured | met |")
    lines.append("|---|---|---|")
    if s.get("streammerge_vs_io_floor"):
        r = s["streammerge_vs_io_floor"]
        lines.append(
            f"| end to end ≤ {TARGET_FLOOR_RATIO}× the I/O floor | {r:.2f}× (start-up excluded "
            f"{s['streammerge_work_vs_io_floor']:.2f}×) | {'yes' if r <= TARGET_FLOOR_RATIO else '**no**'} |"
        )
    if s.get("speedup_vs_mergekit"):
        r = s["speedup_vs_mergekit"]
        lines.append(
            f"| ≥ {TARGET_MERGEKIT_SPEEDUP:g}× faster than mergekit (default) | {r:.2f}× | "
            f"{'yes' if r >= TARGET_MERGEKIT_SPEEDUP else '**no**'} |"
        )
    if s.get("per_round_vs_io_floor") or s.get("per_round_speedup_vs_mergekit"):
        fr, mr = s.get("per_round_vs_io_floor") or [], s.get("per_round_speedup_vs_mergekit") or []
        lines.append(
            "| (within each round: streammerge / that round's I/O floor; mergekit / streammerge) | "
            + ", ".join(f"{x:.2f}×" for x in fr)
            + "; "
            + ", ".join(f"{x:.2f}×" for x in mr)
            + " | |"
        )
    hs = results["hash_scaling"]
    lines += [
        "",
        f"SHA-256, each thread hashing its own stream (as several output files in flight), best of 3 passes; "
        f"{results['cores']} cores, so more threads than that share them:",
        "",
    ]
    lines.append("| threads | " + " | ".join(str(r["threads"]) for r in hs) + " |")
    lines.append("|---|" + "---|" * len(hs))
    lines.append("| GB/s | " + " | ".join(f"{r['gbps']:.2f}" for r in hs) + " |")
    lines.append("| GB/s per thread | " + " | ".join(f"{r['gbps_per_thread']:.2f}" for r in hs) + " |")
    # one core's rate: the best of the scaling run's one thread and the compute floor's SHA-256 runs
    one = max(hs[0]["gbps"], info["bytes_out"] / c["sha_s"] / 1e9)
    lines += [
        "",
        f"On paper, a {PAPER_CORES}-core GPU machine at this machine's {one:.2f} GB/s per core: one hash stream caps "
        f"a merge's output at ~{one:.1f} GB/s (~{4 * one:.0f} GB/s of bytes moved, 3 in + 1 out), whatever the GPU. "
        f"With k output files in flight, k streams on k free cores hash ~k x {one:.1f} GB/s (SHA-256 is compute-bound, "
        f"no shared state): {PAPER_CORES} files give ~{PAPER_CORES * one:.0f} GB/s of output; the device pipeline's "
        f"~17 GB/s of output (67-70 GB/s moved, docs/hardware.md) needs ~{17 / one:.0f} files in flight, which the "
        "CUDA engine sizes from the measured rate (`output.hash_files_for`), capped at one per core and per file. A "
        "one-file output still hashes on one core.",
    ]
    return "\n".join(lines) + "\n"


def write_readme(md: str) -> bool:
    text = README.read_text()
    if README_START not in text or README_END not in text:
        return False
    a = text.index(README_START) + len(README_START)
    b = text.index(README_END)
    README.write_text(text[:a] + "\n" + md + text[b:])
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    info = ensure_trio(args.workdir, args.size)
    logs = args.workdir / "logs" / f"floor-{stamp}"
    mergekit = tools.find_mergekit(args.mergekit)
    n_cores = cores()
    import streammerge

    plan = streammerge.plan(str(info.trio.target), str(info.trio.sft), str(info.trio.grpo)).summary()
    files_out = len(plan["output_files"])
    _log(f"trio {info.label}: {info.layout} x {info.num_layers}, {files_out} output file(s); {n_cores} cores")
    runs: list[dict] = []
    compute_rounds = []
    for rnd in range(args.rounds):
        runs += run_round(args, info, rnd, mergekit, logs)
        mf = math_floor(info, args.chunk_size)
        compute_rounds.append({**mf, "sha_s": sha_floor(info.bytes_out)})
        _log(f"[round {rnd + 1}] compute floor: math {mf['math_s']:.2f} s, SHA-256 {compute_rounds[-1]['sha_s']:.2f} s")
    compute = {
        "math_s": min(r["math_s"] for r in compute_rounds),
        "sha_s": min(r["sha_s"] for r in compute_rounds),
        "rounds": compute_rounds,
    }
    hs = hash_scaling(args.hash_threads or 2 * n_cores)
    results = {
        "schema": 1,
        "created": stamp,
        "command": "python -m benchmarks.floor " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine.machine_info(args.workdir),
        "cores": n_cores,
        "rounds": args.rounds,
        "trio": {k: v for k, v in info.__dict__.items() if k not in ("files", "trio")},
        "files_out": files_out,
        "mergekit": mergekit,
        "mergekit_version": tools.mergekit_version(mergekit) if mergekit else None,
        "runs": runs,
        "compute": compute,
        "hash_scaling": hs,
    }
    results["summary"] = summarize(runs, compute, info, n_cores, files_out)
    md = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / f"{args.name}.md").write_text("# streammerge against the hardware's floor\n\n" + md)
    _log(md)
    if args.readme and not write_readme(md):
        _log("README.md has no floor markers; table not written")
    sha = {json.dumps(r.get("sha256"), sort_keys=True) for r in runs if r["tool"] == "streammerge" and r["ok"]}
    return 0 if len(sha) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
