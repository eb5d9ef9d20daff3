"""The model initializer step: fetch the base model into ``<workspace>/model`` and check it.

The training config is resolved first and the model's file listing and ``config.json`` are
checked before its weights are downloaded, so a wrong model fails on CPU, early and cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kfp_finetune.config.runtimes import get_runtime
from kfp_finetune.config.types import TorchTuneConfig
from kfp_finetune.steps.fetch_step import FetchSummary, Log, fetch_once, print_log
from kfp_finetune.steps.model_check import (
    ModelInfo,
    check_model,
    check_model_config,
    check_model_files,
    read_config,
)
from kfp_finetune.steps.tune_config import resolve
from kfp_finetune.storage.base import RetryPolicy
from kfp_finetune.storage.selection import FetchOptions, check_ignore_patterns
from kfp_finetune.storage.uris import parse_storage_uri
from kfp_finetune.storage.workspace import Workspace


@dataclass(frozen=True)
class ModelSummary:
    """Result of the model step."""

    fetch: FetchSummary
    info: ModelInfo
    recipe: str
    config: str


def initialize_model(
    workspace: str | Path,
    storage_uri: str,
    runtime_name: str,
    config: TorchTuneConfig,
    log: Log = print_log,
    *,
    ignore_patterns: Iterable[str] | None = None,
    retry: RetryPolicy | None = None,
) -> ModelSummary:
    """Fetch the base model into ``<workspace>/model`` and check it against the runtime.

    The training config is resolved first, so an impossible combination (unknown runtime,
    QLoRA on CPU, a GPU count torchtune has no config for) fails before any download. The
    file listing (config, weights, tokenizer files) and ``config.json`` (family and size) are
    checked before the weights are downloaded.

    Args:
        workspace: Workspace root.
        storage_uri: Where the model comes from ("" for the runtime's default).
        runtime_name: Runtime name.
        config: The training config.
        log: Where progress lines go.
        ignore_patterns: Glob patterns of files not to fetch (as the Kubeflow SDK's).
        retry: Retry policy for network errors (default: from the environment).

    Returns:
        What was fetched and the recipe that will run.
    """
    from kfp_finetune.steps.tune_config import select_recipe

    runtime = get_runtime(runtime_name)
    resolved = resolve(runtime, config)
    uri = parse_storage_uri(storage_uri or runtime.model_uri, "model")
    choice = select_recipe(runtime, resolved)
    where = f"model {uri.describe()!r}"
    options = FetchOptions(
        kind="model",
        ignore_patterns=check_ignore_patterns(ignore_patterns),
        check_files=lambda names: check_model_files(names, runtime, where),
        check_config=lambda path: check_model_config(read_config(path), runtime, where),
    )
    ws = Workspace.at(workspace)
    summary = fetch_once(ws, uri, ws.model_dir, "model", log, options, retry)
    info = check_model(ws.model_dir, runtime)
    log(f"[model] ok for {runtime.name}: {len(info.checkpoint_files)} weight file(s); "
        f"recipe {choice.recipe}, config {choice.config}")
    return ModelSummary(summary, info, choice.recipe, choice.config)
