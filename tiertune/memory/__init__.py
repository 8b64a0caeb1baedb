"""Memory: readings of process and device memory (tiers, the buffer pool and the ledger come next)."""

from tiertune.memory.usage import device_peak_bytes, format_bytes, peak_rss_bytes, rss_bytes

__all__ = ["device_peak_bytes", "format_bytes", "peak_rss_bytes", "rss_bytes"]
