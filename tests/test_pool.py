import threading
import time

import pytest
import torch

from tiertune.memory.ledger import Ledger
from tiertune.memory.pool import ALIGN, BufferPool, PoolExhausted, align_up, classes_for
from tiertune.memory.tiers import Kind, Tier

MIB = 2**20


def test_reserves_exactly_the_classes_rounded_to_4k_not_to_a_power_of_two():
    pool = BufferPool({20 * MIB + 1: 2, 3 * MIB: 1})
    assert pool.reserved_bytes == 2 * (20 * MIB + ALIGN) + 3 * MIB
    assert pool.waste_bytes == pool.reserved_bytes - (2 * (20 * MIB + 1) + 3 * MIB)
    assert pool.waste_bytes < 3 * ALIGN


def test_buffers_are_aligned_exact_in_size_and_reused():
    pool = BufferPool({1000: 2, 5000: 1})
    a = pool.acquire(900)
    assert a.tensor.numel() == 900 and a.size_class == 1000 and a.tensor.data_ptr() % ALIGN == 0
    b = pool.acquire(1000)
    c = pool.acquire(1001)  # the 1000 class is empty and too small anyway: the 5000 class
    assert c.size_class == 5000 and b.tensor.data_ptr() % ALIGN == 0
    seen = {a.tensor.data_ptr(), b.tensor.data_ptr()}
    pool.release(a)
    pool.release(b)
    for _ in range(10):  # reused every step: the same two slots come back, nothing new is allocated
        x, y = pool.acquire(10), pool.acquire(10)
        assert {x.tensor.data_ptr(), y.tensor.data_ptr()} == seen
        pool.release(x)
        pool.release(y)
    with pytest.raises(ValueError, match="no size class holds 6000 bytes"):
        pool.acquire(6000)


def test_views_share_the_slot_memory():
    pool = BufferPool({4 * 6 * 2: 1})
    buf = pool.acquire(48)
    v = buf.view(torch.float32, (6, 2))
    v.fill_(1.5)
    assert buf.tensor.view(torch.float32).sum().item() == 18.0


def test_an_empty_pool_waits_for_a_release_then_gives_up():
    pool = BufferPool({64: 1})
    held = pool.acquire(64)
    with pytest.raises(PoolExhausted, match="all 1 are in use"):
        pool.acquire(64, timeout_s=0.05)
    threading.Timer(0.1, pool.release, args=(held,)).start()
    t0 = time.monotonic()
    again = pool.acquire(64, timeout_s=5)
    assert again.slot.data_ptr() == held.slot.data_ptr() and time.monotonic() - t0 >= 0.05


def test_the_ledger_sees_staging_in_use_and_the_waste():
    ledger = Ledger()
    pool = BufferPool({3000: 2}, ledger=ledger)
    a = pool.acquire(100)
    b = pool.acquire(3000)
    assert ledger.bytes(Tier.HOST, Kind.STAGING) == 6000
    pool.release(a)
    pool.release(b)
    snap = ledger.snapshot()
    assert snap["bytes"] == {"host": {"staging": 0}}
    assert snap["peak_bytes"] == {"host": 6000}
    assert snap["waste_bytes"] == {"host": 2 * align_up(3000) - 6000}


def test_classes_follow_block_sizes():
    assert classes_for([300, 100, 300, 200], 3) == {100: 3, 200: 3, 300: 3}


def test_pinned_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        BufferPool({64: 1}, pinned=True)


@pytest.mark.cuda
def test_pinned_pool_copies_asynchronously_and_exactly():
    pool = BufferPool({4 * MIB: 2}, pinned=True)
    buf = pool.acquire(4 * MIB)
    assert buf.tensor.is_pinned()
    host = buf.view(torch.float32, (MIB,))
    host.copy_(torch.arange(MIB, dtype=torch.float32))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dev = host.to("cuda", non_blocking=True)
        back = buf.view(torch.float32, (MIB,))
    stream.synchronize()  # the copy read the pinned slot asynchronously: wait before touching it again
    back.zero_()
    back.copy_(dev, non_blocking=False)
    assert torch.equal(back, torch.arange(MIB, dtype=torch.float32))
    pool.release(buf)
    pool.close()


def test_a_double_release_is_refused_and_close_waits_for_every_buffer():
    pool = BufferPool({64: 2})
    buf = pool.acquire(64)
    with pytest.raises(RuntimeError, match="still handed out"):
        pool.close()
    pool.release(buf)
    with pytest.raises(ValueError, match="released twice"):
        pool.release(buf)
    pool.close()


def test_two_pools_on_one_tier_add_up_in_the_ledger():
    ledger = Ledger()
    a, b = BufferPool({4096: 1}, ledger=ledger), BufferPool({8192: 1}, ledger=ledger)
    x, y = a.acquire(10), b.acquire(10)
    assert ledger.bytes(Tier.HOST, Kind.STAGING) == 4096 + 8192
    a.release(x)
    b.release(y)
    assert ledger.snapshot()["waste_bytes"] == {} and ledger.bytes(Tier.HOST, Kind.STAGING) == 0
