"""tokenize-dataset: tokenize (and pack) the dataset on CPU before the GPU step."""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def tokenize_dataset(
    config: dict,
    metrics: dsl.Output[dsl.Metrics],
    workspace_path: str = "/workspace",
    num_workers: int = 0,
) -> NamedTuple(
    "TokenizeInfo",
    [("rows", int), ("packs", int), ("rows_truncated", int), ("tokens_lost", int),
     ("seconds", float), ("skipped", bool)],
):
    """Tokenize <workspace>/dataset as the fine-tune step's torchtune config would.

    The result goes to <workspace>/tokenized (memory-mapped arrays, manifest written last);
    the fine-tune step reads it instead of tokenizing on the GPU node. Rows cut by
    max_seq_len and the tokens they lost are reported in the metrics.

    Args:
        config: The run's validated config (check-config's output; see
            kfp_finetune.config.run_config.RunConfig).
        metrics: Rows, packs, truncated rows, lost tokens, seconds.
        workspace_path: Where the workspace volume is mounted.
        num_workers: Tokenizing processes (0: every CPU of this task).

    Returns:
        rows, packs, rows_truncated, tokens_lost, seconds, and skipped (True when the store
        for this config was already complete, or the config cannot be pre-tokenized).
    """
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("tokenize-dataset", workspace_path):
        from kfp_finetune.config.run_config import RunConfig
        from kfp_finetune.steps.tokenize_dataset import tokenize_dataset as run_tokenize

        run = RunConfig.from_dict(config)
        result = run_tokenize(workspace_path, run.runtime, run.trainer, workers=num_workers)
        for key, value in result.ui_metrics().items():
            metrics.log_metric(key, value)
        if result.reason:
            metrics.metadata["not_pretokenized"] = result.reason
        stats = result.stats
        return (stats.rows, result.packs, stats.rows_truncated, stats.tokens_lost,
                float(result.seconds), result.skipped)
