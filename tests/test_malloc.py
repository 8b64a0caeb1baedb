"""The allocator gives freed mid-sized tensors back (tiertune.memory.malloc), each case in a process of
its own: the setting is process-wide."""

import json
import os
import subprocess
import sys

import pytest

from tiertune.memory.malloc import _libc

SCRIPT = """
import json, sys, psutil, torch
from tiertune.memory.malloc import set_mmap_threshold
took = set_mmap_threshold(1.0) if sys.argv[1] == "set" else None
rss = lambda: psutil.Process().memory_info().rss
big = torch.ones(5 << 20)  # 20 MiB, mapped, then freed: glibc raises its threshold above what follows
del big
before = rss()
held = [torch.ones(1 << 20) for _ in range(50)]  # 50 x 4 MiB, as a step's activations and gradients
last = held.pop()  # still alive, at the heap's top: the heap cannot shrink from there
del held
print(json.dumps({"took": took, "kept_mib": (rss() - before) / 2**20}))
"""

needs_glibc = pytest.mark.skipif(_libc() is None, reason="needs glibc's mallopt")


def _kept(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=environ, check=True
    )
    return json.loads(done.stdout)


@needs_glibc
def test_freed_tensors_of_a_few_mib_go_back_to_the_system():
    kept = _kept("leave")
    assert kept["kept_mib"] > 150  # glibc's own policy keeps the 49 freed blocks in its heap
    set_ = _kept("set")
    assert set_["took"] is True and set_["kept_mib"] < 20  # each had its own mapping, unmapped when freed


@needs_glibc
def test_the_environments_setting_wins():
    assert _kept("set", MALLOC_MMAP_THRESHOLD_="33554432")["took"] is False


def test_auto_gives_mid_sized_blocks_their_own_mappings_only_when_host_memory_is_short():
    from tiertune.memory.malloc import AUTO_MIB, auto_mmap_threshold_mib

    gib = 2**30
    assert auto_mmap_threshold_mib(True, 18 * gib, 20 * gib) == AUTO_MIB  # llama-3b's plan: 88% full
    assert auto_mmap_threshold_mib(True, 10 * gib, 20 * gib) == AUTO_MIB  # half: short
    assert auto_mmap_threshold_mib(True, 6 * gib, 20 * gib) == 0  # on NVMe by choice, room to spare
    assert auto_mmap_threshold_mib(False, 19 * gib, 20 * gib) == 0  # nothing on NVMe
    assert auto_mmap_threshold_mib(True, 1, 0) == 0  # no host budget to measure against


@pytest.mark.parametrize("short", [False, True])
def test_the_engine_sets_the_threshold_as_its_plan_says(tmp_path, monkeypatch, short):
    import torch
    from conftest import fast_config

    import tiertune.launch.engine as engine_mod
    from tiertune.launch.models import WEIGHT_DTYPES, cast_parameters, skeleton
    from tiertune.memory import Tier

    calls = []
    monkeypatch.setattr(engine_mod, "set_mmap_threshold", calls.append)

    def build(*overrides):
        cfg = fast_config(tmp_path, "offload.params=nvme", "offload.optimizer=nvme", *overrides)
        model = cast_parameters(skeleton(cfg.model), WEIGHT_DTYPES[cfg.train.dtype])
        engine = engine_mod.build_engine(cfg, model, torch.device("cpu"), store_dir=tmp_path / "store")
        engine.close()
        return engine.plan

    plan = build()  # the machine's budget: the tiny job leaves nearly all of it free
    assert not calls
    if short:  # a budget the same plan fills to 80%
        peak = plan.peak_bytes[Tier.DEVICE]
        build(f"memory.host_budget_gib={peak / 0.8 / 2**30:.6f}")
        assert calls == [1.0]
