"""The optimizer step as the training loop sees it: clip, check, update, report.

:class:`TorchAdamWUpdater` holds every trainable parameter and its state where the model lives and
uses ``torch.optim.AdamW`` (fused where the device supports it). The tiered updaters that keep state
on host or NVMe and overlap the update with backward implement the same small interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tiertune.config import OptimConfig
from tiertune.errors import CheckpointError

OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class StepReport:
    grad_norm: float  # global L2 norm of the gradients before clipping
    skipped: bool  # True when the norm was not finite: no parameter or state changed
    # The block optimizer's updates made during backward in this step: kept, and undone (None: the
    # updater does not update during backward)
    in_backward: int | None = None
    undone: int | None = None


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm scales (1-D) are not decayed."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class TorchAdamWUpdater:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> None:
        if not named_params:
            raise ValueError("no trainable parameters: the tuning method left nothing to train")
        self.cfg = cfg
        self.params = [p for _, p in named_params]
        device = self.params[0].device
        # fused AdamW is one kernel per dtype group; torch has it on CPU and CUDA for float params.
        fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in self.params)
        groups = param_groups(named_params, cfg.weight_decay)
        self._group_decay = [g["weight_decay"] for g in groups]
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            fused=fused,
        )

    def step(self, lr: float) -> StepReport:
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        # With max_norm=inf the grads are multiplied by exactly 1.0: the norm is still reported.
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(norm):
            # A non-finite gradient would poison the moments for good: skip the update, keep the state.
            self.zero_grad()
            return StepReport(grad_norm=norm, skipped=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.zero_grad()
        return StepReport(grad_norm=norm, skipped=False)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        """Bytes of optimizer state (moments, step counts) held now."""
        return sum(t.nbytes for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))

    def save(self, directory: Path) -> None:
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        try:
            self.optimizer.load_state_dict(state)
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"the optimizer state in {directory} does not fit this job's "
                f"parameters ({e}); was it written by a different job?"
            ) from None
        # load_state_dict also restores the saved hyperparameters; the job's config says what they are now.
        for group, decay in zip(self.optimizer.param_groups, self._group_decay):
            group.update(weight_decay=decay, betas=tuple(self.cfg.betas), eps=self.cfg.eps)
