"""Memory: the tiers, their budgets, the byte ledger, the buffer pool, NUMA/CXL placement, readings."""

from tiertune.memory.budgets import Budgets, resolve_budgets
from tiertune.memory.ledger import Ledger
from tiertune.memory.numa import NumaNode, discover, select_cxl_nodes
from tiertune.memory.placement import Request, place_host_bytes
from tiertune.memory.pool import BufferPool, PoolBuffer, PoolExhausted
from tiertune.memory.tiers import Kind, Tier
from tiertune.memory.usage import device_peak_bytes, format_bytes, peak_rss_bytes, rss_bytes

__all__ = [
    "Budgets",
    "BufferPool",
    "Kind",
    "Ledger",
    "NumaNode",
    "PoolBuffer",
    "PoolExhausted",
    "Request",
    "Tier",
    "device_peak_bytes",
    "discover",
    "format_bytes",
    "peak_rss_bytes",
    "place_host_bytes",
    "resolve_budgets",
    "rss_bytes",
    "select_cxl_nodes",
]
