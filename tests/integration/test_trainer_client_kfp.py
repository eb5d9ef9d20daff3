"""TrainerClient's cluster backend with the real kfp and kubernetes clients, against local
stand-ins of the KFP v2beta1 API and the Kubernetes core/v1 API on 127.0.0.1.

A cluster cannot run here, so the two servers play it: the test sets the run's and tasks'
states and the pods' logs as the KFP backend and the kubelet would. The rules encoded: the SDK's
contract (kubeflow/trainer/backends/base.py ``RuntimeBackend``; ``wait_for_job_status`` in
kubeflow/trainer/backends/kubernetes/backend.py: Failed raises, timeout raises TimeoutError),
the step names of kubeflow/trainer/constants/constants.py, and KFP's pod label
``pipeline/runid`` (kubeflow/pipelines backend/src/apiserver/template/v2_template.go).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time

import pytest
from kubeflow.trainer import (
    BuiltinTrainer,
    CustomTrainer,
    DataFormat,
    HuggingFaceDatasetInitializer,
    HuggingFaceModelInitializer,
    Initializer,
    S3DatasetInitializer,
    TorchTuneConfig,
    TorchTuneInstructDataset,
)
from kubeflow.trainer.constants import constants
from kubernetes.client import Configuration
from support.k8s_api_server import FakeK8sApi, Pod
from support.kfp_api_server import LiveKfpApi

from kfp_finetune import ConfigError, KfpBackendConfig, TrainerClient, get_runtime
from kfp_finetune.drivers.client import TrainJobFailed

NS = "team-a"
SENTINEL = "hf_SENTINELtoken0123456789abcdef"
S3_SENTINEL = "S3SENTINELsecretKEY0123456789"
RUNS = r"/apis/v2beta1/runs"


@pytest.fixture
def cluster(monkeypatch):
    for var in ("KFP_TOKEN", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    with LiveKfpApi() as kfp_api, FakeK8sApi() as k8s_api:
        client = TrainerClient(KfpBackendConfig(
            host=kfp_api.url, namespace=NS,
            kubernetes_configuration=Configuration(host=k8s_api.url)))
        yield client, kfp_api, k8s_api


def seed_train(client, **model_kwargs):
    """The seed guide's train() call, word for word but for the token."""
    return client.train(
        runtime=client.get_runtime("torchtune-llama3.2-1b"),
        initializer=Initializer(
            dataset=HuggingFaceDatasetInitializer(storage_uri="hf://tatsu-lab/alpaca/data"),
            model=HuggingFaceModelInitializer(
                storage_uri="hf://meta-llama/Llama-3.2-1B-Instruct", **model_kwargs),
        ),
        trainer=BuiltinTrainer(config=TorchTuneConfig(
            dataset_preprocess_config=TorchTuneInstructDataset(source=DataFormat.PARQUET),
            resources_per_node={"gpu": 1},
        )),
    )


def run_of(kfp_api, name):
    (run,) = [r for r in kfp_api.state.runs.values() if r["display_name"] == name]
    return run


def add_step_pod(k8s_api, run_id, task, lines=(), phase="Running", attempt=None):
    suffix = "" if attempt is None else f"({attempt})"
    return k8s_api.add_pod(Pod(
        name=f"wf-{task}-{attempt or 0}-pod", namespace=NS, run_id=run_id,
        node_name=f"wf-abc.root.{task}.executor{suffix}", phase=phase, lines=list(lines)))


