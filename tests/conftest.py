"""Shared fixtures: tiny, fast job configs and a way to run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiertune.config import JobConfig, load_config

REPO = Path(__file__).resolve().parent.parent

# A job small enough for a test: tiny-llama, short sequences, no progress output, no answer checks.
FAST = [
    "data.seq_len=64",
    "train.micro_batch_size=4",
    "train.max_steps=8",
    "train.progress=off",
    "train.eval_exact_match_samples=0",
    "train.eval_max_batches=2",
    "optim.warmup_steps=2",
    "train.checkpoint_every=0",
]


@pytest.fixture(autouse=True)
def _no_machine_profile(monkeypatch, tmp_path_factory):
    """Tests plan and choose kernels without the machine profile a `tiertune probe` here may have written:
    their numbers must not depend on it."""
    from tiertune.launch import plan

    monkeypatch.setattr(plan, "DEFAULT_PROFILE", tmp_path_factory.getbasetemp() / "no-machine-profile.json")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def fast_config(out: Path, *overrides: str) -> JobConfig:
    return load_config(None, [*FAST, f"output_dir={out}", *overrides])


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "tiertune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
