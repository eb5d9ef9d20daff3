"""The one place that turns the Kubeflow SDK's objects into this project's config and arguments.

``kubeflow.trainer`` users pass ``TorchTuneConfig``, ``LoraConfig``, ``TorchTuneInstructDataset``,
``Initializer`` with ``HuggingFace*``/``S3*`` initializers and a ``Runtime`` (or its name); the
pipeline takes flat parameters and reads credentials from a Kubernetes Secret. This module maps
the first onto the second and keeps every credential out of the parameters. The project's own
copies of these types (``kfp_finetune.config.types``) are accepted too. When the SDK's types
become the
project's own (issue 11), this module is what gets replaced; the client does not change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kfp_finetune.config import types as ours
from kfp_finetune.config.runtimes import RUNTIMES, get_runtime
from kfp_finetune.errors import ConfigError

# The SDK's model initializers default to these (kubeflow.trainer.constants.constants
# INITIALIZER_DEFAULT_IGNORE_PATTERNS). Our model step already skips other weight formats
# unless a repository has nothing else, which that default would break, so it means "not set".
SDK_DEFAULT_IGNORE = ("*.msgpack", "*.h5", "*.bin", "*.pt", "*.pth")
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


def runtime_name(runtime: Any) -> str:
    """The runtime's name from a name, the SDK's ``Runtime`` or ``kfp_finetune.Runtime``.

    Raises:
        ConfigError: None was given, or the name is not one of this project's runtimes.
    """
    if runtime is None:
        raise ConfigError(
            f"runtime is missing; pass one of {', '.join(RUNTIMES)} or "
            "client.get_runtime(name)."
        )
    name = runtime if isinstance(runtime, str) else getattr(runtime, "name", None)
    if not isinstance(name, str):
        raise ConfigError(
            f"runtime={runtime!r} is neither a runtime name nor a Runtime; pass e.g. "
            "'torchtune-llama3.2-1b' or client.get_runtime('torchtune-llama3.2-1b')."
        )
    return get_runtime(name).name


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _convert(obj: Any, target: type) -> Any:
    """A dataclass of the SDK (or ours) as ``target``, field by field, enums as their values."""
    if obj is None or isinstance(obj, target):
        return obj
    if not dataclasses.is_dataclass(obj) or type(obj).__name__ != target.__name__:
        raise ConfigError(
            f"{obj!r} is not a {target.__name__}; pass kubeflow.trainer.{target.__name__}(...)."
        )
    known = {f.name for f in dataclasses.fields(target)}
    kwargs = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
              if f.name in known}
    return target(**kwargs)


def to_config(config: Any) -> ours.TorchTuneConfig:
    """The project's ``TorchTuneConfig`` for the SDK's (or our own) ``TorchTuneConfig``.

    Raises:
        ConfigError: A value is out of range (the project's validation, same messages).
    """
    if config is None:
        return ours.TorchTuneConfig()
    if isinstance(config, ours.TorchTuneConfig):
        return config
    if type(config).__name__ != "TorchTuneConfig":
        raise ConfigError(
            f"BuiltinTrainer(config={config!r}) is not a TorchTuneConfig; pass "
            "BuiltinTrainer(config=TorchTuneConfig(...))."
        )
    return ours.TorchTuneConfig(
        dtype=_plain(config.dtype),
        batch_size=config.batch_size,
        epochs=config.epochs,
        loss=_plain(config.loss),
        num_nodes=config.num_nodes,
        peft_config=_convert(config.peft_config, ours.LoraConfig),
        dataset_preprocess_config=_convert(
            config.dataset_preprocess_config, ours.TorchTuneInstructDataset),
        resources_per_node=config.resources_per_node,
    )


def _trainer_config(trainer: Any) -> ours.TorchTuneConfig:
    if trainer is None:
        return ours.TorchTuneConfig()
    if type(trainer).__name__ != "BuiltinTrainer":
        raise ConfigError(
            f"trainer={type(trainer).__name__}(...) is not supported: this client runs the "
            "torchtune fine-tuning pipeline; pass BuiltinTrainer(config=TorchTuneConfig(...))."
        )
    return to_config(trainer.config)


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


def _storage_uri(init: Any, role: str) -> str:
    name = type(init).__name__
    allowed = ("HuggingFace", "S3")
    if not name.startswith(allowed) or not isinstance(getattr(init, "storage_uri", None), str):
        raise ConfigError(
            f"initializer.{role}={name}(...) is not supported; use "
            f"HuggingFace{role.title()}Initializer or S3{role.title()}Initializer "
            "(hf://, s3://, file:// or /absolute/path URIs)."
        )
    return init.storage_uri


def to_request(runtime: Any, initializer: Any, trainer: Any,
               export_name: str = "") -> JobRequest:
    """Validate the SDK's ``train()`` arguments and turn them into pipeline parameters.

    Args:
        runtime: A runtime name, the SDK's ``Runtime`` or ``kfp_finetune.Runtime``.
        initializer: ``Initializer(dataset=..., model=...)`` (the SDK's or ours).
        trainer: ``BuiltinTrainer(config=TorchTuneConfig(...))`` or None.
        export_name: Folder under ``output/`` for the model ("" for the default).

    Returns:
        The runtime name, the pipeline parameters (no credentials) and the credentials.

    Raises:
        ConfigError: Anything is missing, unsupported or invalid (before anything runs).
    """
    from kfp_finetune.drivers.local import pipeline_arguments

    name = runtime_name(runtime)
    if initializer is None or getattr(initializer, "dataset", None) is None:
        raise ConfigError(
            "initializer.dataset is missing; pass Initializer(dataset="
            "HuggingFaceDatasetInitializer(storage_uri=...), model=...)."
        )
    dataset, model = initializer.dataset, initializer.model
    dataset_uri = _storage_uri(dataset, "dataset")
    model_uri = _storage_uri(model, "model") if model is not None else ""
    if getattr(dataset, "ignore_patterns", None):
        raise ConfigError(
            f"{type(dataset).__name__}(ignore_patterns={dataset.ignore_patterns!r}) is not "
            "supported: point storage_uri at the data directory or file to use instead."
        )
    patterns = list(getattr(model, "ignore_patterns", None) or [])
    if tuple(patterns) == SDK_DEFAULT_IGNORE:
        patterns = []
    arguments = pipeline_arguments(
        name, model_uri, dataset_uri, _trainer_config(trainer), export_name, patterns)
    inits = [i for i in (dataset, model) if i is not None]
    return JobRequest(name, arguments, _credentials(inits))


def sdk_runtime(name: str) -> Any:
    """The SDK's ``Runtime`` for one of this project's runtimes (what ``get_runtime`` returns)."""
    from kubeflow.common.constants import UNKNOWN
    from kubeflow.trainer.types import types

    from kfp_finetune.config.images import TRAINER_IMAGE

    rt = get_runtime(name)
    trainer = types.RuntimeTrainer(
        trainer_type=types.TrainerType.BUILTIN_TRAINER,
        framework=types.TORCH_TUNE,
        image=TRAINER_IMAGE,
        num_nodes=1,
        device="gpu" if rt.default_gpus else "cpu",
        device_count=str(rt.default_gpus) if rt.default_gpus else UNKNOWN,
    )
    trainer.set_command(("tune", "run"))
    return types.Runtime(
        name=rt.name, trainer=trainer, kind=types.RuntimeKind.CLUSTER_TRAINING_RUNTIME,
        pretrained_model=rt.model_uri or None,
    )
