"""Build the job's model and tokenizer: a named preset with random init, or a local HF directory.

The model is the family's causal LM, or with ``model.task=sequence_classification`` its sequence
classifier (``AutoModelForSequenceClassification``: the base model and a classification head with one
output per ``model.labels``). A head the weights lack (a pretrained base) is seeded like a preset's
parameters.

Any model can be built on the meta device (``device="meta"``): shapes and dtypes only, no memory, so
planning a 70B job, or streaming its weights into memory tiers later, never holds the model in RAM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tiertune.config import ModelConfig
from tiertune.errors import ModelError
from tiertune.launch.presets import PRESETS, model_dir
from tiertune.launch.tokenizer import byte_tokenizer
from tiertune.offload.blocks import parameter_users
from tiertune.tuning.depth import source_name as exit_source_name
from tiertune.tuning.luc import CompressedSource, has_compressed

log = logging.getLogger(__name__)


DROPOUT_KEYS = (  # the families' names for dropout probabilities (model.dropout sets them all)
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "attention_dropout",
    "hidden_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_first_dropout",
)


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The transformers config of the job's model (with its classification labels and dropout override),
    without building it."""
    directory = model_dir(cfg.path)
    if directory is not None:
        try:
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read the model config in {cfg.path!r}: {e}") from None
    else:
        preset = PRESETS.get(cfg.preset or "")
        if preset is None:
            raise ModelError(f"unknown model preset {cfg.preset!r}; choose one of: {', '.join(PRESETS)}")
        config = AutoConfig.for_model(preset.family, **preset.config)
    if cfg.task == "sequence_classification":
        if not cfg.labels:
            raise ModelError("model.labels: a sequence classifier needs its class names")
        config.num_labels = len(cfg.labels)
        config.id2label = dict(enumerate(cfg.labels))
        config.label2id = {name: i for i, name in enumerate(cfg.labels)}
    if cfg.dropout is not None:
        for key in DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, cfg.dropout)
    return config


def auto_class(cfg: ModelConfig) -> type:
    """The transformers auto class of the job's task."""
    if cfg.task == "sequence_classification":
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM


def build_model(cfg: ModelConfig, *, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """The model in fp32: weights from ``cfg.path``, or a preset initialised from ``seed``.

    On ``device="meta"`` nothing is allocated and nothing is read but config.json.
    """
    device = torch.device(device)
    config = hf_config(cfg)
    if device.type == "meta":
        with torch.device("meta"):
            return auto_class(cfg).from_config(config)
    directory = model_dir(cfg.path)
    if directory is not None:
        try:
            model = auto_class(cfg).from_pretrained(
                directory, config=config, dtype=torch.float32, local_files_only=True
            )
        except Exception as e:  # damaged files surface as many library-specific errors
            raise ModelError(
                f"cannot load the model weights in {cfg.path!r} ({type(e).__name__}: {e}); "
                "is the directory complete?"
            ) from None
        return model.to(device)
    model = skeleton(cfg)
    materialize(model, weight_source(cfg, seed, model), device)
    return model


def skeleton(cfg: ModelConfig) -> nn.Module:
    """The model with its parameters on the meta device (no memory) and its buffers (rotary frequencies
    and the like) real: :func:`materialize` fills in the parameters from a :func:`weight_source`, all at
    once or one block at a time, with the same values either way."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = auto_class(cfg).from_config(hf_config(cfg), dtype=torch.float32)
    model.tie_weights()
    return model


WeightSource = Callable[[str, torch.Tensor], None]  # fill the tensor with the named parameter's values


def weight_source(cfg: ModelConfig, seed: int, model: nn.Module) -> WeightSource:
    """Where a parameter's values come from: the safetensors files of ``cfg.path`` (read one tensor at a
    time), or the seed (:func:`init_parameter`); a compressed linear's tensors are made from its original
    weight (:class:`~tiertune.tuning.luc.CompressedSource`)."""
    std = getattr(model.config, "initializer_range", 0.02)
    seeded: WeightSource = lambda name, tensor: init_parameter(name, tensor, seed, std)  # noqa: E731
    directory = model_dir(cfg.path)
    if directory is None:
        source = seeded
    else:  # a classification head the weights lack (a pretrained base model) is seeded
        head = seeded if cfg.task == "sequence_classification" else None
        source = ShardReader(directory, getattr(model, "base_model_prefix", ""), head)
    if has_compressed(model):  # a LUC base: its compressed tensors are made from the original weights
        return CompressedSource(model, source, base_name)
    return source


def has_safetensors(path: str | Path) -> bool:
    """Whether a model directory's weights are in safetensors files (else it is loaded whole)."""
    root = Path(path)
    return (root / "model.safetensors").is_file() or (root / "model.safetensors.index.json").is_file()


