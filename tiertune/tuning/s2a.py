"""S2A in models: the quantized activation ops wired into Llama-family and BERT layers, and the
activation modules (``bias``, ``prompt``, ``side``) as the ``s2a`` tuning method.

``tuning.s2a.quantize_activations`` (with ``tuning.method`` ``s2a``, ``lora``, ``luc_lora`` or ``depth``)
makes the non-parametric ops keep few bits an element for backward (the forward stays exact; evaluation
and generation compute with the exact ops):

- the MLP activation (Llama's SiLU ``mlp.act_fn``, BERT's GELU ``intermediate.intermediate_act_fn``) is
  replaced by a module calling :func:`tiertune.tuning.actquant.silu` / ``gelu``: a 4-bit interval index;
- attention runs through the attention function registered as ``tiertune_s2a``: one op
  (:class:`_Attention`) computes ``softmax(q k^T * scaling + mask) @ V`` and keeps q, k, v as they came
  (key/value heads not repeated; in 8 bits with ``tuning.s2a.qkv_bits=8``, function ``tiertune_s2a_qkv8``)
  and the probabilities in 4 bits;
- with ``tuning.s2a.norm_bits=8`` (the default), every LayerNorm and Llama-style RMSNorm becomes a
  :class:`QuantizedNorm` keeping its normalized input in 8 bits (same parameters, same names).

The activation modules train instead of the weights (``tuning.method=s2a``, ``tuning.s2a.modules``):

- ``bias``: a trainable bias, zero at first, on the output of every linear of every layer;
- ``prompt``: ``tuning.s2a.prompt_length`` trainable vectors inserted into the sequence after the
  embeddings (:class:`Prompt`);
- ``side``: a side network beside the backbone: each layer's output, detached, is projected down to
  ``tuning.s2a.side_dim``; the side state runs through one small gated layer per backbone layer; its
  projection back up (zero at first) is added to the final hidden state before the final norm (a
  classifier's: averaged over the text's tokens first). Backward never enters the backbone, so the
  backbone saves nothing at all.

``tuning.s2a.lora_input_bits=8`` (with ``lora``, ``luc_lora`` or ``depth``) keeps the inputs LoRA's
``lora_A`` linears save for their weights' gradient in 8 bits (:class:`Int8InputLinear`), one copy per
input however many adapters read it.

The modules' parameters are made real when the method is applied (like LoRA's adapters), so the offload
engine streams the frozen base around them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tiertune.config import TuningConfig
from tiertune.errors import ConfigError
from tiertune.tuning import actquant
from tiertune.tuning.registry import classification_head, register

ATTENTION = "tiertune_s2a"
ATTENTION_QKV8 = "tiertune_s2a_qkv8"
MODULES_FILE = "s2a_modules.safetensors"


# -- the fused softmax @ V --------------------------------------------------------------------------------


class _Attention(torch.autograd.Function):
    """``softmax(q k^T * scaling + mask) @ v`` with grouped key/value heads, saving q, k and v as they come
    (not repeated per query head) and the probabilities in 4 bits (per-row scale): backward rebuilds the
    probabilities from their codes. A softmax op alone would save 4 bits, but the matmul after it would
    keep the full probabilities again for V's gradient; fused, they are kept once, in 4 bits."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling, qkv_bits=16):  # noqa: ANN001, ANN205 (autograd's signature)
        groups = q.shape[1] // k.shape[1]
        kr, vr = (k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)) if groups > 1 else (k, v)
        scores = (q.float() @ kr.float().transpose(-1, -2)) * scaling
        if mask is not None:
            scores = scores + mask
        p = torch.softmax(scores, dim=-1)
        scale = p.amax(dim=-1, keepdim=True)
        codes = torch.round(p / scale * (actquant.LEVELS - 1)).to(torch.uint8)
        ctx.groups, ctx.scaling, ctx.shape = groups, scaling, p.shape
        ctx.dtypes, ctx.eight = (q.dtype, k.dtype, v.dtype), qkv_bits == 8
        kept = [x for t in (q, k, v) for x in actquant.quantize8(t)] if ctx.eight else [q, k, v]
        ctx.save_for_backward(*kept, actquant.pack4(codes), scale)
        return (p.to(v.dtype) @ vr).to(q.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        *kept, packed, scale = ctx.saved_tensors
        if ctx.eight:  # q, k and v come back from 8 bits, in their own dtypes
            pairs = zip(kept[0::2], kept[1::2], ctx.dtypes)
            q, k, v = (actquant.dequantize8(c, s).to(dt) for c, s, dt in pairs)
        else:
            q, k, v = kept
        g = ctx.groups
        kr, vr = (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)) if g > 1 else (k, v)
        p = actquant.unpack4(packed, scale.numel() * ctx.shape[-1]).view(ctx.shape).float()
        p = p * (scale / (actquant.LEVELS - 1))
        go = grad.float()
        dv = p.transpose(-1, -2) @ go
        dp = go @ vr.float().transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True)) * ctx.scaling
        dq = ds @ kr.float()
        dk = ds.transpose(-1, -2) @ q.float()
        if g > 1:  # each key/value head served ``g`` query heads: their gradients add up
            b, h, t, d = dk.shape
            dk = dk.view(b, h // g, g, t, d).sum(2)
            dv = dv.view(b, h // g, g, t, dv.shape[-1]).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def s2a_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    qkv_bits: int = 16,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention as eager attention computes it (grouped key/value heads, an additive float mask), through
    :class:`_Attention` (q, k and v kept in ``qkv_bits``). Attention dropout is not supported."""
    if dropout and module.training:
        raise ConfigError(
            ["tuning.s2a.quantize_activations: attention dropout is not supported; set model.dropout=0"]
        )
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = None
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:  # True: attend
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min
            )
        mask = mask.float()
    out = _Attention.apply(query, key, value, mask, scaling, qkv_bits)
    return out.transpose(1, 2).contiguous(), None


def _s2a_attention_qkv8(*args: object, **kwargs: object) -> tuple[torch.Tensor, None]:
    return s2a_attention(*args, **kwargs, qkv_bits=8)


def _register_attention() -> None:
    """``tiertune_s2a`` (q, k, v kept as they come) and ``tiertune_s2a_qkv8`` (in 8 bits) as attention
    implementations, with eager attention's additive float masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    for name, function in ((ATTENTION, s2a_attention), (ATTENTION_QKV8, _s2a_attention_qkv8)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, eager_mask)


# -- activations ------------------------------------------------------------------------------------------


class QuantizedActivation(nn.Module):
    """SiLU or GELU that saves a 4-bit interval index for backward when autograd records."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.exact: Callable[[torch.Tensor], torch.Tensor] = F.silu if name == "silu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return actquant.silu(x) if self.name == "silu" else actquant.gelu(x)
        return self.exact(x)

    def extra_repr(self) -> str:
        return f"{self.name}, 4-bit for backward"


class QuantizedNorm(nn.Module):
    """A LayerNorm or Llama-style RMSNorm (the same ``weight``/``bias`` parameters, so names, checkpoints and
    the offload engine see no change) that keeps its normalized input in 8 bits for backward while autograd
    records: :func:`tiertune.tuning.actquant.layer_norm` / ``rms_norm``."""

    def __init__(self, norm: nn.Module, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.eps = norm.eps if kind == "layer" else norm.variance_epsilon
        self.weight = norm.weight
        self.bias = getattr(norm, "bias", None) if kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trained = self.weight is not None and self.weight.requires_grad
        quantize = torch.is_grad_enabled() and (x.requires_grad or trained)
        if self.kind == "layer":
            f = actquant.layer_norm if quantize else _exact_layer_norm
            return f(x, self.weight, self.bias, self.eps)
        return (actquant.rms_norm if quantize else actquant.exact_rms_norm)(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.kind} norm, eps={self.eps}, 8-bit for backward"


def _exact_layer_norm(
    x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


# Llama's RMSNorm, which these families copy (``weight * normed.to(input dtype)``, normalized in fp32)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _norm_kind(module: nn.Module) -> str | None:
    if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
        return "layer"
    if type(module).__name__ in RMS_NORMS and hasattr(module, "variance_epsilon"):
        return "rms"
    return None


def _activation_name(act: nn.Module) -> str | None:
    name = type(act).__name__.lower()
    if "silu" in name or "swish" in name:
        return "silu"
    if name in ("geluactivation", "gelu") and getattr(act, "approximate", "none") == "none":
        return "gelu"
    return None


def quantize_activations(model: nn.Module, norm_bits: int = 8, qkv_bits: int = 16) -> nn.Module:
    """Wire the quantized ops into ``model`` (in place): every MLP activation the tables cover, the
    attention function (q, k, v kept in ``qkv_bits``, 16: as they come, or 8) and, with ``norm_bits=8``,
    every LayerNorm and Llama-style RMSNorm. Raises ConfigError where the model has no activation to
    quantize."""
    replaced = 0
    for module in list(model.modules()):
        for attr in ("act_fn", "intermediate_act_fn"):
            act = getattr(module, attr, None)
            if isinstance(act, nn.Module) and (name := _activation_name(act)) is not None:
                setattr(module, attr, QuantizedActivation(name))
                replaced += 1
        if norm_bits == 8:
            for child_name, child in list(module.named_children()):
                if (kind := _norm_kind(child)) is not None:
                    setattr(module, child_name, QuantizedNorm(child, kind))
    config = getattr(model, "config", None)
    if replaced == 0 or config is None:
        raise ConfigError(
            [
                "tuning.s2a.quantize_activations: this model has no SiLU or exact-GELU MLP activation to quantize"
            ]
        )
    dropout = {k: getattr(config, k, 0.0) for k in ATTENTION_DROPOUT_KEYS}
    if any(dropout.values()):
        raise ConfigError(
            [
                f"tuning.s2a.quantize_activations: the model's attention dropout ({dropout}) is not supported "
                "with the 4-bit softmax; set model.dropout=0, or quantize_activations=false"
            ]
        )
    _register_attention()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config._attn_implementation = ATTENTION_QKV8 if qkv_bits == 8 else ATTENTION
    return model


ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


# -- 8-bit inputs for LoRA's linears ---------------------------------------------------------------------


class _Int8Input(torch.autograd.Function):
    """``x @ w^T`` keeping ``x`` for ``w``'s gradient in 8 bits (per-row absmax scale). Several adapters
    reading one input (q, k and v) share one 8-bit copy (:class:`_LastInput`)."""

    @staticmethod
    def forward(ctx, x, weight, cache):  # noqa: ANN001, ANN205
        codes, scale = cache.quantized(x)
        ctx.save_for_backward(codes, scale, weight)
        ctx.x_dtype = x.dtype
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        codes, scale, weight = ctx.saved_tensors
        x = actquant.dequantize8(codes, scale).to(ctx.x_dtype)
        gx = grad @ weight.to(grad.dtype)
        gw = grad.reshape(-1, grad.shape[-1]).t().float() @ x.reshape(-1, x.shape[-1]).float()
        return gx, gw.to(weight.dtype), None


class _LastInput:
    """The 8-bit copy of the last input quantized: consecutive adapters over the same tensor reuse it."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None

    def quantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.data_ptr(), x._version, tuple(x.shape), x.dtype)
        if key != self.key:
            self.key, self.value = key, actquant.quantize8(x)
        return self.value


class Int8InputLinear(nn.Linear):
    """LoRA's ``lora_A``, keeping its input in 8 bits for backward (its weight: the same parameter)."""

    cache: _LastInput | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight)
        return _Int8Input.apply(x, self.weight, self.cache)


