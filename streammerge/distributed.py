"""Coordination of one merge across processes under torchrun: agree on the plan, share errors, wait, then finalize.

No tensors are exchanged (each rank reads its own inputs and writes its own files), so gloo over ``env://`` is the
backend on CPU and GPU machines alike; only small Python objects (fingerprints, error lines) travel. Every
collective is bounded by the process group's timeout. torchrun's agent ends every rank when one dies (its default
is no restarts), so a rank's exception, a ``kill -9`` or a lost node ends the job within that timeout at worst.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from .errors import DistributedError, StreamMergeError

# How long a collective may wait for the slowest rank. The barrier before finalize waits for every rank's own share
# of the merge, so this bounds the spread between the fastest and the slowest rank: 2 hours covers a 671B FP8 merge
# on a slow node (~2 TB at 1.5 GB/s is ~25 min per node for a quarter of it). A rank that died is noticed sooner:
# torchrun's agent ends the job when a worker exits.
DEFAULT_TIMEOUT_S = 2 * 3600
DISTRIBUTED_MODES = ("auto", "off")

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (from the environment torchrun sets)."""

    rank: int
    size: int
    local_rank: int
    local_size: int


def world_from_env(environ: Mapping[str, str] | None = None) -> World | None:
    """The torchrun world this process belongs to, or None when it runs alone (``WORLD_SIZE`` unset or 1)."""
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        if size <= 1:
            return None
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_size = int(env.get("LOCAL_WORLD_SIZE", str(size)))
    except (KeyError, ValueError) as e:
        raise DistributedError(
            f"WORLD_SIZE is set but the torchrun environment is incomplete ({e}); start with torchrun, or unset "
            "WORLD_SIZE"
        ) from None
    if not 0 <= rank < size or not 0 <= local_rank < local_size:
        raise DistributedError(f"RANK {rank} / LOCAL_RANK {local_rank} out of range for WORLD_SIZE {size}")
    return World(rank, size, local_rank, local_size)


class Coordinator:
    """A gloo process group over ``env://`` for one merge; every method is a collective all ranks must call."""

    def __init__(self, world: World, timeout_s: float = DEFAULT_TIMEOUT_S):
        import torch.distributed as dist

        self.world = world
        self.timeout = timedelta(seconds=timeout_s)
        self._dist = dist
        if not dist.is_initialized():
            try:
                dist.init_process_group(
                    "gloo", init_method="env://", rank=world.rank, world_size=world.size, timeout=self.timeout
                )
            except (RuntimeError, ValueError) as e:
                raise DistributedError(f"rank {world.rank}: cannot join the process group ({e})") from None

    def gather(self, value: T) -> list[T]:
        out: list = [None] * self.world.size
        try:
            self._dist.all_gather_object(out, value)
        except RuntimeError as e:  # a peer is gone, or the timeout passed
            raise DistributedError(f"rank {self.world.rank}: lost the other ranks ({_first_line(e)})") from None
        return out

    def agree(self, value: str, what: str) -> None:
        """Raise on every rank unless every rank computed the same ``value``."""
        values = self.gather(value)
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise DistributedError(
                f"rank(s) {', '.join(map(str, odd))} see different {what} than rank 0 ({values[odd[0]][:16]}... vs "
                f"{values[0][:16]}...): every rank must be given the same inputs, options and output"
            )

    def step(self, fn: Callable[[], T], *, only_rank: int | None = None) -> T | None:
        """Run ``fn`` (on every rank, or on ``only_rank``) and share the outcome: if it failed anywhere, every rank
        raises, naming the rank and its error (the failing rank re-raises its own exception)."""
        result, error = None, ""
        own: BaseException | None = None
        if only_rank is None or only_rank == self.world.rank:
            try:
                result = fn()
            except StreamMergeError as e:
                own, error = e, str(e)
            except Exception as e:  # noqa: BLE001 - reported to the peers, then re-raised as it was
                own, error = e, f"{type(e).__name__}: {e}"
        errors = self.gather(error)
        if own is not None:
            raise own
        failed = [(r, msg) for r, msg in enumerate(errors) if msg]
        if failed:
            r, msg = failed[0]
            raise DistributedError(f"rank {r} failed: {msg}")
        return result

    def barrier(self) -> None:
        """Wait for every rank; a rank that does not arrive within the timeout is named."""
        try:
            self._dist.monitored_barrier(timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as e:
            raise DistributedError(f"rank {self.world.rank}: {_first_line(e)}") from None

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
