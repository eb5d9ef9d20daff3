"""The fine-tuning pipeline: one definition, compiled for a cluster or run locally.

On a cluster::

    create-workspace (PVC) ─┬─> dataset-initializer ─┐
                            └─> model-initializer  ──┴─> fine-tune (GPU) ─> export
                                                            [─> delete-workspace, if asked and
                                                                the model was pushed elsewhere]

Every task but create-workspace mounts the PVC at /workspace. Locally (``kfp.local``) the same
components run in the same order on a local folder instead of the PVC, and the Kubernetes
settings are left out (kfp.local cannot create PVCs and ignores them).

Operations (cluster only, see :func:`_apply_cluster_settings`): one new PVC per run (a name
suffix, so the backend names it after the run and recurring runs never collide); caching off on
every task (they all write to the per-run volume or push elsewhere); the fine-tune task gets the
accelerator type and count, node selector and tolerations (JSON parameters), CPU and memory
requests, an in-memory /dev/shm and a timeout; the initializers, fine-tune and export retry.
"""


from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kfp import dsl, kubernetes

from kfp_finetune.components.create_workspace import create_workspace
from kfp_finetune.components.dataset_initializer import dataset_initializer
from kfp_finetune.components.export_model import export_model
from kfp_finetune.components.fine_tune import fine_tune
from kfp_finetune.components.model_initializer import model_initializer
from kfp_finetune.credentials import (
    DEFAULT_HF_SECRET,
    DEFAULT_S3_SECRET,
    HF_TOKEN_ENV,
    S3_SECRET_KEYS,
)
from kfp_finetune.runtimes import Runtime, get_runtime
from kfp_finetune.types import Loss
from kfp_finetune.workspace import WORKSPACE_MOUNT

DEFAULT_DATASET_URI = "hf://tatsu-lab/alpaca/data"
GPU_RESOURCE = "nvidia.com/gpu"
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


@dataclass(frozen=True)
class OpsDefaults:
    """Runtime-dependent defaults of the operations parameters."""

    cpu_request: str
    memory_request: str
    shm_size: str
    gpu_toleration: bool
    timeout_s: int


def ops_defaults(runtime: Runtime) -> OpsDefaults:
    """Defaults for a runtime: CPU tasks for the tiny ones, 4 CPUs and 32Gi per GPU otherwise."""
    gpus = runtime.default_gpus
    if gpus == 0:
        return OpsDefaults("2", "8Gi", "1Gi", False, TINY_FINE_TUNE_TIMEOUT_S)
    return OpsDefaults(str(4 * gpus), f"{32 * gpus}Gi", f"{8 * gpus}Gi", True,
                       FINE_TUNE_TIMEOUT_S)


def pipeline_name(runtime: Runtime) -> str:
    """KFP pipeline name of a runtime, e.g. ``kfp-finetune-torchtune-llama3-2-1b``."""
    return "kfp-finetune-" + runtime.name.replace(".", "-")


