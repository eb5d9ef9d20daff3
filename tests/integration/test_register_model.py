"""The register-model step with the real ``model-registry`` client against a local stand-in.

No Model Registry can run here (it needs its Go server and a database), so
``model_registry_server.FakeModelRegistry`` answers the REST calls the client makes, validating
bodies with the client package's own OpenAPI models. What is asserted is what the stand-in
stored: the registered model, the version with its custom properties, the model artifact.
The export metadata comes from the export step's own ``export_metadata``.
"""

import socket
import time
from pathlib import Path

import pytest
from support.model_registry_server import FakeModelRegistry

from kfp_finetune.errors import ConfigError, SourceError
from kfp_finetune.steps.export_metadata import export_metadata
from kfp_finetune.steps.register_model import (
    TOKEN_ENV,
    api_prefix,
    check_server,
    register_model,
    registry_properties,
)

RUN_ID = "0b6f1a52-4c1e-4a7e-9d43-2f7a3c0e8b11"
EXPORT = "/workspace/output/Llama-3.2-1B-finetuned-0b6f1a52"
PVC = f"kfp-finetune-{RUN_ID}"
CONF = {"epochs": 2, "batch_size": 4, "optimizer": {"_component_": "torch.optim.AdamW",
                                                    "lr": 3e-4},
        "model": {"lora_rank": 8, "lora_alpha": 16, "lora_attn_modules": ["q_proj", "v_proj"]}}


def metadata(fingerprint: str = "fp-1", run_id: str = RUN_ID, **extra) -> dict:
    trained = {"fingerprint": fingerprint, "recipe": "lora_finetune_single_device",
               "config": "llama3_2/1B_lora_single_device", "resolved": {"epochs": 2},
               "final_loss": 1.5, "inputs": {}}
    meta = export_metadata(trained, {"source": "hf://meta-llama/Llama-3.2-1B", "revision": "abc"},
                           {"source": "hf://tatsu-lab/alpaca/data"}, CONF,
                           "torchtune-llama3.2-1b", run_id, Path(EXPORT), True)
    meta.update({"destinations": [], **extra})
    return meta


@pytest.fixture
def registry():
    with FakeModelRegistry() as fake:
        yield fake


def register(registry, meta=None, **options):
    lines: list[str] = []
    args = dict(pvc_name=PVC, namespace="team-ml", timeout_s=10, log=lines.append)
    args.update(options)
    return register_model(meta or metadata(), registry.url, **args), "\n".join(lines)


def posts(registry) -> list[str]:
    return [c.path for c in registry.calls if c.method in ("POST", "PATCH")]


def test_the_model_version_and_artifact_are_stored_with_their_properties(registry):
    result, log = register(registry, metadata(eval_loss=1.25, base_eval_loss=1.75))
    assert (result.name, result.version) == ("Llama-3.2-1B-finetuned",
                                             "Llama-3.2-1B-finetuned-0b6f1a52")
    assert result.uri == f"pvc://{PVC}/output/Llama-3.2-1B-finetuned-0b6f1a52"
    assert not result.already and "registered" in log
    [rm] = registry.models.values()
    assert rm["name"] == result.name and rm["owner"] == "kfp-finetune"
    mv = registry.version_of(result.name, result.version)
    assert mv["author"] == "kfp-finetune" and "hf://tatsu-lab/alpaca/data" in mv["description"]
    props = registry.plain(mv["customProperties"])
    assert props["base_model"] == "hf://meta-llama/Llama-3.2-1B"
    assert props["base_model_revision"] == "abc"
    assert props["dataset"] == "hf://tatsu-lab/alpaca/data"
    assert props["run_id"] == RUN_ID and props["fingerprint"] == "fp-1"
    assert props["final_loss"] == 1.5 and props["eval_loss"] == 1.25
    assert props["base_eval_loss"] == 1.75
    assert props["lora"] is True
    assert props["hyperparameters.learning_rate"] == 3e-4
    assert props["hyperparameters.epochs"] == 2 and props["hyperparameters.lora_rank"] == 8
    assert props["hyperparameters.lora_attn_modules"] == '["q_proj", "v_proj"]'
    # The stand-in stores the types the client sent: MetadataDoubleValue for floats, etc.
    assert mv["customProperties"]["final_loss"]["metadataType"] == "MetadataDoubleValue"
    assert mv["customProperties"]["lora"]["metadataType"] == "MetadataBoolValue"
    [art] = registry.artifacts_of(mv["id"])
    assert art["uri"] == result.uri
    assert (art["modelFormatName"], art["modelFormatVersion"]) == ("huggingface", "1")
    # model_source_* as the registry's docs/logical_model.md fills them for a pipeline run.
    assert (art["modelSourceKind"], art["modelSourceClass"]) == ("pipelines", "pipelinerun")
    assert (art["modelSourceGroup"], art["modelSourceId"]) == ("team-ml", RUN_ID)


