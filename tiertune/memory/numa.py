"""NUMA nodes: discovery from sysfs, binding a buffer's pages to nodes, and checking where they landed.

CXL memory appears to Linux as a NUMA node with memory and no CPUs. Binding uses the ``mbind`` system
call (through ctypes, no libnuma needed) on page-aligned memory before its pages are first touched;
``move_pages`` with no target nodes then reports the node that holds each page.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tiertune.errors import ConfigError

SYSFS_NODES = Path("/sys/devices/system/node")
PAGE = mmap.PAGESIZE
ALIGN = 4096  # O_DIRECT wants offsets, lengths and addresses aligned to the device's logical block


def align_up(nbytes: int, alignment: int = ALIGN) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment``."""
    return -(-nbytes // alignment) * alignment


# System call numbers: x86_64 has its own table, arm64 uses the generic one.
_SYSCALLS = {"x86_64": {"mbind": 237, "move_pages": 279}, "aarch64": {"mbind": 235, "move_pages": 239}}
_MPOL_BIND, _MPOL_INTERLEAVE = 2, 3
_MPOL_MF_STRICT, _MPOL_MF_MOVE = 1, 2


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]
    total_bytes: int
    free_bytes: int

    @property
    def cpuless(self) -> bool:
        """Memory without CPUs: a CXL expander (or another memory-only device)."""
        return not self.cpus


def parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11); '' -> ()."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def discover(root: Path = SYSFS_NODES) -> list[NumaNode]:
    """The machine's NUMA nodes; one node 0 with every CPU where sysfs shows none (containers, macOS)."""
    nodes = []
    for entry in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        cpulist = entry / "cpulist"
        cpus = parse_cpulist(cpulist.read_text()) if cpulist.exists() else ()
        total = free = 0
        meminfo = entry / "meminfo"
        if meminfo.exists():
            for line in meminfo.read_text().splitlines():
                # "Node 0 MemTotal:       24576000 kB"
                match = re.match(r"Node \d+ (MemTotal|MemFree):\s+(\d+) kB", line)
                if match:
                    value = int(match.group(2)) * 1024
                    total, free = (value, free) if match.group(1) == "MemTotal" else (total, value)
        nodes.append(NumaNode(int(entry.name[4:]), cpus, total, free))
    if nodes:
        return nodes
    import psutil

    vm = psutil.virtual_memory()
    return [NumaNode(0, tuple(range(os.cpu_count() or 1)), vm.total, vm.available)]


def select_cxl_nodes(nodes: list[NumaNode], wanted: list[int] | str = "auto") -> list[NumaNode]:
    """The nodes that form the CXL tier: every CPU-less node with memory, or the ids the config names."""
    if wanted == "auto":
        return [n for n in nodes if n.cpuless and n.total_bytes > 0]
    by_id = {n.id: n for n in nodes}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise ConfigError(
            [f"memory.cxl_nodes: node(s) {missing} do not exist here; this machine has nodes {sorted(by_id)}"]
        )
    return [by_id[i] for i in wanted]


def _syscall(name: str) -> int:
    table = _SYSCALLS.get(platform.machine())
    if table is None:
        raise OSError(f"NUMA binding is not supported on {platform.machine()}")
    return table[name]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def bind_pages(buffer: torch.Tensor, nodes: list[int], interleave: bool = False) -> None:
    """Bind ``buffer``'s pages to ``nodes`` (interleaved page by page if asked) before they are touched.

    ``buffer`` must start on a page boundary (see :func:`numa_empty`). Pages already touched are moved.
    """
    addr, nbytes = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    if addr % PAGE:
        raise ValueError("bind_pages needs a page-aligned buffer")
    words = max(nodes) // 64 + 1
    mask = (ctypes.c_ulong * words)()
    for node in nodes:
        mask[node // 64] |= 1 << (node % 64)
    mode = _MPOL_INTERLEAVE if interleave else _MPOL_BIND
    length = align_up(nbytes, PAGE)
    # maxnode counts bits; the kernel drops the last one (a historical off-by-one), hence the +1.
    rc = _libc().syscall(
        _syscall("mbind"),
        ctypes.c_void_p(addr),
        ctypes.c_ulong(length),
        mode,
        mask,
        ctypes.c_ulong(words * 64 + 1),
        _MPOL_MF_STRICT | _MPOL_MF_MOVE,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mbind to nodes {nodes} failed: {os.strerror(err)}")


def page_nodes(buffer: torch.Tensor) -> list[int]:
    """The NUMA node holding each page of ``buffer`` (negative errno for pages not yet touched)."""
    addr, nbytes = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    first = addr - addr % PAGE
    count = -(-(addr + nbytes - first) // PAGE)
    pages = (ctypes.c_void_p * count)(*[first + i * PAGE for i in range(count)])
    status = (ctypes.c_int * count)()
    rc = _libc().syscall(_syscall("move_pages"), 0, ctypes.c_ulong(count), pages, None, status, 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"move_pages failed: {os.strerror(err)}")
    return list(status)


def numa_empty(nbytes: int, nodes: list[int] | None = None, interleave: bool = False) -> torch.Tensor:
    """A page-aligned uint8 tensor of ``nbytes``, its pages placed on ``nodes`` (None: the kernel's choice).

    The memory comes from an anonymous mmap, so it is page-aligned (O_DIRECT-ready) and untouched until
    bound; it is zero-filled after binding so every page is allocated where the binding says.
    """
    length = max(PAGE, align_up(nbytes, PAGE))
    region = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    tensor = torch.frombuffer(region, dtype=torch.uint8)  # keeps ``region`` alive
    if nodes:
        bind_pages(tensor, nodes, interleave)
    tensor.zero_()
    return tensor[:nbytes]
