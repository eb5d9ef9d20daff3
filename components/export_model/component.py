"""export: write the fine-tuned model to /workspace/output/<name> and record it in KFP."""

from kfp import dsl

from kfp_finetune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export_model(
    runtime: str,
    model: dsl.Output[dsl.Model],
    workspace_path: str = "/workspace",
    export_name: str = "",
) -> str:
    """Copy the final checkpoint to <workspace>/output/<export_name> as a Hugging Face folder.

    The KFP Model artifact carries the metadata (base model, dataset, runtime, config, final
    loss and where the files are); the weights stay on the volume.

    Args:
        runtime: Runtime name (recorded in the metadata).
        model: The Model artifact: a JSON description of the exported model.
        workspace_path: Where the workspace volume is mounted.
        export_name: Folder name under output/ ("" for <base model>-finetuned).

    Returns:
        The folder of the exported model.
    """
    import json

    from kfp_finetune.steps import export_model as export

    result = export(workspace_path, runtime, export_name)
    meta = {k: v for k, v in result.metadata.items() if k != "files"}
    with open(model.path, "w") as handle:
        json.dump(result.metadata, handle, indent=2)
    model.metadata.update({k: v for k, v in meta.items() if v is not None})
    return result.path
