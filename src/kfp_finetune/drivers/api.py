"""The Python entry point, shaped like the Kubeflow Trainer SDK's ``client.train(...)``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kfp_finetune.config.types import BuiltinTrainer, Initializer
from kfp_finetune.drivers.client.sdk_adapter import check_job
from kfp_finetune.drivers.local import LocalRunResult, run_local

__all__ = ["BuiltinTrainer", "train"]


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in this process's environment (the local tasks inherit it), then restore."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train(
    runtime: Any,
    initializer: Initializer,
    trainer: BuiltinTrainer | None = None,
    workspace: str | Path = "kfp-finetune-workspace",
    export_name: str = "",
) -> LocalRunResult:
    """Run the whole pipeline locally (kfp.local), like ``TrainerClient().train(...)``.

    The arguments are checked as the client checks them (``sdk_adapter.check_job``): the
    Kubeflow SDK's objects are taken as they are.

    Args:
        runtime: Runtime name, e.g. ``torchtune-llama3.2-tiny``, or the SDK's ``Runtime`` that
            ``kfp_finetune.get_runtime(...)`` or ``TrainerClient().get_runtime(...)`` return.
        initializer: ``Initializer(dataset=HuggingFaceDatasetInitializer(...),
            model=HuggingFaceModelInitializer(...))`` (or the ``S3*`` initializers). An
            ``access_token`` (or S3 keys) given here reach the local tasks through the
            ``HF_TOKEN`` (``AWS_*``) environment variables only.
        trainer: ``BuiltinTrainer(config=TorchTuneConfig(...))`` with the SDK's
            ``TorchTuneConfig`` or ``kfp_finetune.TorchTuneConfig``; default config if None.
        workspace: Local folder used as the workspace volume.
        export_name: Folder under ``output/`` for the model ("" for the default).

    Returns:
        Where the fine-tuned model is and the loss per step.

    Raises:
        ConfigError: A missing, unsupported or invalid argument (before anything runs).
        SourceError: A storage URI is invalid.
        KfpFinetuneError: A step stopped on one of our errors: that error's own class and
            message (e.g. ``DatasetError`` for a column the data lacks), with the step's name
            in its ``step`` attribute; never kfp.local's generic "Inner task failed".
    """
    job = check_job(runtime, initializer, trainer)
    with _environment(job.credentials.secret_data()):
        return run_local(
            job.runtime,
            job.model_uri,
            job.dataset_uri,
            job.config,
            workspace,
            export_name,
            model_ignore_patterns=job.model_ignore_patterns,
        )
