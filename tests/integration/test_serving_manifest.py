"""The KServe InferenceService manifest of an export, and applying it through the Kubernetes API.

No cluster or KServe here: the manifest is checked field by field against KServe's rules (cited
beside each check) and round-tripped through YAML; applying goes through the real
``kubernetes`` client to ``k8s_api_server.FakeK8sApi`` (custom objects), the stand-in the other
Kubernetes tests use.
"""

import re
from pathlib import Path

import pytest
import yaml
from kubernetes.client import ApiClient, Configuration
from support.k8s_api_server import FakeK8sApi

from kfp_finetune.errors import ConfigError
from kfp_finetune.steps import serving_manifest as sm

RUN_ID = "0b6f1a52-4c1e-4a7e-9d43-2f7a3c0e8b11"
PVC = f"kfp-finetune-{RUN_ID}"
EXPORT = "/workspace/output/Llama-3.2-1B-finetuned-0b6f1a52"
ISVC = ("serving.kserve.io", "v1beta1", "team-ml", "inferenceservices")


def meta(*destinations: str, path: str = EXPORT) -> dict:
    return {"path": path, "adapter_path": f"{path}/adapter", "lora": True,
            "destinations": list(destinations), "run_id": RUN_ID}


@pytest.fixture
def namespace(tmp_path, monkeypatch):
    """The pod's namespace file, as a service account mounts it."""
    ns = tmp_path / "namespace"
    ns.write_text("team-ml\n")
    monkeypatch.setattr(sm, "SA_NAMESPACE", ns)
    return "team-ml"


@pytest.fixture
def k8s():
    with FakeK8sApi() as fake:
        config = Configuration()
        config.host = fake.url
        fake.client = ApiClient(config)
        yield fake


def build(metadata: dict, **options) -> dict:
    manifest, applied = sm.serving_manifest(metadata, pvc_name=PVC, name="tuned",
                                            run_id=RUN_ID, log=lambda _: None, **options)
    assert applied == "not applied"
    return manifest


