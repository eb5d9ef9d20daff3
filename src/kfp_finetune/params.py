"""Turning flat pipeline parameters (what the KFP UI shows) into the API's dataclasses."""

from __future__ import annotations

from typing import Any

from kfp_finetune.types import TorchTuneConfig, TorchTuneInstructDataset


def preprocess_from_params(
    source: str, split: str, train_on_input: bool, new_system_prompt: str, column_map: Any
) -> TorchTuneInstructDataset:
    """Build ``TorchTuneInstructDataset`` from pipeline parameters (validated)."""
    return TorchTuneInstructDataset(
        source=source or None,
        split=split or None,
        train_on_input=train_on_input,
        new_system_prompt=new_system_prompt or None,
        column_map=dict(column_map) if column_map else None,
    )


def config_from_params(
    *,
    dtype: str,
    batch_size: int,
    epochs: int,
    loss: str,
    num_nodes: int,
    gpus_per_node: int,
    source: str,
    split: str,
    train_on_input: bool,
    new_system_prompt: str,
    column_map: Any,
) -> TorchTuneConfig:
    """Build ``TorchTuneConfig`` from pipeline parameters (validated).

    Raises:
        ConfigError: A parameter is out of range or not an allowed value.
    """
    return TorchTuneConfig(
        dtype=dtype or None,
        batch_size=batch_size,
        epochs=epochs,
        loss=loss or None,
        num_nodes=num_nodes,
        resources_per_node={"gpu": gpus_per_node},
        dataset_preprocess_config=preprocess_from_params(
            source, split, train_on_input, new_system_prompt, column_map
        ),
    )
