import threading

import pytest
from conftest import fast_config

from tiertune.errors import ConfigError
from tiertune.launch.loop import run
from tiertune.memory import Kind, Ledger, Tier


def test_current_and_peak_per_tier_and_kind():
    ledger = Ledger()
    ledger.set(Tier.DEVICE, Kind.PARAMS, 100)
    ledger.add(Tier.DEVICE, Kind.GRADS, 100)
    ledger.add(Tier.NVME, Kind.OPTIMIZER, 800)
    ledger.set(Tier.DEVICE, Kind.GRADS, 0)
    ledger.add(Tier.DEVICE, Kind.ACTIVATIONS, 50)
    assert ledger.bytes(Tier.DEVICE) == 150 and ledger.bytes(Tier.DEVICE, Kind.GRADS) == 0
    assert ledger.peak(Tier.DEVICE) == 200  # params + grads, before the grads left
    assert ledger.snapshot() == {
        "bytes": {"device": {"params": 100, "grads": 0, "activations": 50}, "nvme": {"optimizer": 800}},
        "peak_bytes": {"device": 200, "nvme": 800},
        "waste_bytes": {},
    }
    with pytest.raises(ValueError, match="double release"):
        ledger.add(Tier.NVME, Kind.OPTIMIZER, -801)


def test_concurrent_reports_add_up():
    ledger = Ledger()

    def worker():
        for _ in range(10_000):
            ledger.add(Tier.PINNED, Kind.STAGING, 1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.bytes(Tier.PINNED, Kind.STAGING) == 40_000


def test_every_metrics_row_and_the_summary_carry_the_ledger(tmp_path):
    summary = run(fast_config(tmp_path, "train.max_steps=2"))
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    weights = summary.total_params * 4
    for row in rows:
        assert row["tier_bytes"]["device"]["params"] == weights
        assert row["tier_peak_bytes"]["device"] >= 2 * weights  # weights + grads at least
    assert summary.memory["bytes"]["device"]["optimizer"] >= 2 * weights  # two fp32 moments
    assert summary.memory["peak_bytes"]["device"] >= 4 * weights
    assert summary.memory["budget_bytes"]["device"] > 0


def test_a_device_budget_too_small_for_the_job_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"device_budget_gib is short by [0-9.]+ MiB .*activations"):
        run(fast_config(tmp_path, "memory.device_budget_gib=0.01"))
    assert not (tmp_path / "metrics.jsonl").exists()
    summary = run(
        fast_config(
            tmp_path / "lora", "memory.device_budget_gib=0.05", "tuning.method=lora", "train.max_steps=2"
        )
    )
    assert summary.steps == 2


def test_forced_placements_are_followed_and_gradients_stay_in_memory(tmp_path):
    summary = run(fast_config(tmp_path, "offload.optimizer=nvme", "train.max_steps=2"))
    assert summary.memory["bytes"]["nvme"]["optimizer"] >= 2 * 4 * summary.trainable_params
    assert "optimizer" not in summary.memory["bytes"]["device"]
    with pytest.raises(ConfigError, match="offload.grads=nvme: gradients are summed every micro-batch"):
        run(fast_config(tmp_path / "grads", "offload.grads=nvme"))