def test_train_returns_at_once_with_a_run_and_a_per_run_secret(cluster):
    client, kfp_api, k8s_api = cluster
    name = seed_train(client, access_token=SENTINEL)
    assert re.fullmatch(r"[a-z][0-9a-f]{11}", name)  # the SDK's job-name form
    run = run_of(kfp_api, name)
    params = run["runtime_config"]["parameters"]
    assert params["secret_hf_token"] == f"{name}-credentials"
    assert "secret_s3" not in params  # the pipeline's default Secret name stays
    assert params["model_uri"] == "hf://meta-llama/Llama-3.2-1B-Instruct"
    assert params["train_gpus_per_node"] == 1 and params["data_format"] == "parquet"
    (post,) = k8s_api.find("POST", rf"/api/v1/namespaces/{NS}/secrets")
    secret = json.loads(post.body)
    assert secret["metadata"]["name"] == f"{name}-credentials"
    assert secret["metadata"]["labels"]["kfp-finetune/job"] == name
    assert secret["stringData"] == {"HF_TOKEN": SENTINEL}
    assert run["state"] == "PENDING" and client.get_job(name).status == constants.TRAINJOB_CREATED


def test_get_and_list_show_the_runs_tasks_as_the_sdks_steps(cluster):
    client, kfp_api, k8s_api = cluster
    name = seed_train(client)
    run_id = run_of(kfp_api, name)["run_id"]
    kfp_api.set_run(run_id, "RUNNING", {
        "root-driver": "SUCCEEDED", "check-config": "SUCCEEDED", "createpvc": "SUCCEEDED",
        "dataset-initializer-driver": "SUCCEEDED", "dataset-initializer": "SUCCEEDED",
        "executor": "SUCCEEDED", "model-initializer": "SUCCEEDED", "fine-tune": "RUNNING",
    })
    add_step_pod(k8s_api, run_id, "dataset-initializer", phase="Succeeded")
    add_step_pod(k8s_api, run_id, "model-initializer", phase="Succeeded")
    add_step_pod(k8s_api, run_id, "fine-tune", attempt=0, phase="Failed")
    retry = add_step_pod(k8s_api, run_id, "fine-tune", attempt=1)
    job = client.get_job(name)
    assert job.status == constants.TRAINJOB_RUNNING and job.name == name
    assert job.runtime.name == "torchtune-llama3.2-1b"
    assert [(s.name, s.status) for s in job.steps] == [
        ("check-config", "Succeeded"), ("create-workspace", "Succeeded"),
        (constants.DATASET_INITIALIZER, "Succeeded"),
        (constants.MODEL_INITIALIZER, "Succeeded"), (f"{constants.NODE}-0", "Running")]
    assert job.steps[-1].pod_name == retry.name  # the latest attempt's pod
    assert [j.name for j in client.list_jobs()] == [name]
    assert client.list_jobs(runtime=client.get_runtime("torchtune-llama3.2-3b")) == []
    assert client.get_job(run_id).name == name  # the KFP run id works too
    retry.events.append({
        "metadata": {"name": "e1"}, "involvedObject": {"kind": "Pod", "name": retry.name},
        "reason": "Scheduled", "message": "Successfully assigned to gpu-node-3",
        "firstTimestamp": "2025-01-01T00:00:05Z"})
    events = client.get_job_events(name)
    assert [(e.involved_object_kind, e.reason) for e in events] == [
        ("Run", "RUNNING"), ("Pod", "Scheduled")]
    assert events[1].involved_object_name == retry.name
    with pytest.raises(ValueError, match="No TrainJob 'nope'"):
        client.get_job("nope")


