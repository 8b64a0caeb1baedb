"""AdamW over flat blocks, each block's state where the plan put it, each block updated while the compute
goes on: during the backward that completes its gradients, or just before its next use.

Gradients leave autograd as soon as each parameter's gradient is complete: a post-accumulate hook adds it
into the block's fp32 gradient buffer in the gradient home and drops the parameter's ``.grad``, so no
full set of gradients ever builds up on the device. When an update runs (``optim.overlap``):

- ``backward``: in the step's last backward (:meth:`BlockAdamW.arm`), a block whose every gradient has
  arrived is updated at once, while backward goes on through the blocks before it, *speculatively*: as if
  the step will neither clip nor skip, with what the update overwrites (weights, moments) copied aside.
  :meth:`BlockAdamW.step` then computes the global norm from the per-tensor norms taken at each block's
  completion (the same numbers ``clip_grad_norm_`` takes) and validates: when the clipping coefficient is
  exactly 1, the norm finite and the lr the one assumed, the updates stand; otherwise they are undone and
  redone as ordinary updates with the clipped gradient (or undone, and the step skipped). The result is
  the ordinary step's, bit for bit. A block beyond the undo space, or whose gradient arrives late (after
  its update), waits as below; after a step that clipped or skipped, the next one does not speculate;
- ``forward``: :meth:`BlockAdamW.step` clips, checks, and marks every block that got a gradient as
  *pending*. A pending block is updated when something is about to use its weights: the streamer's
  forward pre-hook calls :meth:`ensure` (the next forward runs block by block over freshly updated
  blocks, and the update's NVMe traffic hides behind the compute of the blocks around it), and
  :meth:`flush` updates what is left before a checkpoint, an export or the next step. Nothing reads a
  block's weights, moments or gradient before its update, so the numbers are those of an update right
  after backward;
- ``none``: every update inside :meth:`step`, right after backward (the ordinary step, for comparison).

On an accelerator (``interleave``), each step some pending blocks whose state is in memory are updated on
it instead: weights, gradient and moments copied over, updated, copied back, each stage on its own
stream, two blocks in flight, while the CPU updates the others; :mod:`tiertune.optim.interleave` plans
which, and learns both sides' rates from the blocks' measured times.

An update is one call of the CPU AdamW kernel (:mod:`tiertune.optim.kernels`: torch's fused AdamW, the
same per-element arithmetic as ``torch.optim.AdamW(fused=True)``, or DeepSpeed's CPU Adam) on views of the
flat buffers; the new weights go home (the streamer writes NVMe-homed weights back).

Weights in a 16-bit dtype (``train.dtype=bf16``) have fp32 masters, kept with the moments as a third part
of the optimizer state (``[exp_avg | exp_avg_sq | master]``, in memory or in each NVMe chunk): the update
runs on the masters, and the kernel writes the 16-bit weights from them in the same pass, so the weights
are always their masters rounded. Only the 16-bit weights stream through the window (half the bytes of
fp32), and checkpoints hold the masters.

Optimizer state on NVMe moves in chunks through a few staging slots, as a ring: chunks are read ahead in
the order the next updates will want them (the blocks' order, or its reverse when backward will update
them) as soon as a slot is free, a chunk is updated in its slot, then written back while the compute
goes on. A chunk is never read while its own write is in flight.

A parameter that got no gradient in a step is left alone, moments included, as torch does. Checkpoints
hold ``optimizer.pt`` in ``torch.optim.AdamW``'s state_dict layout, written one block at a time.

Across ranks (the streamer's :class:`ShardGroup`), each state covers this rank's shard of its flat only:
gradients arrive reduce-scattered (:mod:`reduce`), the update runs on the shard in its home, the global
norm is gathered from every rank's, and checkpoints gather each block's shards into the same files a
single process writes (rank 0 writes them), so a run resumes with any number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import math
import pickle
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from tiertune import trace
from tiertune.config import OptimConfig
from tiertune.errors import CheckpointError
from tiertune.memory import Kind, Ledger, Tier
from tiertune.memory.numa import ALIGN, align_up
from tiertune.memory.pool import BufferPool, PoolBuffer, _register_pinned
from tiertune.offload.flat import flat_buffer
from tiertune.offload.planner import OPTIMIZER_CHUNK_BYTES, OPTIMIZER_SLOTS
from tiertune.offload.shard import Span
from tiertune.offload.store import Extent, NvmeStore, PendingIO, StoreError, settle
from tiertune.offload.streaming import BlockStreamer, Flat
from tiertune.offload.tensorfile import Deferred, write_torch
from tiertune.optim.interleave import DEVICE_SLOTS, IN_BYTES_PER_PARAM, Interleaver, Side
from tiertune.optim.kernels import AdamWKernel, TorchAdamW
from tiertune.optim.reduce import GradReducer
from tiertune.optim.tied import SharedUses, later_uses
from tiertune.optim.updater import OPTIMIZER_FILE, StepReport, param_groups

# Run the device side of interleaved updates on the CPU (scratch, copies and kernel as on an accelerator, done
# at once): the tests' way to exercise that path without one, as streaming.STAGE_ON_CPU does for weights.
UPDATE_ON_CPU = False
LEGACY_STATE_FILE = "optimizer-blocks.safetensors"  # read on resume; written before optimizer.pt
_HOST = torch.device("cpu")  # gradients and in-memory state live where the CPU update runs


@dataclass(eq=False)
class _Chunk:
    start: int  # element range of the flat
    stop: int
    extent: Extent | None = None  # [exp_avg | exp_avg_sq (| master)] on NVMe
    unit: int = -1  # its place in the ring of NVMe chunks


@dataclass(eq=False)
class _State:
    flat: Flat
    home: Tier
    grad: torch.Tensor  # fp32, 1-D, in the gradient home: ``numel`` elements from ``lo``
    touched: list[bool]  # per parameter: a gradient arrived this step
    steps: list[int]  # per parameter: updates applied (torch keeps one step count per parameter)
    decay: list[bool]
    numel: int  # elements of the flat this state covers: all, or this rank's shard
    lo: int = 0  # the first of them; every buffer and chunk below counts from it
    span: Span | None = None  # this rank's shard, when sharded across ranks
    chunks: list[_Chunk] = field(default_factory=list)
    # [exp_avg | exp_avg_sq], and for 16-bit weights their fp32 masters: [exp_avg | exp_avg_sq | master]
    # (each part the flat's size), when the home is memory; each NVMe chunk holds its range so.
    moments: torch.Tensor | None = None
    parts: int = 2
    # 16-bit weights whose masters were never set: the first update (or a checkpoint) takes them from the
    # weights, so a job starts without writing (or holding) its masters.
    fresh: bool = False
    pending: bool = False  # stepped, not yet updated: its gradient holds the clipped step gradient
    on_device: bool = False  # pending, and planned to be updated on the device (see BlockAdamW._launch)
    # Speculation (see BlockAdamW.arm): which parameters' gradients arrived in the armed backward, what the
    # block's speculative update overwrote, its gradients' per-tensor norms, and whether a gradient came
    # after that update (the update then used an incomplete gradient).
    fired: list[bool] = field(default_factory=list)
    # per chunk updated speculatively: [weights | exp_avg | exp_avg_sq] as they were before
    backup: list[tuple[_Chunk, torch.Tensor]] | None = None
    norms: torch.Tensor | None = None
    late: bool = False
    # per parameter that several modules share: its later uses' gradient of this backward, until its first
    # use's arrives (see tiertune.optim.tied)
    later: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(eq=False)
class _OnDevice:
    """A block's update queued on the device: where its weights come back to, its scratch slot, and the
    events that time it (None where the CPU stands in for the device: the work is done when launched)."""

    state: _State
    params: torch.Tensor
    slot: int
    events: list[torch.cuda.Event] | None  # start and end of each stage: copy in, kernel, copy out
    seconds: float | None


def _parts(state: torch.Tensor, parts: int, k: int | None = None) -> list[torch.Tensor]:
    """``[exp_avg | exp_avg_sq (| master)]`` of ``k`` elements each (default: a third or half of
    ``state``) as fp32 views; ``state`` may be a raw staging slot (uint8)."""
    if state.dtype != torch.float32:
        state = state.view(torch.float32)
    k = state.numel() // parts if k is None else k
    return [state[i * k : (i + 1) * k] for i in range(parts)]


def _in_chunk(s: _State, c: _Chunk) -> Iterator[tuple[int, int, int]]:
    """(index, start, stop) of each of the flat's parameters that overlaps chunk ``c``: the overlap's
    element range in the state (counted from ``s.lo``, as the chunks and the state's buffers are)."""
    for i, (offset, p) in enumerate(zip(s.flat.flat.offsets, s.flat.params)):
        lo, hi = max(offset - s.lo, c.start), min(offset - s.lo + p.numel(), c.stop)
        if lo < hi:
            yield i, lo, hi


def _pin(t: torch.Tensor) -> None:
    """Page-lock the whole allocation behind a host buffer of ours (page-aligned, as flat_buffer makes them)
    for asynchronous copies; unlocked when the buffer is freed."""
    whole = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
    _register_pinned(whole)
    weakref.finalize(t, torch.cuda.cudart().cudaHostUnregister, whole.data_ptr())


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
        order: list[str] | None = None,
        overlap: str = "forward",
        rollback_bytes: int = 0,
        kernel: AdamWKernel | None = None,
        interleave: Interleaver | None = None,
        update_device: torch.device | None = None,
        device_free_bytes: int = 0,
        decayed: Callable[[str], bool] | None = None,
    ) -> None:
        """``homes`` maps a block name to the home tier of its optimizer state; gradients live on
        ``grads_tier`` (host memory, or the device itself on a machine without an accelerator). NVMe state
        moves in chunks of at most ``chunk_bytes`` through ``slots`` staging buffers (at least 2). ``order``
        names the trainable parameters in the model's order (``named_parameters``): checkpoints number
        them as ``torch.optim.AdamW`` over that list would (default: the blocks' order).

        ``overlap`` says when the updates run: ``backward`` (speculatively, as each block's gradients
        complete in the step's last backward, with ``rollback_bytes`` of host memory for what they
        overwrite; blocks beyond it, and every block after a step that clipped or skipped, wait for the
        next forward), ``forward`` (each just before the block's next use) or ``none`` (all in
        :meth:`step`). ``kernel`` runs the arithmetic (default: torch's fused AdamW). With ``interleave``,
        each step some pending blocks whose state is in memory are updated on ``update_device`` (their
        weights, gradient and moments copied there and back, two blocks in flight in at most
        ``device_free_bytes`` of scratch) while the CPU updates the others, as the interleaver plans.
        ``decayed`` says by name which parameters weight decay applies to (default: the matrices)."""
        if overlap not in ("backward", "forward", "none"):
            raise ValueError(f"overlap must be backward, forward or none, not {overlap!r}")
        self.streamer, self.cfg, self.store, self.ledger = streamer, cfg, store, ledger
        self.grads_tier = grads_tier
        self.device = streamer.device
        self.states: list[_State] = []
        shape_of = {n: p.shape for f in streamer.flats for n, p in zip(f.flat.names, f.params)}
        decayed = decayed or (lambda name: len(shape_of[name]) >= 2)
        self._hooks = []
        for f in streamer.flats:
            if not f.trainable:
                continue
            home = homes[f.flat.block]
            lo, numel = (0, f.numel) if f.span is None else (f.span.lo, f.span.numel)
            grad = flat_buffer(numel, torch.float32, _HOST)[0] if numel else torch.zeros(0)
            self.ledger.add(grads_tier, Kind.GRADS, align_up(numel * 4))
            s = _State(
                f,
                home,
                grad,
                [False] * len(f.params),
                [0] * len(f.params),
                [decayed(name) for name in f.flat.names],
                numel,
                lo,
                f.span,
                parts=2 if f.dtype == torch.float32 else 3,  # 16-bit weights: an fp32 master too
            )
            s.fresh = s.parts == 3
            if home is Tier.NVME:
                if store is None:
                    raise ValueError("optimizer state on NVMe needs a store")
                step = max(ALIGN // 4, (chunk_bytes // (4 * s.parts)) // (ALIGN // 4) * (ALIGN // 4))
                for start in range(0, numel, step):
                    stop = min(numel, start + step)
                    size = 4 * s.parts * (stop - start)
                    ext = store.allocate(f"{f.flat.block}#{f.index}.adam[{start}]", size)
                    s.chunks.append(_Chunk(start, stop, ext))
            elif numel:
                s.moments = flat_buffer(s.parts * numel, torch.float32, _HOST)[0]
                s.moments.zero_()
                s.chunks.append(_Chunk(0, numel))
                self.ledger.add(home, Kind.OPTIMIZER, align_up(4 * s.parts * numel))
            else:  # a flat too small to reach this rank: nothing of it is held here
                s.moments = torch.zeros(0)
            self.states.append(s)
            for i, p in enumerate(f.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook(s, i)))
        if not self.states:
            raise ValueError("no trainable parameters: the tuning method left nothing to train")
        # Trained weights that several modules share (a tied embedding and LM head): a gradient per use.
        where = {id(p): (s, i) for s in self.states for i, p in enumerate(s.flat.params)}
        uses = later_uses(streamer.model, [p for s in self.states for p in s.flat.params])
        self._shared = SharedUses(
            streamer.model,
            uses,
            {k: self._later_use(*where[k], len(holders) == 1) for k, holders in uses.items()},
        )
        # Sharded across ranks: gradients come reduce-scattered into each state's shard (see reduce.py).
        self.group = streamer.group
        self._reducer = (
            GradReducer(self.group, self.states, self.device, ledger, on_reduced=self._reduced)
            if self.group is not None
            else None
        )
        shapes = {n: shape for s in self.states for n, shape in zip(s.flat.flat.names, s.flat.shapes)}
        order = list(shapes) if order is None else order
        if sorted(order) != sorted(shapes):
            raise ValueError("order must name each trainable parameter once")
        # torch.optim numbers parameters across its groups in order: the decayed ones, then the rest (the
        # stand-ins are matrices where decayed, as param_groups sorts them).
        stand_ins = [(n, torch.nn.Parameter(torch.empty((0,) * (2 if decayed(n) else 1)))) for n in order]
        groups = param_groups(stand_ins, cfg.weight_decay)
        name_of = {id(p): n for n, p in stand_ins}
        self._index = {name_of[id(p)]: k for k, p in enumerate(p for g in groups for p in g["params"])}
        self._groups = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True
        ).state_dict()["param_groups"]
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
        self.overlap = overlap
        self.kernel = kernel or TorchAdamW()
        # Speculation: the lr of the armed backward (None: not armed); blocks updated speculatively in it,
        # in order; a bump allocator over host memory for their backups; whether the next step speculates
        # (not after a step that clipped or skipped: the next one likely does too, and a rollback costs).
        self._armed_lr: float | None = None
        self._spec_lr: float | None = None  # the lr the speculative updates of this step used
        self._speculated: list[_State] = []
        self._rollback: torch.Tensor | None = None
        # Room to undo at least the smallest block, or no speculation at all (and read-ahead as for forward).
        smallest = min((s.numel for s in self.states if s.numel), default=0)
        if overlap == "backward" and rollback_bytes >= 12 * smallest:
            self._rollback = flat_buffer(rollback_bytes // 4, torch.float32, _HOST)[0]
            # Buffer space like the staging slots' (it holds copies in passing), counted as such.
            self.ledger.add(grads_tier, Kind.STAGING, align_up(rollback_bytes // 4 * 4))
        self._rollback_used = 0
        self._speculate_next = True
        self.rollbacks = 0  # speculative block updates undone, over the run (shown in benchmarks)
        self.speculated_blocks = 0  # and made
        # Updates on the device: the plan's model, its scratch (DEVICE_SLOTS blocks' weights, gradient and
        # moments), the stream the copies and kernels queue on (CUDA), the updates queued, in order.
        self.interleave = interleave
        self._scratch: torch.Tensor | None = None
        self._streams: tuple[torch.cuda.Stream, ...] | None = None
        self._device_kernel = TorchAdamW()  # whatever runs on the CPU, the device runs torch's
        self._launched: deque[_OnDevice] = deque()
        self.device_updates = 0  # block updates planned for the device, over the run
        fits = [s.numel for s in self.states if s.moments is not None and s.numel]
        fits = [n for n in fits if DEVICE_SLOTS * IN_BYTES_PER_PARAM * n <= device_free_bytes]
        if interleave is not None and update_device is not None and fits:
            self._scratch = torch.empty(
                (DEVICE_SLOTS, 4 * max(fits)), dtype=torch.float32, device=update_device
            )
            self.ledger.add(Tier.DEVICE, Kind.STAGING, self._scratch.nbytes)
            if update_device.type == "cuda":
                self._streams = tuple(torch.cuda.Stream(update_device) for _ in range(3))
                for s in self.states:  # copies to and from pinned memory run while the CPU goes on
                    if s.moments is not None:
                        _pin(s.grad)
                        _pin(s.moments)
        self._lr = cfg.lr  # of the last step (a checkpoint records it, as torch does)
        # An update that failed part way (an I/O error) leaves a block half stepped: nothing may go on
        # from that state, and no retry may step its chunks twice.
        self._failed: BaseException | None = None
        self.staging: BufferPool | None = None
        if self._units:
            slot = align_up(max(4 * s.parts * (c.stop - c.start) for s, c in self._units))
            tier = Tier.DEVICE if self.device.type == "cpu" else Tier.HOST
            self.staging = BufferPool({slot: self._slots}, tier=tier, ledger=ledger)
            # The first step's state: zero moments (and fresh masters, taken from the weights): no read needed.
            self._ahead.extend(range(len(self._units)))
        streamer.before_use = self.ensure
        self.zero_grad()

    @staticmethod
    def _add_home(s: _State, i: int, grad: torch.Tensor) -> None:
        """Add ``grad`` (parameter ``i``'s) into its slice of the fp32 gradient home."""
        offset, numel = s.flat.flat.offsets[i], s.flat.params[i].numel()
        s.grad[offset : offset + numel].add_(grad.reshape(-1).to(s.grad.device, torch.float32))
        s.touched[i] = True

    def _grad_hook(self, s: _State, i: int):
        def hook(p: torch.nn.Parameter) -> None:
            if s.pending:  # no pre-hook ran for the block in this forward: its weights were stale
                raise RuntimeError(
                    f"{s.flat.flat.block}: a gradient arrived before the block's pending update ran; "
                    "a module used its weights without the streamer's forward pre-hook"
                )
            later = s.later.pop(i, None)
            if later is not None:  # a shared weight's later uses: summed in place, as autograd would
                if p.grad is None:  # only they reached the weight in this backward
                    p.grad = later
                else:
                    p.grad.add_(later)
                del later  # freed before the home takes the sum
            elif p.grad is None:  # only later uses reached the weight, and their gradient went home
                return
            if self._reducer is not None:  # summed across ranks, into this rank's shard
                self._reducer.add(s, i, p.grad)
                p.grad = None
                return
            self._add_home(s, i, p.grad)
            p.grad = None
            if self._armed_lr is None:
                return
            if s.backup is not None:  # after the block's speculative update: that one must be redone
                s.late = True
                return
            s.fired[i] = True
            if all(s.fired):
                self._speculate(s)

        return hook

    def _later_use(self, s: _State, i: int, single: bool) -> Callable[[torch.Tensor], None]:
        """Where the gradient of a later use of the shared weight ``s``'s ``i`` goes (see
        :mod:`tiertune.optim.tied`). When its slice of the gradient home holds nothing yet and one use is
        still to come, fp32 (the sum autograd would make is the one the home makes), unsharded and not
        yet updated this step, it goes into the home at once: no weight-sized tensor outlives the use's
        backward. Otherwise it is kept for the first use's gradient to take in (:meth:`_grad_hook`)."""

        def sink(grad: torch.Tensor) -> None:
            into_home = single and self._reducer is None and grad.dtype == torch.float32
            if into_home and not s.touched[i] and not s.pending and s.backup is None:
                self._add_home(s, i, grad)
            else:  # kept (several later uses: summed first) for the first use's gradient to take in
                s.later[i] = grad if i not in s.later else s.later[i] + grad

        return sink

    def _reduced(self, s: _State, complete: bool) -> None:
        """A sharded state's gradient of this backward has landed: with every parameter's (``complete``)
        in the step's last backward, its update may run now, as :meth:`_grad_hook` starts it unsharded."""
        if complete and self._armed_lr is not None:
            self._speculate(s)

    def backward_done(self) -> None:
        """A backward has ended (the engine calls this on every rank): sharded gradients not yet reduced
        are reduced now, so every state holds its shard of the gradient summed over the ranks."""
        if self._reducer is not None:
            self._reducer.finish()

    @staticmethod
    def _grad_views(states: list[_State]) -> list[torch.Tensor]:
        """The touched parameters' gradients (their parts in each state), as views."""
        views = []
        for s in states:
            for i, lo, hi in _in_chunk(s, _Chunk(0, s.numel)):
                if s.touched[i]:
                    views.append(s.grad[lo:hi])
        return views

    def step(self, lr: float) -> StepReport:
        """Clip, check, and mark the blocks with a gradient for update (see the module docstring); validate
        the speculative updates made during backward: kept when the step is exactly what they assumed (no
        clipping, finite, this lr), else undone and redone as ordinary updates (or undone and skipped)."""
        self._check()
        self._armed_lr = None
        speculated, self._speculated = self._speculated, []
        self._run_pending()  # a block that was not used since the last step: update it now
        norms = []  # per tensor, in the blocks' order: clip_grad_norm_ over views of the flat buffers
        for s in self.states:
            if s.backup is not None and not s.late:
                norms.append(s.norms)  # its gradient has not changed since
            elif views := self._grad_views([s]):
                norms.append(torch.stack(torch._foreach_norm(views, 2.0)))
        if not any(any(s.touched) for s in self.states):  # no gradient: nothing to update (as torch.optim)
            return StepReport(grad_norm=0.0, skipped=False)
        local = torch.linalg.vector_norm(torch.cat(norms), 2.0) if norms else torch.zeros(())
        total = local if self.group is None else self.group.norm(local)  # the same on every rank
        norm = float(total)
        finite = math.isfinite(norm)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0) if finite else None
        exact = finite and float(coef) == 1.0  # grads * coef would change no bit
        self._speculate_next = exact
        undone = 0
        for s in speculated:
            if exact and lr == self._spec_lr and not s.late:
                self._spend(s)
                s.backup = s.norms = None
            else:
                self._roll_back(s)
                undone += 1
        self._rollback_used = 0
        counts = {"in_backward": len(speculated) - undone, "undone": undone}
        if not finite:
            self.zero_grad()  # a non-finite gradient would poison the moments: keep the state as it is
            return StepReport(grad_norm=norm, skipped=True, **counts)
        if grads := self._grad_views(self.states):  # none left when every block was updated in backward
            torch._foreach_mul_(grads, coef)
        self._lr = lr
        for s in self.states:
            if any(s.touched):
                s.pending = True
                self._pending.append(s)
        self._plan_sides()
        self._pump()  # the first updates planned for the device start now
        if self.overlap == "none":
            self._run_pending()
        # Read ahead only what this update needs; reads of untouched chunks give their slots back. With
        # nothing pending, read the next step's state in the order its updates will want it.
        needed = [c.unit for s in self._pending for c in s.chunks if c.extent is not None]
        if not needed:
            needed = self._next_order()
        for u in set(self._reads) - set(needed):
            self._drop_read(u)
        self._ahead = deque(u for u in needed if u not in self._reads)
        self._poll()
        return StepReport(grad_norm=norm, skipped=False, **counts)

    # -- speculation --------------------------------------------------------------------------------------

    def arm(self, lr: float) -> None:
        """The next backward is the step's last, and the step will use ``lr``: with ``overlap`` backward,
        update each block as soon as its gradients are complete (see :meth:`step` for the validation)."""
        if self.overlap != "backward" or self._rollback is None or not self._speculate_next:
            return
        self._check()
        self._armed_lr = self._spec_lr = lr
        for s in self.states:
            s.fired = [False] * len(s.touched)
            s.late = False

    def disarm(self) -> None:
        """The armed backward is over (or failed): no more speculative updates until the next arm()."""
        self._armed_lr = None

    def _speculate(self, s: _State) -> None:
        """Update ``s`` now, as if the step will neither clip nor skip, keeping what it overwrites."""
        need = 3 * s.numel
        if s.pending or self._rollback_used + need > self._rollback.numel():
            return  # no room to undo it: the update waits for the step, as an ordinary one
        views = self._grad_views([s])  # none: this rank holds no part of the block's touched weights
        norms = torch.stack(torch._foreach_norm(views, 2.0)) if views else torch.zeros(0)
        if not bool(torch.isfinite(norms).all()):
            self._armed_lr = None  # the step will be skipped: speculate no further
            return
        s.norms, s.backup = norms, []
        self._speculated.append(s)
        self.speculated_blocks += 1
        self._apply(s, self._armed_lr, speculative=True)  # its step counts advance when the step keeps it

    def _keep(self, s: _State, c: _Chunk, weights: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        """Copy what the update of chunk ``c`` is about to overwrite into the rollback space: its fp32
        weights (the masters, for 16-bit weights: those are their masters rounded) and moments."""
        k = c.stop - c.start
        room = self._rollback[self._rollback_used : self._rollback_used + 3 * k]
        self._rollback_used += 3 * k
        room[:k].copy_(weights)
        room[k : 2 * k].copy_(m)
        room[2 * k :].copy_(v)
        s.backup.append((c, room))

    def _roll_back(self, s: _State) -> None:
        """Put back what the speculative update of ``s`` overwrote; its gradient, ``touched`` and step
        counts are still those before it, so it can be redone as an ordinary update."""
        self.rollbacks += 1
        try:  # half undone, a block is neither stepped nor not: like a failed update, nothing may go on
            if any(c.extent is not None for c, _ in s.backup):  # a staging slot for the old moments
                while self._writes:
                    self._reap(wait=True)
                for u in list(self._reads):
                    self._drop_read(u)
            with trace.span("compute", f"roll back {s.flat.flat.block}"), torch.no_grad():
                params = self._params(s)
                for c, room in s.backup:
                    k = c.stop - c.start
                    params[c.start : c.stop].copy_(room[:k])  # 16-bit weights: the master, rounded
                    old = (room[k : 2 * k], room[2 * k :], room[:k])[: s.parts]
                    if c.extent is None:
                        for part, value in zip(_parts(s.moments, s.parts), old):
                            part.copy_(value)
                        continue
                    self._write_chunk(c, *old)
                self._finish_params(s, params)
        except BaseException as e:
            self._failed = self._failed or e
            raise
        s.backup = s.norms = None
        s.late = False

    def _next_order(self) -> list[int]:
        """The NVMe chunks in the order the next step's updates will want them: blocks as they complete in
        backward (the last first) when it speculates, else as the forward uses them; a block's own chunks
        in their order either way (an update walks them so)."""
        speculating = self.overlap == "backward" and self._rollback is not None and self._speculate_next
        return self._ring(backward=speculating)

    def _ring(self, backward: bool) -> list[int]:
        """The NVMe chunks in update order: blocks as the forward uses them, or as ``backward`` completes
        them (the last first); a block's own chunks in their order either way."""
        states = self.states[::-1] if backward else self.states
        return [c.unit for s in states for c in s.chunks if c.extent is not None]

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
                if s.flat.block == block and not any(x.pending for x in self._by_block[block]):
                    break
        self._poll()

    def flush(self, drop_reads: bool = True) -> None:
        """Run every pending update and wait for the state's writes; with ``drop_reads``, also give the
        chunks read ahead back (their staging slots are free for a checkpoint afterwards)."""
        self._check()
        if self._speculated:
            raise RuntimeError("updates made during backward await their step(): call step() before flush()")
        self._run_pending()
        while self._writes:
            self._reap(wait=True)
        if drop_reads:
            for u in list(self._reads):
                self._drop_read(u)
            self._ahead.clear()

    def _run_pending(self) -> None:
        while self._pending:
            self._update(self._pending[0])
        self._pump(drain=True)

    def discard(self) -> None:
        """Forget the pending and speculative updates (a checkpoint is about to replace the weights and
        the state)."""
        self._settle_device()
        if self._reducer is not None:
            self._reducer.discard()
        for s in self._pending:
            s.pending = False
        self._pending.clear()
        for s in self._speculated:
            s.backup = s.norms = None
            s.late = False
        self._speculated, self._armed_lr, self._rollback_used = [], None, 0
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
        """Update one pending block, which may run inside a forward pass: on the CPU, or (planned for the
        device) by waiting for its device update, launched earlier or now."""
        if s.on_device:
            self._pump(until=s)
            return
        t0 = time.perf_counter()
        self._apply(s, self._lr)
        if self.interleave is not None:
            self.interleave.observe(
                Side.CPU, s.numel, time.perf_counter() - t0, contended=bool(self._launched)
            )
        if self._pending[-1] is s and self._units:  # the step's last block: read the next step's first chunks
            queued = set(self._ahead)
            self._ahead.extend(u for u in self._next_order() if u not in queued)
            self._poll()
        self._done(s)
        self._pump()

    def _done(self, s: _State) -> None:
        """Bookkeeping once a pending block's update has landed."""
        self._spend(s)
        s.pending = s.on_device = False
        self._pending.remove(s)

    @staticmethod
    def _spend(s: _State) -> None:
        """A block's update is final: its gradient spent, its step counts advanced."""
        s.grad.zero_()
        for i, t in enumerate(s.touched):
            s.steps[i] += t
        s.touched = [False] * len(s.touched)

    # -- updates on the device (interleaved with the CPU's) ---------------------------------------------

    def _plan_sides(self) -> None:
        """Put some pending blocks' updates on the device, as the interleaver's model says pays: blocks whose
        moments live in memory (NVMe state streams through host slots: it stays on the CPU)."""
        if self.interleave is None or self._scratch is None:
            return
        eligible = [s for s in self._pending if s.moments is not None]
        plan = self.interleave.plan([s.numel for s in eligible], self._scratch.nbytes)
        for s, side in zip(eligible, plan.sides):
            s.on_device = side is Side.GPU
        self.device_updates += sum(side is Side.GPU for side in plan.sides)

    def _pump(self, until: _State | None = None, drain: bool = False) -> None:
        """Finish the device updates that have landed, in launch order (waiting for them until ``until``'s
        has landed, or with ``drain`` until every planned one has), and launch the next planned ones while
        a device slot is free."""
        while True:
            while self._launched and (
                drain or (until is not None and until.pending) or self._landed(self._launched[0])
            ):
                self._finish_on_device(self._launched.popleft())
            launched = {job.state for job in self._launched}
            waiting = [s for s in self._pending if s.on_device and s not in launched]
            while waiting and len(self._launched) < DEVICE_SLOTS:
                self._launch(waiting.pop(0))
            if not ((drain and self._launched) or (until is not None and until.pending)):
                return

    def _settle_device(self) -> None:
        """Wait for the device updates in flight and forget them (their blocks are not finished)."""
        for job in self._launched:
            if job.events is not None:
                job.events[5].synchronize()
        self._launched.clear()
        for s in self.states:
            s.on_device = False

    def _landed(self, job: _OnDevice) -> bool:
        return job.events is None or job.events[5].query()

    def _launch(self, s: _State) -> None:
        """Copy the block's weights, gradient and moments to the device, update them there with torch's
        kernel, copy the weights and moments back: each stage on its own stream (copy in, kernel, copy
        out), so consecutive blocks overlap as a pipeline; nothing is waited for here."""
        busy = {job.slot for job in self._launched}
        slot = next(i for i in range(DEVICE_SLOTS) if i not in busy)  # its last user has been finished
        n = s.numel
        room = self._scratch[slot, : 4 * n]
        p, g, m, v = room[:n], room[n : 2 * n], room[2 * n : 3 * n], room[3 * n :]
        params = self._params(s)
        state = _parts(s.moments, s.parts)  # exp_avg, exp_avg_sq[, master]
        weights = state[2] if s.parts == 3 else params  # what the update runs on: fp32
        if s.fresh:  # the masters start as the weights are
            weights.copy_(params)
            s.fresh = False
        ins = ((p, weights), (g, s.grad), (m, state[0]), (v, state[1]))
        outs = ((state[0], m), (state[1], v), (weights, p))
        if s.parts == 3:  # and the 16-bit weights: the masters rounded on the device, into the gradient's
            # room (spent once the kernel has run), then copied back
            outs += ((params, lambda: g.view(params.dtype)[:n].copy_(p)),)
        t0 = time.perf_counter()
        with trace.span("compute", f"update on device {s.flat.flat.block}"), torch.no_grad():
            if self._streams is None:  # the CPU standing in for the device: each stage at once
                for dst, src in ins:
                    dst.copy_(src)
                self._adamw(s, _Chunk(0, n), p, m, v, self._lr, grad=g, kernel=self._device_kernel)
                for dst, src in outs:
                    dst.copy_(src() if callable(src) else src)
                self._launched.append(_OnDevice(s, params, slot, None, time.perf_counter() - t0))
                return
            events = [torch.cuda.Event(enable_timing=True) for _ in range(6)]  # each stage's start, end
            copy_in, compute, copy_out = self._streams
            with torch.cuda.stream(copy_in):
                events[0].record()
                for dst, src in ins:
                    dst.copy_(src, non_blocking=True)
                events[1].record()
            compute.wait_event(events[1])
            with torch.cuda.stream(compute):
                events[2].record()
                self._adamw(s, _Chunk(0, n), p, m, v, self._lr, grad=g, kernel=self._device_kernel)
                events[3].record()
            copy_out.wait_event(events[3])
            with torch.cuda.stream(copy_out):
                events[4].record()
                for dst, src in outs:
                    dst.copy_(src() if callable(src) else src, non_blocking=True)
                events[5].record()
        self._launched.append(_OnDevice(s, params, slot, events, None))

    def _finish_on_device(self, job: _OnDevice) -> None:
        s = job.state
        if job.events is not None:
            job.events[5].synchronize()
            # What the block adds to a full pipeline: its slowest stage.
            job.seconds = max(job.events[i].elapsed_time(job.events[i + 1]) for i in (0, 2, 4)) / 1e3
        self.interleave.observe(Side.GPU, s.numel, job.seconds)
        self._finish_params(s, job.params)
        self._done(s)

    def _apply(self, s: _State, lr: float, speculative: bool = False) -> None:
        """AdamW on block ``s`` where its state lives; ``speculative``: keep what it overwrites."""
        no_autocast = torch.autocast(self.device.type, enabled=False)
        what = "update (speculative)" if speculative else "update"
        try:
            with trace.span("compute", f"{what} {s.flat.flat.block}"), torch.no_grad(), no_autocast:
                params = self._params(s)
                for c in s.chunks:
                    buf = self._take(c.unit) if c.extent is not None else None
                    m, v, *master = _parts(s.moments if buf is None else buf.slot, s.parts, c.stop - c.start)
                    master = master[0] if master else None
                    if s.fresh:  # the masters start as the weights are
                        master.copy_(params[c.start : c.stop])
                    if speculative:
                        self._keep(s, c, params[c.start : c.stop] if master is None else master, m, v)
                    self._adamw(s, c, params, m, v, lr, master=master)
                    if master is not None:
                        self._round_untouched(s, c, params, master)
                    if buf is None:
                        continue
                    io = self.store.write(c.extent, buf.slot)
                    self._held = None
                    self._writes.append((c.unit, io, buf))
                    self._poll()
                s.fresh = False
                self._finish_params(s, params)
        except BaseException as e:
            self._failed = self._failed or e
            raise

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
        s, c = self._units[unit]
        buf = self.staging.acquire(4 * s.parts * (c.stop - c.start))
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
                    later = max(self._reads, key=lambda u: self._distance(unit, u))
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

    def _distance(self, unit: int, other: int) -> int:
        """How many chunks after ``unit`` the ring reaches ``other``, in the order it now runs (blocks as
        backward completes them while a backward is armed, else as the forward uses them)."""
        pos = {u: i for i, u in enumerate(self._ring(backward=self._armed_lr is not None))}
        return (pos[other] - pos[unit]) % len(self._units)

    def _drop_read(self, unit: int) -> None:
        buf, io = self._reads.pop(unit)
        settle(io)
        self.staging.release(buf)

    def _params(self, s: _State) -> torch.Tensor:
        """The flat's weights where the update runs: the CPU (the device itself, without an accelerator).
        16-bit weights are not read: the update writes every one of them from its master."""
        f, read = s.flat, s.parts == 2 or s.fresh
        if not self.streamer.staged and f.span is None:  # the window is host memory: update it in place
            return self.streamer.resident(f) if read else self.streamer.blank(f)
        if f.home is Tier.DEVICE and self.streamer.staged:  # a host copy of the device's weights
            return f.home_buffer[: s.numel].to("cpu") if read else torch.empty(s.numel, dtype=f.dtype)
        if f.home is Tier.NVME:  # read from the drive into a host buffer
            return self.streamer.host_copy(f, read)[: s.numel]
        # host or CXL home (a shard's, without an accelerator, is the device tier's): updated in place
        return self.streamer.writable_home(f)[: s.numel]

    def _finish_params(self, s: _State, params: torch.Tensor) -> None:
        f = s.flat
        if not self.streamer.staged and f.span is None:
            self.streamer.writeback(f)
        elif f.home is Tier.DEVICE and self.streamer.staged:
            f.home_buffer[: s.numel].copy_(params)
            if f.span is not None:  # every rank's shard changed: the window copy is gathered anew
                self.streamer.refresh(f)
        elif f.home is Tier.NVME:
            self.streamer.put_home(f)  # to the drive, and into the window if it holds the flat
        else:
            self.streamer.reload(f)  # host or CXL home, updated in place: into the window if it holds it

    def _adamw(
        self,
        s: _State,
        c: _Chunk,
        params: torch.Tensor,
        m: torch.Tensor,
        v: torch.Tensor,
        lr: float,
        grad: torch.Tensor | None = None,
        kernel: AdamWKernel | None = None,
        master: torch.Tensor | None = None,
    ) -> None:
        """AdamW on the parts of the touched parameters inside the chunk, decayed and not (``grad``: the
        flat's gradient where the update runs, by default its home buffer; ``kernel``: by default the
        CPU's). ``m``, ``v`` and ``master`` hold the chunk's range; with ``master`` (16-bit weights) the
        update runs on the fp32 masters, and the kernel writes ``params`` from them in the same pass."""
        grad = s.grad if grad is None else grad
        kernel = kernel or self.kernel
        b1, b2 = self.cfg.betas
        for decay in (True, False):
            ps, gs, ms, vs, steps, outs = [], [], [], [], [], []
            for i, lo, hi in _in_chunk(s, c):
                if not s.touched[i] or s.decay[i] != decay:
                    continue
                local = slice(lo - c.start, hi - c.start)
                ps.append(params[lo:hi] if master is None else master[local])
                outs.append(params[lo:hi])
                gs.append(grad[lo:hi])
                ms.append(m[local])
                vs.append(v[local])
                steps.append(s.steps[i])
            if ps:
                wd = self.cfg.weight_decay if decay else 0.0
                kernel(
                    ps,
                    gs,
                    ms,
                    vs,
                    steps,
                    lr=lr,
                    betas=(b1, b2),
                    eps=self.cfg.eps,
                    weight_decay=wd,
                    out=None if master is None else outs,
                )

    @staticmethod
    def _round_untouched(s: _State, c: _Chunk, params: torch.Tensor, master: torch.Tensor) -> None:
        """The 16-bit weights of the chunk's parameters that got no gradient (the kernel wrote the others):
        their masters, rounded, which is what they were (the weights were not read)."""
        for i, lo, hi in _in_chunk(s, c):
            if not s.touched[i]:
                params[lo:hi].copy_(master[lo - c.start : hi - c.start])

    def zero_grad(self) -> None:
        """Drop the gradients gathered since the last step (a pending block's are its update's: kept)."""
        for s in self.states:
            if s.pending or s.backup is not None:
                continue
            s.grad.zero_()
            s.touched = [False] * len(s.touched)
            s.later.clear()

    def state_bytes(self) -> int:
        """Optimizer state held in memory now (state on NVMe is counted by the store)."""
        return sum(s.moments.nbytes for s in self.states if s.moments is not None)

    # -- checkpoints --------------------------------------------------------------------------------

    def _state_of(self, s: _State, which: slice = slice(0, 2)) -> torch.Tensor:
        """Parts ``which`` of the block's state ``[exp_avg | exp_avg_sq (| master)]`` (by default the two
        moments), read from the drive into a new tensor when they live there."""
        wanted = range(s.parts)[which]
        if s.moments is not None:  # the parts are consecutive: a view
            return s.moments[wanted.start * s.numel : wanted.stop * s.numel]
        out = torch.empty(len(wanted) * s.numel, dtype=torch.float32)
        into = _parts(out, len(wanted))
        for c in s.chunks:
            k = c.stop - c.start
            if c.extent.checksums is None:  # never written: moments at zero (a fresh master is not asked)
                for part in into:
                    part[c.start : c.stop].zero_()
                continue
            buf = self.staging.acquire(4 * s.parts * k)
            try:
                self.store.read(c.extent, buf.slot).wait()
                chunks = _parts(buf.slot, s.parts, k)
                for part, i in zip(into, wanted):
                    part[c.start : c.stop] = chunks[i]
            finally:
                self.staging.release(buf)
        return out

    def master(self, f: Flat) -> torch.Tensor | None:
        """The fp32 masters of a trainable flat of 16-bit weights (a tensor of its own, or a view of the
        state in memory), or None for fp32 weights (they are their own masters). Sharded, the whole flat's,
        gathered from every rank (which calls this for the same flats in the same order)."""
        s = next(s for s in self.states if s.flat is f)
        if s.parts == 2:
            return None
        local = self._weights_of(s) if s.fresh else self._state_of(s, slice(2, 3))  # fresh: the weights
        return local if s.span is None else self.group.gather_shards(local, s.span)

    def _weights_of(self, s: _State) -> torch.Tensor:
        """The state's weights (its flat's, or this rank's shard of them), as fp32, read from wherever they
        live (the masters' first values)."""
        if s.span is not None:
            return self.streamer.home_values(s.flat).float()
        self.streamer.drain()
        return self.streamer.resident(s.flat).to("cpu", torch.float32)

    def save(self, directory: Path | None) -> None:
        """``optimizer.pt`` in ``torch.optim.AdamW``'s state_dict layout (the resident updater writes the
        same, and a plain AdamW over the model's trainable parameters loads it), streamed block by block.
        Sharded, every rank takes part (its shards are gathered) and rank 0 writes: ``directory`` None on
        the others."""
        self.flush()
        state: dict[int, dict[str, Deferred]] = {}
        key = 0
        for s in self.states:
            for i, (name, shape) in enumerate(zip(s.flat.flat.names, s.flat.shapes)):
                if s.steps[i]:  # torch keeps no state for a parameter never updated
                    state[self._index[name]] = {
                        "step": Deferred(key + 2, (), torch.float32),
                        "exp_avg": Deferred(key, tuple(shape), torch.float32),
                        "exp_avg_sq": Deferred(key + 1, tuple(shape), torch.float32),
                    }
                    key += 3
        groups = copy.deepcopy(self._groups)
        for g in groups:
            g["lr"] = self._lr
        tensors = self._tensors()
        try:
            if directory is not None:
                obj = {"state": dict(sorted(state.items())), "param_groups": groups}
                write_torch(directory / OPTIMIZER_FILE, obj, tensors)
        finally:
            if self.group is not None:  # the other ranks' gathers go on to the end, even after an error
                for _ in tensors:
                    pass

    def _tensors(self) -> Iterator[torch.Tensor]:
        """The state's tensors in the order :meth:`save` numbered them: one block's moments at a time."""
        for s in self.states:
            if not any(s.steps):
                continue
            moments, n = self._state_of(s), s.flat.numel
            if s.span is not None:  # the whole flat's, from every rank's shard
                moments = torch.cat(
                    [
                        self.group.gather_shards(part, s.span)
                        for part in (moments[: s.numel], moments[s.numel :])
                    ]
                )
            for i, (offset, shape) in enumerate(zip(s.flat.flat.offsets, s.flat.shapes)):
                if s.steps[i]:
                    k = shape.numel()
                    yield moments[offset : offset + k].view(shape)
                    yield moments[n + offset : n + offset + k].view(shape)
                    yield torch.tensor(float(s.steps[i]))

    def load(self, directory: Path, masters: Callable[[Flat], torch.Tensor] | None = None) -> None:
        """Read ``optimizer.pt`` (written by either updater, so a run may resume with another placement),
        one block at a time into the state's homes; ``masters`` gives a flat of 16-bit weights its fp32
        masters (from the checkpoint's weights; by default the weights as they are now)."""
        self.flush()
        path = directory / OPTIMIZER_FILE
        if path.is_file():
            saved = self._torch_state(directory, path)
        elif (directory / LEGACY_STATE_FILE).is_file():
            saved = self._legacy_state(directory / LEGACY_STATE_FILE)
        else:
            raise CheckpointError(f"{directory} holds no {OPTIMIZER_FILE}: the checkpoint is incomplete")
        self._restore(saved, masters, str(directory))

    def state_dict(self) -> dict:
        """The state as ``torch.optim.AdamW``'s state_dict, in memory (what :meth:`save` writes, for callers
        that want the object: HF's Trainer), each 16-bit parameter's fp32 master beside its moments
        (``master``). One process only: sharded state is saved with :meth:`save`."""
        if self.group is not None:
            raise RuntimeError("state_dict() of sharded state: use save(), which gathers it block by block")
        self.flush()
        tensors = self._tensors()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for s in self.states:
            master = self.master(s.flat) if s.parts == 3 and any(s.steps) else None
            for i, (name, offset, shape) in enumerate(
                zip(s.flat.flat.names, s.flat.flat.offsets, s.flat.shapes)
            ):
                if not s.steps[i]:
                    continue
                entry = {
                    "exp_avg": next(tensors).clone(),
                    "exp_avg_sq": next(tensors).clone(),
                    "step": next(tensors),
                }
                if master is not None:
                    entry["master"] = master[offset : offset + shape.numel()].view(shape).clone()
                state[self._index[name]] = entry
        groups = copy.deepcopy(self._groups)
        for g in groups:
            g["lr"] = self._lr
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def weights_set(self, f: Flat) -> None:
        """The flat's weights were set from outside (a model's state_dict loaded into them): a 16-bit
        flat's masters are taken from them again at its next update."""
        for s in self.states:
            if s.flat is f and s.parts == 3:
                s.fresh = True

    def load_state_dict(self, saved: dict) -> None:
        """Set the state from what :meth:`state_dict` returned (or a ``torch.optim.AdamW`` over the same
        parameters). A state with nothing in it over a state that never stepped changes nothing (no
        write of zeros to every home)."""
        if self.group is not None:
            raise RuntimeError("load_state_dict() of sharded state: use load()")
        if not saved.get("state") and not any(any(s.steps) for s in self.states):
            return
        self.flush()
        entries = self._entries(saved, "the optimizer state_dict")
        state = saved["state"]

        def masters(f: Flat) -> torch.Tensor:  # the saved masters where there are, else the weights
            out = self._weights_of(next(s for s in self.states if s.flat is f))
            for name, offset, shape in zip(f.flat.names, f.flat.offsets, f.shapes):
                held = state.get(self._index[name], {}).get("master")
                if held is not None:
                    out[offset : offset + shape.numel()] = held.reshape(-1).float()
            return out

        self._restore(entries, masters, "the optimizer state_dict")

    def _restore(
        self,
        saved: Callable[[str], tuple[torch.Tensor, torch.Tensor, int] | None],
        masters: Callable[[Flat], torch.Tensor] | None,
        where: str,
    ) -> None:
        """Put each parameter's saved moments and step count (``saved``: by name) into the homes."""
        for s in self.states:
            n = s.flat.numel
            moments = torch.zeros(2 * n, dtype=torch.float32)
            master = None
            if s.parts == 3:  # of the whole flat (from the checkpoint's weights), or of this state's part
                master = masters(s.flat) if masters is not None else self._weights_of(s)
                if masters is not None and s.span is not None:
                    master = master[s.lo : s.lo + s.numel]
            for i, (name, offset, shape) in enumerate(
                zip(s.flat.flat.names, s.flat.flat.offsets, s.flat.shapes)
            ):
                entry = saved(name)
                if entry is None:
                    s.steps[i] = 0
                    continue
                m, v, step = entry
                if m.numel() != shape.numel() or v.numel() != shape.numel():
                    raise CheckpointError(
                        f"{where}: optimizer state of {name} has {m.numel()} elements, the "
                        f"parameter {shape.numel()}; was it written by a different job?"
                    )
                moments[offset : offset + shape.numel()] = m.reshape(-1)
                moments[n + offset : n + offset + shape.numel()] = v.reshape(-1)
                s.steps[i] = step
            if s.span is not None:  # this rank's part of both moments
                lo, hi = s.lo, s.lo + s.numel
                moments = torch.cat([moments[lo:hi], moments[n + lo : n + hi]])
            self._put_state(s, moments, master)

    def _torch_state(
        self, directory: Path, path: Path
    ) -> Callable[[str], tuple[torch.Tensor, torch.Tensor, int] | None]:
        """A state_dict's entries by parameter name, read lazily from the mapped file."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError) as e:
            raise CheckpointError(
                f"{path} is not an optimizer state_dict ({e}); the checkpoint is damaged"
            ) from None
        return self._entries(saved, str(path), f"the optimizer state in {directory}")

    def _entries(
        self, saved: dict, path: str, what: str | None = None
    ) -> Callable[[str], tuple[torch.Tensor, torch.Tensor, int] | None]:
        """A state_dict's entries by parameter name (``path`` names it in errors)."""
        try:
            sizes = [len(g["params"]) for g in saved["param_groups"]]
            state = saved["state"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(
                f"{path} is not an optimizer state_dict ({e}); the checkpoint is damaged"
            ) from None
        if sizes != [len(g["params"]) for g in self._groups] or not set(state) <= set(range(sum(sizes))):
            raise CheckpointError(
                f"{what or path} has parameter groups of {sizes} parameters, this job "
                f"{[len(g['params']) for g in self._groups]}; was it written by a different job?"
            )

        def entry(name: str) -> tuple[torch.Tensor, torch.Tensor, int] | None:
            st = state.get(self._index[name])
            if st is None:
                return None
            try:
                return st["exp_avg"], st["exp_avg_sq"], int(st["step"].item())
            except (KeyError, TypeError, AttributeError, RuntimeError) as e:
                raise CheckpointError(
                    f"{path}: the optimizer state of {name} is incomplete ({type(e).__name__}: {e}); "
                    "the checkpoint is damaged"
                ) from None

        return entry

    def _legacy_state(self, path: Path) -> Callable[[str], tuple[torch.Tensor, torch.Tensor, int] | None]:
        """Checkpoints from before optimizer.pt: one tensor per parameter and moment in safetensors."""
        fh = safe_open(str(path), framework="pt")
        names = set(fh.keys())
        unknown = {k.rsplit(".", 1)[0] for k in names} - set(self._index)
        if unknown:
            raise CheckpointError(
                f"{path}: optimizer state for parameters this job does not train "
                f"({sorted(unknown)[:3]}); was it written by a different job?"
            )

        def entry(name: str) -> tuple[torch.Tensor, torch.Tensor, int] | None:
            if f"{name}.step" not in names:
                return None
            step = int(fh.get_tensor(f"{name}.step").item())
            return fh.get_tensor(f"{name}.exp_avg"), fh.get_tensor(f"{name}.exp_avg_sq"), step

        return entry

    def _put_state(self, s: _State, moments: torch.Tensor, master: torch.Tensor | None) -> None:
        """Set the block's moments (``[exp_avg | exp_avg_sq]``) and, for 16-bit weights, its fp32 masters,
        in the state's home (the state's part of each: ``s.numel`` elements)."""
        n = s.numel
        s.fresh = False
        parts = [moments[:n], moments[n:], master][: s.parts]
        if s.moments is not None:
            for home, value in zip(_parts(s.moments, s.parts), parts):
                home.copy_(value)
            return
        for c in s.chunks:
            self._write_chunk(c, *(p[c.start : c.stop] for p in parts))

    def _write_chunk(self, c: _Chunk, *parts: torch.Tensor) -> None:
        """Write one chunk's state (exp_avg, exp_avg_sq[, master]) to the drive and wait for it."""
        k = c.stop - c.start
        buf = self.staging.acquire(4 * len(parts) * k)
        try:
            for slot, value in zip(_parts(buf.slot, len(parts), k), parts):
                slot.copy_(value)
            self.store.write(c.extent, buf.slot).wait()
        finally:
            self.staging.release(buf)

    def close(self) -> None:
        """Remove the hooks and wait for every transfer (pending updates are not run: :meth:`flush` does
        that); safe on the way out of an error."""
        self._settle_device()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._shared.remove()
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
