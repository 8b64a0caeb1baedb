"""AdamW over flat blocks, each block's state where the plan put it, each block updated just before its
next use.

Gradients leave autograd as soon as each parameter's gradient is complete: a post-accumulate hook adds it
into the block's fp32 gradient buffer in the gradient home and drops the parameter's ``.grad``, so no
full set of gradients ever builds up on the device. :meth:`BlockAdamW.step` then:

1. computes the global gradient norm exactly as ``torch.nn.utils.clip_grad_norm_`` does (per-tensor norms,
   then the norm of those) and scales the gradients by the same clamped coefficient;
2. marks every block that got a gradient as *pending* and returns. A pending block is updated when
   something is about to use its weights: the streamer's forward pre-hook calls :meth:`ensure` (so the
   next step's forward runs block by block over freshly updated blocks, and the update's NVMe traffic
   hides behind the compute of the blocks before and after it), and :meth:`flush` updates whatever is
   left before a checkpoint, an export or the next step. The numbers are those of an update right after
   backward: the clipping coefficient is known by then, and nothing reads a block's weights, moments or
   gradient before its update;
3. updates a block with torch's fused AdamW kernel on views of the flat buffers (the same per-element
   arithmetic as ``torch.optim.AdamW(fused=True)``) and sends its new weights home (the streamer writes
   NVMe-homed weights back).

Optimizer state on NVMe moves in chunks through a few staging slots, as a ring: chunks are read ahead in
update order as soon as a slot is free (after the last update of a step, the first chunks of the next
one are read while its forward and backward run), a chunk is updated in its slot, then written back
while the compute goes on. A chunk is never read while its own write is in flight.

A parameter that got no gradient in a step is left alone, moments included, as torch does.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch.optim.adamw import adamw

from tiertune import trace
from tiertune.config import OptimConfig
from tiertune.errors import CheckpointError
from tiertune.memory import Kind, Ledger, Tier
from tiertune.memory.numa import ALIGN, align_up
from tiertune.memory.pool import BufferPool, PoolBuffer
from tiertune.offload.flat import flat_buffer
from tiertune.offload.planner import OPTIMIZER_CHUNK_BYTES, OPTIMIZER_SLOTS
from tiertune.offload.store import Extent, NvmeStore, PendingIO, StoreError, settle
from tiertune.offload.streaming import BlockStreamer, Flat
from tiertune.offload.tensorfile import write_safetensors
from tiertune.optim.updater import StepReport

STATE_FILE = "optimizer-blocks.safetensors"
_HOST = torch.device("cpu")  # gradients and in-memory state live where the CPU update runs


@dataclass(eq=False)
class _Chunk:
    start: int  # element range of the flat
    stop: int
    extent: Extent | None = None  # [exp_avg | exp_avg_sq] on NVMe
    unit: int = -1  # its place in the ring of NVMe chunks


@dataclass(eq=False)
class _State:
    flat: Flat
    home: Tier
    grad: torch.Tensor  # fp32, 1-D, in the gradient home
    touched: list[bool]  # per parameter: a gradient arrived this step
    steps: list[int]  # per parameter: updates applied (torch keeps one step count per parameter)
    decay: list[bool]
    chunks: list[_Chunk] = field(default_factory=list)
    moments: torch.Tensor | None = None  # [exp_avg | exp_avg_sq], fp32, when the home is memory
    pending: bool = False  # stepped, not yet updated: its gradient holds the clipped step gradient


class BlockAdamW:
    def __init__(
        self,
        streamer: BlockStreamer,
        cfg: OptimConfig,
        homes: dict[str, Tier],
        grads_tier: Tier,
        *,
        store: NvmeStore | None,
        ledger: Ledger,
        chunk_bytes: int = OPTIMIZER_CHUNK_BYTES,
        slots: int = OPTIMIZER_SLOTS,
    ) -> None:
        """``homes`` maps a block name to the home tier of its optimizer state; gradients live on
        ``grads_tier`` (host memory, or the device itself on a machine without an accelerator). NVMe state
        moves in chunks of at most ``chunk_bytes`` through ``slots`` staging buffers (at least 2)."""
        self.streamer, self.cfg, self.store, self.ledger = streamer, cfg, store, ledger
        self.grads_tier = grads_tier
        self.device = streamer.device
        self.states: list[_State] = []
        self._hooks = []
        chunk_elems = max(ALIGN // 4, (chunk_bytes // 8) // (ALIGN // 4) * (ALIGN // 4))
        for f in streamer.flats:
            if not f.trainable:
                continue
            home = homes[f.flat.block]
            grad = flat_buffer(f.numel, torch.float32, _HOST)[0]
            self.ledger.add(grads_tier, Kind.GRADS, align_up(f.numel * 4))
            s = _State(
                f,
                home,
                grad,
                [False] * len(f.params),
                [0] * len(f.params),
                [p.ndim >= 2 for p in f.params],
            )
            if home is Tier.NVME:
                if store is None:
                    raise ValueError("optimizer state on NVMe needs a store")
                for start in range(0, f.numel, chunk_elems):
                    stop = min(f.numel, start + chunk_elems)
                    ext = store.allocate(f"{f.flat.block}#{f.index}.adam[{start}]", 8 * (stop - start))
                    s.chunks.append(_Chunk(start, stop, ext))
            else:
                s.moments = flat_buffer(2 * f.numel, torch.float32, _HOST)[0]
                s.moments.zero_()
                s.chunks.append(_Chunk(0, f.numel))
                self.ledger.add(home, Kind.OPTIMIZER, align_up(8 * f.numel))
            self.states.append(s)
            for i, p in enumerate(f.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook(s, i)))
        if not self.states:
            raise ValueError("no trainable parameters: the tuning method left nothing to train")
        self._by_block: dict[int, list[_State]] = {}
        for s in self.states:
            self._by_block.setdefault(s.flat.block, []).append(s)
        # The ring of NVMe chunks, in update order, and what is in flight for it.
        self._units: list[tuple[_State, _Chunk]] = [
            (s, c) for s in self.states for c in s.chunks if c.extent is not None
        ]
        for u, (_, c) in enumerate(self._units):
            c.unit = u
        self._slots = max(2, slots)
        self._reads: dict[int, tuple[PoolBuffer, PendingIO | None]] = {}  # unit -> its read, ahead of use
        self._writes: deque[tuple[int, PendingIO, PoolBuffer]] = deque()  # oldest first
        self._ahead: deque[int] = deque()  # units to read next, in order
        self._held: PoolBuffer | None = None  # the chunk being updated
        self._pending: deque[_State] = deque()  # stepped, not yet updated, in update order
        self._lr = 0.0
        # An update that failed part way (an I/O error) leaves a block half stepped: nothing may go on
        # from that state, and no retry may step its chunks twice.
        self._failed: BaseException | None = None
        self.staging: BufferPool | None = None
        if self._units:
            slot = align_up(8 * max(c.stop - c.start for _, c in self._units))
            tier = Tier.DEVICE if self.device.type == "cpu" else Tier.HOST
            self.staging = BufferPool({slot: self._slots}, tier=tier, ledger=ledger)
            self._ahead.extend(range(len(self._units)))  # the first step's state: zeros, no read needed
        streamer.before_use = self.ensure
        self.zero_grad()

    def _grad_hook(self, s: _State, i: int):
        offset, numel = s.flat.flat.offsets[i], s.flat.params[i].numel()

        def hook(p: torch.nn.Parameter) -> None:
            if s.pending:  # no pre-hook ran for the block in this forward: its weights were stale
                raise RuntimeError(
                    f"{s.flat.flat.block}: a gradient arrived before the block's pending update ran; "
                    "a module used its weights without the streamer's forward pre-hook"
                )
            s.grad[offset : offset + numel].add_(p.grad.reshape(-1).to(s.grad.device, torch.float32))
            s.touched[i] = True
            p.grad = None

        return hook

    def _grad_views(self) -> list[torch.Tensor]:
        views = []
        for s in self.states:
            for i, (offset, p) in enumerate(zip(s.flat.flat.offsets, s.flat.params)):
                if s.touched[i]:
                    views.append(s.grad[offset : offset + p.numel()])
        return views

    def step(self, lr: float) -> StepReport:
        """Clip, check, and mark the blocks with a gradient for update (see the module docstring)."""
        self._check()
        self.flush(drop_reads=False)  # a block that was not used since the last step: update it now
        grads = self._grad_views()
        if not grads:  # nothing got a gradient: nothing to update (as torch.optim does)
            return StepReport(grad_norm=0.0, skipped=False)
        # clip_grad_norm_, spelled out over views of the flat gradient buffers.
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        norm = float(total)
        if not math.isfinite(norm):
            self.zero_grad()  # a non-finite gradient would poison the moments: keep the state as it is
            return StepReport(grad_norm=norm, skipped=True)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        self._lr = lr
        for s in self.states:
            if any(s.touched):
                s.pending = True
                self._pending.append(s)
        # Read ahead only what this update needs; reads of untouched chunks give their slots back.
        needed = [c.unit for s in self._pending for c in s.chunks if c.extent is not None]
        for u in set(self._reads) - set(needed):
            self._drop_read(u)
        self._ahead = deque(u for u in needed if u not in self._reads)
        self._poll()
        return StepReport(grad_norm=norm, skipped=False)

    # -- pending updates ----------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._failed is not None:
            raise StoreError(
                f"an optimizer update failed part way ({type(self._failed).__name__}: {self._failed}); "
                "the weights and optimizer state are no longer consistent: resume from the last checkpoint"
            ) from self._failed

    def ensure(self, block: int) -> None:
        """Block ``block`` is about to be used: update it (and the pending blocks before it) if pending."""
        self._check()
        if any(s.pending for s in self._by_block.get(block, ())):
            while self._pending:
                s = self._pending[0]
                self._update(s)
                self._pending.popleft()
                if s.flat.block == block and not any(x.pending for x in self._by_block[block]):
                    break
        self._poll()

    def flush(self, drop_reads: bool = True) -> None:
        """Run every pending update and wait for the state's writes; with ``drop_reads``, also give the
        chunks read ahead back (their staging slots are free for a checkpoint afterwards)."""
        self._check()
        while self._pending:
            self._update(self._pending[0])
            self._pending.popleft()
        while self._writes:
            self._reap(wait=True)
        if drop_reads:
            for u in list(self._reads):
                self._drop_read(u)
            self._ahead.clear()

    def discard(self) -> None:
        """Forget the pending updates (a checkpoint is about to replace the weights and the state)."""
        for s in self._pending:
            s.pending = False
        self._pending.clear()
        self.zero_grad()
        while self._writes:
            self._reap(wait=True)
        for u in list(self._reads):
            self._drop_read(u)
        self._ahead.clear()

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def _update(self, s: _State) -> None:
        """Update one pending block (it is ``self._pending[0]``), which may run inside a forward pass."""
        no_autocast = torch.autocast(self.device.type, enabled=False)
        try:
            with trace.span("compute", f"update {s.flat.flat.block}"), torch.no_grad(), no_autocast:
                params = self._params(s)
                for c in s.chunks:
                    if c.extent is None:
                        n = s.flat.numel
                        self._adamw(s, c, params, s.moments[:n], s.moments[n:], self._lr)
                        continue
                    buf = self._take(c.unit)
                    n = c.stop - c.start
                    m = buf.slot[: 8 * n].view(torch.float32)
                    self._adamw(s, c, params, m[:n], m[n:], self._lr)
                    io = self.store.write(c.extent, buf.slot)
                    self._held = None
                    self._writes.append((c.unit, io, buf))
                    self._poll()
                self._finish_params(s, params)
        except BaseException as e:
            self._failed = self._failed or e
            raise
        if self._pending[-1] is s and self._units:  # the step's last block: read the next step's first chunks
            queued = set(self._ahead)
            self._ahead.extend(u for u in range(len(self._units)) if u not in queued)
            self._poll()
        s.grad.zero_()
        for i, t in enumerate(s.touched):
            s.steps[i] += t
        s.touched = [False] * len(s.touched)
        s.pending = False

    # -- the ring of NVMe chunks --------------------------------------------------------------------------

    def _writing(self, unit: int) -> bool:
        return any(u == unit for u, _, _ in self._writes)

    def _reap(self, wait: bool = False) -> bool:
        """Give back the slots of finished writes, oldest first (``wait``: the oldest, finished or not).
        A write's error is raised here. True when a slot came free."""
        freed = False
        while self._writes and (wait or self._writes[0][1].transferred()):
            _, io, buf = self._writes.popleft()
            try:
                io.wait()
            except BaseException as e:  # the chunk's new moments did not reach the drive
                self._failed = self._failed or e
                raise
            finally:
                if io.transferred():  # not while a transfer may still use it (an interrupted wait)
                    self.staging.release(buf)
            freed, wait = True, False
        return freed

    def _in_use(self) -> int:
        return len(self._reads) + len(self._writes) + (self._held is not None)

    def _start_read(self, unit: int) -> None:
        c = self._units[unit][1]
        buf = self.staging.acquire(8 * (c.stop - c.start))
        if c.extent.checksums is None:  # never written: the moments start at zero
            buf.slot.zero_()
            self._reads[unit] = (buf, None)
        else:
            self._reads[unit] = (buf, self.store.read(c.extent, buf.slot))

    def _poll(self) -> None:
        """Free the slots of finished writes and start the next reads into them (never blocks)."""
        if self.staging is None:
            return
        self._reap()
        while self._ahead and self._in_use() < self._slots:
            u = self._ahead[0]
            if u in self._reads:
                self._ahead.popleft()
                continue
            if self._writing(u):  # its newest state is still on its way to the drive
                break
            self._ahead.popleft()
            self._start_read(u)

    def _take(self, unit: int) -> PoolBuffer:
        """The chunk's state in a staging slot, read (and checked) from the drive."""
        if unit not in self._reads:
            with contextlib.suppress(ValueError):
                self._ahead.remove(unit)
            while self._writing(unit) or self._in_use() >= self._slots:
                if not self._writes:  # every slot holds a read of a later chunk: give the latest back
                    later = max(self._reads, key=lambda u: (u - unit) % len(self._units))
                    self._drop_read(later)
                    if later not in self._ahead:
                        self._ahead.appendleft(later)
                    continue
                self._reap(wait=True)
            self._start_read(unit)
        buf, io = self._reads.pop(unit)
        self._held = buf
        try:
            if io is not None:
                if not io.transferred():  # the update stalls on the drive: show it on the trace
                    with trace.span("compute", f"wait for {self._units[unit][0].flat.flat.block} state"):
                        io.wait()
                io.wait()
        except BaseException:
            self._held = None
            if io is None or io.transferred():  # not while a transfer may still use it
                self.staging.release(buf)
            raise
        return buf

    def _drop_read(self, unit: int) -> None:
        buf, io = self._reads.pop(unit)
        settle(io)
        self.staging.release(buf)

    def _params(self, s: _State) -> torch.Tensor:
        """The flat's weights where the update runs: the CPU (the device itself, without an accelerator)."""
        f = s.flat
        if not self.streamer.staged:  # the window is host memory: update it in place
            return self.streamer.resident(f)
        if f.home is Tier.DEVICE:  # a host copy of the device's weights, copied back after the update
            return f.home_buffer.to("cpu")
        if f.home is Tier.NVME:  # read from the drive into a host buffer
            return self.streamer.host_copy(f)
        return self.streamer.writable_home(f)  # host or CXL home: updated in place

    def _finish_params(self, s: _State, params: torch.Tensor) -> None:
        f = s.flat
        if not self.streamer.staged:
            self.streamer.writeback(f)
        elif f.home is Tier.DEVICE:
            f.home_buffer.copy_(params)
        elif f.home is Tier.NVME:
            self.streamer.put_home(f)  # to the drive, and into the window if it holds the flat
        else:
            self.streamer.reload(f)  # host or CXL home, updated in place: into the window if it holds it

    def _adamw(
        self, s: _State, c: _Chunk, params: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float
    ) -> None:
        """Fused AdamW on the parts of the touched parameters inside the chunk, decayed and not."""
        b1, b2 = self.cfg.betas
        for decay in (True, False):
            ps, gs, ms, vs, steps = [], [], [], [], []
            for i, (offset, p) in enumerate(zip(s.flat.flat.offsets, s.flat.params)):
                lo, hi = max(offset, c.start), min(offset + p.numel(), c.stop)
                if lo >= hi or not s.touched[i] or s.decay[i] != decay:
                    continue
                ps.append(params[lo:hi])
                gs.append(s.grad[lo:hi])
                ms.append(m[lo - c.start : hi - c.start])
                vs.append(v[lo - c.start : hi - c.start])
                steps.append(torch.tensor(float(s.steps[i]), device=params.device))  # adamw adds 1
            if ps:
                adamw(
                    ps,
                    gs,
                    ms,
                    vs,
                    [],
                    steps,
                    fused=True,
                    amsgrad=False,
                    beta1=b1,
                    beta2=b2,
                    lr=lr,
                    weight_decay=self.cfg.weight_decay if decay else 0.0,
                    eps=self.cfg.eps,
                    maximize=False,
                )

    def zero_grad(self) -> None:
        """Drop the gradients gathered since the last step (a pending block's are its update's: kept)."""
        for s in self.states:
            if s.pending:
                continue
            s.grad.zero_()
            s.touched = [False] * len(s.touched)

    def state_bytes(self) -> int:
        """Optimizer state held in memory now (state on NVMe is counted by the store)."""
        return sum(s.moments.nbytes for s in self.states if s.moments is not None)

    # -- checkpoints --------------------------------------------------------------------------------

    def _moments_of(self, s: _State) -> torch.Tensor:
        if s.moments is not None:
            return s.moments
        out = torch.empty(2 * s.flat.numel, dtype=torch.float32)
        n = s.flat.numel
        for c in s.chunks:
            k = c.stop - c.start
            if c.extent.checksums is None:
                out[c.start : c.stop].zero_()
                out[n + c.start : n + c.stop].zero_()
                continue
            buf = self.staging.acquire(8 * k)
            try:
                self.store.read(c.extent, buf.slot).wait()
                m = buf.slot[: 8 * k].view(torch.float32)
                out[c.start : c.stop] = m[:k]
                out[n + c.start : n + c.stop] = m[k:]
            finally:
                self.staging.release(buf)
        return out

    def save(self, directory: Path) -> None:
        """One tensor per parameter and moment, and its step count; written one block at a time."""
        self.flush()
        entries = []
        for s in self.states:
            for i, (name, shape) in enumerate(zip(s.flat.flat.names, s.flat.shapes)):
                if s.steps[i]:  # torch keeps no state for a parameter never updated
                    entries += [
                        (f"{name}.exp_avg", torch.float32, tuple(shape)),
                        (f"{name}.exp_avg_sq", torch.float32, tuple(shape)),
                        (f"{name}.step", torch.float32, (1,)),
                    ]
        write_safetensors(directory / STATE_FILE, entries, self._tensors())

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for s in self.states:
            if not any(s.steps):
                continue
            moments, n = self._moments_of(s), s.flat.numel
            for i, (name, offset, shape) in enumerate(
                zip(s.flat.flat.names, s.flat.flat.offsets, s.flat.shapes)
            ):
                if s.steps[i]:
                    k = shape.numel()
                    yield f"{name}.exp_avg", moments[offset : offset + k].view(shape)
                    yield f"{name}.exp_avg_sq", moments[n + offset : n + offset + k].view(shape)
                    yield f"{name}.step", torch.tensor([float(s.steps[i])])

    def load(self, directory: Path) -> None:
        self.flush()
        path = directory / STATE_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{directory} holds no {STATE_FILE}: it was written with the optimizer state resident "
                "(offload.* all device); resume with the placement it was written with"
            )
        with safe_open(str(path), framework="pt") as fh:
            left = set(fh.keys())
            for s in self.states:
                n = s.flat.numel
                moments = torch.zeros(2 * n, dtype=torch.float32)
                for i, (name, offset, shape) in enumerate(
                    zip(s.flat.flat.names, s.flat.flat.offsets, s.flat.shapes)
                ):
                    if f"{name}.step" not in left:
                        s.steps[i] = 0
                        continue
                    m, v = fh.get_tensor(f"{name}.exp_avg"), fh.get_tensor(f"{name}.exp_avg_sq")
                    if m.numel() != shape.numel() or v.numel() != shape.numel():
                        raise CheckpointError(
                            f"{directory}: optimizer state of {name} has {m.numel()} elements, the "
                            f"parameter {shape.numel()}; was it written by a different job?"
                        )
                    moments[offset : offset + shape.numel()] = m.reshape(-1)
                    moments[n + offset : n + offset + shape.numel()] = v.reshape(-1)
                    s.steps[i] = int(fh.get_tensor(f"{name}.step").item())
                    left -= {f"{name}.exp_avg", f"{name}.exp_avg_sq", f"{name}.step"}
                self._put_moments(s, moments)
        if left:
            raise CheckpointError(
                f"{directory}: optimizer state for parameters this job does not train "
                f"({sorted(left)[:3]}); was it written by a different job?"
            )

    def _put_moments(self, s: _State, moments: torch.Tensor) -> None:
        n = s.flat.numel
        if s.moments is not None:
            s.moments.copy_(moments)
            return
        for c in s.chunks:
            k = c.stop - c.start
            buf = self.staging.acquire(8 * k)
            try:
                m = buf.slot[: 8 * k].view(torch.float32)
                m[:k] = moments[c.start : c.stop]
                m[k:] = moments[n + c.start : n + c.stop]
                self.store.write(c.extent, buf.slot).wait()
            finally:
                self.staging.release(buf)

    def close(self) -> None:
        """Remove the hooks and wait for every transfer (pending updates are not run: :meth:`flush` does
        that); safe on the way out of an error."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.streamer.before_use == self.ensure:
            self.streamer.before_use = None
        pending = [
            *((io, buf) for buf, io in self._reads.values()),
            *((io, buf) for _, io, buf in self._writes),
        ]
        if self._held is not None:
            pending.append((None, self._held))
        self._reads, self._writes, self._held = {}, deque(), None
        self._ahead.clear()
        for io, buf in pending:
            settle(io)
            self.staging.release(buf)
