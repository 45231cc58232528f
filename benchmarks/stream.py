"""Download-then-merge against ``merge --stream`` from a local Hub at a throttled link rate (issue 14, item 5).

A synthetic BF16 trio (``streammerge.synth``, a Qwen2.5-0.5B-shaped layout with a smaller vocabulary so that no one
tensor dominates a shard; the three checkpoints sharded differently, ~6 shards each by default) is served by
[`benchmarks.hub_server.HubServer`] as ``bench/target``, ``bench/sft`` and ``bench/grpo``, through one token bucket
of ``--rate-mbps`` MB/s shared by every connection (a link of that rate). In interleaved rounds (the order rotated
each round, a fresh ``HF_HOME`` for every command so nothing is cached), each as ``python -m streammerge merge ...
--json`` in its own monitored process:

- ``local``: the same merge from the local folders (page cache warm): the merge alone, no download;
- ``download-then-merge``: Hub ids without ``--stream`` (``snapshot_download`` of each input into the HF cache,
  then the merge);
- ``stream``: ``--stream`` with the default ``--stream-disk`` (no refetch plus a few shards ahead);
- ``stream-tight``: ``--stream --stream-disk <minimum>``, the plan's ``minimum_bound`` (``plan --stream --json``):
  the least disk the merge can run in at all.

Measured per command: wall time (interpreter start-up included), peak input disk (a thread walks the HF cache and
the stream folder every ``SAMPLE_INTERVAL_S`` and sums the apparent sizes of ``*.safetensors`` and
``*.incomplete`` files and of the cache's blobs; symlinks not followed), bytes the server sent (resolve bodies:
shards, header probes, small files), when the link carried its first and last byte and how much of that span it was
idle, the stream's own report (downloads, refetches, the seconds the merge waited for shards), peak RssAnon of the
process tree, and the SHA-256 of every output weight file: the streamed outputs must equal the download-then-merge
output byte for byte (a mismatch fails the benchmark). The ideal is printed beside them: the download alone at the
link rate (input bytes / rate) and the merge alone (``local``); download-then-merge cannot beat their sum, a stream
cannot beat their maximum.

    python -m benchmarks.stream                                   # 0.5 GB per checkpoint, 150 MB/s, 3 rounds
    python -m benchmarks.stream --size-gb 1 --rate-mbps 100 --rounds 5
    python -m benchmarks.stream --smoke                           # a 20 MB trio, one round: the harness, < 30 s
Results: ``benchmarks/results/stream.json`` and ``stream.md`` (``--smoke``: ``stream-smoke.*`` under
``benchmarks/results/tmp``; ``--out`` changes the folder).
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
from pathlib import Path

from . import machine, tools
from .hub_server import HubServer
from .monitor import run_monitored

DEFAULT_WORKDIR = Path("/tmp/streammerge-bench")
RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_OUT = RESULTS / "tmp"
REPOS = {"target": "bench/target", "sft": "bench/sft", "grpo": "bench/grpo"}
VARIANTS = ("local", "download-then-merge", "stream", "stream-tight")
REFERENCE = "download-then-merge"
# The disk sampler's period: a shard of ~80 MB arrives in ~0.5 s at 150 MB/s, so 5 ms resolves it finely; one walk
# of the few folders involved costs well under a millisecond.
SAMPLE_INTERVAL_S = 0.005
# Every TIMELINE_EVERY-th sample is kept for the JSON (50 ms): enough to see where the link or the merge waits.
TIMELINE_EVERY = 10
# Shard caps as fractions of one checkpoint: ~6, ~5 and ~7 shards, no boundary shared between the three.
SHARD_FRACTIONS = (1 / 6, 1 / 5, 1 / 7)
MARKER = ".bench-complete.json"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.0f} MB"


# ------------------------------------------------------------------------------------------------------ inputs


def _layout(smoke: bool):
    """Qwen2.5-0.5B's shape with a 32k vocabulary (a 59 MB tied embedding, 9 MB MLP matrices); smoke: narrower."""
    from streammerge import synth

    if smoke:
        return synth.get_layout(
            "qwen2.5-0.5b", hidden_size=256, intermediate_size=1024, vocab_size=4096, num_heads=4, num_kv_heads=2
        )
    return synth.get_layout("qwen2.5-0.5b", vocab_size=32768)


