"""kfp-finetune: fine-tune LLMs with torchtune on Kubeflow Pipelines.

The names mirror the Kubeflow Trainer SDK (``TorchTuneConfig``, ``TorchTuneInstructDataset``,
``LoraConfig``, ``HuggingFaceDatasetInitializer``, ...). Heavy modules (torch, torchtune, kfp)
are imported only when a function that needs them runs.
"""

from kfp_finetune.config.runtimes import RUNTIMES, Runtime, get_runtime
from kfp_finetune.config.types import (
    DataFormat,
    DataType,
    HuggingFaceDatasetInitializer,
    HuggingFaceModelInitializer,
    Initializer,
    LoraConfig,
    Loss,
    TorchTuneConfig,
    TorchTuneInstructDataset,
)
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
    "SourceError",
    "TorchTuneConfig",
    "TorchTuneInstructDataset",
    "TrainerClient",
    "TrainingError",
    "WorkspaceError",
    "get_runtime",
    "train",
]


def __getattr__(name: str):
    # train() and BuiltinTrainer pull in kfp; import them only when asked for.
    if name in ("train", "BuiltinTrainer"):
        from kfp_finetune.drivers import api

        return getattr(api, name)
    # The SDK-compatible client pulls in kubeflow, kfp and kubernetes: likewise on demand.
    if name in ("TrainerClient", "KfpBackendConfig", "LocalBackendConfig"):
        from kfp_finetune.drivers import client

        return getattr(client, name)
    raise AttributeError(f"module 'kfp_finetune' has no attribute {name!r}")
