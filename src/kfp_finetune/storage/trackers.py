"""Clients of the experiment trackers (MLflow, W&B): bounded in time, never fatal to a run.

:class:`Trackers` holds one client per configured tracker. Every call to a tracker is bounded
in time (the network timeout of :mod:`kfp_finetune.storage.network`, few retries); when one
fails, one warning names the tracker and the problem, and that tracker is left alone for the
rest of the process, so a tracker outage never stops or slows a training run.

A run is identified by a small state file (the tracker, its address and the run id, never a
credential), so that the training process, a retried attempt, the fine-tune step's summary and
the export step all log to the same tracked run.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kfp_finetune.config.tracking import TrackingConfig, require_client
from kfp_finetune.storage.credentials import redact
from kfp_finetune.storage.network import network_problem, network_timeout

STATE_FILE = "tracking.json"
_MLFLOW_PARAM_CHARS = 6000  # MLflow's longest param value (mlflow/utils/validation.py)
_MLFLOW_BATCH_PARAMS = 100  # MAX_PARAMS_TAGS_PER_BATCH
_MLFLOW_BATCH_METRICS = 1000  # MAX_METRICS_PER_BATCH


def numeric(payload: dict[str, Any]) -> dict[str, float]:
    """The finite numeric values of ``payload`` as floats (tensors and numpy scalars too)."""
    out: dict[str, float] = {}
    for key, value in payload.items():
        if isinstance(value, bool):
            continue
        item = getattr(value, "item", None)
        try:
            number = float(item() if callable(item) else value)
        except (TypeError, ValueError, RuntimeError):
            continue
        if math.isfinite(number):
            out[str(key)] = number
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists as JSON text."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


_MLFLOW_SET = "KFP_FINETUNE_MLFLOW_BOUNDS"  # which bounds kfp-finetune set (child processes too)


def bound_mlflow_requests() -> None:
    """Bound every MLflow HTTP request of this process (its defaults: 120 s, 7 retries).

    The MLflow client reads these variables at each request (``mlflow/utils/rest_utils.py``,
    ``http_request``). A value the user set in the environment is kept; one that kfp-finetune
    set earlier (in this process or the parent) follows the current network timeout.
    """
    wanted = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(network_timeout()))),
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    try:
        ours = json.loads(os.environ.get(_MLFLOW_SET, "{}"))
    except ValueError:
        ours = {}
    for name, value in wanted.items():
        current = os.environ.get(name)
        if current is None or current == ours.get(name):
            os.environ[name] = ours[name] = value
    os.environ[_MLFLOW_SET] = json.dumps(ours)


class MlflowRun:
    """One MLflow run, created in (or resumed from) the configured experiment."""

    name = "MLflow"

    def __init__(self, config: TrackingConfig, state: dict[str, Any] | None) -> None:
        """Connect, find or create the experiment, and create or resume the run."""
        require_client("mlflow")
        bound_mlflow_requests()
        from mlflow.tracking import MlflowClient

        self.where = f"{config.mlflow_tracking_uri} (experiment {config.mlflow_experiment!r})"
        self.client = MlflowClient(tracking_uri=config.mlflow_tracking_uri)
        self.resumed = bool(state and state.get("uri") == config.mlflow_tracking_uri
                            and state.get("experiment") == config.mlflow_experiment
                            and state.get("run_id"))
        if self.resumed:
            assert state is not None
            self.run_id = str(state["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(config.mlflow_experiment)
            experiment_id = (found.experiment_id if found is not None
                             else self.client.create_experiment(config.mlflow_experiment))
            run = self.client.create_run(experiment_id, run_name=config.run_name or None,
                                         tags={"kfp_finetune": "true"})
            self.run_id = run.info.run_id
        self.state = {"uri": config.mlflow_tracking_uri, "experiment": config.mlflow_experiment,
                      "run_id": self.run_id}

    def log_params(self, params: dict[str, str]) -> None:
        """Log params (MLflow refuses to change one: a resumed run keeps its first values)."""
        from mlflow.entities import Param

        if self.resumed:
            return
        items = [Param(k[:250], v[:_MLFLOW_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _MLFLOW_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + _MLFLOW_BATCH_PARAMS])

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Log each ``(step, {metric: value})`` as metric history at that step."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for step, row in rows for k, v in row.items()]
        for i in range(0, len(items), _MLFLOW_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i:i + _MLFLOW_BATCH_METRICS])

    def log_summary(self, metrics: dict[str, float], step: int) -> None:
        """Log the run's final figures as metrics at ``step``."""
        self.log_rows([(step, metrics)])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags (later values replace earlier ones)."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def finish(self, ok: bool) -> None:
        """Mark the run FINISHED or FAILED."""
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandbRun:
    """One W&B run, created or resumed (``resume="allow"`` with the recorded id)."""

    name = "W&B"

    def __init__(self, config: TrackingConfig, state: dict[str, Any] | None, folder: Path) -> None:
        """Start (or resume) the run; its local files go under ``folder``."""
        wandb = require_client("wandb")
        same = bool(state and state.get("project") == config.wandb_project
                    and state.get("entity") == config.wandb_entity and state.get("id"))
        self.where = f"project {config.wandb_project!r}"
        folder.mkdir(parents=True, exist_ok=True)
        self.resumed = same
        self.run = wandb.init(
            project=config.wandb_project, entity=config.wandb_entity or None,
            name=config.run_name or None, id=str(state["id"]) if same and state else None,
            resume="allow", dir=str(folder),
            settings=wandb.Settings(init_timeout=network_timeout(), silent=True,
                                    console="off", x_disable_stats=True),
        )
        self.state = {"project": config.wandb_project, "entity": config.wandb_entity,
                      "id": self.run.id}

    def log_params(self, params: dict[str, str]) -> None:
        """Put params into the run's config."""
        self.run.config.update(params, allow_val_change=True)

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Log each row at its step (W&B drops a step not above the last, e.g. on resume)."""
        for step, row in rows:
            self.run.log({**row, "global_step": step}, step=step)

    def log_summary(self, metrics: dict[str, float], step: int) -> None:
        """Put the run's final figures into its summary."""
        self.run.summary.update(metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Record values in the run's summary."""
        self.run.summary.update(tags)

    def finish(self, ok: bool) -> None:
        """Finish the run, waiting at most the network timeout for its upload."""
        done = threading.Thread(target=self.run.finish, kwargs={"exit_code": 0 if ok else 1},
                                daemon=True)
        done.start()
        done.join(network_timeout())
        if done.is_alive():
            raise TimeoutError(f"W&B did not finish uploading within {network_timeout():g} s")


class Trackers:
    """Every configured tracker; a failing one is warned about once and then left alone."""

    def __init__(self, config: TrackingConfig, state_path: Path,
                 warn: Callable[[str], None]) -> None:
        """Open (or resume, from ``state_path``) the run of each configured tracker.

        Raises:
            ConfigError: A tracker's client package is not installed (names the pip extra).
        """
        self.config, self.state_path, self.warn = config, state_path, warn
        state = self._read_state()
        self.runs: list[Any] = []
        if config.mlflow:
            self._open(lambda: MlflowRun(config, state.get("mlflow")), "MLflow",
                       config.mlflow_tracking_uri)
        if config.wandb:
            self._open(lambda: WandbRun(config, state.get("wandb"), state_path.parent),
                       "W&B", config.wandb_project)
        self._write_state()

    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_state(self) -> None:
        if not self.runs:
            return
        state = {("mlflow" if r.name == "MLflow" else "wandb"): r.state for r in self.runs}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    def _problem(self, exc: BaseException) -> str:
        text = redact(f"{type(exc).__name__}: {exc}")
        if network_problem(exc) is None and ("timed out" in text or "Timeout" in text):
            # The MLflow client wraps urllib3's timeout in a requests ConnectionError.
            return (f"no answer within {network_timeout():g} s (timeout; "
                    "KFP_FINETUNE_NETWORK_TIMEOUT_S sets it)")
        return network_problem(exc) or text[:300]

    def _open(self, make: Callable[[], Any], name: str, where: str) -> None:
        from kfp_finetune.errors import ConfigError

        try:
            self.runs.append(make())
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any tracker failure must not stop training
            self.warn(f"[tracking] warning: {name} at {redact(where)} is unavailable "
                      f"({self._problem(exc)}); training goes on without {name} tracking.")

    def _each(self, action: str, call: Callable[[Any], None], new_only: bool = False) -> None:
        for run in list(self.runs):
            if new_only and run.resumed:
                continue
            try:
                call(run)
            except Exception as exc:  # noqa: BLE001 - a tracker outage never stops training
                self.runs.remove(run)
                self.warn(f"[tracking] warning: {run.name} at {redact(run.where)} failed while "
                          f"{action} ({self._problem(exc)}); no more {run.name} logging in "
                          "this step, training goes on.")

    @property
    def active(self) -> bool:
        """Whether any tracker is still being logged to."""
        return bool(self.runs)

    def log_params(self, params: dict[str, Any], new_only: bool = False) -> None:
        """Log params (nested dicts flattened with dots, values as text).

        Args:
            params: The params.
            new_only: Only to runs created here (not to runs resumed from the state file).
        """
        flat = {k: redact(v) for k, v in flatten(params).items()}
        self._each("logging params", lambda run: run.log_params(flat), new_only)

    def log_rows(self, rows: Iterable[tuple[int, dict[str, Any]]],
                 new_only: bool = False) -> None:
        """Log per-step metrics (non-numeric values are skipped); ``new_only`` as above."""
        clean = [(int(step), numeric(row)) for step, row in rows]
        clean = [(step, row) for step, row in clean if row]
        if clean:
            self._each("logging metrics", lambda run: run.log_rows(clean), new_only)

    def log_summary(self, metrics: dict[str, Any], step: int) -> None:
        """Log the final figures (finite numbers only) of the run, as of ``step``."""
        clean = numeric(metrics)
        if clean:
            self._each("logging the summary", lambda run: run.log_summary(clean, step))

    def set_tags(self, tags: dict[str, str]) -> None:
        """Record text values (e.g. where the model is)."""
        shown = {k: redact(v) for k, v in tags.items()}
        self._each("recording tags", lambda run: run.set_tags(shown))

    def finish(self, ok: bool = True) -> None:
        """Close every run (FINISHED when ``ok``, else FAILED)."""
        self._each("finishing the run", lambda run: run.finish(ok))
        self.runs = []