def test_the_client_speaks_the_v1alpha3_api_the_brief_and_deployed_registries_use(registry):
    register(registry)
    assert api_prefix() == "/api/model_registry/v1alpha3"
    assert registry.calls[0].path == "/registered_models"


def test_a_rerun_finds_its_version_and_writes_nothing(registry):
    first, _ = register(registry)
    written = posts(registry)
    second, log = register(registry)
    assert second.already and (second.model_id, second.version_id) == (first.model_id,
                                                                      first.version_id)
    assert posts(registry) == written, "a re-run must not write again"
    assert "already registered" in log
    assert len(registry.versions) == 1 and len(registry.artifacts) == 1


def test_a_version_name_holding_another_model_is_refused(registry):
    register(registry, version="v1")
    with pytest.raises(ConfigError, match=r"version v1 already holds another model.*"
                                          r"registry_version"):
        register(registry, metadata(fingerprint="fp-2", run_id="other-run"), version="v1")
    mv = registry.version_of("Llama-3.2-1B-finetuned", "v1")
    assert registry.plain(mv["customProperties"])["fingerprint"] == "fp-1"


def test_an_interrupted_registration_is_completed_by_the_rerun(registry):
    registry.fail_once = ("POST", r"/model_versions/[^/]+/artifacts")
    with pytest.raises(SourceError, match="HTTP 500.*a re-run resumes it"):
        register(registry)
    mv = registry.version_of("Llama-3.2-1B-finetuned", "Llama-3.2-1B-finetuned-0b6f1a52")
    assert mv is not None and registry.artifacts_of(mv["id"]) == []
    result, log = register(registry)
    assert result.already and "completed" in log
    [art] = registry.artifacts_of(mv["id"])
    assert art["uri"] == result.uri and len(registry.versions) == 1


def test_the_token_comes_from_the_environment_and_is_never_shown(monkeypatch):
    with FakeModelRegistry(token="s3cr3t-registry-token") as registry:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        with pytest.raises(ConfigError, match=f"HTTP 401.*{TOKEN_ENV}") as err:
            register(registry)
        monkeypatch.setenv(TOKEN_ENV, "s3cr3t-registry-token")
        result, log = register(registry)
        assert registry.calls[-1].headers["authorization"] == "Bearer s3cr3t-registry-token"
    assert "s3cr3t" not in str(err.value) + log + repr(result)


def test_a_registry_that_refuses_says_so(registry):
    registry.refuse = True
    with pytest.raises(SourceError, match=r"answered HTTP 503"):
        register(registry)


def test_a_registry_that_never_answers_times_out_with_a_clear_error(registry):
    registry.hang.set()
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"did not answer within 1 s"):
        register(registry, timeout_s=1)
    assert time.monotonic() - start < 10


def test_an_unreachable_registry_is_named():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    with pytest.raises(SourceError, match=f"cannot reach the Model Registry at "
                                          f"http://127.0.0.1:{port}"):
        register_model(metadata(), f"http://127.0.0.1:{port}", pvc_name=PVC, timeout_s=5,
                       log=lambda _: None)


def test_a_pushed_model_is_registered_where_it_was_pushed(registry):
    hf, _ = register(registry, metadata(destinations=["hf://org/tuned@0123abcd"]),
                     version="hf")
    # KServe's hf://<owner>/<model>:<revision> (kserve_storage.py, Storage._download_hf).
    assert hf.uri == "hf://org/tuned:0123abcd"
    s3, _ = register(registry, metadata(fingerprint="fp-3", destinations=[
        "s3://bucket/models/Llama-3.2-1B-finetuned-0b6f1a52"]), version="s3")
    assert s3.uri == "s3://bucket/models/Llama-3.2-1B-finetuned-0b6f1a52"
    local, _ = register(registry, metadata(fingerprint="fp-4"), version="local", pvc_name="")
    assert local.uri == f"file://{EXPORT}"


@pytest.mark.parametrize("url", ["model-registry:8080", "ftp://h", "http://h:8080/api/x",
                                 "https://user:pw@h"])
def test_a_bad_registry_url_is_refused_before_any_call(url):
    with pytest.raises(ConfigError, match="registry_url"):
        check_server(url)


def test_properties_leave_out_what_the_registry_cannot_hold():
    props = registry_properties(metadata(final_loss=float("nan"), eval_perplexity=3.5))
    assert "final_loss" not in props and props["eval_perplexity"] == 3.5
    assert "hyperparameters.max_seq_len" not in props  # None: not set
    assert all(isinstance(v, (bool, int, float, str)) for v in props.values())


def test_the_stand_in_refuses_a_body_the_registry_schema_refuses(registry):
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{registry.url}{api_prefix()}/model_versions", method="POST",
        data=json.dumps({"name": "v"}).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:  # registeredModelId is required
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 400


