"""The optimizer tier: learning-rate schedules and the updaters that apply a step."""

from tiertune.optim.schedule import lr_at
from tiertune.optim.updater import StepReport, TorchAdamWUpdater, param_groups

__all__ = ["StepReport", "TorchAdamWUpdater", "lr_at", "param_groups"]
