"""The operations settings, asserted in the compiled YAML's platform spec (not just compiled)."""

from __future__ import annotations

import pytest
import yaml

from kfp_finetune.compile import compile_runtime
from kfp_finetune.pipelines.finetune.pipeline import (
    CPU_TASK_CPU_REQUEST,
    CPU_TASK_MEMORY_REQUEST,
    EXPORT_TIMEOUT_S,
    INITIALIZER_TIMEOUT_S,
    S3_SECRET_KEYS,
    ops_defaults,
)
from kfp_finetune.runtimes import RUNTIMES

TASKS = {  # task name in the DAG -> display name
    "createpvc": "create-workspace",
    "dataset-initializer": "dataset-initializer",
    "model-initializer": "model-initializer",
    "fine-tune": "fine-tune",
    "export-model": "export",
}
WORKERS = ("dataset-initializer", "model-initializer", "fine-tune", "export-model")
CHECKED = ("torchtune-llama3.2-1b", "torchtune-llama3.3-70b", "torchtune-llama3.2-tiny")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("ops")
    result = {}
    for name in CHECKED:
        spec, platform = yaml.safe_load_all(compile_runtime(name, out).read_text())
        result[name] = (spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"])
    return result


def _param(spec, name):
    return {"componentInputParameter": name}


def _nested_tasks(spec):
    """Every task of the pipeline, with the conditions that guard it."""
    found = {}

    def walk(component, conditions):
        for name, task in component["dag"]["tasks"].items():
            cond = task.get("triggerPolicy", {}).get("condition")
            here = conditions + ([cond] if cond else [])
            ref = task["componentRef"]["name"]
            sub = spec["components"].get(ref, {})
            if "dag" in sub:
                walk(sub, here)
            else:
                found[name] = (task, here)

    walk(spec["root"], [])
    return found


@pytest.mark.parametrize("runtime", CHECKED)
def test_every_pipeline_parameter_has_a_description(compiled, runtime):
    spec, _ = compiled[runtime]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert len(params) >= 27
    missing = [name for name, p in params.items() if not p.get("description", "").strip()]
    assert missing == []


@pytest.mark.parametrize("runtime", CHECKED)
def test_tasks_have_display_names_and_caching_is_off(compiled, runtime):
    spec, _ = compiled[runtime]
    tasks = _nested_tasks(spec)
    for name, display in {**TASKS, "deletepvc": "delete-workspace"}.items():
        task, _ = tasks[name]
        assert task["taskInfo"]["name"] == display
        assert not task.get("cachingOptions", {}).get("enableCache"), name


@pytest.mark.parametrize("runtime", CHECKED)
def test_a_new_pvc_per_run_mounted_by_every_worker(compiled, runtime):
    spec, executors = compiled[runtime]
    pvc = spec["root"]["dag"]["tasks"]["createpvc"]["inputs"]["parameters"]
    # pvc_name_suffix (not pvc_name): the backend prefixes the run's own unique name.
    assert "pvc_name" not in pvc and pvc["pvc_name_suffix"]["runtimeValue"]["constant"]
    assert pvc["size"] == _param(spec, "pvc_size")
    assert pvc["storage_class_name"] == _param(spec, "pvc_storage_class")
    assert pvc["access_modes"] == _param(spec, "pvc_access_modes")
    for step in WORKERS:
        (mount,) = executors[f"exec-{step}"]["pvcMount"]
        assert mount["mountPath"] == "/workspace"
        assert mount["pvcNameParameter"]["taskOutputParameter"] == {
            "outputParameterKey": "name", "producerTask": "createpvc"}


@pytest.mark.parametrize("runtime", CHECKED)
def test_fine_tune_scheduling_resources_shm_and_timeout(compiled, runtime):
    spec, executors = compiled[runtime]
    ops = ops_defaults(RUNTIMES[runtime])
    params = spec["root"]["inputDefinitions"]["parameters"]
    resources = spec["deploymentSpec"]["executors"]["exec-fine-tune"]["container"]["resources"]
    assert resources["accelerator"] == {
        "resourceType": "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}",
        "resourceCount": "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}",
    }
    assert resources["resourceCpuRequest"] == (
        "{{$.inputs.parameters['pipelinechannel--cpu_request']}}")
    assert resources["resourceMemoryRequest"] == (
        "{{$.inputs.parameters['pipelinechannel--memory_request']}}")
    assert params["accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
    assert params["cpu_request"]["defaultValue"] == ops.cpu_request
    assert params["memory_request"]["defaultValue"] == ops.memory_request

    ft = executors["exec-fine-tune"]
    assert ft["nodeSelector"] == {"nodeSelectorJson": _param(spec, "node_selector")}
    gpu = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # A GPU limit adds no toleration: the GPU runtimes tolerate the GPU taint themselves, and
    # the JSON parameter adds the user's own.
    assert ft["tolerations"] == (gpu if RUNTIMES[runtime].default_gpus else []) + [
        {"tolerationJson": _param(spec, "tolerations")}]
    assert params["node_selector"]["parameterType"] == "STRUCT"
    assert params["tolerations"]["parameterType"] == "LIST"
    assert params["tolerations"]["defaultValue"] == []
    assert params["node_selector"]["defaultValue"] == {}
    assert ft["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm",
                                     "sizeLimit": ops.shm_size, "volumeName": "dshm"}]
    assert int(ft["activeDeadlineSeconds"]) == ops.timeout_s
    for step in ("dataset-initializer", "model-initializer", "export-model"):
        assert "emptyDirMounts" not in executors[f"exec-{step}"]
        assert "tolerations" not in executors[f"exec-{step}"]


@pytest.mark.parametrize("runtime", CHECKED)
def test_cpu_tasks_requests_timeouts_and_retries(compiled, runtime):
    spec, executors = compiled[runtime]
    tasks = spec["root"]["dag"]["tasks"]
    for step, retries, timeout in (("dataset-initializer", 3, INITIALIZER_TIMEOUT_S),
                                   ("model-initializer", 3, INITIALIZER_TIMEOUT_S),
                                   ("export-model", 2, EXPORT_TIMEOUT_S)):
        res = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["resources"]
        assert res["resourceCpuRequest"] == CPU_TASK_CPU_REQUEST
        assert res["resourceMemoryRequest"] == CPU_TASK_MEMORY_REQUEST
        assert "accelerator" not in res
        assert int(executors[f"exec-{step}"]["activeDeadlineSeconds"]) == timeout
        policy = tasks[step]["retryPolicy"]
        assert policy["maxRetryCount"] == retries
        # Retrying stays allowed for longer than one attempt may take.
        assert int(policy["backoffMaxDuration"].rstrip("s")) > timeout
    policy = tasks["fine-tune"]["retryPolicy"]
    assert policy["maxRetryCount"] == 1
    assert int(policy["backoffMaxDuration"].rstrip("s")) > ops_defaults(RUNTIMES[runtime]).timeout_s


@pytest.mark.parametrize("runtime", CHECKED)
def test_secrets_reach_tasks_from_optional_secrets_named_by_parameters(compiled, runtime):
    spec, executors = compiled[runtime]
    for step in ("dataset-initializer", "model-initializer", "export-model"):
        by_env = {}
        for secret in executors[f"exec-{step}"]["secretAsEnv"]:
            assert secret["optional"] is True
            for item in secret["keyToEnv"]:
                by_env[item["envVar"]] = secret["secretNameParameter"]
        assert by_env["HF_TOKEN"] == _param(spec, "hf_token_secret")
        for key in S3_SECRET_KEYS:
            assert by_env[key] == _param(spec, "s3_secret")
    assert "secretAsEnv" not in executors["exec-fine-tune"]


@pytest.mark.parametrize("runtime", CHECKED)
def test_export_gets_the_run_id_and_the_destination(compiled, runtime):
    spec, _ = compiled[runtime]
    inputs = spec["root"]["dag"]["tasks"]["export-model"]["inputs"]["parameters"]
    assert inputs["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    assert inputs["push_to"] == _param(spec, "push_to")
    assert inputs["copy_to_artifact"] == _param(spec, "copy_to_artifact")
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["push_to"]["defaultValue"] == ""
    assert params["copy_to_artifact"]["defaultValue"] is False


@pytest.mark.parametrize("runtime", CHECKED)
def test_pvc_is_deleted_only_when_asked_and_the_model_was_exported_elsewhere(compiled, runtime):
    spec, _ = compiled[runtime]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["delete_workspace"]["defaultValue"] is False
    task, conditions = _nested_tasks(spec)["deletepvc"]
    assert sorted(conditions) == sorted([
        "inputs.parameter_values['pipelinechannel--delete_workspace'] == true",
        "inputs.parameter_values['pipelinechannel--export-model-exported_elsewhere'] == true",
    ])
    # The condition's input is the export task's output (so it also runs after the export).
    cond = spec["root"]["dag"]["tasks"]["condition-1"]
    assert "export-model" in cond["dependentTasks"]
    assert cond["inputs"]["parameters"]["pipelinechannel--export-model-exported_elsewhere"] == {
        "taskOutputParameter": {"outputParameterKey": "exported_elsewhere",
                                "producerTask": "export-model"}}
    assert task["inputs"]["parameters"]["pvc_name"] == {
        "componentInputParameter": "pipelinechannel--createpvc-name"}
    assert spec["components"]["comp-deletepvc"]["executorLabel"] == "exec-deletepvc"


def test_local_pipeline_has_no_cluster_settings():
    import tempfile
    from pathlib import Path

    from kfp import compiler

    from kfp_finetune.pipelines.finetune import build_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "local.yaml"
        compiler.Compiler().compile(build_pipeline("torchtune-llama3.2-tiny", tmp), str(path))
        docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1  # no platform spec
    assert "createpvc" not in docs[0]["root"]["dag"]["tasks"]
