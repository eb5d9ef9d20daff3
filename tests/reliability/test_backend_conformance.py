"""Every compiled YAML held to the KFP backend's own rules (kubeflow/pipelines 2.17.0).

The rules live in ``backend_rules.py``, each citing the backend function it mirrors. Here they
run on every file in compiled/, on YAML that ``kfp-finetune compile`` writes with non-default
options, and on YAML built to break them (each rule must fail there). The fine-tune pod's
resources are resolved as the driver would, with check-config's outputs computed by the same
code the check-config task runs.
"""

# No `from __future__ import annotations`: KFP reads the components' annotations as types.
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl, kubernetes
from support.backend_rules import (
    features_used,
    resources_from_strings,
    secret_names,
    simulate_resources,
    strict_parse,
    unlisted_features,
)

from kfp_finetune.config.runtimes import RUNTIMES
from kfp_finetune.drivers.backend import FEATURES, MIN_BACKEND, check_backend_version
from kfp_finetune.drivers.compile import REPO_COMPILED
from kfp_finetune.errors import ConfigError
from kfp_finetune.pipelines.finetune import pipeline_name
from kfp_finetune.steps.check_config import check_cluster_settings

RUN_ID = "0b6f1a52-4c1e-4a7e-9d43-2f7a3c0e8b11"
FINE_TUNE = "exec-fine-tune"


def _load(path: Path) -> tuple[dict, dict | None]:
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else None)


COMPILED = {path.stem: _load(path) for path in sorted(REPO_COMPILED.glob("*.yaml"))}


def _defaults(spec: dict) -> dict:
    return {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"]
            .items()}


def check_config_outputs(spec: dict, runtime: str, params: dict) -> dict:
    """What check-config hands on for these parameters (the task's own code)."""
    p = {**_defaults(spec), **params}
    p["train_gpus_per_node"] = int(p["train_gpus_per_node"])  # the YAML header has 1.0
    s = check_cluster_settings(
        p, run_id=RUN_ID, run_name="nightly", pipeline=pipeline_name(RUNTIMES[runtime]))
    return {f"check-config.{key}": getattr(s, key) for key in (
        "accelerator_type", "accelerator_limit", "cpu_request", "memory_request", "pvc_name",
        "pvc_annotations")}


def all_problems(spec: dict, platform: dict | None, params: dict | None = None,
                 outputs: dict | None = None) -> list[str]:
    return (strict_parse(spec, platform) + resources_from_strings(spec)
            + secret_names(spec, platform, params or {}, outputs or {})
            + unlisted_features(spec, platform))


# ----------------------------------------------------------------------------- compiled/


def test_every_runtime_is_compiled():
    assert sorted(COMPILED) == sorted(RUNTIMES)


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_compiled_yaml_obeys_the_backend_rules(runtime):
    spec, platform = COMPILED[runtime]
    outputs = check_config_outputs(spec, runtime, {})
    assert all_problems(spec, platform, {}, outputs) == []


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_fine_tune_pod_resources_for_the_defaults(runtime):
    spec, _ = COMPILED[runtime]
    rt = RUNTIMES[runtime]
    pod = simulate_resources(spec, FINE_TUNE, {}, check_config_outputs(spec, runtime, {}))
    defaults = _defaults(spec)
    # A GPU runtime's pod gets nvidia.com/gpu: N; a CPU runtime's gets no accelerator limit.
    expected = {"nvidia.com/gpu": str(rt.default_gpus)} if rt.default_gpus else {}
    assert pod == {"limits": expected, "requests": {
        "cpu": defaults["cluster_cpu_request"], "memory": defaults["cluster_memory_request"]}}


@pytest.mark.parametrize(("runtime", "params", "limits"), [
    ("torchtune-llama3.2-1b", {"train_gpus_per_node": 2}, {"nvidia.com/gpu": "2"}),
    ("torchtune-llama3.2-1b", {"train_gpus_per_node": 0}, {}),
    ("torchtune-llama3.2-1b", {"cluster_accelerator_type": "amd.com/gpu"}, {"amd.com/gpu": "1"}),
    ("torchtune-llama3.3-70b", {"train_gpus_per_node": 8}, {"nvidia.com/gpu": "8"}),
    ("torchtune-llama3.2-tiny", {"train_gpus_per_node": 1}, {"nvidia.com/gpu": "1"}),
    ("torchtune-qwen2.5-tiny", {"cluster_accelerator_type": ""}, {}),
])
def test_fine_tune_pod_resources_for_typical_values(runtime, params, limits):
    spec, _ = COMPILED[runtime]
    params = {**params, "cluster_cpu_request": "7500m", "cluster_memory_request": "48Gi"}
    outputs = check_config_outputs(spec, runtime, params)
    pod = simulate_resources(spec, FINE_TUNE, params, outputs)
    assert pod == {"limits": limits, "requests": {"cpu": "7500m", "memory": "48Gi"}}


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_every_feature_used_is_listed_with_its_backend_release(runtime):
    spec, platform = COMPILED[runtime]
    used = features_used(spec, platform)
    listed = {f.name: f.since for f in FEATURES}
    assert set(used) <= set(listed)
    # The floor is the newest feature used: optional Secrets-as-env (2.15).
    assert max(listed[name] for name in used) == MIN_BACKEND == (2, 15, 0)
    assert "PipelineTaskFinalStatus input of an exit task" in used


