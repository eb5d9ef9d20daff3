"""The Kubernetes API calls of the cluster backend: step pods and their logs, Secrets, PVCs.

Which pod ran a step: the KFP backend labels every pod of a run ``pipeline/runid=<run id>``
(kubeflow/pipelines backend/src/apiserver/template/v2_template.go, ``SetPodMetadataLabels``),
and Argo names each pod's node in the annotation ``workflows.argoproj.io/node-name``; a task's
user code runs in the ``executor`` node under the task's own node (``...fine-tune.executor``,
retries ``executor(1)``; backend/src/v2/compiler/argocompiler/container.go and
backend/src/v2/component/launcher_v2.go ``retryIndexFromPodAnnotation``), in the container
``main``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from kfp_finetune.drivers.client.steps import step_of

RUN_LABEL = "pipeline/runid"
NODE_ANNOTATION = "workflows.argoproj.io/node-name"
CONTAINER = "main"
_EXECUTOR = re.compile(r"\.(?P<task>[^.]+)\.executor(\((?P<n>\d+)\))?$")


def core_api(configuration: Any = None, config_file: str | None = None,
             context: str | None = None) -> Any:
    """A ``CoreV1Api``: from ``configuration`` when given, else in-cluster or kubeconfig."""
    from kubernetes import client, config

    if configuration is None:
        try:
            if config_file or context:
                raise config.ConfigException("a kubeconfig was asked for")
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config(config_file=config_file, context=context)
        return client.CoreV1Api()
    return client.CoreV1Api(client.ApiClient(configuration))


def step_pods(core: Any, namespace: str, run_id: str) -> dict[str, Any]:
    """Step name -> the latest attempt's executor pod (a ``V1Pod``) of the run."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"{RUN_LABEL}={run_id}").items
    found: dict[str, tuple[int, Any]] = {}
    for pod in pods or []:
        node = (pod.metadata.annotations or {}).get(NODE_ANNOTATION, "")
        match = _EXECUTOR.search(node)
        step = step_of(match["task"]) if match else None
        if step is None:
            continue
        attempt = int(match["n"] or 0)
        if step[0] not in found or attempt >= found[step[0]][0]:
            found[step[0]] = (attempt, pod)
    return {step: pod for step, (_, pod) in found.items()}


def pod_log_lines(core: Any, namespace: str, pod: str, follow: bool) -> Iterator[str]:
    """The lines of the pod's ``main`` container; with ``follow`` until the container ends."""
    from kubernetes.watch.watch import iter_resp_lines

    if not follow:
        text = core.read_namespaced_pod_log(pod, namespace, container=CONTAINER)
        yield from (text or "").splitlines()
        return
    resp = core.read_namespaced_pod_log(pod, namespace, container=CONTAINER, follow=True,
                                        _preload_content=False)
    try:
        yield from iter_resp_lines(resp)
    finally:
        resp.release_conn()


def pod_events(core: Any, namespace: str, pod: str) -> list[Any]:
    """The Kubernetes events of one pod (``CoreV1Event``)."""
    return core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={pod}").items or []


def create_secret(core: Any, namespace: str, name: str, data: dict[str, str],
                  job: str) -> None:
    """Create the job's credentials Secret (labelled with the job's name)."""
    from kubernetes import client

    body = client.V1Secret(
        metadata=client.V1ObjectMeta(
            name=name, labels={"app": "kfp-finetune", "kfp-finetune/job": job}),
        string_data=data, type="Opaque",
    )
    core.create_namespaced_secret(namespace, body)


def delete_if_present(delete: Any, name: str, namespace: str) -> bool:
    """Call ``delete(name, namespace)``; False when it was already gone (HTTP 404)."""
    from kubernetes.client import ApiException

    try:
        delete(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True