def ensure_trio(workdir: Path, size_bytes: float, smoke: bool, seed: int = 0) -> dict:
    """The trio for this size (generated once under ``workdir/stream-inputs``, reused when its marker is there)."""
    from streammerge import synth

    lay = _layout(smoke)
    layers = synth.layers_for_size(lay, size_bytes, "BF16")
    nbytes = synth.layout_nbytes(lay, "BF16", num_layers=layers)
    caps = tuple(max(1, int(nbytes * f)) for f in SHARD_FRACTIONS)
    root = workdir / "stream-inputs" / f"{lay.name}-h{lay.hidden_size}-v{lay.vocab_size}-{layers}L-s{seed}"
    marker = root / MARKER
    generation_s = None
    if not marker.exists():
        _log(f"generating a trio of 3 x {nbytes / 1e6:.0f} MB ({layers} layers) in {root}")
        t0 = time.perf_counter()
        synth.make_trio(root, lay, seed=seed, dtype="BF16", num_layers=layers, shard_sizes=caps, overwrite=True)
        generation_s = time.perf_counter() - t0
        marker.write_text(json.dumps({"layers": layers, "caps": caps}) + "\n")
    trio = synth.Trio.under(root)
    folders = dict(zip(("target", "sft", "grpo"), trio, strict=True))
    shards = {role: sorted(p for p in d.glob("*.safetensors")) for role, d in folders.items()}
    return {
        "root": str(root),
        "layout": f"{lay.name} (hidden {lay.hidden_size}, intermediate {lay.intermediate_size}, vocab "
        f"{lay.vocab_size}, tied embedding)",
        "num_layers": layers,
        "checkpoint_bytes": nbytes,
        "shard_caps": dict(zip(folders, caps, strict=True)),
        "folders": {k: str(v) for k, v in folders.items()},
        "shards": {role: [{"name": p.name, "size": p.stat().st_size} for p in ps] for role, ps in shards.items()},
        "input_shard_bytes": sum(p.stat().st_size for ps in shards.values() for p in ps),
        "files": [str(p) for ps in shards.values() for p in ps],
        "generation_s": generation_s,
    }


# ------------------------------------------------------------------------------------------------ disk sampler


def input_disk_bytes(folders: list[Path]) -> int:
    """Apparent bytes of input data under ``folders``: ``*.safetensors`` and ``*.incomplete`` files, and every file
    in a ``blobs`` folder (the HF cache's content store). Symlinks (the cache's snapshots) are not followed."""
    total = 0
    stack = [str(f) for f in folders]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            in_blobs = os.path.basename(d) == "blobs"
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False) and (
                        in_blobs or e.name.endswith((".safetensors", ".incomplete"))
                    ):
                        total += e.stat(follow_symlinks=False).st_size
                except OSError:  # deleted between listing and stat: the stream's cleanup at work
                    continue
    return total


class DiskSampler(threading.Thread):
    """Samples [`input_disk_bytes`] of ``folders`` and the server's bytes served every ``SAMPLE_INTERVAL_S``."""

    def __init__(self, folders: list[Path], server: HubServer, t0: float) -> None:
        super().__init__(name="disk-sampler", daemon=True)
        self.folders, self.server, self.t0 = folders, server, t0
        self.stop = threading.Event()
        self.peak = 0
        self.peak_at = 0.0
        self.samples = 0
        self.timeline: list[tuple[float, int, int]] = []  # (s since start, input disk bytes, bytes served)

    def run(self) -> None:
        while True:
            n = input_disk_bytes(self.folders)
            now = time.monotonic() - self.t0
            if n > self.peak:
                self.peak, self.peak_at = n, now
            if self.samples % TIMELINE_EVERY == 0:
                self.timeline.append((round(now, 3), n, self.server.bytes_served))
            self.samples += 1
            if self.stop.wait(SAMPLE_INTERVAL_S):
                return


# ------------------------------------------------------------------------------------------------ one command


