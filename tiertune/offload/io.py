"""Asynchronous file I/O into aligned buffers: the NVMe tier's transport.

The built-in backend is a pool of threads issuing positional ``preadv``/``pwritev`` calls on files opened
with O_DIRECT (no page cache: the drive's bandwidth, not the kernel's copy). The GIL is released for the
whole system call, so ``queue_depth`` threads keep that many requests in flight; a large request is cut
into ``block_bytes`` pieces so that one tensor uses the whole queue. Each piece's checksum is computed on
the worker thread too, outside the GIL: CRC32C with the CPU's own instruction (the ``crc32c`` package, about
9 GB/s a core here, a quarter of the CPU time zlib's CRC32 takes; zlib where the package is missing).
The checksums live as long as the store, so which of the two a run uses is its own affair.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    from crc32c import crc32c as checksum
except ImportError:  # pragma: no cover - the package is a dependency; a build without it still works
    checksum: Callable[[memoryview], int] = zlib.crc32


@dataclass(frozen=True)
class Piece:
    """One contiguous transfer: ``nbytes`` of ``buffer`` starting at ``buffer_offset``, at ``file_offset``."""

    fd: int
    file_offset: int
    buffer_offset: int
    nbytes: int
    path: str = ""  # the file's name, for backends that open it themselves


class ThreadPoolIO:
    """O_DIRECT pread/pwrite on a thread pool; every call returns futures of per-piece CRC32s."""

    name = "threads"

    def __init__(self, queue_depth: int = 8, block_bytes: int = 1 << 20) -> None:
        self.queue_depth, self.block_bytes = queue_depth, block_bytes
        self._pool = ThreadPoolExecutor(max_workers=queue_depth, thread_name_prefix="tiertune-io")

    def split(
        self, fd: int, file_offset: int, buffer_offset: int, nbytes: int, path: str = ""
    ) -> list[Piece]:
        return [
            Piece(fd, file_offset + done, buffer_offset + done, min(self.block_bytes, nbytes - done), path)
            for done in range(0, nbytes, self.block_bytes)
        ]

    def write(self, piece: Piece, buffer: torch.Tensor) -> Future[int]:
        return self._pool.submit(_pwrite, piece, _bytes_view(buffer))

    def read(self, piece: Piece, buffer: torch.Tensor) -> Future[int]:
        return self._pool.submit(_pread, piece, _bytes_view(buffer))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class IOBackendUnavailable(RuntimeError):
    """The asked-for I/O backend cannot run on this machine (the message says what is missing)."""


class DeepSpeedIO:
    """DeepSpeed's async_io op (libaio, O_DIRECT; it queues ``queue_depth`` requests of ``block_bytes`` in
    the kernel) behind the same interface: a few worker threads each submit one piece at a time to their
    own handle and wait for it (the op reports completion per handle, not per request), then checksum it.
    Its op is compiled on first use (a few minutes, once per machine) and needs the libaio headers."""

    name = "deepspeed"
    WORKERS = 2
    PIECE_BYTES = 16 << 20  # libaio splits each piece into block_bytes requests itself

    def __init__(self, queue_depth: int = 8, block_bytes: int = 1 << 20) -> None:
        self.queue_depth, self.block_bytes = queue_depth, block_bytes
        # The op copies each piece through a page-locked buffer of its size and aborts the process when
        # locking fails: keep the pieces inside the locked-memory limit, or refuse to start.
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        lockable = None if soft == resource.RLIM_INFINITY or os.geteuid() == 0 else soft
        self.piece_bytes = self.PIECE_BYTES
        if lockable is not None:
            self.piece_bytes = (
                min(self.PIECE_BYTES, lockable // (2 * self.WORKERS)) // block_bytes * block_bytes
            )
            if self.piece_bytes < block_bytes:
                raise IOBackendUnavailable(
                    f"offload.io_backend=deepspeed locks memory for its transfers, and this process may lock "
                    f"only {soft >> 10} KiB (ulimit -l); raise the limit, or use offload.io_backend=threads"
                )
        self._op = load_deepspeed_aio()
        self._first_write = threading.Lock()  # the op's first write logs a warning holding the GIL
        self._warmed = False
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=self.WORKERS, thread_name_prefix="tiertune-aio")

    def split(
        self, fd: int, file_offset: int, buffer_offset: int, nbytes: int, path: str = ""
    ) -> list[Piece]:
        if not path:
            raise ValueError("the deepspeed backend opens files by name: give the piece's path")
        step = max(self.piece_bytes, self.block_bytes)
        return [
            Piece(fd, file_offset + done, buffer_offset + done, min(step, nbytes - done), path)
            for done in range(0, nbytes, step)
        ]

    def _handle(self):  # noqa: ANN202 (the op's own type)
        if not hasattr(self._local, "handle"):
            self._local.handle = self._op.aio_handle(self.block_bytes, self.queue_depth, False, True, 1)
        return self._local.handle

    def _run(self, write: bool, piece: Piece, buffer: torch.Tensor) -> int:
        chunk = buffer.view(torch.uint8).reshape(-1)[piece.buffer_offset : piece.buffer_offset + piece.nbytes]
        handle = self._handle()
        if write:
            # One thread at a time until the op's one-off warning (logged holding the GIL) is out.
            with self._first_write if not self._warmed else contextlib.nullcontext():
                done = handle.sync_pwrite(chunk, piece.path, piece.file_offset)
                self._warmed = True
        else:
            done = handle.sync_pread(chunk, piece.path, piece.file_offset)
        if done < 0:
            raise OSError(
                f"libaio {'write' if write else 'read'} of {piece.nbytes} bytes at {piece.file_offset} failed"
            )
        return checksum(memoryview(chunk.numpy()))

    def write(self, piece: Piece, buffer: torch.Tensor) -> Future[int]:
        return self._pool.submit(self._run, True, piece, buffer)

    def read(self, piece: Piece, buffer: torch.Tensor) -> Future[int]:
        return self._pool.submit(self._run, False, piece, buffer)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def load_deepspeed_aio():  # noqa: ANN201 (the op's module)
    """DeepSpeed's async_io op, compiled if needed; :class:`IOBackendUnavailable` says why it cannot be."""
    return load_deepspeed_op(
        "AsyncIOBuilder",
        "offload.io_backend=deepspeed",
        "offload.io_backend=threads",
        IOBackendUnavailable,
        needs="libaio's headers are missing: install libaio-dev, e.g. `apt-get install libaio-dev`",
    )


