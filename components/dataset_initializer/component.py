"""dataset-initializer: fetch the dataset into /workspace/dataset and check it on CPU."""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def dataset_initializer(
    config: dict,
    metrics: dsl.Output[dsl.Metrics],
    workspace_path: str = "/workspace",
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
        config: The run's validated config (check-config's output; see
            kfp_finetune.config.run_config.RunConfig).
        metrics: Rows, columns, files, bytes and download speed.
        workspace_path: Where the workspace volume is mounted.
        ignore_patterns: Glob patterns of dataset files not to fetch.

    Returns:
        rows: Rows the split selects; columns: the data's columns; builder: how it is read;
        files, bytes, seconds: what was fetched; revision: the commit or version fetched;
        skipped: True when a complete copy was already in the workspace.
    """
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("dataset-initializer", workspace_path):
        from kfp_finetune.config.run_config import RunConfig
        from kfp_finetune.steps.dataset_initializer import initialize_dataset

        run = RunConfig.from_dict(config)
        result = initialize_dataset(
            workspace_path, run.dataset_uri, run.trainer.dataset_preprocess_config,
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
