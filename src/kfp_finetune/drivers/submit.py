"""Submitting the pipeline to a Kubeflow Pipelines cluster: upload, run, schedule, follow.

``kfp-finetune submit`` compiles the runtime's pipeline, uploads it (a new pipeline the first
time, a new version of it when the YAML changed, nothing when that exact version is already
there), then starts a run, or with ``--schedule`` creates a recurring run. It talks to the KFP
API with ``kfp.Client``, so authentication works as kfp.Client does it:

* ``--host URL`` plus a bearer token read from the ``KFP_TOKEN`` environment variable or a file
  (``--token-file``); never from the command line, where it would land in the shell history;
* ``--host URL`` alone (a port-forward, or a cluster without authentication);
* no ``--host``: in a pod, the in-cluster service (``ml-pipeline.<namespace>``) with the pod's
  projected service-account token; elsewhere the current (or ``--kube-context``) kubeconfig
  context through the Kubernetes API proxy.

Every input is validated before anything is sent: a run that could only fail on the cluster
is refused here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.drivers.submit_checks import normalize_cron, ops_values  # noqa: F401 (public here)
from kfp_finetune.errors import ConfigError
from kfp_finetune.storage.credentials import redact

TOKEN_ENV = "KFP_TOKEN"
DEFAULT_EXPERIMENT = "kfp-finetune"
_EQUALS = 1  # kfp's filter operation code for EQUALS

Log = Callable[[str], None]


@dataclass(frozen=True)
class Connection:
    """How to reach the KFP API.

    Attributes:
        host: KFP API or UI endpoint, e.g. ``https://kubeflow.example.com/pipeline``; None for
            in-cluster or kubeconfig.
        namespace: Kubeflow profile namespace (multi-user deployments).
        kube_context: kubeconfig context, used when no host is given.
        token_file: File holding a bearer token (else ``$KFP_TOKEN`` when set).
        ssl_ca_cert: CA bundle for a self-signed endpoint.
    """

    host: str | None = None
    namespace: str | None = None
    kube_context: str | None = None
    token_file: str | None = None
    ssl_ca_cert: str | None = None


def _token(conn: Connection) -> str | None:
    if conn.token_file:
        try:
            token = Path(conn.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"--token-file {conn.token_file!r} cannot be read ({exc.strerror}); give a "
                f"readable file or set {TOKEN_ENV} instead."
            ) from None
        if not token:
            raise ConfigError(f"--token-file {conn.token_file!r} is empty; put the token in it.")
        return token
    return (os.environ.get(TOKEN_ENV) or "").strip() or None


def make_client(conn: Connection) -> Any:
    """Create a ``kfp.Client`` for ``conn`` (see the module docstring for the auth order).

    Every request is bounded by ``KFP_FINETUNE_NETWORK_TIMEOUT_S`` (default 60 s).

    Raises:
        ConfigError: The host is not a URL, embeds credentials, refuses the token or cannot
            be reached; the token file cannot be read.
    """
    import kfp

    if conn.host and not re.match(r"^https?://[^\s/]+", conn.host):
        raise ConfigError(
            f"--host {redact(conn.host)!r} is not a URL; write e.g. http://localhost:8080 (a "
            "port-forward of ml-pipeline-ui) or https://kubeflow.example.com/pipeline."
        )
    if conn.host and redact(conn.host) != conn.host:
        raise ConfigError(
            f"--host {redact(conn.host)!r} embeds credentials; never put them in a URL (they "
            f"land in the shell history). Give a bearer token in {TOKEN_ENV} or --token-file."
        )
    from kfp_finetune.storage.network import bound_kfp_requests, probe_kfp

    token = _token(conn)
    if conn.host:
        probe_kfp(conn.host, token, TOKEN_ENV)
    kwargs: dict[str, Any] = {
        "host": conn.host or None,
        "existing_token": token,
        "ssl_ca_cert": conn.ssl_ca_cert,
        "kube_context": conn.kube_context,
    }
    if conn.namespace:
        kwargs["namespace"] = conn.namespace
    client = kfp.Client(**{k: v for k, v in kwargs.items() if v is not None})
    bound_kfp_requests(client)
    return client


@contextmanager
def api_errors(conn: Connection) -> Iterator[None]:
    """Turn the KFP API's HTTP and connection errors into errors that say what to check.

    Raises:
        ConfigError: The API refused the request or could not be reached.
    """
    import urllib3
    from kfp_server_api.exceptions import ApiException

    from kfp_finetune.storage.network import network_problem

    where = redact(conn.host or "the in-cluster/kubeconfig KFP endpoint")
    try:
        yield
    except ApiException as exc:
        hint = ("authentication failed: check the token (KFP_TOKEN or --token-file) and "
                "--namespace" if exc.status in (401, 403)
                else "check --host (the KFP API or UI URL)")
        raise ConfigError(
            f"the KFP API at {where} answered HTTP {exc.status} {exc.reason}; {hint}."
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        problem = network_problem(exc) or type(exc).__name__
        raise ConfigError(
            f"cannot reach the KFP API at {where} ({problem}); check --host, the "
            "port-forward (kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80) or the "
            "network."
        ) from None


# --------------------------------------------------------------------------- backend version


def backend_version(client: Any, log: Log = print) -> tuple[int, int, int] | None:
    """Ask the KFP API its release and refuse one older than ``backend.MIN_BACKEND``.

    ``kfp.Client.get_kfp_healthz()`` keeps only ``multi_user`` of the answer; the API server's
    healthz handler (backend/src/apiserver/main.go: ``newHealthzResponse``) also sends
    ``tag_name``, so the JSON is read as it is, with the client's own host and credentials.

    Returns:
        The release, or None when the server does not tell (a warning is logged).

    Raises:
        ConfigError: The backend is older than the floor.
    """
    from kfp_finetune.drivers.backend import MIN_BACKEND, check_backend_version, version_text

    healthz = getattr(client, "_healthz_api", None)  # kfp.Client 2.x
    if healthz is None:
        log(f"warning: cannot ask this kfp.Client the backend's release; these pipelines need "
            f"{version_text(MIN_BACKEND)} or newer.")
        return None
    body = healthz.api_client.call_api(
        "/apis/v2beta1/healthz", "GET", header_params={"Accept": "application/json"},
        response_type="object", auth_settings=["Bearer"], _return_http_data_only=True,
    )
    tag = body.get("tag_name") if isinstance(body, dict) else None
    version = check_backend_version(tag)
    if version is None:
        log(f"warning: the KFP API does not tell its release (tag_name {tag!r}); these "
            f"pipelines need {version_text(MIN_BACKEND)} or newer.")
    return version


# --------------------------------------------------------------------------- submission


@dataclass(frozen=True)
class SubmitResult:
    """What ``submit`` created on the cluster."""

    pipeline_id: str
    version_id: str
    version_uploaded: bool
    experiment_id: str
    run_id: str | None = None
    recurring_run_id: str | None = None


def _eq_filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": _EQUALS, "key": key, "stringValue": value}]})


def upload(client: Any, runtime_name: str, log: Log = print) -> tuple[str, str, bool]:
    """Upload the runtime's pipeline, or a new version of it when its YAML changed.

    The version name carries a digest of the YAML, so re-submitting the same pipeline reuses
    its version instead of piling up copies.

    Returns:
        ``(pipeline_id, version_id, uploaded)``.
    """
    from kfp_finetune.config.runtimes import get_runtime
    from kfp_finetune.drivers.compile import compile_runtime
    from kfp_finetune.pipelines.finetune import pipeline_name

    rt = get_runtime(runtime_name)
    name = pipeline_name(rt)
    with tempfile.TemporaryDirectory() as tmp:
        path = compile_runtime(rt.name, Path(tmp))
        version_name = f"{name}-{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
        pipeline_id = client.get_pipeline_id(name)
        if pipeline_id is None:
            pipeline = client.upload_pipeline(
                str(path), pipeline_name=name,
                description=f"Fine-tune {rt.description} with torchtune (kfp-finetune).",
            )
            pipeline_id = pipeline.pipeline_id
            versions = client.list_pipeline_versions(
                pipeline_id, page_size=1, sort_by="created_at desc").pipeline_versions or []
            if not versions:
                raise ConfigError(
                    f"the KFP API created pipeline {name!r} ({pipeline_id}) but lists no version "
                    "of it; check the API server's log."
                )
            log(f"uploaded pipeline {name} ({pipeline_id})")
            return pipeline_id, versions[0].pipeline_version_id, True
        existing = client.list_pipeline_versions(
            pipeline_id, filter=_eq_filter("display_name", version_name)).pipeline_versions
        if existing:
            log(f"pipeline {name} version {version_name} is already uploaded")
            return pipeline_id, existing[0].pipeline_version_id, False
        version = client.upload_pipeline_version(
            str(path), pipeline_version_name=version_name, pipeline_id=pipeline_id,
            description=f"kfp-finetune pipeline for {rt.name}",
        )
        log(f"uploaded pipeline {name} version {version_name}")
        return pipeline_id, version.pipeline_version_id, True


def submit(
    client: Any,
    runtime_name: str,
    arguments: dict[str, Any],
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    schedule: str | None = None,
    max_concurrency: int = 1,
    namespace: str | None = None,
    log: Log = print,
) -> SubmitResult:
    """Upload the pipeline and start a run, or a recurring run when ``schedule`` is given.

    Args:
        client: A ``kfp.Client``.
        runtime_name: Runtime name.
        arguments: Pipeline parameters (validated, e.g. by ``pipeline_arguments`` and
            :func:`ops_values`).
        experiment: Experiment to file the run under (created if missing).
        run_name: Display name of the run (default: runtime and UTC time).
        schedule: Cron expression (see :func:`normalize_cron`); None for one run now.
        max_concurrency: Recurring runs of this schedule allowed at once.
        namespace: Kubeflow profile namespace of the experiment (multi-user deployments).
        log: Where progress lines go.

    Returns:
        The ids of what was created.
    """
    from kfp_finetune.config.runtimes import get_runtime

    rt = get_runtime(runtime_name)
    cron = normalize_cron(schedule) if schedule is not None else None
    if max_concurrency < 1:
        raise ConfigError(
            f"--max-concurrency {max_concurrency} must be at least 1 (runs of the schedule "
            "allowed at once)."
        )
    backend_version(client, log)  # refuses a backend older than the pipelines need
    pipeline_id, version_id, uploaded = upload(client, rt.name, log)
    exp = client.create_experiment(experiment, namespace=namespace)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if cron is not None:
        recurring = client.create_recurring_run(
            experiment_id=exp.experiment_id,
            job_name=run_name or f"{rt.name} every {cron}",
            description=f"kfp-finetune {rt.name}, schedule {cron}",
            cron_expression=cron,
            max_concurrency=max_concurrency,
            no_catchup=True,
            params=arguments,
            pipeline_id=pipeline_id,
            version_id=version_id,
            enabled=True,
        )
        log(f"recurring run {recurring.recurring_run_id} created: {cron}")
        return SubmitResult(pipeline_id, version_id, uploaded, exp.experiment_id,
                            recurring_run_id=recurring.recurring_run_id)
    run = client.run_pipeline(
        experiment_id=exp.experiment_id,
        job_name=run_name or f"{rt.name} {stamp}",
        params=arguments,
        pipeline_id=pipeline_id,
        version_id=version_id,
    )
    log(f"run {run.run_id} started")
    return SubmitResult(pipeline_id, version_id, uploaded, exp.experiment_id, run_id=run.run_id)


TERMINAL_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")


def wait(client: Any, run_id: str, timeout_s: float, log: Log = print,
         poll_s: float = 10.0) -> str:
    """Follow a run to its end and return its final state (e.g. ``SUCCEEDED``, ``FAILED``).

    Raises:
        ConfigError: The run did not finish within ``timeout_s`` (it keeps running).
    """
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        state = str(client.get_run(run_id).state or "PENDING").upper()
        if state != last:
            log(f"run {run_id}: {state}")
            last = state
        if state in TERMINAL_STATES:
            return state
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"run {run_id} did not finish within {timeout_s:.0f} s (last state {state}); "
                "it keeps running on the cluster (see the KFP UI); wait longer with "
                "--wait-timeout."
            )
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
