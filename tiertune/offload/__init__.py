"""Offload: how a model is cut into blocks (the NVMe store, the planner and the streaming engine build on it)."""

from tiertune.offload.blocks import Block, find_blocks

__all__ = ["Block", "find_blocks"]