@pytest.mark.parametrize(("destinations", "uri"), [
    ((), f"pvc://{PVC}/output/Llama-3.2-1B-finetuned-0b6f1a52"),
    (("s3://bucket/models/Llama-3.2-1B-finetuned-0b6f1a52",),
     "s3://bucket/models/Llama-3.2-1B-finetuned-0b6f1a52"),
    # KServe splits hf://<owner>/<model>[:<revision>] (python/storage/kserve_storage/
    # kserve_storage.py, Storage._download_hf); the export records @<commit>.
    (("hf://org/tuned@0123abcd",), "hf://org/tuned:0123abcd"),
    (("hf://org/tuned",), "hf://org/tuned"),
])
def test_the_manifest_for_each_destination_kind(namespace, destinations, uri):
    manifest = build(meta(*destinations), max_model_len=4096)
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    assert manifest["metadata"] == {
        "name": "tuned", "namespace": "team-ml",
        "labels": {"app.kubernetes.io/managed-by": "kfp-finetune"},
        "annotations": {"kfp-finetune/run-id": RUN_ID}}
    model = manifest["spec"]["predictor"]["model"]
    # modelFormat huggingface: what KServe's kserve-huggingfaceserver ClusterServingRuntime
    # lists in supportedModelFormats (config/runtimes/kserve-huggingfaceserver.yaml).
    assert model["modelFormat"] == {"name": "huggingface"}
    assert "runtime" not in model  # KServe picks the runtime by format
    assert model["storageUri"] == uri
    # Arguments of huggingfaceserver/__main__.py: --model_name, --backend, --max_model_len.
    assert model["args"] == ["--model_name=tuned", "--backend=vllm", "--max_model_len=4096"]
    assert model["resources"] == {
        "requests": {"cpu": "4", "memory": "32Gi"},
        "limits": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"}}
    assert "serviceAccountName" not in manifest["spec"]["predictor"]
    text = sm.to_yaml(manifest)
    assert yaml.safe_load(text) == manifest
    assert text.startswith("apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\n")


def test_a_lora_export_is_served_from_its_merged_model_folder(namespace):
    uri = build(meta())["spec"]["predictor"]["model"]["storageUri"]
    assert uri.endswith("/output/Llama-3.2-1B-finetuned-0b6f1a52") and "adapter" not in uri


def test_cpu_serving_uses_the_hugging_face_backend_and_no_gpu(namespace):
    manifest = build(meta(), gpus=0, cpu="2", memory="6Gi", service_account="model-reader",
                     runtime="my-hf-runtime")
    predictor = manifest["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "model-reader"
    assert predictor["model"]["runtime"] == "my-hf-runtime"
    assert "--backend=huggingface" in predictor["model"]["args"]
    assert predictor["model"]["resources"]["limits"] == {"cpu": "2", "memory": "6Gi"}


def test_the_default_name_comes_from_the_export_folder(namespace):
    manifest, _ = sm.serving_manifest(meta(path="/workspace/output/Qwen2.5_7B-finetuned-ab"),
                                      pvc_name=PVC, log=lambda _: None)
    name = manifest["metadata"]["name"]
    assert name == "qwen2-5-7b-finetuned-ab"
    # KServe's isvc name rule (inference_service_validation.go, IsvcNameFmt).
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)


@pytest.mark.parametrize(("options", "match"), [
    ({"name": "Tuned_Model"}, "serve_name='Tuned_Model'"),
    ({"name": "a" * 54}, "at most 53"),
    ({"name": "ok", "memory": "lots"}, "serve_memory='lots'"),
    ({"name": "ok", "gpus": -1}, "must not be negative"),
])
def test_values_kserve_would_refuse_are_refused_here(namespace, options, match):
    with pytest.raises(ConfigError, match=match):
        sm.serving_manifest(meta(), pvc_name=PVC, log=lambda _: None, **options)


def test_a_model_only_in_a_local_folder_cannot_be_served(namespace):
    with pytest.raises(ConfigError, match="lives only in a local folder.*push_to"):
        sm.serving_manifest(meta(path="/home/me/ws/output/m"), log=lambda _: None)


def test_a_volume_model_is_served_only_in_the_volumes_namespace(namespace):
    with pytest.raises(ConfigError, match="mounts a claim only in its own namespace"):
        sm.serving_manifest(meta(), pvc_name=PVC, namespace="serving", log=lambda _: None)
    manifest, _ = sm.serving_manifest(meta("s3://b/m"), pvc_name=PVC, namespace="serving",
                                      log=lambda _: None)
    assert manifest["metadata"]["namespace"] == "serving"


def apply(k8s, metadata: dict, **options) -> tuple[dict, str, str]:
    lines: list[str] = []
    manifest, applied = sm.serving_manifest(metadata, pvc_name=PVC, name="tuned", apply=True,
                                            run_id=options.pop("run_id", RUN_ID),
                                            api_client=k8s.client, log=lines.append, **options)
    return manifest, applied, "\n".join(lines)


def test_apply_creates_then_leaves_an_identical_service_alone(namespace, k8s):
    manifest, applied, log = apply(k8s, meta())
    assert applied == "created" and "created InferenceService team-ml/tuned" in log
    stored = k8s.objects[(*ISVC, "tuned")]
    assert stored["spec"] == manifest["spec"]
    assert k8s.find("POST", r"/apis/serving.kserve.io/v1beta1/namespaces/team-ml/"
                            r"inferenceservices")
    _, applied, _ = apply(k8s, meta())
    assert applied == "unchanged" and not k8s.find("PUT", r".*")


def test_apply_updates_the_service_an_earlier_run_created(namespace, k8s):
    apply(k8s, meta("s3://b/old"), run_id="earlier-run")
    _, applied, log = apply(k8s, meta("s3://b/new"))
    assert applied == "updated" and "earlier-run" in log
    stored = k8s.objects[(*ISVC, "tuned")]
    assert stored["spec"]["predictor"]["model"]["storageUri"] == "s3://b/new"
    assert stored["metadata"]["resourceVersion"] == "2"  # the PUT carried the stored version


def test_apply_never_replaces_a_service_kfp_finetune_did_not_create(namespace, k8s):
    theirs = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
              "metadata": {"name": "tuned", "namespace": "team-ml", "resourceVersion": "7"},
              "spec": {"predictor": {"model": {"modelFormat": {"name": "sklearn"}}}}}
    k8s.objects[(*ISVC, "tuned")] = theirs
    with pytest.raises(ConfigError, match="was not created by kfp-finetune.*serve_name"):
        apply(k8s, meta())
    assert k8s.objects[(*ISVC, "tuned")] is theirs and not k8s.find("PUT", r".*")


def test_apply_names_the_missing_permission(namespace, k8s):
    k8s.deny = True
    with pytest.raises(ConfigError, match="HTTP 403.*inferenceservices.serving.kserve.io"):
        apply(k8s, meta())


def test_apply_says_when_kserve_is_not_installed(namespace, k8s):
    k8s.crds.clear()
    with pytest.raises(ConfigError, match="KServe is not installed"):
        apply(k8s, meta())