def test_the_component_registers_from_the_export_artifact(registry, tmp_path):
    from kfp import dsl

    from kfp_finetune.components.register_model import register_model as component

    model = dsl.Model(name="model", uri=str(tmp_path / "model"), metadata=metadata())
    name, version, uri = component.python_func(model=model, registry_url=registry.url,
                                               pvc_name=PVC, timeout_s=10)
    assert (name, version) == ("Llama-3.2-1B-finetuned", "Llama-3.2-1B-finetuned-0b6f1a52")
    assert uri == f"pvc://{PVC}/output/Llama-3.2-1B-finetuned-0b6f1a52"
    assert registry.version_of(name, version) is not None


def test_kfp_local_runs_the_step_only_when_a_registry_is_set(registry, tmp_path):
    # A real kfp.local run (SubprocessRunner): the step takes the Model artifact of the task
    # before it, and dsl.If on the registry address leaves it out when that is empty.
    from kfp import dsl, local

    from kfp_finetune.components.register_model import register_model as component

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def exported(model: dsl.Output[dsl.Model]):
        open(model.path, "w").write("{}")
        model.metadata.update({"path": "/tmp/ws/output/m-finetuned-r1", "run_id": "r1",
                               "fingerprint": "fp", "base_model": "hf://o/m",
                               "destinations": ["s3://b/m-finetuned-r1"], "final_loss": 1.0})

    @dsl.pipeline(name="register-locally")
    def pipeline(registry_url: str = ""):
        export = exported()
        with dsl.If(registry_url != ""):
            component(model=export.outputs["model"], registry_url=registry_url, timeout_s=10)

    local.init(local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    pipeline(registry_url=registry.url)
    mv = registry.version_of("m-finetuned", "m-finetuned-r1")
    assert registry.artifacts_of(mv["id"])[0]["uri"] == "s3://b/m-finetuned-r1"
    calls = len(registry.calls)
    pipeline()
    assert len(registry.calls) == calls


def test_the_step_also_runs_from_inside_a_running_event_loop(registry):
    # As in a notebook: the client's calls must not need the caller's loop.
    import asyncio

    async def inside():
        return register(registry)

    result, _ = asyncio.run(inside())
    assert registry.version_of(result.name, result.version) is not None


@pytest.mark.slow
def test_a_real_export_is_registered_and_gets_its_manifest(tiny, tmp_path, registry,
                                                           monkeypatch):
    # Real torchtune training of the tiny fixture (CPU, one epoch), the export step, then
    # both hand-off steps on its summary, as the components get it from the Model artifact.
    import yaml

    from kfp_finetune.config.types import TorchTuneConfig, TorchTuneInstructDataset
    from kfp_finetune.steps import fine_tune as finetune
    from kfp_finetune.steps import serving_manifest as sm
    from kfp_finetune.steps.dataset_initializer import initialize_dataset
    from kfp_finetune.steps.export_model import export_model
    from kfp_finetune.steps.model_initializer import initialize_model

    quiet = lambda _: None  # noqa: E731
    runtime = "torchtune-llama3.2-tiny"
    config = TorchTuneConfig(epochs=1, batch_size=8, resources_per_node={"gpu": 0})
    ws = tmp_path / "ws"
    initialize_dataset(ws, str(tiny["alpaca"] / "data"), TorchTuneInstructDataset(),
                             log=quiet)
    initialize_model(ws, str(tiny["llama3_2"]), runtime, config, log=quiet)
    finetune.run_fine_tune(ws, runtime, config, log=quiet)
    summary = export_model(ws, runtime, run_id=RUN_ID, log=quiet)
    meta = {**summary.metadata, "destinations": summary.destinations}

    result = register_model(meta, registry.url, pvc_name=PVC, workspace_root=str(ws),
                            namespace="team-ml", timeout_s=10, log=quiet)
    folder = Path(summary.path).name
    assert result.uri == f"pvc://{PVC}/output/{folder}" and result.version == folder
    props = registry.plain(registry.version_of(result.name, result.version)["customProperties"])
    assert props["final_loss"] == pytest.approx(summary.metadata["final_loss"])
    assert props["fingerprint"] == summary.metadata["fingerprint"]
    assert props["hyperparameters.batch_size"] == 8 and props["hyperparameters.epochs"] == 1

    monkeypatch.setattr(sm, "SA_NAMESPACE", tmp_path / "absent")
    manifest, _ = sm.serving_manifest(meta, pvc_name=PVC, workspace_root=str(ws),
                                      namespace="team-ml", gpus=0, log=quiet)
    isvc = yaml.safe_load(sm.to_yaml(manifest))
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == result.uri
    assert isvc["metadata"]["name"] == folder.lower().replace(".", "-").replace("_", "-")
    # What KServe will load from that folder: a Hugging Face model (config + weights).
    assert (Path(summary.path) / "config.json").is_file()
    assert list(Path(summary.path).glob("*.safetensors"))


def test_an_https_registry_without_any_token_is_refused_before_a_call(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    if Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists():
        pytest.skip("this machine has a service-account token, which the client would use")
    with pytest.raises(ConfigError, match=f"user token must be provided.*{TOKEN_ENV}"):
        register_model(metadata(), "https://127.0.0.1:1", pvc_name=PVC, timeout_s=2,
                       log=lambda _: None)
