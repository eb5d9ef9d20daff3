"""kfp-finetune: fine-tune LLMs with torchtune on Kubeflow Pipelines.

The types are the Kubeflow Trainer SDK's own (``kfp_finetune.LoraConfig is
kubeflow.trainer.LoraConfig``; likewise ``TorchTuneInstructDataset``, ``Initializer``, the
``HuggingFace*`` and ``S3*`` initializers, ``BuiltinTrainer``, ``Runtime`` and the enums), except
``TorchTuneConfig``: the SDK's with the settings it lacks (a subclass). Heavy modules (torch,
torchtune, kfp, and ``kubeflow.trainer``, whose package imports the Kubernetes client) are
imported only when a name that needs them is first used: ``import kfp_finetune.errors`` or
``kfp_finetune.storage`` stays light.
"""

from __future__ import annotations

from typing import Any

from kfp_finetune.errors import (
    ConfigError,
    DatasetError,
    KfpFinetuneError,
    ModelError,
    SourceError,
    TrainingError,
    WorkspaceError,
)
from kfp_finetune.version import __version__ as __version__  # defined once, for every layer

__all__ = [
    "RUNTIMES",
    "BuiltinTrainer",
    "ConfigError",
    "DataFormat",
    "DataType",
    "DatasetError",
    "HuggingFaceDatasetInitializer",
    "HuggingFaceModelInitializer",
    "Initializer",
    "KfpBackendConfig",
    "KfpFinetuneError",
    "LocalBackendConfig",
    "LoraConfig",
    "Loss",
    "ModelError",
    "Runtime",
    "S3DatasetInitializer",
    "S3ModelInitializer",
    "SourceError",
    "TorchTuneConfig",
    "TorchTuneInstructDataset",
    "TrainerClient",
    "TrainingError",
    "WorkspaceError",
    "get_runtime",
    "train",
]

_TYPES = ("BuiltinTrainer", "DataFormat", "DataType", "HuggingFaceDatasetInitializer",
          "HuggingFaceModelInitializer", "Initializer", "LoraConfig", "Loss", "Runtime",
          "S3DatasetInitializer", "S3ModelInitializer", "TorchTuneConfig",
          "TorchTuneInstructDataset")


def get_runtime(name: str) -> Any:
    """One of this project's runtimes as the Kubeflow SDK's ``Runtime`` (``train()`` takes it).

    Args:
        name: Runtime name, e.g. ``torchtune-llama3.2-1b`` (``kfp-finetune runtimes`` lists
            them).

    Returns:
        The SDK's ``kubeflow.trainer.Runtime``, as ``TrainerClient().get_runtime(name)``
        returns it. (The project's own description of a runtime is
        ``kfp_finetune.config.runtimes.RuntimeSpec``.)

    Raises:
        ConfigError: No runtime has that name; the message lists them.
    """
    from kfp_finetune.config.runtimes import sdk_runtime

    return sdk_runtime(name)


def __getattr__(name: str) -> Any:
    if name in _TYPES:
        from kfp_finetune.config import types

        return getattr(types, name)
    if name == "RUNTIMES":
        from kfp_finetune.config.runtimes import RUNTIMES

        return RUNTIMES
    # train() pulls in kfp; import it only when asked for.
    if name == "train":
        from kfp_finetune.drivers import api

        return api.train
    # The SDK-compatible client pulls in kubeflow, kfp and kubernetes: likewise on demand.
    if name in ("TrainerClient", "KfpBackendConfig", "LocalBackendConfig"):
        from kfp_finetune.drivers import client

        return getattr(client, name)
    raise AttributeError(f"module 'kfp_finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
