"""The compiled YAML users upload: structure asserted, and compiled/ equal to a fresh compile."""

from pathlib import Path

import pytest
import yaml

from kfp_finetune.config.runtimes import RUNTIMES
from kfp_finetune.drivers.compile import REPO_COMPILED, check_compiled, compile_runtime

STEPS = ("dataset-initializer", "model-initializer", "tokenize-dataset", "fine-tune",
         "export-model")
GROUP = "comp-exit-handler-1"  # the work steps run in the exit handler's group (a sub-DAG)


def _steps(spec):
    return spec["components"][GROUP]["dag"]["tasks"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    return {name: list(yaml.safe_load_all(compile_runtime(name, out).read_text()))
            for name in RUNTIMES}


def test_committed_compiled_dir_equals_a_fresh_compile():
    assert check_compiled(REPO_COMPILED) == []


def test_check_reports_a_stale_file(tmp_path):
    compile_runtime("torchtune-llama3.2-1b", tmp_path)
    stale = tmp_path / "torchtune-llama3.2-1b.yaml"
    stale.write_text(stale.read_text().replace("20Gi", "21Gi"))
    problems = check_compiled(tmp_path, ["torchtune-llama3.2-1b"])
    assert len(problems) == 1 and "stale" in problems[0] and "21Gi" in problems[0]


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_pvc_per_run_with_size_class_and_access_modes_as_parameters(compiled, runtime):
    spec, _ = compiled[runtime]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["workspace_pvc_size"]["defaultValue"] == RUNTIMES[runtime].pvc_size
    for name in ("workspace_pvc_size", "workspace_storage_class", "workspace_access_modes"):
        assert params[name]["description"]
    pvc = spec["root"]["dag"]["tasks"]["createpvc"]
    assert pvc["componentRef"]["name"] == "comp-createpvc"
    inputs = pvc["inputs"]["parameters"]
    assert inputs["size"] == {"componentInputParameter": "workspace_pvc_size"}
    assert inputs["storage_class_name"] == {"componentInputParameter": "workspace_storage_class"}
    assert inputs["access_modes"] == {"componentInputParameter": "workspace_access_modes"}
    # A new name per run: check-config makes it from the run id (kfp-finetune-<run id>).
    assert inputs["pvc_name"] == {"taskOutputParameter": {
        "outputParameterKey": "pvc_name", "producerTask": "check-config"}}


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_every_other_task_mounts_the_pvc_at_workspace(compiled, runtime):
    _, platform = compiled[runtime]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in STEPS:
        mounts = executors[f"exec-{step}"]["pvcMount"]
        assert [m["mountPath"] for m in mounts] == ["/workspace"]
        assert mounts[0]["pvcNameParameter"] == {
            "componentInputParameter": "pipelinechannel--createpvc-name"}


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_fine_tune_requests_the_gpu_count(compiled, runtime):
    spec, _ = compiled[runtime]
    resources = spec["deploymentSpec"]["executors"]["exec-fine-tune"]["container"]["resources"]
    accel = resources["accelerator"]
    # From check-config's STRING outputs (an integer parameter would resolve to "").
    assert accel["resourceType"] == (
        "{{$.inputs.parameters['pipelinechannel--check-config-accelerator_type']}}")
    assert accel["resourceCount"] == (
        "{{$.inputs.parameters['pipelinechannel--check-config-accelerator_limit']}}")
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert int(params["train_gpus_per_node"]["defaultValue"]) == RUNTIMES[runtime].default_gpus
    assert params["cluster_accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
    task = _steps(spec)["fine-tune"]
    # The GPU count reaches the step in the one config check-config hands on.
    assert task["inputs"]["parameters"]["config"] == {
        "componentInputParameter": "pipelinechannel--check-config-config"}


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_hf_token_comes_from_an_optional_secret_not_a_parameter(compiled, runtime):
    spec, platform = compiled[runtime]
    params = spec["root"]["inputDefinitions"]["parameters"]
    # Only Secret names carry "token": secret_hf_token, secret_registry_token.
    assert not [p for p in params if "token" in p.lower() and not p.startswith("secret_")]
    assert params["secret_hf_token"]["parameterType"] == "STRING"
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in ("dataset-initializer", "model-initializer"):
        (secret,) = [s for s in executors[f"exec-{step}"]["secretAsEnv"]
                     if s["keyToEnv"][0]["envVar"] == "HF_TOKEN"]
        assert secret["optional"] is True
        assert secret["secretNameParameter"] == {
            "componentInputParameter": "pipelinechannel--secret_hf_token"}


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_initializers_run_in_parallel_and_fine_tune_waits_for_both(compiled, runtime):
    spec, _ = compiled[runtime]
    tasks = _steps(spec)
    # The group (and so every step) waits for the volume; inside it the two run at once.
    assert set(spec["root"]["dag"]["tasks"]["exit-handler-1"]["dependentTasks"]) == {
        "check-config", "createpvc"}
    assert "dependentTasks" not in tasks["dataset-initializer"]
    assert "dependentTasks" not in tasks["model-initializer"]
    # tokenize-dataset needs the data and the model's tokenizer; fine-tune reads its output.
    assert set(tasks["tokenize-dataset"]["dependentTasks"]) == {
        "dataset-initializer", "model-initializer"}
    assert set(tasks["fine-tune"]["dependentTasks"]) == {
        "dataset-initializer", "model-initializer", "tokenize-dataset"}
    assert "fine-tune" in tasks["export-model"]["dependentTasks"]


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_components_use_the_project_images_without_installing_kfp(compiled, runtime):
    from kfp_finetune.config import images

    spec, _ = compiled[runtime]
    execs = spec["deploymentSpec"]["executors"]
    assert execs["exec-fine-tune"]["container"]["image"] == images.TRAINER_IMAGE
    for step in ("dataset-initializer", "model-initializer", "tokenize-dataset", "export-model"):
        container = execs[f"exec-{step}"]["container"]
        assert container["image"] == images.CPU_IMAGE
        assert "pip install" not in " ".join(container["command"])


def test_compiled_dir_has_one_yaml_per_runtime():
    assert sorted(p.stem for p in Path(REPO_COMPILED).glob("*.yaml")) == sorted(RUNTIMES)
