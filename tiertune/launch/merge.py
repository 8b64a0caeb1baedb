"""Merge LoRA adapters into their base and export a full HF model directory, one tensor at a time.

The base's weights come from where the job got them (a preset's seed, or the model directory's
safetensors files) and, for a LUC base, from its compressed form decompressed; a module trained whole
beside the adapters (a classifier's new head, peft's ``modules_to_save``) is written as trained: the merged
model is the model that was trained. Each adapted weight gets ``scaling * B @ A`` added in fp32, then is written in the
job's weight dtype. The model is never whole in memory: one tensor is read, merged and written at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tiertune.config import JobConfig
from tiertune.errors import ConfigError
from tiertune.launch.models import WEIGHT_DTYPES, base_name, hf_config, skeleton, weight_source
from tiertune.offload.tensorfile import write_safetensors
from tiertune.tuning.luc import CompressedLinear, decompress
from tiertune.tuning.registry import classification_head

MERGED_DIR = "merged"


def _deltas(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Base weight name -> (A, B, scaling) of each LoRA layer of the trained peft ``model``."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in module.lora_A if a in module.active_adapters]
        if len(adapters) != 1:
            raise ConfigError([f"{name}: merging needs exactly one active adapter, found {adapters}"])
        a = adapters[0]
        if not isinstance(module.lora_A[a], nn.Linear):
            raise ConfigError([f"{name}: merging supports LoRA on linear layers only"])
        out[base_name(f"{name}.weight")] = (
            module.lora_A[a].weight.detach(),
            module.lora_B[a].weight.detach(),
            float(module.scaling[a]),
        )
    return out


def _trained_whole(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weight name -> the trained value of each parameter peft trains whole beside the adapters (its
    ``modules_to_save``: a classifier's new head), which replaces the base's."""
    return {
        base_name(n): p.detach()
        for n, p in model.named_parameters()
        if ".modules_to_save." in n and p.device.type != "meta"
    }


def _compressed(model: nn.Module) -> dict[str, CompressedLinear]:
    """Base weight name -> the compressed linear that holds it."""
    return {
        base_name(f"{name}.weight"): m for name, m in model.named_modules() if isinstance(m, CompressedLinear)
    }


def write_merged(
    cfg: JobConfig,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    whole: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the base of ``model`` (a trained peft model: adapters real, base as the job built it) with
    its adapters merged into ``directory``: config.json, model.safetensors, tokenizer files. ``whole``:
    the values of what trained whole beside the adapters, by base name (default: read from ``model``)."""
    dtype = WEIGHT_DTYPES[cfg.train.dtype]
    deltas, compressed = _deltas(model), _compressed(model)
    whole = _trained_whole(model) if whole is None else whole
    if classification_head(model) is not None and not whole:
        raise ConfigError(["merging a classifier needs its trained head, which this model does not hold"])
    plain = skeleton(cfg.model)  # the base model's own names and shapes (tied weights once)
    names = [(n, tuple(p.shape)) for n, p in plain.named_parameters()]
    source = weight_source(cfg.model, cfg.train.seed, model)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in names:
            if name in whole:  # trained whole (a classifier's head): its value as trained
                yield name, whole[name].to("cpu", dtype)
                continue
            if name in compressed:
                linear = compressed[name]
                packed = torch.empty_like(linear.packed, device="cpu")
                meta = torch.empty_like(linear.meta, device="cpu")
                owner = name.removesuffix(".weight")
                source(f"{owner}.packed", packed)
                source(f"{owner}.meta", meta)
                value = decompress(packed, meta, linear.layout, torch.float32)
            else:
                value = torch.empty(shape, dtype=torch.float32)
                source(name, value)
                value = value.to(dtype).float()  # the base as trained: in the job's weight dtype
            if name in deltas:
                a, b, scaling = deltas[name]
                value += scaling * (b.float() @ a.float())
            yield name, value.to(dtype)

    missing = sorted(set(deltas) - {n for n, _ in names})
    if missing:
        raise ConfigError([f"adapters on weights the base does not have: {missing[:3]}"])
    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config(cfg.model)
    config.architectures = [type(plain).__name__]
    config.torch_dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    entries = [(n, dtype, s) for n, s in names]
    write_safetensors(directory / "model.safetensors", entries, tensors(), metadata={"format": "pt"})
    return directory


def merge_run(run_dir: Path, out: Path | None = None) -> Path:
    """Merge a finished LoRA (or luc_lora) run's exported adapters (``run_dir/final``) into its base, as
    the run's own config and LUC policy describe it: ``out``, default ``run_dir/final/merged``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from tiertune.config import load_config
    from tiertune.launch.luc_job import POLICY_FILE, Policy, uses_luc
    from tiertune.launch.models import cast_parameters, load_tokenizer
    from tiertune.tuning import get_method
    from tiertune.tuning.luc import compress_layers

    config, adapter = run_dir / "config.resolved.yaml", run_dir / "final" / "adapter_model.safetensors"
    for path in (config, adapter):
        if not path.is_file():
            raise ConfigError(
                [f"{run_dir} is not a finished LoRA run: it has no {path.relative_to(run_dir)}"]
            )
    cfg = load_config(config)
    if cfg.tuning.method == "full":
        raise ConfigError(
            [f"{run_dir} trained every weight: final/ is already a full model, nothing to merge"]
        )
    model = get_method(cfg.tuning.method).apply(skeleton(cfg.model), cfg.tuning)
    dtype = WEIGHT_DTYPES[cfg.train.dtype]
    if uses_luc(cfg):
        policy = Policy.from_json((run_dir / POLICY_FILE).read_text())
        compress_layers(model, policy, dtype)
    cast_parameters(model, dtype)
    saved = load_file(str(adapter))
    set_peft_model_state_dict(model, saved)
    # what trained whole (a classifier's head) stays meta in this skeleton: its values come from the file
    whole = {base_name(n): t for n, t in saved.items() if "lora_" not in n}
    return write_merged(cfg, model, load_tokenizer(cfg.model), out or run_dir / "final" / MERGED_DIR, whole)
