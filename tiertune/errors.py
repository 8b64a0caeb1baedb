"""The project's exception hierarchy.

Every error a user can cause (a bad config, a missing dataset, a corrupt checkpoint, an output directory
in use) is a :class:`TiertuneError` whose message says what is wrong and what to do. The CLI prints
these without a traceback and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TiertuneError(Exception):
    """Base class of every error caused by input the user can fix."""


class ConfigError(TiertuneError):
    """A job config is invalid. ``problems`` lists every problem found, each naming its dotted key."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s){where}:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DataError(TiertuneError):
    """A dataset cannot be read or is unusable (missing file, bad JSON line, no usable rows)."""


class ModelError(TiertuneError):
    """A model cannot be built or loaded (unknown preset, incomplete model directory)."""


class CheckpointError(TiertuneError):
    """A checkpoint is incomplete, altered or from an incompatible job; it is never loaded."""


class RunDirError(TiertuneError):
    """The output directory cannot be used (in use by another job, holds another job's checkpoints)."""
