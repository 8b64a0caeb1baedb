"""Asynchronous file I/O into aligned buffers: the NVMe tier's transport.

The built-in backend is a pool of threads issuing positional ``preadv``/``pwritev`` calls on files opened
with O_DIRECT (no page cache: the drive's bandwidth, not the kernel's copy). The GIL is released for the
whole system call, so ``queue_depth`` threads keep that many requests in flight; a large request is cut
into ``block_bytes`` pieces so that one tensor uses the whole queue. Each piece's CRC32 is computed on the
worker thread too (zlib releases the GIL), so checksums cost no time on the training thread.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Piece:
    """One contiguous transfer: ``nbytes`` of ``buffer`` starting at ``buffer_offset``, at ``file_offset``."""

    fd: int
    file_offset: int
    buffer_offset: int
    nbytes: int


class ThreadPoolIO:
    """O_DIRECT pread/pwrite on a thread pool; every call returns futures of per-piece CRC32s."""

    name = "threads"

    def __init__(self, queue_depth: int = 8, block_bytes: int = 1 << 20) -> None:
        self.queue_depth, self.block_bytes = queue_depth, block_bytes
        self._pool = ThreadPoolExecutor(max_workers=queue_depth, thread_name_prefix="tiertune-io")

    def split(self, fd: int, file_offset: int, buffer_offset: int, nbytes: int) -> list[Piece]:
        return [
            Piece(fd, file_offset + done, buffer_offset + done, min(self.block_bytes, nbytes - done))
            for done in range(0, nbytes, self.block_bytes)
        ]

    def write(self, piece: Piece, buffer: torch.Tensor) -> Future[int]:
        return self._pool.submit(_pwrite, piece, _bytes_view(buffer))

    def read(self, piece: Piece, buffer: torch.Tensor) -> Future[int]:
        return self._pool.submit(_pread, piece, _bytes_view(buffer))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _bytes_view(buffer: torch.Tensor) -> memoryview:
    if buffer.device.type != "cpu" or not buffer.is_contiguous():
        raise ValueError("file I/O needs a contiguous host buffer")
    return memoryview(buffer.view(torch.uint8).numpy()).cast("B")


def _pwrite(piece: Piece, view: memoryview) -> int:
    chunk = view[piece.buffer_offset : piece.buffer_offset + piece.nbytes]
    done = 0
    while done < piece.nbytes:  # pwritev may write less than asked (signals, some filesystems)
        done += os.pwritev(piece.fd, [chunk[done:]], piece.file_offset + done)
    return zlib.crc32(chunk)


def _pread(piece: Piece, view: memoryview) -> int:
    chunk = view[piece.buffer_offset : piece.buffer_offset + piece.nbytes]
    done = 0
    while done < piece.nbytes:
        n = os.preadv(piece.fd, [chunk[done:]], piece.file_offset + done)
        if n == 0:
            raise OSError(f"unexpected end of file at offset {piece.file_offset + done}")
        done += n
    return zlib.crc32(chunk)
