"""The benchmark step: lm-eval tasks on an exported model, offline, scores as KFP Metrics.

A small multiple-choice task and a loglikelihood task are written by the tests (task YAML +
local JSONL rows) and run with real lm-eval on the tiny fixture model and on a real LoRA export
(trained here on CPU). Argument checks run without loading lm-eval's task index or a model.
"""

import json
import math
import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from kfp_finetune.errors import ConfigError, ModelError
from kfp_finetune.steps import benchmark as bench
from kfp_finetune.steps.benchmark import (
    metrics_from_results,
    offline,
    plan_benchmark,
    run_benchmark,
)

ROOT = Path(__file__).resolve().parents[2]
QUIET = lambda _: None  # noqa: E731

MC_ROWS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " Oslo"], "label": 0},
    {"question": "Two plus two is", "choices": [" four", " seven"], "label": 0},
    {"question": "The colour of the clear sky is", "choices": [" green", " blue"], "label": 1},
    {"question": "Ice is made of", "choices": [" sand", " water", " iron"], "label": 1},
    {"question": "A week has", "choices": [" seven days", " two days"], "label": 0},
    {"question": "Fish live in", "choices": [" trees", " water"], "label": 1},
]
LL_ROWS = [{"context": "Name the capital. Italy:", "target": " Rome"},
           {"context": "Name the capital. Spain:", "target": " Madrid"},
           {"context": "Name the capital. Peru:", "target": " Lima"}]


