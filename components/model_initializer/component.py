"""model-initializer: fetch the base model into /workspace/model and check it on CPU."""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def model_initializer(
    runtime: str,
    model_uri: str,
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
) -> NamedTuple("ModelInfo", [("recipe", str), ("config", str), ("weight_files", int)]):
    """Fetch the base model into <workspace>/model and check it against the runtime.

    The whole training config is validated before anything is downloaded, and the model's
    architecture and size are checked against the runtime (a 3B checkpoint on the 1B runtime
    is an error that names the right runtime).

    Args:
        runtime: Runtime name, e.g. torchtune-llama3.2-1b.
        model_uri: hf://org/repo, file:///abs/path or /abs/path ("" for the runtime default).
        metrics: Files, bytes and seconds fetched (shown in the KFP UI).
        workspace_path: Where the workspace volume is mounted.
        dtype: Training precision: bf16 or fp32.
        batch_size: Samples per device per step.
        epochs: Passes over the dataset.
        loss: Loss component (torchtune.modules.loss.CEWithChunkedOutputLoss).
        num_nodes: Nodes (must be 1).
        gpus_per_node: GPUs; decides the recipe.
        source: Format of the data files, checked here.
        split: Split expression, checked here.
        train_on_input: Whether the prompt counts in the loss.
        new_system_prompt: System prompt, checked here.
        column_map: Column map, checked here.

    Returns:
        recipe and config: the torchtune recipe and base config that will run.
    """
    from kfp_finetune.params import config_from_params
    from kfp_finetune.steps import initialize_model

    config = config_from_params(
        dtype=dtype, batch_size=batch_size, epochs=epochs, loss=loss, num_nodes=num_nodes,
        gpus_per_node=gpus_per_node, source=source, split=split, train_on_input=train_on_input,
        new_system_prompt=new_system_prompt, column_map=column_map,
    )
    result = initialize_model(workspace_path, model_uri, runtime, config)
    metrics.log_metric("files", result.fetch.files)
    metrics.log_metric("bytes", result.fetch.bytes)
    metrics.log_metric("seconds", result.fetch.seconds)
    return (result.recipe, result.config, len(result.info.checkpoint_files))
