"""What the Kubeflow SDK's ``train()`` arguments become: a checked request and its credentials.

``kubeflow.trainer`` users pass ``TorchTuneConfig``, ``LoraConfig``, ``TorchTuneInstructDataset``,
``Initializer`` with ``HuggingFace*``/``S3*`` initializers and a ``Runtime`` (or its name). These
ARE this project's types (``kfp_finetune.config.types``), so nothing is converted: they are
checked (:func:`check_job`, the one path of ``kfp_finetune.train()`` and both
``TrainerClient`` backends; the checks are ``kfp_finetune.config.validation``'s, which the CLI's
``TorchTuneConfig`` runs too) and the credentials are taken out of them, to reach the run
through a Secret or the environment, never a pipeline parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kfp_finetune.config.runtimes import runtime_name as runtime_name
from kfp_finetune.config.runtimes import sdk_runtime as sdk_runtime
from kfp_finetune.config.types import (
    BuiltinTrainer,
    Initializer,
    TorchTuneConfig,
    normalize_config,
    normalize_initializer,
)
from kfp_finetune.errors import ConfigError

# S3 initializer field -> the environment variable (Secret key) the pipeline's tasks read.
S3_FIELDS = {
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "endpoint": "AWS_ENDPOINT_URL",
    "region": "AWS_DEFAULT_REGION",
}
HF_KEY = "HF_TOKEN"


@dataclass(frozen=True)
class Credentials:
    """What a run needs in its per-run Secret: Secret key -> value. Never printed."""

    hf: dict[str, str] = field(default_factory=dict, repr=False)
    s3: dict[str, str] = field(default_factory=dict, repr=False)

    def secret_data(self) -> dict[str, str]:
        """All keys of the per-run Secret."""
        return {**self.hf, **self.s3}

    def values(self) -> tuple[str, ...]:
        """The secret values, for redaction."""
        return tuple(v for k, v in self.secret_data().items()
                     if k in (HF_KEY, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))


@dataclass(frozen=True)
class JobRequest:
    """A validated request: the runtime, the pipeline parameters and the credentials apart."""

    runtime: str
    arguments: dict[str, Any]
    credentials: Credentials = field(default_factory=Credentials, repr=False)


@dataclass(frozen=True)
class CheckedJob:
    """The SDK's ``train()`` arguments, checked: what a local run or a pipeline run needs."""

    runtime: str
    dataset_uri: str
    model_uri: str
    config: TorchTuneConfig
    model_ignore_patterns: list[str]
    credentials: Credentials = field(default_factory=Credentials, repr=False)


def _trainer_config(trainer: Any) -> TorchTuneConfig:
    if trainer is None:
        return normalize_config(None)
    if not isinstance(trainer, BuiltinTrainer):
        raise ConfigError(
            f"trainer={type(trainer).__name__}(...) is not supported: this client runs the "
            "torchtune fine-tuning pipeline; pass BuiltinTrainer(config=TorchTuneConfig(...))."
        )
    return normalize_config(trainer.config)


def _merge(into: dict[str, str], key: str, value: str | None, owner: str) -> None:
    if not value:
        return
    if into.get(key, value) != value:
        raise ConfigError(
            f"the dataset and model initializers give different values for {key} ({owner}); "
            "a run has one Secret for both, so give the same value to both."
        )
    into[key] = value


def _credentials(initializers: list[Any]) -> Credentials:
    hf: dict[str, str] = {}
    s3: dict[str, str] = {}
    for init in initializers:
        owner = type(init).__name__
        if getattr(init, "role_arn", None):
            raise ConfigError(
                f"{owner}(role_arn=...) is not supported: the pipeline's tasks read static "
                "keys; pass access_key_id and secret_access_key, or give the pods a role "
                "through their service account."
            )
        _merge(hf, HF_KEY, getattr(init, "access_token", None), owner)
        for attr, key in S3_FIELDS.items():
            _merge(s3, key, getattr(init, attr, None), owner)
    return Credentials(hf=hf, s3=s3)


def check_job(runtime: Any, initializer: Any, trainer: Any) -> CheckedJob:
    """Check the SDK's ``train()`` arguments (the path of ``train()`` and the client).

    Args:
        runtime: A runtime name, the SDK's ``Runtime`` (``get_runtime()``'s) or a
            ``RuntimeSpec``.
        initializer: ``Initializer(dataset=..., model=...)`` with the SDK's HF or S3
            initializers.
        trainer: ``BuiltinTrainer(config=TorchTuneConfig(...))`` (the SDK's config or ours),
            or None for the defaults.

    Returns:
        The runtime name, the URIs, the checked config and the credentials apart.

    Raises:
        ConfigError: Anything is missing, unsupported or invalid (before anything runs).
        SourceError: A storage URI is invalid.
    """
    name = runtime_name(runtime)
    if not isinstance(initializer, Initializer):
        shown = "None" if initializer is None else f"{type(initializer).__name__}(...)"
        raise ConfigError(
            f"initializer={shown} is not an Initializer; pass Initializer(dataset="
            "HuggingFaceDatasetInitializer(storage_uri=...), model="
            "HuggingFaceModelInitializer(storage_uri=...))."
        )
    if initializer.dataset is None:
        raise ConfigError(
            "initializer.dataset is missing; pass Initializer(dataset="
            "HuggingFaceDatasetInitializer(storage_uri=...), model=...)."
        )
    dataset = normalize_initializer(initializer.dataset, "dataset")
    model = normalize_initializer(initializer.model, "model")
    config = _trainer_config(trainer)
    credentials = _credentials([i for i in (initializer.dataset, initializer.model) if i])
    return CheckedJob(name, dataset.storage_uri, model.storage_uri if model else "", config,
                      list(model.ignore_patterns or []) if model else [], credentials)


def to_request(runtime: Any, initializer: Any, trainer: Any,
               export_name: str = "") -> JobRequest:
    """Check the SDK's ``train()`` arguments and turn them into pipeline parameters.

    Args:
        runtime: A runtime name, the SDK's ``Runtime`` or a ``RuntimeSpec``.
        initializer: ``Initializer(dataset=..., model=...)``.
        trainer: ``BuiltinTrainer(config=TorchTuneConfig(...))`` or None.
        export_name: Folder under ``output/`` for the model ("" for the default).

    Returns:
        The runtime name, the pipeline parameters (no credentials) and the credentials.

    Raises:
        ConfigError: Anything is missing, unsupported or invalid (before anything runs).
    """
    from kfp_finetune.drivers.local import pipeline_arguments

    job = check_job(runtime, initializer, trainer)
    arguments = pipeline_arguments(job.runtime, job.model_uri, job.dataset_uri, job.config,
                                   export_name, job.model_ignore_patterns)
    return JobRequest(job.runtime, arguments, job.credentials)
