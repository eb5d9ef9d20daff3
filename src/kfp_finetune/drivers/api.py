"""The Python entry point, shaped like the Kubeflow Trainer SDK's ``client.train(...)``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kfp_finetune.config.types import Initializer, TorchTuneConfig
from kfp_finetune.drivers.local import LocalRunResult, run_local
from kfp_finetune.errors import ConfigError
from kfp_finetune.storage.credentials import token_env


@dataclass
class BuiltinTrainer:
    """The trainer of a run: torchtune with ``config`` (as in ``kubeflow.trainer``)."""

    config: TorchTuneConfig


def train(
    runtime: str,
    initializer: Initializer,
    trainer: BuiltinTrainer | None = None,
    workspace: str | Path = "kfp-finetune-workspace",
    export_name: str = "",
) -> LocalRunResult:
    """Run the whole pipeline locally (kfp.local), like ``TrainerClient().train(...)``.

    Args:
        runtime: Runtime name, e.g. ``torchtune-llama3.2-tiny``.
        initializer: ``Initializer(dataset=HuggingFaceDatasetInitializer(...),
            model=HuggingFaceModelInitializer(...))``. An ``access_token`` given here is passed
            to the local tasks through the ``HF_TOKEN`` environment variable only.
        trainer: ``BuiltinTrainer(config=TorchTuneConfig(...))``; default config if None.
        workspace: Local folder used as the workspace volume.
        export_name: Folder under ``output/`` for the model ("" for the default).

    Returns:
        Where the fine-tuned model is and the loss per step.

    Raises:
        ConfigError: No dataset initializer was given.
        KfpFinetuneError: A step stopped on one of our errors: that error's own class and
            message (e.g. ``DatasetError`` for a column the data lacks), with the step's name
            in its ``step`` attribute; never kfp.local's generic "Inner task failed".
    """
    if not isinstance(initializer, Initializer):
        raise ConfigError(
            f"initializer={initializer!r} is not an Initializer; pass Initializer(dataset="
            "HuggingFaceDatasetInitializer(storage_uri=...), model="
            "HuggingFaceModelInitializer(storage_uri=...))."
        )
    if initializer.dataset is None:
        raise ConfigError(
            "initializer.dataset is missing; pass Initializer(dataset="
            "HuggingFaceDatasetInitializer(storage_uri=...), model=...)."
        )
    model = initializer.model
    tokens = {i.access_token for i in (initializer.dataset, model) if i and i.access_token}
    if len(tokens) > 1:
        raise ConfigError(
            "the dataset and model initializers carry different access tokens; one HF_TOKEN is "
            "used for both, so pass the same token (or set HF_TOKEN)."
        )
    config = trainer.config if trainer else TorchTuneConfig()
    with token_env(next(iter(tokens), None)):
        return run_local(
            runtime,
            model.storage_uri if model else "",
            initializer.dataset.storage_uri,
            config,
            workspace,
            export_name,
            model_ignore_patterns=list(model.ignore_patterns or []) if model else [],
        )
