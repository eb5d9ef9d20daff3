"""Error classes: each names the bad value, what was expected and how to fix it."""

from __future__ import annotations


class KfpFinetuneError(ValueError):
    """Base class of every error this project raises on purpose."""


class ConfigError(KfpFinetuneError):
    """A parameter (runtime, dtype, batch size, column map, ...) is not valid."""


class SourceError(KfpFinetuneError):
    """A storage URI is malformed, unsupported, or names something that does not exist."""


class DatasetError(KfpFinetuneError):
    """The dataset does not match the requested preprocessing config."""


class ModelError(KfpFinetuneError):
    """The model folder is incomplete or does not match the runtime."""


class TrainingError(KfpFinetuneError):
    """torchtune failed or produced no checkpoint."""


class WorkspaceError(KfpFinetuneError):
    """The workspace is not usable (missing step output, locked, or unwritable)."""
