"""What both backends share: the runtimes, and waiting for a job (the SDK's contract).

The contract is ``kubeflow.trainer.backends.base.RuntimeBackend``; ``wait_for_job_status``
follows the SDK's Kubernetes backend (``kubeflow/trainer/backends/kubernetes/backend.py``): the
expected statuses must be among Created, Running, Complete and Failed; a Failed job that was not
expected raises; no expected status within ``timeout`` raises ``TimeoutError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

from kubeflow.common.utils import validate_wait_for_job_status
from kubeflow.trainer.backends.base import RuntimeBackend
from kubeflow.trainer.constants import constants
from kubeflow.trainer.types import types

from kfp_finetune.config.runtimes import RUNTIMES
from kfp_finetune.drivers.client.sdk_adapter import runtime_name, sdk_runtime
from kfp_finetune.drivers.client.steps import FAILED, JOB_STATUSES

_IMAGE_PACKAGES = ("torchtune", "torchao", "kfp", "kfp-kubernetes")


class TrainJobFailed(RuntimeError):  # noqa: N818 - reads as what happened, as the SDK's do
    """A job failed; the message carries the failed step's own one-line error.

    Attributes:
        job: The job's name.
        step: The step that failed (e.g. ``dataset-initializer``), or None when unknown.
        error: The step's own error line, e.g. ``DatasetError: column 'output' is missing``.
    """

    def __init__(self, job: str, step: str | None, error: str | None) -> None:
        where = f" in step {step}" if step else ""
        what = error or "no error line was found; read the step's log with get_job_logs()"
        super().__init__(f"TrainJob {job} failed{where}: {what}")
        self.job, self.step, self.error = job, step, error


class PipelineBackend(RuntimeBackend):
    """The runtimes and ``wait_for_job_status``; subclasses run the jobs."""

    def list_runtimes(self) -> list[types.Runtime]:
        """The project's runtimes, as the SDK's ``Runtime`` objects."""
        return [sdk_runtime(name) for name in RUNTIMES]

    def get_runtime(self, name: str) -> types.Runtime:
        """One runtime, as the SDK's ``Runtime`` (what ``train(runtime=...)`` accepts).

        Raises:
            ConfigError: No runtime has that name; the message lists them.
        """
        return sdk_runtime(runtime_name(name))

    def get_runtime_packages(self, runtime: Any) -> list[str]:
        """The training packages the runtime's images carry (this project's pins), printed too."""
        runtime_name(runtime)
        wanted = {name.replace("-", "_") for name in _IMAGE_PACKAGES}
        pins = [req.split(";")[0].strip() for req in metadata.requires("kfp-finetune") or []
                if req.split("=")[0].split(">")[0].strip().replace("-", "_") in wanted]
        for pin in pins:
            print(pin)
        return pins

    def failure(self, name: str, job: types.TrainJob) -> TrainJobFailed:
        """The error for a failed job (subclasses find the failed step's own error line)."""
        step = next((s.name for s in job.steps if s.status == FAILED), None)
        return TrainJobFailed(name, step, None)

    def wait_for_job_status(
        self,
        name: str,
        status: set[str] = {constants.TRAINJOB_COMPLETE},  # noqa: B006 - the SDK's signature
        timeout: int = 600,
        polling_interval: int = 2,
        callbacks: list[Callable[[types.TrainJob], None]] | None = None,
    ) -> types.TrainJob:
        """Wait until the job reaches one of ``status``.

        Raises:
            ValueError: ``status`` is not among Created, Running, Complete, Failed, or the
                interval and timeout are not positive with interval < timeout.
            TrainJobFailed: The job failed (and Failed was not expected): the message names
                the step and carries its own error line.
            TimeoutError: No expected status within ``timeout`` seconds (the job goes on).
        """
        status = set(status)
        if not status <= JOB_STATUSES:
            raise ValueError(f"Expected status {status} must be a subset of {JOB_STATUSES}")
        validate_wait_for_job_status(polling_interval, timeout)
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(name)
            for callback in callbacks or []:
                callback(job)
            if job.status == constants.TRAINJOB_FAILED and constants.TRAINJOB_FAILED not in status:
                raise self.failure(name, job)
            if job.status in status:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Timeout waiting for TrainJob {name} to reach status {sorted(status)}: it "
                    f"is {job.status} after {timeout} s and goes on; wait again or delete_job()."
                )
            time.sleep(max(0.0, min(polling_interval, deadline - time.monotonic())))

    # Recurring runs are a KFP feature; the local backend has none.
    def create_schedule(self, *args: Any, **kwargs: Any) -> str:
        """Create a recurring run (KFP only)."""
        raise NotImplementedError("schedules need a KFP cluster: use KfpBackendConfig")

    def list_schedules(self) -> list[Any]:
        """List recurring runs (KFP only)."""
        raise NotImplementedError("schedules need a KFP cluster: use KfpBackendConfig")

    def delete_schedule(self, name: str) -> None:
        """Delete a recurring run (KFP only)."""
        raise NotImplementedError("schedules need a KFP cluster: use KfpBackendConfig")
