"""The NVMe store: large preallocated files, aligned extents, asynchronous checked reads and writes.

A store owns one file per directory (``offload.nvme_dir``; several directories stripe every extent over
several drives, so their bandwidths add up). The files are preallocated at start, so a full disk is found
before training, not in the middle of a step. Every extent is 4 KiB-aligned for O_DIRECT; where a
filesystem refuses O_DIRECT (tmpfs, some overlays) the store falls back to buffered I/O with a warning.
Every piece written gets a CRC32C, checked when it is read back: a corrupted byte is an error, never a
silently wrong weight. A lock file keeps a second job out of a store that is in use.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from tiertune import trace
from tiertune.errors import TiertuneError
from tiertune.memory import Kind, Ledger, Tier
from tiertune.memory.pool import ALIGN, align_up
from tiertune.offload.io import IOBackendUnavailable, Piece, make_io

LOCK_NAME = "tiertune-store.lock"


class StoreError(TiertuneError):
    """The NVMe store cannot be used: missing or read-only directory, full disk, store in use."""


class StoreCorruption(TiertuneError):
    """Bytes read back from the store do not match the checksum they were written with."""


@dataclass
class Extent:
    """Where one tensor's bytes live: a stripe in each store file, and their checksums once written."""

    name: str
    nbytes: int  # the bytes asked for; the stripes cover ``align_up(nbytes)``
    stripes: list[tuple[int, int, int]]  # (file index, file offset, length), in buffer order
    kind: Kind = Kind.OPTIMIZER
    checksums: list[int] | None = field(default=None, repr=False)  # per I/O piece, set by write
    label: str | None = None  # what the bytes moved are counted as, when not the kind (frozen weights)


class PendingIO:
    """An in-flight read or write; :meth:`wait` returns once every piece is done, and checked."""

    def __init__(
        self, futures: list[Future[int]], on_done: Callable[[list[int]], None], what: str = "transfer"
    ) -> None:
        self._futures, self._on_done, self._what = futures, on_done, what
        self._finished = False
        self._error: BaseException | None = None

    def wait(self) -> None:
        """Block until every piece has finished (so the buffer is free again), then raise the first error
        or the checksum mismatch, if any; every later call raises it again."""
        if not self._finished:
            futures_wait(self._futures)  # never leave pieces writing into a buffer the caller reuses
            self._finished = True
            try:
                self._on_done([f.result() for f in self._futures])
            except OSError as e:  # the drive or the filesystem failed: say what, keep it a clean stop
                self._error = StoreError(
                    f"{self._what} failed: {e.strerror or e}; the run stops here (checkpoints already "
                    "written are intact); check the drive and its free space, then resume"
                )
                self._error.__cause__ = e
            except BaseException as e:
                self._error = e
        if self._error is not None:
            raise self._error

    def transferred(self) -> bool:
        """Every piece has moved (not yet checked: :meth:`wait` checks)."""
        return all(f.done() for f in self._futures)


def settle(io: PendingIO | None) -> None:
    """Wait for a transfer during cleanup; its own error is dropped for the one already raised."""
    if io is not None:
        with contextlib.suppress(Exception):
            io.wait()


def _trace(futures: list[Future[int]], track: str, extent: Extent) -> None:
    """Record the transfer on the trace (when tracing) as it completes: submission to last piece."""
    tracer = trace.current()
    if tracer is None or not futures:
        return
    start, left, lock = tracer.now(), [len(futures)], threading.Lock()

    def done(_: Future[int]) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            tracer.add(track, extent.name, start, tracer.now(), bytes=align_up(extent.nbytes))

    for f in futures:
        f.add_done_callback(done)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


