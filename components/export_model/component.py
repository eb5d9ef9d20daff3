"""export: write the fine-tuned model to /workspace/output/<name> and record it in KFP."""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export_model(
    config: dict,
    model: dsl.Output[dsl.Model],
    workspace_path: str = "/workspace",
    run_id: str = "",
) -> NamedTuple("ExportInfo", [("path", str), ("exported_elsewhere", bool)]):
    """Write the final checkpoint to <workspace>/output/<name> as a Hugging Face model folder.

    The folder loads with transformers and vLLM as it is (config, generation config, tokenizer,
    sharded safetensors with index); LoRA runs give the merged model there and the PEFT adapter
    in its adapter/ subfolder. The KFP Model artifact carries the metadata (base model and
    revision, dataset, runtime, config, final loss, where the files are); the weights are
    copied into the artifact store only with copy_to_artifact.

    Args:
        config: The run's validated config (check-config's output; see
            kfp_finetune.config.run_config.RunConfig): runtime, export name, push_to and
            copy_to_artifact are read from it.
        model: The Model artifact: metadata, plus the model files with copy_to_artifact.
        workspace_path: Where the workspace volume is mounted.
        run_id: The KFP run's id; keeps runs from overwriting each other's exports.

    Returns:
        path: folder of the exported model; exported_elsewhere: a copy exists off the volume.
    """
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("export", workspace_path):
        import json
        import shutil

        from kfp_finetune.config.run_config import RunConfig
        from kfp_finetune.steps.export_model import export_model as export

        run = RunConfig.from_dict(config)
        copy_to_artifact = run.copy_to_artifact
        result = export(workspace_path, run.runtime, run.export_name, run_id, run.push_to,
                        tracking=run.tracking)
        meta = {k: v for k, v in result.metadata.items() if k != "files" and v is not None}
        meta["destinations"] = result.destinations
        meta["files"] = result.files
        meta["bytes"] = result.bytes
        if copy_to_artifact:
            shutil.copytree(result.path, model.path, ignore=shutil.ignore_patterns(".*"))
        else:
            with open(model.path, "w") as handle:
                json.dump(meta, handle, indent=2)
        meta["weights_in_artifact"] = copy_to_artifact
        model.metadata.update(meta)
        if not result.exported_elsewhere:
            from kfp_finetune.steps.cleanup_workspace import mark_exported

            mark_exported(run_id, result.path)  # the exit task keeps a volume holding the model
        return (result.path, result.exported_elsewhere)
