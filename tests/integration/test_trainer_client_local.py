"""The seed guide's example with ``from kfp_finetune import TrainerClient, LocalBackendConfig``:
one real local run (kfp.local, tiny fixtures) shared by the assertions, and a fast failing run.

The contract is the Kubeflow SDK's (kubeflow/trainer/backends/base.py ``RuntimeBackend``):
``train`` returns a job name at once, ``wait_for_job_status`` returns the ``TrainJob`` once it is
``Complete`` (kubeflow/trainer/constants/constants.py ``TRAINJOB_COMPLETE``) and raises when it
failed, ``get_job_logs(name, step=...)`` yields one step's lines, ``node-0`` by default.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from kubeflow.trainer import *  # noqa: F403 - the seed guide's own import
from kubeflow.trainer.constants import constants

from kfp_finetune import LocalBackendConfig, TrainerClient  # the one changed import
from kfp_finetune.drivers.client import TrainJobFailed

SENTINEL = "hf_LOCALsentinel0123456789abcdef"


def initializer(tiny, token=None):
    return Initializer(  # noqa: F405
        dataset=HuggingFaceDatasetInitializer(  # noqa: F405
            storage_uri=(tiny["alpaca"] / "data").as_uri()),
        model=HuggingFaceModelInitializer(  # noqa: F405
            storage_uri=tiny["llama3_2"].as_uri(), access_token=token),
    )


@pytest.fixture(scope="module")
def seed_job(tiny, tmp_path_factory):
    """One real run of the seed example; what each step of it returned, for the tests below."""
    workspace = tmp_path_factory.mktemp("client-ws")
    client = TrainerClient(backend_config=LocalBackendConfig(workspace=workspace))
    started = time.monotonic()
    job_name = client.train(
        runtime=client.get_runtime("torchtune-llama3.2-tiny"),
        initializer=initializer(tiny, SENTINEL),
        trainer=BuiltinTrainer(config=TorchTuneConfig(  # noqa: F405
            epochs=1, batch_size=8,
            dataset_preprocess_config=TorchTuneInstructDataset(  # noqa: F405
                source=DataFormat.PARQUET),  # noqa: F405
        )),
    )
    returned_after = time.monotonic() - started
    status_at_return = client.get_job(job_name).status
    followed = list(client.get_job_logs(job_name, step=constants.DATASET_INITIALIZER,
                                        follow=True))
    job = client.wait_for_job_status(job_name, timeout=900, polling_interval=1)
    return {"client": client, "name": job_name, "workspace": workspace, "job": job,
            "returned_after": returned_after, "status_at_return": status_at_return,
            "followed": followed}


@pytest.mark.slow
def test_train_returns_a_name_at_once(seed_job):
    assert re.fullmatch(r"[a-z][0-9a-f]{11}", seed_job["name"])
    assert seed_job["status_at_return"] in (constants.TRAINJOB_CREATED,
                                            constants.TRAINJOB_RUNNING)
    assert seed_job["returned_after"] < 30  # validation and a process start, not the run


@pytest.mark.slow
def test_wait_returns_the_complete_job_with_its_steps(seed_job):
    job = seed_job["job"]
    assert job.status == constants.TRAINJOB_COMPLETE and job.name == seed_job["name"]
    assert job.runtime.name == "torchtune-llama3.2-tiny"
    assert [(s.name, s.status) for s in job.steps] == [
        (constants.DATASET_INITIALIZER, "Succeeded"), (constants.MODEL_INITIALIZER, "Succeeded"),
        ("tokenize-dataset", "Succeeded"), (f"{constants.NODE}-0", "Succeeded"),
        ("export", "Succeeded")]
    client = seed_job["client"]
    assert [j.name for j in client.list_jobs()] == [seed_job["name"]]
    assert client.list_jobs(runtime="torchtune-qwen2.5-tiny") == []
    reasons = [(e.involved_object_name, e.reason) for e in client.get_job_events(job.name)]
    # check-config first (it hands every other task the one config); then kfp.local runs the
    # two initializers one after the other, in either order.
    assert reasons[:2] == [("check-config", "Started"), ("check-config", "Succeeded")]
    assert reasons[2] in ((constants.DATASET_INITIALIZER, "Started"),
                          (constants.MODEL_INITIALIZER, "Started"))
    assert reasons[-1] == ("export", "Succeeded") and len(reasons) == 12


@pytest.mark.slow
def test_dataset_initializer_logs_are_that_steps_lines(seed_job):
    lines = list(seed_job["client"].get_job_logs(seed_job["name"],
                                                 step=constants.DATASET_INITIALIZER))
    assert any(line.startswith("[dataset] 64 rows") for line in lines)
    assert not any(line.startswith(("[model]", "[export]")) for line in lines)
    assert seed_job["followed"] == lines  # follow=True streamed the same lines, then stopped


@pytest.mark.slow
def test_default_logs_are_the_training_steps_with_the_loss(seed_job):
    lines = list(seed_job["client"].get_job_logs(seed_job["name"]))
    losses = [float(m[1]) for line in lines if (m := re.search(r"Loss: ([0-9.]+)", line))]
    assert losses and all(0 < loss < 20 for loss in losses)
    assert not any(line.startswith("[dataset]") for line in lines)


@pytest.mark.slow
def test_the_token_is_in_no_file_of_the_workspace(seed_job):
    hits = [p for p in Path(seed_job["workspace"]).rglob("*")
            if p.is_file() and p.stat().st_size < 50_000_000
            and SENTINEL.encode() in p.read_bytes()]
    assert hits == []


@pytest.mark.slow
def test_delete_forgets_the_job_and_keeps_the_model(seed_job):
    client, name = seed_job["client"], seed_job["name"]
    client.delete_job(name)
    assert client.list_jobs() == []
    with pytest.raises(ValueError, match=f"No TrainJob with name '{name}'"):
        client.get_job(name)
    assert list((Path(seed_job["workspace"]) / "output").glob("*-finetuned-*"))


def test_a_failed_step_surfaces_as_its_own_error_line(tiny, tmp_path):
    client = TrainerClient(LocalBackendConfig(workspace=tmp_path / "ws"))
    job_name = client.train(
        runtime="torchtune-llama3.2-tiny",
        initializer=initializer(tiny),
        trainer=BuiltinTrainer(config=TorchTuneConfig(  # noqa: F405
            dataset_preprocess_config=TorchTuneInstructDataset(  # noqa: F405
                column_map={"output": "answer"}))),
    )
    with pytest.raises(TrainJobFailed) as caught:
        client.wait_for_job_status(job_name, timeout=300, polling_interval=1)
    message = str(caught.value)
    assert message.startswith(f"TrainJob {job_name} failed in step dataset-initializer: ")
    assert "DatasetError: " in message and "answer" in message
    assert "Inner task failed" not in message and "finished with status" not in message
    job = client.get_job(job_name)
    assert job.status == constants.TRAINJOB_FAILED
    # kfp.local runs the initializers in either order: the model one may have run first.
    statuses = {s.name: s.status for s in job.steps}
    assert statuses.pop(constants.MODEL_INITIALIZER) in ("Succeeded", "Skipped")
    assert statuses == {constants.DATASET_INITIALIZER: "Failed", "tokenize-dataset": "Skipped",
                        f"{constants.NODE}-0": "Skipped", "export": "Skipped"}


def test_local_refuses_what_needs_a_cluster_and_unknown_jobs(tmp_path, tiny):
    client = TrainerClient(LocalBackendConfig(workspace=tmp_path))
    with pytest.raises(NotImplementedError, match="KfpBackendConfig"):
        client.train(runtime="torchtune-llama3.2-tiny", initializer=initializer(tiny),
                     schedule="@daily")
    with pytest.raises(ValueError, match="No TrainJob"):
        client.get_job("a0123456789a")
    assert [r.name for r in client.list_runtimes()][:1] == ["torchtune-llama3.2-1b"]
    assert client.get_runtime_packages(client.get_runtime("torchtune-llama3.2-1b"))
