"""The training loop: build the job, train with accumulation, evaluate, checkpoint, resume, summarise.

:func:`run` is the whole job. The loop itself only talks to a :class:`TrainEngine` (micro-batch,
step, save, load), so placements and optimizers beneath it change without changing this file.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tiertune import trace
from tiertune.config import JobConfig
from tiertune.errors import ConfigError, RunDirError
from tiertune.launch import resume
from tiertune.launch.checkpoint import Checkpoint
from tiertune.launch.data import BatchStream, Splits, build_splits, count_targets, eval_batches
from tiertune.launch.engine import TrainEngine, build_engine
from tiertune.launch.evaluate import exact_match
from tiertune.launch.luc_job import POLICY_FILE, job_policy, policy_fingerprint, uses_luc
from tiertune.launch.merge import MERGED_DIR, write_merged
from tiertune.launch.models import (
    WEIGHT_DTYPES,
    build_model,
    cast_parameters,
    check_vocab,
    count_parameters,
    describe,
    has_safetensors,
    load_tokenizer,
    model_dir,
    skeleton,
    weights_fingerprint,
)
from tiertune.launch.progress import Progress, say, write_loss_svg
from tiertune.launch.resume import LoopState
from tiertune.launch.rundir import MetricsLog, RunDir, default_output_dir, write_atomic
from tiertune.memory import (
    Budgets,
    Ledger,
    device_peak_bytes,
    format_bytes,
    peak_rss_bytes,
    resolve_budgets,
    rss_bytes,
)
from tiertune.optim import StepReport, lr_at
from tiertune.tuning import get_method
from tiertune.tuning.depth import controller_of
from tiertune.tuning.luc import Policy, compress_layers

StepCallback = Callable[[dict[str, Any]], None]


@dataclass
class Summary:
    output_dir: str
    task: str  # model.task
    steps: int
    resumed_from_step: int
    tokens_seen: int
    wall_time_s: float
    first_loss: float | None
    final_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None  # classifiers: share of eval rows labelled right; LMs: of next tokens
    exact_match: dict[str, Any] | None
    peak_rss_bytes: int
    peak_device_bytes: int | None
    skipped_steps: int
    trainable_params: int
    total_params: int
    final_checkpoint: str | None
    export_dir: str
    memory: dict[str, Any]  # the ledger: bytes per tier and kind now, peak per tier, waste; and the budgets


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            ["train.device: 'cuda' was asked for but no CUDA device is available; use auto or cpu"]
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: JobConfig, callbacks: Sequence[StepCallback] = ()) -> Summary:
    """Run the job ``cfg`` to ``train.max_steps``, resuming per ``train.resume``; return the summary."""
    started = time.perf_counter()
    device = pick_device(cfg.train.device)
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg)
    cfg.output_dir = str(out)
    run_dir = RunDir(out)
    try:
        return _run(cfg, run_dir, device, callbacks, started)
    except OSError as e:  # the output filesystem: full, read-only, or gone
        raise RunDirError(
            f"cannot write in output_dir {str(out)!r}: {e}. Checkpoints already written are "
            "intact: make room or fix the directory, then rerun to resume"
        ) from None
    finally:
        run_dir.close()


def _run(
    cfg: JobConfig, run_dir: RunDir, device: torch.device, callbacks: Sequence[StepCallback], started: float
) -> Summary:
    out = run_dir.path
    say(f"output directory: {out}")
    resume_from = resume.find_resume_point(cfg, out)
    run_dir.write_config(cfg)

    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    directory = model_dir(cfg.model.path)
    if directory is None or has_safetensors(directory):
        # Parameters on the meta device: the engine makes each block where the plan puts it (from the seed
        # or read from the model's safetensors files), so a model larger than memory never exists whole.
        # LoRA's adapters are made when they are added (tiertune.tuning.lora).
        model = skeleton(cfg.model)
    else:
        model = build_model(cfg.model, seed=cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    check_vocab(model, tokenizer)
    method = get_method(cfg.tuning.method)
    model = method.apply(model, cfg.tuning)  # first: LoRA's adapters draw from the seeded global RNG
    splits = build_splits(cfg.data, tokenizer, cfg.train.seed, labels=_class_names(cfg))
    policy = None
    if uses_luc(cfg):  # the base's linears compressed by a policy measured on the job's own data
        policy = job_policy(cfg, out, splits.train)
        compress_layers(model, policy, WEIGHT_DTYPES[cfg.train.dtype])
        write_atomic(out / POLICY_FILE, policy.to_json() + "\n")
        say(policy.describe())
    model = cast_parameters(model, WEIGHT_DTYPES[cfg.train.dtype])
    if cfg.train.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    budgets = resolve_budgets(cfg.memory, device)
    ledger = Ledger()
    tracer = trace.Tracer() if cfg.train.trace else None
    if tracer is not None:
        trace.install(tracer)
        ledger.watch(tracer.counter)
    try:
        engine = build_engine(cfg, model, device, budgets, ledger, store_dir=out / "nvme-store")
        try:
            return _train(
                cfg,
                out,
                engine,
                model,
                tokenizer,
                splits,
                method,
                budgets,
                device,
                resume_from,
                callbacks,
                started,
                policy,
            )
        finally:
            engine.close(gather=False)  # hooks off, store files deleted: also when training fails
    finally:
        if tracer is not None:
            trace.install(None)
            written = tracer.save(out)
            say(f"trace: {', '.join(str(p) for p in written)} (open trace.json in ui.perfetto.dev)")


def _train(
    cfg: JobConfig,
    out: Path,
    engine: TrainEngine,
    model: torch.nn.Module,
    tokenizer: Any,
    splits: Splits,
    method: Any,
    budgets: Budgets,
    device: torch.device,
    resume_from: Checkpoint | None,
    callbacks: Sequence[StepCallback],
    started: float,
    policy: Policy | None,
) -> Summary:
    fingerprints = {"training data": splits.fingerprint(), **weights_fingerprint(cfg.model)}
    if policy is not None:  # the adapters were trained over this compression of the base
        fingerprints["LUC policy"] = policy_fingerprint(policy)
    if cfg.train.dtype == "bf16":  # before bf16 weights had fp32 masters, train.dtype=bf16 meant autocast
        fingerprints["precision"] = "bf16 weights with fp32 masters"
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    say(
        f"model {describe(cfg.model)}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
        f"({cfg.tuning.method}); {len(splits.train)} train / {len(splits.eval)} eval sequences of "
        f"{cfg.data.seq_len} tokens; device {device}, {cfg.train.dtype}"
    )

    state = LoopState()
    last_ckpt: Checkpoint | None = resume_from
    if resume_from is not None:
        state = resume.restore(resume_from, engine, fingerprints)
        say(f"resumed from {resume_from.path} (step {state.step})")
    resumed_step = state.step
    stream = BatchStream(splits.train, cfg.train.micro_batch_size, cfg.train.seed, state.data_position)
    metrics = MetricsLog(out / "metrics.jsonl", resumed_step)
    progress = Progress(cfg.train.progress, cfg.train.max_steps, state.step, cfg.train.log_every)
    eval_loss = eval_accuracy = None
    try:
        for step in range(state.step + 1, cfg.train.max_steps + 1):
            row = _train_step(cfg, engine, stream, step, state)
            last = step == cfg.train.max_steps
            if last or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                eval_loss, eval_accuracy = evaluate(engine, splits, cfg)
                if eval_loss is not None:
                    row["eval_loss"], row["eval_accuracy"] = eval_loss, eval_accuracy
                exits = _exit_metrics(engine)
                if exits:  # adaptive depth: each exit's loss and accuracy, and the vote's (= eval_loss)
                    row["exits"] = exits
                    say(
                        f"step {step} eval by exit: "
                        + ", ".join(f"{n} {m['loss']:.4f}" for n, m in exits.items())
                    )
            metrics.write(row)
            progress.update(row)
            if cfg.train.checkpoint_every and (last or step % cfg.train.checkpoint_every == 0):
                engine.settle()  # outside the checkpoint's own error handling: a store error is no disk's
                last_ckpt = resume.save(cfg, out, engine, state, fingerprints)
            for callback in callbacks:
                callback(row)
    finally:
        progress.close()
        metrics.close()

    if resumed_step == cfg.train.max_steps:  # nothing left to train: report the checkpoint's eval loss
        eval_loss, eval_accuracy = evaluate(engine, splits, cfg)
    em = (
        exact_match(engine.model, tokenizer, splits.eval_examples, cfg.train.eval_exact_match_samples, device)
        if cfg.train.eval_exact_match_samples
        else None
    )
    export_dir = out / "final"
    engine.settle()
    try:
        engine.export(method, tokenizer, export_dir)
        if policy is not None:
            write_atomic(export_dir / POLICY_FILE, policy.to_json() + "\n")
        if cfg.tuning.lora.export_merged:  # lora or luc_lora (the config refuses it elsewhere)
            say(
                f"merging the adapters into the base: {write_merged(cfg, engine.model, tokenizer, export_dir / MERGED_DIR)}"
            )
    except Exception as e:  # safetensors reports a full disk as its own error type
        kept = f"; checkpoint {last_ckpt.path} holds the trained weights" if last_ckpt else ""
        raise RunDirError(f"cannot export the result to {export_dir}: {e}{kept}") from None
    rows = metrics.rows()
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    write_loss_svg(rows, out / "loss.svg", f"{describe(cfg.model)} / {cfg.tuning.method}")
    summary = Summary(
        output_dir=str(out),
        task=cfg.model.task,
        steps=state.step,
        resumed_from_step=resumed_step,
        tokens_seen=state.tokens_seen,
        wall_time_s=round(time.perf_counter() - started, 3),
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        eval_loss=eval_loss,
        eval_accuracy=eval_accuracy,
        exact_match=em,
        peak_rss_bytes=peak_rss_bytes(),
        peak_device_bytes=device_peak_bytes(device),
        skipped_steps=state.skipped_steps,
        trainable_params=trainable,
        total_params=total,
        final_checkpoint=str(last_ckpt.path) if last_ckpt else None,
        export_dir=str(export_dir),
        memory={**engine.ledger.snapshot(), "budget_bytes": _budget_dict(budgets)},
    )
    write_atomic(out / "summary.json", json.dumps(asdict(summary), indent=1) + "\n")
    return summary


def _train_step(
    cfg: JobConfig, engine: TrainEngine, stream: BatchStream, step: int, state: LoopState
) -> dict[str, Any]:
    t0 = time.perf_counter()
    depth = controller_of(engine.model)
    if depth is not None:  # adaptive depth: the window this step trains
        depth.begin_step(step)
    moved_before = engine.moved_bytes()
    batches = [stream.next_batch() for _ in range(cfg.train.grad_accum_steps)]
    # The step's loss is the mean over every target token of all its micro-batches; each micro-batch
    # contributes sum/targets, so accumulation equals one big batch (up to float summation order).
    targets = sum(count_targets(b["labels"]) for b in batches)
    lr = lr_at(step, cfg.optim, cfg.train.max_steps)
    if targets:
        last = len(batches) - 1  # its backward may begin the update: it is told the step's lr
        sums = [engine.forward_backward(b, targets, lr if i == last else None) for i, b in enumerate(batches)]
        loss: float | None = sum(sums) / targets
        report = engine.step(lr)
    else:  # only prompt tokens in these rows: an update would apply momentum and decay with no gradient
        loss, report = None, StepReport(grad_norm=float("nan"), skipped=True)
    elapsed = time.perf_counter() - t0
    tokens = sum(b["input_ids"].numel() for b in batches)
    ledger = engine.ledger.snapshot()
    state.step, state.data_position = step, stream.position
    state.tokens_seen += tokens
    state.skipped_steps += report.skipped
    row: dict[str, Any] = {
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": report.grad_norm,
        "target_tokens": targets,
        "step_time_s": round(elapsed, 6),
        "tokens_per_s": round(tokens / elapsed, 1),
        "rss_bytes": rss_bytes(),
        "peak_rss_bytes": peak_rss_bytes(),
        "tier_bytes": ledger["bytes"],
        "tier_peak_bytes": ledger["peak_bytes"],
    }
    moved = _delta(engine.moved_bytes(), moved_before)
    if moved:  # what this step read from and wrote to the NVMe tier, by kind
        row["nvme_bytes"] = moved
    if report.in_backward is not None:  # block updates made during backward: kept, undone
        row["updates_in_backward"], row["updates_undone"] = report.in_backward, report.undone
    if report.skipped:
        row["skipped"] = True
        why = f"gradient norm is {report.grad_norm}" if targets else "no token in its batch carries loss"
        say(f"step {step}: {why}; the update was skipped")
    peak_device = device_peak_bytes(engine.device)
    if peak_device is not None:
        row["peak_device_bytes"] = peak_device
    return row


def _delta(now: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out = {}
    for direction, kinds in now.items():
        moved = {k: n - before.get(direction, {}).get(k, 0) for k, n in kinds.items()}
        moved = {k: n for k, n in moved.items() if n}
        if moved:
            out[direction] = moved
    return out


def evaluate(engine: TrainEngine, splits: Splits, cfg: JobConfig) -> tuple[float | None, float | None]:
    """Mean loss and accuracy over the eval split's targets (tokens, or classified rows), from
    ``train.eval_max_batches`` batches at most; (None, None) if it has none."""
    depth = controller_of(engine.model)
    if depth is not None and depth.vote == "fitted":  # adaptive depth: the exits' weights, from training data
        for b in eval_batches(splits.train, cfg.train.micro_batch_size, cfg.tuning.depth.calibration_batches):
            engine.eval_sums(b)
            depth.calibrate(b["labels"])
        depth.fit()
    batches = eval_batches(splits.eval, cfg.train.micro_batch_size, cfg.train.eval_max_batches)
    targets = sum(count_targets(b["labels"]) for b in batches)
    if not targets:
        return None, None
    total, correct = 0.0, 0
    for b in batches:
        loss, right = engine.eval_sums(b)
        total, correct = total + loss, correct + right
        if depth is not None:
            depth.score(b["labels"])
    return total / targets, correct / targets


def _class_names(cfg: JobConfig) -> list[str] | None:
    """A classifier's labels (the config resolved them from the dataset if it named none)."""
    if cfg.model.task != "sequence_classification":
        return None
    return cfg.model.labels


