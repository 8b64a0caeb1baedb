"""LUC's sensitivity profile: for each decoder layer and each candidate setting, the error of the layer's
output when that layer alone is compressed so, on calibration batches.

The model is walked block by block and never held whole: a meta-device skeleton whose embedding is made
from the weights' source, and whose decoder layers are made one at a time as the forward reaches them
(a forward pre-hook fills them from the source, the post-hook measures and frees them). The post-hook
reruns the layer on the very inputs it just saw with its linears compressed-then-decompressed under each
setting, and accumulates ``||y_s - y||^2 / ||y||^2`` over the calibration tokens. The forward stops
after the last layer (the head is never needed). Memory: one layer's weights and the calibration
activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tiertune.offload.blocks import find_blocks
from tiertune.tuning.luc.compress import Setting, compress, decompress, layout

Fill = Callable[[str, torch.Tensor], None]  # fill the tensor with the named parameter's weights


@dataclass
class Profile:
    errors: dict[str, dict[Setting, float]]  # layer -> setting -> relative output error
    params: dict[str, int]  # layer -> weights in its linears
    shapes: dict[str, dict[str, tuple[int, int]]]  # layer -> linear (relative name) -> (out, in)


class _Done(Exception):
    """Raised after the last layer: the rest of the forward is not needed."""


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's linears by relative name (a peft-wrapped one by its ``base_layer``)."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n}


@torch.no_grad()
def profile(
    model: nn.Module,
    fill: Fill,
    batches: Iterable[torch.Tensor],
    settings: list[Setting],
    group_size: int,
    on_layer: Callable[[int, int], None] | None = None,
) -> Profile:
    """Measure every layer of ``model`` (a meta-device skeleton, built in the dtype the weights are to be
    compressed from) under every setting; ``batches`` are input-id tensors; ``on_layer(done, total)``
    reports progress in layer-batches measured."""
    batches = list(batches)
    blocks = find_blocks(model)
    layers = [b for b in blocks if b.kind == "layer"]
    modules = dict(model.named_modules())
    errors: dict[str, dict[Setting, list[float]]] = {
        b.name: {s: [0.0, 0.0] for s in settings} for b in layers
    }

    def make(block_params: dict[str, nn.Parameter]) -> list[tuple[nn.Module, str, nn.Parameter]]:
        out = []
        for qualified, p in block_params.items():
            owner, _, attr = qualified.rpartition(".")
            module = modules[owner] if owner else model
            real = torch.empty(p.shape, dtype=p.dtype)
            fill(qualified, real)
            module._parameters[attr] = nn.Parameter(real, requires_grad=False)
            out.append((module, attr, p))
        return out

    for b in blocks:  # the edges once (the embedding feeds every batch); the head is never run
        if b.kind == "embed":
            make(b.params)

    def measure(index: int, name: str) -> Callable:
        targets = linears(modules[name])

        def hook(layer: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            exact = output[0] if isinstance(output, tuple) else output
            power = float(exact.float().pow(2).sum())
            for setting in settings:
                saved = {}
                for lin_name, lin in targets.items():
                    w = lin.weight
                    saved[lin_name] = w.data
                    lay = layout(*w.shape, setting, group_size)
                    w.data = decompress(*compress(w.data, setting, group_size, w.dtype), lay, w.dtype)
                approx = layer.forward(*args, **kwargs)  # not layer(...): that would rerun these hooks
                approx = approx[0] if isinstance(approx, tuple) else approx
                for lin_name, lin in targets.items():
                    lin.weight.data = saved[lin_name]
                acc = errors[name][setting]
                acc[0] += float((approx.float() - exact.float()).pow(2).sum())
                acc[1] += power
            done[0] += 1
            if on_layer is not None:
                on_layer(done[0], len(layers) * len(batches))
            if index == len(layers) - 1:
                raise _Done

        return hook

    handles, done = [], [0]
    for i, b in enumerate(layers):
        layer = modules[b.name]
        undo: list = []

        def pre(module: nn.Module, args: tuple, params=b.params, undo=undo) -> None:  # noqa: ANN001
            undo[:] = make(params)

        def post(module: nn.Module, args: tuple, output: object, undo=undo) -> None:  # noqa: ANN001
            for owner, attr, meta in undo:  # back to the meta parameter: the layer's memory is freed
                owner._parameters[attr] = meta

        handles.append(layer.register_forward_pre_hook(pre))
        handles.append(layer.register_forward_hook(measure(i, b.name), with_kwargs=True))
        handles.append(layer.register_forward_hook(post))
    try:
        for input_ids in batches:
            try:
                model(input_ids=input_ids, use_cache=False)
            except _Done:
                pass
            else:  # pragma: no cover (the last layer's hook always stops the forward)
                raise RuntimeError("the profile's forward did not reach the last layer")
    finally:
        for h in handles:
            h.remove()
    return Profile(
        errors={
            n: {s: (num / den if den else 0.0) for s, (num, den) in per.items()} for n, per in errors.items()
        },
        params={b.name: sum(lin.weight.numel() for lin in linears(modules[b.name]).values()) for b in layers},
        shapes={
            b.name: {n: tuple(lin.weight.shape) for n, lin in linears(modules[b.name]).items()}
            for b in layers
        },
    )
