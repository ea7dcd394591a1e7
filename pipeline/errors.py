"""User-facing errors: the CLI prints their message on one line and exits 2.

Tracebacks are for our bugs; these are for the user's input (config, CLI, shards,
checkpoints, models). Every message names the key, file or object that is wrong.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for errors caused by user input rather than by a bug."""

    exit_code = 2


class ConfigError(PipelineError):
    """A config key is unknown, mistyped, out of range, or points at nothing."""


class DataError(PipelineError):
    """A shard, record or manifest is missing, unreadable or malformed."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, corrupt, or does not fit the current config."""


class ModelContractError(PipelineError):
    """A model cannot be loaded or does not honour the three-input logit contract."""


class BoundedHeadError(ModelContractError):
    """The model's output passes through a non-negative/bounded op (the ReLU->sigmoid bug)."""
