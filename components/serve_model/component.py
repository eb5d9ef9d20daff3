"""serve-model: a KServe InferenceService for the exported model; applied only when asked."""

from typing import NamedTuple

from kfp import dsl

from kfp_finetune.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def serve_model(
    model: dsl.Input[dsl.Model],
    serving_manifest: dsl.Output[dsl.Artifact],
    name: str = "",
    namespace: str = "",
    apply: bool = False,
    pvc_name: str = "",
    workspace_path: str = "/workspace",
    run_id: str = "",
    gpus: int = 1,
    cpu: str = "",
    memory: str = "",
    max_model_len: int = 0,
    runtime: str = "",
    service_account: str = "",
) -> NamedTuple("Serving", [("name", str), ("storage_uri", str), ("applied", str)]):
    """Write the serving.kserve.io/v1beta1 InferenceService YAML; create it when apply is set.

    KServe's Hugging Face runtime (modelFormat huggingface) with its vLLM backend on GPUs,
    storageUri the push destination or pvc://<pvc_name>/<path> (a LoRA export's folder holds
    the merged model). An InferenceService of that name that kfp-finetune did not create is
    never replaced.

    Args:
        model: The export step's Model artifact (its metadata: path, destinations).
        serving_manifest: The InferenceService as YAML (kubectl apply -f).
        name: InferenceService name ("" derives it from the export folder).
        namespace: Its namespace ("" for the run's).
        apply: Also create or update it through the Kubernetes API.
        pvc_name: The workspace volume holding the export ("" when there is none).
        workspace_path: Where that volume was mounted in the export task.
        run_id: The KFP run id (an annotation).
        gpus: GPUs of the predictor (0: CPU, Hugging Face backend).
        cpu: CPU request and limit ("" for 4 with GPUs, 2 without).
        memory: Memory request and limit ("" for 32Gi with GPUs, 8Gi without).
        max_model_len: Longest context vLLM allocates for (0: the model's own).
        runtime: ServingRuntime to name ("" lets KServe pick by model format).
        service_account: ServiceAccount with the storage credentials for hf:// or s3://.

    Returns:
        name, storage_uri, and applied (created, updated, unchanged or not applied).
    """
    if not name.strip():  # the pipeline's serve_name is empty: nothing to do
        print("[serve-model] skipped: serve_name is empty")
        with open(serving_manifest.path, "w") as handle:
            handle.write("")
        return ("", "", "")
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("serve-model", None):
        from kfp_finetune.steps.serving_manifest import serving_manifest as build
        from kfp_finetune.steps.serving_manifest import to_yaml

        manifest, applied = build(
            dict(model.metadata), name=name, pvc_name=pvc_name, workspace_root=workspace_path,
            namespace=namespace,
            apply=apply, run_id=run_id, gpus=gpus, cpu=cpu, memory=memory,
            max_model_len=max_model_len, runtime=runtime, service_account=service_account)
        with open(serving_manifest.path, "w") as handle:
            handle.write(to_yaml(manifest))
        spec = manifest["spec"]["predictor"]["model"]
        serving_manifest.metadata.update(
            {"name": manifest["metadata"]["name"],
             "namespace": manifest["metadata"].get("namespace", ""),
             "storage_uri": spec["storageUri"], "applied": applied})
        return (manifest["metadata"]["name"], spec["storageUri"], applied)
