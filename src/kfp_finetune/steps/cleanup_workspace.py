"""The exit task of a cluster run: delete the run's workspace volume, or keep it and say why.

The pipeline wraps its work in a ``dsl.ExitHandler`` whose exit task (``cleanup-workspace``)
runs whatever the outcome and receives the run's state as a ``dsl.PipelineTaskFinalStatus``.
The KFP backend fills it in ``resolveInputParameter`` (``backend/src/v2/driver/resolve.go``,
case ``TaskFinalStatus``, from release 2.14) with the last state it recorded for the exit
handler's group: ``COMPLETE``, ``FAILED``, or ``RUNNING`` when no task could record an end (a
pod killed for memory or by its deadline). An exit task may not take another task's outputs, so
the volume's name is derived from the run id
(:func:`~kfp_finetune.steps.check_config.workspace_pvc_name`).

What happens:

* ``FAILED``: deleted, unless ``keep_workspace_on_failure`` (for debugging or the UI's retry).
* ``COMPLETE``: deleted only with ``delete_workspace`` and a ``push_to`` copy (the export step
  fails when the push fails, so a complete run with ``push_to`` has its copy elsewhere); else
  kept: the model lives only there.
* any other state: kept (a volume is never deleted on a guess).
* ``FAILED`` although the export step finished (it marks the claim with
  ``kfp-finetune/exported-model``, see :func:`mark_exported`) and nothing was pushed elsewhere:
  kept. The group's state is written by the last launcher to end; should that write be lost
  after a retried step succeeded, a stale ``FAILED`` must not cost the only copy of the model.

The deletion goes to the Kubernetes API with the pod's service account (the same account the
backend's driver uses for ``CreatePVC``), and only after the claim's ``kfp-finetune/run-id``
annotation proves this run created it.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.errors import ConfigError, WorkspaceError
from kfp_finetune.steps.check_config import ANNOTATION_PREFIX, PVC_PREFIX, workspace_pvc_name

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

Log = Callable[[str], None]
EXPORTED_ANNOTATION = f"{ANNOTATION_PREFIX}exported-model"


def decide_cleanup(
    state: str, *, keep_workspace_on_failure: bool, delete_workspace: bool, push_to: str
) -> tuple[bool, str]:
    """Whether to delete the run's volume, and why.

    Returns:
        ``(delete, reason)``.
    """
    state = (state or "").upper()
    if state == "FAILED":
        if keep_workspace_on_failure:
            return False, ("the run failed and keep_workspace_on_failure is set: the volume is "
                           "kept for debugging or a retry")
        return True, "the run failed (keep_workspace_on_failure=false)"
    if state == "COMPLETE":
        if delete_workspace and (push_to or "").strip():
            return True, f"the run succeeded and the model was pushed to {push_to}"
        return False, ("the run succeeded and the model lives on the volume (it is deleted "
                       "only with delete_workspace=true and push_to)")
    return False, (f"the backend reported state {state or 'none'!r}, neither COMPLETE nor "
                   "FAILED: the volume is kept rather than deleted on a guess")


@dataclass(frozen=True)
class KubeApi:
    """The few calls of the Kubernetes API this task needs, over plain HTTPS.

    Attributes:
        base_url: API server URL, e.g. ``https://10.0.0.1:443``.
        token: Bearer token of the pod's service account.
        namespace: Namespace of the run.
        ca_file: CA bundle of the API server (None: system CAs or plain HTTP).
    """

    base_url: str
    token: str
    namespace: str
    ca_file: str | None = None

    @classmethod
    def in_cluster(cls) -> KubeApi:
        """The API as seen from a pod: service host and port, service-account files.

        Raises:
            ConfigError: Not running in a pod with a service-account token.
        """
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        try:
            token = (SA_DIR / "token").read_text().strip()
            namespace = (SA_DIR / "namespace").read_text().strip()
        except OSError:
            host = ""
        if not host:
            raise ConfigError(
                "no Kubernetes API here (KUBERNETES_SERVICE_HOST or the service-account token "
                f"under {SA_DIR} is missing); the cleanup runs only in a pod of a cluster run."
            )
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", token, namespace, str(SA_DIR / "ca.crt"))

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/merge-patch+json"
        request = urllib.request.Request(
            self.base_url + path, method=method, headers=headers, data=data
        )
        context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, {}
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(
                f"cannot reach the Kubernetes API at {self.base_url} "
                f"({type(exc).__name__}); the volume was not deleted."
            ) from None

    def _claim_path(self, name: str) -> str:
        return f"/api/v1/namespaces/{self.namespace}/persistentvolumeclaims/{name}"

    def get_pvc(self, name: str) -> dict[str, Any] | None:
        """The claim, or None when it does not exist."""
        status, body = self._call("GET", self._claim_path(name))
        if status == 404:
            return None
        _check_status(status, "read", name, self.namespace)
        return body

    def annotate_pvc(self, name: str, annotations: dict[str, str]) -> None:
        """Add annotations to the claim (a JSON merge patch of its metadata)."""
        status, _ = self._call("PATCH", self._claim_path(name),
                               {"metadata": {"annotations": annotations}})
        _check_status(status, "patch", name, self.namespace)

    def delete_pvc(self, name: str) -> None:
        """Delete the claim (gone already is fine)."""
        status, _ = self._call("DELETE", self._claim_path(name))
        if status != 404:
            _check_status(status, "delete", name, self.namespace)


def _check_status(status: int, verb: str, name: str, namespace: str) -> None:
    if status in (401, 403):
        raise ConfigError(
            f"the pipeline's service account may not {verb} PersistentVolumeClaim {name} in "
            f"namespace {namespace} (HTTP {status}); grant it get/patch/delete on "
            "persistentvolumeclaims (CreatePVC needs create already), or delete the volume "
            f"yourself: kubectl -n {namespace} delete pvc {name}"
        )
    if not 200 <= status < 300:
        raise ConfigError(
            f"the Kubernetes API answered HTTP {status} to {verb} PersistentVolumeClaim {name}; "
            f"delete it yourself: kubectl -n {namespace} delete pvc {name}"
        )


def clean_up_workspace(
    state: str,
    run_id: str,
    *,
    keep_workspace_on_failure: bool,
    delete_workspace: bool,
    push_to: str,
    api: KubeApi | None = None,
    log: Log = print,
) -> str:
    """Delete or keep the run's workspace volume; return ``deleted``, ``kept`` or ``absent``.

    Raises:
        WorkspaceError: The claim of that name was not created by this run.
        ConfigError: The Kubernetes API refused or could not be reached.
    """
    name = workspace_pvc_name(run_id)
    delete, reason = decide_cleanup(
        state, keep_workspace_on_failure=keep_workspace_on_failure,
        delete_workspace=delete_workspace, push_to=push_to)
    if not delete:
        log(f"[cleanup] keeping volume {name}: {reason}.")
        return "kept"
    api = api or KubeApi.in_cluster()
    claim = api.get_pvc(name)
    if claim is None:
        log(f"[cleanup] volume {name} does not exist (never created or already deleted).")
        return "absent"
    owner = (claim.get("metadata", {}).get("annotations") or {}).get(
        f"{ANNOTATION_PREFIX}run-id")
    if owner != run_id:
        raise WorkspaceError(
            f"volume {name} was not created by run {run_id} (its {ANNOTATION_PREFIX}run-id "
            f"annotation is {owner!r}); it is left as it is. Delete it yourself if it is yours: "
            f"kubectl -n {api.namespace} delete pvc {name}"
        )
    exported = (claim.get("metadata", {}).get("annotations") or {}).get(EXPORTED_ANNOTATION)
    if exported and not (push_to or "").strip():
        log(f"[cleanup] keeping volume {name}: the backend reported {state!r}, but the export "
            f"step finished and the model at {exported} lives only on this volume.")
        return "kept"
    api.delete_pvc(name)
    log(f"[cleanup] deleted volume {name}: {reason}.")
    return "deleted"


def mark_exported(run_id: str, path: str, api: KubeApi | None = None, log: Log = print) -> bool:
    """Annotate this run's volume with the exported model's path (cluster runs only).

    Outside a pod, or when the claim is not this run's, nothing is done. A refusal of the API
    is logged, never raised: the export itself has succeeded.

    Returns:
        Whether the annotation was written.
    """
    if not run_id:
        return False
    try:
        api = api or KubeApi.in_cluster()
    except ConfigError:
        return False  # a local run: no volume to mark
    name = PVC_PREFIX + run_id
    try:
        name = workspace_pvc_name(run_id)
        claim = api.get_pvc(name)
        owner = ((claim or {}).get("metadata", {}).get("annotations") or {}).get(
            f"{ANNOTATION_PREFIX}run-id")
        if owner != run_id:
            return False
        api.annotate_pvc(name, {EXPORTED_ANNOTATION: path})
    except ConfigError as exc:
        log(f"[export] warning: could not mark volume {name} as holding the model ({exc}); "
            "the cleanup then relies on the run's final state alone.")
        return False
    return True
