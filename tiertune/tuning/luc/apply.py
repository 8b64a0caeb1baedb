"""Applying a LUC policy: the decoder layers' linears become :class:`CompressedLinear` modules, and the
weights' source learns to produce their compressed tensors from the original weights.

On a meta-device model (the job's usual case) only shapes change here; the offload engine later makes
each block from its source by parameter name, and :class:`CompressedSource` answers for the compressed
names (``<linear>.packed``, ``<linear>.meta``) by reading the linear's original weight and compressing it,
so the base is compressed block by block, never held whole. Under peft the wrapped linear is the LoRA
layer's ``base_layer``: the adapters stay as they are, beside a compressed base.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tiertune.tuning.luc.compress import CompressedLinear, Setting, compress, layout
from tiertune.tuning.luc.solver import Policy

Fill = Callable[[str, torch.Tensor], None]


def _layer_modules(model: nn.Module, policy: Policy) -> dict[str, nn.Module]:
    """The policy's layers in ``model`` (which may be wrapped by peft: its paths gain a prefix)."""
    found = {}
    for name, module in model.named_modules():
        for layer in policy.layers:
            if name == layer or name.endswith("." + layer):
                found[layer] = module
    missing = sorted(set(policy.layers) - set(found))
    if missing:
        raise ValueError(f"the LUC policy names layers this model does not have: {missing[:3]}")
    return found


def compress_layers(model: nn.Module, policy: Policy, dtype: torch.dtype) -> nn.Module:
    """Replace every frozen linear of each policy layer compressed below 16 bits by a
    :class:`CompressedLinear` whose scales (and bias) are in ``dtype``, in place; returns ``model``."""
    for layer_name, layer in _layer_modules(model, policy).items():
        setting = policy.layers[layer_name]
        if setting.bits == 16:
            continue
        for name, module in list(layer.named_modules()):
            if not isinstance(module, nn.Linear) or "lora_" in name or module.weight.requires_grad:
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = layer.get_submodule(owner_name) if owner_name else layer
            setattr(owner, attr, CompressedLinear.from_linear(module, setting, policy.group_size, dtype))
    return model


class CompressedSource:
    """A weight source that also makes the compressed tensors of ``model``'s :class:`CompressedLinear`
    modules: asked for ``L.packed`` or ``L.meta`` it reads ``L.weight`` from ``source`` and compresses
    it (once: the other tensor waits in a small cache until it is asked for)."""

    def __init__(self, model: nn.Module, source: Fill, base_name: Callable[[str], str]) -> None:
        """``base_name`` maps a parameter's name in ``model`` to the name ``source`` knows it by (the
        names the engine asks for)."""
        self.source = source
        self.linears = {
            base_name(f"{name}.packed").removesuffix(".packed"): module
            for name, module in model.named_modules()
            if isinstance(module, CompressedLinear)
        }
        self._ready: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        owner, _, attr = name.rpartition(".")
        linear = self.linears.get(owner)
        if linear is None or attr not in ("packed", "meta"):
            self.source(name, tensor)
            return
        if owner not in self._ready:
            weight = torch.empty(linear.out_features, linear.in_features, dtype=torch.float32)
            self.source(f"{owner}.weight", weight)
            packed, meta = compress(weight, linear.setting, linear.group_size, linear.meta.dtype)
            self._ready[owner] = {"packed": packed, "meta": meta}
        parts = self._ready[owner]
        tensor.copy_(parts.pop(attr))
        if not parts:
            del self._ready[owner]


def has_compressed(model: nn.Module) -> bool:
    return any(isinstance(m, CompressedLinear) for m in model.modules())


def stored_bytes(
    shapes: dict[str, tuple[int, int]], setting: Setting, group_size: int, meta_bytes: int
) -> int:
    """Bytes a layer's linears (relative name -> (out, in)) take stored under ``setting``."""
    if setting.bits == 16:
        return sum(o * i * 2 for o, i in shapes.values())
    return sum(layout(o, i, setting, group_size).nbytes(meta_bytes) for o, i in shapes.values())
