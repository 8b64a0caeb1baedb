"""The memory tiers a byte can live in, and the kinds of bytes the ledger counts."""

from __future__ import annotations

import enum


class Tier(enum.Enum):
    """Where bytes live, fastest to slowest as seen from the accelerator."""

    DEVICE = "device"  # accelerator memory; on a machine without one, the CPU's own memory
    PINNED = (
        "pinned"  # page-locked host DRAM: the only host memory the accelerator copies from asynchronously
    )
    HOST = "host"  # pageable host DRAM on NUMA nodes with CPUs
    CXL = "cxl"  # DRAM on CPU-less NUMA nodes (CXL cards): fast for copies, slow for CPU compute
    NVME = "nvme"  # files on NVMe drives


class Kind(enum.Enum):
    """What the bytes are for."""

    PARAMS = "params"  # weights in the compute dtype
    GRADS = "grads"
    OPTIMIZER = "optimizer"  # optimizer moments and fp32 master weights
    ACTIVATIONS = "activations"
    STAGING = "staging"  # buffers that bytes pass through between tiers
