"""LoRA through peft: the base weights are frozen, low-rank adapters beside chosen linears train.

The export is peft's adapter format, so ``peft.PeftModel.from_pretrained(base, directory)`` loads it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tiertune.config import TuningConfig
from tiertune.errors import ConfigError
from tiertune.tuning.registry import classification_head, register, save_pretrained_with_tokenizer


class LoraTuning:
    name = "lora"

    def apply(self, model: nn.Module, cfg: TuningConfig) -> nn.Module:
        targets = cfg.lora.target_modules
        peft_cfg = PeftLoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules="all-linear" if targets == ["all-linear"] else list(targets),
            task_type=peft_task_type(model),
        )
        try:
            model = get_peft_model(model, peft_cfg)
        except ValueError as e:  # peft names the targets it could not find
            raise ConfigError(
                [f"tuning.lora.target_modules: {targets!r} does not fit this model: {e}"]
            ) from None
        _make_meta_adapters(model)
        if cfg.s2a.quantize_activations:  # S2A's 4-bit activations, composed with LoRA
            from tiertune.tuning.s2a import quantize_activations

            quantize_activations(model, cfg.s2a.norm_bits, cfg.s2a.qkv_bits)
        if cfg.s2a.lora_input_bits == 8:  # and the adapters' inputs kept in 8 bits
            from tiertune.tuning.s2a import int8_lora_inputs

            int8_lora_inputs(model)
        return model

    def export(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
        save_pretrained_with_tokenizer(model, tokenizer, directory)


def peft_task_type(model: nn.Module) -> str:
    """peft's task type for ``model``: a sequence classifier's head (``classifier``/``score``, new over a
    pretrained base) then trains whole beside the adapters and is saved with them (peft's
    ``modules_to_save``)."""
    if classification_head(model) is not None:
        return "SEQ_CLS"
    return "CAUSAL_LM"


ADAPTER_DICTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _make_meta_adapters(model: nn.Module) -> None:
    """Over a base on the meta device (the engine makes its blocks where the plan puts them) peft's
    adapters are meta too: make them now, in host memory, with peft's own initialisation as the job's
    LoRA config asks for it (small: the adapters are a fraction of a percent of the model)."""
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        made = set()
        for attr in ADAPTER_DICTS:
            for adapter, item in getattr(module, attr, {}).items():
                if isinstance(item, nn.Module) and any(p.is_meta for p in item.parameters()):
                    item.to_empty(device="cpu")
                    made.add(adapter)
                elif isinstance(item, nn.Parameter) and item.is_meta:
                    fresh = torch.empty_like(item, device="cpu")
                    getattr(module, attr)[adapter] = nn.Parameter(fresh, requires_grad=item.requires_grad)
                    made.add(adapter)
        for adapter in made:
            module.reset_lora_parameters(adapter, model.peft_config[adapter].init_lora_weights)
        left = [n for n, p in module.named_parameters() if p.is_meta and "lora_" in n]
        if left:
            raise ConfigError([f"tuning.lora: cannot make the adapters {left[:3]} of this model's layers"])


class LucLoraTuning(LoraTuning):
    """LoRA over a base compressed layer by layer: the adapters are LoRA's; the job compresses the base
    linears beneath them by its LUC policy (tiertune.launch.luc_job), and exports the policy beside them."""

    name = "luc_lora"


register(LoraTuning())
register(LucLoraTuning())
