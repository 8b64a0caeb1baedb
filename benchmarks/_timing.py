"""What the timing benchmarks share: a job stripped of everything but training steps, and a way to run one
without the optimizer's arithmetic."""

import contextlib
from collections.abc import Iterator

from tiertune.launch import engine

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
