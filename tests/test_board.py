"""Metrics as TensorBoard scalars (tiertune.launch.board)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import fast_config

from tiertune.errors import ConfigError
from tiertune.launch import board
from tiertune.launch.loop import run

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(out):
    events = EventAccumulator(str(out / board.BOARD_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_each_metrics_row_is_written_as_scalars_and_a_resume_purges_what_followed_its_checkpoint(tmp_path):
    run(fast_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.tensorboard=on"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(tmp_path)
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in rows])
    assert [s for s, _ in scalars["eval_loss"]] == [4]
    assert scalars["tier_bytes/device/params"][0][1] == rows[0]["tier_bytes"]["device"]["params"]
    # as if killed after step 4 with the checkpoint of step 2: the rerun redoes steps 3 and 4
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "final")
    (tmp_path / "summary.json").unlink()
    run(fast_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.tensorboard=on"))
    assert [s for s, _ in _scalars(tmp_path)["loss"]] == [1, 2, 3, 4]  # each step once


def test_on_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(board, "board_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        board.Board("on", tmp_path, 0)
    assert board.Board("auto", tmp_path, 0).path is None  # auto: nothing, quietly
    assert not (tmp_path / board.BOARD_DIR).exists()


def test_scalars_are_the_rows_finite_numbers_by_nested_key():
    row = {
        "step": 3,
        "loss": 1.5,
        "skipped": True,
        "grad_norm": float("nan"),
        "nvme_bytes": {"read": {"optimizer": 8}},
    }
    assert dict(board.scalars(row)) == {"loss": 1.5, "skipped": 1.0, "nvme_bytes/read/optimizer": 8.0}
