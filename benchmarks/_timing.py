"""What the timing benchmarks share: a job stripped of everything but training steps."""

# No progress output, checkpoints, evaluation or warmup: the steps the benchmarks time are training alone.
TIMED_JOB = [
    "train.progress=off",
    "train.checkpoint_every=0",
    "train.eval_every=0",
    "train.eval_max_batches=1",
    "train.eval_exact_match_samples=0",
    "optim.warmup_steps=0",
]
