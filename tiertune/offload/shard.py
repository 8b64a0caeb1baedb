"""Sharding across ranks: each rank homes 1/N of every flat buffer, and the collectives that move them.

With several processes (torchrun), every flat buffer (see :mod:`flat`) is cut into ``world`` equal shards
of whole 4 KiB pages; rank r homes shard r of the weights, the gradients and the optimizer state in its
own tiers. Before a block computes, its weights are all-gathered into a window slot that holds the whole
flat; after each backward its gradient is reduce-scattered, so each rank holds the summed gradient of its
own shard; each rank updates its shard alone.

Collectives are paired across ranks by the order they are issued in, so everything here is issued at
points of the program that every rank reaches in the same order (a block's pre-hook, the end of a
backward), never from a callback that fires when some transfer happens to finish. Waiting for one
is local and may happen at any time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tiertune.errors import TiertuneError
from tiertune.memory.numa import ALIGN

# torch 2.13 renamed the single-tensor collectives; the older names stay for the torch>=2.4 this supports.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


T = TypeVar("T")


class RankError(TiertuneError):
    """Another rank of the job failed: this one stops too (the message says which and why)."""


@dataclass(frozen=True)
class Span:
    """One rank's part of a flat buffer of ``total`` elements cut into ``world`` shards of ``size``."""

    total: int  # elements of the flat
    lo: int  # first element of the flat this rank homes
    hi: int  # one past its last (lo == hi: the flat is too small to reach this rank)
    size: int  # elements of every rank's shard, padding included: a whole number of 4 KiB pages
    rank: int
    world: int

    @property
    def numel(self) -> int:
        """Elements of the flat this rank really holds (its shard less the padding)."""
        return self.hi - self.lo

    @property
    def full(self) -> int:
        """Elements of the padded flat a gather fills: every rank's shard, in rank order."""
        return self.size * self.world


def span_of(numel: int, itemsize: int, rank: int, world: int) -> Span:
    """Rank ``rank``'s part of a flat of ``numel`` elements of ``itemsize`` bytes. Each shard is a whole
    number of 4 KiB pages, so an NVMe read lands on its place in the window directly (O_DIRECT) and a
    gather's pieces stay aligned; the last ranks of a small flat hold padding only."""
    unit = ALIGN // itemsize
    size = max(unit, math.ceil(math.ceil(numel / world) / unit) * unit)
    return Span(numel, min(numel, rank * size), min(numel, (rank + 1) * size), size, rank, world)


class ShardGroup:
    """The job's ranks and the collectives the engine issues over them.

    ``group`` moves the weights and gradients (NCCL on CUDA, gloo on the CPU; None: the default group);
    ``cpu_group`` (gloo) carries what lives in host memory: norms, flags, checkpoint shards, objects.
    ``local_world`` is how many ranks share this machine (their memory budgets are split between them).
    """

    def __init__(
        self, rank: int, world: int, local_world: int = 1, group: Any = None, cpu_group: Any = None
    ) -> None:
        if world < 2:
            raise ValueError("a shard group has two or more ranks")
        self.rank, self.world, self.local_world = rank, world, local_world
        self.group, self.cpu_group = group, cpu_group if cpu_group is not None else group

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run's files."""
        return self.rank == 0

    def span(self, numel: int, dtype: torch.dtype) -> Span:
        return span_of(numel, dtype.itemsize, self.rank, self.world)

    # -- the engine's collectives ----------------------------------------------------------------------

    def gather(self, full: torch.Tensor) -> dist.Work:
        """All-gather in place: ``full`` (uint8, every rank's shard of bytes in rank order) already holds
        this rank's shard at its place; the others land around it. Asynchronous: wait the returned work."""
        piece = full.numel() // self.world
        own = full[self.rank * piece : (self.rank + 1) * piece]
        return _ALL_GATHER(full, own, group=self.group, async_op=True)

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor) -> dist.Work:
        """``out`` = this rank's shard of the sum over ranks of ``full``. Asynchronous."""
        return _REDUCE_SCATTER(out, full, group=self.group, async_op=True)

    def norm(self, local: torch.Tensor) -> torch.Tensor:
        """The L2 norm over every rank's ``local`` L2 norm (a 0-d fp32 tensor): gathered, then reduced in rank
        order, so every rank gets the same number bit for bit (an all-reduce need not)."""
        norms = torch.empty(self.world, dtype=torch.float32)
        _ALL_GATHER(norms, local.reshape(1).float().cpu(), group=self.cpu_group)
        return torch.linalg.vector_norm(norms, 2.0)

    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise OR across ranks of a uint8 tensor of 0/1 (in place, returned)."""
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return flags

    def gather_shards(self, local: torch.Tensor, span: Span) -> torch.Tensor:
        """The whole flat (``span.total`` elements, on the CPU) from each rank's ``local`` part of it."""
        padded = torch.zeros(span.size, dtype=local.dtype)
        padded[: span.numel] = local
        full = torch.empty(span.full, dtype=local.dtype)
        _ALL_GATHER(full, padded, group=self.cpu_group)
        return full[: span.total]

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.cpu_group)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def first(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a choice every rank must make alike: the next token)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(t, src=0, group=self.cpu_group)
        return int(t.item())

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 alone (it reads or writes the run's files); its result on every rank, or
        its error: rank 0 raises its own, the others a :class:`RankError` that quotes it."""
        outcome: tuple[bool, Any] | None = None
        error: BaseException | None = None
        if self.main:
            try:
                outcome = (True, fn())
            except Exception as e:  # noqa: BLE001 (every rank must hear of it, then it is raised again)
                error, outcome = (
                    e,
                    (False, str(e) if isinstance(e, TiertuneError) else f"{type(e).__name__}: {e}"),
                )
        ok, value = self.broadcast(outcome)
        if error is not None:
            raise error
        if not ok:
            raise RankError(f"rank 0: {value}")
        return value

    def agree(self, failure: str | None) -> None:
        """Every rank says whether its part of a shared step failed; if another rank did, this one raises a
        :class:`RankError` quoting the first (so no rank waits in a collective a failed rank never
        issues). A rank that failed itself returns: it raises its own error."""
        said: list[str | None] = [None] * self.world
        dist.all_gather_object(said, failure, group=self.cpu_group)
        if failure is not None:
            return
        for rank, message in enumerate(said):
            if message is not None:
                raise RankError(f"rank {rank}: {message}")

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)
