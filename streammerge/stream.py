"""The stream (``--stream``): download the shards of streamed Hub inputs just ahead of the merge, in the order it
reads them and several at once, and delete each as soon as no remaining work needs it, within a disk bound.

The plan says, from headers alone, which input shards every output tensor reads. :func:`schedule` turns that into
fetches: each shard is fetched before its first use and deleted after its last; when the bound cannot hold every
shard between two uses, the one needed furthest ahead is deleted and fetched again later (said in ``plan
--stream``). At run time the :class:`Streamer` starts a fetch once the work before its start has been written and
the bound has room, and learns how far the merge has got from the bytes the engine writes (:class:`StreamSink`, a
proxy of the engine's sink): a tensor is done when all its output bytes were handed to the writer.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .checkpoint import Checkpoint, TensorSource
from .errors import DownloadError, OptionsError, StreamMergeError
from .plan import MergePlan
from .remote import ShardGate, verify_download
from .writer import human_bytes

# Retries of one shard's download after its first attempt, and the first backoff (doubled each time). The
# environment may change them (tests, flaky links): STREAMMERGE_DOWNLOAD_RETRIES, STREAMMERGE_DOWNLOAD_BACKOFF_S.
DOWNLOAD_RETRIES = 3
DOWNLOAD_BACKOFF_S = 1.0
DEFAULT_DOWNLOAD_WORKERS = 4


def streamed(ck: TensorSource | None) -> ShardGate | None:
    """The gate of a streamed Hub input (None for anything else)."""
    gate = getattr(ck, "gate", None)
    return gate if isinstance(gate, ShardGate) else None


@dataclass
class Fetch:
    """One download of one shard: started once every step before ``start_after`` is done, kept on disk until every
    step up to ``last_step`` is."""

    ck: Checkpoint
    file: int
    size: int
    start_after: int
    first_step: int
    last_step: int
    state: str = "waiting"  # waiting, downloading, ready, released

    @property
    def gate(self) -> ShardGate:
        return self.ck.gate  # type: ignore[return-value]

    @property
    def name(self) -> str:
        return f"{self.gate.label}:{self.gate.files[self.file].name}"


@dataclass
class Schedule:
    """The fetches of a streamed merge, and the disk they need.

    Attributes:
        steps (`int`): output tensors the merge writes (its unit of progress here).
        fetches (`list[Fetch]`): in the order they start.
        bound (`int`): the disk bound (bytes) the schedule keeps to.
        minimum (`int`): the least bound that can run the merge at all (the most one tensor reads at once).
        no_refetch (`int`): the least bound with which no shard is fetched twice.
        peak (`int`): the most bytes on disk at once under this schedule.
        shards (`int`): distinct input shards fetched.
    """

    steps: int
    fetches: list[Fetch]
    bound: int
    minimum: int
    no_refetch: int
    peak: int
    shards: int
    step_names: list[str] = field(default_factory=list, repr=False)

    @property
    def downloaded(self) -> int:
        return sum(f.size for f in self.fetches)

    def refetched(self) -> dict[str, int]:
        """Shards fetched more than once: name -> times."""
        counts: dict[str, int] = {}
        for f in self.fetches:
            counts[f.name] = counts.get(f.name, 0) + 1
        return {k: v for k, v in counts.items() if v > 1}

    def summary(self) -> dict:
        return {
            "disk_bound": self.bound,
            "no_refetch_bound": self.no_refetch,
            "minimum_bound": self.minimum,
            "planned_peak": self.peak,
            "shards": self.shards,
            "fetches": len(self.fetches),
            "bytes_downloaded": self.downloaded,
            "refetched": self.refetched(),
        }

    def describe(self) -> list[str]:
        return describe(self.summary())


def describe(summary: dict) -> list[str]:
    """What ``plan --stream`` prints, from :meth:`Schedule.summary`."""
    s = summary
    lines = [
        f"stream  {s['shards']} input shard(s), {s['fetches']} download(s), {human_bytes(s['bytes_downloaded'])}; "
        f"input disk bound {human_bytes(s['disk_bound'])} (planned peak {human_bytes(s['planned_peak'])})",
        f"stream  no shard is fetched twice with {human_bytes(s['no_refetch_bound'])} or more; the merge cannot "
        f"run below {human_bytes(s['minimum_bound'])}",
    ]
    again = s["refetched"]
    if again:
        shown = ", ".join(f"{k} x{v}" for k, v in list(again.items())[:8])
        more = f" and {len(again) - 8} more" if len(again) > 8 else ""
        lines.append(f"stream  the bound forces {len(again)} shard(s) to be fetched more than once: {shown}{more}")
    else:
        lines.append("stream  every shard is fetched once")
    return lines


def _steps(plan: MergePlan, inputs: Mapping[str, TensorSource | None], skip) -> tuple[list, list[list]]:
    """The output tensors in write order (files in ``skip`` left out) and, per tensor, the streamed shards it
    reads as (checkpoint, file) pairs."""
    tensors, needs = [], []
    for i, f in enumerate(plan.files):
        if i in skip:
            continue
        for t in f.tensors:
            refs = list(t.inputs())
            refs += [(role, s.ref) for role, s in t.scales.items()]
            need = []
            for role, ref in refs:
                ck = inputs.get(role)
                if ref.nbytes and streamed(ck) is not None and (ck, ref.file) not in need:  # 0 bytes: nothing read
                    need.append((ck, ref.file))
            tensors.append(t)
            needs.append(need)
    return tensors, needs


def _size(key) -> int:
    ck, i = key
    return ck.gate.files[i].size


def schedule(
    plan: MergePlan,
    inputs: Mapping[str, TensorSource | None],
    bound: int | None = None,
    workers: int = DEFAULT_DOWNLOAD_WORKERS,
    skip: frozenset[int] | set[int] = frozenset(),
) -> Schedule:
    """The fetches that stream ``inputs`` through ``plan`` within ``bound`` bytes of disk (None: the default, room
    for no refetch plus ``workers`` of the largest shards downloading ahead).

    Raises:
        [`OptionsError`]: the bound is below what one tensor reads at once.
    """
    tensors, needs = _steps(plan, inputs, skip)
    keys: dict[tuple, list[int]] = {}
    for s, need in enumerate(needs):
        for key in need:
            keys.setdefault(key, []).append(s)
    minimum, worst = 0, -1
    for s, need in enumerate(needs):
        n = sum(_size(k) for k in need)
        if n > minimum:
            minimum, worst = n, s
    # live bytes per step when each shard stays from its first use to its last
    delta = [0] * (len(needs) + 1)
    for key, uses in keys.items():
        delta[uses[0]] += _size(key)
        delta[uses[-1] + 1] -= _size(key)
    no_refetch, live = 0, 0
    for d in delta:
        live += d
        no_refetch = max(no_refetch, live)
    if bound is None:
        largest = sorted((_size(k) for k in keys), reverse=True)[: max(1, workers)]
        bound = no_refetch + sum(largest)
    if bound < minimum:
        t = tensors[worst]
        raise OptionsError(
            f"--stream-disk {human_bytes(bound)} is below what tensor {t.name!r} reads at once "
            f"({human_bytes(minimum)} of input shards); give at least {human_bytes(minimum)} "
            f"({human_bytes(no_refetch)} or more fetches each shard once)"
        )
    fetches: list[Fetch] = []
    on_disk: dict[tuple, Fetch] = {}
    used = peak = 0
    for s, need in enumerate(needs):
        for key in need:
            if key in on_disk:
                on_disk[key].last_step = s
                continue
            size, start_after = _size(key), 0
            while used + size > bound:
                victims = [k for k in on_disk if k not in need]
                victim = max(victims, key=lambda k: _next_use(keys[k], s))  # needed furthest ahead, or never
                gone = on_disk.pop(victim)
                used -= gone.size
                start_after = max(start_after, gone.last_step + 1)
            f = Fetch(key[0], key[1], size, start_after, s, s)
            fetches.append(f)
            on_disk[key] = f
            used += size
            peak = max(peak, used)
    return Schedule(len(needs), fetches, bound, minimum, no_refetch, peak, len(keys), [t.name for t in tensors])


def _next_use(uses: list[int], s: int) -> float:
    j = bisect.bisect_right(uses, s)
    return uses[j] if j < len(uses) else float("inf")


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class Streamer:
    """Runs a :class:`Schedule`: ``workers`` download threads (huggingface_hub's ``hf_hub_download``, so tokens,
    ``HF_ENDPOINT``, revisions and resumable transfers behave as there), each shard verified (size, header,
    SHA-256) before the merge may read it, and deleted once the merge is past its last use.

    ``on_arrival(ck, file)``: called on the download thread before the shard is released to the merge (the block
    scales of an FP8 shard are checked there); what it raises fails the merge.
    """

    def __init__(
        self,
        sched: Schedule,
        workers: int = DEFAULT_DOWNLOAD_WORKERS,
        on_arrival: Callable[[Checkpoint, int], None] | None = None,
    ):
        self.sched = sched
        self.workers = max(1, workers)
        self.on_arrival = on_arrival
        self.retries = int(_env_number("STREAMMERGE_DOWNLOAD_RETRIES", DOWNLOAD_RETRIES))
        self.backoff = _env_number("STREAMMERGE_DOWNLOAD_BACKOFF_S", DOWNLOAD_BACKOFF_S)
        self._cond = threading.Condition()
        self._next = 0  # the next fetch to start
        self._frontier = 0  # steps [0, frontier) are done
        self._in_use = 0
        self.peak = 0
        self.failure: BaseException | None = None
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self.retried = 0
        # the fetches in the order the merge gets past them (their last step): released in that order
        self._by_last = sorted(range(len(sched.fetches)), key=lambda j: sched.fetches[j].last_step)
        self._release_at = 0

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        for k in range(min(self.workers, len(self.sched.fetches))):
            t = threading.Thread(target=self._worker, name=f"sm-download-{k}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, join_s: float = 5.0) -> None:
        """Start nothing more; wait a little for downloads in flight (a transfer cannot be interrupted)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        deadline = time.monotonic() + join_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def check(self) -> None:
        """Raise the stream's failure, if any (the sink calls this before a file is finished)."""
        if self.failure is not None:
            raise self.failure

    @property
    def in_use(self) -> int:
        with self._cond:
            return self._in_use

    def advance(self, frontier: int) -> None:
        """Steps [0, frontier) are done: delete every shard whose last use is behind, let waiting fetches go."""
        with self._cond:
            if frontier <= self._frontier:
                return
            self._frontier = frontier
            order, fetches = self._by_last, self.sched.fetches
            while self._release_at < len(order) and fetches[order[self._release_at]].last_step < frontier:
                f = fetches[order[self._release_at]]
                self._release_at += 1
                if f.state == "ready":
                    self._release(f)
            self._cond.notify_all()

    def _release(self, f: Fetch) -> None:
        # under self._cond
        f.state = "released"
        f.gate.gone(f.file)
        held = f.ck.unmap(f.file)
        try:
            os.unlink(f.gate.path(f.file))
        except OSError:
            pass
        if held is None:
            self._in_use -= f.size
        else:  # a view still maps it: the disk is free only when that view is collected
            weakref.finalize(held, self._freed, f.size)

    def _freed(self, size: int) -> None:
        with self._cond:
            self._in_use -= size
            self._cond.notify_all()

    # ------------------------------------------------------------------ downloads
    def _take(self) -> Fetch | None:
        with self._cond:
            while not self._stopped and self.failure is None and self._next < len(self.sched.fetches):
                f = self.sched.fetches[self._next]
                if f.last_step < self._frontier:  # the merge got past it without it: nothing to fetch
                    self._next += 1
                    f.state = "released"
                    continue
                if self._frontier >= f.start_after and self._in_use + f.size <= self.sched.bound:
                    self._next += 1
                    self._in_use += f.size
                    self.peak = max(self.peak, self._in_use)
                    f.state = "downloading"
                    return f
                self._cond.wait(0.5)
            return None

    def _worker(self) -> None:
        while True:
            f = self._take()
            if f is None:
                return
            try:
                self._download(f)
            except BaseException as e:  # noqa: BLE001 - every failure reaches the merge through the gates
                self._fail(e if isinstance(e, StreamMergeError) else DownloadError(f"{f.name}: {e}"))
                return
            with self._cond:
                if self._stopped:
                    return
                f.state = "ready"
                if f.last_step < self._frontier:  # nothing needs it any more (cannot happen in order; kept safe)
                    self._release(f)
                self._cond.notify_all()
            f.gate.ready(f.file)

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self.failure is None:
                self.failure = exc
            self._cond.notify_all()
        gates = {id(f.gate): f.gate for f in self.sched.fetches}
        for g in gates.values():
            g.fail(self.failure)

    def _download(self, f: Fetch) -> None:
        from huggingface_hub import hf_hub_download

        gate, name = f.gate, f.gate.files[f.file].name
        last: BaseException | None = None
        wrong = 0  # downloads that arrived but were not what the Hub lists
        for attempt in range(self.retries + 1):
            if wrong >= 2:
                break  # twice the wrong bytes: no connection problem, and another download will not help
            if self._stopped or self.failure is not None:
                raise DownloadError(f"{gate.label} checkpoint: {gate.source}/{name}: the stream stopped")
            if attempt:
                with self._cond:
                    self.retried += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                hf_hub_download(
                    gate.repo_id, name, revision=gate.commit, local_dir=gate.folder, force_download=wrong > 0
                )
                verify_download(gate, f.file)
                last = None
                break
            except Exception as e:  # noqa: BLE001 - retried, then reported in one line
                last = e
                if isinstance(e, DownloadError):  # a wrong file on disk: never resumed from
                    wrong += 1
                    try:
                        os.unlink(gate.path(f.file))
                    except OSError:
                        pass
        if isinstance(last, DownloadError):  # the bytes arrived, but are not what the Hub lists
            raise DownloadError(
                f"{last} (in {wrong} downloads); the server gives other bytes than its listing says (a repository "
                "changed in place, or a proxy in the way). Nothing unfinished was published; once the source is "
                "sound, run again with --resume"
            ) from None
        if last is not None:
            what = " ".join(f"{type(last).__name__}: {last}".split())
            raise DownloadError(
                f"{gate.label} checkpoint: {gate.source}/{name}: download failed after {self.retries + 1} "
                f"attempt(s) ({what}); nothing unfinished was published: fix the connection and run again with "
                "--resume"
            ) from None
        if self.on_arrival is not None:
            self.on_arrival(f.ck, f.file)

    # ------------------------------------------------------------------ the sink side
    def sink(self, writer, plan: MergePlan, skip) -> StreamSink:
        return StreamSink(writer, self, plan, skip)

    def notes(self) -> list[str]:
        s = self.sched
        waited = self.waited()
        again = sum(s.refetched().values()) - len(s.refetched())
        return [
            f"stream: {len(s.fetches)} shard download(s) ({human_bytes(s.downloaded)}"
            + (f", {again} refetch(es) forced by the disk bound" if again else "")
            + (f", {self.retried} retried" if self.retried else "")
            + f"); peak input disk {human_bytes(self.peak)} of {human_bytes(s.bound)}; the merge waited "
            f"{waited:.1f} s for shards"
        ]

    def waited(self) -> float:
        return sum(g.waited_s for g in {id(f.gate): f.gate for f in self.sched.fetches}.values())


