"""The two initializer steps (dataset, model), as plain Python the components call.

The fine-tune step is in ``finetune.py`` and the export step in ``export.py``.

Every step validates its parameters before it touches the network or the workspace, finds its
own finished work on a re-run and skips it, and never leaves half-written output that looks
finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.config.runtimes import get_runtime
from kfp_finetune.config.types import DataFormat, TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.config.validation import normalize_dataset
from kfp_finetune.errors import WorkspaceError
from kfp_finetune.steps.dataset_plan import EXTENSIONS, DatasetPlan, plan_dataset
from kfp_finetune.steps.model_check import (
    ModelInfo,
    check_model,
    check_model_config,
    check_model_files,
    read_config,
)
from kfp_finetune.steps.tune_config import resolve
from kfp_finetune.storage.content import dataset_cache, hashed_records, records_intact
from kfp_finetune.storage.fetch import (
    FetchOptions,
    RetryPolicy,
    check_ignore_patterns,
    digest,
    fetch,
    remote_version,
)
from kfp_finetune.storage.ownership import ensure_owned, remove_owned
from kfp_finetune.storage.uris import StorageUri, parse_storage_uri
from kfp_finetune.storage.workspace import Workspace, install, read_manifest, workspace_lock

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class FetchSummary:
    """What an initializer fetched (shown as task outputs in the KFP UI)."""

    source: str
    files: int
    bytes: int
    seconds: float
    skipped: bool
    revision: str = ""

    def ui_metrics(self) -> dict[str, float]:
        """Figures for the KFP UI's Metrics view."""
        rate = self.bytes / 2**20 / self.seconds if self.seconds and not self.skipped else 0.0
        return {"files": self.files, "bytes": self.bytes, "seconds": self.seconds,
                "mib_per_s": round(rate, 2), "skipped": int(self.skipped)}


def _initialize(
    ws: Workspace,
    uri: StorageUri,
    folder: Path,
    kind: str,
    log: Log,
    options: FetchOptions | None = None,
    retry: RetryPolicy | None = None,
) -> FetchSummary:
    """Fetch ``uri`` into ``folder`` once: skip finished work, resume interrupted work.

    A folder whose manifest records the same source, options and (remote) version, and whose
    files still have their recorded content, is kept without any request for file content.
    A folder that kfp-finetune did not write (no manifest) is refused, never replaced.
    Otherwise the files go to a staging folder named after the source (so an interrupted run
    resumes there), the manifest is written last and the staging folder replaces ``folder``
    in one rename.
    """
    start = time.monotonic()
    opts = options or FetchOptions(kind=kind)
    policy = retry or RetryPolicy.from_env()
    key = digest([uri.describe(), opts.fingerprint()])
    ensure_owned(folder)  # before any download: a user's own model/ or dataset/ stays
    done = _complete_copy(uri, folder, kind, key, policy, log, start)
    if done is not None:
        return done
    log(f"[{kind}] fetching {uri.describe()} into {folder}")
    staging_root = ws.root / ".staging"
    locks = staging_root / ".locks"
    staging = staging_root / f"{kind}-{key[:16]}"
    # One writer per staging folder; the kernel frees the lock even after SIGKILL.
    with workspace_lock(locks, f"fetching {uri.describe()}", f"{staging.name}.lock"):
        try:
            result = fetch(uri, staging, opts, log=log, retry=policy)
        except BaseException:
            if uri.scheme == "file":
                remove_owned(staging)
            else:
                log(f"[{kind}] download stopped; finished files stay in {staging} and a re-run "
                    "resumes from there.")
            raise
        # Content hashes, cached with each file's stat: re-runs compare content, not names.
        files = hashed_records(staging, result.files)
        seconds = round(time.monotonic() - start, 3)
        total = sum(f["bytes"] for f in result.files)
        install(
            staging,
            folder,
            {"source": uri.describe(), "kind": kind, "scheme": uri.scheme,
             "requested_revision": uri.revision, "revision": result.revision,
             "version": result.version, "fetch_key": key, "options": opts.fingerprint(),
             "files": files, "bytes": total, "seconds": seconds,
             "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        )
    # Staging folders of earlier sources of this kind are stale, unless a process fetches
    # into one right now (it holds that folder's lock).
    for stale in staging_root.glob(f"{kind}-*"):
        try:
            with workspace_lock(locks, "removing a stale staging folder", f"{stale.name}.lock"):
                remove_owned(stale)
        except WorkspaceError:
            continue
    rate = total / seconds / 2**20 if seconds > 0 else 0.0
    log(f"[{kind}] fetched {len(result.files)} files, {total} bytes in {seconds:.1f} s "
        f"({result.downloaded} transferred now, {rate:.1f} MiB/s)"
        + (f", revision {result.revision}" if result.revision else ""))
    return FetchSummary(uri.describe(), len(result.files), total, seconds, False,
                        str(result.revision or result.version or ""))


def _complete_copy(
    uri: StorageUri, folder: Path, kind: str, key: str, policy: RetryPolicy, log: Log,
    start: float,
) -> FetchSummary | None:
    """The summary of a finished copy of ``uri`` in ``folder`` to keep, or None to fetch.

    Kept when the manifest records the same source and options, every file still has its
    recorded size and content, and the source's version (metadata only) is unchanged.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    if manifest.get("source") != uri.describe() or manifest.get("fetch_key") != key:
        log(f"[{kind}] {folder} holds {manifest.get('source')!r}; replacing it with "
            f"{uri.describe()}.")
        return None
    if not _files_intact(folder, manifest):
        log(f"[{kind}] a file in {folder} was changed or removed since it was fetched; "
            "fetching it again.")
        return None
    current = remote_version(uri, kind, policy, log)
    if current is not None and current != manifest.get("version"):
        log(f"[{kind}] {uri.describe()} changed since it was fetched; fetching it again.")
        return None
    files = manifest.get("files", [])
    revision = manifest.get("revision") or manifest.get("version")
    log(f"[{kind}] {uri.describe()} is already complete in {folder} (revision {revision}); "
        "skipping the download.")
    return FetchSummary(uri.describe(), len(files), sum(f["bytes"] for f in files),
                        round(time.monotonic() - start, 3), True, str(revision or ""))


def _files_intact(folder: Path, manifest: dict[str, Any]) -> bool:
    """Whether every file of the manifest is still there with its recorded size and content."""
    files = manifest.get("files", [])
    return isinstance(files, list) and records_intact(folder, files)


@dataclass(frozen=True)
class DatasetSummary:
    """Result of the dataset step."""

    fetch: FetchSummary
    plan: DatasetPlan


def initialize_dataset(
    workspace: str | Path,
    storage_uri: str,
    preprocess: TorchTuneInstructDataset,
    log: Log = _print,
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
    summary = _initialize(ws, uri, ws.dataset_dir, "dataset", log, options, retry)
    cache = dataset_cache(ws.cache_dir / "datasets", ws.dataset_dir, read_manifest(ws.dataset_dir))
    plan = plan_dataset(ws.dataset_dir, preprocess, cache)
    log(
        f"[dataset] {plan.rows} rows, columns {plan.columns}; read as {plan.kind} data with "
        f"{plan.builder}"
    )
    return DatasetSummary(summary, plan)


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
    log: Log = _print,
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
    summary = _initialize(ws, uri, ws.model_dir, "model", log, options, retry)
    info = check_model(ws.model_dir, runtime)
    log(f"[model] ok for {runtime.name}: {len(info.checkpoint_files)} weight file(s); "
        f"recipe {choice.recipe}, config {choice.config}")
    return ModelSummary(summary, info, choice.recipe, choice.config)
