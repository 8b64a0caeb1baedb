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

from tiertune.config import JobConfig, config_to_dict
from tiertune.errors import CheckpointError, ConfigError, RunDirError
from tiertune.launch import checkpoint as ckpt
from tiertune.launch.data import BatchStream, Splits, build_splits, count_targets, eval_batches
from tiertune.launch.engine import TrainEngine, build_engine
from tiertune.launch.evaluate import exact_match
from tiertune.launch.models import build_model, check_vocab, count_parameters, describe, load_tokenizer
from tiertune.launch.progress import Progress, say, write_loss_svg
from tiertune.launch.rundir import MetricsLog, RunDir, default_output_dir, write_atomic
from tiertune.memory import device_peak_bytes, format_bytes, peak_rss_bytes, rss_bytes
from tiertune.optim import lr_at
from tiertune.tuning import get_method

STATE_FILE = "loop_state.json"
RNG_FILE = "rng.pt"

# Keys that shape the trajectory: a checkpoint only resumes a job that agrees on all of them.
_TRAJECTORY_KEYS = (
    "model",
    "data",
    "tuning",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.seed",
    "train.dtype",
)

StepCallback = Callable[[dict[str, Any]], None]


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    data_position: int = 0  # training rows consumed
    tokens_seen: int = 0  # input tokens processed (padding included)
    skipped_steps: int = 0  # steps whose gradient was not finite


@dataclass
class Summary:
    output_dir: str
    steps: int
    resumed_from_step: int
    tokens_seen: int
    wall_time_s: float
    first_loss: float | None
    final_loss: float | None
    eval_loss: float | None
    exact_match: dict[str, Any] | None
    peak_rss_bytes: int
    peak_device_bytes: int | None
    skipped_steps: int
    trainable_params: int
    total_params: int
    final_checkpoint: str | None
    export_dir: str | None


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            [
                "train.device: 'cuda' was asked for but no CUDA device is available; "
                "use train.device=auto or cpu"
            ]
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
    finally:
        run_dir.close()


def _run(
    cfg: JobConfig, run_dir: RunDir, device: torch.device, callbacks: Sequence[StepCallback], started: float
) -> Summary:
    out = run_dir.path
    say(f"output directory: {out}")
    resume_from = _checkpoint_to_resume(cfg, out)
    run_dir.write_config(cfg)

    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, seed=cfg.train.seed)
    check_vocab(model, tokenizer)
    method = get_method(cfg.tuning.method)
    model = method.apply(model, cfg.tuning)
    engine = build_engine(cfg, model, device)
    splits = build_splits(cfg.data, tokenizer, cfg.train.seed)
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    say(
        f"model {describe(cfg.model)}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
        f"({cfg.tuning.method}); {len(splits.train)} train / {len(splits.eval)} eval sequences of "
        f"{cfg.data.seq_len} tokens; device {device}, {cfg.train.dtype}"
    )

    state = LoopState()
    if resume_from is not None:
        state = _load_checkpoint(resume_from, engine)
        say(f"resumed from {resume_from.path} (step {state.step})")
    resumed_step = state.step
    stream = BatchStream(splits.train, cfg.train.micro_batch_size, cfg.train.seed, state.data_position)
    metrics = MetricsLog(out / "metrics.jsonl", resumed_step)
    progress = Progress(cfg.train.progress, cfg.train.max_steps, state.step, cfg.train.log_every)
    last_ckpt: ckpt.Checkpoint | None = resume_from
    eval_loss = None
    try:
        for step in range(state.step + 1, cfg.train.max_steps + 1):
            row = _train_step(cfg, engine, stream, step, state)
            last = step == cfg.train.max_steps
            if last or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                eval_loss = row["eval_loss"] = evaluate(engine, splits, cfg)
            metrics.write(row)
            progress.update(row)
            if cfg.train.checkpoint_every and (last or step % cfg.train.checkpoint_every == 0):
                last_ckpt = _save_checkpoint(cfg, out, engine, state)
            for callback in callbacks:
                callback(row)
    finally:
        progress.close()
        metrics.close()

    rows = metrics.rows()
    if eval_loss is None and len(splits.eval):  # nothing left to train: report the checkpoint's eval loss
        eval_loss = evaluate(engine, splits, cfg)
    em = (
        exact_match(engine.model, tokenizer, splits.eval_examples, cfg.train.eval_exact_match_samples, device)
        if cfg.train.eval_exact_match_samples
        else None
    )
    export_dir = out / "final"
    method.export(engine.model, tokenizer, export_dir)
    write_loss_svg(rows, out / "loss.svg", f"{describe(cfg.model)} / {cfg.tuning.method}")
    summary = Summary(
        output_dir=str(out),
        steps=state.step,
        resumed_from_step=resumed_step,
        tokens_seen=state.tokens_seen,
        wall_time_s=round(time.perf_counter() - started, 3),
        first_loss=rows[0]["loss"] if rows else None,
        final_loss=rows[-1]["loss"] if rows else None,
        eval_loss=eval_loss,
        exact_match=em,
        peak_rss_bytes=peak_rss_bytes(),
        peak_device_bytes=device_peak_bytes(device),
        skipped_steps=state.skipped_steps,
        trainable_params=trainable,
        total_params=total,
        final_checkpoint=str(last_ckpt.path) if last_ckpt else None,
        export_dir=str(export_dir),
    )
    write_atomic(out / "summary.json", json.dumps(asdict(summary), indent=1) + "\n")
    return summary


