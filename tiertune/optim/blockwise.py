"""AdamW over flat blocks, each block's state where the plan put it.

Gradients leave autograd as soon as each parameter's gradient is complete: a post-accumulate hook adds it
into the block's fp32 gradient buffer in the gradient home and drops the parameter's ``.grad``, so no
full set of gradients ever builds up on the device. The step then:

1. computes the global gradient norm exactly as ``torch.nn.utils.clip_grad_norm_`` does (per-tensor norms,
   then the norm of those) and scales the gradients by the same clamped coefficient;
2. updates block after block, in forward order, with torch's fused AdamW kernel on views of the flat
   buffers (the same per-element arithmetic as ``torch.optim.AdamW(fused=True)``). State on NVMe streams
   through three staging slots in chunks: the read of chunk j+1 and the write of chunk j-1 are in flight
   while chunk j is updated;
3. sends each block's new weights home (the streamer writes NVMe-homed weights back).

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

from tiertune.config import OptimConfig
from tiertune.errors import CheckpointError
from tiertune.memory import Kind, Ledger, Tier
from tiertune.memory.numa import ALIGN, align_up
from tiertune.memory.pool import BufferPool, PoolBuffer
from tiertune.offload.flat import flat_buffer
from tiertune.offload.store import Extent, NvmeStore, PendingIO
from tiertune.offload.streaming import BlockStreamer, Flat
from tiertune.offload.tensorfile import write_safetensors
from tiertune.optim.updater import StepReport

STATE_FILE = "optimizer-blocks.safetensors"
DEFAULT_CHUNK_BYTES = 128 * 2**20  # optimizer state on NVMe moves in chunks of at most this many bytes
_HOST = torch.device("cpu")  # gradients and in-memory state live where the CPU update runs


def _settle(io: PendingIO | None) -> None:
    """Wait for a transfer during cleanup; its own error is dropped for the one already raised."""
    if io is not None:
        with contextlib.suppress(Exception):
            io.wait()


@dataclass(eq=False)
class _Chunk:
    start: int  # element range of the flat
    stop: int
    extent: Extent | None = None  # [exp_avg | exp_avg_sq] on NVMe


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
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        """``homes`` maps a block name to the home tier of its optimizer state; gradients live on
        ``grads_tier`` (host memory, or the device itself on a machine without an accelerator)."""
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
        streamed = [c for s in self.states for c in s.chunks if c.extent is not None]
        self.staging: BufferPool | None = None
        if streamed:
            slot = align_up(8 * max(c.stop - c.start for c in streamed))
            tier = Tier.DEVICE if self.device.type == "cpu" else Tier.HOST
            self.staging = BufferPool({slot: 3}, tier=tier, ledger=ledger)
        self.zero_grad()

    def _grad_hook(self, s: _State, i: int):
        offset, numel = s.flat.flat.offsets[i], s.flat.params[i].numel()

        def hook(p: torch.nn.Parameter) -> None:
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
        self._update(lr)
        self.zero_grad()
        return StepReport(grad_norm=norm, skipped=False)

    def _update(self, lr: float) -> None:
        units = [(s, c) for s in self.states if any(s.touched) for c in s.chunks]
        writes: deque[tuple[PendingIO, PoolBuffer]] = deque()
        reads: dict[int, tuple[PoolBuffer, PendingIO | None]] = {}

        def start_read(k: int) -> None:
            s, c = units[k]
            if c.extent is None or k in reads:
                return
            while self.staging is not None and writes and len(reads) + len(writes) >= 3:
                io, buf = writes.popleft()  # free the oldest staging slot
                io.wait()
                self.staging.release(buf)
            buf = self.staging.acquire(8 * (c.stop - c.start))
            if c.extent.checksums is None:  # never written: the moments start at zero
                buf.slot.zero_()
                reads[k] = (buf, None)
            else:
                reads[k] = (buf, self.store.read(c.extent, buf.slot))

        current_flat: _State | None = None
        params = None
        held: tuple[PoolBuffer, PendingIO | None] | None = None  # the chunk being updated
        try:
            for k, (s, c) in enumerate(units):
                start_read(k)
                if k + 1 < len(units):
                    start_read(k + 1)
                if s is not current_flat:
                    if current_flat is not None:
                        self._finish_params(current_flat, params)
                    self.streamer.need(s.flat.block)
                    params, current_flat = self._params(s), s
                if c.extent is None:
                    moments, n = s.moments, s.flat.numel
                    self._adamw(s, c, params, moments[:n], moments[n:], lr)
                else:
                    held = reads.pop(k)
                    buf, io = held
                    if io is not None:
                        io.wait()
                    n = c.stop - c.start
                    m = buf.slot[: 8 * n].view(torch.float32)
                    self._adamw(s, c, params, m[:n], m[n:], lr)
                    writes.append((self.store.write(c.extent, buf.slot), buf))
                    held = None
            if current_flat is not None:
                self._finish_params(current_flat, params)
            while writes:  # the last writes: their errors are this step's errors
                io, buf = writes.popleft()
                try:
                    io.wait()
                finally:
                    self.staging.release(buf)
        finally:
            # Never hand a slot back while a transfer may still use it; an error already on its way wins.
            pending = [*((io, buf) for buf, io in reads.values()), *writes]
            if held is not None:
                pending.append((held[1], held[0]))
            for io, buf in pending:
                _settle(io)
                self.staging.release(buf)
        for s in self.states:
            for i, t in enumerate(s.touched):
                s.steps[i] += t

    def _params(self, s: _State) -> torch.Tensor:
        """The flat's weights where the update runs: the CPU (the device itself, without an accelerator)."""
        f = s.flat
        if self.device.type == "cpu":
            return self.streamer.resident(f)
        if f.home is Tier.DEVICE:  # a host copy of the device's weights, copied back after the update
            return f.home_buffer.to("cpu")
        return f.home_buffer  # host or CXL home: updated in place

    def _finish_params(self, s: _State, params: torch.Tensor) -> None:
        f = s.flat
        if self.device.type == "cpu":
            self.streamer.writeback(f)
        elif f.home is Tier.DEVICE:
            f.home_buffer.copy_(params)
        else:
            self.streamer.refresh(f)  # the window's copy is stale now

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
        for s in self.states:
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
        for h in self._hooks:
            h.remove()
        self._hooks = []
