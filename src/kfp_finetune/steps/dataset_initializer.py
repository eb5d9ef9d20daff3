"""The dataset initializer step: fetch the data into ``<workspace>/dataset`` and check it.

Only files of the declared format are fetched; the check (files parse, the builder's columns
exist after ``column_map``, the split selects rows) runs here, on CPU, before any GPU task.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kfp_finetune.config.types import DataFormat, TorchTuneInstructDataset
from kfp_finetune.config.validation import normalize_dataset
from kfp_finetune.steps.dataset_plan import EXTENSIONS, DatasetPlan, plan_dataset
from kfp_finetune.steps.fetch_step import FetchSummary, Log, fetch_once, print_log
from kfp_finetune.storage.base import RetryPolicy
from kfp_finetune.storage.content import dataset_cache
from kfp_finetune.storage.selection import FetchOptions, check_ignore_patterns
from kfp_finetune.storage.uris import parse_storage_uri
from kfp_finetune.storage.workspace import Workspace, read_manifest


@dataclass(frozen=True)
class DatasetSummary:
    """Result of the dataset step."""

    fetch: FetchSummary
    plan: DatasetPlan


def initialize_dataset(
    workspace: str | Path,
    storage_uri: str,
    preprocess: TorchTuneInstructDataset,
    log: Log = print_log,
    *,
    ignore_patterns: Iterable[str] | None = None,
    retry: RetryPolicy | None = None,
) -> DatasetSummary:
    """Fetch the dataset into ``<workspace>/dataset`` and check it against ``preprocess``.

    Only files of the declared format are fetched; the check (files parse, the builder's
    columns exist after ``column_map``, the split selects rows) runs here, on CPU.

    Args:
        workspace: Workspace root (``/workspace`` on a cluster).
        storage_uri: Where the data comes from (hf://, s3://, file:// or an absolute path).
        preprocess: How it will be read; checked here, on CPU.
        log: Where progress lines go.
        ignore_patterns: Glob patterns of files not to fetch.
        retry: Retry policy for network errors (default: from the environment).

    Returns:
        What was fetched and how the fine-tune step will read it.
    """
    preprocess = normalize_dataset(preprocess)  # the SDK's class checks nothing itself
    uri = parse_storage_uri(storage_uri, "dataset")
    fmt = DataFormat(preprocess.source)
    options = FetchOptions(
        kind="dataset",
        extensions=EXTENSIONS[fmt],
        data_format=fmt.value,
        ignore_patterns=check_ignore_patterns(ignore_patterns),
    )
    ws = Workspace.at(workspace)
    summary = fetch_once(ws, uri, ws.dataset_dir, "dataset", log, options, retry)
    cache = dataset_cache(ws.cache_dir / "datasets", ws.dataset_dir, read_manifest(ws.dataset_dir))
    plan = plan_dataset(ws.dataset_dir, preprocess, cache)
    log(
        f"[dataset] {plan.rows} rows, columns {plan.columns}; read as {plan.kind} data with "
        f"{plan.builder}"
    )
    return DatasetSummary(summary, plan)
