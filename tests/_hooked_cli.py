"""Run ``tiertune train`` (the real CLI, in this process) with a fault or a pause hooked in. Used by
test_reliability.

    python tests/_hooked_cli.py kill POINT SEED -- ARGS...
        SIGKILL this process at a point of POINT that a random generator seeded with SEED picks, once the
        job has written its first checkpoint: ``forward`` (a decoder layer's forward), ``backward`` (the
        gradient of a decoder layer's output), ``optimizer`` (right after the k-th block update of a step:
        that block's new state is in the store, the later blocks' is not) or ``checkpoint`` (a save with
        some of its files in its temporary directory, not yet published).
        Just before the kill, one line ``kill point: ...`` on stderr says where.
    python tests/_hooked_cli.py hold HOLDING RELEASE -- ARGS...
        After step 1, create the file HOLDING and wait (at most two minutes) for RELEASE to exist; then
        train on to the end.

ARGS are those of ``tiertune train``; the exit status is the CLI's.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tiertune.config import JobConfig
from tiertune.launch import checkpoint as ckpt
from tiertune.launch import cli, loop, plan
from tiertune.launch.engine import TrainEngine
from tiertune.optim import blockwise

POINTS = ("forward", "backward", "optimizer", "checkpoint")
CHECKPOINT_STAGES = ("before optimizer.pt", "before the manifest", "before the rename")


def kill(where: str) -> None:
    print(f"kill point: {where}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as hard as a crash gets


def add_callback(callback: Any) -> None:
    """Every job the CLI runs gets ``callback`` after each optimizer step (and its checkpoint)."""
    run = loop.run
    loop.run = lambda cfg, callbacks=(): run(cfg, [*callbacks, callback])


def install_kill(point: str, seed: int) -> None:
    rng = random.Random(seed)
    state = {"armed": False, "steps": 0}
    build_engine = loop.build_engine

    def arm(row: dict[str, Any]) -> None:
        state["steps"] = row["step"]
        state["armed"] = state["armed"] or row["step"] >= state["after"]

    def building(cfg: JobConfig, model: torch.nn.Module, *args: Any, **kwargs: Any) -> TrainEngine:
        engine = build_engine(cfg, model, *args, **kwargs)
        every, last = cfg.train.checkpoint_every, cfg.train.max_steps
        state["after"] = rng.randint(every, last - 1)  # the first checkpoint is written by then
        layers = [m for n, m in engine.model.named_modules() if re.fullmatch(r".*\.layers\.\d+", n)]
        k = rng.randrange(len(layers))
        where = f"{point} of decoder layer {k} in step {{}}"
        if point == "forward":

            def pre_hook(module: torch.nn.Module, args: Any) -> None:
                if state["armed"] and torch.is_grad_enabled():
                    kill(where.format(state["steps"] + 1))

            layers[k].register_forward_pre_hook(pre_hook)
        elif point == "backward":

            def grad_hook(grad: torch.Tensor) -> None:
                kill(where.format(state["steps"] + 1))

            def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
                hidden = out[0] if isinstance(out, tuple) else out
                if state["armed"] and hidden.requires_grad:
                    hidden.register_hook(grad_hook)

            layers[k].register_forward_hook(hook)
        elif point == "optimizer":
            install_optimizer_kill(state, rng.randint(1, len(engine.updater.states)))
        return engine

    loop.build_engine = building
    add_callback(arm)
    if point == "checkpoint":
        install_checkpoint_kill(state, rng.choice(CHECKPOINT_STAGES))


def install_optimizer_kill(state: dict[str, Any], nth: int) -> None:
    """Kill after the ``nth`` block update once armed: that block's new state is written to the store, the
    step's other blocks are not updated yet."""
    apply = blockwise.BlockAdamW._apply
    calls = [0]

    def applying(self: blockwise.BlockAdamW, s: Any, lr: float, speculative: bool = False) -> None:
        apply(self, s, lr, speculative)
        if state["armed"]:
            calls[0] += 1
            if calls[0] == nth:
                kill(
                    f"optimizer update of block {s.flat.flat.block}, update {nth} after step {state['after']}"
                )

    blockwise.BlockAdamW._apply = applying


def install_checkpoint_kill(state: dict[str, Any], stage: str) -> None:
    """Kill the first checkpoint save once armed at ``stage``: its temporary directory holds some of the
    files, and it is not published."""
    save_checkpoint, write_torch, fsync_path = ckpt.save_checkpoint, blockwise.write_torch, ckpt._fsync_path
    saving: list[int] = []  # the steps of the saves made once armed

    def at(name: str) -> None:
        if saving and stage == name:
            kill(f"checkpoint save of step {saving[0]}, {stage}")

    def save(run_dir: Path, step: int, write: Any, keep: int) -> ckpt.Checkpoint:
        if state["armed"]:
            saving.append(step)

        def writing(directory: Path) -> None:
            write(directory)
            at("before the manifest")

        return save_checkpoint(run_dir, step, writing, keep)

    def torch_file(*args: Any, **kwargs: Any) -> None:
        at("before optimizer.pt")
        write_torch(*args, **kwargs)

    def fsync(path: Path) -> None:
        if path.name.startswith(".tmp-"):  # the last call before the rename that publishes it
            at("before the rename")
        fsync_path(path)

    ckpt.save_checkpoint, blockwise.write_torch, ckpt._fsync_path = save, torch_file, fsync


def install_hold(holding: Path, release: Path) -> None:
    def hold(row: dict[str, Any]) -> None:
        if row["step"] != 1:
            return
        holding.write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + 120
        while not release.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"{release} did not appear in two minutes")
            time.sleep(0.05)

    add_callback(hold)


def main() -> int:
    split = sys.argv.index("--")
    mode, *options = sys.argv[1:split]
    if mode == "kill":
        point, seed = options
        if point not in POINTS:
            raise SystemExit(f"unknown kill point {point!r}; choose one of {', '.join(POINTS)}")
        install_kill(point, int(seed))
    elif mode == "hold":
        install_hold(*map(Path, options))
    else:
        raise SystemExit(f"unknown mode {mode!r}: kill or hold")
    # As the tests' conftest does: no machine profile a `tiertune probe` here may have written.
    plan.DEFAULT_PROFILE = Path("/nonexistent/tiertune-machine-profile.json")
    return cli.main(["train", *sys.argv[split + 1 :]])


if __name__ == "__main__":
    raise SystemExit(main())
