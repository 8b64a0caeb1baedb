"""Per-tier byte budgets: the config's numbers, or ``auto`` read from the machine."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from tiertune.config import MemoryConfig
from tiertune.errors import ConfigError
from tiertune.memory.numa import NumaNode, discover, select_cxl_nodes

GIB = 2**30


@dataclass(frozen=True)
class Budgets:
    device: int  # bytes
    host: int
    cxl: int
    cxl_nodes: tuple[int, ...]
    device_is_host: bool  # no accelerator: the device tier is host memory and shares the host budget


def host_reserve(total: int) -> int:
    """What ``auto`` leaves to the OS, the page cache and the process's own code: 10%, at least 1 GiB."""
    return max(GIB, total // 10)


def resolve_budgets(
    cfg: MemoryConfig, device: torch.device, nodes: list[NumaNode] | None = None, share: int = 1
) -> Budgets:
    """The budgets of one process: ``auto`` reads the machine, split evenly between the ``share``
    processes (ranks) that run on it; a number in the config is each process's own. An accelerator is
    each rank's own (torchrun gives every rank its device)."""
    nodes = discover() if nodes is None else nodes
    cxl = select_cxl_nodes(nodes, cfg.cxl_nodes)

    def given(value: float | str, auto: int) -> int:
        return auto if value == "auto" else int(float(value) * GIB)

    if not cxl and cfg.cxl_budget_gib not in ("auto", 0, 0.0):
        raise ConfigError(
            [
                f"memory.cxl_budget_gib: {cfg.cxl_budget_gib} GiB, but this machine has no CXL "
                "(CPU-less) NUMA node; leave it auto, or name the nodes in memory.cxl_nodes"
            ]
        )
    vm = psutil.virtual_memory()
    host = given(cfg.host_budget_gib, max(0, vm.available - host_reserve(vm.total)) // share)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        device_auto = max(0, min(free, total - total // 10))  # keep 10% for the allocator and kernels
    else:
        device_auto = host
    return Budgets(
        device=given(cfg.device_budget_gib, device_auto),
        host=host,
        cxl=given(cfg.cxl_budget_gib, sum(n.free_bytes for n in cxl) // share),
        cxl_nodes=tuple(n.id for n in cxl),
        device_is_host=device.type != "cuda",
    )
