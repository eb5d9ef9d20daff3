"""register-model: record the exported model in the Kubeflow Model Registry (optional step)."""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register_model(
    model: dsl.Input[dsl.Model],
    registry_url: str,
    model_name: str = "",
    version: str = "",
    author: str = "kfp-finetune",
    pvc_name: str = "",
    workspace_path: str = "/workspace",
    timeout_s: int = 60,
) -> NamedTuple("Registration", [("name", str), ("version", str), ("uri", str)]):
    """Register the export (the export step's Model artifact) with the Model Registry.

    One registered model, one version per export, one model artifact whose URI is the push
    destination or pvc://<pvc_name>/<path in the volume>; base model, dataset, run id, losses
    and hyperparameters as the version's custom properties. A re-run finds the same version
    and writes nothing. The token comes from the MODEL_REGISTRY_TOKEN environment variable
    (a Kubernetes Secret), never from a parameter.

    Args:
        model: The export step's Model artifact (its metadata: path, destinations, ...).
        registry_url: The registry's REST address, http(s)://host[:port].
        model_name: Registered model name ("" for <base model>-finetuned).
        version: Version name ("" for the export folder's name, which carries the run id).
        author: Author and owner recorded in the registry.
        pvc_name: The workspace volume holding the export ("" when there is none).
        workspace_path: Where that volume was mounted in the export task.
        timeout_s: Longest wait for any one registry call, in seconds.

    Returns:
        name, version and uri as registered.
    """
    if not registry_url.strip():  # the pipeline's registry_url is empty: nothing to do
        print("[register-model] skipped: registry_url is empty")
        return ("", "", "")
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("register-model", None):
        from kfp_finetune.steps.register_model import register_model as register

        result = register(dict(model.metadata), registry_url, name=model_name,
                          version=version, author=author, pvc_name=pvc_name,
                          workspace_root=workspace_path,
                          timeout_s=float(timeout_s))
        return (result.name, result.version, result.uri)
