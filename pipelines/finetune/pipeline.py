"""The fine-tuning pipeline: one definition, compiled for a cluster or run locally.

On a cluster::

    check-config ─> create-workspace (PVC) ─┬─> dataset-initializer ─┐
                                            └─> model-initializer  ──┴─> tokenize-dataset
                                                                 ─> fine-tune (GPU) ─> export
    cleanup-workspace: exit task, runs whatever the outcome of the five tasks above

Every task from dataset-initializer on mounts the PVC at /workspace. Locally (``kfp.local``)
the same five components run in the same order on a local folder instead of the PVC, and the
cluster-only parts (check-config, the PVC, the exit task, the Kubernetes settings) are left
out (kfp.local cannot create PVCs, ignores Kubernetes settings and has no exit handlers).

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


from collections.abc import Callable
from typing import Any

from kfp import dsl

from kfp_finetune.components.dataset_initializer import dataset_initializer
from kfp_finetune.components.export_model import export_model
from kfp_finetune.components.fine_tune import fine_tune
from kfp_finetune.components.model_initializer import model_initializer
from kfp_finetune.components.tokenize_dataset import tokenize_dataset
from kfp_finetune.config.runtimes import RuntimeSpec, get_runtime
from kfp_finetune.config.types import Loss
from kfp_finetune.pipelines.finetune.cluster import (
    ClusterParams,
    Tasks,
    apply_cluster_settings,
    cluster_prelude,
    ops_defaults,
)
from kfp_finetune.steps.check_config import GPU_RESOURCE
from kfp_finetune.storage.credentials import DEFAULT_HF_SECRET, DEFAULT_S3_SECRET
from kfp_finetune.storage.workspace import WORKSPACE_MOUNT

DEFAULT_DATASET_URI = "hf://tatsu-lab/alpaca/data"


def pipeline_name(runtime: RuntimeSpec) -> str:
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
        keep_workspace_on_failure: bool = False,
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
            hf_token_secret: Name of the Kubernetes Secret with key HF_TOKEN, for gated or
                private repos and push_to=hf://... The Secret need not exist (tasks run
                without it), but the name must not be empty.
            push_to: Also copy the exported model to hf://org/repo[@branch] (token from
                hf_token_secret) or s3://bucket/prefix (keys from s3_secret); empty: the model
                stays on the workspace volume only.
            copy_to_artifact: Also copy the model files into the KFP artifact store (the Model
                artifact holds only metadata otherwise; weights can be many GB).
            s3_secret: Name of the Kubernetes Secret with keys AWS_ACCESS_KEY_ID,
                AWS_SECRET_ACCESS_KEY and optionally AWS_SESSION_TOKEN, AWS_ENDPOINT_URL,
                AWS_DEFAULT_REGION, for s3:// sources and push_to. The Secret need not exist,
                but the name must not be empty.
            pvc_size: Size of the per-run workspace volume kfp-finetune-<run id>, e.g. 20Gi.
            pvc_storage_class: StorageClass of the workspace volume (kubectl get storageclass;
                a class that does not exist leaves the volume and the run Pending).
            pvc_access_modes: Access modes of the volume; ReadWriteMany lets the two
                initializers run on different nodes at once.
            delete_workspace: Delete the run's workspace volume after a successful run, but
                only when push_to copied the model elsewhere (never when the model lives only
                there).
            keep_workspace_on_failure: Keep the volume of a failed run, for debugging or the
                UI's retry (default: a failed run's volume is deleted).
            accelerator_type: Accelerator resource of the fine-tune task, e.g. nvidia.com/gpu
                or amd.com/gpu; its count is gpus_per_node (none when 0).
            node_selector: Node labels the fine-tune task must run on, as JSON, e.g.
                {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"} (empty: any node).
            tolerations: More taints the fine-tune task tolerates, as a JSON list of
                Kubernetes tolerations, e.g. [{"key": "dedicated", "operator": "Equal",
                "value": "ml", "effect": "NoSchedule"}] (GPU runtimes always tolerate
                nvidia.com/gpu:NoSchedule).
            cpu_request: CPUs requested for the fine-tune task, e.g. 8 or 7500m.
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
        if not cluster:
            _work(rt.name, workspace, dataset_uri, model_uri, model_ignore_patterns,
                  export_name, push_to, copy_to_artifact, train_args, tune_args)
            return
        p = ClusterParams(
            hf_token_secret=hf_token_secret, s3_secret=s3_secret, pvc_size=pvc_size,
            pvc_storage_class=pvc_storage_class, pvc_access_modes=pvc_access_modes,
            delete_workspace=delete_workspace, keep_workspace_on_failure=keep_workspace_on_failure,
            push_to=push_to, accelerator_type=accelerator_type, gpus_per_node=gpus_per_node,
            node_selector=node_selector, tolerations=tolerations, cpu_request=cpu_request,
            memory_request=memory_request,
        )
        check, pvc, cleanup = cluster_prelude(pipeline_name(rt), p)
        # The exit task runs whatever the outcome; the group holds container tasks only, so
        # the last one to end records the group's final state (see workspace_cleanup).
        with dsl.ExitHandler(cleanup, name="fine-tune-run"):
            tasks = _work(rt.name, workspace, dataset_uri, model_uri, model_ignore_patterns,
                          export_name, push_to, copy_to_artifact, train_args, tune_args)
        apply_cluster_settings(ops, check=check, pvc=pvc, tasks=tasks, params=p)

    return finetune_pipeline


def _work(runtime: str, workspace: str, dataset_uri: Any, model_uri: Any, ignore_patterns: Any,
          export_name: Any, push_to: Any, copy_to_artifact: Any, train_args: dict[str, Any],
          tune_args: dict[str, Any]) -> Tasks:
    """Add the initializers, tokenize, fine-tune and export (the same on both targets)."""
    data = dataset_initializer(dataset_uri=dataset_uri, **train_args)
    data.set_display_name("dataset-initializer")
    model = model_initializer(model_uri=model_uri, ignore_patterns=ignore_patterns, **tune_args)
    model.set_display_name("model-initializer")
    # Tokenizes (and packs) on CPU what the fine-tune step would tokenize on the GPU node.
    tokenize = tokenize_dataset(**tune_args).after(data, model)
    tokenize.set_display_name("tokenize-dataset")
    train = fine_tune(**tune_args).after(data, model, tokenize)
    train.set_display_name("fine-tune")
    export = export_model(
        runtime=runtime, workspace_path=workspace, export_name=export_name,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, push_to=push_to,
        copy_to_artifact=copy_to_artifact,
    ).after(train)
    export.set_display_name("export")
    return Tasks(data, model, train, export, tokenize)
