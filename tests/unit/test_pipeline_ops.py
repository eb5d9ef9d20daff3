"""The operations settings, asserted in the compiled YAML's platform spec (not just compiled)."""

from __future__ import annotations

import pytest
import yaml

from kfp_finetune.config.runtimes import RUNTIMES
from kfp_finetune.drivers.compile import compile_runtime
from kfp_finetune.pipelines.finetune.cluster import (
    CHECK_TIMEOUT_S,
    CPU_TASK_CPU_REQUEST,
    CPU_TASK_MEMORY_REQUEST,
    EXPORT_TIMEOUT_S,
    INITIALIZER_TIMEOUT_S,
    TOKENIZE_CPU_REQUEST,
    ops_defaults,
)
from kfp_finetune.storage.credentials import S3_SECRET_KEYS

TASKS = {  # task name in the DAG -> display name
    "check-config": "check-config",
    "cleanup-workspace": "cleanup-workspace",
    "createpvc": "create-workspace",
    "dataset-initializer": "dataset-initializer",
    "model-initializer": "model-initializer",
    "tokenize-dataset": "tokenize-dataset",
    "fine-tune": "fine-tune",
    "export-model": "export",
}
WORKERS = ("dataset-initializer", "model-initializer", "tokenize-dataset", "fine-tune",
           "export-model")
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


def _group_param(name):
    """A pipeline parameter as seen inside the exit handler's group (a sub-DAG)."""
    return {"componentInputParameter": f"pipelinechannel--{name}"}


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
    for name, display in TASKS.items():
        task, _ = tasks[name]
        assert task["taskInfo"]["name"] == display
        assert not task.get("cachingOptions", {}).get("enableCache"), name


@pytest.mark.parametrize("runtime", CHECKED)
def test_a_new_pvc_per_run_mounted_by_every_worker(compiled, runtime):
    spec, executors = compiled[runtime]
    pvc = spec["root"]["dag"]["tasks"]["createpvc"]["inputs"]["parameters"]
    # Named by check-config from the run id (kfp-finetune-<run id>), not a suffix: with a
    # suffix the backend's createPVC (backend/src/v2/driver/k8s.go) prepends a random UUID,
    # and the exit task could not know the name.
    assert "pvc_name_suffix" not in pvc
    for key, output in (("pvc_name", "pvc_name"), ("annotations", "pvc_annotations")):
        assert pvc[key] == {"taskOutputParameter": {"outputParameterKey": output,
                                                    "producerTask": "check-config"}}
    assert pvc["size"] == _param(spec, "pvc_size")
    assert pvc["storage_class_name"] == _param(spec, "pvc_storage_class")
    assert pvc["access_modes"] == _param(spec, "pvc_access_modes")
    for step in WORKERS:
        (mount,) = executors[f"exec-{step}"]["pvcMount"]
        assert mount["mountPath"] == "/workspace"
        assert mount["pvcNameParameter"] == {
            "componentInputParameter": "pipelinechannel--createpvc-name"}
    group = spec["root"]["dag"]["tasks"]["exit-handler-1"]["inputs"]["parameters"]
    assert group["pipelinechannel--createpvc-name"]["taskOutputParameter"] == {
        "outputParameterKey": "name", "producerTask": "createpvc"}