def int8_lora_inputs(model: nn.Module) -> int:
    """Make every LoRA ``lora_A`` linear of ``model`` keep its input in 8 bits; returns how many."""
    from peft.tuners.lora import LoraLayer

    cache, count = _LastInput(), 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, linear in list(module.lora_A.items()):
            if type(linear) is not nn.Linear or linear.bias is not None:
                continue
            made = Int8InputLinear(linear.in_features, linear.out_features, bias=False, device="meta")
            made.weight = linear.weight  # the same parameter: names, optimizer and checkpoints unchanged
            made.cache = cache
            module.lora_A[name] = made
            count += 1
    return count


# -- the activation modules ------------------------------------------------------------------------------


class SideLayer(nn.Module):
    """One layer of the side network, kept inside its backbone layer (so it streams with it): the layer's
    output, detached, projected down and added to the side state, then a gated step."""

    def __init__(self, hidden: int, width: int, side: SideState, dtype: torch.dtype) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(hidden, width, dtype=dtype))
        self.gate = nn.Parameter(torch.empty(width, width, dtype=dtype))
        for w, fan_in in ((self.down, hidden), (self.gate, width)):
            nn.init.uniform_(w, -(fan_in**-0.5), fan_in**-0.5)
        self._side = [side]  # a list: shared, not a submodule

    def forward(self, hidden: torch.Tensor) -> None:
        side = self._side[0]
        x = hidden.detach().to(self.down.dtype) @ self.down  # backward stops here: never into the backbone
        s = x if side.state is None else side.state + x
        side.state = s + F.silu(s @ self.gate)


