"""Experiment tracking settings: MLflow and Weights & Biases, checked before anything runs.

Only *where* to log travels as a setting (it is shown in the KFP UI and written into the
rendered torchtune config). Credentials never do: they come from the environment, filled on a
cluster from the Kubernetes Secret named by the pipeline's tracking Secret (keys below, each
optional), and locally from the shell:

* MLflow: ``MLFLOW_TRACKING_TOKEN`` (bearer token), or ``MLFLOW_TRACKING_USERNAME`` and
  ``MLFLOW_TRACKING_PASSWORD`` (basic auth) — the variables the MLflow client itself reads;
* W&B: ``WANDB_API_KEY``, and ``WANDB_BASE_URL`` for a self-hosted W&B server.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

from kfp_finetune.errors import ConfigError
from kfp_finetune.storage.credentials import redact

TRACKING_SECRET_KEYS = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "WANDB_API_KEY",
    "WANDB_BASE_URL",
)
DEFAULT_TRACKING_SECRET = "tracking-credentials"
DEFAULT_MLFLOW_EXPERIMENT = "kfp-finetune"
PIP_EXTRA = "pip install 'kfp-finetune[tracking]'"
# W&B refuses these in project and entity names (wandb/sdk/wandb_setup.py and the web app's
# project-name rule: no '/', '\\', '#', '?', '%', ':'; at most 128 characters).
_WANDB_NAME = re.compile(r"^[^/\\#?%:\s]{1,128}$")
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]{1,500}$")


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run is tracked. Empty strings mean "not used".

    Attributes:
        mlflow_tracking_uri: ``http(s)://host[:port][/path]`` of an MLflow tracking server.
        mlflow_experiment: MLflow experiment (created when missing).
        wandb_project: W&B project.
        wandb_entity: W&B entity (team or user; "" for the API key's default).
        run_name: Name of the tracked run ("" for the tracker's own choice).
    """

    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = ""
    wandb_project: str = ""
    wandb_entity: str = ""
    run_name: str = ""

    @property
    def mlflow(self) -> bool:
        """Whether MLflow is used."""
        return bool(self.mlflow_tracking_uri)

    @property
    def wandb(self) -> bool:
        """Whether W&B is used."""
        return bool(self.wandb_project)

    @property
    def enabled(self) -> bool:
        """Whether any tracker is used."""
        return self.mlflow or self.wandb

    def to_dict(self) -> dict[str, str]:
        """Plain-dict form (for the rendered config and the run's state file)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrackingConfig:
        """The inverse of :meth:`to_dict` (unknown keys ignored)."""
        data = data or {}
        return cls(**{k: str(data.get(k) or "") for k in cls.__dataclass_fields__})


def check_mlflow_uri(uri: str) -> str:
    """Check an MLflow tracking URI's syntax (no network).

    Raises:
        ConfigError: It is not ``http(s)://host[:port][/path]``, or it carries credentials
            (user info, a token in the query).
    """
    shown = redact(uri)
    hint = ("write http(s)://host[:port][/path] of an MLflow tracking server, e.g. "
            "http://mlflow.mlflow.svc:5000")
    if not isinstance(uri, str) or uri != uri.strip() or not uri:
        raise ConfigError(f"track_mlflow_uri={shown!r} is empty or has spaces; {hint}.")
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(
            f"track_mlflow_uri={shown!r} has scheme {parts.scheme or 'none'!r}; {hint} "
            "(local file or database stores are not reachable from a pipeline's pods)."
        )
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise ConfigError(
            f"track_mlflow_uri={shown!r} carries credentials or a query; credentials come "
            "only from the tracking Secret (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME "
            f"and MLFLOW_TRACKING_PASSWORD); {hint}."
        )
    try:
        host, _ = parts.hostname, parts.port
    except ValueError:
        host = None
    if not host or re.search(r"[\s<>\"{}|\\^`]", uri):
        raise ConfigError(f"track_mlflow_uri={shown!r} has no valid host or port; {hint}.")
    return uri.rstrip("/")


def _check_name(value: str, parameter: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ConfigError(f"{parameter}={redact(repr(value))[:140]} is not a valid {what}.")
    return value


def tracking_config(
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "",
    wandb_project: str = "",
    wandb_entity: str = "",
    run_name: str = "",
) -> TrackingConfig | None:
    """Check the tracking settings and return them, or None when no tracker is asked for.

    Args:
        mlflow_tracking_uri: MLflow tracking server URL ("" for no MLflow).
        mlflow_experiment: MLflow experiment ("" for ``kfp-finetune``).
        wandb_project: W&B project ("" for no W&B).
        wandb_entity: W&B entity ("" for the API key's default).
        run_name: Name of the tracked run ("" for the tracker's choice).

    Raises:
        ConfigError: A setting is malformed, or one is given without what it belongs to (an
            experiment without a tracking URI, an entity without a project).
    """
    uri = (mlflow_tracking_uri or "").strip()
    experiment = (mlflow_experiment or "").strip()
    project, entity = (wandb_project or "").strip(), (wandb_entity or "").strip()
    if experiment and not uri:
        raise ConfigError(
            f"track_mlflow_experiment={experiment!r} is set but track_mlflow_uri is empty; give "
            "the MLflow tracking server's URL too, or leave both empty."
        )
    if entity and not project:
        raise ConfigError(
            f"track_wandb_entity={entity!r} is set but track_wandb_project is empty; give the "
            "W&B project too, or leave both empty."
        )
    if uri:
        uri = check_mlflow_uri(uri)
        experiment = _check_name(experiment or DEFAULT_MLFLOW_EXPERIMENT,
                                 "track_mlflow_experiment",
                                 _PRINTABLE, "MLflow experiment name (1-500 printable "
                                 "characters)")
    if project:
        _check_name(project, "track_wandb_project", _WANDB_NAME,
                    "W&B project name (1-128 characters, none of / \\ # ? % : or spaces)")
    if entity:
        _check_name(entity, "track_wandb_entity", _WANDB_NAME,
                    "W&B entity name (1-128 characters, none of / \\ # ? % : or spaces)")
    if run_name:
        _check_name(run_name, "track_run_name", _PRINTABLE, "run name (1-500 printable characters)")
    config = TrackingConfig(uri, experiment, project, entity, run_name or "")
    return config if config.enabled else None


def require_client(module: str) -> Any:
    """Import ``mlflow`` or ``wandb``, or say which pip extra brings it.

    Raises:
        ConfigError: The package is not installed.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"experiment tracking with {'MLflow' if module == 'mlflow' else 'W&B'} needs the "
            f"{module!r} package, which is not installed here; {PIP_EXTRA} (the project's "
            "trainer and CPU images have it)."
        ) from None
