"""Each component folder's habits: README and metadata.yaml current, and its python_func called.

kubeflow/pipelines-components keeps, per component folder, a generated README
(scripts/generate_readme), a metadata.yaml checked by scripts/validate_metadata/
validate_metadata.py, and a unit test calling the component's ``python_func`` directly
(components/*/tests/test_component_unit.py). Here the calls are fast: each takes a path that
returns at once but is the component's real code (a skip, a refusal before any work, a
re-run that finds its work done, or, for the CPU steps on the tiny fixtures, the work itself).
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from kfp_finetune.config.run_config import RunConfig
from kfp_finetune.drivers import component_docs as docs
from kfp_finetune.errors import ConfigError, KfpFinetuneError

TINY = "torchtune-llama3.2-tiny"
NAMES = docs.component_names()


def _out(kind, tmp_path: Path, name: str):
    return kind(name=name, uri=str(tmp_path / name), metadata={})


# --- README and metadata.yaml ------------------------------------------------------------

def test_every_component_folder_is_listed() -> None:
    assert NAMES == ["benchmark_model", "check_config", "cleanup_workspace", "create_workspace",
                     "dataset_initializer", "export_model", "fine_tune", "model_initializer",
                     "register_model", "serve_model", "tokenize_dataset"]


@pytest.mark.parametrize("name", NAMES)
def test_metadata_follows_the_schema_and_the_pins(name: str) -> None:
    path = docs.COMPONENTS_DIR / name / "metadata.yaml"
    assert path.exists(), f"{path} is missing"
    assert docs.check_metadata(name, yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize("name", NAMES)
def test_readme_is_current(name: str) -> None:
    readme = docs.COMPONENTS_DIR / name / "README.md"
    assert readme.exists(), f"{readme} is missing: run `kfp-finetune compile`"
    assert readme.read_text() == docs.render_readme(name), f"{readme} is stale"


def test_the_readme_tables_come_from_the_spec() -> None:
    text = docs.render_readme("fine_tune")
    assert "| `config` | Dict | required | The run's validated config" in text
    assert "| `workspace_path` | String | `'/workspace'` |" in text
    assert "| `loss_curve` | HTML |" in text and "| `final_loss` | Float |" in text
    assert "- Kubeflow: Pipelines >=2.15.0, Pipelines SDK ==2.17.3" in text
    check = docs.render_readme("check_config")  # built from the whole parameter table
    assert "| `runtime` | String | required |" in check
    assert "| `train_learning_rate` | Float | (unset) |" in check


def _good() -> dict:
    return yaml.safe_load((docs.COMPONENTS_DIR / "fine_tune" / "metadata.yaml").read_text())


@pytest.mark.parametrize(("change", "needle"), [
    (lambda m: m.update(stability="gamma"), "stability 'gamma'; expected one of"),
    (lambda m: m.update(name="other"), "expected the folder name 'fine_tune'"),
    (lambda m: m.pop("lastVerified"), "expected ['name', 'stability', 'dependencies', "),
    (lambda m: m.update(lastVerified="2026-01-01"), "lastVerified '2026-01-01'"),
    (lambda m: m.update(lastVerified=datetime(2020, 1, 1, tzinfo=timezone.utc)),
     "not within the past year"),
    (lambda m: m["dependencies"]["kubeflow"][0].update(version=">=2.5.0"),
     "Pipelines version '>=2.5.0'; expected '>=2.15.0'"),
    (lambda m: m["dependencies"]["kubeflow"].pop(1), "lacks 'Pipelines SDK'"),
    (lambda m: m.update(tags="gpu"), "expected a list of strings"),
])
def test_metadata_off_the_schema_is_named(change, needle: str) -> None:
    meta = _good()
    change(meta)
    problems = docs.check_metadata("fine_tune", meta)
    assert any(needle in p for p in problems), problems


def test_the_createpvc_op_states_the_kfp_kubernetes_pin() -> None:
    path = docs.COMPONENTS_DIR / "create_workspace" / "metadata.yaml"
    meta = yaml.safe_load(path.read_text())
    meta["dependencies"]["kubeflow"].pop()
    assert docs.check_metadata("create_workspace", meta) == [
        "components/create_workspace/metadata.yaml: dependencies.kubeflow lacks "
        "'Pipelines Kubernetes SDK' (kfp-kubernetes)"]


def test_check_lists_a_missing_metadata_and_a_stale_readme(tmp_path: Path) -> None:
    for name in ("fine_tune", "export_model"):
        shutil.copytree(docs.COMPONENTS_DIR / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "export_model" / "metadata.yaml").unlink()
    (tmp_path / "fine_tune" / "README.md").write_text("# fine_tune\nold\n")
    problems = docs.update_component_docs(tmp_path, check=True)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "missing (see another component's for the fields)",
        "missing or stale (run `kfp-finetune compile`)"]
    assert docs.update_component_docs(tmp_path) == [
        "components/export_model/metadata.yaml: missing (see another component's for the fields)"]
    assert (tmp_path / "fine_tune" / "README.md").read_text() == docs.render_readme("fine_tune")


# --- python_func of each component -------------------------------------------------------

def test_create_workspace_is_kfp_kubernetes_createpvc() -> None:
    # No python_func: CreatePVC is a platform component the KFP backend runs itself
    # (kfp-kubernetes, kubernetes/python/kfp/kubernetes/volume.py: CreatePVC); its spec is checked.
    from kfp import kubernetes

    from kfp_finetune.components.create_workspace import create_workspace

    assert create_workspace is kubernetes.CreatePVC
    assert not hasattr(create_workspace, "python_func")
    spec = create_workspace.component_spec
    assert {"access_modes", "size", "storage_class_name", "pvc_name_suffix"} <= set(spec.inputs)
    assert set(spec.outputs) == {"name"}


def test_check_config_returns_the_run_config() -> None:
    from kfp_finetune.components.check_config import build_check_config
    from kfp_finetune.config.parameters import PARAMETERS

    func = build_check_config(PARAMETERS).python_func
    out = func(runtime=TINY, data_uri="/data/alpaca", model_uri="/models/tiny")
    assert RunConfig.from_dict(out[0]).dataset_uri == "/data/alpaca"
    assert out[1:] == ("", "", "", "", "", {}, "", "", "", "")  # local run: no resources
    with pytest.raises(ConfigError, match="batch_size=0"):
        func(runtime=TINY, data_uri="/data/alpaca", model_uri="/models/tiny", train_batch_size=0)


def test_cleanup_workspace_keeps_a_failed_runs_volume_when_asked() -> None:
    from kfp_finetune.components.cleanup_workspace import cleanup_workspace

    status = dsl.PipelineTaskFinalStatus(state="FAILED", pipeline_job_resource_name="r",
                                         pipeline_task_name="t", error_code=1,
                                         error_message="boom")
    assert cleanup_workspace.python_func(status=status, run_id="abc",
                                         keep_workspace_on_failure=True) == "kept"
    with pytest.raises(ConfigError, match="no Kubernetes API here"):  # a delete needs a pod
        cleanup_workspace.python_func(status=status, run_id="abc")


@pytest.fixture(scope="module")
def fetched(tiny, tmp_path_factory) -> tuple[Path, dict]:
    """A workspace whose dataset and model the two initializers fetched from the fixtures."""
    from kfp_finetune.components.dataset_initializer import dataset_initializer
    from kfp_finetune.components.model_initializer import model_initializer

    tmp = tmp_path_factory.mktemp("components")
    ws = tmp / "ws"
    config = RunConfig(runtime=TINY, dataset_uri=str(tiny["alpaca"]),
                       model_uri=str(tiny["llama3_2"])).to_dict()
    data = dataset_initializer.python_func(config=config, metrics=_out(dsl.Metrics, tmp, "dm"),
                                           workspace_path=str(ws))
    model = model_initializer.python_func(config=config, metrics=_out(dsl.Metrics, tmp, "mm"),
                                          workspace_path=str(ws))
    return ws, {"config": config, "data": data, "model": model}


def test_the_initializers_fetch_and_check_the_fixtures(fetched, tmp_path: Path) -> None:
    from kfp_finetune.components.dataset_initializer import dataset_initializer

    ws, got = fetched
    rows, columns, _, files, _, _, _, skipped = got["data"]
    assert rows > 0 and "instruction" in columns and files > 0 and skipped is False
    recipe, _, weight_files, *_, model_skipped = got["model"]
    assert recipe == "full_finetune_single_device" and weight_files == 1 and not model_skipped
    metrics = _out(dsl.Metrics, tmp_path, "again")
    again = dataset_initializer.python_func(config=got["config"], metrics=metrics,
                                            workspace_path=str(ws))
    assert again[-1] is True and metrics.metadata["source"]  # the re-run finds its copy


def test_tokenize_dataset_tokenizes_the_fetched_fixture_then_skips(fetched, tmp_path) -> None:
    from kfp_finetune.components.tokenize_dataset import tokenize_dataset

    ws, got = fetched
    metrics = _out(dsl.Metrics, tmp_path, "m")
    first = tokenize_dataset.python_func(config=got["config"], metrics=metrics,
                                         workspace_path=str(ws), num_workers=1)
    rows, _, _, _, _, skipped = first
    assert rows == got["data"][0] and skipped is False
    again = tokenize_dataset.python_func(config=got["config"],
                                         metrics=_out(dsl.Metrics, tmp_path, "m2"),
                                         workspace_path=str(ws), num_workers=1)
    assert again[0] == rows and again[-1] is True  # the re-run finds its store complete
    with pytest.raises(KfpFinetuneError, match="no finished dataset-initializer output"):
        tokenize_dataset.python_func(config=got["config"], metrics=_out(dsl.Metrics, tmp_path, "e"),
                                     workspace_path=str(tmp_path / "empty"), num_workers=1)


def test_fine_tune_without_the_fetched_model_refuses_before_tune_run(tmp_path: Path) -> None:
    from kfp_finetune.components.fine_tune import fine_tune

    config = RunConfig(runtime=TINY, dataset_uri="/data").to_dict()
    with pytest.raises(KfpFinetuneError, match="no finished dataset-initializer output"):
        fine_tune.python_func(config=config, metrics=_out(dsl.Metrics, tmp_path, "m"),
                              loss_curve=_out(dsl.HTML, tmp_path, "c"),
                              workspace_path=str(tmp_path / "ws"))
    assert not (tmp_path / "c").exists()  # no chart of a run that did not happen


def test_fine_tune_asking_for_a_gpu_on_a_cpu_node_refuses_at_once(fetched, tmp_path) -> None:
    import torch

    from kfp_finetune.components.fine_tune import fine_tune
    from kfp_finetune.config.types import TorchTuneConfig

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for a node without one")
    ws, got = fetched
    config = RunConfig.from_dict(got["config"])
    config.trainer = TorchTuneConfig(resources_per_node={"gpu": 1})
    with pytest.raises(KfpFinetuneError, match="sees no GPU"):
        fine_tune.python_func(config=config.to_dict(), metrics=_out(dsl.Metrics, tmp_path, "m"),
                              loss_curve=_out(dsl.HTML, tmp_path, "c"), workspace_path=str(ws))
    assert not (ws / "output").exists()  # nothing started


def test_export_model_without_a_checkpoint_refuses(tmp_path: Path) -> None:
    from kfp_finetune.components.export_model import export_model

    config = RunConfig(runtime=TINY, dataset_uri="/data").to_dict()
    with pytest.raises(KfpFinetuneError, match="checkpoint"):
        export_model.python_func(config=config, model=_out(dsl.Model, tmp_path, "model"),
                                 workspace_path=str(tmp_path / "ws"), run_id="abc")
    assert not (tmp_path / "model").exists()


def test_benchmark_model_skips_without_tasks_and_names_a_bad_limit(tmp_path: Path) -> None:
    from kfp_finetune.components.benchmark_model import benchmark_model

    results = _out(dsl.Artifact, tmp_path, "results")
    assert benchmark_model.python_func(model_path="/nowhere", tasks=" ",
                                       metrics=_out(dsl.Metrics, tmp_path, "m"),
                                       results=results) is None
    assert (tmp_path / "results").read_text() == "{}"
    with pytest.raises(ConfigError, match="-1"):
        benchmark_model.python_func(model_path="/nowhere", tasks="arc_easy", limit=-1.0,
                                    metrics=_out(dsl.Metrics, tmp_path, "m2"),
                                    results=_out(dsl.Artifact, tmp_path, "r2"),
                                    workspace_path=str(tmp_path))


def _exported(tmp_path: Path) -> dsl.Model:
    path = "/workspace/output/tuned-abc"
    return dsl.Model(name="model", uri=str(tmp_path / "model"),
                     metadata={"path": path, "adapter_path": f"{path}/adapter", "lora": True,
                               "destinations": ["s3://bucket/tuned"], "run_id": "abc"})


def test_register_model_skips_without_a_registry_and_refuses_a_bad_url(tmp_path) -> None:
    from kfp_finetune.components.register_model import register_model

    assert register_model.python_func(model=_exported(tmp_path), registry_url="") == ("", "", "")
    with pytest.raises(ConfigError, match="ftp://registry"):
        register_model.python_func(model=_exported(tmp_path), registry_url="ftp://registry")


def test_serve_model_writes_the_manifest_without_applying_it(tmp_path: Path) -> None:
    from kfp_finetune.components.serve_model import serve_model

    out = _out(dsl.Artifact, tmp_path, "isvc.yaml")
    name, uri, applied = serve_model.python_func(model=_exported(tmp_path),
                                                 serving_manifest=out, name="tuned",
                                                 namespace="team-ml", run_id="abc", gpus=0)
    assert (name, uri, applied) == ("tuned", "s3://bucket/tuned", "not applied")
    manifest = yaml.safe_load((tmp_path / "isvc.yaml").read_text())
    assert manifest["kind"] == "InferenceService"
    assert out.metadata["storage_uri"] == "s3://bucket/tuned"
