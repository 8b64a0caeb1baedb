"""``tiertune plan``: the placement of a job's state across the tiers, without allocating the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from tiertune.config import JobConfig
from tiertune.errors import ConfigError
from tiertune.launch.models import WEIGHT_DTYPES, build_model, cast_parameters, hf_config
from tiertune.launch.rundir import RUNS_ROOT
from tiertune.memory import Budgets, Kind, Tier, format_bytes, resolve_budgets
from tiertune.memory.profile import DEFAULT_PROFILE, MachineProfile
from tiertune.offload import Block, find_blocks
from tiertune.offload.planner import BlockShape, Plan, activation_bytes_estimate, plan_placement
from tiertune.tuning import get_method
from tiertune.tuning.luc import Policy, compress_layers

NVME_RESERVE = 0.05  # of each filesystem's free space, left for the run's checkpoints and the system


def nvme_dirs(cfg: JobConfig) -> list[Path]:
    """The NVMe tier's directories: ``offload.nvme_dir``, else the job's output directory (where training
    would put its store), else ./runs, where a default output directory goes."""
    if cfg.offload.nvme_dir:
        missing = [d for d in cfg.offload.nvme_dir if not Path(d).is_dir()]
        if missing:
            raise ConfigError(
                [f"offload.nvme_dir: {', '.join(missing)} does not exist; create it or fix the path"]
            )
        return [Path(d) for d in cfg.offload.nvme_dir]
    return [Path(cfg.output_dir) if cfg.output_dir else RUNS_ROOT]


def nvme_free_bytes(dirs: list[Path]) -> int:
    """Usable space of the NVMe directories: free space less a reserve, each filesystem counted once."""
    seen: dict[int, int] = {}
    for d in dirs:
        while not d.exists():  # an output directory not made yet lands on its nearest parent's filesystem
            d = d.parent if d.parent != d else Path.cwd()
        seen.setdefault(d.stat().st_dev, int(shutil.disk_usage(d).free * (1 - NVME_RESERVE)))
    return sum(seen.values())


def plan_job(cfg: JobConfig, luc: Policy | None = None) -> Plan:
    """Plan ``cfg``: the model is built on the meta device, so a 70B job plans in a second (``luc``: with
    its base compressed by that policy)."""
    model = get_method(cfg.tuning.method).apply(
        build_model(cfg.model, seed=cfg.train.seed, device="meta"), cfg.tuning
    )
    if luc is not None:
        compress_layers(model, luc, WEIGHT_DTYPES[cfg.train.dtype])
    cast_parameters(model, WEIGHT_DTYPES[cfg.train.dtype])
    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    return plan_model(cfg, model, resolve_budgets(cfg.memory, device), nvme_free_bytes(nvme_dirs(cfg)))


def machine_profile(cfg: JobConfig) -> MachineProfile | None:
    """The profile ``offload.machine_profile`` names, else the probe's default one if it exists."""
    path = Path(cfg.offload.machine_profile) if cfg.offload.machine_profile else DEFAULT_PROFILE
    return MachineProfile.load(path) if (cfg.offload.machine_profile or path.exists()) else None


def tied_gradient_bytes(model: nn.Module, blocks: list[Block], accumulating: bool, shards: int = 1) -> int:
    """What backward holds outside the homes for trained weights that two modules share (a tied embedding
    and LM head), beyond the one block's gradients the planner reserves for backward anyway. The block
    optimizer takes a gradient per use (:mod:`tiertune.optim.tied`): the head's goes into the gradient
    home at once when the home's slice is empty (fp32, one rank, a step's first micro-batch: nothing
    more), else it is kept until the embedding's arrives: one tensor the weight's size. (Autograd alone
    would hold three: measured on llama-3b, the process's resident set rose by 4.5 GiB at the end of
    each backward before the gradient per use.)"""
    total = 0
    for b in blocks:
        for name in b.tied:  # the second module's name of the shared parameter
            p = model.get_parameter(name)
            if p.requires_grad and (accumulating or shards > 1 or p.dtype != torch.float32):
                total += p.numel() * p.element_size()
    return total


