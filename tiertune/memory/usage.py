"""Process and device memory readings: what the progress bar, metrics and summary report.

RSS is read from /proc (Linux) with psutil as the portable fallback. The peak is the kernel's
high-water mark (VmHWM), so it includes every transient allocation, not just the moments sampled.
"""

from __future__ import annotations

import resource
import sys

import psutil
import torch


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Highest resident set size this process has reached."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB on Linux


def device_peak_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated by PyTorch on an accelerator since start; None on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as budgets are given in GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
