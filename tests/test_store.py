import os
import shutil
import sys

import pytest
import torch

from tiertune.memory import BufferPool, Kind, Ledger, Tier
from tiertune.memory.pool import align_up
from tiertune.offload.store import NvmeStore, StoreCorruption, StoreError

MIB = 2**20


def filled(pool, nbytes, seed):
    buf = pool.acquire(nbytes)
    buf.slot.copy_(
        torch.randint(
            0, 256, (buf.slot.numel(),), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
        )
    )
    return buf


def test_round_trip_striped_over_two_directories(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    ledger = Ledger()
    store = NvmeStore(dirs, 64 * MIB, queue_depth=4, block_bytes=MIB, ledger=ledger)
    pool = BufferPool({3 * MIB + 123: 2})
    src, dst = filled(pool, 3 * MIB + 123, seed=0), pool.acquire(3 * MIB + 123)
    extent = store.allocate("layer0.moments", 3 * MIB + 123)
    assert [f for f, _, _ in extent.stripes] == [0, 1]  # one stripe per drive
    assert sum(n for _, _, n in extent.stripes) == align_up(3 * MIB + 123)
    store.write(extent, src.slot).wait()
    dst.slot.zero_()
    store.read(extent, dst.slot).wait()
    assert torch.equal(src.tensor, dst.tensor)
    assert ledger.bytes(Tier.NVME, Kind.OPTIMIZER) == align_up(3 * MIB + 123)
    store.read(extent, dst.slot).wait()  # the bytes moved are counted per direction and kind
    assert store.moved_bytes() == {
        "write": {"optimizer": align_up(3 * MIB + 123)},
        "read": {"optimizer": 2 * align_up(3 * MIB + 123)},
    }
    assert all(p.stat().st_size >= 32 * MIB for p in store.paths)  # preallocated up front
    paths = list(store.paths)
    store.close()
    assert not any(p.exists() for p in paths)


def test_many_transfers_in_flight_at_once_all_land(tmp_path):
    store = NvmeStore([tmp_path], 64 * MIB, queue_depth=8, block_bytes=256 * 1024)
    pool = BufferPool({MIB: 16})
    sources = [filled(pool, MIB, seed=i) for i in range(8)]
    extents = [store.allocate(f"block{i}", MIB) for i in range(8)]
    for pending in [store.write(e, s.slot) for e, s in zip(extents, sources)]:
        pending.wait()
    targets = [pool.acquire(MIB) for _ in range(8)]
    pending = [store.read(e, t.slot) for e, t in zip(extents, reversed(targets))]
    for p in pending:
        p.wait()
    for s, t in zip(sources, reversed(targets)):
        assert torch.equal(s.tensor, t.tensor)
    store.close()


def test_a_corrupted_byte_is_caught_on_read(tmp_path):
    store = NvmeStore([tmp_path], 8 * MIB)
    pool = BufferPool({MIB: 2})
    extent = store.allocate("w", MIB)
    store.write(extent, filled(pool, MIB, seed=1).slot).wait()
    file, offset, _ = extent.stripes[0]
    with open(store.paths[file], "r+b") as f:  # another writer damages the file behind the store's back
        f.seek(offset + 12345)
        byte = f.read(1)
        f.seek(offset + 12345)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreCorruption, match="do not match what was written"):
        store.read(extent, pool.acquire(MIB).slot).wait()
    store.close()


def test_freed_extents_are_reused_and_the_store_knows_when_it_is_full(tmp_path):
    store = NvmeStore([tmp_path], 4 * MIB, block_bytes=MIB)
    a = store.allocate("a", 2 * MIB)
    store.allocate("b", 2 * MIB)
    with pytest.raises(StoreError, match="the NVMe store is full"):
        store.allocate("c", MIB)
    store.free(a)
    assert store.allocate("c", 2 * MIB).stripes == a.stripes
    store.close()


def test_missing_directory(tmp_path):
    with pytest.raises(StoreError, match="does not exist; create it"):
        NvmeStore([tmp_path / "nope"], MIB)


@pytest.mark.skipif(os.access("/proc/sys", os.W_OK), reason="no read-only directory on this machine")
def test_read_only_directory():
    with pytest.raises(StoreError, match="is not writable"):
        NvmeStore(["/proc/sys"], MIB)


