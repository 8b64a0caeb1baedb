"""tiertune's loop against a plain PyTorch loop: the same seeded model and data give the same training."""

import json

import pytest
import torch
from conftest import fast_config
from reference import reference_run
from safetensors.torch import load_file

from tiertune.launch.loop import run

# fused (tiertune) vs. for-loop (reference) AdamW, and a different summation order for the loss: equal
# to float32 rounding, which after 10 steps stays many orders of magnitude below one update (lr 2e-3).
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


@pytest.mark.parametrize("accum", [1, 3])
def test_tiertune_trains_exactly_like_plain_pytorch(tmp_path, accum):
    overrides = [
        "train.max_steps=10",
        "train.checkpoint_every=10",
        "optim.lr=2e-3",
        "optim.weight_decay=0.1",
        "optim.max_grad_norm=0.5",
        f"train.grad_accum_steps={accum}",
    ]
    cfg = fast_config(tmp_path, *overrides)
    run(cfg)
    ref_losses, ref_weights = reference_run(fast_config(tmp_path / "unused", *overrides))

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert any(r["grad_norm"] > 0.5 for r in rows)  # clipping was really active
    ours = load_file(str(tmp_path / "checkpoints" / "step-00000010" / "trainable.safetensors"))
    assert ours.keys() == ref_weights.keys()
    for name, weight in ref_weights.items():
        torch.testing.assert_close(ours[name], weight, rtol=0, atol=WEIGHT_ATOL, msg=name)