def test_outside_a_pod_the_namespace_must_be_given(tmp_path, monkeypatch, k8s):
    monkeypatch.setattr(sm, "SA_NAMESPACE", Path(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="serve_namespace"):
        apply(k8s, meta("s3://b/m"))


def test_the_component_writes_the_manifest_artifact(namespace, tmp_path):
    from kfp import dsl

    from kfp_finetune.components.serve_model import serve_model

    model = dsl.Model(name="model", uri=str(tmp_path / "model"), metadata=meta("s3://b/m"))
    out = dsl.Artifact(name="serving_manifest", uri=str(tmp_path / "isvc.yaml"))
    name, uri, applied = serve_model.python_func(model=model, serving_manifest=out,
                                                 name="tuned", run_id=RUN_ID, gpus=0)
    assert (name, uri, applied) == ("tuned", "s3://b/m", "not applied")
    written = yaml.safe_load((tmp_path / "isvc.yaml").read_text())
    assert written["kind"] == "InferenceService"
    assert written["spec"]["predictor"]["model"]["storageUri"] == "s3://b/m"
    assert out.metadata == {"name": "tuned", "namespace": "team-ml", "storage_uri": "s3://b/m",
                            "applied": "not applied"}


def test_the_optional_steps_follow_the_export_without_conditions_on_a_cluster(tmp_path):
    from kfp import compiler
    from support.backend_rules import secret_names, strict_parse, unlisted_features

    from kfp_finetune.drivers.compile import compile_runtime

    docs = list(yaml.safe_load_all(compile_runtime("torchtune-llama3.2-1b", tmp_path)
                                   .read_text()))
    spec, platform = docs[0], docs[1]
    group = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    for name in ("benchmark-model", "register-model", "serve-model"):
        # In the exit handler's group, after the export, never under a condition (a skipped
        # condition would leave the group's final state stale; see pipelines/.../handoff.py).
        assert group[name]["dependentTasks"] == ["export-model"], name
        assert "triggerPolicy" not in group[name], name
    assert "serving_manifest" in spec["components"]["comp-serve-model"]["outputDefinitions"][
        "artifacts"]
    assert strict_parse(spec, platform) == []
    assert unlisted_features(spec, platform) == []
    assert secret_names(spec, platform, {}, {}) == []
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    (secret,) = executors["exec-register-model"]["secretAsEnv"]
    assert secret["keyToEnv"] == [{"secretKey": "MODEL_REGISTRY_TOKEN",
                                   "envVar": "MODEL_REGISTRY_TOKEN"}]
    assert secret["optional"] is True
    assert secret["secretNameParameter"] == {
        "componentInputParameter": "pipelinechannel--secret_registry_token"}

    # A local pipeline has a step only when its setting is given.
    from kfp_finetune.pipelines.finetune import build_pipeline

    local = tmp_path / "local.yaml"
    compiler.Compiler().compile(build_pipeline(
        "torchtune-llama3.2-tiny", str(tmp_path), given=["data_uri", "registry_url"]), str(local))
    tasks = next(yaml.safe_load_all(local.read_text()))["root"]["dag"]["tasks"]
    assert "register-model" in tasks
    assert "serve-model" not in tasks and "benchmark-model" not in tasks


def test_skipped_steps_say_so_and_ask_for_no_gpu(tmp_path, capsys):
    from kfp import dsl

    from kfp_finetune.components.register_model import register_model
    from kfp_finetune.components.serve_model import serve_model
    from kfp_finetune.steps.check_config import check_cluster_settings

    art = dsl.Model(name="m", uri=str(tmp_path / "m"), metadata={})
    assert register_model.python_func(model=art, registry_url="") == ("", "", "")
    out = dsl.Artifact(name="s", uri=str(tmp_path / "s"), metadata={})
    assert serve_model.python_func(model=art, serving_manifest=out, name="") == ("", "", "")
    text = capsys.readouterr().out
    assert "registry_url is empty" in text and "serve_name is empty" in text
    values = dict(train_gpus_per_node=2, cluster_accelerator_type="nvidia.com/gpu",
                  cluster_cpu_request="8", cluster_memory_request="64Gi",
                  workspace_pvc_size="100Gi", workspace_storage_class="standard",
                  workspace_access_modes=["ReadWriteOnce"], secret_hf_token="hf-token",
                  secret_s3="s3-credentials")
    run = dict(run_id="0b6f1a52-4c1e-4a7e-9d43-2f7a3c0e8b11")
    off = check_cluster_settings(values, **run)
    assert (off.bench_accelerator_type, off.bench_accelerator_limit) == ("", "")
    assert (off.bench_cpu_request, off.bench_memory_request) == ("100m", "256Mi")
    on = check_cluster_settings({**values, "eval_lm_tasks": "hellaswag"}, **run)
    assert (on.bench_accelerator_type, on.bench_accelerator_limit) == ("nvidia.com/gpu", "2")
    assert (on.bench_cpu_request, on.bench_memory_request) == ("8", "64Gi")


def test_apply_outside_a_cluster_says_to_apply_the_artifact(namespace, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="kubectl apply -f"):
        sm.serving_manifest(meta("s3://b/m"), name="tuned", apply=True, log=lambda _: None)