class StreamSink:
    """The engine's sink, seen by the stream: every call is passed on; the bytes written tell how far the merge has
    got (:meth:`Streamer.advance`), and a file is finished only while the stream is well (its failure is raised
    instead)."""

    def __init__(self, inner, streamer: Streamer, plan: MergePlan, skip):
        self._inner = inner
        self._streamer = streamer
        self._outputs = plan.outputs
        self._lock = threading.Lock()
        # per output file: tensor starts, ends and step numbers, in offset order
        self._starts: dict[int, list[int]] = {}
        self._spans: dict[int, list[tuple[int, int, int]]] = {}
        self._left: list[int] = []
        step = 0
        for i, f in enumerate(plan.files):
            if i in skip:
                continue
            spans = []
            for t in f.tensors:
                spans.append((t.offset, t.offset + t.nbytes, step))
                self._left.append(t.nbytes * self._outputs)
                step += 1
            spans.sort()
            self._spans[i] = spans
            self._starts[i] = [a for a, _, _ in spans]
        self._frontier = 0
        self._advance()

    def __getattr__(self, name):  # every other member of the sink (done_files, notes, bytes_written, ...)
        return getattr(self._inner, name)

    def _advance(self) -> None:
        n = len(self._left)
        while self._frontier < n and self._left[self._frontier] <= 0:
            self._frontier += 1
        self._streamer.advance(self._frontier)

    def _count(self, file: int, offset: int, nbytes: int, out: int | None) -> None:
        spans = self._spans.get(file)
        if not spans or nbytes <= 0:
            return
        mult = self._outputs if out is None else 1
        j = max(0, bisect.bisect_right(self._starts[file], offset) - 1)
        end = offset + nbytes
        with self._lock:
            while j < len(spans) and spans[j][0] < end:
                a, b, step = spans[j]
                overlap = min(b, end) - max(a, offset)
                if overlap > 0:
                    self._left[step] -= overlap * mult
                j += 1
            self._advance()

    def write(self, file: int, offset: int, data, out: int | None = None, *, hashed: bool = False) -> None:
        self._streamer.check()
        self._inner.write(file, offset, data, out, hashed=hashed)
        n = getattr(data, "nbytes", None)
        self._count(file, offset, int(n) if n is not None else len(data), out)

    def digest(self, file: int, offset: int, data, out: int | None = None) -> None:
        self._inner.digest(file, offset, data, out)

    def finish_file(self, file: int) -> None:
        self._streamer.check()
        self._inner.finish_file(file)
