"""Flat blocks: each block's parameters of one dtype live in one flat, aligned buffer.

The parameters stay the same ``nn.Parameter`` objects (so optimizers, hooks and tied weights keep
working); their ``.data`` become views into the block's buffer. One copy, one I/O or one collective then
moves a whole block, and one fused kernel can update it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tiertune.memory.numa import numa_empty
from tiertune.memory.pool import align_up
from tiertune.offload.blocks import Block, find_blocks


@dataclass
class FlatParams:
    block: str
    buffer: torch.Tensor  # 1-D, ``dtype``; on the CPU it starts on a 4 KiB boundary (O_DIRECT-ready)
    slot: torch.Tensor  # the same memory as uint8, padded to whole 4 KiB: what a file transfer moves
    names: list[str]
    offsets: list[int]  # element offset of each parameter in ``buffer``

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def flat_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the typed buffer, its whole 4 KiB-padded memory as uint8)."""
    nbytes = align_up(numel * dtype.itemsize)
    raw = (
        numa_empty(nbytes) if device.type == "cpu" else torch.empty(nbytes, dtype=torch.uint8, device=device)
    )
    return raw.view(dtype)[:numel], raw


def flatten_params(block: str, params: dict[str, nn.Parameter]) -> FlatParams:
    """Move ``params`` (one dtype, one device) into one buffer and point each parameter at its slice."""
    first = next(iter(params.values()))
    if any(p.dtype != first.dtype or p.device != first.device for p in params.values()):
        raise ValueError(f"{block}: flatten one dtype and device at a time")
    offsets, total = [], 0
    for p in params.values():
        offsets.append(total)
        total += p.numel()
    buffer, slot = flat_buffer(total, first.dtype, first.device)
    with torch.no_grad():
        for offset, p in zip(offsets, params.values()):
            view = buffer[offset : offset + p.numel()].view(p.shape)
            view.copy_(p.data)
            p.data = view  # same Parameter object, new storage: optimizers and hooks are unaffected
    return FlatParams(block, buffer, slot, list(params), offsets)


def flatten_meta(
    block: str,
    params: dict[str, nn.Parameter],
    make: Callable[[dict[str, torch.Tensor]], dict[str, nn.Parameter]],
    device: torch.device,
) -> tuple[FlatParams, list[nn.Parameter]]:
    """Lay out ``params`` (on the meta device: shapes only) in one new buffer and have ``make`` create
    the real parameters as views into it (name -> view in, name -> parameter out). A block is built
    straight into its flat buffer: the model never exists whole."""
    first = next(iter(params.values()))
    offsets, total = [], 0
    for p in params.values():
        offsets.append(total)
        total += p.numel()
    buffer, slot = flat_buffer(total, first.dtype, device)
    views = {n: buffer[o : o + p.numel()] for (n, p), o in zip(params.items(), offsets)}
    made = make(views)
    return FlatParams(block, buffer, slot, list(params), offsets), [made[n] for n in params]


def flatten_blocks(model: nn.Module, blocks: list[Block] | None = None) -> list[FlatParams]:
    """Flatten every block of ``model``: one buffer per block and parameter dtype."""
    flats = []
    for block in blocks if blocks is not None else find_blocks(model):
        groups: dict[tuple[torch.dtype, torch.device], dict[str, nn.Parameter]] = {}
        for name, p in block.params.items():  # tied parameters are owned (and flattened) once
            groups.setdefault((p.dtype, p.device), {})[name] = p
        flats += [flatten_params(block.name, params) for params in groups.values()]
    return flats
