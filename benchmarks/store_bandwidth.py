"""The NVMe store's read and write bandwidth against a raw O_DIRECT sequential baseline, in one run.

    bash scripts/venv-run python benchmarks/store_bandwidth.py [--dir DIR] [--gib 1] [--repeats 3]

The baseline is one thread writing then reading a file sequentially with O_DIRECT in 8 MiB requests
(what `dd oflag=direct bs=8M` does). The store moves the same bytes as 64 MiB extents through its
thread pool (queue depth 8, 1 MiB pieces, CRC32 on every piece), and, where DeepSpeed's async_io op
builds, through that backend too (libaio, same queue depth and request size). They alternate, so the
disk's noise hits all; the ratios of median bandwidths are printed. Goal: the store at >= 90% of the
baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tiertune.memory import BufferPool
from tiertune.offload import NvmeStore
from tiertune.offload.store import StoreError

MIB = 2**20


def raw_sequential(directory: Path, buffer: torch.Tensor, total: int) -> tuple[float, float]:
    """(write GB/s, read GB/s) of one O_DIRECT file, written and read front to back."""
    path = directory / "raw-baseline.bin"
    view = memoryview(buffer.numpy())
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        os.posix_fallocate(fd, 0, total)
        t0 = time.perf_counter()
        for offset in range(0, total, len(view)):
            os.pwritev(fd, [view], offset)
        os.fsync(fd)
        t1 = time.perf_counter()
        for offset in range(0, total, len(view)):
            os.preadv(fd, [view], offset)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
        path.unlink()
    return total / (t1 - t0) / 1e9, total / (t2 - t1) / 1e9


def store_round(store: NvmeStore, pool: BufferPool, total: int, extent_bytes: int) -> tuple[float, float]:
    """(write GB/s, read GB/s) of the store moving ``total`` bytes as extents, 4 in flight at a time."""
    extents = [store.allocate(f"e{i}", extent_bytes) for i in range(total // extent_bytes)]
    buffers = [pool.acquire(extent_bytes) for _ in range(4)]
    t0 = time.perf_counter()
    for i in range(0, len(extents), 4):
        for p in [store.write(e, b.slot) for e, b in zip(extents[i : i + 4], buffers)]:
            p.wait()
    store.sync()  # the same durability as the baseline's fsync
    t1 = time.perf_counter()
    for i in range(0, len(extents), 4):
        for p in [store.read(e, b.slot) for e, b in zip(extents[i : i + 4], buffers)]:
            p.wait()
    t2 = time.perf_counter()
    for b in buffers:
        pool.release(b)
    for e in extents:
        store.free(e)
    return total / (t1 - t0) / 1e9, total / (t2 - t1) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=None, help="a directory on the drive to test (default: a temp dir)"
    )
    parser.add_argument("--gib", type=float, default=1.0, help="bytes moved per round")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    extent = 64 * MIB
    total = max(extent, int(args.gib * 2**30) // extent * extent)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        pool = BufferPool({extent: 4, 8 * MIB: 1})
        raw_buffer = pool.acquire(8 * MIB).slot
        raw_buffer.random_(0, 255)
        (directory / "t").mkdir()
        (directory / "d").mkdir()
        stores = {"threads": NvmeStore([directory / "t"], total, queue_depth=8, block_bytes=MIB)}
        try:  # DeepSpeed's libaio op, where it builds (offload.io_backend=deepspeed)
            stores["deepspeed"] = NvmeStore(
                [directory / "d"], total, queue_depth=8, block_bytes=MIB, backend="deepspeed"
            )
        except StoreError as e:
            print(f"(deepspeed backend left out: {e})")
        raw: list[tuple[float, float]] = []
        ours: dict[str, list[tuple[float, float]]] = {name: [] for name in stores}
        for _ in range(args.repeats):
            raw.append(raw_sequential(directory, raw_buffer, total))
            for name, store in stores.items():
                ours[name].append(store_round(store, pool, total, extent))
        for store in stores.values():
            store.close()
    print(f"{total / 2**30:.2f} GiB per round, {args.repeats} rounds, in {args.dir or tempfile.gettempdir()}")
    for i, what in enumerate(("write", "read")):
        r = statistics.median(x[i] for x in raw)
        line = f"  {what:5}  raw O_DIRECT sequential {r:6.2f} GB/s"
        for name, rounds in ours.items():
            s = statistics.median(x[i] for x in rounds)
            line += f"   store ({name}) {s:6.2f} GB/s, ratio {s / r:.2f}"
        print(line)


if __name__ == "__main__":
    main()
