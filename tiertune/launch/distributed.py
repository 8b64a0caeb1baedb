"""Several processes over torch.distributed: the ranks torchrun starts, and ``tiertune launch``.

``torchrun --nproc-per-node N -m tiertune train CONFIG`` (or ``tiertune launch --nproc-per-node N CONFIG``,
which takes every torchrun option) starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE`` and a rendezvous in their environment. :func:`join` makes them one process group:
NCCL between accelerators (each rank on its ``LOCAL_RANK``'s device), gloo on the CPU, plus a gloo group
for what lives in host memory. Every block's state is then sharded over the ranks (see
:mod:`tiertune.offload.shard`), each rank trains on its slice of every batch, and rank 0 writes the run's
files. Several machines join through torchrun's rendezvous (``--nnodes``, ``--rdzv-endpoint``); their
output directory must be one filesystem that every machine sees.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tiertune.errors import ConfigError
from tiertune.launch import progress
from tiertune.offload.shard import ShardGroup

# How long a rank waits in a collective for the others before it gives up. A rank that fails makes
# torchrun stop the others at once; this bounds the wait when the job was started some other way.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """What torchrun told this process (its environment)."""

    rank: int
    world: int
    local_rank: int
    local_world: int


def ranks_from_env(env: dict[str, str] | None = None) -> Ranks | None:
    """This process's place among the job's ranks, or None when it runs alone (no ``WORLD_SIZE`` > 1)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    try:
        rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except (KeyError, ValueError) as e:
        raise ConfigError(
            [
                f"WORLD_SIZE={world} but the rank is not set ({e}); start the job with torchrun or tiertune launch"
            ]
        ) from None
    return Ranks(rank, world, local_rank, local_world)


def device_of(ranks: Ranks | None, device: torch.device) -> torch.device:
    """The device this rank computes on: its ``LOCAL_RANK``'s accelerator."""
    if ranks is None or device.type != "cuda":
        return device
    if ranks.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            [
                f"rank {ranks.rank} is local rank {ranks.local_rank} of this machine, which has "
                f"{torch.cuda.device_count()} CUDA device(s); start at most that many processes per node"
            ]
        )
    return torch.device("cuda", ranks.local_rank)


@contextlib.contextmanager
def join(device: torch.device) -> Iterator[ShardGroup | None]:
    """The process group of the job's ranks while the block runs (None when this process runs alone).
    Only rank 0 speaks (progress, notes); every rank's errors still reach the terminal."""
    ranks = ranks_from_env()
    if ranks is None:
        yield None
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        cpu = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if backend == "nccl" else None
        progress.set_rank(ranks.rank)
        try:
            yield ShardGroup(ranks.rank, ranks.world, ranks.local_world, group=None, cpu_group=cpu)
        finally:
            progress.set_rank(None)
    finally:
        if created:
            dist.destroy_process_group()


def torchrun_argv(args: Sequence[str]) -> list[str]:
    """``tiertune launch``'s arguments as torchrun's: its own options first (any of torchrun's), then
    ``-m tiertune train`` and the job's (the config and its overrides, or nothing for the default job)."""
    from torch.distributed import run

    options = run.get_args_parser()._option_string_actions
    i = 0
    while i < len(args) and args[i].startswith("-"):
        name = args[i].split("=", 1)[0]
        action = options.get(name)
        if action is None:
            raise ConfigError(
                [f"tiertune launch: {name} is not an option of torchrun (see `torchrun --help`)"]
            )
        i += 1 if "=" in args[i] or action.nargs == 0 else 2
    if any(a in ("-m", "--module", "--no-python", "--no_python") for a in args[:i]):
        raise ConfigError(["tiertune launch runs `tiertune train` itself: drop -m / --no-python"])
    return [*args[:i], "-m", "tiertune", "train", *args[i:]]


def launch(args: Sequence[str]) -> int:
    """Run ``tiertune train`` on every rank through torchrun; the exit status of the first rank that
    failed (2: bad input, as for ``tiertune train``), else 0."""
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = torchrun_argv(args)
    try:
        run.main(argv)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        print(
            f"tiertune: rank {rank} failed with exit status {first.exitcode}; every rank "
            "was stopped (its message is above)",
            file=sys.stderr,
        )
        return first.exitcode if first.exitcode > 0 else 1
    return 0
