"""The gradient of a trained weight that two modules share (a tied embedding and LM head), without the
sums autograd builds.

Autograd sums a leaf's gradients from all its uses before the leaf's accumulate step runs: it holds the
LM head's gradient (computed first) through the whole backward, and when the embedding's arrives at the
end it adds the two into a third tensor. With a 1.5 GiB embedding (Llama-3.2-3B) that is 4.5 GiB
outside the gradient homes at once, more than a decoder layer's weights, gradients and Adam state.

Here every use of a shared trained weight but its first (the module that registers it first: the
embedding) sees the weight through an alias, installed by a forward pre-hook for that call only, whose
backward hands its gradient to a sink instead of to autograd; the weight's own accumulate step then gets
the first use's gradient alone, and it still runs after every use's backward (the alias feeds it). The
sink (:class:`tiertune.optim.blockwise.BlockAdamW`) adds the gradient straight into the gradient home
when the home's slice is empty (the step's first micro-batch, fp32), else keeps it until the first use's
gradient arrives and adds it into that one in place. Two uses (a tied embedding and head): autograd's
sum, bit for bit, as addition commutes, with one weight-sized tensor alive at a time (two from the
second micro-batch of a step on) instead of three. With more uses the later ones are summed first,
which may round differently from autograd's order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tiertune.offload.blocks import parameter_users

Sink = Callable[[torch.Tensor], None]


class _Alias(torch.autograd.Function):
    """The weight, as a view; its gradient goes to ``sink``, and none to the weight through autograd."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, sink: Sink) -> torch.Tensor:  # type: ignore[override]
        ctx.sink = sink
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None]:  # type: ignore[override]
        ctx.sink(grad)
        return None, None


def later_uses(model: nn.Module, params: list[nn.Parameter]) -> dict[int, list[tuple[nn.Module, str]]]:
    """For each of ``params`` that more than one module holds (by id): the (module, attribute) of every
    holder but the first."""
    wanted = {id(p) for p in params}
    return {
        k: [(module, attr) for module, attr, _ in holders[1:]]
        for k, holders in parameter_users(model).items()
        if k in wanted and len(holders) > 1
    }


class SharedUses:
    """Aliases for the later uses of shared trained weights: ``sinks`` maps a parameter's id to where the
    gradients of its later uses go (see the module docstring)."""

    def __init__(
        self, model: nn.Module, uses: dict[int, list[tuple[nn.Module, str]]], sinks: dict[int, Sink]
    ):
        self._hooks: list = []
        for k, holders in uses.items():
            for module, attr in holders:
                self._hooks.append(module.register_forward_pre_hook(self._alias(attr, sinks[k])))
                self._hooks.append(module.register_forward_hook(self._unalias(attr), always_call=True))

    @staticmethod
    def _alias(attr: str, sink: Sink) -> Callable:
        def hook(module: nn.Module, args: object) -> None:
            weight = module._parameters[attr]
            if torch.is_grad_enabled() and weight.requires_grad:
                # An instance attribute is found before nn.Module's lookup of its parameters, so this call
                # of forward computes with the alias while the parameter stays registered as it was.
                module.__dict__[attr] = _Alias.apply(weight, sink)

        return hook

    @staticmethod
    def _unalias(attr: str) -> Callable:
        def hook(module: nn.Module, args: object, output: object) -> None:
            module.__dict__.pop(attr, None)

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
