"""The block streamer: weights whose home is not the compute device come to it one block at a time.

Every block's parameters live in flat buffers (one per dtype and trainability, see :mod:`flat`). A flat
whose home is the device stays there. The others ("streamed") have a home elsewhere (host or CXL memory
for a CUDA device, an NVMe extent) and a *window* of a few device slots they are computed from:

- a forward pre-hook on each block's modules makes the block resident (starting its fetch if no prefetch
  did, then waiting for it) and starts fetching the next ``depth`` blocks into free slots;
- backward needs the weights again. Autograd saves views of them (``F.linear`` keeps ``weight.t()``,
  whose memory is the slot, not the parameter), so a saved-tensor hook records any saved tensor that lies
  in a slot as (flat, offset, shape, stride) and rebuilds it from wherever that flat is resident when the
  backward unpacks it, fetching it first, and prefetching the blocks before it. A slot is therefore reused
  freely without corrupting a saved view. Under activation checkpointing the recomputed forward runs the
  same pre-hooks, in backward order;
- a slot is taken back from the least recently needed flat when a fetch needs one. The flat's parameters
  then point at a zero-memory NaN placeholder of their shape: autograd can still accumulate into them,
  and any computation that used them by mistake would produce NaN, never a silently stale weight.

Weights only change in the optimizer step, which writes them back to their home (:meth:`writeback`), so
an evicted flat is simply dropped. Hooks are removable (:meth:`close`).

Across ranks (a :class:`ShardGroup`), each rank homes one shard of every flat (see :mod:`shard`) and every
flat streams: a fetch brings this rank's shard to its place in the slot, then an all-gather fills in the
others'. Gathers go out in the order fetches started, at points every rank reaches in the same order
(a block's pre-hook, a fetch that must finish), each once its own shard is in place; so the drive's
read of a block overlaps the compute of the block before it, and its gather the compute of the blocks
after that. A shard's update changes the whole flat for every rank, so it drops the window copy, and a
pending update of a block runs before the block's gather goes out (the streamer asks for it).
"""

from __future__ import annotations

import bisect
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tiertune import trace
from tiertune.memory import Kind, Ledger, Tier
from tiertune.memory.numa import align_up, numa_empty
from tiertune.memory.pool import BufferPool, PoolBuffer, PoolExhausted
from tiertune.offload.blocks import Block
from tiertune.offload.flat import FlatParams, flat_buffer, flatten_meta, flatten_params
from tiertune.offload.planner import WINDOW_EXTRA
from tiertune.offload.shard import ShardGroup, Span
from tiertune.offload.store import Extent, NvmeStore, PendingIO, settle

# Tests set this to run the accelerator's staged NVMe path (drive -> host buffer -> window) on the CPU.
STAGE_ON_CPU = False


class StreamError(RuntimeError):
    """The window cannot hold what one computation needs at once: a configuration the plan should forbid."""


@dataclass(eq=False)
class Flat:
    """One flat buffer of a block at run time: where its home is, and whether the window holds it."""

    index: int
    block: int  # position of its block in forward order
    flat: FlatParams
    params: list[nn.Parameter]
    home: Tier
    extent: Extent | None = None  # the home, when it is NVMe
    home_buffer: torch.Tensor | None = None  # the home (1-D, typed), when it is memory
    slot: torch.Tensor | None = None  # the window slot (uint8) holding it, for streamed flats
    pending: PendingIO | None = None  # a read into ``slot`` not yet waited for
    copied: torch.cuda.Event | None = None  # a host-to-device copy into ``slot`` not yet waited for
    home_read: torch.cuda.Event | None = None  # a copy out of the host home not yet known to be done
    writing: PendingIO | None = None  # a write to the NVMe home not yet finished
    staged: PoolBuffer | None = None  # host buffer a staged read of the NVMe home lands in
    host: PoolBuffer | None = None  # host copy of the weights for a CPU-side update (:meth:`host_copy`)
    span: Span | None = None  # this rank's shard of the flat, when the flats are sharded across ranks
    gathering: Any = None  # the all-gather (torch.distributed work) filling ``slot``, not yet waited for
    last_use: int = 0
    role: int = 0  # its place among its block's streamed flats: slots are sized per role
    shapes: list[torch.Size] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    numel: int = 0

    @property
    def streamed(self) -> bool:
        """Computed from a window slot: its home is not the device, or holds only this rank's shard."""
        return self.home is not Tier.DEVICE or self.span is not None

    @property
    def nbytes(self) -> int:
        """Bytes of its slot: the flat's bytes (every rank's shard, when sharded) rounded up to 4 KiB."""
        return align_up((self.numel if self.span is None else self.span.full) * self.dtype.itemsize)

    @property
    def home_numel(self) -> int:
        """Elements its home holds: the flat, or this rank's shard with its padding."""
        return self.numel if self.span is None else self.span.size

    @property
    def home_nbytes(self) -> int:
        """Bytes its home holds, rounded up to 4 KiB (what one O_DIRECT transfer of the home moves)."""
        return align_up(self.home_numel * self.dtype.itemsize)

    @property
    def trainable(self) -> bool:
        return self.params[0].requires_grad


