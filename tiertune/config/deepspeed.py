"""DeepSpeed configs, both ways: a ``ds_config.json`` read as a job's keys, and a job written as one.

:func:`from_deepspeed` maps what a DeepSpeed config says about the training itself onto this project's
keys: where ZeRO offloads the weights and the optimizer state (``zero_optimization.offload_param`` and
``offload_optimizer``: ``cpu`` is the host tier, ``nvme`` the NVMe tier and its ``nvme_path`` the store's
directory), the batch (micro-batch, accumulation), clipping, precision, the AdamW hyperparameters and
the warmup schedules. DeepSpeed's own tuning knobs (bucket sizes, buffer counts, prefetch sizes, its
async I/O settings) are left to tiertune, which sizes its own; they are listed as such. Anything that
would change the training and has no equivalent here (fp16 loss scaling, another optimizer, a log
warmup, quantized ZeRO, ...) is refused with the reason, as is an unknown key. ``"auto"`` (the value
HuggingFace's integration fills in) leaves tiertune's default.

:func:`to_deepspeed` writes a job as the DeepSpeed config that trains it the same way under ZeRO-3, for
those who need DeepSpeed itself. A config mapped and written back gives the same values for every key
that was mapped (``tests/test_deepspeed_config.py`` does it for ``examples/deepspeed/``).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiertune.errors import ConfigError

# Placements: DeepSpeed's offload devices and this project's tiers.
_TIER = {"cpu": "host", "nvme": "nvme"}
_DEVICE = {"host": "cpu", "cxl": "cpu", "nvme": "nvme"}

# Keys that only tune how DeepSpeed itself runs or reports, with what tiertune does instead.
_OWN_IO = "left to tiertune (its NVMe store does its own O_DIRECT I/O; `tiertune probe` measures it)"
_OWN_LOGS = "left to tiertune (metrics.jsonl every step, progress every train.log_every, train.trace)"
_OWN_MATH = "left to tiertune (gradients are summed and reduced in fp32)"
_TUNING = {
    "steps_per_print": _OWN_LOGS,
    "wall_clock_breakdown": _OWN_LOGS,
    "dump_state": _OWN_LOGS,
    "memory_breakdown": _OWN_LOGS,
    "flops_profiler": _OWN_LOGS,
    "comms_logger": _OWN_LOGS,
    "wandb": _OWN_LOGS,
    "csv_monitor": _OWN_LOGS,
    "prescale_gradients": _OWN_MATH,
    "gradient_predivide_factor": _OWN_MATH,
    "communication_data_type": _OWN_MATH,
    "seq_parallel_communication_data_type": _OWN_MATH,
    "sparse_gradients": _OWN_MATH,
    "zero_allow_untested_optimizer": "left to tiertune (its own AdamW)",
    "zero_force_ds_cpu_optimizer": "left to tiertune (its own AdamW: optim.kernel)",
    "checkpoint": "left to tiertune (train.checkpoint_every; checkpoints resume on any number of ranks)",
    "aio": _OWN_IO,
    "activation_checkpointing": "left to tiertune (train.activation_checkpointing=true is its own)",
}
_ZERO_TUNING = {
    "overlap_comm",
    "contiguous_gradients",
    "reduce_scatter",
    "allgather_partitions",
    "allgather_bucket_size",
    "reduce_bucket_size",
    "sub_group_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save",
    "gather_16bit_weights_on_model_save",
    "round_robin_gradients",
    "elastic_checkpoint",
    "load_from_fp32_weights",
    "ignore_unused_parameters",
    "memory_efficient_linear",
    "zero_hpz_partition_size",
    "mics_shard_size",
    "log_trace_cache_warnings",
    "use_multi_rank_bucket_allreduce",
    "prefetch_bucket_size",
    "param_persistence_threshold",
    "max_live_parameters",
    "max_reuse_distance",
}
_OFFLOAD_TUNING = {"pin_memory", "buffer_count", "buffer_size", "max_in_cpu", "fast_init", "pipeline_read",
                   "pipeline_write", "super_offload", "cpuadam_cores_perc"}  # fmt: skip
# DeepSpeed features that change what is trained and have no equivalent here.
_REFUSED = {
    "fp16": "fp16 with loss scaling is not supported: use bf16 (bf16.enabled)",
    "amp": "apex amp is not supported: use bf16 (bf16.enabled)",
    "elasticity": "elastic batch sizes are not supported: set the batch",
    "compression_training": "compression training is not supported (tuning.method=luc_lora compresses the base)",
    "curriculum_learning": "curriculum learning is not supported",
    "data_efficiency": "data efficiency (sampling, routing) is not supported",
    "moe": "mixture of experts is not supported",
    "pipeline": "pipeline parallelism is not supported: tiertune shards every block over the ranks",
    "sparse_attention": "sparse attention is not supported",
    "quantize_training": "quantized training is not supported",
    "autotuning": "autotuning is not supported: `tiertune plan` shows where the state goes",
    "tensor_parallel": "tensor parallelism is not supported",
}
_KNOWN_TOP = (
    {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "bf16",
        "bfloat16",
        "optimizer",
        "scheduler",
        "zero_optimization",
        "tensorboard",
        "data_types",
    }
    | set(_TUNING)
    | set(_REFUSED)
)


@dataclass
class Mapping:
    """What a DeepSpeed config says, in this project's keys: ``values`` (dotted key -> value), what mapped
    (``mapped``: DeepSpeed key, tiertune key, value), what was left to tiertune (``left``: key, why) and
    what cannot be mapped (``problems``)."""

    values: dict[str, Any] = field(default_factory=dict)
    mapped: list[tuple[str, str, Any]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def set(self, ds_key: str, key: str, value: Any) -> None:
        if key in self.values and self.values[key] != value:
            self.problems.append(
                f"{ds_key}: {value!r} contradicts {self.values[key]!r} for {key} (from another key); "
                "make them agree"
            )
            return
        self.values[key] = value
        self.mapped.append((ds_key, key, value))

    def tree(self) -> dict[str, Any]:
        """``values`` as the nested mapping a config file holds."""
        out: dict[str, Any] = {}
        for key, value in self.values.items():
            node = out
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return out

    def left_by_reason(self) -> list[tuple[list[str], str]]:
        """The keys left to tiertune, those with one reason together (in the order first seen)."""
        groups: dict[str, list[str]] = {}
        for key, why in self.left:
            groups.setdefault(why, []).append(key)
        return [(keys, why) for why, keys in groups.items()]


def read_deepspeed(path: str | Path) -> dict[str, Any]:
    """The JSON object a DeepSpeed config file holds."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"deepspeed: {str(path)!r} does not exist; check the path"]) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError([f"deepspeed: cannot read {str(path)!r} as JSON ({e})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"deepspeed: {str(path)!r} holds a {type(data).__name__}, not a JSON object"])
    return data