class NvmeStore:
    def __init__(
        self,
        dirs: list[str | Path],
        capacity_bytes: int,
        *,
        queue_depth: int = 8,
        block_bytes: int = 1 << 20,
        backend: str = "threads",
        ledger: Ledger | None = None,
    ) -> None:
        if not dirs:
            raise StoreError("offload.nvme_dir names no directory")
        if capacity_bytes <= 0:
            raise ValueError(f"a store needs a capacity above 0 bytes, got {capacity_bytes}")
        if block_bytes % ALIGN:
            raise ValueError(f"block_bytes must be a multiple of {ALIGN} for O_DIRECT, got {block_bytes}")
        self.dirs = [Path(d) for d in dirs]
        twice = {str(d) for d in self.dirs if self.dirs.count(d) > 1}
        if twice:
            raise StoreError(f"offload.nvme_dir lists {', '.join(sorted(twice))} more than once")
        self.ledger = ledger
        per_file = align_up(-(-capacity_bytes // len(self.dirs)), block_bytes)
        try:
            self.io = make_io(backend, queue_depth, block_bytes)
        except IOBackendUnavailable as e:
            raise StoreError(str(e)) from None
        self._locks: list[IO[str]] = []
        self._fds: list[int] = []
        self.paths: list[Path] = []
        self.direct: list[bool] = []  # per file: O_DIRECT, or buffered where the filesystem refuses it
        try:
            for i, d in enumerate(self.dirs):
                self._open_one(i, d, per_file)
        except BaseException:
            self.close()
            raise
        if self.io.name == "deepspeed" and not all(self.direct):
            self.close()
            raise StoreError(
                "offload.io_backend=deepspeed needs O_DIRECT, which a directory of offload.nvme_dir refuses; "
                "put the store on a local drive, or use offload.io_backend=threads"
            )
        self.capacity = per_file * len(self.dirs)
        self._next = [0] * len(self.dirs)  # bump pointer per file
        self._free: list[tuple[int, list[tuple[int, int, int]]]] = []  # (aligned bytes, stripes) for reuse
        self._used = 0
        self._live: set[int] = set()  # ids of allocated extents
        # Bytes moved since the store opened, by direction and kind: what a step costs the drive.
        self.moved: dict[tuple[str, str], int] = {}

    def _open_one(self, index: int, directory: Path, nbytes: int) -> None:
        if not directory.is_dir():
            raise StoreError(
                f"NVMe store directory {str(directory)!r} does not exist; create it, or point "
                "offload.nvme_dir at a directory on a fast local drive"
            )
        if not os.access(directory, os.W_OK):
            raise StoreError(f"NVMe store directory {str(directory)!r} is not writable; choose another")
        lock = open(directory / LOCK_NAME, "a+")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StoreError(
                f"the NVMe store in {str(directory)!r} is in use by another job; give each job "
                "its own offload.nvme_dir"
            ) from None
        self._locks.append(lock)
        # The lock makes this job the directory's only user: store files there are leftovers of a job that
        # was killed, and would only eat the space this one needs.
        for leftover in directory.glob("tiertune-store-*.bin"):
            leftover.unlink(missing_ok=True)
        path = directory / f"tiertune-store-{index}.bin"
        direct = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise StoreError(f"cannot create the store file {path}: {e.strerror}") from None
            warnings.warn(
                f"{directory} does not support O_DIRECT; the NVMe store uses buffered I/O there "
                "(slower, and it fills the page cache)",
                stacklevel=3,
            )
            direct = False
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.direct.append(direct)
        self._fds.append(fd)
        self.paths.append(path)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno == errno.EFBIG:
                raise StoreError(
                    f"the NVMe store file in {str(directory)!r} would be {nbytes / 2**30:.2f} GiB, over "
                    "this process's file size limit (ulimit -f) or the filesystem's largest file; raise "
                    "the limit, or add directories to offload.nvme_dir to split the store"
                ) from None
            free = shutil.disk_usage(directory).free
            raise StoreError(
                f"the NVMe store needs {nbytes / 2**30:.2f} GiB in {str(directory)!r} but only "
                f"{free / 2**30:.2f} GiB is free ({e.strerror}); free space, add directories to "
                "offload.nvme_dir, or keep less state on NVMe"
            ) from None

    def allocate(self, name: str, nbytes: int, kind: Kind = Kind.OPTIMIZER) -> Extent:
        """Room for ``nbytes``, striped evenly over the store's files (each stripe 4 KiB-aligned)."""
        aligned = align_up(nbytes)
        for i, (size, stripes) in enumerate(self._free):
            if size == aligned:  # blocks come in a few shapes: exact-size reuse covers a training run
                del self._free[i]
                return self._track(Extent(name, nbytes, stripes, kind))
        share = align_up(-(-aligned // len(self._fds)))
        lengths = [min(share, max(0, aligned - f * share)) for f in range(len(self._fds))]
        per_file = self.capacity // len(self._fds)
        if any(self._next[f] + n > per_file for f, n in enumerate(lengths)):
            raise StoreError(
                f"the NVMe store is full: {name} needs {_mib(aligned)} and the store has "
                f"{_mib(self.capacity - self._used)} of {_mib(self.capacity)} unused, not in one "
                "piece per drive; the plan sized it too small"
            )
        stripes = []
        for f, length in enumerate(lengths):
            if length:
                stripes.append((f, self._next[f], length))
                self._next[f] += length
        return self._track(Extent(name, nbytes, stripes, kind))

    def _track(self, extent: Extent) -> Extent:
        self._live.add(id(extent))
        self._used += align_up(extent.nbytes)
        if self.ledger is not None:
            self.ledger.add(Tier.NVME, extent.kind, align_up(extent.nbytes))
        return extent

    def free(self, extent: Extent) -> None:
        if id(extent) not in self._live:  # a second free would hand the same bytes to two extents
            raise ValueError(f"{extent.name} is not allocated in this store (freed twice?)")
        self._live.discard(id(extent))
        self._free.append((align_up(extent.nbytes), extent.stripes))
        self._used -= align_up(extent.nbytes)
        if self.ledger is not None:
            self.ledger.add(Tier.NVME, extent.kind, -align_up(extent.nbytes))

    def _pieces(self, extent: Extent) -> list[Piece]:
        pieces, at = [], 0
        for f, offset, length in extent.stripes:
            pieces += self.io.split(self._fds[f], offset, at, length, str(self.paths[f]))
            at += length
        return pieces

    def _check_buffer(self, extent: Extent, buffer: torch.Tensor) -> None:
        if buffer.numel() * buffer.element_size() < align_up(extent.nbytes):
            raise ValueError(
                f"{extent.name}: the buffer holds fewer than the extent's {align_up(extent.nbytes)} "
                "aligned bytes; use a pool slot"
            )
        if buffer.data_ptr() % ALIGN:
            raise ValueError(f"{extent.name}: O_DIRECT needs a 4 KiB-aligned buffer; use a pool slot")

    def write(self, extent: Extent, buffer: torch.Tensor) -> PendingIO:
        """Start writing ``buffer``'s first ``align_up(extent.nbytes)`` bytes; keep it unchanged until done."""
        self._check_buffer(extent, buffer)
        futures = [self.io.write(p, buffer) for p in self._pieces(extent)]
        _trace(futures, "nvme write", extent)
        self._count("write", extent)

        def record(crcs: list[int]) -> None:
            extent.checksums = crcs

        return PendingIO(futures, record, f"writing {extent.name} to the NVMe store")

    def read(self, extent: Extent, buffer: torch.Tensor) -> PendingIO:
        """Start reading the extent into ``buffer``; :meth:`PendingIO.wait` verifies every checksum."""
        if extent.checksums is None:
            raise ValueError(f"{extent.name} was never written: nothing to read")
        self._check_buffer(extent, buffer)
        pieces = self._pieces(extent)
        futures = [self.io.read(p, buffer) for p in pieces]
        _trace(futures, "nvme read", extent)
        self._count("read", extent)

        def verify(crcs: list[int]) -> None:
            bad = [i for i, (got, want) in enumerate(zip(crcs, extent.checksums)) if got != want]
            if bad:
                first = pieces[bad[0]]
                raise StoreCorruption(
                    f"{extent.name}: {len(bad)} of {len(crcs)} pieces read back from the NVMe store do not "
                    f"match what was written (the first at byte {first.file_offset} of {first.path}): the "
                    "drive or the file was altered, and the run stops here. Checkpoints already written are "
                    "intact: check the drive (and that no other program writes there), then rerun the same "
                    "command to resume from the latest checkpoint"
                )

        return PendingIO(futures, verify, f"reading {extent.name} from the NVMe store")

    def _count(self, direction: str, extent: Extent) -> None:
        key = (direction, extent.label or extent.kind.value)
        self.moved[key] = self.moved.get(key, 0) + align_up(extent.nbytes)

    def moved_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes read and written so far: {"read": {what: bytes}, "write": {what: bytes}}, where ``what`` is
        an extent's kind, or its label."""
        out: dict[str, dict[str, int]] = {}
        for (direction, what), n in self.moved.items():
            out.setdefault(direction, {})[what] = n
        return out

    def sync(self) -> None:
        """Make every completed write durable (the files' metadata included)."""
        for fd in self._fds:
            os.fsync(fd)

    @property
    def used_bytes(self) -> int:
        return self._used

    def close(self) -> None:
        """Stop I/O, delete the store files (they hold only this run's scratch state) and unlock."""
        self.io.close()
        for fd in self._fds:
            os.close(fd)
        for path in self.paths:
            path.unlink(missing_ok=True)
        for lock in self._locks:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
        self._fds, self.paths, self._locks = [], [], []
