"""What a checkpoint holds besides the engine's files, and when a job may resume from one.

A job resumes only from a checkpoint of the same trajectory: the same model, data, tuning, seed, rows per
step and dtype in the config, and the same data rows and base weights on disk (fingerprints). Settings
that do not change the trajectory so far (max_steps, lr schedule, eval and checkpoint cadence) may change;
each change is reported. The rows a step trains on are ``train.micro_batch_size`` x
``train.grad_accum_steps`` x the ranks: a checkpoint holds no trace of the ranks that wrote it (rank 0
writes the files of one process), so it resumes with any number of ranks that trains as many rows a step.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tiertune.config import JobConfig, config_to_dict
from tiertune.errors import CheckpointError, RunDirError
from tiertune.launch import checkpoint as ckpt
from tiertune.launch.engine import TrainEngine
from tiertune.launch.progress import say

STATE_FILE = "loop_state.json"
RNG_FILE = "rng.pt"

TRAJECTORY_KEYS = ("model", "data", "tuning", "train.seed", "train.dtype")


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    data_position: int = 0  # training rows consumed
    tokens_seen: int = 0  # input tokens processed (padding included)
    skipped_steps: int = 0  # steps without an update (non-finite gradient, or no target token)


def find_resume_point(cfg: JobConfig, out: Path, ranks: int = 1) -> ckpt.Checkpoint | None:
    """The verified checkpoint this job (on ``ranks`` processes) continues from, None to start fresh, or an
    error saying why neither."""
    for leftover in ckpt.remove_partial(out):
        say(f"removed {leftover.name}, an interrupted checkpoint save")
    found = ckpt.list_checkpoints(out)
    if not found:
        if (out / "summary.json").exists() or (out / "final").exists():
            raise RunDirError(
                f"output_dir {str(out)!r} holds the results of a finished run but no checkpoint to "
                "continue from; choose another output_dir so that they are not overwritten"
            )
        return None
    if cfg.train.resume == "never":
        raise RunDirError(
            f"output_dir {str(out)!r} already holds checkpoints (latest step {found[-1].step}); "
            "use train.resume=auto to continue that run, or choose another output_dir"
        )
    latest = found[-1]
    ckpt.verify_checkpoint(latest.path)
    saved = _read_state(latest)
    _check_same_config(saved["config"], config_to_dict(cfg), latest.path)
    _check_rows_per_step(saved, cfg, ranks, latest.path)
    return latest


def _check_rows_per_step(saved: dict[str, Any], cfg: JobConfig, ranks: int, where: Path) -> None:
    """The rows a step trains on must not change: micro-batch, accumulation and ranks may, in step."""
    train, was_ranks = saved["config"]["train"], saved.get("ranks", 1)
    before = train["micro_batch_size"] * train["grad_accum_steps"] * was_ranks
    now = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * ranks
    if before != now:
        per_rank = before // (cfg.train.grad_accum_steps * ranks)
        hint = (
            f"train.micro_batch_size={per_rank}"
            if per_rank * cfg.train.grad_accum_steps * ranks == before
            else f"micro_batch_size x grad_accum_steps x ranks = {before}"
        )
        raise CheckpointError(
            f"checkpoint {where} trains {before} rows a step ({train['micro_batch_size']} x "
            f"{train['grad_accum_steps']} accumulated x {was_ranks} rank(s)), this job {now} "
            f"({cfg.train.micro_batch_size} x {cfg.train.grad_accum_steps} x {ranks}); to resume it "
            f"on {ranks} rank(s) set {hint}, or choose another output_dir"
        )
    if was_ranks != ranks:
        say(f"note: the checkpoint was written by {was_ranks} rank(s); resuming on {ranks}")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_same_config(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    before, after = _flatten(saved), _flatten(now)
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    fixed = [k for k in changed if any(k == t or k.startswith(t + ".") for t in TRAJECTORY_KEYS)]
    if fixed:
        diffs = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in fixed)
        raise CheckpointError(
            f"checkpoint {where} belongs to a different job ({diffs}); use the same settings "
            "to resume, or choose another output_dir"
        )
    for key in changed:
        if key != "output_dir":
            say(f"note: {key} changed since the checkpoint ({before.get(key)!r} -> {after.get(key)!r})")


def save(
    cfg: JobConfig, out: Path, engine: TrainEngine, state: LoopState, fingerprints: dict[str, str]
) -> ckpt.Checkpoint:
    """Write a checkpoint of the run. On several ranks every rank takes part in the engine's save (its
    shards are gathered) and rank 0 writes; every rank gets rank 0's checkpoint, or its error. The RNG
    states saved are rank 0's: every rank draws the same numbers (the same seed, the same ops)."""
    group = engine.group
    ranks = group.world if group is not None else 1
    wrote = False

    def write(directory: Path) -> None:
        nonlocal wrote
        wrote = True
        engine.save(directory)
        payload = {
            **asdict(state),
            "ranks": ranks,
            "fingerprints": fingerprints,
            "config": config_to_dict(cfg),
        }
        (directory / STATE_FILE).write_text(json.dumps(payload, indent=1))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, directory / RNG_FILE)

    if group is None:
        return ckpt.save_checkpoint(out, state.step, write, cfg.train.keep_checkpoints)

    def on_main() -> ckpt.Checkpoint:
        try:
            return ckpt.save_checkpoint(out, state.step, write, cfg.train.keep_checkpoints)
        finally:
            if not wrote:  # it failed before the engine's part: join the gathers the others are in
                engine.save(None)

    if not group.main:
        engine.save(None)  # the gathers of rank 0's save
    return group.on_main(on_main)


def restore(found: ckpt.Checkpoint, engine: TrainEngine, fingerprints: dict[str, str]) -> LoopState:
    """Load the engine's state, the RNG states and the loop position; refuse if the inputs changed."""
    payload = _read_state(found)
    for name, value in fingerprints.items():
        if payload["fingerprints"].get(name) != value:
            raise CheckpointError(
                f"the {name} changed since checkpoint {found.path} was written, so it cannot "
                "resume exactly; restore them, or start over in another output_dir"
            )
    engine.load(found.path)
    rng = torch.load(found.path / RNG_FILE, weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return LoopState(**{k: payload[k] for k in asdict(LoopState())})


def _read_state(found: ckpt.Checkpoint) -> dict[str, Any]:
    return json.loads((found.path / STATE_FILE).read_text())
