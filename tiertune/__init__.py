"""tiertune: memory-tiered LLM training and fine-tuning."""

from tiertune.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    RunDirError,
    TiertuneError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ModelError",
    "RunDirError",
    "TiertuneError",
    "__version__",
]
