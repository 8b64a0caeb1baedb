"""What the timing benchmarks share: a job stripped of everything but training steps, and a way to run one
without the optimizer's arithmetic."""

import contextlib
from collections.abc import Iterator

from tiertune.launch import engine
from tiertune.optim import blockwise

# No progress output, checkpoints, evaluation or warmup: the steps the benchmarks time are training alone.
TIMED_JOB = [
    "train.progress=off",
    "train.checkpoint_every=0",
    "train.eval_every=0",
    "train.eval_max_batches=1",
    "train.eval_exact_match_samples=0",
    "optim.warmup_steps=0",
]


class NoKernel:
    """An AdamW kernel that computes nothing: a step with it is everything but the update's arithmetic."""

    name = "none"

    def __call__(self, *args: object, **kwargs: object) -> None:
        pass


@contextlib.contextmanager
def without_arithmetic() -> Iterator[None]:
    """Engines built inside update with :class:`NoKernel` (the state still moves as usual)."""
    make_kernel = engine.make_kernel
    engine.make_kernel = lambda name: NoKernel()
    try:
        yield
    finally:
        engine.make_kernel = make_kernel


@contextlib.contextmanager
def recording_updaters() -> Iterator[list]:
    """The block optimizers built inside, in order (their counters say what the run did)."""
    made: list = []
    init = blockwise.BlockAdamW.__init__

    def recording(self, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    blockwise.BlockAdamW.__init__ = recording
    try:
        yield made
    finally:
        blockwise.BlockAdamW.__init__ = init
