"""The local backend: the same pipeline through ``kfp.local``, one background process per job.

``train()`` returns at once, as the SDK's local backend does: the job runs in its own process
(:func:`kfp_finetune.drivers.client.local_job.run_job`) whose output is kept per job in
``<workspace>/.kfp-finetune-jobs/<name>/run.log``; steps, statuses and logs are read from there,
so another client over the same workspace sees the same jobs. The workspace itself (dataset,
model, output) is the one ``kfp-finetune run --local`` uses; one job at a time holds it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeflow.trainer.constants import constants
from kubeflow.trainer.types import types

from kfp_finetune.drivers.client import local_job
from kfp_finetune.drivers.client.base import PipelineBackend, TrainJobFailed
from kfp_finetune.drivers.client.sdk_adapter import runtime_name, sdk_runtime, to_request
from kfp_finetune.drivers.client.steps import (
    FAILED,
    LOCAL_STEPS,
    PENDING,
    TRAINING_STEP,
    error_line,
    new_job_name,
    step_of,
)
from kfp_finetune.errors import ConfigError
from kfp_finetune.storage.ownership import check_workspace_path

JOBS_DIR = ".kfp-finetune-jobs"
# The job's process (not ``-m``: the package has imported local_job already, and runpy warns).
_CHILD = ("import sys; from pathlib import Path; "
          "from kfp_finetune.drivers.client.local_job import run_job; "
          "sys.exit(run_job(Path(sys.argv[1])))")


@dataclass(frozen=True)
class LocalBackendConfig:
    """Run jobs on this machine with ``kfp.local`` (CPU, tiny runtimes; no cluster).

    Attributes:
        workspace: Folder that plays the role of the run's volume (dataset, model, output);
            kept after each job. Job records live in its ``.kfp-finetune-jobs/`` folder.
    """

    workspace: str | os.PathLike = "kfp-finetune-workspace"


class LocalBackend(PipelineBackend):
    """``RuntimeBackend`` over ``kfp.local``."""

    def __init__(self, cfg: LocalBackendConfig) -> None:
        # Never '' (the current directory): refused here, before a job folder is written.
        self.workspace = check_workspace_path(cfg.workspace, "workspace")
        self.jobs = self.workspace / JOBS_DIR
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ jobs

    def train(self, runtime: Any = None, initializer: Any = None, trainer: Any = None,
              options: list | None = None, export_name: str = "") -> str:
        """Validate, then start the pipeline in a background process; return the job name.

        Credentials given to the initializers reach the job's process as ``HF_TOKEN`` and
        ``AWS_*`` environment variables only.

        Raises:
            ConfigError: Bad input, or ``options`` were given (not supported here).
        """
        if options:
            raise ConfigError("options are not supported by kfp_finetune's TrainerClient; "
                              "drop them (the pipeline's settings live in TorchTuneConfig).")
        request = to_request(runtime, initializer, trainer, export_name)
        name = new_job_name()
        job_dir = self.jobs / name
        job_dir.mkdir(parents=True)
        local_job.write_json(job_dir / local_job.SPEC, {
            "name": name, "runtime": request.runtime, "arguments": request.arguments,
            "workspace": str(self.workspace),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        })
        env = {**os.environ, **request.credentials.secret_data(), "PYTHONUNBUFFERED": "1"}
        with open(job_dir / local_job.LOG, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(job_dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        self._procs[name] = proc
        (job_dir / "pid").write_text(str(proc.pid))
        return name

    def _dir(self, name: str) -> Path:
        job_dir = self.jobs / name
        if not name or "/" in name or not (job_dir / local_job.SPEC).is_file():
            raise ValueError(f"No TrainJob with name {name!r} in {self.jobs}; list_jobs() "
                             "shows the jobs of this workspace.")
        return job_dir

    def _alive(self, name: str, job_dir: Path) -> bool:
        proc = self._procs.get(name)
        if proc is not None:
            return proc.poll() is None
        try:
            os.kill(int((job_dir / "pid").read_text()), 0)
        except (OSError, ValueError):
            return False
        return not (job_dir / local_job.RESULT).exists()

    def _read(self, job_dir: Path) -> tuple[dict, dict | None, dict[str, local_job.StepLog]]:
        spec = json.loads((job_dir / local_job.SPEC).read_text())
        result_path = job_dir / local_job.RESULT
        result = json.loads(result_path.read_text()) if result_path.exists() else None
        log = job_dir / local_job.LOG
        steps = local_job.split_log(log.read_text(errors="replace") if log.exists() else "")
        return spec, result, steps

    def get_job(self, name: str) -> types.TrainJob:
        """The job with its steps (dataset-initializer, model-initializer, node-0, export)."""
        job_dir = self._dir(name)
        spec, result, logs = self._read(job_dir)
        alive = self._alive(name, job_dir)
        if result is not None:
            status = result["status"]
        elif alive:
            status = constants.TRAINJOB_RUNNING if logs else constants.TRAINJOB_CREATED
        else:
            status = constants.TRAINJOB_FAILED
        not_run = PENDING if status in (constants.TRAINJOB_CREATED,
                                        constants.TRAINJOB_RUNNING) else "Skipped"
        steps = [types.Step(name=step, pod_name=f"{name}-{step}",
                            status=logs[step].status if step in logs else not_run)
                 for step in LOCAL_STEPS]
        return types.TrainJob(
            name=name, runtime=sdk_runtime(spec["runtime"]), steps=steps, num_nodes=1,
            creation_timestamp=dt.datetime.fromisoformat(spec["created"]), status=status,
        )

    def list_jobs(self, runtime: Any = None) -> list[types.TrainJob]:
        """The jobs of this workspace, oldest first; only ``runtime``'s when given."""
        wanted = runtime_name(runtime) if runtime is not None else None
        jobs = [self.get_job(d.name) for d in sorted(self.jobs.glob("*"))
                if (d / local_job.SPEC).is_file()] if self.jobs.is_dir() else []
        jobs = [j for j in jobs if wanted is None or j.runtime.name == wanted]
        return sorted(jobs, key=lambda j: j.creation_timestamp)

    def failure(self, name: str, job: types.TrainJob) -> TrainJobFailed:
        """The failed step and its own error line, from the job's log (or its result)."""
        _, result, logs = self._read(self._dir(name))
        step = next((s for s, log in logs.items() if log.status == FAILED), None)
        line = error_line(logs[step].lines) if step else None
        if line is None and result:
            line = error_line([result.get("error") or ""]) or result.get("error")
            found = step_of(result.get("step") or "")
            step = step or (found[0] if found else None)
        return TrainJobFailed(name, step, line or "the job's process ended without a result")

    # ------------------------------------------------------------------ logs and events

    def get_job_logs(self, name: str, follow: bool = False,
                     step: str = TRAINING_STEP) -> Iterator[str]:
        """The lines of one step; with ``follow`` they stream until the step ends."""
        job_dir = self._dir(name)
        if not follow:
            yield from self._read(job_dir)[2].get(step, local_job.StepLog()).lines
            return
        splitter = local_job.LogSplitter()
        with open(job_dir / local_job.LOG, errors="replace") as log:
            pending = ""
            while True:
                chunk = log.readline()
                if chunk:
                    pending += chunk
                    if not pending.endswith("\n"):
                        continue  # half a line: wait for the rest
                    owner, line = splitter.feed(pending)
                    pending = ""
                    if owner == step and line is not None:
                        yield line
                    elif owner == step and splitter.steps[step].finished is not None:
                        return
                    continue
                if not self._alive(name, job_dir):
                    owner, line = splitter.feed(pending) if pending else (None, None)
                    if owner == step and line is not None:
                        yield line
                    return
                time.sleep(0.2)

    def get_job_events(self, name: str) -> list[types.Event]:
        """One event per step start and end, from the job's log."""
        spec, _, logs = self._read(self._dir(name))
        day = dt.datetime.fromisoformat(spec["created"]).astimezone().date()
        events = []
        for step, log in logs.items():
            for stamp, reason in ((log.started, "Started"), (log.finished, log.status)):
                if stamp:
                    when = dt.datetime.combine(day, dt.time.fromisoformat(stamp))
                    events.append(types.Event("Step", step, f"{step} {reason.lower()}",
                                              reason, when))
        return sorted(events, key=lambda e: e.event_time)

    def delete_job(self, name: str) -> None:
        """Stop the job's process if it runs and forget the job (the workspace stays)."""
        job_dir = self._dir(name)
        if self._alive(name, job_dir):
            pid = int((job_dir / "pid").read_text())
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                pass
            proc = self._procs.get(name)
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(pid, signal.SIGKILL)
                    proc.wait()
        self._procs.pop(name, None)
        shutil.rmtree(job_dir)
