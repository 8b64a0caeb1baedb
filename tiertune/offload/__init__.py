"""Offload: blocks (the units that move), asynchronous file I/O and the NVMe store.

The placement planner and the block streaming engine build on these.
"""

from tiertune.offload.blocks import Block, find_blocks
from tiertune.offload.io import ThreadPoolIO
from tiertune.offload.store import Extent, NvmeStore, PendingIO, StoreCorruption, StoreError

__all__ = [
    "Block",
    "Extent",
    "NvmeStore",
    "PendingIO",
    "StoreCorruption",
    "StoreError",
    "ThreadPoolIO",
    "find_blocks",
]
