"""The exit task's cleanup against a Kubernetes API stand-in on 127.0.0.1.

No cluster here: the stand-in answers the two PersistentVolumeClaim calls (GET, DELETE) with
the Kubernetes API's status codes, checks the bearer token and records what it was asked.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kfp import dsl

from kfp_finetune.components.cleanup_workspace import cleanup_workspace
from kfp_finetune.errors import ConfigError, WorkspaceError
from kfp_finetune.steps.cleanup_workspace import (
    KubeApi,
    clean_up_workspace,
    decide_cleanup,
    mark_exported,
)

RUN_ID = "0b6f1a52-4c1e-4a7e-9d43-2f7a3c0e8b11"
PVC = f"kfp-finetune-{RUN_ID}"
NS = "team-ml"
TOKEN = "sa-token-abc"


class FakeKube:
    """Claims by name; ``calls`` lists (method, path); ``deny`` answers 403 to everything."""

    def __init__(self) -> None:
        self.claims: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.deny = False
        self.patches: list[tuple[str | None, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                fake.calls.append((method, self.path))
                prefix = f"/api/v1/namespaces/{NS}/persistentvolumeclaims/"
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._answer(401, {"reason": "Unauthorized"})
                if fake.deny:
                    return self._answer(403, {"reason": "Forbidden"})
                name = self.path[len(prefix):] if self.path.startswith(prefix) else None
                if name not in fake.claims:
                    return self._answer(404, {"reason": "NotFound"})
                if method == "DELETE":
                    return self._answer(200, fake.claims.pop(name))
                if method == "PATCH":
                    patch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    fake.patches.append((self.headers.get("Content-Type"), patch))
                    fake.claims[name]["metadata"]["annotations"].update(
                        patch["metadata"]["annotations"])
                return self._answer(200, fake.claims[name])

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_DELETE(self) -> None:  # noqa: N802
                self._handle("DELETE")

            def do_PATCH(self) -> None:  # noqa: N802
                self._handle("PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        host, port = self.server.server_address[:2]
        self.api = KubeApi(f"http://{host}:{port}", TOKEN, NS)

    def add_claim(self, name: str, run_id: str) -> None:
        self.claims[name] = {"metadata": {"name": name, "annotations": {
            "kfp-finetune/run-id": run_id, "kfp-finetune/pipeline": "p"}}}


@pytest.fixture
def kube():
    fake = FakeKube()
    fake.add_claim(PVC, RUN_ID)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def cleanup(kube, state, **options):
    lines: list[str] = []
    args = dict(keep_workspace_on_failure=False, delete_workspace=False, push_to="")
    args.update(options)
    result = clean_up_workspace(state, RUN_ID, api=kube.api, log=lines.append, **args)
    return result, "\n".join(lines)


def test_a_failed_runs_volume_is_deleted(kube):
    result, log = cleanup(kube, "FAILED")
    assert result == "deleted" and PVC not in kube.claims
    assert ("DELETE", f"/api/v1/namespaces/{NS}/persistentvolumeclaims/{PVC}") in kube.calls
    assert "the run failed" in log and TOKEN not in log


def test_a_failed_runs_volume_is_kept_when_asked(kube):
    result, log = cleanup(kube, "FAILED", keep_workspace_on_failure=True)
    assert result == "kept" and PVC in kube.claims and kube.calls == []
    assert "keep_workspace_on_failure" in log


@pytest.mark.parametrize(("options", "result"), [
    ({}, "kept"),
    ({"delete_workspace": True}, "kept"),  # no copy elsewhere: the model lives only there
    ({"push_to": "s3://models/x"}, "kept"),  # not asked
    ({"delete_workspace": True, "push_to": "hf://org/model"}, "deleted"),
])
def test_a_successful_runs_volume_is_deleted_only_with_a_copy_elsewhere(kube, options, result):
    assert cleanup(kube, "COMPLETE", **options)[0] == result
    assert (PVC in kube.claims) == (result == "kept")


@pytest.mark.parametrize("state", ["RUNNING", "CANCELED", "", "UNKNOWN"])
def test_any_other_state_keeps_the_volume(kube, state):
    result, log = cleanup(kube, state, delete_workspace=True, push_to="hf://org/model")
    assert result == "kept" and kube.calls == []
    assert "neither COMPLETE nor FAILED" in log


def test_a_volume_that_is_gone_is_reported_not_an_error(kube):
    kube.claims.clear()
    assert cleanup(kube, "FAILED")[0] == "absent"
    assert [m for m, _ in kube.calls] == ["GET"]


def test_a_volume_of_another_run_is_never_deleted(kube):
    kube.add_claim(PVC, "some-other-run")
    with pytest.raises(WorkspaceError, match="was not created by run"):
        cleanup(kube, "FAILED")
    assert PVC in kube.claims and [m for m, _ in kube.calls] == ["GET"]


def test_a_forbidden_delete_says_what_to_grant_and_how_to_delete_by_hand(kube):
    kube.deny = True
    with pytest.raises(ConfigError, match=rf"may not read.*kubectl -n {NS} delete pvc {PVC}"):
        cleanup(kube, "FAILED")


def test_outside_a_pod_there_is_no_api(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="no Kubernetes API here"):
        KubeApi.in_cluster()


def test_the_exit_component_reads_the_final_status(kube, monkeypatch, capsys):
    # The component's own function, with the in-cluster API pointed at the stand-in (there
    # is no pod here to read a service-account token from).
    monkeypatch.setattr(KubeApi, "in_cluster", classmethod(lambda cls: kube.api))
    status = dsl.PipelineTaskFinalStatus(
        state="FAILED", pipeline_job_resource_name="run-x", pipeline_task_name="exit-handler-1",
        error_code=None, error_message=None)
    assert cleanup_workspace.python_func(status=status, run_id=RUN_ID) == "deleted"
    assert f"deleted volume {PVC}" in capsys.readouterr().out


def test_decisions_name_the_reason():
    assert decide_cleanup("failed", keep_workspace_on_failure=False, delete_workspace=False,
                          push_to="")[0] is True
    delete, reason = decide_cleanup("COMPLETE", keep_workspace_on_failure=False,
                                    delete_workspace=True, push_to="")
    assert delete is False and "lives on the volume" in reason


def test_a_failed_run_whose_export_finished_keeps_the_only_copy_of_the_model(kube):
    # The group's final state is written by the last launcher to end
    # (backend/src/v2/metadata: UpdateDAGExecutionsState); a stale FAILED after a successful
    # retry must not delete the volume that holds the only copy of the exported model.
    assert mark_exported(RUN_ID, "/workspace/output/m", api=kube.api, log=lambda _: None)
    assert kube.patches == [("application/merge-patch+json", {"metadata": {"annotations": {
        "kfp-finetune/exported-model": "/workspace/output/m"}}})]
    result, log = cleanup(kube, "FAILED")
    assert result == "kept" and PVC in kube.claims
    assert "export step finished" in log and "/workspace/output/m" in log


def test_a_failed_run_whose_model_was_pushed_elsewhere_is_still_deleted(kube):
    mark_exported(RUN_ID, "/workspace/output/m", api=kube.api, log=lambda _: None)
    result, _ = cleanup(kube, "FAILED", push_to="s3://bucket/m")
    assert result == "deleted" and PVC not in kube.claims


def test_marking_is_skipped_outside_a_pod_and_for_another_runs_volume(kube, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert mark_exported(RUN_ID, "/x") is False  # kfp.local: no API, nothing to mark
    kube.add_claim(PVC, "another-run")
    assert mark_exported(RUN_ID, "/x", api=kube.api, log=lambda _: None) is False
    assert kube.patches == []


def test_a_refused_mark_is_a_warning_not_a_failed_export(kube):
    kube.deny = True
    lines: list[str] = []
    assert mark_exported(RUN_ID, "/x", api=kube.api, log=lines.append) is False
    assert "warning: could not mark" in lines[0] and "get/patch/delete" in lines[0]
