"""The LUC policy: a (bits, sparsity) setting per layer that meets a global budget at the least total
measured sensitivity, so the least sensitive layers are compressed hardest.

The budget is an average code width over the compressed weights (``avg_bits``, each layer weighted by its
parameter count) and an average share of weights pruned (``sparsity``), or instead of the width a cap on
the stored bytes (``max_bytes``: codes, masks and group scales counted as stored). Choosing one option per
layer under two additive constraints is a multiple-choice knapsack; :func:`solve` solves it exactly by
dynamic programming over the budgets, discretised so that layers of equal size (every decoder layer of a
model) are counted without rounding, and any rounding is upwards: a policy it returns always meets the
budget.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiertune.tuning.luc.compress import Setting

MAX_UNITS = 4000  # discretisation of the bits (or bytes) budget: exact for equal layers up to 500 of them
SPARSITY_UNITS = 200  # discretisation of the sparsity budget


class InfeasibleBudget(ValueError):
    """No choice of the allowed settings meets the budget."""


@dataclass
class Policy:
    """The solved policy, and the measurements and budget it was solved from (saved with the run)."""

    group_size: int
    layers: dict[str, Setting]  # decoder layer (module path) -> its setting
    params: dict[str, int]  # decoder layer -> weights in its compressed linears
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> setting label -> error
    budget: dict[str, float | None] = field(default_factory=dict)
    stored_bytes: int = 0  # the compressed linears as stored (codes, masks, scales)
    dense_bytes: int = 0  # the same linears in 16-bit

    @property
    def avg_bits(self) -> float:
        total = sum(self.params.values())
        return sum(self.params[n] * s.bits for n, s in self.layers.items()) / total

    @property
    def sparsity(self) -> float:
        total = sum(self.params.values())
        return sum(self.params[n] * s.sparsity for n, s in self.layers.items()) / total

    def to_json(self) -> str:
        return json.dumps(
            {
                "group_size": self.group_size,
                "layers": {n: {"bits": s.bits, "sparsity": s.sparsity} for n, s in self.layers.items()},
                "params": self.params,
                "errors": self.errors,
                "budget": self.budget,
                "stored_bytes": self.stored_bytes,
                "dense_bytes": self.dense_bytes,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Policy:
        d = json.loads(text)
        return cls(
            group_size=d["group_size"],
            layers={n: Setting(s["bits"], s["sparsity"]) for n, s in d["layers"].items()},
            params={n: int(p) for n, p in d["params"].items()},
            errors=d.get("errors", {}),
            budget=d.get("budget", {}),
            stored_bytes=d.get("stored_bytes", 0),
            dense_bytes=d.get("dense_bytes", 0),
        )

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    def describe(self) -> str:
        """The policy as a table: one row per layer, its setting and measured error, then the totals."""
        labels = sorted({lab for e in self.errors.values() for lab in e}, key=_label_order)
        lines = [
            f"LUC policy (group size {self.group_size}; error: relative output error of the layer alone)"
        ]
        if labels:
            lines.append(f"  {'layer':<24} {'setting':<12} " + " ".join(f"{lab:>10}" for lab in labels))
        for name, s in self.layers.items():
            errs = " ".join(f"{self.errors.get(name, {}).get(lab, float('nan')):>10.2e}" for lab in labels)
            lines.append(f"  {name:<24} {s.label:<12} {errs}")
        ratio = (
            f" = {self.stored_bytes / self.dense_bytes:.3f}x their 16-bit bytes" if self.dense_bytes else ""
        )
        lines.append(
            f"  average {self.avg_bits:.2f} bits, sparsity {self.sparsity:.2f}; compressed linears stored in "
            f"{self.stored_bytes:,} bytes{ratio}"
        )
        return "\n".join(lines)


def _label_order(label: str) -> tuple[int, str]:
    digits = "".join(ch for ch in label.split("b")[0] if ch.isdigit())
    return (int(digits) if digits else 99, label)


def solve(
    errors: Mapping[str, Mapping[Setting, float]],
    params: Mapping[str, int],
    *,
    avg_bits: float | None,
    sparsity: float = 0.0,
    max_bytes: int | None = None,
    stored_bytes: Callable[[str, Setting], int] | None = None,
) -> dict[str, Setting]:
    """The setting per layer minimising the summed error such that the parameter-weighted average code
    width is at most ``avg_bits`` (or the stored bytes at most ``max_bytes``, measured by
    ``stored_bytes(layer, setting)``) and the weighted average sparsity at least ``sparsity``. Every layer
    chooses among the settings it has an error for. Raises :class:`InfeasibleBudget` when nothing meets it."""
    names = list(errors)
    if (avg_bits is None) == (max_bytes is None):
        raise ValueError("give exactly one of avg_bits and max_bytes")
    if max_bytes is not None and stored_bytes is None:
        raise ValueError("max_bytes needs stored_bytes")
    options = {n: list(errors[n]) for n in names}
    # cost 1: bits x params (or stored bytes); cost 2: sparsity given up below the most each layer allows
    if avg_bits is not None:
        cost1 = {n: {s: s.bits * params[n] for s in options[n]} for n in names}
        budget1 = avg_bits * sum(params[n] for n in names)
    else:
        cost1 = {n: {s: stored_bytes(n, s) for s in options[n]} for n in names}
        budget1 = float(max_bytes)
    s_max = {n: max(s.sparsity for s in options[n]) for n in names}
    cost2 = {n: {s: (s_max[n] - s.sparsity) * params[n] for s in options[n]} for n in names}
    budget2 = sum(s_max[n] * params[n] for n in names) - sparsity * sum(params[n] for n in names)
    if budget2 < -1e-9:
        raise InfeasibleBudget(
            f"sparsity {sparsity} is more than the settings allow (at most "
            f"{sum(s_max[n] * params[n] for n in names) / sum(params[n] for n in names):.3f})"
        )
    q1 = _quantiser(cost1, budget1, MAX_UNITS)
    q2 = _quantiser(cost2, max(budget2, 0.0), SPARSITY_UNITS)
    b1, b2 = int(math.floor(budget1 * q1 + 1e-9)), int(math.floor(max(budget2, 0.0) * q2 + 1e-9))
    inf = float("inf")
    best = np.full((b1 + 1, b2 + 1), inf)
    best[0, 0] = 0.0
    choice: list[np.ndarray] = []
    for n in names:
        nxt = np.full_like(best, inf)
        pick = np.full(best.shape, -1, dtype=np.int16)
        for k, s in enumerate(options[n]):
            c1, c2 = math.ceil(cost1[n][s] * q1 - 1e-9), math.ceil(cost2[n][s] * q2 - 1e-9)
            if c1 > b1 or c2 > b2:
                continue
            cand = np.full_like(best, inf)
            cand[c1:, c2:] = best[: b1 + 1 - c1, : b2 + 1 - c2] + float(errors[n][s])
            better = cand < nxt
            nxt[better], pick[better] = cand[better], k
        best = nxt
        choice.append(pick)
    if not np.isfinite(best).any():
        what = f"{avg_bits} average bits" if avg_bits is not None else f"{max_bytes:,} bytes"
        raise InfeasibleBudget(f"no choice of the settings meets {what} at sparsity {sparsity}")
    i, j = np.unravel_index(np.argmin(best), best.shape)
    out: dict[str, Setting] = {}
    for n, pick in zip(reversed(names), reversed(choice)):
        s = options[n][int(pick[i, j])]
        out[n] = s
        i -= math.ceil(cost1[n][s] * q1 - 1e-9)
        j -= math.ceil(cost2[n][s] * q2 - 1e-9)
    return {n: out[n] for n in names}


def _quantiser(costs: Mapping[str, Mapping[Setting, float]], budget: float, units: int) -> float:
    """Units per cost unit. Whole-number costs (bits x params, bytes, pruned weights) are divided by their
    greatest common divisor, which counts them exactly (equal layers: one unit a layer-bit) when the budget
    then fits ``units``; otherwise the budget is spread over ``units`` and costs are rounded up."""
    values = [c for per in costs.values() for c in per.values() if c > 0]
    if not values or budget <= 0:
        return 1.0
    if all(float(c).is_integer() for c in values):
        divisor = functools.reduce(math.gcd, (int(c) for c in values))
        if budget / divisor <= units:
            return 1.0 / divisor
    return units / budget
