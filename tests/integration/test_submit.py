"""`kfp-finetune submit` with the real kfp.Client against a recording KFP API on 127.0.0.1."""

from __future__ import annotations

import json
import socket

import pytest
import yaml
from support.kfp_api_server import FakeKfpApi

from kfp_finetune.drivers.cli import main
from kfp_finetune.drivers.submit import normalize_cron

RUNTIME = "torchtune-llama3.2-1b"
PIPELINE = "kfp-finetune-torchtune-llama3-2-1b"


@pytest.fixture
def api(monkeypatch):
    for var in ("KFP_TOKEN", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    with FakeKfpApi() as server:
        yield server


def submit_args(api, *extra):
    return ["submit", "--host", api.url, "--runtime", RUNTIME,
            "--dataset-uri", "hf://tatsu-lab/alpaca/data", *extra]


def test_submit_uploads_the_pipeline_and_starts_a_run(api, monkeypatch, capsys):
    monkeypatch.setenv("KFP_TOKEN", "secret-token-123")
    tolerations = '[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]'
    rc = main(submit_args(
        api, "--epochs", "2", "--export-name", "my-model", "--push-to", "s3://models/llama",
        "--delete-workspace", "--pvc-size", "100Gi", "--pvc-access-mode", "ReadWriteMany",
        "--node-selector", '{"pool": "a100"}', "--tolerations", tolerations,
        "--cpu-request", "8", "--memory-request", "64Gi", "--run-name", "nightly"))
    assert rc == 0, capsys.readouterr().err
    (upload,) = api.find("POST", r"/apis/v2beta1/pipelines/upload")
    assert upload.query["name"] == PIPELINE
    spec = next(yaml.safe_load_all(upload.files["uploadfile"]))
    assert spec["pipelineInfo"]["name"] == PIPELINE
    (exp,) = api.find("POST", r"/apis/v2beta1/experiments")
    assert exp.json["display_name"] == "kfp-finetune"
    (run,) = api.find("POST", r"/apis/v2beta1/runs")
    body = run.json
    assert body["display_name"] == "nightly"
    assert body["experiment_id"] == next(iter(api.state.experiments))
    (version,) = api.state.versions[body["pipeline_version_reference"]["pipeline_id"]]
    assert body["pipeline_version_reference"]["pipeline_version_id"] == (
        version["pipeline_version_id"])
    params = body["runtime_config"]["parameters"]
    assert params["train_epochs"] == 2 and params["export_name"] == "my-model"
    assert params["export_push_to"] == "s3://models/llama"
    assert params["workspace_delete_on_success"] is True
    assert params["workspace_pvc_size"] == "100Gi"
    assert params["workspace_access_modes"] == ["ReadWriteMany"]
    assert params["cluster_node_selector"] == {"pool": "a100"}
    assert params["cluster_tolerations"] == json.loads(tolerations)
    assert params["cluster_cpu_request"] == "8" and params["cluster_memory_request"] == "64Gi"
    assert set(params) <= set(spec["root"]["inputDefinitions"]["parameters"])
    # Authentication: the token travels as a bearer header on every call, never as data.
    assert all(c.headers.get("authorization") == "Bearer secret-token-123" for c in api.calls)
    assert "secret-token-123" not in json.dumps(body)
    (run_id,) = api.state.runs
    assert f"run: {run_id}" in capsys.readouterr().out


def test_resubmits_reuse_the_pipeline_and_upload_a_version_only_when_the_yaml_changed(api):
    assert main(submit_args(api)) == 0
    (pid,) = api.state.pipelines
    # The first version is named after the pipeline (KFP's choice); later ones after the
    # YAML's digest, so the next submit adds that version once and the one after reuses it.
    assert main(submit_args(api)) == 0
    assert main(submit_args(api)) == 0
    assert len(api.find("POST", r"/apis/v2beta1/pipelines/upload")) == 1
    (version,) = api.find("POST", r"/apis/v2beta1/pipelines/upload_version")
    assert version.query["pipelineid"] == pid
    assert version.query["name"].startswith(PIPELINE + "-")
    runs = [c.json for c in api.find("POST", r"/apis/v2beta1/runs")]
    assert len(runs) == 3 and len(api.state.experiments) == 1  # found by name, not recreated
    newest = api.state.versions[pid][0]["pipeline_version_id"]
    assert [r["pipeline_version_reference"]["pipeline_version_id"] for r in runs[1:]] == [
        newest, newest]

    api.state.versions[pid][0]["display_name"] = "an-older-yaml"  # the YAML changed since
    assert main(submit_args(api)) == 0
    assert len(api.find("POST", r"/apis/v2beta1/pipelines/upload_version")) == 2


def test_schedule_creates_a_recurring_run_with_the_cron_expression(api, capsys):
    assert main(submit_args(api, "--schedule", "0 3 * * *", "--max-concurrency", "1")) == 0
    assert not api.find("POST", r"/apis/v2beta1/runs")
    (rr,) = api.find("POST", r"/apis/v2beta1/recurringruns")
    body = rr.json
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"  # KFP's 6 fields
    assert body["mode"] == "ENABLE" and body["no_catchup"] is True
    assert int(body["max_concurrency"]) == 1
    assert body["pipeline_version_reference"]["pipeline_id"] in api.state.pipelines
    assert body["runtime_config"]["parameters"]["data_uri"] == "hf://tatsu-lab/alpaca/data"
    assert "recurring run:" in capsys.readouterr().out


@pytest.mark.parametrize(("states", "rc"), [(["RUNNING", "SUCCEEDED"], 0), (["FAILED"], 1)])
def test_wait_follows_the_run_to_its_end(api, capsys, states, rc):
    api.state.run_states = list(states)
    assert main(submit_args(api, "--wait", "--poll-interval", "0.01")) == rc
    out = capsys.readouterr().out
    assert states[-1] in out
    assert len(api.find("GET", r"/apis/v2beta1/runs/[^/]+")) == len(states)


@pytest.mark.parametrize(("extra", "message"), [
    (["--delete-workspace"], "only copy of the model"),
    (["--schedule", "every day"], "is not a cron expression"),
    (["--tolerations", '{"key": "x"}'], "is not a JSON list"),
    (["--node-selector", '{"pool": 1}'], "must be a string"),
    (["--memory-request", "64 GB"], "is not a Kubernetes quantity"),
    (["--push-to", "gs://bucket"], "unsupported destination"),
    (["--wait", "--schedule", "@daily"], "Drop one"),
    (["--epochs", "0"], "epochs"),
    (["--hf-token-secret", ""], "--hf-token-secret is empty"),
    (["--s3-secret", "S3_Keys"], "is not a valid Kubernetes Secret name"),
    (["--pvc-size", "100GB"], "is not a Kubernetes quantity"),
    (["--pvc-size", "20m"], "less than 1Mi"),
    (["--pvc-storage-class", ""], "--pvc-storage-class is empty"),
    (["--accelerator-type", "gpu"], "is not a Kubernetes resource name"),
    (["--schedule", "0 25 * * *"], "hour '25' is outside 0-23"),
    (["--schedule", "0 3 * * 7"], "day of week '7' is outside 0-6"),
    (["--schedule", "*/0 * * * *"], "step '0' must be"),
    (["--schedule", "0 3 31-1 * *"], "runs backwards"),
    (["--schedule", "@every 12x"], "is not a cron expression"),
])
def test_bad_options_are_refused_before_any_api_call(api, capsys, extra, message):
    assert main(submit_args(api, *extra)) == 2
    assert message in capsys.readouterr().err
    assert api.calls == []


def test_an_unreachable_host_is_reported_with_what_to_check(capsys, monkeypatch):
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the call: nothing listens
    rc = main(["submit", "--host", f"http://127.0.0.1:{port}", "--runtime", RUNTIME,
               "--dataset-uri", "hf://tatsu-lab/alpaca/data"])
    assert rc == 2
    assert "cannot reach the KFP API" in capsys.readouterr().err


def test_cron_forms():
    # The backend's scheduler parses with robfig/cron v1 cron.Parse (six fields, seconds
    # first; weekday 0-6 or SUN-SAT; descriptors): backend/src/crd/controller/
    # scheduledworkflow/util/cron_schedule.go.
    assert normalize_cron("*/15 * * * *") == "0 */15 * * * *"
    assert normalize_cron("0 0 3 * * 1-5") == "0 0 3 * * 1-5"
    assert normalize_cron("0 30 2 1,15 JAN-jun ?") == "0 30 2 1,15 JAN-jun ?"
    assert normalize_cron("0 0 * * MON-FRI") == "0 0 0 * * MON-FRI"
    assert normalize_cron("@every 12h") == "@every 12h"
    assert normalize_cron("@every 1h30m") == "@every 1h30m"


def test_submit_asks_the_backend_its_release_first(api, capsys):
    assert main(submit_args(api, "--keep-workspace-on-failure")) == 0
    paths = [c.path for c in api.calls]
    assert paths.index("/apis/v2beta1/healthz") < paths.index("/apis/v2beta1/pipelines/upload")
    (run,) = api.find("POST", r"/apis/v2beta1/runs")
    assert run.json["runtime_config"]["parameters"]["workspace_keep_on_failure"] is True


def test_submit_refuses_a_backend_older_than_the_floor(api, capsys):
    api.state.tag_name = "2.14.0"
    assert main(submit_args(api)) == 2
    err = capsys.readouterr().err
    assert "KFP backend is 2.14.0, older than 2.15.0" in err
    assert "optional Secret as environment variables (from 2.15.0)" in err
    # Nothing but healthz (kfp.Client asks it too, on creation): nothing uploaded, no run.
    assert {c.path for c in api.calls} == {"/apis/v2beta1/healthz"}


def test_submit_warns_when_the_backend_does_not_tell_its_release(api, capsys):
    api.state.tag_name = "unknown"  # TAG_NAME unset on the API server
    assert main(submit_args(api)) == 0
    assert "does not tell its release" in capsys.readouterr().out
    assert api.find("POST", r"/apis/v2beta1/runs")
