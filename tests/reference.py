"""A plain PyTorch training loop, written without tiertune's engine: the reference for equivalence tests.

It shares only the data pipeline (the same rows in the same order) and the model constructor (the same
seeded weights) with tiertune; the loss, accumulation, clipping, schedule and optimizer are spelled out
here with stock PyTorch, so a tiertune engine that trains "the same" must match it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tiertune.config import JobConfig
from tiertune.launch.data import BatchStream, build_splits
from tiertune.launch.models import cast_parameters, load_tokenizer, materialize, skeleton, weight_source
from tiertune.tuning import get_method
from tiertune.tuning.depth import controller_of


def reference_run(cfg: JobConfig) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train ``cfg`` (CPU) the textbook way; return per-step losses and the final trainable weights.

    fp32: the for-loop AdamW over the model's weights. bf16 (``train.dtype=bf16``): the usual mixed
    precision, spelled out: the model in bf16, an fp32 master of each weight that fused AdamW updates,
    each micro-batch's bf16 gradient added into the master's fp32 gradient, the weights copied from the
    masters after each step; the logits go to fp32 for the loss. The weights returned are the masters.
    """
    torch.manual_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.model)
    # The tuning method decides what trains (its modules and hooks are the model's, like peft's adapters).
    # Built as a job builds it: on the meta device, the method applied, then every weight made from its seed
    # (LoRA's adapters draw their initial values from the global RNG as they are made).
    model = get_method(cfg.tuning.method).apply(skeleton(cfg.model), cfg.tuning)
    materialize(model, weight_source(cfg.model, cfg.train.seed, model))
    depth = controller_of(model)
    mixed = cfg.train.dtype == "bf16"
    if mixed:
        cast_parameters(model, torch.bfloat16)
    classify = cfg.model.task == "sequence_classification"  # one label per row, padded rows with a mask
    rows = build_splits(cfg.data, tok, cfg.train.seed, labels=cfg.model.labels if classify else None).train
    stream = BatchStream(rows, cfg.train.micro_batch_size, cfg.train.seed)
    o = cfg.optim
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    masters = [torch.nn.Parameter(p.detach().float()) for p in params] if mixed else params
    decay = [m for m in masters if m.ndim >= 2]
    no_decay = [m for m in masters if m.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        **({"fused": True} if mixed else {"foreach": False}),
    )

    def lr(step: int) -> float:
        if step <= o.warmup_steps:
            return o.lr * step / o.warmup_steps
        progress = (step - o.warmup_steps) / (cfg.train.max_steps - o.warmup_steps)
        floor = o.lr * o.min_lr_ratio
        return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    losses = []
    for step in range(1, cfg.train.max_steps + 1):
        if depth is not None:
            depth.begin_step(step)
        batches = [stream.next_batch() for _ in range(cfg.train.grad_accum_steps)]
        if classify:
            n_targets = sum(len(b["labels"]) for b in batches)
        else:
            n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total = 0.0
        for b in batches:
            if classify:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = F.cross_entropy(logits.float(), b["labels"], reduction="sum")
            else:
                logits = model(input_ids=b["input_ids"]).logits
                loss = F.cross_entropy(
                    logits[:, :-1].float().flatten(0, 1),
                    b["labels"][:, 1:].flatten(),
                    ignore_index=-100,
                    reduction="sum",
                )
            (loss / n_targets).backward()
            total += loss.item()
            if mixed:  # the micro-batch's gradients, summed in fp32
                for p, m in zip(params, masters):
                    if p.grad is None:  # no gradient this step (another window's adapters): none for AdamW
                        continue
                    if m.grad is None:
                        m.grad = torch.zeros_like(m)
                    m.grad += p.grad.float()
                    p.grad = None
        torch.nn.utils.clip_grad_norm_(masters, o.max_grad_norm if o.max_grad_norm > 0 else math.inf)
        for group in opt.param_groups:
            group["lr"] = lr(step)
        opt.step()
        opt.zero_grad()
        if mixed:
            with torch.no_grad():
                for p, m in zip(params, masters):
                    p.copy_(m)
        losses.append(total / n_targets)
    return losses, {n: m.detach().clone() for (n, _), m in zip(named, masters)}