@pytest.mark.parametrize("runtime", CHECKED)
def test_check_config_runs_first_on_every_operations_parameter(compiled, runtime):
    spec, executors = compiled[runtime]
    tasks = spec["root"]["dag"]["tasks"]
    check = tasks["check-config"]
    assert "dependentTasks" not in check
    assert tasks["createpvc"]["dependentTasks"] == ["check-config"]
    assert set(tasks["exit-handler-1"]["dependentTasks"]) == {"check-config", "createpvc"}
    inputs = check["inputs"]["parameters"]
    for name in ("gpus_per_node", "accelerator_type", "cpu_request", "memory_request",
                 "pvc_size", "pvc_storage_class", "pvc_access_modes", "hf_token_secret",
                 "s3_secret", "delete_workspace", "push_to"):
        assert inputs[name] == _param(spec, name), name
    assert inputs["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    assert inputs["run_name"] == {"runtimeValue": {"constant": "{{$.pipeline_job_name}}"}}
    assert int(executors["exec-check-config"]["activeDeadlineSeconds"]) == CHECK_TIMEOUT_S
    image = spec["deploymentSpec"]["executors"]["exec-check-config"]["container"]["image"]
    assert image == spec["deploymentSpec"]["executors"]["exec-export-model"]["container"]["image"]


@pytest.mark.parametrize("runtime", CHECKED)
def test_fine_tune_scheduling_resources_shm_and_timeout(compiled, runtime):
    spec, executors = compiled[runtime]
    ops = ops_defaults(RUNTIMES[runtime])
    params = spec["root"]["inputDefinitions"]["parameters"]
    resources = spec["deploymentSpec"]["executors"]["exec-fine-tune"]["container"]["resources"]
    # Every resource field from a STRING output of check-config (see test_backend_conformance).
    def out(key):
        return "{{$.inputs.parameters['pipelinechannel--check-config-" + key + "']}}"

    assert resources == {
        "accelerator": {"resourceType": out("accelerator_type"),
                        "resourceCount": out("accelerator_limit")},
        "resourceCpuRequest": out("cpu_request"),
        "resourceMemoryRequest": out("memory_request"),
    }
    assert params["accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
    assert params["cpu_request"]["defaultValue"] == ops.cpu_request
    assert params["memory_request"]["defaultValue"] == ops.memory_request

    ft = executors["exec-fine-tune"]
    assert ft["nodeSelector"] == {"nodeSelectorJson": _group_param("node_selector")}
    gpu = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # A GPU limit adds no toleration: the GPU runtimes tolerate the GPU taint themselves, and
    # the JSON parameter adds the user's own.
    assert ft["tolerations"] == (gpu if RUNTIMES[runtime].default_gpus else []) + [
        {"tolerationJson": _group_param("tolerations")}]
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
    tasks = {name: task for name, (task, _) in _nested_tasks(spec).items()}
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
    # tokenize-dataset runs one process per CPU: it asks for more than the other CPU tasks.
    res = spec["deploymentSpec"]["executors"]["exec-tokenize-dataset"]["container"]["resources"]
    assert res["resourceCpuRequest"] == TOKENIZE_CPU_REQUEST and "accelerator" not in res
    assert tasks["tokenize-dataset"]["retryPolicy"]["maxRetryCount"] == 3
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
        assert by_env["HF_TOKEN"] == _group_param("hf_token_secret")
        for key in S3_SECRET_KEYS:
            assert by_env[key] == _group_param("s3_secret")
    assert "secretAsEnv" not in executors["exec-fine-tune"]


@pytest.mark.parametrize("runtime", CHECKED)
def test_export_gets_the_run_id_and_the_destination(compiled, runtime):
    spec, _ = compiled[runtime]
    (task, _) = _nested_tasks(spec)["export-model"]
    inputs = task["inputs"]["parameters"]
    assert inputs["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    assert inputs["push_to"] == {"componentInputParameter": "pipelinechannel--push_to"}
    assert inputs["copy_to_artifact"] == {
        "componentInputParameter": "pipelinechannel--copy_to_artifact"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["push_to"]["defaultValue"] == ""
    assert params["copy_to_artifact"]["defaultValue"] is False


@pytest.mark.parametrize("runtime", CHECKED)
def test_an_exit_task_cleans_up_the_volume_whatever_the_outcome(compiled, runtime):
    spec, _ = compiled[runtime]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["delete_workspace"]["defaultValue"] is False
    assert params["keep_workspace_on_failure"]["defaultValue"] is False
    root = spec["root"]["dag"]["tasks"]
    cleanup = root["cleanup-workspace"]
    # The backend's Argo compiler turns an ALL_UPSTREAM_TASKS_COMPLETED task into an exit
    # lifecycle hook of its dependency (backend/src/v2/compiler/argocompiler/dag.go: DAG).
    assert cleanup["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
    assert cleanup["dependentTasks"] == ["exit-handler-1"]
    inputs = cleanup["inputs"]["parameters"]
    # It takes nothing from another task: the volume's name comes from the run id.
    assert inputs == {
        "status": {"taskFinalStatus": {"producerTask": "exit-handler-1"}},
        "run_id": {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}},
        "keep_workspace_on_failure": _param(spec, "keep_workspace_on_failure"),
        "delete_workspace": _param(spec, "delete_workspace"),
        "push_to": _param(spec, "push_to"),
    }
    # The group holds container tasks only: the backend records a group's final state from
    # its tasks' launchers (backend/src/v2/metadata/client.go: UpdateDAGExecutionsState); a
    # driver-only task (DeletePVC) or a condition there would leave it stale.
    group = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(group) == {"dataset-initializer", "model-initializer", "tokenize-dataset",
                          "fine-tune", "export-model"}
    execs = spec["deploymentSpec"]["executors"]
    assert all("container" in execs[f"exec-{name}"] for name in group)
    assert not [c for c in spec["components"] if "deletepvc" in c]


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


# ----------------------------------------------------------------------------- check-config

CHECK_ARGS = dict(
    gpus_per_node=2, accelerator_type="nvidia.com/gpu", cpu_request="8", memory_request="64Gi",
    pvc_size="100Gi", pvc_storage_class="standard", pvc_access_modes=["ReadWriteOnce"],
    hf_token_secret="hf-token", s3_secret="s3-credentials", delete_workspace=False, push_to="",
    run_id="0b6f1a52-4c1e-4a7e-9d43-2f7a3c0e8b11", run_name="nightly run",
    pipeline="kfp-finetune-torchtune-llama3-2-1b",
)


def test_check_config_hands_on_strings_for_a_gpu_run():
    from kfp_finetune.components.check_config import check_config

    out = check_config.python_func(**CHECK_ARGS)
    assert out[:4] == ("nvidia.com/gpu", "2", "8", "64Gi")
    assert out[4] == "kfp-finetune-0b6f1a52-4c1e-4a7e-9d43-2f7a3c0e8b11"
    assert out[5] == {"kfp-finetune/pipeline": "kfp-finetune-torchtune-llama3-2-1b",
                      "kfp-finetune/run-id": CHECK_ARGS["run_id"],
                      "kfp-finetune/run-name": "nightly run"}


def test_check_config_gives_a_cpu_run_no_accelerator_limit():
    from kfp_finetune.components.check_config import check_config

    # Empty type and count: initPodSpecPatch (backend/src/v2/driver/driver.go) then adds no
    # accelerator limit at all (it needs both non-empty).
    out = check_config.python_func(**{**CHECK_ARGS, "gpus_per_node": 0, "accelerator_type": ""})
    assert out[:2] == ("", "")


@pytest.mark.parametrize(("change", "message"), [
    ({"gpus_per_node": 9}, "gpus_per_node=9 must be a whole number from 0"),
    ({"gpus_per_node": True}, "gpus_per_node=True"),
    ({"accelerator_type": "gpu"}, "accelerator_type='gpu' is not a Kubernetes resource name"),
    ({"accelerator_type": ""}, "accelerator_type='' is not"),
    ({"cpu_request": ""}, "cpu_request='' is not a Kubernetes quantity"),
    ({"cpu_request": "0"}, "cpu_request='0' must be above zero"),
    ({"memory_request": "64 GB"}, "memory_request='64 GB' is not a Kubernetes quantity"),
    ({"pvc_size": "100GB"}, "pvc_size='100GB' is not a Kubernetes quantity"),
    ({"pvc_size": "20m"}, "pvc_size='20m' is less than 1Mi"),
    ({"pvc_storage_class": ""}, "pvc_storage_class is empty"),
    ({"pvc_access_modes": ["RWO"]}, "must be a list of access modes among"),
    ({"hf_token_secret": ""}, "hf_token_secret is empty.*Expected a non-empty string.*need "
                              "not exist"),
    ({"s3_secret": "My_Secret"}, "s3_secret='My_Secret' is not a valid Kubernetes Secret"),
    ({"delete_workspace": True}, "delete_workspace=true without push_to"),
    ({"run_id": "{{$.pipeline_job_uuid}}"}, "cannot name a volume.*upgrade the backend"),
])
def test_check_config_refuses_bad_operations_parameters(change, message):
    from kfp_finetune.errors import ConfigError
    from kfp_finetune.steps.check_config import check_cluster_settings

    with pytest.raises(ConfigError, match=message):
        check_cluster_settings(**{**CHECK_ARGS, **change})


@pytest.mark.parametrize(("text", "value"), [
    ("100Gi", 100 * 2**30), ("7500m", 7.5), ("8", 8), ("1.5G", 1.5e9), ("1e3", 1000),
    ("64Mi", 64 * 2**20), (".5", 0.5),
])
def test_kubernetes_quantities(text, value):
    from kfp_finetune.steps.check_config import parse_quantity

    assert float(parse_quantity(text, "x", "1")) == pytest.approx(value)
