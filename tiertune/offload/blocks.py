"""Blocks: the units in which a model's weights move between memory tiers.

A causal LM is cut into an ``embed`` block (token and position embeddings: everything registered before
the decoder layers), one ``layer`` block per decoder layer, and a ``head`` block (final norm and LM head:
everything registered after). This works on the meta device, so a 70B model is described without memory,
and it is generic over the HF families that keep their layers in one ``nn.ModuleList`` (Llama, Mistral,
Qwen2, GPT-2 and most others). A parameter shared by two blocks (tied embeddings) belongs to the first.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from tiertune.errors import ModelError


@dataclass
class Block:
    name: str  # module path of the block's root: "model.layers.3", or "embed"/"head" for the edges
    kind: str  # "embed", "layer" or "head"
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # qualified name -> parameter owned
    tied: list[str] = field(default_factory=list)  # qualified names of parameters owned by an earlier block

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def nbytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for p in self.params.values():
            out[str(p.dtype).removeprefix("torch.")] += p.numel() * p.element_size()
        return dict(out)


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder-layer list: its largest ModuleList by parameter count."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ModelError(
            f"{type(model).__name__} keeps no decoder layers in an nn.ModuleList; "
            "tiertune cannot cut it into blocks"
        )
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def find_blocks(model: nn.Module) -> list[Block]:
    """Cut ``model`` into embed, layer and head blocks, owning every parameter exactly once."""
    layers_name, layers = _decoder_layers(model)
    layer_blocks = [Block(f"{layers_name}.{i}", "layer") for i in range(len(layers))]
    embed, head = Block("embed", "embed"), Block("head", "head")
    layer_prefixes = {f"{b.name}.": b for b in layer_blocks}
    owner: dict[int, str] = {}
    seen_layers = False
    # named_parameters(remove_duplicate=False) walks in registration order and shows tied weights twice.
    for qualified, param in model.named_parameters(remove_duplicate=False):
        block = next((b for prefix, b in layer_prefixes.items() if qualified.startswith(prefix)), None)
        if block is not None:
            seen_layers = True
        else:
            block = head if seen_layers else embed
        if id(param) in owner:
            block.tied.append(qualified)
        else:
            owner[id(param)] = qualified
            block.params[qualified] = param
    return [b for b in [embed, *layer_blocks, head] if b.params or b.tied]


def parameter_users(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """For each parameter (by id): every (module, attribute, qualified name) holding it (tied: several)."""
    users: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for prefix, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is not None:
                users.setdefault(id(p), []).append((module, attr, f"{prefix}.{attr}" if prefix else attr))
    return users