def test_the_floor_refuses_an_older_backend_and_names_what_it_lacks():
    assert check_backend_version("2.17.0") == (2, 17, 0)
    assert check_backend_version("unknown") is None
    with pytest.raises(ConfigError, match=r"2\.14\.0, older than 2\.15\.0.*optional Secret"):
        check_backend_version("2.14.0")


def test_yaml_compiled_with_other_images_obeys_the_rules(tmp_path):
    # `compile` reads the image variables at import: a fresh process, as a user would run it.
    env = {**os.environ, "KFP_FINETUNE_REGISTRY": "registry.example.com/ml"}
    subprocess.run([sys.executable, "-m", "kfp_finetune.drivers.cli", "compile", "--runtime",
                    "torchtune-llama3.2-3b", "--runtime", "torchtune-qwen2.5-tiny",
                    "--output-dir", str(tmp_path)], env=env, check=True, capture_output=True)
    for path in sorted(tmp_path.glob("*.yaml")):
        spec, platform = _load(path)
        assert "registry.example.com/ml/" in path.read_text()
        outputs = check_config_outputs(spec, path.stem, {})
        assert all_problems(spec, platform, {}, outputs) == []


# ----------------------------------------------------------------------------- must fail


@dsl.component(base_image="python:3.11")
def _echo(text: str) -> str:
    return text


def _compile(pipeline, tmp_path: Path) -> tuple[dict, dict | None]:
    path = tmp_path / "bad.yaml"
    compiler.Compiler().compile(pipeline, str(path))
    return _load(path)


def test_fails_on_a_resource_field_fed_from_an_integer(tmp_path):
    @dsl.pipeline(name="int-gpus")
    def bad(gpus: int = 1, accelerator: str = "nvidia.com/gpu"):
        task = _echo(text="x")
        task.set_accelerator_type(accelerator).set_accelerator_limit(gpus)

    spec, platform = _compile(bad, tmp_path)
    problems = resources_from_strings(spec)
    assert len(problems) == 1
    assert "accelerator.resourceCount" in problems[0] and "NUMBER_INTEGER" in problems[0]
    # What the driver would do: no accelerator limit, without a word.
    assert simulate_resources(spec, "exec-echo", {}, {}) == {"limits": {}, "requests": {}}


def test_fails_on_a_cpu_request_fed_from_an_integer_output(tmp_path):
    @dsl.component(base_image="python:3.11")
    def cpus() -> int:
        return 4

    @dsl.pipeline(name="int-cpu")
    def bad():
        count = cpus()
        _echo(text="x").set_cpu_request(count.output)

    spec, _ = _compile(bad, tmp_path)
    (problem,) = resources_from_strings(spec)
    assert "resourceCpuRequest" in problem and "cpus.Output" in problem
    with pytest.raises(ValueError, match="not a quantity"):
        simulate_resources(spec, "exec-echo", {}, {"cpus.Output": 4})


def test_fails_on_an_empty_secret_name(tmp_path):
    @dsl.pipeline(name="empty-secret")
    def bad(token_secret: str = ""):
        task = _echo(text="x")
        kubernetes.use_secret_as_env(task, secret_name=token_secret,
                                     secret_key_to_env={"HF_TOKEN": "HF_TOKEN"}, optional=True)

    spec, platform = _compile(bad, tmp_path)
    (problem,) = secret_names(spec, platform, {}, {})
    assert "resolves to ''" in problem and "non-empty string" in problem


def test_fails_on_an_empty_secret_name_given_to_the_pipeline():
    spec, platform = COMPILED["torchtune-llama3.2-1b"]
    problems = secret_names(spec, platform, {"secret_hf_token": ""}, {})
    assert len(problems) == 4  # the initializers, the export and the benchmark
    # And check-config, which runs before them, refuses it with the reason.
    with pytest.raises(ConfigError, match="secret_hf_token is empty.*need not exist"):
        check_config_outputs(spec, "torchtune-llama3.2-1b", {"secret_hf_token": ""})


def test_fails_on_an_unknown_field_in_the_pipeline_spec():
    spec, platform = copy.deepcopy(COMPILED["torchtune-llama3.2-1b"])
    spec["deploymentSpec"]["executors"][FINE_TUNE]["container"]["resources"]["gpuCount"] = 1
    (problem,) = strict_parse(spec, platform)
    assert "gpuCount" in problem


def test_fails_on_an_unknown_field_in_an_executor_config():
    spec, platform = copy.deepcopy(COMPILED["torchtune-llama3.2-1b"])
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors[FINE_TUNE]["shmSize"] = "8Gi"
    (problem,) = strict_parse(spec, platform)
    assert problem.startswith(f"{FINE_TUNE}:") and "shmSize" in problem
    assert "unlisted platform setting shmSize" in " ".join(unlisted_features(spec, platform))


def test_fails_on_a_pipeline_name_the_api_refuses():
    spec, platform = copy.deepcopy(COMPILED["torchtune-llama3.2-1b"])
    spec["pipelineInfo"]["name"] = "Fine Tune"
    assert strict_parse(spec, platform) == ["pipeline name 'Fine Tune' is not DNS-like"]
