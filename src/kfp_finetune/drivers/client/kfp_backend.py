"""The cluster backend: a job is a KFP run of this project's pipeline; steps are its tasks.

``train`` uploads the runtime's pipeline if needed and starts a run
(``kfp_finetune.drivers.submit``),
returning at once with the job's name, which is the run's display name. Credentials given in
Python go into a Secret ``<job>-credentials`` created just before the run and named in its
``secret_hf_token``/``secret_s3`` parameters; ``delete_job`` deletes it with the run and the
run's volume (``kfp-finetune-<run id>``, ``cluster_ops.workspace_pvc_name``: a terminated run
never reaches its exit task, which would otherwise clean it up). Step states come
from the run's task details, logs from the step's pod through the Kubernetes API.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kubeflow.trainer.types import types

from kfp_finetune.config.runtimes import RUNTIMES
from kfp_finetune.drivers.client import k8s
from kfp_finetune.drivers.client.base import PipelineBackend, TrainJobFailed
from kfp_finetune.drivers.client.sdk_adapter import (
    Credentials,
    runtime_name,
    sdk_runtime,
    to_request,
)
from kfp_finetune.drivers.client.steps import (
    FAILED,
    KFP_STATES,
    PENDING,
    STEP_OF_TASK,
    TRAINING_STEP,
    error_line,
    new_job_name,
    step_of,
)
from kfp_finetune.drivers.submit import (
    DEFAULT_EXPERIMENT,
    TERMINAL_STATES,
    Connection,
    api_errors,
    make_client,
    ops_values,
    submit,
)
from kfp_finetune.errors import ConfigError
from kfp_finetune.steps.check_config import workspace_pvc_name
from kfp_finetune.storage.credentials import redact

log = logging.getLogger(__name__)
STEP_ORDER = list(dict.fromkeys(STEP_OF_TASK.values()))
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class KfpBackendConfig:
    """Where the KFP API and the Kubernetes API are, and how to authenticate (as kfp.Client).

    Attributes:
        host: KFP API or UI URL; None for in-cluster or the kubeconfig's proxy.
        namespace: Kubeflow profile namespace: where runs, pods, Secrets and PVCs live
            (default ``kubeflow``, the single-user namespace).
        experiment: Experiment the runs are filed under (created if missing).
        token_file: File with a bearer token; else ``$KFP_TOKEN`` when set. Never a token
            argument (it would end up in notebooks and logs).
        ssl_ca_cert: CA bundle for a self-signed endpoint.
        kube_context: kubeconfig context (for the KFP proxy and the Kubernetes API).
        kube_config_file: kubeconfig file for the Kubernetes API.
        kubernetes_configuration: A ``kubernetes.client.Configuration`` to use instead.
        pipeline_options: Operations parameters of the pipeline by run-form name, e.g.
            ``{"workspace_storage_class": "fast", "cluster_node_selector": {"pool": "a100"}}``
            (``kfp-finetune parameters`` lists them; earlier names are accepted for a release).
    """

    host: str | None = None
    namespace: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    token_file: str | None = None
    ssl_ca_cert: str | None = None
    kube_context: str | None = None
    kube_config_file: str | None = None
    kubernetes_configuration: Any = field(default=None, repr=False)
    pipeline_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Schedule:
    """A recurring run of the pipeline."""

    name: str
    cron: str
    enabled: bool
    runtime: str | None
    recurring_run_id: str
    creation_timestamp: datetime | None


def _filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key,
                                       "string_value": value}]})


def secret_name(job: str) -> str:
    """The credentials Secret of a job or schedule."""
    return f"{job}-credentials"


class KfpBackend(PipelineBackend):
    """``RuntimeBackend`` over a Kubeflow Pipelines cluster."""

    def __init__(self, cfg: KfpBackendConfig) -> None:
        self.cfg = cfg
        self.conn = Connection(host=cfg.host, namespace=cfg.namespace,
                               kube_context=cfg.kube_context, token_file=cfg.token_file,
                               ssl_ca_cert=cfg.ssl_ca_cert)
        self.namespace = cfg.namespace or "kubeflow"
        with api_errors(self.conn):  # kfp.Client asks the API for its health at once
            self.kfp = make_client(self.conn)
        self._core: Any = None
        self._runtime_of: dict[str, str | None] = {}
        self._warned = False

    @property
    def core(self) -> Any:
        """The Kubernetes ``CoreV1Api`` (made on first use)."""
        from kubernetes.config import ConfigException

        if self._core is None:
            try:
                self._core = k8s.core_api(self.cfg.kubernetes_configuration,
                                          self.cfg.kube_config_file, self.cfg.kube_context)
            except ConfigException as exc:
                raise ConfigError(
                    f"no Kubernetes API to reach ({exc}); step logs, credentials Secrets and "
                    "volumes need one: give a kube context (KfpBackendConfig(kube_context=...)) "
                    "or KfpBackendConfig(kubernetes_configuration=...)."
                ) from None
        return self._core

    @contextmanager
    def _k8s(self, what: str, hide: tuple[str, ...] = ()) -> Iterator[None]:
        import urllib3
        from kubernetes.client import ApiException

        try:
            yield
        except ApiException as exc:
            raise ConfigError(redact(
                f"{what} in namespace {self.namespace!r}: the Kubernetes API answered HTTP "
                f"{exc.status} {exc.reason}; check the kube context, the namespace and your "
                "rights there.", hide)) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ConfigError(
                f"{what}: cannot reach the Kubernetes API ({type(exc).__name__}); check the "
                "kube context (or KfpBackendConfig.kubernetes_configuration) and the network."
            ) from None

    # ------------------------------------------------------------------ train and schedule

    def _prepare(self, runtime: Any, initializer: Any, trainer: Any, export_name: str,
                 name: str) -> tuple[str, dict[str, Any], Credentials]:
        request = to_request(runtime, initializer, trainer, export_name)
        ops = ops_values(self.cfg.pipeline_options,
                         push_to=request.arguments.get("export_push_to", ""))
        args = {**request.arguments, **ops}
        creds = request.credentials
        if creds.hf:
            args["secret_hf_token"] = secret_name(name)
        if creds.s3:
            args["secret_s3"] = secret_name(name)
        return request.runtime, args, creds

    def _submit(self, name: str, runtime: str, args: dict[str, Any], creds: Credentials,
                schedule: str | None = None) -> Any:
        data = creds.secret_data()
        if data:
            with self._k8s(f"creating Secret {secret_name(name)!r}", creds.values()):
                k8s.create_secret(self.core, self.namespace, secret_name(name), data, name)
        try:
            with api_errors(self.conn):
                return submit(self.kfp, runtime, args, experiment=self.cfg.experiment,
                              run_name=name, schedule=schedule,
                              namespace=self.cfg.namespace, log=log.info)
        except BaseException:
            if data:  # nothing half-made stays behind
                k8s.delete_if_present(self.core.delete_namespaced_secret, secret_name(name),
                                      self.namespace)
            raise

    def train(self, runtime: Any = None, initializer: Any = None, trainer: Any = None,
              options: list | None = None, export_name: str = "") -> str:
        """Start a run and return the job's name at once (see the module docstring).

        Raises:
            ConfigError: Bad input (before anything is created), or an API refused a call.
        """
        if options:
            raise ConfigError("options are not supported by kfp_finetune's TrainerClient; "
                              "use KfpBackendConfig(pipeline_options=...) for the pipeline's "
                              "operations settings.")
        name = new_job_name()
        runtime_, args, creds = self._prepare(runtime, initializer, trainer, export_name, name)
        self._submit(name, runtime_, args, creds)
        return name

    def create_schedule(self, runtime: Any, initializer: Any, trainer: Any, schedule: str,
                        export_name: str = "") -> str:
        """Create a recurring run (cron ``schedule``, one run at a time); return its name."""
        from kfp_finetune.drivers.submit import normalize_cron

        normalize_cron(schedule)
        name = new_job_name()
        runtime_, args, creds = self._prepare(runtime, initializer, trainer, export_name, name)
        self._submit(name, runtime_, args, creds, schedule=schedule)
        return name

    def list_schedules(self) -> list[Schedule]:
        """The recurring runs of this project's pipelines."""
        with api_errors(self.conn):
            found = self.kfp.list_recurring_runs(
                page_size=200, namespace=self.cfg.namespace).recurring_runs or []
            return [Schedule(
                name=rr.display_name, cron=rr.trigger.cron_schedule.cron if rr.trigger and
                rr.trigger.cron_schedule else "", enabled=str(rr.status) == "ENABLED",
                runtime=self._runtime(rr.pipeline_version_reference),
                recurring_run_id=rr.recurring_run_id, creation_timestamp=rr.created_at,
            ) for rr in found if self._runtime(rr.pipeline_version_reference)]

    def delete_schedule(self, name: str) -> None:
        """Delete the recurring run named ``name`` and its credentials Secret."""
        match = [s for s in self.list_schedules() if name in (s.name, s.recurring_run_id)]
        if not match:
            raise ValueError(f"No schedule named {name!r}; list_schedules() shows them.")
        with api_errors(self.conn):
            self.kfp.delete_recurring_run(match[0].recurring_run_id)
        with self._k8s(f"deleting Secret {secret_name(match[0].name)!r}"):
            k8s.delete_if_present(self.core.delete_namespaced_secret,
                                  secret_name(match[0].name), self.namespace)

    # ------------------------------------------------------------------ jobs

    def _runtime(self, ref: Any) -> str | None:
        from kfp_finetune.pipelines.finetune.pipeline import pipeline_name

        pipeline_id = getattr(ref, "pipeline_id", None)
        if not pipeline_id:
            return None
        if pipeline_id not in self._runtime_of:
            with api_errors(self.conn):
                display = self.kfp.get_pipeline(pipeline_id).display_name
            names = {pipeline_name(rt): rt.name for rt in RUNTIMES.values()}
            self._runtime_of[pipeline_id] = names.get(display)
        return self._runtime_of[pipeline_id]

    def _find_run(self, name: str) -> Any:
        with api_errors(self.conn):
            runs = self.kfp.list_runs(page_size=2, namespace=self.cfg.namespace,
                                      filter=_filter("display_name", name)).runs or []
            if len(runs) == 1:
                return self.kfp.get_run(runs[0].run_id)
            if not runs and _UUID.match(name):
                return self.kfp.get_run(name)
        what = "several runs are" if runs else "no run is"
        raise ValueError(f"No TrainJob {name!r}: {what} named so; list_jobs() shows them.")

    def _steps(self, run: Any) -> list[types.Step]:
        best: dict[str, tuple[int, Any]] = {}
        details = run.run_details.task_details if run.run_details else None
        for task in details or []:
            found = step_of(task.display_name or "")
            if found and (found[0] not in best or found[1] >= best[found[0]][0]):
                best[found[0]] = (found[1], task)
        pods: dict[str, Any] = {}
        try:
            if best:
                with self._k8s(f"listing the pods of run {run.run_id}"):
                    pods = k8s.step_pods(self.core, self.namespace, run.run_id)
        except ConfigError as exc:  # KFP alone still gives the steps and their states
            if not self._warned:
                warnings.warn(f"steps are shown without their pods: {exc}", stacklevel=3)
                self._warned = True
        steps = []
        for step in sorted(best, key=STEP_ORDER.index):
            state = KFP_STATES.get(str(best[step][1].state or "PENDING"), ("", PENDING))[1]
            pod = pods.get(step)
            # As the SDK does, a step with a pod reports the pod's phase (a task may be
            # "running" while its pod still waits for a node).
            phase = pod.status.phase if pod is not None and pod.status else None
            steps.append(types.Step(name=step, status=phase or state,
                                    pod_name=pod.metadata.name if pod else ""))
        return steps

    def _job(self, run: Any) -> types.TrainJob:
        runtime = self._runtime(run.pipeline_version_reference)
        status = KFP_STATES.get(str(run.state or "PENDING"), (KFP_STATES["PENDING"][0],))[0]
        return types.TrainJob(
            name=run.display_name, runtime=sdk_runtime(runtime) if runtime else None,
            steps=self._steps(run), num_nodes=1,
            creation_timestamp=run.created_at or datetime.now(timezone.utc), status=status,
        )

    def get_job(self, name: str) -> types.TrainJob:
        """The run named ``name`` (or with that run id) as a TrainJob with its steps."""
        return self._job(self._find_run(name))

    def list_jobs(self, runtime: Any = None) -> list[types.TrainJob]:
        """The runs of this project's pipelines (only ``runtime``'s when given), oldest first."""
        wanted = runtime_name(runtime) if runtime is not None else None
        with api_errors(self.conn):
            runs = self.kfp.list_runs(page_size=200, sort_by="created_at asc",
                                      namespace=self.cfg.namespace).runs or []
        jobs = []
        for run in runs:
            found = self._runtime(run.pipeline_version_reference)
            if found and (wanted is None or found == wanted):
                jobs.append(self._job(self.kfp.get_run(run.run_id)))
        return jobs

    def failure(self, name: str, job: types.TrainJob) -> TrainJobFailed:
        """The failed step and its own error line: from its pod's log, else from KFP."""
        run = self._find_run(name)
        step = next((s for s in job.steps if s.status == FAILED), None)
        line = None
        if step is not None and step.pod_name:
            with self._k8s(f"reading the log of pod {step.pod_name}"):
                line = error_line(list(k8s.pod_log_lines(
                    self.core, self.namespace, step.pod_name, follow=False)))
        # Else what KFP recorded: the failed task's error, then the run's.
        tasks = run.run_details.task_details if run.run_details else None
        errors = [t.error.message for t in tasks or [] if t.error and t.error.message
                  and step and (step_of(t.display_name or "") or ("",))[0] == step.name]
        if run.error is not None and run.error.message:
            errors.append(run.error.message)
        for message in errors if line is None else []:
            line = error_line([message])
            if line:
                break
        if line is None and errors:
            line = errors[-1].splitlines()[0]
        return TrainJobFailed(name, step.name if step else None, line)

    # ------------------------------------------------------------------ logs, events, delete

    def get_job_logs(self, name: str, follow: bool = False,
                     step: str = TRAINING_STEP) -> Iterator[str]:
        """The step's pod log; with ``follow``, waits for its pod and streams until it ends."""
        import time

        while True:
            job = self.get_job(name)
            found = next((s for s in job.steps if s.name == step), None)
            if found is not None and found.pod_name and found.status != PENDING:
                break
            if not follow or job.status in ("Complete", "Failed"):
                return
            time.sleep(2)
        with self._k8s(f"reading the log of pod {found.pod_name}"):
            yield from k8s.pod_log_lines(self.core, self.namespace, found.pod_name, follow)

    def get_job_events(self, name: str) -> list[types.Event]:
        """The run's and its steps' state changes, and the Kubernetes events of their pods."""
        run = self._find_run(name)
        events = [types.Event("Run", run.display_name, f"run is {h.state}", str(h.state),
                              h.update_time) for h in run.state_history or [] if h.update_time]
        for step in self._steps(run):
            if step.pod_name:
                with self._k8s(f"listing the events of pod {step.pod_name}"):
                    events += [types.Event("Pod", step.pod_name, e.message or "", e.reason or "",
                                           e.first_timestamp or e.event_time)
                               for e in k8s.pod_events(self.core, self.namespace, step.pod_name)]
        far = datetime.min.replace(tzinfo=timezone.utc)
        return sorted(events, key=lambda e: e.event_time or far)

    def delete_job(self, name: str) -> None:
        """Terminate and delete the run, then its volume and its credentials Secret."""
        run = self._find_run(name)
        with api_errors(self.conn):
            if str(run.state) not in TERMINAL_STATES:
                self.kfp.terminate_run(run.run_id)
            self.kfp.delete_run(run.run_id)
        with self._k8s(f"deleting the volume and Secret of run {run.run_id}"):
            k8s.delete_if_present(self.core.delete_namespaced_persistent_volume_claim,
                                  workspace_pvc_name(run.run_id), self.namespace)
            k8s.delete_if_present(self.core.delete_namespaced_secret,
                                  secret_name(run.display_name), self.namespace)