def _exit_metrics(engine: TrainEngine) -> dict[str, dict[str, float]] | None:
    depth = controller_of(engine.model)
    return depth.metrics() if depth is not None else None


def _budget_dict(b: Budgets) -> dict[str, int]:
    out = {"device": b.device, "host": b.host}
    if b.cxl_nodes:
        out["cxl"] = b.cxl
    return out


def format_summary(s: Summary) -> str:
    resumed = f", resumed at step {s.resumed_from_step}" if s.resumed_from_step else ""
    lines = [f"done: {s.steps} steps in {s.wall_time_s:.1f}s ({s.tokens_seen:,} tokens{resumed})"]
    if s.first_loss is not None:
        lines.append(f"  train loss {s.first_loss:.4f} (first step) -> {s.final_loss:.4f} (last step)")
    if s.eval_loss is not None:
        what = "held-out texts classified" if s.task == "sequence_classification" else "next tokens"
        lines.append(f"  eval loss  {s.eval_loss:.4f}, accuracy {s.eval_accuracy:.2%} ({what})")
    if s.exact_match:
        lines.append(
            f"  exact-match answers {s.exact_match['correct']}/{s.exact_match['total']} held-out prompts"
        )
    if s.skipped_steps:
        lines.append(f"  {s.skipped_steps} step(s) skipped (non-finite gradient or no target token)")
    device = f", peak device {format_bytes(s.peak_device_bytes)}" if s.peak_device_bytes else ""
    lines.append(f"  peak RSS {format_bytes(s.peak_rss_bytes)}{device}")
    for tier, peak in s.memory["peak_bytes"].items():
        held = ", ".join(f"{kind} {format_bytes(n)}" for kind, n in s.memory["bytes"].get(tier, {}).items())
        budget = s.memory["budget_bytes"].get(tier)
        of = f" of {format_bytes(budget)} budget" if budget is not None else ""
        lines.append(f"  {tier} tier: peak {format_bytes(peak)}{of} (at the end: {held})")
    ckpt_name = f", {Path(s.final_checkpoint).relative_to(s.output_dir)}" if s.final_checkpoint else ""
    lines.append(f"  outputs in {s.output_dir}: metrics.jsonl, loss.svg, summary.json, final/{ckpt_name}")
    return "\n".join(lines)