class ShardReader:
    """Reads single tensors from a model directory's safetensors files (one file or an indexed set).
    ``head``: where the task head's tensors come from when the files lack them (the parameters outside
    the base model, ``prefix``: a classifier over a pretrained base)."""

    def __init__(self, root: Path, prefix: str = "", head: WeightSource | None = None) -> None:
        self.root, self.prefix, self.head = root, f"{prefix}." if prefix else "", head
        self.seeded: list[str] = []  # the head tensors the files lacked
        index = root / "model.safetensors.index.json"
        try:
            if index.is_file():
                self.where = json.loads(index.read_text())["weight_map"]
            elif (root / "model.safetensors").is_file():
                with safe_open(str(root / "model.safetensors"), framework="pt") as fh:
                    self.where = dict.fromkeys(fh.keys(), "model.safetensors")
            else:
                raise ModelError(
                    f"{root} holds no model.safetensors (or its index): tiertune reads weights from "
                    "safetensors files; convert the checkpoint (save_pretrained writes them)"
                )
        except ModelError:
            raise
        except Exception as e:  # a damaged file or index surfaces as several error types
            raise ModelError(
                f"cannot read the weights' table in {root} ({type(e).__name__}: {e}); is the directory complete?"
            ) from None

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.where and name.startswith(self.prefix):
            name = name[len(self.prefix) :]  # saved from the base model (GPT-2 on the hub: "h.0...")
        elif name not in self.where and self.head is not None and self.prefix:
            if name not in self.seeded:  # a new classification head over a pretrained base
                self.seeded.append(name)
                log.info("%s: %s is not in the weights; seeded (a new head)", self.root, name)
            self.head(name, tensor)
            return
        if name not in self.where:
            raise ModelError(
                f"{self.root}: the weights have no tensor {name!r}; is it the model config.json names?"
            )
        try:
            with safe_open(str(self.root / self.where[name]), framework="pt") as fh:
                value = fh.get_tensor(name)
        except Exception as e:  # a truncated or damaged file surfaces as several error types
            raise ModelError(
                f"cannot read {name} from {self.root / self.where[name]} ({type(e).__name__}: {e}); "
                "is the directory complete?"
            ) from None
        if value.shape != tensor.shape:
            raise ModelError(
                f"{self.root}: {name} has shape {tuple(value.shape)}, the model {tuple(tensor.shape)}"
            )
        tensor.copy_(value)


PEFT_PREFIX = "base_model.model."


def init_parameter(name: str, tensor: torch.Tensor, seed: int, std: float) -> None:
    """Initialise one parameter from ``(seed, name)`` alone, so a block built by itself gets exactly the
    values it has in the whole model: matrices (linear and embedding weights) from N(0, std), biases 0,
    norm scales 1, as the HF families do."""
    if tensor.ndim >= 2:  # drawn in fp32 whatever the dtype: a bf16 weight is its fp32 draw, rounded
        gen = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
        values = torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        tensor.copy_(values)
    elif name.endswith("bias"):
        tensor.zero_()
    else:
        tensor.fill_(1.0)


def base_name(name: str) -> str:
    """A parameter's name in the base model, under a peft wrapper too ("base_model.model.<name>", the
    wrapped linear's own weight under "base_layer", a trained head's copy under "modules_to_save.<adapter>"
    and its original under "original_module"), and an adaptive-depth exit head's copy of the final norm
    or LM head by the original's name: the name its weights are read or seeded by."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    name = _PEFT_WRAPPED.sub(".", name)
    return exit_source_name(name)  # an exit head's copy: from its original


_PEFT_WRAPPED = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)\.")


def materialize(
    model: nn.Module,
    source: WeightSource,
    device: torch.device | str = "cpu",
    only: dict[str, torch.Tensor] | None = None,
    users: dict[int, list[tuple[nn.Module, str, str]]] | None = None,
) -> dict[str, nn.Parameter]:
    """Replace meta parameters by real ones filled from ``source`` (tied parameters stay tied). ``only``
    (qualified name -> the memory to use, e.g. a view of a flat buffer) limits it to those parameters.
    Returns the new parameters by their first qualified name."""
    users = users if users is not None else parameter_users(model)
    made: dict[str, nn.Parameter] = {}
    for holders in users.values():
        module, attr, name = holders[0]
        p = module._parameters[attr]
        if not p.is_meta or (only is not None and name not in only):
            continue
        data = only[name] if only is not None else torch.empty(p.shape, dtype=p.dtype, device=device)
        with torch.no_grad():
            source(base_name(name), data.view(p.shape))
        new = nn.Parameter(data.view(p.shape), requires_grad=p.requires_grad)
        for m, a, _ in holders:
            m._parameters[a] = new
        made[name] = new
    return made


WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-autocast": torch.float32}


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give every floating-point parameter ``dtype`` (on the meta device too: no memory); tied parameters
    stay tied. Buffers keep theirs (rotary frequencies stay fp32, as the HF families compute them)."""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is None or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in cast:
                cast[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
            module._parameters[attr] = cast[id(p)]
    return model


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model directory's tokenizer, or the built-in byte-level one for presets."""
    directory = model_dir(cfg.path)
    if directory is None:
        return byte_tokenizer()
    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
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

    Presets: their weights are a function of the seed, which the config pins, and of the way presets are
    seeded, named here (a checkpoint written before that way changes does not resume onto other weights).
    """
    root = model_dir(cfg.path)
    if root is None:
        return {"base model weights": "preset, each parameter seeded by its name"}
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for f in sorted(root.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt"):
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return {"base model weights": digest.hexdigest()}


def describe(cfg: ModelConfig) -> str:
    return f"preset {cfg.preset}" if cfg.path is None else cfg.path