def test_logs_follow_streams_until_the_step_ends(cluster):
    client, kfp_api, k8s_api = cluster
    name = seed_train(client)
    run_id = run_of(kfp_api, name)["run_id"]
    kfp_api.set_run(run_id, "RUNNING", {"dataset-initializer": "RUNNING"})
    pod = add_step_pod(k8s_api, run_id, "dataset-initializer", ["[dataset] fetching"],
                       phase="Pending")
    # The pod waits for a node: nothing to read yet, and follow waits for it to start.
    assert client.get_job(name).steps[0].status == "Pending"
    assert list(client.get_job_logs(name, step=constants.DATASET_INITIALIZER)) == []
    pod.phase = "Running"
    assert list(client.get_job_logs(name, step=constants.DATASET_INITIALIZER)) == [
        "[dataset] fetching"]

    def the_step_goes_on():
        time.sleep(0.5)
        k8s_api.log(pod.name, "[dataset] 52002 rows", "[dataset] done")
        time.sleep(0.3)
        k8s_api.finish(pod.name)

    threading.Thread(target=the_step_goes_on, daemon=True).start()
    started = time.monotonic()
    lines = list(client.get_job_logs(name, step=constants.DATASET_INITIALIZER, follow=True))
    assert lines == ["[dataset] fetching", "[dataset] 52002 rows", "[dataset] done"]
    assert time.monotonic() - started >= 0.7  # it waited for the step's end, then stopped
    (read,) = k8s_api.find("GET", rf"/api/v1/namespaces/{NS}/pods/{pod.name}/log")[-1:]
    assert read.query["container"] == "main" and read.query["follow"].lower() == "true"
    # A step without a pod yet has no lines (without follow).
    assert list(client.get_job_logs(name)) == []


def test_wait_times_out_while_the_run_goes_on(cluster):
    client, kfp_api, _ = cluster
    name = seed_train(client)
    kfp_api.set_run(run_of(kfp_api, name)["run_id"], "RUNNING", {"fine-tune": "RUNNING"})
    with pytest.raises(TimeoutError, match=f"TrainJob {name}.*Running"):
        client.wait_for_job_status(name, timeout=1, polling_interval=0.2)
    job = client.wait_for_job_status(name, status={constants.TRAINJOB_RUNNING}, timeout=5,
                                     polling_interval=1)
    assert job.status == constants.TRAINJOB_RUNNING
    with pytest.raises(ValueError, match="subset"):
        client.wait_for_job_status(name, status={"Succeeded"})


def test_wait_raises_the_failed_steps_own_error_line(cluster):
    client, kfp_api, k8s_api = cluster
    name = seed_train(client)
    run_id = run_of(kfp_api, name)["run_id"]
    kfp_api.set_run(run_id, "FAILED", {"dataset-initializer": "FAILED"},
                    error="Inner task failed")
    # What a step ending on our error leaves in its pod's log (kfp_finetune.steps.step_errors),
    # then the KFP launcher's own line (backend/src/v2/cmd/launcher-v2/main.go).
    add_step_pod(k8s_api, run_id, "dataset-initializer", phase="Failed", lines=[
        "[dataset] reading 2 files",
        "kfp-finetune: error: DatasetError: column 'output' is missing; columns: a, b",
        "F0101 00:00:00.000000 1 main.go:58] failed to execute component: exit status 2"])
    with pytest.raises(TrainJobFailed) as caught:
        client.wait_for_job_status(name, timeout=5, polling_interval=1)
    assert isinstance(caught.value, RuntimeError)  # what the SDK's users catch
    assert str(caught.value) == (
        f"TrainJob {name} failed in step dataset-initializer: "
        "DatasetError: column 'output' is missing; columns: a, b")
    assert client.wait_for_job_status(
        name, status={constants.TRAINJOB_FAILED}, timeout=5, polling_interval=1).status == "Failed"


def test_delete_terminates_and_deletes_the_run_its_volume_and_its_secret(cluster):
    client, kfp_api, k8s_api = cluster
    name = seed_train(client, access_token=SENTINEL)
    run_id = run_of(kfp_api, name)["run_id"]
    kfp_api.set_run(run_id, "RUNNING", {"fine-tune": "RUNNING"})
    k8s_api.pvcs.add((NS, f"kfp-finetune-{run_id}"))  # cluster_ops.workspace_pvc_name
    other = seed_train(client)
    client.delete_job(name)
    assert kfp_api.find("POST", rf"{RUNS}/{run_id}:terminate")
    assert kfp_api.find("DELETE", rf"{RUNS}/{run_id}")
    assert k8s_api.find("DELETE", rf"/api/v1/namespaces/{NS}/persistentvolumeclaims/"
                                  rf"kfp-finetune-{run_id}")
    assert k8s_api.secrets == {} and k8s_api.pvcs == set()
    assert [j.name for j in client.list_jobs()] == [other]
    with pytest.raises(ValueError, match="No TrainJob"):
        client.get_job(name)