def from_deepspeed(ds: dict[str, Any], ranks: int = 1) -> Mapping:
    """Map a DeepSpeed config (see the module docstring); ``ranks`` checks ``train_batch_size``."""
    m = Mapping()
    for key in ds:
        if key not in _KNOWN_TOP:
            m.problems.append(_unknown(key, _KNOWN_TOP))
        elif key in _REFUSED and _in_use(ds[key]):
            m.problems.append(f"{key}: {_REFUSED[key]}")
        elif key in _REFUSED:
            m.left.append((key, "not enabled"))
        elif key in _TUNING:
            m.left.append((key, _TUNING[key]))
    _batch(ds, m, ranks)
    if not _auto(ds.get("gradient_clipping")) and "gradient_clipping" in ds:
        m.set("gradient_clipping", "optim.max_grad_norm", float(ds["gradient_clipping"]))
    for key in ("bf16", "bfloat16"):
        if isinstance(ds.get(key), dict) and _enabled(ds[key]):
            m.set(f"{key}.enabled", "train.dtype", "bf16")
        elif isinstance(ds.get(key), dict) and _auto(ds[key].get("enabled")):
            m.left.append((f"{key}.enabled", _AUTO))
    types = ds.get("data_types", {})
    if isinstance(types, dict) and types.get("grad_accum_dtype") not in (None, "fp32"):
        m.problems.append("data_types.grad_accum_dtype: gradients are summed in fp32 here; set it to fp32")
    _optimizer(ds.get("optimizer"), m)
    _scheduler(ds.get("scheduler"), m)
    _zero(ds.get("zero_optimization"), m)
    board = ds.get("tensorboard")
    if isinstance(board, dict) and _enabled(board):
        m.set("tensorboard.enabled", "train.tensorboard", "on")
    return m