def test_a_full_disk_is_found_at_start_not_mid_step(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(StoreError, match=r"needs .* GiB .* but only .* GiB is free"):
        NvmeStore([tmp_path], free + 2**40)
    assert not list(tmp_path.glob("tiertune-store-*.bin"))  # nothing left behind


def test_two_jobs_cannot_share_a_store_directory(tmp_path):
    first = NvmeStore([tmp_path], MIB)
    with pytest.raises(StoreError, match="in use by another job"):
        NvmeStore([tmp_path], MIB)
    first.close()
    NvmeStore([tmp_path], MIB).close()  # free again once the first job is done


def test_buffers_must_be_aligned_pool_slots(tmp_path):
    store = NvmeStore([tmp_path], 4 * MIB)
    extent = store.allocate("w", 4096)
    with pytest.raises(ValueError, match="4 KiB-aligned"):
        store.write(extent, torch.zeros(8192, dtype=torch.uint8)[1:4097])
    with pytest.raises(ValueError, match="never written"):
        store.read(extent, BufferPool({4096: 1}).acquire(4096).slot)
    store.close()


def test_a_failed_transfer_waits_for_every_piece_and_keeps_failing(tmp_path):
    store = NvmeStore([tmp_path], 16 * MIB, queue_depth=4, block_bytes=64 * 1024)
    pool = BufferPool({8 * MIB: 2})
    extent = store.allocate("w", 8 * MIB)
    store.write(extent, filled(pool, 8 * MIB, seed=3).slot).wait()
    extent.checksums[5] ^= 1  # as if piece 5 had been written with other bytes
    pending = store.read(extent, pool.acquire(8 * MIB).slot)
    with pytest.raises(StoreCorruption):
        pending.wait()
    assert pending.transferred()  # no piece is still writing into the buffer
    with pytest.raises(StoreCorruption):  # and asking again does not pretend all is well
        pending.wait()
    store.close()


def test_a_double_free_is_refused(tmp_path):
    store = NvmeStore([tmp_path], 4 * MIB)
    extent = store.allocate("a", MIB)
    store.free(extent)
    with pytest.raises(ValueError, match="freed twice"):
        store.free(extent)
    store.close()


def test_leftovers_of_a_killed_job_are_removed_and_bad_arguments_refused(tmp_path):
    leftover = tmp_path / "tiertune-store-7.bin"
    leftover.write_bytes(b"x" * 4096)
    store = NvmeStore([tmp_path], MIB)
    assert not leftover.exists()
    store.close()
    with pytest.raises(StoreError, match="more than once"):
        NvmeStore([tmp_path, tmp_path], MIB)
    with pytest.raises(ValueError, match="multiple of 4096"):
        NvmeStore([tmp_path], MIB, block_bytes=1000)
    with pytest.raises(ValueError, match="capacity above 0"):
        NvmeStore([tmp_path], 0)


def _deepspeed_store(tmp_path, capacity):
    try:
        return NvmeStore([tmp_path], capacity, block_bytes=MIB, backend="deepspeed")
    except StoreError as e:
        pytest.skip(f"DeepSpeed's async_io op is not available here: {e}")


def test_the_deepspeed_backend_moves_and_checks_the_same_bytes(tmp_path):
    store = _deepspeed_store(tmp_path, 64 * MIB)
    try:
        pool = BufferPool({40 * MIB: 2})
        src, dst = pool.acquire(40 * MIB - 100), pool.acquire(40 * MIB - 100)
        src.slot.copy_(torch.randint(0, 255, (src.slot.numel(),), dtype=torch.uint8))
        extent = store.allocate("x", 40 * MIB - 100)
        store.write(extent, src.slot).wait()
        store.read(extent, dst.slot).wait()
        assert torch.equal(src.tensor, dst.tensor)
        with open(store.paths[0], "r+b") as fh:  # a flipped byte is caught by the checksums, as with threads
            fh.seek(extent.stripes[0][1] + 5 * MIB)
            byte = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(StoreCorruption):
            store.read(extent, dst.slot).wait()
        pool.release(src)
        pool.release(dst)
    finally:
        store.close()


def test_asking_for_the_deepspeed_backend_without_it_says_what_to_do(tmp_path, monkeypatch):
    import tiertune.offload.io as io

    def missing():
        raise io.IOBackendUnavailable(
            "offload.io_backend=deepspeed: libaio's headers are missing: install libaio-dev"
        )

    monkeypatch.setattr(io, "load_deepspeed_aio", missing)
    with pytest.raises(StoreError, match="install libaio-dev"):
        NvmeStore([tmp_path], MIB, backend="deepspeed")
    assert not list(tmp_path.iterdir())  # nothing created, nothing locked


def test_a_dead_extension_build_lock_is_cleared_and_the_build_stays_in_the_environment(tmp_path, monkeypatch):
    """torch waits without end on a build lock; one left by a killed build must not hang every later run."""
    import time

    from tiertune.offload import io as offload_io

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    dead, live = tmp_path / "py311_cpu" / "async_io" / "lock", tmp_path / "py311_cpu" / "other" / "lock"
    for lock in (dead, live):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - offload_io.STALE_BUILD_S - 60
    os.utime(dead, (old, old))
    with pytest.warns(UserWarning, match="never finished"):
        offload_io._private_build_dir()
    assert not dead.exists() and live.exists()  # a build in progress keeps its lock
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    offload_io._private_build_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"].startswith(sys.prefix)
