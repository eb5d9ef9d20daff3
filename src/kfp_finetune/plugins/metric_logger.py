"""torchtune metric logger that writes the DiskLogger file AND forwards to MLflow and/or W&B.

torchtune takes one ``metric_logger``. Pointing it at ``MLFlowLogger`` or ``WandBLogger``
(``metric_logger._component_=...``) drops the DiskLogger file that the fine-tune step reads for
its Metrics and loss chart, so those read "0 steps". This logger *is* torchtune's DiskLogger
(same file, same lines: it subclasses it) and in addition sends every logged step to the
trackers of the run's tracking settings. The fine-tune step puts it into the rendered config
(``kfp_finetune.steps.tune_config.metric_logger_conf``) only when tracking is on.

Only rank 0 forwards (torchtune's distributed recipes build the metric logger on rank 0 only;
the check here keeps that true for any recipe). Steps are sent in batches, at most every
``FLUSH_SECONDS`` and at the end, so a slow tracker costs no time per step; a tracker that
fails is warned about once and then left alone, and training goes on.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchtune.training.metric_logging import DiskLogger

from kfp_finetune.config.tracking import TrackingConfig
from kfp_finetune.storage.trackers import STATE_FILE, Trackers

FLUSH_SECONDS = 10.0
# torchtune config keys logged as params besides the step's own: the hyperparameters.
_CONFIG_KEYS = ("batch_size", "epochs", "gradient_accumulation_steps", "max_steps_per_epoch",
                "optimizer", "lr_scheduler", "loss", "dtype", "seed", "compile", "device",
                "enable_activation_checkpointing", "clip_grad_norm")
_MODEL_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_attn_modules",
               "apply_lora_to_mlp", "apply_lora_to_output", "use_dora", "quantize_base")


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class TrackingLogger(DiskLogger):
    """DiskLogger plus MLflow / W&B forwarding (see the module docstring).

    Args:
        log_dir: DiskLogger's folder (also holds the tracked run's state file).
        filename: DiskLogger's file name.
        tracking: :meth:`TrackingConfig.to_dict` of the run's tracking settings.
        params: Params the step resolved (runtime, data and model sources, hyperparameters).
        **kwargs: Passed to DiskLogger.
    """

    def __init__(self, log_dir: str, filename: str | None = None,
                 tracking: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(log_dir, filename, **kwargs)
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._last_flush = time.monotonic()
        self._trackers: Trackers | None = None
        config = TrackingConfig.from_dict(tracking)
        if _rank() == 0 and config.enabled:
            self._trackers = Trackers(config, Path(log_dir) / STATE_FILE, _warn)
            self._trackers.log_params(dict(params or {}))

    def log_config(self, config: Any) -> None:
        """Save the config as DiskLogger does, and log its hyperparameters as params."""
        super().log_config(config)
        if self._trackers is None:
            return
        from omegaconf import OmegaConf

        conf = OmegaConf.to_container(config, resolve=True)
        assert isinstance(conf, dict)
        chosen: dict[str, Any] = {k: conf[k] for k in _CONFIG_KEYS if k in conf}
        model = conf.get("model") or {}
        chosen.update({f"model.{k}": model[k] for k in _MODEL_KEYS if k in model})
        self._trackers.log_params({"torchtune": chosen})

    def log(self, name: str, data: Any, step: int) -> None:
        """Write one value to the file, and queue it for the trackers."""
        super().log(name, data, step)
        self._queue(step, {name: data})

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        """Write one step to the file, and queue it for the trackers."""
        super().log_dict(payload, step)
        self._queue(step, dict(payload))

    def _queue(self, step: int, row: dict[str, Any]) -> None:
        if self._trackers is None:
            return
        self._pending.append((step, row))
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self._flush()

    def _flush(self) -> None:
        if self._trackers is not None and self._pending:
            self._trackers.log_rows(self._pending)
        self._pending = []
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Close the file; send what is queued and mark the tracked run finished."""
        super().close()
        if self._trackers is not None:
            self._flush()
            self._trackers.finish(ok=True)
            self._trackers = None
