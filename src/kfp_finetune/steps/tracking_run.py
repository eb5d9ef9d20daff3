"""Experiment tracking in the steps: what the fine-tune and export steps send to MLflow / W&B.

* The fine-tune step renders ``metric_logger`` with our plug-in
  (:mod:`kfp_finetune.plugins.metric_logger`) when tracking is on: it opens the tracked run,
  logs the params and every step's loss, lr and tokens/s from inside ``tune run``.
* After training, :func:`record_training` logs the step's final figures (whatever numeric
  metrics the step reports: final/best loss, steps, eval metrics...) to the same run. A run that
  was not tracked while training (a finished run found on the volume, or a tracker that was down
  then) is created now and gets the params and the per-step history from ``metrics.txt``.
* :func:`record_export` records where the model went (folder, push destinations).

The run's id is kept in ``<output_dir>/logs/tracking.json`` on the volume, so every step and a
retried attempt log to one run. No function here raises for a tracker problem: one warning,
and the step goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kfp_finetune.config.tracking import TrackingConfig, require_client
from kfp_finetune.storage.credentials import redact

DISK_LOGGER = "torchtune.training.metric_logging.DiskLogger"
TRACKING_LOGGER = "kfp_finetune.plugins.metric_logger.TrackingLogger"


def metric_logger_conf(
    output_dir: Path, tracking: TrackingConfig | None = None, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The torchtune ``metric_logger`` section: DiskLogger, or with tracking on our plug-in.

    The plug-in writes the very same ``logs/metrics.txt`` (the step's Metrics and loss chart
    read it) and also forwards each step to MLflow and/or W&B.

    Args:
        output_dir: torchtune's output_dir.
        tracking: The run's tracking settings, or None.
        params: Params for the trackers (redacted here: they are saved in the config).
    """
    conf: dict[str, Any] = {"_component_": DISK_LOGGER, "log_dir": str(output_dir / "logs"),
                            "filename": "metrics.txt"}
    if tracking is not None and tracking.enabled:
        conf.update(_component_=TRACKING_LOGGER, tracking=tracking.to_dict(),
                    params=_redacted(params or {}))
    return conf


def _redacted(data: Any) -> Any:
    if isinstance(data, dict):
        return {str(k): _redacted(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_redacted(v) for v in data]
    if isinstance(data, str):
        return redact(data)
    return data


def check_tracking(tracking: TrackingConfig | None) -> None:
    """Before training: the client package of every configured tracker is installed.

    Raises:
        ConfigError: One is missing; the message names the pip extra.
    """
    if tracking is None:
        return
    if tracking.mlflow:
        require_client("mlflow")
    if tracking.wandb:
        require_client("wandb")


def state_path(checkpoints_dir: Path) -> Path:
    """Where the tracked run's ids are kept (beside ``metrics.txt``)."""
    from kfp_finetune.storage.trackers import STATE_FILE

    return Path(checkpoints_dir) / "logs" / STATE_FILE


def step_params(ws: Any, runtime: str, resolved: dict[str, Any], recipe: str,
                config: str) -> dict[str, Any]:
    """The params of a tracked run: runtime, recipe, data and model sources, resolved config.

    Args:
        ws: The :class:`~kfp_finetune.storage.workspace.Workspace` (its initializers'
            manifests name the data and model sources, already without credentials).
        runtime: Runtime name.
        resolved: ``ResolvedConfig.to_dict()``.
        recipe: torchtune recipe.
        config: torchtune base config.
    """
    from kfp_finetune.storage.workspace import read_manifest

    sources = {f"{kind}_uri": (read_manifest(folder) or {}).get("source")
               for kind, folder in (("dataset", ws.dataset_dir), ("model", ws.model_dir))}
    return _redacted({"runtime": runtime, "recipe": recipe, "torchtune_config": config,
                      **sources, "resolved": resolved})


@contextmanager
def training(tracking: TrackingConfig | None, ws: Any, runtime: str, resolved: dict[str, Any],
             log: Any) -> Iterator[list[Any]]:
    """Around the fine-tune step's work: its result is logged, its failure marked.

    The body appends its ``TrainSummary`` to the yielded list. A ``KfpFinetuneError`` marks
    the tracked run FAILED (when the training process had opened one) and is re-raised.
    """
    from kfp_finetune.errors import KfpFinetuneError

    done: list[Any] = []
    try:
        yield done
    except KfpFinetuneError:
        record_failure(tracking, ws.checkpoints_dir, log)
        raise
    if done and tracking is not None:
        result = done[0]
        params = step_params(ws, runtime, resolved, result.recipe, result.config)
        record_training(tracking, ws.checkpoints_dir, result.metrics, params, log)


def _open(tracking: TrackingConfig, checkpoints_dir: Path, log: Any) -> Any:
    from kfp_finetune.storage.trackers import Trackers

    return Trackers(tracking, state_path(checkpoints_dir), log)


def record_training(
    tracking: TrackingConfig | None,
    checkpoints_dir: Path,
    metrics: dict[str, Any],
    params: dict[str, Any],
    log: Any,
) -> None:
    """Log the step's final metrics to the tracked run (see the module docstring).

    Args:
        tracking: The settings (None: nothing happens).
        checkpoints_dir: torchtune's output_dir (holds ``logs/``).
        metrics: The step's metrics; every finite number is logged.
        params: The run's params, logged when the run is new here.
        log: Where warnings go.
    """
    if tracking is None or not tracking.enabled:
        return
    from kfp_finetune.steps.training_log import read_metric_rows

    rows = read_metric_rows(Path(checkpoints_dir) / "logs")
    trackers = _open(tracking, Path(checkpoints_dir), log)
    if not trackers.active:
        return
    trackers.log_params(params, new_only=True)
    trackers.log_rows([(int(r["step"]), {k: v for k, v in r.items() if k != "step"})
                       for r in rows], new_only=True)
    last = int(rows[-1]["step"]) if rows else 0
    trackers.log_summary(metrics, last)
    trackers.set_tags({"kfp_finetune.checkpoint_dir": str(checkpoints_dir)})
    trackers.finish(ok=True)


def record_failure(tracking: TrackingConfig | None, checkpoints_dir: Path, log: Any) -> None:
    """Mark the run the training process opened as FAILED (nothing when none was opened)."""
    if tracking is None or not state_path(checkpoints_dir).is_file():
        return
    _open(tracking, Path(checkpoints_dir), log).finish(ok=False)


def record_export(
    tracking: TrackingConfig | None,
    checkpoints_dir: Path,
    path: str,
    destinations: list[str],
    log: Any,
) -> None:
    """Record where the exported model is (folder on the volume, push destinations)."""
    if tracking is None or not tracking.enabled:
        return
    trackers = _open(tracking, Path(checkpoints_dir), log)
    tags = {"kfp_finetune.model_path": path}
    if destinations:
        tags["kfp_finetune.model_destinations"] = ", ".join(destinations)
    trackers.set_tags(tags)
    trackers.finish(ok=True)
