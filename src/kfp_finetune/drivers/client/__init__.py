"""``TrainerClient``: the Kubeflow SDK's client API over this project's pipeline."""

from kfp_finetune.drivers.client.base import TrainJobFailed
from kfp_finetune.drivers.client.kfp_backend import KfpBackendConfig, Schedule
from kfp_finetune.drivers.client.local_backend import LocalBackendConfig
from kfp_finetune.drivers.client.trainer_client import TrainerClient

__all__ = ["KfpBackendConfig", "LocalBackendConfig", "Schedule", "TrainJobFailed",
           "TrainerClient"]
