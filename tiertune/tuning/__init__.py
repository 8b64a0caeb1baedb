"""The tuning layer: which weights train, and how the trained result is exported."""

from tiertune.tuning import depth as _depth  # noqa: F401  (registers "depth")
from tiertune.tuning import lora as _lora  # noqa: F401  (registers "lora" and "luc_lora")
from tiertune.tuning import s2a as _s2a  # noqa: F401  (registers "s2a")
from tiertune.tuning.registry import METHODS, TuningMethod, get_method, register

__all__ = ["METHODS", "TuningMethod", "get_method", "register"]
