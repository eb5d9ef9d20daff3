"""The operations settings, asserted in the compiled YAML's platform spec (not just compiled)."""

from __future__ import annotations

import pytest
import yaml

from kfp_finetune.config.runtimes import RUNTIMES
from kfp_finetune.config.tracking import TRACKING_SECRET_KEYS
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
    assert pvc["size"] == _param(spec, "workspace_pvc_size")
    assert pvc["storage_class_name"] == _param(spec, "workspace_storage_class")
    assert pvc["access_modes"] == _param(spec, "workspace_access_modes")
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
    # Every pipeline parameter goes to check-config (and to no other work task).
    for name in spec["root"]["inputDefinitions"]["parameters"]:
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
    assert params["cluster_accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
    assert params["cluster_cpu_request"]["defaultValue"] == ops.cpu_request
    assert params["cluster_memory_request"]["defaultValue"] == ops.memory_request
    # Unset settings are empty in the run form, not a 0/-1/"auto" stand-in.
    for name in ("train_learning_rate", "train_packed", "lora_rank", "lora_dropout"):
        assert params[name]["isOptional"] is True and "defaultValue" not in params[name]

    ft = executors["exec-fine-tune"]
    assert ft["nodeSelector"] == {"nodeSelectorJson": _group_param("cluster_node_selector")}
    gpu = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # A GPU limit adds no toleration: the GPU runtimes tolerate the GPU taint themselves, and
    # the JSON parameter adds the user's own.
    assert ft["tolerations"] == (gpu if RUNTIMES[runtime].default_gpus else []) + [
        {"tolerationJson": _group_param("cluster_tolerations")}]
    assert params["cluster_node_selector"]["parameterType"] == "STRUCT"
    assert params["cluster_tolerations"]["parameterType"] == "LIST"
    assert params["cluster_tolerations"]["defaultValue"] == []
    assert params["cluster_node_selector"]["defaultValue"] == {}
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
        assert by_env["HF_TOKEN"] == _group_param("secret_hf_token")
        for key in S3_SECRET_KEYS:
            assert by_env[key] == _group_param("secret_s3")
    # The trackers' credentials reach the two tasks that log (fine-tune, export) and no other.
    for step in ("fine-tune", "export-model"):
        (secret,) = [s for s in executors[f"exec-{step}"]["secretAsEnv"]
                     if s["secretNameParameter"] == _group_param("secret_tracking")]
        assert secret["optional"] is True
        assert [i["envVar"] for i in secret["keyToEnv"]] == list(TRACKING_SECRET_KEYS)
    assert len(executors["exec-fine-tune"]["secretAsEnv"]) == 1  # no Hub or S3 keys there
    for step in ("dataset-initializer", "model-initializer"):
        assert all(s["secretNameParameter"] != _group_param("secret_tracking")
                   for s in executors[f"exec-{step}"]["secretAsEnv"])


@pytest.mark.parametrize("runtime", CHECKED)
def test_export_gets_the_run_id_and_the_destination(compiled, runtime):
    spec, _ = compiled[runtime]
    (task, _) = _nested_tasks(spec)["export-model"]
    inputs = task["inputs"]["parameters"]
    assert inputs["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    # The destination travels in the one config check-config hands on.
    assert set(inputs) == {"config", "run_id", "workspace_path"}
    assert inputs["config"] == {"componentInputParameter": "pipelinechannel--check-config-config"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["export_push_to"]["defaultValue"] == ""
    assert params["export_copy_to_artifact"]["defaultValue"] is False


@pytest.mark.parametrize("runtime", CHECKED)
def test_an_exit_task_cleans_up_the_volume_whatever_the_outcome(compiled, runtime):
    spec, _ = compiled[runtime]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["workspace_delete_on_success"]["defaultValue"] is False
    assert params["workspace_keep_on_failure"]["defaultValue"] is False
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
        "keep_workspace_on_failure": _param(spec, "workspace_keep_on_failure"),
        "delete_workspace": _param(spec, "workspace_delete_on_success"),
        "push_to": _param(spec, "export_push_to"),
    }
    # The group holds container tasks only: the backend records a group's final state from
    # its tasks' launchers (backend/src/v2/metadata/client.go: UpdateDAGExecutionsState); a
    # driver-only task (DeletePVC) or a condition there would leave it stale.
    group = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(group) == {"dataset-initializer", "model-initializer", "tokenize-dataset",
                          "fine-tune", "export-model", "benchmark-model", "register-model",
                          "serve-model"}
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

CHECK_VALUES = dict(
    train_gpus_per_node=2, cluster_accelerator_type="nvidia.com/gpu", cluster_cpu_request="8",
    cluster_memory_request="64Gi", workspace_pvc_size="100Gi",
    workspace_storage_class="standard", workspace_access_modes=["ReadWriteOnce"],
    secret_hf_token="hf-token", secret_s3="s3-credentials", workspace_delete_on_success=False,
    export_push_to="", data_uri="hf://tatsu-lab/alpaca/data",
)
RUN = dict(run_id="0b6f1a52-4c1e-4a7e-9d43-2f7a3c0e8b11", run_name="nightly run",
           pipeline="kfp-finetune-torchtune-llama3-2-1b")


def _check_config(values):
    """check-config's python_func, as the cluster pipeline builds it (the whole table)."""
    from kfp_finetune.components.check_config import build_check_config
    from kfp_finetune.config.parameters import PARAMETERS

    return build_check_config(PARAMETERS).python_func(
        runtime="torchtune-llama3.2-1b", cluster=True, **values, **RUN)


def test_check_config_hands_on_strings_for_a_gpu_run():
    out = _check_config(CHECK_VALUES)
    assert out[1:5] == ("nvidia.com/gpu", "2", "8", "64Gi")
    assert out[5] == "kfp-finetune-0b6f1a52-4c1e-4a7e-9d43-2f7a3c0e8b11"
    assert out[6] == {"kfp-finetune/pipeline": "kfp-finetune-torchtune-llama3-2-1b",
                      "kfp-finetune/run-id": RUN["run_id"],
                      "kfp-finetune/run-name": "nightly run"}
    config = out[0]  # the one validated config every later task takes
    assert config["runtime"] == "torchtune-llama3.2-1b"
    assert config["model_uri"] == "hf://meta-llama/Llama-3.2-1B-Instruct"
    assert config["trainer"]["resources_per_node"] == {"gpu": 2}


def test_check_config_gives_a_cpu_run_no_accelerator_limit():
    # Empty type and count: initPodSpecPatch (backend/src/v2/driver/driver.go) then adds no
    # accelerator limit at all (it needs both non-empty).
    out = _check_config({**CHECK_VALUES, "train_gpus_per_node": 0,
                         "cluster_accelerator_type": ""})
    assert out[1:3] == ("", "")


@pytest.mark.parametrize(("change", "message"), [
    ({"train_gpus_per_node": 9}, "train_gpus_per_node=9 must be a whole number from 0"),
    ({"cluster_accelerator_type": "gpu"},
     "cluster_accelerator_type='gpu' is not a Kubernetes resource name"),
    ({"cluster_accelerator_type": ""}, "cluster_accelerator_type='' is not"),
    ({"cluster_cpu_request": ""}, "cluster_cpu_request='' is not a Kubernetes quantity"),
    ({"cluster_cpu_request": "0"}, "cluster_cpu_request='0' must be above zero"),
    ({"cluster_memory_request": "64 GB"},
     "cluster_memory_request='64 GB' is not a Kubernetes quantity"),
    ({"workspace_pvc_size": "100GB"}, "workspace_pvc_size='100GB' is not a Kubernetes quantity"),
    ({"workspace_pvc_size": "20m"}, "workspace_pvc_size='20m' is less than 1Mi"),
    ({"workspace_storage_class": ""}, "workspace_storage_class is empty"),
    ({"workspace_access_modes": ["RWO"]}, "must be a list of access modes among"),
    ({"secret_hf_token": ""}, "secret_hf_token is empty.*Expected a non-empty string.*need "
                              "not exist"),
    ({"secret_s3": "My_Secret"}, "secret_s3='My_Secret' is not a valid Kubernetes Secret"),
    ({"workspace_delete_on_success": True},
     "workspace_delete_on_success=true without export_push_to"),
])
def test_check_config_refuses_bad_operations_parameters(change, message):
    from kfp_finetune.errors import ConfigError
    from kfp_finetune.steps.check_config import check_cluster_settings

    with pytest.raises(ConfigError, match=message):
        check_cluster_settings({**CHECK_VALUES, **change}, **RUN)


def test_check_config_refuses_an_unresolved_run_id():
    from kfp_finetune.errors import ConfigError
    from kfp_finetune.steps.check_config import check_cluster_settings

    with pytest.raises(ConfigError, match="cannot name a volume.*upgrade the backend"):
        check_cluster_settings(CHECK_VALUES, **{**RUN, "run_id": "{{$.pipeline_job_uuid}}"})


def test_check_config_refuses_a_bad_training_value_before_any_volume():
    from kfp_finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_size=0 is below the minimum 1"):
        _check_config({**CHECK_VALUES, "train_batch_size": 0})


@pytest.mark.parametrize(("text", "value"), [
    ("100Gi", 100 * 2**30), ("7500m", 7.5), ("8", 8), ("1.5G", 1.5e9), ("1e3", 1000),
    ("64Mi", 64 * 2**20), (".5", 0.5),
])
def test_kubernetes_quantities(text, value):
    from kfp_finetune.steps.check_config import parse_quantity

    assert float(parse_quantity(text, "x", "1")) == pytest.approx(value)
