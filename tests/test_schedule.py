import pytest

from tiertune.config import OptimConfig
from tiertune.optim import lr_at


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_then_decay_to_the_floor(schedule):
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    assert lr_at(1, cfg, 100) == pytest.approx(0.1)
    assert lr_at(10, cfg, 100) == pytest.approx(1.0)
    assert lr_at(100, cfg, 100) == pytest.approx(1.0 if schedule == "constant" else 0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_midpoint_and_no_warmup():
    cfg = OptimConfig(lr=2.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0)
    assert lr_at(50, cfg, 100) == pytest.approx(1.0)
    assert lr_at(1, cfg, 100) > 1.99
