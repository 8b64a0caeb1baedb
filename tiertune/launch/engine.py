"""The training engine: what the loop calls to run a micro-batch, apply a step and save state.

The loop never touches the model or the optimizer directly; it goes through :class:`TrainEngine`.
Where the weights live (resident on one device now, streamed from memory tiers by the offload
engine) and how the update runs (torch AdamW now, the tiered optimizer later) are the engine's
parts, chosen in :func:`build_engine`, so new placements and updaters plug in without touching the loop.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tiertune.config import JobConfig
from tiertune.errors import CheckpointError, ConfigError
from tiertune.launch.data import IGNORE_INDEX
from tiertune.memory import Budgets, Kind, Ledger, Tier
from tiertune.optim import StepReport, TorchAdamWUpdater

TRAINABLE_FILE = "trainable.safetensors"


class Updater(Protocol):
    def step(self, lr: float) -> StepReport: ...
    def zero_grad(self) -> None: ...
    def state_bytes(self) -> int: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the tokens whose label is not IGNORE_INDEX.

    A sum, not a mean: the loop divides by the target tokens of the whole optimizer step, so the
    gradient is the same however the step is split into micro-batches.
    """
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


class TrainEngine:
    def __init__(
        self,
        model: nn.Module,
        updater: Updater,
        device: torch.device,
        dtype: str,
        ledger: Ledger | None = None,
    ) -> None:
        self.model, self.updater, self.device = model, updater, device
        self.autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
        self.ledger = ledger or Ledger()
        self._account()

    def _account(self) -> None:
        """Report what this engine holds: everything is resident on the device tier."""
        params = list(self.model.parameters())
        self.ledger.set(Tier.DEVICE, Kind.PARAMS, sum(p.nbytes for p in params))
        self.ledger.set(Tier.DEVICE, Kind.GRADS, sum(p.grad.nbytes for p in params if p.grad is not None))
        self.ledger.set(Tier.DEVICE, Kind.OPTIMIZER, self.updater.state_bytes())

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.model(input_ids=input_ids).logits
        return causal_lm_loss_sum(logits, labels)

    def forward_backward(self, batch: dict[str, torch.Tensor], step_targets: int) -> float:
        """Accumulate the gradient of this micro-batch's share of the step loss; return its loss sum."""
        self.model.train()
        loss_sum = self._loss_sum(batch)
        (loss_sum / step_targets).backward()
        self._account()
        return float(loss_sum.detach())

    def step(self, lr: float) -> StepReport:
        report = self.updater.step(lr)
        self._account()
        return report

    @torch.no_grad()
    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> float:
        self.model.eval()
        return float(self._loss_sum(batch))

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self, directory: Path) -> None:
        """Write the trainable weights and the optimizer state into ``directory``."""
        tensors = {n: p.detach().to("cpu").contiguous() for n, p in self.trainable().items()}
        save_file(tensors, str(directory / TRAINABLE_FILE))
        self.updater.save(directory)

    def load(self, directory: Path) -> None:
        tensors = load_file(str(directory / TRAINABLE_FILE))
        params = self.trainable()
        if set(tensors) != set(params):
            missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
            raise CheckpointError(
                f"checkpoint {directory} does not hold this job's trainable weights "
                f"(missing {missing[:3]}, unexpected {extra[:3]}); was it written by a different job?"
            )
        with torch.no_grad():
            for name, p in params.items():
                if tensors[name].shape != p.shape:
                    raise CheckpointError(
                        f"checkpoint {directory}: {name} has shape "
                        f"{tuple(tensors[name].shape)}, the model {tuple(p.shape)}"
                    )
                p.copy_(tensors[name])
        self.updater.load(directory)


def resident_bytes(model: nn.Module) -> int:
    """What training ``model`` resident needs, before activations: its weights, plus a gradient and two
    fp32 AdamW moments per trainable parameter."""
    weights = sum(p.nbytes for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    return weights + sum(p.nbytes for p in trainable) + sum(2 * 4 * p.numel() for p in trainable)


def build_engine(
    cfg: JobConfig,
    model: nn.Module,
    device: torch.device,
    budgets: Budgets | None = None,
    ledger: Ledger | None = None,
) -> TrainEngine:
    """Place the model and pick its updater: everything resident on ``device``, torch AdamW."""
    pinned = {k: getattr(cfg.offload, k) for k in ("params", "grads", "optimizer")}
    away = [f"offload.{k}={v}" for k, v in pinned.items() if v not in ("auto", "device")]
    if away:
        raise ConfigError(
            [
                f"{', '.join(away)}: training with state outside the device tier is not available "
                "in this release (`tiertune plan` shows the placement it would use); set auto or device"
            ]
        )
    needed = resident_bytes(model)
    if budgets is not None and needed > budgets.device:
        raise ConfigError(
            [
                f"memory.device_budget_gib: training this model resident needs {needed / 2**30:.2f} GiB "
                f"(weights, gradients, AdamW moments) but the device budget is {budgets.device / 2**30:.2f} GiB; "
                "raise the budget, or train fewer weights (tuning.method=lora)"
            ]
        )
    model.to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return TrainEngine(model, TorchAdamWUpdater(named, cfg.optim), device, cfg.train.dtype, ledger)