def build_pipeline(runtime_name: str, local_workspace: str | None = None) -> Callable[..., Any]:
    """Build the pipeline for one runtime.

    Args:
        runtime_name: Runtime whose defaults the pipeline parameters take.
        local_workspace: None for a cluster (PVC at /workspace); a folder for ``kfp.local``.

    Returns:
        The ``@dsl.pipeline`` function.
    """
    rt = get_runtime(runtime_name)
    cluster = local_workspace is None
    workspace = WORKSPACE_MOUNT if cluster else local_workspace
    ops = ops_defaults(rt)

    @dsl.pipeline(
        name=pipeline_name(rt),
        description=f"Fine-tune {rt.description} with torchtune ({rt.name}): dataset and model "
        "initializers, fine-tune, export, over one workspace volume.",
    )
    def finetune_pipeline(
        model_uri: str = rt.model_uri,
        dataset_uri: str = DEFAULT_DATASET_URI,
        dtype: str = rt.default_dtype.value,
        batch_size: int = rt.default_batch_size,
        epochs: int = rt.default_epochs,
        loss: str = Loss.CEWithChunkedOutputLoss.value,
        num_nodes: int = 1,
        gpus_per_node: int = rt.default_gpus,
        source: str = "parquet",
        split: str = "train",
        train_on_input: bool = False,
        new_system_prompt: str = "",
        column_map: dict = {},
        peft_method: str = "none",
        lora_rank: int = 0,
        lora_alpha: float = 0.0,
        lora_dropout: float = -1.0,
        lora_attn_modules: list = [],
        apply_lora_to_mlp: str = "auto",
        apply_lora_to_output: str = "auto",
        learning_rate: float = 0.0,
        gradient_accumulation_steps: int = 0,
        max_seq_len: int = 0,
        packed: str = "auto",
        compile: str = "auto",
        activation_checkpointing: str = "auto",
        max_steps_per_epoch: int = 0,
        seed: int = 42,
        overrides: list = [],
        model_ignore_patterns: list = [],
        export_name: str = "",
        hf_token_secret: str = DEFAULT_HF_SECRET,
        push_to: str = "",
        copy_to_artifact: bool = False,
        s3_secret: str = DEFAULT_S3_SECRET,
        pvc_size: str = rt.pvc_size,
        pvc_storage_class: str = "standard",
        pvc_access_modes: list = ["ReadWriteOnce"],
        delete_workspace: bool = False,
        accelerator_type: str = GPU_RESOURCE,
        node_selector: dict = {},
        tolerations: list = [],
        cpu_request: str = ops.cpu_request,
        memory_request: str = ops.memory_request,
    ) -> None:
        """Fine-tune an LLM with torchtune.

        Args:
            model_uri: Base model: hf://org/repo, file:///abs/path or /abs/path.
            dataset_uri: Dataset: hf://org/repo[/dir-or-file], file:///abs/path or /abs/path.
            dtype: Training precision: bf16 or fp32.
            batch_size: Samples per device per step.
            epochs: Passes over the dataset.
            loss: Loss component (torchtune.modules.loss.CEWithChunkedOutputLoss).
            num_nodes: Nodes; only 1 is supported.
            gpus_per_node: GPUs for the fine-tune task (0 = CPU); also the process count.
            source: Format of the data files: parquet, json, csv, arrow, text or xml.
            split: Split expression, e.g. train or train[:95%].
            train_on_input: Whether the prompt tokens count in the loss.
            new_system_prompt: System prompt prepended to every sample (empty for none).
            column_map: Expected column -> your column, e.g. {"input": "question"}.
            peft_method: none (full fine-tuning), lora, qlora (4-bit base, one GPU) or dora.
            lora_rank: LoRA rank (0: the torchtune config's, 64 for 1B).
            lora_alpha: LoRA alpha (0: the torchtune config's).
            lora_dropout: LoRA dropout (negative: the torchtune config's).
            lora_attn_modules: Attention projections that get LoRA, among q_proj, k_proj,
                v_proj, output_proj (empty: q_proj, v_proj, output_proj).
            apply_lora_to_mlp: LoRA on the MLP layers: auto (config's), true or false.
            apply_lora_to_output: LoRA on the output projection: auto, true or false.
            learning_rate: Learning rate (0: the torchtune config's).
            gradient_accumulation_steps: Batches per optimizer update (0: the config's).
            max_seq_len: Longest tokenized sample; longer ones are truncated (0: the runtime's
                2048 on GPU, no limit on CPU).
            packed: Pack samples into max_seq_len sequences: auto (on for GPU runtimes), true
                or false.
            compile: torch.compile the model and loss: auto (on for GPU runtimes), true or
                false.
            activation_checkpointing: Recompute activations to save memory: auto (off where
                the card's memory allows, see README "Runtimes"), true or false.
            max_steps_per_epoch: Stop each epoch after this many steps (0: whole epoch).
            seed: Random seed, for reproducible runs.
            overrides: Raw torchtune key=value overrides applied last, e.g.
                ["optimizer.weight_decay=0.01"]; output_dir, tokenizer.path,
                tokenizer.merges_file and checkpointer.checkpoint_dir are refused.
            model_ignore_patterns: Glob patterns of model files not to download, e.g.
                ["original/*.pth"].
            export_name: Folder under /workspace/output for the model (empty:
                <model>-finetuned-<run id>, a new folder per run). A name that already holds
                another run's model is refused, never overwritten.
            hf_token_secret: Kubernetes Secret with key HF_TOKEN for gated or private repos,
                and for push_to=hf://... (optional: tasks run without it when it does not exist).
            push_to: Also copy the exported model to hf://org/repo[@branch] (token from
                hf_token_secret) or s3://bucket/prefix (keys from s3_secret); empty: the model
                stays on the workspace volume only.
            copy_to_artifact: Also copy the model files into the KFP artifact store (the Model
                artifact holds only metadata otherwise; weights can be many GB).
            s3_secret: Kubernetes Secret with keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
                optionally AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, for s3://
                sources and push_to (optional).
            pvc_size: Size of the per-run workspace volume, e.g. 20Gi.
            pvc_storage_class: StorageClass of the workspace volume (kubectl get storageclass).
            pvc_access_modes: Access modes of the volume; ReadWriteMany lets the two
                initializers run on different nodes at once.
            delete_workspace: Delete the run's workspace volume after the export, but only when
                push_to copied the model elsewhere (never when the model lives only there).
            accelerator_type: Accelerator resource of the fine-tune task, e.g. nvidia.com/gpu
                or amd.com/gpu; its count is gpus_per_node.
            node_selector: Node labels the fine-tune task must run on, as JSON, e.g.
                {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"} (empty: any node).
            tolerations: More taints the fine-tune task tolerates, as a JSON list of
                Kubernetes tolerations, e.g. [{"key": "dedicated", "operator": "Equal",
                "value": "ml", "effect": "NoSchedule"}] (GPU runtimes always tolerate
                nvidia.com/gpu:NoSchedule).
            cpu_request: CPUs requested for the fine-tune task, e.g. 8.
            memory_request: Memory requested for the fine-tune task, e.g. 64Gi.
        """
        train_args = dict(
            runtime=rt.name, workspace_path=workspace, dtype=dtype, batch_size=batch_size,
            epochs=epochs, loss=loss, num_nodes=num_nodes, gpus_per_node=gpus_per_node,
            source=source, split=split, train_on_input=train_on_input,
            new_system_prompt=new_system_prompt, column_map=column_map,
        )
        # The dataset step checks the parameters above before it downloads anything; the
        # model step checks these too (it builds the whole training config first).
        tune_args = dict(
            train_args, peft_method=peft_method, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, lora_attn_modules=lora_attn_modules,
            apply_lora_to_mlp=apply_lora_to_mlp, apply_lora_to_output=apply_lora_to_output,
            learning_rate=learning_rate, gradient_accumulation_steps=gradient_accumulation_steps,
            max_seq_len=max_seq_len, packed=packed, compile=compile,
            activation_checkpointing=activation_checkpointing,
            max_steps_per_epoch=max_steps_per_epoch, seed=seed, overrides=overrides,
        )
        data = dataset_initializer(dataset_uri=dataset_uri, **train_args)
        data.set_display_name("dataset-initializer")
        model = model_initializer(model_uri=model_uri, ignore_patterns=model_ignore_patterns,
                                  **tune_args)
        model.set_display_name("model-initializer")
        train = fine_tune(**tune_args).after(data, model)
        train.set_display_name("fine-tune")
        export = export_model(
            runtime=rt.name, workspace_path=workspace, export_name=export_name,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, push_to=push_to,
            copy_to_artifact=copy_to_artifact,
        ).after(train)
        export.set_display_name("export")
        if cluster:
            _apply_cluster_settings(
                ops, data=data, model=model, train=train, export=export,
                params=ClusterParams(
                    hf_token_secret=hf_token_secret, s3_secret=s3_secret, pvc_size=pvc_size,
                    pvc_storage_class=pvc_storage_class, pvc_access_modes=pvc_access_modes,
                    delete_workspace=delete_workspace, accelerator_type=accelerator_type,
                    gpus_per_node=gpus_per_node, node_selector=node_selector,
                    tolerations=tolerations, cpu_request=cpu_request,
                    memory_request=memory_request,
                ),
            )

    return finetune_pipeline


