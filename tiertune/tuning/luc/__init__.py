"""Layer-wise unified compression (LUC): each decoder layer of the frozen base gets a bit width and a
pruning ratio from its measured sensitivity (:mod:`.sensitivity`), chosen to meet a global budget
(:mod:`.solver`), and is kept compressed (:mod:`.compress`) so that the offload engine stores and moves
compressed bytes; LoRA adapters train beside it (``tuning.method=luc_lora``)."""

from tiertune.tuning.luc.apply import CompressedSource, compress_layers, has_compressed, stored_bytes
from tiertune.tuning.luc.compress import CompressedLinear, Layout, Setting, compress, decompress, layout
from tiertune.tuning.luc.sensitivity import Profile, linears, profile
from tiertune.tuning.luc.solver import InfeasibleBudget, Policy, solve

__all__ = [
    "CompressedLinear",
    "CompressedSource",
    "InfeasibleBudget",
    "Layout",
    "Policy",
    "Profile",
    "Setting",
    "compress",
    "compress_layers",
    "decompress",
    "has_compressed",
    "layout",
    "linears",
    "profile",
    "solve",
    "stored_bytes",
]
