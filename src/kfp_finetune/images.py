"""The container images the components run in: the one place that names them.

Override the registry for a private mirror with ``KFP_FINETUNE_REGISTRY`` (or each image with
``KFP_FINETUNE_CPU_IMAGE`` / ``KFP_FINETUNE_TRAINER_IMAGE``) when you compile:

    KFP_FINETUNE_REGISTRY=registry.example.com/ml kfp-finetune compile --output-dir my-compiled

``compiled/`` in this repository always uses the defaults.
"""

from __future__ import annotations

import os

VERSION = "0.1.0"
DEFAULT_REGISTRY = "ghcr.io/kfp-finetune"
ENV_VARS = ("KFP_FINETUNE_REGISTRY", "KFP_FINETUNE_CPU_IMAGE", "KFP_FINETUNE_TRAINER_IMAGE")

REGISTRY = os.environ.get("KFP_FINETUNE_REGISTRY", DEFAULT_REGISTRY).rstrip("/")
# Initializers and export: CPU-only torch, torchtune, this project (images/cpu/Dockerfile).
CPU_IMAGE = os.environ.get("KFP_FINETUNE_CPU_IMAGE", f"{REGISTRY}/kfp-finetune:{VERSION}")
# Fine-tune: PyTorch CUDA base, torchtune, torchao, this project (images/trainer/Dockerfile).
TRAINER_IMAGE = os.environ.get(
    "KFP_FINETUNE_TRAINER_IMAGE", f"{REGISTRY}/kfp-finetune-trainer:{VERSION}"
)


def overridden() -> list[str]:
    """Names of the image variables set in the environment."""
    return [name for name in ENV_VARS if os.environ.get(name)]
