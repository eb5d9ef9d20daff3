"""Serving handoff: a KServe ``InferenceService`` for an exported model, applied when asked.

The runtime is KServe's Hugging Face serving runtime (``kserve-huggingfaceserver``), which
KServe selects by itself for ``modelFormat: huggingface``. On GPUs it runs the vLLM engine
(``--backend=vllm``: OpenAI-compatible endpoints, paged attention, continuous batching); on CPU
its Hugging Face backend (the runtime's CPU image has no vLLM). Its arguments are KServe's
(``python/huggingfaceserver/huggingfaceserver/__main__.py``: ``--model_name``, ``--backend``,
``--max_model_len``); the model is downloaded by KServe's storage initializer from
``storageUri`` to ``/mnt/models``, the runtime's default ``--model_dir``.

``storageUri`` is where the export put the model (:func:`model_uri`): the push destination
(``s3://bucket/prefix/<export>``, or ``hf://org/repo:<commit>``, KServe's form of a Hub
revision), else ``pvc://<workspace volume>/output/<export>`` (KServe mounts the claim; it must
be in the InferenceService's namespace). A LoRA export's top folder holds the *merged* model,
so the same URI serves LoRA and full fine-tunes; the PEFT adapter in ``adapter/`` is not read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from kfp_finetune.errors import ConfigError, SourceError
from kfp_finetune.steps.check_config import ANNOTATION_PREFIX
from kfp_finetune.storage.workspace import WORKSPACE_MOUNT

Log = Callable[[str], None]

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kfp-finetune"}
RUN_ANNOTATION = f"{ANNOTATION_PREFIX}run-id"
# KServe's isvc name rule (pkg/apis/serving/v1beta1/inference_service_validation.go,
# IsvcNameFmt); the Services it derives append "-predictor", and a Service name is a DNS-1035
# label of at most 63 characters: 63 - len("-predictor") = 53.
_ISVC_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = 53
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|[KMGTPE]i?|e[0-9]+)?")
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def kserve_hf_uri(uri: str) -> str:
    """KServe's form of a Hub location: ``hf://org/repo@rev`` -> ``hf://org/repo:rev``.

    KServe's storage initializer splits ``hf://<owner>/<model>[:<revision>]``
    (``python/storage/kserve_storage/kserve_storage.py``, ``Storage._download_hf``); the export
    records the pushed commit as ``@<commit>``.
    """
    repo, _, revision = uri[len("hf://"):].partition("@")
    return f"hf://{repo}:{revision}" if revision else f"hf://{repo}"


def model_uri(
    metadata: Mapping[str, Any], pvc_name: str = "", workspace_root: str = WORKSPACE_MOUNT,
    *, allow_local: bool = False,
) -> str:
    """Where the exported model can be fetched from, as KServe and the Model Registry take it.

    Args:
        metadata: The export's metadata (its ``path`` and ``destinations``).
        pvc_name: The workspace volume holding ``path`` ("" when there is none: a local run).
        workspace_root: Where that volume is mounted in the export's pod.
        allow_local: Without a destination or volume, give ``file://<path>`` instead of failing.

    Returns:
        The first push destination (hf:// in KServe's form, s3:// as is), else
        ``pvc://<pvc_name>/<path inside the volume>``.

    Raises:
        ConfigError: The model is only in a local folder, or ``path`` is outside the volume.
    """
    for dest in metadata.get("destinations") or []:
        if str(dest).startswith("hf://"):
            return kserve_hf_uri(str(dest))
        if str(dest).startswith("s3://"):
            return str(dest)
    path = PurePosixPath(str(metadata.get("path") or ""))
    if not pvc_name:
        if allow_local and path.is_absolute():
            return f"file://{path}"
        raise ConfigError(
            f"the model at {str(path)!r} lives only in a local folder, which a cluster cannot "
            "fetch; set push_to (hf://org/repo or s3://bucket/prefix), or run on a cluster, "
            "where the workspace volume gives a pvc:// location."
        )
    try:
        inside = path.relative_to(workspace_root)
    except ValueError:
        raise ConfigError(
            f"the model at {str(path)!r} is not on the workspace volume mounted at "
            f"{workspace_root!r}; pass the export's own metadata (its 'path')."
        ) from None
    return f"pvc://{pvc_name}/{inside}"


def service_name(name: str, export_path: str = "") -> str:
    """Check an InferenceService name; "" derives one from the export folder's name.

    Raises:
        ConfigError: The name breaks KServe's rule or is too long.
    """
    if not name:
        base = re.sub(r"[^a-z0-9-]+", "-", PurePosixPath(export_path).name.lower())
        name = re.sub(r"-+", "-", base).strip("-")[:MAX_NAME].strip("-")
        name = name if name[:1].isalpha() else f"model-{name}"[:MAX_NAME].strip("-")
    if not _ISVC_NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise ConfigError(
            f"serve_name={name!r} is not an InferenceService name: use lowercase letters, "
            f"digits and '-', start with a letter, end with a letter or digit, at most "
            f"{MAX_NAME} characters (KServe adds '-predictor' to name its Service)."
        )
    return name


def _check_quantity(value: str, what: str) -> str:
    if value and not _QUANTITY.fullmatch(value):
        raise ConfigError(
            f"{what}={value!r} is not a Kubernetes quantity; write e.g. 4, 500m, 16Gi."
        )
    return value


def inference_service(
    name: str,
    storage_uri: str,
    *,
    namespace: str = "",
    gpus: int = 1,
    accelerator: str = "nvidia.com/gpu",
    cpu: str = "",
    memory: str = "",
    max_model_len: int = 0,
    runtime: str = "",
    service_account: str = "",
    run_id: str = "",
) -> dict[str, Any]:
    """Build the ``serving.kserve.io/v1beta1`` InferenceService that serves the model.

    Args:
        name: InferenceService name (see :func:`service_name`).
        storage_uri: Where KServe fetches the model (see :func:`model_uri`).
        namespace: Its namespace ("": left out, kubectl's current one applies).
        gpus: GPUs of the predictor (0: CPU, Hugging Face backend instead of vLLM).
        accelerator: The GPU resource name.
        cpu: CPU request and limit ("": 4 with GPUs, 2 without).
        memory: Memory request and limit ("": 32Gi with GPUs, 8Gi without).
        max_model_len: Longest context vLLM allocates for (0: the model's own maximum).
        runtime: A ServingRuntime to name explicitly ("": KServe picks by model format).
        service_account: ServiceAccount whose Secrets hold the storage credentials
            (HF_TOKEN for private hf://, S3 keys for s3://; KServe's convention).
        run_id: The KFP run that produced the model (an annotation).

    Raises:
        ConfigError: A value KServe or Kubernetes would refuse.
    """
    if gpus < 0 or max_model_len < 0:
        raise ConfigError(
            f"serve_gpus={gpus} and serve_max_model_len={max_model_len} must not be negative "
            "(0: CPU serving, and the model's own context length)."
        )
    if not re.fullmatch(r"(hf|s3|pvc|gs|oci)://\S+", storage_uri):
        raise SourceError(f"storageUri {storage_uri!r} is not a location KServe can fetch.")
    resources = {"cpu": _check_quantity(cpu, "serve_cpu") or ("4" if gpus else "2"),
                 "memory": _check_quantity(memory, "serve_memory") or ("32Gi" if gpus else "8Gi")}
    limits = dict(resources, **({accelerator: str(gpus)} if gpus else {}))
    args = [f"--model_name={name}", f"--backend={'vllm' if gpus else 'huggingface'}"]
    if max_model_len:
        args.append(f"--max_model_len={max_model_len}")
    model: dict[str, Any] = {"modelFormat": {"name": "huggingface"}}
    if runtime:
        model["runtime"] = runtime
    model.update(storageUri=storage_uri, args=args,
                 resources={"requests": resources, "limits": limits})
    predictor: dict[str, Any] = {"model": model}
    if service_account:
        predictor = {"serviceAccountName": service_account, **predictor}
    metadata: dict[str, Any] = {"name": service_name(name)}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = dict(MANAGED_BY)
    if run_id:
        metadata["annotations"] = {RUN_ANNOTATION: run_id}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
            "metadata": metadata, "spec": {"predictor": predictor}}


def to_yaml(manifest: Mapping[str, Any]) -> str:
    """The manifest as YAML for ``kubectl apply -f`` (keys in the order built)."""
    import yaml

    return yaml.safe_dump(dict(manifest), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- applying


def run_namespace() -> str:
    """The namespace of the pod this runs in ("" outside a pod)."""
    try:
        return SA_NAMESPACE.read_text().strip()
    except OSError:
        return ""


def _refusal(exc: Any, verb: str, name: str, namespace: str) -> ConfigError:
    status = getattr(exc, "status", None)
    if status in (401, 403):
        return ConfigError(
            f"the pipeline's service account may not {verb} InferenceService {name} in "
            f"namespace {namespace} (HTTP {status}); grant it get, create and update on "
            "inferenceservices.serving.kserve.io, or apply the serving_manifest artifact "
            "yourself (kubectl apply -f)."
        )
    if status == 404:
        return ConfigError(
            f"namespace {namespace} has no {GROUP}/{VERSION} InferenceService API (HTTP 404): "
            "KServe is not installed there, or the namespace does not exist."
        )
    reason = f"HTTP {status}" if status else type(exc).__name__
    return ConfigError(
        f"the Kubernetes API did not {verb} InferenceService {name} in namespace {namespace} "
        f"({reason}); apply the serving_manifest artifact yourself (kubectl apply -f)."
    )


def apply_inference_service(
    manifest: dict[str, Any], api_client: Any = None, log: Log = print
) -> str:
    """Create the InferenceService, or update the one an earlier kfp-finetune run created.

    An InferenceService of that name that kfp-finetune did not create (no
    ``app.kubernetes.io/managed-by: kfp-finetune`` label) is refused, never replaced.

    Args:
        manifest: From :func:`inference_service`, with its namespace set.
        api_client: A ``kubernetes.client.ApiClient`` (None: the pod's in-cluster one).
        log: Where progress lines go.

    Returns:
        ``created``, ``updated`` or ``unchanged``.

    Raises:
        ConfigError: The API refused, cannot be reached, or the name belongs to another.
    """
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise ConfigError(
                "serve_apply needs the Kubernetes API of a cluster run (no in-cluster service "
                "account here); apply the serving_manifest artifact yourself: kubectl apply -f"
            ) from None
        api_client = client.ApiClient()
    api = client.CustomObjectsApi(api_client)
    name = manifest["metadata"]["name"]
    namespace = manifest["metadata"].get("namespace") or ""
    if not namespace:
        raise ConfigError("the InferenceService has no namespace; set serve_namespace.")
    target = (GROUP, VERSION, namespace, PLURAL)
    verb = "read"
    try:
        try:
            current = api.get_namespaced_custom_object(*target, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            current = None
        if current is None:
            verb = "create"
            api.create_namespaced_custom_object(*target, manifest)
            log(f"[serve] created InferenceService {namespace}/{name}")
            return "created"
        meta = current.get("metadata") or {}
        if (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") != "kfp-finetune":
            raise ConfigError(
                f"InferenceService {namespace}/{name} exists and was not created by kfp-finetune;"
                " it is left as it is: choose another serve_name, or delete it yourself."
            )
        if current.get("spec") == manifest["spec"]:
            log(f"[serve] InferenceService {namespace}/{name} already serves this model")
            return "unchanged"
        verb = "update"
        body = dict(manifest, metadata=dict(manifest["metadata"],
                                            resourceVersion=meta.get("resourceVersion")))
        api.replace_namespaced_custom_object(*target, name, body)
    except ApiException as exc:
        raise _refusal(exc, verb, name, namespace) from None
    except HTTPError as exc:
        raise _refusal(exc, verb, name, namespace) from None
    previous = (meta.get("annotations") or {}).get(RUN_ANNOTATION, "?")
    log(f"[serve] updated InferenceService {namespace}/{name} (it served run {previous}'s model)")
    return "updated"


def serving_manifest(
    metadata: Mapping[str, Any],
    *,
    name: str = "",
    pvc_name: str = "",
    workspace_root: str = WORKSPACE_MOUNT,
    namespace: str = "",
    apply: bool = False,
    run_id: str = "",
    api_client: Any = None,
    log: Log = print,
    **options: Any,
) -> tuple[dict[str, Any], str]:
    """The serving step: build the InferenceService for an export and apply it when asked.

    Args:
        metadata: The export's metadata (``path``, ``destinations``).
        name: InferenceService name ("" derives it from the export folder).
        pvc_name: The workspace volume ("" for none: the model must have been pushed).
        workspace_root: Where that volume was mounted in the export's pod.
        namespace: Its namespace ("" for the run's own).
        apply: Create or update it in the cluster too.
        run_id: The KFP run id (an annotation).
        api_client: A ``kubernetes.client.ApiClient`` for ``apply`` (None: in-cluster).
        log: Where progress lines go.
        **options: More :func:`inference_service` arguments (gpus, cpu, memory, ...).

    Returns:
        The manifest and what ``apply`` did (``created``, ``updated``, ``unchanged``, or
        ``not applied``).

    Raises:
        ConfigError: Bad settings, a model the cluster cannot reach, or a refused apply.
    """
    uri = model_uri(metadata, pvc_name, workspace_root)
    own = run_namespace()
    namespace = namespace or own
    if uri.startswith("pvc://") and own and namespace != own:
        raise ConfigError(
            f"serve_namespace={namespace!r}: the model is on volume {pvc_name} in namespace "
            f"{own!r}, and KServe mounts a claim only in its own namespace; leave "
            "serve_namespace empty or set push_to so the model can be fetched from anywhere."
        )
    manifest = inference_service(service_name(name, str(metadata.get("path") or "")), uri,
                                 namespace=namespace, run_id=run_id, **options)
    log(f"[serve] InferenceService {manifest['metadata']['name']} for {uri}")
    if not apply:
        return manifest, "not applied"
    return manifest, apply_inference_service(manifest, api_client, log)