def _train_step(
    cfg: JobConfig, engine: TrainEngine, stream: BatchStream, step: int, state: LoopState
) -> dict[str, Any]:
    t0 = time.perf_counter()
    batches = [stream.next_batch() for _ in range(cfg.train.grad_accum_steps)]
    # The step's loss is the mean over every target token of all its micro-batches; each micro-batch
    # contributes sum/targets, so accumulation equals one big batch (up to float summation order).
    targets = sum(count_targets(b["labels"]) for b in batches)
    loss_sum = sum(engine.forward_backward(b, max(targets, 1)) for b in batches)
    lr = lr_at(step, cfg.optim, cfg.train.max_steps)
    report = engine.step(lr)
    elapsed = time.perf_counter() - t0
    tokens = sum(b["input_ids"].numel() for b in batches)
    state.step, state.data_position = step, stream.position
    state.tokens_seen += tokens
    state.skipped_steps += report.skipped
    row: dict[str, Any] = {
        "step": step,
        "loss": loss_sum / targets if targets else float("nan"),
        "lr": lr,
        "grad_norm": report.grad_norm,
        "target_tokens": targets,
        "step_time_s": round(elapsed, 6),
        "tokens_per_s": round(tokens / elapsed, 1),
        "rss_bytes": rss_bytes(),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if report.skipped:
        row["skipped"] = True
        say(f"step {step}: gradient norm is {report.grad_norm}; the update was skipped")
    peak_device = device_peak_bytes(engine.device)
    if peak_device is not None:
        row["peak_device_bytes"] = peak_device
    return row


def evaluate(engine: TrainEngine, splits: Splits, cfg: JobConfig) -> float | None:
    """Token-mean loss over the eval split (``train.eval_max_batches`` batches at most)."""
    batches = eval_batches(splits.eval, cfg.train.micro_batch_size, cfg.train.eval_max_batches)
    targets = sum(count_targets(b["labels"]) for b in batches)
    if not targets:
        return None
    return sum(engine.eval_loss_sum(b) for b in batches) / targets


def _checkpoint_to_resume(cfg: JobConfig, out: Path) -> ckpt.Checkpoint | None:
    for leftover in ckpt.remove_partial(out):
        say(f"removed {leftover.name}, an interrupted checkpoint save")
    found = ckpt.list_checkpoints(out)
    if not found:
        return None
    if cfg.train.resume == "never":
        raise RunDirError(
            f"output_dir {str(out)!r} already holds checkpoints (latest step {found[-1].step}); "
            "use train.resume=auto to continue that run, or choose another output_dir"
        )
    latest = found[-1]
    ckpt.verify_checkpoint(latest.path)
    saved = json.loads((latest.path / STATE_FILE).read_text())["config"]
    _check_same_trajectory(saved, config_to_dict(cfg), latest.path)
    return latest


def _check_same_trajectory(saved: dict, now: dict, where: Path) -> None:
    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    before, after = flat(saved), flat(now)
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    fixed = [k for k in changed if any(k == t or k.startswith(t + ".") for t in _TRAJECTORY_KEYS)]
    if fixed:
        diffs = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in fixed)
        raise CheckpointError(
            f"checkpoint {where} belongs to a different job ({diffs}); use the same "
            "settings to resume, or choose another output_dir"
        )
    for key in changed:
        if key != "output_dir":
            say(f"note: {key} changed since the checkpoint ({before.get(key)!r} -> {after.get(key)!r})")


def _save_checkpoint(cfg: JobConfig, out: Path, engine: TrainEngine, state: LoopState) -> ckpt.Checkpoint:
    def write(directory: Path) -> None:
        engine.save(directory)
        payload = {**asdict(state), "config": config_to_dict(cfg)}
        (directory / STATE_FILE).write_text(json.dumps(payload, indent=1))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, directory / RNG_FILE)

    return ckpt.save_checkpoint(out, state.step, write, cfg.train.keep_checkpoints)


def _load_checkpoint(found: ckpt.Checkpoint, engine: TrainEngine) -> LoopState:
    engine.load(found.path)
    payload = json.loads((found.path / STATE_FILE).read_text())
    state = LoopState(**{k: payload[k] for k in asdict(LoopState())})
    rng = torch.load(found.path / RNG_FILE, weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def format_summary(s: Summary) -> str:
    lines = [
        f"done: {s.steps} steps in {s.wall_time_s:.1f}s ({s.tokens_seen:,} tokens"
        + (f", resumed at step {s.resumed_from_step}" if s.resumed_from_step else "")
        + ")"
    ]
    if s.first_loss is not None:
        lines.append(f"  train loss {s.first_loss:.4f} (first step) -> {s.final_loss:.4f} (last step)")
    if s.eval_loss is not None:
        lines.append(f"  eval loss  {s.eval_loss:.4f}")
    if s.exact_match:
        lines.append(
            f"  exact-match answers {s.exact_match['correct']}/{s.exact_match['total']} held-out prompts"
        )
    if s.skipped_steps:
        lines.append(f"  {s.skipped_steps} step(s) skipped for non-finite gradients")
    lines.append(
        f"  peak RSS {format_bytes(s.peak_rss_bytes)}"
        + (f", peak device {format_bytes(s.peak_device_bytes)}" if s.peak_device_bytes else "")
    )
    lines.append(
        f"  outputs in {s.output_dir}: metrics.jsonl, loss.svg, summary.json, final/"
        + (f", {Path(s.final_checkpoint).relative_to(s.output_dir)}" if s.final_checkpoint else "")
    )
    return "\n".join(lines)
