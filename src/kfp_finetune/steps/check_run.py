"""The check-config step: every parameter checked on CPU, one validated config handed on.

The pipeline's first task (and, before anything is sent or started, the CLI, ``train()`` and
the client) call :func:`check_run`. What needs the network (does the repository exist, does the
data have the mapped columns) is checked by the initializers; everything else is checked here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kfp_finetune.config.parameters import BY_NAME, OPS
from kfp_finetune.config.run_config import RunConfig, canonical_names, from_values
from kfp_finetune.config.runtimes import get_runtime
from kfp_finetune.errors import ConfigError
from kfp_finetune.steps.check_config import ClusterSettings, check_cluster_settings
from kfp_finetune.steps.export_model import check_export_name
from kfp_finetune.steps.tune_config import resolve
from kfp_finetune.storage.selection import check_ignore_patterns
from kfp_finetune.storage.upload import check_destination
from kfp_finetune.storage.uris import parse_storage_uri


def resolve_run(run: RunConfig) -> RunConfig:
    """Check what can be checked without the network; fill in the runtime's defaults.

    The base model, precision, batch size, epochs and GPU count become explicit; what depends
    on the training node (the card's memory) stays unset for the fine-tune step to decide.

    Raises:
        KfpFinetuneError: A value is invalid or the combination cannot run.
    """
    runtime = get_runtime(run.runtime)
    resolved = resolve(runtime, run.trainer)
    parse_storage_uri(run.dataset_uri, kind="dataset")
    model_uri = run.model_uri or runtime.model_uri
    if not model_uri:
        raise ConfigError(
            f"model_uri is empty and runtime {runtime.name!r} has no default model; give the "
            "base model's URI, e.g. hf://org/repo or /abs/path/to/model."
        )
    parse_storage_uri(model_uri, kind="model")
    check_export_name(run.export_name)
    patterns = list(check_ignore_patterns(run.model_ignore_patterns))
    check_destination(run.push_to)
    trainer = dataclasses.replace(
        run.trainer, dtype=resolved.dtype, batch_size=resolved.batch_size,
        epochs=resolved.epochs, loss=resolved.loss, num_nodes=run.trainer.num_nodes or 1,
        resources_per_node={**(run.trainer.resources_per_node or {}), "gpu": resolved.gpus},
    )
    return dataclasses.replace(run, model_uri=model_uri, model_ignore_patterns=patterns,
                               trainer=trainer)


def check_run(runtime: str, values: dict[str, Any]) -> RunConfig:
    """The validated, resolved config of a run from its run-form values.

    Args:
        runtime: Runtime name.
        values: Parameter name (or an earlier name) -> value; unset values may be absent.

    Raises:
        KfpFinetuneError: A value is invalid; the message names the parameter.
    """
    return resolve_run(from_values(runtime, values))


def check_config_task(
    runtime: str, values: dict[str, Any], *, cluster: bool, run_id: str = "",
    run_name: str = "", pipeline: str = "",
) -> tuple[dict[str, Any], ClusterSettings | None]:
    """What the check-config task does: the run's config and, on a cluster, its settings.

    Args:
        runtime: Runtime name (fixed per compiled pipeline).
        values: The run-form values the task received (unset ones absent or None).
        cluster: Whether the operations parameters are checked too.
        run_id: The run's UUID (names the volume).
        run_name: The run's display name.
        pipeline: The pipeline's name.

    Returns:
        ``RunConfig.to_dict()`` of the checked run, and the cluster settings (None locally).
    """
    values = {k: v for k, v in canonical_names(values).items() if v is not None}
    run = check_run(runtime, {k: v for k, v in values.items() if BY_NAME[k].field != OPS})
    settings = None
    if cluster:
        gpus = run.trainer.resources_per_node["gpu"]
        settings = check_cluster_settings(
            {**values, "train_gpus_per_node": gpus}, run_id=run_id, run_name=run_name,
            pipeline=pipeline)
    return run.to_dict(), settings
