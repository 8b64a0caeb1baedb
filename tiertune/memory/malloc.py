"""How much freed host memory the C allocator keeps.

torch's CPU tensors come from ``malloc``. glibc serves a block below its mmap threshold from its heap and
keeps the block when it is freed, and it raises that threshold (up to 32 MiB) each time a bigger mapped
block is freed. A training step makes and frees many tensors between 1 and 32 MiB (a projection's
gradient, the logits, activations), so the heap grows to their high-water mark, fragments, and the process
keeps that memory for good: measured on llama-3b, 0.9 GiB of resident set beyond the ledger and the
process's fixed cost. With a fixed, lower threshold those tensors get their own mappings, given back to
the system when freed, at the price of fresh pages (page faults) for each, every time: no cost that
shows on qwen2-0.5b with its weights on NVMe (0.98x its step, within the noise; ``benchmarks/malloc.py``
measures both), but 1.5x the step of small-llama, whose step is short and all made of such tensors. So ``auto`` sets it only for a job short of
host memory (:func:`auto_mmap_threshold_mib`).

Only glibc has ``mallopt``; elsewhere this does nothing. A ``MALLOC_MMAP_THRESHOLD_`` in the environment
is the user's own setting and wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
AUTO_MIB = 1.0  # what ``memory.malloc_mmap_threshold_mib=auto`` sets for a job short of memory
SHORT_SHARE = 0.5  # a plan filling at least this share of the host budget is short of memory


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def set_mmap_threshold(mib: float) -> bool:
    """Blocks of at least ``mib`` MiB get their own mappings from now on, and what the heap holds free now
    goes back to the system. False where it cannot be set (not glibc, or the environment sets it)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _libc()
    if libc is None:
        return False
    if libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(int(mib * 2**20))) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD, %s MiB) was refused; the allocator keeps its own", mib)
        return False
    libc.malloc_trim(ctypes.c_size_t(0))
    return True


def auto_mmap_threshold_mib(on_nvme: bool, host_peak_bytes: int, host_budget_bytes: int) -> float:
    """What ``memory.malloc_mmap_threshold_mib=auto`` sets: :data:`AUTO_MIB` for a job short of host
    memory, one whose plan puts state on NVMe and whose planned host peak fills at least
    :data:`SHORT_SHARE` of the host budget (the planner fills it when the state does not fit: llama-3b's
    plan at a 20.5 GiB budget peaks at 18.1 GiB); else 0, the allocator as it is. A job with state on
    NVMe by choice and half its budget free has room for what the heap keeps (0.9 GiB on llama-3b) and
    would only pay the page faults."""
    short = on_nvme and host_budget_bytes > 0 and host_peak_bytes >= SHORT_SHARE * host_budget_bytes
    return AUTO_MIB if short else 0.0
