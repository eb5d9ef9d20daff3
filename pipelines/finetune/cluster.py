"""The cluster-only parts of the pipeline: the volume, the exit task, the Kubernetes settings.

Split from pipeline.py, which builds the pipeline for both targets and calls these only when
compiling for a cluster.
"""

from dataclasses import dataclass
from typing import Any

from kfp import dsl, kubernetes

from kfp_finetune.components.cleanup_workspace import cleanup_workspace
from kfp_finetune.components.create_workspace import create_workspace
from kfp_finetune.config.parameters import BY_NAME
from kfp_finetune.config.runtimes import RuntimeSpec
from kfp_finetune.config.tracking import TRACKING_SECRET_KEYS
from kfp_finetune.pipelines.finetune.handoff import AfterExport
from kfp_finetune.steps.check_config import GPU_RESOURCE
from kfp_finetune.storage.credentials import HF_TOKEN_ENV, S3_SECRET_KEYS
from kfp_finetune.storage.workspace import WORKSPACE_MOUNT

# GPU node pools are commonly tainted with the GPU resource name; tolerating it is harmless
# where they are not (a GPU limit alone adds no toleration). Added as a fixed toleration on the
# GPU runtimes' fine-tune task; the `tolerations` parameter adds more. (Not a parameter default:
# KFP writes dict defaults into the YAML header in a per-process order, which would make
# `compile --check` flaky.)
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
# Pod activeDeadlineSeconds per attempt (kfp-kubernetes takes a constant, not a parameter).
INITIALIZER_TIMEOUT_S = 6 * 3600
EXPORT_TIMEOUT_S = 6 * 3600
FINE_TUNE_TIMEOUT_S = 72 * 3600
TINY_FINE_TUNE_TIMEOUT_S = 2 * 3600
# Requests of the CPU tasks (initializers, export): enough to stream and check files.
CPU_TASK_CPU_REQUEST = "1"
CPU_TASK_MEMORY_REQUEST = "4Gi"
# tokenize-dataset uses every CPU it gets (one process per core).
TOKENIZE_CPU_REQUEST = "4"
# check-config and cleanup-workspace: a few seconds of plain Python.
CHECK_CPU_REQUEST = "100m"
CHECK_MEMORY_REQUEST = "256Mi"
CHECK_TIMEOUT_S = 600
# check-config's outputs that feed the fine-tune pod's resource fields, in the order
# accelerator type, accelerator limit, CPU request, memory request.
RESOURCE_OUTPUTS = ("accelerator_type", "accelerator_limit", "cpu_request", "memory_request")
BENCH_RESOURCE_OUTPUTS = tuple(f"bench_{key}" for key in RESOURCE_OUTPUTS)


@dataclass(frozen=True)
class OpsDefaults:
    """Runtime-dependent defaults of the operations parameters."""

    cpu_request: str
    memory_request: str
    shm_size: str
    gpu_toleration: bool
    timeout_s: int


def ops_defaults(runtime: RuntimeSpec) -> OpsDefaults:
    """Defaults for a runtime: CPU tasks for the tiny ones, 8Gi of /dev/shm per GPU otherwise.

    The CPU and memory requests are the parameter table's defaults (one source for the run
    form and this).
    """
    gpus = runtime.default_gpus
    cpu = BY_NAME["cluster_cpu_request"].default_for(runtime)
    memory = BY_NAME["cluster_memory_request"].default_for(runtime)
    if gpus == 0:
        return OpsDefaults(cpu, memory, "1Gi", False, TINY_FINE_TUNE_TIMEOUT_S)
    return OpsDefaults(cpu, memory, f"{8 * gpus}Gi", True, FINE_TUNE_TIMEOUT_S)


@dataclass(frozen=True)
class Tasks:
    """The tasks that do the work, on a cluster and locally alike."""

    data: dsl.PipelineTask
    model: dsl.PipelineTask
    train: dsl.PipelineTask
    export: dsl.PipelineTask
    tokenize: dsl.PipelineTask
    after: AfterExport | None = None  # the optional tasks after the export (cluster)


def cluster_prelude(
    check: dsl.PipelineTask, values: dict[str, Any]
) -> tuple[dsl.PipelineTask, dsl.PipelineTask]:
    """Add the workspace volume after check-config, and the exit task (cluster only).

    check-config runs first so that a bad workspace_pvc_size never reaches CreatePVC (the
    backend's ``createPVC``, backend/src/v2/driver/k8s.go, parses it with ``MustParse``) and
    every resource field of the fine-tune pod comes from one of its STRING outputs.

    Args:
        check: The check-config task.
        values: The pipeline's parameters (channels) by name.
    """
    check.set_cpu_request(CHECK_CPU_REQUEST).set_memory_request(CHECK_MEMORY_REQUEST)
    kubernetes.set_timeout(check, CHECK_TIMEOUT_S)
    # Named kfp-finetune-<run id> (not a suffix, which the backend prefixes with a random
    # UUID): the exit task derives the same name from the run id alone.
    pvc = create_workspace(
        pvc_name=check.outputs["pvc_name"],
        annotations=check.outputs["pvc_annotations"],
        access_modes=values["workspace_access_modes"],
        size=values["workspace_pvc_size"],
        storage_class_name=values["workspace_storage_class"],
    )
    pvc.set_display_name("create-workspace")
    # A cached CreatePVC can hand back a PVC that no longer exists.
    pvc.set_caching_options(False)
    cleanup = cleanup_workspace(
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        keep_workspace_on_failure=values["workspace_keep_on_failure"],
        delete_workspace=values["workspace_delete_on_success"],
        push_to=values["export_push_to"],
    )
    cleanup.set_display_name("cleanup-workspace")
    cleanup.set_caching_options(False)
    cleanup.set_cpu_request(CHECK_CPU_REQUEST).set_memory_request(CHECK_MEMORY_REQUEST)
    cleanup.set_retry(num_retries=2, backoff_duration="30s")
    kubernetes.set_timeout(cleanup, CHECK_TIMEOUT_S)
    return pvc, cleanup


