"""Checkpoints that are either complete and verified, or ignored.

A checkpoint is a directory ``<output_dir>/checkpoints/step-NNNNNNNN/`` holding the engine's files,
the loop state and ``manifest.json`` (size and sha256 of every file). It is written under a temporary
name, synced, then renamed into place, so a crash mid-save leaves only a ``.tmp-*`` directory that the
next run removes; the previous checkpoint is never touched. Loading verifies every file against the
manifest first: a truncated or altered checkpoint is refused, never loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tiertune.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"
FULL_BYTES = 2**20  # free space under which a device whose write just failed is taken to be full


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Published checkpoints, oldest first; not yet verified.

    A ``step-*`` directory only ever appears by the final rename of a finished save, so one that fails
    verification later was damaged afterwards: it is reported, never skipped in silence.
    """
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append(Checkpoint(entry, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete leftovers of saves that were interrupted; they were never complete checkpoints."""
    root = checkpoints_dir(run_dir)
    removed = [p for p in root.glob(_TMP_PREFIX + "*")] if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], keep: int) -> Checkpoint:
    """Run ``write(tmp_dir)``, add the manifest, publish atomically, then prune to ``keep`` checkpoints."""
    root = checkpoints_dir(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"{_TMP_PREFIX}step-{step:08d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "files": {
                name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in files
            },
        }
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        for name in files:
            _fsync_path(tmp / name)
        _fsync_path(tmp)
        if final.exists():  # a checkpoint of this step from an earlier attempt: the new one replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(root)
    except Exception as e:  # torch and safetensors report a full disk as their own errors
        # Measured before the partial save is removed: a device left with (almost) nothing free is full,
        # whatever the writer made of its ENOSPC (torch: "unexpected pos ...").
        full = root.exists() and shutil.disk_usage(root).free < FULL_BYTES
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        kept = f"; the last complete checkpoint ({previous[-1].path}) is intact" if previous else ""
        free = shutil.disk_usage(root).free if root.exists() else 0
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            reason = "no space left on the device"
        elif full:
            reason = f"no space left on the device; the writer said {type(e).__name__}: {e}"
        else:
            reason = f"{type(e).__name__}: {e}"
        raise CheckpointError(
            f"cannot write checkpoint step {step} under {root} ({reason}; {free / 2**20:.0f} MiB free there "
            f"once the partial save is removed): free space or lower train.keep_checkpoints{kept}"
        ) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return Checkpoint(final, step)


def verify_checkpoint(path: Path) -> dict:
    """Check every file against the manifest; return the manifest or raise CheckpointError."""

    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {path} is damaged and was not loaded: {reason}. Move that directory aside to "
            f"resume from an earlier checkpoint, or start over with another output_dir."
        )

    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        version = manifest["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise refuse(f"its {MANIFEST} is unreadable ({e})") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; this tiertune reads version {FORMAT_VERSION}"
        )
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise refuse(f"{name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise refuse(f"{name} has {size} bytes, the manifest says {expected['bytes']} (truncated?)")
        if _sha256(file) != expected["sha256"]:
            raise refuse(f"{name} does not match its checksum (altered or corrupted)")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
