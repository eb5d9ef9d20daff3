"""``TrainerClient``: the Kubeflow SDK's client, with this project's pipeline as its backend.

A user of ``kubeflow.trainer`` changes one import::

    from kubeflow.trainer import *
    from kfp_finetune import TrainerClient, KfpBackendConfig  # or LocalBackendConfig

and keeps ``get_runtime``, ``train``, ``get_job_logs``, ``wait_for_job_status``, ``list_jobs``
and ``delete_job``. The method signatures are the SDK's (``kubeflow.trainer.TrainerClient``);
``train`` also takes ``schedule`` (a cron expression: a recurring run, KFP only), and
``list_schedules``/``delete_schedule`` manage those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from kubeflow.trainer.constants import constants
from kubeflow.trainer.types import types

from kfp_finetune.drivers.client.kfp_backend import KfpBackend, KfpBackendConfig, Schedule
from kfp_finetune.drivers.client.local_backend import LocalBackend, LocalBackendConfig


class TrainerClient:
    """Fine-tune with this project's KFP pipeline through the Kubeflow SDK's client API."""

    def __init__(self, backend_config: KfpBackendConfig | LocalBackendConfig | None = None):
        """Pick the backend from its config.

        Args:
            backend_config: ``KfpBackendConfig(host=..., namespace=..., experiment=...)`` for a
                Kubeflow Pipelines cluster (the default, with kfp.Client's own discovery), or
                ``LocalBackendConfig(workspace=...)`` to run with kfp.local on this machine.

        Raises:
            ValueError: The config is neither.
        """
        if backend_config is None:
            backend_config = KfpBackendConfig()
        if isinstance(backend_config, KfpBackendConfig):
            self.backend: KfpBackend | LocalBackend = KfpBackend(backend_config)
        elif isinstance(backend_config, LocalBackendConfig):
            self.backend = LocalBackend(backend_config)
        else:
            raise ValueError(
                f"Invalid backend config {backend_config!r}; pass KfpBackendConfig(...) or "
                "LocalBackendConfig(workspace=...) from kfp_finetune."
            )

    def list_runtimes(self) -> list[types.Runtime]:
        """The runtimes (``torchtune-llama3.2-1b``, ...), as the SDK's ``Runtime``."""
        return self.backend.list_runtimes()

    def get_runtime(self, name: str) -> types.Runtime:
        """One runtime by name (pass it to ``train(runtime=...)``)."""
        return self.backend.get_runtime(name=name)

    def get_runtime_packages(self, runtime: types.Runtime) -> list[str]:
        """The training packages of the runtime's images (printed and returned)."""
        return self.backend.get_runtime_packages(runtime=runtime)

    def train(
        self,
        runtime: str | Any | None = None,
        initializer: types.Initializer | None = None,
        trainer: types.BuiltinTrainer | None = None,
        options: list | None = None,
        *,
        schedule: str | None = None,
        export_name: str = "",
    ) -> str:
        """Start a fine-tuning job and return its name (or, with ``schedule``, a schedule's).

        Args:
            runtime: A runtime name or the ``Runtime`` that ``get_runtime()`` returned.
            initializer: ``Initializer(dataset=..., model=...)`` with the SDK's HuggingFace or
                S3 initializers. Credentials in them (``access_token``, S3 keys) go into a
                Kubernetes Secret made for this job and deleted with it (locally: into the
                job process's environment), never into pipeline parameters or logs.
            trainer: ``BuiltinTrainer(config=TorchTuneConfig(...))``; None for the runtime's
                defaults.
            options: Not supported (must be empty).
            schedule: A cron expression such as ``"0 3 * * *"``: create a recurring run
                instead (KFP only); the return value is then the schedule's name.
            export_name: Folder under ``/workspace/output`` for the model ("" for a new one).

        Returns:
            The job's name (or the schedule's).

        Raises:
            ConfigError: Bad input, before anything is created.
        """
        if schedule is not None:
            return self.backend.create_schedule(runtime, initializer, trainer, schedule,
                                                export_name=export_name)
        return self.backend.train(runtime=runtime, initializer=initializer, trainer=trainer,
                                  options=options, export_name=export_name)

    def list_jobs(self, runtime: types.Runtime | None = None) -> list[types.TrainJob]:
        """The jobs (only ``runtime``'s when given)."""
        return self.backend.list_jobs(runtime=runtime)

    def get_job(self, name: str) -> types.TrainJob:
        """One job with its steps and their status."""
        return self.backend.get_job(name=name)

    def get_job_logs(self, name: str, step: str = constants.NODE + "-0",
                     follow: bool | None = False) -> Iterator[str]:
        """The log lines of one step (default ``node-0``, training); ``follow`` streams them."""
        return self.backend.get_job_logs(name=name, follow=bool(follow), step=step)

    def get_job_events(self, name: str) -> list[types.Event]:
        """The job's events (state changes of the run and its steps' pods)."""
        return self.backend.get_job_events(name=name)

    def wait_for_job_status(
        self,
        name: str,
        status: set[str] = {constants.TRAINJOB_COMPLETE},  # noqa: B006 - the SDK's signature
        timeout: int = 600,
        polling_interval: int = 2,
        callbacks: list[Callable[[types.TrainJob], None]] | None = None,
    ) -> types.TrainJob:
        """Wait for the job to reach one of ``status``.

        Raises:
            TrainJobFailed: (a ``RuntimeError``) the job failed; the message is the failed
                step's own error line.
            TimeoutError: Not reached within ``timeout`` seconds.
        """
        return self.backend.wait_for_job_status(name=name, status=status, timeout=timeout,
                                                polling_interval=polling_interval,
                                                callbacks=callbacks)

    def delete_job(self, name: str) -> None:
        """Stop and delete the job, with its volume and its credentials Secret (cluster)."""
        return self.backend.delete_job(name=name)

    def list_schedules(self) -> list[Schedule]:
        """The recurring runs this client's experiment holds (KFP only)."""
        return self.backend.list_schedules()

    def delete_schedule(self, name: str) -> None:
        """Delete a recurring run and its credentials Secret (KFP only)."""
        return self.backend.delete_schedule(name)
