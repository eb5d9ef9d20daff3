"""What each pipeline step does, as plain Python the components call.

Every step validates its parameters before it touches the network or the workspace, finds its
own finished work on a re-run and skips it, and never leaves half-written output that looks
finished.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.dataset_plan import DatasetPlan, plan_dataset
from kfp_finetune.errors import TrainingError, WorkspaceError
from kfp_finetune.model_check import ModelInfo, check_model
from kfp_finetune.runtimes import Runtime, get_runtime
from kfp_finetune.storage import fetch
from kfp_finetune.training_log import read_metrics
from kfp_finetune.tune_config import ResolvedConfig, config_fingerprint, render_config, resolve
from kfp_finetune.types import TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.uris import StorageUri, parse_storage_uri
from kfp_finetune.workspace import (
    MANIFEST,
    Workspace,
    install,
    list_files,
    read_manifest,
    staged,
    write_json_atomic,
)

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


def _initialize(
    ws: Workspace, uri: StorageUri, folder: Path, kind: str, log: Log
) -> FetchSummary:
    start = time.monotonic()
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("source") == uri.describe():
        log(f"[{kind}] {uri.describe()} is already complete in {folder}; skipping the download.")
        files = manifest.get("files", [])
        return FetchSummary(
            uri.describe(), len(files), sum(f["bytes"] for f in files), 0.0, True
        )
    log(f"[{kind}] fetching {uri.describe()} into {folder}")
    with staged(ws, kind) as staging:
        fetch(uri, staging, kind)
        files = list_files(staging)
        install(
            staging,
            folder,
            {"source": uri.describe(), "revision": uri.revision, "files": files,
             "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        )
    seconds = time.monotonic() - start
    total = sum(f["bytes"] for f in files)
    log(f"[{kind}] fetched {len(files)} files, {total} bytes in {seconds:.1f} s")
    return FetchSummary(uri.describe(), len(files), total, round(seconds, 3), False)


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
) -> DatasetSummary:
    """Fetch the dataset into ``<workspace>/dataset`` and check it against ``preprocess``.

    Args:
        workspace: Workspace root (``/workspace`` on a cluster).
        storage_uri: Where the data comes from.
        preprocess: How it will be read; checked here, on CPU.
        log: Where progress lines go.

    Returns:
        What was fetched and how the fine-tune step will read it.
    """
    uri = parse_storage_uri(storage_uri, "dataset")
    ws = Workspace.at(workspace)
    summary = _initialize(ws, uri, ws.dataset_dir, "dataset", log)
    plan = plan_dataset(ws.dataset_dir, preprocess, ws.cache_dir / "datasets")
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
) -> ModelSummary:
    """Fetch the base model into ``<workspace>/model`` and check it against the runtime.

    The training config is resolved first, so an impossible combination (unknown runtime,
    QLoRA on CPU, a GPU count torchtune has no config for) fails before any download.

    Args:
        workspace: Workspace root.
        storage_uri: Where the model comes from ("" for the runtime's default).
        runtime_name: Runtime name.
        config: The training config.
        log: Where progress lines go.

    Returns:
        What was fetched and the recipe that will run.
    """
    from kfp_finetune.tune_config import select_recipe

    runtime = get_runtime(runtime_name)
    resolved = resolve(runtime, config)
    uri = parse_storage_uri(storage_uri or runtime.model_uri, "model")
    choice = select_recipe(runtime, resolved)
    ws = Workspace.at(workspace)
    summary = _initialize(ws, uri, ws.model_dir, "model", log)
    info = check_model(ws.model_dir, runtime)
    log(f"[model] ok for {runtime.name}: {len(info.checkpoint_files)} weight file(s); "
        f"recipe {choice.recipe}, config {choice.config}")
    return ModelSummary(summary, info, choice.recipe, choice.config)


@dataclass(frozen=True)
class TrainSummary:
    """Result of the fine-tune step."""

    checkpoint_dir: str
    config_path: str
    recipe: str
    config: str
    losses: list[tuple[int, float]]
    seconds: float
    skipped: bool

    @property
    def final_loss(self) -> float:
        """Loss of the last logged step (NaN when none was logged)."""
        return self.losses[-1][1] if self.losses else float("nan")


def _require(folder: Path, step: str) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if manifest is None:
        raise WorkspaceError(
            f"{str(folder)!r} has no finished {step} output; run the {step} step first (on a "
            "cluster: check that every task mounts the same workspace volume)."
        )
    return manifest


def prepare_training(
    ws: Workspace, runtime: Runtime, resolved: ResolvedConfig, preprocess: TorchTuneInstructDataset
) -> tuple[Any, dict[str, Any]]:
    """Check the workspace's dataset and model and render the torchtune config."""
    _require(ws.dataset_dir, "dataset-initializer")
    _require(ws.model_dir, "model-initializer")
    info = check_model(ws.model_dir, runtime)
    plan = plan_dataset(ws.dataset_dir, preprocess, ws.cache_dir / "datasets")
    return render_config(
        runtime,
        resolved,
        model_dir=ws.model_dir,
        model=info,
        dataset=plan,
        output_dir=ws.checkpoints_dir,
        cache_dir=ws.cache_dir / "datasets",
    )


def run_fine_tune(
    workspace: str | Path,
    runtime_name: str,
    config: TorchTuneConfig,
    log: Log = _print,
) -> TrainSummary:
    """Render the torchtune config, run ``tune run`` and stream its log.

    A re-run with the same rendered config finds the finished checkpoint and does not train
    again; a changed config trains anew.

    Args:
        workspace: Workspace root.
        runtime_name: Runtime name.
        config: The training config.
        log: Where progress lines (and torchtune's log) go.

    Returns:
        Where the checkpoint is and the loss per step.
    """
    from omegaconf import OmegaConf

    runtime = get_runtime(runtime_name)
    resolved = resolve(runtime, config)
    ws = Workspace.at(workspace)
    preprocess = config.dataset_preprocess_config or TorchTuneInstructDataset()
    choice, conf = prepare_training(ws, runtime, resolved, preprocess)
    fingerprint = config_fingerprint(conf)
    out = ws.checkpoints_dir
    done = read_manifest(out)
    config_path = out / "torchtune_config.yaml"
    if done is not None and done.get("fingerprint") == fingerprint:
        log(f"[fine-tune] {out} already holds the finished run of this config; not training again.")
        return TrainSummary(str(out / done["final_epoch_dir"]), str(config_path), choice.recipe,
                            choice.config, read_metrics(out / "logs"), 0.0, True)
    if out.exists():
        log(f"[fine-tune] clearing unfinished or different earlier output in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(conf), config_path)
    cmd = choice.command(config_path)
    log(f"[fine-tune] recipe {choice.recipe}, base config {choice.config}, "
        f"{choice.nproc} process(es) on {choice.device}")
    log(f"[fine-tune] full config: {config_path}")
    log(f"[fine-tune] $ {' '.join(cmd)}")
    start = time.monotonic()
    _stream(cmd, log)
    seconds = time.monotonic() - start
    epochs = sorted(
        (p for p in out.glob("epoch_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1])
    )
    if not epochs or not list(epochs[-1].glob("*.safetensors")):
        raise TrainingError(
            f"torchtune finished but wrote no checkpoint under {out}; see the log above."
        )
    final = epochs[-1]
    losses = read_metrics(out / "logs")
    write_json_atomic(
        out / MANIFEST,
        {"fingerprint": fingerprint, "final_epoch_dir": final.name, "recipe": choice.recipe,
         "config": choice.config, "resolved": resolved.to_dict(), "seconds": round(seconds, 3),
         "final_loss": losses[-1][1] if losses else None},
    )
    log(f"[fine-tune] done in {seconds:.1f} s; checkpoint {final}")
    return TrainSummary(str(final), str(config_path), choice.recipe, choice.config, losses,
                        round(seconds, 3), False)


def _tune_executable() -> list[str]:
    # Run torchtune's CLI with this interpreter, so the same environment is used everywhere.
    return [sys.executable, "-m", "torchtune._cli.tune"]


def _stream(cmd: list[str], log: Log) -> None:
    argv = _tune_executable() + cmd[1:]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    tail: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            log(line)
            tail = (tail + [line])[-30:]
        code = proc.wait()
    if code != 0:
        raise TrainingError(
            f"`tune run` exited with code {code}; last lines:\n" + "\n".join(tail[-15:])
        )


@dataclass(frozen=True)
class ExportSummary:
    """Result of the export step."""

    path: str
    files: int
    bytes: int
    metadata: dict[str, Any]


def check_export_name(name: str) -> str:
    """Check that an export name is a plain folder name ("" means the default).

    Raises:
        WorkspaceError: It is not.
    """
    if name and (
        not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name) or name == "checkpoints"
    ):
        raise WorkspaceError(
            f"export_name={name!r} is not a plain folder name; use letters, digits, '.', '-' "
            "and '_' (and not 'checkpoints')."
        )
    return name


def export_path(ws: Workspace, name: str = "") -> Path:
    """Folder of the exported model: ``output/<name>``, default ``<base model>-finetuned``."""
    if not check_export_name(name):
        base = _require(ws.model_dir, "model-initializer")
        name = f"{base['source'].rstrip('/').split('/')[-1]}-finetuned"
    return ws.output_dir / name


def export_model(
    workspace: str | Path, runtime_name: str, name: str = "", log: Log = _print
) -> ExportSummary:
    """Copy the final checkpoint to ``<workspace>/output/<name>`` as a Hugging Face folder.

    Args:
        workspace: Workspace root.
        runtime_name: Runtime name (recorded in the metadata).
        name: Folder name under ``output/``; default ``<base model>-finetuned``.
        log: Where progress lines go.

    Returns:
        Where the model is, and its metadata.
    """
    runtime = get_runtime(runtime_name)
    ws = Workspace.at(workspace)
    trained = _require(ws.checkpoints_dir, "fine-tune")
    base = _require(ws.model_dir, "model-initializer")
    dataset = _require(ws.dataset_dir, "dataset-initializer")
    final = export_path(ws, name)
    src = ws.checkpoints_dir / trained["final_epoch_dir"]
    done = read_manifest(final)
    if done is not None and done.get("fingerprint") == trained["fingerprint"]:
        log(f"[export] {final} already holds this run's model; nothing to do.")
        return ExportSummary(str(final), len(done["files"]),
                             sum(f["bytes"] for f in done["files"]), done)
    with staged(ws, f"export-{name}") as staging:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if path.is_file() and not rel.name.startswith("."):
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, staging / rel)
        files = list_files(staging)
        metadata = {
            "fingerprint": trained["fingerprint"],
            "runtime": runtime.name,
            "base_model": base["source"],
            "base_model_revision": base.get("revision"),
            "dataset": dataset["source"],
            "recipe": trained["recipe"],
            "config": trained["config"],
            "training": trained["resolved"],
            "final_loss": trained.get("final_loss"),
            "path": str(final),
            "files": files,
        }
        install(staging, final, metadata)
    total = sum(f["bytes"] for f in files)
    log(f"[export] fine-tuned model: {final} ({len(files)} files, {total} bytes)")
    return ExportSummary(str(final), len(files), total, metadata)
