"""Which NUMA nodes hold which host bytes: the CXL-aware policy, as a pure function.

CPU Adam on CXL-resident state runs several times slower than on local DRAM, while the accelerator
copies from CXL at nearly full speed. So the bytes the CPU computes on (optimizer moments, fp32 master
weights, fp32 gradients) go to local DRAM first, and the bytes that are only copied (weights in the
compute dtype, staging buffers, offloaded activations) go to CXL first, striped over every CXL node so
their bandwidths add up. Each kind overflows into the other tier only when its own is full.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tiertune.errors import ConfigError
from tiertune.memory.numa import PAGE, NumaNode, align_up
from tiertune.memory.tiers import Kind, Tier

CPU_KINDS = frozenset({Kind.OPTIMIZER, Kind.GRADS})  # the CPU optimizer reads and writes these


@dataclass(frozen=True)
class Request:
    name: str
    kind: Kind
    nbytes: int


@dataclass
class HostPlacement:
    stripes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # name -> [(node, nbytes)]
    tier_bytes: dict[Tier, int] = field(default_factory=dict)

    def tier_of(self, name: str, node_tier: dict[int, Tier]) -> set[Tier]:
        return {node_tier[node] for node, _ in self.stripes[name]}


def place_host_bytes(
    requests: list[Request], dram: list[NumaNode], cxl: list[NumaNode], dram_budget: int, cxl_budget: int
) -> HostPlacement:
    """Place each request on NUMA nodes; raise ConfigError naming the short budget if they do not fit.

    A node never gets more than its free memory, a tier never more than its budget. Stripes are whole
    pages so each can be bound with mbind.
    """
    room = {n.id: n.free_bytes for n in dram + cxl}
    # Whole pages only, so that every stripe can be bound on its own.
    left = {Tier.HOST: dram_budget // PAGE * PAGE, Tier.CXL: cxl_budget // PAGE * PAGE}
    usable = {
        t: min(left[t], sum(n.free_bytes // PAGE * PAGE for n in ns))
        for t, ns in ((Tier.HOST, dram), (Tier.CXL, cxl))
    }
    nodes = {Tier.HOST: dram, Tier.CXL: cxl}
    out = HostPlacement()
    pending = {r.name: align_up(r.nbytes, PAGE) for r in requests}

    def fill(request: Request, tier: Tier, stripe: bool) -> None:
        """Give ``request`` what ``tier`` can: one node at a time (most room first), or striped evenly."""
        need = min(pending[request.name], left[tier])
        while need > 0:
            candidates = [n for n in nodes[tier] if room[n.id] >= PAGE]
            if not candidates:
                return
            if stripe:
                share = align_up(-(-need // len(candidates)), PAGE)
            else:
                candidates, share = [max(candidates, key=lambda n: room[n.id])], need
            for node in candidates:
                take = min(share, need, room[node.id] // PAGE * PAGE)
                stripes = out.stripes.setdefault(request.name, [])
                if stripes and stripes[-1][0] == node.id:  # a second pass over the same node: one stripe
                    stripes[-1] = (node.id, stripes[-1][1] + take)
                else:
                    stripes.append((node.id, take))
                out.tier_bytes[tier] = out.tier_bytes.get(tier, 0) + take
                room[node.id] -= take
                left[tier] -= take
                pending[request.name] -= take
                need -= take
                if not need:
                    return

    cpu = [r for r in requests if r.kind in CPU_KINDS]
    copy = [r for r in requests if r.kind not in CPU_KINDS]
    for r in cpu:
        fill(r, Tier.HOST, stripe=False)
    for r in copy:
        fill(r, Tier.CXL, stripe=True)
    for r in copy:
        fill(r, Tier.HOST, stripe=False)
    for r in cpu:
        fill(r, Tier.CXL, stripe=True)
    short = sum(pending.values())
    if short:
        gib = 2**30
        need = sum(align_up(r.nbytes, PAGE) for r in requests)
        raise ConfigError(
            [
                f"host memory is short by {short / gib:.2f} GiB: the job needs {need / gib:.2f} GiB on "
                f"host DRAM and CXL, and {usable[Tier.HOST] / gib:.2f} GiB of DRAM and "
                f"{usable[Tier.CXL] / gib:.2f} GiB of CXL are usable (the smaller of "
                "memory.host_budget_gib / memory.cxl_budget_gib and the nodes' free memory); raise "
                "them, or move state to NVMe"
            ]
        )
    return out
