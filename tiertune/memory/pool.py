"""The buffer pool: a few large allocations made once, handed out as aligned slots of fixed size classes.

Bytes moving between tiers pass through these buffers, every step, so they are allocated once at start:
one arena per size class (sized to the model's block shapes), page-aligned so O_DIRECT reads and writes
can use them, and pinned on CUDA machines by registering the arena with the driver. That avoids both a
pinned allocation per tensor and the power-of-two rounding of PyTorch's pinned allocator (a 20 GiB
request can pin 32 GiB). Without CUDA the same pool hands out aligned pageable buffers.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tiertune.memory.ledger import Ledger
from tiertune.memory.numa import ALIGN, align_up, numa_empty
from tiertune.memory.tiers import Kind, Tier


class PoolExhausted(RuntimeError):
    """No slot of a fitting size class became free in time: the pool is too small for the plan."""


@dataclass
class PoolBuffer:
    """A slot of the pool; ``tensor`` is exactly the bytes asked for, ``slot`` the whole aligned slot."""

    tensor: torch.Tensor
    slot: torch.Tensor
    size_class: int

    def view(self, dtype: torch.dtype, shape: Iterable[int]) -> torch.Tensor:
        """The slot's first bytes as a tensor of ``dtype`` and ``shape`` (no copy)."""
        shape = tuple(shape)
        return self.slot[: math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


class BufferPool:
    def __init__(
        self,
        classes: dict[int, int],
        *,
        pinned: bool = False,
        tier: Tier | None = None,
        ledger: Ledger | None = None,
        numa_nodes: list[int] | None = None,
        interleave: bool = False,
    ) -> None:
        """``classes`` maps a slot size in bytes to how many slots of it to reserve. ``numa_nodes`` places the
        arenas' pages (``interleave``: page by page over the nodes, to add up their bandwidth)."""
        if pinned and not torch.cuda.is_available():
            raise RuntimeError("a pinned pool needs CUDA; use pinned=False on this machine")
        self.pinned = pinned
        self.tier = tier or (Tier.PINNED if pinned else Tier.HOST)
        self.ledger = ledger
        self._cond = threading.Condition()
        self._free: dict[int, list[torch.Tensor]] = {}
        self._arenas: list[torch.Tensor] = []
        self._in_use = 0
        self._out: set[int] = set()  # data pointers of slots handed out
        for size, count in sorted(classes.items()):
            slot = align_up(size)
            arena = numa_empty(slot * count, nodes=numa_nodes, interleave=interleave)
            if pinned:
                try:
                    _register_pinned(arena)
                except RuntimeError:
                    self.close()  # unpin the arenas registered so far
                    raise
                # Registered memory stays locked until unregistered: do it even if close() is never called.
                weakref.finalize(arena, torch.cuda.cudart().cudaHostUnregister, arena.data_ptr())
            self._arenas.append(arena)
            self._free[size] = [arena[i * slot : i * slot + slot] for i in range(count)]
        self.classes = dict(sorted(classes.items()))
        self.reserved_bytes = sum(a.numel() for a in self._arenas)
        # Bytes reserved beyond what the classes hold: alignment of each slot and of each arena to pages.
        self.waste_bytes = self.reserved_bytes - sum(size * count for size, count in classes.items())
        if ledger is not None:
            ledger.add_waste(self.tier, self.waste_bytes)

    def acquire(self, nbytes: int, timeout_s: float | None = 60.0) -> PoolBuffer:
        """A free slot of the smallest class that fits ``nbytes``; waits for one to be released."""
        fitting = [c for c in self.classes if c >= nbytes]
        if not fitting:
            raise ValueError(
                f"no size class holds {nbytes} bytes (largest: {max(self.classes)}); "
                "the pool was sized for other blocks"
            )
        with self._cond:
            if not self._cond.wait_for(lambda: any(self._free[c] for c in fitting), timeout_s):
                raise PoolExhausted(
                    f"no free buffer of >= {nbytes} bytes after {timeout_s}s: all "
                    f"{sum(self.classes[c] for c in fitting)} are in use; raise the buffer count"
                )
            size = next(c for c in fitting if self._free[c])
            slot = self._free[size].pop()
            self._out.add(slot.data_ptr())
            self._report(size)
        return PoolBuffer(slot[:nbytes], slot, size)

    def release(self, buffer: PoolBuffer) -> None:
        with self._cond:
            if buffer.slot.data_ptr() not in self._out:  # a second release would hand one slot out twice
                raise ValueError("this buffer is not handed out by this pool (released twice?)")
            self._out.discard(buffer.slot.data_ptr())
            self._free[buffer.size_class].append(buffer.slot)
            self._report(-buffer.size_class)
            self._cond.notify_all()

    def _report(self, delta: int) -> None:
        self._in_use += delta
        if self.ledger is not None:
            self.ledger.add(self.tier, Kind.STAGING, delta)

    def close(self) -> None:
        """Unpin and drop the arenas (pinned memory is scarce: give it back as soon as the pool is done)."""
        if self._out:
            raise RuntimeError(
                f"{len(self._out)} buffer(s) are still handed out; release them before close()"
            )
        self._arenas.clear()  # each arena's finalizer unregisters it once no slot view is left
        self._free.clear()


def _register_pinned(arena: torch.Tensor) -> None:
    # cudaHostRegister pins memory we allocated ourselves: exact size, page-aligned, NUMA-placed.
    err = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), arena.numel(), 0)
    if int(err) != 0:
        raise RuntimeError(
            f"cudaHostRegister of {arena.numel()} bytes failed (error {int(err)}): the system "
            "may limit locked memory (ulimit -l)"
        )


def classes_for(block_bytes: Iterable[int], slots_per_size: int) -> dict[int, int]:
    """Size classes for blocks of these byte sizes: one class per distinct size, ``slots_per_size`` each."""
    return {size: slots_per_size for size in sorted(set(block_bytes))}


__all__ = ["ALIGN", "BufferPool", "PoolBuffer", "PoolExhausted", "align_up", "classes_for"]