def load_deepspeed_op(
    builder: str, setting: str, instead: str, error: Callable[[str], Exception], needs: str = ""
):  # noqa: ANN201 (the op's module)
    """DeepSpeed's CPU op made by ``deepspeed.ops.op_builder.cpu.<builder>``, compiled if needed (into the
    environment, see :func:`_private_build_dir`). Each way it can fail raises ``error`` with a message that
    names ``setting`` (what asked for the op), the cause (``needs``: what a builder that is not compatible
    lacks) and ``instead`` (the setting that does without it)."""
    try:
        from deepspeed.ops.op_builder import cpu
    except ImportError as e:
        raise error(
            f"{setting}: DeepSpeed is not installed ({e}); install it with "
            f"`pip install --no-build-isolation deepspeed`, or use {instead}"
        ) from None
    _private_build_dir()
    made = getattr(cpu, builder)()
    if not made.is_compatible():
        raise error(
            f"{setting}: DeepSpeed's {made.NAME} op cannot build here ({needs or 'see its log'}); or use {instead}"
        )
    try:
        return made.load(verbose=False)
    except Exception as e:  # a compiler or linker failure surfaces as several error types
        raise error(
            f"{setting}: building DeepSpeed's {made.NAME} op failed ({type(e).__name__}: {e}); use {instead}"
        ) from None


STALE_BUILD_S = 20 * 60  # the op builds in about 3.5 minutes on 2 cores: a lock this old is a dead build's


def _private_build_dir() -> None:
    """Build the op inside this Python environment (unless TORCH_EXTENSIONS_DIR says where), not in the
    user-wide cache that every environment on the machine shares, and clear a dead build's lock there.

    torch builds extensions under a lock file and waits for it without end; a build killed half way (a
    timeout, ^C) leaves the lock behind, and every later load would hang."""
    directory = Path(
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    )
    for lock in directory.glob("**/lock"):
        with contextlib.suppress(OSError):
            if time.time() - lock.stat().st_mtime > STALE_BUILD_S:
                lock.unlink()
                warnings.warn(
                    f"removed {lock}, left by a build of {lock.parent.name} that never finished", stacklevel=2
                )


def make_io(backend: str, queue_depth: int, block_bytes: int) -> ThreadPoolIO | DeepSpeedIO:
    if backend == "deepspeed":
        return DeepSpeedIO(queue_depth, block_bytes)
    if backend != "threads":
        raise ValueError(f"unknown I/O backend {backend!r}: threads or deepspeed")
    return ThreadPoolIO(queue_depth, block_bytes)


def _bytes_view(buffer: torch.Tensor) -> memoryview:
    if buffer.device.type != "cpu" or not buffer.is_contiguous():
        raise ValueError("file I/O needs a contiguous host buffer")
    return memoryview(buffer.view(torch.uint8).numpy()).cast("B")


def _pwrite(piece: Piece, view: memoryview) -> int:
    chunk = view[piece.buffer_offset : piece.buffer_offset + piece.nbytes]
    done = 0
    while done < piece.nbytes:  # pwritev may write less than asked (signals, some filesystems)
        done += os.pwritev(piece.fd, [chunk[done:]], piece.file_offset + done)
    return checksum(chunk)


def _pread(piece: Piece, view: memoryview) -> int:
    chunk = view[piece.buffer_offset : piece.buffer_offset + piece.nbytes]
    done = 0
    while done < piece.nbytes:
        n = os.preadv(piece.fd, [chunk[done:]], piece.file_offset + done)
        if n == 0:
            raise OSError(f"unexpected end of file at offset {piece.file_offset + done}")
        done += n
    return checksum(chunk)
