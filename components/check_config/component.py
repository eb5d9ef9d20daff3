"""check-config: the first task of a cluster run; checks the operations parameters on CPU.

It hands the fine-tune task's resources and CreatePVC's name and annotations on as validated
strings (the KFP backend reads resource placeholders as strings; see
kfp_finetune.steps.check_config).
"""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def check_config(
    gpus_per_node: int,
    accelerator_type: str,
    cpu_request: str,
    memory_request: str,
    pvc_size: str,
    pvc_storage_class: str,
    pvc_access_modes: list,
    hf_token_secret: str,
    s3_secret: str,
    delete_workspace: bool = False,
    push_to: str = "",
    run_id: str = "",
    run_name: str = "",
    pipeline: str = "",
) -> NamedTuple("ClusterSettings", [
    ("accelerator_type", str), ("accelerator_limit", str), ("cpu_request", str),
    ("memory_request", str), ("pvc_name", str), ("pvc_annotations", dict),
]):
    """Refuse bad operations parameters before any volume or GPU is asked for.

    Args:
        gpus_per_node: GPUs of the fine-tune task (0: CPU, no accelerator limit).
        accelerator_type: GPU resource name, e.g. nvidia.com/gpu.
        cpu_request: CPUs of the fine-tune task (a Kubernetes quantity).
        memory_request: Memory of the fine-tune task (a Kubernetes quantity).
        pvc_size: Size of the workspace volume (a Kubernetes quantity).
        pvc_storage_class: StorageClass of the volume.
        pvc_access_modes: Access modes of the volume.
        hf_token_secret: Secret name for HF_TOKEN (must not be empty; need not exist).
        s3_secret: Secret name for the S3 keys (must not be empty; need not exist).
        delete_workspace: Delete the volume after a successful run (needs push_to).
        push_to: Where the export copies the model ("" for nowhere).
        run_id: The run's UUID (names the volume).
        run_name: The run's display name (annotated on the volume).
        pipeline: The pipeline's name (annotated on the volume).

    Returns:
        Accelerator type and limit ("" and "" on CPU), CPU and memory requests, the volume's
        name and annotations.
    """
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("check-config", None):
        from kfp_finetune.steps.check_config import check_cluster_settings

        s = check_cluster_settings(
            gpus_per_node=gpus_per_node, accelerator_type=accelerator_type, cpu_request=cpu_request,
            memory_request=memory_request, pvc_size=pvc_size, pvc_storage_class=pvc_storage_class,
            pvc_access_modes=pvc_access_modes, hf_token_secret=hf_token_secret, s3_secret=s3_secret,
            delete_workspace=delete_workspace, push_to=push_to, run_id=run_id, run_name=run_name,
            pipeline=pipeline,
        )
        limit = f"{s.accelerator_limit} x {s.accelerator_type}" if s.accelerator_limit else "none"
        print(f"[check-config] fine-tune: accelerators {limit}, cpu {s.cpu_request}, memory "
              f"{s.memory_request}; workspace volume {s.pvc_name} ({pvc_size}, "
              f"{pvc_storage_class})")
        return (s.accelerator_type, s.accelerator_limit, s.cpu_request, s.memory_request,
                s.pvc_name, s.pvc_annotations)