def _batch(ds: dict[str, Any], m: Mapping, ranks: int) -> None:
    micro, accum, total = (ds.get(k) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"))  # fmt: skip
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):  # fmt: skip
        if _auto(ds.get(key)):
            m.left.append((key, _AUTO))
    micro, accum, total = (None if _auto(v) else v for v in (micro, accum, total))
    if accum is not None:
        m.set("gradient_accumulation_steps", "train.grad_accum_steps", int(accum))
    if micro is not None:
        m.set("train_micro_batch_size_per_gpu", "train.micro_batch_size", int(micro))
    if total is None:
        return
    steps = int(accum or 1)
    if micro is None:  # DeepSpeed derives it: train_batch_size = micro x accumulation x ranks
        if total % (steps * ranks):
            m.problems.append(
                f"train_batch_size: {total} rows is not a whole number of micro-batches over "
                f"gradient_accumulation_steps={steps} and {ranks} rank(s)"
            )
        else:
            m.set("train_batch_size", "train.micro_batch_size", total // (steps * ranks))
    elif int(micro) * steps * ranks != total:
        m.problems.append(
            f"train_batch_size: {total} is not train_micro_batch_size_per_gpu x gradient_accumulation_steps "
            f"x ranks = {micro} x {steps} x {ranks}; make them agree (or drop train_batch_size)"
        )


def _optimizer(opt: Any, m: Mapping) -> None:
    if opt is None:
        return
    kind = str(opt.get("type", "")).lower() if isinstance(opt, dict) else ""
    if kind not in ("adam", "adamw"):
        m.problems.append(
            f"optimizer.type: {opt.get('type') if isinstance(opt, dict) else opt!r} is not supported: "
            "tiertune trains with AdamW (optimizer.type AdamW)"
        )
        return
    params = opt.get("params", {}) or {}
    if kind == "adam" and params.get("adam_w_mode") is False:
        m.problems.append("optimizer.params.adam_w_mode: false is Adam with L2 decay; tiertune's is AdamW")
    for key, flag in (("amsgrad", True), ("bias_correction", False)):
        if params.get(key) is flag:
            m.problems.append(
                f"optimizer.params.{key}: {flag} is not supported (AdamW as torch.optim has it)"
            )
    for key, target in (("lr", "optim.lr"), ("eps", "optim.eps"), ("weight_decay", "optim.weight_decay"), ("betas", "optim.betas")):  # fmt: skip
        if _auto(params.get(key)):
            m.left.append((f"optimizer.params.{key}", _AUTO))
        elif key == "betas":
            m.set("optimizer.params.betas", target, [float(b) for b in params[key]])
        elif key in params:
            m.set(f"optimizer.params.{key}", target, float(params[key]))
    for key in set(params) - {"lr", "eps", "weight_decay", "betas", "adam_w_mode", "amsgrad", "bias_correction", "torch_adam", "fused"}:  # fmt: skip
        m.problems.append(_unknown(f"optimizer.params.{key}", {"lr", "betas", "eps", "weight_decay"}))


_SCHEDULES = {"WarmupCosineLR": "cosine", "WarmupDecayLR": "linear", "WarmupLR": "constant"}


def _scheduler(sched: Any, m: Mapping) -> None:
    if sched is None:
        return
    kind = sched.get("type") if isinstance(sched, dict) else sched
    if kind not in _SCHEDULES:
        m.problems.append(
            f"scheduler.type: {kind!r} is not supported; tiertune's schedules are warmup then cosine, "
            f"linear or constant: {', '.join(_SCHEDULES)}"
        )
        return
    params = sched.get("params", {}) or {}
    m.set("scheduler.type", "optim.schedule", _SCHEDULES[kind])
    if params.get("warmup_type", "log") != "linear" and params.get("warmup_num_steps", 1000) not in (
        0,
        "auto",
    ):
        m.problems.append(
            "scheduler.params.warmup_type: DeepSpeed warms up logarithmically unless told otherwise; "
            "tiertune's warmup is linear: set warmup_type to linear"
        )
    for key in ("warmup_min_lr", "warmup_min_ratio"):
        if params.get(key) not in (None, 0, 0.0, "auto"):
            m.problems.append(f"scheduler.params.{key}: tiertune's warmup starts from 0; set it to 0")
    steps = params.get("warmup_num_steps")
    if steps is not None and not _auto(steps):
        m.set("scheduler.params.warmup_num_steps", "optim.warmup_steps", int(steps))
    total = params.get("total_num_steps")
    if total is not None and not _auto(total):
        m.set("scheduler.params.total_num_steps", "train.max_steps", int(total))
    peak = params.get("warmup_max_lr")
    if peak is not None and not _auto(peak):
        m.set("scheduler.params.warmup_max_lr", "optim.lr", float(peak))
    if kind == "WarmupCosineLR" and not _auto(params.get("cos_min_ratio", 0.0001)):
        m.set(
            "scheduler.params.cos_min_ratio", "optim.min_lr_ratio", float(params.get("cos_min_ratio", 0.0001))
        )
    if kind == "WarmupDecayLR":  # down to 0 at total_num_steps
        m.set("scheduler.type", "optim.min_lr_ratio", 0.0)
    known = {"warmup_num_steps", "total_num_steps", "warmup_max_lr", "warmup_min_lr", "warmup_min_ratio",
             "warmup_type", "cos_min_ratio", "last_batch_iteration"}  # fmt: skip
    for key in set(params) - known:
        m.problems.append(_unknown(f"scheduler.params.{key}", known))


def _zero(zero: Any, m: Mapping) -> None:
    if zero is None:
        return
    if not isinstance(zero, dict):
        m.problems.append(f"zero_optimization: expected an object, got {zero!r}")
        return
    stage = zero.get("stage", 0)
    m.left.append(
        (
            f"zero_optimization.stage={stage}",
            "tiertune shards the weights, gradients and optimizer state of every block over the ranks "
            "(stage 3's partitioning) whatever the stage: the same training",
        )
    )
    paths = []
    for section, kind in (("offload_param", "params"), ("offload_optimizer", "optimizer")):
        off = zero.get(section)
        if off is None:
            continue
        if not isinstance(off, dict):
            m.problems.append(f"zero_optimization.{section}: expected an object, got {off!r}")
            continue
        device = off.get("device", "none")
        if section == "offload_param" and device != "none" and stage != 3:
            m.problems.append(
                f"zero_optimization.offload_param: DeepSpeed offloads weights only at stage 3 (this config "
                f"says {stage}); set stage 3 or drop offload_param"
            )
        if device in _TIER:
            m.set(f"zero_optimization.{section}.device", f"offload.{kind}", _TIER[device])
        elif device != "none":
            m.problems.append(f"zero_optimization.{section}.device: {device!r}; expected cpu, nvme or none")
        if device == "nvme":
            if not off.get("nvme_path"):
                m.problems.append(f"zero_optimization.{section}.nvme_path: needed with device nvme")
            elif off["nvme_path"] not in paths:
                paths.append(str(off["nvme_path"]))
        ratio = off.get("ratio", 1.0)
        if ratio != 1.0:
            m.problems.append(
                f"zero_optimization.{section}.ratio: {ratio}: a partial offload; tiertune's planner places each "
                "block whole (offload.optimizer=auto lets it choose by the budgets)"
            )
        extra = set(off) - {"device", "nvme_path", "ratio"} - _OFFLOAD_TUNING
        m.problems += [
            _unknown(f"zero_optimization.{section}.{k}", {"device", "nvme_path", "ratio"}) for k in extra
        ]
        for key in sorted(set(off) & _OFFLOAD_TUNING):
            m.left.append(
                (f"zero_optimization.{section}.{key}", "left to tiertune (its own staging buffers)")
            )
    if paths:
        m.set("zero_optimization.*.nvme_path", "offload.nvme_dir", paths)
    if zero.get("cpu_offload") is True:  # the old spelling of offload_optimizer.device=cpu
        m.set("zero_optimization.cpu_offload", "offload.optimizer", "host")
    for key in ("zero_quantized_weights", "zero_quantized_gradients", "zero_quantized_nontrainable_weights"):
        if zero.get(key):
            m.problems.append(f"zero_optimization.{key}: quantized ZeRO changes the numbers; not supported")
    known = {"stage", "offload_param", "offload_optimizer", "cpu_offload", "zero_quantized_weights",
             "zero_quantized_gradients", "zero_quantized_nontrainable_weights"} | _ZERO_TUNING  # fmt: skip
    for key in zero:
        if key not in known:
            m.problems.append(_unknown(f"zero_optimization.{key}", known))
        elif key in _ZERO_TUNING:
            m.left.append(
                (f"zero_optimization.{key}", "left to tiertune (it gathers and reduces block by block)")
            )


def _in_use(section: Any) -> bool:
    """A feature's section that is there and not switched off (``enabled`` false, or HF's ``auto``)."""
    return not (isinstance(section, dict) and section.get("enabled", True) in (False, "auto"))


_AUTO = "auto: the job's own value"


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and section.get("enabled", False) not in (False, "auto")


def _auto(value: Any) -> bool:
    return value == "auto"


def _unknown(key: str, known: set[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: not a DeepSpeed key this project knows{hint}"


# -- a job as a DeepSpeed config ---------------------------------------------------------------------


def to_deepspeed(cfg: Any, placement: Callable[[str], str] | None = None) -> dict[str, Any]:
    """The DeepSpeed config that trains ``cfg`` (a JobConfig) the same way under ZeRO-3. ``placement``
    resolves an ``auto`` placement (``params`` or ``optimizer``) to a tier (the plan's); without it,
    ``auto`` leaves the state on the device."""
    t, o = cfg.train, cfg.optim
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": o.max_grad_norm,
        "bf16": {"enabled": t.dtype == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
        },
    }
    schedule = {v: k for k, v in _SCHEDULES.items()}[o.schedule]
    params: dict[str, Any] = {"warmup_num_steps": o.warmup_for(t.max_steps), "warmup_type": "linear"}
    if o.schedule == "cosine":
        params.update(total_num_steps=t.max_steps, cos_min_ratio=o.min_lr_ratio, warmup_min_ratio=0.0)
    else:
        params.update(warmup_min_lr=0.0, warmup_max_lr=o.lr)
        if o.schedule == "linear":
            params["total_num_steps"] = t.max_steps
            if o.min_lr_ratio != 0:
                raise ConfigError(
                    [
                        f"optim.min_lr_ratio: {o.min_lr_ratio}: DeepSpeed's linear decay (WarmupDecayLR) ends "
                        "at 0; set optim.min_lr_ratio=0 or optim.schedule=cosine to export this job"
                    ]
                )
    ds["scheduler"] = {"type": schedule, "params": params}
    zero: dict[str, Any] = {"stage": 3}
    nvme_path = cfg.offload.nvme_dir[0] if cfg.offload.nvme_dir else None
    for kind, section in (("params", "offload_param"), ("optimizer", "offload_optimizer")):
        tier = getattr(cfg.offload, kind)
        if tier == "auto" and placement is not None:
            tier = placement(kind)
        device = _DEVICE.get(tier, "none")
        zero[section] = {"device": device}
        if device == "nvme":
            if nvme_path is None:
                raise ConfigError(
                    [
                        f"offload.nvme_dir: DeepSpeed needs an nvme_path for offload.{kind}=nvme; set offload.nvme_dir"
                    ]
                )
            zero[section]["nvme_path"] = nvme_path
    ds["zero_optimization"] = zero
    return ds
