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

from kfp_finetune.credentials import redact
from kfp_finetune.errors import ConfigError

TOKEN_ENV = "KFP_TOKEN"
DEFAULT_EXPERIMENT = "kfp-finetune"
ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
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
    from kfp_finetune.network import bound_kfp_requests, probe_kfp

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

    from kfp_finetune.network import network_problem

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


# --------------------------------------------------------------------------- validation


def normalize_cron(expression: str) -> str:
    """Return KFP's 6-field cron (seconds first) for a 5- or 6-field cron or an ``@`` macro.

    Raises:
        ConfigError: The expression has another number of fields.
    """
    text = " ".join(expression.split())
    if text.startswith("@"):
        if re.fullmatch(r"@(yearly|annually|monthly|weekly|daily|midnight|hourly)|@every \S+",
                        text):
            return text
    else:
        fields = text.split(" ")
        if len(fields) == 5:
            return "0 " + text
        if len(fields) == 6:
            return text
    raise ConfigError(
        f"--schedule {expression!r} is not a cron expression; use 5 fields "
        "(minute hour day month weekday, e.g. '0 3 * * *' for 03:00 daily), 6 fields with "
        "seconds first, or a macro such as @daily or '@every 12h'."
    )


def _json_arg(text: str | None, name: str, kind: type) -> Any:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, kind):
        example = ('\'{"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}\'' if kind is dict
                   else '\'[{"key": "nvidia.com/gpu", "operator": "Exists", '
                        '"effect": "NoSchedule"}]\'')
        raise ConfigError(
            f"{name} {text!r} is not a JSON {'object' if kind is dict else 'list'}; write e.g. "
            f"{name} {example}."
        )
    return value


def _check_quantity(value: str | None, name: str, example: str) -> None:
    if value is not None and not _QUANTITY.match(value):
        raise ConfigError(
            f"{name} {value!r} is not a Kubernetes quantity; write e.g. {example}."
        )


def ops_arguments(
    *,
    push_to: str = "",
    delete_workspace: bool = False,
    copy_to_artifact: bool = False,
    pvc_size: str | None = None,
    pvc_storage_class: str | None = None,
    pvc_access_mode: str | None = None,
    accelerator_type: str | None = None,
    node_selector: str | None = None,
    tolerations: str | None = None,
    cpu_request: str | None = None,
    memory_request: str | None = None,
    hf_token_secret: str | None = None,
    s3_secret: str | None = None,
) -> dict[str, Any]:
    """Validate the operations options and turn the given ones into pipeline parameters.

    Options left as None keep the pipeline's defaults.

    Raises:
        ConfigError: An option is malformed, or ``delete_workspace`` would delete the only copy.
    """
    from kfp_finetune.export import parse_destination

    dest = parse_destination(push_to)
    if delete_workspace and dest is None:
        raise ConfigError(
            "--delete-workspace without --push-to would delete the only copy of the model (it "
            "lives on the workspace volume); add --push-to hf://org/repo or s3://bucket/prefix, "
            "or keep the volume."
        )
    _check_quantity(pvc_size, "--pvc-size", "100Gi")
    _check_quantity(cpu_request, "--cpu-request", "8 or 7500m")
    _check_quantity(memory_request, "--memory-request", "64Gi")
    if pvc_access_mode is not None and pvc_access_mode not in ACCESS_MODES:
        raise ConfigError(
            f"--pvc-access-mode {pvc_access_mode!r} is not an access mode; use one of "
            f"{', '.join(ACCESS_MODES)}."
        )
    for name, value in (("--pvc-storage-class", pvc_storage_class),
                        ("--hf-token-secret", hf_token_secret), ("--s3-secret", s3_secret)):
        if value is not None and not _DNS_NAME.match(value):
            raise ConfigError(
                f"{name} {value!r} is not a Kubernetes object name; use lowercase letters, "
                "digits, '-' and '.'."
            )
    selector = _json_arg(node_selector, "--node-selector", dict)
    if selector is not None and not all(isinstance(v, str) for v in selector.values()):
        raise ConfigError(
            f"--node-selector {node_selector!r}: every label value must be a string; quote "
            "numbers and booleans."
        )
    tols = _json_arg(tolerations, "--tolerations", list)
    for tol in tols or []:
        if not isinstance(tol, dict) or not set(tol) <= _TOLERATION_KEYS:
            raise ConfigError(
                f"--tolerations item {tol!r} is not a Kubernetes toleration; use only the keys "
                f"{', '.join(sorted(_TOLERATION_KEYS))}."
            )
    args: dict[str, Any] = {
        "push_to": push_to,
        "delete_workspace": delete_workspace,
        "copy_to_artifact": copy_to_artifact,
        "pvc_size": pvc_size,
        "pvc_storage_class": pvc_storage_class,
        "pvc_access_modes": None if pvc_access_mode is None else [pvc_access_mode],
        "accelerator_type": accelerator_type,
        "node_selector": selector,
        "tolerations": tols,
        "cpu_request": cpu_request,
        "memory_request": memory_request,
        "hf_token_secret": hf_token_secret,
        "s3_secret": s3_secret,
    }
    return {k: v for k, v in args.items() if v is not None}


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
    from kfp_finetune.compile import compile_runtime
    from kfp_finetune.pipelines.finetune import pipeline_name
    from kfp_finetune.runtimes import get_runtime

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
            :func:`ops_arguments`).
        experiment: Experiment to file the run under (created if missing).
        run_name: Display name of the run (default: runtime and UTC time).
        schedule: Cron expression (see :func:`normalize_cron`); None for one run now.
        max_concurrency: Recurring runs of this schedule allowed at once.
        namespace: Kubeflow profile namespace of the experiment (multi-user deployments).
        log: Where progress lines go.

    Returns:
        The ids of what was created.
    """
    from kfp_finetune.runtimes import get_runtime

    rt = get_runtime(runtime_name)
    cron = normalize_cron(schedule) if schedule is not None else None
    if max_concurrency < 1:
        raise ConfigError(
            f"--max-concurrency {max_concurrency} must be at least 1 (runs of the schedule "
            "allowed at once)."
        )
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
