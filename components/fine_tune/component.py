"""fine-tune: run torchtune on the GPU node over /workspace/{dataset,model}."""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.config.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def fine_tune(
    config: dict,
    metrics: dsl.Output[dsl.Metrics],
    loss_curve: dsl.Output[dsl.HTML],
    workspace_path: str = "/workspace",
) -> NamedTuple("TrainInfo", [("final_loss", float), ("steps", int), ("checkpoint_dir", str)]):
    """Render the torchtune config, run `tune run` and stream its log.

    The full config is saved as <workspace>/output/checkpoints/torchtune_config.yaml. A re-run
    with the same config finds the finished checkpoint and does not train again.

    Args:
        config: The run's validated config (check-config's output; see
            kfp_finetune.config.run_config.RunConfig).
        metrics: Final and best loss, steps, trainable tokens/s, peak GPU memory, wall time.
        loss_curve: The loss per step as a chart (rendered by the KFP UI).
        workspace_path: Where the workspace volume is mounted.

    Returns:
        final_loss, steps and the checkpoint folder.
    """
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("fine-tune", workspace_path):
        from kfp_finetune.config.run_config import RunConfig
        from kfp_finetune.steps.fine_tune import run_fine_tune
        from kfp_finetune.steps.report import eval_references, loss_curve_html

        run = RunConfig.from_dict(config)
        runtime = run.runtime
        result = run_fine_tune(workspace_path, runtime, run.trainer, tracking=run.tracking)
        for key, value in result.metrics.items():
            if value is not None:
                metrics.log_metric(key, value)
        metrics.log_metric("resumed_from_epoch", result.resumed_from_epoch)
        with open(loss_curve.path, "w") as handle:
            handle.write(loss_curve_html(result.losses, f"{runtime}: training loss",
                                         eval_references(result.metrics)))
        return (result.final_loss, len(result.losses), result.checkpoint_dir)