def write_tasks(folder: Path) -> dict[str, Path]:
    """Two lm-eval task YAMLs over local JSONL files (lm-eval's `dataset_path: json` loader)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (folder / "ll.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LL_ROWS))
    mc = {
        "task": "tiny_mc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "mc.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }
    ll = {
        "task": "tiny_ll", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "ll.jsonl")}},
        "test_split": "test", "output_type": "loglikelihood",
        "doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                         "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    paths = {"tiny_mc": folder / "tiny_mc.yaml", "tiny_ll": folder / "tiny_ll.yaml"}
    paths["tiny_mc"].write_text(yaml.safe_dump(mc))
    paths["tiny_ll"].write_text(yaml.safe_dump(ll))
    return paths


def check_scores(metrics: dict[str, float]) -> None:
    assert {"tiny_mc/acc", "tiny_mc/acc_norm", "tiny_ll/acc", "tiny_ll/perplexity"} <= set(metrics)
    for name, value in metrics.items():
        assert math.isfinite(value), name
        if re.search(r"/acc(_norm)?$", name):
            assert 0.0 <= value <= 1.0, (name, value)
    assert metrics["tiny_ll/perplexity"] > 1.0  # an untrained byte-level model is unsure


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("batch_size", ["0", "-2", "auto:x", "auto:0", "big", 0, ""])
def test_bad_batch_size_is_named(batch_size):
    with pytest.raises(ConfigError, match=r"eval_lm_batch_size=.*'auto:N'"):
        plan_benchmark("hellaswag", batch_size=batch_size)


@pytest.mark.parametrize("limit", [-1, 1.5, float("nan"), float("inf"), "10", True])
def test_bad_limit_is_named(limit):
    with pytest.raises(ConfigError, match="eval_lm_limit="):
        plan_benchmark("hellaswag", limit=limit)


@pytest.mark.parametrize("num_fewshot", [-2, 1.5, True])
def test_bad_num_fewshot_is_named(num_fewshot):
    with pytest.raises(ConfigError, match="eval_lm_num_fewshot="):
        plan_benchmark("hellaswag", num_fewshot=num_fewshot)


def test_arguments_become_what_lm_eval_takes():
    plan = plan_benchmark(" arc_easy, hellaswag,arc_easy ,", limit=0, num_fewshot=-1,
                          batch_size="auto:4")
    # lm_eval.evaluator.simple_evaluate: limit None = every example, < 1.0 a fraction of them;
    # num_fewshot None = the task's own default; batch_size an int or "auto[:N]".
    assert plan.tasks == ("arc_easy", "hellaswag") and plan.include_paths == ()
    assert plan.limit is None and plan.num_fewshot is None and plan.batch_size == "auto:4"
    plan = plan_benchmark(["arc_easy"], limit=10.0, num_fewshot=0, batch_size="16")
    assert (plan.limit, plan.num_fewshot, plan.batch_size) == (10, 0, 16)
    assert isinstance(plan.limit, int) and plan_benchmark("a", limit=0.25).limit == 0.25


@pytest.mark.parametrize("tasks", ["", " , ", []])
def test_no_task_is_refused_with_how_to_find_one(tasks):
    with pytest.raises(ConfigError, match=r"eval_lm_tasks is empty.*lm-eval ls tasks"):
        plan_benchmark(tasks)


def test_task_yaml_path_gives_its_name_and_folder(tmp_path):
    paths = write_tasks(tmp_path / "tasks")
    plan = plan_benchmark(f"{paths['tiny_mc']},hellaswag")
    assert plan.tasks == ("tiny_mc", "hellaswag")
    assert plan.include_paths == (str((tmp_path / "tasks").resolve()),)
    # Relative paths are looked up under base_dir (the component passes the workspace).
    plan = plan_benchmark("tasks/tiny_ll.yaml", include_path="tasks", base_dir=tmp_path)
    assert plan.tasks == ("tiny_ll",) and len(plan.include_paths) == 1


def test_task_yaml_with_lm_evals_function_tags_is_read(tmp_path):
    # lm-eval's task YAMLs use `!function utils.process_docs` (lm_eval/tasks/*/**.yaml).
    path = tmp_path / "t.yml"
    path.write_text("task: with_tags\nprocess_docs: !function utils.process_docs\n")
    assert plan_benchmark(str(path)).tasks == ("with_tags",)
    group = tmp_path / "g.yaml"
    group.write_text("group: my_group\ntask:\n  - with_tags\n")
    assert plan_benchmark(str(group)).tasks == ("my_group",)


@pytest.mark.parametrize(("text", "match"), [
    ("dataset_path: json\n", "has no 'task:' name"),
    ("task: [unclosed\n", "cannot be read as YAML"),
])
def test_bad_task_yaml_is_named(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        plan_benchmark(str(path))
    assert str(path) in str(info.value)


def test_missing_task_file_and_include_folder_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"eval_lm_tasks file '.*nope.yaml' does not exist"):
        plan_benchmark(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"eval_lm_include_path 'missing' is not a folder"):
        plan_benchmark("hellaswag", include_path="missing", base_dir=tmp_path)


def test_a_folder_without_a_model_is_refused_before_lm_eval(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"model_path=.*not a Hugging Face model folder"):
        run_benchmark(tmp_path, plan_benchmark("hellaswag"), log=QUIET)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "gpu", "tpu"])
def test_a_device_that_is_not_here_is_refused_before_lm_eval(tiny, device):
    # No GPU on these machines (a cluster's GPU node is what cannot exist here): "cuda" must
    # fail with the cause, not fall back to CPU for hours of a large model.
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is visible: cuda is usable here")
    with pytest.raises(ConfigError, match=rf"device='{device}' is not usable here"):
        run_benchmark(tiny["llama3_2"], plan_benchmark("hellaswag"), device=device, log=QUIET)


def test_scores_are_named_task_metric_and_filter():
    # lm_eval/evaluator.py keys each score "<metric>,<filter>" ("none" when no filter applied);
    # a stderr lm-eval could not compute is the string "N/A" (lm_eval/api/metrics.py).
    metrics, skipped = metrics_from_results({
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1,
                     "sample_len": 10},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"},
        "odd": {"word_perplexity,none": float("nan")},
    })
    assert metrics == {"arc_easy/acc": 0.5, "arc_easy/acc_stderr": 0.1,
                       "gsm8k/exact_match/strict-match": 0.25}
    assert skipped == ["gsm8k/exact_match_stderr/strict-match", "odd/word_perplexity"]


def test_offline_sets_the_variables_and_the_flags_read_at_import(monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    before = hub.HF_HUB_OFFLINE
    with offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert hub.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert hub.HF_HUB_OFFLINE == before
    with offline(False):
        assert "HF_HUB_OFFLINE" not in os.environ


def test_lm_eval_pin_is_one_version_everywhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pin = f"lm-eval[hf]=={bench.LM_EVAL_VERSION}"
    assert project["optional-dependencies"]["eval"] == [pin]
    assert pin in project["optional-dependencies"]["test"]
    # The benchmark component runs in the trainer image (components/benchmark_model).
    assert f'"{pin}"' in (ROOT / "images" / "trainer" / "Dockerfile").read_text()
    from importlib.metadata import version

    assert version("lm_eval") == bench.LM_EVAL_VERSION


def test_component_compiles_after_an_export_under_a_condition(tmp_path):
    """As the pipeline wires it: after export, skipped when no task is given (dsl.If)."""
    from kfp import compiler

    from kfp_finetune.components.benchmark_model import benchmark_model
    from kfp_finetune.config.images import TRAINER_IMAGE

    spec = benchmark_model.component_spec
    assert spec.implementation.container.image == TRAINER_IMAGE
    assert set(spec.outputs) == {"metrics", "results"}

    @dsl.pipeline(name="bench-only")
    def bench_only(model_path: str = "/workspace/output/m", eval_lm_tasks: str = "",
                   eval_lm_limit: float = 0.0):
        with dsl.If(eval_lm_tasks != "", name="benchmark-requested"):
            benchmark_model(model_path=model_path, tasks=eval_lm_tasks, limit=eval_lm_limit)

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(bench_only, str(out))
    doc = yaml.safe_load(out.read_text())
    executor = doc["deploymentSpec"]["executors"]["exec-benchmark-model"]["container"]
    assert executor["image"] == TRAINER_IMAGE and "pip install" not in " ".join(executor["command"])
    params = doc["components"]["comp-benchmark-model"]["inputDefinitions"]["parameters"]
    assert params["limit"]["parameterType"] == "NUMBER_DOUBLE"
    assert params["batch_size"]["defaultValue"] == "auto"


# --------------------------------------------------------------------------- real lm-eval runs


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, Path]:
    return write_tasks(tmp_path_factory.mktemp("lm-tasks"))


def test_local_tasks_run_offline_on_the_tiny_model(tiny, tasks, tmp_path, monkeypatch):
    sentinel = "hf_SENTINELlmevalTOKEN0123456789"
    monkeypatch.setenv("HF_TOKEN", sentinel)  # never in the results, logs or metrics
    hub_offline = os.environ.get("HF_HUB_OFFLINE")
    plan = plan_benchmark(f"{tasks['tiny_mc']},{tasks['tiny_ll']}", batch_size="auto")
    lines: list[str] = []
    result = run_benchmark(tiny["llama3_2"], plan, results_file=tmp_path / "r" / "results.json",
                           device="auto", log=lines.append)
    assert result.offline and not result.skipped
    check_scores(result.metrics)
    text = (tmp_path / "r" / "results.json").read_text()
    assert sentinel not in text and sentinel not in "\n".join(lines)
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the results JSON"))
    assert saved == result.results and "samples" not in saved
    assert saved["results"]["tiny_mc"]["acc,none"] == result.metrics["tiny_mc/acc"]
    assert saved["n-samples"]["tiny_mc"]["effective"] == len(MC_ROWS)
    assert saved["config"]["batch_size"] == bench.CPU_BATCH_SIZE  # "auto" on CPU
    assert any("offline" in line for line in lines)
    assert not list((tmp_path / "r").glob(".*tmp")), "no staging file left behind"
    assert os.environ.get("HF_HUB_OFFLINE") == hub_offline  # restored after the run


@pytest.mark.slow
def test_unknown_task_is_refused_before_the_model_loads(tiny, tasks, monkeypatch):
    """~15 s of CPU: a name not found locally makes lm-eval index its ~15,000 own tasks."""
    import lm_eval

    def model_load(*args, **kwargs):  # tripwire: the model must never be loaded
        raise AssertionError("simple_evaluate was called")

    monkeypatch.setattr(lm_eval, "simple_evaluate", model_load)
    # Names are exact: a glob (which lm-eval's CLI expands, simple_evaluate does not) is unknown.
    plan = plan_benchmark(f"arc_eassy,tiny_m*,{tasks['tiny_mc']}")
    with pytest.raises(ConfigError) as info:
        run_benchmark(tiny["llama3_2"], plan, log=QUIET)
    message = str(info.value)
    assert "['arc_eassy', 'tiny_m*']" in message and "arc_easy" in message  # a close match
    assert "lm-eval ls tasks" in message and "tiny_mc" not in message.split("Close")[0]


@pytest.mark.slow
def test_component_on_a_real_lora_export(tiny, tasks, tmp_path):
    """Trains LoRA on the tiny Llama (CPU), exports it, and runs the component's body on it."""
    from kfp_finetune.components.benchmark_model import benchmark_model
    from kfp_finetune.config.types import LoraConfig, TorchTuneConfig, TorchTuneInstructDataset
    from kfp_finetune.steps import fine_tune as finetune
    from kfp_finetune.steps.dataset_initializer import initialize_dataset
    from kfp_finetune.steps.export_model import export_model
    from kfp_finetune.steps.model_initializer import initialize_model

    ws, runtime = tmp_path / "ws", "torchtune-llama3.2-tiny"
    config = TorchTuneConfig(epochs=1, batch_size=8, resources_per_node={"gpu": 0},
                             peft_config=LoraConfig())
    initialize_dataset(ws, str(tiny["alpaca"] / "data"), TorchTuneInstructDataset(),
                             log=QUIET)
    initialize_model(ws, str(tiny["llama3_2"]), runtime, config, log=QUIET)
    finetune.run_fine_tune(ws, runtime, config, log=QUIET)
    export = export_model(ws, runtime, run_id="bench-1", log=QUIET)
    assert export.adapter_path  # a LoRA export: the merged model on top, the adapter inside

    # Tasks given relative to the workspace, as a user on the cluster would.
    task_dir = ws / "eval-tasks"
    write_tasks(task_dir)
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"), metadata={})
    results = dsl.Artifact(name="results", uri=str(tmp_path / "results.json"), metadata={})
    benchmark_model.python_func(
        model_path=export.path, tasks="eval-tasks/tiny_mc.yaml,eval-tasks/tiny_ll.yaml",
        metrics=metrics, results=results, workspace_path=str(ws), limit=4.0, num_fewshot=1,
        batch_size="2", device="cpu",
    )
    check_scores(metrics.metadata)
    saved = json.loads(Path(results.path).read_text())
    assert saved["n-shot"] == {"tiny_mc": 1, "tiny_ll": 1}
    assert saved["n-samples"]["tiny_mc"]["effective"] == 4
    assert saved["config"]["model_args"]["pretrained"] == export.path
    assert results.metadata["tasks"] == ["tiny_mc", "tiny_ll"] and results.metadata["offline"]


@pytest.mark.slow
def test_component_as_a_kfp_local_task(tiny, tasks, tmp_path):
    """The component as KFP runs it: a subprocess of the KFP executor (kfp.local, this venv)."""
    from kfp import local

    from kfp_finetune.components.benchmark_model import benchmark_model

    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp_path / "root"), raise_on_error=True)
    task = benchmark_model(model_path=str(tiny["llama3_2"]),
                           tasks=f"{tasks['tiny_mc']},{tasks['tiny_ll']}", limit=3.0)
    check_scores(task.outputs["metrics"].metadata)
    saved = json.loads(Path(task.outputs["results"].path).read_text())
    assert saved["n-samples"]["tiny_ll"]["effective"] == 3
    assert task.outputs["results"].metadata["offline"] is True
