"""model-initializer: fetch the base model into /workspace/model and check it on CPU."""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def model_initializer(
    config: dict,
    metrics: dsl.Output[dsl.Metrics],
    workspace_path: str = "/workspace",
) -> NamedTuple(
    "ModelInfo",
    [("recipe", str), ("config", str), ("weight_files", int), ("files", int), ("bytes", int),
     ("seconds", float), ("revision", str), ("skipped", bool)],
):
    """Fetch the base model into <workspace>/model and check it against the runtime.

    The whole training config is validated before anything is downloaded, and the model's
    architecture and size are checked against the runtime (a 3B checkpoint on the 1B runtime
    is an error that names the right runtime).

    Args:
        config: The run's validated config (check-config's output; see
            kfp_finetune.config.run_config.RunConfig).
        metrics: Files, bytes, weight files and download speed.
        workspace_path: Where the workspace volume is mounted.

    Returns:
        recipe and config: the torchtune recipe and base config that will run; weight_files,
        files, bytes, seconds: what was fetched; revision: the commit or version fetched;
        skipped: True when a complete copy was already in the workspace.
    """
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("model-initializer", workspace_path):
        from kfp_finetune.config.run_config import RunConfig
        from kfp_finetune.steps.model_initializer import initialize_model

        run = RunConfig.from_dict(config)
        result = initialize_model(workspace_path, run.model_uri, run.runtime, run.trainer,
                                  ignore_patterns=run.model_ignore_patterns)
        fetched = result.fetch
        revision = fetched.revision
        for key, value in fetched.ui_metrics().items():
            metrics.log_metric(key, value)
        metrics.log_metric("weight_files", len(result.info.checkpoint_files))
        metrics.metadata["source"] = fetched.source
        metrics.metadata["revision"] = revision
        return (result.recipe, result.config, len(result.info.checkpoint_files), fetched.files,
                fetched.bytes, float(fetched.seconds), revision, fetched.skipped)
