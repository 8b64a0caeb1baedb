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