class SideOutput(nn.Module):
    """The side network's way back: its state projected up (zero at first) and added to the final hidden
    state, before the final norm (this module lives beside that norm, in the head block).

    ``pooled`` (classifiers): the state is first averaged over the text's tokens (those its attention mask
    keeps) and the mean added at every position. A classifier's head reads one position (BERT's [CLS], a
    Llama classifier's last token), and the side layers work token by token: unpooled, the side network
    would see that one token of the text only."""

    def __init__(self, hidden: int, width: int, side: SideState, dtype: torch.dtype, pooled: bool) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.zeros(width, hidden, dtype=dtype))
        self.pooled = pooled
        self._side = [side]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        side = self._side[0]
        state, mask, side.state, side.mask = side.state, side.mask, None, None
        if state is None:
            return hidden
        if self.pooled:
            if mask is None:
                state = state.mean(dim=-2, keepdim=True)
            else:
                keep = mask.to(state.dtype).unsqueeze(-1)
                state = (state * keep).sum(dim=-2, keepdim=True) / keep.sum(dim=-2, keepdim=True).clamp_min(1)
        return hidden + (state @ self.up).to(hidden.dtype)


class SideState:
    """The side network's running state within one forward, and the forward's attention mask."""

    state: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def remember_mask(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward pre-hook of the whole model: keep this forward's 2-D attention mask (1: a token)."""
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


class Prompt:
    """The ``prompt`` module: ``length`` trainable vectors inserted into the sequence right after the
    embedding stage (``model.embed_tokens``, BERT's ``embeddings``), at position ``at``: 0 for a language
    model, 1 for a classifier (after BERT's [CLS], which its pooler reads). Around the model, the forward's
    2-D attention mask is widened over them and the output head's per-position outputs (an LM's logits, a
    Llama classifier's scores) are cut back to the real tokens, so logits line up with the labels as
    without a prompt. The vectors start at the scale of what they sit beside: the embedding stage's
    initializer range, or 1 after a LayerNorm (BERT's embeddings end in one).

    A prompted model runs without a KV cache (its generation config says so; a forward with a filled cache
    is refused): each forward inserts the prompt again."""

    def __init__(self, model: nn.Module, length: int, dtype: torch.dtype, at: int) -> None:
        self.length, self.at = length, at
        self.positions = -1  # the length of the sequence the prompt was last inserted into
        stage = _embedding_stage(model)
        normed = any(isinstance(m, nn.LayerNorm) for m in stage.modules())
        std = 1.0 if normed else float(getattr(model.config, "initializer_range", 0.02))
        stage.s2a_prompt = nn.Parameter(torch.randn(length, model.config.hidden_size, dtype=dtype) * std)
        stage.register_forward_hook(self.insert)
        model.register_forward_pre_hook(self.widen, with_kwargs=True)
        head = classification_head(model) or model.get_output_embeddings()
        if head is not None:
            head.register_forward_hook(self.cut)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.use_cache = False

    def insert(self, stage: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        prompt = stage.s2a_prompt.to(output.dtype).expand(output.shape[0], -1, -1)
        self.positions = output.shape[1] + self.length
        return torch.cat([output[:, : self.at], prompt, output[:, self.at :]], dim=1)

    def widen(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        past = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5.24 calls it cache
        if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
            raise ConfigError(
                [
                    "tuning.s2a.modules: a model with a trained prompt runs without a KV cache (use_cache=False)"
                ]
            )
        if kwargs.get("position_ids") is not None:  # positions count the prompt: the model numbers them
            kwargs["position_ids"] = None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            ones = mask.new_ones(mask.shape[0], self.length)
            kwargs["attention_mask"] = torch.cat([mask[:, : self.at], ones, mask[:, self.at :]], dim=1)
        return args, kwargs

    def cut(self, head: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 3 or output.shape[1] != self.positions:
            return output  # a pooled classifier's scores (BERT's), or the last positions only (generation)
        return torch.cat([output[:, : self.at], output[:, self.at + self.length :]], dim=1)


def _embedding_stage(model: nn.Module) -> nn.Module:
    """The module whose output enters the first layer: the sibling registered just before the layers'
    list, or before the first ancestor of it that has one (Llama's ``model.embed_tokens``, BERT's
    ``embeddings``, whose output already holds the position embeddings)."""
    from tiertune.offload.blocks import _decoder_layers

    path = _decoder_layers(model)[0].split(".")
    while path:
        parent = model.get_submodule(".".join(path[:-1])) if len(path) > 1 else model
        names = [n for n, _ in parent.named_children()]
        at = names.index(path[-1])
        if at > 0:
            return parent.get_submodule(names[at - 1])
        path = path[:-1]
    raise ConfigError(["tuning.s2a.modules: prompt needs an embedding module before the layers"])


def _layers(model: nn.Module) -> nn.ModuleList:
    from tiertune.offload.blocks import find_blocks

    names = [b.name for b in find_blocks(model) if b.kind == "layer"]
    parent = names[0].rsplit(".", 1)[0]
    return model.get_submodule(parent)


def _linears(layer: nn.Module) -> list[nn.Linear]:
    return [m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n]


class S2ATuning:
    name = "s2a"

    def apply(self, model: nn.Module, cfg: TuningConfig) -> nn.Module:
        s = cfg.s2a
        if not s.modules:
            raise ConfigError(["tuning.s2a.modules: name at least one of bias, prompt, side"])
        model.requires_grad_(False)
        head = classification_head(model)
        if head is not None:  # a classifier's head is new: it trains with the modules
            head.requires_grad_(True)
        layers = _layers(model)
        dtype = next(p.dtype for p in model.parameters())
        if "bias" in s.modules:
            for layer in layers:
                for linear in _linears(layer):
                    linear.s2a_bias = nn.Parameter(torch.zeros(linear.out_features, dtype=dtype))
                    linear.register_forward_hook(_add_bias)
        if s.quantize_activations is not False:  # on unless switched off; before the side network's exit
            quantize_activations(model, s.norm_bits, s.qkv_bits)  # hook goes on the (replaced) final norm
        if "prompt" in s.modules:  # before the side network: its mask hook must see the widened mask
            Prompt(model, s.prompt_length, dtype, at=0 if head is None else 1)
        if "side" in s.modules:
            hidden, state = model.config.hidden_size, SideState()
            for layer in layers:
                layer.s2a_side = SideLayer(hidden, s.side_dim, state, dtype)
                layer.register_forward_hook(_feed_side)
            norm = _side_exit(model)
            norm.s2a_side = SideOutput(hidden, s.side_dim, state, dtype, pooled=head is not None)
            if head is not None:
                model.register_forward_pre_hook(state.remember_mask, with_kwargs=True)
            norm.register_forward_pre_hook(lambda m, args: (m.s2a_side(args[0]), *args[1:]))
        return model

    def export(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
        """The trained modules' weights (``s2a_modules.safetensors``) and the tokenizer: apply the same
        ``tuning.s2a`` to the base model, then :func:`load_modules`."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad
        }
        save_file(tensors, str(directory / MODULES_FILE))
        tokenizer.save_pretrained(directory)


def load_modules(model: nn.Module, directory: Path) -> None:
    """Load exported activation modules into a model the same ``tuning.s2a`` was applied to."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / MODULES_FILE))
    _, unexpected = model.load_state_dict(saved, strict=False)
    if unexpected:
        raise ConfigError([f"{directory}: {unexpected[:3]} do not fit this model's activation modules"])


def _add_bias(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.s2a_bias.to(output.dtype)


def _feed_side(layer: nn.Module, args: tuple, output: object) -> None:
    layer.s2a_side(output[0] if isinstance(output, tuple) else output)


def _side_exit(model: nn.Module) -> nn.Module:
    """The module that takes the last layer's hidden state: the final norm (Llama, GPT-2), or a BERT
    classifier's pooler (post-norm layers: no final norm)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, getattr(base, "base_model_prefix", ""), None) or base
    for name in ("norm", "ln_f", "final_layer_norm", "pooler"):
        module = getattr(inner, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ConfigError(
        ["tuning.s2a.modules: side needs a final norm (or a classifier's pooler) after the layers"]
    )


register(S2ATuning())
