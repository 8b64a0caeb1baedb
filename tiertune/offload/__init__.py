"""Offload: blocks (the units that move) and their flat buffers, asynchronous file I/O, the NVMe store
and the placement planner. The block streaming engine builds on these."""

from tiertune.offload.blocks import Block, find_blocks
from tiertune.offload.flat import FlatParams, flatten_blocks, flatten_params
from tiertune.offload.io import ThreadPoolIO
from tiertune.offload.store import Extent, NvmeStore, PendingIO, StoreCorruption, StoreError

__all__ = [
    "FlatParams",
    "flatten_blocks",
    "flatten_params",
    "Block",
    "Extent",
    "NvmeStore",
    "PendingIO",
    "StoreCorruption",
    "StoreError",
    "ThreadPoolIO",
    "find_blocks",
]
