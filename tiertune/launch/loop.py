"""The training loop: build the job, train with accumulation, evaluate, checkpoint, resume, summarise.

:func:`run` is the whole job. The loop itself only talks to a :class:`TrainEngine` (micro-batch,
step, save, load), so placements and optimizers beneath it change without changing this file.

On several ranks (torchrun) every rank runs this loop: each takes its slice of every micro-batch (the
rows a single process would train on, split in rank order), the engine shards the state and sums the
gradients, and rank 0 alone writes the run's files (metrics, checkpoints, the export, the summary).
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
from tiertune.launch import distributed, resume
from tiertune.launch.board import Board
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
from tiertune.offload.shard import ShardGroup
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
    ranks: int = 1  # processes the job ran on (its state sharded over them); the figures above are rank 0's


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            ["train.device: 'cuda' was asked for but no CUDA device is available; use auto or cpu"]
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: JobConfig, callbacks: Sequence[StepCallback] = ()) -> Summary:
    """Run the job ``cfg`` to ``train.max_steps``, resuming per ``train.resume``; return the summary. Under
    torchrun, this process is one rank of the job (see :mod:`tiertune.launch.distributed`)."""
    started = time.perf_counter()
    device = distributed.device_of(distributed.ranks_from_env(), pick_device(cfg.train.device))
    with distributed.join(device) as group:
        # One output directory for the job: rank 0 names it and holds it (its lock); it writes there.
        out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg)
        out = Path(_main(group, lambda: str(out)))
        cfg.output_dir = str(out)
        run_dir = _main(group, lambda: RunDir(out), share=False)
        try:
            return _run(cfg, out, run_dir, device, group, callbacks, started)
        except OSError as e:  # the output filesystem: full, read-only, or gone
            raise RunDirError(
                f"cannot write in output_dir {str(out)!r}: {e}. Checkpoints already written are "
                "intact: make room or fix the directory, then rerun to resume"
            ) from None
        finally:
            if run_dir is not None:
                run_dir.close()


def _main(group: ShardGroup | None, fn: Callable[[], Any], share: bool = True) -> Any:
    """``fn()`` on rank 0 alone (it reads or writes the run's files), its result shared with every rank
    (with ``share`` False, rank 0 keeps it and the others get None); its error reaches every rank."""
    if group is None:
        return fn()
    if share:
        return group.on_main(fn)
    kept: list[Any] = [None]

    def keep() -> None:
        kept[0] = fn()

    group.on_main(keep)
    return kept[0]


def _run(
    cfg: JobConfig,
    out: Path,
    run_dir: RunDir | None,
    device: torch.device,
    group: ShardGroup | None,
    callbacks: Sequence[StepCallback],
    started: float,
) -> Summary:
    say(f"output directory: {out}")
    if group is not None:
        say(
            f"{group.world} ranks ({group.local_world} on this machine), every block's state sharded over them"
        )
    resume_from = _main(group, lambda: resume.find_resume_point(cfg, out, group.world if group else 1))

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
        policy = Policy.from_json(_main(group, lambda: job_policy(cfg, out, splits.train).to_json()))
        compress_layers(model, policy, WEIGHT_DTYPES[cfg.train.dtype])
        if run_dir is not None:
            write_atomic(out / POLICY_FILE, policy.to_json() + "\n")
        say(policy.describe())
    model = cast_parameters(model, WEIGHT_DTYPES[cfg.train.dtype])
    if cfg.train.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    budgets = resolve_budgets(cfg.memory, device, share=group.local_world if group is not None else 1)
    ledger = Ledger()
    tracer = trace.Tracer() if cfg.train.trace else None
    if tracer is not None:
        trace.install(tracer)
        ledger.watch(tracer.counter)
    try:
        engine = build_engine(cfg, model, device, budgets, ledger, store_dir=out / "nvme-store", group=group)
        try:
            return _train(
                cfg,
                out,
                run_dir,
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
            # each rank its own trace (rank 0's is trace.json)
            written = tracer.save(
                out, suffix=f".rank{group.rank}" if group is not None and group.rank else ""
            )
            say(f"trace: {', '.join(str(p) for p in written)} (open trace.json in ui.perfetto.dev)")


def _train(
    cfg: JobConfig,
    out: Path,
    run_dir: RunDir | None,
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

    group = engine.group
    main = group is None or group.main  # the rank that writes the run's files
    state = LoopState()
    last_ckpt: Checkpoint | None = resume_from
    if resume_from is not None:
        state = resume.restore(resume_from, engine, fingerprints)
        say(f"resumed from {resume_from.path} (step {state.step})")
    if run_dir is not None:  # only now: a resume refused above leaves the run's files as they were
        run_dir.write_config(cfg)
    resumed_step = state.step
    # Every rank draws the same rows, a micro-batch for all the ranks at a time, and trains on its slice.
    ranks = group.world if group is not None else 1
    stream = BatchStream(
        splits.train, cfg.train.micro_batch_size * ranks, cfg.train.seed, state.data_position
    )
    metrics = MetricsLog(out / "metrics.jsonl", resumed_step) if main else None
    board = Board(cfg.train.tensorboard if main else "off", out, resumed_step)
    if board.path is not None:
        say(f"TensorBoard: tensorboard --logdir {board.path}")
    progress = Progress(
        cfg.train.progress if main else "off", cfg.train.max_steps, state.step, cfg.train.log_every
    )
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
            if metrics is not None:
                metrics.write(row)
            board.write(row)
            progress.update(row)
            if cfg.train.checkpoint_every and (last or step % cfg.train.checkpoint_every == 0):
                engine.settle()  # outside the checkpoint's own error handling: a store error is no disk's
                last_ckpt = resume.save(cfg, out, engine, state, fingerprints)
            for callback in callbacks:
                callback(row)
    finally:
        progress.close()
        board.close()
        if metrics is not None:
            metrics.close()

    if resumed_step == cfg.train.max_steps:  # nothing left to train: report the checkpoint's eval loss
        eval_loss, eval_accuracy = evaluate(engine, splits, cfg)
    em = (
        exact_match(
            engine.model,
            tokenizer,
            splits.eval_examples,
            cfg.train.eval_exact_match_samples,
            device,
            agree=group.first if group is not None else None,  # every rank decodes rank 0's tokens
        )
        if cfg.train.eval_exact_match_samples
        else None
    )
    export_dir = out / "final"
    engine.settle()
    failure = None
    try:
        engine.export(method, tokenizer, export_dir)  # every rank: the weights are gathered
        if policy is not None and main:
            write_atomic(export_dir / POLICY_FILE, policy.to_json() + "\n")
        if cfg.tuning.lora.export_merged and main:  # lora or luc_lora (the config refuses it elsewhere)
            say(
                f"merging the adapters into the base: {write_merged(cfg, engine.model, tokenizer, export_dir / MERGED_DIR)}"
            )
    except Exception as e:  # safetensors reports a full disk as its own error type
        failure = e
    if group is not None:  # a rank that failed to export: none of them goes on
        group.agree(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        kept = f"; checkpoint {last_ckpt.path} holds the trained weights" if last_ckpt else ""
        raise RunDirError(f"cannot export the result to {export_dir}: {failure}{kept}") from None
    return _main(
        group,
        lambda: _summarize(
            cfg,
            out,
            engine,
            state,
            resumed_step,
            started,
            eval_loss,
            eval_accuracy,
            em,
            trainable,
            total,
            last_ckpt,
            export_dir,
            budgets,
            device,
        ),
    )


def _summarize(
    cfg: JobConfig,
    out: Path,
    engine: TrainEngine,
    state: LoopState,
    resumed_step: int,
    started: float,
    eval_loss: float | None,
    eval_accuracy: float | None,
    em: dict[str, Any] | None,
    trainable: int,
    total: int,
    last_ckpt: Checkpoint | None,
    export_dir: Path,
    budgets: Budgets,
    device: torch.device,
) -> Summary:
    """The run's summary (written to summary.json) and its loss curve, from the metrics written."""
    rows = MetricsLog.read(out / "metrics.jsonl")
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
        ranks=engine.group.world if engine.group is not None else 1,
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
    # contributes sum/targets, so accumulation equals one big batch (up to float summation order). On
    # several ranks each trains on its slice of every micro-batch and the gradients are summed: the same.
    targets = sum(count_targets(b["labels"]) for b in batches)
    lr = lr_at(step, cfg.optim, cfg.train.max_steps)
    if targets:
        last = len(batches) - 1  # its backward may begin the update: it is told the step's lr
        mine = [_slice(b, engine.group) for b in batches]
        sums = [engine.forward_backward(b, targets, lr if i == last else None) for i, b in enumerate(mine)]
        total = sum(sums) if engine.group is None else engine.group.sum([sum(sums)])[0]
        loss: float | None = total / targets
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


def _slice(batch: dict[str, torch.Tensor], group: ShardGroup | None) -> dict[str, torch.Tensor]:
    """This rank's rows of a micro-batch drawn for every rank: an equal share, in rank order."""
    if group is None:
        return batch
    rows = len(batch["input_ids"]) // group.world
    return {k: v[group.rank * rows : (group.rank + 1) * rows] for k, v in batch.items()}


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
    ``train.eval_max_batches`` batches at most; (None, None) if it has none. The batches are those of one
    process whatever the ranks (``micro_batch_size`` rows for each rank); each rank evaluates its share
    of every batch, and the sums are added up."""
    group = engine.group
    rows = cfg.train.micro_batch_size * (group.world if group is not None else 1)
    depth = controller_of(engine.model)
    if depth is not None and depth.vote == "fitted":  # adaptive depth: the exits' weights, from training data
        # every rank calibrates on all the rows: the fit comes out the same on each
        for b in eval_batches(splits.train, rows, cfg.tuning.depth.calibration_batches):
            engine.eval_sums(b)
            depth.calibrate(b["labels"])
        depth.fit()
    batches = eval_batches(splits.eval, rows, cfg.train.eval_max_batches)
    targets = sum(count_targets(b["labels"]) for b in batches)
    if not targets:
        return None, None
    total, correct = 0.0, 0
    for b in batches:
        mine, counted = _eval_slice(b, group)
        loss, right = engine.eval_sums(mine)
        if counted:
            total, correct = total + loss, correct + right
            if depth is not None:
                depth.score(mine["labels"])
    if group is not None:
        total, correct = group.sum([total, correct])
        if depth is not None:
            depth.merge_scores(group.sum)
    return total / targets, correct / targets


def _eval_slice(
    batch: dict[str, torch.Tensor], group: ShardGroup | None
) -> tuple[dict[str, torch.Tensor], bool]:
    """This rank's rows of an eval batch (the last may be short: the first ranks take a row more), and
    whether they count: a rank left without rows runs the forward on one row anyway (the others need it
    for their gathers) and drops its result."""
    if group is None:
        return batch, True
    n = len(batch["input_ids"])
    per = -(-n // group.world)
    lo, hi = min(n, group.rank * per), min(n, (group.rank + 1) * per)
    if lo == hi:
        return {k: v[:1] for k, v in batch.items()}, False
    return {k: v[lo:hi] for k, v in batch.items()}, True


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
    ranks = f" on {s.ranks} ranks" if s.ranks > 1 else ""
    lines = [f"done: {s.steps} steps in {s.wall_time_s:.1f}s{ranks} ({s.tokens_seen:,} tokens{resumed})"]
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
    each = " (rank 0; each rank holds its share)" if s.ranks > 1 else ""
    lines.append(f"  peak RSS {format_bytes(s.peak_rss_bytes)}{device}{each}")
    for tier, peak in s.memory["peak_bytes"].items():
        held = ", ".join(f"{kind} {format_bytes(n)}" for kind, n in s.memory["bytes"].get(tier, {}).items())
        budget = s.memory["budget_bytes"].get(tier)
        of = f" of {format_bytes(budget)} budget" if budget is not None else ""
        lines.append(f"  {tier} tier: peak {format_bytes(peak)}{of} (at the end: {held})")
    ckpt_name = f", {Path(s.final_checkpoint).relative_to(s.output_dir)}" if s.final_checkpoint else ""
    lines.append(f"  outputs in {s.output_dir}: metrics.jsonl, loss.svg, summary.json, final/{ckpt_name}")
    return "\n".join(lines)
