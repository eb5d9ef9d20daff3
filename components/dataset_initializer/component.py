"""dataset-initializer: fetch the dataset into /workspace/dataset and check it on CPU."""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def dataset_initializer(
    runtime: str,
    dataset_uri: str,
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
    ignore_patterns: list = [],
) -> NamedTuple(
    "DatasetInfo",
    [("rows", int), ("columns", list), ("builder", str), ("files", int), ("bytes", int),
     ("seconds", float), ("revision", str), ("skipped", bool)],
):
    """Fetch the dataset into <workspace>/dataset and check it against the preprocessing config.

    Every parameter is validated before anything is downloaded; a missing column or an empty
    split is reported here, on CPU, before the fine-tune task starts.

    Args:
        runtime: Runtime name, e.g. torchtune-llama3.2-1b.
        dataset_uri: hf://org/repo[/dir-or-file], file:///abs/path or /abs/path.
        metrics: Files, bytes, seconds and rows fetched (shown in the KFP UI).
        workspace_path: Where the workspace volume is mounted.
        dtype: Training precision, checked here (bf16 or fp32).
        batch_size: Batch size, checked here.
        epochs: Epochs, checked here.
        loss: Loss component, checked here.
        num_nodes: Nodes, checked here (must be 1).
        gpus_per_node: GPUs, checked here.
        source: Format of the data files: parquet, json, csv, arrow, text or xml.
        split: Split expression, e.g. train or train[:95%].
        train_on_input: Whether the prompt counts in the loss.
        new_system_prompt: System prompt prepended to every sample ("" for none).
        column_map: Expected column name -> your column name, e.g. {"input": "question"}.
        ignore_patterns: Glob patterns of files not to fetch, e.g. ["data/test-*"].

    Returns:
        rows: Rows the split selects; columns: the data's columns; builder: how it is read;
        files, bytes, seconds: what was fetched; revision: the commit or version fetched;
        skipped: True when a complete copy was already in the workspace.
    """
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("dataset-initializer", workspace_path):
        from kfp_finetune.config.params import config_from_params
        from kfp_finetune.config.runtimes import get_runtime
        from kfp_finetune.steps.dataset_initializer import initialize_dataset

        get_runtime(runtime)
        config = config_from_params(
            dtype=dtype, batch_size=batch_size, epochs=epochs, loss=loss, num_nodes=num_nodes,
            gpus_per_node=gpus_per_node, source=source, split=split, train_on_input=train_on_input,
            new_system_prompt=new_system_prompt, column_map=column_map,
        )
        result = initialize_dataset(
            workspace_path, dataset_uri, config.dataset_preprocess_config,
            ignore_patterns=list(ignore_patterns or []),
        )
        fetched = result.fetch
        revision = fetched.revision
        for key, value in fetched.ui_metrics().items():
            metrics.log_metric(key, value)
        metrics.log_metric("rows", result.plan.rows)
        metrics.log_metric("columns", len(result.plan.columns))
        metrics.metadata["source"] = fetched.source
        metrics.metadata["revision"] = revision
        return (result.plan.rows, result.plan.columns, result.plan.kind, fetched.files,
                fetched.bytes, float(fetched.seconds), revision, fetched.skipped)
