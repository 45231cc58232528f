"""Run one command as its own process tree and measure it: wall time, CPU time, peak memory of the whole tree.

Memory is sampled from ``/proc/<pid>/status`` every [`SAMPLE_INTERVAL_S`] for every process of the tree, summed:
``RssAnon`` (the tool's own allocations: what must stay flat with model size) and ``VmRSS`` (anonymous plus
mapped file pages and shared memory). A 10 ms sampler can miss a short spike, so the kernel's own high-water mark
of each process (``VmHWM``, monotonic) is recorded beside it as a cross-check of the total. (``ru_maxrss`` from
``wait4`` is not usable: it keeps the high-water mark of the forking harness's address space across ``exec``.)

Peak GPU memory of the tree is polled from ``nvidia-smi`` (when asked and present), every [`GPU_INTERVAL_S`].
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# 10 ms: a 2 GB merge on the development machine takes seconds, so ~100 samples per second resolve its memory
# profile; reading /proc/<pid>/status costs ~50 us, well under 1% of a core.
SAMPLE_INTERVAL_S = 0.01
# Finding new descendants scans /proc (several ms on a busy machine): done every 25 samples (250 ms). Every tool
# measured here starts its work in the first process; a late child is caught within 250 ms.
TREE_REFRESH_SAMPLES = 25
# nvidia-smi takes ~20-50 ms per call.
GPU_INTERVAL_S = 0.1
KIB = 1024


@dataclass
class ProcessRun:
    """What one monitored command did and used.

    Attributes:
        argv (`list[str]`): the command.
        returncode (`int`): its exit status (negative: killed by that signal).
        wall_s (`float`): start to exit, process start-up included.
        user_s / sys_s (`float`): CPU seconds of the tree (waited-for descendants included).
        peak_rss_anon (`int`): largest sampled sum of RssAnon over the tree (bytes).
        peak_rss (`int`): largest sampled sum of VmRSS over the tree (bytes).
        maxrss (`int`): the kernel's peak VmRSS (VmHWM) of the largest process of the tree (bytes; growth in the
            last sampling interval before exit is missed).
        peak_gpu_memory (`int | None`): largest sampled GPU memory of the tree (bytes); `None` when not measured.
        samples (`int`): memory samples taken.
        killed (`str | None`): why the harness killed it (timeout, memory cap), else `None`.
        stdout / stderr (`str`): paths of its captured output.
    """

    argv: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_anon: int
    peak_rss: int
    maxrss: int
    peak_gpu_memory: int | None
    samples: int
    killed: str | None
    stdout: str
    stderr: str
    processes: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed is None

    def stdout_text(self) -> str:
        return Path(self.stdout).read_text(errors="replace")

    def stderr_tail(self, chars: int = 2000) -> str:
        text = Path(self.stderr).read_text(errors="replace")
        return text[-chars:]

    def to_dict(self) -> dict:
        return asdict(self)


def _status(pid: int) -> tuple[int, int, int]:
    """(RssAnon, VmRSS, VmHWM) of ``pid`` in bytes; zeros once it has exited."""
    anon = rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * KIB
                elif line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * KIB
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        pass
    return anon, rss, hwm


def _descendants(root: int) -> list[int]:
    """Every live descendant of ``root`` (psutil when installed, else a scan of /proc/*/stat)."""
    try:
        import psutil

        try:
            return [p.pid for p in psutil.Process(root).children(recursive=True)]
        except psutil.Error:
            return []
    except ImportError:
        pass
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: the fields after the last ")" are fixed.
        fields = stat[stat.rfind(b")") + 2 :].split()
        parent[int(entry)] = int(fields[1])
    out, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.extend(kids)
        frontier.extend(kids)
    return out


class _Sampler(threading.Thread):
    """Samples the tree's memory until stopped; kills the tree's process group past ``rss_cap``."""

    def __init__(self, root: int, rss_cap: int | None, gpu: bool) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.root = root
        self.rss_cap = rss_cap
        self.gpu = gpu and shutil.which("nvidia-smi") is not None
        self.stop = threading.Event()
        self.peak_anon = self.peak_rss = self.hwm = 0
        self.peak_gpu: int | None = 0 if self.gpu else None
        self.samples = 0
        self.killed: str | None = None
        self.pids: set[int] = {root}

    def run(self) -> None:
        next_gpu = 0.0
        while not self.stop.is_set():
            if self.samples % TREE_REFRESH_SAMPLES == 0:
                self.pids = {self.root, *_descendants(self.root)}
            anon = rss = 0
            for pid in list(self.pids):
                a, r, h = _status(pid)
                anon += a
                rss += r
                self.hwm = max(self.hwm, h)
            self.samples += 1
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_rss = max(self.peak_rss, rss)
            if self.rss_cap is not None and rss > self.rss_cap and self.killed is None:
                self.killed = f"memory cap: process tree RSS {rss / 1e9:.2f} GB > cap {self.rss_cap / 1e9:.2f} GB"
                _kill_group(self.root)
            now = time.monotonic()
            if self.gpu and now >= next_gpu:
                next_gpu = now + GPU_INTERVAL_S
                self.peak_gpu = max(self.peak_gpu or 0, _gpu_memory(self.pids))
            self.stop.wait(SAMPLE_INTERVAL_S)


def _gpu_memory(pids: set[int]) -> int:
    """GPU memory used by ``pids`` according to nvidia-smi (bytes; 0 when it cannot tell)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    total = 0
    for line in done.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids and parts[1].isdigit():
            total += int(parts[1]) * KIB * KIB  # MiB
    return total


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_monitored(
    argv: list[str],
    log_dir: Path,
    name: str,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    rss_cap: int | None = None,
    gpu: bool = False,
) -> ProcessRun:
    """Run ``argv`` in a new session (its own process group) and measure it; never raises on a failing command.

    Args:
        argv (`list[str]`): the command.
        log_dir (`Path`): where ``<name>.stdout`` and ``<name>.stderr`` are written.
        name (`str`): a file-name-safe label for the logs.
        cwd (`Path`, *optional*): working directory.
        env (`dict[str, str]`, *optional*): extra environment variables.
        timeout_s (`float`, *optional*): kill the whole tree after this many seconds.
        rss_cap (`int`, *optional*): kill the whole tree once its total RSS exceeds this many bytes.
        gpu (`bool`, defaults to `False`): poll nvidia-smi for the tree's GPU memory.

    Returns:
        [`ProcessRun`].
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    full_env = {**os.environ, **(env or {})}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=out, stderr=err, start_new_session=True)
        sampler = _Sampler(proc.pid, rss_cap, gpu)
        sampler.start()
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            _kill_group(proc.pid)

        timer = threading.Timer(timeout_s, on_timeout) if timeout_s else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # rusage: CPU time of the tree
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            wall = time.perf_counter() - t0
            if timer is not None:
                timer.cancel()
            sampler.stop.set()
            sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        _kill_group(proc.pid)  # anything the tool left running in its group
    killed = sampler.killed or (f"timeout after {timeout_s:.0f} s" if timed_out.is_set() else None)
    return ProcessRun(
        argv=[str(a) for a in argv],
        returncode=proc.returncode,
        wall_s=wall,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        peak_rss_anon=sampler.peak_anon,
        peak_rss=sampler.peak_rss,
        maxrss=sampler.hwm,
        peak_gpu_memory=sampler.peak_gpu,
        samples=sampler.samples,
        killed=killed,
        stdout=str(out_path),
        stderr=str(err_path),
        processes=len(sampler.pids),
    )
