"""The job config schema: every key a job accepts, its default, its unit and why it has that default.

One place, typed. :mod:`tiertune.config.loader` turns YAML/TOML files and ``key=value`` overrides into
these dataclasses, rejecting unknown keys and bad values. Field metadata carries the help text shown by
``tiertune validate --keys`` and an optional ``check`` (a value -> problem-or-None function).
Later subsystems (memory tiers, offload, the optimizer tier) add their own sections here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Check = Callable[[Any], "str | None"]

WARMUP_SHARE = 0.05  # default warmup as a share of train.max_steps: long enough to tame Adam's first steps


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _between(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def _betas(v: list[float]) -> str | None:
    if len(v) != 2 or not all(0.0 <= b < 1.0 for b in v):
        return "must be two numbers in [0, 1), e.g. [0.9, 0.95]"
    return None


def _seed_range(v: int) -> str | None:
    return None if 0 <= v < 2**32 else "must be between 0 and 2**32 - 1"


def _budget(v: float | str) -> str | None:
    return None if v == "auto" or v >= 0 else "must be >= 0 GiB, or auto"


def _node_ids(v: list[int] | str) -> str | None:
    return None if v == "auto" or all(n >= 0 for n in v) else "must be NUMA node ids (>= 0), or auto"


def _mmap_threshold(v: float | str) -> str | None:
    return None if v == "auto" or 0 <= v <= 32 else "must be between 0 and 32 MiB, or auto"


def _non_empty(v: Any) -> str | None:
    return None if len(v) > 0 else "must not be empty"


def opt(default: Any, help: str, check: Check | None = None) -> Any:
    """A config field: its default, the one-line help, and an optional value check."""
    meta = {"help": help, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    preset: str | None = opt(
        None,
        "built-in model by name (tiny-llama, llama-7b, ...; `tiertune presets` lists them); "
        "random init from the seed. Default tiny-llama when model.path is unset",
    )
    path: str | None = opt(
        None,
        "local HuggingFace model directory (config.json, *.safetensors, tokenizer files), or "
        "builtin:all-minilm-l6-v2 (real pretrained weights an installed package carries)",
    )
    task: Literal["causal_lm", "sequence_classification"] = opt(
        "causal_lm",
        "causal_lm: next-token loss on the completions; sequence_classification: one label per text (data "
        "rows with 'text' and 'label'), through a classification head that is new (seeded) unless the "
        "weights have one, and trains with every tuning method",
    )
    labels: list[str] = opt(
        [],
        "sequence_classification: the class names in the head's output order; [] : the dataset's distinct "
        "labels, sorted (the resolved config records them)",
    )
    dropout: float | None = opt(
        None,
        "override the model's dropout probabilities (hidden, attention, classifier), e.g. 0 for "
        "parameter-efficient tuning; None: as the model's config says",
        _between(0.0, 0.9),
    )


@dataclass
class DataConfig:
    path: str = opt(
        "builtin:arithmetic",
        "JSONL ('text', or 'prompt'+'completion') or plain-text file; "
        "'builtin:NAME' for a dataset tiertune generates (builtin:arithmetic)",
    )
    format: Literal["auto", "jsonl", "text"] = opt("auto", "file format; auto decides by extension")
    seq_len: int = opt(128, "tokens per packed training sequence", _positive)
    eval_fraction: float = opt(
        0.05,
        "share of examples held out for eval loss (split before packing, by the seed)",
        _between(0.0, 0.5),
    )


@dataclass
class LoraConfig:
    r: int = opt(8, "adapter rank", _positive)
    alpha: float = opt(16.0, "scaling numerator: the update is scaled by alpha / r", _positive)
    dropout: float = opt(0.0, "dropout on the adapter input", _between(0.0, 0.9))
    target_modules: list[str] = opt(
        ["all-linear"],
        "module names to adapt (e.g. [q_proj, v_proj]); [all-linear] adapts every linear layer but the head",
        _non_empty,
    )
    export_merged: bool = opt(
        False,
        "also export final/merged: a full HF model directory with the adapters merged into the base weights "
        "(a compressed base is decompressed first), written tensor by tensor; `tiertune merge` does it later",
    )


def _bit_widths(v: list[int]) -> str | None:
    return (
        None
        if v and all(1 <= b <= 8 or b == 16 for b in v)
        else "must be bit widths in 1..8, or 16 (uncompressed)"
    )


def _sparsities(v: list[float]) -> str | None:
    return None if v and all(0.0 <= s < 1.0 for s in v) else "must be shares in [0, 1), e.g. [0.0, 0.25, 0.5]"


@dataclass
class LucConfig:
    avg_bits: float = opt(
        4.0,
        "average code width of the decoder layers' linears (weighted by size): the budget the policy meets, "
        "compressing the least sensitive layers hardest",
        _between(1.0, 16.0),
    )
    max_bytes_ratio: float | None = opt(
        None,
        "instead of avg_bits: the compressed linears' stored bytes (codes, pruning masks, group scales) at "
        "most this share of their 16-bit bytes, e.g. 0.3",
        _between(0.01, 1.0),
    )
    sparsity: float = opt(
        0.0, "average share of those weights pruned (smallest magnitudes, row by row)", _between(0.0, 0.95)
    )
    bits_choices: list[int] = opt(
        [2, 3, 4, 8], "bit widths a layer may get (16: left uncompressed)", _bit_widths
    )
    sparsity_choices: list[float] = opt(
        [0.0, 0.25, 0.5], "pruning ratios a layer may get (only 0 is used unless sparsity > 0)", _sparsities
    )
    group_size: int = opt(
        64,
        "consecutive weights of a row sharing one scale and minimum: smaller is finer, more bytes",
        _positive,
    )
    calibration_batches: int = opt(
        4, "training micro-batches each layer's sensitivity is measured on", _positive
    )
    policy: str | None = opt(
        None, "a saved policy (luc_policy.json of an earlier run or of `tiertune plan`) to use as it is"
    )


def _layer_counts(v: list[int]) -> str | None:
    ok = all(e >= 1 for e in v) and v == sorted(set(v))
    return None if ok else "must be increasing layer counts >= 1, e.g. [2, 4, 6]; [] for every quarter"


@dataclass
class DepthConfig:
    exits: list[int] = opt(
        [],
        "layer counts after which an exit head sits (the model's own head, after the last layer, is always "
        "the last exit); [] : after each quarter of the layers. Window k = the layers between exits k-1 and k",
        _layer_counts,
    )
    heads: Literal["cloned", "shared"] = opt(
        "cloned",
        "cloned: each exit its own trained copy of the final norm and LM head; shared: every exit uses the "
        "model's final norm and LM head, which then train",
    )
    schedule: Literal["round_robin", "random"] = opt(
        "round_robin", "which window a step trains: in turn, or drawn from tuning.depth.seed"
    )
    steps_per_window: int = opt(1, "steps before the schedule moves to the next window", _positive)
    vote: Literal["fitted", "mean_probs", "max_confidence"] = opt(
        "fitted",
        "how the exits answer at evaluation and generation: fitted, a mixture of their distributions with "
        "weights fitted (maximum likelihood) on tuning.depth.calibration_batches training batches before "
        "each evaluation; mean_probs, the plain average of their distributions; or per token the most "
        "confident exit",
    )
    calibration_batches: int = opt(
        4, "vote=fitted: training batches the exits' weights are fitted on", _positive
    )
    seed: int = opt(0, "seed of the random schedule", _seed_range)


def _s2a_modules(v: list[str]) -> str | None:
    return (
        None
        if set(v) <= {"bias", "prompt", "side"}
        else "must name activation modules among bias, prompt and side"
    )


@dataclass
class S2AConfig:
    modules: list[str] = opt(
        ["side"],
        "what tuning.method=s2a trains instead of the weights: bias (a zero-initialised bias on every "
        "linear of every layer), prompt (tuning.s2a.prompt_length trainable vectors inserted into the sequence after "
        "the embeddings), side (a narrow side network fed each layer's detached output, added to "
        "the final hidden state: backward never enters the backbone, the backbone keeps nothing for it)",
        _s2a_modules,
    )
    side_dim: int = opt(64, "width of the side network", _positive)
    prompt_length: int = opt(
        16, "prompt: how many trainable vectors are inserted after the embeddings", _positive
    )
    lora_input_bits: int = opt(
        16,
        "8: LoRA's A linears keep their inputs in 8 bits for backward (lora, luc_lora, depth)",
        lambda v: None if v in (8, 16) else "must be 16 (as they come) or 8",
    )
    quantize_activations: bool | None = opt(
        None,
        "SiLU/GELU and attention's softmax keep 4 bits an element for backward, and LayerNorm/RMSNorm their "
        "normalized input in tuning.s2a.norm_bits (the forward stays exact); default: on for s2a, off for "
        "lora, luc_lora and depth, where it can be switched on",
    )
    norm_bits: int = opt(
        8,
        "with quantize_activations: what LayerNorm and RMSNorm keep for backward, their normalized input in "
        "8 bits (per-row scale) or 16 (as it comes)",
        lambda v: None if v in (8, 16) else "must be 8 or 16 (as it comes)",
    )
    qkv_bits: int = opt(
        16,
        "with quantize_activations: 8 keeps attention's q, k and v in 8 bits for backward (per-row scale), "
        "16 as they come",
        lambda v: None if v in (8, 16) else "must be 16 (as they come) or 8",
    )


@dataclass
class TuningConfig:
    method: Literal["full", "lora", "luc_lora", "depth", "s2a"] = opt(
        "full",
        "full: train every weight; lora: train adapters only; luc_lora: adapters over a base compressed "
        "layer by layer (tuning.luc.*), which the offload engine keeps and moves compressed; depth: adapters "
        "trained a window of layers at a time through exit heads that vote at evaluation (tuning.depth.*); "
        "s2a: activation modules instead of the weights, activations kept in 4 bits for backward "
        "(tuning.s2a.*)",
    )
    lora: LoraConfig = field(default_factory=LoraConfig)
    luc: LucConfig = field(default_factory=LucConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    s2a: S2AConfig = field(default_factory=S2AConfig)


@dataclass
class TrainConfig:
    max_steps: int = opt(400, "optimizer steps in the whole run (resuming counts the steps done)", _positive)
    micro_batch_size: int = opt(8, "sequences per forward/backward", _positive)
    grad_accum_steps: int = opt(
        1, "micro-batches per optimizer step; the loss is the token mean over all of them", _positive
    )
    seed: int = opt(0, "seeds model init, data split and order, dropout", _seed_range)
    dtype: Literal["fp32", "bf16", "bf16-autocast"] = opt(
        "fp32",
        "bf16: weights (and the bytes that move them) in bf16, fp32 master weights with the optimizer "
        "state, gradients summed in fp32; bf16-autocast: fp32 weights, matmuls in bf16 (more memory "
        "and traffic, closer to fp32)",
    )
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto: cuda when available, else cpu")
    trace: bool = opt(
        False,
        "write <output_dir>/trace.json (Chrome trace: compute, copies, NVMe reads and writes; open in "
        "ui.perfetto.dev) and memory.png (bytes per tier over time)",
    )
    activation_checkpointing: bool = opt(
        False, "keep only each decoder layer's input and recompute the rest in backward (less memory)"
    )
    checkpoint_every: int = opt(
        100, "save a checkpoint every N steps and at the end; 0 saves none", _non_negative
    )
    keep_checkpoints: int = opt(2, "complete checkpoints kept; older ones are deleted", _positive)
    resume: Literal["auto", "never"] = opt(
        "auto",
        "auto: continue from the latest complete checkpoint in output_dir; never: start "
        "fresh (refused if output_dir already holds checkpoints)",
    )
    eval_every: int = opt(100, "eval loss every N steps and at the end; 0 only at the end", _non_negative)
    eval_max_batches: int = opt(
        16, "cap on eval batches per evaluation; 0 evaluates the whole split", _non_negative
    )
    eval_exact_match_samples: int = opt(
        32,
        "held-out prompt/completion examples answered greedily at the end and scored by exact match; 0 skips",
        _non_negative,
    )
    log_every: int = opt(10, "steps between progress lines when the bar is off", _positive)
    tensorboard: Literal["auto", "on", "off"] = opt(
        "auto",
        "also write each step's metrics as TensorBoard scalars into <output_dir>/tensorboard; auto: when "
        "the tensorboard package is installed",
    )
    progress: Literal["auto", "bar", "lines", "off"] = opt(
        "auto", "auto: a bar on a terminal, lines otherwise"
    )


@dataclass
class OptimConfig:
    name: Literal["adamw"] = opt("adamw", "optimizer (torch AdamW, fused where the device has it)")
    lr: float = opt(2e-3, "peak learning rate", _positive)
    weight_decay: float = opt(
        0.0, "decoupled weight decay, on matrices only (not norms/biases)", _non_negative
    )
    betas: list[float] = opt([0.9, 0.95], "Adam moment decay rates", _betas)
    eps: float = opt(1e-8, "Adam denominator epsilon", _positive)
    max_grad_norm: float = opt(1.0, "clip the global gradient L2 norm to this; 0 disables", _non_negative)
    schedule: Literal["cosine", "linear", "constant"] = opt(
        "cosine", "decay after warmup, down to lr * min_lr_ratio at max_steps"
    )
    warmup_steps: int | None = opt(
        None,
        f"steps of linear warmup from 0 to lr; default {WARMUP_SHARE:.0%} of train.max_steps",
        _non_negative,
    )
    min_lr_ratio: float = opt(0.1, "final lr as a share of lr", _between(0.0, 1.0))
    kernel: Literal["auto", "torch", "native", "deepspeed"] = opt(
        "auto",
        "CPU AdamW kernel for offloaded state: torch (fused; equals torch.optim.AdamW bit for bit), native "
        "(C compiled on first use, equal to torch's bit for bit; writes bf16 weights in the same pass), "
        "deepspeed (its CPU Adam; compiled on first use) or auto: the fastest as `tiertune probe` measured "
        "them, else native where a C compiler builds it, else torch",
    )
    interleave: bool = opt(
        True,
        "on an accelerator, update some blocks whose state is in host memory on it (state copied over and "
        "back) while the CPU updates the others, as a model of both sides' speed plans each step",
    )
    overlap: Literal["backward", "forward", "none"] = opt(
        "backward",
        "when offloaded state is updated: backward: each block as soon as its gradients are complete, "
        "speculatively (undone and redone if the step then clips or skips; needs spare host memory for "
        "the undo copies, 12 bytes a parameter, and after a step that clipped the next waits for its "
        "forward); forward: each block just before its next forward; none: all after backward",
    )

    def warmup_for(self, max_steps: int) -> int:
        """``warmup_steps``, or its default for a run of ``max_steps``."""
        return self.warmup_steps if self.warmup_steps is not None else round(WARMUP_SHARE * max_steps)


@dataclass
class MemoryConfig:
    device_budget_gib: float | Literal["auto"] = opt(
        "auto",
        "bytes the job may hold on the accelerator; auto: its memory less a reserve (on a machine "
        "without one, the device tier is host memory and shares the host budget)",
        _budget,
    )
    host_budget_gib: float | Literal["auto"] = opt(
        "auto",
        "host DRAM the job may hold (local NUMA nodes); auto: available memory less a reserve",
        _budget,
    )
    cxl_budget_gib: float | Literal["auto"] = opt(
        "auto",
        "memory the job may hold on CXL (CPU-less NUMA) nodes; auto: what those nodes have free",
        _budget,
    )
    cxl_nodes: list[int] | Literal["auto"] = opt(
        "auto", "NUMA node ids to use as the CXL tier; auto: every CPU-less node with memory", _node_ids
    )
    malloc_mmap_threshold_mib: float | Literal["auto"] = opt(
        "auto",
        "host allocations of at least this many MiB get their own mappings, given back when freed (glibc's "
        "mallopt); 0: leave the allocator as it is (glibc keeps freed blocks of up to 32 MiB); auto: 1 when "
        "the job is short of host memory (its plan puts state on NVMe and fills at least half the host "
        "budget), else 0",
        _mmap_threshold,
    )


Placement = Literal["auto", "device", "host", "cxl", "nvme"]


def _depth(v: int | str) -> str | None:
    return None if v == "auto" or 0 <= v <= 16 else "must be between 0 and 16, or auto"


@dataclass
class OffloadConfig:
    params: Placement = opt("auto", "home tier of the weights; auto: the planner decides per block")
    grads: Placement = opt("auto", "home tier of the gradients (kept in fp32 away from the device)")
    optimizer: Placement = opt("auto", "home tier of the optimizer state (moments, fp32 master weights)")
    prefetch_depth: int | Literal["auto"] = opt(
        "auto",
        "blocks fetched ahead of the one computing; more hides slower tiers, costs a buffer each",
        _depth,
    )
    nvme_dir: list[str] = opt(
        [], "directories for the NVMe tier, one per drive (striped); [] : a directory under output_dir"
    )
    io_backend: Literal["threads", "deepspeed"] = opt(
        "threads",
        "NVMe I/O: threads (built in: O_DIRECT preadv/pwritev on a thread pool) or deepspeed (its libaio "
        "async_io op: needs libaio-dev, compiled on first use, a few minutes once)",
    )
    machine_profile: str | None = opt(
        None,
        "machine profile from `tiertune probe` for step-time predictions; default: the probe's "
        "default path when it exists, else conservative built-in figures",
    )


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    output_dir: str | None = opt(None, "where checkpoints and metrics go; default a new runs/<time>-<model>")
    deepspeed: str | None = opt(
        None,
        "a DeepSpeed JSON config (ds_config.json) read as this job's keys: its zero_optimization offload "
        "sections, batch, clipping, precision, optimizer and scheduler (`tiertune validate --deepspeed FILE` "
        "shows what maps); the job's own keys win",
    )

    def cross_problems(self) -> list[str]:
        """Problems that involve more than one key (single-key checks live in field metadata)."""
        problems = []
        if self.model.preset is not None and self.model.path is not None:
            problems.append("model.preset and model.path are both set; set exactly one")
        if self.model.labels and self.model.task != "sequence_classification":
            problems.append("model.labels: only a sequence_classification head has labels; drop them")
        if len(set(self.model.labels)) != len(self.model.labels) or len(self.model.labels) == 1:
            problems.append("model.labels: must be two or more distinct class names")
        if self.model.task == "sequence_classification" and self.tuning.method == "depth":
            problems.append(
                "tuning.method: depth's exits are language-model heads; with model.task="
                "sequence_classification use full, lora, luc_lora or s2a"
            )
        if self.tuning.lora.export_merged and self.tuning.method not in ("lora", "luc_lora"):
            problems.append(
                f"tuning.lora.export_merged: merges LoRA adapters into the base, which tuning.method="
                f"{self.tuning.method} does not train; use lora or luc_lora, or drop export_merged"
            )
        if self.optim.warmup_steps is not None and self.optim.warmup_steps > self.train.max_steps:
            problems.append(
                f"optim.warmup_steps: {self.optim.warmup_steps} is more than train.max_steps "
                f"({self.train.max_steps}); lower it, e.g. optim.warmup_steps={self.train.max_steps // 10}"
            )
        return problems