class BlockStreamer:
    def __init__(
        self,
        model: nn.Module,
        blocks: list[Block],
        homes: dict[str, Tier],
        device: torch.device,
        *,
        depth: int,
        store: NvmeStore | None,
        ledger: Ledger,
        home_nodes: dict[Tier, list[int]] | None = None,
        make: Callable[[dict[str, torch.Tensor]], dict[str, nn.Parameter]] | None = None,
        group: ShardGroup | None = None,
    ) -> None:
        """``homes`` maps a block name to the home tier of its weights; ``depth`` blocks are fetched ahead.
        Parameters still on the meta device are created block by block by ``make`` (see
        :func:`flatten_meta`) and go to their home at once: a model larger than memory is never whole.
        With ``group``, each home holds this rank's shard of its flat only."""
        if device.type == "cuda" and device.index is None:  # tensors say cuda:0, never plain cuda
            device = torch.device("cuda", torch.cuda.current_device())
        self.model, self.device, self.depth, self.store, self.ledger = model, device, depth, store, ledger
        self.cuda = device.type == "cuda"
        # NVMe homes reach an accelerator's window through host buffers (the drive cannot write device
        # memory); without one, reads land straight in the window.
        self.staged = self.cuda or STAGE_ON_CPU
        self.block_names = [b.name for b in blocks]
        self.flats: list[Flat] = []
        self._poison: dict[torch.dtype, torch.Tensor] = {}
        self._clock = 0
        self.backward = False  # set by the engine around loss.backward(): prefetch runs the other way
        # Called with a block's index before a module computes with its weights: the optimizer runs the
        # block's pending update there (see tiertune.optim.blockwise).
        self.before_use: Callable[[int], None] | None = None
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.waits = 0  # times a flat was needed while its fetch was still in flight
        self.group = group
        self._gathers: deque[Flat] = deque()  # fetches whose gather has not gone out, in the order started
        for i, b in enumerate(blocks):
            # One flat per dtype, role (trained or frozen) and origin (made here, or made already: LoRA's
            # adapters, or a classifier head's copy peft trains beside them, which is made here).
            groups: dict[tuple[torch.dtype, bool, bool], dict[str, nn.Parameter]] = {}
            for name, p in b.params.items():
                groups.setdefault((p.dtype, p.requires_grad, p.is_meta), {})[name] = p
            for params in groups.values():
                if next(iter(params.values())).is_meta:
                    if make is None:
                        raise ValueError(f"{b.name}: parameters on the meta device and nothing to make them")
                    fp, made = flatten_meta(b.name, params, make, torch.device("cpu"))
                    b.params.update(zip(params, made))
                else:
                    fp, made = flatten_params(b.name, params), list(params.values())
                f = Flat(len(self.flats), i, fp, made, homes[b.name])
                f.shapes = [p.shape for p in f.params]
                f.dtype, f.numel = fp.buffer.dtype, fp.buffer.numel()
                if group is not None:
                    f.span = group.span(f.numel, f.dtype)
                self.flats.append(f)
                self._place_home(f, (home_nodes or {}).get(f.home))
        self.by_block: list[list[Flat]] = [
            [f for f in self.flats if f.block == i] for i in range(len(blocks))
        ]
        # A block may have several streamed flats (LoRA: the frozen base and the adapters). Each gets its
        # slots sized for its role, so the adapters' small flats do not take base-weight-sized slots.
        for fs in self.by_block:
            for role, f in enumerate(f for f in fs if f.streamed):
                f.role = role
        streamed = [f for f in self.flats if f.streamed]
        self.slots: list[torch.Tensor] = []
        self._free: dict[int, list[torch.Tensor]] = {}
        for role in sorted({f.role for f in streamed}):
            count = depth + WINDOW_EXTRA  # as the planner counts the window
            size = max(f.nbytes for f in streamed if f.role == role)
            arena = self._alloc(size * count)
            self._free[role] = [arena[i * size : (i + 1) * size] for i in range(count)]
            self.slots += self._free[role]
            self.ledger.add(Tier.DEVICE, Kind.STAGING, size * count)
        # Staged NVMe fetches: host buffers for the reads in flight (the window's depth and the block
        # computing), and for an update's host copy. A buffer goes back once its copy into the window and
        # its write to the drive are done (``_retiring``).
        self._stage: BufferPool | None = None
        self._retiring: list[tuple[torch.cuda.Event | None, PendingIO | None, PoolBuffer]] = []
        nvme = [f for f in self.flats if f.home is Tier.NVME]
        # Sharded NVMe homes are read straight into the window, but a shard's update needs host buffers.
        if (self.staged or group is not None) and nvme:
            classes: dict[int, int] = {}  # one set of buffers per streamed role (LoRA: base, adapters)
            for role in {f.role for f in nvme}:
                size = max(f.home_nbytes for f in nvme if f.role == role)
                classes[size] = classes.get(size, 0) + depth + WINDOW_EXTRA
            self._stage = BufferPool(
                classes,
                pinned=self.cuda,
                tier=Tier.PINNED if self.cuda else Tier.DEVICE,
                ledger=ledger,
            )
        self._slot_starts = sorted((s.data_ptr(), k) for k, s in enumerate(self.slots))
        self._owner: dict[int, Flat] = {}  # slot index -> flat it holds
        self._hooks: list = []
        self._layer_roots = {b.name: i for i, b in enumerate(blocks) if b.kind == "layer"}
        self._hook_modules(blocks)

    # -- homes ------------------------------------------------------------------------------------------

    def _alloc(self, nbytes: int) -> torch.Tensor:
        if self.cuda:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return numa_empty(nbytes)

    def _place_home(self, f: Flat, nodes: list[int] | None) -> None:
        """Move the flat's freshly built weights to their home (this rank's shard of them, when sharded)
        and account for them."""
        buffer, raw = f.flat.buffer, f.flat.slot
        if f.span is not None:  # this rank keeps its shard (zero-padded to whole pages), drops the rest
            buffer, raw = flat_buffer(f.span.size, f.dtype, torch.device("cpu"))
            buffer[: f.span.numel].copy_(f.flat.buffer[f.span.lo : f.span.hi])
            buffer[f.span.numel :].zero_()
            f.flat.buffer = f.flat.slot = None
        if f.home is Tier.DEVICE and f.span is None:  # computed on where it lives
            if buffer.device != self.device:
                moved = self._alloc(f.nbytes).view(f.dtype)[: f.numel]
                moved.copy_(buffer)
                self._point(f, moved)
                f.flat.buffer = moved
            f.home_buffer = f.flat.buffer
        elif f.home is Tier.DEVICE:  # the shard on the device: the whole flat is gathered into a slot
            f.home_buffer = buffer.to(self.device)
            self._unpoint(f)
        elif f.home is Tier.NVME:
            if self.store is None:
                raise ValueError("weights homed on NVMe need a store")
            f.extent = self.store.allocate(f"{f.flat.block}#{f.index}", f.home_nbytes, Kind.PARAMS)
            if not f.trainable:  # counted apart: a tuned base's traffic is what compression cuts
                f.extent.label = "frozen params"
            self.store.write(f.extent, raw[: f.home_nbytes]).wait()
            f.flat.buffer = f.flat.slot = None  # the only copy is on the drive now
            self._unpoint(f)
        else:  # host or CXL memory of a CUDA machine
            home = numa_empty(f.home_nbytes, nodes=nodes, interleave=bool(nodes) and len(nodes) > 1)
            typed = home.view(f.dtype)[: f.home_numel]
            typed.copy_(buffer)
            if torch.cuda.is_available():
                torch.cuda.cudart().cudaHostRegister(home.data_ptr(), home.numel(), 0)
            f.home_buffer = typed
            self._unpoint(f)
        if f.home is not Tier.NVME:
            self.ledger.add(f.home, Kind.PARAMS, f.home_nbytes)

    def _point(self, f: Flat, buffer: torch.Tensor) -> None:
        with torch.no_grad():
            for p, offset, shape in zip(f.params, f.flat.offsets, f.shapes):
                p.data = buffer[offset : offset + p.numel()].view(shape)

    def _unpoint(self, f: Flat) -> None:
        """Point the flat's parameters at a NaN placeholder of their shape (no memory)."""
        if f.dtype not in self._poison:  # integers (compressed codes) have no NaN: all bits set instead
            fill = float("nan") if f.dtype.is_floating_point else torch.iinfo(f.dtype).max
            self._poison[f.dtype] = torch.full((1,), fill, dtype=f.dtype, device=self.device)
        for p, shape in zip(f.params, f.shapes):
            p.data = self._poison[f.dtype].expand(shape)

    # -- the window -------------------------------------------------------------------------------------

    def resident(self, f: Flat) -> torch.Tensor:
        """The flat's weights on the device (1-D, typed), fetching them if needed; the caller may change
        them (the update does, then calls :meth:`writeback`), so no write of them is left in flight."""
        if not f.streamed:
            return f.home_buffer
        self._ensure([f])
        self._wait_write(f)
        return f.slot.view(f.dtype)[: f.numel]

    def blank(self, f: Flat) -> torch.Tensor:
        """The flat's weights on the device like :meth:`resident`, but the caller will overwrite every one of
        them (an update that writes 16-bit weights from their masters): a flat not in the window gets a slot
        without a read of its home."""
        if not f.streamed or f.slot is not None:
            return self.resident(f)
        slot = self._take_slot(f.role, {f})
        if slot is None:
            raise StreamError(f"no window slot for {f.flat.block}; raise offload.prefetch_depth")
        f.slot, f.last_use = slot, self._clock
        self._owner[self._slot_index(slot)] = f
        self._point(f, slot.view(f.dtype)[: f.numel])
        self._wait_write(f)
        return slot.view(f.dtype)[: f.numel]

    def need(self, block: int) -> None:
        """Block ``block`` is about to compute: make it resident, and fetch the next ones ahead."""
        self._clock += 1
        if self._stage is not None:  # staged reads that landed: start their copies into the window now
            self._retire()
            for f in [f for f in self.flats if f.staged is not None and f.pending.transferred()]:
                self._land(f)
        if self.group is not None:  # the shards read since the last block are in place: gather them
            self._launch_gathers()
        flats = [f for f in self.by_block[block] if f.streamed]
        self._ensure(flats)
        step = -1 if self.backward else 1
        ahead = [block + step * k for k in range(1, self.depth + 1)]
        keep = set(flats)
        for j in ahead:
            if 0 <= j < len(self.by_block):
                if self.group is not None and self.before_use is not None:
                    self.before_use(j)  # a pending update changes the shards: it lands before the gather
                for f in self.by_block[j]:
                    if f.streamed and f.slot is None:
                        slot = self._take_slot(f.role, keep)
                        if slot is None:
                            return
                        self._start_fetch(f, slot)
                    keep.add(f)

    def _ensure(self, flats: list[Flat]) -> None:
        keep = set(flats)
        for f in flats:
            f.last_use = self._clock
            if f.slot is None:
                slot = self._take_slot(f.role, keep)
                if slot is None:
                    raise StreamError(
                        f"the window of {len(self.slots)} slots cannot hold the {len(flats)} flat buffers "
                        f"block {f.flat.block} needs at once; raise offload.prefetch_depth"
                    )
                self._start_fetch(f, slot)
        for f in flats:
            self._finish_fetch(f)

    def _take_slot(self, role: int, keep: set[Flat]) -> torch.Tensor | None:
        if self._free[role]:
            return self._free[role].pop()
        victims = [f for f in self._owner.values() if f.role == role and f not in keep]
        if not victims:
            return None
        victim = min(victims, key=lambda f: f.last_use)
        return self._evict(victim)

    def _evict(self, f: Flat) -> torch.Tensor:
        self._finish_fetch(f)
        self._wait_write(f)  # the slot is the source of a write to the drive
        slot = f.slot
        if self.cuda:  # the next copy into the slot must wait for the kernels that read it
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        del self._owner[self._slot_index(slot)]
        f.slot = None
        self._unpoint(f)
        return slot

    def _slot_index(self, slot: torch.Tensor) -> int:
        return self._slot_starts[
            bisect.bisect_right(self._slot_starts, (slot.data_ptr(), len(self.slots))) - 1
        ][1]

    def _start_fetch(self, f: Flat, slot: torch.Tensor) -> None:
        if f.span is not None:
            self._start_shard_fetch(f, slot)
            return
        if f.home is Tier.NVME:
            try:
                self._wait_write(f)  # never read a home while its newest bytes are on their way to it
                staged = self._acquire_stage(f.nbytes) if self.staged else None
            except BaseException:
                self._free[f.role].append(slot)
                raise
            f.slot, f.staged = slot, staged
            self._owner[self._slot_index(slot)] = f
            try:
                f.pending = self.store.read(f.extent, staged.slot if staged is not None else slot)
            except BaseException:
                self._abandon(f)
                raise
            return
        f.slot = slot
        self._owner[self._slot_index(slot)] = f
        # host or CXL home, CUDA device: an asynchronous copy on the side stream
        self._async_copy(f, slot.view(f.dtype)[: f.numel], f.home_buffer)
        f.home_read = f.copied

    def _start_shard_fetch(self, f: Flat, slot: torch.Tensor) -> None:
        """Bring this rank's shard to its place in the slot; the gather of the others' goes out later (see
        :meth:`_launch_gathers`)."""
        f.slot = slot
        self._owner[self._slot_index(slot)] = f
        try:
            if f.home is Tier.NVME:
                self._wait_write(f)  # never read a home while its newest bytes are on their way to it
                if self.staged:
                    f.staged = self._acquire_stage(f.home_nbytes)
                    f.pending = self.store.read(f.extent, f.staged.slot)
                else:  # straight into its place: a shard is whole pages
                    f.pending = self.store.read(f.extent, self._own_part(f))
            elif self.cuda:  # the shard's host or device home, copied on the side stream
                self._async_copy(f, self._own_part(f).view(f.dtype), f.home_buffer)
                f.home_read = f.copied
            else:
                self._own_part(f).view(f.dtype).copy_(f.home_buffer)
        except BaseException:
            self._abandon(f)
            raise
        self._gathers.append(f)

    def _own_part(self, f: Flat) -> torch.Tensor:
        """The bytes of the flat's slot that hold this rank's shard (all of it, unsharded)."""
        if f.span is None:
            return f.slot[: f.nbytes]
        return f.slot[f.span.rank * f.home_nbytes : (f.span.rank + 1) * f.home_nbytes]

    def _launch_gathers(self, upto: Flat | None = None) -> None:
        """Send out the gathers of the fetches started so far, oldest first (every rank started them in the
        same order), each once its own shard is in place; up to and including ``upto``'s, or all."""
        if upto is not None and upto not in self._gathers:
            return
        while self._gathers:
            f = self._gathers.popleft()
            try:
                if f.staged is not None:  # read into a host buffer: on to its place in the slot
                    self._land(f)
                elif f.pending is not None:
                    pending, f.pending = f.pending, None
                    pending.wait()
            except BaseException:
                self._abandon(f)
                raise
            if self.cuda:  # NCCL's stream waits for the side stream: the shard's copy into place comes first
                with torch.cuda.stream(self.copy_stream):
                    f.gathering = self.group.gather(f.slot[: f.nbytes])
            else:
                f.gathering = self.group.gather(f.slot[: f.nbytes])
            if f is upto:
                return

    def _finish_gather(self, f: Flat) -> None:
        self._launch_gathers(upto=f)
        if f.gathering is not None:
            gathering, f.gathering = f.gathering, None
            if not gathering.is_completed():  # the compute stalls on the other ranks: count it, show it
                self.waits += 1
                with trace.span("compute", f"wait for {f.flat.block} gather"):
                    gathering.wait()
            else:
                gathering.wait()
        if f.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(f.copied)
            f.copied = None
        self._point(f, f.slot.view(f.dtype)[: f.numel])

    def _finish_fetch(self, f: Flat) -> None:
        if f.span is not None:
            self._finish_gather(f)
            return
        if f.pending is None and f.copied is None:
            if f.slot is not None and f.params[0].data.data_ptr() != f.slot.data_ptr():
                self._point(f, f.slot.view(f.dtype)[: f.numel])
            return
        if f.pending is not None:
            if not f.pending.transferred():  # the compute stalls on the drive: count it, and show it
                self.waits += 1
                with trace.span("compute", f"wait for {f.flat.block}"):
                    f.pending.wait()
            if f.staged is not None:
                self._land(f)
            else:
                pending, f.pending = f.pending, None
                try:
                    pending.wait()
                except BaseException:
                    self._abandon(f)
                    raise
        if f.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(f.copied)
            f.copied = None
        self._point(f, f.slot.view(f.dtype)[: f.numel])

    def _wait_write(self, f: Flat) -> None:
        """Wait for the write of the flat to its home, raising its error if it failed."""
        if f.writing is not None:
            writing, f.writing = f.writing, None
            writing.wait()

    def writeback(self, f: Flat) -> None:
        """The flat's weights changed in the window (a checkpoint loaded into it, or the optimizer step
        without an accelerator): send them home."""
        if f.home is Tier.NVME:
            self._wait_write(f)
            if self.staged:  # through a host buffer: the drive cannot read device memory
                buf = self._acquire_stage(f.nbytes)
                buf.slot[: f.nbytes].copy_(f.slot[: f.nbytes])
                f.writing = self.store.write(f.extent, buf.slot[: f.nbytes])
                self._retiring.append((None, f.writing, buf))
            else:
                f.writing = self.store.write(f.extent, f.slot)
        elif f.streamed:  # host or CXL home: copy back (the window copy stays valid)
            f.home_buffer.copy_(f.slot.view(f.dtype)[: f.numel])

    # -- staged NVMe homes (an accelerator's window) -------------------------------------------------

    def _copy_in(self, f: Flat, src: torch.Tensor) -> None:
        """Copy host bytes (uint8, or the flat's own dtype) into the flat's window slot: on the side stream,
        after every kernel queued so far (one may still read the slot's old weights), with an event the
        compute will wait for."""
        part = self._own_part(f)
        dst = part if src.dtype == torch.uint8 else part.view(f.dtype)[: f.home_numel]
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            self._async_copy(f, dst, src)
        else:
            dst.copy_(src)

    def _async_copy(self, f: Flat, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)`` on the side stream; ``f.copied`` marks its end (and, when tracing, the copy
        goes on the trace's ``copies`` track with the device's own timing)."""
        tracer = trace.current()
        with torch.cuda.stream(self.copy_stream):
            start = None
            if tracer is not None:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.copy_stream)
            dst.copy_(src, non_blocking=True)
            f.copied = torch.cuda.Event(enable_timing=tracer is not None)
            f.copied.record(self.copy_stream)
        if tracer is not None:
            tracer.device_span("copies", f"{f.flat.block} to device", start, f.copied, bytes=f.nbytes)

    def _abandon(self, f: Flat) -> None:
        """A fetch into the flat's slot failed: give the slot back, so nothing computes on what it holds."""
        with contextlib.suppress(ValueError):
            self._gathers.remove(f)
        if f.gathering is not None:  # a collective cannot be called back: let it finish first
            with contextlib.suppress(Exception):
                f.gathering.wait()
            f.gathering = None
        if f.staged is not None:
            settle(f.pending)
            self._stage.release(f.staged)
        f.pending = f.staged = None
        if f.slot is not None:
            del self._owner[self._slot_index(f.slot)]
            self._free[f.role].append(f.slot)
            f.slot = None
        self._unpoint(f)

    def _land(self, f: Flat) -> None:
        """A staged read is done (or must be): check it, start its copy into the window."""
        pending, buf = f.pending, f.staged
        f.pending = f.staged = None
        try:
            pending.wait()
        except BaseException:
            if pending.transferred():  # not while an interrupted read may still land in it
                self._stage.release(buf)
            self._abandon(f)
            raise
        self._copy_in(f, buf.slot[: f.home_nbytes])
        self._retiring.append((f.copied, None, buf))

    def _retire(self, block: bool = False) -> None:
        """Give back the host buffers whose copy and write are done (``block``: the oldest, done or not).
        A write's error is raised here, or by the next wait for that flat's write."""
        i = 0
        while i < len(self._retiring):
            event, io, buf = self._retiring[i]
            if block or ((event is None or event.query()) and (io is None or io.transferred())):
                if event is not None:
                    event.synchronize()
                del self._retiring[i]
                try:
                    if io is not None:
                        io.wait()
                finally:
                    self._stage.release(buf)
                block = False
            else:
                i += 1

    def _acquire_stage(self, nbytes: int) -> PoolBuffer:
        while True:
            self._retire()
            try:
                return self._stage.acquire(nbytes, timeout_s=0)
            except PoolExhausted:
                pass
            landing = [f for f in self.flats if f.staged is not None]
            if self._retiring:
                self._retire(block=True)
            elif landing:  # every buffer holds a read: let the oldest land in its slot
                oldest = min(landing, key=lambda f: f.last_use)
                if oldest.span is not None:  # into its place only: its gather goes out in its turn
                    self._land(oldest)
                else:
                    self._finish_fetch(oldest)
            else:
                raise StreamError(
                    f"all {sum(self._stage.classes.values())} host staging buffers are held by updates; "
                    "raise offload.prefetch_depth"
                )

    def host_copy(self, f: Flat, read: bool = True) -> torch.Tensor:
        """The NVMe-homed flat's weights in a host buffer, for an update on the CPU (``read`` False: a buffer
        the caller will fill entirely, the drive not read); :meth:`put_home` sends them back."""
        self._wait_write(f)
        f.host = self._acquire_stage(f.home_nbytes)
        if not read:
            return f.host.slot[: f.home_nbytes].view(f.dtype)[: f.home_numel]
        io = None
        try:
            io = self.store.read(f.extent, f.host.slot)
            io.wait()
        except BaseException:
            if io is None or io.transferred():  # not while an interrupted read may still land in it
                self._stage.release(f.host)
            f.host = None
            raise
        return f.host.slot[: f.home_nbytes].view(f.dtype)[: f.home_numel]

    def put_home(self, f: Flat) -> None:
        """The host copy from :meth:`host_copy` was updated: write it home and into the window, if the
        window holds the flat (no second read of the drive)."""
        buf, f.host = f.host, None
        try:
            if f.slot is not None and f.span is not None:  # every rank's shard changed: gathered anew
                self._free[f.role].append(self._evict(f))
            elif f.slot is not None:
                self._finish_fetch(f)  # a fetch still in flight would land over the new weights
                self._copy_in(f, buf.slot[: f.nbytes])
            f.writing = self.store.write(f.extent, buf.slot[: f.home_nbytes])
        except BaseException:
            self._retiring.append((f.copied if f.slot is not None else None, None, buf))
            raise
        self._retiring.append((f.copied, f.writing, buf))

    def reload(self, f: Flat) -> None:
        """The flat's host or CXL home was updated in place: copy it into the window if the window holds
        the flat (a prefetched copy stays useful), else nothing to do. A shard's update changes every
        rank's part of the flat: the window copy is dropped, and gathered anew when needed."""
        if f.span is not None:
            self.refresh(f)
        elif f.slot is not None:
            self._finish_fetch(f)  # a fetch still in flight would land over the new weights
            self._copy_in(f, f.home_buffer)
            f.home_read = f.copied

    def writable_home(self, f: Flat) -> torch.Tensor:
        """The flat's host or CXL home, once no copy out of it is still running: the CPU may change it."""
        if f.home_read is not None:
            f.home_read.synchronize()
            f.home_read = None
        return f.home_buffer

    def load_weights(self, f: Flat, values: torch.Tensor) -> None:
        """Set the flat's weights to ``values`` (the whole flat, rounded to its dtype) where they live: this
        rank's part of them, when sharded (a checkpoint being loaded)."""
        if f.span is None:
            self.resident(f).copy_(values)
            self.writeback(f)
            return
        part = values[f.span.lo : f.span.hi]
        home = self.host_copy(f, read=False) if f.home is Tier.NVME else self.writable_home(f)
        home[: part.numel()].copy_(part)
        home[part.numel() :].zero_()
        if f.home is Tier.NVME:
            self.put_home(f)
        else:
            self.refresh(f)

    def home_values(self, f: Flat) -> torch.Tensor:
        """A copy, in host memory, of the weights of the flat this rank homes (its shard, when sharded)."""
        if f.span is None:
            return self.resident(f).to("cpu", copy=True)
        if f.home is not Tier.NVME:
            return self.writable_home(f)[: f.span.numel].to("cpu", copy=True)
        data = self.host_copy(f)
        try:
            return data[: f.span.numel].clone()
        finally:
            self._stage.release(f.host)
            f.host = None

    def refresh(self, f: Flat) -> None:
        """The flat's home changed (a host-side update): drop the stale window copy."""
        if f.slot is not None:
            self._free[f.role].append(self._evict(f))

    def drain(self) -> None:
        """Wait for every write to the drive (before a checkpoint reads the homes back)."""
        for f in self.flats:
            self._wait_write(f)
        while self._retiring:
            self._retire(block=True)

    # -- hooks ------------------------------------------------------------------------------------------

    def _hook_modules(self, blocks: list[Block]) -> None:
        """Pre-hooks on every module that holds a block's parameters directly, and on each layer's root
        (which fires first, so the next layers are fetched earlier). The submodules' hooks are what makes
        activation checkpointing work: a checkpointed layer recomputes its ``forward`` in backward, which
        runs its submodules' hooks but not the root's."""
        owner = {id(p): i for i, b in enumerate(blocks) for p in b.params.values()}
        for name, module in self.model.named_modules():
            needs = {owner[id(p)] for p in module.parameters(recurse=False) if id(p) in owner}
            if name in self._layer_roots:
                needs.add(self._layer_roots[name])
            if needs:
                self._hooks.append(module.register_forward_pre_hook(self._pre_hook(sorted(needs))))

    def _pre_hook(self, needs: list[int]) -> Callable:
        def hook(module: nn.Module, args: object) -> None:
            for i in needs:
                if self.before_use is not None:
                    self.before_use(i)
                self.need(i)

        return hook

    def saved_tensors(self) -> torch.autograd.graph.saved_tensors_hooks:
        """Context for a forward pass whose backward follows (see the module docstring)."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> object:
        if not self.slots or t.device != self.device or t.numel() == 0:
            return t
        ptr = t.data_ptr()
        at = bisect.bisect_right(self._slot_starts, (ptr, len(self.slots))) - 1
        if at < 0:
            return t
        start, k = self._slot_starts[at]
        f = self._owner.get(k)
        if f is None or ptr >= start + self.slots[k].numel():
            return t
        if (ptr - start) % t.element_size():
            raise StreamError(f"a tensor saved for backward is a misaligned view into {f.flat.block}'s slot")
        offset = (ptr - start) // t.element_size()
        return _InSlot(f, t.dtype, offset, tuple(t.shape), t.stride())

    def _unpack(self, saved: object) -> torch.Tensor:
        if not isinstance(saved, _InSlot):
            return saved
        self.need(saved.flat.block)
        buffer = saved.flat.slot.view(saved.dtype)
        return buffer.as_strided(saved.shape, saved.stride, buffer.storage_offset() + saved.offset)

    def close(self, gather: bool = True, frozen: bool = True) -> None:
        """Remove the hooks; with ``gather``, bring every weight back resident on the device so that the
        model works alone (for an export: it needs the whole model in device memory), or with ``frozen``
        False only the trainable ones (an adapter's export: the base is never gathered)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        try:
            self.drain()
        finally:
            if not gather:  # on the way out of an error: no buffer is left with a transfer into it
                self._gathers.clear()  # never sent: no rank waits for them
                for f in self.flats:
                    if f.gathering is not None:
                        with contextlib.suppress(Exception):
                            f.gathering.wait()
                        f.gathering = None
                    if f.staged is None and f.pending is not None:
                        settle(f.pending)
                        f.pending = None
                    if f.staged is not None:
                        settle(f.pending)
                        self._stage.release(f.staged)
                        f.pending = f.staged = None
                    if f.host is not None:
                        self._stage.release(f.host)
                        f.host = None
                self._close_stage()
        if not gather:
            return
        copies = {f: self.resident(f).clone() for f in self.flats if f.streamed and (frozen or f.trainable)}
        for f in list(self._owner.values()):
            f.slot = None
            self._unpoint(f)  # a frozen flat left home (frozen=False) points at no memory
        self._owner.clear()
        for f, data in copies.items():  # only now: fetching one flat may evict another
            self._point(f, data)
        self._close_stage()

    def _close_stage(self) -> None:
        """Unpin the staging buffers once no transfer uses them (pinned memory is scarce)."""
        if self._stage is None:
            return
        with contextlib.suppress(Exception):  # on the way out of an error: whatever can be given back
            while self._retiring:
                self._retire(block=True)
        with contextlib.suppress(RuntimeError):  # a buffer still out: left to the finalizer
            self._stage.close()


@dataclass(frozen=True)
class _InSlot:
    flat: Flat
    dtype: torch.dtype  # of the saved tensor (a view may reinterpret the weights)
    offset: int  # in elements of ``dtype`` from the slot's start
    shape: tuple[int, ...]
    stride: tuple[int, ...]
