"""Errors a user can cause. Each message says what happened, why, and how to fix it."""


class MlfabError(Exception):
    """Base class of mlfab's user-facing errors."""


class ConfigError(MlfabError, ValueError):
    """A config key, value or file is wrong."""


class SettingsError(MlfabError):
    """A user setting (`~/.mlfab.yml` or its environment variables) is missing or wrong."""


class TaskDefinitionError(MlfabError, TypeError):
    """A Task subclass is declared or implemented in a way mlfab cannot use."""


class DatasetError(MlfabError):
    """`get_dataset` failed or returned something that is not a dataset."""


class CheckpointError(MlfabError):
    """A checkpoint cannot be written, read, or used for this task."""


class NonFiniteError(MlfabError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class SlurmError(MlfabError):
    """Submitting to Slurm failed, or a Slurm setting is wrong."""
