"""Build the job's model and tokenizer: a named preset with random init, or a local HF directory.

Any model can be built on the meta device (``device="meta"``): shapes and dtypes only, no memory, so
planning a 70B job, or streaming its weights into memory tiers later, never holds the model in RAM.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tiertune.config import ModelConfig
from tiertune.errors import ModelError
from tiertune.launch.presets import PRESETS
from tiertune.launch.tokenizer import byte_tokenizer

log = logging.getLogger(__name__)


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The transformers config of the job's model, without building it."""
    if cfg.path is not None:
        try:
            return AutoConfig.from_pretrained(cfg.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read the model config in {cfg.path!r}: {e}") from None
    preset = PRESETS.get(cfg.preset or "")
    if preset is None:
        raise ModelError(f"unknown model preset {cfg.preset!r}; choose one of: {', '.join(PRESETS)}")
    return AutoConfig.for_model(preset.family, **preset.config)


def build_model(cfg: ModelConfig, *, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """The causal LM in fp32: weights from ``cfg.path``, or a preset initialised from ``seed``.

    On ``device="meta"`` nothing is allocated and nothing is read but config.json.
    """
    device = torch.device(device)
    config = hf_config(cfg)
    if device.type == "meta":
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    if cfg.path is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32, local_files_only=True)
        except Exception as e:  # damaged files surface as many library-specific errors
            raise ModelError(
                f"cannot load the model weights in {cfg.path!r} ({type(e).__name__}: {e}); "
                "is the directory complete?"
            ) from None
        return model.to(device)
    # Init draws from a private RNG stream, so the weights are a function of the seed alone and the
    # global RNG (data order, dropout) is the same whatever the model's size.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model directory's tokenizer, or the built-in byte-level one for presets."""
    if cfg.path is None:
        return byte_tokenizer()
    try:
        tok = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"no usable tokenizer in {cfg.path!r} ({e}); a model directory needs its "
            "tokenizer files (tokenizer.json or the family's vocabulary files)"
        ) from None
    if tok.pad_token_id is None:  # packing pads only the last sequence, whose pad labels are masked
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token_id is None:
        raise ModelError(f"the tokenizer in {cfg.path!r} has no pad, eos or unk token to pad with")
    return tok


def check_vocab(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} tokens but the model embeds only "
            f"{embeddings}; they do not belong together"
        )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def weights_fingerprint(cfg: ModelConfig) -> dict[str, str]:
    """A cheap identity of a model directory's weights (config.json's hash, weight file names and sizes).

    Presets have none: their weights are a function of the seed, which the config already pins.
    """
    if cfg.path is None:
        return {}
    root = Path(cfg.path)
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for f in sorted(root.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt"):
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return {"base model weights": digest.hexdigest()}


def describe(cfg: ModelConfig) -> str:
    return f"preset {cfg.preset}" if cfg.path is None else str(Path(cfg.path))
