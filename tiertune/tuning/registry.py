"""Tuning methods by name: each decides which weights train and how the result is exported.

A method registers itself with :func:`register`; a second registration of a name is refused, so two
methods can never silently shadow each other. ``tuning.method`` in the config picks one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tiertune.config import TuningConfig


class TuningMethod(Protocol):
    name: str

    def apply(self, model: nn.Module, cfg: TuningConfig) -> nn.Module:
        """Return the model to train, with ``requires_grad`` set on exactly the weights that train."""

    def export(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
        """Write the trained result in the format its users load (HF model dir, peft adapter, ...)."""


METHODS: dict[str, TuningMethod] = {}


def register(method: TuningMethod) -> TuningMethod:
    if method.name in METHODS:
        raise ValueError(
            f"tuning method {method.name!r} is registered twice "
            f"({type(METHODS[method.name]).__name__} and {type(method).__name__})"
        )
    METHODS[method.name] = method
    return method


def get_method(name: str) -> TuningMethod:
    if name not in METHODS:
        raise ValueError(f"unknown tuning method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name]


def classification_head(model: nn.Module) -> nn.Module | None:
    """A sequence classifier's head (``classifier``, ``score``): new over a pretrained base, so it trains
    whatever the tuning method; None for other models."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not type(base).__name__.endswith("ForSequenceClassification"):
        return None
    for name in ("classifier", "score"):
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    return None


def save_pretrained_with_tokenizer(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path
) -> None:
    """The model's own ``save_pretrained`` (a full HF model, or peft's adapter for a peft model) + tokenizer."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


class FullTuning:
    """Every weight trains; the export is a complete HF model directory."""

    name = "full"

    def apply(self, model: nn.Module, cfg: TuningConfig) -> nn.Module:
        model.requires_grad_(True)
        return model

    def export(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
        save_pretrained_with_tokenizer(model, tokenizer, directory)


register(FullTuning())
