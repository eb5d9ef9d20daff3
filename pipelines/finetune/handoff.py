"""After export: benchmark, register and serve the model, each only when its setting is set.

``add_after_export`` adds the optional tasks after the export task from the pipeline's own
``eval_lm_*``, ``registry_*`` and ``serve_*`` parameters.

* On a cluster the three tasks are always in the run and do nothing (a line saying so) while
  their setting (``eval_lm_tasks``, ``registry_url``, ``serve_name``) is empty. They are not
  under ``dsl.If``: they sit in the exit handler's group, and the backend records that group's
  final state from its tasks' launchers (backend/src/v2/metadata/client.go:
  UpdateDAGExecutionsState), which a condition left unrun would leave stale, and the exit task
  decides on the volume from that state. A skipped benchmark asks for no GPU (check-config
  hands it empty accelerator strings and 100m/256Mi).
* A local run (kfp.local) adds only the tasks whose setting it was given.

register-model and serve-model take the export task's ``Model`` artifact (its metadata: where
the model is), so they do not mount the volume; the benchmark reads the exported folder there.
"""

from dataclasses import dataclass
from typing import Any

from kfp import dsl, kubernetes

from kfp_finetune.components.benchmark_model import benchmark_model
from kfp_finetune.components.register_model import register_model
from kfp_finetune.components.serve_model import serve_model
from kfp_finetune.steps.register_model import TOKEN_ENV
from kfp_finetune.storage.workspace import WORKSPACE_MOUNT

# A few seconds of HTTP calls each.
HANDOFF_CPU_REQUEST = "100m"
HANDOFF_MEMORY_REQUEST = "256Mi"
HANDOFF_TIMEOUT_S = 1800
# Each optional task's inputs: component input -> pipeline parameter (or a constant default).
REGISTER_INPUTS = {"registry_url": "registry_url", "model_name": "registry_model_name",
                   "version": "registry_version", "author": "registry_author"}
SERVE_INPUTS = {"name": "serve_name", "namespace": "serve_namespace", "apply": "serve_apply",
                "gpus": "serve_gpus", "cpu": "serve_cpu", "memory": "serve_memory",
                "max_model_len": "serve_max_model_len", "runtime": "serve_runtime",
                "service_account": "serve_service_account"}
BENCH_INPUTS = {"tasks": "eval_lm_tasks", "include_path": "eval_lm_include_path",
                "limit": "eval_lm_limit", "num_fewshot": "eval_lm_num_fewshot",
                "batch_size": "eval_lm_batch_size"}


@dataclass(frozen=True)
class AfterExport:
    """The optional tasks that were added (None: left out of a local run)."""

    bench: dsl.PipelineTask | None = None
    register: dsl.PipelineTask | None = None
    serve: dsl.PipelineTask | None = None


def _inputs(names: dict[str, str], values: dict[str, Any]) -> dict[str, Any]:
    return {arg: values[param] for arg, param in names.items() if param in values}


def add_after_export(
    export: dsl.PipelineTask, values: dict[str, Any], *, pvc_name: Any = "",
    workspace: str = WORKSPACE_MOUNT, cluster: bool = True,
) -> AfterExport:
    """Add the benchmark, register-model and serve-model tasks after ``export``.

    Args:
        export: The export task (its ``model`` and ``path`` outputs).
        values: The pipeline's parameters (channels) by name.
        pvc_name: The workspace volume's name (check-config's ``pvc_name``; "" locally).
        workspace: Where the tasks mount the workspace.
        cluster: Compiling for a cluster (all three tasks); False for kfp.local (only those
            whose setting the run gives).
    """
    bench = register = serve = None
    if cluster or "eval_lm_tasks" in values:
        bench = benchmark_model(model_path=export.outputs["path"], workspace_path=workspace,
                                **_inputs(BENCH_INPUTS, values))
        bench.set_display_name("benchmark")
        bench.set_caching_options(False)  # it reads this run's export
    if cluster or "registry_url" in values:
        register = register_model(
            model=export.outputs["model"], pvc_name=pvc_name, workspace_path=workspace,
            **_inputs(REGISTER_INPUTS, values))
        register.set_display_name("register-model")
        register.set_caching_options(False)  # it writes to a registry
    if cluster or "serve_name" in values:
        serve = serve_model(
            model=export.outputs["model"], pvc_name=pvc_name, workspace_path=workspace,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, **_inputs(SERVE_INPUTS, values))
        serve.set_display_name("serve-model")
        serve.set_caching_options(False)  # it may change the cluster
    if cluster:
        kubernetes.use_secret_as_env(
            register, secret_name=values["secret_registry_token"],
            secret_key_to_env={TOKEN_ENV: TOKEN_ENV}, optional=True)
        for task in (register, serve):
            task.set_cpu_request(HANDOFF_CPU_REQUEST).set_memory_request(HANDOFF_MEMORY_REQUEST)
            kubernetes.set_timeout(task, HANDOFF_TIMEOUT_S)
    return AfterExport(bench, register, serve)
