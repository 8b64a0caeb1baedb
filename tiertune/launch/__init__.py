"""The job runner: CLI, models, data, the training loop, checkpoints."""