def test_schedule_creates_lists_and_deletes_a_recurring_run(cluster):
    client, kfp_api, k8s_api = cluster
    name = client.train(
        runtime="torchtune-llama3.2-1b",
        initializer=Initializer(dataset=HuggingFaceDatasetInitializer(
            storage_uri="hf://tatsu-lab/alpaca/data", access_token=SENTINEL)),
        schedule="0 3 * * *")
    assert not kfp_api.find("POST", RUNS)
    (rr,) = kfp_api.state.recurring_runs.values()
    assert rr["display_name"] == name and rr["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert rr["runtime_config"]["parameters"]["secret_hf_token"] == f"{name}-credentials"
    (schedule,) = client.list_schedules()
    assert (schedule.name, schedule.cron, schedule.runtime) == (
        name, "0 0 3 * * *", "torchtune-llama3.2-1b")
    client.delete_schedule(name)
    assert kfp_api.state.recurring_runs == {} and k8s_api.secrets == {}
    assert client.list_schedules() == []


def test_s3_initializers_put_keys_endpoint_and_region_in_the_secret(cluster):
    client, kfp_api, k8s_api = cluster
    name = client.train(
        runtime=get_runtime("torchtune-llama3.2-1b"),  # kfp_finetune.get_runtime: the SDK Runtime
        initializer=Initializer(dataset=S3DatasetInitializer(
            storage_uri="s3://data/alpaca", endpoint="http://minio.minio:9000",
            access_key_id="minio", secret_access_key=S3_SENTINEL, region="eu-west-1")))
    params = run_of(kfp_api, name)["runtime_config"]["parameters"]
    assert params["secret_s3"] == f"{name}-credentials" and "secret_hf_token" not in params
    assert params["data_uri"] == "s3://data/alpaca"
    (secret,) = k8s_api.secrets.values()
    assert secret["stringData"] == {
        "AWS_ACCESS_KEY_ID": "minio", "AWS_SECRET_ACCESS_KEY": S3_SENTINEL,
        "AWS_ENDPOINT_URL": "http://minio.minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"runtime": "torchtune-llama9"}, "runtime='torchtune-llama9' is unknown"),
    ({"trainer": CustomTrainer(func=print)}, "CustomTrainer(...) is not supported"),
    ({"trainer": BuiltinTrainer(config=TorchTuneConfig(batch_size=0))}, "batch_size=0"),
    ({"schedule": "every day"}, "is not a cron expression"),
    ({"initializer": Initializer(model=HuggingFaceModelInitializer(storage_uri="hf://a/b"))},
     "initializer.dataset is missing"),
])
def test_bad_input_is_refused_before_anything_is_created(cluster, kwargs, message):
    client, kfp_api, k8s_api = cluster
    call = {"runtime": "torchtune-llama3.2-1b", "initializer": Initializer(
        dataset=HuggingFaceDatasetInitializer(storage_uri="hf://a/b", access_token=SENTINEL)),
        **kwargs}
    with pytest.raises(ConfigError) as caught:
        client.train(**call)
    assert message in str(caught.value) and SENTINEL not in str(caught.value)
    assert k8s_api.calls == [] and not kfp_api.find("POST", r".*")


