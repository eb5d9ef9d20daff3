"""Running the pipeline on this machine with ``kfp.local`` (CPU, tiny models, no cluster).

The same components run in the same order as on a cluster, each in its own subprocess with
this interpreter (``SubprocessRunner(use_venv=False)``); the workspace is a local folder
instead of the PVC. kfp.local's own ``workspace_root`` is a throw-away temporary folder (it
deletes it after each run); our workspace is never placed there.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.export import check_export_name, latest_export
from kfp_finetune.params import training_params
from kfp_finetune.runtimes import get_runtime
from kfp_finetune.step_errors import clear_record, step_error
from kfp_finetune.storage import check_ignore_patterns
from kfp_finetune.training_log import read_metrics
from kfp_finetune.tune_config import resolve
from kfp_finetune.types import Loss, TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.uris import parse_storage_uri
from kfp_finetune.workspace import Workspace, workspace_lock


@dataclass(frozen=True)
class LocalRunResult:
    """Where a local run left its results."""

    workspace: Path
    model_dir: Path
    losses: list[tuple[int, float]]


def pipeline_arguments(
    runtime_name: str,
    model_uri: str,
    dataset_uri: str,
    config: TorchTuneConfig,
    export_name: str = "",
    model_ignore_patterns: list[str] | None = None,
) -> dict[str, Any]:
    """Validate the inputs and turn them into the pipeline's parameters.

    Raises:
        KfpFinetuneError: Any input is invalid (before anything runs).
    """
    runtime = get_runtime(runtime_name)
    resolved = resolve(runtime, config)
    parse_storage_uri(dataset_uri, "dataset")
    parse_storage_uri(model_uri or runtime.model_uri, "model")
    check_export_name(export_name)
    pre = config.dataset_preprocess_config or TorchTuneInstructDataset()
    return {
        "model_uri": model_uri or runtime.model_uri,
        "dataset_uri": dataset_uri,
        "dtype": resolved.dtype.value,
        "batch_size": resolved.batch_size,
        "epochs": resolved.epochs,
        "loss": (config.loss or Loss.CEWithChunkedOutputLoss).value,
        "num_nodes": 1,
        "gpus_per_node": resolved.gpus,
        "source": pre.source.value,
        "split": pre.split,
        "train_on_input": bool(pre.train_on_input),
        "new_system_prompt": pre.new_system_prompt or "",
        "column_map": dict(pre.column_map or {}),
        **training_params(config),
        "model_ignore_patterns": list(check_ignore_patterns(model_ignore_patterns)),
        "export_name": export_name,
    }


def run_local(
    runtime_name: str,
    model_uri: str,
    dataset_uri: str,
    config: TorchTuneConfig,
    workspace: str | Path,
    export_name: str = "",
    model_ignore_patterns: list[str] | None = None,
) -> LocalRunResult:
    """Run the whole pipeline locally with ``kfp.local``.

    Args:
        runtime_name: Runtime name (use a ``-tiny`` runtime on CPU).
        model_uri: Base model URI.
        dataset_uri: Dataset URI.
        config: Training config.
        workspace: Local folder that plays the role of the PVC; kept after the run.
        export_name: Folder under ``output/`` for the model ("" for the default).
        model_ignore_patterns: Glob patterns of model files not to fetch.

    Returns:
        Where the fine-tuned model is and the loss per step.

    Raises:
        WorkspaceError: Another run holds the workspace's lock.
        KfpFinetuneError: A step stopped on one of our errors: the step's own class and
            message (its ``step`` attribute names the step), not kfp.local's "task failed".
    """
    from kfp import local

    from kfp_finetune.pipelines.finetune import build_pipeline

    arguments = pipeline_arguments(
        runtime_name, model_uri, dataset_uri, config, export_name, model_ignore_patterns
    )
    ws = Workspace.at(workspace, adopt=False)  # refused before the lock file is written
    with workspace_lock(ws.root, "kfp-finetune run --local"):
        Workspace.at(ws.root)  # adopted (marker written) only by the run that holds the lock
        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=str(ws.root / ".kfp-local-outputs"),
            workspace_root=tempfile.mkdtemp(prefix="kfp-local-scratch-"),
            raise_on_error=True,
        )
        pipeline = build_pipeline(runtime_name, local_workspace=str(ws.root))
        clear_record(ws.root)
        try:
            pipeline(**arguments)
        except RuntimeError:  # kfp.local's "task ... FAILURE": raise the step's own error
            error = step_error(ws.root)
            if error is None:
                raise
            raise error from None
        model_dir = latest_export(ws, export_name)
    return LocalRunResult(ws.root, model_dir, read_metrics(ws.checkpoints_dir / "logs"))