def plan_model(cfg: JobConfig, model: nn.Module, budgets: Budgets, nvme_bytes: int, shards: int = 1) -> Plan:
    """Plan ``model`` (on any device, meta included) for ``cfg`` under ``budgets``: one rank's share when
    the state is sharded over ``shards`` ranks."""
    blocks = find_blocks(model)
    shapes = [
        BlockShape(
            b.name,
            b.kind,
            b.numel,
            sum(p.numel() for p in b.params.values() if p.requires_grad),
            sum(b.nbytes_by_dtype().values()),  # a compressed (LUC) base: its codes and scales as stored
        )
        for b in blocks
    ]
    hf = getattr(model, "config", None) or hf_config(cfg.model)  # the model's own (the Trainer plugin's)
    hidden = getattr(hf, "hidden_size", None) or hf.n_embd
    layers = getattr(hf, "num_hidden_layers", None) or hf.n_layer
    ffn = getattr(hf, "intermediate_size", None) or 4 * hidden
    # Weights are kept and moved in their own dtype (bf16 weights have fp32 masters with the optimizer
    # state; bf16-autocast keeps fp32 weights); activations are saved in the compute dtype.
    weight_bytes = next(model.parameters()).element_size()
    compute_bytes = 4 if cfg.train.dtype == "fp32" else 2
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    profile = machine_profile(cfg)
    forced = {
        k: None if getattr(cfg.offload, k.value) == "auto" else Tier(getattr(cfg.offload, k.value))
        for k in (Kind.PARAMS, Kind.GRADS, Kind.OPTIMIZER)
    }
    depth = cfg.offload.prefetch_depth
    activations = activation_bytes_estimate(hidden, layers, ffn, hf.vocab_size, tokens, compute_bytes)
    activations += tied_gradient_bytes(model, blocks, cfg.train.grad_accum_steps > 1, shards)
    return plan_placement(
        shapes,
        budgets,
        nvme_bytes,
        compute_bytes=weight_bytes,
        activation_bytes=activations,
        tokens_per_step=tokens * cfg.train.grad_accum_steps,
        forced=forced,
        prefetch_depth=None if depth == "auto" else depth,
        profile=profile,
        shards=shards,
    )


def format_plan(plan: Plan, title: str) -> str:
    kinds = (Kind.PARAMS, Kind.GRADS, Kind.OPTIMIZER)
    rows: list[tuple[str, str, int]] = []  # runs of consecutive blocks with the same placement and sizes
    for b in plan.blocks:
        key = " ".join(f"{format_bytes(b.bytes[k]):>11} {b.home[k].value:>8}" for k in kinds)
        if (
            rows
            and rows[-1][1] == key
            and b.kind == "layer"
            and rows[-1][0].startswith(b.name.rsplit(".", 1)[0])
        ):
            rows[-1] = (rows[-1][0], key, rows[-1][2] + 1)
        else:
            rows.append((b.name, key, 1))
    labels = [name if count == 1 else f"{name} (+{count - 1} like it)" for name, _, count in rows]
    width = max(len(label) for label in labels) + 1
    lines = [title, f"{'blocks':{width}} " + " ".join(f"{k.value:>20}" for k in kinds)]
    lines += [f"{label:{width}} {key}" for label, (_, key, _) in zip(labels, rows)]
    lines.append("peak bytes per tier (budget):")
    for tier, peak in plan.peak_bytes.items():
        lines.append(f"  {tier.value:7} {format_bytes(peak):>11}  ({format_bytes(plan.budgets[tier])})")
    count, size = plan.window[1], plan.window[0]
    in_flight = f" ({count} x {format_bytes(size)} of weights in flight on the device)" if count else ""
    staging = ", ".join(f"{n} x {format_bytes(b)} {what}" for what, (b, n) in plan.buffers.items()) or "none"
    lines.append(f"prefetch depth {plan.prefetch_depth}{in_flight}; host staging buffers: {staging}")
    t = plan.step_time_s
    lines.append(
        f"predicted step, {plan.profile_source}: compute {t['compute']:.3g}s + weights I/O "
        f"{t['weights_io']:.3g}s + grads I/O {t['grads_io']:.3g}s + optimizer {t['optimizer']:.3g}s = "
        f"{t['total']:.3g}s (transfers and update not yet overlapped with compute)"
    )
    return "\n".join(lines)