def test_a_token_given_in_python_reaches_only_the_secret(cluster, caplog, capsys):
    """The token is in the Secret's body and nowhere else: no KFP request (parameters, the
    uploaded YAML), no other Kubernetes request, no log record, no printed line."""
    client, kfp_api, k8s_api = cluster
    caplog.set_level(logging.DEBUG)
    name = seed_train(client, access_token=SENTINEL)
    run_id = run_of(kfp_api, name)["run_id"]
    kfp_api.set_run(run_id, "FAILED", {"fine-tune": "FAILED"})
    add_step_pod(k8s_api, run_id, "fine-tune", phase="Failed", lines=["TrainingError: x"])
    with pytest.raises(TrainJobFailed):
        client.wait_for_job_status(name, timeout=5, polling_interval=1)
    list(client.get_job_logs(name))
    client.get_job_events(name)
    client.delete_job(name)
    secret_posts = k8s_api.find("POST", rf"/api/v1/namespaces/{NS}/secrets")
    assert len(secret_posts) == 1 and SENTINEL in secret_posts[0].body.decode()
    assert any(c.files.get("uploadfile") for c in kfp_api.calls)  # the YAML was uploaded
    b64 = base64.b64encode(SENTINEL.encode()).decode()
    for call in kfp_api.calls:
        text = json.dumps(call.json) + "".join(
            f.decode(errors="replace") for f in call.files.values()) + json.dumps(call.query)
        assert SENTINEL not in text and b64 not in text
    for call in k8s_api.calls:
        if call not in secret_posts:
            assert SENTINEL.encode() not in call.body and SENTINEL not in json.dumps(call.query)
    out = capsys.readouterr()
    assert SENTINEL not in caplog.text + out.out + out.err


def test_a_mistyped_pipeline_option_is_refused_with_the_allowed_keys(cluster):
    _, kfp_api, k8s_api = cluster
    client = TrainerClient(KfpBackendConfig(host=kfp_api.url, namespace=NS,
                                            pipeline_options={"pvc_sise": "100Gi"}))
    with pytest.raises(ConfigError, match="pvc_sise.*pvc_size"):
        seed_train(client)
    assert k8s_api.calls == [] and not kfp_api.find("POST", r".*")


def test_an_unreachable_kfp_api_is_one_clear_error(monkeypatch):
    import socket

    monkeypatch.delenv("KFP_TOKEN", raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the call: nothing listens
    with pytest.raises(ConfigError, match="cannot reach the KFP API"):
        TrainerClient(KfpBackendConfig(host=f"http://127.0.0.1:{port}"))


def test_the_kfp_token_comes_from_a_file_as_a_bearer_header_only(cluster, tmp_path):
    _, kfp_api, k8s_api = cluster
    token_file = tmp_path / "token"
    token_file.write_text("kfp-bearer-0123456789\n")
    config = KfpBackendConfig(host=kfp_api.url, namespace=NS, token_file=str(token_file),
                              kubernetes_configuration=Configuration(host=k8s_api.url))
    assert "kfp-bearer" not in repr(config)
    before = len(kfp_api.calls)  # the fixture's own client (no token) called already
    name = seed_train(TrainerClient(config))
    calls = kfp_api.calls[before:]
    assert calls and all(
        c.headers.get("authorization") == "Bearer kfp-bearer-0123456789" for c in calls)
    assert "kfp-bearer" not in json.dumps(run_of(kfp_api, name))


def test_without_the_kubernetes_api_jobs_still_show_their_steps(cluster):
    import socket

    _, kfp_api, _ = cluster
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there
    client = TrainerClient(KfpBackendConfig(
        host=kfp_api.url, namespace=NS,
        kubernetes_configuration=Configuration(host=f"http://127.0.0.1:{port}")))
    name = seed_train(client)  # no credentials: no Secret, no Kubernetes call needed
    kfp_api.set_run(run_of(kfp_api, name)["run_id"], "RUNNING", {"fine-tune": "RUNNING"})
    with pytest.warns(UserWarning, match="without their pods.*cannot reach the Kubernetes API"):
        job = client.get_job(name)
    assert [(s.name, s.status, s.pod_name) for s in job.steps] == [
        (f"{constants.NODE}-0", "Running", "")]
    with pytest.raises(ConfigError, match="cannot reach the Kubernetes API"):
        seed_train(client, access_token=SENTINEL)
    assert len(kfp_api.find("POST", RUNS)) == 1  # the run with a token was never started