@dataclass(frozen=True)
class ClusterParams:
    """The pipeline parameters (channels) that only the cluster settings use."""

    hf_token_secret: Any
    s3_secret: Any
    pvc_size: Any
    pvc_storage_class: Any
    pvc_access_modes: Any
    delete_workspace: Any
    accelerator_type: Any
    gpus_per_node: Any
    node_selector: Any
    tolerations: Any
    cpu_request: Any
    memory_request: Any


def _apply_cluster_settings(
    ops: OpsDefaults,
    *,
    data: dsl.PipelineTask,
    model: dsl.PipelineTask,
    train: dsl.PipelineTask,
    export: dsl.PipelineTask,
    params: ClusterParams,
) -> None:
    """Add the PVC, Secrets, scheduling, resources, timeouts and retries (cluster only)."""
    p = params
    pvc = create_workspace(
        pvc_name_suffix="-kfp-finetune",
        access_modes=p.pvc_access_modes,
        size=p.pvc_size,
        storage_class_name=p.pvc_storage_class,
    )
    pvc.set_display_name("create-workspace")
    # A cached CreatePVC can hand back a PVC that no longer exists.
    pvc.set_caching_options(False)
    for task in (data, model, train, export):
        kubernetes.mount_pvc(task, pvc_name=pvc.outputs["name"], mount_path=WORKSPACE_MOUNT)
        task.set_caching_options(False)  # they write to the per-run volume (or push)
    for task in (data, model, export):
        kubernetes.use_secret_as_env(
            task, secret_name=p.hf_token_secret,
            secret_key_to_env={HF_TOKEN_ENV: HF_TOKEN_ENV}, optional=True,
        )
        kubernetes.use_secret_as_env(
            task, secret_name=p.s3_secret,
            secret_key_to_env={key: key for key in S3_SECRET_KEYS}, optional=True,
        )
        task.set_cpu_request(CPU_TASK_CPU_REQUEST).set_memory_request(CPU_TASK_MEMORY_REQUEST)
    for task in (data, model):
        # Retries are allowed for as long as an attempt may take (Argo's default is 1 h from
        # the first attempt, which would forbid retrying a long download).
        task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0,
                       backoff_max_duration=f"{4 * INITIALIZER_TIMEOUT_S}s")
        kubernetes.set_timeout(task, INITIALIZER_TIMEOUT_S)
    export.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0,
                     backoff_max_duration=f"{3 * EXPORT_TIMEOUT_S}s")
    kubernetes.set_timeout(export, EXPORT_TIMEOUT_S)

    train.set_retry(num_retries=1, backoff_duration="60s",
                    backoff_max_duration=f"{2 * ops.timeout_s + 3600}s")
    train.set_accelerator_type(p.accelerator_type).set_accelerator_limit(p.gpus_per_node)
    train.set_cpu_request(p.cpu_request).set_memory_request(p.memory_request)
    kubernetes.add_node_selector_json(train, node_selector_json=p.node_selector)
    if ops.gpu_toleration:
        kubernetes.add_toleration(train, **GPU_TOLERATION)
    kubernetes.add_toleration_json(train, toleration_json=p.tolerations)
    # NCCL and the data loader workers share memory through /dev/shm (64Mi by default).
    kubernetes.empty_dir_mount(train, volume_name="dshm", mount_path="/dev/shm",
                               medium="Memory", size_limit=ops.shm_size)
    kubernetes.set_timeout(train, ops.timeout_s)

    # Free the volume only when asked and only when the model also lives elsewhere.
    with dsl.If(p.delete_workspace == True, name="delete-workspace-requested"):  # noqa: E712
        with dsl.If(export.outputs["exported_elsewhere"] == True,  # noqa: E712
                    name="model-exported-elsewhere"):
            delete = kubernetes.DeletePVC(pvc_name=pvc.outputs["name"]).after(export)
            delete.set_display_name("delete-workspace")
            delete.set_caching_options(False)
