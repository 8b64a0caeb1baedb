"""The typed job config: schema (dataclasses) and loading from YAML/TOML plus ``key=value`` overrides."""

from tiertune.config.loader import config_to_dict, dump_config, iter_keys, load_config
from tiertune.config.schema import (
    DataConfig,
    JobConfig,
    LoraConfig,
    MemoryConfig,
    ModelConfig,
    OffloadConfig,
    OptimConfig,
    TrainConfig,
    TuningConfig,
)

__all__ = [
    "DataConfig",
    "JobConfig",
    "LoraConfig",
    "MemoryConfig",
    "ModelConfig",
    "OffloadConfig",
    "OptimConfig",
    "TrainConfig",
    "TuningConfig",
    "config_to_dict",
    "dump_config",
    "iter_keys",
    "load_config",
]