def apply_cluster_settings(
    ops: OpsDefaults,
    *,
    check: dsl.PipelineTask,
    pvc: dsl.PipelineTask,
    tasks: Tasks,
    values: dict[str, Any],
) -> None:
    """Mount the volume; add Secrets, scheduling, resources, timeouts and retries (cluster only)."""
    v, t = values, tasks
    for task in (t.data, t.model, t.tokenize, t.train, t.export):
        kubernetes.mount_pvc(task, pvc_name=pvc.outputs["name"], mount_path=WORKSPACE_MOUNT)
        task.set_caching_options(False)  # they write to the per-run volume (or push)
    for task in (t.data, t.model, t.export):
        kubernetes.use_secret_as_env(
            task, secret_name=v["secret_hf_token"],
            secret_key_to_env={HF_TOKEN_ENV: HF_TOKEN_ENV}, optional=True,
        )
        kubernetes.use_secret_as_env(
            task, secret_name=v["secret_s3"],
            secret_key_to_env={key: key for key in S3_SECRET_KEYS}, optional=True,
        )
        task.set_cpu_request(CPU_TASK_CPU_REQUEST).set_memory_request(CPU_TASK_MEMORY_REQUEST)
    if "secret_tracking" in v:  # MLflow / W&B credentials for the tasks that log
        use_tracking_secret((t.train, t.export), v["secret_tracking"])
    t.tokenize.set_cpu_request(TOKENIZE_CPU_REQUEST).set_memory_request(CPU_TASK_MEMORY_REQUEST)
    for task in (t.data, t.model, t.tokenize):
        # Retries are allowed for as long as an attempt may take (Argo's default is 1 h from
        # the first attempt, which would forbid retrying a long download).
        task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0,
                       backoff_max_duration=f"{4 * INITIALIZER_TIMEOUT_S}s")
        kubernetes.set_timeout(task, INITIALIZER_TIMEOUT_S)
    t.export.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0,
                       backoff_max_duration=f"{3 * EXPORT_TIMEOUT_S}s")
    kubernetes.set_timeout(t.export, EXPORT_TIMEOUT_S)

    train = t.train
    train.set_retry(num_retries=1, backoff_duration="60s",
                    backoff_max_duration=f"{2 * ops.timeout_s + 3600}s")
    _accelerated_pod(train, ops, [check.outputs[key] for key in RESOURCE_OUTPUTS], v)
    if t.after is not None:
        _benchmark_settings(ops, check, pvc, t.after.bench, v)


def _benchmark_settings(ops: OpsDefaults, check: dsl.PipelineTask, pvc: dsl.PipelineTask,
                        bench: dsl.PipelineTask, v: dict[str, Any]) -> None:
    """The benchmark pod: the fine-tune pod's node and resources, or none when it is skipped."""
    kubernetes.mount_pvc(bench, pvc_name=pvc.outputs["name"], mount_path=WORKSPACE_MOUNT)
    kubernetes.use_secret_as_env(  # lm-eval task datasets may be gated on the Hub
        bench, secret_name=v["secret_hf_token"],
        secret_key_to_env={HF_TOKEN_ENV: HF_TOKEN_ENV}, optional=True)
    _accelerated_pod(bench, ops, [check.outputs[key] for key in BENCH_RESOURCE_OUTPUTS], v)


def _accelerated_pod(task: dsl.PipelineTask, ops: OpsDefaults, resources: list[Any],
                     v: dict[str, Any]) -> None:
    """Resources, placement, /dev/shm and timeout of a pod that may hold GPUs."""
    # Every resource field from a STRING output of check-config: the backend reads these
    # placeholders' string values (initPodSpecPatch -> resolvePodSpecInputRuntimeParameter,
    # backend/src/v2/driver), so an integer parameter here would drop the GPU limit silently.
    task.set_accelerator_type(resources[0]).set_accelerator_limit(resources[1])
    task.set_cpu_request(resources[2]).set_memory_request(resources[3])
    # The SDK does not track channels used only in resource fields; without this it would not
    # pass them into the exit handler's group (compile fails: "... not found").
    task.register_pipeline_channels(resources)
    kubernetes.add_node_selector_json(task, node_selector_json=v["cluster_node_selector"])
    if ops.gpu_toleration:
        kubernetes.add_toleration(task, **GPU_TOLERATION)
    kubernetes.add_toleration_json(task, toleration_json=v["cluster_tolerations"])
    # NCCL and the data loader workers share memory through /dev/shm (64Mi by default).
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                               medium="Memory", size_limit=ops.shm_size)
    kubernetes.set_timeout(task, ops.timeout_s)


def use_tracking_secret(tasks: Any, secret_name: Any) -> None:
    """Fill the tracker credentials of ``tasks`` from a Secret (it and each key optional).

    The fine-tune task logs to MLflow / W&B while training, the export task records where the
    model went; both read ``TRACKING_SECRET_KEYS`` from the environment, never a parameter.
    """
    for task in tasks:
        kubernetes.use_secret_as_env(
            task, secret_name=secret_name,
            secret_key_to_env={key: key for key in TRACKING_SECRET_KEYS}, optional=True,
        )
