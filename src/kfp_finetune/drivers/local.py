"""Running the pipeline on this machine with ``kfp.local`` (CPU, tiny models, no cluster).

The same components run in the same order as on a cluster, each in its own subprocess with
this interpreter (``SubprocessRunner(use_venv=False)``); the workspace is a local folder
instead of the PVC. kfp.local's own ``workspace_root`` is a throw-away temporary folder (it
deletes it after each run); our workspace is never placed there.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.config.run_config import RunConfig, to_values
from kfp_finetune.config.types import TorchTuneConfig
from kfp_finetune.steps.check_run import resolve_run
from kfp_finetune.steps.export_model import latest_export
from kfp_finetune.steps.report import LOSS_CURVE_FILE
from kfp_finetune.steps.step_errors import clear_record, step_error
from kfp_finetune.steps.training_log import read_metrics
from kfp_finetune.storage.workspace import Workspace, workspace_lock


@dataclass(frozen=True)
class LocalRunResult:
    """Where a local run left its results."""

    workspace: Path
    model_dir: Path
    losses: list[tuple[int, float]]
    loss_curve: Path | None = None


def pipeline_arguments(
    runtime_name: str,
    model_uri: str,
    dataset_uri: str,
    config: TorchTuneConfig,
    export_name: str = "",
    model_ignore_patterns: list[str] | None = None,
) -> dict[str, Any]:
    """Validate the inputs and turn them into the pipeline's parameters (the set ones).

    Raises:
        KfpFinetuneError: Any input is invalid (before anything runs).
    """
    run = RunConfig(runtime=runtime_name, dataset_uri=dataset_uri, model_uri=model_uri or "",
                    model_ignore_patterns=list(model_ignore_patterns or []),
                    export_name=export_name or "", trainer=config)
    return run_arguments(run)


def run_arguments(run: RunConfig) -> dict[str, Any]:
    """The run-form values of a config, after the checks check-config will run."""
    return to_values(resolve_run(run))


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
    run = RunConfig(runtime=runtime_name, dataset_uri=dataset_uri, model_uri=model_uri or "",
                    model_ignore_patterns=list(model_ignore_patterns or []),
                    export_name=export_name or "", trainer=config)
    return run_config_local(run, workspace)


def run_config_local(run: RunConfig, workspace: str | Path) -> LocalRunResult:
    """Run the whole pipeline locally for one ``RunConfig`` (see ``run_local``)."""
    from kfp import local

    from kfp_finetune.pipelines.finetune import build_pipeline

    arguments = run_arguments(run)
    ws = Workspace.at(workspace, adopt=False)  # refused before the lock file is written
    with workspace_lock(ws.root, "kfp-finetune run --local"), task_scope() as scratch:
        Workspace.at(ws.root)  # adopted (marker written) only by the run that holds the lock
        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=str(ws.root / ".kfp-local-outputs"),
            workspace_root=str(scratch / "kfp-workspace"),
            raise_on_error=True,
        )
        pipeline = build_pipeline(run.runtime, local_workspace=str(ws.root), given=arguments)
        clear_record(ws.root)
        try:
            pipeline(**arguments)
        except RuntimeError:  # kfp.local's "task ... FAILURE": raise the step's own error
            error = step_error(ws.root)
            if error is None:
                raise
            raise error from None
        model_dir = latest_export(ws, run.export_name)
        curve = publish_loss_curve(ws.root / ".kfp-local-outputs")
    return LocalRunResult(ws.root, model_dir, read_metrics(ws.checkpoints_dir / "logs"), curve)


def publish_loss_curve(pipeline_root: Path) -> Path | None:
    """Copy the newest run's loss curve to ``loss_curve.html`` beside it and the metrics.

    kfp.local names each output artifact after its output, without extension
    (``<pipeline_root>/<run>/fine-tune/loss_curve``; the task's Metrics are in
    ``executor_output.json`` there), which a browser does not open as HTML.

    Returns:
        The ``.html`` copy, or None when no loss curve was written.
    """
    curves = sorted((p for p in pipeline_root.rglob("loss_curve") if p.is_file()),
                    key=lambda p: p.stat().st_mtime_ns)
    if not curves:
        return None
    target = curves[-1].with_name(LOSS_CURVE_FILE)
    shutil.copyfile(curves[-1], target)
    return target


# ----------------------------------------------------------------------- task processes

SCRATCH_PREFIX = "kfp-finetune-local-"
_LOCK = ".owner.lock"


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the process that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _exec_executor(command: list[str]) -> list[str]:
    """Kfp's task script with its last line exec'd.

    The task's Python process then is the shell's own process (and keeps its parent-death
    signal) instead of a grandchild that would outlive a killed CLI.
    """
    return [re.sub(r"(^|\n)(_KFP_RUNTIME=true )", r"\1exec env \2", part) for part in command]


def run_task_subprocess(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
    """kfp.local's ``run_local_subprocess``, with a task that dies with this process.

    Same contract as upstream (kfp/local/subprocess_task_handler.py): the task's output is
    echoed line by line and the exit code returned.
    """
    env = {**os.environ, **env_vars} if env_vars else None
    with subprocess.Popen(
        _exec_executor(full_command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1, env=env, preexec_fn=_die_with_parent,
    ) as process:
        try:
            if process.stdout:
                for line in iter(process.stdout.readline, ""):
                    print(line, end="")
                print("\n")
            return process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise


def _sweep_stale(parent: Path) -> None:
    """Remove scratch folders of earlier runs whose process is gone (lock free)."""
    for folder in parent.glob(f"{SCRATCH_PREFIX}*"):
        try:
            with (folder / _LOCK).open("a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue  # held by a live run, or not ours to read


@contextmanager
def task_scope() -> Iterator[Path]:
    """A scratch folder for one local run, and task processes that die with this one.

    kfp.local's ``workspace_root`` and the tasks' ``TMPDIR`` (where each task's ``mktemp -d``
    puts its component source) go into one folder under the system temp folder, removed after
    the run. A folder left by a killed run is removed by the next run (its flock is free once
    the kernel has reaped the owner). Tasks get ``PR_SET_PDEATHSIG``: ``kill -9`` of the CLI
    takes them (and, through the fine-tune step's own setting, ``tune run``) down with it, so
    no orphan keeps the workspace lock.
    """
    from kfp.local import subprocess_task_handler

    parent = Path(tempfile.gettempdir())
    _sweep_stale(parent)
    # Locked before it carries the swept prefix: a concurrent run's sweep never sees it free.
    pending = Path(tempfile.mkdtemp(prefix=f".{SCRATCH_PREFIX}pending-", dir=parent))
    lock = (pending / _LOCK).open("a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    scratch = parent / pending.name.replace(f".{SCRATCH_PREFIX}pending-", SCRATCH_PREFIX)
    os.rename(pending, scratch)
    old_tmp = os.environ.get("TMPDIR")
    original = subprocess_task_handler.run_local_subprocess
    os.environ["TMPDIR"] = str(scratch)
    subprocess_task_handler.run_local_subprocess = run_task_subprocess
    try:
        yield scratch
    finally:
        subprocess_task_handler.run_local_subprocess = original
        if old_tmp is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_tmp
        shutil.rmtree(scratch, ignore_errors=True)
        lock.close()
