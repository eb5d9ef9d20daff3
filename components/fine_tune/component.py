"""fine-tune: run torchtune on the GPU node over /workspace/{dataset,model}."""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def fine_tune(
    runtime: str,
    metrics: dsl.Output[dsl.Metrics],
    workspace_path: str = "/workspace",
    dtype: str = "",
    batch_size: int = 1,
    epochs: int = 1,
    loss: str = "",
    num_nodes: int = 1,
    gpus_per_node: int = 0,
    source: str = "parquet",
    split: str = "train",
    train_on_input: bool = False,
    new_system_prompt: str = "",
    column_map: dict = {},
) -> NamedTuple("TrainInfo", [("final_loss", float), ("steps", int), ("checkpoint_dir", str)]):
    """Render the torchtune config, run `tune run` and stream its log.

    The full config is saved as <workspace>/output/checkpoints/torchtune_config.yaml. A re-run
    with the same config finds the finished checkpoint and does not train again.

    Args:
        runtime: Runtime name, e.g. torchtune-llama3.2-1b.
        metrics: Final loss, steps and wall time (shown in the KFP UI).
        workspace_path: Where the workspace volume is mounted.
        dtype: Training precision: bf16 or fp32.
        batch_size: Samples per device per step.
        epochs: Passes over the dataset.
        loss: Loss component.
        num_nodes: Nodes (must be 1).
        gpus_per_node: GPUs: 0 trains on CPU, 1 on one GPU, 2-8 with torchrun.
        source: Format of the data files.
        split: Split expression.
        train_on_input: Whether the prompt counts in the loss.
        new_system_prompt: System prompt ("" for none).
        column_map: Column map.

    Returns:
        final_loss, steps and the checkpoint folder.
    """
    from kfp_finetune.params import config_from_params
    from kfp_finetune.steps import run_fine_tune

    config = config_from_params(
        dtype=dtype, batch_size=batch_size, epochs=epochs, loss=loss, num_nodes=num_nodes,
        gpus_per_node=gpus_per_node, source=source, split=split, train_on_input=train_on_input,
        new_system_prompt=new_system_prompt, column_map=column_map,
    )
    result = run_fine_tune(workspace_path, runtime, config)
    metrics.log_metric("final_loss", result.final_loss)
    metrics.log_metric("steps", len(result.losses))
    metrics.log_metric("train_seconds", result.seconds)
    return (result.final_loss, len(result.losses), result.checkpoint_dir)
