"""The fine-tuning pipeline: one definition, compiled for a cluster or run locally.

On a cluster::

    check-config ─> create-workspace (PVC) ─┬─> dataset-initializer ─┐
                                            └─> model-initializer  ──┴─> tokenize-dataset
                                                                 ─> fine-tune (GPU) ─> export
    cleanup-workspace: exit task, runs whatever the outcome of the five tasks above

Every task from dataset-initializer on mounts the PVC at /workspace. Locally (``kfp.local``)
check-config and the same five components run in the same order on a local folder instead of
the PVC, and the cluster-only parts (the PVC, the exit task, the Kubernetes settings) are left
out (kfp.local cannot create PVCs, ignores Kubernetes settings and has no exit handlers).

The parameters come from one table (``kfp_finetune.config.parameters``): the signature and
docstring (the run form) are built from it, and so is check-config's. check-config turns them
into one validated config (a dict output); the other tasks take that config and nothing else
of the run form. A local pipeline has only the parameters the run sets (kfp.local needs a
value for every parameter without a default, kfp/local/orchestrator/orchestrator_utils.py
join_user_inputs_and_defaults, refuses None as a constant, and an absent Optional[int]
component input fails kfp/local/executor_input_utils.py executor_input_to_dict).

Operations (cluster only, see ``cluster.py``: ``cluster_prelude``, ``apply_cluster_settings``):
check-config refuses bad operations parameters on CPU and hands on validated strings; one new
PVC per run, named ``kfp-finetune-<run id>`` and annotated with the pipeline, run id and run
name; the exit task deletes it after a failure (unless ``keep_workspace_on_failure``) and after
a success only with ``delete_workspace`` and ``push_to`` (see kfp_finetune.steps.cleanup_workspace);
caching off on every task (they all write to the per-run volume or push elsewhere); the
fine-tune task gets the accelerator type and count and its CPU and memory requests from
check-config's string outputs, node selector and tolerations (JSON parameters), an in-memory
/dev/shm and a timeout; the initializers, fine-tune and export retry. The KFP backend this
needs is ``kfp_finetune.drivers.backend.MIN_BACKEND`` or newer.
"""



import dataclasses
import inspect
from collections.abc import Callable, Collection
from typing import Any, Optional

from kfp import dsl

from kfp_finetune.components.check_config import build_check_config
from kfp_finetune.components.dataset_initializer import dataset_initializer
from kfp_finetune.components.export_model import export_model
from kfp_finetune.components.fine_tune import fine_tune
from kfp_finetune.components.model_initializer import model_initializer
from kfp_finetune.components.tokenize_dataset import tokenize_dataset
from kfp_finetune.config.parameters import PARAMETERS, Param
from kfp_finetune.config.runtimes import RuntimeSpec, get_runtime
from kfp_finetune.pipelines.finetune.cluster import (
    Tasks,
    apply_cluster_settings,
    cluster_prelude,
    ops_defaults,
)
from kfp_finetune.pipelines.finetune.handoff import add_after_export
from kfp_finetune.storage.workspace import WORKSPACE_MOUNT


def pipeline_name(runtime: RuntimeSpec) -> str:
    """KFP pipeline name of a runtime, e.g. ``kfp-finetune-torchtune-llama3-2-1b``."""
    return "kfp-finetune-" + runtime.name.replace(".", "-")


def pipeline_params(runtime: RuntimeSpec, given: Collection[str] | None = None) -> list[Param]:
    """The parameters of a runtime's pipeline: all (cluster) or the given ones (local)."""
    if given is None:
        return list(PARAMETERS)
    return [p for p in PARAMETERS if p.name in given and not p.cluster_only]


def _signature(runtime: RuntimeSpec, params: list[Param]) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([
        inspect.Parameter(p.name, kind, default=p.default_for(runtime),
                          annotation=Optional[p.type] if p.optional else p.type)  # noqa: UP007, UP045
        for p in params
    ])


def _docstring(params: list[Param]) -> str:
    lines = ["Fine-tune an LLM with torchtune.", "", "Args:"]
    lines += [f"    {p.name}: {p.description}" for p in params]
    return "\n".join(lines) + "\n"


def build_pipeline(runtime_name: str, local_workspace: str | None = None,
                   given: Collection[str] | None = None) -> Callable[..., Any]:
    """Build the pipeline for one runtime.

    Args:
        runtime_name: RuntimeSpec whose defaults the pipeline parameters take.
        local_workspace: None for a cluster (PVC at /workspace); a folder for ``kfp.local``.
        given: For a local pipeline, the names of the parameters the run sets.

    Returns:
        The ``@dsl.pipeline`` function.
    """
    rt = get_runtime(runtime_name)
    cluster = local_workspace is None
    workspace = WORKSPACE_MOUNT if cluster else local_workspace
    params = pipeline_params(rt, None if cluster else list(given or ()))
    names = [p.name for p in params]
    check_config = build_check_config(params)
    ops = ops_defaults(rt)

    def finetune_pipeline(*channels: Any) -> None:
        values = dict(zip(names, channels, strict=True))
        check = check_config(
            **values, runtime=rt.name, cluster=cluster,
            workspace_path="" if cluster else workspace,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            pipeline=pipeline_name(rt),
        )
        check.set_display_name("check-config")
        check.set_caching_options(False)  # it names this run's volume
        config = check.outputs["config"]
        if not cluster:
            tasks = _work(workspace, config, check)
            add_after_export(tasks.export, values, workspace=workspace, cluster=False)
            return
        pvc, cleanup = cluster_prelude(check, values)
        # The exit task runs whatever the outcome; the group holds container tasks only, so
        # the last one to end records the group's final state (see cleanup_workspace).
        with dsl.ExitHandler(cleanup, name="fine-tune-run"):
            tasks = _work(workspace, config, check)
            after = add_after_export(tasks.export, values, pvc_name=check.outputs["pvc_name"])
        tasks = dataclasses.replace(tasks, after=after)
        apply_cluster_settings(ops, check=check, pvc=pvc, tasks=tasks, values=values)

    finetune_pipeline.__signature__ = _signature(rt, params)
    finetune_pipeline.__doc__ = _docstring(params)
    return dsl.pipeline(
        name=pipeline_name(rt),
        description=f"Fine-tune {rt.description} with torchtune ({rt.name}): dataset and model "
        "initializers, fine-tune, export, over one workspace volume.",
    )(finetune_pipeline)


def _work(workspace: str, config: Any, check: dsl.PipelineTask) -> Tasks:
    """Add the initializers, tokenize, fine-tune and export (the same on both targets)."""
    data = dataset_initializer(config=config, workspace_path=workspace).after(check)
    data.set_display_name("dataset-initializer")
    model = model_initializer(config=config, workspace_path=workspace).after(check)
    model.set_display_name("model-initializer")
    # Tokenizes (and packs) on CPU what the fine-tune step would tokenize on the GPU node.
    tokenize = tokenize_dataset(config=config, workspace_path=workspace).after(data, model)
    tokenize.set_display_name("tokenize-dataset")
    train = fine_tune(config=config, workspace_path=workspace).after(data, model, tokenize)
    train.set_display_name("fine-tune")
    export = export_model(
        config=config, workspace_path=workspace, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).after(train)
    export.set_display_name("export")
    return Tasks(data, model, train, export, tokenize)