def _merge_argv(variant: str, trio: dict, out: Path, stream_dir: Path, args, tight: int) -> list[str]:
    if variant == "local":
        ins = [trio["folders"][r] for r in ("target", "sft", "grpo")]
    else:
        ins = [REPOS[r] for r in ("target", "sft", "grpo")]
    argv = [sys.executable, "-m", "streammerge", "merge", *ins, "-o", str(out), "--device", "cpu", "--json"]
    argv += ["--quiet", "--chunk-size", args.chunk_size]
    if variant.startswith("stream"):
        argv += ["--stream", "--stream-dir", str(stream_dir)]
        if variant == "stream-tight":
            argv += ["--stream-disk", str(tight)]
        if args.download_workers:
            argv += ["--download-workers", str(args.download_workers)]
    return argv


def _env(server: HubServer, hf_home: Path) -> dict[str, str]:
    return server.env(hf_home)  # HF_HUB_OFFLINE=0, implicit tokens off: nothing goes elsewhere


def _sha256(path: Path) -> tuple[str, str]:
    """SHA-256 of a weight file, and of its data region alone (after the header: what the tensors hold, without
    the ``__metadata__`` that names the inputs)."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        whole.update(head)
        n = int.from_bytes(head, "little")
        whole.update(f.read(n))
        while block := f.read(8 << 20):
            whole.update(block)
            data.update(block)
    return whole.hexdigest(), data.hexdigest()


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of ``intervals``."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _stream_note(report: dict | None) -> str | None:
    for w in (report or {}).get("warnings", []):
        if w.startswith("stream:"):
            return w
    return None


def _waited(note: str | None) -> float | None:
    if not note or "waited " not in note:
        return None
    try:
        return float(note.rsplit("waited ", 1)[1].split(" s", 1)[0])
    except ValueError:
        return None


def run_one(variant: str, rnd: int, server: HubServer, trio: dict, args, tight: int, bound: int | None) -> dict:
    runs = args.workdir / "stream-runs"
    hf_home, out, stream_dir = runs / f"hf-{variant}", runs / f"out-{variant}", runs / f"scratch-{variant}"
    for p in (hf_home, out, stream_dir):
        tools.clear(p)
    hf_home.mkdir(parents=True)
    argv = _merge_argv(variant, trio, out, stream_dir, args, tight)
    residency = machine.cache_residency(trio["files"])
    load = machine.load_average()
    server.clear_log()
    t0 = time.monotonic()
    sampler = DiskSampler([hf_home, stream_dir], server, t0)
    sampler.start()
    name = f"{variant}-{rnd}"
    pr = run_monitored(
        argv,
        args.workdir / "logs" / "stream",
        name,
        cwd=tools.repo_cwd(),
        env=_env(server, hf_home),
        timeout_s=args.timeout,
    )
    sampler.stop.set()
    sampler.join()
    if not pr.ok:
        raise SystemExit(f"{name} failed ({pr.killed or pr.returncode}): {pr.stderr_tail()}")
    report = json.loads(pr.stdout_text())
    gets = [r for r in server.requests if r.method == "GET" and r.filename is not None]
    shard_gets = [r for r in gets if r.filename.endswith(".safetensors") and r.range is None]
    first = min((r.t for r in gets), default=None)
    last = max((r.t_end for r in gets), default=None)
    link_busy = _busy([(r.t, r.t_end) for r in gets])
    shards_begin = min((r.t for r in shard_gets), default=None)
    digests = {p.name: _sha256(p) for p in sorted(out.glob("*.safetensors"))}
    note = _stream_note(report)
    rec = {
        "variant": variant,
        "round": rnd,
        "wall_s": pr.wall_s,
        "in_process_s": report.get("seconds"),
        "peak_input_disk": sampler.peak,
        "peak_input_disk_at_s": sampler.peak_at,
        "disk_bound": bound if variant.startswith("stream") else None,
        "within_bound": (sampler.peak <= bound) if variant.startswith("stream") and bound is not None else None,
        "disk_samples": sampler.samples,
        "bytes_served": server.bytes_served,
        "shard_downloads": len(shard_gets),
        "resolve_gets": len(gets),
        "first_byte_s": None if first is None else first - t0,
        "last_byte_s": None if last is None else last - t0,
        "shard_downloads_begin_s": None if shards_begin is None else shards_begin - t0,
        "achieved_rate_bytes_per_s": None
        if shards_begin is None
        else sum(r.bytes for r in gets if r.t >= shards_begin) / (last - shards_begin),
        "link_busy_s": link_busy,
        "link_idle_s": None if first is None else (last - first) - link_busy,
        "stream_note": note,
        "merge_waited_for_shards_s": _waited(note),
        "stream_folder_left": stream_dir.exists() and any(stream_dir.iterdir()),
        "peak_rss_anon": pr.peak_rss_anon,
        "user_s": pr.user_s,
        "sys_s": pr.sys_s,
        "load_before": load,
        "served_files_cache_residency_before": residency,
        "output_sha256": {k: v[0] for k, v in digests.items()},
        "output_data_sha256": {k: v[1] for k, v in digests.items()},
        "argv": pr.argv,
        "timeline": sampler.timeline,
        # resolve GETs: (start s, end s, repo/file, Range, body bytes, note) from the command's start
        "transfers": [
            (round(r.t - t0, 3), round(r.t_end - t0, 3), f"{r.repo_id}/{r.filename}", r.range, r.bytes, r.note)
            for r in sorted(gets, key=lambda r: r.t)
        ],
    }
    if variant.startswith("stream"):
        rec["bound"] = bound
    _log(
        f"  {name:<24} {pr.wall_s:6.2f} s  peak input disk {_mb(sampler.peak):>8}  served {_mb(server.bytes_served):>8}"
        f"  shards {rec['shard_downloads_begin_s'] or 0:5.2f}-{rec['last_byte_s'] or 0:5.2f} s"
        f"  link idle {rec['link_idle_s'] or 0:5.2f} s"
        + (f"  waited {rec['merge_waited_for_shards_s']:.1f} s" if rec["merge_waited_for_shards_s"] is not None else "")
        + f"  load {load:.1f}"
    )
    for p in (hf_home, out, stream_dir):
        tools.clear(p)
    return rec


# ----------------------------------------------------------------------------------------------------- driver


def _plan_stream(server: HubServer, args, extra: list[str]) -> dict:
    home = args.workdir / "stream-runs" / "hf-plan"
    tools.clear(home)
    home.mkdir(parents=True)
    argv = [sys.executable, "-m", "streammerge", "plan", *REPOS.values(), "--stream", "--json", *extra]
    pr = run_monitored(
        argv,
        args.workdir / "logs" / "stream",
        "plan",
        cwd=tools.repo_cwd(),
        env=_env(server, home),
        timeout_s=args.timeout,
    )
    tools.clear(home)
    if not pr.ok:
        raise SystemExit(f"plan --stream failed: {pr.stderr_tail()}")
    return json.loads(pr.stdout_text())["stream"]


def _bound_ladder(server: HubServer, args, plan_default: dict) -> list[dict]:
    """``plan --stream --stream-disk B`` at bounds from the minimum to the default: downloads and bytes each."""
    lo, mid, hi = plan_default["minimum_bound"], plan_default["no_refetch_bound"], plan_default["disk_bound"]
    picks = sorted({lo, int(lo * 1.25), int(lo * 1.5), int(lo * 2), mid, hi})
    out = []
    for b in picks:
        ps = plan_default if b == hi else _plan_stream(server, args, ["--stream-disk", str(b)])
        out.append({k: ps[k] for k in ("disk_bound", "fetches", "bytes_downloaded", "planned_peak")})
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=None, help="GB per checkpoint (default 0.5; smoke 0.02)")
    p.add_argument("--rate-mbps", type=float, default=None, help="link rate in MB/s (default 150; smoke 40)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; smoke 1)")
    p.add_argument("--download-workers", type=int, default=None, help="--download-workers (default: streammerge's)")
    p.add_argument("--chunk-size", default="16MiB")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; smoke .../tmp)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per command")
    p.add_argument("--smoke", action="store_true", help="a 20 MB trio, one round: the harness itself, < 30 s")
    args = p.parse_args(argv)
    args.size_gb = args.size_gb or (0.02 if args.smoke else 0.5)
    args.rate_mbps = args.rate_mbps or (40.0 if args.smoke else 150.0)
    args.rounds = args.rounds or (1 if args.smoke else 3)
    args.out = (args.out or (SMOKE_OUT if args.smoke else RESULTS)).resolve()
    args.workdir = args.workdir.resolve()
    return args


def _summary(runs: list[dict], ideal: dict) -> dict:
    out = {}
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        walls = [r["wall_s"] for r in rs]
        waited = [r["merge_waited_for_shards_s"] for r in rs if r["merge_waited_for_shards_s"] is not None]
        out[v] = {
            "rounds": len(rs),
            "wall_s_min": min(walls),
            "wall_s_median": statistics.median(walls),
            "in_process_s_median": statistics.median(r["in_process_s"] for r in rs),
            "peak_input_disk_max": max(r["peak_input_disk"] for r in rs),
            "bytes_served_median": statistics.median(r["bytes_served"] for r in rs),
            "shard_downloads_median": statistics.median(r["shard_downloads"] for r in rs),
            "last_byte_s_median": statistics.median(r["last_byte_s"] or 0.0 for r in rs),
            "shard_downloads_begin_s_median": _median(r["shard_downloads_begin_s"] for r in rs),
            "achieved_rate_median": _median(r["achieved_rate_bytes_per_s"] for r in rs),
            "link_idle_s_median": statistics.median(r["link_idle_s"] or 0.0 for r in rs),
            "merge_waited_s_median": statistics.median(waited) if waited else None,
            "peak_rss_anon_max": max(r["peak_rss_anon"] for r in rs),
            "disk_bound": rs[0].get("disk_bound"),
            "within_bound": all(r["within_bound"] for r in rs) if rs[0].get("disk_bound") is not None else None,
            "output_equal_reference": all(r.get("output_equal_reference") for r in rs),
            "tensor_data_equal_reference": all(r.get("tensor_data_equal_reference") for r in rs),
            "stream_folder_left": any(r["stream_folder_left"] for r in rs),
        }
        out[v]["over_ideal_stream"] = out[v]["wall_s_median"] / ideal["stream_s"]
    return out


def _median(values) -> float | None:
    vs = [v for v in values if v is not None]
    return statistics.median(vs) if vs else None


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    command = "python -m benchmarks.stream " + " ".join(sys.argv[1:] if argv is None else argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = machine.machine_info(args.workdir)
    trio = ensure_trio(args.workdir, args.size_gb * 1e9, args.smoke)
    rate = args.rate_mbps * 1e6
    _log(
        f"stream benchmark: 3 x {trio['checkpoint_bytes'] / 1e6:.0f} MB, "
        f"{', '.join(f'{r} {len(s)}' for r, s in trio['shards'].items())} shards; link {args.rate_mbps:g} MB/s; "
        f"{args.rounds} round(s)"
    )
    t0 = time.perf_counter()
    # content_hash="sha256": the stream checks every shard against the LFS SHA-256 the Hub lists ("stat" would fail)
    server = HubServer({REPOS[r]: {"main": trio["folders"][r]} for r in REPOS}, rate_bytes_per_s=rate)
    hash_s = time.perf_counter() - t0
    runs: list[dict] = []
    with server:
        plan_default = _plan_stream(server, args, [])
        tight = plan_default["minimum_bound"]
        # the smoke skips the second plan (one interpreter start-up less); the tight run's own report says the same
        plan_tight = None if args.smoke else _plan_stream(server, args, ["--stream-disk", str(tight)])
        # what the bound costs in downloads between the minimum and the default (plan only: headers, no merge)
        ladder = [] if args.smoke else _bound_ladder(server, args, plan_default)
        bounds = {"stream": plan_default["disk_bound"], "stream-tight": tight}
        _log(
            f"plan --stream: default bound {_mb(plan_default['disk_bound'])} ({plan_default['fetches']} downloads), "
            f"minimum {_mb(tight)}"
            + (
                f" ({plan_tight['fetches']} downloads, {len(plan_tight['refetched'])} shard(s) refetched)"
                if plan_tight
                else ""
            )
        )
        for rnd in range(args.rounds):
            k = rnd % len(VARIANTS)
            for v in VARIANTS[k:] + VARIANTS[:k]:
                runs.append(run_one(v, rnd, server, trio, args, tight, bounds.get(v)))
            ref = next(r for r in runs if r["round"] == rnd and r["variant"] == REFERENCE)
            for r in runs:
                if r["round"] == rnd:
                    r["output_equal_reference"] = r["output_sha256"] == ref["output_sha256"]
                    r["tensor_data_equal_reference"] = r["output_data_sha256"] == ref["output_data_sha256"]
            this = [r for r in runs if r["round"] == rnd]
            bad = [r["variant"] for r in this if not r["tensor_data_equal_reference"]]
            bad += [r["variant"] for r in this if r["variant"].startswith("stream") and not r["output_equal_reference"]]
            if bad or not ref["output_sha256"]:
                raise SystemExit(f"round {rnd}: the output of {', '.join(bad) or REFERENCE} differs (or is empty)")
    total_in = trio["input_shard_bytes"]
    local = [r["wall_s"] for r in runs if r["variant"] == "local"]
    download_s = total_in / rate
    merge_s = statistics.median(local)
    ideal = {
        "input_shard_bytes": total_in,
        "rate_bytes_per_s": rate,
        "download_s": download_s,
        "merge_s": merge_s,
        "merge_s_min": min(local),
        "download_then_merge_s": download_s + merge_s,
        "stream_s": max(download_s, merge_s),
    }
    ref_runs = [r for r in runs if r["variant"] == REFERENCE]
    # what this server and client achieved: download-then-merge's download phase (first shard GET to last byte)
    ideal["measured_download_s"] = statistics.median(r["last_byte_s"] - r["shard_downloads_begin_s"] for r in ref_runs)
    summary = _summary(runs, ideal)
    result = {
        "benchmark": "stream",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "machine": info,
        "shared_machine": "development machine shared with other work (other sessions' builds and tests): load "
        "averages per command are in runs[].load_before; interleaved rounds, minimum and median reported",
        "page_cache": "the served files are read by the server from the page cache (residency before each command "
        "in runs[]; they were just generated or served); downloads and outputs land in the page cache; nothing is "
        "dropped (needs root)",
        "settings": {
            "size_gb": args.size_gb,
            "rate_mbps": args.rate_mbps,
            "rounds": args.rounds,
            "download_workers": args.download_workers,
            "chunk_size": args.chunk_size,
            "smoke": args.smoke,
            "sample_interval_s": SAMPLE_INTERVAL_S,
            "server": "benchmarks.hub_server.HubServer in the benchmark's process (stdlib threads), one token "
            "bucket for all connections, SHA-256 content hashes",
            "server_hashing_s": hash_s,
        },
        "trio": {k: v for k, v in trio.items() if k != "files"},
        "plan_stream_default": plan_default,
        "plan_stream_tight": plan_tight,
        "plan_bound_ladder": ladder,
        "ideal": ideal,
        "summary": summary,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "stream-smoke" if args.smoke else "stream"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / f"{stem}.md").write_text(md)
    _log(md)
    return result


def markdown(r: dict) -> str:
    """The results as the docs' table."""
    m, s, t, i = r["machine"], r["settings"], r["trio"], r["ideal"]
    pd, pt = r["plan_stream_default"], r["plan_stream_tight"] or {}
    shards = ", ".join(f"{role} {len(v)}" for role, v in t["shards"].items())
    lines = [
        f"`{r['command']}` — {r['date']}, git {str(m['git'].get('commit') or '')[:10]}"
        + (" (dirty)" if m["git"].get("dirty") else ""),
        "",
        f"**Machine:** {m['cpu_model']}, {m['cores_usable']} cores, {m['mem_total'] / 2**30:.0f} GiB RAM, Python "
        f"{m['python']}; torch {m['versions'].get('torch')}, huggingface_hub "
        f"{_hf_version()}. Shared with other work: load average {m['load_average_at_start'][0]:.1f} at start "
        f"({_load_range(r['runs'])} before the commands); {s['rounds']} interleaved round(s), order rotated.",
        f"**Inputs:** 3 x {t['checkpoint_bytes'] / 1e6:.0f} MB BF16 ({t['layout']}, {t['num_layers']} layers), "
        f"sharded differently ({shards} shards), {i['input_shard_bytes'] / 1e6:.0f} MB of shards in all, served by "
        f"the local Hub server at {s['rate_mbps']:g} MB/s (one token bucket shared by all connections). "
        "**Page cache:** the server reads warm files; downloads and outputs go through the page cache.",
        f"**Bounds** (`plan --stream --json`): default {_mb(pd['disk_bound'])} ({pd['fetches']} downloads, planned "
        f"peak {_mb(pd['planned_peak'])}); tight = minimum_bound {_mb(pd['minimum_bound'])}"
        + (
            f" ({pt['fetches']} downloads, {len(pt['refetched'])} shard(s) fetched more than once, "
            f"{_mb(pt['bytes_downloaded'])})"
            if pt
            else ""
        )
        + ".",
        "",
        f"Ideal: download alone at the link rate {i['download_s']:.1f} s; merge alone (local inputs, `local` row) "
        f"{i['merge_s']:.1f} s; download + merge {i['download_then_merge_s']:.1f} s; max(download, merge) "
        f"{i['stream_s']:.1f} s. Measured: download-then-merge's download phase took {i['measured_download_s']:.1f} s "
        f"(the server and client on this machine reach {_rate(r)} of the {s['rate_mbps']:g} MB/s link).",
        "",
        "| variant | wall min / median (s) | x max(download, merge) | shard bytes from - to (s) | MB/s | link idle (s) "
        "| merge waited for shards (s) | peak input disk (bound) | bytes served | shard GETs | output = "
        "download-then-merge |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, e in r["summary"].items():
        bound = f" ({_mb(e['disk_bound'])})" if e["disk_bound"] else ""
        waited = "-" if e["merge_waited_s_median"] is None else f"{e['merge_waited_s_median']:.1f}"
        link = v != "local"
        lines.append(
            f"| {v} | {e['wall_s_min']:.1f} / {e['wall_s_median']:.1f} | {e['over_ideal_stream']:.2f} | "
            f"{_span(e['shard_downloads_begin_s_median'], e['last_byte_s_median'])} | "
            f"{_s(e['achieved_rate_median'] and e['achieved_rate_median'] / 1e6, 0)} | "
            f"{_s(e['link_idle_s_median'] if link else None)} | {waited} | "
            f"{_mb(e['peak_input_disk_max'])}{bound} | {_mb(e['bytes_served_median']) if link else '-'} | "
            f"{e['shard_downloads_median']:.0f} | {_equal(e)} |"
        )
    if r.get("plan_bound_ladder"):
        lines += ["", "What the bound costs (`plan --stream --stream-disk B`, headers only):", ""]
        lines += ["| --stream-disk | downloads | bytes downloaded | planned peak |", "|---|---|---|---|"]
        for b in r["plan_bound_ladder"]:
            lines.append(
                f"| {_mb(b['disk_bound'])} | {b['fetches']} | {_mb(b['bytes_downloaded'])} | {_mb(b['planned_peak'])} |"
            )
    lines += [
        "",
        "Walls include interpreter start-up. Peak input disk: apparent bytes of `*.safetensors`/`*.incomplete` "
        f"files and HF-cache blobs, sampled every {s['sample_interval_s'] * 1000:.0f} ms (max over rounds). Shard "
        "bytes from - to: when the first shard GET began and when the server sent the last byte (medians, from the "
        "command's start); MB/s: bytes sent in that span over its length; link idle: time between the first byte "
        "(header probes included) and the last with no transfer in flight. Output: SHA-256 of every weight file (and "
        "of its data after the header); the `local` row's header metadata names local folders instead of Hub ids.",
        "",
    ]
    return "\n".join(lines)


def _s(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _span(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a:.1f} - {b:.1f}"


def _rate(r: dict) -> str:
    rates = [x["achieved_rate_bytes_per_s"] for x in r["runs"] if x["variant"] == REFERENCE]
    return f"~{statistics.median(rates) / 1e6:.0f} MB/s" if rates else "-"


def _equal(e: dict) -> str:
    if e["output_equal_reference"]:
        return "yes (every byte)"
    return "tensor data yes, metadata differs" if e["tensor_data_equal_reference"] else "NO"


def _hf_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("huggingface_hub")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _load_range(runs: list[dict]) -> str:
    loads = [r["load_before"] for r in runs]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"


if __name__ == "__main__":
    main()
