"""The placement planner: where every block's weights, gradients and optimizer state live, as a pure function.

Inputs: the model's blocks (shapes only, from the meta device), the per-tier budgets, the machine profile
and the batch shape. Output: a :class:`Plan` naming the home tier of each block's params, grads and
optimizer state, the prefetch depth and staging buffers, the predicted peak bytes per tier and a predicted
step time; or a :class:`PlanError` saying which budget is short and by how much.

Policy, fastest tier first. The device always holds the working window (the blocks being computed and
prefetched) and the activations; the rest of it goes to the smallest kind first (with full tuning the
weights, each of which crosses the bus twice a step when homed elsewhere; with adapters, their gradients
and optimizer state). Host DRAM takes gradients first (they are summed every micro-batch, so only memory
holds them), then optimizer state (the CPU update runs there), then weights; CXL takes weights first
(copies run at nearly full speed from CXL, CPU updates do not); NVMe takes optimizer state and weights.

Sharded over ``shards`` ranks, each rank's homes hold 1/shards of every block's state, while its window
holds whole blocks (gathered from every rank), so the weights always stream through the window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tiertune.errors import ConfigError
from tiertune.memory.budgets import Budgets
from tiertune.memory.pool import align_up
from tiertune.memory.profile import MachineProfile
from tiertune.memory.tiers import Kind, Tier
from tiertune.memory.usage import format_bytes

HOME_KINDS = (Kind.PARAMS, Kind.GRADS, Kind.OPTIMIZER)
TIER_ORDER = (Tier.DEVICE, Tier.HOST, Tier.CXL, Tier.NVME)
_PRIORITY = {
    Tier.HOST: (Kind.GRADS, Kind.OPTIMIZER, Kind.PARAMS),  # gradients first: only memory can hold them
    Tier.CXL: (Kind.PARAMS, Kind.GRADS, Kind.OPTIMIZER),
    Tier.NVME: (Kind.OPTIMIZER, Kind.PARAMS),  # gradients stay in memory: they are summed every micro-batch
}
# Weight slots in the window: the block computing, ``depth`` blocks in flight, and the block just finished
# (its backward may still read its weights while the next block is fetched).
WINDOW_EXTRA = 2
OPTIMIZER_CHUNK_BYTES = 128 * 2**20  # NVMe optimizer state streams through the update in chunks this big
# Staging slots for NVMe optimizer state: chunks read ahead (during the step before), one being updated,
# and writes still in flight.
OPTIMIZER_SLOTS = 4
CXL_CPU_SLOWDOWN = 4.0  # CPU Adam on CXL-resident state vs local DRAM, for tensors past ~20M elements

# Used when no machine profile exists: deliberately modest, so predictions err on the slow side.
FALLBACK_PROFILE = MachineProfile(
    cpus=1,
    host_total_bytes=0,
    dram_copy_gbps=10.0,
    cpu_adamw_params_per_s=5e8,
    device_tflops=0.1,
    nvme={"default": {"read_qd8_bs1024k": 1.0, "write_qd8_bs1024k": 1.0}},
)


class PlanError(ConfigError):
    """Nothing fits: the problems say which budget is short and by how much."""


@dataclass(frozen=True)
class BlockShape:
    name: str
    kind: str  # embed, layer, head
    numel: int
    trainable: int
    param_bytes: int | None = None  # when the weights are not all in the compute dtype (compressed codes)


@dataclass
class BlockPlan:
    name: str
    kind: str
    numel: int
    trainable: int
    bytes: dict[Kind, int]
    home: dict[Kind, Tier] = field(default_factory=dict)


@dataclass
class Plan:
    blocks: list[BlockPlan]
    prefetch_depth: int
    window: tuple[int, int]  # weights in flight on the device: (bytes of the biggest block, count)
    buffers: dict[str, tuple[int, int]]  # host staging slots: purpose -> (slot bytes, count)
    peak_bytes: dict[Tier, int]
    budgets: dict[Tier, int]
    step_time_s: dict[str, float]  # compute, weights_io, grads_io, optimizer, total
    profile_source: str

    def homes(self, kind: Kind) -> set[Tier]:
        return {b.home[kind] for b in self.blocks if b.bytes[kind]}


def activation_bytes_estimate(
    hidden: int, layers: int, ffn: int, vocab: int, tokens: int, compute_bytes: int
) -> int:
    """What a forward pass saves for backward, for ``tokens`` tokens in one micro-batch.

    Per decoder layer and token, about 9 hidden-sized tensors (norm inputs and outputs, q/k/v, attention
    output, residuals) and 4 MLP-sized ones (gate, up, activation, product), in the compute dtype; plus the
    fp32 logits and their gradient at the head.
    """
    return layers * tokens * (9 * hidden + 4 * ffn) * compute_bytes + 2 * tokens * vocab * 4


def block_bytes(shape: BlockShape, compute_bytes: int, shards: int = 1) -> dict[Kind, int]:
    """Bytes of each home kind: weights in the compute dtype (or as ``param_bytes`` says); fp32 gradients; two fp32 Adam moments, plus an
    fp32 master copy when the weights are kept in a 16-bit dtype; one rank's share of them over ``shards``
    ranks. Each rounded up to 4 KiB, as the pool and the NVMe store hold them."""
    master = 4 if compute_bytes < 4 else 0
    raw = {
        Kind.PARAMS: shape.numel * compute_bytes if shape.param_bytes is None else shape.param_bytes,
        Kind.GRADS: shape.trainable * 4,
        Kind.OPTIMIZER: shape.trainable * (8 + master),
    }
    return {k: align_up(math.ceil(n / shards)) if n else 0 for k, n in raw.items()}


def plan_placement(
    blocks: Sequence[BlockShape],
    budgets: Budgets,
    nvme_bytes: int,
    *,
    compute_bytes: int,
    activation_bytes: int,
    tokens_per_step: int,
    forced: dict[Kind, Tier | None],
    prefetch_depth: int | None,
    profile: MachineProfile | None,
    shards: int = 1,
) -> Plan:
    """Place every block's params, grads and optimizer state (see the module docstring for the policy).

    ``forced`` pins a kind to one tier (None: auto); ``prefetch_depth`` None chooses it from the tiers the
    weights stream from. ``activation_bytes`` is what the forward pass saves for backward, all layers.
    ``shards``: the ranks the state is sharded over; the budgets and the plan are one rank's.
    """
    if forced[Kind.GRADS] is Tier.NVME:
        raise PlanError(
            [
                "offload.grads=nvme: gradients are summed every micro-batch, so they stay in memory; "
                "set offload.grads to auto, device, host or cxl"
            ]
        )
    plans = [
        BlockPlan(b.name, b.kind, b.numel, b.trainable, block_bytes(b, compute_bytes, shards)) for b in blocks
    ]
    if budgets.device_is_host:  # without an accelerator the device tier is the host: 'host' means it
        forced = {k: Tier.DEVICE if t is Tier.HOST else t for k, t in forced.items()}
    biggest = {k: max(p.bytes[k] for p in plans) for k in HOME_KINDS}
    gathered = shards > 1  # sharded weights stream whatever their home: a slot holds a whole block
    biggest[Kind.PARAMS] = max(block_bytes(b, compute_bytes)[Kind.PARAMS] for b in blocks)
    capacity = {
        Tier.DEVICE: budgets.device,
        Tier.HOST: budgets.host,
        Tier.CXL: budgets.cxl,
        Tier.NVME: nvme_bytes,
    }
    if budgets.device_is_host:
        capacity[Tier.HOST] = 0  # one pool of memory: the device tier is the host's DRAM
    all_resident = sum(sum(p.bytes.values()) for p in plans) + activation_bytes
    # Reserve before placing: on the device the activations, and for each kind that may leave it, what its
    # moving needs: the deepest window of weights in flight, the gradients of the block in backward, and
    # the staging slots. What turns out not to move is given back in the reported peaks.
    may_move = set()
    if (
        gathered
        or all_resident > budgets.device
        or any(forced[k] not in (None, Tier.DEVICE) for k in HOME_KINDS)
    ):
        may_move = {k for k in HOME_KINDS if forced[k] is not Tier.DEVICE}
    most_depth = prefetch_depth if prefetch_depth is not None else 2
    left = dict(capacity)
    left[Tier.DEVICE] -= activation_bytes
    if Kind.PARAMS in may_move or gathered:
        left[Tier.DEVICE] -= (most_depth + WINDOW_EXTRA) * biggest[Kind.PARAMS]
    trains = any(p.bytes[Kind.GRADS] for p in plans)
    if may_move and trains:  # the block engine: each block's gradients leave autograd as they complete
        left[Tier.DEVICE] -= biggest[Kind.PARAMS]  # the block's gradients in the compute dtype, leaving
    staging_home = Tier.DEVICE if budgets.device_is_host else Tier.HOST
    slotted = may_move - ({Kind.OPTIMIZER} if forced[Kind.OPTIMIZER] not in (None, Tier.NVME) else set())
    reserve = _staging(most_depth, biggest, slotted, budgets.device_is_host)
    left[staging_home] -= sum(size * n for size, n in reserve.values())
    if left[staging_home] < 0 and staging_home is Tier.HOST:
        raise PlanError(
            [
                f"memory.host_budget_gib is short by {-left[Tier.HOST] / 2**30:.2f} GiB for the staging "
                "buffers that state moving to and from the device passes through; raise it"
            ]
        )

    totals = {k: sum(p.bytes[k] for p in plans) for k in HOME_KINDS}
    # On an accelerator the block engine updates on the CPU: once anything streams, gradients and
    # optimizer state live off the device.
    cpu_update = not budgets.device_is_host and (
        gathered or all_resident > budgets.device or any(forced[k] is not None for k in HOME_KINDS)
    )
    if cpu_update and Tier.DEVICE in (forced[Kind.GRADS], forced[Kind.OPTIMIZER]):
        raise PlanError(
            [
                "offload.grads/offload.optimizer=device: on an accelerator, blocks that stream are updated "
                "by the CPU, so their gradients and optimizer state live in host, CXL or NVMe memory; set "
                "them to auto or host"
            ]
        )
    for tier in TIER_ORDER:
        for kind in _order(tier, totals, budgets.device_is_host):
            if forced[kind] not in (None, tier):
                continue
            if cpu_update and tier is Tier.DEVICE and kind is not Kind.PARAMS:
                continue
            for p in plans:
                if kind not in p.home and p.bytes[kind] <= left[tier]:
                    p.home[kind] = tier
                    left[tier] -= p.bytes[kind]
    missing = [(p, k) for p in plans for k in HOME_KINDS if k not in p.home]
    if missing or left[Tier.DEVICE] < 0:
        raise PlanError(_shortfalls(missing, left, capacity, forced, budgets.device_is_host))
    if any(left[t] < 0 for t in TIER_ORDER):  # the placement above never overdraws a tier
        raise AssertionError(f"planner overdrew a tier: {left}")

    # What needs staging slots: weights and gradients crossing to and from the device, and optimizer
    # state streamed from NVMe (state on host or CXL is updated in place by the CPU).
    moved = {
        k for k in (Kind.PARAMS, Kind.GRADS) if any(p.home[k] is not Tier.DEVICE for p in plans if p.bytes[k])
    }
    if any(p.home[Kind.OPTIMIZER] is Tier.NVME for p in plans if p.bytes[Kind.OPTIMIZER]):
        moved.add(Kind.OPTIMIZER)
    weights_from = {p.home[Kind.PARAMS] for p in plans} - {Tier.DEVICE}
    streams = bool(weights_from) or gathered
    if prefetch_depth is not None:
        depth = prefetch_depth if streams else 0
    else:  # hide a slower tier behind more blocks of compute
        depth = 2 if Tier.NVME in weights_from else 1 if streams else 0
    # The window's slots and the weights' staging are sized for the biggest block that streams (what the
    # streamer allocates); the reservation above assumed the biggest of all.
    in_flight = dict(biggest)
    in_flight[Kind.PARAMS] = max(
        (
            block_bytes(b, compute_bytes)[Kind.PARAMS]
            for b, p in zip(blocks, plans)
            if gathered or p.home[Kind.PARAMS] is not Tier.DEVICE
        ),
        default=0,
    )
    staging = _staging(depth, in_flight, moved, budgets.device_is_host)
    source = (
        "from the machine profile" if profile is not None else "from built-in figures: run `tiertune probe`"
    )
    window = (in_flight[Kind.PARAMS], depth + WINDOW_EXTRA) if streams else (0, 0)
    engine = gathered or any(t is not Tier.DEVICE for p in plans for t in p.home.values())  # the block engine
    in_backward = biggest[Kind.PARAMS] if engine and trains else 0
    peaks = _peaks(plans, activation_bytes, staging, window, in_backward, budgets.device_is_host)
    over = [t for t, n in peaks.items() if n > capacity[t]]
    if over:  # the reservation covered the deepest window: a smaller one cannot exceed it
        raise AssertionError(f"plan exceeds its budgets on {over}: {peaks} vs {capacity}")
    return Plan(
        plans,
        depth,
        window,
        staging,
        peaks,
        dict(capacity),
        _step_time(plans, profile or FALLBACK_PROFILE, tokens_per_step, budgets.device_is_host),
        source,
    )


def _order(tier: Tier, totals: dict[Kind, int], device_is_host: bool) -> tuple[Kind, ...]:
    """The order in which kinds claim ``tier``. On an accelerator the smallest kind first: with full tuning
    that is the weights (2-4 bytes a parameter against 4 for gradients and 8-12 for optimizer state); with
    adapters it is their few gradients and moments, so the whole update stays on the device (when nothing
    streams: see ``cpu_update`` in :func:`plan_placement`). Without one
    (the device is host DRAM) gradients first: they are written every micro-batch and summed over the
    accumulation, where weights on NVMe are read twice a step and written once, and optimizer state once
    each way."""
    if tier is Tier.DEVICE and device_is_host:
        return (Kind.GRADS, Kind.PARAMS, Kind.OPTIMIZER)
    if tier is Tier.DEVICE:
        return tuple(sorted(HOME_KINDS, key=lambda k: totals[k]))
    return _PRIORITY[tier]


def _peaks(
    plans: list[BlockPlan],
    activation_bytes: int,
    staging: dict[str, tuple[int, int]],
    window: tuple[int, int],
    block_bytes: int,
    device_is_host: bool,
) -> dict[Tier, int]:
    """Peak bytes per tier once placed: the homes, plus on the device the activations and whatever streams
    through it (the ``window``'s slots of weights in flight, and the gradients of the block in backward:
    ``block_bytes``, the biggest block's weights, as autograd makes them before they go home, wherever
    that is), plus the staging slots."""
    peak = {t: sum(p.bytes[k] for p in plans for k in HOME_KINDS if p.home[k] is t) for t in TIER_ORDER}
    slot, slots = window
    peak[Tier.DEVICE] += activation_bytes + slot * slots + block_bytes
    peak[Tier.DEVICE if device_is_host else Tier.HOST] += sum(size * n for size, n in staging.values())
    return {t: n for t, n in peak.items() if n}


def _staging(
    depth: int, biggest: dict[Kind, int], moved: set[Kind], device_is_host: bool
) -> dict[str, tuple[int, int]]:
    """Pool slots (size, count) for what moves: weights in flight (the window plus the one being filled),
    gradients leaving (double buffered), optimizer state streaming (reads ahead | update j | writes).
    Without an accelerator the weights are computed on straight from their pool slots: the device window
    is those slots, so they are not counted twice."""
    slots = {
        Kind.PARAMS: ("weights", depth + WINDOW_EXTRA),
        Kind.GRADS: ("grads", 2),
        Kind.OPTIMIZER: ("optimizer", OPTIMIZER_SLOTS),
    }
    if device_is_host:  # gradients are summed straight into their home: nothing to stage
        moved = moved - {Kind.PARAMS, Kind.GRADS}
    size = {**biggest, Kind.OPTIMIZER: min(biggest[Kind.OPTIMIZER], OPTIMIZER_CHUNK_BYTES)}
    return {slots[k][0]: (align_up(size[k]), slots[k][1]) for k in HOME_KINDS if k in moved and size[k]}


def _shortfalls(
    missing: list,
    left: dict[Tier, int],
    capacity: dict[Tier, int],
    forced: dict[Kind, Tier | None],
    device_is_host: bool,
) -> list[str]:
    problems = []
    if left[Tier.DEVICE] < 0:  # nothing else can be judged before this is fixed
        here = (
            " (without an accelerator the device tier is host memory: memory.host_budget_gib sets it "
            "unless memory.device_budget_gib is given)"
            if device_is_host
            else ""
        )
        return [
            f"memory.device_budget_gib is short by {format_bytes(-left[Tier.DEVICE])} just for the "
            f"activations and the blocks in flight{here}; lower the batch or sequence length, or raise it"
        ]
    need: dict[Kind, int] = {}
    for p, k in missing:
        need[k] = need.get(k, 0) + p.bytes[k]
    for kind, nbytes in need.items():
        if forced[kind] is not None:
            tier = forced[kind]
            # The NVMe tier has no budget key: its size is the free space where the store goes.
            grow = (
                "free space in offload.nvme_dir (the output directory when it is unset), add directories "
                "on other drives to it"
                if tier is Tier.NVME
                else "raise its budget"
            )
            problems.append(
                f"offload.{kind.value}={tier.value}: {format_bytes(nbytes)} of {kind.value} do not fit "
                f"in the {tier.value} tier ({format_bytes(max(left[tier], 0))} left of "
                f"{format_bytes(capacity[tier])}); {grow}, or choose another tier"
            )
        else:
            tiers = ", ".join(f"{t.value} {format_bytes(capacity[t])}" for t in TIER_ORDER if capacity[t] > 0)
            where = "memory" if kind is Kind.GRADS else "tier"
            problems.append(
                f"{format_bytes(nbytes)} of {kind.value} fit no {where}: every budget is full ({tiers}); "
                "raise a budget, add offload.nvme_dir space, or train fewer weights (tuning.method=lora)"
            )
    return problems


def _nvme_gbps(profile: MachineProfile, op: str) -> float:
    figures = [f for d in profile.nvme.values() for k, f in d.items() if k.startswith(op)]
    return max(figures) if figures else 1.0


def _step_time(
    plans: list[BlockPlan], profile: MachineProfile, tokens: int, device_is_host: bool
) -> dict[str, float]:
    """A rough step: compute, plus the transfers and the CPU update, not yet overlapped (the optimizer tier
    overlaps them). Bandwidths are GB/s; a copy within host DRAM moves each byte twice (read and write)."""
    bus = profile.dram_copy_gbps / 2 if device_is_host else profile.cuda.get("h2d_pinned", 12.0)
    down = profile.dram_copy_gbps / 2 if device_is_host else profile.cuda.get("d2h_pinned", 12.0)
    read, write = _nvme_gbps(profile, "read"), _nvme_gbps(profile, "write")
    # Forward 2 FLOPs per weight and token; backward 2 for the activation gradients of every weight plus
    # 2 for the gradient of each trainable weight.
    flops = sum(4 * p.numel + 2 * p.trainable for p in plans) * tokens
    compute = flops / (profile.device_tflops * 1e12)
    weights_io = grads_io = update = 0.0
    for p in plans:
        if p.home[Kind.PARAMS] is not Tier.DEVICE:  # fetched for forward and again for backward
            rate = min(bus, read) if p.home[Kind.PARAMS] is Tier.NVME else bus
            weights_io += 2 * p.bytes[Kind.PARAMS] / (rate * 1e9)
        if p.trainable and p.home[Kind.GRADS] is not Tier.DEVICE:
            rate = min(down, write) if p.home[Kind.GRADS] is Tier.NVME else down
            grads_io += p.bytes[Kind.GRADS] / (rate * 1e9)
        if p.trainable and p.home[Kind.OPTIMIZER] is not Tier.DEVICE:
            seconds = p.trainable / profile.cpu_adamw_params_per_s
            if p.home[Kind.OPTIMIZER] is Tier.CXL:
                seconds *= CXL_CPU_SLOWDOWN
            if p.home[Kind.OPTIMIZER] is Tier.NVME:  # read and written back, pipelined with the update
                state = p.bytes[Kind.OPTIMIZER]
                seconds = max(seconds, state / (read * 1e9) + state / (write * 1e9))
            update += seconds
    return {
        "compute": compute,
        "weights_io": weights_io,
        "grads_io": grads_io,
        "optimizer": update,
        "total": compute + weights_io + grads_io + update,
    }
