"""The output directory of a job: created, locked against a second job, and holding what it writes.

Layout::

    <output_dir>/
      config.resolved.yaml   every key with the value this run used
      metrics.jsonl          one JSON object per optimizer step
      summary.json           the final summary
      loss.svg               the loss curve
      checkpoints/step-NNNNNNNN/
      final/                 the exported model or adapter
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from pathlib import Path
from typing import IO, Any

from tiertune.config import JobConfig, dump_config
from tiertune.errors import RunDirError

RUNS_ROOT = Path("runs")
LOCK_FILE = ".lock"


def default_output_dir(cfg: JobConfig, now: float | None = None) -> Path:
    """A new directory under ./runs named by time and model, never an existing one."""
    model = cfg.model.preset or Path((cfg.model.path or "model").removeprefix("builtin:")).name
    base = RUNS_ROOT / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{model}-{cfg.tuning.method}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class RunDir:
    """An output directory held by this process (an exclusive lock) until :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._lock: IO[str] | None = open(path / LOCK_FILE, "a+")  # noqa: SIM115 (held until close)
        except OSError as e:
            raise RunDirError(
                f"cannot use output_dir {str(path)!r}: {e.strerror}; choose a writable "
                "directory with output_dir=..."
            ) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise RunDirError(
                f"output_dir {str(path)!r} is in use by another tiertune job ({holder}); "
                "wait for it to finish or choose another output_dir"
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}\n")
        self._lock.flush()

    def write_config(self, cfg: JobConfig) -> Path:
        target = self.path / "config.resolved.yaml"
        write_atomic(target, dump_config(cfg))
        return target

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLog:
    """``metrics.jsonl``: one row per optimizer step, flushed as written.

    On resume the rows of steps after the checkpoint (written by the run that was interrupted, and
    about to be redone) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, resumed_step: int) -> None:
        self.path = path
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= resumed_step:
                    kept.append(line)
        write_atomic(path, "".join(line + "\n" for line in kept))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held until close)

    def write(self, row: dict[str, Any]) -> None:
        # JSON has no NaN or infinity: a non-finite reading is written as null (strict parsers choke on NaN).
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def rows(self) -> list[dict[str, Any]]:
        return self.read(self.path)

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The rows of a metrics file."""
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        self._file.close()
