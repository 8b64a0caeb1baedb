"""Each step's metrics as TensorBoard scalars, beside ``metrics.jsonl``: ``tensorboard --logdir RUN_DIR``.

``train.tensorboard=auto`` writes them when the ``tensorboard`` package is installed, ``on`` insists
(and says what to install), ``off`` never. A metrics row's numbers become scalars under their keys,
nested ones joined by ``/`` (``tier_bytes/device/params``, ``nvme_bytes/read/optimizer``,
``exits/exit@2/loss``). A resumed run purges what the interrupted one logged after its checkpoint, as
``metrics.jsonl`` drops those rows, so the curves read as one run.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tiertune.errors import ConfigError

BOARD_DIR = "tensorboard"


def board_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class Board:
    """The run's TensorBoard event files (nothing at all when ``mode`` says not to write them)."""

    def __init__(self, mode: str, out: Path, resumed_step: int) -> None:
        self._writer = None
        if mode == "off" or (mode == "auto" and not board_available()):
            return
        if not board_available():
            raise ConfigError(
                [
                    "train.tensorboard: on, but the tensorboard package is not installed: pip install tensorboard"
                ]
            )
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events of steps after the checkpoint (the interrupted run's) are hidden
        self._writer = SummaryWriter(
            str(out / BOARD_DIR), purge_step=resumed_step + 1 if resumed_step else None
        )

    @property
    def path(self) -> Path | None:
        return Path(self._writer.log_dir) if self._writer is not None else None

    def write(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            return
        for key, value in scalars(row):
            self._writer.add_scalar(key, value, global_step=row["step"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def scalars(row: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The finite numbers of a metrics row (but its step), nested keys joined by ``/``."""
    for key, value in row.items():
        if key == "step" and not prefix:
            continue
        if isinstance(value, dict):
            yield from scalars(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and math.isfinite(value):  # bools too: 0 or 1
            yield f"{prefix}{key}", float(value)
