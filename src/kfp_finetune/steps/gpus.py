"""The fine-tune step's first check: the GPUs it asks for are visible to this process."""

from __future__ import annotations

import os

from kfp_finetune.errors import TrainingError


def check_gpus_visible(gpus: int) -> None:
    """Refuse to start when the step asks for GPUs that this process cannot see.

    Without this, torchtune's config says ``device: cuda`` and a pod without a GPU fails
    deep in ``tune run`` (or trains for hours on CPU) instead of saying why at once.

    Raises:
        TrainingError: ``gpus`` > 0 and fewer CUDA devices are visible; names the likely causes.
    """
    if gpus <= 0:
        return
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible >= gpus:
        return
    seen = "no GPU" if visible == 0 else f"only {visible} GPU(s)"
    build = "" if torch.version.cuda or torch.version.hip else (
        f"; this torch build ({torch.__version__}) has no CUDA")
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = "" if env is None else f"; CUDA_VISIBLE_DEVICES={env!r}"
    raise TrainingError(
        f"gpus_per_node={gpus} but this pod (or machine) sees {seen}{build}{devices}. "
        "Likely causes: the accelerator limit did not reach the pod (accelerator_type, e.g. "
        "nvidia.com/gpu, with the GPU count as its limit; KFP backends older than 2.4 drop "
        "resource placeholders without a word), no node selector or toleration places it on "
        "a GPU node, or the image lacks a CUDA build of torch. Fix that, or set "
        "gpus_per_node=0 (--gpus 0) to train on CPU."
    )
