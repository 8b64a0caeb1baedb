"""The optimizer step as the training loop sees it: clip, check, update, report.

:class:`TorchAdamWUpdater` holds every trainable parameter and its state where the model lives and
uses ``torch.optim.AdamW`` (fused where the device supports it). Parameters in a 16-bit dtype get fp32
masters: the optimizer updates the masters, each micro-batch's gradient is added into an fp32 gradient
of its master as soon as autograd completes it, and the weights are the masters rounded after each step.
The tiered updaters that keep state on host or NVMe and overlap the update with backward implement the
same small interface.
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


def _accumulate_into(master: nn.Parameter):
    """A post-accumulate hook moving a 16-bit parameter's gradient into its fp32 master's, summed in fp32."""

    def hook(p: nn.Parameter) -> None:
        if master.grad is None:
            master.grad = torch.zeros_like(master)
        master.grad.add_(p.grad.to(torch.float32))
        p.grad = None

    return hook


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
        self.weights = [p for _, p in named_params]
        self._hooks = []
        if all(p.dtype == torch.float32 for p in self.weights):
            self.masters: list[nn.Parameter] | None = None
            self.params = self.weights
        else:
            self.masters = [nn.Parameter(p.detach().float()) for p in self.weights]
            self.params = self.masters
            for p, master in zip(self.weights, self.masters):
                self._hooks.append(p.register_post_accumulate_grad_hook(_accumulate_into(master)))
        named = [(n, p) for (n, _), p in zip(named_params, self.params)]
        device = self.params[0].device
        # fused AdamW is one kernel per dtype group; torch has it on CPU and CUDA for float params.
        fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in self.params)
        groups = param_groups(named, cfg.weight_decay)
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
        self._round()
        return StepReport(grad_norm=norm, skipped=False)

    def _round(self) -> None:
        """The weights from their masters (round to nearest even)."""
        if self.masters is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.weights, self.masters)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.weights:
            p.grad = None

    def state_bytes(self) -> int:
        """Bytes of optimizer state (moments, step counts, fp32 masters) held now."""
        masters = sum(m.nbytes for m in self.masters) if self.masters is not None else 0
        return masters + sum(
            t.nbytes for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)
        )

    def trainable(self) -> list[torch.Tensor]:
        """The weights the optimizer updates, in the order it was given them (the masters, if any)."""
        return self.params

    def weights_loaded(self) -> None:
        """:meth:`trainable` was just overwritten (a checkpoint): bring the weights in line."""
        self._round()

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
