"""After export: register the model and hand it to KServe, each only when its setting is set.

``add_handoff`` adds the two optional tasks after the export task; the pipeline calls it with
its own ``registry_*`` and ``serve_*`` parameters. With ``registry_url`` and ``serve_name``
empty (their defaults) neither task runs (``dsl.If``), so the pipeline behaves as before.
Both take the export task's ``Model`` artifact (its metadata: where the model is), so neither
mounts the workspace volume.

* ``register-model`` (cluster and local): the registry token from the Secret named by
  ``registry_token_secret`` (key ``MODEL_REGISTRY_TOKEN``, optional) on a cluster.
* ``serve-model`` (cluster and local; applying needs a cluster): the InferenceService YAML as
  its ``serving_manifest`` artifact, created in the cluster with ``serve_apply``.
"""

from dataclasses import dataclass
from typing import Any

from kfp import dsl, kubernetes

from kfp_finetune.components.register_model import register_model
from kfp_finetune.components.serve_model import serve_model
from kfp_finetune.steps.register_model import TOKEN_ENV
from kfp_finetune.storage.workspace import WORKSPACE_MOUNT

# A few seconds of HTTP calls each.
HANDOFF_CPU_REQUEST = "100m"
HANDOFF_MEMORY_REQUEST = "256Mi"
HANDOFF_TIMEOUT_S = 1800


@dataclass(frozen=True)
class HandoffParams:
    """The pipeline parameters (or constants) the two tasks take."""

    registry_url: Any = ""
    registry_model_name: Any = ""
    registry_version: Any = ""
    registry_author: Any = "kfp-finetune"
    registry_token_secret: Any = "model-registry-token"
    serve_name: Any = ""
    serve_namespace: Any = ""
    serve_apply: Any = False
    serve_gpus: Any = 1
    serve_cpu: Any = ""
    serve_memory: Any = ""
    serve_max_model_len: Any = 0
    serve_runtime: Any = ""
    serve_service_account: Any = ""


def add_handoff(
    export: dsl.PipelineTask, p: HandoffParams, *, pvc_name: Any = "",
    workspace: str = WORKSPACE_MOUNT, cluster: bool = True,
) -> None:
    """Add register-model and serve-model after ``export`` (each under its own ``dsl.If``).

    Args:
        export: The export task (its ``model`` output).
        p: The settings.
        pvc_name: The workspace volume's name (check-config's ``pvc_name``; "" locally).
        workspace: Where the export task mounted it (the pipeline's workspace path).
        cluster: Compiling for a cluster (Secret, resources, timeout); False for kfp.local.
    """
    with dsl.If(p.registry_url != "", name="model-registry"):
        reg = register_model(
            model=export.outputs["model"], registry_url=p.registry_url,
            model_name=p.registry_model_name, version=p.registry_version,
            author=p.registry_author, pvc_name=pvc_name, workspace_path=workspace)
        reg.set_display_name("register-model")
        reg.set_caching_options(False)  # it writes to a registry
        if cluster:
            kubernetes.use_secret_as_env(
                reg, secret_name=p.registry_token_secret,
                secret_key_to_env={TOKEN_ENV: TOKEN_ENV}, optional=True)
            _small(reg)
    with dsl.If(p.serve_name != "", name="kserve"):
        serve = serve_model(
            model=export.outputs["model"], name=p.serve_name, namespace=p.serve_namespace,
            apply=p.serve_apply, pvc_name=pvc_name, workspace_path=workspace,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            gpus=p.serve_gpus, cpu=p.serve_cpu, memory=p.serve_memory,
            max_model_len=p.serve_max_model_len, runtime=p.serve_runtime,
            service_account=p.serve_service_account)
        serve.set_display_name("serve-model")
        serve.set_caching_options(False)  # it may change the cluster
        if cluster:
            _small(serve)


def _small(task: dsl.PipelineTask) -> None:
    task.set_cpu_request(HANDOFF_CPU_REQUEST).set_memory_request(HANDOFF_MEMORY_REQUEST)
    kubernetes.set_timeout(task, HANDOFF_TIMEOUT_S)
