"""cleanup-workspace: the exit task of a cluster run; deletes or keeps the run's volume.

It runs whatever the outcome (dsl.ExitHandler) and decides from the run's final state; see
kfp_finetune.steps.cleanup_workspace for the rules.
"""

from kfp import dsl

from kfp_finetune.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def cleanup_workspace(
    status: dsl.PipelineTaskFinalStatus,
    run_id: str,
    keep_workspace_on_failure: bool = False,
    delete_workspace: bool = False,
    push_to: str = "",
) -> str:
    """Delete the run's workspace volume when the rules say so; say what was done and why.

    Args:
        status: The final state of the run's work (filled in by the KFP backend).
        run_id: The run's UUID (the volume is kfp-finetune-<run id>).
        keep_workspace_on_failure: Keep the volume of a failed run.
        delete_workspace: Delete the volume of a successful run (with push_to only).
        push_to: Where the export copied the model ("" for nowhere).

    Returns:
        deleted, kept or absent.
    """
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("cleanup-workspace", None):
        from kfp_finetune.steps.cleanup_workspace import clean_up_workspace

        return clean_up_workspace(
            status.state, run_id, keep_workspace_on_failure=keep_workspace_on_failure,
            delete_workspace=delete_workspace, push_to=push_to,
        )
