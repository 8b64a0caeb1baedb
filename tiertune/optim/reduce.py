"""Gradients of sharded flats, summed across the ranks into each rank's shard, block by block in backward.

Each parameter's gradient is added, as it completes, into an fp32 *bucket* the size of its whole flat
(taken on the flat's first gradient of the backward). When every parameter of a flat has arrived, the
flat is ready, and its bucket is reduce-scattered: each rank receives the sum over ranks of its own
shard, adds it into the shard's gradient (summed over the step's micro-batches) and gives the bucket
back. So no rank holds more than the few buckets in flight of full-size gradients.

Ranks pair collectives by the order they are issued, so every rank issues the same sequence whatever
its gradients: one reduction per flat, in one fixed order (the flats in reverse, the order backward
completes them), then one all-reduce of the parameters' arrival flags. A flat that completes out of
that order keeps its bucket until the flats before it have gone; at the end of the backward the flats
not yet reduced go, in order, complete or not (a rank without a gradient for one sends zeros). A
parameter is *touched* in a step (AdamW updates it) if it got a gradient on any rank (the flags), so
every rank agrees on what the update changes, also where a parameter's use depends on the data.

Waiting for a reduction happens only at fixed points too (when too many are in flight, and at the end),
so what follows from it (a speculative update, see :mod:`blockwise`) happens at the same point on every
rank.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from tiertune.memory import Kind, Ledger, Tier
from tiertune.offload.shard import ShardGroup, Span
from tiertune.offload.streaming import Flat

IN_FLIGHT = 2  # reductions under way at once: one landing while the next goes out


class Reducible(Protocol):
    """What the reducer needs of one sharded flat's optimizer state (hashable by identity)."""

    flat: Flat
    span: Span
    grad: torch.Tensor  # this rank's shard of the step's gradient (fp32, ``span.numel`` elements)
    touched: list[bool]  # per parameter of the flat: set here for what got a gradient on any rank


@dataclass(eq=False)
class _Flying:
    target: Reducible
    work: dist.Work
    bucket: torch.Tensor
    out: torch.Tensor
    arrived: list[bool]
    complete: bool  # every parameter arrived before it went (in a hook, not at the end of the backward)


class GradReducer:
    def __init__(
        self,
        group: ShardGroup,
        targets: list[Reducible],
        device: torch.device,
        ledger: Ledger,
        on_reduced: Callable[[Reducible, bool], None] | None = None,
    ) -> None:
        """``targets`` in the flats' order (forward); buckets live on ``device`` (where the gradients are
        made); ``on_reduced(target, complete)`` is called once a reduction has landed in the shard."""
        self.group, self.device, self.ledger, self.on_reduced = group, device, ledger, on_reduced
        self.order = targets[::-1]
        self._arrived = {t: [False] * len(t.flat.params) for t in targets}
        self._buckets: dict[Reducible, torch.Tensor] = {}
        self._ready: set[Reducible] = set()
        self._next = 0  # position in ``order`` of the next flat whose reduction may go out
        self._flying: deque[_Flying] = deque()
        self._spare: dict[int, list[torch.Tensor]] = {}  # buffers to reuse, by element count

    def add(self, t: Reducible, index: int, grad: torch.Tensor) -> None:
        """Parameter ``index`` of ``t``'s flat has its gradient for this backward."""
        bucket = self._buckets.get(t)
        if bucket is None:
            bucket = self._buckets[t] = self._take(t.span.full, zero=True)
        offset, numel = t.flat.flat.offsets[index], t.flat.params[index].numel()
        bucket[offset : offset + numel].add_(grad.reshape(-1).to(bucket.device, torch.float32))
        self._arrived[t][index] = True
        if all(self._arrived[t]):
            self._ready.add(t)
            while self._next < len(self.order) and self.order[self._next] in self._ready:
                self._launch(self.order[self._next], complete=True)
                self._next += 1

    def finish(self) -> None:
        """The backward is over: reduce the flats not yet reduced (in order), land everything, and mark
        touched what got a gradient on any rank."""
        for t in self.order[self._next :]:
            self._launch(t, complete=t in self._ready)
        flags = torch.tensor([a for t in self.order for a in self._arrived[t]], dtype=torch.uint8)
        flags = self.group.any(flags).tolist()  # after every reduction: the same sequence on every rank
        while self._flying:
            self._land(self._flying.popleft())
        at = 0
        for t in self.order:
            arrived = flags[at : at + len(t.touched)]
            at += len(arrived)
            t.touched[:] = [a or bool(b) for a, b in zip(t.touched, arrived)]
        self._reset()

    def discard(self) -> None:
        """Forget this backward's reductions (the step is abandoned); waits for those in flight."""
        while self._flying:
            f = self._flying.popleft()
            f.work.wait()
            self._give(f.bucket)
            self._give(f.out)
        for t in list(self._buckets):
            self._give(self._buckets.pop(t))
        self._reset()

    def _reset(self) -> None:
        self._ready.clear()
        self._next = 0
        for t in self._arrived:
            self._arrived[t] = [False] * len(self._arrived[t])

    def _launch(self, t: Reducible, complete: bool) -> None:
        bucket = self._buckets.pop(t, None)
        if bucket is None:  # no gradient here, but on another rank: this rank's share of the sum is zero
            bucket = self._take(t.span.full, zero=True)
        out = self._take(t.span.size, zero=False)
        work = self.group.reduce_scatter(out, bucket)
        self._flying.append(_Flying(t, work, bucket, out, list(self._arrived[t]), complete))
        while len(self._flying) > IN_FLIGHT:
            self._land(self._flying.popleft())

    def _land(self, f: _Flying) -> None:
        f.work.wait()
        t = f.target
        t.grad.add_(f.out[: t.span.numel].to(t.grad.device))
        t.touched[:] = [a or b for a, b in zip(t.touched, f.arrived)]
        self._give(f.bucket)
        self._give(f.out)
        if self.on_reduced is not None:
            self.on_reduced(t, f.complete)

    def _take(self, numel: int, zero: bool) -> torch.Tensor:
        spare = self._spare.get(numel)
        if spare:
            buf = spare.pop()
        else:
            buf = torch.empty(numel, dtype=torch.float32, device=self.device)
            # staging where the gradients are made (host memory, without an accelerator)
            self.ledger.add(Tier.DEVICE, Kind.STAGING, buf.nbytes)
        return buf.zero_() if zero else buf

    def _give(self, buf: torch.Tensor | None) -> None:
        if buf is not None:
            self._spare.setdefault(buf.numel(), []).append(buf)
