"""The byte ledger: bytes held per tier and per kind, now and at their peak.

Every part that holds memory for the job reports it here (the engine its weights, gradients and optimizer
state, the buffer pool its staging and its waste), so that one place answers "where are the bytes?" for
every metrics row and the summary. Thread-safe: I/O threads report too.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from tiertune.memory.tiers import Kind, Tier


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[tuple[Tier, Kind], int] = defaultdict(int)
        self._peak_cell: dict[tuple[Tier, Kind], int] = defaultdict(int)
        self._peak_tier: dict[Tier, int] = defaultdict(int)
        self._waste: dict[Tier, int] = defaultdict(int)
        self._watchers: list[Callable[[dict[str, int]], None]] = []

    def watch(self, callback: Callable[[dict[str, int]], None]) -> None:
        """Call ``callback`` with the bytes held per tier after every change (for traces)."""
        self._watchers.append(callback)

    def add(self, tier: Tier, kind: Kind, nbytes: int) -> None:
        with self._lock:
            self._update(tier, kind, self._bytes[(tier, kind)] + nbytes)

    def set(self, tier: Tier, kind: Kind, nbytes: int) -> None:
        """Record that ``kind`` now holds exactly ``nbytes`` on ``tier``."""
        with self._lock:
            self._update(tier, kind, nbytes)

    def add_waste(self, tier: Tier, nbytes: int) -> None:
        """Bytes reserved on ``tier`` that hold nothing (alignment and size-class rounding)."""
        with self._lock:
            self._waste[tier] += nbytes

    def _update(self, tier: Tier, kind: Kind, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(
                f"the ledger would go negative for {kind.value} on {tier.value}: a double release"
            )
        self._bytes[(tier, kind)] = nbytes
        self._peak_cell[(tier, kind)] = max(self._peak_cell[(tier, kind)], nbytes)
        tier_total = sum(n for (t, _), n in self._bytes.items() if t is tier)
        self._peak_tier[tier] = max(self._peak_tier[tier], tier_total)
        if self._watchers:
            totals: dict[str, int] = defaultdict(int)
            for (t, _), n in self._bytes.items():
                totals[t.value] += n
            for callback in self._watchers:
                callback(dict(totals))

    def bytes(self, tier: Tier, kind: Kind | None = None) -> int:
        with self._lock:
            if kind is not None:
                return self._bytes[(tier, kind)]
            return sum(n for (t, _), n in self._bytes.items() if t is tier)

    def peak(self, tier: Tier) -> int:
        with self._lock:
            return self._peak_tier[tier]

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: ``{"bytes": {tier: {kind: n}}, "peak_bytes": {tier: n}, "waste_bytes": {tier: n}}``,
        tiers and kinds that never held anything left out."""
        with self._lock:
            current: dict[str, dict[str, int]] = {}
            for (tier, kind), peak in self._peak_cell.items():
                if peak:
                    current.setdefault(tier.value, {})[kind.value] = self._bytes[(tier, kind)]
            return {
                "bytes": current,
                "peak_bytes": {t.value: n for t, n in self._peak_tier.items() if n},
                "waste_bytes": {t.value: n for t, n in self._waste.items() if n},
            }
