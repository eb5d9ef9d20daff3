"""The fine-tuning pipeline: one definition, compiled for a cluster or run locally.

On a cluster::

    create-workspace (PVC) ─┬─> dataset-initializer ─┐
                            └─> model-initializer  ──┴─> fine-tune (GPU) ─> export

Every task but create-workspace mounts the PVC at /workspace. Locally (``kfp.local``) the same
components run in the same order on a local folder instead of the PVC, and the Kubernetes
settings are left out (kfp.local cannot create PVCs and ignores them).
"""


from collections.abc import Callable
from typing import Any, Optional

from kfp import dsl, kubernetes

from kfp_finetune.components.create_workspace import create_workspace
from kfp_finetune.components.dataset_initializer import dataset_initializer
from kfp_finetune.components.export_model import export_model
from kfp_finetune.components.fine_tune import fine_tune
from kfp_finetune.components.model_initializer import model_initializer
from kfp_finetune.runtimes import Runtime, get_runtime
from kfp_finetune.types import Loss
from kfp_finetune.workspace import WORKSPACE_MOUNT

DEFAULT_DATASET_URI = "hf://tatsu-lab/alpaca/data"
HF_TOKEN_SECRET = "hf-token"
HF_TOKEN_KEY = "HF_TOKEN"


def pipeline_name(runtime: Runtime) -> str:
    """KFP pipeline name of a runtime, e.g. ``kfp-finetune-torchtune-llama3-2-1b``."""
    return "kfp-finetune-" + runtime.name.replace(".", "-")


def build_pipeline(runtime_name: str, local_workspace: Optional[str] = None) -> Callable[..., Any]:
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
        export_name: str = "",
        hf_token_secret: str = HF_TOKEN_SECRET,
        pvc_size: str = rt.pvc_size,
        pvc_storage_class: str = "standard",
        pvc_access_modes: list = ["ReadWriteOnce"],
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
            export_name: Folder under /workspace/output for the model (empty: <model>-finetuned).
            hf_token_secret: Kubernetes Secret with key HF_TOKEN for gated or private repos
                (optional: tasks run without it when it does not exist).
            pvc_size: Size of the per-run workspace volume, e.g. 20Gi.
            pvc_storage_class: StorageClass of the workspace volume (kubectl get storageclass).
            pvc_access_modes: Access modes of the volume; ReadWriteMany lets the two
                initializers run on different nodes at once.
        """
        train_args = dict(
            runtime=rt.name, workspace_path=workspace, dtype=dtype, batch_size=batch_size,
            epochs=epochs, loss=loss, num_nodes=num_nodes, gpus_per_node=gpus_per_node,
            source=source, split=split, train_on_input=train_on_input,
            new_system_prompt=new_system_prompt, column_map=column_map,
        )
        data = dataset_initializer(dataset_uri=dataset_uri, **train_args)
        data.set_display_name("dataset-initializer")
        model = model_initializer(model_uri=model_uri, **train_args)
        model.set_display_name("model-initializer")
        train = fine_tune(**train_args).after(data, model)
        train.set_display_name("fine-tune")
        export = export_model(runtime=rt.name, workspace_path=workspace,
                              export_name=export_name).after(train)
        export.set_display_name("export")
        if not cluster:
            return
        pvc = create_workspace(
            pvc_name_suffix="-kfp-finetune",
            access_modes=pvc_access_modes,
            size=pvc_size,
            storage_class_name=pvc_storage_class,
        )
        pvc.set_display_name("create-workspace")
        # A cached CreatePVC can hand back a PVC that no longer exists.
        pvc.set_caching_options(False)
        for task in (data, model, train, export):
            kubernetes.mount_pvc(task, pvc_name=pvc.outputs["name"], mount_path=WORKSPACE_MOUNT)
            task.set_caching_options(False)  # they write to the per-run volume
        for task in (data, model):
            kubernetes.use_secret_as_env(
                task, secret_name=hf_token_secret,
                secret_key_to_env={HF_TOKEN_KEY: HF_TOKEN_KEY}, optional=True,
            )
            task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)
        train.set_retry(num_retries=1, backoff_duration="60s")
        train.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus_per_node)

    return finetune_pipeline
